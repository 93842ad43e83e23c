"""`CatalogStore`: the whole catalog on one SQLAlchemy URL, composed from its table modules.

- `database`: the engine, SQLite set-up, the `write()` / `read()` transactions, migrations;
- `runs`: registered datasets and runs;
- `partitions`: partition versions, lineage and discrepancies;
- `leases`: dataset write leases;
- `chain`: the audit chain mirror and heads (`locked_chain`, `ChainTransaction`);
- `source_indexes`: the zone indexes of streamed sources (a cache shared by every host).

The rollout tables have their own store on the same database (`rollouts.RolloutStore`).
"""

from __future__ import annotations

from pcbo_dagster.catalog.chain import ChainMirror
from pcbo_dagster.catalog.leases import DatasetLeases
from pcbo_dagster.catalog.partitions import PartitionRecords
from pcbo_dagster.catalog.runs import RunRecords
from pcbo_dagster.catalog.source_indexes import SourceZoneIndexes


class CatalogStore(RunRecords, PartitionRecords, DatasetLeases, ChainMirror, SourceZoneIndexes):
    """The catalog on a SQLAlchemy URL (SQLite or PostgreSQL): runs, partition versions, lineage,
    discrepancies, dataset leases, the audit chain mirror and the sources' zone indexes. Every write
    is one transaction.
    One instance per process (do not share across fork)."""

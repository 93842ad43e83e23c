"""`CatalogStore`: the whole catalog on one SQLAlchemy URL, composed from its table modules.

- `database`: the engine, SQLite set-up, the `write()` / `read()` transactions, migrations;
- `runs`: registered datasets and runs;
- `partitions`: partition versions, lineage and discrepancies;
- `leases`: dataset write leases;
- `chain`: the audit chain mirror and heads (`locked_chain`, `ChainTransaction`);
- `transparency`: each chain's transparency log (stored tree), signed checkpoints, cosignatures.
- `publications`: which Iceberg table each dataset version is published to.
- `server_records`: the HTTP API's tokens, command audit, API runs and idempotency keys.
- `sql_applies`: what each apply into a SQL target did, and the rows it could not write.
- `source_indexes`: the zone indexes of streamed sources (a cache shared by every host).

The rollout tables have their own store on the same database (`rollouts.RolloutStore`).
"""

from __future__ import annotations

from pcbo_dagster.catalog.chain import ChainMirror
from pcbo_dagster.catalog.leases import DatasetLeases
from pcbo_dagster.catalog.partitions import PartitionRecords
from pcbo_dagster.catalog.publications import TablePublicationRecords
from pcbo_dagster.catalog.runs import RunRecords
from pcbo_dagster.catalog.server_records import ServerRecords
from pcbo_dagster.catalog.source_indexes import SourceZoneIndexes
from pcbo_dagster.catalog.sql_applies import SqlApplyRecords
from pcbo_dagster.catalog.transparency import TransparencyRecords


class CatalogStore(
    RunRecords,
    PartitionRecords,
    DatasetLeases,
    ChainMirror,
    TransparencyRecords,
    TablePublicationRecords,
    ServerRecords,
    SqlApplyRecords,
    SourceZoneIndexes,
):
    """The catalog on a SQLAlchemy URL (SQLite or PostgreSQL): runs, partition versions, lineage,
    discrepancies, dataset leases, the audit chain mirror and its transparency logs, table
    publications, the HTTP API's records, SQL target applies and the sources' zone indexes. Every write
    is one transaction. One instance per process (do not share across fork)."""

"""A ledger range run continues the ledger history the lake holds, or is refused before it writes.

A run checks the links of the ledgers it reads (`sources/ledger_archives.py`), not the link between
its first ledger and the last ledger an earlier run loaded: an archive rewritten from a fork would
load a second history next to the first. So before anything is written (under the run's lease, on
the chain it verified), the current partitions of the dataset version that hold the ledger just
before the run's range and the ledger just after it are read (each only when its commit point is the
one the chain says is current, its files intact: anything else is `verify`'s to report), and the
run's first and last ledgers must link to them (`core/ledger_links.py`), and the ledgers it shares
with a current partition of another key overlapping its range (runs partitioned differently) must
have that partition's hashes: else `InvalidInput` on `source.uri` (exit 2), nothing written.
`pcbo verify` checks every link the lake holds the same way.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pcbo_dagster.core.chain_state import ChainState
from pcbo_dagster.core.decisions import Decisions, PartitionDecision
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.ledger_links import HASH, PREVIOUS, SEQUENCE, LedgerLinks
from pcbo_dagster.core.partition_keys import PartitionKeyError, parse_ledger_key
from pcbo_dagster.core.plan import Plan
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.partition_reading import read_partition
from pcbo_dagster.engine.request_loading import LoadedRequest
from pcbo_dagster.sources.streaming import source_batch_size


def refuse_another_history(
    env: Environment, loaded: LoadedRequest, plan: Plan, decisions: Decisions, state: ChainState
) -> None:
    """`InvalidInput` (module doc) when the run's ledgers do not continue the lake's on either side."""
    ledgers = loaded.request.ledgerRange
    if ledgers is None or len(decisions.partitions) == 0:
        return
    neighbours = _current_keys_holding(state, (ledgers.first - 1, ledgers.end), plan)
    if not neighbours:
        return
    # Partitions of another key holding ledgers of the run's range (runs partitioned differently):
    # every ledger both hold must have one hash.
    own = [(pd.partition.start, pd.partition.end - 1) for pd in decisions.partitions]
    links = LedgerLinks(
        shared=LedgerLinks.shared_ranges([*own, *(parse_ledger_key(key) for key in neighbours)])
    )
    for key in neighbours:
        reading = read_partition(env.lake, plan.dataset, plan.version_label, key)
        history = state.get(key)
        if reading.findings or history is None or reading.manifest_checksum != history.current_checksum:
            continue
        for table in reading.tables:
            links.add(table, f"{plan.dataset}/{plan.version_label}/{key}")
    ends = {pd.partition.index: pd for pd in (decisions.partitions[0], decisions.partitions[-1])}
    for pd in ends.values():
        links.add(_end_ledgers(loaded, pd), f"this run's {pd.partition.key}")
    for pd in decisions.partitions:
        if any(low < pd.partition.end and pd.partition.start <= high for low, high in links.shared):
            for rows in loaded.fetch_chunks(pd.add_locators, source_batch_size()):
                links.add(_link_columns(rows), f"this run's {pd.partition.key}")
    broken = links.breaks()
    if broken:
        where, detail = broken[0]
        raise InvalidInput(
            "source.uri",
            f"{where}: {detail}; the source is not the ledger history the lake holds (nothing written)",
        )


def _current_keys_holding(state: ChainState, span: tuple[int, int], plan: Plan) -> list[str]:
    """The keys of the current partitions (not the run's own) whose range holds a ledger of `span`
    (both inclusive: the ledgers just before and just after the run's range, and those of it)."""
    own = {p.key for p in plan.partitions}
    found = []
    for key, history in sorted(state.partitions.items()):
        if history.current is None or key in own:
            continue
        try:
            first, last = parse_ledger_key(key)
        except PartitionKeyError:
            continue
        if first <= span[1] and span[0] <= last:
            found.append(key)
    return found


def _end_ledgers(loaded: LoadedRequest, pd: PartitionDecision) -> pa.Table:
    """The first and last ledgers the partition adds (ids sort as sequences do), their link columns."""
    if len(pd.add) == 0:
        return pa.table({})
    return _link_columns(loaded.fetch(pd.add_locators[[0, len(pd.add) - 1]]))


def _link_columns(records: list[Any]) -> pa.Table:
    """The link columns of `records`; an empty table when they are not ledger records."""
    columns = {
        name: [r.get(name) if isinstance(r, dict) else None for r in records]
        for name in (SEQUENCE, HASH, PREVIOUS)
    }
    try:
        return pa.table(
            {
                SEQUENCE: pa.array(columns[SEQUENCE], pa.int64()),
                HASH: pa.array(columns[HASH], pa.string()),
                PREVIOUS: pa.array(columns[PREVIOUS], pa.string()),
            }
        )
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.table({})  # not ledger records: no link to check

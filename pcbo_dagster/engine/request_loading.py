"""From request bytes to a plan and its decisions: the evaluation shared by every command.

Inline records (`sourceRecords`) are held in memory. A `source` (a JSONL, CSV or parquet file, a
directory of them, or a ledger archive) is streamed (`sources.streaming`): it is read once in
batches, each record's decision state goes to a decision spill on local disk
(`engine.decision_spill`), and the records a run writes are read again by their locators, a
partition at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pcbo_dagster.core.canonical import CanonicalizationError, record_digest_bytes, record_digests
from pcbo_dagster.core.decisions import Decisions, PartitionDecision, decide, known_columns
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.memory import release_memory
from pcbo_dagster.core.plan import Plan, build_plan
from pcbo_dagster.core.record_table import SchemaBuilder, run_schema
from pcbo_dagster.core.request_model import BackfillRequest, parse_json_strict, validate_request
from pcbo_dagster.engine.decision_spill import DecisionSpill, SpilledPartitions
from pcbo_dagster.sources.hive_directories import is_directory, open_directory_source
from pcbo_dagster.sources.ledger_archives import LedgerArchiveSource
from pcbo_dagster.sources.record_files import resolve_uri
from pcbo_dagster.sources.streaming import RecordSource, open_source, source_batch_size
from pcbo_dagster.sources.zones import Window, ZoneIndexStore


@dataclass
class LoadedRequest:
    request: BackfillRequest
    #: The records, in memory (inline records, ledger archives); None for a streamed source.
    records: list[Any] | None
    #: Hex digests of `records`; None for a streamed source (its spill holds them).
    digests: list[str] | None
    source_uri: str
    source_kind: str
    #: A streamed source, and the decision spill pass 1 filled.
    source: RecordSource | None = None
    spill: DecisionSpill | None = None

    @property
    def record_count(self) -> int:
        return self.spill.count if self.spill is not None else len(self.digests or [])

    def plan(self) -> Plan:
        """The request's plan (its hash over every record's digest)."""
        if self.spill is not None:
            return build_plan(self.request, self.spill.sorted_digests())
        assert self.digests is not None
        return build_plan(self.request, self.digests)

    def fetch(self, locators: np.ndarray | list[int]) -> list[Any]:
        """The records at `locators` (`PartitionDecision.add_locators`: input positions for records in
        memory, else the streamed source's locators), in that order."""
        if self.source is None:
            assert self.records is not None
            return [self.records[i] for i in np.asarray(locators, dtype=np.int64).tolist()]
        return self.source.fetch(np.asarray(locators, dtype=np.int64))

    def fetch_chunks(self, locators: np.ndarray, size: int) -> Iterator[list[Any]]:
        """`fetch(locators)`, `size` records at a time."""
        locators = np.asarray(locators, dtype=np.int64)
        if self.source is not None:
            yield from self.source.fetch_chunks(locators, size)
            return
        for lo in range(0, len(locators), size):
            yield self.fetch(locators[lo : lo + size])

    def schema_of(self, partitions: Iterable[PartitionDecision]) -> tuple[pa.Schema, dict[str, bool]]:
        """`run_schema` of the records `partitions` add (read a partition and a batch at a time for a
        streamed source)."""
        if self.source is None:
            return run_schema(self.fetch([i for pd in partitions for i in pd.add_locators.tolist()]))
        spill = self.spill
        if isinstance(partitions, SpilledPartitions) and partitions.spill is spill and spill.schema_exact:
            return spill.schema.result()  # every partition of the request: seen in pass 1
        builder = SchemaBuilder()
        for pd in partitions:
            for rows in self.fetch_chunks(pd.add_locators, source_batch_size()):
                builder.add(rows)
        return builder.result()


def _digest_error(field: str, exc: CanonicalizationError) -> InvalidInput:
    index, reason = exc.args[0], exc.args[1] if len(exc.args) > 1 else str(exc)
    return InvalidInput(f"{field}[{index}]", f"not representable as RFC 8785 JSON: {reason}")


def _load_streamed(request: BackfillRequest, source: RecordSource) -> LoadedRequest:
    """Pass 1 over a record file: each batch's digests and decision state into a decision spill."""
    ledger_field = request.ledgerRange.field if request.ledgerRange is not None else None
    spill = DecisionSpill(build_plan(request, []), list(request.existingTargetIds))
    try:
        first = 0
        error: InvalidInput | None = None
        for records, risky, locators in source.batches(source_batch_size()):
            if error is None:  # the first record RFC 8785 cannot express, once every line has parsed
                try:
                    digests = record_digest_bytes(records, risky, first)
                    spill.add_batch(records, digests, locators, known_columns(records, ledger_field))
                except CanonicalizationError as exc:
                    error = _digest_error("source", exc)
            first += len(records)
            records.clear()  # the batch is done with (the reader holds it until its next batch)
            release_memory()
        if error is not None:
            raise error
        spill.finish()
    except BaseException:
        spill.close()
        raise
    return LoadedRequest(request, None, None, source.uri, source.kind, source=source, spill=spill)


def placement_window(request: BackfillRequest) -> Window:
    """What the request places records by, and its window: `occurredAt` in [start, end), or the
    ledger field in [first, end)."""
    span = request.ledgerRange
    if span is not None:
        return Window(span.field, True, span.first, span.end)
    return Window("occurredAt", False, request.start_us, request.end_us)


def _record_source(request: BackfillRequest, uri: str, zone_indexes: ZoneIndexStore | None) -> RecordSource:
    """The streamed source a request names: a ledger archive, a record file, or a directory of them
    (unless `source.prune` is false: a directory's files pruned by their hive paths, and every file
    read only in the zones that may hold records of the request's window, `sources/zones.py`)."""
    ref = request.source
    assert ref is not None
    if ref.format == "ledger_archive":
        span = request.ledgerRange
        assert span is not None  # validate_request refuses an archive without a ledger range
        return LedgerArchiveSource(uri, ref.uri, span.first, span.end, allow_gaps=ref.allowGaps)
    if is_directory(uri, ref.uri):
        window = None if request.ledgerRange is not None else (request.start_us, request.end_us)
        source = open_directory_source(uri, ref.uri, ref.format, window, ref.prune)
    else:
        source = open_source(uri, ref.uri, ref.resolved_format())
    if ref.prune:
        source.prune_zones(placement_window(request), zone_indexes)
    return source


def load_request(
    raw: bytes, base_dir: Path | None = None, zone_indexes: ZoneIndexStore | None = None
) -> LoadedRequest:
    """Parse, validate and read the records of a request; `InvalidInput` on any bad input.
    `zone_indexes` keeps the zone indexes of streamed sources between runs (the catalog): the records
    read are the same without it, which only makes a range run read its whole source once."""
    parsed = parse_json_strict(raw)
    request = validate_request(parsed.value)
    if request.source is not None:
        uri = resolve_uri(request.source.uri, base_dir)
        return _load_streamed(request, _record_source(request, uri, zone_indexes))
    records = request.sourceRecords or []
    try:
        digests = record_digests(records, parsed.may_hold_floats_or_big_ints)
    except CanonicalizationError as exc:
        raise _digest_error("sourceRecords", exc) from None
    return LoadedRequest(request, records, digests, "inline", "inline")


def evaluate(loaded: LoadedRequest) -> tuple[Plan, Decisions]:
    plan = loaded.plan()
    if loaded.spill is not None:
        decisions = loaded.spill.decisions(plan)
        release_memory()
        return plan, decisions
    assert loaded.records is not None and loaded.digests is not None
    return plan, decide(plan, loaded.records, loaded.digests, list(loaded.request.existingTargetIds))

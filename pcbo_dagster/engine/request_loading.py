"""From request bytes to a plan and its decisions: the evaluation shared by every command.

Inline records (`sourceRecords`) and ledger archives are held in memory. A record file (`source`:
JSONL, CSV or parquet) is streamed (`sources.streaming`): it is read in batches and only each
record's digest and decision columns are kept; the records a run writes are read again by position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pcbo_dagster.core.canonical import CanonicalizationError, record_digest_bytes, record_digests
from pcbo_dagster.core.decisions import Decisions, RecordColumns, decide, decide_columns, known_columns
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.memory import release_memory
from pcbo_dagster.core.plan import Plan, build_plan
from pcbo_dagster.core.record_table import SchemaBuilder, run_schema
from pcbo_dagster.core.request_model import BackfillRequest, parse_json_strict, validate_request
from pcbo_dagster.sources.ledger_archives import iter_ledger_records
from pcbo_dagster.sources.record_files import resolve_uri
from pcbo_dagster.sources.streaming import RecordSource, open_source, source_batch_size


@dataclass
class LoadedRequest:
    request: BackfillRequest
    #: The records, in memory (inline records, ledger archives); None for a streamed source.
    records: list[Any] | None
    #: Hex digests of `records`; for a streamed source an (n, 32) uint8 array of raw digests.
    digests: list[str] | np.ndarray
    source_uri: str
    source_kind: str
    #: A streamed source, and its records' decision columns.
    source: RecordSource | None = None
    columns: RecordColumns | None = None

    @property
    def record_count(self) -> int:
        return len(self.digests)

    def fetch(self, indices: np.ndarray | list[int]) -> list[Any]:
        """The records at `indices`, in that order (read from the source when it is streamed)."""
        if self.source is None:
            assert self.records is not None
            return [self.records[i] for i in np.asarray(indices, dtype=np.int64).tolist()]
        return self.source.fetch(np.asarray(indices, dtype=np.int64))

    def fetch_chunks(self, indices: np.ndarray, size: int) -> Iterator[list[Any]]:
        """`fetch(indices)`, `size` records at a time."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.source is not None:
            yield from self.source.fetch_chunks(indices, size)
            return
        for lo in range(0, len(indices), size):
            yield self.fetch(indices[lo : lo + size])

    def schema_of(self, indices: list[int]) -> tuple[pa.Schema, dict[str, bool]]:
        """`run_schema` of the records at `indices` (a batch at a time for a streamed source)."""
        if self.source is None:
            return run_schema(self.fetch(indices))
        builder = SchemaBuilder()
        for rows in self.source.scan(np.sort(np.asarray(indices, dtype=np.int64)), source_batch_size()):
            builder.add(rows)
        return builder.result()


def _digest_error(field: str, exc: CanonicalizationError) -> InvalidInput:
    index, reason = exc.args[0], exc.args[1] if len(exc.args) > 1 else str(exc)
    return InvalidInput(f"{field}[{index}]", f"not representable as RFC 8785 JSON: {reason}")


def _load_streamed(request: BackfillRequest, source: RecordSource) -> LoadedRequest:
    """Pass 1 over a record file: digests and decision columns a batch at a time."""
    ledger_field = request.ledgerRange.field if request.ledgerRange is not None else None
    digests = bytearray()
    parts: list[RecordColumns] = []
    first = 0
    error: InvalidInput | None = None
    for records, risky in source.batches(source_batch_size()):
        if error is None:  # the first record RFC 8785 cannot express, once every line has parsed
            try:
                digests += record_digest_bytes(records, risky, first)
                parts.append(known_columns(records, ledger_field))
            except CanonicalizationError as exc:
                error = _digest_error("source", exc)
        first += len(records)
        records.clear()  # the batch is done with (the reader holds it until its next batch)
        release_memory()
    if error is not None:
        raise error
    joined = np.frombuffer(digests, dtype=np.uint8).reshape(first, 32)
    return LoadedRequest(
        request,
        None,
        joined,
        source.uri,
        source.kind,
        source=source,
        columns=RecordColumns.concat(parts, ledger_field),
    )


def load_request(raw: bytes, base_dir: Path | None = None) -> LoadedRequest:
    """Parse, validate and read the records of a request; `InvalidInput` on any bad input."""
    parsed = parse_json_strict(raw)
    request = validate_request(parsed.value)
    if request.source is not None and request.source.format == "ledger_archive":
        uri = resolve_uri(request.source.uri, base_dir)
        span = request.ledgerRange
        records, risky = list(iter_ledger_records(uri, span.first, span.end)), False
        kind, field = "ledger_archive", "source"
    elif request.source is not None:
        uri = resolve_uri(request.source.uri, base_dir)
        fmt = request.source.resolved_format()
        return _load_streamed(request, open_source(uri, request.source.uri, fmt))
    else:
        records, risky, uri, kind, field = (
            request.sourceRecords or [],
            parsed.may_hold_floats_or_big_ints,
            "inline",
            "inline",
            "sourceRecords",
        )
    try:
        digests = record_digests(records, risky)
    except CanonicalizationError as exc:
        raise _digest_error(field, exc) from None
    return LoadedRequest(request, records, digests, uri, kind)


def evaluate(loaded: LoadedRequest) -> tuple[Plan, Decisions]:
    plan = build_plan(loaded.request, loaded.digests)
    existing = list(loaded.request.existingTargetIds)
    if loaded.columns is None:
        assert loaded.records is not None and isinstance(loaded.digests, list)
        return plan, decide(plan, loaded.records, loaded.digests, existing)
    digests = loaded.digests
    array = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(32), len(digests), [None, pa.py_buffer(np.ascontiguousarray(digests))]
    )
    decisions = decide_columns(plan, loaded.columns, array, existing)
    release_memory()
    return plan, decisions

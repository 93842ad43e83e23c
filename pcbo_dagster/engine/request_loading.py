"""From request bytes to a plan and its decisions: the evaluation shared by every command.

Inline records (`sourceRecords`) are held in memory. A `source` (a JSONL, CSV or parquet file, a
directory of them, or a ledger archive) is streamed (`sources.streaming`): it is read once in
batches, each record's decision state goes to a decision spill on local disk
(`engine.decision_spill`), and the records a run writes are read again by their locators, a
partition at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pcbo_dagster.core.canonical import CanonicalizationError, record_digest_bytes, sorted_digest_rows
from pcbo_dagster.core.decisions import Decisions, PartitionDecision, decide, known_columns
from pcbo_dagster.core.errors import InvalidInput, SourceChanged
from pcbo_dagster.core.memory import release_memory
from pcbo_dagster.core.plan import Plan, build_plan
from pcbo_dagster.core.record_table import DEFAULT_MAX_RECORD_FIELDS, AddedColumns, FieldNames, SchemaBuilder
from pcbo_dagster.core.request_model import BackfillRequest, ParsedJson, parse_json_strict, validate_request
from pcbo_dagster.engine.decision_spill import DecisionSpill, SpilledPartitions
from pcbo_dagster.io.env_vars import positive_int
from pcbo_dagster.sources.local_files import SourcesDirectory
from pcbo_dagster.sources.record_files import resolve_uri
from pcbo_dagster.sources.streaming import RecordSource, open_source, source_batch_size
from pcbo_dagster.sources.zones import Window, ZoneIndexStore


@dataclass
class LoadedRequest:
    request: BackfillRequest
    #: The records, in memory (inline records, ledger archives); None for a streamed source.
    records: list[Any] | None
    #: The raw SHA-256 digests of JCS(record) of `records`, 32 bytes each, concatenated; None for a
    #: streamed source (its spill holds them).
    digests: bytes | None
    source_uri: str
    source_kind: str
    #: A streamed source, and the decision spill pass 1 filled.
    source: RecordSource | None = None
    spill: DecisionSpill | None = None
    #: Records in memory: the extra columns of the added records, built once by `schema_of`.
    _added: AddedColumns | None = field(default=None, init=False, repr=False)

    @property
    def record_count(self) -> int:
        return self.spill.count if self.spill is not None else len(self.digests or b"") // 32

    def plan(self) -> Plan:
        """The request's plan (its hash over every record's digest)."""
        if self.spill is not None:
            return build_plan(self.request, self.spill.sorted_digests())
        assert self.digests is not None
        return build_plan(self.request, iter([sorted_digest_rows(self.digests)]))

    def close(self) -> None:
        """Remove the decision spill and release the source (a process that serves many requests
        calls it when done with one; a command's process may leave it to exit)."""
        if self.spill is not None:
            self.spill.close()
        close_source = getattr(self.source, "close", None)
        if close_source is not None:
            close_source()

    def fetch(self, locators: np.ndarray | list[int]) -> list[Any]:
        """The records at `locators` (`PartitionDecision.add_locators`: input positions for records in
        memory, else the streamed source's locators), in that order. A streamed source that can no
        longer be read there (`_read_again`) is `SourceChanged`."""
        if self.source is None:
            assert self.records is not None
            return list(map(self.records.__getitem__, np.asarray(locators, dtype=np.int64).tolist()))
        with _read_again():
            return self.source.fetch(np.asarray(locators, dtype=np.int64))

    def fetch_chunks(self, locators: np.ndarray, size: int) -> Iterator[list[Any]]:
        """`fetch(locators)`, `size` records at a time."""
        locators = np.asarray(locators, dtype=np.int64)
        if self.source is not None:
            with _read_again():
                yield from self.source.fetch_chunks(locators, size)
            return
        added = self._added
        for lo in range(0, len(locators), size):
            chunk = locators[lo : lo + size]
            rows = self.fetch(chunk)
            yield rows if added is None else added.rows_for(rows, chunk)

    def field_of(self, column: str, partitions: Iterable[PartitionDecision]) -> str:
        """The request field a column of the run's schema comes from, for a message: the first record
        `partitions` add that holds it (`sourceRecords[i].<column>`), or the source's column
        (`source.<column>`)."""
        if self.records is not None:
            for pd in partitions:
                for locator in np.asarray(pd.add_locators, dtype=np.int64).tolist():
                    record = self.records[locator]
                    if isinstance(record, dict) and column in record:
                        return f"sourceRecords[{locator}].{column}"
        return f"source.{column}"

    def schema_of(self, partitions: Iterable[PartitionDecision]) -> tuple[pa.Schema, dict[str, bool]]:
        """`run_schema` of the records `partitions` add (read a partition and a batch at a time for a
        streamed source)."""
        if self.source is None:
            assert self.records is not None
            # In memory: each added record's extra fields are pulled out once, into the columns that
            # `fetch_chunks` hands to `build_table` (slices of them), and the schema comes from them.
            parts = [np.asarray(pd.add_locators, dtype=np.int64) for pd in partitions]
            locators = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            self._added = AddedColumns(self.fetch(locators), locators, len(self.records))
            return self._added.schema, self._added.as_json
        spill = self.spill
        if isinstance(partitions, SpilledPartitions) and partitions.spill is spill and spill.schema_exact:
            return spill.schema.result()  # every partition of the request: seen in pass 1
        builder = SchemaBuilder()
        for pd in partitions:
            for rows in self.fetch_chunks(pd.add_locators, source_batch_size()):
                builder.add(rows)
        return builder.result()


@contextmanager
def _read_again() -> Iterator[None]:
    """A streamed source read again by the locators pass 1 gave: every one of them was a record then,
    so one that is no longer readable (a file cut short, rewritten with other offsets or row groups,
    removed) is the source having changed during the run, not bad input: `SourceChanged` (exit 1, the
    run stopped and recorded as failed), never `InvalidInput` (whose exit 2 says nothing was written,
    though partitions before it may have been committed)."""
    try:
        yield
    except InvalidInput as exc:
        raise SourceChanged(
            f"the source cannot be read again where pass 1 read its records ({exc}): the source "
            "changed during the run; nothing was committed from this partition on"
        ) from None


def _digest_error(
    field: str,
    exc: CanonicalizationError,
    source: RecordSource | None = None,
    locators: np.ndarray | None = None,
    first: int = 0,
) -> InvalidInput:
    """`field[i]` (i: the record's position in the request or source) and why; for a streamed
    source (its batch's `locators`, the batch's first position `first`), where the record lies too
    (a position counted over every file of a directory is no help)."""
    index, reason = exc.args[0], exc.args[1] if len(exc.args) > 1 else str(exc)
    place = ""
    if source is not None and locators is not None and 0 <= index - first < len(locators):
        place = f" ({source.where(int(locators[index - first]))})"
    return InvalidInput(f"{field}[{index}]", f"not representable as RFC 8785 JSON: {reason}{place}")


def max_record_fields() -> int:
    """How many fields the records of a request may name between them (`PCBO_MAX_RECORD_FIELDS`)."""
    return positive_int(
        "PCBO_MAX_RECORD_FIELDS", os.environ.get("PCBO_MAX_RECORD_FIELDS"), DEFAULT_MAX_RECORD_FIELDS
    )


def _load_streamed(request: BackfillRequest, source: RecordSource) -> LoadedRequest:
    """Pass 1 over a record file: each batch's digests and decision state into a decision spill."""
    ledger_field = request.ledgerRange.field if request.ledgerRange is not None else None
    spill = DecisionSpill(build_plan(request, []), list(request.existingTargetIds))
    fields = FieldNames("source", max_record_fields())
    try:
        first = 0
        error: InvalidInput | None = None
        for records, risky, locators in source.batches(source_batch_size()):
            fields.add(records)
            if error is None:  # the first record RFC 8785 cannot express, once every line has parsed
                try:
                    digests = record_digest_bytes(records, risky, first)
                    spill.add_batch(records, digests, locators, known_columns(records, ledger_field))
                except CanonicalizationError as exc:
                    error = _digest_error("source", exc, source, locators, first)
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


def _record_source(
    request: BackfillRequest,
    uri: str,
    zone_indexes: ZoneIndexStore | None,
    confine_to: SourcesDirectory | None = None,
) -> RecordSource:
    """The streamed source a request names: a ledger archive, a record file, or a directory of them
    (unless `source.prune` is false: a directory's files pruned by their hive paths, and every file
    read only in the zones that may hold records of the request's window, `sources/zones.py`)."""
    # Imported here: inline requests (most runs) need neither (issue 18: start-up time).
    from pcbo_dagster.sources.hive_directories import is_directory, open_directory_source
    from pcbo_dagster.sources.ledger_archives import LedgerArchiveSource

    ref = request.source
    assert ref is not None
    if ref.format == "ledger_archive":
        span = request.ledgerRange
        assert span is not None  # validate_request refuses an archive without a ledger range
        trusted = ref.trustedLedger
        return LedgerArchiveSource(
            uri,
            ref.uri,
            span.first,
            span.end,
            allow_gaps=ref.allowGaps,
            trusted=None if trusted is None else (trusted.sequence, trusted.hash),
        )
    _record_file_scheme(uri, "pcbo")
    if is_directory(uri, ref.uri):
        window = None if request.ledgerRange is not None else (request.start_us, request.end_us)
        source = open_directory_source(uri, ref.uri, ref.format, window, ref.prune, confine_to)
    else:
        source = open_source(uri, ref.uri, ref.resolved_format())
    if ref.prune:
        source.prune_zones(placement_window(request), zone_indexes)
    return source


#: The object stores a record source may be read from (`lake.storage`: s3fs, gcsfs).
CONFINED_REMOTE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs"})


def _record_file_scheme(uri: str, reader: str) -> str | None:
    """The scheme of a record source's `uri` (None: a local path or `file://`), when it is one a
    record source may be read from: a local path, `file://`, or an object store
    (`CONFINED_REMOTE_SCHEMES`); otherwise `InvalidInput` on `source.uri` (`reader`: who refuses, for
    the message): no `http://`, `memory://`, `local://` or chained `a::b` URL (fsspec would fetch the
    URL from this host, or write a `simplecache::` copy to disk during a dry-run). Ledger archives
    (`sources/ledger_archives.py`) are read from any fsspec URL and do not come here."""
    from fsspec.core import split_protocol

    if "::" in uri:  # fsspec chains file systems on `::` (simplecache::file://...)
        raise InvalidInput("source.uri", f"a chained URL (::) is not read by {reader}")
    scheme, _ = split_protocol(uri)  # what fsspec opens it with (None: a local path)
    if scheme is None or scheme == "file":
        return None
    if scheme in CONFINED_REMOTE_SCHEMES:
        return scheme
    where = "its sources directory" if reader == "the server" else "a local path or file://"
    raise InvalidInput(
        "source.uri", f"{reader} reads sources from s3:// or gs:// or {where}, not a {scheme}: URL"
    )


def _confined(uri: str, sources: SourcesDirectory) -> str:
    """`uri` when it is an object store URL (`CONFINED_REMOTE_SCHEMES`) or a local path (or
    `file://`) inside the sources directory, in none of its hidden paths nor pcbo's own stores there;
    otherwise `InvalidInput` on `source.uri`: a server reads no file of its host and fetches no URL
    that a request names (no `local://`, `http://`, chained `a::b` URL, ...). Judged before anything is
    opened (the catalog's SQLite file opened and closed would lose its locks: `local_files.py`)."""
    from fsspec.core import split_protocol

    if _record_file_scheme(uri, "the server") is not None:
        return uri
    _, local = split_protocol(uri)
    from pcbo_dagster.sources.local_files import OUTSIDE, STORE, place_in_sources

    real = os.path.realpath(local)
    try:
        status: os.stat_result | None = os.stat(real)  # a stat, never an open
    except OSError:
        status = None
    place = place_in_sources(real, sources, status)
    if place == OUTSIDE:
        raise InvalidInput(
            "source.uri",
            "a local source must be inside the server's sources directory (a path relative to it)",
        )
    if place == STORE:  # the lake, the audit backup, the catalog, ... (`Settings.own_paths`)
        raise InvalidInput(
            "source.uri",
            "the server's own stores (its lake, audit backup and catalog) are not read as a source",
        )
    if place is not None:  # hidden: where keys are kept (`$PCBO_HOME/.keys`, the default directory)
        raise InvalidInput("source.uri", "a hidden path of the sources directory is not read as a source")
    return uri


@dataclass(frozen=True)
class ValidatedRequest:
    """A request's bytes parsed (strict JSON) and validated, before any record is read: what a caller
    that must look at the request first (the HTTP API: its dataset, its size) passes on to
    `load_request` so the bytes are not parsed twice."""

    parsed: ParsedJson
    request: BackfillRequest


def validate_request_bytes(raw: bytes) -> ValidatedRequest:
    """Parse and validate request bytes; `InvalidInput` naming the field."""
    parsed = parse_json_strict(raw)
    return ValidatedRequest(parsed, validate_request(parsed.value))


def load_request(
    raw: bytes | ValidatedRequest,
    base_dir: Path | None = None,
    confine_to: SourcesDirectory | None = None,
    zone_indexes: ZoneIndexStore | None = None,
) -> LoadedRequest:
    """Parse, validate and read the records of a request; `InvalidInput` on any bad input.
    `base_dir`: where a relative `source.uri` resolves; `confine_to`: a local source must be inside
    this directory and in none of pcbo's stores there (the HTTP API's sources directory; a remote one
    must be on an object store), and a SQL target or a `table.catalog` (any database or file the
    server can reach) is refused.
    `zone_indexes` keeps the zone indexes of streamed sources between runs (the catalog): the records
    read are the same without it, which only makes a range run read its whole source once."""
    validated = raw if isinstance(raw, ValidatedRequest) else validate_request_bytes(raw)
    parsed, request = validated.parsed, validated.request
    if request.target is not None and confine_to is not None:
        raise InvalidInput(
            "target",
            "a SQL table target runs with pcbo execute or as its dataset's asset, not through the API",
        )
    if request.table is not None and request.table.catalog is not None and confine_to is not None:
        raise InvalidInput(
            "table.catalog",
            "the server publishes to its own Iceberg catalog (PCBO_ICEBERG_CATALOG_URL): leave catalog out",
        )
    if request.target is not None:  # issue 15: a relative SQLite target resolves like a relative source
        request = request.model_copy(update={"target": request.target.resolved(base_dir)})
    if request.source is not None:
        uri = resolve_uri(request.source.uri, base_dir)
        source = _record_source(
            request, _confined(uri, confine_to) if confine_to is not None else uri, zone_indexes, confine_to
        )
        if confine_to is not None:  # every local file it reads, links followed, inside the directory too
            source.confine(confine_to)
        return _load_streamed(request, source)
    records = request.sourceRecords or []
    FieldNames("sourceRecords", max_record_fields()).add(records)
    try:
        digests = record_digest_bytes(records, parsed.may_hold_floats_or_big_ints)
    except CanonicalizationError as exc:
        raise _digest_error("sourceRecords", exc) from None
    return LoadedRequest(request, records, digests, "inline", "inline")


def evaluate(loaded: LoadedRequest, chain: Any = None) -> tuple[Plan, Decisions]:
    """The plan and decisions of a request; `chain` (`sql_apply.ChainReader`): how to read the
    deployment's own audit chain, for a SQL target's journal (`sql_apply.evaluate_target`)."""
    plan = loaded.plan()
    if loaded.spill is not None:
        decisions = loaded.spill.decisions(plan)
        release_memory()
    else:
        assert loaded.records is not None and loaded.digests is not None
        decisions = decide(plan, loaded.records, loaded.digests, list(loaded.request.existingTargetIds))
    if loaded.request.target is not None:  # issue 15: a SQL table target adds each record's outcome
        from pcbo_dagster.engine.sql_apply import evaluate_target

        decisions = evaluate_target(loaded, plan, decisions, chain=chain)
    if loaded.source is not None:
        decisions.source_files = loaded.source.file_report()
    return plan, decisions

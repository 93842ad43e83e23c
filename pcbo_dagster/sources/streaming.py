"""Record files read in batches, so that memory stays bounded whatever the source size.

A `RecordSource` (JSONL, CSV or parquet; local, `file://`, `s3://` or `gs://`) is read once in
batches of `source_batch_size()` records (`PCBO_SOURCE_BATCH`, default 8,192) by `load_request`,
which hands each batch's decision state to the decision spill (`engine.decision_spill`) and keeps
nothing of it. Each batch comes with its records' locators (a byte offset for JSONL and CSV, a row
position for parquet), which the spill keeps on disk; records are read again by locator: `fetch`
(the adds of a partition being written, and of every partition once for the run's schema). The
records are exactly those of the whole file read at once (the same values in the same order; the
tests hold them to a whole-file reader and to the equivalent inline request), so plans, decisions
and written files are the same. Parquet is
re-read a row group at a time: row groups of up to `PARQUET_CACHE_BYTES` (64 MiB uncompressed) are
kept decoded, least recently used first let go of, within that budget for the whole process.

`prune_zones(window, store)` (a request with `source.prune`, opt-in) makes pass 1 read only the
zones of the file that may hold records of the request's window (`sources/zones.py`): JSONL and CSV
seek to them by byte offset, parquet reads only their row groups.
"""

from __future__ import annotations

import array
import csv
import itertools
import os
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import IO, Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.request_model import parse_json_strict
from pcbo_dagster.io.env_vars import positive_int
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.io.regular_files import NotRegularFile
from pcbo_dagster.lake.storage import filesystem
from pcbo_dagster.sources.local_files import OutsideSources, SourcesDirectory, open_source_file
from pcbo_dagster.sources.parquet_pages import (
    NOT_AS_DICTIONARY,
    HeldBytes,
    RowGroupPages,
    column_metadata_refusal,
    decoding_held_bytes,
    row_group_pages,
)
from pcbo_dagster.sources.record_files import (
    csv_integer_columns,
    csv_record,
    is_safe_integer,
    jsonable_row,
    source_read_errors,
)
from pcbo_dagster.sources.zones import (
    ZONE_BYTES,
    Window,
    Zone,
    ZoneIndex,
    ZoneIndexStore,
    ZoneStats,
    bounds_of_instants,
    index_key,
    ranges,
    selected,
    source_identity,
)

DEFAULT_BATCH = 8_192
#: Decoded parquet row groups kept for re-reads (bytes of Arrow data).
PARQUET_CACHE_BYTES = 64 << 20
_BLOCK = 1 << 22  # bytes read at a time from a text source
_BOM = b"\xef\xbb\xbf"


def source_batch_size() -> int:
    """Records a batch (`PCBO_SOURCE_BATCH`, default 8,192)."""
    return positive_int("PCBO_SOURCE_BATCH", os.environ.get("PCBO_SOURCE_BATCH"), DEFAULT_BATCH)


#: The longest line a JSONL or CSV source may hold (`PCBO_MAX_LINE_BYTES`, default 64 MiB): a
#: longer one (or a source with no line end at all, like /dev/zero) is invalid input, found after
#: reading at most this much of it.
DEFAULT_MAX_LINE_BYTES = 64 << 20


def max_line_bytes() -> int:
    return positive_int("PCBO_MAX_LINE_BYTES", os.environ.get("PCBO_MAX_LINE_BYTES"), DEFAULT_MAX_LINE_BYTES)


def parquet_batch_bytes() -> int:
    """Bytes Arrow may decode for one batch of a parquet source, as its pages declare them
    (`sources/parquet_pages.py`): four times what a record may hold (`PCBO_MAX_LINE_BYTES`, so
    256 MiB by default), so that a row as large as a record may be is read (its page compressed and
    decompressed, and its values decoded and built into a batch)."""
    return 4 * max_line_bytes()


def _csv_reader(lines: Iterator[str]) -> Any:
    """A strict `csv.reader`; a cell may be as long as a line may (`max_line_bytes`), not only the
    csv module's default 131,072 characters."""
    if csv.field_size_limit() < max_line_bytes():
        csv.field_size_limit(max_line_bytes())
    return csv.reader(lines, strict=True)


@contextmanager
def _opened(uri: str, shown: str, root: SourcesDirectory | None = None) -> Iterator[IO[bytes]]:
    """The source file at `uri` open for reading; a local one only a regular file (a FIFO, a device or
    a directory would never end or block forever: not a record file) and, with `root` (a server's
    sources directory), only inside it (`sources/local_files.py`)."""
    with source_read_errors(shown):
        fs, path = filesystem(uri)
        if isinstance(fs, LocalFileSystem):
            try:
                fh: IO[bytes] = open_source_file(path, root)
            except NotRegularFile:
                raise InvalidInput("source.uri", f"{redact_url(shown)} is not a regular file") from None
            except OutsideSources as exc:
                raise InvalidInput("source.uri", f"{redact_url(shown)} {exc.reason}") from None
        else:
            fh = fs.open(path, "rb")
    with fh:
        yield fh


def _lines(fh: IO[bytes], offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line with its ending) from the file's current position (at `offset`), lines
    split as `bytes.splitlines` splits them (at \\n, \\r and \\r\\n)."""
    rest = b""
    limit = max_line_bytes()
    while True:
        block = fh.read(_BLOCK)
        if not block:
            break
        block = rest + block if rest else block
        # after the last line end: an LF, or a lone CR (one at the block's end may be a CRLF's first half)
        cut = max(block.rfind(b"\n"), block.rfind(b"\r", 0, len(block) - 1))
        if cut < 0:
            if len(block) > limit:
                _line_too_long(offset, limit)
            rest = block
            continue
        head, rest = block[: cut + 1], block[cut + 1 :]
        for part in head.splitlines(keepends=True):
            if len(part) > limit:
                _line_too_long(offset, limit)
            yield offset, part
            offset += len(part)
    for part in rest.splitlines(keepends=True):
        if len(part) > limit:
            _line_too_long(offset, limit)
        yield offset, part
        offset += len(part)


def _line_at(fh: IO[bytes], offset: int) -> bytes:
    """The line starting at the file's current position (`offset`), without its ending. Read in small
    pieces, not with `readline(size)`: fsspec's remote files (S3, GCS) take no size there."""
    limit = max_line_bytes()
    pieces: list[bytes] = []
    size = 0
    while True:
        piece = fh.read(_LINE_PIECE)
        if not piece:
            break
        ends = [i for i in (piece.find(b"\n"), piece.find(b"\r")) if i >= 0]
        if ends:
            pieces.append(piece[: min(ends)])
            size += min(ends)
            break
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            break
    if size > limit:
        _line_too_long(offset, limit)
    return b"".join(pieces)


_LINE_PIECE = 16 << 10


def _line_too_long(offset: int, limit: int) -> None:
    raise InvalidInput(
        "source", f"the line at byte {offset} is longer than {limit} bytes (PCBO_MAX_LINE_BYTES)"
    )


class RecordSource:
    """A record file read in batches; `count` once `batches` has gone through it.

    Each batch comes with its records' locators (int64, one a record): what `fetch` takes to read
    them again (a byte offset for JSONL and CSV, a row position for parquet). The source keeps none
    of them: whoever wants records again keeps their locators (the decision spill does)."""

    kind = ""

    def __init__(self, uri: str, shown: str) -> None:
        self.uri = uri
        self.shown = shown
        self.count = 0
        #: A server's sources directory: every local file read must lie inside it (`confine`).
        self.root: SourcesDirectory | None = None
        #: With `prune_zones`: the window, where zone indexes are kept, and the zones found.
        self.window: Window | None = None
        self.zone_store: ZoneIndexStore | None = None
        self.zones: list[Zone] | None = None
        #: The bytes of values the batch `batches` last yielded holds (its lines as read, or its
        #: parquet values): what a directory joining its files' batches counts.
        self.held_bytes = 0

    def confine(self, root: SourcesDirectory) -> None:
        """Read local files only inside `root` (a server's sources directory, none of pcbo's own
        stores in it), links included."""
        self.root = root

    def prune_zones(self, window: Window | None, store: ZoneIndexStore | None = None) -> None:
        """Read only the zones that may hold records of `window` (None: every record)."""
        self.window, self.zone_store = window, store

    def file_report(self) -> dict[str, Any] | None:
        """Which files of a directory source were read and which not (`DirectorySource`); None for
        one file."""
        return None

    def zone_report(self) -> dict[str, int]:
        """How many zones the file has and how many were read (after `batches`)."""
        if self.zones is None or self.window is None:
            return {"zones": 0, "read": 0}
        window = self.window
        return {"zones": len(self.zones), "read": sum(z.may_hold(window) for z in self.zones)}

    def _index_key(self) -> str | None:
        """The key of this file's zone index, when it has an identity (`zones.source_identity`)."""
        if self.window is None:
            return None
        with source_read_errors(self.shown):
            fs, path = filesystem(self.uri)
        identity = source_identity(fs, path)
        return None if identity is None else index_key(self.uri, identity, self.kind, self.window)

    def _stored_index(self) -> tuple[str | None, ZoneIndex | None]:
        key = self._index_key()
        if key is None or self.zone_store is None:
            return key, None
        data = self.zone_store.zone_index(key)
        return key, None if data is None else ZoneIndex.decode(data)

    def _save_index(self, key: str | None, index: ZoneIndex) -> None:
        self.zones = index.zones
        if key is not None and self.zone_store is not None:
            self.zone_store.save_zone_index(key, index.encode())

    def batches(self, size: int) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        """(records, may_hold_floats_or_big_ints, locators) of each batch, in order (pass 1)."""
        raise NotImplementedError

    def fetch(self, locators: np.ndarray) -> list[Any]:
        """The records at `locators` (from `batches`), in that order."""
        raise NotImplementedError

    def where(self, locator: int) -> str:
        """Where the record at `locator` lies, for a message naming it (`events/b.jsonl, the line at
        byte 145`): a line's byte offset in a JSONL or CSV file, a parquet file's row."""
        return f"{redact_url(self.shown)}, the line at byte {locator}"

    def fetch_chunks(self, locators: np.ndarray, size: int) -> Iterator[list[Any]]:
        """`fetch(locators)`, `size` records at a time."""
        for lo in range(0, len(locators), size):
            yield self.fetch(locators[lo : lo + size])


class JsonlSource(RecordSource):
    kind = "jsonl"

    def batches(self, size: int) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        if self.window is None:
            yield from self._all_batches(size)
            return
        key, index = self._stored_index()
        if index is None:
            yield from self._batches_building_index(size, key)
            return
        self.zones = index.zones
        yield from self._batches_in(ranges(selected(index.zones, self.window)), size)

    def _all_batches(self, size: int) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        batch = _Batcher(size, self)
        with _opened(self.uri, self.shown, self.root) as fh:
            for number, (offset, line) in enumerate(_lines(fh), start=1):
                if not line.strip():
                    continue
                parsed = parse_json_strict(line.rstrip(b"\r\n"), what=f"source line {number}")
                yield from batch.add(parsed.value, parsed.may_hold_floats_or_big_ints, offset, len(line))
        yield from batch.finish()
        self.count = batch.count

    def _batches_in(
        self, spans: list[tuple[int, int, int]], size: int
    ) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        """The records of the byte spans [start, end) (each beginning at a line, numbered from its
        first line's number), in batches."""
        batch = _Batcher(size, self)
        with _opened(self.uri, self.shown, self.root) as fh:
            for start, end, first_line in spans:
                fh.seek(start)
                for number, (offset, line) in enumerate(_lines(fh, start), start=first_line):
                    if offset >= end:
                        break
                    if not line.strip():
                        continue
                    parsed = parse_json_strict(line.rstrip(b"\r\n"), what=f"source line {number}")
                    yield from batch.add(parsed.value, parsed.may_hold_floats_or_big_ints, offset, len(line))
        yield from batch.finish()
        self.count = batch.count

    def _batches_building_index(
        self, size: int, key: str | None
    ) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        """Read the whole file once, cutting it into zones; yield the records of each zone that may
        hold the window once the zone is complete; then keep the index."""
        window = self.window
        assert window is not None
        batch = _Batcher(size, self)
        zones: list[Zone] = []
        held: list[tuple[Any, bool, int, int]] = []
        stats = ZoneStats(window.ledger)
        zone_start, zone_line, end, number = 0, 1, 0, 0

        def close() -> Iterator[tuple[list[Any], bool, np.ndarray]]:
            zone = Zone(zone_start, end, *stats.bounds(), line=zone_line)
            zones.append(zone)
            if zone.may_hold(window):
                for record, risky, offset, length in held:
                    yield from batch.add(record, risky, offset, length)

        with _opened(self.uri, self.shown, self.root) as fh:
            for number, (offset, line) in enumerate(_lines(fh), start=1):  # noqa: B007 - used after
                end = offset + len(line)
                if line.strip():
                    parsed = parse_json_strict(line.rstrip(b"\r\n"), what=f"source line {number}")
                    held.append((parsed.value, parsed.may_hold_floats_or_big_ints, offset, len(line)))
                    stats.add_record(parsed.value, window.field)
                if end - zone_start >= ZONE_BYTES:
                    yield from close()
                    held, stats = [], ZoneStats(window.ledger)
                    zone_start, zone_line = end, number + 1
        if end > zone_start:
            yield from close()
        yield from batch.finish()
        self.count = batch.count
        self._save_index(key, ZoneIndex(zones))

    def fetch(self, locators: np.ndarray) -> list[Any]:
        offsets = np.asarray(locators, dtype=np.int64)
        order = np.argsort(offsets, kind="stable")
        out: list[Any] = [None] * len(offsets)
        with _opened(self.uri, self.shown, self.root) as fh:
            for k, offset in zip(order.tolist(), offsets[order].tolist(), strict=True):
                fh.seek(offset)
                line = _line_at(fh, offset)
                out[k] = parse_json_strict(line, what="source line").value
        return out


class _Batcher:
    """Records gathered into batches of `size`, or fewer once they hold `python_batch_bytes()` (their
    lines' bytes as read), with their locators and whether any may hold a float or a big integer;
    each batch's bytes noted in `source.held_bytes` as it is yielded."""

    def __init__(self, size: int, source: RecordSource) -> None:
        self.size = size
        self.source = source
        self.count = 0
        self._records: list[Any] = []
        self._locators = array.array("q")
        self._risky = False
        self._held = 0
        self._budget = python_batch_bytes()

    def add(
        self, record: Any, risky: bool, locator: int, length: int
    ) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        self._records.append(record)
        self._locators.append(locator)
        self._risky = self._risky or risky
        self._held += length
        if len(self._records) >= self.size or self._held >= self._budget:
            yield from self.finish()

    def finish(self) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        if self._records:
            self.count += len(self._records)
            self.source.held_bytes = self._held
            yield self._records, self._risky, np.array(self._locators, dtype=np.int64)
            self._records, self._locators, self._risky, self._held = [], array.array("q"), False, 0


class CsvSource(RecordSource):
    kind = "csv"

    def __init__(self, uri: str, shown: str) -> None:
        super().__init__(uri, shown)
        self.header: list[str] | None = None
        self.integer_columns: set[str] = set()
        #: With zones: the byte spans to read (start, end, first line), set by `integer_cells`.
        self._spans: list[tuple[int, int, int]] | None = None

    def _text_lines(self, fh: IO[bytes], offset: int, starts: list[int]) -> Iterator[str]:
        """The lines from `offset` as text, each one's start appended to `starts` (the reader's
        consumer clears it at each row): a row (lines joined by quoted line ends) may hold at most
        `max_line_bytes()`, as a line may, found before the line past it is handed to the reader."""
        limit = max_line_bytes()
        for at, line in _lines(fh, offset):
            if starts and at + len(line) - starts[0] > limit:
                raise InvalidInput(
                    "source",
                    f"the CSV row at byte {starts[0]} is longer than {limit} bytes (PCBO_MAX_LINE_BYTES)",
                )
            skipped = 0
            if at == 0 and line.startswith(_BOM):
                skipped, line = len(_BOM), line[len(_BOM) :]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                # counted as in the text after the byte-order mark, as when the file is decoded whole
                position = at + skipped - (len(_BOM) if self._has_bom else 0) + exc.start
                raise InvalidInput("source.uri", f"CSV is not UTF-8 (byte {position})") from None
            starts.append(at)
            yield text

    _has_bom = False

    def _rows(self, fh: IO[bytes], span: tuple[int, int] | None = None) -> Iterator[tuple[int, list[str]]]:
        """(offset, row) of each data row; checks the header and the cell counts. With `span`
        (start, end): only the rows starting in [start, end), read from `start` (a row's start) with
        the header already known."""
        starts: list[int] = []
        start = 0 if span is None else span[0]
        if span is not None:
            fh.seek(start)
        lines = self._text_lines(fh, start, starts)
        reader = _csv_reader(lines)
        try:
            try:
                if span is None:
                    header = next(reader, None)
                    if header is None:
                        self.header = []
                        return
                    if any(not name for name in header):
                        raise InvalidInput("source", "CSV header row has an empty column name")
                    if len({same_name(name) for name in header}) != len(header):
                        raise InvalidInput(
                            "source",
                            "CSV header row names a column twice (names differing in case count as one)",
                        )
                    if self.header is not None and header != self.header:  # a later pass over the file
                        raise InvalidInput(
                            "source", "CSV header row changed while the file was read (it is read twice)"
                        )
                    self.header = header
                    starts.clear()
                header = self.header or []
                for row in reader:
                    at = starts[0]
                    starts.clear()
                    if span is not None and at >= span[1]:
                        return
                    if not row or (len(row) == 1 and row[0] == ""):
                        continue
                    if len(row) > len(header):
                        raise InvalidInput(
                            "source",
                            f"CSV line {reader.line_num}: {len(row)} cells, the header has {len(header)}",
                        )
                    yield at, row
            except csv.Error as exc:
                raise InvalidInput("source", f"CSV line {reader.line_num}: {exc}") from None
        except InvalidInput:
            for _ in lines:  # a file that is not UTF-8 is reported as such first, as when read whole
                pass
            raise

    def integer_cells(self) -> dict[int, bool]:
        """Sets `header` (`[]` for an empty file) and returns, per column index, whether every
        non-empty cell of it is a safe integer: over the whole file (one pass), or with zones over the
        zones that may hold the window (from the zone index, built by one pass when there is none)."""
        if self.window is not None:
            return self._zone_cells()
        cells: dict[int, bool] = {}
        with _opened(self.uri, self.shown, self.root) as fh:
            self._has_bom = fh.read(len(_BOM)) == _BOM
            fh.seek(0)
            for _, row in self._rows(fh):
                for i, cell in enumerate(row):
                    if cell != "" and cells.get(i, True):
                        cells[i] = is_safe_integer(cell)
        if self.header is None:
            self.header = []
        return cells

    def _zone_cells(self) -> dict[int, bool]:
        window = self.window
        assert window is not None
        key, index = self._stored_index()
        if index is None:
            index = self._build_zone_index(window)
            self._save_index(key, index)
        else:
            self.zones = index.zones
            with _opened(self.uri, self.shown, self.root) as fh:
                self._has_bom = fh.read(len(_BOM)) == _BOM
        self.header = list(index.header or [])
        chosen = selected(index.zones, window)
        self._spans = ranges(chosen)
        cells: dict[int, bool] = {}
        for zone in chosen:
            for i, flag in enumerate(zone.integers):
                if flag is not None:
                    cells[i] = cells.get(i, True) and flag
        return cells

    def _build_zone_index(self, window: Window) -> ZoneIndex:
        """One pass over the file: its zones (rows starting within about `ZONE_BYTES` of each other),
        each with its placement values and, per column, whether its cells are all integers."""
        zones: list[Zone] = []
        stats = ZoneStats(window.ledger)
        flags: dict[int, bool] = {}
        zone_start: int | None = None
        column: int | None = None

        def close(end: int) -> None:
            assert zone_start is not None
            width = len(self.header or [])
            integers = tuple(flags.get(i) for i in range(width))
            zones.append(Zone(zone_start, end, *stats.bounds(), integers=integers))

        with _opened(self.uri, self.shown, self.root) as fh:
            self._has_bom = fh.read(len(_BOM)) == _BOM
            fh.seek(0)
            for at, row in self._rows(fh):
                if zone_start is None:
                    header = self.header or []
                    column = header.index(window.field) if window.field in header else None
                    zone_start = at
                elif at - zone_start >= ZONE_BYTES:
                    close(at)
                    stats, flags, zone_start = ZoneStats(window.ledger), {}, at
                cell = row[column] if column is not None and column < len(row) else ""
                if window.ledger:
                    stats.add_value(int(cell) if is_safe_integer(cell) else None)
                else:
                    stats.add_value(cell if cell != "" else None)
                for i, text in enumerate(row):
                    if text != "" and flags.get(i, True):
                        flags[i] = is_safe_integer(text)
        if zone_start is not None:
            close(_TO_THE_END)
        return ZoneIndex(zones, list(self.header or []))

    def _prepare(self) -> None:
        """The header and the integer columns (a first pass: they depend on every row read)."""
        cells = self.integer_cells()
        self.integer_columns = csv_integer_columns(self.header or [], cells)

    def batches(self, size: int) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        self._prepare()
        header = self.header or []
        batch = _Batcher(size, self)
        with _opened(self.uri, self.shown, self.root) as fh:
            spans: list[tuple[int, int] | None] = (
                [None] if self._spans is None else [(start, end) for start, end, _ in self._spans]
            )
            for span in spans:
                for start, row in self._rows(fh, span):
                    record = csv_record(header, row, self.integer_columns)
                    yield from batch.add(record, False, start, sum(map(len, row)) + len(row))
        yield from batch.finish()
        self.count = batch.count

    def fetch(self, locators: np.ndarray) -> list[Any]:
        header = self.header or []
        out = []
        with _opened(self.uri, self.shown, self.root) as fh:
            for offset in np.asarray(locators, dtype=np.int64).tolist():
                fh.seek(offset)
                try:
                    row = next(_csv_reader(self._text_lines(fh, offset, [])), None)
                except csv.Error as exc:
                    raise InvalidInput("source", f"CSV row at byte {offset}: {exc}") from None
                if row is None or len(row) > len(header):
                    raise InvalidInput("source", f"CSV: no row of the header's cells at byte {offset}")
                out.append(csv_record(header, row, self.integer_columns))
        return out


#: The end of a file's last zone (its rows run to the end of the file).
_TO_THE_END = 1 << 62


class _DecodedGroups:
    """Decoded parquet row groups of every source in the process, least recently used let go of
    beyond `budget` bytes (a directory of many parquet files shares the one budget)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> pa.Table | None:
        with self._lock:
            table = self._groups.get(key)
            if table is not None:
                self._groups.move_to_end(key)
            return table

    def put(self, key: tuple[int, int], table: pa.Table) -> None:
        with self._lock:
            if key in self._groups:
                return
            self._groups[key] = table
            self._bytes += table.nbytes
            while self._bytes > self.budget and len(self._groups) > 1:
                _, dropped = self._groups.popitem(last=False)
                self._bytes -= dropped.nbytes

    @property
    def held(self) -> int:
        return self._bytes


_DECODED_GROUPS = _DecodedGroups(PARQUET_CACHE_BYTES)
_SERIALS = itertools.count()
_SAFE_INTEGER = 2**53 - 1


def _may_hold_floats_or_big_ints(batch: pa.RecordBatch | pa.Table) -> bool:
    """Whether a parquet batch's rows (as `jsonable_row` makes them) may hold a float or an integer
    beyond +-(2**53 - 1), which RFC 8785 hashing must take the careful way: a floating-point or a
    nested column may; an integer column only if its values reach that far."""
    for column in batch.columns:
        kind = column.type
        if pa.types.is_dictionary(kind) and _binary_like(kind.value_type):
            continue  # (text read as a dictionary: `_parquet_file`)
        if pa.types.is_floating(kind) or pa.types.is_nested(kind) or pa.types.is_dictionary(kind):
            return True
        if pa.types.is_integer(kind) and column.null_count < len(column):
            low, high = pc.min_max(column).values()
            if low.as_py() < -_SAFE_INTEGER or high.as_py() > _SAFE_INTEGER:
                return True
    return False


class ParquetSource(RecordSource):
    kind = "parquet"

    def where(self, locator: int) -> str:
        return f"{redact_url(self.shown)}, row {locator}"

    def __init__(self, uri: str, shown: str) -> None:
        super().__init__(uri, shown)
        self.group_starts = np.zeros(1, dtype=np.int64)  # first record of each row group, then the count
        self._serial = next(_SERIALS)  # this source's key in `_DECODED_GROUPS`
        self._schema: pa.Schema | None = None

    @contextmanager
    def _file(self) -> Iterator[_ParquetFile]:
        with _opened(self.uri, self.shown, self.root) as fh:
            yield _parquet_file(fh, self.shown)

    def _read_layout(self, pf: pq.ParquetFile) -> None:
        """The row groups' first rows and the schema, from the file's metadata. A column (or a field
        of a struct) named twice is invalid input: readers disagree on which one a record's value is
        (the last wins here, the first in DuckDB), as with a JSON key or a CSV column named twice."""
        rows = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64)
        twice = _named_twice(list(pf.schema_arrow))
        if twice is not None:
            raise InvalidInput(
                "source", f"{redact_url(self.shown)}: the parquet column {twice} is named twice"
            )
        for column in pf.schema_arrow:
            word = _json_cannot_hold(column.type)
            if word is not None:  # by its type, whatever its rows hold (all null, empty maps)
                raise InvalidInput(f"source.{column.name}", f"values of type {word} cannot be read as JSON")
        self._schema = pf.schema_arrow

    def _same_layout(self, pf: pq.ParquetFile) -> None:
        """The file opened again has the row groups and schema it had when it was read (a record's
        locator is its row position in them), else invalid input: it changed since."""
        rows = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64)
        if not np.array_equal(starts, self.group_starts) or pf.schema_arrow != self._schema:
            raise InvalidInput(
                "source.uri", f"{redact_url(self.shown)}: its row groups or columns changed since it was read"
            )

    def _records(self, rows: pa.RecordBatch | pa.Table) -> list[Any]:
        """`rows` as the JSON records they stand for, column by column: a value Python cannot hold (a
        year past 9999, invalid UTF-8 in a string column) is invalid input naming its column; a
        nanosecond timestamp is cut to its microsecond (as an instant's digits past the sixth are)."""
        names = rows.schema.names
        columns = []
        for name, column in zip(names, rows.columns, strict=True):
            try:
                if pa.types.is_timestamp(column.type) and column.type.unit == "ns":
                    column = _to_microseconds(column)
                columns.append(column.to_pylist())
            except (UnicodeDecodeError, OverflowError, ValueError, KeyError, pa.ArrowException) as exc:
                # (KeyError: a time zone the zone database does not know)
                raise InvalidInput(
                    f"source.{name}",
                    f"{redact_url(self.shown)}: a value of column {name} cannot be read "
                    f"({exc.__class__.__name__})",
                ) from None
        if not columns:
            return [{} for _ in range(rows.num_rows)]
        return [jsonable_row(dict(zip(names, values, strict=True))) for values in zip(*columns, strict=True)]

    def batches(self, size: int) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        with self._file() as pf:
            self._read_layout(pf)
            if self.window is not None:
                yield from self._zone_batches(pf, self.window, size)
                return
            self.count = int(self.group_starts[-1])
            yield from self._group_batches(pf, range(pf.num_row_groups), size)

    def _group_batches(
        self, pf: _ParquetFile, groups: Iterable[int], size: int
    ) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        """The records of row groups `groups`, in order, in batches of `size`: each row group decoded
        from the bytes its pages were read from (`_ParquetFile.decoded_batches`), in Arrow batches of
        as many rows as keep within `parquet_batch_bytes()` (`_ParquetFile.reader_for`). Batches of
        `size` rows are gathered across row groups (as Arrow's own batches of a file are) while the
        batches they come from may decode, together, no more than that budget, and while they are
        adjacent in the file (a zone read skips row groups; a batch's rows are numbered one after
        another); one of fewer rows is handed on alone, before the next is decoded."""
        budget = parquet_batch_bytes()
        pending: list[pa.RecordBatch] = []  # (pieces of `pending_rows` rows in all, at most `size`)
        pending_rows = pending_cost = 0  # (the cost: of the row groups they come from, each counted once)
        from_groups: set[int] = set()
        start = 0

        def handed_on() -> Iterator[tuple[list[Any], bool, np.ndarray]]:
            nonlocal pending, pending_rows, pending_cost, from_groups
            pieces, pending, pending_rows, pending_cost, from_groups = pending, [], 0, 0, set()
            return self._handed_on(pieces, start)

        for group in groups:
            reader, rows, cost = pf.reader_for(group, size, self.shown)
            if pending and (rows < size or pending_cost + cost > budget):
                yield from handed_on()
            first = int(self.group_starts[group])
            if pending and start + pending_rows != first:  # (a row group skipped)
                yield from handed_on()
            for batch in reader.decoded_batches(group, rows, self.shown):
                if rows < size:
                    yield from self._handed_on([batch], first)
                    first += batch.num_rows
                    continue
                if pending and pending[0].schema != batch.schema:  # (a group read dense: `reader_for`)
                    yield from handed_on()
                at = 0
                while at < batch.num_rows:
                    if not pending:
                        start = first + at
                    take = min(batch.num_rows - at, size - pending_rows)
                    pending.append(batch.slice(at, take))
                    pending_rows += take
                    if group not in from_groups:
                        from_groups.add(group)
                        pending_cost += cost
                    at += take
                    if pending_rows == size:
                        yield from handed_on()
                first += batch.num_rows
        if pending:
            yield from handed_on()

    def _handed_on(
        self, pieces: list[pa.RecordBatch], first: int
    ) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        """The records of `pieces` (rows one after another, the first at position `first`), in pieces
        whose values come to at most `PYTHON_BATCH_BYTES` (`_cuts`)."""
        rows = pieces[0] if len(pieces) == 1 else pa.Table.from_batches(pieces)
        risky = _may_hold_floats_or_big_ints(rows)
        for lo, hi, held in self._cuts(rows, first):
            self.held_bytes = held
            yield (
                self._records(rows.slice(lo, hi - lo)),
                risky,
                np.arange(first + lo, first + hi, dtype=np.int64),
            )

    def _zone_batches(
        self, pf: _ParquetFile, window: Window, size: int
    ) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        """The rows of the row groups that may hold the window, gathered into batches of `size`."""
        self.zones = self._row_group_zones(pf, window)
        count = 0
        chosen = [group for group, zone in enumerate(self.zones) if zone.may_hold(window)]
        for records, risky, positions in self._group_batches(pf, chosen, size):
            count += len(records)
            yield records, risky, positions
        self.count = count

    def _row_group_zones(self, pf: _ParquetFile, window: Window) -> list[Zone]:
        """One zone a row group: from the footer's statistics when the column's type allows, else from
        the zone index (kept in the store; built by reading that one column)."""
        footer = [_footer_bounds(pf, group, window) for group in range(pf.num_row_groups)]
        if all(bounds is not None for bounds in footer):
            return [
                Zone(int(self.group_starts[g]), int(self.group_starts[g + 1]), *bounds)  # type: ignore[misc]
                for g, bounds in enumerate(footer)
            ]
        key, index = self._stored_index()
        if index is not None and len(index.zones) == pf.num_row_groups:
            return index.zones
        zones = []
        for group in range(pf.num_row_groups):
            bounds = footer[group] or _column_bounds(pf, group, window, self.shown)
            zones.append(Zone(int(self.group_starts[group]), int(self.group_starts[group + 1]), *bounds))
        self._save_index(key, ZoneIndex(zones))
        return zones

    def _rows_of_group(self, pf: Callable[[], _ParquetFile], group: int, local: np.ndarray) -> pa.Table:
        """Rows `local` (positions in row group `group`, in that order). A group whose uncompressed
        size fits `PARQUET_CACHE_BYTES` (as its footer says, and as its pages say it decodes within
        `parquet_batch_bytes()`: the footer may lie) is decoded whole once and kept in the process's
        `_DECODED_GROUPS`, so partition after partition taking rows from one group neither decodes it
        again nor opens the file; a larger group is decoded a record batch at a time (within
        `parquet_batch_bytes()`), as far as needed, each time. `pf()` opens the file when needed."""
        key = (self._serial, group)
        table = _DECODED_GROUPS.get(key)
        if table is None:
            pages = pf().pages(group, self.shown)
            if (
                pf().metadata.row_group(group).total_byte_size > PARQUET_CACHE_BYTES
                or pages.batch_bytes(max(pages.rows, 1)) > parquet_batch_bytes()
            ):
                return self._rows_of_large_group(pf(), group, local)
            table = pf().decoded_group(group, self.shown)
            _DECODED_GROUPS.put(key, table)
        return table.take(pa.array(local))

    def _rows_of_large_group(self, pf: _ParquetFile, group: int, local: np.ndarray) -> pa.Table:
        """Rows `local` of row group `group`, decoded in batches within `parquet_batch_bytes()`, with
        the Arrow types of the file's other rows (a text column read dense as a dictionary again)."""
        reader, rows, _ = pf.reader_for(group, DEFAULT_BATCH, self.shown)
        pieces: list[pa.Table] = []
        where: list[np.ndarray] = []
        first, last = 0, int(local.max())
        for batch in reader.decoded_batches(group, rows, self.shown):
            hit = (local >= first) & (local < first + batch.num_rows)
            if hit.any():
                piece = pa.Table.from_batches([batch.take(pa.array(local[hit] - first))])
                pieces.append(piece if reader is pf else piece.cast(pf.schema_arrow))
                where.append(np.flatnonzero(hit))
            first += batch.num_rows
            if first > last:
                break
        table = pa.concat_tables(pieces)
        return table.take(pa.array(np.argsort(np.concatenate(where), kind="stable")))

    def _take(self, indices: np.ndarray) -> pa.Table:
        """The rows at `indices`, in that order, as Arrow (`_rows_of_group` of each row group hit)."""
        indices = np.asarray(indices, dtype=np.int64)
        pieces: list[pa.Table] = []
        where: list[np.ndarray] = []
        with ExitStack() as stack:
            opened: list[_ParquetFile] = []

            def pf() -> _ParquetFile:
                if not opened:
                    opened.append(stack.enter_context(self._file()))
                    if self._schema is not None:
                        self._same_layout(opened[0])
                return opened[0]

            if self._schema is None:  # a source that has not been read (`batches`) yet
                self._read_layout(pf())
            groups = np.searchsorted(self.group_starts, indices, side="right") - 1

            for group in np.unique(groups).tolist():
                positions = np.flatnonzero(groups == group)
                pieces.append(self._rows_of_group(pf, group, indices[positions] - self.group_starts[group]))
                where.append(positions)
            if not pieces:
                return (self._schema or pf().schema_arrow).empty_table()
        table = pa.concat_tables(pieces)
        order = np.argsort(np.concatenate(where), kind="stable")
        return table.take(pa.array(order))

    def fetch(self, indices: np.ndarray) -> list[Any]:
        return self._records(self._take(indices))

    def fetch_chunks(self, indices: np.ndarray, size: int) -> Iterator[list[Any]]:
        table = self._take(indices)
        for start in range(0, table.num_rows, size):
            rows = table.slice(start, size)
            for lo, hi, _ in self._cuts(rows, None):
                yield self._records(rows.slice(lo, hi - lo))

    def _cuts(self, rows: pa.RecordBatch | pa.Table, first: int | None) -> Iterator[tuple[int, int, int]]:
        """`rows` as [lo, hi) spans, with their bytes of values, that come to at most
        `PYTHON_BATCH_BYTES` as Python records
        (a span of one row at least); a row holding more than `PCBO_MAX_LINE_BYTES` of values (what a
        JSONL line may hold) is invalid input (`first`: its position in the file, when known). Arrow
        keeps a dictionary-encoded column as its dictionary (`_parquet_file`), so a file of a few
        kilobytes whose dictionary holds one large value for a million rows decodes to what it is
        here, and is refused or cut before it becomes a million large Python strings."""
        sizes = _row_bytes(rows)
        limit = max_line_bytes()
        if len(sizes) and int(sizes.max()) > limit:
            row = int(np.argmax(sizes > limit))
            where = f"row {first + row}" if first is not None else "a row"
            raise InvalidInput(
                "source",
                f"{redact_url(self.shown)}: {where} holds {int(sizes[row])} bytes of values, more than "
                f"a record may ({limit} bytes, PCBO_MAX_LINE_BYTES)",
            )
        lo, total = 0, 0
        for i, n in enumerate(sizes.tolist()):
            if total + n > PYTHON_BATCH_BYTES and i > lo:
                yield lo, i, total
                lo, total = i, 0
            total += n
        if lo < len(sizes) or not len(sizes):
            yield lo, len(sizes), total


def _floored_to_microseconds(nanoseconds: pa.Array) -> pa.Array:
    """A nanosecond timestamp array as microseconds, each value floored (never rounded towards the
    epoch) in int64 arithmetic, which cannot overflow."""
    raw = nanoseconds.cast(pa.int64())
    values = np.floor_divide(raw.fill_null(0).to_numpy(zero_copy_only=False), 1000)
    mask = raw.is_null().to_numpy(zero_copy_only=False) if raw.null_count else None
    return pa.array(values, pa.timestamp("us", nanoseconds.type.tz), mask=mask)


def _to_microseconds(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A nanosecond timestamp column cut to its microsecond as an instant's text is (digits past the
    sixth dropped: the instant floored, also before 1970, where Arrow's cast rounds towards the epoch
    and put 1969-12-31T23:59:59.9999995Z at 1970-01-01T00:00:00Z, inside a window that text leaves
    it out of)."""
    if isinstance(column, pa.ChunkedArray):
        kind = pa.timestamp("us", column.type.tz)
        return pa.chunked_array([_floored_to_microseconds(chunk) for chunk in column.chunks], kind)
    return _floored_to_microseconds(column)


#: Bytes of source values turned into Python records at once: a batch of any record file ends once
#: its records hold this much (JSONL and CSV lines as read, parquet values: `ParquetSource._cuts`),
#: whatever their count, and a directory joins its files' batches within it.
PYTHON_BATCH_BYTES = 64 << 20


def python_batch_bytes() -> int:
    """`PYTHON_BATCH_BYTES` (read when called)."""
    return PYTHON_BATCH_BYTES


_Rows = TypeVar("_Rows", pa.RecordBatch, pa.Table)


def _unreadable_group(shown: str, group: int, column: str | None, said: str) -> InvalidInput:
    """A row group that cannot be read as its file says (`said` why): invalid input naming `source`,
    the file (`shown`, redacted), the row group and, when known, the column."""
    where = f"row group {group}" + (f", column {column}" if column is not None else "")
    return InvalidInput("source", f"{redact_url(shown)}: {where}: not a readable parquet row group: {said}")


def _without_views(kind: pa.DataType) -> pa.DataType:
    """`kind` with its text and binary view types (string_view, binary_view, which pyarrow writes and
    reads back, and for which Arrow has no `take`: a record re-read by position) as the types they
    view."""
    if pa.types.is_string_view(kind):
        return pa.string()
    if pa.types.is_binary_view(kind):
        return pa.binary()
    if pa.types.is_dictionary(kind):
        return pa.dictionary(kind.index_type, _without_views(kind.value_type), kind.ordered)
    if pa.types.is_struct(kind):
        return pa.struct([_field_without_views(kind.field(i)) for i in range(kind.num_fields)])
    if pa.types.is_map(kind):
        return pa.map_(_field_without_views(kind.key_field), _field_without_views(kind.item_field))
    if pa.types.is_list(kind):
        return pa.list_(_field_without_views(kind.value_field))
    if pa.types.is_large_list(kind):
        return pa.large_list(_field_without_views(kind.value_field))
    if pa.types.is_list_view(kind):  # (Arrow takes rows of these; its cast of them to lists is invalid)
        return pa.list_view(_field_without_views(kind.value_field))
    if pa.types.is_large_list_view(kind):
        return pa.large_list_view(_field_without_views(kind.value_field))
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(_field_without_views(kind.value_field), kind.list_size)
    return kind


def _json_cannot_hold(kind: pa.DataType) -> str | None:
    """What a parquet column of type `kind` holds that no JSON record can (a time of day, a duration,
    a map, an interval; in a list, struct or dictionary too), as a word for a message, or None."""
    if pa.types.is_time(kind):
        return "time"
    if pa.types.is_duration(kind):
        return "duration"
    if pa.types.is_map(kind):
        return "map"
    if pa.types.is_interval(kind):
        return "interval"
    if pa.types.is_struct(kind):
        for i in range(kind.num_fields):
            word = _json_cannot_hold(kind.field(i).type)
            if word is not None:
                return word
        return None
    inner = getattr(kind, "value_type", None)  # lists of any kind, dictionaries
    return _json_cannot_hold(inner) if isinstance(inner, pa.DataType) else None


def _field_without_views(field: pa.Field) -> pa.Field:
    return field.with_type(_without_views(field.type))


def _binary_like(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    )


class _ParquetFile(pq.ParquetFile):
    """A parquet file open for reading (`_parquet_file`), with the top-level columns it reads as Arrow
    dictionaries, so that its row groups' pages can be read before Arrow decodes them (`pages`). Arrow
    reads it from `held`: only the bytes of the row group whose pages were read last, read into
    memory once (`parquet_pages.HeldBytes`), so that it decodes the bytes the pages' scan checked."""

    def __init__(self, held: HeldBytes, metadata: pq.FileMetaData, read_dictionary: list[str]) -> None:
        super().__init__(held, metadata=metadata, read_dictionary=read_dictionary or None)
        self.held = held
        read = super().schema_arrow
        self._schema_arrow = pa.schema(
            [f.with_type(_without_views(f.type)) for f in read], metadata=read.metadata
        )
        self._views = self._schema_arrow != read
        self._read_dictionary = frozenset(read_dictionary)
        # (those asked for, and those the file's Arrow schema says were written as dictionaries)
        self.dictionary_columns = frozenset(
            f.name for f in self.schema_arrow if pa.types.is_dictionary(f.type)
        )
        self._dense: dict[frozenset[str], _ParquetFile] = {}

    @property
    def schema_arrow(self) -> pa.Schema:
        """The Arrow schema of the rows it reads (`_viewed`): Arrow's, but text and binary view types as
        the types they view (`_without_views`)."""
        return self._schema_arrow

    def _viewed(self, rows: _Rows) -> _Rows:
        """`rows` Arrow decoded, their view types cast to the types they view (`schema_arrow`)."""
        if not self._views:
            return rows
        return rows.cast(pa.schema([self._schema_arrow.field(name) for name in rows.schema.names]))

    def pages(self, group: int, shown: str, columns: list[str] | None = None) -> RowGroupPages:
        """What row group `group`'s pages (of `columns`, or all) declare they decode to, its column chunks
        read into memory (`held`) for Arrow to decode next (`decoded_batches`, `decoded_group`)."""
        return row_group_pages(
            self.held, self, group, shown, self.dictionary_columns, parquet_batch_bytes(), columns
        )

    def decoded_batches(
        self, group: int, rows: int, shown: str, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Row group `group` (its top-level `columns`, or all) decoded in batches of `rows` rows, from
        the bytes its pages were read from (`pages`, called first); all of them: as many rows as its
        footer says (`_all_rows`)."""
        batches = self.iter_batches(batch_size=rows, row_groups=[group], columns=columns, use_threads=False)
        decoded = 0
        while True:
            with self._decoding(group, rows, shown, columns):
                batch = next(batches, None)
            if batch is None:
                self._all_rows(group, decoded, shown)
                return
            decoded += batch.num_rows
            self._indices_within_dictionaries(batch, group, shown)
            yield self._viewed(batch)

    def decoded_group(self, group: int, shown: str, columns: list[str] | None = None) -> pa.Table:
        """Row group `group` (its top-level `columns`, or all) decoded whole, from the bytes its pages
        were read from (`pages`, called first): as many rows as its footer says (`_all_rows`)."""
        with self._decoding(group, self.metadata.row_group(group).num_rows, shown, columns):
            table = self.read_row_group(group, columns=columns, use_threads=False)
        self._all_rows(group, table.num_rows, shown)
        self._indices_within_dictionaries(table, group, shown)
        return self._viewed(table)

    @staticmethod
    def _indices_within_dictionaries(rows: pa.RecordBatch | pa.Table, group: int, shown: str) -> None:
        """Each column of `rows` read as an Arrow dictionary (`dictionary_columns`) has its indices within
        its dictionary, else invalid input naming `source`, the row group and the column: Arrow does
        not check them so (read as text, it refuses them), and a data page's indices past its
        dictionary page's values made an invalid array."""
        for name, column in zip(rows.schema.names, rows.columns, strict=True):
            if not pa.types.is_dictionary(column.type):
                continue
            for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
                low, high = pc.min_max(chunk.indices).values()
                if low.is_valid and (low.as_py() < 0 or high.as_py() >= len(chunk.dictionary)):
                    raise _unreadable_group(shown, group, name, "Index not in dictionary bounds")

    def _all_rows(self, group: int, decoded: int, shown: str) -> None:
        """Row group `group` decoded to `decoded` rows is its footer's count of them (a record's position
        is its row group's first row, as the footers count them, and its row in the group), else
        invalid input naming `source`: Arrow stops early, silently, where the pages hold fewer rows
        (of a list or a map in version 1 pages, which do not say: `parquet_pages._check_rows`)."""
        said = self.metadata.row_group(group).num_rows
        if decoded != said:
            counted = f"its pages hold {decoded} rows, its footer says {said}"
            raise _unreadable_group(shown, group, None, counted)

    def _decoding(
        self, group: int, rows: int, shown: str, columns: list[str] | None
    ) -> AbstractContextManager[None]:
        """Arrow decoding row group `group` from the bytes held in memory (`decoding_held_bytes`): an
        error it raises is invalid input naming `source`, the file, the row group and the column that
        fails decoded alone (each of `columns`, or all, decoded again from the same bytes in batches
        of `rows`)."""

        def refused(said: str) -> InvalidInput:
            return _unreadable_group(shown, group, self._failing_column(group, rows, columns), said)

        return decoding_held_bytes(refused)

    def _failing_column(self, group: int, rows: int, columns: list[str] | None) -> str | None:
        """The first of the top-level `columns` (or all) that Arrow cannot decode alone, or None."""
        for name in columns if columns is not None else self.schema_arrow.names:
            try:
                for _ in self.iter_batches(
                    batch_size=rows, row_groups=[group], columns=[name], use_threads=False
                ):
                    pass
            except MemoryError:
                raise
            except (OSError, pa.ArrowException):
                return name
        return None

    def reader_for(self, group: int, wanted: int, shown: str) -> tuple[_ParquetFile, int, int]:
        """The reader of row group `group`, the rows (at most `wanted`) its batches may take within
        `parquet_batch_bytes()`, and the bytes such a batch may decode, as its pages declare them;
        invalid input when not even one row fits. The reader is this file,
        or, when more rows fit so, this file reading dense the text columns whose pages are not all
        written with a dictionary (read as an Arrow dictionary, such a column gathers the values of
        its whole chunk: `parquet_pages.ColumnPages.held`); its batches then hold those columns as
        text, not dictionaries (the same values)."""
        budget = parquet_batch_bytes()
        pages = self.pages(group, shown)
        rows = pages.rows_within(wanted, budget)
        plain = pages.plain_in_dictionary
        if rows < wanted and plain:
            if plain not in self._dense:
                self._dense[plain] = _ParquetFile(
                    self.held, self.metadata, sorted(self._read_dictionary - plain)
                )
            dense = self._dense[plain]
            dense_pages = dense.pages(group, shown)
            dense_rows = dense_pages.rows_within(wanted, budget)
            if dense_rows > rows:
                return dense, dense_rows, dense_pages.batch_bytes(dense_rows)
        rows = pages.batch_rows(wanted, budget, shown)
        return self, rows, pages.batch_bytes(rows)


def _parquet_file(fh: IO[bytes], shown: str) -> _ParquetFile:
    """The parquet file open with its text and binary columns read as Arrow dictionaries: a
    dictionary-encoded column stays its dictionary and indices (its size in the file), not one copy of
    the value a row (a decompression bomb). The values are the same; only their Arrow type differs.
    Those whose footer says they are written DELTA_BYTE_ARRAY or DELTA_LENGTH_BYTE_ARRAY are read
    dense: Arrow cannot read those encodings as a dictionary (a page that hides them is refused,
    `parquet_pages.row_group_pages`). Arrow reads its footer, then its row groups, from bytes read into
    memory first (`parquet_pages.HeldBytes`): a footer it cannot read is invalid input naming
    `source.uri` and the file (`parquet_pages.decoding_held_bytes`)."""
    held = HeldBytes(fh, shown)
    held.hold_footer()

    def refused(said: str) -> InvalidInput:
        return InvalidInput("source.uri", f"{redact_url(shown)}: not a readable parquet file: {said}")

    with decoding_held_bytes(refused):
        return _opened_parquet_file(held, refused)


def _opened_parquet_file(held: HeldBytes, refused: Callable[[str], InvalidInput]) -> _ParquetFile:
    """The file Arrow opens from `held`; a row group listing other column chunks than its schema's
    columns (which Arrow opens, and pyarrow indexes out of bounds reading) is `refused`."""
    pf = pq.ParquetFile(held)
    metadata = pf.metadata
    for g in range(metadata.num_row_groups):
        chunks = metadata.row_group(g).num_columns
        if chunks != metadata.num_columns:
            raise refused(
                f"row group {g} has {chunks} column chunks, its schema {metadata.num_columns} columns"
            )
    leaves = [metadata.schema.column(j) for j in range(metadata.num_columns)]
    aborting = column_metadata_refusal(held.footer(), leaves)
    if aborting is not None:  # (before pyarrow reads any column chunk's metadata)
        raise refused(aborting)
    delta = {
        metadata.schema.column(j).path
        for g in range(metadata.num_row_groups)
        for j in range(metadata.num_columns)
        if set(NOT_AS_DICTIONARY.values()) & set(metadata.row_group(g).column(j).encodings)
    }
    return _ParquetFile(
        held,
        metadata,
        [f.name for f in pf.schema_arrow if _binary_like(f.type) and f.name not in delta],
    )


def _value_bytes(array: pa.Array) -> np.ndarray:
    """About how many bytes each value of `array` takes (text and binary: their length; a dictionary:
    its value's; anything else: its share of the array's buffers)."""
    kind = array.type
    if pa.types.is_dictionary(kind):
        per_value = _value_bytes(array.dictionary)
        if not len(per_value):
            return np.zeros(len(array), dtype=np.int64)
        return per_value[array.indices.fill_null(0).to_numpy(zero_copy_only=False)]
    if _binary_like(kind):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.full(len(array), -(-array.nbytes // max(len(array), 1)) + 8, dtype=np.int64)


def _row_bytes(rows: pa.RecordBatch | pa.Table) -> np.ndarray:
    total = np.zeros(rows.num_rows, dtype=np.int64)
    for column in rows.columns:
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        if chunks:
            total += np.concatenate([_value_bytes(chunk) for chunk in chunks])
    return total


_UNIT_TO_US = {"s": (1_000_000, 1), "ms": (1_000, 1), "us": (1, 1), "ns": (1, 1_000)}


def same_name(name: str) -> str:
    """What two column names are the same as for a reader that folds case (DuckDB, Spark, Hive):
    the NFKC form, case-folded."""
    return unicodedata.normalize("NFKC", name).casefold()


def _named_twice(fields: list[pa.Field], where: str = "") -> str | None:
    """The first column or struct field (as `a.b`) named twice among `fields` and below (`same_name`:
    `consentGranted` and `CONSENTGRANTED` are one name), or None."""
    seen: set[str] = set()
    for f in fields:
        name = f"{where}{f.name}"
        if same_name(f.name) in seen:
            return name
        seen.add(same_name(f.name))
        inner = f.type
        while pa.types.is_list(inner) or pa.types.is_large_list(inner) or pa.types.is_fixed_size_list(inner):
            inner = inner.value_type
        if pa.types.is_struct(inner):
            found = _named_twice([inner.field(i) for i in range(inner.num_fields)], f"{name}.")
            if found is not None:
                return found
    return None


def _field_column(pf: pq.ParquetFile, name: str) -> int | None:
    """The index of the top-level leaf column `name` in the file's parquet schema, or None."""
    schema = pf.metadata.schema
    for j in range(len(schema)):
        if schema.column(j).path == name:
            return j
    return None


def _footer_bounds(
    pf: pq.ParquetFile, group: int, window: Window
) -> tuple[int | None, int | None, bool] | None:
    """(low, high, exact) of a row group from its footer statistics, when they say it exactly: a
    timestamp-with-time-zone column (time) or a signed integer column (ledger), min and max present
    and no null. None when the footer cannot say (the column is then read: `_column_bounds`)."""
    rows = pf.metadata.row_group(group).num_rows
    if rows == 0:
        return None, None, True
    arrow_schema = pf.schema_arrow
    if arrow_schema.get_field_index(window.field) < 0:
        return None, None, False  # the field is missing from every record: never skipped
    kind = arrow_schema.field(window.field).type
    j = _field_column(pf, window.field)
    if j is None:
        return None
    stats = pf.metadata.row_group(group).column(j).statistics
    if stats is None or not stats.has_min_max or not stats.has_null_count or stats.null_count != 0:
        return None
    if window.ledger:
        if pa.types.is_signed_integer(kind) and stats.physical_type in ("INT32", "INT64"):
            return int(stats.min), int(stats.max), True
        return None
    if pa.types.is_timestamp(kind) and kind.tz is not None and stats.physical_type == "INT64":
        scale, divide = _UNIT_TO_US[kind.unit]
        return stats.min_raw * scale // divide, stats.max_raw * scale // divide, True
    return None


def _column_bounds(
    pf: _ParquetFile, group: int, window: Window, shown: str
) -> tuple[int | None, int | None, bool]:
    """(low, high, exact) of a row group from its one column, as the records will carry it: instants
    parsed from strings or taken from timestamps with a time zone (time), integers (ledger). A column
    whose pages may decode to more than `parquet_batch_bytes()` is not read: its bounds are unknown
    (the group is never skipped, and is read in bounded batches)."""
    if (
        pf.pages(group, shown, [window.field]).batch_bytes(pf.metadata.row_group(group).num_rows)
        > parquet_batch_bytes()
    ):
        return None, None, False
    column = pf.decoded_group(group, shown, [window.field]).column(0)
    values = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_dictionary(values.type):  # text read as a dictionary (`_parquet_file`)
        values = values.dictionary.take(values.indices)
    if values.null_count:
        return None, None, False
    kind = values.type
    if window.ledger:
        if not pa.types.is_integer(kind):
            return None, None, False
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return bounds_of_instants(values)
    elif pa.types.is_timestamp(kind) and kind.tz is not None:
        scale, divide = _UNIT_TO_US[kind.unit]
        raw = values.cast(pa.int64())
        if len(raw) == 0:
            return None, None, True
        low, high = pc.min_max(raw).values()
        return low.as_py() * scale // divide, high.as_py() * scale // divide, True
    else:
        return None, None, False
    if len(values) == 0:
        return None, None, True
    low, high = pc.min_max(values).values()
    return int(low.as_py()), int(high.as_py()), True


def max_integer_in_source(uri: str, fmt: str, field: str) -> int | None:
    """The highest integer `field` among the records of a JSONL or parquet source, or None when none
    has one; read as every source is (a local one only a regular file, a JSONL line at most
    `PCBO_MAX_LINE_BYTES`: else `InvalidInput`, as a missing or unreadable source is). A JSONL line that
    is not a JSON object is skipped (the run judges it); parquet reads only the `field` column."""
    import orjson

    best: int | None = None
    with _opened(uri, uri) as fh, source_read_errors(uri):  # (a source that cannot be read: invalid input)
        if fmt == "parquet":
            parquet = _parquet_file(fh, uri)
            if field not in parquet.schema_arrow.names:
                return None
            if not pa.types.is_integer(parquet.schema_arrow.field(field).type):
                return None
            for group in range(parquet.num_row_groups):  # (in batches within `parquet_batch_bytes()`)
                rows = parquet.pages(group, uri, [field]).batch_rows(
                    DEFAULT_BATCH, parquet_batch_bytes(), uri
                )
                for batch in parquet.decoded_batches(group, rows, uri, [field]):
                    top = pc.max(batch.column(0)).as_py()
                    if top is not None and (best is None or top > best):
                        best = int(top)
            return best
        for _, line in _lines(fh):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            value = record.get(field) if isinstance(record, dict) else None
            if type(value) is int and (best is None or value > best):
                best = value
    return best


def open_source(uri: str, shown: str, fmt: str) -> RecordSource:
    if fmt == "jsonl":
        return JsonlSource(uri, shown)
    if fmt == "csv":
        return CsvSource(uri, shown)
    if fmt == "parquet":
        return ParquetSource(uri, shown)
    raise InvalidInput("source.format", f"{fmt} sources are not supported; use jsonl, csv or parquet")

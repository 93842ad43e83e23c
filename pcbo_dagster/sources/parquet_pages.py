"""What a parquet row group's pages say they decode to, read from their headers before Arrow decodes
any of them, so that a batch of rows is never larger than a budget
(`streaming.parquet_batch_bytes()`).

Arrow decodes a batch of rows before pcbo can see how large its values are, and values that
compress well (or that a dictionary, a run-length or a delta encoding repeats) decode to far more
than the file holds: 46 KiB of 24 rows of 60 MiB of zeros decode to 1.4 GiB. The footer's sizes
cannot tell (Arrow neither uses nor checks `total_uncompressed_size`), but every page header declares
the page's uncompressed size and its count of values, and Arrow refuses a page that does not
decompress to its declared size. So before a row group is decoded, its column chunks' page headers
are read (Thrift compact protocol: `PageHeader`), each page's bytes skipped, and each page bounded:

- the page itself: its compressed and its uncompressed bytes (Arrow holds one page of a column at a
  time), and a dictionary page decoded (its bytes, and a hash table entry a value);
- its values, counted twice (Arrow decodes them, then builds the batch's array of them: one page of
  one 100 MiB value peaks at 300 MiB): `VALUE_OVERHEAD` bytes each (levels, offsets, validity,
  dictionary indices; 4 for a top-level column of a fixed-width Arrow type) plus, for values of a
  fixed width, that type's width, else 16 bytes (a decimal Arrow makes of an integer) or a
  FIXED_LEN_BYTE_ARRAY's length (at least 32); text and binary values written plain
  hold at most the page's bytes; values written with a dictionary and read without one (text in a
  list or a struct) hold at most the longest value of the dictionary page (decompressed to find
  it); values written with DELTA_BYTE_ARRAY (each value a prefix of the one before and a suffix) at
  most the page's bytes each;
- a text column read as an Arrow dictionary (`streaming._parquet_file`) whose pages are not all
  written with one (a writer falls back to plain pages when its dictionary grows large): Arrow's
  dictionary gathers every value of those pages of the chunk, batch after batch, and each batch
  holds a copy of it, so every batch of the row group holds them twice. Such a row group may be
  read with the column dense instead (`streaming._ParquetFile.reader_for`), when more rows fit so.

A batch of `n` rows of a column with no repeated level (no list or map above it: a value a row)
touches only the pages holding those rows, whose first rows the pages' value counts give (whatever
a version 2 header says of its rows: Arrow does not check it); a column under a list or a map has
no such mapping in version 1 pages (a row may hold any number of values), so every batch of its row
group is counted as decoding all of its pages; its version 2 pages' rows are counted from their
repetition levels (uncompressed at the page's start; again not from the header), a page that
continues a row counted with the page the row begins in. A row group is
read in batches of as many rows (up to the batch size asked for) as keep every batch within the
budget; one whose single rows need more is invalid input naming the column.

The headers are read as a hostile file may write them: a chunk's byte range must lie in the file,
a header must parse within `MAX_HEADER_BYTES` (Arrow's own limit), its lists and maps hold at most
`MAX_CONTAINER_ELEMENTS` (Arrow's too), a page's bytes must lie within its chunk, and the pages'
sizes may not add to more than the footer says the chunk holds, and its pages hold the rows its row
group's footer says it does (`_check_rows`: Arrow silently stops at the fewer of them, and a record's
position is its row group's first row, as the footers count them); anything else is invalid input
naming `source`. So is a row group of more pages than their headers, kept while its batches are
planned (`PAGE_RECORD_BYTES` each, one row group's at a time), may take within the budget: a
million empty pages are 11 MB of file, and a data page written with a dictionary before its chunk's
dictionary page (one written after the data pages, where the scan and Arrow stop reading).

A row group's column chunks are read into memory once (`HeldBytes`: one read of the store a run of
adjacent chunks, the bytes Arrow itself reads whole, holding no more than it does), and both the scan
and Arrow read those bytes: what Arrow decodes is what was checked, however the file changes while it
is read, and an error Arrow raises decoding them is the file's (a page that does not decompress, or
to another size than its header says), never the store's, which can only fail while the bytes are
read (`decoding_held_bytes` decides so, in one place). So is the footer's: read into memory first,
then parsed by Arrow.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.io.redaction import redact_url

#: The largest page header Arrow reads (`kDefaultMaxPageHeaderSize`).
MAX_HEADER_BYTES = 16 << 20
#: The most pages a column chunk may have (a writer's pages hold up to 20,000 values, or 1 MiB, so
#: this many are 20 billion values or a terabyte); what is kept of each page counts too.
MAX_PAGES = 1 << 20
#: Bytes a page header read is kept in (a `Page` and its numbers): a row group's may take at most a
#: batch's budget, so its pages number at most `budget // PAGE_RECORD_BYTES`.
PAGE_RECORD_BYTES = 256
#: Bytes Arrow reads at first from the end of a file for its footer (`kDefaultFooterReadSize`).
_FOOTER_READ = 64 << 10
#: Bytes read for a page header at first (most are a few dozen; more are read as needed).
_FIRST_HEADER_READ = 512
#: Bytes past a column chunk's range Arrow reads for files of old writers (`kMaxDictHeaderSize`).
_OLD_WRITER_PADDING = 100
#: Bytes a decoded value takes besides its own: definition and repetition levels (2 each), an
#: offset or a dictionary index (4; 8 for large types), validity.
VALUE_OVERHEAD = 16
#: Bytes a dictionary value takes in the hash table Arrow builds of it.
_DICTIONARY_ENTRY = 32
#: Bytes Arrow makes of a value of a fixed width at most (a decimal of an INT32 or INT64 takes 16;
#: a FIXED_LEN_BYTE_ARRAY its length, or 32 for a decimal of 256 bits).
_FIXED_WIDTH = 16
#: Bytes a value of a top-level column of a fixed width takes besides its own: its definition level
#: (2) and validity bit, rounded up.
_FLAT_OVERHEAD = 4
_DATA_PAGE, _INDEX_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 1, 2, 3
_DICTIONARY_ENCODINGS = frozenset({2, 8})  # PLAIN_DICTIONARY, RLE_DICTIONARY
_DELTA_BYTE_ARRAY = 7
#: Encodings of text Arrow cannot read as a dictionary (`streaming._parquet_file` reads such text dense).
NOT_AS_DICTIONARY = {6: "DELTA_LENGTH_BYTE_ARRAY", 7: "DELTA_BYTE_ARRAY"}
_NESTING = 64  # Thrift structs nested deeper than this are not a page header
#: The most elements a Thrift list, set or map of a page header may hold: Arrow refuses more
#: (`thrift_container_size_limit`), with an error that is not the source's.
MAX_CONTAINER_ELEMENTS = 1_000_000


class NotHeld(RuntimeError):
    """Bytes of a file read that were not read into memory first (`HeldBytes`): a defect of pcbo's,
    never the file's nor the store's."""


class HeldBytes:
    """Ranges of a file's bytes read into memory, each run of adjacent or overlapping ranges with one
    read of the store, and a file object reading them (without a copy: `read_buffer`): what the page
    headers' scan (`row_group_pages`) and Arrow read, so that Arrow decodes the bytes the scan checked.
    A read outside them is `NotHeld`; the store failing while they are read, its own error (`OSError`
    or the object store client's); fewer bytes than the file held when it was opened, invalid input
    naming `source`: the file changed while it was read."""

    closed = False

    def __init__(self, fh: IO[bytes], shown: str) -> None:
        self._fh = fh
        self._shown = shown
        fh.seek(0, os.SEEK_END)
        self.size = fh.tell()
        self._spans: list[tuple[int, pa.Buffer]] = []
        self._at = 0

    def hold(self, ranges: list[tuple[int, int]]) -> None:
        """Hold the bytes [start, end) of each of `ranges` (within the file) and no others, unless every
        one of them is held already (so that a row group's pages read twice are the same bytes)."""
        wanted = sorted((max(start, 0), min(end, self.size)) for start, end in ranges)
        if all(self._held(start, end) is not None for start, end in wanted):
            return
        runs: list[list[int]] = []
        for start, end in wanted:
            if runs and start <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], end)
            else:
                runs.append([start, end])
        self._spans = []
        spans = []
        for start, end in runs:
            data = self._read(start, end - start)
            if len(data) != end - start:
                raise InvalidInput(
                    "source",
                    f"{redact_url(self._shown)}: changed while it was read: {len(data)} bytes at byte "
                    f"{start}, where it held {end - start} when it was opened",
                )
            spans.append((start, pa.py_buffer(data)))
        self._spans = spans

    def hold_footer(self) -> None:
        """Hold the bytes Arrow reads a parquet file's footer from: its last `_FOOTER_READ` bytes, or the
        whole footer when its length (in the last 8 bytes) says it is longer and within the file (one
        longer than the file is Arrow's to refuse, before reading it)."""
        tail = min(self.size, _FOOTER_READ)
        self.hold([(self.size - tail, self.size)])
        length = self.footer_length()
        if tail < length + 8 <= self.size:
            self.hold([(self.size - 8 - length, self.size)])

    def footer_length(self) -> int:
        """The footer's length as the file's last 8 bytes say it (before `PAR1`); 0 for a shorter file.
        Its bytes must be held (`hold_footer`)."""
        return int.from_bytes(self.read_at(self.size - 8, 4), "little") if self.size >= 8 else 0

    def footer(self) -> bytes:
        """The footer's bytes (its Thrift `FileMetaData`), held (`hold_footer`) and within the file (as
        Arrow, which opened it, found them)."""
        length = self.footer_length()
        return self.read_at(self.size - 8 - length, length)

    def _read(self, start: int, size: int) -> bytes:
        """`size` bytes of the file from `start` (fewer at its end), read from the store."""
        self._fh.seek(start)
        pieces: list[bytes] = []
        while size > 0:
            piece = self._fh.read(size)
            if not piece:
                break
            pieces.append(piece)
            size -= len(piece)
        return b"".join(pieces)

    def _held(self, start: int, end: int) -> tuple[int, pa.Buffer] | None:
        for at, data in self._spans:
            if at <= start and end <= at + data.size:
                return at, data
        return None

    def read_buffer(self, size: int = -1) -> pa.Buffer:
        start = self._at
        end = self.size if size is None or size < 0 else min(start + size, self.size)
        if end <= start:
            return pa.py_buffer(b"")
        held = self._held(start, end)
        if held is None:
            raise NotHeld(f"bytes {start} to {end} of the file were not read first")
        self._at = end
        return held[1].slice(start - held[0], end - start)

    def read(self, size: int = -1) -> bytes:
        return self.read_buffer(size).to_pybytes()

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset` (fewer at the end of the file)."""
        self.seek(offset)
        return self.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: self.size}[whence]
        self._at = base + offset
        return self._at

    def tell(self) -> int:
        return self._at

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self._spans = []


@contextmanager
def decoding_held_bytes(refused: Callable[[str], InvalidInput]) -> Iterator[None]:
    """Arrow reading bytes held in memory (`HeldBytes`): an error it raises there (an `OSError` or an
    Arrow error: a footer whose Thrift does not parse, a page that does not decompress, or
    decompresses to another size than its header says; a column name pyarrow cannot decode as UTF-8)
    is the file's, never the store's, which is not read while Arrow reads them (a failing store fails
    while the bytes are read, `HeldBytes.hold`, with its own error: exit 1). `refused(what Arrow
    said)`: the invalid input naming where. The one place that decides so."""
    try:
        yield
    except MemoryError:
        raise
    except (OSError, pa.ArrowException, UnicodeDecodeError) as exc:  # (pyarrow decoding the file's names)
        raise refused(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


class _Malformed(Exception):
    """A page header that is not one (truncated, garbage, out of bounds)."""


class _NeedMore(_Malformed):
    """The header runs past the bytes read so far."""


class _TooManyPages(Exception):
    """A row group has more pages than their kept headers may take (`PAGE_RECORD_BYTES`)."""


class _Compact:
    """A reader of Thrift's compact protocol over `data`, bounded by it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def byte(self) -> int:
        if self.at >= len(self.data):
            raise _NeedMore
        self.at += 1
        return self.data[self.at - 1]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise _Malformed("a varint longer than 10 bytes")

    def integer(self) -> int:
        raw = self.varint()
        return (raw >> 1) ^ -(raw & 1)

    def skip_bytes(self, n: int) -> None:
        if n < 0:
            raise _Malformed("a negative length")
        if self.at + n > len(self.data):
            raise _NeedMore
        self.at += n

    def container(self, size: int) -> None:
        if size > MAX_CONTAINER_ELEMENTS:
            raise _Malformed(
                f"a list or map of {size} elements (Arrow reads {MAX_CONTAINER_ELEMENTS} at most)"
            )

    def list_header(self) -> tuple[int, int]:
        """A list's or set's header: (its count of elements, within `MAX_CONTAINER_ELEMENTS`, their
        Thrift type)."""
        head = self.byte()
        size, inner = head >> 4, head & 0x0F
        if size == 15:
            size = self.varint()
        self.container(size)
        return size, inner

    def skip(self, kind: int, depth: int) -> None:
        if depth > _NESTING:
            raise _Malformed("structures nested too deep")
        if kind in (1, 2):  # a boolean field: its value is in its type
            return
        if kind == 3:
            self.byte()
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 7:
            self.skip_bytes(8)
        elif kind == 8:
            self.skip_bytes(self.varint())
        elif kind in (9, 10):
            size, inner = self.list_header()
            if inner in (1, 2, 3, 7):  # (elements of a fixed size: booleans and bytes take one)
                self.skip_bytes(size * (8 if inner == 7 else 1))
                return
            for _ in range(size):
                self.skip(inner, depth + 1)
        elif kind == 11:
            size = self.varint()
            self.container(size)
            if size:
                types = self.byte()
                for _ in range(size):
                    self.skip(types >> 4 if types >> 4 not in (1, 2) else 3, depth + 1)
                    self.skip(types & 0x0F if types & 0x0F not in (1, 2) else 3, depth + 1)
        elif kind == 12:
            self.struct(depth + 1, lambda _field, kind, depth: self.skip(kind, depth))
        else:
            raise _Malformed(f"an unknown Thrift type {kind}")

    def struct(self, depth: int, on_field: Callable[[int, int, int], None]) -> None:
        """Read a struct's fields, each handed to `on_field(id, type, depth)` (which reads or skips it)."""
        if depth > _NESTING:
            raise _Malformed("structures nested too deep")
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            delta, kind = head >> 4, head & 0x0F
            last = last + delta if delta else self.integer()
            on_field(last, kind, depth)


@dataclass(slots=True)
class Page:
    """One page as its header declares it."""

    kind: int
    uncompressed: int
    compressed: int
    values: int = 0
    rows: int | None = None  # (version 2 data pages only; of a list or map column, as its levels say)
    encoding: int = 0
    offset: int = 0  # of its bytes, after the header
    repetition_levels: int = 0  # bytes of them at its start (version 2 data pages only)
    continues_a_row: bool = False  # its first value is not a row's first (a list or map column)


#: The fields of a page header read (others are skipped): (the header's field, the field in it) for
#: the page's count of values, its count of rows (version 2), its encoding and the bytes of its
#: repetition levels (version 2).
_VALUES = {5: 1, 7: 1, 8: 1}
_ROWS = {8: 3}
_ENCODING = {5: 2, 7: 2, 8: 4}
_REPETITION_LEVELS = {8: 6}


def _page_header(reader: _Compact) -> Page:
    """A `PageHeader`: type (1), uncompressed (2) and compressed (3) sizes, and in the header of its
    kind (data 5, dictionary 7, data v2 8) its count of values, rows (v2) and encoding."""
    page = Page(kind=-1, uncompressed=-1, compressed=-1)
    found: set[int] = set()

    def non_negative_i32(field_id: int) -> int:
        value = reader.integer()
        if not 0 <= value < 2**31:
            raise _Malformed(f"a page header's field {field_id} is {value}")
        return value

    def kind_header(of: int) -> Callable[[int, int, int], None]:
        def on_field(field_id: int, kind: int, depth: int) -> None:
            read = (_VALUES[of], _ROWS.get(of), _ENCODING[of], _REPETITION_LEVELS.get(of))
            if kind != 5 or field_id not in read:
                reader.skip(kind, depth)
                return
            value = non_negative_i32(field_id)
            if field_id == _VALUES[of]:
                page.values = value
                found.add(of)
            elif field_id == _ROWS.get(of):
                page.rows = value
            elif field_id == _REPETITION_LEVELS.get(of):
                page.repetition_levels = value
            else:
                page.encoding = value

        return on_field

    def on_field(field_id: int, kind: int, depth: int) -> None:
        if kind == 5 and field_id in (1, 2, 3):
            value = non_negative_i32(field_id)
            if field_id == 1:
                page.kind = value
            elif field_id == 2:
                page.uncompressed = value
            else:
                page.compressed = value
        elif kind == 12 and field_id in _VALUES:
            reader.struct(depth + 1, kind_header(field_id))
        else:
            reader.skip(kind, depth)

    reader.struct(0, on_field)
    if page.kind < 0 or page.uncompressed < 0 or page.compressed < 0:
        raise _Malformed("a page header without its type or sizes")
    header_of_kind = {_DATA_PAGE: 5, _DICTIONARY_PAGE: 7, _DATA_PAGE_V2: 8}.get(page.kind)
    if header_of_kind is not None and header_of_kind not in found:
        raise _Malformed("a page header without its count of values")
    if page.kind == _DATA_PAGE_V2 and page.rows is None:
        raise _Malformed("a version 2 page header without its count of rows")
    return page


@dataclass
class ColumnPages:
    """A column chunk's pages, and what its values may decode to."""

    path: str
    repeated: bool  # under a list or a map: rows and values differ
    pages: list[Page] = field(default_factory=list)
    #: Bytes a value takes at most, for values of a fixed width (else None).
    width: int | None = None
    #: Bytes a value takes besides its own (levels, offsets, validity).
    overhead: int = VALUE_OVERHEAD
    #: The longest value of its dictionary page, when read without a dictionary (else None).
    longest_dictionary_value: int | None = None
    read_as_dictionary: bool = False

    def held(self) -> int:
        """Bytes every batch of the chunk holds: its largest page (compressed and decompressed) and its
        dictionary, decoded. Read as an Arrow dictionary, that dictionary also gathers every value of
        the chunk's pages not written with one (a writer falls back to plain pages when its
        dictionary grows too large), batch after batch, and each batch holds a copy of it."""
        largest = max((p.uncompressed + p.compressed for p in self.pages), default=0)
        entry = _DICTIONARY_ENTRY if self.read_as_dictionary else VALUE_OVERHEAD
        dictionary = sum(p.uncompressed + entry * p.values for p in self.pages if p.kind == _DICTIONARY_PAGE)
        if self.read_as_dictionary:  # (its values and their hash table entries; the batch's copy)
            gathered = [p for p in self._data_pages() if p.encoding not in _DICTIONARY_ENCODINGS]
            dictionary += sum(
                2 * (p.values * p.uncompressed if p.encoding == _DELTA_BYTE_ARRAY else p.uncompressed)
                + (_DICTIONARY_ENTRY + 4) * p.values
                for p in gathered
            )
        return largest + dictionary

    @property
    def plain_in_dictionary(self) -> bool:
        """Read as an Arrow dictionary, with pages not written with one (see `held`)."""
        return self.read_as_dictionary and any(
            p.encoding not in _DICTIONARY_ENCODINGS for p in self._data_pages()
        )

    def _data_pages(self) -> list[Page]:
        return [p for p in self.pages if p.kind in (_DATA_PAGE, _DATA_PAGE_V2)]

    def _page_bytes(self, page: Page, values: int) -> int:
        """What `values` of `page`'s values decode to, at most: twice their size (Arrow decodes them,
        then builds the batch's array of them: a page of one 100 MiB value peaks at 300 MiB with
        the page itself)."""
        if self.width is not None:
            size = values * (self.width + self.overhead)
        elif page.encoding in _DICTIONARY_ENCODINGS:
            longest = 0 if self.read_as_dictionary else (self.longest_dictionary_value or 0)
            size = values * (longest + VALUE_OVERHEAD)
        elif self.read_as_dictionary:  # (their bytes: in the chunk's dictionary, `held`)
            size = values * VALUE_OVERHEAD
        elif page.encoding == _DELTA_BYTE_ARRAY:
            size = values * (page.uncompressed + VALUE_OVERHEAD)
        else:
            size = page.uncompressed + values * (_DICTIONARY_ENTRY + VALUE_OVERHEAD)
        return 2 * size

    def batch_bytes(self, rows: int) -> int:
        """The most a batch of `rows` rows of this chunk may decode, starting at any row."""
        data = self._data_pages()
        if not data:
            return self.held()
        if self.repeated and any(p.rows is None for p in data):
            return self.held() + sum(self._page_bytes(p, p.values) for p in data)
        if self.repeated:  # (version 2 pages: rows known, but not the values of each row)
            counts_of: list[int] = []
            costs_of: list[int] = []
            for p in data:  # (a page continuing a row is read with the page the row begins in)
                if p.continues_a_row and counts_of:
                    counts_of[-1] += p.rows or 0
                    costs_of[-1] += self._page_bytes(p, p.values)
                else:
                    counts_of.append(p.rows or 0)
                    costs_of.append(self._page_bytes(p, p.values))
            counts = np.array(counts_of, dtype=np.int64)
            costs = np.array(costs_of, dtype=np.int64)
        else:  # (a value a row: Arrow reads values, whatever a version 2 page says of its rows)
            counts = np.array([p.values for p in data], dtype=np.int64)
            costs = np.array([self._page_bytes(p, min(p.values, rows)) for p in data], dtype=np.int64)
        return self.held() + _worst_window(counts, costs, rows)


def _worst_window(counts: np.ndarray | list[int], costs: np.ndarray | list[int], rows: int) -> int:
    """The most that `rows` consecutive rows, starting anywhere, may cost, of pieces (a column chunk's
    pages) one after another of `counts` rows costing `costs` each: a window touches a piece when it
    holds one of its rows, and the most pieces a window whose first row is in piece i touches are
    those starting before the last row of piece i + `rows`."""
    sizes = np.asarray(counts, dtype=np.int64)
    if not len(sizes):
        return 0
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    total = np.concatenate([[0], np.cumsum(np.asarray(costs, dtype=np.int64))])
    ends = np.searchsorted(starts, starts + np.maximum(sizes - 1, 0) + rows, side="left")
    return int((total[ends] - total[: len(sizes)]).max())


@dataclass
class RowGroupPages:
    group: int
    rows: int
    columns: list[ColumnPages]

    def batch_bytes(self, rows: int, columns: list[ColumnPages] | None = None) -> int:
        return sum(c.batch_bytes(rows) for c in (self.columns if columns is None else columns))

    @property
    def plain_in_dictionary(self) -> frozenset[str]:
        """The columns read as Arrow dictionaries whose pages are not all written with one."""
        return frozenset(c.path for c in self.columns if c.plain_in_dictionary)

    def batch_rows(self, wanted: int, budget: int, shown: str) -> int:
        """The most rows (at most `wanted`) a batch may take within `budget` bytes; invalid input when
        not even one row fits, naming the column that needs most."""
        rows = self.rows_within(wanted, budget)
        if not rows:
            worst = max(self.columns, key=lambda c: c.batch_bytes(1))
            raise InvalidInput(
                "source",
                f"{redact_url(shown)}: row group {self.group}: its pages say one row may decode to "
                f"{self.batch_bytes(1)} bytes ({worst.batch_bytes(1)} of column {worst.path}), more than "
                f"a parquet batch may ({budget} bytes, 4 × PCBO_MAX_LINE_BYTES)",
            )
        return rows

    def rows_within(self, wanted: int, budget: int) -> int:
        """The most rows (at most `wanted`) a batch may take within `budget` bytes, 0 if none."""
        if self.batch_bytes(min(wanted, max(self.rows, 1))) <= budget:
            return wanted
        if self.batch_bytes(1) > budget:
            return 0
        low, high = 1, min(wanted, max(self.rows, 1))  # batch_bytes(low) fits, batch_bytes(high) not
        while high - low > 1:
            middle = (low + high) // 2
            if self.batch_bytes(middle) <= budget:
                low = middle
            else:
                high = middle
        return low


def _longest_plain_value(data: bytes, count: int) -> int:
    """The longest of `count` PLAIN BYTE_ARRAY values (a 4-byte length, then the bytes) in `data`."""
    at, longest = 0, 0
    for _ in range(count):
        if at + 4 > len(data):
            raise _Malformed("a dictionary page shorter than its values")
        n = int.from_bytes(data[at : at + 4], "little")
        at += 4 + n
        longest = max(longest, n)
    return longest


_CODECS = {"SNAPPY": "snappy", "GZIP": "gzip", "BROTLI": "brotli", "ZSTD": "zstd", "LZ4_RAW": "lz4_raw"}


def _longest_dictionary_value(held: HeldBytes, page: Page, codec: str, budget: int) -> int:
    """The longest value of a BYTE_ARRAY dictionary page (its decompressed bytes when the codec is
    one pyarrow decompresses and the page is within `budget`; else the page's size, which no value
    exceeds)."""
    if max(page.compressed, page.uncompressed) > budget:
        return page.uncompressed
    raw = held.read_at(page.offset, page.compressed)
    if len(raw) != page.compressed:
        raise _Malformed("a dictionary page past the end of the file")
    if codec == "UNCOMPRESSED":
        data = raw
    elif codec in _CODECS:
        try:
            data = pa.decompress(raw, page.uncompressed, codec=_CODECS[codec]).to_pybytes()
        except (pa.ArrowException, ValueError, OSError):
            raise _Malformed("a dictionary page that does not decompress") from None
    else:
        return page.uncompressed
    return _longest_plain_value(data, page.values)


def _chunk_range(chunk: pq.ColumnChunkMetaData, file_size: int) -> tuple[int, int]:
    """The bytes [start, end) of a column chunk, as Arrow reads them: from its first page (the
    dictionary page's offset when it has one before its data), and up to `_OLD_WRITER_PADDING` bytes
    past the chunk's range, as Arrow allows for the files of old writers (PARQUET-816; Arrow itself
    refuses it for others)."""
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and 0 < (chunk.dictionary_page_offset or 0) < start:
        start = chunk.dictionary_page_offset
    length = chunk.total_compressed_size
    if start < 0 or length < 0 or start + length > file_size:
        raise _Malformed(f"its byte range {start}+{length} is outside the file ({file_size} bytes)")
    return start, start + length + min(_OLD_WRITER_PADDING, file_size - start - length)


def _chunk_pages(
    held: HeldBytes,
    start: int,
    end: int,
    chunk: pq.ColumnChunkMetaData,
    kept_at_most: int,
    repeated: bool,
) -> list[Page]:
    """The pages of a column chunk (its bytes [start, end): `_chunk_range`; `repeated`: of a column
    under a list or a map), as Arrow reads them: until its footer's count of values is reached. More
    than `kept_at_most` pages: `_TooManyPages`, read no further. A data page of no values ends Arrow's
    reading of a column with no repeated level, and of any column before its first values: invalid;
    Arrow reads on past one in a list's chunk (pyarrow writes one before the last page of a list's
    chunk when its pages hold a value each)."""
    pages: list[Page] = []
    at, seen = start, 0
    while seen < chunk.num_values:
        if at >= end:
            raise _Malformed(f"its pages hold {seen} values, its footer says {chunk.num_values}")
        window = min(end - at, _FIRST_HEADER_READ)
        while True:
            data = held.read_at(at, window)
            reader = _Compact(data)
            try:
                page = _page_header(reader)
                break
            except _NeedMore:
                if len(data) < window or window >= min(end - at, MAX_HEADER_BYTES):
                    raise _Malformed(f"a truncated page header at byte {at}") from None
                window = min(end - at, MAX_HEADER_BYTES, window * 4)
        at += reader.at
        if page.compressed > end - at:
            raise _Malformed(f"a page at byte {at} of {page.compressed} bytes runs past its column chunk")
        page.offset = at
        at += page.compressed
        if page.kind == _DICTIONARY_PAGE and pages:  # (Arrow refuses it, as an I/O error)
            raise _Malformed(f"a dictionary page that is not its chunk's first page at byte {at}")
        dictionary_before = bool(pages) and pages[0].kind == _DICTIONARY_PAGE
        if page.kind != _DICTIONARY_PAGE and page.encoding in _DICTIONARY_ENCODINGS and not dictionary_before:
            raise _Malformed(  # (one written after the data pages lies past them: neither reads it)
                f"a data page at byte {at} written with a dictionary before any dictionary page"
            )
        if page.kind in (_DATA_PAGE, _DATA_PAGE_V2):
            if not page.values and (not repeated or not seen):
                raise _Malformed(f"a data page of no values at byte {at} (Arrow ends the column there)")
            seen += page.values
        if page.kind != _INDEX_PAGE:
            pages.append(page)
            if len(pages) > MAX_PAGES:
                raise _Malformed(f"more than {MAX_PAGES} pages")
            if len(pages) > kept_at_most:
                raise _TooManyPages
    declared = sum(p.uncompressed for p in pages)
    if declared > chunk.total_uncompressed_size:
        raise _Malformed(
            f"its pages declare {declared} bytes uncompressed, "
            f"its footer says {chunk.total_uncompressed_size}"
        )
    return pages


def _rows_begun(levels: bytes, count: int, bit_width: int) -> tuple[int, bool]:
    """(how many of the first `count` repetition levels in `levels` are 0, each the first value of a
    row; whether the first one is), read as Arrow reads a version 2 page's: the RLE / bit-packed
    hybrid encoding of `bit_width` bits a level, without a length before it."""
    reader = _Compact(levels)
    level_bytes = (bit_width + 7) // 8
    zeros, seen, first_is_zero = 0, 0, False
    packed: list[bytes] = []  # (runs of bit-packed levels, whole bytes each: 8 levels a group)
    packed_levels = 0
    while seen < count:
        run = reader.varint()
        if run & 1:  # (bit-packed: groups of 8 levels)
            start = reader.at
            reader.skip_bytes((run >> 1) * bit_width)
            taken = min((run >> 1) * 8, count - seen)
            if not seen and taken:
                first_is_zero = not int.from_bytes(levels[start : start + level_bytes], "little") & (
                    (1 << bit_width) - 1
                )
            packed.append(levels[start : reader.at])
            packed_levels += taken
        else:  # (a run of one level repeated)
            start = reader.at
            reader.skip_bytes(level_bytes)
            taken = min(run >> 1, count - seen)
            if not int.from_bytes(levels[start : reader.at], "little"):
                zeros += taken
                first_is_zero = first_is_zero or (not seen and taken > 0)
        seen += taken
    if packed_levels:
        bits = np.unpackbits(np.frombuffer(b"".join(packed), dtype=np.uint8), bitorder="little")
        nonzero: np.ndarray = np.any(bits.reshape(-1, bit_width), axis=1)
        zeros += packed_levels - int(nonzero[:packed_levels].sum())
    return zeros, first_is_zero


def _count_rows_of_v2_pages(held: HeldBytes, pages: list[Page], max_repetition_level: int) -> None:
    """Each version 2 data page's count of rows, and whether it continues a row, as its repetition
    levels say (Arrow takes rows from them; the header's count of rows is not checked)."""
    bit_width = max_repetition_level.bit_length()
    for page in pages:
        if page.kind != _DATA_PAGE_V2:
            continue
        if page.repetition_levels > page.compressed:
            raise _Malformed(f"a page's repetition levels ({page.repetition_levels} bytes) run past it")
        levels = held.read_at(page.offset, page.repetition_levels)
        try:
            page.rows, first_is_zero = _rows_begun(levels, page.values, bit_width)
        except _NeedMore:
            raise _Malformed("a page with fewer repetition levels than values") from None
        page.continues_a_row = page.values > 0 and not first_is_zero


def _check_rows(pages: list[Page], repeated: bool, rows: int) -> None:
    """The rows a column chunk's `pages` hold are the rows its row group's footer says it holds, where
    the pages tell: a value a row in a column with no repeated level, the rows their repetition levels
    begin in version 2 pages of one that has (version 1 pages do not tell: there, at most a row a
    value, since every row holds a value, or a level, of every column). Arrow reads as many rows as
    the footer says and stops early, silently, where the pages hold fewer: a row group of other rows
    than its footer's is not one (its rows' positions are its footer's); and a row group read whole
    has memory reserved for its footer's rows first."""
    data = [p for p in pages if p.kind in (_DATA_PAGE, _DATA_PAGE_V2)]
    values = sum(p.values for p in data)
    if not repeated and values != rows:
        raise _Malformed(f"its pages hold {values} values, its row group says {rows} rows")
    if values < rows:
        raise _Malformed(f"its pages hold {values} values, fewer than its row group's {rows} rows")
    if repeated and data and all(p.kind == _DATA_PAGE_V2 for p in data):
        held = sum(p.rows or 0 for p in data)
        if held != rows:
            raise _Malformed(f"its pages' repetition levels begin {held} rows, its row group says {rows}")


def _value_width(column: pq.ColumnSchema, arrow_type: pa.DataType | None) -> tuple[int | None, int]:
    """(bytes a value of the leaf column takes at most, when of a fixed width, else None; bytes a
    value takes besides). A top-level column of a fixed-width Arrow type: that width, and its
    definition level and validity bit (`_FLAT_OVERHEAD`); any other: `_FIXED_WIDTH` (or a
    FIXED_LEN_BYTE_ARRAY's length, at least 32) and `VALUE_OVERHEAD`."""
    physical = column.physical_type
    if physical == "BYTE_ARRAY":
        return None, VALUE_OVERHEAD
    flat = column.max_repetition_level == 0 and arrow_type is not None
    if flat and arrow_type is not None and not pa.types.is_dictionary(arrow_type):
        try:
            bits = arrow_type.bit_width
        except ValueError:  # (not a fixed-width type)
            bits = 0
        if bits:
            return max(bits // 8, 1), _FLAT_OVERHEAD
    if physical == "FIXED_LEN_BYTE_ARRAY":
        return max(column.length, 32), VALUE_OVERHEAD
    return _FIXED_WIDTH, VALUE_OVERHEAD


def _not_a_chunk(shown: str, group: int, path: str, exc: _Malformed) -> InvalidInput:
    return InvalidInput(
        "source", f"{redact_url(shown)}: row group {group}, column {path}: not a parquet column chunk: {exc}"
    )


def row_group_pages(
    held: HeldBytes,
    pf: pq.ParquetFile,
    group: int,
    shown: str,
    dictionary_columns: frozenset[str],
    budget: int,
    columns: list[str] | None = None,
) -> RowGroupPages:
    """The pages of row group `group` (of the leaf columns of the top-level `columns`, or all): their
    column chunks read into `held` (the bytes of the file `pf` reads, which Arrow then decodes), their
    pages' headers read from there (`dictionary_columns`: the top-level columns `pf` reads as Arrow
    dictionaries; `budget`: bytes a batch may decode); invalid input naming `source` when they are
    not pages."""
    metadata = pf.metadata
    row_group = metadata.row_group(group)
    schema = metadata.schema
    chunks: list[tuple[pq.ColumnSchema, pq.ColumnChunkMetaData, tuple[int, int]]] = []
    for j in range(row_group.num_columns):
        column = schema.column(j)
        if columns is not None and not any(
            column.path == c or column.path.startswith(f"{c}.") for c in columns
        ):
            continue
        chunk = row_group.column(j)
        try:
            chunks.append((column, chunk, _chunk_range(chunk, held.size)))
        except _Malformed as exc:
            raise _not_a_chunk(shown, group, column.path, exc) from None
    held.hold([span for _, _, span in chunks])
    arrow_types = {f.name: f.type for f in pf.schema_arrow}
    read: list[ColumnPages] = []
    kept_at_most = budget // PAGE_RECORD_BYTES
    for column, chunk, (start, end) in chunks:
        path = column.path
        repeated = column.max_repetition_level > 0  # (under a list or a map)
        try:
            kept = kept_at_most - sum(len(c.pages) for c in read)
            pages = _chunk_pages(held, start, end, chunk, kept, repeated)
            if repeated:
                _count_rows_of_v2_pages(held, pages, column.max_repetition_level)
            _check_rows(pages, repeated, row_group.num_rows)
            width, overhead = _value_width(column, arrow_types.get(path))
            pages_of = ColumnPages(
                path,
                column.max_repetition_level > 0,
                pages,
                width,
                read_as_dictionary=path in dictionary_columns and column.max_repetition_level == 0,
                overhead=overhead,
            )
            hidden = {NOT_AS_DICTIONARY[p.encoding] for p in pages if p.encoding in NOT_AS_DICTIONARY}
            if pages_of.read_as_dictionary and hidden:
                raise _Malformed(f"a page written {min(hidden)}, which its footer's encodings do not list")
            if width is None and not pages_of.read_as_dictionary:
                dictionaries = [p for p in pages if p.kind == _DICTIONARY_PAGE]
                if dictionaries:
                    pages_of.longest_dictionary_value = max(
                        _longest_dictionary_value(held, p, chunk.compression, budget) for p in dictionaries
                    )
        except _Malformed as exc:
            raise _not_a_chunk(shown, group, path, exc) from None
        except _TooManyPages:
            raise InvalidInput(
                "source",
                f"{redact_url(shown)}: row group {group}: more than {kept_at_most} pages (column {path}), "
                f"whose headers read take more than a parquet batch may ({budget} bytes, "
                f"4 × PCBO_MAX_LINE_BYTES; {PAGE_RECORD_BYTES} bytes a page)",
            ) from None
        read.append(pages_of)
    return RowGroupPages(group, row_group.num_rows, read)


#: Bytes a value of each fixed-width physical type takes, as Arrow decodes a statistics' min and max.
_PHYSICAL_WIDTH = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8}
#: The physical types, as the footer numbers them.
_PHYSICAL_TYPES = [
    "BOOLEAN",
    "INT32",
    "INT64",
    "INT96",
    "FLOAT",
    "DOUBLE",
    "BYTE_ARRAY",
    "FIXED_LEN_BYTE_ARRAY",
]
#: The compression codecs Arrow knows (UNCOMPRESSED to LZ4_RAW): any other number it throws on.
_CODECS_KNOWN = range(8)


def column_metadata_refusal(footer: bytes, leaves: list[pq.ColumnSchema]) -> str | None:
    """What in a file's footer (its Thrift `FileMetaData`; `leaves`: its schema's leaf columns) Arrow
    throws on where pyarrow does not catch it, aborting the process, when a column chunk's metadata
    is read (`RowGroupMetaData.column`, and its `compression` and `statistics`): a physical type
    other than its column's; size statistics whose
    repetition or definition level histogram holds other than the column's levels + 1 counts, or an
    unencoded byte array size on a column that is not BYTE_ARRAY; a compression codec Arrow does not
    know; a statistics' min or max shorter than a value of the column's fixed width; a column chunk's
    encryption metadata (no key is ever given). None when there is none."""
    reader = _Compact(footer)
    found: list[str] = []
    paths = [c.path for c in leaves]

    def structs_of_list(depth: int, fields_of: Callable[[int], Callable[[int, int, int], None]]) -> None:
        """Each element of a list of structs (an element of another kind skipped), its fields read by
        `fields_of(its index)`."""
        size, inner = reader.list_header()
        for index in range(size):
            if inner != 12:
                reader.skip(inner, depth + 1)
            else:
                reader.struct(depth + 1, fields_of(index))

    def file_field(field_id: int, kind: int, depth: int) -> None:
        if field_id != 4 or kind != 9:  # (row_groups)
            reader.skip(kind, depth)
            return
        structs_of_list(depth, lambda group: functools.partial(group_field, group))

    def group_field(group: int, field_id: int, kind: int, depth: int) -> None:
        if field_id != 1 or kind != 9:  # (columns)
            reader.skip(kind, depth)
            return
        structs_of_list(
            depth,
            lambda j: functools.partial(
                chunk_field, j, f"row group {group}, column {paths[j] if j < len(paths) else j}"
            ),
        )

    def chunk_field(j: int, where: str, field_id: int, kind: int, depth: int) -> None:
        if field_id == 8:  # (crypto_metadata)
            found.append(f"{where}: encrypted")
        if field_id == 3 and kind == 12 and j < len(leaves):  # (meta_data)
            reader.struct(depth + 1, functools.partial(meta_field, leaves[j], where))
        else:
            reader.skip(kind, depth)

    def meta_field(leaf: pq.ColumnSchema, where: str, field_id: int, kind: int, depth: int) -> None:
        if field_id == 1 and kind == 5:  # (type)
            physical = reader.integer()
            if physical != _PHYSICAL_TYPES.index(leaf.physical_type):
                found.append(
                    f"{where}: a physical type numbered {physical} (the column's is {leaf.physical_type})"
                )
        elif field_id == 4 and kind == 5:  # (codec)
            codec = reader.integer()
            if codec not in _CODECS_KNOWN:
                found.append(f"{where}: a compression codec numbered {codec}")
        elif field_id == 12 and kind == 12:  # (statistics)
            reader.struct(depth + 1, functools.partial(statistics_field, leaf, where))
        elif field_id == 16 and kind == 12:  # (size_statistics)
            reader.struct(depth + 1, functools.partial(size_field, leaf, where))
        else:
            reader.skip(kind, depth)

    def statistics_field(leaf: pq.ColumnSchema, where: str, field_id: int, kind: int, depth: int) -> None:
        width = (
            leaf.length
            if leaf.physical_type == "FIXED_LEN_BYTE_ARRAY"
            else _PHYSICAL_WIDTH.get(leaf.physical_type)
        )
        if field_id not in (1, 2, 5, 6) or kind != 8 or width is None:  # (max, min, max_value, min_value)
            reader.skip(kind, depth)
            return
        size = reader.varint()
        reader.skip_bytes(size)
        if size < width:
            found.append(f"{where}: a statistics' min or max of {size} bytes (a value of it takes {width})")

    def size_field(leaf: pq.ColumnSchema, where: str, field_id: int, kind: int, depth: int) -> None:
        if field_id == 1 and leaf.physical_type != "BYTE_ARRAY":
            found.append(f"{where}: an unencoded byte array size on a column of {leaf.physical_type}")
        if field_id not in (2, 3) or kind != 9:
            reader.skip(kind, depth)
            return
        counts, inner = reader.list_header()
        for _ in range(counts):
            reader.skip(inner, depth + 1)
        name, level = (
            ("repetition", leaf.max_repetition_level)
            if field_id == 2
            else ("definition", leaf.max_definition_level)
        )
        if counts and counts != level + 1:
            found.append(f"{where}: a {name} level histogram of {counts} levels (the column has {level + 1})")

    try:
        reader.struct(0, file_field)
    except _Malformed as exc:  # (Arrow parsed it: not expected)
        return f"a footer that does not parse: {exc}"
    return found[0] if found else None

"""Parquet files a hostile writer could make, built from files pyarrow writes: their footer decoded
(Thrift compact protocol, every field kept in order), edited and encoded again, and the last column's
pages replaced by forged ones (values of zeros compressed a piece at a time, so a page declaring
gigabytes is made without holding them).

`forge_zeros(path, rows=24, value_bytes=60 << 20, rows_per_page=24)` writes the file of the README's
known limit: 46 KiB holding 24 rows of 60 MiB of zeros in one plain-encoded page."""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

Field = list[Any]  # [field id, compact type, value]; a struct is a list of fields


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _zigzag(value: int) -> bytes:
    return _varint((value << 1) ^ (value >> 63))


class _Reader:
    def __init__(self, data: bytes, at: int = 0) -> None:
        self.data, self.at = data, at

    def byte(self) -> int:
        self.at += 1
        return self.data[self.at - 1]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    def integer(self) -> int:
        raw = self.varint()
        return (raw >> 1) ^ -(raw & 1)

    def value(self, kind: int) -> Any:
        if kind in (1, 2):
            return kind == 1
        if kind == 3:
            return self.byte()
        if kind in (4, 5, 6):
            return self.integer()
        if kind == 7:
            self.at += 8
            return self.data[self.at - 8 : self.at]
        if kind == 8:
            n = self.varint()
            self.at += n
            return self.data[self.at - n : self.at]
        if kind in (9, 10):
            head = self.byte()
            size, inner = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            items = [self.value(inner if inner not in (1, 2) else 3) for _ in range(size)]
            return (inner, items)
        if kind == 12:
            return self.struct()
        raise ValueError(f"Thrift type {kind} is not used in parquet footers")

    def struct(self) -> list[Field]:
        fields: list[Field] = []
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            delta, kind = head >> 4, head & 0x0F
            last = last + delta if delta else self.integer()
            fields.append([last, kind, self.value(kind)])


def _encode_value(kind: int, value: Any) -> bytes:
    if kind == 3:
        return bytes([value])
    if kind in (4, 5, 6):
        return _zigzag(value)
    if kind == 7:
        return bytes(value)
    if kind == 8:
        return _varint(len(value)) + bytes(value)
    if kind in (9, 10):
        inner, items = value
        head = (
            bytes([(len(items) << 4) | inner])
            if len(items) < 15
            else bytes([0xF0 | inner]) + _varint(len(items))
        )
        return head + b"".join(_encode_value(inner, item) for item in items)
    if kind == 12:
        return encode_struct(value)
    raise ValueError(kind)


def encode_struct(fields: list[Field]) -> bytes:
    out = bytearray()
    last = 0
    for field_id, kind, value in fields:
        delta = field_id - last
        if 0 < delta <= 15:
            out.append((delta << 4) | kind)
        else:
            out.append(kind)
            out += _zigzag(field_id)
        last = field_id
        if kind not in (1, 2):
            out += _encode_value(kind, value)
    out.append(0)
    return bytes(out)


def get(fields: list[Field], field_id: int) -> Any:
    return next(f[2] for f in fields if f[0] == field_id)


def put(fields: list[Field], field_id: int, kind: int, value: Any) -> None:
    for f in fields:
        if f[0] == field_id:
            f[1], f[2] = kind, value
            return
    fields.append([field_id, kind, value])
    fields.sort(key=lambda f: f[0])


def read_footer(data: bytes) -> tuple[list[Field], int]:
    """The file's FileMetaData and the byte where it starts."""
    assert data[-4:] == b"PAR1"
    length = struct.unpack("<I", data[-8:-4])[0]
    start = len(data) - 8 - length
    return _Reader(data, start).struct(), start


def with_footer(body: bytes, footer: list[Field]) -> bytes:
    encoded = encode_struct(footer)
    return body + encoded + struct.pack("<I", len(encoded)) + b"PAR1"


def column_meta(footer: list[Field], group: int, column: int) -> list[Field]:
    """The ColumnMetaData of a row group's column (edit it in place)."""
    row_group = get(footer, 4)[1][group]
    chunk = get(row_group, 1)[1][column]
    meta: list[Field] = get(chunk, 3)
    return meta


def page_header(uncompressed: int, compressed: int, values: int, v2_rows: int | None = None) -> bytes:
    """A version 1 data page header, PLAIN encoded, RLE levels; with `v2_rows`, a version 2 one
    (no levels) saying it holds that many rows."""
    if v2_rows is not None:
        v2 = [[1, 5, values], [2, 5, 0], [3, 5, v2_rows], [4, 5, 0], [5, 5, 0], [6, 5, 0]]
        return encode_struct([[1, 5, 3], [2, 5, uncompressed], [3, 5, compressed], [8, 12, v2]])
    data_page = [[1, 5, values], [2, 5, 0], [3, 5, 3], [4, 5, 3]]
    return encode_struct([[1, 5, 0], [2, 5, uncompressed], [3, 5, compressed], [5, 12, data_page]])


@functools.lru_cache(maxsize=4)
def _zstd_zeros(size: int) -> bytes:
    """A zstd frame of `size` zeros, compressed a MiB at a time."""
    sink = pa.BufferOutputStream()
    zeros = b"\0" * (1 << 20)
    with pa.CompressedOutputStream(sink, "zstd") as out:
        left = size
        while left:
            out.write(zeros[: min(left, len(zeros))])
            left -= min(left, len(zeros))
    return bytes(sink.getvalue())


def zstd_zeros_values(values: int, value_bytes: int, first: int | None = None) -> bytes:
    """`values` PLAIN byte arrays of `value_bytes` zeros (a required column: no levels), as zstd
    frames one after another (a frame of each value's length, a frame of its zeros: zstd decodes
    frames in a row as their bytes in a row); with `first`, each begins with its row's number
    (first, first + 1, ...) as 8 bytes, so that no two are equal."""
    numbered = first is not None
    zeros = _zstd_zeros(value_bytes - 8 if numbered else value_bytes)
    frames = []
    for i in range(values):
        head = struct.pack("<I", value_bytes) + (struct.pack("<Q", first + i) if first is not None else b"")
        frames.append(pa.compress(head, codec="zstd", asbytes=True) + zeros)
    return b"".join(frames)


def forge_zeros(
    path: Path,
    rows: int,
    value_bytes: int,
    rows_per_page: int,
    distinct: bool = False,
    v2_rows: int | None = None,
) -> Path:
    """A file of `rows` rows: `id`, `occurredAt` and, last, a required binary `note` of `value_bytes`
    zeros (`distinct`: but for the row's number in its first 8 bytes), plain encoded, zstd
    compressed, `rows_per_page` rows a page, one row group; with `v2_rows`, in version 2 pages each
    saying it holds that many rows."""
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": ["2024-01-01T00:10:00Z"] * rows,
            "note": pa.array([b""] * rows, pa.binary()),
        },
        schema=pa.schema(
            [("id", pa.string()), ("occurredAt", pa.string()), pa.field("note", pa.binary(), nullable=False)]
        ),
    )
    pq.write_table(table, path, compression="zstd", use_dictionary=False, write_statistics=False)
    data = path.read_bytes()
    footer, _ = read_footer(data)
    meta = column_meta(footer, 0, 2)
    start = get(meta, 9)
    body = bytearray(data[:start])
    uncompressed_total = compressed_total = 0
    pages: dict[int, bytes] = {}
    for first in range(0, rows, rows_per_page):
        count = min(rows_per_page, rows - first)
        if distinct:
            compressed = zstd_zeros_values(count, value_bytes, first)
        elif count not in pages:
            compressed = pages[count] = zstd_zeros_values(count, value_bytes)
        else:
            compressed = pages[count]
        uncompressed = count * (4 + value_bytes)
        header = page_header(uncompressed, len(compressed), count, v2_rows)
        body += header + compressed
        uncompressed_total += len(header) + uncompressed
        compressed_total += len(header) + len(compressed)
    put(meta, 6, 6, uncompressed_total)
    put(meta, 7, 6, compressed_total)
    path.write_bytes(with_footer(bytes(body), footer))
    return path


def with_v2_rows(path: Path, rows_claimed: int) -> Path:
    """`path` (one row group of one column, no dictionary page, version 2 pages) with each data page
    header saying it holds `rows_claimed` rows (at most its count of values), its bytes as written."""
    data = path.read_bytes()
    footer, _ = read_footer(data)
    assert len(get(footer, 4)[1]) == 1
    meta = column_meta(footer, 0, 0)
    start, length = get(meta, 9), get(meta, 7)
    reader = _Reader(data, start)
    body = bytearray(data[:start])
    while reader.at < start + length:
        header = reader.struct()
        payload = data[reader.at : reader.at + get(header, 3)]
        reader.at += len(payload)
        assert get(header, 1) == 3
        v2 = get(header, 8)
        put(v2, 3, 5, min(rows_claimed, get(v2, 1)))
        body += encode_struct(header) + payload
    put(meta, 6, 6, get(meta, 6) + len(body) - start - length)
    put(meta, 7, 6, len(body) - start)
    path.write_bytes(with_footer(bytes(body), footer))
    return path


def with_long_lists_in_page_headers(path: Path, elements: int, element_kind: int = 12) -> Path:
    """`path` (written by `forge_zeros`) with each page header of its last column given a field no
    reader knows (15) holding a list of `elements` empty elements of Thrift type `element_kind` (12:
    structs; 3: bytes), its pages' bytes as written."""
    data = path.read_bytes()
    footer, _ = read_footer(data)
    meta = column_meta(footer, 0, len(get(get(footer, 4)[1][0], 1)[1]) - 1)
    start, length = get(meta, 9), get(meta, 7)
    reader = _Reader(data, start)
    body = bytearray(data[:start])
    junk = bytes([0xF0 | element_kind]) + _varint(elements) + b"\0" * elements
    while reader.at < start + length:
        header = reader.struct()
        payload = data[reader.at : reader.at + get(header, 3)]
        reader.at += len(payload)
        assert max(f[0] for f in header) < 15
        body += encode_struct(header)[:-1] + bytes([0x09]) + _zigzag(15) + junk + b"\0" + payload
    put(meta, 6, 6, get(meta, 6) + len(body) - start - length)
    put(meta, 7, 6, len(body) - start)
    path.write_bytes(with_footer(bytes(body), footer))
    return path


def with_empty_pages(path: Path, pages: int, values: int = 0) -> Path:
    """`path` (written by `forge_zeros`) with `pages` data page headers of no bytes (11 bytes each)
    before the pages of its last column, each saying it holds `values` values (which its footer's
    count of values then includes)."""
    data = path.read_bytes()
    footer, _ = read_footer(data)
    meta = column_meta(footer, 0, len(get(get(footer, 4)[1][0], 1)[1]) - 1)
    start, length = get(meta, 9), get(meta, 7)
    body = data[:start] + page_header(0, 0, values) * pages + data[start : start + length]
    put(meta, 5, 6, get(meta, 5) + pages * values)
    put(meta, 7, 6, len(body) - start)
    path.write_bytes(with_footer(body, footer))
    return path


def with_dictionary_page_moved(path: Path, column: int, twice: bool) -> Path:
    """`path` (one row group, `column` its last, written with a dictionary and no compression) with
    the column's dictionary page written twice (`twice`) or after its data pages."""
    data = path.read_bytes()
    footer, _ = read_footer(data)
    meta = column_meta(footer, 0, column)
    start, length = get(meta, 11), get(meta, 7)
    reader = _Reader(data, start)
    pages = []
    while reader.at < start + length:
        first = reader.at
        header = reader.struct()
        reader.at += get(header, 3)
        pages.append(data[first : reader.at])
    chunk = pages[0] + pages[0] + b"".join(pages[1:]) if twice else b"".join(pages[1:]) + pages[0]
    put(meta, 6, 6, get(meta, 6) + len(chunk) - length)
    put(meta, 7, 6, len(chunk))
    if not twice:
        put(meta, 9, 6, start)
    path.write_bytes(with_footer(data[:start] + chunk, footer))
    return path


def with_first_page_damaged(
    path: Path, group: int, column: int, payload: bytes = b"", shrink: int = 0
) -> Path:
    """`path` with the first page of a row group's column chunk damaged in place (its length and every
    offset kept): its first bytes overwritten by `payload` (compressed bytes that do not decompress),
    or its header's uncompressed size made `shrink` bytes smaller (a page that decompresses to
    another size than its header says)."""
    data = bytearray(path.read_bytes())
    footer, _ = read_footer(bytes(data))
    meta = column_meta(footer, group, column)
    start = get(meta, 9)
    dictionary = next((f[2] for f in meta if f[0] == 11), 0)
    if 0 < dictionary < start:
        start = dictionary
    reader = _Reader(bytes(data), start)
    header = reader.struct()
    if shrink:
        put(header, 2, 5, get(header, 2) - shrink)
        encoded = encode_struct(header)
        assert len(encoded) == reader.at - start, "the header's length changed"
        data[start : reader.at] = encoded
    data[reader.at : reader.at + len(payload)] = payload
    path.write_bytes(bytes(data))
    return path


def with_dictionary_values(path: Path, group: int, column: int, values: int) -> Path:
    """`path` with a row group's column chunk's dictionary page header saying it holds `values` values
    (its bytes, its header's length and every offset kept)."""
    data = bytearray(path.read_bytes())
    footer, _ = read_footer(bytes(data))
    start = get(column_meta(footer, group, column), 11)
    reader = _Reader(bytes(data), start)
    header = reader.struct()
    put(get(header, 7), 1, 5, values)
    encoded = encode_struct(header)
    assert len(encoded) == reader.at - start, "the header's length changed"
    data[start : reader.at] = encoded
    path.write_bytes(bytes(data))
    return path

"""Deterministic parquet: the writer options are pinned here, so the same rows give the same bytes
with the same release of pyarrow (the footer's `created_by` names it)."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

WRITER_OPTIONS = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "version": "2.6",
    "data_page_version": "1.0",
    "row_group_size": 1 << 20,
    "data_page_size": 1 << 20,
    "write_page_index": False,
    "store_schema": True,
}


def encode(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **WRITER_OPTIONS)
    return sink.getvalue()


def decode(data: bytes, columns: tuple[str, ...] | None = None) -> pa.Table:
    """Read parquet bytes; with `columns`, only those of them the file has."""
    if columns is None:
        return pq.read_table(pa.BufferReader(data), use_threads=False)
    reader = pq.ParquetFile(pa.BufferReader(data))
    present = set(reader.schema_arrow.names)
    return reader.read(columns=[c for c in columns if c in present], use_threads=False)

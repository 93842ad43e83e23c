"""CSV source files for tests: records written as `sources.record_files` reads them back, and the
whole-file reader the streamed one is compared with."""

from __future__ import annotations

import csv
import io
import unicodedata
from typing import Any

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.sources.record_files import csv_integer_columns, csv_record, is_safe_integer


def csv_bytes(records: list[dict[str, Any]], columns: list[str]) -> bytes:
    """RFC 4180 CSV (CRLF line ends, UTF-8) of `records` under a header of `columns`: a missing or
    null field is an empty cell, booleans are `true`/`false`, anything else its `str`."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow(
            "" if value is None else "true" if value is True else "false" if value is False else str(value)
            for value in (record.get(name) for name in columns)
        )
    return out.getvalue().encode("utf-8")


def parse_csv(data: bytes) -> list[dict[str, Any]]:
    """Records of a whole CSV file, read at once: the reference the streamed CSV reader
    (`sources.streaming`) is held to (the mapping of `sources.record_files`' docstring)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput("source.uri", f"CSV is not UTF-8 (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        if any(not name for name in header):
            raise InvalidInput("source", "CSV header row has an empty column name")
        if len({unicodedata.normalize("NFKC", name).casefold() for name in header}) != len(header):
            raise InvalidInput("source", "CSV header row names a column twice")
        rows: list[list[str]] = []
        for row in reader:
            if not row or (len(row) == 1 and row[0] == ""):
                continue
            if len(row) > len(header):
                raise InvalidInput(
                    "source", f"CSV line {reader.line_num}: {len(row)} cells, the header has {len(header)}"
                )
            rows.append(row)
    except csv.Error as exc:
        raise InvalidInput("source", f"CSV line {reader.line_num}: {exc}") from None
    flags: dict[int, bool] = {}
    for row in rows:
        for i, cell in enumerate(row):
            if cell != "" and flags.get(i, True):
                flags[i] = is_safe_integer(cell)
    integer_columns = csv_integer_columns(header, flags)
    return [csv_record(header, row, integer_columns) for row in rows]

"""CSV source files for tests: records written as `sources.record_files` reads them back."""

from __future__ import annotations

import csv
import io
from typing import Any


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

"""Record files named by a request's `source`: JSONL (one JSON object a line) or parquet.

Relative paths resolve against the directory of the request file. Records read from a file are
treated exactly as if they had been given inline, so the plan and decision hashes are the same.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import format_instant
from pcbo_dagster.core.request_model import SourceRef, parse_json_strict

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def resolve_uri(uri: str, base_dir: Path | None) -> str:
    if "://" in uri or Path(uri).is_absolute() or base_dir is None:
        return uri
    return str((base_dir / uri).resolve())


def _jsonable(value: Any, column: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        delta = value - _EPOCH
        return format_instant((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list):
        return [_jsonable(v, column) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v, column) for k, v in value.items()}
    raise InvalidInput(f"source.{column}", f"values of type {type(value).__name__} cannot be read as JSON")


def load_records(ref: SourceRef, base_dir: Path | None) -> tuple[list[Any], bool, str]:
    """(records, may_hold_floats_or_big_ints, resolved uri)."""
    uri = resolve_uri(ref.uri, base_dir)
    fmt = ref.resolved_format()
    try:
        with fsspec.open(uri, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise InvalidInput("source.uri", f"no such file: {ref.uri}") from None
    except OSError as exc:
        raise InvalidInput("source.uri", f"cannot be read: {exc.__class__.__name__}") from None
    if fmt == "jsonl":
        records: list[Any] = []
        risky = False
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            parsed = parse_json_strict(line, what=f"source line {number}")
            records.append(parsed.value)
            risky = risky or parsed.may_hold_floats_or_big_ints
        return records, risky, uri
    if fmt == "parquet":
        import pyarrow as pa

        try:
            table = pq.read_table(pa.BufferReader(data))
        except pa.ArrowException as exc:
            raise InvalidInput("source.uri", f"not a readable parquet file: {exc}") from None
        rows = table.to_pylist()
        records = [{k: _jsonable(v, k) for k, v in row.items()} for row in rows]
        return records, True, uri
    raise InvalidInput("source.format", f"{fmt} sources are not supported yet; use jsonl or parquet")

"""Record files named by a request's `source`: JSONL (one JSON object a line), CSV or parquet. What
their readers (`streaming`, `hive_directories`) share: where a URI points, read errors, the CSV
mapping and a parquet row as JSON.

Local paths, `file://`, `s3://` and `gs://` URIs (object stores configured from the environment
as for lakes: `pcbo_dagster.lake.storage`). Relative paths resolve against the directory of the
request file. Records read from a file are treated exactly as if they had been given inline, so the
plan and decision hashes are the same as those of the equivalent inline request.

CSV (RFC 4180: comma, double quotes, UTF-8 with an optional BOM): the first row names the fields;
each later row is one record (blank lines skipped), values mapped deterministically:
- an empty cell means the field is absent;
- `consentGranted`: `true` and `false` become JSON booleans; any other text stays a string (and
  so is not consent);
- a column other than `id`, `occurredAt`, `retentionExpiresAt`, `jurisdiction` and
  `consentGranted` whose every non-empty cell is a canonical integer (`0` or `-?[1-9][0-9]*`, within
  +-(2^53-1)) becomes integers; otherwise every value of the column is a string;
- everything else is a string. A row with more cells than the header is invalid input.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import format_instant
from pcbo_dagster.io.redaction import is_store_error, redact_url

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@contextmanager
def source_read_errors(shown: str) -> Iterator[None]:
    """Opening or reading a source: a missing file, a missing fsspec backend or an unreadable store (an
    `OSError`, or the object store client's own error: an endpoint that does not answer, a bucket name
    it refuses) as `InvalidInput` on `source.uri` (the URI shown without credentials)."""
    try:
        yield
    except FileNotFoundError:
        raise InvalidInput("source.uri", f"no such file: {redact_url(shown)}") from None
    except ImportError as exc:
        raise InvalidInput(
            "source.uri", f"needs the optional package {exc.name} (pip install 'pcbo_dagster[lakes]')"
        ) from None
    except Exception as exc:
        if not (isinstance(exc, ValueError) or is_store_error(exc)):
            raise
        raise InvalidInput("source.uri", f"cannot be read: {exc.__class__.__name__}") from None


def resolve_uri(uri: str, base_dir: Path | None) -> str:
    if "://" in uri or Path(uri).is_absolute() or base_dir is None:
        return uri
    return str((base_dir / uri).resolve())


def _jsonable(value: Any, column: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            # No time zone: an instant nobody can place. It stays a string without an offset, which
            # the decisions treat as they treat such a string (occurredAt: INVALID_RECORD).
            return value.isoformat(timespec="microseconds" if value.microsecond else "seconds")
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


#: CSV columns that always stay strings (the known fields other than consent).
CSV_STRING_COLUMNS = frozenset({"id", "occurredAt", "retentionExpiresAt", "jurisdiction"})
CSV_BOOLEAN_COLUMN = "consentGranted"
_CSV_INTEGER = re.compile(r"0|-?[1-9][0-9]*")
_MAX_SAFE = 2**53 - 1


#: The longest text of a safe integer: `-9007199254740991`.
_MAX_SAFE_TEXT = len(str(-_MAX_SAFE))


def is_safe_integer(text: str) -> bool:
    """Whether a CSV cell is a canonical integer within +-(2^53-1); a longer text is not one, and is not
    converted (Python refuses to convert more than 4,300 digits: an internal error)."""
    return (
        len(text) <= _MAX_SAFE_TEXT
        and _CSV_INTEGER.fullmatch(text) is not None
        and abs(int(text)) <= _MAX_SAFE
    )


def csv_integer_columns(header: list[str], all_integer: dict[int, bool]) -> set[str]:
    """The columns read as integers; `all_integer[i]`: column i has a non-empty cell and every
    non-empty cell of it is a safe integer (absent: no non-empty cell)."""
    return {
        name
        for i, name in enumerate(header)
        if name not in CSV_STRING_COLUMNS and name != CSV_BOOLEAN_COLUMN and all_integer.get(i, False)
    }


def csv_record(header: list[str], row: list[str], integer_columns: set[str]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for name, cell in zip(header, row, strict=False):
        if cell == "":
            continue
        if name == CSV_BOOLEAN_COLUMN and cell in ("true", "false"):
            record[name] = cell == "true"
        elif name in integer_columns:
            if not is_safe_integer(cell):  # every cell was when the columns were decided
                raise InvalidInput(
                    f"source.{name}",
                    "a cell of this integer column is not an integer now: the file changed while it was read",
                )
            record[name] = int(cell)
        else:
            record[name] = cell
    return record


def jsonable_row(row: dict[str, Any]) -> dict[str, Any]:
    """A parquet row as the JSON record it stands for."""
    return {k: _jsonable(v, k) for k, v in row.items()}

"""How records become Arrow rows (CONTRACT section 7; the mapping the README documents).

Columns: `id` (string), `occurredAt` and `retentionExpiresAt` (timestamp[us, UTC]), then every other
field of the run's added records, sorted by name (UTF-8 bytes). A field's type is decided once per
run from the JSON types of its values over all added records, so every partition of a run has the
same schema:

- only booleans -> bool; only integers -> int64; integers and/or floats -> float64;
- only strings -> string; only nulls (or absent) -> string (all null);
- anything else (objects, arrays, or a mix such as strings and numbers) -> string holding the RFC 8785
  canonical JSON of each value.

Numbers are typed and written by their RFC 8785 form, as the plan hash sees them: a float with no
fraction within +-(2**53 - 1) (`1.0`, `1e0`, canonically `1`) is an integer, and `-0.0` (canonically
`0`) is written as `0`. So records with equal canonical forms give equal rows, and requests with the
same plan hash the same columns.

A field missing from a record is null in its row.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import repeat
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pcbo_dagster.core.canonical import is_integral_float, jcs
from pcbo_dagster.core.errors import InvalidInput

TIMESTAMP = pa.timestamp("us", tz="UTC")
ID = "id"
OCCURRED_AT = "occurredAt"
RETENTION_EXPIRES_AT = "retentionExpiresAt"
_FIXED = (ID, OCCURRED_AT, RETENTION_EXPIRES_AT)
_NONE = type(None)

#: The most fields the records of one request may name between them, by default
#: (`PCBO_MAX_RECORD_FIELDS`): each is a column of the lake's files (about 6 KB of memory a column to
#: write, and its metadata in every file and manifest).
DEFAULT_MAX_RECORD_FIELDS = 10_000


class FieldNames:
    """The fields the records of a request name between them (their objects' keys), counted a batch
    at a time: `InvalidInput` on `field` (`sourceRecords`, `source`) once they are more than `limit`,
    in pass 1, before anything is decided or written."""

    def __init__(self, field: str, limit: int = DEFAULT_MAX_RECORD_FIELDS) -> None:
        self.field = field
        self.limit = limit
        self.names: set[str] = set()

    def add(self, records: Iterable[Any]) -> None:
        self.names.update(*(record for record in records if isinstance(record, dict)))
        if len(self.names) > self.limit:
            raise InvalidInput(
                self.field,
                f"the records name more than {self.limit} fields between them (PCBO_MAX_RECORD_FIELDS; "
                "each would be a column of the lake's files)",
            )


def _kinds(values: list[Any]) -> set[type]:
    """The JSON types of `values` as the schema counts them: a float that RFC 8785 writes as an
    integer (`is_integral_float`) counts as an int."""
    kinds = set(map(type, values))
    if float in kinds and not any(type(v) is float and not is_integral_float(v) for v in values):
        kinds.discard(float)
        kinds.add(int)
    return kinds


def _column_array(values: list[Any], arrow_type: pa.DataType) -> pa.Array:
    """`values` of one field as an Arrow column of `arrow_type` (the run schema's): into int64, the
    floats among them are integral (`_kinds`) and convert exactly; in float64, `-0.0` becomes `0.0`
    (its RFC 8785 form is `0`)."""
    array = pa.array(values, arrow_type)
    if pa.types.is_floating(arrow_type):
        array = pc.add(array, pa.scalar(0.0, arrow_type))  # IEEE 754: -0.0 + 0.0 == +0.0
    return array


def _type_of_kinds(kinds: set[type]) -> pa.DataType | None:
    kinds = kinds - {_NONE}
    if not kinds or kinds == {str}:
        return pa.string()
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return None


class SchemaBuilder:
    """`run_schema` a batch of rows at a time: the JSON types seen per field, merged."""

    def __init__(self) -> None:
        self.kinds: dict[str, set[type]] = {}

    def add(self, rows: list[dict[str, Any]]) -> None:
        # A field's values pulled out once, their types collected in C (`map`); a row without the
        # field adds NoneType, which plays no part in the type (`_type_of_kinds`).
        kinds = self.kinds
        for name in set().union(*rows):
            seen = kinds.get(name)
            if seen is None:
                kinds[name] = seen = set()
            seen.update(_kinds(list(map(dict.get, rows, repeat(name)))))

    def result(self) -> tuple[pa.Schema, dict[str, bool]]:
        fields = [
            pa.field(ID, pa.string(), nullable=False),
            pa.field(OCCURRED_AT, TIMESTAMP, nullable=False),
            pa.field(RETENTION_EXPIRES_AT, TIMESTAMP),
        ]
        as_json: dict[str, bool] = {}
        for name in sorted(set(self.kinds).difference(_FIXED)):
            arrow_type = _type_of_kinds(self.kinds[name])
            as_json[name] = arrow_type is None
            fields.append(pa.field(name, arrow_type or pa.string()))
        return pa.schema(fields), as_json


def run_schema(rows: list[dict[str, Any]]) -> tuple[pa.Schema, dict[str, bool]]:
    """The run's schema and, per extra field, whether it is stored as canonical JSON text."""
    builder = SchemaBuilder()
    builder.add(rows)
    return builder.result()


class PrebuiltRows(list[Any]):
    """Rows (records) whose extra columns were already built (`AddedColumns.rows_for`): `build_table`
    takes these columns instead of pulling the fields out of the records again."""

    def __init__(
        self, rows: list[Any], columns: dict[str, pa.Array], schema: pa.Schema, as_json: dict[str, bool]
    ) -> None:
        super().__init__(rows)
        self.columns, self.schema, self.as_json = columns, schema, as_json


class AddedColumns:
    """Every extra field of a run's added records built once, as one Arrow column each, with the run's
    schema (`run_schema`: the same types, from the same values): a partition's columns are then
    slices of these, not rebuilt from the records (issue 18: build each column once).

    `rows` are the records at `locators` (input positions), in output order; `n_records` the number
    of input records."""

    def __init__(self, rows: list[dict[str, Any]], locators: np.ndarray, n_records: int) -> None:
        locators = np.asarray(locators, dtype=np.int64)
        # The fields are pulled out in input order (the records' order in memory: output order jumps
        # about the heap, which costs twice the time), then each column is put in output order.
        order = np.argsort(locators, kind="stable")
        in_order = bool((order == np.arange(len(order))).all())
        rows = rows if in_order else list(map(rows.__getitem__, order.tolist()))
        builder = SchemaBuilder()
        values: dict[str, list[Any]] = {}
        for name in set().union(*rows).difference(_FIXED):
            values[name] = list(map(dict.get, rows, repeat(name)))
            builder.kinds[name] = _kinds(values[name])
        self.schema, self.as_json = builder.result()
        output = None if in_order else pa.array(np.argsort(order, kind="stable"), pa.int64())
        self.columns: dict[str, pa.Array] = {}
        for field in self.schema:
            if field.name in _FIXED:
                continue
            column = values.pop(field.name)
            if self.as_json[field.name]:
                column = [_json_text(v) for v in column]
            array = _column_array(column, field.type)
            self.columns[field.name] = array if output is None else array.take(output)
        self.position = np.full(n_records, -1, dtype=np.int64)
        self.position[locators] = np.arange(len(locators), dtype=np.int64)

    def rows_for(self, rows: list[Any], locators: np.ndarray) -> list[Any]:
        """`rows` (the records at `locators`) as `PrebuiltRows` when every one of them is among the
        added records built here, else `rows` as they are."""
        if not len(locators):
            return rows
        at = self.position[np.asarray(locators, dtype=np.int64)]
        if (at < 0).any():
            return rows
        first = int(at[0])
        if int(at[-1]) - first + 1 == len(at) and bool((np.diff(at) == 1).all()):
            columns = {name: array.slice(first, len(at)) for name, array in self.columns.items()}
        else:
            take = pa.array(at, pa.int64())
            columns = {name: array.take(take) for name, array in self.columns.items()}
        return PrebuiltRows(rows, columns, self.schema, self.as_json)


def _json_text(value: Any) -> str | None:
    return None if value is None else jcs(value).decode("utf-8")


def _as_timestamps(micros: pa.Array) -> pa.Array:
    """Microseconds since the epoch (int64, or any type that casts to it) as TIMESTAMP values. An
    int64 array is reinterpreted in place (`view`: the two types share their layout, as Arrow's own
    int64 -> timestamp cast does), without the cast kernel's call per partition."""
    if isinstance(micros, pa.Array) and micros.type == pa.int64():
        return micros.view(TIMESTAMP)
    return micros.cast(pa.int64()).cast(TIMESTAMP)


def build_table(
    rows: list[dict[str, Any]],
    ids: list[str],
    occurred_us: np.ndarray,
    retention_us: pa.Array,
    schema: pa.Schema,
    as_json: dict[str, bool],
) -> pa.Table:
    """Arrow table for `rows` (already in output order) with the run's schema."""
    arrays: list[pa.Array] = [
        pa.array(ids, pa.string()),
        _as_timestamps(pa.array(occurred_us, pa.int64())),
        _as_timestamps(retention_us),
    ]
    columns = (
        rows.columns
        if isinstance(rows, PrebuiltRows) and rows.schema.equals(schema) and rows.as_json == as_json
        else None
    )
    for field in schema:
        if field.name in _FIXED:
            continue
        if columns is not None:
            arrays.append(columns[field.name])
            continue
        values = [row.get(field.name) for row in rows]
        if as_json[field.name]:
            values = [_json_text(v) for v in values]
        arrays.append(_column_array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)

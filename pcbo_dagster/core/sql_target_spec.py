"""A SQL table as the target of a backfill (issue 15): the `target` block of a request or a dataset.

```json
"target": {"kind": "sql", "url": "postgresql://loader@db.internal:5432/warehouse",
           "table": "public.events", "key": ["id"], "conflict": "fail",
           "columns": {"id": "id", "occurredAt": "occurred_at", "amount": "amount"},
           "freshnessColumn": "updated_at", "allowNewer": false,
           "deletedColumn": "deleted_at", "snapshotAt": "2024-02-01T00:00:00Z", "chunkRows": 1000}
```

- `url`: `postgresql://` (production; the password from `PGPASSWORD` or `~/.pgpass`, never in a file)
  or `sqlite:///path` (the embedded default; a relative path resolves like a request's `source.uri`).
- `table`: `name` or `schema.name`; identifiers are quoted as given (case matters).
- `key`: the columns identifying a row; a unique index (or primary key) on exactly them must exist,
  and they must include the column `id` is written to (a row is a record: the Merkle root, the
  journal and the conflict matrix are per id).
- `conflict`: what to do with a key present with different values: `skip` (leave it), `overwrite`
  (update it) or `fail` (the default: execute is blocked, exit 3, while any such record exists).
- `columns`: record field -> column; only these fields are written. Default: every field of the
  run's records to the column of the same name (a field without one is invalid input).
- `freshnessColumn` / `allowNewer`: a row whose column is later than `snapshotAt` belongs to the
  live pipeline and is left alone (`refused_newer`) unless `allowNewer`.
- `deletedColumn`: the target keeps tombstones (the column is set when a key is deleted); a key
  deleted after `snapshotAt` is not resurrected (`refused_deleted`).
- `snapshotAt`: the instant the source was taken; required with either column.
- `chunkRows`: rows a transaction applies (and a checkpoint covers).

Pure: no connection is made here (`targets/sql_table.py` opens the table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from pcbo_dagster.core.instants import format_instant, parse_instant

IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
TABLE_PATTERN = r"^([A-Za-z_][A-Za-z0-9_]{0,62}\.)?[A-Za-z_][A-Za-z0-9_]{0,62}$"
#: Rows per transaction (and per checkpoint) unless `chunkRows` says otherwise.
DEFAULT_CHUNK_ROWS = 1000
SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "postgresql+psycopg")

Identifier = Annotated[StrictStr, Field(pattern=IDENTIFIER_PATTERN)]


class TargetFieldError(ValueError):
    """A target validation failure naming its field (relative to the `target` block)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(message)


class SqlTargetSpec(BaseModel):
    """The `target` block naming a SQL table (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sql"]
    url: Annotated[StrictStr, Field(min_length=1)]
    table: Annotated[StrictStr, Field(pattern=TABLE_PATTERN)]
    key: Annotated[list[Identifier], Field(min_length=1, max_length=16)]
    conflict: Literal["skip", "overwrite", "fail"] = "fail"
    columns: dict[Annotated[StrictStr, Field(min_length=1)], Identifier] | None = None
    freshnessColumn: Identifier | None = None
    allowNewer: StrictBool = False
    deletedColumn: Identifier | None = None
    snapshotAt: StrictStr | None = None
    chunkRows: Annotated[StrictInt, Field(ge=1, le=100_000)] = DEFAULT_CHUNK_ROWS

    @model_validator(mode="after")
    def _check(self) -> SqlTargetSpec:
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        if scheme not in SQL_SCHEMES:
            raise TargetFieldError("url", "must be a postgresql:// or sqlite:/// URL")
        if len(set(self.key)) != len(self.key):
            raise TargetFieldError("key", "names a column twice")
        if self.columns is not None:
            targets = list(self.columns.values())
            if len(set(targets)) != len(targets):
                raise TargetFieldError("columns", "maps two fields to one column")
            if "id" not in self.columns:
                raise TargetFieldError("columns", "must write id (the record's identity) to a key column")
        if self.snapshotAt is not None and parse_instant(self.snapshotAt) is None:
            raise TargetFieldError(
                "snapshotAt", "must be an ISO-8601 instant with seconds and an explicit offset"
            )
        if (self.freshnessColumn or self.deletedColumn) and self.snapshotAt is None:
            raise TargetFieldError(
                "snapshotAt", "is required with freshnessColumn or deletedColumn (the source's snapshot)"
            )
        if self.allowNewer and self.freshnessColumn is None:
            raise TargetFieldError("allowNewer", "only applies with a freshnessColumn")
        if self.freshnessColumn is not None and self.freshnessColumn == self.deletedColumn:
            raise TargetFieldError("deletedColumn", "must differ from freshnessColumn")
        return self

    @property
    def snapshot_us(self) -> int | None:
        return None if self.snapshotAt is None else parse_instant(self.snapshotAt)

    @property
    def id_column(self) -> str:
        """The column a record's `id` is written to."""
        return self.columns["id"] if self.columns is not None else "id"

    def column_for(self, field: str) -> str:
        """The column a record field is written to (the field's own name without `columns`)."""
        if self.columns is None:
            return field
        return self.columns[field]

    def resolved(self, base_dir: Path | None) -> SqlTargetSpec:
        """This target with a relative SQLite path made absolute against `base_dir` (as a request's
        relative `source.uri` is: against the request file's directory)."""
        prefix = "sqlite:///"
        if base_dir is None or not self.url.startswith(prefix):
            return self
        path = self.url[len(prefix) :].split("?", 1)[0]
        if not path or path == ":memory:" or Path(path).is_absolute():
            return self
        return self.model_copy(update={"url": prefix + str((base_dir / path).resolve())})

    def descriptor(self, location: str, schema_table: str) -> dict[str, Any]:
        """What the decision hash pins about the target: where (`location`: the URL without
        credentials), which table, and every setting that changes what is written."""
        return {
            "kind": "sql",
            "location": location,
            "table": schema_table,
            "key": list(self.key),
            "conflict": self.conflict,
            "columns": None if self.columns is None else dict(sorted(self.columns.items())),
            "freshnessColumn": self.freshnessColumn,
            "allowNewer": self.allowNewer,
            "deletedColumn": self.deletedColumn,
            "snapshotAt": None if self.snapshot_us is None else format_instant(self.snapshot_us),
            "chunkRows": self.chunkRows,
        }

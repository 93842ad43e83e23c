"""A SQL table as a backfill target (issue 15): capability checks, the live rows, the chunked apply
with its row-by-row fallback, the rollback journal, checkpoints, restore and the rollback script.

**Capability checks** (`SqlTable.open`, before anything is read or written; invalid input naming the
field otherwise): the table exists and is not one of pcbo's own (`PCBO_TABLES`, or the catalog's
where the catalog lives: `CATALOG_TABLES`); every written field has a column whose type holds the
run's values exactly (`sql_dialects.refusal`: a clear message naming the column); the key columns
are written, include `id`'s column and carry a primary key or a full unique index on exactly them;
the freshness and tombstone columns exist and hold instants; and for a write, the connecting role
may SELECT, INSERT, UPDATE and DELETE the table.

**Apply** (`apply_chunk`): one transaction per chunk of a partition's adds (`chunkRows`, in id order):
the chunk's live rows are locked (`SELECT ... FOR UPDATE`; SQLite: `BEGIN IMMEDIATE` holds the
database), each row's live state is compared with the one the decision was made on (a row changed
since is a failure, never written over), then the journal entries, the inserts and updates, and the
chunk's checkpoint are written, and committed together. When a statement fails (a type error, a
constraint), the transaction is rolled back and the chunk is applied again row by row, each row in
its own savepoint: a row the database refuses is rolled back to its savepoint and recorded with the
database's error (SQLSTATE and message), the others are applied.

**The journal** lives in the target database, in `pcbo_journal` beside the table (the same
transaction as the change can only be there): one entry per changed row, with
the row's exact prior image (or none: inserted), the digest of the whole row as the insert or
update left it, every column (`inserted` / `updated`: its undo deletes the whole row or writes
prior values over it, so it must still be that row, not one the live pipeline wrote since), the columns
changed, the live state the decision was made on and the digest of the row written. Entries are
chained per (run, table): `digest_n = sha256(digest_{n-1} "\\n" JCS(entry_n))` from
`JOURNAL_GENESIS`. The three tables' `run_id` column holds the run's *journal key*
(`ChainState.sql_journal_key`): `<runId>@<event hash of its first sql_apply_intent into the table>`,
a position on the deployment's own chain, so two deployments (two homes, catalogs and chains) that
write one table with one run id never read, resume or undo each other's entries; the bare run id
for runs begun before (their first intent has no `journal_scope`), read as they were written.
`pcbo_checkpoints` holds one row per applied chunk (written in the chunk's transaction): the plan
hash, the target's digest, the journal's length and digest after the chunk, and the chunk's rows
with their outcomes (`chunk_rows`), counts, failures and applied rows (the counts and applied rows
follow from the rows and failures: `chunk_claims`, how the engine checks a checkpoint it did not
just write).
`pcbo_rollbacks` holds one row per undone apply (written in the restoring transaction). The three
tables are append-only (triggers refuse UPDATE, DELETE, REPLACE, TRUNCATE), created with the
table's first apply (the role needs CREATE on the schema once, or a DBA creates them with
`journal_ddl`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from pcbo_dagster.catalog.database import (
    PG_SEARCH_PATH,
    pg_guard_trigger_definition,
    pg_replica_session,
    pg_trigger_asleep,
    sqlite_trigger_problems,
    write_connection,
)
from pcbo_dagster.catalog.schema import metadata as catalog_metadata
from pcbo_dagster.core.canonical import fast_jcs, prefixed
from pcbo_dagster.core.errors import IntegrityError as PcboIntegrityError
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import format_instant, to_datetime
from pcbo_dagster.core.record_table import TIMESTAMP as ARROW_TIMESTAMP
from pcbo_dagster.core.sql_outcomes import (
    BOOLEAN,
    CONFLICT,
    FLOAT,
    INSERT,
    INTEGER,
    INVALID_KEY,
    JSON_TEXT,
    REFUSED_DELETED,
    REFUSED_NEWER,
    SKIP_CONFLICT,
    SKIP_EQUAL,
    STRING,
    TIMESTAMP,
    UPDATE,
    LiveState,
    canonical_value,
    classify,
    key_text,
    live_state,
    row_digest,
)
from pcbo_dagster.core.sql_target_spec import SqlTargetSpec
from pcbo_dagster.io.redaction import scrub_text
from pcbo_dagster.targets import sql_dialects as d
from pcbo_dagster.targets.sql_dialects import POSTGRESQL, SQLITE, ColumnInfo, quote

JOURNAL_TABLE = "pcbo_journal"
CHECKPOINT_TABLE = "pcbo_checkpoints"
ROLLBACK_TABLE = "pcbo_rollbacks"
PCBO_TABLES = (JOURNAL_TABLE, CHECKPOINT_TABLE, ROLLBACK_TABLE)
#: The tables of pcbo's catalog, never a target where they are the catalog's: in a schema that also
#: holds `CATALOG_SIGNATURE` (whatever URL, alias or path names that database).
CATALOG_TABLES = frozenset(catalog_metadata.tables) | {"alembic_version"}
CATALOG_SIGNATURE = "audit_chain_heads"
JOURNAL_GENESIS = prefixed(hashlib.sha256(b"pcbo.sql-journal/1").hexdigest())
#: The live state of a key that names more than one row (the table's key is no longer unique, or
#: PostgreSQL rows of an inheriting table): equal to no record, decided and read back as a changed row.
AMBIGUOUS = "ambiguous: the key names more than one row"
AMBIGUOUS_STATE = LiveState(AMBIGUOUS, None, None, AMBIGUOUS)
#: Rows a statement names at once when rows are read by key.
READ_BATCH = 1000
#: The body of the PostgreSQL trigger function of the append-only triggers (`journal_ddl`).
APPEND_ONLY_BODY = " BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END "
#: Key of the advisory lock taken while the pcbo tables are created (PostgreSQL).
_DDL_LOCK_KEY = 0x7063626F4A524E4C


def chain_journal_digest(previous: str, entry_text: bytes) -> str:
    """The journal digest after one more entry (its RFC 8785 text)."""
    return prefixed(hashlib.sha256(previous.encode("ascii") + b"\n" + entry_text).hexdigest())


@dataclass(frozen=True)
class WrittenColumn:
    """A record field written to a column, and the kind of its values in this run."""

    field: str
    column: ColumnInfo
    kind: str


@dataclass
class PlannedRow:
    """One added record on its way into the table: its key and values as the database takes them,
    their canonical digests, and the outcome decided against the live row."""

    id: str
    key_values: tuple[Any, ...]
    key_text: str
    values: list[Any]
    record_digest: str
    key_refusal: str | None = None  # why the key cannot name a row (`invalid_key`)
    outcome: str = ""
    live: LiveState | None = None


@dataclass
class LiveRow:
    state: LiveState
    image: dict[str, Any]


@dataclass
class ChunkResult:
    """What a chunk did: counts, failed rows (with the database's error), the rows now in the table
    as the records have them (`applied`: id, key text, digest), and the journal after it; `rows`:
    every row of the chunk with its outcome (`chunk_rows`), from which the counts and the applied
    rows follow (`chunk_claims`) and which the apply intent's digests bind to the chain."""

    counts: dict[str, int]
    failures: list[dict[str, Any]]
    applied: list[list[str]]
    journal_seq: int
    journal_digest: str
    fallback: bool = False
    rows: list[list[Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "failures": self.failures,
            "applied": self.applied,
            "fallback": self.fallback,
            "rows": self.rows,
        }


@dataclass(frozen=True)
class ChunkContext:
    """Where a chunk belongs: the run (its journal key, `ChainState.sql_journal_key`), the partition,
    the apply intent's chain position and the chunk's index, the hashes a resume is held to, and the
    journal before the chunk."""

    run_id: str
    partition_key: str
    intent_seq: int
    chunk: int
    plan_hash: str
    target_digest: str
    journal_seq: int
    journal_digest: str


@dataclass
class Checkpoint:
    partition_key: str
    intent_seq: int
    chunk: int
    plan_hash: str
    target_digest: str
    journal_seq: int
    journal_digest: str
    result: dict[str, Any]


def empty_counts() -> dict[str, int]:
    return {"inserted": 0, "updated": 0, "skipped": 0, "refused": 0, "failed": 0}


def chunk_rows(rows: Sequence[PlannedRow]) -> list[list[Any]]:
    """A chunk's rows as its checkpoint records them (id order): `[id, key text, row digest,
    outcome, liveDigest | null]` — the first three are the apply intent's `rows_digest` items, the
    id, outcome and live digest its `outcomes_digest` items."""
    return [
        [r.id, r.key_text, r.record_digest, r.outcome, None if r.live is None else r.live.live_digest]
        for r in rows
    ]


def chunk_claims(
    rows: Sequence[Sequence[Any]], failed: Collection[str]
) -> tuple[dict[str, int], list[list[str]]]:
    """What a chunk did, from its rows (`chunk_rows`) and the ids of those that failed: its counts and
    its applied rows (`[id, key text, row digest]`, sorted: written and equal rows). The apply writes
    its checkpoint with these; verify, repair and a resume derive them again to check one."""
    counts = empty_counts()
    applied: list[list[str]] = []
    for record_id, key, digest, outcome, _ in rows:
        if record_id in failed:
            continue
        if outcome in (INSERT, UPDATE):
            counts["inserted" if outcome == INSERT else "updated"] += 1
        elif outcome in (SKIP_EQUAL, SKIP_CONFLICT):
            counts["skipped"] += 1
        elif outcome in (REFUSED_NEWER, REFUSED_DELETED):
            counts["refused"] += 1
        if outcome in (INSERT, UPDATE, SKIP_EQUAL):
            applied.append([record_id, key, digest])
    counts["failed"] = len(failed)
    return counts, sorted(applied)


def _kind_of(field_type: pa.DataType, as_json: bool) -> str:
    if as_json:
        return JSON_TEXT
    if pa.types.is_timestamp(field_type):
        return TIMESTAMP
    if pa.types.is_boolean(field_type):
        return BOOLEAN
    if pa.types.is_integer(field_type):
        return INTEGER
    if pa.types.is_floating(field_type):
        return FLOAT
    return STRING


class SqlTable:
    """An opened, checked target table (`SqlTable.open`)."""

    def __init__(
        self,
        spec: SqlTargetSpec,
        url: str,
        engine: Engine,
        schema: str,
        name: str,
        columns: dict[str, ColumnInfo],
        written: list[WrittenColumn],
    ) -> None:
        self.spec = spec
        self.url = url
        self.engine = engine
        self.dialect = engine.dialect.name
        self.schema, self.name = schema, name
        self.columns = columns
        self.written = written
        by_column = {w.column.name: w for w in written}
        self.key = [by_column[c] for c in spec.key]
        self.freshness = columns.get(spec.freshnessColumn) if spec.freshnessColumn else None
        self.deleted = columns.get(spec.deletedColumn) if spec.deletedColumn else None
        self.location = d.location_of(url)
        #: The table as the chain, the journal and the catalog name it.
        self.qualified = f"{schema}.{name}"
        self.ref = f"{self.location}#{self.qualified}"
        self._sql_table = f"{quote(schema)}.{quote(name)}" if self.dialect == POSTGRESQL else quote(name)

    # -- opening and checking -------------------------------------------------------------------

    @classmethod
    def open(
        cls, spec: SqlTargetSpec, url: str, schema: pa.Schema, as_json: dict[str, bool], write: bool
    ) -> SqlTable:
        """Open the target and run the capability checks (module doc) for the run's `schema`."""
        engine = d.open_engine(url, read_only=not write)
        try:
            with engine.connect() as conn, conn.begin():
                d.catalog_path_only(conn)
                resolved = d.resolve_table(conn, spec.table)
                if resolved is None:
                    raise InvalidInput("target.table", f"no table {spec.table} in {d.location_of(url)}")
                schema_name, name = resolved
                if name in PCBO_TABLES:
                    raise InvalidInput(
                        "target.table",
                        f"{spec.table} is pcbo's own journal table (beside every target table): "
                        "a backfill never writes it",
                    )
                if name in CATALOG_TABLES and d.table_exists(conn, schema_name, CATALOG_SIGNATURE):
                    raise InvalidInput(
                        "target.table",
                        f"{spec.table} is a table of pcbo's catalog (in {d.location_of(url)}): "
                        "a backfill never writes it",
                    )
                columns = {c.name: c for c in d.table_columns(conn, schema_name, name)}
                written = cls._written_columns(spec, schema, as_json, columns, engine.dialect.name)
                cls._check_key(spec, written, d.unique_column_sets(conn, schema_name, name))
                for field_name, column_name in (
                    ("freshnessColumn", spec.freshnessColumn),
                    ("deletedColumn", spec.deletedColumn),
                ):
                    if column_name is None:
                        continue
                    if column_name not in columns:
                        raise InvalidInput(
                            f"target.{field_name}", f"table {spec.table} has no column {column_name!r}"
                        )
                    why = d.instant_refusal(engine.dialect.name, columns[column_name])
                    if why is not None:
                        raise InvalidInput(f"target.{field_name}", why)

                def refuse_missing(table: str, needed: tuple[str, ...], what: str = "") -> None:
                    missing = d.missing_privileges(conn, schema_name, table, needed)
                    if missing:
                        raise InvalidInput(
                            "target.url",
                            f"the role {d.current_role(conn)!r} may not {', '.join(missing)} "
                            f"table {schema_name}.{table}{what}",
                        )

                if write:
                    refuse_missing(name, ("SELECT", "INSERT", "UPDATE", "DELETE"))
                # pcbo's tables beside it, once an apply made them: read by every evaluation, appended
                # to by every apply
                for pcbo_table in PCBO_TABLES:
                    if d.table_exists(conn, schema_name, pcbo_table):
                        refuse_missing(
                            pcbo_table,
                            ("SELECT", "INSERT") if write else ("SELECT",),
                            " (pcbo's journal beside the target table)",
                        )
        except BaseException:
            engine.dispose()
            raise
        return cls(spec, url, engine, schema_name, name, columns, written)

    @classmethod
    def reopen(cls, url: str, layout: Mapping[str, Any], write: bool) -> SqlTable:
        """The table an apply wrote, from the layout its intent recorded on the chain (`rollback` and
        `verify` work without the request); `InvalidInput` on `target.url` when it is not there."""
        engine = d.open_engine(url, read_only=not write)
        try:
            with engine.connect() as conn, conn.begin():
                d.catalog_path_only(conn)
                resolved = d.resolve_table(conn, str(layout["table"]))
                if resolved is None:
                    raise InvalidInput("target.url", f"no table {layout['table']} in {d.location_of(url)}")
                if ".".join(resolved) != layout["table"]:  # never another table's rows and journal
                    raise InvalidInput(
                        "target.url",
                        f"{layout['table']} in {d.location_of(url)} resolves to the table "
                        f"{'.'.join(resolved)}, not the one the audit chain records",
                    )
                columns = {c.name: c for c in d.table_columns(conn, *resolved)}
        except BaseException:
            engine.dispose()
            raise
        missing = [c for _, c, _ in layout["written"] if c not in columns]
        if missing:
            engine.dispose()
            raise InvalidInput(
                "target.url", f"table {layout['table']} lost its column(s) {', '.join(missing)}"
            )
        written = [WrittenColumn(f, columns[c], kind) for f, c, kind in layout["written"]]
        spec = SqlTargetSpec.model_construct(
            kind="sql",
            url=url,
            table=str(layout["table"]),
            key=list(layout["key"]),
            conflict="fail",
            columns={f: c for f, c, _ in layout["written"]},
            freshnessColumn=layout.get("freshness_column"),
            allowNewer=False,
            deletedColumn=layout.get("deleted_column"),
            snapshotAt=None,
            chunkRows=1,
        )
        return cls(spec, url, engine, resolved[0], resolved[1], columns, written)

    @staticmethod
    def _written_columns(
        spec: SqlTargetSpec,
        schema: pa.Schema,
        as_json: dict[str, bool],
        columns: dict[str, ColumnInfo],
        dialect: str,
    ) -> list[WrittenColumn]:
        fields = {f.name: f for f in schema}
        chosen = list(spec.columns) if spec.columns is not None else list(fields)
        written = []
        for name in chosen:
            where = f"target.columns.{name}" if spec.columns is not None else "target.columns"
            column_name = spec.column_for(name)
            if column_name not in columns:
                raise InvalidInput(
                    where,
                    f"record field {name!r} has no column {column_name!r} in table {spec.table} "
                    "(target.columns chooses the fields written and their columns)",
                )
            arrow = fields.get(name)
            kind = STRING if arrow is None else _kind_of(arrow.type, as_json.get(name, False))
            why = d.refusal(dialect, columns[column_name], kind)
            if why is not None:
                raise InvalidInput(where, f"{why} (record field {name!r})")
            written.append(WrittenColumn(name, columns[column_name], kind))
        return sorted(written, key=lambda w: w.column.name.encode("utf-8"))

    @staticmethod
    def _check_key(spec: SqlTargetSpec, written: list[WrittenColumn], unique_sets: list[set[str]]) -> None:
        written_columns = {w.column.name for w in written}
        for column in spec.key:
            if column not in written_columns:
                raise InvalidInput("target.key", f"key column {column!r} is not written by the backfill")
        if spec.id_column not in spec.key:
            raise InvalidInput(
                "target.key", f"must include {spec.id_column!r}, the column a record's id is written to"
            )
        if set(spec.key) not in unique_sets:
            raise InvalidInput(
                "target.key",
                f"table {spec.table} has no primary key or unique index on exactly ({', '.join(spec.key)})",
            )

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self.engine.connect() as raw:
            conn = write_connection(raw)
            with conn.begin():
                yield conn

    # -- records as rows ------------------------------------------------------------------------

    def planned_rows(self, table: pa.Table) -> list[PlannedRow]:
        """The rows of the records in `table` (`record_table.build_table` of a partition's adds, the
        parquet mapping): values as the database takes them and canonical digests."""
        columns_db: list[list[Any]] = []
        columns_canonical: list[list[Any]] = []
        for w in self.written:
            array = table.column(w.field) if w.field in table.column_names else pa.nulls(table.num_rows)
            if w.kind == TIMESTAMP:
                micros = array.cast(ARROW_TIMESTAMP).cast(pa.int64()).to_pylist()
                canonical: list[Any] = [None if m is None else format_instant(m) for m in micros]
                db: list[Any] = (
                    canonical
                    if d.instants_as_text(self.dialect, w.column)
                    else [None if m is None else to_datetime(m) for m in micros]
                )
            else:
                db = array.to_pylist()
                canonical = db if w.kind != FLOAT else [None if v is None else float(v) for v in db]
                if w.kind == FLOAT:
                    db = [d.number_bind(self.dialect, w.column, v) for v in canonical]
            columns_db.append(db)
            columns_canonical.append(canonical)
        key_at = [self.written.index(k) for k in self.key]
        ids = table.column("id").to_pylist()
        rows = []
        for i, record_id in enumerate(ids):
            values = [column[i] for column in columns_db]
            canonical = [column[i] for column in columns_canonical]
            key_values = tuple(values[j] for j in key_at)
            refusal = self._key_refusal([values[j] for j in key_at])
            rows.append(
                PlannedRow(
                    id=record_id,
                    key_values=key_values,
                    key_text=key_text([canonical[j] for j in key_at]),
                    values=values,
                    record_digest=row_digest(canonical),
                    key_refusal=refusal,
                )
            )
        return rows

    def _key_refusal(self, key_values: Sequence[Any]) -> str | None:
        """Why a record's key values cannot name a row (None: they can): a null, or a NUL in a text
        PostgreSQL cannot hold (the driver refuses the whole statement looking it up)."""
        for k, value in zip(self.key, key_values, strict=True):
            if value is None:
                return f"key column {k.column.name!r} is null"
            if self.dialect == POSTGRESQL and isinstance(value, str) and "\x00" in value:
                return f"key column {k.column.name!r} holds a NUL, which PostgreSQL text cannot"
        return None

    def decide(self, rows: Sequence[PlannedRow], prior_view: dict[str, LiveState | None]) -> None:
        """Set each row's outcome and live state, against the table as it is now (or, for a row this
        run already changed, as `prior_view` says it was before: a resumed run decides as the
        interrupted one did)."""
        live = self.read_live([r for r in rows if r.key_refusal is None and r.key_text not in prior_view])
        spec = self.spec
        for row in rows:
            if row.key_refusal is not None:
                row.outcome, row.live = INVALID_KEY, None
                continue
            state = prior_view[row.key_text] if row.key_text in prior_view else live.get(row.key_text)
            row.live = state
            row.outcome = classify(
                row.record_digest,
                state,
                spec.conflict,
                spec.snapshot_us,
                spec.freshnessColumn is not None,
                spec.allowNewer,
            )

    # -- reading live rows ----------------------------------------------------------------------

    def _key_condition(self, count: int) -> str:
        """Rows whose key is one of `count` keys: on PostgreSQL one array per key column (a short
        statement the driver prepares once), on SQLite a list of values."""
        cols = [quote(k.column.name) for k in self.key]
        if self.dialect == POSTGRESQL:
            arrays = [f"CAST(:k{j} AS {k.column.type_text}[])" for j, k in enumerate(self.key)]
            if len(cols) == 1:
                return f"{cols[0]} {d.PG_EQUALS} ANY({arrays[0]})"
            unnested = ", ".join(f"pg_catalog.unnest({a})" for a in arrays)
            return f"({', '.join(cols)}) IN (SELECT * FROM ROWS FROM ({unnested}))"
        if len(cols) == 1:
            return f"{cols[0]} IN ({', '.join(f':k{i}_0' for i in range(count))})"
        tuples = ", ".join(
            "(" + ", ".join(f":k{i}_{j}" for j in range(len(cols))) + ")" for i in range(count)
        )
        return f"({', '.join(cols)}) IN (VALUES {tuples})"

    def _key_params(self, keys: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
        if self.dialect == POSTGRESQL:
            return {f"k{j}": [key[j] for key in keys] for j in range(len(self.key))}
        return {f"k{i}_{j}": v for i, key in enumerate(keys) for j, v in enumerate(key)}

    def _live_select(self, with_image: bool) -> tuple[str, int]:
        """The columns read of a live row: key, written, freshness, tombstone (and the image)."""
        parts = [quote(k.column.name) for k in self.key] + [quote(w.column.name) for w in self.written]
        parts.append(quote(self.freshness.name) if self.freshness else "NULL")
        parts.append(quote(self.deleted.name) if self.deleted else "NULL")
        if with_image:
            parts += [d.image_select(self.dialect, c) for c in self.columns]
        return ", ".join(parts), len(parts)

    def _live_rows(
        self,
        conn: Connection,
        keys: Sequence[tuple[Any, ...]],
        lock: bool,
        with_image: bool,
        digests_only: bool = False,
    ) -> dict[str, LiveRow]:
        """The live rows of `keys` by key text (`digests_only`: only each row's digest and tombstone
        are right)."""
        select, _ = self._live_select(with_image)
        d.pin_settings(conn)  # as pcbo set them, whatever a trigger did in this transaction
        found: dict[str, LiveRow] = {}
        twice: set[str] = set()
        nkey, nwritten = len(self.key), len(self.written)
        column_names = list(self.columns)
        for lo in range(0, len(keys), READ_BATCH):
            batch = keys[lo : lo + READ_BATCH]
            sql = f"SELECT {select} FROM {self._sql_table} WHERE {self._key_condition(len(batch))}"
            if lock and self.dialect == POSTGRESQL:
                sql += " FOR UPDATE"
            for row in conn.execute(text(sql), self._key_params(batch)):
                key_canonical = [canonical_value(k.kind, row[i]) for i, k in enumerate(self.key)]
                values = [canonical_value(w.kind, row[nkey + i]) for i, w in enumerate(self.written)]
                fresh = d.instant_of(row[nkey + nwritten])
                deleted = d.instant_of(row[nkey + nwritten + 1])
                image: dict[str, Any] = {}
                if with_image:
                    base = nkey + nwritten + 2
                    image = {
                        name: d.encode_image_value(self.dialect, row[base + i])
                        for i, name in enumerate(column_names)
                    }
                state = (
                    LiveState(row_digest(values), None, deleted, "")
                    if digests_only
                    else live_state(values, fresh, deleted)
                )
                key = key_text(key_canonical)
                if key in found:
                    twice.add(key)
                found[key] = LiveRow(state, image)
        for key in twice:  # not the row anyone wrote: equal to nothing, never written over
            found[key] = LiveRow(AMBIGUOUS_STATE, found[key].image)
        return found

    def read_live(self, rows: Sequence[PlannedRow]) -> dict[str, LiveState]:
        """The live state of each row's key in the table now (absent keys are missing)."""
        with self.read() as conn:
            found = self._live_rows(conn, [r.key_values for r in rows], lock=False, with_image=False)
        return {k: v.state for k, v in found.items()}

    def read_back(self, applied: Sequence[Sequence[str]], keys: dict[str, tuple[Any, ...]]) -> list[str]:
        """Ids of `applied` ([id, key text, digest]) whose row is not in the table as written
        (`keys`: key text -> the key's values, to find the rows): missing, other written values, or
        tombstoned (an applied row never is: a tombstone a column default or trigger put on it, or
        one written since, says the record is deleted)."""
        with self.read() as conn:
            found = self._live_rows(
                conn, [keys[a[1]] for a in applied], lock=False, with_image=False, digests_only=True
            )
        return [
            a[0]
            for a in applied
            if a[1] not in found
            or found[a[1]].state.row_digest != a[2]
            or found[a[1]].state.deleted_us is not None
        ]

    def read_back_by_key_text(self, applied: Sequence[Sequence[str]]) -> list[str]:
        """`read_back` for rows known only by their key text (a verify, without the request)."""
        keys = {a[1]: self.key_values_of_text(a[1]) for a in applied}
        return self.read_back(applied, keys)

    def key_values_of_text(self, text_: str) -> tuple[Any, ...]:
        """The values to bind for a key from its canonical text."""
        values = json.loads(text_)
        out = []
        for k, v in zip(self.key, values, strict=True):
            if k.kind == TIMESTAMP and v is not None and not d.instants_as_text(self.dialect, k.column):
                from pcbo_dagster.core.instants import parse_instant

                micros = parse_instant(v)
                out.append(None if micros is None else to_datetime(micros))
            else:
                out.append(d.number_bind(self.dialect, k.column, v) if k.kind == FLOAT else v)
        return tuple(out)

    # -- the pcbo tables --------------------------------------------------------------------------

    def _pcbo(self, table: str) -> str:
        return f"{quote(self.schema)}.{quote(table)}" if self.dialect == POSTGRESQL else quote(table)

    def journal_ddl(self) -> list[str]:
        """The statements creating the journal, checkpoint and rollback tables and their append-only
        triggers (what `ensure_journal` runs; a DBA may run them instead)."""
        j, c, r = (self._pcbo(t) for t in PCBO_TABLES)
        big = "BIGINT" if self.dialect == POSTGRESQL else "INTEGER"
        statements = [
            f"CREATE TABLE {j} (run_id TEXT NOT NULL, table_name TEXT NOT NULL, seq {big} NOT NULL, "
            f"partition_key TEXT NOT NULL, intent_seq {big} NOT NULL, entry TEXT NOT NULL, "
            "PRIMARY KEY (run_id, table_name, seq))",
            f"CREATE TABLE {c} (run_id TEXT NOT NULL, table_name TEXT NOT NULL, partition_key TEXT NOT NULL, "
            f"intent_seq {big} NOT NULL, chunk INTEGER NOT NULL, plan_hash TEXT NOT NULL, "
            f"target_digest TEXT NOT NULL, journal_seq {big} NOT NULL, journal_digest TEXT NOT NULL, "
            "result TEXT NOT NULL, PRIMARY KEY (run_id, table_name, partition_key, intent_seq, chunk))",
            f"CREATE TABLE {r} (run_id TEXT NOT NULL, table_name TEXT NOT NULL, partition_key TEXT NOT NULL, "
            f"intent_seq {big} NOT NULL, journal_digest TEXT NOT NULL, restored {big} NOT NULL, "
            "PRIMARY KEY (run_id, table_name, partition_key, intent_seq))",
        ]
        keys = {
            JOURNAL_TABLE: ("run_id", "table_name", "seq"),
            CHECKPOINT_TABLE: ("run_id", "table_name", "partition_key", "intent_seq", "chunk"),
            ROLLBACK_TABLE: ("run_id", "table_name", "partition_key", "intent_seq"),
        }
        if self.dialect == POSTGRESQL:
            function = f"{quote(self.schema)}.pcbo_append_only"
            statements.append(
                f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql "
                f"SET search_path = {PG_SEARCH_PATH} AS $${APPEND_ONLY_BODY}$$"
            )
            for t in PCBO_TABLES:
                statements.append(
                    f"CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {self._pcbo(t)} "
                    f"FOR EACH ROW EXECUTE FUNCTION {function}()"
                )
                statements.append(
                    f"CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {self._pcbo(t)} "
                    f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
                )
        else:
            for t in PCBO_TABLES:
                same = " AND ".join(f"{k} = NEW.{k}" for k in keys[t])
                statements += [
                    f"CREATE TRIGGER {t}_no_update BEFORE UPDATE ON {t} "
                    f"BEGIN SELECT RAISE(ABORT, '{t} is append-only'); END",
                    f"CREATE TRIGGER {t}_no_delete BEFORE DELETE ON {t} "
                    f"BEGIN SELECT RAISE(ABORT, '{t} is append-only'); END",
                    f"CREATE TRIGGER {t}_no_replace BEFORE INSERT ON {t} "
                    f"WHEN EXISTS (SELECT 1 FROM {t} WHERE {same}) "
                    f"BEGIN SELECT RAISE(ABORT, '{t} is append-only: REPLACE refused'); END",
                ]
        return statements

    def journal_trigger_names(self) -> list[str]:
        return list(self._journal_triggers())

    def _journal_triggers(self) -> dict[str, str]:
        """The append-only triggers `journal_ddl` creates: name -> the pcbo table it is on."""
        kinds = (
            ("append_only", "no_truncate")
            if self.dialect == POSTGRESQL
            else ("no_update", "no_delete", "no_replace")
        )
        return {f"{t}_{a}": t for t in PCBO_TABLES for a in kinds}

    def trigger_problems(self) -> dict[str, str]:
        """Trigger name -> what is wrong with it, for each of `journal_trigger_names` that is not
        exactly what `journal_ddl` creates: `missing` (none of that name on the pcbo table it names: a
        trigger of that name on another table guards nothing), or why its definition differs (SQLite:
        its `CREATE TRIGGER` text; PostgreSQL: `pg_get_triggerdef`, enabled, and its function's
        schema, name, language, body, settings and security)."""
        expected = self._journal_triggers()
        with self.read() as conn:
            if self.dialect == SQLITE:
                return sqlite_trigger_problems(conn, expected, self.journal_ddl())
            # pg_get_triggerdef names what the search path does not reach in full: reach nothing
            d.catalog_path_only(conn)
            schema = str(conn.execute(text("SELECT quote_ident(:s)"), {"s": self.schema}).scalar())
            replica = pg_replica_session(conn)
            rows = conn.execute(
                text(
                    "SELECT t.tgname, c.relname, pg_get_triggerdef(t.oid), t.tgenabled, fn.nspname, "
                    "p.proname, l.lanname, p.prosrc, p.proconfig, p.prosecdef "
                    "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_proc p ON p.oid = t.tgfoid "
                    "JOIN pg_namespace fn ON fn.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang "
                    "WHERE n.nspname = :s AND NOT t.tgisinternal"
                ),
                {"s": self.schema},
            ).all()
        by_name = {(str(r[0]), str(r[1])): r for r in rows}
        function = f"{schema}.pcbo_append_only()"
        problems = {}
        for name, table in expected.items():
            row = by_name.get((name, table))
            if row is None:
                problems[name] = "missing"
                continue
            why = []
            if row[2] != pg_guard_trigger_definition(name, f"{schema}.{table}", function):
                why.append(f"its definition is {row[2]!r}")
            if (asleep := pg_trigger_asleep(row[3], replica)) is not None:
                why.append(asleep)
            # the function as journal_ddl creates it (one made before its search_path was pinned:
            # the same body, no settings, is what older journals hold)
            if (row[4], row[5], row[6], row[9]) != (self.schema, "pcbo_append_only", "plpgsql", False):
                why.append("its function is not pcbo's")
            elif row[7] != APPEND_ONLY_BODY:
                why.append("its function's body was replaced")
            elif row[8] not in (None, [f"search_path={PG_SEARCH_PATH}"]):
                why.append("its function's settings were changed")
            if why:
                problems[name] = "; ".join(why)
        return problems

    def has_journal(self) -> bool:
        with self.read() as conn:
            return self._has_journal(conn)

    def _has_journal(self, conn: Connection) -> bool:
        return d.table_exists(conn, self.schema, JOURNAL_TABLE)

    def ensure_journal(self) -> None:
        """Create the pcbo tables beside the target table when they are missing."""
        with self.write() as conn:
            if self.dialect == POSTGRESQL:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _DDL_LOCK_KEY})
            if self._has_journal(conn):
                return
            if (
                self.dialect == POSTGRESQL
                and not conn.execute(
                    text("SELECT has_schema_privilege(:s, 'CREATE')"), {"s": self.schema}
                ).scalar()
            ):
                raise InvalidInput(
                    "target.url",
                    f"the role {d.current_role(conn)!r} may not create the journal tables in schema "
                    f"{self.schema} (a DBA can create them once: see targets/sql_table.journal_ddl)",
                )
            for statement in self.journal_ddl():
                conn.execute(text(statement))

    def journal_keys(self, run_id: str) -> list[str]:
        """The journal keys (`ChainState.sql_journal_key`) under which this table holds entries of
        `run_id`: the bare run id, and one `<runId>@<intent hash>` per chain that applied it here."""
        with self.read() as conn:
            if not self._has_journal(conn):
                return []
            rows = conn.execute(
                text(
                    f"SELECT DISTINCT run_id FROM {self._pcbo(JOURNAL_TABLE)} WHERE table_name = :t "
                    "AND (run_id = :r OR substr(run_id, 1, :n) = :prefix) ORDER BY run_id"
                ),
                {"t": self.qualified, "r": run_id, "n": len(run_id) + 1, "prefix": f"{run_id}@"},
            ).all()
        return [str(r[0]) for r in rows]

    def journal_entries(self, run_id: str | None) -> list[tuple[int, str, int, str]]:
        """(seq, partition key, intent seq, entry text) of the run's entries for this table, by seq
        (`run_id`: the run's journal key, `ChainState.sql_journal_key`; None: none)."""
        with self.read() as conn:
            if run_id is None or not self._has_journal(conn):
                return []
            rows = conn.execute(
                text(
                    f"SELECT seq, partition_key, intent_seq, entry FROM {self._pcbo(JOURNAL_TABLE)} "
                    "WHERE run_id = :r AND table_name = :t ORDER BY seq"
                ),
                {"r": run_id, "t": self.qualified},
            ).all()
        return [(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows]

    def checkpoints(self, run_id: str | None) -> list[Checkpoint]:
        """The run's chunk checkpoints for this table, by journal position then chunk (`run_id`: the
        run's journal key)."""
        with self.read() as conn:
            if run_id is None or not self._has_journal(conn):
                return []
            rows = conn.execute(
                text(
                    "SELECT partition_key, intent_seq, chunk, plan_hash, target_digest, journal_seq, "
                    f"journal_digest, result FROM {self._pcbo(CHECKPOINT_TABLE)} "
                    "WHERE run_id = :r AND table_name = :t ORDER BY intent_seq, partition_key, chunk"
                ),
                {"r": run_id, "t": self.qualified},
            ).all()
        return [
            Checkpoint(
                str(r[0]), int(r[1]), int(r[2]), str(r[3]), str(r[4]), int(r[5]), str(r[6]), json.loads(r[7])
            )
            for r in rows
        ]

    def rollback_markers(self, run_id: str | None) -> dict[tuple[str, int], tuple[str, int]]:
        """(partition key, intent seq) -> (journal digest, rows restored) of the run's undone applies
        (`run_id`: the run's journal key)."""
        with self.read() as conn:
            if run_id is None or not self._has_journal(conn):
                return {}
            rows = conn.execute(
                text(
                    "SELECT partition_key, intent_seq, journal_digest, restored "
                    f"FROM {self._pcbo(ROLLBACK_TABLE)} WHERE run_id = :r AND table_name = :t"
                ),
                {"r": run_id, "t": self.qualified},
            ).all()
        return {(str(r[0]), int(r[1])): (str(r[2]), int(r[3])) for r in rows}

    def rows_found_equal_by_others(self, own: set[str]) -> dict[str, dict[str, set[str]]]:
        """Key text -> row digest -> the journal keys (other than `own`: other deployments') whose
        checkpoints in this table list the row as found equal (`skip_equal`, not failed) with that
        digest, by an apply no `pcbo_rollbacks` row of theirs says was undone: rows their applies
        vouch for without having written them."""
        with self.read() as conn:
            if not self._has_journal(conn):
                return {}
            undone = {
                (str(r[0]), str(r[1]), int(r[2]))
                for r in conn.execute(
                    text(
                        f"SELECT run_id, partition_key, intent_seq FROM {self._pcbo(ROLLBACK_TABLE)} "
                        "WHERE table_name = :t"
                    ),
                    {"t": self.qualified},
                )
            }
            rows = conn.execute(
                text(
                    f"SELECT run_id, partition_key, intent_seq, result FROM {self._pcbo(CHECKPOINT_TABLE)} "
                    "WHERE table_name = :t"
                ),
                {"t": self.qualified},
            ).all()
        found: dict[str, dict[str, set[str]]] = {}
        for run_id, partition_key, intent_seq, result in rows:
            if str(run_id) in own or (str(run_id), str(partition_key), int(intent_seq)) in undone:
                continue
            try:
                checkpoint = json.loads(result)
                failed = {f["id"] for f in checkpoint["failures"]}
                for row_id, key, digest, outcome, _ in checkpoint["rows"]:
                    if outcome == SKIP_EQUAL and row_id not in failed:
                        found.setdefault(str(key), {}).setdefault(str(digest), set()).add(str(run_id))
            except (ValueError, KeyError, TypeError):
                continue  # not a checkpoint pcbo wrote: it vouches for nothing
        return found

    # -- applying a chunk -----------------------------------------------------------------------

    def apply_chunk(self, rows: Sequence[PlannedRow], ctx: ChunkContext, journal: bool = True) -> ChunkResult:
        """Apply one chunk in one transaction, or row by row in savepoints when a statement fails
        (module doc); the checkpoint is written in the same transaction."""
        try:
            with self.write() as conn:
                return self._apply(conn, rows, ctx, journal, per_row=False)
        except (IntegrityError, DataError):
            pass
        with self.write() as conn:
            return self._apply(conn, rows, ctx, journal, per_row=True)

    def _apply(
        self, conn: Connection, rows: Sequence[PlannedRow], ctx: ChunkContext, journal: bool, per_row: bool
    ) -> ChunkResult:
        failures: list[dict[str, Any]] = []
        locked = self._live_rows(
            conn, [r.key_values for r in rows if r.key_refusal is None], lock=True, with_image=journal
        )
        writes: list[tuple[PlannedRow, LiveRow | None]] = []
        for row in rows:
            now = locked.get(row.key_text)
            if row.outcome == INVALID_KEY:
                failures.append(_failure(row, "pcbo", row.key_refusal or ""))
                continue
            if (now.state.live_digest if now else None) != (row.live.live_digest if row.live else None):
                failures.append(
                    _failure(
                        row, "pcbo", "the row changed after the decision was made (it is not written over)"
                    )
                )
                continue
            if now is not None and now.state == AMBIGUOUS_STATE:
                failures.append(_failure(row, "pcbo", "the key names more than one row"))
                continue
            if row.outcome in (INSERT, UPDATE):
                writes.append((row, now))
            elif row.outcome == CONFLICT:
                failures.append(
                    _failure(row, "pcbo", "the key is present with other values (conflict: fail)")
                )
            else:
                assert row.outcome in (SKIP_EQUAL, SKIP_CONFLICT, REFUSED_NEWER, REFUSED_DELETED)
        seq, digest = ctx.journal_seq, ctx.journal_digest
        entries: list[dict[str, Any]] = []
        if not per_row:
            self._write_rows(conn, writes)
            whole = self._written_images(conn, writes) if journal else {}
            for row, now in writes:
                entry, entry_text = self._entry(ctx, seq + 1, row, now, whole.get(row.key_text))
                seq, digest = seq + 1, chain_journal_digest(digest, entry_text)
                entries.append({"seq": seq, "entry": entry_text.decode("utf-8")})
            if journal:
                self._insert_journal(conn, ctx, entries)
        else:
            for row, now in writes:
                savepoint = conn.begin_nested()
                try:
                    self._write_rows(conn, [(row, now)])
                    whole = self._written_images(conn, [(row, now)]) if journal else {}
                    entry, entry_text = self._entry(ctx, seq + 1, row, now, whole.get(row.key_text))
                    if journal:
                        self._insert_journal(
                            conn, ctx, [{"seq": seq + 1, "entry": entry_text.decode("utf-8")}]
                        )
                    savepoint.commit()
                except (IntegrityError, DataError) as exc:
                    savepoint.rollback()
                    failures.append(_failure(row, *_database_error(exc)))
                    continue
                seq, digest = seq + 1, chain_journal_digest(digest, entry_text)
                entries.append({"seq": seq, "entry": entry_text.decode("utf-8")})
        planned = chunk_rows(rows)
        counts, applied = chunk_claims(planned, {f["id"] for f in failures})
        result = ChunkResult(counts, failures, applied, seq, digest, fallback=per_row, rows=planned)
        conn.execute(
            text(
                f"INSERT INTO {self._pcbo(CHECKPOINT_TABLE)} (run_id, table_name, partition_key, intent_seq, "
                "chunk, plan_hash, target_digest, journal_seq, journal_digest, result) VALUES "
                "(:r, :t, :p, :i, :c, :ph, :td, :js, :jd, :res)"
            ),
            {
                "r": ctx.run_id,
                "t": self.qualified,
                "p": ctx.partition_key,
                "i": ctx.intent_seq,
                "c": ctx.chunk,
                "ph": ctx.plan_hash,
                "td": ctx.target_digest,
                "js": seq,
                "jd": digest,
                "res": fast_jcs(result.to_json()).decode("utf-8"),
            },
        )
        self._check_kept(conn, ctx, entries if journal else None, (seq, digest, result))
        return result

    def _check_kept(
        self,
        conn: Connection,
        ctx: ChunkContext,
        entries: list[dict[str, Any]] | None,
        checkpoint: tuple[int, str, ChunkResult],
    ) -> None:
        """Before the chunk commits: the journal holds exactly the entries just written after
        `ctx.journal_seq` (`entries`; None: no journal) and the checkpoint is there as written — a
        trigger or rule on pcbo's tables that drops or rewrites them (the journal is append-only,
        not guarded against that) would leave changes no rollback can undo. `PcboIntegrityError`
        otherwise: the chunk's transaction is rolled back, nothing of it is committed."""
        where = {"r": ctx.run_id, "t": self.qualified}
        d.pin_settings(conn)
        if entries is not None:
            kept = conn.execute(
                text(
                    f"SELECT seq, entry FROM {self._pcbo(JOURNAL_TABLE)} "
                    "WHERE run_id = :r AND table_name = :t AND seq > :lo ORDER BY seq"
                ),
                {**where, "lo": ctx.journal_seq},
            ).all()
            if [(int(r[0]), str(r[1])) for r in kept] != [(e["seq"], e["entry"]) for e in entries]:
                raise PcboIntegrityError(
                    f"{JOURNAL_TABLE} in {self.location} did not keep the journal entries of "
                    f"{self.qualified}'s chunk {ctx.chunk} of partition {ctx.partition_key} as written "
                    "(a trigger or rule on it?): the chunk was not committed"
                )
        seq, digest, result = checkpoint
        found = conn.execute(
            text(
                f"SELECT journal_seq, journal_digest, result, plan_hash, target_digest "
                f"FROM {self._pcbo(CHECKPOINT_TABLE)} WHERE run_id = :r AND table_name = :t "
                "AND partition_key = :p AND intent_seq = :i AND chunk = :c"
            ),
            {**where, "p": ctx.partition_key, "i": ctx.intent_seq, "c": ctx.chunk},
        ).all()
        expected = (seq, digest, fast_jcs(result.to_json()).decode("utf-8"), ctx.plan_hash, ctx.target_digest)
        if [(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in found] != [expected]:
            raise PcboIntegrityError(
                f"{CHECKPOINT_TABLE} in {self.location} did not keep the checkpoint of "
                f"{self.qualified}'s chunk {ctx.chunk} of partition {ctx.partition_key} as written "
                "(a trigger or rule on it?): the chunk was not committed"
            )

    def _written_images(
        self, conn: Connection, writes: Sequence[tuple[PlannedRow, LiveRow | None]]
    ) -> dict[str, str]:
        """Key text -> the digest of the whole row (every column's image) of each row just inserted or
        updated: what its undo (a DELETE of every column, or its prior values written over it) must
        still find (`drifted`)."""
        keys = [row.key_values for row, _ in writes if row.outcome in (INSERT, UPDATE)]
        if not keys:
            return {}
        found = self._live_rows(conn, keys, lock=False, with_image=True)
        return {k: image_digest(v.image) for k, v in found.items()}

    def _entry(
        self, ctx: ChunkContext, seq: int, row: PlannedRow, now: LiveRow | None, whole: str | None
    ) -> tuple[dict[str, Any], bytes]:
        key_names = {k.column.name for k in self.key}
        changed = [w.column.name for w in self.written if w.column.name not in key_names]
        if (
            row.outcome == UPDATE
            and now is not None
            and self.deleted is not None
            and now.state.deleted_us is not None
        ):
            changed.append(self.deleted.name)
        entry = {
            "seq": seq,
            "partition": ctx.partition_key,
            "intentSeq": ctx.intent_seq,
            "chunk": ctx.chunk,
            "id": row.id,
            "keyText": row.key_text,
            "key": [d.key_image(self.dialect, v) for v in row.key_values],
            "action": row.outcome,
            "columns": sorted(changed) if row.outcome == UPDATE else [],
            "prior": None if now is None else now.image,
            "priorState": None if now is None else now.state.to_json(),
            "after": row.record_digest,
        }
        if whole is not None:
            entry["inserted" if row.outcome == INSERT else "updated"] = whole
        return entry, fast_jcs(entry)

    def _insert_journal(self, conn: Connection, ctx: ChunkContext, entries: list[dict[str, Any]]) -> None:
        if not entries:
            return
        if self.dialect == POSTGRESQL and len(entries) > 1:
            _copy(
                conn,
                f"COPY {self._pcbo(JOURNAL_TABLE)} "
                "(run_id, table_name, seq, partition_key, intent_seq, entry)",
                [
                    (ctx.run_id, self.qualified, e["seq"], ctx.partition_key, ctx.intent_seq, e["entry"])
                    for e in entries
                ],
            )
            return
        conn.execute(
            text(
                f"INSERT INTO {self._pcbo(JOURNAL_TABLE)} "
                "(run_id, table_name, seq, partition_key, intent_seq, entry) "
                "VALUES (:r, :t, :seq, :p, :i, :entry)"
            ),
            [
                {"r": ctx.run_id, "t": self.qualified, "p": ctx.partition_key, "i": ctx.intent_seq, **e}
                for e in entries
            ],
        )

    def _write_rows(self, conn: Connection, writes: Sequence[tuple[PlannedRow, LiveRow | None]]) -> None:
        names = [w.column.name for w in self.written]
        inserts = [row for row, _ in writes if row.outcome == INSERT]
        if self.dialect == POSTGRESQL and len(inserts) > 1:  # the chunk's rows in one COPY
            _copy(
                conn,
                f"COPY {self._sql_table} ({', '.join(quote(n) for n in names)})",
                [r.values for r in inserts],
            )
        elif inserts:
            conn.execute(
                text(
                    f"INSERT INTO {self._sql_table} ({', '.join(quote(n) for n in names)}) VALUES "
                    f"({', '.join(f':c{i}' for i in range(len(names)))})"
                ),
                [{f"c{i}": v for i, v in enumerate(row.values)} for row in inserts],
            )
        key_names = {k.column.name for k in self.key}
        set_at = [i for i, n in enumerate(names) if n not in key_names]
        for clear in (False, True):
            updates = [
                row
                for row, now in writes
                if row.outcome == UPDATE
                and (now is not None and self.deleted is not None and now.state.deleted_us is not None)
                == clear
            ]
            if not updates:
                continue
            assignments = [f"{quote(names[i])} = :c{i}" for i in set_at]
            if clear:
                assert self.deleted is not None
                assignments.append(f"{quote(self.deleted.name)} = NULL")
            where = " AND ".join(
                f"{quote(k.column.name)} {d.equals(self.dialect)} :k{j}" for j, k in enumerate(self.key)
            )
            conn.execute(
                text(f"UPDATE {self._sql_table} SET {', '.join(assignments)} WHERE {where}"),
                [
                    {
                        **{f"c{i}": row.values[i] for i in set_at},
                        **{f"k{j}": v for j, v in enumerate(row.key_values)},
                    }
                    for row in updates
                ],
            )

    # -- undoing ---------------------------------------------------------------------------------

    def _key_where(self, prefix: str) -> str:
        return " AND ".join(
            f"{quote(k.column.name)} {d.equals(self.dialect)} "
            f"{d.bind_expression(self.dialect, f'{prefix}{j}', k.column)}"
            for j, k in enumerate(self.key)
        )

    def drifted(
        self, conn: Connection, entries: Sequence[dict[str, Any]], lock: bool, restored: bool = False
    ) -> list[dict[str, Any]]:
        """The entries whose row is no longer as the run wrote it (changed or removed since); with
        `restored`, those whose row is not back as it was before the run (an inserted row still
        there, an updated row without its prior written values: `entries` one per row, the oldest)."""
        keys = [self.key_values_of_text(e["keyText"]) for e in entries]
        whole = not restored and any(_whole_digest(e) is not None for e in entries)
        found = self._live_rows(conn, keys, lock=lock, with_image=whole, digests_only=True)
        drifted = []
        for e in entries:
            now = found.get(e["keyText"])
            if restored:
                expected = None if e["priorState"] is None else e["priorState"]["rowDigest"]
            else:
                expected = e["after"]
            if (None if now is None else now.state.row_digest) != expected or (
                # a row the run inserted is deleted whole, one it updated gets its prior values back:
                # every column must be as the run left it (an entry from before `updated`: written ones)
                whole
                and _whole_digest(e) is not None
                and now is not None
                and image_digest(now.image) != _whole_digest(e)
            ):
                drifted.append({"id": e["id"], "key": e["keyText"], "seq": e["seq"]})
        return drifted

    def restore(
        self,
        conn: Connection,
        entries: Sequence[dict[str, Any]],
    ) -> int:
        """Write each entry's prior image back (newest first), in `conn`'s transaction: a row the run
        inserted is deleted, a row it updated gets its changed columns back. Returns the rows restored."""
        for e in sorted(entries, key=lambda e: e["seq"], reverse=True):
            params = {f"k{j}": d.decode_image_value(self.dialect, v) for j, v in enumerate(e["key"])}
            if e["action"] == INSERT:
                conn.execute(text(f"DELETE FROM {self._sql_table} WHERE {self._key_where('k')}"), params)
                continue
            assignments = []
            for i, name in enumerate(e["columns"]):
                column = self.columns[name]
                assignments.append(f"{quote(name)} = {d.bind_expression(self.dialect, f'v{i}', column)}")
                params[f"v{i}"] = d.decode_image_value(self.dialect, e["prior"].get(name))
            conn.execute(
                text(f"UPDATE {self._sql_table} SET {', '.join(assignments)} WHERE {self._key_where('k')}"),
                params,
            )
        return len(entries)

    def rows_referenced(self, conn: Connection, entries: Sequence[dict[str, Any]]) -> list[str]:
        """What would go with the rows the undo of `entries` deletes (those the run inserted) through a
        foreign key of another table that references them `ON DELETE CASCADE`, `SET NULL` or `SET
        DEFAULT`: one line per such key holding rows that reference them (the journal holds nothing
        of those rows, so no rollback could put them back)."""
        keys = [self.key_values_of_text(e["keyText"]) for e in entries if e["action"] == INSERT]
        if not keys:
            return []
        found = []
        for table, columns, referenced, action in d.cascading_foreign_keys(conn, self.schema, self.name):
            here = ", ".join(quote(c) for c in referenced)
            there = ", ".join(f"r.{quote(c)}" for c in columns)
            count = conn.execute(
                text(
                    f"SELECT count(*) FROM {table} r WHERE ({there}) IN "
                    f"(SELECT {here} FROM {self._sql_table} WHERE {self._key_condition(len(keys))})"
                ),
                self._key_params(keys),
            ).scalar()
            if count:
                found.append(f"{count} row(s) of {table} ({', '.join(columns)}: ON DELETE {action})")
        return found

    def record_rollback(
        self,
        conn: Connection,
        run_id: str,
        partition_key: str,
        intent_seq: int,
        journal_digest: str,
        restored: int,
    ) -> None:
        conn.execute(
            text(
                f"INSERT INTO {self._pcbo(ROLLBACK_TABLE)} (run_id, table_name, partition_key, intent_seq, "
                "journal_digest, restored) VALUES (:r, :t, :p, :i, :jd, :n)"
            ),
            {
                "r": run_id,
                "t": self.qualified,
                "p": partition_key,
                "i": intent_seq,
                "jd": journal_digest,
                "n": restored,
            },
        )

    def rollback_statements(self, entries: Iterable[dict[str, Any]]) -> Iterator[str]:
        """The SQL restoring `entries` (newest first), with literals: the rollback script's body."""
        for e in sorted(entries, key=lambda e: e["seq"], reverse=True):
            equals = d.equals(self.dialect)
            where = " AND ".join(
                f"{quote(k.column.name)} {equals} {d.literal(self.dialect, e['key'][j], k.column)}"
                for j, k in enumerate(self.key)
            )
            if e["action"] == INSERT:
                yield f"DELETE FROM {self._sql_table} WHERE {where};"
                continue
            assignments = ", ".join(
                f"{quote(name)} = {d.literal(self.dialect, e['prior'].get(name), self.columns[name])}"
                for name in e["columns"]
            )
            yield f"UPDATE {self._sql_table} SET {assignments} WHERE {where};"


def _copy(conn: Connection, copy_into: str, rows: Iterable[Sequence[Any]]) -> None:
    """`COPY ... FROM STDIN` of `rows` on the connection's own transaction (PostgreSQL). A row the
    table refuses fails the whole COPY, as an INSERT of the chunk would: the chunk falls back to rows.
    Raised as SQLAlchemy's DataError or IntegrityError, like a failed statement; a lock not granted in
    its `lock_timeout` as `target_lock_busy`."""
    import psycopg

    driver = conn.connection.driver_connection
    assert driver is not None
    try:
        with driver.cursor() as cursor, cursor.copy(f"{copy_into} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    except psycopg.IntegrityError as exc:
        raise IntegrityError(copy_into, None, exc) from exc
    except psycopg.DataError as exc:
        raise DataError(copy_into, None, exc) from exc
    except psycopg.errors.LockNotAvailable as exc:  # waited its whole lock_timeout
        raise d.target_lock_busy(OperationalError(f"{copy_into} FROM STDIN", None, exc)) from None


def _failure(row: PlannedRow, code: str, error: str) -> dict[str, Any]:
    return {"id": row.id, "key": row.key_text, "outcome": row.outcome, "code": code, "error": error}


def _database_error(exc: Exception) -> tuple[str, str]:
    """(SQLSTATE or SQLite error name, the database's message) of a refused statement."""
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "sqlite_errorname", None) or type(orig).__name__
    diag = getattr(orig, "diag", None)
    message = getattr(diag, "message_primary", None) or str(orig).splitlines()[0]
    return str(code), scrub_text(str(message))


def _whole_digest(entry: Mapping[str, Any]) -> str | None:
    """The digest of the whole row as the entry's insert or update left it (None: not recorded)."""
    digest = entry.get("inserted", entry.get("updated"))
    return None if digest is None else str(digest)


def image_digest(image: Mapping[str, Any]) -> str:
    """`sha256:` of a whole row's image (`LiveRow.image`: every column, as the journal keeps them)."""
    return prefixed(hashlib.sha256(fast_jcs(dict(image))).hexdigest())


def journal_entry(entry_text: str) -> dict[str, Any]:
    value = orjson.loads(entry_text)
    if not isinstance(value, dict):
        raise ValueError("a journal entry is a JSON object")
    return value


def recompute_journal(
    entries: Sequence[tuple[int, str, int, str]],
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """A run's journal entries (`journal_entries`) parsed, the journal's digest after each prefix
    (`[0]`: none), and the problems found in them (a gap in the sequence, an entry that is not JSON,
    not its own canonical form or disagrees with its columns)."""
    parsed: list[dict[str, Any]] = []
    digests = [JOURNAL_GENESIS]
    problems = []
    for position, (seq, partition_key, intent_seq, entry_text) in enumerate(entries, start=1):
        if seq != position:
            problems.append(f"journal entry {seq} is at position {position} (entries are missing or added)")
        try:
            entry = journal_entry(entry_text)
            canonical = fast_jcs(entry).decode("utf-8")
            parsed.append(entry)
        except (ValueError, TypeError):
            problems.append(f"journal entry {seq} is not JSON")
            canonical, entry = "", {}
        if (
            canonical != entry_text
            or entry.get("seq") != seq
            or entry.get("partition") != partition_key
            or entry.get("intentSeq") != intent_seq
        ):
            problems.append(f"journal entry {seq} disagrees with its columns or is not in canonical form")
        digests.append(chain_journal_digest(digests[-1], entry_text.encode("utf-8")))
    return parsed, digests, problems


@dataclass
class JournalView:
    """A run's journal for a table, checked: its entries (parsed), its digest after each prefix, the
    problems found, and which applies are undone ((partition key, intent seq))."""

    entries: list[dict[str, Any]]
    digests: list[str]
    problems: list[str]
    undone: set[tuple[str, int]] = field(default_factory=set)

    @property
    def digest(self) -> str:
        return self.digests[-1]

    def live_entries(self, partition_key: str | None = None) -> list[dict[str, Any]]:
        """Entries of applies not rolled back (of one partition, when given)."""
        return [
            e
            for e in self.entries
            if (e["partition"], e["intentSeq"]) not in self.undone
            and (partition_key is None or e["partition"] == partition_key)
        ]

    def prior_view(self) -> dict[str, LiveState | None]:
        """Key text -> the row's state before the run first changed it (applies not undone)."""
        view: dict[str, LiveState | None] = {}
        for e in self.live_entries():
            if e["keyText"] not in view:
                prior = e["priorState"]
                view[e["keyText"]] = None if prior is None else LiveState.from_json(prior)
        return view

    def digest_at(self, seq: int) -> str | None:
        """The journal's digest after its first `seq` entries (None: it has fewer)."""
        return self.digests[seq] if 0 <= seq < len(self.digests) else None


def read_journal(
    table: SqlTable, run_id: str | None, undone: Collection[tuple[str, int]] | None = None
) -> JournalView:
    """The run's journal in `table` (`run_id`: its journal key, `ChainState.sql_journal_key`; None:
    the chain has no apply of the run there, an empty journal). `undone`: the applies the audit
    chain says were rolled back (`ChainState.sql_undone`), whose entries are no longer live whatever
    `pcbo_rollbacks` says; None only for an evaluation without the chain (dry-run, plan), which
    takes the table's rows as they are."""
    entries, digests, problems = recompute_journal(table.journal_entries(run_id))
    if undone is None:
        undone = set(table.rollback_markers(run_id))
    return JournalView(entries, digests, problems, set(undone))

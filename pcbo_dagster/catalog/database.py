"""The catalog database: the engine on a SQLAlchemy URL, its transactions and its migrations.

SQLite (the embedded default) and PostgreSQL. `Database.write()` and `Database.read()` are the
connection API every table module uses: one transaction each, committed on a normal exit and rolled
back on an exception. On SQLite write transactions start with `BEGIN IMMEDIATE`, so writers queue on
the database lock (busy timeout 30 s) instead of failing on a read-to-write lock upgrade.
`insert_ignore`, `insert_ignore_many` and `upsert` are the dialect's `ON CONFLICT` statements.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    create_engine,
    event,
    inspect,
    literal,
    select,
    text,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.pool import StaticPool

from pcbo_dagster.core.errors import PcboError
from pcbo_dagster.io.env_vars import lease_wait_seconds

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Key of the PostgreSQL advisory lock taken around migrations ("pcbo" + "migr" as ASCII).
MIGRATION_LOCK_KEY = 0x7063626F6D696772
#: The newest Alembic revision in migrations/versions (a test holds it equal to Alembic's head).
HEAD_REVISION = "0010"
_BEGIN_OPTION = "pcbo_sqlite_begin"
#: A search path that reaches the system catalog only, temporary objects last: set (locally) before
#: reading the system catalogs, and pinned on pcbo's trigger function in a PostgreSQL target, so no
#: function, operator or type of the role's schemas stands in for the system's.
PG_SEARCH_PATH = "pg_catalog, pg_temp"
#: PostgreSQL's SQLSTATE for a lock not granted within `lock_timeout`.
LOCK_NOT_AVAILABLE = "55P03"


def lock_timeout_value(wait_seconds: float) -> str:
    """`wait_seconds` as a `lock_timeout` value: at least 1 ms (0 would wait for ever)."""
    return f"{max(1, int(wait_seconds * 1000))}ms"


def bound_lock_waits(conn: Connection, wait_seconds: float) -> None:
    """PostgreSQL: every lock the rest of `conn`'s transaction waits for is waited for `wait_seconds`
    at most (`lock_timeout`, SET LOCAL), then `lock_not_granted`. Every catalog session already waits
    `PCBO_LEASE_WAIT_SECONDS` at most (`_bound_session_lock_waits`): this is for a shorter wait."""
    conn.execute(
        text("SELECT pg_catalog.set_config('lock_timeout', :w, true)"),
        {"w": lock_timeout_value(wait_seconds)},
    )


def bound_idle_in_transaction(conn: Connection, seconds: float) -> None:
    """PostgreSQL: a session that leaves the rest of `conn`'s transaction idle for `seconds` between two
    statements (its host stopped by SIGSTOP, a paused VM, a cut network) is ended by the server
    (`idle_in_transaction_session_timeout`, SET LOCAL), its transaction rolled back and its locks
    released. For transactions of a few statements that others wait on (a dataset lease's), which a
    live host never leaves idle."""
    conn.execute(
        text("SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', :w, true)"),
        {"w": lock_timeout_value(seconds)},
    )


def _bound_session_lock_waits(dbapi_conn: Any, _record: Any) -> None:
    """A new PostgreSQL catalog session's `lock_timeout`: `PCBO_LEASE_WAIT_SECONDS`, so no lock another
    session holds (`LOCK TABLE`, a row `FOR UPDATE`, an advisory lock, by hand or a stuck writer) is
    waited for longer in any statement of any command (then `CatalogLockBusy`). Set outside a transaction
    (a rolled-back one would undo it), as SQLAlchemy's `connect` recipe for `search_path` does."""
    autocommit = dbapi_conn.autocommit
    dbapi_conn.autocommit = True
    try:
        with dbapi_conn.cursor() as cur:
            cur.execute(
                "SELECT pg_catalog.set_config('lock_timeout', %s, false)",
                (lock_timeout_value(lease_wait_seconds()),),
            )
    finally:
        dbapi_conn.autocommit = autocommit


def lock_not_granted(exc: BaseException) -> bool:
    """True for PostgreSQL's error for a lock not granted within `lock_timeout`."""
    return isinstance(exc, OperationalError) and getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


#: PostgreSQL's context of a row lock not granted: `while updating tuple (0,1) in relation "runs"`.
_ROW_IN_RELATION = re.compile(r'while (\w+) tuple \([0-9,]+\) in relation "([^"]+)"')
#: A placeholder of the statement as SQLAlchemy hands it to psycopg (`%(name)s`), or an escaped `%`.
_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")
#: A relation's name, schema-qualified or not (the last part is the table's).
_RELATION = re.compile(r'(?:"?[A-Za-z_][A-Za-z0-9_$]*"?\.)*"?([A-Za-z_][A-Za-z0-9_$]*)"?')
#: What a lock not granted is called when PostgreSQL's error names no table (an advisory lock).
UNNAMED_LOCK = "what it waited for (PostgreSQL's error names no table)"


def locked_catalog_object(exc: OperationalError, kind: str = "catalog table") -> str:
    """What a statement waited on for all its `lock_timeout` (`lock_not_granted(exc)`), as PostgreSQL's
    error says it: a row of a table (its context names the relation), a table (its position points at
    the relation's name in the statement; a `COPY` has one), else `UNNAMED_LOCK` (an advisory lock:
    pg_locks names it). `kind`: what the table is called (a SQL target's: "target table")."""
    diag = getattr(exc.orig, "diag", None)
    row = _ROW_IN_RELATION.search(str(getattr(diag, "context", None) or ""))
    if row is not None:
        return f"a row of the {kind} {row.group(2)}"
    position = getattr(diag, "statement_position", None)
    if position and exc.statement:
        numbers: dict[str, int] = {}

        def sent(match: re.Match[str]) -> str:  # psycopg sends `%(name)s` as `$n`, `%%` as `%`
            return (
                "%" if match.group(1) is None else f"${numbers.setdefault(match.group(1), len(numbers) + 1)}"
            )

        name = _RELATION.match(_PLACEHOLDER.sub(sent, exc.statement), int(position) - 1)
        if name is not None:
            return f"the {kind} {name.group(1)}"
    if exc.statement and exc.statement.startswith("COPY "):  # its one table: PostgreSQL points at none
        name = _RELATION.match(exc.statement, len("COPY "))
        if name is not None:
            return f"the {kind} {name.group(1)}"
    return UNNAMED_LOCK


def catalog_lock_busy(exc: OperationalError) -> CatalogLockBusy:
    """The error a command stops with when a catalog statement waited `lock_timeout` for a lock another
    session held (`lock_not_granted(exc)`): what was locked, and that the transaction was rolled back."""
    locked = locked_catalog_object(exc)
    return CatalogLockBusy(
        f"{locked} is locked by another catalog session (pg_locks names it); waited "
        f"{lease_wait_seconds():g} s (PCBO_LEASE_WAIT_SECONDS); the catalog transaction that waited was "
        "rolled back, nothing of it was appended",
        locked=locked,
    )


def default_catalog_url(home: str | os.PathLike[str]) -> str:
    """`sqlite:///<absolute home>/catalog.db`."""
    return f"sqlite:///{Path(home).resolve() / 'catalog.db'}"


def sqlalchemy_url(url: str) -> URL:
    """A URL as SQLAlchemy opens it: a plain `postgresql://` (or `postgres://`) on psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def parse_catalog_url(url: str) -> URL:
    """`url` as SQLAlchemy opens it (`sqlalchemy_url`) when it names a database a catalog can live in,
    SQLite or PostgreSQL; `ValueError` saying why otherwise (the password never shown)."""
    try:
        parsed = sqlalchemy_url(url)
    except ArgumentError:
        raise ValueError("not a database URL: sqlite:///PATH or postgresql://USER@HOST/DB") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported catalog URL {parsed.render_as_string()!r}: sqlite or postgresql")
    return parsed


def is_sqlite_memory(url: str) -> bool:
    """Whether `url` names an in-memory SQLite database (gone when its process ends)."""
    return _is_sqlite_memory(parse_catalog_url(url))


def _is_sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    )


class Database:
    """The catalog database on a SQLAlchemy URL. One instance per process (do not share across fork)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._url = parse_catalog_url(url)
        self.dialect = self._url.get_backend_name()
        self._lock = threading.Lock()
        self._engine: Engine | None = None

    # -- engine -------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (created on first use)."""
        with self._lock:
            if self._engine is None:
                self._engine = self._create_engine()
            return self._engine

    def _create_engine(self) -> Engine:
        if self.dialect == "postgresql":
            engine = create_engine(self._url, pool_pre_ping=True)
            event.listen(engine, "connect", _bound_session_lock_waits, insert=True)
            return engine
        kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}}
        memory = _is_sqlite_memory(self._url)
        if memory:
            kwargs["poolclass"] = StaticPool
            kwargs["connect_args"]["check_same_thread"] = False
        elif self._url.database:
            Path(self._url.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(self._url, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
            cur = dbapi_conn.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
                if not memory:
                    _retry_locked(lambda: cur.execute("PRAGMA journal_mode = WAL"))
                cur.execute("PRAGMA synchronous = NORMAL")
                cur.execute("PRAGMA foreign_keys = ON")
            finally:
                cur.close()

        sqlite_begins_as_asked(engine)

        return engine

    # -- transactions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE); commits on success, rolls back on error."""
        try:
            with self.engine.connect() as conn:
                conn = write_connection(conn)
                with conn.begin():
                    yield conn
        except OperationalError as exc:
            if not lock_not_granted(exc):
                raise
            raise catalog_lock_busy(exc) from None
        except SqlIntegrityError as exc:
            behind = self._sequence_behind(exc)
            if behind is None:
                raise
            raise CatalogSequenceBehind(behind) from None

    def _sequence_behind(self, exc: SqlIntegrityError) -> str | None:
        """What to say when a PostgreSQL insert's new id (its table's id sequence's next value: pcbo
        never writes an id itself) collided with a row already there (`pk_<table>`): the sequence was
        set back behind the table's largest id (`ALTER SEQUENCE … RESTART`, `setval`). None for any
        other integrity error."""
        diag = getattr(exc.orig, "diag", None)
        table, schema = getattr(diag, "table_name", None), getattr(diag, "schema_name", None)
        if self.dialect != "postgresql" or not table or not schema:
            return None
        if getattr(exc.orig, "sqlstate", None) != "23505":  # unique_violation
            return None
        if getattr(diag, "constraint_name", None) != f"pk_{table}":
            return None
        with self.read() as conn:
            quote = conn.dialect.identifier_preparer.quote
            qualified = f"{quote(schema)}.{quote(table)}"
            sequence = conn.execute(  # no row: the table has no id column
                text(
                    "SELECT pg_catalog.pg_get_serial_sequence(:t, 'id') FROM pg_catalog.pg_attribute "
                    "WHERE attrelid = CAST(:t AS pg_catalog.regclass) AND attname = 'id' AND NOT attisdropped"
                ),
                {"t": qualified},
            ).scalar()
            if sequence is None:
                return None
            largest = conn.execute(text(f"SELECT max(id) FROM {qualified}")).scalar_one()  # noqa: S608 - quoted
            at = conn.execute(
                text("SELECT pg_catalog.pg_sequence_last_value(CAST(:s AS regclass))"), {"s": sequence}
            ).scalar_one()
        if largest is None:
            return None
        return (
            f"the catalog's sequence {sequence} handed out an id {qualified} already holds (the "
            f"sequence is at {at if at is not None else 'its start'}, the table's largest id is {largest}): "
            "it was set back (ALTER SEQUENCE … RESTART, setval); the catalog transaction was rolled "
            "back. Fix it with "
            f"SELECT pg_catalog.setval('{sequence}', (SELECT max(id) FROM {qualified}));"
        )

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (SQLite: BEGIN DEFERRED)."""
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except OperationalError as exc:
            if not lock_not_granted(exc):
                raise
            raise catalog_lock_busy(exc) from None

    def close(self) -> None:
        """Dispose of the engine's connections (the store can be used again afterwards)."""
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def append_only_trigger_problems(self) -> dict[str, str]:
        """Trigger name -> what is wrong with it, for each append-only trigger of the catalog
        (`schema.append_only_triggers`) that is not exactly what the migrations create: `missing`
        (none of that name on the table it guards: one of that name on another table guards nothing),
        or why it differs (SQLite: its `CREATE TRIGGER` text, as the schema snapshot holds it;
        PostgreSQL: its `pg_get_triggerdef` (events, `UPDATE OF` columns, timing, `WHEN`, function),
        enabled for pcbo's sessions (not `ENABLE REPLICA`, nor under a `session_replication_role` of
        `replica`), and its function's schema, name, language, security and body). A trigger missing
        because the name reaches another relation is `missing: <what it reaches, what it hides>`.

        On PostgreSQL each table is the relation pcbo's own unqualified statements reach (`to_regclass`
        through the session's search path: a view or table of that name in a schema earlier on it is
        what is checked); the rest is read with the search path pinned to `PG_SEARCH_PATH`, every
        function qualified, so nothing the role's search path reaches stands in for the system's."""
        from pcbo_dagster.catalog import sqlite_schema
        from pcbo_dagster.catalog.schema import REFUSE_MUTATION_BODY, append_only_triggers

        expected = append_only_triggers(self.dialect)
        if self.dialect == "sqlite":
            with self.read() as conn:
                return sqlite_trigger_problems(conn, expected, sqlite_schema.STATEMENTS)
        tables = sorted(set(expected.values()))
        with self.read() as conn:
            relations = conn.execute(
                text(
                    "SELECT r.name, pg_catalog.to_regclass(r.name)::pg_catalog.oid "
                    "FROM pg_catalog.unnest(CAST(:names AS pg_catalog.text[])) AS r(name)"
                ),
                {"names": tables},
            ).all()
            oids = {str(r[0]): r[1] for r in relations if r[1] is not None}
            path = list(conn.execute(text("SELECT pg_catalog.current_schemas(false)")).scalar_one())
            conn.execute(text("SELECT pg_catalog.set_config('search_path', :p, true)"), {"p": PG_SEARCH_PATH})
            shadowed = _shadowing_relations(conn, oids, path)
            replica = pg_replica_session(conn)
            rows = conn.execute(
                text(
                    "SELECT t.tgname, t.tgrelid, pg_get_triggerdef(t.oid), t.tgenabled, fn.nspname, "
                    "p.proname, l.lanname, p.prosecdef, p.prosrc, quote_ident(n.nspname), "
                    "quote_ident(fn.nspname), n.nspname FROM pg_trigger t "
                    "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace fn ON fn.oid = p.pronamespace "
                    "JOIN pg_language l ON l.oid = p.prolang "
                    "WHERE t.tgrelid = ANY(CAST(:oids AS oid[])) AND NOT t.tgisinternal"
                ),
                {"oids": list(oids.values())},
            ).all()
        by_name = {(str(r[0]), r[1]): r for r in rows}
        problems: dict[str, str] = {}
        for name, table in expected.items():
            row = by_name.get((name, oids.get(table)))
            if row is None:
                problems[name] = "missing" + (f": {shadowed[table]}" if table in shadowed else "")
                continue
            why = []
            if row[2] != pg_guard_trigger_definition(
                name, f"{row[9]}.{table}", f"{row[10]}.pcbo_refuse_mutation()"
            ):
                why.append(f"its definition is {row[2]!r}")
            if (asleep := pg_trigger_asleep(row[3], replica)) is not None:
                why.append(asleep)
            if (row[4], row[5], row[6], row[7]) != (row[11], "pcbo_refuse_mutation", "plpgsql", False):
                why.append("its function is not pcbo's")
            elif " ".join(str(row[8]).split()) != REFUSE_MUTATION_BODY:
                why.append("its function's body was replaced")
            if why:
                problems[name] = "; ".join(why)
        return problems

    def is_missing_sqlite_file(self) -> bool:
        """True for a SQLite catalog whose file does not exist yet (opening it would create it)."""
        database = self._url.database
        return (
            self.dialect == "sqlite"
            and not _is_sqlite_memory(self._url)
            and database is not None
            and database != ""
            and not Path(database).expanduser().exists()
        )

    # -- migrations ---------------------------------------------------------------------------

    def at_head(self) -> bool:
        """True when the schema is already at HEAD_REVISION (a cheap check that skips Alembic)."""
        try:
            with self.read() as conn:
                row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        except SQLAlchemyError:
            return False
        return row is not None and row[0] == HEAD_REVISION

    def migrate(self) -> None:
        """Upgrade the schema to the newest revision; idempotent and safe to run concurrently.

        A new, empty SQLite catalog is created from the schema snapshot (`fresh_schema`) without
        importing Alembic; an existing one below the newest revision, and PostgreSQL, go through
        Alembic's migrations."""
        if self.at_head():
            return
        if self.dialect == "sqlite":
            from pcbo_dagster.catalog import fresh_schema

            with self.write() as conn:  # BEGIN IMMEDIATE: concurrent creators queue here
                if fresh_schema.is_empty(conn) and fresh_schema.create(conn, HEAD_REVISION):
                    return
        self.migrate_with_alembic()

    def migrate_with_alembic(self) -> None:
        """`migrate` through Alembic's migrations, whatever the database holds."""
        if self.at_head():
            return
        wait = lease_wait_seconds()
        try:
            self._migrate_with_alembic(wait)
        except CatalogLockBusy as exc:
            raise CatalogLockBusy(
                "the catalog's migration waited on a lock another catalog session holds (the migration "
                f"lock or a table it alters: {exc.locked}; pg_locks names it); waited "
                f"{wait:g} s (PCBO_LEASE_WAIT_SECONDS); nothing was migrated",
                locked=exc.locked,
            ) from None

    def _migrate_with_alembic(self, wait: float) -> None:
        from alembic import command
        from alembic.config import Config

        with self.write() as conn:
            if self.dialect == "postgresql":
                # another migrator holds it for one migration: waited for as a lease is
                bound_lock_waits(conn, wait)
                conn.execute(text("SELECT pg_catalog.pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            revisions = _schema_revisions(conn)
            unknown = sorted(set(revisions) - known_revisions())
            if unknown:
                raise CatalogRevisionUnknown(
                    f"the catalog's schema is at Alembic revision {unknown[0]!r}, which this pcbo does not "
                    f"know (its newest is {HEAD_REVISION!r}): a newer pcbo migrated it, or its "
                    "alembic_version row was written by hand; nothing was changed (run the pcbo that "
                    "migrated it, or restore the catalog)"
                )
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
            cfg.set_main_option(
                "sqlalchemy.url", self._url.render_as_string(hide_password=False).replace("%", "%%")
            )
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


class CatalogSequenceBehind(PcboError):
    """A PostgreSQL catalog table's id sequence was set back behind the table's largest id (exit 1)."""


class CatalogLockBusy(PcboError):
    """Another catalog session held a lock pcbo needs for all of `PCBO_LEASE_WAIT_SECONDS` (exit 1);
    `locked`: what, as PostgreSQL's error says it (`locked_catalog_object`)."""

    def __init__(self, message: str, locked: str = UNNAMED_LOCK) -> None:
        super().__init__(message)
        self.locked = locked


class CatalogRevisionUnknown(PcboError):
    """The catalog's `alembic_version` names a revision this pcbo's migrations do not hold (exit 1)."""


def known_revisions() -> set[str]:
    """The Alembic revisions of `migrations/versions` (`0001` … `HEAD_REVISION`: each file's prefix)."""
    return {path.name.split("_", 1)[0] for path in (MIGRATIONS_DIR / "versions").glob("[0-9]*_*.py")}


def _schema_revisions(conn: Connection) -> list[str]:
    """The revisions `alembic_version` holds (none before the first migration)."""
    if not inspect(conn).has_table("alembic_version"):
        return []
    return [str(r[0]) for r in conn.execute(text("SELECT version_num FROM alembic_version"))]


# -- statements both dialects write as ON CONFLICT ----------------------------------------------


def _insert(conn: Connection, table: Table) -> Any:
    dialect = pg_dialect if conn.dialect.name == "postgresql" else sqlite_dialect
    return dialect.insert(table)


def insert_ignore(conn: Connection, table: Table, values: dict[str, Any], keys: list[str]) -> bool:
    """INSERT ... ON CONFLICT (keys) DO NOTHING; True when the row was inserted."""
    stmt = _on_conflict(conn, table, tuple(values), tuple(keys), update=False)
    return conn.execute(stmt, _bound(values)).rowcount == 1


def insert_if_absent(conn: Connection, table: Table, values: dict[str, Any], keys: list[str]) -> bool:
    """`insert_ignore` into an append-only table: its SQLite trigger (`<table>_no_replace`) refuses an
    insert whose key is taken before ON CONFLICT DO NOTHING is reached, so a row already there is looked
    for first, in the same transaction. True when the row was inserted."""
    taken = conn.execute(
        select(literal(1)).select_from(table).where(*(table.c[k] == values[k] for k in keys)).limit(1)
    ).first()
    return taken is None and insert_ignore(conn, table, values, keys)


def insert_ignore_many(conn: Connection, table: Table, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """`insert_ignore` of many rows in one statement."""
    conn.execute(_insert(conn, table).on_conflict_do_nothing(index_elements=keys), rows)


def upsert(conn: Connection, table: Table, values: dict[str, Any]) -> None:
    """INSERT, or UPDATE the columns of `values` beyond the primary key when the row exists."""
    keys = tuple(c.name for c in table.primary_key.columns)
    conn.execute(_on_conflict(conn, table, tuple(values), keys, update=True), _bound(values))


#: The ON CONFLICT statements of `insert_ignore` and `upsert`, by dialect, table, the columns given,
#: the conflict keys and the kind. The values are bound parameters, so one statement serves every
#: call (issue 18: building a statement around the values and computing its cache key took ~100 us a
#: call, several calls per audit append).
_ON_CONFLICT: dict[tuple[str, Table, tuple[str, ...], tuple[str, ...], bool], Any] = {}

#: Prefix of the bound parameters of `_on_conflict`'s statements (no clash with a column's name).
_BIND = "v_"


def _on_conflict(
    conn: Connection, table: Table, columns: tuple[str, ...], keys: tuple[str, ...], *, update: bool
) -> Any:
    cache_key = (conn.dialect.name, table, columns, keys, update)
    stmt = _ON_CONFLICT.get(cache_key)
    if stmt is None:
        # Each value bound with its column's type, as `.values(**values)` bound it; KeyError for a
        # column the table lacks.
        insert = _insert(conn, table).values(
            {table.c[name]: bindparam(_BIND + name, type_=table.c[name].type) for name in columns}
        )
        if update:
            stmt = insert.on_conflict_do_update(
                index_elements=list(keys), set_={k: insert.excluded[k] for k in columns if k not in keys}
            )
        else:
            # psycopg 3 forgets an INSERT's row count once SQLAlchemy closes the cursor (SQLAlchemy
            # issue 10696): `preserve_rowcount` keeps it for insert_ignore's answer.
            stmt = insert.on_conflict_do_nothing(index_elements=list(keys)).execution_options(
                preserve_rowcount=True
            )
        _ON_CONFLICT[cache_key] = stmt
    return stmt


def _bound(values: dict[str, Any]) -> dict[str, Any]:
    return {_BIND + name: value for name, value in values.items()}


def _retry_locked(fn: Callable[[], Any], attempts: int = 50, delay: float = 0.1) -> Any:
    """Call `fn`, retrying while SQLite says the database is locked or busy."""
    for i in range(attempts):
        try:
            return fn()
        except (sqlite3.OperationalError, OperationalError) as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or i == attempts - 1:
                raise
            time.sleep(delay)
    return None


def pg_replica_session(conn: Connection) -> bool:
    """Whether this PostgreSQL session's `session_replication_role` is `replica` (set for the role or
    the database, say), in which ORIGIN triggers, the ones `CREATE TRIGGER` makes, do not fire."""
    setting = conn.execute(text("SELECT pg_catalog.current_setting('session_replication_role')")).scalar()
    return bool(setting == "replica")


#: pg_class.relkind as a finding names it.
_RELKINDS = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
}


def _shadowing_relations(conn: Connection, oids: dict[str, Any], path: list[str]) -> dict[str, str]:
    """Table name -> what the name reaches when that is not a plain table alone of its name on the
    search path `path` (a view, or any relation in a schema earlier on it than another of that name):
    its schema and kind, and those of the relations of that name it hides."""
    rows = conn.execute(
        text(
            "SELECT c.relname, c.oid = ANY(CAST(:oids AS oid[])), n.nspname, c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = ANY(CAST(:names AS text[])) "
            "AND n.nspname = ANY(CAST(:path AS text[])) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        ),
        {"oids": list(oids.values()), "names": list(oids), "path": path},
    ).all()
    out: dict[str, str] = {}
    for name in oids:
        found = [(str(r[2]), _RELKINDS[str(r[3])]) for r in rows if r[0] == name and r[1]]
        hidden = [f"{_RELKINDS[str(r[3])]} {r[2]}.{name}" for r in rows if r[0] == name and not r[1]]
        if not found or (found[0][1] == "table" and not hidden):
            continue
        schema, kind = found[0]
        said = f"the name {name} reaches a {kind} in schema {schema} (the first on the search path)"
        out[name] = said + (f", not the {', the '.join(hidden)}" if hidden else "")
    return out


def sqlite_begins_as_asked(engine: Engine) -> None:
    """`engine`'s SQLite transactions begin with pcbo's own `BEGIN` (its connections turn the driver's
    off: `isolation_level = None`, so savepoints work): DEFERRED, or IMMEDIATE on a connection from
    `write_connection`. The one of the catalog and a SQL target."""

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def write_connection(conn: Connection) -> Connection:
    """`conn` for a write transaction (SQLite: `BEGIN IMMEDIATE`, the database lock taken at once)."""
    if conn.dialect.name == "sqlite":
        return conn.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
    return conn


def pg_guard_trigger_definition(name: str, table: str, function: str) -> str:
    """`pg_get_triggerdef` of the append-only trigger `name` as pcbo creates it on `table` (schema
    qualified) calling `function`: a `..._append_only` trigger refuses each row's DELETE or UPDATE, the
    other (`..._no_truncate`) a TRUNCATE. The one expected definition of the catalog's append-only
    triggers and a SQL target's journal's."""
    when, each = (
        ("BEFORE DELETE OR UPDATE", "ROW")
        if name.endswith("_append_only")
        else ("BEFORE TRUNCATE", "STATEMENT")
    )
    return f"CREATE TRIGGER {name} {when} ON {table} FOR EACH {each} EXECUTE FUNCTION {function}"


def pg_trigger_asleep(tgenabled: str, replica: bool) -> str | None:
    """Why a PostgreSQL trigger of `pg_trigger.tgenabled` does not fire in a session (`replica`:
    `pg_replica_session`), or None when it fires: disabled (`D`), `ENABLE REPLICA` (`R`: only in
    replica sessions, never in pcbo's own), or an ORIGIN one (`O`) in a replica session. The one
    check of the catalog's append-only triggers and a SQL target's journal's."""
    if tgenabled not in ("O", "A"):
        return "it is disabled"
    if tgenabled == "O" and replica:
        return "it does not fire: the session's session_replication_role is replica"
    return None


def sqlite_trigger_problems(
    conn: Connection, expected: dict[str, str], statements: Iterable[str]
) -> dict[str, str]:
    """For each trigger of `expected` (name -> the table it must be on) that is not exactly as pcbo
    creates it on a SQLite database (its `CREATE TRIGGER` text among `statements`), why: `missing`
    (also when one of that name is on another table, where it guards nothing) or its definition
    differs. The one check of both the catalog's append-only triggers and a SQL target's journal's."""
    creates = {s.split()[2]: s for s in statements if s.startswith("CREATE TRIGGER ")}
    rows = conn.execute(text("SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'")).all()
    found = {(str(r[0]), str(r[1])): str(r[2]) for r in rows}
    problems = {}
    for name, table in expected.items():
        if (name, table) not in found:
            problems[name] = "missing"
        elif found[(name, table)] != creates[name]:
            problems[name] = "its definition is not the one pcbo creates"
    return problems

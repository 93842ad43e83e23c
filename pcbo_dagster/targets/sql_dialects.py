"""PostgreSQL and SQLite as seen by a SQL target: connections, what a table looks like, which column
types accept which values, and how a row's exact prior image is kept and written back.

**Connections.** PostgreSQL through psycopg 3 with fixed session settings (UTC, ISO dates, shortest
exact floats, hex bytea), so the text a column is read as never depends on the server's or the
role's defaults: that text is the row image the journal keeps and the rollback script writes. The
session's `search_path` is pinned as it connects: `pg_catalog` first, then the schemas the role's own
search path named at that moment (`$user` expanded; so the table's own triggers find what they
refer to), `pg_temp` last. So no schema the role (or `$user`) lists before `pg_catalog` stands in for
a catalog view, a type or a function pcbo names (`pg_catalog.unnest`, and the `=` comparing a key,
are named in full: a function or operator elsewhere with a closer signature would win; the reads of
the system catalogs search `pg_catalog` alone, `catalog_path_only`), and a schema created after the
session started is not searched. An unqualified target table name resolves in
those schemas (`resolve_table`). A trigger or rule on the table runs in pcbo's own transaction and
may change any of these settings: every read of rows sets them again first (`pin_settings`).
SQLite write transactions start with `BEGIN IMMEDIATE` (writers
queue on the database lock; busy timeout 30 s); nothing else about the user's database file is
changed (no journal-mode switch), foreign keys are enforced. A dry-run opens SQLite read-only and
never creates a file.

**Row images** (what the journal keeps of a row before the run changed it): on PostgreSQL every
column's text form (`col::text`), written back with `CAST(text AS <the column's type>)` (exact for
every built-in type, as `pg_dump` relies on); on SQLite every column's stored value, tagged with its
storage class (`["i", "5"]`, `["r", "1.5"]`, `["t", "x"]`, `["b", "<base64>"]`, null).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, OperationalError

from pcbo_dagster.catalog.database import (
    PG_SEARCH_PATH,
    lock_not_granted,
    lock_timeout_value,
    locked_catalog_object,
    sqlalchemy_url,
    sqlite_begins_as_asked,
)
from pcbo_dagster.core.errors import InvalidInput, PcboError
from pcbo_dagster.core.instants import parse_instant, to_micros
from pcbo_dagster.core.recorded_text import has_control_character
from pcbo_dagster.core.sql_outcomes import (
    BOOLEAN,
    FLOAT,
    INTEGER,
    JSON_TEXT,
    STRING,
    TIMESTAMP,
    UNREADABLE_INSTANT,
)
from pcbo_dagster.io.env_vars import lease_wait_seconds
from pcbo_dagster.io.redaction import redact_url

POSTGRESQL = "postgresql"
SQLITE = "sqlite"
SQLITE_BUSY_TIMEOUT_S = 30.0
#: PostgreSQL session settings that make every column's text form independent of the server.
PG_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO,YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "standard_conforming_strings": "on",
}
PG_SESSION_OPTIONS = " ".join(f"-c {name}={value}" for name, value in PG_SETTINGS.items())
#: Connection-record key of the schemas the role's own search path named (`resolve_table`).
_ROLE_SCHEMAS = "pcbo_role_schemas"


@dataclass(frozen=True)
class ColumnInfo:
    """A column of the target table: its name, its type as the database spells it (PostgreSQL
    `format_type`, SQLite's declared type), its base type name (PostgreSQL) and whether it is
    NOT NULL."""

    name: str
    type_text: str
    base_type: str
    not_null: bool
    typmod: int = -1


def dialect_of(url: URL) -> str:
    backend = url.get_backend_name()
    if backend not in (POSTGRESQL, SQLITE):
        raise InvalidInput("target.url", "must be a postgresql:// or sqlite:/// URL")
    return backend


def parse_target_url(url: str) -> URL:
    """A target URL as SQLAlchemy opens it; `InvalidInput` on `target.url` when it does not parse (a
    port that is not a number, a bracket left open) or holds a control character, without the URL
    (it may hold a password)."""
    try:
        parsed = sqlalchemy_url(url)
    except (ValueError, ArgumentError):
        raise InvalidInput(
            "target.url", "is not a database URL (its host, port or path do not parse)"
        ) from None
    # as written or percent-encoded: the location is printed into logs and the rollback script's
    # comments, where a line break would start a statement the DBA runs
    parts = [url, parsed.database or "", parsed.host or ""]
    parts += [v for value in parsed.query.values() for v in ((value,) if isinstance(value, str) else value)]
    if any(has_control_character(part) for part in parts):
        raise InvalidInput(
            "target.url", "holds a control character (a line break, a tab): a database URL never does"
        )
    return parsed


#: libpq URI query parameters that say which server and database (never a credential): a location
#: keeps them.
_WHERE_PARAMETERS = ("host", "hostaddr", "port", "dbname", "service")


def location_of(url: str) -> str:
    """Where a target lives, without credentials: `postgresql://host:port/db`, `sqlite:////path`. A
    server named in the query (libpq's `postgresql://user@/db?host=H&port=P`) is where it lives too:
    a plain host and port become the URL's own, a socket directory (or several hosts, a service)
    stays in the query; every other parameter (passwords, TLS settings) is dropped."""
    parsed = parse_target_url(url)
    if parsed.get_backend_name() == SQLITE:
        return f"sqlite:///{parsed.database or ''}"
    where = {k: parsed.query[k] for k in _WHERE_PARAMETERS if k in parsed.query}
    host, port = where.get("host"), where.get("port")
    if (
        parsed.host is None
        and isinstance(host, str)
        and host
        and not host.startswith("/")
        and "," not in host
    ):
        del where["host"]
        parsed = parsed.set(host=host)
    if parsed.port is None and isinstance(port, str) and port.isdigit():
        del where["port"]
        parsed = parsed.set(port=int(port))
    # redact_url drops the userinfo (everything before the last `@`: a password may hold one)
    plain = redact_url(parsed.set(drivername=POSTGRESQL, query={}).render_as_string(hide_password=True))
    pairs = [
        (k, v) for k, values in where.items() for v in ((values,) if isinstance(values, str) else values)
    ]
    return plain + (f"?{urlencode(pairs, safe='/,')}" if pairs else "")


def target_lock_busy(exc: OperationalError) -> PcboError:
    """`TargetBusy` for a statement on the target database that waited its whole `lock_timeout`
    (`lock_not_granted(exc)`), naming what was locked (the table, when PostgreSQL's error says it)."""
    from pcbo_dagster.targets.sql_locks import TargetBusy

    return TargetBusy(
        f"{locked_catalog_object(exc, 'target table')} is locked by another session of the target "
        f"database (pg_locks names it); waited {lease_wait_seconds():g} s (PCBO_LEASE_WAIT_SECONDS); "
        "the target transaction that waited was rolled back"
    )


def _lock_not_granted(context: Any) -> None:
    """The target engine's `handle_error`: a lock not granted is `target_lock_busy`."""
    exc = context.sqlalchemy_exception
    if isinstance(exc, OperationalError) and lock_not_granted(exc):
        raise target_lock_busy(exc) from None


def sqlite_path(url: URL) -> Path:
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        raise InvalidInput("target.url", "an in-memory SQLite database cannot be a backfill target")
    return Path(database).expanduser().resolve()


def _pinned_path(schemas: list[str]) -> str:
    """The search path a session is pinned to: `pg_catalog`, the role's own schemas, `pg_temp`."""
    return ", ".join(["pg_catalog", *(quote(s) for s in schemas), "pg_temp"])


def open_engine(url: str, read_only: bool = False) -> Engine:
    """An engine on the target database (see the module doc). SQLite: the file must exist."""
    parsed = parse_target_url(url)
    if dialect_of(parsed) == POSTGRESQL:
        # Every lock is waited for PCBO_LEASE_WAIT_SECONDS at most (`LOCK TABLE` on the table by hand,
        # say), then `TargetBusy` naming it (`_lock_not_granted`); the scope's queue waits as long.
        wait = lock_timeout_value(lease_wait_seconds())
        pg_engine = create_engine(
            parsed,
            pool_pre_ping=True,
            connect_args={
                "options": f"{PG_SESSION_OPTIONS} -c lock_timeout={wait}",
                "application_name": "pcbo",
            },
        )
        event.listen(pg_engine, "handle_error", _lock_not_granted)

        @event.listens_for(pg_engine, "connect")
        def _pin_search_path(dbapi_conn: Any, record: Any) -> None:
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT pg_catalog.current_schemas(false)")
                row = cur.fetchone()
                schemas = [str(s) for s in (row[0] if row else []) if s not in ("pg_catalog", "pg_temp")]
                record.info[_ROLE_SCHEMAS] = schemas
                path = _pinned_path(schemas)
                cur.execute("SELECT pg_catalog.set_config('search_path', %s, false)", (path,))
            dbapi_conn.commit()

        return pg_engine
    path = sqlite_path(parsed)
    if not path.is_file():
        raise InvalidInput("target.url", f"no SQLite database at {path} (create the table first)")
    if read_only:
        engine = create_engine(
            f"sqlite:///file:{path}?mode=ro&uri=true", connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}
        )
    else:
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
            raise InvalidInput("target.url", f"{path} (or its directory) is not writable")
        engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # BEGIN is ours (below), so savepoints work
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    sqlite_begins_as_asked(engine)

    return engine


def pin_settings(conn: Connection) -> None:
    """Set the session's settings (`PG_SETTINGS`, the path pinned as it connected) again for the rest
    of `conn`'s transaction, before pcbo reads rows it compares: a trigger or rule on the table runs
    in pcbo's own transaction and may change them (`set_config('extra_float_digits', '-15', ...)`
    makes floats read rounded, so a row the restore skipped could read as restored). No-op on SQLite."""
    if conn.dialect.name != POSTGRESQL:
        return
    schemas = conn.connection.info.get(_ROLE_SCHEMAS, [])
    settings = {
        **PG_SETTINGS,
        "search_path": ", ".join(["pg_catalog", *(quote(s) for s in schemas), "pg_temp"]),
    }
    conn.execute(
        text(
            "SELECT " + ", ".join(f"pg_catalog.set_config(:n{i}, :v{i}, true)" for i in range(len(settings)))
        ),
        {
            **{f"n{i}": name for i, name in enumerate(settings)},
            **{f"v{i}": value for i, value in enumerate(settings.values())},
        },
    )


#: The equality operator comparing key values on PostgreSQL: the catalog's, whatever the path holds.
PG_EQUALS = "OPERATOR(pg_catalog.=)"


def equals(dialect: str) -> str:
    """The `=` of a key comparison (PostgreSQL: `PG_EQUALS`)."""
    return PG_EQUALS if dialect == POSTGRESQL else "="


def quote(name: str) -> str:
    """An identifier quoted (always: case and reserved words kept; the same for both dialects)."""
    return '"' + name.replace('"', '""') + '"'


# -- what the table looks like ----------------------------------------------------------------------


def catalog_path_only(conn: Connection) -> None:
    """For the rest of `conn`'s transaction, search `pg_catalog` (and `pg_temp`) only: pcbo's reads
    of the system catalogs then use no operator or function of another schema. `pg_catalog` first is
    not enough for those: an operator with the exact argument types (`=(oid, regclass)` in `public`)
    wins over the catalog's that needs a cast, so it could make `to_regclass` name another table.
    A name the catalogs give back (`format_type`) is then qualified unless it is `pg_catalog`'s.
    No-op on SQLite."""
    if conn.dialect.name == POSTGRESQL:
        conn.execute(text("SELECT pg_catalog.set_config('search_path', :p, true)"), {"p": PG_SEARCH_PATH})


def resolve_table(conn: Connection, table: str) -> tuple[str, str] | None:
    """(schema, name) of the table `table` names (`name` or `schema.name`), or None when there is no
    such table (PostgreSQL: an unqualified name resolves through the role's own search path, read as
    the session connected, before it was pinned: `open_engine`)."""
    schema, _, name = table.rpartition(".")
    if conn.dialect.name == SQLITE:
        if schema not in ("", "main"):
            return None
        row = conn.execute(
            text("SELECT name FROM sqlite_master WHERE type = 'table' AND name = :n"), {"n": name}
        ).first()
        return None if row is None else ("main", str(row[0]))
    parts = table.split(".")
    if len(parts) > 1:
        candidates = [".".join(quote(part) for part in parts)]
    else:
        searched = conn.connection.info.get(_ROLE_SCHEMAS, [])
        candidates = [f"{quote(schema_name)}.{quote(table)}" for schema_name in searched]
    for qualified in candidates:
        row = conn.execute(
            text(
                "SELECT n.nspname, c.relname, c.relkind IN ('r', 'p') FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(:q)"
            ),
            {"q": qualified},
        ).first()
        if row is not None:  # the first relation of that name on the path, a table or not
            return (str(row[0]), str(row[1])) if row[2] else None
    return None


def table_exists(conn: Connection, schema: str, name: str) -> bool:
    """Whether `schema` (SQLite: `main`) holds a table called exactly `name`."""
    if conn.dialect.name == SQLITE:
        count = conn.execute(
            text("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = :n"), {"n": name}
        ).scalar()
    else:
        count = conn.execute(
            text("SELECT count(*) FROM pg_tables WHERE schemaname = :s AND tablename = :n"),
            {"s": schema, "n": name},
        ).scalar()
    return bool(count)


def table_columns(conn: Connection, schema: str, name: str) -> list[ColumnInfo]:
    if conn.dialect.name == SQLITE:
        rows = conn.exec_driver_sql(f"PRAGMA main.table_info({quote(name)})").all()
        return [ColumnInfo(str(r[1]), str(r[2] or ""), str(r[2] or "").upper(), bool(r[3])) for r in rows]
    rows = conn.execute(
        text(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), "
            "COALESCE(bt.typname, t.typname), a.attnotnull, a.atttypmod "
            "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype "
            "WHERE a.attrelid = to_regclass(:q) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
        ),
        {"q": f"{quote(schema)}.{quote(name)}"},
    ).all()
    return [ColumnInfo(str(r[0]), str(r[1]), str(r[2]), bool(r[3]), int(r[4])) for r in rows]


def unique_column_sets(conn: Connection, schema: str, name: str) -> list[set[str]]:
    """The column sets of the table's primary key and full (non-partial, non-expression) unique
    indexes."""
    if conn.dialect.name == SQLITE:
        sets: list[set[str]] = []
        info = conn.exec_driver_sql(f"PRAGMA main.table_info({quote(name)})").all()
        pk = {str(r[1]) for r in info if r[5]}
        if pk:
            sets.append(pk)
        for index in conn.exec_driver_sql(f"PRAGMA main.index_list({quote(name)})").all():
            if index[2] and not index[4]:  # unique, not partial
                cols = conn.exec_driver_sql(f"PRAGMA main.index_info({quote(str(index[1]))})").all()
                if all(c[2] is not None for c in cols):
                    sets.append({str(c[2]) for c in cols})
        return sets
    rows = conn.execute(
        text(
            "SELECT ARRAY(SELECT a.attname FROM pg_catalog.unnest(i.indkey) k "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k) "
            "FROM pg_index i WHERE i.indrelid = to_regclass(:q) AND i.indisunique "
            "AND i.indpred IS NULL AND i.indexprs IS NULL"
        ),
        {"q": f"{quote(schema)}.{quote(name)}"},
    ).all()
    return [set(r[0]) for r in rows]


#: A foreign key referencing a table: (the referencing table as SQL names it, its columns, the
#: referenced columns, the delete action).
ForeignKey = tuple[str, list[str], list[str], str]


def cascading_foreign_keys(conn: Connection, schema: str, name: str) -> list[ForeignKey]:
    """The foreign keys of other tables (or the table itself) referencing `schema.name` whose delete
    action changes their rows (`CASCADE`, `SET NULL`, `SET DEFAULT`)."""
    actions = {"c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
    if conn.dialect.name == SQLITE:
        found: list[ForeignKey] = []
        tables = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'")).scalars().all()
        for table in tables:
            keys: dict[int, list[Any]] = {}
            for row in conn.exec_driver_sql(f"PRAGMA main.foreign_key_list({quote(str(table))})").all():
                keys.setdefault(int(row[0]), []).append(row)
            for rows in keys.values():
                action = str(rows[0][6]).upper()
                if str(rows[0][2]).lower() != name.lower() or action not in actions.values():
                    continue
                referenced = [str(r[4]) for r in rows if r[4] is not None]
                if len(referenced) < len(rows):  # none named: the parent's primary key
                    info = conn.exec_driver_sql(f"PRAGMA main.table_info({quote(name)})").all()
                    referenced = [str(r[1]) for r in sorted((r for r in info if r[5]), key=lambda r: r[5])]
                found.append((quote(str(table)), [str(r[3]) for r in rows], referenced, action))
        return found
    catalog_path_only(conn)
    found_rows = conn.execute(
        text(
            "SELECT pg_catalog.format('%I.%I', n.nspname, t.relname), c.confdeltype, "
            "ARRAY(SELECT a.attname FROM pg_catalog.unnest(c.conkey) WITH ORDINALITY k(num, i) "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.num ORDER BY k.i), "
            "ARRAY(SELECT a.attname FROM pg_catalog.unnest(c.confkey) WITH ORDINALITY k(num, i) "
            "JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.num ORDER BY k.i) "
            "FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE c.contype = 'f' AND c.confrelid = CAST(to_regclass(:q) AS oid) "
            "AND c.confdeltype IN ('c', 'n', 'd')"
        ),
        {"q": f"{quote(schema)}.{quote(name)}"},
    ).all()
    pin_settings(conn)
    return [
        (str(r[0]), [str(c) for c in r[2]], [str(c) for c in r[3]], actions[str(r[1])]) for r in found_rows
    ]


def missing_privileges(conn: Connection, schema: str, name: str, needed: tuple[str, ...]) -> list[str]:
    """The table privileges of `needed` the connecting role lacks (SQLite has no roles: none)."""
    if conn.dialect.name == SQLITE:
        return []
    qualified = f"{quote(schema)}.{quote(name)}"
    return [
        privilege
        for privilege in needed
        if not conn.execute(
            text("SELECT has_table_privilege(:q, :p)"), {"q": qualified, "p": privilege}
        ).scalar()
    ]


def current_role(conn: Connection) -> str:
    if conn.dialect.name == SQLITE:
        return "sqlite"
    return str(conn.execute(text("SELECT current_user")).scalar())


# -- which column types accept the run's values ------------------------------------------------------

_PG_ACCEPTS = {
    STRING: {"text", "varchar", "citext"},
    JSON_TEXT: {"text", "varchar", "citext", "json", "jsonb"},
    INTEGER: {"int2", "int4", "int8", "numeric", "float8"},
    FLOAT: {"float8", "numeric"},
    BOOLEAN: {"bool"},
    TIMESTAMP: {"timestamptz", "text", "varchar"},
}
_PG_WHY = {
    "bpchar": "character(n) pads values with blanks, so a row would not read back as written",
    "timestamp": "timestamp without time zone would drop the instant's offset: use timestamp with time zone",
    "float4": "real keeps 24 bits of mantissa, so values would not read back as written",
    "uuid": "uuid text is normalised, so a row would not read back as written",
}
_SQLITE_ACCEPTS = {
    STRING: {"TEXT", "BLOB"},
    JSON_TEXT: {"TEXT", "BLOB"},
    INTEGER: {"INTEGER", "NUMERIC", "REAL", "BLOB"},
    FLOAT: {"INTEGER", "NUMERIC", "REAL", "BLOB"},
    BOOLEAN: {"INTEGER", "NUMERIC", "BLOB"},
    TIMESTAMP: {"TEXT", "NUMERIC", "BLOB"},
}
_KIND_TEXT = {
    STRING: "strings",
    JSON_TEXT: "JSON values (objects, arrays or mixed types)",
    INTEGER: "integers",
    FLOAT: "numbers",
    BOOLEAN: "booleans",
    TIMESTAMP: "instants",
}


def sqlite_affinity(declared: str) -> str:
    """SQLite's column affinity of a declared type (section 3.1 of its datatype documentation)."""
    upper = declared.upper()
    if "INT" in upper:
        return "INTEGER"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if upper == "" or "BLOB" in upper:
        return "BLOB"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def refusal(dialect: str, column: ColumnInfo, kind: str) -> str | None:
    """Why `column` cannot hold the run's values of `kind` exactly (None: it can)."""
    if dialect == SQLITE:
        affinity = sqlite_affinity(column.type_text)
        if affinity in _SQLITE_ACCEPTS[kind]:
            return None
        return (
            f"column {column.name!r} ({column.type_text or 'no type'}, {affinity} affinity) would change "
            f"{_KIND_TEXT[kind]}: SQLite converts values to a column's affinity"
        )
    base = column.base_type
    if base in _PG_ACCEPTS[kind]:
        if kind == FLOAT and base == "numeric" and column.typmod != -1:
            return (
                f"column {column.name!r} is {column.type_text}, which rounds numbers: use numeric or double"
            )
        return None
    why = _PG_WHY.get(base, f"does not hold {_KIND_TEXT[kind]}")
    return f"column {column.name!r} is {column.type_text}: {why}"


def instants_as_text(dialect: str, column: ColumnInfo) -> bool:
    """Whether the run's instants are bound to `column` as their canonical text
    (`YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, what the records say), not as a `datetime`: on SQLite, and into
    a PostgreSQL text column (a `timestamptz` cast to text would be stored as `2024-01-01 01:00:00+00`)."""
    return dialect == SQLITE or column.base_type in ("text", "varchar")


def number_bind(dialect: str, column: ColumnInfo, value: Any) -> Any:
    """A number as bound to `column`: into a PostgreSQL `numeric`, a float as the `Decimal` of its
    shortest text (bound as double precision and cast, it would keep 15 significant digits)."""
    if dialect == POSTGRESQL and column.base_type == "numeric" and isinstance(value, float):
        return Decimal(repr(value))
    return value


def instant_refusal(dialect: str, column: ColumnInfo) -> str | None:
    """Why a freshness or tombstone column cannot be read as instants (None: it can). On SQLite a
    column whose affinity turns instants into numbers (INTEGER, REAL) holds none: every live row's
    value would be unreadable, counted later than any snapshot, and every record refused."""
    if dialect == SQLITE:
        affinity = sqlite_affinity(column.type_text)
        if affinity in _SQLITE_ACCEPTS[TIMESTAMP]:
            return None
        return (
            f"column {column.name!r} ({column.type_text}, {affinity} affinity) holds numbers, not "
            "instants: use a TEXT column of RFC 3339 instants (2024-01-01T00:00:00Z)"
        )
    if column.base_type in ("timestamptz", "text", "varchar"):
        return None
    why = _PG_WHY.get(column.base_type, "is not a timestamp with time zone")
    return f"column {column.name!r} is {column.type_text}: {why}"


def instant_of(value: Any) -> int | None:
    """A freshness or tombstone value as microseconds (None: not set); unreadable values count as
    later than any snapshot (`UNREADABLE_INSTANT`)."""
    if value is None:
        return None
    if hasattr(value, "tzinfo") and getattr(value, "tzinfo", None) is not None:
        return to_micros(value)
    if isinstance(value, str):
        micros = parse_instant(value)
        if micros is not None:
            return micros
    return UNREADABLE_INSTANT


# -- row images and literals --------------------------------------------------------------------------


def image_select(dialect: str, column: str) -> str:
    """The select expression of a column's image: its text form on PostgreSQL, its value on SQLite."""
    return f"{quote(column)}::text" if dialect == POSTGRESQL else quote(column)


def encode_image_value(dialect: str, value: Any) -> Any:
    """A column's image value as JSON (PostgreSQL: already text)."""
    if value is None or dialect == POSTGRESQL:
        return value
    if isinstance(value, bool | int):
        return ["i", str(int(value))]  # as text: SQLite integers reach past RFC 8785's 2**53
    if isinstance(value, float):
        return ["r", repr(value)]
    if isinstance(value, str):
        return ["t", value]
    if isinstance(value, bytes | bytearray | memoryview):
        return ["b", base64.b64encode(bytes(value)).decode("ascii")]
    raise ValueError(f"unexpected SQLite value of type {type(value).__name__}")


def decode_image_value(dialect: str, image: Any) -> Any:
    """The value to bind to write an image back (PostgreSQL: the text, cast by `bind_expression`)."""
    if image is None or dialect == POSTGRESQL:
        return image
    tag, payload = image
    if tag == "i":
        return int(payload)
    if tag == "r":
        return float(payload)
    if tag == "t":
        return str(payload)
    return base64.b64decode(payload)


def bind_expression(dialect: str, parameter: str, column: ColumnInfo) -> str:
    """`:parameter` as an expression of the column's type (PostgreSQL: cast from its text form)."""
    if dialect == POSTGRESQL:
        return f"CAST(:{parameter} AS {column.type_text})"
    return f":{parameter}"


def literal(dialect: str, image: Any, column: ColumnInfo) -> str:
    """An image value as a SQL literal of the column's type, for the rollback script."""
    if image is None:
        return "NULL"
    if dialect == POSTGRESQL:
        return "'" + str(image).replace("'", "''") + "'::" + column.type_text
    tag, payload = image
    if tag == "i":
        return str(int(payload))
    if tag == "r":
        number = float(payload)
        if number != number:
            return "NULL"
        if number in (float("inf"), float("-inf")):
            return "9e999" if number > 0 else "-9e999"
        return repr(number)
    if tag == "t":
        # a NUL (which SQLite stores in text) ends the line for the sqlite3 shell: joined as char(0)
        pieces = ["'" + piece.replace("'", "''") + "'" for piece in str(payload).split("\x00")]
        return pieces[0] if len(pieces) == 1 else "(" + " || char(0) || ".join(pieces) + ")"
    return "X'" + base64.b64decode(payload).hex().upper() + "'"


def key_image(dialect: str, value: Any) -> Any:
    """A record's key value as a row image value (the key of a row the run inserted, so its undo can
    find it): PostgreSQL's text input form, or SQLite's tagged value."""
    if dialect == SQLITE:
        return encode_image_value(dialect, value)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return repr(value) if isinstance(value, float) else str(value)

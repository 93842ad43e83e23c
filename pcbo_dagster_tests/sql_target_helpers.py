"""What the SQL target tests share: the test table, requests naming it, running `pcbo` in this process,
and reading a table whole (a dump compared before and after)."""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from sqlalchemy.engine import make_url

from pcbo_dagster.cli.main import main

#: The test table: a key, the columns the backfill writes (`COLUMNS`), a freshness and a tombstone
#: column, and a column only the live pipeline writes (`note`, with a default).
PG_TABLE = """
CREATE TABLE {name} (
    id text PRIMARY KEY,
    occurred_at timestamptz NOT NULL,
    amount integer CHECK (amount >= 0),
    label varchar(8),
    updated_at timestamptz,
    deleted_at timestamptz,
    note text DEFAULT 'live'
)
"""
SQLITE_TABLE = """
CREATE TABLE {name} (
    id TEXT PRIMARY KEY,
    occurred_at TEXT NOT NULL,
    amount INTEGER CHECK (amount >= 0),
    label TEXT CHECK (length(label) <= 8),
    updated_at TEXT,
    deleted_at TEXT,
    note TEXT DEFAULT 'live'
)
"""
COLUMNS = {"id": "id", "occurredAt": "occurred_at", "amount": "amount", "label": "label"}
START = "2024-01-01T00:00:00Z"


class Run(NamedTuple):
    status: int
    document: Any
    stderr: str


def pcbo(args: Sequence[str | Path]) -> Run:
    """`pcbo *args` in this process: exit status, the JSON document printed, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main([str(a) for a in args])
    text = out.getvalue()
    return Run(status, json.loads(text) if text.strip() else None, err.getvalue())


def record(i: int, amount: int | None = None, label: str = "x", hour: int | None = None) -> dict[str, Any]:
    return {
        "id": f"ev-{i:04d}",
        "occurredAt": f"2024-01-01T{(i % 4) if hour is None else hour:02d}:{i % 60:02d}:00Z",
        "jurisdiction": "US",
        "consentGranted": True,
        "amount": i if amount is None else amount,
        "label": label,
    }


def request(
    url: str,
    records: list[dict[str, Any]],
    run_id: str = "run-1",
    table: str = "events",
    **target: Any,
) -> dict[str, Any]:
    return {
        "runId": run_id,
        "dataset": "events",
        "start": START,
        "end": "2024-01-01T04:00:00Z",
        "chunkSeconds": 3600,
        "sourceRecords": records,
        "target": {"kind": "sql", "url": url, "table": table, "key": ["id"], "columns": COLUMNS, **target},
    }


def write_json(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    return path


# -- the databases ------------------------------------------------------------------------------------


def conninfo(url: str) -> str:
    """A libpq connection string of a SQLAlchemy PostgreSQL URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def run_sql(url: str, *statements: str) -> None:
    if url.startswith("sqlite"):
        with sqlite3.connect(make_url(url).database or "") as conn:
            for statement in statements:
                conn.executescript(statement)
        return
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    if url.startswith("sqlite"):
        with sqlite3.connect(make_url(url).database or "") as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        return [tuple(r) for r in conn.execute(sql).fetchall()]


def create_table(url: str, name: str = "events") -> None:
    ddl = SQLITE_TABLE if url.startswith("sqlite") else PG_TABLE
    run_sql(url, ddl.format(name=name))


def create_demo_events_table(url: str) -> None:
    """The SQLite table `events` a SQL target dataset of the demo events writes (their id, occurredAt,
    amount and channel)."""
    run_sql(
        url,
        "CREATE TABLE events (id TEXT PRIMARY KEY, occurred_at TEXT NOT NULL, amount INTEGER, channel TEXT)",
    )


def dump(url: str, table: str = "events") -> list[str]:
    """Every row of `table`, every column, as text, in key order: a full table dump to compare."""
    if url.startswith("sqlite"):
        return [repr(r) for r in query(url, f"SELECT * FROM {table} ORDER BY id")]
    return [str(r[0]) for r in query(url, f"SELECT t::text FROM {table} t ORDER BY id")]


def sqlite_url(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(path).close()
    return f"sqlite:///{path}"

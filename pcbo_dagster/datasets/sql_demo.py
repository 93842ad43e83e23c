"""The SQL target demo (issue 15): a SQLite table with live rows, and a request that backfills it.

`pcbo demo-sql [--dir DIR]` (default `$PCBO_HOME/demo_sql`) writes:

- `demo_target.db`: table `events (id TEXT PRIMARY KEY, occurred_at TEXT NOT NULL, amount INTEGER
  CHECK (amount >= 0), channel TEXT, updated_at TEXT, deleted_at TEXT)` holding what a live pipeline
  wrote: a row equal to a record of the backfill, a row that differs from one (older than the
  snapshot), a row updated after the snapshot (the live pipeline owns it), a key deleted after the
  snapshot (a tombstone), and a row the backfill does not touch. Any earlier demo table is replaced.
- `demo_sql_request.json`: run `demo-sql-001`, dataset `demo_sql`, three 2-hour partitions of twelve
  inline records (one without consent, one whose amount the table's CHECK refuses), into that table
  (`sqlite:///demo_target.db`, relative to the request), `conflict: overwrite`, freshness and tombstone
  columns, snapshot `2024-02-01T00:00:00Z`, chunks of 4 rows.

Every value is fixed: the request's bytes and the table's rows are the same on every machine.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from pcbo_dagster.io.atomic_files import replace_file

TABLE_FILE = "demo_target.db"
REQUEST_FILE = "demo_sql_request.json"
RUN_ID = "demo-sql-001"
DATASET = "demo_sql"
SNAPSHOT = "2024-02-01T00:00:00Z"
_CHANNELS = ("web", "app", "store")

_DDL = """
CREATE TABLE events (
    id TEXT PRIMARY KEY,
    occurred_at TEXT NOT NULL,
    amount INTEGER CHECK (amount >= 0),
    channel TEXT,
    updated_at TEXT,
    deleted_at TEXT
)
"""


def demo_records() -> list[dict[str, Any]]:
    """The twelve records of the demo request."""
    records = []
    for n in range(1, 13):
        records.append(
            {
                "id": f"evt-demo-{n:02d}",
                "occurredAt": f"2024-01-01T{(n - 1) // 2:02d}:{n * 4:02d}:00Z",
                "jurisdiction": "US" if n % 5 else "CA",
                "consentGranted": n != 9,
                "amount": -1 if n == 11 else 100 * n,
                "channel": _CHANNELS[n % 3],
            }
        )
    return records


def _live_rows() -> list[tuple[Any, ...]]:
    """What the live pipeline wrote: (id, occurred_at, amount, channel, updated_at, deleted_at)."""
    equal = next(r for r in demo_records() if r["id"] == "evt-demo-02")
    return [
        (equal["id"], equal["occurredAt"], equal["amount"], equal["channel"], "2024-01-20T00:00:00Z", None),
        ("evt-demo-03", "2024-01-01T01:12:00Z", 250, "web", "2024-01-20T00:00:00Z", None),
        ("evt-demo-05", "2024-01-01T02:20:00Z", 999, "app", "2024-03-01T09:30:00Z", None),
        ("evt-demo-07", "2024-01-01T03:28:00Z", 700, "app", "2024-01-20T00:00:00Z", "2024-02-15T00:00:00Z"),
        ("live-0001", "2024-03-02T10:00:00Z", 42, "store", "2024-03-02T10:00:00Z", None),
    ]


def demo_request() -> dict[str, Any]:
    return {
        "runId": RUN_ID,
        "dataset": DATASET,
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-01T06:00:00Z",
        "chunkSeconds": 7200,
        "policies": {"requireConsent": True, "allowedJurisdictions": ["US", "CA"]},
        "sourceRecords": demo_records(),
        "target": {
            "kind": "sql",
            "url": f"sqlite:///{TABLE_FILE}",
            "table": "events",
            "key": ["id"],
            "conflict": "overwrite",
            "columns": {"id": "id", "occurredAt": "occurred_at", "amount": "amount", "channel": "channel"},
            "freshnessColumn": "updated_at",
            "deletedColumn": "deleted_at",
            "snapshotAt": SNAPSHOT,
            "chunkRows": 4,
        },
        "metadata": {"initiator": "demo"},
    }


def generate_sql_demo(directory: Path) -> dict[str, Path]:
    """Write the demo table and request into `directory` (see the module doc)."""
    directory.mkdir(parents=True, exist_ok=True)
    table = directory / TABLE_FILE
    fresh = directory / f".{TABLE_FILE}.new"
    fresh.unlink(missing_ok=True)
    with sqlite3.connect(fresh) as conn:
        conn.execute(_DDL)
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", _live_rows())
    conn.close()
    for leftover in directory.glob(f"{TABLE_FILE}.pcbo-locks"):
        for path in sorted(leftover.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    fresh.replace(table)
    request = directory / REQUEST_FILE
    replace_file(request, (json.dumps(demo_request(), indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return {"table": table, "request": request}

"""Rows/s applied into a PostgreSQL table by a SQL-target backfill (issue 15), next to a plain COPY of
the same rows (the floor) and a plain chunked INSERT, with and without the rollback journal.

    python benchmarks/sql_benchmark.py                 # 200,000 records, 24 partitions, 3 repeats
    python benchmarks/sql_benchmark.py --records 20000 --repeat 1
    python benchmarks/sql_benchmark.py --url postgresql://user@host:5432/db   # an existing server

Without `--url` a throw-away PostgreSQL server is started on loopback as the tests do
(`pcbo_dagster_tests/postgres_server.py`: Debian's binaries; fsync off, as for the tests). Every
measurement writes into a new, empty database holding the same table, so each one inserts every row:

- **COPY**: `COPY events (...) FROM STDIN` of the rows the backfill writes, in one transaction (the
  floor: no decisions, no checks, no journal);
- **INSERT**: the rows as `executemany` INSERTs, 1,000 a transaction (what a plain loader does);
- **pcbo, journal**: `execute` of the request into the table (in this process, after its evaluation,
  which is timed apart): per partition the intent event, chunks of 1,000 rows (rows locked and compared
  with the decided state, journal entries, inserts, the checkpoint: one transaction each), the read-back,
  the applied event and the catalog rows, then the rollback script;
- **pcbo, no journal**: the same without the journal entries (an engine switch kept for this measure:
  no rollback is possible without them).

The request is generated deterministically: `--records` records over `--partitions` hourly partitions,
every one added (consent, jurisdiction US, no retention), with an integer and a 24-character text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import psycopg  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

TABLE = """CREATE TABLE events (
    id text PRIMARY KEY, occurred_at timestamptz NOT NULL, amount bigint, label text, note text DEFAULT 'live'
)"""


def records(count: int, partitions: int) -> list[dict[str, Any]]:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    span = partitions * 3600
    out = []
    for i in range(count):
        at = start + timedelta(seconds=(i * 7919) % span, microseconds=(i * 104729) % 1_000_000)
        out.append(
            {
                "id": f"rec-{i:08d}",
                "occurredAt": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "jurisdiction": "US",
                "consentGranted": True,
                "amount": (i * 31) % 100_000,
                "label": f"label-{i % 997:03d}-abcdefghijklmn",
            }
        )
    return out


def request(url: str, rows: list[dict[str, Any]], partitions: int) -> dict[str, Any]:
    return {
        "runId": "sql-benchmark",
        "dataset": "events",
        "start": "2024-01-01T00:00:00Z",
        "end": (datetime(2024, 1, 1, tzinfo=UTC) + timedelta(hours=partitions)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "chunkSeconds": 3600,
        "sourceRecords": rows,
        "target": {
            "kind": "sql",
            "url": url,
            "table": "events",
            "key": ["id"],
            "columns": {"id": "id", "occurredAt": "occurred_at", "amount": "amount", "label": "label"},
        },
    }


def conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Databases:
    """Fresh databases: on a server started here, or on the one `--url` names."""

    def __init__(self, url: str | None) -> None:
        self.server = None
        self.admin = url
        if url is None:
            from pcbo_dagster_tests.postgres_server import _Server

            self.server = _Server()
            self.server.start()

    def fresh(self) -> str:
        if self.server is not None:
            return str(self.server.url(self.server.create_database("pcbo_sqlbench")))
        assert self.admin is not None
        name = f"pcbo_sqlbench_{os.getpid()}_{time.monotonic_ns()}"
        with psycopg.connect(conninfo(self.admin), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return str(make_url(self.admin).set(database=name).render_as_string(hide_password=False))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def with_table(databases: Databases) -> str:
    url = databases.fresh()
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        conn.execute(TABLE)
    return url


def db_rows(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            r["id"],
            datetime.strptime(r["occurredAt"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC),
            r["amount"],
            r["label"],
        )
        for r in rows
    ]


def time_copy(url: str, rows: list[tuple[Any, ...]]) -> float:
    started = time.perf_counter()
    with psycopg.connect(conninfo(url)) as conn:
        with (
            conn.cursor() as cur,
            cur.copy("COPY events (id, occurred_at, amount, label) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
        conn.commit()
    return time.perf_counter() - started


def time_insert(url: str, rows: list[tuple[Any, ...]]) -> float:
    started = time.perf_counter()
    with psycopg.connect(conninfo(url)) as conn:
        for lo in range(0, len(rows), 1000):
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO events (id, occurred_at, amount, label) VALUES (%s, %s, %s, %s)",
                    rows[lo : lo + 1000],
                )
            conn.commit()
    return time.perf_counter() - started


def time_pcbo(
    url: str, rows: list[dict[str, Any]], partitions: int, journal: bool
) -> tuple[float, float, int]:
    """(evaluation seconds, apply seconds, rows inserted) of one pcbo execute into `url`."""
    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.request_loading import evaluate, load_request
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster.engine.sql_apply import execute_sql

    raw = json.dumps(request(url, rows, partitions)).encode("utf-8")
    with tempfile.TemporaryDirectory(prefix="pcbo-sqlbench-") as home:
        started = time.perf_counter()
        loaded = load_request(raw)
        plan, decisions = evaluate(loaded)
        evaluated = time.perf_counter()
        env = Environment.open(Settings.resolve(home=home, env={}))
        try:
            document = execute_sql(env, loaded, plan, decisions, journal=journal)  # type: ignore[arg-type]
        finally:
            env.close()
        applied = time.perf_counter()
    assert document["status"] == "applied" and document["reconciliation"]["status"] == "ok", document[
        "status"
    ]
    return evaluated - started, applied - evaluated, int(document["totals"]["inserted"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", help="an existing PostgreSQL server (its user may CREATE DATABASE)")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/sql-<date>.json")
    args = parser.parse_args()
    source = records(args.records, args.partitions)
    plain = db_rows(source)
    databases = Databases(args.url)
    timings: dict[str, list[float]] = {
        "copy": [],
        "insert": [],
        "journal": [],
        "no_journal": [],
        "evaluate": [],
    }
    try:
        for _ in range(args.repeat):
            timings["copy"].append(time_copy(with_table(databases), plain))
            timings["insert"].append(time_insert(with_table(databases), plain))
            for journal, name in ((True, "journal"), (False, "no_journal")):
                evaluate_s, apply_s, inserted = time_pcbo(
                    with_table(databases), source, args.partitions, journal
                )
                assert inserted == args.records, inserted
                timings[name].append(apply_s)
                timings["evaluate"].append(evaluate_s)
    finally:
        databases.stop()
    medians = {name: statistics.median(values) for name, values in timings.items()}
    rate = {name: args.records / seconds for name, seconds in medians.items()}
    result = {
        "records": args.records,
        "partitions": args.partitions,
        "repeat": args.repeat,
        "seconds": {k: round(v, 3) for k, v in medians.items()},
        "rowsPerSecond": {k: round(v) for k, v in rate.items() if k != "evaluate"},
        "copyOverPcbo": {
            "journal": round(rate["copy"] / rate["journal"], 2),
            "noJournal": round(rate["copy"] / rate["no_journal"], 2),
        },
        "journalCost": round(medians["journal"] / medians["no_journal"], 2),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
    }
    print(json.dumps(result, indent=1))
    if args.save:
        out = Path(__file__).resolve().parent / "results" / f"sql-{datetime.now(UTC):%Y-%m-%d}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

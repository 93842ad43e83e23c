"""Scoped locks for SQL targets (issue 15): runs touching the same (dataset, database, table) queue,
first come first served; runs on different tables (or datasets) go on at once.

- **PostgreSQL**: a session advisory lock in the target database (`pg_advisory_lock` on a key derived
  from the scope), held on its own connection for the run. PostgreSQL grants waiting lock requests in
  the order they were made, across processes and hosts; a run that dies releases it with its session.
  The wait is bounded by `PCBO_LEASE_WAIT_SECONDS` (default 600; `lock_timeout`), after which the run
  stops naming the holder (its `application_name` is `pcbo run <runId>`).
- **SQLite** (one host): a ticket queue beside the database file (`<file>.pcbo-locks/<scope digest>/`):
  a ticket number is taken under a counter file's lock and the ticket file is created, locked by its
  holder (`flock`), before the counter is released, so tickets appear in order. A run holds the scope
  when no lower ticket is held by a live process; a ticket whose process died (its `flock` is free)
  is removed by the next waiter.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from pcbo_dagster.catalog.database import lock_timeout_value
from pcbo_dagster.core.errors import PcboError
from pcbo_dagster.io.env_vars import lease_wait_seconds
from pcbo_dagster.targets.sql_dialects import POSTGRESQL, sqlite_path
from pcbo_dagster.targets.sql_table import SqlTable

_POLL_SECONDS = 0.05


class TargetBusy(PcboError):
    """Another run held the target table's scope for longer than the wait allows (exit status 1)."""


def scope_of(dataset: str, table: SqlTable) -> str:
    """The lock scope of a run: (dataset, database, table)."""
    return f"{dataset}|{table.location}|{table.qualified}"


def advisory_key(scope: str) -> int:
    """The 64-bit PostgreSQL advisory lock key of a scope."""
    return int.from_bytes(
        hashlib.sha256(f"pcbo.sql-target/1|{scope}".encode()).digest()[:8], "big", signed=True
    )


@contextmanager
def scoped_lock(table: SqlTable, dataset: str, run_id: str) -> Iterator[dict[str, Any]]:
    """Hold the scope of (dataset, table's database, table) for the block; yields what was waited."""
    scope = scope_of(dataset, table)
    wait = lease_wait_seconds()
    started = time.monotonic()
    if table.dialect == POSTGRESQL:
        with _advisory_lock(table, scope, run_id, wait):
            yield {"scope": scope, "waitedSeconds": round(time.monotonic() - started, 3)}
        return
    directory = (
        Path(f"{sqlite_path(table.engine.url)}.pcbo-locks") / hashlib.sha256(scope.encode()).hexdigest()[:32]
    )
    with _ticket_lock(directory, scope, wait):
        yield {"scope": scope, "waitedSeconds": round(time.monotonic() - started, 3)}


@contextmanager
def _advisory_lock(table: SqlTable, scope: str, run_id: str, wait: float) -> Iterator[None]:
    key = advisory_key(scope)
    with table.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(
            text("SELECT set_config('application_name', :n, false)"), {"n": f"pcbo run {run_id}"[:63]}
        )
        conn.execute(text("SELECT set_config('lock_timeout', :t, false)"), {"t": lock_timeout_value(wait)})
        try:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03":
                raise
            holder = conn.execute(
                text(
                    "SELECT a.application_name, a.pid, a.client_addr::text FROM pg_locks l "
                    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.classid = CAST(:hi AS oid) AND l.objid = CAST(:lo AS oid) AND l.objsubid = 1"
                ),
                {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
            ).first()
            who = f"{holder[0]!r} (pid {holder[1]} from {holder[2] or 'local'})" if holder else "another run"
            raise TargetBusy(
                f"{scope.split('|', 1)[0]} into {table.qualified} is being applied by {who}; "
                f"waited {wait:g} s (PCBO_LEASE_WAIT_SECONDS)"
            ) from None
        try:
            conn.execute(text("RESET lock_timeout"))  # the session's own bound (`open_engine`) again
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})


@contextmanager
def _ticket_lock(directory: Path, scope: str, wait: float) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    counter = os.open(directory / "counter", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(counter, fcntl.LOCK_EX)
        number = int(os.pread(counter, 32, 0).decode("ascii").strip() or "0") + 1
        os.pwrite(counter, f"{number:020d}\n".encode("ascii"), 0)
        temporary = directory / f".new-{os.getpid()}-{number}"
        ticket_fd = os.open(temporary, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(ticket_fd, fcntl.LOCK_EX)
        mine = directory / f"{number:020d}.ticket"
        os.rename(temporary, mine)
    finally:
        fcntl.flock(counter, fcntl.LOCK_UN)
        os.close(counter)
    try:
        deadline = time.monotonic() + wait
        while True:
            ahead = sorted(p for p in directory.glob("*.ticket") if p.name < mine.name)
            live = [p for p in ahead if not _remove_if_abandoned(p)]
            if not live:
                break
            if time.monotonic() >= deadline:
                raise TargetBusy(
                    f"{scope.split('|', 1)[0]} into {scope.rsplit('|', 1)[-1]}: {len(live)} run(s) ahead "
                    f"held the table for longer than {wait:g} s (PCBO_LEASE_WAIT_SECONDS)"
                )
            time.sleep(_POLL_SECONDS)
        yield
    finally:
        mine.unlink(missing_ok=True)
        os.close(ticket_fd)


def _remove_if_abandoned(ticket: Path) -> bool:
    """True when `ticket` is gone or its holder died (then it is removed)."""
    try:
        fd = os.open(ticket, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        ticket.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)

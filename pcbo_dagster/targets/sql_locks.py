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
  is removed by the next waiter. Whoever may write the database's directory may plant names there:
  the queue's directories and files are never made, opened or written through a symbolic link (nor
  a FIFO or device: `LockDirectoryUnsafe`, exit status 1), each name opened relative to its
  directory's own descriptor.
"""

from __future__ import annotations

import contextlib
import errno
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
from pcbo_dagster.io.regular_files import NotRegularFile, regular_fd
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


class LockDirectoryUnsafe(PcboError):
    """A name in a SQLite target's lock directory is not what pcbo makes there: a symbolic link, not
    a directory or regular file, a counter it did not write (exit status 1; nothing written through it)."""


#: What `os.open` says of a name planted where the queue opens or creates one.
_PLANTED = (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EEXIST)

#: How the queue's files are opened: never through a symbolic link, never blocking on a FIFO.
_NO_LINKS = os.O_NOFOLLOW | os.O_CLOEXEC


def _open_directory(name: str | Path, parent: int | None, shown: Path) -> int:
    """A descriptor of the directory `name` (in the directory `parent`, None: as a path), made when
    missing; `LockDirectoryUnsafe` when a symbolic link (or anything but a directory) stands there."""
    try:
        os.mkdir(name, 0o755, dir_fd=parent)
    except FileExistsError:
        pass
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NO_LINKS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LockDirectoryUnsafe(
                f"{shown} is a symbolic link or not a directory: pcbo's lock queue of a SQLite target "
                "is never made or written through one (remove it)"
            ) from None
        raise


def _open_file(name: str, directory: int, flags: int, shown: Path) -> int:
    """`name` in `directory` opened as a regular file, never through a symbolic link (nor a name
    planted where `O_EXCL` creates one)."""
    try:
        return regular_fd(
            os.open(name, flags | os.O_NONBLOCK | _NO_LINKS, 0o644, dir_fd=directory), str(shown)
        )
    except (NotRegularFile, OSError) as exc:
        if isinstance(exc, NotRegularFile) or exc.errno in _PLANTED:
            raise LockDirectoryUnsafe(
                f"{shown} is a symbolic link or not a regular file: pcbo's lock queue of a SQLite "
                "target is never written through one (remove it)"
            ) from None
        raise


@contextmanager
def _ticket_lock(directory: Path, scope: str, wait: float) -> Iterator[None]:
    """The ticket queue of `directory` (`<file>.pcbo-locks/<scope digest>`), every name in it opened
    relative to the directory's own descriptor, none through a symbolic link (`LockDirectoryUnsafe`)."""
    root = _open_directory(directory.parent, None, directory.parent)
    try:
        here = _open_directory(directory.name, root, directory)
    finally:
        os.close(root)
    try:
        with _queued(here, directory, scope, wait):
            yield
    finally:
        os.close(here)


@contextmanager
def _queued(here: int, directory: Path, scope: str, wait: float) -> Iterator[None]:
    counter = _open_file("counter", here, os.O_RDWR | os.O_CREAT, directory / "counter")
    try:
        fcntl.flock(counter, fcntl.LOCK_EX)
        text_ = os.pread(counter, 32, 0).decode("ascii", "replace").strip()
        if not text_.isdigit() and text_:
            raise LockDirectoryUnsafe(
                f"{directory / 'counter'} holds no ticket number pcbo wrote (remove it)"
            )
        number = int(text_ or "0") + 1
        os.pwrite(counter, f"{number:020d}\n".encode("ascii"), 0)
        temporary = f".new-{os.getpid()}-{number}"
        ticket_fd = _open_file(temporary, here, os.O_RDWR | os.O_CREAT | os.O_EXCL, directory / temporary)
        fcntl.flock(ticket_fd, fcntl.LOCK_EX)
        mine = f"{number:020d}.ticket"
        os.rename(temporary, mine, src_dir_fd=here, dst_dir_fd=here)
    finally:
        fcntl.flock(counter, fcntl.LOCK_UN)
        os.close(counter)
    try:
        deadline = time.monotonic() + wait
        while True:
            ahead = sorted(n for n in os.listdir(here) if n.endswith(".ticket") and n < mine)
            live = [n for n in ahead if not _remove_if_abandoned(here, n)]
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mine, dir_fd=here)
        os.close(ticket_fd)


def _remove_if_abandoned(directory: int, ticket: str) -> bool:
    """True when `ticket` (in `directory`) is gone or its holder died (then it is removed); a ticket
    that is not a regular file (a symbolic link) is removed unopened."""
    try:
        fd = os.open(ticket, os.O_RDWR | os.O_NONBLOCK | _NO_LINKS, dir_fd=directory)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ticket, dir_fd=directory)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ticket, dir_fd=directory)
        return True
    finally:
        os.close(fd)

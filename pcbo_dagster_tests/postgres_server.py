"""Pytest plugin: a real, throw-away PostgreSQL server for the tests marked `postgres`.

`postgres_url` (session) starts a server from the local PostgreSQL binaries (`pg_config --bindir`,
else the newest `/usr/lib/postgresql/*/bin`, or `$PCBO_PG_BINDIR`) in a temp directory, listening on
127.0.0.1 on a free port, and yields a `postgresql+psycopg://` URL of a fresh database.
`fresh_postgres_url` (function) yields a URL of a new empty database per test.

When the binaries are missing the tests skip, or fail when `$CI` is set. Set
`$PCBO_TEST_POSTGRES_URL` (a server URL whose user may CREATE DATABASE) to use an existing server.
As root, `initdb` and `pg_ctl` run as the `postgres` user (initdb refuses root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster_tests.loopback import free_port

START_ATTEMPTS = 3


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {message}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {message}")


def _find_bindir() -> Path | None:
    candidates: list[str] = []
    if os.environ.get("PCBO_PG_BINDIR"):
        candidates.append(os.environ["PCBO_PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            )
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.extend(
        sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for cand in candidates:
        path = Path(cand)
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


def _as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_as_postgres(argv), capture_output=True, text=True, timeout=timeout)


def _admin(port_or_url: int | str, sql: str) -> None:
    import psycopg

    if isinstance(port_or_url, int):
        conninfo = f"host=127.0.0.1 port={port_or_url} user=postgres dbname=postgres"
    else:
        conninfo = port_or_url
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=30) as conn:
        conn.execute(sql)


class _Server:
    """A server started with initdb + pg_ctl, or an external one from $PCBO_TEST_POSTGRES_URL."""

    def __init__(self) -> None:
        self.base: Path | None = None
        self.bindir: Path | None = None
        self.port = 0
        self.admin_conninfo = ""
        self.url_prefix = ""
        self.external: Any = None

    def start(self) -> None:
        external = os.environ.get("PCBO_TEST_POSTGRES_URL")
        if external:
            from sqlalchemy.engine import make_url

            url = make_url(external).set(drivername="postgresql+psycopg")
            self.admin_conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
            self.external = url
            return
        bindir = _find_bindir()
        if bindir is None:
            _missing(
                "no initdb/pg_ctl found (pg_config --bindir, /usr/lib/postgresql/*/bin, $PCBO_PG_BINDIR)"
            )
            return
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            _missing("running as root but `runuser` is missing (initdb refuses root)")
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="pcbo-pg-"))
        if os.geteuid() == 0:
            try:
                shutil.chown(self.base, "postgres", "postgres")
            except (LookupError, OSError) as exc:
                self.cleanup()
                _missing(f"cannot hand {self.base} to the postgres user: {exc}")
        data = self.base / "data"
        init = _run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"])
        if init.returncode != 0:
            self.cleanup()
            pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}", pytrace=False)
        last = ""
        for _ in range(START_ATTEMPTS):
            port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {self.base} "
                "-c fsync=off -c full_page_writes=off -c max_connections=200"
            )
            started = _run(
                [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(self.base / "server.log"), "-o", options]
                + ["-w", "-t", "60", "start"]
            )
            if started.returncode == 0:
                self.port = port
                self.admin_conninfo = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
                self.url_prefix = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
                return
            log = self.base / "server.log"
            last = started.stdout + started.stderr + (log.read_text(errors="replace") if log.exists() else "")
        self.cleanup()
        pytest.fail(f"pg_ctl start failed {START_ATTEMPTS} times:\n{last}", pytrace=False)

    def create_database(self, prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        _admin(self.admin_conninfo, f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        try:
            _admin(self.admin_conninfo, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception:  # best effort at teardown
            pass

    def url(self, database: str) -> str:
        if self.external is not None:
            return str(self.external.set(database=database).render_as_string(hide_password=False))
        return f"{self.url_prefix}/{database}"

    def stop(self) -> None:
        if self.bindir is not None and self.base is not None and self.port:
            _run([str(self.bindir / "pg_ctl"), "-D", str(self.base / "data"), "-m", "fast", "-w", "stop"])
            self.port = 0
        self.cleanup()

    def cleanup(self) -> None:
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[_Server]:
    """The running server (started once per test session / xdist worker)."""
    server = _Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: _Server) -> Iterator[str]:
    """`postgresql+psycopg://postgres@127.0.0.1:<port>/<db>`: a database shared by the session."""
    name = postgres_server.create_database("pcbo_session")
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture
def fresh_postgres_url(postgres_server: _Server) -> Iterator[str]:
    """A URL of a new, empty database for one test (dropped afterwards)."""
    name = postgres_server.create_database("pcbo_test")
    yield postgres_server.url(name)
    postgres_server.drop_database(name)

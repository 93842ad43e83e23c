"""Debian's `redis-server` on loopback for the Celery tests: started by the test set-up on a free port,
in a throw-away directory, with persistence off (nothing written but its log), stopped afterwards.

Absent `redis-server` fails the test in CI (`.ci/run` installs it) and skips it elsewhere.

Each test that needs an empty broker or backend takes a Redis database of its own from
`fresh_database` (one counter for every module of the session: the server has `DATABASES` of them,
where Redis's default is 16 and the Celery tests of one session need more than that).
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcbo_dagster_tests.loopback import free_port

#: Databases the session's server has (`--databases`); database 0 is left unused.
DATABASES = 1024
_NEXT_DATABASE = itertools.count(1)


def fresh_database(redis_url: str) -> str:
    """The URL of a Redis database of the session's server (`redis_url`) no other test of this session
    was given."""
    number = next(_NEXT_DATABASE)
    if number >= DATABASES:
        raise RuntimeError(f"the test session used all {DATABASES} Redis databases")
    return redis_url.rsplit("/", 1)[0] + f"/{number}"


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """`redis://127.0.0.1:<port>/0` of a redis-server started for this session (per xdist worker)."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI: {message}", pytrace=False)
        pytest.skip(message)
    workdir = Path(tempfile.mkdtemp(prefix="pcbo-redis-"))
    port = free_port()
    argv = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--databases", str(DATABASES),
        "--protected-mode", "yes",
        "--dir", str(workdir),
        "--logfile", str(workdir / "redis.log"),
    ]  # fmt: skip
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not _ping(port):
            if server.poll() is not None or time.monotonic() > deadline:
                err = server.stderr.read().decode(errors="replace") if server.stderr else ""
                log = (
                    (workdir / "redis.log").read_text(errors="replace")
                    if (workdir / "redis.log").exists()
                    else ""
                )
                pytest.fail(f"redis-server did not start: {err}{log}", pytrace=False)
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)

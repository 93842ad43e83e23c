"""Hosts frozen past their write lease, for the frozen-writer tests (`test_frozen_writer.py`,
`test_frozen_staging_writes.py`, `test_frozen_gc.py`; a pytest plugin of conftest.py, for
`shared_lake_url`): several `pcbo` processes, each its own PCBO_HOME, sharing a PostgreSQL catalog, an
audit store on moto's S3 and a lake (local or S3), the write lease 2 s; one of them stops itself
(SIGSTOP to itself, every thread frozen, as a GC pause or a suspended VM would) at a failpoint,
`PCBO_FAILPOINT=<point>@<partition index>:stop`, and is sent SIGCONT later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.lake.storage import LakeStorage
from pcbo_dagster_tests.cli_runner import load_generator, pcbo_env, write_request

#: How long a frozen host waits for its lease to expire (the lease is 2 s).
PAST_THE_LEASE_SECONDS = 3.0


def shared_env(
    s3_store: Any, catalog_url: str, lake_url: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The environment of hosts sharing `lake_url`, the catalog and an audit store on S3 (a fresh
    prefix); `PCBO_MULTI_HOST` for an object-store lake (a local lake is one disk: the hosts share it on
    one machine). This process gets the S3 settings too (the tests read the lake)."""
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    env = {
        **s3_store.env,
        "PCBO_LAKE_URL": lake_url,
        "PCBO_CATALOG_URL": catalog_url,
        "PCBO_AUDIT_DIR": s3_store.url(f"pas-{uuid.uuid4().hex[:8]}"),
        "PCBO_LEASE_TTL_SECONDS": "2",
    }
    if "://" in lake_url:
        env["PCBO_MULTI_HOST"] = "true"
    return env


@pytest.fixture(params=["local", "s3"])
def shared_lake_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The lake the hosts share: a local directory (one disk, the hosts on one machine) or S3 (moto).
    Not the GCS emulator: it ignores `ifGenerationMatch` (a create-only or conditional PUT overwrites
    there), which Cloud Storage itself honours."""
    if request.param == "local":
        return str(tmp_path / "shared-lake")
    return str(request.getfixturevalue("s3_store").url(f"lake-{uuid.uuid4().hex[:8]}"))


def lake_bytes(url: str) -> dict[str, bytes]:
    """Every file of the lake at `url` but the checkpoint notes, by path."""
    lake = LakeStorage(url)
    return {rel: lake.read(rel) for rel in lake.list_files() if "/_checkpoints/" not in rel}


def two_requests(tmp_path: Path) -> tuple[Path, Path]:
    """Requests `run-a` and `run-b` over the same two partitions, B's content A's less three records."""
    first = load_generator().make_request(records=30, partitions=2, seed=5, run_id="run-a")
    second = dict(first, runId="run-b", sourceRecords=first["sourceRecords"][:-3])
    return write_request(tmp_path / "a.json", first), write_request(tmp_path / "b.json", second)


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"


def start_frozen(
    home: Path, args: Sequence[str | os.PathLike[str]], env: dict[str, str], point: str
) -> subprocess.Popen[bytes]:
    """`pcbo ARGS` on the host `home` (working directory its parent), stopping itself at the failpoint
    `point` (`<name>@<partition index>`); returns once it is stopped."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pcbo_dagster.cli.main", *map(str, args)],
        env=pcbo_env(home, {**env, "PCBO_FAILPOINT": f"{point}:stop"}),
        cwd=home.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not _stopped(process.pid):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the process never reached its failpoint"
        time.sleep(0.05)
    return process


def wake(process: subprocess.Popen[bytes] | None) -> None:
    """SIGCONT to a frozen process that is still there (a `finally:` of every test)."""
    if process is not None and process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)


def woken(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Wake `process`, wait for its end: its exit status and stderr."""
    wake(process)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr.decode()

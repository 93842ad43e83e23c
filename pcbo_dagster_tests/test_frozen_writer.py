"""A writer frozen past its lease, then resumed (issue 14's many hosts: a VM paused, a process stopped
by SIGSTOP, a long GC pause): moto's S3 server for lake and audit store, PostgreSQL for the catalog,
two `pcbo execute` processes as two hosts, `PCBO_MULTI_HOST=true`.

Host A appends its commit intent and is frozen (the `before_commit:stop` failpoint: SIGSTOP to
itself, its lease heartbeat frozen with it). Its lease expires; host B takes it over, commits other
content for the same partitions and gives the lease back. A is resumed: it wrote its commit points
over B's (readers then saw versions no chain event committed, B's committed versions were gone from
the lake, `verify` found `commit_point_not_on_chain` for every partition and repair rightly refused),
and only its event append was then fenced. Now A checks the chain right before its commit points and
stops there: B's versions stay, `verify` is clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster_tests.cli_runner import load_generator, pcbo_env, run_pcbo, write_request

pytestmark = pytest.mark.postgres


def _wait_stopped(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{proc.pid}/stat").read_text().split()[2] != "T":
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def test_a_writer_frozen_past_its_lease_writes_no_commit_point_when_resumed(
    tmp_path, s3_store, fresh_postgres_url, monkeypatch
):
    for name, value in s3_store.env.items():  # this process reads the lake too
        monkeypatch.setenv(name, value)
    env = {
        **s3_store.env,
        "PCBO_LAKE_URL": s3_store.url(f"lake-{uuid.uuid4().hex[:8]}"),
        "PCBO_CATALOG_URL": fresh_postgres_url,
        "PCBO_AUDIT_DIR": s3_store.url(f"pas-{uuid.uuid4().hex[:8]}"),
        "PCBO_MULTI_HOST": "true",
        "PCBO_LEASE_TTL_SECONDS": "2",
    }
    first = load_generator().make_request(records=30, partitions=2, seed=5, run_id="run-a")
    second = dict(first, runId="run-b", sourceRecords=first["sourceRecords"][:-3])
    a_request, b_request = (
        write_request(tmp_path / "a.json", first),
        write_request(tmp_path / "b.json", second),
    )
    host_a = subprocess.Popen(
        [sys.executable, "-m", "pcbo_dagster.cli.main", "execute", "--input", str(a_request)],
        env=pcbo_env(tmp_path / "host-a", {**env, "PCBO_FAILPOINT": "before_commit@0:stop"}),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_stopped(host_a)
        time.sleep(3)  # past A's lease
        b = run_pcbo(["execute", "--input", b_request], home=tmp_path / "host-b", env=env)
        assert b.status == 0, b.stderr
        assert {p["status"] for p in b.document["partitions"]} == {"committed"}
    finally:
        os.kill(host_a.pid, signal.SIGCONT)
    _, err = host_a.communicate(timeout=120)
    assert host_a.returncode == 1, err.decode()
    # B's versions are the lake's commit points; every store agrees with the chain.
    fs: Any = s3_store.filesystem()
    lake = env["PCBO_LAKE_URL"].split("://", 1)[1]
    for partition in b.document["partitions"]:
        held = json.loads(fs.cat_file(f"{lake}/events/v1/{partition['key']}/_manifest.json"))
        assert held["runId"] == "run-b", held
    verified = run_pcbo(["verify"], home=tmp_path / "auditor", env=env)
    assert verified.status == 0 and verified.document["status"] == "clean", verified.document
    assert "since this run read the chain" in err.decode() and "wrote no commit point" in err.decode()


def test_a_rollback_frozen_past_its_lease_moves_no_commit_point_when_resumed(
    tmp_path, s3_store, fresh_postgres_url, monkeypatch
):
    """Host A's `pcbo rollback --run-id run-a` appends its rollback intent and is frozen; host B
    commits other content for the partitions; A resumed put back (or removed) the commit points B had
    just committed and deleted files by a plan made before B's commit. Now it stops before the first."""
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    env = {
        **s3_store.env,
        "PCBO_LAKE_URL": s3_store.url(f"lake-{uuid.uuid4().hex[:8]}"),
        "PCBO_CATALOG_URL": fresh_postgres_url,
        "PCBO_AUDIT_DIR": s3_store.url(f"pas-{uuid.uuid4().hex[:8]}"),
        "PCBO_MULTI_HOST": "true",
        "PCBO_LEASE_TTL_SECONDS": "2",
    }
    first = load_generator().make_request(records=30, partitions=2, seed=5, run_id="run-a")
    second = dict(first, runId="run-b", sourceRecords=first["sourceRecords"][:-3])
    a_request, b_request = (
        write_request(tmp_path / "a.json", first),
        write_request(tmp_path / "b.json", second),
    )
    done = run_pcbo(["execute", "--input", a_request], home=tmp_path / "host-a", env=env)
    assert done.status == 0, done.stderr
    host_a = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pcbo_dagster.cli.main",
            "rollback",
            "--dataset",
            "events",
            "--run-id",
            "run-a",
        ],
        env=pcbo_env(tmp_path / "host-a", {**env, "PCBO_FAILPOINT": "rollback_after_intent@0:stop"}),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_stopped(host_a)
        time.sleep(3)  # past A's lease
        b = run_pcbo(["execute", "--input", b_request], home=tmp_path / "host-b", env=env)
        assert b.status == 0, b.stderr
    finally:
        os.kill(host_a.pid, signal.SIGCONT)
    _, err = host_a.communicate(timeout=120)
    assert host_a.returncode == 1, err.decode()
    fs: Any = s3_store.filesystem()
    lake = env["PCBO_LAKE_URL"].split("://", 1)[1]
    for partition in b.document["partitions"]:
        held = json.loads(fs.cat_file(f"{lake}/events/v1/{partition['key']}/_manifest.json"))
        assert held["runId"] == "run-b", held
    verified = run_pcbo(["verify"], home=tmp_path / "auditor", env=env)
    assert verified.status == 0 and verified.document["status"] == "clean", verified.document


@pytest.fixture(params=["local", "s3"])
def lake_url(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "shared-lake")
    return request.getfixturevalue("s3_store").url(f"lake-{uuid.uuid4().hex[:8]}")


def _held_run_ids(lake_url: str, keys: list[str]) -> set[str]:
    from pcbo_dagster.lake.storage import LakeStorage

    lake = LakeStorage(lake_url)
    return {json.loads(lake.read(f"events/v1/{key}/_manifest.json"))["runId"] for key in keys}


def test_a_writer_frozen_after_its_chain_check_puts_no_commit_point_over_the_new_holders(
    tmp_path, lake_url, s3_store, fresh_postgres_url, monkeypatch
):
    """Frozen a second time: A passed its chain check right before its commit points, and stops there
    (`after_fence_check`); B takes the lease over and commits. A resumed put its commit points over
    B's, unconditionally (`commit_point_not_on_chain`, not repairable). Now each commit point write
    replaces only the commit point A read (S3 `If-Match` / `If-None-Match: *`; locally compared and
    renamed under the partition directory's lock): refused, A stops with `ChainMoved`."""
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    env = {
        **s3_store.env,
        "PCBO_LAKE_URL": lake_url,
        "PCBO_CATALOG_URL": fresh_postgres_url,
        "PCBO_AUDIT_DIR": s3_store.url(f"pas-{uuid.uuid4().hex[:8]}"),
        "PCBO_LEASE_TTL_SECONDS": "2",
    }
    if "://" in lake_url:  # (a local lake is one disk: these hosts share it on one machine)
        env["PCBO_MULTI_HOST"] = "true"
    first = load_generator().make_request(records=30, partitions=2, seed=5, run_id="run-a")
    second = dict(first, runId="run-b", sourceRecords=first["sourceRecords"][:-3])
    a_request, b_request = (
        write_request(tmp_path / "a.json", first),
        write_request(tmp_path / "b.json", second),
    )
    host_a = subprocess.Popen(
        [sys.executable, "-m", "pcbo_dagster.cli.main", "execute", "--input", str(a_request)],
        env=pcbo_env(tmp_path / "host-a", {**env, "PCBO_FAILPOINT": "after_fence_check@0:stop"}),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_stopped(host_a)
        time.sleep(3)  # past A's lease
        b = run_pcbo(["execute", "--input", b_request], home=tmp_path / "host-b", env=env, cwd=tmp_path)
        assert b.status == 0, b.stderr
        assert {p["status"] for p in b.document["partitions"]} == {"committed"}
    finally:
        os.kill(host_a.pid, signal.SIGCONT)
    _, err = host_a.communicate(timeout=120)
    assert host_a.returncode == 1, err.decode()
    assert _held_run_ids(lake_url, [p["key"] for p in b.document["partitions"]]) == {"run-b"}
    verified = run_pcbo(["verify"], home=tmp_path / "auditor", env=env, cwd=tmp_path)
    assert verified.status == 0 and verified.document["status"] == "clean", verified.document
    assert "is no longer the commit point this run read" in err.decode(), err.decode()


def test_a_rollback_frozen_after_its_chain_check_moves_no_commit_point_of_the_new_holder(
    tmp_path, s3_store, fresh_postgres_url, monkeypatch
):
    """The same for a rollback frozen between its chain check and its first commit-point move
    (`rollback_after_fence_check`): B's commits stay, A stops with `ChainMoved`."""
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    lake_url = s3_store.url(f"lake-{uuid.uuid4().hex[:8]}")
    env = {
        **s3_store.env,
        "PCBO_LAKE_URL": lake_url,
        "PCBO_CATALOG_URL": fresh_postgres_url,
        "PCBO_AUDIT_DIR": s3_store.url(f"pas-{uuid.uuid4().hex[:8]}"),
        "PCBO_MULTI_HOST": "true",
        "PCBO_LEASE_TTL_SECONDS": "2",
    }
    first = load_generator().make_request(records=30, partitions=2, seed=5, run_id="run-a")
    second = dict(first, runId="run-b", sourceRecords=first["sourceRecords"][:-3])
    a_request, b_request = (
        write_request(tmp_path / "a.json", first),
        write_request(tmp_path / "b.json", second),
    )
    done = run_pcbo(["execute", "--input", a_request], home=tmp_path / "host-a", env=env)
    assert done.status == 0, done.stderr
    host_a = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pcbo_dagster.cli.main",
            "rollback",
            "--dataset",
            "events",
            "--run-id",
            "run-a",
        ],
        env=pcbo_env(tmp_path / "host-a", {**env, "PCBO_FAILPOINT": "rollback_after_fence_check@0:stop"}),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_stopped(host_a)
        time.sleep(3)  # past A's lease
        b = run_pcbo(["execute", "--input", b_request], home=tmp_path / "host-b", env=env)
        assert b.status == 0, b.stderr
    finally:
        os.kill(host_a.pid, signal.SIGCONT)
    _, err = host_a.communicate(timeout=120)
    assert host_a.returncode == 1, err.decode()
    assert _held_run_ids(lake_url, [p["key"] for p in b.document["partitions"]]) == {"run-b"}
    verified = run_pcbo(["verify"], home=tmp_path / "auditor", env=env)
    assert verified.status == 0 and verified.document["status"] == "clean", verified.document
    assert "is no longer the commit point this rollback planned from" in err.decode(), err.decode()

"""A writer frozen past its lease, then resumed (issue 14's many hosts: a VM paused, a process stopped
by SIGSTOP, a long GC pause): moto's S3 server for lake and audit store, PostgreSQL for the catalog,
two processes as two hosts, `PCBO_MULTI_HOST=true`: host A a `pcbo` subprocess (it freezes), host B's
`pcbo execute` (and the set-up's and verify's commands) in the test process
(`cli_runner.run_pcbo_in_process`).

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
import time
import uuid
from pathlib import Path

import pytest

from pcbo_dagster.lake.storage import LakeStorage
from pcbo_dagster_tests.cli_runner import run_pcbo_in_process
from pcbo_dagster_tests.frozen_hosts import (
    PAST_THE_LEASE_SECONDS,
    shared_env,
    start_frozen,
    two_requests,
    wake,
    woken,
)

pytestmark = pytest.mark.postgres


def _held_run_ids(lake_url: str, keys: list[str]) -> set[str]:
    """The run ids of the commit points of `keys` in the lake."""
    lake = LakeStorage(lake_url)
    return {json.loads(lake.read(f"events/v1/{key}/_manifest.json"))["runId"] for key in keys}


def _frozen_while_b_commits(
    tmp_path: Path, env: dict[str, str], args: list[str], point: str, b_request: Path
) -> tuple[int, str, dict]:
    """Host A runs `pcbo ARGS`, frozen at `point` past its lease while host B executes `b_request`
    (which must commit); A woken: its exit status and stderr, and B's document."""
    host_a = start_frozen(tmp_path / "host-a", args, env, point)
    try:
        time.sleep(PAST_THE_LEASE_SECONDS)
        b = run_pcbo_in_process(
            ["execute", "--input", b_request], home=tmp_path / "host-b", env=env, cwd=tmp_path
        )
        assert b.status == 0, b.stderr
    finally:
        wake(host_a)
    status, err = woken(host_a)
    return status, err, b.document


def _verify_clean(tmp_path: Path, env: dict[str, str]) -> None:
    verified = run_pcbo_in_process(["verify"], home=tmp_path / "auditor", env=env, cwd=tmp_path)
    assert verified.status == 0 and verified.document["status"] == "clean", verified.document


def test_a_writer_frozen_past_its_lease_writes_no_commit_point_when_resumed(
    tmp_path, s3_store, fresh_postgres_url, monkeypatch
):
    s3_lake = s3_store.url(f"lake-{uuid.uuid4().hex[:8]}")
    env = shared_env(s3_store, fresh_postgres_url, s3_lake, monkeypatch)
    a_request, b_request = two_requests(tmp_path)
    status, err, b = _frozen_while_b_commits(
        tmp_path, env, ["execute", "--input", str(a_request)], "before_commit@0", b_request
    )
    assert status == 1, err
    assert {p["status"] for p in b["partitions"]} == {"committed"}
    # B's versions are the lake's commit points; every store agrees with the chain.
    assert _held_run_ids(s3_lake, [p["key"] for p in b["partitions"]]) == {"run-b"}
    _verify_clean(tmp_path, env)
    assert "since this run read the chain" in err and "wrote no commit point" in err


def test_a_rollback_frozen_past_its_lease_moves_no_commit_point_when_resumed(
    tmp_path, s3_store, fresh_postgres_url, monkeypatch
):
    """Host A's `pcbo rollback --run-id run-a` appends its rollback intent and is frozen; host B
    commits other content for the partitions; A resumed put back (or removed) the commit points B had
    just committed and deleted files by a plan made before B's commit. Now it stops before the first."""
    s3_lake = s3_store.url(f"lake-{uuid.uuid4().hex[:8]}")
    env = shared_env(s3_store, fresh_postgres_url, s3_lake, monkeypatch)
    a_request, b_request = two_requests(tmp_path)
    done = run_pcbo_in_process(
        ["execute", "--input", a_request], home=tmp_path / "host-a", env=env, cwd=tmp_path
    )
    assert done.status == 0, done.stderr
    rollback = ["rollback", "--dataset", "events", "--run-id", "run-a"]
    status, err, b = _frozen_while_b_commits(tmp_path, env, rollback, "rollback_after_intent@0", b_request)
    assert status == 1, err
    assert _held_run_ids(s3_lake, [p["key"] for p in b["partitions"]]) == {"run-b"}
    _verify_clean(tmp_path, env)


def test_a_writer_frozen_after_its_chain_check_puts_no_commit_point_over_the_new_holders(
    tmp_path, shared_lake_url, s3_store, fresh_postgres_url, monkeypatch
):
    """Frozen a second time: A passed its chain check right before its commit points, and stops there
    (`after_fence_check`); B takes the lease over and commits. A resumed put its commit points over
    B's, unconditionally (`commit_point_not_on_chain`, not repairable). Now each commit point write
    replaces only the commit point A read (S3 `If-Match` / `If-None-Match: *`; locally compared and
    renamed under the partition directory's lock): refused, A stops with `ChainMoved`."""
    env = shared_env(s3_store, fresh_postgres_url, shared_lake_url, monkeypatch)
    a_request, b_request = two_requests(tmp_path)
    status, err, b = _frozen_while_b_commits(
        tmp_path, env, ["execute", "--input", str(a_request)], "after_fence_check@0", b_request
    )
    assert status == 1, err
    assert {p["status"] for p in b["partitions"]} == {"committed"}
    assert _held_run_ids(shared_lake_url, [p["key"] for p in b["partitions"]]) == {"run-b"}
    _verify_clean(tmp_path, env)
    assert "is no longer the commit point this run read" in err, err


def test_a_rollback_frozen_after_its_chain_check_moves_no_commit_point_of_the_new_holder(
    tmp_path, s3_store, fresh_postgres_url, monkeypatch
):
    """The same for a rollback frozen between its chain check and its first commit-point move
    (`rollback_after_fence_check`): B's commits stay, A stops with `ChainMoved`."""
    s3_lake = s3_store.url(f"lake-{uuid.uuid4().hex[:8]}")
    env = shared_env(s3_store, fresh_postgres_url, s3_lake, monkeypatch)
    a_request, b_request = two_requests(tmp_path)
    done = run_pcbo_in_process(
        ["execute", "--input", a_request], home=tmp_path / "host-a", env=env, cwd=tmp_path
    )
    assert done.status == 0, done.stderr
    rollback = ["rollback", "--dataset", "events", "--run-id", "run-a"]
    status, err, b = _frozen_while_b_commits(
        tmp_path, env, rollback, "rollback_after_fence_check@0", b_request
    )
    assert status == 1, err
    assert _held_run_ids(s3_lake, [p["key"] for p in b["partitions"]]) == {"run-b"}
    _verify_clean(tmp_path, env)
    assert "is no longer the commit point this rollback planned from" in err, err

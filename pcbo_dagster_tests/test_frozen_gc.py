"""`pcbo gc` frozen past its write lease (a GC pause, SIGSTOP, a suspended VM) between its judgement of
what a partition's leftovers are and their removal, woken after another host's run took the lease over
and staged (or committed) a new version under the leftovers' names: it must remove none of that run's
files. Real processes as in `test_frozen_writer.py`: hosts with their own PCBO_HOME sharing a
PostgreSQL catalog, an audit backup on S3 (moto) and a lake (a local directory or S3).

A crashed run left version 1 of both partitions staged, never committed (`after_data_files`); gc judged
those files removable and froze before removing them (`gc_before_removals@0:stop`). The next run
replaced the leftovers with its own version 1 (a leftover of a version nobody committed is no writer's)
and committed, or froze before committing while holding the lease. gc woken removed that run's version
and rollback manifests (its commit point then named a version manifest no longer in the lake); now it
renews its lease and checks the chain before each partition's removals and stops there (exit 1). Frozen
right after that check instead (`gc_after_fence_check`), it removed them all the same; now each file
goes only while it holds the bytes gc judged (`LakeStorage.swap`), and gc stops at the first that does
not. The other way round, a run frozen after staging past its lease, whose staged files a gc removed
meanwhile (taking the lease over and giving it back), commits nothing when woken: its renewal does not
take a lease it lost back.

The crashed run and the frozen processes are subprocesses (a crash ends its process, a freeze stops
it); the other hosts' commands (the holder's run, gc run again, verify) run in the test process, as
another process on the same machine would (their own PCBO_HOME, the shared stores)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pcbo_dagster_tests.cli_runner import load_generator, run_pcbo, run_pcbo_in_process, write_request
from pcbo_dagster_tests.frozen_hosts import (
    PAST_THE_LEASE_SECONDS,
    lake_bytes,
    shared_env,
    start_frozen,
    wake,
    woken,
)

pytestmark = pytest.mark.postgres

FIRST = "events/v1/20240101T000000Z"
#: Where gc freezes: before its lease renewal and chain check, or right after them.
GC_POINTS = ["gc_before_removals@0", "gc_after_fence_check@0"]


def _crash_leftovers(tmp_path: Path, env: dict[str, str]) -> tuple[Path, dict[str, bytes]]:
    """A run that crashed after staging version 1 of both partitions; the holder's request; what the
    crash left in the first partition."""
    generator = load_generator()
    crash = write_request(
        tmp_path / "crash.json", generator.make_request(records=60, partitions=2, seed=7, run_id="crash-1")
    )
    holder = write_request(
        tmp_path / "holder.json", generator.make_request(records=60, partitions=2, seed=6, run_id="holder-1")
    )
    crashed = run_pcbo(
        ["execute", "--input", crash],
        home=tmp_path / "host-c",
        env={**env, "PCBO_FAILPOINT": "after_data_files@0"},
        cwd=tmp_path,
    )
    assert crashed.status == 86, crashed.stderr
    left = {rel: data for rel, data in lake_bytes(env["PCBO_LAKE_URL"]).items() if rel.startswith(FIRST)}
    assert f"{FIRST}/_versions/v000001.json" in left and f"{FIRST}/_rollback/v000001.json" in left
    time.sleep(PAST_THE_LEASE_SECONDS)  # the crashed run's lease expires
    return holder, left


def _verify_clean(tmp_path: Path, env: dict[str, str]) -> None:
    run = run_pcbo_in_process(["verify"], home=tmp_path / "auditor", env=env, cwd=tmp_path)
    assert run.status == 0 and run.document["status"] == "clean", run.document


@pytest.mark.parametrize("gc_point", GC_POINTS)
def test_gc_frozen_past_its_lease_removes_nothing_another_run_committed(
    tmp_path, gc_point, shared_lake_url, s3_store, fresh_postgres_url, monkeypatch
):
    env = shared_env(s3_store, fresh_postgres_url, shared_lake_url, monkeypatch)
    holder, left = _crash_leftovers(tmp_path, env)
    gc = start_frozen(tmp_path / "host-g", ["gc"], env, gc_point)
    try:
        time.sleep(PAST_THE_LEASE_SECONDS)  # gc's lease expires
        run = run_pcbo_in_process(
            ["execute", "--input", holder], home=tmp_path / "host-b", env=env, cwd=tmp_path
        )
        assert run.status == 0, run.stderr
        assert {p["status"] for p in run.document["partitions"]} == {"committed"}
        committed = lake_bytes(shared_lake_url)
        # the holder's version 1 took the leftovers' names
        assert committed[f"{FIRST}/_versions/v000001.json"] != left[f"{FIRST}/_versions/v000001.json"]
    finally:
        wake(gc)
    status, stderr = woken(gc)
    assert status == 1, stderr
    assert FIRST in stderr and "nothing more was removed" in stderr, stderr
    after = lake_bytes(shared_lake_url)
    assert {rel: after.get(rel) for rel in committed} == committed
    _verify_clean(tmp_path, env)
    # gc run again (its chain now the holder's) removes the crash's own data files, and nothing else
    run = run_pcbo_in_process(["gc"], home=tmp_path / "host-g", env=env, cwd=tmp_path)
    assert run.status == 0, run.stderr
    removed = {entry["path"] for entry in run.document["removed"]}
    assert removed and all(rel.rsplit("/", 1)[1].startswith("part-") for rel in removed), removed
    assert {rel for rel in committed if rel not in lake_bytes(shared_lake_url)} == removed
    _verify_clean(tmp_path, env)


@pytest.mark.parametrize("gc_point", GC_POINTS)
def test_gc_frozen_past_its_lease_removes_nothing_another_run_staged(
    tmp_path, gc_point, shared_lake_url, s3_store, fresh_postgres_url, monkeypatch
):
    """The holder froze after staging, before its intent, its lease held (120 s): gc woken finds the
    lease another run's (or, past that check, the files other bytes) and stops; the holder woken
    commits what it staged."""
    env = shared_env(s3_store, fresh_postgres_url, shared_lake_url, monkeypatch)
    holder, left = _crash_leftovers(tmp_path, env)
    gc = start_frozen(tmp_path / "host-g", ["gc"], env, gc_point)
    b = None
    try:
        time.sleep(PAST_THE_LEASE_SECONDS)  # gc's lease expires
        b = start_frozen(
            tmp_path / "host-b",
            ["execute", "--input", holder],
            {**env, "PCBO_LEASE_TTL_SECONDS": "120"},
            "after_data_files@0",
        )
        staged = lake_bytes(shared_lake_url)
        assert staged[f"{FIRST}/_versions/v000001.json"] != left[f"{FIRST}/_versions/v000001.json"]
        status, stderr = woken(gc)
        assert status == 1, stderr
        assert FIRST in stderr and "nothing more was removed" in stderr, stderr
        after = lake_bytes(shared_lake_url)
        assert {rel: after.get(rel) for rel in staged} == staged
    finally:
        wake(gc)
        wake(b)
    assert b is not None
    status, stderr = woken(b)
    assert status == 0, stderr
    _verify_clean(tmp_path, env)


def test_a_run_frozen_after_staging_commits_nothing_gc_removed_meanwhile(
    tmp_path, shared_lake_url, s3_store, fresh_postgres_url, monkeypatch
):
    """The other direction: a run froze after staging, before its intent, past its lease; gc took the
    lease over, judged what the run staged a crash's leftovers (nothing on the chain names it), removed
    it and gave the lease back. The run woken must not take the lease again as if it never lost it and
    commit commit points naming files no longer in the lake."""
    generator = load_generator()
    request = write_request(
        tmp_path / "run.json", generator.make_request(records=60, partitions=2, seed=6, run_id="frozen-1")
    )
    env = shared_env(s3_store, fresh_postgres_url, shared_lake_url, monkeypatch)
    run = start_frozen(tmp_path / "host-a", ["execute", "--input", request], env, "after_data_files@0")
    try:
        time.sleep(PAST_THE_LEASE_SECONDS)  # the run's lease expires
        gc = run_pcbo_in_process(["gc"], home=tmp_path / "host-g", env=env, cwd=tmp_path)
        assert gc.status == 0, gc.stderr
        assert f"{FIRST}/_versions/v000001.json" in {entry["path"] for entry in gc.document["removed"]}
    finally:
        wake(run)
    status, stderr = woken(run)
    assert status == 1, stderr
    _verify_clean(tmp_path, env)
    assert "lease was taken over" in stderr, stderr

"""A run frozen past its write lease (a GC pause, SIGSTOP, a suspended VM) after reading its commit
point and before its staging writes, woken after another host took the lease over and committed: it
must fail without altering anything the other run wrote. Two `pcbo execute` runs in separate processes
(hosts with their own PCBO_HOME) share a PostgreSQL catalog, an audit backup on S3 (moto) and a lake (a
local directory or S3); the first, a subprocess, stops itself with SIGSTOP right before its first
staging write (`PCBO_FAILPOINT=before_staging_writes@0:stop`) and is sent SIGCONT once the second has
committed. A crash or a freeze is a `pcbo` subprocess; the other hosts' commands (a holder's run that
is not frozen, verify) run in the test process (`cli_runner.run_pcbo_in_process`)."""

from __future__ import annotations

import time

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


def test_a_run_frozen_past_its_lease_wakes_and_fails_altering_nothing(
    tmp_path, shared_lake_url, s3_store, fresh_postgres_url, monkeypatch
):
    generator = load_generator()
    frozen = write_request(
        tmp_path / "frozen.json", generator.make_request(records=60, partitions=2, seed=5, run_id="frozen-1")
    )
    holder = write_request(
        tmp_path / "holder.json", generator.make_request(records=60, partitions=2, seed=6, run_id="holder-1")
    )
    env = shared_env(s3_store, fresh_postgres_url, shared_lake_url, monkeypatch)
    a = start_frozen(tmp_path / "host-a", ["execute", "--input", frozen], env, "before_staging_writes@0")
    try:
        time.sleep(
            PAST_THE_LEASE_SECONDS
        )  # its lease expires: nothing renews it while the process is stopped
        run = run_pcbo_in_process(
            ["execute", "--input", holder], home=tmp_path / "host-b", env=env, cwd=tmp_path
        )
        assert run.status == 0, run.stderr
        assert {p["status"] for p in run.document["partitions"]} == {"committed"}
        committed = lake_bytes(shared_lake_url)
        assert any("/_versions/v000001.json" in rel for rel in committed)
    finally:
        wake(a)
    status, stderr = woken(a)
    assert status == 1, stderr
    assert "nothing was overwritten" in stderr or "write lease was taken over" in stderr
    # Nothing the holder wrote was altered; the frozen run left at most its own data file (named by its
    # content, written before it found the version taken; no manifest names it: `pcbo gc` removes it).
    after = lake_bytes(shared_lake_url)
    assert {rel: after[rel] for rel in committed} == committed
    assert all(rel.rsplit("/", 1)[1].startswith("part-") for rel in set(after) - set(committed))
    run = run_pcbo_in_process(["verify"], home=tmp_path / "host-c", env=env, cwd=tmp_path)
    assert run.status == 0, run.document
    assert run.document["status"] == "clean"


@pytest.mark.parametrize("failpoint", ["after_data_files@0", "before_commit@0"])
def test_what_a_crashed_run_staged_is_replaced_by_the_next_holder_of_the_lease(tmp_path, failpoint):
    """The other side of create-only staging: a version a crash left staged but never committed (its
    intent on the chain or not) is no other writer's, and the next run, holding the lease, stages its
    own content under the same version number over it."""
    generator = load_generator()
    first = write_request(
        tmp_path / "first.json", generator.make_request(records=60, partitions=2, seed=5, run_id="crash-1")
    )
    second = write_request(
        tmp_path / "second.json", generator.make_request(records=60, partitions=2, seed=6, run_id="crash-2")
    )
    home = tmp_path / "home"
    run = run_pcbo(["execute", "--input", first], home=home, env={"PCBO_FAILPOINT": failpoint})
    assert run.status == 86, run.stderr
    staged = home / "lake/events/v1/20240101T000000Z/_versions/v000001.json"
    left = staged.read_bytes()
    run = run_pcbo_in_process(["execute", "--input", second], home=home)
    assert run.status == 0, run.stderr
    assert {p["status"] for p in run.document["partitions"]} == {"committed"}
    assert staged.read_bytes() != left
    assert staged.read_bytes() == (staged.parent.parent / "_manifest.json").read_bytes()
    run = run_pcbo_in_process(["verify"], home=home)
    assert run.status == 0 and run.document["status"] == "clean", run.document


def test_a_run_frozen_after_staging_appends_no_intent_while_another_run_holds_the_lease(
    tmp_path, s3_store, fresh_postgres_url, monkeypatch
):
    """The run froze after its staging writes, before its intent; the lease's new holder replaced what
    it had staged (a leftover of a version nobody committed, to the holder) and froze in turn before its
    own intent. Woken first, the old run must not append its intent on a chain nobody moved yet (its
    commit point would name a manifest the holder's `_versions/` file no longer is): it finds the lease
    held by another run (exit 1), and the holder, woken, commits."""
    generator = load_generator()
    frozen = write_request(
        tmp_path / "frozen.json", generator.make_request(records=60, partitions=2, seed=5, run_id="frozen-1")
    )
    holder = write_request(
        tmp_path / "holder.json", generator.make_request(records=60, partitions=2, seed=6, run_id="holder-1")
    )
    env = shared_env(s3_store, fresh_postgres_url, str(tmp_path / "shared-lake"), monkeypatch)
    a = start_frozen(tmp_path / "host-a", ["execute", "--input", frozen], env, "after_data_files@0")
    b = None
    try:
        time.sleep(PAST_THE_LEASE_SECONDS)  # a's lease expires
        b = start_frozen(
            tmp_path / "host-b",
            ["execute", "--input", holder],
            {**env, "PCBO_LEASE_TTL_SECONDS": "120"},
            "after_data_files@0",
        )
        status, stderr = woken(a)
        assert status == 1, stderr
        assert "lease was taken over" in stderr
    finally:
        wake(a)
        wake(b)
    assert b is not None
    status, stderr = woken(b)
    assert status == 0, stderr
    run = run_pcbo_in_process(["verify"], home=tmp_path / "host-c", env=env, cwd=tmp_path)
    assert run.status == 0, run.document
    assert run.document["status"] == "clean"


def test_a_run_frozen_after_judging_a_staged_leftover_replaceable_overwrites_nothing_when_woken(
    tmp_path, shared_lake_url, s3_store, fresh_postgres_url, monkeypatch
):
    """A crashed run left version 1 staged (never committed). Run A judged that leftover replaceable
    (it still held the lease) and froze right before replacing it (`before_replacing_staged`); B took
    the lease over, replaced the leftover with its own version 1 and committed it. A woken wrote its
    version manifest over B's committed one, unconditionally; now the replacement goes only over the
    bytes A judged, and A stops (`ChainMoved`) with B's files as B wrote them."""
    generator = load_generator()
    requests = {
        run_id: write_request(
            tmp_path / f"{run_id}.json",
            generator.make_request(records=60, partitions=2, seed=seed, run_id=run_id),
        )
        for run_id, seed in (("crash-1", 7), ("frozen-1", 5), ("holder-1", 6))
    }
    env = shared_env(s3_store, fresh_postgres_url, shared_lake_url, monkeypatch)
    crashed = run_pcbo(
        ["execute", "--input", requests["crash-1"]],
        home=tmp_path / "host-c",
        env={**env, "PCBO_FAILPOINT": "after_data_files@0"},
        cwd=tmp_path,
    )
    assert crashed.status == 86, crashed.stderr
    time.sleep(PAST_THE_LEASE_SECONDS)  # the crashed run's lease expires
    a = start_frozen(
        tmp_path / "host-a", ["execute", "--input", requests["frozen-1"]], env, "before_replacing_staged@0"
    )
    try:
        time.sleep(PAST_THE_LEASE_SECONDS)  # a's lease expires
        run = run_pcbo_in_process(
            ["execute", "--input", requests["holder-1"]], home=tmp_path / "host-b", env=env, cwd=tmp_path
        )
        assert run.status == 0, run.stderr
        assert {p["status"] for p in run.document["partitions"]} == {"committed"}
        committed = lake_bytes(shared_lake_url)
    finally:
        wake(a)
    status, stderr = woken(a)
    assert status == 1, stderr
    after = lake_bytes(shared_lake_url)
    assert {rel: after[rel] for rel in committed} == committed
    run = run_pcbo_in_process(["verify"], home=tmp_path / "host-d", env=env, cwd=tmp_path)
    assert run.status == 0 and run.document["status"] == "clean", run.document
    assert "nothing was overwritten" in stderr, stderr

"""Parallel commits (`--parallel` / `PCBO_PARALLEL`): up to N partitions of a commit batch are read,
encoded and written at once, while audit events and catalog rows are still written by the calling
thread, in partition order. What a run leaves (lake bytes, audit chain, catalog rows, the execute
document) must be the same with `parallel=1` and `parallel=4`: on a file:// lake, on an s3:// lake
(moto) and a gs:// lake (gcp-storage-emulator), on a fresh run and on a run that supersedes versions
a crash left unaudited (the one place the staging step itself appends audit events)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from pcbo_dagster.cli import main as cli
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.engine import execute as execute_module
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.execute import COMMIT_BATCH, check_gates, execute
from pcbo_dagster.engine.request_loading import evaluate, load_request
from pcbo_dagster.engine.settings import (
    DEFAULT_PARALLEL,
    DEFAULT_PARALLEL_LOCAL,
    DEFAULT_PARALLEL_LOCAL_LEDGERS,
    Settings,
    default_parallel,
)
from pcbo_dagster.lake.storage import LakeStorage
from pcbo_dagster_tests.cli_runner import (
    INTENT_EVENT_TYPES,
    backup_events,
    backup_lines,
    load_generator,
    write_request,
)

_T = TypeVar("_T")

PARTITIONS = 40  # more than one commit batch
assert PARTITIONS > COMMIT_BATCH
FIXED_CLOCK = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
#: Partitions the changed request adds a record to: two in the first batch, one in the second.
CHANGED = (3, 20, 35)


def make_request(run_id: str = "parallel-run-001") -> dict[str, Any]:
    return load_generator().make_request(records=1200, partitions=PARTITIONS, seed=11, run_id=run_id)


def changed_request() -> dict[str, Any]:
    request = make_request("parallel-run-002")
    for n, index in enumerate(CHANGED):
        day, hour = divmod(index, 24)
        request["sourceRecords"].append(
            {
                "id": f"zz-late-{n:04d}",
                "occurredAt": f"2024-01-{1 + day:02d}T{hour:02d}:30:00Z",
                "jurisdiction": "US",
                "consentGranted": True,
                "retentionExpiresAt": "2026-01-01T00:00:00Z",
                "amount": 5,
                "channel": "web",
                "converted": True,
            }
        )
    return request


def _settings(home: Path, lake_url: str | None = None, parallel: int | None = None) -> Settings:
    # env={}: no PCBO_* of the caller's environment (a failpoint, another lake) leaks in
    return Settings.resolve(home=str(home), lake=lake_url, env={}, parallel=parallel)


def _execute(
    home: Path,
    request_file: Path,
    parallel: int,
    lake_url: str | None = None,
    wrap: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Execute in this process with a fixed audit clock, so two runs can match byte for byte."""
    loaded = load_request(request_file.read_bytes(), request_file.parent)
    plan, decisions = evaluate(loaded)
    check_gates(loaded, decisions)
    env = Environment.open(_settings(home, lake_url))
    env.audit.clock = lambda: FIXED_CLOCK
    if wrap is not None:
        wrap(env)
    try:
        return execute(env, loaded, plan, decisions, parallel=parallel, **kwargs)
    finally:
        env.close()


def _crash_at(home: Path, request_file: Path, parallel: int, failpoint: str) -> None:
    """`_execute` until the failpoint kills the process (run in a child process)."""
    os.environ["PCBO_FAILPOINT"] = failpoint
    _execute(home, request_file, parallel)


def _collect_and_wipe(home: Path, lake_url: str) -> dict[str, Any]:
    """Everything a run left (lake files, audit backup, catalog rows), then remove it all, so the
    next run writes to the very same URLs and paths (event bodies name them)."""
    lake = LakeStorage(lake_url)
    files = {rel: lake.read(rel) for rel in lake.list_files()}
    with sqlite3.connect(home / "catalog.db") as db:
        partitions = db.execute(
            "SELECT partition_key, version, run_id, status, manifest_uri, manifest_checksum, merkle_root,"
            " record_count, event_hash, files FROM partitions ORDER BY rowid"
        ).fetchall()
        lineage = db.execute(
            "SELECT run_id, partition_key, partition_version, source_uri, source_kind, plan_hash,"
            " decision_hash FROM lineage ORDER BY id"
        ).fetchall()
        events = db.execute("SELECT seq, event_hash, event_json FROM audit_events ORDER BY seq").fetchall()
    result = {
        "files": files,
        "backup": backup_lines(home),
        "partitions": partitions,
        "lineage": lineage,
        "events": events,
    }
    for rel in files:
        lake.delete(rel)
    shutil.rmtree(home)
    return result


def _chain(collected: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in collected["backup"]]


def _events(collected: dict[str, Any]) -> list[dict[str, Any]]:
    """The commit and rollback events (not the intents)."""
    return [e for e in _chain(collected) if e["event_type"] not in INTENT_EVENT_TYPES]


def _assert_same(sequential: dict[str, Any], parallel: dict[str, Any]) -> None:
    assert sorted(parallel["files"]) == sorted(sequential["files"])
    for rel, data in sequential["files"].items():
        assert parallel["files"][rel] == data, f"{rel} differs"
    # the audit chain byte for byte (same clock), hence the same seq order and event hashes
    assert parallel["backup"] == sequential["backup"]
    for name in ("partitions", "lineage", "events"):
        assert parallel[name] == sequential[name], name


@pytest.fixture
def request_file(tmp_path: Path) -> Path:
    return write_request(tmp_path / "request.json", make_request())


def _lake_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch) -> str:
    if kind == "file":
        return (tmp_path / "lake").as_uri()
    store = request.getfixturevalue("s3_store" if kind == "s3" else "gcs_store")
    for k, v in store.env.items():
        monkeypatch.setenv(k, v)
    return store.url()


@pytest.mark.parametrize(
    "kind", ["file", pytest.param("s3", marks=pytest.mark.slow), pytest.param("gs", marks=pytest.mark.slow)]
)
def test_parallel_and_sequential_runs_leave_identical_bytes(
    kind: str, tmp_path: Path, request_file: Path, request: pytest.FixtureRequest, monkeypatch
) -> None:
    lake_url = _lake_url(kind, tmp_path, request, monkeypatch)
    home = tmp_path / "home"
    documents, collected = {}, {}
    for parallel in (1, 4):
        documents[parallel] = _execute(home, request_file, parallel, lake_url)
        collected[parallel] = _collect_and_wipe(home, lake_url)

    assert documents[1]["status"] == "committed"
    assert documents[4] == documents[1]
    _assert_same(collected[1], collected[4])
    events = _events(collected[4])
    assert [e["chain"]["seq"] for e in _chain(collected[4])] == list(range(len(collected[4]["backup"])))
    assert len(events) == PARTITIONS
    assert [e["partition"]["index"] for e in events] == list(range(PARTITIONS)), "seq follows partitions"
    assert [row[0] for row in collected[4]["partitions"]] == [e["partition"]["key"] for e in events]


class _CallingThreadOnly:
    """Passes calls through to `target`, noting any made from another thread than `owner`."""

    def __init__(self, target: Any, owner: int, strays: list[str]) -> None:
        self._target, self._owner, self._strays = target, owner, strays

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._owner:
                self._strays.append(name)
            return attr(*args, **kwargs)

        return call


def _calling_thread_only_proxy(target: _T, owner: int, strays: list[str]) -> _T:
    """A `_CallingThreadOnly` over `target`, typed as `target`: it passes every attribute through."""
    return cast(_T, _CallingThreadOnly(target, owner, strays))


def _calling_thread_only(strays: list[str]) -> Any:
    """For `_execute(wrap=...)`: the run's audit log and catalog, noting calls from other threads."""
    owner = threading.get_ident()

    def wrap(env: Environment) -> None:
        env.audit = _calling_thread_only_proxy(env.audit, owner, strays)
        env.catalog = _calling_thread_only_proxy(env.catalog, owner, strays)

    return wrap


@pytest.mark.slow
def test_superseding_versions_a_crash_left_unaudited_heals_in_partition_order(tmp_path: Path) -> None:
    """A crash after the first batch's commit points leaves 32 committed, unaudited partitions (their
    intent on the chain); the next run changes three of them (two in the first batch): the staging
    step first completes the 32 interrupted commits, in partition order, then the batch's new
    versions follow in partition order."""
    first = write_request(tmp_path / "first.json", make_request())
    changed = write_request(tmp_path / "changed.json", changed_request())
    home = tmp_path / "home"
    lake_url = (home / "lake").as_uri()
    documents, collected = {}, {}
    strays: list[str] = []
    for parallel in (1, 4):
        # The crash in a forked child with the same fixed audit clock (its intent event is on the chain).
        child = multiprocessing.get_context("fork").Process(
            target=_crash_at, args=(home, first, parallel, "after_commit@5")
        )
        child.start()
        child.join(timeout=300)
        assert child.exitcode == 86
        assert backup_events(home) == [], "the crash came before the first batch's audit events"
        documents[parallel] = _execute(home, changed, parallel, wrap=_calling_thread_only(strays))
        collected[parallel] = _collect_and_wipe(home, lake_url)

    assert strays == [], "audit or catalog written from a worker thread"
    assert documents[4] == documents[1]
    _assert_same(collected[1], collected[4])
    events = _events(collected[4])

    def commit(i: int) -> tuple[int, int, str]:
        if i >= COMMIT_BATCH:  # never committed before the crash
            return (i, 1, "parallel-run-002")
        return (i, 2, "parallel-run-002") if i in CHANGED else (i, 1, "parallel-run-001")

    expected = []
    for start in range(0, PARTITIONS, COMMIT_BATCH):
        batch = range(start, min(start + COMMIT_BATCH, PARTITIONS))
        expected += [(i, 1, "parallel-run-001") for i in batch if i < COMMIT_BATCH]  # healed
        expected += [commit(i) for i in batch if i >= COMMIT_BATCH or i in CHANGED]
    assert [(e["partition"]["index"], e["partition"]["version"], e["run_id"]) for e in events] == expected
    assert [e["chain"]["seq"] for e in _chain(collected[4])] == list(range(len(collected[4]["backup"])))
    outcome = {p["index"]: p for p in documents[4]["partitions"]}
    assert {i for i, p in outcome.items() if p["status"] == "committed"} == set(CHANGED) | set(
        range(COMMIT_BATCH, PARTITIONS)
    )
    assert {i for i, p in outcome.items() if p.get("healed")} == set(range(COMMIT_BATCH))


@pytest.mark.parametrize("parallel", [1, 4])
def test_up_to_n_partitions_are_encoded_at_once_and_the_chain_is_written_by_one_thread(
    parallel: int, tmp_path: Path, request_file: Path, monkeypatch
) -> None:
    lock = threading.Lock()
    active, peak, threads = [0], [0], set()
    real_build_table = execute_module.build_table

    def slow_build_table(*args: Any) -> Any:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            threads.add(threading.get_ident())
        try:
            time.sleep(0.03)
            return real_build_table(*args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(execute_module, "build_table", slow_build_table)
    strays: list[str] = []
    me = threading.get_ident()
    document = _execute(tmp_path / "home", request_file, parallel, wrap=_calling_thread_only(strays))
    assert document["status"] == "committed"
    assert strays == [], "audit or catalog written from a worker thread"
    if parallel == 1:
        assert peak[0] == 1 and threads == {me}
    else:
        assert 2 <= peak[0] <= parallel
        assert me not in threads
    events = backup_events(tmp_path / "home")
    assert [e["partition"]["index"] for e in events] == list(range(PARTITIONS))


def test_pace_still_commits_one_partition_at_a_time(tmp_path: Path, request_file: Path) -> None:
    """The staged rollout's throttle: `pace` is asked before each partition, after every partition
    before it is committed and audited, whatever `parallel` says; False stops the run there."""
    home = tmp_path / "home"
    seen: list[tuple[int, int]] = []

    def pace(pd: Any) -> bool:
        seen.append((pd.partition.index, len(backup_events(home))))
        return pd.partition.index < 5

    document = _execute(home, request_file, 4, pace=pace)
    assert seen == [(i, i) for i in range(6)]
    assert document["status"] == "stopped"
    assert [p["index"] for p in document["partitions"]] == list(range(5))


def test_the_parallel_setting() -> None:
    assert Settings.resolve(home="/tmp/x", env={}).parallel == DEFAULT_PARALLEL_LOCAL == 1
    assert not Settings.resolve(home="/tmp/x", env={"PCBO_PARALLEL": " "}).parallel_given
    assert Settings.resolve(home="/tmp/x", env={"PCBO_PARALLEL": "1"}).parallel_given
    assert Settings.resolve(home="/tmp/x", env={}, parallel=1).parallel_given
    # by the request's source too: a ledger archive's partitions are encoded two at a time locally
    assert default_parallel("/tmp/x/lake", "ledger_archive") == DEFAULT_PARALLEL_LOCAL_LEDGERS == 2
    assert default_parallel("file:///tmp/x/lake", "jsonl") == default_parallel("/tmp/x/lake") == 1
    assert default_parallel("s3://bucket/lake", "ledger_archive") == DEFAULT_PARALLEL == 4
    for lake in ("/tmp/x/lake", "file:///tmp/x/lake"):
        assert Settings.resolve(home="/tmp/x", lake=lake, env={}).parallel == 1
    for lake in ("s3://bucket/lake", "gs://bucket/lake"):
        assert Settings.resolve(home="/tmp/x", lake=lake, env={}).parallel == DEFAULT_PARALLEL == 4
        assert Settings.resolve(home="/tmp/x", lake=lake, env={"PCBO_PARALLEL": "2"}).parallel == 2
    assert Settings.resolve(home="/tmp/x", env={"PCBO_PARALLEL": "1"}).parallel == 1
    assert Settings.resolve(home="/tmp/x", env={"PCBO_PARALLEL": " 8 "}).parallel == 8
    assert Settings.resolve(home="/tmp/x", env={"PCBO_PARALLEL": "8"}, parallel=2).parallel == 2
    for bad in ("0", "-1", "four", "1.5"):
        with pytest.raises(InvalidInput, match="PCBO_PARALLEL"):
            Settings.resolve(home="/tmp/x", env={"PCBO_PARALLEL": bad})
    with pytest.raises(InvalidInput, match="--parallel"):
        Settings.resolve(home="/tmp/x", env={}, parallel=0)


def test_cli_parallel_option(tmp_path: Path, request_file: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("PCBO_PARALLEL", raising=False)
    home, out = tmp_path / "home", tmp_path / "out.json"
    argv = ["execute", "--input", str(request_file), "--home", str(home), "--output", str(out)]
    assert cli.main([*argv, "--parallel", "0"]) == 2
    assert "--parallel" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main([*argv, "--parallel", "2"]) == 0
    assert json.loads(out.read_text())["status"] == "committed"

"""The commit protocol one phase at a time (`emit_partitions`, `append_commit_events`,
`reconcile_partitions`: what the Dagster asset's ops run), against `execute` doing it batch by batch.

Same lake bytes and the same execute document; a run stopped between two phases leaves exactly a crash
window of the protocol, healed by `pcbo verify --repair` or by the next run; a phase run again does
nothing twice; a partition whose lake disagrees with its chain stops the run with `ExecuteFailed` of
kind `lake_disagrees_with_chain` (not a post-write failure: nothing was rolled back)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.execute import (
    COMMIT_BATCH,
    LAKE_DISAGREES_WITH_CHAIN,
    Emission,
    ExecuteFailed,
    append_commit_events,
    check_gates,
    emit_partitions,
    execute,
    reconcile_partitions,
)
from pcbo_dagster.engine.partition_checks import ChainNotVerified
from pcbo_dagster.engine.request_loading import evaluate, load_request
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.engine.verify import verify
from pcbo_dagster.lake.layout import OutsidePartition
from pcbo_dagster_tests.cli_runner import (
    backup_events,
    backup_file,
    lake_dir,
    lake_files,
    load_generator,
    tree_state,
    write_request,
)

PARTITIONS = 40  # two commit batches
assert PARTITIONS > COMMIT_BATCH


def _request(run_id: str, changed: bool = False) -> dict[str, Any]:
    request = load_generator().make_request(records=900, partitions=PARTITIONS, seed=5, run_id=run_id)
    if changed:
        request["sourceRecords"].append(
            {
                "id": "zz-late-0001",
                "occurredAt": "2024-01-01T03:30:00Z",
                "jurisdiction": "US",
                "consentGranted": True,
                "retentionExpiresAt": "2026-01-01T00:00:00Z",
            }
        )
    return request


def _open(home: Path) -> Environment:
    return Environment.open(Settings.resolve(home=str(home), env={}, parallel=1))


def _evaluated(request_file: Path) -> tuple[Any, Any, Any]:
    loaded = load_request(request_file.read_bytes(), request_file.parent)
    plan, decisions = evaluate(loaded)
    check_gates(loaded, decisions)
    return loaded, plan, decisions


def _phases(home: Path, request_file: Path, stop_after: str | None = None) -> dict[str, Any] | Emission:
    loaded, plan, decisions = _evaluated(request_file)
    env = _open(home)
    try:
        emission = emit_partitions(env, loaded, plan, decisions)
        if stop_after == "emit":
            return emission
        append_commit_events(env, emission)
        if stop_after == "append":
            return emission
        return reconcile_partitions(env, loaded, plan, decisions, emission)
    finally:
        env.close()


def _verify(home: Path, repair: bool = False) -> dict[str, Any]:
    env = _open(home)
    try:
        return verify(env, repair=repair)
    finally:
        env.close()


def _without_events(document: dict[str, Any], home: Path) -> dict[str, Any]:
    """The document without what depends on the chain's order (event hashes, delivery) or the home."""
    plain = json.loads(json.dumps(document).replace(home.as_uri(), "HOME"))
    for p in plain["partitions"]:
        p.pop("eventHash")
    plain.pop("auditDelivery")
    return plain


@pytest.fixture
def request_file(tmp_path: Path) -> Path:
    return write_request(tmp_path / "request.json", _request("phases-001"))


def test_the_phases_write_what_execute_writes(tmp_path, request_file):
    by_phases = _phases(tmp_path / "phases", request_file)
    loaded, plan, decisions = _evaluated(request_file)
    env = _open(tmp_path / "execute")
    try:
        at_once = execute(env, loaded, plan, decisions)
    finally:
        env.close()
    assert by_phases["status"] == "committed" and len(by_phases["partitions"]) == PARTITIONS
    assert _without_events(by_phases, tmp_path / "phases") == _without_events(at_once, tmp_path / "execute")
    assert lake_files(tmp_path / "phases") == lake_files(tmp_path / "execute")
    report = _verify(tmp_path / "phases")
    assert report["status"] == "clean", report["findings"]
    # Every intent comes before the commit events (the commit points are written first), one commit
    # event per partition, each with the event hash the document names.
    events = backup_events(tmp_path / "phases", intents=True)
    types = [e["event_type"] for e in events]
    assert types == ["partition_commit_intent"] * 2 + ["partition_committed"] * PARTITIONS
    hashes = {e["partition"]["key"]: e["chain"]["event_hash"] for e in events[2:]}
    assert {p["key"]: p["eventHash"] for p in by_phases["partitions"]} == hashes

    # Run again: nothing new, no event appended.
    again = _phases(tmp_path / "phases", request_file)
    assert again["status"] == "unchanged"
    assert backup_events(tmp_path / "phases", intents=True) == events


@pytest.mark.parametrize("stop_after", ["emit", "append"])
def test_a_run_stopped_between_phases_is_a_crash_window_verify_repair_heals(
    tmp_path, request_file, stop_after
):
    home = tmp_path / "home"
    emission = _phases(home, request_file, stop_after=stop_after)
    assert isinstance(emission, Emission) and emission.count("committed") == PARTITIONS
    found = _verify(home)
    assert found["status"] != "clean"
    # Commit points under an open intent without their events (and so without catalog rows), or
    # events without catalog rows: both crash windows of the protocol, and nothing else.
    expected = {"audit_event_missing", "catalog_mismatch"} if stop_after == "emit" else {"catalog_mismatch"}
    assert {f["kind"] for f in found["findings"]} == expected, found["findings"]
    assert all(
        "a crash window" in f["detail"] for f in found["findings"] if f["kind"] == "audit_event_missing"
    )
    repaired = _verify(home, repair=True)
    assert repaired["status"] == "clean", repaired["findings"]
    assert {r["where"] for r in repaired["repaired"]} == {f"events/v1/{k}" for k in emission.keys}
    assert _verify(home)["status"] == "clean"
    if stop_after == "emit":
        assert [e["event_type"] for e in backup_events(home)].count("partition_committed") == PARTITIONS


def test_the_next_run_heals_what_a_stopped_run_left(tmp_path, request_file):
    home = tmp_path / "home"
    _phases(home, request_file, stop_after="emit")
    document = _phases(home, request_file)
    assert document["status"] == "unchanged"
    assert sum(bool(p.get("healed")) for p in document["partitions"]) == PARTITIONS
    assert _verify(home)["status"] == "clean"
    commits = [e for e in backup_events(home) if e["event_type"] == "partition_committed"]
    assert len(commits) == PARTITIONS, "one commit event per partition, never two"


def test_a_phase_run_again_does_nothing_twice(tmp_path, request_file):
    home = tmp_path / "home"
    loaded, plan, decisions = _evaluated(request_file)
    env = _open(home)
    try:
        emission = emit_partitions(env, loaded, plan, decisions)
        first = append_commit_events(env, emission)
        second = append_commit_events(env, emission)
        document = reconcile_partitions(env, loaded, plan, decisions, emission)
        again = reconcile_partitions(env, loaded, plan, decisions, emission)
    finally:
        env.close()
    assert len(first["appended"]) == PARTITIONS and not first["changed"]
    assert second["appended"] == [] and len(second["alreadyOnChain"]) == PARTITIONS
    assert document["status"] == again["status"] == "committed"
    assert _verify(home)["status"] == "clean"


@pytest.mark.parametrize("phase", ["emit", "append", "reconcile"])
def test_a_phase_refuses_a_chain_whose_events_were_forged(tmp_path, request_file, phase):
    """Each phase decides on the chain (what to restore, which commit events to append, what to check
    and record): an event edited in the middle of the audit backup (the first commit made to name
    another run, its hash left), the backup's last event still the catalog's head, is refused
    (`ChainNotVerified`, naming the chain) before the phase writes anything."""
    home = tmp_path / "home"
    _phases(home, request_file)
    loaded, plan, decisions = _evaluated(
        write_request(tmp_path / "changed.json", _request("phases-002", changed=True))
    )
    env = _open(home)
    try:
        emission = emit_partitions(env, loaded, plan, decisions) if phase != "emit" else None
        if phase == "reconcile":
            assert emission is not None
            append_commit_events(env, emission)
        lines = backup_file(home).read_bytes().splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if b'"partition_committed"' in line)
        event = json.loads(lines[at])
        event["run_id"] = "someone-else"
        lines[at] = json.dumps(event).encode() + b"\n"
        backup_file(home).write_bytes(b"".join(lines))
        before = lake_files(home), backup_file(home).read_bytes()
        with pytest.raises(ChainNotVerified, match="events/v1"):
            if phase == "emit":
                emit_partitions(env, loaded, plan, decisions)
            elif phase == "append":
                assert emission is not None
                append_commit_events(env, emission)
            else:
                assert emission is not None
                reconcile_partitions(env, loaded, plan, decisions, emission)
        assert (lake_files(home), backup_file(home).read_bytes()) == before
    finally:
        env.close()


def test_a_partition_whose_lake_disagrees_stops_the_run_and_says_nothing_was_rolled_back(tmp_path):
    home = tmp_path / "home"
    first = write_request(tmp_path / "a.json", _request("phases-a"))
    changed = write_request(tmp_path / "b.json", _request("phases-b", changed=True))
    _phases(home, first)
    _phases(home, changed)  # version 2 of the partition the late record lands in
    key = "20240101T030000Z"
    part = lake_dir(home) / "events" / "v1" / key
    # A downgrade to version 1 whose version 2 cannot be had again (its manifest deleted, and the
    # first request cannot rebuild it): refused.
    (part / "_manifest.json").write_bytes((part / "_versions/v000001.json").read_bytes())
    (part / "_versions/v000002.json").unlink()
    before = lake_files(home)
    with pytest.raises(ExecuteFailed) as failed:
        _phases(home, first)
    assert failed.value.kind == LAKE_DISAGREES_WITH_CHAIN
    assert failed.value.partition_key == key
    assert "disagrees with its audit chain" in str(failed.value)
    document = failed.value.document
    assert document["status"] == "failed"
    # As `execute`: nothing of the refused partition's commit batch was written, and no rollback.
    assert document["partitions"] == [] and document["totals"]["failure"] == str(failed.value)
    assert lake_files(home) == before
    assert not [e for e in backup_events(home) if e["event_type"] == "partition_rolled_back"]


def test_a_link_in_place_before_the_phases_refuses_them_before_they_write_anything(tmp_path):
    """As `execute` (`test_attacks.py`): a symbolic link already on the way to a partition the run
    writes (the eleventh's directory linked out of the lake: met, at the read of its commit point,
    after the changed fourth was staged) refuses `emit_partitions`
    before it writes anything: nothing appears in the lake, no event (nor intent) is appended; the
    run's `runs` row is `failed`, the error in its summary."""
    home = tmp_path / "home"
    _phases(home, write_request(tmp_path / "a.json", _request("phases-a")))
    partitions = sorted(p for p in (lake_dir(home) / "events" / "v1").iterdir() if p.is_dir())
    shutil.move(partitions[10], tmp_path / "moved-out")
    os.symlink(tmp_path / "moved-out", partitions[10])
    lake_before, events_before = tree_state(lake_dir(home)), backup_events(home, intents=True)
    with pytest.raises(OutsidePartition, match="leads outside the lake or through a symbolic link"):
        _phases(home, write_request(tmp_path / "b.json", _request("phases-b", changed=True)))
    assert tree_state(lake_dir(home)) == lake_before, "the refused run wrote in the lake"
    assert backup_events(home, intents=True) == events_before, "the refused run appended an event"
    with sqlite3.connect(home / "catalog.db") as db:
        status, summary = db.execute("SELECT status, summary FROM runs WHERE run_id = 'phases-b'").fetchone()
    assert status == "failed" and partitions[10].name in json.loads(summary)["failure"]


@pytest.mark.parametrize("lake_event", [True, False])
def test_a_run_whose_lake_history_moved_under_it_appends_nothing_and_commits_nothing(
    tmp_path, request_file, monkeypatch, lake_event
) -> None:
    """The fence (red-team finding: a run frozen past its lease's expiry, resumed after another host
    took the lease over and committed, appended its intent on the new head and committed the same
    versions again). Here another writer appends while the run stages its first batch. A lake event
    (a restoration, a commit, a rollback) stops the run (ChainMoved, exit 1) with no intent, no commit
    point and no event of its own. Any other event (a table declaration, a rollout's lifecycle, a SQL
    apply: a second red-team finding, those made every run under way fail) is taken in, and the run
    commits as ever."""
    import pcbo_dagster.engine.execute as engine_execute
    from pcbo_dagster.audit.log import ChainMoved

    loaded, plan, decisions = _evaluated(request_file)
    home = tmp_path / "home"
    env = _open(home)
    real = engine_execute._stage_batch
    first = decisions.partitions[0].partition

    def stage_then_another_writer(*args: Any, **kwargs: Any) -> Any:
        staged = real(*args, **kwargs)
        if not backup_events(home):
            if lake_event:
                body = {"partition": {"key": first.key}, "manifest_checksum": "sha256:" + "0" * 64}
                env.audit.append("events/v1", "partition_restored", body)
            else:
                env.audit.append("events/v1", "note_of_another_writer", {"by": "an approver"})
        return staged

    monkeypatch.setattr(engine_execute, "_stage_batch", stage_then_another_writer)
    try:
        if lake_event:
            with pytest.raises(ChainMoved, match="another writer appended partition_restored"):
                execute(env, loaded, plan, decisions)
        else:
            document = execute(env, loaded, plan, decisions)
            assert document["status"] == "committed"
    finally:
        env.close()
    kinds = [e["event_type"] for e in backup_events(home)]
    if lake_event:
        assert kinds == ["partition_restored"]
        assert not list(lake_dir(home).rglob("_manifest.json"))
    else:
        assert kinds[0] == "note_of_another_writer" and kinds.count("partition_committed") == PARTITIONS
        assert _verify(home)["status"] == "clean"

"""A rollback or a heal decided on a chain another writer has since moved (a process frozen past its
write lease, or `verify --repair` and a run) must append nothing and touch nothing: their appends are
fenced by the chain they replayed, as a run's intents and commits are."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcbo_dagster.audit.log import ChainMoved
from pcbo_dagster.core.chain_state import replay
from pcbo_dagster.engine.crash_windows import compare, heal
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.rollback import apply_undos, plan_undo
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.lake import layout
from pcbo_dagster_tests.cli_runner import backup_lines, lake_files, load_generator, run_pcbo, write_request

KEY = "20240101T000000Z"


def _request(tmp_path: Path, name: str, seed: int) -> Path:
    request = load_generator().make_request(records=60, partitions=2, seed=seed, run_id=name)
    return write_request(tmp_path / f"{name}.json", request)


def _open(home: Path) -> Environment:
    return Environment.open(Settings.resolve(home=str(home), env={}, parallel=1))


def test_a_rollback_planned_before_another_run_committed_appends_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_pcbo(["execute", "--input", _request(tmp_path, "first", 5)], home=home).status == 0
    env = _open(home)
    try:
        state = replay(env.audit.backup.read_chain("events/v1"))
        step = plan_undo(env, state, "events", "v1", KEY)  # to undo version 1, removing the commit point
        # meanwhile another run commits version 2
        assert run_pcbo(["execute", "--input", _request(tmp_path, "second", 6)], home=home).status == 0
        chain, lake = backup_lines(home), lake_files(home)
        with pytest.raises(ChainMoved):
            apply_undos(env, state, "events", "v1", [step], reason="operator", run_id="stale-rollback")
    finally:
        env.close()
    assert backup_lines(home) == chain and lake_files(home) == lake
    assert run_pcbo(["verify"], home=home).document["status"] == "clean"


def test_a_heal_decided_before_another_writer_healed_appends_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    request = _request(tmp_path, "first", 5)
    run = run_pcbo(["execute", "--input", request], home=home, env={"PCBO_FAILPOINT": "after_commit@0"})
    assert run.status == 86, run.stderr
    env = _open(home)
    try:
        state = replay(env.audit.backup.read_chain("events/v1"))
        manifest = env.lake.read_if_exists(layout.manifest("events", "v1", KEY))
        comparison = compare(state.get(KEY), "events", "v1", KEY, manifest)
        assert comparison.verdict == "heal_commit"
        # meanwhile `verify --repair` (or another run) heals it
        run = run_pcbo(["verify", "--repair"], home=home)
        assert run.status == 0 and run.document["repaired"], run.document
        chain = backup_lines(home)
        with pytest.raises(ChainMoved):
            heal(env, state, "events", "v1", comparison)
    finally:
        env.close()
    assert backup_lines(home) == chain
    assert run_pcbo(["verify"], home=home).document["status"] == "clean"


def test_a_restoration_writes_no_commit_point_before_its_event_is_on_the_chain(
    tmp_path: Path, monkeypatch
) -> None:
    """The `partition_restored` event is appended (fenced) before the commit point is put back, with
    worker threads as without: a run that lost its chain (here the append fails) writes no commit point,
    where a stale run's worker restored the chain's old current version over the new holder's."""
    import pcbo_dagster.engine.execute as engine_execute
    from pcbo_dagster.engine.execute import check_gates, execute
    from pcbo_dagster.engine.request_loading import evaluate, load_request

    home = tmp_path / "home"
    request = _request(tmp_path, "first", 5)
    assert run_pcbo(["execute", "--input", request], home=home).status == 0
    commit_point = home / "lake" / layout.manifest("events", "v1", KEY)
    commit_point.unlink()  # lost: the run puts it back (its `_versions/` manifest has the chain's checksum)

    def fenced_out(*args: object, **kwargs: object) -> None:
        raise ChainMoved("another writer appended partition_committed")

    monkeypatch.setattr(engine_execute, "_record_restoration", fenced_out)
    loaded = load_request(request.read_bytes(), request.parent)
    plan, decisions = evaluate(loaded)
    check_gates(loaded, decisions)
    env = Environment.open(Settings.resolve(home=str(home), env={}, parallel=2))
    try:
        with pytest.raises(ChainMoved):
            execute(env, loaded, plan, decisions)
    finally:
        env.close()
    assert not commit_point.exists()

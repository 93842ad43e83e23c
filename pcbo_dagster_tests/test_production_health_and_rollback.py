"""Production health of promoted rollouts (missing / failed / stale / drifted, the mini backfill plan)
and rolling back a rollout or a partition range in staging and production."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.rollout_lifecycle import ROLLOUT_PROMOTED
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig, parse_datasets_config
from pcbo_dagster.datasets.demo_data import demo_sessions
from pcbo_dagster.datasets.requests import evaluate_keys
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.execute import check_gates, execute
from pcbo_dagster.engine.rollback import rollback
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.engine.verify import verify
from pcbo_dagster.lake import layout, manifests
from pcbo_dagster.rollout.approvals import record_decision, sign_decision
from pcbo_dagster.rollout.clock import ManualClock
from pcbo_dagster.rollout.environments import (
    RolloutEnvironments,
    approval_policy,
    dataset_settings,
    open_environments,
)
from pcbo_dagster.rollout.health import (
    PLAN_FILE,
    check_production_health,
    health_dir,
    plan_id,
    run_health_check,
)
from pcbo_dagster.rollout.lifecycle import append_event, record_staged
from pcbo_dagster.rollout.rollback import range_log_name, rollback_rollout, run_owner
from pcbo_dagster_tests.approver_keys import APPROVERS_YAML, CY

T0 = datetime(2024, 2, 1, 12, 0, tzinfo=UTC)
KEYS = [f"20240101T{h:02d}0000Z" for h in range(4)]
CHAIN = "sessions/v1"
DATASETS_YAML = f"""
version: 1
datasets:
  - name: sessions
    versionLabel: v1
    partitioning:
      kind: time_window
      cron: hourly
      start: "2024-01-01T00:00:00Z"
      end: "2024-01-01T04:00:00Z"
      timezone: UTC
    source:
      uri: sessions.jsonl
      format: jsonl
    policies:
      requireConsent: true
      allowedJurisdictions: [US, CA]
      onViolation: omit
    backfillPolicy:
      kind: single_run
    rollout:
      throttle:
        partitionsPerMinute: 20
      soak:
        windowMinutes: 30
      {APPROVERS_YAML}
"""


def _write_source(path: Path, records: list[dict[str, Any]]) -> None:
    lines = [json.dumps(r, sort_keys=True, separators=(",", ":")) for r in records]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class World:
    config: DatasetsConfig
    dataset: DatasetConfig
    envs: RolloutEnvironments
    source: Path
    records: list[dict[str, Any]]

    def run(self, env: Environment, run_id: str, keys: list[str] | None = None) -> dict[str, Any]:
        loaded, plan, decisions = evaluate_keys(self.config, self.dataset, keys or KEYS, run_id)
        check_gates(loaded, decisions)
        return execute(env, loaded, plan, decisions)

    def change_source(self, hour: int, pages: int = 999) -> None:
        """Change one record the hour adds (its `pages`; the ids stay the same)."""
        records = [dict(r) for r in self.records]
        target = next(
            r
            for r in records
            if r["occurredAt"].startswith(f"2024-01-01T{hour:02d}")
            and r["consentGranted"]
            and r["jurisdiction"] in ("US", "CA")
        )
        target["pages"] = pages
        _write_source(self.source, records)

    def restore_source(self) -> None:
        _write_source(self.source, self.records)

    def stage_and_promote(self, name: str = "r1") -> None:
        staged = self.run(self.envs.staging, f"rollout-{name}-staging")
        store = self.envs.store
        store.create_rollout(
            name=name,
            dataset="sessions",
            version_label="v1",
            partition_keys=KEYS,
            throttle={"partitionsPerMinute": 20},
            soak_window_seconds=1800,
            actor="alice",
            now=T0,
        )
        record_staged(  # on the production chain, then the row (as the staging apply does)
            self.envs,
            name,
            decision_hash=staged["decisionHash"],
            plan_hash=staged["planHash"],
            staging_run_id=f"rollout-{name}-staging",
            staged_at=T0,
            soak_window_seconds=1800,
            by="alice",
        )
        promoted = self.run(self.envs.production, f"rollout-{name}-production")
        append_event(  # as `promote_rollout` records a complete promotion
            self.envs,
            store.require(name),
            ROLLOUT_PROMOTED,
            {"by": "carol", "decision_hash": promoted["decisionHash"], "complete": True},
        )
        store.set_status(name, "promoted", actor="carol", now=T0 + timedelta(hours=1))

    def stage_only(self, keys: list[str]) -> None:
        """Rollout `r1` over `keys` applied to staging and staged (soaking): neither approved nor
        promoted."""
        self.record_staging(self.apply_to_staging(keys))

    def apply_to_staging(self, keys: list[str]) -> dict[str, Any]:
        """Rollout `r1` over `keys` applied to staging, its row still `applying`; the execute document."""
        staged = self.run(self.envs.staging, "rollout-r1-staging")
        self.envs.store.create_rollout(
            name="r1",
            dataset="sessions",
            version_label="v1",
            partition_keys=keys,
            throttle={},
            soak_window_seconds=60,
            actor="alice",
            now=T0,
        )
        return staged

    def record_staging(self, staged: dict[str, Any]) -> None:
        """`r1`'s staging apply (`staged`) finished: staged (soaking)."""
        record_staged(
            self.envs,
            "r1",
            decision_hash=staged["decisionHash"],
            plan_hash=staged["planHash"],
            staging_run_id="rollout-r1-staging",
            staged_at=T0,
            soak_window_seconds=60,
        )

    def manifest_rel(self, key: str) -> str:
        return layout.manifest("sessions", "v1", key)

    def chain_events(self, env: Environment, event_type: str) -> list[dict[str, Any]]:
        return [e for e in env.audit.backup.read_chain(CHAIN) if e["event_type"] == event_type]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    yield from _world(tmp_path, monkeypatch, {})


def _world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Iterator[World]:
    """The world over a fresh home, its production settings resolved from `env`."""
    monkeypatch.delenv("PCBO_REPORTS_DIR", raising=False)
    records = [r for r in demo_sessions() if r["occurredAt"] < "2024-01-01T04"]
    source = tmp_path / "sessions.jsonl"
    _write_source(source, records)
    config = parse_datasets_config(DATASETS_YAML, base_dir=tmp_path)
    dataset = config.dataset("sessions")
    base = Settings.resolve(home=str(tmp_path / "home"), env=env)
    with open_environments(
        dataset_settings(config, dataset, base, environ={}), approval_policy(dataset.rollout)
    ) as envs:
        yield World(config, dataset, envs, source, records)


def _by_key(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["key"]: p for p in report["partitions"]}


def _plan_bytes(world: World) -> bytes:
    return (health_dir(world.envs, world.dataset) / PLAN_FILE).read_bytes()


# -- health -------------------------------------------------------------------------------------


def test_a_promoted_rollout_is_healthy_and_the_plan_is_empty(world: World) -> None:
    world.stage_and_promote()
    report = check_production_health(world.config, world.dataset, world.envs, T0)
    assert report["status"] == "healthy"
    assert [p["status"] for p in report["partitions"]] == ["healthy"] * 4
    assert all(p["rollout"] == "r1" for p in report["partitions"])
    assert report["counts"]["healthy"] == 4
    plan = json.loads(_plan_bytes(world))
    assert plan["partitions"] == [] and plan["kind"] == "pcbo.mini_backfill/1"
    assert plan["planId"] == plan_id(plan)
    directory = health_dir(world.envs, world.dataset)
    assert directory == world.envs.production.settings.home / "reports" / "health" / "sessions"
    written = json.loads((directory / "health_report.json").read_text())
    assert written["status"] == "healthy" and written["checkedAt"] == "2024-02-01T12:00:00Z"
    assert "| 20240101T000000Z | healthy |" in (directory / "health_report.md").read_text()


def test_a_removed_production_partition_is_missing_and_the_plan_is_byte_stable(world: World) -> None:
    world.stage_and_promote()
    world.envs.production.lake.delete(world.manifest_rel(KEYS[1]))

    first = check_production_health(world.config, world.dataset, world.envs, T0)
    statuses = {k: p["status"] for k, p in _by_key(first).items()}
    assert statuses == {KEYS[0]: "healthy", KEYS[1]: "missing", KEYS[2]: "healthy", KEYS[3]: "healthy"}
    plan = first["plan"]
    assert [p["key"] for p in plan["partitions"]] == [KEYS[1]]
    entry = plan["partitions"][0]
    assert entry["reasons"] == ["missing"] and entry["rollout"] == "r1"
    r1 = world.envs.store.get("r1")
    assert r1 is not None
    assert entry["decisionHash"] == r1["decision_hash"]
    first_bytes = _plan_bytes(world)
    assert json.loads(first_bytes) == plan

    # again, later: the plan file is byte-identical (no time in it), the report carries the new time
    second = check_production_health(world.config, world.dataset, world.envs, T0 + timedelta(days=1))
    assert _plan_bytes(world) == first_bytes
    assert second["plan"]["planId"] == plan["planId"]
    assert second["checkedAt"] != first["checkedAt"]


def test_a_partition_rolled_back_by_the_engine_is_missing(world: World) -> None:
    world.stage_and_promote()
    rollback(world.envs.production, "sessions", "v1", partition_key=KEYS[3], reason="test")
    report = check_production_health(world.config, world.dataset, world.envs, T0)
    assert [p["key"] for p in report["plan"]["partitions"]] == [KEYS[3]]
    assert _by_key(report)[KEYS[3]]["status"] == "missing"


def test_a_tampered_production_file_is_failed(world: World) -> None:
    world.stage_and_promote()
    lake = world.envs.production.lake
    manifest = manifests.decode(lake.read(world.manifest_rel(KEYS[2])))
    data_rel = manifest["files"][0]["path"]
    blob = bytearray(lake.read(data_rel))
    blob[len(blob) // 2] ^= 0xFF
    lake.write(data_rel, bytes(blob))

    report = check_production_health(world.config, world.dataset, world.envs, T0)
    failed = _by_key(report)[KEYS[2]]
    assert failed["status"] == "failed" and failed["reasons"] == ["failed"]
    assert "file_checksum_mismatch" in {f["kind"] for f in failed["findings"]}
    assert [(p["key"], p["reasons"]) for p in report["plan"]["partitions"]] == [(KEYS[2], ["failed"])]


def test_a_forged_production_commit_point_is_failed_though_lake_and_catalog_agree(world: World) -> None:
    """The red-team attack: production's K2 commit point replaced by a version the production chain
    never committed (here the staging one, whose files and rows agree with it). The health check reads
    the chain: failed, `commit_point_not_on_chain`, planned for repair."""
    world.stage_and_promote()
    production, staging = world.envs.production.lake, world.envs.staging.lake
    forged = manifests.decode(production.read(world.manifest_rel(KEYS[2])))
    forged["runId"] = "forged-run"
    production.write(world.manifest_rel(KEYS[2]), manifests.encode(forged))
    assert staging is not production
    report = check_production_health(world.config, world.dataset, world.envs, T0)
    failed = _by_key(report)[KEYS[2]]
    assert failed["status"] == "failed", failed
    assert "commit_point_not_on_chain" in {f["kind"] for f in failed["findings"]}
    assert [p["key"] for p in report["plan"]["partitions"]] == [KEYS[2]]


def test_a_rollout_row_edited_to_promoted_is_not_checked_as_promoted(world: World) -> None:
    """A rollout staged but never approved or promoted on the chain, its `rollouts` row edited to
    `promoted`: the health check does not take it for promoted (nothing of it is checked or planned);
    a genuinely promoted rollout whose row is edited to `cancelled` is still checked."""
    world.stage_only(KEYS[:2])
    world.envs.store.set_status("r1", "promoted", actor="mallory", now=T0)
    assert check_production_health(world.config, world.dataset, world.envs, T0)["partitions"] == []


def test_a_promoted_rollouts_row_edited_to_cancelled_is_still_checked(world: World) -> None:
    world.stage_and_promote()
    world.envs.production.lake.delete(world.manifest_rel(KEYS[1]))
    world.envs.store.set_status("r1", "cancelled", actor="mallory", now=T0 + timedelta(hours=2))
    report = check_production_health(world.config, world.dataset, world.envs, T0)
    assert _by_key(report)[KEYS[1]]["status"] == "missing"
    assert [p["key"] for p in report["plan"]["partitions"]] == [KEYS[1]]


def test_a_post_write_check_discrepancy_after_the_commit_is_failed(world: World) -> None:
    world.stage_and_promote()
    world.envs.production.catalog.record_discrepancy(
        run_id="rollout-r1-production-2",
        dataset="sessions",
        version_label="v1",
        partition_key=KEYS[0],
        kind="post_write_check",
        detail={"status": "failed", "findings": ["rows written (3) differ from the decided adds (4)"]},
    )
    report = check_production_health(world.config, world.dataset, world.envs, T0)
    bad = _by_key(report)[KEYS[0]]
    assert bad["status"] == "failed"
    assert bad["findings"][0]["kind"] == "post_write_check_failed"
    assert [p["key"] for p in report["plan"]["partitions"]] == [KEYS[0]]


def test_a_changed_source_makes_the_rollout_stale(world: World) -> None:
    world.stage_and_promote()
    world.change_source(hour=2)
    report = check_production_health(world.config, world.dataset, world.envs, T0)
    # the decision hash covers the rollout's whole range: every key of it is stale
    assert {p["status"] for p in report["partitions"]} == {"stale"}
    now_hash = evaluate_keys(world.config, world.dataset, KEYS, "x")[2].decision_hash
    assert report["rollouts"][0]["decisionHash"] == now_hash
    assert [p["decisionHash"] for p in report["plan"]["partitions"]] == [now_hash] * 4
    assert [p["reasons"] for p in report["plan"]["partitions"]] == [["stale"]] * 4


def test_production_differing_from_staging_is_drifted(world: World) -> None:
    world.stage_and_promote()
    world.change_source(hour=1)
    # staging hour 1 gets other content (another request: another run id, as a run id repeats only its
    # own request)
    world.run(world.envs.staging, "staging-other-content")
    world.restore_source()  # production is not stale: the source evaluates as approved again
    report = check_production_health(world.config, world.dataset, world.envs, T0)
    drifted = _by_key(report)[KEYS[1]]
    assert drifted["status"] == "drifted" and drifted["reasons"] == ["drifted"]
    assert any("fileChecksums" in f["detail"] for f in drifted["findings"])
    assert [p["key"] for p in report["plan"]["partitions"]] == [KEYS[1]]


def test_only_given_keys_are_checked(world: World) -> None:
    world.stage_and_promote()
    world.envs.production.lake.delete(world.manifest_rel(KEYS[1]))
    report = check_production_health(world.config, world.dataset, world.envs, T0, keys=[KEYS[2], KEYS[0]])
    assert [p["key"] for p in report["partitions"]] == [KEYS[0], KEYS[2]]
    assert report["status"] == "healthy"


def test_approved_rollouts_are_checked_and_rejected_ones_are_not(world: World) -> None:
    world.stage_only(KEYS[:2])
    assert check_production_health(world.config, world.dataset, world.envs, T0)["partitions"] == []
    # Decisions through the approval gate (on the production chain); a bare approval row would count
    # for nothing.
    rollout = world.envs.store.require("r1")
    approval = sign_decision(CY, rollout, "approve", "ok", None, "2024-02-01T12:00:00Z")
    record_decision(world.envs, "r1", approval, clock=ManualClock(T0))
    report = check_production_health(world.config, world.dataset, world.envs, T0)
    assert [(p["key"], p["status"]) for p in report["partitions"]] == [
        (KEYS[0], "missing"),
        (KEYS[1], "missing"),
    ]
    rejection = sign_decision(CY, rollout, "reject", "not yet", None, "2024-02-01T12:00:01Z")
    record_decision(world.envs, "r1", rejection, clock=ManualClock(T0))
    assert check_production_health(world.config, world.dataset, world.envs, T0)["partitions"] == []


def test_run_health_check_launches_the_plan_and_records_it(world: World) -> None:
    world.stage_and_promote()
    calls: list[dict[str, Any]] = []

    def launch(plan: dict[str, Any]) -> dict[str, Any]:
        calls.append(plan)
        done = world.run(world.envs.production, "rollout-r1-production-health-1")
        return {"runId": done["runId"], "status": done["status"]}

    healthy = run_health_check(world.config, world.dataset, world.envs, T0, launch=launch)
    assert calls == [] and healthy["launch"] is None  # nothing to do: not called

    world.envs.production.lake.delete(world.manifest_rel(KEYS[1]))
    report = run_health_check(world.config, world.dataset, world.envs, T0, launch=launch)
    assert len(calls) == 1 and calls[0] == report["plan"]
    assert [p["key"] for p in calls[0]["partitions"]] == [KEYS[1]]
    assert report["launch"]["status"] == "launched"
    assert report["launch"]["result"] == {"runId": "rollout-r1-production-health-1", "status": "committed"}
    written = json.loads((health_dir(world.envs, world.dataset) / "health_report.json").read_text())
    assert written["launch"] == report["launch"]
    logged = [e for e in world.envs.store.history("r1") if e["kind"] == "health_backfill_launched"]
    assert len(logged) == 1
    assert logged[0]["detail"]["planId"] == report["plan"]["planId"]
    assert logged[0]["detail"]["keys"] == [KEYS[1]]

    # the launched re-run repaired production
    after = check_production_health(world.config, world.dataset, world.envs, T0)
    assert after["status"] == "healthy"
    assert verify(world.envs.production)["findings"] == []


def test_a_launch_that_skipped_every_rollout_says_skipped(world: World) -> None:
    """An approved rollout not yet promoted has its partitions `missing`, and the mini backfill (what
    `pcbo rollout health --launch` runs) writes none of them, skipping the rollout: the report said
    `launched`, as if production were being repaired. It says `skipped`, the results saying why."""
    from pcbo_dagster.rollout.operations import mini_backfill

    world.stage_only(KEYS[:2])
    rollout = world.envs.store.require("r1")
    approval = sign_decision(CY, rollout, "approve", "ok", None, "2024-02-01T12:00:00Z")
    record_decision(world.envs, "r1", approval, clock=ManualClock(T0))

    def launch(plan: dict[str, Any]) -> dict[str, Any]:
        return mini_backfill(world.config, world.dataset, world.envs, plan)

    report = run_health_check(world.config, world.dataset, world.envs, T0, launch=launch)
    assert [p["status"] for p in report["partitions"]] == ["missing", "missing"]
    assert report["launch"]["status"] == "skipped", report["launch"]
    assert [r["status"] for r in report["launch"]["result"]["results"]] == ["skipped"]
    assert world.envs.production.lake.find("_manifest.json") == []  # nothing written


# -- rollback -----------------------------------------------------------------------------------


def _rollback(world: World, stage: str, **kwargs: Any) -> dict[str, Any]:
    return rollback_rollout(
        world.config, world.dataset, world.envs, stage, actor="bob", reason="bad data", now=T0, **kwargs
    )


def test_rollout_rollback_in_production_then_staging(world: World) -> None:
    world.stage_and_promote()
    store = world.envs.store
    prod, staging = world.envs.production, world.envs.staging

    first = _rollback(world, "production", rollout="r1")
    assert first["status"] == "rolled_back" and first["rolledBack"] == 4
    assert [p["status"] for p in first["partitions"]] == ["rolled_back"] * 4
    assert all(p["current"] is None for p in first["partitions"])
    assert first["rollbackId"].startswith("sha256:")
    r1 = store.get("r1")
    assert r1 is not None
    assert r1["status"] == "rolled_back"
    assert verify(prod)["findings"] == []
    undone = world.chain_events(prod, "partition_rolled_back")
    assert sorted(e["partition"]["key"] for e in undone) == KEYS
    assert {e["reason"] for e in undone} == {"bad data"}
    assert {e["run_id"] for e in undone} == {"rollout-r1-production"}
    assert staging.lake.exists(world.manifest_rel(KEYS[0]))  # staging untouched so far

    history = store.history("r1")
    entries = [e for e in history if e["kind"] == "rolled_back"]
    assert len(entries) == 1 and entries[0]["actor"] == "bob"
    assert entries[0]["detail"]["stage"] == "production" and entries[0]["detail"]["reason"] == "bad data"
    assert entries[0]["detail"]["statusWas"] == "promoted"
    assert [r["key"] for r in entries[0]["detail"]["results"]] == KEYS

    again = _rollback(world, "production", rollout="r1")
    assert again["status"] == "noop" and again["rolledBack"] == 0
    assert len(store.history("r1")) == len(history)
    assert len(world.chain_events(prod, "partition_rolled_back")) == 4

    in_staging = _rollback(world, "staging", rollout="r1")
    assert in_staging["rolledBack"] == 4
    assert verify(staging)["findings"] == [] and verify(prod)["findings"] == []
    assert len(world.chain_events(staging, "partition_rolled_back")) == 4
    assert {e["run_id"] for e in world.chain_events(staging, "partition_rolled_back")} == {
        "rollout-r1-staging"
    }
    r1 = store.get("r1")
    assert r1 is not None
    assert r1["status"] == "rolled_back"
    assert _rollback(world, "staging", rollout="r1")["status"] == "noop"
    assert len([e for e in store.history("r1") if e["kind"] == "rolled_back"]) == 2

    # nothing promoted any more: the health check has nothing to look at
    assert check_production_health(world.config, world.dataset, world.envs, T0)["partitions"] == []


def test_staging_rollback_of_a_rollout_never_promoted_marks_it_rolled_back(world: World) -> None:
    staged = world.apply_to_staging(KEYS)
    store = world.envs.store
    with pytest.raises(InvalidInput) as refused:  # the apply is still running: cancel it first
        _rollback(world, "staging", rollout="r1")
    assert refused.value.field == "rollout"
    world.record_staging(staged)
    done = _rollback(world, "staging", rollout="r1")
    assert done["rolledBack"] == 4 and done["rolloutStatus"] == "rolled_back"
    r1 = store.get("r1")
    assert r1 is not None
    assert r1["status"] == "rolled_back"
    assert verify(world.envs.staging)["findings"] == []


def test_staging_rollback_of_a_promoted_rollout_keeps_it_promoted(world: World) -> None:
    world.stage_and_promote()
    done = _rollback(world, "staging", rollout="r1")
    assert done["rolledBack"] == 4
    r1 = world.envs.store.get("r1")
    assert r1 is not None
    assert r1["status"] == "promoted"
    assert world.envs.store.history("r1")[-1]["kind"] == "rolled_back"


def test_rollout_rollback_undoes_its_stacked_versions_and_skips_other_runs(world: World) -> None:
    world.stage_and_promote()
    prod = world.envs.production
    world.change_source(hour=0)
    rerun = world.run(prod, "rollout-r1-production-2")  # the rollout re-promoted: hour 0 at v2
    assert [p["status"] for p in rerun["partitions"]] == ["committed", "unchanged", "unchanged", "unchanged"]
    world.change_source(hour=1)
    world.run(prod, "manual-fix", keys=[KEYS[1]])  # someone else's version of hour 1

    done = _rollback(world, "production", rollout="r1")
    by_key = {p["key"]: p for p in done["partitions"]}
    assert [u["version"] for u in by_key[KEYS[0]]["undone"]] == [2, 1]
    assert by_key[KEYS[0]]["current"] is None
    assert by_key[KEYS[1]]["status"] == "skipped" and by_key[KEYS[1]]["current"]["runId"] == "manual-fix"
    assert by_key[KEYS[2]]["status"] == by_key[KEYS[3]]["status"] == "rolled_back"
    assert done["rolledBack"] == 4
    r1 = world.envs.store.get("r1")
    assert r1 is not None
    assert r1["status"] == "rolled_back"
    assert verify(prod)["findings"] == []
    assert _rollback(world, "production", rollout="r1")["status"] == "noop"


def test_range_rollback_is_idempotent(world: World) -> None:
    world.stage_and_promote()
    store, prod = world.envs.store, world.envs.production
    world.change_source(hour=0)
    world.run(prod, "rollout-r1-production-2")  # hour 0 now at v2 (v1 restorable)

    first = _rollback(world, "production", keys=[KEYS[1], KEYS[0], KEYS[0]])
    assert first["keys"] == [KEYS[0], KEYS[1]]
    assert first["status"] == "rolled_back" and first["rolledBack"] == 2
    by_key = {p["key"]: p for p in first["partitions"]}
    assert by_key[KEYS[0]]["undone"][0]["version"] == 2 and by_key[KEYS[0]]["current"]["version"] == 1
    assert by_key[KEYS[1]]["current"] is None
    assert verify(prod)["findings"] == []
    events = len(world.chain_events(prod, "partition_rolled_back"))
    assert events == 2
    range_log = store.history(range_log_name("sessions", "v1"))
    assert [e["detail"]["rollbackId"] for e in range_log] == [first["rollbackId"]]
    assert store.history("r1")[-1]["detail"]["rollbackId"] == first["rollbackId"]
    r1 = store.get("r1")
    assert r1 is not None
    assert r1["status"] == "promoted"  # production still holds hours 0 (v1), 2 and 3

    # the same request again: a no-op, although hour 0 still has a version to peel off
    again = _rollback(world, "production", keys=[KEYS[0], KEYS[1]])
    assert again["status"] == "noop" and again["repeatOf"] == first["rollbackId"]
    assert again["rollbackId"] == first["rollbackId"]
    assert len(world.chain_events(prod, "partition_rolled_back")) == events
    assert len(store.history(range_log_name("sessions", "v1"))) == 1

    # a different request rolls back what is current now; then the rollout is gone from production
    rest = _rollback(world, "production", keys=KEYS)
    assert rest["rolledBack"] == 3 and rest["rollbackId"] != first["rollbackId"]
    assert {p["key"]: p["status"] for p in rest["partitions"]}[KEYS[1]] == "noop"
    assert rest["rolloutStatuses"] == {"r1": "rolled_back"}
    r1 = store.get("r1")
    assert r1 is not None
    assert r1["status"] == "rolled_back"
    assert verify(prod)["findings"] == []
    assert _rollback(world, "production", keys=KEYS)["status"] == "noop"
    assert len(world.chain_events(prod, "partition_rolled_back")) == 5


def test_range_rollback_in_staging(world: World) -> None:
    world.stage_and_promote()
    done = _rollback(world, "staging", keys=[KEYS[2]])
    assert done["rolledBack"] == 1
    assert not world.envs.staging.lake.exists(world.manifest_rel(KEYS[2]))
    assert world.envs.production.lake.exists(world.manifest_rel(KEYS[2]))
    assert verify(world.envs.staging)["findings"] == []
    assert [
        e["partition"]["key"] for e in world.chain_events(world.envs.staging, "partition_rolled_back")
    ] == [KEYS[2]]
    assert _rollback(world, "staging", keys=[KEYS[2]])["status"] == "noop"


def test_bad_rollback_requests(world: World) -> None:
    world.stage_and_promote()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"stage": "qa", "rollout": "r1"}, "stage"),
        ({"stage": "production"}, "rollout"),
        ({"stage": "production", "rollout": "r1", "keys": KEYS}, "rollout"),
        ({"stage": "production", "rollout": "nope"}, "rollout"),
        ({"stage": "production", "keys": ["20990101T000000Z"]}, "keys"),
        ({"stage": "production", "keys": []}, "keys"),
    ]
    for kwargs, field in cases:
        stage = kwargs.pop("stage")
        with pytest.raises(InvalidInput) as caught:
            _rollback(world, stage, **kwargs)
        assert caught.value.field == field
    with pytest.raises(InvalidInput) as caught:
        rollback_rollout(
            world.config, world.dataset, world.envs, "production", rollout="r1", actor="", reason="x", now=T0
        )
    assert caught.value.field == "by"  # the flag and the rollback job config call it by
    assert verify(world.envs.production)["findings"] == []
    assert world.chain_events(world.envs.production, "partition_rolled_back") == []


def test_run_owner_prefers_the_longest_rollout_name() -> None:
    names = ["a", "a-production"]
    assert run_owner("rollout-a-production", "production", names) == "a"
    assert run_owner("rollout-a-production-2", "production", names) == "a"
    assert run_owner("rollout-a-production-production", "production", names) == "a-production"
    assert run_owner("rollout-a-staging", "staging", names) == "a"
    assert run_owner("rollout-a-staging-2", "staging", names) is None
    assert run_owner("manual", "production", names) is None


def test_an_event_the_operators_key_did_not_sign_leaves_no_partition_healthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PCBO_SIGNING_KEY, an event appended to the production chain without the key (backup and
    catalog alike, every hash right): runs, `verify` and the `audit_chain` check refuse the chain, but
    the health check read its hashes alone and called every partition healthy (the repairs sensor
    and the UI's production health trusted it). Now it reads the chain as `audit_chain` does."""
    from pcbo_dagster.core.signed_note import signing_key_from_seed
    from pcbo_dagster_tests.approver_keys import key_file

    operator = signing_key_from_seed("ops.example/operator", bytes([36]) * 32)
    signed = {"PCBO_SIGNING_KEY": str(key_file(tmp_path, operator))}
    for world in _world(tmp_path, monkeypatch, signed):
        world.stage_and_promote()
        env = Environment.open(Settings.resolve(home=str(tmp_path / "home"), env={}))
        try:  # (no key: what someone without it appends)
            env.audit.append("sessions/v1", "partition_commit_intent", {"partitions": [], "run_id": "forged"})
        finally:
            env.close()
        report = check_production_health(world.config, world.dataset, world.envs, T0)
        assert report["status"] != "healthy"
        assert not any(p["status"] == "healthy" for p in report["partitions"]), report["partitions"]

"""One whole staged rollout through the Dagster code location, on a controlled clock.

The definitions are built with a `ManualClock`: the throttle's waits and the soak window are
measured on it (its `sleep` advances it), so a 30-minute soak and a 2-partitions-a-minute throttle
take no real time. Jobs run in-process on a real (temporary) Dagster instance; the sensor is ticked
with `build_sensor_context`. Steps: staging apply under the throttle -> soak evaluations (not yet
passed) -> a rejection that blocks promotion -> a stale approval after the source changed -> soak
passed and an approval that promotes -> a production health check that finds a deliberately removed
partition and plans exactly it, then repairs it -> rollbacks in production and staging that leave
`pcbo verify` clean on both.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

dg = pytest.importorskip("dagster")

from pcbo_dagster.catalog.rollouts import RolloutStore  # noqa: E402
from pcbo_dagster.dagster_defs.definitions import build_definitions  # noqa: E402
from pcbo_dagster.dagster_defs.resources import PcboEngineResource  # noqa: E402
from pcbo_dagster.datasets.config import parse_datasets_config  # noqa: E402
from pcbo_dagster.engine.environment import Environment  # noqa: E402
from pcbo_dagster.engine.rollback import rollback  # noqa: E402
from pcbo_dagster.engine.settings import Settings  # noqa: E402
from pcbo_dagster.engine.verify import verify  # noqa: E402
from pcbo_dagster.rollout.approvals import sign_decision  # noqa: E402
from pcbo_dagster.rollout.clock import ManualClock  # noqa: E402
from pcbo_dagster.rollout.environments import staging_settings  # noqa: E402
from pcbo_dagster_tests.approver_keys import APPROVERS_YAML, BO, CY  # noqa: E402
from pcbo_dagster_tests.cli_runner import run_pcbo_in_process  # noqa: E402

KEYS = ["20240101T000000Z", "20240101T010000Z", "20240101T020000Z", "20240101T030000Z"]
T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)

CONFIG = """
version: 1
datasets:
  - name: sessions
    partitioning:
      {kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-01T04:00:00Z"}
    source: {uri: sessions.jsonl, format: jsonl}
    policies: {requireConsent: true, allowedJurisdictions: [US, CA], onViolation: omit}
    rollout:
      throttle: {partitionsPerMinute: 2}
      soak: {windowMinutes: 30}
      businessMetric: {name: conversion_rate, expression: mean(converted), atLeast: 0.5}
      @APPROVERS@
""".replace("@APPROVERS@", APPROVERS_YAML)


def _now_text(clock: ManualClock) -> str:
    """The controlled clock's now, as a statement's signed time (after the rollout was staged)."""
    return clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")


def _sessions() -> list[dict[str, Any]]:
    records = []
    for hour in range(4):
        for n in range(6):
            i = hour * 6 + n
            records.append(
                {
                    "id": f"ses-{i:04d}",
                    "occurredAt": f"2024-01-01T{hour:02d}:{n * 7:02d}:00Z",
                    "jurisdiction": "DE" if i % 11 == 5 else "US",
                    "consentGranted": i % 9 != 4,
                    "converted": i % 4 != 0,
                }
            )
    return records


def _write_source(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


class Rollout:
    """The deployment under test: definitions, an instance, the clock and where things are."""

    def __init__(self, tmp_path: Path, instance: Any, config: str = CONFIG) -> None:
        self.root = tmp_path
        self.source = tmp_path / "sessions.jsonl"
        _write_source(self.source, _sessions())
        self.config = parse_datasets_config(config, base_dir=tmp_path)
        self.home = tmp_path / "home"
        self.clock = ManualClock(T0)
        self.resource = PcboEngineResource(home=str(self.home))
        self.defs = build_definitions(self.config, self.resource, clock=self.clock)
        self.instance = instance
        self.settings = Settings.resolve(home=str(self.home), env={})

    def run_job(self, name: str, run_config: dict | None = None, tags: dict | None = None) -> Any:
        job = self.defs.resolve_job_def(name)
        return job.execute_in_process(
            run_config=run_config or {}, instance=self.instance, tags=tags or {}, raise_on_error=False
        )

    def op_job(self, name: str, op: str, config: dict[str, Any]) -> Any:
        return self.run_job(name, {"ops": {op: {"config": config}}})

    def tick(self, name: str = "rollout_promotion") -> Any:
        sensor = self.defs.resolve_sensor_def(name)
        with dg.build_sensor_context(instance=self.instance, resources={"pcbo": self.resource}) as context:
            return sensor(context)

    def store_view(self) -> tuple[RolloutStore, Environment]:
        env = Environment.open(self.settings)
        return RolloutStore(env.catalog), env


@pytest.fixture
def deployment(tmp_path: Path) -> Any:
    with dg.instance_for_test() as instance:
        yield Rollout(tmp_path, instance)


def _skip_text(result: Any) -> str:
    assert isinstance(result, dg.SkipReason), result
    return result.skip_message or ""


def test_a_whole_rollout(deployment: Rollout) -> None:
    d = deployment
    # 1. Staging apply under the throttle (2 partitions a minute: 30 s between partition starts).
    job = d.defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=d.instance,
        asset_selection=[dg.AssetKey(["staging", "sessions"])],
        tags={"dagster/asset_partition_range_start": KEYS[0], "dagster/asset_partition_range_end": KEYS[-1]},
        run_config={"ops": {"staging__sessions": {"config": {"rollout": "r1", "by": "ana"}}}},
    )
    assert result.success
    assert d.clock.slept and sum(d.clock.slept) == pytest.approx(90.0)  # three waits of 30 s
    store, env = d.store_view()
    rollout = store.require("r1")
    assert rollout["status"] == "soaking" and rollout["staged_at"] == d.clock.now()
    materializations = [e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    assert len(materializations) == 4
    metadata = materializations[0].step_materialization_data.materialization.metadata
    assert metadata["throttle"].value == "2 partitions/min"
    summary = json.loads((d.home / "reports" / "rollouts" / "r1" / "backfill_summary.json").read_text())
    assert [p["key"] for p in summary["partitions"]] == KEYS
    assert summary["decisionHash"] == rollout["decision_hash"]
    assert summary["totals"]["omittedByReason"]["CONSENT_MISSING"] > 0
    assert (
        (d.home / "reports" / "rollouts" / "r1" / "backfill_summary.md")
        .read_text()
        .startswith("# Backfill summary")
    )
    # Nothing in production yet.
    assert not list((d.home / "lake").rglob("_manifest.json"))
    assert len(list((d.home / "staging" / "lake").rglob("_manifest.json"))) == 4

    # 2. Soak: ten minutes in, the evaluation passes but the window has not elapsed.
    d.clock.advance(600)
    assert d.run_job("soak_monitor").success
    text = _skip_text(d.tick())
    assert "soak soaking" in text and "no signed approval yet" in text

    # 3. A rejection blocks promotion, with who and why in the tick.
    rejected = d.op_job(
        "rollout_approval",
        "rollout_approval_op",
        {
            "rollout": "r1",
            # signed with bo's key (as `pcbo reject --key` signs it), pasted into the launchpad
            "statement": sign_decision(
                BO, rollout, "reject", "wait for the finance sign-off", None, _now_text(d.clock)
            ),
        },
    )
    assert rejected.success
    d.clock.advance(1500)  # the 30-minute window is over
    assert d.run_job("soak_monitor").success
    text = _skip_text(d.tick())
    assert f"rejected by {BO.name}: wait for the finance sign-off" in text
    assert "soak" not in text.split("r1:", 1)[1].split("rejected")[0]  # the soak passed

    # 4. An approval of decisions that no longer hold (the source changed) is stale.
    approved = d.op_job(
        "rollout_approval",
        "rollout_approval_op",
        {
            "rollout": "r1",
            "statement": sign_decision(CY, rollout, "approve", "numbers reviewed", None, _now_text(d.clock)),
        },
    )
    assert approved.success
    original = d.source.read_bytes()
    _write_source(
        d.source,
        [
            *_sessions(),
            {
                "id": "ses-late",
                "occurredAt": "2024-01-01T01:30:00Z",
                "jurisdiction": "US",
                "consentGranted": True,
                "converted": True,
            },
        ],
    )
    assert "stale approval" in _skip_text(d.tick())
    d.source.write_bytes(original)

    # 5. Soak passed, approval matches: the sensor promotes.
    tick = d.tick()
    assert isinstance(tick, dg.SensorResult) and len(tick.run_requests) == 1
    request = tick.run_requests[0]
    assert request.tags["pcbo/rollout"] == "r1" and request.tags["pcbo/approved_by"] == CY.name
    promoted = d.run_job(request.job_name, tags=request.tags)
    assert promoted.success
    assert store.require("r1")["status"] == "promoted"
    assert len(list((d.home / "lake").rglob("_manifest.json"))) == 4
    # Production parquet is byte-identical to staging's (one decision engine, deterministic files).
    staging_files = {p.name: p.read_bytes() for p in (d.home / "staging" / "lake").rglob("*.parquet")}
    production_files = {p.name: p.read_bytes() for p in (d.home / "lake").rglob("*.parquet")}
    assert staging_files == production_files and len(production_files) == 4
    # The production audit chain records who rejected, who approved and who promoted what.
    chain = env.audit.backup.read_chain("sessions/v1")
    lifecycle = [e for e in chain if e["event_type"].startswith("rollout_")]
    assert lifecycle[0]["event_type"] == "rollout_staged"  # what the gate reads, with the soak's verdicts
    assert lifecycle[0]["decision_hash"] == rollout["decision_hash"]
    soaked = [e for e in lifecycle if e["event_type"] == "rollout_soak_evaluated"]
    assert len(soaked) == len(store.soak_evaluations("r1")) and all(e["passed"] for e in soaked)
    decisions = [
        (e["event_type"], e.get("by"), e.get("decision_hash"))
        for e in lifecycle
        if e["event_type"] not in ("rollout_staged", "rollout_soak_evaluated")
    ]
    assert decisions == [
        ("rollout_rejected", BO.name, rollout["decision_hash"]),
        ("rollout_approved", CY.name, rollout["decision_hash"]),
        ("rollout_promoted", "sensor rollout_promotion", rollout["decision_hash"]),
    ]
    assert store.history("r1")[-1]["actor"] == "sensor rollout_promotion"
    assert _skip_text(d.tick()) == "no rollout is halted for review"

    # 6. Production health: a deliberately removed partition is found and planned, exactly it.
    removed = rollback(env, "sessions", "v1", partition_key=KEYS[2], reason="test: remove a partition")
    assert removed["rolledBack"] == 1
    health = d.op_job("production_health_check", "production_health_check_op", {"dataset": "sessions"})
    assert health.success
    plan = json.loads((d.home / "reports" / "health" / "sessions" / "mini_backfill_plan.json").read_text())
    assert [p["key"] for p in plan["partitions"]] == [KEYS[2]]
    assert plan["partitions"][0]["reasons"] == ["missing"]
    repaired = d.op_job(
        "production_health_check", "production_health_check_op", {"dataset": "sessions", "launch": True}
    )
    assert repaired.success
    # The repair is launched as a run of the affected partition (by the repairs sensor), so it gets a
    # materialization and checks; nothing was written by the health check itself.
    assert len(list((d.home / "lake").rglob("_manifest.json"))) == 3
    [repair] = d.tick("production_health_repairs").run_requests
    assert repair.job_name == "promote_sessions"
    assert repair.tags["dagster/asset_partition_range_start"] == KEYS[2]
    assert repair.tags["dagster/asset_partition_range_end"] == KEYS[2]
    run = d.run_job(repair.job_name, tags=repair.tags)
    assert run.success
    assert [m.partition for m in run.asset_materializations_for_node("production__sessions")] == [KEYS[2]]
    assert {e.partition for e in run.get_asset_check_evaluations() if e.partition} == {KEYS[2]}
    assert len(list((d.home / "lake").rglob("_manifest.json"))) == 4
    assert verify(env)["findings"] == []
    # The same plan is not launched twice (its run key), and a healthy check requests nothing.
    assert d.tick("production_health_repairs").run_requests[0].run_key == repair.run_key
    assert d.op_job("production_health_check", "production_health_check_op", {"launch": True}).success
    assert isinstance(d.tick("production_health_repairs"), dg.SkipReason)

    # 7. Roll back the rollout in production, then staging: `pcbo verify` is clean on both.
    for stage in ("production", "staging"):
        rolled = d.op_job(
            "rollout_rollback",
            "rollout_rollback_op",
            {"stage": stage, "rollout": "r1", "by": "dee", "reason": "test teardown"},
        )
        assert rolled.success
    assert not list((d.home / "lake").rglob("_manifest.json"))
    assert not list((d.home / "staging" / "lake").rglob("_manifest.json"))
    again = d.op_job(
        "rollout_rollback",
        "rollout_rollback_op",
        {"stage": "production", "rollout": "r1", "by": "dee", "reason": "twice"},
    )
    assert again.success  # idempotent
    env.close()
    staging_home = staging_settings(d.settings, environ={}).home
    for home in (d.home, staging_home):
        verified = run_pcbo_in_process(["verify"], home=home)  # `pcbo verify`, in this process
        assert verified.status == 0, verified.stderr
        assert verified.document["findings"] == []


def test_a_production_run_tagged_with_another_dataset_s_rollout_is_refused(tmp_path: Path) -> None:
    """`pcbo/rollout` is a launch tag anyone launching a run can type: a production run of one dataset
    naming another dataset's rollout is refused naming the tag, and nothing is promoted (it would have
    promoted the other dataset's rollout and recorded the materializations on this one)."""
    second = CONFIG.split("datasets:\n", 1)[1].replace("name: sessions", "name: visits")
    with dg.instance_for_test() as instance:
        d = Rollout(tmp_path, instance, CONFIG + second)
        staged = d.defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=d.instance,
            asset_selection=[dg.AssetKey(["staging", "sessions"])],
            tags={
                "dagster/asset_partition_range_start": KEYS[0],
                "dagster/asset_partition_range_end": KEYS[-1],
            },
            run_config={"ops": {"staging__sessions": {"config": {"rollout": "r1", "by": "ana"}}}},
        )
        assert staged.success
        run = d.defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=d.instance,
            asset_selection=[dg.AssetKey(["production", "visits"])],
            tags={
                "pcbo/rollout": "r1",
                "dagster/asset_partition_range_start": KEYS[0],
                "dagster/asset_partition_range_end": KEYS[-1],
            },
            raise_on_error=False,
        )
        assert not run.success
        failure = next(e for e in run.all_events if e.event_type_value == "STEP_FAILURE")
        error = str(failure.step_failure_data.error)
        assert "pcbo/rollout" in error and "is not a rollout of visits" in error, error
        assert not list((d.home / "lake").rglob("_manifest.json"))
        store, _env = d.store_view()
        assert store.require("r1")["status"] == "soaking"

"""The staging apply's throttle and gates, and the approval records, through `rollout/operations.py`
on a controlled clock (no Dagster, no sleeping)."""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from pcbo_dagster.audit.backup import AuditBackup
from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.catalog.rollouts import RolloutStore
from pcbo_dagster.core.audit_chain import verify_chain
from pcbo_dagster.core.errors import Blocked, InvalidInput
from pcbo_dagster.datasets.config import DatasetsConfig, parse_datasets_config
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.rollout import operations
from pcbo_dagster.rollout.clock import ManualClock
from pcbo_dagster.rollout.throttle import Throttle
from pcbo_dagster_tests.approver_keys import APPROVERS_YAML, BO, CY
from pcbo_dagster_tests.cli_runner import backup_events, lake_files, run_pcbo_in_process

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
KEYS = ["20240101T000000Z", "20240101T010000Z", "20240101T020000Z"]


def _config(
    tmp_path: Path, on_violation: str = "omit", throttle: str = "{recordsPerMinute: 60}"
) -> DatasetsConfig:
    records = [
        {
            "id": f"r-{h}-{n}",
            "occurredAt": f"2024-01-01T{h:02d}:{n:02d}:00Z",
            "jurisdiction": "US",
            "consentGranted": not (h == 1 and n == 0),
        }
        for h in range(3)
        for n in range(h + 2)  # 2, 3 and 4 records
    ]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = f"""
datasets:
  - name: sessions
    partitioning:
      {{kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-01T03:00:00Z"}}
    source: {{uri: s.jsonl}}
    policies: {{requireConsent: true, onViolation: {on_violation}}}
    rollout:
      throttle: {throttle}
      soak: {{windowMinutes: 5}}
      {APPROVERS_YAML}
"""
    return parse_datasets_config(text, base_dir=tmp_path)


def test_throttle_arithmetic() -> None:
    both = Throttle(partitions_per_minute=20, records_per_minute=600)
    assert both.delay(T0) == 0.0  # the first partition starts at once
    both.started(T0, records=300)  # 300 records at 600/min: the next waits 30 s (more than 3 s)
    assert both.delay(T0) == pytest.approx(30.0)
    small = Throttle(partitions_per_minute=20, records_per_minute=600)
    small.started(T0, records=10)  # 1 s of records, but 20 partitions/min: 3 s
    assert small.delay(T0) == pytest.approx(3.0)
    assert Throttle().delay(T0) == 0.0 and Throttle().describe() == "unthrottled"


def test_records_per_minute_paces_the_apply_by_the_records_written(tmp_path: Path) -> None:
    config = _config(tmp_path)
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    result = operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    assert result["status"] == "soaking"
    # 60 records a minute: after 2 adds wait 2 s, after 2 adds (one omitted) wait 2 s (1 s slices).
    assert clock.slept == pytest.approx([1.0, 1.0, 1.0, 1.0])
    summary = json.loads((tmp_path / "home/reports/rollouts/r/backfill_summary.json").read_text())
    assert [p["added"] for p in summary["partitions"]] == [2, 2, 4]
    assert summary["partitions"][1]["omittedByReason"]["CONSENT_MISSING"] == 1
    assert summary["throttle"]["waitedSeconds"] == pytest.approx(4.0)
    # Applying again writes nothing and keeps the rollout halted for review.
    again = operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    assert again == {"status": "soaking", "rollout": "r", "applied": False}
    # The same name for another range is refused, naming the field.
    with pytest.raises(InvalidInput) as exc:
        operations.start(config, base, "sessions", KEYS[0], KEYS[1], by="ana", name="r", clock=clock)
    assert exc.value.field == "rollout"


def test_a_blocking_policy_gate_writes_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path, on_violation="block")
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    with pytest.raises(Blocked) as exc:
        operations.start(
            config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=ManualClock(T0)
        )
    assert exc.value.document["gate"] == "onViolation"
    assert not list((tmp_path / "home").rglob("*.parquet"))


def test_approvals_are_append_only_and_on_the_production_chain(tmp_path: Path) -> None:
    config = _config(tmp_path, throttle="{}")
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    staged = operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    assert clock.slept == []  # no throttle configured: no waits
    rejected = operations.decide(config, base, "r", "reject", key=BO, reason="too early", clock=clock)
    approved = operations.decide(config, base, "r", "approve", key=CY, reason="fine now", clock=clock)
    decision_hash = staged["execute"]["decisionHash"]
    assert rejected["decisionHash"] == approved["decisionHash"] == decision_hash
    chain = AuditBackup(base.audit_dir).read_chain("sessions/v1")
    assert verify_chain(chain, "sessions/v1") == []
    events = [e for e in chain if e["event_type"].startswith("rollout_")]
    assert [(e["event_type"], e["by"], e.get("reason")) for e in events] == [
        ("rollout_staged", "ana", None),  # the staging apply's end, what the gate reads (not the row)
        ("rollout_rejected", BO.name, "too early"),
        ("rollout_approved", CY.name, "fine now"),
    ]
    assert events[0]["decision_hash"] == decision_hash and events[0]["staged_at"] == "2026-01-05T08:00:00Z"
    assert [e["chain"]["event_hash"] for e in events[1:]] == [
        rejected["auditEventHash"],
        approved["auditEventHash"],
    ]
    # The history tables refuse edits (database triggers).
    catalog = CatalogStore(base.catalog_url)
    RolloutStore(catalog).record_soak_evaluation("r", True, {"checks": {}}, now=clock.now())
    try:
        for statement in (
            "UPDATE rollout_approvals SET actor = 'mallory'",
            "DELETE FROM rollout_approvals",
            "DELETE FROM rollout_log",
            "UPDATE soak_evaluations SET passed = 1",
        ):
            with pytest.raises(sa.exc.DatabaseError), catalog.engine.begin() as conn:
                conn.execute(sa.text(statement))
    finally:
        catalog.close()
    status = operations.status(config, base, "r", clock=clock)
    assert status["gate"]["open"] is False and status["approvals"][-1]["actor"] == CY.name


@pytest.mark.parametrize("before", ["rejected", "nothing"])
def test_a_row_in_rollout_approvals_alone_opens_no_gate(tmp_path: Path, before: str) -> None:
    """The gate reads approvals from the production audit chain: an approval row inserted into the
    catalog by hand (no event on the chain) counts for nothing, whether a real rejection is in force
    or no decision was ever made. A real approval of another rollout does not count either."""
    config = _config(tmp_path, throttle="{}")
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    staged = operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    if before == "rejected":
        operations.decide(config, base, "r", "reject", key=BO, reason="no", clock=clock)
    catalog = CatalogStore(base.catalog_url)
    try:
        RolloutStore(catalog).record_approval(
            name="r",
            decision="approved",
            decision_hash=staged["execute"]["decisionHash"],
            actor="mallory",
            reason="forged row",
            event_hash="sha256:" + "0" * 64,
            now=clock.now(),
        )
    finally:
        catalog.close()
    clock.advance(600)  # past the soak window
    operations.soak(config, base, clock=clock)
    gate = operations.status(config, base, "r", clock=clock)["gate"]
    assert gate["soak"]["state"] == "passed", gate
    assert gate["open"] is False
    expected = f"rejected by {BO.name}" if before == "rejected" else "no signed approval yet"
    assert any(expected in reason for reason in gate["reasons"]), gate["reasons"]
    assert "mallory" not in json.dumps(gate)
    with pytest.raises(Blocked):
        operations.promote(config, base, "r", by="cy", clock=clock)


def _approved_rollout(tmp_path: Path) -> tuple[DatasetsConfig, Settings, ManualClock]:
    config = _config(tmp_path, throttle="{}")
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    clock.advance(600)
    operations.soak(config, base, clock=clock)
    operations.decide(config, base, "r", "approve", key=CY, reason="fine", clock=clock)
    return config, base, clock


def _promote_until(config: DatasetsConfig, base: Settings, clock: ManualClock, failpoint: str) -> None:
    os.environ["PCBO_FAILPOINT"] = failpoint
    operations.promote(config, base, "r", by="cy", clock=clock)


@pytest.fixture(scope="module")
def uninterrupted_promotion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The production lake (`lake_files`) an uninterrupted promotion of `_approved_rollout` leaves,
    built once per module (the lake holds no path of its home: any directory's is the same)."""
    config, base, clock = _approved_rollout(tmp_path_factory.mktemp("reference"))
    operations.promote(config, base, "r", by="cy", clock=clock)
    return lake_files(base.home)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["after_data_files", "before_commit", "after_commit", "after_event", "after_catalog"]
)
def test_a_promotion_killed_at_any_step_is_completed_by_promoting_again(
    tmp_path: Path, uninterrupted_promotion: dict[str, bytes], point: str
) -> None:
    """Production ends byte for byte where an uninterrupted promotion leaves it, `verify` is clean,
    and each partition has exactly one commit event."""
    expected = uninterrupted_promotion
    assert expected  # the reference promotion wrote production's files

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    config, base, clock = _approved_rollout(crashed)
    child = multiprocessing.get_context("fork").Process(
        target=_promote_until, args=(config, base, clock, f"{point}@1")
    )
    child.start()
    child.join(timeout=300)
    assert child.exitcode == 86
    result = operations.promote(config, base, "r", by="cy", clock=clock)
    assert result["status"] == "promoted"
    assert lake_files(base.home) == expected
    assert run_pcbo_in_process(["verify"], home=base.home).status == 0
    commits = [
        e["partition"]["key"]
        for e in backup_events(base.home, "sessions")
        if e["event_type"] == "partition_committed"
    ]
    assert sorted(commits) == KEYS


class _Terminated(BaseException):
    """What a Dagster "Terminate" raises in the step (a KeyboardInterrupt-like interruption)."""


class _TerminatingClock(ManualClock):
    """Terminates the apply the first time the throttle makes it wait."""

    def sleep(self, seconds: float) -> None:
        raise _Terminated()


def test_an_interrupted_apply_is_marked_and_resumes_with_the_limits_given(tmp_path: Path) -> None:
    config = _config(tmp_path, throttle="{partitionsPerMinute: 1}")
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    staged = tmp_path / "home" / "staging" / "lake" / "sessions" / "v1"
    with pytest.raises(_Terminated):  # terminated while waiting before the second partition
        operations.start(
            config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r",
            clock=_TerminatingClock(T0), metadata={"dagsterRunId": "run-1"},
        )  # fmt: skip
    assert len(list(staged.glob("*/_manifest.json"))) == 1
    # Another run's end marks nothing; the terminated run's end marks the rollout interrupted.
    assert operations.mark_interrupted(config, base, "run-2", "CANCELED") == []
    [marked] = operations.mark_interrupted(config, base, "run-1", "CANCELED")
    assert marked["rollout"] == "r" and "rollout: r" in marked["resume"]
    assert operations.find_rollout(base, "r")["status"] == "interrupted"

    # Resumed with other limits: they apply to the rest of the apply and are logged; the committed
    # partition is kept, the other two are applied.
    clock = ManualClock(T0)
    resumed = operations.start(
        config, base, "sessions", KEYS[0], KEYS[-1], by="bo", name="r", clock=clock,
        throttle={"partitionsPerMinute": 60, "recordsPerMinute": None},
    )  # fmt: skip
    assert resumed["status"] == "soaking"
    assert [p["status"] for p in resumed["execute"]["partitions"]] == ["unchanged", "committed", "committed"]
    # 60 partitions a minute: 1 s before the second and the third (the stored 1 a minute: 60 s each).
    assert sum(clock.slept) == pytest.approx(2.0)
    rollout = operations.find_rollout(base, "r")
    assert rollout["throttle"]["partitionsPerMinute"] == 60
    catalog = CatalogStore(base.catalog_url)
    try:
        with catalog.engine.connect() as conn:
            kinds = [k for (k,) in conn.execute(sa.text("SELECT kind FROM rollout_log ORDER BY id"))]
    finally:
        catalog.close()
    assert kinds[kinds.index("interrupted") :] == [
        "interrupted",
        "applying",
        "throttle_changed",
        "soaking",
        "backfill_summary_written",
    ]
    assert len(list(staged.glob("*/_manifest.json"))) == 3

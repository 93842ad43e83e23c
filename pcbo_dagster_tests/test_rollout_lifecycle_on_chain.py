"""The promotion gate reads the rollout's lifecycle (staged, soak verdicts, promoted, rolled back) from
the production audit chain, never from the catalog's `rollouts` / `soak_evaluations` rows, which
anyone who can write the catalog can edit: such an edit opens nothing, and `verify` reports it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.core.errors import Blocked, InvalidInput
from pcbo_dagster.core.rollout_lifecycle import lifecycle
from pcbo_dagster.datasets.config import DatasetsConfig, parse_datasets_config
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.engine.verify import verify
from pcbo_dagster.rollout import operations, promotion
from pcbo_dagster.rollout.clock import ManualClock
from pcbo_dagster_tests.approver_keys import APPROVERS_YAML, CY

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
KEYS = ["20240101T000000Z", "20240101T010000Z"]


def _config(tmp_path: Path, metric: str = "") -> DatasetsConfig:
    records = [
        {"id": f"r-{h}-{n}", "occurredAt": f"2024-01-01T{h:02d}:{n:02d}:00Z", "consentGranted": True}
        for h in range(2)
        for n in range(3)
    ]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = f"""
datasets:
  - name: sessions
    partitioning:
      {{kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-01T02:00:00Z"}}
    source: {{uri: s.jsonl}}
    policies: {{requireConsent: true, onViolation: omit}}
    rollout:
      throttle: {{}}
      soak: {{windowMinutes: 5}}
      {metric}
      {APPROVERS_YAML}
"""
    return parse_datasets_config(text, base_dir=tmp_path)


def _catalog(base: Settings, *statements: tuple[str, dict]) -> None:
    """What someone who can write the production catalog (and nothing else) does."""
    catalog = CatalogStore(base.catalog_url)
    try:
        with catalog.engine.begin() as conn:
            for statement, params in statements:
                conn.execute(sa.text(statement), params)
    finally:
        catalog.close()


def _promote(config: DatasetsConfig, base: Settings, clock: ManualClock) -> list[str]:
    """The gate's reasons for refusing (`Blocked`, nothing written)."""
    with pytest.raises(Blocked) as blocked:
        operations.promote(config, base, "r", by="dee", clock=clock)
    return blocked.value.document["reasons"]


def _findings(config: DatasetsConfig, base: Settings) -> list[tuple[str, str]]:
    dataset = config.dataset("sessions")
    with operations.dataset_environments(config, dataset, base) as envs:
        return [(f["kind"], f["detail"]) for f in verify(envs.production)["findings"]]


def _production_commits(base: Settings) -> int:
    return len(list((base.home / "lake").rglob("_manifest.json")))


def test_a_failed_soak_stays_failed_whatever_the_catalog_says(tmp_path: Path) -> None:
    config = _config(tmp_path, 'businessMetric: {name: rows, expression: "count()", atLeast: 100}')
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    clock.advance(60)
    [soaked] = operations.soak(config, base, clock=clock)
    assert soaked["evaluation"]["passed"] is False and soaked["status"]["state"] == "failed"
    operations.decide(config, base, "r", "approve", key=CY, reason="looked early", clock=clock)
    assert any(r.startswith("soak failed: ") for r in _promote(config, base, clock))
    assert _findings(config, base) == []

    # A passing evaluation inserted after the window: the chain still holds the failure.
    clock.advance(600)
    now = clock.now().replace(tzinfo=None)
    insert = (
        "INSERT INTO soak_evaluations (rollout, passed, detail, evaluated_at) VALUES ('r', 1, '{}', :at)",
        {"at": now},
    )
    _catalog(base, insert)
    assert any(r.startswith("soak failed: ") for r in _promote(config, base, clock))

    # ... and the soak window moved past the failure and shortened to nothing (the reported attack).
    _catalog(
        base,
        ("UPDATE rollouts SET staged_at = :at, soak_window_seconds = 0 WHERE name = 'r'", {"at": now}),
    )
    clock.advance(1)
    reasons = _promote(config, base, clock)
    assert len(reasons) == 1 and "disagrees with the production audit chain" in reasons[0]
    assert "soak window (s): the catalog says 0, the production audit chain 300" in reasons[0]
    assert operations.status(config, base, "r", clock=clock)["soak"]["state"] == "failed"
    assert _production_commits(base) == 0
    findings = _findings(config, base)
    assert [kind for kind, _ in findings] == [
        "rollout_not_on_chain",  # staged at
        "rollout_not_on_chain",  # soak window
        "soak_evaluation_not_on_chain",
    ]
    assert "is not on the production audit chain" in findings[-1][1]


def test_a_rolled_back_rollout_is_not_reopened_by_its_catalog_status(tmp_path: Path) -> None:
    config = _config(tmp_path)
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    clock.advance(300)
    operations.soak(config, base, clock=clock)
    operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    assert operations.promote(config, base, "r", by="dee", clock=clock)["status"] == "promoted"
    operations.rollback(config, base, "production", by="ops", reason="bad data", name="r", clock=clock)
    assert _production_commits(base) == 0
    assert _promote(config, base, clock)[0].startswith("status is rolled_back")

    _catalog(base, ("UPDATE rollouts SET status = 'soaking' WHERE name = 'r'", {}))
    reasons = _promote(config, base, clock)  # what the rollout_promotion sensor would ask, too
    assert reasons == [
        "status is rolled_back: not halted for review after a staging apply (the production audit chain "
        "says rolled_back, the catalog soaking)"
    ]
    dataset = config.dataset("sessions")
    with operations.dataset_environments(config, dataset, base) as envs:
        chain = envs.production.audit.backup.read_chain("sessions/v1")
    assert lifecycle(chain, "r").status == "rolled_back"
    assert [e["event_type"] for e in chain if e["event_type"].startswith("rollout_")] == [
        "rollout_staged",
        "rollout_soak_evaluated",
        "rollout_approved",
        "rollout_promoted",
        "rollout_rolled_back",
    ]
    with pytest.raises(InvalidInput, match="production audit chain says rolled_back"):
        operations.decide(config, base, "r", "approve", key=CY, reason="again", clock=clock)
    assert [kind for kind, _ in _findings(config, base)] == ["rollout_not_on_chain"]

    # Nor does "promoted" let a repair (health check, production asset) write it again, nor does
    # "applying" let the staging apply stage it again.
    _catalog(base, ("UPDATE rollouts SET status = 'promoted' WHERE name = 'r'", {}))
    with operations.dataset_environments(config, dataset, base) as envs:
        with pytest.raises(InvalidInput, match="rolled_back by the production audit chain"):
            promotion.repair_approval(envs, envs.store.require("r"))
    _catalog(base, ("UPDATE rollouts SET status = 'applying' WHERE name = 'r'", {}))
    with pytest.raises(InvalidInput, match="it is never applied again"):
        operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    assert _production_commits(base) == 0

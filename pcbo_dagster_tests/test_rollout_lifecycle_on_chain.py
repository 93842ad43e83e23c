"""The promotion gate reads the rollout's lifecycle (staged, soak verdicts, promoted, rolled back) from
the production audit chain, never from the catalog's `rollouts` / `soak_evaluations` rows, which
anyone who can write the catalog can edit: such an edit opens nothing, and `verify` reports it. With
the operator's key (`PCBO_SIGNING_KEY`) the lifecycle events are signed and only signed ones count:
events appended to the chain by someone who can write the audit backup and the catalog but holds no
key open nothing, and a signed event appended again counts once."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pcbo_dagster.core.errors import Blocked, IntegrityError, InvalidInput
from pcbo_dagster.core.instants import format_datetime
from pcbo_dagster.core.operator_signatures import OPERATOR_SIGNATURE, verified_statement
from pcbo_dagster.core.rollout_lifecycle import lifecycle, rollout_subject
from pcbo_dagster.core.signed_note import signing_key_from_seed
from pcbo_dagster.datasets.config import DatasetsConfig, parse_datasets_config
from pcbo_dagster.engine.events import PRODUCER
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.engine.verify import REFUSED, verify
from pcbo_dagster.rollout import operations, promotion
from pcbo_dagster.rollout.clock import ManualClock
from pcbo_dagster_tests.approver_keys import APPROVERS_YAML, CY, key_file
from pcbo_dagster_tests.catalog_writer import write_catalog

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
KEYS = ["20240101T000000Z", "20240101T010000Z"]
#: The operator's key (`PCBO_SIGNING_KEY`); a test key, its seed is here.
OPERATOR = signing_key_from_seed("ops.example/operator", bytes([21]) * 32)
RESERVED = ("version", "event_type", "event_id", "timestamp", "chain")


def _config(tmp_path: Path, metric: str = "", soak_minutes: int = 5) -> DatasetsConfig:
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
      soak: {{windowMinutes: {soak_minutes}}}
      {metric}
      {APPROVERS_YAML}
"""
    return parse_datasets_config(text, base_dir=tmp_path)


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
    write_catalog(base, insert)
    assert any(r.startswith("soak failed: ") for r in _promote(config, base, clock))

    # ... and the soak window moved past the failure and shortened to nothing (the reported attack).
    write_catalog(
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

    write_catalog(base, ("UPDATE rollouts SET status = 'soaking' WHERE name = 'r'", {}))
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
    write_catalog(base, ("UPDATE rollouts SET status = 'promoted' WHERE name = 'r'", {}))
    with operations.dataset_environments(config, dataset, base) as envs:
        with pytest.raises(InvalidInput, match="rolled_back by the production audit chain"):
            promotion.repair_approval(envs, envs.store.require("r"))
    write_catalog(base, ("UPDATE rollouts SET status = 'applying' WHERE name = 'r'", {}))
    with pytest.raises(InvalidInput, match="it is never applied again"):
        operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    assert _production_commits(base) == 0


# --- with the operator's key: lifecycle events are signed, and only signed ones count ---------------


def _signed_settings(tmp_path: Path) -> Settings:
    return Settings.resolve(
        home=str(tmp_path / "home"), env={"PCBO_SIGNING_KEY": str(key_file(tmp_path, OPERATOR))}
    )


def _append(config: DatasetsConfig, base: Settings, *events: tuple[str, dict]) -> None:
    """What someone who can write the audit backup and the catalog (with pcbo's own audit code, every
    hash right) but holds no key appends to the production chain."""
    dataset = config.dataset("sessions")
    keyless = dataclasses.replace(base, signing_key=None)
    with operations.dataset_environments(config, dataset, keyless) as envs:
        for event_type, body in events:
            envs.production.audit.append("sessions/v1", event_type, body)


def _chain(config: DatasetsConfig, base: Settings) -> list[dict]:
    dataset = config.dataset("sessions")
    with operations.dataset_environments(config, dataset, base) as envs:
        return envs.production.audit.backup.read_chain("sessions/v1")


def test_forged_lifecycle_events_open_nothing_with_a_signing_key(tmp_path: Path) -> None:
    config = _config(tmp_path, soak_minutes=1440)
    base = _signed_settings(tmp_path)
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    clock.advance(60)
    operations.soak(config, base, clock=clock)  # passing, inside the 24 h window
    operations.decide(config, base, "r", "approve", key=CY, reason="looks fine so far", clock=clock)
    assert any(r.startswith("soak soaking: ") for r in _promote(config, base, clock))

    # The attack: a rollout_staged of yesterday with no soak window and a passing evaluation, appended
    # to the production chain, then the rollouts row edited to match.
    dataset = config.dataset("sessions")
    with operations.dataset_environments(config, dataset, base) as envs:
        row = envs.store.require("r")
        assert row["staged_at"] is not None
    yesterday = datetime(2026, 1, 4, 8, 0, tzinfo=UTC)
    _append(
        config,
        base,
        (
            "rollout_staged",
            {
                "rollout": rollout_subject(row),
                "decision_hash": row["decision_hash"],
                "plan_hash": row["plan_hash"],
                "staged_at": format_datetime(yesterday),
                "soak_window_seconds": 0,
                "by": "ana",
                "producer": PRODUCER,
            },
        ),
        (
            "rollout_soak_evaluated",
            {
                "rollout": rollout_subject(row),
                "passed": True,
                "evaluated_at": format_datetime(clock.now()),
                "decision_hash": row["decision_hash"],
                "decision_hash_now": row["decision_hash"],
                "failed_checks": [],
                "checks": {},
                "detail_digest": "sha256:" + "0" * 64,
                "producer": PRODUCER,
            },
        ),
    )
    status = operations.status(config, base, "r", clock=clock)
    assert status["soak"]["state"] == "soaking" and status["soak"]["window_seconds"] == 86400
    assert not status["gate"]["open"] and status["gate"]["soak"]["state"] == "soaking"
    assert any(r.startswith("soak soaking: ") for r in _promote(config, base, clock))

    write_catalog(
        base,
        (
            "UPDATE rollouts SET staged_at = :at, soak_window_seconds = 0 WHERE name = 'r'",
            {"at": yesterday.replace(tzinfo=None)},
        ),
    )
    status = operations.status(config, base, "r", clock=clock)
    assert status["soak"]["state"] == "soaking"
    assert not status["gate"]["open"] and status["gate"].get("soak", {}).get("state") != "passed"
    reasons = _promote(config, base, clock)
    assert len(reasons) == 1 and "disagrees with the production audit chain" in reasons[0]
    assert _production_commits(base) == 0
    kinds = [kind for kind, _ in _findings(config, base)]
    assert kinds.count("rollout_event_signature_invalid") == 2
    assert "rollout_not_on_chain" in kinds


def test_a_genuine_signed_rollout_soaks_is_approved_and_promotes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    base = _signed_settings(tmp_path)
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    clock.advance(300)
    [soaked] = operations.soak(config, base, clock=clock)
    assert soaked["status"]["state"] == "passed"
    operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    assert operations.promote(config, base, "r", by="dee", clock=clock)["status"] == "promoted"
    assert _production_commits(base) == 2
    assert _findings(config, base) == []
    chain = _chain(config, base)
    lifecycle_events = [e for e in chain if e["event_type"] in ("rollout_staged", "rollout_soak_evaluated")]
    lifecycle_events += [e for e in chain if e["event_type"] == "rollout_promoted"]
    assert len(lifecycle_events) == 3
    for event in lifecycle_events:
        assert verified_statement(event, OPERATOR.verifier()) is not None
        assert event[OPERATOR_SIGNATURE].startswith("pcbo.event/v2\nchain sessions/v1\nseq ")
    assert lifecycle(chain, "r", OPERATOR.verifier()).status == "promoted"


def test_a_replayed_signed_soak_evaluation_does_not_pass_the_soak(tmp_path: Path) -> None:
    config = _config(tmp_path)
    base = _signed_settings(tmp_path)
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    clock.advance(60)
    operations.soak(config, base, clock=clock)  # passing, one minute into the 5-minute window
    operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    clock.advance(600)  # the window is over; no evaluation was made after it

    [genuine] = [e for e in _chain(config, base) if e["event_type"] == "rollout_soak_evaluated"]
    body = {k: v for k, v in genuine.items() if k not in RESERVED}
    _append(config, base, ("rollout_soak_evaluated", body))  # the signed event, word for word
    soak = operations.status(config, base, "r", clock=clock)["soak"]
    assert soak["state"] == "soaking" and soak["evaluations"] == 1
    assert any(r.startswith("soak soaking: ") for r in _promote(config, base, clock))

    # ... and again, moved after the window's end (its signature no longer matches its body).
    moved = {**body, "evaluated_at": format_datetime(clock.now())}
    _append(config, base, ("rollout_soak_evaluated", moved))
    soak = operations.status(config, base, "r", clock=clock)["soak"]
    assert soak["state"] == "soaking" and soak["evaluations"] == 1
    assert any(r.startswith("soak soaking: ") for r in _promote(config, base, clock))
    assert _production_commits(base) == 0
    assert "rollout_event_signature_invalid" in [kind for kind, _ in _findings(config, base)]


def test_a_replayed_signed_event_and_the_soak_row_it_would_cover_are_reported(tmp_path: Path) -> None:
    """The signed soak evaluation appended again word for word (its signature verifies: it is
    genuine) and a copy of its `soak_evaluations` row inserted. The gate ignored the replay, but
    `verify` said clean: the replay carries a valid signature, and it counted as a second evaluation
    on the chain for the copied row. Now the replay is `rollout_event_signature_invalid` (a signed
    statement counts once) and the copied row `soak_evaluation_not_on_chain`."""
    config = _config(tmp_path)
    base = _signed_settings(tmp_path)
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    clock.advance(60)
    operations.soak(config, base, clock=clock)
    assert _findings(config, base) == []
    [genuine] = [e for e in _chain(config, base) if e["event_type"] == "rollout_soak_evaluated"]
    _append(config, base, ("rollout_soak_evaluated", {k: v for k, v in genuine.items() if k not in RESERVED}))
    write_catalog(
        base,
        (
            "INSERT INTO soak_evaluations (rollout, passed, detail, evaluated_at) "
            "SELECT rollout, passed, detail, evaluated_at FROM soak_evaluations WHERE rollout = 'r'",
            {},
        ),
    )
    kinds = sorted(kind for kind, _ in _findings(config, base))
    assert kinds == ["rollout_event_signature_invalid", "soak_evaluation_not_on_chain"], kinds


# --- the crash window between a lifecycle event and its row: healed by verify --repair ---------------


class _Killed(BaseException):
    """The process dying where the test says (after the chain's event, before the row)."""


def _crash_before_row(monkeypatch: pytest.MonkeyPatch, status: str) -> None:
    """The next `rollouts` row write moving a rollout to `status` never happens: the process dies."""
    from pcbo_dagster.catalog.rollouts import RolloutStore

    real = RolloutStore.set_status

    def dies(self: RolloutStore, name: str, to: str, **kwargs: object) -> None:
        if to == status:
            monkeypatch.setattr(RolloutStore, "set_status", real)
            raise _Killed(to)
        real(self, name, to, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RolloutStore, "set_status", dies)


def _verify_production(config: DatasetsConfig, base: Settings, repair: bool = False) -> dict:
    with operations.dataset_environments(config, config.dataset("sessions"), base) as envs:
        return verify(envs.production, repair=repair)


@pytest.mark.parametrize("signed", [False, True])
def test_a_crash_after_each_lifecycle_event_is_healed_by_repair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signed: bool
) -> None:
    """Killed after `rollout_staged`, `rollout_promoted` and `rollout_rolled_back` reached the chain and
    before the row: verify reports the row one step behind, `--repair` writes the row the step would
    have (the staged decisions, moment and run included), and the rollout goes on."""
    config = _config(tmp_path)
    base = _signed_settings(tmp_path) if signed else Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)

    def healed(status: str) -> None:
        found = _verify_production(config, base)["findings"]
        assert found and {f["kind"] for f in found} == {"rollout_not_on_chain"}, found
        assert all(f["detail"].endswith("(one lifecycle step behind: --repair)") for f in found)
        repaired = _verify_production(config, base, repair=True)
        assert repaired["findings"] == [], repaired["findings"]
        assert {"kind": "rollout_row_behind_chain", "where": "sessions/v1 rollout r", "status": status} in (
            repaired["repaired"]
        )
        assert _verify_production(config, base)["findings"] == []

    _crash_before_row(monkeypatch, "soaking")
    with pytest.raises(_Killed):
        operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    healed("soaking")
    with operations.dataset_environments(config, config.dataset("sessions"), base) as envs:
        row = envs.store.require("r")
        assert row["staged_at"] is not None
        [staged] = [e for e in _chain(config, base) if e["event_type"] == "rollout_staged"]
        assert (row["decision_hash"], row["plan_hash"], format_datetime(row["staged_at"])) == (
            staged["decision_hash"],
            staged["plan_hash"],
            staged["staged_at"],
        )
        assert row["staging_run_id"] == staged["rollout"]["staging_run_id"] is not None
    clock.advance(300)
    [soaked] = operations.soak(config, base, clock=clock)
    assert soaked["status"]["state"] == "passed"
    operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)

    _crash_before_row(monkeypatch, "promoted")
    with pytest.raises(_Killed):
        operations.promote(config, base, "r", by="dee", clock=clock)
    healed("promoted")
    assert _production_commits(base) == 2

    _crash_before_row(monkeypatch, "rolled_back")
    with pytest.raises(_Killed):
        operations.rollback(config, base, "production", by="ops", reason="bad data", name="r", clock=clock)
    healed("rolled_back")
    assert _promote(config, base, clock)[0].startswith("status is rolled_back")


def test_repair_rewrites_no_row_an_edit_made_to_disagree(tmp_path: Path) -> None:
    """The attack on that repair: a row edited to anything but the state one step before the chain's
    last lifecycle event (a shorter soak window; a staged rollout set back to `applying` with its
    staged decisions kept) is a finding
    `--repair` refuses, and the row stays as edited."""
    config = _config(tmp_path)
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    for edit, column, value in (
        ("UPDATE rollouts SET soak_window_seconds = 0 WHERE name = 'r'", "soak_window_seconds", 0),
        (
            "UPDATE rollouts SET status = 'applying', soak_window_seconds = 0 WHERE name = 'r'",
            "status",
            "applying",
        ),
    ):
        write_catalog(base, (edit, {}))
        repaired = _verify_production(config, base, repair=True)
        assert repaired["repaired"] == [] and repaired["findings"], repaired
        assert {f["kind"] for f in repaired["findings"]} == {"rollout_not_on_chain"}
        assert all(f["detail"].endswith(f"({REFUSED})") for f in repaired["findings"])
        with operations.dataset_environments(config, config.dataset("sessions"), base) as envs:
            assert dict(envs.store.require("r"))[column] == value


def test_repair_catches_no_row_up_to_an_event_the_backup_alone_holds(tmp_path: Path) -> None:
    """Red-team finding: a `rollout_cancelled` written into the production backup alone (never
    adopted: the stores diverge) still had repair write the row `cancelled`. A row is caught up only
    to a chain both stores hold."""
    from pcbo_dagster.core.audit_chain import build_event
    from pcbo_dagster.core.rollout_lifecycle import rollout_subject

    config = _config(tmp_path)
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    with operations.dataset_environments(config, config.dataset("sessions"), base) as envs:
        backup = envs.production.audit.backup
        last = backup.read_chain("sessions/v1")[-1]
        body = {"rollout": rollout_subject(envs.store.require("r")), "by": "mallory", "producer": PRODUCER}
        forged = build_event(
            chain_key="sessions/v1",
            seq=last["chain"]["seq"] + 1,
            prev_event_hash=last["chain"]["event_hash"],
            event_type="rollout_cancelled",
            timestamp=last["timestamp"],
            body={**body, "cancelled_at": format_datetime(clock.now())},
        )
        backup.append("sessions/v1", [forged], fsync=True)
    repaired = _verify_production(config, base, repair=True)
    assert not any(r["kind"] == "rollout_row_behind_chain" for r in repaired["repaired"]), repaired
    assert any(f["kind"].startswith("audit_") for f in repaired["findings"]), repaired["findings"]
    with operations.dataset_environments(config, config.dataset("sessions"), base) as envs:
        assert envs.store.require("r")["status"] == "soaking"


def test_a_crash_between_an_approval_event_and_its_row_is_reported_and_healed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after `rollout_approved` reached the chain and before its `rollout_approvals` row: the
    gate counts the approval (the chain's), `verify` reports the row missing (it said nothing, and
    `pcbo rollout status` listed no approval), `--repair` writes the row the approval would have, once,
    and the rollout goes on."""
    from pcbo_dagster.catalog.rollouts import RolloutStore

    config = _config(tmp_path)
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    clock.advance(300)
    operations.soak(config, base, clock=clock)
    real = RolloutStore.record_approval

    def dies(self: RolloutStore, **kwargs: object) -> None:
        raise _Killed("approval")

    monkeypatch.setattr(RolloutStore, "record_approval", dies)
    with pytest.raises(_Killed):
        operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    monkeypatch.setattr(RolloutStore, "record_approval", real)
    [event] = [e for e in _chain(config, base) if e["event_type"] == "rollout_approved"]

    found = _verify_production(config, base)["findings"]
    assert [f["kind"] for f in found] == ["rollout_approval_row_missing"], found
    assert found[0]["detail"].endswith("(a crash between the event and its row: --repair)"), found
    repaired = _verify_production(config, base, repair=True)
    assert repaired["findings"] == [], repaired["findings"]
    assert {
        "kind": "rollout_approval_row_missing",
        "where": "sessions/v1 rollout r",
        "seq": event["chain"]["seq"],
    } in (repaired["repaired"])
    with operations.dataset_environments(config, config.dataset("sessions"), base) as envs:
        rows = envs.store.approvals("r")
    assert [(r["decision"], r["decision_hash"], r["actor"], r["reason"], r["event_hash"]) for r in rows] == [
        ("approved", event["decision_hash"], CY.name, "numbers reviewed", event["chain"]["event_hash"])
    ]
    again = _verify_production(config, base, repair=True)
    assert again["findings"] == [] and again["repaired"] == []
    assert operations.promote(config, base, "r", by="dee", clock=clock)["status"] == "promoted"


@pytest.mark.parametrize("signed", [False, True])
def test_a_crash_between_a_soak_evaluation_event_and_its_row_is_reported_and_healed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signed: bool
) -> None:
    """Red-team finding: killed after `rollout_soak_evaluated` reached the chain and before its
    `soak_evaluations` row, `verify` said clean and `--repair` wrote nothing (the event held only the
    detail's digest). The event now carries the detail (as JSON text, floats and all: a business metric
    here): `verify` reports the row missing, `--repair`
    writes the very row (its digest the event's), once. An event carrying no detail (or one that is
    not the digest's) is a finding `--repair` leaves alone."""
    from pcbo_dagster.catalog.rollouts import RolloutStore

    config = _config(tmp_path, 'businessMetric: {name: rows, expression: "count()", atMost: 9.5}')
    base = _signed_settings(tmp_path) if signed else Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    clock.advance(300)
    real = RolloutStore.record_soak_evaluation

    def dies(self: RolloutStore, *args: object, **kwargs: object) -> None:
        raise _Killed("soak evaluation")

    monkeypatch.setattr(RolloutStore, "record_soak_evaluation", dies)
    with pytest.raises(_Killed):
        operations.soak(config, base, clock=clock)
    monkeypatch.setattr(RolloutStore, "record_soak_evaluation", real)
    [event] = [e for e in _chain(config, base) if e["event_type"] == "rollout_soak_evaluated"]

    found = _verify_production(config, base)["findings"]
    assert [f["kind"] for f in found] == ["soak_evaluation_row_missing"], found
    assert found[0]["detail"].endswith("(a crash between the event and its row: --repair)"), found
    repaired = _verify_production(config, base, repair=True)
    assert repaired["findings"] == [], repaired["findings"]
    assert repaired["repaired"] == [
        {
            "kind": "soak_evaluation_row_missing",
            "where": "sessions/v1 rollout r",
            "seq": event["chain"]["seq"],
        }
    ]
    with operations.dataset_environments(config, config.dataset("sessions"), base) as envs:
        [row] = envs.store.soak_evaluations("r")
    assert row["passed"] is event["passed"] is True and row["detail"] == json.loads(event["detail_json"])
    assert format_datetime(row["evaluated_at"]) == event["evaluated_at"]
    again = _verify_production(config, base, repair=True)
    assert again["findings"] == [] and again["repaired"] == []
    assert operations.status(config, base, "r", clock=clock)["soak"]["evaluations"] == 1

    if signed:
        return
    # An event as written before events carried the detail (its digest only): a finding, not healed.
    older = {k: v for k, v in event.items() if k not in (*RESERVED, "detail_json")}
    _append(config, base, ("rollout_soak_evaluated", {**older, "evaluated_at": format_datetime(clock.now())}))
    for repair in (False, True):
        found = _verify_production(config, base, repair=repair)
        assert [f["kind"] for f in found["findings"]] == ["soak_evaluation_row_missing"], found
        assert "a crash between" not in found["findings"][0]["detail"] and found["repaired"] == []


def test_a_staging_apply_run_again_after_its_rollout_staged_appends_no_second_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after `rollout_staged` and before the row (or a second `pcbo rollout start` of the rollout
    that waited for the first's lock): the apply run again stages the same decisions, so it appends no
    second `rollout_staged` (which moved the soak window to its own moment) and the row takes the
    chain's staging: one event, the first moment, `verify` clean."""
    config = _config(tmp_path)
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    _crash_before_row(monkeypatch, "soaking")
    with pytest.raises(_Killed):
        operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    clock.advance(120)
    again = operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    assert again["status"] == "soaking"
    [staged] = [e for e in _chain(config, base) if e["event_type"] == "rollout_staged"]
    assert staged["staged_at"] == format_datetime(T0)
    with operations.dataset_environments(config, config.dataset("sessions"), base) as envs:
        row = envs.store.require("r")
    assert row["status"] == "soaking" and row["staged_at"] is not None
    assert format_datetime(row["staged_at"]) == format_datetime(T0)
    assert _verify_production(config, base)["findings"] == []
    clock.advance(180)  # the window (5 min) counts from the first staging: an evaluation now passes it
    [soaked] = operations.soak(config, base, clock=clock)
    assert soaked["status"]["state"] == "passed", soaked["status"]


# --- a writer without the chain's key, and a chain holding an event the key did not sign ------------


def _staging_commits(base: Settings) -> int:
    return len(list((base.home / "staging").rglob("_manifest.json")))


def test_a_rollout_step_without_the_key_appends_nothing_to_a_signed_production_chain(tmp_path: Path) -> None:
    """A soak monitor or a staging apply in a process not given PCBO_SIGNING_KEY (or given another key),
    or an approval given another key, is refused naming the key, nothing appended and nothing staged,
    where it appended an unsigned lifecycle event the gate ignored and `verify` reported for good (or,
    another key, signed a checkpoint no verify with the chain's key accepts: red-team finding). An
    approval needs no operator key (its approver's key signs it)."""
    config = _config(tmp_path)
    base = _signed_settings(tmp_path)
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[0], by="ana", name="r", clock=clock)
    clock.advance(60)
    chain = _chain(config, base)
    rotated = signing_key_from_seed("ops.example/operator-2027", bytes([22]) * 32)
    keyless = dataclasses.replace(base, signing_key=None)
    other = dataclasses.replace(base, signing_key=key_file(tmp_path, rotated))
    for settings, named in ((keyless, "PCBO_SIGNING_KEY"), (other, "ops.example/operator-2027")):
        [soaked] = operations.soak(config, settings, clock=clock)
        assert "evaluation" not in soaked and named in soaked["error"], soaked
        assert "nothing was written" in soaked["error"]
        with pytest.raises(IntegrityError, match=named):
            operations.start(config, settings, "sessions", KEYS[1], KEYS[1], by="ana", name="r2", clock=clock)
        assert _chain(config, base) == chain and _staging_commits(base) == 1
    with pytest.raises(IntegrityError, match="ops.example/operator-2027"):
        operations.decide(config, other, "r", "approve", key=CY, reason="fine", clock=clock)
    assert _chain(config, base) == chain and _findings(config, base) == []
    operations.decide(config, keyless, "r", "approve", key=CY, reason="fine", clock=clock)
    assert [e["event_type"] for e in _chain(config, base)[len(chain) :]] == ["rollout_approved"]
    # with the key, the rollout goes on
    [soaked] = operations.soak(config, base, clock=clock)
    assert soaked["evaluation"]["passed"], soaked
    assert _findings(config, base) == []


def test_a_rollout_step_builds_nothing_on_an_event_the_key_did_not_sign(tmp_path: Path) -> None:
    """An event the key should have signed (not a lifecycle event: a commit intent) appended by someone
    who can write the stores: the soak, an approval and a staging apply refuse the chain, nothing
    appended, where they appended their signed event after it and only then refused to sign a
    checkpoint (the event on the chain, its catalog row missing: red-team finding)."""
    config = _config(tmp_path)
    base = _signed_settings(tmp_path)
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[0], by="ana", name="r", clock=clock)
    clock.advance(60)
    _append(config, base, ("partition_commit_intent", {"partitions": [], "run_id": "forged"}))
    chain = _chain(config, base)
    [soaked] = operations.soak(config, base, clock=clock)
    assert "evaluation" not in soaked and "no valid signature" in soaked["error"], soaked
    with pytest.raises(IntegrityError, match="no valid signature"):
        operations.decide(config, base, "r", "approve", key=CY, reason="fine", clock=clock)
    with pytest.raises(IntegrityError, match="no valid signature"):
        operations.start(config, base, "sessions", KEYS[1], KEYS[1], by="ana", name="r2", clock=clock)
    assert _chain(config, base) == chain and _staging_commits(base) == 1
    assert [kind for kind, _ in _findings(config, base)] == ["event_signature_invalid"]


def _staging_lake(base: Settings) -> list[tuple[str, bytes]]:
    stores = [base.home / "staging" / store for store in ("lake", "pas")]
    return sorted((str(p), p.read_bytes()) for store in stores for p in store.rglob("*") if p.is_file())


def test_a_staging_rollback_without_the_key_undoes_nothing_it_cannot_record(tmp_path: Path) -> None:
    """A rollout's staging rollback in a process not given PCBO_SIGNING_KEY: refused naming the key
    before anything is undone, where it rolled the staging partitions back and only then was refused
    the `rollout_rolled_back` on the signed production chain (the rollout half rolled back: red-team
    finding). With the key it rolls back."""
    config = _config(tmp_path)
    base = _signed_settings(tmp_path)
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r", clock=clock)
    chain, staging = _chain(config, base), _staging_lake(base)
    keyless = dataclasses.replace(base, signing_key=None)
    with pytest.raises(IntegrityError, match="PCBO_SIGNING_KEY"):
        operations.rollback(config, keyless, "staging", by="ops", reason="bad data", name="r", clock=clock)
    assert _chain(config, base) == chain and _staging_lake(base) == staging
    done = operations.rollback(config, base, "staging", by="ops", reason="bad data", name="r", clock=clock)
    assert done["status"] == "rolled_back", done
    assert _findings(config, base) == []

"""Red-team findings on staged rollouts: what someone who can write the production catalog (and
nothing else) could do to the soak, the promotion or the alerts, and why it opens nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pcbo_dagster.core.errors import Blocked, InvalidInput
from pcbo_dagster.core.rollout_lifecycle import lifecycle
from pcbo_dagster.datasets.config import DatasetsConfig, parse_datasets_config
from pcbo_dagster.engine.partition_reading import read_commit_point
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.rollout import operations, promotion
from pcbo_dagster.rollout.clock import ManualClock
from pcbo_dagster_tests.approver_keys import APPROVERS_YAML, CY
from pcbo_dagster_tests.catalog_writer import write_catalog

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
K0, K1, K2 = "20240101T000000Z", "20240101T010000Z", "20240101T020000Z"


def _config(tmp_path: Path, metric: str = "", throttle: str = "{}") -> DatasetsConfig:
    # Hour 1 is the "bad" hour: 10 rows where the others have 3.
    records = [
        {"id": f"r-{h}-{n}", "occurredAt": f"2024-01-01T{h:02d}:{n:02d}:00Z", "consentGranted": True}
        for h in range(3)
        for n in range(10 if h == 1 else 3)
    ]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = f"""
datasets:
  - name: sessions
    partitioning:
      {{kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-01T03:00:00Z"}}
    source: {{uri: s.jsonl}}
    policies: {{requireConsent: true, onViolation: omit}}
    rollout:
      throttle: {throttle}
      soak: {{windowMinutes: 5}}
      {metric}
      {APPROVERS_YAML}
"""
    return parse_datasets_config(text, base_dir=tmp_path)


def _approved_rollout(tmp_path: Path) -> tuple[DatasetsConfig, Settings, ManualClock]:
    """Rollout `r` of K0..K2 staged, soaked (5 minutes on) and approved by CY, not promoted yet."""
    config = _config(tmp_path)
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", K0, K2, by="ana", name="r", clock=clock)
    clock.advance(300)
    operations.soak(config, base, clock=clock)
    operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    return config, base, clock


def _production_commits(base: Settings) -> int:
    return len(list((base.home / "lake").rglob("_manifest.json")))


# The metric fails over the whole range (16 rows) and passes over hours 0 and 2 only (6 rows).
ROWS_METRIC = 'businessMetric: {name: rows, expression: "count()", atMost: 9}'


@pytest.mark.parametrize(
    "edit",
    [
        # the range shrunk to its good first hour (first/last keys and count changed with it)
        {"partition_keys": json.dumps([K0]), "last_key": K0},
        # the bad middle hour swapped for a good one: first key, last key and count unchanged
        {"partition_keys": json.dumps([K0, K0, K2])},
    ],
    ids=["shrunk", "middle-swapped"],
)
def test_a_soak_is_not_evaluated_over_partitions_a_catalog_row_names(tmp_path: Path, edit: dict) -> None:
    config = _config(tmp_path, ROWS_METRIC)
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", K0, K2, by="ana", name="r", clock=clock)
    clock.advance(300)
    sets = ", ".join(f"{column} = :{column}" for column in edit)
    write_catalog(base, (f"UPDATE rollouts SET {sets} WHERE name = 'r'", edit))
    [soaked] = operations.soak(config, base, clock=clock)
    # Nothing is evaluated (nor recorded as passing) over partitions the chain did not stage.
    assert "evaluation" not in soaked
    assert "disagrees with the production audit chain" in soaked["error"]
    write_catalog(
        base,
        (
            "UPDATE rollouts SET partition_keys = :k, last_key = :l WHERE name = 'r'",
            {"k": json.dumps([K0, K1, K2]), "l": K2},
        ),
    )
    [honest] = operations.soak(config, base, clock=clock)
    assert honest["evaluation"]["passed"] is False
    operations.decide(config, base, "r", "approve", key=CY, reason="soak said fine", clock=clock)
    with pytest.raises(Blocked) as blocked:
        operations.promote(config, base, "r", by="dee", clock=clock)
    assert any(r.startswith("soak failed: ") for r in blocked.value.document["reasons"])
    assert _production_commits(base) == 0


@pytest.mark.parametrize("middle", [K0, "../../../x"], ids=["middle-swapped", "outside-the-lake"])
def test_the_promotion_gate_reads_no_partition_a_catalog_row_names_in_the_middle(
    tmp_path: Path, middle: str
) -> None:
    """A row whose first and last keys and count are the chain's but whose middle key was swapped:
    the gate re-read the staging partitions the row lists (a key leading outside the lake raised
    OutsidePartition from the gate; another partition was checked in place of the staged one) and
    evaluated the row's keys for the decisions now. The row disagrees with the chain: the gate says
    so and stays closed, as the soak does."""
    config, base, clock = _approved_rollout(tmp_path)
    edit = {"k": json.dumps([K0, middle, K2])}
    write_catalog(base, ("UPDATE rollouts SET partition_keys = :k WHERE name = 'r'", edit))
    with operations.rollout_environments(config, base, "r") as (dataset, envs):
        gate = promotion.promotion_gate(config, dataset, envs, "r", clock=clock)
    assert not gate["open"]
    [reason] = gate["reasons"]
    assert reason.startswith("the catalog's rollout row disagrees with the production audit chain: ")
    assert f"its partition keys are not the range {K0} .. {K2} it staged" in reason
    with pytest.raises(Blocked) as blocked:
        operations.promote(config, base, "r", by="dee", clock=clock)
    assert blocked.value.document["reasons"] == [reason]
    assert _production_commits(base) == 0


def test_the_health_check_checks_the_range_the_chain_promoted_not_the_one_a_row_names(
    tmp_path: Path,
) -> None:
    config, base, clock = _approved_rollout(tmp_path)
    assert operations.promote(config, base, "r", by="dee", clock=clock)["status"] == "promoted"
    report = operations.health(config, base, "sessions", clock=clock)
    assert [(p["key"], p["status"]) for p in report["partitions"]] == [
        (K0, "healthy"),
        (K1, "healthy"),
        (K2, "healthy"),
    ]
    # Production loses its last partition, and the rollout's row is edited to end before it.
    [manifest] = [m for m in (base.home / "lake").rglob("_manifest.json") if K2 in str(m)]
    manifest.unlink()
    write_catalog(
        base,
        (
            "UPDATE rollouts SET partition_keys = :k, last_key = :l WHERE name = 'r'",
            {"k": json.dumps([K0, K1]), "l": K1},
        ),
    )
    report = operations.health(config, base, "sessions", clock=clock)
    assert report["status"] == "unhealthy"
    assert [(p["key"], p["status"]) for p in report["partitions"]] == [
        (K0, "healthy"),
        (K1, "healthy"),
        (K2, "missing"),
    ]


def test_a_rejection_recorded_while_a_promotion_writes_stops_it(tmp_path: Path) -> None:
    config, base, clock = _approved_rollout(tmp_path)
    rejected: list[str] = []

    def reject_once(_count: int) -> None:  # the approver rejects while production is being written
        if not rejected:
            clock.advance(1)
            decided = operations.decide(
                config, base, "r", "reject", key=CY, reason="wrong numbers", clock=clock
            )
            rejected.append(decided["decision"])

    with operations.rollout_environments(config, base, "r") as (dataset, envs):
        with pytest.raises(Blocked) as blocked:
            promotion.promote_rollout(config, dataset, envs, "r", by="dee", clock=clock, progress=reject_once)
        assert rejected == ["rejected"]
        assert blocked.value.document["status"] == "stopped"
        assert "no longer an approval" in blocked.value.document["reasons"][0]
        chain = envs.production.audit.backup.read_chain("sessions/v1")
        assert lifecycle(chain, "r").status == "soaking"  # never promoted
        assert "rollout_promoted" not in [e["event_type"] for e in chain]
        assert envs.store.require("r")["status"] == "soaking"
        assert blocked.value.document["written"] == [K0]  # nothing after the rejection
    assert _production_commits(base) == 1


def test_a_rejection_appended_just_before_rollout_promoted_stops_the_promotion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promotion read the chain a last time, then appended `rollout_promoted`: a rejection appended
    in between was ignored (the rollout promoted against it). The hook appends the rejection at the
    latest moment it can: when `rollout_promoted` is about to be appended, every re-reading done.
    That last reading is now made under the chain's writer lock, in the append itself."""
    from pcbo_dagster.core.rollout_lifecycle import ROLLOUT_PROMOTED

    config, base, clock = _approved_rollout(tmp_path)
    append_event = promotion.append_event
    rejected: list[str] = []

    def reject_first(envs, rollout, event_type, body, precondition=None):
        if event_type == ROLLOUT_PROMOTED and not rejected:
            clock.advance(1)
            decided = operations.decide(config, base, "r", "reject", key=CY, reason="stop", clock=clock)
            rejected.append(decided["decision"])
        return append_event(envs, rollout, event_type, body, precondition)

    monkeypatch.setattr(promotion, "append_event", reject_first)
    with pytest.raises(Blocked) as blocked:
        operations.promote(config, base, "r", by="dee", clock=clock)
    assert rejected == ["rejected"]
    assert blocked.value.document["status"] == "stopped"
    assert "no longer an approval" in blocked.value.document["reasons"][0]
    assert blocked.value.document["written"] == [K0, K1, K2]
    with operations.rollout_environments(config, base, "r") as (_, envs):
        chain = envs.production.audit.backup.read_chain("sessions/v1")
        assert [e["event_type"] for e in chain][-1] == "rollout_rejected"  # and no rollout_promoted
        assert lifecycle(chain, "r").status == "soaking"
        assert envs.store.require("r")["status"] == "soaking"
        assert envs.store.history("r")[-1]["kind"] == "promotion_stopped"


class _EditingClock(ManualClock):
    """The rollout clock, and someone who writes the production catalog while the staging apply
    waits for its throttle (a statement run once, at the first wait)."""

    def __init__(self, start: datetime, base: Settings, statement: tuple[str, dict]) -> None:
        super().__init__(start)
        self.base, self.statement, self.done = base, statement, False

    def sleep(self, seconds: float) -> None:
        if not self.done:
            self.done = True
            write_catalog(self.base, self.statement)
        super().sleep(seconds)


def test_a_soak_window_edited_in_the_row_before_staging_ends_is_not_what_the_chain_records(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    edit: tuple[str, dict] = ("UPDATE rollouts SET soak_window_seconds = 0 WHERE name = 'r'", {})
    clock = _EditingClock(T0, base, edit)
    throttle = {"partitionsPerMinute": 60}
    operations.start(config, base, "sessions", K0, K2, by="ana", name="r", clock=clock, throttle=throttle)
    assert clock.done
    with operations.rollout_environments(config, base, "r") as (_, envs):
        chain = envs.production.audit.backup.read_chain("sessions/v1")
        [staged] = [e for e in chain if e["event_type"] == "rollout_staged"]
        assert staged["soak_window_seconds"] == 300  # the config's 5 minutes, not the row's 0
        assert envs.store.require("r")["soak_window_seconds"] == 300
    # One evaluation right after staging does not pass the soak.
    [soaked] = operations.soak(config, base, clock=clock)
    assert soaked["status"]["state"] == "soaking", soaked["status"]
    operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    with pytest.raises(Blocked) as blocked:
        operations.promote(config, base, "r", by="dee", clock=clock)
    assert any(r.startswith("soak soaking: ") for r in blocked.value.document["reasons"])
    assert _production_commits(base) == 0


@pytest.mark.parametrize(
    ("variable", "store"),
    [
        ("PCBO_STAGING_HOME", "home"),  # the whole staging environment is production's
        ("PCBO_STAGING_LAKE_URL", "lake"),
        ("PCBO_STAGING_CATALOG_URL", "catalog"),
        ("PCBO_STAGING_AUDIT_DIR", "pas"),
    ],
)
def test_a_staging_environment_that_is_production_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, store: str
) -> None:
    config = _config(tmp_path)
    home = tmp_path / "home"
    value = {
        "home": str(home),
        "lake": f"file://{home}/lake/",
        "catalog": f"sqlite:///{home}/../home/catalog.db",
        "pas": str(home / "pas"),
    }[store]
    monkeypatch.setenv(variable, value)
    base = Settings.resolve(home=str(home), env={})
    with pytest.raises(InvalidInput) as refused:
        operations.start(config, base, "sessions", K0, K2, by="ana", name="r", clock=ManualClock(T0))
    assert refused.value.field == variable
    assert "is production's" in refused.value.message
    assert _production_commits(base) == 0
    assert not (home / "catalog.db").exists()  # no rollout row either


@pytest.mark.parametrize(
    ("variable", "where"),
    [
        ("PCBO_STAGING_LAKE_URL", "lake/sessions/v1"),  # inside production's lake
        ("PCBO_STAGING_LAKE_URL", "lake/sessions/v1/20240101T000000Z"),  # inside a production partition
        ("PCBO_STAGING_AUDIT_DIR", "pas/sessions"),  # inside production's audit backup
        ("PCBO_STAGING_LAKE_URL", ""),  # production's lake inside it (the home holds `lake/`)
    ],
)
def test_a_staging_store_inside_productions_or_holding_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, where: str
) -> None:
    """A staging lake or audit backup nested in production's (or holding it) shares its files: staging's
    commit points are `lake_path_unexpected` to production's verify (and production's to staging's),
    which then fails for as long as the rollout lives. Refused naming the variable, nothing written."""
    config = _config(tmp_path)
    home = tmp_path / "home"
    monkeypatch.setenv(variable, str(home / where) if where else str(home))
    base = Settings.resolve(home=str(home), env={})
    with pytest.raises(InvalidInput) as refused:
        operations.start(config, base, "sessions", K0, K2, by="ana", name="r", clock=ManualClock(T0))
    assert refused.value.field == variable
    assert "production's" in refused.value.message
    assert _production_commits(base) == 0
    assert not (home / "catalog.db").exists()  # no rollout row either


def test_a_soaking_rollouts_row_deleted_does_not_let_its_name_stage_another_range(tmp_path: Path) -> None:
    """The row of a soaking rollout deleted by hand, its name started again over another range: the
    chain already staged that name over its own range, so the apply is refused (exit 2 on `rollout`)
    before anything is written; no second `rollout_staged` over another range (it made the rollout's
    range, decision hash and soak window move mid-soak, and `verify` said nothing)."""
    config = _config(tmp_path)
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", K1, K2, by="ana", name="r", clock=clock)
    write_catalog(base, ("DELETE FROM rollouts WHERE name = 'r'", {}))
    clock.advance(60)
    with pytest.raises(InvalidInput) as refused:
        operations.start(config, base, "sessions", K0, K2, by="ana", name="r", clock=clock)
    assert refused.value.field == "rollout"
    assert f"{K1}..{K2}" in refused.value.message
    with operations.dataset_environments(config, config.dataset("sessions"), base) as envs:
        assert envs.store.get("r") is None  # nothing written: no row over the other range
        chain = envs.production.audit.backup.read_chain("sessions/v1")
        assert [e["rollout"]["first_key"] for e in chain if e["event_type"] == "rollout_staged"] == [K1]
        assert read_commit_point(envs.staging.lake, "sessions", "v1", K0).manifest is None
    # The same range again (a crash between the chain and the catalog) is still picked up.
    again = operations.start(config, base, "sessions", K1, K2, by="ana", name="r", clock=clock)
    assert again["status"] == "soaking"


def test_a_rollout_rollback_undoes_every_partition_the_chain_staged_not_only_those_a_row_names(
    tmp_path: Path,
) -> None:
    config, base, clock = _approved_rollout(tmp_path)
    operations.promote(config, base, "r", by="dee", clock=clock)
    assert _production_commits(base) == 3
    write_catalog(
        base,
        (
            "UPDATE rollouts SET partition_keys = :k, last_key = :l WHERE name = 'r'",
            {"k": json.dumps([K0, K1]), "l": K1},
        ),
    )
    done = operations.rollback(config, base, "production", by="ops", reason="bad data", name="r", clock=clock)
    assert done["rolledBack"] == 3 and done["rolloutStatus"] == "rolled_back"
    assert [p["key"] for p in done["partitions"]] == [K0, K1, K2]
    with operations.rollout_environments(config, base, "r") as (dataset, envs):
        assert lifecycle(envs.production.audit.backup.read_chain("sessions/v1"), "r").status == "rolled_back"
        for key in (K0, K1, K2):  # production holds none of the rolled-back rollout's versions
            assert read_commit_point(envs.production.lake, "sessions", "v1", key).manifest is None


def test_staging_on_many_hosts_must_be_shared_as_production_is(tmp_path: Path) -> None:
    """With PCBO_MULTI_HOST, staging's stores left at their host-local defaults would give each worker
    its own staging chain on its own disk (lost with the container, and promotion reading whichever
    host it lands on): each is refused naming its PCBO_STAGING_* variable, until all are shared."""
    from pcbo_dagster.rollout.environments import staging_settings

    production = Settings.resolve(
        home=str(tmp_path / "home"),
        env={
            "PCBO_MULTI_HOST": "true",
            "PCBO_CATALOG_URL": "postgresql://pcbo@db.internal/pcbo",
            "PCBO_LAKE_URL": "s3://bucket/lake",
            "PCBO_AUDIT_DIR": "s3://bucket/pas",
        },
    )
    environ: dict[str, str] = {}
    for variable, value in (
        ("PCBO_STAGING_CATALOG_URL", "postgresql://pcbo@db.internal/pcbo_staging"),
        ("PCBO_STAGING_AUDIT_DIR", "s3://bucket/staging-pas"),
        ("PCBO_STAGING_LAKE_URL", "s3://bucket/staging-lake"),
    ):
        with pytest.raises(InvalidInput) as refused:
            staging_settings(production, environ=environ)
        assert refused.value.field == variable, refused.value
        assert refused.value.message.startswith("staging: ")
        assert staging_settings(production, environ=environ, checked=False).multi_host
        environ[variable] = value
    staging = staging_settings(production, environ=environ)
    assert staging.multi_host and staging.lake_url == "s3://bucket/staging-lake"
    # one host: the staging defaults under $PCBO_HOME/staging stand
    alone = staging_settings(Settings.resolve(home=str(tmp_path / "one"), env={}), environ={})
    assert not alone.multi_host and alone.lake_url.endswith("one/staging/lake")


def _applying_rollout(tmp_path: Path, rate: float) -> tuple[DatasetsConfig, Settings, ManualClock]:
    """A config throttled to 1 partition a minute and its rollout `r` (K0..K2) as an apply that died
    before its first partition left it: `applying`, its row's throttle `rate` partitions a minute."""
    config = _config(tmp_path, throttle="{partitionsPerMinute: 1}")
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    dataset = operations.rollout_dataset(config, "sessions")
    with operations.dataset_environments(config, dataset, base) as envs:
        envs.store.create_rollout(
            name="r",
            dataset="sessions",
            version_label="v1",
            partition_keys=[K0, K1, K2],
            throttle={"partitionsPerMinute": rate, "recordsPerMinute": None},
            soak_window_seconds=300,
            actor="ana",
            now=T0,
        )
    return config, base, clock


@pytest.mark.parametrize(
    "forged",
    [
        "{}",
        '{"partitionsPerMinute": -1}',
        '{"partitionsPerMinute": 0}',
        '{"partitionsPerMinute": NaN}',
        '{"partitionsPerMinute": "1"}',
        '{"partitionsPerMinute": 1000000}',
        '{"partitionsPerMinute": 1, "recordsPerMinute": -5}',
    ],
    ids=["none", "negative", "zero", "nan", "text", "huge", "negative-records"],
)
def test_a_throttle_written_into_a_rollouts_row_never_loosens_the_configured_one(
    tmp_path: Path, forged: str
) -> None:
    """Red-team finding: a staging apply run again over its rollout (its process died, or the run was
    interrupted) paced itself by the `throttle` its catalog row holds. Someone who writes the catalog
    turned the throttle off (`{}`, a negative or NaN rate, a huge one), or stopped the apply with a
    ZeroDivisionError (0) or a TypeError (text). Now the row's limits count only where they are valid
    and stricter than the config's (with this run's override): the config's 1 partition a minute
    holds."""
    config, base, clock = _applying_rollout(tmp_path, 1.0)
    write_catalog(base, ("UPDATE rollouts SET throttle = :t WHERE name = 'r'", {"t": forged}))
    logged: list[str] = []
    result = operations.start(
        config, base, "sessions", K0, K2, by="ana", name="r", clock=clock, log=logged.append
    )
    assert result["status"] == "soaking"
    assert result["execute"]["throttle"] == {"describe": "1 partitions/min", "waitedSeconds": 120.0}
    assert clock.now() == T0 + timedelta(seconds=120)


def test_a_stricter_throttle_in_the_row_is_kept_when_the_apply_runs_again(tmp_path: Path) -> None:
    """What the row holds that is valid and stricter (the start's override of 0.5 a minute) still
    paces an apply run again without one."""
    config, base, clock = _applying_rollout(tmp_path, 0.5)
    result = operations.start(config, base, "sessions", K0, K2, by="ana", name="r", clock=clock)
    assert result["execute"]["throttle"] == {"describe": "0.5 partitions/min", "waitedSeconds": 240.0}


def test_an_override_given_when_an_apply_runs_again_applies_and_is_recorded(tmp_path: Path) -> None:
    """An override given with an apply run again over an `applying` rollout (its process died: no
    sensor marked it interrupted) paces the rest and is recorded (`throttle_changed`), as for an
    interrupted one; it used to be ignored (the row's throttle paced it)."""
    config, base, clock = _applying_rollout(tmp_path, 1.0)
    result = operations.start(
        config, base, "sessions", K0, K2, by="ana", name="r", clock=clock, throttle={"partitionsPerMinute": 2}
    )
    assert result["execute"]["throttle"] == {"describe": "2 partitions/min", "waitedSeconds": 60.0}
    with operations.rollout_environments(config, base, "r") as (_, envs):
        assert envs.store.require("r")["throttle"]["partitionsPerMinute"] == 2
        assert "throttle_changed" in [h["kind"] for h in envs.store.history("r")]


@pytest.mark.parametrize(
    ("metric", "throttle", "field"),
    [
        (
            'businessMetric: {name: rows, expression: "count()", atLeast: .nan}',
            "{}",
            "businessMetric.atLeast",
        ),
        ('businessMetric: {name: rows, expression: "count()", atMost: .inf}', "{}", "businessMetric.atMost"),
        ("", "{partitionsPerMinute: .nan}", "throttle.partitionsPerMinute"),
        ("", "{recordsPerMinute: -.inf}", "throttle.recordsPerMinute"),
    ],
)
def test_a_rollout_limit_that_is_not_a_finite_number_is_refused_naming_it(
    tmp_path: Path, metric: str, throttle: str, field: str
) -> None:
    """A baseline of NaN or an infinity was accepted (a bound no value meets, or every value does); a
    NaN rate was refused as "less than or equal to 1000000"."""
    with pytest.raises(InvalidInput) as refused:
        _config(tmp_path, metric, throttle)
    assert refused.value.field.endswith(field), refused.value.field
    assert "finite number" in refused.value.message

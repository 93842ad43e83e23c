"""The soak monitor: the business-metric language, and soak evaluations of a real staging output."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from pcbo_dagster.catalog.rollouts import RolloutRow
from pcbo_dagster.core.business_metric import parse_metric
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.datasets.config import parse_datasets_config
from pcbo_dagster.datasets.requests import evaluate_keys
from pcbo_dagster.engine.execute import check_gates, execute
from pcbo_dagster.engine.partition_reading import PartitionReading
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.lake import layout, manifests
from pcbo_dagster.rollout.environments import dataset_settings, open_environments
from pcbo_dagster.rollout.lifecycle import production_chain, record_staged
from pcbo_dagster.rollout.soak import (
    _duplicate_check,
    evaluate_soak,
    run_soak_monitor,
    soak_due,
    soak_status,
    write_soak_report,
)
from pcbo_dagster_tests.catalog_writer import write_catalog

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=30)
KEYS = ["20240101T000000Z", "20240101T010000Z", "20240101T020000Z"]


# --- the business metric language --------------------------------------------------------------------


def _table() -> pa.Table:
    return pa.table(
        {
            "converted": [True, False, True, None],
            "amount": [10, 20, 30, 40],
            "status": ["paid", "open", "paid", None],
            "customer-id": ["a", "b", "a", "c"],
        }
    )


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("mean(converted)", 2 / 3),  # a boolean counts as 0/1, a null is skipped
        ("count()", 4),
        ("count(converted)", 2),  # rows where the condition is true
        ("count(amount)", 4),  # non-null values
        ('count(status == "paid") / count()', 0.5),
        ("count(status != 'paid')", 1),  # null compares as null: not counted
        ("sum(amount) / count(amount > 15)", 100 / 3),
        ("max(amount) - min(amount)", 30),
        ('distinct(col("customer-id"))', 3),
        ("count(10 < amount <= 30)", 2),
        ("count(not converted or amount >= 40)", 2),
        ("mean(converted == 1)", 2 / 3),
        ("-mean(amount) * 2 + (1 + 1) / 4", -49.5),
        ("sum(amount / 10 * 2)", 20),
        ("mean(-amount)", -25),
        ("sum(True)", 4),
    ],
)
def test_metric_values(expression: str, expected: float) -> None:
    assert parse_metric(expression).evaluate(_table()) == pytest.approx(expected)


def test_metric_columns_and_no_value() -> None:
    metric = parse_metric('count(status == "paid" and converted) / count(col("customer-id"))')
    assert metric.columns == ("status", "converted", "customer-id")
    table = _table()
    # Division by zero, between aggregates: no value (the metric does not hold).
    assert parse_metric("count() / count(amount > 100)").evaluate(table) is None
    # ... and per row: those rows have no value, the aggregate skips them.
    assert parse_metric("sum(amount / 0)").evaluate(table) == 0
    assert parse_metric("mean(amount / 0)").evaluate(table) is None
    empty = table.slice(0, 0)
    assert parse_metric("mean(converted)").evaluate(empty) is None
    assert parse_metric("max(amount)").evaluate(empty) is None
    assert parse_metric("count()").evaluate(empty) == 0
    assert parse_metric("count(converted) / count()").evaluate(empty) is None
    assert "divides by zero" in (
        parse_metric("count() / count(amount > 100)").explain_unavailable(table) or ""
    )


def test_metric_evaluation_errors_name_the_column() -> None:
    with pytest.raises(ValueError, match="unknown column 'revenue'"):
        parse_metric("sum(revenue) / count()").evaluate(_table())
    with pytest.raises(ValueError, match="status is string, not a number"):
        parse_metric("sum(status)").evaluate(_table())
    with pytest.raises(ValueError, match="cannot compare status"):
        parse_metric("count(status > 1)").evaluate(_table())
    with pytest.raises(ValueError, match="needs conditions: amount is int64"):
        parse_metric("count(amount and converted)").evaluate(_table())


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("converted", "column 'converted' must be inside an aggregate"),
        ("mean(x) + amount", "column 'amount' must be inside an aggregate"),
        ('col("x")', "must be inside an aggregate"),
        ("median(x)", "unknown function median()"),
        ("__import__('os').system('true')", "only the functions"),
        ("open('f')", "unknown function open()"),
        ("mean(x.real)", "attributes are not allowed"),
        ("mean(x[0])", "subscripts are not allowed"),
        ("mean(", "not a valid expression"),
        ("mean(x) mean(y)", "not a valid expression"),
        ("x = 1", "not a valid expression"),
        ("", "the expression is empty"),
        ("mean(x) >= 0.9", "is a condition, not a number"),
        ("mean(x) and 1", "is a condition, not a number"),
        ("'text'", "not a number"),
        ("True", "not a number"),
        ("mean(x, y)", "takes exactly one argument"),
        ("sum()", "takes exactly one argument"),
        ("count(x, y)", "takes no argument or one"),
        ("mean(x=1)", "no keyword arguments"),
        ("mean(mean(x))", "aggregates cannot be nested"),
        ("mean(x ** 2)", "operator ** is not supported"),
        ("mean(x % 2)", "operator % is not supported"),
        ("count(x in y)", "comparison in is not supported"),
        ("mean('a')", "needs numbers, not the string"),
        ("count(x == 'a' + 1)", "+ needs numbers"),
        ("count(x and 1)", "`and` needs conditions"),
        ("count(x == 'a' < 2)", "a string and a number"),
        ("mean(None)", "literal None is not supported"),
        ("mean(x if y else z)", "is not allowed"),
        ("mean([x])", "is not allowed"),
        ("(lambda: 1)()", "only the functions"),
        ("mean(col(x))", "col() takes one string"),
        ("-" * 200 + "mean(x)", "nested more than"),
    ],
)
def test_metric_refused(expression: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_metric(expression)
    assert message in str(info.value)


def test_config_refuses_a_bad_metric(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_datasets_config(_config_text(expression="mean(converted) > 0.5"), tmp_path)
    assert info.value.field == "datasets[0].rollout.businessMetric.expression"
    assert "condition, not a number" in str(info.value)


# --- soak over a real staging output ------------------------------------------------------------------


def _records() -> list[dict]:
    records = []
    for hour in range(3):
        for n in range(5):
            number = hour * 5 + n
            records.append(
                {
                    "id": f"ses-{number:03d}",
                    "occurredAt": f"2024-01-01T{hour:02d}:{10 * n + 5:02d}:00Z",
                    "jurisdiction": "DE" if number == 7 else "US" if n % 2 else "CA",
                    "consentGranted": number != 3,
                    "converted": number % 5 != 4,  # 80% of the rows
                    "pages": 1 + number % 4,
                }
            )
    return records


def _write_source(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _config_text(expression: str = "mean(converted)", at_least: float = 0.7, existing: str = "[]") -> str:
    return f"""
version: 1
datasets:
  - name: sessions
    partitioning: {{kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z",
                   end: "2024-01-01T03:00:00Z"}}
    source: {{uri: sessions.jsonl, format: jsonl}}
    policies: {{requireConsent: true, allowedJurisdictions: [US, CA], onViolation: omit}}
    existingTargetIds: {existing}
    rollout:
      soak: {{windowMinutes: 30}}
      businessMetric: {{name: conversion_rate, expression: "{expression}", atLeast: {at_least}}}
"""


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.delenv("PCBO_REPORTS_DIR", raising=False)
    _write_source(tmp_path / "sessions.jsonl", _records())
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    return {"tmp": tmp_path, "base": base, "config": _config(tmp_path)}


def _config(tmp_path: Path, **kwargs: object):
    return parse_datasets_config(_config_text(**kwargs), tmp_path)  # type: ignore[arg-type]


def _stage(world: dict, name: str = "r1") -> RolloutRow:
    """Apply the rollout's keys to staging and record the rollout as soaking since T0."""
    config = world["config"]
    dataset = config.dataset("sessions")
    run_id = f"rollout-{name}-staging"
    with open_environments(dataset_settings(config, dataset, world["base"], environ={})) as envs:
        loaded, plan, decisions = evaluate_keys(config, dataset, KEYS, run_id)
        check_gates(loaded, decisions)
        outcome = execute(envs.staging, loaded, plan, decisions)
        assert outcome["status"] in ("committed", "unchanged")  # a second rollout of the same range
        envs.store.create_rollout(
            name=name,
            dataset="sessions",
            version_label="v1",
            partition_keys=KEYS,
            throttle={},
            soak_window_seconds=int(WINDOW.total_seconds()),
            actor="tester",
            now=T0 - timedelta(minutes=5),
        )
        assert soak_status(envs, envs.store.require(name), T0)["state"] == "not_started"
        record_staged(  # what the staging apply records: on the production chain, then the row
            envs,
            name,
            decision_hash=decisions.decision_hash,
            plan_hash=plan.plan_hash,
            staging_run_id=run_id,
            staged_at=T0,
            soak_window_seconds=int(WINDOW.total_seconds()),
        )
        world["staging_lake"] = Path(envs.staging.settings.lake_url)
        world["decided"] = {pd.partition.key: list(pd.add) for pd in decisions.partitions}
        return envs.store.require(name)


def _evaluate(world: dict, at: datetime, name: str = "r1", config=None) -> tuple[dict, dict]:
    config = config or world["config"]
    dataset = config.dataset("sessions")
    with open_environments(dataset_settings(config, dataset, world["base"], environ={})) as envs:
        rollout = envs.store.require(name)
        evaluation = evaluate_soak(config, dataset, envs, rollout, at)
        return evaluation, soak_status(envs, rollout, at)


def _status(world: dict, at: datetime, name: str = "r1") -> dict:
    dataset = world["config"].dataset("sessions")
    with open_environments(dataset_settings(world["config"], dataset, world["base"], environ={})) as envs:
        return soak_status(envs, envs.store.require(name), at)


def test_all_passing_soak_passes_only_after_the_window(world: dict) -> None:
    rollout = _stage(world)
    # ids 3 (no consent) and 7 (DE) are omitted by the policies: 13 rows in staging.
    assert sum(map(len, world["decided"].values())) == 13

    evaluation, status = _evaluate(world, T0 + timedelta(minutes=10))
    detail = evaluation["detail"]
    assert evaluation["passed"] is True, detail["failed_checks"]
    assert list(detail["checks"]) == [
        "policy_violations",
        "duplicate_ids",
        "rows_match_decisions",
        "checksums",
        "business_metric",
    ]
    assert all(c["passed"] for c in detail["checks"].values())
    assert detail["checks"]["rows_match_decisions"]["observed"] == 0
    assert detail["checks"]["rows_match_decisions"]["decided_rows"] == 13
    assert detail["checks"]["business_metric"]["observed"] == pytest.approx(10 / 13)
    assert detail["checks"]["business_metric"]["expected"] == {"atLeast": 0.7, "atMost": None}
    assert detail["decision_hash_now"] == rollout["decision_hash"]
    assert detail["decision_hash_changed"] is False
    assert detail["rows"] == 13
    assert status["state"] == "soaking"
    assert status["reason"] == "window ends at 2024-06-01T12:30:00Z, 1 evaluation(s) so far, all passing"
    assert status["window_ends_at"] == "2024-06-01T12:30:00Z"

    # The window is over but no evaluation was made after its end: still soaking.
    late = _status(world, T0 + timedelta(minutes=45))
    assert late["state"] == "soaking"
    assert "waiting for an evaluation at or after it" in late["reason"]

    # An evaluation exactly at the window's end: passed (at that moment, not before).
    evaluation, status = _evaluate(world, T0 + WINDOW)
    assert evaluation["passed"] is True
    assert status["state"] == "passed"
    assert status["evaluations"] == 2 and status["failed_evaluations"] == 0
    assert _status(world, T0 + WINDOW - timedelta(seconds=1))["state"] == "soaking"


def test_tampered_staging_file_fails_checksums(world: dict) -> None:
    _stage(world)
    assert _evaluate(world, T0 + timedelta(minutes=5))[0]["passed"] is True
    manifest = manifests.decode(
        (world["staging_lake"] / layout.manifest("sessions", "v1", KEYS[1])).read_bytes()
    )
    data_file = world["staging_lake"] / manifest["files"][0]["path"]
    blob = bytearray(data_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data_file.write_bytes(bytes(blob))

    evaluation, status = _evaluate(world, T0 + timedelta(minutes=15))
    checks = evaluation["detail"]["checks"]
    assert evaluation["passed"] is False
    assert checks["checksums"]["passed"] is False
    assert checks["checksums"]["observed"] >= 1
    [entry] = checks["checksums"]["partitions"]
    assert entry["key"] == KEYS[1]
    assert "file_checksum_mismatch" in {f["kind"] for f in entry["findings"]}
    assert status["state"] == "failed"
    assert "2024-06-01T12:15:00Z failed" in status["reason"] and "checksums" in status["reason"]
    # A later passing-looking moment does not undo a failure.
    assert _status(world, T0 + timedelta(hours=2))["state"] == "failed"


def test_a_soak_failed_for_good_is_not_evaluated_again(world: dict) -> None:
    """One failing evaluation fails a soak for good, yet every monitor tick evaluated it again and
    appended another `rollout_soak_evaluated` to the production chain (every 15 minutes, for ever).
    What stops it is the chain's failure: a catalog row saying the soak failed stops nothing, and
    deleting the failing rows resumes nothing."""
    import sqlite3

    world["config"] = _config(world["tmp"], at_least=0.9)  # the output has 10/13 converted
    config, base = world["config"], world["base"]
    dataset = config.dataset("sessions")
    _stage(world)

    def chain_and_rows() -> tuple[int, int]:
        with open_environments(dataset_settings(config, dataset, base, environ={})) as envs:
            rollout = envs.store.require("r1")
            return len(production_chain(envs, rollout)), len(envs.store.soak_evaluations("r1"))

    with open_environments(dataset_settings(config, dataset, base, environ={})) as envs:
        # The catalog alone says the soak failed: the chain does not, so it is still evaluated.
        envs.store.record_soak_evaluation("r1", False, {"checks": {}}, now=T0)
    assert soak_due(config, base, T0 + timedelta(minutes=1), environ={}) == (["r1"], [])
    [first] = run_soak_monitor(config, base, T0 + timedelta(minutes=1), environ={})
    assert first["evaluation"]["passed"] is False and first["status"]["state"] == "failed"
    before = chain_and_rows()

    with sqlite3.connect(base.home / "catalog.db") as conn:  # the failing rows deleted, guard and all
        guards = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'soak_evaluations'"
        ).fetchall()
        for (guard,) in guards:
            conn.execute(f'DROP TRIGGER "{guard}"')
        conn.execute("DELETE FROM soak_evaluations WHERE rollout = 'r1'")
    for minutes in (16, 31, 24 * 60):
        [later] = run_soak_monitor(config, base, T0 + timedelta(minutes=minutes), environ={})
        assert set(later) == {"rollout", "dataset", "skipped"}, later
        assert later["skipped"].startswith("the soak failed for good by the production audit chain")
        assert "business_metric" in later["skipped"] and "start a new rollout" in later["skipped"]
        assert soak_due(config, base, T0 + timedelta(minutes=minutes), environ={}) == ([], [later])
    assert chain_and_rows() == (before[0], before[1] - 2)  # nothing appended, nothing recorded
    with pytest.raises(InvalidInput) as info:
        _evaluate(world, T0 + timedelta(hours=2))
    assert info.value.field == "rollout" and "failed for good" in info.value.message
    assert chain_and_rows()[0] == before[0]


def test_a_rollout_named_by_a_row_writes_no_report_outside_the_reports_directory(world: dict) -> None:
    """A rollout row named `../../escape` and its `rollout_staged` event (what someone who can write
    the catalog and the audit backup makes, no operator key set): the soak evaluated it and wrote
    its report to `reports/rollouts/../../escape/`, i.e. `$PCBO_HOME/escape/soak_report.json`,
    outside the reports directory. Such a name is refused before anything is evaluated or written."""
    _stage(world, "r1")
    config, base = world["config"], world["base"]
    dataset = config.dataset("sessions")
    evil = "../../escape"
    with open_environments(dataset_settings(config, dataset, base, environ={})) as envs:
        staged = envs.store.require("r1")
        envs.store.create_rollout(
            name=evil,
            dataset="sessions",
            version_label="v1",
            partition_keys=KEYS,
            throttle={},
            soak_window_seconds=int(WINDOW.total_seconds()),
            actor="mallory",
            now=T0,
        )
        record_staged(
            envs,
            evil,
            decision_hash=str(staged["decision_hash"]),
            plan_hash=str(staged["plan_hash"]),
            staging_run_id="rollout-r1-staging",
            staged_at=T0,
            soak_window_seconds=int(WINDOW.total_seconds()),
        )
        chain_length = len(production_chain(envs, staged))
    results = {r["rollout"]: r for r in run_soak_monitor(config, base, T0 + WINDOW, environ={})}
    assert results["r1"]["status"]["state"] == "passed"
    assert "cannot name a rollout" in results[evil]["error"], results[evil]
    assert sorted(p.relative_to(base.home) for p in base.home.rglob("soak_report.*")) == [
        Path("reports/rollouts/r1/soak_report.json"),
        Path("reports/rollouts/r1/soak_report.md"),
    ]
    with open_environments(dataset_settings(config, dataset, base, environ={})) as envs:
        assert len(production_chain(envs, staged)) == chain_length + 1  # r1's evaluation alone
        assert envs.store.soak_evaluations(evil) == []


def test_metric_below_baseline_fails(world: dict) -> None:
    world["config"] = _config(world["tmp"], at_least=0.85)
    _stage(world)
    evaluation, status = _evaluate(world, T0 + timedelta(minutes=31))
    metric = evaluation["detail"]["checks"]["business_metric"]
    assert evaluation["detail"]["failed_checks"] == ["business_metric"]
    assert metric["passed"] is False
    assert metric["observed"] == pytest.approx(10 / 13)
    assert metric["message"] == "conversion_rate = mean(converted) = 0.769231, expected >= 0.85"
    assert status["state"] == "failed"
    assert "business_metric: conversion_rate" in status["reason"]


def test_metric_without_value_fails(world: dict) -> None:
    world["config"] = _config(world["tmp"], expression="count() / count(pages > 100)", at_least=0)
    _stage(world)
    evaluation, _ = _evaluate(world, T0 + timedelta(minutes=1))
    metric = evaluation["detail"]["checks"]["business_metric"]
    assert metric["passed"] is False and metric["observed"] is None
    assert "divides by zero" in metric["message"]


def test_changed_source_shows_in_decision_hash_and_fails_when_ids_change(world: dict) -> None:
    rollout = _stage(world)
    records = _records()
    source = world["tmp"] / "sessions.jsonl"

    # A record outside the rollout's window: the decision hash changes, the decided ids do not.
    _write_source(source, records + [{**records[0], "id": "ses-999", "occurredAt": "2024-02-01T00:00:00Z"}])
    evaluation, status = _evaluate(world, T0 + timedelta(minutes=5))
    detail = evaluation["detail"]
    assert detail["decision_hash_now"] != rollout["decision_hash"]
    assert detail["decision_hash_changed"] is True
    assert detail["checks"]["rows_match_decisions"]["passed"] is True
    assert evaluation["passed"] is True and status["state"] == "soaking"

    # A record's consent withdrawn and a new one in the window: the ids change.
    changed = [{**r, "consentGranted": False} if r["id"] == "ses-001" else r for r in records]
    changed.append({**records[0], "id": "ses-100", "occurredAt": "2024-01-01T02:59:00Z"})
    _write_source(source, changed)
    evaluation, status = _evaluate(world, T0 + timedelta(minutes=10))
    check = evaluation["detail"]["checks"]["rows_match_decisions"]
    assert evaluation["passed"] is False and check["passed"] is False
    assert check["observed"] == 2
    by_key = {e["key"]: e["findings"] for e in check["partitions"]}
    assert by_key[KEYS[0]] == [{"kind": "unexpected_rows", "count": 1, "ids": ["ses-001"]}]
    assert by_key[KEYS[2]] == [{"kind": "missing_rows", "count": 1, "ids": ["ses-100"]}]
    assert status["state"] == "failed" and "rows_match_decisions" in status["reason"]


def test_missing_partition_and_existing_ids_fail(world: dict) -> None:
    _stage(world)
    (world["staging_lake"] / layout.manifest("sessions", "v1", KEYS[2])).unlink()
    # ses-000 is now listed as already present in the target: its row breaks a policy.
    config = _config(world["tmp"], existing="[ses-000]")
    evaluation, _ = _evaluate(world, T0 + timedelta(minutes=1), config=config)
    checks = evaluation["detail"]["checks"]
    assert checks["policy_violations"]["observed"] == 1
    [entry] = checks["policy_violations"]["partitions"]
    assert entry["findings"] == [{"id": "ses-000", "reasons": ["ALREADY_PRESENT"]}]
    findings = {e["key"]: e["findings"] for e in checks["rows_match_decisions"]["partitions"]}
    assert findings[KEYS[2]][0]["kind"] == "not_committed"
    assert findings[KEYS[0]] == [{"kind": "unexpected_rows", "count": 1, "ids": ["ses-000"]}]
    assert checks["checksums"]["passed"] is True  # nothing committed to re-read there


def test_duplicate_ids_across_partitions() -> None:
    readings = {
        "a": PartitionReading("a/_manifest.json", ids=["x", "y"]),
        "b": PartitionReading("b/_manifest.json", ids=["y", "z"]),
        "c": PartitionReading("c/_manifest.json", ids=["w"]),
    }
    check = _duplicate_check(readings)
    assert check["passed"] is False and check["observed"] == 1
    assert [e["key"] for e in check["partitions"]] == ["a", "b"]
    assert check["partitions"][0]["findings"] == [{"id": "y", "rows": 2, "partitions": ["a", "b"]}]


def test_monitor_writes_reports_listing_every_evaluation(world: dict) -> None:
    _stage(world, "r1")
    _stage(world, "r2")
    with open_environments(
        dataset_settings(world["config"], world["config"].dataset("sessions"), world["base"], environ={})
    ) as envs:
        envs.store.set_status("r2", "promoted", now=T0)

    first = run_soak_monitor(world["config"], world["base"], T0 + timedelta(minutes=15), environ={})
    assert [r["rollout"] for r in first] == ["r1"]  # only soaking rollouts
    second = run_soak_monitor(world["config"], world["base"], T0 + WINDOW, environ={})
    [result] = second
    assert result["evaluation"]["passed"] is True
    assert result["evaluation"]["evaluated_at"] == "2024-06-01T12:30:00Z"
    assert result["status"]["state"] == "passed"

    json_path, md_path = Path(result["report"]["json"]), Path(result["report"]["markdown"])
    assert json_path == world["base"].home / "reports" / "rollouts" / "r1" / "soak_report.json"
    document = json.loads(json_path.read_text())
    assert [e["evaluated_at"] for e in document["evaluations"]] == [
        "2024-06-01T12:15:00Z",
        "2024-06-01T12:30:00Z",
    ]
    assert document["evaluations"][0]["checks"]["business_metric"]["observed"] == pytest.approx(10 / 13)
    assert document["status"]["state"] == "passed"
    assert document["status"]["reason"].startswith("the window ended at 2024-06-01T12:30:00Z")
    markdown = md_path.read_text()
    assert "# Soak report: r1" in markdown
    assert "**passed**" in markdown
    assert "| 2024-06-01T12:15:00Z | yes |" in markdown and "| 2024-06-01T12:30:00Z | yes |" in markdown
    assert "0.769231 ok" in markdown

    skipped = run_soak_monitor(world["config"], world["base"], T0 + WINDOW, rollouts=["r2"], environ={})
    assert skipped == [{"rollout": "r2", "dataset": "sessions", "skipped": "status is promoted, not soaking"}]
    with pytest.raises(InvalidInput):
        run_soak_monitor(world["config"], world["base"], T0, rollouts=["nope"], environ={})


def test_soak_evaluation_rows_the_chain_does_not_record_are_left_out_of_the_report(world: dict) -> None:
    """`soak_evaluations` rows written into the catalog by hand: one whose detail is not JSON, one
    whose detail is JSON of another shape, one a forged passing evaluation with a metric of its own.
    The monitor's evaluation failed with an internal error (`AttributeError`) while writing the report
    (turning the Dagster `soak` check red), and a forged row appeared in the report an approver reads
    as an evaluation. Now the report lists the evaluations the production chain records, and says how
    many rows it left out."""
    _stage(world, "r1")
    run_soak_monitor(world["config"], world["base"], T0 + timedelta(minutes=15), environ={})
    forged_detail = {"failed_checks": [], "checks": {"business_metric": {"passed": True, "observed": 0.99}}}
    write_catalog(
        world["base"],
        *(
            (
                "INSERT INTO soak_evaluations (rollout, passed, detail, evaluated_at) "
                "VALUES ('r1', 1, :detail, :at)",
                {"detail": detail, "at": (T0 + timedelta(minutes=20)).replace(tzinfo=None)},
            )
            for detail in ("nope{", "[]", json.dumps(forged_detail))
        ),
    )
    [result] = run_soak_monitor(world["config"], world["base"], T0 + WINDOW, environ={})
    assert "error" not in result, result
    assert result["evaluation"]["passed"] is True and result["status"]["state"] == "passed"
    document = json.loads(Path(result["report"]["json"]).read_text())
    assert [e["evaluated_at"] for e in document["evaluations"]] == [
        "2024-06-01T12:15:00Z",
        "2024-06-01T12:30:00Z",
    ]
    assert document["rows_not_on_chain"] == 3
    markdown = Path(result["report"]["markdown"]).read_text()
    assert "12:20:00Z" not in markdown and "0.99" not in markdown
    assert "3 `soak_evaluations` row(s) the production audit chain does not record" in markdown


def test_report_of_a_failing_soak(world: dict, tmp_path: Path) -> None:
    world["config"] = _config(world["tmp"], at_least=0.9)
    _stage(world)
    _evaluate(world, T0 + timedelta(minutes=1))
    with open_environments(
        dataset_settings(world["config"], world["config"].dataset("sessions"), world["base"], environ={})
    ) as envs:
        rollout = envs.store.require("r1")
        status = soak_status(envs, rollout, T0 + timedelta(minutes=2))
        paths = write_soak_report(
            envs.production.settings, rollout, envs.store.soak_evaluations("r1"), status
        )
    markdown = Path(paths["markdown"]).read_text()
    assert "**failed**" in markdown
    assert "## Failed evaluations" in markdown
    assert "- **business_metric**: conversion_rate = mean(converted) = 0.769231, expected >= 0.9" in markdown
    document = json.loads(Path(paths["json"]).read_text())
    assert document["first_failed_evaluation"]["detail"]["failed_checks"] == ["business_metric"]


def test_source_gone_fails_rows_match_decisions(world: dict) -> None:
    _stage(world)
    (world["tmp"] / "sessions.jsonl").unlink()
    evaluation, status = _evaluate(world, T0 + timedelta(minutes=1))
    detail = evaluation["detail"]
    check = detail["checks"]["rows_match_decisions"]
    assert check["passed"] is False and check["observed"] is None
    assert check["message"].startswith("the source could not be evaluated")
    assert detail["decision_hash_now"] is None and detail["decision_hash_changed"] is None
    assert detail["checks"]["checksums"]["passed"] is True
    assert status["state"] == "failed"

"""What a UI user can type into the launchpad of the code location's jobs and assets: a value the
datasets config would refuse is refused here too, naming the field, with nothing written (the
run fails before any store is touched). In-process, on a temporary instance."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

dg = pytest.importorskip("dagster")

from pcbo_dagster.dagster_defs.definitions import build_definitions  # noqa: E402
from pcbo_dagster.dagster_defs.resources import PcboEngineResource  # noqa: E402
from pcbo_dagster.datasets.config import parse_datasets_config  # noqa: E402
from pcbo_dagster.engine.settings import Settings  # noqa: E402
from pcbo_dagster.rollout import operations  # noqa: E402
from pcbo_dagster.rollout.clock import ManualClock  # noqa: E402

KEYS = ["20240101T000000Z", "20240101T010000Z", "20240101T020000Z"]
CONFIG = """
version: 1
datasets:
  - name: sessions
    partitioning:
      {kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-01T03:00:00Z"}
    source: {uri: sessions.jsonl, format: jsonl}
    policies: {requireConsent: true, allowedJurisdictions: [US, CA], onViolation: omit}
    rollout:
      throttle: {partitionsPerMinute: 2}
      soak: {windowMinutes: 30}
      businessMetric: {name: conversion_rate, expression: mean(converted), atLeast: 0.5}
"""


@pytest.fixture
def staging(tmp_path: Path) -> Any:
    records = [
        {
            "id": f"ses-{h}-{n}",
            "occurredAt": f"2024-01-01T{h:02d}:{n * 7:02d}:00Z",
            "jurisdiction": "US",
            "consentGranted": True,
            "converted": n % 2 == 0,
        }
        for h in range(3)
        for n in range(4)
    ]
    (tmp_path / "sessions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = parse_datasets_config(CONFIG, base_dir=tmp_path)
    clock = ManualClock(datetime(2026, 11, 22, 9, 0, tzinfo=UTC))
    defs = build_definitions(config, PcboEngineResource(home=str(tmp_path / "home")), clock=clock)
    with dg.instance_for_test() as instance:

        def apply(step_config: dict[str, Any], **more_config: Any) -> Any:
            return defs.resolve_implicit_global_asset_job_def().execute_in_process(
                instance=instance,
                asset_selection=[dg.AssetKey(["staging", "sessions"])],
                tags={
                    "dagster/asset_partition_range_start": KEYS[0],
                    "dagster/asset_partition_range_end": KEYS[-1],
                },
                run_config={"ops": {"staging__sessions": {"config": step_config}}, **more_config},
                raise_on_error=False,
            )

        apply.defs = defs  # type: ignore[attr-defined]
        yield tmp_path / "home", clock, apply


def _failure_message(result: Any) -> str:
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    data = failure.step_failure_data
    return data.user_failure_data.description if data.user_failure_data else data.error.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("partitions_per_minute", 0.0),
        ("partitions_per_minute", -1.0),
        ("records_per_minute", 0.0),
        ("partitions_per_minute", float("nan")),
        ("records_per_minute", float("inf")),
    ],
)
def test_a_throttle_override_the_config_refuses_is_refused(staging: Any, field: str, value: float) -> None:
    """`partitionsPerMinute: 0` is refused in the datasets config; typed into the staging asset's
    launchpad it started the rollout and then divided by zero before the second partition (or, negative,
    not a number or infinite, silently turned the throttle off)."""
    home, clock, apply = staging
    result = apply({"rollout": "r1", "by": "ana", field: value})
    assert not result.success
    message = _failure_message(result)
    camel = {"partitions_per_minute": "partitionsPerMinute", "records_per_minute": "recordsPerMinute"}[field]
    assert camel in message, message
    assert "ZeroDivisionError" not in message and "internal" not in message.lower()
    assert f"invalid input: throttle.{camel}:" in message, message
    assert not list((home / "staging").rglob("_manifest.json"))  # nothing written
    assert operations.list_rollouts(Settings.resolve(home=str(home), env={}))["rollouts"] == []
    assert not clock.slept


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_a_poll_interval_that_is_not_a_positive_number_is_refused(staging: Any, value: float) -> None:
    """`poll_seconds: 0` (or below, or not a number) in the staging asset's launchpad: the first
    throttle wait took steps of zero seconds and never ended (the run spun on the catalog for ever)."""
    home, clock, apply = staging
    result = apply({"rollout": "r1", "by": "ana", "poll_seconds": value})
    assert not result.success
    message = _failure_message(result)
    assert "invalid input: poll_seconds:" in message, message
    assert not list((home / "staging").rglob("_manifest.json"))  # nothing written
    assert operations.list_rollouts(Settings.resolve(home=str(home), env={}))["rollouts"] == []


@pytest.mark.parametrize("name", ["day 1", "../day1", "..", "x" * 120, "-day1"])
def test_a_rollout_name_no_run_id_can_carry_is_refused_before_the_rollout_is_recorded(
    staging: Any, name: str
) -> None:
    """The rollout name becomes the engine's run ids (`rollout-<name>-staging`, `-production`) and a
    reports directory (`reports/rollouts/<name>/`). A name they cannot carry (a space, a slash, `..`,
    too long) was recorded as a rollout `applying`, and then the run failed on the engine's runId: a
    rollout row and its log left behind by input that was refused."""
    home, clock, apply = staging
    result = apply({"rollout": name, "by": "ana"})
    assert not result.success
    assert "invalid input: rollout:" in _failure_message(result)
    assert operations.list_rollouts(Settings.resolve(home=str(home), env={}))["rollouts"] == []
    assert not list((home / "staging").rglob("_manifest.json"))


@pytest.mark.parametrize("by", ["", "   "])
def test_a_rollout_started_by_nobody_is_refused(staging: Any, by: str) -> None:
    """`by` is who the rollout's history and its `rollout_staged` event name: blank, it was recorded
    as such (pause, resume, cancel and promote all refuse a blank `by`)."""
    home, clock, apply = staging
    result = apply({"rollout": "r1", "by": by})
    assert not result.success
    assert "invalid input: by:" in _failure_message(result)
    assert operations.list_rollouts(Settings.resolve(home=str(home), env={}))["rollouts"] == []


def test_no_launchpad_value_moves_the_engine_s_home(staging: Any, tmp_path: Path) -> None:
    """`PcboEngineResource.home` (`PCBO_HOME`: the catalog, lake, audit backup and keys when their own
    variables are unset) was a field of the resource, and Dagster takes a resource field given in code
    as a default the run config may override: `resources: {pcbo: {config: {home: /elsewhere}}}` typed
    into any job's launchpad ran the engine on another home of the host, its catalog, chains and keys
    (a history of its own, or a key it chose), which the code location was never configured with."""
    home, clock, apply = staging
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(dg.DagsterInvalidConfigError, match="pcbo"):
        apply({"rollout": "r1", "by": "ana"}, resources={"pcbo": {"config": {"home": str(elsewhere)}}})
    assert not elsewhere.exists()
    for job in apply.defs.resolve_all_job_defs():  # no job takes any value for the pcbo resource
        resources = job.run_config_schema.config_type.fields["resources"].config_type
        pcbo = resources.fields["pcbo"].config_type.fields
        assert "config" not in pcbo or not pcbo["config"].config_type.fields, (job.name, pcbo)
    assert not list(home.rglob("_manifest.json"))


def test_no_launchpad_value_chooses_where_dagster_writes_step_outputs(staging: Any, tmp_path: Path) -> None:
    """The location named no IO manager, so its jobs ran Dagster's default `fs_io_manager`, whose
    `base_dir` is run config: `resources: {io_manager: {config: {base_dir: /anywhere}}}` typed into a
    launchpad had the run write its outputs (`<base_dir>/<run id>/<step>/result`, pickles) into any
    directory the code server may write, the lake or the audit backup included. Now no resource of
    any job takes run config: the outputs go under the instance's storage, as configured."""
    home, clock, apply = staging
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(dg.DagsterInvalidConfigError, match="io_manager"):
        apply(
            {"rollout": "r1", "by": "ana"}, resources={"io_manager": {"config": {"base_dir": str(elsewhere)}}}
        )
    assert not elsewhere.exists()
    for job in apply.defs.resolve_all_job_defs():
        resources = job.run_config_schema.config_type.fields["resources"].config_type
        for name, field in resources.fields.items():
            config = getattr(field.config_type, "fields", {}).get("config")
            taken = getattr(getattr(config, "config_type", None), "fields", {})
            assert not taken, (job.name, name, list(taken))

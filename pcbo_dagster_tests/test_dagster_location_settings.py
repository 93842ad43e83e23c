"""The code location's own settings from the environment (sensor intervals, the soak schedule's
cron): a bad value refuses the load with `InvalidInput` naming the variable, as every other `PCBO_*`
variable does, instead of a bare `ValueError` or a Dagster definition error that names none."""

from __future__ import annotations

from pathlib import Path

import pytest

dg = pytest.importorskip("dagster")

from pcbo_dagster.core.errors import InvalidInput  # noqa: E402
from pcbo_dagster.dagster_defs.definitions import build_definitions  # noqa: E402
from pcbo_dagster.dagster_defs.resources import PcboEngineResource  # noqa: E402
from pcbo_dagster.datasets.config import DEFAULT_DATASETS_CONFIG, load_datasets_config  # noqa: E402


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PCBO_ROLLOUT_SENSOR_INTERVAL", "30s"),
        ("PCBO_ROLLOUT_SENSOR_INTERVAL", "0"),
        ("PCBO_LAKE_DRIFT_INTERVAL", "five minutes"),
        ("PCBO_LAKE_DRIFT_INTERVAL", "-5"),
        ("PCBO_SOAK_CRON", "every-minute"),
        ("PCBO_SOAK_CRON", "0 0 31 2 *"),
    ],
)
def test_a_bad_setting_refuses_the_load_naming_its_variable(
    variable: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_datasets_config(DEFAULT_DATASETS_CONFIG, {"PCBO_HOME": str(tmp_path)})
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidInput) as info:
        build_definitions(config, resource=PcboEngineResource(home=str(tmp_path)))
    assert info.value.field == variable


def test_good_settings_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_datasets_config(DEFAULT_DATASETS_CONFIG, {"PCBO_HOME": str(tmp_path)})
    monkeypatch.setenv("PCBO_ROLLOUT_SENSOR_INTERVAL", "45")
    monkeypatch.setenv("PCBO_LAKE_DRIFT_INTERVAL", "600")
    monkeypatch.setenv("PCBO_SOAK_CRON", "*/5 * * * *")
    defs = build_definitions(config, resource=PcboEngineResource(home=str(tmp_path)))
    assert defs.resolve_sensor_def("rollout_promotion").minimum_interval_seconds == 45
    assert defs.resolve_sensor_def("production_health_repairs").minimum_interval_seconds == 45
    assert defs.resolve_sensor_def("lake_drift").minimum_interval_seconds == 600
    assert defs.resolve_schedule_def("soak_monitor_schedule").cron_schedule == "*/5 * * * *"


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["nosuch"], "asset"),
        (["events", "--first", "nope"], "--first"),
        (["events", "--last", "2024-01-01"], "--last"),
        (["events", "--first", "20240101T050000Z", "--last", "20240101T010000Z"], "--last"),
        (["events", "--coordinators", "0"], "--coordinators"),
        (["events", "--coordinators", "-1"], "--coordinators"),
    ],
)
def test_range_runs_refuses_bad_arguments_naming_them(
    argv: list[str],
    field: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`python -m pcbo_dagster.dagster_defs.range_runs`: an unknown asset or key was a traceback
    (DagsterInvariantViolationError, `ValueError: 'nope' is not in list`), and a first key after the
    last launched nothing and exited 0; `--coordinators 0` or `-1` ran the runs one after another and
    exited 0. Each is invalid input naming the argument, exit 2, and no run is launched."""
    from pcbo_dagster.dagster_defs import range_runs

    monkeypatch.setenv("PCBO_HOME", str(tmp_path))
    monkeypatch.delenv("PCBO_DATASETS_CONFIG", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    status = range_runs.main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"invalid input: {field}:" in err
    assert not (tmp_path / "history").exists(), "a run was launched"


def test_range_runs_cuts_a_valid_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pcbo_dagster.dagster_defs import range_runs

    monkeypatch.setenv("PCBO_HOME", str(tmp_path))
    monkeypatch.delenv("PCBO_DATASETS_CONFIG", raising=False)
    spans = range_runs.run_ranges("events", "20240101T020000Z", "20240101T050000Z")
    assert spans[0][0] == "20240101T020000Z" and spans[-1][1] == "20240101T050000Z"
    assert range_runs.run_ranges("events", "20240101T030000Z", "20240101T030000Z") == [
        ("20240101T030000Z", "20240101T030000Z")
    ]


_TWO_DATASETS = """
version: 1
datasets:
  - name: {plain}
    partitioning:
      {{kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-02T00:00:00Z"}}
    source: {{uri: events.jsonl, format: jsonl}}
    policies: {{requireConsent: true, allowedJurisdictions: [US]}}
  - name: sessions
    partitioning:
      {{kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-02T00:00:00Z"}}
    source: {{uri: sessions.jsonl, format: jsonl}}
    policies: {{requireConsent: true, allowedJurisdictions: [US]}}
    rollout:
      soak: {{windowMinutes: 10}}
      businessMetric: {{name: conversion_rate, expression: mean(converted), atLeast: 0.5}}
"""


@pytest.mark.parametrize("plain", ["rollout", "staging__sessions", "production__sessions"])
def test_a_dataset_name_making_a_taken_dagster_name_is_refused(plain: str, tmp_path: Path) -> None:
    """A dataset named `rollout` makes the job `rollout_rollback`, which the rollout jobs already
    define; `staging__sessions` makes `staging__sessions_checks`, the staging asset's checks job. The
    config validated, and the code location failed to load with Dagster's `Duplicate job definition`
    error, naming no field."""
    from pcbo_dagster.datasets.config import parse_datasets_config

    config = parse_datasets_config(_TWO_DATASETS.format(plain=plain), base_dir=tmp_path)
    with pytest.raises(InvalidInput) as info:
        build_definitions(config, resource=PcboEngineResource(home=str(tmp_path)))
    assert info.value.field == "datasets[0].name", str(info.value)
    assert plain in info.value.message


@pytest.mark.parametrize("plain", ["rollout", "staging__sessions", "production__sessions"])
def test_validate_config_refuses_a_dataset_name_the_code_location_refuses(
    plain: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`pcbo validate-config` said such a config was valid; the code location then refused it at
    load. It runs the location's own check: exit 2 naming the field, nothing on stdout."""
    from pcbo_dagster.cli import main as cli

    path = tmp_path / "datasets.yaml"
    path.write_text(_TWO_DATASETS.format(plain=plain))
    status = cli.main(["validate-config", str(path)])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert "invalid input: datasets[0].name: " in err and plain in err and str(path) in err
    assert "Traceback" not in err
    path.write_text(_TWO_DATASETS.format(plain="events"))  # the same config, its dataset renamed
    assert cli.main(["validate-config", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_datasets_config_that_is_not_a_regular_file_is_refused_at_once(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PCBO_DATASETS_CONFIG` naming a FIFO hung the code location's load (and `pcbo validate-config`)
    for ever; naming `/dev/zero` read until memory ran out (an internal MemoryError, after exhausting
    the host). Sources that are not regular files are refused; so is the config, naming the file."""
    import os
    import threading

    from pcbo_dagster.datasets.config import load_datasets_config_from_env

    if kind == "fifo":
        path = tmp_path / "datasets.yaml"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    monkeypatch.setenv("PCBO_DATASETS_CONFIG", str(path))
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_datasets_config_from_env()
        except BaseException as exc:  # noqa: BLE001 - what the load ends in is the outcome
            outcome.append(exc)

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, hard))  # /dev/zero must not take the host down
    try:
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        worker.join(20)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    if worker.is_alive():  # unblock the FIFO's opener, then fail
        with open(path, "wb"):
            pass
        worker.join(20)
        pytest.fail("loading the datasets config blocked")
    [error] = outcome
    assert isinstance(error, InvalidInput), repr(error)
    assert error.field == "config" and "not a regular file" in error.message


def test_the_k8s_executor_takes_no_run_config() -> None:
    """`PCBO_EXECUTOR=k8s` bound dagster-k8s's `k8s_job_executor` as it is, whose whole config is run
    config: a launch's `execution: {config: {env_vars: [PCBO_HOME=...], job_image: ..., volumes: ...}}`
    ran its steps in another image, with another PCBO_HOME or catalog, or a host path mounted. Now its
    settings are the run launcher's only (as the README says), and a launch that gives any is refused."""
    pytest.importorskip("dagster_k8s")
    from pcbo_dagster.dagster_defs.definitions import executor_from_env

    @dg.op
    def step() -> None:
        return None

    @dg.job(executor_def=executor_from_env({"PCBO_EXECUTOR": "k8s"}))
    def job() -> None:
        step()

    with pytest.raises(dg.DagsterInvalidConfigError, match="env_vars"):
        dg.validate_run_config(job, {"execution": {"config": {"env_vars": ["PCBO_HOME=/elsewhere"]}}})
    dg.validate_run_config(job, {})

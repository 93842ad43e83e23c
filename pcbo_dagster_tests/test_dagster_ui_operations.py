"""The operations a user runs from the Dagster UI, and the instance kept in step with the lake, on an
in-process instance (fast; the same paths through a real webserver + daemon are in
`test_dagster_webserver.py` and `test_dagster_rollout_ui.py`).

- `events_dry_run` writes nothing and a report whose decision hash pins a materialization;
- `events_rollback` over a partition selection, then by run id: the instance shows what the lake holds;
- a run that stopped between the parquet emission and the audit chain append (a crash between ops)
  leaves the partitions unmaterialized; `pcbo verify --repair` with `DAGSTER_HOME` heals the lake and
  reports the partitions to the instance;
- `lake_drift`: nothing to do (skips, saying so), a change made outside Dagster with no instance
  configured (reported), a deleted data file (the checks job launched over it);
- re-materializing a partition whose commit point is corrupted and cannot be restored fails saying
  what happened (nothing rolled back, nothing written) and what to do.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import dagster as dg
else:
    dg = pytest.importorskip("dagster")

from pcbo_dagster.dagster_defs.backfill import steps  # noqa: E402
from pcbo_dagster.dagster_defs.definitions import build_definitions  # noqa: E402
from pcbo_dagster.dagster_defs.resources import PcboEngineResource  # noqa: E402
from pcbo_dagster.datasets.config import DEFAULT_DATASETS_CONFIG, load_datasets_config  # noqa: E402
from pcbo_dagster.datasets.demo_data import generate_demo_data  # noqa: E402
from pcbo_dagster.engine.rollback import rollback  # noqa: E402
from pcbo_dagster.engine.verify import verify  # noqa: E402
from pcbo_dagster_tests.approver_keys import BO  # noqa: E402
from pcbo_dagster_tests.cli_runner import tree_state  # noqa: E402
from pcbo_dagster_tests.example_location import EVENTS, KEYS, RANGE, example_location, materialize_events  # noqa: E402


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    return example_location(tmp_path)


_materialize = materialize_events


def _pinned(decision_hash: str) -> dict[str, Any]:
    gate = {"events__policy_gate": {"config": {"expected_decision_hash": decision_hash}}}
    return {"ops": {"events": {"ops": gate}}}


def test_dry_run_pins_what_is_materialized_and_the_rollback_job_updates_the_ui(setup: Any) -> None:
    tmp_path, config, engine, defs = setup
    lake = tmp_path / "pcbo-home" / "lake" / "events" / "v1"
    with dg.instance_for_test() as instance:
        dry = defs.resolve_job_def("events_dry_run").execute_in_process(instance=instance, tags=RANGE)
        assert dry.success
        assert not lake.exists()  # nothing written
        report_file = tmp_path / "pcbo-home" / "reports" / "dry-runs" / "events" / f"{dry.run_id}.md"
        report = report_file.read_text()
        found = re.search(r"decision hash `(sha256:[0-9a-f]{64})`", report)
        assert found, report
        decision_hash = found.group(1)
        document = json.loads((report_file.parent / f"{dry.run_id}.json").read_text())
        assert document["decisionHash"] == decision_hash
        # Counts by reason per partition, as the approver reads them.
        for key in KEYS:
            row = next(line for line in report.splitlines() if line.startswith(f"| {key} "))
            cells = [c.strip() for c in row.strip("|").split("|")]
            counts = next(p["counts"] for p in document["partitions"] if p["key"] == key)
            assert [int(c) for c in cells[1:4]] == [counts["source"], counts["add"], counts["omit"]]

        # Pinned to another hash: blocked, nothing written; pinned to the dry run's: materialized.
        stale = _materialize(defs, instance, run_config=_pinned("sha256:" + "0" * 64), raise_on_error=False)
        assert not stale.success and not lake.exists()
        run = _materialize(defs, instance, run_config=_pinned(decision_hash))
        assert run.success
        mats = run.asset_materializations_for_node("events")
        assert {m.partition for m in mats} == set(KEYS)
        assert {m.metadata["decision_hash"].value for m in mats} == {decision_hash}
        assert instance.get_materialized_partitions(EVENTS) == set(KEYS)

        # The rollback job over one partition: the UI no longer shows it materialized.
        rollback_job = defs.resolve_job_def("events_rollback")
        one = rollback_job.execute_in_process(instance=instance, partition_key=KEYS[1])
        assert one.success
        assert instance.get_materialized_partitions(EVENTS) == {KEYS[0], KEYS[2]}
        assert not (lake / KEYS[1] / "_manifest.json").exists()
        # ...then by the materializing run's id (the Dagster run id as the UI shows it): the rest goes.
        by_run = rollback_job.execute_in_process(
            instance=instance,
            partition_key=KEYS[0],
            run_config={"ops": {"events__rollback": {"config": {"run_id": run.run_id}}}},
        )
        assert by_run.success
        assert by_run.output_for_node("events__rollback")["partitions"]
        assert instance.get_materialized_partitions(EVENTS) == set()
        with engine.environment() as env:
            assert verify(env)["findings"] == []


def test_a_run_stopped_between_ops_is_healed_by_verify_repair_and_reported(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path, config, engine, defs = setup
    lake = tmp_path / "pcbo-home" / "lake" / "events" / "v1"

    def crash(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("the run worker died before the audit chain append")

    (tmp_path / "dagster-home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster-home")) as instance:
        monkeypatch.setattr(steps, "append_commit_events", crash)
        stopped = _materialize(defs, instance, raise_on_error=False)
        monkeypatch.undo()
        assert not stopped.success
        failed = [e.step_key for e in stopped.all_events if e.event_type_value == "STEP_FAILURE"]
        assert failed == ["events.events__audit_chain_append"]
        # The commit points are written (the commit step ran); nothing is materialized in Dagster yet.
        assert sorted(p.name for p in lake.glob("*") if (p / "_manifest.json").exists()) == KEYS
        assert instance.get_materialized_partitions(EVENTS) == set()

        # `pcbo verify --repair`, run by an operator with the deployment's DAGSTER_HOME.
        env = {
            **os.environ,
            "DAGSTER_HOME": str(tmp_path / "dagster-home"),
            "PCBO_HOME": str(tmp_path / "pcbo-home"),
            "PCBO_DATASETS_CONFIG": str(tmp_path / "datasets.yaml"),
        }
        done = subprocess.run(
            [sys.executable, "-m", "pcbo_dagster.cli.main", "verify", "--repair"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["repaired"]) == len(KEYS)
        assert instance.get_materialized_partitions(EVENTS) == set(KEYS)
        for key in KEYS:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=EVENTS, asset_partitions=[key]), limit=1
            ).records
            mat = records[0].asset_materialization
            assert mat is not None
            assert mat.metadata["status"].value == "repaired"
            assert mat.metadata["reported_by"].value == "pcbo verify"
            manifest = lake / key / "_manifest.json"
            checksum = mat.metadata["manifest_checksum"].value
            assert isinstance(checksum, str) and checksum.startswith("sha256:") and manifest.exists()
        with engine.environment() as env_:
            assert verify(env_)["findings"] == []


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, engine: PcboEngineResource) -> Any:
    sensor = defs.resolve_sensor_def("lake_drift")
    with dg.build_sensor_context(instance=instance, resources={"pcbo": engine}) as context:
        return sensor(context)


def test_lake_drift_skips_reports_and_launches_the_checks_of_a_damaged_partition(setup: Any) -> None:
    tmp_path, config, engine, defs = setup
    lake = tmp_path / "pcbo-home" / "lake" / "events" / "v1"
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        quiet = _tick(defs, instance, engine)
        assert isinstance(quiet, dg.SkipReason) and quiet.skip_message is not None
        assert "no drift" in quiet.skip_message

        # A rollback made with no instance configured: the lake agrees with its chain, so the sensor
        # reports the lake's state (the partition is no longer materialized).
        with engine.environment() as env:
            rollback(env, "events", "v1", partition_keys=[KEYS[0]], reason="outside Dagster")
        reported = _tick(defs, instance, engine)
        assert isinstance(reported, dg.SkipReason) and reported.skip_message is not None
        assert "reported the lake state" in reported.skip_message
        assert instance.get_materialized_partitions(EVENTS) == {KEYS[1], KEYS[2]}
        assert "no drift" in _tick(defs, instance, engine).skip_message

        # A deleted data file: the lake disagrees with its manifest; the checks job is launched over it.
        next((lake / KEYS[2]).glob("part-*.parquet")).unlink()
        launched = _tick(defs, instance, engine)
        [request] = launched.run_requests
        assert request.job_name == "events_checks"
        assert request.tags["dagster/asset_partition_range_start"] == KEYS[2]
        assert request.tags["dagster/asset_partition_range_end"] == KEYS[2]
        checks = defs.resolve_job_def("events_checks").execute_in_process(
            instance=instance, tags=request.tags, raise_on_error=False
        )
        assert not checks.success  # reconciliation is blocking
        failed = {(e.check_name, e.partition) for e in checks.get_asset_check_evaluations() if not e.passed}
        assert ("reconciliation", KEYS[2]) in failed and all(k == KEYS[2] for _, k in failed if k)
        # The same drift is not launched twice (its run key).
        assert _tick(defs, instance, engine).run_requests[0].run_key == request.run_key


def test_rematerializing_a_partition_the_lake_lost_says_what_happened_and_what_to_do(setup: Any) -> None:
    tmp_path, config, engine, defs = setup
    part = tmp_path / "pcbo-home" / "lake" / "events" / "v1" / KEYS[1]
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        # Its commit point corrupted and the retained copy gone: no run can put the chain's version back.
        (part / "_manifest.json").write_text('{"corrupted": true}')
        for copy in (part / "_versions").glob("*.json"):
            copy.unlink()
        before = sorted(p.relative_to(part).as_posix() for p in part.rglob("*"))
        job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={EVENTS})
        again = job.execute_in_process(instance=instance, partition_key=KEYS[1], raise_on_error=False)
        assert not again.success
        [failure] = [e for e in again.all_events if e.event_type_value == "STEP_FAILURE"]
        data = failure.step_failure_data
        message = data.user_failure_data.description if data.user_failure_data else data.error.message
        # Emission writes nothing to it; the reconciliation step says why the run failed.
        assert failure.step_key == "events.events__reconciliation"
        assert f"partition {KEYS[1]} of events/v1 was not written" in message
        assert "Nothing was rolled back" in message and "What to do: `pcbo verify`" in message
        assert "was rolled back to the version before" not in message
        assert sorted(p.relative_to(part).as_posix() for p in part.rglob("*")) == before
        with engine.environment() as env:
            events = env.audit.backup.read_chain("events/v1")
        assert not [e for e in events if e["event_type"] == "partition_rolled_back"]


def test_a_rollout_dataset_is_dry_run_too_and_its_hash_is_what_the_approval_names(setup: Any) -> None:
    from pcbo_dagster.core.errors import InvalidInput
    from pcbo_dagster.rollout import operations

    tmp_path, config, engine, defs = setup
    assert "sessions_rollback" not in {j.name for j in defs.jobs}  # rollout_rollback covers its stages
    with dg.instance_for_test() as instance:
        dry = defs.resolve_job_def("sessions_dry_run").execute_in_process(instance=instance, tags=RANGE)
        assert dry.success
        reports = tmp_path / "pcbo-home" / "reports" / "dry-runs" / "sessions"
        report = (reports / f"{dry.run_id}.md").read_text()
        found = re.search(r"decision hash `(sha256:[0-9a-f]{64})`", report)
        assert found and "pcbo approve <rollout>" in report, report
        assert not (tmp_path / "pcbo-home" / "staging").exists()  # nothing staged, nothing written

    # A rollout of the same partitions stages exactly those decisions: the approval naming the dry
    # run's hash is accepted; one naming another hash is refused.
    base = engine.settings()
    staged = operations.start(
        config, base, "sessions", KEYS[0], KEYS[-1], by="ana", name="r1",
        throttle={"partitionsPerMinute": 100000},
    )  # fmt: skip
    assert staged["execute"]["decisionHash"] == found.group(1)
    with pytest.raises(InvalidInput):
        operations.decide(
            config, base, "r1", "approve", key=BO, reason="x", decision_hash="sha256:" + "0" * 64
        )
    approved = operations.decide(config, base, "r1", "approve", key=BO, reason="read the dry run",
                                 decision_hash=found.group(1))  # fmt: skip
    assert approved["decisionHash"] == found.group(1)


def test_the_four_steps_publish_the_datasets_iceberg_table(tmp_path: Path) -> None:
    """A dataset with a `table`, materialized as the UI does (policy gate, emission, audit append,
    reconciliation): the table is recorded before the lake is written and, after reconciliation,
    holds exactly the files the committed manifests name; the run verifies clean."""
    from pyiceberg.catalog.sql import SqlCatalog

    text = DEFAULT_DATASETS_CONFIG.read_text()
    marker = "    auditChainKey: events/v1"
    assert marker in text
    (tmp_path / "datasets.yaml").write_text(
        text.replace(marker, marker + "\n    table: {format: iceberg, name: lake.events}", 1)
    )
    generate_demo_data(tmp_path / "demo_data")
    config = load_datasets_config(tmp_path / "datasets.yaml")
    engine = PcboEngineResource(home=str(tmp_path / "pcbo-home"))
    defs = build_definitions(config, resource=engine)
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
    home = tmp_path / "pcbo-home"
    table = SqlCatalog("pcbo", uri=f"sqlite:///{home}/iceberg.db").load_table("lake.events")
    published = {Path(f.file.file_path).name for f in table.scan().plan_files()}
    manifests = [
        json.loads((home / "lake" / "events" / "v1" / key / "_manifest.json").read_text()) for key in KEYS
    ]
    assert published == {Path(f["path"]).name for m in manifests for f in m["files"]}
    assert table.scan().to_arrow().num_rows == sum(f["rowCount"] for m in manifests for f in m["files"])
    with engine.environment() as env:
        assert verify(env)["status"] == "clean"


TABLE_LINE = "    table: {format: iceberg, name: lake.events}"


def _with_table(text: str) -> str:
    """The datasets config `text` with the `events` dataset publishing to an Iceberg table."""
    marker = "    auditChainKey: events/v1"
    return text.replace(marker, marker + "\n" + TABLE_LINE, 1)


def _shadow_an_id(events: Path) -> None:
    """A field `ID` beside `id` in one record of the demo `events` source that the first hours add."""
    lines = events.read_text().splitlines()
    in_range = next(
        i
        for i, line in enumerate(lines)
        if '"occurredAt":"2024-01-01T01' in line and '"jurisdiction":"US"' in line
    )
    record = json.loads(lines[in_range])
    record["ID"] = "shadow"
    lines[in_range] = json.dumps(record)
    events.write_text("\n".join(lines) + "\n")


def _failure_description(result: Any) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures
    user_failure = failures[0].step_failure_data.user_failure_data
    assert user_failure is not None
    return str(user_failure.description)


@pytest.mark.parametrize("table", [True, False], ids=["with-table", "lake-only"])
def test_the_dry_run_job_refuses_the_column_names_a_table_cannot_have(tmp_path: Path, table: bool) -> None:
    """A dataset that publishes to an Iceberg table, one of whose records has a field `ID` beside
    `id`: the materialization would refuse it (exit 2 in the CLI, before anything is written), so the
    dry-run job, which promises what the materialization will do, fails naming the field and writes no
    report; the same records in a dataset without a table dry-run as before."""
    text = DEFAULT_DATASETS_CONFIG.read_text()
    (tmp_path / "datasets.yaml").write_text(_with_table(text) if table else text)
    generate_demo_data(tmp_path / "demo_data")
    _shadow_an_id(tmp_path / "demo_data" / "events.jsonl")
    config = load_datasets_config(tmp_path / "datasets.yaml")
    engine = PcboEngineResource(home=str(tmp_path / "pcbo-home"))
    defs = build_definitions(config, resource=engine)
    reports = tmp_path / "pcbo-home" / "reports" / "dry-runs" / "events"
    with dg.instance_for_test() as instance:
        dry = defs.resolve_job_def("events_dry_run").execute_in_process(
            instance=instance, tags=RANGE, raise_on_error=False
        )
    if not table:
        assert dry.success
        return
    assert not dry.success
    failures = [e for e in dry.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures
    user_failure = failures[0].step_failure_data.user_failure_data
    assert user_failure is not None
    described = str(user_failure.description)
    assert ".ID" in described and "invalid input" in described.lower(), described
    assert not reports.exists()  # not even its directory
    assert not (tmp_path / "pcbo-home" / "lake").exists()


def test_the_dry_run_job_refuses_a_table_other_than_the_one_its_chain_declares(tmp_path: Path) -> None:
    """A dataset version publishes to one table: a config naming another table than the one an earlier
    run declared on its chain fails the materialization (invalid input, field `table`); the dry-run
    job reported a decision hash to pin for it. It now makes the materialization's own check: it fails
    naming `table`, with the materialization's text, and writes nothing (no report, no directory: the
    home as it was). The declared table named again dry-runs as before."""
    text = _with_table(DEFAULT_DATASETS_CONFIG.read_text())
    (tmp_path / "datasets.yaml").write_text(text)
    (tmp_path / "other.yaml").write_text(
        text.replace(TABLE_LINE, TABLE_LINE.replace("lake.events", "lake.other"))
    )
    generate_demo_data(tmp_path / "demo_data")
    home = tmp_path / "pcbo-home"
    engine = PcboEngineResource(home=str(home))
    declared = build_definitions(load_datasets_config(tmp_path / "datasets.yaml"), resource=engine)
    other = build_definitions(load_datasets_config(tmp_path / "other.yaml"), resource=engine)
    with dg.instance_for_test() as instance:
        assert _materialize(declared, instance).success
        before = tree_state(home)
        dry = other.resolve_job_def("events_dry_run").execute_in_process(
            instance=instance, tags=RANGE, raise_on_error=False
        )
        assert not dry.success
        described = _failure_description(dry)
        assert "table: " in described and "publishes to one table" in described, described
        assert tree_state(home) == before
        refused = _materialize(other, instance, raise_on_error=False)
        assert not refused.success
        assert _failure_description(refused) == described
        same = declared.resolve_job_def("events_dry_run").execute_in_process(
            instance=instance, tags=RANGE, raise_on_error=False
        )
        assert same.success


def test_the_dry_run_job_refuses_the_column_names_the_table_its_chain_declares_cannot_have(
    tmp_path: Path,
) -> None:
    """A dataset whose config names no table publishes to the table an earlier run declared on its
    dataset version's chain (here a run of the config as it was, with its table), and its
    materialization refuses a record's field `ID` beside `id`; the dry-run job checked only the
    config's table (it read no chain), so it reported a decision hash to pin for a materialization that
    then failed. It now reads the deployment's verified chain: it fails naming the field, as the
    materialization does, and writes nothing (no report, no directory: the home as it was)."""
    text = DEFAULT_DATASETS_CONFIG.read_text()
    (tmp_path / "with-table.yaml").write_text(_with_table(text))
    (tmp_path / "datasets.yaml").write_text(text)
    generate_demo_data(tmp_path / "demo_data")
    home = tmp_path / "pcbo-home"
    engine = PcboEngineResource(home=str(home))
    with dg.instance_for_test() as instance:
        declared = build_definitions(load_datasets_config(tmp_path / "with-table.yaml"), resource=engine)
        assert _materialize(declared, instance).success
    _shadow_an_id(tmp_path / "demo_data" / "events.jsonl")
    defs = build_definitions(load_datasets_config(tmp_path / "datasets.yaml"), resource=engine)
    before = tree_state(home)
    with dg.instance_for_test() as instance:
        dry = defs.resolve_job_def("events_dry_run").execute_in_process(
            instance=instance, tags=RANGE, raise_on_error=False
        )
        assert not dry.success
        described = _failure_description(dry)
        assert "sourceRecords" not in described and ".ID" in described, described
        assert "invalid input" in described.lower(), described
        assert tree_state(home) == before
        refused = _materialize(defs, instance, raise_on_error=False)
    assert not refused.success
    assert _failure_description(refused) == described
    # A chain that does not verify (the declaration dropped from the backup) fails the dry-run as it
    # fails a materialization (`ChainNotVerified`), nothing written.
    backup = home / "pas" / "events" / "v1.jsonl"
    lines = backup.read_bytes().splitlines(keepends=True)
    backup.write_bytes(b"".join(line for line in lines if b'"table_publication_recorded"' not in line))
    before = tree_state(home)
    with dg.instance_for_test() as instance:
        forged = defs.resolve_job_def("events_dry_run").execute_in_process(
            instance=instance, tags=RANGE, raise_on_error=False
        )
    assert not forged.success
    [failure] = [e for e in forged.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.step_failure_data.error
    cause = None if error is None else error.cause
    assert cause is not None and cause.cls_name == "ChainNotVerified", error
    assert "the audit chain events/v1 does not verify" in cause.message, cause
    assert tree_state(home) == before

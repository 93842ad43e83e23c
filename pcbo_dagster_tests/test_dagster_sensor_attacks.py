"""Sensors of the code location against someone who can write the lake, the catalog or the audit
backup (the threat model's attacker): what a sensor reports or launches must rest on what the checks
and `pcbo verify` would accept, never on one store alone. In-process (`build_sensor_context`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import dagster as dg
else:
    dg = pytest.importorskip("dagster")

from pcbo_dagster.dagster_defs.definitions import build_definitions  # noqa: E402
from pcbo_dagster.dagster_defs.resources import PcboEngineResource  # noqa: E402
from pcbo_dagster.datasets.config import load_datasets_config  # noqa: E402
from pcbo_dagster.datasets.demo_data import generate_demo_data  # noqa: E402
from pcbo_dagster.engine.rollback import rollback  # noqa: E402
from pcbo_dagster.engine.verify import verify  # noqa: E402
from pcbo_dagster_tests.example_location import EVENTS, KEYS, example_location, materialize_events  # noqa: E402


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    return example_location(tmp_path)


_materialize = materialize_events


def _drift_tick(defs: dg.Definitions, instance: dg.DagsterInstance, engine: PcboEngineResource) -> Any:
    sensor = defs.resolve_sensor_def("lake_drift")
    with dg.build_sensor_context(instance=instance, resources={"pcbo": engine}) as context:
        return sensor(context)


def _assert_drift_launches_failing_checks(
    defs: dg.Definitions, instance: dg.DagsterInstance, engine: PcboEngineResource
) -> None:
    """A `lake_drift` tick reports nothing to the instance (nor wipes a materialization) and launches
    the checks job from the first partition, whose `audit_chain` check then fails."""
    tick = _drift_tick(defs, instance, engine)
    assert instance.get_materialized_partitions(EVENTS) == set(KEYS)  # nothing reported, nothing wiped
    assert isinstance(tick, dg.SensorResult) and tick.run_requests, tick
    [request] = tick.run_requests
    assert request.job_name == "events_checks"
    assert request.tags["dagster/asset_partition_range_start"] == KEYS[0]
    checks = defs.resolve_job_def("events_checks").execute_in_process(
        instance=instance, tags=request.tags, raise_on_error=False
    )
    assert not checks.success
    failed = {(e.check_name, e.partition) for e in checks.get_asset_check_evaluations() if not e.passed}
    assert ("audit_chain", KEYS[0]) in failed


def test_lake_drift_does_not_take_a_backup_alone_for_the_chain(setup: Any) -> None:
    """A partition deleted from the lake, with a well-formed rollback appended to the audit backup
    alone (not the catalog's copy of the chain): `lake_drift` must launch the checks (which fail:
    the backup's head is not the catalog's), not report the deletion as a rollback the chain agrees on
    (that wiped the asset's materializations and turned nothing red)."""
    tmp_path, config, engine, defs = setup
    home = tmp_path / "pcbo-home"
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        # The forgery, made where the attacker can compute it: a copy of the stores, a genuine rollback
        # there; then the lake's partition and the backup's chain file copied back (the catalog is not).
        shadow = tmp_path / "shadow"
        shutil.copytree(home, shadow)
        with PcboEngineResource(home=str(shadow)).environment() as env:
            rollback(env, "events", "v1", partition_keys=[KEYS[0]], reason="forged")
        part = Path("lake") / "events" / "v1" / KEYS[0]
        shutil.rmtree(home / part)
        shutil.copytree(shadow / part, home / part)
        for chain_file in (shadow / "pas" / "events").glob("v1*"):
            shutil.copy(chain_file, home / "pas" / "events" / chain_file.name)
        with engine.environment() as env:
            assert verify(env)["findings"]  # the stores disagree: a finding, not a history

        _assert_drift_launches_failing_checks(defs, instance, engine)


def test_the_checks_job_launched_without_a_partition_range_checks_every_committed_partition(
    setup: Any,
) -> None:
    """The checks job launched on its own (the UI's Launchpad, no range tags) failed every time, after
    its evaluations, with `DagsterInvariantViolationError: Cannot access partition_key for a
    non-partitioned run` (`partition_health` was a result, whose data version Dagster looks up for the
    run's partitions): it now succeeds, each committed partition evaluated and `partition_health`
    passing."""
    tmp_path, config, engine, defs = setup
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        checks = defs.resolve_job_def("events_checks").execute_in_process(
            instance=instance, raise_on_error=False
        )
        assert checks.success
        evaluations = {(e.check_name, e.partition): e.passed for e in checks.get_asset_check_evaluations()}
        assert {p for (name, p) in evaluations if name == "reconciliation"} == set(KEYS)
        assert evaluations[("partition_health", None)] is True and all(evaluations.values())


def test_the_checks_job_launched_without_a_range_checks_a_partition_the_lake_lost_too(setup: Any) -> None:
    """A partition whose commit point someone deleted from the lake (the chain still says it is
    committed, `pcbo verify`: `commit_point_missing`): the checks job launched on its own took "every
    committed partition" from the lake alone, so it never looked at that one and every evaluation
    passed, `partition_health` too. Now it checks every partition the lake or the chain holds: the
    lost one fails `audit_chain` and `reconciliation`."""
    tmp_path, config, engine, defs = setup
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        (tmp_path / "pcbo-home" / "lake" / "events" / "v1" / KEYS[1] / "_manifest.json").unlink()
        with engine.environment() as env:
            kinds = {f["kind"] for f in verify(env)["findings"]}
        assert "commit_point_missing" in kinds, kinds
        checks = defs.resolve_job_def("events_checks").execute_in_process(
            instance=instance, raise_on_error=False
        )
        evaluations = {(e.check_name, e.partition): e.passed for e in checks.get_asset_check_evaluations()}
        assert {p for (name, p) in evaluations if name == "audit_chain"} == set(KEYS)
        assert evaluations[("audit_chain", KEYS[1])] is False
        assert evaluations[("reconciliation", KEYS[1])] is False
        assert evaluations[("audit_chain", KEYS[0])] is True


def test_a_stray_manifest_deeper_in_the_lake_stops_neither_lake_drift_nor_the_checks(setup: Any) -> None:
    """A `_manifest.json` planted below a partition (`<key>/x/_manifest.json`: no commit point, `pcbo
    verify` names it `lake_path_unexpected`) made every listing of committed keys raise: the
    `lake_drift` sensor failed on every tick (no dataset's drift was found any more) and the checks
    job launched alone, or any run's `coverage` check, failed with an internal error."""
    tmp_path, config, engine, defs = setup
    lake = tmp_path / "pcbo-home" / "lake" / "events" / "v1"
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        (lake / KEYS[0] / "x").mkdir()
        (lake / KEYS[0] / "x" / "_manifest.json").write_text("{}")
        next((lake / KEYS[2]).glob("part-*.parquet")).unlink()

        tick = _drift_tick(defs, instance, engine)
        [request] = tick.run_requests
        assert request.tags["dagster/asset_partition_range_start"] == KEYS[2]
        # Launched alone (every committed partition): the verdicts, not an error.
        checks = defs.resolve_job_def("events_checks").execute_in_process(
            instance=instance, raise_on_error=False
        )
        evaluations = {(e.check_name, e.partition): e.passed for e in checks.get_asset_check_evaluations()}
        assert evaluations[("reconciliation", KEYS[2])] is False
        assert evaluations[("reconciliation", KEYS[0])] is True
        assert evaluations[("coverage", None)] is True
        with engine.environment() as env:
            found = {(f["kind"], f["where"]) for f in verify(env)["findings"]}
        assert ("lake_path_unexpected", f"events/v1/{KEYS[0]}/x/_manifest.json") in found


def _open_ledger_sensor(tmp_path: Path) -> Any:
    """The key-adding sensor of the example's `ledgers` made open-ended, its source `ledgers.jsonl`."""
    from pcbo_dagster.dagster_defs.backfill.assets import build_dataset_asset
    from pcbo_dagster.dagster_defs.backfill.sensors import build_ledger_partitions_sensor

    text = (tmp_path / "datasets.yaml").read_text()
    lines = [line for line in text.splitlines() if "lastLedger:" not in line]
    (tmp_path / "open.yaml").write_text("\n".join(lines) + "\n")
    config = load_datasets_config(tmp_path / "open.yaml")
    dataset = config.dataset("ledgers")
    return build_ledger_partitions_sensor(config, dataset, build_dataset_asset(config, dataset))


def _ledger_tick(sensor: Any, instance: Any, engine: PcboEngineResource) -> Any:
    with dg.build_sensor_context(instance=instance, resources={"pcbo": engine}) as context:
        return sensor(context)


def test_the_ledger_partitions_sensor_reads_its_source_within_the_engines_bounds(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source is untrusted input: a JSONL line longer than PCBO_MAX_LINE_BYTES is refused by every
    engine read. The sensor read it whole into memory (a line of gigabytes, or /dev/zero's endless
    one, held the daemon's sensor process), and found keys the run then refuses."""
    tmp_path, config, engine, defs = setup
    sensor = _open_ledger_sensor(tmp_path)
    source = tmp_path / "demo_data" / "ledgers.jsonl"
    monkeypatch.setenv("PCBO_MAX_LINE_BYTES", "4096")
    with source.open("a") as fh:
        fh.write('{"ledgerSequence": 999999, "pad": "' + "x" * 100_000 + '"}\n')
    with dg.instance_for_test() as instance:
        result = _ledger_tick(sensor, instance, engine)
    assert isinstance(result, dg.SkipReason), result
    assert "PCBO_MAX_LINE_BYTES" in (result.skip_message or "")


def test_a_source_s_huge_ledger_makes_the_sensor_build_no_more_keys_than_it_adds(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: one record of the source with a huge ledger (`2**53 - 1`) made the sensor
    build the key of every full partition up to it (10**14 keys: a tick that never ends, holding the
    daemon's memory until it is killed) before keeping the first `MAX_PARTITIONS`. Only the keys it
    adds are built; the warning still says how many partitions are full."""
    from pcbo_dagster.core.partition_keys import LedgerGrid
    from pcbo_dagster.core.request_model import MAX_PARTITIONS

    tmp_path, config, engine, defs = setup
    sensor = _open_ledger_sensor(tmp_path)
    with (tmp_path / "demo_data" / "ledgers.jsonl").open("a") as fh:
        fh.write('{"ledgerSequence": 9007199254740991}\n')
    built = 0
    span = LedgerGrid.span

    def counted(self: LedgerGrid, index: int) -> Any:
        nonlocal built
        built += 1
        if built > MAX_PARTITIONS:
            raise AssertionError(f"the sensor built more than {MAX_PARTITIONS} keys")
        return span(self, index)

    monkeypatch.setattr(LedgerGrid, "span", counted)
    with dg.instance_for_test() as instance:
        result = _ledger_tick(sensor, instance, engine)
    assert isinstance(result, dg.SensorResult), result
    [added] = result.dynamic_partitions_requests or []
    assert (
        added.partition_keys is not None
        and len(added.partition_keys) == MAX_PARTITIONS
        and added.partition_keys[0] == "range=2-65"
    )


def test_the_ledger_partitions_sensor_does_not_block_on_a_fifo_source(setup: Any) -> None:
    """A FIFO where the source should be (no writer): every engine read refuses it at once (not a
    regular file); the sensor's tick blocked for ever opening it."""
    import os
    import threading

    tmp_path, config, engine, defs = setup
    sensor = _open_ledger_sensor(tmp_path)
    source = tmp_path / "demo_data" / "ledgers.jsonl"
    source.unlink()
    os.mkfifo(source)
    outcome: list[Any] = []
    with dg.instance_for_test() as instance:
        worker = threading.Thread(target=lambda: outcome.append(_ledger_tick(sensor, instance, engine)))
        worker.daemon = True
        worker.start()
        worker.join(20)
        if worker.is_alive():  # unblock the opener so the thread ends, then fail
            with open(source, "wb"):
                pass
            worker.join(20)
            pytest.fail("the sensor's tick blocked on the FIFO")
    [result] = outcome
    assert isinstance(result, dg.SkipReason), result
    assert "not a regular file" in (result.skip_message or "")


def test_the_ledger_partitions_sensor_skips_a_corrupt_parquet_source_saying_so(setup: Any) -> None:
    tmp_path, config, engine, defs = setup
    text = (tmp_path / "datasets.yaml").read_text()
    text = text.replace("uri: demo_data/ledgers.jsonl\n      format: jsonl", "uri: demo_data/ledgers.parquet")
    (tmp_path / "datasets.yaml").write_text(text)
    (tmp_path / "demo_data" / "ledgers.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    sensor = _open_ledger_sensor(tmp_path)
    with dg.instance_for_test() as instance:
        result = _ledger_tick(sensor, instance, engine)
    assert isinstance(result, dg.SkipReason), result
    assert "cannot be read" in (result.skip_message or "")


SQL_CONFIG = """
version: 1
datasets:
  - name: events_sql
    partitioning:
      {kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-02T00:00:00Z"}
    source: {uri: demo_data/events.jsonl, format: jsonl}
    policies: {requireConsent: true, allowedJurisdictions: [US, CA]}
    target:
      kind: sql
      url: sqlite:///target.db
      table: events
      key: [id]
      conflict: overwrite
      columns: {id: id, occurredAt: occurred_at, amount: amount, channel: channel}
      chunkRows: 16
"""


def test_the_sql_read_back_check_does_not_take_a_backup_alone_for_the_chain(tmp_path: Path) -> None:
    """A SQL target's rows rewritten together with the audit backup (a genuine apply of other data,
    made with a copy of the pcbo home; the catalog's copy of the chain untouched): `pcbo verify`
    names the stores' disagreement, but `sql_read_back` replayed the backup's raw lines and passed
    the rewritten partition. It must read the chain as the `audit_chain` check does (verified against
    the catalog's head) and fail."""
    import json
    import sqlite3

    from pcbo_dagster_tests.sql_target_helpers import create_demo_events_table, sqlite_url

    keys = [f"20240101T{h:02d}0000Z" for h in range(3)]
    tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
    target = tmp_path / "target.db"
    create_demo_events_table(sqlite_url(target))
    real, shadow = tmp_path / "real", tmp_path / "shadow"
    for root in (real, shadow):
        root.mkdir()
        (root / "datasets.yaml").write_text(SQL_CONFIG.replace("sqlite:///target.db", sqlite_url(target)))
        generate_demo_data(root / "demo_data")
    # The attacker's data: hour 1's amounts changed.
    source = shadow / "demo_data" / "events.jsonl"
    lines = []
    for line in source.read_text().splitlines():
        record = json.loads(line)
        if str(record.get("occurredAt")).startswith("2024-01-01T01:") and isinstance(
            record.get("amount"), int
        ):
            record["amount"] += 1000
        lines.append(json.dumps(record))
    source.write_text("\n".join(lines) + "\n")

    def location(root: Path, home: Path) -> tuple[PcboEngineResource, dg.Definitions]:
        engine = PcboEngineResource(home=str(home))
        return engine, build_definitions(load_datasets_config(root / "datasets.yaml"), resource=engine)

    engine, defs = location(real, tmp_path / "home")
    asset = [dg.AssetKey("events_sql")]
    with dg.instance_for_test() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, tags=tags, asset_selection=asset).success
        # The forgery: a copy of the pcbo home applies hour 1 again from the attacker's data (into the
        # same table); then the copy's audit backup is put in place of the real one. The catalog is not.
        shutil.copytree(tmp_path / "home", tmp_path / "home-copy")
        _, shadow_defs = location(shadow, tmp_path / "home-copy")
        with dg.instance_for_test() as shadow_instance:
            again = shadow_defs.resolve_implicit_global_asset_job_def().execute_in_process(
                instance=shadow_instance, partition_key=keys[1], asset_selection=asset
            )
            assert again.success
        for chain_file in (tmp_path / "home-copy" / "pas" / "events_sql").glob("v1*"):
            shutil.copy(chain_file, tmp_path / "home" / "pas" / "events_sql" / chain_file.name)
        with sqlite3.connect(target) as conn:
            assert conn.execute("SELECT max(amount) FROM events").fetchone()[0] >= 1000
        with engine.environment() as env:
            assert verify(env)["findings"]  # the stores disagree

        checks = defs.resolve_job_def("events_sql_checks").execute_in_process(
            instance=instance, tags=tags, raise_on_error=False
        )
        verdicts = {e.partition: e.passed for e in checks.get_asset_check_evaluations()}
        assert set(verdicts) == set(keys)
        assert not any(verdicts.values()), verdicts
        assert not checks.success


def test_a_rollout_row_that_is_not_json_stops_no_sensor_and_not_verify(setup: Any) -> None:
    """A `rollouts` row written by hand whose `partition_keys` (or `throttle`) is not JSON, and a
    `soak_evaluations` row whose `detail` is not: the promotion sensor and the soak schedule failed on
    every tick (no rollout was promoted any more) and `pcbo verify` ended in an internal error
    (JSONDecodeError) instead of naming the rows. Such a row disagrees with the chain, opens nothing
    and is a finding."""
    import sqlite3
    from datetime import UTC, datetime

    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.settings import Settings

    tmp_path, config, engine, defs = setup
    settings = Settings.resolve(home=engine.home, env={})
    Environment.open(settings).close()  # the catalog, migrated
    with sqlite3.connect(Path(engine.home or "") / "catalog.db") as conn:
        conn.execute(
            "INSERT INTO rollouts (name, dataset, version_label, first_key, last_key, partition_keys, "
            "throttle, soak_window_seconds, status, control, created_by, created_at, updated_at) VALUES "
            "('evil', 'sessions', 'v1', ?, ?, 'not json', '{', 60, 'soaking', 'run', 'x', "
            "'2024-01-01 00:00:00', '2024-01-01 00:00:00')",
            (KEYS[0], KEYS[-1]),
        )
        conn.execute(
            "INSERT INTO soak_evaluations (rollout, evaluated_at, passed, detail) "
            "VALUES ('evil', '2024-01-01 00:00:00', 1, '[[[')"
        )
    with dg.instance_for_test() as instance:
        sensor = defs.resolve_sensor_def("rollout_promotion")
        with dg.build_sensor_context(instance=instance, resources={"pcbo": engine}) as context:
            waiting = sensor(context)
        assert isinstance(waiting, dg.SkipReason), waiting
        assert "evil" in (waiting.skip_message or "")
        schedule = defs.resolve_schedule_def("soak_monitor_schedule")
        tick = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
        with dg.build_schedule_context(
            instance=instance, resources={"pcbo": engine}, scheduled_execution_time=tick
        ) as context:
            skipped = schedule.evaluate_tick(context)
        # Not soaking by the production chain: nothing to evaluate, and the tick says so.
        assert not skipped.run_requests, skipped.run_requests
        assert "evil: the production audit chain says not staged" in (skipped.skip_message or "")
    env = Environment.open(settings)
    try:
        found = {(f["kind"], f["where"]) for f in verify(env)["findings"]}
    finally:
        env.close()
    assert ("rollout_not_on_chain", "sessions/v1 rollout evil") in found
    assert ("soak_evaluation_not_on_chain", "sessions/v1 rollout evil") in found


def test_a_commit_point_outside_the_assets_partitions_does_not_stop_lake_drifts_checks(setup: Any) -> None:
    """A manifest planted under a key the asset does not have (before its start) next to a real
    damage (a deleted data file): `lake_drift` put both into one checks run whose range began at the
    planted key, which Dagster refused (`CheckError`: the range starts before the partitions
    definition); the damaged partition's checks never ran and it never turned red. Keys outside the
    asset's partitions are left to `pcbo verify`; the damaged partition's checks are launched."""
    import json

    tmp_path, config, engine, defs = setup
    lake = tmp_path / "pcbo-home" / "lake" / "events" / "v1"
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        outside = "20230101T000000Z"
        manifest = json.loads((lake / KEYS[0] / "_manifest.json").read_text())
        manifest["partition"]["key"] = outside
        (lake / outside).mkdir()
        (lake / outside / "_manifest.json").write_text(json.dumps(manifest))
        next((lake / KEYS[2]).glob("part-*.parquet")).unlink()

        tick = _drift_tick(defs, instance, engine)
        assert isinstance(tick, dg.SensorResult) and tick.run_requests, tick
        [request] = tick.run_requests
        assert request.tags["dagster/asset_partition_range_start"] == KEYS[2]
        assert request.tags["dagster/asset_partition_range_end"] == KEYS[2]
        checks = defs.resolve_job_def("events_checks").execute_in_process(
            instance=instance, tags=request.tags, raise_on_error=False
        )
        failed = {(e.check_name, e.partition) for e in checks.get_asset_check_evaluations() if not e.passed}
        assert ("reconciliation", KEYS[2]) in failed
        with engine.environment() as env:
            found = {(f["kind"], f["where"].split(" ")[0]) for f in verify(env)["findings"]}
        assert any(outside in where for _, where in found), found


def test_lake_drift_checks_only_the_drifted_partitions_not_a_rolled_back_one_between_them(setup: Any) -> None:
    """Two partitions damaged on either side of one rolled back (legitimately: on the chain, reported to
    the instance): `lake_drift` launched one checks run over the range first..last drifted, which
    checked the rolled-back partition too and failed it ("no committed manifest"), marking a partition
    that is what the chain says red and the asset unhealthy. Each run's range holds drifted
    partitions only."""
    tmp_path, config, engine, defs = setup
    lake = tmp_path / "pcbo-home" / "lake" / "events" / "v1"
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        rolled_back = defs.resolve_job_def("events_rollback").execute_in_process(
            instance=instance, tags={"dagster/partition": KEYS[1]}
        )
        assert rolled_back.success
        assert _drift_tick(defs, instance, engine).skip_message.startswith("no drift"), "before the damage"
        for key in (KEYS[0], KEYS[2]):
            with next((lake / key).glob("part-*.parquet")).open("ab") as data:
                data.write(b"x")

        tick = _drift_tick(defs, instance, engine)
        assert isinstance(tick, dg.SensorResult) and tick.run_requests, tick
        failed: set[tuple[str, str | None]] = set()
        for request in tick.run_requests:
            checks = defs.resolve_job_def("events_checks").execute_in_process(
                instance=instance, tags=request.tags, raise_on_error=False
            )
            failed |= {
                (e.check_name, e.partition) for e in checks.get_asset_check_evaluations() if not e.passed
            }
        assert ("reconciliation", KEYS[0]) in failed and ("reconciliation", KEYS[2]) in failed, failed
        assert not {f for f in failed if f[1] == KEYS[1]}, failed
        assert len({r.run_key for r in tick.run_requests}) == len(tick.run_requests)


def test_the_checks_name_a_dynamic_key_added_by_hand_off_the_grid(setup: Any) -> None:
    """A UI user adds a dynamic partition key to an open-ended ledger dataset by hand (`..` or
    `range=2-65/../..`) and runs its checks over it: the step ended in an internal error (the lake's
    `OutsidePartition`, confinement holding); the asset's own run refuses the key naming it, and so
    must the checks."""
    from pcbo_dagster.dagster_defs.partitions import dynamic_partitions_name

    tmp_path, config, engine, defs = setup
    text = (tmp_path / "datasets.yaml").read_text()
    lines = [line for line in text.splitlines() if "lastLedger:" not in line]
    (tmp_path / "open.yaml").write_text("\n".join(lines) + "\n")
    config = load_datasets_config(tmp_path / "open.yaml")
    defs = build_definitions(config, resource=engine)
    name = dynamic_partitions_name(config.dataset("ledgers"))
    with dg.instance_for_test() as instance:
        for key in ["range=2-65/../..", ".."]:
            instance.add_dynamic_partitions(name, [key])
            checks = defs.resolve_job_def("ledgers_checks").execute_in_process(
                instance=instance,
                raise_on_error=False,
                tags={"dagster/asset_partition_range_start": key, "dagster/asset_partition_range_end": key},
            )
            assert not checks.success
            [failure] = [e for e in checks.all_events if e.event_type_value == "STEP_FAILURE"]
            data = failure.step_failure_data
            assert data.user_failure_data is not None, data.error
            assert f"partition key {key!r} is not" in (data.user_failure_data.description or "")


@pytest.mark.parametrize(
    "report",
    [
        '{"launch": {"status": "requested"}, "plan": {"planId": "sha256:ab", "partitions": '
        '[{"key": "20990101T000000Z", "rollout": "r1"}]}}',
        '{"launch": {"status": "requested"}, "plan": {"planId": "sha256:ab", "partitions": [{"key": "',
        '{"launch": {"status": "requested"}}',
        '{"launch": {"status": "requested"}, "plan": {"planId": "x", "partitions": '
        '[{"key": ["a"], "rollout": "r"}]}}',
    ],
)
def test_a_health_report_the_repairs_sensor_cannot_use_stops_no_repair(
    setup: Any, report: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`production_health_repairs` reads the health check's report file: one that names a key the
    dataset no longer has (its config changed since), is cut short or lacks its plan made every tick
    fail with a KeyError or JSONDecodeError, for every dataset. The tick says what it skips instead."""
    tmp_path, config, engine, defs = setup
    monkeypatch.setenv("PCBO_REPORTS_DIR", str(tmp_path / "reports"))
    path = tmp_path / "reports" / "health" / "sessions" / "health_report.json"
    path.parent.mkdir(parents=True)
    path.write_text(report)
    sensor = defs.resolve_sensor_def("production_health_repairs")
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources={"pcbo": engine}) as context:
            result = sensor(context)
    assert isinstance(result, dg.SkipReason), result
    assert "sessions" in (result.skip_message or "")


SOAK_CONFIG = """
version: 1
datasets:
  - name: sessions
    partitioning:
      {kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-01T03:00:00Z"}
    source: {uri: sessions.jsonl, format: jsonl}
    policies: {requireConsent: true, allowedJurisdictions: [US, CA], onViolation: omit}
    rollout:
      soak: {windowMinutes: 30}
      businessMetric: {name: conversion_rate, expression: mean(converted), atLeast: 0.9}
"""


def test_the_soak_does_not_judge_staging_files_its_chain_never_committed(tmp_path: Path) -> None:
    """The soak's business metric read the staging lake's commit points as they were: partitions
    rewritten self-consistently (manifest, files, checksums and Merkle root all agreeing; same ids,
    `converted` set everywhere; made by a genuine apply on a copy of the stores) passed a soak the
    real output fails (75% converted, at least 90% required), with nothing on the staging chain
    behind them. Each partition's commit point must be the version its audit chain committed.

    The rollout is staged the CLI's way (`pcbo rollout start`: no soak check in that run), so the
    forgery is in place before the soak's first evaluation, and that one evaluation (a failure is
    final: the soak is never evaluated again) judges it."""
    import json
    from datetime import UTC, datetime

    from pcbo_dagster.catalog.rollouts import RolloutStore
    from pcbo_dagster.datasets.config import DatasetsConfig, parse_datasets_config
    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster.rollout import operations
    from pcbo_dagster.rollout.clock import ManualClock

    keys = KEYS
    tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
    real, shadow = tmp_path / "real", tmp_path / "shadow"

    def records(all_converted: bool) -> str:
        rows = [
            {
                "id": f"ses-{h}-{n}",
                "occurredAt": f"2024-01-01T{h:02d}:{n * 7:02d}:00Z",
                "jurisdiction": "US",
                "consentGranted": True,
                "converted": all_converted or n % 4 != 0,
            }
            for h in range(3)
            for n in range(8)
        ]
        return "".join(json.dumps(r) + "\n" for r in rows)

    clock = ManualClock(datetime(2026, 11, 22, 9, 0, tzinfo=UTC))

    def location(
        root: Path, home: Path, all_converted: bool
    ) -> tuple[DatasetsConfig, PcboEngineResource, dg.Definitions]:
        root.mkdir(exist_ok=True)
        (root / "sessions.jsonl").write_text(records(all_converted))
        config = parse_datasets_config(SOAK_CONFIG, base_dir=root)
        engine = PcboEngineResource(home=str(home))
        return config, engine, build_definitions(config, engine, clock=clock)

    config, engine, defs = location(real, tmp_path / "home", all_converted=False)
    operations.start(
        config, engine.settings(), "sessions", keys[0], keys[-1], by="ana", name="r1", clock=clock
    )
    # The forgery: on a copy of the homes, another rollout stages the same ids with `converted` set
    # everywhere; its staging partitions are then put in place of the real ones.
    shutil.copytree(tmp_path / "home", tmp_path / "home-copy")
    _, _, shadow_defs = location(shadow, tmp_path / "home-copy", all_converted=True)
    with dg.instance_for_test() as shadow_instance:
        result = shadow_defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=shadow_instance,
            asset_selection=[dg.AssetKey(["staging", "sessions"])],
            tags=tags,
            run_config={"ops": {"staging__sessions": {"config": {"rollout": "r2", "by": "ana"}}}},
        )
        assert result.success
    lake = Path("staging") / "lake" / "sessions" / "v1"
    for key in keys:
        shutil.rmtree(tmp_path / "home" / lake / key)
        shutil.copytree(tmp_path / "home-copy" / lake / key, tmp_path / "home" / lake / key)

    clock.advance(31 * 60)  # the window is over: this first evaluation decides the soak
    with dg.instance_for_test() as instance:
        soak = defs.resolve_job_def("soak_monitor").execute_in_process(
            instance=instance, raise_on_error=False
        )
        [evaluation] = [e for e in soak.get_asset_check_evaluations() if e.check_name == "soak"]
    assert not evaluation.passed
    env = Environment.open(Settings.resolve(home=str(tmp_path / "home"), env={}))
    try:
        [row] = RolloutStore(env.catalog).soak_evaluations("r1")  # the soak's one evaluation
    finally:
        env.close()
    assert not row["passed"]
    checks = row["detail"]["checks"]
    assert checks["business_metric"]["passed"], checks["business_metric"]  # the forged rows' metric holds
    assert row["detail"]["failed_checks"] == ["checksums"], row["detail"]["failed_checks"]
    assert "commit_point_not_on_chain" in checks["checksums"]["message"], checks["checksums"]


def test_the_promotion_gate_does_not_take_staging_files_its_chain_never_committed(tmp_path: Path) -> None:
    """The promotion gate's staging check re-read each staging partition as its manifest says, like
    the soak did: partitions rewritten self-consistently (on a copy of the stores) passed it. They must
    hold it closed, naming them, as the staging chain never committed them."""
    import json
    from datetime import UTC, datetime

    from pcbo_dagster.datasets.config import parse_datasets_config
    from pcbo_dagster.rollout.clock import ManualClock

    tags = {"dagster/asset_partition_range_start": KEYS[0], "dagster/asset_partition_range_end": KEYS[-1]}
    clock = ManualClock(datetime(2026, 11, 22, 9, 0, tzinfo=UTC))

    def location(root: Path, home: Path, converted: bool) -> tuple[PcboEngineResource, dg.Definitions]:
        root.mkdir(exist_ok=True)
        rows = [
            {
                "id": f"ses-{h}-{n}",
                "occurredAt": f"2024-01-01T{h:02d}:{n * 7:02d}:00Z",
                "jurisdiction": "US",
                "consentGranted": True,
                "converted": converted,
            }
            for h in range(3)
            for n in range(4)
        ]
        (root / "sessions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        engine = PcboEngineResource(home=str(home))
        return engine, build_definitions(
            parse_datasets_config(SOAK_CONFIG, base_dir=root), engine, clock=clock
        )

    def stage(defs: dg.Definitions, instance: Any, name: str) -> None:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey(["staging", "sessions"])],
            tags=tags,
            run_config={"ops": {"staging__sessions": {"config": {"rollout": name, "by": "ana"}}}},
        )
        assert result.success

    engine, defs = location(tmp_path / "real", tmp_path / "home", converted=True)
    with dg.instance_for_test() as instance:
        stage(defs, instance, "r1")
        shutil.copytree(tmp_path / "home", tmp_path / "home-copy")
        _, shadow_defs = location(tmp_path / "shadow", tmp_path / "home-copy", converted=False)
        with dg.instance_for_test() as shadow_instance:
            stage(shadow_defs, shadow_instance, "r2")
        lake = Path("staging") / "lake" / "sessions" / "v1"
        shutil.rmtree(tmp_path / "home" / lake / KEYS[1])
        shutil.copytree(tmp_path / "home-copy" / lake / KEYS[1], tmp_path / "home" / lake / KEYS[1])
        sensor = defs.resolve_sensor_def("rollout_promotion")
        with dg.build_sensor_context(instance=instance, resources={"pcbo": engine}) as context:
            waiting = sensor(context)
    assert isinstance(waiting, dg.SkipReason), waiting
    text = waiting.skip_message or ""
    assert "staging checks failed" in text and KEYS[1] in text, text


def test_a_reversed_partition_range_is_refused_saying_so(setup: Any) -> None:
    """Launch tags typed in the launchpad with the range's start after its end: Dagster gives the run
    no partition at all; the asset's policy gate and the dry run ended in an internal IndexError, the
    staging apply too, and the checks job 'succeeded' having checked nothing. Each must fail saying
    the range holds no partition, nothing written."""
    tmp_path, config, engine, defs = setup
    reversed_range = {
        "dagster/asset_partition_range_start": KEYS[2],
        "dagster/asset_partition_range_end": KEYS[0],
    }
    jobs = {
        "events": defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={EVENTS}),
        "staging/sessions": defs.resolve_implicit_global_asset_job_def().get_subset(
            asset_selection={dg.AssetKey(["staging", "sessions"])}
        ),
        "events_dry_run": defs.resolve_job_def("events_dry_run"),
        "events_checks": defs.resolve_job_def("events_checks"),
    }
    with dg.instance_for_test() as instance:
        for name, job in jobs.items():
            result = job.execute_in_process(instance=instance, tags=reversed_range, raise_on_error=False)
            assert not result.success, name
            failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
            data = failures[0].step_failure_data
            assert data.user_failure_data is not None, (name, data.error)
            assert "holds no partition" in (data.user_failure_data.description or ""), name
    assert not (tmp_path / "pcbo-home" / "lake").exists()
    assert not (tmp_path / "pcbo-home" / "staging" / "lake").exists()


_START, _END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


@pytest.mark.parametrize(
    ("tags", "tag"),
    [
        ({"dagster/partition": "20240101T013000Z"}, "dagster/partition"),
        ({_START: "20240101T003000Z", _END: KEYS[1]}, _START),
        ({_START: KEYS[0], _END: "20240101T003000Z"}, _END),
        # past the partitions' end: Dagster's own check failed (CheckError), naming no tag
        ({"dagster/partition": "20300101T000000Z"}, "dagster/partition"),
    ],
)
def test_a_time_key_off_the_cron_grid_in_the_run_tags_is_refused_naming_the_tag(
    setup: Any, tags: dict[str, str], tag: str
) -> None:
    """Run tags typed by hand (launchpad, `dagster job launch --tags`, GraphQL) with a time key off the
    hourly grid: Dagster rounds `...T013000Z` to the window starting 02:00 and a range ending at
    `...T003000Z` to one ending with the 01:00 window, so the asset wrote, the dry run reported, the
    checks checked and the rollback undid partitions the tags do not name. Each must fail naming the
    tag, nothing written or undone."""
    tmp_path, config, engine, defs = setup
    asset_job = defs.resolve_implicit_global_asset_job_def()
    jobs = {
        "events": asset_job.get_subset(asset_selection={EVENTS}),
        "staging/sessions": asset_job.get_subset(asset_selection={dg.AssetKey(["staging", "sessions"])}),
        "events_dry_run": defs.resolve_job_def("events_dry_run"),
        "events_checks": defs.resolve_job_def("events_checks"),
        "events_rollback": defs.resolve_job_def("events_rollback"),
    }
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        with engine.environment() as env:
            before = verify(env)
        assert before["status"] == "clean", before
        for name, job in jobs.items():
            result = job.execute_in_process(instance=instance, tags=tags, raise_on_error=False)
            assert not result.success, name
            failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
            data = failures[0].step_failure_data
            assert data.user_failure_data is not None, (name, data.error)
            description = data.user_failure_data.description or ""
            assert tag in description and tags[tag] in description, (name, description)
    with engine.environment() as env:
        after = verify(env)
    assert after["status"] == "clean" and after["checked"] == before["checked"], after
    assert not (tmp_path / "pcbo-home" / "staging" / "lake").exists()
    assert not (tmp_path / "pcbo-home" / "reports" / "dry-runs").exists()


def test_a_reversed_range_on_a_sql_target_dataset_is_refused_too(tmp_path: Path) -> None:
    from pcbo_dagster_tests.sql_target_helpers import create_demo_events_table, query, sqlite_url

    (tmp_path / "datasets.yaml").write_text(SQL_CONFIG)
    generate_demo_data(tmp_path / "demo_data")
    url = sqlite_url(tmp_path / "target.db")
    create_demo_events_table(url)
    engine = PcboEngineResource(home=str(tmp_path / "home"))
    defs = build_definitions(load_datasets_config(tmp_path / "datasets.yaml"), resource=engine)
    reversed_range = {
        "dagster/asset_partition_range_start": KEYS[2],
        "dagster/asset_partition_range_end": KEYS[0],
    }
    with dg.instance_for_test() as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance,
            tags=reversed_range,
            asset_selection=[dg.AssetKey("events_sql")],
            raise_on_error=False,
        )
    assert not result.success
    [failure, *_] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    data = failure.step_failure_data
    assert data.user_failure_data is not None and "holds no partition" in (
        data.user_failure_data.description or ""
    )
    assert query(url, "SELECT count(*) FROM events")[0][0] == 0


def test_the_promotion_sensor_launches_again_after_a_stop_once_a_new_approval_opens_the_gate(
    tmp_path: Path,
) -> None:
    """A rejection recorded while the promotion wrote stopped it; the approver then approved again,
    the gate opened, and the sensor launched nothing: its run key (`promote:<rollout>:<decision
    hash>`) was the stopped run's, which Dagster launches once. The promotion had to be run by hand.
    A new approval signed after the rejection gives a new run key, launched once."""
    from pcbo_dagster.core.errors import Blocked
    from pcbo_dagster.rollout import operations, promotion
    from pcbo_dagster.rollout.clock import ManualClock
    from pcbo_dagster_tests.approver_keys import BO, CY
    from pcbo_dagster_tests.test_rollout_red_team import K0, K2, T0, _config

    config = _config(tmp_path)
    engine = PcboEngineResource(home=str(tmp_path / "home"))
    base = engine.settings()
    clock = ManualClock(T0)
    defs = build_definitions(config, engine, clock=clock)
    operations.start(config, base, "sessions", K0, K2, by="ana", name="r", clock=clock)
    clock.advance(300)
    operations.soak(config, base, clock=clock)
    operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)

    def tick(instance: dg.DagsterInstance) -> Any:
        sensor = defs.resolve_sensor_def("rollout_promotion")
        with dg.build_sensor_context(instance=instance, resources={"pcbo": engine}) as context:
            return sensor(context)

    with dg.instance_for_test() as instance:
        [first] = tick(instance).run_requests
        rejected: list[str] = []

        def reject_once(_count: int) -> None:  # the approver rejects while production is being written
            if not rejected:
                clock.advance(1)
                operations.decide(config, base, "r", "reject", key=CY, reason="wrong numbers", clock=clock)
                rejected.append("yes")

        with operations.rollout_environments(config, base, "r") as (dataset, envs):
            with pytest.raises(Blocked) as blocked:  # the first request's promotion, stopped
                promotion.promote_rollout(
                    config, dataset, envs, "r", by="dee", clock=clock, progress=reject_once
                )
        assert blocked.value.document["status"] == "stopped"
        waiting = tick(instance)
        assert isinstance(waiting, dg.SkipReason) and "rejected by" in (waiting.skip_message or "")

        clock.advance(60)
        operations.decide(config, base, "r", "approve", key=CY, reason="numbers fixed", clock=clock)
        # A promotion run of the rollout still running (launched before the stop): nothing beside it.
        running = instance.create_run_for_job(
            defs.resolve_job_def(first.job_name or ""), tags=first.tags, status=dg.DagsterRunStatus.STARTED
        )
        waiting = tick(instance)
        assert isinstance(waiting, dg.SkipReason), waiting
        assert f"its promotion run {running.run_id} has not finished yet" in (waiting.skip_message or "")
        instance.report_run_canceled(running)
        [again] = tick(instance).run_requests
        assert again.run_key != first.run_key  # launched: a run key Dagster has not seen
        assert again.run_key.startswith(first.run_key + ":after:")
        # The same approvals give the same key (launched once), another approval of the hash included.
        operations.decide(config, base, "r", "approve", key=BO, reason="agreed", clock=clock)
        assert [r.run_key for r in tick(instance).run_requests] == [again.run_key]

        run = defs.resolve_job_def(again.job_name or "").execute_in_process(
            instance=instance, tags=again.tags, raise_on_error=False
        )
        assert run.success
    with operations.rollout_environments(config, base, "r") as (_, envs):
        assert envs.store.require("r")["status"] == "promoted"


def test_a_rollout_row_naming_no_chain_stops_no_sensor_and_no_schedule(setup: Any) -> None:
    """A `rollouts` row written by hand whose version label cannot be part of a chain key (`../x`):
    reading its production chain raised a ValueError, which neither the promotion sensor nor the soak
    schedule caught, so every tick failed and no rollout was promoted or soaked any more. Such a row
    names no chain: nothing about it can be trusted, the gate stays closed and the tick goes on."""
    import sqlite3
    from datetime import UTC, datetime

    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.settings import Settings

    tmp_path, config, engine, defs = setup
    Environment.open(Settings.resolve(home=engine.home, env={})).close()  # the catalog, migrated
    with sqlite3.connect(Path(engine.home or "") / "catalog.db") as conn:
        conn.execute(
            "INSERT INTO rollouts (name, dataset, version_label, first_key, last_key, partition_keys, "
            "throttle, soak_window_seconds, status, control, created_by, created_at, updated_at) VALUES "
            "('evil', 'sessions', '../x', ?, ?, ?, '{}', 60, 'soaking', 'run', 'x', "
            "'2024-01-01 00:00:00', '2024-01-01 00:00:00')",
            (KEYS[0], KEYS[-1], json.dumps(KEYS)),
        )
    with dg.instance_for_test() as instance:
        sensor = defs.resolve_sensor_def("rollout_promotion")
        with dg.build_sensor_context(instance=instance, resources={"pcbo": engine}) as context:
            waiting = sensor(context)
        assert isinstance(waiting, dg.SkipReason), waiting
        assert "evil: nothing on the production audit chain can be trusted" in (waiting.skip_message or "")
        schedule = defs.resolve_schedule_def("soak_monitor_schedule")
        tick = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
        with dg.build_schedule_context(
            instance=instance, resources={"pcbo": engine}, scheduled_execution_time=tick
        ) as context:
            [request] = schedule.evaluate_tick(context).run_requests or []  # its error, in the run
        soak = defs.resolve_job_def("soak_monitor").execute_in_process(
            instance=instance, tags=request.tags, raise_on_error=False
        )
        [evaluation] = [e for e in soak.get_asset_check_evaluations() if e.check_name == "soak"]
        assert not evaluation.passed
    env = Environment.open(Settings.resolve(home=engine.home, env={}))
    try:
        kinds = {f["kind"] for f in verify(env)["findings"]}
    finally:
        env.close()
    assert "rollout_not_on_chain" in kinds, kinds


def test_coverage_does_not_take_a_forged_commit_point_for_a_committed_partition(setup: Any) -> None:
    """A partition rolled back on the chain (a gap), its commit point written back into the lake by
    hand: `coverage` counted the commit points it found in the lake, so the forged one filled the gap
    and it passed. Now the committed partitions are the chain's (verified), the lake compared against
    them: the gap stays a gap and the lake's uncommitted commit point is named."""
    tmp_path, config, engine, defs = setup
    part = tmp_path / "pcbo-home" / "lake" / "events" / "v1" / KEYS[1]
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        shutil.copytree(part, tmp_path / "kept")
        with engine.environment() as env:
            rollback(env, "events", "v1", partition_keys=[KEYS[1]], reason="withdrawn")
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(tmp_path / "kept", part)
        checks = defs.resolve_job_def("events_checks").execute_in_process(
            instance=instance, raise_on_error=False
        )
        [coverage] = [e for e in checks.get_asset_check_evaluations() if e.check_name == "coverage"]
        assert not coverage.passed
        assert coverage.metadata["gaps"].value == 1
        assert coverage.metadata["first_gaps"].value == [KEYS[1]]
        assert coverage.metadata["uncommitted_in_lake"].value == [KEYS[1]]


def test_lake_drift_does_not_report_a_rollback_the_operators_key_did_not_sign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PCBO_SIGNING_KEY, a partition rolled back by someone without the key (the stores written by
    hand: every hash right, no signature): the `audit_chain` check and every run refuse that chain,
    but `lake_drift` read it as the checks did before (hashes alone), found the lake agreeing and
    reported the deletion as a rollback (the asset's materialization wiped, nothing red). Now it reads
    the chain as the checks do: the drift launches the checks, nothing is reported."""
    from pcbo_dagster.core.signed_note import signing_key_from_seed
    from pcbo_dagster.engine import partition_checks
    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster_tests.approver_keys import key_file

    operator = signing_key_from_seed("ops.example/operator", bytes([36]) * 32)
    monkeypatch.setenv("PCBO_SIGNING_KEY", str(key_file(tmp_path, operator)))
    tmp_path, config, engine, defs = example_location(tmp_path)
    with dg.instance_for_test() as instance:
        assert _materialize(defs, instance).success
        # The forger's own code: the engine's rollback without the refusal of a writer lacking the key.
        monkeypatch.setattr(partition_checks, "refuse_writer_without_the_chains_key", lambda *a: None)
        env = Environment.open(Settings.resolve(home=engine.home, env={}))
        try:
            rollback(env, "events", "v1", partition_keys=[KEYS[0]], reason="forged")
        finally:
            env.close()
        monkeypatch.undo()
        monkeypatch.setenv("PCBO_SIGNING_KEY", str(key_file(tmp_path, operator)))

        _assert_drift_launches_failing_checks(defs, instance, engine)


def test_the_sql_read_back_check_fails_on_an_event_the_operators_key_did_not_sign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PCBO_SIGNING_KEY, an event appended to a SQL target's chain without the key (backup and
    catalog alike, every hash right): runs, `verify` and the `audit_chain` check refuse that chain,
    but `sql_read_back` read its hashes alone and passed every partition. Now it reads the chain as
    `audit_chain` does and fails them ("the audit chain does not verify")."""
    from pcbo_dagster.core.signed_note import signing_key_from_seed
    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster_tests.approver_keys import key_file
    from pcbo_dagster_tests.sql_target_helpers import create_demo_events_table, sqlite_url

    operator = signing_key_from_seed("ops.example/operator", bytes([36]) * 32)
    monkeypatch.setenv("PCBO_SIGNING_KEY", str(key_file(tmp_path, operator)))
    tags = {"dagster/asset_partition_range_start": KEYS[0], "dagster/asset_partition_range_end": KEYS[-1]}
    target = tmp_path / "target.db"
    create_demo_events_table(sqlite_url(target))
    (tmp_path / "datasets.yaml").write_text(SQL_CONFIG.replace("sqlite:///target.db", sqlite_url(target)))
    generate_demo_data(tmp_path / "demo_data")
    engine = PcboEngineResource(home=str(tmp_path / "home"))
    defs = build_definitions(load_datasets_config(tmp_path / "datasets.yaml"), resource=engine)
    with dg.instance_for_test() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        asset = [dg.AssetKey("events_sql")]
        assert job.execute_in_process(instance=instance, tags=tags, asset_selection=asset).success
        env = Environment.open(Settings.resolve(home=engine.home, env={}))
        try:  # (no key: what someone without it appends)
            env.audit.append(
                "events_sql/v1", "partition_commit_intent", {"partitions": [], "run_id": "forged"}
            )
        finally:
            env.close()
        checks = defs.resolve_job_def("events_sql_checks").execute_in_process(
            instance=instance, tags=tags, raise_on_error=False
        )
        verdicts = {e.partition: e for e in checks.get_asset_check_evaluations()}
        assert set(verdicts) == set(KEYS)
        assert not any(e.passed for e in verdicts.values()), verdicts
        assert verdicts[KEYS[0]].metadata["finding"].value == "the audit chain does not verify"

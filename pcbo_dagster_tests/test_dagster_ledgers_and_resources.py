"""Ledger-range datasets through Dagster: range backfills on the engine, checks, the key-adding sensor
for open-ended ranges; and the catalog/lake/audit/sources resources bound to the PCBO_* variables."""

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import dagster as dg
else:
    dg = pytest.importorskip("dagster")

from pcbo_dagster.dagster_defs.backfill.assets import build_dataset_asset  # noqa: E402
from pcbo_dagster.dagster_defs.backfill.checks import build_dataset_checks  # noqa: E402
from pcbo_dagster.dagster_defs.backfill.sensors import build_ledger_partitions_sensor, max_ledger_in_source  # noqa: E402
from pcbo_dagster.dagster_defs.definitions import build_definitions  # noqa: E402
from pcbo_dagster.dagster_defs.partitions import dynamic_partitions_name  # noqa: E402
from pcbo_dagster.dagster_defs.resources import (  # noqa: E402
    AuditResource,
    CatalogResource,
    LakeResource,
    PcboEngineResource,
    SourcesResource,
)
from pcbo_dagster.datasets.config import (  # noqa: E402
    DEFAULT_DATASETS_CONFIG,  # noqa: E402
    DatasetsConfig,
    load_datasets_config,
)
from pcbo_dagster.datasets.demo_data import demo_ledgers  # noqa: E402
from pcbo_dagster.datasets.requests import (  # noqa: E402
    build_ledger_request,
    ledger_request_groups,
    ledger_spans_for_keys,
)
from pcbo_dagster.engine.request_loading import evaluate, load_request  # noqa: E402
from pcbo_dagster.engine.verify import verify  # noqa: E402
from pcbo_dagster_tests.example_location import example_workdir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = DEFAULT_DATASETS_CONFIG  # the example shipped in the package
LEDGER_KEYS = [f"range={2 + 64 * i}-{65 + 64 * i}" for i in range(10)]
CHECKS = {"reconciliation", "policy_compliance", "audit_chain"}
PCBO_VARS = (
    "PCBO_HOME",
    "PCBO_LAKE_URL",
    "PCBO_CATALOG_URL",
    "PCBO_AUDIT_DIR",
    "PCBO_AUDIT_ENDPOINT",
    "PCBO_SOURCES_DIR",
    "PCBO_DATASETS_CONFIG",
)


def _range_tags(start: str, end: str) -> dict[str, str]:
    return {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}


@pytest.fixture(autouse=True)
def _no_pcbo_variables(monkeypatch):
    for var in PCBO_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return example_workdir(tmp_path)


@pytest.fixture
def engine(tmp_path: Path) -> PcboEngineResource:
    return PcboEngineResource(home=str(tmp_path / "pcbo-home"))


def _config_with(workdir: Path, old: str, new: str) -> DatasetsConfig:
    text = (workdir / "datasets.yaml").read_text()
    assert old in text
    path = workdir / "custom.yaml"
    path.write_text(text.replace(old, new))
    return load_datasets_config(path)


def _ledger_mats(result: dg.ExecuteInProcessResult) -> list:
    """The run's ledger materializations in ledger order (Dagster does not keep the emission order)."""
    mats = result.asset_materializations_for_node("ledgers")
    return sorted(mats, key=lambda m: m.metadata["ledger_first"].value)


def _tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, pcbo: PcboEngineResource):
    """One evaluation of the sensor, as the daemon would run it (resources opened for the tick)."""
    with dg.build_sensor_context(instance=instance, resources={"pcbo": pcbo}) as context:
        return sensor(context)


def _asset_and_checks(config: DatasetsConfig, name: str) -> tuple[dg.AssetsDefinition, list]:
    dataset = config.dataset(name)
    asset = build_dataset_asset(config, dataset)
    return asset, build_dataset_checks(config, dataset, asset)


# --- ledger partitions as engine requests -------------------------------------------------------


def test_demo_ledgers_carry_an_integer_sequence_and_an_instant():
    records = demo_ledgers()
    assert [r["ledgerSequence"] for r in records] == list(range(2, 642))
    assert all(type(r["ledgerSequence"]) is int and r["occurredAt"].endswith("Z") for r in records)


def test_ledger_keys_group_into_requests_whose_engine_keys_are_the_dagster_keys(workdir):
    config = _config_with(workdir, "lastLedger: 641", "lastLedger: 600")
    dataset = config.dataset("ledgers")
    partitioning = dataset.partitioning
    keys = build_dataset_asset(config, dataset).partitions_def.get_partition_keys()
    assert keys[-1] == "range=578-600"  # cut by lastLedger
    # A contiguous range is one request; a gap starts another one.
    spans = ledger_spans_for_keys(partitioning, [keys[9], keys[3], keys[1], keys[2], keys[8]])
    groups = ledger_request_groups(spans, partitioning.partitionSize, 100_000)
    assert [[s.key for s in g] for g in groups] == [keys[1:4], keys[8:10]]
    assert [[s.key for s in g] for g in ledger_request_groups(spans, 64, 2)] == [
        keys[1:3],
        keys[3:4],
        keys[8:10],
    ]
    for group in groups:
        request = build_ledger_request(dataset, config.source_uri(dataset), "r1", group, {})
        assert request["ledgerRange"] == {
            "field": "ledgerSequence",
            "first": group[0].first,
            "end": group[-1].end,
            "partitionSize": 64,
        }
        plan, _ = evaluate(load_request(json.dumps(request).encode()))
        assert [p.key for p in plan.partitions] == [s.key for s in group]
    # Keys off the dataset's grid are refused, naming the key.
    for bad in ("range=3-66", "range=2-64", "range=578-641", "ledger=2-65", "range=642-705"):
        with pytest.raises(ValueError, match=bad):
            ledger_spans_for_keys(partitioning, [bad])
    assert partitioning.grid.full_keys(200) == keys[:3]
    assert partitioning.grid.full_keys(10_000) == keys[:-1]  # the short last one is never "full"


def test_a_ledger_range_backfill_runs_the_engine_and_its_checks(workdir, engine):
    config = load_datasets_config(workdir / "datasets.yaml")
    asset, checks = _asset_and_checks(config, "ledgers")
    assert asset.partitions_def.get_partition_keys() == LEDGER_KEYS
    assert asset.backfill_policy == dg.BackfillPolicy.single_run()
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [asset, *checks],
            instance=instance,
            resources={"pcbo": engine},
            tags=_range_tags(LEDGER_KEYS[0], LEDGER_KEYS[-1]),
        )
        assert result.success
        mats = _ledger_mats(result)
        assert [m.partition for m in mats] == LEDGER_KEYS
        pcbo_run_ids = set()
        for index, mat in enumerate(mats):
            md = mat.metadata
            first = 2 + 64 * index
            assert (md["ledger_first"].value, md["ledger_last"].value) == (first, first + 63)
            assert md["ledger_field"].value == "ledgerSequence"
            assert "window_start" not in md
            for name in ("source_count", "add_count", "omit_count", "dagster/row_count"):
                assert isinstance(md[name], dg.IntMetadataValue), name
            assert md["source_count"].value == 64
            assert md["add_count"].value + md["omit_count"].value == 64
            assert md["dagster/row_count"].value == md["add_count"].value
            assert len([k for k in md if k.startswith("omitted/")]) == 5
            for name in ("merkle_root", "decision_hash", "audit_event_hash", "file_checksum"):
                assert md[name].value.startswith("sha256:"), name
            assert f"/ledgers/v1/{mat.partition}/part-" in md["file_uri"].value
            assert md["manifest"].value.endswith(f"/ledgers/v1/{mat.partition}/_manifest.json")
            assert md["status"].value == "committed"
            pcbo_run_ids.add(md["pcbo_run_id"].value)
        assert len(pcbo_run_ids) == 1  # one engine request for the whole range
        assert sum(m.metadata["omitted/CONSENT_MISSING"].value for m in mats) > 0

        evaluations = result.get_asset_check_evaluations()
        per_partition = {(e.check_name, e.partition): e.passed for e in evaluations if e.partition}
        assert per_partition == {(c, k): True for c in CHECKS for k in LEDGER_KEYS}
        [coverage] = [e for e in evaluations if e.check_name == "coverage"]
        assert coverage.passed and coverage.metadata["gaps"].value == 0
        assert coverage.metadata["committed"].value == 10

        with engine.environment() as env:
            report = verify(env)
            assert report["status"] == "clean", report["findings"]
            assert report["checked"]["partitions"] == 10
        lake = Path(engine.home) / "lake" / "ledgers" / "v1"
        assert sorted(p.name for p in lake.iterdir()) == sorted(LEDGER_KEYS)
        for key in LEDGER_KEYS:
            assert len(list((lake / key).glob("part-*.parquet"))) == 1
            assert (lake / key / "_manifest.json").is_file()

        # Re-materializing a sub-range leaves it unchanged; the checks job re-checks without writing.
        again = dg.materialize(
            [asset, *checks],
            instance=instance,
            resources={"pcbo": engine},
            tags=_range_tags(LEDGER_KEYS[3], LEDGER_KEYS[5]),
        )
        assert {m.metadata["status"].value for m in again.asset_materializations_for_node("ledgers")} == {
            "unchanged"
        }
        rerun = (
            build_definitions(config, resource=engine)
            .resolve_job_def("ledgers_checks")
            .execute_in_process(instance=instance, tags=_range_tags(LEDGER_KEYS[0], LEDGER_KEYS[-1]))
        )
        assert rerun.success
        assert len([e for e in rerun.get_asset_check_evaluations() if e.partition]) == 30


def test_a_short_last_ledger_partition_and_checks_per_run(workdir, engine):
    config = _config_with(workdir, "lastLedger: 641", "lastLedger: 600\n    checkGranularity: run")
    asset, checks = _asset_and_checks(config, "ledgers")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [asset, *checks],
            instance=instance,
            resources={"pcbo": engine},
            tags=_range_tags("range=450-513", "range=578-600"),
        )
        assert result.success
        mats = _ledger_mats(result)
        assert [m.partition for m in mats] == ["range=450-513", "range=514-577", "range=578-600"]
        last = mats[-1].metadata
        assert (last["ledger_first"].value, last["ledger_last"].value, last["source_count"].value) == (
            578,
            600,
            23,
        )
        evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert set(evaluations) == {*CHECKS, "coverage"}
        assert all(evaluations[name].passed for name in CHECKS)
        assert evaluations["reconciliation"].metadata["partitions_checked"].value == 3
        assert not evaluations["coverage"].passed  # WARN: range=2-65 .. range=386-449 are gaps
        assert evaluations["coverage"].metadata["gaps"].value == 7
    with engine.environment() as env:
        assert verify(env)["status"] == "clean"


# --- open-ended ledger ranges: dynamic partitions and their sensor ------------------------------


def test_the_sensor_adds_a_key_for_every_full_partition_in_the_source(workdir, engine):
    config = _config_with(workdir, "partitionSize: 64\n      lastLedger: 641", "partitionSize: 100")
    dataset = config.dataset("ledgers")
    asset, checks = _asset_and_checks(config, "ledgers")
    assert isinstance(asset.partitions_def, dg.DynamicPartitionsDefinition)
    name = dynamic_partitions_name(dataset)
    defs = build_definitions(config, resource=engine)
    sensor = defs.resolve_sensor_def("ledgers_ledger_partitions")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    source = workdir / "demo_data" / "ledgers.jsonl"
    assert max_ledger_in_source(str(source), "jsonl", "ledgerSequence") == 641

    with dg.instance_for_test() as instance:
        result = _tick(sensor, instance, engine)
        assert isinstance(result, dg.SensorResult)
        [request] = result.dynamic_partitions_requests
        assert request.partitions_def_name == name
        # Ledgers 2-641: six full partitions of 100; 602-641 is still filling up.
        expected = [f"range={2 + 100 * i}-{101 + 100 * i}" for i in range(6)]
        assert list(request.partition_keys) == expected
        assert result.cursor == "641"
        instance.add_dynamic_partitions(name, list(request.partition_keys))

        # Nothing new: a skip. Then ledgers 642-701 close: range=602-701 is full now.
        skipped = _tick(sensor, instance, engine)
        assert isinstance(skipped, dg.SkipReason) and "no new full partition" in skipped.skip_message
        records = [dict(r, ledgerSequence=r["ledgerSequence"] + 640) for r in demo_ledgers()[:60]]
        for r in records:
            r["id"] = f"ledger-{r['ledgerSequence']:010d}"
        with source.open("a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        fh_result = _tick(sensor, instance, engine)
        assert list(fh_result.dynamic_partitions_requests[0].partition_keys) == ["range=602-701"]
        instance.add_dynamic_partitions(name, ["range=602-701"])

        # The sensor's keys materialize through the engine, checks included.
        result = dg.materialize(
            [asset, *checks],
            instance=instance,
            resources={"pcbo": engine},
            tags=_range_tags("range=502-601", "range=602-701"),
        )
        assert result.success
        mats = _ledger_mats(result)
        assert [m.partition for m in mats] == ["range=502-601", "range=602-701"]
        assert [m.metadata["source_count"].value for m in mats] == [100, 100]
        evaluations = result.get_asset_check_evaluations()
        per_partition = {(e.check_name, e.partition): e.passed for e in evaluations if e.partition}
        assert per_partition == {(c, k): True for c in CHECKS for k in ("range=502-601", "range=602-701")}
        [coverage] = [e for e in evaluations if e.check_name == "coverage"]
        assert coverage.metadata["partitions"].value == 7  # the sensor's keys
        assert coverage.metadata["gaps"].value == 5  # range=2-101 .. range=402-501 not materialized

        # A key added by hand off the grid fails the run, naming it, and writes nothing.
        instance.add_dynamic_partitions(name, ["range=3-102"])
        bad = dg.materialize(
            [asset],
            instance=instance,
            resources={"pcbo": engine},
            partition_key="range=3-102",
            raise_on_error=False,
        )
        assert not bad.success
        failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
        assert "'range=3-102' is not a partition" in failure.step_failure_data.user_failure_data.description
    assert not (Path(engine.home) / "lake" / "ledgers" / "v1" / "range=3-102").exists()


def test_the_sensor_reads_parquet_sources_and_skips_a_missing_one(workdir, engine):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(demo_ledgers()), workdir / "demo_data" / "ledgers.parquet")
    assert (
        max_ledger_in_source(str(workdir / "demo_data" / "ledgers.parquet"), "parquet", "ledgerSequence")
        == 641
    )
    assert max_ledger_in_source(str(workdir / "demo_data" / "ledgers.parquet"), "parquet", "nope") is None
    text = re.sub(r"\n *lastLedger: 641[^\n]*", "", (workdir / "datasets.yaml").read_text())
    (workdir / "open.yaml").write_text(text.replace("uri: demo_data/ledgers.jsonl", "uri: x.jsonl"))
    config = load_datasets_config(workdir / "open.yaml")
    dataset = config.dataset("ledgers")
    asset = build_dataset_asset(config, dataset)
    sensor = build_ledger_partitions_sensor(config, dataset, asset)
    with dg.instance_for_test() as instance:
        skipped = _tick(sensor, instance, engine)
        assert isinstance(skipped, dg.SkipReason) and "no such file" in skipped.skip_message
        # The sources resource's base_dir decides where relative sources resolve.
        (workdir / "elsewhere").mkdir()
        shutil.copy(workdir / "demo_data" / "ledgers.jsonl", workdir / "elsewhere" / "x.jsonl")
        moved = PcboEngineResource(
            home=engine.home, sources=SourcesResource(base_dir=str(workdir / "elsewhere"))
        )
        result = _tick(sensor, instance, moved)
        assert len(result.dynamic_partitions_requests[0].partition_keys) == 10


# --- resources ----------------------------------------------------------------------------------


def test_resources_bind_the_pcbo_variables_that_are_set():
    environ = {
        "PCBO_HOME": "/h",
        "PCBO_CATALOG_URL": "postgresql://pcbo:s3cret@db/pcbo",
        "PCBO_LAKE_URL": "s3://bucket/lake",
        "PCBO_AUDIT_DIR": "/audit",
        "PCBO_AUDIT_ENDPOINT": "",
        "PCBO_DATASETS_CONFIG": "/c.yaml",
    }
    resource = PcboEngineResource.from_env(environ)
    bound = {
        "home": resource.home,
        "catalog": resource.catalog.url,
        "lake": resource.lake.url,
        "audit_dir": resource.audit.directory,
        "config": resource.sources.config_path,
    }
    assert all(isinstance(v, dg.EnvVar) for v in bound.values()), bound
    assert [v.env_var_name for v in bound.values()] == [
        "PCBO_HOME",
        "PCBO_CATALOG_URL",
        "PCBO_LAKE_URL",
        "PCBO_AUDIT_DIR",
        "PCBO_DATASETS_CONFIG",
    ]
    assert resource.audit.endpoint is None and resource.sources.base_dir is None  # empty or unset
    assert CatalogResource.from_env({}).url is None and LakeResource.from_env({}).url is None
    assert AuditResource.from_env({"PCBO_AUDIT_ENDPOINT": "http://a"}).endpoint.env_var_name == (
        "PCBO_AUDIT_ENDPOINT"
    )


def test_resources_resolve_variables_at_run_time_and_never_log_a_password(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PCBO_HOME", str(home))
    monkeypatch.setenv("PCBO_LAKE_URL", str(tmp_path / "lake-elsewhere"))
    monkeypatch.setenv("PCBO_AUDIT_DIR", str(tmp_path / "audit-elsewhere"))
    monkeypatch.setenv("PCBO_AUDIT_ENDPOINT", "http://127.0.0.1:9/events?token=t0ken")
    resource = PcboEngineResource.from_env()

    @dg.asset
    def probe(context: dg.AssetExecutionContext, pcbo: PcboEngineResource) -> dict:
        described = pcbo.describe()
        context.log.info(f"engine {json.dumps(described)}")
        return {"described": described, "settings": str(pcbo.settings())}

    with dg.instance_for_test() as instance:
        result = dg.materialize([probe], instance=instance, resources={"pcbo": resource})
        described = result.output_for_node("probe")["described"]
        assert described["home"] == str(home)
        assert described["lake"] == str(tmp_path / "lake-elsewhere")
        assert described["catalog"] == f"sqlite:///{home / 'catalog.db'}"  # the engine's default
        assert described["audit_dir"] == str(tmp_path / "audit-elsewhere")
        assert described["audit_endpoint"] == "http://127.0.0.1:9/events?[redacted]"  # query string removed
        logs = [e.message for e in instance.all_logs(result.run_id)]
        assert any("lake-elsewhere" in m for m in logs)
        assert not any("t0ken" in m for m in logs)

    # A catalog password given through the variable reaches neither the logs nor the failure.
    monkeypatch.setenv(
        "PCBO_CATALOG_URL", "postgresql+psycopg://pcbo:s3cret@127.0.0.1:1/pcbo?connect_timeout=2"
    )
    config = load_datasets_config(EXAMPLE)
    asset = build_dataset_asset(config, config.dataset("ledgers"))
    with dg.instance_for_test() as instance:
        failed = dg.materialize(
            [asset],
            instance=instance,
            resources={"pcbo": PcboEngineResource.from_env()},
            partition_key=LEDGER_KEYS[0],
            raise_on_error=False,
        )
        assert not failed.success
        text = json.dumps([str(e.dagster_event) + e.message for e in instance.all_logs(failed.run_id)])
        assert "postgresql+psycopg://127.0.0.1:1/pcbo?[redacted]" in text  # no userinfo, no query
        assert "s3cret" not in text

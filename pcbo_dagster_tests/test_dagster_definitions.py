"""The Dagster layer: datasets config, demo data, definitions, a partition-range backfill and its checks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import dagster as dg
else:
    dg = pytest.importorskip("dagster")

from pcbo_dagster.core.errors import InvalidInput  # noqa: E402
from pcbo_dagster.dagster_defs.backfill.assets import build_dataset_asset  # noqa: E402
from pcbo_dagster.dagster_defs.backfill.checks import build_dataset_checks  # noqa: E402
from pcbo_dagster.dagster_defs.definitions import build_definitions  # noqa: E402
from pcbo_dagster.dagster_defs.partitions import partitions_def_for, windows_for_keys  # noqa: E402
from pcbo_dagster.dagster_defs.resources import PcboEngineResource  # noqa: E402
from pcbo_dagster.datasets.config import (  # noqa: E402
    CONFIG_ENV,  # noqa: E402
    DEFAULT_DATASETS_CONFIG,  # noqa: E402
    DatasetsConfig,
    load_datasets_config,
    parse_datasets_config,
)
from pcbo_dagster.datasets.demo_data import generate_demo_data  # noqa: E402
from pcbo_dagster.datasets.requests import request_groups  # noqa: E402
from pcbo_dagster.engine.verify import verify  # noqa: E402
from pcbo_dagster_tests.example_location import example_workdir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = DEFAULT_DATASETS_CONFIG  # the example shipped in the package
RANGE_START, RANGE_END = "20240101T000000Z", "20240101T050000Z"
SIX_HOURS = [f"20240101T{h:02d}0000Z" for h in range(6)]
CHECKS = {"reconciliation", "policy_compliance", "audit_chain"}


def _range_tags(start: str, end: str) -> dict[str, str]:
    return {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The example config beside freshly generated demo sources, as on a fresh clone."""
    return example_workdir(tmp_path)


@pytest.fixture
def engine(tmp_path: Path) -> PcboEngineResource:
    return PcboEngineResource(home=str(tmp_path / "pcbo-home"))


def _asset_and_checks(config: DatasetsConfig, name: str) -> tuple[dg.AssetsDefinition, list]:
    dataset = config.dataset(name)
    asset = build_dataset_asset(config, dataset)
    return asset, build_dataset_checks(config, dataset, asset)


def _config_with(workdir: Path, text: str) -> DatasetsConfig:
    path = workdir / "custom.yaml"
    path.write_text(text)
    return load_datasets_config(path)


# --- the config file ----------------------------------------------------------------------------


def test_example_config_declares_one_dataset_of_each_kind(tmp_path):
    config = load_datasets_config(EXAMPLE, {"PCBO_HOME": str(tmp_path / "home")})
    kinds = {d.name: d.partitioning.kind for d in config.datasets}
    assert kinds == {"events": "time_window", "ledgers": "ledger_range", "sessions": "time_window"}
    # sessions is the staged-rollout example: staging and production assets
    rollout = config.dataset("sessions").rollout
    assert rollout is not None and rollout.businessMetric is not None
    assert config.dataset("events").rollout is None
    events = config.dataset("events")
    assert events.partitioning.cron == "0 * * * *"
    assert events.chain_key == "events/v1" and events.pool_name == "pcbo-events"
    # The packaged example reads its sources under PCBO_HOME (never inside the installed package),
    # or PCBO_SOURCES_DIR; its relative lakes (none) would resolve against its own directory.
    assert config.source_uri(events) == str(tmp_path / "home" / "demo_data" / "events.jsonl")
    assert config.base_dir == EXAMPLE.parent
    moved = load_datasets_config(EXAMPLE, {"PCBO_SOURCES_DIR": str(tmp_path / "src")})
    assert moved.source_uri(events) == str(tmp_path / "src" / "demo_data" / "events.jsonl")
    # A copy of it elsewhere is an ordinary config: sources beside the copy, unless PCBO_SOURCES_DIR.
    copy = tmp_path / "copy" / "datasets.yaml"
    copy.parent.mkdir()
    copy.write_bytes(EXAMPLE.read_bytes())
    beside = load_datasets_config(copy, {})
    assert beside.source_uri(events) == str(copy.parent / "demo_data" / "events.jsonl")
    redirected = load_datasets_config(copy, {"PCBO_SOURCES_DIR": str(tmp_path / "src")})
    assert redirected.source_uri(events) == str(tmp_path / "src" / "demo_data" / "events.jsonl")
    assert config.dataset("ledgers").partitioning.keys()[:2] == ["range=2-65", "range=66-129"]


_VALID_DATASET = """
datasets:
  - name: events
    partitioning: {kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z"}
    source: {uri: demo_data/events.jsonl}
"""


@pytest.mark.parametrize(
    ("yaml_text", "field", "words"),
    [
        (
            _VALID_DATASET
            + """  - name: ledgers
    partitioning: {kind: time_window, cron: "0 24 * * *", start: "2024-01-01T00:00:00Z"}
    source: {uri: l.jsonl}
""",
            "datasets[1].partitioning.cron",
            "outside 0-23",
        ),
        (
            _VALID_DATASET.replace("source:", "policies: {requireConsnet: false}\n    source:"),
            "datasets[0].policies.requireConsnet",
            "unknown field",
        ),
        (
            _VALID_DATASET.replace('"2024-01-01T00:00:00Z"', '"2024-01-01T00:00:00"'),
            "datasets[0].partitioning.start",
            "explicit offset",
        ),
        (
            _VALID_DATASET.replace("kind: time_window", "kind: weekly"),
            "datasets[0].partitioning.kind",
            "time_window or ledger_range",
        ),
        (
            _VALID_DATASET + "    backfillPolicy: {kind: multi_run}\n",
            "datasets[0].backfillPolicy.maxPartitionsPerRun",
            "required",
        ),
        (
            _VALID_DATASET + "    versionLabel: v/1\n",
            "datasets[0].versionLabel",
            "pattern",
        ),
        (
            _VALID_DATASET.replace("events.jsonl}", "events.jsonl}\n    source: {uri: other.jsonl}"),
            "config",
            "duplicate key 'source'",
        ),
        (
            _VALID_DATASET + _VALID_DATASET.split("datasets:\n", 1)[1],
            "datasets[1].name",
            "already declared",
        ),
        (
            """
datasets:
  - name: ledgers
    partitioning: {kind: ledger_range, firstLedger: 100, partitionSize: 64, lastLedger: 99}
    source: {uri: l.jsonl}
""",
            "datasets[0].partitioning.lastLedger",
            "firstLedger",
        ),
        (
            _VALID_DATASET
            + "    table: {format: iceberg, name: ns.events}\n"
            + "    target: {kind: sql, url: 'sqlite:///t.db', table: t, key: [id]}\n",
            "datasets[0].table",
            "SQL target",
        ),
        (
            _VALID_DATASET + "    auditChainKey: events/v2\n",
            "datasets[0].auditChainKey",
            "events/v1",
        ),
        (
            _VALID_DATASET.replace("hourly", "0 * * *"),
            "datasets[0].partitioning.cron",
            "5-field",
        ),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(yaml_text, field, words):
    with pytest.raises(InvalidInput) as info:
        parse_datasets_config(yaml_text)
    assert info.value.field == field, str(info.value)
    assert words in info.value.message


def test_yaml_11_surprises_are_switched_off():
    text = _VALID_DATASET.replace("source:", "policies: {allowedJurisdictions: [US, NO]}\n    source:")
    config = parse_datasets_config(text)
    assert config.datasets[0].policies.allowedJurisdictions == ["US", "NO"]  # Norway, not False


def test_the_code_location_refuses_a_bad_config_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_VALID_DATASET.replace("hourly", "0 25 * * *"))
    with pytest.raises(InvalidInput) as info:
        build_definitions(bad)
    assert info.value.field == "datasets[0].partitioning.cron"
    assert str(bad) in info.value.message


@pytest.mark.slow
def test_dagster_definitions_validate_passes_and_refuses(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_VALID_DATASET.replace("hourly", "0 25 * * *"))
    command = [
        sys.executable,
        "-m",
        "dagster",
        "definitions",
        "validate",
        "-m",
        "pcbo_dagster.dagster_defs.definitions",
    ]
    base_env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    good = subprocess.run(
        command, env={**base_env, CONFIG_ENV: str(EXAMPLE)}, capture_output=True, text=True, timeout=120
    )
    assert good.returncode == 0, good.stderr[-3000:]
    assert "passed validation" in good.stdout + good.stderr
    refused = subprocess.run(
        command, env={**base_env, CONFIG_ENV: str(bad)}, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert "datasets[0].partitioning.cron: hour field: 25 is outside 0-23" in refused.stdout + refused.stderr


# --- demo data ----------------------------------------------------------------------------------


def test_demo_data_is_deterministic(tmp_path):
    first = generate_demo_data(tmp_path / "a")
    second = generate_demo_data(tmp_path / "b")
    assert [p.name for p in first] == ["events.jsonl", "ledgers.jsonl", "sessions.jsonl"]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
    lines = first[0].read_text().splitlines()
    assert 3000 < len(lines) < 4500
    assert any('"consentGranted":false' in line for line in lines)
    assert any('"jurisdiction":"DE"' in line for line in lines)


# --- partitions ---------------------------------------------------------------------------------


def test_time_partition_keys_are_engine_keys_and_irregular_crons_split_requests():
    config = parse_datasets_config(
        _VALID_DATASET.replace(
            '"2024-01-01T00:00:00Z"}', '"2024-01-01T00:00:00Z", end: "2024-01-04T00:00:00Z"}'
        )
    )
    partitions_def = partitions_def_for(config.datasets[0])
    keys = partitions_def.get_partition_keys()
    assert len(keys) == 72 and keys[0] == "20240101T000000Z" and keys[-1] == "20240103T230000Z"
    windows = windows_for_keys(partitions_def, keys)
    assert [len(g) for g in request_groups(windows, 100_000)] == [72]
    assert [len(g) for g in request_groups(windows, 30)] == [30, 30, 12]

    irregular = parse_datasets_config(_VALID_DATASET.replace("hourly", '"0 0,6 * * *"'))
    pdef = partitions_def_for(irregular.datasets[0])
    keys = pdef.get_partition_keys()[:4]
    assert keys == ["20240101T000000Z", "20240101T060000Z", "20240102T000000Z", "20240102T060000Z"]
    assert [len(g) for g in request_groups(windows_for_keys(pdef, keys), 100_000)] == [1, 1, 1, 1]


def test_resource_binds_the_variables_that_are_set():
    resource = PcboEngineResource.from_env({"PCBO_HOME": "/x", "PCBO_AUDIT_ENDPOINT": ""})
    assert isinstance(resource.home, dg.EnvVar) and resource.home.env_var_name == "PCBO_HOME"
    assert resource.lake.url is None and resource.audit.endpoint is None


# --- materialization ----------------------------------------------------------------------------


def test_a_partition_range_backfill_runs_the_engine_and_its_checks(workdir, engine):
    config = load_datasets_config(workdir / "datasets.yaml")
    asset, checks = _asset_and_checks(config, "events")
    assert asset.backfill_policy == dg.BackfillPolicy.multi_run(max_partitions_per_run=24)
    # Graph-backed: the four steps as ops; the three that write hold the dataset's pool.
    pools = {op.name: op.pool for op in asset.node_def.node_defs}
    assert pools == {
        "events__policy_gate": None,
        "events__parquet_emission": "pcbo-events",
        "events__audit_chain_append": "pcbo-events",
        "events__reconciliation": "pcbo-events",
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [asset, *checks],
            instance=instance,
            resources={"pcbo": engine},
            tags=_range_tags(RANGE_START, RANGE_END),
        )
        assert result.success

        # One materialization per partition key, each with that partition's metadata.
        mats = result.asset_materializations_for_node("events")
        assert [m.partition for m in mats] == SIX_HOURS
        for mat in mats:
            md = mat.metadata
            for name in ("source_count", "add_count", "omit_count", "dagster/row_count"):
                assert isinstance(md[name], dg.IntMetadataValue), name
            assert md["add_count"].value + md["omit_count"].value == md["source_count"].value
            assert md["dagster/row_count"].value == md["add_count"].value
            reasons = [k for k in md if k.startswith("omitted/")]
            assert len(reasons) == 5 and all(isinstance(md[k], dg.IntMetadataValue) for k in reasons)
            for name in ("merkle_root", "decision_hash", "audit_event_hash", "file_checksum"):
                assert isinstance(md[name], dg.TextMetadataValue)
                assert md[name].value.startswith("sha256:"), name
            for name in ("file_uri", "manifest"):
                assert isinstance(md[name], dg.UrlMetadataValue)
                assert md[name].value.startswith("file://"), name
            assert mat.partition in md["file_uri"].value
            assert md["status"].value == "committed"
        assert sum(m.metadata["omit_count"].value for m in mats) > 0

        # Every per-partition check passed, once per partition, each naming the partition's
        # materialization it checked; coverage has no gaps; partition_health passes.
        evaluations = result.get_asset_check_evaluations()
        per_partition = {(e.check_name, e.partition): e.passed for e in evaluations if e.partition}
        assert per_partition == {(c, k): True for c in CHECKS for k in SIX_HOURS}
        assert all(e.target_materialization_data for e in evaluations if e.partition)
        [health] = [e for e in evaluations if e.check_name == "partition_health"]
        assert health.passed and health.metadata["failing_partitions"].value == 0
        coverage = [e for e in evaluations if e.check_name == "coverage"]
        assert len(coverage) == 1 and coverage[0].passed
        assert coverage[0].metadata["gaps"].value == 0

        with engine.environment() as env:
            report = verify(env)
            assert report["status"] == "clean", report["findings"]
            assert report["checked"]["partitions"] == 6

        # Tamper with one written parquet file: the checks job (no rewrite) catches it.
        tampered_key = SIX_HOURS[2]
        parquet = Path(mats[2].metadata["file_uri"].value.removeprefix("file://"))
        data = bytearray(parquet.read_bytes())
        data[len(data) // 2] ^= 0x01
        parquet.write_bytes(bytes(data))

        defs = build_definitions(config, resource=engine)
        rerun = defs.resolve_job_def("events_checks").execute_in_process(
            instance=instance, tags=_range_tags(RANGE_START, RANGE_END), raise_on_error=False
        )
        assert not rerun.success  # reconciliation is blocking
        verdicts = {(e.check_name, e.partition): e for e in rerun.get_asset_check_evaluations()}
        failed = verdicts[("reconciliation", tampered_key)]
        assert not failed.passed
        assert any("SHA-256" in f for f in failed.metadata["findings"].value)
        assert all(verdicts[("reconciliation", k)].passed for k in SIX_HOURS if k != tampered_key)
        assert not verdicts[("policy_compliance", tampered_key)].passed  # rows cannot be trusted
        assert all(verdicts[("audit_chain", k)].passed for k in SIX_HOURS)
        assert rerun.asset_materializations_for_node("events") == []  # nothing rewritten
        # The asset-wide verdict names the one failing partition (the catalog's health reads it).
        health = verdicts[("partition_health", None)]
        assert not health.passed and health.severity == dg.AssetCheckSeverity.ERROR
        assert health.metadata["failing/reconciliation"].value == 1
        assert health.metadata["first_failing"].value["reconciliation"] == [tampered_key]

        with engine.environment() as env:
            assert any(f["kind"] == "file_checksum_mismatch" for f in verify(env)["findings"])


def test_rematerializing_is_unchanged_irregular_crons_split_and_checks_summarize_per_run(workdir, engine):
    config = _config_with(
        workdir,
        (workdir / "datasets.yaml")
        .read_text()
        .replace("cron: hourly", 'cron: "0 0,6 * * *"', 1)
        .replace("kind: multi_run\n      maxPartitionsPerRun: 24", "kind: single_run")
        .replace("checkGranularity: partition", "checkGranularity: run"),
    )
    asset, checks = _asset_and_checks(config, "events")
    keys = ["20240101T000000Z", "20240101T060000Z", "20240102T000000Z"]
    with dg.instance_for_test() as instance:
        for expected in ("committed", "unchanged"):
            result = dg.materialize(
                [asset, *checks],
                instance=instance,
                resources={"pcbo": engine},
                tags=_range_tags(keys[0], keys[-1]),
            )
            mats = result.asset_materializations_for_node("events")
            assert [m.partition for m in mats] == keys
            assert {m.metadata["status"].value for m in mats} == {expected}
            run_ids = [m.metadata["pcbo_run_id"].value for m in mats]
            assert len(set(run_ids)) == 3 and all(r.startswith("dagster-") for r in run_ids)
            windows = [(m.metadata["window_start"].value, m.metadata["window_end"].value) for m in mats]
            assert windows[0] == ("2024-01-01T00:00:00Z", "2024-01-01T06:00:00Z")
            assert windows[1] == ("2024-01-01T06:00:00Z", "2024-01-02T00:00:00Z")
            evaluations = result.get_asset_check_evaluations()
            assert sorted(e.check_name for e in evaluations) == sorted([*CHECKS, "coverage"])
            assert all(e.passed and e.partition is None for e in evaluations)
            summary = next(e for e in evaluations if e.check_name == "reconciliation")
            assert summary.metadata["partitions_checked"].value == 3
        with engine.environment() as env:
            assert verify(env)["status"] == "clean"

        # Launched alone (no partition), the run-level checks re-check every committed partition.
        parquet = Path(mats[1].metadata["file_uri"].value.removeprefix("file://"))
        parquet.write_bytes(parquet.read_bytes()[:-1])
        rerun = (
            build_definitions(config, resource=engine)
            .resolve_job_def("events_checks")
            .execute_in_process(instance=instance, raise_on_error=False)
        )
        assert not rerun.success
        verdicts = {e.check_name: e for e in rerun.get_asset_check_evaluations()}
        reconciliation = verdicts["reconciliation"]
        assert not reconciliation.passed
        assert reconciliation.metadata["partitions_checked"].value == 3
        assert reconciliation.metadata["failed_partitions"].value == [keys[1]]
        assert verdicts["audit_chain"].passed


def test_a_blocking_policy_fails_the_run_and_writes_nothing(workdir, engine):
    config = _config_with(
        workdir, (workdir / "datasets.yaml").read_text().replace("onViolation: omit", "onViolation: block")
    )
    asset, checks = _asset_and_checks(config, "events")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [asset, *checks],
            instance=instance,
            resources={"pcbo": engine},
            tags=_range_tags(RANGE_START, RANGE_START),
            raise_on_error=False,
        )
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert "blocked by the onViolation gate" in failure.step_failure_data.user_failure_data.description
    assert not (Path(engine.home) / "lake" / "events").exists()


def test_ledger_ranges_materialize_through_the_engine(workdir, engine):
    """Ledger ranges are materialized like time windows (more in test_dagster_ledgers_and_resources)."""
    config = load_datasets_config(workdir / "datasets.yaml")
    asset, checks = _asset_and_checks(config, "ledgers")
    assert asset.partitions_def.get_partition_keys()[-1] == "range=578-641"
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [asset, *checks],
            instance=instance,
            resources={"pcbo": engine},
            partition_key="range=2-65",
        )
    assert result.success
    [mat] = result.asset_materializations_for_node("ledgers")
    assert mat.partition == "range=2-65" and mat.metadata["status"].value == "committed"
    assert (mat.metadata["ledger_first"].value, mat.metadata["ledger_last"].value) == (2, 65)


def test_the_audit_chain_check_fails_on_an_event_the_key_did_not_sign(workdir, engine, tmp_path, monkeypatch):
    """With PCBO_SIGNING_KEY, an event appended without the key (by someone who can write the stores,
    every hash right) fails the `audit_chain` check, as every run refuses the chain and `verify`
    reports it, where the check passed (it read the backup's hashes alone: red-team finding)."""
    from pcbo_dagster.core.signed_note import signing_key_from_seed
    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster_tests.approver_keys import key_file

    operator = signing_key_from_seed("ops.example/operator", bytes([36]) * 32)
    monkeypatch.setenv("PCBO_SIGNING_KEY", str(key_file(tmp_path, operator)))
    config = load_datasets_config(workdir / "datasets.yaml")
    asset, checks = _asset_and_checks(config, "events")
    with dg.instance_for_test() as instance:
        tags = _range_tags(RANGE_START, RANGE_START)
        assert dg.materialize(
            [asset, *checks], instance=instance, resources={"pcbo": engine}, tags=tags
        ).success
        env = Environment.open(Settings.resolve(home=engine.home, env={}))
        try:  # (no key: what someone without it appends)
            env.audit.append("events/v1", "partition_commit_intent", {"partitions": [], "run_id": "forged"})
        finally:
            env.close()
        rerun = (
            build_definitions(config, resource=engine)
            .resolve_job_def("events_checks")
            .execute_in_process(instance=instance, raise_on_error=False)
        )
        verdicts = {e.check_name: e for e in rerun.get_asset_check_evaluations()}
    audit_chain = verdicts["audit_chain"]
    assert not audit_chain.passed and verdicts["reconciliation"].passed
    assert "no valid signature of the operator's key" in json.dumps(audit_chain.metadata["findings"].value)


def test_a_materialization_attaches_its_evidence_package_when_a_signing_key_is_set(
    workdir, engine, tmp_path, monkeypatch
):
    from pcbo_dagster.core.signed_note import new_signing_key
    from pcbo_dagster.evidence.package import verify as verify_evidence

    key = new_signing_key("ops.example/operator")
    key_file = tmp_path / "operator.key"
    key_file.write_text(key.text + "\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("PCBO_SIGNING_KEY", str(key_file))
    config = load_datasets_config(workdir / "datasets.yaml")
    asset, checks = _asset_and_checks(config, "events")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [asset, *checks],
            instance=instance,
            resources={"pcbo": engine},
            tags=_range_tags(RANGE_START, "20240101T010000Z"),
        )
        assert result.success
        mats = result.asset_materializations_for_node("events")
    paths = {m.metadata["evidence_package"].value for m in mats}
    digests = {m.metadata["evidence_sha256"].value for m in mats}
    assert len(paths) == 1 and len(digests) == 1
    data = Path(paths.pop()).read_bytes()
    assert digests.pop() == "sha256:" + hashlib.sha256(data).hexdigest()
    document = verify_evidence(json.loads(data), key.verifier())
    assert document["valid"], document["problems"]
    assert document["subjects"] == 4  # two partitions: a parquet file and a version manifest each

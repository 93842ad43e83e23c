"""The deployed path, as a user tries it in the UI: `dagster-webserver` + `dagster-daemon` on loopback,
driven through the GraphQL API exactly as the UI sends and reads it (one deployment for the module).

A dry run pins the decisions; a pinned run with a stale hash is blocked; a partition-range backfill
of `events` runs as one run of four steps (policy gate, parquet emission, audit chain append,
reconciliation) and its per-partition checks; a tampered partition turns red in the check's
Partitions tab and the asset unhealthy in the catalog, and green again once re-materialized (the
engine restores the chain's bytes); a deleted data file is found by the `lake_drift` sensor, which
launches its checks; a CLI rollback of the backfill shows in the UI (the partitions are no longer
materialized); `pcbo verify` stays clean."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("dagster_webserver")

from pcbo_dagster_tests.dagster_harness import (  # noqa: E402
    EVENTS,
    assert_chain_never_forks,
    asset_checks_status,
    asset_unhealthy,
    chain_events,
    check_partition_statuses,
    deployment,
    executable,
    hourly_keys,
    launch_run,
    materialized_partitions,
    metadata_of,
    pcbo_verify,
    runs_with_tag,
    wait_for,
    wait_for_run,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KEYS = hourly_keys(0, 6)
PER_PARTITION_CHECKS = ("reconciliation", "policy_compliance", "audit_chain")
STEPS = ("policy_gate", "parquet_emission", "audit_chain_append", "reconciliation")
RANGE_TAGS = {"dagster/asset_partition_range_start": KEYS[0], "dagster/asset_partition_range_end": KEYS[-1]}


def _pin(decision_hash: str) -> dict:
    return {
        "ops": {
            "events": {"ops": {"events__policy_gate": {"config": {"expected_decision_hash": decision_hash}}}}
        }
    }


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


REASONS = (
    "CONSENT_MISSING",
    "JURISDICTION_NOT_ALLOWED",
    "RETENTION_EXPIRED",
    "ALREADY_PRESENT",
    "DUPLICATE_ID",
)


def test_the_ui_shows_steps_checks_and_the_lake_as_it_is(tmp_path):
    with deployment(tmp_path, extra_env={"PCBO_LAKE_DRIFT_INTERVAL": "20"}) as dep:
        dep.start_webserver()
        dep.start_daemon()

        # A dry run over the six partitions: nothing written, a report with the decision hash to pin.
        dry = wait_for_run(dep, launch_run(dep, "events_dry_run", tags=RANGE_TAGS))
        assert dry["status"] == "SUCCESS", dry
        report = (dep.pcbo_home / "reports" / "dry-runs" / "events" / f"{dry['runId']}.md").read_text()
        decision_hash = re.search(r"decision hash `(sha256:[0-9a-f]{64})`", report).group(1)
        assert "| partition | source | add | omit |" in report
        assert not (dep.pcbo_home / "lake").exists()
        # A run pinned to another hash is blocked by the policy gate; nothing is written.
        stale = launch_run(dep, "__ASSET_JOB", RANGE_TAGS, _pin("sha256:" + "0" * 64), assets=[EVENTS])
        assert wait_for_run(dep, stale)["status"] == "FAILURE"
        assert not (dep.pcbo_home / "lake").exists()

        backfill_id = dep.launch_backfill(EVENTS, KEYS[0], KEYS[-1], title="six hours of events")
        backfill = dep.wait_for_backfills([backfill_id])[backfill_id]
        assert backfill["status"] in {"COMPLETED", "COMPLETED_SUCCESS"}, backfill
        assert backfill["isAssetBackfill"] and backfill["numPartitions"] == 6
        # multi_run(24): six partitions are one range run, tagged with its range.
        assert len(backfill["runs"]) == 1, backfill["runs"]
        run = backfill["runs"][0]
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert run["status"] == "SUCCESS"
        assert tags["dagster/asset_partition_range_start"] == KEYS[0]
        assert tags["dagster/asset_partition_range_end"] == KEYS[-1]
        assert tags["dagster/backfill"] == backfill_id
        run_id = run["runId"]
        # The asset's four steps, each a step of the run with its own status and duration.
        steps = {s["stepKey"]: s for s in wait_for_run(dep, run_id)["stepStats"]}
        for step in STEPS:
            stat = steps[f"events.events__{step}"]
            assert stat["status"] == "SUCCESS" and stat["endTime"] >= stat["startTime"], stat
        assert steps["events_partition_checks"]["status"] == "SUCCESS"

        # One materialization per partition, with that partition's metadata.
        mats = dep.materializations(EVENTS, KEYS)
        assert sorted(m["partition"] for m in mats) == KEYS
        commits = assert_chain_never_forks(chain_events(dep.pcbo_home))
        assert sorted(commits) == KEYS
        lake = dep.pcbo_home / "lake" / "events" / "v1"
        for mat in mats:
            key = mat["partition"]
            assert mat["runId"] == run_id and mat["stepKey"] == "events.events__reconciliation"
            md = metadata_of(mat["metadataEntries"])
            types = {e["label"]: e["__typename"] for e in mat["metadataEntries"]}
            for name in ("dagster/row_count", "source_count", "add_count", "omit_count", "partition_version"):
                assert types[name] == "IntMetadataEntry", name
            assert md["add_count"] + md["omit_count"] == md["source_count"] > 0
            assert md["dagster/row_count"] == md["add_count"]
            # A record omitted for several reasons counts under each of them.
            by_reason = [md[f"omitted/{r}"] for r in REASONS]
            assert max(by_reason) <= md["omit_count"] <= sum(by_reason)
            assert md["status"] == "committed" and md["partition_version"] == 1
            assert md["pcbo_run_id"] == f"dagster-{run_id}"
            assert md["decision_hash"] == decision_hash  # what the dry run pinned
            for name in (
                "merkle_root",
                "decision_hash",
                "audit_event_hash",
                "manifest_checksum",
            ):
                assert types[name] == "TextMetadataEntry" and md[name].startswith("sha256:"), name
            assert types["manifest"] == "UrlMetadataEntry"
            assert md["manifest"] == (lake / key / "_manifest.json").as_uri()
            assert md["file_uri"].startswith((lake / key).as_uri() + "/part-")

            # The metadata is what the lake and the audit chain hold.
            manifest = json.loads((lake / key / "_manifest.json").read_bytes())
            assert manifest["merkleRoot"] == md["merkle_root"]
            assert manifest["recordCount"] == md["dagster/row_count"]
            (event,) = commits[key]
            assert event["chain"]["event_hash"] == md["audit_event_hash"]
            assert event["manifest"]["checksum"] == md["manifest_checksum"]
            assert event["merkle_root"] == md["merkle_root"]
            assert event["run_id"] == md["pcbo_run_id"]
        assert sum(metadata_of(m["metadataEntries"])["omit_count"] for m in mats) > 0

        # Every per-partition check passed once per partition, in that run; coverage has no gaps.
        for check in PER_PARTITION_CHECKS:
            executions = dep.check_executions(EVENTS, check)
            evaluated = [e for e in executions if e["evaluation"] is not None]
            assert sorted(e["partition"] for e in evaluated) == KEYS, (check, executions)
            for execution in evaluated:
                assert execution["status"] == "SUCCEEDED" and execution["runId"] == run_id, execution
                assert execution["evaluation"]["success"] is True
                assert execution["evaluation"]["partition"] == execution["partition"]
        coverage = [e for e in dep.check_executions(EVENTS, "coverage") if e["evaluation"] is not None]
        assert len(coverage) == 1 and coverage[0]["status"] == "SUCCEEDED", coverage
        coverage_md = metadata_of(coverage[0]["evaluation"]["metadataEntries"])
        assert coverage_md["gaps"] == 0 and coverage_md["committed"] == 6

        # The check's Partitions tab: passed for the six partitions; the catalog: healthy.
        assert check_partition_statuses(dep, EVENTS, "reconciliation") == {"SUCCEEDED": KEYS}
        assert asset_checks_status(dep, EVENTS)["partition_health"] == "SUCCEEDED"
        assert not asset_unhealthy(dep, EVENTS)

        # The engine's own verification, as an operator runs it, with the same PCBO_* variables.
        report = pcbo_verify(dep.env, Path(dep.root))
        assert report["status"] == "clean", report["findings"]
        assert report["checked"]["partitions"] == 6 and set(report["checked"]["chains"]) == {"events/v1"}

        # A tampered partition: its checks (launched as the asset's checks job) fail for it alone; the
        # check's Partitions tab shows it failed and the catalog shows the asset unhealthy.
        tampered = KEYS[2]
        _flip_a_byte(next((lake / tampered).glob("part-*.parquet")))
        checks_run = wait_for_run(dep, launch_run(dep, "events_checks", RANGE_TAGS))
        assert checks_run["status"] == "FAILURE"  # reconciliation is blocking
        statuses = check_partition_statuses(dep, EVENTS, "reconciliation")
        assert statuses["FAILED"] == [tampered] and sorted(statuses["SUCCEEDED"]) == sorted(
            set(KEYS) - {tampered}
        )
        assert asset_checks_status(dep, EVENTS)["partition_health"] == "FAILED"
        assert asset_unhealthy(dep, EVENTS)

        # Materialized again: the engine puts back the bytes the chain says are current ("restored");
        # its checks pass and the asset is healthy again.
        again = wait_for_run(
            dep, launch_run(dep, "__ASSET_JOB", {"dagster/partition": tampered}, assets=[EVENTS])
        )
        assert again["status"] == "SUCCESS", again
        [restored] = dep.materializations(EVENTS, [tampered])[:1]
        assert metadata_of(restored["metadataEntries"])["status"] == "restored"
        assert check_partition_statuses(dep, EVENTS, "reconciliation") == {"SUCCEEDED": KEYS}
        assert not asset_unhealthy(dep, EVENTS)

        # A data file deleted behind Dagster's back: the lake_drift sensor launches its checks.
        deleted = KEYS[4]
        next((lake / deleted).glob("part-*.parquet")).unlink()
        drift_runs = wait_for(
            "a lake_drift checks run", lambda: runs_with_tag(dep, "pcbo/lake_drift"), dep, 150
        )
        drift_run = wait_for_run(dep, drift_runs[0]["runId"])
        assert drift_run["jobName"] == "events_checks" and drift_run["status"] == "FAILURE"
        assert deleted in check_partition_statuses(dep, EVENTS, "reconciliation")["FAILED"]
        assert asset_unhealthy(dep, EVENTS)
        fixed = wait_for_run(
            dep, launch_run(dep, "__ASSET_JOB", {"dagster/partition": deleted}, assets=[EVENTS])
        )
        assert fixed["status"] == "SUCCESS"
        assert not asset_unhealthy(dep, EVENTS)

        # A CLI rollback of the backfill's run, with the deployment's DAGSTER_HOME: the UI shows it (every
        # partition the run wrote has no version left: none is materialized any more).
        assert materialized_partitions(dep, EVENTS) == KEYS
        done = subprocess.run(
            [executable("pcbo"), "rollback", "--dataset", "events", "--run-id", f"dagster-{run_id}"],
            env=dep.env, cwd=dep.root, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["rolledBack"] == 6
        assert materialized_partitions(dep, EVENTS) == []
        assert pcbo_verify(dep.env, Path(dep.root))["status"] == "clean"

"""The deployed path: `dagster-webserver` + `dagster-daemon` on loopback, a partition-range backfill of
`events` launched through the GraphQL API (what the UI sends), its runs executed by the daemon, the
materializations and check results read back through GraphQL, then `pcbo verify` clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("dagster_webserver")

from pcbo_dagster_tests.dagster_harness import (  # noqa: E402
    EVENTS,
    assert_chain_never_forks,
    chain_events,
    deployment,
    hourly_keys,
    metadata_of,
    pcbo_verify,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

KEYS = hourly_keys(0, 6)
PER_PARTITION_CHECKS = ("reconciliation", "policy_compliance", "audit_chain")
REASONS = (
    "CONSENT_MISSING",
    "JURISDICTION_NOT_ALLOWED",
    "RETENTION_EXPIRED",
    "ALREADY_PRESENT",
    "DUPLICATE_ID",
)


def test_a_backfill_launched_through_the_webserver_is_run_by_the_daemon(tmp_path):
    with deployment(tmp_path) as dep:
        dep.start_webserver()
        dep.start_daemon()

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

        # One materialization per partition, with that partition's metadata.
        mats = dep.materializations(EVENTS, KEYS)
        assert sorted(m["partition"] for m in mats) == KEYS
        commits = assert_chain_never_forks(chain_events(dep.pcbo_home))
        assert sorted(commits) == KEYS
        lake = dep.pcbo_home / "lake" / "events" / "v1"
        for mat in mats:
            key = mat["partition"]
            assert mat["runId"] == run_id and mat["stepKey"] == "events"
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
            assert md["audit_chain_key"] == "events/v1"
            for name in (
                "merkle_root",
                "plan_hash",
                "decision_hash",
                "audit_event_hash",
                "manifest_checksum",
            ):
                assert types[name] == "TextMetadataEntry" and md[name].startswith("sha256:"), name
            assert types["manifest"] == "UrlMetadataEntry"
            assert md["manifest"] == (lake / key / "_manifest.json").as_uri()
            assert md["file_uri"].startswith((lake / key).as_uri() + "/part-")
            assert json.loads(md["files"])[0]["uri"] == md["file_uri"]

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

        # The engine's own verification, as an operator runs it, with the same PCBO_* variables.
        report = pcbo_verify(dep.env, Path(dep.root))
        assert report["status"] == "clean", report["findings"]
        assert report["checked"]["partitions"] == 6 and set(report["checked"]["chains"]) == {"events/v1"}

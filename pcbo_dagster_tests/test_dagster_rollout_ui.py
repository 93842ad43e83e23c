"""A staged rollout as a user runs it in the UI, through a real `dagster-webserver` + `dagster-daemon` on
loopback, driven over GraphQL as the UI does (one deployment).

A staging apply terminated from the UI leaves its rollout `interrupted` (the run-status sensor), with an
observation of the staging asset saying how to resume; applying it again resumes it. After approval,
soak and promotion (the promotion sensor's run), a production partition rolled back with the CLI
disappears from the UI; the health check's repair is launched as a run of that partition (the repairs
sensor), which materializes and checks it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dagster_webserver")

from pcbo_dagster_tests.approver_keys import BO, key_file  # noqa: E402
from pcbo_dagster_tests.dagster_harness import (  # noqa: E402
    asset_checks_status,
    deployment,
    executable,
    hourly_keys,
    latest_events,
    launch_run,
    materialized_partitions,
    pcbo_verify,
    run_info,
    runs_with_tag,
    terminate,
    wait_for,
    wait_for_run,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KEYS = hourly_keys(0, 24)
STAGING = ["staging", "sessions"]
PRODUCTION = ["production", "sessions"]
RANGE_TAGS = {"dagster/asset_partition_range_start": KEYS[0], "dagster/asset_partition_range_end": KEYS[-1]}


def _apply_config(partitions_per_minute: float) -> dict[str, Any]:
    config = {"rollout": "r1", "by": "tester", "partitions_per_minute": partitions_per_minute}
    return {"ops": {"staging__sessions": {"config": config}}}


def _pcbo(dep: Any, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [executable("pcbo"), *args], env=dep.env, cwd=dep.root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (
        f"pcbo {' '.join(args)}: {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr}"
    )
    return json.loads(done.stdout)


def _rollout_status(dep: Any) -> str | None:
    rows = [r for r in _pcbo(dep, "rollout", "list")["rollouts"] if r["name"] == "r1"]
    return rows[0]["status"] if rows else None


def _staged(dep: Any) -> int:
    return len(list((dep.pcbo_home / "staging" / "lake" / "sessions" / "v1").glob("*/_manifest.json")))


def test_an_interrupted_apply_shows_and_resumes_and_a_health_repair_runs_in_dagster(tmp_path: Path) -> None:
    # The promotion and repairs sensors look every 5 s instead of 30 (the test waits for both).
    with deployment(tmp_path, extra_env={"PCBO_ROLLOUT_SENSOR_INTERVAL": "5"}) as dep:
        # The example's sessions, with a soak window of seconds (the demo's is 10 minutes).
        text = dep.config.read_text()
        dep.config.write_text(text.replace("windowMinutes: 10", "windowMinutes: 0.05"))
        dep.start_webserver()
        dep.start_daemon()

        # 1. Apply to staging at 4 partitions a minute, then terminate the run from the UI.
        first = launch_run(dep, "__ASSET_JOB", RANGE_TAGS, _apply_config(4), assets=[STAGING])
        wait_for("a partition staged", lambda: _staged(dep) >= 1, dep, timeout=240)
        terminate(dep, first)
        if run_info(dep, first)["status"] == "STARTED":  # seen rarely under load: press Terminate again
            time.sleep(5)
            if run_info(dep, first)["status"] == "STARTED":
                terminate(dep, first)
        assert wait_for_run(dep, first)["status"] == "CANCELED"
        staged_before = _staged(dep)
        assert 1 <= staged_before < len(KEYS)

        # The run-status sensor marks the rollout interrupted and says how to resume, in the UI.
        wait_for("rollout r1 interrupted", lambda: _rollout_status(dep) == "interrupted", dep, timeout=150)
        status = _pcbo(dep, "rollout", "status", "r1")
        assert status["rollout"]["status"] == "interrupted"
        observations = latest_events(dep, STAGING)["assetObservations"]
        interrupted = [o for o in observations if "interrupted" in (o["description"] or "")]
        assert interrupted, observations
        entries = {e["label"]: e.get("text") for e in interrupted[0]["metadataEntries"]}
        assert entries["rollout_status"] == "interrupted" and "rollout: r1" in entries["how_to_resume"]

        # 2. Applied again with the same rollout: it resumes; what was committed is kept.
        resumed = wait_for_run(
            dep, launch_run(dep, "__ASSET_JOB", RANGE_TAGS, _apply_config(600), assets=[STAGING])
        )
        assert resumed["status"] == "SUCCESS", resumed
        assert _staged(dep) == len(KEYS)
        assert _rollout_status(dep) == "soaking"
        assert materialized_partitions(dep, STAGING) == KEYS

        # 3. Approve, soak (the window is seconds), and the promotion sensor promotes in a run.
        key = key_file(tmp_path, BO)
        _pcbo(dep, "approve", "r1", "--key", str(key), "--reason", "numbers reviewed")
        time.sleep(4)
        _pcbo(dep, "rollout", "soak")
        promoted = wait_for(
            "a promotion run", lambda: runs_with_tag(dep, "pcbo/rollout", "r1"), dep, timeout=150
        )
        assert wait_for_run(dep, promoted[0]["runId"])["status"] == "SUCCESS"
        assert materialized_partitions(dep, PRODUCTION) == KEYS

        # 4. A production partition rolled back with the CLI (reported to the instance): gone from the UI.
        removed = KEYS[5]
        rolled = _pcbo(dep, "rollback", "--dataset", "sessions", "--partition", removed)
        assert rolled["rolledBack"] == 1
        assert materialized_partitions(dep, PRODUCTION) == [k for k in KEYS if k != removed]

        # 5. The health check's repair is launched as a Dagster run of exactly that partition.
        config = {"ops": {"production_health_check_op": {"config": {"dataset": "sessions", "launch": True}}}}
        health = wait_for_run(dep, launch_run(dep, "production_health_check", run_config=config))
        assert health["status"] == "SUCCESS", health
        repairs = wait_for("a repair run", lambda: runs_with_tag(dep, "pcbo/health_plan"), dep, timeout=150)
        repair = wait_for_run(dep, repairs[0]["runId"])
        assert repair["status"] == "SUCCESS" and repair["jobName"] == "promote_sessions", repair
        tags = {t["key"]: t["value"] for t in repair["tags"]}
        assert (
            tags["dagster/asset_partition_range_start"]
            == tags["dagster/asset_partition_range_end"]
            == removed
        )
        assert materialized_partitions(dep, PRODUCTION) == KEYS
        [mat] = latest_events(dep, PRODUCTION, [removed])["assetMaterializations"][:1]
        assert mat["runId"] == repair["runId"]
        assert asset_checks_status(dep, PRODUCTION)["partition_health"] == "SUCCEEDED"

        for home in (dep.pcbo_home, dep.pcbo_home / "staging"):
            env = {**dep.env, "PCBO_HOME": str(home)}
            assert pcbo_verify(env, dep.root)["status"] == "clean"

"""No partition of a dataset is ever written by two runs at once.

1. Through the deployment (webserver + daemon, the repository's `dagster.yaml`: pool `pcbo-events`
   limited to 1 step): two backfills over overlapping ranges of `events`, launched together. Both
   succeed; their `events` steps never overlap in time (the pool made one wait); the audit chain is one
   linear chain with exactly one `partition_committed` event per partition and content version; the
   overlap is left `unchanged` by the later run; `pcbo verify` is clean.
2. Without any Dagster pool (two processes, each on its own ephemeral instance, started together): the
   engine's own per-dataset lock keeps the chain linear all the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("dagster_webserver")

from pcbo_dagster_tests.dagster_harness import (  # noqa: E402
    EVENTS,
    REPO_ROOT,
    assert_chain_never_forks,
    chain_events,
    deployment,
    hourly_keys,
    metadata_of,
    pcbo_env,
    pcbo_verify,
    write_workdir,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

FIRST = hourly_keys(0, 6)  # 00..05
SECOND = hourly_keys(3, 6)  # 03..08: overlaps FIRST on 03..05
ALL = hourly_keys(0, 9)
OVERLAP = hourly_keys(3, 3)


#: The asset's steps that hold the dataset's pool (they write).
WRITING_STEPS = (
    "events.events__parquet_emission",
    "events.events__audit_chain_append",
    "events.events__reconciliation",
)


def _step_window(events: list[dict], step: str = WRITING_STEPS[0]) -> tuple[float, float]:
    """(start, end) in seconds of one step, from its STEP_START and STEP_SUCCESS events."""
    stamps = {e["eventType"]: int(e["timestamp"]) / 1000 for e in events if e.get("stepKey") == step}
    assert "STEP_START" in stamps and "STEP_SUCCESS" in stamps, stamps
    return stamps["STEP_START"], stamps["STEP_SUCCESS"]


def _writing_windows(events: list[dict]) -> list[tuple[float, float]]:
    return [_step_window(events, step) for step in WRITING_STEPS]


def _assert_one_commit_per_partition(pcbo_home: Path) -> None:
    commits = assert_chain_never_forks(chain_events(pcbo_home))
    assert sorted(commits) == ALL
    assert all(len(found) == 1 for found in commits.values()), {k: len(v) for k, v in commits.items()}


def test_two_overlapping_backfills_queue_on_the_dataset_pool(tmp_path):
    with deployment(tmp_path) as dep:
        dep.start_webserver()
        # Both backfills are requested before the daemon starts: its first tick submits both runs at
        # once (the backfill loop ticks every 30 s; launched apart, they could land in different ticks).
        first = dep.launch_backfill(EVENTS, FIRST[0], FIRST[-1], title="first")
        second = dep.launch_backfill(EVENTS, SECOND[0], SECOND[-1], title="second")
        dep.start_daemon()
        states = dep.wait_for_backfills([first, second])

        runs = {}
        for backfill_id, keys in ((first, FIRST), (second, SECOND)):
            state = states[backfill_id]
            assert state["status"] in {"COMPLETED", "COMPLETED_SUCCESS"}, state
            (run,) = state["runs"]
            assert run["status"] == "SUCCESS", run
            tags = {t["key"]: t["value"] for t in run["tags"]}
            assert (
                tags["dagster/asset_partition_range_start"],
                tags["dagster/asset_partition_range_end"],
            ) == (
                keys[0],
                keys[-1],
            )
            runs[backfill_id] = run["runId"]

        events = {b: dep.run_events(run_id) for b, run_id in runs.items()}
        # The pool held one writing step (emission, audit append, reconciliation) of `events` at a time:
        # no two of them, of either run, overlapped (the runs' steps may interleave, each holding the
        # engine's lock and re-reading the chain).
        steps = sorted(w for e in events.values() for w in _writing_windows(e))
        for (_, end), (start, _) in zip(steps, steps[1:], strict=False):
            assert end <= start, f"two writing steps overlapped: {steps}"
        windows = sorted(_step_window(e) for e in events.values())
        (start_a, end_a), (start_b, end_b) = windows
        # ...although both runs were requested together: both were enqueued before the first step ended.
        enqueued = [
            next(int(e["timestamp"]) / 1000 for e in evs if e.get("eventType") == "RUN_ENQUEUED")
            for evs in events.values()
        ]
        assert max(enqueued) < end_a, (enqueued, windows)
        starts = sorted(
            next(int(e["timestamp"]) / 1000 for e in evs if e.get("eventType") == "RUN_START")
            for evs in events.values()
        )
        print(f"runs enqueued {sorted(enqueued)}, started {starts}; events steps {windows}")

        # The later run found the overlap already committed with identical content.
        later_run = runs[first] if _step_window(events[first])[0] == start_b else runs[second]
        for mat in dep.materializations(EVENTS, OVERLAP):
            md = metadata_of(mat["metadataEntries"])
            expected = "unchanged" if mat["runId"] == later_run else "committed"
            assert md["status"] == expected and md["partition_version"] == 1, (mat["runId"], md["status"])
        assert len(dep.materializations(EVENTS, OVERLAP)) == 2 * len(OVERLAP)

        _assert_one_commit_per_partition(dep.pcbo_home)
        report = pcbo_verify(dep.env, dep.root)
        assert report["status"] == "clean", report["findings"]
        assert report["checked"]["partitions"] == 9 and set(report["checked"]["chains"]) == {"events/v1"}


_RUN_ONE = """
import json, sys, time
import dagster as dg
from pathlib import Path
from pcbo_dagster_tests.dagster_harness import materialize_range

config, start, end, go_at = sys.argv[1:]
with dg.instance_for_test() as instance:  # its own instance: no pool shared with the other process
    time.sleep(max(0.0, float(go_at) - time.time()))
    result = materialize_range(Path(config), "events", start, end, instance)
    stamps = {
        e.dagster_event.event_type_value: e.timestamp
        for e in instance.all_logs(result.run_id)
        if e.dagster_event is not None and e.dagster_event.step_key == "events.events__parquet_emission"
    }
    print(json.dumps({
        "success": result.success,
        "window": [stamps.get("STEP_START"), stamps.get("STEP_SUCCESS")],
        "status": {
            m.partition: m.metadata["status"].value for m in result.asset_materializations_for_node("events")
        },
    }))
"""


def test_without_a_pool_the_engine_lock_keeps_one_chain(tmp_path):
    config = write_workdir(tmp_path / "work")
    pcbo_home = tmp_path / "pcbo"
    env = pcbo_env(pcbo_home, config, tmp_path / "dagster_home")
    go_at = time.time() + 8  # both processes have imported Dagster by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RUN_ONE, str(config), keys[0], keys[-1], str(go_at)],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for keys in (FIRST, SECOND)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-4000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(o["success"] for o in outputs), outputs
    first, second = outputs
    assert sorted(first["status"]) == FIRST and sorted(second["status"]) == SECOND
    # Whichever wrote the overlap first committed it; the other found it unchanged.
    for key in OVERLAP:
        assert sorted([first["status"][key], second["status"][key]]) == ["committed", "unchanged"], key
    windows = sorted(tuple(o["window"]) for o in outputs)
    print(f"events steps without a pool (s): {windows}; overlapped: {windows[0][1] > windows[1][0]}")

    _assert_one_commit_per_partition(pcbo_home)
    report = pcbo_verify(env, tmp_path)
    assert report["status"] == "clean", report["findings"]
    assert report["checked"]["partitions"] == 9

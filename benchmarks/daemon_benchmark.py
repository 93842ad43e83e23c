"""Launch-to-complete of a backfill through a real `dagster-webserver` + `dagster-daemon` (SQLite
storage), launched over GraphQL as the asset page's "Materialize" dialog sends it.

`python benchmarks/daemon_benchmark.py [--records 200000 --partitions 720]` (from the repository root)

The same generated source and datasets config as `dagster_benchmark.py` (one hourly dataset,
`backfillPolicy: single_run`, checks per partition), served by the deployment the slow tests use
(`pcbo_dagster_tests/dagster_harness.py`: the repository's `dagster.yaml`, a throw-away
DAGSTER_HOME and PCBO_HOME). Reported, in seconds from the launch: the backfill's run created (the
daemon's backfill loop picked it up), the run started (dequeued and its worker up), the run finished,
the backfill completed; and the run's own duration.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dagster_benchmark import loadavg, partition_keys, write_inputs  # noqa: E402

from pcbo_dagster_tests.dagster_harness import deployment  # noqa: E402


def _run_times(dep: Any, run_id: str) -> dict[str, Any]:
    return dep.graphql(
        """query Run($id: ID!) {
             runOrError(runId: $id) { ... on Run { status creationTime startTime endTime } } }""",
        {"id": run_id},
    )["runOrError"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    keys = partition_keys(args.partitions)
    result: dict[str, Any] = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "records": args.records,
        "partitions": args.partitions,
        "loadAverage": {"start": loadavg()},
    }
    with tempfile.TemporaryDirectory(prefix="pcbo-daemon-bench-") as tmp_name:
        tmp = Path(tmp_name)
        _, config = write_inputs(tmp, args, "partition")
        with deployment(tmp / "deployment") as dep:
            shutil.copy(config, dep.config)
            dep.start_webserver()
            dep.start_daemon()
            time.sleep(5)  # the daemon's first loops: not part of a user's wait on a running deployment
            launched = time.time()
            backfill_id = dep.launch_backfill(["events"], keys[0], keys[-1], title="daemon benchmark")
            run_id = None
            while run_id is None:
                runs = dep.backfill(backfill_id)["runs"]
                run_id = runs[0]["runId"] if runs else None
                if run_id is None:
                    time.sleep(0.5)
            seen = time.time()
            state = dep.wait_for_backfills([backfill_id], timeout=args.timeout)[backfill_id]
            completed = time.time()
            times = _run_times(dep, run_id)
        if state["status"] not in {"COMPLETED", "COMPLETED_SUCCESS"} or times["status"] != "SUCCESS":
            sys.exit(f"backfill {state['status']}, run {times['status']}")
        result["seconds"] = {
            "runCreated": round(times["creationTime"] - launched, 2),
            "runSeenByPoller": round(seen - launched, 2),
            "runStarted": round(times["startTime"] - launched, 2),
            "runFinished": round(times["endTime"] - launched, 2),
            "backfillCompleted": round(completed - launched, 2),
            "runDuration": round(times["endTime"] - times["startTime"], 2),
        }
    result["loadAverage"]["end"] = loadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=720)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Cost of Iceberg publication (issue 17) as a share of execute time.

`python benchmarks/iceberg_benchmark.py [--records 200000 --partitions 720 --repeat 2] [--save]`

The same generated request is executed into a fresh empty PCBO_HOME without a `table` and with
`table: {format: iceberg, name: bench.events}` (the embedded SQLite catalog), each `pcbo execute` in
a new process (wall time includes process start). In the runs with a table, every
`Publisher.publish` call (one per commit batch of up to 32 partitions, plus the run's closing check;
the first one creates the table and imports pyiceberg) is timed inside the process. Reported: medians
of the wall times, the publication time per run and per snapshot, and its share of the execute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from generate_request import make_request

HERE = Path(__file__).resolve().parent
TARGET_SHARE = 0.10

#: Runs `pcbo execute` in this process with `Publisher.publish` timed; the timings go to argv[3].
CHILD = """
import json, sys, time
from pcbo_dagster.tables import iceberg_publication as ip
calls = []
original = ip.Publisher.publish
def publish(self, *args, **kwargs):
    began = time.perf_counter()
    result = original(self, *args, **kwargs)
    calls.append({"seconds": time.perf_counter() - began, "snapshot": result is not None})
    return result
ip.Publisher.publish = publish
from pcbo_dagster.cli.main import main
status = main(["execute", "--input", sys.argv[1], "--output", sys.argv[2]])
json.dump(calls, open(sys.argv[3], "w"))
sys.exit(status)
"""


def run(request: Path, home: Path, scratch: Path) -> tuple[float, list[dict]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCBO_")}
    env["PCBO_HOME"] = str(home)
    calls_file = scratch / "calls.json"
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(request), str(scratch / "out.json"), str(calls_file)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"execute failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, json.loads(calls_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=720)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/iceberg-<date>.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pcbo-iceberg-bench-"))
    try:
        plain = make_request(records=args.records, partitions=args.partitions, seed=1, run_id="bench-iceberg")
        plain_file = work / "plain.json"
        plain_file.write_text(json.dumps(plain))
        with_table = {**plain, "table": {"format": "iceberg", "name": "bench.events"}}
        table_file = work / "table.json"
        table_file.write_text(json.dumps(with_table))
        without: list[float] = []
        withs: list[float] = []
        publishing: list[float] = []
        snapshots: list[int] = []
        per_snapshot: list[float] = []
        for i in range(args.repeat):
            for name, request, walls in (("plain", plain_file, without), ("table", table_file, withs)):
                home = work / f"{name}-{i}"
                wall, calls = run(request, home, work)
                walls.append(wall)
                if name == "table":
                    publishing.append(sum(c["seconds"] for c in calls))
                    made = [c["seconds"] for c in calls if c["snapshot"]]
                    snapshots.append(len(made))
                    per_snapshot.append(statistics.median(made[1:] or made))
                shutil.rmtree(home)
                print(f"run {i} {name}: {wall:.2f} s", file=sys.stderr)
        result = {
            "date": datetime.now().strftime("%Y-%m-%d"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
            "records": args.records,
            "partitions": args.partitions,
            "repeat": args.repeat,
            "executeWithoutTableSeconds": statistics.median(without),
            "executeWithTableSeconds": statistics.median(withs),
            "publicationSecondsPerRun": statistics.median(publishing),
            "snapshotsPerRun": statistics.median(snapshots),
            "secondsPerSnapshotAfterTheFirst": statistics.median(per_snapshot),
            "publicationShareOfExecute": statistics.median(
                p / w for p, w in zip(publishing, withs, strict=True)
            ),
            "wallDifferenceShare": (statistics.median(withs) - statistics.median(without))
            / statistics.median(withs),
            "target": TARGET_SHARE,
        }
        print(json.dumps(result, indent=2))
        if args.save:
            out = HERE / "results" / f"iceberg-{result['date']}.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Many workers (issue 14): what range runs cost, and what Celery workers give on this machine.

    python benchmarks/celery_benchmark.py ranges  [--hours 720 --per-run 24 --records-per-hour 100]
    python benchmarks/celery_benchmark.py workers [--hours 96 --per-run 12 --workers 1,2,3]

**ranges**: one dataset's backfill of `--hours` hourly partitions as one run, and as the runs of its
`multi_run` policy (`--per-run` partitions each), one after another in this process (Dagster's
`materialize` on a throw-away instance, the code location's own assets and checks), each on a fresh
local lake, SQLite catalog and audit directory, from one JSONL source of `--records-per-hour` records an
hour on local disk; and the same runs with pruning off (`source.prune: false`: every run reads the
whole source). Reported: wall seconds of each, and the ratio multi / single (the issue asks < 2).

**workers**: pcbo_dagster_tests/test_celery_workers.py's backfill test (Redis, PostgreSQL, moto's S3 for
lake, source and audit store, workers as separate `celery` processes in their own directories), run
with 1, 2, 3 workers (`CELERY_WORKERS`), `--hours` partitions in runs of `--per-run`, as many runs in
flight as workers. Reported: the backfill's wall seconds (launch of the first run to the end of the
last), partitions/s, steps per worker; and the same runs one after another in one process on a local
lake (the test's single-host reference), partitions/s. Each figure is one trial: the machine is shared,
so the load average at the start is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _config(source: Path, hours: int, per_run: int, prune: bool) -> dict[str, Any]:
    day, h = divmod(hours, 24)
    return {
        "version": 1,
        "datasets": [
            {
                "name": "events",
                "versionLabel": "v1",
                "partitioning": {
                    "kind": "time_window",
                    "cron": "hourly",
                    "start": "2024-01-01T00:00:00Z",
                    "end": f"2024-{1 + day // 31:02d}-{day % 31 + 1:02d}T{h:02d}:00:00Z",
                    "timezone": "UTC",
                },
                "source": {"uri": str(source), "format": "jsonl", **({} if prune else {"prune": False})},
                "policies": {
                    "requireConsent": True,
                    "allowedJurisdictions": ["US", "CA"],
                    "onViolation": "omit",
                },
                "backfillPolicy": {"kind": "multi_run", "maxPartitionsPerRun": per_run},
                "checkGranularity": "run",
            }
        ],
    }


def _key(hour: int) -> str:
    day, h = divmod(hour, 24)
    return f"2024{1 + day // 31:02d}{day % 31 + 1:02d}T{h:02d}0000Z"


def _backfill(root: Path, source: Path, hours: int, per_run: int, run_size: int, prune: bool) -> float:
    """Seconds for the runs of `run_size` partitions covering `hours`, in this process."""
    import dagster as dg
    import yaml

    from pcbo_dagster_tests.dagster_harness import materialize_range

    home = Path(tempfile.mkdtemp(dir=root))
    config = home / "datasets.yaml"
    config.write_text(yaml.safe_dump(_config(source, hours, per_run, prune), sort_keys=False))
    os.environ["PCBO_HOME"] = str(home / "pcbo")
    started = time.perf_counter()
    with dg.instance_for_test() as instance:
        for hour in range(0, hours, run_size):
            last = min(hour + run_size, hours) - 1
            assert materialize_range(config, "events", _key(hour), _key(last), instance).success
    return time.perf_counter() - started


def ranges(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    for name in list(os.environ):
        if name.startswith("PCBO_"):
            del os.environ[name]
    root = Path(tempfile.mkdtemp(prefix="pcbo-ranges-"))
    source = root / "events.jsonl"
    with source.open("w") as out:
        for hour in range(args.hours):
            day, h = divmod(hour, 24)
            for i in range(args.records_per_hour):
                second = i * 3600 // args.records_per_hour
                date = f"2024-{1 + day // 31:02d}-{day % 31 + 1:02d}"
                record = {
                    "id": f"evt-{hour:05d}-{i:05d}",
                    "occurredAt": f"{date}T{h:02d}:{second // 60:02d}:{second % 60:02d}Z",
                    "consentGranted": (hour + i) % 7 != 0,
                    "jurisdiction": "US" if i % 2 else "CA",
                    "amount": i,
                }
                out.write(json.dumps(record) + "\n")
    load = _load()
    single = _backfill(root, source, args.hours, args.per_run, args.hours, True)
    multi = _backfill(root, source, args.hours, args.per_run, args.per_run, True)
    unpruned = (
        _backfill(root, source, args.hours, args.per_run, args.per_run, False) if args.unpruned else None
    )
    return {
        "measured": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadAverageAtStart": load,
        "partitions": args.hours,
        "records": args.hours * args.records_per_hour,
        "sourceBytes": source.stat().st_size,
        "singleRunSeconds": round(single, 1),
        "multiRun": {"runs": -(-args.hours // args.per_run), "seconds": round(multi, 1)},
        "multiOverSingle": round(multi / single, 2),
        "multiRunUnprunedSeconds": None if unpruned is None else round(unpruned, 1),
    }


def workers(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "measured": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "trials": [],
    }
    for n in args.workers:
        env = {
            **os.environ,
            "CELERY_WORKERS": str(n),
            "CELERY_HOURS": str(args.hours),
            "CELERY_PER_RUN": str(args.per_run),
            "CELERY_TEST_TIMEOUT": "1800",
        }
        load = _load()
        test = "pcbo_dagster_tests/test_celery_workers.py::test_celery_workers_backfill_as_one_host_would"
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:logging",
            test,
        ]
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        lines = {
            line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
            for line in done.stdout.splitlines()
            if line.startswith(("CELERY_BENCH ", "SINGLE_HOST_BENCH "))
        }
        if done.returncode != 0 or "CELERY_BENCH" not in lines:
            sys.exit(f"{n} worker(s): the test failed\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
        celery, single = lines["CELERY_BENCH"], lines["SINGLE_HOST_BENCH"]
        trial = {
            "workers": n,
            "loadAverageAtStart": load,
            "partitions": celery["partitions"],
            "runs": celery["runs"],
            "seconds": celery["seconds"],
            "partitionsPerSecond": round(celery["partitions"] / celery["seconds"], 2),
            "stepsPerWorker": celery["served"],
            "singleProcessSeconds": single["seconds"],
            "singleProcessPartitionsPerSecond": round(single["partitions"] / single["seconds"], 2),
        }
        print(json.dumps(trial), file=sys.stderr)
        results["trials"].append(trial)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("ranges")
    r.add_argument("--hours", type=int, default=720)
    r.add_argument("--per-run", type=int, default=24)
    r.add_argument("--records-per-hour", type=int, default=100)
    r.add_argument("--unpruned", action="store_true", help="also the multi-run backfill with pruning off")
    w = sub.add_parser("workers")
    w.add_argument("--hours", type=int, default=96)
    w.add_argument("--per-run", type=int, default=12)
    w.add_argument("--workers", type=lambda text: [int(x) for x in text.split(",")], default=[1, 2, 3])
    args = parser.parse_args()
    print(json.dumps(ranges(args) if args.what == "ranges" else workers(args), indent=2))


if __name__ == "__main__":
    main()

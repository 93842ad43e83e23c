"""Peak memory of `pcbo dry-run` and `pcbo execute` on a multi-GB JSONL source (streamed sources).

`python benchmarks/memory_benchmark.py [--records 3000000 --text-bytes 1000 --days 30
--chunk-seconds 3600] [--parallel N] [--keep DIR [--reuse]]`

Writes (streaming, never holding it in memory) a JSONL source of `--records` records, each with a
`--text-bytes` text field (the default makes about 3.1 GiB), spread evenly over `--days` days, and a
request naming it with partitions of `--chunk-seconds` (default hourly: 720), then runs
`python -m pcbo_dagster.cli.main dry-run` and `execute` on it as subprocesses, each alone in its own
process, reporting wall time and peak resident memory (getrusage RUSAGE_CHILDREN ru_maxrss: the
maximum over the children waited for so far, so each step runs in a fresh helper process). Prints
one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = "2024-01-01T00:00:00Z"
START_S = 1_704_067_200


def write_source(path: Path, records: int, text_bytes: int, days: int, seed: int) -> int:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    pool = ["".join(rng.choice(alphabet) for _ in range(text_bytes)) for _ in range(64)]
    span = days * 86_400
    with path.open("w", encoding="utf-8") as fh:
        lines = []
        for i in range(records):
            at = START_S + (i * span) // records
            record = {
                "id": f"evt-{i:09d}",
                "occurredAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
                "consentGranted": i % 10 != 0,
                "jurisdiction": ("US", "CA", "FR")[i % 3],
                "amount": i % 1000,
                "text": pool[i % 64],
            }
            lines.append(json.dumps(record, separators=(",", ":")))
            if len(lines) >= 10_000:
                fh.write("\n".join(lines) + "\n")
                lines = []
        if lines:
            fh.write("\n".join(lines) + "\n")
    return path.stat().st_size


def measure(step: str, args: list[str], env: dict[str, str]) -> dict[str, float | int]:
    """Run one CLI step in a fresh helper process (so RUSAGE_CHILDREN is its own) and report it."""
    helper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'status': p.returncode, 'seconds': wall, 'peakRssKiB': rss}))\n"
    )
    cmd = [sys.executable, "-c", helper, sys.executable, "-m", "pcbo_dagster.cli.main", step, *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    if result["status"] not in (0,):
        raise SystemExit(f"{step} exited with {result['status']}")
    return {
        "seconds": round(result["seconds"], 1),
        "peakRssMiB": round(result["peakRssKiB"] / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3_000_000)
    parser.add_argument("--text-bytes", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--chunk-seconds", type=int, default=3600)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="work here and keep the files (default: a temp dir)")
    parser.add_argument("--parallel", type=int, help="PCBO_PARALLEL for execute (default: the engine's, 4)")
    parser.add_argument("--reuse", action="store_true", help="keep a source.jsonl already in --keep")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="pcbo-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source.jsonl"
    t = time.perf_counter()
    if args.reuse and source.exists():
        size = source.stat().st_size
    else:
        size = write_source(source, args.records, args.text_bytes, args.days, args.seed)
    generated = time.perf_counter() - t
    end_s = START_S + args.days * 86_400
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end_s))
    request = {
        "runId": "memory-benchmark",
        "dataset": "events",
        "versionLabel": "v1",
        "start": START,
        "end": end,
        "chunkSeconds": args.chunk_seconds,
        "policies": {"requireConsent": True, "onViolation": "omit"},
        "source": {"uri": str(source), "format": "jsonl"},
    }
    request_path = work / "request.json"
    request_path.write_text(json.dumps(request), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCBO_")}
    env["PCBO_HOME"] = str(work / "home")
    shutil.rmtree(work / "home", ignore_errors=True)
    if args.parallel is not None:
        env["PCBO_PARALLEL"] = str(args.parallel)
    steps = {
        "dry-run": measure("dry-run", ["--input", str(request_path)], env),
        "execute": measure("execute", ["--input", str(request_path)], env),
    }
    print(
        json.dumps(
            {
                "records": args.records,
                "sourceBytes": size,
                "sourceGiB": round(size / 2**30, 2),
                "partitions": -(-args.days * 86_400 // args.chunk_seconds),
                "parallel": args.parallel or 4,
                "generateSeconds": round(generated, 1),
                "steps": steps,
                "python": sys.version.split()[0],
                "maxrssOfThisProcessMiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""End-to-end timing of `pcbo dry-run` / `pcbo execute` against a minimal pyarrow pipeline.

`python benchmarks/engine_benchmark.py [--records 200000 --partitions 720 --repeat 3] [--save]`

Every step runs as a real subprocess (process start included; wall time by `time.perf_counter`
around `subprocess.run`), `--repeat` times, each engine run with a fresh empty PCBO_HOME:
dry-run, execute, re-execute (same home again: the idempotent "unchanged" path) and
`minimal_pipeline.py` (the floor: the same essential work with no product features).
Peak RSS per step comes from `/usr/bin/time -v` when present, else from getrusage(RUSAGE_CHILDREN);
CPU seconds (user + system, the process and every thread and child it had) from getrusage. The CPU
figure gives a floor no scheduling can beat: execute's CPU seconds spread perfectly over every core of
the machine, as a ratio to the minimal pipeline's wall time (`cpuBound`). Both ratios are also given
as the median of each repeat's own ratio (`paired`): on a shared host whose speed drifts, the execute
and minimal runs of one repeat ran closest together.
Every repeat's directories are kept until the whole benchmark ends (a few tens of MiB each), never
deleted between steps: on ext4 without a journal (this machine's root file system), the inode
allocator passes over every inode deleted in the last 30-35 s one at a time, so a run that creates
thousands of files and directories right after thousands were deleted pays for the deletion. Measured
with `perf record` on 2026-12-06: the allocator's `recently_deleted` scan was 37% of an execute's CPU
samples run right after the previous repeat's directories were deleted (execute creates about 5,000
inodes, the minimal pipeline 720, so the minimal pipeline hardly pays), and about 10% in a run 40 s
after the last deletion.
With `--save` the figures are also written to `benchmarks/results/engine-<date>.json`.

`--split-bound` adds two steps to each repeat, to bound what any split of one execute over two
processes could win: `half` executes a request of half the records over half the partitions (same
generator and seed) into a fresh home, alone; `two-halves` executes two such requests at once, each into
a home of its own (wall time until both have ended; CPU summed; the larger peak RSS). Two independent
half runs share nothing, not even the parse of one request or one audit chain, so no split of a single
run into two processes can end sooner than they do; `splitBound` is that wall time over the minimal
pipeline's.

Before timing, the installed `pcbo_dagster` package is byte-compiled (`compileall`, only what is
missing or stale), as a wheel install by pip leaves it: an editable install run with
`PYTHONDONTWRITEBYTECODE` set would otherwise compile every module on every start (~0.3 s a process
on a 2-core machine), which no installed copy does. The load average is reported before and after.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from generate_request import make_request

HERE = Path(__file__).resolve().parent
MINIMAL = HERE / "minimal_pipeline.py"
TARGET_RATIO = 1.5  # issue 18 (aim: 1.3)
GNU_TIME = "/usr/bin/time"
STEPS = ("dry-run", "execute", "re-execute", "minimal")
SPLIT_STEPS = ("half", "two-halves")


def gnu_time_works() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    probe = subprocess.run([GNU_TIME, "-v", "true"], capture_output=True, text=True)
    return probe.returncode == 0 and "Maximum resident set size" in probe.stderr


def pcbo_command() -> list[str]:
    exe = shutil.which("pcbo")
    return [exe] if exe else [sys.executable, "-m", "pcbo_dagster.cli.main"]


def clean_env(home: Path) -> dict[str, str]:
    """The caller's environment without any PCBO_* override, with a PCBO_HOME of our own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCBO_")}
    env["PCBO_HOME"] = str(home)
    return env


def cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def gnu_time_peak_kib(report: Path) -> int:
    """The peak RSS (KiB) in a `/usr/bin/time -v -o FILE` report; 0 when it has none."""
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text())
    return int(match.group(1)) if match else 0


def timed(
    cmd: list[str], env: dict[str, str], scratch: Path, use_gnu_time: bool
) -> tuple[float, float, float, str]:
    """Run `cmd`; return (wall seconds, CPU seconds, peak RSS in MiB, stdout). Exits on failure."""
    rss_file = scratch / "rss.txt"
    full = [GNU_TIME, "-v", "-o", str(rss_file), *cmd] if use_gnu_time else cmd
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = usage_before.ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(full, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN)) - cpu_seconds(usage_before)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    if use_gnu_time:
        rss_kib = gnu_time_peak_kib(rss_file)
    else:
        # The high-water mark over all children so far: exact when it rose, an upper bound otherwise.
        rss_kib = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)
    return seconds, cpu, rss_kib / 1024, proc.stdout


def timed_together(
    cmds: list[list[str]], envs: list[dict[str, str]], scratch: Path, use_gnu_time: bool
) -> tuple[float, float, float]:
    """Start every command at once; return (wall seconds until the last has ended, CPU seconds of all,
    the largest peak RSS in MiB). Exits on failure."""
    rss_files = [scratch / f"rss-{i}.txt" for i in range(len(cmds))]
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [GNU_TIME, "-v", "-o", str(rss), *cmd] if use_gnu_time else cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd, env, rss in zip(cmds, envs, rss_files, strict=True)
    ]
    errors = [proc.communicate()[1] for proc in procs]
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN)) - cpu_seconds(usage_before)
    for proc, cmd, err in zip(procs, cmds, errors, strict=True):
        if proc.returncode != 0:
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    if use_gnu_time:
        peak_kib = max(gnu_time_peak_kib(rss) for rss in rss_files)
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, cpu, peak_kib / 1024


def engine_added(output: Path) -> tuple[str, int]:
    doc = json.loads(output.read_text())
    return doc["status"], sum(p["recordCount"] for p in doc["partitions"])


def byte_compile_package() -> str:
    """Byte-compile the `pcbo_dagster` package the `pcbo` command imports (see the module docstring)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import os, pcbo_dagster; print(os.path.dirname(pcbo_dagster.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    )
    package = probe.stdout.strip()
    compileall.compile_dir(package, quiet=1, workers=1)
    return package


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace) -> dict:
    use_gnu_time = gnu_time_works()
    package = byte_compile_package()
    load_before = load_average()
    print(f"byte-compiled {package}; load average {load_before}", flush=True)
    pcbo = pcbo_command()
    steps = STEPS + SPLIT_STEPS if args.split_bound else STEPS
    times: dict[str, list[float]] = {s: [] for s in steps}
    cpus: dict[str, list[float]] = {s: [] for s in steps}
    rss: dict[str, list[float]] = {s: [] for s in steps}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="pcbo-bench-") as tmp_name:
        tmp = Path(tmp_name)
        req = tmp / "req.json"
        t0 = time.perf_counter()
        req.write_text(json.dumps(make_request(args.records, args.partitions, args.seed)), encoding="utf-8")
        print(
            f"request: {args.records:,} records, {args.partitions} partitions, "
            f"{req.stat().st_size / 2**20:.1f} MiB, generated in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        out = tmp / "out.json"
        half = tmp / "half.json"
        if args.split_bound:
            half_request = make_request(args.records // 2, args.partitions // 2, args.seed)
            half.write_text(json.dumps(half_request), encoding="utf-8")

        def record(name: str, seconds: float, cpu: float, peak: float) -> None:
            times[name].append(seconds)
            cpus[name].append(cpu)
            rss[name].append(peak)
            print(f"  {name:<11} {seconds:7.2f}s  {cpu:6.2f} CPU s  {peak:7.0f} MiB", flush=True)

        def step(name: str, cmd: list[str], home: Path) -> str:
            seconds, cpu, peak, stdout = timed(cmd, clean_env(home), tmp, use_gnu_time)
            record(name, seconds, cpu, peak)
            return stdout

        for rep in range(1, args.repeat + 1):
            print(f"repeat {rep}/{args.repeat}", flush=True)
            dry_home, home, min_out = tmp / f"dry-{rep}", tmp / f"home-{rep}", tmp / f"minimal-{rep}"
            io_args = ["--input", str(req), "--output", str(out)]
            step("dry-run", [*pcbo, "dry-run", *io_args], dry_home)
            counts["dry-run"] = json.loads(out.read_text())["totals"]["add"]
            step("execute", [*pcbo, "execute", *io_args], home)
            status, counts["execute"] = engine_added(out)
            if status != "committed":
                sys.exit(f"execute into an empty home returned status {status!r}")
            step("re-execute", [*pcbo, "execute", *io_args], home)
            status, _ = engine_added(out)
            if status != "unchanged":
                sys.exit(f"re-execute returned status {status!r}, expected 'unchanged'")
            minimal_cmd = [sys.executable, str(MINIMAL), "--input", str(req), "--out-dir", str(min_out)]
            stdout = step("minimal", minimal_cmd, home)
            counts["minimal"] = json.loads(stdout)["rows"]
            if args.split_bound:
                half_cmd = [*pcbo, "execute", "--input", str(half), "--output", os.devnull]
                step("half", half_cmd, tmp / f"half-{rep}")
                homes = [tmp / f"halves-{rep}-{side}" for side in ("a", "b")]
                envs = [clean_env(h) for h in homes]
                record("two-halves", *timed_together([half_cmd, half_cmd], envs, tmp, use_gnu_time))
            # Every repeat's directories stay until the end, when the temporary directory goes (the
            # module docstring says why).

    summary: dict[str, dict[str, Any]] = {}
    records_of = {"half": args.records // 2, "two-halves": 2 * (args.records // 2)}
    for name in steps:
        med = statistics.median(times[name])
        summary[name] = {
            "medianSeconds": round(med, 3),
            "minSeconds": round(min(times[name]), 3),
            "medianCpuSeconds": round(statistics.median(cpus[name]), 3),
            "recordsPerSecond": round(records_of.get(name, args.records) / med),
            "peakRssMiB": round(max(rss[name]), 1),
            "seconds": [round(t, 3) for t in times[name]],
            "cpuSeconds": [round(t, 3) for t in cpus[name]],
        }
    execute, minimal = summary["execute"], summary["minimal"]
    cores = os.cpu_count() or 1
    paired = [e / m for e, m in zip(times["execute"], times["minimal"], strict=True)]
    paired_floor = [c / cores / m for c, m in zip(cpus["execute"], times["minimal"], strict=True)]
    ratio: dict[str, Any] = {
        "executeOverMinimalMedian": round(execute["medianSeconds"] / minimal["medianSeconds"], 2),
        "executeOverMinimalMin": round(execute["minSeconds"] / minimal["minSeconds"], 2),
        "target": TARGET_RATIO,
        # The best any scheduling could do: execute's CPU seconds over all the cores at once.
        "cpuBound": round(execute["medianCpuSeconds"] / cores / minimal["medianSeconds"], 2),
        "cores": cores,
        "paired": {
            "executeOverMinimal": round(statistics.median(paired), 2),
            "cpuBound": round(statistics.median(paired_floor), 2),
            "perRepeat": [round(r, 2) for r in paired],
        },
    }
    if args.split_bound:
        # The best any split of one run over two processes could do (the module docstring says why).
        paired_split = [h / m for h, m in zip(times["two-halves"], times["minimal"], strict=True)]
        ratio["splitBound"] = round(summary["two-halves"]["medianSeconds"] / minimal["medianSeconds"], 2)
        ratio["paired"]["splitBound"] = round(statistics.median(paired_split), 2)
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadAverage": {"before": load_before, "after": load_average()},
        "records": args.records,
        "partitions": args.partitions,
        "repeat": args.repeat,
        "seed": args.seed,
        "rssSource": "/usr/bin/time -v" if use_gnu_time else "getrusage(RUSAGE_CHILDREN) high-water mark",
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "steps": summary,
        "addedRows": {"engine": counts["execute"], "dryRun": counts["dry-run"], "minimal": counts["minimal"]},
        "ratio": ratio,
    }


def print_table(result: dict) -> None:
    records = result["records"]
    print()
    print(f"{records:,} input records, {result['partitions']} partitions, {result['repeat']} runs each")
    header = f"{'step':<12}{'median s':>10}{'min s':>10}{'CPU s':>8}{'records/s':>12}{'peak RSS MiB':>14}"
    print(header)
    print("-" * len(header))
    for name, s in result["steps"].items():
        print(
            f"{name:<12}{s['medianSeconds']:>10.2f}{s['minSeconds']:>10.2f}{s['medianCpuSeconds']:>8.2f}"
            f"{s['recordsPerSecond']:>12,}{s['peakRssMiB']:>14.0f}"
        )
    print("-" * len(header))
    ratio = result["ratio"]
    verdict = "meets" if ratio["executeOverMinimalMedian"] <= ratio["target"] else "misses"
    print(
        f"execute / minimal: {ratio['executeOverMinimalMedian']:.2f}x median, "
        f"{ratio['executeOverMinimalMin']:.2f}x min, {ratio['paired']['executeOverMinimal']:.2f}x "
        f"the median of the repeats' own ratios (target {ratio['target']}x: {verdict})"
    )
    print(
        f"floor from CPU time: execute's {result['steps']['execute']['medianCpuSeconds']:.2f} CPU s "
        f"spread perfectly over {ratio['cores']} cores would still be {ratio['cpuBound']:.2f}x "
        f"the minimal pipeline's wall time ({ratio['paired']['cpuBound']:.2f}x paired by repeat)"
    )
    if "splitBound" in ratio:
        print(
            f"two half requests executed at once, {result['steps']['two-halves']['medianSeconds']:.2f} s: "
            f"no split of one execute over two processes can end sooner, {ratio['splitBound']:.2f}x "
            f"the minimal pipeline ({ratio['paired']['splitBound']:.2f}x paired by repeat)"
        )
    added = result["addedRows"]
    diff = (added["minimal"] - added["engine"]) / added["engine"] * 100 if added["engine"] else 0.0
    print(
        f"added rows: engine {added['engine']:,} (dry-run {added['dryRun']:,}), "
        f"minimal {added['minimal']:,} ({diff:+.2f}%)"
    )
    print(f"peak RSS from {result['rssSource']}")
    load = result["loadAverage"]
    print(f"load average (1, 5, 15 min): before {load['before']}, after {load['after']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=720)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/engine-<date>.json")
    parser.add_argument(
        "--split-bound",
        action="store_true",
        help="also time a half request alone and two at once (the best a split over two processes can do)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    result = run(args)
    print_table(result)
    if args.save:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        path = results / f"engine-{datetime.now():%Y-%m-%d}.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"saved {path}")


if __name__ == "__main__":
    main()

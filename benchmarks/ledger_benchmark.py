"""`pcbo execute` of a `ledgerRange` request whose source is a realistic SEP-54 ledger archive.

The archive (`generate_ledger_archive.py`: by default 2,048 ledgers of ~200 transactions and ~467
KiB of LedgerCloseMeta v2 XDR each, one ledger a file as Galexie writes pubnet) is generated once
into `--archive` (reused when it is already there) or a temporary directory. Each run is a fresh
`pcbo` process into an empty `PCBO_HOME`, timed around the process (interpreter start and imports
included):

- `execute` (defaults: `--parallel` 2 on a local lake for a ledger archive, two partitions staged at
  once; ledger decoding in `PCBO_LEDGER_WORKERS` processes, default: the CPUs, at most 4);
- `execute --parallel 1`: partitions written one after another (the default before 2026-12-06);
- `execute --parallel 4`: four partitions staged at once (the default on an object-store lake);
- `dry-run` (defaults): pass 1 alone (every ledger read, walked and hashed, no partition written);
- with `--one-process`: `execute --parallel 1` with `PCBO_LEDGER_WORKERS=1` (all in one process);
- with `--reference N`, once: `execute --parallel 1` through the full stellar-sdk decoding that the
  walker replaced (`pcbo_dagster_tests/reference_ledger_decoder.py`) over the first N ledgers.

Printed: the median and minimum wall seconds of `--repeat` runs, ledgers/s and MiB/s of ledger XDR
(from the median), the peak RSS of the process tree's largest process, and the 1-minute load average
before each run (other jobs on the machine slow every figure down: compare runs at similar load).

    python benchmarks/ledger_benchmark.py                                  # 2,048 ledgers, 3 runs each
    python benchmarks/ledger_benchmark.py --ledgers 256 --repeat 1         # quick check
    python benchmarks/ledger_benchmark.py --archive /tmp/ledgers-2048 --reference 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from generate_ledger_archive import generate  # noqa: E402

from pcbo_dagster_tests.realistic_ledgers import ARCHIVE_FORMAT, FIRST_LEDGER  # noqa: E402


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def archive_size(root: Path) -> tuple[int, int]:
    """(ledgers, bytes of XDR) of the generated archive at `root`, from its marker file."""
    marker = json.loads((root / ".benchmark.json").read_text())
    return marker["ledgers"], marker["xdrBytes"]


def ensure_archive(root: Path, args: argparse.Namespace) -> tuple[int, int]:
    wanted = {
        "ledgers": args.ledgers,
        "transactions": args.transactions,
        "ledgersPerFile": args.ledgers_per_file,
        "version": args.version,
        "format": ARCHIVE_FORMAT,
    }
    marker = root / ".benchmark.json"  # a dot file: the reader ignores it (as SEP-54's .config.json)
    if marker.exists():
        held = json.loads(marker.read_text())
        if held.get("format", 1) != ARCHIVE_FORMAT:
            sys.exit(
                f"{root} holds an archive of an earlier generator (format {held.get('format', 1)}, not "
                f"{ARCHIVE_FORMAT}: its headers do not name their results' hash, which pcbo checks): "
                "give an empty or new folder"
            )
        if {k: v for k, v in held.items() if k in wanted} == wanted:
            print(f"archive: {root} (reused)", flush=True)
            return archive_size(root)
    if root.exists() and any(root.iterdir()):
        sys.exit(f"{root} holds something other than this benchmark's archive: give an empty or new folder")
    t0 = time.perf_counter()
    archive = generate(
        root,
        ledgers=args.ledgers,
        transactions=args.transactions,
        ledgers_per_file=args.ledgers_per_file,
        version=args.version,
    )
    marker.write_text(json.dumps({**wanted, "xdrBytes": archive.xdr_bytes}))
    print(
        f"archive: {root}: {archive.files} files, {archive.xdr_bytes / 2**20:.0f} MiB of XDR "
        f"({archive.xdr_bytes / args.ledgers / 1024:.0f} KiB a ledger), "
        f"{archive.stored_bytes / 2**20:.0f} MiB compressed, generated in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return args.ledgers, archive.xdr_bytes


def write_request(path: Path, archive: Path, ledgers: int, partition_size: int) -> Path:
    request = {
        "runId": "ledger-benchmark",
        "dataset": "ledgers",
        "versionLabel": "v1",
        "ledgerRange": {
            "field": "ledgerSequence",
            "first": FIRST_LEDGER,
            "end": FIRST_LEDGER + ledgers,
            "partitionSize": partition_size,
        },
        "policies": {"requireConsent": True},
        "source": {"uri": str(archive), "format": "ledger_archive"},
    }
    path.write_text(json.dumps(request))
    return path


def run(
    module: str, args: list[str], scratch: Path, env: dict[str, str]
) -> tuple[float, float, dict[str, Any]]:
    """(wall seconds, peak RSS MiB, output document) of one `pcbo` process into a fresh home."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=scratch))
    out = home / "out.json"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PCBO_")}
    full_env.update(env)
    full_env.update({"PCBO_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)})
    cmd = [sys.executable, "-m", module, *args, "--output", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=scratch)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{stderr}")
    document = json.loads(out.read_text())
    subprocess.run(["rm", "-rf", str(home)], check=True)
    return wall, usage.ru_maxrss / 1024, document


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ledgers", type=int, default=2048)
    parser.add_argument("--transactions", type=int, default=200)
    parser.add_argument("--ledgers-per-file", type=int, default=1)
    parser.add_argument("--version", type=int, choices=(0, 1, 2), default=2)
    parser.add_argument("--partition-size", type=int, default=64, help="ledgers a partition")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--archive", type=Path, help="where the archive is (or is generated); default: a temp dir"
    )
    parser.add_argument("--reference", type=int, default=0, help="also run the full decoding on N ledgers")
    parser.add_argument(
        "--one-process", action="store_true", help="also run execute --parallel 1 with PCBO_LEDGER_WORKERS=1"
    )
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/ledgers-<date>.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pcbo-ledger-bench-") as tmp:
        scratch = Path(tmp)
        root = args.archive or scratch / "archive"
        ledgers, xdr_bytes = ensure_archive(root, args)
        request = write_request(scratch / "request.json", root, ledgers, args.partition_size)
        execute = ["execute", "--input", str(request)]
        cases: list[tuple[str, list[str], dict[str, str]]] = [
            ("execute (defaults)", execute, {}),
            ("execute --parallel 1", [*execute, "--parallel", "1"], {}),
            ("execute --parallel 4", [*execute, "--parallel", "4"], {}),
            ("dry-run (defaults)", ["dry-run", "--input", str(request)], {}),
        ]
        if args.one_process:
            one = {"PCBO_LEDGER_WORKERS": "1"}
            cases.append(("execute --parallel 1, PCBO_LEDGER_WORKERS=1", [*execute, "--parallel", "1"], one))
        print(
            f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"{ledgers} ledgers, "
            f"{xdr_bytes / 2**20:.0f} MiB of XDR; partitions of {args.partition_size} ledgers",
            flush=True,
        )
        results: dict[str, Any] = {}
        for repeat in range(args.repeat):
            for name, cmd, env in cases:
                before = load()
                wall, rss, document = run("pcbo_dagster.cli.main", cmd, scratch, env)
                if name.startswith("execute"):
                    rows = sum(p["recordCount"] for p in document["partitions"])
                    if document["status"] != "committed" or rows != ledgers:
                        sys.exit(
                            f"{name}: status {document['status']}, {rows} ledgers written, not {ledgers}"
                        )
                results.setdefault(name, []).append({"wall": wall, "rss": rss, "load": before})
                print(
                    f"  run {repeat + 1} {name:44s} {wall:7.2f} s  {ledgers / wall:6.1f} ledgers/s  "
                    f"peak RSS {rss:5.0f} MiB  load {before} -> {load()}",
                    flush=True,
                )
        if args.reference:
            n = min(args.reference, ledgers)
            small = write_request(scratch / "reference.json", root, n, args.partition_size)
            before = load()
            wall, rss, _ = run(
                "pcbo_dagster_tests.reference_ledger_decoder",
                ["execute", "--input", str(small), "--parallel", "1"],
                scratch,
                {},
            )
            results[f"full decoding, {n} ledgers, execute --parallel 1"] = [
                {"wall": wall, "rss": rss, "load": before, "ledgers": n}
            ]
            rate = n / wall
            print(
                f"  reference (full decoding) {n} ledgers {wall:7.2f} s  {rate:6.2f} ledgers/s  load {before}"
            )
        print("\n| run | median s | min s | ledgers/s | MiB/s of XDR | peak RSS MiB | load (1/5/15) before |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for name, runs in results.items():
            walls = [r["wall"] for r in runs]
            n = runs[0].get("ledgers", ledgers)
            size = xdr_bytes * n / ledgers
            median = statistics.median(walls)
            rss = max(r["rss"] for r in runs)
            loads = ", ".join(r["load"] for r in runs)
            print(
                f"| {name} | {median:.2f} | {min(walls):.2f} | {n / median:.1f} | "
                f"{size / 2**20 / median:.1f} | {rss:.0f} | {loads} |"
            )
        if args.save:
            out = REPO_ROOT / "benchmarks" / "results" / f"ledgers-{date.today().isoformat()}.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps({"ledgers": ledgers, "xdrBytes": xdr_bytes, "runs": results}, indent=2))


if __name__ == "__main__":
    main()

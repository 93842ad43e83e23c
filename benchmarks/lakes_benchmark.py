"""`pcbo execute` from a parquet source into a file://, an s3:// and a gs:// lake, one partition at a
time (`--parallel 1`) and four at once (`--parallel 4`): records/s, the speedup, and peak RSS.

`python benchmarks/lakes_benchmark.py [--records 100000 --partitions 720 --repeat 2] [--lakes file,s3,gs]`

The request is `generate_request.py`'s (fixed seed) with its records written to a parquet file and
named by `source` instead of inline. For an object-store lake the source sits in the same store
(the run reads it from there); for the file lake it is a local file. The S3 lake is moto's server and
the GCS lake gcp-storage-emulator (in memory), each in a process of its own on 127.0.0.1, set up as
the tests set them up (`pcbo_dagster_tests/object_store_servers.py`) and started afresh for every run
(gcp-storage-emulator slows down as it fills up, which would favour whichever run came first). They share the
machine's CPUs with the run they serve, so their figures measure the engine plus a local emulator,
not a cloud.

Every run is `python -m pcbo_dagster.cli.main execute` in a fresh process with a fresh `PCBO_HOME` and a
fresh lake (on an object store: a fresh server). Per run:
- **wall**: `time.perf_counter` around the process (interpreter start, imports, reading and
  evaluating the source, executing, writing the output);
- **execute**: the `execute()` call alone (staging, commit points, audit, post-write checks,
  catalog), the part `--parallel` acts on, timed inside the process;
- **peak RSS**: `ru_maxrss` of that process from `os.wait4` (its own high-water mark).
Records/s are input records over the median seconds. Each run's partition checksums and Merkle roots
must be the same for every lake and parallelism (the benchmark exits otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from generate_request import make_request

HERE = Path(__file__).resolve().parent
BUCKET = "pcbo-bench-lake"
LAKES = ("file", "s3", "gs")
PARALLELS = (1, 4)
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


# -- the parquet source -------------------------------------------------------------------------------


def parquet_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The generated records with one type per column, as a parquet file must hold them: the few
    `consentGranted: "true"` strings (not consent either way) become null."""
    result = []
    for rec in records:
        rec = dict(rec)
        if not isinstance(rec.get("consentGranted"), bool):
            rec["consentGranted"] = None
        result.append(rec)
    return result


def write_source(records: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("occurredAt", pa.string()),
            ("jurisdiction", pa.string()),
            ("consentGranted", pa.bool_()),
            ("retentionExpiresAt", pa.string()),
            ("amount", pa.int64()),
            ("channel", pa.string()),
            ("converted", pa.bool_()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(parquet_records(records), schema=schema), path, compression="zstd")


# -- object-store servers, each in its own process ------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(kind: str, port: int) -> None:
    """`--serve s3|gs PORT`: run one server until terminated (the child side of `start_server`)."""
    if kind == "s3":
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    else:
        from gcp_storage_emulator.server import create_server

        server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server.start()
    print("ready", flush=True)
    # no request logs: nobody reads this process's output from here on
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


def start_server(kind: str) -> tuple[subprocess.Popen, dict[str, str]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, str(port)], stdout=subprocess.PIPE, text=True
    )
    if proc.stdout is None or proc.stdout.readline().strip() != "ready":
        sys.exit(f"the {kind} server did not start")
    endpoint = f"http://127.0.0.1:{port}"
    if kind == "s3":
        import boto3

        boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=BUCKET)
        return proc, {**S3_ENV, "PCBO_S3_ENDPOINT_URL": endpoint}
    return proc, {
        "STORAGE_EMULATOR_HOST": endpoint,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "pcbo-bench",
    }


def _boto_credentials() -> dict[str, str]:
    return {
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
    }


def upload(env: dict[str, str], local: Path, url: str) -> None:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        from pcbo_dagster.lake.storage import filesystem

        fs, path = filesystem(url)
        fs.pipe_file(path, local.read_bytes())
    finally:
        os.environ.clear()
        os.environ.update(saved)


# -- one measured run -------------------------------------------------------------------------------------


def child(timing_file: str, argv: list[str]) -> int:
    """`--child TIMING -- ARGS`: the `pcbo` CLI with `execute()` timed (the measured process)."""
    from pcbo_dagster.cli import main as cli
    from pcbo_dagster.engine import execute as execute_module

    real = execute_module.execute

    def timed_execute(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            Path(timing_file).write_text(f"{time.perf_counter() - t0:.6f}")

    execute_module.execute = timed_execute
    return cli.main(argv)


def run_execute(request: Path, home: Path, lake_url: str, parallel: int, env: dict[str, str], scratch: Path):
    """(wall seconds, execute seconds, peak RSS MiB, document) of one `pcbo execute` process."""
    out, timing, err = scratch / "out.json", scratch / "execute-seconds.txt", scratch / "stderr.txt"
    for f in (out, timing):
        f.unlink(missing_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PCBO_")}
    full_env.update(env)
    full_env.update({"PCBO_HOME": str(home), "PCBO_LAKE_URL": lake_url})
    cmd = [sys.executable, __file__, "--child", str(timing), "--"]
    cmd += ["execute", "--input", str(request), "--output", str(out), "--parallel", str(parallel)]
    with open(err, "wb") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=scratch)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"execute failed ({proc.returncode}) on {lake_url}:\n{err.read_text()}")
    document = json.loads(out.read_text())
    if document["status"] != "committed":
        sys.exit(f"execute into a fresh lake returned status {document['status']!r}")
    # ru_maxrss is in KiB on Linux
    return wall, float(timing.read_text()), usage.ru_maxrss / 1024, document


def measure(kind: str, parallel: int, generated: dict[str, Any], source: Path, tmp: Path):
    """One run into a fresh lake; an object-store lake on a freshly started server (an empty store:
    the emulators slow down as they fill, which would favour whichever run came first)."""
    run_id = uuid.uuid4().hex
    home = tmp / f"home-{run_id}"
    if kind == "file":
        request = tmp / f"request-{run_id}.json"
        request.write_text(json.dumps({**generated, "source": {"uri": source.as_uri(), "format": "parquet"}}))
        try:
            return run_execute(request, home, (tmp / f"lake-{run_id}").as_uri(), parallel, {}, tmp)
        finally:
            shutil.rmtree(tmp / f"lake-{run_id}", ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)
    server, env = start_server(kind)
    try:
        source_uri = f"{kind}://{BUCKET}/source/records.parquet"
        upload(env, source, source_uri)
        request = tmp / f"request-{run_id}.json"
        request.write_text(json.dumps({**generated, "source": {"uri": source_uri, "format": "parquet"}}))
        return run_execute(request, home, f"{kind}://{BUCKET}/lake", parallel, env, tmp)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def digest(document: dict[str, Any]) -> list[tuple[str, list[str], str]]:
    return [(p["key"], [f["checksum"] for f in p["files"]], p["merkleRoot"]) for p in document["partitions"]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    lakes = [k.strip() for k in args.lakes.split(",") if k.strip()]
    rows: list[dict[str, Any]] = []
    reference = None
    with tempfile.TemporaryDirectory(prefix="pcbo-lakes-bench-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        generated = make_request(args.records, args.partitions, args.seed)
        source = tmp / "source.parquet"
        write_source(generated.pop("sourceRecords"), source)
        print(
            f"source: {args.records:,} records, {source.stat().st_size / 2**20:.1f} MiB parquet, "
            f"{args.partitions} partitions; made in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        for kind in lakes:
            results: dict[int, list[tuple[float, float, float]]] = {p: [] for p in PARALLELS}
            for rep in range(1, args.repeat + 1):
                for parallel in PARALLELS:  # alternate, so drifting load hits both alike
                    wall, seconds, rss, document = measure(kind, parallel, generated, source, tmp)
                    if reference is None:
                        reference = digest(document)
                    elif digest(document) != reference:
                        sys.exit(f"{kind} --parallel {parallel}: different files or roots than the first run")
                    results[parallel].append((wall, seconds, rss))
                    print(
                        f"  {kind:<4} --parallel {parallel}  run {rep}: wall {wall:6.2f}s  "
                        f"execute() {seconds:6.2f}s  peak RSS {rss:5.0f} MiB  "
                        f"(load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
            for parallel in PARALLELS:
                walls = [r[0] for r in results[parallel]]
                execs = [r[1] for r in results[parallel]]
                rows.append(
                    {
                        "lake": kind,
                        "parallel": parallel,
                        "wallSeconds": round(statistics.median(walls), 3),
                        "executeSeconds": round(statistics.median(execs), 3),
                        "recordsPerSecond": round(args.records / statistics.median(walls)),
                        "executeRecordsPerSecond": round(args.records / statistics.median(execs)),
                        "peakRssMiB": round(max(r[2] for r in results[parallel]), 1),
                        "runs": [[round(x, 3) for x in r] for r in results[parallel]],
                    }
                )
        source_mib = source.stat().st_size / 2**20
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "records": args.records,
        "partitions": args.partitions,
        "sourceMiB": round(source_mib, 2),
        "repeat": args.repeat,
        "seed": args.seed,
        "loadAverage": [round(x, 2) for x in os.getloadavg()],
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    print()
    print(
        f"{result['records']:,} records from a {result['sourceMiB']:.1f} MiB parquet source, "
        f"{result['partitions']} partitions, medians of {result['repeat']}, {result['host']['cpus']} CPUs"
    )
    header = (
        f"{'lake':<6}{'parallel':>9}{'wall s':>9}{'records/s':>11}{'execute() s':>13}"
        f"{'records/s':>11}{'speedup':>9}{'peak RSS MiB':>14}"
    )
    print(header)
    print("-" * len(header))
    base: dict[str, dict[str, Any]] = {}
    for row in result["rows"]:
        if row["parallel"] == 1:
            base[row["lake"]] = row
        b = base.get(row["lake"])
        speedup = f"{b['wallSeconds'] / row['wallSeconds']:.2f}x" if b else ""
        exec_speedup = f" ({b['executeSeconds'] / row['executeSeconds']:.2f}x)" if b else ""
        print(
            f"{row['lake']:<6}{row['parallel']:>9}{row['wallSeconds']:>9.2f}{row['recordsPerSecond']:>11,}"
            f"{row['executeSeconds']:>13.2f}{row['executeRecordsPerSecond']:>11,}"
            f"{speedup:>9}{exec_speedup}{row['peakRssMiB']:>14.0f}"
        )
    print("speedup: wall of --parallel 1 / wall of this row (in brackets: the same for execute() alone)")
    print(f"load average at the end: {result['loadAverage']}")


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[4:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=720)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--lakes", default=",".join(LAKES), help="comma-separated: file, s3, gs")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/lakes-<date>.json")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    result = run(args)
    print_table(result)
    if args.save:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        path = results / f"lakes-{datetime.now():%Y-%m-%d}.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"saved {path}")


if __name__ == "__main__":
    main()

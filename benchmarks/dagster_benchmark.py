"""A one-run Dagster backfill over many hourly partitions, next to the engine alone and a no-op asset.

`python benchmarks/dagster_benchmark.py [--records 200000 --partitions 720 --sample 5] [--save]`

In a temporary directory: the generated request's records as a JSONL source and a datasets config
with one hourly time-window dataset over them (`backfillPolicy: single_run`, the request's
policies and existing target ids). Every measurement is a real subprocess (interpreter start and
imports included) with a fresh PCBO_HOME and a fresh on-disk DAGSTER_HOME (SQLite storage):

- engine alone: `pcbo execute` on the equivalent request (same records, window, chunk, policies);
- dagster, one run: the code location's definitions loaded and `dagster.materialize()` on the asset
  and its checks over the whole partition range (the range tags), once per `--granularity`
  (`checkGranularity`); checked: every partition has a recorded materialization, `pcbo verify` is clean;
- no-op floor: an asset over the same partitions with `BackfillPolicy.single_run()` that records
  one materialization per partition and does nothing else (Dagster's own cost of a range run);
- one run per partition: `--sample` single-partition `materialize()` runs in one process (each its
  own run on the instance), and one `dagster asset materialize --partition KEY` CLI process;
  both extrapolated to every partition.

Target (issue 13): the one-run wall time within 1.3 x (engine alone + no-op floor), both wall
times. `--profile` adds a cProfile of one more range `materialize()` (top 20 by cumulative time).
With `--save` the figures are also written to `benchmarks/results/dagster-<date>.json`.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from generate_request import make_request

from pcbo_dagster.core.partition_keys import TIME_KEY_STRFTIME

HERE = Path(__file__).resolve().parent
DATASET = "events"
DEFS_MODULE = "pcbo_dagster.dagster_defs.definitions"
#: Issue 13's target: the one-run backfill within this factor of (engine alone + the no-op floor).
TARGET_FACTOR = 1.3
START = datetime(2024, 1, 1, tzinfo=UTC)
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
GRANULARITIES = ("run", "partition")


# --- shared helpers -----------------------------------------------------------------------------


def partition_keys(partitions: int) -> list[str]:
    """The hourly keys (the engine's partition key) from 2024-01-01."""
    return [(START + timedelta(hours=i)).strftime(TIME_KEY_STRFTIME) for i in range(partitions)]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pcbo_command() -> list[str]:
    exe = shutil.which("pcbo")
    return [exe] if exe else [sys.executable, "-m", "pcbo_dagster.cli.main"]


def dagster_command() -> list[str]:
    exe = shutil.which("dagster")
    return [exe] if exe else [sys.executable, "-m", "dagster"]


def make_env(pcbo_home: Path, dagster_home: Path | None = None, config: Path | None = None) -> dict[str, str]:
    """The caller's environment without PCBO_* / DAGSTER_* overrides, with our own homes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCBO_", "DAGSTER_"))}
    env["PCBO_HOME"] = str(pcbo_home)
    if dagster_home is not None:
        dagster_home.mkdir(parents=True, exist_ok=True)
        # No storage block: SQLite under DAGSTER_HOME (a real on-disk instance). Telemetry off so
        # nothing but the run itself writes there.
        (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
        env["DAGSTER_HOME"] = str(dagster_home)
    if config is not None:
        env["PCBO_DATASETS_CONFIG"] = str(config)
    return env


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return seconds, proc


# --- the worker: runs inside the measured subprocess ---------------------------------------------


def _run_report(instance: Any, run_id: str, called_at: float, returned_at: float) -> dict[str, Any]:
    """Event counts by type, step durations and a timeline of the run's phases.

    The timeline is in seconds from the `materialize()` call (`called_at`, `time.time()`):
    the ASSET_MATERIALIZATION_PLANNED events Dagster writes when it creates the run, the run's
    start, each step, the per-partition materialization events, the run's end and the return.
    """
    import dagster as dg

    counts: dict[str, int] = {}
    starts: dict[str, float] = {}
    steps: dict[str, float] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        kind = event.event_type_value if event is not None else "log_message"
        counts[kind] = counts.get(kind, 0) + 1
        first.setdefault(kind, entry.timestamp)
        last[kind] = entry.timestamp
        if event is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            steps[entry.step_key] = round(entry.timestamp - starts.get(entry.step_key, entry.timestamp), 3)

    def at(table: dict[str, float], kind: str) -> float | None:
        return round(table[kind] - called_at, 3) if kind in table else None

    planned, mats = "ASSET_MATERIALIZATION_PLANNED", "ASSET_MATERIALIZATION"
    checks = "ASSET_CHECK_EVALUATION"
    timeline = {
        "firstPlannedEvent": at(first, planned),
        "lastPlannedEvent": at(last, planned),
        "runStart": at(first, "PIPELINE_START"),
        "firstStepStart": at(first, "STEP_START"),
        "firstMaterialization": at(first, mats),
        "lastMaterialization": at(last, mats),
        "firstCheckEvaluation": at(first, checks),
        "lastCheckEvaluation": at(last, checks),
        "lastStepSuccess": at(last, "STEP_SUCCESS"),
        "runSuccess": at(last, "PIPELINE_SUCCESS"),
        "materializeReturned": round(returned_at - called_at, 3),
    }

    def span(kind: str) -> float | None:
        return round(last[kind] - first[kind], 3) if kind in first else None

    return {
        "eventCounts": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "eventsTotal": sum(counts.values()),
        "stepSeconds": steps,
        "timeline": timeline,
        "plannedEventSpanSeconds": span(planned),
        "materializationEventSpanSeconds": span(mats),
        "checkEvaluationSpanSeconds": span(checks),
    }


def _noop_asset(partitions: int) -> Any:
    """An asset over the same hourly partitions that records one materialization per partition."""
    import warnings

    import dagster as dg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=dg.BetaWarning)

        @dg.asset(
            name="noop",
            partitions_def=dg.TimeWindowPartitionsDefinition(
                start=START,
                end=START + timedelta(hours=partitions),
                cron_schedule="0 * * * *",
                fmt=TIME_KEY_STRFTIME,
                timezone="UTC",
            ),
            backfill_policy=dg.BackfillPolicy.single_run(),
        )
        def noop(context):  # no annotations: `dg` is local and annotations are strings here
            for index, key in enumerate(context.partition_keys):
                context.add_asset_metadata({"index": index}, partition_key=key)
            return dg.MaterializeResult()

    return noop


def worker(args: argparse.Namespace) -> None:
    """One measurement inside its own process; writes its figures as JSON to `--out`."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    import dagster as dg

    out["importDagsterSeconds"] = round(time.perf_counter() - t0, 3)
    t1 = time.perf_counter()
    if args.worker == "noop":
        selection, resources, asset_key = [_noop_asset(args.partitions)], {}, dg.AssetKey("noop")
    else:
        from pcbo_dagster.dagster_defs.definitions import build_definitions
        from pcbo_dagster.datasets.config import load_datasets_config_from_env

        defs = build_definitions(load_datasets_config_from_env())
        selection = [*(defs.assets or ()), *(defs.asset_checks or ())]
        resources = dict(defs.resources or {})
        asset_key = dg.AssetKey(DATASET)
    out["loadDefinitionsSeconds"] = round(time.perf_counter() - t1, 3)
    t2 = time.perf_counter()
    instance = dg.DagsterInstance.get()
    out["instanceSeconds"] = round(time.perf_counter() - t2, 3)
    out["storage"] = type(instance.run_storage).__name__
    out["instanceEphemeral"] = instance.is_ephemeral
    keys = partition_keys(args.partitions)

    if args.worker in ("range", "noop", "profile"):
        tags = {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]}
        profiler = None
        if args.worker == "profile":
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        called_at, t3 = time.time(), time.perf_counter()
        result = dg.materialize(
            selection,
            partition_key=None,
            tags=tags,
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        out["materializeSeconds"] = round(time.perf_counter() - t3, 3)
        returned_at = time.time()
        if profiler is not None:
            import io
            import pstats

            profiler.disable()
            stream = io.StringIO()
            stats = pstats.Stats(profiler, stream=stream)
            stats.sort_stats("cumulative").print_stats(20)
            out["profileTop20Cumulative"] = stream.getvalue()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(15)
            out["profileTop15Tottime"] = stream.getvalue()
        out["success"] = result.success
        out["materializationsInResult"] = len(result.asset_materializations_for_node(asset_key.path[-1]))
        out["partitionsMaterializedInInstance"] = len(instance.get_materialized_partitions(asset_key))
        evaluations = result.get_asset_check_evaluations()
        out["checkEvaluations"] = len(evaluations)
        out["checkEvaluationsFailed"] = sum(1 for e in evaluations if not e.passed)
        out.update(_run_report(instance, result.run_id, called_at, returned_at))
    elif args.worker == "sample":
        step = max(1, len(keys) // args.sample)
        sample = [keys[i * step] for i in range(args.sample)]
        seconds = []
        runs = []
        for key in sample:
            called_at, t3 = time.time(), time.perf_counter()
            result = dg.materialize(
                selection, partition_key=key, instance=instance, resources=resources, raise_on_error=False
            )
            seconds.append(round(time.perf_counter() - t3, 3))
            report = _run_report(instance, result.run_id, called_at, time.time())
            runs.append({"key": key, "success": result.success, **report})
        out["keys"] = sample
        out["materializeSeconds"] = seconds
        out["success"] = all(r["success"] for r in runs)
        out["runs"] = runs
        out["partitionsMaterializedInInstance"] = len(instance.get_materialized_partitions(asset_key))
    Path(args.out).write_text(json.dumps(out, indent=2), encoding="utf-8")


# --- the driver ---------------------------------------------------------------------------------


def write_inputs(tmp: Path, args: argparse.Namespace, granularity: str) -> tuple[Path, Path]:
    """The JSONL source and engine request (once), and a datasets config for `granularity`."""
    source, request_path = tmp / "events.jsonl", tmp / "request.json"
    if not source.exists():
        t0 = time.perf_counter()
        request = make_request(args.records, args.partitions, args.seed)
        with source.open("w", encoding="utf-8") as fh:
            for record in request.pop("sourceRecords"):
                fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        request["source"] = {"uri": str(source), "format": "jsonl"}
        request_path.write_text(json.dumps(request), encoding="utf-8")
        print(
            f"source: {args.records:,} records in {source.stat().st_size / 2**20:.1f} MiB JSONL, "
            f"{args.partitions} hourly partitions, generated in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    request = json.loads(request_path.read_text(encoding="utf-8"))
    config = {
        "version": 1,
        "datasets": [
            {
                "name": DATASET,
                "versionLabel": request["versionLabel"],
                "partitioning": {
                    "kind": "time_window",
                    "cron": "hourly",
                    "start": request["start"],
                    "end": request["end"],
                    "timezone": "UTC",
                },
                "source": {"uri": str(source), "format": "jsonl"},
                "policies": request["policies"],
                "existingTargetIds": request["existingTargetIds"],
                "backfillPolicy": {"kind": "single_run"},
                "checkGranularity": granularity,
            }
        ],
    }
    config_path = tmp / f"datasets-{granularity}.yaml"
    # JSON is YAML: the strict loader reads it like any other datasets file.
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return request_path, config_path


def run_worker(
    mode: str, args: argparse.Namespace, tmp: Path, name: str, config: Path | None
) -> tuple[float, dict[str, Any], Path]:
    """Run one worker subprocess with fresh homes; (wall seconds, its figures, its PCBO_HOME)."""
    pcbo_home, dagster_home = tmp / f"{name}-pcbo", tmp / f"{name}-dagster"
    out = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--out",
        str(out),
        "--partitions",
        str(args.partitions),
        "--sample",
        str(args.sample),
    ]
    wall, _ = run_timed(cmd, make_env(pcbo_home, dagster_home, config))
    figures = json.loads(out.read_text(encoding="utf-8"))
    if not figures.get("success"):
        sys.exit(f"{name}: the Dagster run failed: {json.dumps(figures)[:4000]}")
    return wall, figures, pcbo_home


def pcbo_verify(home: Path) -> dict[str, Any]:
    _, proc = run_timed([*pcbo_command(), "verify"], make_env(home))
    return json.loads(proc.stdout)


def check_range(name: str, figures: dict[str, Any], home: Path | None, partitions: int) -> dict[str, Any]:
    """720 materializations recorded (in the result and in the instance) and, for the engine, verify clean."""
    if (
        figures["materializationsInResult"] != partitions
        or figures["partitionsMaterializedInInstance"] != partitions
    ):
        sys.exit(
            f"{name}: {figures['materializationsInResult']} materializations in the result, "
            f"{figures['partitionsMaterializedInInstance']} partitions recorded; expected {partitions}"
        )
    if figures.get("checkEvaluationsFailed"):
        sys.exit(f"{name}: {figures['checkEvaluationsFailed']} check evaluation(s) failed")
    if home is None:
        return {}
    report = pcbo_verify(home)
    if report["status"] != "clean" or report["checked"]["partitions"] != partitions:
        sys.exit(
            f"{name}: pcbo verify: {report['status']}, {report['checked']}: {report.get('findings', [])[:5]}"
        )
    return {"status": report["status"], "partitions": report["checked"]["partitions"]}


def summarize(values: list[float]) -> dict[str, Any]:
    return {
        "medianSeconds": round(statistics.median(values), 3),
        "minSeconds": round(min(values), 3),
        "seconds": [round(v, 3) for v in values],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "records": args.records,
        "partitions": args.partitions,
        "sample": args.sample,
        "repeat": args.repeat,
        "seed": args.seed,
        "granularities": args.granularity,
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "dagster": _dagster_version(),
        },
        "loadAverage": {"start": loadavg()},
    }
    n = args.partitions
    with tempfile.TemporaryDirectory(prefix="pcbo-dagster-bench-") as tmp_name:
        tmp = Path(tmp_name)
        configs = {}
        for granularity in args.granularity:
            request_path, configs[granularity] = write_inputs(tmp, args, granularity)

        # (a) the engine alone
        engine_times, added = [], None
        for rep in range(args.repeat):
            home, output = tmp / f"engine-{rep}", tmp / "engine-out.json"
            cmd = [*pcbo_command(), "execute", "--input", str(request_path), "--output", str(output)]
            seconds, _ = run_timed(cmd, make_env(home))
            doc = json.loads(output.read_text(encoding="utf-8"))
            if doc["status"] != "committed" or len(doc["partitions"]) != n:
                sys.exit(f"engine: status {doc['status']!r}, {len(doc['partitions'])} partitions")
            added = sum(p["recordCount"] for p in doc["partitions"])
            engine_times.append(seconds)
            print(f"  engine alone (pcbo execute)          {seconds:7.2f}s  load {loadavg()}", flush=True)
            shutil.rmtree(home, ignore_errors=True)
        result["engine"] = {**summarize(engine_times), "addedRows": added}

        # (b) dagster, one run over every partition, per check granularity
        result["dagsterOneRun"] = {}
        for granularity in args.granularity:
            walls: list[float] = []
            inproc: list[float] = []
            figures: dict[str, Any] = {}
            for rep in range(args.repeat):
                name = f"range-{granularity}-{rep}"
                wall, figures, home = run_worker("range", args, tmp, name, configs[granularity])
                figures["verify"] = check_range(name, figures, home, n)
                walls.append(wall)
                inproc.append(figures["materializeSeconds"])
                print(
                    f"  dagster one run (checks per {granularity:<9}) {wall:7.2f}s wall, "
                    f"{figures['materializeSeconds']:.2f}s materialize()  load {loadavg()}",
                    flush=True,
                )
                shutil.rmtree(home, ignore_errors=True)
            result["dagsterOneRun"][granularity] = {
                "wall": summarize(walls),
                "materialize": summarize(inproc),
                "last": figures,
            }

        # (c) the no-op floor
        walls, inproc = [], []
        for rep in range(args.repeat):
            wall, figures, _ = run_worker("noop", args, tmp, f"noop-{rep}", None)
            check_range("noop", figures, None, n)
            walls.append(wall)
            inproc.append(figures["materializeSeconds"])
            print(
                f"  no-op asset, one run                  {wall:7.2f}s wall, "
                f"{figures['materializeSeconds']:.2f}s materialize()  load {loadavg()}",
                flush=True,
            )
        result["noop"] = {"wall": summarize(walls), "materialize": summarize(inproc), "last": figures}

        # (d) one run per partition: in-process sample, then one CLI process
        granularity = args.granularity[0]
        wall, figures, _ = run_worker("sample", args, tmp, "sample", configs[granularity])
        per_run = figures["materializeSeconds"]
        print(f"  {args.sample} single-partition materialize() runs: {per_run}  load {loadavg()}", flush=True)
        key = partition_keys(n)[n // 2]
        cli_env = make_env(tmp / "cli-pcbo", tmp / "cli-dagster", configs[granularity])
        cmd = [
            *dagster_command(),
            "asset",
            "materialize",
            "-m",
            DEFS_MODULE,
            "--select",
            DATASET,
            "--partition",
            key,
        ]
        cli_seconds, proc = run_timed(cmd, cli_env)
        # The CLI runs the asset job with its default executor: say which, and how many step processes.
        executor = "multiprocess" if "using multiprocess executor" in proc.stderr else "in-process"
        step_processes = proc.stderr.count("STEP_WORKER_STARTING")
        print(
            f"  dagster asset materialize --partition {key}  {cli_seconds:7.2f}s  load {loadavg()}",
            flush=True,
        )
        median_run = statistics.median(per_run)
        result["onePerPartition"] = {
            "granularity": granularity,
            "inProcess": {
                "keys": figures["keys"],
                "materializeSeconds": per_run,
                "medianSeconds": round(median_run, 3),
                "meanSeconds": round(statistics.mean(per_run), 3),
                "extrapolatedSeconds": round(median_run * n, 1),
                "workerWallSeconds": round(wall, 3),
                "stepSeconds": [r["stepSeconds"] for r in figures["runs"]],
            },
            "cli": {
                "key": key,
                "executor": executor,
                "stepProcesses": step_processes,
                "seconds": round(cli_seconds, 3),
                "extrapolatedSeconds": round(cli_seconds * n, 1),
            },
        }

        # optional: where the one-run materialize() spends its time
        if args.profile:
            _, figures, _ = run_worker("profile", args, tmp, "profile", configs[granularity])
            result["profile"] = {
                "granularity": granularity,
                "materializeSecondsUnderProfiler": figures["materializeSeconds"],
                "top20Cumulative": figures["profileTop20Cumulative"],
                "top15Tottime": figures["profileTop15Tottime"],
            }
    result["loadAverage"]["end"] = loadavg()
    engine = result["engine"]["medianSeconds"]
    floor = result["noop"]["wall"]["medianSeconds"]
    result["target"] = {"factor": TARGET_FACTOR, "seconds": round(TARGET_FACTOR * (engine + floor), 3)}
    return result


def _dagster_version() -> str:
    try:
        from importlib.metadata import version

        return version("dagster")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def print_table(result: dict[str, Any]) -> None:
    n = result["partitions"]
    engine = result["engine"]["medianSeconds"]
    target = result["target"]["seconds"]
    noop = result["noop"]

    def per_partition_ms(seconds: float) -> str:
        return f"{seconds / n * 1000:8.1f}"

    print()
    print(
        f"{result['records']:,} records, {n} hourly partitions, {result['repeat']} run(s) each "
        f"(median shown); {result['host']['cpus']} CPUs, dagster {result['host']['dagster']}"
    )
    la = result["loadAverage"]
    print(f"load average (1/5/15 min): start {la['start']}, end {la['end']}")
    header = f"{'measurement':<58}{'seconds':>9}{'ms/part':>9}{'- engine':>10}"
    print(header)
    print("-" * len(header))

    def row(label: str, seconds: float, vs_engine: bool = True) -> None:
        extra = f"{seconds - engine:>+10.2f}" if vs_engine else f"{'':>10}"
        print(f"{label:<58}{seconds:>9.2f}{per_partition_ms(seconds)}{extra}")

    row("engine alone (pcbo execute subprocess)", engine, vs_engine=False)
    for granularity, one in result["dagsterOneRun"].items():
        last = one["last"]
        row(f"dagster one run, checks per {granularity}: wall", one["wall"]["medianSeconds"])
        row("  of which materialize() in-process", one["materialize"]["medianSeconds"])
        row(
            "  of which import dagster + definitions + instance",
            last["importDagsterSeconds"] + last["loadDefinitionsSeconds"] + last["instanceSeconds"],
            vs_engine=False,
        )
        for step, seconds in last["stepSeconds"].items():
            row(f"  step {step}", seconds, vs_engine=False)
        for label, key in (
            ("ASSET_MATERIALIZATION_PLANNED events", "plannedEventSpanSeconds"),
            ("ASSET_MATERIALIZATION events", "materializationEventSpanSeconds"),
            ("ASSET_CHECK_EVALUATION events", "checkEvaluationSpanSeconds"),
        ):
            if last.get(key) is not None:
                count = last["eventCounts"].get(label.split()[0], 0)
                row(f"  {count} {label} (first..last)", last[key], vs_engine=False)
    row("no-op asset, one run: wall (Dagster's floor)", noop["wall"]["medianSeconds"], vs_engine=False)
    row("  of which materialize() in-process", noop["materialize"]["medianSeconds"], vs_engine=False)
    for label, key in (
        ("ASSET_MATERIALIZATION_PLANNED events", "plannedEventSpanSeconds"),
        ("ASSET_MATERIALIZATION events", "materializationEventSpanSeconds"),
    ):
        row(f"  {n} {label} (first..last)", noop["last"][key], vs_engine=False)
    target_label = f"target: {result['target']['factor']} x (engine + no-op floor)"
    print(f"{target_label:<58}{target:>9.2f}")
    print("-" * len(header))
    for granularity, one in result["dagsterOneRun"].items():
        wall = one["wall"]["medianSeconds"]
        verdict = "meets" if wall <= target else "misses"
        ratio = wall / (engine + noop["wall"]["medianSeconds"])
        overhead = (wall - engine) / n * 1000
        floor_wall = noop["wall"]["medianSeconds"] / n * 1000
        floor_inproc = noop["materialize"]["medianSeconds"] / n * 1000
        print(
            f"verdict (checks per {granularity}): {verdict} the target ({ratio:.2f} x engine + floor): "
            f"Dagster adds {wall - engine:.2f}s = "
            f"{overhead:.1f} ms/partition over the engine (no-op floor {floor_wall:.1f} ms/partition "
            f"wall, {floor_inproc:.1f} in materialize())"
        )
    for granularity, one in result["dagsterOneRun"].items():
        last = one["last"]
        print(
            f"checked (checks per {granularity}): {last['materializationsInResult']} materializations in the "
            f"result, {last['partitionsMaterializedInInstance']} partitions materialized in the instance "
            f"({last['storage']}), {last['checkEvaluations']} check evaluations all passed, pcbo verify "
            f"{last['verify']['status']} ({last['verify']['partitions']} partitions); engine alone added "
            f"{result['engine']['addedRows']:,} rows"
        )
    for granularity, one in result["dagsterOneRun"].items():
        counts = one["last"]["eventCounts"]
        top = ", ".join(f"{k} {v}" for k, v in list(counts.items())[:6])
        print(f"events of the one run (checks per {granularity}): {one['last']['eventsTotal']} ({top})")
    phases = (
        ("planned events written", "lastPlannedEvent", None),
        ("run start", "runStart", None),
        ("first step", "firstStepStart", None),
        ("materializations", "firstMaterialization", "lastMaterialization"),
        ("check evaluations", "firstCheckEvaluation", "lastCheckEvaluation"),
        ("last step done", "lastStepSuccess", None),
        ("run success", "runSuccess", None),
        ("returned", "materializeReturned", None),
    )
    runs = [(f"one run, checks per {g}", one["last"]) for g, one in result["dagsterOneRun"].items()]
    for label, figures in [*runs, ("no-op run", noop["last"])]:
        timeline = figures["timeline"]
        marks = [
            f"{text} {timeline[a]:.1f}" + (f"..{timeline[b]:.1f}" if b else "")
            for text, a, b in phases
            if timeline.get(a) is not None
        ]
        print(f"timeline of the {label} (s from the materialize() call): {', '.join(marks)}")
    noop_counts = noop["last"]["eventCounts"]
    print(
        f"events of the no-op run: {noop['last']['eventsTotal']} "
        f"({', '.join(f'{k} {v}' for k, v in list(noop_counts.items())[:4])})"
    )
    per = result["onePerPartition"]
    ip, cli = per["inProcess"], per["cli"]
    print("-" * len(header))
    print(f"one run per partition (checks per {per['granularity']}), extrapolated to {n} partitions:")
    print(
        f"  in-process materialize(), {len(ip['materializeSeconds'])} runs {ip['materializeSeconds']} s: "
        f"median {ip['medianSeconds']:.2f}s x {n} = {ip['extrapolatedSeconds']:,.0f}s "
        f"({ip['extrapolatedSeconds'] / 60:.1f} min)"
    )
    print(
        f"  dagster asset materialize --partition (CLI process): {cli['seconds']:.2f}s x {n} = "
        f"{cli['extrapolatedSeconds']:,.0f}s ({cli['extrapolatedSeconds'] / 3600:.2f} h); "
        f"{cli['executor']} executor, {cli['stepProcesses']} step process(es)"
    )
    if "profile" in result:
        prof = result["profile"]
        print("-" * len(header))
        print(
            f"cProfile of the one-run materialize() (checks per {prof['granularity']}; "
            f"{prof['materializeSecondsUnderProfiler']:.2f}s under the profiler), top 20 cumulative:"
        )
        print(prof["top20Cumulative"])
        print("top 15 by own time (where the time actually goes):")
        print(prof["top15Tottime"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=720)
    parser.add_argument("--sample", type=int, default=5, help="single-partition runs to extrapolate from")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the engine, one-run and no-op steps")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--granularity",
        nargs="+",
        choices=GRANULARITIES,
        default=list(GRANULARITIES),
        help="checkGranularity values to measure the one run with (the first is used for the samples)",
    )
    parser.add_argument("--profile", action="store_true", help="also cProfile one range materialize()")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/dagster-<date>.json")
    parser.add_argument("--worker", choices=("range", "noop", "sample", "profile"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.repeat < 1 or args.sample < 1 or args.partitions < 1:
        parser.error("--repeat, --sample and --partitions must be at least 1")
    result = run(args)
    print_table(result)
    if args.save:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        path = results / f"dagster-{datetime.now():%Y-%m-%d}.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"saved {path}")


if __name__ == "__main__":
    main()

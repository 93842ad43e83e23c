"""A dataset's backfill as its `multi_run` policy cuts it, each run launched from here on the code
location's own job: with `PCBO_EXECUTOR=celery` the run's step goes to whichever Celery worker takes it.

    python -m pcbo_dagster.dagster_defs.range_runs events [--first KEY] [--last KEY] [--coordinators N]

This process is the runs' coordinator (it records each run in the Dagster instance at `DAGSTER_HOME`
and waits for its steps); the work is done by the workers. The Dagster-native way is a backfill
launched from the UI, whose runs the daemon queues and the run launcher starts: the same runs, the
same steps. This command is for a terminal or a script (and the tests), without the daemon's 30 s
tick. It schedules nothing: the ranges are the asset's own `BackfillPolicy` ranges, and runs of one
dataset are serialised by the catalog's lease, not here. Exit status 0 when every run succeeded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableRepository

from pcbo_dagster.core.errors import InvalidInput

MODULE = "pcbo_dagster.dagster_defs.definitions"
ASSET_JOB = "__ASSET_JOB"


def run_ranges(asset: str, first: str | None = None, last: str | None = None) -> list[tuple[str, str]]:
    """The (first, last) partition keys of each run of a backfill of `asset` over [first, last]: its
    partitions cut by the asset's `BackfillPolicy.max_partitions_per_run`."""
    from pcbo_dagster.dagster_defs.definitions import defs

    definitions = defs()
    try:
        assets_def = definitions.resolve_assets_def(dg.AssetKey(asset))
    except dg.DagsterInvariantViolationError:
        raise InvalidInput("asset", f"{asset!r} is not an asset of the code location") from None
    partitions_def = assets_def.partitions_def
    if partitions_def is None or isinstance(partitions_def, dg.DynamicPartitionsDefinition):
        raise InvalidInput("asset", f"{asset!r} has no fixed partition list to cut into runs")
    keys = list(partitions_def.get_partition_keys())
    for flag, key in (("--first", first), ("--last", last)):
        if key is not None and key not in keys:
            raise InvalidInput(flag, f"{key!r} is not a partition key of {asset}")
    lo = keys.index(first) if first else 0
    hi = keys.index(last) + 1 if last else len(keys)
    if hi <= lo:
        raise InvalidInput("--last", f"{last!r} comes before the first key {keys[lo]!r}")
    keys = keys[lo:hi]
    policy = assets_def.backfill_policy
    size = (policy.max_partitions_per_run if policy else None) or len(keys)
    return [(keys[i], keys[min(i + size, len(keys)) - 1]) for i in range(0, len(keys), size)]


def launch(
    asset: str, span: tuple[str, str], instance: dg.DagsterInstance, checks: bool = True
) -> dict[str, str]:
    """One range run of `asset` (and its checks, unless `checks` is false: each check is a step of
    its own) on the code location's asset job; waits for it."""
    repo = ReconstructableRepository.for_module(MODULE, "defs")
    key = dg.AssetKey(asset)
    job = repo.get_reconstructable_job(ASSET_JOB).get_subset(
        asset_selection={key}, asset_check_selection=None if checks else set()
    )
    result = dg.execute_job(
        job,
        instance,
        tags={"dagster/asset_partition_range_start": span[0], "dagster/asset_partition_range_end": span[1]},
        raise_on_error=False,
    )
    return {"runId": result.run_id, "first": span[0], "last": span[1], "success": str(result.success).lower()}


def _launch_one(asset: str, span: tuple[str, str], checks: bool) -> dict[str, str]:
    with dg.DagsterInstance.get() as instance:
        return launch(asset, span, instance, checks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("asset", help="the dataset's asset name (datasets config)")
    parser.add_argument("--first", help="first partition key (default: the first)")
    parser.add_argument("--last", help="last partition key, included (default: the last)")
    parser.add_argument(
        "--coordinators", type=int, default=1, help="runs in flight at once (child processes of this one)"
    )
    parser.add_argument(
        "--no-checks", action="store_true", help="the asset only (`pcbo verify` checks the lake afterwards)"
    )
    args = parser.parse_args(argv)
    try:
        if args.coordinators < 1:
            raise InvalidInput("--coordinators", f"must be at least 1 run in flight, not {args.coordinators}")
        spans = run_ranges(args.asset, args.first, args.last)
    except InvalidInput as exc:
        print(f"range_runs: invalid input: {exc}", file=sys.stderr)
        return 2
    if args.coordinators == 1:
        results = [_launch_one(args.asset, span, not args.no_checks) for span in spans]
    else:
        # Processes, not threads: Dagster configures Python logging (a process-wide `dictConfig`) as
        # each run starts, and two runs starting in threads of one process deadlock on a handler lock.
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.coordinators, mp_context=spawn) as pool:
            futures = [pool.submit(_launch_one, args.asset, span, not args.no_checks) for span in spans]
            results = [f.result() for f in futures]
    for line in results:
        print(json.dumps(line, sort_keys=True))
    return 0 if all(r["success"] == "true" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The soak monitor: a job running every staging asset's `soak` check, on a schedule.

Every 15 minutes by default (`PCBO_SOAK_CRON`, any 5-field cron), running by default. A tick with no
rollout to evaluate launches nothing and says so (a skipped tick, with the reason: none soaking, or
each one's soak failed for good by its production audit chain, which one failure makes final);
otherwise it launches the `soak_monitor` job (run key: the tick's time), which evaluates each soaking
rollout whose soak may still pass. A rollout's
soak passes once its window (`rollout.soak.windowMinutes` of its dataset) has elapsed with every
evaluation passing; the promotion sensor then considers it.
"""

import os
from typing import Any

import dagster as dg

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetsConfig, normalize_cron
from pcbo_dagster.rollout import operations
from pcbo_dagster.rollout.clock import Clock

SOAK_JOB = "soak_monitor"
DEFAULT_CRON = "*/15 * * * *"
SOAK_CRON_ENV = "PCBO_SOAK_CRON"


def soak_cron() -> str:
    """`PCBO_SOAK_CRON` checked as a datasets config's cron is (`hourly`, `daily` or 5 fields Dagster
    accepts), else the default; `InvalidInput` naming the variable."""
    text = os.environ.get(SOAK_CRON_ENV)
    if text is None or not text.strip():
        return DEFAULT_CRON
    try:
        return normalize_cron(text)
    except ValueError as exc:
        raise InvalidInput(SOAK_CRON_ENV, f"{text!r}: {exc}") from None


def build_soak_monitor(
    config: DatasetsConfig, soak_checks: list[dg.AssetChecksDefinition], datasets: list[str], clock: Clock
) -> tuple[Any, dg.ScheduleDefinition]:
    """The soak job over `soak_checks` and its schedule, which runs it only while a rollout of
    `datasets` is to be evaluated: soaking by its production audit chain, its soak not failed for good
    there (`soak.soak_due`)."""
    keys = [key for check in soak_checks for key in check.check_keys]
    job = dg.define_asset_job(
        SOAK_JOB,
        selection=dg.AssetSelection.checks(*keys),
        description="Soak monitor: evaluate every soaking rollout's staging output",
    )

    @dg.schedule(
        name=f"{SOAK_JOB}_schedule",
        job=job,
        cron_schedule=soak_cron(),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every 15 minutes by default (PCBO_SOAK_CRON), while a rollout is soaking",
    )
    def soak_monitor_schedule(
        context: dg.ScheduleEvaluationContext, pcbo: PcboEngineResource
    ) -> dg.RunRequest | dg.SkipReason:
        base = pcbo.settings()
        rows = operations.list_rollouts(base)["rollouts"]
        if not any(r["dataset"] in datasets and r["status"] == "soaking" for r in rows):
            states = sorted({r["status"] for r in rows if r["dataset"] in datasets})
            return dg.SkipReason(
                "no rollout is soaking"
                + (f" (rollouts are {', '.join(states)})" if states else " (no rollout yet)")
            )
        due, skipped = operations.soak_due(config, base, clock=clock)
        soaking = [name for name in due if name in {r["name"] for r in rows if r["dataset"] in datasets}]
        for skip in skipped:
            context.log.info(f"soak {skip['rollout']} not evaluated: {skip['skipped']}")
        if not soaking:
            return dg.SkipReason(
                "no soaking rollout is to be evaluated: "
                + " | ".join(f"{skip['rollout']}: {skip['skipped']}" for skip in skipped)
            )
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
        return dg.RunRequest(run_key=f"soak:{tick}", tags={"pcbo/soaking": ",".join(soaking)[:200]})

    return job, soak_monitor_schedule

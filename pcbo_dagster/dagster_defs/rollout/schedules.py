"""The soak monitor: a job running every staging asset's `soak` check, on a schedule.

Every 15 minutes by default (`PCBO_SOAK_CRON`, any 5-field cron), running by default. A rollout's
soak passes once its window (`rollout.soak.windowMinutes` of its dataset) has elapsed with every
evaluation passing; the promotion sensor then considers it.
"""

from __future__ import annotations

import os

import dagster as dg

SOAK_JOB = "soak_monitor"
DEFAULT_CRON = "*/15 * * * *"


def build_soak_monitor(
    soak_checks: list[dg.AssetChecksDefinition],
) -> tuple[dg.UnresolvedAssetJobDefinition, dg.ScheduleDefinition]:
    keys = [key for check in soak_checks for key in check.check_keys]
    job = dg.define_asset_job(
        SOAK_JOB,
        selection=dg.AssetSelection.checks(*keys),
        description="Soak monitor: evaluate every soaking rollout's staging output",
    )
    schedule = dg.ScheduleDefinition(
        name=f"{SOAK_JOB}_schedule",
        job=job,
        cron_schedule=os.environ.get("PCBO_SOAK_CRON") or DEFAULT_CRON,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every 15 minutes by default (PCBO_SOAK_CRON)",
    )
    return job, schedule

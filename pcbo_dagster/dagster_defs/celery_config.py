"""Celery settings for `PCBO_EXECUTOR=celery`, shared by the runs' executor (definitions.py, the
publisher) and the workers' app (celery_worker.py, the consumers), from the `PCBO_CELERY_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pcbo_dagster.io.env_vars import positive_int

#: Redis's visibility timeout default: how long a step may run before Redis hands it to another worker
#: too, and so how long a killed worker's step waits before it is redelivered.
VISIBILITY_TIMEOUT_SECONDS = 3600
#: Seconds between a worker's scans for such steps (`PCBO_CELERY_RESTORE_INTERVAL`).
RESTORE_INTERVAL_SECONDS = 10
#: How long the runs' coordinator waits for a step's signed result, from when it sends the step.
STEP_TIMEOUT_ENV = "PCBO_CELERY_STEP_TIMEOUT"
#: A day: far above a backfill step's run time (a step longer than the visibility timeout, an hour by
#: default, is handed to a second worker anyway) plus its wait in the queue behind other runs' steps,
#: and still a bound on how long someone who writes the broker or backend can hold a run.
STEP_TIMEOUT_SECONDS = 24 * 3600


def step_timeout_seconds(env: Mapping[str, str] | None = None) -> int:
    """`PCBO_CELERY_STEP_TIMEOUT`: seconds the runs' coordinator waits for a step's signed result
    before it revokes the step and fails it (`celery_signing.VerifiedStepResult`), counted from when
    it sends the step; whatever the result backend claims (PENDING, STARTED, RETRY) meanwhile, nothing
    but a result pcbo's worker signed ends the wait earlier. Default `STEP_TIMEOUT_SECONDS`;
    `InvalidInput` naming the variable for anything but a whole number of seconds of at least 1."""
    env = os.environ if env is None else env
    return positive_int(STEP_TIMEOUT_ENV, env.get(STEP_TIMEOUT_ENV), STEP_TIMEOUT_SECONDS)


def celery_settings(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Celery settings shared by the executor (publisher) and the workers (consumers).

    A step is acknowledged when it ends (`task_acks_late`) and put back when its worker process is lost
    (`task_reject_on_worker_lost`), so a worker killed mid-step leaves it on the queue for another
    worker once the visibility timeout passes; the engine's dataset lease and chain head make the
    repeat safe (committed partitions are left as they are, a commit without its event is healed).
    One task at a time per worker process (`worker_prefetch_multiplier` 1): a prefetched step would
    wait behind a long one while another worker sits idle."""
    env = os.environ if env is None else env
    visibility = positive_int(
        "PCBO_CELERY_VISIBILITY_TIMEOUT",
        env.get("PCBO_CELERY_VISIBILITY_TIMEOUT"),
        VISIBILITY_TIMEOUT_SECONDS,
    )
    # How often a consumer looks for steps whose visibility timeout passed (kombu's default is a scan
    # every 10th sweep of 10 s: a killed worker's step would wait up to 100 s more).
    restore = positive_int(
        "PCBO_CELERY_RESTORE_INTERVAL",
        env.get("PCBO_CELERY_RESTORE_INTERVAL"),
        RESTORE_INTERVAL_SECONDS,
    )
    transport = {
        "visibility_timeout": visibility,
        "unacked_restore_interval": restore,
        "unacked_restore_throttle": 1,
    }
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": visibility},
    }

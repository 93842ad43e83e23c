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

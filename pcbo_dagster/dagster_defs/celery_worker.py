"""The Celery worker app for `PCBO_EXECUTOR=celery`: dagster-celery's own tasks on an app whose settings
come from the same `PCBO_CELERY_*` variables as the runs' executor.

    celery -A pcbo_dagster.dagster_defs.celery_worker worker -Q dagster --pool solo -n w1@%h

Why not `celery -A dagster_celery.app`: that app reads its settings only from a `dagster_celery_config`
module on the worker's path, and the settings that make a killed worker harmless are the *worker's*
(a task is acknowledged by the worker that runs it; unacknowledged messages are restored by the
consumers' poller after the visibility timeout). Here they cannot drift from the executor's.
"""

from __future__ import annotations

import os
from typing import Any

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.dagster_defs.celery_config import celery_settings


def _make_app() -> Any:
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

    broker = os.environ.get("PCBO_CELERY_BROKER")
    if not broker:
        raise InvalidInput("PCBO_CELERY_BROKER", "is required by a Celery worker (redis://host:6379/0)")
    app = make_app()
    app.conf.update(
        broker_url=broker,
        result_backend=os.environ.get("PCBO_CELERY_BACKEND") or broker,
        **celery_settings(),
    )
    tasks = (create_task(app), create_execute_job_task(app), create_resume_job_task(app))
    return app, tasks


app, _tasks = _make_app()

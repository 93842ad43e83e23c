"""The Celery worker app for `PCBO_EXECUTOR=celery`: dagster-celery's own tasks on an app whose settings
come from the same `PCBO_CELERY_*` variables as the runs' executor.

    celery -A pcbo_dagster.dagster_defs.celery_worker worker -Q dagster --pool solo -n w1@%h

Why not `celery -A dagster_celery.app`: that app reads its settings only from a `dagster_celery_config`
module on the worker's path, and the settings that make a killed worker harmless are the *worker's*
(a task is acknowledged by the worker that runs it; unacknowledged messages are restored by the
consumers' poller after the visibility timeout). Here they cannot drift from the executor's.

A step message is checked before anything is loaded (`guard_step`): dagster-celery's `execute_plan`
takes the code to load (a code pointer: any Python file or module) and the Dagster instance to read the
run from out of the message itself, so anyone who can write the broker could otherwise run code of
their choosing on every worker, with its stores' credentials and signing key. The worker runs only
steps of pcbo's code location (`pcbo_dagster.dagster_defs.definitions`), of a run of its own instance
(`DAGSTER_HOME`; the message's instance is never opened) that is in progress (`STARTED`: a signed
message sent again after its run ended is not run), for that run's own job; anything else is
refused (the task fails naming what was refused, and is acknowledged: it is never delivered again).
A step message with Celery's delivery options (`eta`, `countdown`, `expires`), which the coordinator
never sets and its MAC does not cover, is refused after that and before the step runs, with a
refusal signed for the step (`celery_signing.signed_refusal`): the coordinator fails the step naming
it.

Before that, a step message must be signed by the runs' coordinator, and a step's result is signed for
its run, steps and task, under `PCBO_CELERY_KEY` (`celery_signing.py`): the worker runs no step
the coordinator did not send, the coordinator takes no events but those of a result signed so. A
worker refuses to start without the key, as without a broker.

The worker has no other task: dagster-celery's run tasks (`execute_job`, `resume_job`, for its
`CeleryRunLauncher`, which pcbo does not use) are not registered, and Celery's own (`celery.*`) are
removed, so a message for one is discarded unrun (Celery's "unregistered task").
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.dagster_defs.celery_config import celery_settings
from pcbo_dagster.dagster_defs.celery_signing import (
    CELERY_KEY_ENV,
    MESSAGE_MAC_HEADER,
    celery_secret,
    message_verifies,
    signed_refusal,
    signed_result,
)

#: The only code a step may load: the code location's module (workspace.yaml, the Helm values).
CODE_LOCATION_MODULE = "pcbo_dagster.dagster_defs.definitions"


class StepRefused(Exception):
    """A step message that names code or a run this worker does not run (module doc)."""


def guard_step(execute_step_args_packed: Any, executable_dict: Any) -> Any:
    """The message's step arguments (`ExecuteStepArgs`) with its `instance_ref` replaced by this
    worker's own instance, when the message is a step of pcbo's code location for a run of that
    instance in progress and that run's job; `StepRefused` otherwise. Nothing the message names is imported or
    opened before this passes."""
    import dagster as dg
    from dagster._core.code_pointer import ModuleCodePointer, PackageCodePointer
    from dagster._core.definitions.reconstruct import ReconstructableJob
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import unpack_value
    from dagster_shared.record import copy

    try:
        args = unpack_value(execute_step_args_packed, as_type=ExecuteStepArgs)
        job = ReconstructableJob.from_dict(executable_dict)
    except Exception as exc:  # noqa: BLE001 - whatever a forged message holds
        raise StepRefused(f"refused: not a step message ({type(exc).__name__})") from None
    pointer = job.repository.pointer
    if not (
        isinstance(pointer, ModuleCodePointer | PackageCodePointer) and pointer.module == CODE_LOCATION_MODULE
    ):
        raise StepRefused(
            f"refused: the step names code outside {CODE_LOCATION_MODULE} ({type(pointer).__name__})"
        )
    if not os.environ.get("DAGSTER_HOME"):
        raise StepRefused("refused: this worker has no Dagster instance (DAGSTER_HOME) to read the run from")
    with dg.DagsterInstance.get() as instance:
        run = instance.get_run_by_id(str(args.run_id))
        own = instance.get_ref()
    if run is None:
        raise StepRefused(f"refused: run {args.run_id!r} is not a run of this worker's Dagster instance")
    if run.job_name != job.job_name:
        raise StepRefused(f"refused: run {args.run_id!r} is of job {run.job_name!r}, not {job.job_name!r}")
    if run.status != dg.DagsterRunStatus.STARTED:
        # A genuine message sent again after its run ended (or before it began) would run the step
        # outside any run, its events appended to a finished run's log.
        raise StepRefused(f"refused: run {args.run_id!r} is {run.status.value}, not in progress")
    return copy(args, instance_ref=own)


def delivery_options(request: Any) -> list[str]:
    """The delivery options a step task's request (Celery's `task.request`) carries, each named as
    `` `eta` `` or `` `expires` `` (a `countdown` is sent as an `eta`): none for a message the runs'
    coordinator sent."""
    return [f"`{name}`" for name in ("eta", "expires") if getattr(request, name, None) is not None]


def _guarded_task_class(secret: bytes) -> Any:
    from celery import Task
    from dagster._serdes import pack_value

    class GuardedStep(Task):
        """`execute_plan` for a message the coordinator signed, with `guard_step` first, its events
        signed for the step and this task (`celery_signing`): a custom `__call__`, which Celery's
        tracer calls."""

        def __call__(self, execute_step_args_packed: Any, executable_dict: Any) -> Any:
            mac = self.request.get(MESSAGE_MAC_HEADER)
            if not message_verifies(secret, self.request.id, mac, execute_step_args_packed, executable_dict):
                raise StepRefused(
                    "refused: the step message is not signed by the runs' coordinator "
                    f"({MESSAGE_MAC_HEADER} missing or not verifying under {CELERY_KEY_ENV})"
                )
            args = guard_step(execute_step_args_packed, executable_dict)
            delivery = delivery_options(self.request)
            if delivery:
                reason = (
                    f"refused: the step message carries Celery's {' and '.join(delivery)}, which the runs' "
                    "coordinator never sets and its MAC does not cover (a genuine message sent again to "
                    "delay or expire the step)"
                )
                return signed_refusal(secret, args.run_id, args.step_keys_to_execute, self.request.id, reason)
            events = super().__call__(pack_value(args), executable_dict)
            return signed_result(secret, args.run_id, args.step_keys_to_execute, self.request.id, events)

    return GuardedStep


def _make_app() -> Any:
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    broker = os.environ.get("PCBO_CELERY_BROKER")
    if not broker:
        raise InvalidInput("PCBO_CELERY_BROKER", "is required by a Celery worker (redis://host:6379/0)")
    secret = celery_secret()
    app = make_app()
    app.conf.update(
        broker_url=broker,
        result_backend=os.environ.get("PCBO_CELERY_BACKEND") or broker,
        **celery_settings(),
    )
    # Only the step task: dagster-celery's run tasks (`execute_job`, `resume_job`, its run launcher's) would
    # run or resume whatever run of the instance an unsigned message names, and pcbo never sends them.
    # Celery's own tasks (`celery.accumulate`, `celery.starmap`, `celery.group`, ..., registered on every
    # app when it is finalized) and dagster-celery's `celery.ping` are removed: pcbo sends no chord, group
    # or chain, and they would run unsigned (`celery.accumulate` stores what it is given as the result of
    # any task id).
    step_task = create_task(app, base=_guarded_task_class(secret))
    for name in [name for name in app.tasks if name != step_task.name]:
        app.tasks.unregister(name)
    return app, step_task


try:
    app, _step_task = _make_app()
except InvalidInput as _refused:  # `celery -A ... worker` without its settings: one line, exit 2
    sys.stderr.write(f"pcbo celery worker: invalid input: {_refused}\n")
    raise SystemExit(2) from None

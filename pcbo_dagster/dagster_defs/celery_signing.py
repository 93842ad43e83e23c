"""Signed step messages and results for `PCBO_EXECUTOR=celery`, under the key every host shares
(`PCBO_CELERY_KEY`): a worker runs only the steps the runs' coordinator sent, and the
coordinator takes only the events pcbo's worker signed for that step.

**Results.** dagster-celery's coordinator reads each step's events back from the result backend and
acts on them (a step success completes the step, the run is recorded a success, the steps downstream
are sent); someone who can write the backend (a Redis) could make a run succeed whose step never ran
or failed. So pcbo's worker (`celery_worker.py`) returns

    {"version": "pcbo.celery-result/1", "events": [<serialized Dagster events>], "mac": <hex>}

where `mac` is an HMAC-SHA256 of the run id, the step keys, the Celery task id and the events; and the
coordinator's executor (`authenticated_celery_executor`: dagster-celery's, each step sent signed and
its result checked) takes the events of a result whose MAC verifies for the run, step and task it
sent, and fails the step with `refused: unauthenticated result ...` (nothing of the result taken)
otherwise: a result forged or altered in the backend, a genuine one copied to another step's, run's
or attempt's task, one from a worker with another key, a failed task's (the exception the backend
names is never raised: `VerifiedStepResult.get`).

**Messages.** The coordinator sends each step message with a header `pcbo_step_mac`, an HMAC-SHA256 of
the task id and the message's arguments (the step's `ExecuteStepArgs` and the job's code pointer);
pcbo's worker refuses a message whose MAC does not verify before anything else (`refused: the step
message is not signed ...`): someone who can write the broker cannot have a worker run any step, not
even one of pcbo's code location for a real run, which the worker's code and run guard would let
through. A genuine message sent again is the same step of the same run under the same task id: what
Redis redelivers anyway; it is run only while that run is in progress (`celery_worker.guard_step`).

The key is `PCBO_CELERY_KEY` (its SHA-256: `io.host_keys.variable_secret`), never in run
config or logs. It must be the same on every worker and every process that coordinates runs, so there
is no per-home random key as for the catalog's rows: with the celery executor a missing key (or one
shorter than `MIN_KEY_CHARS`: the MACs sit where the attacker reads them, and a short key could be
guessed from them offline) refuses the code location's load, `InvalidInput` naming the variable (exit
2 where a command loads it), and a worker refuses to start.

**Waits.** Someone who can write the backend can also withhold a result: delete it, or leave a state
that is not one (PENDING, STARTED, RETRY), and dagster-celery's coordinator would wait for it for
ever; someone who can write the broker can take the step's message away, or send it again with an
`eta` (Celery's worker holds such a message until then, out of reach of the step task). So the
coordinator waits for a step's signed result at most `PCBO_CELERY_STEP_TIMEOUT` seconds from when it
sent the step (`celery_config.step_timeout_seconds`, a day by default), whatever the backend claims
meanwhile; then it revokes the task and fails the step (`StepTimedOut`), and the run fails. A step
message that reaches pcbo's worker with `eta`, `countdown` (sent as an `eta`) or `expires`, which the
coordinator never sets and the message MAC does not cover, is refused before anything runs, with a
refusal signed for the step (`signed_refusal`) that the coordinator reads as a failed step
(`WorkerRefusedStep`). (An `expires` already past is Celery's own revocation: the step fails revoked.)

Celery's own message signing (`task_serializer='auth'`) was not used: it takes an X.509 key and
certificate per host and a certificate store, changes Kombu's serializers process-wide, and signs what
a host sends, not what it answers for: a genuine signed result copied to another task would pass.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.dagster_defs.celery_config import (
    STEP_TIMEOUT_ENV,
    STEP_TIMEOUT_SECONDS,
    step_timeout_seconds,
)
from pcbo_dagster.io.host_keys import variable_secret

CELERY_KEY_ENV = "PCBO_CELERY_KEY"
RESULT_VERSION = "pcbo.celery-result/1"
#: A step the worker refused to run, signed as a result is (`signed_refusal`).
REFUSAL_VERSION = "pcbo.celery-refusal/1"
MESSAGE_VERSION = "pcbo.celery-step/1"
#: The step message's header that carries its MAC.
MESSAGE_MAC_HEADER = "pcbo_step_mac"
#: `openssl rand -hex 32` gives 64.
MIN_KEY_CHARS = 32


class UnauthenticatedResult(Exception):
    """A step result that pcbo's worker did not sign for that step (module doc)."""


class WorkerRefusedStep(Exception):
    """A step pcbo's worker refused to run, its refusal signed for that step (module doc)."""


class StepTimedOut(Exception):
    """A step whose signed result did not arrive within `PCBO_CELERY_STEP_TIMEOUT` (module doc)."""


def celery_secret(env: Mapping[str, str] | None = None) -> bytes:
    """The secret step messages and results are signed with: the SHA-256 of `PCBO_CELERY_KEY`;
    `InvalidInput` naming it when it is unset or shorter than `MIN_KEY_CHARS` (module doc)."""
    env = os.environ if env is None else env
    given = env.get(CELERY_KEY_ENV) or ""
    if not given:
        raise InvalidInput(
            CELERY_KEY_ENV,
            "is required with PCBO_EXECUTOR=celery: the key the steps' messages and results are signed with, "
            f"at least {MIN_KEY_CHARS} characters (`openssl rand -hex 32`), the same on every worker and "
            "every host that runs the runs",
        )
    if len(given) < MIN_KEY_CHARS:
        raise InvalidInput(
            CELERY_KEY_ENV, f"is {len(given)} characters: at least {MIN_KEY_CHARS} (`openssl rand -hex 32`)"
        )
    secret = variable_secret(CELERY_KEY_ENV, env)
    assert secret is not None
    return secret


def message_mac(secret: bytes, task_id: str, execute_step_args_packed: Any, executable_dict: Any) -> str:
    """The HMAC-SHA256 (hex) of a step message: its task id and arguments. `ValueError` or `TypeError`
    for arguments that are not JSON (only a forged message has such)."""
    message = compact_text([task_id, execute_step_args_packed, executable_dict]).encode("utf-8")
    return hmac.new(secret, MESSAGE_VERSION.encode("ascii") + b"\0" + message, hashlib.sha256).hexdigest()


def message_verifies(
    secret: bytes, task_id: Any, mac: Any, execute_step_args_packed: Any, executable_dict: Any
) -> bool:
    """Whether a step message (its task id, `MESSAGE_MAC_HEADER` and arguments) is one the runs'
    coordinator signed."""
    if not isinstance(mac, str) or not isinstance(task_id, str):
        return False
    try:
        expected = message_mac(secret, task_id, execute_step_args_packed, executable_dict)
    except (TypeError, ValueError):
        return False
    return hmac.compare_digest(mac.encode("utf-8", "surrogatepass"), expected.encode("ascii"))


def result_mac(
    secret: bytes,
    run_id: str,
    step_keys: Sequence[str],
    task_id: str,
    events: Sequence[str],
    version: str = RESULT_VERSION,
) -> str:
    """The HMAC-SHA256 (hex) of a step result: its run, steps, Celery task and events (`version`
    `REFUSAL_VERSION`: the one-item list of the refusal's reason instead of events)."""
    message = compact_text([run_id, list(step_keys), task_id, list(events)]).encode("utf-8")
    return hmac.new(secret, version.encode("ascii") + b"\0" + message, hashlib.sha256).hexdigest()


def signed_result(
    secret: bytes, run_id: str, step_keys: Sequence[str], task_id: str, events: Sequence[str]
) -> dict[str, Any]:
    """What pcbo's worker returns for `step_keys` of `run_id` run as Celery task `task_id`."""
    return {
        "version": RESULT_VERSION,
        "events": list(events),
        "mac": result_mac(secret, run_id, step_keys, task_id, events),
    }


def signed_refusal(
    secret: bytes, run_id: str, step_keys: Sequence[str], task_id: str, reason: str
) -> dict[str, Any]:
    """What pcbo's worker returns for `step_keys` of `run_id` (Celery task `task_id`) it refused to run
    for `reason`: the coordinator fails the step naming it (`WorkerRefusedStep`)."""
    return {
        "version": REFUSAL_VERSION,
        "refused": reason,
        "mac": result_mac(secret, run_id, step_keys, task_id, [reason], REFUSAL_VERSION),
    }


def verified_events(
    secret: bytes, result: Any, run_id: str, step_keys: Sequence[str], task_id: str
) -> list[str]:
    """The events of `result` when pcbo's worker signed it for `step_keys` of `run_id` as `task_id`;
    `WorkerRefusedStep` when it is that worker's refusal signed so; `UnauthenticatedResult`
    (`refused: ...`) otherwise."""

    def refused(why: str) -> UnauthenticatedResult:
        return UnauthenticatedResult(
            f"refused: unauthenticated result for step {', '.join(step_keys)} of run {run_id} "
            f"(Celery task {task_id}): {why}; only a result pcbo's worker signed for this step with "
            f"{CELERY_KEY_ENV} is taken"
        )

    if isinstance(result, BaseException):
        raise refused(
            f"the task ended in an exception ({type(result).__name__}; the worker's log has it), "
            "which pcbo's worker does not sign"
        )
    version = result.get("version") if isinstance(result, dict) else None
    if version not in (RESULT_VERSION, REFUSAL_VERSION):
        raise refused("not a result pcbo's worker signed")
    # A refusal is signed as a result whose one event is the refusal's reason.
    signed = result.get("events") if version == RESULT_VERSION else [result.get("refused")]
    mac = result.get("mac")
    if (
        not isinstance(signed, list)
        or not all(isinstance(e, str) for e in signed)
        or not isinstance(mac, str)
    ):
        raise refused("not a result pcbo's worker signed")
    expected = result_mac(secret, run_id, step_keys, task_id, signed, version)
    if not hmac.compare_digest(mac.encode("utf-8", "surrogatepass"), expected.encode("ascii")):
        raise refused("its MAC does not verify (forged, altered, replayed from another task, or another key)")
    if version == REFUSAL_VERSION:
        raise WorkerRefusedStep(
            f"step {', '.join(step_keys)} of run {run_id} (Celery task {task_id}) was not run: {signed[0]}"
        )
    return signed


class VerifiedStepResult:
    """A step's Celery result (`AsyncResult`) as dagster-celery's execution loop uses it (`id`,
    `ready`, `get`, `revoke`), whose `get` gives the events only of a result signed for this step,
    and is ready at the latest `timeout_seconds` after it was made (when the step was sent)."""

    def __init__(
        self,
        result: Any,
        secret: bytes,
        run_id: str,
        step_keys: Sequence[str],
        timeout_seconds: int = STEP_TIMEOUT_SECONDS,
    ) -> None:
        self._result = result
        self._secret = secret
        self.run_id = run_id
        self.step_keys = list(step_keys)
        self.timeout_seconds = timeout_seconds
        self._deadline = time.monotonic() + timeout_seconds

    @property
    def id(self) -> str:
        return str(self._result.id)

    def ready(self) -> bool:
        """Whether the backend holds a finished task's result, or the step's time is up (then `get`
        fails it)."""
        return bool(self._result.ready()) or time.monotonic() >= self._deadline

    def revoke(self, *args: Any, **kwargs: Any) -> Any:
        return self._result.revoke(*args, **kwargs)

    def _timed_out(self) -> StepTimedOut:
        """The task revoked (so a worker holding or running it drops it), and the error that fails
        the step."""
        from celery import states

        try:
            state = self._result.state
            # Named only when it is one of Celery's: the backend's writer chooses the text.
            claimed = state if state in states.ALL_STATES else "a state Celery does not define"
        except Exception as exc:  # noqa: BLE001 - a backend gone is one more thing it claims
            claimed = f"nothing readable ({type(exc).__name__})"
        try:
            self._result.revoke()
        except Exception:  # noqa: BLE001 S110 - the broker unreachable: the step fails all the same
            pass
        return StepTimedOut(
            f"step {', '.join(self.step_keys)} of run {self.run_id}: no result pcbo's worker signed "
            f"arrived within {STEP_TIMEOUT_ENV} ({self.timeout_seconds} s from when it was sent; the "
            f"result backend says {claimed} for Celery task {self.id}): the task was revoked and the step "
            "failed"
        )

    def get(self, *args: Any, **kwargs: Any) -> list[str]:
        """The events of a result signed for this step; `UnauthenticatedResult` for anything else. A
        failed task's exception is never raised: its class is named by the result backend, and one that
        is not an `Exception` (`KeyboardInterrupt`, `SystemExit`) would pass dagster-celery's
        `except Exception` and end the run as interrupted, its other steps left running. A revoked task
        raises `TaskRevokedError`, as Celery's `get` does: the step is left unfinished and the run fails.
        No finished task's result by the step's deadline (whatever state the backend claims, or none)
        is `StepTimedOut`, the task revoked: the run fails instead of waiting for ever."""
        from celery import states
        from celery.exceptions import TaskRevokedError
        from celery.exceptions import TimeoutError as ResultTimeout

        if not self._result.ready() and time.monotonic() >= self._deadline:
            raise self._timed_out()
        # Never a wait past the deadline (Celery takes a timeout of 0 for none).
        remaining = max(self._deadline - time.monotonic(), 0.01)
        try:
            value = self._result.get(*args, **{**kwargs, "propagate": False, "timeout": remaining})
        except ResultTimeout:
            raise self._timed_out() from None
        if self._result.state == states.REVOKED:
            raise TaskRevokedError(f"Celery task {self.id} of step {', '.join(self.step_keys)} was revoked")
        return verified_events(self._secret, value, self.run_id, self.step_keys, self.id)


def _execute_plan_task(app: Any) -> Any:
    """dagster-celery's step task (`execute_plan`) on `app`, defined on it once: dagster-celery's
    `_submit_task` defines it again for every step it sends, and Celery 5.7 warns about each app that
    gets a second definition of the name (`DuplicateTaskNameWarning`, once a run: the executor makes
    an app a run). The coordinator only sends the task; pcbo's worker app runs its own."""
    from dagster_celery.config import TASK_EXECUTE_PLAN_NAME
    from dagster_celery.tasks import create_task

    registered = app.tasks.get(TASK_EXECUTE_PLAN_NAME)
    return registered if registered is not None else create_task(app)


def submit_signed_step(
    app: Any,
    plan_context: Any,
    step: Any,
    queue: str,
    priority: int,
    known_state: Any,
    secret: bytes,
    timeout_seconds: int,
) -> VerifiedStepResult:
    """dagster-celery's `_submit_task` (the same message, queue, routing key and priority), the message
    signed (`MESSAGE_MAC_HEADER`) and its result checked and waited for at most `timeout_seconds`
    (`VerifiedStepResult`)."""
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import pack_value

    args = ExecuteStepArgs(
        job_origin=plan_context.reconstructable_job.get_python_origin(),
        run_id=plan_context.dagster_run.run_id,
        step_keys_to_execute=[step.key],
        instance_ref=plan_context.instance.get_ref(),
        retry_mode=plan_context.executor.retries.for_inner_plan(),
        known_state=known_state,
        print_serialized_events=True,
    )
    packed, executable_dict = pack_value(args), plan_context.reconstructable_job.to_dict()
    task_id = str(uuid.uuid4())
    sent = (
        _execute_plan_task(app)
        .si(execute_step_args_packed=packed, executable_dict=executable_dict)
        .apply_async(
            task_id=task_id,
            priority=priority,
            queue=queue,
            routing_key=f"{queue}.execute_plan",
            headers={MESSAGE_MAC_HEADER: message_mac(secret, task_id, packed, executable_dict)},
        )
    )
    return VerifiedStepResult(sent, secret, args.run_id, [step.key], timeout_seconds)


class AuthenticatedCeleryExecutor(CeleryExecutor):
    """dagster-celery's executor, each step sent signed and its result checked before its events are
    taken, and waited for at most `step_timeout_seconds` (`submit_signed_step`)."""

    def __init__(self, secret: bytes, step_timeout_seconds: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._secret = secret
        self._step_timeout_seconds = step_timeout_seconds

    def execute(self, plan_context: Any, execution_plan: Any) -> Any:
        from dagster_celery.core_execution_loop import core_celery_execution_loop

        def submit(app: Any, context: Any, step: Any, queue: str, priority: int, known_state: Any) -> Any:
            return submit_signed_step(
                app, context, step, queue, priority, known_state, self._secret, self._step_timeout_seconds
            )

        return core_celery_execution_loop(plan_context, execution_plan, step_execution_fn=submit)


@dg.executor(
    name="celery",
    config_schema=CELERY_CONFIG,
    requirements=dg.multiple_process_executor_requirements(),
)
def authenticated_celery_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
    """dagster-celery's `celery_executor` (the same config) with signed step messages and results and a
    bound on each step's wait; the key and the bound are read from this process's environment
    (`celery_secret`, `step_timeout_seconds`), never from config."""
    from dagster._core.execution.retries import RetryMode

    config: Any = init_context.executor_config
    return AuthenticatedCeleryExecutor(
        secret=celery_secret(),
        step_timeout_seconds=step_timeout_seconds(),
        broker=config.get("broker"),
        backend=config.get("backend"),
        config_source=config.get("config_source"),
        include=config.get("include"),
        retries=RetryMode.from_config(config["retries"]),
    )

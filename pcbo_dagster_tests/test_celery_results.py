"""Authenticated step results (`PCBO_EXECUTOR=celery`): the runs' coordinator takes a step's events
only from a result pcbo's worker signed for that step, under the key every host shares
(`PCBO_CELERY_KEY`).

dagster-celery's coordinator reads each step's events back from the result backend (Redis) and acts
on them: a step success there completes the step, the run is recorded a success and the steps
downstream are sent (the events themselves are written to the Dagster instance by the worker that ran
the step). Someone who can write Redis could make a run succeed whose step never ran, or failed.
Here the test is that someone: it takes the step's message off the queue (a rogue consumer) and
writes the step's result into the backend itself, or writes into the backend results it made, altered
or copied from another step.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import types
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dagster_celery")

import dagster as dg  # noqa: E402

from pcbo_dagster.core.errors import InvalidInput  # noqa: E402
from pcbo_dagster_tests.redis_server import fresh_database  # noqa: E402

SHARED_KEY = "k" * 40  # what every host of the deployment is given
OTHER_KEY = "o" * 40  # a worker of another deployment, or an attacker's guess


@pytest.fixture
def redis_db(redis_url: str) -> str:
    import redis

    url = fresh_database(redis_url)  # the test's own (a redis-server per xdist worker)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def _backend(url: str) -> Any:
    from celery import Celery

    return Celery(broker=url, backend=url)


# --- The coordinator's check of one result, against a real Redis result backend ----------------------


def _events(run_id: str, step_key: str) -> list[str]:
    """Serialized Dagster events a step's result carries: here a step success of `step_key`."""
    from dagster._core.definitions.dependency import NodeHandle
    from dagster._core.events import DagsterEvent, DagsterEventType
    from dagster._core.execution.plan.objects import StepSuccessData
    from dagster._serdes import serialize_value

    event = DagsterEvent(
        event_type_value=DagsterEventType.STEP_SUCCESS.value,
        job_name="celery_job",
        node_handle=NodeHandle(step_key, None),
        step_kind_value="COMPUTE",
        logging_tags={"run_id": run_id, "step_key": step_key},
        event_specific_data=StepSuccessData(duration_ms=1.0),
    )
    return [serialize_value(event)]


def _stored(url: str, task_id: str, value: Any) -> Any:
    """`value` written into the result backend as task `task_id`'s successful result."""
    app = _backend(url)
    app.backend.store_result(task_id, value, "SUCCESS")
    return app.AsyncResult(task_id)


def _checked(url: str, task_id: str, run_id: str, step_key: str, key: str = SHARED_KEY) -> Any:
    """What the coordinator (its key `key`) takes from task `task_id`'s result, for `step_key` of
    `run_id`."""
    from pcbo_dagster.dagster_defs.celery_signing import VerifiedStepResult, celery_secret

    secret = celery_secret({"PCBO_CELERY_KEY": key})
    result = VerifiedStepResult(_backend(url).AsyncResult(task_id), secret, run_id, [step_key])
    assert result.id == task_id and result.ready()
    return result.get()


def _signed(run_id: str, step_key: str, task_id: str, key: str = SHARED_KEY) -> Any:
    """The result pcbo's worker (its key `key`) returns for `step_key` of `run_id` run as `task_id`."""
    from pcbo_dagster.dagster_defs.celery_signing import celery_secret, signed_result

    secret = celery_secret({"PCBO_CELERY_KEY": key})
    return signed_result(secret, run_id, [step_key], task_id, _events(run_id, step_key))


def test_a_signed_result_for_its_own_step_is_accepted(redis_db):
    run_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    _stored(redis_db, task_id, _signed(run_id, "step_one", task_id))
    assert _checked(redis_db, task_id, run_id, "step_one") == _events(run_id, "step_one")


def _refusal(url: str, task_id: str, run_id: str, step_key: str, key: str = SHARED_KEY) -> str:
    from pcbo_dagster.dagster_defs.celery_signing import UnauthenticatedResult

    with pytest.raises(UnauthenticatedResult) as refused:
        _checked(url, task_id, run_id, step_key, key)
    message = str(refused.value)
    assert message.startswith("refused: ") and task_id in message and step_key in message, message
    return message


def test_a_result_written_into_the_backend_as_dagster_celery_writes_it_is_refused(redis_db):
    """The events list as dagster-celery's own task returns it (what an attacker writes): no MAC."""
    run_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    _stored(redis_db, task_id, _events(run_id, "step_one"))
    assert "not a result pcbo's worker signed" in _refusal(redis_db, task_id, run_id, "step_one")


def test_an_altered_signed_result_is_refused(redis_db):
    """A genuine result whose events were swapped (a failure made a success), its MAC kept."""
    run_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    genuine = _signed(run_id, "step_one", task_id)
    _stored(redis_db, task_id, {**genuine, "events": _events(run_id, "step_one") * 2})
    assert "does not verify" in _refusal(redis_db, task_id, run_id, "step_one")


@pytest.mark.parametrize("replayed_as", ["another step", "another run", "another task"])
def test_a_genuine_result_replayed_for_another_step_run_or_task_is_refused(redis_db, replayed_as):
    """A result pcbo's worker signed, copied in the backend to the task of another step, of another
    run, or to a later task of the same step (a second attempt): the MAC binds run, step and task."""
    run_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    genuine = _signed(run_id, "step_one", task_id)
    other_run, other_task = str(uuid.uuid4()), str(uuid.uuid4())
    target = {
        "another step": (other_task, run_id, "step_two"),
        "another run": (other_task, other_run, "step_one"),
        "another task": (other_task, run_id, "step_one"),
    }[replayed_as]
    _stored(redis_db, target[0], genuine)
    assert "does not verify" in _refusal(redis_db, *target)


@pytest.mark.parametrize(
    "state, value",
    [
        ("SUCCESS", None),
        ("SUCCESS", [[str(uuid.uuid4()), None], None]),  # a group's result, as Celery stores one
        ("FAILURE", ValueError("forged")),
        ("FAILURE", KeyboardInterrupt("forged")),
        ("FAILURE", SystemExit(0)),
    ],
    ids=["success_null", "group", "failure", "KeyboardInterrupt", "SystemExit"],
)
def test_a_result_in_another_of_celerys_shapes_is_refused(redis_db, state, value):
    """Whatever state and value the backend holds for the step's task, what the coordinator gets is
    a refusal (an `Exception`), never the exception the backend names."""
    run_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    _backend(redis_db).backend.store_result(task_id, value, state)
    message = _refusal(redis_db, task_id, run_id, "step_one")
    if isinstance(value, BaseException):
        assert f"the task ended in an exception ({type(value).__name__}" in message


def test_a_revoked_result_is_task_revoked_error_whatever_exception_it_names(redis_db):
    """`REVOKED` (what the coordinator's own revoke leaves) is `TaskRevokedError`, as from Celery's
    `get`, whatever exception the backend names with it: dagster-celery takes no events of the step,
    which is left unfinished, and the run fails."""
    from celery.exceptions import TaskRevokedError

    run_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    _backend(redis_db).backend.store_result(task_id, KeyboardInterrupt("forged"), "REVOKED")
    with pytest.raises(TaskRevokedError, match=task_id):
        _checked(redis_db, task_id, run_id, "step_one")


def test_a_result_signed_with_another_key_is_refused(redis_db):
    """A worker given another key (another deployment's, or an attacker's) does not speak for ours."""
    run_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    _stored(redis_db, task_id, _signed(run_id, "step_one", task_id, key=OTHER_KEY))
    assert "does not verify" in _refusal(redis_db, task_id, run_id, "step_one")


def test_a_workers_signed_refusal_fails_its_own_step_naming_the_reason(redis_db):
    """pcbo's worker answers a step it refused to run (a message carrying Celery's `eta`, for
    instance) with a refusal signed for that step: the coordinator fails the step naming the reason,
    not as an unauthenticated result."""
    from pcbo_dagster.dagster_defs.celery_signing import WorkerRefusedStep, celery_secret, signed_refusal

    run_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    secret = celery_secret({"PCBO_CELERY_KEY": SHARED_KEY})
    _stored(redis_db, task_id, signed_refusal(secret, run_id, ["step_one"], task_id, "refused: a reason"))
    with pytest.raises(WorkerRefusedStep) as refused:
        _checked(redis_db, task_id, run_id, "step_one")
    assert str(refused.value) == (
        f"step step_one of run {run_id} (Celery task {task_id}) was not run: refused: a reason"
    )


@pytest.mark.parametrize("forged_as", ["altered reason", "another task", "another key", "a result"])
def test_a_refusal_pcbo_s_worker_did_not_sign_for_the_step_is_refused(redis_db, forged_as):
    """A refusal whose reason was altered, copied from another task, signed with another key, or a
    genuine result's MAC under a refusal (the MAC binds the kind of answer too): an unauthenticated
    result like any other, never a refusal in the worker's name."""
    from pcbo_dagster.dagster_defs.celery_signing import celery_secret, signed_refusal

    run_id, task_id, other_task = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    secret = celery_secret({"PCBO_CELERY_KEY": SHARED_KEY})
    genuine = signed_refusal(secret, run_id, ["step_one"], task_id, "refused: a reason")
    forged = {
        "altered reason": {**genuine, "refused": "refused: another reason"},
        "another task": signed_refusal(secret, run_id, ["step_one"], other_task, "refused: a reason"),
        "another key": signed_refusal(
            celery_secret({"PCBO_CELERY_KEY": OTHER_KEY}), run_id, ["step_one"], task_id, "refused: a reason"
        ),
        "a result": {
            **genuine,
            "mac": _result_mac_of_step_one(secret, run_id, task_id, ["refused: a reason"]),
        },
    }[forged_as]
    _stored(redis_db, task_id, forged)
    assert "does not verify" in _refusal(redis_db, task_id, run_id, "step_one")


def _result_mac_of_step_one(secret: bytes, run_id: str, task_id: str, events: list[str]) -> str:
    """The MAC of a result (not a refusal) of `step_one` whose events are `events`."""
    from pcbo_dagster.dagster_defs.celery_signing import result_mac

    return result_mac(secret, run_id, ["step_one"], task_id, events)


def test_a_mac_that_is_not_text_of_a_digest_is_a_mismatch_not_an_error():
    """A forged MAC holding a lone surrogate (JSON's `"\\ud800"` decodes to one) failed to encode and
    raised `UnicodeEncodeError` from the check; it is a MAC that does not verify like any other."""
    from pcbo_dagster.dagster_defs.celery_signing import (
        UnauthenticatedResult,
        celery_secret,
        message_verifies,
        verified_events,
    )

    secret = celery_secret({"PCBO_CELERY_KEY": SHARED_KEY})
    run_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    assert not message_verifies(secret, task_id, "\ud800", {"run_id": run_id}, {})
    forged = {**_signed(run_id, "step_one", task_id), "mac": "\ud800"}
    with pytest.raises(UnauthenticatedResult, match="does not verify"):
        verified_events(secret, forged, run_id, ["step_one"], task_id)


# --- A whole run on the celery executor, its step's result written by a rogue consumer --------------


@dg.op
def step_one() -> int:
    return 1


def celery_job() -> dg.JobDefinition:
    """The job on the executor `PCBO_EXECUTOR=celery` gives (definitions.py), from the environment."""
    from pcbo_dagster.dagster_defs.definitions import executor_from_env

    @dg.job(name="celery_job", executor_def=executor_from_env())
    def job() -> None:
        step_one()

    return job


def _claimed_events(run_id: str) -> list[str]:
    """What the rogue consumer claims the step did: started, materialized `forged`, succeeded."""
    from dagster._core.definitions.dependency import NodeHandle
    from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
    from dagster._core.execution.plan.objects import StepSuccessData
    from dagster._serdes import serialize_value

    def event(kind: DagsterEventType, data: Any) -> str:
        return serialize_value(
            DagsterEvent(
                event_type_value=kind.value,
                job_name="celery_job",
                node_handle=NodeHandle("step_one", None),
                step_kind_value="COMPUTE",
                logging_tags={"run_id": run_id, "step_key": "step_one"},
                event_specific_data=data,
            )
        )

    return [
        event(DagsterEventType.STEP_START, None),
        event(
            DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(dg.AssetMaterialization("forged"))
        ),
        event(DagsterEventType.STEP_SUCCESS, StepSuccessData(duration_ms=1.0)),
    ]


def _rogue_consumer(
    url: str,
    sign_with: str | None,
    stop: threading.Event,
    taken: dict[str, Any],
    failure: BaseException | None = None,
    forged_state: str | None = None,
) -> None:
    """Takes the first step message off the queue and writes its result: the claimed events as
    dagster-celery's task returns them (`sign_with` None), or signed as pcbo's worker signs them under
    the key `sign_with`, or (`failure`) a failed task's result naming that exception (Celery's
    `exc_type`, `exc_module`, `exc_message`), or (`forged_state`) a state that is no result at all
    (`deleted`: nothing, as a result deleted from the backend reads). (Should it fail, the failure is
    the task's result: the run ends.)"""
    import redis
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import unpack_value

    client = redis.Redis.from_url(url)
    while not stop.is_set():
        for queue in client.keys("dagster*"):
            raw: Any = client.lpop(queue) if client.type(queue) == b"list" else None
            if raw is None:
                continue
            message = json.loads(raw)
            task_id = message["headers"]["id"]
            taken["message"] = message
            if forged_state is not None:
                if forged_state != "deleted":
                    _backend(url).backend.store_result(task_id, *FORGED_STATES[forged_state])
                return
            if failure is not None:
                _backend(url).backend.store_result(task_id, failure, "FAILURE")
                return
            try:
                _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
                args = unpack_value(kwargs["execute_step_args_packed"], as_type=ExecuteStepArgs)
                events = _claimed_events(args.run_id)
                value: Any = events
                if sign_with is not None:
                    from pcbo_dagster.dagster_defs.celery_signing import celery_secret, signed_result

                    secret = celery_secret({"PCBO_CELERY_KEY": sign_with})
                    value = signed_result(secret, args.run_id, ["step_one"], task_id, events)
            except Exception as exc:
                _backend(url).backend.store_result(task_id, exc, "FAILURE")
                raise
            _backend(url).backend.store_result(task_id, value, "SUCCESS")
            return
        time.sleep(0.05)


@pytest.fixture
def celery_env(redis_db, monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("PCBO_EXECUTOR", "celery")
    monkeypatch.setenv("PCBO_CELERY_BROKER", redis_db)
    monkeypatch.delenv("PCBO_CELERY_BACKEND", raising=False)
    monkeypatch.setenv("PCBO_CELERY_KEY", SHARED_KEY)
    yield redis_db


def _run(
    url: str,
    tmp_path: Path,
    sign_with: str | None,
    taken: dict[str, Any] | None = None,
    failure: BaseException | None = None,
    forged_state: str | None = None,
) -> tuple[Any, list[Any]]:
    """The job run by the celery executor, the rogue consumer taking its step (the message it took in
    `taken["message"]`; `failure`: the failed result it writes; `forged_state`: the state it writes)."""
    stop = threading.Event()
    taken = {} if taken is None else taken
    rogue = threading.Thread(
        target=_rogue_consumer, args=(url, sign_with, stop, taken, failure, forged_state), daemon=True
    )
    rogue.start()
    try:
        with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
            result = dg.execute_job(dg.reconstructable(celery_job), instance, raise_on_error=False)
            records = instance.get_records_for_run(result.run_id).records
            return result, [r.event_log_entry for r in records]
    finally:
        stop.set()
        rogue.join(timeout=10)


def _types(entries: list[Any]) -> list[Any]:
    return [e.dagster_event.event_type for e in entries if e.dagster_event is not None]


def _run_failure(entries: list[Any]) -> str:
    """The text of the run's failure event."""
    return next(
        str(e.dagster_event)
        for e in entries
        if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE
    )


@pytest.mark.parametrize("sign_with", [None, OTHER_KEY], ids=["unsigned", "another_key"])
def test_a_run_does_not_succeed_on_a_result_its_workers_did_not_sign(celery_env, tmp_path, sign_with):
    """No worker of pcbo's ran the step; the rogue consumer's result claims it started, materialized
    `forged` and succeeded. Before, the coordinator took the claim: the run was recorded a success
    (and would have sent the steps downstream of it). Now the step fails `refused: unauthenticated
    result ...` and so does the run."""
    result, entries = _run(celery_env, tmp_path, sign_with)
    assert not result.success
    assert dg.DagsterEventType.RUN_SUCCESS not in _types(entries)
    failure = next(
        e
        for e in entries
        if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE
    )
    assert "refused: unauthenticated result for step step_one" in str(failure.dagster_event), failure


def _interrupt() -> BaseException:
    from dagster._core.errors import DagsterExecutionInterruptedError

    return DagsterExecutionInterruptedError("forged")


@pytest.mark.parametrize(
    "failure",
    [lambda: KeyboardInterrupt("forged"), lambda: SystemExit(0), _interrupt],
    ids=["KeyboardInterrupt", "SystemExit", "DagsterExecutionInterruptedError"],
)
def test_a_failed_result_naming_an_interruption_is_refused_like_any_unsigned_result(
    celery_env, tmp_path, failure
):
    """A failed task's result in the backend names its exception by module and class, and Celery's
    `get` raises that class. One that is not an `Exception` (an interruption, an exit) passed by
    dagster-celery's `except Exception`: before, a rogue result naming `KeyboardInterrupt` had the run
    recorded canceled, as if an operator had stopped it, with no trace of the refusal. Now no exception
    read from the backend is raised: the step fails `refused: unauthenticated result ...` and so does
    the run."""
    result, entries = _run(celery_env, tmp_path, None, failure=failure())
    kinds = _types(entries)
    assert not result.success
    assert dg.DagsterEventType.RUN_SUCCESS not in kinds
    assert dg.DagsterEventType.RUN_CANCELED not in kinds, kinds
    failure_event = next(
        e
        for e in entries
        if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE
    )
    assert "refused: unauthenticated result for step step_one" in str(failure_event.dagster_event), (
        failure_event
    )


def test_a_run_succeeds_on_a_result_signed_under_the_shared_key(celery_env, tmp_path):
    """The same run, its result signed under the shared key as pcbo's worker signs it: the coordinator
    takes its events as dagster-celery takes them, and the run succeeds."""
    result, entries = _run(celery_env, tmp_path, SHARED_KEY)
    assert result.success, _types(entries)
    assert dg.DagsterEventType.RUN_SUCCESS in _types(entries)


def test_the_coordinator_signs_the_step_message_it_sends(celery_env, tmp_path):
    """The step message carries the MAC pcbo's worker checks (`celery_worker.py`): of its task id and
    its arguments, under the shared key; not under another key."""
    from pcbo_dagster.dagster_defs.celery_signing import MESSAGE_MAC_HEADER, celery_secret, message_verifies

    taken: dict[str, Any] = {}
    _run(celery_env, tmp_path, SHARED_KEY, taken)
    headers = taken["message"]["headers"]
    _args, kwargs, _embed = json.loads(base64.b64decode(taken["message"]["body"]))
    signed = (
        headers["id"],
        headers.get(MESSAGE_MAC_HEADER),
        kwargs["execute_step_args_packed"],
        kwargs["executable_dict"],
    )
    assert message_verifies(celery_secret({"PCBO_CELERY_KEY": SHARED_KEY}), *signed)
    assert not message_verifies(celery_secret({"PCBO_CELERY_KEY": OTHER_KEY}), *signed)
    assert not message_verifies(
        celery_secret({"PCBO_CELERY_KEY": SHARED_KEY}), str(uuid.uuid4()), *signed[1:]
    )


def test_the_steps_of_a_run_register_dagster_celerys_task_once(tmp_path):
    """The coordinator sends every step of a run with one Celery app. Before, each step sent defined
    dagster-celery's `execute_plan` task on it again, and Celery 5.7 warned at every run's second step
    ("DuplicateTaskNameWarning: Task name 'execute_plan' is already registered to a different
    callable"); now the task is defined once per app and taken back for the next steps, which go out
    under the same task name, signed as before."""
    from celery import Celery
    from celery.exceptions import DuplicateTaskNameWarning
    from dagster._core.execution.retries import RetryMode
    from dagster_celery.config import TASK_EXECUTE_PLAN_NAME

    from pcbo_dagster.dagster_defs.celery_signing import celery_secret, submit_signed_step

    app = Celery(broker="memory://", backend="cache+memory://")
    secret = celery_secret({"PCBO_CELERY_KEY": SHARED_KEY})
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        plan_context = types.SimpleNamespace(
            reconstructable_job=dg.reconstructable(celery_job),
            dagster_run=types.SimpleNamespace(run_id=str(uuid.uuid4())),
            instance=instance,
            executor=types.SimpleNamespace(retries=RetryMode.DISABLED),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sent = [
                submit_signed_step(
                    app, plan_context, types.SimpleNamespace(key=key), "dagster", 0, None, secret, 60
                )
                for key in ("step_one", "step_two", "step_three")
            ]
    duplicates = [w for w in caught if issubclass(w.category, DuplicateTaskNameWarning)]
    assert not duplicates, [str(w.message) for w in duplicates]
    assert [result.step_keys for result in sent] == [["step_one"], ["step_two"], ["step_three"]]
    assert len({result.id for result in sent}) == 3
    assert TASK_EXECUTE_PLAN_NAME in app.tasks


# --- A step whose result never arrives ----------------------------------------------------------------

#: What the rogue consumer writes as the step task's state (Celery's `store_result` arguments): a task
#: queued, running, or to be retried, as far as the backend says; none is ready, so the coordinator waits.
FORGED_STATES: dict[str, tuple[Any, str]] = {
    "PENDING": (None, "PENDING"),
    "STARTED": ({"pid": 1, "hostname": "forged@host"}, "STARTED"),
    "RETRY": (ValueError("forged retry"), "RETRY"),
    "made up": (None, "SUCCESS: the step ran\n[step_two]: ok"),
}


@pytest.mark.timeout(90)  # before, the coordinator waited for the step forever
@pytest.mark.parametrize("state", [*FORGED_STATES, "deleted"])
def test_a_step_whose_signed_result_never_arrives_fails_the_run_within_the_step_timeout(
    celery_env, tmp_path, monkeypatch, state
):
    """Someone who can write the broker and the backend takes the step's message off the queue and
    leaves in the backend a state that is not a result: PENDING, STARTED, RETRY, one of its own
    making, or nothing (a result deleted). Before, the coordinator polled `ready()` for ever and the
    run never ended. Now a step whose signed result has not arrived within `PCBO_CELERY_STEP_TIMEOUT`
    is revoked and failed, naming the step, the variable and what the backend claims (a state of
    Celery's; not the text of one made up), and the run fails."""
    monkeypatch.setenv("PCBO_CELERY_STEP_TIMEOUT", "3")
    started = time.monotonic()
    result, entries = _run(celery_env, tmp_path, None, forged_state=state)
    took = time.monotonic() - started
    assert not result.success
    assert dg.DagsterEventType.RUN_SUCCESS not in _types(entries)
    failure = _run_failure(entries)
    assert "step step_one of run" in failure and "PCBO_CELERY_STEP_TIMEOUT (3 s" in failure, failure
    claimed = {"deleted": "PENDING", "made up": "a state Celery does not define"}.get(state, state)
    assert f"the result backend says {claimed}" in failure, failure
    assert took < 60, took


def test_a_run_succeeds_with_the_step_timeout_set_when_its_result_arrives_in_time(
    celery_env, tmp_path, monkeypatch
):
    """The step timeout is a bound, not a delay: a signed result that arrives within it is taken as
    before and the run succeeds."""
    monkeypatch.setenv("PCBO_CELERY_STEP_TIMEOUT", "30")
    result, entries = _run(celery_env, tmp_path, SHARED_KEY)
    assert result.success, _types(entries)


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "a day"])
def test_an_invalid_step_timeout_is_invalid_input_naming_it(value):
    from pcbo_dagster.dagster_defs.definitions import executor_from_env

    env = {
        "PCBO_EXECUTOR": "celery",
        "PCBO_CELERY_BROKER": "redis://127.0.0.1:1/0",
        "PCBO_CELERY_KEY": SHARED_KEY,
        "PCBO_CELERY_STEP_TIMEOUT": value,
    }
    with pytest.raises(InvalidInput) as refused:
        executor_from_env(env)
    assert refused.value.field == "PCBO_CELERY_STEP_TIMEOUT"


def _celery_range_runs_env(tmp_path, monkeypatch) -> None:
    """`range_runs` with the celery executor, a home in `tmp_path` and a broker that is not there."""
    monkeypatch.setenv("PCBO_HOME", str(tmp_path))
    monkeypatch.delenv("PCBO_DATASETS_CONFIG", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("PCBO_EXECUTOR", "celery")
    monkeypatch.setenv("PCBO_CELERY_BROKER", "redis://127.0.0.1:1/0")


@pytest.mark.timeout(120)
def test_range_runs_with_an_invalid_step_timeout_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    from pcbo_dagster.dagster_defs import range_runs

    _celery_range_runs_env(tmp_path, monkeypatch)
    monkeypatch.setenv("PCBO_CELERY_KEY", SHARED_KEY)
    monkeypatch.setenv("PCBO_CELERY_STEP_TIMEOUT", "forever")
    assert range_runs.main(["events"]) == 2
    assert "invalid input: PCBO_CELERY_STEP_TIMEOUT:" in capsys.readouterr().err


# --- Without the key --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "too-short"])
def test_the_celery_executor_refuses_to_start_without_a_shared_result_key(value):
    """Hosts must share the key (a random key per home would make every result fail), so no key is
    invalid input naming the variable, as is a key too short to resist guessing from a MAC."""
    from pcbo_dagster.dagster_defs.definitions import executor_from_env

    env = {"PCBO_EXECUTOR": "celery", "PCBO_CELERY_BROKER": "redis://127.0.0.1:1/0"}
    if value is not None:
        env["PCBO_CELERY_KEY"] = value
    with pytest.raises(InvalidInput) as refused:
        executor_from_env(env)
    assert refused.value.field == "PCBO_CELERY_KEY"
    assert executor_from_env({**env, "PCBO_CELERY_KEY": SHARED_KEY}).name == "pcbo_celery"


@pytest.mark.timeout(120)  # before, it went on to launch the runs (on a broker that is not there)
def test_range_runs_without_the_result_key_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    from pcbo_dagster.dagster_defs import range_runs

    _celery_range_runs_env(tmp_path, monkeypatch)
    monkeypatch.delenv("PCBO_CELERY_KEY", raising=False)
    assert range_runs.main(["events"]) == 2
    assert "invalid input: PCBO_CELERY_KEY:" in capsys.readouterr().err

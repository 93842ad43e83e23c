"""Forged broker messages (issue 14's many-hosts deployment): a real Celery worker (pcbo's worker app)
on the test Redis, and messages written to its queue by someone who can write the broker, not by
Dagster's executor.

dagster-celery's `execute_plan` task takes, from the message itself, the code to load
(`executable_dict`: a code pointer, which may name any Python file or module) and the Dagster instance
to read the run from (`instance_ref`). A worker holds the lake's, the catalog's and the audit store's
credentials and, where checkpoints are signed, the operator's signing key: anyone who could write the
broker (often a Redis without a password) could run code of their choosing on every worker.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dagster_celery")

from pcbo_dagster_tests.dagster_harness import REPO_ROOT, executable  # noqa: E402
from pcbo_dagster_tests.redis_server import fresh_database  # noqa: E402

#: The workers' key (`PCBO_CELERY_KEY`): the forged messages of the code and run guard tests are
#: signed with it (someone holding the key, or a coordinator's bug), so that guard is what they test.
SHARED_KEY = "broker-attacks-test-result-key-0123456789"


def _worker(tmp_path: Path, broker: str, dagster_home: Path) -> tuple[subprocess.Popen[bytes], Path]:
    home = tmp_path / "worker"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCBO_", "DAGSTER_"))}
    env.update(
        {
            "PCBO_HOME": str(home / "pcbo"),
            "PCBO_CELERY_BROKER": broker,
            "PCBO_CELERY_KEY": SHARED_KEY,
            "DAGSTER_HOME": str(dagster_home),
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    log = home / "worker.log"
    argv = [
        executable("celery"), "-A", "pcbo_dagster.dagster_defs.celery_worker", "worker", "-Q", "dagster",
        "--pool", "solo", "-n", f"w-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 90
    while b"ready." not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.2)
    return proc, log


def _instance_with_a_run(home: Path, status: Any = None) -> tuple[Any, str]:
    """A Dagster instance (SQLite, under `home`) holding one run (of `status`, in progress when not
    given); (its ref, the run id)."""
    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    run_id = str(uuid.uuid4())
    with dg.DagsterInstance.from_ref(dg._core.instance.InstanceRef.from_dir(str(home))) as instance:
        status = DagsterRunStatus.STARTED if status is None else status
        instance.add_run(DagsterRun(job_name="evil", run_id=run_id, run_config={}, status=status))
        return instance.get_ref(), run_id


def _forged_step(instance_ref: Any, run_id: str, pointer: Any, job_name: str) -> tuple[Any, Any]:
    from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import pack_value

    job = ReconstructableJob(ReconstructableRepository(pointer), job_name)
    args = ExecuteStepArgs(
        job_origin=job.get_python_origin(), run_id=run_id, step_keys_to_execute=["evil_op"],
        instance_ref=instance_ref,
    )  # fmt: skip
    return pack_value(args), job.to_dict()


def _send(
    broker: str, packed: Any, executable_dict: Any, sign_with: str | None = SHARED_KEY, **options: Any
) -> Any:
    """The message on the queue, signed as the runs' coordinator signs it under the key `sign_with`
    (None: not signed); `options`: more of Celery's `send_task` options (`eta`, `countdown`,
    `expires`), which the MAC does not cover."""
    from celery import Celery

    task_id = str(uuid.uuid4())
    headers = {}
    if sign_with is not None:
        from pcbo_dagster.dagster_defs.celery_signing import MESSAGE_MAC_HEADER, celery_secret, message_mac

        secret = celery_secret({"PCBO_CELERY_KEY": sign_with})
        headers[MESSAGE_MAC_HEADER] = message_mac(secret, task_id, packed, executable_dict)
    app = Celery(broker=broker, backend=broker)
    return app.send_task(
        "execute_plan",
        args=[packed, executable_dict],
        queue="dagster",
        task_id=task_id,
        headers=headers,
        **options,
    )


@pytest.fixture
def worker(tmp_path, redis_url):
    broker = fresh_database(redis_url)
    own_home = tmp_path / "dagster_home"
    _instance_with_a_run(own_home)
    proc, log = _worker(tmp_path, broker, own_home)
    try:
        yield broker, own_home, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=5)


@pytest.mark.parametrize("where", ["attacker_instance", "worker_instance"])
@pytest.mark.parametrize("kind", ["file", "module"])
def test_a_forged_step_message_runs_no_code_but_the_code_location(tmp_path, worker, where, kind):
    """A message naming a Python file (or another module) as the code to load, with a run in the
    attacker's own Dagster instance (a SQLite directory named by `instance_ref`) or in the worker's:
    the worker imported it and ran its top-level code. Now a step is run only from pcbo's code location
    (`pcbo_dagster.dagster_defs.definitions`), of a run of the worker's own instance (the message's
    `instance_ref` is never used), for that run's job; anything else is refused before anything is
    loaded, and the message is acknowledged (never redelivered)."""
    from dagster._core.code_pointer import FileCodePointer, ModuleCodePointer

    broker, own_home, log = worker
    marker = tmp_path / "owned"
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (evil_dir / "evil_location.py").write_text(code)
    if kind == "file":
        pointer = FileCodePointer(python_file=str(evil_dir / "evil_location.py"), fn_name="defs")
    else:
        pointer = ModuleCodePointer(module="evil_location", fn_name="defs", working_directory=str(evil_dir))
    if where == "attacker_instance":
        ref, run_id = _instance_with_a_run(tmp_path / "attacker_home")
    else:
        ref, run_id = _instance_with_a_run(own_home)
    result = _send(broker, *_forged_step(ref, run_id, pointer, "evil"))
    with pytest.raises(Exception) as refused:
        result.get(timeout=60)
    assert not marker.exists(), log.read_text(errors="replace")[-3000:]
    assert "refused" in str(refused.value), refused.value


@pytest.mark.parametrize(
    ("where", "refusal"),
    [("attacker_instance", "not a run of this worker"), ("worker_instance", "is of job 'evil'")],
)
def test_a_step_of_the_code_location_is_run_only_for_a_run_of_the_workers_own_instance(
    tmp_path, worker, where, refusal
):
    """pcbo's own code pointer, but the run is in an instance the message names (whose run config and
    tags, the partitions a step writes, are the attacker's), or is a run of another job: refused. The
    worker reads runs only from its own `DAGSTER_HOME`."""
    from dagster._core.code_pointer import ModuleCodePointer

    broker, own_home, log = worker
    ref, run_id = _instance_with_a_run(
        tmp_path / "attacker_home" if where == "attacker_instance" else own_home
    )
    pointer = ModuleCodePointer(
        module="pcbo_dagster.dagster_defs.definitions", fn_name="defs", working_directory=None
    )
    result = _send(broker, *_forged_step(ref, run_id, pointer, "__ASSET_JOB"))
    with pytest.raises(Exception) as refused:
        result.get(timeout=60)
    assert "refused" in str(refused.value) and refusal in str(refused.value), refused.value


@pytest.mark.parametrize("status", ["SUCCESS", "FAILURE", "CANCELED", "NOT_STARTED"])
def test_a_signed_step_message_is_run_only_while_its_run_is_in_progress(tmp_path, worker, status):
    """A genuine step message stays readable in the broker (and in its own result's metadata), so
    someone who can write the broker can send it again at any time, MAC and task id unchanged. While
    its run is in progress that is what Redis's redelivery does anyway. Before, it was also run after
    the run had ended (or before it started): the step executed outside any run, its events appended
    to a finished run's log (a failed run given a materialization). Now a step is run only for a run
    in progress (`STARTED`); anything else is refused naming the run's status."""
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.storage.dagster_run import DagsterRunStatus

    broker, own_home, log = worker
    ref, run_id = _instance_with_a_run(own_home, DagsterRunStatus[status])
    pointer = ModuleCodePointer(
        module="pcbo_dagster.dagster_defs.definitions", fn_name="defs", working_directory=None
    )
    result = _send(broker, *_forged_step(ref, run_id, pointer, "evil"))
    with pytest.raises(Exception) as refused:
        result.get(timeout=60)
    assert f"refused: run {run_id!r} is {status}, not in progress" in str(refused.value), refused.value


def test_a_step_message_the_coordinator_did_not_sign_is_refused(tmp_path, worker):
    """A step of pcbo's code location, for a run of the worker's own instance and that run's job
    (what the guard above lets through), sent by someone who can write the broker: before, the worker
    loaded the code location to run it (any step of any run of its instance, with the step state the
    message gives). Now a step message runs only when the runs' coordinator signed it (an HMAC under
    the shared key of the task id and the message's arguments): unsigned, signed with another key, or
    signed and then altered, it is refused before anything is read or loaded. (Signed with the shared
    key, the messages of the tests above pass this check and meet the code and run guard.)"""
    from dagster._core.code_pointer import ModuleCodePointer

    broker, own_home, log = worker
    ref, run_id = _instance_with_a_run(own_home)
    pointer = ModuleCodePointer(
        module="pcbo_dagster.dagster_defs.definitions", fn_name="defs", working_directory=None
    )
    packed, executable_dict = _forged_step(ref, run_id, pointer, "evil")
    altered = {**packed, "step_keys_to_execute": ["another_op"]}
    sent = {
        "unsigned": _send(broker, packed, executable_dict, sign_with=None),
        "another key": _send(broker, packed, executable_dict, sign_with="o" * 40),
    }
    from celery import Celery

    from pcbo_dagster.dagster_defs.celery_signing import MESSAGE_MAC_HEADER, celery_secret, message_mac

    task_id = str(uuid.uuid4())
    signed_for_the_original = message_mac(
        celery_secret({"PCBO_CELERY_KEY": SHARED_KEY}), task_id, packed, executable_dict
    )
    sent["altered"] = Celery(broker=broker, backend=broker).send_task(
        "execute_plan", args=[altered, executable_dict], queue="dagster", task_id=task_id,
        headers={MESSAGE_MAC_HEADER: signed_for_the_original},
    )  # fmt: skip
    for case, result in sent.items():
        with pytest.raises(Exception) as refused:
            result.get(timeout=60)
        assert "refused: the step message is not signed" in str(refused.value), (case, refused.value)


@pytest.mark.parametrize("task", ["execute_job", "resume_job"])
def test_a_run_message_is_not_a_task_of_pcbos_worker(tmp_path, worker, task):
    """dagster-celery's app also runs whole runs (`execute_job`, `resume_job`: its run launcher's
    tasks), for whatever run id a message names; pcbo's coordinator never sends them (runs are
    launched by Dagster's own launcher, steps by the executor), so pcbo's worker does not have them:
    such a message is discarded unrun (Celery's "unregistered task", its result a `NotRegistered`
    failure)."""
    from celery import Celery
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
    from dagster._grpc.types import ExecuteRunArgs, ResumeRunArgs
    from dagster._serdes import pack_value

    broker, own_home, log = worker
    ref, run_id = _instance_with_a_run(own_home)
    pointer = ModuleCodePointer(
        module="pcbo_dagster.dagster_defs.definitions", fn_name="defs", working_directory=None
    )
    origin = ReconstructableJob(ReconstructableRepository(pointer), "evil").get_python_origin()
    kind = ExecuteRunArgs if task == "execute_job" else ResumeRunArgs
    args = kind(job_origin=origin, run_id=run_id, instance_ref=ref)
    sent = Celery(broker=broker, backend=broker).send_task(task, args=[pack_value(args)], queue="dagster")
    with pytest.raises(Exception) as refused:
        sent.get(timeout=60)
    assert type(refused.value).__name__ == "NotRegistered", refused.value
    assert f"unregistered task of type '{task}'".encode() in log.read_bytes()


def test_celerys_own_tasks_are_not_tasks_of_pcbos_worker(tmp_path, worker):
    """Celery registers its own tasks on every app (`celery.accumulate`, `celery.map`, `celery.starmap`,
    `celery.group`, `celery.chord_unlock`, ..., and dagster-celery's app `celery.ping`). Before, pcbo's
    worker ran them for anyone who could write the broker: `celery.accumulate` stored any value it was
    given as the result of any task id (the broker's writer writing the result backend, which may be
    another Redis), `celery.starmap` called the step task in the worker's own process. Now the step
    task is the worker's only task: such a message is discarded unrun (`NotRegistered`)."""
    from celery import Celery

    broker, own_home, log = worker
    app = Celery(broker=broker, backend=broker)
    sent = {
        "celery.accumulate": app.send_task("celery.accumulate", args=[1, 2], queue="dagster"),
        "celery.ping": app.send_task("celery.ping", queue="dagster"),
        "celery.starmap": app.send_task(
            "celery.starmap",
            args=[{"task": "celery.ping", "args": [], "kwargs": {}, "options": {}}, [[]]],
            queue="dagster",
        ),
    }
    for task, result in sent.items():
        with pytest.raises(Exception) as refused:
            result.get(timeout=60)
        assert type(refused.value).__name__ == "NotRegistered", (task, refused.value)
        assert f"unregistered task of type '{task}'".encode() in log.read_bytes(), task


# --- Delivery options on a replayed message ----------------------------------------------------------


def _coordinators_check(result: Any, run_id: str, **kwargs: Any) -> Any:
    """`result` as the runs' coordinator reads it (`VerifiedStepResult`, under the shared key), for
    the step `_forged_step` names."""
    from pcbo_dagster.dagster_defs.celery_signing import VerifiedStepResult, celery_secret

    secret = celery_secret({"PCBO_CELERY_KEY": SHARED_KEY})
    return VerifiedStepResult(result, secret, run_id, ["evil_op"], **kwargs)


def _code_location_step(own_home: Path) -> tuple[str, Any, Any]:
    """A step message of pcbo's code location for a run in progress of the worker's own instance, as
    the runs' coordinator sends it (what the message MAC and the run guard let through): (run id,
    its step arguments, its code)."""
    from dagster._core.code_pointer import ModuleCodePointer

    ref, run_id = _instance_with_a_run(own_home)
    pointer = ModuleCodePointer(
        module="pcbo_dagster.dagster_defs.definitions", fn_name="defs", working_directory=None
    )
    return run_id, *_forged_step(ref, run_id, pointer, "evil")


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ("eta", "eta"),  # due a minute ago: Celery runs it at once
        ("countdown", "eta"),  # the sender turns a countdown into an eta: due in a second
        ("expires", "expires"),  # expiring in an hour: Celery runs it now, and revokes it after that
    ],
)
def test_a_step_message_with_a_delivery_option_is_refused_with_a_signed_refusal(
    tmp_path, worker, option, field
):
    """The coordinator never sets `eta`, `countdown` or `expires`, and the message MAC does not cover
    them: someone who can write the broker can send a genuine step message again with them (a step
    delayed or revoked at their choosing). Before, the worker ran it as any other. Now the worker
    refuses a step message carrying one before it runs anything, and returns a refusal signed for
    the step, which the coordinator reads as a failed step naming the option (not a wait)."""
    from datetime import UTC, datetime, timedelta

    broker, own_home, log = worker
    run_id, packed, executable_dict = _code_location_step(own_home)
    now = datetime.now(UTC)
    options = {
        "eta": {"eta": now - timedelta(minutes=1)},
        "countdown": {"countdown": 1},
        "expires": {"expires": now + timedelta(hours=1)},
    }[option]
    result = _send(broker, packed, executable_dict, **options)
    checked = _coordinators_check(result, run_id)
    deadline = time.monotonic() + 60
    while not checked.ready():
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    with pytest.raises(Exception) as refused:
        checked.get()
    message = str(refused.value)
    assert type(refused.value).__name__ == "WorkerRefusedStep", message
    assert f"refused: the step message carries Celery's `{field}`" in message, message
    assert "step evil_op of run " + run_id in message, message


@pytest.mark.timeout(60)  # before, nothing bounded the coordinator's wait
def test_a_step_message_delayed_by_an_eta_is_revoked_and_failed_at_the_step_timeout(tmp_path, worker):
    """A step message sent again with an `eta` a day away never reaches the step task: Celery's worker
    holds it until then, so the worker cannot refuse it. What bounds it is the coordinator's step
    timeout: the step is revoked (the worker is told: "flagged as revoked") and failed naming the
    step and `PCBO_CELERY_STEP_TIMEOUT`."""
    from datetime import UTC, datetime, timedelta

    broker, own_home, log = worker
    run_id, packed, executable_dict = _code_location_step(own_home)
    result = _send(broker, packed, executable_dict, eta=datetime.now(UTC) + timedelta(days=1))
    checked = _coordinators_check(result, run_id, timeout_seconds=3)
    started = time.monotonic()
    while not checked.ready():
        time.sleep(0.2)
    with pytest.raises(Exception) as timed_out:
        checked.get()
    message = str(timed_out.value)
    assert type(timed_out.value).__name__ == "StepTimedOut", message
    assert "step evil_op of run " + run_id in message and "PCBO_CELERY_STEP_TIMEOUT (3 s" in message, message
    assert 3 <= time.monotonic() - started < 20
    assert f"[{result.id}] received".encode() in log.read_bytes()  # held by the worker, not run
    deadline = time.monotonic() + 20
    while f"revoked: {result.id}".encode() not in log.read_bytes():
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


def test_a_step_message_sent_again_already_expired_fails_its_step_revoked(tmp_path, worker):
    """An `expires` already past never reaches the step task either: Celery's worker revokes the
    message on receipt and records the task REVOKED, which the coordinator reads as a revoked step
    (`TaskRevokedError`: the step left unfinished, the run failed), not a wait. (Celery's own
    behaviour, pinned here because the README relies on it.)"""
    from datetime import UTC, datetime, timedelta

    from celery.exceptions import TaskRevokedError

    broker, own_home, log = worker
    run_id, packed, executable_dict = _code_location_step(own_home)
    result = _send(broker, packed, executable_dict, expires=datetime.now(UTC) - timedelta(minutes=1))
    checked = _coordinators_check(result, run_id)
    deadline = time.monotonic() + 60
    while not checked.ready():
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    with pytest.raises(TaskRevokedError, match=result.id):
        checked.get()

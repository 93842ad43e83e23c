"""Celery on Redis (issue 14): Dagster's Celery executor (dagster-celery) with Debian's redis-server
on loopback as broker and result backend, PostgreSQL for the Dagster instance and the catalog, an S3
lake, audit store and source on moto's server. Three workers are separate `celery` processes, each in
its own working directory with its own PCBO_HOME and audit cache (standing in for hosts); nothing is
shared but the lake URL, the catalog URL, the audit store URL and the broker.

A multi_run backfill of 48 hourly partitions (4 runs of 12, two in flight) is launched by
`python -m pcbo_dagster.dagster_defs.range_runs`; every run's step is a Celery task taken by one of two
workers. (The issue's 720 partitions in 30 runs on three workers is `benchmarks/celery_benchmark.py`:
about 7 minutes here, too long for every CI run; the same code paths at a smaller scale are tested
here.) Then kill -9 trials: of the worker running a step (the step is redelivered to the other worker),
and of the runs' coordinator (the backfill launched again). Every test ends with the same proof: one
linear chain, one commit event per partition, data files byte-identical to the same runs on one host,
and `pcbo verify` from a fresh directory clean.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("dagster_celery")

from pcbo_dagster.core.audit_chain import verify_chain  # noqa: E402
from pcbo_dagster_tests.dagster_harness import REPO_ROOT, executable, materialize_range  # noqa: E402
from pcbo_dagster_tests.redis_server import fresh_database  # noqa: E402

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
# The scale (benchmarks/celery_benchmark.py sets these for its measurements; the defaults are CI's).
HOURS = int(os.environ.get("CELERY_HOURS", "48"))  # hourly partitions from 2024-01-01, at most 744
PER_RUN = int(os.environ.get("CELERY_PER_RUN", "12"))  # partitions per run (the multi_run policy)
WORKERS = int(os.environ.get("CELERY_WORKERS", "2"))  # Celery workers of the backfill test
KEY = "events/v1"
RESULT_KEY = "celery-workers-test-result-key-0123456789"


def _records() -> list[dict[str, Any]]:
    out = []
    for hour in range(HOURS):
        day, h = divmod(hour, 24)
        for i in range(2):
            out.append(
                {
                    "id": f"evt-{hour:04d}-{i}",
                    "occurredAt": f"2024-01-{day + 1:02d}T{h:02d}:{15 + i * 30:02d}:00Z",
                    "consentGranted": (hour + i) % 7 != 0,
                    "jurisdiction": "US" if i else "CA",
                    "amount": hour * 10 + i,
                }
            )
    return out


def _config(source_uri: str) -> dict[str, Any]:
    return {
        "version": 1,
        "datasets": [
            {
                "name": "events",
                "versionLabel": "v1",
                "partitioning": {
                    "kind": "time_window",
                    "cron": "hourly",
                    "start": "2024-01-01T00:00:00Z",
                    "end": _end(),
                    "timezone": "UTC",
                },
                "source": {"uri": source_uri, "format": "jsonl"},
                "policies": {
                    "requireConsent": True,
                    "allowedJurisdictions": ["US", "CA"],
                    "onViolation": "omit",
                },
                "backfillPolicy": {"kind": "multi_run", "maxPartitionsPerRun": PER_RUN},
                "checkGranularity": "run",
            }
        ],
    }


def _end() -> str:
    day, h = divmod(HOURS, 24)
    return f"2024-{1 + day // 31:02d}-{day % 31 + 1:02d}T{h:02d}:00:00Z"


def _key(hour: int) -> str:
    day, h = divmod(hour, 24)
    return f"202401{day + 1:02d}T{h:02d}0000Z"


def _s3(env: dict[str, str]) -> Any:
    import fsspec

    return fsspec.filesystem(
        "s3",
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": env["PCBO_S3_ENDPOINT_URL"], "region_name": "us-east-1"},
    )


def _tree(env: dict[str, str] | None, root: str) -> dict[str, bytes]:
    """Every file under a lake (an S3 prefix, or a local directory), by relative path."""
    if env is None:
        base = Path(root)
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}
    fs = _s3(env)
    fs.invalidate_cache()
    prefix = root.split("://", 1)[1]
    return {p[len(prefix) + 1 :]: fs.cat_file(p) for p in sorted(fs.find(prefix))}


def _store_chain(env: dict[str, str], url: str) -> list[dict[str, Any]]:
    fs = _s3(env)
    fs.invalidate_cache()
    base = url.split("://", 1)[1] + "/" + KEY
    names = sorted(p for p in fs.ls(base, detail=False) if p.rsplit("/", 1)[-1][0].isdigit())
    return [json.loads(fs.cat_file(p)) for p in names]


class Cluster:
    """Three worker "hosts" and what they share."""

    def __init__(self, root: Path, shared: dict[str, str], config_text: str) -> None:
        self.root, self.shared, self.config_text = root, shared, config_text
        self.workers: dict[str, subprocess.Popen] = {}

    def host_env(self, name: str) -> tuple[dict[str, str], Path]:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        (home / "datasets.yaml").write_text(self.config_text)  # each host its own copy of the config
        # Each host its own DAGSTER_HOME, as a container's or a machine's is: the same instance config
        # (PostgreSQL storage), nothing on disk shared with another host.
        dagster_home = home / "dagster_home"
        dagster_home.mkdir(exist_ok=True)
        (dagster_home / "dagster.yaml").write_bytes(
            (self.root / "dagster_home" / "dagster.yaml").read_bytes()
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PCBO_", "DAGSTER_"))}
        env.update(self.shared)
        env.update(
            {
                "PCBO_HOME": str(home / "pcbo"),
                "PCBO_AUDIT_CACHE_DIR": str(home / "audit-cache"),
                "PCBO_DATASETS_CONFIG": str(home / "datasets.yaml"),
                "DAGSTER_HOME": str(dagster_home),
                "PYTHONPATH": str(REPO_ROOT),
                "PYTHONUNBUFFERED": "1",
                "PYTHONFAULTHANDLER": "1",
            }
        )
        return env, home

    def start_worker(self, name: str) -> None:
        env, home = self.host_env(name)
        log = open(home / "worker.log", "ab")  # noqa: SIM115 - closed with the process
        argv = [
            executable("celery"), "-A", "pcbo_dagster.dagster_defs.celery_worker", "worker", "-Q", "dagster",
            "--pool", "solo", "--prefetch-multiplier", "1", "-n", f"{name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        self.workers[name] = subprocess.Popen(
            argv, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        for name in self.workers:
            log = self.root / name / "worker.log"
            while b"ready." not in (log.read_bytes() if log.exists() else b""):
                assert self.workers[name].poll() is None, self.logs()
                assert time.monotonic() < deadline, self.logs()
                time.sleep(0.2)

    def backfill(self, name: str, *args: str) -> subprocess.Popen[str]:
        """`range_runs` (the runs' coordinator) started on host `name`; its stdout is the runs' lines."""
        env, home = self.host_env(name)
        argv = [sys.executable, "-m", "pcbo_dagster.dagster_defs.range_runs", "events", "--no-checks", *args]
        return subprocess.Popen(
            argv, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip

    def received(self) -> dict[str, list[str]]:
        """The Celery task ids each worker received so far, in order."""
        return {
            name: re.findall(
                r"\[([0-9a-f-]{36})\] received", (self.root / name / "worker.log").read_text(errors="replace")
            )
            for name in self.workers
        }

    def served(self) -> dict[str, int]:
        return {
            name: (self.root / name / "worker.log").read_text(errors="replace").count("succeeded in")
            for name in self.workers
        }

    def logs(self) -> str:
        return "\n".join(
            f"----- {n} -----\n{(self.root / n / 'worker.log').read_text(errors='replace')[-3000:]}"
            for n in self.workers
        )

    def stop(self) -> None:
        for popen in self.workers.values():
            if popen.poll() is None:
                os.killpg(popen.pid, signal.SIGTERM)
        for popen in self.workers.values():
            try:
                popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=5)


@pytest.fixture(scope="module")
def source(s3_store) -> str:
    """The datasets config (its source a JSONL object on S3), the same for every test of this module."""
    fs = _s3(s3_store.env)
    uri = s3_store.url(f"src-{uuid.uuid4().hex[:8]}") + "/events.jsonl"
    fs.pipe_file(uri.split("://", 1)[1], b"".join(json.dumps(r).encode() + b"\n" for r in _records()))
    return yaml.safe_dump(_config(uri), sort_keys=False)


@pytest.fixture(scope="module")
def single_host_lake(source, s3_store, tmp_path_factory) -> dict[str, bytes]:
    """The same runs on one host: one after another in this process, on a local lake, SQLite catalog and
    audit directory (a manifest names its request's plan and decision hashes, so the runs must be the
    same ranges)."""
    import dagster as dg

    home = tmp_path_factory.mktemp("single")
    config = home / "datasets.yaml"
    config.write_text(source)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_store.env.items():
            mp.setenv(name, value)
        mp.setenv("PCBO_HOME", str(home / "pcbo"))
        for name in (
            "PCBO_LAKE_URL",
            "PCBO_CATALOG_URL",
            "PCBO_AUDIT_DIR",
            "PCBO_MULTI_HOST",
            "PCBO_EXECUTOR",
        ):
            mp.delenv(name, raising=False)
        started = time.monotonic()
        with dg.instance_for_test() as instance:
            for hour in range(0, HOURS, PER_RUN):
                first, last = _key(hour), _key(min(hour + PER_RUN, HOURS) - 1)
                assert materialize_range(config, "events", first, last, instance).success
        took = time.monotonic() - started
    print("SINGLE_HOST_BENCH " + json.dumps({"partitions": HOURS, "seconds": round(took, 2)}))
    return _tree(None, str(home / "pcbo" / "lake"))


@pytest.fixture
def cluster(tmp_path, source, s3_store, redis_url, postgres_server, fresh_postgres_url):
    tag = uuid.uuid4().hex[:8]
    dagster_db = postgres_server.create_database("pcbo_dagster")
    shared = {
        **s3_store.env,
        "PCBO_LAKE_URL": s3_store.url(f"lake-{tag}"),
        "PCBO_CATALOG_URL": fresh_postgres_url,
        "PCBO_AUDIT_DIR": s3_store.url(f"pas-{tag}"),
        "PCBO_MULTI_HOST": "true",
        "PCBO_EXECUTOR": "celery",
        "PCBO_CELERY_BROKER": fresh_database(redis_url),  # nothing left over
        "PCBO_CELERY_KEY": RESULT_KEY,  # every host's: the steps' results are signed with it
        # A bound on each step's wait, far below the default day: genuine steps (a killed worker's
        # redelivered one too) finish within it.
        "PCBO_CELERY_STEP_TIMEOUT": "180",
        "PCBO_PARALLEL": "1",
        # A killed worker's step comes back after this; its lease is taken over after the TTL.
        "PCBO_CELERY_VISIBILITY_TIMEOUT": "15",
        "PCBO_CELERY_RESTORE_INTERVAL": "2",
        "PCBO_LEASE_TTL_SECONDS": "6",
    }
    home = tmp_path / "dagster_home"
    home.mkdir()
    # dagster-postgres needs psycopg2 (test_dagster_postgres_instance.py says why)
    pg = postgres_server.url(dagster_db).replace("postgresql+psycopg://", "postgresql+psycopg2://")
    instance = {"storage": {"postgres": {"postgres_url": pg}}, "telemetry": {"enabled": False}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
    nodes = Cluster(tmp_path, shared, source)
    try:
        yield nodes
    except BaseException:
        print(nodes.logs())
        raise
    finally:
        nodes.stop()
        postgres_server.drop_database(dagster_db)


def _finish(
    cluster: Cluster, coordinator: subprocess.Popen[str], timeout: float = 240
) -> list[dict[str, str]]:
    try:
        out, err = coordinator.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(coordinator.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: its threads' stacks on stderr
        out, err = coordinator.communicate()
        raise AssertionError(
            f"backfill did not finish in {timeout} s\n{err[-4000:]}\n{cluster.logs()}"
        ) from None
    assert coordinator.returncode == 0, f"{out}\n{err[-6000:]}\n{cluster.logs()}"
    return [json.loads(line) for line in out.splitlines()]


def _assert_as_one_host_would(cluster: Cluster, single: dict[str, bytes]) -> None:
    """One linear chain with exactly one commit event per partition, a lake whose data files are
    byte-identical to the same runs on one host, and `pcbo verify` from a fresh directory clean."""
    events = _store_chain(cluster.shared, cluster.shared["PCBO_AUDIT_DIR"])
    assert verify_chain(events, KEY) == []
    commits = [e["partition"]["key"] for e in events if e["event_type"] == "partition_committed"]
    assert len(commits) == len(set(commits)) == HOURS
    assert len({e["event_id"] for e in events}) == len(events)
    lake = _tree(cluster.shared, cluster.shared["PCBO_LAKE_URL"])
    # Same files; data files byte-identical; manifests identical but for the run that wrote them (the
    # manifest names its Dagster run) and what follows from it (a rollback manifest's checksum of it).
    assert sorted(lake) == sorted(single)
    data = [k for k in lake if k.endswith(".parquet")]
    assert len(data) == HOURS and [k for k in data if lake[k] != single[k]] == []
    for k in set(lake) - set(data):
        ours, theirs = json.loads(lake[k]), json.loads(single[k])
        for field in ("runId", "undoesManifestChecksum", "previousManifestChecksum"):
            ours.pop(field, None), theirs.pop(field, None)
        assert ours == theirs, k
    env, home = cluster.host_env("auditor")
    verified = subprocess.run(
        [executable("pcbo"), "verify"], cwd=home, env=env, capture_output=True, text=True, timeout=300
    )
    assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-3000:]
    report = json.loads(verified.stdout)
    assert report["status"] == "clean" and report["checked"]["chains"] == {KEY: len(events)}


def test_celery_workers_backfill_as_one_host_would(cluster, single_host_lake):
    for n in range(WORKERS):
        cluster.start_worker(f"host-{n + 1}")
    cluster.wait_ready()
    started = time.monotonic()
    runs = _finish(cluster, cluster.backfill("coordinator", "--coordinators", str(WORKERS)))
    took = time.monotonic() - started
    assert len(runs) == -(-HOURS // PER_RUN) and all(r["success"] == "true" for r in runs)
    # The steps ran on the workers (each one its own "host"), not in the coordinator, and on both:
    # each run's four ops (policy gate, parquet emission, audit chain append, reconciliation).
    served = cluster.served()
    assert sum(served.values()) == 4 * len(runs) and all(served.values()), served
    _assert_as_one_host_would(cluster, single_host_lake)
    print(f"celery backfill: {len(runs)} runs, {HOURS} partitions in {took:.1f} s; steps per worker {served}")
    figures = {"workers": WORKERS, "partitions": HOURS, "runs": len(runs), "seconds": round(took, 2)}
    print("CELERY_BENCH " + json.dumps({**figures, "served": served}))


def test_the_steps_of_one_run_on_two_hosts_each_with_its_own_dagster_home(cluster):
    """A run's first step(s) on one host, the rest on another, each host with its own DAGSTER_HOME (the
    same PostgreSQL instance, no disk shared). The steps pass their handles through the Dagster
    instance's database; before, through Dagster's default IO manager, pickles under the DAGSTER_HOME
    of the host that ran the step, so the next step on another host failed (`FileNotFoundError:
    .../dagster_home/storage/<run>/events.events__policy_gate/result`) and the run failed after
    emission, its partitions committed without their audit events."""
    cluster.start_worker("host-1")
    cluster.wait_ready()
    coordinator = cluster.backfill("coordinator", "--last", _key(PER_RUN - 1))
    deadline = time.monotonic() + 120
    while cluster.served()["host-1"] == 0:  # the policy gate ran on host-1
        assert time.monotonic() < deadline and coordinator.poll() is None, cluster.logs()
        time.sleep(0.05)
    os.killpg(cluster.workers["host-1"].pid, signal.SIGTERM)  # a warm shutdown: its step in hand ends
    cluster.workers["host-1"].wait(timeout=120)
    cluster.start_worker("host-2")
    runs = _finish(cluster, coordinator)
    assert [r["success"] for r in runs] == ["true"], runs
    served = cluster.served()
    assert served["host-1"] >= 1 and served["host-2"] >= 1 and sum(served.values()) == 4, served
    env, home = cluster.host_env("auditor")
    verified = subprocess.run(
        [executable("pcbo"), "verify"], cwd=home, env=env, capture_output=True, text=True, timeout=300
    )
    assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-3000:]
    assert json.loads(verified.stdout)["checked"]["partitions"] == PER_RUN


def _first_received(cluster: Cluster, timeout: float = 90) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, ids in cluster.received().items():
            if ids:
                return name, ids[0]
        time.sleep(0.05)
    raise AssertionError(f"no worker received a step\n{cluster.logs()}")


TRIALS = range(int(os.environ.get("CELERY_KILL_TRIALS", "1")))  # more trials: CELERY_KILL_TRIALS=5


@pytest.mark.parametrize("trial", TRIALS)
def test_kill_9_of_the_worker_running_a_step(cluster, single_host_lake, trial):
    """The worker that took the first step is killed (SIGKILL, its whole process group) at a random
    instant of it: the unacknowledged step goes back on the queue after the visibility timeout, the other
    worker runs it (taking over the dead worker's dataset lease once its TTL passed), and the backfill
    converges to the same lake."""
    seed = int(os.environ.get("PCBO_KILL_SEED", random.randrange(1 << 30)))
    delay = random.Random(seed).uniform(0.3, 2.5)
    for name in ("host-1", "host-2"):
        cluster.start_worker(name)
    cluster.wait_ready()
    coordinator = cluster.backfill("coordinator")
    victim, task = _first_received(cluster)
    time.sleep(delay)
    mid_step = cluster.served()[victim] == 0
    os.killpg(cluster.workers[victim].pid, signal.SIGKILL)
    cluster.workers[victim].wait(timeout=10)
    runs = _finish(cluster, coordinator)
    assert len(runs) == -(-HOURS // PER_RUN) and all(r["success"] == "true" for r in runs)
    survivor = next(n for n in cluster.workers if n != victim)
    if mid_step:  # the killed step was delivered again, to the survivor
        assert task in cluster.received()[survivor], cluster.logs()
    _assert_as_one_host_would(cluster, single_host_lake)
    print(f"kill -9 of {victim} {delay:.2f} s into task {task} (seed {seed}, mid-step {mid_step})")


@pytest.mark.parametrize("trial", TRIALS)
def test_kill_9_of_the_coordinator(cluster, single_host_lake, trial):
    """The process coordinating the runs is killed at a random instant after the first step went out;
    the runs it left behind stay as they are (their steps may still finish on a worker), and the
    backfill launched again converges to the same lake."""
    seed = int(os.environ.get("PCBO_KILL_SEED", random.randrange(1 << 30)))
    delay = random.Random(seed).uniform(0.3, 3.0)
    for name in ("host-1", "host-2"):
        cluster.start_worker(name)
    cluster.wait_ready()
    coordinator = cluster.backfill("coordinator", "--coordinators", "2")
    _first_received(cluster)
    time.sleep(delay)
    os.killpg(coordinator.pid, signal.SIGKILL)
    coordinator.wait(timeout=10)
    runs = _finish(cluster, cluster.backfill("coordinator-2", "--coordinators", "2"))
    assert len(runs) == -(-HOURS // PER_RUN) and all(r["success"] == "true" for r in runs)
    _assert_as_one_host_would(cluster, single_host_lake)
    print(f"kill -9 of the coordinator {delay:.2f} s after the first step went out (seed {seed})")


def test_the_executor_is_chosen_by_the_environment():
    import dagster as dg

    from pcbo_dagster.core.errors import InvalidInput
    from pcbo_dagster.dagster_defs.definitions import executor_from_env

    assert executor_from_env({}) is dg.in_process_executor
    assert executor_from_env({"PCBO_EXECUTOR": "default"}) is dg.in_process_executor
    celery = {"PCBO_EXECUTOR": "celery", "PCBO_CELERY_KEY": RESULT_KEY}
    executor = executor_from_env({**celery, "PCBO_CELERY_BROKER": "redis://127.0.0.1:1/0"})
    assert executor is not None and executor.name == "pcbo_celery"
    with pytest.raises(InvalidInput) as refused:
        executor_from_env(celery)
    assert refused.value.field == "PCBO_CELERY_BROKER"
    with pytest.raises(InvalidInput) as refused:
        executor_from_env({"PCBO_EXECUTOR": "yarn"})
    assert refused.value.field == "PCBO_EXECUTOR"


def test_workers_acknowledge_a_step_when_it_ends():
    """The settings a worker needs for a killed worker's step to come back (the worker's app, not only
    the executor's: acknowledgement and restoring happen on the consumer's side)."""
    from pcbo_dagster.core.errors import InvalidInput
    from pcbo_dagster.dagster_defs.celery_config import celery_settings

    settings = celery_settings({})
    assert settings["task_acks_late"] and settings["task_reject_on_worker_lost"]
    assert settings["worker_prefetch_multiplier"] == 1
    assert settings["broker_transport_options"] == {
        "visibility_timeout": 3600,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    }
    short = celery_settings({"PCBO_CELERY_VISIBILITY_TIMEOUT": "15", "PCBO_CELERY_RESTORE_INTERVAL": "2"})
    assert short["broker_transport_options"]["visibility_timeout"] == 15
    assert short["broker_transport_options"]["unacked_restore_interval"] == 2
    with pytest.raises(InvalidInput) as refused:
        celery_settings({"PCBO_CELERY_VISIBILITY_TIMEOUT": "0"})
    assert refused.value.field == "PCBO_CELERY_VISIBILITY_TIMEOUT"
    script = (
        "from pcbo_dagster.dagster_defs.celery_worker import app; c = app.conf; "
        "print(c.task_acks_late, c.task_reject_on_worker_lost, c.broker_url, 'execute_plan' in app.tasks)"
    )
    env = {**os.environ, "PCBO_CELERY_BROKER": "redis://127.0.0.1:1/3", "PCBO_CELERY_KEY": RESULT_KEY}
    shown = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.stdout.split() == ["True", "True", "redis://127.0.0.1:1/3", "True"], shown.stderr[-2000:]
    # A worker refuses to start without a broker, or without the key its results are signed with.
    for variable in ("PCBO_CELERY_KEY", "PCBO_CELERY_BROKER"):
        env.pop(variable)
        refused_worker = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        # red-team finding: the refusal came with a whole Python traceback; now one line, exit 2
        assert refused_worker.returncode == 2, refused_worker.stderr
        line = refused_worker.stderr
        assert (
            line.startswith(f"pcbo celery worker: invalid input: {variable}: ") and line.count("\n") == 1
        ), line
    started = subprocess.run(  # as a worker is started: `celery -A ... worker`, no key
        [executable("celery"), "-A", "pcbo_dagster.dagster_defs.celery_worker", "worker"],
        env={**env, "PCBO_CELERY_BROKER": "redis://127.0.0.1:1/3"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 2 and "Traceback" not in started.stderr, started.stderr
    assert "pcbo celery worker: invalid input: PCBO_CELERY_KEY: " in started.stderr, started.stderr

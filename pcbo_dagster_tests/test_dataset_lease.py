"""The catalog's write lease: no two runs write one dataset version at once, across hosts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.catalog.database import HEAD_REVISION, MIGRATIONS_DIR
from pcbo_dagster_tests.cli_runner import run_pcbo, run_pcbo_in_process


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    if request.param == "postgres":
        url = request.getfixturevalue("fresh_postgres_url")
    catalog = CatalogStore(url)
    catalog.migrate()
    yield catalog
    catalog.close()


def test_head_revision_constant_is_alembic_head() -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD_REVISION


def test_a_held_lease_is_refused_to_others_until_released(store: CatalogStore) -> None:
    assert store.try_acquire_lease("events", "v1", "A", 60) is None
    held = store.try_acquire_lease("events", "v1", "B", 60)
    assert held is not None and held["holder"] == "A"
    assert store.try_acquire_lease("events", "v1", "A", 60) is None  # renewal by the holder
    assert store.try_acquire_lease("events", "v2", "B", 60) is None  # another version is free
    store.release_lease("events", "v1", "B")  # not B's: no effect
    held = store.try_acquire_lease("events", "v1", "B", 60)
    assert held is not None and held["holder"] == "A"
    store.release_lease("events", "v1", "A")
    assert store.try_acquire_lease("events", "v1", "B", 60) is None


def test_an_expired_or_dead_holder_is_taken_over(store: CatalogStore) -> None:
    assert store.try_acquire_lease("events", "v1", "A", -1) is None  # already expired
    assert store.try_acquire_lease("events", "v1", "B", 60) is None
    held = store.try_acquire_lease("events", "v1", "C", 60)
    assert held is not None and held["holder"] == "B"
    assert store.try_acquire_lease("events", "v1", "C", 60, is_stale=lambda holder: holder == "B") is None
    held = store.try_acquire_lease("events", "v1", "B", 60)
    assert held is not None and held["holder"] == "C"


@pytest.mark.slow
def test_execute_waits_for_another_hosts_run_then_refuses_writing_nothing(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from generate_request import make_request

    request = tmp_path / "req.json"
    request.write_text(json.dumps(make_request(records=60, partitions=3, run_id="lease-run")))
    home = tmp_path / "home"
    catalog = CatalogStore(f"sqlite:///{home / 'catalog.db'}")
    catalog.migrate()
    other = json.dumps({"run": "other-run", "pid": 1, "host": "another-host", "token": "x"}, sort_keys=True)
    assert catalog.try_acquire_lease("events", "v1", other, 600) is None

    busy = run_pcbo_in_process(
        ["execute", "--input", str(request)], home=home, env={"PCBO_LEASE_WAIT_SECONDS": "1"}
    )
    assert busy.status == 1
    assert "other-run" in busy.stderr and "another-host" in busy.stderr
    assert not list(home.rglob("_manifest.json"))
    assert not (home / "pas" / "events" / "v1.jsonl").exists()

    catalog.release_lease("events", "v1", other)
    done = run_pcbo_in_process(["execute", "--input", str(request)], home=home)
    assert done.status == 0, done.stderr
    assert done.document["status"] == "committed"
    assert catalog.try_acquire_lease("events", "v1", "probe", 1) is None  # released after the run
    catalog.close()


def test_execute_waits_for_a_run_on_this_host_only_as_long_as_the_lease_wait_then_refuses(
    tmp_path: Path,
) -> None:
    """A run on this host (sharing the audit backup, so its file lock too) holds the dataset version:
    a second execute waits PCBO_LEASE_WAIT_SECONDS for it, as for another host's run, then exits 1
    naming the holder and writing nothing; it never waits on the file lock for as long as the other
    run lasts (the README's *Concurrent runs*, and the HTTP API's 503 `dataset_busy`)."""
    import time

    from pcbo_dagster_tests.cli_runner import holding_dataset_lock

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from generate_request import make_request

    request = tmp_path / "req.json"
    request.write_text(json.dumps(make_request(records=60, partitions=3, run_id="second-run")))
    home = tmp_path / "home"
    with holding_dataset_lock(home, "events", "v1", "holding-run"):
        started = time.monotonic()  # (a subprocess: its timeout bounds a wait on the file lock)
        busy = run_pcbo(
            ["execute", "--input", str(request)], home=home, env={"PCBO_LEASE_WAIT_SECONDS": "1"}, timeout=60
        )
        waited = time.monotonic() - started
        assert busy.status == 1, busy.stderr
        assert "holding-run" in busy.stderr and "PCBO_LEASE_WAIT_SECONDS" in busy.stderr, busy.stderr
        assert waited < 30, waited
        assert not list(home.rglob("_manifest.json"))
        assert not (home / "pas" / "events" / "v1.jsonl").exists()
    done = run_pcbo_in_process(["execute", "--input", str(request)], home=home)
    assert done.status == 0, done.stderr
    assert done.document["status"] == "committed"


def test_the_heartbeat_keeps_a_lease_past_its_ttl_and_a_silent_holder_loses_it(
    store: CatalogStore, monkeypatch
) -> None:
    """Issue 14: runs on other hosts take over a lease only once its holder stopped renewing it."""
    import time

    from pcbo_dagster.engine.environment import DatasetBusy, DatasetLease

    monkeypatch.setenv("PCBO_LEASE_TTL_SECONDS", "1.5")
    held = DatasetLease(store, "events", "v1", "run-a")
    held.acquire(0)
    time.sleep(2.5)  # past the TTL: the heartbeat renewed it
    assert store.try_acquire_lease("events", "v1", "other", 1.5) is not None
    held.renew()
    held._stop.set()  # the holder goes silent (a host that froze or died far away)
    assert held._heartbeat is not None
    held._heartbeat.join()
    time.sleep(2)
    taker = DatasetLease(store, "events", "v1", "run-b")
    taker.acquire(5)
    with pytest.raises(DatasetBusy, match="taken over"):
        held.renew()
    taker.release()


def _race(url: str, contenders: int, ttl: float) -> list[dict | None]:
    """`contenders` threads, each with its own catalog connection, asking for one lease at once."""
    import threading

    barrier = threading.Barrier(contenders)
    answers: list[dict | None] = [None] * contenders
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        catalog = CatalogStore(url)
        try:
            catalog.try_acquire_lease("events", "v1", "warm-up", 60)  # connect before the race
            catalog.release_lease("events", "v1", "warm-up")
            barrier.wait()
            answers[i] = catalog.try_acquire_lease("events", "v1", f"host-{i}", ttl)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            catalog.close()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return answers


def test_many_hosts_asking_at_once_get_one_lease(store: CatalogStore) -> None:
    """Red-team findings (PostgreSQL): the first lease of a dataset version raised IntegrityError in
    every contender but one, and an expired lease was taken over by two or three contenders at once
    (an unlocked read, and an update whose row count was not checked), each then writing the same
    versions. Exactly one contender takes it, the others are told who holds it."""
    url = str(store.engine.url.render_as_string(hide_password=False))
    store.close()
    for trial in range(5):
        fresh = CatalogStore(url)
        with fresh.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM dataset_leases")
        if trial % 2:  # an expired lease left behind by a host that died
            assert fresh.try_acquire_lease("events", "v1", "dead-host", -1) is None
        fresh.close()
        answers = _race(url, 4, 60)
        winners = [i for i, answer in enumerate(answers) if answer is None]
        assert len(winners) == 1, (trial, answers)
        assert {a["holder"] for a in answers if a is not None} == {f"host-{winners[0]}"}


def test_a_holder_is_judged_dead_only_in_its_own_process_space(monkeypatch) -> None:
    """Red-team finding: a live holder in another pid namespace (a container with the host's name)
    was judged dead because its pid did not exist here, and its lease taken over while it wrote."""
    import socket

    from pcbo_dagster.engine import environment

    space = environment._process_space()
    assert space is not None  # Linux: the boot id and the pid namespace
    gone = 2**22 + 12345  # beyond pid_max: no such process
    mine = {"run": "r", "pid": gone, "host": socket.gethostname(), "token": "t"}
    assert environment._holder_is_dead(json.dumps({**mine, "space": space}))
    assert not environment._holder_is_dead(json.dumps({**mine, "space": "another-boot:pid:[1]"}))
    assert not environment._holder_is_dead(json.dumps(mine))  # says nothing of where: wait for expiry
    assert not environment._holder_is_dead(json.dumps({**mine, "space": space, "host": "elsewhere"}))
    alive = {**mine, "pid": __import__("os").getpid(), "space": space}
    assert not environment._holder_is_dead(json.dumps(alive))


def test_a_lease_taken_over_and_given_back_is_lost_to_its_old_holder(
    store: CatalogStore, monkeypatch
) -> None:
    """A holder frozen past its lease while another (a run that then crashed or finished, a `pcbo gc`)
    took it over and gave it back: its renewal does not take the free lease again as its own."""
    import time

    from pcbo_dagster.engine.environment import DatasetBusy, DatasetLease

    monkeypatch.setenv("PCBO_LEASE_TTL_SECONDS", "1")
    held = DatasetLease(store, "events", "v1", "run-a")
    held.acquire(0)
    held._stop.set()  # frozen: its heartbeat with it
    assert held._heartbeat is not None
    held._heartbeat.join()
    time.sleep(1.5)
    taker = DatasetLease(store, "events", "v1", None)
    taker.acquire(5)
    taker.release()
    assert store.leases() == []
    with pytest.raises(DatasetBusy, match="taken over"):
        held.renew()
    assert store.leases() == []


@pytest.mark.postgres
def test_a_lease_row_held_locked_is_waited_for_only_as_long_as_a_lease(
    fresh_postgres_url, monkeypatch
) -> None:
    """Red-team finding: a session holding the lease row locked (`SELECT … FOR UPDATE` by hand, or
    a contender stuck inside its transaction) made a run wait on the row lock for as long as that
    lasted, past `PCBO_LEASE_WAIT_SECONDS`; the run gives up within its wait as for a held lease."""
    import threading

    import psycopg
    from sqlalchemy.engine import make_url

    from pcbo_dagster.engine.environment import DatasetBusy, DatasetLease

    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    assert store.try_acquire_lease("events", "v1", "crashed", -1) is None  # an expired lease row
    conninfo = make_url(fresh_postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as holder:
        holder.execute("SELECT 1 FROM dataset_leases FOR UPDATE")  # held until the block ends
        outcome: list[BaseException | None] = []

        def take() -> None:
            try:
                DatasetLease(store, "events", "v1", "run-b").acquire(1)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - checked below
                outcome.append(exc)

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        taker.join(60)  # a bound on a hang, not a measurement: the wait asked for is 1 s
        still_waiting = taker.is_alive()
        holder.rollback()
    taker.join()
    store.close()
    assert not still_waiting, "the run waited on the locked lease row past PCBO_LEASE_WAIT_SECONDS"
    assert len(outcome) == 1 and isinstance(outcome[0], DatasetBusy), outcome
    assert "locked" in str(outcome[0]), outcome[0]


@pytest.mark.parametrize(
    "holder",
    [
        "https://admin:hunter2@evil.example/x?sig=s3cret \x1b[2J" + "A" * 5000,
        '{"run": 7, "pid": "x"}',
        '["run", "a"]',
    ],
)
def test_a_lease_holder_pcbo_did_not_write_is_said_to_be_so(store, holder) -> None:
    """Red-team finding: a lease row whose holder text pcbo did not write (anyone who can write the
    catalog can put one there) was shown as `run None (pid None on None)`; the message now says the
    holder is not one pcbo wrote and quotes it, scrubbed of credentials and bounded."""
    from pcbo_dagster.engine.environment import DatasetBusy, DatasetLease

    assert store.try_acquire_lease("events", "v1", holder, 600) is None
    with pytest.raises(DatasetBusy) as raised:
        DatasetLease(store, "events", "v1", "run-b").acquire(0)
    message = str(raised.value)
    assert "None" not in message and "not one pcbo wrote" in message, message
    assert "hunter2" not in message and "s3cret" not in message, message
    assert len(message) < 700, message
    assert repr(holder[:20])[1:-1] in message or "[redacted]" in message, message


@pytest.mark.postgres
def test_a_host_frozen_inside_a_lease_transaction_holds_the_lease_row_no_longer_than_its_ttl(
    fresh_postgres_url: str,
) -> None:
    """A host stopped (SIGSTOP, a VM paused) between its heartbeat's UPDATE of the lease row and its
    COMMIT kept the row locked for as long as it stayed stopped: every other host's run or `gc` waited
    its whole `PCBO_LEASE_WAIT_SECONDS` (default 600 s) on it, then gave up, though the lease had
    expired long before. PostgreSQL now ends a session left idle inside a lease transaction for the
    lease's TTL (`idle_in_transaction_session_timeout`), its row lock with it: the lease is taken over."""
    import threading
    import time

    from sqlalchemy import event

    frozen_host, other_host = CatalogStore(fresh_postgres_url), CatalogStore(fresh_postgres_url)
    frozen_host.migrate()
    try:
        assert frozen_host.try_acquire_lease("events", "v1", "host-a", 2) is None
        stopped, woken = threading.Event(), threading.Event()

        @event.listens_for(frozen_host.engine, "after_cursor_execute")
        def _stop_after_the_update(conn, cursor, statement, parameters, context, executemany) -> None:
            if statement.lstrip().upper().startswith("UPDATE DATASET_LEASES"):
                stopped.set()
                woken.wait(60)  # the host is stopped here, its transaction open, the row locked

        outcome: list[object] = []

        def heartbeat() -> None:
            try:
                outcome.append(frozen_host.renew_lease("events", "v1", "host-a", 2))
            except Exception as exc:  # noqa: BLE001 - what the woken host meets is recorded
                outcome.append(exc)

        beat = threading.Thread(target=heartbeat)
        beat.start()
        assert stopped.wait(30)
        started = time.monotonic()
        taken = other_host.try_acquire_lease("events", "v1", "host-b", 60, lock_wait_seconds=30)
        waited = time.monotonic() - started
        woken.set()
        beat.join(30)
        assert taken is None, taken  # taken over, not ROW_LOCKED after the whole wait
        assert waited < 20, waited
        held = frozen_host.try_acquire_lease("events", "v1", "host-a", 2)
        assert held is not None and held["holder"] == "host-b", held
        assert outcome and outcome[0] is not True, outcome  # the woken host's renewal did not hold
    finally:
        frozen_host.close()
        other_host.close()

"""SQL targets (issue 15) under crashes and concurrency, with real `pcbo` processes: kill -9 in the
middle of an apply and resume to the same table an uninterrupted run gives; a changed request refused
on resume; the crash windows of the apply and of the rollback completed by `verify --repair` or by
running the rollback again; runs on one table queued first come first served while a run on another
table goes on (PostgreSQL advisory locks), and the SQLite ticket queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pcbo_dagster_tests.cli_runner import pcbo_env, run_pcbo
from pcbo_dagster_tests.sql_target_helpers import (
    conninfo,
    create_table,
    dump,
    pcbo,
    query,
    record,
    request,
    run_sql,
    sqlite_url,
    write_json,
)

SLOW_INSERTS = """
CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.03); RETURN NEW; END $$;
CREATE TRIGGER slow_insert BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION slow_insert();
"""


def _start(args: list, home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pcbo_dagster.cli.main", *map(str, args)],
        env=pcbo_env(home),
        cwd=home.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _stdout(proc: subprocess.Popen) -> bytes:
    """All a process started by `_start` printed (its stdout is a pipe)."""
    assert proc.stdout is not None
    return proc.stdout.read()


def _wait_for(condition, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.postgres
@pytest.mark.slow
def test_kill_9_mid_apply_then_resume_gives_the_uninterrupted_table(tmp_path: Path, postgres_server) -> None:
    killed_url, reference_url = (
        postgres_server.url(postgres_server.create_database("pcbo_sqlkill")) for _ in "ab"
    )
    for url in (killed_url, reference_url):
        create_table(url)
        run_sql(
            url,
            "INSERT INTO events (id, occurred_at, amount, label) "
            "VALUES ('ev-0007', '2024-01-01T03:07:00Z', 70, 'x')",
        )
    run_sql(killed_url, SLOW_INSERTS)
    records = [record(i) for i in range(1, 81)]
    req = request(killed_url, records, conflict="overwrite", chunkRows=5)
    path = write_json(tmp_path / "req.json", req)
    home = tmp_path / "home"
    proc = _start(["execute", "--input", path], home)

    def checkpoints() -> int:
        try:
            return query(killed_url, "SELECT count(*) FROM pcbo_checkpoints")[0][0]
        except psycopg.Error:
            return 0

    _wait_for(lambda: checkpoints() >= 3 or proc.poll() is not None, what="three checkpoints")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = checkpoints()
    assert 3 <= done < 16, f"killed after {done} of 16 chunks"

    found = pcbo(["verify", "--home", home, "--target-url", killed_url])
    assert "sql_apply_interrupted" in {f["kind"] for f in found.document["findings"]}

    changed = request(
        killed_url, [*records[:-1], {**records[-1], "amount": 1}], conflict="overwrite", chunkRows=5
    )
    refused = pcbo(["execute", "--input", write_json(tmp_path / "changed.json", changed), "--home", home])
    assert refused.status == 3 and refused.document["gate"] == "resume", refused.stderr
    assert checkpoints() == done

    resumed = pcbo(["execute", "--input", path, "--home", home])
    assert resumed.status == 0, resumed.stderr
    assert any(p.get("resumed") for p in resumed.document["partitions"])
    reference_req = {**req, "target": {**req["target"], "url": reference_url}}
    reference_path = write_json(tmp_path / "ref.json", reference_req)
    reference = pcbo(["execute", "--input", reference_path, "--home", tmp_path / "ref"])
    assert reference.status == 0, reference.stderr
    assert dump(killed_url) == dump(reference_url)
    assert query(killed_url, "SELECT count(*) FROM pcbo_checkpoints")[0][0] == 16
    # The resumed run's evidence is the uninterrupted run's: the same Merkle roots and decisions.
    roots = lambda doc: {p["key"]: (p["merkleRoot"], p["recordCount"]) for p in doc["partitions"]}  # noqa: E731
    assert roots(resumed.document) == roots(reference.document)
    assert resumed.document["policyDecisionHash"] == reference.document["policyDecisionHash"]
    verified = pcbo(["verify", "--home", home, "--target-url", killed_url])
    assert verified.status == 0, verified.document


def test_crash_windows_of_apply_and_rollback_are_completed(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    before = dump(url)
    home = tmp_path / "home"
    path = write_json(tmp_path / "req.json", request(url, [record(i) for i in range(1, 13)], chunkRows=2))
    crashed = run_pcbo(["execute", "--input", path], home=home, env={"PCBO_FAILPOINT": "sql_before_event@1"})
    assert crashed.status == 86, crashed.stderr
    found = pcbo(["verify", "--home", home])
    assert [f["kind"] for f in found.document["findings"]] == ["sql_apply_event_missing"]
    repaired = pcbo(["verify", "--home", home, "--repair"])
    assert repaired.status == 0, repaired.document
    assert [r["kind"] for r in repaired.document["repaired"]] == ["sql_apply_event_appended"]
    assert pcbo(["verify", "--home", home, "--repair"]).document["repaired"] == []
    finished = pcbo(["execute", "--input", path, "--home", home])
    assert finished.status == 0
    assert [p["status"] for p in finished.document["partitions"]] == [
        "unchanged",
        "unchanged",
        "applied",
        "applied",
    ]
    assert query(url, "SELECT count(*) FROM events") == [(12,)]

    # A rollback killed after its restoring transaction committed: run it again to complete it.
    args = ["rollback", "--dataset", "events", "--run-id", "run-1"]
    crashed = run_pcbo(args, home=home, env={"PCBO_FAILPOINT": "sql_rollback_after_restore@0"})
    assert crashed.status == 86, crashed.stderr
    assert dump(url) == before
    assert {f["kind"] for f in pcbo(["verify", "--home", home]).document["findings"]} == {
        "sql_rollback_event_missing"
    }
    again = pcbo([*args, "--home", home])
    assert again.status == 0 and again.document["status"] == "noop"
    assert {h["kind"] for h in again.document["healed"]} == {"sql_rollback_event_appended"}
    assert pcbo(["verify", "--home", home]).status == 0


@pytest.mark.parametrize(
    "failpoint", ["sql_after_intent@1", "sql_after_chunk@0", "sql_after_chunk@1", "sql_before_event@2"]
)
def test_a_crash_at_each_failpoint_resumes_to_the_uninterrupted_table(tmp_path: Path, failpoint: str) -> None:
    """The checks a resume makes of the checkpoints it goes past (against the journal and the intent)
    let every genuine crash through: inserts, an update and an equal row, two chunks a partition."""
    dumps = {}
    for name in ("reference", "killed"):
        url = sqlite_url(tmp_path / name / "target.db")
        create_table(url)
        run_sql(
            url,
            "INSERT INTO events (id, occurred_at, amount, label) VALUES "
            "('ev-0002', '2024-01-01T02:02:00Z', 2, 'x'), ('ev-0003', '2024-01-01T03:03:00Z', 99, 'x')",
        )
        before = dump(url)
        home = tmp_path / name / "home"
        req = request(url, [record(i) for i in range(1, 13)], chunkRows=2, conflict="overwrite")
        path = write_json(tmp_path / name / "req.json", req)
        if name == "killed":
            crashed = run_pcbo(["execute", "--input", path], home=home, env={"PCBO_FAILPOINT": failpoint})
            assert crashed.status == 86, crashed.stderr
        run = pcbo(["execute", "--input", path, "--home", home])
        assert run.status == 0, run.stderr
        if name == "reference":
            assert (run.document["totals"]["updated"], run.document["totals"]["skipped"]) == (1, 1)
        assert pcbo(["verify", "--home", home]).status == 0
        dumps[name] = dump(url)
        rolled = pcbo(["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"])
        assert rolled.status == 0 and dump(url) == before
        assert pcbo(["verify", "--home", home]).status == 0
    assert dumps["killed"] == dumps["reference"]


def test_a_row_the_cut_short_run_wrote_and_someone_changed_since_refuses_the_resume_first(
    tmp_path: Path,
) -> None:
    """Red-team finding: a row a run killed mid-partition had already written, changed by someone
    before the resume, went unseen until the end (the run decides against the table as it was before
    it): the resume wrote the partition's remaining chunks, then failed its read-back (exit 1). It is
    now refused before anything more is written (exit 3, `gate: resume`, naming the row), as a change
    to a row the partition has yet to write is; the row put back, the run resumes and rolls back."""
    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    before = dump(url)
    home = tmp_path / "home"
    path = write_json(tmp_path / "req.json", request(url, [record(i) for i in range(1, 13)], chunkRows=2))
    crashed = run_pcbo(["execute", "--input", path], home=home, env={"PCBO_FAILPOINT": "sql_after_chunk@0"})
    assert crashed.status == 86, crashed.stderr
    assert [r[0] for r in query(url, "SELECT id FROM events ORDER BY id")] == ["ev-0004", "ev-0008"]
    run_sql(url, "UPDATE events SET amount = 777 WHERE id = 'ev-0008'")
    changed = dump(url)
    resumed = pcbo(["execute", "--input", path, "--home", home])
    assert resumed.status == 3, resumed.stderr
    assert resumed.document["gate"] == "resume" and "ev-0008" in resumed.document["reason"]
    assert dump(url) == changed  # nothing more written
    refused = pcbo(["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"])
    assert refused.status == 1 and "sql_rows_changed_since" in refused.stderr  # not written over
    run_sql(url, "UPDATE events SET amount = 8 WHERE id = 'ev-0008'")  # put back as the run wrote it
    done = pcbo(["execute", "--input", path, "--home", home])
    assert done.status == 0 and done.document["totals"]["inserted"] == 12, done.stderr
    assert pcbo(["verify", "--home", home]).status == 0
    rolled = pcbo(["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"])
    assert rolled.status == 0, rolled.stderr
    assert dump(url) == before


def test_a_rollback_killed_after_its_intent_is_done_again(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    before = dump(url)
    home = tmp_path / "home"
    path = write_json(tmp_path / "req.json", request(url, [record(i) for i in range(1, 5)]))
    assert pcbo(["execute", "--input", path, "--home", home]).status == 0
    args = ["rollback", "--dataset", "events", "--run-id", "run-1"]
    crashed = run_pcbo(args, home=home, env={"PCBO_FAILPOINT": "sql_rollback_after_intent@0"})
    assert crashed.status == 86
    assert dump(url) != before
    kinds = {f["kind"] for f in pcbo(["verify", "--home", home]).document["findings"]}
    assert kinds == {"sql_rollback_interrupted"}
    again = pcbo([*args, "--home", home])
    assert again.status == 0 and again.document["rolledBack"] == 4
    assert dump(url) == before
    assert pcbo(["verify", "--home", home]).status == 0


# -- scoped locks ----------------------------------------------------------------------------------------

GATED_AND_LOGGED = """
CREATE TABLE IF NOT EXISTS apply_log (tbl text, id text, at timestamptz);
CREATE OR REPLACE FUNCTION gated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 't1' THEN
        PERFORM pg_advisory_lock_shared(4242);
        PERFORM pg_advisory_unlock_shared(4242);
    END IF;
    INSERT INTO apply_log VALUES (TG_TABLE_NAME, NEW.id, clock_timestamp());
    RETURN NEW;
END $$;
"""


@pytest.mark.postgres
@pytest.mark.slow
def test_runs_on_one_table_queue_in_order_and_another_table_goes_on(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    url = fresh_postgres_url
    run_sql(url, GATED_AND_LOGGED)
    for table in ("t1", "t2"):
        create_table(url, table)
        run_sql(url, f"CREATE TRIGGER gated BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION gated()")
    home = tmp_path / "home"

    def start(run_id: str, table: str, n: int) -> subprocess.Popen:
        records = [{**record(i), "id": f"{run_id}-{i:03d}"} for i in range(n)]
        path = write_json(
            tmp_path / f"{run_id}.json", request(url, records, run_id=run_id, table=table, chunkRows=5)
        )
        return _start(["execute", "--input", path], home)

    def lock_state(run_id: str) -> bool | None:
        rows = query(
            url,
            "SELECT l.granted FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            f"WHERE l.locktype = 'advisory' AND a.application_name = 'pcbo run {run_id}'",
        )
        return rows[0][0] if rows else None

    def wait_until(run_id: str, proc: subprocess.Popen, granted: bool, what: str) -> None:
        """Until the run holds (`granted`) or waits for its lock; a run that ended before says why."""
        _wait_for(lambda: lock_state(run_id) is granted or proc.poll() is not None, what=what)
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"run {run_id} ended (exit {proc.returncode}) before {what}: {err}")

    with psycopg.connect(conninfo(url), autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(4242)")  # t1's inserts wait until the test lets them go
        a = start("A", "t1", 12)
        wait_until("A", a, True, "run A holding t1")
        b = start("B", "t1", 6)
        c = start("C", "t2", 6)
        wait_until("B", b, False, "run B queued behind A")
        d = start("D", "t1", 6)
        wait_until("D", d, False, "run D queued behind B")
        # C, on another table, goes through while A still holds t1 (its inserts held at the gate).
        assert c.wait(timeout=120) == 0, c.stderr.read().decode() if c.stderr else ""
        assert a.poll() is None and lock_state("A") is True
        assert query(url, "SELECT count(*) FROM apply_log WHERE tbl = 't1'") == [(0,)]
        gate.execute("SELECT pg_advisory_unlock(4242)")
    for proc in (a, b, d):
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode() if proc.stderr else ""
    spans = {
        run: query(url, f"SELECT min(at), max(at), count(*) FROM apply_log WHERE id LIKE '{run}-%'")[0]
        for run in "ABCD"
    }
    assert [spans[r][2] for r in "ABCD"] == [12, 6, 6, 6]
    assert (
        spans["A"][1] < spans["B"][0] and spans["B"][1] < spans["D"][0]
    )  # one at a time, first come first served
    assert spans["C"][1] < spans["A"][0]  # C was done before A could write a row
    documents = [json.loads(_stdout(p)) for p in (a, b, d)]
    assert all(doc["lock"]["scope"].endswith("|public.t1") for doc in documents)
    assert documents[1]["lock"]["waitedSeconds"] > 0


@pytest.mark.postgres
def test_a_target_table_locked_by_hand_is_waited_for_only_as_long_as_a_lease(
    tmp_path: Path, fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: `LOCK TABLE events` by hand in an open session of the target database made a
    run into it wait for as long as it was held; it now gives up within `PCBO_LEASE_WAIT_SECONDS`, exit
    1 naming the table, and once let go the same request completes the table and `verify` is clean."""
    url = fresh_postgres_url
    create_table(url)
    monkeypatch.setenv("PCBO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PCBO_LEASE_WAIT_SECONDS", "0.5")
    path = write_json(tmp_path / "r.json", request(url, [record(i) for i in range(6)]))

    def while_locked(mode: str, args: list) -> Any:
        """`pcbo ARGS` while another session holds the table in `mode`."""
        outcome: list = []
        with psycopg.connect(conninfo(url)) as holder:
            holder.execute(f"LOCK TABLE events IN {mode} MODE")
            run = threading.Thread(target=lambda: outcome.append(pcbo(args)), daemon=True)
            run.start()
            run.join(30)  # a bound on a hang, not a measurement: the wait asked for is 0.5 s
            still_waiting = run.is_alive()
            holder.rollback()
        run.join()
        assert not still_waiting, f"{args[0]} waited on the target table's lock past PCBO_LEASE_WAIT_SECONDS"
        return outcome[0]

    busy = while_locked("SHARE", ["execute", "--input", path])
    assert busy.status == 1, busy
    assert "target table events " in busy.stderr and "PCBO_LEASE_WAIT_SECONDS" in busy.stderr, busy
    again = pcbo(["execute", "--input", path])  # resumes the apply the lock cut short
    assert again.status == 0, again.stderr
    assert len(dump(url)) == 6
    found = while_locked("ACCESS EXCLUSIVE", ["verify", "--target-url", url])
    assert found.status == 1 and [f["kind"] for f in found.document["findings"]] == ["sql_target_unreachable"]
    assert "target table events " in found.document["findings"][0]["detail"], found.document
    verify = pcbo(["verify", "--target-url", url])
    assert verify.status == 0 and verify.document["status"] == "clean", verify


def test_sqlite_ticket_queue_serialises_one_table_first_come_first_served(tmp_path: Path) -> None:
    from pcbo_dagster.core.record_table import run_schema
    from pcbo_dagster.core.sql_target_spec import SqlTargetSpec
    from pcbo_dagster.targets.sql_locks import scoped_lock
    from pcbo_dagster.targets.sql_table import SqlTable

    url = sqlite_url(tmp_path / "target.db")
    create_table(url, "t1")
    create_table(url, "t2")
    schema, as_json = run_schema([record(1)])
    tables = {
        name: SqlTable.open(
            SqlTargetSpec.model_validate(
                {
                    "kind": "sql",
                    "url": url,
                    "table": name,
                    "key": ["id"],
                    "columns": {"id": "id", "occurredAt": "occurred_at"},
                }
            ),
            url,
            schema,
            as_json,
            write=True,
        )  # fmt: skip
        for name in ("t1", "t2")
    }
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def hold(name: str, table: str, wait_for: threading.Event | None = None) -> None:
        with scoped_lock(tables[table], "events", name):
            order.append(f"{name}+")
            if wait_for is not None:
                holding.set()
                wait_for.wait(30)
            order.append(f"{name}-")

    first = threading.Thread(target=hold, args=("first", "t1", release))
    first.start()
    assert holding.wait(30)
    second = threading.Thread(target=hold, args=("second", "t1"))
    second.start()
    time.sleep(0.3)
    third = threading.Thread(target=hold, args=("third", "t1"))
    third.start()
    time.sleep(0.3)
    other = threading.Thread(target=hold, args=("other", "t2"))
    other.start()
    other.join(30)
    assert order == ["first+", "other+", "other-"]  # another table goes on; the same table waits
    release.set()
    for thread in (first, second, third):
        thread.join(30)
    assert order[3:] == ["first-", "second+", "second-", "third+", "third-"]
    for table in tables.values():
        table.close()

"""Local PAS backup and the chain writer: files, restarts, concurrency, head-store reconciliation."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import rfc8785

import pcbo_dagster.audit.backup as backup_module
from pcbo_dagster.audit import AuditBackup, AuditBackupCorrupt, AuditLog, ChainDivergence
from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.core.audit_chain import build_event, event_hash, verify_chain

KEY = "events/v1"


def _event(seq: int, prev: str | None, event_type: str = "a", chain_key: str = KEY) -> dict[str, Any]:
    """An event of no body at 2024-01-01T00:00:00Z, as the chain's writer builds it."""
    return build_event(
        chain_key=chain_key,
        seq=seq,
        prev_event_hash=prev,
        event_type=event_type,
        timestamp="2024-01-01T00:00:00Z",
        body={},
    )


class FixedClock:
    """Deterministic clock: one second per call from 2024-01-01."""

    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


# -- the real catalog (SQLite) as the head store ----------------------------------------------------


class Catalog(CatalogStore):
    """The catalog on a SQLite file, migrated. `fail_appends` makes the next appends to the mirror
    fail (after the backup write, or while reconciling), like a catalog outage."""

    fail_appends = 0

    def __init__(self, path: str | Path) -> None:
        super().__init__(f"sqlite:///{path}")
        self.migrate()

    def all_events(self, chain_key: str) -> list[dict]:
        return self.audit_events(chain_key)

    @contextmanager
    def locked_chain(self, chain_key: str) -> Iterator[Any]:
        with super().locked_chain(chain_key) as txn:
            original = txn.append

            def append(events: list[dict]) -> None:
                if self.fail_appends:
                    self.fail_appends -= 1
                    raise RuntimeError("catalog unavailable")
                original(events)

            txn.append = append  # type: ignore[method-assign]
            yield txn


SqliteHeadStore = FailingHeadStore = Catalog


# -- workers for the multi-process tests (top level: spawn imports them) ---------------------------


def _process_writer(directory: str, db: str | None, worker: int, count: int, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    head_store = SqliteHeadStore(db) if db else None
    log = AuditLog(AuditBackup(directory), head_store=head_store)
    for i in range(count):
        log.append(KEY, "partition_committed", {"worker": worker, "i": i, "pid": os.getpid()})


def _run_processes(directory: Path, db: Path | None, workers: int, count: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    db_arg = str(db) if db else None
    procs = [
        ctx.Process(target=_process_writer, args=(str(directory), db_arg, w, count, start))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers


# -- the backup ------------------------------------------------------------------------------------


def test_append_read_and_last_event(tmp_path):
    backup = AuditBackup(tmp_path / "pas")
    assert backup.read_chain(KEY) == []
    assert backup.last_event(KEY) is None
    assert backup.chain_keys() == []
    log = AuditLog(backup, clock=FixedClock())
    written = [log.append(KEY, "partition_committed", {"partition": {"key": f"k{i}"}}) for i in range(3)]
    assert [e["chain"]["seq"] for e in written] == [0, 1, 2]
    assert written[0]["timestamp"] == "2024-01-01T00:00:01Z"
    assert backup.read_chain(KEY) == written
    assert backup.last_event(KEY) == written[-1]
    assert backup.chain_keys() == [KEY]
    path = tmp_path / "pas" / "events" / "v1.jsonl"
    assert path.read_bytes() == b"".join(rfc8785.dumps(e) + b"\n" for e in written)
    assert (tmp_path / "pas" / "events" / "v1.lock").exists()
    assert verify_chain(backup.read_chain(KEY), KEY) == []


def test_backup_refuses_events_that_do_not_continue_the_chain(tmp_path):
    backup = AuditBackup(tmp_path)
    first = _event(0, None)
    backup.append(KEY, [first])
    before = backup.paths(KEY).events.read_bytes()
    good_next = _event(1, first["chain"]["event_hash"])
    fork = _event(0, None, event_type="b")
    skip = _event(2, first["chain"]["event_hash"])
    wrong_prev = _event(1, "sha256:" + "1" * 64)
    other_key = _event(1, first["chain"]["event_hash"], chain_key="events/v2")
    tampered = json.loads(json.dumps(good_next))
    tampered["extra"] = 1
    for bad, match in [
        (fork, "expected 1"),
        (skip, "expected 1"),
        (wrong_prev, "prev_event_hash"),
        (other_key, "chain_key"),
        (tampered, "recompute"),
    ]:
        with pytest.raises(ValueError, match=match):
            backup.append(KEY, [bad])
    with pytest.raises(ValueError):  # a valid event followed by a bad one: nothing is written
        backup.append(KEY, [good_next, fork])
    assert backup.paths(KEY).events.read_bytes() == before
    backup.append(KEY, [good_next])
    assert verify_chain(backup.read_chain(KEY), KEY) == []


@pytest.mark.parametrize("bad", ["events", "events/v1/x", "../v1", "events/..", "ev ents/v1", ".x/v1", "a/"])
def test_backup_refuses_bad_chain_keys(tmp_path, bad):
    backup = AuditBackup(tmp_path)
    with pytest.raises(ValueError, match="chain_key"):
        backup.paths(bad)
    with pytest.raises(ValueError, match="chain_key"):
        AuditLog(backup).append(bad, "x", {})
    assert list(tmp_path.iterdir()) == []


def test_backup_refuses_a_float_even_under_a_hash_computed_over_it(tmp_path):
    """The backup's own check walks every event for floats (and large integers) before it recomputes the
    hash: an event whose stored hash was computed over the float (RFC 8785 writes 2.0 as 2) is refused
    and nothing is written."""
    backup = AuditBackup(tmp_path)
    log = AuditLog(backup, clock=FixedClock())
    first = log.append(KEY, "a", {})
    before = backup.paths(KEY).events.read_bytes()
    for value, match in [(2.0, "float"), (2**60, "beyond")]:
        bad = build_event(
            chain_key=KEY,
            seq=1,
            prev_event_hash=first["chain"]["event_hash"],
            event_type="a",
            timestamp="2024-01-01T00:00:00Z",
            body={"n": 1},
        )
        bad["n"] = value
        if isinstance(value, float):  # RFC 8785 has no form for an integer beyond 2**53 - 1
            bad["chain"]["event_hash"] = event_hash(bad)
        with pytest.raises(ValueError, match=match):
            backup.append(KEY, [bad])
    assert backup.paths(KEY).events.read_bytes() == before


def test_floats_are_refused_and_nothing_is_written(tmp_path):
    log = AuditLog(AuditBackup(tmp_path))
    with pytest.raises(ValueError, match="float"):
        log.append(KEY, "x", {"amount": {"value": 1.25}})
    with pytest.raises(ValueError, match="reserved"):
        log.append(KEY, "x", {"chain": 1})
    assert log.backup.read_chain(KEY) == []


def test_last_event_reads_only_the_tail(tmp_path, monkeypatch):
    backup = AuditBackup(tmp_path)
    log = AuditLog(backup, clock=FixedClock())
    big = "x" * 150_000  # lines longer than the tail block size
    for i in range(20):
        log.append(KEY, "e", {"i": i, "blob": big})
    calls: list[int] = []
    real = backup_module._parse_line

    def counting(line: bytes):
        calls.append(len(line))
        return real(line)

    monkeypatch.setattr(backup_module, "_parse_line", counting)
    last = backup.last_event(KEY)
    assert last is not None and last["i"] == 19 and last["chain"]["seq"] == 19
    assert len(calls) == 1


def test_fsync_false_then_sync(tmp_path):
    backup = AuditBackup(tmp_path)
    event = _event(0, None)
    backup.append(KEY, [event], fsync=False)
    backup.sync(KEY)
    backup.sync("events/none")  # no file: nothing to do
    assert backup.read_chain(KEY) == [event]


def test_torn_tail_is_skipped_then_set_aside_and_reported(tmp_path):
    backup = AuditBackup(tmp_path)
    log = AuditLog(backup, clock=FixedClock())
    log.append(KEY, "a", {})
    second = log.append(KEY, "a", {})
    path = backup.paths(KEY).events
    fragment = b'{"chain":{"chain_key":"events/v1","se'
    with open(path, "ab") as f:
        f.write(fragment)  # a crash in the middle of a write
    assert backup.last_event(KEY) == second
    _, problems = backup.read_chain_with_problems(KEY)
    assert len(problems) == 1 and "v1.jsonl:3: incomplete last line (torn write)" in problems[0]
    third = log.append(KEY, "a", {})
    assert third["chain"]["seq"] == 2
    assert third["chain"]["prev_event_hash"] == second["chain"]["event_hash"]
    events, problems = backup.read_chain_with_problems(KEY)
    assert [e["chain"]["seq"] for e in events] == [0, 1, 2]
    assert verify_chain(events, KEY) == []
    # The chain file holds whole events again; the fragment is kept, byte for byte, and reported.
    assert problems == [] and path.read_bytes().count(b"\n") == 3
    assert backup.set_aside_fragments() == {KEY: fragment + b"\n"}
    chains, all_problems = backup.read_all_with_problems()
    assert chains[KEY] == events and all_problems == []


def test_whole_event_missing_only_its_newline_counts(tmp_path):
    backup = AuditBackup(tmp_path)
    log = AuditLog(backup, clock=FixedClock())
    first = log.append(KEY, "a", {})
    second = _event(1, first["chain"]["event_hash"])
    with open(backup.paths(KEY).events, "ab") as f:
        f.write(rfc8785.dumps(second))  # no newline
    assert backup.last_event(KEY) == second
    third = log.append(KEY, "a", {})
    assert third["chain"]["seq"] == 2
    events, problems = backup.read_chain_with_problems(KEY)
    assert problems == [] and verify_chain(events, KEY) == [] and len(events) == 3


def test_corrupt_last_line_stops_appends(tmp_path):
    backup = AuditBackup(tmp_path)
    log = AuditLog(backup)
    log.append(KEY, "a", {})
    with open(backup.paths(KEY).events, "ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(AuditBackupCorrupt):
        backup.last_event(KEY)
    with pytest.raises(AuditBackupCorrupt):
        log.append(KEY, "a", {})
    with open(backup.paths(KEY).events, "ab") as f:
        f.write(b'{"a":1,"a":2}\n')  # duplicate keys are not accepted either
    with pytest.raises(AuditBackupCorrupt):
        backup.last_event(KEY)


def test_read_all_groups_json_and_jsonl_files(tmp_path):
    root = tmp_path / "pas"
    backup = AuditBackup(root)
    log = AuditLog(backup, clock=FixedClock())
    v1 = [log.append(KEY, "a", {"n": i}) for i in range(3)]
    other = [log.append("other/v2", "b", {"n": i}) for i in range(4)]
    # A second chain exported as one .json file per event, in a nested folder, names not in seq order.
    export = root / "exports" / "deep"
    export.mkdir(parents=True)
    exported = []
    prev = None
    for seq, name in [(0, "z.json"), (1, "a.json"), (2, "m.json")]:
        ev = build_event(
            chain_key="third/v1",
            seq=seq,
            prev_event_hash=prev,
            event_type="c",
            timestamp="2024-01-01T00:00:00Z",
            body={"seq_name": name},
        )
        prev = ev["chain"]["event_hash"]
        exported.append(ev)
        (export / name).write_text(json.dumps(ev, indent=2))
    # A copy of a .jsonl event as a .json file is not a second event.
    (root / "exports" / "copy-of-v1-1.json").write_bytes(rfc8785.dumps(v1[1]))
    (root / "exports" / "broken.json").write_text("{not json")
    (root / "exports" / "orphan.json").write_text(json.dumps({"hello": "world"}))
    (root / "exports" / "notes.txt").write_text("ignored")
    chains, problems = backup.read_all_with_problems()
    assert list(chains) == ["events/v1", "other/v2", "third/v1"]
    assert chains[KEY] == v1
    assert chains["other/v2"] == other
    assert chains["third/v1"] == exported
    for key, events in chains.items():
        assert verify_chain(events, key) == [], key
    assert len(problems) == 2
    assert any("broken.json" in p for p in problems) and any("orphan.json" in p for p in problems)
    assert backup.read_all() == chains
    assert backup.chain_keys() == ["events/v1", "other/v2"]


def test_read_all_keeps_jsonl_file_order_so_reorders_are_found(tmp_path):
    backup = AuditBackup(tmp_path)
    log = AuditLog(backup, clock=FixedClock())
    for i in range(4):
        log.append(KEY, "a", {"n": i})
    path = backup.paths(KEY).events
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    chains = backup.read_all()
    assert [e["chain"]["seq"] for e in chains[KEY]] == [0, 2, 1, 3]
    findings = verify_chain(chains[KEY], KEY)
    assert any("position 1 (seq 2)" in f for f in findings)


# -- the writer: restart and concurrency -----------------------------------------------------------


def test_chain_head_persists_across_restarts(tmp_path):
    first = AuditLog(AuditBackup(tmp_path), clock=FixedClock())
    a = [first.append(KEY, "a", {"n": i}) for i in range(3)]
    second = AuditLog(AuditBackup(tmp_path), clock=FixedClock())  # a new process would see the same
    assert second.head(KEY) == (2, a[-1]["chain"]["event_hash"])
    b = second.append(KEY, "a", {"n": 3})
    assert b["chain"]["seq"] == 3 and b["chain"]["prev_event_hash"] == a[-1]["chain"]["event_hash"]
    assert verify_chain(AuditBackup(tmp_path).read_chain(KEY), KEY) == []


def test_timestamps_are_utc_with_microseconds_only_when_nonzero(tmp_path):
    moments = iter(
        [
            datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
            datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC),
        ]
    )
    log = AuditLog(AuditBackup(tmp_path), clock=lambda: next(moments))
    assert log.append(KEY, "a", {})["timestamp"] == "2024-05-01T10:00:00.123456Z"
    assert log.append(KEY, "a", {})["timestamp"] == "2024-05-01T12:00:00Z"
    naive = AuditLog(AuditBackup(tmp_path), clock=lambda: datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        naive.append(KEY, "a", {})


def test_concurrent_processes_never_fork_the_chain(tmp_path):
    _run_processes(tmp_path / "pas", None, workers=4, count=25)
    backup = AuditBackup(tmp_path / "pas")
    events, problems = backup.read_chain_with_problems(KEY)
    assert problems == []
    assert len(events) == 100
    assert verify_chain(events, KEY) == []
    assert sorted((e["worker"], e["i"]) for e in events) == [(w, i) for w in range(4) for i in range(25)]
    assert len({e["pid"] for e in events}) == 4


def test_concurrent_threads_with_separate_objects_never_fork_the_chain(tmp_path):
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            log = AuditLog(AuditBackup(tmp_path))
            for i in range(25):
                log.append(KEY, "a", {"worker": worker, "i": i})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    events = AuditBackup(tmp_path).read_chain(KEY)
    assert len(events) == 100 and verify_chain(events, KEY) == []


def test_lock_is_reentrant_within_a_thread(tmp_path):
    backup = AuditBackup(tmp_path)
    log = AuditLog(backup)
    with backup.locked(KEY), AuditBackup(tmp_path).locked(KEY):
        log.append(KEY, "a", {})  # takes the same lock again: must not deadlock
    assert len(backup.read_chain(KEY)) == 1


# -- the writer with a head store (catalog) --------------------------------------------------------


def test_head_store_receives_the_same_events(tmp_path):
    store = SqliteHeadStore(tmp_path / "catalog.db")
    log = AuditLog(AuditBackup(tmp_path / "pas"), head_store=store, clock=FixedClock())
    written = [log.append(KEY, "a", {"n": i}) for i in range(5)]
    assert store.all_events(KEY) == written
    assert log.backup.read_chain(KEY) == written
    restarted = AuditLog(AuditBackup(tmp_path / "pas"), head_store=SqliteHeadStore(tmp_path / "catalog.db"))
    nxt = restarted.append(KEY, "a", {"n": 5})
    assert nxt["chain"]["seq"] == 5 and nxt["chain"]["prev_event_hash"] == written[-1]["chain"]["event_hash"]


def test_a_backup_behind_the_catalog_is_refused_not_filled(tmp_path):
    """Events the catalog alone holds (a missing or stale backup, or rows inserted by hand) are never
    adopted into the backup, and nothing is appended on top of them (no second commit event)."""
    store = SqliteHeadStore(tmp_path / "catalog.db")
    first = AuditLog(AuditBackup(tmp_path / "pas-old"), head_store=store, clock=FixedClock())
    written = [first.append(KEY, "a", {"n": i}) for i in range(3)]
    fresh = AuditLog(AuditBackup(tmp_path / "pas-new"), head_store=store, clock=FixedClock())
    with pytest.raises(ChainDivergence, match="the local audit backup .* lacks"):
        fresh.append(KEY, "a", {"n": 3})
    with pytest.raises(ChainDivergence):
        fresh.sync_to_catalog(KEY)
    assert fresh.backup.read_chain(KEY) == []
    assert store.all_events(KEY) == written


def test_catalog_behind_backup_is_filled_from_the_backup(tmp_path):
    store = FailingHeadStore(tmp_path / "catalog.db")
    log = AuditLog(AuditBackup(tmp_path / "pas"), head_store=store, clock=FixedClock())
    log.append(KEY, "a", {"n": 0})
    store.fail_appends = 1
    with pytest.raises(RuntimeError, match="catalog unavailable"):
        log.append(KEY, "a", {"n": 1})
    # The event is durable in the backup even though the catalog write failed.
    assert [e["n"] for e in log.backup.read_chain(KEY)] == [0, 1]
    assert len(store.all_events(KEY)) == 1
    store.fail_appends = 1
    with pytest.raises(RuntimeError, match="catalog unavailable"):
        log.append(KEY, "a", {"n": 2})  # fails while reconciling: nothing new is written
    assert [e["n"] for e in log.backup.read_chain(KEY)] == [0, 1]
    result = log.sync_to_catalog(KEY)
    assert (result.to_backup, result.to_head_store) == (0, 1)
    assert store.all_events(KEY) == log.backup.read_chain(KEY)
    assert log.sync_to_catalog(KEY).to_head_store == 0
    store.fail_appends = 1
    with pytest.raises(RuntimeError):
        log.append(KEY, "a", {"n": 3})
    nxt = log.append(KEY, "a", {"n": 4})  # reconciles first, then appends
    assert nxt["chain"]["seq"] == 3
    assert [e["n"] for e in store.all_events(KEY)] == [0, 1, 3, 4]
    assert store.all_events(KEY) == log.backup.read_chain(KEY)
    assert verify_chain(store.all_events(KEY), KEY) == []


def test_events_the_backup_alone_holds_are_not_adopted(tmp_path):
    """Well-formed events appended to the backup alone (no pending batch in the catalog names them)
    stay out of the catalog: the append and the sync refuse, and the catalog is unchanged."""
    store = SqliteHeadStore(tmp_path / "catalog.db")
    log = AuditLog(AuditBackup(tmp_path / "pas"), head_store=store, clock=FixedClock())
    written = [log.append(KEY, "a", {"n": i}) for i in range(2)]
    forged = build_event(
        chain_key=KEY,
        seq=2,
        prev_event_hash=written[-1]["chain"]["event_hash"],
        event_type="partition_committed",
        timestamp="2024-01-01T00:00:09Z",
        body={"n": 9},
    )
    AuditBackup(tmp_path / "pas").append(KEY, [forged])
    with pytest.raises(ChainDivergence, match="never recorded as pending"):
        log.append(KEY, "a", {"n": 2})
    with pytest.raises(ChainDivergence, match="never recorded as pending"):
        log.sync_to_catalog(KEY)
    assert store.all_events(KEY) == written
    # A backup written without any catalog is no more adopted than one event.
    alone = AuditLog(AuditBackup(tmp_path / "alone"), clock=FixedClock())
    for i in range(3):
        alone.append(KEY, "a", {"n": i})
    attached = AuditLog(AuditBackup(tmp_path / "alone"), head_store=SqliteHeadStore(tmp_path / "other.db"))
    with pytest.raises(ChainDivergence):
        attached.sync_to_catalog(KEY)


def test_a_batch_torn_in_the_backup_keeps_what_the_backup_holds(tmp_path):
    """A crash in the middle of the backup write (a torn last line) and before the catalog's part: the
    next append adopts the batch's events the backup holds whole, drops the torn fragment and the rest
    of the batch (it never reached the backup, the first store), and continues the chain from there."""
    store = SqliteHeadStore(tmp_path / "catalog.db")
    log = AuditLog(AuditBackup(tmp_path / "pas"), head_store=store, clock=FixedClock())
    log.append(KEY, "a", {"n": 0})
    store.fail_appends = 1
    with pytest.raises(RuntimeError, match="catalog unavailable"):
        log.append_many(KEY, [("a", {"n": 1}), ("a", {"n": 2})])
    path = log.backup.paths(KEY).events
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    path.write_bytes(b"".join(lines[:2]) + lines[2][:17])  # the second event of the batch torn
    nxt = log.append(KEY, "a", {"n": 3})
    assert nxt["chain"]["seq"] == 2
    events, problems = log.backup.read_chain_with_problems(KEY)
    assert problems == [] and [e["n"] for e in events] == [0, 1, 3]
    assert store.all_events(KEY) == events and verify_chain(events, KEY) == []
    assert log.backup.set_aside_fragments() == {}


def _next_events(after: dict, bodies: list[dict]) -> list[dict]:
    events, prev = [], after
    for body in bodies:
        prev = build_event(
            chain_key=KEY,
            seq=prev["chain"]["seq"] + 1,
            prev_event_hash=prev["chain"]["event_hash"],
            event_type="partition_committed",
            timestamp="2024-01-01T00:00:09Z",
            body=body,
        )
        events.append(prev)
    return events


@pytest.mark.parametrize("behind", [False, True])
def test_a_pending_batch_the_catalog_alone_holds_never_reaches_the_backup(tmp_path, behind):
    """The red-team attack: someone who can write the catalog (not the backup) records a pending batch
    of well-formed forged events — alone, or after the one real event a catalog that lags the backup
    still lacks. Neither the next append nor repair's sync writes a forged event to the backup; the
    real event is adopted, the forgeries are dropped with the pending batch."""
    store = SqliteHeadStore(tmp_path / "catalog.db")
    log = AuditLog(AuditBackup(tmp_path / "pas"), head_store=store, clock=FixedClock())
    written = [log.append(KEY, "a", {"n": i}) for i in range(2)]
    if behind:
        store.fail_appends = 1
        with pytest.raises(RuntimeError, match="catalog unavailable"):
            written.append(log.append(KEY, "a", {"n": 2}))
        written = log.backup.read_chain(KEY)
        with store.locked_chain(KEY) as txn:
            pending = txn.pending()
            assert pending is not None and pending[1] == written[2:]
        head = written[1]
        batch = written[2:] + _next_events(written[2], [{"forged": 1}, {"forged": 2}])
    else:
        head = written[-1]
        batch = _next_events(head, [{"forged": 1}, {"forged": 2}])
    with store.locked_chain(KEY) as txn:
        txn.set_pending(head["chain"]["seq"] + 1, batch)
    result = log.sync_to_catalog(KEY)
    assert result.to_backup == 0 and result.to_head_store == (1 if behind else 0)
    assert log.backup.read_chain(KEY) == written == store.all_events(KEY)
    nxt = log.append(KEY, "a", {"n": 9})
    events = log.backup.read_chain(KEY)
    assert events == [*written, nxt] == store.all_events(KEY) and verify_chain(events, KEY) == []
    assert not any("forged" in e for e in events)


def test_diverged_backup_and_catalog_are_refused(tmp_path):
    store = SqliteHeadStore(tmp_path / "catalog.db")
    AuditLog(AuditBackup(tmp_path / "a"), head_store=store, clock=FixedClock()).append(KEY, "a", {"n": 0})
    other = AuditLog(AuditBackup(tmp_path / "b"), clock=FixedClock())
    other.append(KEY, "a", {"n": "different"})
    with_store = AuditLog(AuditBackup(tmp_path / "b"), head_store=store)
    with pytest.raises(ChainDivergence):
        with_store.append(KEY, "a", {})
    other.append(KEY, "a", {"n": 1})  # backup ahead, but its seq 0 differs from the catalog's
    with pytest.raises(ChainDivergence):
        with_store.sync_to_catalog(KEY)
    assert len(store.all_events(KEY)) == 1
    assert len(other.backup.read_chain(KEY)) == 2


def test_concurrent_processes_with_a_head_store(tmp_path):
    db = tmp_path / "catalog.db"
    SqliteHeadStore(db)
    _run_processes(tmp_path / "pas", db, workers=3, count=10)
    events = AuditBackup(tmp_path / "pas").read_chain(KEY)
    assert len(events) == 30 and verify_chain(events, KEY) == []
    assert SqliteHeadStore(db).all_events(KEY) == events


@pytest.mark.parametrize("with_catalog", [False, True])
def test_a_fenced_append_is_refused_whole_once_the_lake_history_moved(tmp_path, with_catalog):
    """The fence of a lake writer that lost its lease: an append fenced by the chain its caller
    replayed takes in events that change no partition, and refuses, whole, once a lake event (or a
    rewritten chain) came in between."""
    from pcbo_dagster.audit.log import ChainMoved
    from pcbo_dagster.core.chain_state import replay

    store = SqliteHeadStore(tmp_path / "catalog.db") if with_catalog else None
    log = AuditLog(AuditBackup(tmp_path / "pas"), head_store=store, clock=FixedClock())
    state = replay([])
    first = log.append(KEY, "a", {"n": 0}, fence=state)
    state.add(first)
    log.append(KEY, "note", {"n": 1})  # another writer, no lake event: taken in
    second = log.append(KEY, "a", {"n": 2}, fence=state)
    state.add(second)
    assert second["chain"]["seq"] == 2 and state.head == (2, second["chain"]["event_hash"])
    partition = {"key": "k", "dataset": "d", "version_label": "v", "version": 1}
    log.append(KEY, "partition_restored", {"partition": partition, "manifest_checksum": "sha256:" + "0" * 64})
    before = log.backup.read_chain(KEY)
    with pytest.raises(ChainMoved, match="another writer appended partition_restored"):
        log.append_many(KEY, [("c", {"n": 3}), ("c", {"n": 4})], fence=state)
    stale = replay(before[:1])  # read before the note: the restoration came later all the same
    with pytest.raises(ChainMoved):
        log.append(KEY, "c", {"n": 3}, fence=stale)
    assert log.backup.read_chain(KEY) == before
    if store is not None:
        assert store.all_events(KEY) == before
    foreign = replay([{**before[0], "chain": {**before[0]["chain"], "event_hash": "sha256:" + "1" * 64}}])
    with pytest.raises(ChainMoved, match="no longer the one this run read"):
        log.append(KEY, "c", {"n": 3}, fence=foreign)

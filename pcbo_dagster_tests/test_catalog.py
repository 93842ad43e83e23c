"""CatalogStore on SQLite (a temp file) and on a real PostgreSQL server (tests marked `postgres`)."""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcbo_dagster.catalog import CatalogStore, default_catalog_url
from pcbo_dagster.catalog.database import HEAD_REVISION

SPAWN = multiprocessing.get_context("spawn")
DS, VL = "events", "v1"
CHAIN = f"{DS}/{VL}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return default_catalog_url(tmp_path / "home")
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def store(catalog_url: str):
    s = CatalogStore(catalog_url)
    s.migrate()
    yield s
    s.close()


def _event(seq: int, prev: str | None, tag: str, chain_key: str = CHAIN) -> dict:
    digest = "sha256:" + hashlib.sha256(f"{chain_key}|{seq}|{tag}".encode()).hexdigest()
    return {
        "version": "1",
        "event_type": "partition_committed",
        "event_id": f"{chain_key}#{seq}",
        "timestamp": "2024-01-01T00:00:00Z",
        "payload": {"tag": tag, "text": "héllo"},
        "chain": {"chain_key": chain_key, "seq": seq, "prev_event_hash": prev, "event_hash": digest},
    }


def _append_next(store: CatalogStore, chain_key: str, tag: str) -> None:
    with store.locked_chain(chain_key) as tx:
        head = tx.head()
        seq, prev = (head[0] + 1, head[1]) if head else (0, None)
        tx.append([_event(seq, prev, tag, chain_key)])


def _record(
    store: CatalogStore, version: int, checksum: str | None = None, key: str = "20240101T000000Z", **kw
):
    args: dict[str, Any] = {
        "dataset": DS,
        "version_label": VL,
        "partition_key": key,
        "version": version,
        "run_id": "run-1",
        "manifest_uri": f"file:///lake/{key}/v{version}/_manifest.json",
        "manifest_checksum": checksum or f"sha256:m{version}",
        "merkle_root": f"sha256:r{version}",
        "record_count": 10 * version,
        "event_hash": f"sha256:e{version}",
        "files": [{"uri": f"part-{version}.parquet", "checksum": "sha256:f", "rowCount": 10, "byteSize": 99}],
        "source_uri": None,
        "source_kind": "inline",
        "plan_hash": "sha256:plan",
        "decision_hash": "sha256:dec",
    }
    args.update(kw)
    store.record_partition_version(**args)


def _statuses(store: CatalogStore, key: str = "20240101T000000Z") -> dict[int, str]:
    return {r["version"]: r["status"] for r in store.partition_versions(DS, VL) if r["partition_key"] == key}


# -- processes (module level: spawn pickles them by reference) ---------------------------------


def _migrate_worker(url: str, barrier) -> None:
    barrier.wait(timeout=60)
    store = CatalogStore(url)
    store.migrate()
    store.close()


def _chain_worker(url: str, chain_key: str, worker: int, count: int, barrier) -> None:
    store = CatalogStore(url)
    barrier.wait(timeout=60)
    for i in range(count):
        _append_next(store, chain_key, f"w{worker}-{i}")
    store.close()


def _run_processes(target, args_list: list[tuple]) -> None:
    barrier = SPAWN.Barrier(len(args_list))
    procs = [SPAWN.Process(target=target, args=(*args, barrier)) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * len(procs), f"worker exit codes {codes}"


# -- URLs and migrations ----------------------------------------------------------------------


def test_default_catalog_url(tmp_path: Path) -> None:
    assert default_catalog_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/catalog.db"
    assert default_catalog_url(str(tmp_path / "x")).endswith("/x/catalog.db")


def test_postgresql_url_maps_to_psycopg() -> None:
    store = CatalogStore("postgresql://u:p@db.example:5432/cat")
    assert store.url == "postgresql://u:p@db.example:5432/cat"
    assert store.engine.url.drivername == "postgresql+psycopg"
    assert CatalogStore("postgresql+psycopg://u@h/db").engine.url.drivername == "postgresql+psycopg"
    with pytest.raises(ValueError):
        CatalogStore("mysql://u@h/db")


def test_sqlite_in_memory_works() -> None:
    store = CatalogStore("sqlite://")
    store.migrate()
    store.start_run("r", DS, VL, "p", "d", {})
    _append_next(store, CHAIN, "a")
    run = store.get_run("r")
    assert run is not None
    assert run["status"] == "running"
    assert store.chain_heads()[CHAIN][0] == 0


def test_sqlite_pragmas(tmp_path: Path) -> None:
    store = CatalogStore(default_catalog_url(tmp_path / "new" / "home"))  # parent dirs created
    store.migrate()
    with store.engine.connect() as conn:
        pragma = {n: conn.exec_driver_sql(f"PRAGMA {n}").scalar() for n in ("journal_mode", "busy_timeout")}
        pragma["foreign_keys"] = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
        pragma["synchronous"] = conn.exec_driver_sql("PRAGMA synchronous").scalar()
    assert pragma == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1, "synchronous": 1}


def _schema_state(store: CatalogStore) -> tuple[set[str], list[str]]:
    with store.engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        versions = [r[0] for r in conn.execute(sa.text("SELECT version_num FROM alembic_version"))]
    return tables, versions


EXPECTED_TABLES = {
    "alembic_version",
    "datasets",
    "runs",
    "partitions",
    "lineage",
    "audit_events",
    "audit_chain_heads",
    "discrepancy_events",
    "dataset_leases",
    "rollouts",
    "rollout_log",
    "rollout_approvals",
    "soak_evaluations",
    "audit_pending_batches",
    "alerts",
    "transparency_trees",
    "transparency_nodes",
    "transparency_checkpoints",
    "checkpoint_cosignatures",
    "table_publications",
    "api_tokens",
    "command_audit",
    "api_runs",
    "idempotency_keys",
    "sql_apply_log",
    "sql_row_failures",
    "source_zone_indexes",
}


def test_migrate_twice_is_idempotent(catalog_url: str) -> None:
    store = CatalogStore(catalog_url)
    store.migrate()
    store.start_run("r", DS, VL, "p", "d", {"k": "v"})
    store.migrate()
    store.close()
    again = CatalogStore(catalog_url)
    again.migrate()
    assert _schema_state(again) == (EXPECTED_TABLES, [HEAD_REVISION])
    run = again.get_run("r")
    assert run is not None
    assert run["metadata"] == {"k": "v"}
    again.close()


def test_a_catalog_at_a_revision_this_pcbo_does_not_know_is_refused_naming_it(
    catalog_url: str, tmp_path: Path
) -> None:
    """Red-team finding: a catalog whose `alembic_version` names a revision this pcbo does not have (a
    newer pcbo migrated it, or someone wrote the row) failed every command with `internal error
    (CommandError: Can't locate revision …)`; it is refused naming the revision, exit 1, unchanged."""
    from pcbo_dagster_tests.cli_runner import run_pcbo

    store = CatalogStore(catalog_url)
    store.migrate()
    with store.write() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    before = _schema_state(store)
    store.close()
    home = tmp_path / "home"
    for command in (["verify"], ["rollback", "--dataset", "events", "--run-id", "r"]):
        done = run_pcbo([*command, "--catalog", catalog_url], home=home)
        assert done.status == 1, done.stderr
        assert "internal error" not in done.stderr, done.stderr
        assert "revision '0099'" in done.stderr and HEAD_REVISION in done.stderr, done.stderr
    again = CatalogStore(catalog_url)
    assert _schema_state(again) == before
    again.close()


def test_migrate_from_concurrent_processes(catalog_url: str) -> None:
    _run_processes(_migrate_worker, [(catalog_url,) for _ in range(4)])
    store = CatalogStore(catalog_url)
    assert _schema_state(store) == (EXPECTED_TABLES, [HEAD_REVISION])
    store.migrate()
    store.close()


# -- runs -------------------------------------------------------------------------------------


def test_run_round_trip(store: CatalogStore) -> None:
    assert store.get_run("nope") is None
    store.start_run("run-1", DS, VL, "sha256:p", "sha256:d", {"initiator": "ops", "n": [1, True, None]})
    run = store.get_run("run-1")
    assert run is not None
    assert run["status"] == "running" and run["finished_at"] is None and run["summary"] is None
    assert run["metadata"] == {"initiator": "ops", "n": [1, True, None]}
    assert (run["dataset"], run["version_label"], run["plan_hash"], run["decision_hash"]) == (
        DS,
        VL,
        "sha256:p",
        "sha256:d",
    )
    assert run["started_at"].tzinfo is not None and run["started_at"].utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - run["started_at"]).total_seconds()) < 60
    store.finish_run("run-1", "succeeded", {"partitions": 3, "ids": ["ä"]})
    run = store.get_run("run-1")
    assert run is not None
    assert run["status"] == "succeeded" and run["summary"] == {"partitions": 3, "ids": ["ä"]}
    assert run["finished_at"] >= run["started_at"]
    store.start_run("run-1", DS, VL, "sha256:p", "sha256:d", {"initiator": "ops", "n": [1, True, None]})
    run = store.get_run("run-1")
    assert run is not None
    assert run["status"] == "running" and run["finished_at"] is None
    with pytest.raises(KeyError):
        store.finish_run("unknown", "failed", {})
    assert [(d["dataset"], d["version_label"]) for d in store.datasets()] == [(DS, VL)]
    store.ensure_dataset(DS, VL)
    store.ensure_dataset(DS, "v2")
    assert [(d["dataset"], d["version_label"]) for d in store.datasets()] == [(DS, VL), (DS, "v2")]


# -- partitions and lineage -------------------------------------------------------------------


def test_partition_round_trip_and_idempotence(store: CatalogStore) -> None:
    store.start_run("run-1", DS, VL, "sha256:plan", "sha256:dec", {})
    _record(store, 1, source_uri="s3://bucket/in.jsonl", source_kind="uri")
    _record(store, 1, source_uri="s3://bucket/in.jsonl", source_kind="uri")  # idempotent
    rows = store.partition_versions()
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "committed" and row["rolled_back_at"] is None
    assert row["files"] == [{"uri": "part-1.parquet", "checksum": "sha256:f", "rowCount": 10, "byteSize": 99}]
    assert (row["manifest_checksum"], row["merkle_root"], row["record_count"], row["event_hash"]) == (
        "sha256:m1",
        "sha256:r1",
        10,
        "sha256:e1",
    )
    assert row["committed_at"].utcoffset() == timedelta(0)
    assert store.current_partition(DS, VL, "20240101T000000Z") == row
    assert store.current_partition(DS, VL, "other") is None
    lineage = store.lineage()
    assert len(lineage) == 1
    assert lineage[0]["source_uri"] == "s3://bucket/in.jsonl" and lineage[0]["partition_version"] == 1
    # no source URI: still idempotent (stored as '' so the unique constraint holds)
    _record(store, 2)
    _record(store, 2)
    assert [(r["partition_version"], r["source_uri"]) for r in store.lineage()] == [
        (1, "s3://bucket/in.jsonl"),
        (2, None),
    ]
    with pytest.raises(ValueError, match="already"):
        _record(store, 2, checksum="sha256:different")
    assert store.partition_versions(DS, "v-other") == []
    assert len(store.partition_versions(DS)) == 2


def test_partition_versions_order(store: CatalogStore) -> None:
    for key in ("20240101T020000Z", "20240101T000000Z", "20240101T010000Z"):
        for version in (2, 1):
            _record(store, version, key=key)
    _record(store, 1, key="20240101T000000Z", dataset="alpha")
    rows = store.partition_versions()
    got = [(r["dataset"], r["partition_key"], r["version"]) for r in rows]
    assert got == sorted(got)
    assert got[0][0] == "alpha"


def test_supersede_and_rollback_transitions(store: CatalogStore) -> None:
    _record(store, 1)
    _record(store, 2)
    assert _statuses(store) == {1: "superseded", 2: "committed"}
    current = store.current_partition(DS, VL, "20240101T000000Z")
    assert current is not None
    assert current["version"] == 2
    # undo version 2, restoring version 1
    store.mark_partition_rolled_back(
        dataset=DS, version_label=VL, partition_key="20240101T000000Z", version=2, restored_version=1
    )
    assert _statuses(store) == {1: "committed", 2: "rolled_back"}
    rows = {r["version"]: r for r in store.partition_versions()}
    assert rows[2]["rolled_back_at"] is not None and rows[2]["rolled_back_at"].utcoffset() == timedelta(0)
    assert rows[1]["rolled_back_at"] is None
    first_rollback_at = rows[2]["rolled_back_at"]
    # repeating it changes nothing
    store.mark_partition_rolled_back(
        dataset=DS, version_label=VL, partition_key="20240101T000000Z", version=2, restored_version=1
    )
    assert {r["version"]: r for r in store.partition_versions()}[2]["rolled_back_at"] == first_rollback_at
    # version 3 supersedes 1; rolling 3 back with nothing to restore leaves no committed version
    _record(store, 3)
    assert _statuses(store) == {1: "superseded", 2: "rolled_back", 3: "committed"}
    store.mark_partition_rolled_back(
        dataset=DS, version_label=VL, partition_key="20240101T000000Z", version=3, restored_version=None
    )
    assert _statuses(store) == {1: "superseded", 2: "rolled_back", 3: "rolled_back"}
    assert store.current_partition(DS, VL, "20240101T000000Z") is None
    # re-recording a rolled-back version with the same manifest commits it again
    _record(store, 3)
    assert _statuses(store) == {1: "superseded", 2: "rolled_back", 3: "committed"}
    with pytest.raises(KeyError):
        store.mark_partition_rolled_back(
            dataset=DS, version_label=VL, partition_key="20240101T000000Z", version=9, restored_version=None
        )
    with pytest.raises(KeyError):
        store.mark_partition_rolled_back(
            dataset=DS, version_label=VL, partition_key="20240101T000000Z", version=3, restored_version=8
        )
    # the failed call rolled back: version 3 is still committed
    assert _statuses(store)[3] == "committed"


def test_database_allows_one_committed_version(store: CatalogStore) -> None:
    _record(store, 1)
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO partitions (dataset, version_label, partition_key, version, run_id, status, "
                "manifest_uri, manifest_checksum, merkle_root, record_count, files, committed_at) VALUES "
                "(:d, :v, '20240101T000000Z', 5, 'r', 'committed', 'u', 'c', 'm', 0, '[]', :t)"
            ),
            {"d": DS, "v": VL, "t": datetime.now(UTC)},
        )
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE partitions SET status = 'bogus'"))


# -- discrepancies and append-only tables -----------------------------------------------------


def test_discrepancy_round_trip(store: CatalogStore) -> None:
    store.record_discrepancy(
        run_id="run-1", dataset=DS, version_label=VL, partition_key="k", kind="MISSING_EVENT", detail={"a": 1}
    )
    store.record_discrepancy(
        run_id="run-2", dataset=DS, version_label=VL, partition_key=None, kind="EXTRA_FILE", detail={"f": "x"}
    )
    rows = store.discrepancies()
    assert [(r["run_id"], r["partition_key"], r["kind"], r["detail"]) for r in rows] == [
        ("run-1", "k", "MISSING_EVENT", {"a": 1}),
        ("run-2", None, "EXTRA_FILE", {"f": "x"}),
    ]
    assert rows[0]["recorded_at"].utcoffset().total_seconds() == 0
    assert [r["kind"] for r in store.discrepancies("run-2")] == ["EXTRA_FILE"]
    assert store.discrepancies("none") == []


@pytest.mark.parametrize(
    ("table", "statement"),
    [
        ("audit_events", "UPDATE audit_events SET event_type = 'forged'"),
        ("audit_events", "UPDATE audit_events SET event_json = '{}' WHERE seq = 0"),
        ("audit_events", "DELETE FROM audit_events"),
        ("audit_events", "DELETE FROM audit_events WHERE seq = 1"),
        ("discrepancy_events", "UPDATE discrepancy_events SET kind = 'forged'"),
        ("discrepancy_events", "DELETE FROM discrepancy_events"),
    ],
)
def test_triggers_refuse_update_and_delete(store: CatalogStore, table: str, statement: str) -> None:
    _append_next(store, CHAIN, "a")
    _append_next(store, CHAIN, "b")
    store.record_discrepancy(
        run_id="r", dataset=DS, version_label=VL, partition_key=None, kind="K", detail={}
    )

    def snapshot() -> list[tuple]:
        with store.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1, 2"))]

    before = snapshot()
    assert before
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), store.engine.begin() as conn:
        conn.execute(sa.text(statement))
    assert snapshot() == before
    # inserts still work
    _append_next(store, CHAIN, "c")
    store.record_discrepancy(
        run_id="r", dataset=DS, version_label=VL, partition_key=None, kind="K", detail={}
    )
    assert len(snapshot()) == len(before) + 1


@pytest.mark.postgres
def test_postgres_refuses_truncate(fresh_postgres_url: str) -> None:
    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    _append_next(store, CHAIN, "a")
    for table in ("audit_events", "discrepancy_events"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), store.engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {table}"))
    assert len(store.audit_events(CHAIN)) == 1
    store.close()


@pytest.mark.postgres
def test_plain_postgresql_url_is_accepted(fresh_postgres_url: str) -> None:
    plain = fresh_postgres_url.replace("postgresql+psycopg://", "postgresql://")
    store = CatalogStore(plain)
    store.migrate()
    store.start_run("r", DS, VL, "p", "d", {})
    run = store.get_run("r")
    assert run is not None
    assert run["status"] == "running"
    store.close()


# -- audit chain mirror -----------------------------------------------------------------------


def test_chain_append_head_and_events(store: CatalogStore) -> None:
    assert store.chain_heads() == {}
    with store.locked_chain(CHAIN) as tx:
        assert tx.head() is None
        assert tx.events_after(-1) == []
        e0, e1 = _event(0, None, "a"), None
        e1 = _event(1, e0["chain"]["event_hash"], "b")
        tx.append([e0, e1])
        assert tx.head() == (1, e1["chain"]["event_hash"])
        assert tx.events_after(0) == [e1]
    assert store.chain_heads() == {CHAIN: (1, e1["chain"]["event_hash"])}
    assert store.audit_events(CHAIN) == [e0, e1]
    assert store.audit_events("other/v1") == []
    # event_json is the exact sorted, compact, non-ASCII-preserving text
    with store.engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT event_json, event_type, prev_event_hash FROM audit_events")
        ).all()
    assert stored[0][0].startswith('{"chain":{"chain_key":"events/v1","event_hash":')
    assert "héllo" in stored[0][0]
    assert stored[1][1:] == ("partition_committed", e0["chain"]["event_hash"])
    # an empty chain that was only locked is not reported as a head
    with store.locked_chain("empty/v1") as tx:
        assert tx.head() is None
    assert set(store.chain_heads()) == {CHAIN}


def test_chain_append_refuses_bad_links(store: CatalogStore) -> None:
    _append_next(store, CHAIN, "a")
    head_hash = store.chain_heads()[CHAIN][1]
    bad = [
        _event(2, head_hash, "skip"),  # seq gap
        _event(0, None, "again"),  # seq repeated
        _event(1, "sha256:" + "0" * 64, "wrong-prev"),  # wrong prev hash
        _event(1, None, "null-prev"),
        _event(1, head_hash, "other-chain", chain_key="other/v1"),
    ]
    for event in bad:
        with pytest.raises(ValueError), store.locked_chain(CHAIN) as tx:
            tx.append([event])
    # the second event of a batch must link to the first
    good = _event(1, head_hash, "b")
    with pytest.raises(ValueError), store.locked_chain(CHAIN) as tx:
        tx.append([good, _event(2, head_hash, "c")])
    assert store.chain_heads()[CHAIN] == (0, head_hash)
    assert len(store.audit_events(CHAIN)) == 1
    # a duplicate event_hash (same event in another chain) is refused as ValueError too
    dup = _event(0, None, "a")
    dup["chain"]["chain_key"] = "other/v1"
    with pytest.raises(ValueError), store.locked_chain("other/v1") as tx:
        tx.append([dup])


def test_locked_chain_rolls_back_on_error(store: CatalogStore) -> None:
    _append_next(store, CHAIN, "a")
    with pytest.raises(RuntimeError), store.locked_chain(CHAIN) as tx:
        head = tx.head()
        assert head is not None
        tx.append([_event(1, head[1], "b")])
        raise RuntimeError("boom")
    assert store.chain_heads()[CHAIN][0] == 0
    assert len(store.audit_events(CHAIN)) == 1


def _check_chain(store: CatalogStore, chain_key: str, total: int, tags: dict[str, int]) -> None:
    events = store.audit_events(chain_key)
    assert [e["chain"]["seq"] for e in events] == list(range(total))
    prev = None
    for e in events:
        assert e["chain"]["prev_event_hash"] == prev
        prev = e["chain"]["event_hash"]
    assert store.chain_heads()[chain_key] == (total - 1, prev)
    counts: dict[str, int] = {}
    for e in events:
        worker = e["payload"]["tag"].split("-")[0]
        counts[worker] = counts.get(worker, 0) + 1
    assert counts == tags


def test_locked_chain_serialises_processes(catalog_url: str) -> None:
    store = CatalogStore(catalog_url)
    store.migrate()
    _run_processes(_chain_worker, [(catalog_url, CHAIN, w, 25) for w in range(4)])
    _check_chain(store, CHAIN, 100, {f"w{w}": 25 for w in range(4)})
    store.close()


def test_locked_chain_serialises_threads(store: CatalogStore) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(15):
                _append_next(store, "threads/v1", f"t{worker}-{i}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert errors == []
    _check_chain(store, "threads/v1", 60, {f"t{w}": 15 for w in range(4)})


# -- model-based check of the partition status machine ----------------------------------------


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.integers(1, 4)),
        st.tuples(st.just("rollback"), st.integers(1, 4), st.one_of(st.none(), st.integers(1, 4))),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_partition_status_machine(ops: list[tuple]) -> None:
    store = CatalogStore("sqlite://")
    store.migrate()
    model: dict[int, str] = {}
    for op in ops:
        if op[0] == "record":
            for v, s in model.items():
                if s == "committed" and v != op[1]:
                    model[v] = "superseded"
            model[op[1]] = "committed"
            _record(store, op[1])
            continue
        _, version, restored = op
        expect_error = version not in model or (
            restored is not None and (restored == version or restored not in model)
        )
        try:
            store.mark_partition_rolled_back(
                dataset=DS,
                version_label=VL,
                partition_key="20240101T000000Z",
                version=version,
                restored_version=restored,
            )
        except (KeyError, ValueError):
            assert expect_error
            continue
        assert not expect_error
        model[version] = "rolled_back"
        if restored is not None:
            for v, s in model.items():
                if s == "committed" and v != restored:
                    model[v] = "superseded"
            model[restored] = "committed"
    assert _statuses(store) == model
    assert list(model.values()).count("committed") <= 1
    current = store.current_partition(DS, VL, "20240101T000000Z")
    committed = [v for v, s in model.items() if s == "committed"]
    assert (current["version"] if current else None) == (committed[0] if committed else None)
    store.close()


# -- the PostgreSQL test plugin itself ----------------------------------------------------------


@pytest.mark.parametrize("ci", [None, "true"])
def test_postgres_plugin_without_binaries(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    from pcbo_dagster_tests import postgres_server

    monkeypatch.setattr(postgres_server, "_find_bindir", lambda: None)
    monkeypatch.delenv("PCBO_TEST_POSTGRES_URL", raising=False)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match="PostgreSQL not available"):
            postgres_server._Server().start()
    else:
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception, match="required in CI"):
            postgres_server._Server().start()


# -- a fresh SQLite catalog from the schema snapshot (issue 18) ----------------------------------


def test_the_fresh_sqlite_schema_snapshot_is_what_the_migrations_create(tmp_path) -> None:
    from pcbo_dagster.catalog import fresh_schema, sqlite_schema
    from pcbo_dagster.catalog.database import Database

    assert sqlite_schema.REVISION == HEAD_REVISION, "regenerate sqlite_schema.py (see fresh_schema)"
    migrated = fresh_schema.migrated_schema(tmp_path)
    db = Database(f"sqlite:///{tmp_path / 'fresh.db'}")
    db.migrate()  # an empty file: created from the snapshot, without Alembic
    assert db.at_head()
    db.close()
    assert fresh_schema.schema_of(tmp_path / "fresh.db") == migrated
    # and Alembic sees it at head: nothing left to upgrade
    db.migrate_with_alembic()
    db.close()
    assert fresh_schema.schema_of(tmp_path / "fresh.db") == migrated


def test_a_fresh_sqlite_catalog_does_not_import_alembic(tmp_path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pcbo_dagster.catalog import CatalogStore\n"
        f"CatalogStore({'sqlite:///' + str(tmp_path / 'c.db')!r}).migrate()\n"
        "assert 'alembic' not in sys.modules, 'alembic imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_insert_ignore_says_whether_it_inserted(store) -> None:
    """True for the row it inserted, False for one already there (on PostgreSQL too, where psycopg 3
    forgets an INSERT's row count once the cursor is closed); the row first inserted stays."""
    from pcbo_dagster.catalog import schema as t
    from pcbo_dagster.catalog.database import insert_ignore

    p = t.audit_pending_batches
    row = {
        "chain_key": "a/v1",
        "first_seq": 7,
        "events_json": "[]",
        "recorded_at": datetime(2024, 1, 2, tzinfo=UTC),
    }
    with store.write() as conn:
        assert insert_ignore(conn, p, row, ["chain_key"]) is True
        assert insert_ignore(conn, p, {**row, "first_seq": 8}, ["chain_key"]) is False
        assert insert_ignore(conn, p, {**row, "chain_key": "b/v1"}, ["chain_key"]) is True
        assert conn.execute(sa.select(p.c.chain_key, p.c.first_seq).order_by(p.c.chain_key)).all() == [
            ("a/v1", 7),
            ("b/v1", 7),
        ]


# -- insert_ignore and upsert reuse one statement per table and columns (issue 18) ----------------


def test_insert_ignore_and_upsert_store_what_a_statement_built_for_the_values_stores(store) -> None:
    """The cached ON CONFLICT statements bind each value with its column's type (a UTCDateTime goes
    through its processor): the stored row is byte for byte the one a statement built from the values
    stores, on SQLite and PostgreSQL; insert_ignore says whether it inserted; upsert updates only the
    columns given beyond the key; a column the table lacks is refused."""
    from pcbo_dagster.catalog import schema as t
    from pcbo_dagster.catalog.database import _insert, insert_ignore, upsert

    p = t.audit_pending_batches
    when = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    row = {"first_seq": 7, "events_json": '[{"a":"h\u00e9"}]', "recorded_at": when}
    raw = sa.select(
        p.c.chain_key, p.c.first_seq, p.c.events_json, sa.cast(p.c.recorded_at, sa.Text).label("at")
    ).order_by(p.c.chain_key)
    with store.write() as conn:
        conn.execute(_insert(conn, p).values(chain_key="built/v1", **row))
        assert insert_ignore(conn, p, {"chain_key": "cached/v1", **row}, ["chain_key"]) is True
        assert (
            insert_ignore(conn, p, {"chain_key": "cached/v1", **row, "first_seq": 8}, ["chain_key"]) is False
        )
        built, cached = conn.execute(raw).all()
    assert built[1:] == cached[1:] and cached.first_seq == 7
    first_at = cached.at
    later = datetime(2025, 1, 1, tzinfo=UTC)
    with store.write() as conn:
        upsert(conn, p, {"chain_key": "cached/v1", "first_seq": 9, "events_json": "[]", "recorded_at": later})
        upsert(conn, p, {"chain_key": "new/v1", **row})
        conn.execute(
            _insert(conn, p)
            .values(chain_key="built/v1", first_seq=9, events_json="[]", recorded_at=later)
            .on_conflict_do_update(
                index_elements=["chain_key"],
                set_={"first_seq": 9, "events_json": "[]", "recorded_at": later},
            )
        )
        built, cached, new = conn.execute(raw).all()
    assert built[1:] == cached[1:] and cached.first_seq == 9 and cached.at != first_at
    assert tuple(new) == ("new/v1", 7, row["events_json"], first_at)
    with pytest.raises(KeyError), store.write() as conn:
        insert_ignore(conn, p, {"chain_key": "x/v1", "no_such_column": 1, **row}, ["chain_key"])


# -- the transparency tree's nodes are read by one built statement (issue 18) ----------------------


def test_the_stored_log_reads_exactly_the_nodes_asked_for(store) -> None:
    """Appends go through the stored tree's frontier, read with one statement over the levels and
    indexes asked for: every root of every size is the tree of the chain's own events (another chain
    with nodes at the same positions is never read), and `_nodes` answers exactly the pairs asked
    for, none of the others its statement reads, and nothing for a pair the tree lacks."""
    from pcbo_dagster.catalog.transparency import _nodes
    from pcbo_dagster.core import merkle
    from pcbo_dagster.core.transparency_log import event_leaf

    other = "other/v1"
    for i in range(13):
        _append_next(store, CHAIN, f"t{i}")
        _append_next(store, other, f"o{i}")
    leaves = [event_leaf(e) for e in store.audit_events(CHAIN)]
    with store.log_reader(CHAIN) as reader:
        assert reader.size == 13
        for size in range(1, 14):
            assert reader.root(size) == merkle.root(leaves[:size])
    with store.read() as conn:
        wanted = [
            (3, 0),
            (2, 2),
            (0, 12),
        ]  # the frontier of 13: the statement also reads (2, 0), (0, 0), (0, 2)
        got = _nodes(conn, CHAIN, wanted)
        assert sorted(got) == sorted(wanted)
        assert got[(0, 12)] == merkle.leaf_hash(leaves[12])
        assert got[(3, 0)] == merkle.root(leaves[:8]) and got[(2, 2)] == merkle.root(leaves[8:12])
        assert _nodes(conn, CHAIN, [(3, 0), (3, 1), (4, 0)]) == {(3, 0): got[(3, 0)]}
        assert _nodes(conn, other, wanted)[(3, 0)] != got[(3, 0)]
        assert _nodes(conn, CHAIN, []) == {}


def test_an_answered_idempotency_key_is_forgotten_a_day_after_its_first_request(
    store: CatalogStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: every execute stores its whole document under its `Idempotency-Key`, and the
    keys were kept for ever: a token could grow the catalog without bound with fresh keys. An answered
    key is kept 24 hours from its first request, then a request with it is a new one; a key whose
    request is still being answered is kept."""
    from pcbo_dagster.catalog import server_records

    start = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    monkeypatch.setattr(server_records, "utc_now", lambda: start)
    assert store.claim_idempotency_key("ops", "k1", "sha256:" + "1" * 64) is None
    store.answer_idempotency_key("ops", "k1", 200, {"status": "committed"})
    assert store.claim_idempotency_key("ops", "k2", "sha256:" + "2" * 64) is None  # never answered
    monkeypatch.setattr(server_records, "utc_now", lambda: start + timedelta(hours=23, minutes=59))
    kept = store.claim_idempotency_key("ops", "k1", "sha256:" + "1" * 64)
    assert kept is not None and kept["response"] == {"status": "committed"}
    monkeypatch.setattr(server_records, "utc_now", lambda: start + timedelta(hours=24, seconds=1))
    assert store.claim_idempotency_key("ops", "k1", "sha256:" + "1" * 64) is None  # a new request
    in_flight = store.claim_idempotency_key("ops", "k2", "sha256:" + "2" * 64)
    assert in_flight is not None and in_flight["http_status"] is None


@pytest.mark.postgres
def test_the_catalogs_advisory_locks_are_the_systems_whatever_the_search_path(
    fresh_postgres_url: str,
) -> None:
    """Red-team finding: the chain writer's, the partition writers' and the migration's advisory locks
    called `pg_advisory_lock`, `pg_advisory_xact_lock` and `hashtextextended` unqualified, so someone
    who can write the catalog database put `public` before `pg_catalog` on its search path and
    shadowed them with functions that lock nothing: writers on two hosts no longer took turns."""
    from sqlalchemy.engine import make_url

    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    database = make_url(fresh_postgres_url).database
    with store.write() as conn:
        for name, returns, value in (
            ("pg_advisory_lock", "void", "NULL::void"),
            ("pg_advisory_unlock", "boolean", "true"),
            ("pg_advisory_xact_lock", "void", "NULL::void"),
        ):
            conn.execute(
                sa.text(
                    f"CREATE FUNCTION public.{name}(bigint) RETURNS {returns} "
                    f"LANGUAGE sql AS $$ SELECT {value} $$"
                )
            )
        conn.execute(sa.text(f'ALTER DATABASE "{database}" SET search_path = public, pg_catalog'))
    store.close()

    def advisory_locks() -> int:
        with CatalogStore(fresh_postgres_url).engine.connect() as other:
            return int(
                other.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_database d "
                        "ON d.oid = l.database WHERE l.locktype = 'advisory' AND l.granted "
                        "AND d.datname = pg_catalog.current_database()"
                    )
                ).scalar_one()
            )

    with store.chain_writer_lock("events/v1"):
        held = advisory_locks()
    store.close()
    assert held == 1


@pytest.mark.postgres
def test_a_chain_writer_lock_held_by_hand_is_waited_for_only_as_long_as_a_lease(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: a session holding a chain's writer lock (`pg_advisory_lock` by hand, or a
    writer stuck in its append) made every run that appends to the chain wait for as long as it
    lasted, past `PCBO_LEASE_WAIT_SECONDS`; the append now gives up within that wait, exit 1 naming
    the lock."""
    import psycopg
    from sqlalchemy.engine import make_url

    from pcbo_dagster.core.errors import PcboError
    from pcbo_dagster.core.json_documents import compact_text

    monkeypatch.setenv("PCBO_LEASE_WAIT_SECONDS", "1")
    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    conninfo = make_url(fresh_postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    outcome: list[BaseException | None] = []
    with psycopg.connect(conninfo, autocommit=True) as holder:
        holder.execute(
            "SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtextextended(%s, 0))",
            (compact_text(["pcbo.chain", CHAIN]),),
        )

        def append() -> None:
            try:
                with store.chain_writer_lock(CHAIN):
                    outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - checked below
                outcome.append(exc)

        writer = threading.Thread(target=append, daemon=True)
        writer.start()
        writer.join(60)  # a bound on a hang, not a measurement: the wait asked for is 1 s
        still_waiting = writer.is_alive()
    writer.join()
    store.close()
    assert not still_waiting, "the append waited on the chain's writer lock past PCBO_LEASE_WAIT_SECONDS"
    assert len(outcome) == 1 and isinstance(outcome[0], PcboError), outcome
    assert CHAIN in str(outcome[0]) and "PCBO_LEASE_WAIT_SECONDS" in str(outcome[0]), outcome[0]


def _migrate_fresh(url: str) -> None:
    fresh = CatalogStore(url)
    try:
        fresh.migrate()
    finally:
        fresh.close()


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("hold", "named"),
    [
        ("LOCK TABLE audit_chain_heads IN ACCESS EXCLUSIVE MODE", "audit_chain_heads"),
        ("SELECT 1 FROM audit_chain_heads FOR UPDATE", "audit_chain_heads"),
        ("SELECT pg_catalog.pg_advisory_lock({key})", "migration"),
        ("SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtextextended({partition}, 0))", "partition"),
    ],
)
def test_a_catalog_lock_held_by_hand_is_waited_for_only_as_long_as_a_lease(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch, hold: str, named: str
) -> None:
    """Red-team finding: a session holding the chain heads (`LOCK TABLE audit_chain_heads` or their rows
    `FOR UPDATE` by hand) or the migration's advisory lock made an audit append, or a migration, wait for
    as long as it was held, past `PCBO_LEASE_WAIT_SECONDS`; they now give up within that wait, exit 1
    naming what they waited for, nothing appended."""
    import psycopg
    from sqlalchemy.engine import make_url

    from pcbo_dagster.catalog.database import MIGRATION_LOCK_KEY
    from pcbo_dagster.core.errors import PcboError
    from pcbo_dagster.core.json_documents import compact_text

    monkeypatch.setenv("PCBO_LEASE_WAIT_SECONDS", "1")
    migration = named == "migration"
    store = CatalogStore(fresh_postgres_url)
    if not migration:
        store.migrate()
        with store.locked_chain(CHAIN) as tx:
            tx.append([_event(0, None, "a")])
    conninfo = make_url(fresh_postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    outcome: list[BaseException | None] = []

    def contend() -> None:
        try:
            if migration:
                _migrate_fresh(fresh_postgres_url)
            elif named == "partition":
                _record(store, 1)
            else:
                with store.locked_chain(CHAIN) as tx:
                    tx.append([_event(1, _event(0, None, "a")["chain"]["event_hash"], "b")])
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome.append(exc)

    with psycopg.connect(conninfo) as holder:
        partition = compact_text(["pcbo.partition", DS, VL, "20240101T000000Z"])
        holder.execute(
            hold.format(key=MIGRATION_LOCK_KEY, partition="%s"), (partition,) * hold.count("{partition}")
        )
        contender = threading.Thread(target=contend, daemon=True)
        contender.start()
        contender.join(60)  # a bound on a hang, not a measurement: the wait asked for is 1 s
        still_waiting = contender.is_alive()
        holder.rollback()
        holder.execute("SELECT pg_catalog.pg_advisory_unlock_all()")
    contender.join()
    assert not still_waiting, "the catalog lock was waited for past PCBO_LEASE_WAIT_SECONDS"
    assert len(outcome) == 1 and isinstance(outcome[0], PcboError), outcome
    assert named in str(outcome[0]) and "PCBO_LEASE_WAIT_SECONDS" in str(outcome[0]), outcome[0]
    if migration:
        assert not store.at_head()  # nothing migrated
    elif named == "partition":
        assert store.partition_versions(DS, VL) == []  # nothing recorded
    else:
        assert [r["seq"] for r in store.audit_event_rows(CHAIN)] == [0]  # nothing appended
    store.close()


@pytest.mark.postgres
def test_a_catalog_table_or_row_locked_by_hand_is_waited_for_only_as_long_as_a_lease(
    fresh_postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Red-team finding: `LOCK TABLE partitions` (runs, lineage, any catalog table) or a row of `runs` or
    `partitions` held `FOR UPDATE` by hand in an open session made `execute`, `verify`, `rollback` and
    every other command wait for as long as it was held; each now gives up within
    `PCBO_LEASE_WAIT_SECONDS`, exit 1 naming the table, nothing half written: once the lock is let go
    the same command goes through and `verify` finds the stores clean."""
    import json

    import psycopg
    from sqlalchemy.engine import make_url

    from pcbo_dagster.cli.main import main
    from pcbo_dagster_tests.cli_runner import load_generator, write_request

    monkeypatch.setenv("PCBO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PCBO_CATALOG_URL", fresh_postgres_url)
    monkeypatch.setenv("PCBO_LEASE_WAIT_SECONDS", "0.5")
    generator = load_generator()
    first, second = (
        write_request(
            tmp_path / f"{r}.json", generator.make_request(records=8, partitions=2, seed=i, run_id=r)
        )
        for i, r in enumerate(("a", "b"))
    )

    def pcbo(*args: str | Path) -> tuple[int | None, str]:
        """`pcbo ARGS` in this process; its status (None: still waiting after 30 s) and stderr."""
        outcome: list[int] = []
        thread = threading.Thread(target=lambda: outcome.append(main([str(a) for a in args])), daemon=True)
        thread.start()
        thread.join(30)  # a bound on a hang, not a measurement: the wait asked for is 0.5 s
        status = outcome[0] if outcome else None
        if status is None:
            holder.rollback()  # let it go, so the thread ends
            thread.join()
        return status, capsys.readouterr().err

    assert pcbo("execute", "--input", first)[0] == 0
    conninfo = make_url(fresh_postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    report = tmp_path / "verify.json"
    with psycopg.connect(conninfo) as holder:
        for hold, command, named in (
            ("LOCK TABLE partitions IN ACCESS EXCLUSIVE MODE", ("execute", "--input", second), "partitions"),
            (
                "LOCK TABLE partitions IN SHARE MODE",
                ("rollback", "--dataset", "events", "--run-id", "b"),
                "partitions",
            ),
            ("LOCK TABLE lineage IN ACCESS EXCLUSIVE MODE", ("verify", "--output", report), "lineage"),
            ("SELECT 1 FROM runs WHERE run_id = 'a' FOR UPDATE", ("execute", "--input", first), "runs"),
            ("LOCK TABLE dataset_leases IN ACCESS EXCLUSIVE MODE", ("gc",), "dataset_leases"),
        ):
            holder.execute(hold)
            status, stderr = pcbo(*command)
            assert status == 1, (hold, command, status, stderr)
            assert f"catalog table {named} " in stderr and "PCBO_LEASE_WAIT_SECONDS" in stderr, (hold, stderr)
            holder.rollback()
            if command[0] == "execute":  # what it left is clean, or a crash window repair heals
                assert pcbo("verify", "--repair", "--output", report)[0] == 0
            status, stderr = pcbo(*command)
            assert status == 0, (hold, command, stderr)
    assert pcbo("verify", "--output", report)[0] == 0
    assert json.loads(report.read_text())["status"] == "clean"


@pytest.mark.postgres
def test_every_catalog_table_locked_by_hand_is_waited_for_only_as_long_as_a_lease_and_named(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each catalog table (rollouts, approvals, soak evaluations, checkpoints, cosignatures, the API's
    records, source indexes, alerts, `alembic_version`, ...) held by `LOCK TABLE` in another session:
    a statement on it (here one with a bound value before the table's name, which psycopg sends as
    `$1`) gives up within `PCBO_LEASE_WAIT_SECONDS`, `CatalogLockBusy` naming that table."""
    import time

    import psycopg
    from sqlalchemy.engine import make_url

    from pcbo_dagster.catalog import schema as t
    from pcbo_dagster.catalog.database import CatalogLockBusy

    monkeypatch.setenv("PCBO_LEASE_WAIT_SECONDS", "0.1")
    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    tables = [*t.metadata.sorted_tables, sa.table("alembic_version")]
    assert len(tables) > 25
    conninfo = make_url(fresh_postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as holder:
        for table in tables:
            holder.execute(f"LOCK TABLE {table.name} IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(CatalogLockBusy) as busy, store.read() as conn:
                conn.execute(sa.select(sa.literal("x")).select_from(table).limit(1))
            assert time.monotonic() - started < 20  # a bound on a hang: the wait asked for is 0.1 s
            assert busy.value.locked == f"the catalog table {table.name}", str(busy.value)
            holder.rollback()
    store.close()


@pytest.mark.postgres
def test_an_id_sequence_restarted_behind_its_table_is_named_with_its_fix(
    fresh_postgres_url, tmp_path
) -> None:
    """Red-team finding: `ALTER SEQUENCE lineage_id_seq RESTART WITH 1` made every run and `verify
    --repair` fail with a bare `duplicate key value violates unique constraint "pk_lineage"`; the
    error now names the sequence behind the table's largest id and the `setval` that fixes it (exit 1,
    nothing committed), and once fixed the run goes through."""
    import psycopg
    from sqlalchemy.engine import make_url

    from pcbo_dagster_tests.cli_runner import load_generator, run_pcbo, write_request

    env = {"PCBO_CATALOG_URL": fresh_postgres_url}
    generator = load_generator()
    home = tmp_path / "home"
    first = write_request(
        tmp_path / "a.json", generator.make_request(records=20, partitions=2, seed=1, run_id="a")
    )
    assert run_pcbo(["execute", "--input", first], home=home, env=env).status == 0
    conninfo = make_url(fresh_postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute("ALTER SEQUENCE lineage_id_seq RESTART WITH 1")
    second = write_request(
        tmp_path / "b.json", generator.make_request(records=20, partitions=2, seed=2, run_id="b")
    )
    commands: list[list[str | Path]] = [["execute", "--input", second], ["verify", "--repair"]]
    for args in commands:
        run = run_pcbo(args, home=home, env=env)
        assert run.status == 1, run.stderr
        assert "lineage_id_seq" in run.stderr and "SELECT pg_catalog.setval(" in run.stderr, run.stderr
        assert "internal error" not in run.stderr, run.stderr
    with psycopg.connect(conninfo, autocommit=True) as admin:
        assert admin.execute(
            "SELECT count(*) FROM runs WHERE run_id = 'b' AND status = 'succeeded'"
        ).fetchone() == (0,)
        fix = run.stderr[run.stderr.index("SELECT pg_catalog.setval(") :].split(";")[0]
        admin.execute(fix)
    assert run_pcbo(["execute", "--input", second], home=home, env=env).status == 0
    verify = run_pcbo(["verify"], home=home, env=env)
    assert verify.status == 0 and verify.document["status"] == "clean", (verify.stderr, verify.document)


@pytest.mark.postgres
def test_an_alert_is_not_dropped_as_already_raised_by_a_restarted_id_sequence(fresh_postgres_url) -> None:
    """Red-team finding: with `alerts_id_seq` set back, a new alert's id collided with a stored one and
    `raise_alert` took the collision for its key already raised: the alert was dropped silently."""
    import psycopg
    from sqlalchemy.engine import make_url

    from pcbo_dagster.catalog.database import CatalogSequenceBehind
    from pcbo_dagster.catalog.rollouts import RolloutStore

    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    alerts = RolloutStore(store)

    def raise_alert(key: str) -> dict[str, Any] | None:
        return alerts.raise_alert(
            alert_key=key, kind="k", severity="critical", subject="s", detail={}, mac="m", state_mac="m"
        )

    assert raise_alert("first") is not None
    conninfo = make_url(fresh_postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute("ALTER SEQUENCE alerts_id_seq RESTART WITH 1")
    with pytest.raises(CatalogSequenceBehind, match="alerts_id_seq"):
        raise_alert("second")
    store.close()


@pytest.mark.postgres
def test_a_duplicate_key_of_a_table_without_an_id_sequence_stays_an_integrity_error(
    fresh_postgres_url,
) -> None:
    """The named sequence error is only for a table with an id sequence: a duplicate primary key of
    another (a rollout created concurrently, which its caller catches) is still an IntegrityError."""
    from pcbo_dagster.catalog import schema as t

    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    row = {
        "chain_key": CHAIN,
        "first_seq": 0,
        "events_json": "[]",
        "recorded_at": datetime(2024, 1, 1, tzinfo=UTC),
    }
    with store.write() as conn:
        conn.execute(t.audit_pending_batches.insert().values(**row))
    with pytest.raises(sa.exc.IntegrityError), store.write() as conn:
        conn.execute(t.audit_pending_batches.insert().values(**row))
    store.close()

"""The audit backup every host shares (issue 14): one object per event on an object store (moto's S3
server on loopback), written create-only, with a verified host-local cache; one PostgreSQL catalog.

"Hosts" here are separate `PCBO_HOME` directories (each its own local disk: its own cache, lock files
and decision spills) that share only the lake URL, the catalog URL and the audit store URL. Each
`pcbo` is a process of its own, forked from one that imported pcbo once (`pcbo_fork_runner`).
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.audit.backup import AuditBackup, AuditBackupCorrupt
from pcbo_dagster.audit.log import AuditLog, ChainDivergence
from pcbo_dagster.audit.object_store_backup import (
    AuditBackupConflict,
    ObjectStoreAuditBackup,
    event_name,
    open_backup,
)
from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.core.audit_chain import build_event, verify_chain
from pcbo_dagster.core.canonical import jcs
from pcbo_dagster.lake.storage import StoreUnavailable
from pcbo_dagster_tests.cli_runner import load_generator, write_request
from pcbo_dagster_tests.faulty_proxy import FaultyProxy
from pcbo_dagster_tests.pcbo_fork_runner import run_pcbo_forked as run_pcbo

pytestmark = pytest.mark.postgres
KEY = "events/v1"


@pytest.fixture
def s3_env(s3_store, monkeypatch) -> dict[str, str]:
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    return dict(s3_store.env)


@pytest.fixture
def store_url(s3_store, s3_env) -> str:
    return s3_store.url(f"pas-{uuid.uuid4().hex[:8]}")


def _catalog(url: str) -> CatalogStore:
    catalog = CatalogStore(url)
    catalog.migrate()
    return catalog


def _log(store_url: str, cache: Path, catalog: CatalogStore) -> AuditLog:
    return AuditLog(ObjectStoreAuditBackup(store_url, cache), catalog)


def _appended(
    store_url: str, cache: Path, catalog: CatalogStore, count: int
) -> tuple[AuditLog, ObjectStoreAuditBackup, list[dict[str, Any]]]:
    """A log over the object store (`_log`) with `count` events appended: (the log, its backup, the
    events)."""
    log = _log(store_url, cache, catalog)
    events = log.append_many(KEY, [("e", _body(i)) for i in range(count)])
    store = log.backup
    assert isinstance(store, ObjectStoreAuditBackup)
    return log, store, events


def _body(n: int) -> dict[str, Any]:
    return {"n": n}


def _object(store: ObjectStoreAuditBackup, seq: int) -> str:
    return f"{store._chain_dir(KEY)}/{event_name(seq)}"


def test_open_backup_chooses_by_location(tmp_path, store_url):
    assert isinstance(open_backup(store_url, tmp_path / "cache"), ObjectStoreAuditBackup)
    assert isinstance(open_backup(tmp_path / "pas", None), AuditBackup)
    assert isinstance(open_backup(f"file://{tmp_path / 'pas'}", None), AuditBackup)


def test_events_are_objects_written_create_only(tmp_path, store_url, fresh_postgres_url):
    catalog = _catalog(fresh_postgres_url)
    log, store, written = _appended(store_url, tmp_path / "cache", catalog, 3)
    for event in written:
        assert store.fs.cat_file(_object(store, event["chain"]["seq"])) == jcs(event)
    # The store itself refuses a second, different object at a seq.
    forged = build_event(
        chain_key=KEY,
        seq=1,
        prev_event_hash=written[0]["chain"]["event_hash"],
        event_type="e",
        timestamp="2024-01-01T00:00:00Z",
        body=_body(99),
    )
    with pytest.raises(FileExistsError):
        store.fs.pipe_file(_object(store, 1), jcs(forged), mode="create")
    with pytest.raises(AuditBackupConflict):
        store._create_all(KEY, [forged])
    store._create_all(KEY, [written[1]])  # the very same event again: a no-op
    assert store.read_chain(KEY) == written
    assert catalog.audit_events(KEY) == written
    catalog.close()


def test_a_second_host_with_an_empty_or_stale_cache_continues_the_one_chain(
    tmp_path, store_url, fresh_postgres_url
):
    catalog_a, catalog_b = _catalog(fresh_postgres_url), _catalog(fresh_postgres_url)
    host_a = _log(store_url, tmp_path / "a", catalog_a)
    host_b = _log(store_url, tmp_path / "b", catalog_b)
    host_a.append_many(KEY, [("e", _body(i)) for i in range(3)])
    host_b.append(KEY, "e", _body(3))  # its cache is empty
    host_a.append(KEY, "e", _body(4))  # A's cache is stale (it lacks seq 3)
    host_b.append(KEY, "e", _body(5))
    events = host_a.backup.read_chain(KEY)
    assert [e["n"] for e in events] == [0, 1, 2, 3, 4, 5]
    assert verify_chain(events, KEY) == []
    assert host_b.backup.read_chain(KEY) == events == catalog_a.audit_events(KEY)
    catalog_a.close()
    catalog_b.close()


def test_a_batch_cut_short_with_a_hole_is_completed_from_the_pending_copy(
    tmp_path, store_url, fresh_postgres_url, monkeypatch
):
    catalog = _catalog(fresh_postgres_url)
    log = _log(store_url, tmp_path / "a", catalog)
    log.append(KEY, "e", _body(0))
    real = ObjectStoreAuditBackup._create_all

    def crash_after_first_and_last(self, chain_key, events):
        real(self, chain_key, [events[0], events[-1]])  # concurrent PUTs: the middle one never landed
        raise RuntimeError("killed mid-batch")

    monkeypatch.setattr(ObjectStoreAuditBackup, "_create_all", crash_after_first_and_last)
    with pytest.raises(RuntimeError):
        log.append_many(KEY, [("e", _body(i)) for i in (1, 2, 3)])
    monkeypatch.setattr(ObjectStoreAuditBackup, "_create_all", real)
    other = _log(store_url, tmp_path / "b", _catalog(fresh_postgres_url))
    assert [e["n"] for e in other.backup.read_chain(KEY)] == [0, 1]  # up to the hole
    result = other.sync_to_catalog(KEY)
    assert (result.to_backup, result.to_head_store) == (1, 3)  # the hole written, seq 3 already there
    events = other.backup.read_chain(KEY)
    assert [e["n"] for e in events] == [0, 1, 2, 3] and verify_chain(events, KEY) == []
    assert catalog.audit_events(KEY) == events
    other.append(KEY, "e", _body(4))
    assert [e["n"] for e in log.backup.read_chain(KEY)] == [0, 1, 2, 3, 4]


def _forged_next(events: list[dict], n: int, seq_offset: int = 1) -> dict:
    return build_event(
        chain_key=KEY,
        seq=events[-1]["chain"]["seq"] + seq_offset,
        prev_event_hash=events[-1]["chain"]["event_hash"],
        event_type="e",
        timestamp="2024-01-01T00:00:00Z",
        body=_body(n),
    )


def test_an_event_put_on_the_store_alone_is_never_adopted(tmp_path, store_url, fresh_postgres_url):
    catalog = _catalog(fresh_postgres_url)
    log, store, events = _appended(store_url, tmp_path / "a", catalog, 2)
    store.fs.pipe_file(_object(store, 2), jcs(_forged_next(events, 666)), mode="create")
    with pytest.raises(ChainDivergence, match="never recorded as pending"):
        log.append(KEY, "e", _body(2))
    with pytest.raises(ChainDivergence):
        _log(store_url, tmp_path / "b", catalog).sync_to_catalog(KEY)
    assert len(catalog.audit_events(KEY)) == 2


def test_a_stray_event_beyond_a_hole_is_never_adopted(tmp_path, store_url, fresh_postgres_url):
    catalog = _catalog(fresh_postgres_url)
    log, store, events = _appended(store_url, tmp_path / "a", catalog, 2)
    store.fs.pipe_file(_object(store, 3), jcs(_forged_next(events, 666, seq_offset=2)), mode="create")
    log.append(KEY, "e", _body(2))  # seq 2: below the stray object
    with pytest.raises(ChainDivergence, match="does not continue the chain"):
        log.append(KEY, "e", _body(3))  # seq 3 holds an event nobody recorded (and that links nowhere)
    assert [e["n"] for e in catalog.audit_events(KEY)] == [0, 1, 2]
    chains, problems = store.read_all_with_problems()
    assert verify_chain(chains[KEY], KEY) != [] or problems


def test_a_deleted_event_object_stops_every_append(tmp_path, store_url, fresh_postgres_url):
    catalog = _catalog(fresh_postgres_url)
    log, store, _ = _appended(store_url, tmp_path / "a", catalog, 3)
    store.fs.rm_file(_object(store, 1))
    for host in (log, _log(store_url, tmp_path / "b", catalog)):  # a warm cache changes nothing
        with pytest.raises(ChainDivergence, match="lacks"):
            host.append(KEY, "e", _body(3))
    assert len(catalog.audit_events(KEY)) == 3


def test_the_cache_is_checked_and_dropped_at_the_first_disagreement(tmp_path, store_url, fresh_postgres_url):
    catalog = _catalog(fresh_postgres_url)
    log, store, written = _appended(store_url, tmp_path / "a", catalog, 3)
    cache_file = store.cache.paths(KEY).events
    # An edited cached event: the chain no longer verifies; the store's events are read again.
    lines = cache_file.read_bytes().splitlines(keepends=True)
    cache_file.write_bytes(lines[0] + lines[1].replace(b'"n":1', b'"n":7') + lines[2])
    fresh = ObjectStoreAuditBackup(store_url, tmp_path / "a")
    assert fresh.read_chain(KEY) == written
    # A cache ahead of the store (an event the store does not hold) is dropped, never used.
    extra = _forged_next(written, 3)
    with open(cache_file, "ab") as fh:
        fh.write(jcs(extra) + b"\n")
    again = ObjectStoreAuditBackup(store_url, tmp_path / "a")
    assert again.read_chain(KEY) == written
    assert AuditBackup(cache_file.parent.parent).read_chain(KEY) == written
    # A cache of another history whose events all verify: its last event is not the store's.
    other = ObjectStoreAuditBackup(store_url, tmp_path / "a")
    other.cache.paths(KEY).events.unlink()
    alien = [
        build_event(
            chain_key=KEY,
            seq=0,
            prev_event_hash=None,
            event_type="e",
            timestamp="2024-01-01T00:00:00Z",
            body=_body(0),
        )
    ]
    other.cache.append(KEY, alien)
    assert other.read_chain(KEY) == written
    catalog.close()


def test_a_long_lived_process_checks_its_cache_again_at_every_read(tmp_path, store_url, fresh_postgres_url):
    """Red-team finding: a process that keeps one backup open (`pcbo serve`) skipped the
    hash-by-hash check of its cache once it had checked it to the same last event, so a cached event
    edited below the last one after a first read was answered by every later read of that process
    (a fresh process dropped the cache and read the store). Every read now checks the cache."""
    catalog = _catalog(fresh_postgres_url)
    log, store, written = _appended(store_url, tmp_path / "a", catalog, 3)
    assert store.read_chain(KEY) == written
    cache_file = store.cache.paths(KEY).events
    lines = cache_file.read_bytes().splitlines(keepends=True)
    cache_file.write_bytes(lines[0] + lines[1].replace(b'"n":1', b'"n":7') + lines[2])
    assert store.read_chain(KEY) == written
    assert AuditBackup(cache_file.parent.parent).read_chain(KEY) == written
    catalog.close()


@pytest.fixture(params=["s3", "gs"])
def any_store_url(request, monkeypatch) -> str:
    """A fresh audit store URL on moto's S3 or on the GCS emulator (their listings fingerprint an
    object differently: an ETag; a generation, MD5 and CRC32C)."""
    store = request.getfixturevalue(f"{request.param.replace('gs', 'gcs')}_store")
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    return store.url(f"pas-{uuid.uuid4().hex[:8]}")


def test_a_long_lived_process_sees_an_event_object_rewritten_below_the_head(
    tmp_path, any_store_url, fresh_postgres_url
):
    """Known limit until 2026-12-08: a process that keeps one backup open (`pcbo serve`: proofs, the
    reconciliation stream) checked its cache against the store's last event object only, so an object
    below it rewritten on the store went unseen by it (`verify`, which reads every object, reported
    it). Every read now compares each object's listed fingerprint with the one kept when its bytes were
    compared with the cache: a rewritten one drops the cache, and the store's events are read again."""
    catalog = _catalog(fresh_postgres_url)
    log = _log(any_store_url, tmp_path / "a", catalog)
    written = log.append_many(KEY, [("e", _body(i)) for i in range(4)])
    store = log.backup
    assert isinstance(store, ObjectStoreAuditBackup)
    assert store.read_chain_with_problems(KEY) == (written, [])  # the cache is warm, its objects pinned
    assert store.read_chain_with_problems(KEY) == (written, [])
    forged = dict(written[1], body=_body(7))
    store.fs.pipe(_object(store, 1), jcs(forged))
    events, problems = store.read_chain_with_problems(KEY)
    assert problems == [f"{store.location}: {KEY}: the event at seq 1 does not continue the chain"]
    assert events[1]["body"] == _body(7)
    with pytest.raises(AuditBackupCorrupt, match="seq 1 does not continue"):
        store.last_event(KEY)
    with pytest.raises(ChainDivergence):
        log.append(KEY, "e", _body(4))
    # The genuine object put back: the chain reads clean again, in the same process.
    store.fs.pipe(_object(store, 1), jcs(written[1]))
    assert store.read_chain_with_problems(KEY) == (written, [])
    catalog.close()


def test_the_kept_fingerprints_are_only_the_caches(tmp_path, store_url, fresh_postgres_url):
    """Fingerprints kept beside the cache that are missing, not a list, or of other objects cost a
    comparison of the objects' bytes, never a wrong chain."""
    catalog = _catalog(fresh_postgres_url)
    log = _log(store_url, tmp_path / "a", catalog)
    written = log.append_many(KEY, [("e", _body(i)) for i in range(3)])
    store = log.backup
    assert isinstance(store, ObjectStoreAuditBackup)
    assert store.read_chain(KEY) == written
    kept = store._fingerprints_path(KEY)
    assert len(json.loads(kept.read_bytes())) == 3
    for planted in (b"", b"{}", b'["x", 1]', json.dumps(["forged"] * 3).encode()):
        kept.write_bytes(planted)
        assert store.read_chain_with_problems(KEY) == (written, [])
    # Fingerprints copied from the store as it is after a rewrite: the rewritten object's bytes are
    # still compared where it is the last one, and below it the cache holds the genuine chain.
    store.fs.pipe(_object(store, 2), jcs(dict(written[2], body=_body(9))))
    fingerprints = store._listing(KEY)
    kept.write_text(json.dumps([fingerprints[seq][1] for seq in range(3)]))
    events, problems = store.read_chain_with_problems(KEY)
    assert problems and events[2]["body"] == _body(9)
    catalog.close()


def test_hosts_appending_at_once_keep_one_linear_chain(tmp_path, store_url, fresh_postgres_url):
    hosts = [_log(store_url, tmp_path / f"host{i}", _catalog(fresh_postgres_url)) for i in range(3)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for n in range(8):
                hosts[index].append_many(
                    KEY, [("e", {"host": index, "n": n}), ("e", {"host": index, "n": -n})]
                )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    events = hosts[0].backup.read_chain(KEY)
    assert len(events) == 48 and verify_chain(events, KEY) == []
    assert len({json.dumps(e["chain"]) for e in events}) == 48
    for host in hosts:
        assert host.backup.read_chain(KEY) == events
    assert hosts[1].head_store is not None
    catalog = hosts[1].head_store
    assert isinstance(catalog, CatalogStore)
    assert catalog.audit_events(KEY) == events


# -- whole runs on two "hosts" (two homes) sharing the lake, the catalog and the audit store --------


def _store_chain(store_env: dict[str, str], url: str, key: str = KEY) -> list[dict[str, Any]]:
    """The chain read straight from the store's objects (no engine code)."""
    import fsspec

    options = {"client_kwargs": {"endpoint_url": store_env["PCBO_S3_ENDPOINT_URL"]}}
    fs = fsspec.filesystem("s3", **options)
    base = url.split("://", 1)[1] + "/" + key
    fs.invalidate_cache()
    names = sorted(p for p in fs.ls(base, detail=False) if p.rsplit("/", 1)[-1][0].isdigit())
    return [json.loads(fs.cat_file(p)) for p in names]


def _assert_one_commit_per_content(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    assert verify_chain(events, KEY) == []
    commits: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event["event_type"] == "partition_committed":
            commits.setdefault(event["partition"]["key"], []).append(event)
    for key, found in commits.items():
        checksums = [e["manifest"]["checksum"] for e in found]
        assert len(set(checksums)) == len(checksums), f"{key}: one content committed twice"
    return commits


def test_two_hosts_with_stale_local_directories_never_duplicate_an_event(
    tmp_path, s3_store, s3_env, store_url, fresh_postgres_url
):
    generator = load_generator()
    request = generator.make_request(records=120, partitions=6, seed=5, run_id="hosts-1")
    first = write_request(tmp_path / "first.json", request)
    changed = dict(request, runId="hosts-2", sourceRecords=request["sourceRecords"][:-7])
    second = write_request(tmp_path / "second.json", changed)
    env = {
        **s3_env,
        "PCBO_LAKE_URL": s3_store.url(f"lake-{uuid.uuid4().hex[:8]}"),
        "PCBO_CATALOG_URL": fresh_postgres_url,
        "PCBO_AUDIT_DIR": store_url,
        "PCBO_MULTI_HOST": "true",
    }
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    run = run_pcbo(["execute", "--input", first], home=a, env=env, cwd=tmp_path)
    assert run.status == 0, run.stderr
    assert {p["status"] for p in run.document["partitions"]} == {"committed"}
    after_a = _store_chain(env, store_url)
    # Host B has never seen the chain: the same request changes nothing and appends nothing.
    run = run_pcbo(["execute", "--input", first], home=b, env=env, cwd=tmp_path)
    assert run.status == 0, run.stderr
    assert {p["status"] for p in run.document["partitions"]} == {"unchanged"}
    assert _store_chain(env, store_url) == after_a
    # B commits new versions; A's local cache is now stale, and A's next run still continues the chain.
    run = run_pcbo(["execute", "--input", second], home=b, env=env, cwd=tmp_path)
    assert run.status == 0, run.stderr
    run = run_pcbo(["execute", "--input", first], home=a, env=env, cwd=tmp_path)
    assert run.status == 0, run.stderr
    run = run_pcbo(["execute", "--input", first], home=b, env=env, cwd=tmp_path)
    assert run.status == 0 and {p["status"] for p in run.document["partitions"]} == {"unchanged"}
    events = _store_chain(env, store_url)
    commits = _assert_one_commit_per_content(events)
    assert len(commits) == 6
    # A third host, from an empty directory, finds everything clean.
    run = run_pcbo(["verify"], home=tmp_path / "host-c", env=env, cwd=tmp_path)
    assert run.status == 0, run.document
    assert run.document["status"] == "clean"
    assert run.document["checked"]["chains"] == {KEY: len(events)}


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"PCBO_AUDIT_DIR": "STORE"}, "PCBO_CATALOG_URL"),
        ({"PCBO_MULTI_HOST": "true", "PCBO_AUDIT_DIR": "STORE"}, "PCBO_CATALOG_URL"),
        ({"PCBO_MULTI_HOST": "true", "PCBO_CATALOG_URL": "PG"}, "PCBO_AUDIT_DIR"),
        ({"PCBO_MULTI_HOST": "true", "PCBO_CATALOG_URL": "PG", "PCBO_AUDIT_DIR": "STORE"}, "PCBO_LAKE_URL"),
        ({"PCBO_MULTI_HOST": "maybe"}, "PCBO_MULTI_HOST"),
    ],
)
def test_a_configuration_that_cannot_hold_on_many_hosts_is_refused(
    tmp_path, s3_env, store_url, postgres_url, settings, named
):
    request = load_generator().make_request(records=10, partitions=1, seed=1, run_id="refused")
    path = write_request(tmp_path / "req.json", request)
    replace = {"STORE": store_url, "PG": postgres_url}
    env = {**s3_env, **{k: replace.get(v, v) for k, v in settings.items()}}
    home = tmp_path / "home"
    run = run_pcbo(["execute", "--input", path], home=home, env=env, cwd=tmp_path)
    assert run.status == 2, (run.status, run.stderr)
    assert run.stderr.startswith(f"pcbo: invalid input: {named}:") or named in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert not home.exists()


def test_a_read_that_fails_while_a_hole_is_filled_drops_nothing(
    tmp_path, s3_store, store_url, fresh_postgres_url, monkeypatch
):
    """A batch cut short with a hole (seq 1 and 3 on the store, 2 not): the catalog's pending copy
    fills the hole only when the store holds an event after it, which `holds_beyond_chain` reads
    from the store. A read of seq 3 that failed (a network blip, a 503 after botocore's retries) was
    taken for "not held": seq 2 and 3 were dropped with the pending batch, the store kept seq 3, the
    next append wrote another seq 2 before it, and the chain was broken for good (every run refused).
    Now the failure stops the reconciliation (`StoreUnavailable`, naming the object), nothing dropped;
    once the store answers, the batch is completed."""
    catalog = _catalog(fresh_postgres_url)
    log = _log(store_url, tmp_path / "a", catalog)
    log.append(KEY, "e", _body(0))
    real_create = ObjectStoreAuditBackup._create_all

    def crash_after_first_and_last(self, chain_key, events):
        real_create(self, chain_key, [events[0], events[-1]])
        raise RuntimeError("killed mid-batch")

    monkeypatch.setattr(ObjectStoreAuditBackup, "_create_all", crash_after_first_and_last)
    with pytest.raises(RuntimeError):
        log.append_many(KEY, [("e", _body(i)) for i in (1, 2, 3)])
    monkeypatch.setattr(ObjectStoreAuditBackup, "_create_all", real_create)

    # The other host reaches the store through a proxy that answers 503 for seq 3 (every retry).
    proxy = FaultyProxy(s3_store.env["PCBO_S3_ENDPOINT_URL"])
    monkeypatch.setenv("PCBO_S3_ENDPOINT_URL", proxy.url)
    try:
        other = _log(store_url, tmp_path / "b", _catalog(fresh_postgres_url))
        store = other.backup
        assert isinstance(store, ObjectStoreAuditBackup)
        held = "/" + _object(store, 3)
        proxy.fail(lambda method, path: method == "GET" and path == held, "503")
        with pytest.raises(StoreUnavailable, match="000000000003.json: Service Unavailable"):
            other.sync_to_catalog(KEY)
        assert proxy.failed
        assert [e["n"] for e in catalog.audit_events(KEY)] == [0]  # nothing adopted, nothing dropped
        proxy.heal()
        result = other.sync_to_catalog(KEY)
        assert (result.to_backup, result.to_head_store) == (1, 3)
        other.append(KEY, "e", _body(4))
        events = log.backup.read_chain(KEY)
        assert [e["n"] for e in events] == [0, 1, 2, 3, 4] and verify_chain(events, KEY) == []
        assert catalog.audit_events(KEY) == events
    finally:
        proxy.close()


def test_an_object_named_like_an_event_in_other_digits_is_no_event(tmp_path, store_url, fresh_postgres_url):
    """Event objects are written create-only, so the store keeps the first object at a seq. An object
    whose name only *reads* as that seq (`\\d` matches every Unicode digit, and int() reads them:
    seq 2 in Arabic-Indic digits) was taken for it: a host reading the chain got the planted event
    in place of seq 2 (runs then refused), and verify counted two events at seq 2. Such a name is no
    event: runs ignore it, verify reports it."""
    alias = "\u0660" * 11 + "\u0662.json"
    catalog = _catalog(fresh_postgres_url)
    log, store, written = _appended(store_url, tmp_path / "a", catalog, 3)
    forged = _forged_next(written[:2], 666)
    store.fs.pipe_file(f"{store._chain_dir(KEY)}/{alias}", jcs(forged), mode="create")

    fresh = ObjectStoreAuditBackup(store_url, tmp_path / "b")  # an empty cache: the store is read
    assert fresh.read_chain(KEY) == written
    _log(store_url, tmp_path / "b", catalog).append(KEY, "e", _body(3))  # runs go on
    chains, problems = fresh.read_all_with_problems()
    assert [e["n"] for e in chains[KEY]] == [0, 1, 2, 3]
    assert any("not an audit event object" in p for p in problems), problems


def test_a_signed_deployment_delivers_its_events_and_checkpoints_from_the_object_store(
    tmp_path, s3_store, s3_env, store_url, fresh_postgres_url
):
    """Red-team finding: with an object-store audit backup, the operator's key and an audit endpoint,
    every run failed after its commit (an internal error: the checkpoint's delivery marker was looked
    for as a local file of the backup, which an object store has none of). The marker is now an object
    beside the delivery cursor (`_checkpoint_delivered.json`); `verify` takes neither for an event."""
    from pcbo_dagster.core.signed_note import new_signing_key
    from pcbo_dagster_tests.test_audit_delivery import Receiver

    key_file = tmp_path / "operator.key"
    key_file.write_text(new_signing_key("ops.example/operator").text + "\n")
    key_file.chmod(0o600)
    receiver = Receiver().start()
    try:
        request = load_generator().make_request(records=40, partitions=2, seed=5, run_id="signed-1")
        env = {
            **s3_env,
            "PCBO_LAKE_URL": s3_store.url(f"lake-{uuid.uuid4().hex[:8]}"),
            "PCBO_CATALOG_URL": fresh_postgres_url,
            "PCBO_AUDIT_DIR": store_url,
            "PCBO_MULTI_HOST": "true",
            "PCBO_SIGNING_KEY": str(key_file),
            "PCBO_AUDIT_ENDPOINT": receiver.url,
        }
        home = tmp_path / "host-a"
        request_file = write_request(tmp_path / "r.json", request)
        run = run_pcbo(["execute", "--input", request_file], home=home, env=env)
        assert run.status == 0, run.stderr
        events = _store_chain(env, store_url)
        bodies = [json.loads(b) for b in receiver.accepted]
        assert [b["chain"]["seq"] for b in bodies if "chain" in b] == list(range(len(events)))
        assert [b["tree_size"] for b in bodies if b.get("type") == "pcbo.checkpoint/1"] == [len(events)]
        run = run_pcbo(["log", "publish", "--dataset", "events"], home=tmp_path / "host-b", env=env)
        assert run.status == 0 and run.document["checkpoint"]["delivered"] is True, run.stderr
        assert len(receiver.accepted) == len(bodies)  # the other host sends nothing again
        run = run_pcbo(["verify"], home=tmp_path / "host-c", env=env)
        assert run.status == 0, run.document
    finally:
        receiver.close()

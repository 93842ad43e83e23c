"""Crash safety (CONTRACT section 4): `PCBO_FAILPOINT=<point>@<partition>` kills execute abruptly at
each step of a middle partition's commit; what is left must be consistent, and the next run (or
`pcbo verify --repair`) must finish the job exactly as an uninterrupted run would have.

Each `pcbo` is a process of its own, forked from one that imported pcbo once (`pcbo_fork_runner`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster_tests.cli_runner import (
    backup_events,
    lake_dir,
    lake_files,
    load_generator,
    write_request,
)
from pcbo_dagster_tests.frozen_hosts import start_frozen, woken
from pcbo_dagster_tests.pcbo_fork_runner import run_pcbo_forked as run_pcbo

pytestmark = pytest.mark.slow

CRASH_STATUS = 86
PARTITIONS = 5
MIDDLE = 2
KEYS = [f"20240101T0{h}0000Z" for h in range(PARTITIONS)]

#: point -> is the crashed partition (committed, audited, catalogued) when the process dies.
#: The engine may commit several partitions together (a batch), so other partitions of the batch can
#: be a step ahead of or behind it; the checks below hold for any batching.
MIDDLE_STATE: dict[str, tuple[bool, bool, bool]] = {
    "after_data_files": (False, False, False),  # data file written, no commit point: invisible
    "before_commit": (False, False, False),  # version and rollback manifests written too
    "after_commit": (True, False, False),  # committed, no audit event, no catalog row
    "after_event": (True, True, False),  # committed and audited, no catalog row
    "after_catalog": (True, True, True),  # all done but the run's summary
}


def make_request() -> dict[str, Any]:
    return load_generator().make_request(records=150, partitions=PARTITIONS, seed=5, run_id="crash-run-001")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="module")
def request_file(work: Path) -> Path:
    return write_request(work / "request.json", make_request())


@pytest.fixture(scope="module")
def reference_home(work: Path, request_file: Path) -> Path:
    """An uninterrupted run. Tests must not modify it: copy it."""
    home = work / "reference"
    status, document, stderr = run_pcbo(["execute", "--input", request_file], home=home)
    assert status == 0, stderr
    assert [p["key"] for p in document["partitions"]] == KEYS
    return home


@pytest.fixture(scope="module")
def reference(reference_home: Path) -> dict[str, bytes]:
    """The lake of an uninterrupted run."""
    return lake_files(reference_home)


@pytest.fixture(scope="module")
def changed_request_file(work: Path) -> Path:
    """The request with one more record in the middle partition, under another run id."""
    request = make_request()
    request["runId"] = "crash-run-002"
    request["sourceRecords"].append(
        {
            "id": "zz-late-0001",
            "occurredAt": "2024-01-01T02:30:00Z",
            "jurisdiction": "US",
            "consentGranted": True,
            "retentionExpiresAt": "2026-01-01T00:00:00Z",
            "amount": 5,
            "channel": "web",
            "converted": True,
        }
    )
    return write_request(work / "changed.json", request)


def _verify(home: Path, *extra: str) -> dict[str, Any]:
    status, document, stderr = run_pcbo(["verify", *extra], home=home)
    assert document is not None, stderr
    assert status == (0 if document["status"] == "clean" else 1), (status, document)
    return document


def _commits(home: Path, key: str) -> list[tuple[str, int]]:
    events = backup_events(home)
    return [(e["event_type"], e["partition"]["version"]) for e in events if e["partition"]["key"] == key]


def _catalog_versions(home: Path, key: str) -> list[tuple[int, str]]:
    with sqlite3.connect(home / "catalog.db") as db:
        return db.execute(
            "SELECT version, status FROM partitions WHERE partition_key = ? ORDER BY version", (key,)
        ).fetchall()


def _crash(home: Path, request_file: Path, point: str) -> None:
    status, document, stderr = run_pcbo(
        ["execute", "--input", request_file], home=home, env={"PCBO_FAILPOINT": f"{point}@{MIDDLE}"}
    )
    assert status == CRASH_STATUS, (status, stderr)
    assert document is None, "a crashed execute printed its document"


def _state(home: Path) -> tuple[set[str], set[str], set[str]]:
    """(committed, audited, catalogued) partition keys: a `_manifest.json`, a commit event, a
    committed catalog row. Checks that no committed partition is half written."""
    lake = lake_dir(home) / "events" / "v1"
    committed = {p.parent.name for p in lake.rglob("_manifest.json")}
    for key in committed:
        manifest = json.loads((lake / key / "_manifest.json").read_bytes())
        assert manifest["files"]
        for entry in manifest["files"]:
            data = (lake_dir(home) / entry["path"]).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == entry["checksum"], f"{key} half written"
            assert len(data) == entry["byteSize"]
    audited = {e["partition"]["key"] for e in backup_events(home)}
    with sqlite3.connect(home / "catalog.db") as db:
        rows = db.execute("SELECT partition_key FROM partitions WHERE status = 'committed'").fetchall()
    catalogued = {key for (key,) in rows}
    return committed, audited, catalogued


def _assert_one_commit_event_per_partition(home: Path) -> None:
    chain = backup_events(home, intents=True)
    assert [e["chain"]["seq"] for e in chain] == list(range(len(chain)))
    events = backup_events(home)
    assert all(e["event_type"] == "partition_committed" for e in events)
    assert sorted(e["partition"]["key"] for e in events) == KEYS, "lost or duplicated commit events"


@pytest.mark.parametrize("point", list(MIDDLE_STATE))
def test_crash_then_rerun_matches_an_uninterrupted_run(work, request_file, reference, point):
    home = work / f"home-{point}"
    _crash(home, request_file, point)

    # (a) what the crash left is consistent: only the findings the crash point explains
    committed, audited, catalogued = _state(home)
    assert catalogued <= audited <= committed <= set(KEYS)
    assert (KEYS[MIDDLE] in committed, KEYS[MIDDLE] in audited, KEYS[MIDDLE] in catalogued) == (
        MIDDLE_STATE[point]
    )
    assert list((lake_dir(home) / "events" / "v1" / KEYS[MIDDLE]).glob("part-*.parquet")), (
        "the crashed partition's data file was written before the crash"
    )
    document = _verify(home)
    assert document["checked"]["partitions"] == len(committed)
    found = sorted((f["kind"], f["where"]) for f in document["findings"])
    expected = sorted(
        [("audit_event_missing", f"events/v1/{k}") for k in committed - audited]
        + [("catalog_mismatch", f"events/v1/{k}") for k in committed - catalogued]
    )
    assert found == expected, document["findings"]

    # (b) the next run completes the job, byte for byte like an uninterrupted run
    status, result, stderr = run_pcbo(["execute", "--input", request_file], home=home)
    assert status == 0, stderr
    assert [p["key"] for p in result["partitions"]] == KEYS
    assert [p["status"] for p in result["partitions"]] == [
        "unchanged" if k in committed else "committed" for k in KEYS
    ]
    healed = {p["key"] for p in result["partitions"] if p.get("healed")}
    assert healed == committed - (audited & catalogued)
    assert all(p["version"] == 1 for p in result["partitions"])

    document = _verify(home)
    assert document["status"] == "clean", document["findings"]
    assert document["checked"]["partitions"] == PARTITIONS
    assert lake_files(home) == reference
    _assert_one_commit_event_per_partition(home)


def test_crash_after_commit_is_healed_by_verify_repair(work, request_file, reference):
    home = work / "home-repair"
    _crash(home, request_file, "after_commit")

    document = _verify(home, "--repair")
    assert document["status"] == "clean", document["findings"]
    repaired = {(r["kind"], r["where"]) for r in document["repaired"]}
    assert ("audit_event_appended", f"events/v1/{KEYS[MIDDLE]}") in repaired
    committed, audited, catalogued = _state(home)
    assert committed == audited == catalogued and KEYS[MIDDLE] in committed
    events = backup_events(home)
    assert len(events) == len(committed)
    last = next(e for e in events if e["partition"]["key"] == KEYS[MIDDLE])
    manifest_bytes = (lake_dir(home) / "events" / "v1" / KEYS[MIDDLE] / "_manifest.json").read_bytes()
    assert last["event_type"] == "partition_committed"
    assert last["partition"]["key"] == KEYS[MIDDLE]
    assert last["manifest"]["checksum"] == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    assert last["merkle_root"] == json.loads(manifest_bytes)["merkleRoot"]

    document = _verify(home)
    assert document["status"] == "clean", document["findings"]

    # the next run neither duplicates the repaired event nor misses the rest
    status, result, stderr = run_pcbo(["execute", "--input", request_file], home=home)
    assert status == 0, stderr
    assert [p["status"] for p in result["partitions"]] == [
        "unchanged" if k in committed else "committed" for k in KEYS
    ]
    assert not any(p.get("healed") for p in result["partitions"])
    assert lake_files(home) == reference
    _assert_one_commit_event_per_partition(home)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_mid_run_is_one_line_and_records_the_run_interrupted(work, request_file, reference, sent):
    """Walk finding: Ctrl-C (SIGINT) in the middle of an execute — here once the middle partition's
    commit point is written, before its event — printed Python's KeyboardInterrupt traceback (some
    thirty lines, where every failure is one line on stderr) and left the run's `runs` row `running`
    for ever. Now: one line saying the command was interrupted, the process still ended by SIGINT (as
    a shell expects of a program it interrupted: it reports 130), the row `interrupted`; what was
    committed stays, and the next run of the request heals and completes it as after a crash. A SIGTERM
    (`docker stop`, a pod's end) ended the process at once, its row `running`; now it stops the run as
    a Ctrl-C does, and the process ends by SIGTERM."""
    home = work / f"home-{sent.name}"
    process = start_frozen(home, ["execute", "--input", request_file], {}, f"after_commit@{MIDDLE}")
    os.kill(process.pid, sent)  # delivered when it is woken, at the failpoint
    status, stderr = woken(process)
    assert status == -sent, (status, stderr)
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"pcbo execute: interrupted ({sent.name}); what it committed stays"), stderr
    with sqlite3.connect(home / "catalog.db") as db:
        (row_status,) = db.execute("SELECT status FROM runs WHERE run_id = 'crash-run-001'").fetchone()
    assert row_status == "interrupted"
    committed, audited, _ = _state(home)
    assert KEYS[MIDDLE] in committed - audited

    status, result, stderr = run_pcbo(["execute", "--input", request_file], home=home)
    assert status == 0, stderr
    assert lake_files(home) == reference
    _assert_one_commit_event_per_partition(home)
    with sqlite3.connect(home / "catalog.db") as db:
        (row_status,) = db.execute("SELECT status FROM runs WHERE run_id = 'crash-run-001'").fetchone()
    assert row_status == result["status"] != "interrupted"


def test_repair_waits_for_a_live_run_and_never_heals_its_commit(work, request_file):
    """Red-team finding: `verify --repair` took no lock, so a live run's commit — its intent appended,
    its commit point written, its events not yet — looked like a crash window: repair appended the
    commit event, then the run appended its own, and the chain committed that version twice for good.
    Repair takes the write lock of every dataset version, so it waits for runs under way (here: a
    lock held while the lake is in that very state, beyond PCBO_LEASE_WAIT_SECONDS: exit 1, nothing
    appended), and heals only once the run is gone."""
    from pcbo_dagster.catalog import CatalogStore

    home = work / "home-live"
    _crash(home, request_file, "after_commit")
    before = backup_events(home)
    live = json.dumps({"run": "live-run", "pid": 1, "host": "another-host", "token": "t"}, sort_keys=True)
    catalog = CatalogStore(f"sqlite:///{home / 'catalog.db'}")
    try:
        # a run on another host (taking over the lease the crashed run left)
        assert catalog.try_acquire_lease("events", "v1", live, 600, is_stale=lambda _: True) is None
        waited = run_pcbo(["verify", "--repair"], home=home, env={"PCBO_LEASE_WAIT_SECONDS": "1"})
        assert waited.status == 1 and waited.document is None, waited
        assert "is being written by run 'live-run'" in waited.stderr, waited.stderr
        assert backup_events(home) == before
        assert _verify(home)["status"] == "findings"  # plain verify takes no lock
        catalog.release_lease("events", "v1", live)
    finally:
        catalog.close()
    assert _verify(home, "--repair")["status"] == "clean"
    _assert_one_commit_event_per_partition(home)


def test_a_crashed_unaudited_version_is_audited_before_a_new_version_supersedes_it(
    work, request_file, changed_request_file
):
    """Crash after the middle partition's commit point, then run a request that changes that
    partition: version 1 was visible to readers, so the chain and the catalog must record it (commit
    event, then version 2's), and rolling back version 2 must restore a version the catalog knows."""
    home = work / "home-superseded"
    key = KEYS[MIDDLE]
    _crash(home, request_file, "after_commit")
    status, result, stderr = run_pcbo(["execute", "--input", changed_request_file], home=home)
    assert status == 0, stderr
    assert [(p["status"], p["version"]) for p in result["partitions"]][MIDDLE] == ("committed", 2)

    assert _commits(home, key) == [("partition_committed", 1), ("partition_committed", 2)]
    assert _catalog_versions(home, key) == [(1, "superseded"), (2, "committed")]
    document = _verify(home)
    assert document["status"] == "clean", document["findings"]

    status, rolled, stderr = run_pcbo(["rollback", "--dataset", "events", "--partition", key], home=home)
    assert status == 0, stderr
    assert [(p["version"], p["restoredVersion"]) for p in rolled["partitions"]] == [(2, 1)]
    assert _catalog_versions(home, key) == [(1, "committed"), (2, "rolled_back")]
    document = _verify(home)
    assert document["status"] == "clean", document["findings"]


def test_rollback_of_a_crashed_unaudited_version(work, reference_home, changed_request_file):
    """Version 2 committed, then a crash before its event: rolling it back records its commit first,
    then its rollback, restores version 1 and leaves everything consistent."""
    home = work / "home-rollback-unaudited"
    shutil.copytree(reference_home, home)
    key = KEYS[MIDDLE]
    _crash(home, changed_request_file, "after_commit")
    version_1 = (lake_dir(home) / "events" / "v1" / key / "_versions" / "v000001.json").read_bytes()

    status, rolled, stderr = run_pcbo(["rollback", "--dataset", "events", "--partition", key], home=home)
    assert status == 0, stderr
    assert [(p["version"], p["restoredVersion"]) for p in rolled["partitions"]] == [(2, 1)]
    assert (lake_dir(home) / "events" / "v1" / key / "_manifest.json").read_bytes() == version_1
    assert _commits(home, key) == [
        ("partition_committed", 1),
        ("partition_committed", 2),
        ("partition_rolled_back", 2),
    ]
    assert _catalog_versions(home, key) == [(1, "committed"), (2, "rolled_back")]
    document = _verify(home)
    assert document["status"] == "clean", document["findings"]


def test_a_crash_after_a_superseding_versions_event_is_healed_whole_by_repair(
    work, reference_home, changed_request_file
):
    """Red-team finding: version 2 committed and audited, then a crash before its catalog row: the
    catalog still says version 1 is `committed`. That row is part of the same crash window (recording
    version 2 supersedes it), yet `verify` reported it as `catalog_version_mismatch` and `verify
    --repair` healed the window while calling that row tampering it refused to touch (exit 1), after
    which a plain `verify` was clean."""
    home = work / "home-superseding-after-event"
    shutil.copytree(reference_home, home)
    key = KEYS[MIDDLE]
    _crash(home, changed_request_file, "after_event")
    assert _catalog_versions(home, key) == [(1, "committed")]

    document = _verify(home)
    assert [(f["kind"], f["where"]) for f in document["findings"]] == [
        ("catalog_mismatch", f"events/v1/{key}")
    ]
    assert "crash window" in document["findings"][0]["detail"]

    document = _verify(home, "--repair")
    assert document["status"] == "clean", document["findings"]
    assert {(r["kind"], r["where"]) for r in document["repaired"]} == {
        ("catalog_row_recorded", f"events/v1/{key}")
    }
    assert _catalog_versions(home, key) == [(1, "superseded"), (2, "committed")]
    assert _verify(home)["status"] == "clean"


def test_a_rollback_killed_after_its_event_is_reported_as_the_crash_window_it_is(
    work, reference_home, changed_request_file
):
    """Walk finding: a rollback killed after its event, before the catalog step: plain `verify` said
    the catalog's status of both versions disagrees with the chain (`catalog_mismatch`,
    `catalog_version_mismatch`) without saying it is a crash window `--repair` heals (it does)."""
    home = work / "home-rollback-after-event"
    shutil.copytree(reference_home, home)
    key = KEYS[MIDDLE]
    status, _, stderr = run_pcbo(["execute", "--input", changed_request_file], home=home)
    assert status == 0, stderr
    status, _, stderr = run_pcbo(
        ["rollback", "--dataset", "events", "--partition", key],
        home=home,
        env={"PCBO_FAILPOINT": "rollback_after_event@0"},
    )
    assert status == CRASH_STATUS, stderr
    assert _catalog_versions(home, key) == [(1, "superseded"), (2, "committed")]

    document = _verify(home)
    assert [(f["kind"], f["where"]) for f in document["findings"]] == [
        ("catalog_mismatch", f"events/v1/{key}")
    ]
    assert "crash window" in document["findings"][0]["detail"]
    document = _verify(home, "--repair")
    assert document["status"] == "clean", document["findings"]
    assert _catalog_versions(home, key) == [(1, "committed"), (2, "rolled_back")]


@pytest.mark.parametrize("crash", [None, "rollback_after_commit_point@0"])
def test_a_rollback_keeps_a_file_an_older_version_shares(tmp_path: Path, crash: str | None) -> None:
    """Red-team finding: a partition's content went A (v1), B (v2), A (v3); data files are named by
    their content, so v3 reuses v1's file. Rolling v3 back (uninterrupted, or killed after the commit
    point and completed by `verify --repair`) removed that file, since v2 does not name it: v1 could
    never be restored again and verify failed for good. A rollback keeps every file of the restored
    version's lineage."""
    request = json.loads((Path(__file__).parents[1] / "examples" / "demo_request.json").read_text())
    key = "20240101T000000Z"
    changed = json.loads(json.dumps(request))
    target = next(r for r in changed["sourceRecords"] if r["occurredAt"].startswith("2024-01-01T00"))
    target["amount"] = target.get("amount", 0) + 1
    home = tmp_path / "home"
    for run_id, body in (("a-1", request), ("b-1", changed), ("a-2", request)):
        path = write_request(tmp_path / f"{run_id}.json", {**body, "runId": run_id})
        status, document, stderr = run_pcbo(["execute", "--input", path], home=home)
        assert status == 0 and document is not None, stderr
    partition = lake_dir(home) / "demo-events" / "v1" / key
    assert json.loads((partition / "_manifest.json").read_text())["partitionVersion"] == 3
    v1_files = {p.name: p.read_bytes() for p in partition.glob("part-*.parquet")}
    assert len(v1_files) == 2  # v1's (= v3's) and v2's
    args = ["rollback", "--dataset", "demo-events", "--partition", key]
    if crash is None:
        status, _, stderr = run_pcbo(args, home=home)
        assert status == 0, stderr
    else:
        status, _, stderr = run_pcbo(args, home=home, env={"PCBO_FAILPOINT": crash})
        assert status == CRASH_STATUS, stderr
        assert _verify(home, "--repair")["status"] == "clean"
    assert _verify(home)["status"] == "clean"
    status, _, stderr = run_pcbo([*args, "--version", "2"], home=home)
    assert status == 0, stderr
    assert _verify(home)["status"] == "clean"
    restored = json.loads((partition / "_manifest.json").read_text())
    assert restored["partitionVersion"] == 1
    [entry] = restored["files"]
    name = entry["path"].rsplit("/", 1)[-1]
    assert (partition / name).read_bytes() == v1_files[name]
    assert {p.name for p in partition.glob("part-*.parquet")} == {name}

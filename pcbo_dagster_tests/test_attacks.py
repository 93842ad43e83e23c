"""The evidence against an attacker (issue 10): someone with write access to the lake, the catalog or
the audit backup tampers, then runs `verify`, `verify --repair`, `rollback` and `execute` the way an
operator would. Each attack must be reported by name, must survive `verify --repair` as a finding
(nothing laundered: the chain gets no event, a second `verify` still reports it), and must not be
built upon by a later run.

The base history (one module-wide fixture, copied per test): run `a1` commits four hourly partitions
K0..K3 (version 1 each); run `b1` changes K1 (version 2 replaces version 1).

A `pcbo` run as its own process (`run_pcbo`) is forked from one that imported pcbo once
(`pcbo_fork_runner`); the runs killed at random instants start their own interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from pcbo_dagster.cli import main as cli
from pcbo_dagster.core.audit_chain import build_event
from pcbo_dagster_tests.cli_runner import (
    backup_events,
    backup_file,
    lake_dir,
    lake_files,
    load_generator,
    tree_state,
    write_request,
)
from pcbo_dagster_tests.pcbo_fork_runner import run_pcbo_forked as run_pcbo

PARTITIONS = 4
KEYS = [f"20240101T0{h}0000Z" for h in range(PARTITIONS)]
K0, K1, K2, K3 = KEYS
CHAIN = "events/v1"


def _request(run_id: str, changed: bool = False) -> dict[str, Any]:
    request = load_generator().make_request(records=80, partitions=PARTITIONS, seed=11, run_id=run_id)
    if changed:
        request["sourceRecords"].append(
            {
                "id": "zz-late-0001",
                "occurredAt": "2024-01-01T01:30:00Z",
                "jurisdiction": "US",
                "consentGranted": True,
                "retentionExpiresAt": "2026-01-01T00:00:00Z",
                "amount": 5,
            }
        )
    return request


def pcbo(home: Path, *args: str) -> tuple[int, Any]:
    """`pcbo *args --home home` in this process; (exit status, the JSON document or None)."""
    out = home.parent / f"out-{uuid.uuid4().hex}.json"
    try:
        status = cli.main([*args, "--home", str(home), "--output", str(out)])
    except SystemExit as exc:  # argparse refusing a flag's value
        status = int(exc.code or 0)
    document = json.loads(out.read_text()) if out.exists() else None
    out.unlink(missing_ok=True)
    return status, document


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("attacks")
    home = work / "base"
    for name, request in (("a.json", _request("a1")), ("b.json", _request("b1", changed=True))):
        status, document = pcbo(home, "execute", "--input", str(write_request(work / name, request)))
        assert status == 0, document
    assert pcbo(home, "verify")[0] == 0
    return home


@pytest.fixture
def home(base: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(base, copy)
    return copy


@pytest.fixture
def requests(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": write_request(tmp_path / "a.json", _request("a1")),
        "b": write_request(tmp_path / "b.json", _request("b1", changed=True)),
    }


def part(home: Path, key: str) -> Path:
    return lake_dir(home) / "events" / "v1" / key


def manifest(home: Path, key: str, version: int | None = None) -> dict[str, Any]:
    path = part(home, key) / ("_manifest.json" if version is None else f"_versions/v{version:06d}.json")
    return json.loads(path.read_bytes())


def kinds(document: dict[str, Any]) -> set[str]:
    return {f["kind"] for f in document["findings"]}


def assert_found_and_not_laundered(home: Path, kind: str, where: str | None = None) -> dict[str, Any]:
    """`verify` reports `kind` (at `where`); `verify --repair` still does, appends no event and says
    it refuses; a second `verify` reports it again."""
    chain_before = backup_file(home).read_bytes()
    status, found = pcbo(home, "verify")
    assert status == 1 and kind in kinds(found), found["findings"]
    if where is not None:
        assert any(f["kind"] == kind and where in f["where"] for f in found["findings"]), found["findings"]
    status, repaired = pcbo(home, "verify", "--repair")
    assert status == 1 and kind in kinds(repaired), repaired
    assert not [r for r in repaired["repaired"] if r["kind"].endswith("event_appended")], repaired["repaired"]
    assert any("refuses" in f["detail"] for f in repaired["findings"] if f["kind"] == kind)
    assert backup_file(home).read_bytes() == chain_before, "repair appended to the chain"
    status, again = pcbo(home, "verify")
    assert status == 1 and kind in kinds(again)
    return found


def assert_execute_refuses(home: Path, request: Path) -> None:
    """A run over the tampered lake fails (exit 1) without committing or appending any commit."""
    before = lake_files(home)
    events_before = backup_events(home)
    status, document = pcbo(home, "execute", "--input", str(request))
    assert status == 1, document
    assert document["status"] == "failed"
    assert "disagrees with its audit chain" in document["totals"]["failure"]
    assert lake_files(home) == before, "the lake changed"
    assert backup_events(home) == events_before, "an event was appended"


def assert_execute_restores(home: Path, request: Path, key: str, kind: str) -> None:
    """A run over the tampered partition puts back, byte for byte, the version the chain says is
    current (never builds on the forgery), says so, and records it on the chain."""
    status, document = pcbo(home, "execute", "--input", str(request))
    assert status == 0, document
    outcome = {p["key"]: p for p in document["partitions"]}[key]
    assert outcome["status"] == "restored" and outcome["restored"]["kind"] == kind
    commits = [e for e in backup_events(home) if e["event_type"] == "partition_committed"]
    current = [e for e in commits if e["partition"]["key"] == key][-1]
    committed = (part(home, key) / "_manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(committed).hexdigest() == current["manifest"]["checksum"]
    restored = [e for e in backup_events(home) if e["event_type"] == "partition_restored"]
    assert (key, kind) in [(e["partition"]["key"], e["finding"]["kind"]) for e in restored]
    status, verified = pcbo(home, "verify")
    assert status == 0, verified["findings"]


# -- 1. verify derives the expected state from the chain ---------------------------------------------


def test_a_downgrade_to_an_older_version_is_found_and_never_healed(home, requests):
    (part(home, K1) / "_manifest.json").write_bytes((part(home, K1) / "_versions/v000001.json").read_bytes())
    assert_found_and_not_laundered(home, "commit_point_downgraded", K1)
    assert_execute_restores(home, requests["b"], K1, "commit_point_downgraded")


def test_a_run_refuses_a_partition_whose_chain_version_cannot_be_had_exactly(home, requests):
    """The downgrade again, with the chain's version 2 manifest deleted too, and a run of the other
    request (which cannot rebuild version 2's bytes): refused, nothing written."""
    (part(home, K1) / "_manifest.json").write_bytes((part(home, K1) / "_versions/v000001.json").read_bytes())
    (part(home, K1) / "_versions/v000002.json").unlink()
    assert_execute_refuses(home, requests["a"])


def test_a_forged_version_that_looks_like_an_interrupted_commit_is_refused(home, requests):
    """Version 3, naming the current manifest as its predecessor, exactly as a commit a crash cut short
    before its audit event: with no intent on the chain for it, it is a forgery."""
    current_bytes = (part(home, K1) / "_manifest.json").read_bytes()
    forged = json.loads(current_bytes)
    forged.update(
        partitionVersion=3,
        previousVersion=2,
        previousManifestChecksum="sha256:" + hashlib.sha256(current_bytes).hexdigest(),
        runId="evil-run",
    )
    data = (json.dumps(forged, sort_keys=True, indent=2) + "\n").encode()
    (part(home, K1) / "_versions" / "v000003.json").write_bytes(data)
    (part(home, K1) / "_manifest.json").write_bytes(data)
    assert_found_and_not_laundered(home, "commit_point_not_on_chain", K1)
    status, document = pcbo(home, "rollback", "--dataset", "events", "--partition", K1)
    assert status == 1 and document is None  # refused before touching anything
    assert (part(home, K1) / "_manifest.json").read_bytes() == data
    assert_execute_restores(home, requests["b"], K1, "commit_point_not_on_chain")


def test_a_deleted_manifest_is_found_and_a_run_restores_exactly_the_chains_version(home, requests):
    committed = (part(home, K2) / "_manifest.json").read_bytes()
    (part(home, K2) / "_manifest.json").unlink()
    assert_found_and_not_laundered(home, "commit_point_missing", K2)
    assert_execute_restores(home, requests["b"], K2, "commit_point_missing")
    assert (part(home, K2) / "_manifest.json").read_bytes() == committed


def test_a_deleted_partition_directory_is_found(home):
    shutil.rmtree(part(home, K3))
    assert_found_and_not_laundered(home, "commit_point_missing", K3)


def test_a_manifest_copied_from_another_partition_is_found(home):
    (part(home, K2) / "_manifest.json").write_bytes((part(home, K0) / "_manifest.json").read_bytes())
    assert_found_and_not_laundered(home, "manifest_misplaced", K2)


def test_swapped_partitions_are_found(home, requests):
    a, b = (part(home, K0) / "_manifest.json").read_bytes(), (part(home, K2) / "_manifest.json").read_bytes()
    (part(home, K0) / "_manifest.json").write_bytes(b)
    (part(home, K2) / "_manifest.json").write_bytes(a)
    found = assert_found_and_not_laundered(home, "manifest_misplaced")
    assert {
        f["where"].rsplit("/", 1)[-1] for f in found["findings"] if f["kind"] == "manifest_misplaced"
    } == {K0, K2}
    status, document = pcbo(home, "execute", "--input", str(requests["b"]))
    assert status == 0 and {p["key"] for p in document["partitions"] if p["status"] == "restored"} == {K0, K2}
    assert (part(home, K0) / "_manifest.json").read_bytes() == a
    assert pcbo(home, "verify")[0] == 0


def test_a_rolled_back_version_made_visible_again_is_found(home):
    version_2 = (part(home, K1) / "_manifest.json").read_bytes()
    status, document = pcbo(home, "rollback", "--dataset", "events", "--partition", K1)
    assert status == 0 and document["rolledBack"] == 1
    (part(home, K1) / "_manifest.json").write_bytes(version_2)
    assert_found_and_not_laundered(home, "rolled_back_version_visible", K1)


def test_an_altered_retained_version_is_found_and_never_restored(home):
    path = part(home, K1) / "_versions" / "v000001.json"
    old = json.loads(path.read_bytes())
    old["policies"]["requireConsent"] = False
    path.write_text(json.dumps(old, sort_keys=True, indent=2) + "\n")
    assert_found_and_not_laundered(home, "version_manifest_altered", K1)
    before = lake_files(home)
    status, _ = pcbo(home, "rollback", "--dataset", "events", "--partition", K1)
    assert status == 1
    assert lake_files(home) == before, "a refused rollback touched the lake"


@pytest.mark.parametrize("kind", ["version_manifest_altered", "version_manifest_missing"])
def test_the_current_versions_retained_manifest_is_put_back_by_a_run(home, requests, kind):
    """README *What happens in an execute*: a partition whose lake disagrees with its chain is never
    built upon; the run puts back exactly the version the chain says is current. The current version's
    `_versions/` manifest altered or deleted (its commit point intact) was left as it was by a re-run
    ("unchanged", `verify` still failing), and a changed request committed a new version over it."""
    path = part(home, K1) / "_versions" / "v000002.json"
    committed = path.read_bytes()
    assert committed == (part(home, K1) / "_manifest.json").read_bytes()
    if kind == "version_manifest_missing":
        path.unlink()
    else:
        path.write_bytes(committed.replace(b'"requireConsent": true', b'"requireConsent": false'))
    assert_found_and_not_laundered(home, kind, K1)
    assert_execute_restores(home, requests["b"], K1, kind)
    assert path.read_bytes() == committed


def test_a_corrupt_restorable_version_is_found_before_a_rollback_removes_anything(home):
    v1 = manifest(home, K1, 1)["files"][0]["path"]
    v2 = manifest(home, K1, 2)["files"][0]["path"]
    assert v1 != v2
    data = bytearray((lake_dir(home) / v1).read_bytes())
    data[len(data) // 2] ^= 0x01
    (lake_dir(home) / v1).write_bytes(bytes(data))
    assert_found_and_not_laundered(home, "restorable_version_corrupt", v1)
    before = lake_files(home)
    status, _ = pcbo(home, "rollback", "--dataset", "events", "--partition", K1)
    assert status == 1
    assert lake_files(home) == before and (lake_dir(home) / v2).exists()


def test_a_rollback_manifest_cannot_reach_outside_its_partition(home, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    neighbour = manifest(home, K0)["files"][0]["path"]
    path = part(home, K1) / "_rollback" / "v000002.json"
    plan = json.loads(path.read_bytes())
    plan["removeFiles"] += [neighbour, "../../../../outside.txt", str(outside)]
    path.write_text(json.dumps(plan, sort_keys=True, indent=2) + "\n")
    assert_found_and_not_laundered(home, "rollback_manifest_mismatch", K1)
    status, _ = pcbo(home, "rollback", "--dataset", "events", "--partition", K1)
    assert status == 1
    assert outside.read_text() == "keep me" and (lake_dir(home) / neighbour).exists()


def test_a_manifest_naming_another_partitions_file_is_found(home):
    path = part(home, K2) / "_manifest.json"
    forged = json.loads(path.read_bytes())
    forged["files"][0]["path"] = manifest(home, K0)["files"][0]["path"]
    path.write_text(json.dumps(forged, sort_keys=True, indent=2) + "\n")
    found = assert_found_and_not_laundered(home, "commit_point_not_on_chain", K2)
    assert "path_outside_partition" in kinds(found)


def test_a_symlink_out_of_the_lake_is_never_followed(home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(part(home, K3), elsewhere)
    os.symlink(elsewhere, part(home, K3))
    outside = {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    status, found = pcbo(home, "verify")
    assert status == 1 and found["status"] == "findings"
    status, _ = pcbo(home, "rollback", "--dataset", "events", "--partition", K3)
    assert status == 1
    assert {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()} == outside


@pytest.mark.parametrize(
    "malform",
    [
        lambda m: m["files"][0].pop("byteSize"),
        lambda m: m["files"][0].pop("checksum"),
        lambda m: m["files"][0].__setitem__("rowCount", True),
        lambda m: m.__setitem__("files", ["x"]),
        lambda m: m.__setitem__("files", 5),
        lambda m: m["files"].append(dict(m["files"][0])),
    ],
    ids=["no-byteSize", "no-checksum", "bool-rowCount", "string-entry", "not-a-list", "same-path-twice"],
)
def test_a_malformed_commit_point_is_a_finding_not_a_crash(home, malform):
    """Red-team finding: a commit point whose `files` entries lack a key, or are not objects, made
    `verify`, `verify --repair` and `proof` fail with an internal error (KeyError, TypeError): no
    findings document, every other finding hidden, genuine crash windows left unrepaired. It is a
    finding (`manifest_unreadable`), never repaired, and the other partitions are still checked."""
    path = part(home, K1) / "_manifest.json"
    document = json.loads(path.read_bytes())
    malform(document)
    path.write_text(json.dumps(document))
    other = part(home, K2) / "_rollback" / f"v{manifest(home, K2)['partitionVersion']:06d}.json"
    rollback_manifest = json.loads(other.read_bytes())
    rollback_manifest["removeFiles"] = []
    other.write_text(json.dumps(rollback_manifest))
    for args in (("verify",), ("verify", "--repair")):
        status, found = pcbo(home, *args)
        assert status == 1 and found is not None, found
        assert "rollback_manifest_mismatch" in kinds(found), found["findings"]
        assert kinds(found) & {"manifest_unreadable", "manifest_misplaced"}, found["findings"]
    proof = run_pcbo(["proof", "--dataset", "events", "--partition", K1, "--id", "any"], home=home)
    assert proof.status == 1 and proof.document is None, proof
    assert "internal error" not in proof.stderr and len(proof.stderr.strip().splitlines()) == 1, proof.stderr


@pytest.mark.parametrize("name", ["v1.torn", "v1.delivered", "v1.checkpoint-delivered", "v1.jsonl"])
def test_a_fifo_planted_in_the_audit_backup_is_refused_never_waited_on(home, requests, tmp_path, name):
    """Red-team finding: a FIFO planted in the audit backup directory at a name pcbo reads was opened
    and waited on for ever: at the `.torn` file, `verify` and `verify --repair` hung; at the delivery
    cursor (`.delivered`) or the checkpoint's delivery marker, every run with an audit endpoint hung
    after its commit; at the chain file itself, every run hung. Each is now refused as not a regular
    file (`verify`: `audit_backup_unreadable`), as a FIFO in the lake is."""
    key_file = tmp_path / "operator.key"
    assert run_pcbo(["keys", "generate", "--name", "op", "--key-file", key_file], home=home).status == 0
    fifo = backup_file(home).parent / name
    if name == "v1.jsonl":
        fifo.unlink()
    os.mkfifo(fifo)
    run = run_pcbo(["verify"], home=home, timeout=60)
    assert run.status == 1 and "audit_backup_unreadable" in kinds(run.document), run.document
    assert any(name in f["detail"] for f in run.document["findings"]), run.document["findings"]
    run = run_pcbo(["verify", "--repair"], home=home, timeout=60)
    assert run.status == 1, run.stderr
    run = run_pcbo(
        ["execute", "--input", requests["b"], "--audit-endpoint", "http://127.0.0.1:9/"],
        home=home,
        env={"PCBO_AUDIT_ATTEMPTS": "1", "PCBO_SIGNING_KEY": str(key_file)},
        timeout=60,
    )
    if name == "v1.jsonl":
        assert run.status == 1 and "not a regular file" in run.stderr, run.stderr
    else:  # the run stands; what it could not read is said, never waited on
        assert run.status == 0, run.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_link_planted_at_a_garbage_name_stops_no_gc(home, tmp_path):
    """Red-team finding: a symbolic link named like crash leftovers (`.tmp-*`, an unreferenced
    `part-*.parquet`) made `pcbo gc` fail whole (exit 1, no document), so no other partition was
    cleaned. The link is skipped and reported, neither it nor its target touched; the rest is
    collected."""
    target = tmp_path / "outside.txt"
    target.write_text("not the lake's")
    links = [part(home, K3) / ".tmp-planted", part(home, K3) / f"part-{'ab' * 16}.parquet"]
    for link in links:
        os.symlink(target, link)
    leftover = part(home, K1) / ".tmp-crash-leftover"
    leftover.write_bytes(b"a rename that never happened")
    status, document = pcbo(home, "gc")
    assert status == 0, document
    assert [r["reason"] for r in document["removed"]] == ["temporary_file"]
    assert not leftover.exists()
    skipped = sorted(s["where"] for s in document["skipped"])
    assert skipped == sorted(str(link.relative_to(lake_dir(home))) for link in links)
    assert all(link.is_symlink() for link in links) and target.read_text() == "not the lake's"


def _downgrade_and_hide_version_2(home: Path) -> None:
    """Someone who can write the lake, the catalog and the audit backup makes K1's committed version 2
    look like a crash's leftovers: version 1's manifest back as the commit point, version 2's events
    taken out of the backup, its catalog row deleted."""
    shutil.copyfile(part(home, K1) / "_versions" / "v000001.json", part(home, K1) / "_manifest.json")
    lines = backup_file(home).read_bytes().splitlines(keepends=True)
    backup_file(home).write_bytes(
        b"".join(
            line
            for line in lines
            if not (K1.encode() in line and json.loads(line).get("partition", {}).get("version") == 2)
            and b"partition_commit_intent" not in line
        )
    )
    _sql(home, f"DELETE FROM partitions WHERE partition_key = '{K1}' AND version = 2")


def test_gc_deletes_nothing_of_a_chain_that_does_not_verify(home):
    """Red-team finding: `pcbo gc` judged what is unreferenced from the audit backup as read, never
    verified, and from the lake's own commit point: with version 2 of K1 hidden (a downgraded commit
    point, its events cut out of the backup, its catalog row deleted) gc deleted the committed
    version's manifests and data file, the evidence `verify` and a restore need. A chain that does not
    verify (against the catalog's head) is skipped whole: nothing of it is removed, not even a `.tmp-*`
    file; other chains are still collected."""
    v2_files = {
        f"events/v1/{K1}/_versions/v000002.json",
        f"events/v1/{K1}/_rollback/v000002.json",
        *(f["path"] for f in manifest(home, K1, 2)["files"]),
    }
    _downgrade_and_hide_version_2(home)
    (part(home, K2) / ".tmp-crash-leftover").write_bytes(b"a rename that never happened")
    before = lake_files(home)
    assert v2_files <= set(before)
    for args in (("gc", "--dry-run"), ("gc",)):
        status, document = pcbo(home, *args)
        assert status == 0, document
        assert document["removed"] == [], document
        assert {"where": CHAIN, "reason": "the audit chain does not verify"} in document["skipped"]
        assert lake_files(home) == before


def test_gc_dry_run_writes_nothing(home):
    """Red-team finding: `pcbo gc --dry-run` took the dataset version's file lock the way a writer
    does, creating the lock file (and its directory) in the audit backup directory of a dataset this
    backup had not run on. A dry run now creates nothing: it holds the file lock only where one exists
    (and the catalog's lease, which leaves no row behind)."""
    (part(home, K2) / ".tmp-crash-leftover").write_bytes(b"a rename that never happened")
    lock = home / "pas" / "events" / "v1@run.lock"
    lock.unlink()

    def everything() -> dict[str, bytes]:
        files = {p.relative_to(home).as_posix(): p.read_bytes() for p in home.rglob("*") if p.is_file()}
        with sqlite3.connect(home / "catalog.db") as db:
            files["catalog.db"] = "\n".join(db.iterdump()).encode()
        return files

    before = everything()
    status, document = pcbo(home, "gc", "--dry-run")
    assert status == 0 and [r["reason"] for r in document["removed"]] == ["temporary_file"], document
    assert everything() == before


def test_gc_collects_partition_directories_only(home):
    """Red-team finding: gc took every directory under a dataset version for a partition, so it removed
    `.tmp-*` files from `<dataset>/<versionLabel>/_checkpoints/`, where a run or rollback writes its
    checkpoint note (a temporary file renamed into place) after it released the dataset's lock: a gc
    at that instant made the finished command fail. Only directories named by a partition key are
    collected."""
    checkpoints = lake_dir(home) / "events" / "v1" / "_checkpoints"
    checkpoints.mkdir(exist_ok=True)
    being_written = checkpoints / ".tmp-note-being-written"
    being_written.write_bytes(b"a checkpoint note about to be renamed into place")
    (part(home, K2) / ".tmp-crash-leftover").write_bytes(b"a rename that never happened")
    status, document = pcbo(home, "gc")
    assert status == 0, document
    assert [r["path"] for r in document["removed"]] == [f"events/v1/{K2}/.tmp-crash-leftover"]
    assert being_written.exists() and document["totals"]["partitions"] == len(KEYS)


def _rewrite_both_stores(home: Path, change: Any) -> None:
    """Someone who can write the audit backup and the catalog rewrites the chain's events (`change`:
    events -> events) and re-hashes them, in both stores alike (the catalog's append-only triggers
    dropped): the chain then verifies, only the catalog's stored transparency log still holds the old
    history."""
    events = [json.loads(line) for line in backup_file(home).read_bytes().splitlines()]
    prev = None
    kept: list[dict[str, Any]] = []
    for event in change(events):
        body = {
            k: v
            for k, v in event.items()
            if k not in ("version", "event_type", "event_id", "timestamp", "chain")
        }
        event = build_event(
            chain_key=CHAIN,
            seq=len(kept),
            prev_event_hash=prev,
            event_type=event["event_type"],
            timestamp=event["timestamp"],
            body=body,
        )
        prev = event["chain"]["event_hash"]
        kept.append(event)
    backup_file(home).write_bytes(b"".join(rfc8785.dumps(e) + b"\n" for e in kept))
    with sqlite3.connect(home / "catalog.db") as db:
        db.execute("DROP TRIGGER audit_events_no_delete")
        db.execute("DELETE FROM audit_events WHERE chain_key = ?", (CHAIN,))
        for e in kept:
            c = e["chain"]
            db.execute(
                "INSERT INTO audit_events VALUES (?, ?, ?, ?, ?, ?, '2024-06-01')",
                (CHAIN, c["seq"], c["event_hash"], c["prev_event_hash"], e["event_type"], json.dumps(e)),
            )
        db.execute("UPDATE audit_chain_heads SET seq = ?, event_hash = ?", (len(kept) - 1, prev))


def test_gc_deletes_nothing_of_a_chain_its_transparency_log_disagrees_with(home):
    """Red-team finding: with run b1's events taken out of the backup and the catalog alike, the rest
    re-hashed (the chain verifies), K1's commit point downgraded to version 1 and b1's catalog row
    deleted, gc deleted K1's committed version 2 (manifests and data file), although `verify` reports
    the chain is not the one its stored transparency log holds. gc checks a chain as `verify` does,
    its stored log and checkpoints included, and skips one they disagree with."""
    v2_files = {
        f"events/v1/{K1}/_versions/v000002.json",
        *(f["path"] for f in manifest(home, K1, 2)["files"]),
    }
    shutil.copyfile(part(home, K1) / "_versions" / "v000001.json", part(home, K1) / "_manifest.json")
    _sql(home, f"DELETE FROM partitions WHERE partition_key = '{K1}' AND version = 2")
    _rewrite_both_stores(home, lambda events: [e for e in events if e.get("run_id") != "b1"])
    status, found = pcbo(home, "verify")
    assert status == 1 and "transparency_log_mismatch" in kinds(found), found["findings"]
    assert not kinds(found) & {"audit_chain_broken", "audit_catalog_mismatch", "commit_point_downgraded"}
    before = lake_files(home)
    assert v2_files <= set(before)
    status, document = pcbo(home, "gc")
    assert status == 0 and document["removed"] == [], document
    assert {"where": CHAIN, "reason": "the audit chain does not verify"} in document["skipped"]
    assert lake_files(home) == before


# -- the catalog is bound to the chain ------------------------------------------------------------------


def _sql(home: Path, statement: str, *params: Any) -> int:
    with sqlite3.connect(home / "catalog.db") as db:
        return db.execute(statement, params).rowcount


ZERO = "'sha256:' || lower(hex(zeroblob(32)))"


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        (f"UPDATE partitions SET merkle_root = {ZERO} WHERE partition_key = '{K2}'", "catalog_mismatch"),
        (f"UPDATE partitions SET files = '[]' WHERE partition_key = '{K0}'", "catalog_mismatch"),
        (f"UPDATE partitions SET files = '5' WHERE partition_key = '{K0}'", "catalog_mismatch"),
        (f"""UPDATE partitions SET files = '["x", 5]' WHERE partition_key = '{K0}'""", "catalog_mismatch"),
        (
            f"UPDATE partitions SET status = 'rolled_back' WHERE partition_key = '{K1}' AND version = 1",
            "catalog_version_mismatch",
        ),
        (f"DELETE FROM partitions WHERE partition_key = '{K1}' AND version = 1", "catalog_version_missing"),
        (f"UPDATE runs SET plan_hash = {ZERO} WHERE run_id = 'b1'", "catalog_run_mismatch"),
        (
            f"UPDATE lineage SET decision_hash = {ZERO} WHERE partition_key = '{K3}'",
            "catalog_lineage_mismatch",
        ),
        ("UPDATE audit_chain_heads SET seq = seq - 1", "audit_head_mismatch"),
        ("DROP TRIGGER audit_events_no_update", "catalog_trigger_missing"),
        ("DROP TRIGGER rollout_approvals_no_replace", "catalog_trigger_missing"),
    ],
)
def test_catalog_rows_that_disagree_with_the_chain_are_found(home, statement, kind):
    _sql(home, statement)
    assert_found_and_not_laundered(home, kind)


@pytest.mark.parametrize(
    ("statements", "kind"),
    [
        (  # a no-op under the name pcbo looks for
            [
                "DROP TRIGGER audit_events_no_delete",
                "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events BEGIN SELECT 1; END",
            ],
            "catalog_trigger_altered",
        ),
        (  # pcbo's very text, made to fire never
            [
                "DROP TRIGGER audit_events_no_update",
                "CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events WHEN 0 BEGIN "
                "SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE refused'); END",
            ],
            "catalog_trigger_altered",
        ),
        (  # the name kept, on a table nothing writes
            [
                "DROP TRIGGER audit_events_no_update",
                "CREATE TABLE decoy (x)",
                "CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON decoy BEGIN "
                "SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE refused'); END",
            ],
            "catalog_trigger_missing",
        ),
    ],
    ids=["no-op", "never-fires", "other-table"],
)
def test_a_replaced_append_only_trigger_is_found(home, statements, kind):
    """Red-team finding: `verify` looked for the append-only triggers by name only, so one replaced by
    a trigger of that name that refuses nothing (or guards another table) left `verify` clean, and the
    catalog's history tables open to UPDATE and DELETE again."""
    for statement in statements:
        _sql(home, statement)
    assert_found_and_not_laundered(home, kind)


@pytest.mark.postgres
def test_a_disabled_or_replaced_append_only_trigger_is_found_on_postgresql(fresh_postgres_url, tmp_path):
    """The PostgreSQL side of the finding above: a disabled trigger, one whose function was replaced by
    one that lets the change through, one of that name on another table."""
    from sqlalchemy import text

    from pcbo_dagster.catalog import CatalogStore

    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    assert store.append_only_trigger_problems() == {}
    with store.write() as conn:
        conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
        conn.execute(text("DROP TRIGGER rollout_log_no_truncate ON rollout_log"))
        conn.execute(
            text(
                "CREATE TRIGGER rollout_log_no_truncate BEFORE TRUNCATE ON runs "
                "FOR EACH STATEMENT EXECUTE FUNCTION pcbo_refuse_mutation()"
            )
        )
        conn.execute(text("DROP TRIGGER soak_evaluations_append_only ON soak_evaluations"))
        conn.execute(
            text(
                "CREATE TRIGGER soak_evaluations_append_only BEFORE UPDATE OR DELETE ON soak_evaluations "
                "FOR EACH ROW WHEN (false) EXECUTE FUNCTION pcbo_refuse_mutation()"
            )
        )
    problems = store.append_only_trigger_problems()
    assert set(problems) == {
        "audit_events_append_only",
        "rollout_log_no_truncate",
        "soak_evaluations_append_only",
    }, problems
    assert problems["rollout_log_no_truncate"] == "missing"
    with store.write() as conn:
        conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION pcbo_refuse_mutation() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RETURN OLD; END $$"
            )
        )
    problems = store.append_only_trigger_problems()
    assert "discrepancy_events_append_only" in problems, problems
    store.close()


#: Ways to keep an append-only trigger of the PostgreSQL catalog from firing for pcbo's sessions while
#: it stays enabled, before its events, with no WHEN and pcbo's function (`{db}`: the database's name).
_PG_TRIGGER_BYPASSES = {
    # fires only in sessions whose session_replication_role is replica
    "enable-replica": ["ALTER TABLE audit_events ENABLE REPLICA TRIGGER audit_events_append_only"],
    # fires only on an UPDATE that names event_hash: rewriting event_json goes through
    "update-of-column": [
        "DROP TRIGGER audit_events_append_only ON audit_events",
        "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OF event_hash OR DELETE ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION pcbo_refuse_mutation()",
    ],
    # every ORIGIN trigger sleeps in the database's sessions
    "replication-role": ['ALTER DATABASE "{db}" SET session_replication_role = replica'],
    # the check's own current_schema() shadowed to name a decoy schema whose triggers are intact
    "shadowed-current-schema": [
        "CREATE SCHEMA decoy",
        "CREATE TABLE decoy.audit_events (LIKE public.audit_events)",
        "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON decoy.audit_events "
        "FOR EACH ROW EXECUTE FUNCTION pcbo_refuse_mutation()",
        "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON decoy.audit_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION pcbo_refuse_mutation()",
        "DROP TRIGGER audit_events_append_only ON public.audit_events",
        "CREATE FUNCTION public.current_schema() RETURNS name LANGUAGE sql AS $$ SELECT 'decoy'::name $$",
        'ALTER DATABASE "{db}" SET search_path = public, pg_catalog',
    ],
}


@pytest.mark.postgres
@pytest.mark.parametrize("bypass", sorted(_PG_TRIGGER_BYPASSES))
def test_an_append_only_trigger_kept_from_firing_is_found_on_postgresql(fresh_postgres_url, bypass):
    """Red-team finding: the PostgreSQL check read `tgenabled` as disabled only when it was `D`, its
    events from `tgtype` alone (no `UPDATE OF` column list), ignored `session_replication_role`, and
    looked for the triggers in `current_schema()` resolved through the role's search path. Each bypass
    here lets an UPDATE of `audit_events` through while `verify` saw nothing wrong."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from pcbo_dagster.catalog import CatalogStore

    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_events (chain_key, seq, event_hash, event_type, event_json, recorded_at) "
                "VALUES ('c', 0, 'sha256:00', 'x', '{}', now())"
            )
        )
    database = make_url(fresh_postgres_url).database
    with store.write() as conn:
        for statement in _PG_TRIGGER_BYPASSES[bypass]:
            conn.execute(text(statement.format(db=database)))
    store.close()  # the database's settings apply to new sessions
    with store.write() as conn:  # the trigger no longer refuses pcbo's own session
        conn.execute(text("UPDATE public.audit_events SET event_json = '{\"forged\": 1}'"))
    problems = store.append_only_trigger_problems()
    assert "audit_events_append_only" in problems, problems
    store.close()


def test_catalog_file_lists_of_another_shape_stop_no_gc(home):
    """A catalog row's `files` that is not a list of objects (someone who can write the catalog) made
    `pcbo gc` fail with an internal error; gc keeps what the chain names and goes on."""
    before = lake_files(home)
    _sql(home, f"""UPDATE partitions SET files = '["x", 5]' WHERE partition_key = '{K0}'""")
    _sql(home, f"UPDATE partitions SET files = '7' WHERE partition_key = '{K1}'")
    status, document = pcbo(home, "gc")
    assert status == 0 and document["removed"] == [], document
    assert lake_files(home) == before


def test_the_mirror_is_re_hashed_not_trusted_by_its_hash_column(home):
    with sqlite3.connect(home / "catalog.db") as db:
        db.execute("DROP TRIGGER audit_events_no_update")
        row = db.execute("SELECT seq, event_json FROM audit_events WHERE seq = 2").fetchone()
        event = json.loads(row[1])
        event["record_count"] = event.get("record_count", 0) + 1
        db.execute("UPDATE audit_events SET event_json = ? WHERE seq = 2", (json.dumps(event),))
    assert_found_and_not_laundered(home, "audit_catalog_event_altered", f"{CHAIN} seq 2")


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT OR REPLACE INTO audit_events SELECT chain_key, seq, event_hash, prev_event_hash, event_type, "
        "'{}', recorded_at FROM audit_events WHERE seq = 1",
        "REPLACE INTO audit_events SELECT chain_key, seq + 100, event_hash, prev_event_hash, event_type, "
        "event_json, recorded_at FROM audit_events WHERE seq = 1",
        "INSERT OR REPLACE INTO discrepancy_events (id, run_id, dataset, version_label, kind, detail, "
        "recorded_at) VALUES (1, 'x', 'events', 'v1', 'k', '{}', '2024-01-01')",
    ],
)
def test_insert_or_replace_cannot_rewrite_append_only_rows(home, statement):
    _sql(
        home,
        "INSERT INTO discrepancy_events (run_id, dataset, version_label, kind, detail, recorded_at) "
        "VALUES ('r', 'events', 'v1', 'k', '{}', '2024-01-01')",
    )
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        _sql(home, statement)


@pytest.mark.postgres
def test_on_conflict_do_update_cannot_rewrite_append_only_rows_on_postgresql(fresh_postgres_url, tmp_path):
    from sqlalchemy import text

    from pcbo_dagster.catalog import CatalogStore

    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO discrepancy_events (run_id, dataset, version_label, kind, detail, "
                "recorded_at) VALUES ('r', 'events', 'v1', 'k', '{}', now())"
            )
        )
    with pytest.raises(Exception, match="append-only"), store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO discrepancy_events (id, run_id, dataset, version_label, kind, detail, "
                "recorded_at) SELECT id, 'x', dataset, version_label, kind, detail, recorded_at FROM "
                "discrepancy_events ON CONFLICT (id) DO UPDATE SET run_id = 'x'"
            )
        )
    store.close()


# -- 2./4. the audit chain has one history ------------------------------------------------------------


def _forged_event(home: Path) -> dict[str, Any]:
    last = json.loads(backup_file(home).read_bytes().splitlines()[-1])
    return build_event(
        chain_key=CHAIN,
        seq=last["chain"]["seq"] + 1,
        prev_event_hash=last["chain"]["event_hash"],
        event_type="partition_rolled_back",
        timestamp="2024-06-01T00:00:00Z",
        body={
            "partition": last["partition"],
            "undone_manifest_checksum": "sha256:" + "0" * 64,
            "restored_version": None,
            "reason": "forged",
        },
    )


def test_a_well_formed_event_appended_to_the_backup_alone_is_never_adopted(home, requests):
    with backup_file(home).open("ab") as f:
        f.write(rfc8785.dumps(_forged_event(home)) + b"\n")
    status, found = pcbo(home, "verify")
    assert status == 1 and "audit_catalog_behind" in kinds(found)
    status, repaired = pcbo(home, "verify", "--repair")
    assert status == 1 and "audit_stores_diverge" in kinds(repaired)
    with sqlite3.connect(home / "catalog.db") as db:
        assert db.execute(
            "SELECT count(*) FROM audit_events WHERE event_json LIKE '%forged%'"
        ).fetchone() == (0,)
    status, _ = pcbo(home, "execute", "--input", str(requests["b"]))
    assert status == 1


@pytest.mark.parametrize("head_moved", [True, False], ids=["head-moved", "head-left"])
def test_an_event_inserted_into_the_catalog_alone_is_never_adopted(home, requests, head_moved, capsys):
    """Also when the forger leaves the chain's head row as it was (README *Audit events*: an event
    appended to the catalog alone is never adopted, runs refuse to append): a run used to trust the
    head row, stage its files, write its intent to the backup and only then fail on the mirror's
    append-only trigger, as an internal error."""
    event = _forged_event(home)
    with sqlite3.connect(home / "catalog.db") as db:
        db.execute(
            "INSERT INTO audit_events VALUES (?, ?, ?, ?, ?, ?, '2024-06-01')",
            (
                CHAIN,
                event["chain"]["seq"],
                event["chain"]["event_hash"],
                event["chain"]["prev_event_hash"],
                event["event_type"],
                json.dumps(event),
            ),
        )
        if head_moved:
            db.execute(
                "UPDATE audit_chain_heads SET seq = ?, event_hash = ?",
                (event["chain"]["seq"], event["chain"]["event_hash"]),
            )
    chain, lake = backup_file(home).read_bytes(), lake_files(home)
    assert_found_and_not_laundered(home, "audit_catalog_mismatch")
    capsys.readouterr()
    for request in requests.values():  # nothing to append, or something: refused either way
        status, _ = pcbo(home, "execute", "--input", str(request))
        assert status == 1
        refusal = capsys.readouterr().err
        assert "internal error" not in refusal and "events one store alone holds" in refusal, refusal
    assert backup_file(home).read_bytes() == chain
    assert lake_files(home) == lake


def test_a_stale_backup_never_causes_a_second_commit_event(base, tmp_path, requests):
    home = tmp_path / "home"
    shutil.copytree(base, home)
    stale = backup_file(home).read_bytes()
    status, _ = pcbo(
        home,
        "execute",
        "--input",
        str(
            write_request(tmp_path / "c.json", _request("c1", changed=True) | {"end": "2024-01-01T05:00:00Z"})
        ),
    )
    assert status == 0
    backup_file(home).write_bytes(stale)  # restored from an older copy
    status, _ = pcbo(home, "execute", "--input", str(requests["b"]))
    assert status == 1
    assert backup_file(home).read_bytes() == stale


# -- 3. rollback stays inside its partition, and is idempotent ------------------------------------------


def test_rollback_by_partition_is_idempotent_and_rolls_back_further_only_by_name(home):
    status, first = pcbo(home, "rollback", "--dataset", "events", "--partition", K1)
    assert status == 0 and [(p["version"], p["restoredVersion"]) for p in first["partitions"]] == [(2, 1)]
    chain = backup_file(home).read_bytes()
    status, second = pcbo(home, "rollback", "--dataset", "events", "--partition", K1)
    assert status == 0 and second["status"] == "noop" and second["rolledBack"] == 0
    assert "--version 1" in second["partitions"][0]["detail"]
    assert backup_file(home).read_bytes() == chain
    status, further = pcbo(home, "rollback", "--dataset", "events", "--partition", K1, "--version", "1")
    assert status == 0 and [(p["version"], p["restoredVersion"]) for p in further["partitions"]] == [
        (1, None)
    ]
    assert not (part(home, K1) / "_manifest.json").exists()
    assert pcbo(home, "verify")[0] == 0


def test_rollback_of_a_superseded_version_by_name_is_invalid_input(home):
    """Walk finding: `rollback --partition K1 --version 1` while version 2 is current (version 1
    superseded, never rolled back) printed a noop saying version 1 was "already undone", exit 0. Only
    the current version can be rolled back by name: a version never undone that is not current is
    invalid input on --version (exit 2, nothing written); one a rollback undid stays a no-op."""
    chain = backup_file(home).read_bytes()
    status, document = pcbo(home, "rollback", "--dataset", "events", "--partition", K1, "--version", "1")
    assert status == 2 and document is None
    assert backup_file(home).read_bytes() == chain
    status, first = pcbo(home, "rollback", "--dataset", "events", "--partition", K1, "--version", "2")
    assert status == 0 and [(p["version"], p["restoredVersion"]) for p in first["partitions"]] == [(2, 1)]
    status, again = pcbo(home, "rollback", "--dataset", "events", "--partition", K1, "--version", "2")
    assert status == 0 and again["status"] == "noop" and "already undone" in again["partitions"][0]["detail"]


def test_rollback_refuses_a_backup_whose_events_were_forged(home):
    """Red-team finding: `pcbo rollback` replayed the audit backup as read: the catalog's head was
    compared with the backup's last event only, so an event edited in the middle of the backup (K2's
    commit made to name run b1) had `rollback --run-id b1` undo K2 too, removing its commit point and
    data file: a partition run b1 never wrote. A rollback now replays only a chain that verifies (every
    hash and link, against the catalog's head); otherwise it refuses (exit 1) and changes nothing."""
    lines = backup_file(home).read_bytes().splitlines(keepends=True)
    forged = []
    for line in lines:
        event = json.loads(line)
        if event.get("event_type") == "partition_committed" and event["partition"]["key"] == K2:
            event["run_id"] = "b1"
            line = json.dumps(event).encode() + b"\n"
        forged.append(line)
    backup_file(home).write_bytes(b"".join(forged))
    before = (lake_files(home), backup_file(home).read_bytes())
    status, document = pcbo(home, "rollback", "--dataset", "events", "--run-id", "b1")
    assert status == 1 and document is None, document
    assert (lake_files(home), backup_file(home).read_bytes()) == before
    assert (part(home, K2) / "_manifest.json").exists()


def test_rollback_refuses_a_chain_its_transparency_log_disagrees_with(home):
    """The same forgery as above, re-hashed in the backup and the catalog alike so the chain verifies:
    the catalog's stored transparency log still holds the history the runs appended, and a rollback,
    like `verify`, holds the chain against it; it refuses (exit 1) and changes nothing."""

    def k2_by_b1(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for event in events:
            if event.get("event_type") == "partition_committed" and event["partition"]["key"] == K2:
                event["run_id"] = "b1"
        return events

    _rewrite_both_stores(home, k2_by_b1)
    before = (lake_files(home), backup_file(home).read_bytes())
    status, document = pcbo(home, "rollback", "--dataset", "events", "--run-id", "b1")
    assert status == 1 and document is None, document
    assert (lake_files(home), backup_file(home).read_bytes()) == before
    assert (part(home, K2) / "_manifest.json").exists()


def _k1_committed_as_version_1(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """K1's version 2 commit (run b1) made to name version 1, its manifest and Merkle root: a chain
    on which version 1 is K1's current version."""
    commits = [
        e for e in events if e.get("event_type") == "partition_committed" and e["partition"]["key"] == K1
    ]
    first, second = commits
    for field in ("version", "manifest", "merkle_root", "previous", "record_count", "counts", "tables"):
        if field in first:
            second[field] = first[field]
    return events


def _edit_backup(home: Path, change: Any) -> None:
    """Someone who can write the audit backup edits its events (`change`: events -> events) in place,
    leaving every hash as it was (the catalog's head still agrees with the backup's last event)."""
    events = change([json.loads(line) for line in backup_file(home).read_bytes().splitlines()])
    backup_file(home).write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in events))


def _home_state(home: Path) -> tuple[dict[str, bytes], bytes, str]:
    """The lake, the audit backup and the catalog, to show nothing was written."""
    with sqlite3.connect(home / "catalog.db") as db:
        catalog = "\n".join(db.iterdump())
    return lake_files(home), backup_file(home).read_bytes(), catalog


def test_repair_heals_nothing_of_a_chain_whose_events_were_forged(home):
    """Red-team finding: `verify --repair` healed the crash windows of a chain that does not verify:
    K3's commit event edited into another type (its hash left) leaves K3's intent open with the lake
    exactly as it names, and repair appended a `partition_committed` for it to the forged chain. What
    looks like a crash window in a chain that does not verify may be forged: repair heals nothing of
    it, says why, and signs no checkpoint of it."""

    def k3_commit_edited(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for event in events:
            if event.get("event_type") == "partition_committed" and event["partition"]["key"] == K3:
                event["event_type"] = "partition_commit_note"
        return events

    _edit_backup(home, k3_commit_edited)
    before = _home_state(home)
    found = assert_found_and_not_laundered(home, "audit_chain_broken")
    assert "audit_event_missing" in kinds(found)
    status, repaired = pcbo(home, "verify", "--repair")
    assert status == 1 and repaired["repaired"] == [], repaired["repaired"]
    missing = [f for f in repaired["findings"] if f["kind"] == "audit_event_missing"]
    assert missing and all("the audit chain does not verify" in f["detail"] for f in missing), missing
    assert "transparency_log_not_published" in kinds(repaired)
    assert _home_state(home) == before


@contextmanager
def _reconciler(home: Path) -> Iterator[Any]:
    """The HTTP API's reconciliation poll (`Reconciler`) over `home`'s stores, open for the block."""
    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster.server.broker import EventBroker
    from pcbo_dagster.server.reconciliation import Reconciler

    env = Environment.open(Settings.resolve(home=str(home), env={}), create=False)
    try:
        yield Reconciler(env.catalog, env.lake, env.audit.backup, EventBroker(8))
    finally:
        env.close()


def _assert_vouches_for_nothing(report: dict[str, Any]) -> None:
    """A reconciliation of a chain that does not verify: `discrepancy`, every key missing, and why."""
    assert report["status"] == "discrepancy", report
    assert report["discrepancyDetails"]["missingIds"] == KEYS
    assert "hash mismatch" in report["discrepancyDetails"]["auditChainFindings"][0]


def test_the_reconciliation_poll_calls_no_forged_stores_verified(home):
    """Red-team finding: the HTTP API's reconciliation poll replayed the audit backup as read: K1's
    version 2 commit edited in the middle of the backup to name version 1, with the lake's commit
    point and the catalog's rows put back to version 1 to match, was streamed as `verified`. The poll
    now verifies the chain it replays (every hash and link): one that does not verify vouches for no
    partition (`discrepancy`, every key, and why)."""
    _edit_backup(home, _k1_committed_as_version_1)
    (part(home, K1) / "_manifest.json").write_bytes((part(home, K1) / "_versions/v000001.json").read_bytes())
    with sqlite3.connect(home / "catalog.db") as db:
        db.execute(
            "UPDATE partitions SET status = 'superseded' WHERE partition_key = ? AND version = 2", (K1,)
        )
        db.execute(
            "UPDATE partitions SET status = 'committed' WHERE partition_key = ? AND version = 1", (K1,)
        )
    with _reconciler(home) as reconciler:
        report = reconciler.reconcile("events", "v1", False)
    _assert_vouches_for_nothing(report)


def test_the_reconciliation_poll_sees_a_backup_forged_after_its_last_poll(home):
    """Red-team finding: the HTTP API's reconciliation poll, a process that lives on, verified a chain
    once and kept the result while the backup's last event stayed the same: K1's version 2 commit
    edited before the head after one poll (hashes left) was streamed as `verified` by every later
    poll. Each poll now verifies every hash and link again (only the replay is kept while the head
    stays the same and the chain verifies)."""
    with _reconciler(home) as reconciler:
        assert reconciler.reconcile("events", "v1", False)["status"] == "verified"
        _edit_backup(home, _k1_committed_as_version_1)
        report = reconciler.reconcile("events", "v1", False)
    _assert_vouches_for_nothing(report)


def test_the_reconciliation_poll_reconciles_a_chain_the_catalog_no_longer_lists(home):
    """Red-team finding: the reconciliation poll reconciled only the dataset versions the catalog
    lists, so deleting a version's `datasets` row (catalog write access) silenced the stream for it:
    K1's commit point then put back to version 1 in the lake was never reported. The poll now
    reconciles every chain of the backup too."""
    with sqlite3.connect(home / "catalog.db") as db:
        db.execute("DELETE FROM datasets WHERE dataset = 'events' AND version_label = 'v1'")
    (part(home, K1) / "_manifest.json").write_bytes((part(home, K1) / "_versions/v000001.json").read_bytes())
    with _reconciler(home) as reconciler:
        reports = reconciler.poll()
    assert [(r["service"], r["versionLabel"], r["status"]) for r in reports] == [
        ("events", "v1", "discrepancy")
    ], reports
    assert reports[0]["discrepancyDetails"]["missingIds"] == [K1]


def test_a_proof_refuses_a_chain_its_transparency_log_disagrees_with(home):
    """Red-team finding: `pcbo proof` held the chain against the catalog's head only, so a chain
    re-hashed in the backup and the catalog alike (K2's commit made to name run b1) verified and a
    proof was made from it. A proof now also holds the chain against the catalog's stored
    transparency log and its checkpoints: no proof (exit 1)."""
    import pyarrow.parquet as pq

    (data,) = part(home, K0).glob("part-*.parquet")
    record_id = pq.read_table(data, columns=["id"]).column("id")[0].as_py()
    proof = ("proof", "--dataset", "events", "--partition", K0, "--id", record_id)
    status, document = pcbo(home, *proof)
    assert status == 0 and document is not None

    def k2_by_b1(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for event in events:
            if event.get("event_type") == "partition_committed" and event["partition"]["key"] == K2:
                event["run_id"] = "b1"
        return events

    _rewrite_both_stores(home, k2_by_b1)
    status, document = pcbo(home, *proof)
    assert status == 1 and document is None, document


@pytest.mark.parametrize("both_stores", [False, True], ids=["backup", "backup-and-catalog-rehashed"])
def test_execute_refuses_a_chain_whose_events_were_forged(home, requests, both_stores):
    """Red-team finding: `pcbo execute` replayed the audit backup as read once its last event agreed
    with the catalog's head, so K1's version 2 commit edited to name version 1 had a run of request
    `a` "restore" K1 to version 1 (its commit point written back, `partition_restored` appended): an
    older version no run left current. Re-hashed in both stores, the chain verifies; only its stored
    transparency log holds the real history. A run now builds only on a chain that verifies against
    the catalog's head and its log (`partition_checks.verified_chain`): it refuses (exit 1) before
    anything is written."""
    if both_stores:
        _rewrite_both_stores(home, _k1_committed_as_version_1)
    else:
        _edit_backup(home, _k1_committed_as_version_1)
    before = _home_state(home)
    status, document = pcbo(home, "execute", "--input", str(requests["a"]))
    assert status == 1 and document is None, document
    assert _home_state(home) == before
    status, found = pcbo(home, "verify")
    assert status == 1
    assert kinds(found) & {"audit_chain_broken", "transparency_log_mismatch"}, found["findings"]


def test_a_rollback_checks_its_input_on_a_chain_that_verifies(home, capsys):
    """Red-team finding: `pcbo rollback` checked the partition it was given against the audit backup
    as read, before taking the lock: K3's events edited in the middle of the backup to name another
    partition (their hashes left) made the rollback of K3 invalid input (exit 2, "no partition"),
    an answer derived from a forged chain. The input is now checked on a chain that verifies
    (`partition_checks.verified_chain`): the rollback is refused as the chain's (exit 1, naming it)
    and nothing is written."""

    def k3_renamed(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for event in events:
            for named in [event.get("partition") or {}, *event.get("partitions", [])]:
                if named.get("key") == K3:
                    named["key"] = "20240101T090000Z"
        return events

    _edit_backup(home, k3_renamed)
    before = _home_state(home)
    capsys.readouterr()
    status, document = pcbo(home, "rollback", "--dataset", "events", "--partition", K3)
    stderr = capsys.readouterr().err
    assert status == 1 and document is None, stderr
    assert "audit chain events/v1 does not verify" in stderr, stderr
    assert _home_state(home) == before


@pytest.mark.parametrize(
    "args",
    [
        ["--run-id", "no-such-run"],
        ["--partition", "20990101T000000Z"],
        ["--partition", "../../../etc"],
        ["--partition", K1, "--version", "7"],
    ],
)
def test_rollback_of_an_unknown_run_partition_or_version_is_invalid_input(home, args):
    before = (lake_files(home), backup_file(home).read_bytes())
    status, document = pcbo(home, "rollback", "--dataset", "events", *args)
    assert status == 2 and document is None
    assert (lake_files(home), backup_file(home).read_bytes()) == before


@pytest.mark.parametrize("key", ["../../../etc", "20240101T000000Z/../../x", "/etc", "range=1-2/.."])
def test_a_user_given_partition_key_is_confined_to_the_lake(home, key):
    status, document = pcbo(home, "proof", "--dataset", "events", "--partition", key, "--id", "x")
    assert status == 2 and document is None


ROLLBACK_POINTS = [
    "rollback_after_intent",
    "rollback_after_commit_point",
    "rollback_after_remove",
    "rollback_after_event",
]


@pytest.fixture(scope="module")
def a1_rolled_back(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The lake of a copy of the base history after an uninterrupted rollback of run `a1`."""
    reference = tmp_path_factory.mktemp("a1-rolled-back") / "reference"
    shutil.copytree(base, reference)
    assert run_pcbo(["rollback", "--dataset", "events", "--run-id", "a1"], home=reference).status == 0
    return lake_files(reference)


@pytest.mark.slow
@pytest.mark.parametrize("point", ROLLBACK_POINTS)
def test_a_rollback_killed_at_any_instant_is_completed_by_running_it_again(
    base, a1_rolled_back, tmp_path, point
):
    home = tmp_path / "home"
    shutil.copytree(base, home)
    crashed = run_pcbo(
        ["rollback", "--dataset", "events", "--run-id", "a1"], home=home, env={"PCBO_FAILPOINT": f"{point}@0"}
    )
    assert crashed.status == 86, crashed.stderr
    again = run_pcbo(["rollback", "--dataset", "events", "--run-id", "a1"], home=home)
    assert again.status == 0, again.stderr
    assert lake_files(home) == a1_rolled_back
    rolled = [
        (e["partition"]["key"], e["partition"]["version"])
        for e in backup_events(home)
        if e["event_type"] == "partition_rolled_back"
    ]
    assert sorted(rolled) == sorted((k, 1) for k in (K0, K2, K3)), "one rollback event per partition"
    verified = run_pcbo(["verify"], home=home)
    assert verified.status == 0, verified.document
    assert (
        run_pcbo(["rollback", "--dataset", "events", "--run-id", "a1"], home=home).document["status"]
        == "noop"
    )


def test_a_rollback_killed_after_its_intent_is_reported_and_completed_by_repair(base, tmp_path):
    """Red-team finding: a rollback killed right after its intent left the lake as it was, and verify
    said nothing: the intent stayed open for good, and whenever someone who can write the lake later
    put the older version back as the commit point, repair took it for this rollback and removed the
    newer version's files, at a time of their choosing. Verify reports the interrupted rollback
    (`rollback_interrupted`), and `--repair` completes it as running the rollback again does."""
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    assert run_pcbo(["rollback", "--dataset", "events", "--partition", K1], home=reference).status == 0
    home = tmp_path / "home"
    shutil.copytree(base, home)
    args = ["rollback", "--dataset", "events", "--partition", K1]
    crashed = run_pcbo(args, home=home, env={"PCBO_FAILPOINT": "rollback_after_intent@0"})
    assert crashed.status == 86, crashed.stderr
    status, found = pcbo(home, "verify")
    assert status == 1 and [(f["kind"], f["where"]) for f in found["findings"]] == [
        ("rollback_interrupted", f"{CHAIN}/{K1}")
    ], found["findings"]
    status, repaired = pcbo(home, "verify", "--repair")
    assert status == 0 and [r["kind"] for r in repaired["repaired"]] == ["rollback_completed"], repaired
    assert lake_files(home) == lake_files(reference)
    assert pcbo(home, "verify")[0] == 0
    assert pcbo(home, "verify", "--repair")[1]["repaired"] == []  # a second repair appends nothing
    rolled = [e for e in backup_events(home) if e["event_type"] == "partition_rolled_back"]
    assert [(e["partition"]["key"], e["partition"]["version"]) for e in rolled] == [(K1, 2)]
    status, document = pcbo(home, *args)
    assert status == 0 and document["status"] == "noop", document


def _link_k1s_newest_data_file_out_of_the_lake(home: Path, tmp_path: Path) -> Path:
    """K1's version 2 data file (which undoing version 2 removes) moved out of the lake, a symbolic link
    to it at its name; returns where it now is."""
    doomed = lake_dir(home) / manifest(home, K1, 2)["files"][0]["path"]
    outside = tmp_path / "k1-v2.parquet"
    shutil.move(doomed, outside)
    os.symlink(outside, doomed)
    return outside


@pytest.mark.parametrize("where", ["partition", "_versions", "_rollback", "data_file"])
def test_a_link_in_place_before_a_rollback_refuses_it_before_it_writes_anything(home, tmp_path, where):
    """Red-team finding: a link at a data file that undoing K1's version 2 removes was met only at its
    removal, after the rollback's intent was appended and the commit point moved (exit 1, a crash window
    that no completion could finish while the link stayed). Every place a rollback writes or removes is
    checked first: a link there, or anywhere on the way to K1's files, refuses it (exit 1) before it
    writes anything: no intent, nothing in the lake changed, nothing written through the link."""
    if where == "data_file":
        outside = _link_k1s_newest_data_file_out_of_the_lake(home, tmp_path)
    else:
        moved = tmp_path / "k1-elsewhere" if where == "partition" else tmp_path / f"k1{where}"
        shutil.move(part(home, K1) / ("" if where == "partition" else where), moved)
        os.symlink(moved, part(home, K1) / ("" if where == "partition" else where))
        outside = moved
    lake_before, events_before = tree_state(lake_dir(home)), backup_events(home, intents=True)
    outside_before = tree_state(outside) if outside.is_dir() else outside.read_bytes()
    status, document = pcbo(home, "rollback", "--dataset", "events", "--partition", K1)
    assert status == 1, document
    assert tree_state(lake_dir(home)) == lake_before, "the refused rollback changed the lake"
    assert backup_events(home, intents=True) == events_before, "the refused rollback appended an event"
    assert (tree_state(outside) if outside.is_dir() else outside.read_bytes()) == outside_before


def test_a_link_at_the_checkpoints_refuses_a_signing_rollback_before_it_writes_anything(
    home, tmp_path, monkeypatch
):
    """Red-team finding: with a signing key a rollback writes its chain's checkpoint last: a link at
    `_checkpoints` refused it only once it was done (exit 1, K1 rolled back, its events appended). It is
    checked first: nothing moved, removed or appended, nothing written through the link."""
    outside = _sign_with_checkpoints_linked_out(home, tmp_path, monkeypatch)
    lake_before, events_before = tree_state(lake_dir(home)), backup_events(home, intents=True)
    status, document = pcbo(home, "rollback", "--dataset", "events", "--partition", K1)
    assert status == 1, document
    assert tree_state(lake_dir(home)) == lake_before, "the refused rollback changed the lake"
    assert backup_events(home, intents=True) == events_before, "the refused rollback appended an event"
    assert list(outside.iterdir()) == []


def test_a_link_at_a_file_an_interrupted_rollback_removes_stops_its_repair_before_any_event(base, tmp_path):
    """Red-team finding: `verify --repair` completing a rollback killed after its commit point moved
    appended the rollback's event, then met the link planted at the data file it removes (exit 1). The
    files to remove are read and checked first: a link there stops the repair before it appends or
    removes anything."""
    home = tmp_path / "home"
    shutil.copytree(base, home)
    args = ["rollback", "--dataset", "events", "--partition", K1]
    crashed = run_pcbo(args, home=home, env={"PCBO_FAILPOINT": "rollback_after_commit_point@0"})
    assert crashed.status == 86, crashed.stderr
    outside = _link_k1s_newest_data_file_out_of_the_lake(home, tmp_path)
    lake_before, events_before = tree_state(lake_dir(home)), backup_events(home, intents=True)
    repaired = run_pcbo(["verify", "--repair"], home=home)
    assert repaired.status == 1, repaired
    assert "leads outside the lake or through a symbolic link" in repaired.stderr + json.dumps(
        repaired.document
    ), repaired
    assert tree_state(lake_dir(home)) == lake_before, "the refused repair changed the lake"
    assert backup_events(home, intents=True) == events_before, "the refused repair appended an event"
    assert outside.exists()


# -- 6. sources are what was decided -------------------------------------------------------------------


def test_a_source_changed_during_the_run_fails_it_and_commits_nothing_from_there(tmp_path):
    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.execute import ExecuteFailed, execute
    from pcbo_dagster.engine.request_loading import evaluate, load_request
    from pcbo_dagster.engine.settings import Settings

    request = _request("src1")
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in request.pop("sourceRecords")))
    request["source"] = {"uri": str(source), "format": "jsonl"}
    loaded = load_request(json.dumps(request).encode(), tmp_path)
    plan, decisions = evaluate(loaded)
    # The file changes between pass 1 (decisions) and the re-read for writing: one amount edited,
    # lengths kept, so every byte offset still points at a record.
    lines = source.read_text().splitlines()
    victim = next(
        i for i, line in enumerate(lines) if json.loads(line)["occurredAt"].startswith("2024-01-01T02")
    )
    record = json.loads(lines[victim])
    record["amount"] = int(str(record["amount"])[::-1].ljust(len(str(record["amount"])), "1"))
    if json.dumps(record) == lines[victim]:
        record["channel"] = "evil"[: len(record["channel"])].ljust(len(record["channel"]), "x")
    lines[victim] = json.dumps(record)
    source.write_text("".join(line + "\n" for line in lines))
    env = Environment.open(Settings.resolve(home=str(tmp_path / "home"), env={}, parallel=1))
    try:
        with pytest.raises(ExecuteFailed, match="source changed during the run") as failed:
            execute(env, loaded, plan, decisions)
        statuses = {p["key"]: p["status"] for p in failed.value.document["partitions"]}
        assert K2 not in statuses and K3 not in statuses
        assert env.catalog.get_run("src1")["status"] == "failed"
    finally:
        env.close()
        loaded.spill.close()


def test_parquet_timestamps_without_a_time_zone_are_invalid_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pcbo_dagster.engine.request_loading import evaluate, load_request

    at = 1704067200_000000  # 2024-01-01T00:00:00
    for name, kind in (("naive", pa.timestamp("us")), ("aware", pa.timestamp("us", tz="UTC"))):
        table = pa.table({"id": [name], "occurredAt": pa.array([at], kind), "consentGranted": [True]})
        pq.write_table(table, tmp_path / f"{name}.parquet")
    request = _request("pq1")
    request.pop("sourceRecords")
    results = {}
    for name in ("naive", "aware"):
        request["source"] = {"uri": str(tmp_path / f"{name}.parquet"), "format": "parquet"}
        _, decisions = evaluate(load_request(json.dumps(request).encode(), tmp_path))
        results[name] = decisions.to_json()
    assert [(u["id"], u["reasons"]) for u in results["naive"]["unplaced"]] == [("naive", ["INVALID_RECORD"])]
    assert results["aware"]["unplaced"] == [] and results["aware"]["totals"]["placed"] == 1


# -- kill -9 at random instants --------------------------------------------------------------------


def _kill_at(args: list[str], home: Path, delay: float) -> None:
    """Start `pcbo *args` and SIGKILL it after `delay` seconds (if it is still running)."""
    import signal
    import subprocess
    import sys
    import time

    from pcbo_dagster_tests.cli_runner import pcbo_env

    proc = subprocess.Popen(
        [sys.executable, "-m", "pcbo_dagster.cli.main", *args],
        env=pcbo_env(home),
        cwd=home.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_execute_and_rollback_killed_at_random_instants_converge(tmp_path):
    """Several trials (a fixed seed): an execute of 24 partitions, then a rollback of its run, each
    killed with SIGKILL at a random instant and run again, end byte for byte where uninterrupted runs
    end, with a clean `verify` and one commit (and one rollback) event per partition."""
    import random

    rng = random.Random(20261205)
    request = load_generator().make_request(records=6000, partitions=24, seed=4, run_id="kill-run-1")
    request_file = write_request(tmp_path / "request.json", request)
    reference = tmp_path / "reference"
    assert run_pcbo(["execute", "--input", request_file], home=reference).status == 0
    executed = lake_files(reference)
    assert run_pcbo(["rollback", "--dataset", "events", "--run-id", "kill-run-1"], home=reference).status == 0
    rolled_back = lake_files(reference)
    for trial in range(4):
        home = tmp_path / f"trial-{trial}"
        _kill_at(["execute", "--input", str(request_file)], home, rng.uniform(0.6, 3.0))
        assert run_pcbo(["execute", "--input", request_file], home=home).status == 0
        assert run_pcbo(["gc"], home=home).status == 0  # what a kill left that nothing names
        assert lake_files(home) == executed
        commits = [
            e["partition"]["key"] for e in backup_events(home) if e["event_type"] == "partition_committed"
        ]
        assert len(commits) == len(set(commits)) == 24
        _kill_at(["rollback", "--dataset", "events", "--run-id", "kill-run-1"], home, rng.uniform(0.6, 2.0))
        assert run_pcbo(["rollback", "--dataset", "events", "--run-id", "kill-run-1"], home=home).status == 0
        assert run_pcbo(["gc"], home=home).status == 0
        assert lake_files(home) == rolled_back
        undone = [
            e["partition"]["key"] for e in backup_events(home) if e["event_type"] == "partition_rolled_back"
        ]
        assert sorted(undone) == sorted(commits)
        verified = run_pcbo(["verify"], home=home)
        assert verified.status == 0, verified.document


# -- 5. the audit store every host shares (issue 14): objects on S3, written create-only ----------------


@pytest.fixture
def shared(tmp_path, s3_store, fresh_postgres_url, monkeypatch) -> dict[str, Any]:
    """One history on two "hosts" sharing an S3 lake, an S3 audit store and a PostgreSQL catalog."""
    store = s3_store.url(f"pas-{uuid.uuid4().hex[:8]}")
    env = {
        **s3_store.env,
        "PCBO_LAKE_URL": s3_store.url(f"lake-{uuid.uuid4().hex[:8]}"),
        "PCBO_CATALOG_URL": fresh_postgres_url,
        "PCBO_AUDIT_DIR": store,
        "PCBO_MULTI_HOST": "true",
    }
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    request = write_request(tmp_path / "a.json", _request("a1"))
    done = run_pcbo(["execute", "--input", request], home=tmp_path / "host-a", env=env, cwd=tmp_path)
    assert done.status == 0, done.stderr
    fs = s3_store.filesystem()
    chain_dir = store.split("://", 1)[1] + "/" + CHAIN
    return {"env": env, "fs": fs, "dir": chain_dir, "request": request, "tmp": tmp_path}


def _shared_pcbo(shared: dict[str, Any], host: str, *args: str) -> tuple[int, Any]:
    done = run_pcbo(list(args), home=shared["tmp"] / host, env=shared["env"], cwd=shared["tmp"])
    return done.status, done.document


def _objects(shared: dict[str, Any]) -> list[str]:
    shared["fs"].invalidate_cache()
    return sorted(
        p for p in shared["fs"].ls(shared["dir"], detail=False) if p.rsplit("/", 1)[-1][0].isdigit()
    )


def _shared_found(shared: dict[str, Any], kind: str) -> None:
    """Found by a host that has never seen the chain, survives --repair, and every run refuses."""
    before = _objects(shared)
    for host in ("host-v", "host-a"):
        status, found = _shared_pcbo(shared, host, "verify")
        assert status == 1 and kind in kinds(found), found
    status, repaired = _shared_pcbo(shared, "host-v", "verify", "--repair")
    assert status == 1 and kind in kinds(repaired), repaired
    assert _shared_pcbo(shared, "host-b", "execute", "--input", str(shared["request"]))[0] == 1
    assert _objects(shared) == before


@pytest.mark.postgres
def test_an_event_object_put_on_the_shared_store_alone_is_never_adopted(shared):
    names = _objects(shared)
    last = json.loads(shared["fs"].cat_file(names[-1]))
    forged = build_event(
        chain_key=CHAIN,
        seq=last["chain"]["seq"] + 1,
        prev_event_hash=last["chain"]["event_hash"],
        event_type="partition_rolled_back",
        timestamp="2024-06-01T00:00:00Z",
        body={"partition": last["partition"], "reason": "forged"},
    )
    name = f"{shared['dir']}/{forged['chain']['seq']:012d}.json"
    shared["fs"].pipe_file(name, rfc8785.dumps(forged), mode="create")
    _shared_found(shared, "audit_catalog_behind")


@pytest.mark.postgres
@pytest.mark.parametrize("which", ["deleted", "overwritten"])
def test_an_event_object_deleted_or_overwritten_on_the_shared_store_is_found(shared, which):
    names = _objects(shared)
    victim = names[len(names) // 2]
    if which == "deleted":
        shared["fs"].rm_file(victim)
    else:  # someone with plain write access (no create-only) rewrites an event, hash recomputed
        event = json.loads(shared["fs"].cat_file(victim))
        event["run_id"] = "forged"
        event["chain"]["event_hash"] = (
            "sha256:"
            + hashlib.sha256(
                rfc8785.dumps(
                    {**event, "chain": {k: v for k, v in event["chain"].items() if k != "event_hash"}}
                )
            ).hexdigest()
        )
        shared["fs"].pipe_file(victim, rfc8785.dumps(event))
    _shared_found(shared, "audit_chain_broken")


@pytest.mark.postgres
def test_a_poisoned_local_cache_is_never_believed(shared):
    """A host's cache edited so that its chain still verifies (a forged last event, hash recomputed):
    its runs read the store, not the cache, and verify is clean."""
    cache = next((shared["tmp"] / "host-a" / "pas-cache").rglob("v1.jsonl"))
    lines = cache.read_bytes().splitlines()
    last = json.loads(lines[-1])
    last["run_id"] = "forged"
    unhashed = {**last, "chain": {k: v for k, v in last["chain"].items() if k != "event_hash"}}
    last["chain"]["event_hash"] = "sha256:" + hashlib.sha256(rfc8785.dumps(unhashed)).hexdigest()
    cache.write_bytes(b"\n".join([*lines[:-1], rfc8785.dumps(last)]) + b"\n")
    before = _objects(shared)
    status, document = _shared_pcbo(shared, "host-a", "execute", "--input", str(shared["request"]))
    assert status == 0 and {p["status"] for p in document["partitions"]} == {"unchanged"}
    assert _objects(shared) == before
    assert b"forged" not in cache.read_bytes()
    status, found = _shared_pcbo(shared, "host-a", "verify")
    assert status == 0, found


def _changing_k2(tmp_path: Path) -> Path:
    request = _request("c1")
    request["sourceRecords"].append(
        {
            "id": "zz-late-0002",
            "occurredAt": "2024-01-01T02:30:00Z",
            "jurisdiction": "US",
            "consentGranted": True,
            "retentionExpiresAt": "2026-01-01T00:00:00Z",
            "amount": 7,
        }
    )
    return write_request(tmp_path / "c.json", request)


@pytest.mark.parametrize("link", ["symlink_to_another_partition", "hard_link_out_of_the_lake"])
def test_a_link_planted_where_a_run_will_write_is_never_written_through(home, tmp_path, link):
    """The red-team attack: before a run that writes K2's version 2, a link is planted at the file name
    it will write (predictable), pointing at K0's commit point or at a file outside the lake. The run
    replaces the name and never writes through it: the target keeps its bytes, the lake verifies."""
    planted = part(home, K2) / "_versions" / "v000002.json"
    if link == "symlink_to_another_partition":
        victim = part(home, K0) / "_manifest.json"
        os.symlink(os.path.relpath(victim, planted.parent), planted)
    else:
        victim = tmp_path / "outside.txt"
        victim.write_text("an operator's file outside the lake\n")
        os.link(victim, planted)
    before = victim.read_bytes()
    status, document = pcbo(home, "execute", "--input", str(_changing_k2(tmp_path)))
    assert status == 0, document
    assert victim.read_bytes() == before, "the run wrote through the planted link"
    assert not planted.is_symlink() and os.stat(planted).st_ino != os.stat(victim).st_ino
    assert manifest(home, K2, 2)["partition"]["key"] == K2
    status, verified = pcbo(home, "verify")
    assert status == 0, verified["findings"]


def test_a_directory_linked_to_another_partition_is_neither_written_nor_read_through(home, tmp_path):
    """K2's `_versions` replaced by a link to K0's (inside the lake): the run writing K2's version 2
    refuses (exit 1) and writes nothing through it; `verify` reports the link (a read through it would
    give K0's files as K2's)."""
    versions = part(home, K2) / "_versions"
    shutil.rmtree(versions)
    os.symlink(os.path.relpath(part(home, K0) / "_versions", versions.parent), versions)
    before = {p: p.read_bytes() for p in part(home, K0).rglob("*") if p.is_file()}
    status, document = pcbo(home, "execute", "--input", str(_changing_k2(tmp_path)))
    assert status == 1, document
    assert {p: p.read_bytes() for p in part(home, K0).rglob("*") if p.is_file()} == before
    assert_found_and_not_laundered(home, "path_outside_lake", K2)


def test_a_run_refused_midway_by_a_link_is_recorded_failed_not_left_running(home, tmp_path):
    """The run refused by a link on its way (above) had committed nothing but had started: its `runs`
    row said `running` for ever, as if it were still writing. An error that ends a run while it still
    holds its write lease is recorded: `failed`, with the error in its summary; the command still exits
    1 with the same message."""
    versions = part(home, K2) / "_versions"
    shutil.rmtree(versions)
    os.symlink(os.path.relpath(part(home, K0) / "_versions", versions.parent), versions)
    status, document = pcbo(home, "execute", "--input", str(_changing_k2(tmp_path)))
    assert status == 1, document
    with sqlite3.connect(home / "catalog.db") as db:
        row_status, summary = db.execute("SELECT status, summary FROM runs WHERE run_id = 'c1'").fetchone()
    assert row_status == "failed"
    failure = json.loads(summary)["failure"]
    assert "leads outside the lake or through a symbolic link" in failure, failure


def _plant_link_on_k2s_way(home: Path, where: str) -> None:
    """A symbolic link at `where` on the way to what the run writing K2 (`_changing_k2`) writes: K2's
    directory (moved out of the lake), its `_versions` or `_rollback` (to K0's), or its commit point
    (to K0's)."""
    if where == "partition":
        outside = lake_dir(home).parent / "k2-elsewhere"
        shutil.move(part(home, K2), outside)
        os.symlink(outside, part(home, K2))
        return
    planted = part(home, K2) / where
    if planted.is_dir():
        shutil.rmtree(planted)
    else:
        planted.unlink()
    os.symlink(os.path.relpath(part(home, K0) / where, planted.parent), planted)


@pytest.mark.parametrize("where", ["partition", "_versions", "_rollback", "_manifest.json"])
def test_a_link_in_place_before_a_run_refuses_it_before_it_writes_anything(home, tmp_path, where):
    """Red-team finding: a run meeting a link planted on the way to K2 (the second partition it
    writes) was refused there, but K1's data file and its `_versions/` and `_rollback/` manifests,
    staged before, stayed in the lake as a crash's leftovers. A link already in place when the run
    starts refuses it before it writes anything: no file or directory appears in the lake, no event
    (nor intent) is appended; its `runs` row is recorded `failed` with the error."""
    _plant_link_on_k2s_way(home, where)
    lake_before = tree_state(lake_dir(home))
    events_before = backup_events(home, intents=True)
    status, document = pcbo(home, "execute", "--input", str(_changing_k2(tmp_path)))
    assert status == 1, document
    assert tree_state(lake_dir(home)) == lake_before, "the refused run wrote in the lake"
    assert backup_events(home, intents=True) == events_before, "the refused run appended an event"
    with sqlite3.connect(home / "catalog.db") as db:
        row_status, summary = db.execute("SELECT status, summary FROM runs WHERE run_id = 'c1'").fetchone()
    assert row_status == "failed"
    failure = json.loads(summary)["failure"]
    assert f"events/v1/{K2}" in failure and "leads outside the lake or through a symbolic link" in failure


def _sign_with_checkpoints_linked_out(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A signing key set (`PCBO_SIGNING_KEY`), and the dataset version's `_checkpoints` a symbolic link
    to an empty directory outside the lake; returns that directory."""
    from pcbo_dagster.core.signed_note import new_signing_key

    key_file = tmp_path / "operator.key"
    key_file.write_text(new_signing_key("ops.example/operator").text + "\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("PCBO_SIGNING_KEY", str(key_file))
    outside = tmp_path / "checkpoints-elsewhere"
    outside.mkdir()
    os.symlink(outside, lake_dir(home) / "events" / "v1" / "_checkpoints")
    return outside


def test_a_link_at_the_checkpoints_refuses_a_signing_run_before_it_writes_anything(
    home, tmp_path, monkeypatch
):
    """Red-team finding: with a signing key a run writes its chain's checkpoint into
    `<dataset>/<versionLabel>/_checkpoints/` last, after its commits: a link planted there refused the
    run only then (exit 1, K1 and K2 committed and their events appended). It is checked with the rest,
    before the run writes anything: nothing in the lake, nothing through the link, no event."""
    outside = _sign_with_checkpoints_linked_out(home, tmp_path, monkeypatch)
    lake_before, events_before = tree_state(lake_dir(home)), backup_events(home, intents=True)
    status, document = pcbo(home, "execute", "--input", str(_changing_k2(tmp_path)))
    assert status == 1, document
    assert tree_state(lake_dir(home)) == lake_before, "the refused run wrote in the lake"
    assert backup_events(home, intents=True) == events_before, "the refused run appended an event"
    assert list(outside.iterdir()) == []


def test_a_link_planted_mid_run_is_still_refused_at_the_write(home, tmp_path, monkeypatch):
    """The run's check before it writes anything looks once: a link planted after it (K2's `_versions`
    linked to K0's just before K2's files are staged) is still refused at the write (exit 1), nothing
    written through it, no commit point moved, no event appended. What the run staged before (K1's
    version 3 manifests, K2's data file) stays as a crash's leftovers, which `pcbo gc` removes once the
    link is gone."""
    from pcbo_dagster.engine import failpoints

    versions, away = part(home, K2) / "_versions", tmp_path / "k2-versions"
    reached = failpoints.reached

    def plant_before_k2s_files(name: str, index: int) -> None:
        if (name, index) == ("before_staging_writes", KEYS.index(K2)):
            shutil.move(versions, away)
            os.symlink(os.path.relpath(part(home, K0) / "_versions", versions.parent), versions)
        reached(name, index)

    monkeypatch.setattr(failpoints, "reached", plant_before_k2s_files)
    lake_before, events_before = lake_files(home), backup_events(home, intents=True)
    status, document = pcbo(home, "execute", "--input", str(_changing_k2(tmp_path)))
    assert status == 1, document
    assert versions.is_symlink(), "the link was not planted mid-run"
    versions.unlink()
    shutil.move(away, versions)
    assert backup_events(home, intents=True) == events_before, "the refused run appended an event"
    lake_after = lake_files(home)
    assert {rel: lake_after[rel] for rel in lake_before} == lake_before, "the run changed a file"
    leftovers = sorted(set(lake_after) - set(lake_before))
    k1, k2 = f"events/v1/{K1}", f"events/v1/{K2}"
    assert leftovers[:2] == [f"{k1}/_rollback/v000003.json", f"{k1}/_versions/v000003.json"], leftovers
    assert len(leftovers) == 3 and leftovers[2].startswith(f"{k2}/part-"), leftovers
    status, collected = pcbo(home, "gc")
    assert status == 0, collected
    assert sorted(r["path"] for r in collected["removed"]) == leftovers
    assert lake_files(home) == lake_before
    assert pcbo(home, "verify")[0] == 0


def _forge_partition_with(home: Path, key: str, record_id: str) -> None:
    """K's data file and commit point rewritten to agree with each other (checksums, counts, Merkle
    root) around an extra row `record_id`: everything but the audit chain says it was committed."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pcbo_dagster.core import merkle
    from pcbo_dagster.lake import manifests

    committed = manifest(home, key)
    table = pq.read_table(lake_dir(home) / committed["files"][0]["path"])
    row = {**table.slice(0, 1).to_pylist()[0], "id": record_id}
    rows = sorted([*table.to_pylist(), row], key=lambda r: r["id"].encode())
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), buffer, compression="zstd")
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = f"events/v1/{key}/part-{digest[:32]}.parquet"
    (lake_dir(home) / path).write_bytes(data)
    committed["files"] = [
        {"path": path, "checksum": "sha256:" + digest, "rowCount": len(rows), "byteSize": len(data)}
    ]
    committed["recordCount"] = len(rows)
    committed["merkleRoot"] = merkle.root_hex([r["id"] for r in rows])
    committed["counts"]["add"] += 1
    (part(home, key) / "_manifest.json").write_bytes(manifests.encode(committed))


def test_no_proof_is_made_from_a_commit_point_the_chain_never_committed(home):
    """The red-team attack: K0's data file and manifest forged to agree with each other around a
    forged row. `verify` finds it; `pcbo proof` must not prove the forged row (it did: it read the
    lake alone), nor prove a downgraded commit point's rows as current."""
    _forge_partition_with(home, K0, "FORGED-0001")
    assert_found_and_not_laundered(home, "commit_point_not_on_chain", K0)
    status, document = pcbo(home, "proof", "--dataset", "events", "--partition", K0, "--id", "FORGED-0001")
    assert status == 1 and document is None
    # Version 1 of K1 put back as its commit point: version 2 is current on the chain.
    (part(home, K1) / "_manifest.json").write_bytes((part(home, K1) / "_versions/v000001.json").read_bytes())
    ids = pq_ids(lake_dir(home) / manifest(home, K1, 1)["files"][0]["path"])
    status, document = pcbo(home, "proof", "--dataset", "events", "--partition", K1, "--id", ids[0])
    assert status == 1 and document is None
    # The versions the chain committed still prove their consistency; one it never committed is unknown.
    status, document = pcbo(
        home, "proof", "--dataset", "events", "--partition", K1, "--from-version", "1", "--to-version", "2"
    )
    assert status == 0 and document["size2"] == document["size1"] + 1, document
    status, document = pcbo(
        home, "proof", "--dataset", "events", "--partition", K1, "--from-version", "1", "--to-version", "3"
    )
    assert status == 2 and document is None


def test_no_proof_is_made_from_a_chain_that_does_not_verify(home):
    lines = backup_file(home).read_bytes().splitlines(keepends=True)
    event = json.loads(lines[1])
    event["run_id"] = "rewritten"
    lines[1] = json.dumps(event).encode() + b"\n"
    backup_file(home).write_bytes(b"".join(lines))
    ids = pq_ids(lake_dir(home) / manifest(home, K0)["files"][0]["path"])
    status, document = pcbo(home, "proof", "--dataset", "events", "--partition", K0, "--id", ids[0])
    assert status == 1 and document is None


def pq_ids(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [str(v) for v in pq.read_table(path, columns=["id"]).column("id").to_pylist()]


# -- second pass on repair (red-team findings on the day's fixes) ---------------------------------------


def test_repair_never_waits_on_its_own_lock_nor_on_a_catalog_only_lease(home):
    """Red-team findings: the run lock `<label>.run.lock` was the chain lock of a version labelled
    `<label>.run`, so repair, holding one and reconciling the other, waited on itself for ever; and a
    lease row for a dataset only a catalog `datasets` row names (a holder `[1]`) stopped repair with
    an internal error. The run lock is named as no label can be, repair locks only chains, and a
    holder that is not pcbo's is never judged dead (it expires)."""
    (home / "pas" / "events" / "v1.run.jsonl").write_bytes(b"")
    done = run_pcbo(["verify", "--repair"], home=home, timeout=60)
    assert done.status == 0, done.stderr
    _sql(home, "INSERT INTO datasets VALUES ('junk', 'v1', '2024-01-01 00:00:00')")
    _sql(
        home,
        "INSERT INTO dataset_leases VALUES ('junk', 'v1', '[1]', ?, ?)",
        "2024-01-01 00:00:00",
        "2099-01-01 00:00:00",
    )
    done = run_pcbo(["verify", "--repair"], home=home, timeout=60)
    assert done.status == 0, done.stderr
    # A lease of a real chain whose holder is not pcbo's: waited for, then one clear line (exit 1).
    _sql(
        home,
        "INSERT INTO dataset_leases VALUES ('events', 'v1', '[1]', ?, ?)",
        "2024-01-01 00:00:00",
        "2099-01-01 00:00:00",
    )
    busy = run_pcbo(["verify", "--repair"], home=home, env={"PCBO_LEASE_WAIT_SECONDS": "1"}, timeout=60)
    assert busy.status == 1 and "not one pcbo wrote ('[1]')" in busy.stderr, busy.stderr
    assert "internal error" not in busy.stderr


def test_rows_and_manifests_of_any_shape_give_findings_never_an_internal_error(home):
    """Red-team findings: a deeply nested commit point or rollback manifest (RecursionError), and
    catalog partition rows of another type (a text version, files that are not JSON, a garbage time)
    made verify, repair and gc fail with an internal error and no report."""
    deep = b"[" * 5000 + b"]" * 5000
    (part(home, K0) / "_manifest.json").write_bytes(deep)
    (part(home, K2) / "_rollback" / "v000001.json").write_bytes(deep)
    _sql(home, f"UPDATE partitions SET version = 'x' WHERE partition_key = '{K1}' AND version = 2")
    _sql(home, f"UPDATE partitions SET files = 'not json' WHERE partition_key = '{K3}'")
    for args in (["verify"], ["verify", "--repair"]):
        checked = run_pcbo(args, home=home)
        assert checked.status == 1 and checked.document is not None, checked.stderr
        found = kinds(checked.document)
        assert {"manifest_misplaced", "rollback_manifest_mismatch", "catalog_unreadable"} <= found, found
    _sql(home, "UPDATE partitions SET files = '[]'")
    _sql(home, f"UPDATE partitions SET committed_at = 'garbage' WHERE partition_key = '{K2}'")
    for args in (["verify"], ["gc"]):
        checked = run_pcbo(args, home=home)
        assert checked.document is not None and "internal error" not in checked.stderr, checked.stderr


def test_a_partitions_only_row_given_a_text_version_is_unreadable_and_never_healed_around(home):
    """Red-team finding (README walk): a partition's only row given a text version (K3's, version 1
    made 'one') was read as is: verify reported a version the chain never committed and the current
    version's row missing, "a crash window", which `verify --repair` then healed by recording the
    row again beside the garbage one; gc went on with that dataset version. A row of another type is
    no row pcbo writes: `catalog_unreadable`, repair writes nothing, gc skips the dataset version."""
    _sql(home, f"UPDATE partitions SET version = 'one' WHERE partition_key = '{K3}'")
    status, found = pcbo(home, "verify")
    assert status == 1 and "catalog_unreadable" in kinds(found), found
    before = _home_state(home)
    status, repaired = pcbo(home, "verify", "--repair")
    assert status == 1 and "catalog_unreadable" in kinds(repaired), repaired
    assert repaired["repaired"] == [] and _home_state(home) == before
    status, collected = pcbo(home, "gc")
    assert status == 0 and collected["skipped"] == [
        {"where": CHAIN, "reason": "the catalog's partition rows are unreadable"}
    ], collected
    assert _home_state(home) == before


def test_an_interrupted_rollback_beside_diverged_stores_is_reported_not_a_crash(home):
    """Red-team finding: completing an interrupted rollback appended to stores that disagree; the
    refusal escaped repair (exit 1, no report). It is `audit_stores_diverge`, and nothing is touched."""
    args = ["rollback", "--dataset", "events", "--partition", K1]
    assert run_pcbo(args, home=home, env={"PCBO_FAILPOINT": "rollback_after_intent@0"}).status == 86
    lines = backup_file(home).read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    from pcbo_dagster.core.audit_chain import build_event

    forged = build_event(
        chain_key=CHAIN,
        seq=last["chain"]["seq"] + 1,
        prev_event_hash=last["chain"]["event_hash"],
        event_type="note",
        timestamp=last["timestamp"],
        body={"by": "someone who can write the backup"},
    )
    with backup_file(home).open("ab") as handle:
        handle.write(json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    before = lake_files(home)
    repaired = run_pcbo(["verify", "--repair"], home=home)
    assert repaired.status == 1 and repaired.document is not None, repaired.stderr
    assert "audit_stores_diverge" in kinds(repaired.document)
    assert lake_files(home) == before


_PG_INSERT_DROPPERS = {
    "rule": ["CREATE RULE eat AS ON INSERT TO audit_events DO INSTEAD NOTHING"],
    "trigger": [
        "CREATE FUNCTION eat() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
        "CREATE TRIGGER eat BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION eat()",
    ],
    "rewriting-trigger": [
        "CREATE FUNCTION eat() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "NEW.event_json := '{}'; RETURN NEW; END $$",
        "CREATE TRIGGER eat BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION eat()",
    ],
}


@pytest.mark.postgres
@pytest.mark.parametrize("dropper", sorted(_PG_INSERT_DROPPERS))
def test_events_the_catalog_does_not_store_as_given_fail_the_append_on_postgresql(
    fresh_postgres_url, tmp_path, monkeypatch, dropper
):
    """Red-team finding: a RULE or a BEFORE INSERT trigger on `audit_events` that drops (or rewrites)
    pcbo's inserts left the run `committed`, exit 0, its events in the backup alone with the catalog's
    head moved over them; the next run appended after the hole. The append now reads its rows back:
    the run stops (exit 1) with its batch pending, a crash window healed once the rule is gone."""
    from sqlalchemy import create_engine, text

    monkeypatch.setenv("PCBO_CATALOG_URL", fresh_postgres_url)
    home = tmp_path / "home"
    status, document = pcbo(
        home, "execute", "--input", str(write_request(tmp_path / "a.json", _request("a1")))
    )
    assert status == 0, document
    engine = create_engine(fresh_postgres_url)
    with engine.begin() as conn:
        for statement in _PG_INSERT_DROPPERS[dropper]:
            conn.execute(text(statement))
    later = write_request(tmp_path / "b.json", _request("b1", changed=True))
    status, document = pcbo(home, "execute", "--input", str(later))
    assert status == 1, document
    with engine.begin() as conn:
        conn.execute(text("DROP RULE IF EXISTS eat ON audit_events"))
        conn.execute(text("DROP TRIGGER IF EXISTS eat ON audit_events"))
    engine.dispose()
    status, document = pcbo(home, "verify", "--repair")
    assert status == 0, document
    assert pcbo(home, "verify")[0] == 0
    status, document = pcbo(home, "execute", "--input", str(later))
    assert status == 0, document
    status, document = pcbo(home, "verify")
    assert status == 0, document


def test_gc_leaves_alone_a_version_file_named_with_other_digits(home):
    """(red-team finding) gc matched version manifests by `v(\\d+)\\.json`, and Python's `\\d` and int()
    take any script's digits: a file `_versions/v٩.json` (Arabic-Indic 9) that pcbo never writes was
    read as version 9 and removed as an uncommitted version, though gc leaves files of any other
    shape alone. Only pcbo's own names (ASCII digits) are judged."""
    versions = part(home, K2) / "_versions"
    planted = versions / "v\u0669.json"
    planted.write_bytes(b"not pcbo's")
    leftover = part(home, K2) / ".tmp-crash-leftover"
    leftover.write_bytes(b"a rename that never happened")
    status, document = pcbo(home, "gc")
    assert status == 0, document
    assert [r["path"] for r in document["removed"]] == [f"events/v1/{K2}/.tmp-crash-leftover"]
    assert planted.read_bytes() == b"not pcbo's" and not leftover.exists()


def test_gc_judges_no_dataset_version_its_catalog_never_ran(home, tmp_path):
    """(red-team finding) gc run with a home whose catalog and audit backup never ran a dataset version
    the lake holds (`--lake` pointing at another home's lake, a lake two catalogs share) judged it
    against an empty chain, which "verifies": the version manifests that rolled-back partitions keep
    (their restorable history, named by the other home's chain) looked like a first run's crash
    leftovers and were removed. A crash's leftovers always come with the run's catalog row (written
    before anything is staged), so a dataset version with no event and no run is skipped, nothing of
    it removed."""
    for run_id in ("b1", "a1"):
        status, document = pcbo(home, "rollback", "--dataset", "events", "--run-id", run_id)
        assert status == 0, document
    history = {p: p.read_bytes() for p in (lake_dir(home) / "events").rglob("*") if p.is_file()}
    assert any(p.parent.name == "_versions" for p in history) and not any(
        p.name == "_manifest.json" for p in history
    )
    other = tmp_path / "other"
    request = {**_request("o1"), "dataset": "other-events"}
    status, document = pcbo(other, "execute", "--input", str(write_request(tmp_path / "o.json", request)))
    assert status == 0, document
    for args in (("gc", "--dry-run"), ("gc",)):
        status, document = pcbo(other, *args, "--lake", str(lake_dir(home)))
        assert status == 0, document
        assert [r["path"] for r in document["removed"] if r["path"].startswith("events/")] == []
        assert [s for s in document["skipped"] if s["where"] == CHAIN] == [
            {"where": CHAIN, "reason": "no run of this dataset version is in the catalog or on its chain"}
        ]
    assert {p: p.read_bytes() for p in (lake_dir(home) / "events").rglob("*") if p.is_file()} == history
    assert pcbo(home, "verify")[0] == 0


def _gc_another_homes_lake(home: Path, other: Path) -> dict[str, Any]:
    """`pcbo gc` of `other` given `--lake` naming `home`'s lake (a dry run, then one that removes), with
    a crash's `.tmp-*` leftover in K2: its document; only the leftover is removed."""
    leftover = part(home, K2) / ".tmp-crash-leftover"
    leftover.write_bytes(b"a rename that never happened")
    history = {p: p.read_bytes() for p in (lake_dir(home) / "events").rglob("*") if p.is_file()}
    for args in (("gc", "--dry-run"), ("gc",)):
        status, document = pcbo(other, *args, "--lake", str(lake_dir(home)))
        assert status == 0, document
        assert [r["path"] for r in document["removed"]] == [f"events/v1/{K2}/.tmp-crash-leftover"], document
    del history[leftover]
    assert {p: p.read_bytes() for p in (lake_dir(home) / "events").rglob("*") if p.is_file()} == history
    assert pcbo(home, "verify")[0] == 0
    return document


def test_gc_keeps_the_versions_another_homes_runs_wrote_in_partitions_its_chain_never_named(home, tmp_path):
    """(red-team finding) The guard above was per dataset version: a home whose catalog ran the same
    dataset version (`events/v1`, other hours) given `--lake` naming another home's lake judged that
    lake's partitions against its own chain, which never named them: the version manifests that
    rolled-back partitions keep looked like a crash's leftovers and were removed (`verify` of the
    other home: `version_manifest_missing`). A version no event or catalog row names is a leftover only
    when its manifest names a run of this catalog (run id and plan hash); others are kept, reported."""
    for run_id in ("b1", "a1"):
        status, document = pcbo(home, "rollback", "--dataset", "events", "--run-id", run_id)
        assert status == 0, document
    other = tmp_path / "other"
    request = json.loads(json.dumps(_request("o1")).replace("2024-01-01T", "2024-01-03T"))
    status, document = pcbo(other, "execute", "--input", str(write_request(tmp_path / "o.json", request)))
    assert status == 0, document
    document = _gc_another_homes_lake(home, other)
    kept = [f"{CHAIN}/{k}/_versions/v000001.json" for k in KEYS] + [f"{CHAIN}/{K1}/_versions/v000002.json"]
    assert sorted(s["where"] for s in document["skipped"]) == sorted(kept), document


def test_gc_keeps_a_rolled_back_version_of_another_home_that_ran_the_same_request(home, tmp_path, requests):
    """(red-team finding) Staging and production run the same requests: their lakes' manifests are
    byte-identical. Production rolled back run b1 (K1's version 2; its manifests stay, named by its
    chain); `pcbo gc --lake <production's lake>` run from staging's home, whose chain agrees with every
    commit point there, removed K1's `_versions/v000002.json` and `_rollback/v000002.json` (named by no
    event of its own chain) and production's `verify` found `version_manifest_missing`. Run b1 is no
    run of staging's catalog: that version is kept and reported."""
    status, document = pcbo(home, "rollback", "--dataset", "events", "--run-id", "b1")
    assert status == 0, document
    other = tmp_path / "other"
    status, document = pcbo(other, "execute", "--input", str(requests["a"]))
    assert status == 0, document
    document = _gc_another_homes_lake(home, other)
    assert document["skipped"] == [
        {
            "where": f"{CHAIN}/{K1}/_versions/v000002.json",
            "reason": "a version no run of this catalog wrote (another home's?): kept",
        }
    ]


def test_a_catalog_run_row_that_is_no_json_stops_no_gc(home):
    """gc reads the dataset version's run rows (whose runs' version manifests are leftovers): a row
    whose metadata is no JSON (the catalog is anyone's to write) skips that dataset version, reported,
    nothing removed, instead of ending gc with a traceback."""
    leftover = part(home, K2) / ".tmp-crash-leftover"
    leftover.write_bytes(b"a rename that never happened")
    with sqlite3.connect(home / "catalog.db") as conn:
        conn.execute("UPDATE runs SET metadata = '{not json' WHERE run_id = 'a1'")
    status, document = pcbo(home, "gc")
    assert status == 0, document
    assert document["removed"] == []
    assert document["skipped"] == [{"where": CHAIN, "reason": "the catalog's run rows are unreadable"}]
    assert leftover.exists()


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("shadow", "named"),
    [
        ("CREATE VIEW decoy.audit_events AS SELECT * FROM public.audit_events", "a view in schema decoy"),
        ("CREATE TABLE decoy.audit_events (LIKE public.audit_events)", "a table in schema decoy"),
    ],
    ids=["view", "table"],
)
def test_a_relation_shadowing_a_catalog_table_is_named_not_called_a_dropped_trigger(
    fresh_postgres_url, tmp_path, shadow, named
):
    """Red-team finding: with a view or table of a catalog table's name in a schema earlier on the
    search path, pcbo's statements reach it, and verify said `catalog_trigger_missing`: "an
    append-only trigger was dropped", sending the operator to look for a trigger that is still there.
    The finding now names the relation the name reaches (schema, kind) and the table it hides."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from pcbo_dagster.catalog import CatalogStore

    store = CatalogStore(fresh_postgres_url)
    store.migrate()
    database = make_url(fresh_postgres_url).database
    with store.write() as conn:
        conn.execute(text("CREATE SCHEMA decoy"))
        conn.execute(text(shadow))
        conn.execute(text(f'ALTER DATABASE "{database}" SET search_path = decoy, public'))
    store.close()  # the database's settings apply to new sessions
    problem = store.append_only_trigger_problems()["audit_events_append_only"]
    store.close()
    assert named in problem and "public.audit_events" in problem, problem
    run = run_pcbo(["verify"], home=tmp_path / "home", env={"PCBO_CATALOG_URL": fresh_postgres_url})
    found = [f for f in run.document["findings"] if f["where"] == "audit_events_append_only"]
    assert [f["kind"] for f in found] == ["catalog_trigger_missing"], run.document
    assert named in found[0]["detail"] and "dropped" not in found[0]["detail"], found

"""End to end through the `pcbo` command line (CONTRACT sections 3-7).

One request (300 records, 6 partitions, a fractional start and end, so every partition key carries
microseconds) is executed once into a module-wide home by a real `pcbo` subprocess; tests that
change anything work on a copy. The other steps run the same CLI (`cli.main`) in this process
(`run_pcbo_in_process`): same arguments, exit statuses, stdout documents and stderr, without a
Python start-up per step.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rfc8785

from pcbo_dagster.audit import AuditBackup
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.engine import proofs
from pcbo_dagster.lake.storage import LakeStorage
from pcbo_dagster_tests.cli_runner import (
    backup_events,
    backup_file,
    backup_lines,
    lake_dir,
    lake_files,
    lake_snapshot,
    load_generator,
    run_pcbo,
    run_pcbo_in_process,
    write_request,
)
from pcbo_dagster_tests.pcbo_fork_runner import run_pcbo_forked

pytestmark = pytest.mark.slow

DATASET, LABEL = "events", "v1"
CHAIN = f"{DATASET}/{LABEL}"
KEYS = [f"20240101T0{h}0000.250000Z" for h in range(6)]
CHANGED = 2  # the partition a changed request adds one record to
NEW_LAST_ID = "zz-late-0001"  # sorts after every generated id ("legacy-...", "rec-...")
NEW_FIRST_ID = "aa-early-0001"  # sorts before every generated id


# -- independent reference implementations (hashlib / rfc8785 only, nothing from pcbo) ------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def rfc6962_root(leaves: list[bytes]) -> bytes:
    """MTH of RFC 6962 section 2.1."""
    n = len(leaves)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + leaves[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return _h(b"\x01" + rfc6962_root(leaves[:k]) + rfc6962_root(leaves[k:]))


def rfc9162_verify_inclusion(index: int, size: int, leaf: bytes, path: list[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, _h(b"\x00" + leaf)
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _h(b"\x01" + p + r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _h(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def rfc9162_verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: list[bytes]
) -> bool:
    """RFC 9162 section 2.1.4.2 (size1 >= 1)."""
    if size1 < 1 or size1 > size2:
        return False
    if size1 == size2:
        return not proof and root1 == root2
    if not proof:
        return False
    if size1 & (size1 - 1) == 0:
        proof = [root1, *proof]
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = _h(b"\x01" + c + fr)
            sr = _h(b"\x01" + c + sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = _h(b"\x01" + sr + c)
        fn >>= 1
        sn >>= 1
    return fr == root1 and sr == root2 and sn == 0


def independent_event_hash(event: dict[str, Any]) -> str:
    stripped = copy.deepcopy(event)
    del stripped["chain"]["event_hash"]
    return "sha256:" + hashlib.sha256(rfc8785.dumps(stripped)).hexdigest()


def digest(value: bytes) -> str:
    return "sha256:" + value.hex()


def undigest(value: str) -> bytes:
    assert value.startswith("sha256:")
    return bytes.fromhex(value[len("sha256:") :])


# -- requests and homes ------------------------------------------------------------------------


def base_request() -> dict[str, Any]:
    request = load_generator().make_request(records=300, partitions=6, seed=11, run_id="e2e-run-001")
    # A fractional start and end: every partition key carries microseconds, the last one is short.
    request["start"] = "2024-01-01T00:00:00.250000Z"
    request["end"] = "2024-01-01T05:30:00.750000Z"
    return request


def extra_record(record_id: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "occurredAt": "2024-01-01T02:30:00.5Z",
        "jurisdiction": "US",
        "consentGranted": True,
        "retentionExpiresAt": "2026-01-01T00:00:00Z",
        "amount": 7,
        "channel": "web",
        "converted": True,
    }


def changed_request(run_id: str, *extra_ids: str) -> dict[str, Any]:
    request = base_request()
    request["runId"] = run_id
    request["sourceRecords"] = [*request["sourceRecords"], *(extra_record(i) for i in extra_ids)]
    return request


def execute(home: Path, request_file: Path, subprocess: bool = False, **env: str) -> dict[str, Any]:
    run = run_pcbo if subprocess else run_pcbo_in_process
    status, document, stderr = run(["execute", "--input", request_file], home=home, env=env)
    assert status == 0, stderr
    return document


def verify(home: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    status, document, stderr = run_pcbo_in_process(["verify", *extra], home=home)
    assert document is not None, stderr
    assert status == (0 if document["status"] == "clean" else 1), (status, document)
    return status, document


def assert_clean(home: Path) -> dict[str, Any]:
    status, document = verify(home)
    assert status == 0 and document["findings"] == [], document["findings"]
    return document


def copy_home(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def part_dir(home: Path, key: str) -> Path:
    return lake_dir(home) / DATASET / LABEL / key


def parquet_ids(data: bytes) -> list[str]:
    return pq.read_table(io.BytesIO(data)).column("id").to_pylist()


def manifest_of(home: Path, key: str, version: int | None = None) -> dict[str, Any]:
    path = part_dir(home, key) / ("_manifest.json" if version is None else f"_versions/v{version:06d}.json")
    return json.loads(path.read_bytes())


def catalog_count(home: Path, table: str) -> int:
    with sqlite3.connect(Path(home) / "catalog.db") as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def request_file(work: Path) -> Path:
    return write_request(work / "requests" / "base.json", base_request())


@pytest.fixture(scope="module")
def home_a(work: Path, request_file: Path) -> tuple[Path, dict[str, Any]]:
    """The base request executed once into an empty home by a real `pcbo` subprocess. Tests must not
    modify it: copy it."""
    home = work / "home-a"
    document = execute(home, request_file, subprocess=True)
    assert document["status"] == "committed"
    assert [p["key"] for p in document["partitions"]] == KEYS
    assert all(p["status"] == "committed" and p["version"] == 1 for p in document["partitions"])
    return home, document


@pytest.fixture(scope="module")
def home_v2(work: Path, home_a: tuple[Path, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """home-a, then a request with one more record (sorting last) in partition CHANGED."""
    home = copy_home(home_a[0], work / "home-v2")
    request = write_request(work / "requests" / "v2.json", changed_request("e2e-run-002", NEW_LAST_ID))
    return home, execute(home, request)


# -- determinism and idempotence ---------------------------------------------------------------


def test_two_executes_into_empty_homes_are_byte_identical(work, request_file, home_a):
    home, first = home_a
    second = execute(work / "home-b", request_file)
    files_a, files_b = lake_files(home), lake_files(work / "home-b")
    parquet = [p for p in files_a if p.endswith(".parquet")]
    assert len(parquet) == len(KEYS)
    assert len([p for p in files_a if p.endswith("/_manifest.json")]) == len(KEYS)
    assert sorted(files_a) == sorted(files_b)
    for rel, data in files_a.items():
        assert files_b[rel] == data, f"{rel} differs between two executes of the same request"

    assert first["planHash"] == second["planHash"]
    assert first["decisionHash"] == second["decisionHash"]
    for a, b in zip(first["partitions"], second["partitions"], strict=True):
        assert a["key"] == b["key"]
        assert a["merkleRoot"] == b["merkleRoot"]
        assert a["manifestChecksum"] == b["manifestChecksum"]
        assert [(f["checksum"], f["rowCount"], f["byteSize"]) for f in a["files"]] == [
            (f["checksum"], f["rowCount"], f["byteSize"]) for f in b["files"]
        ]
        # the reported checksum is the SHA-256 of the file's bytes
        rel = a["files"][0]["uri"].split("/lake/", 1)[1]
        assert a["files"][0]["checksum"] == "sha256:" + hashlib.sha256(files_a[rel]).hexdigest()
        assert a["files"][0]["byteSize"] == len(files_a[rel])
    # the plan hash execute reports is the one `pcbo plan` computes (no wall clock, no home in it)
    status, plan, stderr = run_pcbo_in_process(["plan", "--input", request_file], cwd=work)
    assert status == 0, stderr
    assert plan["planHash"] == first["planHash"]
    assert [p["key"] for p in plan["partitions"]] == KEYS


def test_re_execute_is_unchanged_and_writes_nothing(work, request_file, home_a):
    home = copy_home(home_a[0], work / "home-idem")
    before_lake = lake_snapshot(home)
    before_chain = backup_file(home).read_bytes()
    before_mirror = catalog_count(home, "audit_events")

    document = execute(home, request_file)

    assert document["status"] == "unchanged"
    assert [p["status"] for p in document["partitions"]] == ["unchanged"] * len(KEYS)
    assert not any(p.get("healed") for p in document["partitions"])
    assert document["totals"]["committed"] == 0 and document["totals"]["unchanged"] == len(KEYS)
    first_hashes = [p["eventHash"] for p in home_a[1]["partitions"]]
    assert [p["eventHash"] for p in document["partitions"]] == first_hashes
    assert lake_snapshot(home) == before_lake, "a re-execute of identical content rewrote lake files"
    assert backup_file(home).read_bytes() == before_chain, "a re-execute appended an audit event"
    assert catalog_count(home, "audit_events") == before_mirror


# -- a changed request: a new partition version and consistency proofs -------------------------


def test_changed_request_makes_version_2_of_exactly_that_partition(home_a, home_v2):
    home, document = home_v2
    assert document["status"] == "committed"
    statuses = {p["key"]: (p["status"], p["version"]) for p in document["partitions"]}
    expected = {k: ("unchanged", 1) for k in KEYS}
    expected[KEYS[CHANGED]] = ("committed", 2)
    assert statuses == expected

    old, new = manifest_of(home, KEYS[CHANGED], 1), manifest_of(home, KEYS[CHANGED])
    assert new == manifest_of(home, KEYS[CHANGED], 2)
    assert new["partitionVersion"] == 2 and new["previousVersion"] == 1
    assert new["recordCount"] == old["recordCount"] + 1
    assert new["runId"] == "e2e-run-002"
    # the old version's file stays (it is version 1's, still needed for rollback and proofs)
    for manifest in (old, new):
        assert (lake_dir(home) / manifest["files"][0]["path"]).is_file()
    for key in KEYS:
        if key != KEYS[CHANGED]:
            assert manifest_of(home, key) == manifest_of(home_a[0], key)
            assert not (part_dir(home, key) / "_versions" / "v000002.json").exists()

    events = backup_events(home)
    assert len(events) == len(KEYS) + 1
    assert events[-1]["event_type"] == "partition_committed"
    assert events[-1]["partition"]["key"] == KEYS[CHANGED] and events[-1]["partition"]["version"] == 2
    assert_clean(home)


def test_consistency_proof_when_the_new_id_sorts_last(work, home_v2):
    home, _ = home_v2
    key = KEYS[CHANGED]
    proof_file = work / "consistency-1-2.json"
    status, _, stderr = run_pcbo_in_process(
        [
            "proof",
            "--dataset",
            DATASET,
            "--partition",
            key,
            "--from-version",
            "1",
            "--to-version",
            "2",
            "--output",
            proof_file,
        ],
        home=home,
    )
    assert status == 0, stderr
    proof = json.loads(proof_file.read_text())
    old, new = manifest_of(home, key, 1), manifest_of(home, key, 2)
    assert (proof["size1"], proof["size2"]) == (old["recordCount"], new["recordCount"])
    assert (proof["root1"], proof["root2"]) == (old["merkleRoot"], new["merkleRoot"])
    assert rfc9162_verify_consistency(
        proof["size1"],
        proof["size2"],
        undigest(proof["root1"]),
        undigest(proof["root2"]),
        [undigest(h) for h in proof["proof"]],
    )

    status, document, stderr = run_pcbo_in_process(["verify-proof", "--proof", proof_file], cwd=work)
    assert status == 0, stderr
    assert document["valid"] is True


def test_consistency_proof_refused_when_the_new_version_does_not_extend(work, home_v2):
    home = copy_home(home_v2[0], work / "home-v3")
    request = write_request(
        work / "requests" / "v3.json", changed_request("e2e-run-003", NEW_LAST_ID, NEW_FIRST_ID)
    )
    document = execute(home, request)
    assert {p["key"]: p["version"] for p in document["partitions"]}[KEYS[CHANGED]] == 3
    assert [p["key"] for p in document["partitions"] if p["status"] == "committed"] == [KEYS[CHANGED]]

    status, out, stderr = run_pcbo_forked(
        [
            "proof",
            "--dataset",
            DATASET,
            "--partition",
            KEYS[CHANGED],
            "--from-version",
            "2",
            "--to-version",
            "3",
        ],
        home=home,
    )
    assert status == 2, (status, out, stderr)
    assert out is None
    assert "does not extend" in stderr and "Traceback" not in stderr


# -- inclusion proofs, checked offline --------------------------------------------------------


def test_inclusion_proof_verifies_offline_and_rejects_tampering(work, home_a):
    home = copy_home(home_a[0], work / "home-proof")
    key = KEYS[3]
    manifest = manifest_of(home, key)
    ids = parquet_ids((lake_dir(home) / manifest["files"][0]["path"]).read_bytes())
    record_id = ids[len(ids) // 2]
    proof_file = work / "inclusion.json"
    status, _, stderr = run_pcbo_in_process(
        ["proof", "--dataset", DATASET, "--partition", key, "--id", record_id, "--output", proof_file],
        home=home,
    )
    assert status == 0, stderr
    status, _, stderr = run_pcbo_in_process(
        ["proof", "--dataset", DATASET, "--partition", key, "--id", "no-such-id"], home=home
    )
    assert status == 2 and "no-such-id" in stderr

    proof = json.loads(proof_file.read_text())
    assert proof["id"] == record_id and proof["merkleRoot"] == manifest["merkleRoot"]
    assert proof["leafIndex"] == len(ids) // 2 and proof["treeSize"] == len(ids)
    assert rfc9162_verify_inclusion(
        proof["leafIndex"],
        proof["treeSize"],
        record_id.encode(),
        [undigest(h) for h in proof["auditPath"]],
        undigest(manifest["merkleRoot"]),
    )

    # verify-proof needs no lake, no catalog, no home at all
    shutil.rmtree(home)
    tampered = copy.deepcopy(proof)
    first = tampered["auditPath"][0]
    tampered["auditPath"][0] = first[:-1] + ("0" if first[-1] != "0" else "1")
    tampered_file = write_request(work / "inclusion-tampered.json", tampered)
    other_root = manifest_of(home_a[0], KEYS[4])["merkleRoot"]

    status, document, stderr = run_pcbo_in_process(
        ["verify-proof", "--proof", proof_file], home=home, cwd=work
    )
    assert status == 0, stderr
    assert document["valid"] is True and document["reasons"] == []

    status, document, _ = run_pcbo_in_process(["verify-proof", "--proof", tampered_file], home=home, cwd=work)
    assert status == 1 and document["valid"] is False and document["reasons"]

    status, document, _ = run_pcbo_in_process(
        ["verify-proof", "--proof", proof_file, "--root", other_root], home=home, cwd=work
    )
    assert status == 1 and document["valid"] is False
    assert document["merkleRoot"] == other_root
    assert not home.exists(), "verify-proof created a home"


def test_a_partition_key_that_is_not_exactly_a_key_never_reaches_the_lake(work, home_a):
    home = copy_home(home_a[0], work / "home-bad-key")
    key = KEYS[3]
    # A manifest planted one level up: `--partition ..` would have read it as a partition's.
    planted = lake_dir(home) / DATASET / "_manifest.json"
    planted.write_bytes((part_dir(home, key) / "_manifest.json").read_bytes())
    record_id = parquet_ids((lake_dir(home) / manifest_of(home, key)["files"][0]["path"]).read_bytes())[0]
    chain = backup_file(home).read_bytes()
    for bad in ("..", f"{key}/..", f"../v1/{key}", f"{key}\n", "range=2-65/.."):
        status, out, stderr = run_pcbo_in_process(
            ["proof", "--dataset", DATASET, "--partition", bad, "--id", record_id], home=home
        )
        assert status == 2 and out is None and "partition key" in stderr, (bad, stderr)
        status, out, stderr = run_pcbo_in_process(
            ["rollback", "--dataset", DATASET, "--partition", bad], home=home
        )
        assert status == 2 and out is None and "partition key" in stderr, (bad, stderr)
    assert backup_file(home).read_bytes() == chain
    # The engine refuses it too, whoever calls it.
    with pytest.raises(InvalidInput, match="partition key"):
        sources = proofs.ProofSources(LakeStorage(str(lake_dir(home))), AuditBackup(home / "pas"), {})
        proofs.inclusion(sources, DATASET, "v1", "..", record_id)


# -- rollback ----------------------------------------------------------------------------------


def _rollback(home: Path, *target: str) -> dict[str, Any]:
    status, document, stderr = run_pcbo_in_process(["rollback", "--dataset", DATASET, *target], home=home)
    assert status == 0, stderr
    return document


def test_rollback_by_run_id_restores_the_previous_version_then_removes(work, home_a, home_v2):
    home = copy_home(home_v2[0], work / "home-rb-run")
    key = KEYS[CHANGED]
    v1, v2 = manifest_of(home, key, 1), manifest_of(home, key, 2)
    events_before = len(backup_events(home))

    document = _rollback(home, "--run-id", "e2e-run-002")
    assert document["status"] == "rolled_back" and document["rolledBack"] == 1
    assert [(p["key"], p["version"], p["restoredVersion"]) for p in document["partitions"]] == [(key, 2, 1)]
    assert (part_dir(home, key) / "_manifest.json").read_bytes() == (
        part_dir(home, key) / "_versions" / "v000001.json"
    ).read_bytes()
    assert not (lake_dir(home) / v2["files"][0]["path"]).exists()
    assert (lake_dir(home) / v1["files"][0]["path"]).is_file()
    events = backup_events(home)
    assert len(events) == events_before + 1
    assert events[-1]["event_type"] == "partition_rolled_back"
    assert events[-1]["partition"]["key"] == key and events[-1]["partition"]["version"] == 2
    assert events[-1]["restored_version"] == 1
    assert_clean(home)

    chain = backup_file(home).read_bytes()
    again = _rollback(home, "--run-id", "e2e-run-002")
    assert again["status"] == "noop" and again["rolledBack"] == 0
    assert backup_file(home).read_bytes() == chain

    # every partition's current version is now run 1's: rolling it back empties the lake
    document = _rollback(home, "--run-id", "e2e-run-001")
    assert document["rolledBack"] == len(KEYS)
    assert not list(lake_dir(home).rglob("_manifest.json"))
    assert not list(lake_dir(home).rglob("*.parquet"))
    events = backup_events(home)
    assert len(events) == events_before + 1 + len(KEYS)
    assert {e["event_type"] for e in events[-len(KEYS) :]} == {"partition_rolled_back"}
    document = assert_clean(home)
    assert document["checked"]["partitions"] == 0


def test_rollback_by_partition_removes_its_files(work, home_a):
    home = copy_home(home_a[0], work / "home-rb-part")
    key = KEYS[1]
    manifest = manifest_of(home, key)
    data_file = lake_dir(home) / manifest["files"][0]["path"]
    assert data_file.is_file()
    events_before = len(backup_events(home))

    document = _rollback(home, "--partition", key)
    assert document["rolledBack"] == 1
    assert document["partitions"][0]["restoredVersion"] is None
    assert not data_file.exists()
    assert not (part_dir(home, key) / "_manifest.json").exists()
    for other in KEYS:
        if other != key:
            assert (part_dir(home, other) / "_manifest.json").is_file()
    events = backup_events(home)
    assert len(events) == events_before + 1
    assert events[-1]["event_type"] == "partition_rolled_back"
    assert events[-1]["partition"]["key"] == key
    assert (
        events[-1]["undone_manifest_checksum"]
        == "sha256:"
        + hashlib.sha256((part_dir(home, key) / "_versions" / "v000001.json").read_bytes()).hexdigest()
    )
    assert_clean(home)

    chain = backup_file(home).read_bytes()
    again = _rollback(home, "--partition", key)
    assert again["status"] == "noop"
    assert backup_file(home).read_bytes() == chain


# -- tamper detection --------------------------------------------------------------------------


def _flip_parquet_byte(home: Path) -> str:
    manifest = manifest_of(home, KEYS[2])
    path = lake_dir(home) / manifest["files"][0]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return manifest["files"][0]["path"]


def _rewrite_lines(home: Path, change: Any) -> None:
    path = backup_file(home)
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"".join(line + b"\n" for line in change(lines)))


def _edit_event_field(home: Path) -> str:
    def change(lines: list[bytes]) -> list[bytes]:
        event = json.loads(lines[2])
        event["record_count"] += 1
        lines[2] = rfc8785.dumps(event)
        return lines

    _rewrite_lines(home, change)
    return CHAIN


def _delete_middle_event(home: Path) -> str:
    _rewrite_lines(home, lambda lines: lines[:3] + lines[4:])
    return CHAIN


def _delete_last_event(home: Path) -> str:
    _rewrite_lines(home, lambda lines: lines[:-1])
    return CHAIN


def _swap_events(home: Path) -> str:
    _rewrite_lines(home, lambda lines: [*lines[:1], lines[2], lines[1], *lines[3:]])
    return CHAIN


def _edit_manifest_root(home: Path) -> str:
    path = part_dir(home, KEYS[4]) / "_manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["merkleRoot"] = "sha256:" + "0" * 64
    path.write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return f"{DATASET}/{LABEL}/{KEYS[4]}/_manifest.json"


def _delete_catalog_row(home: Path) -> str:
    with sqlite3.connect(home / "catalog.db") as db:
        deleted = db.execute("DELETE FROM partitions WHERE partition_key = ?", (KEYS[5],)).rowcount
    assert deleted == 1
    return f"{CHAIN}/{KEYS[5]}"


TAMPERS = {
    "parquet_byte_flipped": (_flip_parquet_byte, "file_checksum_mismatch"),
    "event_field_edited": (_edit_event_field, "audit_chain_broken"),
    "middle_event_deleted": (_delete_middle_event, "audit_chain_broken"),
    "last_event_deleted": (_delete_last_event, "audit_catalog_mismatch"),
    "events_swapped": (_swap_events, "audit_chain_broken"),
    "manifest_root_edited": (_edit_manifest_root, "merkle_root_mismatch"),
    "catalog_row_deleted": (_delete_catalog_row, "catalog_mismatch"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_verify_detects_tampering(work, home_a, tamper):
    home = copy_home(home_a[0], work / f"home-tamper-{tamper}")
    action, kind = TAMPERS[tamper]
    where = action(home)
    status, document = verify(home)
    assert status == 1 and document["status"] == "findings"
    hits = [f for f in document["findings"] if f["kind"] == kind and f["where"] == where]
    assert hits, document["findings"]
    if tamper == "last_event_deleted":
        # the chain alone still verifies; the catalog mirror and the missing commit event say otherwise
        assert {f["kind"] for f in document["findings"]} >= {"audit_catalog_mismatch", "audit_event_missing"}
        assert not any(f["kind"] == "audit_chain_broken" for f in document["findings"])


# -- acceptance: independent recomputation of every root and every event hash ------------------


def test_independent_rfc6962_roots_and_rfc8785_event_hashes(work, request_file, home_a, home_v2):
    status, dry_run, stderr = run_pcbo_in_process(["dry-run", "--input", request_file], cwd=work)
    assert status == 0, stderr
    decided = {p["key"]: p["add"] for p in dry_run["partitions"]}

    for home, document in (home_a, home_v2):
        reported = {p["key"]: p for p in document["partitions"]}
        manifests = sorted(lake_dir(home).rglob("_manifest.json"))
        assert len(manifests) == len(KEYS)
        for manifest_path in manifests:
            manifest = json.loads(manifest_path.read_bytes())
            key = manifest["partition"]["key"]
            ids: list[str] = []
            for entry in manifest["files"]:
                data = (lake_dir(home) / entry["path"]).read_bytes()
                assert "sha256:" + hashlib.sha256(data).hexdigest() == entry["checksum"]
                table = pq.read_table(io.BytesIO(data))
                assert table.schema.field("id").type == pa.string()
                for column in ("occurredAt", "retentionExpiresAt"):
                    assert table.schema.field(column).type == pa.timestamp("us", tz="UTC")
                ids.extend(table.column("id").to_pylist())
            leaves = [i.encode("utf-8") for i in ids]
            assert leaves == sorted(set(leaves)), "rows must be sorted by id bytes, ids unique"
            root = digest(rfc6962_root(leaves))
            assert root == manifest["merkleRoot"] == reported[key]["merkleRoot"]
            if home == home_a[0]:
                assert ids == decided[key]
            elif key == KEYS[CHANGED]:
                assert ids == [*decided[key], NEW_LAST_ID]

        lines = backup_lines(home)
        assert lines
        prev = None
        for seq, line in enumerate(lines):
            event = json.loads(line)
            assert rfc8785.dumps(event) == line, "each backup line is the event's RFC 8785 bytes"
            chain = event["chain"]
            assert chain["chain_key"] == CHAIN and chain["seq"] == seq
            assert chain["prev_event_hash"] == prev
            assert chain["event_hash"] == independent_event_hash(event)
            prev = chain["event_hash"]
        committed = {e["partition"]["key"]: e for e in backup_events(home)}
        for key, event in committed.items():
            current = manifest_of(home, key)
            assert event["merkle_root"] == current["merkleRoot"]
            assert (
                event["manifest"]["checksum"]
                == "sha256:"
                + hashlib.sha256((part_dir(home, key) / "_manifest.json").read_bytes()).hexdigest()
            )
            assert reported[key]["eventHash"] == event["chain"]["event_hash"]

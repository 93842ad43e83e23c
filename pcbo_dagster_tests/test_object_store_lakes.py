"""The end-to-end commit protocol on a file:// lake, an s3:// lake (moto's S3 server) and a gs://
lake (gcp-storage-emulator), both servers on loopback (`object_store_servers.py`): execute, verify,
unchanged re-execute, tamper detection, rollback, crash and resume, `pcbo gc` of a crash's
orphans; and CSV / remote JSONL sources against the equivalent inline request.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pcbo_dagster_tests.cli_runner import run_pcbo, run_pcbo_in_process, write_request
from pcbo_dagster_tests.csv_files import csv_bytes

pytestmark = pytest.mark.slow

DATASET, LABEL = "events", "v1"
START, END, CHUNK = "2024-01-01T00:00:00Z", "2024-01-01T03:00:00Z", 3600
CHANGED = 1  # the partition the changed request adds a record to


def _records() -> list[dict[str, Any]]:
    records = []
    for i in range(24):
        minute = i * 7
        record: dict[str, Any] = {
            "id": f"rec-{i:03d}",
            "occurredAt": f"2024-01-01T{minute // 60:02d}:{minute % 60:02d}:00Z",
            "jurisdiction": ["US", "CA", "FR"][i % 3],
            "amount": i * 10 - 50,
            "note": f"n{i}",
        }
        if i % 5 != 0:
            record["consentGranted"] = i % 7 != 0
        if i % 4 != 0:
            record["retentionExpiresAt"] = "2025-01-01T00:00:00Z"
        records.append(record)
    return records


def _request(records: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "runId": "lake-run-1",
        "dataset": DATASET,
        "versionLabel": LABEL,
        "start": START,
        "end": END,
        "chunkSeconds": CHUNK,
        "policies": {"requireConsent": True, "allowedJurisdictions": ["US", "CA"]},
        **extra,
    }
    if "source" not in extra:
        request["sourceRecords"] = _records() if records is None else records
    return request


def _changed_request() -> dict[str, Any]:
    records = _records()
    records.append(
        {
            "id": "zz-late",
            "occurredAt": f"2024-01-01T0{CHANGED}:30:00Z",
            "jurisdiction": "US",
            "consentGranted": True,
            "amount": 1,
            "note": "late",
        }
    )
    return _request(records, runId="lake-run-2")


@pytest.fixture(params=["file", "s3", "gs"])
def lake(request, tmp_path, monkeypatch) -> dict[str, Any]:
    """{"url", "env", "fs"}: a fresh lake; the test process gets the store's environment too."""
    if request.param == "file":
        return {"url": (tmp_path / "lake").as_uri(), "env": {}, "kind": "file"}
    store = request.getfixturevalue("s3_store" if request.param == "s3" else "gcs_store")
    for k, v in store.env.items():
        monkeypatch.setenv(k, v)
    return {"url": store.url(), "env": dict(store.env), "kind": request.param}


def _pcbo(args: list[Any], home: Path, lake: dict[str, Any], **env: str):
    """`pcbo ARGS` on `home` and `lake`: in this process (what a command does does not depend on its
    process), but a crash at a failpoint, which ends its process: a subprocess."""
    run = run_pcbo if "PCBO_FAILPOINT" in env else run_pcbo_in_process
    return run(args, home=home, env={**lake["env"], "PCBO_LAKE_URL": lake["url"], **env})


def _storage(lake: dict[str, Any]):
    from pcbo_dagster.lake.storage import LakeStorage

    return LakeStorage(lake["url"])


def _digest(document: dict[str, Any]) -> list[tuple[str, list[str], str]]:
    return [(p["key"], [f["checksum"] for f in p["files"]], p["merkleRoot"]) for p in document["partitions"]]


def test_commit_protocol_on_each_lake(lake, tmp_path):
    req = write_request(tmp_path / "req.json", _request())
    home = tmp_path / "home"

    first = _pcbo(["execute", "--input", req], home, lake)
    assert first.status == 0, first.stderr
    assert first.document["status"] == "committed"
    assert all(
        f["uri"].startswith(lake["url"] + "/") for p in first.document["partitions"] for f in p["files"]
    )
    assert _pcbo(["verify"], home, lake).status == 0

    again = _pcbo(["execute", "--input", req], home, lake)
    assert again.status == 0, again.stderr
    assert again.document["status"] == "unchanged"
    assert _digest(again.document) == _digest(first.document)

    # tamper: flip one byte of a committed parquet object
    storage = _storage(lake)
    target = first.document["partitions"][0]
    rel = target["files"][0]["uri"][len(lake["url"]) + 1 :]
    data = bytearray(storage.read(rel))
    data[len(data) // 2] ^= 0x01
    storage.write_atomic(rel, bytes(data))
    tampered = _pcbo(["verify"], home, lake)
    assert tampered.status == 1
    assert "file_checksum_mismatch" in {f["kind"] for f in tampered.document["findings"]}

    rolled = _pcbo(["rollback", "--dataset", DATASET, "--partition", target["key"]], home, lake)
    assert rolled.status == 0, rolled.stderr
    assert rolled.document["rolledBack"] == 1
    assert not storage.exists(rel)
    clean = _pcbo(["verify"], home, lake)
    assert clean.status == 0, clean.document

    # crash after the data files, then resume: the same content as the uninterrupted run
    lake2 = {
        **lake,
        "url": lake["url"] + "-resume" if lake["kind"] != "file" else (tmp_path / "lake2").as_uri(),
    }
    home2 = tmp_path / "home2"
    crashed = _pcbo(["execute", "--input", req], home2, lake2, PCBO_FAILPOINT="after_data_files@1")
    assert crashed.status == 86, crashed.stderr
    resumed = _pcbo(["execute", "--input", req], home2, lake2)
    assert resumed.status == 0, resumed.stderr
    assert _digest(resumed.document) == _digest(first.document)
    assert resumed.document["planHash"] == first.document["planHash"]
    assert resumed.document["decisionHash"] == first.document["decisionHash"]

    # a changed request crashes before its commit point: its new files are orphans; gc removes them
    storage2 = _storage(lake2)
    before = set(storage2.list_files())
    changed = write_request(tmp_path / "changed.json", _changed_request())
    crashed = _pcbo(["execute", "--input", changed], home2, lake2, PCBO_FAILPOINT=f"before_commit@{CHANGED}")
    assert crashed.status == 86, crashed.stderr
    orphans = set(storage2.list_files()) - before
    key = resumed.document["partitions"][CHANGED]["key"]
    assert {o.rsplit("/", 1)[-1].split("-")[0] for o in orphans} >= {"part"}
    assert sorted(o.split("/")[2] for o in orphans) == [key] * 3
    assert _pcbo(["verify"], home2, lake2).status == 0  # uncommitted files are ignored

    dry = _pcbo(["gc", "--dry-run"], home2, lake2)
    assert dry.status == 0, dry.stderr
    assert {r["path"] for r in dry.document["removed"]} == orphans
    assert set(storage2.list_files()) == before | orphans
    gc = _pcbo(["gc"], home2, lake2)
    assert gc.status == 0, gc.stderr
    assert {r["path"] for r in gc.document["removed"]} == orphans
    assert set(storage2.list_files()) == before
    assert _pcbo(["gc"], home2, lake2).document["removed"] == []
    assert _pcbo(["verify"], home2, lake2).status == 0

    # the changed request now commits a version 2 of that partition; gc keeps version 1 (restorable)
    done = _pcbo(["execute", "--input", changed], home2, lake2)
    assert done.status == 0, done.stderr
    assert _pcbo(["gc"], home2, lake2).document["removed"] == []
    back = _pcbo(["rollback", "--dataset", DATASET, "--run-id", "lake-run-2"], home2, lake2)
    assert back.status == 0 and back.document["rolledBack"] == 1, back.stderr
    assert _pcbo(["verify"], home2, lake2).status == 0


def _csv_bytes(records: list[dict[str, Any]]) -> bytes:
    columns = ["id", "occurredAt", "jurisdiction", "consentGranted", "retentionExpiresAt", "amount", "note"]
    return csv_bytes(records, columns)


def _hashes(req: Path, env: dict[str, str]) -> tuple[str, str]:
    res = run_pcbo_in_process(["dry-run", "--input", req], env=env, cwd=req.parent)
    assert res.status == 0, res.stderr
    return res.document["planHash"], res.document["decisionHash"]


def test_csv_and_remote_sources_match_inline(tmp_path, s3_store, monkeypatch):
    for k, v in s3_store.env.items():
        monkeypatch.setenv(k, v)
    inline = _hashes(write_request(tmp_path / "inline.json", _request()), {})

    (tmp_path / "records.csv").write_bytes(_csv_bytes(_records()))
    local_csv = write_request(tmp_path / "csv.json", _request(source={"uri": "records.csv"}))
    assert _hashes(local_csv, {}) == inline

    fs = s3_store.filesystem()
    prefix = f"{s3_store.bucket}/sources-{uuid.uuid4().hex}"
    jsonl = "".join(json.dumps(r) + "\n" for r in _records()).encode()
    fs.pipe_file(f"{prefix}/records.jsonl", jsonl)
    fs.pipe_file(f"{prefix}/records.csv", _csv_bytes(_records()))
    for name in ("records.jsonl", "records.csv"):
        req = write_request(tmp_path / f"s3-{name}.json", _request(source={"uri": f"s3://{prefix}/{name}"}))
        assert _hashes(req, s3_store.env) == inline, name

    missing = write_request(tmp_path / "missing.json", _request(source={"uri": f"s3://{prefix}/nope.csv"}))
    res = run_pcbo_in_process(["dry-run", "--input", missing], env=s3_store.env, cwd=tmp_path)
    assert res.status == 2 and "source.uri" in res.stderr


def test_an_iceberg_table_is_published_and_read_on_each_lake(lake, tmp_path):
    """The table's metadata, manifest lists and manifests are written where the lake is, reached as
    the lake is (`PCBO_S3_ENDPOINT_URL`, the GCS emulator's settings): never the public cloud's
    endpoint. Its rows are the commit points' rows after an execute, a re-version and a rollback."""
    table = {"format": "iceberg", "name": "lake.events"}
    req = write_request(tmp_path / "req.json", _request(table=table))
    changed = write_request(tmp_path / "changed.json", {**_changed_request(), "table": table})
    home = tmp_path / "home"

    def rows() -> list[str]:
        res = _pcbo(["query", "--dataset", DATASET, "SELECT id FROM lake.events ORDER BY id"], home, lake)
        assert res.status == 0, res.stderr
        return [r[0] for r in res.document["rows"]]

    def committed() -> list[str]:
        res = _pcbo(["verify"], home, lake)
        assert res.status == 0, (res.stderr, res.document)
        storage = _storage(lake)
        ids: list[str] = []
        for rel in storage.find("_manifest.json", f"{DATASET}/{LABEL}"):
            for entry in json.loads(storage.read(rel))["files"]:
                ids += pq.read_table(io.BytesIO(storage.read(entry["path"]))).column("id").to_pylist()
        return sorted(ids)

    first = _pcbo(["execute", "--input", req], home, lake)
    assert first.status == 0, first.stderr
    assert first.document["table"]["status"] == "published"
    published = rows()
    assert published == committed() and len(published) == first.document["totals"]["add"]
    storage = _storage(lake)
    assert storage.list_files("_iceberg/lake/events/metadata")

    second = _pcbo(["execute", "--input", changed], home, lake)
    assert second.status == 0, second.stderr
    published = rows()
    assert "zz-late" in published and published == committed()

    back = _pcbo(["rollback", "--dataset", DATASET, "--run-id", "lake-run-2"], home, lake)
    assert back.status == 0, back.stderr
    assert back.document["table"]["status"] == "published"
    published = rows()
    assert "zz-late" not in published and published == committed()


def test_gc_skips_a_partition_with_a_directory_marker_at_a_manifest_name(tmp_path, s3_store, monkeypatch):
    """(red-team finding) An object store lists a key ending in `/` (a "directory marker" anyone who
    may write the lake can put) as the name before it, where no object is: a marker at
    `_versions/v000000.json/` made gc read a version manifest that is not there, and the whole gc died
    (exit 1, `The specified key does not exist.`), nothing of the lake collected. Now that partition
    is skipped as unreadable, and gc collects the others."""
    for k, v in s3_store.env.items():
        monkeypatch.setenv(k, v)
    lake = {"url": s3_store.url(), "env": dict(s3_store.env), "kind": "s3"}
    home = tmp_path / "home"
    request = write_request(tmp_path / "req.json", _request())
    assert _pcbo(["execute", "--input", request], home, lake).status == 0
    storage = _storage(lake)
    first, second = (f"{DATASET}/{LABEL}/20240101T0{h}0000Z" for h in (0, 1))
    storage.fs.pipe(f"{storage.root}/{first}/_versions/v000000.json/", b"")
    storage.write(f"{second}/.tmp-crash-leftover", b"a rename that never happened")
    gc = _pcbo(["gc"], home, lake)
    assert gc.status == 0, gc.stderr
    assert [r["path"] for r in gc.document["removed"]] == [f"{second}/.tmp-crash-leftover"]
    assert gc.document["skipped"] == [
        {"where": first, "reason": f"version manifest {first}/_versions/v000000.json is unreadable"}
    ]
    assert _pcbo(["verify"], home, lake).status == 0

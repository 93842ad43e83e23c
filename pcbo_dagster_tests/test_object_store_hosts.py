"""A lake and an audit backup on an object store that several hosts (processes) share: what one host
sees must be the store as it is now, never a listing it took earlier (moto's S3 server and
gcp-storage-emulator on loopback, `object_store_servers.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import pytest
import sqlalchemy

from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.core.signed_note import new_signing_key
from pcbo_dagster.engine import partition_checks
from pcbo_dagster.engine.proofs import verify_proof
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.lake.storage import LakeStorage
from pcbo_dagster_tests.cli_runner import run_pcbo, run_pcbo_in_process, write_request
from pcbo_dagster_tests.http_server import running_server
from pcbo_dagster_tests.loopback import free_port
from pcbo_dagster_tests.object_store_servers import ObjectStore
from pcbo_dagster_tests.test_object_store_lakes import _request

PARTITION = "events/v1/20240101T000000Z"


@pytest.fixture(params=["s3", "gs"])
def store(request, monkeypatch) -> ObjectStore:
    found: ObjectStore = request.getfixturevalue("s3_store" if request.param == "s3" else "gcs_store")
    for name, value in found.env.items():
        monkeypatch.setenv(name, value)
    return found


def _other_host(url: str, code: str) -> None:
    """Run `code` with `lake = LakeStorage(url)` in another process: another host of the lake."""
    program = f"from pcbo_dagster.lake.storage import LakeStorage\nlake = LakeStorage({url!r})\n{code}\n"
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120)


def test_a_long_lived_process_sees_what_another_host_wrote_after_it_listed_the_lake(store):
    """A `pcbo serve`, Dagster or Celery worker process keeps its file system object (fsspec caches
    it) and, with it, every directory listing it took. A commit point another host wrote after that
    listing was invisible: `read_if_exists` said there was none (s3fs sizes a file from the cached
    listing before reading it), `size` and `exists` too, and `delete` (a rollback's removal of a
    commit point) removed nothing, though the caller went on as if it had."""
    url = store.url()
    lake = LakeStorage(url)
    lake.write(f"{PARTITION}/_versions/v000001.json", b"{}")
    assert lake.list_files() == [f"{PARTITION}/_versions/v000001.json"]  # this host lists the lake
    manifest = f"{PARTITION}/_manifest.json"
    _other_host(url, f"lake.write_atomic({manifest!r}, b'committed by another host')")

    assert lake.read_if_exists(manifest) == b"committed by another host"
    assert lake.size(manifest) == len(b"committed by another host")
    assert lake.exists(manifest)
    lake.delete(manifest)
    assert LakeStorage(url).read_if_exists(manifest) is None
    assert manifest not in LakeStorage(url).list_files()

    # and the other way round: what another host removed is gone for this one too
    assert lake.list_files() == [f"{PARTITION}/_versions/v000001.json"]
    _other_host(url, f"lake.delete({PARTITION + '/_versions/v000001.json'!r})")
    assert not lake.exists(f"{PARTITION}/_versions/v000001.json")
    assert lake.size(f"{PARTITION}/_versions/v000001.json") is None


@pytest.mark.postgres
def test_pcbo_serve_reads_the_audit_backup_every_host_shares(
    tmp_path, s3_store, fresh_postgres_url, monkeypatch
):
    """With `PCBO_AUDIT_DIR=s3://…` the durable chain is on the store and `audit_dir` is only this
    host's cache of it. `pcbo serve` opened that cache directory as if it were a local backup: every
    proof failed (500, "chain has 0 events but the expected head is seq 3"), the reconciliation
    reported a clean dataset as a discrepancy, and the services list probed the cache directory, not
    the store."""
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    store_url = s3_store.url()
    env = {
        **s3_store.env,
        "PCBO_LAKE_URL": s3_store.url(),
        "PCBO_AUDIT_DIR": store_url,
        "PCBO_CATALOG_URL": fresh_postgres_url,
    }
    request = write_request(tmp_path / "req.json", _request())
    done = run_pcbo_in_process(["execute", "--input", request], home=tmp_path / "cli-host", env=env)
    assert done.status == 0, done.stderr
    added = done.document["partitions"][0]
    record_id = "rec-001"  # consent, US, 00:07: added by the first partition

    settings = Settings.resolve(home=str(tmp_path / "server-host"), env=env)
    with running_server(tmp_path / "server-host", engine=settings) as server:
        client = server.client(server.token("ops", "admin"))
        answer = client.get(f"/v1/datasets/events/partitions/{added['key']}/proof", params={"id": record_id})
        assert answer.status_code == 200, answer.text
        assert verify_proof(answer.json())["valid"]
        assert answer.json()["merkleRoot"] == added["merkleRoot"]
        reports = server.app.state.reconciler.poll()
        assert [(r["service"], r["status"]) for r in reports] == [("events", "verified")], reports
        services = {s["id"]: s for s in client.get("/services/registered").json()["data"]}
        assert services["audit-backup"]["health"] == "up"
        assert services["audit-backup"]["url"] == store_url


# -- object names no local path can have ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "events/v1/_checkpoints/./000000000003.checkpoint",
        "events/v1/_checkpoints//000000000003.checkpoint",
        "events/v1/_checkpoints/x/../000000000003.checkpoint",
    ],
)
def test_a_checkpoint_object_with_dot_segments_is_a_finding_not_the_end_of_verify(
    tmp_path, s3_store, monkeypatch, name
):
    """An object store keeps `./`, `//` and `..` in a key as plain characters (a local path cannot
    have them). One such object under a dataset's `_checkpoints/` made `pcbo verify` stop with one
    line ("... leads outside the lake or through a symbolic link") and no findings document: someone
    who can write the lake could blind verify to everything else they had forged."""
    for variable, value in s3_store.env.items():
        monkeypatch.setenv(variable, value)
    url = s3_store.url()
    env = {**s3_store.env, "PCBO_LAKE_URL": url}
    home = tmp_path / "home"
    request = write_request(tmp_path / "req.json", _request())
    assert run_pcbo_in_process(["execute", "--input", request], home=home, env=env).status == 0
    fs: Any = s3_store.filesystem()
    lake_path = url.split("://", 1)[1]
    fs.pipe_file(f"{lake_path}/{name}", b"junk")
    committed = f"{lake_path}/events/v1/20240101T010000Z/_manifest.json"
    fs.pipe_file(committed, fs.cat_file(committed) + b" ")  # and something else forged besides

    verified = run_pcbo_in_process(["verify"], home=home, env=env)
    assert verified.status == 1, verified.stderr
    assert verified.document is not None, verified.stderr
    found = {(f["kind"], f["where"]) for f in verified.document["findings"]}
    assert ("path_outside_lake", name) in found
    assert ("commit_point_not_on_chain", "events/v1/20240101T010000Z") in found


@pytest.mark.parametrize(
    "planted",
    [
        f"{PARTITION}/./_manifest.json",  # five names: split_manifest_path raised ValueError
        "events/v1/../_manifest.json",  # "key" `..`: a later read of it raised OutsidePartition
        f"{PARTITION}//_manifest.json",
    ],
)
def test_a_commit_point_object_with_dot_segments_names_no_partition(s3_store, monkeypatch, planted):
    """`committed_keys` (the Dagster asset checks, the drift sensor, the instance report) took every
    object called `_manifest.json` below the dataset version for a partition's commit point. An object
    store object at `…/./_manifest.json` made it raise ValueError (too many names to unpack), and one
    at `events/v1/../_manifest.json` gave the key `..`, which every later read refuses: the checks and
    the sensor failed with an internal error. Neither is any partition's commit point. (S3 only:
    gcp-storage-emulator, unlike GCS, normalises such names or fails on them.)"""
    for variable, value in s3_store.env.items():
        monkeypatch.setenv(variable, value)
    store = s3_store
    lake = LakeStorage(store.url())
    lake.write_atomic(f"{PARTITION}/_manifest.json", b"{}")
    lake.write_atomic("events/v1/20240101T010000Z/_manifest.json", b"{}")
    fs: Any = store.filesystem()
    fs.pipe_file(f"{lake.root}/{planted}", b"{}")
    assert planted in lake.find("_manifest.json")  # the store keeps the name as it is

    # (The `coverage` check compares these keys with the chain's committed partitions since
    # 2026-12-08: test_dagster_sensor_attacks.py.)
    assert partition_checks.committed_keys(lake, "events", "v1") == ["20240101T000000Z", "20240101T010000Z"]


# -- a lake or audit store URL with a query string ---------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("name", "suffix"),
    [
        ("PCBO_LAKE_URL", "?X-Amz-Security-Token=TokenInTheUrl"),
        ("--lake", "#TokenInTheUrl"),
        ("PCBO_AUDIT_DIR", "?X-Amz-Security-Token=TokenInTheUrl"),
        ("--audit-dir", "?versionId=TokenInTheUrl"),
    ],
)
def test_a_lake_or_audit_store_url_with_a_query_is_invalid_input(
    tmp_path, s3_store, fresh_postgres_url, monkeypatch, name, suffix
):
    """An object store has no query string: s3fs and gcsfs keep `?…` and `#…` in the object's key
    (or read them as a version: `?versionId=`, `#generation`). A lake URL carrying a session token
    (`s3://bucket/lake?X-Amz-Security-Token=…`) was accepted: every object the run wrote had the token
    in its key, for anyone who can list the bucket to read, while every output showed the URL redacted
    (`s3://bucket/lake?[redacted]/…`), naming objects that do not exist. Now exit 2 naming the flag or
    variable, the URL redacted, nothing written."""
    for variable, value in s3_store.env.items():
        monkeypatch.setenv(variable, value)
    prefix = f"q-{uuid.uuid4().hex[:8]}"
    url = f"s3://{s3_store.bucket}/{prefix}{suffix}"
    home = tmp_path / "home"
    request = write_request(tmp_path / "req.json", _request())
    env = {**s3_store.env, "PCBO_CATALOG_URL": fresh_postgres_url}
    args: list[Any] = ["execute", "--input", request]
    if name.startswith("--"):
        args += [name, url]
    else:
        env[name] = url
    run = run_pcbo(args, home=home, env=env)
    assert run.status == 2, (run.status, run.stderr)
    assert run.stderr.startswith(f"pcbo execute: invalid input: {name}: "), run.stderr
    assert f"s3://{s3_store.bucket}/{prefix}?[redacted]" in run.stderr
    assert "TokenInTheUrl" not in run.stderr and "Traceback" not in run.stderr
    assert not home.exists()
    fs: Any = s3_store.filesystem()
    fs.invalidate_cache()
    assert [p for p in fs.find(s3_store.bucket) if f"/{prefix}" in p] == []


@pytest.mark.parametrize(
    "suffix",
    [
        "usr1:EvidenceSecretPw@",
        "?X-Amz-Security-Token=EvidenceSecretPw",
    ],
)
def test_evidence_verify_refuses_a_lake_url_with_credentials(tmp_path, s3_store, monkeypatch, suffix):
    """`pcbo evidence verify --lake URL` opened the lake as given, where every other lake or audit
    store flag refuses credentials, a query string or a fragment in its URL (exit 2 naming the flag):
    with a userinfo botocore refused the bucket name (exit 1), with a token in a query string every
    subject was "missing from the lake" and a genuine package "not valid" (exit 1)."""
    for variable, value in s3_store.env.items():
        monkeypatch.setenv(variable, value)
    key = new_signing_key("ops.example/operator")
    key_file = tmp_path / "operator.key"
    key_file.write_text(key.text + "\n")
    key_file.chmod(0o600)
    prefix = f"ev-{uuid.uuid4().hex[:8]}"
    env = {**s3_store.env, "PCBO_LAKE_URL": f"s3://{s3_store.bucket}/{prefix}"}
    home = tmp_path / "home"
    request = write_request(tmp_path / "req.json", _request())
    assert (
        run_pcbo_in_process(
            ["execute", "--input", request, "--signing-key", key_file], home=home, env=env
        ).status
        == 0
    )
    exported = run_pcbo_in_process(
        ["evidence", "export", "--run", "lake-run-1", "--signing-key", key_file], home=home, env=env
    )
    assert exported.status == 0, exported.stderr
    package = tmp_path / "package.json"
    package.write_text(json.dumps(exported.document))
    verifier = key.verifier().text
    plain = run_pcbo_in_process(
        ["evidence", "verify", package, "--key", verifier, "--lake", env["PCBO_LAKE_URL"]], env=s3_store.env
    )
    assert plain.status == 0, plain.stderr  # the lake as it should be given

    if suffix.endswith("@"):
        url = f"s3://{suffix}{s3_store.bucket}/{prefix}"
    else:
        url = f"s3://{s3_store.bucket}/{prefix}{suffix}"
    run = run_pcbo(["evidence", "verify", package, "--key", verifier, "--lake", url], env=s3_store.env)
    assert run.status == 2, (run.status, run.stderr)
    assert run.stderr.startswith("pcbo evidence verify: invalid input: --lake: "), run.stderr
    assert "EvidenceSecretPw" not in run.stderr and "usr1" not in run.stderr


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("PCBO_LAKE_URL", "s3://"),  # `s3://${LAKE_BUCKET}` with the variable unset
        ("--lake", "gs:///"),
        ("PCBO_AUDIT_DIR", "s3://"),
        ("PCBO_LAKE_URL", "s3:///lake"),
        ("PCBO_LAKE_URL", "S3://bucket/lake"),  # fsspec knows no `S3`: an internal error, after the catalog
        ("--audit-dir", "ftp://host/pas"),
    ],
)
def test_a_store_url_without_a_bucket_or_of_an_unknown_scheme_is_invalid_input(
    tmp_path, s3_store, fresh_postgres_url, name, url
):
    """`s3://` or `gs://` with no bucket (a templated URL whose variable is empty) lost its slashes
    (`s3:`) and became a *local* directory `./s3:` in the working directory — though it passes for an
    object store, so `PCBO_MULTI_HOST` let each host write its own lake or audit backup there; a
    scheme fsspec does not know (`S3://`, `ftp://`) was an internal error (exit 1) after the catalog
    was made. Now exit 2 naming the flag or variable, nothing written."""
    env = {
        **s3_store.env,
        "PCBO_MULTI_HOST": "true",
        "PCBO_CATALOG_URL": fresh_postgres_url,
        "PCBO_LAKE_URL": s3_store.url(),
        "PCBO_AUDIT_DIR": s3_store.url(),
    }
    work = tmp_path / "work"
    work.mkdir()
    request = write_request(tmp_path / "req.json", _request())
    args: list[Any] = ["execute", "--input", request]
    if name.startswith("--"):
        args += [name, url]
    else:
        env[name] = url
    home = work / "home"
    run = run_pcbo(args, home=home, env=env, cwd=work)
    assert run.status == 2, (run.status, run.stderr)
    assert run.stderr.startswith(f"pcbo execute: invalid input: {name}: "), run.stderr
    assert "Traceback" not in run.stderr
    assert list(work.iterdir()) == []  # no home, no `s3:` directory
    catalog = CatalogStore(fresh_postgres_url)
    assert sqlalchemy.inspect(catalog.engine).get_table_names() == []  # not even migrated
    catalog.close()


@pytest.mark.slow
def test_a_gcs_lake_that_does_not_answer_is_one_line_on_stderr(tmp_path):
    """gcsfs logs each request that ran out of retries with its traceback (and warnings) through
    Python's last-resort handler, i.e. on stderr: `pcbo verify` against a GCS lake that does not
    answer printed some fifty lines and two tracebacks before its one line. Now that line alone
    (`PCBO_DEBUG=1` shows the traceback)."""
    home = tmp_path / "home"
    request = write_request(tmp_path / "req.json", _request())
    assert run_pcbo_in_process(["execute", "--input", request], home=home).status == 0  # a catalog, a chain
    env = {
        "PCBO_LAKE_URL": "gs://pcbo-test-lake/lake",
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "pcbo-test",
    }
    run = run_pcbo(["verify"], home=home, env=env, timeout=300)
    assert run.status == 1, run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("pcbo verify: "), run.stderr
    assert "Traceback" not in run.stderr

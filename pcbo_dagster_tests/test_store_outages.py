"""An object store that fails reads is *unavailable*, never tampered with: moto's S3 server on loopback
behind `FaultyProxy`, which answers 503 or 403 for the objects a test names (or the store's endpoint
pointed at a closed port), while the catalog (PostgreSQL) answers.

A failed read of an event object was taken for an object that "is not a JSON document": `verify`
reported `audit_backup_unreadable`, then `audit_catalog_mismatch` and `commit_point_not_on_chain` for
every partition (a forged history, paged as such) when the store was only down. Now every read that
fails is `StoreUnavailable`: one line naming the store, the object and the failure, exit 1 (as any
store that went away), no findings document, nothing repaired or written.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster_tests.cli_runner import load_generator, run_pcbo, run_pcbo_in_process, write_request
from pcbo_dagster_tests.faulty_proxy import FaultyProxy
from pcbo_dagster_tests.loopback import free_port

pytestmark = pytest.mark.postgres


@pytest.fixture
def proxy(s3_store, monkeypatch) -> Any:
    for name, value in s3_store.env.items():  # this process reads the store directly (moto, no proxy)
        monkeypatch.setenv(name, value)
    found = FaultyProxy(s3_store.env["PCBO_S3_ENDPOINT_URL"])
    yield found
    found.close()


def _setup(
    tmp_path: Path, s3_store: Any, proxy: FaultyProxy, catalog_url: str
) -> tuple[dict[str, str], str, str]:
    pas, lake = f"pas-{uuid.uuid4().hex[:8]}", f"lake-{uuid.uuid4().hex[:8]}"
    env = {
        **s3_store.env,
        "PCBO_S3_ENDPOINT_URL": proxy.url,
        "PCBO_LAKE_URL": s3_store.url(lake),
        "PCBO_CATALOG_URL": catalog_url,
        "PCBO_AUDIT_DIR": s3_store.url(pas),
        "PCBO_MULTI_HOST": "true",
        # botocore retries a 503 or a refused connection once (two attempts), not four times with its
        # back-off (up to 15 s a request): a read still fails after the client's retries
        "AWS_MAX_ATTEMPTS": "2",
    }
    request = load_generator().make_request(records=30, partitions=3, seed=5, run_id="outage-1")
    # the store's initial contents (in this process: nothing here is about a process)
    run = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r.json", request)], home=tmp_path / "a", env=env
    )
    assert run.status == 0, run.stderr
    return env, pas, lake


def _objects(s3_store: Any, prefix: str) -> dict[str, bytes]:
    fs: Any = s3_store.filesystem()
    return {p: fs.cat_file(p) for p in fs.find(f"{s3_store.bucket}/{prefix}")}


def _assert_unavailable(run: Any, store: str, what: str, failure: str) -> None:
    assert run.status == 1, (run.status, run.stderr, run.document)
    assert run.document is None, run.document  # no findings: nothing was concluded
    assert "store unavailable:" in run.stderr and store in run.stderr, run.stderr
    assert what in run.stderr and failure in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "not valid" not in run.stderr


@pytest.mark.parametrize(("mode", "failure"), [("503", "Service Unavailable"), ("403", "Access Denied")])
def test_event_objects_that_cannot_be_read_are_an_unavailable_store_not_a_forged_chain(
    tmp_path, s3_store, proxy, fresh_postgres_url, mode, failure
):
    env, pas, lake = _setup(tmp_path, s3_store, proxy, fresh_postgres_url)
    before = _objects(s3_store, pas), _objects(s3_store, lake)
    events = lambda method, path: method == "GET" and f"/{pas}/events/v1/0" in path  # noqa: E731
    proxy.fail(events, mode)
    for args in (["verify"], ["verify", "--repair"]):
        run = run_pcbo(args, home=tmp_path / "b", env=env)
        _assert_unavailable(run, f"s3://{s3_store.bucket}/{pas}", "events/v1/0000000000", failure)
    # A run on a host with no cache of the chain stops as well: it never calls the chain corrupt.
    changed = load_generator().make_request(records=31, partitions=3, seed=6, run_id="outage-2")
    run = run_pcbo(
        ["execute", "--input", write_request(tmp_path / "c.json", changed)], home=tmp_path / "c", env=env
    )
    _assert_unavailable(run, f"s3://{s3_store.bucket}/{pas}", "events/v1/0000000000", failure)
    assert proxy.failed
    proxy.heal()
    assert (_objects(s3_store, pas), _objects(s3_store, lake)) == before  # nothing written
    run = run_pcbo_in_process(["verify"], home=tmp_path / "b", env=env)
    assert run.status == 0 and run.document["status"] == "clean", (run.stderr, run.document)


@pytest.mark.parametrize(
    ("what", "rule"),
    [
        ("its listing", lambda pas, lake: lambda m, p: m == "GET" and f"prefix={pas}" in p),
        ("_manifest.json", lambda pas, lake: lambda m, p: f"/{lake}/" in p and "_manifest.json" in p),
        ("the listing of", lambda pas, lake: lambda m, p: m == "GET" and f"prefix={lake}" in p),
    ],
)
def test_a_listing_or_a_commit_point_that_cannot_be_read_names_its_store(
    tmp_path, s3_store, proxy, fresh_postgres_url, what, rule
):
    env, pas, lake = _setup(tmp_path, s3_store, proxy, fresh_postgres_url)
    proxy.fail(rule(pas, lake), "403")
    run = run_pcbo(["verify"], home=tmp_path / "b", env=env)
    store = f"s3://{s3_store.bucket}/{pas if 'prefix=' + pas in proxy.failed[0][1] else lake}"
    _assert_unavailable(run, store, what, "")


def test_a_store_that_refuses_connections_is_unavailable(tmp_path, s3_store, proxy, fresh_postgres_url):
    env, pas, _ = _setup(tmp_path, s3_store, proxy, fresh_postgres_url)
    closed = {**env, "PCBO_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    run = run_pcbo(["verify"], home=tmp_path / "b", env=closed)
    _assert_unavailable(run, f"s3://{s3_store.bucket}/", "", "EndpointConnectionError")


def test_a_gcs_audit_store_that_refuses_reads_is_unavailable(tmp_path, gcs_store, fresh_postgres_url):
    """The same on GCS (the emulator behind the proxy): gcsfs's 403 for every event object."""
    proxy = FaultyProxy(gcs_store.env["STORAGE_EMULATOR_HOST"])
    try:
        pas = f"pas-{uuid.uuid4().hex[:8]}"
        env = {
            **gcs_store.env,
            "STORAGE_EMULATOR_HOST": proxy.url,
            "PCBO_LAKE_URL": gcs_store.url(f"lake-{uuid.uuid4().hex[:8]}"),
            "PCBO_CATALOG_URL": fresh_postgres_url,
            "PCBO_AUDIT_DIR": gcs_store.url(pas),
            "PCBO_MULTI_HOST": "true",
        }
        request = load_generator().make_request(records=30, partitions=3, seed=5, run_id="outage-gcs")
        path = write_request(tmp_path / "r.json", request)
        run = run_pcbo_in_process(["execute", "--input", path], home=tmp_path / "a", env=env)
        assert run.status == 0, run.stderr
        proxy.fail(lambda method, p: method == "GET" and "alt=media" in p and f"{pas}%2F" in p, "403")
        run = run_pcbo(["verify"], home=tmp_path / "b", env=env)
        _assert_unavailable(run, f"gs://{gcs_store.bucket}/{pas}", "events/v1/0000000000", "Forbidden")
    finally:
        proxy.close()

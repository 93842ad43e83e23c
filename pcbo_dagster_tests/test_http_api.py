"""The HTTP API against a real uvicorn server on loopback, through a real HTTP client (httpx).

One server per module (its own PCBO_HOME) for the read-mostly tests; tests that need their own state
start their own. The CLI runs remote (`--server`, a real HTTP client of the server) and local, in
this process (`cli_runner.run_pcbo_in_process`: `cli.main`, its exit status, stdout and stderr); one
remote refusal runs as a real `pcbo` subprocess, for the exit status a script sees.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from pcbo_dagster.catalog import schema as t  # noqa: E402
from pcbo_dagster.core.request_model import MAX_JSON_DEPTH  # noqa: E402
from pcbo_dagster.engine.proofs import verify_proof  # noqa: E402
from pcbo_dagster_tests.cli_runner import run_pcbo, run_pcbo_in_process  # noqa: E402
from pcbo_dagster_tests.http_server import DEMO_REQUEST, lake_files, running_server  # noqa: E402
from pcbo_dagster_tests.pcbo_fork_runner import run_pcbo_forked  # noqa: E402

DEMO = json.loads(DEMO_REQUEST.read_text())


def _request(**changes: Any) -> bytes:
    return json.dumps({**DEMO, **changes}).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("http-api") / "home"
    with running_server(home, reconcile_seconds=0.2, heartbeat_seconds=0.5) as running:
        yield running


@pytest.fixture(scope="module")
def admin(server):
    return server.client(server.token("admin-user", "admin"))


@pytest.fixture(scope="module")
def executed(server, admin):
    """The demo request executed once through the API (synchronously)."""
    answer = admin.post("/v1/execute", content=DEMO_REQUEST.read_bytes())
    assert answer.status_code == 200, answer.text
    return answer.json()


def _wait(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


# -- plan, dry-run, execute: the same documents as the CLI ---------------------------------------


def test_plan_dry_run_execute_give_the_cli_documents_and_lake_bytes(tmp_path, server, admin, executed):
    local_home = tmp_path / "local"
    for command in ("plan", "dry-run"):
        local = run_pcbo_in_process([command, "--input", DEMO_REQUEST], home=local_home)
        assert local.status == 0, local.stderr
        remote = admin.post(f"/v1/{command}", content=DEMO_REQUEST.read_bytes())
        assert remote.status_code == 200
        assert remote.headers["content-type"].startswith("application/json")
        assert remote.json() == local.document
    local = run_pcbo_in_process(["execute", "--input", DEMO_REQUEST], home=local_home)
    assert local.status == 0, local.stderr
    for key in ("status", "planHash", "decisionHash", "totals", "reconciliation"):
        assert executed[key] == local.document[key], key
    strip = [
        {k: v for k, v in p.items() if k not in ("files", "manifest", "rollbackManifest", "eventHash")}
        for p in executed["partitions"]
    ]
    assert strip == [
        {k: v for k, v in p.items() if k not in ("files", "manifest", "rollbackManifest", "eventHash")}
        for p in local.document["partitions"]
    ]
    assert [[(f["checksum"], f["byteSize"]) for f in p["files"]] for p in executed["partitions"]] == [
        [(f["checksum"], f["byteSize"]) for f in p["files"]] for p in local.document["partitions"]
    ]
    assert lake_files(server.home) == lake_files(local_home)


def test_the_token_subject_is_the_actor_of_the_audit_events(server, executed):
    events = server.catalog.audit_events("demo-events/v1")
    kinds = {e["event_type"] for e in events}
    assert {"partition_commit_intent", "partition_committed"} <= kinds
    assert {e.get("actor") for e in events} == {"admin-user"}


def test_invalid_input_is_422_naming_the_field_and_a_gate_is_409(server, admin):
    bad = admin.post("/v1/plan", content=_request(chunkSecs=60))
    assert bad.status_code == 422
    assert bad.json()["error"] == "invalid_input" and bad.json()["field"] == "chunkSecs"
    bad = admin.post("/v1/execute", content=_request(start="2024-01-01T00:00:00"))
    assert bad.status_code == 422 and bad.json()["field"] == "start"
    bad = admin.post("/v1/dry-run", content=b'{"runId": "a", "runId": "b"}')
    assert bad.status_code == 422 and "duplicate" in bad.json()["message"]
    # A SQL target would let a token write any database the server reaches: refused, nothing run.
    target = {"kind": "sql", "url": "sqlite:////tmp/elsewhere.db", "table": "t", "key": ["id"]}
    bad = admin.post("/v1/execute", content=_request(runId="sql", target=target, table=None))
    assert bad.status_code == 422 and bad.json()["field"] == "target"
    assert server.catalog.get_run("sql") is None and not Path("/tmp/elsewhere.db").exists()
    blocked = admin.post(
        "/v1/execute", content=_request(runId="gated", expectedDecisionHash="sha256:" + "0" * 64)
    )
    assert blocked.status_code == 409
    assert blocked.json()["gate"] == "expectedDecisionHash" and blocked.json()["status"] == "blocked"
    assert "does not match" in blocked.headers["Pcbo-Message"]
    policies = {**DEMO["policies"], "onViolation": "block"}
    blocked = admin.post("/v1/execute", content=_request(runId="gated2", policies=policies))
    assert blocked.status_code == 409 and blocked.json()["breaches"]
    assert server.catalog.get_run("gated") is None and server.catalog.get_run("gated2") is None


def test_metadata_nested_to_the_bound_is_served_and_one_level_more_is_422(server, admin):
    """The request nests at most `MAX_JSON_DEPTH` levels (the request, `metadata`, then arrays)."""

    def nested(run_id: str, depth: int) -> bytes:
        deep = "[" * (depth - 2) + "]" * (depth - 2)
        return _request(runId=run_id, metadata={"x": "DEEP"}).replace(b'"DEEP"', deep.encode())

    for depth in (500, MAX_JSON_DEPTH):
        answer = admin.post("/v1/plan", content=nested(f"deep-{depth}", depth))
        assert answer.status_code == 200, answer.text
    for depth in (MAX_JSON_DEPTH + 1, 100_000):
        answer = admin.post("/v1/plan", content=nested(f"deep-{depth}", depth))
        assert answer.status_code == 422, answer.text
        assert answer.json()["field"] == "request" and "nest at most" in answer.json()["message"]


def test_a_source_uri_with_credentials_is_422_shown_without_them(server, admin):
    source = {"uri": "s3://AKIAEXAMPLE:SuperSecretPw1@bucket/records.jsonl", "format": "jsonl"}
    for endpoint in ("/v1/plan", "/v1/dry-run", "/v1/execute"):
        answer = admin.post(endpoint, content=_request(runId="creds", sourceRecords=None, source=source))
        assert answer.status_code == 422, answer.text
        assert answer.json()["field"] == "source.uri"
        assert answer.json()["message"].startswith("s3://bucket/records.jsonl: credentials in a URL")
        assert "SuperSecretPw1" not in answer.text and "AKIA" not in answer.text
    assert server.catalog.get_run("creds") is None


def test_an_s3_source_the_client_refuses_is_422_and_a_store_error_is_500_failed(server, admin, monkeypatch):
    """botocore's own errors are no OSError: a source it cannot read is still invalid input on
    `source.uri`, and a store that fails is the one-line 500 `failed`, not an internal error."""
    pytest.importorskip("s3fs")
    from botocore.exceptions import EndpointConnectionError

    from pcbo_dagster.server.errors import engine_error_response

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    source = {"uri": "s3://bad_bucket!/records.jsonl", "format": "jsonl"}
    answer = admin.post("/v1/plan", content=_request(runId="bad-bucket", sourceRecords=None, source=source))
    assert answer.status_code == 422, answer.text
    assert answer.json() == {
        "error": "invalid_input",
        "message": "cannot be read: ParamValidationError",
        "field": "source.uri",
    }
    response = engine_error_response(
        EndpointConnectionError(endpoint_url="http://usr1:StorePw@127.0.0.1:1/b")
    )
    assert response.status_code == 500
    assert json.loads(bytes(response.body)) == {
        "error": "failed",
        "message": 'EndpointConnectionError: Could not connect to the endpoint URL: "http://[redacted]@127.0.0.1:1/b"',
    }


def test_the_remote_cli_prints_the_same_documents_with_the_same_exit_statuses(tmp_path, server, executed):
    token = server.token("cli-user", "plan", "execute")
    env = {"PCBO_TOKEN": token}
    local_home = tmp_path / "local"
    for command in ("plan", "dry-run", "execute"):
        remote = run_pcbo_in_process(
            [command, "--server", server.url, "--input", DEMO_REQUEST], env=env, cwd=tmp_path
        )
        local = run_pcbo_in_process([command, "--input", DEMO_REQUEST], home=local_home)
        assert (remote.status, local.status) == (0, 0), remote.stderr
        if command == "execute":  # the server's lake already holds it: unchanged there, committed here
            assert remote.document["status"] == "unchanged"
            assert remote.document["decisionHash"] == local.document["decisionHash"]
        else:
            assert remote.document == local.document
    request = tmp_path / "bad.json"
    request.write_text(json.dumps({**DEMO, "policies": {**DEMO["policies"], "onViolaton": "block"}}))
    remote = run_pcbo_forked(["dry-run", "--server", server.url, "--input", request], env=env, cwd=tmp_path)
    local = run_pcbo_forked(["dry-run", "--input", request], home=local_home)
    assert remote.status == local.status == 2
    assert remote.stderr == local.stderr  # the same message naming the field
    request.write_text(json.dumps({**DEMO, "expectedDecisionHash": "sha256:" + "1" * 64}))
    remote = run_pcbo(
        ["execute", "--server", server.url, "--input", request], env=env, cwd=tmp_path
    )  # a real process
    local = run_pcbo_forked(["execute", "--input", request], home=local_home)
    assert remote.status == local.status == 3
    assert remote.document == local.document and remote.stderr == local.stderr
    refused = run_pcbo_in_process(
        ["plan", "--server", server.url, "--input", DEMO_REQUEST], env={"PCBO_TOKEN": "nope"}
    )
    assert refused.status == 1 and "HTTP 401" in refused.stderr
    missing = run_pcbo_in_process(["plan", "--server", server.url, "--input", DEMO_REQUEST])
    assert missing.status == 2 and "PCBO_TOKEN" in missing.stderr
    both = run_pcbo_in_process(
        ["execute", "--server", server.url, "--home", str(tmp_path), "--input", DEMO_REQUEST], env=env
    )
    assert both.status == 2 and "--home" in both.stderr


def test_an_execute_whose_dataset_a_local_run_holds_is_503_after_the_lease_wait(tmp_path, monkeypatch):
    """A run on the server's host (a CLI execute sharing its audit backup) holds the demo dataset: the
    API's execute waits PCBO_LEASE_WAIT_SECONDS, then answers 503 dataset_busy (Retry-After) naming
    that run, writing nothing; once the run is gone the same request is executed."""
    from pcbo_dagster_tests.cli_runner import holding_dataset_lock

    monkeypatch.setenv("PCBO_LEASE_WAIT_SECONDS", "1")
    home = tmp_path / "home"
    with running_server(home) as running:
        client = running.client(running.token("ops", "execute"), timeout=60)
        with holding_dataset_lock(home, "demo-events", "v1", "local-run"):
            busy = client.post("/v1/execute", content=DEMO_REQUEST.read_bytes())
            assert busy.status_code == 503, busy.text
            assert busy.json()["error"] == "dataset_busy" and "local-run" in busy.json()["message"]
            assert busy.headers["retry-after"] == "5"
            assert not list(home.rglob("_manifest.json"))
        done = client.post("/v1/execute", content=DEMO_REQUEST.read_bytes())
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "committed"


@pytest.mark.postgres
def test_an_execute_on_a_catalog_table_locked_by_hand_is_503_after_the_lease_wait(
    tmp_path, monkeypatch, fresh_postgres_url
):
    """Red-team finding: `LOCK TABLE partitions` by hand in an open session of the PostgreSQL catalog
    made the API's execute wait for as long as it was held; it now waits PCBO_LEASE_WAIT_SECONDS, then
    answers 503 catalog_busy (Retry-After) naming the table (before, once bounded, 500 `failed`, as for a
    store error); once let go the same request completes what the first left (its partitions recorded)."""
    import psycopg
    from sqlalchemy.engine import make_url

    monkeypatch.setenv("PCBO_LEASE_WAIT_SECONDS", "0.5")
    conninfo = make_url(fresh_postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with running_server(tmp_path / "home", catalog_url=fresh_postgres_url) as running:
        client = running.client(running.token("ops", "execute"), timeout=20)  # bounds a hang
        with psycopg.connect(conninfo) as holder:
            holder.execute("LOCK TABLE partitions IN SHARE MODE")
            busy = client.post("/v1/execute", content=DEMO_REQUEST.read_bytes())
        assert busy.status_code == 503, busy.text
        assert busy.json()["error"] == "catalog_busy", busy.text
        assert "catalog table partitions" in busy.json()["message"], busy.text
        assert busy.headers["retry-after"] == "5"
        done = client.post("/v1/execute", content=DEMO_REQUEST.read_bytes())  # completes what it left
        assert done.status_code == 200, done.text
        assert running.catalog.partition_versions("demo-events", "v1"), done.text


def test_respond_async_answers_202_and_the_run_gives_the_document(server, admin, executed):
    request = _request(runId="async-001")
    accepted = admin.post("/v1/execute", content=request, headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202
    body = accepted.json()
    assert body["runId"] == "async-001" and accepted.headers["Location"] == "/v1/runs/async-001"
    run = _wait(
        lambda: (r := admin.get(body["statusUrl"]).json())["status"] not in ("queued", "running") and r
    )
    assert run["status"] == "done" and run["httpStatus"] == 200 and run["actor"] == "admin-user"
    assert run["document"]["runId"] == "async-001"
    assert run["document"]["decisionHash"] == executed["decisionHash"]
    assert run["document"]["status"] == "unchanged"
    assert admin.get("/v1/runs/no-such-run").status_code == 404


def test_an_idempotency_key_returns_the_first_answer(server, admin, executed):
    request = _request(runId="idem-001")
    first = admin.post("/v1/execute", content=request, headers={"Idempotency-Key": "key-1"})
    chain = len(server.catalog.audit_events("demo-events/v1"))
    again = admin.post("/v1/execute", content=request, headers={"Idempotency-Key": "key-1"})
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert len(server.catalog.audit_events("demo-events/v1")) == chain  # nothing ran again
    other = admin.post(
        "/v1/execute", content=_request(runId="idem-002"), headers={"Idempotency-Key": "key-1"}
    )
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
    gated = _request(runId="idem-003", expectedDecisionHash="sha256:" + "2" * 64)
    first = admin.post("/v1/execute", content=gated, headers={"Idempotency-Key": "key-2"})
    again = admin.post("/v1/execute", content=gated, headers={"Idempotency-Key": "key-2"})
    assert first.status_code == again.status_code == 409 and first.json() == again.json()
    assert again.headers["Pcbo-Message"] == first.headers["Pcbo-Message"]


# -- datasets, partitions, proofs -----------------------------------------------------------------


def test_datasets_partitions_and_proofs(tmp_path, server, admin, executed):
    listing = admin.get("/v1/datasets").json()["data"]
    demo = next(d for d in listing if d["dataset"] == "demo-events")
    assert demo["partitions"] == len(executed["partitions"])
    assert demo["records"] == sum(p["recordCount"] for p in executed["partitions"])
    partitions = admin.get("/v1/datasets/demo-events/partitions").json()["partitions"]
    assert {p["key"]: p["merkleRoot"] for p in partitions} == {
        p["key"]: p["merkleRoot"] for p in executed["partitions"]
    }
    added = next(p for p in executed["partitions"] if p["recordCount"] > 0)
    ids = [r["id"] for r in DEMO["sourceRecords"] if isinstance(r, dict) and isinstance(r.get("id"), str)]
    proof = None
    for record_id in ids:
        answer = admin.get(
            f"/v1/datasets/demo-events/partitions/{added['key']}/proof", params={"id": record_id}
        )
        if answer.status_code == 200:
            proof = answer.json()
            break
    assert proof is not None
    assert verify_proof(proof)["valid"] and proof["merkleRoot"] == added["merkleRoot"]
    file = tmp_path / "proof.json"
    file.write_text(json.dumps(proof))
    assert run_pcbo_in_process(["verify-proof", "--proof", file, "--root", added["merkleRoot"]]).status == 0
    bad = admin.get(f"/v1/datasets/demo-events/partitions/{added['key']}/proof", params={"id": "no-such-id"})
    assert bad.status_code == 422 and bad.json()["field"] == "id"
    bad = admin.get("/v1/datasets/demo-events/partitions/..%2Fetc/proof", params={"id": "x"})
    assert bad.status_code in (404, 422)
    assert admin.get("/v1/datasets/nothing-here/partitions").status_code == 404

    # A second version extending the first: a consistency proof between them.
    key = added["key"]
    record = next(r for r in DEMO["sourceRecords"] if isinstance(r, dict) and r.get("id") == proof["id"])
    extended = _request(
        runId="extend-001", sourceRecords=[*DEMO["sourceRecords"], {**record, "id": "zz-extra"}]
    )
    assert admin.post("/v1/execute", content=extended).status_code == 200
    consistency = admin.get(
        "/v1/datasets/demo-events/consistency", params={"partition": key, "from": 1, "to": 2}
    )
    assert consistency.status_code == 200, consistency.text
    assert verify_proof(consistency.json())["valid"]
    bad = admin.get("/v1/datasets/demo-events/consistency", params={"partition": key, "from": 2, "to": 1})
    assert bad.status_code == 422 and bad.json()["field"] == "from"


# -- audit page, commands, services, status ------------------------------------------------------


def test_audit_page_newest_first_with_meta_filters_and_limits(server, admin, executed):
    page = admin.get("/reconciliation/audit", params={"limit": 3}).json()
    assert page["meta"]["page"] == 1 and page["meta"]["limit"] == 3
    assert page["meta"]["totalPages"] == -(-page["meta"]["total"] // 3)
    stamps = [e["timestamp"] for e in page["data"]]
    assert stamps == sorted(stamps, reverse=True) and len(stamps) == 3
    everything = admin.get("/reconciliation/audit", params={"limit": 500}).json()
    assert everything["meta"]["total"] == page["meta"]["total"]
    second = admin.get("/reconciliation/audit", params={"limit": 3, "page": 2}).json()["data"]
    assert [e["id"] for e in second] == [e["id"] for e in everything["data"][3:6]]
    committed = admin.get(
        "/reconciliation/audit", params={"actionType": "partition_committed", "limit": 500}
    ).json()
    assert committed["data"] and all(e["actionType"] == "partition_committed" for e in committed["data"])
    assert all(
        e["target"].startswith("demo-events/")
        for e in admin.get("/reconciliation/audit", params={"target": "demo-events"}).json()["data"]
    )
    oldest = admin.get("/reconciliation/audit", params={"sortOrder": "asc", "limit": 1}).json()["data"][0]
    assert oldest["id"] == everything["data"][-1]["id"]
    future = admin.get("/reconciliation/audit", params={"startDate": "2999-01-01T00:00:00Z"}).json()
    assert future["data"] == [] and future["meta"]["total"] == 0
    assert admin.get("/reconciliation/audit", params={"endDate": "2000-01-01T00:00:00Z"}).json()["data"] == []
    for params, field in (
        ({"limit": 501}, "limit"),
        ({"page": 0}, "page"),
        ({"startDate": "yesterday"}, "startDate"),
        ({"sortBy": "nonsense"}, "sortBy"),
    ):
        bad = admin.get("/reconciliation/audit", params=params)
        assert bad.status_code == 422 and bad.json()["field"] == field


def _command(client, body, timeout: float = 60.0):
    answer = client.post("/commands/run", json=body)
    assert answer.status_code in (200, 202), answer.text
    return _wait(
        lambda: (
            (s := client.get(f"/commands/{body['commandId']}").json())["phase"]
            in ("success", "error", "timeout")
            and s
        ),
        timeout,
    )


def test_commands_run_through_their_phases_recorded_append_only(server, admin, executed):
    state = _command(admin, {"commandId": "verify-1", "action": "verify", "target": "all", "params": {}})
    assert [p["phase"] for p in state["phases"]] == ["queued", "running", "success"]
    assert state["outcome"]["status"] == "clean" and state["actor"] == "admin-user"
    again = admin.post("/commands/run", json={"commandId": "verify-1", "action": "gc", "target": "all"})
    assert again.status_code == 200 and again.json()["phase"] == "success"  # idempotent: nothing ran
    assert [r["phase"] for r in server.catalog.command_phases("verify-1")] == ["queued", "running", "success"]

    run_id = "extend-001" if server.catalog.get_run("extend-001") else executed["runId"]
    state = _command(
        admin,
        {
            "commandId": "rollback-1",
            "action": "rollback",
            "target": "demo-events",
            "params": {"runId": run_id, "reason": "test"},
        },
    )
    assert state["phase"] == "success", state
    assert state["beforeState"]["partitions"] != state["afterState"]["partitions"]
    assert state["outcome"]["status"] == "rolled_back"
    rollback_events = [
        e for e in server.catalog.audit_events("demo-events/v1") if e["event_type"] == "partition_rolled_back"
    ]
    assert rollback_events and {e["actor"] for e in rollback_events} == {"admin-user"}
    state = _command(
        admin, {"commandId": "gc-1", "action": "gc", "target": "all", "params": {"dryRun": True}}
    )
    assert state["phase"] == "success"
    unknown = admin.post(
        "/commands/run", json={"commandId": "p1", "action": "pause-rollout", "target": "nope"}
    )
    assert unknown.status_code == 422 and unknown.json()["field"] == "target"
    state = _command(
        admin,
        {
            "commandId": "rb-none",
            "action": "rollback",
            "target": "demo-events",
            "params": {"runId": "never-ran"},
        },
    )
    assert state["phase"] == "error" and state["outcome"]["httpStatus"] == 422
    assert state["outcome"]["field"] == "runId"

    for body, field in (
        ({"commandId": "x1", "action": "explode", "target": "all"}, "action"),
        ({"commandId": "x2", "action": "gc", "target": "events"}, "target"),
        ({"commandId": "x3", "action": "gc", "target": "all", "params": {"dryrun": True}}, "params.dryrun"),
        ({"commandId": "../x", "action": "gc", "target": "all"}, "commandId"),
    ):
        bad = admin.post("/commands/run", json=body)
        assert bad.status_code == 422 and bad.json()["field"] == field, bad.text

    import sqlalchemy as sa

    with pytest.raises(sa.exc.DBAPIError, match="append-only"), server.catalog.write() as conn:
        conn.execute(sa.update(t.command_audit).values(outcome="{}"))
    entries = admin.get("/reconciliation/audit", params={"actionType": "verify", "limit": 10}).json()["data"]
    assert {e["details"]["phase"] for e in entries} == {"queued", "running", "success"}
    assert all(e["actor"] == "admin-user" and e["source"] == "command" for e in entries)


def test_services_and_admin_status(server, admin):
    services = {s["id"]: s for s in admin.get("/services/registered").json()["data"]}
    assert services["catalog"]["health"] == "up" and services["lake"]["health"] == "up"
    assert services["audit-endpoint"]["health"] == "not_configured"
    assert services["dagster"]["health"] == "not_configured"
    # A dataset of its own: the commands test rolls demo-events back, in whatever order tests run.
    request = _request(runId="status-001", dataset="status-events", table=None)
    mine = admin.post("/v1/execute", content=request)
    assert mine.status_code == 200, mine.text

    def status_with_mine():
        status = admin.get("/v1/admin/status").json()
        return status if any(d["dataset"] == "status-events" for d in status["datasets"]) else None

    status = _wait(status_with_mine)
    demo = next(d for d in status["datasets"] if d["dataset"] == "status-events")
    assert demo["freshness"]["newestPartition"] == max(p["key"] for p in mine.json()["partitions"])
    assert demo["freshness"]["gaps"] == 0
    assert status["latestCheckpoint"] == {"configured": False, "checkpoint": None, "chains": []}
    assert status["leases"] == {"held": [], "waiting": []}


def test_admin_status_and_services_report_signed_checkpoints_and_witnesses(tmp_path):
    """With PCBO_SIGNING_KEY and PCBO_WITNESSES, an execute through the server signs a checkpoint its
    witness cosigns: the admin status shows it (a limited token only its datasets'), the services list
    the witness, up while it answers and down once it is gone; a checkpoint row inserted in the
    catalog that is not its note's is not shown."""
    import threading

    from pcbo_dagster.core.signed_note import COSIGNATURE_V1, new_signing_key
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster.witness.server import LogKey, Witness, make_server

    operator, w1 = new_signing_key("ops.example/operator"), new_signing_key("witness.example/w1")
    key_file = tmp_path / "operator.key"
    key_file.write_text(operator.text + "\n")
    key_file.chmod(0o600)
    witness_server = make_server(
        Witness(w1, str(tmp_path / "witness.db"), [LogKey("pcbo/", operator.verifier())]), "127.0.0.1", 0
    )
    threading.Thread(target=witness_server.serve_forever, daemon=True).start()
    witness_url = f"http://127.0.0.1:{witness_server.server_address[1]}"
    home = tmp_path / "home"
    engine = Settings.resolve(
        home=str(home),
        env={},
        signing_key=str(key_file),
        witnesses=[f"{w1.verifier(COSIGNATURE_V1).text} {witness_url}"],
    )
    with running_server(home, engine=engine) as server:
        admin = server.client(server.token("admin-user", "admin"))
        answer = admin.post("/v1/execute", content=DEMO_REQUEST.read_bytes())
        assert answer.status_code == 200, answer.text
        assert answer.json()["checkpoint"]["witnessedBy"] == ["witness.example/w1"], answer.json()
        other = admin.post(
            "/v1/execute", content=_request(runId="other-001", dataset="other-events", table=None)
        )
        assert other.status_code == 200, other.text

        latest = admin.get("/v1/admin/status").json()["latestCheckpoint"]
        assert latest["configured"] is True
        chains = {c["chainKey"]: c for c in latest["chains"]}
        assert set(chains) == {"demo-events/v1", "other-events/v1"}
        demo = chains["demo-events/v1"]
        assert demo["origin"] == "pcbo/demo-events/v1" and demo["signerKey"] == operator.verifier().text
        assert demo["witnesses"] == [w1.verifier(COSIGNATURE_V1).text]
        assert demo["treeSize"] == server.catalog.log_size("demo-events/v1")
        assert demo["checkpoint"].startswith("pcbo/demo-events/v1\n")
        assert latest["checkpoint"] in latest["chains"]

        limited = server.client(server.token("team-a", "admin", datasets=["demo-events"]))
        mine = limited.get("/v1/admin/status").json()["latestCheckpoint"]
        assert [c["chainKey"] for c in mine["chains"]] == ["demo-events/v1"]
        assert mine["checkpoint"]["chainKey"] == "demo-events/v1"

        # a row inserted at a larger size with another chain's note is not the checkpoint shown
        import sqlalchemy as sa

        from pcbo_dagster.catalog import schema as t

        with server.catalog.write() as conn:
            forged = dict(
                conn.execute(
                    sa.select(t.transparency_checkpoints).where(
                        t.transparency_checkpoints.c.chain_key == "other-events/v1"
                    )
                )
                .mappings()
                .first()
            )
            conn.execute(
                sa.insert(t.transparency_checkpoints).values(
                    {**forged, "chain_key": "demo-events/v1", "tree_size": demo["treeSize"] + 1}
                )
            )
        again = admin.get("/v1/admin/status").json()["latestCheckpoint"]
        assert {c["chainKey"]: c for c in again["chains"]}["demo-events/v1"] == demo

        services = {s["id"]: s for s in admin.get("/services/registered").json()["data"]}
        assert services["witness:witness.example/w1"]["health"] == "up"
        assert services["witness:witness.example/w1"]["url"] == witness_url
        witness_server.shutdown()
        witness_server.server_close()
        services = {s["id"]: s for s in admin.get("/services/registered").json()["data"]}
        assert services["witness:witness.example/w1"]["health"] == "down"


def test_openapi_health_and_body_limit(tmp_path, server, admin):
    assert admin.get("/openapi.json").json()["paths"]["/v1/execute"]["post"]["requestBody"]
    assert server.client().get("/openapi.json").status_code == 401
    assert server.client().get("/docs").status_code == 404
    import httpx

    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    with running_server(tmp_path / "small", max_body_bytes=1000) as small:
        client = small.client(small.token("u", "plan"))
        big = client.post("/v1/plan", content=DEMO_REQUEST.read_bytes() + b" " * 2000)
        assert big.status_code == 413 and big.json()["error"] == "too_large"
    with running_server(tmp_path / "few", max_partitions=3) as few:
        client = few.client(few.token("u", "plan"))
        many = client.post("/v1/plan", content=DEMO_REQUEST.read_bytes())
        assert many.status_code == 422 and many.json()["field"] == "chunkSeconds"


# -- auth, fail closed ------------------------------------------------------------------------------

ENDPOINTS = [
    ("POST", "/v1/plan", "plan"),
    ("POST", "/v1/dry-run", "plan"),
    ("POST", "/v1/execute", "execute"),
    ("GET", "/v1/runs/demo-run-001", "read"),
    ("GET", "/v1/datasets", "read"),
    ("GET", "/v1/datasets/demo-events/partitions", "read"),
    ("GET", "/v1/datasets/demo-events/partitions/20240101T000000Z/proof?id=x", "read"),
    ("GET", "/v1/datasets/demo-events/consistency?partition=20240101T000000Z&from=1&to=2", "read"),
    ("GET", "/reconciliation/stream", "read"),
    ("GET", "/reconciliation/audit", "read"),
    ("POST", "/commands/run", "read"),
    ("GET", "/commands/auth-verify", "read"),  # a verify command this test runs first
    ("GET", "/services/registered", "read"),
    ("GET", "/v1/admin/status", "admin"),
    ("GET", "/openapi.json", "read"),
]


def _call(client, method: str, path: str):
    if path == "/reconciliation/stream":  # an answer that does not end: its status only
        with client.stream(method, path) as answer:
            answer.close()
            return answer
    body = DEMO_REQUEST.read_bytes() if path.startswith("/v1/") and method == "POST" else None
    if path == "/commands/run":
        body = json.dumps({"commandId": "auth-probe", "action": "gc", "target": "all"}).encode()
    return client.request(method, path, content=body, headers={"Content-Type": "application/json"})


def test_every_endpoint_refuses_no_token_a_bad_one_a_revoked_one_and_wrong_scopes(server, admin, executed):
    # (a command of its own: which others exist depends on the tests run before on this server, and
    # a token holding some command's scope is told 404 of an unknown command, 403 of a known one)
    _command(admin, {"commandId": "auth-verify", "action": "verify", "target": "all", "params": {}})
    scoped = {scope: server.token(f"only-{scope}", scope) for scope in ("read", "plan", "execute", "approve")}
    revoked = server.token("gone", "admin")
    token_id = next(r["token_id"] for r in server.catalog.tokens() if r["subject"] == "gone")
    server.catalog.revoke_token(token_id)
    # one client per token (building an httpx client, its TLS context, costs ~50 ms)
    unauthorized = {token: server.client(token) for token in (None, "pcbo_not-a-token", revoked)}
    scoped_clients = {scope: server.client(token) for scope, token in scoped.items()}
    for method, path, needed in ENDPOINTS:
        for token, client in unauthorized.items():
            answer = _call(client, method, path)
            assert answer.status_code == 401, (path, token, answer.text)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        for scope, client in scoped_clients.items():
            answer = _call(client, method, path)
            if scope == needed:
                assert answer.status_code not in (401, 403) or path == "/commands/run", (
                    path,
                    scope,
                    answer.text,
                )
            else:
                assert answer.status_code == 403, (path, scope, answer.text)
    # gc needs admin: /commands/run checks the scope of the action asked for
    answer = _call(scoped_clients["read"], "POST", "/commands/run")
    assert answer.status_code == 403 and "admin" in answer.json()["message"]
    bad_header = server.client().get("/v1/datasets", headers={"Authorization": "Basic abc"})
    assert bad_header.status_code == 401


def test_a_token_for_one_dataset_sees_nothing_of_another(server, admin, executed):
    # The demo's Iceberg table holds demo-events: another dataset naming it is refused, nothing run.
    refused = admin.post("/v1/execute", content=_request(runId="other-001", dataset="other-events"))
    assert refused.status_code == 422 and refused.json()["field"] == "table", refused.text
    assert server.catalog.get_run("other-001") is None
    other = _request(runId="other-001", dataset="other-events", table=None)
    assert admin.post("/v1/execute", content=other).status_code == 200
    limited = server.client(server.token("team-other", "read", "plan", "execute", datasets=["other-events"]))
    assert [d["dataset"] for d in limited.get("/v1/datasets").json()["data"]] == ["other-events"]
    for path in (
        "/v1/datasets/demo-events/partitions",
        "/v1/datasets/demo-events/partitions/20240101T000000Z/proof?id=x",
        "/v1/datasets/demo-events/consistency?partition=20240101T000000Z&from=1&to=2",
    ):
        assert limited.get(path).status_code == 403, path
    for command in ("plan", "dry-run", "execute"):
        assert limited.post(f"/v1/{command}", content=DEMO_REQUEST.read_bytes()).status_code == 403
    assert limited.get("/v1/runs/demo-run-001").status_code == 404
    assert limited.get("/v1/runs/other-001").status_code == 200
    targets = {
        e["target"] for e in limited.get("/reconciliation/audit", params={"limit": 500}).json()["data"]
    }
    assert targets and all(t.startswith("other-events") for t in targets)
    assert limited.get("/commands/verify-1").status_code == 404  # a command about every dataset
    verify = limited.post(
        "/commands/run", json={"commandId": "v-limited", "action": "verify", "target": "all"}
    )
    assert verify.status_code == 403
    rollback = limited.post(
        "/commands/run", json={"commandId": "rb-limited", "action": "rollback", "target": "demo-events"}
    )
    assert rollback.status_code == 403
    admin_only = server.client(server.token("limited-admin", "admin", datasets=["other-events"]))
    datasets = [d["dataset"] for d in admin_only.get("/v1/admin/status").json()["datasets"]]
    assert datasets == ["other-events"]


def test_verify_command_checks_trusted_ledgers(server, admin, executed):
    """`params.trustedLedgers` is `pcbo verify --trusted-ledger`: a ledger the lake does not hold is
    `ledger_not_trusted` (the command ends in error with the findings); a malformed one is 422."""
    anchor = "ledgers/v1:33:" + "ab" * 32
    body = {
        "commandId": "verify-anchor",
        "action": "verify",
        "target": "all",
        "params": {"trustedLedgers": [anchor]},
    }
    state = _command(admin, body)
    assert state["phase"] == "error", state
    assert [f["kind"] for f in state["outcome"]["findings"]] == ["ledger_not_trusted"], state
    assert state["outcome"]["trustedLedgers"][0]["anchored"] is None
    for bad in (["ledgers/v1:33"], "ledgers/v1:33:" + "ab" * 32, [33]):
        body = {
            "commandId": "verify-bad",
            "action": "verify",
            "target": "all",
            "params": {"trustedLedgers": bad},
        }
        answer = admin.post("/commands/run", json=body)
        assert answer.status_code == 422 and answer.json()["field"] == "params.trustedLedgers", answer.text

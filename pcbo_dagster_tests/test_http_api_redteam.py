"""Red-team findings on `pcbo serve` (branch rt-http), as tests that failed while the finding stood.

Each test was `xfail(strict=True)` until its finding was fixed (the marker removed with the fix, in
one commit). The report that goes with them explains each one; the reproductions there show it
against a `pcbo serve` process. The last test covers a finding the red team reported without one
(a token opening thousands of event streams).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from pcbo_dagster_tests.cli_runner import run_pcbo  # noqa: E402
from pcbo_dagster_tests.http_server import DEMO_REQUEST, RunningServer, running_server  # noqa: E402


def _request(run_id: str, dataset: str, start: str = "2024-01-01T00:00:00Z", **extra: Any) -> bytes:
    """A one-hour request from `start` (a day at midnight) with one inline record, or `extra`'s."""
    body: dict[str, Any] = {
        "runId": run_id,
        "dataset": dataset,
        "start": start,
        "end": start[:11] + "01:00:00Z",
        **extra,
    }
    if "source" not in extra and "sourceRecords" not in extra:
        body["sourceRecords"] = [
            {"id": f"id-{run_id}", "occurredAt": start[:11] + "00:10:00Z", "consentGranted": True}
        ]
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("http-redteam") / "home"
    with running_server(home, reconcile_seconds=0.2, heartbeat_seconds=0.3) as running:
        yield running


# -- the default sources directory holds the lake, the audit backup and the SQLite catalog ----------


def test_another_dataset_s_lake_is_not_a_source(server: RunningServer) -> None:
    """A token limited to ds-b names `lake/ds-a/v1` (inside the default sources directory,
    $PCBO_HOME) as its source: a dry-run lists ds-a's ids, and an execute copies ds-a's rows, every
    column, into ds-b's lake."""
    team_a = server.client(server.token("alice-lake", "execute", datasets=["lake-a"]))
    records = [{"id": "patient-17", "occurredAt": "2024-05-01T00:10:00Z", "consentGranted": True, "ssn": "1"}]
    body = _request("lake-a-1", "lake-a", start="2024-05-01T00:00:00Z", sourceRecords=records)
    assert team_a.post("/v1/execute", content=body).status_code == 200
    team_b = server.client(server.token("bob-lake", "plan", "execute", datasets=["lake-b"]))
    for uri in ("lake/lake-a/v1", "lake", "pas"):
        answer = team_b.post(
            "/v1/dry-run",
            content=_request("lake-b-1", "lake-b", start="2024-05-01T00:00:00Z", source={"uri": uri}),
        )
        assert answer.status_code == 422 and answer.json()["field"] == "source.uri", (uri, answer.text[:300])
        assert "patient-17" not in answer.text


def test_naming_the_sqlite_catalog_as_a_source_leaves_the_catalog_intact(tmp_path: Path) -> None:
    """A plan-scoped dry-run of `catalog.db` opens and closes the catalog file in the server process,
    which releases every POSIX lock SQLite holds on it there. The next process to close the catalog
    (`pcbo token create`) believes it is the last one and deletes the WAL and shared memory the
    server still uses: the server's later writes go to a deleted file (lost at restart, never seen by
    another process) or fail with `file is not a database`."""
    home = tmp_path / "home"
    with running_server(home) as server:
        admin = server.client(server.token("root", "admin"))
        assert admin.post("/v1/execute", content=_request("before", "ds")).status_code == 200
        planner = server.client(server.token("planner", "plan"))
        for fmt in ("jsonl", "parquet"):
            answer = planner.post(
                "/v1/dry-run", content=_request("x", "ds", source={"uri": "catalog.db", "format": fmt})
            )
            assert answer.status_code == 422
        # Nor through a link in a directory source, nor a hard link: judged before it is opened.
        (home / "linked").mkdir()
        (home / "linked" / "a.jsonl").symlink_to(home / "catalog.db")
        os.link(home / "catalog.db", home / "hard.jsonl")
        for uri in ("linked", "hard.jsonl"):
            answer = planner.post("/v1/dry-run", content=_request("x", "ds", source={"uri": uri}))
            assert answer.status_code == 422 and "own stores" in answer.text, answer.text
        created = run_pcbo(["token", "create", "--subject", "late", "--scope", "read"], home)
        assert created.status == 0, created.stderr
        held = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if _readable(fd)}
        assert not [p for p in held if "catalog.db" in p and p.endswith("(deleted)")], held
        after = admin.post("/v1/execute", content=_request("after", "ds", start="2024-01-02T00:00:00Z"))
        assert after.status_code == 200, after.text
        seen = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); "
                "print([r[0] for r in c.execute('select run_id from api_runs order by run_id')])",
                str(home / "catalog.db"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "after" in seen, seen


def _readable(fd: str) -> bool:
    try:
        os.readlink(f"/proc/self/fd/{fd}")
        return True
    except OSError:
        return False


# -- tokens and the event stream ----------------------------------------------------------------


def test_a_revoked_token_s_open_stream_ends(server: RunningServer) -> None:
    token = server.token("leaver", "read")
    row = server.catalog.token_for_secret(token)
    assert row is not None
    token_id = row["token_id"]
    after_revoke: list[str] = []
    ended = threading.Event()
    revoked_at: list[float] = []

    def listen() -> None:
        with server.client(token).stream("GET", "/reconciliation/stream", timeout=None) as answer:
            for line in answer.iter_lines():
                if revoked_at and line.startswith("event:"):
                    after_revoke.append(line)
                if revoked_at and time.monotonic() - revoked_at[0] > 4:
                    return
        ended.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(1)
    server.catalog.revoke_token(token_id)
    revoked_at.append(time.monotonic())
    assert server.client(token).get("/v1/datasets").status_code == 401
    admin = server.client(server.token("root-sse", "admin"))
    assert admin.post("/v1/execute", content=_request("sse-1", "sse-ds")).status_code == 200
    listener.join(10)
    assert ended.is_set(), f"still streaming after revocation: {after_revoke[:8]}"


# -- runs, commands and the admin status of a token limited to datasets --------------------------


def test_racing_for_a_command_id_reveals_no_other_dataset_s_command(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`POST /commands/run` checks `existing(commandId)` (with the dataset check), then prepares the
    command, then `start` records it queued; when another request recorded that id in between,
    `start` answers that command's state, whoever's it is, with no dataset check. Against a
    `pcbo serve` process two plain concurrent posts leak 38 times in 60; here the window between the
    check and the record is widened (a slow `prepare`, as a rollout lookup or a busy catalog is)."""
    runner = server.app.state.commands
    prepare = runner.prepare

    def slow_prepare(*args: Any) -> Any:
        command = prepare(*args)
        time.sleep(0.2)
        return command

    monkeypatch.setattr(runner, "prepare", slow_prepare)
    team_a = server.client(server.token("alice-race", "read", "execute", datasets=["race-a"]))
    team_b = server.client(server.token("bob-race", "read", "execute", datasets=["race-b"]))
    leaked = []
    for _ in range(5):
        command_id = "race-" + uuid.uuid4().hex[:8]
        answers: dict[str, Any] = {}
        barrier = threading.Barrier(2)

        def post(
            who: str,
            client: Any,
            dataset: str,
            command_id: str = command_id,
            answers: dict[str, Any] = answers,
            barrier: threading.Barrier = barrier,
        ) -> None:
            barrier.wait()
            params = {"runId": "nope", "reason": f"private note of {dataset}"}
            answers[who] = client.post(
                "/commands/run",
                json={"commandId": command_id, "action": "rollback", "target": dataset, "params": params},
            )

        threads = [
            threading.Thread(target=post, args=("race-a", team_a, "race-a")),
            threading.Thread(target=post, args=("race-b", team_b, "race-b")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for mine, answer in answers.items():
            if answer.status_code in (200, 202) and answer.json()["target"] != mine:
                leaked.append(answer.json())
    assert leaked == [], leaked[:2]


@pytest.mark.parametrize(
    ("action", "target", "params", "field"),
    [
        ("rollback", "cmd-ds", {"runId": 5}, "params.runId"),
        ("rollback", "cmd-ds", {"runId": "r", "reason": ["x"]}, "params.reason"),
        ("rollback", "cmd-ds", {"runId": "r", "versionLabel": "../x"}, "params.versionLabel"),
        ("gc", "all", {"dryRun": "yes"}, "params.dryRun"),
        # red-team finding: a reason is recorded on the audit chain as typed (an escape, a line break)
        ("rollback", "cmd-ds", {"runId": "r", "reason": "bad\u001b[31m\u202e\nnewline"}, "params.reason"),
        ("pause-rollout", "r1", {"reason": "stop\nforged line"}, "params.reason"),
    ],
)
def test_a_command_parameter_of_the_wrong_type_is_422_with_nothing_recorded(
    server: RunningServer, action: str, target: str, params: dict[str, Any], field: str
) -> None:
    """Today: 202, the command is recorded queued, runs, and ends `error` with 'internal error
    (ApiError)' (an `ApiError` raised in the worker is not an engine error), the field not named."""
    admin = server.client(server.token("root-cmd", "admin"))
    command_id = "typed-" + uuid.uuid4().hex[:8]
    answer = admin.post(
        "/commands/run", json={"commandId": command_id, "action": action, "target": target, "params": params}
    )
    assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
    assert server.catalog.command_phases(command_id) == []


def test_the_admin_status_of_a_limited_token_lists_no_other_dataset_s_run(server: RunningServer) -> None:
    runs = server.app.state.runs
    assert (
        server.catalog.create_api_run(
            run_id="secret-run-b", actor="b", dataset="status-b", version_label="v1", request_hash="sha256:0"
        )
        is None
    )
    pending: Future[Any] = Future()
    with runs._lock:
        runs._futures["secret-run-b"] = pending
    try:
        limited = server.client(server.token("carol", "admin", datasets=["status-c"]))
        document = limited.get("/v1/admin/status").json()
        assert "secret-run-b" not in json.dumps(document), document["runsInFlight"]
    finally:
        with runs._lock:
            runs._futures.pop("secret-run-b", None)
        pending.cancel()


def test_a_run_id_of_another_dataset_s_cli_run_is_refused(server: RunningServer) -> None:
    """`run_id_taken` checks only API runs (`api_runs`); the engine's `runs` table is keyed by run id
    across datasets, so an API execute of ds-b reusing the id of ds-a's CLI run rewrites ds-a's run
    row (status, summary) and leaves ds-b's chain naming a run the catalog does not hold (verify:
    catalog_run_missing, catalog_lineage_mismatch)."""
    from pcbo_dagster.engine.backfill_commands import execute_request

    engine = server.app.state.config.engine
    execute_request(engine, _request("nightly-cli", "cli-a"))
    before = server.catalog.get_run("nightly-cli")
    assert before is not None and before["dataset"] == "cli-a"
    team_b = server.client(server.token("bob-cli", "execute", datasets=["cli-b"]))
    body = json.loads(_request("nightly-cli", "cli-b", start="2024-04-01T00:00:00Z"))
    body["end"] = "2024-04-01T05:00:00Z"
    answer = team_b.post("/v1/execute", content=json.dumps(body).encode())
    assert answer.status_code == 409 and answer.json()["error"] == "run_id_taken", answer.text[:300]
    # Nor through a retry-partitions command's params.runId (refused before anything is recorded).
    commands_b = server.client(server.token("bob-cli-cmd", "read", "execute", datasets=["cli-b"]))
    params = {"partitions": ["20240401T000000Z"], "runId": "nightly-cli"}
    command = {"commandId": "retry-cli-b", "action": "retry-partitions", "target": "cli-b", "params": params}
    answer = commands_b.post("/commands/run", json=command)
    assert answer.status_code == 409 and answer.json()["error"] == "run_id_taken", answer.text[:300]
    assert "cli-a" not in answer.text and server.catalog.command_phases("retry-cli-b") == []
    assert server.catalog.get_run("nightly-cli") == before


def test_a_table_of_another_dataset_is_refused_without_naming_it(server: RunningServer) -> None:
    team_a = server.client(server.token("alice-t", "execute", datasets=["tbl-a"]))
    team_b = server.client(server.token("bob-t", "execute", datasets=["tbl-b"]))
    table = {"format": "iceberg", "name": "ns.shared"}
    assert team_a.post("/v1/execute", content=_request("tbl-a-1", "tbl-a", table=table)).status_code == 200
    answer = team_b.post("/v1/execute", content=_request("tbl-b-1", "tbl-b", table=table))
    assert answer.status_code == 422 and answer.json()["field"] == "table", answer.text
    assert "tbl-a" not in answer.text and str(server.home) not in answer.text, answer.text


# -- the remote CLI trusts its server ------------------------------------------------------------


class _Evil(BaseHTTPRequestHandler):
    mode = "redirect"
    sink = ""
    seen: list[str | None] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.mode == "redirect":
            self.send_response(302)
            self.send_header("Location", self.sink + "/collect")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps(
            {"error": "invalid_input", "field": "runId", "message": "\x1b]0;TITLE\x07\x1b[2J\rall good"}
        ).encode()
        self.send_response(422)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append(self.headers.get("Authorization"))
        body = json.dumps({"status": "committed", "runId": "fake", "partitions": []}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def evil() -> Iterator[tuple[str, type[_Evil]]]:
    handler: type[_Evil] = type("Evil", (_Evil,), {"seen": []})
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
    for httpd in servers:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    handler.sink = f"http://127.0.0.1:{servers[1].server_address[1]}"
    try:
        yield f"http://127.0.0.1:{servers[0].server_address[1]}", handler
    finally:
        for httpd in servers:
            httpd.shutdown()
            httpd.server_close()


def test_the_remote_cli_sends_its_token_to_no_other_origin(tmp_path: Path, evil: Any) -> None:
    url, handler = evil
    handler.mode = "redirect"
    run = run_pcbo(
        ["execute", "--server", url, "--input", DEMO_REQUEST],
        tmp_path / "home",
        env={"PCBO_TOKEN": "pcbo_secret-of-the-client"},
    )
    assert handler.seen == [], handler.seen  # today: ['Bearer pcbo_secret-of-the-client']
    assert run.status != 0, run.document  # today: 0, printing the other origin's document


def test_the_remote_cli_sends_its_token_to_a_loopback_server_directly_never_through_a_proxy(
    tmp_path: Path, evil: Any
) -> None:
    """Red-team finding: with `HTTP_PROXY` set, `pcbo execute --server http://127.0.0.1:...` sent its
    request, bearer token included, in the clear to the proxy (this machine's loopback through a proxy
    is the proxy's, not ours), whose answer it printed as the server's. A loopback server is now asked
    directly, as every other client of pcbo asks loopback."""
    url, handler = evil
    handler.mode = "escape"
    proxied: list[str | None] = []

    class _Proxy(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            proxied.append(self.headers.get("Authorization"))
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{proxy.server_address[1]}"
        run = run_pcbo(
            ["execute", "--server", url, "--input", DEMO_REQUEST],
            tmp_path / "home",
            env={"PCBO_TOKEN": "pcbo_secret-of-the-client", "HTTP_PROXY": address, "http_proxy": address},
        )
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxied == [], proxied
    assert run.status == 2, run.stderr  # the server's own answer (422), not the proxy's 502


def test_the_remote_cli_prints_no_control_character_of_the_server(tmp_path: Path, evil: Any) -> None:
    url, handler = evil
    handler.mode = "escape"
    run = run_pcbo(
        ["execute", "--server", url, "--input", DEMO_REQUEST], tmp_path / "home", env={"PCBO_TOKEN": "pcbo_x"}
    )
    assert run.status == 2
    assert "\x1b" not in run.stderr and "\r" not in run.stderr, repr(run.stderr)


# -- limits: streams per token, connections, the plan pool (finding 10, not reproduced as a test) ---


def test_a_token_opens_a_bounded_number_of_streams(tmp_path: Path) -> None:
    """Red team: one token opened 4,000 event streams. Past `PCBO_SSE_STREAMS_PER_TOKEN` a stream is
    429; another token is not held up, and a stream closed frees its place."""
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster.server.config import ServerConfig

    environ = {
        "PCBO_SSE_STREAMS_PER_TOKEN": "2",
        "PCBO_SERVER_PLAN_WORKERS": "3",
        "PCBO_SERVER_MAX_CONNECTIONS": "64",
        "PCBO_SERVER_KEEPALIVE_SECONDS": "2",
    }
    config = ServerConfig.from_environment(Settings.resolve(home=str(tmp_path / "h"), env={}), environ)
    assert (config.streams_per_token, config.plan_workers, config.max_connections) == (2, 3, 64)
    assert config.keep_alive_seconds == 2.0
    with running_server(tmp_path / "home", environ=environ) as server:
        token = server.token("many", "read")
        client = server.client(token)
        streams = [client.stream("GET", "/reconciliation/stream", timeout=None) for _ in range(2)]
        opened = [s.__enter__() for s in streams]
        try:
            assert [a.status_code for a in opened] == [200, 200]
            third = client.get("/reconciliation/stream")
            assert third.status_code == 429 and third.json()["error"] == "too_many_streams", third.text
            other = server.client(server.token("other", "read"))
            with other.stream("GET", "/reconciliation/stream", timeout=None) as answer:
                assert answer.status_code == 200
        finally:
            streams[0].__exit__(None, None, None)
        row = server.catalog.token_for_secret(token)
        assert row is not None
        deadline = time.monotonic() + 10
        while server.app.state.broker.streams_of(row["token_id"]) > 1:
            assert time.monotonic() < deadline, "the closed stream was not unsubscribed"
            time.sleep(0.05)
        with client.stream("GET", "/reconciliation/stream", timeout=None) as again:
            assert again.status_code == 200
        streams[1].__exit__(None, None, None)


def test_a_service_that_drips_its_answer_is_down_at_the_probe_timeout() -> None:
    """`/services/registered` probes the witnesses (and Dagster) it is configured with. The probe's
    timeout bounded each socket read, not the request: a witness sending a header byte every few
    hundredths of a second held the probe, and the admin's request, for as long as it liked. Now the
    whole probe ends at `PROBE_TIMEOUT_SECONDS` and the service is `down`, saying why; a service that
    answers at all, even with an error status, is `up`."""
    from pcbo_dagster.server import status
    from pcbo_dagster_tests.loopback import DripReceiver

    dripping = DripReceiver(b"HTTP/1.1 200 OK\r\n", b"X-Drip: y\r\n", gap=0.03)
    refusing = DripReceiver(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", b" ", gap=60)
    try:
        started = time.monotonic()
        health, why = status._http_probe(dripping.url)
        assert time.monotonic() - started < status.PROBE_TIMEOUT_SECONDS + 2
        assert (health, why) == ("down", f"no whole answer within {status.PROBE_TIMEOUT_SECONDS:g} s")
        assert status._http_probe(refusing.url) == ("up", None)
    finally:
        dripping.close()
        refusing.close()


def test_the_probe_of_a_witness_never_follows_its_redirect() -> None:
    """The probe of a witness (or of Dagster) followed a redirect as urllib does: a witness answering
    `302 Location: <any URL>` had `pcbo serve` GET that URL (another host, an internal address) at
    every `/services/registered`. Now a 3xx is an answer like any other (`up`), and the URL it names is
    never asked."""
    from pcbo_dagster.server import status
    from pcbo_dagster_tests.loopback import serving

    asked: list[str] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)) as elsewhere:

        class Redirecting(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self.send_response(302)
                self.send_header("Location", elsewhere + "/internal")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        with serving(ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)) as witness:
            assert status._http_probe(witness) == ("up", None)
    assert asked == []


# -- a command's scope is the action's: an approve-only or execute-only token runs its commands ---


def test_an_approve_or_execute_token_without_read_runs_and_reads_its_own_commands(
    server: RunningServer,
) -> None:
    """The README gives each command the scope of its action (`pause-rollout`: approve; `rollback`:
    execute). `/commands/run` and `/commands/{id}` required `read` first: an approver's token (scope
    approve alone) was 403 "this token lacks the 'read' scope" for the very commands it exists for."""
    approver = server.client(server.token("approver-only", "approve"))
    operator = server.client(server.token("operator-only", "execute"))
    planner = server.client(server.token("planner-only", "plan"))
    pause_id, rollback_id = "pause-" + uuid.uuid4().hex[:8], "rollback-" + uuid.uuid4().hex[:8]
    pause = {"commandId": pause_id, "action": "pause-rollout", "target": "no-such-rollout", "params": {}}
    answer = approver.post("/commands/run", json=pause)  # past the scope: the rollout is looked up
    assert answer.status_code == 422 and answer.json()["field"] == "target", answer.text
    rollback = {"commandId": rollback_id, "action": "rollback", "target": "cmd-ds", "params": {"runId": "r"}}
    answer = operator.post("/commands/run", json=rollback)
    assert answer.status_code == 202 and answer.json()["actor"] == "operator-only", answer.text
    assert operator.get(f"/commands/{rollback_id}").status_code == 200
    assert operator.post("/commands/run", json=rollback).status_code == 200  # idempotent, as with read
    # each still lacks the other's scope, and a plan token every command's
    assert (
        approver.post("/commands/run", json={**rollback, "commandId": "x-" + rollback_id}).status_code == 403
    )
    assert operator.post("/commands/run", json=pause).status_code == 403
    assert approver.get(f"/commands/{rollback_id}").status_code == 403
    assert approver.post("/commands/run", json=rollback).status_code == 403  # a known id is no way round
    assert planner.get(f"/commands/{rollback_id}").status_code == 403
    assert planner.get("/commands/no-such-command").status_code == 403
    verify = {"commandId": "v-" + pause_id, "action": "verify", "target": "all", "params": {}}
    assert planner.post("/commands/run", json=verify).status_code == 403


# -- a client that leaves in the middle of its body is no server error ---------------------------


def test_a_client_that_leaves_mid_body_is_no_server_error(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A body announced (Content-Length 100) and left after 10 bytes: the server logged 'unexpected
    ClientDisconnect', uvicorn a whole traceback ('Exception in ASGI application'), and the access
    log a 500 — an error an operator is paged for, raised at will by anyone who can open a socket."""
    import socket

    token = server.token("leaver", "plan")
    port = int(server.url.rsplit(":", 1)[1])
    caplog.set_level(logging.INFO)
    for path in ("/v1/plan", "/commands/run"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            head += "Content-Length: 100\r\n\r\n"
            sock.sendall(head.encode() + b'{"runId": ')
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(path in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    logged = [r for r in caplog.records if r.name.startswith(("pcbo.server", "uvicorn"))]
    errors = [r.getMessage()[:200] for r in logged if r.levelno >= logging.ERROR]
    assert errors == []
    statuses = [json.loads(r.getMessage())["status"] for r in logged if r.name == "pcbo.server.access"]
    assert len(statuses) == 2 and 500 not in statuses, statuses


def test_the_probe_of_an_endpoint_with_credentials_sends_them_to_no_name_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Red-team finding: `/services/registered` probed `PCBO_AUDIT_ENDPOINT` as configured, and urllib
    takes a URL's `user:password@` for part of the host: the password went to the name resolver
    (`getaddrinfo('user:password@127.0.0.1')`, a DNS query in the clear) and the endpoint, though up,
    was shown `down` ("Name or service not known"). Now the probe asks the endpoint's host and port
    alone (the userinfo is a credential for deliveries, sent as HTTP Basic, not for a probe)."""
    import socket

    from pcbo_dagster.server import status
    from pcbo_dagster_tests.loopback import serving

    asked: list[str | None] = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            asked.append(self.headers.get("Authorization"))
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    looked_up: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)) as endpoint:
        monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
        with_credentials = endpoint.replace("http://", "http://auditor:s3cret-pw@") + "/ingest?key=q"
        assert status._http_probe(with_credentials) == ("up", None)
    assert asked == [None]
    assert looked_up and not any("s3cret" in host or "@" in host for host in looked_up), looked_up


def test_a_dagster_url_the_server_cannot_use_stops_it_at_start_naming_the_variable(tmp_path: Path) -> None:
    """Red-team finding: `PCBO_DAGSTER_URL` with credentials (or not an http(s) URL) was accepted at
    start and every `?dagster=true` execute was then refused 422 on `--dagster`, a flag the server does
    not have. It is now invalid input naming `PCBO_DAGSTER_URL` when `pcbo serve` starts (the URL
    shown without its password)."""
    from pcbo_dagster.core.errors import InvalidInput
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster.server.config import ServerConfig

    settings = Settings.resolve(home=str(tmp_path / "h"), env={})
    for url in ("http://ops:hunter2pw@127.0.0.1:3000", "ftp://127.0.0.1:3000", "http://127.0.0.1:99999"):
        with pytest.raises(InvalidInput) as refused:
            ServerConfig.from_environment(settings, {"PCBO_DAGSTER_URL": url})
        assert refused.value.field == "PCBO_DAGSTER_URL", (url, refused.value.field)
        assert "hunter2pw" not in refused.value.message
    config = ServerConfig.from_environment(settings, {"PCBO_DAGSTER_URL": "http://127.0.0.1:3000"})
    assert config.dagster_url == "http://127.0.0.1:3000"


def test_a_command_s_state_refused_names_each_scope_that_would_do_once(server: RunningServer) -> None:
    """Walking the README: an execute-only token asking for a `verify` command's state (verify's scope
    is read) was told "this token lacks the 'read' or 'read' scope"."""
    admin = server.client(server.token("verifier", "admin"))
    operator = server.client(server.token("operator-alone", "execute"))
    verify_id = "v-" + uuid.uuid4().hex[:8]
    verify = {"commandId": verify_id, "action": "verify", "target": "all", "params": {}}
    assert admin.post("/commands/run", json=verify).status_code == 202
    refused = operator.get(f"/commands/{verify_id}")
    assert refused.status_code == 403, refused.text
    assert refused.json()["message"] == "this token lacks the 'read' scope", refused.text
    refused = operator.post("/commands/run", json=verify)
    assert refused.status_code == 403 and refused.json()["message"] == "this token lacks the 'read' scope"


def test_a_command_a_killed_server_left_running_is_reported_ended_at_the_next_start(tmp_path: Path) -> None:
    """Red-team finding: a server killed outright (kill -9, the host lost) while a command was queued
    or running left it so in `command_audit`: after a restart `GET /commands/{id}` answered `running`
    for ever, and posting the id again answered the same and ran nothing, so a client polling it never
    learnt it had ended. As API runs are marked `interrupted` at start, such a command now gets its
    final phase, `error`, saying the server stopped (post the command again with a new commandId)."""
    from pcbo_dagster.catalog import CatalogStore
    from pcbo_dagster.engine.settings import Settings

    home = tmp_path / "home"
    home.mkdir()
    catalog = CatalogStore(Settings.resolve(home=str(home), env={}).catalog_url)
    catalog.migrate()
    left: dict[str, Any] = {
        "actor": "ops",
        "action": "verify",
        "target": "all",
        "dataset": None,
        "params": {},
    }
    catalog.record_command_phase(command_id="left-queued", phase="queued", logs=["queued by ops"], **left)
    catalog.record_command_phase(command_id="left-running", phase="queued", logs=["queued by ops"], **left)
    catalog.record_command_phase(
        command_id="left-running", phase="running", logs=["queued by ops", "running"], **left
    )
    catalog.record_command_phase(command_id="finished", phase="queued", logs=["queued by ops"], **left)
    catalog.record_command_phase(command_id="finished", phase="success", outcome={"status": "clean"}, **left)
    catalog.close()
    with running_server(home) as server:
        client = server.client(server.token("ops", "read"))
        for command_id in ("left-queued", "left-running"):
            state = client.get(f"/commands/{command_id}").json()
            assert state["phase"] == "error", state
            assert state["outcome"]["error"] == "interrupted", state
            assert "post the command again" in state["outcome"]["message"], state
            assert "the server stopped" in state["logs"][-1], state
            again = client.post(
                "/commands/run",
                json={"commandId": command_id, **{k: left[k] for k in ("action", "target", "params")}},
            )
            assert again.status_code == 200 and again.json()["phase"] == "error", again.text
        finished = client.get("/commands/finished").json()
        assert [p["phase"] for p in finished["phases"]] == ["queued", "success"], finished


def test_an_idempotency_key_a_killed_server_never_answered_lets_the_retry_run(tmp_path: Path) -> None:
    """Red-team finding: an execute sent with `Idempotency-Key` claims the key until it is answered. A
    server killed outright mid-execute left the claim unanswered for ever: after the restart, the
    retry the README asks for (the same request again, here with its key) was 409
    `idempotency_in_progress` at every attempt, though nothing was running. At start, as the API runs
    are marked `interrupted`, the keys no answer was recorded for are now released: the retry runs
    (the engine heals what the killed run left) and its answer is the key's from then on."""
    from pcbo_dagster.catalog import CatalogStore
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster.server.runs import request_digest

    home = tmp_path / "home"
    home.mkdir()
    body = _request("idem-killed", "idem-killed")
    catalog = CatalogStore(Settings.resolve(home=str(home), env={}).catalog_url)
    catalog.migrate()
    assert catalog.claim_idempotency_key("ops", "k-1", request_digest(body)) is None  # then killed
    catalog.close()
    with running_server(home) as server:
        client = server.client(server.token("ops", "execute"))
        retry = client.post("/v1/execute", content=body, headers={"Idempotency-Key": "k-1"})
        assert retry.status_code == 200 and retry.json()["status"] == "committed", retry.text
        again = client.post("/v1/execute", content=body, headers={"Idempotency-Key": "k-1"})
        assert again.status_code == 200 and again.json() == retry.json()


def test_a_path_with_a_trailing_slash_is_no_open_redirect(server: RunningServer) -> None:
    """Walking the README ("`/healthz` — the only open endpoint"): any path with a trailing slash
    (`/v1/plan/`, `/v1/datasets/`) was answered, with no token, `307` to the same path on whatever
    host the request's `Host` header named (a method- and body-preserving redirect off the server).
    Now such a path is an unknown one: 404, with no `Location`."""
    import httpx

    for method, path in (("GET", "/v1/datasets/"), ("POST", "/v1/plan/"), ("GET", "/healthz/")):
        answer = httpx.request(
            method, server.url + path, headers={"Host": "elsewhere.example"}, follow_redirects=False
        )
        assert answer.status_code == 404 and "location" not in answer.headers, (path, answer.headers)
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_one_subject_holds_a_bounded_number_of_commands_in_flight(tmp_path: Path) -> None:
    """Red-team finding: commands run on two worker threads behind a queue with no bound, and a
    command's timeout starts only once it runs (its engine work goes on past it). A `read` token
    posting verify after verify (each with a new commandId, `timeoutSeconds` as small as it likes)
    queued them all, and an approver's `pause-rollout` waited behind every one. Now a token subject
    has at most `COMMANDS_IN_FLIGHT_PER_SUBJECT` commands queued or running (their work included):
    one more is 429 `too_many_commands` (`Retry-After`), nothing recorded; another subject is not
    held up by the limit, and a command that ends frees its place."""
    import threading

    from pcbo_dagster.server.commands import COMMANDS_IN_FLIGHT_PER_SUBJECT

    with running_server(tmp_path / "home") as server:
        runner = server.app.state.commands
        release = threading.Event()
        # both worker threads busy: every command posted now stays queued until `release`
        held = [runner.executor.submit(release.wait) for _ in range(2)]
        flooder = server.client(server.token("flooder", "read"))
        other = server.client(server.token("other", "read"))
        try:
            for i in range(COMMANDS_IN_FLIGHT_PER_SUBJECT):
                verify = {"commandId": f"flood-{i}", "action": "verify", "target": "all", "params": {}}
                assert flooder.post("/commands/run", json=verify).status_code == 202
            one_more = {"commandId": "flood-more", "action": "verify", "target": "all", "params": {}}
            refused = flooder.post("/commands/run", json=one_more)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"] == "too_many_commands" and refused.headers["Retry-After"]
            assert flooder.get("/commands/flood-more").status_code == 404  # nothing recorded
            theirs = {"commandId": "other-1", "action": "verify", "target": "all", "params": {}}
            assert other.post("/commands/run", json=theirs).status_code == 202
        finally:
            release.set()
            for future in held:
                future.result(timeout=60)
        deadline = time.monotonic() + 60
        while flooder.get("/commands/flood-0").json()["phase"] != "success":
            assert time.monotonic() < deadline, "the queued commands did not run"
            time.sleep(0.1)
        while (answer := flooder.post("/commands/run", json=one_more)).status_code == 429:
            assert time.monotonic() < deadline, "a command that ended freed no place"
            time.sleep(0.1)
        assert answer.status_code == 202, answer.text

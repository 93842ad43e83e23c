"""`pcbo serve` as a process, as a user runs it: a token from `pcbo token create`, executes through
the API and through Dagster (one data path: the same hashes and lake bytes as the CLI), and a graceful
shutdown that lets a running execute finish."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from pcbo_dagster.catalog import CatalogStore  # noqa: E402
from pcbo_dagster_tests.cli_runner import run_pcbo  # noqa: E402
from pcbo_dagster_tests.dagster_harness import webserver_process  # noqa: E402
from pcbo_dagster_tests.http_server import DEMO_REQUEST, REPO_ROOT, lake_files, serve_process  # noqa: E402


def _token(home: Path, *scopes: str) -> str:
    args = ["token", "create", "--subject", "ops@example.com"]
    for scope in scopes:
        args += ["--scope", scope]
    created = run_pcbo(args, home=home)
    assert created.status == 0, created.stderr
    return created.document["token"]


@pytest.mark.slow
def test_cli_http_and_dagster_give_the_same_hashes_and_lake_bytes(tmp_path):
    pytest.importorskip("dagster_webserver")
    cli_home, http_home, dagster_pcbo_home = tmp_path / "cli", tmp_path / "http", tmp_path / "dagster-pcbo"
    local = run_pcbo(["execute", "--input", DEMO_REQUEST], home=cli_home)
    assert local.status == 0, local.stderr

    dagster_home = tmp_path / "dagster-home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(
        "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
        "telemetry:\n  enabled: false\n"
    )
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: pcbo_dagster.dagster_defs.definitions\n"
        f"      location_name: pcbo\n      working_directory: {REPO_ROOT}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCBO_", "DAGSTER_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        DAGSTER_HOME=str(dagster_home),
        PCBO_HOME=str(dagster_pcbo_home),
    )
    log = tmp_path / "webserver.log"
    with webserver_process(workspace, env, tmp_path, log) as (dagster_url, _):
        token = _token(http_home, "execute", "read")
        with serve_process(http_home, env={"PCBO_DAGSTER_URL": dagster_url}) as (url, _):
            client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=300)
            direct = client.post("/v1/execute", content=DEMO_REQUEST.read_bytes())
            assert direct.status_code == 200, direct.text
            request = json.loads(DEMO_REQUEST.read_text())
            through_dagster = client.post(
                "/v1/execute", params={"dagster": "true"}, content=DEMO_REQUEST.read_bytes()
            )
            assert through_dagster.status_code == 200, through_dagster.text + log.read_text()[-3000:]
            run = client.get(f"/v1/runs/{request['runId']}").json()
            services = {s["id"]: s["health"] for s in client.get("/services/registered").json()["data"]}
        documents = [local.document, direct.json(), through_dagster.json()]
        assert len({(d["planHash"], d["decisionHash"]) for d in documents}) == 1
        assert len({tuple(p["merkleRoot"] for p in d["partitions"]) for d in documents}) == 1
        assert through_dagster.json()["dagsterRun"]["runId"] == run["dagsterRunId"]  # the run id links both
        assert services["dagster"] == "up"
        cli_lake = lake_files(cli_home)
        assert cli_lake and cli_lake == lake_files(http_home) == lake_files(dagster_pcbo_home)
        catalog = CatalogStore(f"sqlite:///{dagster_pcbo_home / 'catalog.db'}")
        try:
            actors = {e.get("actor") for e in catalog.audit_events("demo-events/v1")}
        finally:
            catalog.close()
        assert actors == {"ops@example.com"}


def _big_request(partitions: int, per_partition: int) -> bytes:
    records = [
        {
            "id": f"rec-{h:04d}-{i:03d}",
            "occurredAt": f"2024-01-{1 + h // 24:02d}T{h % 24:02d}:{i % 60:02d}:00Z",
            "jurisdiction": "US",
            "consentGranted": True,
            "retentionExpiresAt": "2030-01-01T00:00:00Z",
            "amount": i,
        }
        for h in range(partitions)
        for i in range(per_partition)
    ]
    end_day, end_hour = 1 + partitions // 24, partitions % 24
    return json.dumps(
        {
            "runId": "long-run",
            "dataset": "long-events",
            "start": "2024-01-01T00:00:00Z",
            "end": f"2024-01-{end_day:02d}T{end_hour:02d}:00:00Z",
            "policies": {"requireConsent": True},
            "sourceRecords": records,
        }
    ).encode()


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_the_server_with_one_line_and_by_the_signal(tmp_path, sent):
    """README: Ctrl-C stops `pcbo serve` gracefully. Walk finding: once uvicorn's graceful shutdown
    was done, the KeyboardInterrupt it raises again came out of `pcbo` as a Python traceback. Now one
    line, and the process still ends by SIGINT, as uvicorn has it. A SIGTERM likewise."""
    home = tmp_path / "home"
    with serve_process(home) as (_, process):
        os.killpg(process.pid, sent)
        assert process.wait(timeout=120) == -sent
    log = (home.parent / "serve.log").read_text()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log and log.rstrip().endswith(f"pcbo serve: interrupted ({sent.name})"), log


@pytest.mark.slow
def test_sigterm_lets_a_running_execute_finish(tmp_path):
    home = tmp_path / "home"
    token = _token(home, "admin")
    with serve_process(home, env={"PCBO_PARALLEL": "1"}) as (url, process):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        accepted = client.post(
            "/v1/execute", content=_big_request(240, 20), headers={"Prefer": "respond-async"}
        )
        assert accepted.status_code == 202
        deadline = time.monotonic() + 60
        while client.get("/v1/runs/long-run").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGTERM)
        # uvicorn ends the process with the signal once its graceful shutdown is done
        assert process.wait(timeout=300) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in (home.parent / "serve.log").read_text()
    catalog = CatalogStore(f"sqlite:///{home / 'catalog.db'}")
    try:
        run = catalog.get_api_run("long-run")
        assert run["status"] == "done" and run["http_status"] == 200
        assert catalog.get_run("long-run")["status"] == "committed"
    finally:
        catalog.close()
    verified = run_pcbo(["verify"], home=home)
    assert verified.status == 0 and verified.document["status"] == "clean"


def _drip(url: str, data: bytes, seconds: float = 12.0) -> tuple[float, bytes]:
    """Send `data` a byte every 0.25 s on a raw connection to `url`'s server until the server closes
    it or answers, or `seconds` pass: how long it stayed open, and what it answered."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    answer = b""
    with socket.create_connection((host, int(port)), timeout=seconds) as sock:
        sock.settimeout(0.25)
        for i in range(len(data)):
            if answer or time.monotonic() - started > seconds:
                break
            try:
                sock.sendall(data[i : i + 1])
                answer = sock.recv(65536)
                if not answer:  # closed by the server
                    break
            except TimeoutError:
                continue
            except OSError:  # reset by the server
                break
    return time.monotonic() - started, answer


def test_a_client_that_drips_its_headers_or_stalls_its_body_is_cut_off(tmp_path):
    """Red-team finding: `pcbo serve` set no deadline for a request's headers or body, so a client
    sending them a byte at a time held its connection slot for as long as it liked (no token needed
    for the headers): `PCBO_SERVER_MAX_CONNECTIONS` such clients made every request 503. Now the
    headers must be whole within `PCBO_SERVER_READ_SECONDS` of the connection's (or, kept alive, the
    request's) first byte, and a body may not pause longer than that between two chunks (408)."""
    home = tmp_path / "home"
    token = _token(home, "plan")
    with serve_process(home, env={"PCBO_SERVER_READ_SECONDS": "2"}) as (url, _process):
        headers = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 60 + b"\r\n\r\n"
        held, answer = _drip(url, headers)
        assert held < 6 and answer == b"", (held, answer)  # closed unanswered after about 2 s

        body = DEMO_REQUEST.read_bytes()
        head = (
            f"POST /v1/plan HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=15) as sock:
            sock.sendall(head + body[:10])  # then nothing more
            started = time.monotonic()
            answer = sock.recv(65536)
            waited = time.monotonic() - started
            while b"request_timeout" not in answer and (more := sock.recv(65536)):  # the rest of it
                answer += more
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"request_timeout" in answer and 1.5 < waited < 6, (waited, answer)
        # whole requests in time are served as before
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        planned = httpx.post(
            f"{url}/v1/plan", content=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        assert planned.status_code == 200, planned.text


def test_request_headers_past_64_kib_are_refused_before_they_are_all_read(tmp_path):
    """Red-team finding: uvicorn's httptools parser (chosen whenever httptools is installed, as it is
    with uvicorn[standard]) has no limit on a request's headers, and `h11_max_incomplete_event_size`
    bounds only h11's: one client with no token sent tens of MiB of one header within the read
    deadline, the parser concatenating it chunk by chunk on the event loop, and every other request
    waited until it stopped. Now a request's line and headers are read up to 64 KiB: past it, the
    parser's plain-text 400 and the connection closed, whichever parser uvicorn chose."""
    home = tmp_path / "home"
    with serve_process(home) as (url, _process):
        host, port = url.removeprefix("http://").split(":")
        sent = 0
        answer = b""
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ")
                for _ in range(256):  # 16 MiB, unless the server stops reading
                    sock.sendall(b"a" * 65536)
                    sent += 65536
                sock.sendall(b"\r\n\r\n")
            except OSError:  # closed by the server mid-way
                pass
            try:
                while more := sock.recv(65536):
                    answer += more
            except OSError:
                pass
        assert sent < 16 * 1024 * 1024, "the server read 16 MiB of headers"
        assert answer.startswith(b"HTTP/1.1 400") and b"Invalid HTTP request received." in answer, answer
        # a request with ordinary headers is served as before
        assert httpx.get(f"{url}/healthz", headers={"X-Padding": "a" * 60000}, timeout=5).status_code == 200

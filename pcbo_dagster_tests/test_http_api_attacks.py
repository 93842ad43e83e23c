"""Attacks on a real `pcbo serve` (uvicorn on loopback, httpx and raw sockets) by tokens limited to a
dataset: a request reaches nothing outside its lake and the server's sources directory, a run or a
command of another dataset is neither touched nor revealed, and no body is read before the token is
checked or past the body limit."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from pcbo_dagster_tests.cli_runner import tree_state  # noqa: E402
from pcbo_dagster_tests.http_server import RunningServer, running_server  # noqa: E402
from pcbo_dagster_tests.object_store_servers import ObjectStore  # noqa: E402

SECRET = "SECRET-ROW-outside-the-sources-directory"
RECORD = {"id": SECRET, "occurredAt": "2024-01-01T00:10:00Z", "consentGranted": True, "ssn": "123-45-6789"}


def _request(run_id: str, dataset: str, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "runId": run_id,
        "dataset": dataset,
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-01T01:00:00Z",
        **extra,
    }
    if "source" not in extra:
        body["sourceRecords"] = [{"id": "x", "occurredAt": "2024-01-01T00:10:00Z", "consentGranted": True}]
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("http-attacks") / "home"
    with running_server(home, reconcile_seconds=0.5, max_body_bytes=1000) as running:
        yield running


class _Recorder(BaseHTTPRequestHandler):
    """Serves the secret record to anyone, and counts who asked."""

    asked: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).asked.append(self.path)
        body = (json.dumps(RECORD) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on loopback holding the secret record: (its URL, the paths it was asked for)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.asked = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", _Recorder.asked
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- source.uri: the sources directory or an object store, nothing else -----------------------------


def test_a_source_reaches_no_host_file_and_no_url_outside_the_sources_directory(
    tmp_path: Path, server: RunningServer, web_server: tuple[str, list[str]]
) -> None:
    outside = tmp_path / "outside" / "secret.jsonl"
    outside.parent.mkdir()
    outside.write_text(json.dumps(RECORD) + "\n")
    url, asked = web_server
    client = server.client(server.token("team-a", "plan", "execute", datasets=["ds-a"]))
    for uri in (
        str(outside),
        f"file://{outside}",
        f"local://{outside}",
        f"simplecache::file://{outside}",
        f"filecache::file://{outside}",
        f"file://{outside}::",
        f"{url}/secret.jsonl",
        f"simplecache::{url}/secret.jsonl",
        f"memory://{outside}",
        f"ftp://127.0.0.1/{outside}",
        "../../" + str(outside.relative_to(tmp_path.parent)),
    ):
        source = {"uri": uri, "format": "jsonl"}
        for command in ("dry-run", "execute"):
            answer = client.post(f"/v1/{command}", content=_request("src-1", "ds-a", source=source))
            assert answer.status_code == 422, (uri, command, answer.text)
            assert answer.json()["field"] == "source.uri", (uri, answer.text)
            assert SECRET not in answer.text
            # red-team finding: the server's sources directory was named (its absolute path)
            assert server.home.as_posix() not in answer.text, answer.text
    # Nor a hidden path of the sources directory (where the home keeps its keys, `.keys/`).
    (server.home / ".keys").mkdir(exist_ok=True)
    (server.home / ".keys" / "k.jsonl").write_text(json.dumps({**RECORD, "id": SECRET}) + "\n")
    answer = client.post("/v1/dry-run", content=_request("src-h", "ds-a", source={"uri": ".keys/k.jsonl"}))
    assert answer.status_code == 422 and "hidden path" in answer.text and SECRET not in answer.text
    # ... nor through a link to it in a directory source planted in the lake (a third red-team pass).
    planted = server.home / "lake" / f"planted-{uuid.uuid4().hex[:8]}"
    planted.mkdir(parents=True)
    (planted / "a.jsonl").symlink_to(server.home / ".keys" / "k.jsonl")
    source = {"uri": str(planted.relative_to(server.home))}
    answer = client.post("/v1/dry-run", content=_request("src-l", "ds-a", source=source))
    assert answer.status_code == 422 and SECRET not in answer.text, answer.text
    assert asked == []  # not one request reached the URL
    assert not (server.home / "lake" / "ds-a").exists()
    # A source inside the sources directory (the server's home here) is read as before.
    (server.home / "inside.jsonl").write_text(json.dumps({**RECORD, "id": "inside-1"}) + "\n")
    inside = client.post("/v1/dry-run", content=_request("src-2", "ds-a", source={"uri": "inside.jsonl"}))
    assert inside.status_code == 200, inside.text
    assert "inside-1" in inside.text


def test_no_link_in_the_sources_directory_leads_a_read_out_of_it(
    tmp_path: Path, server: RunningServer
) -> None:
    """Red-team finding: only the request's own path was checked, so a symbolic link inside a
    directory source (planted in the lake, inside the default sources directory, by someone who can
    write the lake) or a ledger archive's batch files linked from outside were read: a plan-scoped
    client saw a host file's ids. Every local file a server reads, as opened, must lie inside its
    sources directory; a link that stays inside is still read."""
    from pcbo_dagster_tests import ledger_archive_builder as b

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(json.dumps(RECORD) + "\n")
    # (Planted in the lake first; the lake is no source any more at all, a link in a directory source.)
    drop = server.home / f"drop-{uuid.uuid4().hex[:8]}"
    drop.mkdir(parents=True)
    (drop / "x.jsonl").symlink_to(outside / "secret.jsonl")
    archive = b.write_archive(outside / "archive", 0, 7, ledgers_per_file=2, files_per_partition=1)
    linked = server.home / f"archive-{uuid.uuid4().hex[:8]}"
    linked.mkdir()
    for path in archive.files:
        (linked / path.name).symlink_to(path)
    client = server.client(server.token("team-links", "plan", "execute", datasets=["ds-links"]))
    ledgers = {"field": "ledgerSequence", "first": 2, "end": 8, "partitionSize": 2}
    for body in (
        _request("link-1", "ds-links", source={"uri": str(drop.relative_to(server.home)), "format": "jsonl"}),
        json.dumps(
            {
                "runId": "link-2",
                "dataset": "ds-links",
                "ledgerRange": ledgers,
                "source": {"uri": linked.name, "format": "ledger_archive"},
            }
        ).encode(),
    ):
        for command in ("dry-run", "execute"):
            answer = client.post(f"/v1/{command}", content=body)
            assert answer.status_code == 422, answer.text
            assert answer.json()["field"] in ("source", "source.uri"), answer.text
            assert "outside the server's sources directory" in answer.text
            assert SECRET not in answer.text
    assert not (server.home / "lake" / "ds-links").exists()
    # A link that stays inside the sources directory is read as its target is.
    (server.home / "inside-target.jsonl").write_text(json.dumps({**RECORD, "id": "linked-inside"}) + "\n")
    inner = server.home / f"inner-{uuid.uuid4().hex[:8]}"
    inner.mkdir()
    (inner / "a.jsonl").symlink_to(server.home / "inside-target.jsonl")
    answer = client.post("/v1/dry-run", content=_request("link-3", "ds-links", source={"uri": inner.name}))
    assert answer.status_code == 200 and "linked-inside" in answer.text, answer.text


def test_a_ledger_archive_s_refusal_names_its_files_as_the_request_gave_the_archive(
    server: RunningServer,
) -> None:
    """Red-team finding: a ledger archive's refusals (a misnamed file, a corrupt batch, a gap) named
    its files by the path the server resolved, so any client that could plan learnt the absolute
    path of the server's sources directory (a refused source outside it is answered without it).
    They are named as the request gave the archive, as a record file's are."""
    from pcbo_dagster_tests import ledger_archive_builder as b

    name = f"archive-{uuid.uuid4().hex[:8]}"
    archive = b.write_archive(server.home / name, 0, 7, ledgers_per_file=2, files_per_partition=1)
    client = server.client(server.token("team-named", "plan", datasets=["ds-named"]))
    body = json.dumps(
        {
            "runId": "named-1",
            "dataset": "ds-named",
            "ledgerRange": {"field": "ledgerSequence", "first": 2, "end": 8, "partitionSize": 2},
            "source": {"uri": name, "format": "ledger_archive"},
        }
    ).encode()
    misnamed = archive.root / "junk.xdr.zst"
    misnamed.write_bytes(b"")
    answer = client.post("/v1/dry-run", content=body)
    assert answer.status_code == 422 and f"{name}/junk.xdr.zst: not a SEP-54" in answer.text, answer.text
    assert server.home.as_posix() not in answer.text, answer.text
    misnamed.unlink()
    archive.files[1].write_bytes(b"not zstd")
    answer = client.post("/v1/dry-run", content=body)
    assert answer.status_code == 422 and f"{name}/{archive.files[1].name}" in answer.text, answer.text
    assert server.home.as_posix() not in answer.text, answer.text
    # Red-team finding: a file whose name is not UTF-8 (the byte 0xFF, held by Python as a lone
    # surrogate) made the refusal unwritable as JSON: a 500 "internal error". Its bytes are escaped.
    (archive.root / "junk-\udcff").write_bytes(b"")
    answer = client.post("/v1/dry-run", content=body)
    assert answer.status_code == 422 and f"{name}/junk-\\xff: not a SEP-54" in answer.json()["message"], (
        answer.text
    )


def test_an_object_store_source_is_read_by_the_server(
    server: RunningServer, s3_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_store.env.items():
        monkeypatch.setenv(key, value)
    fs: Any = s3_store.filesystem()
    prefix = f"{s3_store.bucket}/sources-{uuid.uuid4().hex}"
    fs.pipe_file(f"{prefix}/records.jsonl", (json.dumps({**RECORD, "id": "on-s3"}) + "\n").encode())
    client = server.client(server.token("team-s3", "plan", datasets=["ds-s3"]))
    for uri in (f"s3://{prefix}/records.jsonl", f"s3a://{prefix}/records.jsonl"):
        answer = client.post("/v1/dry-run", content=_request("s3-1", "ds-s3", source={"uri": uri}))
        assert answer.status_code == 200, (uri, answer.text)
        assert "on-s3" in answer.text


# -- table.catalog: the server's own Iceberg catalog only ------------------------------------------


def test_a_request_names_no_iceberg_catalog(tmp_path: Path, server: RunningServer) -> None:
    planted = tmp_path / "elsewhere" / "planted.db"
    planted.parent.mkdir()
    client = server.client(server.token("team-t", "plan", "execute", datasets=["ds-t"]))
    for catalog in (f"sqlite:///{planted}", "postgresql://127.0.0.1:1/x", "http://127.0.0.1:1/cat", "pcbo"):
        table = {"format": "iceberg", "name": "ns.t", "catalog": catalog}
        for command in ("plan", "dry-run", "execute"):
            answer = client.post(f"/v1/{command}", content=_request("cat-1", "ds-t", table=table))
            assert answer.status_code == 422, (catalog, command, answer.text)
            assert answer.json()["field"] == "table.catalog"
    assert not planted.exists() and list(planted.parent.iterdir()) == []
    assert server.catalog.get_run("cat-1") is None  # nothing ran
    # A table without a catalog goes to the server's configured one.
    table = {"format": "iceberg", "name": "ns.t"}
    answer = client.post("/v1/execute", content=_request("cat-2", "ds-t", table=table))
    assert answer.status_code == 200, answer.text


def test_a_dry_run_refuses_the_field_names_the_table_its_chain_declares_cannot_have(tmp_path: Path) -> None:
    """A request without `table` publishes to the table an earlier run declared on its dataset
    version's chain, and execute refuses a field that table cannot hold (`ID` beside `id`); the
    dry-run passed no settings and read no chain, so it answered 200 and a decision hash for what
    execute then refused (422). It now reads the server's verified chain: the same 422 naming the same
    field, nothing written; a chain that does not verify (its declaration dropped) is a 500 as an
    execute's is; a dataset version with no declared table dry-runs as before."""
    home = tmp_path / "home"
    with running_server(home) as server:
        client = server.client(server.token("team-d", "plan", "execute", datasets=["ds-d", "ds-e"]))
        table = {"format": "iceberg", "name": "ns.declared"}
        for dataset, extra in (("ds-d", {"table": table}), ("ds-e", {})):
            first = client.post("/v1/execute", content=_request(f"{dataset}-1", dataset, **extra))
            assert first.status_code == 200, first.text
        later = json.loads(_request("ds-d-2", "ds-d"))
        later["sourceRecords"][0]["ID"] = "shadow"
        before = tree_state(home)
        dry = client.post("/v1/dry-run", content=json.dumps(later))
        assert dry.status_code == 422 and dry.json()["field"] == "sourceRecords[0].ID", dry.text
        assert "cannot be named 'ID'" in dry.json()["message"], dry.text
        assert tree_state(home) == before
        refused = client.post("/v1/execute", content=json.dumps(later))
        assert refused.status_code == 422 and refused.json() == dry.json(), refused.text
        # The same records for the dataset version whose chain declares no table: as before.
        plain = client.post(
            "/v1/dry-run", content=json.dumps({**later, "dataset": "ds-e", "runId": "ds-e-2"})
        )
        assert plain.status_code == 200 and "ID" in plain.text, plain.text
        backup = home / "pas" / "ds-d" / "v1.jsonl"
        lines = backup.read_bytes().splitlines(keepends=True)
        backup.write_bytes(b"".join(line for line in lines if b'"table_publication_recorded"' not in line))
        before = tree_state(home)
        forged = client.post("/v1/dry-run", content=json.dumps(later))
        assert forged.status_code == 500, forged.text
        assert "the audit chain ds-d/v1 does not verify" in forged.json()["message"], forged.text
        assert tree_state(home) == before


def test_a_dry_run_refuses_a_table_other_than_the_one_its_chain_declares(tmp_path: Path) -> None:
    """Execute refuses a request naming another table than the one its dataset version's chain declares
    (422, field `table`); the dry-run answered 200 and a decision hash for it. It now makes the
    execute's own check: the same 422, nothing written; the declared table named again: 200."""
    home = tmp_path / "home"
    with running_server(home) as server:
        client = server.client(server.token("team-d", "plan", "execute", datasets=["ds-d"]))
        table = {"format": "iceberg", "name": "ns.declared"}
        first = client.post("/v1/execute", content=_request("ds-d-1", "ds-d", table=table))
        assert first.status_code == 200, first.text
        other = _request("ds-d-2", "ds-d", table={**table, "name": "ns.other"})
        before = tree_state(home)
        dry = client.post("/v1/dry-run", content=other)
        assert dry.status_code == 422 and dry.json()["field"] == "table", dry.text
        assert "publishes to one table" in dry.json()["message"], dry.text
        same = client.post("/v1/dry-run", content=_request("ds-d-2", "ds-d", table=table))
        assert same.status_code == 200 and same.json()["decisionHash"], same.text
        assert tree_state(home) == before
        refused = client.post("/v1/execute", content=other)
        assert refused.status_code == 422 and refused.json() == dry.json(), refused.text


def test_a_dry_run_refuses_the_table_of_another_dataset_version(tmp_path: Path) -> None:
    """Execute refuses a request naming a table another dataset version holds (422, field `table`);
    the dry-run answered 200 and a decision hash for it. It now makes the execute's own check: the
    same 422, nothing written."""
    home = tmp_path / "home"
    with running_server(home) as server:
        client = server.client(server.token("team-d", "plan", "execute", datasets=["ds-d", "ds-e"]))
        table = {"format": "iceberg", "name": "ns.held"}
        first = client.post("/v1/execute", content=_request("ds-d-1", "ds-d", table=table))
        assert first.status_code == 200, first.text
        taken = _request("ds-e-1", "ds-e", table=table)
        before = tree_state(home)
        dry = client.post("/v1/dry-run", content=taken)
        assert dry.status_code == 422 and dry.json()["field"] == "table", dry.text
        assert "is the table of another dataset version" in dry.json()["message"], dry.text
        assert tree_state(home) == before
        refused = client.post("/v1/execute", content=taken)
        assert refused.status_code == 422 and refused.json() == dry.json(), refused.text


# -- runs and commands belong to their dataset ------------------------------------------------------


def test_a_run_id_of_another_dataset_is_refused_and_its_run_left_alone(server: RunningServer) -> None:
    team_a = server.client(server.token("alice", "read", "execute", datasets=["ds-a"]))
    team_b = server.client(server.token("bob", "read", "execute", datasets=["ds-b"]))
    admin = server.client(server.token("root", "admin"))
    assert team_b.post("/v1/execute", content=_request("nightly", "ds-b")).status_code == 200
    before = server.catalog.get_api_run("nightly")
    # A run of ds-b still in flight (another server process's, as the catalog holds it).
    assert (
        server.catalog.create_api_run(
            run_id="inflight", actor="bob", dataset="ds-b", version_label="v1", request_hash="sha256:0"
        )
        is None
    )
    answers = {}
    for run_id in ("nightly", "inflight"):
        for who in (team_a, admin):
            answer = who.post("/v1/execute", content=_request(run_id, "ds-a"))
            assert answer.status_code == 409, answer.text
            assert "ds-b" not in answer.text and "progress" not in answer.text
            answers[run_id] = answer.json()
    # The same answer whether the other dataset's run is finished or in flight.
    assert answers["nightly"]["error"] == answers["inflight"]["error"] == "run_id_taken"
    assert answers["nightly"]["message"].replace("nightly", "X") == answers["inflight"]["message"].replace(
        "inflight", "X"
    )
    assert server.catalog.get_api_run("nightly") == before
    inflight = server.catalog.get_api_run("inflight")
    assert inflight is not None and inflight["dataset"] == "ds-b" and inflight["status"] == "queued"
    mine = team_b.get("/v1/runs/nightly")
    assert mine.status_code == 200 and mine.json()["dataset"] == "ds-b" and mine.json()["actor"] == "bob"
    assert team_a.get("/v1/runs/nightly").status_code == 404
    assert not (server.home / "lake" / "ds-a").exists()
    # Its own dataset's finished run: submitted again, as before.
    again = team_b.post("/v1/execute", content=_request("nightly", "ds-b"))
    assert again.status_code == 200 and again.json()["status"] == "unchanged"


def test_a_command_of_another_dataset_is_404_when_posted_too(server: RunningServer) -> None:
    team_a = server.client(server.token("alice-c", "read", "execute", datasets=["ds-a"]))
    team_b = server.client(server.token("bob-c", "read", "execute", datasets=["ds-b"]))
    queued = team_b.post(
        "/commands/run",
        json={"commandId": "cmd-b", "action": "rollback", "target": "ds-b", "params": {"runId": "x"}},
    )
    assert queued.status_code == 202, queued.text
    for answer in (
        team_a.get("/commands/cmd-b"),
        team_a.post(
            "/commands/run",
            json={"commandId": "cmd-b", "action": "rollback", "target": "ds-a", "params": {"runId": "x"}},
        ),
    ):
        assert answer.status_code == 404 and "ds-b" not in answer.text, answer.text
        assert answer.json() == {"error": "not_found", "message": "no command 'cmd-b'"}


# -- /commands/run: the token first, then a bounded body ------------------------------------------


def _first_line(port: int, headers: str, body: bytes, seconds: float = 5.0) -> bytes:
    """The status line the server answers to a POST /commands/run that declares a 100 MB body and
    sends `body` of it."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(seconds)
        head = (
            "POST /commands/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"{headers}Content-Length: 100000000\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        try:
            return sock.recv(200).split(b"\r\n")[0]
        except TimeoutError:
            return b"no answer: the server waits for the whole body"


def test_commands_run_checks_the_token_before_the_body_and_bounds_the_body(server: RunningServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    started = time.monotonic()
    assert _first_line(port, "", b'{"commandId": "' + b"x" * 500) == b"HTTP/1.1 401 Unauthorized"
    bad = "Authorization: Bearer pcbo_not-a-token\r\n"
    assert _first_line(port, bad, b'"' + b"x" * 500) == b"HTTP/1.1 401 Unauthorized"
    assert time.monotonic() - started < 5
    token = server.token("gc-admin", "admin")
    assert _first_line(port, f"Authorization: Bearer {token}\r\n", b"{").startswith(b"HTTP/1.1 413")
    admin = server.client(token)
    big = {
        "commandId": "big-1",
        "action": "gc",
        "target": "all",
        "params": {"dryRun": True, "pad": "x" * 2000},
    }
    for content in (json.dumps(big).encode(), iter([json.dumps(big).encode()])):  # declared, then chunked
        answer = admin.post("/commands/run", content=content, headers={"Content-Type": "application/json"})
        assert answer.status_code == 413 and answer.json()["error"] == "too_large", answer.text
    assert server.catalog.command_phases("big-1") == []
    # Within the limit: parsed strictly, 422 naming the field, and run as before.
    for content, field in (
        (b"not json", "body"),
        (b'{"commandId": "d", "commandId": "e", "action": "gc", "target": "all"}', "body"),
        (b'{"commandId": "../x", "action": "gc", "target": "all"}', "commandId"),
        (b'{"commandId": "n", "action": "gc", "target": "all", "params": {"dryRun": NaN}}', "body"),
        (b'{"commandId": "u", "action": "gc", "target": "all", "extra": 1}', "extra"),
        (b"[]", "request"),
    ):
        answer = admin.post("/commands/run", content=content)
        assert answer.status_code == 422 and answer.json()["field"] == field, (content, answer.text)
    answer = admin.post("/commands/run", json={"commandId": "gc-ok", "action": "gc", "target": "all"})
    assert answer.status_code == 202 and answer.json()["commandId"] == "gc-ok", answer.text
    document = admin.get("/openapi.json").json()
    body = document["paths"]["/commands/run"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/CommandRequest"}
    assert set(document["components"]["schemas"]["CommandRequest"]["properties"]) == {
        "commandId",
        "action",
        "target",
        "params",
    }


def _large_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, bytes]:
    """A home whose sources directory holds 20,000 records, the spill directory (`PCBO_SPILL_DIR`)
    and the body of a dry-run of them: a document of a few MB, streamed from its decision spill."""
    spills = tmp_path / "spill"
    spills.mkdir()
    monkeypatch.setenv("PCBO_SPILL_DIR", str(spills))
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    with open(home / "src" / "many.jsonl", "w") as out:
        for i in range(20000):
            at = f"2024-01-{1 + i % 2:02d}T{i % 24:02d}:{i % 60:02d}:00Z"
            record = {"id": f"r{i}", "occurredAt": at, "consentGranted": True}
            out.write(json.dumps(record) + "\n")
    body = _request("spill-1", "spill", source={"uri": "src/many.jsonl"}, end="2024-01-03T00:00:00Z")
    return home, spills, body


def _dry_run_head(token: str, body: bytes) -> bytes:
    return (
        f"POST /v1/dry-run HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()


def test_a_client_that_leaves_a_dry_run_mid_stream_leaves_no_decision_spill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: a dry-run of a file source is streamed from its decision spill (a SQLite
    database on disk, closed when the whole document is written). A client that read part of it
    and hung up left the spill (a file as large as the source's decisions, its connection and page
    cache) in the server for as long as the server ran: a `plan` token doing it again and again
    filled the disk. Now the spill is removed as soon as the stream ends, however it ends."""
    home, spills, body = _large_dry_run(tmp_path, monkeypatch)
    with running_server(home, send_buffer=8192) as running:  # the document is not all sent at once
        token = running.token("reader", "plan")
        head = _dry_run_head(token, body)
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(head + body)
            received = sock.recv(65536)
            while len(received) < 70000 and (more := sock.recv(65536)):
                received += more
            assert received.startswith(b"HTTP/1.1 200"), received[:200]
            assert list(spills.iterdir()), "the dry-run streams from a spill"
        # the client has gone, with most of the document unread
        deadline = time.monotonic() + 30
        while list(spills.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list(spills.iterdir()), list(spills.iterdir())
        # and the next dry-run is answered whole
        with running.client(token) as client:
            answered = client.post("/v1/dry-run", content=body)
        assert answered.status_code == 200 and answered.json()["totals"]["records"] == 20000
        assert not list(spills.iterdir())


def test_a_client_that_stops_reading_its_answer_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: an answer is written as fast as its client reads it, and uvicorn waits for
    ever for a client that reads nothing more. A `plan` token that asked for a large dry-run and then
    read nothing (its connection open) held the stream, its decision spill and a connection slot
    for as long as it liked: `PCBO_SERVER_MAX_CONNECTIONS` such clients, and no one else is
    answered. Now an answer that cannot be written for `PCBO_SERVER_READ_SECONDS` (the client's
    receive window stays full) closes the connection, and the stream ends as for a client that left;
    a client that reads slowly, but reads, is answered whole."""
    home, spills, body = _large_dry_run(tmp_path, monkeypatch)
    with running_server(home, send_buffer=8192, read_seconds=1.0) as running:
        token = running.token("reader", "plan")
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(_dry_run_head(token, body) + body)
            pieces = []
            for _ in range(25):  # 2.5 s at about 40 KiB/s: never the whole answer for 1 s, always some
                pieces.append(sock.recv(4096))
                time.sleep(0.1)
            assert pieces[0].startswith(b"HTTP/1.1 200")
            # still answered past what the kernel's buffers held when it began (about 64 kB here)
            assert all(pieces) and sum(map(len, pieces)) > 90_000, [len(p) for p in pieces]
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(_dry_run_head(token, body) + body)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            assert list(spills.iterdir()), "the dry-run streams from a spill"
            # the client reads nothing more and stays connected
            deadline = time.monotonic() + 15
            while list(spills.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not list(spills.iterdir()), "the stream of a client that reads nothing is ended"
            received, closed = 0, False
            try:  # what the kernel buffered, then the end: the server closed the connection
                while more := sock.recv(65536):
                    received += len(more)
                closed = True
            except ConnectionResetError:
                closed = True
            assert closed and received < 300_000, received  # (the document: about 370 kB)


@pytest.mark.postgres
def test_a_nul_character_in_a_parameter_is_422_naming_it_on_a_postgresql_catalog(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    """Red-team finding: PostgreSQL refuses a NUL character in a text parameter, and a command id or
    an audit page filter went to the catalog as typed: `GET /commands/a%00b` and
    `/reconciliation/audit?target=a%00b` (or `actionType`) were 500 `failed` with the driver's
    message, a traceback in the server's log, and the kept-alive connection dropped. Now each is 422
    naming the parameter, before the catalog is asked."""
    with running_server(tmp_path / "home", catalog_url=fresh_postgres_url) as running:
        with running.client(running.token("reader", "read")) as client:
            answers = {
                "commandId": client.get("/commands/a%00b"),
                "target": client.get("/reconciliation/audit", params={"target": "events/\x00"}),
                "actionType": client.get("/reconciliation/audit", params={"actionType": "commit\x00"}),
            }
            for field, answer in answers.items():
                assert answer.status_code == 422, (field, answer.text)
                assert answer.json()["error"] == "invalid_input" and answer.json()["field"] == field
            assert client.get("/reconciliation/audit", params={"target": "events/"}).status_code == 200
            assert client.get("/commands/no-such-command").status_code == 404


def test_an_unexpected_error_is_logged_in_one_scrubbed_line_and_not_raised_to_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Red-team finding: an error nothing expected (a driver's, a bug) was answered 500 `failed`
    and logged as one scrubbed line, and then Starlette raised it again to the server: uvicorn
    logged its whole traceback, the exception's text unscrubbed (a URL's password in a driver's
    message, the SQL parameters a client typed), and dropped the kept-alive connection. Now the
    answer is the end of it: the app raises nothing to the server."""
    from fastapi.testclient import TestClient

    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster.server.app import create_app
    from pcbo_dagster.server.config import ServerConfig

    app = create_app(ServerConfig.from_environment(Settings.resolve(home=str(tmp_path / "home"), env={}), {}))

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError(
            'could not reach postgresql://pcbo:s3cret@db.internal/pcbo\n{"requestId":"forged","status":200}'
        )

    with TestClient(app) as client:  # raises, as the server would log it, what the app raises
        _, secret = app.state.catalog.create_token("reader", ["read"])
        monkeypatch.setattr(app.state.catalog, "datasets", broken)
        with caplog.at_level(logging.INFO):
            answer = client.get("/v1/datasets", headers={"Authorization": f"Bearer {secret}"})
    assert answer.status_code == 500, answer.text
    assert answer.json() == {"error": "failed", "message": "internal error (RuntimeError)"}
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unexpected")]
    assert logged == [  # one line: a line break in the text would forge a line of the (JSON) log
        'unexpected RuntimeError: could not reach postgresql://[redacted]@db.internal/pcbo {"requestId":'
        '"forged","status":200}'
    ]
    assert "s3cret" not in caplog.text

"""Remote audit delivery end to end (CONTRACT section 6): a real HTTP receiver on 127.0.0.1 that is
first unavailable (answering 503, or not listening at all), then healthy. Events are backed up
before delivery, the chain never breaks, and the receiver ends with every event exactly once, in
seq order, without gaps."""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from pcbo_dagster_tests.cli_runner import (
    backup_events,
    backup_file,
    backup_lines,
    load_generator,
    run_pcbo,
    write_request,
)

pytestmark = pytest.mark.slow

PARTITIONS = 3
FAST_RETRIES = {"PCBO_AUDIT_ATTEMPTS": "2", "PCBO_AUDIT_INITIAL_WAIT": "0.01"}


class Receiver:
    """What the audit endpoint saw: accepted bodies (answered 200) and refused ones (503)."""

    def __init__(self) -> None:
        self.healthy = False
        self.accepted: list[bytes] = []
        self.content_types: list[str | None] = []
        self.refused: list[bytes] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    if receiver.healthy:
                        receiver.accepted.append(body)
                        receiver.content_types.append(self.headers.get("Content-Type"))
                        code = 200
                    else:
                        receiver.refused.append(body)
                        code = 503
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            assert self.thread is not None
            self.thread.join(timeout=10)
            self.server = self.thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/audit/events"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    try:
        yield r
    finally:
        r.stop()


def make_request(run_id: str, extra: bool = False) -> dict[str, Any]:
    request = load_generator().make_request(records=60, partitions=PARTITIONS, seed=3, run_id=run_id)
    if extra:
        request["sourceRecords"].append(
            {
                "id": "zz-late-0001",
                "occurredAt": "2024-01-01T01:30:00Z",
                "jurisdiction": "CA",
                "consentGranted": True,
                "retentionExpiresAt": "2026-01-01T00:00:00Z",
                "amount": 3,
                "channel": "app",
                "converted": False,
            }
        )
    return request


def independent_event_hash(event: dict[str, Any]) -> str:
    stripped = copy.deepcopy(event)
    del stripped["chain"]["event_hash"]
    return "sha256:" + hashlib.sha256(rfc8785.dumps(stripped)).hexdigest()


def _execute(home: Path, request_file: Path, endpoint: str) -> dict[str, Any]:
    status, document, stderr = run_pcbo(
        ["execute", "--input", request_file], home=home, env={"PCBO_AUDIT_ENDPOINT": endpoint, **FAST_RETRIES}
    )
    assert status == 0, stderr
    return document


@pytest.mark.parametrize("outage", ["answers_503", "not_listening"])
def test_events_wait_for_the_endpoint_then_arrive_in_order_exactly_once(tmp_path, receiver, outage):
    home = tmp_path / "home"
    first_request = write_request(tmp_path / "first.json", make_request("audit-run-001"))
    second_request = write_request(tmp_path / "second.json", make_request("audit-run-002", extra=True))
    if outage == "not_listening":
        receiver.stop()  # keep the port: nothing listens there during the first execute

    # 1. endpoint unavailable: execute still succeeds, every event stays pending, chain intact
    document = _execute(home, first_request, receiver.url)
    delivery = document["auditDelivery"]
    assert delivery["chainKey"] == "events/v1"
    assert delivery["delivered"] == 0 and delivery["pending"] == len(backup_lines(home))
    assert delivery["lastDeliveredSeq"] is None and delivery["lastError"]
    assert receiver.accepted == []
    if outage == "answers_503":
        # retried (2 attempts), and never past the first undelivered event
        assert [json.loads(b)["chain"]["seq"] for b in receiver.refused] == [0, 0]
    assert len(backup_events(home)) == PARTITIONS, "events must be backed up whatever the endpoint does"
    assert len(backup_lines(home)) == PARTITIONS + 1, "with the batch's commit intent"
    status, verified, stderr = run_pcbo(["verify"], home=home)
    assert status == 0 and verified["status"] == "clean", (stderr, verified)

    # 2. endpoint healthy: a second execute delivers the backlog and its own event
    if outage == "not_listening":
        receiver.start()
    receiver.healthy = True
    document = _execute(home, second_request, receiver.url)
    assert [p["status"] for p in document["partitions"]] == ["unchanged", "committed", "unchanged"]
    lines = backup_lines(home)
    assert len(backup_events(home)) == PARTITIONS + 1 and len(lines) == PARTITIONS + 3
    delivery = document["auditDelivery"]
    assert delivery["delivered"] == len(lines) and delivery["pending"] == 0
    assert delivery["lastDeliveredSeq"] == len(lines) - 1 and delivery["lastError"] is None

    # 3. the receiver holds every backed-up event, byte for byte, in seq order, and they verify
    with receiver.lock:
        accepted = list(receiver.accepted)
    assert accepted == lines
    assert set(receiver.content_types) == {"application/json"}
    prev = None
    for seq, body in enumerate(accepted):
        event = json.loads(body)
        assert event["chain"]["chain_key"] == "events/v1"
        assert event["chain"]["seq"] == seq
        assert event["chain"]["prev_event_hash"] == prev
        assert event["chain"]["event_hash"] == independent_event_hash(event)
        prev = event["chain"]["event_hash"]
    cursor = json.loads(backup_file(home).with_suffix(".delivered").read_bytes())
    assert cursor == {"chain_key": "events/v1", "seq": len(lines) - 1, "event_hash": prev}

    # 4. nothing new: nothing is sent again
    document = _execute(home, second_request, receiver.url)
    assert document["status"] == "unchanged"
    assert document["auditDelivery"]["delivered"] == 0 and document["auditDelivery"]["pending"] == 0
    with receiver.lock:
        assert receiver.accepted == accepted

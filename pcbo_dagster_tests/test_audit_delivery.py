"""Remote delivery of PAS events against a real HTTP receiver on loopback."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading

import pytest
import rfc8785

from pcbo_dagster.audit import AuditBackup, AuditLog, HttpDelivery, read_cursor
from pcbo_dagster.core.audit_chain import verify_chain
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster_tests.loopback import RecordingReceiver
from pcbo_dagster_tests.test_audit_backup_and_log import FixedClock

KEY = "events/v1"


class Receiver(RecordingReceiver):
    """A loopback PAS receiver (`RecordingReceiver`, failing with 503, a redirect to /elsewhere):
    `accept_budget` (when not None) accepts that many more, then fails; otherwise 200 (the body is
    kept in `accepted`)."""

    path = "/pas/events"

    def __init__(self) -> None:
        super().__init__(fail_status=503, location="/elsewhere")
        self.accepted: list[bytes] = []
        self.accept_budget: int | None = None

    def accept(self, body: bytes) -> int:
        if self.accept_budget is not None:
            if self.accept_budget <= 0:
                return 503
            self.accept_budget -= 1
        self.accepted.append(body)
        return 200

    def accepted_seqs(self) -> list[int]:
        return [json.loads(b)["chain"]["seq"] for b in self.accepted]

    def request_seqs(self) -> list[int]:
        return [json.loads(r["body"])["chain"]["seq"] for r in self.requests]


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.close()


def fast(endpoint: str, attempts: int = 3) -> HttpDelivery:
    return HttpDelivery(endpoint, attempts=attempts, initial_wait=0.01, max_wait=0.02, timeout=5.0)


def test_events_wait_while_down_then_deliver_in_order(tmp_path, receiver):
    receiver.down = True
    log = AuditLog(AuditBackup(tmp_path), delivery=fast(receiver.url), clock=FixedClock())
    events = []
    for i in range(3):
        events.append(log.append(KEY, "partition_committed", {"n": i}))
        report = log.deliver_pending(KEY)
        assert report is not None
        assert (report.delivered, report.pending, report.last_delivered_seq) == (0, i + 1, None)
        assert "HTTP 503" in report.last_error and not report.ok
    # Each call retried the first pending event 3 times and never skipped ahead.
    assert receiver.request_seqs() == [0] * 9
    assert receiver.accepted == []
    assert verify_chain(log.backup.read_chain(KEY), KEY) == []
    assert read_cursor(log.backup, KEY) is None

    receiver.down = False
    report = log.deliver_pending(KEY)
    assert (report.delivered, report.pending, report.last_delivered_seq, report.last_error) == (3, 0, 2, None)
    assert report.ok
    assert receiver.accepted == [rfc8785.dumps(e) for e in events]
    assert read_cursor(log.backup, KEY) == (2, events[2]["chain"]["event_hash"])

    events += [log.append(KEY, "partition_committed", {"n": i}) for i in (3, 4)]
    report = log.deliver_pending(KEY)
    assert (report.delivered, report.pending) == (2, 0)
    assert receiver.accepted_seqs() == [0, 1, 2, 3, 4]
    assert log.deliver_pending(KEY).delivered == 0  # nothing left: no request sent
    assert receiver.accepted_seqs() == [0, 1, 2, 3, 4]
    assert verify_chain([json.loads(b) for b in receiver.accepted], KEY) == []
    request = receiver.requests[-1]
    assert request["path"] == "/pas/events"
    assert request["headers"]["Content-Type"] == "application/json"


def test_transient_failures_are_retried(tmp_path, receiver):
    log = AuditLog(AuditBackup(tmp_path), delivery=fast(receiver.url, attempts=3))
    log.append(KEY, "a", {})
    receiver.fail_next = 2
    report = log.deliver_pending(KEY)
    assert (report.delivered, report.pending, report.last_error) == (1, 0, None)
    assert [r["status"] for r in receiver.requests] == [503, 503, 200]


def test_retries_stop_after_the_configured_attempts(tmp_path, receiver):
    log = AuditLog(AuditBackup(tmp_path), delivery=fast(receiver.url, attempts=4))
    log.append(KEY, "a", {})
    receiver.fail_status = 429
    receiver.fail_next = 10
    report = log.deliver_pending(KEY)
    assert (report.delivered, report.pending) == (0, 1)
    assert "HTTP 429" in report.last_error
    assert len(receiver.requests) == 4


def test_failure_mid_chain_resumes_without_gaps_or_duplicates(tmp_path, receiver):
    log = AuditLog(AuditBackup(tmp_path), delivery=fast(receiver.url, attempts=2), clock=FixedClock())
    for i in range(5):
        log.append(KEY, "a", {"n": i})
    receiver.accept_budget = 2
    report = log.deliver_pending(KEY)
    assert (report.delivered, report.pending, report.last_delivered_seq) == (2, 3, 1)
    assert receiver.request_seqs() == [0, 1, 2, 2]
    receiver.accept_budget = None
    # A new delivery object (a new process) resumes from the persisted cursor.
    resumed = HttpDelivery(receiver.url, attempts=2, initial_wait=0.01)
    report = resumed.deliver_pending(AuditBackup(tmp_path), KEY)
    assert (report.delivered, report.pending, report.last_delivered_seq) == (3, 0, 4)
    assert receiver.accepted_seqs() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("status", [400, 404, 302])
def test_permanent_answers_are_not_retried_and_redirects_not_followed(tmp_path, receiver, status):
    log = AuditLog(AuditBackup(tmp_path), delivery=fast(receiver.url, attempts=3))
    log.append(KEY, "a", {})
    receiver.down = True
    receiver.fail_status = status
    report = log.deliver_pending(KEY)
    assert (report.delivered, report.pending) == (0, 1)
    assert f"HTTP {status}" in report.last_error
    assert len(receiver.requests) == 1
    assert all(r["path"] == "/pas/events" for r in receiver.requests)


def test_closed_port_leaves_events_pending(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = AuditLog(AuditBackup(tmp_path), delivery=fast(f"http://127.0.0.1:{port}/pas"))
    log.append(KEY, "a", {})
    log.append(KEY, "a", {})
    report = log.deliver_pending(KEY)
    assert (report.delivered, report.pending, report.last_delivered_seq) == (0, 2, None)
    assert "connection failed" in report.last_error
    assert verify_chain(log.backup.read_chain(KEY), KEY) == []
    log.append(KEY, "a", {})  # appends go on regardless
    assert log.deliver_pending(KEY).pending == 3


def test_credentials_never_appear_in_reports_or_logs(tmp_path, receiver, caplog):
    caplog.set_level(logging.DEBUG)
    host, port = receiver.server.server_address[:2]
    endpoint = f"http://pas-writer:s3cr3t-p%40ss@{host}:{port}/pas/events?token=tok-abc123&x=1"
    delivery = HttpDelivery(endpoint, attempts=2, initial_wait=0.01, headers={"X-Api-Key": "header-key-777"})
    log = AuditLog(AuditBackup(tmp_path), delivery=delivery)
    log.append(KEY, "a", {})
    receiver.down = True
    failed = log.deliver_pending(KEY)
    assert failed.pending == 1 and failed.last_error
    receiver.down = False
    ok = log.deliver_pending(KEY)
    assert ok.delivered == 1
    secrets = [
        "s3cr3t",
        "p%40ss",
        "p@ss",
        "tok-abc123",
        "token=",
        "pas-writer:",
        "header-key-777",
        base64.b64encode(b"pas-writer:s3cr3t-p@ss").decode(),
    ]
    visible = " ".join(
        [caplog.text, repr(failed), repr(ok), str(failed.to_dict()), repr(delivery), delivery.endpoint]
    )
    assert "retrying" in caplog.text  # the retry was logged ...
    for secret in secrets:
        assert secret not in visible, secret  # ... without any secret
    assert failed.endpoint == f"http://{host}:{port}/pas/events?[redacted]"
    # The credentials are still used: HTTP Basic, the query string and the extra header are sent.
    sent = receiver.requests[-1]
    assert sent["path"] == "/pas/events?token=tok-abc123&x=1"
    assert sent["headers"]["Authorization"] == "Basic " + base64.b64encode(b"pas-writer:s3cr3t-p@ss").decode()
    assert sent["headers"]["X-Api-Key"] == "header-key-777"


def test_redact_url():
    assert redact_url("https://u:p@example.com:8443/a/b?k=v#f") == "https://example.com:8443/a/b?[redacted]"
    assert redact_url("http://example.com") == "http://example.com"
    with pytest.raises(ValueError, match="http"):
        HttpDelivery("ftp://user:secretpw@example.com/x")
    with pytest.raises(ValueError) as info:
        HttpDelivery("http://user:secretpw@example.com:notaport/x")
    assert "secretpw" not in str(info.value)


def test_a_broken_local_chain_is_not_delivered_past_the_break(tmp_path, receiver):
    backup = AuditBackup(tmp_path)
    log = AuditLog(backup, delivery=fast(receiver.url), clock=FixedClock())
    for i in range(4):
        log.append(KEY, "a", {"n": i})
    path = backup.paths(KEY).events
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"n":2', b'"n":9')  # tampered after the fact
    path.write_bytes(b"".join(lines))
    report = log.deliver_pending(KEY)
    assert (report.delivered, report.pending, report.last_delivered_seq) == (2, 2, 1)
    assert "broken at position 2" in report.last_error
    assert receiver.accepted_seqs() == [0, 1]


def test_a_cursor_that_does_not_match_the_backup_is_not_trusted(tmp_path, receiver):
    """Without a key too: a cursor naming no event the backup holds, or no cursor at all, is reported
    and delivery starts again from seq 0 (before 2026-12-07 it stopped delivery for good)."""
    backup = AuditBackup(tmp_path)
    log = AuditLog(backup, delivery=fast(receiver.url))
    log.append(KEY, "a", {})
    log.append(KEY, "a", {})
    wrong = {"chain_key": KEY, "seq": 0, "event_hash": "sha256:" + "0" * 64}
    backup.paths(KEY).delivered.write_text(json.dumps(wrong))
    report = log.deliver_pending(KEY)
    assert (report.delivered, report.pending, report.last_error) == (2, 0, None)
    assert "names no event the audit backup holds" in report.cursor_rejected
    backup.paths(KEY).delivered.write_text("{oops")
    report = log.deliver_pending(KEY)
    assert report.delivered == 2 and "not JSON" in report.cursor_rejected
    assert receiver.accepted_seqs() == [0, 1, 0, 1]
    assert log.deliver_pending(KEY).cursor_rejected is None


def test_concurrent_deliverers_never_duplicate_or_reorder(tmp_path, receiver):
    log = AuditLog(AuditBackup(tmp_path), clock=FixedClock())
    for i in range(20):
        log.append(KEY, "a", {"n": i})
    reports = []

    def deliver() -> None:
        reports.append(fast(receiver.url).deliver_pending(AuditBackup(tmp_path), KEY))

    threads = [threading.Thread(target=deliver) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.delivered for r in reports) == 20
    assert receiver.accepted_seqs() == list(range(20))


def test_no_delivery_configured(tmp_path):
    log = AuditLog(AuditBackup(tmp_path))
    log.append(KEY, "a", {})
    assert log.deliver_pending(KEY) is None


def _first_copies(receiver: Receiver) -> list[int]:
    """The seqs the receiver got, each at its first copy (receivers deduplicate: at least once)."""
    seen: list[int] = []
    for seq in receiver.accepted_seqs():
        if seq not in seen:
            seen.append(seq)
    return seen


def _cursor(key: str, seq: int, digest: str, **extra: str) -> bytes:
    return rfc8785.dumps({"chain_key": key, "seq": seq, "event_hash": digest, **extra})


@pytest.mark.parametrize(
    "tamper",
    [
        "ahead",
        "ahead_with_an_older_signature",
        "forged_hash",
        "another_chains",
        "another_chains_signed",
        "garbage",
        "signed_by_another_key",
        "older_signed",
        "unsigned_older",
    ],
)
def test_a_tampered_delivery_cursor_never_skips_an_event(tmp_path, receiver, caplog, tamper):
    """Someone who can write the audit backup moves the delivery cursor: with the operator's key every
    cursor delivery writes is signed over (chain key, seq, event hash), and one that is not trusted
    makes delivery start again from seq 0 (at least once), never skip an event; it is reported."""
    from pcbo_dagster.core.signed_note import new_signing_key

    key = new_signing_key("ops.example/operator")
    backup = AuditBackup(tmp_path)
    log = AuditLog(backup, delivery=fast(receiver.url), clock=FixedClock(), signing_key=key)
    other = "other/v1"
    for i in range(6):
        log.append(other, "a", {"n": i})
    assert log.deliver_pending(other).delivered == 6
    first = [log.append(KEY, "a", {"n": 0})]
    assert log.deliver_pending(KEY).delivered == 1
    older_signed = backup.paths(KEY).delivered.read_bytes()  # the cursor at seq 0
    first += [log.append(KEY, "a", {"n": i}) for i in (1, 2)]
    assert log.deliver_pending(KEY).delivered == 2
    receiver.accepted.clear()
    receiver.requests.clear()
    events = first + [log.append(KEY, "a", {"n": i}) for i in range(3, 6)]
    hashes = [e["chain"]["event_hash"] for e in events]
    signed_other = json.loads(backup.paths(other).delivered.read_bytes())
    signature_at_0 = json.loads(older_signed).get("operator_signature", "")
    stranger = new_signing_key("ops.example/operator")
    stranger_log = AuditLog(
        AuditBackup(tmp_path / "stranger"), delivery=fast(receiver.url), signing_key=stranger
    )
    for i in range(6):
        stranger_log.append(KEY, "a", {"n": i})
    forged = {
        "ahead": _cursor(KEY, 4, hashes[4]),
        "ahead_with_an_older_signature": _cursor(KEY, 4, hashes[4], operator_signature=signature_at_0),
        "forged_hash": _cursor(KEY, 4, "sha256:" + "0" * 64),
        "another_chains": _cursor(other, 5, signed_other["event_hash"]),
        "another_chains_signed": rfc8785.dumps({**signed_other, "chain_key": KEY}),
        "garbage": b"{oops",
        "signed_by_another_key": b"",
        "older_signed": older_signed,
        "unsigned_older": _cursor(KEY, 0, hashes[0]),
    }[tamper]
    if tamper == "signed_by_another_key":
        assert stranger_log.deliver_pending(KEY).delivered == 6
        stranger_cursor = json.loads((tmp_path / "stranger" / "events" / "v1.delivered").read_bytes())
        forged = rfc8785.dumps({**stranger_cursor, "event_hash": hashes[4]})
        receiver.accepted.clear()
        receiver.requests.clear()
    backup.paths(KEY).delivered.write_bytes(forged)
    caplog.set_level(logging.WARNING, logger="pcbo_dagster.audit.delivery")
    report = log.deliver_pending(KEY)
    trusted = tamper == "older_signed"
    # every event reaches the receiver, in seq order (replayed ones again: receivers deduplicate)
    assert _first_copies(receiver) == (list(range(1, 6)) if trusted else list(range(6)))
    assert report.ok, report
    assert (report.cursor_rejected is None) is trusted, report
    if not trusted:
        assert "delivery cursor" in report.cursor_rejected and "seq 0" in report.cursor_rejected
        assert report.to_dict()["cursorRejected"] == report.cursor_rejected
        assert any("delivery cursor" in r.getMessage() for r in caplog.records)
    assert receiver.accepted_seqs() == sorted(receiver.accepted_seqs())
    assert [json.loads(b) for b in receiver.accepted][-1] == events[-1]
    assert read_cursor(backup, KEY) == (5, hashes[5])
    # the cursor delivery writes is signed by the operator's key, over this chain and place
    assert json.loads(backup.paths(KEY).delivered.read_bytes())["operator_signature"].startswith(
        "pcbo.delivered/v1\n"
    )

"""`pcbo witness serve`: every answer of c2sp.org/tlog-witness `add-checkpoint`, over real HTTP on
loopback, and the monitoring `GET /<origin hash>/checkpoint`."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import select
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pcbo_dagster.core import merkle
from pcbo_dagster.core.checkpoints import Checkpoint, add_checkpoint_body
from pcbo_dagster.core.signed_note import (
    COSIGNATURE_V1,
    NoteSignature,
    new_signing_key,
    parse_note,
    parse_signature_lines,
    verify_cosignatures,
)
from pcbo_dagster.witness.server import LogKey, Witness, make_server
from pcbo_dagster_tests.cli_runner import pcbo_env
from pcbo_dagster_tests.loopback import serving

LEAVES = [f"event {i}".encode() for i in range(12)]
LOG = new_signing_key("ops.example/operator")
OTHER_LOG = new_signing_key("ops.example/someone-else")
WITNESS = new_signing_key("witness.example/w1")


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    witness = Witness(
        WITNESS,
        str(tmp_path / "w.db"),
        [LogKey("pcbo/", LOG.verifier()), LogKey("pcbo/tenant-b/", OTHER_LOG.verifier())],
        clock=lambda: 1700000000,
    )
    with serving(make_server(witness, "127.0.0.1", 0)) as served_url:
        yield served_url


def _note(size: int, leaves: list[bytes] = LEAVES, key=LOG, origin: str = "pcbo/events/v1") -> str:
    return Checkpoint(origin, size, merkle.MerkleTree(leaves[:size]).root).sign(key).render()


def _post(url: str, old: int, proof: list[bytes], note: str) -> tuple[int, str, str]:
    request = urllib.request.Request(
        url + "/add-checkpoint", data=add_checkpoint_body(old, proof, note), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_the_witness_answers_as_the_protocol_says(url: str) -> None:
    status, _, body = _post(url, 0, [], _note(5))
    assert status == 200
    cosigned = parse_note(_note(5)).with_signatures([parse_note(_note(5) + body).signatures[-1]])
    assert verify_cosignatures(cosigned, [WITNESS.verifier(COSIGNATURE_V1)]) == {
        WITNESS.verifier(COSIGNATURE_V1).text: 1700000000
    }
    # 409: an old size that is not the one it holds, with that size as text/x.tlog.size
    assert _post(url, 0, [], _note(8))[:3] == (409, "text/x.tlog.size", "5\n")
    # 200: consistent from 5 to 8
    proof = merkle.consistency_proof(LEAVES[:8], 5)
    assert _post(url, 5, proof, _note(8))[0] == 200
    # 422: a proof that does not verify (history rewritten), at a larger size
    rewritten = [b"forged", *LEAVES[1:]]
    bad = merkle.consistency_proof(rewritten[:10], 8)
    assert _post(url, 8, bad, _note(10, rewritten))[0] == 422
    # 422 (c2sp.org/tlog-witness since C2SP/C2SP#280: "If the old size matches the checkpoint size, the
    # witness MUST check that the root hashes are also identical. If they don't match, the witness MUST
    # respond with a "422 Unprocessable Entity""; it was 409, a retry-from-this-size answer that every
    # other 409 is): the same size, another root
    status, _, text = _post(url, 8, [], _note(8, rewritten))
    assert status == 422 and "history was rewritten" in text
    # 422: the same size and root, with a proof (none verifies from a size to itself)
    assert _post(url, 8, proof[:1], _note(8))[0] == 422
    # 400: never backwards (old size above the checkpoint's)
    assert _post(url, 8, [], _note(6))[0] == 400
    # 403: not signed by a log key it trusts; 404: an origin it does not witness
    assert _post(url, 8, merkle.consistency_proof(LEAVES[:10], 8), _note(10, key=OTHER_LOG))[0] == 403
    assert _post(url, 0, [], _note(3, origin="elsewhere/log"))[0] == 404
    # 422: a non-empty proof from size 0 (a new origin)
    assert _post(url, 0, [LEAVES[0].ljust(32, b"x")], _note(3, origin="pcbo/other/v1"))[0] == 422
    # 400: malformed
    request = urllib.request.Request(url + "/add-checkpoint", data=b"old x\n\n", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=10)
    assert exc.value.code == 400
    # The monitoring endpoint serves the latest cosigned checkpoint (size 8, with both signatures).
    origin_hash = hashlib.sha256(b"pcbo/events/v1").hexdigest()
    with urllib.request.urlopen(f"{url}/{origin_hash}/checkpoint", timeout=10) as answer:
        latest = parse_note(answer.read())
    assert latest.text == parse_note(_note(8)).text and len(latest.signatures) == 2


def test_a_log_key_counts_only_for_the_origins_it_is_bound_to(url: str) -> None:
    """c2sp.org/tlog-witness: a checkpoint verifies under the key of *its* log. Tenant B's key, trusted
    for pcbo/tenant-b/..., can neither fork nor extend pcbo/events/v1 (nor start a log under it)."""
    assert _post(url, 0, [], _note(5))[0] == 200
    extended = merkle.consistency_proof(LEAVES[:8], 5)
    assert _post(url, 5, extended, _note(8, key=OTHER_LOG))[0] == 403  # B extending A's log
    assert _post(url, 0, [], _note(3, key=OTHER_LOG, origin="pcbo/new/v1"))[0] == 403  # B's new log under A
    # A look-alike origin is no log of either prefix; B's own logs are witnessed, and A's key does not
    # count for them.
    assert _post(url, 0, [], _note(3, key=OTHER_LOG, origin="pcbo/tenant-b/events/v1/x"))[0] == 404
    assert _post(url, 0, [], _note(3, key=LOG, origin="pcbo/tenant-b/events/v1"))[0] == 403
    assert _post(url, 0, [], _note(3, key=OTHER_LOG, origin="pcbo/tenant-b/events/v1"))[0] == 200
    assert _post(url, 5, extended, _note(8))[0] == 200  # A's log still moves on with A's key


@pytest.mark.parametrize(
    "prefixes",
    [("pcbo/", "pcbo/"), ("pcbo/", "pcbo/a"), ("pcbo-", "pcbo-b")],
)
def test_two_log_keys_are_never_bound_to_one_origin(tmp_path: Path, prefixes: tuple[str, str]) -> None:
    logs = [LogKey(prefixes[0], LOG.verifier()), LogKey(prefixes[1], OTHER_LOG.verifier())]
    with pytest.raises(ValueError, match="bind each log key"):
        Witness(WITNESS, str(tmp_path / "w.db"), logs)


@pytest.mark.parametrize(
    ("log_keys", "said"),
    [
        # two bare --log-keys would both be bound to pcbo/
        ([LOG.verifier().text, OTHER_LOG.verifier().text], "bound to two log keys"),
        # a cosigner (type 0x04) key verifies no checkpoint: the witness started and answered 403 to
        # every request of its log
        ([LOG.verifier(COSIGNATURE_V1).text], "not a log's (type 0x01) verifier key"),
        # its own key: the witness started and cosigned checkpoints it could sign itself
        ([WITNESS.verifier().text], "the witness's own key"),
    ],
    ids=["one-origin-two-keys", "cosigner-key", "own-key"],
)
def test_witness_serve_refuses_log_keys_it_cannot_hold(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    log_keys: list[str],
    said: str,
) -> None:
    """Log keys the witness cannot hold are refused (exit 2 naming --log-key) before it listens or makes
    its database."""
    from pcbo_dagster.cli import main as cli
    from pcbo_dagster.witness import server

    def listen(*args: object) -> None:
        raise AssertionError("the witness would listen with log keys it cannot hold")

    monkeypatch.setattr(server, "make_server", listen)
    key_file = tmp_path / "witness.key"
    key_file.write_text(WITNESS.text + "\n")
    key_file.chmod(0o600)
    common = ["witness", "serve", "--key", str(key_file), "--db", str(tmp_path / "w.db"), "--port", "0"]
    assert cli.main([*common, *(a for key in log_keys for a in ("--log-key", key))]) == 2
    err = capsys.readouterr().err
    assert "invalid input: --log-key: " in err and said in err, err
    assert not (tmp_path / "w.db").exists()


@pytest.mark.parametrize("kind", ["not_sqlite", "directory"])
def test_witness_serve_refuses_a_db_that_is_no_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """--db naming a file that is not SQLite, or a directory: an internal error (DatabaseError: file is
    not a database; OperationalError: unable to open database file). Now exit 2 on --db, nothing
    written to it."""
    from pcbo_dagster.cli import main as cli
    from pcbo_dagster.witness import server

    def listen(*args: object) -> None:
        raise AssertionError("the witness would listen without its state")

    monkeypatch.setattr(server, "make_server", listen)
    key_file = tmp_path / "witness.key"
    key_file.write_text(WITNESS.text + "\n")
    key_file.chmod(0o600)
    db = tmp_path / "w.db"
    if kind == "directory":
        db.mkdir()
    else:
        db.write_bytes(b"not a SQLite file, but long enough to be read as one's header" * 4)
    before = sorted(p.name for p in tmp_path.iterdir())
    common = ["witness", "serve", "--key", str(key_file), "--db", str(db), "--port", "0"]
    assert cli.main([*common, "--log-key", LOG.verifier().text]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"POST /add-checkpoint HTTP/1.1\r\n",
        b"POST /add-checkpoint HTTP/1.1\r\nContent-Length: 100\r\n\r\nold 0\n",
    ],
)
def test_a_client_that_stops_sending_is_dropped(tmp_path: Path, sent: bytes) -> None:
    """A connection that sends nothing, or a request cut short (headers or body), held its thread for
    ever: a witness had no time limit on a request, so enough such connections exhausted it. Now each
    read waits at most the server's timeout, and the connection is then closed (no traceback)."""
    witness = Witness(WITNESS, str(tmp_path / "w.db"), [LogKey("pcbo/", LOG.verifier())])
    server = make_server(witness, "127.0.0.1", 0, timeout=0.5)
    with serving(server):
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as conn:
            conn.sendall(sent)
            started = time.monotonic()
            while conn.recv(4096):  # (an answer first, e.g. 408, is fine: then the close)
                pass
            assert time.monotonic() - started < 5


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Starts `pcbo witness serve` processes on one `--db` (each call: one more, its URL returned;
    `start.kill()` kills the ones running with SIGKILL; `start.db` is the database)."""
    key_file = tmp_path / "w.key"
    key_file.write_text(WITNESS.text + "\n")
    key_file.chmod(0o600)
    processes: list[subprocess.Popen[str]] = []

    def start() -> str:
        args = ["witness", "serve", "--key", str(key_file), "--db", str(tmp_path / "w.db"), "--port", "0"]
        process = subprocess.Popen(
            [sys.executable, "-m", "pcbo_dagster.cli.main", *args, "--log-key", LOG.verifier().text],
            env=pcbo_env(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        processes.append(process)
        assert process.stdout is not None
        return str(json.loads(process.stdout.readline())["listening"])

    def kill() -> None:
        for process in processes:
            process.kill()
            process.wait(timeout=30)

    start.kill = kill  # type: ignore[attr-defined]
    start.db = str(tmp_path / "w.db")  # type: ignore[attr-defined]
    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def _together(calls: list[Callable[[], tuple[int, str, str]]]) -> list[tuple[int, str, str]]:
    """The answers of `calls`, each made in its own thread, all released at once."""
    answers: list[tuple[int, str, str]] = [(0, "", "")] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        answers[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@pytest.mark.parametrize("processes", [1, 2])
def test_racing_requests_never_get_two_histories_cosigned(served, processes: int) -> None:
    """Two add-checkpoint requests from the size the witness holds, released together, carry two forks
    of one log (each with a valid proof from that size, signed by the log's key), to one witness
    process or to two on one state database. Whatever the interleaving, one is cosigned and the other
    answered 409 with the winner's size: never two histories, never a roll back."""
    urls = [served() for _ in range(processes)]
    other = [f"fork {i}".encode() for i in range(12)]
    for round_ in range(40):
        origin = f"pcbo/race{round_}/v1"
        assert _post(urls[0], 0, [], _note(5, origin=origin))[0] == 200
        forks = [LEAVES[:8], LEAVES[:5] + other[5 : 6 + round_ % 4]]
        bodies = [(5, merkle.consistency_proof(f, 5), _note(len(f), f, origin=origin)) for f in forks]
        answers = _together([functools.partial(_post, urls[i % processes], *bodies[i]) for i in range(2)])
        statuses = sorted(a[0] for a in answers)
        assert statuses == [200, 409], answers
        winner = len(forks[[a[0] for a in answers].index(200)])
        assert next(a for a in answers if a[0] == 409)[1:] == ("text/x.tlog.size", f"{winner}\n")


def test_the_served_checkpoint_holds_only_the_signatures_the_witness_verified(served) -> None:
    """c2sp.org/tlog-witness: the checkpoint a witness serves holds its cosignature and "the cosignature
    from the log key(s) that the witness verified". The witness stored the request's note with every
    line, so a log operator could add a line in another witness's name (and key id) that does not
    verify: a monitor checking the served checkpoint against the witnesses it trusts must reject that
    note, so the witness's view was hidden from monitors. Now it stores and serves only the log key's
    verified signatures and its own cosignature (as transparency-dev/witness does)."""
    url = served()
    w2 = new_signing_key("witness.example/w2")
    note = parse_note(_note(5))
    bogus = NoteSignature(w2.name, w2.verifier(COSIGNATURE_V1).key_id, bytes(72))
    unknown = NoteSignature("someone.example/k", b"\0\0\0\0", bytes(64))
    twice = note.render() + note.signatures[0].line  # (the log's line twice: kept once)
    status, _, body = _post(url, 0, [], parse_note(twice).with_signatures([bogus, unknown]).render())
    assert status == 200
    origin_hash = hashlib.sha256(b"pcbo/events/v1").hexdigest()
    with urllib.request.urlopen(f"{url}/{origin_hash}/checkpoint", timeout=10) as answer:
        latest = parse_note(answer.read())
    assert latest == note.with_signatures(parse_signature_lines(body))
    witnesses = [WITNESS.verifier(COSIGNATURE_V1), w2.verifier(COSIGNATURE_V1)]
    assert list(verify_cosignatures(latest, witnesses)) == [WITNESS.verifier(COSIGNATURE_V1).text]


def test_a_client_that_trickles_its_request_is_dropped_at_the_deadline(tmp_path: Path) -> None:
    """Each read waited at most the server's timeout, but a whole request had no limit: a client sending
    one byte of its headers now and then (slowloris) held its thread for as long as it liked, so enough
    such connections exhausted the witness. Now a request must arrive whole within the timeout."""
    witness = Witness(WITNESS, str(tmp_path / "w.db"), [LogKey("pcbo/", LOG.verifier())])
    server = make_server(witness, "127.0.0.1", 0, timeout=0.5)
    with serving(server):
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as conn:
            conn.sendall(b"POST /add-checkpoint HTTP/1.1\r\nX-Slow: ")
            started = time.monotonic()
            dropped = False
            while not dropped and time.monotonic() - started < 5:
                time.sleep(0.1)
                try:
                    conn.sendall(b"a")
                except OSError:
                    break
                dropped = bool(select.select([conn], [], [], 0)[0])  # (an answer, e.g. 408, or the close)
            assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "head",
    [
        b"POST /add-checkpoint HTTP/1.1\r\nHost: w\r\nContent-Length: 70000\r\n\r\n",
        b"POST /add-checkpoint HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /elsewhere HTTP/1.1\r\nHost: w\r\nContent-Length: 80\r\n\r\n",
        b"GET /" + b"0" * 64 + b"/checkpoint HTTP/1.1\r\nHost: w\r\nContent-Length: 80\r\n\r\n",
    ],
)
def test_the_body_of_a_request_answered_unread_is_never_read_as_the_next_request(
    tmp_path: Path, head: bytes
) -> None:
    """A request refused before its body was read (too large, not framed by Content-Length, another
    path, a GET with a body) left the connection open, so its body was read as the next request on
    it: one request, two answers (a desync a bastion in front of the witness would pass on to other
    clients). Now such a connection is closed after the one answer."""
    witness = Witness(WITNESS, str(tmp_path / "w.db"), [LogKey("pcbo/", LOG.verifier())])
    server = make_server(witness, "127.0.0.1", 0, timeout=2)
    with serving(server):
        smuggled = b"GET /" + b"1" * 64 + b"/checkpoint HTTP/1.1\r\nHost: w\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as conn:
            conn.sendall(head + smuggled)
            received = b""
            while True:
                try:
                    chunk = conn.recv(4096)
                except ConnectionResetError:  # (the server closed with the body unread: after its answer)
                    break
                if not chunk:
                    break
                received += chunk
        assert received.count(b"HTTP/1.1 ") == 1, received
        assert b"Connection: close" in received


def test_what_a_killed_witness_cosigned_binds_it_after_a_restart(served) -> None:
    """The new state is committed before the cosignature is answered: a witness killed (SIGKILL) right
    after answering 200 for size 8 still holds 8 when it starts again, so it refuses a fork of size 8,
    a request from the size it held before (409 naming 8), and a smaller tree (400)."""
    url = served()
    assert _post(url, 0, [], _note(5))[0] == 200
    assert _post(url, 5, merkle.consistency_proof(LEAVES[:8], 5), _note(8))[0] == 200
    served.kill()
    url = served()
    fork = [*LEAVES[:5], *(f"fork {i}".encode() for i in range(5, 12))]
    assert _post(url, 8, [], _note(8, fork))[0] == 422
    assert _post(url, 5, merkle.consistency_proof(fork[:9], 5), _note(9, fork))[:3] == (
        409,
        "text/x.tlog.size",
        "8\n",
    )
    assert _post(url, 8, [], _note(6))[0] == 400
    assert _post(url, 8, merkle.consistency_proof(fork[:10], 8), _note(10, fork))[0] == 422
    assert _post(url, 8, merkle.consistency_proof(LEAVES[:10], 8), _note(10))[0] == 200


def test_a_flood_of_connections_is_answered_503_past_the_limit(tmp_path: Path) -> None:
    """The witness started a thread for every connection it accepted, without limit: a flood of
    connections (each held up to the request timeout) made it start threads without end. Now past
    `max_connections` at once a connection is answered 503 and closed at once, and once the held ones
    go, requests are served again."""
    witness = Witness(WITNESS, str(tmp_path / "w.db"), [LogKey("pcbo/", LOG.verifier())])
    server = make_server(witness, "127.0.0.1", 0, timeout=5, max_connections=4)
    with serving(server) as url:
        before = threading.active_count()
        held = [
            socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) for _ in range(12)
        ]
        try:
            time.sleep(0.5)
            assert threading.active_count() - before <= 4
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as extra:
                answer = b""
                while chunk := extra.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"busy: too many connections\n")
            assert time.monotonic() - started < 2
        finally:
            for conn in held:
                conn.close()
        deadline = time.monotonic() + 10
        while (reply := _post_while_busy(url, _note(5)))[0] == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reply[0] == 200, reply


def _post_while_busy(url: str, note: str) -> tuple[int, str, str]:
    """`_post` to a witness that may still be at its connection limit: it answers 503 and closes at
    once, often before the request's body is sent, so the client's send fails (a broken pipe or a
    reset): that too is the busy answer, 503."""
    try:
        return _post(url, 0, [], note)
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, BrokenPipeError | ConnectionResetError):
            return 503, "", f"closed while busy: {exc.reason}"
        raise


def test_a_request_with_megabytes_of_headers_is_cut_off(tmp_path: Path) -> None:
    """The body was bounded (64 KiB) but the head was not: http.server reads up to 100 header lines of
    64 KiB each, 6.4 MB a request, and a connection's thread held them all, so 256 connections held
    over a gigabyte. Now a request's line and headers are read up to 64 KiB (with its body 128 KiB),
    and the connection is closed past it."""
    witness = Witness(WITNESS, str(tmp_path / "w.db"), [LogKey("pcbo/", LOG.verifier())])
    server = make_server(witness, "127.0.0.1", 0, timeout=10)
    with serving(server):
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as conn:
            head = b"POST /add-checkpoint HTTP/1.1\r\n" + b"".join(
                b"X-Big-%d: %s\r\n" % (i, b"a" * 60000) for i in range(100)
            )
            with pytest.raises(OSError):  # (the server closed the connection: a reset or a broken pipe)
                conn.sendall(head + b"Content-Length: 0\r\n\r\n")
                while conn.recv(65536):
                    pass


def test_a_request_whose_line_and_headers_pass_64_kib_is_cut_off_even_with_a_small_body(
    tmp_path: Path,
) -> None:
    """The README and this server say a request's line and headers are read up to 64 KiB (128 KiB
    with its body), but only the 128 KiB of the whole request was counted: 90 KiB of headers (each
    line within http.server's own 64 KiB) before a small body were read and the checkpoint cosigned.
    Now the head alone may not pass 64 KiB: the connection is closed unanswered."""
    witness = Witness(WITNESS, str(tmp_path / "w.db"), [LogKey("pcbo/", LOG.verifier())])
    server = make_server(witness, "127.0.0.1", 0, timeout=10)
    body = add_checkpoint_body(0, [], _note(3))
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 30000) for i in range(3))
    request = b"POST /add-checkpoint HTTP/1.1\r\nHost: w\r\nContent-Length: %d\r\n" % len(body)
    with serving(server), socket.create_connection(("127.0.0.1", server.server_address[1])) as conn:
        conn.settimeout(10)
        answer = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            conn.sendall(request + padding + b"\r\n" + body)
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer == b"", answer[:200]
    with sqlite3.connect(tmp_path / "w.db") as db:
        assert db.execute("SELECT count(*) FROM logs").fetchone() == (0,)


@pytest.mark.parametrize(
    "lengths",
    [["+{n}"], ["0_{n}"], [" {n}", "{n}"], ["{n}", "0"]],
    ids=["plus", "underscore", "twice", "two"],
)
def test_a_content_length_that_is_not_one_decimal_is_refused_unread(
    tmp_path: Path, lengths: list[str]
) -> None:
    """The witness took `Content-Length` through Python's `int`: `+123` and `0_123` were read as 123,
    and of two `Content-Length` headers the first counted. A proxy in front of it (one limiting rates,
    say) that reads them as HTTP does (1*DIGIT, one value) sees another request boundary: what it
    passes as one request the witness reads as another. Now anything but one decimal `Content-Length`
    is a 400, the body unread and the connection closed, and nothing is cosigned."""
    witness = Witness(WITNESS, str(tmp_path / "w.db"), [LogKey("pcbo/", LOG.verifier())])
    server = make_server(witness, "127.0.0.1", 0, timeout=10)
    body = add_checkpoint_body(0, [], _note(3))
    head = b"POST /add-checkpoint HTTP/1.1\r\nHost: w\r\n" + b"".join(
        b"Content-Length: %s\r\n" % v.format(n=len(body)).encode() for v in lengths
    )
    with serving(server), socket.create_connection(("127.0.0.1", server.server_address[1])) as conn:
        conn.settimeout(10)
        conn.sendall(head + b"\r\n" + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Content-Length" in answer, answer[:300]
    with sqlite3.connect(tmp_path / "w.db") as db:
        assert db.execute("SELECT count(*) FROM logs").fetchone() == (0,)


def test_a_cosignature_is_never_dated_before_the_last_one_of_its_log(tmp_path: Path) -> None:
    """c2sp.org/tlog-cosignature: a cosignature says that as of its time the largest tree the witness
    saw has this root. The witness dated each cosignature by its clock alone: after its clock went
    back it cosigned the larger tree with an earlier time than the smaller one, two statements that
    contradict each other (and a verifier taking the latest time as the freshest view picked the
    smaller tree). Now a log's cosignature is never dated before the last one the witness gave it
    (a line in its name that does not verify, which a stored note of an older witness may hold, does
    not count)."""
    times = iter([2000, 1000, 1500, 3000])
    witness = Witness(
        WITNESS, str(tmp_path / "w.db"), [LogKey("pcbo/", LOG.verifier())], clock=lambda: next(times)
    )
    with sqlite3.connect(tmp_path / "w.db") as conn:  # (what an older witness stored for a request)
        forged = NoteSignature(
            WITNESS.name, WITNESS.verifier(COSIGNATURE_V1).key_id, (2**63 - 1).to_bytes(8, "big") + bytes(64)
        )
        stored = parse_note(_note(0)).with_signatures([forged]).render()
        conn.execute("INSERT INTO logs VALUES (?, 0, ?, ?)", ("pcbo/events/v1", merkle.EMPTY_ROOT, stored))
    server = make_server(witness, "127.0.0.1", 0)
    with serving(server) as url:
        cosigner = WITNESS.verifier(COSIGNATURE_V1)

        def cosigned_at(size: int, answer: tuple[int, str, str]) -> int:
            assert answer[0] == 200, answer
            note = parse_note(_note(size)).with_signatures(parse_signature_lines(answer[2]))
            return verify_cosignatures(note, [cosigner])[cosigner.text]

        assert cosigned_at(5, _post(url, 0, [], _note(5))) == 2000
        assert cosigned_at(8, _post(url, 5, merkle.consistency_proof(LEAVES[:8], 5), _note(8))) == 2000
        assert cosigned_at(8, _post(url, 8, [], _note(8))) == 2000
        assert cosigned_at(9, _post(url, 8, merkle.consistency_proof(LEAVES[:9], 8), _note(9))) == 3000


def test_a_checkpoint_stored_with_lines_that_do_not_verify_is_served_without_them(served) -> None:
    """A witness before the fix above stored every line a request carried: such a stored checkpoint,
    with a line in another witness's name that does not verify, was served as it was until the log
    was cosigned again. The monitoring endpoint now serves only the lines that verify."""
    url = served()
    assert _post(url, 0, [], _note(5))[0] == 200
    w2 = new_signing_key("witness.example/w2")
    bogus = NoteSignature(w2.name, w2.verifier(COSIGNATURE_V1).key_id, bytes(72))
    origin_hash = hashlib.sha256(b"pcbo/events/v1").hexdigest()
    with urllib.request.urlopen(f"{url}/{origin_hash}/checkpoint", timeout=10) as answer:
        clean = answer.read().decode()
    with sqlite3.connect(Path(served.db)) as conn:  # (what a witness before the fix stored)
        conn.execute("UPDATE logs SET checkpoint = ?", (parse_note(clean).with_signatures([bogus]).render(),))
    with urllib.request.urlopen(f"{url}/{origin_hash}/checkpoint", timeout=10) as answer:
        assert answer.read().decode() == clean

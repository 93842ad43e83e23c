"""A small witness (c2sp.org/tlog-witness, `pcbo witness serve`).

It cosigns checkpoints of the logs it is configured for, keeping the latest cosigned size, root and
checkpoint per origin in a SQLite file. As c2sp.org/tlog-witness configures a witness with a list of
logs, each an origin and its key, every log key here is bound to an origin prefix (`LogKey`): it
witnesses the logs `<prefix><dataset>/<versionLabel>` (`core.checkpoints.chain_of_origin`, so an
origin is of one prefix only) and no other, and a checkpoint counts only when signed by a key bound to
the prefix of its own origin. A tenant's key trusted for its own logs can then never extend (or
fork) another tenant's log at this witness. Two keys for one prefix, and two prefixes that could
both hold an origin, are refused when the witness starts. `POST /add-checkpoint` answers as the
protocol says:

- 400 a malformed request, or an old size above the checkpoint's size (it never goes backwards);
- 404 an origin it does not witness; 403 no valid signature on the checkpoint of the log key bound
  to that origin (another log's key does not count);
- 409 (`text/x.tlog.size`, the size it holds) when the old size is not the size it last cosigned;
- 422 a consistency proof that does not verify from the root it holds to the new one, or the size it
  holds with another root (each a rewritten history: the spec's answer to the latter was 409 until
  C2SP/C2SP#280), a non-empty proof from size 0 or from the checkpoint's own size, a size 0 whose
  root is not the empty tree's;
- 200 and one `cosignature/v1` line (its key's timestamped Ed25519 cosignature) otherwise, after the
  new state is stored. Checking the old size and storing the new state happen in one SQLite write
  transaction (`BEGIN IMMEDIATE`: the write lock first), so two requests cannot roll a log back nor
  both extend it, also from several witness processes sharing one database; the answer is sent only
  after the commit. A log's cosignature is never dated before the last one the witness gave it.

`GET /<hex SHA-256 of the origin>/checkpoint` returns the latest cosigned checkpoint (404 if none),
with the log key's signatures the witness verified and its own cosignature, and no other line (a line
the request carried in another witness's name that does not verify would make monitors reject it).

A request must arrive whole within 30 seconds (`make_server`'s `timeout`) of the server starting to
wait for it: a client that stops sending, trickles its request a byte at a time, or stays connected
idle, is dropped, so such connections cannot hold the witness's threads. Past 64 KiB of request line
and headers (with the body, 128 KiB) the connection is closed, and past 256 connections at once one
more is answered 503, so connections cannot fill the witness's memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pcbo_dagster.core.checkpoints import (
    AddCheckpointRequest,
    Checkpoint,
    CheckpointError,
    chain_of_origin,
    parse_add_checkpoint_body,
)
from pcbo_dagster.core.merkle import EMPTY_ROOT, verify_consistency
from pcbo_dagster.core.signed_note import (
    COSIGNATURE_V1,
    ED25519,
    Note,
    NoteError,
    SigningKey,
    VerifierKey,
    cosign,
    cosignature_timestamp,
    parse_note,
    signed_by,
    verify_cosignatures,
    verify_note,
)

logger = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 64 * 1024
#: At most this many bytes of a request's line and headers are read (with its body: the connection
#: is closed past MAX_HEAD_BYTES + MAX_REQUEST_BYTES).
MAX_HEAD_BYTES = 64 * 1024
#: How long a request may take to arrive whole (`make_server`).
REQUEST_TIMEOUT_SECONDS = 30.0
#: Connections served at once (`make_server`); one more is answered 503 and closed.
MAX_CONNECTIONS = 256
SIZE_CONTENT_TYPE = "text/x.tlog.size"


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class LogKey:
    """A log key the witness trusts for the logs of one origin prefix, and for no other log."""

    origin_prefix: str
    key: VerifierKey


def check_log_keys(logs: list[LogKey]) -> None:
    """`ValueError` unless every key is a log's (type 0x01: a cosigner key verifies no checkpoint) and
    every origin is bound to at most one key: no prefix given twice, and no two prefixes under which
    one origin could be a log's (one a prefix of the other, the rest without `/`: `pcbo/` and
    `pcbo/a` both hold `pcbo/ab/v1`)."""
    if not logs:
        raise ValueError("no log key: give at least one")
    for i, a in enumerate(logs):
        if not a.origin_prefix or any(c.isspace() for c in a.origin_prefix):
            raise ValueError(f"origin prefix {a.origin_prefix!r}: must be non-empty, without spaces")
        if a.key.signature_type != ED25519:
            raise ValueError(f"{a.key.name}: not a log's (type 0x01) verifier key: it verifies no checkpoint")
        for b in logs[i + 1 :]:
            short, long = sorted((a.origin_prefix, b.origin_prefix), key=len)
            if long.startswith(short) and "/" not in long[len(short) :]:
                which = "is bound to two log keys" if short == long else f"and {long} overlap"
                raise ValueError(
                    f"origin prefix {short} {which} ({a.key.name}, {b.key.name}): bind each log key "
                    "to the origin prefix of its own logs"
                )


class Witness:
    """The witness's state and its `add-checkpoint` decision (no HTTP here). `logs`: each trusted log
    key with the origin prefix it is bound to (module doc; `check_log_keys`)."""

    def __init__(
        self,
        key: SigningKey,
        database: str,
        logs: list[LogKey],
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_log_keys(logs)
        for log in logs:
            if log.key.public_key == key.public_key:
                raise ValueError(
                    f"{log.key.name}: the witness's own key: a witness cosigns the checkpoints of logs "
                    "signed by others, never its own"
                )
        self.key = key
        self.database = database
        self.logs = list(logs)
        self.clock = clock
        self._lock = threading.Lock()
        with self._connect() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS logs (origin TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                "root BLOB NOT NULL, checkpoint TEXT NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.database, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        return conn

    def add_checkpoint(self, body: bytes) -> Answer:
        try:
            request = parse_add_checkpoint_body(body)
        except CheckpointError as exc:
            if "size 0" in str(exc):
                return Answer(422, f"{exc}\n")
            return Answer(400, f"{exc}\n")
        except NoteError as exc:
            return Answer(400, f"{exc}\n")
        checkpoint = request.checkpoint
        keys = self.keys_of(checkpoint.origin)
        if not keys:
            return Answer(404, f"unknown log origin {checkpoint.origin}\n")
        try:
            verified = verify_note(request.note, keys)
        except NoteError as exc:
            return Answer(403, f"{exc} (the log key of origin {checkpoint.origin})\n")
        # What is stored (and served) is the checkpoint with the signatures verified here, no other line.
        signed = Note(request.note.text, ()).with_signatures(  # (each line once)
            [s for s in request.note.signatures if any(signed_by(s, k) for k in verified)]
        )
        if request.old_size > checkpoint.size:
            return Answer(400, f"old size {request.old_size} is above the checkpoint's {checkpoint.size}\n")
        with self._lock, self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                answer = self._decide(conn, request, checkpoint, signed)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT" if answer.status == 200 else "ROLLBACK")
        logger.info("witness: %s %s -> %s", checkpoint.origin, checkpoint.size, answer.status)
        return answer

    def keys_of(self, origin: str) -> list[VerifierKey]:
        """The log key bound to `origin` (empty: a log this witness does not witness)."""
        return [log.key for log in self.logs if chain_of_origin(origin, log.origin_prefix) is not None]

    def _decide(
        self, conn: sqlite3.Connection, request: AddCheckpointRequest, checkpoint: Checkpoint, signed: Note
    ) -> Answer:
        row = conn.execute(
            "SELECT size, root, checkpoint FROM logs WHERE origin = ?", (checkpoint.origin,)
        ).fetchone()
        held_size, held_root = (0, EMPTY_ROOT) if row is None else (int(row[0]), bytes(row[1]))
        if request.old_size != held_size:
            return Answer(409, f"{held_size}\n", SIZE_CONTENT_TYPE)
        if held_size == 0:
            if request.proof:
                return Answer(422, "a consistency proof from size 0 must be empty\n")
        elif held_size == checkpoint.size:
            if held_root != checkpoint.root:
                return Answer(
                    422,
                    f"another root than the one this witness cosigned for size {held_size}: the log's "
                    "history was rewritten\n",
                )
            if request.proof:
                return Answer(422, "a consistency proof from a size to itself must be empty\n")
        elif not verify_consistency(held_size, checkpoint.size, held_root, checkpoint.root, request.proof):
            return Answer(
                422, f"not consistent with the checkpoint of size {held_size} this witness cosigned\n"
            )
        # (a cosignature says: as of its time, the largest tree seen has this root; never one dated
        # before the last one of this log, even when the clock goes back)
        last = 0 if row is None else self._last_cosigned_at(checkpoint.origin, str(row[2]))
        signature = cosign(checkpoint.text, self.key, max(int(self.clock()), last))
        stored = signed.with_signatures([signature]).render()
        conn.execute(
            "INSERT INTO logs (origin, size, root, checkpoint) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (origin) DO UPDATE SET size = excluded.size, root = excluded.root, "
            "checkpoint = excluded.checkpoint",
            (checkpoint.origin, checkpoint.size, checkpoint.root, stored),
        )
        return Answer(200, signature.line)

    def _last_cosigned_at(self, origin: str, stored: str) -> int:
        """The time of this witness's cosignature on a stored checkpoint (0: none that verifies)."""
        mine = self.key.verifier(COSIGNATURE_V1)
        lines = self._verified(origin, stored).signatures
        return max((cosignature_timestamp(s) for s in lines if signed_by(s, mine)), default=0)

    def latest(self, origin_hash: str) -> Answer:
        with self._connect() as conn:
            for origin, text in conn.execute("SELECT origin, checkpoint FROM logs"):
                if hashlib.sha256(origin.encode("utf-8")).hexdigest() == origin_hash:
                    return Answer(200, self._verified(origin, text).render())
        return Answer(404, "no checkpoint cosigned for that origin\n")

    def _verified(self, origin: str, stored: str) -> Note:
        """A stored checkpoint with only the lines that verify: the log key's signatures and this
        witness's cosignatures (what it stores now; witnesses before kept every line a request had)."""
        note = parse_note(stored)
        kept = []
        for line in note.signatures:
            alone = Note(note.text, (line,))
            try:
                if verify_cosignatures(alone, [self.key.verifier(COSIGNATURE_V1)]) or verify_note(
                    alone, self.keys_of(origin)
                ):
                    kept.append(line)
            except NoteError:
                continue
        return Note(note.text, ()).with_signatures(kept)


class _RequestTooLong(TimeoutError):
    """More bytes than a request may have (a `TimeoutError`, so `handle_one_request` closes quietly)."""


class _DeadlineReader(io.RawIOBase):
    """A connection's reads for the request `start` began: all end by its deadline (`time.monotonic`),
    each waiting only the time left, and together read at most `limit` bytes (`start` sets it to the
    head's, `allow_body` raises it once the head is read). Past either it raises a `TimeoutError`,
    which `handle_one_request` answers by closing the connection."""

    def __init__(self, connection: socket.socket, head_limit: int, limit: int) -> None:
        self.connection = connection
        self.head_limit = head_limit
        self.body_limit = limit
        self.limit = head_limit
        self.deadline = 0.0
        self.count = 0

    def start(self, deadline: float) -> None:
        self.deadline, self.count, self.limit = deadline, 0, self.head_limit

    def allow_body(self) -> None:
        """The head is read: the request may now be read up to the whole request's limit."""
        self.limit = self.body_limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        if self.count >= self.limit:
            raise _RequestTooLong(f"a request of more than {self.limit} bytes")
        self.connection.settimeout(left)
        # (never past the limit: a buffered read-ahead of the head stops at it)
        received = self.connection.recv_into(buffer, min(len(buffer), self.limit - self.count))
        self.count += received
        return received


class _BoundedServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` serving at most `max_connections` connections at once (each a thread):
    a connection past them is answered 503 from the accepting thread and closed, so a flood of
    connections cannot make the witness start threads without end."""

    def __init__(
        self, address: tuple[str, int], handler: Any, max_connections: int = MAX_CONNECTIONS
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                body = b"busy: too many connections\n"
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(
    witness: Witness,
    host: str,
    port: int,
    timeout: float = REQUEST_TIMEOUT_SECONDS,
    max_connections: int = MAX_CONNECTIONS,
) -> ThreadingHTTPServer:
    """An HTTP server for `witness` on (host, port) (port 0: any free port); call `serve_forever`.
    Each request (its line, headers and body) must arrive within `timeout` seconds of the handler
    starting to wait for it: a client that stops sending, sends a byte now and then, or keeps an idle
    connection is dropped and frees its thread (`handle_one_request` closes a connection whose read
    timed out). At most `max_connections` connections are served at once: one more is answered 503."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.reader = _DeadlineReader(self.connection, MAX_HEAD_BYTES, MAX_HEAD_BYTES + MAX_REQUEST_BYTES)
            self.rfile = io.BufferedReader(self.reader)

        def handle_one_request(self) -> None:
            self.reader.start(time.monotonic() + timeout)
            super().handle_one_request()

        def _send(self, answer: Answer, body_read: bool = False) -> None:
            """Write `answer`; the connection is closed after it when the request's body was not read
            (else its bytes would be read as the next request on a kept-alive connection)."""
            data = answer.body.encode("utf-8")
            self.connection.settimeout(timeout)  # (the reads' deadline left it the time they had left)
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(data)))
            has_body = "Transfer-Encoding" in self.headers or self.headers.get("Content-Length", "0") != "0"
            if has_body and not body_read:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            if self.path.rstrip("/") != "/add-checkpoint":
                self._send(Answer(404, "not found\n"))
                return
            if "Transfer-Encoding" in self.headers or "Content-Length" not in self.headers:
                self._send(Answer(411, "Content-Length required\n"))
                return
            # (one value of 1*DIGIT, as HTTP reads it: `int` takes `+5` and `0_5`, and a proxy in front
            # reading another length than this witness would see another request boundary)
            lengths = self.headers.get_all("Content-Length") or []
            text = lengths[0].strip(" \t") if len(lengths) == 1 else ""
            if not (text.isascii() and text.isdigit()):
                self._send(Answer(400, "Content-Length is not one decimal length\n"))
                return
            length = int(text)
            if not 0 <= length <= MAX_REQUEST_BYTES:
                self._send(Answer(413, "request too large\n"))
                return
            self.reader.allow_body()
            body = self.rfile.read(length)
            self._send(witness.add_checkpoint(body), body_read=True)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            parts = self.path.strip("/").split("/")
            if len(parts) == 2 and parts[1] == "checkpoint" and len(parts[0]) == 64:
                self._send(witness.latest(parts[0].lower()))
            else:
                self._send(Answer(404, "not found\n"))

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server API
            logger.debug("witness http: " + format, *args)

    Handler.timeout = timeout  # (StreamRequestHandler sets it on each connection's socket)
    return _BoundedServer((host, port), Handler, max_connections)


def started_line(server: ThreadingHTTPServer, witness: Witness) -> str:
    host, port = server.server_address[:2]
    return json.dumps(
        {
            "listening": f"http://{host!s}:{port}",
            "cosignerVerifierKey": witness.key.verifier(COSIGNATURE_V1).text,
            "logs": [{"originPrefix": log.origin_prefix, "logKey": log.key.text} for log in witness.logs],
        }
    )

"""Loopback ports for the real servers the tests start (PostgreSQL, Redis, moto, the GCS emulator,
uvicorn, dagster-webserver), an in-process server served on a thread (`serving`), a webhook that
records what is posted to it (`RecordingReceiver`), and a hostile HTTP peer that drips its answer
(`DripReceiver`)."""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server started next binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(process: subprocess.Popen, grace: float) -> None:
    """Stop a server started in its own process group (`start_new_session`): SIGTERM to the group,
    SIGKILL if it has not ended within `grace` seconds. Nothing when it has ended already."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def serving(server: socketserver.TCPServer) -> Iterator[str]:
    """`server` (bound to 127.0.0.1) served on a daemon thread: its `http://127.0.0.1:<port>` URL;
    shut down and closed when the block ends."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class RecordingReceiver:
    """A webhook on loopback (`url`: its `path`) that records every POST in `requests` (path, headers,
    body, the status answered) and answers it with no body: `down` answers `fail_status` to
    everything, `fail_next` to the next N requests, a 3xx one with `location` when set; otherwise
    `accept` says (under `lock`). Served on a thread from `start` to `close`; `server` may be wrapped
    in TLS before `start`."""

    path = "/"

    def __init__(self, fail_status: int, location: str = "") -> None:
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.down = False
        self.fail_next = 0
        self.fail_status = fail_status
        self.location = location
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    status = receiver.answer(body)
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "status": status}
                    )
                self.send_response(status)
                if receiver.location and 300 <= status < 400:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def answer(self, body: bytes) -> int:
        """The status a POST of `body` is answered with (under `lock`)."""
        if self.down or self.fail_next:
            self.fail_next = max(0, self.fail_next - 1)
            return self.fail_status
        return self.accept(body)

    def accept(self, body: bytes) -> int:  # pragma: no cover - each receiver's own
        raise NotImplementedError

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        assert isinstance(host, str)  # AF_INET: (host, port)
        return f"http://{host}:{port}{self.path}"

    def start(self) -> RecordingReceiver:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DripReceiver:
    """A hostile webhook on loopback: reads the request, then answers `head` and drips `drip`, one
    byte every `gap` seconds (each byte well within the client's socket timeout) until stopped; over
    TLS with the server context `tls`."""

    def __init__(self, head: bytes, drip: bytes, gap: float = 0.1, tls: Any = None) -> None:
        self.head, self.drip, self.gap, self.tls = head, drip, gap, tls
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hooks"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    if self.tls is not None:
                        conn = self.tls.wrap_socket(conn, server_side=True)
                    conn.recv(65536)
                    conn.sendall(self.head)
                    for i in range(10**6):
                        if self.stop.wait(self.gap):
                            return
                        conn.sendall(self.drip[i % len(self.drip) : i % len(self.drip) + 1])
                except OSError:
                    continue

    def close(self) -> None:
        """Stop the thread and close the socket. A thread waiting in `accept` (the client gave up) is
        woken by one connection first: closing the listening socket from here does not wake it, and
        the join would wait its whole 5 s."""
        self.stop.set()
        try:
            socket.create_connection(self.sock.getsockname(), timeout=1).close()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)

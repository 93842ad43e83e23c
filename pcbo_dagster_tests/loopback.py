"""Loopback ports for the real servers the tests start (PostgreSQL, Redis, moto, the GCS emulator,
uvicorn, dagster-webserver), an in-process server served on a thread (`serving`), and a hostile HTTP
peer that drips its answer (`DripReceiver`)."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server started next binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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

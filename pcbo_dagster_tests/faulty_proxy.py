"""An HTTP proxy on loopback in front of a real object store server (moto's S3, the GCS emulator) that
fails the requests a test names: a store that is down, refuses access or drops connections for some
objects while it answers for others. The server behind it is the real one; only the failure is the
test's.

    proxy = FaultyProxy("http://127.0.0.1:5000")   # moto's endpoint
    env["PCBO_S3_ENDPOINT_URL"] = proxy.url
    proxy.fail(lambda method, path: "/pas/" in path, "503")   # or "403", "reset"
    proxy.heal()

`reset` closes the connection without an answer (a host gone away mid-request); `403` answers S3's
`AccessDenied`; `503` answers `ServiceUnavailable` (every retry of the client fails alike).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Rule = Callable[[str, str], bool]

_BODIES = {
    "403": (
        403,
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
        b"<Message>Access Denied</Message></Error>",
    ),
    "503": (
        503,
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
        b"<Message>Service Unavailable</Message></Error>",
    ),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class FaultyProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self._rule: tuple[Rule, str] | None = None
        self._lock = threading.Lock()
        #: (method, path) of every request the proxy failed, in order
        self.failed: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                mode = proxy._mode(self.command, self.path)
                if mode == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if mode is not None:
                    status, payload = _BODIES[mode]
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for key, value in answer.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _mode(self, method: str, path: str) -> str | None:
        with self._lock:
            if self._rule is None or not self._rule[0](method, path):
                return None
            self.failed.append((method, path))
            return self._rule[1]

    def fail(self, rule: Rule, mode: str) -> None:
        """Fail every request `rule(method, path)` is true of, as `mode` says (module doc)."""
        if mode not in ("reset", *_BODIES):
            raise ValueError(mode)
        with self._lock:
            self._rule = (rule, mode)

    def heal(self) -> None:
        with self._lock:
            self._rule = None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

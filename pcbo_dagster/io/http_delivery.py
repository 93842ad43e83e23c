"""POST a JSON body to an HTTP endpoint with tenacity retries; errors and logs are redacted.

Shared by audit event delivery (`audit/delivery.py`) and alert webhooks (`alerts/webhook.py`).

`JsonPoster(url, ...).post(body, what)` sends one POST (`Content-Type: application/json`) and
returns the number of attempts it took. A 2xx answer is success; the answer's body is never read.
`timeout` bounds each attempt whole (connecting, sending, the answer's status and headers), not just
each socket operation: a receiver that drips its answer cannot hold a POST longer. Connection
errors, timeouts, 408, 425, 429 and 5xx are retried with exponential backoff (tenacity); other
answers (3xx: a redirect is not followed, it would turn the POST into a GET; 4xx) fail at once.
A POST that still fails raises `DeliveryFailed` (`attempts`, `retryable`, `status`, a scrubbed
message). A proxy (`HTTP(S)_PROXY`) is used as urllib does, except for an endpoint on loopback
(`on_loopback`), which is always reached directly (as by every `deadline_opener`).

Credentials: a `token` is sent as `Authorization: Bearer <token>`; otherwise credentials in the
URL (`https://user:pass@host/...`) are sent as HTTP Basic authorization. The URL's userinfo and
query string, the token, the Authorization header and any extra header value never appear in
`endpoint` (the redacted URL), exceptions or logs: `scrub` removes them, and any URL userinfo or
query string, from a text (`scrub_text`).
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import logging
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import tenacity

from pcbo_dagster.io.redaction import has_userinfo, quoted_answer, redact_url, scrub_json, scrub_text

_logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 425, 429})
"""Besides 5xx and connection errors, the answers that are retried."""


def on_loopback(host: str | None) -> bool:
    """Whether `host` (a URL's hostname) is this machine's loopback: `localhost`, 127.0.0.0/8, ::1.
    A name is not resolved: only those spellings count."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def base_url(text: str, *, https_off_loopback: str | None = None) -> str:
    """`text`, the http(s) URL of a server pcbo asks by appending a path to it (a witness, a Horizon),
    without its final `/`. `ValueError` whose message starts with the URL redacted and says what is
    wrong: not an http(s) URL with a host (or not parseable: an unclosed `[`), a space or a control
    character (http.client refuses to send it, after every attempt), credentials (urllib would take
    `user:secret@host` for a host name and send it to the resolver), a query or a fragment (the
    appended path would land in them), a port out of range; and, when `https_off_loopback` gives a
    reason, plain `http://` off loopback (`on_loopback`)."""
    shown = redact_url(text)
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        if "port" in str(exc).lower():
            raise ValueError(f"{shown}: its port is out of range") from None
        raise ValueError(f"{shown} is not an http(s) URL") from None
    if url.scheme not in ("http", "https") or not url.hostname or not _sendable(text):
        raise ValueError(f"{shown} is not an http(s) URL")
    if https_off_loopback is not None and url.scheme == "http" and not on_loopback(url.hostname):
        raise ValueError(f"{shown}: use https ({https_off_loopback})")
    for present, what in (
        (has_userinfo(text), "credentials"),
        (url.query, "query"),
        (url.fragment, "fragment"),
    ):
        if present:
            raise ValueError(f"{shown}: takes no {what}")
    return text.rstrip("/")


class DeliveryFailed(RuntimeError):
    """A POST that still failed after its retries. The message (`<endpoint>: <what>: <reason>`) and
    `reason` hold no secret; `retryable` says whether the retries ran out (True) or the answer was
    not retryable (False); `status` is the last answer's HTTP status (None: no answer)."""

    def __init__(
        self, message: str, reason: str, attempts: int, retryable: bool, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.attempts = attempts
        self.retryable = retryable
        self.status = status


class _Retryable(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Permanent(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx answer is not followed (urllib turns a redirected POST into a GET of the URL it names)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        return None  # a 3xx answer becomes an HTTPError (not delivered)


class _Deadline:
    """One attempt's time limit: when it passes, the attempt's socket is shut down, so a receiver that
    drips its answer (a byte within each socket timeout) cannot hold the request longer."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


_attempt = threading.local()  # the running attempt's `_Deadline` (one request at a time per thread)


class _DeadlineConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()  # bounded by the socket timeout (as is a TLS handshake, whole)
        _attach(self.sock)


class _DeadlineHTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _attach(self.sock)


def _attach(sock: socket.socket) -> None:
    deadline = getattr(_attempt, "deadline", None)
    if deadline is not None:
        deadline.attach(sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):  # noqa: ANN001, ANN201
        return self.do_open(_DeadlineConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):  # noqa: ANN001, ANN201
        return self.do_open(_DeadlineHTTPSConnection, req, context=self._context)


class _ProxyOffLoopback(urllib.request.ProxyHandler):
    """The proxies of the environment (`HTTP(S)_PROXY`, `NO_PROXY`), as urllib's own handler takes
    them, except for a host on loopback (`on_loopback`), always reached directly: this machine's
    loopback through a proxy is the proxy's loopback, not ours, and a plain-http request (a token, the
    answer trusted for coming from loopback) would cross the network in the clear."""

    def __init__(self) -> None:
        proxies = urllib.request.getproxies()
        super().__init__(proxies)
        for scheme, proxy in proxies.items():  # (in place of the base class's `<scheme>_open` of each)
            setattr(self, f"{scheme}_open", self._opener_via(proxy, scheme))

    def _opener_via(self, proxy: str, scheme: str) -> Any:
        def open_via(request: urllib.request.Request) -> Any:
            if on_loopback(urllib.parse.urlsplit(request.full_url).hostname):
                return None  # (the next handler opens it directly)
            return self.proxy_open(request, proxy, scheme)

        return open_via


def deadline_opener(*handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    """A urllib opener (with `handlers` besides the default ones) whose connections a `within` block
    bounds whole, and that never asks a host on loopback through a proxy (`_ProxyOffLoopback`)."""
    return urllib.request.build_opener(_ProxyOffLoopback(), _HTTPHandler(), _HTTPSHandler(), *handlers)


@contextmanager
def within(seconds: float) -> Iterator[_Deadline]:
    """Bounds the requests a `deadline_opener` makes in this block (in this thread) to `seconds` in
    all: connecting, sending and reading the answer, however slowly the other end drips it. When the
    time passes their sockets are shut down (reads then end early, or raise `OSError`) and the
    deadline's `expired` is True: check it after the block, as a cut answer can read as complete."""
    deadline = _Deadline(seconds)
    _attempt.deadline = deadline
    try:
        yield deadline
    finally:
        deadline.cancel()
        _attempt.deadline = None


def url_as_sent(url: str) -> str:
    """`url` as a request is sent to it: its host and port alone for the authority (urllib takes a
    `user:password@` for part of the host, and would look the password up by name), its path (at
    least `/`) and query, no fragment. `ValueError` for an invalid port."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = host if ":" not in host else f"[{host}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def _sendable(value: str, spaces: bool = False) -> bool:
    """Whether `value` can go in an HTTP header as is: visible ASCII (and spaces, when allowed)."""
    return all(0x21 <= ord(c) <= 0x7E or (spaces and c == " ") for c in value)


def _failure(reason: object) -> str:
    """`connection failed: <its class>: <it>`, quoted on one line (`quoted_answer`): the text of an
    http.client error may hold what the server sent (`BadStatusLine` holds its raw status line)."""
    return quoted_answer(f"connection failed: {type(reason).__name__}: {reason}", 500)


class JsonPoster:
    """POSTs JSON bodies to `url` (http or https) with retries and exponential backoff.

    `attempts` tries per body; waits start at `initial_wait` seconds and double up to `max_wait`;
    `timeout` bounds each request. `headers` are added to every request; `token` is sent as a
    bearer token (else URL userinfo as HTTP Basic). `name` names the endpoint in `ValueError`s for a
    bad URL (e.g. "audit endpoint"); `label` starts the retry log lines (e.g. "audit delivery"),
    written to `logger` (default: this module's).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "endpoint",
        label: str = "delivery",
        user_agent: str = "pcbo/1",
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
        attempts: int = 3,
        initial_wait: float = 0.5,
        max_wait: float = 5.0,
        timeout: float = 5.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if not _sendable(url):  # urlsplit keeps what http.client refuses, and its refusal shows it
            raise ValueError(f"the {name} URL holds a control, space or non-ASCII character")
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise ValueError(f"invalid {name} {redact_url(url)}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{name} must be an http(s) URL with a host: {redact_url(url)}")
        if token is not None and not _sendable(token):
            # never shown: a token is a secret, and http.client's refusal would print it escaped
            raise ValueError(f"the {name}'s token holds a control, space or non-ASCII character")
        for header, value in (headers or {}).items():
            if not _sendable(value, spaces=True):
                raise ValueError(f"the {name}'s {header} header holds a control or non-ASCII character")
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        if initial_wait < 0 or max_wait < 0 or timeout <= 0:
            raise ValueError("initial_wait and max_wait must be >= 0 and timeout > 0")
        self.attempts = attempts
        self.initial_wait = initial_wait
        self.max_wait = max_wait
        self.timeout = timeout
        self.endpoint = redact_url(url)
        self._label = label
        self._logger = logger or _logger
        self._url = url_as_sent(url)
        self._headers = {"Content-Type": "application/json", "User-Agent": user_agent}
        self._headers.update(headers or {})
        secrets = [url, parts.query, *(headers or {}).values()]
        if "@" in parts.netloc:
            secrets += [parts.netloc, parts.netloc.rpartition("@")[0]]
        if parts.password is not None:
            secrets += [parts.password, urllib.parse.unquote(parts.password)]
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
            secrets += [token, self._headers["Authorization"]]
        elif parts.username is not None or parts.password is not None:
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {basic}"
            secrets += [basic, self._headers["Authorization"]]
        self._secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)
        self._opener = deadline_opener(NoRedirect())  # (a loopback endpoint: never through a proxy)

    def scrub(self, text: str) -> str:
        """`text` without this endpoint's secrets nor any URL userinfo or query string."""
        return scrub_text(text, self._secrets)

    def scrub_document(self, value: Any) -> Any:
        """`value` (plain JSON) with every text in it through `scrub`: a body sent or stored."""
        return scrub_json(value, self._secrets)

    def _post_once(self, body: bytes) -> None:
        late = _Retryable(f"no complete answer within {self.timeout:g} s")
        with within(self.timeout) as deadline:
            try:
                self._post_within(body)
            except (_Retryable, _Permanent):
                if deadline.expired:
                    raise late from None
                raise
        if deadline.expired:  # a head cut short by the shutdown reads as complete: not an answer
            raise late

    def _post_within(self, body: bytes) -> None:
        request = urllib.request.Request(self._url, data=body, method="POST", headers=self._headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                status = response.status  # the answer; its body is not read (any size, any pace)
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except urllib.error.URLError as exc:
            reason = exc.reason
            raise _Retryable(_failure(reason)) from None
        except http.client.InvalidURL:  # its text holds the URL, query included
            raise _Permanent("the URL cannot be sent (InvalidURL)") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Retryable(_failure(exc)) from None
        except ValueError as exc:  # a request http.client refuses to send: its text may hold a header
            raise _Permanent(f"the request cannot be sent ({type(exc).__name__})") from None
        if 200 <= status < 300:
            return
        if status >= 500 or status in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {status}", status)
        raise _Permanent(f"HTTP {status} (not retried)", status)

    def post(self, body: bytes, what: str, attempts: int | None = None) -> int:
        """POST `body` (JSON bytes), retrying; the number of attempts made. `what` names the body in
        log lines and in the error (e.g. "seq 3"); `attempts` (at least 1) replaces the poster's for
        this body. Raises `DeliveryFailed` when it still fails."""
        attempts = self.attempts if attempts is None else max(1, attempts)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            self._logger.warning(
                "%s to %s: %s attempt %d/%d failed (%s); retrying in %.2f s",
                self._label,
                self.endpoint,
                what,
                state.attempt_number,
                attempts,
                self.scrub(str(exc)),
                wait,
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_exponential(multiplier=self.initial_wait, max=self.max_wait),
            retry=tenacity.retry_if_exception_type(_Retryable),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            retrying(self._post_once, body)
        except (_Retryable, _Permanent) as exc:
            attempts = int(retrying.statistics.get("attempt_number", 1))
            reason = self.scrub(str(exc))
            message = self.scrub(f"{self.endpoint}: {what}: {reason}")
            raise DeliveryFailed(message, reason, attempts, isinstance(exc, _Retryable), exc.status) from None
        return int(retrying.statistics.get("attempt_number", 1))

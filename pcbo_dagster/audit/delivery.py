"""Remote delivery of PAS events to an HTTP endpoint, in chain order, after the local backup.

Each event is POSTed on its own (`Content-Type: application/json`, body = the event's RFC 8785
bytes); a 2xx answer means delivered. Failures are retried with exponential backoff (tenacity):
connection errors, timeouts, 408, 425, 429 and 5xx. Other answers (3xx, 4xx) fail at once: a
redirect is not followed (it would turn the POST into a GET). Delivery of a chain stops at the
first event that still fails; later events wait, so the receiver always sees each chain in seq
order without gaps. Delivery is at least once: a crash after the receiver's 2xx but before the
cursor is written sends that event again next time (receivers deduplicate by `event_id` /
`chain.event_hash`).

The per-chain cursor `<dataset>/<versionLabel>.delivered` in the backup directory holds the last
delivered `{chain_key, seq, event_hash}`; it is replaced atomically (temp file, fsync, os.replace)
under the chain's delivery lock, which is separate from the writer lock so a slow endpoint never
blocks appends.

Credentials in the endpoint URL (`https://user:pass@host/...`) are sent as HTTP Basic
authorization; the userinfo and the query string never appear in reports, exceptions or logs.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

import tenacity

from pcbo_dagster.audit.backup import AuditBackup, file_lock
from pcbo_dagster.core.audit_chain import event_hash, is_event_hash
from pcbo_dagster.core.canonical import jcs

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({408, 425, 429})


@dataclass(frozen=True)
class DeliveryReport:
    """Outcome of one `deliver_pending` call. Holds no secrets (the endpoint is redacted)."""

    chain_key: str
    endpoint: str
    delivered: int
    pending: int
    last_delivered_seq: int | None
    last_error: str | None = None

    @property
    def ok(self) -> bool:
        """True when nothing is left to deliver and nothing failed."""
        return self.pending == 0 and self.last_error is None

    def to_dict(self) -> dict:
        """camelCase form for command outputs."""
        return {
            "chainKey": self.chain_key,
            "endpoint": self.endpoint,
            "delivered": self.delivered,
            "pending": self.pending,
            "lastDeliveredSeq": self.last_delivered_seq,
            "lastError": self.last_error,
        }


class _Retryable(Exception):
    pass


class _Permanent(Exception):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        return None  # a 3xx answer becomes an HTTPError (not delivered)


def redact_url(url: str) -> str:
    """`scheme://host[:port]/path`, without userinfo, query or fragment (a `?[redacted]` marker
    shows that a query existed)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "[unparseable endpoint]"
    text = f"{parts.scheme}://{host}{port}{parts.path}"
    if parts.query:
        text += "?[redacted]"
    return text


def read_cursor(backup: AuditBackup, chain_key: str) -> tuple[int, str] | None:
    """The last delivered (seq, event_hash) of a chain, or None when nothing was delivered yet.

    ValueError when the cursor file exists but is not a valid cursor for this chain.
    """
    path = backup.paths(chain_key).delivered
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"delivery cursor {path.name} is not JSON: {exc}") from exc
    seq = data.get("seq") if isinstance(data, dict) else None
    digest = data.get("event_hash") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("chain_key") != chain_key
        or not isinstance(seq, int)
        or isinstance(seq, bool)
        or seq < 0
        or not is_event_hash(digest)
    ):
        raise ValueError(f"delivery cursor {path.name} is not a cursor for {chain_key}")
    return seq, digest


def _write_cursor(backup: AuditBackup, chain_key: str, seq: int, digest: str) -> None:
    paths = backup.paths(chain_key)
    data = jcs({"chain_key": chain_key, "seq": seq, "event_hash": digest}) + b"\n"
    tmp = paths.delivered.with_name(f".{paths.delivered.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, paths.delivered)
    dfd = os.open(paths.directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class HttpDelivery:
    """POST events to `endpoint` (http or https) with retries and exponential backoff.

    `attempts` tries per event; waits start at `initial_wait` seconds and double up to `max_wait`;
    `timeout` bounds each request. `headers` are added to every request (e.g. a bearer token);
    their values are never reported.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        attempts: int = 3,
        initial_wait: float = 0.5,
        max_wait: float = 5.0,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        try:
            parts = urllib.parse.urlsplit(endpoint)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ValueError(f"invalid audit endpoint {redact_url(endpoint)}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"audit endpoint must be an http(s) URL with a host: {redact_url(endpoint)}")
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        if initial_wait < 0 or max_wait < 0 or timeout <= 0:
            raise ValueError("initial_wait and max_wait must be >= 0 and timeout > 0")
        self.attempts = attempts
        self.initial_wait = initial_wait
        self.max_wait = max_wait
        self.timeout = timeout
        self.endpoint = redact_url(endpoint)
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        self._url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        self._headers = {"Content-Type": "application/json", "User-Agent": "pcbo-audit-delivery/1"}
        self._headers.update(headers or {})
        secrets = [endpoint, parts.query, parts.netloc if "@" in parts.netloc else ""]
        secrets += list((headers or {}).values())
        if parts.username is not None or parts.password is not None:
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
            secrets += [parts.password or "", password, token, parts.netloc.rpartition("@")[0]]
        self._secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)
        self._opener = urllib.request.build_opener(_NoRedirect())

    def __repr__(self) -> str:
        return f"HttpDelivery({self.endpoint!r}, attempts={self.attempts})"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _post_once(self, body: bytes) -> None:
        request = urllib.request.Request(self._url, data=body, method="POST", headers=self._headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                status = response.status
                response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except urllib.error.URLError as exc:
            reason = exc.reason
            raise _Retryable(f"connection failed: {type(reason).__name__}: {reason}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Retryable(f"connection failed: {type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            return
        if status >= 500 or status in _RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {status}")
        raise _Permanent(f"HTTP {status} (not retried)")

    def send(self, event: dict) -> None:
        """Deliver one event, retrying; raises RuntimeError (a redacted message) when it still fails."""
        body = jcs(event)
        seq = event.get("chain", {}).get("seq")

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            logger.warning(
                "audit delivery to %s: seq %s attempt %d/%d failed (%s); retrying in %.2f s",
                self.endpoint,
                seq,
                state.attempt_number,
                self.attempts,
                self._scrub(str(exc)),
                wait,
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=self.initial_wait, max=self.max_wait),
            retry=tenacity.retry_if_exception_type(_Retryable),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            retrying(self._post_once, body)
        except (_Retryable, _Permanent) as exc:
            message = self._scrub(f"{self.endpoint}: seq {seq}: {exc}")
            raise RuntimeError(message) from None

    def deliver_pending(self, backup: AuditBackup, chain_key: str) -> DeliveryReport:
        """Deliver, in seq order, every backed-up event after the chain's cursor.

        Stops at the first event that still fails after retries (or at a local chain defect: an event
        that does not continue the delivered prefix is never sent). Never raises for delivery
        failures; the report says what is left.
        """
        paths = backup.paths(chain_key)
        delivered = 0
        paths.directory.mkdir(parents=True, exist_ok=True)
        with file_lock(paths.delivery_lock):
            events = backup.read_chain(chain_key)
            try:
                cursor = read_cursor(backup, chain_key)
            except ValueError as exc:
                return self._report(chain_key, 0, len(events), None, str(exc))
            start = 0 if cursor is None else cursor[0] + 1
            prev = None if cursor is None else cursor[1]
            last_seq = None if cursor is None else cursor[0]
            if cursor is not None:
                anchor = events[cursor[0]] if cursor[0] < len(events) else None
                anchor_chain = anchor.get("chain") if isinstance(anchor, dict) else None
                if (
                    not isinstance(anchor_chain, dict)
                    or anchor_chain.get("seq") != cursor[0]
                    or anchor_chain.get("event_hash") != cursor[1]
                ):
                    error = (
                        f"delivery cursor (seq {cursor[0]}) does not match the local backup of "
                        f"{chain_key}; nothing delivered"
                    )
                    return self._report(chain_key, 0, max(0, len(events) - start), last_seq, error)
            error: str | None = None
            for index in range(start, len(events)):
                event = events[index]
                chain = event.get("chain") if isinstance(event, dict) else None
                if (
                    not isinstance(chain, dict)
                    or chain.get("chain_key") != chain_key
                    or chain.get("seq") != index
                    or chain.get("prev_event_hash") != prev
                    or chain.get("event_hash") != _safe_hash(event)
                ):
                    error = (
                        f"local backup of {chain_key} is broken at position {index}; "
                        "delivery stopped (run verify)"
                    )
                    logger.error("audit delivery: %s", error)
                    return self._report(chain_key, delivered, len(events) - index, last_seq, error)
                try:
                    self.send(event)
                except RuntimeError as exc:
                    error = str(exc)
                    logger.warning(
                        "audit delivery: %s; %d event(s) of %s left pending",
                        error,
                        len(events) - index,
                        chain_key,
                    )
                    return self._report(chain_key, delivered, len(events) - index, last_seq, error)
                _write_cursor(backup, chain_key, index, chain["event_hash"])
                delivered += 1
                last_seq = index
                prev = chain["event_hash"]
            return self._report(chain_key, delivered, 0, last_seq, None)

    def _report(
        self, chain_key: str, delivered: int, pending: int, last_seq: int | None, error: str | None
    ) -> DeliveryReport:
        return DeliveryReport(
            chain_key=chain_key,
            endpoint=self.endpoint,
            delivered=delivered,
            pending=pending,
            last_delivered_seq=last_seq,
            last_error=None if error is None else self._scrub(error),
        )


def _safe_hash(event: dict) -> str | None:
    try:
        return event_hash(event)
    except Exception:  # noqa: BLE001 - an event that cannot be hashed is a broken event
        return None

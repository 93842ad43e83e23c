"""Alerts: recorded in the catalog (`RolloutStore.raise_alert`), then POSTed to a webhook with retries.

An alert is raised once per `alert_key` (the catalog's unique key), with delivery status `pending`.
`deliver_pending` POSTs every pending alert, oldest first (catalog id order), as one JSON object:

    {"version": "pcbo.alert/1", "alert_key", "kind", "severity", "subject", "detail", "raised_at"}

(`raised_at` in `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`; null for a row whose time is not one: such a row is
read, blocks no other alert and is never sent, since pcbo never writes one: a row written by hand, or a
genuine one whose `raised_at` was changed, does not verify under its content MAC, which covers
`raised_at`). A 2xx answer marks the alert `delivered`.
Connection errors, timeouts, 408, 425, 429 and 5xx are retried with exponential backoff
(tenacity); other answers (3xx: redirects are not followed, 4xx) are not retried. An alert answered
4xx is marked `failed` (kept with its redacted `last_error`, never sent again: the webhook will not
take it); any other alert that still fails stays `pending` with a redacted `last_error` and is sent
again by the next call. After an alert whose retries are exhausted the next alert is tried once:
when that fails too (the webhook looks down) the call stops, so a down webhook costs one alert's
retries and one attempt per call rather than every alert's, and an alert the webhook always fails
on holds back no other; after a 4xx it goes on with the next alert (that answer is about the
alert, or about the configuration, and the others may pass).
Delivery is at least once: a receiver deduplicates by `alert_key`.

**Authenticated.** Someone who can write the catalog must not make pcbo POST an alert it did not
raise (with its token), nor silence one it did. Each row carries `mac`, an HMAC-SHA256 of its key
and content (the payload above), and `state_mac`, one of its key, `mac`, delivery status and
attempts, written with each delivery state pcbo records, under the alerts' key (`alert_secret`:
`PCBO_ALERT_KEY`, which every host that runs the sensor against one catalog must share, else a random
key made once in `$PCBO_HOME/.keys/alert.key`, mode 0600; never in the catalog). A row whose `mac`
does not verify is never sent and never counts as raised: a pending one is a finding (logged once,
marked `unauthenticated`), and one holding the key of an alert being raised (a squatter) is
overwritten by that alert (a finding). A delivery state whose `state_mac` does not verify (a real
alert marked delivered, failed or unauthenticated by hand) is not trusted: the alert is sent again
(a finding). Rows from before migration 0010 have no MAC: they are treated as any unauthenticated
row (a pending one is not sent; the others are left as they are).

The webhook comes from `PCBO_ALERT_WEBHOOK_URL` (none: alerts are only recorded) and an optional
bearer token from `PCBO_ALERT_WEBHOOK_TOKEN` (`AlertWebhook.from_env`). Credentials in the URL
(`https://user:pass@host/...`) are sent as HTTP Basic authorization unless a token is given. A token
or a URL password for a plain-`http` webhook that is not on loopback (`localhost`, 127.0.0.0/8, ::1)
is refused (`ValueError` naming its variable): it would cross the network in the clear. The
URL's userinfo and query string, the token and the Authorization header never appear in reports,
`last_error`, exceptions or logs (`AlertWebhook.endpoint` is the redacted URL).

No Dagster import here: the Dagster sensor (`dagster_defs/alerts/sensors.py`) finds what to
alert on and calls `raise_and_deliver`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pcbo_dagster.catalog.rollouts import RolloutStore
from pcbo_dagster.core.instants import format_datetime
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.io.clock import utc_now
from pcbo_dagster.io.host_keys import host_secret
from pcbo_dagster.io.http_delivery import DeliveryFailed, JsonPoster, on_loopback
from pcbo_dagster.io.redaction import redact_url, scrub_text

logger = logging.getLogger(__name__)

ALERT_VERSION = "pcbo.alert/1"
WEBHOOK_URL_ENV = "PCBO_ALERT_WEBHOOK_URL"
WEBHOOK_TOKEN_ENV = "PCBO_ALERT_WEBHOOK_TOKEN"
SEVERITIES = ("info", "warning", "error", "critical")
ALERT_KEY_ENV = "PCBO_ALERT_KEY"
#: Under the home, hidden, as the zone indexes' key (`io/host_keys.py`).
ALERT_KEY_FILE = ".keys/alert.key"


def json_safe(value: Any, max_text: int = 2000) -> Any:
    """`value` as something `json.dumps(allow_nan=False)` accepts: non-finite floats and unknown
    types become (bounded) strings, mapping keys strings."""
    if value is None or isinstance(value, bool | int | str):
        return value[:max_text] if isinstance(value, str) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, max_text) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, max_text) for v in value]
    return str(value)[:max_text]


def alert_payload(alert: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object POSTed for an alert row of `RolloutStore.alerts()`."""
    return {
        "version": ALERT_VERSION,
        "alert_key": alert["alert_key"],
        "kind": alert["kind"],
        "severity": alert["severity"],
        "subject": alert["subject"],
        "detail": alert["detail"],
        "raised_at": None if alert["raised_at"] is None else format_datetime(alert["raised_at"]),
    }


def alert_secret(home: Path, environ: Mapping[str, str] | None = None) -> bytes:
    """The secret alert rows are authenticated with (module doc): the SHA-256 of `PCBO_ALERT_KEY`,
    else 32 random bytes kept in `home/.keys/alert.key` (`io.host_keys.host_secret`)."""
    return host_secret(home, ALERT_KEY_ENV, ALERT_KEY_FILE, environ)


def content_mac(secret: bytes, alert: Mapping[str, Any]) -> str:
    """The HMAC-SHA256 (hex) of an alert row's key and content: the payload POSTed for it."""
    message = b"pcbo.alert-content/1\0" + compact_text(alert_payload(alert)).encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def state_mac(secret: bytes, alert_key: str, mac: str, status: str, attempts: int) -> str:
    """The HMAC-SHA256 (hex) of an alert's delivery state as pcbo wrote it."""
    message = b"pcbo.alert-state/1\0" + compact_text([alert_key, mac, status, attempts]).encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _same(stored: Any, expected: str) -> bool:
    return isinstance(stored, str) and hmac.compare_digest(stored.encode("utf-8"), expected.encode("ascii"))


def content_verifies(secret: bytes, alert: Mapping[str, Any]) -> bool:
    """Whether an alert row (`RolloutStore.alerts()`) is one pcbo raised, unaltered."""
    try:
        return _same(alert.get("mac"), content_mac(secret, alert))
    except (TypeError, ValueError):  # a row written by hand that is no alert
        return False


def state_verifies(secret: bytes, state: Mapping[str, Any]) -> bool:
    """Whether an alert's delivery state (`RolloutStore.alert_states()`) is one pcbo wrote for it."""
    mac, attempts = state.get("mac"), state.get("attempts")
    if not isinstance(mac, str) or not isinstance(attempts, int) or isinstance(attempts, bool):
        return False
    expected = state_mac(secret, str(state["alert_key"]), mac, str(state["delivery_status"]), attempts)
    return _same(state.get("state_mac"), expected)


def _shown_key(key: Any) -> str:
    """A text from a row pcbo may not have written (a key, a status), for a finding: scrubbed, bounded,
    on one line (a control character is `?`: a forged row writes no line of its own into a log)."""
    return "".join(c if c.isprintable() else "?" for c in scrub_text(str(key))[:200])


class AlertWebhook(JsonPoster):
    """POSTs alerts to `url` (http or https) with retries and exponential backoff.

    `attempts` tries per alert; waits start at `initial_wait` seconds and double up to `max_wait`;
    `timeout` bounds each request. `token` is sent as `Authorization: Bearer <token>`. Neither the
    token, the URL's userinfo or query, nor any header value is ever reported or logged. The HTTP
    part, and `scrub`, are `JsonPoster`'s (`pcbo_dagster.io.http_delivery`).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        attempts: int = 3,
        initial_wait: float = 0.5,
        max_wait: float = 5.0,
        timeout: float = 10.0,
    ) -> None:
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
        except ValueError:
            parts, host = urllib.parse.urlsplit(""), None  # JsonPoster names what is wrong with the URL
        if parts.scheme == "http" and not on_loopback(host):
            # Sent in the clear, a credential is anyone's on the path: refused, never shown.
            if token:
                raise ValueError(
                    "a bearer token is refused for a plain-http webhook off loopback "
                    f"({redact_url(url)}): use https"
                )
            if parts.password:
                raise ValueError(
                    f"credentials in a plain-http webhook URL off loopback are refused ({redact_url(url)}): "
                    "use https"
                )
        super().__init__(
            url,
            name="alert webhook",
            label="alert delivery",
            user_agent="pcbo-alerts/1",
            token=token,
            attempts=attempts,
            initial_wait=initial_wait,
            max_wait=max_wait,
            timeout=timeout,
            logger=logger,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> AlertWebhook | None:
        """The webhook of `PCBO_ALERT_WEBHOOK_URL` (with `PCBO_ALERT_WEBHOOK_TOKEN` when set), or None
        when no URL is configured. `options` go to the constructor (attempts, timeout, ...). A value
        that cannot be used is a `ValueError` beginning with its variable's name (`<variable>: why`;
        the URL redacted, never the token)."""
        env = os.environ if environ is None else environ
        url = (env.get(WEBHOOK_URL_ENV) or "").strip()
        if not url:
            return None
        token = (env.get(WEBHOOK_TOKEN_ENV) or "").strip() or None
        try:
            cls(url, **options)
        except ValueError as exc:
            raise ValueError(f"{WEBHOOK_URL_ENV}: {exc}") from None
        try:
            return cls(url, token=token, **options)
        except ValueError as exc:
            raise ValueError(f"{WEBHOOK_TOKEN_ENV}: {exc}") from None

    def __repr__(self) -> str:
        return f"AlertWebhook({self.endpoint!r}, attempts={self.attempts})"

    def send(self, payload: Mapping[str, Any], attempts: int | None = None) -> int:
        """POST one alert, retrying (`attempts` times, default the webhook's); the number of attempts
        made.

        Raises `AlertDeliveryError` (a redacted message, `retryable` telling whether the retries
        ran out or the answer was not retryable) when it still fails."""
        body = compact_text(payload).encode("utf-8")
        try:
            return self.post(body, str(payload.get("alert_key")), attempts)
        except DeliveryFailed as exc:
            message = self.scrub(f"{self.endpoint}: {exc.reason} after {exc.attempts} attempt(s)")
            raise AlertDeliveryError(message, exc.attempts, exc.retryable, exc.status) from None


class AlertDeliveryError(RuntimeError):
    """An alert that still failed after its retries; the message holds no secret. `status`: the
    webhook's last HTTP status (None: no answer)."""

    def __init__(self, message: str, attempts: int, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.retryable = retryable
        self.status = status

    @property
    def refused(self) -> bool:
        """A 4xx answer that is not retried (not 408, 425, 429): the webhook will not take this
        alert; it is marked `failed` (kept, not sent again)."""
        return not self.retryable and self.status is not None and 400 <= self.status < 500


def _webhook(
    webhook: AlertWebhook | str,
    token: str | None,
    attempts: int,
    initial_wait: float,
    max_wait: float,
    timeout: float,
) -> AlertWebhook:
    if isinstance(webhook, AlertWebhook):
        return webhook
    return AlertWebhook(
        webhook,
        token=token,
        attempts=attempts,
        initial_wait=initial_wait,
        max_wait=max_wait,
        timeout=timeout,
    )


def _to_send(store: RolloutStore, secret: bytes, findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alert rows to send, in id order: those whose delivery state pcbo wrote as `pending`, and
    those whose delivery state pcbo did not write (someone marked a real alert delivered or failed),
    each only when its content MAC verifies. A pending row that does not verify is never sent: it is
    a finding, once (it is marked `unauthenticated`). A row with no MAC that is not pending (written
    before migration 0010, or by hand) sends nothing and is left as it is."""
    wanted: dict[int, bool] = {}  # id -> whether pcbo wrote its delivery state
    for state in store.alert_states():
        trusted = state_verifies(secret, state)
        if trusted and state["delivery_status"] != "pending":
            continue  # delivered or failed, as pcbo recorded it
        if state["mac"] is None and state["delivery_status"] != "pending":
            continue  # no alert pcbo raised: nothing to send, nothing it stands for
        wanted[state["id"]] = trusted
    rows: list[dict[str, Any]] = []
    for index in range(0, len(wanted), 500):
        rows += store.alerts(ids=list(wanted)[index : index + 500])
    to_send = []
    for row in rows:
        if not content_verifies(secret, row):
            if row["delivery_status"] == "pending":
                findings.append(
                    {
                        "alertId": row["id"],
                        "alertKey": _shown_key(row["alert_key"]),
                        "finding": "a pending alert row pcbo did not raise (its MAC does not verify: "
                        "written into the catalog, or raised before alerts were authenticated): "
                        "not sent, marked unauthenticated",
                    }
                )
                store.mark_alert_unauthenticated(row["id"])
            continue
        if not wanted[row["id"]]:
            findings.append(
                {
                    "alertId": row["id"],
                    "alertKey": _shown_key(row["alert_key"]),
                    "finding": f"an alert whose delivery state pcbo did not write (it reads "
                    f"{_shown_key(row['delivery_status'])!r}): sent again",
                }
            )
        to_send.append(row)
    return to_send


def deliver_pending(
    store: RolloutStore,
    webhook: AlertWebhook | str,
    *,
    secret: bytes,
    token: str | None = None,
    attempts: int = 3,
    initial_wait: float = 0.5,
    max_wait: float = 5.0,
    timeout: float = 10.0,
    budget_seconds: float | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """POST every pending alert, oldest first; a report (camelCase keys, no secrets).

    Only alert rows whose MACs under `secret` verify are sent (module doc); a real alert whose
    delivery state pcbo did not write is sent again. `webhook` is an `AlertWebhook` or a URL (then
    `token`, `attempts`, `initial_wait`, `max_wait` and `timeout` build one). After an alert whose
    retries ran out, tries the next one once and stops when that fails too (the webhook looks down),
    and before starting an alert once `budget_seconds` have passed; what is left stays pending for
    the next call. Never raises for delivery failures.

    An alert answered 4xx (not 408, 425, 429: those are retried) is marked `failed`: kept with its
    error, never sent again (to send it again, set its status back to `pending`: a delivery state
    pcbo did not write is not trusted, so the alert goes again, named as a finding).

    Report: `endpoint` (redacted), `pending` (before the call), `delivered`, `failed` (refused with a
    4xx: marked failed), `left` (still pending), `errors` (`[{"alertKey", "error"}]`), `lastError`,
    `stopped` (why it stopped early, or None), `findings` (`[{"alertId", "alertKey", "finding"}]`:
    rows pcbo did not write), `ok` (nothing left, none refused).
    """
    hook = _webhook(webhook, token, attempts, initial_wait, max_wait, timeout)
    started = time.monotonic()
    findings: list[dict[str, Any]] = []
    pending = _to_send(store, secret, findings)
    for finding in findings:
        finding["alertKey"] = hook.scrub(finding["alertKey"])
        logger.warning("alert row %s (%s): %s", finding["alertId"], finding["alertKey"], finding["finding"])
    delivered = failed = 0
    errors: list[dict[str, str]] = []
    stopped: str | None = None
    probing = False  # the alert before ran out of retries: was it the webhook, or that alert?

    def record(alert: Mapping[str, Any], status: str, made: int, error: str | None = None) -> None:
        total = int(alert["attempts"]) + made if isinstance(alert["attempts"], int) else made
        mac = state_mac(secret, alert["alert_key"], alert["mac"], status, total)
        store.record_delivery(alert["id"], status=status, attempts=total, state_mac=mac, error=error, now=now)

    for index, alert in enumerate(pending):
        if budget_seconds is not None and time.monotonic() - started >= budget_seconds:
            stopped = f"time budget of {budget_seconds:g} s used up"
            break
        try:
            made = hook.send(alert_payload(alert), 1 if probing else None)
        except AlertDeliveryError as exc:
            error = str(exc)
            record(alert, "failed" if exc.refused else "pending", exc.attempts, error)
            failed += exc.refused
            errors.append({"alertKey": alert["alert_key"], "error": error})
            logger.warning("alert delivery of %s failed: %s", alert["alert_key"], error)
            if exc.retryable:
                if probing:
                    if index + 1 < len(pending):
                        stopped = "the webhook is not answering; the remaining alerts wait for the next call"
                    break
                probing = True
            continue
        probing = False
        record(alert, "delivered", made)
        delivered += 1
    left = len(pending) - delivered - failed
    report = {
        "endpoint": hook.endpoint,
        "pending": len(pending),
        "delivered": delivered,
        "failed": failed,
        "left": left,
        "errors": errors,
        "lastError": errors[-1]["error"] if errors else None,
        "stopped": stopped,
        "findings": findings,
        "ok": left == 0 and failed == 0,
    }
    if pending:
        log = logger.info if left == 0 and failed == 0 else logger.warning
        log(
            "alert delivery to %s: %d delivered, %d refused (failed), %d left pending",
            hook.endpoint,
            delivered,
            failed,
            left,
        )
    return report


def raise_alerts(
    store: RolloutStore,
    alerts: Iterable[Mapping[str, Any]],
    now: datetime | None = None,
    *,
    secret: bytes,
    findings: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Record each alert (`alert_key`, `kind`, `severity`, `subject`, optional `detail`) with its MACs
    under `secret`; the keys newly raised. A key raised before is skipped; a key held by a row whose
    MAC does not verify (someone took the key of an upcoming alert) is raised over that row, a
    finding appended to `findings`."""
    alerts = list(alerts)
    for alert in alerts:
        if alert.get("severity") not in SEVERITIES:
            raise ValueError(
                f"alert {alert.get('alert_key')}: severity must be one of {', '.join(SEVERITIES)}, "
                f"not {alert.get('severity')!r}"
            )
    moment = now or utc_now()
    raised: list[str] = []
    for alert in alerts:
        key = alert["alert_key"]
        row = {
            "alert_key": key,
            "kind": alert["kind"],
            "severity": alert["severity"],
            "subject": alert["subject"],
            "detail": json_safe(dict(alert.get("detail") or {})),
            "raised_at": moment,
        }
        mac = content_mac(secret, row)
        values = {**row, "mac": mac, "state_mac": state_mac(secret, key, mac, "pending", 0)}
        values["now"] = values.pop("raised_at")
        for _ in range(3):  # a row written under the key meanwhile is looked at again
            held = store.alert(key)  # a cheap read first: no write transaction for a repeat
            if held is not None and content_verifies(secret, held):
                break
            if store.raise_alert(**values, replacing=None if held is None else held["id"]) is None:
                continue
            if held is not None:
                finding = {
                    "alertId": held["id"],
                    "alertKey": _shown_key(key),
                    "finding": f"the alert's key was held by a row pcbo did not raise (it read "
                    f"{_shown_key(held['delivery_status'])!r}): the alert is raised over it",
                }
                logger.warning("alert row %s (%s): %s", held["id"], finding["alertKey"], finding["finding"])
                if findings is not None:
                    findings.append(finding)
            raised.append(key)
            logger.info("alert raised: %s (%s, %s)", key, alert["kind"], alert["severity"])
            break
    return raised


def raise_and_deliver(
    store: RolloutStore,
    alerts: Iterable[Mapping[str, Any]],
    webhook: AlertWebhook | str | None,
    now: datetime | None = None,
    *,
    secret: bytes,
    **delivery: Any,
) -> dict[str, Any]:
    """Record `alerts` (each once), then deliver every pending alert (these and earlier ones whose
    delivery failed) when a webhook is configured; rows are authenticated under `secret`
    (`alert_secret`).

    Report: `raised` (the keys newly raised), `findings` (rows pcbo did not write: a key taken from
    an upcoming alert, a forged pending row, a delivery state set by hand; no secret), `delivery`
    (`deliver_pending`'s report, or None without a webhook: the alerts are only recorded).
    `delivery` options go to `deliver_pending`.
    """
    if isinstance(webhook, str):  # built once: its secrets are scrubbed from the alerts below
        options: dict[str, Any] = {"token": None, "attempts": 3, "initial_wait": 0.5, "max_wait": 5.0}
        options.update({k: delivery.pop(k) for k in list(delivery) if k in (*options, "timeout")})
        webhook = AlertWebhook(webhook, **options)
    if webhook is not None:
        # The webhook's own secrets (its token, its URL's password or query) never go into an
        # alert: a failure whose text holds them would store them in the catalog and send them.
        hook = webhook
        alerts = [
            {
                **alert,
                "subject": hook.scrub(str(alert["subject"])),
                "detail": hook.scrub_document(json_safe(dict(alert.get("detail") or {}))),
            }
            for alert in alerts
        ]
    findings: list[dict[str, Any]] = []
    raised = raise_alerts(store, alerts, now, secret=secret, findings=findings)
    report: dict[str, Any] = {"raised": raised, "findings": findings, "delivery": None}
    if webhook is None:
        if raised:
            logger.info(
                "%d alert(s) recorded; no webhook (%s unset), so none is delivered",
                len(raised),
                WEBHOOK_URL_ENV,
            )
        return report
    for finding in findings:
        finding["alertKey"] = webhook.scrub(finding["alertKey"])
    report["delivery"] = deliver_pending(store, webhook, secret=secret, now=now, **delivery)
    findings += report["delivery"]["findings"]
    return report

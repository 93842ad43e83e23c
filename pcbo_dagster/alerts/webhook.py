"""Alerts: recorded in the catalog (`RolloutStore.raise_alert`), then POSTed to a webhook with retries.

An alert is raised once per `alert_key` (the catalog's unique key), with delivery status `pending`.
`deliver_pending` POSTs every pending alert, oldest first (catalog id order), as one JSON object:

    {"version": "pcbo.alert/1", "alert_key", "kind", "severity", "subject", "detail", "raised_at"}

(`raised_at` in `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`; null for a row whose time is not one: a row written
by hand is sent as it reads and blocks no other alert). A 2xx answer marks the alert `delivered`.
Connection errors, timeouts, 408, 425, 429 and 5xx are retried with exponential backoff
(tenacity); other answers (3xx: redirects are not followed, 4xx) are not retried. An alert that
still fails stays `pending` with a redacted `last_error` and is sent again by the next call. After
an alert whose retries are exhausted the next alert is tried once: when that fails too (the webhook
looks down) the call stops, so a down webhook costs one alert's retries and one attempt per call
rather than every alert's, and an alert the webhook always fails on (a row written into the catalog
by hand) holds back no other; after a 4xx it goes on with the next alert (that answer is about the
alert, or about the configuration, and the others may pass).
Delivery is at least once: a receiver deduplicates by `alert_key`.

The webhook comes from `PCBO_ALERT_WEBHOOK_URL` (none: alerts are only recorded) and an optional
bearer token from `PCBO_ALERT_WEBHOOK_TOKEN` (`AlertWebhook.from_env`). Credentials in the URL
(`https://user:pass@host/...`) are sent as HTTP Basic authorization unless a token is given. The
URL's userinfo and query string, the token and the Authorization header never appear in reports,
`last_error`, exceptions or logs (`AlertWebhook.endpoint` is the redacted URL).

No Dagster import here: the Dagster sensor (`dagster_defs/alerts/sensors.py`) finds what to
alert on and calls `raise_and_deliver`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pcbo_dagster.catalog.rollouts import RolloutStore
from pcbo_dagster.core.instants import format_datetime
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.io.http_delivery import DeliveryFailed, JsonPoster

logger = logging.getLogger(__name__)

ALERT_VERSION = "pcbo.alert/1"
WEBHOOK_URL_ENV = "PCBO_ALERT_WEBHOOK_URL"
WEBHOOK_TOKEN_ENV = "PCBO_ALERT_WEBHOOK_TOKEN"
SEVERITIES = ("info", "warning", "error", "critical")


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
            raise AlertDeliveryError(message, exc.attempts, exc.retryable) from None


class AlertDeliveryError(RuntimeError):
    """An alert that still failed after its retries; the message holds no secret."""

    def __init__(self, message: str, attempts: int, retryable: bool) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.retryable = retryable


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


def deliver_pending(
    store: RolloutStore,
    webhook: AlertWebhook | str,
    *,
    token: str | None = None,
    attempts: int = 3,
    initial_wait: float = 0.5,
    max_wait: float = 5.0,
    timeout: float = 10.0,
    budget_seconds: float | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """POST every pending alert, oldest first; a report (camelCase keys, no secrets).

    `webhook` is an `AlertWebhook` or a URL (then `token`, `attempts`, `initial_wait`, `max_wait`
    and `timeout` build one). After an alert whose retries ran out, tries the next one once and stops
    when that fails too (the webhook looks down), and before starting an alert once `budget_seconds`
    have passed; what is left stays pending for
    the next call. Never raises for delivery failures.

    Report: `endpoint` (redacted), `pending` (before the call), `delivered`, `left` (still
    pending), `errors` (`[{"alertKey", "error"}]`), `lastError`, `stopped` (why it stopped
    early, or None), `ok` (nothing left).
    """
    hook = _webhook(webhook, token, attempts, initial_wait, max_wait, timeout)
    started = time.monotonic()
    pending = store.alerts("pending")
    delivered = 0
    errors: list[dict[str, str]] = []
    stopped: str | None = None
    probing = False  # the alert before ran out of retries: was it the webhook, or that alert?
    for index, alert in enumerate(pending):
        if budget_seconds is not None and time.monotonic() - started >= budget_seconds:
            stopped = f"time budget of {budget_seconds:g} s used up"
            break
        try:
            made = hook.send(alert_payload(alert), 1 if probing else None)
        except AlertDeliveryError as exc:
            error = str(exc)
            store.record_delivery(alert["id"], delivered=False, attempts=exc.attempts, error=error, now=now)
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
        store.record_delivery(alert["id"], delivered=True, attempts=made, now=now)
        delivered += 1
    left = len(pending) - delivered
    report = {
        "endpoint": hook.endpoint,
        "pending": len(pending),
        "delivered": delivered,
        "left": left,
        "errors": errors,
        "lastError": errors[-1]["error"] if errors else None,
        "stopped": stopped,
        "ok": left == 0,
    }
    if pending:
        log = logger.info if left == 0 else logger.warning
        log("alert delivery to %s: %d delivered, %d left pending", hook.endpoint, delivered, left)
    return report


def raise_alerts(
    store: RolloutStore, alerts: Iterable[Mapping[str, Any]], now: datetime | None = None
) -> list[str]:
    """Record each alert (`alert_key`, `kind`, `severity`, `subject`, optional `detail`); the keys
    newly raised (a key raised before is skipped)."""
    alerts = list(alerts)
    for alert in alerts:
        if alert.get("severity") not in SEVERITIES:
            raise ValueError(
                f"alert {alert.get('alert_key')}: severity must be one of {', '.join(SEVERITIES)}, "
                f"not {alert.get('severity')!r}"
            )
    raised: list[str] = []
    for alert in alerts:
        key = alert["alert_key"]
        if store.alert(key) is not None:  # a cheap read first: no write transaction for a repeat
            continue
        row = store.raise_alert(
            alert_key=key,
            kind=alert["kind"],
            severity=alert["severity"],
            subject=alert["subject"],
            detail=json_safe(dict(alert.get("detail") or {})),
            now=now,
        )
        if row is not None:
            raised.append(key)
            logger.info("alert raised: %s (%s, %s)", key, alert["kind"], alert["severity"])
    return raised


def raise_and_deliver(
    store: RolloutStore,
    alerts: Iterable[Mapping[str, Any]],
    webhook: AlertWebhook | str | None,
    now: datetime | None = None,
    **delivery: Any,
) -> dict[str, Any]:
    """Record `alerts` (each once), then deliver every pending alert (these and earlier ones whose
    delivery failed) when a webhook is configured.

    Report: `raised` (the keys newly raised), `delivery` (`deliver_pending`'s report, or None
    without a webhook: the alerts are only recorded). `delivery` options go to `deliver_pending`.
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
    raised = raise_alerts(store, alerts, now)
    report: dict[str, Any] = {"raised": raised, "delivery": None}
    if webhook is None:
        if raised:
            logger.info(
                "%d alert(s) recorded; no webhook (%s unset), so none is delivered",
                len(raised),
                WEBHOOK_URL_ENV,
            )
        return report
    report["delivery"] = deliver_pending(store, webhook, now=now, **delivery)
    return report

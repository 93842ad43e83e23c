"""Alerts: recorded in the catalog, delivered to a real HTTP receiver on loopback with retries, and
raised by the `pcbo_alerts` sensor for failed asset checks (blocking or not) and failed runs."""

from __future__ import annotations

import json
import logging
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from pcbo_dagster.alerts.webhook import (
    ALERT_VERSION,
    WEBHOOK_TOKEN_ENV,
    WEBHOOK_URL_ENV,
    AlertDeliveryError,
    AlertWebhook,
    alert_payload,
    deliver_pending,
    raise_and_deliver,
)
from pcbo_dagster.catalog import CatalogStore, default_catalog_url
from pcbo_dagster.catalog.rollouts import RolloutStore
from pcbo_dagster.dagster_defs.alerts.sensors import SENSOR_NAME, alert_store, build_alerts_sensor
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.io.redaction import scrub_text
from pcbo_dagster_tests.loopback import DripReceiver, RecordingReceiver

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECRET = bytes(range(32))  # the alerts' key of the tests that call delivery directly


class Receiver(RecordingReceiver):
    """A loopback alert webhook (`RecordingReceiver`, failing with 500): `poison` (an alert key) is
    answered 500 always; otherwise 200 (the body is kept in `accepted`)."""

    path = "/hooks/pcbo"

    def __init__(self) -> None:
        super().__init__(fail_status=500)
        self.accepted: list[dict] = []
        self.poison = ""  # the alert key answered 500, always

    def answer(self, body: bytes) -> int:
        if self.poison and json.loads(body).get("alert_key") == self.poison:
            return 500
        return super().answer(body)

    def accept(self, body: bytes) -> int:
        self.accepted.append(json.loads(body))
        return 200

    def accepted_keys(self) -> list[str]:
        return [a["alert_key"] for a in self.accepted]

    def request_keys(self) -> list[str]:
        return [json.loads(r["body"])["alert_key"] for r in self.requests]


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.close()


@pytest.fixture
def store(tmp_path):
    catalog = CatalogStore(default_catalog_url(tmp_path))
    catalog.migrate()
    yield RolloutStore(catalog)
    catalog.close()


def alert(n: int, **extra) -> dict:
    return {
        "alert_key": f"test:{n}",
        "kind": "run_failed",
        "severity": "error",
        "subject": f"thing {n} failed",
        "detail": {"n": n, **extra},
    }


#: `alert(1)` raised at NOW, as the webhook receives it.
SENT_1 = {
    "version": ALERT_VERSION,
    "alert_key": "test:1",
    "kind": "run_failed",
    "severity": "error",
    "subject": "thing 1 failed",
    "detail": {"n": 1},
    "raised_at": "2026-03-01T12:00:00Z",
}


def fast(url: str, **options) -> AlertWebhook:
    return AlertWebhook(url, attempts=options.pop("attempts", 3), initial_wait=0.01, max_wait=0.02, **options)


# -- delivery -------------------------------------------------------------------------------------


def test_delivery_retries_while_the_receiver_fails_then_recovers(store, receiver):
    receiver.fail_next = 2
    report = raise_and_deliver(store, [alert(1)], fast(receiver.url), now=NOW, secret=SECRET)
    assert report["raised"] == ["test:1"]
    delivery = report["delivery"]
    assert (delivery["pending"], delivery["delivered"], delivery["left"], delivery["ok"]) == (1, 1, 0, True)
    assert delivery["errors"] == [] and delivery["lastError"] is None
    assert [r["status"] for r in receiver.requests] == [500, 500, 200]
    assert receiver.accepted == [SENT_1]
    assert receiver.requests[-1]["headers"]["Content-Type"] == "application/json"
    row = store.alert("test:1")
    assert (row["delivery_status"], row["attempts"], row["last_error"]) == ("delivered", 3, None)
    assert row["delivered_at"] == NOW


def test_alert_stays_pending_while_down_and_a_later_call_delivers_in_order(store, receiver):
    receiver.down = True
    hook = fast(receiver.url)
    report = raise_and_deliver(store, [alert(1), alert(2)], hook, now=NOW, secret=SECRET)
    delivery = report["delivery"]
    assert (delivery["pending"], delivery["delivered"], delivery["left"], delivery["ok"]) == (2, 0, 2, False)
    assert "HTTP 500" in delivery["errors"][0]["error"] and "3 attempt(s)" in delivery["errors"][0]["error"]
    assert "HTTP 500" in delivery["lastError"] and "1 attempt(s)" in delivery["lastError"]
    # A down webhook costs one alert's retries and one attempt at the next (here the last: no stop).
    assert delivery["stopped"] is None
    assert receiver.request_keys() == ["test:1"] * 3 + ["test:2"]
    first = store.alert("test:1")
    assert (first["delivery_status"], first["attempts"]) == ("pending", 3)
    assert "HTTP 500" in first["last_error"]
    assert store.alert("test:2")["attempts"] == 1

    # Raising the same alert again is a no-op; a new one joins the queue behind the pending ones.
    report = raise_and_deliver(store, [alert(1), alert(3)], hook, now=NOW, secret=SECRET)
    assert report["raised"] == ["test:3"]
    assert report["delivery"]["delivered"] == 0 and report["delivery"]["left"] == 3
    assert report["delivery"]["stopped"]  # test:3 waits for the next call, untried
    assert store.alert("test:3")["attempts"] == 0

    receiver.down = False
    report = deliver_pending(store, hook, secret=SECRET)
    assert (report["pending"], report["delivered"], report["left"], report["ok"]) == (3, 3, 0, True)
    assert receiver.accepted_keys() == ["test:1", "test:2", "test:3"]
    assert store.alerts("pending") == []
    assert [a["attempts"] for a in store.alerts()] == [7, 3, 1]
    assert all(a["last_error"] is None for a in store.alerts())

    # Nothing pending: nothing sent.
    sent = len(receiver.requests)
    assert deliver_pending(store, hook, secret=SECRET)["pending"] == 0
    assert len(receiver.requests) == sent


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_a_4xx_is_not_retried_marks_the_alert_failed_and_later_alerts_still_go(store, receiver, status):
    """Red-team finding: an alert answered 4xx (the webhook will not take it) stayed pending and was
    sent again on every tick, for ever; the schema's `failed` status was never used. It is now marked
    `failed` (kept with its error, never sent again) and the next alert still goes."""
    raise_and_deliver(store, [alert(1), alert(2)], None, now=NOW, secret=SECRET)
    receiver.fail_next, receiver.fail_status = 1, status
    report = deliver_pending(store, fast(receiver.url), secret=SECRET)
    assert (report["delivered"], report["failed"], report["left"], report["stopped"]) == (1, 1, 0, None)
    assert report["ok"] is False
    assert f"HTTP {status} (not retried)" in report["lastError"]
    assert receiver.request_keys() == ["test:1", "test:2"]
    failed = store.alert("test:1")
    assert (failed["delivery_status"], failed["attempts"]) == ("failed", 1)
    assert f"HTTP {status}" in failed["last_error"]
    assert store.alert("test:2")["delivery_status"] == "delivered"
    again = deliver_pending(store, fast(receiver.url), secret=SECRET)
    assert (again["pending"], again["findings"]) == (0, [])
    assert receiver.request_keys() == ["test:1", "test:2"]  # not sent again
    # Set back to pending by hand (the operator fixed the receiver): sent again, named as a finding.
    _sql(store, "UPDATE alerts SET delivery_status = 'pending' WHERE alert_key = 'test:1'")
    resent = deliver_pending(store, fast(receiver.url), secret=SECRET)
    assert resent["delivered"] == 1 and len(resent["findings"]) == 1
    assert receiver.accepted_keys() == ["test:2", "test:1"]


@pytest.mark.parametrize("status", [408, 425, 429, 503])
def test_a_retryable_answer_leaves_the_alert_pending(store, receiver, status):
    """408, 425, 429 and 5xx are retried, and an alert that still gets one stays pending (sent again
    by the next call), never `failed`."""
    receiver.down, receiver.fail_status = True, status
    report = raise_and_deliver(store, [alert(1)], fast(receiver.url, attempts=2), now=NOW, secret=SECRET)
    assert (report["delivery"]["failed"], report["delivery"]["left"]) == (0, 1)
    assert store.alert("test:1")["delivery_status"] == "pending"
    receiver.down = False
    assert deliver_pending(store, fast(receiver.url), secret=SECRET)["delivered"] == 1


def test_sensor_names_alerts_the_webhook_refuses(pcbo_env, receiver, monkeypatch):
    """A tick whose webhook answers 4xx says the alerts were refused and marked failed; the next tick
    sends nothing again."""
    monkeypatch.setenv(WEBHOOK_URL_ENV, receiver.url)
    sensor = build_alerts_sensor(delivery_initial_wait=0.01)
    receiver.down, receiver.fail_status = True, 403
    with dg.instance_for_test() as instance:
        doomed.execute_in_process(instance=instance, raise_on_error=False)
        first = tick(sensor, instance, pcbo_env, None)
        assert "DELIVERY REFUSED: 1 alert(s) answered 4xx, marked failed" in first.skip_reason.skip_message
        assert "HTTP 403" in first.skip_reason.skip_message
        second = tick(sensor, instance, pcbo_env, first.cursor)
    assert len(receiver.requests) == 1
    assert "nothing pending delivery" in second.skip_reason.skip_message


def test_without_a_webhook_alerts_are_only_recorded(store, monkeypatch):
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    assert AlertWebhook.from_env() is None
    report = raise_and_deliver(store, [alert(1), alert(1)], AlertWebhook.from_env(), now=NOW, secret=SECRET)
    assert report == {"raised": ["test:1"], "findings": [], "delivery": None}
    assert [a["alert_key"] for a in store.alerts("pending")] == ["test:1"]
    with pytest.raises(ValueError, match="severity"):
        raise_and_deliver(store, [dict(alert(2), severity="loud")], None, secret=SECRET)
    assert store.alert("test:2") is None


def test_the_payload_is_plain_json_even_for_odd_details(store, receiver):
    odd = alert(1, ratio=float("nan"), big=2**70, when=NOW)
    raise_and_deliver(store, [odd], fast(receiver.url), now=NOW, secret=SECRET)
    (got,) = receiver.accepted
    assert got["detail"] == {"n": 1, "ratio": "nan", "big": 2**70, "when": str(NOW)}
    assert got == alert_payload(store.alert("test:1"))


def test_secrets_never_reach_last_error_reports_or_logs(store, receiver, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    host, port = receiver.server.server_address[:2]
    password, query_secret, token = "pw-Zq81xK", "qs-Yt55bB", "tok-Hs93kP"
    url = f"http://alerter:{password}@{host}:{port}/hooks/pcbo?signature={query_secret}"
    monkeypatch.setenv(WEBHOOK_URL_ENV, url)
    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, token)
    hook = AlertWebhook.from_env(initial_wait=0.01, max_wait=0.02)
    assert hook.endpoint == f"http://{host}:{port}/hooks/pcbo?[redacted]"
    assert password not in repr(hook) and token not in repr(hook)

    receiver.down = True
    report = raise_and_deliver(store, [alert(1)], hook, now=NOW, secret=SECRET)
    # The receiver got the token as a bearer header, and the query string.
    assert receiver.requests[0]["headers"]["Authorization"] == f"Bearer {token}"
    assert receiver.requests[0]["path"] == f"/hooks/pcbo?signature={query_secret}"
    receiver.down = False
    assert deliver_pending(store, hook, secret=SECRET)["delivered"] == 1

    # Without a token, credentials in the URL are sent as HTTP Basic authorization.
    raise_and_deliver(store, [alert(2)], fast(url), now=NOW, secret=SECRET)
    assert receiver.requests[-1]["headers"]["Authorization"].startswith("Basic ")

    # A webhook that refuses connections (nothing listens on the port).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    dead = f"http://alerter:{password}@127.0.0.1:{closed_port}/hooks?signature={query_secret}"
    raise_and_deliver(store, [alert(3)], fast(dead, token=token), now=NOW, secret=SECRET)
    dead_report = deliver_pending(store, fast(dead, token=token), secret=SECRET)
    assert "connection failed" in dead_report["lastError"]
    with pytest.raises(ValueError) as bad:
        AlertWebhook(f"ftp://alerter:{password}@{host}/x?signature={query_secret}")

    texts = [
        caplog.text,
        json.dumps(report),
        json.dumps(dead_report),
        str(bad.value),
        *(a["last_error"] or "" for a in store.alerts()),
    ]
    assert any("HTTP 500" in t for t in texts)
    for text in texts:
        for secret in (password, query_secret, token, "alerter:"):
            assert secret not in text, (secret, text)
        assert "Authorization" not in text and "Bearer" not in text


def test_a_token_that_cannot_be_sent_is_refused_without_showing_it(store, receiver, monkeypatch):
    """Red-team finding: a `PCBO_ALERT_WEBHOOK_TOKEN` with a line break made http.client raise a
    ValueError carrying the header (escaped, so no scrub matched it): the token leaked into the error,
    and every alert after it stayed undelivered. Such a token is refused when the webhook is made,
    naming the problem, never the token."""
    host, port = receiver.server.server_address[:2]
    monkeypatch.setenv(WEBHOOK_URL_ENV, f"http://{host}:{port}/hooks")
    for token in ("s3cr3t-TOKEN-part1\ns3cr3t-TOKEN-part2", "s3cr3t TOKEN", "s3cr3t-TÖKEN", "s3cr3t\x7f"):
        monkeypatch.setenv(WEBHOOK_TOKEN_ENV, token)
        with pytest.raises(ValueError) as refused:
            AlertWebhook.from_env()
        assert "token holds a control, space or non-ASCII character" in str(refused.value)
        shown = str(refused.value).replace(WEBHOOK_TOKEN_ENV, "")  # the variable is named
        assert "s3cr3t" not in shown and "TOKEN" not in shown
    monkeypatch.delenv(WEBHOOK_TOKEN_ENV)
    for url in (
        f"http://{host}:{port}/hooks?sig=S3CR3T\x01TOKEN",
        f"http://{host}:{port}/h\x7fooks?sig=S3CR3T",
    ):
        monkeypatch.setenv(WEBHOOK_URL_ENV, url)
        with pytest.raises(ValueError) as refused:
            AlertWebhook.from_env()
        assert "URL holds a control, space or non-ASCII character" in str(refused.value)
        assert "S3CR3T" not in str(refused.value)
    assert receiver.requests == []


def test_scrub_text_removes_url_credentials_and_queries():
    text = "failed: postgresql://u:secretpw@db:5432/x?sslkey=zz and https://h/p?token=abc, ok"
    assert (
        scrub_text(text)
        == "failed: postgresql://[redacted]@db:5432/x?[redacted] and https://h/p?[redacted], ok"
    )
    assert scrub_text("the token is tok-123", ["tok-123"]) == "the token is [redacted]"


# -- the sensor, on a real Dagster instance ----------------------------------------------------------

letters = dg.StaticPartitionsDefinition(["a", "b"])


@dg.asset(partitions_def=letters)
def lettered() -> int:
    return 1


@dg.asset_check(asset=lettered, blocking=False, description="warns only")
def lettered_rows() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description="3 rows missing",
        metadata={"missing": 3, "dsn": "postgresql://u:chkpw-777@db/x"},
    )


@dg.asset_check(asset=lettered)
def lettered_fine() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


@dg.asset
def gated() -> int:
    return 1


@dg.asset_check(asset=gated, blocking=True)
def gated_gate() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description="gate closed")


@dg.op
def explode() -> None:
    raise RuntimeError("could not reach postgresql://svc:runpw-4242@db.internal/pcbo?sslpassword=x1")


@dg.job
def doomed() -> None:
    explode()


@pytest.fixture
def pcbo_env(monkeypatch, tmp_path):
    for name in ("PCBO_HOME", "PCBO_CATALOG_URL", "PCBO_LAKE_URL", "PCBO_AUDIT_DIR", "PCBO_AUDIT_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(WEBHOOK_TOKEN_ENV, raising=False)
    return PcboEngineResource(home=str(tmp_path / "home"))


def tick(sensor: dg.SensorDefinition, instance, pcbo, cursor):
    with dg.build_sensor_context(instance=instance, resources={"pcbo": pcbo}, cursor=cursor) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    assert not result.run_requests
    return result


def test_sensor_alerts_once_per_failed_check_and_failed_run(pcbo_env, receiver, monkeypatch, tmp_path):
    monkeypatch.setenv(WEBHOOK_URL_ENV, receiver.url)
    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, "tok-sensor-991")
    sensor = build_alerts_sensor(delivery_initial_wait=0.01)
    assert sensor.name == SENSOR_NAME == "pcbo_alerts"
    assert sensor.minimum_interval_seconds == 30
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING

    with dg.instance_for_test() as instance:
        ok = dg.materialize(
            [lettered, lettered_rows, lettered_fine],
            instance=instance,
            partition_key="a",
            raise_on_error=False,
        )
        assert ok.success  # a failed non-blocking check does not fail the run
        gate = dg.materialize([gated, gated_gate], instance=instance, raise_on_error=False)
        assert not gate.success
        boom = doomed.execute_in_process(instance=instance, raise_on_error=False)
        assert not boom.success

        receiver.fail_next = 2  # the webhook fails first, then recovers within the retries
        first = tick(sensor, instance, pcbo_env, None)
        expected = {
            f"check:{ok.run_id}:lettered:lettered_rows:",
            f"check:{gate.run_id}:gated:gated_gate:",
            f"run:{gate.run_id}",
            f"run:{boom.run_id}",
        }
        assert sorted(receiver.accepted_keys()) == sorted(expected)
        assert [r["status"] for r in receiver.requests][:2] == [500, 500]
        assert all(r["headers"]["Authorization"] == "Bearer tok-sensor-991" for r in receiver.requests)
        reason = first.skip_reason.skip_message
        assert "raised 4 alert(s) (2 failed check(s), 2 failed run(s))" in reason
        assert "delivered 4 of 4" in reason and "FAILED" not in reason

        by_key = {a["alert_key"]: a for a in receiver.accepted}
        warn = by_key[f"check:{ok.run_id}:lettered:lettered_rows:"]
        assert warn["kind"] == "asset_check_failed" and warn["severity"] == "warning"
        assert warn["detail"]["assetKey"] == "lettered" and warn["detail"]["checkName"] == "lettered_rows"
        assert warn["detail"]["blocking"] is False and warn["detail"]["runId"] == ok.run_id
        assert warn["detail"]["description"] == "3 rows missing"
        assert warn["detail"]["metadata"]["missing"] == 3
        assert warn["detail"]["runTags"]["partition"] == "a"
        blocking = by_key[f"check:{gate.run_id}:gated:gated_gate:"]
        assert blocking["severity"] == "error" and blocking["detail"]["blocking"] is True
        run_alert = by_key[f"run:{boom.run_id}"]
        assert run_alert["kind"] == "run_failed" and run_alert["detail"]["jobName"] == "doomed"
        assert "could not reach" in run_alert["detail"]["error"]
        assert run_alert["detail"]["failedSteps"][0]["step"] == "explode"
        assert "could not reach" in run_alert["detail"]["failedSteps"][0]["error"]
        payloads = json.dumps(receiver.accepted)
        for secret in ("runpw-4242", "chkpw-777", "sslpassword=x1"):
            assert secret not in payloads

        # Recorded in the catalog of the `pcbo` resource, all delivered.
        with alert_store(pcbo_env) as store:
            rows = store.alerts()
        assert sorted(a["alert_key"] for a in rows) == sorted(expected)
        assert {a["delivery_status"] for a in rows} == {"delivered"}

        # A second tick raises nothing new and sends nothing.
        sent = len(receiver.requests)
        second = tick(sensor, instance, pcbo_env, first.cursor)
        assert "raised 0 alert(s)" in second.skip_reason.skip_message
        assert len(receiver.requests) == sent
        # Even without its cursor (lost), nothing is raised twice.
        again = tick(sensor, instance, pcbo_env, None)
        assert "raised 0 alert(s)" in again.skip_reason.skip_message
        assert len(receiver.requests) == sent

        # A new failure after the cursor is raised by the next tick.
        later = doomed.execute_in_process(instance=instance, raise_on_error=False)
        third = tick(sensor, instance, pcbo_env, second.cursor)
        assert "raised 1 alert(s) (0 failed check(s), 1 failed run(s))" in third.skip_reason.skip_message
        assert receiver.accepted_keys()[-1] == f"run:{later.run_id}"
        assert len(receiver.accepted) == 5


def test_sensor_keeps_alerts_pending_while_the_webhook_is_down(pcbo_env, receiver, monkeypatch, caplog):
    monkeypatch.setenv(WEBHOOK_URL_ENV, receiver.url.replace("http://", "http://hookuser:hookpw-3141@"))
    sensor = build_alerts_sensor(delivery_initial_wait=0.01)
    with dg.instance_for_test() as instance:
        boom = doomed.execute_in_process(instance=instance, raise_on_error=False)
        checked = dg.materialize(
            [lettered, lettered_rows], instance=instance, partition_key="b", raise_on_error=False
        )
        receiver.down = True
        first = tick(sensor, instance, pcbo_env, None)
        reason = first.skip_reason.skip_message
        assert "raised 2 alert(s)" in reason
        assert "DELIVERY FAILED: 2 alert(s) left pending" in reason and "HTTP 500" in reason
        assert receiver.accepted == []
        with alert_store(pcbo_env) as store:
            pending = store.alerts("pending")
        # The first one used its retries, the other one attempt (the webhook looked down).
        assert len(pending) == 2 and "HTTP 500" in pending[0]["last_error"]
        assert (pending[0]["attempts"], pending[1]["attempts"]) == (3, 1)

        receiver.down = False
        second = tick(sensor, instance, pcbo_env, first.cursor)
        reason2 = second.skip_reason.skip_message
        assert "raised 0 alert(s)" in reason2 and "delivered 2 of 2" in reason2
        assert sorted(receiver.accepted_keys()) == sorted(
            [f"run:{boom.run_id}", f"check:{checked.run_id}:lettered:lettered_rows:"]
        )
        with alert_store(pcbo_env) as store:
            assert store.alerts("pending") == []
        for text in (reason, reason2, caplog.text, pending[0]["last_error"]):
            assert "hookpw-3141" not in text and "hookuser" not in text


def test_sensor_without_a_webhook_only_records(pcbo_env, monkeypatch):
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    sensor = build_alerts_sensor()
    with dg.instance_for_test() as instance:
        doomed.execute_in_process(instance=instance, raise_on_error=False)
        result = tick(sensor, instance, pcbo_env, None)
        assert "raised 1 alert(s)" in result.skip_reason.skip_message
        assert f"{WEBHOOK_URL_ENV} unset" in result.skip_reason.skip_message
        with alert_store(pcbo_env) as store:
            assert [a["kind"] for a in store.alerts("pending")] == ["run_failed"]


def test_sensor_loads_in_definitions_with_the_pcbo_resource(pcbo_env, monkeypatch):
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    defs = dg.Definitions(sensors=[build_alerts_sensor()], resources={"pcbo": pcbo_env})
    dg.Definitions.validate_loadable(defs)
    sensor = defs.get_sensor_def(SENSOR_NAME)
    with dg.instance_for_test() as instance:
        # An unreadable cursor counts as none (the look-back window is read again).
        result = tick(sensor, instance, pcbo_env, "not json")
        assert "raised 0 alert(s)" in result.skip_reason.skip_message
        assert set(json.loads(result.cursor)) == {"since", "runEnds", "runless", "sweep"}


def test_a_pending_alert_row_that_is_not_json_suppresses_no_other_alert(pcbo_env, receiver, monkeypatch):
    """Red-team finding: an `alerts` row written into the catalog by hand, pending, whose `detail` is
    not JSON made every tick fail when it read the pending alerts: every later alert was recorded but
    never delivered (and the sensor's cursor never moved). The row is read (no detail), never sent
    (pcbo did not raise it: its MAC does not verify) and named once as a finding; the real alert is
    delivered."""
    import sqlite3

    monkeypatch.setenv(WEBHOOK_URL_ENV, receiver.url)
    sensor = build_alerts_sensor(delivery_initial_wait=0.01)
    with alert_store(pcbo_env):
        pass  # the catalog, migrated
    with sqlite3.connect(Path(pcbo_env.home) / "catalog.db") as conn:
        conn.execute(
            "INSERT INTO alerts (alert_key, kind, severity, subject, detail, raised_at, delivery_status, "
            "attempts) VALUES ('forged', 'run_failed', 'error', 'x', '{not json', '2026-01-01 00:00:00', "
            "'pending', 0)"
        )
    with dg.instance_for_test() as instance:
        boom = doomed.execute_in_process(instance=instance, raise_on_error=False)
        result = tick(sensor, instance, pcbo_env, None)
    assert receiver.accepted_keys() == [f"run:{boom.run_id}"]
    assert "delivered 1 of 1" in result.skip_reason.skip_message
    assert "FINDINGS: 1 alert row(s) pcbo did not write" in result.skip_reason.skip_message


@dg.asset
def nested() -> int:
    return 1


@dg.asset_check(asset=nested, blocking=False)
def nested_dsn() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False,
        metadata={
            "conn": dg.MetadataValue.json(
                {"dsn": "postgresql://u:jsonpw-55@db/x", "hooks": ["https://h.example/?token=jsontok-66"]}
            )
        },
    )


def test_secrets_in_a_checks_json_metadata_reach_neither_the_webhook_nor_the_catalog(
    pcbo_env, receiver, monkeypatch
):
    """Red-team finding: the sensor scrubbed a failed check's metadata only where a value is text; a
    JSON value (an object or a list, as checks of any code location of the instance record) went to
    the webhook and the catalog's `alerts` row as it was, with a URL's password or query token."""
    monkeypatch.setenv(WEBHOOK_URL_ENV, receiver.url)
    sensor = build_alerts_sensor(delivery_initial_wait=0.01)
    with dg.instance_for_test() as instance:
        run = dg.materialize([nested, nested_dsn], instance=instance, raise_on_error=False)
        assert run.success
        tick(sensor, instance, pcbo_env, None)
    with alert_store(pcbo_env) as store:
        rows = store.alerts()
    [sent] = receiver.accepted
    for text in (json.dumps(sent), json.dumps([r["detail"] for r in rows])):
        assert "jsonpw-55" not in text and "jsontok-66" not in text
    conn = sent["detail"]["metadata"]["conn"]
    assert conn["dsn"].endswith("@db/x") and conn["hooks"][0].startswith("https://h.example/")


def test_a_pending_alert_row_with_a_garbage_time_blocks_no_other_alert(store, receiver):
    """Red-team finding: an `alerts` row written into the catalog by hand, pending, whose `raised_at`
    is not a time (SQLite keeps any text or number) made every read of the pending alerts fail (the
    column's conversion raised), so every tick failed and no later alert was ever delivered. The rows
    are read (`raised_at` null) and never sent (pcbo did not raise them); the real alerts are."""
    import sqlite3

    raise_and_deliver(store, [alert(1)], None, now=NOW, secret=SECRET)
    path = store.catalog.url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        for key, moment in (("forged-text", "not a time"), ("forged-number", 12345)):
            conn.execute(
                "INSERT INTO alerts (alert_key, kind, severity, subject, detail, raised_at, "
                "delivery_status, attempts, delivered_at) VALUES (?, 'run_failed', 'error', 'x', '{}', ?, "
                "'pending', 0, 'garbage')",
                (key, moment),
            )
    report = raise_and_deliver(store, [alert(2)], fast(receiver.url), now=NOW, secret=SECRET)
    assert (report["delivery"]["delivered"], report["delivery"]["left"]) == (2, 0)
    assert receiver.accepted_keys() == ["test:1", "test:2"]
    assert [a["raised_at"] for a in receiver.accepted] == ["2026-03-01T12:00:00Z"] * 2
    assert store.alert("forged-text")["raised_at"] is None
    assert store.alert("forged-text")["delivery_status"] == "unauthenticated"


@pytest.mark.postgres
def test_alert_moments_read_back_on_postgresql(fresh_postgres_url, receiver):
    """The alert reads that take moments as stored (above) give PostgreSQL's timestamps back as the
    same aware UTC datetimes."""
    catalog = CatalogStore(fresh_postgres_url)
    catalog.migrate()
    try:
        store = RolloutStore(catalog)
        raise_and_deliver(store, [alert(1)], fast(receiver.url), now=NOW, secret=SECRET)
        row = store.alert("test:1")
        assert (row["raised_at"], row["delivered_at"], row["delivery_status"]) == (NOW, NOW, "delivered")
        assert receiver.accepted[0]["raised_at"] == "2026-03-01T12:00:00Z"
        # The MACs verify over PostgreSQL's moments too (a fraction of a second included): a real
        # alert is sent, and marked delivered by hand it is sent again; a forged row is not sent.
        later = NOW.replace(microsecond=123456)
        raise_and_deliver(store, [alert(2)], None, now=later, secret=SECRET)
        with catalog.write() as conn:
            conn.exec_driver_sql("UPDATE alerts SET delivery_status = 'delivered' WHERE alert_key = 'test:2'")
            conn.exec_driver_sql(FORGED.replace("?", "%s"), ("forged", "pending", None, None))
        report = deliver_pending(store, fast(receiver.url), secret=SECRET)
        assert receiver.accepted_keys() == ["test:1", "test:2"]
        assert receiver.accepted[1]["raised_at"] == "2026-03-01T12:00:00.123456Z"
        assert [f["alertKey"] for f in report["findings"]] == ["test:2", "forged"]
    finally:
        catalog.close()


def _send_within(hook: AlertWebhook, seconds: float) -> tuple[str, object]:
    """`hook.send` of one alert in a thread: ("done", attempts) or ("error", exc), or ("hung", None)
    when it has not returned after `seconds`."""
    out: list[tuple[str, object]] = []

    def run() -> None:
        try:
            out.append(("done", hook.send(alert_payload({**alert(1), "raised_at": NOW}))))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return out[0] if out else ("hung", None)


def test_a_receiver_that_drips_its_answer_cannot_hold_delivery_past_the_timeout():
    """Red-team finding: `timeout` bounded each socket operation, not a request: a receiver that sent
    its status line and then a header byte every 0.1 s (or a 200 whose endless body it dripped: the
    body was read whole, however large) held the POST, and the `pcbo_alerts` tick, for as long as it
    liked. Now each attempt must have its whole answer's head within `timeout`, and the body is not
    read (the status is the answer)."""
    headers = DripReceiver(b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n")
    body = DripReceiver(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n", b"x")
    try:
        outcome, exc = _send_within(fast(headers.url, attempts=1, timeout=1.0), 8)
        assert outcome == "error", outcome
        assert isinstance(exc, AlertDeliveryError) and exc.retryable
        assert "no complete answer within 1 s" in str(exc)
        assert _send_within(fast(body.url, attempts=1, timeout=1.0), 8) == ("done", 1)
    finally:
        headers.close()
        body.close()


def test_a_receiver_s_malformed_status_line_is_quoted_on_one_line(store, caplog):
    """Red-team finding: a receiver answering a status line that is no HTTP status had it quoted as it
    came (http.client's `BadStatusLine` holds the raw line: CR, LF, terminal escapes) into the retry
    warnings, the alert row's `last_error` and the report: a hostile receiver wrote lines of its own
    making into pcbo's log. The reason is now quoted on one line, control characters escaped."""
    hostile = DripReceiver(b"HTTP/1.1 abc \x1b[2Kforged\r2026-12-08 INFO alert delivered\r\n\r\n", b"\r")
    try:
        with caplog.at_level(logging.WARNING):
            report = raise_and_deliver(
                store, [alert(1)], fast(hostile.url, attempts=2), now=NOW, secret=SECRET
            )
    finally:
        hostile.close()
    error = report["delivery"]["lastError"]
    assert "BadStatusLine: HTTP/1.1 abc \\x1b[2Kforged 2026-12-08 INFO alert delivered" in error, error
    for text in [error, store.alert("test:1")["last_error"], *(r.getMessage() for r in caplog.records)]:
        assert text.isprintable(), text


def _self_signed_loopback_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import ipaddress
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_https_delivery_goes_and_a_dripping_tls_receiver_cannot_hold_it(tmp_path, monkeypatch):
    """An https webhook goes through the same deadline: a real TLS receiver gets the alert (its
    certificate trusted through SSL_CERT_FILE, as by any https client), one that drips its handshake
    or its answer's head is given up on within the timeout."""
    import ssl

    cert, key = _self_signed_loopback_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    tls = Receiver()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls.server.socket = context.wrap_socket(tls.server.socket, server_side=True)
    tls.start()
    dripped = DripReceiver(b"\x16\x03\x03\x40\x00", b"\x00")  # a 16 KiB handshake record, a byte at a time
    head = DripReceiver(b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n", tls=context)
    try:
        assert _send_within(fast(tls.url.replace("http://", "https://"), timeout=5.0), 20) == ("done", 1)
        assert tls.accepted_keys() == ["test:1"]
        outcome, exc = _send_within(
            fast(dripped.url.replace("http://", "https://"), attempts=1, timeout=1.0), 8
        )
        assert outcome == "error" and isinstance(exc, AlertDeliveryError) and exc.retryable, outcome
        outcome, exc = _send_within(fast(head.url.replace("http://", "https://"), attempts=1, timeout=1.0), 8)
        assert outcome == "error", outcome
        assert "no complete answer within 1 s" in str(exc)
    finally:
        tls.close()
        dripped.close()
        head.close()


@pytest.mark.parametrize(
    "cursor",
    [
        {"since": 4_000_000_000.0, "runEnds": {}, "runless": None},  # in the future
        {"since": 1e400, "runEnds": {}, "runless": None},  # infinite
        {"since": -1e300, "runEnds": {}, "runless": None},
        {"since": 0, "runEnds": {}, "runless": "not-a-cursor"},
        {"since": 0, "runEnds": {}, "runless": "e30="},  # base64 of {}
    ],
    ids=["future", "infinite", "before-the-epoch", "runless-garbage", "runless-empty-object"],
)
def test_a_sensor_cursor_set_by_hand_silences_no_failure(pcbo_env, monkeypatch, cursor):
    """Red-team finding (an operator's `dagster sensor cursor --set`, a restored instance): a cursor
    whose `since` was in the future made every tick read nothing, for good (the cursor kept it), and
    one whose `since` was infinite or whose runless cursor was no event log cursor failed every tick:
    no alert again. Such a cursor is read as none (the last day); the failed run is alerted."""
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    sensor = build_alerts_sensor()
    with dg.instance_for_test() as instance:
        boom = doomed.execute_in_process(instance=instance, raise_on_error=False)
        result = tick(sensor, instance, pcbo_env, json.dumps(cursor))
        assert "raised 1 alert(s) (0 failed check(s), 1 failed run(s))" in result.skip_reason.skip_message
        with alert_store(pcbo_env) as store:
            assert [a["alert_key"] for a in store.alerts()] == [f"run:{boom.run_id}"]
        again = tick(sensor, instance, pcbo_env, result.cursor)  # the next cursor is a good one
        assert "raised 0 alert(s)" in again.skip_reason.skip_message


WEBHOOK_TOKEN = "tok-Leak-7731xq"


@dg.op
def leaky() -> None:
    # A job that talks to the same webhook itself and fails with what it sent (an HTTP client's error).
    raise RuntimeError(f"POST refused; sent headers Authorization: Bearer {WEBHOOK_TOKEN}")


@dg.job
def leaky_job() -> None:
    leaky()


def test_the_webhooks_own_token_in_a_failure_reaches_neither_the_catalog_nor_the_webhook(
    pcbo_env, receiver, monkeypatch
):
    """Red-team finding: a failed run's error text went into the alert as it was, scrubbed of URL
    credentials only: a run that failed with the webhook's bearer token in its message (an HTTP
    client's error naming the headers it sent) stored the token in the catalog's `alerts` row, for
    anyone who reads the catalog, and POSTed it. The webhook's secrets are removed from an alert
    before it is recorded, as from its `last_error`."""
    monkeypatch.setenv(WEBHOOK_URL_ENV, receiver.url)
    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, WEBHOOK_TOKEN)
    sensor = build_alerts_sensor(delivery_initial_wait=0.01)
    with dg.instance_for_test() as instance:
        boom = leaky_job.execute_in_process(instance=instance, raise_on_error=False)
        tick(sensor, instance, pcbo_env, None)
    with alert_store(pcbo_env) as store:
        [row] = store.alerts()
    [sent] = receiver.accepted
    assert sent["alert_key"] == f"run:{boom.run_id}"
    assert "POST refused" in json.dumps(sent["detail"])
    for text in (json.dumps(sent), json.dumps(row["detail"]), row["subject"]):
        assert WEBHOOK_TOKEN not in text


@pytest.mark.parametrize(
    ("variable", "url", "token", "says"),
    [
        (WEBHOOK_URL_ENV, "file:///etc/passwd", None, "must be an http(s) URL with a host"),
        (WEBHOOK_URL_ENV, "http://hooks.example/a b", None, "holds a control, space or non-ASCII"),
        (WEBHOOK_URL_ENV, "http://hooks.example/\x1b[2J", None, "holds a control, space or non-ASCII"),
        (WEBHOOK_URL_ENV, "http://hooks.example:99999/", None, "invalid alert webhook"),
        (WEBHOOK_URL_ENV, "hooks.example/pcbo", None, "must be an http(s) URL with a host"),
        (WEBHOOK_TOKEN_ENV, "https://hooks.example/", "tok\nen-Qz81", "token holds a control"),
        (WEBHOOK_TOKEN_ENV, "http://hooks.example/", "tok-Clear-Qz81", "refused for a plain-http webhook"),
        (WEBHOOK_TOKEN_ENV, "http://10.0.0.7:8080/h", "tok-Clear-Qz81", "refused for a plain-http webhook"),
        (WEBHOOK_URL_ENV, "http://u:pw-Qz81@hooks.example/", None, "credentials in a plain-http webhook"),
    ],
    ids=[
        "file",
        "space",
        "control",
        "port",
        "no-scheme",
        "token",
        "cleartext-token",
        "cleartext-ip",
        "basic",
    ],
)
def test_a_misconfigured_webhook_is_named_by_its_variable(pcbo_env, monkeypatch, variable, url, token, says):
    """Red-team finding: the sensor said `WEBHOOK MISCONFIGURED (PCBO_ALERT_WEBHOOK_URL)` whatever was
    wrong, so a token that cannot be sent sent the operator to a URL that was fine. Each refusal now
    names its variable (never the token); alerts are still recorded."""
    monkeypatch.setenv(WEBHOOK_URL_ENV, url)
    if token is None:
        monkeypatch.delenv(WEBHOOK_TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(WEBHOOK_TOKEN_ENV, token)
    with pytest.raises(ValueError) as refused:
        AlertWebhook.from_env()
    assert str(refused.value).startswith(f"{variable}: "), str(refused.value)
    other = WEBHOOK_TOKEN_ENV if variable == WEBHOOK_URL_ENV else WEBHOOK_URL_ENV
    sensor = build_alerts_sensor()
    with dg.instance_for_test() as instance:
        doomed.execute_in_process(instance=instance, raise_on_error=False)
        message = tick(sensor, instance, pcbo_env, None).skip_reason.skip_message
    assert f"WEBHOOK MISCONFIGURED: {variable}: " in message and says in message, message
    assert other not in message and "Qz81" not in message
    assert "raised 1 alert(s)" in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/h",
        "http://127.9.9.9/h",
        "http://localhost/h",
        "http://[::1]/h",
        "https://h.example/h",
    ],
)
def test_a_token_goes_over_https_or_to_loopback_only(url, monkeypatch):
    """Red-team finding: a bearer token configured for a plain-http webhook on another host was sent
    in the clear. It is refused there (above); over https, or to this machine's loopback, it is
    taken."""
    monkeypatch.setenv(WEBHOOK_URL_ENV, url)
    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, "tok-Fine-2718")
    assert AlertWebhook.from_env() is not None


def test_a_loopback_webhook_is_reached_directly_never_through_a_proxy(store, receiver, monkeypatch):
    """Red-team finding: with `HTTP_PROXY` set, urllib sent a POST to a plain-http webhook on
    loopback (where a token is allowed) to the proxy: the token crossed the network in the clear,
    to a host whose loopback is not this one. A loopback webhook is now reached directly."""
    proxy = Receiver().start()
    try:
        host, port = proxy.server.server_address[:2]
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(name, f"http://{host}:{port}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        hook = fast(receiver.url, token="tok-Proxy-4040")
        report = raise_and_deliver(store, [alert(1)], hook, now=NOW, secret=SECRET)
        assert report["delivery"]["delivered"] == 1
        assert receiver.accepted_keys() == ["test:1"]
        assert proxy.requests == []
    finally:
        proxy.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else(store, receiver, status):
    """A webhook that answers a redirect to another origin: nothing is sent there (no token, no
    alert), the alert stays pending with the answer named, and the next alert is still tried."""
    elsewhere = Receiver().start()
    try:
        receiver.down, receiver.fail_status, receiver.location = True, status, elsewhere.url
        report = raise_and_deliver(
            store, [alert(1), alert(2)], fast(receiver.url, token="tok-Redir-5521"), now=NOW, secret=SECRET
        )
        assert elsewhere.requests == []
        assert receiver.request_keys() == ["test:1", "test:2"]  # each once: not retried
        assert (
            report["delivery"]["left"] == 2
            and f"HTTP {status} (not retried)" in report["delivery"]["lastError"]
        )
        assert "tok-Redir-5521" not in json.dumps(report)
    finally:
        elsewhere.close()


def test_a_pending_alert_the_webhook_always_fails_on_holds_back_no_other(store, receiver):
    """Red-team finding: after an alert whose retries ran out, delivery stopped for the call (the
    webhook looks down), oldest first: so an `alerts` row written into the catalog by hand, pending,
    that the receiver answers 5xx to (it cannot take the alert: an odd field, a huge detail) was
    tried first on every tick and no alert raised after it was ever delivered. Now an alert that ran
    out of retries is followed by one attempt at the next: delivery stops only when that fails too.
    (A row written by hand is no longer sent at all: here the alert the webhook fails on is pcbo's.)"""
    raise_and_deliver(store, [dict(alert(0), alert_key="poison")], None, now=NOW, secret=SECRET)
    receiver.poison = "poison"
    report = raise_and_deliver(store, [alert(1), alert(2)], fast(receiver.url), now=NOW, secret=SECRET)
    delivery = report["delivery"]
    assert (delivery["delivered"], delivery["left"], delivery["stopped"]) == (2, 1, None), delivery
    assert receiver.accepted_keys() == ["test:1", "test:2"]
    assert receiver.request_keys() == ["poison"] * 3 + ["test:1", "test:2"]
    assert store.alert("poison")["delivery_status"] == "pending"


DSN_KEY = "postgresql://svc:pw-Part-5150@db.internal/x?sslpassword=qs-Part-77"


@dg.asset(partitions_def=dg.StaticPartitionsDefinition([DSN_KEY]))
def keyed() -> int:
    return 1


@dg.asset_check(asset=keyed, blocking=False)
def keyed_check() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, metadata={"dsn postgresql://k:pw-Key-31@h/x": 1})


def test_secrets_in_a_partition_key_tag_or_a_metadata_name_never_reach_the_catalog(pcbo_env, monkeypatch):
    """Red-team finding: the sensor scrubbed a failed check's metadata values, its description and
    run errors, but not the metadata's names nor the run's tags: a partition key holding a URL with a
    password (the `dagster/partition` tag, copied into `runTags`) or a metadata entry named after a
    DSN went into the catalog's `alerts` row as it was (with a webhook configured its own scrub caught
    them; without one, alerts are only recorded, and they were recorded so). The whole alert (key,
    subject, every text of its detail, names included) is scrubbed when the sensor builds it."""
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    sensor = build_alerts_sensor()
    with dg.instance_for_test() as instance:
        run = dg.materialize(
            [keyed, keyed_check],
            instance=instance,
            partition_key=DSN_KEY,
            raise_on_error=False,
            resources={"io_manager": dg.mem_io_manager},
        )
        assert run.success
        tick(sensor, instance, pcbo_env, None)
    with alert_store(pcbo_env) as store:
        [row] = store.alerts()
    assert row["detail"]["runTags"]["partition"].startswith("postgresql://[redacted]@db.internal/x")
    for text in (json.dumps(row["detail"]), row["subject"], row["alert_key"]):
        for secret in ("pw-Part-5150", "qs-Part-77", "pw-Key-31"):
            assert secret not in text, (secret, text)


# -- authenticated alert rows ----------------------------------------------------------------------


def _sql(store: RolloutStore, statement: str, *params: object) -> None:
    """Someone who can write the catalog (its SQLite file), as pcbo never would."""
    import sqlite3

    with sqlite3.connect(store.catalog.url.removeprefix("sqlite:///")) as conn:
        conn.execute(statement, params)


FORGED = (
    "INSERT INTO alerts (alert_key, kind, severity, subject, detail, raised_at, delivery_status, attempts, "
    "mac, state_mac) VALUES (?, 'run_failed', 'critical', 'wire the money', '{\"to\": \"evil\"}', "
    "'2026-03-01 12:00:00.000000', ?, 0, ?, ?)"
)


def test_a_forged_pending_alert_row_is_never_posted_with_pcbos_token(store, receiver, caplog):
    """Red-team finding: a pending `alerts` row someone inserted into the catalog was POSTed to the
    webhook with pcbo's bearer token (a confused deputy). Rows pcbo raises carry an HMAC under the
    alerts' key; a row without one, or with one that does not verify (here: copied from a real
    alert), is never sent, and is named once as a finding."""
    raise_and_deliver(store, [alert(1)], None, now=NOW, secret=SECRET)
    real = store.alert("test:1")
    _sql(store, FORGED, "forged:1", "pending", None, None)
    _sql(store, FORGED, "forged:2", "pending", real["mac"], real["state_mac"])
    _sql(store, FORGED, "forged:3\nFINDING: all clear\x1b[2J", "pending", None, None)
    hook = fast(receiver.url, token="tok-Deputy-8080")
    with caplog.at_level(logging.WARNING, logger="pcbo_dagster.alerts.webhook"):
        report = raise_and_deliver(store, [alert(2)], hook, now=NOW, secret=SECRET)
    assert receiver.request_keys() == ["test:1", "test:2"]
    assert (report["delivery"]["delivered"], report["delivery"]["left"]) == (2, 0)
    assert [(f["alertKey"], "not sent" in f["finding"]) for f in report["findings"]] == [
        ("forged:1", True),
        ("forged:2", True),
        ("forged:3?FINDING: all clear?[2J", True),  # one line in a log
    ]
    assert "forged:1" in caplog.text and "tok-Deputy-8080" not in caplog.text
    assert store.alert("forged:1")["delivery_status"] == "unauthenticated"
    # Logged once: the next call finds nothing and sends nothing.
    again = deliver_pending(store, hook, secret=SECRET)
    assert (again["pending"], again["findings"]) == (0, [])
    assert receiver.request_keys() == ["test:1", "test:2"]
    # Under another key (another host's, a key file replaced), pcbo's own rows do not verify either.
    _sql(store, "UPDATE alerts SET delivery_status = 'pending' WHERE alert_key = 'forged:1'")
    assert deliver_pending(store, hook, secret=bytes(32))["pending"] == 0
    assert receiver.request_keys() == ["test:1", "test:2"]


@pytest.mark.parametrize("status", ["delivered", "failed", "unauthenticated"])
def test_a_real_alert_marked_delivered_by_hand_is_still_sent(store, receiver, status):
    """Red-team finding: someone who can write the catalog marked a real pending alert delivered, and
    it was never sent. A delivery state is trusted only when its HMAC (over the key, the content's
    MAC, the status and the attempts: written by pcbo with the state) verifies; otherwise the alert
    is sent again, named as a finding, once."""
    raise_and_deliver(store, [alert(1), alert(2)], None, now=NOW, secret=SECRET)
    _sql(
        store,
        "UPDATE alerts SET delivery_status = ?, delivered_at = '2026-03-01 12:00:01' WHERE alert_key = ?",
        status,
        "test:1",
    )
    report = deliver_pending(store, fast(receiver.url), secret=SECRET, now=NOW)
    assert receiver.accepted_keys() == ["test:1", "test:2"]
    assert [(f["alertKey"], "sent again" in f["finding"]) for f in report["findings"]] == [("test:1", True)]
    assert store.alert("test:1")["delivery_status"] == "delivered"
    # Delivered as pcbo recorded it: not sent again, no finding.
    again = deliver_pending(store, fast(receiver.url), secret=SECRET)
    assert (again["pending"], again["findings"]) == (0, [])
    # A delivered state copied from another alert does not verify for this one either.
    raise_and_deliver(store, [alert(3)], None, now=NOW, secret=SECRET)
    done = store.alert("test:2")
    _sql(
        store,
        "UPDATE alerts SET delivery_status = 'delivered', state_mac = ?, attempts = ? WHERE alert_key = ?",
        done["state_mac"],
        done["attempts"],
        "test:3",
    )
    deliver_pending(store, fast(receiver.url), secret=SECRET)
    assert receiver.accepted_keys() == ["test:1", "test:2", "test:3"]


def test_a_forged_delivered_row_under_an_upcoming_key_does_not_stop_the_real_alert(store, receiver):
    """Red-team finding: a "delivered" row inserted under the key of an alert not raised yet (runless
    check keys name the event's storage id, which is predictable) made pcbo take the alert as raised
    before: it was never raised nor sent. A row under the key whose MAC does not verify is no alert
    pcbo raised: the real alert is raised over it and sent, and the squatter named as a finding."""
    _sql(store, FORGED, "test:1", "delivered", None, None)
    report = raise_and_deliver(store, [alert(1)], fast(receiver.url), now=NOW, secret=SECRET)
    assert report["raised"] == ["test:1"]
    assert receiver.accepted == [SENT_1]
    assert len(report["findings"]) == 1 and "raised over it" in report["findings"][0]["finding"]
    row = store.alert("test:1")
    assert (row["subject"], row["delivery_status"]) == ("thing 1 failed", "delivered")
    # Raised once: the same alert again is a repeat.
    assert raise_and_deliver(store, [alert(1)], fast(receiver.url), now=NOW, secret=SECRET)["raised"] == []
    assert len(receiver.requests) == 1


def _report_runless_failed_check(instance: dg.DagsterInstance) -> str:
    """Report a failed check outside any run (`lettered`, `outside`); the key of its alert."""
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(asset_key=dg.AssetKey("lettered"), check_name="outside", passed=False)
    )
    (record,) = instance.get_records_for_run("", of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    return f"check:runless-{record.storage_id}:lettered:outside:"


def test_sensor_raises_a_runless_check_alert_whose_key_was_taken_by_a_forged_row(
    pcbo_env, receiver, monkeypatch
):
    """The squatting attack through the sensor: the key of a runless check's alert names the event's
    storage id; a forged delivered row under it does not keep the alert from being raised and sent,
    and the tick names the finding."""
    import sqlite3

    monkeypatch.setenv(WEBHOOK_URL_ENV, receiver.url)
    sensor = build_alerts_sensor(delivery_initial_wait=0.01)
    with dg.instance_for_test() as instance:
        key = _report_runless_failed_check(instance)
        with alert_store(pcbo_env):
            pass  # the catalog, migrated
        with sqlite3.connect(Path(pcbo_env.home) / "catalog.db") as conn:
            conn.execute(FORGED, (key, "delivered", None, None))
        result = tick(sensor, instance, pcbo_env, None)
    assert receiver.accepted_keys() == [key]
    message = result.skip_reason.skip_message
    assert "raised 1 alert(s) (1 failed check(s)" in message and "FINDINGS: 1" in message


def test_alert_rows_from_before_migration_0010_are_kept_and_never_sent(tmp_path, receiver):
    """Rows written before alerts were authenticated (migration 0010 adds `mac` and `state_mac`)
    cannot be told from forged ones: a pending one is not sent (a finding, once), a delivered one is
    left as it is, and each key is raised again when its alert comes again."""
    import sqlite3

    url = default_catalog_url(tmp_path)
    catalog = CatalogStore(url)
    catalog.migrate()
    catalog.close()
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:  # the catalog at 0009, with alerts
        conn.execute("ALTER TABLE alerts DROP COLUMN state_mac")
        conn.execute("ALTER TABLE alerts DROP COLUMN mac")
        conn.execute("UPDATE alembic_version SET version_num = '0009'")
        for key, status in (("test:1", "pending"), ("test:2", "delivered")):
            conn.execute(
                "INSERT INTO alerts (alert_key, kind, severity, subject, detail, raised_at, "
                "delivery_status, attempts) VALUES (?, 'run_failed', 'error', 'old', '{}', "
                "'2026-01-01 00:00:00.000000', ?, 0)",
                (key, status),
            )
    catalog = CatalogStore(url)
    catalog.migrate()
    try:
        store = RolloutStore(catalog)
        report = raise_and_deliver(store, [alert(3)], fast(receiver.url), now=NOW, secret=SECRET)
        assert receiver.accepted_keys() == ["test:3"]
        assert [f["alertKey"] for f in report["findings"]] == ["test:1"]
        assert store.alert("test:2")["delivery_status"] == "delivered"
        report = raise_and_deliver(store, [alert(1), alert(2)], fast(receiver.url), now=NOW, secret=SECRET)
        assert report["raised"] == ["test:1", "test:2"]
        assert receiver.accepted_keys() == ["test:3", "test:1", "test:2"]
    finally:
        catalog.close()


# -- re-derivation from the event log ---------------------------------------------------------------


def _catalog_sql(pcbo: PcboEngineResource, statement: str, *params: object) -> None:
    """Someone who can write the sensor's catalog, as pcbo never would (`_sql`)."""
    with alert_store(pcbo) as store:
        _sql(store, statement, *params)


def _rows(pcbo: PcboEngineResource) -> dict[str, str]:
    with alert_store(pcbo) as store:
        return {a["alert_key"]: a["delivery_status"] for a in store.alerts()}


def test_an_alert_row_deleted_before_delivery_is_raised_again_from_the_event_log(
    pcbo_env, receiver, monkeypatch
):
    """Red-team finding: someone who can write the catalog deleted a failed run's pending alert row
    while the webhook was down, and the alert was never sent (the sensor's cursor had passed the
    run). The event log still holds the failure: the sensor re-derives the alerts of the last day
    from it, and a later tick raises the alert again and delivers it."""
    monkeypatch.setenv(WEBHOOK_URL_ENV, receiver.url)
    sensor = build_alerts_sensor(delivery_initial_wait=0.01, rederive_every_seconds=0)
    with dg.instance_for_test() as instance:
        boom = doomed.execute_in_process(instance=instance, raise_on_error=False)
        receiver.down = True
        first = tick(sensor, instance, pcbo_env, None)
        assert _rows(pcbo_env) == {f"run:{boom.run_id}": "pending"}
        _catalog_sql(pcbo_env, "DELETE FROM alerts")
        receiver.down = False
        second = tick(sensor, instance, pcbo_env, first.cursor)
        assert receiver.accepted_keys() == [f"run:{boom.run_id}"]
        assert receiver.accepted[0]["detail"]["failedSteps"][0]["step"] == "explode"
        assert _rows(pcbo_env) == {f"run:{boom.run_id}": "delivered"}
        message = second.skip_reason.skip_message
        assert "raised 1 alert(s) (0 failed check(s), 1 failed run(s))" in message
        assert "1 of them re-derived from the event log" in message
        # Delivered once: later ticks send it no more.
        cursor = second.cursor
        for _ in range(3):
            cursor = tick(sensor, instance, pcbo_env, cursor).cursor
        assert receiver.accepted_keys() == [f"run:{boom.run_id}"]


def test_an_alert_row_altered_so_its_mac_fails_is_raised_again_and_delivered(pcbo_env, receiver, monkeypatch):
    """Red-team finding: a pending alert row altered in the catalog (its MAC no longer verifies) was
    marked unauthenticated and never sent: the alert was silenced. Its failed check is still in the
    event log: the alert is raised again over the spoiled row (a finding) and delivered as pcbo
    derived it, never as altered."""
    monkeypatch.setenv(WEBHOOK_URL_ENV, receiver.url)
    sensor = build_alerts_sensor(delivery_initial_wait=0.01, rederive_every_seconds=0)
    with dg.instance_for_test() as instance:
        checked = dg.materialize(
            [lettered, lettered_rows], instance=instance, partition_key="a", raise_on_error=False
        )
        key = f"check:{checked.run_id}:lettered:lettered_rows:"
        receiver.down = True
        cursor = tick(sensor, instance, pcbo_env, None).cursor
        _catalog_sql(pcbo_env, "UPDATE alerts SET subject = 'all fine, ignore' WHERE alert_key = ?", key)
        receiver.down = False
        result = tick(sensor, instance, pcbo_env, cursor)
        assert receiver.accepted_keys() == [key]
        assert receiver.accepted[0]["subject"].startswith("asset check lettered:lettered_rows failed")
        assert "FINDINGS" in result.skip_reason.skip_message
        assert _rows(pcbo_env) == {key: "delivered"}
        for _ in range(3):
            result = tick(sensor, instance, pcbo_env, result.cursor)
        assert receiver.accepted_keys() == [key]


def test_a_delivered_alert_is_never_sent_again_while_the_window_is_re_derived(
    pcbo_env, receiver, monkeypatch
):
    """The re-derivation raises only what has no genuine row: of two delivered alerts, the one whose
    row was deleted is sent once more, the genuine one never again, across many ticks (each of which
    re-derives the window)."""
    monkeypatch.setenv(WEBHOOK_URL_ENV, receiver.url)
    sensor = build_alerts_sensor(delivery_initial_wait=0.01, rederive_every_seconds=0)
    with dg.instance_for_test() as instance:
        kept = doomed.execute_in_process(instance=instance, raise_on_error=False)
        lost = doomed.execute_in_process(instance=instance, raise_on_error=False)
        cursor = tick(sensor, instance, pcbo_env, None).cursor
        assert sorted(receiver.accepted_keys()) == sorted([f"run:{kept.run_id}", f"run:{lost.run_id}"])
        _catalog_sql(pcbo_env, "DELETE FROM alerts WHERE alert_key = ?", f"run:{lost.run_id}")
        for _ in range(6):
            cursor = tick(sensor, instance, pcbo_env, cursor).cursor
        assert receiver.accepted_keys().count(f"run:{kept.run_id}") == 1
        assert receiver.accepted_keys().count(f"run:{lost.run_id}") == 2
        assert _rows(pcbo_env) == {f"run:{kept.run_id}": "delivered", f"run:{lost.run_id}": "delivered"}


def test_the_re_derivation_reads_at_most_its_batch_of_run_ends_a_tick(pcbo_env, monkeypatch):
    """A busy instance has thousands of run ends a day: a tick re-derives at most
    `rederive_batch_size` run ends of each type (a second cursor sweeps the window), so five deleted
    rows come back two, two and one a tick; a pass over the window starts again only after
    `rederive_every_seconds`."""
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    with dg.instance_for_test() as instance:
        runs = [doomed.execute_in_process(instance=instance, raise_on_error=False) for _ in range(5)]
        keys = {f"run:{r.run_id}" for r in runs}
        # The first tick reads the window itself: the sweep's first pass starts
        # `rederive_every_seconds` later (here: the next tick).
        cursor = tick(build_alerts_sensor(rederive_batch_size=2), instance, pcbo_env, None).cursor
        assert set(_rows(pcbo_env)) == keys
        sensor = build_alerts_sensor(rederive_batch_size=2, rederive_every_seconds=0)
        _catalog_sql(pcbo_env, "DELETE FROM alerts")
        reads: list[int] = []
        fetch = instance.fetch_run_status_changes

        def counted(records_filter, limit, **options):
            result = fetch(records_filter, limit, **options)
            reads.append(len(result.records))
            return result

        monkeypatch.setattr(instance, "fetch_run_status_changes", counted)
        back = []
        for _ in range(3):
            result = tick(sensor, instance, pcbo_env, cursor)
            cursor = result.cursor
            back.append(len(_rows(pcbo_env)))
            assert max(reads) <= 2
        assert back == [2, 4, 5]
        assert set(_rows(pcbo_env)) == keys
        # The next pass starts `rederive_every_seconds` after the last one started: not yet.
        waiting = build_alerts_sensor(rederive_batch_size=2, rederive_every_seconds=3600)
        _catalog_sql(pcbo_env, "DELETE FROM alerts")
        for _ in range(2):
            cursor = tick(waiting, instance, pcbo_env, cursor).cursor
        assert _rows(pcbo_env) == {}


def test_a_runless_check_alert_row_deleted_is_raised_again_and_older_checks_are_not_read_again(
    pcbo_env, monkeypatch
):
    """A failed check reported outside any run is re-derived too. Runless checks older than the window
    are skipped once: each pass then reads the runless checks from past them (its `runlessFloor`),
    not from the start of the instance's history."""
    import time

    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    with dg.instance_for_test() as instance:
        key = _report_runless_failed_check(instance)
        cursor = tick(build_alerts_sensor(), instance, pcbo_env, None).cursor
        _catalog_sql(pcbo_env, "DELETE FROM alerts")
        sensor = build_alerts_sensor(
            rederive_every_seconds=0, rederive_batch_size=1, rederive_window_seconds=1
        )
        cursor = tick(sensor, instance, pcbo_env, cursor).cursor
        assert _rows(pcbo_env) == {key: "pending"}
        time.sleep(1.2)  # the check is older than the window now
        runless_read: list[int] = []
        read = instance.get_records_for_run

        def counted(run_id, *args, **options):
            result = read(run_id, *args, **options)
            if run_id == "":
                runless_read.append(len(result.records))
            return result

        monkeypatch.setattr(instance, "get_records_for_run", counted)
        for _ in range(3):  # the pass under way ends; the next reads the old check once, skips it
            cursor = tick(sensor, instance, pcbo_env, cursor).cursor
        assert json.loads(cursor)["sweep"]["runlessFloor"] is not None
        runless_read.clear()
        for _ in range(3):
            cursor = tick(sensor, instance, pcbo_env, cursor).cursor
        assert runless_read and sum(runless_read) == 0


@pytest.mark.parametrize(
    "sweep",
    [
        {"started": 1e400},
        {"started": 4102444800, "since": None},
        {"started": 0, "since": "x"},
        "garbage",
        None,
    ],
    ids=["infinite", "future", "since-garbage", "not-an-object", "missing"],
)
def test_a_sweep_cursor_set_by_hand_still_re_derives(pcbo_env, monkeypatch, sweep):
    """A sweep state that is none (set by hand, or a cursor from before the sweep) must not stop the
    re-derivation for good: a pass starts at once and a deleted row comes back on the next tick."""
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    sensor = build_alerts_sensor()
    with dg.instance_for_test() as instance:
        boom = doomed.execute_in_process(instance=instance, raise_on_error=False)
        cursor = json.loads(tick(sensor, instance, pcbo_env, None).cursor)
        _catalog_sql(pcbo_env, "DELETE FROM alerts")
        if sweep is None:
            del cursor["sweep"]
        else:
            cursor["sweep"] = sweep
        result = tick(sensor, instance, pcbo_env, json.dumps(cursor))
        assert _rows(pcbo_env) == {f"run:{boom.run_id}": "pending"}
        assert "1 of them re-derived from the event log" in result.skip_reason.skip_message


def test_the_sweep_waits_while_the_cursor_catches_up(pcbo_env, monkeypatch):
    """A tick whose cursor has more run ends to read is busy enough: the sweep does not add its batch
    (it would read ahead of the cursor, the same run ends twice)."""
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    with dg.instance_for_test() as instance:
        for _ in range(3):
            doomed.execute_in_process(instance=instance, raise_on_error=False)
        sensor = build_alerts_sensor(batch_size=1, rederive_every_seconds=0)
        first = tick(sensor, instance, pcbo_env, None)
        assert (
            len(_rows(pcbo_env)) == 1 and "more run ends to read next tick" in first.skip_reason.skip_message
        )
        assert json.loads(first.cursor)["sweep"]["since"] is None  # no pass under way
        tick(sensor, instance, pcbo_env, first.cursor)
        assert len(_rows(pcbo_env)) == 2


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("rederive_batch_size", 0),
        ("rederive_window_seconds", -1.0),
        ("rederive_window_seconds", float("inf")),
        ("rederive_every_seconds", float("nan")),
        ("rederive_every_seconds", -5.0),
    ],
)
def test_a_re_derivation_option_that_is_none_is_refused_by_name(option, value):
    with pytest.raises(ValueError, match=f"^{option} must be"):
        build_alerts_sensor(**{option: value})

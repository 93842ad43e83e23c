"""The `pcbo_alerts` sensor: failed asset checks (blocking or not) and failed runs become alerts.

Dagster's run failure sensors never see a failed non-blocking check (it does not fail the run), so
this sensor reads the instance's event log itself. On each tick it takes the runs that ended since
its cursor (the `RUN_SUCCESS`, `RUN_FAILURE` and `RUN_CANCELED` events, read with
`instance.fetch_run_status_changes`, each type after its own storage id), and:

* every `ASSET_CHECK_EVALUATION` with `passed=False` of such a run (`instance.get_records_for_run`)
  is an `asset_check_failed` alert, `check:<run_id>:<asset>:<check>:<partition>`, severity
  `error` or `warning` (the check's severity), with the asset, check, partition, run, whether the
  check was blocking, its description and metadata;
* every `RUN_FAILURE` is a `run_failed` alert, `run:<run_id>`, severity `error`, with the job, the
  failure message, the failed steps' errors (URL credentials and query strings removed) and the
  run's partition / backfill / retry tags.

Every text of an alert (its key, subject and detail, names included: a partition key, a run tag, a
metadata entry's name) goes through `scrub_text`: no URL userinfo, query or private key is recorded
or sent.

Check evaluations reported outside any run (`report_runless_asset_event`) are read too, after their
own cursor. A check's alert is raised when its run ends (a run's check results are complete then).

Each alert is recorded in the catalog once (`RolloutStore.raise_alert`: its key is unique), then
every pending alert (this tick's, and earlier ones whose delivery failed) is POSTed to the webhook
of `PCBO_ALERT_WEBHOOK_URL` with retries (`alerts/webhook.py`); without that variable the alerts are
only recorded. The sensor requests no runs: its tick says how many alerts were raised and delivered
and why a delivery failed (no secret: the webhook is shown without userinfo or query).

**Re-derived.** Someone who can write the catalog can delete an alert row, or alter it so its MAC no
longer verifies, before it is delivered; the cursor has passed its run by then. The event log still
holds the failure, so a second cursor, the sweep, re-reads the run ends and runless checks of the last
`rederive_window_seconds` (default: the initial lookback, a day) with `collect_alerts` (the alerts are
the same: same keys, same builders) and raises them with this tick's: an alert whose row is missing
or does not verify is raised again (over the spoiled row: a finding) and delivered; one with a genuine
row (pending, delivered or failed) is not raised again, and a delivered one is never sent again. Each
tick the sweep reads at most `rederive_batch_size` run ends of each type (50) and as many runless
checks, from the oldest of the window to the newest (a pass); a pass starts `rederive_every_seconds`
(300) after the last one started, and not on a tick whose cursor is still catching up. Runless checks
are read from the sweep's `runlessFloor`: a whole batch of them older than the window moves it past
them, so a pass does not read the instance's runless history again. The tick names the alerts raised
again ("N of them re-derived from the event log"). A row deleted after its run end has left the window
is not raised again.

The cursor is JSON: `{"since": <first tick's start, epoch seconds>, "runEnds": {<event type>:
<last storage id read>}, "runless": <the runless event log cursor>, "sweep": {"started": <the last
pass's start>, "since": <its window's start, or null between passes>, "runEnds": ..., "runless": ...,
"runlessFloor": ...}}`. Without a cursor (the first tick) only the last `initial_lookback_seconds` are
read, so turning the sensor on does not replay the instance's whole history (the sweep's first pass
waits `rederive_every_seconds`). A lost cursor re-reads that window, as does one set by hand that is
none (a `since` in the future or not a number; a runless cursor that is no event log cursor reads the
runless checks from the start); alerts already raised are not raised again. A sweep that is none (a
cursor from before it, a `started` in the future) starts a pass at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg

from pcbo_dagster.alerts.webhook import WEBHOOK_URL_ENV, AlertWebhook, alert_secret, raise_and_deliver
from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.catalog.rollouts import RolloutStore
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.io.redaction import scrub_json, scrub_text

SENSOR_NAME = "pcbo_alerts"
#: How often the daemon evaluates the sensor (seconds).
MINIMUM_INTERVAL_SECONDS = 30
#: The run-end events whose runs are searched for failed checks (failures are also run alerts).
RUN_END_EVENTS = (
    dg.DagsterEventType.RUN_SUCCESS,
    dg.DagsterEventType.RUN_FAILURE,
    dg.DagsterEventType.RUN_CANCELED,
)
RUNLESS_RUN_ID = ""  # the event log's run id of events reported outside a run
MAX_ALERT_KEY = 512  # the catalog column's length
MAX_TEXT = 2000
MAX_STEPS = 10
_RUN_TAGS = {
    "dagster/partition": "partition",
    "dagster/asset_partition_range_start": "partitionRangeStart",
    "dagster/asset_partition_range_end": "partitionRangeEnd",
    "dagster/backfill": "backfill",
    "dagster/retry_number": "retryNumber",
    "dagster/will_retry": "willRetry",
}


def _alert_key(*parts: str) -> str:
    key = ":".join(scrub_text(part) for part in parts)
    if len(key) <= MAX_ALERT_KEY:
        return key
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{key[: MAX_ALERT_KEY - len(digest) - 1]}~{digest}"


def _error_text(error: Any) -> str | None:
    """A `SerializableErrorInfo`'s message and its causes' (no stack), credentials removed."""
    messages: list[str] = []
    seen = 0
    while error is not None and seen < 5:
        message = (getattr(error, "message", "") or "").strip()
        if message:
            messages.append(message)
        error = getattr(error, "cause", None) or getattr(error, "context", None)
        seen += 1
    if not messages:
        return None
    return scrub_text(" <- caused by: ".join(messages))[:MAX_TEXT]


def _metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in metadata.items():
        raw = getattr(value, "value", value)
        try:
            json.dumps(raw, allow_nan=False)
        except (TypeError, ValueError):
            raw = str(raw)
        if isinstance(raw, str):
            raw = scrub_text(raw)[:MAX_TEXT]
        else:  # an object or a list (JSON metadata): every text in it
            raw = scrub_json(raw)
        out[str(name)] = raw
    return out


def _failed_check(record: Any) -> bool:
    event = record.event_log_entry.dagster_event
    evaluation = event.event_specific_data if event else None
    return isinstance(evaluation, dg.AssetCheckEvaluation) and not evaluation.passed


def check_alert(record: Any, run_id: str, run_tags: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The alert of an `ASSET_CHECK_EVALUATION` event record, or None when the check passed."""
    entry = record.event_log_entry
    evaluation = entry.dagster_event.event_specific_data if entry.dagster_event else None
    if not isinstance(evaluation, dg.AssetCheckEvaluation) or evaluation.passed:
        return None
    asset = evaluation.asset_key.to_user_string()
    partition = evaluation.partition
    severity = "warning" if evaluation.severity == dg.AssetCheckSeverity.WARN else "error"
    key_run = run_id if run_id != RUNLESS_RUN_ID else f"runless-{record.storage_id}"
    subject = f"asset check {asset}:{evaluation.check_name} failed"
    if partition:
        subject += f" (partition {partition})"
    subject += f" in run {run_id}" if run_id != RUNLESS_RUN_ID else " (reported outside a run)"
    detail: dict[str, Any] = {
        "assetKey": asset,
        "checkName": evaluation.check_name,
        "partition": partition,
        "runId": run_id or None,
        "jobName": entry.job_name,
        "severity": evaluation.severity.value,
        "blocking": evaluation.blocking,
        "description": scrub_text(evaluation.description)[:MAX_TEXT] if evaluation.description else None,
        "metadata": _metadata(evaluation.metadata or {}),
        "evaluatedAt": entry.timestamp,
    }
    detail.update(_tags_detail(run_tags))
    return {
        "alert_key": _alert_key("check", key_run, asset, evaluation.check_name, partition or ""),
        "kind": "asset_check_failed",
        "severity": severity,
        "subject": scrub_text(subject),
        "detail": scrub_json(detail),  # every text, names too (a partition key, a tag, a metadata name)
    }


def _tags_detail(tags: Mapping[str, str] | None) -> dict[str, Any]:
    if not tags:
        return {}
    found = {field: tags[tag] for tag, field in _RUN_TAGS.items() if tag in tags}
    return {"runTags": found} if found else {}


def run_failure_alert(
    record: Any, step_failures: list[Any], run_tags: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The alert of a `RUN_FAILURE` event record (with the run's `STEP_FAILURE` records)."""
    entry = record.event_log_entry
    event = entry.dagster_event
    data = event.event_specific_data if event else None
    run_id = entry.run_id
    job = entry.job_name or (event.job_name if event else None) or "?"
    reason = getattr(data, "failure_reason", None)
    steps = []
    for step in step_failures[:MAX_STEPS]:
        step_event = step.event_log_entry.dagster_event
        steps.append(
            {
                "step": step_event.step_key if step_event else None,
                "error": _error_text(getattr(step_event.event_specific_data, "error", None))
                if step_event
                else None,
            }
        )
    detail: dict[str, Any] = {
        "runId": run_id,
        "jobName": job,
        "message": scrub_text(event.message or "")[:MAX_TEXT] if event else None,
        "failureReason": getattr(reason, "value", None),
        "error": _error_text(getattr(data, "error", None)),
        "failedSteps": steps,
        "failedAt": entry.timestamp,
    }
    detail.update(_tags_detail(run_tags))
    return {
        "alert_key": _alert_key("run", run_id),
        "kind": "run_failed",
        "severity": "error",
        "subject": scrub_text(f"run {run_id} of {job} failed"),
        "detail": scrub_json(detail),  # every text, names too (a partition key, a tag)
    }


def _parse_cursor(text: str | None, now: float, lookback: float) -> dict[str, Any]:
    """The cursor of `text`; what is not one is read as no cursor (the last `lookback` seconds). A
    `since` that is not a moment between the epoch and `now` (in the future, infinite, NaN: set by
    hand) is `now - lookback`: it kept every tick from raising anything (or failed every tick) for
    good."""
    # No cursor: this tick reads the window itself, so the sweep's first pass waits its turn.
    fresh = {"since": now - lookback, "runEnds": {}, "runless": None, "sweep": _idle_sweep(now, None)}
    if not text:
        return fresh
    try:
        data = json.loads(text)
    except ValueError:
        return fresh
    if not isinstance(data, dict) or not isinstance(data.get("runEnds"), dict):
        return fresh
    since: Any = data.get("since")
    if not _moment(since, now):
        since = now - lookback  # (a NaN compares false: it is replaced too)
    return {
        "since": float(since),
        "runEnds": _storage_ids(data["runEnds"]),
        "runless": data.get("runless") if isinstance(data.get("runless"), str) else None,
        "sweep": _parse_sweep(data.get("sweep"), now),
    }


def _moment(value: Any, now: float) -> bool:
    """Whether `value` is a moment between the epoch and `now` (epoch seconds)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value <= now


def _storage_ids(ends: Mapping[str, Any]) -> dict[str, int]:
    return {k: v for k, v in ends.items() if isinstance(v, int) and not isinstance(v, bool)}


def _idle_sweep(started: float, runless_floor: str | None) -> dict[str, Any]:
    """The re-derivation sweep between passes: the last one started at `started`; the next reads the
    runless checks from `runless_floor` (all before it are older than any window to come)."""
    return {
        "started": started,
        "since": None,
        "runEnds": {},
        "runless": runless_floor,
        "runlessFloor": runless_floor,
    }


def _parse_sweep(data: Any, now: float) -> dict[str, Any]:
    """The sweep of a cursor (`_sweep_step`). One that is none (a cursor from before the sweep, or set
    by hand) starts a pass at once; a pass whose window start is none starts again."""
    if not isinstance(data, dict) or not _moment(data.get("started"), now):
        return _idle_sweep(0.0, None)
    floor = data.get("runlessFloor") if isinstance(data.get("runlessFloor"), str) else None
    since = data.get("since")
    if since is None:
        return _idle_sweep(float(data["started"]), floor)
    if not _moment(since, now) or not isinstance(data.get("runEnds"), dict):
        return _idle_sweep(0.0, floor)
    return {
        "started": float(data["started"]),
        "since": float(since),
        "runEnds": _storage_ids(data["runEnds"]),
        "runless": data.get("runless") if isinstance(data.get("runless"), str) else floor,
        "runlessFloor": floor,
    }


def _tags(instance: dg.DagsterInstance, run_id: str) -> Mapping[str, str]:
    run = instance.get_run_by_id(run_id)
    return run.tags if run is not None else {}


def collect_alerts(
    instance: dg.DagsterInstance, cursor: dict[str, Any], batch_size: int
) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """The alerts of what ended after `cursor` (at most `batch_size` run ends of each type), the next
    cursor and whether more is left for the next tick."""
    alerts: list[dict[str, Any]] = []
    ends = dict(cursor["runEnds"])
    more = False
    for event_type in RUN_END_EVENTS:
        after = ends.get(event_type.value)
        result = instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(
                event_type,  # type: ignore[arg-type]  # one of RUN_END_EVENTS
                after_storage_id=after,
                after_timestamp=cursor["since"] if after is None else None,
            ),
            limit=batch_size,
            ascending=True,
        )
        more = more or result.has_more
        for record in result.records:
            run_id = record.event_log_entry.run_id
            failed_checks = [
                check
                for check in instance.get_records_for_run(
                    run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
                ).records
                if _failed_check(check)
            ]
            failed = event_type == dg.DagsterEventType.RUN_FAILURE
            tags = _tags(instance, run_id) if failed_checks or failed else {}
            for check in failed_checks:
                alert = check_alert(check, run_id, tags)
                if alert is not None:
                    alerts.append(alert)
            if failed:
                steps = instance.get_records_for_run(
                    run_id, of_type=dg.DagsterEventType.STEP_FAILURE, limit=MAX_STEPS
                ).records
                alerts.append(run_failure_alert(record, list(steps), tags))
            ends[event_type.value] = record.storage_id
    try:
        runless = _runless_checks(instance, cursor["runless"], batch_size)
    except (ValueError, KeyError, TypeError):  # a runless cursor set by hand that is none
        cursor = {**cursor, "runless": None}
        if "runlessFloor" in cursor:
            cursor["runlessFloor"] = None
        runless = _runless_checks(instance, None, batch_size)
    more = more or runless.has_more
    older = 0  # runless checks read that are older than `since`
    for record in runless.records:
        if record.event_log_entry.timestamp >= cursor["since"]:
            alert = check_alert(record, RUNLESS_RUN_ID)
            if alert is not None:
                alerts.append(alert)
        else:
            older += 1
    next_cursor = {
        "since": cursor["since"],
        "runEnds": ends,
        "runless": runless.cursor if runless.records else cursor["runless"],
    }
    if "runlessFloor" in cursor:  # the sweep's (`_sweep_step`)
        floor = cursor["runlessFloor"]
        if floor == cursor["runless"] and runless.records and older == len(runless.records):
            floor = runless.cursor  # a whole batch older than the window: never read again
        next_cursor["runlessFloor"] = floor
    return alerts, next_cursor, more


def _sweep_step(
    instance: dg.DagsterInstance,
    sweep: dict[str, Any],
    *,
    now: float,
    window: float,
    every: float,
    batch_size: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One tick of the re-derivation sweep: the alerts of the next `batch_size` run ends (of each
    type) and runless checks of the window `collect_alerts` derives (the sweep is a second cursor of
    the same shape, plus `started` and `runlessFloor`), and the sweep's next state. A pass reads the
    run ends of the last `window` seconds from the oldest; when it reaches the newest it ends, and the
    next starts `every` seconds after it started."""
    if sweep["since"] is None:
        if now < sweep["started"] + every:
            return [], sweep
        floor = sweep["runlessFloor"]
        sweep = {
            "started": now,
            "since": now - window,
            "runEnds": {},
            "runless": floor,
            "runlessFloor": floor,
        }
    alerts, after, more = collect_alerts(instance, sweep, batch_size)
    if not more:
        return alerts, _idle_sweep(sweep["started"], after["runlessFloor"])
    return alerts, {**after, "started": sweep["started"]}


def _runless_checks(instance: dg.DagsterInstance, after: str | None, batch_size: int) -> Any:
    return instance.get_records_for_run(
        RUNLESS_RUN_ID,
        cursor=after,
        of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION,
        limit=batch_size,
    )


@contextmanager
def alert_store(pcbo: PcboEngineResource) -> Iterator[RolloutStore]:
    """The catalog of `pcbo`'s settings (migrated) as a `RolloutStore`, closed on exit. Only the
    catalog: alerts do not depend on the lake or the audit endpoint being reachable."""
    settings = pcbo.settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    catalog = CatalogStore(settings.catalog_url)
    try:
        catalog.migrate()
        yield RolloutStore(catalog)
    finally:
        catalog.close()


def _summary(
    alerts: list[dict[str, Any]],
    report: dict[str, Any] | None,
    webhook_note: str | None,
    rederived: set[str],
) -> str:
    raised = set(report["raised"]) if report else set()
    checks = sum(1 for a in alerts if a["alert_key"] in raised and a["kind"] == "asset_check_failed")
    runs = sum(1 for a in alerts if a["alert_key"] in raised and a["kind"] == "run_failed")
    parts = [f"raised {len(raised)} alert(s) ({checks} failed check(s), {runs} failed run(s))"]
    again = len(raised & rederived)
    if again:
        parts.append(
            f"{again} of them re-derived from the event log (read before: the row was missing or did "
            "not verify, deleted or altered in the catalog?)"
        )
    delivery = report["delivery"] if report else None
    if report and report["findings"]:
        parts.append(
            f"FINDINGS: {len(report['findings'])} alert row(s) pcbo did not write (not trusted; see the logs)"
        )
    if webhook_note:
        parts.append(webhook_note)
    elif delivery is not None:
        if delivery["pending"] == 0:
            parts.append("nothing pending delivery")
        else:
            parts.append(
                f"delivered {delivery['delivered']} of {delivery['pending']} to {delivery['endpoint']}"
            )
        if delivery["failed"]:
            parts.append(
                f"DELIVERY REFUSED: {delivery['failed']} alert(s) answered 4xx, marked failed (not "
                f"retried); last error: {delivery['lastError']}"
            )
        if delivery["left"]:
            parts.append(
                f"DELIVERY FAILED: {delivery['left']} alert(s) left pending (retried next tick); "
                f"last error: {delivery['lastError']}"
            )
    return "; ".join(parts)


def build_alerts_sensor(
    *,
    batch_size: int = 200,
    initial_lookback_seconds: float = 24 * 3600,
    delivery_attempts: int = 3,
    delivery_initial_wait: float = 0.5,
    delivery_timeout: float = 5.0,
    delivery_budget_seconds: float = 30.0,
    rederive_window_seconds: float | None = None,
    rederive_batch_size: int = 50,
    rederive_every_seconds: float = 300.0,
) -> dg.SensorDefinition:
    """The `pcbo_alerts` sensor (uses the `pcbo` resource; reads the webhook from the environment at
    each tick). The delivery options bound a tick's time against a down webhook (Dagster gives a
    sensor tick 60 s). The re-derivation sweep (module doc) reads the last `rederive_window_seconds`
    (default: `initial_lookback_seconds`), at most `rederive_batch_size` run ends of each type a
    tick, a pass starting `rederive_every_seconds` after the last one started."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if rederive_batch_size < 1:
        raise ValueError("rederive_batch_size must be >= 1")
    window = initial_lookback_seconds if rederive_window_seconds is None else rederive_window_seconds
    if not math.isfinite(window) or window < 0:
        raise ValueError("rederive_window_seconds must be a finite number >= 0")
    if not math.isfinite(rederive_every_seconds) or rederive_every_seconds < 0:
        raise ValueError("rederive_every_seconds must be a finite number >= 0")

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Raises an alert for every failed asset check (blocking or not) and every failed run: "
            f"recorded in the pcbo catalog, POSTed to {WEBHOOK_URL_ENV} (retried until delivered)"
        ),
    )
    def pcbo_alerts(context: dg.SensorEvaluationContext, pcbo: PcboEngineResource) -> dg.SensorResult:
        now = time.time()
        cursor = _parse_cursor(context.cursor, now, initial_lookback_seconds)
        alerts, next_cursor, more = collect_alerts(context.instance, cursor, batch_size)
        sweep: dict[str, Any] = cursor["sweep"]
        rederived: list[dict[str, Any]] = []
        if not more:  # the sweep waits while the cursor catches up (the tick is busy enough)
            rederived, sweep = _sweep_step(
                context.instance,
                sweep,
                now=now,
                window=window,
                every=rederive_every_seconds,
                batch_size=rederive_batch_size,
            )
        next_cursor["sweep"] = sweep
        known = {alert["alert_key"] for alert in alerts}
        rederived = [alert for alert in rederived if alert["alert_key"] not in known]
        alerts += rederived
        webhook_note: str | None = None
        webhook: AlertWebhook | None = None
        try:
            webhook = AlertWebhook.from_env(
                attempts=delivery_attempts,
                initial_wait=delivery_initial_wait,
                timeout=delivery_timeout,
            )
        except ValueError as exc:  # the message shows the URL redacted
            webhook_note = f"WEBHOOK MISCONFIGURED: {exc}; alerts only recorded"  # names the variable
            context.log.error(webhook_note)
        if webhook is None and webhook_note is None:
            webhook_note = f"no webhook ({WEBHOOK_URL_ENV} unset): alerts only recorded"
        report = None
        if alerts or webhook is not None:
            with alert_store(pcbo) as store:
                secret = alert_secret(pcbo.settings().home)
                report = raise_and_deliver(
                    store, alerts, webhook, secret=secret, budget_seconds=delivery_budget_seconds
                )
            for finding in report["findings"]:  # no secret: keys scrubbed, no row content
                context.log.warning(
                    f"FINDING: alert row {finding['alertId']} ({finding['alertKey']}): {finding['finding']}"
                )
        summary = _summary(alerts, report, webhook_note, {alert["alert_key"] for alert in rederived})
        if more:
            summary += "; more run ends to read next tick"
        delivery = report["delivery"] if report else None
        if delivery is not None and (delivery["left"] or delivery["failed"]):
            context.log.warning(summary)
        elif report and (report["raised"] or report["findings"] or (delivery and delivery["delivered"])):
            context.log.info(summary)
        return dg.SensorResult(skip_reason=summary, cursor=json.dumps(next_cursor, sort_keys=True))

    return pcbo_alerts

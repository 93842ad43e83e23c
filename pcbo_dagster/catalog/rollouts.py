"""`RolloutStore`: rollouts, their step log, approvals, soak evaluations and alerts in the catalog.

The tables live in the production catalog (migration 0003), next to the runs and partitions they
govern. `rollout_log`, `rollout_approvals` and `soak_evaluations` are append-only (database
triggers); a rollout's row holds only its current status and the operator's control request
(`run`, `pause`, `cancel`), which the staging apply reads between partitions.

Every method that records a moment takes `now` (default: the wall clock), so tests drive rollouts
with a controlled clock. These moments are operational records: none goes into a data file or a
digest.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypedDict, cast

from sqlalchemy import Text, select, type_coerce, update
from sqlalchemy.exc import IntegrityError

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import Database
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.io.clock import utc_now


class RolloutRow(TypedDict):
    """A row of `rollouts`: a named range of partitions of a dataset on its way to production."""

    name: str
    dataset: str
    version_label: str
    first_key: str
    last_key: str
    partition_keys: list[str]
    throttle: dict[str, Any]
    soak_window_seconds: int
    status: str
    control: str
    plan_hash: str | None
    decision_hash: str | None
    staging_run_id: str | None
    staged_at: datetime | None
    created_by: str
    created_at: datetime
    updated_at: datetime


def _json_column(text: Any, fits: Any, empty: Any) -> Any:
    """A JSON column's value when `fits(value)`, else `empty`: a row written by hand that holds no
    such JSON reads as empty, so it disagrees with the chain (`pcbo verify` names it, no gate opens
    on it) instead of failing every reader of the table (sensors, schedules, `verify` itself)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return empty
    return value if fits(value) else empty


def _rollout_row(row: Any) -> RolloutRow:
    out = dict(row._mapping)
    out["partition_keys"] = _json_column(
        out["partition_keys"], lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v), []
    )
    out["throttle"] = _json_column(out["throttle"], lambda v: isinstance(v, dict), {})
    return cast(RolloutRow, out)


def _with_detail(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    out["detail"] = _json_column(out["detail"], lambda v: True, None)
    return out


def _stored_moment(value: Any) -> datetime | None:
    """A moment column read as its stored value (`_alerts_select`): an aware UTC datetime, or None
    when the row holds no moment (SQLite keeps whatever text or number was written by hand)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _alerts_select() -> Any:
    """`SELECT` of `alerts` whose moments come back as stored, not through `UTCDateTime`: a row written
    by hand with a garbage time failed that type's conversion, so every read of the pending alerts
    failed and no later alert was ever delivered."""
    a = t.alerts
    return select(
        *(type_coerce(c, Text).label(c.name) if isinstance(c.type, t.UTCDateTime) else c for c in a.c)
    )


def _alert_row(row: Any) -> dict[str, Any]:
    out = _with_detail(row)
    for name in ("raised_at", "delivered_at"):
        out[name] = _stored_moment(out[name])
    return out


@contextmanager
def open_rollout_store(catalog_url: str) -> Iterator[RolloutStore | None]:
    """The rollout records of the catalog at `catalog_url` (migrated), closed on exit; None when it is
    an embedded SQLite catalog whose file does not exist yet (nothing was ever rolled out there), so
    that looking up an unknown rollout writes nothing."""
    catalog = Database(catalog_url)
    try:
        if catalog.is_missing_sqlite_file():
            yield None
            return
        catalog.migrate()
        yield RolloutStore(catalog)
    finally:
        catalog.close()


class RolloutStore:
    """Rollout records on the catalog database (a `CatalogStore` or any `Database`, migrated to
    revision 0003 or later), through its `write()` and `read()` transactions."""

    def __init__(self, catalog: Database) -> None:
        self.catalog = catalog

    # -- rollouts ---------------------------------------------------------------------------------

    def create_rollout(
        self,
        *,
        name: str,
        dataset: str,
        version_label: str,
        partition_keys: list[str],
        throttle: dict[str, Any],
        soak_window_seconds: int,
        actor: str,
        now: datetime | None = None,
    ) -> RolloutRow:
        """Record a new rollout (status `applying`); `InvalidInput` on `rollout` when the name is taken
        by a different range or dataset. Creating the same rollout again returns the existing one."""
        now = now or utc_now()
        if not partition_keys:
            raise InvalidInput("partitions", "a rollout needs at least one partition")
        values = {
            "name": name,
            "dataset": dataset,
            "version_label": version_label,
            "first_key": partition_keys[0],
            "last_key": partition_keys[-1],
            "partition_keys": compact_text(partition_keys),
            "throttle": compact_text(throttle),
            "soak_window_seconds": soak_window_seconds,
            "status": "applying",
            "control": "run",
            "created_by": actor,
            "created_at": now,
            "updated_at": now,
        }
        existing = self.get(name)
        if existing is None:
            try:
                with self.catalog.write() as conn:
                    conn.execute(t.rollouts.insert().values(**values))
                    self._log(
                        conn,
                        name,
                        "created",
                        actor,
                        {
                            "dataset": dataset,
                            "versionLabel": version_label,
                            "partitions": len(partition_keys),
                            "firstKey": partition_keys[0],
                            "lastKey": partition_keys[-1],
                            "throttle": throttle,
                            "soakWindowSeconds": soak_window_seconds,
                        },
                        now,
                    )
            except IntegrityError:  # created concurrently
                pass
            existing = self.get(name)
            assert existing is not None
        if (existing["dataset"], existing["version_label"], existing["partition_keys"]) != (
            dataset,
            version_label,
            partition_keys,
        ):
            raise InvalidInput(
                "rollout",
                f"rollout {name!r} already exists for {existing['dataset']}/{existing['version_label']} "
                f"{existing['first_key']}..{existing['last_key']}: choose another name",
            )
        return existing

    def get(self, name: str) -> RolloutRow | None:
        with self.catalog.read() as conn:
            row = conn.execute(select(t.rollouts).where(t.rollouts.c.name == name)).first()
        return None if row is None else _rollout_row(row)

    def require(self, name: str) -> RolloutRow:
        """The rollout, or `InvalidInput` on `rollout` naming the unknown name."""
        rollout = self.get(name)
        if rollout is None:
            raise InvalidInput("rollout", f"no rollout named {name!r}")
        return rollout

    def list(
        self, dataset: str | None = None, statuses: tuple[str, ...] | None = None
    ) -> builtins.list[RolloutRow]:
        """Rollouts, oldest first, optionally of one dataset and in some statuses."""
        r = t.rollouts
        stmt = select(r).order_by(r.c.created_at, r.c.name)
        if dataset is not None:
            stmt = stmt.where(r.c.dataset == dataset)
        if statuses is not None:
            stmt = stmt.where(r.c.status.in_(statuses))
        with self.catalog.read() as conn:
            return [_rollout_row(row) for row in conn.execute(stmt)]

    def set_status(
        self,
        name: str,
        status: str,
        *,
        actor: str | None = None,
        detail: dict[str, Any] | None = None,
        now: datetime | None = None,
        **fields: Any,
    ) -> None:
        """Move a rollout to `status` (and set other columns: decision_hash, staged_at, ...), logged."""
        if status not in t.ROLLOUT_STATUSES:
            raise ValueError(f"unknown rollout status {status!r}")
        now = now or utc_now()
        with self.catalog.write() as conn:
            conn.execute(
                update(t.rollouts)
                .where(t.rollouts.c.name == name)
                .values(status=status, updated_at=now, **fields)
            )
            self._log(conn, name, status, actor, detail or {}, now)

    def set_throttle(
        self, name: str, throttle: dict[str, Any], *, actor: str, now: datetime | None = None
    ) -> RolloutRow:
        """Change the rollout's throttle (a resumed apply given new limits), logged with the old ones."""
        now = now or utc_now()
        rollout = self.require(name)
        with self.catalog.write() as conn:
            conn.execute(
                update(t.rollouts)
                .where(t.rollouts.c.name == name)
                .values(throttle=compact_text(throttle), updated_at=now)
            )
            detail = {"from": rollout["throttle"], "to": throttle}
            self._log(conn, name, "throttle_changed", actor, detail, now)
        return self.require(name)

    def request_control(
        self, name: str, control: str, *, actor: str, reason: str = "", now: datetime | None = None
    ) -> RolloutRow:
        """Ask the staging apply to pause, resume (`run`) or cancel; logged with who and why."""
        if control not in t.ROLLOUT_CONTROLS:
            raise InvalidInput("action", f"must be pause, resume or cancel, not {control!r}")
        now = now or utc_now()
        rollout = self.require(name)
        with self.catalog.write() as conn:
            conn.execute(
                update(t.rollouts).where(t.rollouts.c.name == name).values(control=control, updated_at=now)
            )
            kind = {"run": "resume_requested", "pause": "pause_requested", "cancel": "cancel_requested"}[
                control
            ]
            self._log(conn, name, kind, actor, {"reason": reason, "statusWas": rollout["status"]}, now)
        return self.require(name)

    def control(self, name: str) -> str:
        with self.catalog.read() as conn:
            return str(
                conn.execute(select(t.rollouts.c.control).where(t.rollouts.c.name == name)).scalar_one()
            )

    # -- log --------------------------------------------------------------------------------------

    def log(
        self,
        name: str,
        kind: str,
        detail: dict[str, Any],
        *,
        actor: str | None = None,
        now: datetime | None = None,
    ) -> None:
        with self.catalog.write() as conn:
            self._log(conn, name, kind, actor, detail, now or utc_now())

    @staticmethod
    def _log(
        conn: Any, name: str, kind: str, actor: str | None, detail: dict[str, Any], now: datetime
    ) -> None:
        conn.execute(
            t.rollout_log.insert().values(
                rollout=name, kind=kind, actor=actor, detail=compact_text(detail), recorded_at=now
            )
        )

    def history(self, name: str) -> builtins.list[dict[str, Any]]:
        """The rollout's log, oldest first."""
        stmt = select(t.rollout_log).where(t.rollout_log.c.rollout == name).order_by(t.rollout_log.c.id)
        with self.catalog.read() as conn:
            return [_with_detail(row) for row in conn.execute(stmt)]

    # -- approvals --------------------------------------------------------------------------------

    def record_approval(
        self,
        *,
        name: str,
        decision: str,
        decision_hash: str,
        actor: str,
        reason: str,
        event_hash: str,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        if decision not in t.APPROVAL_DECISIONS:
            raise ValueError(f"unknown approval decision {decision!r}")
        now = now or utc_now()
        with self.catalog.write() as conn:
            conn.execute(
                t.rollout_approvals.insert().values(
                    rollout=name,
                    decision=decision,
                    decision_hash=decision_hash,
                    actor=actor,
                    reason=reason,
                    event_hash=event_hash,
                    recorded_at=now,
                )
            )
            self._log(
                conn,
                name,
                decision,
                actor,
                {"decisionHash": decision_hash, "reason": reason, "eventHash": event_hash},
                now,
            )
        latest = self.latest_approval(name)
        assert latest is not None
        return latest

    def approvals(self, name: str) -> builtins.list[dict[str, Any]]:
        a = t.rollout_approvals
        with self.catalog.read() as conn:
            return [
                dict(r._mapping) for r in conn.execute(select(a).where(a.c.rollout == name).order_by(a.c.id))
            ]

    def latest_approval(self, name: str) -> dict[str, Any] | None:
        """The approval or rejection in force (the newest), or None."""
        found = self.approvals(name)
        return found[-1] if found else None

    # -- soak evaluations -------------------------------------------------------------------------

    def record_soak_evaluation(
        self, name: str, passed: bool, detail: dict[str, Any], now: datetime | None = None
    ) -> dict[str, Any]:
        now = now or utc_now()
        with self.catalog.write() as conn:
            conn.execute(
                t.soak_evaluations.insert().values(
                    rollout=name, passed=1 if passed else 0, detail=compact_text(detail), evaluated_at=now
                )
            )
        return {"rollout": name, "passed": passed, "detail": detail, "evaluated_at": now}

    def soak_evaluations(self, name: str) -> builtins.list[dict[str, Any]]:
        """The rollout's soak evaluations, oldest first (`passed` as a bool, `detail` parsed)."""
        s = t.soak_evaluations
        with self.catalog.read() as conn:
            rows = [
                _with_detail(r) for r in conn.execute(select(s).where(s.c.rollout == name).order_by(s.c.id))
            ]
        for row in rows:
            row["passed"] = bool(row["passed"])
        return rows

    # -- alerts -----------------------------------------------------------------------------------

    def raise_alert(
        self,
        *,
        alert_key: str,
        kind: str,
        severity: str,
        subject: str,
        detail: dict[str, Any],
        mac: str,
        state_mac: str,
        now: datetime | None = None,
        replacing: int | None = None,
    ) -> dict[str, Any] | None:
        """Record an alert (delivery `pending`, its MACs: `alerts/webhook.py`); None when `alert_key`
        was already raised. `replacing` (the id of the row that holds `alert_key`, one whose MAC does
        not verify) overwrites that row instead: None when it no longer holds that key."""
        values = {
            "alert_key": alert_key,
            "kind": kind,
            "severity": severity,
            "subject": subject,
            "detail": compact_text(detail),
            "raised_at": now or utc_now(),
            "delivery_status": "pending",
            "attempts": 0,
            "last_error": None,
            "delivered_at": None,
            "mac": mac,
            "state_mac": state_mac,
        }
        a = t.alerts
        try:
            with self.catalog.write() as conn:
                if replacing is None:
                    conn.execute(a.insert().values(**values))
                else:
                    stmt = update(a).where(a.c.id == replacing, a.c.alert_key == alert_key)
                    if conn.execute(stmt.values(**values)).rowcount != 1:
                        return None
        except IntegrityError:
            return None
        return self.alert(alert_key)

    def alert(self, alert_key: str) -> dict[str, Any] | None:
        with self.catalog.read() as conn:
            row = conn.execute(_alerts_select().where(t.alerts.c.alert_key == alert_key)).first()
        return None if row is None else _alert_row(row)

    def alerts(
        self, delivery_status: str | None = None, ids: Iterable[int] | None = None
    ) -> builtins.list[dict[str, Any]]:
        """The alert rows (of `delivery_status`, of `ids`), in id order."""
        a = t.alerts
        stmt = _alerts_select().order_by(a.c.id)
        if delivery_status is not None:
            stmt = stmt.where(a.c.delivery_status == delivery_status)
        if ids is not None:
            stmt = stmt.where(a.c.id.in_(builtins.list(ids)))
        with self.catalog.read() as conn:
            return [_alert_row(r) for r in conn.execute(stmt)]

    def alert_states(self) -> builtins.list[dict[str, Any]]:
        """Every alert's id, key, MACs, delivery status and attempts (no content), in id order: what
        tells which alerts are to be sent (`alerts/webhook.py`)."""
        a = t.alerts
        columns = (a.c.id, a.c.alert_key, a.c.mac, a.c.state_mac, a.c.delivery_status, a.c.attempts)
        with self.catalog.read() as conn:
            return [dict(r._mapping) for r in conn.execute(select(*columns).order_by(a.c.id))]

    def record_delivery(
        self,
        alert_id: int,
        *,
        status: str,
        attempts: int,
        state_mac: str,
        error: str | None = None,
        now: datetime | None = None,
    ) -> None:
        """After a delivery attempt: its delivery `status` (`delivered`, `pending`: retried later,
        `failed`: never retried), `attempts` (the total) and `state_mac` (their MAC), the error."""
        now = now or utc_now()
        a = t.alerts
        with self.catalog.write() as conn:
            conn.execute(
                update(a)
                .where(a.c.id == alert_id)
                .values(
                    delivery_status=status,
                    attempts=attempts,
                    last_error=error,
                    delivered_at=now if status == "delivered" else None,
                    state_mac=state_mac,
                )
            )

    def mark_alert_unauthenticated(self, alert_id: int) -> None:
        """A pending row whose MAC does not verify: `unauthenticated` (never sent; its key may be
        raised again over it)."""
        a = t.alerts
        with self.catalog.write() as conn:
            conn.execute(
                update(a)
                .where(a.c.id == alert_id, a.c.delivery_status == "pending")
                .values(delivery_status="unauthenticated")
            )

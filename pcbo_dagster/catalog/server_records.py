"""The HTTP API's records (migration 0007): bearer tokens, the command audit, API runs, idempotency keys,
and the audit page that merges the command audit, the audit chain mirror and the discrepancies.

Tokens are stored as the SHA-256 of the secret (a 256-bit random value: no salt or slow hash is
needed to make a stolen table useless); the secret is shown once, by `create_token`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, String, and_, cast, false, func, literal, or_, select, true, union_all, update

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import Database
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.io.clock import utc_now

#: How long an answered `Idempotency-Key` is remembered from its first request (then a request with it
#: is a new one): a day, as payment APIs keep theirs.
IDEMPOTENCY_KEPT = timedelta(hours=24)

TOKEN_PREFIX = "pcbo_"
#: Columns `audit_page` sorts by, by their API names.
AUDIT_SORT_COLUMNS = {
    "timestamp": "timestamp",
    "actionType": "action_type",
    "target": "target",
    "source": "source",
}


def token_digest(secret: str) -> str:
    """How a token is stored and looked up: `sha256:<hex>` of its UTF-8 bytes."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _token_row(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    out.pop("token_hash", None)
    out["scopes"] = json.loads(out["scopes"])
    out["datasets"] = _json_or_none(out["datasets"])
    return out


def _command_row(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    for column in ("params", "outcome", "before_state", "after_state", "logs"):
        out[column] = _json_or_none(out[column])
    return out


def _dataset_filter(column: Any, datasets: Sequence[str] | None, chain_key: bool = False) -> Any:
    """`column` limited to `datasets` (None: no limit); a chain key column by its `dataset/` prefix."""
    if datasets is None:
        return None
    if chain_key:
        return or_(false(), *[column.startswith(f"{d}/", autoescape=True) for d in datasets])
    return column.in_(list(datasets))


class ServerRecords(Database):
    """The `api_tokens`, `command_audit`, `api_runs` and `idempotency_keys` tables."""

    # -- tokens -------------------------------------------------------------------------------

    def create_token(
        self,
        subject: str,
        scopes: Iterable[str],
        datasets: Iterable[str] | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[dict[str, Any], str]:
        """A new token: its row (without the hash) and the secret, which is not stored anywhere."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = {
            "token_id": "tok_" + secrets.token_hex(8),
            "subject": subject,
            "scopes": compact_text(sorted(set(scopes))),
            "datasets": None if datasets is None else compact_text(sorted(set(datasets))),
            "token_hash": token_digest(secret),
            "created_at": utc_now(),
            "expires_at": expires_at,
            "revoked_at": None,
        }
        with self.write() as conn:
            conn.execute(t.api_tokens.insert().values(**row))
        with self.read() as conn:
            stored = conn.execute(
                select(t.api_tokens).where(t.api_tokens.c.token_id == row["token_id"])
            ).one()
        return _token_row(stored), secret

    def token_for_secret(self, secret: str) -> dict[str, Any] | None:
        """The token row of `secret` when it is known, not revoked and not expired; else None."""
        tokens = t.api_tokens
        with self.read() as conn:
            row = conn.execute(select(tokens).where(tokens.c.token_hash == token_digest(secret))).first()
        if row is None:
            return None
        token = _token_row(row)
        if token["revoked_at"] is not None:
            return None
        if token["expires_at"] is not None and token["expires_at"] <= utc_now():
            return None
        return token

    def tokens(self) -> list[dict[str, Any]]:
        """Every token row (never a hash or a secret), oldest first."""
        tokens = t.api_tokens
        with self.read() as conn:
            rows = conn.execute(select(tokens).order_by(tokens.c.created_at, tokens.c.token_id)).all()
        return [_token_row(r) for r in rows]

    def revoke_token(self, token_id: str) -> dict[str, Any] | None:
        """Revoke the token (a revoked one stays revoked); its row, or None when there is no such token."""
        tokens = t.api_tokens
        with self.write() as conn:
            conn.execute(
                update(tokens)
                .where(tokens.c.token_id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=utc_now())
            )
            row = conn.execute(select(tokens).where(tokens.c.token_id == token_id)).first()
        return None if row is None else _token_row(row)

    # -- the command audit (append-only) ------------------------------------------------------

    def record_command_phase(
        self,
        *,
        command_id: str,
        phase: str,
        actor: str,
        action: str,
        target: str,
        dataset: str | None,
        params: dict[str, Any],
        outcome: Any = None,
        before_state: Any = None,
        after_state: Any = None,
        logs: Sequence[str] = (),
    ) -> dict[str, Any] | None:
        """Append the row of a phase a command reached; None (nothing written) when that command
        already has a row for `phase`, else the row."""
        audit = t.command_audit
        with self.write() as conn:
            exists = conn.execute(
                select(audit.c.id).where(audit.c.command_id == command_id, audit.c.phase == phase)
            ).first()
            if exists is not None:
                return None
            conn.execute(
                audit.insert().values(
                    command_id=command_id,
                    phase=phase,
                    actor=actor,
                    action=action,
                    target=target,
                    dataset=dataset,
                    params=compact_text(params),
                    outcome=None if outcome is None else compact_text(outcome),
                    before_state=None if before_state is None else compact_text(before_state),
                    after_state=None if after_state is None else compact_text(after_state),
                    logs=compact_text(list(logs)),
                    recorded_at=utc_now(),
                )
            )
            row = conn.execute(
                select(audit).where(audit.c.command_id == command_id, audit.c.phase == phase)
            ).one()
        return _command_row(row)

    def command_phases(self, command_id: str) -> list[dict[str, Any]]:
        """The rows of a command, in the order its phases were reached."""
        audit = t.command_audit
        with self.read() as conn:
            rows = conn.execute(select(audit).where(audit.c.command_id == command_id).order_by(audit.c.id))
            return [_command_row(r) for r in rows]

    def unfinished_commands(self) -> list[dict[str, Any]]:
        """The newest row of every command that reached no final phase (success, error, timeout)."""
        audit = t.command_audit
        finished = select(audit.c.command_id).where(audit.c.phase.in_(("success", "error", "timeout")))
        newest = (
            select(func.max(audit.c.id))
            .where(audit.c.command_id.not_in(finished))
            .group_by(audit.c.command_id)
        )
        with self.read() as conn:
            rows = conn.execute(select(audit).where(audit.c.id.in_(newest)).order_by(audit.c.id))
            return [_command_row(r) for r in rows]

    # -- API runs -----------------------------------------------------------------------------

    def create_api_run(
        self, *, run_id: str, actor: str, dataset: str, version_label: str, request_hash: str
    ) -> dict[str, Any] | None:
        """Record a submitted execute as `queued`; None when recorded, else the existing row."""
        runs = t.api_runs
        with self.write() as conn:
            row = conn.execute(select(runs).where(runs.c.run_id == run_id)).first()
            if row is not None:
                return _api_run_row(row)
            conn.execute(
                runs.insert().values(
                    run_id=run_id,
                    status="queued",
                    actor=actor,
                    dataset=dataset,
                    version_label=version_label,
                    request_hash=request_hash,
                    submitted_at=utc_now(),
                )
            )
        return None

    def replace_api_run(
        self, *, run_id: str, actor: str, dataset: str, version_label: str, request_hash: str
    ) -> bool:
        """Record a finished run's new submission as `queued` again (its previous answer is dropped);
        False, and nothing changed, unless `run_id` is a finished run of `dataset` (a run id is its
        dataset's: another dataset's run, or one in flight, is never replaced)."""
        runs = t.api_runs
        with self.write() as conn:
            replaced = conn.execute(
                update(runs)
                .where(
                    runs.c.run_id == run_id,
                    runs.c.dataset == dataset,
                    runs.c.status.not_in(("queued", "running")),
                )
                .values(
                    status="queued",
                    actor=actor,
                    dataset=dataset,
                    version_label=version_label,
                    request_hash=request_hash,
                    dagster_run_id=None,
                    http_status=None,
                    document=None,
                    submitted_at=utc_now(),
                    finished_at=None,
                )
            )
        return replaced.rowcount == 1

    def update_api_run(
        self,
        run_id: str,
        status: str,
        *,
        http_status: int | None = None,
        document: Any = None,
        dagster_run_id: str | None = None,
    ) -> None:
        """Move a run to `status`; a final one (anything but queued and running) with its answer."""
        values: dict[str, Any] = {"status": status}
        if status not in ("queued", "running"):
            values.update(
                http_status=http_status,
                document=None if document is None else compact_text(document),
                finished_at=utc_now(),
            )
        if dagster_run_id is not None:
            values["dagster_run_id"] = dagster_run_id
        with self.write() as conn:
            conn.execute(update(t.api_runs).where(t.api_runs.c.run_id == run_id).values(**values))

    def get_api_run(self, run_id: str) -> dict[str, Any] | None:
        with self.read() as conn:
            row = conn.execute(select(t.api_runs).where(t.api_runs.c.run_id == run_id)).first()
        return None if row is None else _api_run_row(row)

    def api_runs_in_flight(self) -> list[dict[str, Any]]:
        runs = t.api_runs
        with self.read() as conn:
            rows = conn.execute(
                select(runs).where(runs.c.status.in_(("queued", "running"))).order_by(runs.c.submitted_at)
            )
            return [_api_run_row(r) for r in rows]

    def interrupt_api_runs(self, reason: str) -> list[str]:
        """Mark every queued or running API run `interrupted` (a server that stopped without finishing
        them); returns their run ids."""
        stale = [r["run_id"] for r in self.api_runs_in_flight()]
        for run_id in stale:
            self.update_api_run(run_id, "interrupted", http_status=None, document={"detail": reason})
        return stale

    # -- idempotency keys ---------------------------------------------------------------------

    def claim_idempotency_key(self, subject: str, key: str, request_hash: str) -> dict[str, Any] | None:
        """Claim `key` for a first request; None when claimed, else the existing row (its answer, or
        `http_status` None while the first request is still being answered). Answered keys are kept
        `IDEMPOTENCY_KEPT` from their first request, then forgotten (each claim removes those past it):
        every execute stores its whole document under its key, and the table would grow for ever."""
        keys = t.idempotency_keys
        where = (keys.c.subject == subject, keys.c.idempotency_key == key)
        now = utc_now()
        with self.write() as conn:
            conn.execute(
                keys.delete().where(
                    keys.c.http_status.is_not(None), keys.c.created_at < now - IDEMPOTENCY_KEPT
                )
            )
            row = conn.execute(select(keys).where(*where)).first()
            if row is not None:
                out = dict(row._mapping)
                out["response"] = _json_or_none(out["response"])
                return out
            conn.execute(
                keys.insert().values(
                    subject=subject,
                    idempotency_key=key,
                    request_hash=request_hash,
                    http_status=None,
                    response=None,
                    created_at=now,
                )
            )
        return None

    def answer_idempotency_key(self, subject: str, key: str, http_status: int, response: Any) -> None:
        keys = t.idempotency_keys
        with self.write() as conn:
            conn.execute(
                update(keys)
                .where(keys.c.subject == subject, keys.c.idempotency_key == key)
                .values(http_status=http_status, response=compact_text(response))
            )

    def release_idempotency_key(self, subject: str, key: str) -> None:
        """Forget a claim whose request ended without an answer (a server error): a retry runs again."""
        keys = t.idempotency_keys
        with self.write() as conn:
            conn.execute(
                keys.delete().where(
                    keys.c.subject == subject, keys.c.idempotency_key == key, keys.c.http_status.is_(None)
                )
            )

    def release_unanswered_idempotency_keys(self) -> int:
        """Forget every claim no answer was recorded for (a server stopped outright while answering:
        at start, one server per catalog, none is being answered); returns how many."""
        keys = t.idempotency_keys
        with self.write() as conn:
            return int(conn.execute(keys.delete().where(keys.c.http_status.is_(None))).rowcount or 0)

    # -- the audit page -----------------------------------------------------------------------

    def audit_page(
        self,
        *,
        page: int,
        limit: int,
        sort_by: str = "timestamp",
        descending: bool = True,
        action_type: str | None = None,
        target: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        datasets: Sequence[str] | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of the merged history — commands (a row per phase), audit events and discrepancies
        — and the number of entries matching. `target` matches exactly or as a prefix ending at `/`;
        `start` inclusive, `end` exclusive; `datasets` limits it to those datasets (None: all; a
        command about every dataset, such as gc, is left out of a limited page)."""
        audit, events, found = t.command_audit, t.audit_events, t.discrepancy_events
        commands = select(
            literal("command").label("source"),
            cast(audit.c.id, Integer).label("sort_id"),
            audit.c.action.label("action_type"),
            audit.c.target.label("target"),
            audit.c.recorded_at.label("timestamp"),
        ).where(*filter(lambda c: c is not None, [_dataset_filter(audit.c.dataset, datasets)]))
        chain = select(
            literal("audit_event").label("source"),
            cast(events.c.seq, Integer).label("sort_id"),
            events.c.event_type.label("action_type"),
            events.c.chain_key.label("target"),
            events.c.recorded_at.label("timestamp"),
        ).where(*filter(lambda c: c is not None, [_dataset_filter(events.c.chain_key, datasets, True)]))
        discrepancy_target = found.c.dataset + literal("/") + found.c.version_label
        discrepancies = select(
            literal("discrepancy").label("source"),
            cast(found.c.id, Integer).label("sort_id"),
            found.c.kind.label("action_type"),
            func.coalesce(
                discrepancy_target + literal("/") + found.c.partition_key, discrepancy_target
            ).label("target"),
            found.c.recorded_at.label("timestamp"),
        ).where(*filter(lambda c: c is not None, [_dataset_filter(found.c.dataset, datasets)]))
        merged = union_all(commands, chain, discrepancies).subquery("history")
        conditions = []
        if action_type is not None:
            conditions.append(merged.c.action_type == action_type)
        if target is not None:
            conditions.append(
                or_(
                    merged.c.target == target,
                    merged.c.target.startswith(target.rstrip("/") + "/", autoescape=True),
                )
            )
        if start is not None:
            conditions.append(merged.c.timestamp >= _db_instant(self.dialect, start))
        if end is not None:
            conditions.append(merged.c.timestamp < _db_instant(self.dialect, end))
        where = and_(true(), *conditions)
        column = merged.c[AUDIT_SORT_COLUMNS[sort_by]]
        order = [column.desc() if descending else column.asc()]
        tie = [merged.c.timestamp, merged.c.source, merged.c.sort_id]
        order += [c.desc() if descending else c.asc() for c in tie]
        with self.read() as conn:
            total = conn.execute(select(func.count()).select_from(merged).where(where)).scalar_one()
            rows = conn.execute(
                select(merged).where(where).order_by(*order).limit(limit).offset((page - 1) * limit)
            ).all()
            entries = [self._audit_entry(conn, dict(r._mapping)) for r in rows]
        return entries, int(total)

    def _audit_entry(self, conn: Any, row: dict[str, Any]) -> dict[str, Any]:
        source, sort_id = row["source"], row["sort_id"]
        entry: dict[str, Any] = {
            "id": f"{source}:{sort_id}"
            if source != "audit_event"
            else f"audit_event:{row['target']}:{sort_id}",
            "source": source,
            "actionType": row["action_type"],
            "target": row["target"],
            "timestamp": _instant_text(row["timestamp"]),
        }
        if source == "command":
            audit = t.command_audit
            command = _command_row(conn.execute(select(audit).where(audit.c.id == sort_id)).one())
            entry.update(
                actor=command["actor"],
                details={
                    "commandId": command["command_id"],
                    "phase": command["phase"],
                    "params": command["params"],
                    "outcome": command["outcome"],
                    "beforeState": command["before_state"],
                    "afterState": command["after_state"],
                    "logs": command["logs"],
                },
            )
        elif source == "audit_event":
            events = t.audit_events
            text = conn.execute(
                select(events.c.event_json).where(
                    events.c.chain_key == row["target"], events.c.seq == sort_id
                )
            ).scalar_one()
            event = json.loads(text)
            entry.update(actor=event.get("actor"), details=event)
        else:
            found = t.discrepancy_events
            discrepancy = dict(conn.execute(select(found).where(found.c.id == sort_id)).one()._mapping)
            entry.update(
                actor=None,
                details={
                    "runId": discrepancy["run_id"],
                    "partitionKey": discrepancy["partition_key"],
                    "detail": json.loads(discrepancy["detail"]),
                },
            )
        return entry


def _db_instant(dialect: str, value: datetime) -> Any:
    """A UTC instant as the merged (untyped) timestamp column compares with it: SQLite stores naive
    UTC text, PostgreSQL a timestamptz."""
    from datetime import UTC

    value = value.astimezone(UTC)
    if dialect == "sqlite":
        return literal(value.strftime("%Y-%m-%d %H:%M:%S.%f"), String)
    return value


def _instant_text(value: Any) -> str:
    """A stored instant (a datetime, or SQLite's text through the union) as
    `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`."""
    from datetime import UTC

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text + "Z"


def _api_run_row(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    out["document"] = _json_or_none(out["document"])
    return out

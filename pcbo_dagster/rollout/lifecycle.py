"""A rollout's lifecycle on its dataset version's production audit chain: read it, verified, and record
each step there first (the events and their fold: `core/rollout_lifecycle.py`).

`production_chain` is the one reader every gate uses (the approvals, the soak, the promotion gate,
the repairs): the whole chain from the audit backup, which must verify (`IntegrityError` if not).
The `record_*` functions append the step's event to that chain (and publish its checkpoint), then
write the catalog (the `rollouts` row, its log, `soak_evaluations`): a crash in between leaves the
chain ahead of the catalog, which `pcbo verify` reports and the gate never takes for more than the
chain says.

With the operator's key (`PCBO_SIGNING_KEY`, the production environment's `signing_key`) each
lifecycle event appended here carries the key's signature over its chain key, place, type and body
(`core/operator_signatures.py`; `AuditLog.append` signs the body as it writes it), and
`read_lifecycle` counts only the events that key signed, each once: events appended by someone
without the key open nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pcbo_dagster.catalog.rollouts import RolloutRow
from pcbo_dagster.core.audit_chain import split_chain_key, verify_chain
from pcbo_dagster.core.errors import IntegrityError, InvalidInput
from pcbo_dagster.core.instants import format_datetime, parse_instant, to_datetime
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.core.rollout_lifecycle import (
    ROLLOUT_CANCELLED,
    ROLLOUT_ROLLED_BACK,
    ROLLOUT_SOAK_EVALUATED,
    ROLLOUT_STAGED,
    SOAKING,
    Lifecycle,
    detail_digest,
    lifecycle,
    rollout_subject,
    row_disagreements,
)
from pcbo_dagster.core.signed_approvals import APPROVAL_EVENTS
from pcbo_dagster.datasets.config import DatasetConfig
from pcbo_dagster.datasets.requests import key_range
from pcbo_dagster.engine.events import PRODUCER, chain_key
from pcbo_dagster.engine.transparency_log import publish
from pcbo_dagster.rollout.environments import RolloutEnvironments


def production_chain(envs: RolloutEnvironments, rollout: RolloutRow) -> list[dict[str, Any]]:
    """Every event of the rollout's dataset version's production audit chain; `IntegrityError` when
    that chain does not verify (then nothing on it can be trusted), or when the rollout's row names
    no chain (a dataset or version label written by hand that cannot be part of a chain key)."""
    return dataset_production_chain(envs, rollout["dataset"], rollout["version_label"])


def dataset_production_chain(
    envs: RolloutEnvironments, dataset: str, version_label: str
) -> list[dict[str, Any]]:
    """`production_chain` of a dataset version, whatever rollout row there is (or none)."""
    ckey = chain_key(dataset, version_label)
    try:
        split_chain_key(ckey)
    except ValueError as exc:
        raise IntegrityError(f"the rollout's row names no production audit chain: {exc}") from None
    events, problems = envs.production.audit.backup.read_chain_with_problems(ckey)
    findings = problems + verify_chain(events, ckey)
    if findings:
        raise IntegrityError(f"the production audit chain {ckey} does not verify: {'; '.join(findings[:3])}")
    return events


def read_lifecycle(
    envs: RolloutEnvironments, rollout: RolloutRow, events: list[dict[str, Any]] | None = None
) -> Lifecycle:
    """The rollout's lifecycle by the verified production chain (`events`: that chain, already read);
    with the operator's key, by the lifecycle events it signed only."""
    return chain_lifecycle(
        envs, rollout["name"], production_chain(envs, rollout) if events is None else events
    )


def chain_lifecycle(envs: RolloutEnvironments, name: str, events: list[dict[str, Any]]) -> Lifecycle:
    """The lifecycle of rollout `name` on the verified production chain `events` (`read_lifecycle`),
    whether or not the catalog holds a row for it."""
    return lifecycle(events, name, envs.production.operator_verifier)


def staged_keys(dataset: DatasetConfig, life: Lifecycle) -> list[str] | None:
    """The partition keys the rollout staged, by the chain: the dataset's keys from the first to the
    last key its `rollout_staged` event names (as many as it counts); None when the chain has no such
    event or its range is not one of the dataset's. What the soak evaluates and the health check
    checks, never the `partition_keys` of a catalog row (which anyone who can write the catalog can
    edit)."""
    subject = None if life.staged is None else life.staged.get("rollout")
    if not isinstance(subject, dict):
        return None
    try:
        keys = key_range(dataset, str(subject.get("first_key")), str(subject.get("last_key")))
    except InvalidInput:
        return None
    return keys if len(keys) == subject.get("partition_count") else None


def staged_row_disagreements(dataset: DatasetConfig, life: Lifecycle, row: RolloutRow) -> list[str]:
    """Where the rollout's catalog row differs from what the chain says of it (`row_disagreements`),
    and, when it agrees with the `rollout_staged` event, whether its partition keys are exactly the
    range that event names (`staged_keys`): a row whose first and last keys and count are the
    chain's but whose middle keys were swapped names partitions the chain never staged."""
    found = row_disagreements(life, row)
    if not found and life.staged is not None and list(row["partition_keys"]) != staged_keys(dataset, life):
        found.append(
            f"its partition keys are not the range {row['first_key']} .. {row['last_key']} it staged"
        )
    return found


def refuse_unwritable_chain(
    envs: RolloutEnvironments, dataset: str, version_label: str, doing: str, keyless: bool = False
) -> None:
    """Before a rollout step appends to the production chain (or, a staging apply, writes anything):
    the chain as a run that writes reads it (`partition_checks.verified_chain`: the stores reconciled,
    every hash, its stored log and checkpoints, and, with the operator's key, every event it should have
    signed), written only by a process holding the key that signs it. `ChainNotVerified` (exit 1)
    otherwise, nothing written: an event appended after one the key did not sign would build on it, and
    one appended without the key (or with another) is one no gate counts and `verify` reports for good.
    `keyless`: a step whose event another key signs (an approval, by its approver) may also be taken
    by a process given no operator key at all."""
    from pcbo_dagster.engine.partition_checks import verified_chain

    verified_chain(envs.production, dataset, version_label, doing, keyless_writer=keyless)


def append_event(
    envs: RolloutEnvironments,
    rollout: RolloutRow,
    event_type: str,
    body: dict[str, Any],
    precondition: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Append an event about `rollout` to its production chain (the subject and producer added) and
    publish the chain's checkpoint; returns the event. A lifecycle event is signed with the operator's
    key when there is one (module doc); the chain must be one this process may write
    (`refuse_unwritable_chain`, before the lock). `precondition` runs under the chain's writer lock, before
    the append (`AuditLog.append_many`): what it raises refuses the append."""
    ckey = chain_key(rollout["dataset"], rollout["version_label"])
    doing = f"the {event_type} of rollout {rollout['name']!r}"
    refuse_unwritable_chain(
        envs, rollout["dataset"], rollout["version_label"], doing, keyless=event_type in APPROVAL_EVENTS
    )
    audit = envs.production.audit
    full = {"rollout": rollout_subject(rollout), **body, "producer": PRODUCER}
    event = audit.append(ckey, event_type, full, precondition=precondition)
    publish(envs.production, ckey)
    return event


def record_staged(
    envs: RolloutEnvironments,
    name: str,
    *,
    decision_hash: str,
    plan_hash: str,
    staging_run_id: str,
    staged_at: datetime,
    soak_window_seconds: int,
    by: str | None = None,
) -> dict[str, Any]:
    """The staging apply of `name` finished: `rollout_staged` on the chain, then the row `soaking`.
    `soak_window_seconds` is the dataset config's (the row's column is set to it): never the row's,
    which anyone who can write the catalog could have shortened while the apply ran.

    When the chain already says the rollout is soaking on these very decisions and plan (an apply of
    it that ran at once and staged first, or this one before a crash between the chain and the row),
    nothing is appended (a second `rollout_staged` would move the soak window): the row takes that
    event's staging, moment and window, and the event is returned."""
    rollout: RolloutRow = {
        **envs.store.require(name),
        "staging_run_id": staging_run_id,
        "soak_window_seconds": soak_window_seconds,
    }
    already: list[dict[str, Any]] = []

    def not_staged_already() -> None:  # under the chain's writer lock: no other apply stages meanwhile
        life = read_lifecycle(envs, rollout)
        staged = life.staged or {}
        if life.status == SOAKING and (
            staged.get("decision_hash"),
            staged.get("plan_hash"),
            staged.get("rollout"),
        ) == (decision_hash, plan_hash, rollout_subject(rollout)):
            already.append(staged)
            raise _StagedAlready

    try:
        event = append_event(
            envs,
            rollout,
            ROLLOUT_STAGED,
            {
                "decision_hash": decision_hash,
                "plan_hash": plan_hash,
                "staged_at": format_datetime(staged_at),
                "soak_window_seconds": rollout["soak_window_seconds"],
                "by": by,
            },
            precondition=not_staged_already,
        )
    except _StagedAlready:
        event = already[0]
        micros = parse_instant(event.get("staged_at"))
        window = event.get("soak_window_seconds")
        if micros is None or not isinstance(window, int):  # (a lifecycle event pcbo appended has both)
            raise IntegrityError(
                f"rollout {name!r}: its rollout_staged event names no moment or window"
            ) from None
        staged_at, soak_window_seconds = to_datetime(micros), window
    envs.store.set_status(
        name,
        "soaking",
        now=staged_at,
        detail={
            "decisionHash": decision_hash,
            "planHash": plan_hash,
            "runId": staging_run_id,
            "auditEventHash": event["chain"]["event_hash"],
        },
        plan_hash=plan_hash,
        decision_hash=decision_hash,
        staging_run_id=staging_run_id,
        staged_at=staged_at,
        soak_window_seconds=soak_window_seconds,
    )
    return event


class _StagedAlready(Exception):
    """The chain says the rollout was staged on these decisions already (`record_staged`)."""


def record_soak_evaluation(
    envs: RolloutEnvironments, rollout: RolloutRow, passed: bool, detail: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """One soak evaluation: `rollout_soak_evaluated` on the chain (verdict, moment, each check's verdict
    and message, the digest of the detail), then the `soak_evaluations` row; returns the row's record."""
    stored = json.loads(compact_text(detail))  # the detail as the catalog gives it back
    checks = stored.get("checks") or {}
    append_event(
        envs,
        rollout,
        ROLLOUT_SOAK_EVALUATED,
        {
            "passed": bool(passed),
            "evaluated_at": format_datetime(now),
            "decision_hash": stored.get("decision_hash"),
            "decision_hash_now": stored.get("decision_hash_now"),
            "failed_checks": list(stored.get("failed_checks") or []),
            "checks": {
                check: {"passed": bool(c.get("passed")), "message": str(c.get("message", ""))}
                for check, c in checks.items()
            },
            "detail_digest": detail_digest(stored),
            # the detail as the row holds it (as text: it may hold floats, which an event's values may
            # not), so a row a crash lost is written again from the chain (verify --repair)
            "detail_json": compact_text(stored),
        },
    )
    return envs.store.record_soak_evaluation(rollout["name"], passed, detail, now=now)


def record_cancelled(
    envs: RolloutEnvironments, name: str, *, by: str | None, now: datetime, detail: dict[str, Any]
) -> None:
    """The staging apply of `name` stopped on a cancel request: `rollout_cancelled`, then the row."""
    body = {"by": by, "cancelled_at": format_datetime(now)}
    _record_status(envs, name, ROLLOUT_CANCELLED, body, "cancelled", by=by, now=now, detail=detail)


def record_rolled_back(
    envs: RolloutEnvironments, name: str, *, by: str, now: datetime, detail: dict[str, Any]
) -> None:
    """A rollback left `name` without a current version: `rollout_rolled_back` (stage, who, why, the
    rollback id), then the row `rolled_back` (its log entry holds `detail`)."""
    body = {
        "stage": detail.get("stage"),
        "by": by,
        "reason": detail.get("reason"),
        "rollback_id": detail.get("rollbackId"),
        "rolled_back_at": format_datetime(now),
    }
    _record_status(envs, name, ROLLOUT_ROLLED_BACK, body, "rolled_back", by=by, now=now, detail=detail)


def _record_status(
    envs: RolloutEnvironments,
    name: str,
    event_type: str,
    body: dict[str, Any],
    status: str,
    *,
    by: str | None,
    now: datetime,
    detail: dict[str, Any],
) -> None:
    """`event_type` (`body`) about rollout `name` on its chain, then the row `status` (its log entry
    holds `detail` and the event's hash)."""
    event = append_event(envs, envs.store.require(name), event_type, body)
    envs.store.set_status(
        name, status, actor=by, now=now, detail={**detail, "auditEventHash": event["chain"]["event_hash"]}
    )

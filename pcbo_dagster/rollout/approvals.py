"""The approval gate: a person approves or rejects a rollout, naming the decision hash they judged.

An approval is written twice, audit chain first: a `rollout_approved` / `rollout_rejected` event on
the dataset's production chain (`<dataset>/<versionLabel>`, in the production audit backup, so
anyone verifying the chain offline sees who approved what), then a row of the append-only
`rollout_approvals` table holding that event's hash (for listings). The decision in force is read
from the chain, never from the table (`decision_in_force`): the newest approval or rejection event of
the rollout on a production chain that verifies. A row inserted into the table alone opens nothing.
A rejection can be followed by an approval (of a re-staged rollout) and vice versa, and nothing is
ever edited.

Refused with `InvalidInput` (exit 2, nothing written): an unknown rollout, a rollout not halted for
review (status `soaking`), an empty `by` or `reason`, or a `decisionHash` that is not the one the
rollout staged (an approver approves exactly what was staged and soaked).
"""

from __future__ import annotations

from typing import Any

from pcbo_dagster.catalog.rollouts import RolloutRow
from pcbo_dagster.core.audit_chain import verify_chain
from pcbo_dagster.core.errors import IntegrityError, InvalidInput
from pcbo_dagster.engine.events import PRODUCER, chain_key
from pcbo_dagster.rollout.clock import REAL_CLOCK, Clock
from pcbo_dagster.rollout.environments import RolloutEnvironments

ROLLOUT_APPROVED = "rollout_approved"
ROLLOUT_REJECTED = "rollout_rejected"
DECISIONS = {"approve": "approved", "reject": "rejected"}


def rollout_subject(rollout: RolloutRow) -> dict[str, Any]:
    """The rollout as the audit events about it (approval, rejection, promotion) name it."""
    return {
        "name": rollout["name"],
        "dataset": rollout["dataset"],
        "version_label": rollout["version_label"],
        "first_key": rollout["first_key"],
        "last_key": rollout["last_key"],
        "partition_count": len(rollout["partition_keys"]),
        "staging_run_id": rollout["staging_run_id"],
    }


def record_decision(
    envs: RolloutEnvironments,
    name: str,
    action: str,
    *,
    by: str,
    reason: str,
    decision_hash: str | None = None,
    clock: Clock = REAL_CLOCK,
) -> dict[str, Any]:
    """Approve (`action="approve"`) or reject a rollout; returns the recorded approval row."""
    if action not in DECISIONS:
        raise InvalidInput("decision", f"must be approve or reject, not {action!r}")
    by, reason = (by or "").strip(), (reason or "").strip()
    if not by:
        raise InvalidInput("by", "say who approves or rejects (a name or an e-mail address)")
    if not reason:
        raise InvalidInput("reason", "say why")
    rollout = envs.store.require(name)
    if rollout["status"] != "soaking":
        raise InvalidInput(
            "rollout",
            f"rollout {name!r} is {rollout['status']}: only a rollout applied to staging and halted for "
            "review (soaking) can be approved or rejected",
        )
    staged = rollout["decision_hash"]
    assert staged is not None  # a soaking rollout has staged decisions
    if decision_hash is not None and decision_hash != staged:
        raise InvalidInput(
            "decisionHash",
            f"{decision_hash} is not the decision hash rollout {name!r} staged ({staged}); "
            "approve what was staged and soaked",
        )
    decision = DECISIONS[action]
    ckey = chain_key(rollout["dataset"], rollout["version_label"])
    event = envs.production.audit.append(
        ckey,
        ROLLOUT_APPROVED if decision == "approved" else ROLLOUT_REJECTED,
        {
            "rollout": rollout_subject(rollout),
            "decision": decision,
            "decision_hash": staged,
            "plan_hash": rollout["plan_hash"],
            "by": by,
            "reason": reason,
            "producer": PRODUCER,
        },
    )
    envs.production.audit.deliver_pending(ckey)
    return envs.store.record_approval(
        name=name,
        decision=decision,
        decision_hash=staged,
        actor=by,
        reason=reason,
        event_hash=event["chain"]["event_hash"],
        now=clock.now(),
    )


def decision_in_force(envs: RolloutEnvironments, rollout: RolloutRow) -> dict[str, Any] | None:
    """The approval or rejection in force for `rollout`: its newest `rollout_approved` /
    `rollout_rejected` event on the dataset's production chain, as `{decision, actor, reason,
    decision_hash, event_hash}`; None when there is none. `IntegrityError` when that chain does not
    verify (then no approval can be trusted)."""
    ckey = chain_key(rollout["dataset"], rollout["version_label"])
    events, problems = envs.production.audit.backup.read_chain_with_problems(ckey)
    findings = problems + verify_chain(events, ckey)
    if findings:
        raise IntegrityError(f"the production audit chain {ckey} does not verify: {'; '.join(findings[:3])}")
    found = None
    for event in events:
        body = event.get("rollout")
        if event.get("event_type") in (ROLLOUT_APPROVED, ROLLOUT_REJECTED) and isinstance(body, dict):
            if body.get("name") == rollout["name"]:
                found = event
    if found is None:
        return None
    return {
        "decision": found["decision"],
        "actor": found["by"],
        "reason": found["reason"],
        "decision_hash": found["decision_hash"],
        "event_hash": found["chain"]["event_hash"],
    }

"""The approval gate: approvers sign their decision on a rollout with their own keys.

An approval or a rejection is a *signed statement* (`core/signed_approvals.py`: the rollout, the
decision, the staged decision hash, the approver's key name, the reason and the time, as a C2SP
signed note) made with the approver's Ed25519 key (`pcbo approve|reject ROLLOUT --key FILE`), or
signed elsewhere and pasted (`--statement FILE`, the Dagster `rollout_approval` job). The dataset's
config lists the approvers' verifier keys (`rollout.approvers`) and how many must approve
(`rollout.requiredApprovals`, default 1).

Recording: the statement must verify under a listed key and name this rollout, the decision asked
for and the decision hash it staged; then it is appended to the dataset's production audit chain
(`rollout_approved` / `rollout_rejected`, carrying the signed statement, so anyone verifying the
chain offline can check the signature), then to the append-only `rollout_approvals` table (listings).

The decision in force is read from the chain, never from the table (`decision_in_force`): every
approval and rejection event of the rollout on a production chain that verifies whose signed
statement verifies under a listed key *and* says what its event says (the rollout, decision and
decision hash: a statement copied into another rollout's event, or for another decision hash,
counts for nothing). Each signed statement counts once, where it first stands on the chain: the
same statement recorded or appended again (a replay of a public approval) is ignored. The newest
such decision is in force when it is a rejection; otherwise the rollout is approved once
`requiredApprovals` distinct listed approvers approved the staged decision hash since the last
rejection (fewer: `pending`) in statements signed no earlier than that rejection: an approval signed
before a rejection never outlives it, however late it is brought. Nor does one dated ahead: an
approval whose signed time is later than the moment its event was appended (by more than
`CLOCK_SKEW_SECONDS`) counts for nothing, since it would order after every rejection made before its
date. Nor does one signed before the rollout's staging in force (its `rollout_staged` event's
`staged_at`, less the same skew): it approved no soak of what is staged here — a rehearsal deployment
that staged the same range under the same rollout name staged the same decision hash, and its
approval would otherwise count in production. A row inserted into the table alone, a bare name, a
forged, replayed or unlisted signature open nothing.

Refused with `InvalidInput` (exit 2, nothing written): an unknown rollout, a rollout not halted for
review (status `soaking`), an empty reason, a statement that does not verify under a listed key, one
for another rollout, decision or decision hash than the one the rollout staged, a statement already
on the chain, an approval signed before the rollout was staged or before the rejection in force, or a
decision signed in the future. A
rejection on the chain dated ahead of its event takes effect when its event was appended.
"""

from __future__ import annotations

from typing import Any

from pcbo_dagster.catalog.rollouts import RolloutRow
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import parse_instant, to_micros
from pcbo_dagster.core.rollout_lifecycle import SOAKING, row_disagreements
from pcbo_dagster.core.signed_approvals import (
    ROLLOUT_APPROVED,
    ROLLOUT_REJECTED,
    SignedApproval,
    approval_of_event,
    read_signed_approval,
    sign_approval,
    statement_of,
)
from pcbo_dagster.core.signed_note import NoteError, SigningKey
from pcbo_dagster.rollout.clock import REAL_CLOCK, Clock
from pcbo_dagster.rollout.environments import ApprovalPolicy, RolloutEnvironments
from pcbo_dagster.rollout.lifecycle import (
    append_event,
    production_chain,
    read_lifecycle,
    refuse_unwritable_chain,
)

#: How far an approval's signed time may run ahead of the moment it is recorded (clock skew).
CLOCK_SKEW_SECONDS = 600
DECISIONS = {"approve": "approved", "reject": "rejected"}


def sign_decision(
    key: SigningKey, rollout: RolloutRow, action: str, reason: str, decision_hash: str | None, time: str
) -> str:
    """The signed statement of `key`'s decision (`action`: approve / reject) on `rollout`."""
    if action not in DECISIONS:
        raise InvalidInput("decision", f"must be approve or reject, not {action!r}")
    reason = (reason or "").strip()
    if not reason:
        raise InvalidInput("reason", "say why")
    if decision_hash is not None and not decision_hash.strip():
        # (`--decision-hash "$HASH"` with the variable unset): not "whatever is staged now"
        raise InvalidInput("decisionHash", "is empty: give the decision hash you approve, or leave it out")
    staged = rollout["decision_hash"] if decision_hash is None else decision_hash
    staged = staged or ""
    return sign_approval(key, rollout["name"], DECISIONS[action], staged, reason, time).render()


def record_decision(
    envs: RolloutEnvironments,
    name: str,
    statement: str,
    *,
    action: str | None = None,
    reason: str | None = None,
    decision_hash: str | None = None,
    clock: Clock = REAL_CLOCK,
) -> dict[str, Any]:
    """Record a signed approval or rejection of rollout `name`; returns the recorded approval row.
    `action` (approve / reject), `reason` and `decision_hash`, when given (a statement brought with
    `--reason` or `--decision-hash`), must be what the statement says: it is recorded as signed, so
    a value that says otherwise is refused, never dropped."""
    rollout = envs.store.require(name)
    if rollout["status"] != "soaking":
        raise InvalidInput(
            "rollout",
            f"rollout {name!r} is {rollout['status']}: only a rollout applied to staging and halted for "
            "review (soaking) can be approved or rejected",
        )
    # (a process given another key than the chain's says so rather than "not staged"; one given no
    # operator key may record an approval, which the approver's key signs)
    refuse_unwritable_chain(
        envs, rollout["dataset"], rollout["version_label"], f"the decision on rollout {name!r}", keyless=True
    )
    events = production_chain(envs, rollout)
    life = read_lifecycle(envs, rollout, events)
    disagree = row_disagreements(life, rollout)
    if life.status != SOAKING or disagree:
        raise InvalidInput(
            "rollout",
            f"rollout {name!r}: the production audit chain says {life.status or 'not staged'}"
            + (f" and the catalog disagrees with it ({'; '.join(disagree[:2])})" if disagree else "")
            + ": only a rollout the chain shows halted for review (soaking) can be approved or rejected",
        )
    if not envs.approval_policy.approvers:
        raise InvalidInput(
            "rollout.approvers",
            f"no approvers are listed for dataset {rollout['dataset']!r}: add their verifier keys to its "
            "rollout.approvers in the datasets config",
        )
    try:
        signed = read_signed_approval(statement, list(envs.approval_policy.approvers))
    except NoteError as exc:
        raise InvalidInput("statement", f"not a signed approval of a listed approver: {exc}") from None
    staged = life.decision_hash
    assert staged is not None  # a rollout soaking on the chain has staged decisions
    if signed.rollout != name:
        raise InvalidInput("statement", f"the statement is about rollout {signed.rollout!r}, not {name!r}")
    if action is not None and signed.decision != DECISIONS.get(action):
        raise InvalidInput("statement", f"the statement says {signed.decision}, not {DECISIONS.get(action)}")
    if reason is not None and reason != signed.reason:
        raise InvalidInput(
            "reason",
            f"the statement's signed reason is {signed.reason!r}, not {reason!r}: it is recorded as "
            "signed (give its own reason, or none)",
        )
    if decision_hash is not None and decision_hash != signed.decision_hash:
        raise InvalidInput(
            "decisionHash",
            f"the statement decides on {signed.decision_hash}, not {decision_hash}: it is recorded as "
            "signed (give its own decision hash, or none)",
        )
    if signed.decision_hash != staged:
        raise InvalidInput(
            "decisionHash",
            f"{signed.decision_hash} is not the decision hash rollout {name!r} staged ({staged}); "
            "approve what was staged and soaked",
        )
    if not signed.reason.strip():
        raise InvalidInput("reason", "say why")
    counted, _ = _counted_decisions(envs, rollout, events, _staged_at(life.staged))
    for event, earlier in counted:
        if statement_of(earlier) == statement_of(signed):
            raise InvalidInput(
                "statement",
                f"this signed statement is already on the chain (seq {event['chain']['seq']}): a statement "
                "counts once; sign a new one",
            )
    if _from_the_future(signed, to_micros(clock.now())):
        what, a = ("approval", "an") if signed.decision == "approved" else ("rejection", "a")
        raise InvalidInput(
            "statement",
            f"the {what} was signed at {signed.time}, in the future (more than {CLOCK_SKEW_SECONDS} s "
            f"ahead of this clock): {a} {what} counts from when it is signed, never before; sign it now",
        )
    if signed.decision == "approved" and _signed_before_staging(signed, _staged_at(life.staged)):
        assert life.staged is not None
        raise InvalidInput(
            "statement",
            f"the approval was signed at {signed.time}, before rollout {name!r} was staged "
            f"({life.staged.get('staged_at')}): it approved no soak of what is staged; sign a new approval",
        )
    rejected = [(e, s) for e, s in counted if s.decision == "rejected"]
    if signed.decision == "approved" and rejected and _signed_at(signed) < _rejected_at(*rejected[-1]):
        raise InvalidInput(
            "statement",
            f"the approval was signed at {signed.time}, before the rejection in force "
            f"({rejected[-1][1].signer.name}, signed at {rejected[-1][1].time}): sign a new approval",
        )
    event = append_event(
        envs,
        rollout,
        ROLLOUT_APPROVED if signed.decision == "approved" else ROLLOUT_REJECTED,
        {
            "decision": signed.decision,
            "decision_hash": staged,
            "plan_hash": rollout["plan_hash"],
            "by": signed.signer.name,
            "approver_key": signed.signer.text,
            "reason": signed.reason,
            "signed_approval": signed.note,
        },
    )
    return envs.store.record_approval(
        name=name,
        decision=signed.decision,
        decision_hash=staged,
        actor=signed.signer.name,
        reason=signed.reason,
        event_hash=event["chain"]["event_hash"],
        now=clock.now(),
    )


def _verified(event: dict[str, Any], policy: ApprovalPolicy) -> SignedApproval | None:
    """The event's signed statement when it verifies under a listed key and says what the event says."""
    try:
        return approval_of_event(event, list(policy.approvers))
    except NoteError:
        return None


def _signed_at(signed: SignedApproval) -> int:
    """The statement's signed time (microseconds); `read_signed_approval` refused any other text."""
    moment = parse_instant(signed.time)
    assert moment is not None
    return moment


def _from_the_future(signed: SignedApproval, recorded: int | None) -> bool:
    """Whether the statement's signed time is later than `recorded` (microseconds: when its event was
    appended, or now) by more than the clock skew allowed: an approval dated ahead would order after
    every rejection made before that date, and so outlive them."""
    return recorded is None or _signed_at(signed) > recorded + CLOCK_SKEW_SECONDS * 1_000_000


def _staged_at(staged: dict[str, Any] | None) -> int | None:
    """When the rollout's staging in force ended (its `rollout_staged` event's `staged_at`, where its
    soak window starts: microseconds), or None."""
    return None if staged is None else parse_instant(staged.get("staged_at"))


def _signed_before_staging(signed: SignedApproval, staged_at: int | None) -> bool:
    """Whether the statement was signed before the staging at `staged_at` by more than the clock skew
    allowed (module doc: a rehearsal's approval brought to production)."""
    return staged_at is not None and _signed_at(signed) < staged_at - CLOCK_SKEW_SECONDS * 1_000_000


def _rejected_at(event: dict[str, Any], signed: SignedApproval) -> int:
    """When a rejection on the chain took effect: its signed time, or when its event was appended if
    that is earlier. A rejection dated ahead (2099) would otherwise hold off every approval signed
    before its date, past any review (pcbo approve refuses one; this bounds one appended by hand)."""
    recorded = parse_instant(event.get("timestamp"))
    at = _signed_at(signed)
    return at if recorded is None else min(at, recorded)


def _counted_decisions(
    envs: RolloutEnvironments, rollout: RolloutRow, events: list[dict[str, Any]], staged_at: int | None
) -> tuple[list[tuple[dict[str, Any], SignedApproval]], int]:
    """The rollout's approval and rejection events on the (verified) production chain `events` that
    count, in chain order, each with its verified statement (module doc: listed signer, says what its
    event says, first time on the chain, an approval signed no earlier than the staging at `staged_at`
    nor than the last rejection counted), and how many were ignored."""
    policy = envs.approval_policy
    counted: list[tuple[dict[str, Any], SignedApproval]] = []
    seen: set[tuple[str, ...]] = set()
    rejected_at: int | None = None
    ignored = 0
    for event in events:
        body = event.get("rollout")
        if event.get("event_type") not in (ROLLOUT_APPROVED, ROLLOUT_REJECTED) or not isinstance(body, dict):
            continue
        if body.get("name") != rollout["name"]:
            continue
        signed = _verified(event, policy)
        if signed is None or statement_of(signed) in seen:
            ignored += 1
            continue
        seen.add(statement_of(signed))
        if signed.decision == "rejected":
            at = _rejected_at(event, signed)
            rejected_at = at if rejected_at is None else max(rejected_at, at)
        elif _from_the_future(signed, parse_instant(event.get("timestamp"))):
            ignored += 1  # signed later than it was recorded: it would outlive rejections to come
            continue
        elif _signed_before_staging(signed, staged_at):
            ignored += 1  # approved no soak of this staging (a rehearsal's approval)
            continue
        elif rejected_at is not None and _signed_at(signed) < rejected_at:
            ignored += 1  # signed before a rejection it would override
            continue
        counted.append((event, signed))
    return counted, ignored


def decision_in_force(
    envs: RolloutEnvironments, rollout: RolloutRow, events: list[dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """The decision in force for `rollout` from the production chain (module doc; `events`: that
    chain, already read and verified), as `{decision, actor, reason, decision_hash, event_hash,
    event_hashes, approvals, required, ignored, since_rejection}`; `decision` is `approved`, `rejected`
    or `pending` (fewer valid approvals than required: only approvals of the decision hash the chain
    says was staged count); `event_hashes` are the hashes of the events the decision stands on, in
    chain order (an approval: each approver's counted approval; a rejection: it alone), `event_hash`
    the last of them; `since_rejection` is the event hash of the last counted rejection (None: there
    is none), which the approvals in force post-date;
    None when no valid signed decision is on the chain. `IntegrityError` when that chain does not
    verify."""
    policy = envs.approval_policy
    if events is None:
        events = production_chain(envs, rollout)
    life = read_lifecycle(envs, rollout, events)
    staged = life.decision_hash
    decisions, ignored = _counted_decisions(envs, rollout, events, _staged_at(life.staged))
    last: tuple[dict[str, Any], SignedApproval] | None = None
    approvals: dict[str, tuple[dict[str, Any], SignedApproval]] = {}
    rejection: str | None = None
    for event, signed in decisions:
        last = (event, signed)
        if signed.decision == "rejected":
            approvals.clear()  # approvals made before a rejection do not outlive it
            rejection = event["chain"]["event_hash"]
        elif signed.decision_hash == staged:
            approvals[signed.signer.text] = (event, signed)
    if last is None:
        return None
    counted = sorted(approvals.values(), key=lambda pair: pair[0]["chain"]["seq"])
    if last[1].decision == "rejected":
        chosen, decision = [last], "rejected"
    elif len(counted) >= policy.required:
        chosen, decision = counted, "approved"
    else:
        chosen, decision = counted or [last], "pending"
    return {
        "decision": decision,
        "actor": ", ".join(s.signer.name for _, s in chosen),
        "reason": "; ".join(s.reason for _, s in chosen),
        "decision_hash": chosen[-1][1].decision_hash,
        "event_hash": chosen[-1][0]["chain"]["event_hash"],
        "event_hashes": [event["chain"]["event_hash"] for event, _ in chosen],
        "approvals": len(counted),
        "required": policy.required,
        "ignored": ignored,
        "since_rejection": rejection,
    }

"""Signed approvals: an approver's decision on a staged rollout, as a C2SP signed note.

Pure: no I/O, no clock (the caller gives the time). The note's text is two lines:

    pcbo.approval/v1
    <RFC 8785 JSON {"decision", "decision_hash", "reason", "rollout", "signer", "time"}>

signed (Ed25519, signed-note type 0x01) by the approver's key, whose name is `signer`. `decision` is
`approved` or `rejected`; `decision_hash` is the staged decision hash the approver judged; `time` an
instant (`YYYY-MM-DDTHH:MM:SS[.ffffff]Z` as pcbo signs it; any instant `core/instants.py` reads is
accepted) that orders it after or before a rejection. A statement names its rollout and decision
hash, so it cannot be replayed for another rollout or another set of decisions; the gate also
requires its event to be on the production audit chain, and counts each statement once.

`approval_of_event` is the one check of a recorded decision (a `rollout_approved` / `rollout_rejected`
event): its statement verifies under a trusted key and says what its event says. The rollout gate
(`rollout/approvals.py`) counts only the events it accepts; `pcbo evidence verify --approver-key`
(`evidence/package.py`) checks with it the approvals a promotion relied on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pcbo_dagster.core.canonical import CanonicalizationError, jcs
from pcbo_dagster.core.instants import parse_instant
from pcbo_dagster.core.signed_note import (
    ED25519,
    Note,
    NoteError,
    SigningKey,
    VerifierKey,
    parse_note,
    sign_note,
    verify_note,
)

HEADER = "pcbo.approval/v1"
DECISIONS = ("approved", "rejected")
#: The audit events that record a signed decision (`rollout/approvals.py` appends them).
ROLLOUT_APPROVED = "rollout_approved"
ROLLOUT_REJECTED = "rollout_rejected"
APPROVAL_EVENTS = (ROLLOUT_APPROVED, ROLLOUT_REJECTED)
_FIELDS = {"decision", "decision_hash", "reason", "rollout", "signer", "time"}


@dataclass(frozen=True)
class SignedApproval:
    rollout: str
    decision: str
    decision_hash: str
    reason: str
    time: str
    signer: VerifierKey
    note: str


def approval_text(
    rollout: str, decision: str, decision_hash: str, reason: str, signer: str, time: str
) -> str:
    if decision not in DECISIONS:
        raise NoteError(f"decision must be one of {DECISIONS}, not {decision!r}")
    if parse_instant(time) is None:
        raise NoteError(f"time must be an instant with an offset, not {time!r}")
    body = {
        "decision": decision,
        "decision_hash": decision_hash,
        "reason": reason,
        "rollout": rollout,
        "signer": signer,
        "time": time,
    }
    return f"{HEADER}\n{jcs(body).decode('utf-8')}\n"


def sign_approval(
    key: SigningKey, rollout: str, decision: str, decision_hash: str, reason: str, time: str
) -> Note:
    return sign_note(approval_text(rollout, decision, decision_hash, reason, key.name, time), key)


def read_signed_approval(note_text: str, approvers: list[VerifierKey]) -> SignedApproval:
    """The statement of a signed approval whose signature verifies under one of `approvers`;
    `NoteError` for anything else (malformed, unsigned, signed by a key not listed)."""
    note = parse_note(note_text)
    header, _, rest = note.text.partition("\n")
    if header != HEADER or rest.count("\n") != 1:
        raise NoteError(f"not a signed approval ({HEADER})")
    try:
        body = json.loads(rest)
    except ValueError:
        raise NoteError("the approval statement is not JSON") from None
    if (
        not isinstance(body, dict)
        or set(body) != _FIELDS
        or not all(isinstance(v, str) for v in body.values())
    ):
        raise NoteError(f"the approval statement holds exactly the text fields {sorted(_FIELDS)}")
    try:
        canonical = jcs(body).decode("utf-8") + "\n"
    except CanonicalizationError:  # (a lone surrogate, escaped: no UTF-8 text holds it)
        raise NoteError("the approval statement has no RFC 8785 form") from None
    if rest != canonical or body["decision"] not in DECISIONS:
        raise NoteError("the approval statement is not in its canonical form")
    if parse_instant(body["time"]) is None:
        raise NoteError(f"the approval's time {body['time']!r} is not an instant with an offset")
    listed = [k for k in approvers if k.name == body["signer"]]
    if not listed:
        raise NoteError(f"{body['signer']!r} is not a listed approver")
    verified = verify_note(note, listed)
    return SignedApproval(
        rollout=body["rollout"],
        decision=body["decision"],
        decision_hash=body["decision_hash"],
        reason=body["reason"],
        time=body["time"],
        signer=verified[0],
        note=note.render(),
    )


def approval_of_event(event: Mapping[str, Any], approvers: list[VerifierKey]) -> SignedApproval:
    """The signed statement an approval or rejection event carries (`signed_approval`), when it
    verifies under one of `approvers` and says what its event says: the rollout the event names, the
    decision its type records, its decision hash, and its signer (`by`). `NoteError` saying why not: a
    statement copied into another rollout's event, or another decision hash's, proves nothing."""
    signed = read_signed_approval(str(event.get("signed_approval") or ""), approvers)
    subject = event.get("rollout")
    said = {
        "rollout": subject.get("name") if isinstance(subject, Mapping) else None,
        "decision": "approved" if event.get("event_type") == ROLLOUT_APPROVED else "rejected",
        "decision hash": event.get("decision_hash"),
        "signer": event.get("by"),
    }
    signs = {
        "rollout": signed.rollout,
        "decision": signed.decision,
        "decision hash": signed.decision_hash,
        "signer": signed.signer.name,
    }
    for what, value in said.items():
        if signs[what] != value:
            raise NoteError(f"the statement names {what} {signs[what]!r}, its event {value!r}")
    return signed


def statement_of(signed: SignedApproval) -> tuple[str, ...]:
    """What a signed statement says and who signed it: the same statement whatever signature lines
    of other keys travel with it (Ed25519 signs a text one way only)."""
    return (
        signed.signer.text,
        signed.rollout,
        signed.decision,
        signed.decision_hash,
        signed.reason,
        signed.time,
    )


def approver_key_problem(key: VerifierKey, earlier: list[VerifierKey]) -> str | None:
    """Why `key` cannot be trusted as an approver's key besides `earlier` ones (None: it can): not an
    Ed25519 (type 0x01) key, or its name or its key given already (one holder would count as two
    approvers)."""
    if key.signature_type != ED25519:
        return f"{key.name}: not an Ed25519 (type 0x01) verifier key"
    if any(other.name == key.name for other in earlier):
        return f"{key.name}: an approver of this name is listed already"
    if any(other.public_key == key.public_key for other in earlier):
        return f"{key.name}: its key is listed already, under another name"
    return None

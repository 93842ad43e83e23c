"""Events the operator's key signs on a chain (pure: no I/O).

Someone who can rewrite the audit backup and the catalog consistently (every hash recomputed) can
append any event to a chain, and the next checkpoint the operator's key signs would vouch for it. So
with the operator's key (`PCBO_SIGNING_KEY`) every event pcbo appends (`AuditLog`) carries
`operator_signature`: a C2SP signed note (`core/signed_note.py`) by that key over `event_statement`
— the chain key, the event's place in it (its `seq` and the previous event's hash), its type and the
digest of the RFC 8785 form of its whole body, the signature aside. A signed event copied to another
place, chain or type no longer verifies.

`unsigned_events` names the events a chain holds that the key should have signed and did not: every
event from the chain's first signed one on (those before it are the chain as it was before the key
was set) that no checkpoint the key signed covers. A run refuses such a chain and `pcbo verify`
reports each (`engine/transparency_log.py`); no checkpoint is signed over one. The events whose
readers count them only when a key signed them — the rollout lifecycle events
(`core/rollout_lifecycle.py`) and table declarations (`tables/iceberg_publication.py`), by the
operator's key, and approvals, by an approver's — are left to those readers: an unsigned one is
ignored there and reported under its own kind. `writer_refusal` says who may append to a signed
chain: a process holding the key that signed it, no other (without a key its events would be
unsigned; with another, the chain's checkpoints would stop verifying).

The same key signs what delivery to the audit endpoint records in the audit backup (the delivery
cursor, `delivery_statement`, and the checkpoint delivery marker, `checkpoint_delivery_statement`), so
that someone who can write the backup cannot make delivery skip what it never sent.

Before 2026-12-07 only lifecycle events were signed, over a statement without the place (header
`pcbo.rollout-event/v1`); `verified_statement` still accepts that form, whose copies the lifecycle
counts once.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pcbo_dagster.core.audit_chain import RESERVED_KEYS
from pcbo_dagster.core.canonical import CanonicalizationError, digest_of
from pcbo_dagster.core.signed_note import (
    NoteError,
    SigningKey,
    VerifierKey,
    parse_note,
    sign_note,
    verify_note,
)

#: The body field of a signed event holding the operator's signed note (`event_statement`).
OPERATOR_SIGNATURE = "operator_signature"
#: The first line of the text an event's operator signature signs.
EVENT_STATEMENT_HEADER = "pcbo.event/v2"
#: The first line of the statement lifecycle events were signed over before 2026-12-07 (no place).
LEGACY_STATEMENT_HEADER = "pcbo.rollout-event/v1"
#: The first lines of the statements a delivery cursor and a checkpoint delivery marker are signed over.
DELIVERY_STATEMENT_HEADER = "pcbo.delivered/v1"
CHECKPOINT_DELIVERY_HEADER = "pcbo.checkpoint-delivered/v1"


def event_statement(
    chain_key: str, seq: int, prev_event_hash: str | None, event_type: str, body: Mapping[str, Any]
) -> str:
    """The note text the operator signs for an event: header, chain key, the event's place (`seq`,
    the previous event's hash), its type and the digest of the RFC 8785 form of its whole `body`
    (every field but the reserved ones and the signature itself)."""
    return (
        f"{EVENT_STATEMENT_HEADER}\nchain {chain_key}\nseq {seq}\nprev {prev_event_hash or 'none'}\n"
        f"type {event_type}\nbody {digest_of(dict(body))}\n"
    )


def delivery_statement(chain_key: str, seq: int, event_hash: str) -> str:
    """The note text the operator signs for a chain's delivery cursor: every event of `chain_key` up to
    `seq`, whose hash is `event_hash`, reached the audit endpoint (`audit/delivery.py`)."""
    return f"{DELIVERY_STATEMENT_HEADER}\nchain {chain_key}\nseq {seq}\nevent {event_hash}\n"


def checkpoint_delivery_statement(chain_key: str, body_digest: str) -> str:
    """The note text the operator signs for a chain's checkpoint delivery marker: the checkpoint document
    whose RFC 8785 digest is `body_digest` reached the audit endpoint (`engine/transparency_log.py`)."""
    return f"{CHECKPOINT_DELIVERY_HEADER}\nchain {chain_key}\nbody {body_digest}\n"


def sign_statement(key: SigningKey, statement: str) -> str:
    """The signed note (rendered) of `statement` by the operator's `key`."""
    return sign_note(statement, key).render()


def signs_statement(note_text: Any, statement: str, verifier: VerifierKey) -> bool:
    """Whether `note_text` is a note signed by `verifier`'s key whose text is exactly `statement`."""
    if not isinstance(note_text, str):
        return False
    try:
        note = parse_note(note_text)
        verify_note(note, [verifier])
    except NoteError:
        return False
    return note.text == statement


def _legacy_statement(chain_key: str, event_type: str, body: Mapping[str, Any]) -> str:
    return f"{LEGACY_STATEMENT_HEADER}\nchain {chain_key}\ntype {event_type}\nbody {digest_of(dict(body))}\n"


def sign_event(
    key: SigningKey,
    chain_key: str,
    seq: int,
    prev_event_hash: str | None,
    event_type: str,
    body: Mapping[str, Any],
) -> str:
    """The signed note (rendered) `operator_signature` carries for the event of `body` at its place."""
    return sign_note(event_statement(chain_key, seq, prev_event_hash, event_type, body), key).render()


def signed_body(event: Mapping[str, Any]) -> dict[str, Any]:
    """What an event's operator signature covers: its body without the signature."""
    return {k: v for k, v in event.items() if k not in RESERVED_KEYS and k != OPERATOR_SIGNATURE}


def verified_statement(event: Mapping[str, Any], verifier: VerifierKey) -> str | None:
    """The statement the event's operator signature signs when it verifies under `verifier` and is
    the one of this event (its chain key, place, type and body; or, signed before 2026-12-07, the
    statement without the place); None otherwise."""
    chain = event.get("chain")
    note_text = event.get(OPERATOR_SIGNATURE)
    if not isinstance(chain, Mapping) or not isinstance(note_text, str):
        return None
    try:
        note = parse_note(note_text)
        verify_note(note, [verifier])
        key, event_type, body = str(chain.get("chain_key")), str(event.get("event_type")), signed_body(event)
        if note.text.startswith(LEGACY_STATEMENT_HEADER + "\n"):
            expected = _legacy_statement(key, event_type, body)
        else:
            seq, prev = chain.get("seq"), chain.get("prev_event_hash")
            if type(seq) is not int or not (prev is None or isinstance(prev, str)):
                return None
            expected = event_statement(key, seq, prev, event_type, body)
    except (NoteError, CanonicalizationError, TypeError, ValueError):
        return None
    return expected if note.text == expected else None


def unsigned_events(
    events: Sequence[Mapping[str, Any]],
    verifier: VerifierKey,
    key_in_use: bool,
    self_checked: Collection[str] = (),
) -> list[Mapping[str, Any]]:
    """Of `events` (a chain's, in order, from some seq on) those the operator's key should have signed
    and did not, other than events of the `self_checked` types (their readers check them): every
    one when the key was `key_in_use` before the first of them (a checkpoint it signed covers the
    events before: they were checked when it was signed), else each from the first signed one on
    (those before it: the chain as it was before the key was set)."""
    start = 0
    if not key_in_use:
        start = next((i for i, e in enumerate(events) if verified_statement(e, verifier)), len(events))
    return [
        event
        for event in events[start:]
        if event.get("event_type") not in self_checked and verified_statement(event, verifier) is None
    ]


def writer_refusal(events: Sequence[Mapping[str, Any]], verifier: VerifierKey | None) -> str | None:
    """Why a process holding the operator key of `verifier` (None: no key) must append nothing to the
    chain of `events`, or None when it may. A chain the key signs (an event of it carries
    `operator_signature`, verified or not: a process without the key cannot tell) takes events of that
    key alone: without a key they would be unsigned, and from then on every run with the key would
    refuse the chain (`event_signature_invalid`, no repair); with another key (one rotated) the
    checkpoints and table declaration the chain's key signed would stop verifying."""
    first = next((event for event in events if OPERATOR_SIGNATURE in event), None)
    if first is None:
        return None
    if verifier is None:
        return (
            f"it is signed by the operator's key (its events from seq {_seq(first)} on carry "
            "operator_signature) and this process has no PCBO_SIGNING_KEY: the events it appended would "
            "be unsigned and every run with the key would refuse the chain; give this process the key"
        )
    # (the newest event the key signed is the last one that carries a signature, unless a forgery
    # follows it, which readers ignore (a table declaration) or `verify` reports)
    signed = [event for event in reversed(events) if OPERATOR_SIGNATURE in event]
    if any(verified_statement(event, verifier) is not None for event in signed):
        return None
    last = signed[0]
    return (
        f"it is signed by {_signer(last)} (seq {_seq(last)}), not by this process's PCBO_SIGNING_KEY "
        f"({verifier.name}+{verifier.key_id.hex()}): a chain keeps the key that signed it (its "
        "checkpoints and table declaration verify only under it); run with that key, or write under a "
        "new versionLabel with the new one"
    )


def _seq(event: Mapping[str, Any]) -> Any:
    chain = event.get("chain")
    return chain.get("seq") if isinstance(chain, Mapping) else None


def _signer(event: Mapping[str, Any]) -> str:
    """`<key name>+<key id hex>` of the first signature line of the event's operator signature, as its
    note states it (not verified)."""
    try:
        signature = parse_note(str(event.get(OPERATOR_SIGNATURE))).signatures[0]
    except (NoteError, IndexError):
        return "an unreadable signature"
    return f"{signature.name}+{signature.key_id.hex()}"

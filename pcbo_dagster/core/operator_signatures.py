"""Events the operator's key signs on a chain (pure: no I/O).

Someone who can rewrite the audit backup and the catalog consistently (every hash recomputed) can
append any event to a chain; what such an event would open — a rollout gate, a table to publish
to — must not follow from it. So the events pcbo acts on (the rollout lifecycle events,
`core/rollout_lifecycle.py`, and the table declarations, `tables/iceberg_publication.py`) carry, when
the operator's key (`PCBO_SIGNING_KEY`) is configured, `operator_signature`: a C2SP signed note
(`core/signed_note.py`) by that key over `event_statement` — a header, the chain key, the event type
and the digest of the RFC 8785 form of the event's whole body, the signature aside. A reader holding
the key's vkey counts only the events whose signature verifies (`verified_statement`); without a
key nothing is signed or checked.

The header, `pcbo.rollout-event/v1`, is named for the first events signed (the rollout lifecycle);
it stays so that every event signed before still verifies. The event type in the statement keeps a
signature of one kind of event from standing for another, the chain key one chain's for another's.
"""

from __future__ import annotations

from collections.abc import Mapping
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
EVENT_STATEMENT_HEADER = "pcbo.rollout-event/v1"


def event_statement(chain_key: str, event_type: str, body: Mapping[str, Any]) -> str:
    """The note text the operator signs for an event: header, chain key, event type and the digest of
    the RFC 8785 form of its whole `body` (every field but the reserved ones and the signature
    itself)."""
    return f"{EVENT_STATEMENT_HEADER}\nchain {chain_key}\ntype {event_type}\nbody {digest_of(dict(body))}\n"


def sign_event(key: SigningKey, chain_key: str, event_type: str, body: Mapping[str, Any]) -> str:
    """The signed note (rendered) `operator_signature` carries for an event of `body`."""
    return sign_note(event_statement(chain_key, event_type, body), key).render()


def signed_body(event: Mapping[str, Any]) -> dict[str, Any]:
    """What an event's operator signature covers: its body without the signature."""
    return {k: v for k, v in event.items() if k not in RESERVED_KEYS and k != OPERATOR_SIGNATURE}


def verified_statement(event: Mapping[str, Any], verifier: VerifierKey) -> str | None:
    """The statement the event's operator signature signs when it verifies under `verifier` and is
    the one of this event (its chain key, type and body); None otherwise."""
    chain = event.get("chain")
    note_text = event.get(OPERATOR_SIGNATURE)
    if not isinstance(chain, Mapping) or not isinstance(note_text, str):
        return None
    try:
        expected = event_statement(
            str(chain.get("chain_key")), str(event.get("event_type")), signed_body(event)
        )
        note = parse_note(note_text)
        verify_note(note, [verifier])
    except (NoteError, CanonicalizationError, TypeError, ValueError):
        return None
    return expected if note.text == expected else None

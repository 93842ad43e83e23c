"""PAS audit events: construction, hashing and offline verification of a hash chain (CONTRACT section 6).

Pure: no I/O, no clock, no randomness. An event is a JSON object

    {"version": "pcbo.pas/1", "event_type", "event_id", "timestamp", <body fields...>,
     "chain": {"chain_key", "seq", "prev_event_hash", "event_hash"}}

`chain.event_hash` is `sha256:` + hex SHA-256 of the RFC 8785 (JCS) bytes of the event with
`chain.event_hash` removed; `chain.prev_event_hash` is the previous event's `event_hash` (null for
seq 0). `event_id` is derived from the chain position, so rebuilding an event gives the same id.
Events never hold floats (JCS would print `1.0` as `1`, silently changing a value's type).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, TypeAlias, TypedDict

from pcbo_dagster.core.canonical import CanonicalizationError, fast_jcs, jcs
from pcbo_dagster.core.json_documents import is_plain_json

PAS_VERSION = "pcbo.pas/1"


class ChainLink(TypedDict):
    """An event's place in its chain (`event["chain"]`)."""

    chain_key: str
    seq: int
    prev_event_hash: str | None
    event_hash: str


#: A PAS event: `version`, `event_type`, `event_id`, `timestamp`, its body's fields (snake_case;
#: `engine/events.py` builds them) and `chain` (a `ChainLink`). The body's fields differ by event
#: type, so an event is a JSON object rather than one fixed record.
AuditEvent: TypeAlias = dict[str, Any]

#: Top-level keys an event body may not use.
RESERVED_KEYS = frozenset({"version", "event_type", "event_id", "timestamp", "chain"})
#: Keys of the `chain` object.
CHAIN_FIELDS = ("chain_key", "seq", "prev_event_hash", "event_hash")

CHAIN_KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?Z", re.ASCII)
_MAX_SAFE_INT = 2**53 - 1


def split_chain_key(chain_key: object) -> tuple[str, str]:
    """`"<dataset>/<versionLabel>"` -> `(dataset, versionLabel)`; ValueError unless both parts are
    `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`."""
    if not isinstance(chain_key, str):
        raise ValueError(f"chain_key must be a string, got {type(chain_key).__name__}")
    parts = chain_key.split("/")
    if len(parts) != 2 or not all(CHAIN_KEY_PART.fullmatch(p) for p in parts):
        raise ValueError(
            f"invalid chain_key {chain_key!r}: expected <dataset>/<versionLabel>, "
            "each matching [A-Za-z0-9][A-Za-z0-9._-]{0,127}"
        )
    return parts[0], parts[1]


def is_event_hash(value: object) -> bool:
    """True for a `sha256:<64 lowercase hex>` string."""
    return isinstance(value, str) and _HASH.fullmatch(value) is not None


def is_timestamp(value: object) -> bool:
    """True for `YYYY-MM-DDTHH:MM:SS[.ffffff]Z` with the fraction only when it is not zero."""
    return (
        isinstance(value, str) and _TIMESTAMP.fullmatch(value) is not None and not value.endswith(".000000Z")
    )


def json_problems(value: Any, path: str = "$") -> list[str]:
    """Everything in `value` that may not appear in an event: floats, non-string keys, integers
    beyond +-(2**53 - 1), and anything that is not a JSON value. Empty list = acceptable."""
    # The common case, without building a path for every value:
    if is_plain_json(value, -_MAX_SAFE_INT, _MAX_SAFE_INT):
        return []
    problems: list[str] = []
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if item is None or isinstance(item, (bool, str)):
            continue
        if isinstance(item, int):
            if abs(item) > _MAX_SAFE_INT:
                problems.append(f"{where}: integer beyond +-(2**53 - 1)")
        elif isinstance(item, float):
            problems.append(f"{where}: float {item!r} (floats are not allowed in audit events)")
        elif isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    problems.append(f"{where}: non-string key {key!r}")
                    continue
                stack.append((f"{where}.{key}", sub))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", sub) for i, sub in enumerate(item))
        else:
            problems.append(f"{where}: {type(item).__name__} is not a JSON value")
    problems.sort()
    return problems


def event_hash(event: dict) -> str:
    """`sha256:` + hex SHA-256 of JCS(event without `chain.event_hash`). Does not mutate `event`."""
    stripped = _without_event_hash(event)
    # Without floats or large integers orjson's sorted output is the RFC 8785 form (fast_jcs checks
    # the rest); anything else, e.g. a tampered event holding a float, goes through rfc8785.
    canonical = jcs(stripped) if json_problems(stripped) else fast_jcs(stripped)
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def checked_event_hash(event: dict) -> str:
    """`event_hash` of an event whose caller found no `json_problems` in it (nor, then, in it without
    its `chain.event_hash`): the same hash, without walking the event a second time (issue 18)."""
    return "sha256:" + hashlib.sha256(fast_jcs(_without_event_hash(event))).hexdigest()


def _without_event_hash(event: dict) -> dict:
    if not isinstance(event, dict) or not isinstance(event.get("chain"), dict):
        raise ValueError("an event must be an object with a `chain` object")
    stripped = dict(event)
    chain = dict(event["chain"])
    chain.pop("event_hash", None)
    stripped["chain"] = chain
    return stripped


def event_id_for(chain_key: str, seq: int, event_type: str, prev_event_hash: str | None) -> str:
    """`evt_` + the first 32 hex digits of SHA-256(JCS({chain_key, seq, event_type, prev_event_hash}))."""
    ident = {"chain_key": chain_key, "seq": seq, "event_type": event_type, "prev_event_hash": prev_event_hash}
    canonical = jcs(ident) if json_problems(ident) else fast_jcs(ident)
    return "evt_" + hashlib.sha256(canonical).hexdigest()[:32]


def build_event(
    *,
    chain_key: str,
    seq: int,
    prev_event_hash: str | None,
    event_type: str,
    timestamp: str,
    body: dict,
) -> AuditEvent:
    """Build the event at position `seq` of a chain, with its `event_id` and `chain.event_hash`.

    ValueError for: a bad chain_key, a negative or non-integer seq, a prev_event_hash that is not
    null exactly at seq 0 (or not `sha256:<hex>`), an event_type outside `[a-z][a-z0-9_.]*`, a
    timestamp not in `YYYY-MM-DDTHH:MM:SS[.ffffff]Z` form, a body that is not an object, body keys
    colliding with the reserved ones, floats or other non-JSON values anywhere in the body.
    """
    split_chain_key(chain_key)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or seq > _MAX_SAFE_INT:
        raise ValueError(f"seq must be an integer >= 0, got {seq!r}")
    if seq == 0:
        if prev_event_hash is not None:
            raise ValueError("prev_event_hash must be None for seq 0")
    elif not is_event_hash(prev_event_hash):
        raise ValueError(f"prev_event_hash must be sha256:<64 hex> for seq {seq}, got {prev_event_hash!r}")
    if not isinstance(event_type, str) or not _EVENT_TYPE.fullmatch(event_type):
        raise ValueError(f"event_type must match [a-z][a-z0-9_.]{{0,63}}, got {event_type!r}")
    if not is_timestamp(timestamp):
        raise ValueError(f"timestamp must be YYYY-MM-DDTHH:MM:SS[.ffffff]Z, got {timestamp!r}")
    if not isinstance(body, dict):
        raise ValueError(f"body must be a dict, got {type(body).__name__}")
    clash = sorted(k for k in body if k in RESERVED_KEYS)
    if clash:
        raise ValueError(f"body uses reserved event keys: {', '.join(clash)}")
    problems = json_problems(body, "body")
    if problems:
        raise ValueError("body is not a float-free JSON object: " + "; ".join(problems))
    event: dict[str, Any] = {
        "version": PAS_VERSION,
        "event_type": event_type,
        "event_id": event_id_for(chain_key, seq, event_type, prev_event_hash),
        "timestamp": timestamp,
        **body,
        "chain": {"chain_key": chain_key, "seq": seq, "prev_event_hash": prev_event_hash},
    }
    try:
        # The body has no json_problems (checked above) and every other field was checked to be a
        # string, an integer within +-(2**53 - 1) or null: the event has none either.
        event["chain"]["event_hash"] = checked_event_hash(event)
    except (CanonicalizationError, UnicodeError) as exc:  # e.g. lone surrogates
        raise ValueError(f"body cannot be canonicalized (RFC 8785): {exc}") from exc
    return event


def _event_findings(where: str, event: dict, chain_key: str | None) -> tuple[list[str], str | None]:
    """Findings about one event on its own, and its recomputed hash (None when not computable)."""
    findings: list[str] = []
    for name in ("version", "event_type", "event_id", "timestamp"):
        if name not in event:
            findings.append(f"{where}: missing field `{name}`")
    if "version" in event and event["version"] != PAS_VERSION:
        findings.append(f"{where}: version {event['version']!r} is not {PAS_VERSION!r}")
    if "timestamp" in event and not is_timestamp(event["timestamp"]):
        findings.append(f"{where}: timestamp {event['timestamp']!r} is not YYYY-MM-DDTHH:MM:SS[.ffffff]Z")
    findings.extend(f"{where}: {p}" for p in json_problems(event, "event"))
    chain = event.get("chain")
    if not isinstance(chain, dict):
        what = "missing field `chain`" if chain is None else "`chain` is not an object"
        findings.append(f"{where}: {what}")
        return findings, None
    for name in CHAIN_FIELDS:
        if name not in chain:
            findings.append(f"{where}: missing field `chain.{name}`")
    if "chain_key" in chain and chain_key is not None and chain["chain_key"] != chain_key:
        findings.append(f"{where}: chain_key {chain['chain_key']!r} does not match {chain_key!r}")
    stored = chain.get("event_hash")
    if "event_hash" in chain and not is_event_hash(stored):
        findings.append(f"{where}: event_hash {stored!r} is not sha256:<64 hex>")
    try:
        recomputed = event_hash(event)
    except (CanonicalizationError, UnicodeError, ValueError, TypeError) as exc:
        findings.append(f"{where}: cannot canonicalize the event: {exc}")
        return findings, None
    if "event_hash" in chain and stored != recomputed:
        findings.append(f"{where}: hash mismatch: stored {stored!r}, recomputed {recomputed!r}")
    seq, ctype, prev, ckey = (
        chain.get("seq"),
        event.get("event_type"),
        chain.get("prev_event_hash"),
        chain.get("chain_key"),
    )
    if "event_id" in event and isinstance(seq, int) and isinstance(ckey, str) and isinstance(ctype, str):
        expected_id = event_id_for(ckey, seq, ctype, prev if isinstance(prev, str) else None)
        if event["event_id"] != expected_id:
            findings.append(
                f"{where}: event_id {event['event_id']!r} does not match its chain position "
                f"(expected {expected_id!r})"
            )
    return findings, recomputed


def verify_chain(
    events: Sequence[dict],
    chain_key: str | None = None,
    *,
    expected_head: tuple[int, str] | None = None,
) -> list[str]:
    """Verify a chain offline; returns human-readable findings (empty list = clean).

    Checks, per event in the given order: required fields, version, timestamp form, no floats,
    the recomputed hash equals the stored one, the event_id matches the position, chain_key equals
    `chain_key` (or the first event's), seq equals its position (0..n-1), prev_event_hash equals the
    previous event's event_hash (null for seq 0). `expected_head` (seq, event_hash), e.g. from a
    catalog, detects a truncated tail, which the events alone cannot show.
    """
    findings: list[str] = []
    key = chain_key
    prev_hash: str | None = None
    for position, event in enumerate(events):
        chain = event.get("chain") if isinstance(event, dict) else None
        seq = chain.get("seq") if isinstance(chain, dict) else None
        where = f"position {position} (seq {seq!r})"
        if not isinstance(event, dict):
            findings.append(f"{where}: not a JSON object")
            prev_hash = None
            continue
        if key is None and isinstance(chain, dict) and isinstance(chain.get("chain_key"), str):
            key = chain["chain_key"]
        own, _ = _event_findings(where, event, key)
        findings.extend(own)
        if isinstance(chain, dict):
            if "seq" in chain and (not isinstance(seq, int) or isinstance(seq, bool) or seq != position):
                findings.append(f"{where}: seq out of order: expected seq {position}")
            if "prev_event_hash" in chain:
                prev = chain["prev_event_hash"]
                if position == 0 and prev is not None:
                    findings.append(f"{where}: prev_event_hash must be null at seq 0, got {prev!r}")
                elif position > 0 and prev != prev_hash:
                    findings.append(
                        f"{where}: broken link: prev_event_hash {prev!r} is not the previous event's "
                        f"event_hash {prev_hash!r}"
                    )
            prev_hash = chain.get("event_hash")
        else:
            prev_hash = None
    if expected_head is not None:
        head_seq, head_hash = expected_head
        if len(events) != head_seq + 1:
            findings.append(f"chain has {len(events)} events but the expected head is seq {head_seq}")
        elif prev_hash != head_hash:
            findings.append(f"last event's event_hash {prev_hash!r} is not the expected head {head_hash!r}")
    return findings

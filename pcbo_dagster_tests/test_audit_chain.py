"""PAS event construction, hashing and offline verification (pure core)."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from pcbo_dagster.core.audit_chain import (
    PAS_VERSION,
    build_event,
    checked_event_hash,
    event_hash,
    split_chain_key,
    verify_chain,
)

KEY = "events/v1"
TS = "2024-01-01T00:00:00Z"


def independent_hash(event: dict) -> str:
    """The contract's definition, written from scratch: JCS of the event minus chain.event_hash."""
    clone = copy.deepcopy(event)
    del clone["chain"]["event_hash"]
    return "sha256:" + hashlib.sha256(rfc8785.dumps(clone)).hexdigest()


def make_chain(n: int, key: str = KEY) -> list[dict]:
    events: list[dict] = []
    prev = None
    for seq in range(n):
        event = build_event(
            chain_key=key,
            seq=seq,
            prev_event_hash=prev,
            event_type="partition_committed",
            timestamp=f"2024-01-01T00:00:{seq:02d}Z",
            body={
                "partition": {"key": f"20240101T{seq:02d}0000Z", "record_count": seq * 10},
                "tables": {"events": {"checksum": "sha256:" + "ab" * 32, "row_count": seq}},
            },
        )
        events.append(event)
        prev = event["chain"]["event_hash"]
    return events


def test_event_shape_and_hash_matches_independent_computation():
    events = make_chain(3)
    first = events[0]
    assert first["version"] == PAS_VERSION == "pcbo.pas/1"
    assert first["event_type"] == "partition_committed"
    assert first["timestamp"] == TS
    assert first["partition"]["record_count"] == 0
    assert first["chain"]["chain_key"] == KEY
    assert first["chain"]["seq"] == 0
    assert first["chain"]["prev_event_hash"] is None
    for event in events:
        assert event["chain"]["event_hash"] == independent_hash(event)
        assert event_hash(event) == independent_hash(event)
        assert len(event["chain"]["event_hash"]) == len("sha256:") + 64
    assert events[1]["chain"]["prev_event_hash"] == events[0]["chain"]["event_hash"]
    assert events[2]["chain"]["prev_event_hash"] == events[1]["chain"]["event_hash"]
    assert verify_chain(events) == []
    assert verify_chain(events, KEY) == []


def test_event_hash_is_independent_of_key_order_and_does_not_mutate():
    event = make_chain(1)[0]
    snapshot = copy.deepcopy(event)
    reordered = {k: event[k] for k in reversed(list(event))}
    reordered["chain"] = {k: event["chain"][k] for k in reversed(list(event["chain"]))}
    assert event_hash(reordered) == event_hash(event)
    assert event == snapshot
    assert "event_hash" in event["chain"]
    # The stored hash is excluded, so it never influences the recomputation.
    tampered = copy.deepcopy(event)
    tampered["chain"]["event_hash"] = "sha256:" + "0" * 64
    assert event_hash(tampered) == event_hash(event)


def test_event_id_is_deterministic_and_position_derived():
    a = make_chain(2)
    b = make_chain(2)
    assert [e["event_id"] for e in a] == [e["event_id"] for e in b]
    ident = {
        "chain_key": KEY,
        "seq": 1,
        "event_type": "partition_committed",
        "prev_event_hash": a[0]["chain"]["event_hash"],
    }
    expected = "evt_" + hashlib.sha256(rfc8785.dumps(ident)).hexdigest()[:32]
    assert a[1]["event_id"] == expected
    assert a[0]["event_id"] != a[1]["event_id"]


def test_build_event_copies_body_without_mutating_it():
    body = {"run_id": "r1", "items": [1, 2, {"x": None}]}
    snapshot = copy.deepcopy(body)
    event = build_event(
        chain_key=KEY,
        seq=0,
        prev_event_hash=None,
        event_type="run_started",
        timestamp="2024-01-01T00:00:00.123456Z",
        body=body,
    )
    assert body == snapshot
    assert event["run_id"] == "r1" and event["items"] == [1, 2, {"x": None}]
    assert event["timestamp"] == "2024-01-01T00:00:00.123456Z"


@pytest.mark.parametrize(
    "body",
    [
        {"amount": 1.5},
        {"amount": 1.0},  # JCS would print it as 1: refused, not silently turned into an integer
        {"nested": {"deep": [1, {"x": 0.1}]}},
        {"list": [[[2.0]]]},
        {"nan": float("nan")},
    ],
)
def test_build_event_refuses_floats_anywhere(body):
    with pytest.raises(ValueError, match="float"):
        build_event(chain_key=KEY, seq=0, prev_event_hash=None, event_type="x", timestamp=TS, body=body)


@pytest.mark.parametrize("reserved", ["version", "event_type", "event_id", "timestamp", "chain"])
def test_build_event_refuses_reserved_keys(reserved):
    with pytest.raises(ValueError, match="reserved"):
        build_event(
            chain_key=KEY, seq=0, prev_event_hash=None, event_type="x", timestamp=TS, body={reserved: "oops"}
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chain_key": "events"}, "chain_key"),
        ({"chain_key": "a/b/c"}, "chain_key"),
        ({"chain_key": "../v1"}, "chain_key"),
        ({"chain_key": "events/.hidden"}, "chain_key"),
        ({"seq": -1}, "seq"),
        ({"seq": True}, "seq"),
        ({"seq": 1}, "prev_event_hash"),  # seq > 0 needs a previous hash
        ({"prev_event_hash": "sha256:" + "a" * 64}, "seq 0"),
        ({"timestamp": "2024-01-01T00:00:00"}, "timestamp"),
        ({"timestamp": "2024-01-01T00:00:00+00:00"}, "timestamp"),
        ({"timestamp": "2024-01-01T00:00:00.000000Z"}, "timestamp"),
        ({"event_type": "Bad Type"}, "event_type"),
        ({"body": {"big": 2**60}}, "2\\*\\*53"),
        ({"body": {"t": (1, 2)}}, "tuple"),
        ({"body": {1: "x"}}, "non-string key"),
    ],
)
def test_build_event_refuses_invalid_arguments(kwargs, message):
    args = {
        "chain_key": KEY,
        "seq": 0,
        "prev_event_hash": None,
        "event_type": "x",
        "timestamp": TS,
        "body": {},
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_event(**args)


def test_split_chain_key():
    assert split_chain_key("events/v1") == ("events", "v1")
    assert split_chain_key("ev.ents-2_x/v1.2") == ("ev.ents-2_x", "v1.2")
    for bad in ["", "/", "a/", "/b", "a/..", "a b/v1", "a/v1/", "a\\b/v1", "é/v1", "a" * 129 + "/v1", None]:
        with pytest.raises(ValueError):
            split_chain_key(bad)


# -- tampering ------------------------------------------------------------------------------------


def joined(findings: list[str]) -> str:
    return "\n".join(findings)


def test_edited_field_is_found():
    events = make_chain(4)
    events[2]["partition"]["record_count"] = 9999
    findings = verify_chain(events)
    assert findings, "an edited field must be detected"
    assert "hash mismatch" in joined(findings)
    assert all("seq 2" in f for f in findings)


def test_edited_and_rehashed_event_breaks_the_next_link():
    events = make_chain(4)
    events[1]["tables"]["events"]["row_count"] = 77
    events[1]["chain"]["event_hash"] = independent_hash(events[1])
    findings = verify_chain(events)
    assert len(findings) == 1
    assert "broken link" in findings[0] and "seq 2" in findings[0]


def test_deleted_event_is_found():
    events = make_chain(5)
    del events[2]
    findings = verify_chain(events)
    text = joined(findings)
    assert "seq out of order" in text and "position 2 (seq 3)" in text
    assert "broken link" in text


def test_deleted_first_event_is_found():
    events = make_chain(3)[1:]
    text = joined(verify_chain(events))
    assert "seq out of order" in text
    assert "prev_event_hash must be null" in text


def test_swapped_events_are_found():
    events = make_chain(5)
    events[1], events[3] = events[3], events[1]
    findings = verify_chain(events)
    text = joined(findings)
    assert "position 1 (seq 3)" in text and "position 3 (seq 1)" in text
    assert "broken link" in text


def test_changed_prev_is_found():
    events = make_chain(3)
    events[2]["chain"]["prev_event_hash"] = events[0]["chain"]["event_hash"]
    text = joined(verify_chain(events))
    assert "hash mismatch" in text
    assert "broken link" in text


def test_changed_prev_with_rehash_and_new_event_id_is_still_found():
    events = make_chain(3)
    forged = build_event(
        chain_key=KEY,
        seq=2,
        prev_event_hash=events[0]["chain"]["event_hash"],
        event_type="partition_committed",
        timestamp=TS,
        body={},
    )
    events[2] = forged
    findings = verify_chain(events)
    assert findings == [
        f"position 2 (seq 2): broken link: prev_event_hash {events[0]['chain']['event_hash']!r} is not "
        f"the previous event's event_hash {events[1]['chain']['event_hash']!r}"
    ]


def test_truncated_tail_is_found_only_with_an_expected_head():
    events = make_chain(4)
    head = (3, events[3]["chain"]["event_hash"])
    assert verify_chain(events, expected_head=head) == []
    assert verify_chain(events[:3]) == []  # the events alone cannot show a cut tail
    assert "expected head is seq 3" in joined(verify_chain(events[:3], expected_head=head))


def test_chain_key_mismatch_is_found():
    events = make_chain(2)
    assert "does not match 'other/v1'" in joined(verify_chain(events, "other/v1"))
    mixed = make_chain(2) + make_chain(3, "events/v2")[2:]
    assert "does not match 'events/v1'" in joined(verify_chain(mixed))


def test_missing_fields_are_found():
    events = make_chain(2)
    del events[0]["timestamp"]
    del events[1]["chain"]["seq"]
    text = joined(verify_chain(events))
    assert "position 0 (seq 0): missing field `timestamp`" in text
    assert "position 1 (seq None): missing field `chain.seq`" in text
    no_chain = make_chain(1)
    del no_chain[0]["chain"]
    assert "missing field `chain`" in joined(verify_chain(no_chain))
    assert "not a JSON object" in joined(verify_chain(["nope"]))


def test_floats_present_are_found_even_when_hash_matches():
    events = make_chain(2)
    events[1]["partition"]["record_count"] = 10.0  # JCS prints 10: the hash still matches
    assert event_hash(events[1]) == events[1]["chain"]["event_hash"]
    findings = verify_chain(events)
    assert len(findings) == 1 and "float" in findings[0] and "seq 1" in findings[0]


def test_wrong_version_and_event_id_are_found():
    events = make_chain(2)
    events[0]["version"] = "pcbo.pas/0"
    events[1]["event_id"] = "evt_" + "0" * 32
    text = joined(verify_chain(events))
    assert "is not 'pcbo.pas/1'" in text
    assert "event_id" in text


def test_empty_chain_is_clean():
    assert verify_chain([]) == []


# -- properties -----------------------------------------------------------------------------------

safe_text = st.characters(exclude_categories=["Cs"])  # lone surrogates have no UTF-8 form
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1),
    st.text(alphabet=safe_text, max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(alphabet=safe_text, max_size=5), inner, max_size=3),
    ),
    max_leaves=10,
)
bodies = st.dictionaries(
    st.text(alphabet=safe_text, min_size=1, max_size=6).filter(
        lambda k: k not in {"version", "event_type", "event_id", "timestamp", "chain"}
    ),
    json_values,
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(bodies, min_size=1, max_size=6), st.data())
def test_property_built_chains_verify_and_any_body_edit_is_found(
    body_list: list[dict[str, Any]], data: st.DataObject
) -> None:
    events: list[dict] = []
    prev = None
    for seq, body in enumerate(body_list):
        event = build_event(
            chain_key=KEY, seq=seq, prev_event_hash=prev, event_type="e", timestamp=TS, body=body
        )
        assert event["chain"]["event_hash"] == independent_hash(event)
        events.append(event)
        prev = event["chain"]["event_hash"]
    assert verify_chain(events, KEY) == []
    victim = data.draw(st.integers(min_value=0, max_value=len(events) - 1))
    events[victim]["tampered"] = data.draw(json_scalars)
    assert any("hash mismatch" in f and f"seq {victim}" in f for f in verify_chain(events, KEY))


@settings(max_examples=200, deadline=None)
@given(bodies, st.integers(min_value=0, max_value=2**53 - 1), st.booleans())
def test_checked_event_hash_is_event_hash_of_a_checked_event(
    body: dict[str, Any], seq: int, keep: bool
) -> None:
    """`checked_event_hash` (issue 18: no second walk) gives `event_hash`'s and the contract's hash for
    any event without json_problems, with or without its stored `chain.event_hash`."""
    prev = None if seq == 0 else "sha256:" + "ab" * 32
    event = build_event(chain_key=KEY, seq=seq, prev_event_hash=prev, event_type="e", timestamp=TS, body=body)
    if not keep:
        del event["chain"]["event_hash"]
        event["chain"]["event_hash"] = "sha256:" + "00" * 32
    assert checked_event_hash(event) == event_hash(event) == independent_hash(event)


def test_an_event_timestamp_holds_ascii_digits_only() -> None:
    """(red-team finding) The timestamp check used `\\d`, which takes any script's digits: an event
    dated `٢٠٢٤-…` passed as a chain timestamp that no reader can parse as an instant."""
    from pcbo_dagster.core.audit_chain import is_timestamp

    assert is_timestamp("2024-01-01T00:00:00Z")
    assert not is_timestamp("٢٠٢٤-01-01T00:00:00Z")
    assert not is_timestamp("2024-01-01T00:00:0０Z")

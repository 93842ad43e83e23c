"""The shortcuts taken while reading and hashing a request (issue 18: speed) decide exactly as the
plain way does.

`nested_deeper_than` counts the brackets alone when no string holds one; that must give the depth
the quote-parity count gives, for any text (valid JSON or not), since its answer decides whether a
request is refused and with which message. `record_digest_bytes` serialises records with orjson
and must give the SHA-256 of each record's `rfc8785` form. `sorted_digest_rows` sorts digests as
32-byte strings and must give their byte order (the order of their hex texts, which the plan hash
lists).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
import rfc8785
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pcbo_dagster.core.canonical import (
    MAX_SAFE_INTEGER,
    CanonicalizationError,
    DigestedRecords,
    mismatched_digests,
    record_digest_bytes,
    sorted_digest_rows,
)
from pcbo_dagster.core.request_model import MAX_JSON_DEPTH, nested_deeper_than


def _reference_depth(raw: bytes) -> int:
    """The deepest nesting of brackets outside strings, a byte at a time: escaped backslashes and
    escaped quotes taken out (pairs from the left), then each remaining quote opens or closes a
    string."""
    raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth = deepest = 0
    inside = False
    for byte in raw:
        if byte == ord('"'):
            inside = not inside
        elif not inside and byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif not inside and byte in b"]}":
            depth -= 1
    return deepest


_ALPHABET = b'[]{}"\\a:, '
_TEXT = st.binary(max_size=300).map(lambda b: bytes(_ALPHABET[x % len(_ALPHABET)] for x in b))


@settings(max_examples=3000, deadline=None)
@given(text=_TEXT, limit=st.integers(0, 6), pad=st.booleans())
@example(text=b'["a", "b"]', limit=0, pad=False)  # no string holds a bracket: the brackets alone
@example(text=b'["[", [[1]]]', limit=2, pad=False)  # one does: the parity count
@example(text=b'"[]"', limit=0, pad=True)
@example(text=b'"a"["', limit=0, pad=False)  # an odd run of quotes
@example(text=b'\\"[', limit=0, pad=False)  # an escaped quote outside a string
def test_nesting_depth_matches_a_byte_by_byte_count(text, limit, pad):
    expected = _reference_depth(text) > limit  # (trailing spaces nest nothing: counted unpadded)
    if pad:  # past the size under which the brackets are counted first
        text += b" " * (1 << 16)
    assert nested_deeper_than(text, limit) is expected


def test_a_long_request_of_flat_records_is_measured_outside_its_strings():
    records = b", ".join(b'{"id": "r-%d", "note": "[[[[", "ok": true}' % i for i in range(5000))
    shallow = b'{"sourceRecords": [' + records + b"]}"
    assert len(shallow) > 1 << 16
    assert not nested_deeper_than(shallow, 3) and nested_deeper_than(shallow, 2)  # object, list, record
    plain = shallow.replace(b"[[[[", b"....")  # no string holds a bracket: the brackets alone
    assert not nested_deeper_than(plain, 3) and nested_deeper_than(plain, 2)
    deep = plain[:-2] + b", " + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"]}"
    assert nested_deeper_than(deep, MAX_JSON_DEPTH + 1) and not nested_deeper_than(deep, MAX_JSON_DEPTH + 2)


# --- record digests == SHA-256 of rfc8785 ------------------------------------------------------------

_UNICODE = st.text(alphabet=st.characters(blacklist_categories=["Cs"]))  # valid UTF-8: no surrogates
_ASCII = st.text(alphabet=st.characters(max_codepoint=0x7F))  # control characters, quotes, backslashes


def _records(text: st.SearchStrategy[str], numbers: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    scalars = st.none() | st.booleans() | numbers | text
    values = st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
        max_leaves=12,
    )
    return st.lists(st.dictionaries(text, values, max_size=6) | values, max_size=8)


def _rfc8785_digests(records: list[Any]) -> bytes:
    return b"".join(hashlib.sha256(rfc8785.dumps(record)).digest() for record in records)


_SAFE_INTEGERS = st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)


@settings(max_examples=400, deadline=None)
@given(records=_records(_UNICODE | _ASCII, _SAFE_INTEGERS))
def test_record_digests_without_floats_are_those_of_rfc8785(records):
    assert record_digest_bytes(records, False) == _rfc8785_digests(records)


@settings(max_examples=400, deadline=None)
@given(records=_records(_UNICODE, _SAFE_INTEGERS | st.floats(allow_nan=False, allow_infinity=False)))
def test_record_digests_with_floats_are_those_of_rfc8785(records):
    assert record_digest_bytes(records, True) == _rfc8785_digests(records)


@pytest.mark.parametrize(
    ("bad", "flags"),
    [
        ("\ud800", (False, True)),  # a lone surrogate, whatever the parser noticed
        # floats and large integers: only where the parser said they may occur
        (2**53, (True,)),
        (float("nan"), (True,)),
    ],
)
def test_a_record_rfc8785_cannot_express_is_named_by_its_index(bad, flags):
    records = [{"id": "a"}, {"id": "b", "x": bad}]
    for risky in flags:
        with pytest.raises(CanonicalizationError) as raised:
            record_digest_bytes(records, risky, first_index=10)
        assert raised.value.args[0] == 11


def test_records_whose_digests_are_known_are_not_hashed_again_and_a_changed_list_is():
    records = [{"id": "a", "n": 1}, {"id": "b", "n": 2}]
    real = _rfc8785_digests(records)
    stand_in = bytes(range(32)) + bytes(range(32, 64))  # not their digests: shows which were used
    known = DigestedRecords(records, stand_in)
    assert record_digest_bytes(known, False) == stand_in
    assert mismatched_digests(known, [stand_in[:32], stand_in[32:]]) == []
    # compared with what they should be, the known digests are wrong: each record is hashed again
    # (with RFC 8785) before it is called a mismatch, and these records are the expected ones
    assert mismatched_digests(known, [real[:32], real[32:]]) == []
    assert mismatched_digests(known, [real[:32], bytes(32)]) == [1]  # neither known nor real
    # a slice, a copy or a list grown since are plain records again: hashed
    assert record_digest_bytes(known[:1], False) == real[:32]
    assert record_digest_bytes(list(known), False) == real
    known.append({"id": "c"})
    assert record_digest_bytes(known, False) == real + _rfc8785_digests([{"id": "c"}])
    with pytest.raises(ValueError, match="32 bytes of digests for 2 records"):
        DigestedRecords(records, stand_in[:32])


# --- digests sorted in byte order ---------------------------------------------------------------------

# bytes that a signed or a NUL-terminated comparison would misorder, and equal prefixes
_DIGEST = st.lists(st.sampled_from([0, 0, 1, 0x7F, 0x80, 0xFF]), min_size=32, max_size=32).map(bytes)


@settings(max_examples=500, deadline=None)
@given(digests=st.lists(_DIGEST | st.binary(min_size=32, max_size=32), max_size=40))
def test_digests_are_sorted_in_byte_order(digests):
    rows = sorted_digest_rows(b"".join(digests))
    assert rows.dtype == np.uint8 and rows.shape == (len(digests), 32)
    assert rows.tobytes() == b"".join(sorted(digests))
    assert [row.tobytes().hex() for row in rows] == sorted(d.hex() for d in digests)

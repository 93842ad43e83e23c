"""The shortcuts taken while reading a request (issue 18: speed) decide exactly as the plain way does.

`nested_deeper_than` counts the brackets alone when no string holds one; that must give the depth
the quote-parity count gives, for any text (valid JSON or not), since its answer decides whether a
request is refused and with which message.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

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
    if pad:  # past the size under which the brackets are counted first
        text += b" " * (1 << 16)
    assert nested_deeper_than(text, limit) is (_reference_depth(text) > limit)


def test_a_long_request_of_flat_records_is_measured_outside_its_strings():
    records = b", ".join(b'{"id": "r-%d", "note": "[[[[", "ok": true}' % i for i in range(5000))
    shallow = b'{"sourceRecords": [' + records + b"]}"
    assert len(shallow) > 1 << 16
    assert not nested_deeper_than(shallow, 3) and nested_deeper_than(shallow, 2)  # object, list, record
    plain = shallow.replace(b"[[[[", b"....")  # no string holds a bracket: the brackets alone
    assert not nested_deeper_than(plain, 3) and nested_deeper_than(plain, 2)
    deep = plain[:-2] + b", " + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"]}"
    assert nested_deeper_than(deep, MAX_JSON_DEPTH + 1) and not nested_deeper_than(deep, MAX_JSON_DEPTH + 2)

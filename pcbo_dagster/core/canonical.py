"""RFC 8785 (JCS) canonical JSON and the digests built on it.

`rfc8785` is the reference implementation used for everything. `record_digest` has a fast path for
the common case (ASCII-only, no floats, no large integers) where `json.dumps` with sorted keys and
compact separators produces exactly the RFC 8785 bytes; a property test holds the two equal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from itertools import repeat
from typing import Any, cast

import numpy as np
import orjson
import rfc8785

CanonicalizationError = rfc8785.CanonicalizationError

#: The largest integer RFC 8785 (I-JSON: IEEE 754 doubles) carries exactly; records hold no other.
MAX_SAFE_INTEGER = 2**53 - 1


def is_integral_float(value: Any) -> bool:
    """True for a float that RFC 8785 writes as an integer a record may hold: no fraction, within
    +-(2**53 - 1) (`5.0`, `5e0`, `-0.0`: canonically `5`, `5`, `0`)."""
    return type(value) is float and value.is_integer() and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER


def json_integer(value: Any) -> int | None:
    """The integer a JSON value is by its RFC 8785 form, else None: an int (not a bool) within int64,
    or an integral float within +-(2**53 - 1). `5` and `5.0` have the same canonical form, so records
    that differ only so are the same record (CONTRACT section 2) and must be judged alike."""
    if type(value) is int:
        return value if -(2**63) <= value < 2**63 else None
    if is_integral_float(value):
        return int(value)
    return None


def jcs(value: Any) -> bytes:
    """RFC 8785 canonical bytes of a JSON value."""
    return rfc8785.dumps(value)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prefixed(hex_digest: str) -> str:
    """`sha256:<hex>`, the digest notation of every output."""
    return "sha256:" + hex_digest


def digest_of(value: Any) -> str:
    """`sha256:` + hex SHA-256 of the JCS form of `value`."""
    return prefixed(sha256_hex(jcs(value)))


def fast_jcs(value: Any) -> bytes:
    """JCS bytes for values known to hold no floats and no integer beyond +-(2**53 - 1).

    For such values, orjson's compact output with sorted keys equals RFC 8785 whenever it is ASCII
    (key order by code point equals order by UTF-16 code unit; string escapes are the same). Anything
    else goes through `rfc8785`. A property test holds the two equal.
    """
    try:
        data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return rfc8785.dumps(value)
    if data.isascii():
        return data
    return rfc8785.dumps(value)


def record_digests(records: list[Any], may_hold_floats_or_big_ints: bool) -> list[str]:
    """Hex SHA-256 of the JCS form of each record (the planHash `records` entries, unsorted).

    Raises `rfc8785.CanonicalizationError` (with the record index in `args`) for a record RFC 8785
    cannot express: lone surrogates, integers beyond +-(2**53 - 1), NaN or infinities.
    """
    return [d.hex() for d in _record_digests(records, may_hold_floats_or_big_ints, 0)]


class DigestedRecords(list[Any]):
    """Records whose RFC 8785 SHA-256 digests are already known, computed where the records were made
    (a ledger archive's decoding processes: issue 18, hashing each ledger's record, its XDR in base64
    included, was a fifth of an execute's time in the process that waits for it). `digests` holds the
    raw 32-byte digest of each record, concatenated, in order; `record_digest_bytes` and
    `mismatched_digests` take them as they are. A copy, a slice or a list changed since it was made
    (its length no longer matching the digests) is hashed again."""

    def __init__(self, records: Iterable[Any], digests: bytes) -> None:
        super().__init__(records)
        if len(digests) != 32 * len(self):
            raise ValueError(f"{len(digests)} bytes of digests for {len(self)} records")
        self.digests = digests


def _known_digests(records: list[Any]) -> bytes | None:
    if type(records) is DigestedRecords and len(records.digests) == 32 * len(records):
        return records.digests
    return None


def record_digest_bytes(records: list[Any], may_hold_floats_or_big_ints: bool, first_index: int = 0) -> bytes:
    """The raw 32-byte SHA-256 digests of `record_digests`, concatenated (a streamed source keeps
    these, 32 bytes a record). Error indexes count from `first_index`."""
    known = _known_digests(records)
    if known is not None:
        return known
    return b"".join(_record_digests(records, may_hold_floats_or_big_ints, first_index))


def sorted_digest_rows(digests: bytes) -> np.ndarray:
    """Raw 32-byte digests (concatenated) as a (n, 32) uint8 array of rows in byte order: the order
    of their hex texts, which the plan hash lists (`plan.build_plan` takes such chunks)."""
    rows = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 32)
    # Each row as one 32-byte string: numpy orders fixed-width byte strings by their bytes, unsigned,
    # first to last (zeros included: all are 32 bytes). One sort, not a lexsort's four stable passes
    # over big-endian words (issue 18: a quarter of the time).
    return np.sort(rows.view("S32").ravel()).view(np.uint8).reshape(-1, 32)


def mismatched_digests(records: list[Any], expected: list[bytes]) -> list[int]:
    """Positions of the records whose RFC 8785 SHA-256 is not `expected[i]` (raw digests): records
    read again that are no longer the ones that were decided on. A record RFC 8785 cannot express
    counts as a mismatch."""
    known = _known_digests(records)
    if known is not None:
        fast = [known[i : i + 32] for i in range(0, len(known), 32)]
    else:
        try:
            fast = _record_digests(records, False, 0)
        except rfc8785.CanonicalizationError:
            fast = [b""] * len(records)
    wrong = []
    for i, digest in enumerate(fast):
        if digest == expected[i]:
            continue
        try:  # the fast path's guess may be wrong for floats or large integers: ask rfc8785
            careful = hashlib.sha256(rfc8785.dumps(records[i])).digest()
        except (rfc8785.CanonicalizationError, UnicodeError, ValueError, TypeError):
            careful = b""
        if careful != expected[i]:
            wrong.append(i)
    return wrong


def _record_digests(records: list[Any], may_hold_floats_or_big_ints: bool, first_index: int) -> list[bytes]:
    """The raw SHA-256 of each record's RFC 8785 form. Each record's bytes are hashed as they are
    made and let go of (issue 18: neither the serialised records nor hash objects are held, which
    cost about a kilobyte a record)."""
    if not may_hold_floats_or_big_ints:
        sha = hashlib.sha256
        # orjson.dumps(record, None, OPT_SORT_KEYS): its options passed by position, not by keyword
        # through a partial (issue 18: a quarter of the serialising time for small records).
        blobs = map(orjson.dumps, records, repeat(None), repeat(orjson.OPT_SORT_KEYS))
        try:
            # ASCII output is the RFC 8785 form; anything else is re-done by rfc8785 (see fast_jcs).
            fast = [sha(blob).digest() if blob.isascii() else None for blob in blobs]
        except (orjson.JSONEncodeError, TypeError):
            pass  # some record needs rfc8785's judgement: take the careful path below
        else:
            if None in fast:
                for i, digest in enumerate(fast):
                    if digest is None:
                        fast[i] = _careful_digest(records[i], first_index + i)
            return cast(list[bytes], fast)
    return [_careful_digest(record, first_index + i) for i, record in enumerate(records)]


def _careful_digest(record: Any, index: int) -> bytes:
    try:
        return hashlib.sha256(rfc8785.dumps(record)).digest()
    except (rfc8785.CanonicalizationError, UnicodeEncodeError, ValueError) as exc:
        raise rfc8785.CanonicalizationError(index, str(exc)) from exc

"""Instants: ISO-8601 extended form with an explicit offset, kept to the microsecond, in UTC.

One parser serves both request fields and record columns: `parse_instants` works column-wise on an
Arrow string array; `parse_instant` runs it on a one-element array, so the two can never disagree.
Instants are carried as integers: microseconds since the Unix epoch, UTC.

Accepted: `YYYY-MM-DDTHH:MM:SS[.f+](Z|+hh:mm|-hh:mm)`, upper-case `T` and `Z`, a real calendar date
(year 0001-9999), hours 00-23, no leap second; offsets up to +-23:59. Fraction digits past the
sixth are truncated (the instant is kept to the microsecond).

The rules are written once, in `_parse_exactly` (a regular expression, then each field checked). A
column of many values first takes a shortcut that gives the same result: values of the one common
shape, `YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z`, are parsed by Arrow's own ISO-8601 cast, which refuses every
date and time that does not exist (the whole column goes the exact way when one of them is such), and
year 0000 is made null; every other value goes the exact way. A property test holds the two equal.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

_PATTERN = (
    r"^(?P<base>(?P<year>\d{4})-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})"
    r"(?:\.(?P<frac>\d+))?(?P<off>Z|[+-](?P<offh>\d{2}):(?P<offm>\d{2}))$"
)
#: The common shape (UTC, at most six fraction digits) that `_parse` hands to Arrow's cast.
_COMMON_SHAPE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?Z$"
#: Fewer values than this are parsed the exact way only (the shortcut's fixed cost is not worth it).
_SHORTCUT_FROM = 64
_UTC_MICROS = pa.timestamp("us", tz="UTC")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US_PER_S = 1_000_000
_MIN_US = -62_135_596_800_000_000  # 0001-01-01T00:00:00Z
_MAX_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z


def parse_instants(values: pa.Array) -> pa.Array:
    """Parse a string array; returns int64 microseconds since the epoch, null where not a valid instant."""
    return _parse(values.cast(pa.string()))


def _parse(values: pa.Array) -> pa.Array:
    """`_parse_exactly(values)`, with the common shape parsed by Arrow's cast (module doc)."""
    if len(values) < _SHORTCUT_FROM or not isinstance(values, pa.Array):
        return _parse_each_once(values)
    common = pc.fill_null(pc.match_substring_regex(values, _COMMON_SHAPE), False)
    count = pc.sum(common).as_py() or 0
    if count == 0:
        return _parse_each_once(values)
    picked = values if count == len(values) else values.filter(common)
    try:
        micros = pc.cast(picked, _UTC_MICROS).view(pa.int64())
    except pa.ArrowInvalid:  # a date or time that does not exist among them (2023-02-29, 24:00:00)
        return _parse_each_once(values)
    # Arrow reads year 0000, which is no instant here (the rest of the shape is within range).
    micros = pc.if_else(pc.greater_equal(micros, _MIN_US), micros, pa.scalar(None, pa.int64()))
    if count == len(values):
        return micros
    others = pc.invert(common)
    merged = pc.replace_with_mask(pa.nulls(len(values), pa.int64()), common, micros)
    return pc.replace_with_mask(merged, others, _parse_each_once(values.filter(others)))


def _parse_each_once(values: pa.Array) -> pa.Array:
    """`_parse_exactly(values)`, each distinct value parsed once when many repeat (retention dates)."""
    if len(values) > 1024:
        encoded = pc.dictionary_encode(values)
        if len(encoded.dictionary) * 2 < len(values):
            return pc.take(_parse_exactly(encoded.dictionary), encoded.indices)
    return _parse_exactly(values)


def _parse_exactly(values: pa.Array) -> pa.Array:
    """The rules (module doc), value by value in Arrow: int64 microseconds, null where not an instant."""
    parts = pc.extract_regex(values, _PATTERN)
    base = pc.struct_field(parts, "base")
    naive = pc.strptime(base, format="%Y-%m-%dT%H:%M:%S", unit="s", error_is_null=True)
    # Arrow's strptime rolls 2024-02-30 over to March 1 and 10:59:60 to 11:00:00: reading each field
    # back from the parsed value rejects what is not a real date and time.
    round_trip = pc.is_valid(naive)
    for func, lo in ((pc.month, 5), (pc.day, 8), (pc.hour, 11), (pc.minute, 14), (pc.second, 17)):
        given = pc.cast(pc.utf8_slice_codeunits(base, lo, lo + 2), pa.int64())
        round_trip = pc.and_(round_trip, pc.equal(pc.cast(func(naive), pa.int64()), given))
    year_ok = pc.not_equal(pc.struct_field(parts, "year"), "0000")
    frac = pc.utf8_slice_codeunits(pc.utf8_rpad(pc.struct_field(parts, "frac"), 6, "0"), 0, 6)
    frac_us = pc.cast(frac, pa.int64())
    offh = pc.struct_field(parts, "offh")
    offm = pc.struct_field(parts, "offm")
    is_z = pc.equal(pc.struct_field(parts, "off"), "Z")
    offh_i = pc.cast(pc.if_else(is_z, "00", offh), pa.int64())
    offm_i = pc.cast(pc.if_else(is_z, "00", offm), pa.int64())
    off_ok = pc.and_(pc.less_equal(offh_i, 23), pc.less_equal(offm_i, 59))
    negative = pc.starts_with(pc.struct_field(parts, "off"), "-")
    off_s = pc.add(pc.multiply(offh_i, 3600), pc.multiply(offm_i, 60))
    off_s = pc.if_else(negative, pc.negate(off_s), off_s)
    micros = pc.add(pc.multiply(pc.cast(naive, pa.int64()), _US_PER_S), frac_us)
    micros = pc.subtract(micros, pc.multiply(off_s, _US_PER_S))
    in_range = pc.and_(pc.greater_equal(micros, _MIN_US), pc.less_equal(micros, _MAX_US))
    ok = parts.is_valid()
    for check in (round_trip, year_ok, off_ok, in_range):
        ok = pc.and_kleene(ok, check)
    return pc.if_else(pc.fill_null(ok, False), micros, pa.scalar(None, pa.int64()))


def parse_instant(text: object) -> int | None:
    """Microseconds since the epoch for one instant, or None when `text` is not a valid instant."""
    if not isinstance(text, str):
        return None
    if not text.isascii():
        return None
    return parse_instants(pa.array([text], pa.string()))[0].as_py()


def format_instant(micros: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, the fraction only when not zero."""
    m = _EPOCH + timedelta(microseconds=micros)
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    if m.microsecond:
        text += f".{m.microsecond:06d}"
    return text + "Z"


def format_datetime(moment: datetime) -> str:
    """`moment` as `format_instant` writes it (UTC, the fraction only when not zero); a naive datetime
    is taken as UTC (what the catalog's columns give back)."""
    return format_instant(to_micros(moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)))


def to_datetime(micros: int) -> datetime:
    """Microseconds since the epoch as an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=micros)


def to_micros(moment: datetime) -> int:
    """An aware datetime as microseconds since the epoch (the inverse of `to_datetime`)."""
    return (moment.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)

"""A column of instants is parsed exactly as the rules say, whichever way it goes: the shortcut through
Arrow's ISO-8601 cast for the common shape (`core/instants._parse`) gives what the exact parser
(`_parse_exactly`) gives, value for value, for columns of every mix of valid and invalid values."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pcbo_dagster.core import instants

#: Fields of the common shape, including values that are no date or time (month 13, day 31 of April,
#: second 60, year 0000), so that Arrow's cast must refuse or the shortcut null them.
_YEARS = st.sampled_from(["0000", "0001", "1900", "1970", "2000", "2023", "2024", "9999"])
_TWO = st.integers(0, 61).map(lambda n: f"{n:02d}")
_FRACTIONS = st.sampled_from(["", ".5", ".000001", ".123456", ".1234567", ".", ".99999999"])
_ENDINGS = st.sampled_from(["Z", "Z", "Z", "z", "+00:00", "+01:30", "-23:59", "+24:00", "+05:60", ""])
_SEPARATORS = st.sampled_from(["T", "T", "T", "t", " "])


@st.composite
def _instant_like(draw: st.DrawFn) -> str | None:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return None
    if kind == 1:
        return draw(st.text(max_size=30))
    year, month, day = draw(_YEARS), draw(_TWO), draw(_TWO)
    hour, minute, second = draw(_TWO), draw(_TWO), draw(_TWO)
    if kind <= 6:  # mostly a real instant of the common shape
        month, day = f"{int(month) % 12 + 1:02d}", f"{int(day) % 28 + 1:02d}"
        hour, minute, second = f"{int(hour) % 24:02d}", f"{int(minute) % 60:02d}", f"{int(second) % 60:02d}"
        return f"{year}-{month}-{day}T{hour}:{minute}:{second}{draw(_FRACTIONS)}Z"
    return (
        f"{year}-{month}-{day}{draw(_SEPARATORS)}{hour}:{minute}:{second}{draw(_FRACTIONS)}{draw(_ENDINGS)}"
    )


def _both(values: list[str | None]) -> tuple[list[int | None], list[int | None]]:
    array = pa.array(values, pa.string())
    return instants._parse(array).to_pylist(), instants._parse_exactly(array).to_pylist()


@settings(max_examples=100, deadline=None)
@given(st.lists(_instant_like(), min_size=instants._SHORTCUT_FROM, max_size=200))
def test_a_column_parses_as_the_exact_rules_say(values: list[str | None]) -> None:
    shortcut, exact = _both(values)
    assert shortcut == exact


@st.composite
def _common_instant(draw: st.DrawFn) -> str | None:
    """A real instant of the common shape (or a null)."""
    if draw(st.integers(0, 9)) == 0:
        return None
    year = draw(_YEARS.filter(lambda y: y != "0000"))
    month, day = draw(st.integers(1, 12)), draw(st.integers(1, 28))
    hour, minute, second = draw(st.integers(0, 23)), draw(st.integers(0, 59)), draw(st.integers(0, 59))
    fraction = draw(_FRACTIONS.filter(lambda f: f != "." and len(f) <= 7))
    return f"{year}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}{fraction}Z"


@settings(max_examples=50, deadline=None)
@given(st.lists(_common_instant(), min_size=instants._SHORTCUT_FROM, max_size=200))
def test_columns_of_common_instants_parse_as_the_exact_rules_say(values: list[str | None]) -> None:
    shortcut, exact = _both(values)
    assert shortcut == exact


def test_each_way_through_the_shortcut_gives_the_exact_values() -> None:
    common: list[str | None] = [*(f"2024-03-{d:02d}T10:11:12.5Z" for d in range(1, 29))] * 3
    cases: dict[str, list[str | None]] = {
        "all common": common,
        "common and others": common + ["2024-03-01T10:11:12+01:00", None, "", "2024-03-01T10:11:12.1234567Z"],
        "a date that does not exist": common + ["2023-02-29T00:00:00Z"],
        "a leap second": common + ["2024-01-01T23:59:60Z"],
        "year 0000": common + ["0000-01-01T00:00:00Z"],
        "a space for the T": common + ["2024-01-01 00:00:00Z"],
        "none common": ["2024-03-01T10:11:12+01:00"] * 70,
        "none common, repeated (each parsed once)": ["2024-03-01T10:11:12+01:00", "2024-03-01T10:11:12Y"]
        * 800,
        "common and a date that does not exist, repeated": [*common, "2023-02-29T00:00:00Z"] * 30,
    }
    for name, values in cases.items():
        shortcut, exact = _both(values)
        assert shortcut == exact, name
    assert _both(cases["year 0000"])[0][-1] is None
    assert _both(cases["a space for the T"])[0][-1] is None
    assert _both(cases["common and others"])[0][-4] == 1709284272000000  # 2024-03-01T09:11:12Z
    assert _both(cases["common and others"])[0][-1] == 1709287872123456  # truncated to the microsecond

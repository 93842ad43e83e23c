"""`core/partition_keys.py`: time and ledger keys (format, parse, refusal of anything else) and the
ledger grid's arithmetic at its edges; and that the engine plans exactly the grid's keys."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcbo_dagster.core.instants import parse_instant, to_micros
from pcbo_dagster.core.partition_keys import (
    MAX_LEDGER_END,
    TIME_KEY_STRFTIME,
    LedgerGrid,
    LedgerSpan,
    PartitionKeyError,
    format_ledger_key,
    format_time_key,
    parse_ledger_key,
    parse_time_key,
    short_key,
    validate_partition_key,
    window_for_key,
)
from pcbo_dagster.core.plan import partitions_for


def _us(text: str) -> int:
    us = parse_instant(text)
    assert us is not None, text
    return us


MIN_US = _us("0001-01-01T00:00:00Z")
MAX_US = _us("9999-12-31T23:59:59.999999Z")

# --- time keys -------------------------------------------------------------------------------------


def test_time_keys_are_the_contracts_format() -> None:
    assert format_time_key(_us("2024-01-01T00:00:00Z")) == "20240101T000000Z"
    assert format_time_key(_us("2024-02-29T13:05:09.000250Z")) == "20240229T130509.000250Z"
    assert format_time_key(MIN_US) == "00010101T000000Z"
    assert format_time_key(MAX_US) == "99991231T235959.999999Z"
    assert parse_time_key("19700101T000000Z") == 0


@settings(deadline=None)  # timing varies on a loaded machine; the properties do not
@given(st.integers(min_value=MIN_US, max_value=MAX_US))
def test_time_keys_round_trip(start_us: int) -> None:
    key = format_time_key(start_us)
    assert parse_time_key(key) == start_us
    assert validate_partition_key(key) == key


@settings(deadline=None)
@given(st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)))
def test_dagsters_key_format_renders_whole_seconds_as_time_keys(moment: datetime) -> None:
    moment = moment.replace(microsecond=0, tzinfo=UTC)
    assert moment.strftime(TIME_KEY_STRFTIME) == format_time_key(to_micros(moment))


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "20240101T000000",  # no Z
        "20240101t000000Z",
        "20240101T000000z",
        "2024-01-01T00:00:00Z",  # an instant, not a key
        "20240101T000000.000000Z",  # a second spelling of 20240101T000000Z
        "20240101T000000.5Z",  # the fraction has six digits
        "20240101T000000.0000001Z",
        "20240230T000000Z",  # no such day
        "20240101T240000Z",
        "20240101T235960Z",  # no leap second
        "00000101T000000Z",  # no year 0
        "20240101T000000Z\n",
        " 20240101T000000Z",
        "２0240101T000000Z",  # a non-ASCII digit
        "20240101T000000Z/..",
        "../20240101T000000Z",
    ],
)
def test_malformed_time_keys_are_refused(bad: str) -> None:
    with pytest.raises(PartitionKeyError, match="partition key"):
        parse_time_key(bad)
    with pytest.raises(PartitionKeyError):
        validate_partition_key(bad)


def test_a_window_starts_at_its_key() -> None:
    window = window_for_key("20240101T010000Z", 3600)
    assert (window.start_us, window.length_us) == (parse_instant("2024-01-01T01:00:00Z"), 3_600_000_000)
    with pytest.raises(PartitionKeyError):
        window_for_key("range=2-65", 3600)


# --- ledger keys -----------------------------------------------------------------------------------


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=MAX_LEDGER_END - 1), st.integers(min_value=0, max_value=10**6))
def test_ledger_keys_round_trip(first: int, length: int) -> None:
    last = min(first + length, MAX_LEDGER_END - 1)
    key = format_ledger_key(first, last)
    assert parse_ledger_key(key) == (first, last)
    assert validate_partition_key(key) == key
    assert short_key(key) == f"{first}-{last}"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "range=",
        "range=2",
        "range=2-",
        "range=-2-65",
        "range=2-65-",
        "range=02-65",  # leading zeros: a second spelling
        "range=2-065",
        "range=+2-65",
        "range=2 -65",
        "range=65-2",  # ends before it starts
        "Range=2-65",
        "ledger=2-65",
        "range=2-65\n",
        "range=2-65/..",
        "range=2-65/../../x",
        "../range=2-65",
        "range=２-65",  # a non-ASCII digit
        f"range=0-{MAX_LEDGER_END}",  # its end would pass the bound of a request's ledgerRange.end
        "range=1-" + "9" * 5000,  # too long to be a ledger (and for int() to read)
    ],
)
def test_malformed_ledger_keys_are_refused(bad: str) -> None:
    with pytest.raises(PartitionKeyError, match="partition key"):
        parse_ledger_key(bad)
    with pytest.raises(PartitionKeyError):
        validate_partition_key(bad)


def test_keys_of_neither_kind_are_refused_and_named() -> None:
    for bad in ("..", "a/b", "x", ".", "20240101T000000Z/range=2-65"):
        with pytest.raises(PartitionKeyError, match="neither a time key"):
            validate_partition_key(bad)
    assert short_key("20240101T000000Z") == "20240101T000000Z"


# --- the ledger grid ---------------------------------------------------------------------------------

GRID = LedgerGrid(first_ledger=2, partition_size=64, last_ledger=600)  # the last partition 578-600


def test_a_closed_grid_cuts_its_last_partition_at_last_ledger() -> None:
    assert GRID.partition_count() == 10
    spans = GRID.spans()
    assert spans[0] == LedgerSpan("range=2-65", 2, 66)
    assert spans[-1] == LedgerSpan("range=578-600", 578, 601)
    assert spans[-1].length == 23 and spans[-1].last == 600
    assert [s.key for s in spans] == GRID.keys()
    assert all(a.end == b.first for a, b in zip(spans, spans[1:], strict=False))


def test_grid_edges() -> None:
    exact = LedgerGrid(2, 64, 641)  # the last partition is full
    assert exact.keys()[-1] == "range=578-641"
    single = LedgerGrid(5, 100, 5)  # one ledger, one partition
    assert single.keys() == ["range=5-5"]
    assert LedgerGrid(0, 1, 2).keys() == ["range=0-0", "range=1-1", "range=2-2"]
    with pytest.raises(ValueError, match="open-ended"):
        LedgerGrid(2, 64).keys()
    with pytest.raises(ValueError):
        LedgerGrid(2, 0, 10)
    with pytest.raises(ValueError):
        LedgerGrid(10, 4, 9)


def test_the_partition_holding_a_ledger() -> None:
    assert GRID.span_at(1) is None  # before firstLedger
    assert GRID.span_at(2).key == "range=2-65"  # type: ignore[union-attr]
    assert GRID.span_at(65).key == "range=2-65"  # type: ignore[union-attr]
    assert GRID.span_at(66).key == "range=66-129"  # type: ignore[union-attr]
    assert GRID.span_at(600).key == "range=578-600"  # type: ignore[union-attr]
    assert GRID.span_at(601) is None  # beyond lastLedger
    assert LedgerGrid(2, 64).span_at(10**9).key == "range=999999938-1000000001"  # type: ignore[union-attr]


def test_a_key_is_on_the_grid_or_refused() -> None:
    assert GRID.span_of_key("range=2-65") == LedgerSpan("range=2-65", 2, 66)
    assert GRID.span_of_key("range=578-600").end == 601
    refused = {
        "range=3-66": "'range=2-65'",  # off the grid
        "range=2-64": "'range=2-65'",  # cut short
        "range=578-641": "'range=578-600'",  # the last partition is cut at lastLedger
        "range=642-705": "outside",  # beyond lastLedger
        "range=0-1": "outside",  # before firstLedger
        "ledger=2-65": "range=FIRST-LAST",
    }
    for key, why in refused.items():
        with pytest.raises(PartitionKeyError, match=why):
            GRID.span_of_key(key)
    open_ended = LedgerGrid(2, 64)
    assert open_ended.span_of_key("range=642-705").first == 642


def test_full_partitions() -> None:
    assert GRID.full_keys(None) == []
    assert GRID.full_keys(1) == []
    assert GRID.full_keys(64) == []  # the first partition ends at 65
    assert GRID.full_keys(65) == ["range=2-65"]
    assert GRID.full_keys(129) == ["range=2-65", "range=66-129"]
    assert GRID.full_keys(10_000) == GRID.keys()[:-1]  # the short last partition is never full
    assert LedgerGrid(2, 64, 641).full_keys(10_000) == LedgerGrid(2, 64, 641).keys()  # unless it is
    assert len(LedgerGrid(2, 64).full_keys(10_000)) == (10_000 - 1) // 64


@settings(deadline=None)
@given(
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=1, max_value=500),
    st.integers(min_value=1, max_value=2_000),
)
def test_the_engine_plans_the_grids_keys(first: int, size: int, ledgers: int) -> None:
    grid = LedgerGrid.of_request(first, first + ledgers, size)
    spans = grid.spans()
    planned = partitions_for(first, first + ledgers, size, ledger=True)
    assert [(p.key, p.start, p.end) for p in planned] == [(s.key, s.first, s.end) for s in spans]
    assert [p.index for p in planned] == list(range(len(planned)))
    for span in spans:
        assert grid.span_of_key(span.key) == span
        assert grid.span_at(span.first) == span == grid.span_at(span.last)


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
@settings(max_examples=200, deadline=None)
def test_datetimes_are_written_as_instants_and_read_back(moment: datetime) -> None:
    """`format_datetime` (every time pcbo writes: audit events, alerts, reports, the API) reads back as
    the same instant, a naive datetime as UTC, with the fraction only when it is not zero."""
    from datetime import timedelta, timezone

    from pcbo_dagster.core.instants import format_datetime

    text = format_datetime(moment)
    assert text.endswith("Z") and ("." in text) == bool(moment.microsecond)
    assert parse_instant(text) == to_micros(moment.replace(tzinfo=UTC))
    shifted = moment.replace(tzinfo=UTC).astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert format_datetime(shifted) == text

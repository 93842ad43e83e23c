"""Partition keys: a Dagster partition key, a lake directory and an engine key are one string.

Pure (no Dagster, no I/O). Two kinds of key, each formatted and parsed here only:

- a **time key**: a window's start as `YYYYMMDDTHHMMSS[.ffffff]Z` (UTC; the fraction only when not
  zero, CONTRACT section 1);
- a **ledger key**: `range=<first>-<last>`, decimal ledger sequences without leading zeros, both
  inclusive (`range=2-65`), a partition of a `LedgerGrid`.

A key names a lake directory (`<lake>/<dataset>/<versionLabel>/<key>/`), so parsing accepts exactly
what formatting writes and nothing else: no `/`, no `..`, no white space or trailing newline, no
second spelling of the same key (`.000000`, leading zeros). Anything else raises `PartitionKeyError`
(a `ValueError`) naming the key.

The ledger grid: ledgers `firstLedger, firstLedger + 1, ...` cut into partitions of `partitionSize`
ledgers, the last one cut at `lastLedger` (shorter) when the range is closed; open-ended without it.
An engine `ledgerRange` request (`first`, `end` exclusive, `partitionSize`) plans exactly the
partitions of `LedgerGrid.of_request(first, end, partitionSize)` (`core.plan`), and a dataset's
ledger partitioning is the grid of its config, so a Dagster key on the dataset's grid is the key the
engine plans and writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from pcbo_dagster.core.instants import to_datetime, to_micros

_TIME_KEY = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})T([0-9]{2})([0-9]{2})([0-9]{2})(?:\.([0-9]{6}))?Z")
_LEDGER_KEY = re.compile(r"range=(0|[1-9][0-9]{0,15})-(0|[1-9][0-9]{0,15})")  # 2**53 has 16 digits
#: The bound of a request's `ledgerRange.end` (exclusive): a key's last ledger stays below it.
MAX_LEDGER_END = 2**53 - 1
#: A whole-second time key as a `strftime` format (Dagster's time-window partitions `fmt`): it renders
#: a window start on a whole second exactly as `format_time_key` does.
TIME_KEY_STRFTIME = "%Y%m%dT%H%M%SZ"


class PartitionKeyError(ValueError):
    """A string that is not exactly a partition key (or not one of a given grid)."""


# --- time keys -------------------------------------------------------------------------------------


def format_time_key(start_us: int) -> str:
    """The key of a time partition starting at `start_us` (microseconds since the epoch, UTC):
    `YYYYMMDDTHHMMSS[.ffffff]Z`, the fraction only when not zero."""
    m = to_datetime(start_us)
    text = f"{m.year:04d}{m.month:02d}{m.day:02d}T{m.hour:02d}{m.minute:02d}{m.second:02d}"
    if m.microsecond:
        text += f".{m.microsecond:06d}"
    return text + "Z"


def parse_time_key(key: str) -> int:
    """The start (microseconds since the epoch, UTC) of time key `key`; `PartitionKeyError` unless
    `key` is exactly what `format_time_key` writes for it (a real date in years 0001-9999)."""
    match = _TIME_KEY.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise PartitionKeyError(f"partition key {key!r} is not a time key YYYYMMDDTHHMMSS[.ffffff]Z")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    micro = int(match.group(7) or 0)
    try:
        moment = datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)
    except ValueError:
        raise PartitionKeyError(f"partition key {key!r} is not a real date and time") from None
    start_us = to_micros(moment)
    if format_time_key(start_us) != key:  # `.000000`: the key of this instant has no fraction
        raise PartitionKeyError(f"partition key {key!r} is written {format_time_key(start_us)!r}")
    return start_us


# --- ledger keys -----------------------------------------------------------------------------------


def format_ledger_key(first: int, last: int) -> str:
    """The key of the ledger partition holding ledgers `first` to `last` (both inclusive)."""
    return f"range={first}-{last}"


def parse_ledger_key(key: str) -> tuple[int, int]:
    """(first, last) ledgers (both inclusive) of ledger key `key`; `PartitionKeyError` unless `key` is
    exactly `range=FIRST-LAST` with FIRST <= LAST, decimal without leading zeros, LAST + 1 at most
    `MAX_LEDGER_END`."""
    match = _LEDGER_KEY.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise PartitionKeyError(f"partition key {key!r} is not of the form range=FIRST-LAST")
    first, last = int(match.group(1)), int(match.group(2))
    if last < first:
        raise PartitionKeyError(f"partition key {key!r} ends before it starts")
    if last >= MAX_LEDGER_END:
        raise PartitionKeyError(f"partition key {key!r} reaches beyond ledger {MAX_LEDGER_END - 1}")
    return first, last


def short_key(key: str) -> str:
    """A key as part of a name (a rollout's: `[A-Za-z0-9._-]`): a ledger key without its `range=`
    (`2-65`), any other key as it is."""
    try:
        first, last = parse_ledger_key(key)
    except PartitionKeyError:
        return key
    return f"{first}-{last}"


def validate_partition_key(key: str) -> str:
    """`key` itself when it is a time key or a ledger key; `PartitionKeyError` otherwise (what a key
    given by a user must pass before it names a lake directory)."""
    if isinstance(key, str) and key.startswith("range="):
        parse_ledger_key(key)
        return key
    try:
        parse_time_key(key)
    except PartitionKeyError:
        if isinstance(key, str) and _TIME_KEY.fullmatch(key):
            raise  # shaped like a time key: say what is wrong with it
        raise PartitionKeyError(
            f"partition key {key!r} is neither a time key (YYYYMMDDTHHMMSS[.ffffff]Z) nor a "
            "ledger key (range=FIRST-LAST)"
        ) from None
    return key


# --- partitions with their bounds ------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One time partition: its key and bounds in microseconds since the epoch (UTC), end exclusive."""

    key: str
    start_us: int
    end_us: int

    @property
    def length_us(self) -> int:
        return self.end_us - self.start_us


def window_for_key(key: str, seconds: int) -> Window:
    """The window of `seconds` starting at time key `key` (`PartitionKeyError` for a bad key)."""
    start_us = parse_time_key(key)
    return Window(key, start_us, start_us + seconds * 1_000_000)


@dataclass(frozen=True)
class LedgerSpan:
    """One ledger partition: its key and ledgers [first, end) (end exclusive)."""

    key: str
    first: int
    end: int

    @property
    def last(self) -> int:
        return self.end - 1

    @property
    def length(self) -> int:
        return self.end - self.first


def ledger_span(first: int, last: int) -> LedgerSpan:
    """The partition of ledgers `first` to `last` (both inclusive), with its key."""
    return LedgerSpan(format_ledger_key(first, last), first, last + 1)


@dataclass(frozen=True)
class LedgerGrid:
    """Ledgers from `first_ledger` on, cut into partitions of `partition_size`; with `last_ledger`
    (inclusive) the range is closed and its last partition may be shorter, else it is open-ended."""

    first_ledger: int
    partition_size: int
    last_ledger: int | None = None

    def __post_init__(self) -> None:
        if self.partition_size < 1:
            raise ValueError(f"partitionSize must be at least 1, not {self.partition_size}")
        if self.last_ledger is not None and self.last_ledger < self.first_ledger:
            raise ValueError(f"lastLedger {self.last_ledger} is before firstLedger {self.first_ledger}")

    @classmethod
    def of_request(cls, first: int, end: int, partition_size: int) -> LedgerGrid:
        """The grid of an engine `ledgerRange` (`end` exclusive)."""
        return cls(first, partition_size, end - 1)

    def describe(self) -> str:
        return (
            f"firstLedger {self.first_ledger}, partitionSize {self.partition_size}, "
            f"lastLedger {self.last_ledger}"
        )

    def span_at(self, ledger: int) -> LedgerSpan | None:
        """The partition holding `ledger`; None when the grid does not reach it."""
        if ledger < self.first_ledger or (self.last_ledger is not None and ledger > self.last_ledger):
            return None
        return self.span((ledger - self.first_ledger) // self.partition_size)

    def span(self, index: int) -> LedgerSpan:
        """Partition `index` (from 0) of the grid; its last ledger cut at `last_ledger`."""
        first = self.first_ledger + index * self.partition_size
        last = first + self.partition_size - 1
        if self.last_ledger is not None:
            last = min(last, self.last_ledger)
        return ledger_span(first, last)

    def span_of_key(self, key: str) -> LedgerSpan:
        """The partition whose key is `key`; `PartitionKeyError` naming the key when it is not a ledger
        key or not a partition of this grid (off the grid, cut elsewhere, or beyond its ends)."""
        first, last = parse_ledger_key(key)
        span = self.span_at(first)
        if span is None or span.first != first or span.last != last:
            where = (
                f"ledger {first} is outside it"
                if span is None
                else f"its partition starting at or before {first} is {span.key!r}"
            )
            raise PartitionKeyError(
                f"partition key {key!r} is not a partition of this dataset ({self.describe()}); {where}"
            )
        return span

    def partition_count(self) -> int:
        """How many partitions a closed grid has (`ValueError` for an open-ended one)."""
        if self.last_ledger is None:
            raise ValueError("an open-ended ledger range has no fixed key list")
        return -(-(self.last_ledger - self.first_ledger + 1) // self.partition_size)

    def spans(self) -> list[LedgerSpan]:
        """Every partition of a closed grid, in ledger order (`ValueError` for an open-ended one)."""
        return [self.span(index) for index in range(self.partition_count())]

    def keys(self) -> list[str]:
        """Every key of a closed grid, in ledger order (`ValueError` for an open-ended one)."""
        return [span.key for span in self.spans()]

    def full_count(self, max_ledger: int | None) -> int:
        """How many partitions are full up to `max_ledger` (the highest ledger a source holds).

        A partition is full when all `partition_size` ledgers are at most `max_ledger` (ledgers close
        in order: once a source holds ledger N, ledgers up to N are complete) and within the grid: a
        closed grid's shorter last partition is never full.
        """
        if max_ledger is None or max_ledger < self.first_ledger:
            return 0
        top = max_ledger if self.last_ledger is None else min(max_ledger, self.last_ledger)
        return (top - self.first_ledger + 1) // self.partition_size

    def full_keys(self, max_ledger: int | None, limit: int | None = None) -> list[str]:
        """The keys of the full partitions up to `max_ledger` (`full_count`), the first `limit` of them
        when given: a source's one huge ledger (2**53 - 1) makes 10**14 partitions full, whose keys
        are never all built."""
        count = self.full_count(max_ledger)
        return [self.span(index).key for index in range(count if limit is None else min(count, limit))]

"""Datasets' partitioning as Dagster partitions definitions.

- Time windows: `TimeWindowPartitionsDefinition` over the dataset's cron, in UTC, with the key
  format `%Y%m%dT%H%M%SZ`, which is exactly the engine's partition key (`core.instants.format_key`)
  for a window start on a whole second (every cron tick is): a Dagster partition key and the lake's
  partition directory are the same string.
- Ledger ranges: `StaticPartitionsDefinition` of `range=START-END` keys (END inclusive) when
  `lastLedger` is given; an open-ended range becomes a `DynamicPartitionsDefinition` whose keys the
  dataset's sensor (`backfill/sensors.py`) adds for every full partition the source
  holds. Keys sit on the grid `firstLedger + i*partitionSize`, exactly the engine's `ledgerRange`
  partitions (`core.plan.partitions_for`), so a Dagster key and the lake's partition directory are
  again the same string; only the last key of a closed range may be shorter (cut at `lastLedger`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg

from pcbo_dagster.core.instants import format_key, to_datetime
from pcbo_dagster.datasets.config import DatasetConfig, LedgerRangePartitioning, TimeWindowPartitioning
from pcbo_dagster.datasets.requests import LEDGER_KEY, LedgerSpan, Window

#: Dagster's key format for time windows; renders a window start as the engine's partition key.
KEY_FORMAT = "%Y%m%dT%H%M%SZ"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def ledger_key(first: int, last: int) -> str:
    return f"range={first}-{last}"


def to_micros(moment: datetime) -> int:
    return (moment.astimezone(UTC) - _EPOCH) // _MICROSECOND


def time_window_partitions_def(partitioning: TimeWindowPartitioning) -> dg.TimeWindowPartitionsDefinition:
    end_us = partitioning.end_us
    return dg.TimeWindowPartitionsDefinition(
        start=to_datetime(partitioning.start_us),
        end=None if end_us is None else to_datetime(end_us),
        cron_schedule=partitioning.cron,
        fmt=KEY_FORMAT,
        timezone="UTC",
    )


def dynamic_partitions_name(dataset: DatasetConfig) -> str:
    """The name of an open-ended ledger dataset's `DynamicPartitionsDefinition` (keys in the instance)."""
    return f"pcbo_{dataset.asset_name}_ledger_ranges"


def ledger_range_partitions_def(
    dataset: DatasetConfig, partitioning: LedgerRangePartitioning
) -> dg.PartitionsDefinition:
    if partitioning.lastLedger is None:
        return dg.DynamicPartitionsDefinition(name=dynamic_partitions_name(dataset))
    return dg.StaticPartitionsDefinition(partitioning.keys())


def partitions_def_for(dataset: DatasetConfig) -> dg.PartitionsDefinition:
    partitioning = dataset.partitioning
    if isinstance(partitioning, TimeWindowPartitioning):
        return time_window_partitions_def(partitioning)
    return ledger_range_partitions_def(dataset, partitioning)


def windows_for_keys(partitions_def: dg.TimeWindowPartitionsDefinition, keys: list[str]) -> list[Window]:
    """The windows of `keys`, in key order, each checked to render as the engine's partition key."""
    windows = []
    for key in keys:
        window = partitions_def.time_window_for_partition_key(key)
        start_us, end_us = to_micros(window.start), to_micros(window.end)
        if format_key(start_us) != key:
            raise ValueError(f"Dagster partition key {key!r} is not the engine key {format_key(start_us)!r}")
        windows.append(Window(key, start_us, end_us))
    return sorted(windows, key=lambda w: w.start_us)


def request_groups(windows: list[Window], max_partitions: int) -> list[list[Window]]:
    """Split windows into runs of contiguous, equal-length windows (at most `max_partitions` each).

    Each group is one engine request with `chunkSeconds` = the window length: hourly and daily
    ranges are one group; an irregular cron (weekdays, months) makes a group per run of equal
    windows, down to one request per window.
    """
    groups: list[list[Window]] = []
    for window in windows:
        if groups:
            group = groups[-1]
            last = group[-1]
            if (
                last.end_us == window.start_us
                and last.length_us == window.length_us
                and len(group) < max_partitions
            ):
                group.append(window)
                continue
        groups.append([window])
    return groups


def ledger_spans_for_keys(partitioning: LedgerRangePartitioning, keys: list[str]) -> list[LedgerSpan]:
    """The ledger spans of `keys`, in ledger order, each checked to be a partition of the dataset's grid.

    A key off the grid (a dynamic key added by hand, say `range=3-66` for firstLedger 2) would make the
    engine plan other partitions than Dagster's: it is refused with a `ValueError` naming it.
    """
    first_ledger, size, last_ledger = (
        partitioning.firstLedger,
        partitioning.partitionSize,
        partitioning.lastLedger,
    )
    spans = []
    for key in keys:
        match = LEDGER_KEY.match(key)
        if match is None:
            raise ValueError(f"partition key {key!r} is not of the form range=FIRST-LAST")
        first, last = int(match.group(1)), int(match.group(2))
        expected_last = first + size - 1
        if last_ledger is not None:
            expected_last = min(expected_last, last_ledger)
        on_grid = first >= first_ledger and (first - first_ledger) % size == 0
        if not on_grid or last != expected_last or (last_ledger is not None and first > last_ledger):
            raise ValueError(
                f"partition key {key!r} is not a partition of this dataset (firstLedger {first_ledger}, "
                f"partitionSize {size}, lastLedger {last_ledger}); its partition starting at or before "
                f"{first} is {ledger_key(*_grid_bounds(partitioning, first))!r}"
            )
        spans.append(LedgerSpan(key, first, last + 1))
    return sorted(spans, key=lambda s: s.first)


def _grid_bounds(partitioning: LedgerRangePartitioning, ledger: int) -> tuple[int, int]:
    size = partitioning.partitionSize
    index = max(0, (ledger - partitioning.firstLedger) // size)
    first = partitioning.firstLedger + index * size
    last = first + size - 1
    if partitioning.lastLedger is not None:
        last = min(last, partitioning.lastLedger)
    return first, last


def ledger_request_groups(
    spans: list[LedgerSpan], partition_size: int, max_partitions: int
) -> list[list[LedgerSpan]]:
    """Split spans into runs of contiguous spans, one engine `ledgerRange` request each.

    Within a group every span but the last is `partition_size` ledgers long (the last may be shorter:
    the final partition of a range cut by `lastLedger`, which the engine plans as its last partition),
    so `first` = the first span's first ledger, `end` = the last span's end and `partitionSize` =
    `partition_size` reproduce exactly these keys. A gap (partitions not selected) starts a new group.
    """
    groups: list[list[LedgerSpan]] = []
    for span in spans:
        if groups:
            group = groups[-1]
            last = group[-1]
            if last.end == span.first and last.length == partition_size and len(group) < max_partitions:
                group.append(span)
                continue
        groups.append([span])
    return groups


def full_ledger_keys(partitioning: LedgerRangePartitioning, max_ledger: int | None) -> list[str]:
    """The keys of every full partition up to `max_ledger` (the highest ledger the source holds).

    A partition is full when its last ledger (`first + partitionSize - 1`) is at most `max_ledger`
    (ledgers close in order: once the source holds ledger N, ledgers up to N are complete). With a
    `lastLedger`, keys stop there.
    """
    if max_ledger is None or max_ledger < partitioning.firstLedger:
        return []
    size = partitioning.partitionSize
    top = max_ledger if partitioning.lastLedger is None else min(max_ledger, partitioning.lastLedger)
    keys = []
    first = partitioning.firstLedger
    while first + size - 1 <= top:
        keys.append(ledger_key(first, first + size - 1))
        first += size
    return keys

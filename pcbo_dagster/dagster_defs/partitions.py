"""Datasets' partitioning as Dagster partitions definitions.

- Time windows: `TimeWindowPartitionsDefinition` over the dataset's cron, in UTC, with the key
  format `%Y%m%dT%H%M%SZ`, which is exactly the engine's partition key (`core.instants.format_key`)
  for a window start on a whole second (every cron tick is): a Dagster partition key and the lake's
  partition directory are the same string.
- Ledger ranges: `StaticPartitionsDefinition` of `range=START-END` keys (END inclusive) when
  `lastLedger` is given; an open-ended range becomes a `DynamicPartitionsDefinition` whose keys a
  sensor is to add as ledgers close (not built yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg

from pcbo_dagster.core.instants import format_key, to_datetime
from pcbo_dagster.datasets_config import DatasetConfig, LedgerRangePartitioning, TimeWindowPartitioning

#: Dagster's key format for time windows; renders a window start as the engine's partition key.
KEY_FORMAT = "%Y%m%dT%H%M%SZ"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Window:
    """One Dagster time partition: its key and bounds in microseconds since the epoch (UTC)."""

    key: str
    start_us: int
    end_us: int

    @property
    def length_us(self) -> int:
        return self.end_us - self.start_us


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


def ledger_range_partitions_def(
    dataset: DatasetConfig, partitioning: LedgerRangePartitioning
) -> dg.PartitionsDefinition:
    if partitioning.lastLedger is None:
        return dg.DynamicPartitionsDefinition(name=f"pcbo_{dataset.asset_name}_ledger_ranges")
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

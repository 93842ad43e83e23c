"""Datasets' partitioning as Dagster partitions definitions.

A Dagster partition key is the engine's partition key and the lake's partition directory: one
string, formatted and parsed by `core.partition_keys` only.

- Time windows: `TimeWindowPartitionsDefinition` over the dataset's cron, in UTC, with the key
  format `TIME_KEY_STRFTIME`, which renders a window start on a whole second (every cron tick is)
  exactly as `format_time_key` does; `windows_for_keys` checks each key against it.
- Ledger ranges: `StaticPartitionsDefinition` of the dataset's `LedgerGrid` keys when `lastLedger`
  is given; an open-ended range becomes a `DynamicPartitionsDefinition` whose keys the dataset's
  sensor (`backfill/sensors.py`) adds for every full partition the source holds. Keys are checked
  against the grid before a run uses them (`datasets.requests.ledger_spans_for_keys`).

Grouping keys into engine requests is Dagster-free: `datasets/requests.py`.
"""

from __future__ import annotations

import dagster as dg
from dagster._check import CheckError

from pcbo_dagster.core.instants import to_datetime, to_micros
from pcbo_dagster.core.partition_keys import TIME_KEY_STRFTIME, Window, format_time_key
from pcbo_dagster.datasets.config import DatasetConfig, LedgerRangePartitioning, TimeWindowPartitioning


def time_window_partitions_def(partitioning: TimeWindowPartitioning) -> dg.TimeWindowPartitionsDefinition:
    end_us = partitioning.end_us
    return dg.TimeWindowPartitionsDefinition(
        start=to_datetime(partitioning.start_us),
        end=None if end_us is None else to_datetime(end_us),
        cron_schedule=partitioning.cron,
        fmt=TIME_KEY_STRFTIME,
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
    """The windows of `keys` as Dagster's cron cuts them (any cron), in time order, each checked to
    be the engine's key of its start (`format_time_key`)."""
    windows = []
    for key in keys:
        window = partitions_def.time_window_for_partition_key(key)
        start_us, end_us = to_micros(window.start), to_micros(window.end)
        if format_time_key(start_us) != key:
            raise ValueError(
                f"Dagster partition key {key!r} is not the engine key {format_time_key(start_us)!r}"
            )
        windows.append(Window(key, start_us, end_us))
    return sorted(windows, key=lambda w: w.start_us)


#: The run tags that name a run's partitions: one key, or a range's two ends.
RUN_PARTITION_TAGS = (
    "dagster/partition",
    "dagster/asset_partition_range_start",
    "dagster/asset_partition_range_end",
)


def run_partition_keys(
    context: dg.OpExecutionContext | dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
    dataset_name: str,
) -> list[str]:
    """The run's partition keys, each of its partition tags one of them. Dagster rounds a time key off
    the cron grid (`...T013000Z` typed in the tags) to the next window, and a range end off it to the
    window holding it, so a run would write, check or roll back partitions its tags do not name: such
    a run fails naming the tag, nothing done. (A range that holds no key is the caller's to refuse.)"""
    tags = context.run.tags
    try:
        keys = list(context.partition_keys)
    except CheckError as exc:  # (a key past the partitions' end: Dagster's own invariant)
        named = ", ".join(f"{tag} {tags[tag]!r}" for tag in RUN_PARTITION_TAGS if tag in tags)
        raise dg.Failure(
            description=f"{dataset_name}: the run's tags ({named}) name no partition of the asset: {exc}; "
            "nothing was done",
            allow_retries=False,
        ) from None
    if keys:
        single, start, end = RUN_PARTITION_TAGS
        for tag, key in ((single, keys[0]), (start, keys[0]), (end, keys[-1])):
            value = tags.get(tag)
            if value is not None and value != key:
                raise dg.Failure(
                    description=f"{dataset_name}: the run's tag {tag} is {value!r}, not a partition key "
                    f"(Dagster would run {keys[0]}..{keys[-1]}); nothing was done",
                    allow_retries=False,
                )
    return keys


def adjacent_stretches(keys: list[str], order: list[str]) -> list[list[str]]:
    """`keys` (each one of `order`) in `order`, cut where a key of `order` not among them lies between."""
    position = {k: i for i, k in enumerate(order)}
    stretches: list[list[str]] = []
    for key in sorted(keys, key=position.__getitem__):
        if stretches and position[key] == position[stretches[-1][-1]] + 1:
            stretches[-1].append(key)
        else:
            stretches.append([key])
    return stretches

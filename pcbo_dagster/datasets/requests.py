"""Engine requests for partitions of a configured dataset (no Dagster here).

The one place where "these partition keys of this dataset" become engine requests (CONTRACT
section 1): the Dagster assets, the staged rollout and the CLI's rollout commands all come through
here. Keys are parsed by `core.partition_keys` and checked to be the dataset's (on its ledger grid,
among its hourly or daily windows), then grouped: a time-window request covers contiguous,
equal-length windows (`start`, `end`, `chunkSeconds`); a ledger request covers contiguous
`range=S-E` keys (`ledgerRange` with `first` = S of the first key, `end` = E+1 of the last,
`partitionSize` from the config), every one full but maybe the last. The engine then plans exactly
these keys.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import format_instant
from pcbo_dagster.core.partition_keys import LedgerSpan, PartitionKeyError, Window
from pcbo_dagster.core.request_model import MAX_PARTITIONS
from pcbo_dagster.datasets.config import (
    DatasetConfig,
    DatasetsConfig,
    LedgerRangePartitioning,
    TimeWindowPartitioning,
)
from pcbo_dagster.sources.record_files import resolve_uri

if TYPE_CHECKING:
    from pcbo_dagster.core.decisions import Decisions
    from pcbo_dagster.core.plan import Plan
    from pcbo_dagster.engine.request_loading import LoadedRequest

#: A partition of either kind, with its key and bounds.
Span = Window | LedgerSpan


def build_request(
    dataset: DatasetConfig,
    source_uri: str,
    run_id: str,
    windows: list[Window],
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """The engine request (CONTRACT section 1) covering `windows` (contiguous, equal length)."""
    return {
        "runId": run_id,
        "dataset": dataset.name,
        "versionLabel": dataset.versionLabel,
        "start": format_instant(windows[0].start_us),
        "end": format_instant(windows[-1].end_us),
        "chunkSeconds": windows[0].length_us // 1_000_000,
        **_request_tail(dataset, source_uri, metadata),
    }


def build_ledger_request(
    dataset: DatasetConfig,
    source_uri: str,
    run_id: str,
    spans: list[LedgerSpan],
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """The engine `ledgerRange` request covering `spans` (contiguous; all full but maybe the last)."""
    partitioning = dataset.partitioning
    assert isinstance(partitioning, LedgerRangePartitioning)
    return {
        "runId": run_id,
        "dataset": dataset.name,
        "versionLabel": dataset.versionLabel,
        "ledgerRange": {
            "field": partitioning.field,
            "first": spans[0].first,
            "end": spans[-1].end,
            "partitionSize": partitioning.partitionSize,
        },
        **_request_tail(dataset, source_uri, metadata),
    }


def _request_tail(dataset: DatasetConfig, source_uri: str, metadata: dict[str, Any]) -> dict[str, Any]:
    source: dict[str, Any] = {"uri": source_uri, "format": dataset.source.resolved_format()}
    # Always said: a request's own default is not to prune (every record of its source is part of
    # it), a dataset config's is to prune (a range run reads only its range of a large source).
    source["prune"] = dataset.source.prune
    tail = {
        "policies": dataset.policies.model_dump(),
        "source": source,
        "existingTargetIds": list(dataset.existingTargetIds),
        "metadata": metadata,
    }
    if dataset.table is not None:  # only when set: requests of other datasets stay as they were
        tail["table"] = dataset.table.model_dump(exclude_none=True)
    if dataset.target is not None:  # issue 15: a SQL table target
        tail["target"] = dataset.target.model_dump(exclude_none=True)
    return tail


def dataset_keys(dataset: DatasetConfig) -> list[str]:
    """Every partition key of a dataset with a fixed key list (closed hourly/daily or ledger range)."""
    return dataset.partitioning.keys()


def key_range(dataset: DatasetConfig, first_key: str, last_key: str) -> list[str]:
    """The dataset's keys from `first_key` to `last_key` (both included), in order; `InvalidInput`
    naming `from` / `to` when a key is not one of the dataset's or the range runs backwards."""
    try:
        keys = dataset_keys(dataset)
    except ValueError as exc:
        raise InvalidInput("dataset", f"{dataset.name}: {exc}") from None
    positions = {key: i for i, key in enumerate(keys)}
    for field, key in (("from", first_key), ("to", last_key)):
        if key not in positions:
            raise InvalidInput(
                field, f"{key!r} is not a partition key of {dataset.name} ({keys[0]} .. {keys[-1]})"
            )
    lo, hi = positions[first_key], positions[last_key]
    if hi < lo:
        raise InvalidInput("to", f"{last_key!r} comes before {first_key!r}")
    return keys[lo : hi + 1]


def time_windows_for_keys(partitioning: TimeWindowPartitioning, keys: list[str]) -> list[Window]:
    """The windows of `keys` of an hourly or daily dataset, in time order, each checked to be one of
    the dataset's windows (`PartitionKeyError` naming it). (Dagster's own windows, for any cron:
    `dagster_defs.partitions.windows_for_keys`.)"""
    return sorted((partitioning.window_of_key(key) for key in keys), key=lambda w: w.start_us)


def ledger_spans_for_keys(partitioning: LedgerRangePartitioning, keys: list[str]) -> list[LedgerSpan]:
    """The ledger spans of `keys`, in ledger order, each checked to be a partition of the dataset's grid.

    A key off the grid (a dynamic key added by hand, say `range=3-66` for firstLedger 2) would make the
    engine plan other partitions than Dagster's: it is refused with a `PartitionKeyError` naming it.
    """
    grid = partitioning.grid
    return sorted((grid.span_of_key(key) for key in keys), key=lambda s: s.first)


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


def partition_groups(
    dataset: DatasetConfig, spans: Sequence[Span], max_partitions: int = MAX_PARTITIONS
) -> list[list[Window]] | list[list[LedgerSpan]]:
    """A dataset's partitions (in order: windows, or ledger spans) as groups, one engine request
    each (`request_for_group`)."""
    partitioning = dataset.partitioning
    if isinstance(partitioning, LedgerRangePartitioning):
        spans = cast(list[LedgerSpan], spans)
        return ledger_request_groups(spans, partitioning.partitionSize, max_partitions)
    return request_groups(cast(list[Window], spans), max_partitions)


def request_for_group(
    dataset: DatasetConfig, source_uri: str, run_id: str, group: Sequence[Span], metadata: dict[str, Any]
) -> dict[str, Any]:
    """The engine request of one group of `partition_groups`."""
    if isinstance(dataset.partitioning, LedgerRangePartitioning):
        return build_ledger_request(dataset, source_uri, run_id, cast(list[LedgerSpan], group), metadata)
    return build_request(dataset, source_uri, run_id, cast(list[Window], group), metadata)


def request_for_keys(
    dataset: DatasetConfig, source_uri: str, run_id: str, keys: list[str], metadata: dict[str, Any]
) -> dict[str, Any]:
    """One engine request covering `keys`, contiguous keys of a closed hourly/daily or ledger dataset;
    `InvalidInput` naming `partitions` for a key that is not one of the dataset's or keys that are
    not one contiguous range."""
    partitioning = dataset.partitioning
    if isinstance(partitioning, TimeWindowPartitioning) and partitioning.fixed_window_seconds is None:
        raise InvalidInput("dataset", f"{dataset.name}: only hourly or daily windows have one request")
    try:
        spans: Sequence[Span] = (
            time_windows_for_keys(partitioning, keys)
            if isinstance(partitioning, TimeWindowPartitioning)
            else ledger_spans_for_keys(partitioning, keys)
        )
    except PartitionKeyError as exc:
        raise InvalidInput("partitions", str(exc)) from None
    groups = partition_groups(dataset, spans, len(spans))
    if len(groups) != 1:
        raise InvalidInput(
            "partitions", f"{dataset.name}: the keys are not one contiguous range of partitions"
        )
    return request_for_group(dataset, source_uri, run_id, groups[0], metadata)


def evaluate_keys(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    keys: list[str],
    run_id: str,
    metadata: dict[str, Any] | None = None,
    source_base: Path | None = None,
) -> tuple[LoadedRequest, Plan, Decisions]:
    """Load and evaluate the one engine request covering `keys` (nothing written). The source URI
    resolves against `source_base`, else the datasets config's `sources_dir`."""
    from pcbo_dagster.engine.request_loading import evaluate, load_request

    source_uri = resolve_uri(dataset.source.uri, source_base or config.sources_dir)
    request = request_for_keys(dataset, source_uri, run_id, keys, metadata or {})
    loaded = load_request(json.dumps(request).encode("utf-8"))
    plan, decisions = evaluate(loaded)
    return loaded, plan, decisions

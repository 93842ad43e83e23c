"""Engine requests for partitions of a configured dataset (no Dagster here).

The Dagster assets, the staged rollout and the CLI's rollout commands all turn "these partition keys
of this dataset" into the engine request of CONTRACT section 1 through these functions: one data
path. A time-window request covers contiguous, equal-length windows (`start`, `end`,
`chunkSeconds`); a ledger request covers contiguous `range=S-E` keys (`ledgerRange` with `first` =
S of the first key, `end` = E+1 of the last, `partitionSize` from the config).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import format_instant
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


@dataclass(frozen=True)
class Window:
    """One time partition: its key and bounds in microseconds since the epoch (UTC)."""

    key: str
    start_us: int
    end_us: int

    @property
    def length_us(self) -> int:
        return self.end_us - self.start_us


@dataclass(frozen=True)
class LedgerSpan:
    """One ledger-range partition: its key and ledgers [first, end) (end exclusive)."""

    key: str
    first: int
    end: int

    @property
    def last(self) -> int:
        return self.end - 1

    @property
    def length(self) -> int:
        return self.end - self.first


#: A ledger-range partition key: `range=<first ledger>-<last ledger>` (both inclusive, decimal).
LEDGER_KEY = re.compile(r"^range=(0|[1-9][0-9]*)-(0|[1-9][0-9]*)$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    if not dataset.source.prune:  # only when off: requests (and their hashes) stay as they were
        source["prune"] = False
    return {
        "policies": dataset.policies.model_dump(),
        "source": source,
        "existingTargetIds": list(dataset.existingTargetIds),
        "metadata": metadata,
    }


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


def request_for_keys(
    dataset: DatasetConfig, source_uri: str, run_id: str, keys: list[str], metadata: dict[str, Any]
) -> dict[str, Any]:
    """One engine request covering `keys`, contiguous keys of a closed hourly/daily or ledger dataset."""
    partitioning = dataset.partitioning
    if isinstance(partitioning, TimeWindowPartitioning):
        seconds = partitioning.fixed_window_seconds
        if seconds is None:
            raise InvalidInput("dataset", f"{dataset.name}: only hourly or daily windows have one request")
        windows = []
        for key in keys:
            start = datetime.strptime(key, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            start_us = (start - _EPOCH) // timedelta(microseconds=1)
            windows.append(Window(key, start_us, start_us + seconds * 1_000_000))
        return build_request(dataset, source_uri, run_id, windows, metadata)
    spans = []
    for key in keys:
        match = LEDGER_KEY.match(key)
        if match is None:
            raise InvalidInput("partitions", f"{key!r} is not of the form range=FIRST-LAST")
        spans.append(LedgerSpan(key, int(match.group(1)), int(match.group(2)) + 1))
    return build_ledger_request(dataset, source_uri, run_id, spans, metadata)


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

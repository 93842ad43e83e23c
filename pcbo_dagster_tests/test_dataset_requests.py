"""`datasets/requests.py`: the keys of a configured dataset become one engine request whose plan has
exactly those keys, and keys that are not the dataset's (or not one contiguous range) are refused."""

from __future__ import annotations

import pytest

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.plan import build_plan
from pcbo_dagster.core.request_model import validate_request
from pcbo_dagster.datasets.config import parse_datasets_config
from pcbo_dagster.datasets.requests import request_for_keys

CONFIG = """
datasets:
  - name: events
    partitioning:
      {kind: time_window, cron: hourly, start: "2024-01-01T00:30:00Z", end: "2024-01-02T00:00:00Z"}
    source: {uri: events.jsonl}
  - name: ledgers
    partitioning: {kind: ledger_range, firstLedger: 2, partitionSize: 64, lastLedger: 600}
    source: {uri: ledgers.jsonl}
"""


def _planned_keys(request: dict) -> list[str]:
    inline = {k: v for k, v in request.items() if k != "source"} | {"sourceRecords": []}
    return [p.key for p in build_plan(validate_request(inline), []).partitions]


@pytest.mark.parametrize("name", ["events", "ledgers"])
def test_a_contiguous_range_of_keys_is_one_request_planning_exactly_them(name: str) -> None:
    dataset = parse_datasets_config(CONFIG).dataset(name)
    keys = dataset.partitioning.keys()
    for chosen in (keys[:1], keys[3:7], keys[-2:], keys):
        request = request_for_keys(dataset, "/d/source.jsonl", "run-1", list(reversed(chosen)), {})
        assert _planned_keys(request) == chosen


@pytest.mark.parametrize(
    ("name", "keys", "why"),
    [
        ("events", ["20240101T000000Z"], "not a window"),  # before the first tick after start
        ("events", ["20240101T013000Z"], "not a window"),  # off the hourly ticks
        ("events", ["20240102T000000Z"], "not a window"),  # past the end
        ("events", ["20240101T010000Z", "20240101T030000Z"], "contiguous"),
        ("events", ["range=2-65"], "not a time key"),
        ("events", ["20240101T010000Z/.."], "not a time key"),
        ("ledgers", ["range=3-66"], "not a partition"),
        ("ledgers", ["range=578-641"], "not a partition"),  # the last one is cut at 600
        ("ledgers", ["range=2-65", "range=130-193"], "contiguous"),
        ("ledgers", ["../range=2-65"], "range=FIRST-LAST"),
    ],
)
def test_keys_that_are_not_the_datasets_are_invalid_input(name: str, keys: list[str], why: str) -> None:
    dataset = parse_datasets_config(CONFIG).dataset(name)
    with pytest.raises(InvalidInput, match=why) as caught:
        request_for_keys(dataset, "/d/source.jsonl", "run-1", keys, {})
    assert caught.value.field == "partitions"

"""Issue 18 (speed) in deciding, columns, Merkle roots and the post-write check: each fast path gives
exactly what the contract's formula (or the slow path it replaced) gives, computed here independently
(`rfc8785` + `hashlib`), however its input is cut into chunks."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from pcbo_dagster.core.plan import build_plan
from pcbo_dagster.core.request_model import validate_request

REQUEST: dict[str, Any] = {
    "runId": "run-1",
    "dataset": "events",
    "start": "2024-01-01T00:00:00Z",
    "end": "2024-01-01T03:00:00Z",
    "chunkSeconds": 3600,
    "sourceRecords": [],
}


def _contract_plan_hash(hexes: list[str]) -> str:
    """CONTRACT section 3's planHash for REQUEST (default policies) over the records' hex digests."""
    document: dict[str, Any] = {
        "v": "pcbo.plan/1",
        "dataset": "events",
        "versionLabel": "v1",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-01T03:00:00Z",
        "chunkSeconds": 3600,
        "policies": {
            "requireConsent": True,
            "allowedJurisdictions": None,
            "retentionCutoff": None,
            "onViolation": "omit",
        },
        "existingTargetIds": [],
        "records": sorted(hexes),
    }
    return "sha256:" + hashlib.sha256(rfc8785.dumps(document)).hexdigest()


@settings(max_examples=60, deadline=None)
@given(
    digests=st.lists(st.binary(min_size=32, max_size=32), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
)
def test_streamed_plan_hash_is_the_contract_hash_however_the_digests_are_chunked(
    digests: list[bytes], cuts: list[int]
) -> None:
    """`build_plan` over raw digests in (k, 32) chunks (empty chunks included) hashes the same text as
    the contract's document with every digest's hex text in `records`."""
    request = validate_request(REQUEST)
    ordered = sorted(digests)
    rows = np.frombuffer(b"".join(ordered), np.uint8).reshape(-1, 32)
    bounds = [0, *sorted(min(c, len(ordered)) for c in cuts), len(ordered)]
    chunks = [rows[lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)]
    expected = _contract_plan_hash([d.hex() for d in digests])
    assert build_plan(request, iter(chunks)).plan_hash == expected
    assert build_plan(request, [d.hex() for d in digests]).plan_hash == expected

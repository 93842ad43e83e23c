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


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.lists(st.integers(min_value=0, max_value=3), max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(
    fields=st.lists(
        st.dictionaries(st.sampled_from(["a", "b", "c", "consentGranted"]), _VALUES, max_size=4),
        min_size=1,
        max_size=12,
    ),
    data=st.data(),
)
def test_added_columns_in_any_output_order_are_the_rows_own(fields: list[dict[str, Any]], data: Any) -> None:
    """`AddedColumns` pulls the fields out in input order and puts each column in output order: for
    any output order (a permutation of some of the records), every chunk's prebuilt columns give the
    table the records themselves give (`build_table` of the plain rows), with `run_schema`'s schema."""
    import pyarrow as pa

    from pcbo_dagster.core.record_table import AddedColumns, PrebuiltRows, build_table, run_schema

    records = [{"id": f"r{i}", **f} for i, f in enumerate(fields)]
    picked = data.draw(st.lists(st.sampled_from(range(len(records))), min_size=1, unique=True))
    locators = np.array(picked, dtype=np.int64)
    rows = [records[i] for i in picked]
    added = AddedColumns(rows, locators, len(records))
    assert (added.schema, added.as_json) == run_schema(rows)
    cut = data.draw(st.integers(min_value=0, max_value=len(picked)))
    for chunk in (locators, locators[:cut], locators[cut:]):
        plain = [records[i] for i in chunk.tolist()]
        prebuilt = added.rows_for(plain, chunk)
        assert isinstance(prebuilt, PrebuiltRows) or not len(chunk)
        ids = [r["id"] for r in plain]
        occurred = np.arange(len(plain), dtype=np.int64)
        retention = pa.array([None] * len(plain), pa.int64())
        expected = build_table(plain, ids, occurred, retention, added.schema, added.as_json)
        assert build_table(prebuilt, ids, occurred, retention, added.schema, added.as_json).equals(expected)


_MICROS = st.integers(min_value=-62_135_596_800_000_000, max_value=253_402_300_799_999_999)


@settings(max_examples=60, deadline=None)
@given(
    occurred=st.lists(_MICROS, min_size=1, max_size=20),
    retention=st.lists(st.one_of(st.none(), _MICROS), min_size=21, max_size=21),
    offset=st.integers(min_value=0, max_value=1),
)
def test_build_table_timestamps_are_the_microseconds_given(
    occurred: list[int], retention: list[int | None], offset: int
) -> None:
    """`build_table`'s `occurredAt` and `retentionExpiresAt` hold exactly the microseconds given (nulls
    kept), for an int64 retention array reinterpreted in place (a slice of one too, as execute passes)
    and for one of another type or a chunked one (cast): the same table, and the same parquet bytes."""
    import pyarrow as pa

    from pcbo_dagster.core.record_table import TIMESTAMP, build_table, run_schema
    from pcbo_dagster.lake import parquet_files

    n = len(occurred)
    rows = [{"id": f"r{i}"} for i in range(n)]
    ids = [r["id"] for r in rows]
    schema, as_json = run_schema(rows)
    kept = retention[offset : offset + n]
    sliced = pa.array(retention, pa.int64()).slice(offset, n)
    at = np.array(occurred, np.int64)
    tables = [
        build_table(rows, ids, at, retention_us, schema, as_json)
        for retention_us in (
            sliced,
            pa.array(kept, pa.int64()),
            pa.array(kept, pa.decimal128(19, 0)),
            pa.chunked_array([kept], pa.int64()),
        )
    ]
    for table in tables:
        assert table.column("occurredAt").to_pylist() == pa.array(occurred, TIMESTAMP).to_pylist()
        assert table.column("retentionExpiresAt").to_pylist() == pa.array(kept, TIMESTAMP).to_pylist()
        assert table.equals(tables[0])
        assert parquet_files.encode(table) == parquet_files.encode(tables[0])

"""A record file named by `source` is streamed (read in batches, records re-read by position), and
its dry-run and execute documents are byte for byte those of the equivalent inline request: plan and
decision hashes, every decision, the written files' checksums and the manifests.

The batch size is made small (`PCBO_SOURCE_BATCH=7`) so that batches, duplicates and partitions
cross batch boundaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pcbo_dagster.cli.main import main
from pcbo_dagster.sources.record_files import jsonable_row
from pcbo_dagster_tests.csv_files import parse_csv

BASE = {
    "runId": "streamed-run",
    "dataset": "events",
    "versionLabel": "v1",
    "start": "2024-01-01T00:00:00Z",
    "end": "2024-01-05T00:00:00Z",
    "chunkSeconds": 86400,
    "policies": {
        "requireConsent": True,
        "allowedJurisdictions": ["US", "ca"],
        "retentionCutoff": "2024-06-01T00:00:00Z",
        "onViolation": "omit",
    },
    "existingTargetIds": ["legacy-3"],
}


def _records() -> list[dict[str, Any]]:
    """Flat records (every format can hold them): valid ones over four days, duplicates (equal and
    not), out-of-window ones, invalid ones and policy omissions."""
    records: list[dict[str, Any]] = []
    for i in range(60):
        record: dict[str, Any] = {
            "id": f"r-{i % 47}",  # ids 0-12 occur twice
            "occurredAt": f"2024-01-0{1 + i % 4}T{i % 24:02d}:15:00Z",
            "consentGranted": i % 9 != 0,
            "jurisdiction": ["US", "ca", " us ", "FR"][i % 4],
            "amount": i * 3,
            "note": f"note {i}, with a comma",
        }
        if i % 5 == 0:
            record["retentionExpiresAt"] = ["2030-01-01T00:00:00Z", "2020-01-01T00:00:00Z"][i % 2]
        records.append(record)
    records.append(dict(records[5], id="r-same"))
    records.append(dict(records[5], id="r-same"))  # the same record twice: one copy is added
    records.append({"id": "legacy-3", "occurredAt": "2024-01-02T00:00:00Z", "consentGranted": True})
    records.append({"id": "late", "occurredAt": "2024-02-01T00:00:00Z", "consentGranted": True})
    records.append({"id": "early", "occurredAt": "2023-12-31T23:59:59Z", "consentGranted": True})
    records.append({"occurredAt": "2024-01-02T00:00:00Z", "note": "no id"})
    records.append({"id": "bad-time", "occurredAt": "yesterday"})
    records.append({"id": "", "occurredAt": "2024-01-02T00:00:00Z"})
    records.append({"id": "bad-retention", "occurredAt": "2024-01-02T00:00:00Z", "retentionExpiresAt": "x"})
    records.append({"id": "no-time", "consentGranted": True, "jurisdiction": "US"})
    return records


def _run(tmp: Path, name: str, request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    request_path = folder / "request.json"
    request_path.write_text(json.dumps(request), encoding="utf-8")
    dry_path, exec_path, home = folder / "dry.json", folder / "exec.json", folder / "home"
    assert main(["dry-run", "--input", str(request_path), "--output", str(dry_path)]) == 0
    status = main(["execute", "--input", str(request_path), "--home", str(home), "--output", str(exec_path)])
    executed_text = exec_path.read_text(encoding="utf-8").replace(str(home.resolve()), "<home>")
    executed = json.loads(executed_text)
    for part in executed["partitions"]:
        # the audit event names its home's lake (and its time): the only part that differs
        assert part.pop("eventHash").startswith("sha256:")
    return json.loads(dry_path.read_text(encoding="utf-8")), executed, status


def _write_source(tmp: Path, fmt: str, records: list[dict[str, Any]]) -> tuple[Path, list[Any]]:
    """The source file, and the records as the inline request holds them."""
    path = tmp / f"source.{fmt}"
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in records]
        lines.insert(3, "")  # blank lines are skipped
        lines.insert(10, "[1, 2]")  # not an object: an invalid record
        path.write_bytes(("\r\n".join(lines[:20]) + "\n" + "\n".join(lines[20:]) + "\n").encode("utf-8"))
        inline: list[Any] = [json.loads(line) for line in lines if line.strip()]
        return path, inline
    if fmt == "csv":
        names = sorted({k for r in records for k in r})
        rows = [",".join(names)]
        for r in records:
            cells = []
            for name in names:
                value = r.get(name)
                text = "" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)
                cells.append(f'"{text}"' if "," in text else text)
            rows.append(",".join(cells))
        data = ("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8")
        path.write_bytes(data)
        return path, parse_csv(data)
    table = pa.Table.from_pylist(records)
    pq.write_table(table, path, row_group_size=11)
    return path, [jsonable_row(row) for row in pq.read_table(path).to_pylist()]


@pytest.mark.parametrize("batch", ["7", ""])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_streamed_source_matches_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, batch: str
) -> None:
    if batch:
        monkeypatch.setenv("PCBO_SOURCE_BATCH", batch)
    path, inline = _write_source(tmp_path, fmt, _records())
    streamed_dry, streamed_exec, streamed_status = _run(
        tmp_path, "streamed", {**BASE, "source": {"uri": str(path), "format": fmt}}
    )
    inline_dry, inline_exec, inline_status = _run(tmp_path, "inline", {**BASE, "sourceRecords": inline})
    assert streamed_status == inline_status == 0
    assert streamed_dry == inline_dry
    assert streamed_exec == inline_exec
    totals = streamed_dry["totals"]
    assert totals["add"] > 0 and totals["byReason"]["INVALID_RECORD"] >= 5
    assert totals["byReason"]["OUT_OF_WINDOW"] == 2 and totals["byReason"]["DUPLICATE_ID"] > 0


def test_csv_quoted_newlines_and_offsets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quoted cell spanning lines, CR-only and CRLF line ends: rows are re-read from their offsets."""
    monkeypatch.setenv("PCBO_SOURCE_BATCH", "2")
    data = (
        b"id,occurredAt,consentGranted,note,n\r\n"
        b'a,2024-01-01T01:00:00Z,true,"two\nlines",1\r'
        b"b,2024-01-02T01:00:00Z,true,plain,2\n"
        b"\n"
        b'c,2024-01-03T01:00:00Z,true,"with ""quotes"", and comma",x\r\n'
        b"d,2024-01-03T02:00:00Z,true,,3\n"
    )
    path = tmp_path / "s.csv"
    path.write_bytes(data)
    policies = {"requireConsent": True, "onViolation": "omit"}
    base = {**BASE, "policies": policies, "existingTargetIds": []}
    streamed = _run(tmp_path, "streamed", {**base, "source": {"uri": str(path)}})
    inline = _run(tmp_path, "inline", {**base, "sourceRecords": parse_csv(data)})
    assert streamed == inline
    assert streamed[0]["totals"]["add"] == 4


def test_parquet_batches_say_when_they_need_careful_hashing() -> None:
    """A parquet batch takes the fast RFC 8785 path unless it may hold a float or an integer beyond
    +-(2**53 - 1) (or a nested or dictionary column, which is not looked into)."""
    from pcbo_dagster.sources.streaming import _may_hold_floats_or_big_ints as risky

    def batch(**columns: Any) -> pa.RecordBatch:
        return pa.RecordBatch.from_pydict(columns)

    assert not risky(
        batch(id=["a", "b"], n=[1, -(2**53 - 1)], ok=[True, None], at=pa.array([0, 1], pa.timestamp("us")))
    )
    assert not risky(batch(n=pa.array([None, None], pa.int64())))
    assert risky(batch(n=[1, 2**53]))
    assert risky(batch(n=[-(2**53), 0]))
    assert risky(batch(x=[1.0, 2.0]))
    assert risky(batch(tags=[[1], [2]]))
    assert risky(batch(kind=pa.array(["a", "b"]).dictionary_encode()))


def test_parquet_re_reads_keep_decoded_row_groups_within_one_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row groups decoded for re-reads are kept, least recently used let go of beyond one budget for
    the whole process; what `fetch` returns does not depend on what is kept."""
    from pcbo_dagster.sources import streaming

    records = [{"id": f"r-{i}", "n": i, "text": "x" * 50} for i in range(4_000)]
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=1_000)
    expected = [jsonable_row(r) for r in pa.Table.from_pylist(records).to_pylist()]
    one_group = pa.Table.from_pylist(records[:1000]).nbytes
    # all kept; about one; none but the last; groups too large to keep (decoded each time, in part)
    for budget, limit in (
        (10 * one_group, 20 * one_group),
        (int(1.5 * one_group), 2 * one_group),
        (1, 2 * one_group),
        (1, 1),
    ):
        groups = streaming._DecodedGroups(budget)
        monkeypatch.setattr(streaming, "_DECODED_GROUPS", groups)
        monkeypatch.setattr(streaming, "PARQUET_CACHE_BYTES", limit)
        source = streaming.ParquetSource(str(path), "groups.parquet")
        _, _, locators = zip(*source.batches(512), strict=True)
        positions = np.concatenate(locators)
        picked = np.random.default_rng(3).permutation(positions)[:1500]
        for lo in range(0, len(picked), 100):  # as partitions would take them
            chunk = picked[lo : lo + 100]
            assert source.fetch(chunk) == [expected[i] for i in chunk.tolist()]
            assert groups.held <= max(budget, 1.2 * one_group)
        assert (groups.held > 0) == (limit > 1)

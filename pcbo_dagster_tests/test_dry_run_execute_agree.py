"""Dry-run and execute agree (CONTRACT sections 2, 3, 5 and 7), as a property over generated requests.

Each example runs `pcbo dry-run` and `pcbo execute` in-process into a fresh home, then checks that the
ids written to each partition's parquet file(s) are exactly the dry-run's `add` list, that hashes and
counts agree, and that each partition's Merkle root equals an RFC 6962 root computed here with hashlib.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pcbo_dagster.cli.main import main

START_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
IDS = ["a", "b", "B", "é", "😀", "\uff21", "z-9", "legacy"]
CUTOFF = "2024-06-01T00:00:00Z"
FUTURE = ["2030-01-01T00:00:00Z", "2031-01-01T12:00:00-07:00", "2024-06-01T00:00:00.000001Z"]
RETENTIONS = [
    None,
    CUTOFF,
    "2024-06-01T00:00:00.000001Z",
    "2020-01-01T00:00:00Z",
    "2030-01-01T12:00:00+02:00",
]


# ----------------------------------------------------------------------------------------------------------
# an independent RFC 6962 Merkle tree hash


def rfc6962_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2  # the largest power of two smaller than n
    return hashlib.sha256(b"\x01" + rfc6962_root(leaves[:k]) + rfc6962_root(leaves[k:])).digest()


def test_rfc6962_root_helper_matches_known_values() -> None:
    # Sanity checks of the helper itself: the empty tree and a one-leaf tree from RFC 6962's definitions.
    assert rfc6962_root([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert rfc6962_root([b""]).hex() == hashlib.sha256(b"\x00").hexdigest()
    three = [b"a", b"b", b"c"]
    ab = hashlib.sha256(b"\x01" + rfc6962_root([b"a"]) + rfc6962_root([b"b"])).digest()
    assert rfc6962_root(three) == hashlib.sha256(b"\x01" + ab + rfc6962_root([b"c"])).digest()


# ----------------------------------------------------------------------------------------------------------
# generated requests


def _instant(micros: int, offset_minutes: int) -> str:
    """`micros` since the epoch written in local time at `offset_minutes` from UTC."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    local = moment.astimezone(timezone(timedelta(minutes=offset_minutes)))
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if local.microsecond:
        text += f".{local.microsecond:06d}"
    if offset_minutes == 0:
        return text + "Z"
    sign = "+" if offset_minutes > 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    chunk = draw(st.sampled_from([600, 1800, 3600]))
    n_parts = draw(st.integers(1, 4))
    tail = draw(st.sampled_from([0, 0, 1, chunk // 3]))
    span_us = (chunk * (n_parts - 1) + (tail or chunk)) * 1_000_000
    end_us = START_US + span_us

    records: list[Any] = []
    used_ids: list[str] = []
    for n in range(draw(st.integers(0, 16) | st.integers(4, 16))):
        kind = draw(st.integers(0, 31))
        if kind == 0:
            records.append(draw(st.sampled_from([7, "text", None, [1, 2]])))
            continue
        # Mostly distinct ids; now and then an id reused by a record that differs (DUPLICATE_ID).
        if used_ids and kind == 5:
            rid = draw(st.sampled_from(used_ids))
        else:
            rid = draw(st.sampled_from(IDS)) + ("" if n < 2 else str(n))
        used_ids.append(rid)
        record: dict[str, Any] = {"id": rid}
        if kind == 1:
            record["id"] = draw(st.sampled_from(["", 5, None]))
        if kind == 2:
            at_us = draw(st.sampled_from([START_US - 1, end_us, end_us + 10**9, START_US - 10**9]))
        else:
            at_us = draw(st.integers(START_US, end_us - 1))
        offset = draw(st.sampled_from([0, 0, 330, -300, 60]))
        record["occurredAt"] = _instant(at_us, offset)
        if kind == 3:
            record["occurredAt"] = draw(st.sampled_from(["2024-01-01T00:10:00", "soon", 12]))
        if kind == 4:
            record["retentionExpiresAt"] = "2025-01-01"
        elif draw(st.integers(0, 3)):
            # Mostly a record that every policy lets through (with varied spellings).
            record["retentionExpiresAt"] = draw(st.sampled_from(FUTURE))
            record["consentGranted"] = True
            record["jurisdiction"] = draw(st.sampled_from(["US", " us", "US\t"]))
        else:
            if draw(st.integers(0, 3)):
                record["retentionExpiresAt"] = draw(st.sampled_from(RETENTIONS))
            consent = draw(st.sampled_from([True, True, False, None, "true", "absent"]))
            if consent != "absent":
                record["consentGranted"] = consent
            jurisdiction = draw(st.sampled_from(["US", " ca ", "CA", "MX", 3, "absent"]))
            if jurisdiction != "absent":
                record["jurisdiction"] = jurisdiction
        # Other fields: the same JSON type per field across records, or a mixture (canonical JSON text).
        if draw(st.booleans()):
            record["amount"] = draw(st.integers(-(2**53 - 1), 2**53 - 1))
        if draw(st.booleans()):
            record["note"] = draw(st.text(max_size=5))
        if draw(st.integers(0, 4)) == 0:
            record["extra"] = draw(st.sampled_from([1.5, "x", {"k": [1, None]}, True]))
        records.append(record)
        if draw(st.integers(0, 5)) == 0:
            records.append(copy.deepcopy(record))  # an identical copy

    policies: dict[str, Any] = {}
    if draw(st.booleans()):
        policies["requireConsent"] = draw(st.booleans())
    allowed = draw(st.sampled_from(["absent"] * 3 + [None, [], ["US"]] + [["us", "CA "]] * 4))
    if allowed != "absent":
        policies["allowedJurisdictions"] = allowed
    cutoff = draw(st.sampled_from(["absent", None, CUTOFF]))
    if cutoff != "absent":
        policies["retentionCutoff"] = cutoff
    policies["onViolation"] = draw(st.sampled_from(["omit"] * 5 + ["block"]))

    return {
        "runId": "prop-run",
        "dataset": "events",
        "versionLabel": "v1",
        "start": _instant(START_US, draw(st.sampled_from([0, 330]))),
        "end": _instant(end_us, 0),
        "chunkSeconds": chunk,
        "policies": policies,
        "sourceRecords": records,
        "existingTargetIds": draw(st.lists(st.sampled_from(used_ids or IDS), max_size=1)),
        "metadata": {"initiator": "hypothesis"},
    }


# ----------------------------------------------------------------------------------------------------------


FIXED_COLUMNS = ("id", "occurredAt", "retentionExpiresAt")
POLICY_REASONS = ("CONSENT_MISSING", "JURISDICTION_NOT_ALLOWED", "RETENTION_EXPIRED")


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _field_kinds(records: list[dict[str, Any]], name: str) -> set[type]:
    return {type(r[name]) for r in records if r.get(name) is not None}


def _assert_row_matches(
    row: dict[str, Any], copies: list[dict[str, Any]], json_text_fields: set[str], schema: pa.Schema
) -> None:
    """The written row holds the values of its (single, or identical) source record."""
    record = copies[0]
    assert all(json.dumps(c, sort_keys=True) == json.dumps(record, sort_keys=True) for c in copies)
    assert row["occurredAt"] == _utc(record["occurredAt"])
    retention = record.get("retentionExpiresAt")
    assert row["retentionExpiresAt"] == (None if retention is None else _utc(retention))
    for name in schema.names:
        if name in FIXED_COLUMNS:
            continue
        value, cell = record.get(name), row[name]
        if value is None:
            assert cell is None, name
        elif name in json_text_fields:
            assert json.loads(cell) == value, name
        elif pa.types.is_floating(schema.field(name).type):
            assert cell == float(value), name
        else:
            assert cell == value and type(cell) is type(value), name
    assert set(record) <= set(schema.names)


def _read_file(uri: str) -> tuple[pa.Table, bytes]:
    """The parquet table at a `file://` URI from the execute output, and the file's bytes."""
    parsed = urlparse(uri)
    assert parsed.scheme == "file", uri
    data = Path(unquote(parsed.path)).read_bytes()
    return pq.read_table(pa.BufferReader(data)), data


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request=requests())
def test_dry_run_and_execute_agree(request: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="pcbo-prop-") as tmp:
        tmp_path = Path(tmp)
        request_path = tmp_path / "request.json"
        request_path.write_text(json.dumps(request))
        dry_path, exec_path, home = tmp_path / "dry.json", tmp_path / "exec.json", tmp_path / "home"

        assert main(["dry-run", "--input", str(request_path), "--output", str(dry_path)]) == 0
        dry = json.loads(dry_path.read_text())
        status = main(
            ["execute", "--input", str(request_path), "--home", str(home), "--output", str(exec_path)]
        )
        executed = json.loads(exec_path.read_text())

        has_breach = any(
            set(o["reasons"]) & set(POLICY_REASONS) for p in dry["partitions"] for o in p["omit"]
        )
        event("blocked" if request["policies"]["onViolation"] == "block" and has_breach else "executed")
        event(f"adds: {min(dry['totals']['add'], 3)}{'+' if dry['totals']['add'] >= 3 else ''}")
        if request["policies"]["onViolation"] == "block" and has_breach:
            assert status == 3
            assert executed["status"] == "blocked"
            assert executed["gate"] == "onViolation"
            assert executed["decisionHash"] == dry["decisionHash"]
            breaches = sorted((b["partition"], b["id"], b["reasons"]) for b in executed["breaches"])
            expected = sorted(
                (p["key"], o["id"], [r for r in o["reasons"] if r in POLICY_REASONS])
                for p in dry["partitions"]
                for o in p["omit"]
                if set(o["reasons"]) & set(POLICY_REASONS)
            )
            assert breaches == expected
            assert not home.exists()
            return

        assert status == 0
        assert executed["status"] == "committed"
        assert executed["planHash"] == dry["planHash"]
        assert executed["decisionHash"] == dry["decisionHash"]
        assert executed["reconciliation"]["status"] == "ok"
        for key, value in dry["totals"].items():
            assert executed["totals"][key] == value, key

        assert [p["key"] for p in executed["partitions"]] == [p["key"] for p in dry["partitions"]]
        records_by_id: dict[str, list[dict[str, Any]]] = {}
        for record in request["sourceRecords"]:
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records_by_id.setdefault(record["id"], []).append(record)

        added_records = [records_by_id[i][0] for p in dry["partitions"] for i in p["add"]]
        json_text_fields = {
            name
            for record in added_records
            for name, value in record.items()
            if name not in FIXED_COLUMNS and value is not None and not isinstance(value, str)
        }
        json_text_fields = {
            name
            for name in json_text_fields
            if _field_kinds(added_records, name) not in ({bool}, {int}, {int, float}, {float})
        }
        schemas = set()
        for planned, written in zip(dry["partitions"], executed["partitions"], strict=True):
            assert (written["start"], written["end"]) == (planned["start"], planned["end"])
            ids: list[str] = []
            for entry in written["files"]:
                table, data = _read_file(entry["uri"])
                file_ids = table["id"].to_pylist()
                assert entry["checksum"] == "sha256:" + hashlib.sha256(data).hexdigest()
                assert entry["byteSize"] == len(data)
                assert entry["rowCount"] == table.num_rows == len(file_ids)
                schemas.add(table.schema.remove_metadata())
                assert table.schema.field("id").type == pa.string()
                assert table.schema.field("occurredAt").type == pa.timestamp("us", tz="UTC")
                # Rows lie in the partition's window, and carry their record's values.
                lo, hi = _utc(planned["start"]), _utc(planned["end"])
                for row in table.to_pylist():
                    assert lo <= row["occurredAt"] < hi
                    _assert_row_matches(row, records_by_id[row["id"]], json_text_fields, table.schema)
                ids.extend(file_ids)
            assert ids == planned["add"]
            assert ids == sorted(ids, key=lambda s: s.encode("utf-8"))
            assert written["recordCount"] == len(planned["add"]) == planned["counts"]["add"]
            assert planned["counts"]["source"] == planned["counts"]["add"] + planned["counts"]["omit"]
            root = rfc6962_root([i.encode("utf-8") for i in planned["add"]])
            assert written["merkleRoot"] == "sha256:" + root.hex()
        # Every partition of a run has the same schema.
        assert len(schemas) <= 1

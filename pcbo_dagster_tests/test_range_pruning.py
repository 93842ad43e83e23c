"""Range runs read only their range (issue 14): JSONL, CSV and parquet sources pruned by zones
(`sources/zones.py`), exactly: a zone is skipped only when every record of it has a placement value
and they all lie outside the window; the records of a request are the same with a cached zone index
or without one; pruned records are not part of the request (as for hive directories).

Zones are 1 MiB of lines in the product; these tests make them 16 KiB (the same code, more zones
from small files)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

import pcbo_dagster.sources.streaming as streaming
import pcbo_dagster.sources.zones as zones
from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.catalog.source_indexes import LazyZoneIndexes, source_index_secret
from pcbo_dagster.engine.request_loading import evaluate, load_request
from pcbo_dagster_tests.csv_files import csv_bytes

ZONE = 16 << 10
DAYS = 6
HOURS = DAYS * 24


@pytest.fixture(autouse=True)
def small_zones(monkeypatch):
    monkeypatch.setattr(zones, "ZONE_BYTES", ZONE)
    monkeypatch.setattr(streaming, "ZONE_BYTES", ZONE)


def _records(per_hour: int = 12) -> list[dict[str, Any]]:
    """Records in time order over DAYS days from 2024-01-01, with a text field to give them weight."""
    out = []
    for hour in range(HOURS):
        day, h = divmod(hour, 24)
        for i in range(per_hour):
            out.append(
                {
                    "id": f"r-{hour:04d}-{i:02d}",
                    "occurredAt": f"2024-01-{day + 1:02d}T{h:02d}:{i * 4:02d}:00Z",
                    "consentGranted": i % 5 != 0,
                    "jurisdiction": "US" if i % 3 else "CA",
                    "retentionExpiresAt": "2030-01-01T00:00:00Z",
                    "amount": hour * 100 + i,
                    "note": "x" * 60,
                }
            )
    return out


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records))
    return path


def _request(source: Path | str, start: str, end: str, fmt: str | None = None, prune: bool = True) -> bytes:
    ref: dict[str, Any] = {"uri": str(source), "prune": prune}
    if fmt:
        ref["format"] = fmt
    return json.dumps(
        {
            "runId": "prune-run",
            "dataset": "events",
            "start": start,
            "end": end,
            "chunkSeconds": 3600,
            "policies": {"requireConsent": True},
            "source": ref,
        }
    ).encode()


def _decide(raw: bytes, store: Any = None) -> tuple[Any, Any, Any]:
    loaded = load_request(raw, zone_indexes=store)
    plan, decisions = evaluate(loaded)
    return loaded, plan, decisions


def _partitions(decisions: Any) -> list[tuple[str, list[str], list[Any]]]:
    return [
        (pd.partition.key, list(pd.add), [dict(o) for o in pd.to_json()["omit"]])
        for pd in decisions.partitions
    ]


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[LazyZoneIndexes]:
    """The catalog's zone indexes as runs keep them: authenticated with the home's key."""
    store = LazyZoneIndexes(
        f"sqlite:///{tmp_path / 'catalog.db'}", source_index_secret(tmp_path / "home", environ={})
    )
    yield store
    store.close()


def test_a_jsonl_range_reads_only_its_zones_and_decides_as_the_whole_file_does(tmp_path, catalog):
    source = _write_jsonl(tmp_path / "events.jsonl", _records())
    assert source.stat().st_size > 20 * ZONE
    window = ("2024-01-03T00:00:00Z", "2024-01-04T00:00:00Z")
    whole, _, all_decisions = _decide(_request(source, *window, prune=False))
    built, plan, decisions = _decide(_request(source, *window), catalog)  # builds and keeps the index
    cached, cached_plan, cached_decisions = _decide(_request(source, *window), catalog)  # seeks
    # The partitions of the window: the same adds and omissions as reading every record.
    assert _partitions(decisions) == _partitions(all_decisions)
    # With the index or without one: the very same request (plan and decision hashes).
    assert (cached_plan.plan_hash, cached_decisions.decision_hash) == (
        plan.plan_hash,
        decisions.decision_hash,
    )
    report = cached.source.zone_report()
    assert report["zones"] > 20 and report["read"] <= report["zones"] // DAYS + 2, report
    assert built.record_count == cached.record_count < whole.record_count / 4
    # Pruned records are not part of the request: fewer OUT_OF_WINDOW, another plan hash.
    assert (
        decisions.totals["byReason"].get("OUT_OF_WINDOW", 0)
        < all_decisions.totals["byReason"]["OUT_OF_WINDOW"]
    )
    assert plan.plan_hash != all_decisions.plan.plan_hash


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_forged_zone_index_in_the_catalog_changes_nothing_a_run_reads(tmp_path, catalog, fmt):
    """Red-team finding: someone who can write the catalog rewrote a source's zone index (every zone
    exact and out of the window; a CSV header renamed), and the next run skipped the window's records
    or read `consentGranted` from another column, while its chain, recording the forged decisions,
    verified. A row is taken only when its MAC under the home's key verifies: a forged one (or one
    copied under another key) is dropped, the source read whole, and a genuine index takes its place."""
    records = _records()
    if fmt == "jsonl":
        source = _write_jsonl(tmp_path / "events.jsonl", records)
    else:
        source = tmp_path / "events.csv"
        source.write_bytes(csv_bytes(records, list(records[0])))
    window = ("2024-01-03T00:00:00Z", "2024-01-04T00:00:00Z")
    _, _, whole = _decide(_request(source, *window, prune=False))
    _, _, built = _decide(_request(source, *window), catalog)
    assert _partitions(built) == _partitions(whole)
    raw = CatalogStore(catalog.url)
    try:
        [(key, stored)] = (
            raw.engine.connect()
            .execute(sa.text("SELECT index_key, index_json FROM source_zone_indexes"))
            .all()
        )
        index = json.loads(stored.partition(":")[2])
        for zone in index["zones"]:
            zone[2:5] = [0, 1, True]  # every zone exact, its records all in 1970
        if index.get("header"):
            index["header"] = [
                {"consentGranted": "note", "note": "consentGranted"}.get(h, h) for h in index["header"]
            ]
        forged = json.dumps(index, sort_keys=True, separators=(",", ":"))
        for text in (forged, "0" * 64 + ":" + forged, stored.partition(":")[0] + ":" + forged):
            with raw.engine.begin() as conn:
                conn.execute(sa.text("UPDATE source_zone_indexes SET index_json = :t"), {"t": text})
            _, _, decided = _decide(_request(source, *window), catalog)
            assert _partitions(decided) == _partitions(whole)
            with raw.engine.connect() as conn:
                now = conn.execute(sa.text("SELECT index_json FROM source_zone_indexes")).scalar_one()
            assert now == stored  # the genuine index again
    finally:
        raw.close()


def test_a_zone_holding_an_unparseable_timestamp_is_never_skipped(tmp_path, catalog):
    records = _records()
    records[40]["occurredAt"] = "2024-01-01 00:40:00"  # no T, no offset: INVALID_RECORD
    records[-5]["occurredAt"] = 17  # not a string
    records[-3] = ["not", "an", "object"]
    source = _write_jsonl(tmp_path / "events.jsonl", records)
    window = ("2024-01-03T00:00:00Z", "2024-01-03T06:00:00Z")
    for store in (None, catalog, catalog):
        _, _, decisions = _decide(_request(source, *window), store)
        unplaced = {entry["index"]: entry["reasons"] for entry in decisions.to_json()["unplaced"]}
        invalid = {i for i, reasons in unplaced.items() if "INVALID_RECORD" in reasons}
        # the bad records are reported (their zones were read), wherever they are in the file
        assert len(invalid) == 3, unplaced


def test_duplicates_in_pruned_zones_are_not_seen(tmp_path, catalog):
    records = _records()
    records[-1] = dict(records[-1], id=records[HOURS * 12 // 2]["id"])  # same id, last day
    source = _write_jsonl(tmp_path / "events.jsonl", records)
    window = ("2024-01-04T00:00:00Z", "2024-01-04T01:00:00Z")  # holds the first copy only
    _, _, pruned = _decide(_request(source, *window), catalog)
    _, _, whole = _decide(_request(source, *window, prune=False))

    def duplicates(decisions: Any) -> int:
        return sum(p["counts"]["byReason"].get("DUPLICATE_ID", 0) for p in decisions.to_json()["partitions"])

    assert duplicates(whole) == 1
    assert duplicates(pruned) == 0


def test_a_changed_source_is_indexed_again(tmp_path, catalog):
    source = tmp_path / "events.jsonl"
    records = _records()
    _write_jsonl(source, records)
    window = ("2024-01-02T00:00:00Z", "2024-01-02T02:00:00Z")
    _, _, before = _decide(_request(source, *window), catalog)
    time.sleep(0.01)
    moved = [dict(r, occurredAt=r["occurredAt"].replace("2024-01-05", "2024-01-02")) for r in records]
    _write_jsonl(source, moved)  # the same size, other content: another identity (times)
    _, _, cached = _decide(_request(source, *window), catalog)
    _, _, whole = _decide(_request(source, *window, prune=False))
    assert _partitions(cached) == _partitions(whole) != _partitions(before)


def test_a_csv_range_is_pruned_and_typed_over_the_zones_it_reads(tmp_path, catalog):
    records = _records()
    for r in records[-30:]:
        r["amount"] = f"A{r['amount']}"  # the last zone's amounts are not integers
    columns = ["id", "occurredAt", "consentGranted", "jurisdiction", "retentionExpiresAt", "amount", "note"]
    source = tmp_path / "events.csv"
    source.write_bytes(csv_bytes(records, columns))
    window = ("2024-01-02T00:00:00Z", "2024-01-02T12:00:00Z")
    loaded, plan, decisions = _decide(_request(source, *window), catalog)
    again, plan2, decisions2 = _decide(_request(source, *window), catalog)
    fresh, plan3, decisions3 = _decide(_request(source, *window), None)
    assert plan.plan_hash == plan2.plan_hash == plan3.plan_hash
    assert decisions.decision_hash == decisions2.decision_hash == decisions3.decision_hash
    assert again.source.zone_report()["read"] < again.source.zone_report()["zones"] / 3
    # `amount` is an integer column over the zones read (the non-integer cells were pruned)
    added = loaded.fetch(decisions.partitions[0].add_locators)
    assert all(isinstance(r["amount"], int) for r in added)
    _, _, whole = _decide(_request(source, *window, prune=False))
    assert [len(a) for _, a, _ in _partitions(decisions)] == [len(a) for _, a, _ in _partitions(whole)]


def _parquet(path: Path, records: list[dict[str, Any]], occurred: pa.DataType, rows_per_group: int) -> Path:
    table = pa.Table.from_pylist(records)
    column = table.column("occurredAt")
    if pa.types.is_timestamp(occurred):
        column = pa.array([r["occurredAt"].replace("Z", "+00:00") for r in records]).cast(pa.string())
        import pyarrow.compute as pc

        column = pc.strptime(pc.utf8_slice_codeunits(column, 0, 19), "%Y-%m-%dT%H:%M:%S", "us").cast(occurred)
    table = table.set_column(table.schema.get_field_index("occurredAt"), "occurredAt", column)
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


@pytest.mark.parametrize("occurred", [pa.timestamp("us", tz="UTC"), pa.string()], ids=["timestamp", "string"])
def test_a_parquet_range_reads_only_its_row_groups(
    tmp_path: Path, catalog: CatalogStore, occurred: pa.DataType, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _parquet(tmp_path / "events.parquet", _records(), occurred, rows_per_group=144)
    window = ("2024-01-05T00:00:00Z", "2024-01-05T03:00:00Z")
    read_groups: list[int] = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        read_groups.extend(kwargs.get("row_groups") or [])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    loaded, plan, decisions = _decide(_request(source, *window), catalog)
    assert read_groups == [8]  # the one row group of day 5 that holds those hours (288 rows a day)
    _, _, whole = _decide(_request(source, *window, prune=False))
    assert _partitions(decisions) == _partitions(whole)
    _, plan2, decisions2 = _decide(_request(source, *window), None)
    assert (plan2.plan_hash, decisions2.decision_hash) == (plan.plan_hash, decisions.decision_hash)


def test_a_ledger_range_is_pruned_by_its_integer_field(tmp_path, catalog):
    records = [
        {
            "id": f"ledger-{n:08d}",
            "occurredAt": "2024-01-01T00:00:00Z",
            "ledgerSequence": n,
            "consentGranted": True,
        }
        for n in range(1, 4001)
    ]
    source = tmp_path / "ledgers.parquet"
    pq.write_table(pa.Table.from_pylist(records), source, row_group_size=500)
    raw = json.dumps(
        {
            "runId": "ledger-prune",
            "dataset": "ledgers",
            "ledgerRange": {"field": "ledgerSequence", "first": 1201, "end": 1265, "partitionSize": 64},
            "policies": {"requireConsent": True},
            "source": {"uri": str(source), "prune": True},
        }
    ).encode()
    loaded, _, decisions = _decide(raw, catalog)
    assert loaded.source.zone_report() == {"zones": 8, "read": 1}
    assert [len(pd.add) for pd in decisions.partitions] == [64]


def test_prune_false_reads_every_zone(tmp_path):
    source = _write_jsonl(tmp_path / "events.jsonl", _records())
    loaded, _, _ = _decide(_request(source, "2024-01-03T00:00:00Z", "2024-01-03T01:00:00Z", prune=False))
    assert loaded.record_count == HOURS * 12


def test_the_index_key_follows_the_sources_identity(tmp_path):
    source = _write_jsonl(tmp_path / "events.jsonl", _records(per_hour=1))
    fs, path = streaming.filesystem(str(source))
    first = zones.source_identity(fs, path)
    os.utime(source, ns=(1, 1))
    assert zones.source_identity(fs, path) != first


def test_a_jsonl_source_on_s3_is_pruned_and_its_records_fetched(tmp_path, catalog, s3_store, monkeypatch):
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    local = _write_jsonl(tmp_path / "events.jsonl", _records())
    uri = s3_store.url() + "/events.jsonl"
    s3_store.filesystem().pipe_file(uri.split("://", 1)[1], local.read_bytes())
    window = ("2024-01-02T00:00:00Z", "2024-01-02T03:00:00Z")
    for store in (catalog, catalog):  # builds the index (keyed by the ETag), then seeks by it
        loaded, plan, decisions = _decide(_request(uri, *window), store)
        assert loaded.source.zone_report()["read"] < loaded.source.zone_report()["zones"] / 3
        fetched = [r["id"] for pd in decisions.partitions for r in loaded.fetch(pd.add_locators)]
        assert fetched == [i for pd in decisions.partitions for i in pd.add]
        assert len(fetched) > 20
    _, _, whole = _decide(_request(local, *window, prune=False))
    assert _partitions(decisions) == _partitions(whole)


def test_concurrent_first_runs_share_one_index_key(tmp_path: Path) -> None:
    """Red-team finding: the key file was created, then written: a run reading it in between found
    it empty and failed ("not a 32-byte key: remove it"). It is written whole, then linked into
    place: every process gets the one key, kept where a server never reads a source (`.keys/`)."""
    import threading

    for trial in range(5):
        home = tmp_path / f"home-{trial}"
        barrier = threading.Barrier(4)
        keys: list[bytes] = []
        errors: list[BaseException] = []

        def take(
            home: Path = home,
            barrier: threading.Barrier = barrier,
            keys: list[bytes] = keys,
            errors: list[BaseException] = errors,
        ) -> None:
            barrier.wait()
            try:
                keys.append(source_index_secret(home, environ={}))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=take) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and len(keys) == 4 and len(set(keys)) == 1 and len(keys[0]) == 32
        key_file = home / ".keys" / "source-index.key"
        assert key_file.read_bytes() == keys[0] and oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert sorted(p.name for p in key_file.parent.iterdir()) == ["source-index.key"]

"""A directory of record files as one source (`sources.hive_directories`): files read in sorted
order give exactly the records of the files concatenated, hive partitions outside the request's
window are skipped unread, CSV typing is decided over the whole directory, and records are read
again across files by their locators. The factory is tested directly (the engine wiring calls it
for a `source.uri` that is a directory)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import parse_instant
from pcbo_dagster.core.request_model import validate_request
from pcbo_dagster.datasets.config import parse_datasets_config
from pcbo_dagster.datasets.requests import request_for_keys
from pcbo_dagster.sources.hive_directories import (
    LOCATOR_BITS,
    DirectorySource,
    open_directory_source,
    time_interval,
)
from pcbo_dagster.sources.streaming import RecordSource, open_source
from pcbo_dagster_tests.csv_files import csv_bytes


def _us(text: str) -> int:
    value = parse_instant(text)
    assert value is not None
    return value


WINDOW = (_us("2024-01-01T00:00:00Z"), _us("2024-01-03T00:00:00Z"))


def _records(tag: str, n: int = 5, day: str = "2024-01-01") -> list[dict[str, Any]]:
    return [
        {
            "id": f"{tag}-{i}",
            "occurredAt": f"{day}T{i:02d}:15:00Z",
            "consentGranted": i % 2 == 0,
            "jurisdiction": "US",
            "amount": i * 7,
            "note": f"{tag} note {i}, with a comma",
        }
        for i in range(n)
    ]


COLUMNS = ["id", "occurredAt", "consentGranted", "jurisdiction", "amount", "note"]


def _csv_bytes(records: list[dict[str, Any]], columns: list[str] | None = None) -> bytes:
    return csv_bytes(records, columns or COLUMNS)


def _file_bytes(fmt: str, records: list[dict[str, Any]]) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    if fmt == "csv":
        return _csv_bytes(records)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), sink, row_group_size=2)
    return sink.getvalue().to_pybytes()


def _write(root: Path, relative: str, data: bytes | str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _read_all(source: RecordSource, size: int = 3) -> tuple[list[Any], np.ndarray]:
    records: list[Any] = []
    locators: list[np.ndarray] = []
    for batch, _, local in source.batches(size):
        assert len(batch) == len(local) and local.dtype == np.int64
        records.extend(batch)
        locators.append(local)
    assert source.count == len(records)
    return records, (np.concatenate(locators) if locators else np.zeros(0, np.int64))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_directory_is_its_files_concatenated_in_sorted_order(tmp_path: Path, fmt: str) -> None:
    ext = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}[fmt]
    root = tmp_path / "events"
    # written in an order other than the sorted one; "B" < "a" < "b" (code points), nested dirs too
    names = [f"b/part-1.{ext}", f"a/part-0.{ext}", f"B.{ext}", f"a/z/part-9.{ext}", f"a/part-10.{ext}"]
    for k, name in enumerate(names):
        _write(root, name, _file_bytes(fmt, _records(f"f{k}", n=2 + k)))
    _write(root, "_SUCCESS", b"")
    _write(root, f"_temporary/0/part-x.{ext}", _file_bytes(fmt, _records("tmp")))
    _write(root, f".hidden.{ext}", _file_bytes(fmt, _records("hidden")))
    _write(root, f"a/.part-0.{ext}.crc", b"crc")
    _write(root, "README.txt", "not data")

    source = open_directory_source(str(root), "events", None, None)
    assert isinstance(source, DirectorySource)
    assert source.kind == fmt
    expected_order = sorted(names)
    assert source.files == expected_order
    assert source.ignored == ["README.txt"] and source.pruned == []

    expected: list[Any] = []
    for name in expected_order:
        single = open_source(str(root / name), name, fmt)
        expected.extend(_read_all(single)[0])
    records, locators = _read_all(source, size=4)
    assert records == expected
    assert len(set(locators.tolist())) == len(records)
    # batches are joined across files: all but the last hold at least `size` records
    sizes = [len(batch) for batch, _, _ in source.batches(4)]
    assert all(s >= 4 for s in sizes[:-1]) and sum(sizes) == len(expected)

    # file:// URIs and a trailing slash name the same directory
    again = open_directory_source(root.as_uri() + "/", "events/", fmt, None)
    assert _read_all(again)[0] == expected


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_fetch_across_files_in_the_given_order(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "events"
    for k in range(4):
        _write(root, f"dt=2024-01-0{k + 1}/part.{fmt}", _file_bytes(fmt, _records(f"d{k}", n=3 + k)))
    source = open_directory_source(str(root), "events", fmt, None)
    records, locators = _read_all(source)
    assert (locators >> LOCATOR_BITS).tolist() == sorted((locators >> LOCATOR_BITS).tolist())
    order = np.random.default_rng(7).permutation(len(records))
    picked = np.concatenate([order, order[:5]])  # and some twice
    assert source.fetch(locators[picked]) == [records[i] for i in picked.tolist()]
    chunks = list(source.fetch_chunks(locators[picked], 4))
    assert [r for chunk in chunks for r in chunk] == [records[i] for i in picked.tolist()]
    assert source.fetch(np.zeros(0, np.int64)) == []

    # a fresh source fetches by the locators of another one (nothing kept per record)
    fresh = open_directory_source(str(root), "events", fmt, None)
    assert fresh.fetch(locators[order]) == [records[i] for i in order.tolist()]


def test_time_interval_of_hive_paths() -> None:
    day = 86_400_000_000
    jan2 = _us("2024-01-02T00:00:00Z")
    assert time_interval(["dt=2024-01-02"]) == (jan2, jan2 + day)
    assert time_interval(["date=20240102"]) == (jan2, jan2 + day)
    assert time_interval(["dt=2024-01-02T05"]) == (jan2 + 5 * day // 24, jan2 + 6 * day // 24)
    assert time_interval(["dt=2024-01-02 05"]) == (jan2 + 5 * day // 24, jan2 + 6 * day // 24)
    assert time_interval(["dt=2024-01-02", "hour=05"]) == (jan2 + 5 * day // 24, jan2 + 6 * day // 24)
    assert time_interval(["year=2024"]) == (_us("2024-01-01T00:00:00Z"), _us("2025-01-01T00:00:00Z"))
    assert time_interval(["year=2024", "month=02"]) == (
        _us("2024-02-01T00:00:00Z"),
        _us("2024-03-01T00:00:00Z"),
    )
    assert time_interval(["Year=2024", "Month=2", "Day=29", "hour=23"]) == (
        _us("2024-02-29T23:00:00Z"),
        _us("2024-03-01T00:00:00Z"),
    )
    # an instant with minutes: its partition's start, a lower bound only (URL-decoded)
    assert time_interval(["dt=2024-01-02 10%3A30%3A00"]) == (_us("2024-01-02T10:30:00Z"), None)
    assert time_interval(["dt=2024-01-02T10:30:00+01:00"]) == (_us("2024-01-02T09:30:00Z"), None)
    # unrecognised keys are ignored; nothing recognised, or anything doubtful: None (read the file)
    assert time_interval(["region=eu", "dt=2024-01-02"]) == (jan2, jan2 + day)
    for doubtful in (
        [],
        ["region=eu"],
        ["hour=05"],  # hour alone means nothing
        ["month=01", "day=02"],  # no year
        ["dt=yesterday"],
        ["dt=__HIVE_DEFAULT_PARTITION__"],
        ["dt=2024-02-30"],
        ["year=2024", "month=13"],
        ["year=2023", "month=02", "day=29"],
        ["year=24"],
        ["dt=2024-01-02", "day=03"],  # keys that disagree
        ["dt=2024-01-02", "date=2024-01-03"],
        ["dt=2024-01-02", "date=2024-01-03T00:00:00"],  # an instant after its date
        ["dt=2024-01-02", "hour=24"],
        # (red-team finding) digits of other scripts are not YYYY-MM-DD: Python's \d and int() took
        # them, so a file under `dt=２０２４-01-02` (full-width) or `year=٢٠٢٤` was pruned as 2024's
        ["dt=\uff12\uff10\uff12\uff14-01-02"],
        ["date=2024\u0660102"],
        ["dt=2024-01-02T\u0660\u0665"],
        ["dt=2024-01-02T10:3\u0660"],
        ["year=\u0662\u0660\u0662\u0664"],
        ["year=2024", "month=\u0661"],
        ["dt=2024-01-02", "hour=\u0665"],
    ):
        assert time_interval(doubtful) is None, doubtful
    # a finer key after a gap narrows nothing: year only
    assert time_interval(["year=2024", "day=02"]) == (
        _us("2024-01-01T00:00:00Z"),
        _us("2025-01-01T00:00:00Z"),
    )


PRUNE_LAYOUT = {
    # relative path: read within [2024-01-01, 2024-01-03)?
    "dt=2023-12-31/part.jsonl": False,
    "dt=2024-01-01/part.jsonl": True,
    "dt=20231231/part.jsonl": False,
    "date=2024-01-02/hour=05/part.jsonl": True,
    "date=2024-01-03/hour=00/part.jsonl": False,  # the end is exclusive
    "date=2024-01-02/hour=23/part.jsonl": True,
    "year=2024/month=01/day=02/hour=23/part.jsonl": True,
    "year=2024/month=01/day=03/part.jsonl": False,
    "year=2024/month=02/part.jsonl": False,
    "year=2023/part.jsonl": False,
    "year=2024/part.jsonl": True,
    "year=2023/month=12/day=31/hour=23/part.jsonl": False,
    "region=eu/dt=2024-01-02/part.jsonl": True,
    "region=eu/dt=2024-01-04/part.jsonl": False,
    "region=us/part.jsonl": True,  # unrecognised key
    "dt=garbage/part.jsonl": True,  # unreadable value
    "hour=05/part.jsonl": True,  # hour alone
    "dt=2024-01-05/day=01/part.jsonl": True,  # inconsistent
    "dt=2024-01-03 00%3A00%3A00/part.jsonl": False,  # starts at the end
    "dt=2024-01-02T10%3A30%3A00/part.jsonl": True,
    "dt=2023-06-01 00%3A00%3A00/part.jsonl": True,  # starts before: its end is unknown
    "plain/part.jsonl": True,
}


def _prune_tree(root: Path) -> dict[str, list[Any]]:
    contents = {}
    for k, path in enumerate(PRUNE_LAYOUT):
        records = _records(f"p{k}", n=2)
        _write(root, path, _file_bytes("jsonl", records))
        contents[path] = records
    return contents


def test_pruning_skips_exactly_the_partitions_outside_the_window(tmp_path: Path) -> None:
    root = tmp_path / "events"
    contents = _prune_tree(root)
    source = open_directory_source(str(root), "events", None, WINDOW)
    assert isinstance(source, DirectorySource)
    kept = sorted(p for p, read in PRUNE_LAYOUT.items() if read)
    assert source.files == kept
    assert source.pruned == sorted(p for p, read in PRUNE_LAYOUT.items() if not read)
    records, locators = _read_all(source)
    assert records == [r for p in kept for r in contents[p]]
    assert source.fetch(locators[::-1]) == records[::-1]

    # prune=False, or no time window (a ledgerRange request): every file
    everything = sorted(PRUNE_LAYOUT)
    for unpruned in (
        open_directory_source(str(root), "events", "jsonl", WINDOW, prune=False),
        open_directory_source(str(root), "events", "jsonl", None),
    ):
        assert isinstance(unpruned, DirectorySource)
        assert unpruned.files == everything and unpruned.pruned == []
        assert _read_all(unpruned)[0] == [r for p in everything for r in contents[p]]


def test_pruned_files_are_not_read(tmp_path: Path) -> None:
    root = tmp_path / "events"
    _write(root, "dt=2024-01-01/part.jsonl", _file_bytes("jsonl", _records("ok")))
    _write(root, "dt=2024-02-01/part.jsonl", "not json at all\n")
    source = open_directory_source(str(root), "events", None, WINDOW)
    assert [r["id"] for r in _read_all(source)[0]] == [f"ok-{i}" for i in range(5)]
    with pytest.raises(InvalidInput) as caught:
        _read_all(open_directory_source(str(root), "events", None, WINDOW, prune=False))
    assert "dt=2024-02-01/part.jsonl" in caught.value.message  # the error names the file


def test_formats_chosen_inferred_or_refused(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _write(root, "a.jsonl", _file_bytes("jsonl", _records("j")))
    _write(root, "b.NDJSON", _file_bytes("jsonl", _records("n")))
    _write(root, "c.csv", _file_bytes("csv", _records("c")))
    with pytest.raises(InvalidInput) as caught:
        open_directory_source(str(root), "mixed", None, None)
    assert caught.value.field == "source.format"
    assert "a.jsonl" in caught.value.message and "c.csv" in caught.value.message

    jsonl = open_directory_source(str(root), "mixed", "jsonl", None)
    assert isinstance(jsonl, DirectorySource)
    assert (jsonl.files, jsonl.ignored) == (["a.jsonl", "b.NDJSON"], ["c.csv"])
    csv_only = open_directory_source(str(root), "mixed", "csv", None)
    assert [r["id"] for r in _read_all(csv_only)[0]] == [f"c-{i}" for i in range(5)]
    with pytest.raises(InvalidInput) as caught:
        open_directory_source(str(root), "mixed", "parquet", None)
    assert caught.value.field == "source.uri" and "holds no parquet files" in caught.value.message
    with pytest.raises(InvalidInput) as caught:
        open_directory_source(str(root), "mixed", "ledger_archive", None)
    assert caught.value.field == "source.format"

    empty = tmp_path / "empty"
    _write(empty, "_SUCCESS", b"")
    _write(empty, ".staging/part.jsonl", _file_bytes("jsonl", _records("x")))
    _write(empty, "notes.txt", "x")
    with pytest.raises(InvalidInput) as caught:
        open_directory_source(str(empty), "empty", None, None)
    assert caught.value.field == "source.uri"
    assert caught.value.message == "empty holds no jsonl/csv/parquet files"

    with pytest.raises(InvalidInput) as caught:
        open_directory_source(str(root / "a.jsonl"), "a.jsonl", None, None)
    assert caught.value.field == "source.uri" and "not a directory" in caught.value.message

    # everything pruned: a source of no records
    dated = tmp_path / "dated"
    _write(dated, "dt=2020-01-01/part.jsonl", _file_bytes("jsonl", _records("old")))
    nothing = open_directory_source(str(dated), "dated", None, WINDOW)
    assert _read_all(nothing)[0] == [] and nothing.count == 0


def test_csv_typing_is_decided_over_the_whole_directory(tmp_path: Path) -> None:
    root = tmp_path / "csvs"
    columns = ["id", "occurredAt", "amount", "code", "late", "consentGranted"]
    first: list[dict[str, Any]] = [
        {
            "id": "a-1",
            "occurredAt": "2024-01-01T00:00:00Z",
            "amount": "1",
            "code": "7",
            "consentGranted": True,
        },
        {"id": "a-2", "occurredAt": "2024-01-01T01:00:00Z", "amount": "2", "code": "8"},
    ]
    second = [
        {"id": "b-1", "occurredAt": "2024-01-02T00:00:00Z", "amount": "3", "code": "x9", "late": "5"},
    ]
    _write(root, "dt=2024-01-01/part.csv", _csv_bytes(first, columns))
    _write(root, "dt=2024-01-02/part.csv", _csv_bytes(second, columns))
    _write(root, "dt=2024-01-02/zz-empty.csv", b"")  # no header, no rows: allowed
    _write(root, "dt=2024-01-02/zz-header-only.csv", ",".join(columns) + "\r\n")

    # alone, the first file's `code` is an integer column; over the directory it is text everywhere
    alone = _read_all(open_source(str(root / "dt=2024-01-01/part.csv"), "part.csv", "csv"))[0]
    assert alone[0]["code"] == 7
    source = open_directory_source(str(root), "csvs", None, None)
    records, locators = _read_all(source)
    assert records == [
        {"id": "a-1", "occurredAt": "2024-01-01T00:00:00Z", "amount": 1, "code": "7", "consentGranted": True},
        {"id": "a-2", "occurredAt": "2024-01-01T01:00:00Z", "amount": 2, "code": "8"},
        {"id": "b-1", "occurredAt": "2024-01-02T00:00:00Z", "amount": 3, "code": "x9", "late": 5},
    ]
    assert source.fetch(locators[::-1]) == records[::-1]
    # a fresh source (no batches yet) decides the same typing before fetching
    assert open_directory_source(str(root), "csvs", "csv", None).fetch(locators) == records

    # a pruned file does not take part in the typing
    narrow = open_directory_source(str(root), "csvs", None, (WINDOW[0], _us("2024-01-02T00:00:00Z")))
    assert isinstance(narrow, DirectorySource) and narrow.pruned == [
        "dt=2024-01-02/part.csv",
        "dt=2024-01-02/zz-empty.csv",
        "dt=2024-01-02/zz-header-only.csv",
    ]
    assert [r["code"] for r in _read_all(narrow)[0]] == [7, 8]


def test_csv_header_mismatch_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "csvs"
    _write(root, "a.csv", "id,occurredAt,amount\r\nx,2024-01-01T00:00:00Z,1\r\n")
    _write(root, "b.csv", "id,amount,occurredAt\r\ny,2,2024-01-01T00:00:00Z\r\n")
    with pytest.raises(InvalidInput) as caught:
        _read_all(open_directory_source(str(root), "csvs", None, None))
    assert caught.value.field == "source"
    assert caught.value.message.startswith("b.csv: CSV header") and "a.csv" in caught.value.message

    bad = tmp_path / "bad"
    _write(bad, "a.csv", "id,occurredAt\r\nx,2024-01-01T00:00:00Z\r\n")
    _write(bad, "b.csv", "id,occurredAt\r\ny,2024-01-01T00:00:00Z,extra\r\n")
    with pytest.raises(InvalidInput) as caught:
        _read_all(open_directory_source(str(bad), "bad", None, None))
    assert caught.value.message.startswith("b.csv: CSV line 2")


def test_request_and_dataset_config_carry_prune(tmp_path: Path) -> None:
    base = {"runId": "r", "dataset": "events", "start": "2024-01-01T00:00:00Z", "end": "2024-01-02T00:00:00Z"}
    request = validate_request({**base, "source": {"uri": "some/directory"}})  # no format: valid
    # A request prunes only when it says so: otherwise every record of its source is part of it.
    assert request.source is not None and request.source.prune is False and request.source.format is None
    assert validate_request({**base, "source": {"uri": "d", "prune": True}}).source.prune is True  # type: ignore[union-attr]
    with pytest.raises(InvalidInput) as caught:
        validate_request({**base, "source": {"uri": "d", "prune": "no"}})
    assert caught.value.field == "source.prune"

    def config(source: str) -> Any:
        text = f"""
datasets:
  - name: events
    partitioning: {{kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z",
                   end: "2024-01-02T00:00:00Z"}}
    source: {source}
"""
        return parse_datasets_config(text, tmp_path).datasets[0]

    keys = ["20240101T000000Z"]
    # A dataset config prunes by default, and says so in every request it makes.
    plain = request_for_keys(config("{uri: events, format: jsonl}"), "/d/events", "run-1", keys, {})
    assert plain["source"] == {"uri": "/d/events", "format": "jsonl", "prune": True}
    assert validate_request(plain).source.prune is True  # type: ignore[union-attr]
    on = request_for_keys(config("{uri: events, format: jsonl, prune: true}"), "/d/events", "run-1", keys, {})
    assert on["source"] == plain["source"]
    off = request_for_keys(
        config("{uri: events, format: jsonl, prune: false}"), "/d/events", "run-1", keys, {}
    )
    assert off["source"] == {"uri": "/d/events", "format": "jsonl", "prune": False}
    assert validate_request(off).source.prune is False  # type: ignore[union-attr]


def test_directory_on_s3(s3_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_store.env.items():
        monkeypatch.setenv(k, v)
    fs = s3_store.filesystem()
    prefix = f"{s3_store.bucket}/hive-{uuid.uuid4().hex}"
    layout = {
        "dt=2023-12-31/part-0.parquet": _records("old", day="2023-12-31"),
        "dt=2024-01-01/part-0.parquet": _records("d1", day="2024-01-01"),
        "dt=2024-01-01/part-1.parquet": _records("d1b", day="2024-01-01"),
        "dt=2024-01-02 00%3A00%3A00/part-0.parquet": _records("d2", day="2024-01-02"),
    }
    for path, records in layout.items():
        fs.pipe(f"{prefix}/{path}", _file_bytes("parquet", records))
    fs.pipe(f"{prefix}/_SUCCESS", b"")
    uri = f"s3://{prefix}"
    source = open_directory_source(uri, uri, None, WINDOW)
    assert isinstance(source, DirectorySource)
    assert source.pruned == ["dt=2023-12-31/part-0.parquet"]
    assert source.files == sorted(layout)[1:]
    records, locators = _read_all(source)
    expected = [jsonable for path in sorted(layout)[1:] for jsonable in _roundtrip(layout[path])]
    assert records == expected
    assert source.fetch(locators[::-1]) == expected[::-1]


def test_an_object_key_with_an_empty_path_component_is_invalid_input(
    s3_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: an S3 prefix holding `a.jsonl` and `/a.jsonl` (the keys `dir/a.jsonl` and
    `dir//a.jsonl`) listed both as `a.jsonl`: the first was read twice, the second never, and the
    documents said two files were read. A key with an empty path component (`//`) is invalid input
    naming it, as no reader can tell it from the key without it."""
    import boto3

    for k, v in s3_store.env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_store.env["PCBO_S3_ENDPOINT_URL"], region_name="us-east-1")
    prefix = f"hive-{uuid.uuid4().hex}"
    client.put_object(
        Bucket=s3_store.bucket, Key=f"{prefix}/a.jsonl", Body=_file_bytes("jsonl", _records("a", 1))
    )
    client.put_object(
        Bucket=s3_store.bucket, Key=f"{prefix}//a.jsonl", Body=_file_bytes("jsonl", _records("b", 1))
    )
    uri = f"s3://{s3_store.bucket}/{prefix}"
    with pytest.raises(InvalidInput, match="empty path component") as info:
        open_directory_source(uri, uri, None, None)
    assert info.value.field == "source.uri" and "/a.jsonl" in str(info.value)
    client.delete_object(Bucket=s3_store.bucket, Key=f"{prefix}//a.jsonl")
    for marker in ("", "dt=2024-01-01/"):  # folder markers (zero-byte `dir/` objects): folders, no files
        client.put_object(Bucket=s3_store.bucket, Key=f"{prefix}/{marker}", Body=b"")
    source = open_directory_source(uri, uri, None, None)
    assert isinstance(source, DirectorySource) and source.files == ["a.jsonl"] and source.ignored == []
    assert [r["id"] for r in _read_all(source)[0]] == ["a-0"]


def _roundtrip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records as a parquet file gives them back (`jsonable_row` of each row)."""
    from pcbo_dagster.sources.record_files import jsonable_row

    return [jsonable_row(row) for row in pa.Table.from_pylist(records).to_pylist()]


def _cli(home: Path, *args: Any) -> tuple[int, dict[str, Any], str]:
    from pcbo_dagster_tests.cli_runner import run_pcbo

    status, document, stderr = run_pcbo(list(args), home=home)
    assert status in (0, 2, 3), stderr
    return status, document, stderr


def test_directory_source_end_to_end_through_the_cli(tmp_path: Path) -> None:
    """A request naming a hive directory: dry-run and execute read exactly the files inside the window
    (pruned ones are not part of the request); with prune false every file is read and the other days'
    records are OUT_OF_WINDOW; both write the same data files, equal to those of the records inline."""
    root = tmp_path / "events"
    days = ["2023-12-31", "2024-01-01", "2024-01-02", "2024-01-03"]
    by_day = {day: _records(f"d{k}", n=6, day=day) for k, day in enumerate(days)}
    for day, records in by_day.items():
        _write(root, f"dt={day}/part-0.jsonl", _file_bytes("jsonl", records[:3]))
        _write(root, f"dt={day}/part-1.jsonl", _file_bytes("jsonl", records[3:]))
    _write(root, "_SUCCESS", "")
    base = {
        "dataset": "events",
        "versionLabel": "v1",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-03T00:00:00Z",
        "chunkSeconds": 86400,
        "policies": {"requireConsent": True},
    }
    inside = by_day["2024-01-01"] + by_day["2024-01-02"]
    requests = {
        "pruned": {**base, "runId": "dir-pruned", "source": {"uri": "events", "prune": True}},
        "unpruned": {**base, "runId": "dir-all", "source": {"uri": "events"}},  # the default
        "inline": {**base, "runId": "dir-inline", "sourceRecords": inside},
    }
    dry: dict[str, dict[str, Any]] = {}
    written: dict[str, list[str]] = {}
    for name, request in requests.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(request))
        status, dry[name], _ = _cli(tmp_path / f"home-{name}", "dry-run", "--input", path)
        assert status == 0
        status, done, _ = _cli(tmp_path / f"home-{name}", "execute", "--input", path)
        assert status == 0 and done["status"] == "committed"
        written[name] = [f["checksum"] for p in done["partitions"] for f in p["files"]]
    assert dry["pruned"]["totals"]["records"] == 12 and dry["pruned"]["unplaced"] == []
    assert dry["pruned"]["planHash"] == dry["inline"]["planHash"]  # the same records
    assert dry["pruned"]["decisionHash"] == dry["inline"]["decisionHash"]
    assert dry["unpruned"]["totals"]["records"] == 24
    assert dry["unpruned"]["totals"]["byReason"]["OUT_OF_WINDOW"] == 12
    assert dry["unpruned"]["planHash"] != dry["pruned"]["planHash"]
    assert [p["add"] for p in dry["unpruned"]["partitions"]] == [
        p["add"] for p in dry["pruned"]["partitions"]
    ]
    assert [p["add"] for p in dry["pruned"]["partitions"]] == [
        sorted(r["id"] for r in by_day[day] if r["consentGranted"]) for day in ("2024-01-01", "2024-01-02")
    ]
    assert written["pruned"] == written["unpruned"] == written["inline"] and len(written["inline"]) == 2

    # A directory without data files, and a missing one: exit 2 naming source.uri, nothing written.
    (tmp_path / "empty").mkdir()
    for uri in ("empty", "missing"):
        path = tmp_path / f"{uri}.json"
        path.write_text(
            json.dumps({**base, "runId": f"dir-{uri}", "source": {"uri": uri, "format": "jsonl"}})
        )
        status, _, stderr = _cli(tmp_path / f"home-{uri}", "dry-run", "--input", path)
        assert status == 2 and "source.uri" in stderr, stderr
        assert not (tmp_path / f"home-{uri}").exists()


def test_the_documents_say_which_files_of_a_directory_were_not_read(tmp_path: Path) -> None:
    """Red-team finding: files below a directory source that are not of the format read (another
    extension: `.json`, `.jsonl.gz`, `.txt`; or another format when `source.format` is given) were
    left out without a word: a day's records in `part-1.json` were simply not loaded, exit 0, and no
    document said so. The dry-run and execute documents (and a SQL target's) now say how many files
    were read, pruned and not read, and name the first of those not read; `_`/`.` paths aside."""
    root = tmp_path / "events"
    records = _records("a", n=6, day="2024-01-01")
    _write(root, "dt=2024-01-01/part-0.jsonl", _file_bytes("jsonl", records[:3]))
    _write(root, "dt=2024-01-01/part-1.json", _file_bytes("jsonl", records[3:]))  # not a .jsonl
    _write(root, "dt=2024-01-01/part-2.csv", _file_bytes("csv", records[3:]))
    _write(root, "dt=2024-01-02/part-0.jsonl", _file_bytes("jsonl", _records("b", n=2, day="2024-01-02")))
    _write(root, "README.txt", "what this folder is")
    _write(root, "_SUCCESS", "")
    _write(root, "dt=2024-01-01/.part-0.jsonl.crc", "")
    request = {
        "runId": "dir-report",
        "dataset": "events",
        "versionLabel": "v1",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-02T00:00:00Z",
        "chunkSeconds": 86400,
        "policies": {"requireConsent": True},
        "source": {"uri": "events", "format": "jsonl", "prune": True},
    }
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    expected = {
        "format": "jsonl",
        "read": 1,
        "pruned": 1,
        "notRead": 3,
        "notReadPaths": ["README.txt", "dt=2024-01-01/part-1.json", "dt=2024-01-01/part-2.csv"],
    }
    status, planned, _ = _cli(tmp_path / "home", "dry-run", "--input", path)
    assert status == 0 and planned["sourceFiles"] == expected and planned["totals"]["records"] == 3
    status, done, _ = _cli(tmp_path / "home", "execute", "--input", path)
    assert status == 0 and done["sourceFiles"] == expected
    inline = {**request, "source": None, "sourceRecords": records[:3]}
    del inline["source"]
    path.write_text(json.dumps(inline))
    status, planned, _ = _cli(tmp_path / "home-inline", "dry-run", "--input", path)
    assert status == 0 and "sourceFiles" not in planned  # only a directory has files to report


def test_a_folder_that_is_a_symbolic_link_is_read_and_a_link_loop_is_refused(tmp_path: Path) -> None:
    """Red-team finding: a hive partition folder that is a symbolic link (`dt=2024-01-02 ->
    /elsewhere`) was listed as one file without a data extension and ignored, so its records were
    silently not part of the request (not in the plan hash, their window committed empty). Its files
    are read as those of the folder it leads to; a link back to a folder on the way is refused,
    naming it, rather than walked forever."""
    root = tmp_path / "events"
    _write(root, "dt=2024-01-01/part-0.jsonl", _file_bytes("jsonl", _records("a", 2)))
    elsewhere = tmp_path / "elsewhere"
    _write(elsewhere, "part-0.jsonl", _file_bytes("jsonl", _records("b", 3, day="2024-01-02")))
    (root / "dt=2024-01-02").symlink_to(elsewhere, target_is_directory=True)
    source = open_directory_source(str(root), "events", None, None)
    assert isinstance(source, DirectorySource)
    assert source.files == ["dt=2024-01-01/part-0.jsonl", "dt=2024-01-02/part-0.jsonl"]
    records, _ = _read_all(source)
    assert [r["id"] for r in records] == ["a-0", "a-1", "b-0", "b-1", "b-2"]
    # A loop: a link to the source folder itself, below it.
    (root / "dt=2024-01-01" / "again").symlink_to(root, target_is_directory=True)
    with pytest.raises(InvalidInput, match="symbolic link loop") as info:
        open_directory_source(str(root), "events", None, None)
    assert info.value.field == "source.uri" and "dt=2024-01-01/again" in str(info.value)


def test_a_server_lists_no_folder_a_link_leads_to_outside_its_sources_directory(tmp_path: Path) -> None:
    """Red-team finding (of the change that walks linked folders): a server must not list a folder
    outside its sources directory (the names of its files would show in messages). A folder link
    leading outside it is refused before it is listed, naming the link, not what is behind it."""
    from pcbo_dagster.sources.local_files import SourcesDirectory

    sources = tmp_path / "sources"
    root = sources / "events"
    _write(root, "dt=2024-01-01/part-0.jsonl", _file_bytes("jsonl", _records("a", 2)))
    elsewhere = tmp_path / "elsewhere"
    _write(elsewhere, "secret-name.jsonl", _file_bytes("jsonl", _records("b", 1)))
    (root / "dt=2024-01-02").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(InvalidInput, match="leads outside the server's sources directory") as info:
        open_directory_source(str(root), "events", None, None, confine_to=SourcesDirectory.of(sources))
    assert "dt=2024-01-02" in str(info.value) and "secret-name" not in str(info.value)
    inside = sources / "more"
    _write(inside, "part-1.jsonl", _file_bytes("jsonl", _records("c", 1)))
    (root / "dt=2024-01-02").unlink()
    (root / "dt=2024-01-02").symlink_to(inside, target_is_directory=True)
    source = open_directory_source(str(root), "events", None, None, confine_to=SourcesDirectory.of(sources))
    assert [r["id"] for r in _read_all(source)[0]] == ["a-0", "a-1", "c-0"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_record_rfc8785_cannot_express_is_named_with_its_file_and_place(tmp_path: Path, fmt: str) -> None:
    """Red-team finding: an integer past ±(2^53−1) in a directory source was refused as
    `source[3]: not representable as RFC 8785 JSON` — a position counted over every file of the
    source, which a user of a directory of many files cannot find. The message names the file and
    where in it the record lies (the line's byte offset, or the row)."""
    root = tmp_path / "events"
    _write(root, f"a.{fmt}", _file_bytes(fmt, _records("a", 2)))
    records = _records("b", 3)
    records[1]["amount"] = 2**63 - 1
    _write(root, f"b.{fmt}", _file_bytes(fmt, records))
    request = {
        "runId": "big-1",
        "dataset": "events",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-02T00:00:00Z",
        "chunkSeconds": 86400,
        "source": {"uri": str(root)},
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(request))
    status, _, stderr = _cli(tmp_path / "home", "dry-run", "--input", path)
    assert status == 2 and "source[3]: not representable as RFC 8785 JSON" in stderr, stderr
    line_start = len(json.dumps(records[0]).encode()) + 1
    where = f"b.{fmt}, the line at byte {line_start}" if fmt == "jsonl" else f"b.{fmt}, row 1"
    assert where in stderr, stderr


@pytest.mark.parametrize("named", ["read", "not_read"])
def test_a_file_name_that_is_not_utf8_is_invalid_input_naming_its_bytes(tmp_path: Path, named: str) -> None:
    """Red-team finding: a directory holding a file whose name is not UTF-8 (`part-\\xff.txt`, which a
    local file system allows) had its name carried as Python's surrogate escapes into the dry-run
    document (`sourceFiles.notReadPaths`), which cannot be written as JSON: an internal error, exit 1;
    read, its records were ordered by the escapes' code points, not by the bytes of the name as the
    docstring says. Such a name is invalid input on `source.uri`, its bytes shown escaped."""
    from pcbo_dagster_tests.cli_runner import run_pcbo_in_process

    root = tmp_path / "events"
    _write(root, "dt=2024-01-01/part-0.jsonl", _file_bytes("jsonl", _records("a", 2)))
    suffix = ".jsonl" if named == "read" else ".txt"
    (root / "dt=2024-01-01" / f"part-\udcff{suffix}").write_bytes(b"")  # the byte 0xFF, surrogate-escaped
    _write(root, "_skipped/\udcff.jsonl", b"")  # (a path skipped whatever its name: never refused)
    request = {
        "runId": "dir-names",
        "dataset": "events",
        "versionLabel": "v1",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-02T00:00:00Z",
        "chunkSeconds": 86400,
        "policies": {"requireConsent": True},
        "source": {"uri": str(root)},
    }
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    out = tmp_path / "dry-run.json"
    status, _, stderr = run_pcbo_in_process(
        ["dry-run", "--input", str(path), "--output", str(out)], home=tmp_path / "home"
    )
    assert status == 2, stderr
    assert "source.uri" in stderr and f"dt=2024-01-01/part-\\xff{suffix}" in stderr, stderr
    assert "not UTF-8" in stderr and "internal error" not in stderr, stderr

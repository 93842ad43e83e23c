"""A parquet source never makes Arrow decode more than `parquet_batch_bytes()` (4 × PCBO_MAX_LINE_BYTES,
256 MiB by default) for a batch, whatever its pages compress to or its footer says: the page headers
are read first (`sources/parquet_pages.py`) and each row group is read in batches that fit, or
refused as invalid input naming `source` and the column. Ordinary files read as before."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pcbo_dagster.cli.main import main
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.sources import streaming
from pcbo_dagster.sources.record_files import jsonable_row
from pcbo_dagster.sources.zones import Window
from pcbo_dagster_tests.cli_runner import lake_files, pcbo_env, write_request
from pcbo_dagster_tests.parquet_forging import (
    column_meta,
    encode_struct,
    forge_zeros,
    get,
    put,
    read_footer,
    with_dictionary_page_moved,
    with_dictionary_values,
    with_empty_pages,
    with_first_page_damaged,
    with_footer,
    with_long_lists_in_page_headers,
    with_v2_rows,
)

MiB = 1 << 20
_REQUEST = {
    "runId": "parquet-bounds",
    "dataset": "events",
    "start": "2024-01-01T00:00:00Z",
    "end": "2024-01-02T00:00:00Z",
    "chunkSeconds": 86400,
    "policies": {"onViolation": "omit"},
}

#: Run `pcbo` with an address-space limit, printing its peak resident set size last on stderr (its
#: own, `VmHWM`: `ru_maxrss` keeps the pytest process's from before the exec).
_LIMITED = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from pcbo_dagster.cli.main import main
try:
    status = main(sys.argv[2:])
finally:
    with open("/proc/self/status") as status_file:
        peak = next(line.split()[1] for line in status_file if line.startswith("VmHWM:"))
    print("peak", int(peak) * 1024, file=sys.stderr)
sys.exit(status)
"""


def _run_limited(
    tmp_path: Path, source: Path, env: dict[str, str] | None = None, prune: bool = False
) -> tuple[int, str, int]:
    """`pcbo dry-run` of a request naming `source` (read by its zones: `prune`), under a 3 GiB address
    space (the interpreter with its libraries reserves about 1.6 GiB), with `env` set: (status,
    stderr, peak RSS bytes)."""
    named = {"uri": str(source), **({"prune": True} if prune else {})}
    request = write_request(tmp_path / "request.json", {**_REQUEST, "source": named})
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(3 << 30), "dry-run", "--input", str(request)],
        env=pcbo_env(tmp_path / "home", env),
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
        check=False,
    )
    stderr = proc.stderr.decode("utf-8", errors="replace")
    peak = [line for line in stderr.splitlines() if line.startswith("peak ")]
    assert peak, stderr[-2000:]
    return proc.returncode, stderr, int(peak[-1].split()[1])


@pytest.mark.parametrize(
    ("rows", "value_bytes", "rows_per_page", "distinct", "status", "message"),
    [
        # The README's known limit: 46 KiB, 24 rows of 60 MiB of zeros in one page, 1.4 GiB decoded
        # (it peaked at 2 GiB). One page of 1.4 GiB: no row can be read within the budget.
        (24, 60 * MiB, 24, False, 2, "row group 0: its pages say one row may decode to"),
        # 3 MB holding 1,000 rows of 100 MiB, one a page, no two alike (100 GB decoded, all of them
        # gathered in Arrow's dictionary of the column): refused before any is.
        (1000, 100 * MiB, 1, True, 2, "row group 0: its pages say one row may decode to"),
        # 20 rows of 30 MiB, one a page, no two alike (Arrow's dictionary of them grew to 600 MiB,
        # held twice): read, a few rows a batch.
        (20, 30 * MiB, 1, True, 0, None),
    ],
)
def test_plain_values_that_compress_well_are_decoded_within_the_budget(
    tmp_path: Path,
    rows: int,
    value_bytes: int,
    rows_per_page: int,
    distinct: bool,
    status: int,
    message: str | None,
) -> None:
    """Red-team finding (README, "not bounded yet"): Arrow decoded a batch of PCBO_SOURCE_BATCH rows
    before any row's size was checked, so plain values of zeros, a few kilobytes compressed, decoded
    to gigabytes (2 GiB for the first file). Now the run ends in its records or in invalid input
    naming the source and the column, and holds at most the interpreter's own 150 MiB, the budget
    (256 MiB) and the records made of at most 64 MiB of values at a time (their bytes, base64 text
    and JSON)."""
    source = forge_zeros(tmp_path / "zeros.parquet", rows, value_bytes, rows_per_page, distinct)
    assert source.stat().st_size < 4 * MiB
    code, stderr, peak = _run_limited(tmp_path, source)
    assert code == status, stderr[-2000:]
    if message is not None:
        assert "source: " in stderr and message in stderr and "column note" in stderr
        assert "PCBO_MAX_LINE_BYTES" in stderr
    assert peak < 700 * MiB, peak


def test_a_list_of_one_large_dictionary_value_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """Red-team finding: text in a list is not read as an Arrow dictionary, so 5 KB holding 2,000
    rows of a list of one 1 MiB value, written once in the dictionary page, decoded to a copy a row:
    2 GiB (here: the 3 GiB address space ran out). Its values are counted at the dictionary's
    longest value each, and, the rows of a list column's pages being unknown, all of its chunk's
    values in every batch: refused before anything is decoded, naming the column."""
    rows = 2000
    element = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array(["x" * MiB]))
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": ["2024-01-01T00:10:00Z"] * rows,
            "tags": pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), element),
        }
    )
    source = tmp_path / "lists.parquet"
    pq.write_table(table, source, compression="zstd", store_schema=False)  # (read back as list<string>)
    assert source.stat().st_size < 10_000
    code, stderr, peak = _run_limited(tmp_path, source)
    assert code == 2, stderr[-2000:]
    assert "source: " in stderr and "its pages say one row may decode to" in stderr
    assert "of column tags.list.element" in stderr
    assert peak < 400 * MiB, peak


def _written(tmp_path: Path) -> tuple[Path, Path]:
    """An ordinary file of three row groups (text, integers, a list), and a forged one to edit."""
    table = pa.table({"id": [f"r{i}" for i in range(30)], "occurredAt": ["2024-01-01T00:10:00Z"] * 30})
    pq.write_table(table, tmp_path / "plain.parquet", row_group_size=10)
    return tmp_path / "plain.parquet", forge_zeros(tmp_path / "zeros.parquet", 6, 1000, 2)


def _refused(tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """`pcbo execute` of a request naming `source`: exit 2, nothing written; its stderr."""
    home = tmp_path / "home"
    request = write_request(tmp_path / "request.json", {**_REQUEST, "source": {"uri": str(source)}})
    out = tmp_path / "out.json"
    assert main(["execute", "--input", str(request), "--home", str(home), "--output", str(out)]) == 2
    assert lake_files(home) == {} and not out.exists()
    return capsys.readouterr().err


def _edited(path: Path, edit: Any) -> Path:
    """`path` with its footer edited by `edit(footer, data)` (which may return new file bytes)."""
    data = path.read_bytes()
    footer, start = read_footer(data)
    body = edit(footer, bytearray(data[:start])) or data[:start]
    path.write_bytes(with_footer(bytes(body), footer))
    return path


def test_a_footer_that_says_less_than_the_pages_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The footer's uncompressed size of a column chunk, which Arrow neither uses nor checks, says
    less than its pages declare: a forged file, refused naming the source and the column."""
    _, zeros = _written(tmp_path)
    _edited(zeros, lambda footer, body: put(column_meta(footer, 0, 2), 6, 6, 100))
    stderr = _refused(tmp_path, zeros, capsys)
    assert "source: " in stderr and "row group 0, column note" in stderr
    assert "its pages declare 6024 bytes uncompressed" in stderr and "its footer says 100" in stderr


@pytest.mark.parametrize(
    ("garbage", "message"),
    [
        (b"\x16", "a truncated page header at byte"),  # i64 fields to past the chunk's end
        (b"\xff" * 64, "not a parquet column chunk"),
        (b"\x1c" * 200 + b"\x00" * 200, "nested too deep"),  # structs in structs
        (
            encode_struct([[1, 5, 0], [2, 5, 10], [3, 5, 1 << 30], [5, 12, [[1, 5, 2]]]]),
            "runs past its column",
        ),
        (encode_struct([[1, 5, 0], [2, 5, 10], [3, 5, 10]]), "without its count of values"),
    ],
)
def test_page_headers_that_are_not_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], garbage: bytes, message: str
) -> None:
    """The note column's first page header overwritten: garbage, a header nested past any page
    header's depth, a page longer than its chunk, a data page with no count of values."""
    _, zeros = _written(tmp_path)

    def overwrite(footer: Any, body: bytearray) -> bytearray:
        start = get(column_meta(footer, 0, 2), 9)
        end = start + get(column_meta(footer, 0, 2), 7)
        piece = garbage[: end - start] if garbage != b"\x16" else b"\x16" * (end - start)
        body[start : start + len(piece)] = piece
        return body

    _edited(zeros, overwrite)
    stderr = _refused(tmp_path, zeros, capsys)
    assert "source: " in stderr and "row group 0, column note" in stderr and message in stderr


@pytest.mark.parametrize("offset", [10**9, -5])
def test_a_column_chunk_outside_the_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], offset: int
) -> None:
    plain, _ = _written(tmp_path)

    def move(footer: Any, body: bytearray) -> None:  # its data and its dictionary page
        put(column_meta(footer, 1, 0), 9, 6, offset)
        put(column_meta(footer, 1, 0), 11, 6, offset)

    _edited(plain, move)
    stderr = _refused(tmp_path, plain, capsys)
    assert "source: " in stderr and "row group 1, column id" in stderr and "outside the file" in stderr


def _decoded_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bytes of every batch (`iter_batches`) and row group (`read_row_group`) Arrow decodes from
    now on, as a list that grows."""
    decoded: list[int] = []
    iter_batches, read_row_group = pq.ParquetFile.iter_batches, pq.ParquetFile.read_row_group

    def batches(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        for batch in iter_batches(self, *args, **kwargs):
            decoded.append(batch.get_total_buffer_size())
            yield batch

    def group(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> pa.Table:
        table = read_row_group(self, *args, **kwargs)
        decoded.append(table.get_total_buffer_size())
        return table

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", batches)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", group)
    return decoded


def _ordinary(path: Path, data_page_version: str = "1.0") -> pa.Table:
    rng = np.random.default_rng(7)
    rows = 3000
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": [f"2024-01-01T{i % 24:02d}:10:00Z" for i in range(rows)],
            "amount": pa.array(rng.integers(0, 1 << 40, rows), pa.int64()),
            "note": [rng.bytes(int(n)).hex() for n in rng.integers(0, 400, rows)],
            "tags": [[f"t{i % 5}", "x"] if i % 3 else None for i in range(rows)],
        }
    )
    # (text written plain past a dictionary's limit, as writers fall back to: here from the start)
    pq.write_table(
        table,
        path,
        row_group_size=700,
        data_page_size=8192,
        write_batch_size=16,
        use_dictionary=["id", "occurredAt", "tags"],
        data_page_version=data_page_version,
    )
    return table


@pytest.mark.parametrize("data_page_version", ["1.0", "2.0"])
def test_ordinary_row_groups_read_the_same_records_in_batches_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_page_version: str
) -> None:
    """With a budget that 700-row groups do not fit (PCBO_MAX_LINE_BYTES=64 KiB: 256 KiB a batch), a
    file of five row groups (version 1 or 2 pages) is read in smaller batches, none decoding more
    than the budget, and yields the records of the whole file read at once, in order, at their
    positions; re-read by position (`fetch_chunks`), and read by zone (`prune_zones`), they are the
    same, within the budget too. Before, every batch was 2,048 rows, 1.3 MB."""
    path = tmp_path / "ordinary.parquet"
    expected = [jsonable_row(row) for row in _ordinary(path, data_page_version).to_pylist()]
    monkeypatch.setenv("PCBO_MAX_LINE_BYTES", str(64 << 10))
    decoded = _decoded_sizes(monkeypatch)
    source = streaming.ParquetSource(str(path), "ordinary.parquet")
    batches = list(source.batches(2048))
    assert [r for records, _, _ in batches for r in records] == expected
    positions = np.concatenate([p for _, _, p in batches])
    assert positions.tolist() == list(range(len(expected)))
    assert len(decoded) > 5 and max(decoded) <= 256 << 10
    decoded.clear()
    again = [r for chunk in source.fetch_chunks(positions[::-1], 500) for r in chunk]
    assert again == expected[::-1]
    assert decoded and max(decoded) <= 256 << 10
    decoded.clear()
    zoned = streaming.ParquetSource(str(path), "ordinary.parquet")
    day = 1704067200 * 1_000_000  # 2024-01-01T00:00:00Z
    zoned.prune_zones(Window("occurredAt", False, day, day + 86_400_000_000))
    assert [r for records, _, _ in zoned.batches(2048) for r in records] == expected
    assert decoded and max(decoded) <= 256 << 10


def test_ordinary_files_read_as_before_with_the_default_budget(tmp_path: Path) -> None:
    """The default budget changes nothing for an ordinary file: Arrow's own batches of 2,048 rows
    (across row groups), the records of the whole file in order."""
    path = tmp_path / "ordinary.parquet"
    expected = [jsonable_row(row) for row in _ordinary(path).to_pylist()]
    batches = list(streaming.ParquetSource(str(path), "ordinary.parquet").batches(2048))
    with path.open("rb") as fh:
        arrow = [b.num_rows for b in pq.ParquetFile(fh).iter_batches(2048, use_threads=False)]
    assert [len(records) for records, _, _ in batches] == arrow and sum(arrow) == 3000
    assert [r for records, _, _ in batches for r in records] == expected


def test_a_row_group_re_read_by_position_is_decoded_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row group whose footer says it is small (`total_byte_size` 100) was decoded whole for the
    re-reads, however large its pages; now its pages decide, and it is read in batches within the
    budget (here 40 rows of 20 KB a page, no two alike, 800 KB; the budget 256 KiB)."""
    zeros = forge_zeros(tmp_path / "zeros.parquet", 40, 20_000, 1, distinct=True)
    _edited(zeros, lambda footer, body: put(get(footer, 4)[1][0], 2, 6, 100))
    assert pq.ParquetFile(zeros).metadata.row_group(0).total_byte_size == 100
    monkeypatch.setenv("PCBO_MAX_LINE_BYTES", str(64 << 10))
    decoded = _decoded_sizes(monkeypatch)
    source = streaming.ParquetSource(str(zeros), "zeros.parquet")
    records = [r for chunk in source.fetch_chunks(np.arange(40)[::-1], 8192) for r in chunk]
    assert [r["id"] for r in records] == [f"r{i}" for i in reversed(range(40))]
    assert decoded and max(decoded) <= 256 << 10


def test_a_ledger_field_is_read_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`max_integer_in_source` (the sensors' highest ledger) read the whole column at once; now a row
    group at a time in batches within the budget, with the same answer."""
    path = tmp_path / "ledgers.parquet"
    pq.write_table(pa.table({"ledger": pa.array(range(50_000), pa.int64())}), path, row_group_size=20_000)
    assert streaming.max_integer_in_source(str(path), "parquet", "ledger") == 49_999
    monkeypatch.setenv("PCBO_MAX_LINE_BYTES", str(1 << 20))
    read = pq.ParquetFile.read

    def whole(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the whole column read at once")

    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    assert streaming.max_integer_in_source(str(path), "parquet", "ledger") == 49_999
    monkeypatch.setattr(pq.ParquetFile, "read", read)

    def move(footer: Any, body: bytearray) -> None:
        put(column_meta(footer, 2, 0), 9, 6, 10**9)
        put(column_meta(footer, 2, 0), 11, 6, 10**9)

    _edited(path, move)
    with pytest.raises(InvalidInput, match="row group 2, column ledger: .*outside the file"):
        streaming.max_integer_in_source(str(path), "parquet", "ledger")


def test_the_forged_file_is_what_the_readme_describes(tmp_path: Path) -> None:
    """(The forging helper itself: 24 rows of 60 MiB of zeros, one page, under 47 KiB; its footer
    decodes and encodes to the same bytes.)"""
    path = forge_zeros(tmp_path / "zeros.parquet", 24, 60 * MiB, 24)
    assert path.stat().st_size < 47 << 10
    data = path.read_bytes()
    footer, start = read_footer(data)
    assert with_footer(data[:start], footer) == data
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 24 and meta.row_group(0).column(2).total_uncompressed_size > 24 * 60 * MiB


def test_a_large_ordinary_row_group_is_still_decoded_once_for_the_re_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row group of 2^20 rows of five integer, float and boolean columns (24 MiB as its footer says,
    45 MiB at Arrow's peak) is decoded whole once and kept for the re-reads, as before the page
    bounds: their count of a value of a top-level fixed-width column is its Arrow width and 4 bytes
    (counted at 32 bytes each, it came to 334 MiB, over the budget: decoded again for each re-read)."""
    rows = 1 << 20
    rng = np.random.default_rng(3)
    table = pa.table(
        {
            "amount": pa.array(rng.integers(0, 1 << 40, rows)),
            "score": pa.array(rng.random(rows)),
            "flag": pa.array(rng.integers(0, 2, rows).astype(bool)),
            "small": pa.array(rng.integers(0, 100, rows).astype(np.int32)),
            "maybe": pa.array(np.arange(rows), mask=np.arange(rows) % 7 == 0),
        }
    )
    path = tmp_path / "large.parquet"
    pq.write_table(table, path, row_group_size=rows)
    assert pq.ParquetFile(path).metadata.row_group(0).total_byte_size < streaming.PARQUET_CACHE_BYTES
    whole: list[int] = []
    read_row_group = pq.ParquetFile.read_row_group

    def counted(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> pa.Table:
        whole.append(1)
        return read_row_group(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    source = streaming.ParquetSource(str(path), "large.parquet")
    for positions in (np.arange(0, rows, 4099), np.arange(rows - 1, 0, -8191)):
        records = source.fetch(positions)
        assert [r["amount"] for r in records] == table.column("amount").take(positions).to_pylist()
    assert whole == [1]


@pytest.mark.parametrize("v2_rows", [1, 10**6])
def test_a_version_2_page_of_a_flat_column_is_counted_by_its_values_not_the_rows_it_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, v2_rows: int
) -> None:
    """Red-team finding: a version 2 page header says how many rows the page holds, and Arrow does not
    check it for a column with no repeated level (a value is a row); its batches take values. 40
    version 2 pages of one 20 KB value each (800 KB, the budget 256 KiB) saying they hold a million
    rows each were counted as a batch touching two of them, and all 40 were decoded at once. Counted
    by their values, they are read a few at a time, the same records as when they say one row."""
    zeros = forge_zeros(tmp_path / "zeros.parquet", 40, 20_000, 1, distinct=True, v2_rows=v2_rows)
    monkeypatch.setenv("PCBO_MAX_LINE_BYTES", str(64 << 10))
    decoded = _decoded_sizes(monkeypatch)
    source = streaming.ParquetSource(str(zeros), "zeros.parquet")
    records = [r for records, _, _ in source.batches(8192) for r in records]
    assert [r["id"] for r in records] == [f"r{i}" for i in range(40)]
    assert len(decoded) > 1 and max(decoded) <= 256 << 10


@pytest.mark.parametrize("rows_claimed", [1, 50])
def test_a_version_2_page_of_a_list_column_is_counted_by_the_rows_its_levels_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows_claimed: int
) -> None:
    """Red-team finding: a version 2 page header of a list column says how many rows the page holds,
    and Arrow does not check it (its repetition levels say where rows begin). 200 pages of one row
    of 50 values of 1,000 bytes each (10 MB decoded, the budget 256 KiB) saying they hold 50 rows
    were counted as a batch of 50 rows touching two of them, and decoded 50 at once. Counted by
    the rows their repetition levels begin, they are read a few rows at a time, the same records."""
    rows = 200
    table = pa.table({"tags": [[f"{i:04d}" * 250] * 50 for i in range(rows)]})
    path = tmp_path / "lists.parquet"
    pq.write_table(
        table,
        path,
        data_page_version="2.0",
        use_dictionary=False,
        data_page_size=1,
        write_batch_size=1,
        compression="zstd",
    )
    with_v2_rows(path, rows_claimed)
    assert pq.ParquetFile(path).read().equals(table)  # (Arrow takes the rows its levels say)
    monkeypatch.setenv("PCBO_MAX_LINE_BYTES", str(64 << 10))
    decoded = _decoded_sizes(monkeypatch)
    source = streaming.ParquetSource(str(path), "lists.parquet")
    records = [r for records, _, _ in source.batches(8192) for r in records]
    assert records == [jsonable_row(row) for row in table.to_pylist()]
    assert len(decoded) > 1 and max(decoded) <= 256 << 10


@pytest.mark.parametrize(("elements", "status"), [(1_000_000, 0), (1_000_001, 2)])
def test_a_page_header_arrow_refuses_is_refused_as_invalid_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], elements: int, status: int
) -> None:
    """Red-team finding: a page header holding a list of more than 1,000,000 elements (in a field no
    reader knows) passed the page headers' check, and Arrow then refused it (its Thrift container
    limit) with an `OSError`: the run ended in exit 1, "Couldn't deserialize thrift", as a store
    failure, not naming the source. Now it is invalid input naming the source and the column; a list
    of 1,000,000, which Arrow reads, is still read."""
    source = forge_zeros(tmp_path / "zeros.parquet", 2, 1000, 2)
    with_long_lists_in_page_headers(source, elements)
    home = tmp_path / "home"
    request = write_request(tmp_path / "request.json", {**_REQUEST, "source": {"uri": str(source)}})
    out = tmp_path / "out.json"
    code = main(["execute", "--input", str(request), "--home", str(home), "--output", str(out)])
    stderr = capsys.readouterr().err
    assert code == status, stderr
    if status:
        assert lake_files(home) == {} and not out.exists()
        assert "source: " in stderr and "row group 0, column note" in stderr
        assert "a list or map of 1000001 elements" in stderr


def test_the_headers_of_a_row_group_s_pages_are_kept_within_the_budget(tmp_path: Path) -> None:
    """Red-team finding: every page header read was kept (288 bytes a page) for every row group of
    the file at once, so 17 MB holding a million pages of no bytes (11 bytes each) took 250 MB more than
    the interpreter, whatever the budget (here 16 MiB: PCBO_MAX_LINE_BYTES=4 MiB). Now a row
    group's kept headers may take no more than the budget: refused naming the source, the row group
    and the count of pages, after reading no more of them than that."""
    source = with_empty_pages(forge_zeros(tmp_path / "zeros.parquet", 2, 1000, 2), 1_000_000, values=1)
    code, stderr, peak = _run_limited(tmp_path, source, {"PCBO_MAX_LINE_BYTES": str(4 * MiB)})
    assert code == 2, stderr[-2000:]
    assert "source: " in stderr and "row group 0: more than" in stderr and "pages" in stderr
    assert peak < 200 * MiB, peak


@pytest.mark.parametrize("encoding", ["DELTA_BYTE_ARRAY", "DELTA_LENGTH_BYTE_ARRAY"])
@pytest.mark.parametrize("footer_lists_it", [True, False])
def test_text_written_with_delta_byte_array_is_read_dense(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], footer_lists_it: bool, encoding: str
) -> None:
    """Red-team finding: text written DELTA_BYTE_ARRAY or DELTA_LENGTH_BYTE_ARRAY (ordinary pyarrow
    options) cannot be read as an Arrow dictionary ("Not yet implemented: DecodeArrow of
    DictAccumulator for DeltaByteArrayDecoder", an `OSError`: exit 1). A column whose chunks' footer
    lists that encoding is read dense, the same records as Arrow reads; one whose footer hides it is
    a forged file, refused naming the source and the column before Arrow reads it."""
    rows = 500
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": [f"2024-01-01T00:{i % 60:02d}:00Z" for i in range(rows)],
        }
    )
    path = tmp_path / "delta.parquet"
    pq.write_table(table, path, use_dictionary=False, column_encoding={"id": encoding})
    if footer_lists_it:
        source = streaming.ParquetSource(str(path), "delta.parquet")
        records = [r for records, _, _ in source.batches(128) for r in records]
        assert records == [jsonable_row(row) for row in table.to_pylist()]
        assert source.fetch(np.array([499, 3])) == [records[499], records[3]]
        return
    _edited(path, lambda footer, body: put(column_meta(footer, 0, 0), 2, 9, (5, [0, 3])))
    stderr = _refused(tmp_path, path, capsys)
    assert "source: " in stderr and "row group 0, column id" in stderr and encoding in stderr


def test_a_data_page_of_no_values_is_refused_not_read_as_the_end_of_the_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Red-team finding: a data page declaring no values ends Arrow's reading of its column, and
    Arrow's batches of the file then end there without an error: a file whose footer says 2 rows,
    the pages of its last column preceded by three empty pages, read as no records at all (dry-run
    and execute: exit 0, nothing omitted, nothing added). Now it is invalid input naming the source."""
    source = with_empty_pages(forge_zeros(tmp_path / "zeros.parquet", 2, 1000, 2), 3)
    assert [b.num_rows for b in pq.ParquetFile(source).iter_batches(8192)] == []  # (Arrow's own)
    stderr = _refused(tmp_path, source, capsys)
    assert "source: " in stderr and "row group 0, column note" in stderr and "no values" in stderr


@pytest.mark.parametrize(
    ("twice", "arrow_says", "refused_as"),
    [
        (True, "more than one dictionary", "a dictionary page that is not its chunk's first page"),
        (
            False,
            "Dictionary page must be before data page",
            "written with a dictionary before any dictionary page",
        ),
    ],
    ids=["written twice", "written after the data pages"],
)
def test_a_dictionary_page_written_twice_or_after_the_data_pages_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], twice: bool, arrow_says: str, refused_as: str
) -> None:
    """Red-team finding: a column chunk's dictionary page written twice passed the page headers' check
    and Arrow then refused it with an `OSError` ("Column cannot have more than one dictionary"). And
    the README's known limit: one written after its data pages passed the check too (it lies past the
    pages holding the footer's count of values, where the scan stops) and Arrow refused it ("Dictionary
    page must be before data page"); its headers show it: a data page written with a dictionary before
    any dictionary page. Both were exit 1, as a store failure, not naming the source. Now each is
    invalid input naming the source and the column."""
    rows = 6
    table = pa.table({"id": [f"r{i}" for i in range(rows)], "occurredAt": ["2024-01-01T00:10:00Z"] * rows})
    source = tmp_path / "dictionary.parquet"
    pq.write_table(table, source, compression="none")
    with_dictionary_page_moved(source, 1, twice=twice)
    with pytest.raises(OSError, match=arrow_says):
        pq.read_table(source)
    stderr = _refused(tmp_path, source, capsys)
    assert "source: " in stderr and "row group 0, column occurredAt" in stderr
    assert refused_as in stderr


def _two_groups(path: Path, codec: str = "none", first: str = "r") -> pa.Table:
    """A file of two row groups of 2,000 rows: text `id` (one value a row, written plain; those of the
    first row group begin with `first`, the others with "r"), text `occurredAt` and an integer
    `ledger`, compressed with `codec`."""
    rows = 4000
    table = pa.table(
        {
            "id": [f"{first if i < 2000 else 'r'}{i:06d}" for i in range(rows)],
            "occurredAt": [f"2024-01-01T{i % 24:02d}:10:00Z" for i in range(rows)],
            "ledger": pa.array(range(rows), pa.int64()),
        }
    )
    pq.write_table(table, path, compression=codec, row_group_size=2000, use_dictionary=False)
    return table


#: Compressed pages damaged: (codec, bytes written over the page's first ones, bytes taken off the
#: uncompressed size its header declares, what Arrow says).
_DAMAGED = [
    ("zstd", b"\xde\xad\xbe\xef", 0, "ZSTD decompression failed"),
    ("snappy", b"\xff\xff\xff\xff\x0f", 0, "Output buffer size"),
    ("snappy", b"", 1, "Output buffer size"),
    ("zstd", b"", 1, "ZSTD decompression failed"),
    ("gzip", b"\0" * 16, 0, "GZipCodec failed"),
]


@pytest.mark.parametrize(("codec", "payload", "shrink", "arrow_says"), _DAMAGED)
def test_a_page_that_does_not_decompress_as_its_header_says_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    codec: str,
    payload: bytes,
    shrink: int,
    arrow_says: str,
) -> None:
    """The README's known limit: a compressed page whose bytes do not decompress, or decompress to
    another size than its header declares, was an error Arrow raises (an `OSError` or a `ValueError`)
    that ended the run in exit 1 as a store failure. Only Arrow sees it, decoding bytes already read
    into memory: the file's fault, invalid input naming the source, the file, the row group and the
    column, nothing written."""
    source = tmp_path / "damaged.parquet"
    _two_groups(source, codec)
    with_first_page_damaged(source, 1, 0, payload, shrink)
    with pytest.raises((OSError, ValueError), match=arrow_says):
        pq.read_table(source)
    stderr = _refused(tmp_path, source, capsys)
    assert "source: " in stderr and str(source) in stderr and "row group 1" in stderr, stderr
    assert "column id" in stderr and "not a readable parquet row group" in stderr, stderr


def test_every_read_of_a_damaged_page_is_invalid_input(tmp_path: Path) -> None:
    """Each path on which Arrow decodes a parquet source's pages refuses a damaged page as invalid
    input naming `source`, the file, the row group and the column: the records read by position
    (`fetch`), the zones of a pruned read (the `occurredAt` column read for its bounds), the
    sensors' highest ledger (`max_integer_in_source`), and a directory of parquet files. Before,
    Arrow's `OSError` was a store failure (exit 1), or, for the sensors, "cannot be read" naming
    `source.uri` and no column."""
    from pcbo_dagster.sources.hive_directories import open_directory_source

    source = tmp_path / "damaged.parquet"
    _two_groups(source, "zstd")
    damaged = with_first_page_damaged(source, 1, 1, b"\xde\xad\xbe\xef")
    damage = "not a readable parquet row group"
    with pytest.raises(InvalidInput, match=f"^source: {damaged}: row group 1, column occurredAt: {damage}"):
        streaming.ParquetSource(str(damaged), str(damaged)).fetch(np.array([2500]))
    day = 1704067200 * 1_000_000  # 2024-01-01T00:00:00Z
    zoned = streaming.ParquetSource(str(damaged), str(damaged))
    zoned.prune_zones(Window("occurredAt", False, day, day + 86_400_000_000))
    with pytest.raises(InvalidInput, match=f"^source: {damaged}: row group 1, column occurredAt: {damage}"):
        list(zoned.batches(2048))
    ledgers = tmp_path / "ledgers" / "damaged.parquet"
    ledgers.parent.mkdir()
    _two_groups(ledgers, "zstd")
    with_first_page_damaged(ledgers, 1, 2, b"\xde\xad\xbe\xef")
    with pytest.raises(InvalidInput, match=f"^source: {ledgers}: row group 1, column ledger: {damage}"):
        streaming.max_integer_in_source(str(ledgers), "parquet", "ledger")
    directory = open_directory_source(str(ledgers.parent), "ledgers", "parquet", None)
    with pytest.raises(
        InvalidInput, match=f"^source: .*damaged.parquet: row group 1, column ledger: {damage}"
    ):
        list(directory.batches(2048))


def test_arrow_decodes_the_bytes_the_header_scan_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's known limit: a file changed between the page headers' scan and Arrow's read was
    decoded as it then was, not as it was checked (the scan of every row group came first, Arrow's
    reads of the file after). Now a row group's column chunks are read into memory once, and the
    scan and Arrow read those bytes: a file whose first row group is rewritten in place right after
    its pages were scanned gives that group's records as they were scanned."""
    path = tmp_path / "rewritten.parquet"
    before = _two_groups(path, first="a")
    _two_groups(tmp_path / "after.parquet", first="b")
    rewritten = (tmp_path / "after.parquet").read_bytes()
    assert len(rewritten) == path.stat().st_size and rewritten != path.read_bytes()
    scan = streaming.row_group_pages
    scanned: list[int] = []

    def scan_then_rewrite(*args: Any, **kwargs: Any) -> Any:
        pages = scan(*args, **kwargs)
        scanned.append(pages.group)
        with path.open("r+b") as fh:  # (in place: the source's open handle reads the new bytes)
            fh.write(rewritten)
        return pages

    monkeypatch.setattr(streaming, "row_group_pages", scan_then_rewrite)
    source = streaming.ParquetSource(str(path), "rewritten.parquet")
    records = [r for records, _, _ in source.batches(8192) for r in records]
    assert scanned[0] == 0 and path.read_bytes() == rewritten
    assert records == [jsonable_row(row) for row in before.to_pylist()]


def test_a_store_that_fails_while_a_row_group_is_read_is_still_a_store_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A source whose reads fail (EIO) once its footer is read: the store failed, not the file; exit 1
    as every store failure, nothing written, never invalid input (a guard: the failure happens while
    bytes are read from the store, before Arrow decodes any)."""
    source = tmp_path / "source.parquet"
    _two_groups(source, "zstd")
    footer_at = source.stat().st_size - 8 - int.from_bytes(source.read_bytes()[-8:-4], "little")

    class FailingDisk(io.FileIO):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() < footer_at:
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(source))
            return super().read(size)

    monkeypatch.setattr(streaming, "open_source_file", lambda path, root=None: FailingDisk(path))
    home = tmp_path / "home"
    request = write_request(tmp_path / "request.json", {**_REQUEST, "source": {"uri": str(source)}})
    out = tmp_path / "out.json"
    assert main(["execute", "--input", str(request), "--home", str(home), "--output", str(out)]) == 1
    stderr = capsys.readouterr().err
    assert "Input/output error" in stderr and "invalid input" not in stderr, stderr
    assert lake_files(home) == {} and not out.exists()


def test_a_footer_that_does_not_parse_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A footer whose Thrift does not parse ("Couldn't deserialize thrift", an `OSError` Arrow raises
    reading it from the file) ended the run in exit 1 as a store failure. The footer is read into
    memory first and Arrow parses those bytes: invalid input naming `source.uri` and the file."""
    source = tmp_path / "footer.parquet"
    _two_groups(source)
    data = bytearray(source.read_bytes())
    at = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    data[at : at + 6] = b"\xff" * 6
    source.write_bytes(bytes(data))
    with pytest.raises(OSError, match="Couldn't deserialize thrift"):
        pq.ParquetFile(source)
    stderr = _refused(tmp_path, source, capsys)
    assert f"source.uri: {source}: not a readable parquet file: Couldn't deserialize thrift" in stderr, stderr


def test_a_source_on_an_object_store_that_fails_while_it_is_read_is_a_store_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], s3_store: Any
) -> None:
    """A parquet source on S3 (moto behind `FaultyProxy`) reads the records the same file does locally,
    its row groups read into memory with one ranged read each; when the store answers 503 to every
    read after the footer's, the run stops as a store failure (exit 1, nothing written), never as
    invalid input: the store failed while bytes were read, before Arrow decoded any."""
    from pcbo_dagster_tests.faulty_proxy import FaultyProxy

    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    local = tmp_path / "local.parquet"
    table = _two_groups(local)  # (170 KB: its row groups lie before the 64 KiB read for its footer)
    key = f"{s3_store.bucket}/sources/{tmp_path.name}.parquet"
    s3_store.filesystem().pipe_file(key, local.read_bytes())
    proxy = FaultyProxy(s3_store.env["PCBO_S3_ENDPOINT_URL"])
    try:
        monkeypatch.setenv("PCBO_S3_ENDPOINT_URL", proxy.url)
        uri = f"s3://{key}"
        source = streaming.ParquetSource(uri, uri)
        expected = [jsonable_row(row) for row in table.to_pylist()]
        assert [r for records, _, _ in source.batches(1500) for r in records] == expected
        assert source.fetch(np.array([3999, 0])) == [expected[3999], expected[0]]
        reads: list[str] = []

        def after_the_footer(method: str, path: str) -> bool:
            if method != "GET" or not path.split("?")[0].endswith(key.split("/", 1)[1]):
                return False
            reads.append(path)
            return len(reads) > 1

        proxy.fail(after_the_footer, "503")
        home = tmp_path / "home"
        request = write_request(tmp_path / "request.json", {**_REQUEST, "source": {"uri": uri}})
        out = tmp_path / "out.json"
        code = main(["execute", "--input", str(request), "--home", str(home), "--output", str(out)])
        stderr = capsys.readouterr().err
        assert code == 1, stderr
        assert len(reads) > 1 and "Service Unavailable" in stderr and "invalid input" not in stderr, stderr
        assert lake_files(home) == {} and not out.exists()
    finally:
        proxy.close()


def test_a_file_cut_short_while_it_is_read_is_refused_as_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file cut short once its footer is read: its second row group was called forged ("its byte
    range ... is outside the file", the file's size measured again for each row group's scan). Now the
    file's size is the one it had when it was opened, and reading a row group's bytes into memory
    finds fewer of them: invalid input naming `source` and the file as changed while it was read."""
    source = tmp_path / "cut.parquet"
    _two_groups(source)
    opened = streaming._parquet_file

    def then_cut(*args: Any) -> Any:
        parquet = opened(*args)
        with source.open("r+b") as fh:
            fh.truncate(source.stat().st_size // 2)
        return parquet

    monkeypatch.setattr(streaming, "_parquet_file", then_cut)
    stderr = _refused(tmp_path, source, capsys)
    assert f"source: {source}: changed while it was read" in stderr, stderr


@pytest.mark.parametrize("pruned", [False, True])
def test_rows_of_many_row_groups_are_gathered_into_a_batch_only_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pruned: bool
) -> None:
    """Row groups of one row of 10 KB each (100 of them), each within the budget (256 KiB with
    PCBO_MAX_LINE_BYTES=64 KiB): their rows are gathered into batches of up to `size` rows only while
    the row groups they come from may decode within the budget together. A zone read (`prune_zones`)
    gathered all 100 rows, 1 MB, into one batch."""
    rows = 100
    rng = np.random.default_rng(3)
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": ["2024-01-01T00:10:00Z"] * rows,
            "note": [rng.bytes(10_000) for _ in range(rows)],
        }
    )
    path = tmp_path / "groups.parquet"
    pq.write_table(table, path, row_group_size=1, use_dictionary=False)
    monkeypatch.setenv("PCBO_MAX_LINE_BYTES", str(64 << 10))
    source = streaming.ParquetSource(str(path), "groups.parquet")
    if pruned:
        day = 1704067200 * 1_000_000  # 2024-01-01T00:00:00Z
        source.prune_zones(Window("occurredAt", False, day, day + 86_400_000_000))
    batches = [records for records, _, _ in source.batches(8192)]
    assert [r for records in batches for r in records] == [jsonable_row(row) for row in table.to_pylist()]
    largest = max(len(records) for records in batches)
    assert 1 < largest and largest * 10_000 <= 256 << 10, [len(records) for records in batches]


def _rows_claimed(path: Path, group: int, rows: int) -> Path:
    """`path` with row group `group`'s footer saying it holds `rows` rows (its pages as written)."""
    return _edited(path, lambda footer, body: put(get(footer, 4)[1][group], 3, 6, rows))


@pytest.mark.parametrize("rows", [15, 5, 0, -1, 1 << 20])
def test_a_row_group_whose_footer_miscounts_its_rows_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: int
) -> None:
    """Red-team finding: a row group of 10 rows whose footer says it holds `rows`. Saying more (15),
    Arrow decoded its 10 and pass 1 numbered the rows after them from where they were gathered, not
    from the next row group's first row, so re-reading the records added (by position) ended in
    Arrow's "Index 10 out of bounds", exit 1; saying
    fewer, Arrow read that many and the others were silently dropped. A top-level column holds a
    value a row: pages of 10 values are not a row group of `rows`, invalid input naming the source,
    the row group and the column, nothing written."""
    source = tmp_path / "rows.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(30)], "occurredAt": ["2024-01-01T00:10:00Z"] * 30})
    pq.write_table(table, source, row_group_size=10)
    _rows_claimed(source, 0, rows)
    request = {**_REQUEST, "policies": {"onViolation": "omit", "requireConsent": False}}
    write_request(tmp_path / "request.json", {**request, "source": {"uri": str(source)}})
    home, out = tmp_path / "home", tmp_path / "out.json"
    code = main(
        ["execute", "--input", str(tmp_path / "request.json"), "--home", str(home), "--output", str(out)]
    )
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert lake_files(home) == {} and not out.exists()
    assert f"source: {source}: row group 0, column id: not a parquet column chunk" in stderr, stderr
    assert f"its pages hold 10 values, its row group says {rows} rows" in stderr, stderr


@pytest.mark.parametrize("data_page_version", ["1.0", "2.0"])
def test_a_row_group_of_lists_whose_footer_says_more_rows_is_refused(
    tmp_path: Path, data_page_version: str
) -> None:
    """The same finding for a file of list columns only, whose version 1 pages do not say
    how many rows they hold: a row group of 10 rows said to hold 15 was read as its 10, the next row
    group's rows numbered from the 11th, not the 16th, as if they were the first one's (re-read by
    those positions: out of bounds). Its version 2 pages' repetition levels count its rows; a row
    group read whole counts its rows decoded: fewer than its footer says is invalid input naming the
    source and the row group."""
    source = tmp_path / "lists.parquet"
    table = pa.table({"tags": [[f"t{i}", "x"] for i in range(30)], "s": [[{"a": i}] for i in range(30)]})
    pq.write_table(table, source, row_group_size=10, data_page_version=data_page_version)
    _rows_claimed(source, 0, 15)
    with pytest.raises(InvalidInput, match=f"^source: {source}: row group 0"):
        list(streaming.ParquetSource(str(source), str(source)).batches(2048))


def test_a_list_column_written_with_an_empty_page_is_read(tmp_path: Path) -> None:
    """Red-team finding: pyarrow writing pages of one value (data_page_size=1) ends a list column's
    chunk with a data page of no values before its last page, which Arrow reads on past; the file was
    refused ("a data page of no values"), a valid file. Its records are Arrow's, re-read by position
    too. (An empty page before any of a chunk's data, where Arrow's column ends, is still refused.)"""
    source = tmp_path / "pages.parquet"
    rows = 300
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": ["2024-01-01T00:10:00Z"] * rows,
            "tags": [[f"t{i % 5}", None, "x"] if i % 3 else None for i in range(rows)],
        }
    )
    pq.write_table(table, source, data_page_size=1, write_batch_size=1, row_group_size=100)
    expected = [jsonable_row(row) for row in pq.read_table(source).to_pylist()]
    assert expected == [jsonable_row(row) for row in table.to_pylist()]
    parquet = streaming.ParquetSource(str(source), str(source))
    assert [r for records, _, _ in parquet.batches(64) for r in records] == expected
    assert parquet.fetch(np.arange(rows)[::-7]) == expected[::-7]


def test_an_empty_page_before_a_list_column_s_values_is_still_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A guard: a data page of no values before the first values of a list column's chunk (where
    Arrow's reading of the column ends) is refused as before, naming the source and the column."""
    source = tmp_path / "lists.parquet"
    table = pa.table(
        {"id": ["a", "b"], "occurredAt": ["2024-01-01T00:10:00Z"] * 2, "tags": [["x"], ["y", "z"]]}
    )
    pq.write_table(table, source, use_dictionary=False)
    stderr = _refused(tmp_path, with_empty_pages(source, 1), capsys)
    assert "row group 0, column tags.list.element" in stderr and "a data page of no values" in stderr


@pytest.mark.parametrize("chunks", [2, 5])
def test_a_row_group_of_other_columns_than_the_schema_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], chunks: int
) -> None:
    """Red-team finding: a row group whose footer lists 2 (or 5) column chunks where the schema has
    4 columns ended the run in pyarrow's "IndexError: 2 out of bounds" (the footer's encodings
    read at open; "4 out of bounds", the pages' scan), exit 1 as an internal error. Invalid input
    naming `source.uri`, the file and the row group, nothing written."""
    source = tmp_path / "columns.parquet"
    rows = 30
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": ["2024-01-01T00:10:00Z"] * rows,
            "amount": pa.array(range(rows), pa.int64()),
            "tags": [[f"t{i}"] for i in range(rows)],
        }
    )
    pq.write_table(table, source, row_group_size=10)

    def listed(footer: Any, body: bytearray) -> None:
        kind, columns = get(get(footer, 4)[1][1], 1)
        put(get(footer, 4)[1][1], 1, 9, (kind, (columns + columns)[:chunks]))

    _edited(source, listed)
    stderr = _refused(tmp_path, source, capsys)
    assert (
        f"source.uri: {source}: not a readable parquet file: row group 1 has {chunks} column chunks" in stderr
    )
    assert "its schema 4 columns" in stderr, stderr


def test_view_columns_are_read_and_re_read_as_the_types_they_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: pyarrow writes string_view and binary_view columns (its schema stored in the
    file says so), and reads them back as such; pass 1 read them, but re-reading a record by position
    took rows of them (`take`), for which Arrow has no kernel: `pcbo execute` ended in "internal error
    (ArrowNotImplementedError: Function 'array_take' has no kernel matching input types (string_view,
    int64))", exit 1. They are read as string and binary (a list_view, which Arrow
    takes rows of, and whose cast to a list makes an invalid array, is kept): the same records,
    re-read too (also row groups read, and re-read, a batch at a time within a small budget)."""
    source = tmp_path / "views.parquet"
    rows = 300
    table = pa.table(
        {
            "id": pa.array([f"r{i}" for i in range(rows)], pa.string_view()),
            "occurredAt": pa.array(["2024-01-01T00:10:00Z"] * rows, pa.string_view()),
            "blob": pa.array([bytes([i % 256]) * (i % 7) for i in range(rows)], pa.binary_view()),
            "notes": pa.array([{"n": [f"n{i}"]} for i in range(rows)]),
            "tags": pa.ListViewArray.from_arrays(
                pa.array(range(rows), pa.int32()), pa.array([1] * rows, pa.int32()), pa.array(range(rows))
            ),
        }
    )
    pq.write_table(table, source, row_group_size=100, use_dictionary=["occurredAt"])
    assert pq.ParquetFile(source).schema_arrow.field("id").type == pa.string_view()
    expected = [jsonable_row(row) for row in table.to_pylist()]
    parquet = streaming.ParquetSource(str(source), str(source))
    assert [r for records, _, _ in parquet.batches(64) for r in records] == expected
    assert parquet.fetch(np.arange(rows)[::-7]) == expected[::-7]
    monkeypatch.setenv("PCBO_MAX_LINE_BYTES", str(8 << 10))  # (row groups read in batches)
    small = streaming.ParquetSource(str(source), str(source))
    assert [r for records, _, _ in small.batches(64) for r in records] == expected
    assert small.fetch(np.arange(rows)[::-7]) == expected[::-7]


def test_a_row_group_of_lists_said_to_hold_more_rows_than_values_is_refused_before_it_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: a zone read (`prune_zones`) of a file whose time column is a list decodes that
    column of each row group whole (`_column_bounds`), and Arrow reserves memory for as many rows as
    the footer says before reading any: a row group of 10 rows said to hold 2**40 asked for 2 TiB
    (`ArrowMemoryError`, exit 1, or as much memory as the host lends). Every row holds at least one
    value (a level) of every column, so pages of fewer values than the rows are not the row group:
    invalid input naming the source, the row group and the column, found by the pages' scan, before
    Arrow decodes anything."""
    source = tmp_path / "lists.parquet"
    table = pa.table(
        {"id": [[f"r{i}"] for i in range(30)], "occurredAt": [["2024-01-01T00:10:00Z"] for _ in range(30)]}
    )
    pq.write_table(table, source, row_group_size=10)
    _rows_claimed(source, 0, 1 << 24)
    decoded = _decoded_sizes(monkeypatch)
    zoned = streaming.ParquetSource(str(source), str(source))
    day = 1704067200 * 1_000_000  # 2024-01-01T00:00:00Z
    with pytest.raises(
        InvalidInput, match=f"^source: {source}: row group 0, column occurredAt.list.element: not a parquet"
    ):
        zoned.prune_zones(Window("occurredAt", False, day, day + 86_400_000_000))
        list(zoned.batches(2048))
    assert decoded == []


def test_a_dictionary_page_of_fewer_values_than_its_indices_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Red-team finding: a text column's dictionary page saying it holds 1 value where its data pages'
    indices reach 29. Read as an Arrow dictionary (`_parquet_file`), Arrow does not check the indices
    (read as text, it refuses them: "Index not in dictionary bounds"), and the batch held an invalid
    array, whose values' sizes were looked up out of bounds: numpy's IndexError, exit 1 (and its
    values, read, would be bytes past the dictionary). Invalid input naming the source, the row
    group and the column, nothing written; re-read by position too."""
    source = tmp_path / "dictionary.parquet"
    rows = 30
    table = pa.table({"id": [f"r{i}" for i in range(rows)], "occurredAt": ["2024-01-01T00:10:00Z"] * rows})
    pq.write_table(table, source, compression="none", row_group_size=10)
    with_dictionary_values(source, 1, 0, 1)
    with pytest.raises(pa.ArrowInvalid, match="Index not in dictionary bounds"):
        pq.read_table(source)
    stderr = _refused(tmp_path, source, capsys)
    damage = "row group 1, column id: not a readable parquet row group: Index not in dictionary bounds"
    assert f"source: {source}: {damage}" in stderr, stderr
    with pytest.raises(InvalidInput, match=f"^source: {source}: {damage}"):
        streaming.ParquetSource(str(source), str(source)).fetch(np.array([15]))


@pytest.mark.parametrize(
    ("size_statistics", "said"),
    [
        ([[3, 9, (6, [1, 2, 3])]], "a definition level histogram of 3 levels (the column has 2)"),
        ([[2, 9, (6, [1, 2])]], "a repetition level histogram of 2 levels (the column has 1)"),
        ([[1, 6, 10]], "an unencoded byte array size on a column of INT64"),
    ],
)
def test_column_metadata_pyarrow_aborts_on_is_refused(
    tmp_path: Path, size_statistics: list[Any], said: str
) -> None:
    """Red-team finding (byte flips in a footer): a column chunk's size statistics whose level
    histogram has another length than the column's levels + 1 (or an unencoded byte array size on
    a column that is not BYTE_ARRAY) makes Arrow throw where pyarrow does not catch it
    (`RowGroupMetaData.column`: "terminate called after throwing an instance of
    'parquet::ParquetException'"): the process aborted (SIGABRT), a worker serving other runs with
    it, no message. The footer is checked for it before pyarrow reads a column chunk's metadata:
    invalid input naming `source.uri`, the file, the row group and the column."""
    source = tmp_path / "statistics.parquet"
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(30)],
            "occurredAt": ["2024-01-01T00:10:00Z"] * 30,
            "amount": pa.array(range(30), pa.int64()),
        }
    )
    pq.write_table(table, source, row_group_size=10)
    _edited(source, lambda footer, body: put(column_meta(footer, 1, 2), 16, 12, size_statistics))
    code, stderr, _ = _run_limited(tmp_path, source)
    assert code == 2, stderr[-2000:]
    assert f"source.uri: {source}: not a readable parquet file: row group 1, column amount: {said}" in stderr


def test_a_column_named_in_bytes_that_are_not_utf_8_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Red-team finding (byte flips in a footer): a column whose name in the schema is not UTF-8
    ended the run in pyarrow's UnicodeDecodeError opening the file, exit 1 as an internal error.
    Invalid input naming `source.uri` and the file, nothing written."""
    source = tmp_path / "names.parquet"
    table = pa.table({"id": ["a", "b"], "occurredAt": ["2024-01-01T00:10:00Z"] * 2, "amount": [1, 2]})
    pq.write_table(table, source, store_schema=False)
    _edited(source, lambda footer, body: put(get(footer, 2)[1][3], 4, 8, b"am\xffunt"))
    stderr = _refused(tmp_path, source, capsys)
    assert f"source.uri: {source}: not a readable parquet file: 'utf-8' codec can't decode" in stderr, stderr


def test_a_compression_codec_or_statistics_pyarrow_aborts_on_is_refused(tmp_path: Path) -> None:
    """Red-team finding (byte flips in a footer), as the one above: a column chunk's codec Arrow does
    not know (read for a list of text's dictionary page: `ColumnChunkMetaData.compression`), and a
    time column's statistics whose min is 3 bytes of an INT64 (read for a zone read's bounds:
    `.statistics`), made Arrow throw where pyarrow does not catch it: the process aborted. Each is
    invalid input naming `source.uri`, the row group and the column, found in the footer first."""
    rows = 30
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": pa.array([1704067800_000_000] * rows, pa.timestamp("us", "UTC")),
            "tags": [[f"t{i % 3}"] for i in range(rows)],
        }
    )
    codec = tmp_path / "codec.parquet"
    pq.write_table(table, codec, row_group_size=10)
    _edited(codec, lambda footer, body: put(column_meta(footer, 1, 2), 4, 5, 99))
    code, stderr, _ = _run_limited(tmp_path, codec)
    assert code == 2, stderr[-2000:]
    said = "row group 1, column tags.list.element: a compression codec numbered 99"
    assert f"source.uri: {codec}: not a readable parquet file: {said}" in stderr, stderr
    statistics = tmp_path / "statistics.parquet"
    pq.write_table(table, statistics, row_group_size=10)
    _edited(statistics, lambda footer, body: put(get(column_meta(footer, 1, 1), 12), 6, 8, b"abc"))
    code, stderr, _ = _run_limited(tmp_path, statistics, prune=True)
    assert code == 2, stderr[-2000:]
    said = "row group 1, column occurredAt: a statistics' min or max of 3 bytes (a value of it takes 8)"
    assert f"source.uri: {statistics}: not a readable parquet file: {said}" in stderr, stderr


def test_a_column_chunk_of_another_physical_type_than_its_column_is_refused(tmp_path: Path) -> None:
    """Red-team finding (byte flips in a footer), as the two above: a time column's chunk whose
    metadata says a physical type numbered 9 (none) made a zone read's `.statistics` throw
    ("ColumnMetaData type does not match ColumnDescriptor physical type: UNKNOWN vs. INT64") where
    pyarrow does not catch it: the process aborted. Invalid input naming `source.uri`, the row group
    and the column, found in the footer first."""
    rows = 30
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": pa.array([1704067800_000_000] * rows, pa.timestamp("us", "UTC")),
        }
    )
    source = tmp_path / "types.parquet"
    pq.write_table(table, source, row_group_size=10)
    _edited(source, lambda footer, body: put(column_meta(footer, 1, 1), 1, 5, 9))
    code, stderr, _ = _run_limited(tmp_path, source, prune=True)
    assert code == 2, stderr[-2000:]
    said = "row group 1, column occurredAt: a physical type numbered 9 (the column's is INT64)"
    assert f"source.uri: {source}: not a readable parquet file: {said}" in stderr, stderr


def test_a_zone_read_that_skips_a_row_group_numbers_the_rows_after_it_where_they_are(
    tmp_path: Path,
) -> None:
    """Red-team finding: a zone read (`prune_zones`) of row groups of 2024-01-01, 2024-01-05 and
    2024-01-01 skips the second, and gathered the first and the third's rows into one batch numbered
    as if they were adjacent: the third's rows at positions 10-19, which are the second's. Re-read by
    those positions, they were the second's records (in a run: "not the record that was decided on",
    exit 1, for a valid file). A batch gathers only rows that are adjacent in the file."""
    rows = 30
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": [f"2024-01-0{5 if 10 <= i < 20 else 1}T00:10:00Z" for i in range(rows)],
        }
    )
    path = tmp_path / "unsorted.parquet"
    pq.write_table(table, path, row_group_size=10)
    source = streaming.ParquetSource(str(path), "unsorted.parquet")
    day = 1704067200 * 1_000_000  # 2024-01-01T00:00:00Z
    source.prune_zones(Window("occurredAt", False, day, day + 86_400_000_000))
    batches = list(source.batches(2048))
    positions = np.concatenate([p for _, _, p in batches])
    assert positions.tolist() == [*range(10), *range(20, 30)]
    records = [r for records, _, _ in batches for r in records]
    assert records == [
        jsonable_row(row) for row in table.to_pylist() if row["id"] not in {f"r{i}" for i in range(10, 20)}
    ]
    assert source.fetch(positions) == records


def test_a_column_chunk_encrypted_with_its_own_key_is_refused(tmp_path: Path) -> None:
    """A column chunk whose metadata says it is encrypted with a column key (which no reader of pcbo's
    is given) made `RowGroupMetaData.column` throw "Cannot decrypt ColumnMetadata" where pyarrow does
    not catch it: the process aborted. Invalid input naming `source.uri`, the row group and the
    column, found in the footer first (`column_metadata_refusal`)."""
    rows = 30
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "occurredAt": ["2024-01-01T00:10:00Z"] * rows,
            "amount": pa.array(range(rows), pa.int64()),
        }
    )
    source = tmp_path / "encrypted.parquet"
    pq.write_table(table, source, row_group_size=10)
    with_column_key = [
        [2, 12, [[1, 9, (8, [b"amount"])]]]
    ]  # (ColumnCryptoMetaData.ENCRYPTION_WITH_COLUMN_KEY)
    _edited(source, lambda footer, body: put(get(get(footer, 4)[1][1], 1)[1][2], 8, 12, with_column_key))
    code, stderr, _ = _run_limited(tmp_path, source)
    assert code == 2, stderr[-2000:]
    assert (
        f"source.uri: {source}: not a readable parquet file: row group 1, column amount: encrypted" in stderr
    )

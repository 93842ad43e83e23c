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
    +-(2**53 - 1) (or a nested or dictionary column, which is not looked into, but for a dictionary
    of text, as text columns are read)."""
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
    assert not risky(batch(kind=pa.array(["a", "b"]).dictionary_encode()))  # (text: read so)
    assert risky(batch(kind=pa.array([1.5, 2.5]).dictionary_encode()))


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


def _parquet_refused(tmp_path: Path, name: str, table: pa.Table) -> tuple[int, str]:
    """(exit status, stderr) of `pcbo dry-run` and `execute` of a parquet source holding `table`; both
    must agree, and the execute must write nothing. (`pcbo` in this process: an internal error is
    exit 1 there as in a subprocess.)"""
    from pcbo_dagster_tests.cli_runner import run_pcbo_in_process

    pq.write_table(table, tmp_path / f"{name}.parquet")
    request = {
        "runId": f"pq-{name}",
        "dataset": "d",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-01T01:00:00Z",
        "source": {"uri": f"{name}.parquet"},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(request))
    answers = [
        run_pcbo_in_process([command, "--input", tmp_path / f"{name}.json"], home=tmp_path / f"home-{name}")
        for command in ("dry-run", "execute")
    ]
    assert answers[0].status == answers[1].status and not (tmp_path / f"home-{name}" / "lake").exists()
    return answers[1].status, answers[1].stderr


def test_parquet_columns_named_twice_and_unreadable_values_are_invalid_input(tmp_path: Path) -> None:
    """Red-team findings: two `consentGranted` columns (false, true) were decided by the last one
    (DuckDB reads the first); a struct with a field twice, invalid UTF-8 in a string column and a year
    past 9999 were internal errors (exit 1). Each is invalid input naming the column (exit 2)."""
    at = ["2024-01-01T00:10:00Z"]
    doubled = pa.Table.from_arrays(
        [pa.array(["r1"]), pa.array(at), pa.array([False]), pa.array([True])],
        names=["id", "occurredAt", "consentGranted", "consentGranted"],
    )
    status, stderr = _parquet_refused(tmp_path, "doubled", doubled)
    assert status == 2 and "the parquet column consentGranted is named twice" in stderr, stderr
    struct = pa.StructArray.from_arrays([pa.array([1]), pa.array([2])], names=["k", "k"])
    nested = pa.table({"id": ["r1"], "occurredAt": at, "s": struct})
    status, stderr = _parquet_refused(tmp_path, "nested", nested)
    assert status == 2 and "the parquet column s.k is named twice" in stderr, stderr
    bad_utf8 = pa.array([b"r1\xff\xfe"], pa.binary()).view(pa.string())
    status, stderr = _parquet_refused(tmp_path, "utf8", pa.table({"id": bad_utf8, "occurredAt": at}))
    assert status == 2 and "source.id:" in stderr and "UnicodeDecodeError" in stderr, stderr
    cased = pa.Table.from_arrays(
        [pa.array(["r1"]), pa.array(at), pa.array([False]), pa.array([True])],
        names=["id", "occurredAt", "CONSENTGRANTED", "consentGranted"],
    )
    status, stderr = _parquet_refused(tmp_path, "cased", cased)  # one name to DuckDB, Spark, Hive
    assert status == 2 and "the parquet column consentGranted is named twice" in stderr, stderr
    mars = pa.array([0], pa.timestamp("us", "Mars/Olympus"))
    status, stderr = _parquet_refused(tmp_path, "mars", pa.table({"id": ["r1"], "occurredAt": at, "t": mars}))
    assert status == 2 and "source.t:" in stderr, stderr
    far = pa.array([253402300800 * 1_000_000], pa.timestamp("us", "UTC"))  # 10000-01-01
    status, stderr = _parquet_refused(tmp_path, "far", pa.table({"id": ["r1"], "occurredAt": at, "t": far}))
    assert status == 2 and "source.t:" in stderr, stderr


@pytest.mark.parametrize(
    ("kind", "values", "word"),
    [
        (pa.map_(pa.string(), pa.int64()), [[], None], "map"),
        (pa.map_(pa.string(), pa.int64()), [[("k", 1)], []], "map"),
        (pa.duration("s"), [1, None], "duration"),
        (pa.time64("us"), [None, None], "time"),
        (pa.list_(pa.time32("s")), [[], None], "time"),
        (pa.struct([("d", pa.duration("ms"))]), [None, {"d": None}], "duration"),
    ],
)
def test_a_parquet_column_of_a_type_json_cannot_hold_is_refused_by_its_type(
    tmp_path: Path, kind: pa.DataType, values: list[Any], word: str
) -> None:
    """(red-team finding) A time-of-day, duration or map column is invalid input naming it (README),
    whatever its rows hold: it was judged value by value, so a map column whose rows were all empty
    or null was read (as empty lists), one with an entry refused as "values of type tuple", and a
    duration refused as "timedelta" (Python's names, not the file's types)."""
    at = ["2024-01-01T00:10:00Z", "2024-01-01T00:20:00Z"]
    table = pa.table({"id": ["r1", "r2"], "occurredAt": at, "c": pa.array(values, kind)})
    status, stderr = _parquet_refused(tmp_path, "typed", table)
    assert status == 2, stderr
    assert f"invalid input: source.c: values of type {word} cannot be read as JSON" in stderr, stderr


def test_a_nanosecond_timestamp_is_cut_to_its_microsecond(tmp_path: Path) -> None:
    """pandas writes nanosecond timestamps; one that is not a whole microsecond was an internal error.
    It is read as the instant cut to its microsecond, as an instant's digits past the sixth are."""
    from pcbo_dagster.sources import streaming

    moment = pa.array([1704067800_123456789], pa.timestamp("ns", "UTC"))  # 2024-01-01T00:10:00.123456789Z
    pq.write_table(pa.table({"id": ["r1"], "occurredAt": moment}), tmp_path / "ns.parquet")
    source = streaming.ParquetSource(str(tmp_path / "ns.parquet"), "ns.parquet")
    [(records, _, _)] = list(source.batches(10))
    assert records == [{"id": "r1", "occurredAt": "2024-01-01T00:10:00.123456Z"}]


def test_a_csv_cell_may_be_as_long_as_a_line(tmp_path: Path) -> None:
    """A cell over the csv module's default 131,072 characters was refused ("field larger than field
    limit"), though lines up to PCBO_MAX_LINE_BYTES are read."""
    from pcbo_dagster.sources import streaming

    path = tmp_path / "long.csv"
    path.write_text("id,occurredAt,note\nr1,2024-01-01T00:10:00Z," + "x" * 300_000 + "\n")
    source = streaming.CsvSource(str(path), "long.csv")
    [(records, _, locators)] = list(source.batches(10))
    assert len(records[0]["note"]) == 300_000
    assert source.fetch(locators) == records


def test_a_csv_header_naming_a_column_twice_in_another_case_is_refused(tmp_path: Path) -> None:
    """Readers that fold case (DuckDB, Spark) take `CONSENTGRANTED` and `consentGranted` for one
    column, and pick the first: pcbo would read the second. Refused, as an exact repeat is."""
    from pcbo_dagster.core.errors import InvalidInput
    from pcbo_dagster.sources import streaming

    path = tmp_path / "cased.csv"
    path.write_text("id,occurredAt,CONSENTGRANTED,consentGranted\nr1,2024-01-01T00:10:00Z,false,true\n")
    with pytest.raises(InvalidInput, match="names a column twice"):
        list(streaming.CsvSource(str(path), "cased.csv").batches(10))


def test_a_source_that_is_not_utf8_is_reported_without_its_bytes(tmp_path: Path) -> None:
    """A JSON error showed the offending byte (`can't decode byte 0x91`): through a server, any file
    of its sources directory gave away a byte of itself. The position is said, not the byte."""
    from pcbo_dagster.core.errors import InvalidInput
    from pcbo_dagster.sources import streaming

    path = tmp_path / "secret.jsonl"
    path.write_bytes(bytes([0x91, 0x22, 0x7F]) + b"\n")
    with pytest.raises(InvalidInput) as refused:
        list(streaming.JsonlSource(str(path), "secret.jsonl").batches(10))
    assert "not UTF-8 at byte 0" in str(refused.value) and "0x91" not in str(refused.value)


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])


def _integer_cell_to_text(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b",39\r\n", b",xx\r\n"))


def _fewer_row_groups(path: Path) -> None:
    pq.write_table(pq.read_table(path).slice(0, 25), path)


@pytest.mark.parametrize(
    ("fmt", "change"),
    [
        ("jsonl", _cut_short),
        ("csv", _cut_short),
        ("csv", _integer_cell_to_text),
        ("parquet", _fewer_row_groups),
    ],
)
def test_a_source_that_cannot_be_read_again_mid_run_is_a_changed_source(
    tmp_path: Path, fmt: str, change: Any
) -> None:
    """Red-team finding: a source cut short or rewritten between pass 1 and the re-read for writing
    (its offsets or row groups no longer those of its records) made the execute stop with invalid input
    (exit 2: "nothing written"), or an internal error for CSV (StopIteration, int() of a text cell),
    after the partitions before it had been committed, and left the run `running`. It is
    `source_changed`, like a record read again that differs: the run failed, nothing committed from
    there on."""
    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.execute import ExecuteFailed, execute
    from pcbo_dagster.engine.request_loading import evaluate, load_request
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster_tests.csv_files import csv_bytes

    records = [
        {"id": f"r{i:03d}", "occurredAt": f"2024-01-01T{i // 10:02d}:10:00Z", "consentGranted": True, "n": i}
        for i in range(40)
    ]
    source = tmp_path / f"records.{fmt}"
    if fmt == "jsonl":
        source.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "csv":
        source.write_bytes(csv_bytes(records, ["id", "occurredAt", "consentGranted", "n"]))
    else:
        pq.write_table(pa.Table.from_pylist(records), source, row_group_size=10)
    request = {
        "runId": "changing",
        "dataset": "d",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-01T04:00:00Z",
        "source": {"uri": str(source)},
    }
    loaded = load_request(json.dumps(request).encode(), tmp_path)
    plan, decisions = evaluate(loaded)
    change(source)
    env = Environment.open(Settings.resolve(home=str(tmp_path / "home"), env={}, parallel=1))
    try:
        with pytest.raises(ExecuteFailed, match="source changed during the run") as failed:
            execute(env, loaded, plan, decisions, pace=lambda pd: True)  # committed one at a time
        assert failed.value.kind == "source_changed"
        committed = [p["key"] for p in failed.value.document["partitions"] if p["status"] == "committed"]
        # the text files' first partitions are still where they were (parquet's row groups are not)
        assert bool(committed) == (fmt != "parquet") and "20240101T030000Z" not in committed, committed
        run = env.catalog.get_run("changing")
        assert run is not None and run["status"] == "failed"
    finally:
        env.close()
        loaded.close()


def test_a_nanosecond_timestamp_before_1970_is_floored_as_its_text_is(tmp_path: Path) -> None:
    """Red-team finding: Arrow's cast of nanoseconds to microseconds rounds towards the epoch, so a
    parquet instant of 1969-12-31T23:59:59.9999995Z became 1970-01-01T00:00:00Z and was added to a
    window starting then, where the same instant written as text (digits past the sixth dropped) is
    OUT_OF_WINDOW. Nanoseconds are floored, in integer arithmetic (no overflow near 1677 either)."""
    from pcbo_dagster.sources import streaming

    moments = pa.array([-500, None, -(2**63) + 1, 1704067799_999999500], pa.timestamp("ns", "UTC"))
    table = pa.table({"id": ["a", "b", "c", "d"], "occurredAt": moments, "consentGranted": [True] * 4})
    pq.write_table(table, tmp_path / "ns.parquet")
    [(records, _, _)] = list(streaming.ParquetSource(str(tmp_path / "ns.parquet"), "ns.parquet").batches(10))
    assert [r.get("occurredAt") for r in records] == [
        "1969-12-31T23:59:59.999999Z",
        None,
        "1677-09-21T00:12:43.145224Z",
        "2024-01-01T00:09:59.999999Z",
    ]
    request = {
        "runId": "ns",
        "dataset": "d",
        "start": "1970-01-01T00:00:00Z",
        "end": "1970-01-02T00:00:00Z",
        "policies": {"onViolation": "omit"},
    }
    streamed, _, _ = _run(tmp_path, "streamed", {**request, "source": {"uri": str(tmp_path / "ns.parquet")}})
    as_text = [{"id": "a", "occurredAt": "1969-12-31T23:59:59.9999995Z", "consentGranted": True}]
    inline, _, _ = _run(tmp_path, "inline", {**request, "sourceRecords": as_text})
    assert streamed["totals"]["add"] == inline["totals"]["add"] == 0
    assert [u["reasons"] for u in streamed["unplaced"] if u["id"] == "a"] == [["OUT_OF_WINDOW"]]
    assert [u["reasons"] for u in inline["unplaced"]] == [["OUT_OF_WINDOW"]]


def test_a_parquet_dictionary_bomb_is_read_within_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: parquet stores a repeated value once, in a column chunk's dictionary, so a file
    of a few kilobytes decoded to a copy of a 1 MB value for each of 200,000 rows (200 GB): Arrow
    decoded each 8,192-row batch to 8 GB and pcbo turned it into Python strings (a MemoryError, exit 1,
    under a 3 GB limit; the host's memory otherwise). Text columns are read as dictionaries, records
    are made a bounded number of bytes at a time, and a row larger than a record may be
    (PCBO_MAX_LINE_BYTES, as a JSONL line) is invalid input naming it."""
    from pcbo_dagster.core.errors import InvalidInput
    from pcbo_dagster.sources import streaming

    monkeypatch.setattr(streaming, "PYTHON_BATCH_BYTES", 1 << 20, raising=False)
    big = "x" * 300_000
    rows = 40
    note = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array([big]))
    table = pa.table(
        {"id": [f"r{i}" for i in range(rows)], "occurredAt": ["2024-01-01T00:10:00Z"] * rows, "note": note}
    )
    path = tmp_path / "bomb.parquet"
    pq.write_table(table, path, compression="zstd")
    assert path.stat().st_size < 20_000  # 12 MB of values
    source = streaming.ParquetSource(str(path), "bomb.parquet")
    batches = list(source.batches(8192))
    assert max(sum(len(r["note"]) for r in records) for records, _, _ in batches) <= 1 << 20
    assert [r["id"] for records, _, _ in batches for r in records] == [f"r{i}" for i in range(rows)]
    locators = np.concatenate([positions for _, _, positions in batches])
    chunks = list(source.fetch_chunks(locators[::-1], 8192))
    assert max(len(records) for records in chunks) <= 3
    assert [r["id"] for records in chunks for r in records] == [f"r{i}" for i in reversed(range(rows))]
    monkeypatch.setenv("PCBO_MAX_LINE_BYTES", "200000")
    with pytest.raises(InvalidInput, match=r"row 0 holds 300\d+ bytes of values, more than a record may"):
        list(streaming.ParquetSource(str(path), "bomb.parquet").batches(8192))


_LINE = '{"id":"r1","occurredAt":"2024-01-01T00:10:00Z","consentGranted":true,"jurisdiction":"US"}'


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("utf16", _LINE.encode("utf-16-le"), "source line 1: not valid JSON"),
        ("utf32", _LINE.encode("utf-32"), "source line 1: not valid JSON"),
        ("mixed", _LINE.encode() + b"\n" + _LINE.replace("r1", "r2").encode("utf-16-be"), "source line 2"),
        (
            "surrogate",
            _LINE.replace("US", "\\ud800").encode().replace(b"\\ud800", b"\xed\xa0\x80"),
            "not UTF-8 at byte 85",
        ),
    ],
)
def test_a_jsonl_source_is_utf8_only(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    """Red-team finding: a JSONL line was parsed by `json.loads` of bytes, which guesses UTF-16 or
    UTF-32 from each line's first bytes and takes surrogates encoded in UTF-8: a file whose lines were
    in several encodings was read (UTF-8 readers refuse it). JSON is read as UTF-8 only (one leading
    byte-order mark allowed, as before)."""
    from pcbo_dagster.core.errors import InvalidInput
    from pcbo_dagster.sources import streaming

    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(data)
    with pytest.raises(InvalidInput, match=message):
        list(streaming.JsonlSource(str(path), path.name).batches(10))
    path.write_bytes(b"\xef\xbb\xbf" + _LINE.encode() + b"\n")
    [(records, _, _)] = list(streaming.JsonlSource(str(path), path.name).batches(10))
    assert records == [json.loads(_LINE)]


def test_a_csv_header_changed_between_its_two_reads_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: a CSV source is read twice in pass 1 (its integer columns, then its records),
    and the records were keyed by the header of the first read: a file whose columns were swapped in
    between gave a record neither version holds (consent granted where both say false). A header
    that differs on the second read is invalid input."""
    from pcbo_dagster.core.errors import InvalidInput
    from pcbo_dagster.sources import streaming

    path = tmp_path / "swapped.csv"
    path.write_text("id,occurredAt,consentGranted,note\nr1,2024-01-01T00:10:00Z,false,true\n")
    first_read = streaming.CsvSource.integer_cells

    def then_swap(self: streaming.CsvSource) -> dict[int, bool]:
        cells = first_read(self)
        path.write_text("id,occurredAt,note,consentGranted\nr1,2024-01-01T00:10:00Z,true,false\n")
        return cells

    monkeypatch.setattr(streaming.CsvSource, "integer_cells", then_swap)
    with pytest.raises(InvalidInput, match="CSV header row changed while the file was read"):
        list(streaming.CsvSource(str(path), path.name).batches(10))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "directory"])
def test_a_batch_holds_a_bounded_size_of_records_whatever_their_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Red-team finding: a JSONL or CSV batch ended at `PCBO_SOURCE_BATCH` records (8,192) whatever
    their size, so a source of long lines was held a batch at a time as Python objects: a 150 MB file
    of 1 MiB lines (`[0,0,...]`) took a 760 MB dry-run, growing with the file (up to 8,192 lines of
    64 MiB). A batch also ends once its records hold `PYTHON_BATCH_BYTES`, as a parquet source's do,
    and a directory joins its files' batches within that size too."""
    from pcbo_dagster.sources import streaming
    from pcbo_dagster.sources.hive_directories import open_directory_source

    budget = 10_000
    monkeypatch.setattr(streaming, "PYTHON_BATCH_BYTES", budget)
    records = [
        {"id": f"r{i}", "occurredAt": f"2024-01-01T00:{i:02d}:00Z", "note": f"{i}" + "x" * 1000}
        for i in range(60)
    ]
    source: streaming.RecordSource
    if fmt == "csv":
        path = tmp_path / "wide.csv"
        path.write_text(
            "id,occurredAt,note\n" + "".join(f"{r['id']},{r['occurredAt']},{r['note']}\n" for r in records)
        )
        source = streaming.CsvSource(str(path), path.name)
    elif fmt == "jsonl":
        path = tmp_path / "wide.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        source = streaming.JsonlSource(str(path), path.name)
    else:
        folder = tmp_path / "wide"
        folder.mkdir()
        for k in range(20):  # files of 3 records: each file's one batch is joined to the next ones
            (folder / f"part-{k:02d}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records[3 * k : 3 * k + 3])
            )
        source = open_directory_source(str(folder), "wide", None, None)
    batches = [batch for batch, _, _ in source.batches(8_192)]
    assert [r for batch in batches for r in batch] == records
    assert len(batches) > 1
    for batch in batches:
        assert sum(len(json.dumps(r)) for r in batch) <= budget + 1_100, [len(b) for b in batches]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_lines_ended_by_a_lone_cr_are_read_whatever_the_file_s_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """A file whose lines end with a lone CR (as `bytes.splitlines` and the csv module end them) was
    read only while it was shorter than `PCBO_MAX_LINE_BYTES`: a block with no LF in it was held as one
    unfinished line, so a longer file was refused as a line too long, however short its lines."""
    from pcbo_dagster.sources import streaming

    monkeypatch.setenv("PCBO_MAX_LINE_BYTES", "1000")
    records = [
        {"id": f"r{i}", "occurredAt": f"2024-01-01T00:{i // 60:02d}:{i % 60:02d}Z"} for i in range(150)
    ]
    path = tmp_path / f"cr.{fmt}"
    if fmt == "jsonl":
        path.write_bytes(b"".join(json.dumps(r).encode() + b"\r" for r in records))
        source: streaming.RecordSource = streaming.JsonlSource(str(path), path.name)
    else:
        path.write_bytes(
            b"id,occurredAt\r" + b"".join(f"{r['id']},{r['occurredAt']}\r".encode() for r in records)
        )
        source = streaming.CsvSource(str(path), path.name)
    assert path.stat().st_size > 2_000
    [(batch, _, locators)] = list(source.batches(200))
    assert batch == records and source.fetch(locators[::-1]) == records[::-1]


def test_a_csv_cell_of_thousands_of_digits_is_text_not_an_internal_error(tmp_path: Path) -> None:
    """Red-team finding: a CSV cell of more than 4,300 digits (Python's limit on converting text to an
    integer) was an internal error, exit 1, with Python's advice to raise its limit: the cell was
    converted to be compared with 2**53 - 1. It is no safe integer, so its column is text."""
    from pcbo_dagster.sources import streaming

    path = tmp_path / "digits.csv"
    digits = "9" * 5_000
    path.write_text(f"id,occurredAt,amount\nr1,2024-01-01T00:10:00Z,{digits}\nr2,2024-01-01T00:11:00Z,7\n")
    source = streaming.CsvSource(str(path), path.name)
    [(records, _, _)] = list(source.batches(10))
    assert [r["amount"] for r in records] == [digits, "7"]

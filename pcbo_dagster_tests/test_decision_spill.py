"""A streamed source's decisions come from a decision spill on disk (`engine.decision_spill`): they
must be exactly the in-memory decisions of the same records given inline — every partition, the
unplaced entries, totals, breaches, and the plan and decision hashes — and the spill's directory
must go away with it, on success and on bad input alike. Also: the dry-run writer that streams
(`core.json_documents.streamed_text`) writes exactly the text `json.dumps(indent=2)` would."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import rfc8785

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.json_documents import streamed_text
from pcbo_dagster.engine.decision_spill import SpilledPartitions
from pcbo_dagster.engine.request_loading import evaluate, load_request


def _request(source: dict[str, Any], on_violation: str = "omit") -> dict[str, Any]:
    return {
        "runId": "spill-run",
        "dataset": "events",
        "versionLabel": "v1",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-03T00:00:00Z",
        "chunkSeconds": 3600,
        "policies": {
            "requireConsent": True,
            "allowedJurisdictions": ["US", "FR"],
            "retentionCutoff": "2024-06-01T00:00:00Z",
            "onViolation": on_violation,
        },
        "existingTargetIds": ["id-7", "id-70"],
        **source,
    }


def _random_records(seed: int, n: int) -> list[Any]:
    """Records over 2 days and a little beyond, ids drawn from a small pool (so many repeat: some as
    the very same record, some differing, some placed in one partition and unplaced elsewhere),
    invalid ones and non-objects among them."""
    rng = random.Random(seed)
    records: list[Any] = []
    for i in range(n):
        if rng.random() < 0.1 and records:
            records.append(rng.choice(records))  # the same record again
            continue
        day = rng.choice([31, 1, 1, 2, 2, 3]) if rng.random() < 0.2 else rng.choice([1, 2])
        month = 12 if day == 31 else 1
        year = 2023 if day == 31 else 2024
        record: dict[str, Any] = {
            "id": f"id-{rng.randrange(n // 2)}",
            "occurredAt": f"{year}-{month:02d}-{day:02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z",
            "consentGranted": rng.random() < 0.85,
            "jurisdiction": rng.choice(["US", "fr", " us", "DE", None]),
            "n": i,
        }
        if rng.random() < 0.3:
            record["retentionExpiresAt"] = rng.choice(
                ["2030-01-01T00:00:00Z", "2024-01-01T00:00:00Z", "soon"]
            )
        if rng.random() < 0.03:
            record["id"] = rng.choice(["", 5, None])
        elif rng.random() < 0.05:  # ids SQLite and Arrow must compare byte for byte
            record["id"] = rng.choice(["é", "e\u0301", "a\u0000b", "a\u0000c", "\U0001f600", "Z", "z"])
        records.append(record)
        if rng.random() < 0.01:
            records.append(["not", "an", "object"])
    return records


def _evaluate(request: dict[str, Any], base: Path) -> tuple[Any, Any, Any]:
    loaded = load_request(json.dumps(request).encode(), base)
    plan, decisions = evaluate(loaded)
    return loaded, plan, decisions


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("on_violation", ["omit", "block"])
def test_spilled_decisions_equal_in_memory_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, on_violation: str
) -> None:
    monkeypatch.setenv("PCBO_SOURCE_BATCH", "13")
    monkeypatch.setenv("PCBO_SPILL_DIR", str(tmp_path / "spills"))
    records = _random_records(seed, 700)
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    _, inline_plan, inline = _evaluate(_request({"sourceRecords": records}, on_violation), tmp_path)
    loaded, plan, spilled = _evaluate(
        _request({"source": {"uri": "records.jsonl", "format": "jsonl"}}, on_violation), tmp_path
    )
    assert loaded.spill is not None and isinstance(spilled.partitions, SpilledPartitions)
    assert plan.plan_hash == inline_plan.plan_hash
    assert spilled.decision_hash == inline.decision_hash
    assert spilled.to_json() == inline.to_json()
    assert spilled.totals == inline.totals
    assert spilled.breaches == inline.breaches
    assert (len(spilled.breaches) > 0) == (on_violation == "block")
    assert inline.totals["byReason"]["DUPLICATE_ID"] > 0 and inline.totals["unplaced"] > 0
    # Each partition read from the spill: the same adds, at the same input positions, read back by
    # their locators to the very records, with the same instants.
    for got, want in zip(spilled.partitions, inline.partitions, strict=True):
        assert got.add == want.add and got.omit == want.omit and got.counts == want.counts
        assert got.add_indices.tolist() == want.add_indices.tolist()
        assert loaded.fetch(got.add_locators) == [records[i] for i in want.add_indices.tolist()]
        assert got.add_occurred_us.tolist() == want.add_occurred_us.tolist()
        assert got.add_retention_us.to_pylist() == want.add_retention_us.to_pylist()
    # The hash made a piece at a time is CONTRACT section 3's, over the whole document at once.
    document = {
        "v": "pcbo.decisions/1",
        "planHash": plan.plan_hash,
        "partitions": [
            {"key": p["key"], "add": p["add"], "omit": p["omit"]} for p in inline.to_json()["partitions"]
        ],
        "unplaced": [{"index": u["index"], "id": u["id"], "reasons": u["reasons"]} for u in inline.unplaced],
    }
    assert spilled.decision_hash == "sha256:" + hashlib.sha256(rfc8785.dumps(document)).hexdigest()


def test_spilled_partitions_are_a_sequence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCBO_SPILL_DIR", str(tmp_path / "spills"))
    records = _random_records(9, 200)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, plan, decisions = _evaluate(_request({"source": {"uri": "r.jsonl"}}), tmp_path)
    parts = decisions.partitions
    assert len(parts) == len(plan.partitions) == 48
    assert parts[-1].partition.key == parts[47].partition.key == plan.partitions[47].key
    assert [p.partition.index for p in parts[3:9:2]] == [3, 5, 7]
    with pytest.raises(IndexError):
        parts[48]
    assert len(decisions.unplaced) == decisions.totals["unplaced"] == len(list(decisions.unplaced))


def test_spill_directory_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spills = tmp_path / "spills"
    monkeypatch.setenv("PCBO_SPILL_DIR", str(spills))
    records = _random_records(4, 100)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded, _, decisions = _evaluate(_request({"source": {"uri": "r.jsonl"}}), tmp_path)
    (directory,) = spills.iterdir()
    assert directory.name.startswith("pcbo-spill-") and (directory / "spill.sqlite").exists()
    loaded.spill.close()
    assert list(spills.iterdir()) == []
    loaded.spill.close()  # twice is fine

    _evaluate(_request({"source": {"uri": "r.jsonl"}}), tmp_path)  # dropped at once
    gc.collect()
    assert list(spills.iterdir()) == []

    # Bad input found in pass 1 (line 60 is not JSON): InvalidInput, and no spill left behind.
    lines = [json.dumps(r) for r in records]
    lines[59] = "{not json"
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput) as caught:
        load_request(json.dumps(_request({"source": {"uri": "bad.jsonl"}})).encode(), tmp_path)
    assert "line 60" in str(caught.value)
    del caught
    gc.collect()
    assert list(spills.iterdir()) == []


@pytest.mark.parametrize(
    "document",
    [
        {},
        [],
        {"a": [], "b": {}, "c": [1, [2, []], {"d": None}], "é": 'ünï\u2028"q"\n', "f": 1.5, "t": True},
        [[[]], {"x": [{}]}, "s", -3, 2.0e-7, False],
    ],
)
def test_streamed_text_is_json_dumps_indent_2(document: Any) -> None:
    assert "".join(streamed_text(document)) == json.dumps(document, indent=2, ensure_ascii=False)


def test_streamed_text_streams_iterators_as_lists() -> None:
    document = {"empty": iter([]), "ids": (f"id-{i}" for i in range(3)), "nested": map(dict, [{"a": 1}])}
    expected = {"empty": [], "ids": ["id-0", "id-1", "id-2"], "nested": [{"a": 1}]}
    assert "".join(streamed_text(document)) == json.dumps(expected, indent=2, ensure_ascii=False)


def test_spill_reads_interleave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a partition while the unplaced entries are being iterated (and one iteration left
    unfinished) neither blocks nor mixes their rows."""
    monkeypatch.setenv("PCBO_SPILL_DIR", str(tmp_path / "spills"))
    monkeypatch.setattr("pcbo_dagster.engine.decision_spill._FETCH", 2)
    records = _random_records(5, 300)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, _, decisions = _evaluate(_request({"source": {"uri": "r.jsonl"}}), tmp_path)
    _, _, inline = _evaluate(_request({"sourceRecords": records}), tmp_path)
    abandoned = iter(decisions.unplaced)
    next(abandoned)
    seen = []
    for k, entry in enumerate(decisions.unplaced):
        seen.append(entry)
        part = decisions.partitions[k % len(decisions.partitions)]
        assert part.add == inline.partitions[k % len(inline.partitions)].add
    assert seen == inline.unplaced and len(seen) > 4


@pytest.mark.parametrize("differing", [False, True])
def test_the_run_schema_from_pass_1_is_the_re_read_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, differing: bool
) -> None:
    """Pass 1 gathers the run's schema over the records added but for DUPLICATE_ID; it is used only
    when no differing copies (all omitted, their fields not in the run) were among them."""
    monkeypatch.setenv("PCBO_SPILL_DIR", str(tmp_path / "spills"))
    monkeypatch.setenv("PCBO_SOURCE_BATCH", "2")
    at = "2024-01-01T05:00:00Z"
    allowed = {"jurisdiction": "US", "retentionExpiresAt": "2030-01-01T00:00:00Z"}
    records: list[dict[str, Any]] = [
        {"id": "a", "occurredAt": at, "consentGranted": True, "n": 1},
        {"id": "b", "occurredAt": at, "consentGranted": True, "n": 2, "note": "x"},
        {"id": "b", "occurredAt": at, "consentGranted": True, "n": 2, "note": "x"},  # the same again
        {"id": "c", "occurredAt": at, "consentGranted": False, "n": "not added, not in the schema"},
    ]
    if differing:  # two differing copies of "d": both omitted, so "extra" is not a column of the run
        records += [
            {"id": "d", "occurredAt": at, "consentGranted": True, "extra": 1},
            {"id": "d", "occurredAt": at, "consentGranted": True, "extra": "two"},
        ]
    records = [{**r, **allowed} for r in records]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded, _, decisions = _evaluate(_request({"source": {"uri": "r.jsonl"}}), tmp_path)
    inline_loaded, _, inline = _evaluate(_request({"sourceRecords": records}), tmp_path)
    assert loaded.spill.schema_exact is not differing
    schema, as_json = loaded.schema_of(decisions.partitions)
    assert (schema, as_json) == inline_loaded.schema_of(inline.partitions)
    assert schema.names == [
        "id",
        "occurredAt",
        "retentionExpiresAt",
        "consentGranted",
        "jurisdiction",
        "n",
        "note",
    ]
    assert schema.field("n").type == pa.int64() and not any(as_json.values())


def test_a_spill_left_by_a_killed_process_is_removed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spills = tmp_path / "spills"
    monkeypatch.setenv("PCBO_SPILL_DIR", str(spills))
    records = _random_records(6, 50)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    request = json.dumps(_request({"source": {"uri": "r.jsonl"}}))
    script = (
        "import os, sys, json, pathlib\n"
        "from pcbo_dagster.engine.request_loading import load_request\n"
        "loaded = load_request(sys.argv[1].encode(), pathlib.Path(sys.argv[2]))\n"
        "os._exit(0)  # killed outright: no clean-up runs\n"
    )
    done = subprocess.run([sys.executable, "-c", script, request, str(tmp_path)], check=True)
    assert done.returncode == 0
    (left,) = spills.iterdir()
    assert left.name.startswith("pcbo-spill-") and (left / "spill.sqlite").exists()
    running = spills / f"pcbo-spill-{os.getpid()}-mine"  # a live process's spill is never touched
    running.mkdir()
    loaded = load_request(request.encode(), tmp_path)
    names = sorted(p.name for p in spills.iterdir())
    assert left.name not in names and running.name in names and len(names) == 2
    assert loaded.spill is not None
    loaded.spill.close()


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (" spills", "surrounding whitespace"),  # would make a directory ' spills' in the current one
        ("a-file", "not a directory"),  # was an internal error: "File exists: a-file", exit 1
        ("a-file/below", "not a directory"),  # "Not a directory", exit 1
    ],
)
def test_a_spill_directory_that_cannot_be_one_is_invalid_input_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str, said: str
) -> None:
    """(red-team finding) `PCBO_SPILL_DIR` is a path setting like the others: one with surrounding
    white space, or naming a file, is invalid input naming the variable (exit 2), and nothing is made."""
    from pcbo_dagster.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a directory\n")
    records = _random_records(4, 20)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "req.json").write_text(json.dumps(_request({"source": {"uri": "r.jsonl"}})))
    monkeypatch.setenv("PCBO_SPILL_DIR", value)
    before = sorted(p.name for p in tmp_path.iterdir())
    status = main(["dry-run", "--input", "req.json"])
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert captured.out == "" and "Traceback" not in captured.err
    assert "invalid input: PCBO_SPILL_DIR: " in captured.err and said in captured.err, captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_spill_directory_under_the_home_directory_is_made_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(red-team finding) `PCBO_SPILL_DIR=~/spills` (an env file, a Docker `environment:` entry: no
    shell expands it) made a directory `~/spills` in the current directory, where a server's list of
    its own stores (`Settings.own_paths`, which expands it) did not look: the spill is made under the
    home directory, as every other path setting is read."""
    user_home, work = tmp_path / "user", tmp_path / "work"
    user_home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.chdir(work)
    monkeypatch.setenv("PCBO_SPILL_DIR", "~/spills")
    records = _random_records(4, 20)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded, _, _ = _evaluate(_request({"source": {"uri": "r.jsonl"}}), tmp_path)
    assert loaded.spill is not None
    assert Path(loaded.spill.directory).parent == user_home / "spills"
    assert list(work.iterdir()) == []
    loaded.spill.close()

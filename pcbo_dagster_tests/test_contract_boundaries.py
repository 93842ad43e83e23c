"""Contract boundaries found by an audit of the core path, each through the `pcbo` command line
(`cli.main` in this process: `cli_runner.run_pcbo_in_process`).

- Jurisdictions are upper-cased with Unicode's *simple* case mapping (README, *Choices*): `ß` stays
  `ß` (Arrow's `utf8_upper` alone makes it `ẞ`), in the plan hash and in the decisions.
- Input order never changes a decision (CONTRACT section 2): copies of a record with equal RFC 8785
  forms (`5` and `5.0`) are the same record, so a ledger request's position field is judged by that
  form too.
- Requests with the same plan hash (their records' RFC 8785 forms equal: `1` and `1.0`, `0` and
  `-0.0`) write the same lake content.

The plan hash is recomputed here from CONTRACT section 3 with `rfc8785` + `hashlib`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import rfc8785

from pcbo_dagster_tests.cli_runner import run_pcbo_in_process, write_request

IN_WINDOW = "2024-01-01T00:10:00Z"


def _request(records: list[Any], **fields: Any) -> dict[str, Any]:
    return {
        "runId": "run-1",
        "dataset": "events",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-01T01:00:00Z",
        "sourceRecords": records,
        **fields,
    }


def _pcbo(tmp_path: Path, command: str, request: dict[str, Any], name: str = "req.json") -> Any:
    run = run_pcbo_in_process(
        [command, "--input", write_request(tmp_path / name, request)], home=tmp_path / "home"
    )
    assert run.status == 0, run.stderr
    return run.document


def _sha256_jcs(value: Any) -> str:
    return hashlib.sha256(rfc8785.dumps(value)).hexdigest()


def test_sharp_s_stays_sharp_s_in_the_plan_hash_and_the_decisions(tmp_path: Path) -> None:
    allowed = [" ß", "straße\u2003", "us"]
    records = [
        {"id": "sharp", "occurredAt": IN_WINDOW, "consentGranted": True, "jurisdiction": "ß "},
        {"id": "capital", "occurredAt": IN_WINDOW, "consentGranted": True, "jurisdiction": "ẞ"},
        {"id": "street", "occurredAt": IN_WINDOW, "consentGranted": True, "jurisdiction": "STRAßE"},
        {"id": "streets", "occurredAt": IN_WINDOW, "consentGranted": True, "jurisdiction": "strasse"},
    ]
    request = _request(records, policies={"allowedJurisdictions": allowed})
    document = _pcbo(tmp_path, "dry-run", request)
    part = document["partitions"][0]
    assert part["add"] == ["sharp", "street"]
    assert part["omit"] == [
        {"id": "capital", "reasons": ["JURISDICTION_NOT_ALLOWED"]},
        {"id": "streets", "reasons": ["JURISDICTION_NOT_ALLOWED"]},
    ]
    plan = {
        "v": "pcbo.plan/1",
        "dataset": "events",
        "versionLabel": "v1",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-01T01:00:00Z",
        "chunkSeconds": 3600,
        "policies": {
            # trimmed, simple upper-case mapping (ß has none), unique, sorted
            "allowedJurisdictions": ["STRAßE", "US", "ß"],
            "onViolation": "omit",
            "requireConsent": True,
            "retentionCutoff": None,
        },
        "records": sorted(_sha256_jcs(r) for r in records),
        "existingTargetIds": [],
    }
    assert document["planHash"] == "sha256:" + _sha256_jcs(plan)


def test_a_ledger_position_is_judged_by_its_rfc8785_form_whatever_the_input_order(tmp_path: Path) -> None:
    as_int = {"id": "L", "occurredAt": IN_WINDOW, "consentGranted": True, "ledgerSequence": 5}
    as_float = {**as_int, "ledgerSequence": 5.0}  # the same RFC 8785 form: the same record
    half = {**as_int, "id": "H", "ledgerSequence": 5.5}
    base = {
        "runId": "run-1",
        "dataset": "ledgers",
        "ledgerRange": {"first": 0, "end": 10, "partitionSize": 10},
    }
    documents = [
        _pcbo(tmp_path, "dry-run", {**base, "sourceRecords": records}, f"req{i}.json")
        for i, records in enumerate(([as_int, as_float, half], [as_float, as_int, half]))
    ]
    for document in documents:
        assert document["partitions"][0]["add"] == ["L"]
        assert document["partitions"][0]["omit"] == [{"id": "L", "reasons": ["DUPLICATE_ID"]}]
        assert [(u["id"], u["reasons"]) for u in document["unplaced"]] == [("H", ["INVALID_RECORD"])]
    assert documents[0]["planHash"] == documents[1]["planHash"]
    assert documents[0]["decisionHash"] == documents[1]["decisionHash"]
    # Written, the position is an integer column whichever copy was kept.
    written = _pcbo(tmp_path, "execute", {**base, "sourceRecords": [as_float, as_int]}, "exec.json")
    table = pq.read_table(written["partitions"][0]["files"][0]["uri"].removeprefix("file://"))
    assert str(table.schema.field("ledgerSequence").type) == "int64"
    assert table.column("ledgerSequence").to_pylist() == [5]


def test_requests_with_one_plan_hash_write_the_same_lake_content(tmp_path: Path) -> None:
    def records(one: Any, zero: Any) -> list[dict[str, Any]]:
        return [
            {"id": "a", "occurredAt": IN_WINDOW, "consentGranted": True, "count": one, "price": zero},
            {"id": "b", "occurredAt": IN_WINDOW, "consentGranted": True, "count": 2, "price": 2.5},
        ]

    written = []
    for i, (one, zero) in enumerate(((1, 0), (1.0, -0.0), (1e0, 0.0))):
        request = _request(records(one, zero), runId=f"run-{i}")
        home = tmp_path / f"home{i}"
        run = run_pcbo_in_process(
            ["execute", "--input", write_request(tmp_path / f"r{i}.json", request)], home=home
        )
        assert run.status == 0, run.stderr
        written.append(run.document)
        # Executed into the first home too: the content is already there, identical.
        again = run_pcbo_in_process(["execute", "--input", tmp_path / f"r{i}.json"], home=tmp_path / "home0")
        assert again.status == 0, again.stderr
        assert [p["status"] for p in again.document["partitions"]] == ["unchanged"]
    assert len({d["planHash"] for d in written}) == 1
    assert len({d["decisionHash"] for d in written}) == 1
    assert len({json.dumps(d["partitions"][0]["files"][0]["checksum"]) for d in written}) == 1
    table = pq.read_table(written[1]["partitions"][0]["files"][0]["uri"].removeprefix("file://"))
    assert str(table.schema.field("count").type) == "int64"
    assert table.column("count").to_pylist() == [1, 2]
    assert [str(v) for v in table.column("price").to_pylist()] == ["0.0", "2.5"]  # not -0.0


def _jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_every_record_of_a_source_is_part_of_the_request_unless_it_opts_in_to_pruning(
    tmp_path: Path,
) -> None:
    # Records outside the window, in a zone of their own (the whole small file): without `prune`
    # each is unplaced OUT_OF_WINDOW and in the plan hash, exactly as the same records inline.
    records = [
        {"id": f"old-{i}", "occurredAt": "2023-06-01T00:00:00Z", "consentGranted": True} for i in range(3)
    ]
    inline = _pcbo(tmp_path, "dry-run", _request(records), "inline.json")
    source = {"uri": _jsonl(tmp_path / "old.jsonl", records)}
    streamed = _request([], source=source)
    del streamed["sourceRecords"]
    from_file = _pcbo(tmp_path, "dry-run", streamed, "file.json")
    assert [u["reasons"] for u in from_file["unplaced"]] == [["OUT_OF_WINDOW"]] * 3
    assert (from_file["planHash"], from_file["decisionHash"]) == (inline["planHash"], inline["decisionHash"])
    # Asked for, pruning skips the zone: its records are then not part of the request.
    pruned = _pcbo(tmp_path, "dry-run", {**streamed, "source": {**source, "prune": True}}, "pruned.json")
    assert pruned["unplaced"] == [] and pruned["totals"]["records"] == 0


def test_a_pruned_ledger_zone_reads_5_0_as_5(tmp_path: Path) -> None:
    # Zone bounds and decisions read a ledger field alike: a zone of `50.0`s outside the range is
    # pruned as a zone of `50`s is, so the two sources (the same records) make the same request.
    base = {
        "runId": "run-1",
        "dataset": "ledgers",
        "ledgerRange": {"first": 0, "end": 10, "partitionSize": 10},
    }
    documents = []
    for name, value in (("ints", 50), ("floats", 50.0)):
        records = [
            {"id": f"L{i}", "occurredAt": IN_WINDOW, "consentGranted": True, "ledgerSequence": value}
            for i in range(3)
        ]
        source = {"uri": _jsonl(tmp_path / f"{name}.jsonl", records), "prune": True}
        documents.append(_pcbo(tmp_path, "dry-run", {**base, "source": source}, f"{name}.json"))
    assert documents[0]["totals"]["records"] == documents[1]["totals"]["records"] == 0
    assert documents[0]["planHash"] == documents[1]["planHash"]


def test_a_ledger_range_placed_by_a_field_that_is_never_an_integer_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    """Red-team finding: `"ledgerRange": {"field": "occurredAt", ...}` (or `id`,
    `retentionExpiresAt`: fields the contract requires to be strings) was accepted and made every
    record `INVALID_RECORD`, exit 0: a request that can place no record. It is invalid input naming
    `ledgerRange.field` (exit 2, nothing written)."""
    record = {"id": "L", "occurredAt": IN_WINDOW, "consentGranted": True, "ledgerSequence": 5}
    for field in ("id", "occurredAt", "retentionExpiresAt"):
        request = {
            "runId": "run-1",
            "dataset": "ledgers",
            "ledgerRange": {"field": field, "first": 0, "end": 10, "partitionSize": 10},
            "sourceRecords": [record],
        }
        home = tmp_path / f"home-{field}"
        for command in ("dry-run", "execute"):
            result = run_pcbo_in_process(
                [command, "--input", write_request(tmp_path / "r.json", request)], home=home
            )
            assert result.status == 2, result.stderr
            assert "ledgerRange.field" in result.stderr and field in result.stderr, result.stderr
        assert not (home / "lake").exists()

"""Malformed requests (CONTRACT section 1) and the gates (section 2) through the real CLI.

Every malformed request must exit 2 with a message on stderr naming the field, no traceback, and
nothing written: no home directory, no `--output` file. Most cases run in-process through
`pcbo_dagster.cli.main`; a few run the installed `pcbo` script in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.cli.main import main
from pcbo_dagster.core.request_model import MAX_PARTITIONS
from pcbo_dagster.engine.request_loading import load_request

VALID_RECORDS = [
    {
        "id": "rec-1",
        "occurredAt": "2024-01-01T00:15:00Z",
        "jurisdiction": "US",
        "consentGranted": True,
        "retentionExpiresAt": "2025-01-01T00:00:00Z",
        "amount": 12,
    },
    {
        "id": "rec-2",
        "occurredAt": "2024-01-01T01:15:00Z",
        "jurisdiction": "ca",
        "consentGranted": True,
        "retentionExpiresAt": "2025-01-01T00:00:00Z",
        "amount": 7,
    },
]


def base_request() -> dict[str, Any]:
    return {
        "runId": "retro-run-001",
        "dataset": "events",
        "versionLabel": "v1",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-01T02:00:00Z",
        "chunkSeconds": 3600,
        "policies": {
            "requireConsent": True,
            "allowedJurisdictions": ["US", "CA"],
            "retentionCutoff": "2023-12-01T00:00:00Z",
            "onViolation": "omit",
        },
        "sourceRecords": json.loads(json.dumps(VALID_RECORDS)),
        "existingTargetIds": ["rec-legacy-1"],
        "expectedDecisionHash": None,
        "metadata": {"initiator": "ops-team"},
    }


def with_(**changes: Any) -> Callable[[], bytes]:
    """A request with top-level fields changed (a value of `DELETE` removes the field)."""

    def build() -> bytes:
        request = base_request()
        for key, value in changes.items():
            if value is DELETE:
                request.pop(key, None)
            else:
                request[key] = value
        return json.dumps(request).encode()

    return build


def with_policy(**changes: Any) -> Callable[[], bytes]:
    def build() -> bytes:
        request = base_request()
        request["policies"].update(changes)
        return json.dumps(request).encode()

    return build


def raw(text: str | bytes) -> Callable[[], bytes]:
    return lambda: text.encode() if isinstance(text, str) else text


def with_record(index: int, record_text: str) -> Callable[[], bytes]:
    """Splice a record's JSON text in verbatim (for values `json.dumps` would not write)."""

    def build() -> bytes:
        request = base_request()
        request["sourceRecords"].insert(index, "__SPLICE__")
        return json.dumps(request).replace('"__SPLICE__"', record_text).encode()

    return build


DELETE = object()
GOOD_HASH = "sha256:" + "0" * 64


def _replace_in_text(old: str, new: str) -> Callable[[], bytes]:
    def build() -> bytes:
        text = json.dumps(base_request())
        assert old in text
        return text.replace(old, new, 1).encode()

    return build


# (case id, request bytes, words that must appear on stderr: the field first)
INVALID_CASES: list[tuple[str, Callable[[], bytes], list[str]]] = [
    ("unknown-top-level-field", with_(polices={"requireConsent": False}), ["polices", "unknown"]),
    ("unknown-top-level-field-2", with_(sourceRecord=[]), ["sourceRecord"]),
    ("unknown-policy-field", with_policy(requireConsnet=False), ["policies.requireConsnet", "unknown"]),
    ("unknown-policy-field-2", with_policy(allowedJurisdiction=["US"]), ["policies.allowedJurisdiction"]),
    ("policies-null", with_(policies=None), ["policies"]),
    ("policies-list", with_(policies=[]), ["policies"]),
    ("runId-slash", with_(runId="a/b"), ["runId"]),
    ("runId-dotdot", with_(runId=".."), ["runId"]),
    ("runId-empty", with_(runId=""), ["runId"]),
    ("runId-129", with_(runId="r" * 129), ["runId"]),
    ("runId-leading-dot", with_(runId=".hidden"), ["runId"]),
    ("runId-leading-dash", with_(runId="-x"), ["runId"]),
    ("runId-space", with_(runId="a b"), ["runId"]),
    ("runId-non-ascii", with_(runId="é"), ["runId"]),
    ("runId-newline", with_(runId="a\n"), ["runId"]),
    ("runId-number", with_(runId=1), ["runId"]),
    ("runId-missing", with_(runId=DELETE), ["runId"]),
    ("dataset-slash", with_(dataset="ev/ents"), ["dataset"]),
    ("dataset-dotdot", with_(dataset=".."), ["dataset"]),
    ("dataset-empty", with_(dataset=""), ["dataset"]),
    ("dataset-129", with_(dataset="d" * 129), ["dataset"]),
    ("dataset-leading-dot", with_(dataset=".events"), ["dataset"]),
    ("dataset-backslash", with_(dataset="a\\b"), ["dataset"]),
    ("dataset-missing", with_(dataset=DELETE), ["dataset"]),
    ("versionLabel-slash", with_(versionLabel="v1/x"), ["versionLabel"]),
    ("versionLabel-dotdot", with_(versionLabel=".."), ["versionLabel"]),
    ("versionLabel-empty", with_(versionLabel=""), ["versionLabel"]),
    ("versionLabel-129", with_(versionLabel="v" * 129), ["versionLabel"]),
    ("versionLabel-leading-dot", with_(versionLabel=".v1"), ["versionLabel"]),
    ("versionLabel-null", with_(versionLabel=None), ["versionLabel"]),
    ("start-no-offset", with_(start="2024-01-01T00:00:00"), ["start"]),
    ("start-no-seconds", with_(start="2024-01-01T00:00Z"), ["start"]),
    ("start-date-only", with_(start="2024-01-01"), ["start"]),
    ("start-lowercase", with_(start="2024-01-01t00:00:00z"), ["start"]),
    ("start-number", with_(start=1704067200), ["start"]),
    ("start-missing", with_(start=DELETE), ["start"]),
    ("start-year-0", with_(start="0000-12-31T00:00:00Z"), ["start"]),
    ("end-no-offset", with_(end="2024-01-01T02:00:00"), ["end"]),
    ("end-equal-start", with_(end="2024-01-01T00:00:00Z"), ["end"]),
    ("end-equal-start-other-offset", with_(end="2024-01-01T01:00:00+01:00"), ["end"]),
    ("end-before-start", with_(end="2023-12-31T00:00:00Z"), ["end"]),
    ("chunkSeconds-0", with_(chunkSeconds=0), ["chunkSeconds"]),
    ("chunkSeconds-negative", with_(chunkSeconds=-60), ["chunkSeconds"]),
    ("chunkSeconds-1.5", with_(chunkSeconds=1.5), ["chunkSeconds"]),
    ("chunkSeconds-60.0", with_(chunkSeconds=60.0), ["chunkSeconds"]),
    ("chunkSeconds-string", with_(chunkSeconds="60"), ["chunkSeconds"]),
    ("chunkSeconds-true", with_(chunkSeconds=True), ["chunkSeconds"]),
    ("chunkSeconds-null", with_(chunkSeconds=None), ["chunkSeconds"]),
    (
        "too-many-partitions",
        with_(end="2024-01-02T03:46:40.000001Z", chunkSeconds=1),  # 100,001 partitions
        ["chunkSeconds", str(MAX_PARTITIONS)],
    ),
    (
        "far-too-many-partitions",
        with_(start="0001-01-01T00:00:00Z", end="9999-12-31T23:59:59Z", chunkSeconds=1),
        ["chunkSeconds"],
    ),
    ("both-sources", with_(source={"uri": "records.jsonl", "format": "jsonl"}), ["sourceRecords", "source"]),
    ("neither-source", with_(sourceRecords=DELETE), ["sourceRecords", "source"]),
    ("sourceRecords-null", with_(sourceRecords=None), ["sourceRecords"]),
    ("sourceRecords-object", with_(sourceRecords={"id": "a"}), ["sourceRecords"]),
    (
        "source-unknown-field",
        with_(sourceRecords=DELETE, source={"uri": "r.jsonl", "fmt": "x"}),
        ["source.fmt"],
    ),
    (
        "source-bad-format",
        with_(sourceRecords=DELETE, source={"uri": "r.jsonl", "format": "xml"}),
        ["source.format"],
    ),
    # (red-team finding) a NUL in a relative source path was an internal error (ValueError: embedded
    # null byte, exit 1); in an absolute one "cannot be read: ValueError". No path or URL holds one.
    (
        "source-uri-nul",
        with_(sourceRecords=DELETE, source={"uri": "r\u0000.jsonl"}),
        ["source.uri", "control"],
    ),
    (
        "source-uri-nul-absolute",
        with_(sourceRecords=DELETE, source={"uri": "/tmp/r\u0000"}),
        ["source.uri", "control"],
    ),
    (
        "source-uri-newline",
        with_(sourceRecords=DELETE, source={"uri": "r.jsonl\n"}),
        ["source.uri", "control"],
    ),
    # (red-team finding) a record source is a local path or a file://, s3:// or gs:// URL (README): any
    # other fsspec URL was fetched or opened, an http:// one from the host (from a Dagster launchpad
    # too), a chained `simplecache::` one writing its cache to disk during a dry-run
    (
        "source-uri-http",
        with_(sourceRecords=DELETE, source={"uri": "http://127.0.0.1:9/r.jsonl"}),
        ["source.uri", "not a http: URL"],
    ),
    (
        "source-uri-memory",
        with_(sourceRecords=DELETE, source={"uri": "memory://r.jsonl"}),
        ["source.uri", "not a memory: URL"],
    ),
    (
        "source-uri-chained",
        with_(sourceRecords=DELETE, source={"uri": "simplecache::file:///nonexistent/r.jsonl"}),
        ["source.uri", "chained URL"],
    ),
    ("metadata-float", with_(metadata={"initiator": "ops", "ratio": 0.5}), ["metadata", "ratio"]),
    ("metadata-nested-float", with_(metadata={"a": {"b": [1, 2.5]}}), ["metadata", "a.b[1]"]),
    ("metadata-float-integral", with_(metadata={"n": 1.0}), ["metadata", "n"]),
    ("metadata-exponent", _replace_in_text('"ops-team"', "1e3"), ["metadata", "initiator"]),
    ("metadata-big-int", with_(metadata={"n": 2**60}), ["metadata", "n"]),
    ("metadata-not-object", with_(metadata=["ops"]), ["metadata"]),
    (
        "allowedJurisdictions-non-string",
        with_policy(allowedJurisdictions=["US", 5]),
        ["allowedJurisdictions"],
    ),
    ("allowedJurisdictions-null-item", with_policy(allowedJurisdictions=[None]), ["allowedJurisdictions"]),
    ("allowedJurisdictions-string", with_policy(allowedJurisdictions="US"), ["allowedJurisdictions"]),
    ("requireConsent-string", with_policy(requireConsent="true"), ["requireConsent"]),
    ("requireConsent-int", with_policy(requireConsent=1), ["requireConsent"]),
    ("requireConsent-null", with_policy(requireConsent=None), ["requireConsent"]),
    ("retentionCutoff-no-offset", with_policy(retentionCutoff="2023-12-01T00:00:00"), ["retentionCutoff"]),
    ("retentionCutoff-garbage", with_policy(retentionCutoff="last year"), ["retentionCutoff"]),
    ("onViolation-unknown", with_policy(onViolation="warn"), ["onViolation"]),
    ("onViolation-uppercase", with_policy(onViolation="BLOCK"), ["onViolation"]),
    ("onViolation-null", with_policy(onViolation=None), ["onViolation"]),
    (
        "expectedDecisionHash-short",
        with_(expectedDecisionHash="sha256:" + "0" * 63),
        ["expectedDecisionHash"],
    ),
    ("expectedDecisionHash-no-prefix", with_(expectedDecisionHash="0" * 64), ["expectedDecisionHash"]),
    (
        "expectedDecisionHash-uppercase",
        with_(expectedDecisionHash="sha256:" + "A" * 64),
        ["expectedDecisionHash"],
    ),
    (
        "expectedDecisionHash-other-algo",
        with_(expectedDecisionHash="md5:" + "0" * 32),
        ["expectedDecisionHash"],
    ),
    ("expectedDecisionHash-number", with_(expectedDecisionHash=5), ["expectedDecisionHash"]),
    ("existingTargetIds-non-string", with_(existingTargetIds=["a", 5]), ["existingTargetIds"]),
    ("existingTargetIds-null-item", with_(existingTargetIds=[None]), ["existingTargetIds"]),
    ("existingTargetIds-string", with_(existingTargetIds="a"), ["existingTargetIds"]),
    ("duplicate-top-level-key", raw('{"runId": "a", "runId": "b"}'), ["request", "duplicate", "runId"]),
    ("duplicate-key-in-record", with_record(0, '{"id": "x", "id": "y"}'), ["duplicate", "id"]),
    (
        "duplicate-policy-key",
        _replace_in_text('"onViolation": "omit"', '"onViolation": "omit", "onViolation": "block"'),
        ["duplicate", "onViolation"],
    ),
    ("nan", _replace_in_text('"chunkSeconds": 3600', '"chunkSeconds": NaN'), ["request", "NaN"]),
    ("nan-in-record", with_record(0, '{"id": "x", "amount": NaN}'), ["NaN"]),
    ("infinity-in-metadata", _replace_in_text('"ops-team"', "Infinity"), ["Infinity"]),
    ("negative-infinity", with_record(1, '{"id": "x", "amount": -Infinity}'), ["Infinity"]),
    ("not-json", raw("{runId: retro}"), ["request", "JSON"]),
    ("truncated-json", raw('{"runId": "a"'), ["request", "JSON"]),
    ("empty-file", raw(b""), ["request", "JSON"]),
    ("not-utf8", raw(b'{"runId": "\xff"}'), ["request"]),
    ("trailing-garbage", lambda: json.dumps(base_request()).encode() + b" {}", ["request", "JSON"]),
    ("not-an-object-array", raw("[]"), ["request", "object"]),
    ("not-an-object-string", raw('"request"'), ["request", "object"]),
    ("not-an-object-null", raw("null"), ["request", "object"]),
    ("record-int-2**60", with_record(0, str(2**60)), ["sourceRecords[0]"]),
    ("record-field-2**60", with_record(2, f'{{"id": "x", "amount": {2**60}}}'), ["sourceRecords[2]"]),
    ("record-field-minus-2**53", with_record(1, f'{{"id": "x", "amount": -{2**53}}}'), ["sourceRecords[1]"]),
    ("record-lone-surrogate", with_record(1, '{"id": "\\ud800"}'), ["sourceRecords[1]"]),
    ("record-lone-surrogate-key", with_record(0, '{"\\udfff": 1}'), ["sourceRecords[0]"]),
    (
        "table-with-sql-target",
        with_(
            table={"format": "iceberg", "name": "ns.t"},
            target={"kind": "sql", "url": "sqlite:///t.db", "table": "t", "key": ["id"]},
        ),
        ["table", "SQL target"],
    ),
]


def _write_request(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "req.json"
    path.write_bytes(data)
    return path


def _assert_refused(status: int, out: str, err: str, words: list[str]) -> None:
    assert status == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert "invalid input" in err
    for word in words:
        assert word in err, (word, err)
    assert err.count("\n") == 1  # one line: the message


@pytest.mark.parametrize(("build", "words"), [pytest.param(b, w, id=i) for i, b, w in INVALID_CASES])
def test_invalid_request_execute_writes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    build: Callable[[], bytes],
    words: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PCBO_HOME", raising=False)
    request = _write_request(tmp_path, build())
    home, output = tmp_path / "home", tmp_path / "out.json"
    status = main(["execute", "--input", str(request), "--home", str(home), "--output", str(output)])
    captured = capsys.readouterr()
    _assert_refused(status, captured.out, captured.err, words)
    assert not home.exists()
    assert not output.exists()
    assert sorted(os.listdir(tmp_path)) == ["req.json"]  # no temporary output, no ./.pcbo


@pytest.mark.parametrize("command", ["plan", "dry-run"])
@pytest.mark.parametrize(("build", "words"), [pytest.param(b, w, id=i) for i, b, w in INVALID_CASES])
def test_invalid_request_plan_and_dry_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    build: Callable[[], bytes],
    words: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    request = _write_request(tmp_path, build())
    output = tmp_path / "out.json"
    status = main([command, "--input", str(request), "--output", str(output)])
    captured = capsys.readouterr()
    _assert_refused(status, captured.out, captured.err, words)
    assert sorted(os.listdir(tmp_path)) == ["req.json"]


def test_missing_input_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, output = tmp_path / "home", tmp_path / "out.json"
    status = main(
        ["execute", "--input", str(tmp_path / "nope.json"), "--home", str(home), "--output", str(output)]
    )
    captured = capsys.readouterr()
    _assert_refused(status, captured.out, captured.err, ["--input", "nope.json"])
    assert os.listdir(tmp_path) == []


def test_input_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dir").mkdir()
    status = main(["execute", "--input", str(tmp_path / "dir"), "--home", str(tmp_path / "home")])
    captured = capsys.readouterr()
    _assert_refused(status, captured.out, captured.err, ["--input"])
    assert os.listdir(tmp_path) == ["dir"]


# ----------------------------------------------------------------------------------------------------------
# boundaries that are valid


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"runId": "r" * 128, "dataset": "A" + "._-" * 42, "versionLabel": "9"}, id="names-128"),
        pytest.param({"runId": "a..b", "dataset": "x.y", "versionLabel": "v1.0-rc_1"}, id="names-with-dots"),
        pytest.param(
            {"end": "2024-01-02T03:46:40Z", "chunkSeconds": 1, "sourceRecords": []}, id="100000-partitions"
        ),
        pytest.param({"chunkSeconds": 10**9}, id="one-huge-chunk"),
        pytest.param(
            {"start": "2024-01-01T05:30:00+05:30", "end": "2024-01-01T00:00:00.000001Z"}, id="1us-window"
        ),
        pytest.param({"metadata": {"a": [1, "x", True, None, {"b": -(2**53 - 1)}]}}, id="metadata-nested"),
        pytest.param({"expectedDecisionHash": GOOD_HASH}, id="expectedDecisionHash-well-formed"),
        pytest.param({"policies": {}}, id="policies-empty"),
        pytest.param(
            {"sourceRecords": [2**53 - 1, -(2**53 - 1), {"id": "x", "n": 1.5}]}, id="records-edge-numbers"
        ),
    ],
)
def test_valid_boundaries_load(changes: dict[str, Any]) -> None:
    request = base_request()
    request.update(changes)
    loaded = load_request(json.dumps(request).encode())
    assert loaded.request.runId == request["runId"]


def test_policies_absent_uses_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    request = base_request()
    del request["policies"], request["versionLabel"], request["chunkSeconds"]
    del request["existingTargetIds"], request["expectedDecisionHash"], request["metadata"]
    request["sourceRecords"].append({"id": "no-consent", "occurredAt": "2024-01-01T00:20:00Z"})
    path = _write_request(tmp_path, json.dumps(request).encode())
    assert main(["dry-run", "--input", str(path)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["versionLabel"] == "v1"
    assert len(document["partitions"]) == 2  # chunkSeconds 3600
    assert document["partitions"][0]["omit"] == [{"id": "no-consent", "reasons": ["CONSENT_MISSING"]}]


# ----------------------------------------------------------------------------------------------------------
# plan and dry-run never write; --output


def test_plan_and_dry_run_never_create_the_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PCBO_HOME", str(tmp_path / "home"))
    path = _write_request(tmp_path, json.dumps(base_request()).encode())
    assert main(["plan", "--input", str(path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert main(["dry-run", "--input", str(path)]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert sorted(os.listdir(tmp_path)) == ["req.json"]
    assert set(plan) == {"runId", "dataset", "versionLabel", "planHash", "partitions"}
    assert plan["partitions"] == [
        {
            "index": 0,
            "key": "20240101T000000Z",
            "start": "2024-01-01T00:00:00Z",
            "end": "2024-01-01T01:00:00Z",
        },
        {
            "index": 1,
            "key": "20240101T010000Z",
            "start": "2024-01-01T01:00:00Z",
            "end": "2024-01-01T02:00:00Z",
        },
    ]
    assert dry["planHash"] == plan["planHash"]
    assert [p["add"] for p in dry["partitions"]] == [["rec-1"], ["rec-2"]]


def test_output_file_gets_the_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_request(tmp_path, json.dumps(base_request()).encode())
    assert main(["dry-run", "--input", str(path)]) == 0
    expected = json.loads(capsys.readouterr().out)
    output = tmp_path / "file.json"
    output.write_text("old content")
    assert main(["dry-run", "--input", str(path), "--output", str(output)]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads(output.read_text()) == expected
    # execute too
    out2 = tmp_path / "execute.json"
    assert (
        main(["execute", "--input", str(path), "--home", str(tmp_path / "home"), "--output", str(out2)]) == 0
    )
    assert capsys.readouterr().out == ""
    executed = json.loads(out2.read_text())
    assert executed["status"] == "committed"
    assert executed["decisionHash"] == expected["decisionHash"]
    assert sorted(os.listdir(tmp_path)) == ["execute.json", "file.json", "home", "req.json"]


@pytest.mark.parametrize("command", ["dry-run", "execute"])
def test_output_to_a_fifo_is_written_not_replaced(tmp_path: Path, command: str) -> None:
    path = _write_request(tmp_path, json.dumps(base_request()).encode())
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def reader() -> None:
        with open(fifo, "rb") as fh:
            received.append(fh.read())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    args = [command, "--input", str(path), "--output", str(fifo)]
    if command == "execute":
        args += ["--home", str(tmp_path / "home")]
    try:
        status = main(args)
    finally:
        thread.join(timeout=10)
        if thread.is_alive():  # unblock the reader if nothing ever opened the FIFO for writing
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            thread.join(timeout=10)
    assert status == 0
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert len(received) == 1
    document = json.loads(received[0])
    assert document["planHash"].startswith("sha256:")
    if command == "execute":
        assert document["status"] == "committed"
    else:
        assert [p["add"] for p in document["partitions"]] == [["rec-1"], ["rec-2"]]
    leftovers = sorted(os.listdir(tmp_path))
    assert leftovers == (["home", "pipe", "req.json"] if command == "execute" else ["pipe", "req.json"])


# ----------------------------------------------------------------------------------------------------------
# gates: exit 3, nothing written


def _dry_run_document(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["dry-run", "--input", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_gate_expected_decision_hash_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    request = base_request()
    path = _write_request(tmp_path, json.dumps(request).encode())
    actual = _dry_run_document(path, capsys)["decisionHash"]
    request["expectedDecisionHash"] = GOOD_HASH
    path = _write_request(tmp_path, json.dumps(request).encode())
    home = tmp_path / "home"
    status = main(["execute", "--input", str(path), "--home", str(home)])
    captured = capsys.readouterr()
    assert status == 3
    assert "Traceback" not in captured.err
    assert not home.exists()
    document = json.loads(captured.out)
    assert document["status"] == "blocked"
    assert document["gate"] == "expectedDecisionHash"
    assert document["expectedDecisionHash"] == GOOD_HASH
    assert document["decisionHash"] == actual

    # The matching hash passes the gate and executes.
    request["expectedDecisionHash"] = actual
    path = _write_request(tmp_path, json.dumps(request).encode())
    assert main(["execute", "--input", str(path), "--home", str(home)]) == 0
    executed = json.loads(capsys.readouterr().out)
    assert executed["status"] == "committed"
    assert executed["decisionHash"] == actual


def test_gate_expected_decision_hash_mismatch_with_output_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = base_request() | {"expectedDecisionHash": GOOD_HASH}
    path = _write_request(tmp_path, json.dumps(request).encode())
    home, output = tmp_path / "home", tmp_path / "blocked.json"
    assert main(["execute", "--input", str(path), "--home", str(home), "--output", str(output)]) == 3
    assert capsys.readouterr().out == ""
    assert not home.exists()
    assert json.loads(output.read_text())["gate"] == "expectedDecisionHash"


def test_gate_on_violation_block_lists_breaches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    request = base_request()
    request["policies"]["onViolation"] = "block"
    request["sourceRecords"] += [
        {
            "id": "no-consent",
            "occurredAt": "2024-01-01T00:20:00Z",
            "jurisdiction": "US",
            "retentionExpiresAt": "2025-01-01T00:00:00Z",
        },
        {
            "id": "mexico",
            "occurredAt": "2024-01-01T01:20:00Z",
            "jurisdiction": "MX",
            "consentGranted": True,
            "retentionExpiresAt": "2025-01-01T00:00:00Z",
        },
        {"id": "all-three", "occurredAt": "2024-01-01T01:30:00Z", "consentGranted": "true"},
        # Not policy reasons: these alone never block.
        {
            "id": "rec-legacy-1",
            "occurredAt": "2024-01-01T00:30:00Z",
            "jurisdiction": "US",
            "consentGranted": True,
            "retentionExpiresAt": "2025-01-01T00:00:00Z",
        },
        {"id": "outside", "occurredAt": "2025-01-01T00:00:00Z", "consentGranted": False},
        {"id": "invalid"},
    ]
    path = _write_request(tmp_path, json.dumps(request).encode())
    home = tmp_path / "home"
    status = main(["execute", "--input", str(path), "--home", str(home)])
    captured = capsys.readouterr()
    assert status == 3
    assert "Traceback" not in captured.err
    assert not home.exists()
    document = json.loads(captured.out)
    assert document["status"] == "blocked"
    assert document["gate"] == "onViolation"
    breaches = sorted((b["id"], b["partition"], b["reasons"]) for b in document["breaches"])
    assert breaches == [
        (
            "all-three",
            "20240101T010000Z",
            ["CONSENT_MISSING", "JURISDICTION_NOT_ALLOWED", "RETENTION_EXPIRED"],
        ),
        ("mexico", "20240101T010000Z", ["JURISDICTION_NOT_ALLOWED"]),
        ("no-consent", "20240101T000000Z", ["CONSENT_MISSING"]),
    ]
    # dry-run is not gated: it still prints every decision.
    dry = _dry_run_document(path, capsys)
    assert document["decisionHash"] == dry["decisionHash"]
    assert not home.exists()


def test_gate_on_violation_block_without_breaches_executes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = base_request()
    request["policies"]["onViolation"] = "block"
    record = {
        "id": "rec-legacy-1",
        "occurredAt": "2024-01-01T00:30:00Z",
        "jurisdiction": "US",
        "consentGranted": True,
        "retentionExpiresAt": "2025-01-01T00:00:00Z",
    }
    request["sourceRecords"] += [
        record,  # ALREADY_PRESENT
        dict(record, id="twice"),
        dict(record, id="twice"),  # an identical copy: DUPLICATE_ID
        {"id": "outside", "occurredAt": "2025-01-01T00:00:00Z", "consentGranted": False},
        {"id": "invalid", "consentGranted": False},
    ]
    path = _write_request(tmp_path, json.dumps(request).encode())
    home = tmp_path / "home"
    assert main(["execute", "--input", str(path), "--home", str(home)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["status"] == "committed"
    assert home.is_dir()
    assert [p["recordCount"] for p in document["partitions"]] == [2, 1]


# ----------------------------------------------------------------------------------------------------------
# the installed script, in a subprocess


def _pcbo_command() -> list[str]:
    script = Path(sys.executable).with_name("pcbo")
    if script.exists():
        return [str(script)]
    found = shutil.which("pcbo")
    if found:
        return [found]
    return [sys.executable, "-m", "pcbo_dagster.cli.main"]


SUBPROCESS_CASES = [
    "unknown-policy-field",
    "not-json",
    "duplicate-top-level-key",
    "record-int-2**60",
    "too-many-partitions",
    "metadata-nested-float",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "words"), [pytest.param(b, w, id=i) for i, b, w in INVALID_CASES if i in SUBPROCESS_CASES]
)
def test_invalid_request_subprocess(tmp_path: Path, build: Callable[[], bytes], words: list[str]) -> None:
    request = _write_request(tmp_path, build())
    home, output = tmp_path / "home", tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCBO_")}
    result = subprocess.run(
        [*_pcbo_command(), "execute", "--input", str(request), "--home", str(home), "--output", str(output)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    _assert_refused(result.returncode, result.stdout, result.stderr, words)
    assert not home.exists()
    assert not output.exists()
    assert sorted(os.listdir(tmp_path)) == ["req.json"]


@pytest.mark.slow
def test_missing_input_subprocess(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCBO_")}
    result = subprocess.run(
        [*_pcbo_command(), "execute", "--input", "missing.json", "--output", "out.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    _assert_refused(result.returncode, result.stdout, result.stderr, ["--input", "missing.json"])
    assert os.listdir(tmp_path) == []  # not even ./.pcbo


@pytest.mark.slow
def test_blocked_subprocess(tmp_path: Path) -> None:
    request = base_request()
    request["policies"]["onViolation"] = "block"
    request["sourceRecords"][0]["consentGranted"] = False
    path = _write_request(tmp_path, json.dumps(request).encode())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCBO_")}
    result = subprocess.run(
        [*_pcbo_command(), "execute", "--input", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(result.stdout)["breaches"] == [
        {"partition": "20240101T000000Z", "id": "rec-1", "reasons": ["CONSENT_MISSING"]}
    ]
    assert os.listdir(tmp_path) == ["req.json"]  # no ./.pcbo


@pytest.mark.parametrize("where", ["inline", "jsonl"])
def test_an_integer_of_thousands_of_digits_is_refused_in_plain_words(tmp_path: Path, where: str) -> None:
    """(red-team finding) A 5,000-digit integer hit Python's conversion limit: the message quoted its
    advice ("use sys.set_int_max_str_digits() to increase the limit"). It says what is wrong now."""
    from pcbo_dagster_tests.cli_runner import run_pcbo, write_request

    huge = "9" * 5000
    record = '{"id":"a","occurredAt":"2024-01-01T00:10:00Z","consentGranted":true,"x":' + huge + "}"
    request: dict[str, Any] = {
        "runId": "huge",
        "dataset": "events",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-01T01:00:00Z",
        "chunkSeconds": 3600,
    }
    if where == "jsonl":
        (tmp_path / "records.jsonl").write_text(record + "\n")
        request["source"] = {"uri": "records.jsonl"}
        path = write_request(tmp_path / "r.json", request)
    else:
        path = tmp_path / "r.json"
        path.write_text(json.dumps(request)[:-1] + ', "sourceRecords": [' + record + "]}")
    home = tmp_path / "home"
    planned = run_pcbo(["dry-run", "--input", path], home=home)
    assert planned.status == 2, planned.stderr
    assert "an integer of 5000 digits" in planned.stderr
    assert "set_int_max_str_digits" not in planned.stderr
    assert not home.exists()

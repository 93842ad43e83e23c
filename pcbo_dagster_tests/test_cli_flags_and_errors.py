"""The `pcbo` command line as a user meets it: every flag explains itself, an error names the flag
that was typed, an id the partition omitted is explained, and a tampered file is called unreadable.

Everything runs through the real CLI on the demo request (`examples/demo_request.json`: 6 hourly
partitions with consent, jurisdiction and retention omissions), each command in a process of its own:
forked from one that imported pcbo once (`pcbo_fork_runner`), but `--help`'s and a closed pipe's, which
start their own interpreter.
"""

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.cli.main import build_parser
from pcbo_dagster_tests.cli_runner import REPO_ROOT, lake_dir, pcbo_env, write_request
from pcbo_dagster_tests.pcbo_fork_runner import run_pcbo_forked as run_pcbo

DEMO_REQUEST = REPO_ROOT / "examples" / "demo_request.json"
DATASET = "demo-events"
FIRST_KEY = "20240101T000000Z"


def _commands(parser: argparse.ArgumentParser, path: str = "pcbo") -> Iterator[tuple[str, argparse.Action]]:
    """(command path, action) for every argument of every (sub)command, help flags aside."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_flag_of_every_command_has_help():
    arguments = list(_commands(build_parser()))
    missing = [
        f"{path} {'/'.join(action.option_strings) or action.dest}"
        for path, action in arguments
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []
    commands = {path for path, _ in arguments}
    assert {"pcbo proof", "pcbo rollout promote", "pcbo approve", "pcbo demo-data"} <= commands
    # and it is what the real command line shows
    shown = subprocess.run(
        [sys.executable, "-m", "pcbo_dagster.cli.main", "rollout", "promote", "--help"],
        env=pcbo_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0 and "--by BY" in shown.stdout and "who promotes" in shown.stdout


def test_only_commands_that_may_append_to_a_chain_take_signing_flags(tmp_path):
    """A command that never appends to an audit chain (a query, a proof, the token commands) offers
    no `--signing-key`/`--witness`: they would be silently unused. Typed there, they are refused."""
    flags: dict[str, set[str]] = {}
    for path, action in _commands(build_parser()):
        flags.setdefault(path, set()).update(action.option_strings)
    for readers in ("pcbo query", "pcbo proof", "pcbo token create", "pcbo token list", "pcbo token revoke"):
        assert "--home" in flags[readers] and not {"--signing-key", "--witness"} & flags[readers], readers
    for writer in ("pcbo execute", "pcbo rollback", "pcbo verify", "pcbo gc", "pcbo log publish"):
        assert {"--signing-key", "--witness"} <= flags[writer], writer
    refused = run_pcbo(["query", "--dataset", DATASET, "--signing-key", "k", "SELECT 1"], home=tmp_path / "h")
    assert refused.status == 2 and "unrecognized arguments: --signing-key" in refused.stderr
    assert not (tmp_path / "h").exists()


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The demo request executed into a home; (home, execute document, dry-run document)."""
    root = tmp_path_factory.mktemp("cli-polish")
    home = root / "home"
    done = run_pcbo(["execute", "--input", DEMO_REQUEST], home=home)
    assert done.status == 0, done.stderr
    planned = run_pcbo(["dry-run", "--input", DEMO_REQUEST], home=home)
    assert planned.status == 0, planned.stderr
    return home, done.document, planned.document


def _fresh_copy(executed: tuple[Path, dict, dict], tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(executed[0], home)
    return home


def _proof(home: Path, *args: str):
    return run_pcbo(["proof", "--dataset", DATASET, "--partition", FIRST_KEY, *args], home=home)


def test_errors_name_the_flag_that_was_typed(executed, tmp_path):
    home = executed[0]
    missing = run_pcbo(["verify-proof", "--proof", tmp_path / "missing.json"], home=home)
    assert missing.status == 2 and "invalid input: --proof: cannot read" in missing.stderr

    made = _proof(home, "--id", executed[2]["partitions"][0]["add"][0])
    assert made.status == 0, made.stderr
    proof = tmp_path / "proof.json"
    proof.write_text(json.dumps(made.document))
    bad_root = run_pcbo(["verify-proof", "--proof", proof, "--root", "abc"], home=home)
    assert bad_root.status == 2
    assert "invalid input: --root: must be a sha256:<64 hex> digest" in bad_root.stderr
    # A malformed root inside the document names the document's field, not a flag.
    proof.write_text(json.dumps({**made.document, "merkleRoot": "abc"}))
    bad_field = run_pcbo(["verify-proof", "--proof", proof], home=home)
    assert bad_field.status == 2 and "invalid input: merkleRoot: " in bad_field.stderr

    unknown = run_pcbo(
        ["proof", "--dataset", DATASET, "--partition", "20990101T000000Z", "--id", "x"], home=home
    )
    assert unknown.status == 2 and "invalid input: --partition: " in unknown.stderr
    no_version = _proof(home, "--from-version", "1", "--to-version", "7")
    assert no_version.status == 2 and "invalid input: --to-version: " in no_version.stderr
    for result in (missing, bad_root, bad_field, unknown, no_version):
        assert "Traceback" not in result.stderr and result.document is None


def test_proof_of_an_omitted_id_says_it_was_omitted_and_why(executed):
    home, _, planned = executed
    first = planned["partitions"][0]
    omitted = first["omit"][0]  # {"id", "reasons"}: what the dry-run decided for this partition
    result = _proof(home, "--id", omitted["id"])
    assert result.status == 2 and result.document is None
    message = result.stderr
    assert f"invalid input: --id: {omitted['id']!r} is not among the {len(first['add'])} id(s)" in message
    assert f"window [{first['start']}, {first['end']})" in message
    assert f"omitted {len(first['omit'])} record(s)" in message
    for reason, count in first["counts"]["byReason"].items():
        assert (f"{reason} {count}" in message) == bool(count)
    assert all(reason in message for reason in omitted["reasons"])
    assert planned["decisionHash"] in message and "pcbo dry-run" in message and "Traceback" not in message


def test_proof_in_a_partition_that_omitted_nothing_says_no_record_of_that_id_was_in_its_window(tmp_path):
    request = write_request(
        tmp_path / "request.json",
        {
            "runId": "clean-001",
            "dataset": "clean",
            "start": "2024-01-01T00:00:00Z",
            "end": "2024-01-01T02:00:00Z",
            "policies": {"requireConsent": False},
            "sourceRecords": [
                {"id": "a", "occurredAt": "2024-01-01T00:10:00Z"},
                {"id": "b", "occurredAt": "2024-01-01T01:10:00Z"},
            ],
        },
    )
    home = tmp_path / "home"
    assert run_pcbo(["execute", "--input", request], home=home).status == 0
    result = run_pcbo(
        ["proof", "--dataset", "clean", "--partition", "20240101T010000Z", "--id", "a"], home=home
    )
    assert result.status == 2 and "invalid input: --id: 'a' is not among the 1 id(s)" in result.stderr
    assert "omitted no record, so no valid record with this id fell into its window" in result.stderr


def _first_partitions_findings(home: Path) -> list[dict[str, Any]]:
    """`pcbo verify` (exit 1) of a copied demo home: its findings about the first partition. (The demo
    publishes an Iceberg table; in a copied home it still names the original lake's files, by absolute
    path, which verify reports as table findings: not what these tests are about.)"""
    verified = run_pcbo(["verify"], home=home)
    assert verified.status == 1
    return [
        f
        for f in verified.document["findings"]
        if FIRST_KEY in f["where"] and not f["kind"].startswith("table_")
    ]


def test_a_tampered_parquet_file_is_reported_unreadable_not_as_zero_rows(executed, tmp_path):
    home = _fresh_copy(executed, tmp_path)
    partition = executed[1]["partitions"][0]
    (entry,) = partition["files"]
    data_file = lake_dir(home) / entry["uri"].split("/lake/", 1)[1]
    data = bytearray(data_file.read_bytes())
    data[100:140] = bytes(b ^ 0xFF for b in data[100:140])
    data_file.write_bytes(bytes(data))

    findings = _first_partitions_findings(home)
    assert [f["kind"] for f in findings] == ["file_checksum_mismatch"]
    assert findings[0]["detail"].startswith("unreadable: ")
    assert not any("0 rows" in f["detail"] for f in findings)

    added = executed[2]["partitions"][0]["add"][0]
    proof = _proof(home, "--id", added)
    assert proof.status == 1 and proof.document is None
    assert f"cannot prove anything from {DATASET}/v1/{FIRST_KEY}" in proof.stderr
    assert "unreadable: the file's SHA-256 differs from its manifest" in proof.stderr
    assert "Traceback" not in proof.stderr

    data_file.unlink()  # a missing file: unreadable too, and still no "0 rows"
    findings = _first_partitions_findings(home)
    assert [f["kind"] for f in findings] == ["file_missing"] and "unreadable" in findings[0]["detail"]
    assert _proof(home, "--id", added).status == 1


def test_a_data_file_of_another_size_is_one_finding_unreadable(executed, tmp_path):
    """A data file replaced by bytes of another length (truncated, overwritten) is reported once, as
    unreadable, as the README says: its size is part of that finding, not a second one."""
    home = _fresh_copy(executed, tmp_path)
    (entry,) = executed[1]["partitions"][0]["files"]
    data_file = lake_dir(home) / entry["uri"].split("/lake/", 1)[1]
    data_file.write_bytes(b"garbage\n")

    findings = _first_partitions_findings(home)
    assert [f["kind"] for f in findings] == ["file_checksum_mismatch"]
    assert findings[0]["detail"].startswith("unreadable: ")
    assert f"8 bytes, manifest says {entry['byteSize']}" in findings[0]["detail"]

    proof = _proof(home, "--id", executed[2]["partitions"][0]["add"][0])
    assert proof.status == 1 and proof.document is None
    assert proof.stderr.count(data_file.name) == 1 and "unreadable: " in proof.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`pcbo dry-run ... | head`: no traceback when stdout closes early."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pcbo_dagster.cli.main", "dry-run", "--input", str(DEMO_REQUEST)],
        env=pcbo_env(tmp_path / "home"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the document is written
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert "the output was closed before the whole document was written" in stderr


def test_a_run_id_of_another_dataset_version_s_run_is_invalid_input(tmp_path):
    """A run row belongs to one chain: an execute reusing another dataset version's runId would rewrite
    that run's status and summary, and leave its own chain naming a run the catalog does not hold. It
    is refused naming runId, before anything is written; the same dataset version may run it again."""
    from pcbo_dagster_tests.cli_runner import load_generator

    home = tmp_path / "home"
    first = load_generator().make_request(records=20, partitions=2, seed=3, run_id="shared-001")
    assert run_pcbo(["execute", "--input", write_request(tmp_path / "a.json", first)], home=home).status == 0
    verified = run_pcbo(["verify"], home=home)
    assert verified.status == 0, verified.document
    chains_before = verified.document["checked"]["chains"]

    for changes in ({"dataset": "other-events"}, {"versionLabel": "v2"}):
        second = {**first, **changes}
        run = run_pcbo(["execute", "--input", write_request(tmp_path / "b.json", second)], home=home)
        assert run.status == 2, (run.status, run.stderr)
        assert "runId" in run.stderr and "another dataset version's run" in run.stderr, run.stderr
        after = run_pcbo(["verify"], home=home)
        assert after.status == 0 and after.document["checked"]["chains"] == chains_before, after.document
    again = run_pcbo(["execute", "--input", write_request(tmp_path / "a.json", first)], home=home)
    assert again.status == 0, again.stderr


def test_a_run_id_of_another_request_s_run_is_invalid_input(tmp_path):
    """(red-team finding) A run row holds one request's plan and decision hashes, which its commit
    events carry too. Executing its runId again with other records (a source file edited between two
    runs) or the same records in another order (the same plan hash, another decision hash) committed
    new versions under the run, and `verify` then found the catalog's run row disagreeing with its own
    commit events (`catalog_run_mismatch`, `catalog_lineage_mismatch`): pcbo wrote a state it calls
    invalid. Refused naming runId, nothing written; the same request still repeats."""
    from pcbo_dagster_tests.cli_runner import load_generator

    home = tmp_path / "home"
    first = load_generator().make_request(records=20, partitions=2, seed=3, run_id="edited-001")
    assert run_pcbo(["execute", "--input", write_request(tmp_path / "a.json", first)], home=home).status == 0
    verified = run_pcbo(["verify"], home=home)
    assert verified.status == 0, verified.document
    chains_before = verified.document["checked"]["chains"]

    edited = {**first, "sourceRecords": [{**r, "note": "edited"} for r in first["sourceRecords"]]}
    reordered = {**first, "sourceRecords": list(reversed(first["sourceRecords"]))}
    for second in (edited, reordered):
        run = run_pcbo(["execute", "--input", write_request(tmp_path / "b.json", second)], home=home)
        assert run.status == 2, (run.status, run.stderr)
        assert "invalid input: runId:" in run.stderr and "another request" in run.stderr, run.stderr
        after = run_pcbo(["verify"], home=home)
        assert after.status == 0 and after.document["checked"]["chains"] == chains_before, after.document
    again = run_pcbo(["execute", "--input", write_request(tmp_path / "a.json", first)], home=home)
    assert again.status == 0, again.stderr
    assert run_pcbo(["verify"], home=home).status == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("auditPath", 5),
        ("auditPath", True),
        ("auditPath", {"sha256:": 1}),
        ("auditPath", "sha256:"),
        ("proof", 1.5),
    ],
)
def test_a_proof_whose_path_is_not_a_list_is_invalid_input_on_that_field(executed, tmp_path, field, value):
    """(red-team finding) `auditPath: 5` was an internal error (exit 1, TypeError), and a string or an
    object was read character by character or key by key."""
    home, _, planned = executed
    made = _proof(home, "--id", planned["partitions"][0]["add"][0])
    assert made.status == 0, made.stderr
    root = made.document["merkleRoot"]
    document = (
        made.document
        if field == "auditPath"
        else {"kind": "pcbo.consistency-proof/1", "size1": 1, "size2": 1, "root1": root, "root2": root}
    )
    proof = tmp_path / "proof.json"
    proof.write_text(json.dumps({**document, field: value}))
    refused = run_pcbo(["verify-proof", "--proof", proof], home=home)
    assert refused.status == 2, refused.stderr
    named = "--proof" if field == "proof" else field  # (the document's `proof` is shown as the flag's)
    assert f"invalid input: {named}: must be a list of sha256:<64 hex> digests" in refused.stderr
    assert "Traceback" not in refused.stderr and "internal error" not in refused.stderr

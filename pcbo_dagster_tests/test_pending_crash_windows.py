"""`pcbo verify` reports the commit intents a crash left open (on the chain, no commit event, the commit
point still the version they were to replace) as pending crash windows: derived from the chain, not
findings (nothing was tampered with), each saying what closes it; the next run closes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pcbo_dagster_tests.cli_runner import load_generator, run_pcbo, write_request

CRASH_STATUS = 86


@pytest.mark.parametrize("point", ["before_commit", "after_data_files"])
def test_an_intent_a_crash_left_open_is_pending_until_the_next_run(tmp_path: Path, point: str) -> None:
    request = write_request(
        tmp_path / "request.json",
        load_generator().make_request(records=60, partitions=3, seed=5, run_id="pending-1"),
    )
    home = tmp_path / "home"
    run = run_pcbo(["execute", "--input", request], home=home, env={"PCBO_FAILPOINT": f"{point}@1"})
    assert run.status == CRASH_STATUS, run.stderr

    run = run_pcbo(["verify"], home=home)
    assert run.status == 0, run.document
    assert run.document["status"] == "clean" and run.document["findings"] == []
    pending = run.document["pending"]
    if point == "after_data_files":  # no intent was recorded: nothing is pending
        assert pending == []
    else:
        keys = [p["where"] for p in pending]
        assert keys == [f"events/v1/20240101T0{h}0000Z" for h in range(3)]
        assert {p["kind"] for p in pending} == {"commit_intent_open"}
        assert {(p["runId"], p["version"]) for p in pending} == {("pending-1", 1)}
        assert all(
            "not tampering" in p["detail"] and "re-running the request" in p["detail"] for p in pending
        )
        # `--repair` has nothing to complete (no commit point was written) and says the same
        run = run_pcbo(["verify", "--repair"], home=home)
        assert run.status == 0 and run.document["repaired"] == [] and run.document["pending"] == pending

    run = run_pcbo(["execute", "--input", request], home=home)
    assert run.status == 0, run.stderr
    run = run_pcbo(["verify"], home=home)
    assert run.status == 0 and run.document["status"] == "clean"
    assert run.document["pending"] == []


def test_a_tampered_data_file_under_a_completed_intent_is_found_before_repair(tmp_path: Path) -> None:
    """Red-team finding: a crash left an intent open; someone who can write the lake altered a staged
    data file, then completed the intent by copying its staged `_versions/` manifest in as the commit
    point. `verify` called the partition a crash window `--repair` completes (`audit_event_missing`)
    and read none of its files: the altered file showed only after the repair had appended the commit.
    The commit point the intent names is checked as any commit point, repairing or not."""
    request = write_request(
        tmp_path / "request.json",
        load_generator().make_request(records=60, partitions=3, seed=5, run_id="pending-1"),
    )
    home = tmp_path / "home"
    run = run_pcbo(["execute", "--input", request], home=home, env={"PCBO_FAILPOINT": "before_commit@1"})
    assert run.status == CRASH_STATUS, run.stderr
    partition = home / "lake" / "events" / "v1" / "20240101T010000Z"
    staged = json.loads((partition / "_versions" / "v000001.json").read_bytes())
    data = home / "lake" / staged["files"][0]["path"]
    data.write_bytes(data.read_bytes()[:-9] + b"tampered!")
    shutil.copyfile(partition / "_versions" / "v000001.json", partition / "_manifest.json")

    run = run_pcbo(["verify"], home=home)
    assert run.status == 1, run.document
    found = {(f["kind"], f["where"]) for f in run.document["findings"]}
    assert ("audit_event_missing", "events/v1/20240101T010000Z") in found
    assert ("file_checksum_mismatch", staged["files"][0]["path"]) in found, found

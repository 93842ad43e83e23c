"""Red team of the healing path: `pcbo verify --repair` heals the commit protocol's crash windows and
nothing else. A chain cut back (consistently, in the backup and the catalog) to just after a run's
intent, with the run's commit points still in the lake, looks exactly like the crash window between
the commit point and its event; given the checkpoint an auditor holds, repair must not heal it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pcbo_dagster_tests.cli_runner import backup_file
from pcbo_dagster_tests.test_transparency_attacks import (  # noqa: F401 - fixtures
    _kinds,
    _rewrite_chain,
    _verify_trusted,
    history,
    pcbo,
    witness_server,
)


def test_repair_given_a_held_checkpoint_heals_no_chain_that_does_not_extend_it(
    history: dict[str, Any],  # noqa: F811 - the fixture
) -> None:
    home: Path = history["home"]
    kinds = [json.loads(line)["event_type"] for line in backup_file(home).read_bytes().splitlines()]
    last_intent = max(i for i, kind in enumerate(kinds) if kind == "partition_commit_intent")
    # r2's commit events are gone: its commit points, still in the lake, now look like a crash window
    _rewrite_chain(home, last_intent + 1, lambda events: None)
    status, document = pcbo(home, "verify")
    assert "audit_event_missing" in _kinds(document), document["findings"]
    before = backup_file(home).read_bytes()

    status, document = _verify_trusted(history, "r2", "--repair")
    assert status == 1 and "checkpoint_truncated" in _kinds(document), document["findings"]
    assert document["repaired"] == []
    assert backup_file(home).read_bytes() == before  # nothing appended to the cut-back chain
    missing = [f for f in document["findings"] if f["kind"] == "audit_event_missing"]
    assert missing and all("does not extend the checkpoint given" in f["detail"] for f in missing)

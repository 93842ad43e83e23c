"""Red team of the healing path: `pcbo verify --repair` heals the commit protocol's crash windows and
nothing else. A chain cut back (consistently, in the backup and the catalog) to just after a run's
intent, with the run's commit points still in the lake, looks exactly like the crash window between
the commit point and its event; given the checkpoint an auditor holds, repair must not heal it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import rfc8785

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


def test_repair_given_a_held_checkpoint_adopts_no_pending_batch_of_a_chain_that_does_not_extend_it(
    history: dict[str, Any],  # noqa: F811 - the fixture
) -> None:
    """The chain cut back to just after r2's intent, plus the audit log's own crash window forged on
    top: one more event in the backup, recorded in the catalog as the pending batch it was cut from.
    Repair's first step (adopting a pending batch into the catalog) adopted it before it checked the
    chain against the held checkpoint; now it leaves such a chain alone and reports the difference."""
    from pcbo_dagster.catalog import CatalogStore
    from pcbo_dagster.core.audit_chain import build_event

    home: Path = history["home"]
    original = [json.loads(line) for line in backup_file(home).read_bytes().splitlines()]
    last_intent = max(i for i, e in enumerate(original) if e["event_type"] == "partition_commit_intent")
    _rewrite_chain(home, last_intent + 1, lambda events: None)
    head = json.loads(backup_file(home).read_bytes().splitlines()[-1])
    cut = original[last_intent + 1]
    forged = build_event(
        chain_key="events/v1",
        seq=head["chain"]["seq"] + 1,
        prev_event_hash=head["chain"]["event_hash"],
        event_type=cut["event_type"],
        timestamp=cut["timestamp"],
        body={
            k: v
            for k, v in cut.items()
            if k not in ("version", "event_type", "event_id", "timestamp", "chain")
        },
    )
    with backup_file(home).open("ab") as fh:
        fh.write(rfc8785.dumps(forged) + b"\n")
    store = CatalogStore(f"sqlite:///{home / 'catalog.db'}")
    with store.locked_chain("events/v1") as txn:
        txn.set_pending(forged["chain"]["seq"], [forged])
    catalog_before = store.audit_event_rows("events/v1")
    before = backup_file(home).read_bytes()

    status, document = _verify_trusted(history, "r2", "--repair")
    assert status == 1 and "checkpoint_truncated" in _kinds(document), document["findings"]
    assert document["repaired"] == [], document["repaired"]
    assert store.audit_event_rows("events/v1") == catalog_before  # nothing adopted into the catalog
    assert backup_file(home).read_bytes() == before
    behind = [f for f in document["findings"] if f["kind"] == "audit_catalog_behind"]
    assert behind and all("does not extend the checkpoint given" in f["detail"] for f in behind)
    store.close()

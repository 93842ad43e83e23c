"""Attacks on a SQL target's own tables (issue 15's threat model): the target database — its rows,
`pcbo_journal`, `pcbo_checkpoints` and `pcbo_rollbacks` — is writable by someone who wants a forged
history to pass. `verify` derives what must be true from the audit chain; repair (`verify --repair`,
a resumed execute or rollback) completes only the crash windows of the commit protocol, and refuses
everything else as a finding. Each test forges what an attacker can write with plain SQL (an INSERT
the append-only triggers allow, or an edit with a trigger dropped and re-created by name)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pcbo_dagster_tests.cli_runner import run_pcbo
from pcbo_dagster_tests.sql_target_helpers import (
    create_table,
    dump,
    pcbo,
    record,
    request,
    run_sql,
    sqlite_url,
    write_json,
)


def _chain(home: Path) -> list[dict[str, Any]]:
    lines = (home / "pas" / "events" / "v1.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _events(home: Path, event_type: str) -> list[dict[str, Any]]:
    return [e for e in _chain(home) if e["event_type"] == event_type]


def _kinds(document: dict[str, Any]) -> set[str]:
    return {f["kind"] for f in document["findings"]}


def _setup(tmp_path: Path, count: int = 8, **target: Any) -> tuple[str, Path, Path]:
    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    path = write_json(tmp_path / "req.json", request(url, [record(i) for i in range(1, count + 1)], **target))
    return url, tmp_path / "home", path


def _intent_of(home: Path, key: str) -> dict[str, Any]:
    return next(e for e in _events(home, "sql_apply_intent") if e["partition"]["key"] == key)


# -- pcbo_rollbacks ---------------------------------------------------------------------------------


def test_a_rollback_marker_the_chain_has_no_rollback_for_hides_nothing_and_is_not_honoured(
    tmp_path: Path,
) -> None:
    url, home, path = _setup(tmp_path)
    assert pcbo(["execute", "--input", path, "--home", home]).status == 0
    run_sql(
        url, "UPDATE events SET amount = 1000 WHERE id = 'ev-0001'", "DELETE FROM events WHERE id = 'ev-0005'"
    )
    intent = _intent_of(home, "20240101T010000Z")  # ev-0001 and ev-0005
    run_sql(
        url,
        "INSERT INTO pcbo_rollbacks VALUES ('run-1', 'main.events', '20240101T010000Z', "
        f"{intent['chain']['seq']}, 'sha256:{'0' * 64}', 0)",
    )
    found = pcbo(["verify", "--home", home])
    assert found.status == 1
    assert _kinds(found.document) == {"sql_rows_changed", "sql_rollback_marker_not_on_chain"}
    repaired = pcbo(["verify", "--home", home, "--repair"])
    assert repaired.document["repaired"] == []
    assert _kinds(repaired.document) == {"sql_rows_changed", "sql_rollback_marker_not_on_chain"}
    before = dump(url)
    refused = pcbo(["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"])
    assert refused.status == 1 and "sql_rollback_marker_not_on_chain" in refused.stderr
    assert dump(url) == before
    assert _events(home, "sql_rollback_intent") == []
    assert _events(home, "sql_partition_rolled_back") == []


def test_a_marker_equal_to_an_open_rollback_intent_is_adopted_only_when_the_rows_are_back(
    tmp_path: Path,
) -> None:
    url, home, path = _setup(tmp_path)
    assert pcbo(["execute", "--input", path, "--home", home]).status == 0
    written = dump(url)
    args = ["rollback", "--dataset", "events", "--run-id", "run-1"]
    crashed = run_pcbo(args, home=home, env={"PCBO_FAILPOINT": "sql_rollback_after_intent@0"})
    assert crashed.status == 86, crashed.stderr
    (intent,) = _events(home, "sql_rollback_intent")
    # The forged rows say exactly what the intent recorded: only the table can tell they are a lie.
    run_sql(
        url,
        *(
            "INSERT INTO pcbo_rollbacks VALUES ('run-1', 'main.events', "
            f"'{p['key']}', {p['intent_seq']}, '{p['journal_digest']}', {p['entries']})"
            for p in intent["partitions"]
        ),
    )
    found = pcbo(["verify", "--home", home])
    assert _kinds(found.document) == {"sql_rollback_interrupted", "sql_rollback_marker_not_on_chain"}
    repaired = pcbo(["verify", "--home", home, "--repair"])
    assert repaired.document["repaired"] == []
    assert _events(home, "sql_partition_rolled_back") == []
    assert dump(url) == written

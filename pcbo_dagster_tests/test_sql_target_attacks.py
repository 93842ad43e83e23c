"""Attacks on a SQL target's own tables (issue 15's threat model): the target database — its rows,
`pcbo_journal`, `pcbo_checkpoints` and `pcbo_rollbacks` — is writable by someone who wants a forged
history to pass. `verify` derives what must be true from the audit chain; repair (`verify --repair`,
a resumed execute or rollback) completes only the crash windows of the commit protocol, and refuses
everything else as a finding. Each test forges what an attacker can write with plain SQL (an INSERT
the append-only triggers allow, or an edit with a trigger dropped and re-created by name)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from pcbo_dagster.core.chain_state import replay
from pcbo_dagster.core.sql_outcomes import row_digest
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.engine.sql_verify import partition_read_back
from pcbo_dagster.targets.sql_table import JOURNAL_GENESIS, SqlTable
from pcbo_dagster_tests.cli_runner import run_pcbo
from pcbo_dagster_tests.sql_target_helpers import (
    create_table,
    dump,
    pcbo,
    query,
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


def _journal_key(home: Path, run_id: str = "run-1") -> str:
    """The key the journal files the run's rows under (`ChainState.sql_journal_key`)."""
    state = replay(_chain(home))
    (target,) = {t for t, _ in state.sql}
    key = state.sql_journal_key(target, run_id)
    assert key is not None and key.startswith(f"{run_id}@sha256:")
    return key


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
        f"INSERT INTO pcbo_rollbacks VALUES ('{_journal_key(home)}', 'main.events', '20240101T010000Z', "
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
            f"INSERT INTO pcbo_rollbacks VALUES ('{_journal_key(home)}', 'main.events', "
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


# -- pcbo_checkpoints ---------------------------------------------------------------------------------


def _edit_checkpoint(url: str, key: str, edit: Any) -> None:
    """Edit the checkpoint of partition `key`'s first chunk with the update trigger dropped, then put
    the trigger back exactly as it was (same name, same body): `verify` sees every trigger."""
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        (ddl,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'pcbo_checkpoints_no_update'"
        ).fetchone()
        (text,) = conn.execute(
            "SELECT result FROM pcbo_checkpoints WHERE partition_key = ? AND chunk = 0", (key,)
        ).fetchone()
        result = json.loads(text)
        edit(result)
        conn.execute("DROP TRIGGER pcbo_checkpoints_no_update")
        conn.execute(
            "UPDATE pcbo_checkpoints SET result = ? WHERE partition_key = ? AND chunk = 0",
            (json.dumps(result), key),
        )
        conn.execute(ddl)


def _read_back(url: str, home: Path, key: str) -> tuple[bool, dict[str, Any]]:
    """The Dagster `sql_read_back` check of partition `key` (`partition_read_back`)."""
    table = SqlTable.reopen(url, _intent_of(home, key)["layout"], write=False)
    try:
        return partition_read_back(table, replay(_chain(home)), key)
    finally:
        table.close()


def test_a_checkpoint_re_pointed_at_another_row_hides_a_deleted_row_from_nothing(tmp_path: Path) -> None:
    url, home, path = _setup(tmp_path)
    assert pcbo(["execute", "--input", path, "--home", home]).status == 0
    key = "20240101T010000Z"  # ev-0001 and ev-0005, both inserted, one chunk
    assert _read_back(url, home, key)[0]
    run_sql(url, "DELETE FROM events WHERE id = 'ev-0005'")

    def borrow(result: dict[str, Any]) -> None:  # ev-0005 keeps its id (root, count) and takes ev-0001's row
        by_id = {a[0]: a for a in result["applied"]}
        by_id["ev-0005"][1:] = by_id["ev-0001"][1:]
        by_row = {r[0]: r for r in result.get("rows", [])}  # (a checkpoint without rows: before them)
        if by_row:
            by_row["ev-0005"][1:3] = by_row["ev-0001"][1:3]

    _edit_checkpoint(url, key, borrow)
    found = pcbo(["verify", "--home", home])
    assert found.status == 1
    assert _kinds(found.document) == {"sql_checkpoint_altered"}
    repaired = pcbo(["verify", "--home", home, "--repair"])
    assert repaired.document["repaired"] == [] and _kinds(repaired.document) == {"sql_checkpoint_altered"}
    passed, details = _read_back(url, home, key)
    assert not passed and details["finding"].startswith("sql_checkpoint_altered")


def test_a_checkpoint_edited_to_vouch_for_a_changed_equal_row_is_found(tmp_path: Path) -> None:
    url, home, path = _setup(tmp_path)
    run_sql(
        url,
        "INSERT INTO events (id, occurred_at, amount, label) "
        "VALUES ('ev-0002', '2024-01-01T02:02:00Z', 2, 'x')",
    )
    run = pcbo(["execute", "--input", path, "--home", home])
    assert run.status == 0 and run.document["totals"]["skipped"] == 1  # ev-0002: skip_equal, not journaled
    key = "20240101T020000Z"
    run_sql(url, "UPDATE events SET amount = 7 WHERE id = 'ev-0002'")
    assert _kinds(pcbo(["verify", "--home", home]).document) == {"sql_rows_changed"}
    changed = row_digest([7, "ev-0002", "x", "2024-01-01T02:02:00Z"])  # amount, id, label, occurred_at

    def vouch(result: dict[str, Any]) -> None:
        for entry in (*result["applied"], *result.get("rows", [])):
            if entry[0] == "ev-0002":
                entry[2] = changed

    _edit_checkpoint(url, key, vouch)
    found = pcbo(["verify", "--home", home])
    assert _kinds(found.document) == {"sql_checkpoint_altered"}
    assert not _read_back(url, home, key)[0]


def _crash_after_intent(tmp_path: Path, **target: Any) -> tuple[str, Path, Path, dict[str, Any]]:
    """A run killed right after partition 0's apply intent, nothing written to the table."""
    url, home, path = _setup(tmp_path, **target)
    crashed = run_pcbo(["execute", "--input", path], home=home, env={"PCBO_FAILPOINT": "sql_after_intent@0"})
    assert crashed.status == 86, crashed.stderr
    assert _kinds(pcbo(["verify", "--home", home]).document) == {"sql_apply_interrupted"}
    return url, home, path, _intent_of(home, "20240101T000000Z")


def _insert_checkpoint(url: str, home: Path, intent: dict[str, Any], result: dict[str, Any]) -> None:
    """INSERT (the triggers allow it) a checkpoint for chunk 0 of `intent`, claiming no journal entry."""
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        conn.execute(
            "INSERT INTO pcbo_checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _journal_key(home, intent["run_id"]),
                "main.events",
                intent["partition"]["key"],
                intent["chain"]["seq"],
                0,
                intent["plan_hash"],
                intent["target_digest"],
                0,
                JOURNAL_GENESIS,
                json.dumps(result),
            ),
        )


def _refused_everywhere(url: str, home: Path, path: Path, before: list[str]) -> None:
    """verify finds the forged checkpoint; repair completes nothing; the resumed run does not go past
    it; the table is untouched."""
    found = pcbo(["verify", "--home", home])
    assert _kinds(found.document) == {"sql_checkpoint_altered", "sql_apply_interrupted"}
    repaired = pcbo(["verify", "--home", home, "--repair"])
    assert repaired.document["repaired"] == []
    resumed = pcbo(["execute", "--input", path, "--home", home])
    assert resumed.status == 1 and "sql_checkpoint_altered" in resumed.stderr
    assert _events(home, "sql_partition_applied") == []
    assert dump(url) == before
    assert _kinds(pcbo(["verify", "--home", home]).document) == {
        "sql_checkpoint_altered",
        "sql_apply_interrupted",
    }


def test_a_checkpoint_claiming_writes_the_journal_does_not_hold_is_never_completed(tmp_path: Path) -> None:
    # The genuine checkpoint of the same chunk, from the same request run on a copy of the table.
    twin = sqlite_url(tmp_path / "twin" / "target.db")
    create_table(twin)
    twin_path = write_json(tmp_path / "twin" / "req.json", request(twin, [record(i) for i in range(1, 9)]))
    assert pcbo(["execute", "--input", twin_path, "--home", tmp_path / "twin" / "home"]).status == 0
    ((genuine,),) = query(
        twin, "SELECT result FROM pcbo_checkpoints WHERE partition_key = '20240101T000000Z'"
    )
    assert json.loads(genuine)["counts"]["inserted"] == 2

    url, home, path, intent = _crash_after_intent(tmp_path)
    before = dump(url)
    _insert_checkpoint(url, home, intent, json.loads(genuine))
    _refused_everywhere(url, home, path, before)


def test_a_checkpoint_claiming_the_chunk_wrote_nothing_is_never_completed(tmp_path: Path) -> None:
    url, home, path, intent = _crash_after_intent(tmp_path)
    before = dump(url)
    # Self-consistent and needing no journal entry: every row "refused", each with its real key text
    # and digest — but not the outcomes the intent recorded.
    rows = [
        [
            f"ev-{i:04d}",
            json.dumps([f"ev-{i:04d}"]),
            row_digest([i, f"ev-{i:04d}", "x", f"2024-01-01T00:{i:02d}:00Z"]),
            "refused_newer",
            None,
        ]
        for i in (4, 8)
    ]
    counts = {"inserted": 0, "updated": 0, "skipped": 0, "refused": 2, "failed": 0}
    _insert_checkpoint(
        url, home, intent, {"counts": counts, "failures": [], "applied": [], "fallback": False, "rows": rows}
    )
    _refused_everywhere(url, home, path, before)


# -- the journal's tail -----------------------------------------------------------------------------


def test_a_journal_tail_vouched_for_by_a_checkpoint_of_no_apply_is_refused(tmp_path: Path) -> None:
    """The red-team attack (write access to the target database only, no trigger dropped): a journal
    entry appended to the run's journal for a row someone else wrote (`ev-0100`, as if the run inserted
    it), "vouched for" by an inserted checkpoint of a partition no apply on the chain has. `verify`
    must find it, and `pcbo rollback` must refuse rather than delete the row."""
    from pcbo_dagster.core.chain_state import replay
    from pcbo_dagster.engine.sql_rollback import reopen_target
    from pcbo_dagster.targets.sql_table import chain_journal_digest, fast_jcs, recompute_journal

    url, home, path = _setup(tmp_path)
    assert pcbo(["execute", "--input", path, "--home", home]).status == 0
    run_sql(
        url,
        "INSERT INTO events (id, occurred_at, amount, label) "
        "VALUES ('ev-0100', '2024-03-02T10:00:00Z', 42, 'x')",
    )
    key = "20240101T000000Z"
    intent = _intent_of(home, key)
    state = replay(_chain(home))
    (target, history) = next((t, h) for (t, k), h in state.sql.items() if k == key)
    table = reopen_target(Settings.resolve(home=str(home), env={}), target, history, write=False)
    with table.read() as conn:
        live = table._live_rows(
            conn, [table.key_values_of_text('["ev-0100"]')], lock=False, with_image=False, digests_only=True
        )
    db = url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT seq, partition_key, intent_seq, entry FROM pcbo_journal WHERE run_id = ? ORDER BY seq",
            (_journal_key(home),),
        ).fetchall()
        _, digests, _ = recompute_journal([(int(a), b, int(i), e) for a, b, i, e in rows])
        seq = len(rows) + 1
        entry = {
            "action": "insert",
            "after": live['["ev-0100"]'].state.row_digest,
            "chunk": 1,
            "columns": [],
            "id": "ev-0100",
            "intentSeq": intent["chain"]["seq"],
            "key": [["t", "ev-0100"]],
            "keyText": '["ev-0100"]',
            "partition": key,
            "prior": None,
            "priorState": None,
            "seq": seq,
        }
        text = fast_jcs(entry).decode()
        conn.execute(
            "INSERT INTO pcbo_journal VALUES (?, ?, ?, ?, ?, ?)",
            (_journal_key(home), "main.events", seq, key, intent["chain"]["seq"], text),
        )
        conn.execute(
            "INSERT INTO pcbo_checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _journal_key(home),
                "main.events",
                "forged",
                99,
                0,
                intent["plan_hash"],
                intent["target_digest"],
                seq,
                chain_journal_digest(digests[-1], text.encode()),
                "{}",
            ),
        )
    found = pcbo(["verify", "--home", home])
    assert found.status == 1 and "sql_journal_altered" in _kinds(found.document), found.document
    before = dump(url)
    refused = pcbo(["rollback", "--dataset", "events", "--run-id", "run-1", "--home", home])
    assert refused.status == 1 and "sql_journal_altered" in refused.stderr
    assert dump(url) == before and any("ev-0100" in row for row in before)


# -- the audit chain --------------------------------------------------------------------------------


def test_a_sql_dry_run_reads_a_chain_that_verifies(tmp_path: Path) -> None:
    """Red-team finding: a SQL target's dry-run (`--home`) replayed the deployment's audit backup as
    read to find its run's journal: an apply's intent edited in the middle of the backup to name
    another run (its hash left) had the dry-run evaluate against the live table instead of the run's
    journal, an approved decision hash from a forged chain (exit 0); and with the catalog removed, a
    backup it can no longer be held against was replayed all the same. The dry-run now reads the
    chain through `partition_checks.verified_chain` (as a reader holding no lock: nothing written):
    refused (`ChainNotVerified`, exit 1, naming the chain)."""
    url, home, path = _setup(tmp_path)
    ran = pcbo(["execute", "--input", path, "--home", home])
    assert ran.status == 0, ran.stderr
    again = pcbo(["dry-run", "--input", path, "--home", home])
    assert again.status == 0 and again.document["decisionHash"] == ran.document["decisionHash"]
    backup = home / "pas" / "events" / "v1.jsonl"
    honest = backup.read_bytes()
    _forge_an_apply_intent(backup)
    before = dump(url), backup.read_bytes()
    refused = pcbo(["dry-run", "--input", path, "--home", home])
    assert refused.status == 1 and refused.document is None, refused.stderr
    assert "audit chain events/v1 does not verify" in refused.stderr, refused.stderr
    assert (dump(url), backup.read_bytes()) == before
    # The chain as it was, with no catalog left to hold it against: refused too.
    backup.write_bytes(honest)
    (home / "catalog.db").unlink()
    refused = pcbo(["dry-run", "--input", path, "--home", home])
    assert refused.status == 1 and "events/v1" in refused.stderr, refused.stderr
    assert not (home / "catalog.db").exists()


def test_a_sql_rollback_checks_its_input_on_a_chain_that_verifies(tmp_path: Path) -> None:
    """Red-team finding: a rollback of a partition's SQL applies found them in the audit backup as
    read, before taking the lock: the partition's events edited in the middle of the backup to name
    another partition (their hashes left) made its rollback invalid input (exit 2, "no partition"),
    an answer derived from a forged chain. The input is now checked on a chain that verifies: the
    rollback is refused as the chain's (exit 1, naming it), and nothing is written."""
    url, home, path = _setup(tmp_path)
    assert pcbo(["execute", "--input", path, "--home", home]).status == 0
    backup = home / "pas" / "events" / "v1.jsonl"
    events = [json.loads(line) for line in backup.read_bytes().splitlines()]
    key = next(e["partition"]["key"] for e in events if e["event_type"] == "sql_apply_intent")
    for event in events:
        for named in [event.get("partition") or {}, *event.get("partitions", [])]:
            if named.get("key") == key:
                named["key"] = "20990101T000000Z"
    backup.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in events))
    before = dump(url), backup.read_bytes()
    refused = pcbo(["rollback", "--home", home, "--dataset", "events", "--partition", key])
    assert refused.status == 1, refused.stderr
    assert "audit chain events/v1 does not verify" in refused.stderr, refused.stderr
    assert (dump(url), backup.read_bytes()) == before


def _forge_an_apply_intent(backup: Path) -> None:
    """Edit the first `sql_apply_intent` of the audit backup, an event in the middle of the chain, to
    name another run (`run-0`), its hash left as it was."""
    lines = backup.read_bytes().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if b'"sql_apply_intent"' in line)
    assert at < len(lines) - 1
    event = json.loads(lines[at])
    event["run_id"] = "run-0"
    lines[at] = json.dumps(event).encode() + b"\n"
    backup.write_bytes(b"".join(lines))


def test_a_sql_apply_or_rollback_refuses_a_chain_whose_events_were_forged(tmp_path: Path) -> None:
    """Red-team finding: a SQL apply and a SQL rollback replayed the audit backup as read once its
    last event agreed with the catalog's head, so an event edited in the middle of the backup (an
    apply's intent made to name another run, its hash left) steered what was applied, resumed or
    undone. Both now read a chain that verifies (`partition_checks.verified_chain`): they refuse
    (exit 1) and write nothing, to the table or the chain."""
    url, home, path = _setup(tmp_path)
    assert pcbo(["execute", "--input", path, "--home", home]).status == 0
    backup = home / "pas" / "events" / "v1.jsonl"
    _forge_an_apply_intent(backup)
    before = dump(url), backup.read_bytes()
    again = pcbo(["execute", "--input", path, "--home", home])
    assert again.status == 1 and "does not verify" in again.stderr, again.stderr
    assert (dump(url), backup.read_bytes()) == before
    refused = pcbo(["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"])
    assert refused.status == 1 and "does not verify" in refused.stderr, refused.stderr
    assert (dump(url), backup.read_bytes()) == before

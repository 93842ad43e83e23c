"""`pcbo verify` for SQL table targets (issue 15): every table a chain's SQL events name is checked
against what the chain says was applied.

Per target table (connected through `--target-url` / `PCBO_SQL_TARGET_URLS`, else its recorded
location; one that cannot be reached is a finding):

- applies still open: an apply whose chunks are all checkpointed is a crash window (`--repair`
  appends its event from the checkpoints), otherwise it was interrupted (`sql_apply_interrupted`:
  resume it with its request, or roll it back); likewise a rollback whose restoring transaction
  committed without its events (`--repair` appends them: `sql_rollback.restore_committed`) or that
  never committed;
- the journal of every run in the table is exactly the one the chain and the checkpoints recorded
  (`sql_journal_altered`), and its append-only triggers are there (`sql_journal_trigger_missing`)
  and exactly as pcbo creates them, their functions included (`sql_journal_trigger_altered`);
  `--repair` completes nothing in a table whose journal is not so guarded (as rollback and execute
  refuse it);
- each apply's checkpoints are what its chunks did (`sql_apply.gathered_from_checkpoints`: each
  follows from its rows, its journal entries are the rows it wrote, all together the rows and
  outcomes the intent recorded), and give what the chain's `sql_partition_applied` says — Merkle
  root, count, counts, failures, journal (`sql_checkpoint_altered`, `sql_checkpoint_missing`); for
  the partition's current apply, the rows are read back from the table and their digests compared
  with the records' (`sql_rows_changed`: a row the live pipeline or someone else changed since, or
  removed). The Dagster `sql_read_back` check reads back the same checked rows
  (`partition_read_back`);
- each undone apply has its `pcbo_rollbacks` row, with the journal digest and count its
  `sql_partition_rolled_back` recorded (`sql_rollback_marker_missing`); a row the chain has no
  rollback for — or, for an open rollback intent, one that is not what the intent recorded, or whose
  rows are not back as they were — is `sql_rollback_marker_not_on_chain`, never adopted, and hides
  nothing: the apply is read back as the chain says it is;
- the catalog: an `sql_apply_log` row per apply and rollback event, agreeing with it
  (`catalog_sql_mismatch`; `--repair` records a missing one, with its failed rows from the
  checkpoints), the `sql_row_failures` rows of each apply event exactly the failed rows its
  checkpoints and event recorded (`catalog_sql_mismatch`), none the chain does not hold
  (`catalog_sql_not_on_chain`), and a run row with the plan and decision hashes of its intents
  (`catalog_run_missing`, `catalog_run_mismatch`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from pcbo_dagster.core import merkle
from pcbo_dagster.core.chain_state import ChainState, SqlApply, SqlPartitionHistory
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.sql_apply import (
    CheckpointAltered,
    PartitionApply,
    check_journal,
    complete_applies,
    event_disagreement,
    gathered_from_checkpoints,
    record_applied,
    trigger_findings,
)
from pcbo_dagster.engine.sql_rollback import complete_rollbacks, reopen_target, restore_committed
from pcbo_dagster.io.redaction import scrub_text
from pcbo_dagster.targets.sql_locks import TargetBusy, scoped_lock
from pcbo_dagster.targets.sql_table import Checkpoint, JournalView, SqlTable, read_journal


class Report(Protocol):
    """What `verify` collects findings in (`engine/verify.py`)."""

    repair: bool
    repaired: list[dict[str, Any]]

    def find(self, kind: str, where: str, detail: str) -> None: ...

    def healable(self, kind: str, where: str, detail: str) -> None: ...


def check_sql_targets(
    env: Environment, report: Report, state: ChainState, dataset: str, version_label: str
) -> int:
    """Check every SQL table the chain names (module doc); returns how many partitions were read back."""
    by_target: dict[str, list[SqlPartitionHistory]] = defaultdict(list)
    for (target, _), history in sorted(state.sql.items()):
        if history.applies:
            by_target[target].append(history)
    checked = 0
    for ref, histories in sorted(by_target.items()):
        newest = max(histories, key=lambda h: h.applies[-1].intent_seq)
        try:
            table = reopen_target(env.settings, ref, newest, write=report.repair)
        except (InvalidInput, SQLAlchemyError, OSError, TargetBusy) as exc:
            report.find("sql_target_unreachable", ref, scrub_text(str(getattr(exc, "orig", None) or exc)))
            continue
        try:
            checked += _check_table(env, report, state, table, dataset, version_label)
        except (SQLAlchemyError, TargetBusy) as exc:  # TargetBusy: a lock held past the wait
            report.find("sql_target_unreachable", ref, scrub_text(str(getattr(exc, "orig", None) or exc)))
        finally:
            table.close()
    catalog_rows = {r["event_hash"]: r for r in env.catalog.sql_applies(dataset, version_label)}
    chain_events = {
        str(e["chain"]["event_hash"])
        for h in state.sql.values()
        for a in h.applies
        for e in (a.applied, a.rolled_back)
        if e is not None
    }
    for event_hash, row in sorted(catalog_rows.items()):
        if event_hash not in chain_events:
            report.find(
                "catalog_sql_not_on_chain",
                f"{dataset}/{version_label}/{row['partition_key']}",
                f"sql_apply_log names event {event_hash}, which the chain does not hold",
            )
    for event_hash, rows in sorted(_catalog_failures(env, dataset, version_label).items()):
        if event_hash not in chain_events:
            report.find(
                "catalog_sql_not_on_chain",
                f"{dataset}/{version_label}/{rows[0]['partition_key']}",
                f"sql_row_failures names event {event_hash}, which the chain does not hold",
            )
    _check_runs(env, report, state, dataset, version_label)
    return checked


def _check_table(
    env: Environment,
    report: Report,
    state: ChainState,
    table: SqlTable,
    dataset: str,
    version_label: str,
) -> int:
    ref = table.ref
    histories = [h for (target, _), h in sorted(state.sql.items()) if target == ref]
    unguarded = trigger_findings(table)
    if report.repair and not unguarded:  # never completed from a journal that may have been edited
        with scoped_lock(table, dataset, "verify-repair"):
            for item in complete_applies(env, table, state, dataset, version_label):
                report.repaired.append(item)
            for item in complete_rollbacks(env, table, state, dataset, version_label):
                report.repaired.append(item)
    catalog_rows = {r["event_hash"]: r for r in env.catalog.sql_applies(dataset, version_label)}
    catalog_failures = _catalog_failures(env, dataset, version_label)
    runs = sorted({a.run_id for h in histories for a in h.applies})
    keys = {run: state.sql_journal_key(ref, run) for run in runs}
    checkpoints = {run: table.checkpoints(keys[run]) for run in runs}
    markers = {run: table.rollback_markers(keys[run]) for run in runs}
    views = {run: read_journal(table, keys[run], state.sql_undone(ref, run)) for run in runs}
    journal_problems = {run: check_journal(table, state, run, views[run]) for run in runs}
    #: The journals the chain vouches for (None: altered, `sql_journal_altered`).
    vouched = {run: None if journal_problems[run] else views[run] for run in runs}
    #: Applies an open rollback intent names whose restore committed (run, key, intent seq).
    restored: set[tuple[str, str, int]] = set()
    for history in histories:
        where = f"{ref}/{history.key}"
        apply = history.open_apply
        if apply is not None:
            try:
                done = gathered_from_checkpoints(
                    checkpoints[apply.run_id], history.key, apply, vouched[apply.run_id]
                )
            except CheckpointAltered as exc:
                report.find("sql_checkpoint_altered", f"{where} run {apply.run_id}", str(exc))
                done = None
            if done is not None and vouched[apply.run_id] is not None:
                report.healable(
                    "sql_apply_event_missing",
                    where,
                    f"run {apply.run_id} applied every chunk but its sql_partition_applied event is missing "
                    "(a crash window: verify --repair appends it)",
                )
            else:
                chunks = sum(
                    1
                    for cp in checkpoints[apply.run_id]
                    if (cp.partition_key, cp.intent_seq) == (history.key, apply.intent_seq)
                )
                report.find(
                    "sql_apply_interrupted",
                    where,
                    f"run {apply.run_id}'s apply stopped after {chunks} of {apply.intent['chunks']} "
                    "chunk(s): execute its request again to resume it, or pcbo rollback --run-id "
                    f"{apply.run_id}",
                )
        if history.open_rollback is not None:
            event, _ = history.open_rollback
            run_id = str(event["run_id"])
            named = [
                (entry, apply)
                for entry in event["partitions"]
                if entry["key"] == history.key
                for apply in [history.apply_at(int(entry["intent_seq"]))]
                if apply is not None and apply.run_id == run_id and run_id in views
            ]
            committed = [
                (entry, apply)
                for entry, apply in named
                if restore_committed(
                    table, views[run_id], apply, entry, markers[run_id].get((history.key, apply.intent_seq))
                )
                is None
            ]
            restored.update((run_id, history.key, a.intent_seq) for _, a in committed)
            if named and len(committed) == len(named):
                report.healable(
                    "sql_rollback_event_missing",
                    where,
                    "the rollback's restoring transaction committed but its event is missing "
                    "(a crash window: verify --repair appends it)",
                )
            else:
                report.find(
                    "sql_rollback_interrupted",
                    where,
                    f"a rollback of run {event['run_id']} was recorded but not done: run it again",
                )
    for finding in unguarded:
        report.find(finding["kind"], f"{ref} {finding['trigger']}", finding["detail"])
    checked = 0
    for run in runs:
        for problem in journal_problems[run][:20]:
            report.find("sql_journal_altered", f"{ref} run {run}", problem)
        applies = {(h.key, a.intent_seq) for h in histories for a in h.applies if a.run_id == run}
        for key, intent_seq in sorted(set(markers[run]) - applies):
            report.find(
                "sql_rollback_marker_not_on_chain",
                f"{ref}/{key} run {run}",
                f"pcbo_rollbacks says the apply at intent seq {intent_seq} was undone, but the chain "
                "holds no such apply",
            )
    for history in histories:
        for apply in history.applies:
            checked += _check_apply(
                env,
                report,
                table,
                history,
                apply,
                checkpoints,
                vouched,
                markers,
                restored,
                catalog_rows,
                catalog_failures,
                dataset,
                version_label,
            )
    return checked


def _catalog_failures(env: Environment, dataset: str, version_label: str) -> dict[str, list[dict[str, Any]]]:
    """The catalog's `sql_row_failures` rows of a dataset version, by the event they belong to."""
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in env.catalog.sql_failures():
        if row["dataset"] == dataset and row["version_label"] == version_label:
            rows[row["event_hash"]].append(row)
    return rows


def _as_failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"id": r["record_id"], "key": r["record_key"], "code": r["code"], "error": r["error"]} for r in rows
    ]


def _failure_rows(failures: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """Failed rows as the catalog holds them (id, key, code, error), in a fixed order."""
    return sorted((str(f["id"]), str(f["key"]), str(f["code"]), str(f["error"])) for f in failures)


def _check_apply(
    env: Environment,
    report: Report,
    table: SqlTable,
    history: SqlPartitionHistory,
    apply: SqlApply,
    checkpoints: dict[str, Any],
    vouched: dict[str, JournalView | None],
    markers: dict[str, dict[tuple[str, int], tuple[str, int]]],
    restored: set[tuple[str, str, int]],
    catalog_rows: dict[str, dict[str, Any]],
    catalog_failures: dict[str, list[dict[str, Any]]],
    dataset: str,
    version_label: str,
) -> int:
    where = f"{table.ref}/{history.key} run {apply.run_id}"
    gathered, kind, detail = (
        (None, "", "")
        if apply.applied is None
        else _checked_apply(checkpoints[apply.run_id], history.key, apply, vouched[apply.run_id])
    )
    for event in (apply.applied, apply.rolled_back):
        if event is not None:
            _check_catalog_row(
                env,
                report,
                event,
                catalog_rows,
                catalog_failures,
                None if gathered is None else gathered.failures,
                where,
                dataset,
                version_label,
            )
    marker = markers[apply.run_id].get((history.key, apply.intent_seq))
    if apply.rolled_back is not None:
        if marker is None:
            report.find(
                "sql_rollback_marker_missing",
                where,
                "the chain says this apply was undone, but the table's pcbo_rollbacks has no row for it",
            )
        elif marker != (apply.rolled_back["journal_digest"], apply.rolled_back["restored"]):
            report.find(
                "sql_rollback_marker_not_on_chain",
                where,
                "the table's pcbo_rollbacks row for this apply is not the rollback the chain recorded",
            )
        return 0
    if (apply.run_id, history.key, apply.intent_seq) in restored:
        return 0  # undone by a rollback whose events a crash cut off (reported above)
    if marker is not None:  # not honoured: the apply is checked as the chain says it is
        report.find(
            "sql_rollback_marker_not_on_chain",
            where,
            "the table's pcbo_rollbacks says this apply was undone, but the chain records no rollback of it "
            "(or not this one, or its rows are not back as they were)",
        )
    if apply.applied is None:
        return 0  # open (reported above)
    if gathered is None:
        report.find(kind, where, detail)
        return 0
    if history.current is not apply:
        return 0
    changed = table.read_back_by_key_text(gathered.applied) if gathered.applied else []
    if changed:
        listed = ", ".join(repr(i) for i in sorted(changed)[:10])
        report.find(
            "sql_rows_changed",
            where,
            f"{len(changed)} of {len(gathered.applied)} applied row(s) are no longer in the table as written "
            f"({listed}{', ...' if len(changed) > 10 else ''})",
        )
    return 1


def _checked_apply(
    checkpoints: list[Checkpoint], key: str, apply: SqlApply, view: JournalView | None
) -> tuple[PartitionApply | None, str, str]:
    """What a completed apply wrote, from its checkpoints checked against its intent, the journal
    (`view`, when the chain vouches for it) and its `sql_partition_applied` event; else (None, the
    finding, why)."""
    event = apply.applied
    assert event is not None
    try:
        gathered = gathered_from_checkpoints(checkpoints, key, apply, view)
    except CheckpointAltered as exc:
        return None, "sql_checkpoint_altered", str(exc)
    if gathered is None:
        return None, "sql_checkpoint_missing", "the apply's chunk checkpoints are not all in the table"
    differs = event_disagreement(gathered, event)
    if differs:
        return (
            None,
            "sql_checkpoint_altered",
            f"the checkpoints do not give the {', '.join(differs)} the chain recorded",
        )
    return gathered, "", ""


def _check_catalog_row(
    env: Environment,
    report: Report,
    event: Any,
    catalog_rows: dict[str, dict[str, Any]],
    catalog_failures: dict[str, list[dict[str, Any]]],
    failures: list[dict[str, Any]] | None,
    where: str,
    dataset: str,
    version_label: str,
) -> None:
    """The catalog's rows of one apply or rollback event; `failures`: the apply's failed rows as its
    checkpoints (checked against the event) recorded them, None when they cannot be gathered."""
    event_hash = event["chain"]["event_hash"]
    row = catalog_rows.get(event_hash)
    applied = event.get("event_type") == "sql_partition_applied"
    if row is None:
        if report.repair and applied and (failures is not None or not event["failures"]["count"]):
            record_applied(env, dataset, version_label, event, failures or [])
            report.repaired.append({"kind": "catalog_sql_row_recorded", "where": where})
        else:
            report.healable("catalog_sql_mismatch", where, f"sql_apply_log has no row for event {event_hash}")
        return
    expected = {
        "kind": "applied" if applied else "rolled_back",
        "run_id": event["run_id"],
        "target": event["target"],
        "intent_seq": event["intent_seq"],
        "journal_digest": event["journal"]["digest"] if applied else event["journal_digest"],
        "merkle_root": event["merkle_root"] if applied else None,
        "partition_key": event["partition"]["key"],
    }
    if applied:
        expected["counts"] = event["counts"]
    differs = sorted(name for name, value in expected.items() if row.get(name) != value)
    held = catalog_failures.get(event_hash, [])
    recorded = event["failures"]["count"] if applied else 0
    expected_rows = failures if applied else []
    if len(held) != recorded or (
        expected_rows is not None and _failure_rows(expected_rows) != _failure_rows(_as_failures(held))
    ):
        report.find(
            "catalog_sql_mismatch",
            where,
            f"sql_row_failures' {len(held)} row(s) of event {event_hash} are not the {recorded} failed "
            "row(s) the chain recorded",
        )
    if differs:
        report.find(
            "catalog_sql_mismatch", where, f"sql_apply_log's {', '.join(differs)} disagree with the chain"
        )


def _check_runs(
    env: Environment, report: Report, state: ChainState, dataset: str, version_label: str
) -> None:
    hashes: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for history in state.sql.values():
        for apply in history.applies:
            hashes[apply.run_id].add((str(apply.intent["plan_hash"]), str(apply.intent["decision_hash"])))
    for run_id, pairs in sorted(hashes.items()):
        row = env.catalog.get_run(run_id)
        where = f"{dataset}/{version_label} run {run_id}"
        if row is None:
            report.find("catalog_run_missing", where, "the chain names a run the catalog does not hold")
        elif (row["plan_hash"], row["decision_hash"]) not in pairs:
            report.find(
                "catalog_run_mismatch",
                where,
                "the catalog's plan or decision hash of the run differs from its intents'",
            )


def partition_read_back(table: SqlTable, state: ChainState, key: str) -> tuple[bool, dict[str, Any]]:
    """The reconciliation of one partition of a SQL table (the Dagster read-back check): the rows its
    current apply wrote — from its checkpoints checked as `verify` checks them — read back and
    compared with the records' digests, and the Merkle root recomputed over the ids still as written.
    Returns (passed, details)."""
    history = state.sql.get((table.ref, key))
    current = history.current if history is not None else None
    if current is None or current.applied is None:
        return False, {"finding": f"the chain holds no completed apply of {key} into {table.qualified}"}
    event = current.applied
    details: dict[str, Any] = {
        "run_id": current.run_id,
        "event_hash": event["chain"]["event_hash"],
        "merkle_root": event["merkle_root"],
        "applied": event["record_count"],
    }
    # Without the journal (verify checks it): the intent's rows and outcomes digests and the applied
    # event bind every row the checkpoints claim.
    gathered, kind, why = _checked_apply(
        table.checkpoints(state.sql_journal_key(table.ref, current.run_id)), key, current, None
    )
    if gathered is None:
        return False, {**details, "finding": f"{kind}: {why}"}
    changed = set(table.read_back_by_key_text(gathered.applied)) if gathered.applied else set()
    kept = [i for i in gathered.applied_ids if i not in changed]
    recomputed = merkle.root_hex(kept)
    details.update(
        rows_matching=len(kept),
        root_recomputed=recomputed,
        changed=sorted(changed)[:20],
    )
    return recomputed == event["merkle_root"] and not changed, details

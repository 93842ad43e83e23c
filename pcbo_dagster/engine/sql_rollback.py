"""Undo what a run applied to a SQL table (issue 15): from its journal, checked against the audit chain,
transactionally and idempotently.

What to undo comes from the chain: the run's applies (completed, or interrupted: an open intent) of
each partition of each table it wrote. Before anything is touched:

- the journal's append-only triggers must be pcbo's (`sql_apply.unguarded_journal`, the findings
  `verify` reports): without them the journal may have been edited without a trace, and the
  rollback is refused (`sql_journal_trigger_missing` / `sql_journal_trigger_altered`, naming them)
  before any crash window is completed from it;
- the journal of the run in the table must be exactly the one the chain and the checkpoints
  recorded (every `sql_partition_applied` event's journal digest, every checkpoint's digest, no gap,
  every entry in its canonical form): a journal edited in the target database is never replayed;
- every row the run changed must still be as the run wrote it (its digest is the journal entry's
  `after`, and the whole row's its `inserted` or `updated`): a row the live pipeline (or a later
  run) changed since is not written over — the rollback is refused naming those rows, and nothing
  is changed (roll back the later run first);
- no row it would undo is, as it is now, one another deployment's apply (a journal key not on this
  chain) found equal since (`sql_rows_of_another_deployment`: that apply vouches for it; roll that
  run back first);
- no row it would delete (one the run inserted) is referenced by a foreign key of another table that
  deletes or changes with it (`ON DELETE CASCADE`, `SET NULL`, `SET DEFAULT`: `sql_rows_referenced`),
  so the undo never changes rows the journal does not hold;
- the restore, tried in a savepoint and undone, must put every row back as it was before the run
  (`sql_restore_ineffective` otherwise: a trigger or rule that skips or rewrites the restoring
  statements, such as `RAISE(IGNORE)` or a soft-delete rule, never has the chain record rows
  restored that are not). The restoring transaction checks it again before it commits.

Then a `sql_rollback_intent` (the applies and their journal digests) is appended, and one transaction
in the target restores every journaled row's prior image (newest change first: a row the run
inserted is deleted, a row it updated gets the changed columns back) and records each undone apply in
`pcbo_rollbacks`; then one `sql_partition_rolled_back` event per apply and the catalog rows. A second
rollback finds nothing current and does nothing. A rollback killed after its restoring transaction
committed is completed (the events appended) by running it again or by `pcbo verify --repair`; one
killed before is simply done again. A `pcbo_rollbacks` row is believed only as far as the chain
vouches for it (`restore_committed`): it completes an open rollback only when it is exactly what the
intent recorded and the rows are back as they were; one the chain has no rollback for undoes nothing
(its apply's entries stay live) and refuses a rollback of that apply (`sql_rollback_marker_not_on_chain`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from pcbo_dagster.core.chain_state import (
    SQL_PARTITION_ROLLED_BACK,
    SQL_ROLLBACK_INTENT,
    ChainState,
    SqlApply,
    SqlPartitionHistory,
)
from pcbo_dagster.core.errors import IntegrityError, InvalidInput
from pcbo_dagster.engine import failpoints
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.events import chain_key
from pcbo_dagster.engine.partition_checks import verified_chain
from pcbo_dagster.engine.rollback import rollback_document
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.engine.sql_apply import check_journal, complete_applies, unguarded_journal
from pcbo_dagster.engine.sql_events import rollback_intent_body, rolled_back_body
from pcbo_dagster.engine.transparency_log import publish
from pcbo_dagster.io.redaction import one_line_error
from pcbo_dagster.targets.sql_dialects import location_of
from pcbo_dagster.targets.sql_locks import scoped_lock
from pcbo_dagster.targets.sql_table import JournalView, SqlTable, read_journal


class SqlRollbackRefused(IntegrityError):
    """A rollback that would restore from a journal the chain does not vouch for, or write over rows
    changed since the run (exit status 1; nothing was changed)."""

    def __init__(self, where: str, kind: str, detail: str) -> None:
        self.finding = {"kind": kind, "where": where, "detail": detail}
        super().__init__(f"rollback of {where} refused ({kind}): {detail}; nothing was changed")


def target_url(urls: tuple[str, ...], ref: str) -> str:
    """How to connect to the target `ref` (`<location>#<table>`): the given URL with the same
    location, else the recorded location itself (SQLite; PostgreSQL with libpq's PGUSER etc.)."""
    location = ref.split("#", 1)[0]
    for url in urls:
        try:
            if location_of(url) == location:
                return url
        except (ValueError, InvalidInput):
            continue
    return location


def reopen_target(settings: Settings, ref: str, history: SqlPartitionHistory, write: bool) -> SqlTable:
    """The table of `ref`, with the layout of the newest apply intent recorded for it. When target
    URLs were given but none is at the recorded location, and connecting there as recorded (no user:
    libpq's defaults) fails, the error says so (`InvalidInput` naming the flag or variable, with the
    locations given): a URL spelling the location another way (`localhost` for `127.0.0.1`) is the
    likely cause, not the default user the server refused."""
    layout = history.applies[-1].intent["layout"]
    urls = settings.sql_target_urls
    url = target_url(urls, ref)
    try:
        return SqlTable.reopen(url, layout, write=write)
    except SQLAlchemyError as exc:
        if not urls or url in urls:
            raise
        given = ", ".join(sorted({_location_or_unreadable(u) for u in urls}))
        reason = one_line_error(exc)
        raise InvalidInput(
            settings.sql_target_urls_field,
            f"none is at {url}, where the audit chain records the table {layout['table']} (they are at "
            f"{given}: name its location as recorded, the same host, port and database); connecting "
            f"there as recorded failed: {reason}",
        ) from None


def _location_or_unreadable(url: str) -> str:
    try:
        return location_of(url)
    except (ValueError, InvalidInput):
        return "(an unreadable URL)"


def sql_histories_of_run(state: ChainState, run_id: str) -> dict[str, list[SqlPartitionHistory]]:
    """Target -> the partition histories with an apply by `run_id` (any status)."""
    found: dict[str, list[SqlPartitionHistory]] = {}
    for (target, _), history in sorted(state.sql.items()):
        if any(a.run_id == run_id for a in history.applies):
            found.setdefault(target, []).append(history)
    return found


def rollback_sql(
    env: Environment,
    state: ChainState,
    dataset: str,
    version_label: str,
    *,
    run_id: str | None,
    partition_key: str | None,
    reason: str,
) -> dict[str, Any] | None:
    """Roll back a run's applies into SQL tables (of one partition, when given); None when the chain
    (`state`: the dataset version's, verified by the caller before the lock) shows no SQL apply of
    that run (or, without a run, of that partition): a lake rollback then. Under each table's lock
    the chain is read and verified again."""
    ckey = chain_key(dataset, version_label)
    if run_id is None:
        assert partition_key is not None
        latest = [a for (_, key), h in sorted(state.sql.items()) if key == partition_key for a in h.applies]
        live = [a for a in latest if a.status in ("open", "applied")]
        if not latest:
            return None
        if not live:
            return rollback_document(
                dataset, version_label, None, partition_key, [], [], None, "no apply of it is current"
            )
        run_id = max(live, key=lambda a: a.intent_seq).run_id
    targets = sql_histories_of_run(state, run_id)
    if not targets:
        return None
    results: list[dict[str, Any]] = []
    healed: list[dict[str, Any]] = []
    for ref, histories in targets.items():
        table = reopen_target(env.settings, ref, histories[0], write=True)
        try:
            with scoped_lock(table, dataset, run_id):
                # again, under the lock, from a chain that verifies
                state = verified_chain(env, dataset, version_label, f"rollback of {ckey}").replayed
                unguarded = unguarded_journal(table)  # before the journal is relied on
                if unguarded is not None:
                    raise SqlRollbackRefused(
                        f"{dataset}/{version_label} run {run_id} in {table.qualified}", *unguarded
                    )
                healed += complete_rollbacks(env, table, state, dataset, version_label)
                healed += complete_applies(env, table, state, dataset, version_label)
                results += _undo(env, table, state, dataset, version_label, run_id, partition_key, reason)
        finally:
            table.close()
    published = publish(env, ckey)  # deliver, then sign and witness a checkpoint (as rollback does)
    return rollback_document(
        dataset, version_label, run_id, partition_key, results, healed, published["checkpoint"]
    )


def _undo(
    env: Environment,
    table: SqlTable,
    state: ChainState,
    dataset: str,
    version_label: str,
    run_id: str,
    partition_key: str | None,
    reason: str,
) -> list[dict[str, Any]]:
    applies: list[tuple[SqlPartitionHistory, SqlApply]] = [
        (history, apply)
        for (target, key), history in sorted(state.sql.items())
        if target == table.ref and partition_key in (None, key)
        for apply in history.applies
        if apply.run_id == run_id and apply.status in ("open", "applied")
    ]
    if not applies:
        return []
    where = f"{dataset}/{version_label} run {run_id} in {table.qualified}"
    for history, apply in applies:
        later = [
            a for a in history.applies if a.intent_seq > apply.intent_seq and a.status in ("open", "applied")
        ]
        if later:
            raise SqlRollbackRefused(
                where,
                "sql_later_apply",
                f"partition {history.key} was applied again by run {later[-1].run_id} after this run: "
                f"roll back run {later[-1].run_id} first",
            )
    journal_key = state.sql_journal_key(table.ref, run_id)
    assert journal_key is not None  # the run has applies into the table
    view = read_journal(table, journal_key, state.sql_undone(table.ref, run_id))
    problems = check_journal(table, state, run_id, view)
    if problems:
        raise SqlRollbackRefused(where, "sql_journal_altered", "; ".join(problems[:5]))
    markers = table.rollback_markers(journal_key)
    forged = sorted(
        f"{h.key} (intent seq {a.intent_seq})" for h, a in applies if (h.key, a.intent_seq) in markers
    )
    if forged:
        raise SqlRollbackRefused(
            where,
            "sql_rollback_marker_not_on_chain",
            f"pcbo_rollbacks says {', '.join(forged[:5])} {'was' if len(forged) == 1 else 'were'} undone, "
            "but the chain records no rollback of it",
        )
    undone = {
        (h.key, a.intent_seq): [e for e in view.live_entries(h.key) if e["intentSeq"] == a.intent_seq]
        for h, a in applies
    }
    entries = [e for group in undone.values() for e in group]
    runs = {a.run_id for (t, _), h in state.sql.items() if t == table.ref for a in h.applies}
    own = {str(state.sql_journal_key(table.ref, r)) for r in runs}  # this chain's journals in the table
    others = table.rows_found_equal_by_others(own)
    with table.write() as conn:
        drifted = table.drifted(conn, entries, lock=True)
        if drifted:
            _refuse_drifted(where, drifted)
        _refuse_others_rows(where, entries, others)
        trial = conn.begin_nested()  # what the restore will do, before the chain says it is about to
        _restore_checked(table, conn, entries, where)
        trial.rollback()
    ckey = chain_key(dataset, version_label)
    digests = {(h.key, a.intent_seq): _digest_of(view, undone[(h.key, a.intent_seq)], a) for h, a in applies}
    intent = env.audit.append(
        ckey,
        SQL_ROLLBACK_INTENT,
        rollback_intent_body(
            run_id,
            table.ref,
            reason,
            [
                {
                    "key": h.key,
                    "intent_seq": a.intent_seq,
                    "journal_digest": digests[(h.key, a.intent_seq)],
                    "entries": len(undone[(h.key, a.intent_seq)]),
                }
                for h, a in applies
            ],
        ),
    )
    state.add(intent)
    failpoints.reached("sql_rollback_after_intent", 0)
    with table.write() as conn:
        drifted = table.drifted(conn, entries, lock=True)
        if drifted:
            _refuse_drifted(where, drifted)
        _restore_checked(table, conn, entries, where)
        for h, a in applies:
            k = (h.key, a.intent_seq)
            table.record_rollback(conn, journal_key, h.key, a.intent_seq, digests[k], len(undone[k]))
    failpoints.reached("sql_rollback_after_restore", 0)
    outcomes = []
    for h, a in applies:
        k = (h.key, a.intent_seq)
        event = _append_rolled_back(
            env, state, table, dataset, version_label, a, digests[k], len(undone[k]), reason
        )
        outcomes.append(
            {
                "key": h.key,
                "status": "rolled_back",
                "target": table.ref,
                "intentSeq": a.intent_seq,
                "restored": len(undone[k]),
                "eventHash": event["chain"]["event_hash"],
            }
        )
    return outcomes


def _digest_of(view: JournalView, entries: list[dict[str, Any]], apply: SqlApply) -> str:
    """The journal digest an undone apply is recorded with: after its last entry (or before it, when
    it changed nothing)."""
    digest = _undone_digest(view, entries, apply)
    assert digest is not None
    return digest


def _undone_digest(view: JournalView, entries: list[dict[str, Any]], apply: SqlApply) -> str | None:
    seq = max((e["seq"] for e in entries), default=int(apply.intent["journal"]["seq"]))
    return view.digest_at(seq)


def restore_committed(
    table: SqlTable,
    view: JournalView,
    apply: SqlApply,
    entry: Mapping[str, Any],
    marker: tuple[str, int] | None,
) -> str | None:
    """Whether the restoring transaction of an open rollback intent committed for one of the applies
    it names (`entry`: its key, intent seq, journal digest and entry count): None when it did — the
    `pcbo_rollbacks` row is exactly what the intent recorded, the apply's journal has that digest and
    count, and every row the apply changed is back as it was before (the crash window that repair,
    or the same rollback run again, completes); otherwise why not. `view`: the run's journal."""
    recorded = (str(entry["journal_digest"]), int(entry["entries"]))
    if marker is None:
        return "the table's pcbo_rollbacks has no row for it: the restore did not commit"
    if marker != recorded:
        return (
            f"its pcbo_rollbacks row ({marker[0]}, {marker[1]} row(s)) is not what the rollback intent "
            f"recorded ({recorded[0]}, {recorded[1]} row(s))"
        )
    key = str(entry["key"])
    entries = [e for e in view.entries if (e.get("partition"), e.get("intentSeq")) == (key, apply.intent_seq)]
    if view.problems or len(entries) != recorded[1] or _undone_digest(view, entries, apply) != recorded[0]:
        return "the apply's journal is not the one the rollback intent recorded"
    with table.read() as conn:
        not_back = table.drifted(conn, entries, lock=False, restored=True)
    if not_back:
        listed = ", ".join(repr(d["id"]) for d in not_back[:10])
        return f"{len(not_back)} row(s) the apply changed are not back as they were before it ({listed})"
    return None


def _restore_checked(table: SqlTable, conn: Connection, entries: list[dict[str, Any]], where: str) -> None:
    """Restore `entries` in `conn`'s transaction, and refuse (the transaction rolled back) when a row is
    not back as it was before the run: a trigger or rule that skips or rewrites the restoring DELETE or
    UPDATE (`RAISE(IGNORE)`, a soft-delete rule) must not let the chain record rows restored that are not;
    nor may a DELETE take rows of another table with it (a foreign key `ON DELETE CASCADE`)."""
    referencing = table.rows_referenced(conn, entries)
    if referencing:
        raise SqlRollbackRefused(
            where,
            "sql_rows_referenced",
            f"rows the run inserted are referenced by {'; '.join(referencing)}: deleting them would change "
            "rows the run did not write (remove those references, or roll back by hand)",
        )
    table.restore(conn, entries)
    oldest: dict[str, dict[str, Any]] = {}
    for e in sorted(entries, key=lambda e: e["seq"]):
        oldest.setdefault(e["keyText"], e)
    not_back = table.drifted(conn, list(oldest.values()), lock=False, restored=True)
    if not_back:
        listed = ", ".join(repr(d["id"]) for d in not_back[:10])
        raise SqlRollbackRefused(
            where,
            "sql_restore_ineffective",
            f"{len(not_back)} row(s) are not back as they were before the run after the restoring "
            f"statements ({listed}{', ...' if len(not_back) > 10 else ''}): a trigger or rule on the table "
            "skips or rewrites them",
        )


def _refuse_others_rows(
    where: str, entries: list[dict[str, Any]], others: dict[str, dict[str, set[str]]]
) -> None:
    """Refuse to undo a row that is, as it is now (as this run wrote it: `drifted` checked that),
    a row another deployment's apply into the table found equal and vouches for
    (`SqlTable.rows_found_equal_by_others`; its chain, not this one, holds that apply): it came after
    this run's write, and undoing the row would take it away from under that apply."""
    newest: dict[str, dict[str, Any]] = {}
    for e in sorted(entries, key=lambda e: e["seq"]):
        newest[e["keyText"]] = e
    claimed = [
        (e, sorted(others[k][e["after"]]))
        for k, e in sorted(newest.items())
        if e["after"] is not None and e["after"] in others.get(k, {})
    ]
    if claimed:
        listed = ", ".join(repr(e["id"]) for e, _ in claimed[:10])
        keys = sorted({key for _, ks in claimed for key in ks})
        raise SqlRollbackRefused(
            where,
            "sql_rows_of_another_deployment",
            f"{len(claimed)} row(s) this run wrote were found equal since by another deployment's run in "
            f"this table ({listed}{', ...' if len(claimed) > 10 else ''}; its journal "
            f"{', '.join(keys[:3])}): undoing them would take its rows away; roll that run back first",
        )


def _refuse_drifted(where: str, drifted: list[dict[str, Any]]) -> None:
    listed = ", ".join(repr(d["id"]) for d in drifted[:10])
    raise SqlRollbackRefused(
        where,
        "sql_rows_changed_since",
        f"{len(drifted)} row(s) changed after the run wrote them ({listed}"
        f"{', ...' if len(drifted) > 10 else ''}); they are not written over (roll back the later run first)",
    )


def _append_rolled_back(
    env: Environment,
    state: ChainState,
    table: SqlTable,
    dataset: str,
    version_label: str,
    apply: SqlApply,
    journal_digest: str,
    restored: int,
    reason: str,
) -> dict[str, Any]:
    event = env.audit.append(
        chain_key(dataset, version_label),
        SQL_PARTITION_ROLLED_BACK,
        rolled_back_body(
            apply.run_id,
            table.ref,
            dict(apply.intent["partition"]),
            apply.intent_seq,
            journal_digest,
            restored,
            reason,
        ),
    )
    state.add(event)
    env.catalog.record_sql_apply(
        {
            "event_hash": event["chain"]["event_hash"],
            "kind": "rolled_back",
            "dataset": dataset,
            "version_label": version_label,
            "partition_key": apply.intent["partition"]["key"],
            "run_id": apply.run_id,
            "target": table.ref,
            "intent_seq": apply.intent_seq,
            "counts": {"restored": restored},
            "journal_digest": journal_digest,
            "merkle_root": None,
        },
        [],
    )
    return dict(event)


def complete_rollbacks(
    env: Environment, table: SqlTable, state: ChainState, dataset: str, version_label: str
) -> list[dict[str, Any]]:
    """Append the missing `sql_partition_rolled_back` of every rollback into `table` whose restoring
    transaction committed before its events were appended (`restore_committed`: its `pcbo_rollbacks`
    rows are what its intent recorded and the rows are back), with what the intent recorded."""
    completed = []
    markers: dict[str, dict[tuple[str, int], tuple[str, int]]] = {}
    views: dict[str, JournalView] = {}
    for (target, key), history in sorted(state.sql.items()):
        if target != table.ref or history.open_rollback is None:
            continue
        event, _ = history.open_rollback
        run_id = str(event["run_id"])
        if run_id not in markers:
            journal_key = state.sql_journal_key(table.ref, run_id)
            markers[run_id] = table.rollback_markers(journal_key)
            views[run_id] = read_journal(table, journal_key, state.sql_undone(table.ref, run_id))
        for entry in event["partitions"]:
            if entry["key"] != key:
                continue
            apply = history.apply_at(int(entry["intent_seq"]))
            if apply is None or apply.status == "rolled_back" or apply.run_id != run_id:
                continue
            marker = markers[run_id].get((key, apply.intent_seq))
            if restore_committed(table, views[run_id], apply, entry, marker) is not None:
                continue  # not done (run the rollback again), or not what the intent recorded: a finding
            done = _append_rolled_back(
                env,
                state,
                table,
                dataset,
                version_label,
                apply,
                str(entry["journal_digest"]),
                int(entry["entries"]),
                str(event.get("reason")),
            )
            where = f"{target}/{key}"
            completed.append(
                {
                    "kind": "sql_rollback_event_appended",
                    "where": where,
                    "eventHash": done["chain"]["event_hash"],
                }
            )
    return completed

"""Backfills into a SQL table (issue 15): the same decisions, then each record's outcome against the
live table, then a chunked apply with a rollback journal, audited and reconciled like a lake commit.

**Evaluate** (`evaluate_target`, for plan, dry-run and execute alike): the CONTRACT's decisions are
made by the same code as for a lake; then, per partition, the rows its adds would become are read
from the table and each record gets its outcome (`core/sql_outcomes.py`: the conflict matrix, the
freshness and deletion gates). The outcomes and the live rows' digests go into the SQL
`decisionHash`, so an approved dry-run goes stale when the table changes. A run that already changed
the table (a resumed run, or a dry-run of an executed request) is evaluated against the table as it
was before that run: its own journal says what each row it changed was.

**Execute** (`execute_sql`), under the scoped lock of (dataset, database, table) (`targets/sql_locks`),
per partition in plan order — the intent discipline of the lake commit, with the journal as the
commit log:

1. `sql_apply_intent` on the audit chain: the run, the table's layout, the hashes, the chunks about
   to be applied and the journal before them (recorded before the table is touched);
2. each chunk in one transaction: its rows locked and compared with the state decided on, the
   journal entries (prior row images), the changes and the chunk's checkpoint, committed together;
   a statement the database refuses sends the chunk row by row through savepoints;
3. the rows read back from the table (their digests against the records'), the Merkle root over the
   applied ids;
4. `sql_partition_applied` with the counts, the failures' digest, the root and the journal digest;
5. the catalog (`sql_apply_log`, `sql_row_failures`).

Then the run's rollback script (`$PCBO_HOME/rollback_scripts/rollback_<runId>.sql`) and a
`sql_rollback_script` event with its checksum. A run killed anywhere is resumed by executing the
same request again (the same runId): chunks with a checkpoint are not applied again; a changed
request (plan hash), changed target settings or a changed journal refuse to resume (exit 3). An apply
whose every chunk is checkpointed but whose event is missing is completed from the checkpoints (by
the next run on the table, `pcbo rollback` or `pcbo verify --repair`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pcbo_dagster.core import merkle
from pcbo_dagster.core.canonical import digest_of, mismatched_digests
from pcbo_dagster.core.chain_state import (
    SQL_APPLY_INTENT,
    SQL_PARTITION_APPLIED,
    SQL_ROLLBACK_SCRIPT,
    ChainState,
    SqlApply,
    SqlPartitionHistory,
    replay,
)
from pcbo_dagster.core.decisions import Decisions, PartitionDecision
from pcbo_dagster.core.errors import Blocked, IntegrityError, SourceChanged
from pcbo_dagster.core.plan import Plan
from pcbo_dagster.core.record_table import build_table
from pcbo_dagster.core.sql_outcomes import (
    CONFLICT,
    INVALID_KEY,
    SKIP_EQUAL,
    WRITES,
    RecordOutcome,
    SqlDecisionHasher,
    TargetDecisions,
    outcome_counts,
    outcomes_digest,
)
from pcbo_dagster.engine import failpoints
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.events import chain_key
from pcbo_dagster.engine.request_loading import LoadedRequest
from pcbo_dagster.engine.sql_events import (
    applied_body,
    apply_intent_body,
    rollback_script_body,
    sql_partition_of,
)
from pcbo_dagster.engine.transparency_log import publish
from pcbo_dagster.io.atomic_files import replace_file
from pcbo_dagster.targets.sql_locks import scoped_lock
from pcbo_dagster.targets.sql_table import (
    Checkpoint,
    ChunkContext,
    ChunkResult,
    JournalView,
    PlannedRow,
    SqlTable,
    empty_counts,
    read_journal,
)

Progress = Callable[[int], None]
ROLLBACK_SCRIPTS_DIR = "rollback_scripts"


class ApplyFailed(IntegrityError):
    """The run stopped at a partition (its read-back differed from what was applied, or an apply of
    another run is still open on it); `document` is the execute document of what was done."""

    def __init__(self, message: str, document: dict[str, Any]) -> None:
        self.document = document
        super().__init__(message)


# -- evaluate -------------------------------------------------------------------------------------------


def partition_rows(
    loaded: LoadedRequest,
    table: SqlTable,
    pd: PartitionDecision,
    schema: pa.Schema,
    as_json: dict[str, bool],
    lo: int = 0,
    hi: int | None = None,
) -> list[PlannedRow]:
    """The rows of the partition's adds `lo:hi` (id order), read again from the source (a streamed
    source's records checked against the digests they were decided on), mapped as for parquet."""
    hi = len(pd.add) if hi is None else hi
    records = loaded.fetch(pd.add_locators[lo:hi])
    if pd.add_digests is not None:
        wrong = mismatched_digests(records, pd.add_digests[lo:hi])
        if wrong:
            raise SourceChanged(
                f"partition {pd.partition.key}: record {pd.add[lo + wrong[0]]!r} read again from the source "
                "is not the record that was decided on: the source changed during the run"
            )
    arrow = build_table(
        records,
        pd.add[lo:hi],
        pd.add_occurred_us[lo:hi],
        pd.add_retention_us.slice(lo, hi - lo),
        schema,
        as_json,
    )
    return table.planned_rows(arrow)


def evaluate_target(loaded: LoadedRequest, plan: Plan, decisions: Decisions) -> TargetDecisions:
    """The decisions with each partition's outcomes against the live table (module doc)."""
    spec = loaded.request.target
    assert spec is not None
    schema, as_json = loaded.schema_of(decisions.partitions)
    table = SqlTable.open(spec, spec.url, schema, as_json, write=False)
    try:
        prior = read_journal(table, plan.run_id).prior_view() if table.has_journal() else {}
        hasher = SqlDecisionHasher()
        outcomes: dict[str, list[RecordOutcome]] = {}
        for pd in decisions.partitions:
            found: list[RecordOutcome] = []
            for lo in range(0, len(pd.add), spec.chunkRows):
                rows = partition_rows(loaded, table, pd, schema, as_json, lo, lo + spec.chunkRows)
                table.decide(rows, prior)
                found += [RecordOutcome(r.id, r.outcome, r.live) for r in rows]
            hasher.add_partition(pd.partition.key, found)
            outcomes[pd.partition.key] = found
        descriptor = spec.descriptor(table.location, table.qualified)
    finally:
        table.close()
    return TargetDecisions(
        plan=decisions.plan,
        partitions=decisions.partitions,
        unplaced=decisions.unplaced,
        totals=decisions.totals,
        breaches=decisions.breaches,
        decision_hash=hasher.result(decisions.decision_hash, descriptor),
        policy_decision_hash=decisions.decision_hash,
        descriptor=descriptor,
        outcomes=outcomes,
    )


def check_target_gates(decisions: TargetDecisions) -> None:
    """`conflict: fail` holds while any record meets a key present with other values (exit 3)."""
    conflicts = decisions.conflicts()
    if conflicts:
        raise Blocked(
            f'{len(conflicts)} record(s) meet a key present with other values and conflict is "fail"',
            {
                "status": "blocked",
                "gate": "conflict",
                "runId": decisions.plan.run_id,
                "planHash": decisions.plan.plan_hash,
                "decisionHash": decisions.decision_hash,
                "conflicts": conflicts,
            },
        )


# -- execute ----------------------------------------------------------------------------------------------


@dataclass
class PartitionApply:
    """What a partition's apply did, gathered from its chunks' checkpoints."""

    counts: dict[str, int] = field(default_factory=empty_counts)
    failures: list[dict[str, Any]] = field(default_factory=list)
    applied: list[list[str]] = field(default_factory=list)
    journal_seq: int = 0
    journal_digest: str = ""
    chunks: int = 0
    fallback_chunks: int = 0

    def add(self, result: dict[str, Any], journal_seq: int, journal_digest: str) -> None:
        for name, count in result["counts"].items():
            self.counts[name] += count
        self.failures += result["failures"]
        self.applied += result["applied"]
        self.journal_seq, self.journal_digest = journal_seq, journal_digest
        self.chunks += 1
        self.fallback_chunks += bool(result.get("fallback"))

    @property
    def merkle_root(self) -> str:
        return merkle.root_hex(self.applied_ids)

    @property
    def applied_ids(self) -> list[str]:
        return sorted((a[0] for a in self.applied), key=lambda i: i.encode("utf-8"))


def chunk_count(adds: int, chunk_rows: int) -> int:
    return -(-adds // chunk_rows)


def target_digest(decisions: TargetDecisions) -> str:
    """What a resumed run's target settings are held to (the descriptor the decision hash pins)."""
    return digest_of(decisions.descriptor)


def _check_resume(plan: Plan, digest: str, journal: JournalView, checkpoints: list[Checkpoint]) -> None:
    """A run with checkpoints on this table resumes only with the same request and target settings,
    and a journal that is exactly the one its checkpoints recorded."""
    if not checkpoints:
        if journal.entries:
            _refuse_resume(plan, "the table's journal holds entries of this run but no checkpoint")
        return
    for cp in checkpoints:
        if cp.plan_hash != plan.plan_hash:
            _refuse_resume(plan, f"the request changed: checkpoints were made under plan {cp.plan_hash}")
        if cp.target_digest != digest:
            _refuse_resume(plan, "the target's settings changed since the run's checkpoints were made")
    last = max(checkpoints, key=lambda cp: cp.journal_seq)
    if journal.problems or len(journal.entries) != last.journal_seq or journal.digest != last.journal_digest:
        detail = "; ".join(journal.problems[:3]) or (
            f"the journal holds {len(journal.entries)} entries with digest {journal.digest}, the last "
            f"checkpoint recorded {last.journal_seq} with {last.journal_digest}"
        )
        _refuse_resume(plan, f"the journal changed since the run's checkpoints: {detail}")


def _refuse_resume(plan: Plan, why: str) -> None:
    raise Blocked(
        f"run {plan.run_id} cannot be resumed: {why}; nothing was written",
        {
            "status": "blocked",
            "gate": "resume",
            "runId": plan.run_id,
            "planHash": plan.plan_hash,
            "reason": why,
        },
    )


def rollback_script_path(env: Environment, run_id: str) -> Any:
    return env.settings.home / ROLLBACK_SCRIPTS_DIR / f"rollback_{run_id}.sql"


def rollback_script(
    table: SqlTable, run_id: str, dataset: str, version_label: str, journal: JournalView
) -> bytes:
    """The run's rollback script: deterministic (no clock, no host), the statements restoring every
    row the run changed and did not undo, newest change first, in one transaction."""
    entries = journal.live_entries()
    lines = [
        f"-- pcbo rollback script of run {run_id} ({dataset}/{version_label})",
        f"-- table {table.qualified} in {table.location} ({table.dialect})",
        f"-- journal: {len(journal.entries)} entries, digest {journal.digest}; {len(entries)} to undo",
        "-- Restores every row the run changed to its image before the run, newest change first, in one",
        "-- transaction. `pcbo rollback --dataset D --run-id R` does the same and first checks that no row",
        "-- changed since the run wrote it (this script does not check), and records it on the audit chain.",
        "BEGIN;",
    ]
    if table.dialect == "postgresql":
        lines.append("SET LOCAL standard_conforming_strings = on;")
    lines += table.rollback_statements(entries)
    lines.append("COMMIT;")
    return ("\n".join(lines) + "\n").encode("utf-8")


def execute_sql(
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    decisions: TargetDecisions,
    progress: Progress | None = None,
    journal: bool = True,
) -> dict[str, Any]:
    """Execute a request into its SQL table; the caller evaluated it and checked the gates (module
    doc). `journal=False` (the benchmark's floor only) applies without journal entries: no rollback."""
    check_target_gates(decisions)
    request = loaded.request
    spec = request.target
    assert spec is not None
    ckey = chain_key(plan.dataset, plan.version_label)
    schema, as_json = loaded.schema_of(decisions.partitions)
    table = SqlTable.open(spec, spec.url, schema, as_json, write=True)
    digest = target_digest(decisions)
    results: list[dict[str, Any]] = []
    reconciliation: list[dict[str, Any]] = []
    failure: str | None = None
    try:
        with scoped_lock(table, plan.dataset, plan.run_id) as lock:
            table.ensure_journal()
            view = read_journal(table, plan.run_id)
            checkpoints = table.checkpoints(plan.run_id)
            _check_resume(plan, digest, view, checkpoints)
            env.audit.sync_to_catalog(ckey)
            state = replay(env.audit.backup.read_chain(ckey))
            for (target, _), interrupted in state.sql.items():  # an apply of this run, to resume
                apply = interrupted.open_apply
                if target == table.ref and apply is not None and apply.run_id == plan.run_id:
                    began = (apply.intent["plan_hash"], apply.intent.get("target_digest"))
                    if began != (plan.plan_hash, digest):
                        why = f"the request or the target changed since {interrupted.key}'s apply began"
                        _refuse_resume(plan, why)
            env.catalog.start_run(
                request.runId,
                plan.dataset,
                plan.version_label,
                plan.plan_hash,
                decisions.decision_hash,
                dict(request.metadata),
            )
            complete_applies(env, table, state, plan.dataset, plan.version_label)
            cursor = _JournalCursor(len(view.entries), view.digest)
            for pd in decisions.partitions:
                key = pd.partition.key
                history = state.sql.get((table.ref, key))
                outcome = _partition(
                    env, loaded, plan, decisions, table, pd, schema, as_json, history, state, checkpoints,
                    cursor, digest, journal,
                )  # fmt: skip
                results.append(outcome.document)
                if outcome.reconciliation is not None:
                    reconciliation.append(outcome.reconciliation)
                if progress:
                    progress(1)
                if outcome.failure:
                    failure = outcome.failure
                    break
            script = _write_rollback_script(env, table, state, plan, ckey) if journal else None
        status = "failed" if failure else (
            "applied" if any(r["status"] == "applied" for r in results) else "unchanged"
        )  # fmt: skip
        summary = _summary(results, failure)
        env.catalog.finish_run(request.runId, status, summary)
    finally:
        table.close()
    published = publish(env, ckey)  # deliver, then sign and witness a checkpoint (as execute does)
    document = {
        "status": status,
        "runId": request.runId,
        "dataset": plan.dataset,
        "versionLabel": plan.version_label,
        "planHash": plan.plan_hash,
        "decisionHash": decisions.decision_hash,
        "policyDecisionHash": decisions.policy_decision_hash,
        "target": decisions.descriptor,
        "lock": lock,
        "partitions": results,
        "reconciliation": {
            "status": "failed" if failure else "ok",
            "partitions": reconciliation,
            "totals": {
                "applied": sum(r["applied"] for r in reconciliation),
                "rowsMatching": sum(r["rowsMatching"] for r in reconciliation),
                "rootMismatches": sum(not r["rootMatches"] for r in reconciliation),
            },
        },
        "rollbackScript": script,
        "totals": {**decisions.totals, **summary},
        "auditDelivery": published["auditDelivery"],
        "checkpoint": published["checkpoint"],
    }
    if failure:
        raise ApplyFailed(failure, document)
    return document


def _summary(results: list[dict[str, Any]], failure: str | None) -> dict[str, Any]:
    counts = empty_counts()
    for r in results:
        for name in counts:
            counts[name] += r["counts"][name]
    return {
        "partitions": len(results),
        "applied": sum(r["status"] == "applied" for r in results),
        "unchanged": sum(r["status"] == "unchanged" for r in results),
        "resumed": sum(bool(r.get("resumed")) for r in results),
        **counts,
        "failure": failure,
    }


@dataclass
class _JournalCursor:
    """The run's journal on this table as the apply goes on: entries so far and their digest."""

    seq: int
    digest: str


@dataclass
class _Outcome:
    document: dict[str, Any]
    reconciliation: dict[str, Any] | None = None
    failure: str | None = None


def _partition(
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    decisions: TargetDecisions,
    table: SqlTable,
    pd: PartitionDecision,
    schema: pa.Schema,
    as_json: dict[str, bool],
    history: SqlPartitionHistory | None,
    state: ChainState,
    checkpoints: list[Checkpoint],
    cursor: _JournalCursor,
    digest: str,
    journal: bool,
) -> _Outcome:
    key = pd.partition.key
    spec = table.spec
    outcomes = decisions.outcomes[key]
    open_apply = history.open_apply if history is not None else None
    current = history.current if history is not None else None
    base = {**pd.partition.to_json(), "target": table.ref}
    if open_apply is not None and open_apply.run_id != plan.run_id:
        why = (
            f"partition {key}: run {open_apply.run_id}'s apply into {table.qualified} was interrupted "
            f"(intent seq {open_apply.intent_seq}): resume it with its request, or pcbo rollback --run-id "
            f"{open_apply.run_id}; nothing was written to this partition"
        )
        env.catalog.record_discrepancy(
            run_id=plan.run_id,
            dataset=plan.dataset,
            version_label=plan.version_label,
            partition_key=key,
            kind="sql_apply_interrupted",
            detail={"detail": why},
        )
        return _Outcome({**base, "status": "failed", "counts": empty_counts()}, failure=why)
    if open_apply is None and current is not None:
        applied = current.applied
        assert applied is not None  # `current` is a completed apply
        done_by_this_run = current.run_id == plan.run_id and applied["plan_hash"] == plan.plan_hash
        nothing_to_write = all(
            o.outcome not in WRITES and o.outcome not in (CONFLICT, INVALID_KEY) for o in outcomes
        )
        equal_ids = [o.id for o in outcomes if o.outcome == SKIP_EQUAL]
        if done_by_this_run or (nothing_to_write and applied["merkle_root"] == merkle.root_hex(equal_ids)):
            return _Outcome(_unchanged(base, current))
    chunks = chunk_count(len(pd.add), spec.chunkRows)
    ckey = chain_key(plan.dataset, plan.version_label)
    resumed = open_apply is not None
    if open_apply is None:
        intent = env.audit.append(
            ckey,
            SQL_APPLY_INTENT,
            apply_intent_body(
                plan.run_id,
                table,
                sql_partition_of(plan.dataset, plan.version_label, pd.partition),
                plan.plan_hash,
                decisions.decision_hash,
                digest,
                chunks,
                outcomes_digest(key, outcomes),
                cursor.seq,
                cursor.digest,
            ),
        )
        state.add(intent)
        history = state.sql[(table.ref, key)]
        open_apply = history.open_apply
        assert open_apply is not None
    failpoints.reached("sql_after_intent", pd.partition.index)
    intent_seq = open_apply.intent_seq
    done = {cp.chunk: cp for cp in checkpoints if (cp.partition_key, cp.intent_seq) == (key, intent_seq)}
    gathered = PartitionApply(journal_seq=cursor.seq, journal_digest=cursor.digest)
    keys: dict[str, tuple[Any, ...]] = {}
    for chunk in range(chunks):
        lo, hi = chunk * spec.chunkRows, min((chunk + 1) * spec.chunkRows, len(pd.add))
        rows = partition_rows(loaded, table, pd, schema, as_json, lo, hi)
        keys.update((r.key_text, r.key_values) for r in rows)
        if chunk in done:
            cp = done[chunk]
            gathered.add(cp.result, cp.journal_seq, cp.journal_digest)
            continue
        for row, decided in zip(rows, outcomes[lo:hi], strict=True):
            row.outcome, row.live = decided.outcome, decided.live
        ctx = ChunkContext(
            plan.run_id, key, intent_seq, chunk, plan.plan_hash, digest, cursor.seq, cursor.digest
        )
        result: ChunkResult = table.apply_chunk(rows, ctx, journal=journal)
        cursor.seq, cursor.digest = result.journal_seq, result.journal_digest
        gathered.add(result.to_json(), result.journal_seq, result.journal_digest)
        failpoints.reached("sql_after_chunk", chunk)
    if gathered.chunks == 0:  # a partition without adds: nothing to chunk
        gathered.journal_seq, gathered.journal_digest = cursor.seq, cursor.digest
    cursor.seq, cursor.digest = gathered.journal_seq, gathered.journal_digest
    failpoints.reached("sql_before_event", pd.partition.index)
    mismatched = table.read_back(gathered.applied, keys)
    event = _append_applied(
        env, state, table, plan.dataset, plan.version_label, open_apply, gathered, mismatched, pd
    )
    applied_ids = gathered.applied_ids
    recomputed = merkle.root_hex(sorted(set(applied_ids) - set(mismatched), key=lambda i: i.encode("utf-8")))
    check = {
        "key": key,
        "applied": len(applied_ids),
        "rowsMatching": len(applied_ids) - len(mismatched),
        "mismatches": sorted(mismatched)[:20],
        "merkleRoot": gathered.merkle_root,
        "rootRecomputed": recomputed,
        "rootMatches": recomputed == gathered.merkle_root,
        "status": "ok" if not mismatched else "failed",
    }
    document = {
        **base,
        "status": "applied",
        "resumed": resumed,
        "counts": gathered.counts,
        "byOutcome": outcome_counts(outcomes),
        "failures": gathered.failures,
        "recordCount": len(applied_ids),
        "merkleRoot": gathered.merkle_root,
        "chunks": chunks,
        "fallbackChunks": gathered.fallback_chunks,
        "journal": {"seq": gathered.journal_seq, "digest": gathered.journal_digest},
        "intentSeq": intent_seq,
        "eventHash": event["chain"]["event_hash"],
    }
    failure = None
    if mismatched:
        failure = (
            f"partition {key}: {len(mismatched)} row(s) read back from {table.qualified} differ from what "
            f"was applied ({', '.join(sorted(mismatched)[:5])}); undo the run with pcbo rollback --run-id "
            f"{plan.run_id}"
        )
        env.catalog.record_discrepancy(
            run_id=plan.run_id,
            dataset=plan.dataset,
            version_label=plan.version_label,
            partition_key=key,
            kind="sql_read_back",
            detail=check,
        )
    return _Outcome(document, check, failure)


def _unchanged(base: dict[str, Any], current: SqlApply) -> dict[str, Any]:
    event = current.applied
    assert event is not None
    return {
        **base,
        "status": "unchanged",
        "counts": empty_counts(),
        "failures": [],
        "recordCount": event["record_count"],
        "merkleRoot": event["merkle_root"],
        "appliedBy": current.run_id,
        "eventHash": event["chain"]["event_hash"],
    }


def _append_applied(
    env: Environment,
    state: ChainState,
    table: SqlTable,
    dataset: str,
    version_label: str,
    apply: SqlApply,
    gathered: PartitionApply,
    mismatched: Sequence[str],
    pd: PartitionDecision | None,
) -> dict[str, Any]:
    """Append `sql_partition_applied` for `apply` from what its chunks did, then the catalog rows."""
    counts: dict[str, Any] = dict(gathered.counts)
    if pd is not None:
        counts.update(source=pd.counts["source"], add=pd.counts["add"], omit=pd.counts["omit"])
        counts["by_reason"] = dict(pd.counts["byReason"])
    entries = gathered.journal_seq - int(apply.intent["journal"]["seq"])
    event = env.audit.append(
        chain_key(dataset, version_label),
        SQL_PARTITION_APPLIED,
        applied_body(
            apply.intent,
            apply.intent_seq,
            counts,
            gathered.failures,
            gathered.merkle_root,
            len(gathered.applied),
            gathered.journal_seq,
            gathered.journal_digest,
            entries,
            {"rows": len(gathered.applied), "mismatches": len(mismatched)},
        ),
    )
    state.add(event)
    record_applied(env, dataset, version_label, event, gathered.failures)
    return dict(event)


def record_applied(
    env: Environment, dataset: str, version_label: str, event: Any, failures: list[dict[str, Any]]
) -> None:
    """The catalog's row of a `sql_partition_applied` event and its failed rows."""
    env.catalog.record_sql_apply(
        {
            "event_hash": event["chain"]["event_hash"],
            "kind": "applied",
            "dataset": dataset,
            "version_label": version_label,
            "partition_key": event["partition"]["key"],
            "run_id": event["run_id"],
            "target": event["target"],
            "intent_seq": event["intent_seq"],
            "counts": event["counts"],
            "journal_digest": event["journal"]["digest"],
            "merkle_root": event["merkle_root"],
        },
        failures,
    )


def complete_applies(
    env: Environment, table: SqlTable, state: ChainState, dataset: str, version_label: str
) -> list[dict[str, Any]]:
    """Append the missing `sql_partition_applied` of every open apply into `table` whose chunks are
    all checkpointed (a crash between the last chunk and the event): from its checkpoints alone,
    exactly as the run would have. Returns what was completed."""
    completed = []
    by_run: dict[str, list[Checkpoint]] = {}
    for (target, key), history in sorted(state.sql.items()):
        apply = history.open_apply
        if target != table.ref or apply is None:
            continue
        if apply.run_id not in by_run:
            by_run[apply.run_id] = table.checkpoints(apply.run_id)
        gathered = gathered_from_checkpoints(by_run[apply.run_id], key, apply)
        if gathered is None:
            continue
        applied = gathered.applied
        mismatched = table.read_back_by_key_text(applied) if applied else []
        event = _append_applied(env, state, table, dataset, version_label, apply, gathered, mismatched, None)
        completed.append(
            {
                "kind": "sql_apply_event_appended",
                "where": f"{table.ref}/{key}",
                "eventHash": event["chain"]["event_hash"],
            }
        )
    return completed


def gathered_from_checkpoints(
    checkpoints: list[Checkpoint], key: str, apply: SqlApply
) -> PartitionApply | None:
    """What `apply` did, when every chunk its intent announced has a checkpoint (else None)."""
    mine = sorted(
        (cp for cp in checkpoints if (cp.partition_key, cp.intent_seq) == (key, apply.intent_seq)),
        key=lambda cp: cp.chunk,
    )
    if [cp.chunk for cp in mine] != list(range(int(apply.intent["chunks"]))):
        return None
    journal = apply.intent["journal"]
    gathered = PartitionApply(journal_seq=int(journal["seq"]), journal_digest=str(journal["digest"]))
    for cp in mine:
        gathered.add(cp.result, cp.journal_seq, cp.journal_digest)
    return gathered


def _write_rollback_script(
    env: Environment, table: SqlTable, state: ChainState, plan: Plan, ckey: str
) -> dict[str, Any]:
    """Write the run's rollback script; append its `sql_rollback_script` event unless the chain
    already has one with the same checksum."""
    view = read_journal(table, plan.run_id, state.sql_undone(table.ref, plan.run_id))
    data = rollback_script(table, plan.run_id, plan.dataset, plan.version_label, view)
    path = rollback_script_path(env, plan.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, durable=True)
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    known = any(
        e.get("event_type") == SQL_ROLLBACK_SCRIPT
        and e.get("run_id") == plan.run_id
        and e.get("script", {}).get("checksum") == checksum
        for e in state.other
    )
    event_hash = None
    if not known:
        event = env.audit.append(
            ckey,
            SQL_ROLLBACK_SCRIPT,
            rollback_script_body(
                plan.run_id, table.ref, path.name, checksum, len(view.live_entries()), view.digest
            ),
        )
        state.add(event)
        event_hash = event["chain"]["event_hash"]
    return {
        "path": str(path),
        "checksum": checksum,
        "entries": len(view.live_entries()),
        "journalDigest": view.digest,
        "eventHash": event_hash,
    }

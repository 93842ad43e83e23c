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
commit log. Before the journal is read, resumed or added to, its append-only triggers must be the
ones pcbo creates (`unguarded_journal`; a run into a table without a journal creates them): a
journal without them may have been edited without a trace, and the run is refused (exit 1, nothing
written, `JournalUnguarded` naming each trigger and its finding).

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
request (plan hash), changed target settings, a changed journal, or rows and outcomes that are not
the ones the open intent recorded (the table changed since) refuse to resume (exit 3). An apply
whose every chunk is checkpointed but whose event is missing is completed from the checkpoints (by
the next run on the table, `pcbo rollback` or `pcbo verify --repair`).

**Checkpoints are checked, never taken on trust** (the target database is writable by whoever wants
a forged history to pass): a checkpoint records every row of its chunk with its outcome
(`sql_table.chunk_rows`), its counts and applied rows must follow from those and its failures
(`chunk_claims`), its journal entries must be exactly the rows it says it wrote (key text, row
digest, action, the live state decided on), and all the chunks together must give the digests of
rows and outcomes the apply intent recorded before the table was touched (`checked_chunks`,
`gathered_from_checkpoints`). A checkpoint that is not what its chunk did (`CheckpointAltered`,
`sql_checkpoint_altered`) is never completed, and a resumed run stops at it (exit 1).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
    OUTCOMES,
    SKIP_EQUAL,
    WRITES,
    RecordOutcome,
    RowsDigest,
    SqlDecisionHasher,
    TargetDecisions,
    outcome_counts,
    outcomes_digest,
    outcomes_digest_of,
)
from pcbo_dagster.engine import failpoints
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.events import chain_key
from pcbo_dagster.engine.partition_checks import refuse_writer_without_the_chains_key, verified_chain
from pcbo_dagster.engine.request_loading import LoadedRequest
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.engine.sql_events import (
    applied_body,
    apply_intent_body,
    failures_summary,
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
    chunk_claims,
    chunk_rows,
    empty_counts,
    read_journal,
)

if TYPE_CHECKING:
    from pcbo_dagster.audit.object_store_backup import ChainBackup
    from pcbo_dagster.catalog import CatalogStore

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


class _Unknown:
    pass


#: `evaluate_target` without the chain: the run's journal key is not known.
UNKNOWN = _Unknown()

#: How an evaluation reads the deployment's own audit chain of a dataset version (dataset, version
#: label -> the replayed chain and where it was read), when it has its settings (`deployment_chain`).
ChainReader = Callable[[str, str], tuple[ChainState, str]]


def deployment_chain(
    settings: Settings | Callable[[], Settings], dataset: str, version_label: str
) -> tuple[ChainState, str]:
    """The deployment's audit chain of a dataset version (`settings`, or how to resolve them) as an
    evaluation reads it (a SQL target's journal; for a dry-run, the Iceberg table the chain declares),
    read from its audit backup with nothing written (`read_only_deployment`) and verified as a reader
    holding no lock reads it
    (`partition_checks.verified_chain`, against the catalog's head, its stored log and checkpoints):
    `ChainNotVerified` (exit 1) for one that does not verify. With no catalog of pcbo's (none yet, or
    removed), an empty chain is the chain of a deployment that has applied nothing, and any other is
    refused: there is nothing to hold it against. Returns the replayed chain and the backup's
    location as shown."""
    from pcbo_dagster.engine.partition_checks import ChainNotVerified
    from pcbo_dagster.io.redaction import redact_url

    key = chain_key(dataset, version_label)
    doing = f"the dry-run of {key}"
    with read_only_deployment(settings) as deployment:
        if deployment.env is None:
            if deployment.backup.read_chain(key):
                raise ChainNotVerified(
                    f"{doing} refused: the audit chain {key} cannot be verified: there is no pcbo "
                    f"catalog at {redact_url(deployment.catalog.url)} to hold it against; nothing was "
                    "written"
                )
            return replay([]), deployment.where
        replayed = verified_chain(deployment.env, dataset, version_label, doing, sync=False).replayed
        return replayed, deployment.where


@dataclass
class ReadOnlyDeployment:
    """A deployment opened to be read (`read_only_deployment`)."""

    catalog: CatalogStore
    backup: ChainBackup
    #: The audit backup's location as shown.
    where: str
    #: None with no catalog of pcbo's at its head (none yet, removed, or not migrated).
    env: Environment | None


@contextmanager
def read_only_deployment(settings: Settings | Callable[[], Settings]) -> Iterator[ReadOnlyDeployment]:
    """The deployment of `settings` (or how to resolve them) opened to be read with nothing written
    (an object store's audit backup read through a throwaway cache; no catalog created or migrated)."""
    import tempfile
    from contextlib import nullcontext

    from pcbo_dagster.audit.backup import AuditBackup
    from pcbo_dagster.audit.log import AuditLog
    from pcbo_dagster.audit.object_store_backup import open_backup
    from pcbo_dagster.catalog import CatalogStore
    from pcbo_dagster.engine.transparency_log import signing_key_of
    from pcbo_dagster.io.redaction import redact_url
    from pcbo_dagster.lake.storage import LakeStorage

    if not isinstance(settings, Settings):
        settings = settings()
    store = settings.audit_store
    where = str(settings.audit_dir) if store is None else redact_url(store)
    catalog = CatalogStore(settings.catalog_url)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="pcbo-chain-") if store is not None else nullcontext() as cache
        ):
            backup = AuditBackup(settings.audit_dir) if store is None else open_backup(store, str(cache))
            env = None
            if not catalog.is_missing_sqlite_file() and catalog.at_head():
                # (with the operator's key, as a run reads the chain: one holding an event the key
                # should have signed and did not is refused here as there)
                env = Environment(
                    settings,
                    LakeStorage(settings.lake_url),
                    catalog,
                    AuditLog(backup, catalog),
                    signing_key_of(settings),
                )
            yield ReadOnlyDeployment(catalog, backup, where, env)
    finally:
        catalog.close()


def deployment_chain_reader(settings: Settings | Callable[[], Settings]) -> ChainReader:
    """How an evaluation with `settings` reads its deployment's chains (`deployment_chain`): each
    dataset version's read and verified once, however many checks ask for it."""
    return functools.cache(functools.partial(deployment_chain, settings))


def evaluate_target(
    loaded: LoadedRequest,
    plan: Plan,
    decisions: Decisions,
    journal_key: str | None | _Unknown = UNKNOWN,
    chain: ChainReader | None = None,
) -> TargetDecisions:
    """The decisions with each partition's outcomes against the live table (module doc). A run that
    already changed the table is evaluated against the table as its journal says it was before
    (`journal_key`: the run's, from the chain; None: it has none). Without it, the deployment's own
    key read from its chain (`chain`: a dry-run, or an execute's first gate check, with the
    deployment's settings); with no chain at hand at all, the run's one journal in the table — which
    may be another deployment's, and the document says so — or, when several deployments' chains
    wrote the table with this run id, none (`execute_sql` evaluates again with its own). The
    journal used, and those of other deployments left out, are in `journal_note`."""
    spec = loaded.request.target
    assert spec is not None
    schema, as_json = loaded.schema_of(decisions.partitions)
    table = SqlTable.open(spec, spec.url, schema, as_json, write=False)
    try:
        keys = table.journal_keys(plan.run_id)
        where: str | None = "the chain"
        if journal_key is UNKNOWN and chain is not None:
            state, where = chain(plan.dataset, plan.version_label)
            journal_key = state.sql_journal_key(table.ref, plan.run_id)
        elif journal_key is UNKNOWN:  # no chain at hand: the run's only journal in the table, if one
            journal_key = keys[0] if len(keys) == 1 else None
            where = None
        assert not isinstance(journal_key, _Unknown)
        note = _journal_note(plan.run_id, journal_key, keys, where)
        prior = read_journal(table, journal_key).prior_view()
        hasher = SqlDecisionHasher()
        outcomes: dict[str, list[RecordOutcome]] = {}
        rows_digests: dict[str, str] = {}
        for pd in decisions.partitions:
            found: list[RecordOutcome] = []
            as_rows = RowsDigest()
            for lo in range(0, len(pd.add), spec.chunkRows):
                rows = partition_rows(loaded, table, pd, schema, as_json, lo, lo + spec.chunkRows)
                table.decide(rows, prior)
                found += [RecordOutcome(r.id, r.outcome, r.live) for r in rows]
                for r in rows:
                    as_rows.add(r.id, r.key_text, r.record_digest)
            hasher.add_partition(pd.partition.key, found)
            outcomes[pd.partition.key] = found
            rows_digests[pd.partition.key] = as_rows.result()
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
        rows_digests=rows_digests,
        journal_key=journal_key,
        journal_note=note,
    )


def _journal_note(run_id: str, key: str | None, keys: list[str], chain: str | None) -> dict[str, Any]:
    """What a dry-run says of the journal its evaluation used (`targetJournal`): its key, whose it is
    (`this-deployment`: read from the deployment's chain at `chain`; `unknown`: no chain at hand), the
    keys of the run's other journals in the table (other deployments' with the same run id: never
    used), and a sentence saying so."""
    others = [k for k in keys if k != key]
    message = None
    if chain is not None and others:
        message = (
            f"the table holds {len(others)} journal(s) of run {run_id} written by other deployments "
            f"(not on this deployment's audit chain at {chain}): not used; "
            + ("this evaluation uses this deployment's own" if key else "this deployment has applied none")
        )
    elif chain is None and key is not None:
        message = (
            f"no audit chain of this deployment at hand: evaluated against the table's only journal of run "
            f"{run_id}, {key}, which may be another deployment's (give its home to evaluate against its own)"
        )
    elif chain is None and others:
        message = (
            f"no audit chain of this deployment at hand: the table holds {len(others)} journals of run "
            f"{run_id} (other deployments'): none used"
        )
    return {
        "key": key,
        "deployment": "unknown" if chain is None else "this-deployment",
        "otherDeployments": others,
        "message": message,
    }


def _evaluated_again(
    loaded: LoadedRequest, plan: Plan, decisions: TargetDecisions, journal_key: str | None
) -> TargetDecisions:
    """The decisions evaluated again against the run's own journal in the table (`journal_key`, from
    this deployment's chain), its gates checked again: the evaluation without the chain took another
    chain's journal of the same run id (or could not tell which was its own)."""
    from pcbo_dagster.engine.execute import check_gates

    policy = Decisions(
        plan=decisions.plan,
        partitions=decisions.partitions,
        unplaced=decisions.unplaced,
        totals=decisions.totals,
        breaches=decisions.breaches,
        decision_hash=decisions.policy_decision_hash,
    )
    again = evaluate_target(loaded, plan, policy, journal_key)
    check_gates(loaded, again)
    return again


def trigger_findings(table: SqlTable) -> list[dict[str, str]]:
    """The findings of the journal's append-only triggers (`SqlTable.trigger_problems`), one per
    trigger that is missing (`sql_journal_trigger_missing`; all of them when the journal tables are
    gone) or not the one pcbo creates (`sql_journal_trigger_altered`): `{kind, trigger, detail}`.
    What `verify` reports, and what execute, resume and rollback refuse a journal for: without them
    it may have been edited without a trace."""
    problems = (
        table.trigger_problems()
        if table.has_journal()
        else dict.fromkeys(table.journal_trigger_names(), "missing")
    )
    findings = []
    for name in table.journal_trigger_names():
        problem = problems.get(name)
        if problem is None:
            continue
        if problem == "missing":
            findings.append(
                {
                    "kind": "sql_journal_trigger_missing",
                    "trigger": name,
                    "detail": "an append-only trigger of the journal was dropped",
                }
            )
        else:
            findings.append(
                {
                    "kind": "sql_journal_trigger_altered",
                    "trigger": name,
                    "detail": f"an append-only trigger of the journal is not the one pcbo creates: {problem}",
                }
            )
    return findings


def unguarded_journal(table: SqlTable) -> tuple[str, str] | None:
    """(kind, detail naming each trigger and its finding) when the journal's append-only triggers are
    not all pcbo's (`trigger_findings`), else None."""
    findings = trigger_findings(table)
    if not findings:
        return None
    listed = "; ".join(f"{f['trigger']}: {f['detail']} ({f['kind']})" for f in findings)
    return findings[0]["kind"], (
        f"the journal in {table.location} is not guarded as pcbo made it ({listed}), so it may have been "
        "edited without a trace: restore the triggers (targets/sql_table.journal_ddl) and check it with "
        "pcbo verify"
    )


class JournalUnguarded(IntegrityError):
    """An execute (new or resumed) into a table whose journal's append-only triggers are missing or
    not pcbo's (`unguarded_journal`): refused before anything is written (exit status 1)."""

    def __init__(self, run_id: str, kind: str, detail: str) -> None:
        self.finding = {"kind": kind, "where": run_id, "detail": detail}
        super().__init__(f"run {run_id} refused ({kind}): {detail}; nothing was written")


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


def _as_intended(decisions: TargetDecisions, key: str, apply: SqlApply) -> bool:
    """Whether a resumed run's rows and outcomes of partition `key` are the ones `apply`'s intent
    recorded (the chunks it checkpointed are then checked against them, chunk by chunk)."""
    outcomes = decisions.outcomes.get(key)
    return (
        outcomes is not None
        and outcomes_digest(key, outcomes) == apply.intent["outcomes_digest"]
        and decisions.rows_digests[key] == apply.intent.get("rows_digest", decisions.rows_digests[key])
    )


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
        # the types of the literals below are the catalog's, whatever the session's path lists first
        lines.append(
            "SELECT pg_catalog.set_config('search_path', "
            "'pg_catalog, ' || pg_catalog.current_setting('search_path'), true);"
        )
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
    env.catalog.check_run_id(request.runId, plan.dataset, plan.version_label)  # before anything is written
    spec = request.target
    assert spec is not None
    ckey = chain_key(plan.dataset, plan.version_label)
    # A process without the chain's key touches no target (its journal tables, a SQLite target's lock
    # directory); checked again under the lock, by `verified_chain`
    refuse_writer_without_the_chains_key(env, env.audit.backup.read_chain(ckey), ckey, f"run {plan.run_id}")
    schema, as_json = loaded.schema_of(decisions.partitions)
    table = SqlTable.open(spec, spec.url, schema, as_json, write=True)
    digest = target_digest(decisions)
    results: list[dict[str, Any]] = []
    reconciliation: list[dict[str, Any]] = []
    failure: str | None = None
    try:
        with scoped_lock(table, plan.dataset, plan.run_id) as lock:
            table.ensure_journal()
            unguarded = unguarded_journal(table)  # before the journal is read, resumed or added to
            if unguarded is not None:
                raise JournalUnguarded(plan.run_id, *unguarded)
            state = verified_chain(env, plan.dataset, plan.version_label, f"run {plan.run_id}").replayed
            journal_key = state.sql_journal_key(table.ref, plan.run_id)
            if decisions.journal_key != journal_key:  # evaluated against another chain's journal
                decisions = _evaluated_again(loaded, plan, decisions, journal_key)
            view = read_journal(table, journal_key)
            checkpoints = table.checkpoints(journal_key)
            _check_resume(plan, digest, view, checkpoints)
            for (target, _), interrupted in state.sql.items():  # an apply of this run, to resume
                apply = interrupted.open_apply
                if target == table.ref and apply is not None and apply.run_id == plan.run_id:
                    began = (apply.intent["plan_hash"], apply.intent.get("target_digest"))
                    if began != (plan.plan_hash, digest):
                        why = f"the request or the target changed since {interrupted.key}'s apply began"
                        _refuse_resume(plan, why)
                    if not _as_intended(decisions, interrupted.key, apply):
                        _refuse_resume(
                            plan,
                            f"{interrupted.key}'s rows or their outcomes are not the ones its apply intent "
                            "recorded (the table changed since the apply began): roll the run back with "
                            f"pcbo rollback --run-id {plan.run_id}",
                        )
            env.catalog.start_run(
                request.runId,
                plan.dataset,
                plan.version_label,
                plan.plan_hash,
                decisions.decision_hash,
                dict(request.metadata),
                same_request=False,  # its decision hash follows the live table (`_check_resume` above)
            )
            complete_applies(env, table, state, plan.dataset, plan.version_label)
            cursor = _JournalCursor(len(view.entries), view.digest)
            for pd in decisions.partitions:
                key = pd.partition.key
                history = state.sql.get((table.ref, key))
                outcome = _partition(
                    env, loaded, plan, decisions, table, pd, schema, as_json, history, state, checkpoints,
                    view, cursor, digest, journal,
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
        **decisions.source_files_json(),
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
    view: JournalView,
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
        return _stopped(env, plan, base, "sql_apply_interrupted", why)
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
                decisions.rows_digests[key],
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
    try:  # the chunks a run killed before checkpointed: checked, never taken on trust
        done = {cp.chunk: cp for cp in checked_chunks(checkpoints, key, open_apply, view)}
    except CheckpointAltered as exc:
        return _stopped(env, plan, base, "sql_checkpoint_altered", _not_resumed(plan, exc))
    # The rows those chunks wrote, read back before a chunk more is written: one changed since is a
    # change the decisions cannot see (they are made against the table as it was before this run).
    changed = table.read_back_by_key_text([a for c in sorted(done) for a in done[c].result["applied"]])
    if changed:
        _refuse_resume(
            plan,
            f"{key}'s row(s) {', '.join(sorted(changed)[:20])} that the run wrote before it was cut "
            "short changed since (a change its decisions cannot see): put them back as the run wrote "
            f"them, then resume it or roll it back (pcbo rollback --run-id {plan.run_id} does not write "
            "over a change)",
        )
    gathered = PartitionApply(journal_seq=cursor.seq, journal_digest=cursor.digest)
    keys: dict[str, tuple[Any, ...]] = {}
    for chunk in range(chunks):
        lo, hi = chunk * spec.chunkRows, min((chunk + 1) * spec.chunkRows, len(pd.add))
        rows = partition_rows(loaded, table, pd, schema, as_json, lo, hi)
        keys.update((r.key_text, r.key_values) for r in rows)
        for row, decided in zip(rows, outcomes[lo:hi], strict=True):
            row.outcome, row.live = decided.outcome, decided.live
        if chunk in done:
            cp = done[chunk]
            if cp.result["rows"] != chunk_rows(rows):
                altered = CheckpointAltered(f"partition {key} chunk {chunk}: its rows are not the chunk's")
                return _stopped(env, plan, base, "sql_checkpoint_altered", _not_resumed(plan, altered))
            gathered.add(cp.result, cp.journal_seq, cp.journal_digest)
            continue
        journal_key = state.sql_journal_key(table.ref, plan.run_id)
        assert journal_key is not None  # the intent is on the chain
        ctx = ChunkContext(
            journal_key, key, intent_seq, chunk, plan.plan_hash, digest, cursor.seq, cursor.digest
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


def _stopped(env: Environment, plan: Plan, base: dict[str, Any], kind: str, why: str) -> _Outcome:
    """The run stops at this partition (a discrepancy recorded, the partition failed)."""
    env.catalog.record_discrepancy(
        run_id=plan.run_id,
        dataset=plan.dataset,
        version_label=plan.version_label,
        partition_key=base["key"],
        kind=kind,
        detail={"detail": why},
    )
    return _Outcome({**base, "status": "failed", "counts": empty_counts()}, failure=why)


def _not_resumed(plan: Plan, exc: CheckpointAltered) -> str:
    return (
        f"{exc} (sql_checkpoint_altered): the apply is not resumed past it; nothing more was written to "
        f"this partition (pcbo rollback --run-id {plan.run_id} undoes what the journal holds)"
    )


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
    exactly as the run would have — only when the run's journal is the one the chain and the
    checkpoints recorded (`check_journal`) and the checkpoints are what the chunks did
    (`gathered_from_checkpoints`); anything else is a finding of `verify`, never completed. Returns
    what was completed."""
    completed = []
    by_run: dict[str, tuple[list[Checkpoint], JournalView | None]] = {}
    for (target, key), history in sorted(state.sql.items()):
        apply = history.open_apply
        if target != table.ref or apply is None:
            continue
        if apply.run_id not in by_run:
            by_run[apply.run_id] = (
                table.checkpoints(state.sql_journal_key(table.ref, apply.run_id)),
                vouched_journal(table, state, apply.run_id),
            )
        checkpoints, view = by_run[apply.run_id]
        if view is None:
            continue
        try:
            gathered = gathered_from_checkpoints(checkpoints, key, apply, view)
        except CheckpointAltered:
            continue
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


# -- checking checkpoints -----------------------------------------------------------------------------


class CheckpointAltered(IntegrityError):
    """A chunk checkpoint that is not what its chunk did (`sql_checkpoint_altered`): it disagrees with
    its apply's intent (the chunks, the rows and outcomes digests), with the journal entries the chunk
    wrote, or with itself. Never completed, resumed past or read back from."""


def checked_chunks(
    checkpoints: list[Checkpoint], key: str, apply: SqlApply, view: JournalView | None
) -> list[Checkpoint]:
    """The chunk checkpoints of `apply` so far (chunks 0, 1, ..., in order), each checked: its counts
    and applied rows follow from its rows and failures (`chunk_claims`); and with the run's journal
    (`view`; None when the journal is not the one the chain recorded, its own finding) its entries
    are exactly the rows it says it wrote — id, key text, row digest, action and the live state
    decided on — between the checkpoint before it (or the journal its intent recorded) and its own
    journal position. `CheckpointAltered` otherwise."""
    mine = sorted(
        (cp for cp in checkpoints if (cp.partition_key, cp.intent_seq) == (key, apply.intent_seq)),
        key=lambda cp: cp.chunk,
    )
    where = f"partition {key} (intent seq {apply.intent_seq})"
    chunks = int(apply.intent["chunks"])
    found = [cp.chunk for cp in mine]
    if found != list(range(len(mine))) or len(mine) > chunks:
        raise CheckpointAltered(f"{where}: checkpoints of chunk(s) {found} for an apply of {chunks} chunk(s)")
    journal = apply.intent["journal"]
    previous = int(journal["seq"])
    if mine and view is not None and view.digest_at(previous) != journal["digest"]:
        raise CheckpointAltered(f"{where}: the journal before the apply is not the one its intent recorded")
    for cp in mine:
        problem = _chunk_problem(cp, apply.intent_seq, view, previous)
        if problem is not None:
            raise CheckpointAltered(f"{where} chunk {cp.chunk}: {problem}")
        previous = cp.journal_seq
    return mine


def _chunk_problem(cp: Checkpoint, intent_seq: int, view: JournalView | None, previous: int) -> str | None:
    try:
        rows = [list(r) for r in cp.result["rows"]]
        if any(
            len(r) != 5
            or not all(isinstance(v, str) for v in r[:3])
            or r[3] not in OUTCOMES
            or not isinstance(r[4], str | None)
            for r in rows
        ):
            return "its rows are malformed"
        by_id = {r[0]: r for r in rows}
        if len(by_id) != len(rows):
            return "it lists a row twice"
        failed: set[str] = set()
        for f in cp.result["failures"]:
            row = by_id.get(f["id"])
            if row is None or f["id"] in failed or (f["key"], f["outcome"]) != (row[1], row[3]):
                return f"failure {f['id']!r} is not a row of the chunk"
            failed.add(f["id"])
        if any(r[3] in (CONFLICT, INVALID_KEY) and r[0] not in failed for r in rows):
            return "a row that cannot be written is not among its failures"
        counts, applied = chunk_claims(rows, failed)
        if cp.result["counts"] != counts or [list(a) for a in cp.result["applied"]] != applied:
            return "its counts or applied rows do not follow from its rows and failures"
        if view is None:
            return None
        if view.problems or cp.journal_seq < previous or view.digest_at(cp.journal_seq) != cp.journal_digest:
            return "the journal does not hold the entries it recorded"
        written = [r for r in rows if r[3] in WRITES and r[0] not in failed]
        entries = view.entries[previous : cp.journal_seq]
        journaled = [
            [
                e["id"],
                e["keyText"],
                e["after"],
                e["action"],
                e["priorState"] and e["priorState"]["liveDigest"],
            ]
            for e in entries
            if (e["partition"], e["intentSeq"], e["chunk"]) == (cp.partition_key, intent_seq, cp.chunk)
        ]
        if journaled != written or len(entries) != len(journaled):
            return "its journal entries are not the rows it says it wrote"
    except (KeyError, TypeError, ValueError, AttributeError):
        return "it is malformed"
    return None


def gathered_from_checkpoints(
    checkpoints: list[Checkpoint], key: str, apply: SqlApply, view: JournalView | None
) -> PartitionApply | None:
    """What `apply` did, when every chunk its intent announced has a checkpoint (else None): each
    chunk checked (`checked_chunks`), and all together exactly the rows and outcomes its intent
    recorded (`outcomes_digest`, `rows_digest`), else `CheckpointAltered`."""
    mine = checked_chunks(checkpoints, key, apply, view)
    if len(mine) != int(apply.intent["chunks"]):
        return None
    rows = [r for cp in mine for r in cp.result["rows"]]
    as_rows = RowsDigest()
    for r in rows:
        as_rows.add(r[0], r[1], r[2])
    if outcomes_digest_of(key, [[r[0], r[3], r[4]] for r in rows]) != apply.intent["outcomes_digest"] or (
        "rows_digest" in apply.intent and as_rows.result() != apply.intent["rows_digest"]
    ):
        raise CheckpointAltered(
            f"partition {key} (intent seq {apply.intent_seq}): the checkpoints' rows are not the rows and "
            "outcomes the apply intent recorded"
        )
    journal = apply.intent["journal"]
    gathered = PartitionApply(journal_seq=int(journal["seq"]), journal_digest=str(journal["digest"]))
    for cp in mine:
        gathered.add(cp.result, cp.journal_seq, cp.journal_digest)
    return gathered


def event_disagreement(gathered: PartitionApply, event: Mapping[str, Any]) -> list[str]:
    """The fields of a `sql_partition_applied` event its apply's checkpoints (`gathered`) do not give."""
    pairs = [
        ("merkle_root", gathered.merkle_root, event["merkle_root"]),
        ("record_count", len(gathered.applied), event["record_count"]),
        ("counts", gathered.counts, {name: event["counts"].get(name) for name in gathered.counts}),
        ("failures", failures_summary(gathered.failures), event["failures"]),
        (
            "journal",
            [gathered.journal_seq, gathered.journal_digest],
            [event["journal"]["seq"], event["journal"]["digest"]],
        ),
    ]
    return [name for name, from_checkpoints, recorded in pairs if from_checkpoints != recorded]


def vouched_journal(table: SqlTable, state: ChainState, run_id: str) -> JournalView | None:
    """The run's journal in `table` (entries of applies the chain says were undone not live), when it
    is the one the chain and the checkpoints recorded (`check_journal`); else None."""
    view = read_journal(table, state.sql_journal_key(table.ref, run_id), state.sql_undone(table.ref, run_id))
    return None if check_journal(table, state, run_id, view) else view


def check_journal(table: SqlTable, state: ChainState, run_id: str, view: JournalView) -> list[str]:
    """What is wrong with the run's journal in `table` against the chain and its checkpoints."""
    problems = list(view.problems)
    applies: dict[tuple[str, int], SqlApply] = {}
    vouched: list[int] = []  # journal lengths the chain recorded
    for (target, key), history in sorted(state.sql.items()):
        if target != table.ref:
            continue
        for apply in history.applies:
            if apply.run_id != run_id:
                continue
            applies[(key, apply.intent_seq)] = apply
            recorded = [apply.intent["journal"]]
            if apply.applied is not None:
                recorded.append(apply.applied["journal"])
            for journal in recorded:
                vouched.append(int(journal["seq"]))
                if view.digest_at(int(journal["seq"])) != journal["digest"]:
                    problems.append(
                        f"{key}: the journal's first {journal['seq']} entries do not have the digest the "
                        f"chain recorded ({journal['digest']})"
                    )
    checkpoints = table.checkpoints(state.sql_journal_key(table.ref, run_id))
    for cp in checkpoints:
        owner = applies.get((cp.partition_key, cp.intent_seq))
        if owner is None:  # a checkpoint no apply on the chain made vouches for nothing
            problems.append(
                f"{cp.partition_key} chunk {cp.chunk}: a checkpoint of intent seq {cp.intent_seq}, which "
                "is no apply of this run on the chain"
            )
            continue
        if view.digest_at(cp.journal_seq) != cp.journal_digest:
            problems.append(f"{cp.partition_key} chunk {cp.chunk}: the journal disagrees with its checkpoint")
        if owner.applied is None:  # cut short by a crash (then resumed, or rolled back): its checkpoints
            # are all that records how far it went
            vouched.append(cp.journal_seq)
    # Every entry must be vouched for: by the chain (each apply's journal before and after), or by a
    # checkpoint of an apply the chain shows open. An entry past that is not the run's.
    last_seq = max(vouched, default=0)
    if len(view.entries) != last_seq:
        problems.append(
            f"the journal holds {len(view.entries)} entries, the chain and its applies {last_seq}"
        )
    return problems


def _write_rollback_script(
    env: Environment, table: SqlTable, state: ChainState, plan: Plan, ckey: str
) -> dict[str, Any]:
    """Write the run's rollback script; append its `sql_rollback_script` event unless the chain
    already has one with the same checksum."""
    view = read_journal(
        table, state.sql_journal_key(table.ref, plan.run_id), state.sql_undone(table.ref, plan.run_id)
    )
    data = rollback_script(table, plan.run_id, plan.dataset, plan.version_label, view)
    path = rollback_script_path(env, plan.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, durable=True, mode=0o600)  # the target's prior rows: its owner's alone
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

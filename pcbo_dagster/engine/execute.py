"""`execute`: write each partition of a plan to the lake, prove it, audit it, reconcile it.

Per partition, in this order (CONTRACT section 4): data file (content-addressed), the version and
rollback manifests, then the intent (a `partition_commit_intent` event naming the exact manifest
checksum about to be committed), then `_manifest.json` (the commit point), then the audit event, then
a post-write check that reads the committed file back from the lake, then the catalog. Each
partition's commit point is first compared with what the audit chain says it must be
(`engine/crash_windows.py`): a commit or rollback a crash interrupted is completed ("healed"), and a
partition whose lake disagrees with its chain in any other way stops the run before anything is
written to it. A partition already committed with identical content is left as it is; if a crash had
left it without its catalog row, that is completed now.

Partitions are committed in batches. With `parallel` > 1 (`--parallel`, `PCBO_PARALLEL`; default 1 on
a local lake, 2 there for a ledger archive, 4 on an object store: `settings.default_parallel`) up to
that many partitions of a batch are read, encoded and written at once by worker threads (pyarrow,
zstd, hashlib and the object-store clients release the GIL), and so are the batch's commit points and
post-write checks. Everything that appends to the audit chain or writes the catalog stays on the
calling thread, one partition after another in partition order, so the chain, the catalog and the
lake are byte-for-byte what a `parallel=1` run (one partition at a time) writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pcbo_dagster.audit.log import ChainMoved
from pcbo_dagster.core import merkle
from pcbo_dagster.core.canonical import mismatched_digests, prefixed, sha256_hex
from pcbo_dagster.core.chain_state import (
    PARTITION_COMMIT_INTENT,
    PARTITION_COMMITTED,
    PARTITION_RESTORED,
    ChainState,
    CommitIntent,
    PartitionHistory,
)
from pcbo_dagster.core.decisions import Decisions, PartitionDecision
from pcbo_dagster.core.errors import Blocked, IntegrityError, InvalidInput, SourceChanged, interrupting_signal
from pcbo_dagster.core.memory import release_memory
from pcbo_dagster.core.plan import Plan
from pcbo_dagster.core.record_table import build_table
from pcbo_dagster.core.sql_outcomes import TargetDecisions
from pcbo_dagster.engine import failpoints, lake_changes
from pcbo_dagster.engine.crash_windows import LakeDisagreesWithChain, LakeVsChain, compare, heal
from pcbo_dagster.engine.environment import DatasetLease, Environment
from pcbo_dagster.engine.events import (
    catalog_row,
    chain_key,
    commit_body,
    commit_intent_body,
    commit_intent_entry,
    restoration_body,
)
from pcbo_dagster.engine.ledger_continuity import refuse_another_history
from pcbo_dagster.engine.partition_checks import CheckedChain, verified_chain
from pcbo_dagster.engine.post_write import CheckItem, check_batch
from pcbo_dagster.engine.request_loading import LoadedRequest
from pcbo_dagster.engine.rollback import apply_undos, plan_undo
from pcbo_dagster.engine.settings import default_parallel
from pcbo_dagster.engine.transparency_log import checkpoint_places, publish
from pcbo_dagster.io.redaction import one_line_error
from pcbo_dagster.lake import layout, manifests, parquet_files
from pcbo_dagster.lake.manifests import FileEntry, Manifest, RollbackManifest
from pcbo_dagster.lake.storage import LakeStorage
from pcbo_dagster.sources.streaming import source_batch_size
from pcbo_dagster.tables import iceberg_publication

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
#: Called before each partition is written when given (a staged rollout's throttle, pause and
#: cancel): False stops the run there, after the partitions before it have been committed.
Pace = Callable[[PartitionDecision], bool]


def check_gates(loaded: LoadedRequest, decisions: Decisions) -> None:
    """Raise `Blocked` (exit 3, nothing written) when a gate holds."""
    request = loaded.request
    if request.expectedDecisionHash is not None and request.expectedDecisionHash != decisions.decision_hash:
        raise Blocked(
            "expectedDecisionHash does not match the decisions evaluated now",
            {
                "status": "blocked",
                "gate": "expectedDecisionHash",
                "runId": request.runId,
                "expectedDecisionHash": request.expectedDecisionHash,
                "decisionHash": decisions.decision_hash,
                "planHash": decisions.plan.plan_hash,
            },
        )
    if request.policies.onViolation == "block" and decisions.breaches:
        raise Blocked(
            f'{len(decisions.breaches)} record(s) breach a policy and onViolation is "block"',
            {
                "status": "blocked",
                "gate": "onViolation",
                "runId": request.runId,
                "planHash": decisions.plan.plan_hash,
                "decisionHash": decisions.decision_hash,
                "breaches": decisions.breaches,
            },
        )
    if isinstance(decisions, TargetDecisions):  # issue 15: a SQL table target's own gates
        from pcbo_dagster.engine.sql_apply import check_target_gates

        check_target_gates(decisions)


def build_manifest(
    plan: Plan,
    decisions: Decisions,
    pd: PartitionDecision,
    file_entry: FileEntry,
    merkle_root: str,
    version: int,
    previous_version: int | None,
    previous_checksum: str | None,
    schema: pa.Schema,
) -> Manifest:
    return {
        "kind": manifests.MANIFEST_KIND,
        "dataset": plan.dataset,
        "versionLabel": plan.version_label,
        "runId": plan.run_id,
        "partition": pd.partition.to_json(),
        "partitionVersion": version,
        "previousVersion": previous_version,
        "previousManifestChecksum": previous_checksum,
        "planHash": plan.plan_hash,
        "decisionHash": decisions.decision_hash,
        "policies": plan.policies.to_json(),
        "files": [file_entry],
        "recordCount": len(pd.add),
        "merkleRoot": merkle_root,
        "counts": pd.counts,
        "schema": [{"name": f.name, "type": str(f.type)} for f in schema],
        "writer": {"format": "parquet", "pyarrow": pa.__version__, **parquet_files.WRITER_OPTIONS},
    }


def _rollback_manifest(
    plan: Plan,
    key: str,
    version: int,
    manifest_checksum: str,
    previous: Manifest | None,
    file_paths: list[str],
) -> RollbackManifest:
    kept = {f["path"] for f in previous["files"]} if previous else set()
    return {
        "kind": manifests.ROLLBACK_KIND,
        "dataset": plan.dataset,
        "versionLabel": plan.version_label,
        "partitionKey": key,
        "undoesVersion": version,
        "undoesManifestChecksum": manifest_checksum,
        "restoreVersion": previous["partitionVersion"] if previous else None,
        "restoreManifest": layout.version_manifest(
            plan.dataset, plan.version_label, key, previous["partitionVersion"]
        )
        if previous
        else None,
        "removeFiles": sorted(p for p in file_paths if p not in kept),
    }


#: What stopped a run (`ExecuteFailed.kind`, the catalog discrepancy's kind).
POST_WRITE_CHECK = "post_write_check"
LAKE_DISAGREES_WITH_CHAIN = "lake_disagrees_with_chain"
SOURCE_CHANGED = "source_changed"
TABLE_PUBLICATION_REFUSED = "table_publication_refused"


class ExecuteFailed(IntegrityError):
    """The run stopped at a partition: its written rows did not match its decisions or policy (the
    post-write check: that partition was rolled back), its commit point disagrees with its audit chain
    (nothing was written to it), or the source changed during the run. `document` is the execute
    document of what was done; `kind` says which (`POST_WRITE_CHECK`, `LAKE_DISAGREES_WITH_CHAIN`,
    `SOURCE_CHANGED`, `TABLE_PUBLICATION_REFUSED`: the Iceberg table diverged from the chain, what was
    committed stays) and `partition_key` where (None for a changed source or a refused publication)."""

    def __init__(
        self,
        message: str,
        document: dict[str, Any],
        kind: str = POST_WRITE_CHECK,
        partition_key: str | None = None,
    ) -> None:
        self.document = document
        self.kind = kind
        self.partition_key = partition_key
        super().__init__(message)


@dataclass(frozen=True)
class Refusal:
    """Why a run stopped before writing a partition (the lake disagrees with the chain, or the source
    changed); recorded as a catalog discrepancy."""

    kind: str
    message: str
    partition_key: str | None
    detail: dict[str, Any]


def _refuse(env: Environment, plan: Plan, exc: LakeDisagreesWithChain | SourceChanged) -> Refusal:
    """Record why the run stops before a partition (a catalog discrepancy) and say so."""
    if isinstance(exc, LakeDisagreesWithChain):
        refusal = Refusal(
            LAKE_DISAGREES_WITH_CHAIN,
            str(exc),
            exc.comparison.where.rsplit("/", 1)[-1],
            exc.comparison.finding(),
        )
    else:
        refusal = Refusal(SOURCE_CHANGED, str(exc), None, {"detail": str(exc)})
    env.catalog.record_discrepancy(
        run_id=plan.run_id,
        dataset=plan.dataset,
        version_label=plan.version_label,
        partition_key=refusal.partition_key,
        kind=refusal.kind,
        detail=refusal.detail,
    )
    return refusal


def post_write_check(
    env: Environment,
    plan: Plan,
    manifest: Manifest,
    expected_ids: list[str],
    existing_ids: list[str],
    full: bool = True,
    read: bool = True,
) -> dict[str, Any]:
    """Read the committed file back from the lake: checksum, rows vs decisions, root, policy
    (`post_write.check_batch` of one partition; a commit batch checks its partitions together)."""
    return check_batch(env, plan, [CheckItem(manifest, expected_ids, full, read)], existing_ids)[0]


#: Partitions committed together: one sync of their data files, one of their commit points, one
#: audit append (group commit) and one catalog transaction per batch.
COMMIT_BATCH = 32
#: A commit batch also ends once its partitions hold this many placed records.
COMMIT_BATCH_RECORDS = 65_536


@dataclass
class _Staged:
    """One partition on its way through a commit batch."""

    pd: PartitionDecision
    manifest: Manifest
    manifest_checksum: str
    manifest_bytes: bytes | None  # None when the partition is unchanged
    version: int
    event: dict[str, Any] | None = None
    healed: bool = False
    check: dict[str, Any] | None = None
    #: What was wrong with the partition in the lake when this run restored it to the chain's bytes.
    restored: dict[str, Any] | None = None
    #: The committed files were read and checked against the manifest while staging.
    files_verified: bool = False
    #: The Merkle root of `pd.add` as staging computed it (None: not computed in this process).
    adds_root: str | None = None
    #: The commit point's bytes as this run read (or restored) them, None for none: what its commit
    #: point write replaces, and only that (`LakeStorage.swap`).
    held: bytes | None = None

    @property
    def status(self) -> str:
        """committed (a new version), restored (put back to the chain's current version) or unchanged."""
        if self.manifest_bytes is not None:
            return "committed"
        return "unchanged" if self.restored is None else "restored"


def execute(
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    decisions: Decisions,
    progress: Progress | None = None,
    pace: Pace | None = None,
    parallel: int | None = None,
    schema_from: Decisions | None = None,
    table: iceberg_publication.TableTarget | None = None,
) -> dict[str, Any]:
    """Execute the request; the caller has evaluated it and checked the gates.

    With `pace`, partitions are committed one at a time, each after `pace` allowed it; a `pace`
    returning False ends the run early with status `stopped` (what was committed stays committed).
    `parallel`: partitions staged at once (default: the one the settings were given, else
    `default_parallel` for the lake and the request's source); 1 stages them one after another on this
    thread. The outputs are the same either way.
    `schema_from`: the decisions whose adds fix the parquet schema, when `decisions` holds only some
    of a request's partitions (a promotion of part of a rollout writes the bytes the whole would).
    `table`: where to publish (a rollout's staging branch or promotion), instead of the request's
    `table` or the dataset version's recorded one.
    """
    if isinstance(decisions, TargetDecisions):  # issue 15: a SQL table target (engine/sql_apply.py)
        from pcbo_dagster.engine.sql_apply import execute_sql

        return execute_sql(env, loaded, plan, decisions, progress=progress)
    workers = _workers(env, parallel, loaded.source_kind)
    request = loaded.request
    # before anything is written
    env.catalog.check_run_id(
        request.runId, plan.dataset, plan.version_label, (plan.plan_hash, decisions.decision_hash)
    )
    if table is None and request.table is not None:
        # A table another dataset version holds: invalid input before the lock, whose lease registers
        # the dataset version in the catalog (nothing written); checked again under it (`publisher_for`).
        iceberg_publication.refuse_another_datasets_table(
            env, iceberg_publication.target_for(request.table, env), plan.dataset, plan.version_label
        )
    existing = list(request.existingTargetIds)
    schema, as_json = loaded.schema_of((schema_from or decisions).partitions)
    results: list[dict[str, Any]] = []
    reconciliation: list[dict[str, Any]] = []
    failure: str | None = None
    refusal: Refusal | None = None
    failed_key: str | None = None
    failed_kind = POST_WRITE_CHECK
    stopped = False
    batch_size = 1 if pace is not None else COMMIT_BATCH
    with (
        env.dataset_lock(plan.dataset, plan.version_label, request.runId) as lease,
        _worker_pool(workers) as pool,
    ):
        _refuse_links_before_writing(env, lease, plan, decisions, dict(request.metadata))
        # The chain this run builds on, verified before anything is written: an event edited before
        # the head would have the run "restore" a version no run left current
        verified = verified_chain(env, plan.dataset, plan.version_label, f"run {request.runId}")
        # A ledger range continues the history the lake holds on either side, or nothing is written
        refuse_another_history(env, loaded, plan, decisions, verified.replayed)
        # Issue 17: the Iceberg table the committed partitions are published to (None: none), its
        # declaration appended under the lease (two runs never declare two tables; a run's chain moves
        # under no other run) and before the replay below.
        publisher = iceberg_publication.publisher_for(
            env,
            request.table,
            plan.dataset,
            plan.version_label,
            verified=verified.replayed,
            plan=plan,
            given=table,
            columns=schema.names,
            field_of=lambda column: loaded.field_of(column, (schema_from or decisions).partitions),
        )
        _start_run(env, plan, decisions, dict(request.metadata))
        try:
            state = _still_verified(env, plan, verified, f"run {request.runId}")
            catalog_rows = _catalog_versions(env, plan.dataset, plan.version_label)
            for pds in _commit_batches(decisions.partitions, batch_size):
                if pace is not None and not pace(pds[0]):
                    stopped = True
                    break
                try:
                    batch = _stage_batch(
                        pool, env, loaded, plan, decisions, pds, schema, as_json, state, lease
                    )
                except (LakeDisagreesWithChain, SourceChanged) as exc:
                    refusal = _refuse(env, plan, exc)
                    failure = refusal.message
                    break
                del pds
                failure = _commit_batch(pool, env, loaded, plan, batch, state, catalog_rows, existing, lease)
                if failure:
                    failed_key = next(st.pd.partition.key for st in batch if _check_of(st)["status"] != "ok")
                for st in batch:
                    results.append(_outcome(env, st))
                    reconciliation.append(_check_of(st))
                if publisher is not None and not publisher.target.one_snapshot and not failure:
                    _reached("before_publication", [st.pd.partition.index for st in batch])  # issue 17
                    failure = iceberg_publication.publish_or_refuse(publisher, state, plan.run_id)
                    failed_kind = TABLE_PUBLICATION_REFUSED
                if progress:
                    progress(len(batch))
                if failure:
                    break
            if publisher is not None and not publisher.refused and not failure:  # issue 17: what batches left
                failure = iceberg_publication.publish_or_refuse(publisher, state, plan.run_id)
                failed_kind = TABLE_PUBLICATION_REFUSED
        except (Exception, KeyboardInterrupt) as exc:
            _record_run_cut_short(env, lease, request.runId, results, exc)
            raise
        final, summary = _summary(results, failure, stopped)
        env.catalog.finish_run(request.runId, final, summary)
    document = _document(env, plan, decisions, final, summary, results, reconciliation, failure, publisher)
    _announce(env, plan, results)
    if failure:
        if refusal is not None:
            raise ExecuteFailed(failure, document, refusal.kind, refusal.partition_key)
        raise ExecuteFailed(failure, document, failed_kind, failed_key)
    return document


def _start_run(env: Environment, plan: Plan, decisions: Decisions, metadata: dict[str, Any]) -> None:
    """The run's `runs` row (and its dataset version's), `running`."""
    env.catalog.ensure_dataset(plan.dataset, plan.version_label)
    env.catalog.start_run(
        plan.run_id, plan.dataset, plan.version_label, plan.plan_hash, decisions.decision_hash, metadata
    )


def _refuse_links_before_writing(
    env: Environment, lease: DatasetLease, plan: Plan, decisions: Decisions, metadata: dict[str, Any]
) -> None:
    """A run's first step under its lease, before it writes anything in the lake, the audit chain or
    the catalog: `OutsidePartition` (exit 1) when a symbolic link already lies at or on the way to a
    place it would write (`layout.partition_places` of each of its partitions and, with a signing key,
    the dataset version's checkpoints), each name below the lake's root looked at once
    (`LakeStorage.refuse_links`). Then only the run's `runs` row is written, `failed` with the error.
    Each write and read still checks its own path: a link planted after this check refuses the run
    there, and what it staged before stays as a crash's leftovers (`pcbo gc` removes them)."""
    dataset, version_label = plan.dataset, plan.version_label
    places = [
        place
        for pd in decisions.partitions
        for place in layout.partition_places(dataset, version_label, pd.partition.key)
    ]
    places += checkpoint_places(env, dataset, version_label)
    try:
        env.lake.refuse_links(places)
    except layout.OutsidePartition as exc:
        _start_run(env, plan, decisions, metadata)
        _record_run_cut_short(env, lease, plan.run_id, [], exc)
        raise


def _record_run_cut_short(
    env: Environment,
    lease: DatasetLease,
    run_id: str,
    results: list[dict[str, Any]],
    exc: Exception | KeyboardInterrupt,
) -> None:
    """Record as `failed` a run an error ends after it started (a link on its way, a full disk, a lost
    catalog connection), with the error in its summary, and as `interrupted` one a Ctrl-C (SIGINT) or a
    SIGTERM ends, instead of leaving its row `running`: only while the run still holds its write lease
    (a run whose lease was taken over may share its run id with the one that took it, whose row is not
    this run's to write), and never in place of the error itself (a catalog that cannot take the row
    leaves it as it was)."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    if interrupted:
        status, why = "interrupted", f"interrupted ({interrupting_signal(exc)})"
    else:
        status, why = "failed", one_line_error(exc)
    try:
        lease.renew()
        env.catalog.finish_run(run_id, status, _summary(results, why, False)[1])
    except Exception:  # noqa: BLE001 - the run's own error is what the caller raises
        log.debug("could not record run %s as %s", run_id, status, exc_info=True)


def _announce(env: Environment, plan: Plan, results: list[dict[str, Any]]) -> None:
    """Tell the lake-change listeners (`engine/lake_changes.py`) which partitions the run changed:
    committed, restored, healed, or rolled back by a failed post-write check."""
    changed = [r["key"] for r in results if r["status"] != "unchanged" or r.get("healed")]
    lake_changes.announce(env, plan.dataset, plan.version_label, changed, lake_changes.COMMITTED)


def _workers(env: Environment, parallel: int | None, source_kind: str | None = None) -> int:
    """`parallel`, else the one the settings were given, else the fastest for the lake and a run's
    source (`default_parallel`)."""
    settings = env.settings
    if parallel is not None:
        workers = parallel
    elif settings.parallel_given:
        workers = settings.parallel
    else:
        workers = default_parallel(settings.lake_url, source_kind)
    if workers < 1:
        raise InvalidInput("parallel", f"must be at least 1, not {workers}")
    return workers


def _summary(results: list[dict[str, Any]], failure: str | None, stopped: bool) -> tuple[str, dict[str, Any]]:
    """The run's final status and its summary counts (what the catalog's run row records)."""
    status = "committed" if any(r["status"] in ("committed", "restored") for r in results) else "unchanged"
    final = "failed" if failure else "stopped" if stopped else status
    summary = {
        "partitions": len(results),
        "committed": sum(r["status"] == "committed" for r in results),
        "unchanged": sum(r["status"] == "unchanged" for r in results),
        "healed": sum(bool(r.get("healed")) for r in results),
        "restored": sum(r["status"] == "restored" for r in results),
        "failure": failure,
        "stopped": stopped,
    }
    return final, summary


def _document(
    env: Environment,
    plan: Plan,
    decisions: Decisions,
    final: str,
    summary: dict[str, Any],
    results: list[dict[str, Any]],
    reconciliation: list[dict[str, Any]],
    failure: str | None,
    publisher: iceberg_publication.Publisher | None = None,
) -> dict[str, Any]:
    """Deliver the chain's pending events and sign a checkpoint of it (`transparency_log.publish`),
    then the execute document (CONTRACT section 3)."""
    published = publish(env, chain_key(plan.dataset, plan.version_label))
    document: dict[str, Any] = {
        "status": final,
        "runId": plan.run_id,
        "dataset": plan.dataset,
        "versionLabel": plan.version_label,
        "planHash": plan.plan_hash,
        "decisionHash": decisions.decision_hash,
        "partitions": results,
        "reconciliation": {
            "status": "failed" if failure else "ok",
            "partitions": reconciliation,
            "totals": {
                "decidedAdds": sum(c["decidedAdds"] for c in reconciliation),
                "rowsWritten": sum(c["rowsWritten"] for c in reconciliation),
                "rootMismatches": sum(not c["rootMatches"] for c in reconciliation),
                "policyViolations": sum(c["policyViolationCount"] for c in reconciliation),
            },
        },
        "totals": {**decisions.totals, **summary},
        **decisions.source_files_json(),
        "auditDelivery": published["auditDelivery"],
        "checkpoint": published["checkpoint"],
    }
    if publisher is not None:
        document["table"] = publisher.summary()
    return document


def _catalog_versions(env: Environment, dataset: str, version_label: str) -> dict[str, tuple[int, str]]:
    """The catalog's current (version, manifest checksum) of each partition of a dataset version."""
    return {
        key: (row["version"], row["manifest_checksum"])
        for key, row in env.catalog.current_partitions(dataset, version_label).items()
    }


def _commit_batches(partitions: Iterable[PartitionDecision], size: int) -> Iterator[list[PartitionDecision]]:
    """The partitions in commit batches of up to `size`, a batch also ending once it holds
    `COMMIT_BATCH_RECORDS` placed records (a streamed source's partitions are read from its spill as
    the batches are taken, so only a batch's decisions are in memory)."""
    batch: list[PartitionDecision] = []
    weight = 0
    for pd in partitions:
        batch.append(pd)
        weight += pd.counts["source"]
        if len(batch) >= size or weight >= COMMIT_BATCH_RECORDS:
            yield batch
            batch, weight = [], 0
    if batch:
        yield batch


@contextmanager
def _worker_pool(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """Threads for staging and checking partitions; None (this thread does it all) for 1. On the way
    out, queued work is dropped and running work finished, so nothing writes once the run has left."""
    if workers <= 1:
        yield None
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pcbo-execute")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _in_order(
    pool: ThreadPoolExecutor | None, fn: Callable[[Any], Any], items: Iterable[Any]
) -> Iterator[Any]:
    """`fn` of each item, in the items' order: on the pool's threads (up to its size at once) when
    there is a pool and more than one item, else lazily on this thread, one item after another."""
    items = list(items)
    if pool is None or len(items) < 2:
        return map(fn, items)
    return pool.map(fn, items)


@dataclass
class _Prepared:
    """A partition encoded and compared with its commit point, its files not yet written."""

    staged: _Staged | None  # None when the commit point disagrees with the chain (`lake`)
    lake: LakeVsChain
    files: list[tuple[str, bytes]]  # (lake path, bytes) in write order; none when unchanged


def _prepare(
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    decisions: Decisions,
    pd: PartitionDecision,
    schema: pa.Schema,
    as_json: dict[str, bool],
    history: PartitionHistory | None,
) -> _Prepared:
    """Read the partition's commit point and compare it with its chain `history`, encode the partition
    and, when its content is new, build its version and rollback manifests. A partition whose lake
    disagrees with its chain is restored to the chain's current version when its bytes can be had
    exactly (`_restoration`); otherwise nothing is prepared (`staged` None). Reads only: safe on a
    worker thread."""
    lake = env.lake
    key = pd.partition.key
    dataset, version_label = plan.dataset, plan.version_label
    previous_bytes = lake.read_if_exists(layout.manifest(dataset, version_label, key))
    against_chain = compare(history, dataset, version_label, key, previous_bytes)
    known_version = history.max_version if history is not None else 0
    table = _partition_table(loaded, decisions, pd, schema, as_json)
    data = parquet_files.encode(table)
    file_hex = sha256_hex(data)
    file_rel = layout.data_file(dataset, version_label, key, file_hex)
    file_entry: FileEntry = {
        "path": file_rel,
        "checksum": prefixed(file_hex),
        "rowCount": table.num_rows,
        "byteSize": len(data),
    }
    merkle_root = merkle.root_hex(pd.add)
    restore: list[tuple[str, bytes]] = []
    restored: dict[str, Any] | None = None
    previous: Manifest | None
    previous_checksum: str | None
    if against_chain.verdict == "finding":
        restoration = _restoration(env, plan, decisions, pd, schema, history, file_entry, merkle_root, data)
        if restoration is None:
            return _Prepared(None, against_chain, [])
        previous, previous_checksum, restore = restoration
        restored = against_chain.finding()
    else:
        previous, previous_checksum = against_chain.manifest, against_chain.manifest_checksum
        if previous is not None and previous_bytes is not None:
            # the commit point is the chain's: the retained copy of its version must hold its bytes too
            restored = _retained_copy_finding(lake, dataset, version_label, key, previous, previous_bytes)
            restore = [] if restored is None else [(restored["where"], previous_bytes)]
    version = max(known_version, previous["partitionVersion"] if previous else 0) + 1
    manifest = build_manifest(
        plan,
        decisions,
        pd,
        file_entry,
        merkle_root,
        version,
        previous["partitionVersion"] if previous else None,
        previous_checksum,
        schema,
    )
    gaps = _gaps_in(loaded, pd)
    if gaps:
        manifest["gaps"] = gaps
    trusted = _trusted_ledger_in(loaded, pd)
    if trusted is not None:
        manifest["trustedLedger"] = trusted
    if previous is not None and manifests.same_content(previous, manifest):
        assert previous_checksum is not None
        if against_chain.verdict != "finding" and lake.read_if_exists(file_rel) != data:  # same path, bytes
            restore.append((file_rel, data))
            restored = restored or {
                "kind": "data_file_corrupt",
                "where": file_rel,
                "detail": "the committed data file was missing or did not have its manifest's checksum",
            }
        staged = _Staged(pd, previous, previous_checksum, None, previous["partitionVersion"])
        staged.restored, staged.files_verified, staged.adds_root = restored, True, merkle_root
        staged.held = previous_bytes
        return _Prepared(staged, against_chain, restore)
    manifest_bytes = manifests.encode(manifest)
    manifest_checksum = manifests.checksum(manifest_bytes)
    rollback_bytes = manifests.encode(
        _rollback_manifest(plan, key, version, manifest_checksum, previous, [file_rel])
    )
    files = [
        *restore,
        (file_rel, data),
        (layout.version_manifest(dataset, version_label, key, version), manifest_bytes),
        (layout.rollback_manifest(dataset, version_label, key, version), rollback_bytes),
    ]
    staged = _Staged(pd, manifest, manifest_checksum, manifest_bytes, version, adds_root=merkle_root)
    staged.restored, staged.held = restored, previous_bytes
    return _Prepared(staged, against_chain, files)


def _retained_copy_finding(
    lake: LakeStorage,
    dataset: str,
    version_label: str,
    key: str,
    current: Manifest,
    commit_point: bytes,
) -> dict[str, Any] | None:
    """What is wrong with the `_versions/` manifest of the version named by a commit point the chain
    agrees with: missing, or other bytes than that commit point's (which the run puts back there,
    exactly, as a restoration); None when it holds them."""
    rel = layout.version_manifest(dataset, version_label, key, current["partitionVersion"])
    held = lake.read_if_exists(rel)
    if held == commit_point:
        return None
    missing = held is None
    return {
        "kind": "version_manifest_missing" if missing else "version_manifest_altered",
        "where": rel,
        "detail": "the committed version's retained manifest was "
        + ("missing" if missing else "not the commit point's bytes"),
    }


def _trusted_ledger_in(loaded: LoadedRequest, pd: PartitionDecision) -> dict[str, Any] | None:
    """`{sequence, hash}` of the trusted ledger (`source.trustedLedger`, or the trusted Horizon's) when
    this partition holds it (pass 1 found it with that hash, `sources/ledger_archives.py`): on the
    chain with the manifest."""
    trusted = getattr(loaded.source, "trusted", None)
    part = pd.partition
    if trusted is None or not part.ledger or not part.start <= trusted.sequence < part.end:
        return None
    return {"sequence": trusted.sequence, "hash": trusted.hash}


def _gaps_in(loaded: LoadedRequest, pd: PartitionDecision) -> list[list[int]]:
    """The ledgers of a ledger partition its source lacks (a ledger archive read with `allowGaps`)."""
    gaps = getattr(loaded.source, "gaps", None)
    part = pd.partition
    if not gaps or not part.ledger:
        return []
    last = part.end - 1
    return [
        [max(low, part.start), min(high, last)] for low, high in gaps if low <= last and high >= part.start
    ]


def _restoration(
    env: Environment,
    plan: Plan,
    decisions: Decisions,
    pd: PartitionDecision,
    schema: pa.Schema,
    history: PartitionHistory | None,
    file_entry: FileEntry,
    merkle_root: str,
    data: bytes,
) -> tuple[Manifest, str, list[tuple[str, bytes]]] | None:
    """How to put back the chain's current version of a partition whose lake disagrees with its chain,
    when its exact bytes are at hand: its version manifest from `_versions/` (when it still has the
    checksum the chain committed) or rebuilt from this request (when that gives the same checksum),
    and each data file from the lake (when it verifies) or from this request's encoding (the same
    checksum). Returns (manifest, checksum, files to write, commit point last), or None."""
    current = history.current_version if history is not None else None
    if current is None:
        return None
    lake, key = env.lake, pd.partition.key
    dataset, version_label = plan.dataset, plan.version_label
    files: list[tuple[str, bytes]] = []
    version_rel = layout.version_manifest(dataset, version_label, key, current.version)
    manifest_bytes = lake.read_if_exists(version_rel)
    if manifest_bytes is None or manifests.checksum(manifest_bytes) != current.manifest_checksum:
        rebuilt = build_manifest(
            plan, decisions, pd, file_entry, merkle_root, current.version, current.previous_version,
            current.previous_manifest_checksum, schema,
        )  # fmt: skip
        manifest_bytes = manifests.encode(rebuilt)
        if manifests.checksum(manifest_bytes) != current.manifest_checksum:
            return None
        files.append((version_rel, manifest_bytes))
    manifest = manifests.decode_manifest(manifest_bytes)
    for entry in manifest["files"]:
        try:
            path = layout.data_file_path(dataset, version_label, key, entry.get("path"))
        except layout.OutsidePartition:
            return None
        found = lake.read_if_exists(path)
        if found is not None and prefixed(sha256_hex(found)) == entry["checksum"]:
            continue
        if entry["checksum"] != file_entry["checksum"]:
            return None
        files.append((path, data))
    files.append((layout.manifest(dataset, version_label, key), manifest_bytes))
    return manifest, current.manifest_checksum, files


def _partition_table(
    loaded: LoadedRequest,
    decisions: Decisions,
    pd: PartitionDecision,
    schema: pa.Schema,
    as_json: dict[str, bool],
) -> pa.Table:
    """The partition's added rows as one Arrow table, built a source batch of records at a time (the
    chunks joined into single arrays, so the encoded file is the one a single build gives)."""
    occurred = pd.add_occurred_us
    retention = pd.add_retention_us
    tables = []
    lo = 0
    for rows in loaded.fetch_chunks(pd.add_locators, source_batch_size()):
        hi = lo + len(rows)
        if pd.add_digests is not None:
            wrong = mismatched_digests(rows, pd.add_digests[lo:hi])
            if wrong:
                raise SourceChanged(
                    f"partition {pd.partition.key}: record {pd.add[lo + wrong[0]]!r} (and {len(wrong) - 1} "
                    "more in this batch) read again from the source is not the record that was decided on: "
                    "the source changed during the run; nothing was committed from this partition on"
                )
        tables.append(
            build_table(rows, pd.add[lo:hi], occurred[lo:hi], retention.slice(lo, hi - lo), schema, as_json)
        )
        lo = hi
    if not tables:
        return build_table([], [], occurred, retention, schema, as_json)
    if len(tables) == 1:
        return tables[0]
    # One column at a time, each column's pieces let go of once joined: the partition is held about
    # once, not twice.
    pieces = [[t.column(i).chunk(0) for t in tables] for i in range(len(schema))]
    del tables
    arrays = []
    for i in range(len(pieces)):
        arrays.append(pa.concat_arrays(pieces[i]))
        pieces[i] = []
    return pa.Table.from_arrays(arrays, schema=schema)


def _create_files(env: Environment, prepared: _Prepared) -> None:
    """Write a prepared partition's staged files (data file, version and rollback manifests; a
    restoration's files) in order, each create-only: any thread. Stops at the first name that holds
    other bytes, and at a restoration's commit point (put back only once its `partition_restored` event
    is on the chain, appended fenced by the calling thread), leaving it and the files after it in
    `prepared.files` for `_write_files` (on the calling thread: it reads the chain and the lease)."""
    if prepared.staged is not None and prepared.files:
        _reached("before_staging_writes", [prepared.staged.pd.partition.index])
    for i, (rel, data) in enumerate(prepared.files):
        if layout.split_manifest_path(rel) is not None:
            prepared.files = prepared.files[i:]
            return
        held = env.lake.create(rel, data)
        if held is not None and held != data:
            prepared.files = prepared.files[i:]
            return
    prepared.files = []


def _write_files(env: Environment, plan: Plan, lease: DatasetLease, prepared: _Prepared) -> None:
    """Write what `_create_files` left of a prepared partition's files (on the calling thread), then
    let go of their bytes.

    Data, version and rollback manifests are written create-only: never over another writer's file (a
    run frozen past its write lease, woken while the lease's new holder stages or has committed the
    same version number). The same bytes already there: nothing to write (a re-run). Other bytes:

    - at a data file's name (its content's checksum): no writer's content, a partial or corrupt file:
      replaced whole;
    - at a version or rollback manifest of a version the chain, read again now, says was committed:
      replaced only by the version manifest that commit named (a restoration), else `ChainMoved`
      (another writer committed that version since this run read the chain; nothing written);
    - at one of a version the chain has not committed (left by a run stopped before its commit: a
      crash, a failed run): replaced only while this run still holds the write lease (`DatasetBusy`
      otherwise, nothing written).

    A replacement goes over the very bytes judged, or not at all (`LakeStorage.swap`): another writer's
    since (this run frozen after its judgement) is left as it is (`ChainMoved`, nothing written)."""
    for rel, data in prepared.files:
        if layout.split_manifest_path(rel) is not None:
            assert prepared.staged is not None  # a restoration's commit point
            _swap_commit_point(env, rel, data, prepared.staged)
            continue
        held = env.lake.create(rel, data)
        if held is None or held == data:
            continue
        found = layout.split_version_file(rel)
        if found is not None:
            _may_replace(env, plan, lease, rel, data, *found)
        assert prepared.staged is not None  # (files are prepared for staged partitions only)
        failpoints.reached("before_replacing_staged", prepared.staged.pd.partition.index)
        # over the bytes judged, and only those: another writer's since (a run frozen after the judgement,
        # woken after the lease's new holder staged or committed this name) is never overwritten
        if not env.lake.swap(rel, data, held) and env.lake.read_if_exists(rel) != data:
            raise ChainMoved(
                f"{env.lake.uri(rel)} changed since this run judged it could replace it (was its write "
                "lease taken over?); nothing was overwritten and nothing of this batch was committed"
            )
    prepared.files = []


def _still_verified(env: Environment, plan: Plan, verified: CheckedChain, doing: str) -> ChainState:
    """The replay of `verified` (read at the start of a run, under its lease), or, when the run has
    appended since (its table's declaration), the chain read and verified again."""
    if env.audit.head(chain_key(plan.dataset, plan.version_label)) == verified.replayed.head:
        return verified.replayed
    return verified_chain(env, plan.dataset, plan.version_label, doing).replayed


def _may_replace(
    env: Environment,
    plan: Plan,
    lease: DatasetLease,
    rel: str,
    data: bytes,
    directory: str,
    kind: str,
    version: int,
) -> None:
    """`_write_files`' judgement of a version or rollback manifest at whose name other bytes are:
    returns when they may be replaced, else raises (nothing written)."""
    chain = verified_chain(env, plan.dataset, plan.version_label, f"run {plan.run_id}", sync=False).replayed
    history = chain.get(directory.rsplit("/", 1)[-1])
    committed = history.versions.get(version) if history is not None else None
    if committed is None:
        lease.renew()  # DatasetBusy: another run holds the lease, and may be staging this very version
        return
    if kind != "_versions" or manifests.checksum(data) != committed.manifest_checksum:
        raise ChainMoved(
            f"{env.lake.uri(rel)} holds version {version}, which another writer committed since this run "
            "read the audit chain (was its write lease taken over?); nothing was overwritten and nothing "
            "of this batch was committed"
        )


def _stage_batch(
    pool: ThreadPoolExecutor | None,
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    decisions: Decisions,
    pds: list[PartitionDecision],
    schema: pa.Schema,
    as_json: dict[str, bool],
    state: ChainState,
    lease: DatasetLease,
) -> list[_Staged]:
    """Stage a batch's partitions (compare the commit point with the chain; encode; when new, write the
    data file, version manifest and rollback manifest), in partition order.

    Without a pool, one partition after another, each complete before the next. With one, workers
    prepare and write up to the pool's size of partitions at once, and this thread takes their results
    in partition order and heals, one at a time, a commit or rollback a crash interrupted
    (`crash_windows.heal`): the chain is appended to in the same order either way. A partition whose
    commit point disagrees with its chain otherwise raises `LakeDisagreesWithChain`: nothing of the
    batch is committed.
    """
    lease.renew()  # still this run's (DatasetBusy if not), just before the batch writes anything
    histories = {pd.partition.key: state.get(pd.partition.key) for pd in pds}

    def prepare_and_write(pd: PartitionDecision) -> _Prepared:
        prepared = _prepare(env, loaded, plan, decisions, pd, schema, as_json, histories[pd.partition.key])
        if pool is not None:
            _create_files(env, prepared)
        if loaded.source is not None:
            release_memory()  # the partition's records and table, freed on this thread
        return prepared

    staged = []
    for prepared in _in_order(pool, prepare_and_write, pds):
        if prepared.staged is None:
            raise LakeDisagreesWithChain(prepared.lake)
        if prepared.lake.healable:
            heal(env, state, plan.dataset, plan.version_label, prepared.lake)
            prepared.staged.healed = True
        if prepared.staged.restored is not None:
            _record_restoration(env, state, plan, prepared.staged)
        if pool is None:  # after the healing, as ever
            _create_files(env, prepared)
        # what `_create_files` left: a name another file holds, a restoration's commit point
        _write_files(env, plan, lease, prepared)
        staged.append(prepared.staged)
    return staged


def _record_restoration(env: Environment, state: ChainState, plan: Plan, staged: _Staged) -> None:
    """Append the `partition_restored` event of a partition this run puts back to the chain's current
    version (before its commit point is put back: a crash after it is restored again by the next run)."""
    history = state.partitions[staged.pd.partition.key]
    current = history.current_version
    assert current is not None
    event = env.audit.append(
        chain_key(plan.dataset, plan.version_label),
        PARTITION_RESTORED,
        restoration_body(
            dict(current.event["partition"]), current.manifest_checksum, staged.restored, plan.run_id
        ),
        fence=state,
    )
    state.add(event)


def _commit_batch(
    pool: ThreadPoolExecutor | None,
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    batch: list[_Staged],
    state: ChainState,
    catalog_rows: dict[str, tuple[int, str]],
    existing: list[str],
    lease: DatasetLease,
) -> str | None:
    """Intent, commit points, audit events, post-write checks and catalog rows of a staged batch.
    Returns the failure text of the first partition whose post-write check failed, if any.

    With a pool, the batch's commit points are written, and its post-write checks run, up to the pool's
    size at once; audit events, undos, discrepancies and catalog rows follow in partition order."""
    indexes = [st.pd.partition.index for st in batch]
    commits = _write_commit_points(pool, env, plan, batch, state, lease)
    _append_commit_events(
        env,
        chain_key(plan.dataset, plan.version_label),
        [(st.manifest, st.manifest_checksum) for st in commits],
        state,
    )
    for st in batch:
        current = state.partitions[st.pd.partition.key].current_version
        assert current is not None and current.manifest_checksum == st.manifest_checksum
        st.event = dict(current.event)
    _reached("after_event", indexes)
    return _check_and_record(pool, env, loaded, plan, batch, state, catalog_rows, existing)


def _write_commit_points(
    pool: ThreadPoolExecutor | None,
    env: Environment,
    plan: Plan,
    batch: list[_Staged],
    state: ChainState,
    lease: DatasetLease,
) -> list[_Staged]:
    """The commit steps up to the commit point of a staged batch: its files made durable, the intent
    on the chain, then the commit points of its new versions, made durable. Returns those partitions."""
    lake = env.lake
    ckey = chain_key(plan.dataset, plan.version_label)
    indexes = [st.pd.partition.index for st in batch]
    commits = [st for st in batch if st.manifest_bytes is not None]
    lake.sync()  # data files and manifests are durable before any commit point names them
    _reached("after_data_files", indexes)
    if commits:
        # Still this run's lease (DatasetBusy if not): a run frozen after staging, woken while the
        # lease's new holder has replaced what it staged and not yet appended anything, would otherwise
        # record an intent (and commit) on a chain nobody moved. Once the holder has appended, the
        # append's fence refuses (ChainMoved).
        lease.renew()
        intent = env.audit.append(
            ckey,
            PARTITION_COMMIT_INTENT,
            commit_intent_body(
                plan.run_id, [commit_intent_entry(st.manifest, st.manifest_checksum) for st in commits]
            ),
            fence=state,  # on the lake this run decided from, or nothing (a writer that lost its lease)
        )
        state.add(intent)
    _reached("before_commit", indexes)
    if commits:  # still the chain this run decided on (a writer paused past its lease stops here)
        env.audit.check_fence(ckey, state)
        _reached("after_fence_check", indexes)
    for _ in _in_order(pool, lambda st: _write_commit_point(env, plan, st), commits):
        pass
    lake.sync()  # commit points are durable before their audit events
    _reached("after_commit", indexes)
    return commits


def _append_commit_events(
    env: Environment, ckey: str, commits: list[tuple[Manifest, str]], state: ChainState
) -> list[dict[str, Any]]:
    """The `partition_committed` events of committed (manifest, manifest checksum) pairs, in one
    append (group commit), replayed into `state`."""
    events = env.audit.append_many(
        ckey,
        [(PARTITION_COMMITTED, commit_body(manifest, checksum, env.lake)) for manifest, checksum in commits],
        fence=state,
    )
    for event in events:
        state.add(event)
    return events


def _check_and_record(
    pool: ThreadPoolExecutor | None,
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    batch: list[_Staged],
    state: ChainState,
    catalog_rows: dict[str, tuple[int, str]],
    existing: list[str],
) -> str | None:
    """Post-write checks of a batch whose events are on the chain (a failing partition is undone and a
    discrepancy recorded), then the catalog rows of the others. Returns the first failure's text."""
    lake = env.lake
    dataset, version_label = plan.dataset, plan.version_label
    indexes = [st.pd.partition.index for st in batch]
    failure = None
    recorded = []

    checks = check_batch(
        env,
        plan,
        [
            CheckItem(st.manifest, st.pd.add, st.status == "committed", not st.files_verified, st.adds_root)
            for st in batch
        ],
        existing,
        pool,
    )
    for st, result in zip(batch, checks, strict=True):
        st.check = result
        key = st.pd.partition.key
        if st.check["status"] != "ok":
            if st.status == "committed":
                step = plan_undo(env, state, dataset, version_label, key)
                apply_undos(
                    env,
                    state,
                    dataset,
                    version_label,
                    [step],
                    reason="post_write_check_failed",
                    run_id=plan.run_id,
                )
            env.catalog.record_discrepancy(
                run_id=plan.run_id,
                dataset=dataset,
                version_label=version_label,
                partition_key=key,
                kind="post_write_check",
                detail=st.check,
            )
            failure = failure or f"post-write check failed for partition {key}: " + "; ".join(
                st.check["findings"]
            )
            continue
        if catalog_rows.get(key) != (st.version, st.manifest_checksum):
            recorded.append(
                catalog_row(
                    st.manifest,
                    st.manifest_checksum,
                    lake,
                    _event_hash(st),
                    loaded.source_uri,
                    loaded.source_kind,
                )
            )
            st.healed = st.healed or st.status != "committed"
    env.catalog.record_partition_versions(recorded)
    for row in recorded:
        catalog_rows[row["partition_key"]] = (row["version"], row["manifest_checksum"])
    _reached("after_catalog", indexes)
    return failure


def _write_commit_point(env: Environment, plan: Plan, st: _Staged) -> None:
    key = st.pd.partition.key
    assert st.manifest_bytes is not None  # only new versions get a commit point
    _swap_commit_point(env, layout.manifest(plan.dataset, plan.version_label, key), st.manifest_bytes, st)


def _swap_commit_point(env: Environment, rel: str, data: bytes, st: _Staged) -> None:
    """Put a partition's commit point over the one this run read (or restored), and only over that:
    a run frozen after its last chain check, woken after another writer committed the partition, must
    not replace the new holder's commit point (the store or, locally, the directory lock refuses).
    `ChainMoved` otherwise, naming the partition: nothing written."""
    if not env.lake.swap(rel, data, st.held):
        raise ChainMoved(
            f"{env.lake.uri(rel)} is no longer the commit point this run read: another writer changed "
            f"partition {st.pd.partition.key} since (was this run's write lease taken over?); this run "
            "did not write it"
        )
    st.held = data


def _event_hash(st: _Staged) -> str:
    assert st.event is not None  # set for every partition of a committed batch
    return str(st.event["chain"]["event_hash"])


def _reached(point: str, indexes: list[int]) -> None:
    for i in indexes:
        failpoints.reached(point, i)


def _check_of(st: _Staged) -> dict[str, Any]:
    """The post-write check of a staged partition (every staged partition of a committed batch has one)."""
    assert st.check is not None, st.pd.partition.key
    return st.check


def _outcome(env: Environment, st: _Staged) -> dict[str, Any]:
    lake, m = env.lake, st.manifest
    dataset, version_label, key = m["dataset"], m["versionLabel"], st.pd.partition.key
    failed = st.check is not None and st.check["status"] != "ok"
    outcome = {
        **st.pd.partition.to_json(),
        "status": "failed" if failed else st.status,
        "version": st.version,
        "files": [
            {
                "uri": lake.uri(f["path"]),
                "checksum": f["checksum"],
                "rowCount": f["rowCount"],
                "byteSize": f["byteSize"],
            }
            for f in m["files"]
        ],
        "recordCount": m["recordCount"],
        "merkleRoot": m["merkleRoot"],
        "manifest": lake.uri(layout.manifest(dataset, version_label, key)),
        "manifestChecksum": st.manifest_checksum,
        "rollbackManifest": lake.uri(layout.rollback_manifest(dataset, version_label, key, st.version)),
        "eventHash": st.event["chain"]["event_hash"] if st.event else None,
    }
    if st.healed:
        outcome["healed"] = True
    if st.restored is not None:
        outcome["restored"] = st.restored
    return outcome


# --- the same commit protocol, one phase at a time --------------------------------------------------
#
# `execute` runs every commit step of a batch before the next batch. An orchestrator that shows the
# steps (the Dagster asset's ops) runs them phase by phase over all the run's partitions instead:
#
#   emit_partitions        data files, version and rollback manifests, the intent, the commit points
#   append_commit_events   the `partition_committed` events of those commit points
#   reconcile_partitions   post-write checks (a failing partition is undone), catalog rows, the run row
#
# Between the phases only small handles pass (`Emission`: per partition its key, version and manifest
# checksum). Each phase takes the dataset's lock again and re-reads the chain, so a phase that never
# runs (a crash, a terminated run) leaves exactly a crash window of the commit protocol: commit points
# under an open intent without their events, or events without their catalog rows, which the next run
# or `pcbo verify --repair` completes. A phase run twice (a retry) does nothing twice.


@dataclass(frozen=True)
class EmittedPartition:
    """One partition after `emit_partitions`: what its commit point is now."""

    key: str
    index: int
    version: int
    manifest_checksum: str
    #: committed (a new version), unchanged (already committed) or restored (put back to the chain's)
    status: str
    healed: bool = False
    #: Its committed files were read and checked against the manifest while staging.
    files_verified: bool = False
    restored: dict[str, Any] | None = None


@dataclass(frozen=True)
class Emission:
    """The handle `emit_partitions` gives the next phases: small, plain and picklable."""

    run_id: str
    dataset: str
    version_label: str
    plan_hash: str
    decision_hash: str
    partitions: tuple[EmittedPartition, ...]
    #: Why the run stopped before the partitions after these, or None.
    refusal: Refusal | None = None

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.partitions]

    def count(self, status: str) -> int:
        return sum(p.status == status for p in self.partitions)


def emit_partitions(
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    decisions: Decisions,
    progress: Progress | None = None,
    parallel: int | None = None,
) -> Emission:
    """Parquet emission up to the commit point, for every partition of the run: each partition's commit
    point compared with its chain (a crash window healed, a partition whose lake disagrees stops the
    run there: `Emission.refusal`), its data file, version and rollback manifests written, the batch's
    intent appended, then its commit point. The caller has evaluated the request and checked the gates.
    """
    workers = _workers(env, parallel)
    # before anything is written
    env.catalog.check_run_id(
        plan.run_id, plan.dataset, plan.version_label, (plan.plan_hash, decisions.decision_hash)
    )
    schema, as_json = loaded.schema_of(decisions.partitions)
    emitted: list[EmittedPartition] = []
    refusal: Refusal | None = None
    with (
        env.dataset_lock(plan.dataset, plan.version_label, plan.run_id) as lease,
        _worker_pool(workers) as pool,
    ):
        _refuse_links_before_writing(env, lease, plan, decisions, dict(loaded.request.metadata))
        verified = verified_chain(env, plan.dataset, plan.version_label, f"run {plan.run_id}")
        # Issue 17: where the table is published, recorded (and checked) under the lease before the
        # lake is written; `reconcile_partitions` publishes it.
        iceberg_publication.publisher_for(
            env,
            loaded.request.table,
            plan.dataset,
            plan.version_label,
            verified=verified.replayed,
            plan=plan,
            columns=schema.names,
            field_of=lambda column: loaded.field_of(column, decisions.partitions),
        )
        _start_run(env, plan, decisions, dict(loaded.request.metadata))
        state = _still_verified(env, plan, verified, f"run {plan.run_id}")
        for pds in _commit_batches(decisions.partitions, COMMIT_BATCH):
            try:
                batch = _stage_batch(pool, env, loaded, plan, decisions, pds, schema, as_json, state, lease)
            except (LakeDisagreesWithChain, SourceChanged) as exc:
                refusal = _refuse(env, plan, exc)
                break
            del pds
            _write_commit_points(pool, env, plan, batch, state, lease)
            emitted.extend(
                EmittedPartition(
                    key=st.pd.partition.key,
                    index=st.pd.partition.index,
                    version=st.version,
                    manifest_checksum=st.manifest_checksum,
                    status=st.status,
                    healed=st.healed,
                    files_verified=st.files_verified,
                    restored=st.restored,
                )
                for st in batch
            )
            if progress:
                progress(len(batch))
    return Emission(
        plan.run_id,
        plan.dataset,
        plan.version_label,
        plan.plan_hash,
        decisions.decision_hash,
        tuple(emitted),
        refusal,
    )


def append_commit_events(env: Environment, emission: Emission) -> dict[str, Any]:
    """The audit chain append: the `partition_committed` event of every commit point `emit_partitions`
    wrote, in commit batches (one append each), for exactly the commit points that are still what an
    open intent of this run names. A commit point already on the chain (this phase run again, or another
    run healed it) is left alone; one that changed since is not appended (`changed`: the next run or
    `pcbo verify` says what it is now)."""
    dataset, version_label = emission.dataset, emission.version_label
    ckey = chain_key(dataset, version_label)
    appended: list[str] = []
    on_chain: list[str] = []
    changed: list[dict[str, Any]] = []
    with env.dataset_lock(dataset, version_label, emission.run_id):
        state = verified_chain(env, dataset, version_label, f"run {emission.run_id}").replayed
        pending: list[tuple[EmittedPartition, Manifest]] = []
        for p in emission.partitions:
            if p.status != "committed":
                continue
            history = state.get(p.key)
            if history is not None and history.current_checksum == p.manifest_checksum:
                on_chain.append(p.key)
                continue
            comparison = compare(
                history,
                dataset,
                version_label,
                p.key,
                env.lake.read_if_exists(layout.manifest(dataset, version_label, p.key)),
            )
            intent = comparison.intent
            if (
                comparison.verdict != "heal_commit"
                or comparison.manifest_checksum != p.manifest_checksum
                or not isinstance(intent, CommitIntent)
                or intent.run_id != emission.run_id
            ):
                changed.append({"key": p.key, "detail": comparison.detail})
                continue
            assert comparison.manifest is not None
            pending.append((p, comparison.manifest))
        for start in range(0, len(pending), COMMIT_BATCH):
            chunk = pending[start : start + COMMIT_BATCH]
            _append_commit_events(
                env, ckey, [(manifest, p.manifest_checksum) for p, manifest in chunk], state
            )
            appended.extend(p.key for p, _ in chunk)
            _reached("after_event", [p.index for p, _ in chunk])
    published = publish(env, ckey)  # deliver, then sign and witness a checkpoint of the chain
    head = env.catalog.chain_heads().get(ckey)
    return {
        "appended": appended,
        "alreadyOnChain": on_chain,
        "changed": changed,
        "chainKey": ckey,
        "chainHead": head[1] if head else None,
        "chainLength": head[0] + 1 if head else 0,
        "auditDelivery": published["auditDelivery"],
        "checkpoint": published["checkpoint"],
    }


def reconcile_partitions(
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    decisions: Decisions,
    emission: Emission,
    progress: Progress | None = None,
    parallel: int | None = None,
) -> dict[str, Any]:
    """Reconciliation of what `emit_partitions` committed and `append_commit_events` put on the chain:
    each partition's committed file read back (checksum, rows against the decided adds, Merkle root
    recomputed, every row against the policy; a failing partition is undone by a rollback and recorded
    as a discrepancy), then the catalog rows and the run's row. Returns the execute document; raises
    `ExecuteFailed` (with the document) when a check failed or emission was refused."""
    workers = _workers(env, parallel)
    dataset, version_label = plan.dataset, plan.version_label
    existing = list(loaded.request.existingTargetIds)
    emitted = {p.key: p for p in emission.partitions}
    results: list[dict[str, Any]] = []
    reconciliation: list[dict[str, Any]] = []
    failure: str | None = None
    failed_key: str | None = None
    with (
        env.dataset_lock(dataset, version_label, plan.run_id) as lease,
        _worker_pool(workers) as pool,
    ):
        state = verified_chain(env, dataset, version_label, f"run {plan.run_id}").replayed
        catalog_rows = _catalog_versions(env, dataset, version_label)
        todo = (pd for pd in decisions.partitions if pd.partition.key in emitted)
        for pds in _commit_batches(todo, COMMIT_BATCH):
            restaged = [(pd, _restaged(env, state, plan, pd, emitted[pd.partition.key])) for pd in pds]
            del pds
            batch = [st for _, st in restaged if st is not None]
            missing = [pd.partition.key for pd, st in restaged if st is None]
            if missing:
                key = missing[0]
                failure = failure or (
                    f"partition {dataset}/{version_label}/{key}: its commit point is not the version the "
                    "audit chain says is current (its commit event was not appended, or another run "
                    "changed it since): run `pcbo verify` (and `pcbo verify --repair` for a crash window)"
                )
                failed_key = failed_key or key
            batch_failure = _check_and_record(pool, env, loaded, plan, batch, state, catalog_rows, existing)
            if batch_failure and not failure:
                failure = batch_failure
                failed_key = next(st.pd.partition.key for st in batch if _check_of(st)["status"] != "ok")
            for st in batch:
                results.append(_outcome(env, st))
                reconciliation.append(_check_of(st))
            if progress:
                progress(len(batch))
            lease.renew()
        refusal = emission.refusal
        kind = POST_WRITE_CHECK
        if refusal is not None and failure is None:
            failure, failed_key, kind = refusal.message, refusal.partition_key, refusal.kind
        # Issue 17: the table follows the chain as reconciliation left it (a crash before is healed).
        publisher = iceberg_publication.publisher_for(
            env, loaded.request.table, dataset, version_label, verified=state, plan=plan
        )
        if publisher is not None and not failure:  # (`state` follows the undos the checks appended)
            failure = iceberg_publication.publish_or_refuse(publisher, state, plan.run_id)
            kind = TABLE_PUBLICATION_REFUSED
        final, summary = _summary(results, failure, False)
        env.catalog.finish_run(plan.run_id, final, summary)
    document = _document(env, plan, decisions, final, summary, results, reconciliation, failure, publisher)
    _announce(env, plan, results)
    if failure:
        raise ExecuteFailed(failure, document, kind, failed_key)
    return document


def _restaged(
    env: Environment, state: ChainState, plan: Plan, pd: PartitionDecision, emitted: EmittedPartition
) -> _Staged | None:
    """A partition `emit_partitions` staged, as the reconciliation phase needs it: its manifest read
    from the lake with the emitted checksum, and its commit event from the chain. None when the chain's
    current version of the partition is not the emitted one, or its manifest is gone."""
    history = state.get(emitted.key)
    current = history.current_version if history is not None else None
    if current is None or current.manifest_checksum != emitted.manifest_checksum:
        return None
    data = None
    for rel in (
        layout.version_manifest(plan.dataset, plan.version_label, emitted.key, emitted.version),
        layout.manifest(plan.dataset, plan.version_label, emitted.key),
    ):
        data = env.lake.read_if_exists(rel)
        if data is not None and manifests.checksum(data) == emitted.manifest_checksum:
            break
        data = None
    if data is None:
        return None
    staged = _Staged(
        pd,
        manifests.decode_manifest(data),
        emitted.manifest_checksum,
        data if emitted.status == "committed" else None,
        emitted.version,
        event=dict(current.event),
        healed=emitted.healed,
        restored=emitted.restored,
        files_verified=emitted.files_verified,
    )
    return staged

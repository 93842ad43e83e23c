"""Undo committed partitions (CONTRACT section 4): what to undo comes from the audit chain, never
from what the lake's own files claim.

Undoing version N of a partition restores the version N replaced (the chain's commit event names it,
with its manifest checksum) as the commit point, or removes the commit point when N replaced none;
deletes the data files only N used (never a file of the restored version's lineage, which a
later rollback could make current: a file N shares with an older version by name, its content
having come back, stays); appends a `partition_rolled_back` event; marks the catalog.

Before anything is touched:
- the partition's commit point must be the chain's current version (a lake that disagrees with the
  chain is a finding, never rolled back over: `pcbo verify` says what is wrong);
- the version to restore must be the one the chain committed: its `_versions/vNNNNNN.json` has the
  checksum of its commit event, and every data file it names is inside the partition and has the
  checksum its manifest gives (an old version is what a rollback makes current: a corrupt one is
  refused before anything is removed);
- every path read from a manifest is one of the partition's own data files
  (`lake.layout.data_file_path`); the files to remove are computed from the two chain-verified
  manifests, and the rollback manifest (`_rollback/vNNNNNN.json`) must say the same;
- a `partition_rollback_intent` naming, per partition, the version undone and the version restored
  (with both checksums) is appended to the chain. A rollback killed at any instant after it is
  completed by running the same rollback again (or `pcbo verify --repair`): the lake then holds
  exactly one of the two states the intent names.

What is undone:
- `run_id`: every partition whose current version that run wrote, repeatedly, until the current
  version is no longer the run's (a run that wrote versions on top of its own is undone entirely).
  A second request finds nothing of the run current: a no-op. An unknown run id is invalid input.
- `partition_key`: that partition's current version, unless the last thing the chain says of it is a
  rollback (a second request is a no-op, not one more version peeled off). `version=N` undoes version
  N when it is current: the way to roll back further on purpose. An unknown partition is invalid input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pcbo_dagster.audit.log import ChainMoved
from pcbo_dagster.core.canonical import prefixed, sha256_hex
from pcbo_dagster.core.chain_state import (
    PARTITION_ROLLBACK_INTENT,
    PARTITION_ROLLED_BACK,
    ChainState,
    PartitionHistory,
)
from pcbo_dagster.core.errors import IntegrityError, InvalidInput
from pcbo_dagster.core.recorded_text import check_reason
from pcbo_dagster.engine import failpoints, lake_changes
from pcbo_dagster.engine.crash_windows import (
    LakeDisagreesWithChain,
    catalog_rolled_back,
    compare,
    heal,
    heal_catalog_lag,
    lineage_files,
)
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.events import (
    chain_key,
    rollback_body,
    rollback_intent_body,
    rollback_intent_entry,
)
from pcbo_dagster.engine.partition_checks import verified_chain
from pcbo_dagster.engine.transparency_log import checkpoint_places, publish
from pcbo_dagster.lake import layout, manifests
from pcbo_dagster.lake.layout import OutsidePartition
from pcbo_dagster.lake.manifests import Manifest
from pcbo_dagster.tables import iceberg_publication


class RollbackRefused(IntegrityError):
    """A rollback that would restore or remove something the chain does not vouch for."""

    def __init__(self, where: str, kind: str, detail: str) -> None:
        self.finding = {"kind": kind, "where": where, "detail": detail}
        super().__init__(f"rollback of {where} refused ({kind}): {detail}; nothing was changed")


@dataclass
class UndoStep:
    """Undoing one partition's current version, checked against the chain and ready to apply."""

    key: str
    version: int
    manifest: Manifest
    manifest_checksum: str
    partition: dict[str, Any]  # the undone version's `partition` object, from its commit event
    restore_version: int | None
    restore_bytes: bytes | None
    restore_checksum: str | None
    remove_files: list[str]
    #: The commit point's bytes as the step was planned from: what its move replaces, and only that.
    held: bytes


def plan_undo(env: Environment, state: ChainState, dataset: str, version_label: str, key: str) -> UndoStep:
    """Check undoing `key`'s current version against the chain (see the module doc); `RollbackRefused`
    or `LakeDisagreesWithChain` when it may not be done."""
    lake = env.lake
    where = f"{dataset}/{version_label}/{key}"
    history = state.get(key)
    held = lake.read_if_exists(layout.manifest(dataset, version_label, key))
    comparison = compare(history, dataset, version_label, key, held)
    if comparison.verdict != "agrees":
        raise LakeDisagreesWithChain(comparison)
    assert (
        history is not None
        and held is not None
        and comparison.manifest is not None
        and comparison.manifest_checksum is not None
    )
    current = history.current_version
    assert current is not None
    manifest = comparison.manifest
    current_files = _confined_files(dataset, version_label, key, manifest, where)
    restore_bytes = None
    restore_files: set[str] = set()
    if current.previous_version is not None:
        known = history.versions.get(current.previous_version)
        if known is None or known.manifest_checksum != current.previous_manifest_checksum:
            raise RollbackRefused(
                where,
                "restore_version_not_on_chain",
                f"version {current.previous_version} "
                "that this version replaced is not committed on the chain as recorded",
            )
        rel = layout.version_manifest(dataset, version_label, key, current.previous_version)
        restore_bytes = lake.read_if_exists(rel)
        if restore_bytes is None or manifests.checksum(restore_bytes) != known.manifest_checksum:
            raise RollbackRefused(
                where,
                "restore_version_altered",
                f"{rel} is not the manifest the chain "
                f"committed as version {known.version} ({known.manifest_checksum})",
            )
        restore = manifests.decode_manifest(restore_bytes)
        restore_files = set(_confined_files(dataset, version_label, key, restore, where))
        for entry in restore["files"]:
            data = lake.read_if_exists(entry["path"])
            if (
                data is None
                or len(data) != entry["byteSize"]
                or prefixed(sha256_hex(data)) != entry["checksum"]
            ):
                raise RollbackRefused(
                    where,
                    "restore_version_corrupt",
                    f"{entry['path']} of version {known.version} is missing or differs from its manifest",
                )
    remove = sorted(p for p in current_files if p not in restore_files)
    _check_rollback_manifest(
        env,
        dataset,
        version_label,
        key,
        current.version,
        comparison.manifest_checksum,
        current.previous_version,
        remove,
        where,
    )
    return UndoStep(
        key=key,
        version=current.version,
        manifest=manifest,
        manifest_checksum=comparison.manifest_checksum,
        partition=dict(current.event["partition"]),
        restore_version=current.previous_version,
        restore_bytes=restore_bytes,
        restore_checksum=current.previous_manifest_checksum,
        remove_files=remove,
        held=held,
    )


def _confined_files(dataset: str, version_label: str, key: str, manifest: Manifest, where: str) -> list[str]:
    try:
        return [layout.data_file_path(dataset, version_label, key, f.get("path")) for f in manifest["files"]]
    except (OutsidePartition, AttributeError, TypeError) as exc:
        raise RollbackRefused(where, "path_outside_partition", str(exc)) from None


def _check_rollback_manifest(
    env: Environment,
    dataset: str,
    version_label: str,
    key: str,
    version: int,
    checksum: str,
    restore_version: int | None,
    remove: list[str],
    where: str,
) -> None:
    rel = layout.rollback_manifest(dataset, version_label, key, version)
    data = env.lake.read_if_exists(rel)
    if not manifests.rollback_manifest_agrees(
        data, dataset, version_label, key, version, checksum, restore_version, remove
    ):
        raise RollbackRefused(
            where,
            "rollback_manifest_mismatch",
            f"{rel} is missing or does not match the "
            "chain (the version it undoes, the one it restores, the files it removes)",
        )


def apply_undos(
    env: Environment,
    state: ChainState,
    dataset: str,
    version_label: str,
    steps: list[UndoStep],
    *,
    reason: str,
    run_id: str | None,
) -> list[dict[str, Any]]:
    """Intent, lake, events, catalog for checked `steps`; returns one outcome per step."""
    if not steps:
        return []
    ckey = chain_key(dataset, version_label)
    lake = env.lake
    removals = []
    for step in steps:
        history = state.get(step.key)
        kept = (
            set() if history is None else lineage_files(history, dataset, version_label, step.restore_version)
        )
        removals.append([rel for rel in step.remove_files if rel not in kept])
    # every commit point it moves and file it removes, before anything is written: a link at or on the
    # way to one refuses the rollback with no intent appended and nothing moved (`LakeStorage.refuse_links`)
    lake.refuse_links(
        [layout.manifest(dataset, version_label, step.key) for step in steps]
        + [rel for remove in removals for rel in remove]
    )
    intent = env.audit.append(
        ckey,
        PARTITION_ROLLBACK_INTENT,
        rollback_intent_body(
            run_id,
            reason,
            [
                rollback_intent_entry(
                    s.key, s.version, s.manifest_checksum, s.restore_version, s.restore_checksum
                )
                for s in steps
            ],
        ),
        fence=state,
    )
    state.add(intent)
    failpoints.reached("rollback_after_intent", 0)
    env.audit.check_fence(ckey, state)  # still the chain it decided on (a writer paused past its lease)
    failpoints.reached("rollback_after_fence_check", 0)
    for i, step in enumerate(steps):
        # moved (or removed) only from the commit point the step was planned from: a rollback frozen
        # after its chain check, woken after another writer committed the partition, moves nothing
        manifest_rel = layout.manifest(dataset, version_label, step.key)
        if not lake.swap(manifest_rel, step.restore_bytes, step.held, durable=True):
            raise ChainMoved(
                f"{lake.uri(manifest_rel)} is no longer the commit point this rollback planned from: "
                f"another writer changed partition {step.key} since (was this run's write lease taken "
                "over?); this rollback did not move it"
            )
        failpoints.reached("rollback_after_commit_point", i)
    lake.sync()
    for i, remove in enumerate(removals):
        for rel in remove:
            lake.delete(rel)
        failpoints.reached("rollback_after_remove", i)
    events = env.audit.append_many(
        ckey,
        [
            (
                PARTITION_ROLLED_BACK,
                rollback_body(
                    step.partition,
                    step.manifest_checksum,
                    step.restore_version,
                    step.restore_checksum,
                    reason,
                    run_id,
                ),
            )
            for step in steps
        ],
        fence=state,
    )
    failpoints.reached("rollback_after_event", 0)
    outcomes = []
    for step, event in zip(steps, events, strict=True):
        state.add(event)
        catalog_rolled_back(
            env, state.partitions[step.key], dataset, version_label, step.version, step.restore_version
        )
        outcomes.append(
            {
                "key": step.key,
                "status": "rolled_back",
                "version": step.version,
                "restoredVersion": step.restore_version,
                "eventHash": event["chain"]["event_hash"],
            }
        )
    return outcomes


def heal_open_intents(
    env: Environment, state: ChainState, dataset: str, version_label: str
) -> list[dict[str, Any]]:
    """Complete the commits and rollbacks a crash interrupted (the crash windows only; see
    `engine/crash_windows.py`), catalog included. Returns what was healed."""
    healed = []
    for key, history in sorted(state.partitions.items()):
        if history.open_intent is None:
            continue
        comparison = compare(
            history,
            dataset,
            version_label,
            key,
            env.lake.read_if_exists(layout.manifest(dataset, version_label, key)),
        )
        if comparison.healable:
            event = heal(env, state, dataset, version_label, comparison)
            kind = (
                "rollback_event_appended" if comparison.verdict == "heal_rollback" else "audit_event_appended"
            )
            healed.append(
                {"kind": kind, "where": comparison.where, "eventHash": event["chain"]["event_hash"]}
            )
    return healed


def rollback(
    env: Environment,
    dataset: str,
    version_label: str,
    *,
    run_id: str | None = None,
    partition_key: str | None = None,
    version: int | None = None,
    reason: str = "requested",
    partition_keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Roll back what `run_id` wrote (optionally only `partition_key`), or one partition (see the
    module doc), or each of `partition_keys` (as one partition each, under one lock and one reading of
    the chain). Invalid input (exit 2, nothing written) for an unknown run, partition or version, or
    a reason that is not one printable line (`core/recorded_text.py`)."""
    check_reason(reason)
    if partition_keys is not None:
        if run_id is not None or partition_key is not None or version is not None or not partition_keys:
            raise InvalidInput(
                "partitions", "partition keys are rolled back alone (no run id, key or version)"
            )
        for key in partition_keys:
            try:
                layout.check_partition(dataset, version_label, key)
            except OutsidePartition as exc:
                raise InvalidInput("partitions", str(exc)) from None
        partition_key = partition_keys[0]
    if run_id is None and partition_key is None:
        raise InvalidInput("runId", "give a run id or a partition key to roll back")
    if version is not None and (partition_key is None or run_id is not None):
        raise InvalidInput("version", "a version is rolled back with a partition key and no run id")
    try:
        layout.check_names(dataset, version_label)
    except OutsidePartition as exc:
        raise InvalidInput("dataset", str(exc)) from None
    if partition_key is not None:
        try:
            layout.check_partition(dataset, version_label, partition_key)
        except OutsidePartition as exc:
            raise InvalidInput("partition", str(exc)) from None
    ckey = chain_key(dataset, version_label)
    # The input is checked before the lock on a chain that verifies (read as a reader holding no lock
    # reads it): a forged one is refused as such (exit 1), never made to say the input is unknown
    state = verified_chain(env, dataset, version_label, f"rollback of {ckey}", sync=False).replayed
    if version is None:  # issue 15: what a run applied to a SQL table (engine/sql_rollback.py)
        from pcbo_dagster.engine.sql_rollback import rollback_sql

        undone = rollback_sql(
            env, state, dataset, version_label, run_id=run_id, partition_key=partition_key, reason=reason
        )
        if undone is not None:
            return undone
    if run_id is not None and run_id not in state.run_ids() and env.catalog.get_run(run_id) is None:
        raise InvalidInput("runId", f"no run {run_id!r} wrote to {ckey}")
    for key in partition_keys or ([partition_key] if partition_key is not None else []):
        if state.get(key) is None:
            raise InvalidInput("partition", f"{ckey} has no partition {key!r} on its audit chain")
    results: list[dict[str, Any]] = []
    with env.dataset_lock(dataset, version_label):
        # its checkpoint's place, before anything is written (the partitions' are checked before each
        # intent: `apply_undos`): a link there refuses the rollback now, not once it is done
        env.lake.refuse_links(checkpoint_places(env, dataset, version_label))
        # again, under the lock, and verified: an event edited before the head would make the
        # rollback undo what no run wrote
        state = verified_chain(env, dataset, version_label, f"rollback of {ckey}").replayed
        healed = heal_open_intents(env, state, dataset, version_label)
        healed += [
            {"kind": "catalog_rolled_back", "where": f"{ckey}/{key}"}
            for key in heal_catalog_lag(env, state, dataset, version_label)
        ]
        if run_id is not None:
            while True:
                keys = [
                    k
                    for k, h in sorted(state.partitions.items())
                    if (partition_key in (None, k))
                    and h.current_version is not None
                    and h.current_version.run_id == run_id
                ]
                if not keys:
                    break
                steps = [plan_undo(env, state, dataset, version_label, k) for k in keys]
                results += apply_undos(
                    env, state, dataset, version_label, steps, reason=reason, run_id=run_id
                )
        else:
            assert partition_key is not None
            for key in partition_keys or [partition_key]:
                history = state.partitions[key]
                skip = _noop_reason(history, version)
                if skip is not None:
                    results.append({"key": key, "status": "noop", "detail": skip})
                else:
                    step = plan_undo(env, state, dataset, version_label, key)
                    # The events name the run whose version is undone (as a rollback by run does), so
                    # that run's evidence package shows the undo.
                    undone_run = history.versions[step.version].run_id
                    results += apply_undos(
                        env, state, dataset, version_label, [step], reason=reason, run_id=undone_run
                    )
        # Issue 17: the recorded Iceberg table follows (after the events; a crash before is healed). A
        # refusal (the table diverged) leaves the rollback done: its checkpoint is published and its
        # changes announced all the same, and it fails (exit 1) with its document.
        publisher = iceberg_publication.publisher_for(env, None, dataset, version_label, verified=state)
        refused = None
        if publisher is not None and iceberg_publication.publish_or_refuse(
            publisher, state, run_id, reason="rollback"
        ):
            refused = iceberg_publication.PublicationRefused(publisher.where, publisher.refused)
    published = publish(env, ckey)
    lake_changes.announce(
        env,
        dataset,
        version_label,
        [r["key"] for r in results if r["status"] == "rolled_back"]
        + [h["where"].rsplit("/", 1)[-1] for h in healed if "where" in h],
        lake_changes.ROLLED_BACK,
    )
    document = rollback_document(
        dataset, version_label, run_id, partition_key, results, healed, published["checkpoint"]
    )
    if publisher is not None:
        document["table"] = publisher.summary()
    if refused is not None:
        refused.document = document
        raise refused
    return document


def rollback_document(
    dataset: str,
    version_label: str,
    run_id: str | None,
    partition_key: str | None,
    results: list[dict[str, Any]],
    healed: list[dict[str, Any]],
    checkpoint: dict[str, Any] | None,
    noop: str = "nothing of the run is current",
) -> dict[str, Any]:
    """What `pcbo rollback` prints, of a lake's partitions and of a SQL table's alike: `results` per
    partition (a named partition nothing happened to is listed as a noop, `noop` saying why)."""
    done = sum(1 for r in results if r["status"] == "rolled_back")
    if not results and partition_key is not None:
        results = [{"key": partition_key, "status": "noop", "detail": noop}]
    return {
        "status": "rolled_back" if done else "noop",
        "dataset": dataset,
        "versionLabel": version_label,
        "runId": run_id,
        "partitionKey": partition_key,
        "rolledBack": done,
        "partitions": results,
        "healed": healed,
        "checkpoint": checkpoint,
    }


def _noop_reason(history: PartitionHistory, version: int | None) -> str | None:
    """Why rolling back `history` (its current version, or `version`) changes nothing, or None."""
    if version is not None:
        if version not in history.versions:
            raise InvalidInput("version", f"partition {history.key} has no version {version} on its chain")
        if history.current != version:
            if version not in history.undone_versions():
                raise InvalidInput(
                    "version",
                    f"version {version} of partition {history.key} is not current (current: "
                    f"{history.current}) and was never rolled back: only the current version can be",
                )
            return f"version {version} is not current (current: {history.current}): already undone"
        return None
    if history.current is None:
        return "no committed version"
    if history.last_word == "rolled_back":
        return (
            f"already rolled back (version {history.current} was restored); to roll back further on purpose "
            f"name the version: --version {history.current}"
        )
    return None

"""Undo committed partitions through their rollback manifests (CONTRACT section 4).

Undoing version N of a partition: restore version N-1's manifest as the commit point (or remove the
commit point when N was the first), delete the data files only N used, mark the catalog row rolled
back, and append a `partition_rolled_back` event. The audit chain is only ever appended to.
Idempotent: a partition whose current version is no longer N is left alone.
"""

from __future__ import annotations

from typing import Any

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.events import (
    PARTITION_COMMITTED,
    PARTITION_ROLLED_BACK,
    ChainIndex,
    catalog_row,
    chain_key,
    commit_body,
    rollback_body,
)
from pcbo_dagster.lake import layout, manifests


def ensure_commit_recorded(
    env: Environment, manifest: dict[str, Any], checksum: str, index: ChainIndex | None = None
) -> None:
    """Give a committed manifest its `partition_committed` event and catalog row if a crash after
    its commit point left it without them, before it is superseded or undone: the chain must show
    every version readers could see, and the catalog must know the version it marks rolled back."""
    dataset, version_label = manifest["dataset"], manifest["versionLabel"]
    key, version = manifest["partition"]["key"], manifest["partitionVersion"]
    row = env.catalog.current_partition(dataset, version_label, key)
    if row is not None and row["version"] == version and row["manifest_checksum"] == checksum:
        return
    ckey = chain_key(dataset, version_label)
    if index is None:
        index = ChainIndex(env.audit.backup.read_chain(ckey))
    event = index.commits.get((key, checksum))
    if event is None:
        event = env.audit.append(ckey, PARTITION_COMMITTED, commit_body(manifest, checksum, env.lake))
        index.add(event)
    if row is None or row["version"] < version:
        env.catalog.record_partition_version(
            **catalog_row(manifest, checksum, env.lake, event["chain"]["event_hash"])
        )


def undo_current_version(
    env: Environment,
    dataset: str,
    version_label: str,
    key: str,
    *,
    reason: str,
    run_id: str | None,
    expected_checksum: str | None = None,
) -> dict[str, Any]:
    """Undo the partition's current version; returns what was done (`status`: rolled_back or noop)."""
    lake = env.lake
    manifest_rel = layout.manifest(dataset, version_label, key)
    if not lake.exists(manifest_rel):
        return {"key": key, "status": "noop", "detail": "no committed version"}
    current_bytes = lake.read(manifest_rel)
    current = manifests.decode(current_bytes)
    checksum = manifests.checksum(current_bytes)
    if expected_checksum is not None and checksum != expected_checksum:
        return {"key": key, "status": "noop", "detail": "the current version is not the one to undo"}
    ensure_commit_recorded(env, current, checksum)
    version = current["partitionVersion"]
    plan = manifests.decode(lake.read(layout.rollback_manifest(dataset, version_label, key, version)))
    restore = plan.get("restoreVersion")
    if restore is not None:
        lake.write_atomic(manifest_rel, lake.read(plan["restoreManifest"]), durable=True)
    else:
        lake.delete(manifest_rel)
    for rel in plan["removeFiles"]:
        lake.delete(rel)
    event = env.audit.append(
        chain_key(dataset, version_label),
        PARTITION_ROLLED_BACK,
        rollback_body(current, checksum, restore, reason, run_id),
    )
    env.catalog.mark_partition_rolled_back(
        dataset=dataset,
        version_label=version_label,
        partition_key=key,
        version=version,
        restored_version=restore,
    )
    return {
        "key": key,
        "status": "rolled_back",
        "version": version,
        "restoredVersion": restore,
        "eventHash": event["chain"]["event_hash"],
    }


def rollback(
    env: Environment,
    dataset: str,
    version_label: str,
    *,
    run_id: str | None = None,
    partition_key: str | None = None,
    reason: str = "requested",
) -> dict[str, Any]:
    """Roll back every partition whose current version run `run_id` wrote, or one partition."""
    if run_id is None and partition_key is None:
        raise InvalidInput("runId", "give a run id or a partition key to roll back")
    results = []
    with env.dataset_lock(dataset, version_label):
        _heal_rollbacks(env, dataset, version_label)
        keys = [
            layout.split_manifest_path(rel)[2]
            for rel in env.lake.find(layout.MANIFEST, f"{dataset}/{version_label}")
        ]
        for key in keys:
            if partition_key is not None and key != partition_key:
                continue
            manifest = manifests.decode(env.lake.read(layout.manifest(dataset, version_label, key)))
            if run_id is not None and manifest.get("runId") != run_id:
                continue
            results.append(
                undo_current_version(env, dataset, version_label, key, reason=reason, run_id=run_id)
            )
    if partition_key is not None and not results:
        results.append({"key": partition_key, "status": "noop", "detail": "no committed version"})
    done = sum(1 for r in results if r["status"] == "rolled_back")
    return {
        "status": "rolled_back" if done else "noop",
        "dataset": dataset,
        "versionLabel": version_label,
        "runId": run_id,
        "partitionKey": partition_key,
        "rolledBack": done,
        "partitions": results,
    }


def _heal_rollbacks(env: Environment, dataset: str, version_label: str) -> None:
    """Finish rollbacks a crash interrupted: the catalog must agree with rollback events."""
    index = ChainIndex(env.audit.backup.read_chain(chain_key(dataset, version_label)))
    for (key, _), event in index.rollbacks.items():
        version = event["partition"]["version"]
        row = env.catalog.current_partition(dataset, version_label, key)
        if row is not None and row["version"] == version:
            env.catalog.mark_partition_rolled_back(
                dataset=dataset,
                version_label=version_label,
                partition_key=key,
                version=version,
                restored_version=event.get("restored_version"),
            )

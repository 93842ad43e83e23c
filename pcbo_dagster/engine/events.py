"""Audit event bodies (PAS, snake_case) for partition commits and rollbacks and their intents.

A commit event is derived from the committed manifest alone, so `verify --repair` can append the
event of a partition committed just before a crash exactly as execute would have. The event types and
what the chain makes of them are `core/chain_state.py`'s.
"""

from __future__ import annotations

from typing import Any

from pcbo_dagster import __version__
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.lake import layout
from pcbo_dagster.lake.manifests import Manifest
from pcbo_dagster.lake.storage import LakeStorage

PRODUCER = {"name": "pcbo_dagster", "version": __version__}


def chain_key(dataset: str, version_label: str) -> str:
    return f"{dataset}/{version_label}"


def partition_of(manifest: Manifest) -> dict[str, Any]:
    """The `partition` object of an event about a version, from its manifest."""
    part = manifest["partition"]
    return {
        "dataset": manifest["dataset"],
        "version_label": manifest["versionLabel"],
        "key": part["key"],
        "index": part["index"],
        "start": part["start"],
        "end": part["end"],
        "version": manifest["partitionVersion"],
    }


def commit_body(manifest: Manifest, manifest_checksum: str, lake: LakeStorage) -> dict[str, Any]:
    dataset, version_label, key = manifest["dataset"], manifest["versionLabel"], manifest["partition"]["key"]
    version = manifest["partitionVersion"]
    counts = manifest["counts"]
    return {
        "run_id": manifest["runId"],
        "partition": partition_of(manifest),
        "plan_hash": manifest["planHash"],
        "decision_hash": manifest["decisionHash"],
        "merkle_root": manifest["merkleRoot"],
        "record_count": manifest["recordCount"],
        "previous": {
            "version": manifest["previousVersion"],
            "manifest_checksum": manifest["previousManifestChecksum"],
        },
        "manifest": {
            "uri": lake.uri(layout.manifest(dataset, version_label, key)),
            "version_uri": lake.uri(layout.version_manifest(dataset, version_label, key, version)),
            "checksum": manifest_checksum,
        },
        "rollback_manifest": {
            "uri": lake.uri(layout.rollback_manifest(dataset, version_label, key, version))
        },
        "tables": {
            f["path"].rsplit("/", 1)[-1]: {
                "checksum": f["checksum"],
                "row_count": f["rowCount"],
                "storage_path": lake.uri(f["path"]),
                "byte_size": f["byteSize"],
            }
            for f in manifest["files"]
        },
        "counts": {
            "source": counts["source"],
            "add": counts["add"],
            "omit": counts["omit"],
            "by_reason": dict(counts["byReason"]),
        },
        "producer": PRODUCER,
    }


def catalog_row(
    manifest: Manifest,
    manifest_checksum: str,
    lake: LakeStorage,
    event_hash: str,
    source_uri: str | None = None,
    source_kind: str = "repair",
) -> dict[str, Any]:
    """The catalog's record of a committed manifest (`CatalogStore.record_partition_version` fields)."""
    dataset, version_label, key = manifest["dataset"], manifest["versionLabel"], manifest["partition"]["key"]
    return {
        "dataset": dataset,
        "version_label": version_label,
        "partition_key": key,
        "version": manifest["partitionVersion"],
        "run_id": manifest["runId"],
        "manifest_uri": lake.uri(layout.manifest(dataset, version_label, key)),
        "manifest_checksum": manifest_checksum,
        "merkle_root": manifest["merkleRoot"],
        "record_count": manifest["recordCount"],
        "event_hash": event_hash,
        "files": manifest["files"],
        "source_uri": None if source_uri is None else redact_url(source_uri),
        "source_kind": source_kind,
        "plan_hash": manifest["planHash"],
        "decision_hash": manifest["decisionHash"],
    }


def commit_intent_entry(manifest: Manifest, manifest_checksum: str) -> dict[str, Any]:
    """One partition of a `partition_commit_intent`: the manifest about to become its commit point."""
    return {
        "key": manifest["partition"]["key"],
        "version": manifest["partitionVersion"],
        "manifest_checksum": manifest_checksum,
        "previous_version": manifest["previousVersion"],
        "previous_manifest_checksum": manifest["previousManifestChecksum"],
    }


def commit_intent_body(run_id: str | None, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"run_id": run_id, "partitions": entries, "producer": PRODUCER}


def rollback_intent_entry(
    key: str,
    version: int,
    manifest_checksum: str,
    restore_version: int | None,
    restore_manifest_checksum: str | None,
) -> dict[str, Any]:
    """One partition of a `partition_rollback_intent`: the version to undo and the one to restore."""
    return {
        "key": key,
        "version": version,
        "manifest_checksum": manifest_checksum,
        "restore_version": restore_version,
        "restore_manifest_checksum": restore_manifest_checksum,
    }


def rollback_intent_body(run_id: str | None, reason: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"run_id": run_id, "reason": reason, "partitions": entries, "producer": PRODUCER}


def rollback_body(
    partition: dict[str, Any],
    manifest_checksum: str,
    restored_version: int | None,
    restored_manifest_checksum: str | None,
    reason: str,
    run_id: str | None,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "partition": partition,
        "undone_manifest_checksum": manifest_checksum,
        "restored_version": restored_version,
        "restored_manifest_checksum": restored_manifest_checksum,
        "reason": reason,
        "producer": PRODUCER,
    }


def restoration_body(
    partition: dict[str, Any], manifest_checksum: str, finding: dict[str, Any] | None, run_id: str | None
) -> dict[str, Any]:
    """`partition_restored`: the lake disagreed with the chain (`finding`) and a run put the chain's
    current version back, byte for byte."""
    return {
        "run_id": run_id,
        "partition": partition,
        "manifest_checksum": manifest_checksum,
        "finding": finding,
        "producer": PRODUCER,
    }

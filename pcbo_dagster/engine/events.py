"""Audit event bodies (PAS, snake_case) for partition commits and rollbacks.

A commit event is derived from the committed manifest alone, so `verify --repair` can append the
event of a partition committed just before a crash exactly as execute would have.
"""

from __future__ import annotations

from typing import Any

from pcbo_dagster import __version__
from pcbo_dagster.lake import layout
from pcbo_dagster.lake.storage import LakeStorage

PARTITION_COMMITTED = "partition_committed"
PARTITION_ROLLED_BACK = "partition_rolled_back"
PRODUCER = {"name": "pcbo_dagster", "version": __version__}


def chain_key(dataset: str, version_label: str) -> str:
    return f"{dataset}/{version_label}"


def _partition(manifest: dict[str, Any]) -> dict[str, Any]:
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


def commit_body(manifest: dict[str, Any], manifest_checksum: str, lake: LakeStorage) -> dict[str, Any]:
    dataset, version_label, key = manifest["dataset"], manifest["versionLabel"], manifest["partition"]["key"]
    version = manifest["partitionVersion"]
    counts = manifest["counts"]
    return {
        "run_id": manifest["runId"],
        "partition": _partition(manifest),
        "plan_hash": manifest["planHash"],
        "decision_hash": manifest["decisionHash"],
        "merkle_root": manifest["merkleRoot"],
        "record_count": manifest["recordCount"],
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
    manifest: dict[str, Any],
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
        "source_uri": source_uri,
        "source_kind": source_kind,
        "plan_hash": manifest["planHash"],
        "decision_hash": manifest["decisionHash"],
    }


def rollback_body(
    manifest: dict[str, Any],
    manifest_checksum: str,
    restored_version: int | None,
    reason: str,
    run_id: str | None,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "partition": _partition(manifest),
        "undone_manifest_checksum": manifest_checksum,
        "restored_version": restored_version,
        "reason": reason,
        "producer": PRODUCER,
    }


class ChainIndex:
    """What a dataset's chain says about its partitions: commit events by (key, manifest checksum),
    and the highest version any event names per key (so a new version never reuses a number)."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.commits: dict[tuple[str, str], dict[str, Any]] = {}
        self.rollbacks: dict[tuple[str, str], dict[str, Any]] = {}
        self.max_version: dict[str, int] = {}
        for event in events:
            self.add(event)

    def add(self, event: dict[str, Any]) -> None:
        part = event.get("partition")
        if not isinstance(part, dict) or "key" not in part:
            return
        key = part["key"]
        self.max_version[key] = max(self.max_version.get(key, 0), int(part.get("version", 0)))
        if event.get("event_type") == PARTITION_COMMITTED:
            self.commits[(key, event["manifest"]["checksum"])] = event
        elif event.get("event_type") == PARTITION_ROLLED_BACK:
            self.rollbacks[(key, event["undone_manifest_checksum"])] = event

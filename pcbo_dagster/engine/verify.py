"""`verify`: re-read the lake, the catalog and the audit backup and report every inconsistency.

Checked: every committed manifest's files (present, size, checksum, row count), ids sorted and
unique, the Merkle root recomputed from the rows, rows against the manifest's policy; the catalog's
current version of every partition against the lake (both ways); every audit chain (each hash
recomputed, each link) and the catalog's mirror of it; a commit event for every committed manifest.
Files no manifest names are ignored (uncommitted). `repair=True` appends the audit event of a
partition committed just before a crash (and the rollback event of an interrupted rollback) and
completes missing catalog rows; it never edits or removes an event.
"""

from __future__ import annotations

from typing import Any

from pcbo_dagster.core.audit_chain import verify_chain
from pcbo_dagster.core.compliance import violations
from pcbo_dagster.core.plan import NormalizedPolicies
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
from pcbo_dagster.engine.partition_reading import read_partition
from pcbo_dagster.lake import layout, manifests


def _check_partition(env: Environment, rel: str, findings: list[dict[str, Any]]) -> tuple[dict, str] | None:
    reading = read_partition(env.lake, *layout.split_manifest_path(rel))
    findings.extend(reading.findings)
    if reading.manifest is None:
        return None
    for table, entry in zip(
        reading.tables,
        [f for f in reading.manifest["files"] if f["path"] not in reading.unreadable],
        strict=True,
    ):
        for v in violations(table, NormalizedPolicies.from_json(reading.manifest["policies"]), []):
            findings.append(
                {
                    "kind": "policy_violation",
                    "where": entry["path"],
                    "detail": f"row {v['id']!r}: {', '.join(v['reasons'])}",
                }
            )
    return reading.manifest, reading.manifest_checksum


def verify(env: Environment, repair: bool = False) -> dict[str, Any]:
    findings: list[dict[str, Any]] = []
    repaired: list[dict[str, Any]] = []
    backup_chains, problems = env.audit.backup.read_all_with_problems()
    for problem in problems:
        findings.append({"kind": "audit_backup_unreadable", "where": "audit backup", "detail": problem})
    indexes = {key: ChainIndex(events) for key, events in backup_chains.items()}

    committed: dict[tuple[str, str, str], tuple[dict, str]] = {}
    manifest_rels = env.lake.find(layout.MANIFEST)
    for rel in manifest_rels:
        checked = _check_partition(env, rel, findings)
        if checked is not None:
            committed[layout.split_manifest_path(rel)] = checked

    for (dataset, version_label, key), (manifest, checksum) in committed.items():
        ckey = chain_key(dataset, version_label)
        index = indexes.setdefault(ckey, ChainIndex([]))
        if (key, checksum) not in index.commits:
            if repair:
                event = env.audit.append(ckey, PARTITION_COMMITTED, commit_body(manifest, checksum, env.lake))
                index.add(event)
                repaired.append(
                    {
                        "kind": "audit_event_appended",
                        "where": f"{ckey}/{key}",
                        "eventHash": event["chain"]["event_hash"],
                    }
                )
            else:
                findings.append(
                    {
                        "kind": "audit_event_missing",
                        "where": f"{ckey}/{key}",
                        "detail": f"no partition_committed event for manifest {checksum}",
                    }
                )
        row = env.catalog.current_partition(dataset, version_label, key)
        if row is None or row["manifest_checksum"] != checksum:
            event = index.commits.get((key, checksum))
            if repair and event is not None:
                env.catalog.record_partition_version(
                    **catalog_row(manifest, checksum, env.lake, event["chain"]["event_hash"])
                )
                repaired.append({"kind": "catalog_row_recorded", "where": f"{ckey}/{key}"})
            else:
                findings.append(
                    {
                        "kind": "catalog_mismatch",
                        "where": f"{ckey}/{key}",
                        "detail": "the catalog's current version is not the lake's committed manifest",
                    }
                )

    # Catalog rows that claim a committed partition the lake does not have; interrupted rollbacks.
    for row in env.catalog.partition_versions():
        if row["status"] != "committed":
            continue
        ident = (row["dataset"], row["version_label"], row["partition_key"])
        if ident in committed and committed[ident][1] == row["manifest_checksum"]:
            continue
        ckey = chain_key(row["dataset"], row["version_label"])
        index = indexes.get(ckey, ChainIndex([]))
        where = f"{ckey}/{row['partition_key']}"
        rolled = (row["partition_key"], row["manifest_checksum"]) in index.rollbacks
        if repair and (ident not in committed or committed[ident][0]["partitionVersion"] < row["version"]):
            if not rolled:
                undone = manifests.decode(env.lake.read(layout.version_manifest(*ident, row["version"])))
                restored = committed[ident][0]["partitionVersion"] if ident in committed else None
                event = env.audit.append(
                    ckey,
                    PARTITION_ROLLED_BACK,
                    rollback_body(
                        undone, row["manifest_checksum"], restored, "interrupted_rollback_completed", None
                    ),
                )
                index.add(event)
                repaired.append(
                    {
                        "kind": "rollback_event_appended",
                        "where": where,
                        "eventHash": event["chain"]["event_hash"],
                    }
                )
            env.catalog.mark_partition_rolled_back(
                dataset=row["dataset"],
                version_label=row["version_label"],
                partition_key=row["partition_key"],
                version=row["version"],
                restored_version=committed[ident][0]["partitionVersion"] if ident in committed else None,
            )
            repaired.append({"kind": "catalog_row_rolled_back", "where": where})
        elif ident not in committed:
            findings.append(
                {
                    "kind": "catalog_partition_not_in_lake",
                    "where": where,
                    "detail": f"catalog says version {row['version']} is committed; the lake has no "
                    "committed manifest",
                }
            )

    # Audit chains: recompute every hash, check every link, compare with the catalog's mirror.
    if repaired:
        backup_chains, _ = env.audit.backup.read_all_with_problems()
    heads = env.catalog.chain_heads()
    chains_checked = {}
    for ckey in sorted(set(backup_chains) | set(heads)):
        events = backup_chains.get(ckey, [])
        for text in verify_chain(events, ckey):
            findings.append({"kind": "audit_chain_broken", "where": ckey, "detail": text})
        mirror = env.catalog.audit_events(ckey)
        backup_hashes = [e.get("chain", {}).get("event_hash") for e in events]
        mirror_hashes = [e["chain"]["event_hash"] for e in mirror]
        if backup_hashes[: len(mirror_hashes)] != mirror_hashes:
            findings.append(
                {
                    "kind": "audit_catalog_mismatch",
                    "where": ckey,
                    "detail": "the catalog's copy of the chain differs from the local backup",
                }
            )
        elif len(mirror_hashes) < len(backup_hashes):
            findings.append(
                {
                    "kind": "audit_catalog_behind",
                    "where": ckey,
                    "detail": f"the catalog holds {len(mirror_hashes)} of {len(backup_hashes)} events",
                }
            )
        chains_checked[ckey] = len(events)

    return {
        "status": "clean" if not findings else "findings",
        "findings": findings,
        "repaired": repaired,
        "checked": {"partitions": len(committed), "chains": chains_checked},
    }

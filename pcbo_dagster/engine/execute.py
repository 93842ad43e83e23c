"""`execute`: write each partition of a plan to the lake, prove it, audit it, reconcile it.

Per partition, in this order (CONTRACT section 4): data file (content-addressed), the version and
rollback manifests, then `_manifest.json` (the commit point), then the audit event, then a
post-write check that reads the committed file back from the lake, then the catalog. A partition
already committed with identical content is left as it is; if a crash had left it without its audit
event or catalog row, those are completed now ("healed").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pcbo_dagster.core import merkle
from pcbo_dagster.core.canonical import prefixed, sha256_hex
from pcbo_dagster.core.compliance import violations
from pcbo_dagster.core.decisions import Decisions, PartitionDecision
from pcbo_dagster.core.errors import Blocked, IntegrityError
from pcbo_dagster.core.plan import Plan
from pcbo_dagster.core.record_table import ID, build_table, run_schema
from pcbo_dagster.engine import failpoints
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.events import PARTITION_COMMITTED, ChainIndex, chain_key, commit_body
from pcbo_dagster.engine.request_loading import LoadedRequest
from pcbo_dagster.engine.rollback import undo_current_version
from pcbo_dagster.lake import layout, manifests, parquet_files

Progress = Callable[[int], None]


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


def build_manifest(
    plan: Plan,
    decisions: Decisions,
    pd: PartitionDecision,
    file_entry: dict[str, Any],
    merkle_root: str,
    version: int,
    previous: dict[str, Any] | None,
    previous_checksum: str | None,
    schema: pa.Schema,
) -> dict[str, Any]:
    return {
        "kind": manifests.MANIFEST_KIND,
        "dataset": plan.dataset,
        "versionLabel": plan.version_label,
        "runId": plan.run_id,
        "partition": pd.partition.to_json(),
        "partitionVersion": version,
        "previousVersion": previous["partitionVersion"] if previous else None,
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
    previous: dict[str, Any] | None,
    file_paths: list[str],
) -> dict[str, Any]:
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


class PostWriteCheckFailed(IntegrityError):
    """The run stopped at a partition whose written rows did not match its decisions or policy."""

    def __init__(self, message: str, document: dict[str, Any]) -> None:
        self.document = document
        super().__init__(message)


def post_write_check(
    env: Environment, plan: Plan, manifest: dict[str, Any], expected_ids: list[str], existing_ids: list[str]
) -> dict[str, Any]:
    """Read the committed file back from the lake: checksum, rows vs decisions, root, policy."""
    findings: list[str] = []
    ids: list[str] = []
    violating: list[dict[str, Any]] = []
    for entry in manifest["files"]:
        data = env.lake.read(entry["path"])
        if prefixed(sha256_hex(data)) != entry["checksum"]:
            findings.append(f"{entry['path']}: checksum differs from the manifest")
            continue
        table = parquet_files.decode(data)
        if table.num_rows != entry["rowCount"]:
            findings.append(f"{entry['path']}: {table.num_rows} rows, manifest says {entry['rowCount']}")
        ids.extend(table[ID].to_pylist())
        violating.extend(violations(table, plan.policies, existing_ids))
    root = merkle.root_hex(ids)
    if ids != expected_ids:
        findings.append(f"rows written ({len(ids)}) differ from the decided adds ({len(expected_ids)})")
    if root != manifest["merkleRoot"]:
        findings.append("the Merkle root recomputed from the written file differs from the manifest")
    if violating:
        findings.append(f"{len(violating)} written row(s) violate the policy")
    return {
        "key": manifest["partition"]["key"],
        "decidedAdds": len(expected_ids),
        "rowsWritten": len(ids),
        "idsMatch": ids == expected_ids,
        "merkleRoot": manifest["merkleRoot"],
        "rootRecomputed": root,
        "rootMatches": root == manifest["merkleRoot"],
        "policyViolations": violating[:20],
        "policyViolationCount": len(violating),
        "status": "ok" if not findings else "failed",
        "findings": findings,
    }


def execute(
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    decisions: Decisions,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Execute the request; the caller has evaluated it and checked the gates."""
    request = loaded.request
    ckey = chain_key(plan.dataset, plan.version_label)
    existing = list(request.existingTargetIds)
    all_adds = [i for pd in decisions.partitions for i in pd.add_indices.tolist()]
    schema, as_json = run_schema([loaded.records[i] for i in all_adds])
    results: list[dict[str, Any]] = []
    reconciliation: list[dict[str, Any]] = []
    status = "unchanged"
    failure: str | None = None
    with env.dataset_lock(plan.dataset, plan.version_label):
        env.catalog.ensure_dataset(plan.dataset, plan.version_label)
        env.catalog.start_run(
            request.runId,
            plan.dataset,
            plan.version_label,
            plan.plan_hash,
            decisions.decision_hash,
            dict(request.metadata),
        )
        index = ChainIndex(env.audit.backup.read_chain(ckey))
        for pd in decisions.partitions:
            outcome, check = _commit_partition(
                env, loaded, plan, decisions, pd, schema, as_json, index, existing
            )
            results.append(outcome)
            reconciliation.append(check)
            if outcome["status"] in ("committed",):
                status = "committed"
            if progress:
                progress(1)
            if check["status"] != "ok":
                failure = f"post-write check failed for partition {pd.partition.key}: " + "; ".join(
                    check["findings"]
                )
                env.catalog.record_discrepancy(
                    run_id=request.runId,
                    dataset=plan.dataset,
                    version_label=plan.version_label,
                    partition_key=pd.partition.key,
                    kind="post_write_check",
                    detail=check,
                )
                break
        final = "failed" if failure else status
        summary = {
            "partitions": len(results),
            "committed": sum(r["status"] == "committed" for r in results),
            "unchanged": sum(r["status"] == "unchanged" for r in results),
            "healed": sum(bool(r.get("healed")) for r in results),
            "failure": failure,
        }
        env.catalog.finish_run(request.runId, final, summary)
    delivery = env.audit.deliver_pending(ckey)
    document = {
        "status": final,
        "runId": request.runId,
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
        "auditDelivery": delivery.to_dict() if delivery is not None else None,
    }
    if failure:
        raise PostWriteCheckFailed(failure, document)
    return document


def _commit_partition(
    env: Environment,
    loaded: LoadedRequest,
    plan: Plan,
    decisions: Decisions,
    pd: PartitionDecision,
    schema: pa.Schema,
    as_json: dict[str, bool],
    index: ChainIndex,
    existing: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    lake = env.lake
    key = pd.partition.key
    dataset, version_label = plan.dataset, plan.version_label
    rows = [loaded.records[i] for i in pd.add_indices.tolist()]
    take = pa.array(pd.add_indices, pa.int64())
    occurred = decisions.occurred_us.take(take).to_numpy(zero_copy_only=False)
    table = build_table(rows, pd.add, occurred, decisions.retention_us.take(take), schema, as_json)
    data = parquet_files.encode(table)
    file_hex = sha256_hex(data)
    file_rel = layout.data_file(dataset, version_label, key, file_hex)
    file_entry = {
        "path": file_rel,
        "checksum": prefixed(file_hex),
        "rowCount": table.num_rows,
        "byteSize": len(data),
    }
    merkle_root = merkle.root_hex(pd.add)

    manifest_rel = layout.manifest(dataset, version_label, key)
    previous = previous_checksum = None
    if lake.exists(manifest_rel):
        previous_bytes = lake.read(manifest_rel)
        previous, previous_checksum = manifests.decode(previous_bytes), manifests.checksum(previous_bytes)
    version = max(index.max_version.get(key, 0), previous["partitionVersion"] if previous else 0) + 1
    manifest = build_manifest(
        plan, decisions, pd, file_entry, merkle_root, version, previous, previous_checksum, schema
    )
    healed = False
    if previous is not None and manifests.same_content(previous, manifest):
        manifest, manifest_checksum, status = previous, previous_checksum, "unchanged"
        version = previous["partitionVersion"]
        event = index.commits.get((key, manifest_checksum))
        if event is None:
            event = env.audit.append(
                chain_key(dataset, version_label),
                PARTITION_COMMITTED,
                commit_body(manifest, manifest_checksum, lake),
            )
            index.add(event)
            healed = True
    else:
        status = "committed"
        lake.write_atomic(file_rel, data)
        failpoints.reached("after_data_files", pd.partition.index)
        manifest_bytes = manifests.encode(manifest)
        manifest_checksum = manifests.checksum(manifest_bytes)
        lake.write_atomic(layout.version_manifest(dataset, version_label, key, version), manifest_bytes)
        lake.write_atomic(
            layout.rollback_manifest(dataset, version_label, key, version),
            manifests.encode(_rollback_manifest(plan, key, version, manifest_checksum, previous, [file_rel])),
        )
        failpoints.reached("before_commit", pd.partition.index)
        lake.write_atomic(manifest_rel, manifest_bytes)
        failpoints.reached("after_commit", pd.partition.index)
        event = env.audit.append(
            chain_key(dataset, version_label),
            PARTITION_COMMITTED,
            commit_body(manifest, manifest_checksum, lake),
        )
        index.add(event)
        failpoints.reached("after_event", pd.partition.index)

    check = post_write_check(env, plan, manifest, pd.add, existing)
    if check["status"] != "ok":
        if status == "committed":
            undo_current_version(
                env,
                dataset,
                version_label,
                key,
                reason="post_write_check_failed",
                run_id=plan.run_id,
                expected_checksum=manifest_checksum,
            )
        status = "failed"
    else:
        row = env.catalog.current_partition(dataset, version_label, key)
        if row is None or row["version"] != version or row["manifest_checksum"] != manifest_checksum:
            env.catalog.record_partition_version(
                dataset=dataset,
                version_label=version_label,
                partition_key=key,
                version=version,
                run_id=manifest["runId"],
                manifest_uri=lake.uri(manifest_rel),
                manifest_checksum=manifest_checksum,
                merkle_root=manifest["merkleRoot"],
                record_count=manifest["recordCount"],
                event_hash=event["chain"]["event_hash"],
                files=manifest["files"],
                source_uri=loaded.source_uri,
                source_kind=loaded.source_kind,
                plan_hash=manifest["planHash"],
                decision_hash=manifest["decisionHash"],
            )
            healed = healed or status == "unchanged"
        failpoints.reached("after_catalog", pd.partition.index)
    outcome = {
        **pd.partition.to_json(),
        "status": status,
        "version": version,
        "files": [
            {
                "uri": lake.uri(f["path"]),
                "checksum": f["checksum"],
                "rowCount": f["rowCount"],
                "byteSize": f["byteSize"],
            }
            for f in manifest["files"]
        ],
        "recordCount": manifest["recordCount"],
        "merkleRoot": manifest["merkleRoot"],
        "manifest": lake.uri(manifest_rel),
        "manifestChecksum": manifest_checksum,
        "rollbackManifest": lake.uri(layout.rollback_manifest(dataset, version_label, key, version)),
        "eventHash": event["chain"]["event_hash"],
    }
    if healed:
        outcome["healed"] = True
    return outcome, check

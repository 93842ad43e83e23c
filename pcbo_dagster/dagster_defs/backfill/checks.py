"""Asset checks beside the backfill assets: they re-read what was committed, never trust the run.

Per partition (partitioned checks, one evaluation per partition key of the run, also in range runs):
- `reconciliation` (blocking): the partition's committed manifest (`lake/layout`, `lake/manifests`)
  names files that exist with the recorded size and SHA-256, hold the recorded rows, ids unique and
  sorted, as many as the manifest's record count and decided adds, and the RFC 6962 root recomputed
  from those ids (`core/merkle`) is the manifest's Merkle root.
- `policy_compliance`: no written row breaks the dataset's configured policies or is one of its
  `existingTargetIds` (`core/compliance.violations`); records whether the manifest was committed
  under the policies configured now.
- `audit_chain`: the dataset's audit chain in the local backup verifies offline
  (`core/audit_chain.verify_chain`: every hash recomputed, every link, the catalog's head) and holds
  the `partition_committed` event of the partition's committed manifest, with its Merkle root.

With `checkGranularity: run` in the dataset's config, the three are unpartitioned instead: one
evaluation per check and run, failing partitions listed in its metadata (a backfill of thousands of
partitions then records 3 check events, not 3 per partition; each event costs ~30-60 ms of event
log writes on SQLite). Either way, checks launched alone, outside a partitioned run (the
`<asset>_checks` job without partition tags), check every committed partition of the dataset.

For the whole asset (one evaluation per run, severity WARN):
- `coverage`: the committed partitions in the lake against the asset's partition keys up to the
  last committed one (gaps), and how many partitions remain after it.

Partitioned asset checks are a preview feature of Dagster 1.13. A range run evaluates a check step
once for all its partitions; the step yields one `AssetCheckEvaluation` per partition key (Dagster's
`AssetCheckResult` carries no partition of its own in a range step).
"""

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pyarrow as pa

from pcbo_dagster.core import merkle
from pcbo_dagster.core.audit_chain import verify_chain
from pcbo_dagster.core.compliance import violations
from pcbo_dagster.core.plan import NormalizedPolicies, normalize_policies
from pcbo_dagster.core.request_model import BackfillRequest
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.events import ChainIndex
from pcbo_dagster.engine.partition_reading import PartitionReading, read_commit_point, read_partition
from pcbo_dagster.lake import layout

RECONCILIATION = "reconciliation"
POLICY_COMPLIANCE = "policy_compliance"
AUDIT_CHAIN = "audit_chain"
COVERAGE = "coverage"
_MAX_LISTED = 20


@dataclass
class CommittedPartition:
    """A partition as the lake holds it: the committed manifest and the files it names, re-read."""

    key: str
    manifest: dict[str, Any] | None = None
    manifest_checksum: str | None = None
    tables: list[pa.Table] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    #: Files whose rows could not be trusted or read (missing, checksum mismatch, not parquet).
    unreadable: list[str] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def committed(self) -> bool:
        return self.manifest is not None


def _as_committed(env: Environment, key: str, reading: PartitionReading) -> CommittedPartition:
    """The checks' view of an engine reading: findings as text naming full URIs."""
    return CommittedPartition(
        key,
        manifest=reading.manifest,
        manifest_checksum=reading.manifest_checksum,
        tables=reading.tables,
        ids=reading.ids,
        findings=[f"{env.lake.uri(f['where'])}: {f['detail']}" for f in reading.findings],
        unreadable=[env.lake.uri(where) for where in reading.unreadable],
        bytes_read=reading.bytes_read,
    )


def read_committed(env: Environment, dataset: DatasetConfig, key: str) -> CommittedPartition:
    """Re-read one committed partition (the engine's reading, shared with `pcbo verify`);
    `findings` lists every way it differs from its manifest."""
    reading = read_partition(env.lake, dataset.name, dataset.versionLabel, key)
    part = _as_committed(env, key, reading)
    if reading.manifest is None and not part.findings:
        part.findings.append(f"no committed manifest at {env.lake.uri(reading.rel)}")
    return part


def read_manifest_only(env: Environment, dataset: DatasetConfig, key: str) -> CommittedPartition:
    """The partition's committed manifest without its files (what the audit check needs)."""
    return _as_committed(env, key, read_commit_point(env.lake, dataset.name, dataset.versionLabel, key))


def reconcile(part: CommittedPartition) -> tuple[bool, dict[str, Any]]:
    """The reconciliation verdict of a re-read partition and its metadata."""
    findings = list(part.findings)
    metadata: dict[str, Any] = {"committed": part.committed, "bytes_read": part.bytes_read}
    if part.manifest is not None:
        manifest = part.manifest
        root = merkle.root_hex(part.ids)  # ids order, uniqueness, count and root: in part.findings
        decided = (manifest.get("counts") or {}).get("add")
        if decided is not None and decided != manifest.get("recordCount"):
            findings.append(
                f"the manifest records {manifest.get('recordCount')} rows for {decided} decided adds"
            )
        metadata.update(
            {
                "rows_read": len(part.ids),
                "unreadable_files": len(part.unreadable),
                "record_count": manifest.get("recordCount"),
                "merkle_root": manifest.get("merkleRoot"),
                "merkle_root_recomputed": root,
                "manifest_checksum": part.manifest_checksum,
                "partition_version": manifest.get("partitionVersion"),
            }
        )
    metadata["finding_count"] = len(findings)
    if findings:
        metadata["findings"] = dg.MetadataValue.json(findings[:_MAX_LISTED])
    return not findings, metadata


def configured_policies(dataset: DatasetConfig) -> NormalizedPolicies:
    """The dataset's policies normalised exactly as the engine normalises a request's."""
    return normalize_policies(BackfillRequest.model_construct(policies=dataset.policies))


def compliance(part: CommittedPartition, dataset: DatasetConfig) -> tuple[bool, dict[str, Any]]:
    policies = configured_policies(dataset)
    found: list[dict[str, Any]] = []
    for table in part.tables:
        found.extend(violations(table, policies, list(dataset.existingTargetIds)))
    unreadable = part.unreadable
    metadata: dict[str, Any] = {
        "committed": part.committed,
        "rows_checked": sum(t.num_rows for t in part.tables),
        "violation_count": len(found),
    }
    if part.manifest is not None:
        metadata["committed_under_configured_policies"] = part.manifest.get("policies") == policies.to_json()
    if found:
        metadata["violations"] = dg.MetadataValue.json(found[:_MAX_LISTED])
    if unreadable:
        metadata["unreadable"] = dg.MetadataValue.json(unreadable[:_MAX_LISTED])
    return not found and not unreadable, metadata


@dataclass
class ChainState:
    findings: list[str]
    index: ChainIndex
    length: int
    head: str | None


def read_chain(env: Environment, dataset: DatasetConfig) -> ChainState:
    """The dataset's chain from the local backup, verified offline against the catalog's head."""
    key = dataset.chain_key
    events, problems = env.audit.backup.read_chain_with_problems(key)
    expected_head = env.catalog.chain_heads().get(key)
    findings = list(problems) + verify_chain(events, key, expected_head=expected_head)
    head = events[-1].get("chain", {}).get("event_hash") if events else None
    return ChainState(findings, ChainIndex(events), len(events), head)


def chain_verdict(part: CommittedPartition, chain: ChainState) -> tuple[bool, dict[str, Any]]:
    findings = list(chain.findings)
    metadata: dict[str, Any] = {"chain_length": chain.length, "chain_head": chain.head or "none"}
    if part.manifest is not None:
        event = chain.index.commits.get((part.key, part.manifest_checksum or ""))
        if event is None:
            findings.append(f"no partition_committed event for manifest {part.manifest_checksum}")
        else:
            metadata["event_hash"] = event["chain"]["event_hash"]
            metadata["event_seq"] = event["chain"]["seq"]
            if event.get("merkle_root") != part.manifest.get("merkleRoot"):
                findings.append("the commit event's Merkle root differs from the manifest's")
    else:
        metadata["committed"] = False
    metadata["finding_count"] = len(findings)
    if findings:
        metadata["findings"] = dg.MetadataValue.json(findings[:_MAX_LISTED])
    return not findings, metadata


def _committed_keys(env: Environment, dataset: DatasetConfig) -> list[str]:
    under = f"{dataset.name}/{dataset.versionLabel}"
    return sorted(layout.split_manifest_path(rel)[2] for rel in env.lake.find(layout.MANIFEST, under=under))


def coverage(env: Environment, dataset: DatasetConfig, keys: list[str]) -> tuple[bool, dict[str, Any], str]:
    """Committed partitions vs the asset's keys up to the last committed one."""
    committed = set(_committed_keys(env, dataset))
    positions = [i for i, key in enumerate(keys) if key in committed]
    if not positions:
        return (
            True,
            {"partitions": len(keys), "committed": 0, "gaps": 0, "not_yet_materialized": len(keys)},
            "nothing committed yet",
        )
    last = positions[-1]
    gaps = [key for key in keys[: last + 1] if key not in committed]
    metadata: dict[str, Any] = {
        "partitions": len(keys),
        "committed": len(positions),
        "gaps": len(gaps),
        "last_committed": keys[last],
        "not_yet_materialized": len(keys) - last - 1,
        "unknown_committed_keys": len(committed) - len(positions),
    }
    if gaps:
        metadata["first_gaps"] = dg.MetadataValue.json(gaps[:_MAX_LISTED])
    text = (
        f"{len(gaps)} gap(s) up to {keys[last]}"
        if gaps
        else f"no gaps up to {keys[last]}; {len(keys) - last - 1} partition(s) after it"
    )
    return not gaps, metadata, text


def _evaluation(
    asset_key: dg.AssetKey, name: str, key: str, passed: bool, metadata: dict[str, Any], blocking: bool
) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=asset_key,
        check_name=name,
        passed=passed,
        partition=key,
        metadata=metadata,
        blocking=blocking,
        description=None if passed else f"partition {key} failed {name}",
    )


Verdict = Callable[[str], tuple[bool, dict[str, Any]]]
#: Given an open environment, the per-partition verdict of one check (state read once per step).
VerdictFactory = Callable[[Environment], Verdict]


def _keys_of_step(
    context: dg.AssetCheckExecutionContext, env: Environment, dataset: DatasetConfig
) -> list[str]:
    """The run's partitions; outside a partitioned run (a check launched alone), every committed one."""
    if context.has_partition_key or context.has_partition_key_range:
        return list(context.partition_keys)
    return _committed_keys(env, dataset)


#: Opens the environment a dataset asset's checks read (production, or a rollout's staging).
OpenEnvironment = Callable[[PcboEngineResource], AbstractContextManager[Environment]]


def _partition_check(
    asset: dg.AssetsDefinition,
    dataset: DatasetConfig,
    open_env: OpenEnvironment,
    name: str,
    description: str,
    factory: VerdictFactory,
    blocking: bool,
) -> dg.AssetChecksDefinition:
    """A check evaluated per partition: partitioned (one evaluation per key) or per run (a summary)."""
    asset_key = asset.key
    if dataset.checkGranularity == "partition":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=dg.PreviewWarning)

            @dg.asset_check(
                asset=asset,
                name=name,
                blocking=blocking,
                partitions_def=asset.partitions_def,
                description=description,
            )
            def partitioned(context: dg.AssetCheckExecutionContext, pcbo: PcboEngineResource):  # noqa: ANN201
                with open_env(pcbo) as env:
                    verdict = factory(env)
                    for key in _keys_of_step(context, env, dataset):
                        passed, metadata = verdict(key)
                        yield _evaluation(asset_key, name, key, passed, metadata, blocking)
                yield dg.Output(None)

        return partitioned

    @dg.asset_check(asset=asset, name=name, blocking=blocking, description=description)
    def summary(context: dg.AssetCheckExecutionContext, pcbo: PcboEngineResource) -> dg.AssetCheckResult:
        failed: dict[str, dict[str, Any]] = {}
        with open_env(pcbo) as env:
            keys = _keys_of_step(context, env, dataset)
            verdict = factory(env)
            for key in keys:
                passed, metadata = verdict(key)
                if not passed:
                    failed[key] = metadata
        metadata: dict[str, Any] = {"partitions_checked": len(keys), "partitions_failed": len(failed)}
        if keys:
            metadata["first_partition"], metadata["last_partition"] = keys[0], keys[-1]
        if failed:
            first = next(iter(failed))
            metadata["failed_partitions"] = dg.MetadataValue.json(list(failed)[:_MAX_LISTED])
            metadata["first_failure"] = dg.MetadataValue.json(
                {"partition": first, **{k: _plain(v) for k, v in failed[first].items()}}
            )
        return dg.AssetCheckResult(
            passed=not failed,
            metadata=metadata,
            description=f"{len(failed)} of {len(keys)} partition(s) failed {name}" if failed else None,
        )

    return summary


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, dg.MetadataValue) else value


def _reconciliation(dataset: DatasetConfig) -> VerdictFactory:
    return lambda env: lambda key: reconcile(read_committed(env, dataset, key))


def _compliance(dataset: DatasetConfig) -> VerdictFactory:
    return lambda env: lambda key: compliance(read_committed(env, dataset, key), dataset)


def _audit_chain(dataset: DatasetConfig) -> VerdictFactory:
    def factory(env: Environment) -> Verdict:
        chain = read_chain(env, dataset)
        return lambda key: chain_verdict(read_manifest_only(env, dataset, key), chain)

    return factory


def build_dataset_checks(
    config: DatasetsConfig, dataset: DatasetConfig, asset: dg.AssetsDefinition, stage: str | None = None
) -> list[dg.AssetChecksDefinition]:
    """The dataset asset's checks; `stage="staging"` reads a rollout dataset's staging environment."""
    partitions_def = asset.partitions_def

    def open_env(pcbo: PcboEngineResource) -> AbstractContextManager[Environment]:
        return pcbo.environment_for(config, dataset, stage)

    reconciliation_check = _partition_check(
        asset,
        dataset,
        open_env,
        RECONCILIATION,
        "Committed files re-read: checksums, row counts, ids, Merkle root vs the manifest",
        _reconciliation(dataset),
        blocking=True,
    )
    compliance_check = _partition_check(
        asset,
        dataset,
        open_env,
        POLICY_COMPLIANCE,
        "No written row breaks the configured policies or is an existing target id",
        _compliance(dataset),
        blocking=False,
    )
    audit_chain_check = _partition_check(
        asset,
        dataset,
        open_env,
        AUDIT_CHAIN,
        "The audit chain verifies offline and holds each partition's commit event",
        _audit_chain(dataset),
        blocking=False,
    )

    @dg.asset_check(
        asset=asset,
        name=COVERAGE,
        description="Committed partitions vs the asset's partition keys up to the last committed one",
    )
    def coverage_check(
        context: dg.AssetCheckExecutionContext, pcbo: PcboEngineResource
    ) -> dg.AssetCheckResult:
        assert partitions_def is not None
        keys = list(partitions_def.get_partition_keys(dynamic_partitions_store=context.instance))
        with open_env(pcbo) as env:
            passed, metadata, text = coverage(env, dataset, keys)
        return dg.AssetCheckResult(
            passed=passed, metadata=metadata, severity=dg.AssetCheckSeverity.WARN, description=text
        )

    return [reconciliation_check, compliance_check, audit_chain_check, coverage_check]

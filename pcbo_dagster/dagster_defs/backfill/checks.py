"""Asset checks beside the backfill assets: they re-read what was committed, never trust the run.

The verdicts are the engine's (`engine/partition_checks.py`, plain findings shared with the soak);
this module only runs them per partition key and wraps them into Dagster check results.

Per partition (partitioned checks, one evaluation per partition key of the run, also in range runs):
- `reconciliation` (blocking): files, sizes, checksums, rows, ids and the recomputed Merkle root
  against the committed manifest and its decided adds;
- `policy_compliance`: no written row breaks the dataset's configured policies or is one of its
  `existingTargetIds`; records whether the manifest was committed under the policies configured now;
- `audit_chain`: the dataset's audit chain in the local backup verifies offline and holds the
  `partition_committed` event of the partition's committed manifest, with its Merkle root.

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
from typing import Any

import dagster as dg

from pcbo_dagster.core.plan import NormalizedPolicies
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.engine import partition_checks
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.partition_checks import MAX_LISTED, Verdict, committed_keys

RECONCILIATION = "reconciliation"
POLICY_COMPLIANCE = "policy_compliance"
AUDIT_CHAIN = "audit_chain"
COVERAGE = "coverage"


def check_metadata(details: dict[str, Any]) -> dict[str, Any]:
    """A verdict's plain details as Dagster metadata: lists and objects as JSON, the rest as they are."""
    return {
        name: dg.MetadataValue.json(value) if isinstance(value, list | dict) else value
        for name, value in details.items()
    }


def _evaluation(
    asset_key: dg.AssetKey, name: str, key: str, verdict: Verdict, blocking: bool
) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=asset_key,
        check_name=name,
        passed=verdict.passed,
        partition=key,
        metadata=check_metadata(verdict.details),
        blocking=blocking,
        description=None if verdict.passed else f"partition {key} failed {name}",
    )


#: The verdict of one check on one partition key.
PartitionVerdict = Callable[[str], Verdict]
#: Given an open environment, the per-partition verdict of one check (state read once per step).
VerdictFactory = Callable[[Environment], PartitionVerdict]


def _keys_of_step(
    context: dg.AssetCheckExecutionContext, env: Environment, dataset: DatasetConfig
) -> list[str]:
    """The run's partitions; outside a partitioned run (a check launched alone), every committed one."""
    if context.has_partition_key or context.has_partition_key_range:
        return list(context.partition_keys)
    return committed_keys(env.lake, dataset.name, dataset.versionLabel)


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
                        yield _evaluation(asset_key, name, key, verdict(key), blocking)
                yield dg.Output(None)

        return partitioned

    @dg.asset_check(asset=asset, name=name, blocking=blocking, description=description)
    def summary(context: dg.AssetCheckExecutionContext, pcbo: PcboEngineResource) -> dg.AssetCheckResult:
        failed: dict[str, dict[str, Any]] = {}
        with open_env(pcbo) as env:
            keys = _keys_of_step(context, env, dataset)
            verdict = factory(env)
            for key in keys:
                outcome = verdict(key)
                if not outcome.passed:
                    failed[key] = outcome.details
        metadata: dict[str, Any] = {"partitions_checked": len(keys), "partitions_failed": len(failed)}
        if keys:
            metadata["first_partition"], metadata["last_partition"] = keys[0], keys[-1]
        if failed:
            first = next(iter(failed))
            metadata["failed_partitions"] = dg.MetadataValue.json(list(failed)[:MAX_LISTED])
            metadata["first_failure"] = dg.MetadataValue.json({"partition": first, **failed[first]})
        return dg.AssetCheckResult(
            passed=not failed,
            metadata=metadata,
            description=f"{len(failed)} of {len(keys)} partition(s) failed {name}" if failed else None,
        )

    return summary


def _reconciliation(dataset: DatasetConfig) -> VerdictFactory:
    def factory(env: Environment) -> PartitionVerdict:
        return lambda key: partition_checks.reconciliation(
            partition_checks.read_committed(env.lake, dataset.name, dataset.versionLabel, key)
        )

    return factory


def _compliance(dataset: DatasetConfig) -> VerdictFactory:
    policies = NormalizedPolicies.from_policies(dataset.policies)
    existing = list(dataset.existingTargetIds)

    def factory(env: Environment) -> PartitionVerdict:
        return lambda key: partition_checks.compliance(
            partition_checks.read_committed(env.lake, dataset.name, dataset.versionLabel, key),
            policies,
            existing,
        )

    return factory


def _audit_chain(dataset: DatasetConfig) -> VerdictFactory:
    def factory(env: Environment) -> PartitionVerdict:
        chain = partition_checks.read_chain(env, dataset.name, dataset.versionLabel)
        return lambda key: partition_checks.chain_verdict(
            partition_checks.read_manifest_only(env.lake, dataset.name, dataset.versionLabel, key), chain
        )

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
            verdict = partition_checks.coverage(env.lake, dataset.name, dataset.versionLabel, keys)
        return dg.AssetCheckResult(
            passed=verdict.passed,
            metadata=check_metadata(verdict.details),
            severity=dg.AssetCheckSeverity.WARN,
            description=verdict.summary,
        )

    return [reconciliation_check, compliance_check, audit_chain_check, coverage_check]

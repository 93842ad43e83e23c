"""Asset checks beside the backfill assets: they re-read what was committed, never trust the run.

The verdicts are the engine's (`engine/partition_checks.py`, plain findings shared with the soak);
this module only runs them per partition key and wraps them into Dagster check evaluations.

Per partition (partitioned checks, one evaluation per partition key of the run, also in range runs),
evaluated together in one step that reads each partition's files once and the audit chain once:
- `reconciliation` (blocking): files, sizes, checksums, rows, ids and the recomputed Merkle root
  against the committed manifest and its decided adds;
- `audit_chain` (blocking): the dataset's audit chain in the local backup verifies offline and its
  current version of the partition is the committed manifest, with its Merkle root;
- `policy_compliance`: no written row breaks the dataset's configured policies or is one of its
  `existingTargetIds`; records whether the manifest was committed under the policies configured now.

Each evaluation names the materialization it checked (the partition's latest), so the check's
Partitions tab shows it (Dagster counts a partition's check as current only when it targets the
partition's latest materialization: without that every partition reads "Missing"). A failing
blocking check fails the step and the run.

Dagster's catalog reads a partitioned check's health from its newest evaluation only (the last
partition of the last run), so one failing partition among many would leave the asset "healthy".
Hence, in the same step and last:
- `partition_health` (for the whole asset): the latest evaluation of every partition of the three
  checks above, as the Dagster instance records them now (this run's included): fails (ERROR) when
  any partition fails `reconciliation` or `audit_chain`, warns when only `policy_compliance` fails,
  listing the partitions. It is what marks the asset unhealthy in the catalog, and healthy again
  once every failing partition passes.

With `checkGranularity: run` in the dataset's config, the three are unpartitioned instead: one
evaluation per check and run, failing partitions listed in its metadata (three check events per run,
not three per partition), and `partition_health` is not needed. Either way, checks launched alone,
outside a partitioned run (the `<asset>_checks` job without partition tags), check every committed
partition of the dataset.

For the whole asset (one evaluation per run, severity WARN), run-level as before:
- `coverage`: the partitions the verified audit chain says are committed against the asset's partition
  keys up to the last committed one (gaps), and how many remain after it; the lake's commit points are
  compared against the chain, never counted (one the chain never committed fills no gap and fails,
  as does a committed partition the lake lacks, or a chain that does not verify).

Partitioned asset checks are a preview feature of Dagster 1.13.
"""

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from pcbo_dagster.core.plan import NormalizedPolicies
from pcbo_dagster.dagster_defs.backfill.steps import partition_groups_for_keys
from pcbo_dagster.dagster_defs.partitions import partitions_def_for, run_partition_keys
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.engine import partition_checks
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.partition_checks import MAX_LISTED, Verdict, committed_keys

RECONCILIATION = "reconciliation"
POLICY_COMPLIANCE = "policy_compliance"
AUDIT_CHAIN = "audit_chain"
COVERAGE = "coverage"
PARTITION_HEALTH = "partition_health"
#: The per-partition checks, and whether each is blocking.
PER_PARTITION: dict[str, bool] = {RECONCILIATION: True, AUDIT_CHAIN: True, POLICY_COMPLIANCE: False}
DESCRIPTIONS = {
    RECONCILIATION: "Committed files re-read: checksums, row counts, ids, Merkle root vs the manifest",
    AUDIT_CHAIN: "The audit chain verifies offline and its current version of the partition is the "
    "committed manifest",
    POLICY_COMPLIANCE: "No written row breaks the configured policies or is an existing target id",
    PARTITION_HEALTH: "Every partition's latest reconciliation, audit_chain and policy_compliance "
    "evaluation passes (fails when any partition fails; what the catalog's health reads)",
    COVERAGE: "The chain's committed partitions vs the asset's partition keys up to the last committed "
    "one; the lake's commit points against the chain",
}
#: What a passing evaluation keeps of its verdict's details (every entry is written per partition).
_KEPT_WHEN_PASSED = {
    RECONCILIATION: ("rows_read", "partition_version"),
    AUDIT_CHAIN: ("event_seq",),
    POLICY_COMPLIANCE: ("rows_checked",),
}


def check_metadata(details: dict[str, Any]) -> dict[str, Any]:
    """A verdict's plain details as Dagster metadata: lists and objects as JSON, the rest as they are."""
    return {
        name: dg.MetadataValue.json(value) if isinstance(value, list | dict) else value
        for name, value in details.items()
    }


def _details(name: str, verdict: Verdict) -> dict[str, Any]:
    if not verdict.passed:
        return verdict.details
    return {k: verdict.details[k] for k in _KEPT_WHEN_PASSED[name] if k in verdict.details}


#: Opens the environment a dataset asset's checks read (production, or a rollout's staging).
OpenEnvironment = Callable[[PcboEngineResource], AbstractContextManager[Environment]]


def _checked_chain(env: Environment, dataset: DatasetConfig) -> partition_checks.CheckedChain:
    """The dataset's chain read, verified (`distrusted` too) and replayed once, for every verdict."""
    # nor is it another history than its stored log and checkpoints hold, or, with the operator's key,
    # one holding an event the key should have signed (as a run reads it)
    return partition_checks.read_distrusted_chain(env, dataset.name, dataset.versionLabel)


def _keys_of_step(
    context: dg.AssetCheckExecutionContext,
    env: Environment,
    dataset: DatasetConfig,
    chain: partition_checks.CheckedChain,
) -> list[str]:
    """The run's partitions, each checked as the asset's run checks it (a dynamic key added by hand off
    the ledger grid fails the step naming it); outside a partitioned run (a check launched alone),
    every committed one: each with a commit point in the lake, and each the chain says has a current
    version (one whose commit point was deleted fails: the lake alone would leave it unchecked)."""
    if context.has_partition_key or context.has_partition_key_range:
        keys = run_partition_keys(context, dataset.name)
        partition_groups_for_keys(dataset, partitions_def_for(dataset), keys)
        return keys
    in_lake = committed_keys(env.lake, dataset.name, dataset.versionLabel)
    on_chain = (k for k, history in chain.replayed.partitions.items() if history.current is not None)
    return sorted({*in_lake, *on_chain})


def _verdicts(
    env: Environment, dataset: DatasetConfig, keys: list[str], chain: partition_checks.CheckedChain
) -> Iterator[tuple[str, dict[str, Verdict]]]:
    """Each key's three verdicts: its files read once, against `chain` (`_checked_chain`)."""
    policies = NormalizedPolicies.from_policies(dataset.policies)
    existing = list(dataset.existingTargetIds)
    for key in keys:
        part = partition_checks.read_committed(env.lake, dataset.name, dataset.versionLabel, key)
        yield (
            key,
            {
                RECONCILIATION: partition_checks.reconciliation(part),
                AUDIT_CHAIN: partition_checks.chain_verdict(part, chain),
                POLICY_COMPLIANCE: partition_checks.compliance(part, policies, existing),
            },
        )


def latest_materializations(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, keys: list[str]
) -> dict[str, AssetCheckEvaluationTargetMaterializationData]:
    """The latest materialization of each of `keys` (two queries), as a check evaluation's target."""
    ids = instance.event_log_storage.get_latest_storage_id_by_partition(
        asset_key, dg.DagsterEventType.ASSET_MATERIALIZATION, set(keys)
    )
    if not ids:
        return {}
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, storage_ids=list(ids.values())), limit=len(ids)
    ).records
    return {
        str(r.partition_key): AssetCheckEvaluationTargetMaterializationData(
            storage_id=r.storage_id, run_id=r.run_id, timestamp=r.timestamp
        )
        for r in records
    }


def failing_partitions(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partitions_def: dg.PartitionsDefinition
) -> dict[str, list[str]]:
    """{check name: keys whose latest evaluation (of their latest materialization) failed}, as the
    Dagster instance records them: the check's Partitions tab."""
    from dagster._core.definitions.partitions.context import partition_loading_context
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionResolvedStatus
    from dagster._core.storage.asset_check_state import AssetCheckState, bulk_update_asset_check_state

    keys = [(dg.AssetCheckKey(asset_key, name), partitions_def) for name in PER_PARTITION]
    failing: dict[str, list[str]] = {}
    with partition_loading_context(dynamic_partitions_store=instance):  # dynamic partitions' keys
        empty = {key: AssetCheckState.empty() for key, _ in keys}
        states = bulk_update_asset_check_state(instance, keys, empty)
        for key, _ in keys:
            subset = states[key].subsets.get(AssetCheckExecutionResolvedStatus.FAILED)
            found = sorted(subset.subset_value.get_partition_keys()) if subset is not None else []
            if found:
                failing[key.name] = found
    return failing


def _health_evaluation(asset_key: dg.AssetKey, failing: dict[str, list[str]]) -> dg.AssetCheckEvaluation:
    """`partition_health` as an evaluation (as the partitioned checks' are), not an `AssetCheckResult`:
    a result makes Dagster look up the asset's data version for the run's partitions, which a run of
    the checks job launched without a partition range does not have (every step failed with
    `DagsterInvariantViolationError: Cannot access partition_key for a non-partitioned run`)."""
    blocking = sorted({k for name, ks in failing.items() if PER_PARTITION[name] for k in ks})
    every = sorted({k for ks in failing.values() for k in ks})
    metadata: dict[str, Any] = {
        "failing_partitions": len(every),
        **{f"failing/{name}": len(failing.get(name, [])) for name in PER_PARTITION},
    }
    if every:
        metadata["first_failing"] = dg.MetadataValue.json(
            {name: ks[:MAX_LISTED] for name, ks in failing.items()}
        )
    return dg.AssetCheckEvaluation(
        asset_key=asset_key,
        check_name=PARTITION_HEALTH,
        passed=not every,
        severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
        metadata=metadata,
        description=(
            f"{len(every)} partition(s) fail: "
            + "; ".join(
                f"{name} {', '.join(ks[:5])}{' ...' if len(ks) > 5 else ''}" for name, ks in failing.items()
            )
            if every
            else "every partition's latest check evaluation passes"
        ),
    )


def _partitioned_checks(
    asset: dg.AssetsDefinition, dataset: DatasetConfig, open_env: OpenEnvironment
) -> dg.AssetChecksDefinition:
    asset_key = asset.key
    partitions_def = asset.partitions_def
    assert partitions_def is not None
    specs = [
        dg.AssetCheckSpec(
            name,
            asset=asset,
            blocking=blocking,
            partitions_def=partitions_def,
            description=DESCRIPTIONS[name],
        )
        for name, blocking in PER_PARTITION.items()
    ]
    specs.append(dg.AssetCheckSpec(PARTITION_HEALTH, asset=asset, description=DESCRIPTIONS[PARTITION_HEALTH]))
    evaluation_outputs: list[str] = []

    @dg.multi_asset_check(
        specs=specs,
        name=f"{asset_key.to_python_identifier()}_partition_checks",
        description="Each partition re-read once: reconciliation, audit_chain, policy_compliance; then "
        "partition_health over every partition",
    )
    def partition_checks_step(
        context: dg.AssetCheckExecutionContext, pcbo: PcboEngineResource
    ) -> Iterator[dg.AssetCheckEvaluation | dg.AssetCheckResult | dg.Output]:
        with open_env(pcbo) as env:
            chain = _checked_chain(env, dataset)
            keys = _keys_of_step(context, env, dataset, chain)
            targets = latest_materializations(context.instance, asset_key, keys)
            failed: dict[str, int] = {}
            for key, verdicts in _verdicts(env, dataset, keys, chain):
                for name, verdict in verdicts.items():
                    if not verdict.passed:
                        failed[name] = failed.get(name, 0) + 1
                    yield dg.AssetCheckEvaluation(
                        asset_key=asset_key,
                        check_name=name,
                        passed=verdict.passed,
                        partition=key,
                        metadata=check_metadata(_details(name, verdict)),
                        target_materialization_data=targets.get(key),
                        blocking=PER_PARTITION[name],
                        description=None if verdict.passed else f"partition {key} failed {name}",
                    )
        context.log.info(
            f"{len(keys)} partition(s) checked: "
            + ", ".join(f"{name} {failed.get(name, 0)} failed" for name in PER_PARTITION)
        )
        yield _health_evaluation(asset_key, failing_partitions(context.instance, asset_key, partitions_def))
        for output_name in evaluation_outputs:  # every check's results are the evaluations
            yield dg.Output(None, output_name=output_name)

    evaluation_outputs.extend(partition_checks_step.check_specs_by_output_name)
    return partition_checks_step


def _run_level_checks(
    asset: dg.AssetsDefinition, dataset: DatasetConfig, open_env: OpenEnvironment
) -> dg.AssetChecksDefinition:
    """The three checks unpartitioned (`checkGranularity: run`): one evaluation each per run."""
    asset_key = asset.key
    specs = [
        dg.AssetCheckSpec(name, asset=asset, blocking=blocking, description=DESCRIPTIONS[name])
        for name, blocking in PER_PARTITION.items()
    ]

    @dg.multi_asset_check(
        specs=specs,
        name=f"{asset_key.to_python_identifier()}_run_checks",
        description="The run's partitions re-read once: reconciliation, audit_chain, policy_compliance",
    )
    def run_checks_step(
        context: dg.AssetCheckExecutionContext, pcbo: PcboEngineResource
    ) -> Iterator[dg.AssetCheckResult]:
        failed: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in PER_PARTITION}
        with open_env(pcbo) as env:
            chain = _checked_chain(env, dataset)
            keys = _keys_of_step(context, env, dataset, chain)
            for key, verdicts in _verdicts(env, dataset, keys, chain):
                for name, verdict in verdicts.items():
                    if not verdict.passed:
                        failed[name][key] = verdict.details
        for name in PER_PARTITION:
            metadata: dict[str, Any] = {
                "partitions_checked": len(keys),
                "partitions_failed": len(failed[name]),
            }
            if keys:
                metadata["first_partition"], metadata["last_partition"] = keys[0], keys[-1]
            if failed[name]:
                first = next(iter(failed[name]))
                metadata["failed_partitions"] = dg.MetadataValue.json(list(failed[name])[:MAX_LISTED])
                metadata["first_failure"] = dg.MetadataValue.json({"partition": first, **failed[name][first]})
            yield dg.AssetCheckResult(
                asset_key=asset_key,
                check_name=name,
                passed=not failed[name],
                metadata=metadata,
                description=(
                    f"{len(failed[name])} of {len(keys)} partition(s) failed {name}" if failed[name] else None
                ),
            )

    return run_checks_step


def build_dataset_checks(
    config: DatasetsConfig, dataset: DatasetConfig, asset: dg.AssetsDefinition, stage: str | None = None
) -> list[dg.AssetChecksDefinition]:
    """The dataset asset's checks; `stage="staging"` reads a rollout dataset's staging environment."""
    partitions_def = asset.partitions_def

    def open_env(pcbo: PcboEngineResource) -> AbstractContextManager[Environment]:
        return pcbo.environment_for(config, dataset, stage)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=dg.PreviewWarning)
        per_partition = (
            _partitioned_checks(asset, dataset, open_env)
            if dataset.checkGranularity == "partition"
            else _run_level_checks(asset, dataset, open_env)
        )

    @dg.asset_check(asset=asset, name=COVERAGE, description=DESCRIPTIONS[COVERAGE])
    def coverage_check(
        context: dg.AssetCheckExecutionContext, pcbo: PcboEngineResource
    ) -> dg.AssetCheckResult:
        assert partitions_def is not None
        keys = list(partitions_def.get_partition_keys(dynamic_partitions_store=context.instance))
        with open_env(pcbo) as env:
            in_lake = committed_keys(env.lake, dataset.name, dataset.versionLabel)
            verdict = partition_checks.coverage(_checked_chain(env, dataset), in_lake, keys)
        return dg.AssetCheckResult(
            passed=verdict.passed,
            metadata=check_metadata(verdict.details),
            severity=dg.AssetCheckSeverity.WARN,
            description=verdict.summary,
        )

    return [per_partition, coverage_check]

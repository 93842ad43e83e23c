"""Staging and production assets of a rollout dataset (a dataset with a `rollout` block).

- `staging/<dataset>`: materializing a partition range applies it to staging as a rollout
  (`rollout/staging_apply.py`): throttled, pausable and cancellable between partitions, then halted
  for review with a backfill summary. Run config (launchpad): `rollout` (name; default
  `<dataset>-<first>-<last>`), `by`, `partitions_per_minute` / `records_per_minute` (override the
  dataset's throttle). The throttle's waits are logged and recorded in each partition's metadata.
- `production/<dataset>`: materialized by the promotion sensor (`rollout/sensors.py`) for a
  rollout whose gate is open, or by hand for partitions of a promoted rollout (a repair). Either way
  the run goes through the same gate or approval check and writes with the approved decision hash;
  a closed gate fails the run with every reason, nothing written. Who promotes is the run's
  `pcbo/promoted_by` tag (the sensor sets it), else `dagster run <run id>`.

Both use the engine through the `pcbo` resource and the rollout operations (`rollout/operations.py`),
the same code the `pcbo rollout` commands run.
"""

import warnings
from typing import Any

import dagster as dg
from pydantic import Field

from pcbo_dagster.catalog.rollouts import RolloutRow
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.dagster_defs.backfill.steps import (
    engine_errors,
    log_execution,
    no_partitions,
    partition_metadata,
)
from pcbo_dagster.dagster_defs.partitions import partitions_def_for, run_partition_keys
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.rollout import operations, promotion
from pcbo_dagster.rollout.clock import Clock

STAGING_PREFIX = "staging"
PRODUCTION_PREFIX = "production"
ROLLOUT_TAG = "pcbo/rollout"
#: The asset tag naming a rollout asset's stage (staging or production).
STAGE_TAG = "pcbo/stage"
#: The run tag naming who promotes (recorded on the audit chain and in the rollout log).
PROMOTED_BY_TAG = "pcbo/promoted_by"


def staging_key(dataset: DatasetConfig) -> dg.AssetKey:
    return dg.AssetKey([STAGING_PREFIX, dataset.asset_name])


def production_key(dataset: DatasetConfig) -> dg.AssetKey:
    return dg.AssetKey([PRODUCTION_PREFIX, dataset.asset_name])


class StagingApplyConfig(dg.Config):
    rollout: str = Field(default="", description="Rollout name; default <dataset>-<first key>-<last key>")
    by: str = Field(default="dagster", description="Who starts the rollout (recorded in its history)")
    partitions_per_minute: float | None = Field(default=None, description="Override the configured throttle")
    records_per_minute: float | None = Field(default=None, description="Override the configured throttle")
    poll_seconds: float = Field(default=1.0, description="How often a paused apply checks for resume")


def _record(
    context: dg.AssetExecutionContext, dataset: DatasetConfig, document: dict[str, Any], extra: dict
) -> None:
    counts = document["counts"]
    for outcome in document["partitions"]:
        metadata = partition_metadata(dataset, outcome, counts[outcome["key"]], document)
        context.add_asset_metadata({**metadata, **extra}, partition_key=outcome["key"])


def build_staging_asset(config: DatasetsConfig, dataset: DatasetConfig, clock: Clock) -> dg.AssetsDefinition:
    assert dataset.rollout is not None
    source_uri = config.source_uri(dataset)
    datasets = config

    def staging(
        context: dg.AssetExecutionContext, config: StagingApplyConfig, pcbo: PcboEngineResource
    ) -> dg.MaterializeResult:
        keys = run_partition_keys(context, dataset.name)
        if not keys:
            raise no_partitions(dataset)
        throttle = {
            "partitionsPerMinute": config.partitions_per_minute,
            "recordsPerMinute": config.records_per_minute,
        }
        with engine_errors(source_uri):
            result = operations.start(
                datasets,
                pcbo.settings(),
                dataset.name,
                keys[0],
                keys[-1],
                by=config.by,
                name=config.rollout or None,
                throttle=throttle,
                clock=clock,
                log=context.log.info,
                poll_seconds=config.poll_seconds,
                metadata={"orchestrator": "dagster", "dagsterRunId": context.run.run_id},
            )
        if not result.get("applied"):
            context.log.info(f"rollout {result['rollout']} is {result['status']}: nothing applied")
            return dg.MaterializeResult()
        document = result["execute"]
        log_execution(context, document)
        extra = {
            "rollout": dg.MetadataValue.text(result["rollout"]),
            "stage": dg.MetadataValue.text("staging"),
            "throttle": dg.MetadataValue.text(document["throttle"]["describe"]),
            "throttle_waited_seconds": dg.MetadataValue.float(document["throttle"]["waitedSeconds"]),
            "backfill_summary": dg.MetadataValue.path(result["summary"]["markdown"]),
        }
        _record(context, dataset, document, extra)
        if result["status"] == "cancelled":
            raise dg.Failure(
                description=f"rollout {result['rollout']} was cancelled after {len(document['partitions'])} "
                "partition(s); what was committed stays in staging until rolled back",
                metadata={"backfill_summary": dg.MetadataValue.path(result["summary"]["markdown"])},
                allow_retries=False,
            )
        context.log.info(
            f"rollout {result['rollout']} halted for review: soak monitor next, then approval "
            f"(`pcbo approve {result['rollout']}` or the rollout_approval job)"
        )
        return dg.MaterializeResult()

    staging.__name__ = f"staging_{dataset.asset_name}"
    return _asset(dataset, staging_key(dataset), staging, "Staging apply of a staged rollout", deps=None)


def build_production_asset(
    config: DatasetsConfig, dataset: DatasetConfig, staging_asset: dg.AssetsDefinition, clock: Clock
) -> dg.AssetsDefinition:
    source_uri = config.source_uri(dataset)

    def production(context: dg.AssetExecutionContext, pcbo: PcboEngineResource) -> dg.MaterializeResult:
        keys = run_partition_keys(context, dataset.name)
        if not keys:
            raise no_partitions(dataset)
        base = pcbo.settings()
        name = context.run.tags.get(ROLLOUT_TAG) or _rollout_covering(base, dataset, keys)
        context.log.info(f"production: {len(keys)} partition(s) {keys[0]}..{keys[-1]} of rollout {name}")
        with engine_errors(source_uri):
            rollout = operations.find_rollout(base, name)
            if rollout["dataset"] != dataset.name:  # the tag is typed in the launchpad: another dataset's
                raise InvalidInput(ROLLOUT_TAG, f"rollout {name!r} is not a rollout of {dataset.name}")
            if rollout["status"] == "promoted":
                document = _repair(config, dataset, base, rollout, keys, context.run.run_id)
            else:
                result = operations.promote(
                    config,
                    base,
                    name,
                    by=context.run.tags.get(PROMOTED_BY_TAG) or f"dagster run {context.run.run_id}",
                    clock=clock,
                    keys=keys,
                    run_id=promotion.production_run_id(name),
                )
                gate = result["gate"]
                context.log.info(
                    f"promotion gate open for {name}: approved by {gate['approval']['actor']} "
                    f"({gate['approval']['reason']}), decisions {gate['decisionHashNow']}, "
                    f"soak {gate['soak']['state']}"
                )
                document = result["execute"]
        log_execution(context, document)
        _record(
            context,
            dataset,
            document,
            {"rollout": dg.MetadataValue.text(name), "stage": dg.MetadataValue.text("production")},
        )
        return dg.MaterializeResult()

    production.__name__ = f"production_{dataset.asset_name}"
    return _asset(
        dataset,
        production_key(dataset),
        production,
        "Production, promoted from staging behind the gate",
        deps=[staging_asset],
    )


def _repair(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    base: Any,
    rollout: RolloutRow,
    keys: list[str],
    run_id: str,
) -> dict:
    """Re-write partitions of a promoted rollout at its approved decision hash (a repair)."""
    with operations.dataset_environments(config, dataset, base) as envs:
        approval = promotion.repair_approval(envs, rollout)  # promoted by the production chain
        return promotion.promote_keys(
            config,
            dataset,
            envs,
            rollout,
            keys,
            decision_hash=approval["decision_hash"],
            run_id=promotion.production_run_id(rollout["name"], "repair-" + run_id[:8]),
        )


def _rollout_covering(base: Any, dataset: DatasetConfig, keys: list[str]) -> str:
    """The newest soaking or promoted rollout of the dataset that holds every key."""
    listed = operations.list_rollouts(base, dataset.name)["rollouts"]
    for row in reversed(listed):
        if row["status"] not in ("soaking", "promoted"):
            continue
        rollout = operations.find_rollout(base, row["name"])
        if set(keys) <= set(rollout["partition_keys"]):
            return row["name"]
    raise dg.Failure(
        description=f"no rollout of {dataset.name} applied to staging holds {keys[0]}..{keys[-1]}: "
        "start one by materializing the staging asset (or `pcbo rollout start`)",
        allow_retries=False,
    )


def _asset(
    dataset: DatasetConfig,
    key: dg.AssetKey,
    fn: Any,
    description: str,
    deps: list[dg.AssetsDefinition] | None,
) -> dg.AssetsDefinition:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=dg.BetaWarning)
        return dg.asset(
            key=key,
            # Staging and production in their own groups: the asset graph boxes them apart (both
            # nodes are labelled with the dataset's name; the key, group, kind and tag tell them apart).
            group_name=key.path[0],
            partitions_def=partitions_def_for(dataset),
            backfill_policy=dg.BackfillPolicy.single_run(),
            pool=dataset.pool_name,
            kinds={"parquet", key.path[0]},
            tags={STAGE_TAG: key.path[0]},
            deps=deps,
            description=f"{key.path[0].upper()}: {description} ({dataset.description or dataset.name})",
            metadata={
                "dataset": dg.MetadataValue.text(dataset.name),
                "version_label": dg.MetadataValue.text(dataset.versionLabel),
                "stage": dg.MetadataValue.text(key.path[0]),
                "rollout": dg.MetadataValue.json(dataset.rollout.model_dump() if dataset.rollout else {}),
            },
        )(fn)

"""One partitioned, graph-backed asset per configured dataset: four ops, one run for a range.

    <dataset>__policy_gate -> <dataset>__parquet_emission -> <dataset>__audit_chain_append
        -> <dataset>__reconciliation

(`steps.py`: each op is one phase of the engine's commit protocol over all the run's partitions, with
its own logs, duration and output metadata; handles pass between them, never tables.) A run covers one
partition or a range of them (a backfill with `BackfillPolicy.single_run()` or `multi_run(N)` from the
config); the reconciliation op records one materialization per partition key with that partition's
metadata. The asset writes its own parquet through the engine, never through an IO manager (its output
is `Nothing`).

Engine outcomes map to Dagster as: invalid input (a bad source, a bad config value the engine refuses)
and a gate (`onViolation: block` with breaches) fail the policy gate without retries and without
writing anything; a partition whose lake disagrees with its audit chain fails the run naming what
happened and what to do (nothing rolled back); a failed post-write check fails it with the
reconciliation report attached (the engine has rolled that partition back and logged a discrepancy).
Partitions reconciled before a failure keep their materializations.
"""

import warnings

import dagster as dg

from pcbo_dagster.dagster_defs.backfill.handle_storage import HANDLE_IO_MANAGER, HANDLE_IO_MANAGER_KEY
from pcbo_dagster.dagster_defs.backfill.steps import build_steps
from pcbo_dagster.dagster_defs.partitions import partitions_def_for
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.io.redaction import redact_url

#: The asset group of the datasets loaded directly (not by staged rollout).
GROUP_NAME = "pcbo"


def backfill_policy_for(dataset: DatasetConfig) -> dg.BackfillPolicy:
    bp = dataset.backfillPolicy
    if bp.kind == "single_run":
        return dg.BackfillPolicy.single_run()
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=bp.maxPartitionsPerRun or 1)


def build_dataset_asset(config: DatasetsConfig, dataset: DatasetConfig) -> dg.AssetsDefinition:
    """The partitioned asset of one dataset (name = the dataset name with `[^A-Za-z0-9_]` as `_`)."""
    partitions_def = partitions_def_for(dataset)
    source_uri = config.source_uri(dataset)
    lake = config.lake_url(dataset)
    asset_key = dg.AssetKey([dataset.asset_name])

    def source_of(pcbo: PcboEngineResource) -> str:
        # Relative source paths resolve against the sources resource's base_dir, else the config's.
        return pcbo.sources.resolve(dataset.source.uri, config.sources_dir)

    policy_gate, parquet_emission, audit_chain_append, reconciliation = build_steps(
        dataset, partitions_def, source_of, lake, asset_key
    )

    def compose() -> None:
        return reconciliation(audit_chain_append(parquet_emission(policy_gate())))

    compose.__name__ = dataset.asset_name
    with warnings.catch_warnings():
        # `backfill_policy` is beta in Dagster 1.13: known and intended, not a warning on every load.
        warnings.simplefilter("ignore", category=dg.BetaWarning)
        return dg.graph_asset(
            name=dataset.asset_name,
            group_name=GROUP_NAME,
            partitions_def=partitions_def,
            backfill_policy=backfill_policy_for(dataset),
            resource_defs={HANDLE_IO_MANAGER_KEY: HANDLE_IO_MANAGER},
            kinds={"parquet"},
            description=(dataset.description or f"pcbo dataset {dataset.name}")
            + " (steps: policy gate, parquet emission, audit chain append, reconciliation)",
            metadata={
                "dataset": dg.MetadataValue.text(dataset.name),
                "version_label": dg.MetadataValue.text(dataset.versionLabel),
                "audit_chain_key": dg.MetadataValue.text(dataset.chain_key),
                "partitioning": dg.MetadataValue.json(dataset.partitioning.model_dump()),
                "source": dg.MetadataValue.text(redact_url(source_uri)),
                "policies": dg.MetadataValue.json(dataset.policies.model_dump()),
                "existing_target_ids": dg.MetadataValue.int(len(dataset.existingTargetIds)),
                "pool": dg.MetadataValue.text(dataset.pool_name),
            },
        )(compose)

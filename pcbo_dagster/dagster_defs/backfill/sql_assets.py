"""A dataset whose target is a SQL table (issue 15), as a partitioned asset like the others, with a
blocking read-back check.

Materializing a partition range runs the engine exactly as `pcbo execute` does with the dataset's
`target`: the policy decisions, each record's outcome against the live table, the gates (a conflict
under `conflict: fail`, a stale `expectedDecisionHash`) before anything is written, then the chunked
apply with its journal, audit events, read-back and catalog rows (`engine/sql_apply.py`). One
materialization per partition key records the counts (inserted, updated, skipped, refused, failed),
the Merkle root over the applied ids, the journal digest, the audit event and the rollback script.

The asset runs in the pool of its target table (`DatasetConfig.pool_name`: `pcbo-sql-<table>-<hash of
the database URL>` unless configured), so Dagster queues every run writing that table; the engine's
scoped lock queues runs from anywhere else (the CLI, other code locations). The `sql_read_back` check
(blocking) reads each partition's applied rows back from the table and recomputes the Merkle root
(`engine/sql_verify.partition_read_back`).
"""

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dagster as dg

from pcbo_dagster.core.errors import Blocked, InvalidInput
from pcbo_dagster.core.sql_outcomes import TargetDecisions
from pcbo_dagster.dagster_defs.backfill.steps import partition_groups_for_keys
from pcbo_dagster.dagster_defs.partitions import partitions_def_for, run_partition_keys
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.datasets.requests import Span, request_for_group
from pcbo_dagster.engine import partition_checks
from pcbo_dagster.engine.execute import check_gates, execute
from pcbo_dagster.engine.request_loading import evaluate, load_request
from pcbo_dagster.engine.sql_apply import ApplyFailed
from pcbo_dagster.engine.sql_verify import partition_read_back
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.targets.sql_table import SqlTable

GROUP_NAME = "pcbo"
READ_BACK = "sql_read_back"


@contextmanager
def _engine_failures(source_uri: str) -> Iterator[None]:
    """Engine outcomes as Dagster failures, none worth retrying."""
    try:
        yield
    except InvalidInput as exc:
        raise dg.Failure(
            description=f"invalid input: {exc} (source {redact_url(source_uri)})",
            metadata={"field": exc.field, "message": exc.message},
            allow_retries=False,
        ) from exc
    except Blocked as exc:
        raise dg.Failure(
            description=f"blocked by the {exc.document.get('gate')} gate, nothing written: {exc}",
            metadata={"gate": dg.MetadataValue.json(exc.document)},
            allow_retries=False,
        ) from exc
    except ApplyFailed as exc:
        raise dg.Failure(
            description=f"the apply stopped: {exc}",
            metadata={"reconciliation": dg.MetadataValue.json(exc.document.get("reconciliation", {}))},
            allow_retries=False,
        ) from exc


def _groups(context: dg.AssetExecutionContext, dataset: DatasetConfig) -> Sequence[Sequence[Span]]:
    """The run's partitions as engine request groups, as the lake datasets' steps make them (a range
    that holds no partition, or a key off the ledger grid, fails naming it)."""
    return partition_groups_for_keys(
        dataset, context.assets_def.partitions_def, run_partition_keys(context, dataset.name)
    )


def sql_partition_metadata(outcome: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    """What one partition's materialization records."""
    counts = outcome["counts"]
    metadata: dict[str, Any] = {
        "status": dg.MetadataValue.text(outcome["status"]),
        "dagster/row_count": dg.MetadataValue.int(outcome["recordCount"]),
        **{
            name: dg.MetadataValue.int(counts[name])
            for name in ("inserted", "updated", "skipped", "refused", "failed")
        },
        "merkle_root": dg.MetadataValue.text(outcome["merkleRoot"]),
        "plan_hash": dg.MetadataValue.text(document["planHash"]),
        "decision_hash": dg.MetadataValue.text(document["decisionHash"]),
        "policy_decision_hash": dg.MetadataValue.text(document["policyDecisionHash"]),
        "target": dg.MetadataValue.text(outcome["target"]),
        "audit_event_hash": dg.MetadataValue.text(outcome["eventHash"]),
        "pcbo_run_id": dg.MetadataValue.text(document["runId"]),
    }
    if outcome.get("failures"):
        metadata["failures"] = dg.MetadataValue.json(outcome["failures"][:50])
    if outcome.get("journal"):
        metadata["journal_digest"] = dg.MetadataValue.text(outcome["journal"]["digest"])
    script = document.get("rollbackScript")
    if script:
        metadata["rollback_script"] = dg.MetadataValue.path(script["path"])
        metadata["rollback_script_checksum"] = dg.MetadataValue.text(script["checksum"])
    return metadata


def build_sql_dataset_asset(config: DatasetsConfig, dataset: DatasetConfig) -> dg.AssetsDefinition:
    """The partitioned asset of a dataset with a SQL target (name as for a lake dataset)."""
    target = dataset.target
    assert target is not None
    bp = dataset.backfillPolicy
    backfill_policy = (
        dg.BackfillPolicy.single_run()
        if bp.kind == "single_run"
        else dg.BackfillPolicy.multi_run(max_partitions_per_run=bp.maxPartitionsPerRun or 1)
    )

    def compute(context: dg.AssetExecutionContext, pcbo: PcboEngineResource) -> dg.MaterializeResult:
        source = pcbo.sources.resolve(dataset.source.uri, config.sources_dir)
        groups = _groups(context, dataset)
        base = f"dagster-{context.run.run_id}"
        run_ids = [base if len(groups) == 1 else f"{base}.{i}" for i in range(len(groups))]
        context.log.info(
            f"{dataset.name}: {sum(len(g) for g in groups)} partition(s) into {target.table} at "
            f"{redact_url(target.url)} as {len(groups)} engine request(s)"
        )
        with _engine_failures(source):
            evaluated = []
            for run_id, group in zip(run_ids, groups, strict=True):  # every gate before any write
                keys = [span.key for span in group]
                request = request_for_group(
                    dataset,
                    source,
                    run_id,
                    group,
                    {"orchestrator": "dagster", "dagsterRunId": context.run.run_id},
                )
                loaded = load_request(json.dumps(request).encode("utf-8"))
                plan, decisions = evaluate(loaded)
                assert isinstance(decisions, TargetDecisions)
                if [p.key for p in plan.partitions] != keys:
                    raise dg.Failure(
                        description="the engine's partitions do not line up", allow_retries=False
                    )
                check_gates(loaded, decisions)
                context.log.info(
                    f"gates passed for {keys[0]}..{keys[-1]}: outcomes "
                    f"{json.dumps(decisions.target_totals())}; decisions {decisions.decision_hash}"
                )
                evaluated.append((loaded, plan, decisions))
            with pcbo.environment() as env:
                for loaded, plan, decisions in evaluated:
                    document = execute(env, loaded, plan, decisions)
                    totals = document["totals"]
                    context.log.info(
                        f"applied into {target.table}: {totals['inserted']} inserted, "
                        f"{totals['updated']} updated, {totals['skipped']} skipped, {totals['refused']} "
                        f"refused, {totals['failed']} failed; reconciliation "
                        f"{document['reconciliation']['status']}"
                    )
                    for outcome in document["partitions"]:
                        context.add_asset_metadata(
                            sql_partition_metadata(outcome, document), partition_key=outcome["key"]
                        )
        return dg.MaterializeResult()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=dg.BetaWarning)
        return dg.asset(
            name=dataset.asset_name,
            group_name=GROUP_NAME,
            partitions_def=partitions_def_for(dataset),
            backfill_policy=backfill_policy,
            pool=dataset.pool_name,
            kinds={"sql"},
            description=dataset.description or f"pcbo dataset {dataset.name} into SQL table {target.table}",
            metadata={
                "dataset": dg.MetadataValue.text(dataset.name),
                "version_label": dg.MetadataValue.text(dataset.versionLabel),
                "audit_chain_key": dg.MetadataValue.text(dataset.chain_key),
                "target": dg.MetadataValue.text(f"{redact_url(target.url)}#{target.table}"),
                "conflict": dg.MetadataValue.text(target.conflict),
                "policies": dg.MetadataValue.json(dataset.policies.model_dump()),
            },
        )(compute)


def build_sql_dataset_checks(
    config: DatasetsConfig, dataset: DatasetConfig, asset: dg.AssetsDefinition
) -> list[dg.AssetChecksDefinition]:
    """The blocking `sql_read_back` check, one evaluation per partition key of the run."""
    target = dataset.target
    assert target is not None
    asset_key = asset.key

    def evaluations(context: dg.AssetCheckExecutionContext, pcbo: PcboEngineResource) -> Iterator[Any]:
        with pcbo.environment() as env:
            # The chain as the audit_chain check reads it: the backup verified against the catalog's head,
            # its stored log and checkpoints and, with the operator's key, every event signed.
            chain = partition_checks.read_distrusted_chain(env, dataset.name, dataset.versionLabel)
            state = chain.replayed
            histories = [h for (_, key), h in sorted(state.sql.items()) if h.applies]
            keys = (
                run_partition_keys(context, dataset.name)
                if context.has_partition_key or context.has_partition_key_range
                else sorted({h.key for h in histories if h.current is not None})
            )
            table = None
            if histories:
                layout = max(histories, key=lambda h: h.applies[-1].intent_seq).applies[-1].intent["layout"]
                table = SqlTable.reopen(target.url, layout, write=False)
            try:
                for key in keys:
                    details: dict[str, Any]
                    if chain.findings:  # a chain that does not verify vouches for no row
                        passed, details = (
                            False,
                            {
                                "finding": "the audit chain does not verify",
                                "chain_findings": chain.findings[: partition_checks.MAX_LISTED],
                            },
                        )
                    elif table is not None:
                        passed, details = partition_read_back(table, state, key)
                    else:
                        passed, details = False, {"finding": "nothing applied yet"}
                    yield dg.AssetCheckEvaluation(
                        asset_key=asset_key,
                        check_name=READ_BACK,
                        passed=passed,
                        partition=key,
                        metadata={
                            k: dg.MetadataValue.json(v) if isinstance(v, list) else v
                            for k, v in details.items()
                        },
                        blocking=True,
                        description=None if passed else f"partition {key} does not read back as applied",
                    )
            finally:
                if table is not None:
                    table.close()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=dg.PreviewWarning)

        @dg.asset_check(
            asset=asset,
            name=READ_BACK,
            blocking=True,
            partitions_def=asset.partitions_def,
            description="The applied rows read back from the table: digests and the Merkle root recomputed",
        )
        def read_back(context: dg.AssetCheckExecutionContext, pcbo: PcboEngineResource):  # noqa: ANN201
            yield from evaluations(context, pcbo)
            yield dg.Output(None)

    return [read_back]

"""One partitioned asset per configured dataset; materializing it runs the engine for its partitions.

A run covers one partition or a range of them (a backfill with `BackfillPolicy.single_run()` or
`multi_run(N)` from the config). The asset turns its partition range into engine requests (one
per run of contiguous, equal-length windows: a single request for hourly or daily ranges; for a
ledger-range dataset one `ledgerRange` request per run of contiguous `range=S-E` keys, `first` = S
of the first key, `end` = E+1 of the last, `partitionSize` from the config) and runs
the engine's steps through the `pcbo` resource: policy gate (`load_request`, `evaluate`,
`check_gates`), then `execute` (parquet emission, commit, audit chain append, post-write
reconciliation, catalog). It writes its own parquet through the engine, never through an IO manager,
and records one materialization per partition key, each with that partition's metadata.

Engine outcomes map to Dagster as: invalid input (a bad source, a bad config value the engine
refuses) and a gate (`onViolation: block` with breaches) fail the run without retries and without
writing anything; a failed post-write check fails it with the reconciliation report attached (the
engine has already rolled that partition back and logged a discrepancy).
"""

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dagster as dg

from pcbo_dagster.core.decisions import REASONS, Decisions
from pcbo_dagster.core.errors import Blocked, InvalidInput
from pcbo_dagster.core.partition_keys import PartitionKeyError
from pcbo_dagster.core.plan import Plan
from pcbo_dagster.dagster_defs.partitions import partitions_def_for, windows_for_keys
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import (
    DatasetConfig,
    DatasetsConfig,
    LedgerRangePartitioning,
    TimeWindowPartitioning,
)
from pcbo_dagster.datasets.requests import (
    Span,
    ledger_spans_for_keys,
    partition_groups,
    request_for_group,
)
from pcbo_dagster.engine.events import chain_key
from pcbo_dagster.engine.execute import ExecuteFailed, check_gates, execute
from pcbo_dagster.engine.request_loading import LoadedRequest, evaluate, load_request
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.sources.zones import ZoneIndexStore

GROUP_NAME = "pcbo"
#: The asset's context, or the request job's op context (the loggers below only use `context.log`).
AnyContext = dg.AssetExecutionContext | dg.OpExecutionContext


def engine_run_id(dagster_run_id: str, group_index: int, group_count: int) -> str:
    """The engine's runId for one request of a Dagster run (`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`)."""
    base = f"dagster-{dagster_run_id}"
    return base if group_count == 1 else f"{base}.{group_index}"


def partition_metadata(
    dataset: DatasetConfig,
    outcome: dict[str, Any],
    counts: dict[str, Any],
    plan_hash: str,
    decision_hash: str,
    run_id: str,
) -> dict[str, Any]:
    """What one partition's materialization records: numbers as numbers, digests as text, URIs as URLs."""
    files = outcome["files"]
    metadata: dict[str, Any] = {
        "dagster/row_count": dg.MetadataValue.int(outcome["recordCount"]),
        "status": dg.MetadataValue.text(outcome["status"]),
        "partition_version": dg.MetadataValue.int(outcome["version"]),
        **_bounds_metadata(dataset, outcome),
        "source_count": dg.MetadataValue.int(counts["source"]),
        "add_count": dg.MetadataValue.int(counts["add"]),
        "omit_count": dg.MetadataValue.int(counts["omit"]),
        **{
            f"omitted/{reason}": dg.MetadataValue.int(int(counts["byReason"].get(reason, 0)))
            for reason in REASONS
        },
        "merkle_root": dg.MetadataValue.text(outcome["merkleRoot"]),
        "plan_hash": dg.MetadataValue.text(plan_hash),
        "decision_hash": dg.MetadataValue.text(decision_hash),
        "audit_event_hash": dg.MetadataValue.text(outcome["eventHash"]),
        "audit_chain_key": dg.MetadataValue.text(chain_key(dataset.name, dataset.versionLabel)),
        "manifest": dg.MetadataValue.url(outcome["manifest"]),
        "manifest_checksum": dg.MetadataValue.text(outcome["manifestChecksum"]),
        "rollback_manifest": dg.MetadataValue.url(outcome["rollbackManifest"]),
        "file_count": dg.MetadataValue.int(len(files)),
        "files": dg.MetadataValue.json(files),
        "pcbo_run_id": dg.MetadataValue.text(run_id),
    }
    for index, entry in enumerate(files):
        suffix = "" if len(files) == 1 else f"_{index}"
        metadata[f"file_uri{suffix}"] = dg.MetadataValue.url(entry["uri"])
        metadata[f"file_checksum{suffix}"] = dg.MetadataValue.text(entry["checksum"])
        metadata[f"file_bytes{suffix}"] = dg.MetadataValue.int(entry["byteSize"])
    if outcome.get("healed"):
        metadata["healed"] = dg.MetadataValue.bool(True)
    return metadata


def _bounds_metadata(dataset: DatasetConfig, outcome: dict[str, Any]) -> dict[str, Any]:
    """A time partition's window (instants), or a ledger partition's ledgers (integers, both inclusive)."""
    partitioning = dataset.partitioning
    if isinstance(partitioning, LedgerRangePartitioning):
        return {
            "ledger_field": dg.MetadataValue.text(partitioning.field),
            "ledger_first": dg.MetadataValue.int(outcome["start"]),
            "ledger_last": dg.MetadataValue.int(outcome["end"] - 1),
        }
    return {
        "window_start": dg.MetadataValue.text(outcome["start"]),
        "window_end": dg.MetadataValue.text(outcome["end"]),
    }


def _reasons_text(by_reason: dict[str, int]) -> str:
    parts = [f"{reason} {count}" for reason, count in by_reason.items() if count]
    return ", ".join(parts) if parts else "none"


def log_policy_gate(context: AnyContext, decisions: Decisions, keys: list[str]) -> None:
    totals = decisions.totals
    by_reason = totals["byReason"]
    partition_reasons = {r: by_reason.get(r, 0) for r in REASONS}
    unplaced_reasons = {r: v for r, v in by_reason.items() if r not in REASONS}
    context.log.info(
        f"policy gate: {len(keys)} partition(s) {keys[0]}..{keys[-1]}: {totals['placed']} of "
        f"{totals['records']} source records placed; {totals['add']} to add, {totals['omit']} omitted "
        f"({_reasons_text(partition_reasons)}); {totals['unplaced']} outside these partitions "
        f"({_reasons_text(unplaced_reasons)}); {len(decisions.breaches)} policy breach(es); "
        f"plan {decisions.plan.plan_hash}, decisions {decisions.decision_hash}"
    )


def log_execution(context: AnyContext, document: dict[str, Any]) -> None:
    partitions = document["partitions"]
    totals = document["totals"]
    files = [f for p in partitions for f in p["files"]]
    context.log.info(
        f"parquet emission: {totals['committed']} partition(s) committed, {totals['unchanged']} unchanged "
        f"(identical content already committed); {sum(f['rowCount'] for f in files)} rows in "
        f"{len(files)} file(s), {sum(f['byteSize'] for f in files)} bytes"
    )
    appended = totals["committed"] + totals["healed"]
    head = partitions[-1]["eventHash"] if partitions else None
    delivery = document.get("auditDelivery")
    delivered = json.dumps(delivery) if delivery else "none configured (local backup only)"
    context.log.info(
        f"audit chain append: {appended} event(s) appended to {document['dataset']}/"
        f"{document['versionLabel']} (the others were already on the chain); last partition's event "
        f"{head}; remote delivery: {delivered}"
    )
    reconciliation = document["reconciliation"]
    rt = reconciliation["totals"]
    context.log.info(
        f"reconciliation: {reconciliation['status']}: {rt['rowsWritten']} rows read back from the lake vs "
        f"{rt['decidedAdds']} decided adds, {rt['rootMismatches']} Merkle root mismatch(es), "
        f"{rt['policyViolations']} policy violation(s)"
    )


def progress_logger(context: AnyContext, total: int) -> Callable[[int], None]:
    """The engine's progress callback: a debug line about every tenth of the partitions."""
    step = max(1, total // 10)
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if done % step == 0 or done == total:
            context.log.debug(f"execute: {done}/{total} partition(s) written and checked")

    return progress


def failure_for_invalid_input(exc: InvalidInput, source_uri: str | None = None) -> dg.Failure:
    description = f"invalid input: {exc}"
    if exc.field == "source.uri" and source_uri is not None:
        description += (
            f" ({redact_url(source_uri)}; for the example config, generate the demo sources with "
            "`pcbo demo-data`)"
        )
    return dg.Failure(
        description=description,
        metadata={"field": dg.MetadataValue.text(exc.field), "message": dg.MetadataValue.text(exc.message)},
        allow_retries=False,
    )


def failure_for_gate(exc: Blocked) -> dg.Failure:
    document = exc.document
    breaches = document.get("breaches", [])
    metadata = {
        "gate": dg.MetadataValue.text(str(document.get("gate"))),
        "breach_count": dg.MetadataValue.int(len(breaches)),
        "breaches (first 50)": dg.MetadataValue.json(breaches[:50]),
        "plan_hash": dg.MetadataValue.text(str(document.get("planHash"))),
        "decision_hash": dg.MetadataValue.text(str(document.get("decisionHash"))),
    }
    if "reasons" in document:  # a rollout's promotion gate: every reason it holds
        metadata["reasons"] = dg.MetadataValue.json(document["reasons"])
    return dg.Failure(
        description=f"blocked by the {document.get('gate')} gate, nothing written: {exc}",
        metadata=metadata,
        allow_retries=False,
    )


@contextmanager
def engine_errors(source_uri: str | None = None) -> Iterator[None]:
    """Engine outcomes as Dagster failures (none of them is worth retrying); `source_uri` is named
    in the failure when the source cannot be read."""
    try:
        yield
    except InvalidInput as exc:
        raise failure_for_invalid_input(exc, source_uri) from exc
    except Blocked as exc:
        raise failure_for_gate(exc) from exc
    except ExecuteFailed as exc:
        reconciliation = exc.document.get("reconciliation", {})
        raise dg.Failure(
            description=f"post-write reconciliation failed; the partition was rolled back: {exc}",
            metadata={"reconciliation": dg.MetadataValue.json(reconciliation)},
            allow_retries=False,
        ) from exc


def _evaluate_group(
    context: dg.AssetExecutionContext,
    dataset: DatasetConfig,
    source_uri: str,
    run_id: str,
    group: Sequence[Span],
    zone_indexes: ZoneIndexStore | None = None,
) -> tuple[LoadedRequest, Plan, Decisions]:
    """Load and evaluate one request, log its policy gate and check its gates (nothing written)."""
    keys = [w.key for w in group]
    request = request_for_group(
        dataset,
        source_uri,
        run_id,
        group,
        {
            "orchestrator": "dagster",
            "dagsterRunId": context.run.run_id,
            "assetKey": context.asset_key.to_user_string(),
            "partitionRange": f"{keys[0]}..{keys[-1]}",
        },
    )
    loaded = load_request(json.dumps(request).encode("utf-8"), zone_indexes=zone_indexes)
    plan, decisions = evaluate(loaded)
    planned = [p.key for p in plan.partitions]
    if planned != keys:
        raise dg.Failure(
            description=f"the engine planned {planned[:3]}... for Dagster partitions {keys[:3]}...: "
            "the partition keys do not line up",
            allow_retries=False,
        )
    log_policy_gate(context, decisions, keys)
    check_gates(loaded, decisions)
    return loaded, plan, decisions


def _groups(context: dg.AssetExecutionContext, dataset: DatasetConfig) -> Sequence[Sequence[Span]]:
    """The run's partition keys as groups of partitions, one engine request each."""
    keys = list(context.partition_keys)
    partitioning = dataset.partitioning
    if isinstance(partitioning, TimeWindowPartitioning):
        partitions_def = context.assets_def.partitions_def
        assert isinstance(partitions_def, dg.TimeWindowPartitionsDefinition)
        return partition_groups(dataset, windows_for_keys(partitions_def, keys))
    try:
        spans = ledger_spans_for_keys(partitioning, keys)
    except PartitionKeyError as exc:
        raise dg.Failure(description=f"{dataset.name}: {exc}", allow_retries=False) from None
    return partition_groups(dataset, spans)


def _materialize(
    context: dg.AssetExecutionContext,
    dataset: DatasetConfig,
    source_uri: str,
    lake: str | None,
    pcbo: PcboEngineResource,
) -> dg.MaterializeResult:
    groups = _groups(context, dataset)
    keys = [span.key for group in groups for span in group]
    run_ids = [engine_run_id(context.run.run_id, i, len(groups)) for i in range(len(groups))]
    context.log.info(
        f"{dataset.name}: {len(keys)} partition(s) {keys[0]}..{keys[-1]} as {len(groups)} engine "
        f"request(s); source {redact_url(source_uri)}; engine {json.dumps(pcbo.describe(lake))}"
    )
    with engine_errors(source_uri), pcbo.zone_indexes() as zones:
        if len(groups) > 1:
            # Gates hold before anything is written: check every request's before executing any.
            for run_id, group in zip(run_ids, groups, strict=True):
                _evaluate_group(context, dataset, source_uri, run_id, group, zones)
            context.log.info(f"gates passed for all {len(groups)} requests")
        with pcbo.environment(lake) as env:
            for run_id, group in zip(run_ids, groups, strict=True):
                loaded, plan, decisions = _evaluate_group(context, dataset, source_uri, run_id, group, zones)
                context.log.info(
                    f"gates passed (onViolation={dataset.policies.onViolation}): "
                    f"writing {len(group)} partition(s)"
                )
                progress = progress_logger(context, len(group))
                document = execute(env, loaded, plan, decisions, progress=progress)
                log_execution(context, document)
                counts = {pd.partition.key: pd.counts for pd in decisions.partitions}
                for outcome in document["partitions"]:
                    context.add_asset_metadata(
                        partition_metadata(
                            dataset,
                            outcome,
                            counts[outcome["key"]],
                            document["planHash"],
                            document["decisionHash"],
                            run_id,
                        ),
                        partition_key=outcome["key"],
                    )
    return dg.MaterializeResult()


def build_dataset_asset(config: DatasetsConfig, dataset: DatasetConfig) -> dg.AssetsDefinition:
    """The partitioned asset of one dataset (name = the dataset name with `[^A-Za-z0-9_]` as `_`)."""
    partitions_def = partitions_def_for(dataset)
    source_uri = config.source_uri(dataset)
    lake = config.lake_url(dataset)
    bp = dataset.backfillPolicy
    backfill_policy = (
        dg.BackfillPolicy.single_run()
        if bp.kind == "single_run"
        else dg.BackfillPolicy.multi_run(max_partitions_per_run=bp.maxPartitionsPerRun or 1)
    )
    partitioning = dataset.partitioning
    description = dataset.description or f"pcbo dataset {dataset.name}"

    def compute(context: dg.AssetExecutionContext, pcbo: PcboEngineResource) -> dg.MaterializeResult:
        # Relative source paths resolve against the sources resource's base_dir, else the config's.
        source = pcbo.sources.resolve(dataset.source.uri, config.sources_dir)
        return _materialize(context, dataset, source, lake, pcbo)

    with warnings.catch_warnings():
        # `backfill_policy` is beta in Dagster 1.13: known and intended, not a warning on every load.
        warnings.simplefilter("ignore", category=dg.BetaWarning)
        return dg.asset(
            name=dataset.asset_name,
            group_name=GROUP_NAME,
            partitions_def=partitions_def,
            backfill_policy=backfill_policy,
            pool=dataset.pool_name,
            kinds={"parquet"},
            description=description,
            metadata={
                "dataset": dg.MetadataValue.text(dataset.name),
                "version_label": dg.MetadataValue.text(dataset.versionLabel),
                "audit_chain_key": dg.MetadataValue.text(dataset.chain_key),
                "partitioning": dg.MetadataValue.json(partitioning.model_dump()),
                "source": dg.MetadataValue.text(redact_url(source_uri)),
                "policies": dg.MetadataValue.json(dataset.policies.model_dump()),
                "existing_target_ids": dg.MetadataValue.int(len(dataset.existingTargetIds)),
            },
        )(compute)

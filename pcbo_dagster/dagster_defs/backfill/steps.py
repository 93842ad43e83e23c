"""The four steps of a dataset's asset, as ops: policy gate, parquet emission, audit chain append,
reconciliation (`assets.py` wires them into one graph-backed asset).

Each op is one phase of the engine's commit protocol (`engine/execute.py`: `check_gates`,
`emit_partitions`, `append_commit_events`, `reconcile_partitions`) over every partition of the run,
with its own logs, duration and output metadata. Between the ops only handles pass (`GateHandle`,
`EmissionHandle`: per engine request its run id, request JSON, plan and decision hashes, and after
emission per partition its version and manifest checksum) - never tables. The evaluated decisions
stay in the run's process (`_evaluated`, keyed by Dagster run and engine run); a step that runs in
another process (a retry from failure) evaluates the request again and refuses to go on if its
decision hash is not the one the gate passed.

A crash or a terminated run between two ops is a crash between two commit steps: commit points under
an open intent without their events, or events without their catalog rows. The next run of the same
partitions, or `pcbo verify --repair`, completes exactly that (the engine's crash windows); each
op takes the dataset's lock again and re-reads the chain, so a retried op does nothing twice.
"""

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg
from pydantic import Field

from pcbo_dagster.core.decisions import REASONS, Decisions
from pcbo_dagster.core.errors import Blocked, InvalidInput
from pcbo_dagster.core.partition_keys import PartitionKeyError
from pcbo_dagster.core.plan import Plan
from pcbo_dagster.dagster_defs.backfill.handle_storage import HANDLE_IO_MANAGER_KEY
from pcbo_dagster.dagster_defs.partitions import run_partition_keys, windows_for_keys
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, LedgerRangePartitioning, TimeWindowPartitioning
from pcbo_dagster.datasets.requests import Span, ledger_spans_for_keys, partition_groups, request_for_group
from pcbo_dagster.engine.events import chain_key
from pcbo_dagster.engine.execute import (
    Emission,
    ExecuteFailed,
    append_commit_events,
    check_gates,
    emit_partitions,
    reconcile_partitions,
)
from pcbo_dagster.engine.request_loading import LoadedRequest, evaluate, load_request
from pcbo_dagster.evidence.package import write_evidence_file
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.sources.zones import ZoneIndexStore

POLICY_GATE = "policy_gate"
PARQUET_EMISSION = "parquet_emission"
AUDIT_CHAIN_APPEND = "audit_chain_append"
RECONCILIATION_STEP = "reconciliation"
STEPS = (POLICY_GATE, PARQUET_EMISSION, AUDIT_CHAIN_APPEND, RECONCILIATION_STEP)


@dataclass(frozen=True)
class RequestHandle:
    """One engine request of a run (a run of contiguous partitions): enough to evaluate it again."""

    run_id: str
    request_json: str
    keys: tuple[str, ...]
    plan_hash: str
    decision_hash: str


@dataclass(frozen=True)
class GateHandle:
    """What the policy gate passes on: the run's engine requests, every one through its gates."""

    dagster_run_id: str
    requests: tuple[RequestHandle, ...]
    #: The stores the gate was evaluated for (`stores_of`): every step of the run writes to those.
    stores: str = ""

    @property
    def keys(self) -> list[str]:
        return [key for r in self.requests for key in r.keys]


@dataclass(frozen=True)
class EmissionHandle:
    """What parquet emission (and then the audit chain append) passes on: per request its emission."""

    gate: GateHandle
    emissions: tuple[Emission, ...]


# --- the decisions of a run, kept in its process between the ops --------------------------------

Evaluated = tuple[LoadedRequest, Plan, Decisions]
#: (Dagster run id, engine run id) -> the evaluated request; a few runs at most (in-process tests).
_EVALUATED: OrderedDict[tuple[str, str], Evaluated] = OrderedDict()
_KEEP_RUNS = 8


def _remember(dagster_run_id: str, run_id: str, evaluated: Evaluated) -> None:
    _EVALUATED[(dagster_run_id, run_id)] = evaluated
    while len(_EVALUATED) > _KEEP_RUNS:
        _EVALUATED.popitem(last=False)


def _evaluated(
    context: dg.OpExecutionContext,
    gate: GateHandle,
    request: RequestHandle,
    pcbo: PcboEngineResource,
    last_use: bool = False,
) -> Evaluated:
    """The request as the gate evaluated it: from this process, or evaluated again (a step retried in
    another process) and refused if its decisions are not the ones the gate passed."""
    key = (gate.dagster_run_id, request.run_id)
    found = _EVALUATED.pop(key, None) if last_use else _EVALUATED.get(key)
    if found is not None:
        return found
    context.log.info(f"{request.run_id}: evaluating the request again (the gate ran in another process)")
    with engine_errors(), pcbo.zone_indexes() as zones:  # (a streamed source: only its range's zones)
        loaded = load_request(request.request_json.encode("utf-8"), zone_indexes=zones)
        plan, decisions = evaluate(loaded)
    if decisions.decision_hash != request.decision_hash:
        raise dg.Failure(
            description=(
                f"the decisions of {request.run_id} are {decisions.decision_hash} now, not "
                f"{request.decision_hash} as the policy gate passed them (the source or the config changed "
                "in between); nothing more was written by this run: launch it again"
            ),
            allow_retries=False,
        )
    if not last_use:
        _remember(gate.dagster_run_id, request.run_id, (loaded, plan, decisions))
    return loaded, plan, decisions


def stores_of(pcbo: PcboEngineResource, lake: str | None) -> str:
    """The stores a host's steps write to (lake, catalog, audit store or directory, audit endpoint; no
    password), as text two hosts of one deployment agree on."""
    described = pcbo.describe(lake)
    named = ("lake", "catalog", "audit_store" if described["audit_store"] else "audit_dir", "audit_endpoint")
    return json.dumps({name: described[name] for name in named}, sort_keys=True)


def _run_and_ancestors(context: dg.OpExecutionContext) -> set[str]:
    """The run's id and those of the runs it re-executes (a re-executed step reads its parent's outputs)."""
    ids = {context.run.run_id}
    parent = context.run.parent_run_id
    while parent is not None and parent not in ids:
        ids.add(parent)
        found = context.instance.get_run_by_id(parent)
        parent = found.parent_run_id if found is not None else None
    return ids


# --- engine outcomes as Dagster failures ------------------------------------------------------------


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


def describe_failed_run(exc: ExecuteFailed, dataset: str, version_label: str) -> str:
    """What stopped the run, and what to do, in words an operator can act on."""
    key = exc.partition_key
    where = f"partition {key} of {dataset}/{version_label}" if key else f"{dataset}/{version_label}"
    if exc.kind == "lake_disagrees_with_chain":
        return (
            f"{where} was not written: its files in the lake are not what the audit chain says is "
            f"committed ({exc}). Nothing was rolled back and nothing else was changed. The run could not "
            "put the chain's version back (its manifest or data file is gone and this request does not "
            "rebuild the same bytes). What to do: `pcbo verify` lists what differs; put the partition's "
            "files back (from a copy of the lake) and materialize it again, or undo its current version "
            f"with `pcbo rollback --dataset {dataset} --partition {key} [--version N]` once the lake "
            "matches the chain; a partition the chain can be restored to is put back by the next run"
        )
    if exc.kind == "source_changed":
        return f"{where}: {exc}. Launch the run again once the source is stable"
    return (
        f"{where} failed its post-write check and was rolled back to the version before (a "
        f"partition_rolled_back event and a post_write_check discrepancy record it): {exc}"
    )


def failure_for_execute(exc: ExecuteFailed, dataset: str, version_label: str) -> dg.Failure:
    reconciliation = exc.document.get("reconciliation", {})
    return dg.Failure(
        description=describe_failed_run(exc, dataset, version_label),
        metadata={
            "pcbo_outcome": dg.MetadataValue.text(exc.kind),
            "partition": dg.MetadataValue.text(exc.partition_key or ""),
            "reconciliation": dg.MetadataValue.json(reconciliation),
        },
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
        document = exc.document
        raise failure_for_execute(
            exc, str(document.get("dataset", "")), str(document.get("versionLabel", ""))
        ) from exc


# --- logging ------------------------------------------------------------------------------------

AnyContext = dg.AssetExecutionContext | dg.OpExecutionContext


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


def progress_logger(
    context: AnyContext, total: int, what: str = "written and checked"
) -> Callable[[int], None]:
    """The engine's progress callback: a debug line about every tenth of the partitions."""
    step = max(1, total // 10)
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if done % step == 0 or done == total or n >= step:
            context.log.debug(f"{done}/{total} partition(s) {what}")

    return progress


# --- the run's partitions as engine requests ------------------------------------------------------


def engine_run_id(dagster_run_id: str, group_index: int, group_count: int) -> str:
    """The engine's runId for one request of a Dagster run (`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`)."""
    base = f"dagster-{dagster_run_id}"
    return base if group_count == 1 else f"{base}.{group_index}"


def no_partitions(dataset: DatasetConfig) -> dg.Failure:
    """The failure of a run Dagster gave no partition: a range typed in the launchpad backwards."""
    return dg.Failure(
        description=f"{dataset.name}: the run's partition range holds no partition (its start after its "
        "end?); nothing was done",
        allow_retries=False,
    )


def partition_groups_for_keys(
    dataset: DatasetConfig, partitions_def: dg.PartitionsDefinition | None, keys: Sequence[str]
) -> Sequence[Sequence[Span]]:
    """The run's partition keys as groups of partitions, one engine request each."""
    if not keys:
        raise no_partitions(dataset)
    partitioning = dataset.partitioning
    if isinstance(partitioning, TimeWindowPartitioning):
        assert isinstance(partitions_def, dg.TimeWindowPartitionsDefinition)
        return partition_groups(dataset, windows_for_keys(partitions_def, list(keys)))
    try:
        spans = ledger_spans_for_keys(partitioning, list(keys))
    except PartitionKeyError as exc:
        raise dg.Failure(description=f"{dataset.name}: {exc}", allow_retries=False) from None
    return partition_groups(dataset, spans)


def engine_requests(
    dataset: DatasetConfig,
    partitions_def: dg.PartitionsDefinition | None,
    source_uri: str,
    keys: Sequence[str],
    dagster_run_id: str,
    metadata: dict[str, Any],
) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(engine run id, request, keys) of each engine request covering `keys`."""
    groups = partition_groups_for_keys(dataset, partitions_def, keys)
    out = []
    for i, group in enumerate(groups):
        group_keys = [span.key for span in group]
        run_id = engine_run_id(dagster_run_id, i, len(groups))
        request = request_for_group(
            dataset,
            source_uri,
            run_id,
            group,
            {**metadata, "partitionRange": f"{group_keys[0]}..{group_keys[-1]}"},
        )
        out.append((run_id, request, group_keys))
    return out


def evaluate_request(
    context: AnyContext, request: dict[str, Any], keys: list[str], zone_indexes: ZoneIndexStore | None = None
) -> Evaluated:
    """Load and evaluate one engine request and log its policy gate (nothing written); `zone_indexes`:
    the catalog's zone indexes of streamed sources (a range run reads only its range's zones)."""
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
    return loaded, plan, decisions


class PolicyGateConfig(dg.Config):
    """The policy gate's run config (launchpad): pin the decisions an approver reviewed."""

    expected_decision_hash: str = Field(
        default="",
        description="The decision hash a dry run of the same partitions gave (its report says it); the "
        "run is blocked, nothing written, if the decisions evaluated now differ. Empty: not pinned",
    )


# --- the ops --------------------------------------------------------------------------------------


def build_steps(
    dataset: DatasetConfig,
    partitions_def: dg.PartitionsDefinition | None,
    source_uri_of: Callable[[PcboEngineResource], str],
    lake: str | None,
    asset_key: dg.AssetKey,
) -> tuple[dg.OpDefinition, dg.OpDefinition, dg.OpDefinition, dg.OpDefinition]:
    """The four ops of `dataset`'s asset (`source_uri_of` resolves the source with the resource)."""
    pool = dataset.pool_name
    prefix = dataset.asset_name
    version_label = dataset.versionLabel

    def run_metadata(dagster_run_id: str) -> dict[str, Any]:
        return {
            "orchestrator": "dagster",
            "dagsterRunId": dagster_run_id,
            "assetKey": asset_key.to_user_string(),
        }

    def own_gate(context: dg.OpExecutionContext, gate: GateHandle, pcbo: PcboEngineResource) -> GateHandle:
        """`gate` when its requests are the ones this run's tags and this host's datasets config make
        (the handle is read from the Dagster instance, shared by every host): a handle of another run,
        or of a request this run would not make (other partitions, source or policies, or a host
        configured otherwise than the gate's) fails the step, nothing written."""
        run = context.run
        if gate.dagster_run_id not in _run_and_ancestors(context):
            raise dg.Failure(
                description=f"the policy gate's output is of run {gate.dagster_run_id}, not of this run "
                f"{run.run_id}; nothing was written",
                allow_retries=False,
            )
        stores = stores_of(pcbo, lake)
        if gate.stores != stores:
            raise dg.Failure(
                description=f"this host's stores {stores} are not the policy gate's "
                f"{gate.stores or '(none)'}: "
                "a host configured with another lake, catalog or audit store (PCBO_LAKE_URL, "
                "PCBO_CATALOG_URL, PCBO_AUDIT_DIR); nothing was written",
                allow_retries=False,
            )
        keys = run_partition_keys(context, dataset.name)
        made = engine_requests(
            dataset,
            partitions_def,
            source_uri_of(pcbo),
            keys,
            gate.dagster_run_id,
            run_metadata(gate.dagster_run_id),
        )
        expected = [(run_id, json.loads(json.dumps(request)), group) for run_id, request, group in made]
        given = [(r.run_id, json.loads(r.request_json), list(r.keys)) for r in gate.requests]
        for _, request, _ in given + expected:
            request.pop("expectedDecisionHash", None)  # the op config's pin (policy_gate)
        if given != expected:
            raise dg.Failure(
                description=f"the policy gate's requests are not the ones this run ({', '.join(keys[:1])}.."
                f"{keys[-1]}) makes with this host's datasets config and sources: a host configured "
                "otherwise than the gate's, or an altered handle; nothing was written",
                allow_retries=False,
            )
        return gate

    def own_emission(
        context: dg.OpExecutionContext, emitted: EmissionHandle, pcbo: PcboEngineResource
    ) -> EmissionHandle:
        """`emitted` when its gate is this run's (`own_gate`) and each emission is of one of its requests'
        partitions."""
        keys_of = {r.run_id: set(r.keys) for r in own_gate(context, emitted.gate, pcbo).requests}
        for emission in emitted.emissions:
            if not set(emission.keys) <= keys_of.get(emission.run_id, set()):
                raise dg.Failure(
                    description=f"the emission of {emission.run_id} names partitions its request does not "
                    "have; nothing more was written",
                    allow_retries=False,
                )
        return emitted

    @dg.op(
        name=f"{prefix}__{POLICY_GATE}",
        description="Evaluate every record against the dataset's policies; the gates hold before anything "
        "is written (onViolation: block). Output: the engine requests and their decision hashes",
        tags={"pcbo/step": POLICY_GATE},
        out=dg.Out(io_manager_key=HANDLE_IO_MANAGER_KEY),
    )
    def policy_gate(
        context: dg.OpExecutionContext, config: PolicyGateConfig, pcbo: PcboEngineResource
    ) -> GateHandle:
        source_uri = source_uri_of(pcbo)
        keys = run_partition_keys(context, dataset.name)
        dagster_run_id = context.run.run_id
        metadata = run_metadata(dagster_run_id)
        requests = engine_requests(dataset, partitions_def, source_uri, keys, dagster_run_id, metadata)
        pinned = [h.strip() for h in config.expected_decision_hash.split(",") if h.strip()]
        if pinned and len(pinned) != len(requests):
            raise dg.Failure(
                description=f"expected_decision_hash names {len(pinned)} hash(es) for {len(requests)} engine "
                "request(s) of this partition selection: give one per request, comma-separated, as the "
                "dry run lists them",
                allow_retries=False,
            )
        for (_, request, _), expected in zip(requests, pinned, strict=False):
            request["expectedDecisionHash"] = expected
        context.log.info(
            f"{dataset.name}: {len(keys)} partition(s) {keys[0]}..{keys[-1]} as {len(requests)} engine "
            f"request(s); source {redact_url(source_uri)}; engine {json.dumps(pcbo.describe(lake))}"
        )
        handles = []
        totals: dict[str, int] = {}
        by_reason: dict[str, int] = {}
        with engine_errors(source_uri), pcbo.zone_indexes() as zones:
            # Every request's gates hold before anything is written.
            for run_id, request, group_keys in requests:
                loaded, plan, decisions = evaluate_request(context, request, group_keys, zones)
                check_gates(loaded, decisions)
                _remember(dagster_run_id, run_id, (loaded, plan, decisions))
                handles.append(
                    RequestHandle(
                        run_id,
                        json.dumps(request),
                        tuple(group_keys),
                        plan.plan_hash,
                        decisions.decision_hash,
                    )
                )
                for name in ("records", "placed", "add", "omit", "unplaced"):
                    totals[name] = totals.get(name, 0) + int(decisions.totals[name])
                for reason, count in decisions.totals["byReason"].items():
                    by_reason[reason] = by_reason.get(reason, 0) + int(count)
        context.log.info(
            f"gates passed (onViolation={dataset.policies.onViolation}) for {len(handles)} request(s)"
        )
        output_metadata: dict[str, Any] = {
            "partitions": dg.MetadataValue.int(len(keys)),
            "decision_hash": dg.MetadataValue.text(", ".join(h.decision_hash for h in handles)),
            "plan_hash": dg.MetadataValue.text(", ".join(h.plan_hash for h in handles)),
            **{name: dg.MetadataValue.int(value) for name, value in totals.items()},
            **{f"omitted/{r}": dg.MetadataValue.int(by_reason.get(r, 0)) for r in REASONS},
        }
        context.add_output_metadata(output_metadata)
        return GateHandle(dagster_run_id, tuple(handles), stores_of(pcbo, lake))

    @dg.op(
        name=f"{prefix}__{PARQUET_EMISSION}",
        description="Write each partition's deterministic parquet, version and rollback manifests, record "
        "the intent on the audit chain, then write the commit points (_manifest.json)",
        pool=pool,
        tags={"pcbo/step": PARQUET_EMISSION},
        out=dg.Out(io_manager_key=HANDLE_IO_MANAGER_KEY),
    )
    def parquet_emission(
        context: dg.OpExecutionContext, gate: GateHandle, pcbo: PcboEngineResource
    ) -> EmissionHandle:
        gate = own_gate(context, gate, pcbo)
        emissions: list[Emission] = []
        with pcbo.environment(lake) as env, engine_errors():
            for request in gate.requests:
                loaded, plan, decisions = _evaluated(context, gate, request, pcbo)
                progress = progress_logger(context, len(request.keys), "committed")
                emission = emit_partitions(env, loaded, plan, decisions, progress=progress)
                emissions.append(emission)
                context.log.info(
                    f"parquet emission {request.run_id}: {emission.count('committed')} partition(s) "
                    f"committed, {emission.count('unchanged')} unchanged (identical content already "
                    f"committed), {emission.count('restored')} restored to the chain's version, "
                    f"{sum(p.healed for p in emission.partitions)} crash window(s) healed"
                )
                if emission.refusal is not None:
                    context.log.error(
                        f"stopped before partition {emission.refusal.partition_key}: "
                        f"{emission.refusal.message}. The partitions committed before it go through the "
                        "next steps; the run then fails"
                    )
                    break
        context.add_output_metadata(
            {
                "committed": dg.MetadataValue.int(sum(e.count("committed") for e in emissions)),
                "unchanged": dg.MetadataValue.int(sum(e.count("unchanged") for e in emissions)),
                "restored": dg.MetadataValue.int(sum(e.count("restored") for e in emissions)),
                "healed": dg.MetadataValue.int(sum(p.healed for e in emissions for p in e.partitions)),
                "refused": dg.MetadataValue.text(
                    next((e.refusal.partition_key or "source" for e in emissions if e.refusal), "none")
                ),
            }
        )
        return EmissionHandle(gate, tuple(emissions))

    @dg.op(
        name=f"{prefix}__{AUDIT_CHAIN_APPEND}",
        description="Append each committed partition's partition_committed event to the dataset's audit "
        "chain (local backup first, then the catalog; then remote delivery when configured)",
        pool=pool,
        tags={"pcbo/step": AUDIT_CHAIN_APPEND},
        out=dg.Out(io_manager_key=HANDLE_IO_MANAGER_KEY),
    )
    def audit_chain_append(
        context: dg.OpExecutionContext, emitted: EmissionHandle, pcbo: PcboEngineResource
    ) -> EmissionHandle:
        emitted = own_emission(context, emitted, pcbo)
        appended = on_chain = 0
        head = None
        deliveries = []
        with pcbo.environment(lake) as env, engine_errors():
            for emission in emitted.emissions:
                result = append_commit_events(env, emission)
                appended += len(result["appended"])
                on_chain += len(result["alreadyOnChain"])
                head = result["chainHead"]
                if result["auditDelivery"]:
                    deliveries.append(result["auditDelivery"])
                for changed in result["changed"]:
                    context.log.warning(f"not appended: {changed['key']} changed since: {changed['detail']}")
        delivered = json.dumps(deliveries) if deliveries else "none configured (local backup only)"
        context.log.info(
            f"audit chain append: {appended} event(s) appended to {dataset.chain_key}, {on_chain} already on "
            f"the chain; head {head}; remote delivery: {delivered}"
        )
        context.add_output_metadata(
            {
                "events_appended": dg.MetadataValue.int(appended),
                "already_on_chain": dg.MetadataValue.int(on_chain),
                "audit_chain_key": dg.MetadataValue.text(dataset.chain_key),
                "chain_head": dg.MetadataValue.text(head or "none"),
            }
        )
        return emitted

    @dg.op(
        name=f"{prefix}__{RECONCILIATION_STEP}",
        description="Read every committed file back: checksum, rows vs the decided adds, Merkle root, policy "
        "(a failing partition is rolled back); then the catalog rows. One materialization per partition",
        pool=pool,
        tags={"pcbo/step": RECONCILIATION_STEP},
        out=dg.Out(dg.Nothing),
    )
    def reconciliation(
        context: dg.OpExecutionContext, emitted: EmissionHandle, pcbo: PcboEngineResource
    ) -> None:
        emitted = own_emission(context, emitted, pcbo)
        step = context.get_step_execution_context()
        gate = emitted.gate
        with pcbo.environment(lake) as env:
            for request, emission in zip(gate.requests, emitted.emissions, strict=False):
                loaded, plan, decisions = _evaluated(context, gate, request, pcbo, last_use=True)
                counts = {pd.partition.key: pd.counts for pd in decisions.partitions if pd.partition.key in
                          set(emission.keys)}  # fmt: skip
                progress = progress_logger(context, len(emission.partitions), "read back and recorded")
                try:
                    document = reconcile_partitions(env, loaded, plan, decisions, emission, progress=progress)
                except ExecuteFailed as exc:
                    # What was committed and reconciled stays: record those partitions, then fail.
                    for outcome in exc.document["partitions"]:
                        if outcome["status"] != "failed":
                            context.log_event(
                                dg.AssetMaterialization(
                                    asset_key=asset_key,
                                    partition=outcome["key"],
                                    metadata=partition_metadata(
                                        dataset, outcome, counts[outcome["key"]], exc.document
                                    ),
                                )
                            )
                    log_reconciliation(context, exc.document)
                    raise failure_for_execute(exc, dataset.name, version_label) from exc
                log_reconciliation(context, document)
                evidence = {}
                if env.signing_key is not None and document["status"] != "unchanged":
                    path, digest = write_evidence_file(env, document["runId"])  # issue 11
                    context.log.info(f"evidence package {path} ({digest})")
                    evidence = {
                        "evidence_package": dg.MetadataValue.path(path),
                        "evidence_sha256": dg.MetadataValue.text(digest),
                    }
                for outcome in document["partitions"]:
                    step.add_asset_metadata(
                        partition_metadata(dataset, outcome, counts[outcome["key"]], document) | evidence,
                        partition_key=outcome["key"],
                    )

    return policy_gate, parquet_emission, audit_chain_append, reconciliation


def log_reconciliation(context: AnyContext, document: dict[str, Any]) -> None:
    reconciliation = document["reconciliation"]
    rt = reconciliation["totals"]
    context.log.info(
        f"reconciliation: {reconciliation['status']}: {rt['rowsWritten']} rows read back from the lake vs "
        f"{rt['decidedAdds']} decided adds, {rt['rootMismatches']} Merkle root mismatch(es), "
        f"{rt['policyViolations']} policy violation(s) ({document['runId']}; catalog rows recorded)"
    )


def partition_metadata(
    dataset: DatasetConfig, outcome: dict[str, Any], counts: dict[str, Any], document: dict[str, Any]
) -> dict[str, Any]:
    """What one partition's materialization records: numbers as numbers, digests as text, the manifest
    and data files as URLs. Kept to what differs between partitions or is needed to act on one (every
    entry is written once per partition): the run-wide plan hash and chain key are on the policy gate's
    and the audit append's outputs and on the asset."""
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
        "decision_hash": dg.MetadataValue.text(document["decisionHash"]),
        "audit_event_hash": dg.MetadataValue.text(str(outcome["eventHash"])),
        "manifest": dg.MetadataValue.url(outcome["manifest"]),
        "manifest_checksum": dg.MetadataValue.text(outcome["manifestChecksum"]),
        "pcbo_run_id": dg.MetadataValue.text(document["runId"]),
    }
    for index, entry in enumerate(files):
        suffix = "" if len(files) == 1 else f"_{index}"
        metadata[f"file_uri{suffix}"] = dg.MetadataValue.url(entry["uri"])
        metadata[f"file_checksum{suffix}"] = dg.MetadataValue.text(entry["checksum"])
        metadata[f"file_bytes{suffix}"] = dg.MetadataValue.int(entry["byteSize"])
    if outcome.get("healed"):
        metadata["healed"] = dg.MetadataValue.bool(True)
    if outcome.get("restored"):
        metadata["restored"] = dg.MetadataValue.json(outcome["restored"])
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


def log_execution(context: AnyContext, document: dict[str, Any]) -> None:
    """The three writing steps of a whole execute document (a rollout's apply, the request job)."""
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
        f"audit chain append: {appended} event(s) appended to "
        f"{chain_key(document['dataset'], document['versionLabel'])} (the others were already on the "
        f"chain); last partition's event {head}; remote delivery: {delivered}"
    )
    log_reconciliation(context, document)

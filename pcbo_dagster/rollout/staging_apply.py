"""The guarded staging apply of a rollout: throttled, pausable, cancellable, then halted for review.

`apply_to_staging` creates the rollout (or picks up one that was interrupted, paused or not yet
applied), evaluates the decisions of its whole range once, checks the gates (nothing is written when
one holds), then runs the engine into the staging environment one partition at a time. Before each
partition it:

1. reads the operator's control request from the catalog: `pause` holds the step there (status
   `paused`, polling every `poll_seconds`) until `resume`; `cancel` ends the apply (status
   `cancelled`; what was committed stays, roll it back with `pcbo rollout rollback`);
2. waits for the throttle (`throttle.py`), in slices of at most `poll_seconds` so a pause or cancel
   requested during a long wait takes effect promptly.

Each wait and each partition is logged. When every partition is committed the rollout halts for
review: `rollout_staged` on the production audit chain (the decision and plan hashes, the moment and
the soak window, the datasets config's and never the row's: what the gate reads), then status
`soaking`, `staged_at` set in the catalog (the soak window starts; `rollout/lifecycle.py`), and the
backfill summary is written (`backfill_summary.json` / `.md`): what was added and omitted, by
reason, per partition, with the run's plan and decision hashes and each partition's Merkle root,
manifest checksum and audit event hash. Applying a rollout again after that writes nothing new (the
engine finds identical content). A cancelled apply is `rollout_cancelled` on the chain, then
`cancelled` in the catalog. A rollout the production chain says was promoted, rolled back or
cancelled is never applied again, whatever its catalog row says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pcbo_dagster.core.decisions import REASONS, PartitionDecision
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.partition_keys import short_key
from pcbo_dagster.core.recorded_text import check_actor
from pcbo_dagster.core.rollout_lifecycle import FINAL, check_rollout_name
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig, checked_throttle
from pcbo_dagster.datasets.requests import evaluate_keys
from pcbo_dagster.engine.execute import check_gates, execute
from pcbo_dagster.rollout.clock import REAL_CLOCK, Clock
from pcbo_dagster.rollout.environments import RolloutEnvironments
from pcbo_dagster.rollout.lifecycle import (
    chain_lifecycle,
    dataset_production_chain,
    read_lifecycle,
    record_cancelled,
    record_staged,
    refuse_unwritable_chain,
)
from pcbo_dagster.rollout.reports import markdown_table, rollout_reports_dir, write_report
from pcbo_dagster.rollout.throttle import Throttle, strictest
from pcbo_dagster.tables.iceberg_publication import staging_target

Log = Callable[[str], None]


def staging_run_id(rollout: str) -> str:
    return f"rollout-{rollout}-staging"


def soak_window_seconds(dataset: DatasetConfig) -> int:
    """The dataset's soak window (`rollout.soak.windowMinutes`) in seconds."""
    return int(dataset.rollout.soak.windowMinutes * 60) if dataset.rollout else 0


def default_rollout_name(dataset: DatasetConfig, keys: list[str]) -> str:
    """A name for a rollout nobody named: the dataset and its key range (valid as a run id part)."""
    return f"{dataset.asset_name}-{short_key(keys[0])}-{short_key(keys[-1])}"


#: The longest a paused or throttled apply waits between two looks at its control request.
MAX_POLL_SECONDS = 3600.0


def throttle_for(dataset: DatasetConfig, override: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset's configured throttle with any given override (None values keep the config's),
    checked as the config is (`InvalidInput` naming `throttle.<limit>`: a rate of 0, below 0, not a
    number or infinite is refused)."""
    base = dataset.rollout.throttle.model_dump() if dataset.rollout else {}
    for key, value in (override or {}).items():
        if value is not None:
            base[key] = value
    return checked_throttle(base)


def _row_throttle(name: str, row: Any, limits: dict[str, Any], log: Log) -> dict[str, Any]:
    """The throttle of an apply run again without an override: the row's (a start's override) where it
    is stricter than `limits` (the config's), never looser: the row is the catalog's, which anyone who
    writes it could set to nothing, a negative or NaN rate (no throttle at all) or 0 (a division by
    zero). A row that holds no valid throttle is named and the config's applies."""
    try:
        checked = checked_throttle(row)
    except InvalidInput as exc:
        log(
            f"rollout {name}: the throttle its catalog row holds is not one ({exc.field}: {exc.message}); "
            f"the configured {limits} applies"
        )
        return limits
    return strictest(limits, checked)


def check_apply_arguments(
    dataset: DatasetConfig,
    name: str,
    actor: str,
    poll_seconds: float,
    throttle: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What `apply_to_staging` is asked to do, checked before any environment is opened (a refused
    start creates no catalog): `InvalidInput` naming what is wrong; the throttle's limits otherwise."""
    if dataset.rollout is None:
        raise InvalidInput("dataset", f"{dataset.name} has no rollout block in the datasets config")
    check_rollout_name(name)
    check_actor(actor, "starts the rollout")
    if not (isinstance(poll_seconds, int | float) and 0 < poll_seconds <= MAX_POLL_SECONDS):
        # Zero (or less, or NaN) would make every throttle wait a loop of zero-second steps.
        raise InvalidInput("poll_seconds", f"must be a number of seconds in (0, {MAX_POLL_SECONDS:g}]")
    return throttle_for(dataset, throttle)


def _refuse_another_staged_range(
    envs: RolloutEnvironments, dataset: DatasetConfig, name: str, keys: list[str]
) -> None:
    """Before any row is written: a rollout the production chain staged already (its row lost, or
    deleted by hand) is applied again only over the range its `rollout_staged` names. Its range, decision
    hash and soak are fixed when it is staged; another range is another rollout (`InvalidInput` on
    `rollout`)."""
    events = dataset_production_chain(envs, dataset.name, dataset.versionLabel)
    staged = chain_lifecycle(envs, name, events).staged
    subject = None if staged is None else staged.get("rollout")
    if not isinstance(subject, dict):
        return
    first, last, count = subject.get("first_key"), subject.get("last_key"), subject.get("partition_count")
    if (first, last, count) != (keys[0], keys[-1], len(keys)):
        raise InvalidInput(
            "rollout",
            f"the production audit chain staged rollout {name!r} over {first}..{last} ({count} "
            f"partition(s)), not {keys[0]}..{keys[-1]}: a rollout's range is fixed when it is staged; "
            "start a new rollout under another name",
        )


def apply_to_staging(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    envs: RolloutEnvironments,
    name: str,
    keys: list[str],
    *,
    actor: str,
    throttle: dict[str, Any] | None = None,
    clock: Clock = REAL_CLOCK,
    log: Log = lambda _m: None,
    poll_seconds: float = 1.0,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply the rollout `name` (partition `keys` of `dataset`) to staging; see the module doc."""
    limits = check_apply_arguments(dataset, name, actor, poll_seconds, throttle)
    assert dataset.rollout is not None  # (refused by check_apply_arguments)
    # (before anything is staged: the apply ends appending `rollout_staged` to the production chain)
    refuse_unwritable_chain(
        envs, dataset.name, dataset.versionLabel, f"the staging apply of rollout {name!r}"
    )
    _refuse_another_staged_range(envs, dataset, name, keys)
    store = envs.store
    rollout = store.create_rollout(
        name=name,
        dataset=dataset.name,
        version_label=dataset.versionLabel,
        partition_keys=keys,
        throttle=limits,
        soak_window_seconds=soak_window_seconds(dataset),
        actor=actor,
        now=clock.now(),
    )
    if rollout["status"] == "cancelled":
        raise InvalidInput("rollout", f"rollout {name!r} was cancelled; roll it back and start a new one")
    if rollout["status"] == "rolled_back":  # final, like cancelled: never applied again
        raise InvalidInput(
            "rollout", f"rollout {name!r} was rolled back: it is never applied again; start a new one"
        )
    if rollout["status"] not in ("applying", "paused", "interrupted"):
        log(f"rollout {name}: already applied to staging (status {rollout['status']}); nothing to do")
        return {"status": rollout["status"], "rollout": name, "applied": False}
    chain_says = read_lifecycle(envs, rollout).status
    if chain_says in FINAL:
        raise InvalidInput(
            "rollout",
            f"the production audit chain says rollout {name!r} is {chain_says} (the catalog: "
            f"{rollout['status']}): it is never applied again; start a new rollout",
        )
    if rollout["status"] == "interrupted":
        # The engine completes what the interrupted run left half done and skips what it committed.
        store.set_status(name, "applying", actor=actor, now=clock.now(), detail={"resumed": "interrupted"})
        log(f"rollout {name}: resuming the interrupted staging apply")
    overridden = any(v is not None for v in (throttle or {}).values())
    if overridden and limits != rollout["throttle"]:
        # Limits given with the resume are the operator's choice for the rest of the apply.
        rollout = store.set_throttle(name, limits, actor=actor, now=clock.now())
        log(f"rollout {name}: throttle changed for the rest of the apply: {limits}")
    run_id = staging_run_id(name)
    loaded, plan, decisions = evaluate_keys(
        config, dataset, keys, run_id, {"rollout": name, "stage": "staging", **(metadata or {})}
    )
    check_gates(loaded, decisions)
    limiter = Throttle.from_config(
        limits if overridden else _row_throttle(name, rollout["throttle"], limits, log)
    )
    log(
        f"rollout {name}: applying {len(keys)} partition(s) {keys[0]}..{keys[-1]} of {dataset.name} to "
        f"staging at {limiter.describe()}; plan {plan.plan_hash}, decisions {decisions.decision_hash}"
    )
    pacing = _Pacing(store, name, limiter, clock, log, poll_seconds)
    # Issue 17 (write-audit-publish): staging publishes to the table's `staging` branch.
    table = staging_target(dataset.table, envs.production)
    document = execute(envs.staging, loaded, plan, decisions, pace=pacing, table=table)
    document["counts"] = {pd.partition.key: pd.counts for pd in decisions.partitions}
    document["throttle"] = {"describe": limiter.describe(), "waitedSeconds": round(pacing.waited_seconds, 3)}
    if document["status"] == "stopped":
        record_cancelled(
            envs,
            name,
            by=pacing.cancelled_by,
            now=clock.now(),
            detail={
                "committed": document["totals"]["committed"],
                "unchanged": document["totals"]["unchanged"],
            },
        )
        summary = write_backfill_summary(envs, name, dataset, decisions, document, pacing, final="cancelled")
        log(f"rollout {name}: cancelled after {len(document['partitions'])} partition(s)")
        return {
            "status": "cancelled",
            "rollout": name,
            "applied": True,
            "summary": summary,
            "execute": document,
        }
    staged = record_staged(
        envs,
        name,
        decision_hash=decisions.decision_hash,
        plan_hash=plan.plan_hash,
        staging_run_id=run_id,
        staged_at=clock.now(),
        soak_window_seconds=soak_window_seconds(dataset),
        by=actor,
    )
    summary = write_backfill_summary(envs, name, dataset, decisions, document, pacing, final="soaking")
    log(
        f"rollout {name}: staging applied; halted for review (soak window "
        f"{staged['soak_window_seconds'] / 60:g} min from {staged['staged_at']}); "
        f"summary {summary['markdown']}"
    )
    return {"status": "soaking", "rollout": name, "applied": True, "summary": summary, "execute": document}


class _Pacing:
    """The engine's `pace` hook: the operator's control request, then the throttle."""

    def __init__(
        self,
        store: Any,
        name: str,
        limiter: Throttle,
        clock: Clock,
        log: Log,
        poll_seconds: float,
    ) -> None:
        self.store, self.name, self.limiter, self.clock, self.log = store, name, limiter, clock, log
        self.poll_seconds = poll_seconds
        self.waited_seconds = 0.0
        self.paused_seconds = 0.0
        self.cancelled_by: str | None = None
        self.partitions = 0

    def _control(self) -> str:
        """`run` or `cancel`, after sitting out any pause."""
        paused = False
        while True:
            control = self.store.control(self.name)
            if control != "pause":
                break
            if not paused:
                paused = True
                self.store.set_status(
                    self.name, "paused", now=self.clock.now(), detail={"afterPartitions": self.partitions}
                )
                self.log(
                    f"rollout {self.name}: paused after {self.partitions} partition(s); waiting for resume"
                )
            self.clock.sleep(self.poll_seconds)
            self.paused_seconds += self.poll_seconds
        if paused and control == "run":
            self.store.set_status(self.name, "applying", now=self.clock.now(), detail={"resumed": True})
            self.log(f"rollout {self.name}: resumed")
        if control == "cancel":
            history = [h for h in self.store.history(self.name) if h["kind"] == "cancel_requested"]
            self.cancelled_by = history[-1]["actor"] if history else None
        return control

    def __call__(self, pd: PartitionDecision) -> bool:
        if self._control() == "cancel":
            self.log(f"rollout {self.name}: cancel requested; stopping before {pd.partition.key}")
            return False
        delay = self.limiter.delay(self.clock.now())
        if delay > 0:
            self.log(
                f"rollout {self.name}: throttle ({self.limiter.describe()}): "
                f"waiting {delay:.1f}s before {pd.partition.key}"
            )
        while delay > 0:
            step = min(delay, self.poll_seconds)
            self.clock.sleep(step)
            self.waited_seconds += step
            delay -= step
            if self.store.control(self.name) != "run":
                if self._control() == "cancel":
                    self.log(f"rollout {self.name}: cancel requested; stopping before {pd.partition.key}")
                    return False
                delay = self.limiter.delay(self.clock.now())
        self.limiter.started(self.clock.now(), len(pd.add))
        self.partitions += 1
        self.log(
            f"rollout {self.name}: staging {pd.partition.key} ({len(pd.add)} to add, {len(pd.omit)} omitted)"
        )
        return True


def write_backfill_summary(
    envs: RolloutEnvironments,
    name: str,
    dataset: DatasetConfig,
    decisions: Any,
    document: dict[str, Any],
    pacing: _Pacing,
    final: str,
) -> dict[str, str]:
    """`backfill_summary.json` / `.md`: added and omitted by reason per partition, with the hashes."""
    counts = {pd.partition.key: pd.counts for pd in decisions.partitions}
    partitions = []
    for outcome in document["partitions"]:
        c = counts[outcome["key"]]
        partitions.append(
            {
                "key": outcome["key"],
                "status": outcome["status"],
                "source": c["source"],
                "added": c["add"],
                "omitted": c["omit"],
                "omittedByReason": {r: int(c["byReason"].get(r, 0)) for r in REASONS},
                "merkleRoot": outcome["merkleRoot"],
                "manifestChecksum": outcome["manifestChecksum"],
                "eventHash": outcome["eventHash"],
                "files": [{"checksum": f["checksum"], "rowCount": f["rowCount"]} for f in outcome["files"]],
            }
        )
    not_applied = [pd.partition.key for pd in decisions.partitions][len(partitions) :]
    totals = {
        "partitions": len(decisions.partitions),
        "applied": len(partitions),
        "added": sum(p["added"] for p in partitions),
        "omitted": sum(p["omitted"] for p in partitions),
        "omittedByReason": {r: sum(p["omittedByReason"][r] for p in partitions) for r in REASONS},
        "unplaced": decisions.totals["unplaced"],
    }
    summary = {
        "kind": "pcbo.backfill_summary/1",
        "rollout": name,
        "dataset": dataset.name,
        "versionLabel": dataset.versionLabel,
        "stage": "staging",
        "status": final,
        "runId": document["runId"],
        "planHash": document["planHash"],
        "decisionHash": document["decisionHash"],
        "throttle": {
            "limits": {
                "partitionsPerMinute": pacing.limiter.partitions_per_minute,
                "recordsPerMinute": pacing.limiter.records_per_minute,
            },
            "waitedSeconds": round(pacing.waited_seconds, 3),
            "pausedSeconds": round(pacing.paused_seconds, 3),
        },
        "totals": totals,
        "partitions": partitions,
        "notApplied": not_applied,
    }
    rows = [
        [
            p["key"],
            p["status"],
            p["source"],
            p["added"],
            p["omitted"],
            ", ".join(f"{r} {n}" for r, n in p["omittedByReason"].items() if n) or "-",
            p["merkleRoot"][:23] + "…",
            p["eventHash"][:23] + "…" if p["eventHash"] else "-",
        ]
        for p in partitions
    ]
    by_reason = ", ".join(f"{r} {n}" for r, n in totals["omittedByReason"].items() if n) or "none"
    markdown = (
        f"# Backfill summary: rollout `{name}` ({dataset.name}/{dataset.versionLabel}, staging)\n\n"
        f"- status: **{final}**\n- run: `{document['runId']}`\n- plan hash: `{document['planHash']}`\n"
        f"- decision hash: `{document['decisionHash']}`\n"
        f"- partitions applied: {totals['applied']} of {totals['partitions']}\n"
        f"- added: {totals['added']}; omitted: {totals['omitted']} ({by_reason}); "
        f"outside the range or invalid (unplaced): {totals['unplaced']}\n"
        f"- throttle: {pacing.limiter.describe()}; waited {pacing.waited_seconds:.1f}s, "
        f"paused {pacing.paused_seconds:.1f}s\n\n"
        + markdown_table(
            [
                "partition",
                "status",
                "source",
                "added",
                "omitted",
                "omitted by reason",
                "Merkle root",
                "audit event",
            ],
            rows,
        )
        + (f"\nNot applied (cancelled before them): {', '.join(not_applied)}\n" if not_applied else "")
        + f"\nNext: the soak monitor evaluates staging (now: `pcbo rollout soak {name}`); then "
        f"`pcbo approve {name} --key FILE --reason TEXT` (or `pcbo reject {name} --key FILE --reason TEXT`), "
        f"and `pcbo rollout promote {name} --by NAME` once the gate is open "
        f"(`pcbo rollout status {name}` says why it is not).\n"
    )
    paths = write_report(
        rollout_reports_dir(envs.production.settings, name), "backfill_summary", summary, markdown
    )
    envs.store.log(name, "backfill_summary_written", {"paths": paths, "status": final, "totals": totals})
    return paths

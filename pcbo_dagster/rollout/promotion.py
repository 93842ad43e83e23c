"""Promotion to production, behind the gate.

`promotion_gate` says whether a rollout may be promoted now, and if not, every reason why. What it
decides on is read from the dataset version's production audit chain, which must verify
(`rollout/lifecycle.py`); the catalog's `rollouts` and `soak_evaluations` rows are listings that
open nothing, and a `rollouts` row that disagrees with the chain keeps the gate closed:

- the rollout is applied to staging and halted for review: its last lifecycle event on the chain is
  `rollout_staged` (not `rollout_promoted`, `rollout_rolled_back` or `rollout_cancelled`), and its
  catalog row says `soaking` and the same staged decision hash, staging time, window and range;
- its staging partitions passed their checks: each is committed in the staging lake and re-reads
  clean (checksums, rows, Merkle root), no post-write discrepancy was logged for the staging run,
  and no failed asset check was reported for them (`failed_checks`, from the Dagster instance);
- its soak passed (`soak.soak_verdict` of the chain's `rollout_staged` and `rollout_soak_evaluated`
  events: the window elapsed, an evaluation was made after its end, and none failed);
- the approval in force - the signed approvals and rejections of the rollout *on the production audit
  chain*, which must verify, each signed by an approver the dataset's config lists (a row in
  `rollout_approvals` alone, a forged or unlisted signature count for nothing; `approvals.py`) - is
  an approval by the required number of approvers
  (not a rejection) and names the decision hash the rollout's range evaluates to *now*. A changed
  source or policy changes that hash, which makes the approval
  stale: re-stage and approve again.

`promote_keys` writes production partitions: it evaluates the rollout's whole range (so every
production manifest carries the approved decision hash, and each partition's rows and parquet bytes
are those staging got), refuses (exit 3, nothing written) when the hash is not the approved one, and
runs the engine into the production environment for the requested keys only. The production health
check uses it for its mini backfills.

`promote_rollout` names who promotes (`by`, like an approval): a `rollout_promoted` event on the
dataset's production audit chain (who, the decision hash, the approvals it relied on - every approval
event the gate counted, `approval_event_hashes` in chain order, and the last of them alone,
`approval_event_hash`, the one promotions written before 2026-12-06 name - and the run), the
rollout log's `promoted` / `partially_promoted` entry (actor and `promotedBy`), and the production
run's metadata in the catalog. A promotion the gate refuses is logged with who asked.

While it writes, before each partition and before `rollout_promoted` is appended, the production
chain is read again: a rejection recorded, a rollback or a cancel since the gate opened (the
rollout's lifecycle no longer what it was, or the decision in force no longer an approval of the
hash) stops it with `Blocked` (nothing more written, no `rollout_promoted`, the rollout log's
`promotion_stopped`); what it wrote stays in production until rolled back. The last reading is made
under the chain's writer lock, in the append of `rollout_promoted` itself (its `precondition`): no
rejection can be appended between that reading and the event.

`repair_approval` is the gate of a repair (the health check's mini backfill, the production asset
over a promoted rollout): the chain must say the rollout is promoted (and not rolled back since),
and the approval in force must be an approval.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pcbo_dagster.catalog.rollouts import RolloutRow
from pcbo_dagster.core.errors import Blocked, IntegrityError, InvalidInput
from pcbo_dagster.core.recorded_text import check_actor
from pcbo_dagster.core.rollout_lifecycle import PROMOTED, ROLLOUT_PROMOTED, SOAKING
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.datasets.requests import evaluate_keys
from pcbo_dagster.engine.execute import check_gates, execute
from pcbo_dagster.engine.partition_checks import read_chain, reading_chain_findings
from pcbo_dagster.engine.partition_reading import read_partition
from pcbo_dagster.rollout.approvals import decision_in_force
from pcbo_dagster.rollout.clock import REAL_CLOCK, Clock
from pcbo_dagster.rollout.environments import RolloutEnvironments
from pcbo_dagster.rollout.lifecycle import (
    append_event,
    production_chain,
    read_lifecycle,
    staged_row_disagreements,
)
from pcbo_dagster.rollout.soak import soak_verdict
from pcbo_dagster.tables.iceberg_publication import promotion_target


def production_run_id(rollout: str, attempt: str | None = None) -> str:
    return f"rollout-{rollout}-production" + (f"-{attempt}" if attempt else "")


def current_decision_hash(config: DatasetsConfig, dataset: DatasetConfig, rollout: RolloutRow) -> str:
    """The decision hash the rollout's range evaluates to now (nothing written)."""
    _, _, decisions = evaluate_keys(config, dataset, rollout["partition_keys"], f"gate-{rollout['name']}")
    return decisions.decision_hash


def promotion_gate(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    envs: RolloutEnvironments,
    name: str,
    *,
    clock: Clock = REAL_CLOCK,
    failed_checks: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """`{"open": bool, "reasons": [...], ...}` for rollout `name`; see the module doc."""
    rollout = envs.store.require(name)
    reasons: list[str] = []
    gate: dict[str, Any] = {"rollout": name, "status": rollout["status"], "stagedDecisionHash": None}
    try:
        events = production_chain(envs, rollout)
    except IntegrityError as exc:
        reasons.append(f"nothing on the production audit chain can be trusted: {exc}")
        return {**gate, "open": False, "reasons": reasons}
    life = read_lifecycle(envs, rollout, events)
    gate.update(chainStatus=life.status, stagedDecisionHash=life.decision_hash)
    if rollout["status"] != "soaking" or life.status != SOAKING:
        status = rollout["status"] if rollout["status"] != "soaking" else (life.status or "not staged")
        reasons.append(
            f"status is {status}"
            + (
                ": already in production"
                if status == PROMOTED
                else ": not halted for review after a staging apply"
            )
            + (
                f" (the production audit chain says {life.status or 'not staged'}, the catalog soaking)"
                if rollout["status"] == "soaking"
                else ""
            )
        )
        return {**gate, "open": False, "reasons": reasons}
    disagree = staged_row_disagreements(dataset, life, rollout)
    if disagree:
        reasons.append(
            "the catalog's rollout row disagrees with the production audit chain: " + "; ".join(disagree[:3])
        )
        return {**gate, "open": False, "reasons": reasons}
    bad: list[str] = []
    # The staging chain (verified against the staging catalog's head): files that agree with a commit
    # point it never committed are not the rollout's staging output.
    staging_chain = read_chain(envs.staging, rollout["dataset"], rollout["version_label"])
    for key in rollout["partition_keys"]:
        reading = read_partition(envs.staging.lake, rollout["dataset"], rollout["version_label"], key)
        if not reading.committed:
            bad.append(f"{key}: not committed in staging")
        elif reading.findings:
            bad.append(f"{key}: " + "; ".join(f["detail"] for f in reading.findings[:3]))
        elif off_chain := reading_chain_findings(key, reading, staging_chain):
            bad.append(f"{key}: " + "; ".join(off_chain[:3]))
    discrepancies = [d for d in envs.staging.catalog.discrepancies(rollout["staging_run_id"])]
    bad += [f"{d['partition_key']}: post-write check failed in staging" for d in discrepancies]
    for key, checks in sorted((failed_checks or {}).items()):
        bad.append(f"{key}: failed asset check(s) {', '.join(sorted(checks))}")
    if bad:
        reasons.append(f"staging checks failed for {len(bad)} partition(s): " + "; ".join(bad[:5]))
    soak = soak_verdict(life, clock.now())
    gate["soak"] = {"state": soak["state"], "reason": soak["reason"]}
    if soak["state"] != "passed":
        reasons.append(f"soak {soak['state']}: {soak['reason']}")
    approval = decision_in_force(envs, rollout, events)
    if dataset.rollout is not None and not dataset.rollout.approvers:
        # No approval can count: saying "no signed approval yet" would send the operator to
        # `pcbo approve`, which refuses for the same reason.
        reasons.append(
            f"no approver is listed for dataset {dataset.name!r}: add their verifier keys to its "
            "rollout.approvers in the datasets config (--config or PCBO_DATASETS_CONFIG)"
        )
    elif approval is None:
        reasons.append(
            f"no signed approval yet: `pcbo approve {name} --key FILE --reason TEXT` (a listed approver's "
            "key) or the rollout_approval job"
        )
    else:
        gate["approval"] = {
            k: approval[k]
            for k in (
                "decision",
                "actor",
                "reason",
                "decision_hash",
                "event_hash",
                "event_hashes",
                "approvals",
                "required",
                "since_rejection",
            )
        }
        if approval["decision"] == "rejected":
            reasons.append(f"rejected by {approval['actor']}: {approval['reason']}")
        elif approval["decision"] == "pending":
            reasons.append(
                f"{approval['approvals']} of the {approval['required']} signed approvals required "
                f"for decisions {rollout['decision_hash']}"
            )
        else:  # re-reading the source is the gate's costliest step: only an approval can be stale
            now_hash = current_decision_hash(config, dataset, rollout)
            gate["decisionHashNow"] = now_hash
            if now_hash != approval["decision_hash"]:
                reasons.append(
                    f"stale approval: {approval['actor']} approved decisions {approval['decision_hash']} but "
                    f"the range evaluates to {now_hash} now (source or policy changed): roll back staging, "
                    "apply again and approve the new decisions"
                )
    return {**gate, "open": not reasons, "reasons": reasons}


def repair_approval(envs: RolloutEnvironments, rollout: RolloutRow) -> dict[str, Any]:
    """The approval in force under which partitions of the promoted `rollout` may be written again (a
    repair, at its decision hash); `InvalidInput` when the production chain does not say the rollout
    is promoted (a catalog row saying so opens nothing) or no approval is in force."""
    events = production_chain(envs, rollout)
    life = read_lifecycle(envs, rollout, events)
    if life.status != PROMOTED:
        raise InvalidInput(
            "rollout",
            f"rollout {rollout['name']!r} is {life.status or 'not staged'} by the production audit chain, "
            "not promoted: only a promoted rollout's partitions are repaired",
        )
    approval = decision_in_force(envs, rollout, events)
    if approval is None or approval["decision"] != "approved":
        raise InvalidInput("rollout", f"rollout {rollout['name']!r} has no approval in force")
    return approval


def promote_keys(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    envs: RolloutEnvironments,
    rollout: RolloutRow,
    keys: list[str],
    *,
    decision_hash: str,
    run_id: str,
    progress: Any = None,
    by: str | None = None,
) -> dict[str, Any]:
    """Write `keys` (partitions of `rollout`) to production at the approved `decision_hash`; `by`
    (who promotes) goes into the production run's metadata."""
    unknown = [k for k in keys if k not in set(rollout["partition_keys"])]
    if unknown:
        raise InvalidInput("partitions", f"{unknown[:3]} are not partitions of rollout {rollout['name']!r}")
    metadata = {"rollout": rollout["name"], "stage": "production"}
    if by is not None:
        metadata["promotedBy"] = by
    loaded, plan, decisions = evaluate_keys(config, dataset, rollout["partition_keys"], run_id, metadata)
    if decisions.decision_hash != decision_hash:
        raise Blocked(
            "the rollout's decisions changed since they were approved",
            {
                "status": "blocked",
                "gate": "approvedDecisionHash",
                "runId": run_id,
                "approvedDecisionHash": decision_hash,
                "decisionHash": decisions.decision_hash,
            },
        )
    check_gates(loaded, decisions)
    wanted = set(keys)
    subset = replace(decisions, partitions=[pd for pd in decisions.partitions if pd.partition.key in wanted])
    table = promotion_target(dataset.table, envs.production)  # issue 17: `main`, in one snapshot
    status = read_lifecycle(envs, rollout).status
    stop: list[str] = []

    def pace(_pd: Any) -> bool:  # before each partition: still what the gate (or repair) opened on?
        reason = _stop_reason(envs, rollout, status, decision_hash)
        stop[:] = [reason] if reason else []
        return reason is None

    document = execute(
        envs.production,
        loaded,
        plan,
        subset,
        progress=progress,
        pace=pace,
        schema_from=decisions,
        table=table,
    )
    document["counts"] = {pd.partition.key: pd.counts for pd in subset.partitions}
    reason = stop[0] if stop else _stop_reason(envs, rollout, status, decision_hash)
    if reason is not None:
        raise _stopped(envs, rollout, run_id, reason, [p["key"] for p in document["partitions"]], by)
    return document


def _stopped(
    envs: RolloutEnvironments,
    rollout: RolloutRow,
    run_id: str,
    reason: str,
    written: list[str],
    by: str | None,
) -> Blocked:
    """A promotion under way stopped for `reason`: logged (`promotion_stopped`, naming the partitions
    `written`), and the `Blocked` to raise."""
    envs.store.log(
        rollout["name"],
        "promotion_stopped",
        {"runId": run_id, "reason": reason, "written": written, "by": by},
        actor=by,
    )
    return Blocked(
        f"the promotion of rollout {rollout['name']!r} stopped: {reason}; {len(written)} partition(s) "
        "written to production stay there (roll them back: `pcbo rollout rollback`)",
        {
            "status": "stopped",
            "gate": "promotion",
            "rollout": rollout["name"],
            "runId": run_id,
            "reasons": [reason],
            "written": written,
        },
    )


class _StillOpenFailed(Exception):
    """`promote_rollout`'s check under the chain's writer lock found a reason to stop."""


def _stop_reason(
    envs: RolloutEnvironments, rollout: RolloutRow, status: str | None, decision_hash: str
) -> str | None:
    """Why a promotion (or repair) under way must stop, by the production chain read again (None: it
    goes on): the rollout is no longer `status` there (cancelled, rolled back, promoted by another
    run), or the decision in force is no longer an approval of `decision_hash` (a rejection recorded
    since the gate opened)."""
    try:
        events = production_chain(envs, rollout)
    except IntegrityError as exc:
        return str(exc)
    life = read_lifecycle(envs, rollout, events)
    if life.status != status:
        return f"the production audit chain says {life.status or 'not staged'} now, not {status}"
    approval = decision_in_force(envs, rollout, events)
    if approval is None or approval["decision"] != "approved" or approval["decision_hash"] != decision_hash:
        now = (
            "none"
            if approval is None
            else f"{approval['decision']} by {approval['actor']}: {approval['reason']}"
        )
        return f"the decision in force is no longer an approval of {decision_hash} ({now})"
    return None


def promote_rollout(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    envs: RolloutEnvironments,
    name: str,
    *,
    by: str,
    clock: Clock = REAL_CLOCK,
    keys: list[str] | None = None,
    failed_checks: dict[str, list[str]] | None = None,
    run_id: str | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Check the gate and promote the rollout (or `keys` of it) on behalf of `by`; `Blocked` (exit 3)
    with every reason when the gate holds. The rollout is `promoted` once all its partitions are in
    production."""
    check_actor(by, "promotes")
    by = by.strip()
    gate = promotion_gate(config, dataset, envs, name, clock=clock, failed_checks=failed_checks)
    if not gate["open"]:
        envs.store.log(
            name, "promotion_blocked", {"reasons": gate["reasons"], "by": by}, actor=by, now=clock.now()
        )
        raise Blocked(
            f"rollout {name!r} may not be promoted: " + "; ".join(gate["reasons"]),
            {"status": "blocked", "gate": "promotion", "rollout": name, "reasons": gate["reasons"]},
        )
    rollout = envs.store.require(name)
    approval = gate["approval"]
    document = promote_keys(
        config,
        dataset,
        envs,
        rollout,
        keys or rollout["partition_keys"],
        decision_hash=approval["decision_hash"],
        run_id=run_id or production_run_id(name),
        progress=progress,
        by=by,
    )
    complete = keys is None or set(keys) >= set(rollout["partition_keys"])
    stop: list[str] = []

    def still_open() -> None:
        # Under the chain's writer lock: a rejection, rollback or cancel appended since the last look
        # is seen here, and none can be appended before `rollout_promoted` is.
        reason = _stop_reason(envs, rollout, SOAKING, approval["decision_hash"])
        if reason is not None:
            stop.append(reason)
            raise _StillOpenFailed(reason)

    try:
        event = append_event(
            envs,
            rollout,
            ROLLOUT_PROMOTED,
            {
                "by": by,
                "decision_hash": document["decisionHash"],
                "approved_by": approval["actor"],
                "approval_event_hash": approval["event_hash"],
                "approval_event_hashes": approval["event_hashes"],
                "run_id": document["runId"],
                "partition_keys": sorted(pd["key"] for pd in document["partitions"]),
                "complete": complete,
            },
            precondition=still_open,
        )
    except _StillOpenFailed:
        written = [p["key"] for p in document["partitions"]]
        raise _stopped(envs, rollout, document["runId"], stop[0], written, by) from None
    detail = {
        "runId": document["runId"],
        "decisionHash": document["decisionHash"],
        "promotedBy": by,
        "approvedBy": approval["actor"],
        "approvalEventHash": approval["event_hash"],
        "auditEventHash": event["chain"]["event_hash"],
        "partitions": len(document["partitions"]),
        "committed": document["totals"]["committed"],
    }
    if complete:
        envs.store.set_status(name, "promoted", actor=by, now=clock.now(), detail=detail)
    else:
        envs.store.log(name, "partially_promoted", {**detail, "keys": keys}, actor=by, now=clock.now())
    return {
        "status": "promoted",
        "rollout": name,
        "by": by,
        "auditEventHash": event["chain"]["event_hash"],
        "gate": gate,
        "execute": document,
    }

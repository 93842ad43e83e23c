"""Every rollout action, from the datasets config and the engine settings: what the `pcbo rollout`
commands and the Dagster rollout jobs, schedule and sensors call (one code path for both).

Each function opens the rollout dataset's staging and production environments
(`environments.open_environments`), does one thing, and returns a JSON-able document. Moments come
from `clock` (real by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pcbo_dagster.audit.log import audit_timestamp
from pcbo_dagster.catalog.rollouts import RolloutRow, RolloutStore, open_rollout_store
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.recorded_text import check_actor, check_reason
from pcbo_dagster.core.signed_note import SigningKey
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.datasets.requests import key_range
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.rollout import approvals, promotion, staging_apply
from pcbo_dagster.rollout.clock import REAL_CLOCK, Clock
from pcbo_dagster.rollout.environments import (
    RolloutEnvironments,
    approval_policy,
    dataset_settings,
    open_environments,
)

Log = Callable[[str], None]


def rollout_dataset(config: DatasetsConfig, name: str) -> DatasetConfig:
    """The configured dataset `name`, which must have a `rollout` block (`InvalidInput` on `dataset`)."""
    try:
        dataset = config.dataset(name)
    except KeyError:
        raise InvalidInput("dataset", f"no dataset {name!r} in the datasets config") from None
    if dataset.rollout is None:
        raise InvalidInput(
            "dataset", f"{name} has no rollout block: staged rollouts are not configured for it"
        )
    return dataset


@contextmanager
def dataset_environments(
    config: DatasetsConfig, dataset: DatasetConfig, base: Settings
) -> Iterator[RolloutEnvironments]:
    with open_environments(dataset_settings(config, dataset, base), approval_policy(dataset.rollout)) as envs:
        yield envs


def _require(store: RolloutStore | None, name: str) -> RolloutRow:
    if store is None:
        raise InvalidInput("rollout", f"no rollout named {name!r}")
    return store.require(name)


def find_rollout(base: Settings, name: str) -> RolloutRow:
    """The rollout's row, read from the production catalog (`InvalidInput` on `rollout` if unknown)."""
    with open_rollout_store(base.catalog_url) as store:
        return _require(store, name)


@contextmanager
def rollout_environments(
    config: DatasetsConfig, base: Settings, name: str
) -> Iterator[tuple[DatasetConfig, RolloutEnvironments]]:
    rollout = find_rollout(base, name)
    dataset = rollout_dataset(config, rollout["dataset"])
    with dataset_environments(config, dataset, base) as envs:
        yield dataset, envs


def start(
    config: DatasetsConfig,
    base: Settings,
    dataset_name: str,
    first_key: str,
    last_key: str,
    *,
    by: str,
    name: str | None = None,
    throttle: dict[str, Any] | None = None,
    clock: Clock = REAL_CLOCK,
    log: Log = lambda _m: None,
    poll_seconds: float = 1.0,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create (or resume) a rollout and apply it to staging."""
    dataset = rollout_dataset(config, dataset_name)
    keys = key_range(dataset, first_key, last_key)
    name = staging_apply.default_rollout_name(dataset, keys) if name is None else name  # "" is refused
    staging_apply.check_apply_arguments(dataset, name, by, poll_seconds, throttle)
    with dataset_environments(config, dataset, base) as envs:
        return staging_apply.apply_to_staging(
            config,
            dataset,
            envs,
            name,
            keys,
            actor=by,
            throttle=throttle,
            clock=clock,
            log=log,
            poll_seconds=poll_seconds,
            metadata=metadata,
        )


def control(
    base: Settings, name: str, action: str, *, by: str, reason: str = "", clock: Clock = REAL_CLOCK
) -> dict[str, Any]:
    """Pause, resume or cancel a rollout's staging apply (takes effect between partitions)."""
    controls = {"pause": "pause", "resume": "run", "cancel": "cancel"}
    done = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}
    if action not in controls:
        raise InvalidInput("action", f"must be pause, resume or cancel, not {action!r}")
    check_actor(by, "asks")
    check_reason(reason)
    with open_rollout_store(base.catalog_url) as store:
        rollout = _require(store, name)
        assert store is not None
        if rollout["status"] not in ("applying", "paused"):
            raise InvalidInput(
                "rollout",
                f"rollout {name!r} is {rollout['status']}: only a staging apply in progress can be "
                + done[action],
            )
        row = store.request_control(name, controls[action], actor=by.strip(), reason=reason, now=clock.now())
    return {"rollout": name, "action": action, "control": row["control"], "status": row["status"], "by": by}


def decide(
    config: DatasetsConfig,
    base: Settings,
    name: str,
    action: str | None,
    *,
    key: SigningKey | None = None,
    statement: str | None = None,
    reason: str = "",
    decision_hash: str | None = None,
    clock: Clock = REAL_CLOCK,
) -> dict[str, Any]:
    """Approve or reject a rollout with a signed statement (`rollout/approvals.py`): signed here with
    the approver's `key`, or given signed (`statement`); recorded append-only and on the audit chain."""
    with rollout_environments(config, base, name) as (_dataset, envs):
        given: dict[str, Any] = {}  # a statement brought with --reason / --decision-hash
        if statement is None:
            if key is None:
                raise InvalidInput(
                    "key", "sign the decision with your key (--key FILE) or give a signed statement"
                )
            rollout = envs.store.require(name)
            statement = approvals.sign_decision(
                key, rollout, action or "", reason, decision_hash, audit_timestamp(clock.now())
            )
        else:
            given = {"reason": reason or None, "decision_hash": decision_hash}
        row = approvals.record_decision(envs, name, statement, action=action, clock=clock, **given)
    return {
        "rollout": name,
        "decision": row["decision"],
        "decisionHash": row["decision_hash"],
        "by": row["actor"],
        "reason": row["reason"],
        "auditEventHash": row["event_hash"],
    }


def promote(
    config: DatasetsConfig,
    base: Settings,
    name: str,
    *,
    by: str,
    clock: Clock = REAL_CLOCK,
    keys: list[str] | None = None,
    failed_checks: dict[str, list[str]] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Promote a rollout to production on behalf of `by`, if its gate is open (`Blocked` if not)."""
    with rollout_environments(config, base, name) as (dataset, envs):
        return promotion.promote_rollout(
            config,
            dataset,
            envs,
            name,
            by=by,
            clock=clock,
            keys=keys,
            failed_checks=failed_checks,
            run_id=run_id,
        )


def status(config: DatasetsConfig, base: Settings, name: str, *, clock: Clock = REAL_CLOCK) -> dict[str, Any]:
    """Everything about a rollout: its row, history, approvals, soak state and promotion gate."""
    from pcbo_dagster.rollout.soak import soak_status

    with rollout_environments(config, base, name) as (dataset, envs):
        rollout = envs.store.require(name)
        gate_now = promotion.promotion_gate(config, dataset, envs, name, clock=clock)
        return {
            "rollout": _plain(rollout),
            "soak": _plain(soak_status(envs, rollout, clock.now())),
            "gate": _plain(gate_now),
            "approvals": [_plain(a) for a in envs.store.approvals(name)],
            "history": [_plain(h) for h in envs.store.history(name)],
        }


def list_rollouts(base: Settings, dataset: str | None = None) -> dict[str, Any]:
    with open_rollout_store(base.catalog_url) as store:
        rows = [] if store is None else store.list(dataset)
    return {
        "rollouts": [
            _plain(
                {
                    k: r[k]
                    for k in (
                        "name",
                        "dataset",
                        "version_label",
                        "first_key",
                        "last_key",
                        "status",
                        "control",
                        "decision_hash",
                        "staged_at",
                    )
                }
            )
            for r in rows
        ]
    }


def rollback(
    config: DatasetsConfig,
    base: Settings,
    stage: str,
    *,
    by: str,
    reason: str,
    name: str | None = None,
    dataset_name: str | None = None,
    first_key: str | None = None,
    last_key: str | None = None,
    clock: Clock = REAL_CLOCK,
) -> dict[str, Any]:
    """Roll back a rollout, or a partition range of a rollout dataset, in staging or production."""
    from pcbo_dagster.rollout.rollback import check_rollback_arguments, rollback_rollout

    check_rollback_arguments(stage, by, reason)
    if name is not None and (dataset_name, first_key, last_key) != (None, None, None):
        # A range given with a rollout would be ignored: the whole rollout rolled back, not the range.
        raise InvalidInput("rollout", "give a rollout name, or a dataset with --from and --to, not both")
    if name is not None:
        with rollout_environments(config, base, name) as (dataset, envs):
            return rollback_rollout(
                config, dataset, envs, stage, rollout=name, actor=by, reason=reason, now=clock.now()
            )
    if dataset_name is None or first_key is None or last_key is None:
        raise InvalidInput("rollout", "give a rollout name, or a dataset with --from and --to")
    dataset = rollout_dataset(config, dataset_name)
    keys = key_range(dataset, first_key, last_key)
    with dataset_environments(config, dataset, base) as envs:
        return rollback_rollout(
            config, dataset, envs, stage, keys=keys, actor=by, reason=reason, now=clock.now()
        )


def health(
    config: DatasetsConfig,
    base: Settings,
    dataset_name: str,
    *,
    launch: bool = False,
    by: str = "health-check",
    clock: Clock = REAL_CLOCK,
    request_only: bool = False,
) -> dict[str, Any]:
    """The production health check of a rollout dataset; with `launch`, its mini backfill is run here,
    or with `request_only` too, only requested (the report's `launch.status` is `requested`: the
    Dagster `production_health_repairs` sensor launches it as runs of the affected partitions)."""
    from pcbo_dagster.rollout.health import run_health_check

    dataset = rollout_dataset(config, dataset_name)
    with dataset_environments(config, dataset, base) as envs:

        def run_plan(plan: dict[str, Any]) -> dict[str, Any]:
            if request_only:
                return {"status": "requested", "planId": plan["planId"], "by": by}
            return mini_backfill(config, dataset, envs, plan, clock=clock)

        return run_health_check(config, dataset, envs, clock.now(), launch=run_plan if launch else None)


def mini_backfill(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    envs: RolloutEnvironments,
    plan: dict[str, Any],
    *,
    clock: Clock = REAL_CLOCK,
) -> dict[str, Any]:
    """Re-promote the partitions of a health check's plan, rollout by rollout, at each rollout's
    approved decision hash (the gate's approval must still match the decisions now); only rollouts the
    production chain says are promoted (`promotion.repair_approval`)."""
    by_rollout: dict[str, list[str]] = {}
    for entry in plan["partitions"]:
        by_rollout.setdefault(entry["rollout"], []).append(entry["key"])
    results = []
    for name, keys in sorted(by_rollout.items()):
        rollout = envs.store.require(name)
        try:
            approval = promotion.repair_approval(envs, rollout)
        except InvalidInput as exc:
            results.append({"rollout": name, "keys": keys, "status": "skipped", "reason": exc.message})
            continue
        run_id = promotion.production_run_id(name, "repair-" + plan["planId"].split(":")[-1][:12])
        document = promotion.promote_keys(
            config, dataset, envs, rollout, keys, decision_hash=approval["decision_hash"], run_id=run_id
        )
        envs.store.log(
            name, "mini_backfill", {"runId": run_id, "keys": keys, "planId": plan["planId"]}, now=clock.now()
        )
        results.append({"rollout": name, "keys": keys, "status": document["status"], "runId": run_id})
    return {"planId": plan["planId"], "results": results}


def soak(
    config: DatasetsConfig, base: Settings, *, names: list[str] | None = None, clock: Clock = REAL_CLOCK
) -> list[dict[str, Any]]:
    from pcbo_dagster.rollout.soak import run_soak_monitor

    return run_soak_monitor(config, base, clock.now(), rollouts=names)


def soak_due(
    config: DatasetsConfig, base: Settings, *, clock: Clock = REAL_CLOCK
) -> tuple[list[str], list[dict[str, Any]]]:
    """The rollouts the soak monitor would evaluate now, and why it would skip the others it lists as
    soaking (`soak.soak_due`); nothing evaluated."""
    from pcbo_dagster.rollout.soak import soak_due as due

    return due(config, base, clock.now())


def _plain(value: Any) -> Any:
    """Datetimes as ISO text, recursively (for JSON documents)."""
    from datetime import datetime

    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def mark_interrupted(
    config: DatasetsConfig,
    base: Settings,
    dagster_run_id: str,
    run_status: str,
    *,
    clock: Clock = REAL_CLOCK,
) -> list[dict[str, Any]]:
    """Every rollout whose staging apply was running in the Dagster run `dagster_run_id` (status
    `applying` or `paused`) is marked `interrupted`, with the run's final status and how to resume it:
    apply it again (the staging asset over the same partitions with the same rollout name, or
    `pcbo rollout start`); the engine completes what the run left half done. Returns those rollouts."""
    from pcbo_dagster.rollout.staging_apply import staging_run_id

    marked: list[dict[str, Any]] = []
    for dataset in (d for d in config.datasets if d.rollout is not None):
        with dataset_environments(config, dataset, base) as envs:
            for rollout in envs.store.list(dataset.name, statuses=("applying", "paused")):
                run = envs.staging.catalog.get_run(staging_run_id(rollout["name"])) or {}
                if (run.get("metadata") or {}).get("dagsterRunId") != dagster_run_id:
                    continue
                resume = (
                    f"materialize {dataset.asset_name} in staging again over {rollout['first_key']}.."
                    f"{rollout['last_key']} with config rollout: {rollout['name']} (or `pcbo rollout start "
                    f"--dataset {dataset.name} --from {rollout['first_key']} --to {rollout['last_key']} "
                    f"--name {rollout['name']} --by WHO`): what was committed is kept, the rest is applied"
                )
                envs.store.set_status(
                    rollout["name"],
                    "interrupted",
                    actor=f"dagster run {dagster_run_id}",
                    now=clock.now(),
                    detail={"dagsterRunId": dagster_run_id, "runStatus": run_status, "resume": resume},
                )
                marked.append({"rollout": rollout["name"], "dataset": dataset.name, "resume": resume})
    return marked

"""Roll back a rollout, or a range of partitions, in staging or in production.

Two kinds of request, both through the engine's `rollback` (rollback manifests, one
`partition_rolled_back` event per undone version on the stage's audit chain, catalog rows marked):

- **a rollout** (`rollout=NAME`): every partition of the rollout (the range its `rollout_staged` event
  on the production chain names, and any other key its row lists) whose *current* version on the stage
  was written by the rollout's runs there - run id `rollout-NAME-staging` in staging, a run id
  starting `rollout-NAME-production` in production (when several rollout names fit a run id, the
  longest one owns it). Versions the rollout wrote on top of each other are all undone, newest
  first, until the partition's current version is no longer the rollout's (or there is none). A key
  whose current version another run wrote is `skipped`. Each undo names the manifest's run id to the
  engine, which re-checks it under the dataset lock. **Idempotent**: once undone, the rollout's
  versions are no longer current, so a second request undoes nothing.
- **a range** (`keys=[...]`): each key's current version on the stage is undone (one version per
  key; keys without a committed version are left alone). The request is identified by
  `requestId = sha256(JCS{stage, dataset, versionLabel, keys})` (keys in the dataset's order, without
  duplicates), and a rollback by `rollbackId = sha256(JCS{stage, dataset, versionLabel, keys,
  undo: {key: manifest checksum being undone, or null}})`. **Rule**: a range request is a no-op
  (nothing undone, nothing logged; the document names the earlier `rollbackId`) when
  (1) no key has a committed version, or (2) a logged range rollback already has this `rollbackId`
  (these very versions were undone), or (3) the newest logged range rollback with the same
  `requestId` left every key exactly as it is now (its recorded `after` checksums equal the current
  ones): repeating a request does not peel off another version. To undo a further version, make a
  different request (another key set, or the rollout, or the engine's `pcbo rollback`).

Audit and records (only when something was undone; a no-op writes nothing): one `rolled_back` entry
in the rollout log (detail: mode, stage, keys, actor, reason, rollbackId, per-partition results and
the range's `after` state) - under the rollout's name; for a range, under the pseudo-rollout
`range:<dataset>/<versionLabel>` (where the idempotency rule looks) and under every rollout of the
dataset version whose keys the range touches. Rollout status: when a request undid versions a
rollout wrote and the stage no longer holds any of that rollout's versions as current, the rollout
becomes `rolled_back` - after a production rollback always; after a staging rollback only when the
rollout is not `promoted` and production holds none of its versions (a rollout never promoted). The
status change is a `rollout_rolled_back` event on the dataset version's production audit chain
(whichever stage was rolled back: the gate reads it there, and a rolled-back rollout is never
promoted again), then that rollout's `rolled_back` log entry (`set_status` logs it, with the same
detail).

Bad input raises `InvalidInput`: an unknown stage (`stage`), neither or both of rollout and keys
(`rollout`), an unknown rollout or one of another dataset version (`rollout`), keys that are not the
dataset's (`keys`), no actor (`actor`) or reason (`reason`), a staging apply not cancelled
(`rollout`: request `cancel` first, then roll back).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pcbo_dagster.catalog.rollouts import RolloutRow
from pcbo_dagster.core.canonical import digest_of
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.recorded_text import check_actor, check_reason
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.datasets.requests import dataset_keys
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.partition_reading import read_commit_point
from pcbo_dagster.engine.rollback import rollback
from pcbo_dagster.rollout.environments import PRODUCTION, STAGES, STAGING, RolloutEnvironments
from pcbo_dagster.rollout.lifecycle import (
    read_lifecycle,
    record_rolled_back,
    refuse_unwritable_chain,
    staged_keys,
)

DOCUMENT_KIND = "pcbo.rollout_rollback/1"
LOG_KIND = "rolled_back"
ROLLED_BACK = "rolled_back"


def range_log_name(dataset: str, version_label: str) -> str:
    """The pseudo-rollout whose log holds the range rollbacks of a dataset version."""
    return f"range:{dataset}/{version_label}"


def run_prefix(name: str, stage: str) -> str:
    return f"rollout-{name}-{stage}"


def _fits(run_id: str | None, name: str, stage: str) -> bool:
    if not isinstance(run_id, str):
        return False
    if stage == STAGING:
        return run_id == run_prefix(name, STAGING)
    return run_id.startswith(run_prefix(name, PRODUCTION))


def run_owner(run_id: str | None, stage: str, names: list[str]) -> str | None:
    """The rollout (of `names`) whose runs on `stage` include `run_id`: the longest name that fits."""
    fitting = [n for n in names if _fits(run_id, n, stage)]
    return max(fitting, key=lambda n: (len(n), n)) if fitting else None


def _current(env: Environment, dataset: DatasetConfig, key: str) -> dict[str, Any] | None:
    """The key's committed version on the stage ({runId, version, manifestChecksum}), or None;
    `unreadable` set when the commit point exists but is not a manifest."""
    reading = read_commit_point(env.lake, dataset.name, dataset.versionLabel, key)
    if reading.manifest is None:
        return {"unreadable": True} if reading.findings else None
    return {
        "runId": reading.manifest.get("runId"),
        "version": reading.manifest.get("partitionVersion"),
        "manifestChecksum": reading.manifest_checksum,
    }


def _undo(
    env: Environment, dataset: DatasetConfig, key: str, current: dict[str, Any], reason: str
) -> dict[str, Any] | None:
    """Undo the current version `current` through the engine (re-checked there by its run id)."""
    result = rollback(
        env,
        dataset.name,
        dataset.versionLabel,
        run_id=current["runId"],
        partition_key=key,
        reason=reason,
    )
    done = [p for p in result["partitions"] if p["status"] == "rolled_back"]
    if not done:
        return None
    return {
        "version": done[0]["version"],
        "manifestChecksum": current["manifestChecksum"],
        "runId": current["runId"],
        "restoredVersion": done[0]["restoredVersion"],
        "eventHash": done[0]["eventHash"],
    }


def _ordered_keys(dataset: DatasetConfig, keys: list[str]) -> list[str]:
    if isinstance(keys, str) or not isinstance(keys, list | tuple) or not keys:
        raise InvalidInput("keys", "give at least one partition key")
    try:
        known = dataset_keys(dataset)
    except ValueError as exc:
        raise InvalidInput("keys", f"{dataset.name}: {exc}") from None
    positions = {key: i for i, key in enumerate(known)}
    for key in keys:
        if key not in positions:
            raise InvalidInput("keys", f"{key!r} is not a partition key of {dataset.name}")
    return sorted(set(keys), key=positions.__getitem__)


def _holds(
    envs: RolloutEnvironments, dataset: DatasetConfig, rollout: RolloutRow, stage: str, names: list
) -> bool:
    """Whether `stage` still has a version `rollout` wrote as the current version of one of its keys."""
    env = envs.stage(stage)
    for key in rollout["partition_keys"]:
        current = _current(env, dataset, key)
        if current is not None and run_owner(current.get("runId"), stage, names) == rollout["name"]:
            return True
    return False


def _new_status(
    envs: RolloutEnvironments, dataset: DatasetConfig, rollout: RolloutRow, stage: str, names: list
) -> str | None:
    """`rolled_back` when the request leaves the rollout without a current version (see module doc).
    Its status is the production chain's when the chain has one (the catalog's row alone could hide a
    rollback from the chain)."""
    status = read_lifecycle(envs, rollout).status or rollout["status"]
    if status == ROLLED_BACK or _holds(envs, dataset, rollout, stage, names):
        return None
    if stage == PRODUCTION:
        return ROLLED_BACK
    if status == "promoted" or _holds(envs, dataset, rollout, PRODUCTION, names):
        return None
    return ROLLED_BACK


def _record(
    envs: RolloutEnvironments,
    name: str,
    rollout: RolloutRow | None,
    new_status: str | None,
    detail: dict[str, Any],
    actor: str,
    now: datetime,
) -> str | None:
    """The `rolled_back` log entry of `name`; when its status changes, `rollout_rolled_back` on the
    production audit chain first (what the gate reads), then the status and the entry."""
    if rollout is not None and new_status is not None:
        entry = {**detail, "statusWas": rollout["status"], "status": new_status}
        record_rolled_back(envs, name, by=actor, now=now, detail=entry)
        return new_status
    envs.store.log(name, LOG_KIND, detail, actor=actor, now=now)
    return None


def check_rollback_arguments(stage: str, actor: str, reason: str) -> None:
    """The stage, actor and reason of a rollback, checked before any environment is opened (a refused
    rollback creates no catalog): `InvalidInput` naming the one that is wrong."""
    if stage not in STAGES:
        raise InvalidInput("stage", f"must be {' or '.join(STAGES)}, not {stage!r}")
    check_actor(actor, "rolls back")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput("reason", "give a reason for the rollback")
    check_reason(reason)


def rollback_rollout(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    envs: RolloutEnvironments,
    stage: str,
    *,
    rollout: str | None = None,
    keys: list[str] | None = None,
    actor: str,
    reason: str,
    now: datetime,
) -> dict[str, Any]:
    """Roll back a rollout or a range of partitions on `stage`; returns the per-partition results
    (see the module docstring for which versions are undone and when a request is a no-op)."""
    check_rollback_arguments(stage, actor, reason)
    if (rollout is None) == (keys is None):
        raise InvalidInput("rollout", "give either a rollout or partition keys to roll back")
    if not any(d.name == dataset.name for d in config.datasets):
        raise InvalidInput("dataset", f"{dataset.name!r} is not in the datasets config")
    # Before anything is undone (in staging too): a rollback that leaves a rollout without a current
    # version ends appending `rollout_rolled_back` to the production chain
    refuse_unwritable_chain(envs, dataset.name, dataset.versionLabel, f"the {stage} rollback")
    rollouts = envs.store.list()
    names = [r["name"] for r in rollouts]
    if rollout is not None:
        return _rollback_rollout(envs, dataset, stage, envs.store.require(rollout), names, actor, reason, now)
    assert keys is not None
    return _rollback_range(envs, dataset, stage, _ordered_keys(dataset, keys), rollouts, actor, reason, now)


def _document(
    mode: str,
    stage: str,
    dataset: DatasetConfig,
    keys: list[str],
    actor: str,
    reason: str,
    partitions: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    undone = sum(len(p["undone"]) for p in partitions)
    return {
        "kind": DOCUMENT_KIND,
        "status": ROLLED_BACK if undone else "noop",
        "mode": mode,
        "stage": stage,
        "dataset": dataset.name,
        "versionLabel": dataset.versionLabel,
        "keys": keys,
        "actor": actor,
        "reason": reason,
        "rolledBack": undone,
        "partitions": partitions,
        **extra,
    }


def _rollback_rollout(
    envs: RolloutEnvironments,
    dataset: DatasetConfig,
    stage: str,
    row: RolloutRow,
    names: list[str],
    actor: str,
    reason: str,
    now: datetime,
) -> dict[str, Any]:
    name = row["name"]
    if (row["dataset"], row["version_label"]) != (dataset.name, dataset.versionLabel):
        raise InvalidInput(
            "rollout",
            f"rollout {name!r} is of {row['dataset']}/{row['version_label']}, "
            f"not {dataset.name}/{dataset.versionLabel}",
        )
    if stage == STAGING and row["status"] in ("applying", "paused") and envs.store.control(name) != "cancel":
        raise InvalidInput(
            "rollout", f"rollout {name!r} is {row['status']} in staging: request cancel first, then roll back"
        )
    # The keys the production chain says the rollout staged, and any other its row names: a row
    # edited to name fewer must not leave some of its versions current (and the rollout rolled back).
    staged = staged_keys(dataset, read_lifecycle(envs, row)) or []
    row = {**row, "partition_keys": staged + [k for k in row["partition_keys"] if k not in set(staged)]}
    env = envs.stage(stage)
    partitions: list[dict[str, Any]] = []
    for key in row["partition_keys"]:
        undone: list[dict[str, Any]] = []
        status: str = "noop"
        detail: str | None = None
        while True:
            current = _current(env, dataset, key)
            if current is None:
                detail = None if undone else "no committed version"
                break
            if current.get("unreadable"):
                status, detail = "skipped", "the commit point is not a readable manifest"
                break
            if run_owner(current["runId"], stage, names) != name:
                if not undone:
                    status, detail = "skipped", f"the current version was written by run {current['runId']!r}"
                break
            if undone and current["version"] >= undone[-1]["version"]:
                break  # never loop: each undo restores an older version
            step = _undo(env, dataset, key, current, reason)
            if step is None:
                status, detail = "skipped", "the current version changed while rolling back"
                break
            undone.append(step)
        partitions.append(
            {
                "key": key,
                "status": "rolled_back" if undone else status,
                "undone": undone,
                "detail": detail,
                "current": _current(env, dataset, key),
            }
        )
    document = _document(
        "rollout", stage, dataset, list(row["partition_keys"]), actor, reason, partitions, rollout=name
    )
    document["rollbackId"] = None
    document["rolloutStatus"] = row["status"]
    if not document["rolledBack"]:
        return document
    document["rollbackId"] = digest_of(
        {
            "kind": "pcbo.rollout_rollback/1",
            "stage": stage,
            "dataset": dataset.name,
            "versionLabel": dataset.versionLabel,
            "rollout": name,
            "keys": list(row["partition_keys"]),
            "undo": {p["key"]: [u["manifestChecksum"] for u in p["undone"]] for p in partitions},
        }
    )
    log_detail = _log_detail(document)
    changed = _record(envs, name, row, _new_status(envs, dataset, row, stage, names), log_detail, actor, now)
    document["rolloutStatus"] = changed or row["status"]
    return document


def _log_detail(document: dict[str, Any]) -> dict[str, Any]:
    keep = ("mode", "stage", "dataset", "versionLabel", "rollout", "keys", "actor", "reason", "rollbackId")
    detail = {k: document[k] for k in keep if k in document}
    detail["requestId"] = document.get("requestId")
    detail["rolledBack"] = document["rolledBack"]
    detail["results"] = [
        {"key": p["key"], "status": p["status"], "undone": p["undone"], "detail": p["detail"]}
        for p in document["partitions"]
    ]
    if "after" in document:
        detail["after"] = document["after"]
    return detail


def _rollback_range(
    envs: RolloutEnvironments,
    dataset: DatasetConfig,
    stage: str,
    keys: list[str],
    rollouts: list[RolloutRow],
    actor: str,
    reason: str,
    now: datetime,
) -> dict[str, Any]:
    env = envs.stage(stage)
    ident = {"stage": stage, "dataset": dataset.name, "versionLabel": dataset.versionLabel, "keys": keys}
    request_id = digest_of({"kind": "pcbo.range_rollback_request/1", **ident})
    before = {key: _current(env, dataset, key) for key in keys}
    undo = {k: (c or {}).get("manifestChecksum") for k, c in before.items()}
    rollback_id = digest_of({"kind": "pcbo.range_rollback/1", **ident, "undo": undo})
    log_name = range_log_name(dataset.name, dataset.versionLabel)
    earlier = [
        e["detail"]
        for e in envs.store.history(log_name)
        if e["kind"] == LOG_KIND and e["detail"].get("requestId") == request_id
    ]
    repeat_of = None
    if any(d.get("rollbackId") == rollback_id for d in earlier):
        repeat_of = rollback_id
    elif earlier and earlier[-1].get("after") == undo:
        repeat_of = earlier[-1].get("rollbackId")
    partitions: list[dict[str, Any]]
    if repeat_of is not None or all(v is None for v in undo.values()):
        partitions = [
            {
                "key": k,
                "status": "noop",
                "undone": [],
                "detail": "already rolled back by this request" if repeat_of else "no committed version",
                "current": before[k],
            }
            for k in keys
        ]
        return _document(
            "range",
            stage,
            dataset,
            keys,
            actor,
            reason,
            partitions,
            requestId=request_id,
            rollbackId=repeat_of,
            repeatOf=repeat_of,
            after=undo,
        )

    names = [r["name"] for r in rollouts]
    partitions = []
    undone_by: set[str] = set()
    for key in keys:
        current = before[key]
        step = None
        detail: str | None
        if current is None:
            detail = "no committed version"
        elif current.get("unreadable"):
            detail = "the commit point is not a readable manifest"
        else:
            step = _undo(env, dataset, key, current, reason)
            detail = None if step is not None else "the current version changed while rolling back"
        if step is not None:
            owner = run_owner(step["runId"], stage, names)
            if owner is not None:
                undone_by.add(owner)
        partitions.append(
            {
                "key": key,
                "status": "rolled_back" if step is not None else "noop",
                "undone": [step] if step is not None else [],
                "detail": detail,
                "current": _current(env, dataset, key),
            }
        )
    after = {p["key"]: (p["current"] or {}).get("manifestChecksum") for p in partitions}
    document = _document(
        "range",
        stage,
        dataset,
        keys,
        actor,
        reason,
        partitions,
        requestId=request_id,
        rollbackId=rollback_id,
        repeatOf=None,
        after=after,
    )
    if not document["rolledBack"]:
        return document
    log_detail = _log_detail(document)
    envs.store.log(log_name, LOG_KIND, log_detail, actor=actor, now=now)
    statuses = {}
    key_set = set(keys)
    for row in rollouts:
        if (row["dataset"], row["version_label"]) != (dataset.name, dataset.versionLabel):
            continue
        if not key_set.intersection(row["partition_keys"]):
            continue
        new = _new_status(envs, dataset, row, stage, names) if row["name"] in undone_by else None
        changed = _record(envs, row["name"], row, new, log_detail, actor, now)
        statuses[row["name"]] = changed or row["status"]
    document["rolloutStatuses"] = statuses
    return document

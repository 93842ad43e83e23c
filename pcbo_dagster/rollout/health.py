"""Production health of promoted rollouts, and the mini backfill that would repair it.

Which partitions are checked: those of the dataset's rollouts (of its current `versionLabel`; the
range each staged, by its `rollout_staged` event on the production chain, not its catalog row) that
were promoted (status `promoted`) or approved (the latest approval is `approved` and its decision
hash is the rollout's staged decision hash; rollouts `rolled_back` or `cancelled` are left out), or
exactly the `keys` given. A key in several such rollouts belongs to the newest one; a given key in
none has no rollout (it is still checked for `missing`, `failed` and `drifted`, not for `stale`).

Each key's production state, in order of precedence (the first that holds is its `status`; every one
that holds is listed in its `reasons`):

- `missing`: production has no committed manifest (`_manifest.json`), though the rollout was
  promoted or approved;
- `failed`: the commit point is unreadable, or `read_partition` reports findings (file missing,
  size/checksum/row-count mismatch, ids, Merkle root), or the production catalog's current row is
  not the lake's manifest, or the production catalog holds a `post_write_check` discrepancy for the
  key recorded at or after the current version was committed;
- `stale`: the manifest's `decisionHash` differs from the decision hash of the rollout's whole range
  evaluated now (`evaluate_keys`, once per rollout) - the source or the config changed since;
- `drifted`: the production manifest's file checksums, `merkleRoot` or `recordCount` differ from
  staging's committed manifest of the key (a key staging no longer holds is not called drifted;
  the report says `staging: null`);
- else `healthy`.

Outputs, under `reports_dir(production settings)/health/<dataset>/`:

- `health_report.json` / `.md`: every key's status, reasons and findings, the time of the check
  (`now`) and, after `run_health_check` launched it, the launch result;
- `mini_backfill_plan.json`: the keys that are not healthy, deterministic (no time, partitions in the
  dataset's key order, JSON with sorted keys): `{"kind": "pcbo.mini_backfill/1", "dataset",
  "versionLabel", "partitions": [{"key", "reasons", "rollout", "decisionHash"}], "planId"}` where
  `decisionHash` is the rollout range's decision hash evaluated now (what a re-run would commit;
  null without a rollout or when the evaluation failed) and `planId` is `sha256:` + SHA-256 of the
  RFC 8785 form of the document without `planId`. An unchanged state rewrites identical bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pcbo_dagster.catalog.rollouts import RolloutRow
from pcbo_dagster.core.canonical import digest_of
from pcbo_dagster.core.errors import PcboError
from pcbo_dagster.core.instants import format_datetime
from pcbo_dagster.core.json_documents import sorted_document, sorted_text
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.datasets.requests import dataset_keys, evaluate_keys
from pcbo_dagster.engine.partition_checks import CheckedChain, read_distrusted_chain
from pcbo_dagster.engine.partition_reading import read_commit_point, read_partition
from pcbo_dagster.io.atomic_files import replace_file
from pcbo_dagster.rollout.approvals import decision_in_force
from pcbo_dagster.rollout.environments import RolloutEnvironments
from pcbo_dagster.rollout.lifecycle import production_chain, read_lifecycle, staged_keys
from pcbo_dagster.rollout.reports import markdown_table, reports_dir, write_report

PLAN_KIND = "pcbo.mini_backfill/1"
REPORT_KIND = "pcbo.health_report/1"
PLAN_FILE = "mini_backfill_plan.json"
REPORT_STEM = "health_report"
#: Statuses in order of precedence; `healthy` when none holds.
PROBLEMS = ("missing", "failed", "stale", "drifted")
HEALTHY = "healthy"
#: The run id of the health check's evaluations (no digest depends on a run id).
EVALUATION_RUN_ID = "pcbo-health-check"
LOG_KIND_LAUNCHED = "health_backfill_launched"
#: Who the log entries of a launch name.
HEALTH_ACTOR = "pcbo-health-check"

Launch = Callable[[dict[str, Any]], dict[str, Any]]


def health_dir(envs: RolloutEnvironments, dataset: DatasetConfig) -> Path:
    return reports_dir(envs.production.settings) / "health" / dataset.name


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON (anything else as its string), so it can be logged and reported."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# -- which partitions ---------------------------------------------------------------------------


def eligible_rollouts(envs: RolloutEnvironments, dataset: DatasetConfig) -> list[RolloutRow]:
    """The dataset version's promoted or approved rollouts, oldest first, by the verified production
    chain (its lifecycle events and signed approvals), never by the `rollouts` rows' status; each with
    the partition keys the chain staged (`staged_keys`), not its row's."""
    found: list[RolloutRow] = []
    events: list[dict[str, Any]] | None = None
    for rollout in envs.store.list(dataset=dataset.name):
        if rollout["version_label"] != dataset.versionLabel:
            continue
        if events is None:  # one chain per dataset version: read and verified once
            events = production_chain(envs, rollout)
        life = read_lifecycle(envs, rollout, events)
        rollout = {**rollout, "partition_keys": staged_keys(dataset, life) or rollout["partition_keys"]}
        if life.status == "promoted":
            found.append(rollout)
            continue
        if life.status in ("rolled_back", "cancelled") or life.decision_hash is None:
            continue
        approval = decision_in_force(envs, rollout, events)
        if (
            approval is not None
            and approval["decision"] == "approved"
            and approval["decision_hash"] == life.decision_hash
        ):
            found.append(rollout)
    return found


def _key_order(dataset: DatasetConfig, keys: list[str]) -> list[str]:
    try:
        positions = {key: i for i, key in enumerate(dataset_keys(dataset))}
    except ValueError:
        positions = {}
    unique = set(keys)
    return sorted(unique, key=lambda k: (0, positions[k], k) if k in positions else (1, 0, k))


# -- one partition ------------------------------------------------------------------------------


def _manifest_summary(manifest: dict[str, Any] | None, checksum: str | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    return {
        "runId": manifest.get("runId"),
        "partitionVersion": manifest.get("partitionVersion"),
        "manifestChecksum": checksum,
        "decisionHash": manifest.get("decisionHash"),
        "merkleRoot": manifest.get("merkleRoot"),
        "recordCount": manifest.get("recordCount"),
        "fileChecksums": sorted(f.get("checksum") for f in manifest.get("files", [])),
    }


def _check_key(
    envs: RolloutEnvironments,
    dataset: DatasetConfig,
    key: str,
    rollout: str | None,
    expected_hash: str | None,
    discrepancies: list[dict[str, Any]],
    chain: CheckedChain,
) -> dict[str, Any]:
    name, vl = dataset.name, dataset.versionLabel
    production = envs.production
    reasons: set[str] = set()
    findings: list[dict[str, Any]] = []
    reading = read_partition(production.lake, name, vl, key)
    # The chain is the truth: a commit point it does not say is current is not healthy, whatever the
    # lake's files and the catalog's rows agree on.
    history = chain.replayed.get(key)
    current = history.current_version if history is not None else None
    if chain.findings:
        reasons.add("failed")
        findings.append(
            {"kind": "audit_chain_broken", "where": reading.rel, "detail": "; ".join(chain.findings[:3])}
        )
    if reading.manifest is not None and (
        current is None or current.manifest_checksum != reading.manifest_checksum
    ):
        reasons.add("failed")
        findings.append(
            {
                "kind": "commit_point_not_on_chain",
                "where": reading.rel,
                "detail": "the production commit point is not the version the audit chain says is current",
            }
        )
    summary = _manifest_summary(reading.manifest, reading.manifest_checksum)
    staging_reading = read_commit_point(envs.staging.lake, name, vl, key)
    staging = _manifest_summary(staging_reading.manifest, staging_reading.manifest_checksum)

    if reading.manifest is None and not reading.findings:
        reasons.add("missing")
        findings.append(
            {
                "kind": "production_missing",
                "where": reading.rel,
                "detail": "production has no committed manifest"
                + (f" though rollout {rollout!r} was promoted or approved" if rollout else ""),
            }
        )
    else:
        if reading.findings:
            reasons.add("failed")
            findings.extend(reading.findings)
        row = production.catalog.current_partition(name, vl, key)
        if summary is not None and (row is None or row["manifest_checksum"] != reading.manifest_checksum):
            reasons.add("failed")
            findings.append(
                {
                    "kind": "catalog_mismatch",
                    "where": reading.rel,
                    "detail": "the production catalog's current version is not the lake's manifest",
                }
            )
        since = row["committed_at"] if row is not None else None
        for d in discrepancies:
            if d["partition_key"] != key or (since is not None and d["recorded_at"] < since):
                continue
            reasons.add("failed")
            detail = d["detail"] if isinstance(d["detail"], dict) else {}
            findings.append(
                {
                    "kind": "post_write_check_failed",
                    "where": reading.rel,
                    "detail": f"run {d['run_id']}: " + "; ".join(map(str, detail.get("findings", []))),
                }
            )
        if summary is not None:
            if expected_hash is not None and summary["decisionHash"] != expected_hash:
                reasons.add("stale")
                findings.append(
                    {
                        "kind": "decision_hash_changed",
                        "where": reading.rel,
                        "detail": f"production has {summary['decisionHash']}, "
                        f"the rollout's range evaluates to {expected_hash} now",
                    }
                )
            if staging is not None:
                for field in ("fileChecksums", "merkleRoot", "recordCount"):
                    if summary[field] != staging[field]:
                        reasons.add("drifted")
                        findings.append(
                            {
                                "kind": "differs_from_staging",
                                "where": reading.rel,
                                "detail": f"{field}: production {summary[field]}, staging {staging[field]}",
                            }
                        )
    ordered = [r for r in PROBLEMS if r in reasons]
    return {
        "key": key,
        "status": ordered[0] if ordered else HEALTHY,
        "reasons": ordered,
        "rollout": rollout,
        "expectedDecisionHash": expected_hash,
        "findings": findings,
        "production": summary,
        "staging": staging,
    }


# -- the plan -----------------------------------------------------------------------------------


def mini_backfill_plan(dataset: DatasetConfig, partitions: list[dict[str, Any]]) -> dict[str, Any]:
    """The plan re-running every key that is not healthy (`partitions` as in the health report)."""
    body = {
        "kind": PLAN_KIND,
        "dataset": dataset.name,
        "versionLabel": dataset.versionLabel,
        "partitions": [
            {
                "key": p["key"],
                "reasons": list(p["reasons"]),
                "rollout": p["rollout"],
                "decisionHash": p["expectedDecisionHash"],
            }
            for p in partitions
            if p["status"] != HEALTHY
        ],
    }
    return {**body, "planId": digest_of(body)}


def plan_id(plan: dict[str, Any]) -> str:
    """The id a plan should carry: the digest of everything but `planId`."""
    return digest_of({k: v for k, v in plan.items() if k != "planId"})


# -- the check ----------------------------------------------------------------------------------


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Production health: {report['dataset']}/{report['versionLabel']}",
        "",
        f"Checked at {report['checkedAt']}: **{report['status']}** "
        + ", ".join(f"{n} {s}" for s, n in report["counts"].items() if n),
        "",
    ]
    if report["rollouts"]:
        lines += [
            "## Rollouts",
            "",
            markdown_table(
                ["rollout", "status", "partitions", "decision hash now", "evaluation error"],
                [
                    [r["name"], r["status"], r["partitions"], r["decisionHash"] or "", r["error"] or ""]
                    for r in report["rollouts"]
                ],
            ),
        ]
    lines += [
        "## Partitions",
        "",
        markdown_table(
            ["key", "status", "reasons", "rollout", "findings"],
            [
                [
                    p["key"],
                    p["status"],
                    ", ".join(p["reasons"]),
                    p["rollout"] or "",
                    "; ".join(f"{f['kind']}: {f['detail']}" for f in p["findings"]),
                ]
                for p in report["partitions"]
            ],
        )
        if report["partitions"]
        else "No partitions to check.\n",
        "## Mini backfill",
        "",
        f"Plan `{report['plan']['planId']}`: {len(report['plan']['partitions'])} partition(s) "
        f"(`{report['files']['plan']}`).",
        "",
    ]
    launch = report.get("launch")
    if launch is not None:
        lines += [
            "## Launch",
            "",
            "```json",
            sorted_text(launch),
            "```",
            "",
        ]
    return "\n".join(lines)


def _write(envs: RolloutEnvironments, dataset: DatasetConfig, report: dict[str, Any]) -> None:
    directory = health_dir(envs, dataset)
    report["files"]["report"] = write_report(directory, REPORT_STEM, report, _markdown(report))


def check_production_health(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    envs: RolloutEnvironments,
    now: datetime,
    keys: list[str] | None = None,
) -> dict[str, Any]:
    """Check production, write the health report and the mini backfill plan; returns the report
    (with the plan under `plan` and the paths written under `files`)."""
    rollouts = eligible_rollouts(envs, dataset)
    owner: dict[str, RolloutRow] = {}
    for rollout in rollouts:  # oldest first: the newest rollout holding a key wins
        for key in rollout["partition_keys"]:
            owner[key] = rollout
    checked = _key_order(dataset, list(owner) if keys is None else list(keys))

    involved = {owner[k]["name"]: owner[k] for k in checked if k in owner}
    evaluated: dict[str, dict[str, Any]] = {}
    for name, involved_rollout in sorted(involved.items()):
        entry: dict[str, Any] = {
            "name": name,
            "status": involved_rollout["status"],
            "partitions": len(involved_rollout["partition_keys"]),
            "stagedDecisionHash": involved_rollout.get("decision_hash"),
            "decisionHash": None,
            "error": None,
        }
        try:
            _, _, decisions = evaluate_keys(
                config, dataset, involved_rollout["partition_keys"], EVALUATION_RUN_ID
            )
            entry["decisionHash"] = decisions.decision_hash
        except (PcboError, OSError, ValueError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        evaluated[name] = entry

    discrepancies = [
        d
        for d in envs.production.catalog.discrepancies()
        if d["dataset"] == dataset.name
        and d["version_label"] == dataset.versionLabel
        and d["kind"] == "post_write_check"
    ]
    # as the audit_chain check reads it (with the operator's key, every event signed)
    chain = read_distrusted_chain(envs.production, dataset.name, dataset.versionLabel)
    partitions = []
    for key in checked:
        owning = owner.get(key)
        owner_name = owning["name"] if owning is not None else None
        expected = evaluated[owner_name]["decisionHash"] if owner_name is not None else None
        partitions.append(_check_key(envs, dataset, key, owner_name, expected, discrepancies, chain))

    plan = mini_backfill_plan(dataset, partitions)
    directory = health_dir(envs, dataset)
    directory.mkdir(parents=True, exist_ok=True)
    plan_path = directory / PLAN_FILE
    replace_file(plan_path, sorted_document(plan))

    counts = {status: 0 for status in (HEALTHY, *PROBLEMS)}
    for p in partitions:
        counts[p["status"]] += 1
    report = {
        "kind": REPORT_KIND,
        "dataset": dataset.name,
        "versionLabel": dataset.versionLabel,
        "checkedAt": format_datetime(now),
        "status": HEALTHY if not plan["partitions"] else "unhealthy",
        "counts": counts,
        "rollouts": [evaluated[name] for name in sorted(evaluated)],
        "partitions": partitions,
        "plan": plan,
        "launch": None,
        "files": {"plan": str(plan_path)},
    }
    _write(envs, dataset, report)
    return report


def run_health_check(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    envs: RolloutEnvironments,
    now: datetime,
    launch: Launch | None = None,
    keys: list[str] | None = None,
) -> dict[str, Any]:
    """`check_production_health`, then, when `launch` is given and the plan is not empty, call it
    with the plan; its result (or the error it raised, re-raised after recording) goes into the
    report and into the log of every rollout the plan touches (kind `health_backfill_launched`)."""
    report = check_production_health(config, dataset, envs, now, keys)
    plan = report["plan"]
    if launch is None or not plan["partitions"]:
        return report
    error: BaseException | None = None
    try:
        result = launch(plan)
        status = (
            result.get("status") if isinstance(result, dict) and result.get("status") == "requested" else None
        )
        ran = result.get("results") if isinstance(result, dict) else None
        if isinstance(ran, list) and ran and all(r.get("status") == "skipped" for r in ran):
            status = "skipped"  # (the mini backfill wrote nothing: each rollout's result says why)
        outcome: dict[str, Any] = {"status": status or "launched", "result": _jsonable(result)}
    except Exception as exc:  # recorded, then raised again
        error = exc
        outcome = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    report["launch"] = {"planId": plan["planId"], "partitions": len(plan["partitions"]), **outcome}
    by_rollout: dict[str, list[str]] = {}
    for p in plan["partitions"]:
        if p["rollout"] is not None:
            by_rollout.setdefault(p["rollout"], []).append(p["key"])
    for name, rollout_keys in sorted(by_rollout.items()):
        envs.store.log(
            name,
            LOG_KIND_LAUNCHED,
            {
                "dataset": dataset.name,
                "versionLabel": dataset.versionLabel,
                "planId": plan["planId"],
                "keys": rollout_keys,
                "reasons": {p["key"]: p["reasons"] for p in plan["partitions"] if p["rollout"] == name},
                **outcome,
            },
            actor=HEALTH_ACTOR,
            now=now,
        )
    _write(envs, dataset, report)
    if error is not None:
        raise error
    return report

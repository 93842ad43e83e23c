"""The soak: a rollout's staging output watched for a while before it may be promoted.

Each soak evaluation re-reads the rollout's staging output (the committed partitions of the staging
lake for the rollout's dataset, version and keys: those of the range its `rollout_staged` event names,
a row that disagrees with the chain is evaluated never) and checks it, then records the result on the
dataset version's production audit chain (`rollout_soak_evaluated`: the verdict, the moment, each
check's verdict and message, the digest of the detail) and in the production catalog
(`soak_evaluations`, append-only, a listing: `rollout/lifecycle.py`):

- `policy_violations`: no row of the output breaks the dataset's policies (consent, jurisdictions,
  retention, existing target ids; `engine.partition_checks.policy_violations`, as the Dagster
  `policy_compliance` check);
- `duplicate_ids`: no id appears twice in the whole output;
- `rows_match_decisions`: every partition is committed and holds exactly the ids the engine decides
  to add *now* (the source evaluated again);
- `checksums`: re-reading every partition (files, sizes, SHA-256, row counts, Merkle root) finds
  nothing, and its commit point is the version the staging audit chain (verified against the
  staging catalog's head) says is current: files rewritten to agree with a manifest of their own
  are not the rollout's output;
- `business_metric` (with `rollout.businessMetric`): the metric over all the output's rows is
  within its baseline.

Each check is `{passed, observed, expected, message, partitions}`; `partitions` lists only the
partitions with findings (at most `MAX_FINDINGS` findings each, and their `count`). The evaluation's
detail also holds `decision_hash` (the staging apply's) and `decision_hash_now` (the source evaluated
now): a changed source shows there even when the ids it decides did not change.

`soak_verdict` turns what the production chain says (`core/rollout_lifecycle.py`: the
`rollout_staged` event's time and window, the `rollout_soak_evaluated` events since staging) into a
state: `not_started` (not staged yet), `soaking`, `passed` (the window is over, an evaluation was
made at or after its end, and every evaluation since staging passed) or `failed` (any evaluation
since staging failed, for good). The catalog's `rollouts` and `soak_evaluations` rows count for
nothing there: they are listings (the report). Nothing here reads the wall clock: every function
takes `now`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pcbo_dagster.catalog.rollouts import RolloutRow, open_rollout_store
from pcbo_dagster.core.business_metric import parse_metric
from pcbo_dagster.core.errors import IntegrityError, InvalidInput, PcboError
from pcbo_dagster.core.instants import format_datetime, format_instant, parse_instant, to_micros
from pcbo_dagster.core.plan import NormalizedPolicies
from pcbo_dagster.core.rollout_lifecycle import SOAKING, Lifecycle, check_rollout_name, soak_rows_on_chain
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.datasets.requests import evaluate_keys
from pcbo_dagster.engine.partition_checks import (
    CheckedChain,
    policy_violations,
    read_chain,
    reading_chain_findings,
)
from pcbo_dagster.engine.partition_reading import PartitionReading, read_partition
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.rollout.environments import RolloutEnvironments, dataset_settings, open_environments
from pcbo_dagster.rollout.lifecycle import (
    read_lifecycle,
    record_soak_evaluation,
    refuse_unwritable_chain,
    staged_row_disagreements,
)
from pcbo_dagster.rollout.reports import markdown_table, rollout_reports_dir, write_report

POLICY_VIOLATIONS = "policy_violations"
DUPLICATE_IDS = "duplicate_ids"
ROWS_MATCH_DECISIONS = "rows_match_decisions"
CHECKSUMS = "checksums"
BUSINESS_METRIC = "business_metric"
CHECKS = (POLICY_VIOLATIONS, DUPLICATE_IDS, ROWS_MATCH_DECISIONS, CHECKSUMS, BUSINESS_METRIC)
#: Findings kept per partition and check (their total is in `count`).
MAX_FINDINGS = 20
SOAK_REPORT = "soak_report"


def iso(moment: datetime | None) -> str | None:
    """A moment as ISO 8601 UTC text (`...Z`); a naive datetime is taken as UTC."""
    return None if moment is None else format_datetime(moment)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- one evaluation --------------------------------------------------------------------------------


def evaluate_soak(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    envs: RolloutEnvironments,
    rollout: RolloutRow,
    now: datetime,
    life: Lifecycle | None = None,
) -> dict[str, Any]:
    """Evaluate the rollout's staging output once, record it (on the production chain, then in
    `soak_evaluations`) and return the record (`{rollout, passed, detail, evaluated_at}`).
    `IntegrityError`, nothing evaluated or recorded, when the rollout's row disagrees with its
    lifecycle on the production chain (`life`, read when not given): the soak reads the partitions
    the chain staged, never a range an edited row names. `InvalidInput` (field `rollout`), nothing
    evaluated or recorded, when that chain says the soak has failed for good (`failed_for_good`)."""
    if rollout["dataset"] != dataset.name:
        raise ValueError(f"rollout {rollout['name']!r} is of {rollout['dataset']!r}, not {dataset.name!r}")
    check_rollout_name(rollout["name"])  # its report's directory: a row's `../..` is refused first
    life = read_lifecycle(envs, rollout) if life is None else life
    _require_row_on_chain(dataset, rollout, life)
    closed = failed_for_good(life, now)
    if closed is not None:
        raise InvalidInput("rollout", f"rollout {rollout['name']!r}: {closed}")
    keys = list(rollout["partition_keys"])
    version_label = rollout["version_label"]
    readings = {key: read_partition(envs.staging.lake, dataset.name, version_label, key) for key in keys}
    # The staging chain (verified against the staging catalog's head): a commit point it did not commit
    # is not the rollout's output, however well its files agree with it.
    staging_chain = read_chain(envs.staging, dataset.name, version_label)
    decided, decision_hash_now, problem = _decisions_now(config, dataset, rollout)
    checks: dict[str, dict[str, Any]] = {
        POLICY_VIOLATIONS: _policy_check(dataset, readings),
        DUPLICATE_IDS: _duplicate_check(readings),
        ROWS_MATCH_DECISIONS: _decisions_check(readings, decided, problem),
        CHECKSUMS: _checksum_check(readings, staging_chain),
    }
    metric = dataset.rollout.businessMetric if dataset.rollout else None
    if metric is not None:
        checks[BUSINESS_METRIC] = _metric_check(metric, readings)
    failed = [name for name in CHECKS if name in checks and not checks[name]["passed"]]
    detail = {
        "dataset": dataset.name,
        "version_label": version_label,
        "partitions": len(keys),
        "first_key": keys[0] if keys else None,
        "last_key": keys[-1] if keys else None,
        "rows": sum(len(r.ids) for r in readings.values()),
        "decision_hash": rollout.get("decision_hash"),
        "decision_hash_now": decision_hash_now,
        # None when the source could not be evaluated now.
        "decision_hash_changed": None
        if decision_hash_now is None
        else decision_hash_now != rollout.get("decision_hash"),
        "checks": checks,
        "failed_checks": failed,
    }
    return record_soak_evaluation(envs, rollout, not failed, detail, now)


def _require_row_on_chain(dataset: DatasetConfig, rollout: RolloutRow, life: Lifecycle) -> None:
    """`IntegrityError` unless the chain says the rollout is soaking and its row agrees (its first and
    last keys, count, version and staging run are the `rollout_staged` event's), its partition keys
    being exactly the dataset's keys of that range."""
    if life.status != SOAKING:
        disagree = [f"the production audit chain says {life.status or 'not staged'}, not soaking"]
    else:
        disagree = staged_row_disagreements(dataset, life, rollout)
    if disagree:
        raise IntegrityError(
            "the catalog's rollout row disagrees with the production audit chain, nothing evaluated: "
            + "; ".join(disagree[:3])
        )


def _decisions_now(
    config: DatasetsConfig, dataset: DatasetConfig, rollout: RolloutRow
) -> tuple[dict[str, list[str]] | None, str | None, str | None]:
    """{key: decided ids} and the decision hash of the source evaluated now, or a problem."""
    if rollout["version_label"] != dataset.versionLabel:
        return (
            None,
            None,
            f"the datasets config now has versionLabel {dataset.versionLabel!r}, "
            f"the rollout {rollout['version_label']!r}",
        )
    run_id = rollout.get("staging_run_id") or f"soak-{rollout['name']}"
    try:
        _, _, decisions = evaluate_keys(config, dataset, list(rollout["partition_keys"]), run_id)
    except (PcboError, OSError, ValueError) as exc:
        return None, None, f"the source could not be evaluated: {exc.__class__.__name__}: {exc}"
    decided = {pd.partition.key: list(pd.add) for pd in decisions.partitions}
    return decided, decisions.decision_hash, None


def _check(
    passed: bool, observed: Any, expected: Any, message: str, partitions: list[dict[str, Any]]
) -> dict:
    return {
        "passed": passed,
        "observed": observed,
        "expected": expected,
        "message": message,
        "partitions": partitions,
    }


def _partition_entry(key: str, findings: list[Any]) -> dict[str, Any]:
    return {"key": key, "count": len(findings), "findings": findings[:MAX_FINDINGS]}


def _keys_text(entries: list[dict[str, Any]]) -> str:
    keys = [e["key"] for e in entries]
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _policy_check(dataset: DatasetConfig, readings: dict[str, PartitionReading]) -> dict[str, Any]:
    policies = NormalizedPolicies.from_policies(dataset.policies)
    existing = list(dataset.existingTargetIds)
    entries = []
    for key, reading in readings.items():
        found = policy_violations(reading.tables, policies, existing)
        if found:
            entries.append(_partition_entry(key, found))
    total = sum(e["count"] for e in entries)
    message = (
        "no row breaks a policy" if not total else f"{total} row(s) break a policy, in {_keys_text(entries)}"
    )
    return _check(total == 0, total, 0, message, entries)


def _duplicate_check(readings: dict[str, PartitionReading]) -> dict[str, Any]:
    where: dict[str, list[str]] = defaultdict(list)
    for key, reading in readings.items():
        for row_id in reading.ids:
            where[row_id].append(key)
    duplicated = sorted(row_id for row_id, keys in where.items() if len(keys) > 1)
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row_id in duplicated:
        for key in sorted(set(where[row_id])):
            by_key[key].append(
                {"id": row_id, "rows": len(where[row_id]), "partitions": sorted(set(where[row_id]))}
            )
    entries = [_partition_entry(key, by_key[key]) for key in readings if key in by_key]
    message = (
        "every id appears once"
        if not duplicated
        else f"{len(duplicated)} id(s) appear more than once (e.g. {duplicated[0]!r}) "
        f"in {_keys_text(entries)}"
    )
    return _check(not duplicated, len(duplicated), 0, message, entries)


def _decisions_check(
    readings: dict[str, PartitionReading], decided: dict[str, list[str]] | None, problem: str | None
) -> dict[str, Any]:
    if decided is None:
        return _check(False, None, 0, problem or "no decisions", [])
    entries = []
    decided_rows = written_rows = 0
    for key, reading in readings.items():
        findings: list[dict[str, Any]] = []
        want = decided.get(key)
        decided_rows += len(want or [])
        written_rows += len(reading.ids)
        if want is None:
            findings.append(
                {"kind": "not_decided", "detail": "the source evaluated now has no such partition"}
            )
        if not reading.committed:
            findings.append({"kind": "not_committed", "detail": f"no commit point at {reading.rel}"})
        elif want is not None and reading.unreadable:
            # Their rows were not read: comparing the other rows would only repeat this finding.
            findings.append({"kind": "unreadable_files", "files": list(reading.unreadable)})
        elif want is not None:
            written, wanted = set(reading.ids), set(want)
            missing, unexpected = sorted(wanted - written), sorted(written - wanted)
            if missing:
                findings.append(
                    {"kind": "missing_rows", "count": len(missing), "ids": missing[:MAX_FINDINGS]}
                )
            if unexpected:
                findings.append(
                    {"kind": "unexpected_rows", "count": len(unexpected), "ids": unexpected[:MAX_FINDINGS]}
                )
        if findings:
            entries.append(_partition_entry(key, findings))
    if entries:
        message = (
            f"{len(entries)} partition(s) differ from the decisions evaluated now "
            f"({decided_rows} row(s) decided, {written_rows} written), in {_keys_text(entries)}"
        )
    else:
        message = f"every partition holds exactly its decided ids ({decided_rows} row(s))"
    check = _check(not entries, len(entries), 0, message, entries)
    check.update(decided_rows=decided_rows, written_rows=written_rows)
    return check


def _checksum_check(readings: dict[str, PartitionReading], chain: CheckedChain) -> dict[str, Any]:
    entries = []
    for key, reading in readings.items():
        findings = list(reading.findings)
        if reading.manifest is not None:
            findings += [
                {"kind": "commit_point_not_on_chain", "where": reading.rel, "detail": text}
                for text in reading_chain_findings(key, reading, chain)
            ]
        if findings:
            entries.append(_partition_entry(key, findings))
    total = sum(e["count"] for e in entries)
    if total:
        kinds = sorted({f["kind"] for e in entries for f in e["findings"]})
        message = f"{total} finding(s) ({', '.join(kinds)}) in {_keys_text(entries)}"
    else:
        message = "every committed partition re-reads as its manifest and the staging audit chain say"
    return _check(total == 0, total, 0, message, entries)


def _metric_check(metric: Any, readings: dict[str, PartitionReading]) -> dict[str, Any]:
    expected = {"atLeast": metric.atLeast, "atMost": metric.atMost}
    bounds = " and ".join(
        text
        for text in (
            None if metric.atLeast is None else f">= {metric.atLeast:g}",
            None if metric.atMost is None else f"<= {metric.atMost:g}",
        )
        if text
    )
    tables = [table for reading in readings.values() for table in reading.tables]
    value: float | None = None
    problem = None
    if not tables:
        problem = "the staging output has no readable rows"
    else:
        try:
            parsed = parse_metric(metric.expression)
            table = pa.concat_tables(tables, promote_options="permissive")
            value = parsed.evaluate(table)
            if value is None:
                problem = f"no value: {parsed.explain_unavailable(table)}"
        except (ValueError, pa.ArrowException) as exc:
            problem = str(exc)
    holds = (
        value is not None
        and (metric.atLeast is None or value >= metric.atLeast)
        and (metric.atMost is None or value <= metric.atMost)
    )
    shown = "no value" if value is None else f"{value:.6g}"
    message = f"{metric.name} = {metric.expression} = {shown}, expected {bounds}"
    if problem:
        message += f" ({problem})"
    check = _check(bool(holds), value, expected, message, [])
    check.update(name=metric.name, expression=metric.expression, rows=sum(t.num_rows for t in tables))
    return check


# --- the state of a soak ---------------------------------------------------------------------------


def soak_status(envs: RolloutEnvironments, rollout: RolloutRow, now: datetime) -> dict[str, Any]:
    """The rollout's soak state at `now` by its verified production chain (`soak_verdict`);
    `IntegrityError` when that chain does not verify."""
    return soak_verdict(read_lifecycle(envs, rollout), now)


def soak_verdict(life: Lifecycle, now: datetime) -> dict[str, Any]:
    """The soak state at `now` of what the production chain says of a rollout (module doc), from its
    evaluations since it was staged, up to `now`: `{state, reason, staged_at, window_seconds,
    window_ends_at, evaluations, failed_evaluations, last_evaluated_at, as_of}` (moments as ISO text,
    evaluations as counts)."""
    now_us = to_micros(_utc(now))
    staged = life.staged
    staged_us = None if staged is None else parse_instant(staged.get("staged_at"))
    window = None if staged is None else staged.get("soak_window_seconds")
    status: dict[str, Any] = {
        "rollout": life.name,
        "as_of": format_instant(now_us),
        "staged_at": None if staged_us is None else format_instant(staged_us),
        "window_seconds": window,
        "window_ends_at": None,
        "evaluations": 0,
        "failed_evaluations": 0,
        "last_evaluated_at": None,
    }
    if staged_us is None or not isinstance(window, int) or isinstance(window, bool):
        return {
            **status,
            "state": "not_started",
            "reason": "the staging apply has not finished yet (no rollout_staged event on the production "
            "audit chain)",
        }
    end_us = staged_us + window * 1_000_000
    timed = [(parse_instant(e.get("evaluated_at")), e) for e in life.evaluations]
    evaluations = [(at, e) for at, e in timed if at is not None and at <= now_us]
    failed = [(at, e) for at, e in evaluations if e.get("passed") is not True]
    status.update(
        window_ends_at=format_instant(end_us),
        evaluations=len(evaluations),
        failed_evaluations=len(failed),
        last_evaluated_at=format_instant(evaluations[-1][0]) if evaluations else None,
    )
    if failed:
        at, first = failed[0]
        reason = f"the evaluation at {format_instant(at)} failed: {failure_text(first)}"
        if len(failed) > 1:
            reason += f" ({len(failed)} of {len(evaluations)} evaluations failed)"
        return {**status, "state": "failed", "reason": reason}
    after_end = [at for at, _ in evaluations if at >= end_us]
    if now_us >= end_us and after_end:
        return {
            **status,
            "state": "passed",
            "reason": f"the window ended at {format_instant(end_us)}; all {len(evaluations)} evaluation(s) "
            "passed",
        }
    if now_us >= end_us:
        reason = (
            f"the window ended at {format_instant(end_us)}; waiting for an evaluation at or after it "
            f"({len(evaluations)} so far, all passing)"
        )
    else:
        reason = (
            f"window ends at {format_instant(end_us)}, {len(evaluations)} evaluation(s) so far, all passing"
        )
    return {**status, "state": "soaking", "reason": reason}


def failed_for_good(life: Lifecycle, now: datetime) -> str | None:
    """Why the soak of `life` is not evaluated any more: its production chain holds a failing
    evaluation (at or before `now`) since it was staged, and one failure fails the soak for good
    (`soak_verdict`), so a later evaluation could change nothing and would only lengthen the chain.
    None while it may still pass. Read from the chain alone: a `rollouts` or `soak_evaluations` row
    saying otherwise changes nothing."""
    verdict = soak_verdict(life, now)
    if verdict["state"] != "failed":
        return None
    return (
        f"the soak failed for good by the production audit chain ({verdict['reason']}): not evaluated "
        "again; start a new rollout"
    )


def failure_text(detail: dict[str, Any]) -> str:
    """The failed checks of an evaluation (its detail, or its `rollout_soak_evaluated` event) and why,
    in one line."""
    checks = detail.get("checks", {})
    failed = detail.get("failed_checks") or [n for n, c in checks.items() if not c.get("passed")]
    return (
        "; ".join(f"{name}: {checks.get(name, {}).get('message', 'failed')}" for name in failed) or "failed"
    )


# --- the report ------------------------------------------------------------------------------------


def _evaluation_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    detail = evaluation["detail"]
    return {
        "evaluated_at": iso(evaluation["evaluated_at"]),
        "passed": bool(evaluation["passed"]),
        "failed_checks": detail.get("failed_checks", []),
        "decision_hash_now": detail.get("decision_hash_now"),
        "decision_hash_changed": detail.get("decision_hash_changed"),
        "rows": detail.get("rows"),
        "checks": {
            name: {k: check.get(k) for k in ("passed", "observed", "expected", "message")}
            for name, check in detail.get("checks", {}).items()
        },
    }


def _observed_cell(check: dict[str, Any] | None) -> str:
    if check is None:
        return "-"
    value = check.get("observed")
    shown = "no value" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
    return f"{shown} {'ok' if check.get('passed') else 'FAILED'}"


def write_soak_report(
    settings: Settings,
    rollout: RolloutRow,
    evaluations: list[dict[str, Any]],
    status: dict[str, Any],
    rows_not_on_chain: int = 0,
) -> dict[str, str]:
    """Write `soak_report.json` and `.md` into the rollout's reports directory (under the production
    `settings`): every evaluation over time (the `soak_evaluations` rows the production chain records:
    `soak_rows_on_chain`; `rows_not_on_chain` counts the rows left out), each check's observed value,
    the state and its reason. Returns the paths (`json`, `markdown`)."""
    name = rollout["name"]
    summaries = [_evaluation_summary(e) for e in evaluations]
    failing = [e for e in evaluations if not e["passed"]]
    keys = list(rollout["partition_keys"])
    document = {
        "rollout": name,
        "dataset": rollout["dataset"],
        "version_label": rollout["version_label"],
        "partitions": {
            "count": len(keys),
            "first": keys[0] if keys else None,
            "last": keys[-1] if keys else None,
        },
        "decision_hash": rollout.get("decision_hash"),
        "staging_run_id": rollout.get("staging_run_id"),
        "staged_at": status.get("staged_at"),  # the chain's (the status's), not the catalog row's
        "soak_window_seconds": status.get("window_seconds"),
        "status": status,
        "evaluations": summaries,
        "latest_evaluation": None if not evaluations else _jsonable(evaluations[-1]),
        "first_failed_evaluation": None if not failing else _jsonable(failing[0]),
        "rows_not_on_chain": rows_not_on_chain,
    }
    names = [c for c in CHECKS if any(c in s["checks"] for s in summaries)]
    lines = [
        f"# Soak report: {name}",
        "",
        f"- Dataset: `{rollout['dataset']}/{rollout['version_label']}`, "
        f"{len(keys)} partition(s) {keys[0] if keys else ''} .. {keys[-1] if keys else ''}",
        f"- Staging run: `{rollout.get('staging_run_id')}`, decision hash `{rollout.get('decision_hash')}`",
        f"- Staged at: {status.get('staged_at') or 'not yet'}; soak window "
        f"{status.get('window_seconds') if status.get('window_seconds') is not None else '-'} s, "
        f"ends at {status.get('window_ends_at') or '-'}",
        f"- State: **{status.get('state')}** ({status.get('reason')})",
        "",
    ]
    if rows_not_on_chain:
        lines += [
            f"{rows_not_on_chain} `soak_evaluations` row(s) the production audit chain does not record "
            "are left out (`pcbo verify`: `soak_evaluation_not_on_chain`).",
            "",
        ]
    lines += [
        f"## Evaluations ({len(summaries)})",
        "",
    ]
    if summaries:
        rows = [
            [s["evaluated_at"], "yes" if s["passed"] else "NO"]
            + [_observed_cell(s["checks"].get(c)) for c in names]
            + [("changed " if s["decision_hash_changed"] else "") + str(s["decision_hash_now"] or "-")[:19]]
            for s in summaries
        ]
        lines.append(markdown_table(["evaluated at", "passed", *names, "decision hash now"], rows))
    else:
        lines += ["No evaluation yet.", ""]
    if failing:
        lines += ["## Failed evaluations", ""]
        for evaluation in failing:
            lines.append(f"### {iso(evaluation['evaluated_at'])}")
            lines.append("")
            detail = evaluation["detail"]
            for check_name in detail.get("failed_checks", []):
                check = detail["checks"][check_name]
                lines.append(f"- **{check_name}**: {check.get('message')}")
                for entry in check.get("partitions", [])[:10]:
                    lines.append(f"  - `{entry['key']}`: {entry['count']} finding(s)")
            lines.append("")
    return write_report(
        rollout_reports_dir(settings, name), SOAK_REPORT, document, "\n".join(lines).rstrip() + "\n"
    )


def _jsonable(evaluation: dict[str, Any]) -> dict[str, Any]:
    """An evaluation record with its moment as ISO text (for JSON documents and outputs)."""
    out = {k: v for k, v in evaluation.items() if k != "evaluated_at"}
    out["evaluated_at"] = iso(evaluation["evaluated_at"])
    return out


# --- the monitor -----------------------------------------------------------------------------------


def run_soak_monitor(
    config: DatasetsConfig,
    base: Settings,
    now: datetime,
    rollouts: Iterable[str] | None = None,
    environ: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every soaking rollout of a dataset in `config` (or only the ones named), write its
    soak report and return, per rollout, `{rollout, dataset, evaluation, status, report}`;
    `{rollout, dataset, skipped}` for a named rollout that is not soaking or whose dataset is not in
    the config, and for one the production chain says is not soaking or has failed its soak for good
    (`failed_for_good`: nothing evaluated or appended again); `{rollout, dataset, error}` when its
    evaluation raised (the others still run).
    `InvalidInput` (field `rollout`) for a named rollout that does not exist.

    `base` is the production engine settings (`Settings.resolve(...)`); each dataset's staging and
    production environments are opened with `dataset_settings(config, dataset, base, environ)`.
    """
    names = None if rollouts is None else list(dict.fromkeys(rollouts))
    candidates, results, todo = _candidates(config, base, names)
    done: dict[str, dict[str, Any]] = {}
    for dataset_name, group in todo.items():
        dataset = config.dataset(dataset_name)
        with open_environments(dataset_settings(config, dataset, base, environ)) as envs:
            for member in group:
                done[member["name"]] = _monitor_one(config, dataset, envs, member, now)
    results += list(done.values())
    order = {r["name"]: i for i, r in enumerate(candidates)}
    return sorted(results, key=lambda r: order[r["rollout"]])


def soak_due(
    config: DatasetsConfig, base: Settings, now: datetime, environ: dict[str, str] | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """What the monitor would do at `now`, nothing evaluated or recorded: the names of the rollouts it
    would evaluate (those whose production chain could not be read among them: the monitor reports
    their error) and, for every other rollout its catalog lists as soaking, its skip
    (`{rollout, dataset, skipped}`: not soaking by the chain, or failed for good)."""
    _, skipped, todo = _candidates(config, base, None)
    due: list[str] = []
    for dataset_name, group in todo.items():
        dataset = config.dataset(dataset_name)
        with open_environments(dataset_settings(config, dataset, base, environ)) as envs:
            for member in group:
                try:
                    skip = _not_due(member, read_lifecycle(envs, member), now)
                except PcboError:
                    skip = None  # the monitor's evaluation reports why the chain cannot be read
                if skip is None:
                    due.append(member["name"])
                else:
                    skipped.append(skip)
    return due, skipped


def _candidates(
    config: DatasetsConfig, base: Settings, names: list[str] | None
) -> tuple[list[RolloutRow], list[dict[str, Any]], dict[str, list[RolloutRow]]]:
    """The rollouts the monitor looks at (every one listed as soaking, or the ones named), the skips
    the catalog's rows alone give, and the rest by dataset."""
    with open_rollout_store(base.catalog_url) as store:
        if store is None:  # no catalog yet: nothing is soaking, and a named rollout is unknown
            if names:
                raise InvalidInput("rollout", f"no rollout named {names[0]!r}")
            candidates = []
        elif names is None:
            candidates = store.list(statuses=("soaking",))
        else:
            candidates = [store.require(name) for name in names]
    configured = {d.name for d in config.datasets}
    results: list[dict[str, Any]] = []
    todo: dict[str, list[RolloutRow]] = defaultdict(list)
    for rollout in candidates:
        if rollout["dataset"] not in configured:
            if names is not None:
                results.append(
                    _skipped(rollout, f"dataset {rollout['dataset']!r} is not in the datasets config")
                )
            continue
        if rollout["status"] != "soaking":
            results.append(_skipped(rollout, f"status is {rollout['status']}, not soaking"))
            continue
        todo[rollout["dataset"]].append(rollout)
    return candidates, results, todo


def _skipped(rollout: RolloutRow, reason: str) -> dict[str, Any]:
    return {"rollout": rollout["name"], "dataset": rollout["dataset"], "skipped": reason}


def _not_due(rollout: RolloutRow, life: Lifecycle, now: datetime) -> dict[str, Any] | None:
    """The monitor's skip of a rollout the production chain says is not to be evaluated (not soaking
    there, or its soak failed for good), else None."""
    if life.status != SOAKING:
        chain_says = life.status or "not staged"
        return _skipped(rollout, f"the production audit chain says {chain_says}, not soaking")
    closed = failed_for_good(life, now)
    return None if closed is None else _skipped(rollout, closed)


def _monitor_one(
    config: DatasetsConfig,
    dataset: DatasetConfig,
    envs: RolloutEnvironments,
    rollout: RolloutRow,
    now: datetime,
) -> dict[str, Any]:
    try:
        # (a monitor not given the chain's key, or given another, says so rather than "not staged")
        refuse_unwritable_chain(
            envs, rollout["dataset"], rollout["version_label"], f"the soak of rollout {rollout['name']!r}"
        )
        life = read_lifecycle(envs, rollout)
        skip = _not_due(rollout, life, now)
        if skip is not None:
            return skip
        evaluation = evaluate_soak(config, dataset, envs, rollout, now, life)
        life = read_lifecycle(envs, rollout)  # with the evaluation just recorded
        status = soak_verdict(life, now)
        recorded, left_out = soak_rows_on_chain(life, envs.store.soak_evaluations(rollout["name"]))
        report = write_soak_report(
            envs.production.settings, rollout, list(map(dict, recorded)), status, len(left_out)
        )
    except Exception as exc:  # noqa: BLE001 - one rollout's failure must not stop the others' soak
        return {
            "rollout": rollout["name"],
            "dataset": rollout["dataset"],
            "error": f"{exc.__class__.__name__}: {exc}",
        }
    return {
        "rollout": rollout["name"],
        "dataset": rollout["dataset"],
        "evaluation": _jsonable(evaluation),
        "status": status,
        "report": report,
    }

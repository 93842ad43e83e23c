"""`rollout_promotion`: promotes approved rollouts to production, and says why the others wait.

Each tick looks at every rollout of the rollout datasets that is halted for review (`soaking`) and
asks the promotion gate (`rollout/promotion.py`): staging checks passed (re-read from the staging
lake, plus the Dagster check evaluations of the staging run), soak passed, approval in force and
matching the decisions evaluated now. An open gate gives one run of the dataset's promotion job over
the rollout's partitions (run key `promote:<rollout>:<decision hash>`, plus `:after:<event hash>` of
the chain's last rejection when there is one: a rollout is promoted once per approved decision hash
and per rejection the approvals in force post-date, so a promotion a rejection stopped is launched
again once a new approval opens the gate; `promotion_run_key`), unless a promotion run of the
rollout has not finished yet (queued or running: the tick waits for it). A closed gate gives no run; the
tick's skip reason (or its log, when another rollout was promoted in the same tick) lists each
rollout with every reason it waits:
rejected, stale approval, missing approval, soak not yet passed, failed staging checks.
"""

import os
from typing import Any

import dagster as dg

from pcbo_dagster.core.errors import PcboError
from pcbo_dagster.dagster_defs.partitions import adjacent_stretches
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.dagster_defs.rollout.assets import PROMOTED_BY_TAG, ROLLOUT_TAG
from pcbo_dagster.datasets.config import DatasetsConfig
from pcbo_dagster.io.env_vars import positive_int
from pcbo_dagster.rollout import operations, promotion
from pcbo_dagster.rollout.clock import Clock

SENSOR_NAME = "rollout_promotion"


def promotion_job_name(asset_name: str) -> str:
    return f"promote_{asset_name}"


def promotion_run_key(rollout: str, gate: dict[str, Any]) -> str:
    """The run key of an open gate's promotion: `promote:<rollout>:<decision hash>`, and
    `:after:<event hash>` of the last rejection on the chain when there is one. A promotion stopped
    by a rejection is launched again once approvals signed after it open the gate (a new key), never
    twice for the same approvals (the same key: Dagster launches a run key once), however many
    approvals of the same decision hash are added since."""
    key = f"promote:{rollout}:{gate['decisionHashNow']}"
    after = gate["approval"].get("since_rejection")
    return key if after is None else f"{key}:after:{after}"


#: Run statuses of a run that has not finished.
UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.MANAGED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.SUSPENDED,
    dg.DagsterRunStatus.CANCELING,
]


def unfinished_promotion(instance: dg.DagsterInstance, asset_name: str, rollout: str) -> str | None:
    """The id of a run of the dataset's promotion job for `rollout` that has not finished (queued or
    running), or None: the sensor launches no second promotion beside it, whatever its run key."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            job_name=promotion_job_name(asset_name), tags={ROLLOUT_TAG: rollout}, statuses=UNFINISHED
        ),
        limit=1,
    )
    return runs[0].run_id if runs else None


def failed_staging_checks(instance: dg.DagsterInstance, dagster_run_id: str | None) -> dict[str, list[str]]:
    """{partition key: [check names]} of the failed check evaluations in the staging apply's run."""
    if not dagster_run_id:
        return {}
    failed: dict[str, list[str]] = {}
    records = instance.get_records_for_run(dagster_run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    for record in records.records:
        event = record.event_log_entry.dagster_event
        evaluation = event.event_specific_data if event else None
        if isinstance(evaluation, dg.AssetCheckEvaluation) and not evaluation.passed:
            failed.setdefault(evaluation.partition or "*", []).append(evaluation.check_name)
    return failed


#: How often the promotion and repairs sensors look (seconds); `PCBO_ROLLOUT_SENSOR_INTERVAL` overrides it.
ROLLOUT_SENSOR_INTERVAL = 30


def rollout_sensor_interval() -> int:
    variable = "PCBO_ROLLOUT_SENSOR_INTERVAL"
    return positive_int(variable, os.environ.get(variable), ROLLOUT_SENSOR_INTERVAL)


def build_promotion_sensor(config: DatasetsConfig, jobs: list[Any], clock: Clock) -> dg.SensorDefinition:
    """The sensor; `jobs` are the promotion jobs (`promote_<asset>`) it launches."""
    datasets = {d.name: d for d in config.datasets if d.rollout is not None}

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=rollout_sensor_interval(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Promote rollouts whose gate is open (staging checks, soak, approval); "
        "say why the others wait",
        jobs=jobs,
    )
    def rollout_promotion(
        context: dg.SensorEvaluationContext, pcbo: PcboEngineResource
    ) -> dg.SensorResult | dg.SkipReason:
        base = pcbo.settings()
        requests: list[dg.RunRequest] = []
        waiting: list[str] = []
        for row in operations.list_rollouts(base)["rollouts"]:
            if row["dataset"] not in datasets or row["status"] != "soaking":
                continue
            dataset = datasets[row["dataset"]]
            try:
                with operations.dataset_environments(config, dataset, base) as envs:
                    rollout = envs.store.require(row["name"])
                    staging_run = envs.staging.catalog.get_run(rollout["staging_run_id"] or "") or {}
                    failed = failed_staging_checks(
                        context.instance, staging_run.get("metadata", {}).get("dagsterRunId")
                    )
                    gate = promotion.promotion_gate(
                        config, dataset, envs, row["name"], clock=clock, failed_checks=failed
                    )
            except PcboError as exc:  # one rollout's bad source must not stop the others' promotion
                waiting.append(f"{row['name']}: the gate cannot be evaluated: {exc}")
                continue
            if not gate["open"]:
                waiting.append(f"{row['name']}: " + "; ".join(gate["reasons"]))
                continue
            unfinished = unfinished_promotion(context.instance, dataset.asset_name, row["name"])
            if unfinished is not None:
                waiting.append(
                    f"{row['name']}: the gate is open; its promotion run {unfinished} has not finished yet"
                )
                continue
            keys = rollout["partition_keys"]
            requests.append(
                dg.RunRequest(
                    run_key=promotion_run_key(row["name"], gate),
                    job_name=promotion_job_name(dataset.asset_name),
                    tags={
                        ROLLOUT_TAG: row["name"],
                        "dagster/asset_partition_range_start": keys[0],
                        "dagster/asset_partition_range_end": keys[-1],
                        "pcbo/approved_by": gate["approval"]["actor"],
                        PROMOTED_BY_TAG: f"sensor {SENSOR_NAME}",
                        "pcbo/decision_hash": gate["decisionHashNow"],
                    },
                )
            )
            context.log.info(
                f"{row['name']}: gate open (approved by {gate['approval']['actor']}); "
                f"promoting {len(keys)} partition(s)"
            )
        for line in waiting:
            context.log.info(f"waiting: {line}")
        if requests:
            return dg.SensorResult(run_requests=requests)
        if not waiting:
            return dg.SkipReason("no rollout is halted for review")
        return dg.SkipReason("no rollout may be promoted: " + " | ".join(waiting))

    return rollout_promotion


# --- a staging apply whose run ended without applying: the rollout is `interrupted` ------------------

INTERRUPTED_SENSOR = "rollout_interrupted"


def build_interrupted_sensor(
    config: DatasetsConfig, staging_assets: list[dg.AssetsDefinition]
) -> list[dg.SensorDefinition]:
    """`rollout_interrupted`: a run that applied a rollout to staging and was terminated (UI
    "Terminate") or failed leaves the rollout `applying`; this run-status sensor marks it `interrupted`
    (rollout log, `pcbo rollout status`), logs how to resume it and records an observation of the
    staging asset that says so."""
    keys = {asset.key for asset in staging_assets}

    @dg.run_status_sensor(
        name=INTERRUPTED_SENSOR,
        run_status=dg.DagsterRunStatus.CANCELED,
        monitor_all_code_locations=False,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Marks a rollout interrupted when the run applying it to staging is terminated",
    )
    def on_canceled(context: dg.RunStatusSensorContext, pcbo: PcboEngineResource) -> dg.SkipReason | None:
        return _interrupted(context, pcbo, "CANCELED")

    @dg.run_status_sensor(
        name=f"{INTERRUPTED_SENSOR}_on_failure",
        run_status=dg.DagsterRunStatus.FAILURE,
        monitor_all_code_locations=False,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Marks a rollout interrupted when the run applying it to staging fails",
    )
    def on_failure(context: dg.RunStatusSensorContext, pcbo: PcboEngineResource) -> dg.SkipReason | None:
        return _interrupted(context, pcbo, "FAILURE")

    def _interrupted(
        context: dg.RunStatusSensorContext, pcbo: PcboEngineResource, status: str
    ) -> dg.SkipReason | None:
        run = context.dagster_run
        selected = set(run.asset_selection or [])
        if not selected & keys:
            return dg.SkipReason(f"run {run.run_id} applied no rollout to staging")
        marked = operations.mark_interrupted(config, pcbo.settings(), run.run_id, status)
        if not marked:
            return dg.SkipReason(f"run {run.run_id} ({status}) left no rollout applying")
        for entry in marked:
            context.log.info(
                f"rollout {entry['rollout']} interrupted (run {run.run_id} {status}): {entry['resume']}"
            )
            for key in selected & keys:
                context.instance.report_runless_asset_event(
                    dg.AssetObservation(
                        asset_key=key,
                        description=f"rollout {entry['rollout']} interrupted: run {run.run_id} {status}",
                        metadata={
                            "rollout": dg.MetadataValue.text(entry["rollout"]),
                            "rollout_status": dg.MetadataValue.text("interrupted"),
                            "dagster_run": dg.MetadataValue.text(run.run_id),
                            "how_to_resume": dg.MetadataValue.text(entry["resume"]),
                        },
                    )
                )
        return None

    return [on_canceled, on_failure]


# --- production health repairs, launched as runs of the affected partitions -----------------------

REPAIRS_SENSOR = "production_health_repairs"


def repair_requests(config: DatasetsConfig, base: Any) -> tuple[list[dg.RunRequest], list[str]]:
    """A run of `promote_<dataset>` per contiguous range of each rollout dataset's mini backfill plan
    that the health check was asked to launch (`launch: requested` in its report); run keys name the
    plan, so a plan is launched once."""
    import json as _json

    from pcbo_dagster.rollout.health import REPORT_STEM, health_dir

    requests: list[dg.RunRequest] = []
    notes: list[str] = []
    for dataset in (d for d in config.datasets if d.rollout is not None):
        with operations.dataset_environments(config, dataset, base) as envs:
            path = health_dir(envs, dataset) / f"{REPORT_STEM}.json"
            if not path.exists():
                continue
            try:
                report = _json.loads(path.read_text(encoding="utf-8"))
                requested = (report.get("launch") or {}).get("status") == "requested"
                plan = report["plan"] if requested else None
                entries = [(e["key"], e.get("rollout")) for e in plan["partitions"]] if plan else []
                plan_id = str(plan["planId"]) if plan else ""
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                # One dataset's report (cut short, or of another shape) must not stop the others' repairs.
                notes.append(
                    f"{dataset.name}: the health report {path} cannot be used ({type(exc).__name__}): "
                    "nothing launched; run production_health_check again"
                )
                continue
        if plan is None:
            continue
        partition_keys = dataset.partitioning.keys()
        known = set(partition_keys)
        unknown = sorted({str(key) for key, _ in entries if not (isinstance(key, str) and key in known)})
        if unknown:
            notes.append(
                f"{dataset.name}: plan {plan_id} names {len(unknown)} key(s) the dataset does not have "
                f"({', '.join(unknown[:3])}): not launched; run production_health_check again"
            )
        by_rollout: dict[str, list[str]] = {}
        for key, rollout in entries:
            if rollout and isinstance(key, str) and key in known:
                by_rollout.setdefault(str(rollout), []).append(key)
        for name, keys in sorted(by_rollout.items()):
            for part in adjacent_stretches(keys, partition_keys):
                requests.append(
                    dg.RunRequest(
                        run_key=f"health:{plan_id}:{name}:{part[0]}:{part[-1]}",
                        job_name=promotion_job_name(dataset.asset_name),
                        tags={
                            ROLLOUT_TAG: name,
                            "dagster/asset_partition_range_start": part[0],
                            "dagster/asset_partition_range_end": part[-1],
                            PROMOTED_BY_TAG: f"sensor {REPAIRS_SENSOR}",
                            "pcbo/health_plan": plan_id.removeprefix("sha256:")[:32],
                        },
                    )
                )
            notes.append(f"{dataset.name}: plan {plan_id}: {len(keys)} partition(s) of rollout {name}")
    return requests, notes


def build_repairs_sensor(config: DatasetsConfig, jobs: list[Any]) -> dg.SensorDefinition:
    @dg.sensor(
        name=REPAIRS_SENSOR,
        minimum_interval_seconds=rollout_sensor_interval(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Launches the production health check's repairs (production_health_check with launch) "
        "as runs of the affected partitions, so they get materializations and checks",
        jobs=jobs,
    )
    def production_health_repairs(
        context: dg.SensorEvaluationContext, pcbo: PcboEngineResource
    ) -> dg.SensorResult | dg.SkipReason:
        requests, notes = repair_requests(config, pcbo.settings())
        for note in notes:
            context.log.info(f"repair: {note}")
        if not requests:
            return dg.SkipReason(
                " | ".join(notes)
                or "no health check repair was requested (production_health_check with launch: true)"
            )
        return dg.SensorResult(run_requests=requests)

    return production_health_repairs

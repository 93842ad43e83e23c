"""`rollout_promotion`: promotes approved rollouts to production, and says why the others wait.

Each tick looks at every rollout of the rollout datasets that is halted for review (`soaking`) and
asks the promotion gate (`rollout/promotion.py`): staging checks passed (re-read from the staging
lake, plus the Dagster check evaluations of the staging run), soak passed, approval in force and
matching the decisions evaluated now. An open gate gives one run of the dataset's promotion job over
the rollout's partitions (run key `promote:<rollout>:<decision hash>`, so a rollout is promoted once
per approved decision hash). A closed gate gives no run; the tick's skip reason (or its log, when
another rollout was promoted in the same tick) lists each rollout with every reason it waits:
rejected, stale approval, missing approval, soak not yet passed, failed staging checks.
"""

from typing import Any

import dagster as dg

from pcbo_dagster.core.errors import PcboError
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.dagster_defs.rollout.assets import PROMOTED_BY_TAG, ROLLOUT_TAG
from pcbo_dagster.datasets.config import DatasetsConfig
from pcbo_dagster.rollout import operations, promotion
from pcbo_dagster.rollout.clock import Clock

SENSOR_NAME = "rollout_promotion"


def promotion_job_name(asset_name: str) -> str:
    return f"promote_{asset_name}"


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


def build_promotion_sensor(config: DatasetsConfig, jobs: list[Any], clock: Clock) -> dg.SensorDefinition:
    """The sensor; `jobs` are the promotion jobs (`promote_<asset>`) it launches."""
    datasets = {d.name: d for d in config.datasets if d.rollout is not None}

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=30,
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
            keys = rollout["partition_keys"]
            requests.append(
                dg.RunRequest(
                    run_key=f"promote:{row['name']}:{gate['decisionHashNow']}",
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

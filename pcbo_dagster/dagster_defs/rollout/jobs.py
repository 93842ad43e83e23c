"""Rollout jobs launchable from the UI's launchpad with config (the same actions as `pcbo rollout`).

- `rollout_control` (`rollout`, `action` pause/resume/cancel, `by`, `reason`): pause, resume or cancel
  a running staging apply (takes effect between partitions).
- `rollout_approval` (`rollout`, `statement`: a signed approval or rejection, pasted): record it
  (append-only, on the audit chain) when it verifies under a listed approver's key.
- `rollout_rollback` (`stage`, `rollout` or `dataset` + `from_key` + `to_key`, `by`, `reason`): roll
  back through the rollback manifests; idempotent; audited.
- `production_health_check` (`dataset`, empty for every rollout dataset; `launch`): the health report
  and mini backfill plan; with `launch`, the plan is run.

Each is one op calling `rollout/operations.py`. Bad config fails the run with the field named and
nothing written.
"""

import json
from collections.abc import Callable
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from pcbo_dagster.dagster_defs.backfill.steps import engine_errors
from pcbo_dagster.dagster_defs.instance_reporting import reporting_to
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetsConfig
from pcbo_dagster.engine import lake_changes
from pcbo_dagster.rollout import operations
from pcbo_dagster.rollout.clock import Clock


def _document(context: dg.OpExecutionContext, title: str, document: Any) -> dict[str, Any]:
    plain = operations._plain(document)
    context.log.info(f"{title}: {json.dumps(plain, sort_keys=True)[:4000]}")
    context.add_output_metadata({"result": dg.MetadataValue.json(plain)})
    return plain


class RolloutControlConfig(dg.Config):
    rollout: str = Field(description="The rollout's name")
    action: Literal["pause", "resume", "cancel"] = Field(description="pause, resume or cancel")
    by: str = Field(description="Who asks")
    reason: str = Field(default="", description="Why")


class RolloutApprovalConfig(dg.Config):
    rollout: str = Field(description="The rollout's name")
    statement: str = Field(
        description="The signed decision (a pcbo.approval/v1 signed note, as `pcbo approve --key` makes it "
        "or an approver signed it elsewhere), pasted whole: its approver's key must be listed"
    )


class RolloutRollbackConfig(dg.Config):
    stage: Literal["staging", "production"] = Field(description="staging or production")
    rollout: str = Field(default="", description="Roll back this rollout's partitions ...")
    dataset: str = Field(default="", description="... or a partition range of this dataset")
    from_key: str = Field(default="", description="First partition key of the range")
    to_key: str = Field(default="", description="Last partition key of the range (included)")
    by: str = Field(description="Who asks")
    reason: str = Field(description="Why")


class HealthCheckConfig(dg.Config):
    dataset: str = Field(default="", description="A rollout dataset; empty: every rollout dataset")
    launch: bool = Field(
        default=False,
        description="Repair: the production_health_repairs sensor launches the mini backfill the check plans "
        "as runs of the affected partitions",
    )


def build_rollout_jobs(config: DatasetsConfig, clock: Clock) -> list[dg.JobDefinition]:
    rollout_datasets = [d.name for d in config.datasets if d.rollout is not None]

    @dg.op(name="rollout_control_op")
    def control_op(
        context: dg.OpExecutionContext, config: RolloutControlConfig, pcbo: PcboEngineResource
    ) -> dict:
        with engine_errors():
            result = operations.control(
                pcbo.settings(),
                config.rollout,
                config.action,
                by=config.by,
                reason=config.reason,
                clock=clock,
            )
        return _document(context, f"rollout {config.rollout}: {config.action} requested", result)

    @dg.op(name="rollout_approval_op")
    def approval_op(
        context: dg.OpExecutionContext, config: RolloutApprovalConfig, pcbo: PcboEngineResource
    ) -> dict:
        with engine_errors():
            result = operations.decide(
                datasets,
                pcbo.settings(),
                config.rollout,
                None,
                statement=config.statement if config.statement.endswith("\n") else config.statement + "\n",
                clock=clock,
            )
        return _document(context, f"rollout {config.rollout}: {result['decision']} by {result['by']}", result)

    @dg.op(name="rollout_rollback_op")
    def rollback_op(
        context: dg.OpExecutionContext, config: RolloutRollbackConfig, pcbo: PcboEngineResource
    ) -> dict:
        # The partitions rolled back are not materializations: report their new state to the instance.
        with (
            engine_errors(),
            reporting_to(context.instance, datasets),
            lake_changes.acting_as(f"Dagster run {context.run.run_id} (rollout_rollback)"),
        ):
            result = operations.rollback(
                datasets,
                pcbo.settings(),
                config.stage,
                by=config.by,
                reason=config.reason,
                name=config.rollout or None,
                dataset_name=config.dataset or None,
                first_key=config.from_key or None,
                last_key=config.to_key or None,
                clock=clock,
            )
        return _document(context, f"rollback in {config.stage}", result)

    @dg.op(name="production_health_check_op")
    def health_op(
        context: dg.OpExecutionContext, config: HealthCheckConfig, pcbo: PcboEngineResource
    ) -> dict:
        names = [config.dataset] if config.dataset else rollout_datasets
        results = {}
        with engine_errors():
            for name in names:
                results[name] = operations.health(
                    datasets, pcbo.settings(), name, launch=config.launch, clock=clock, request_only=True
                )
                if (results[name].get("launch") or {}).get("status") == "requested":
                    context.log.info(
                        f"{name}: repair of {results[name]['launch']['partitions']} partition(s) requested: "
                        "the production_health_repairs sensor launches them as runs of promote_<dataset>"
                    )
        return _document(context, "production health", results)

    datasets = config

    def job(name: str, op: Callable, description: str) -> dg.JobDefinition:
        @dg.job(name=name, description=description)
        def _job() -> None:
            op()

        return _job

    return [
        job("rollout_control", control_op, "Pause, resume or cancel a rollout's staging apply"),
        job(
            "rollout_approval",
            approval_op,
            "Approve or reject a rollout for production (append-only, audited)",
        ),
        job(
            "rollout_rollback",
            rollback_op,
            "Roll back a rollout or a partition range in staging or production",
        ),
        job(
            "production_health_check",
            health_op,
            "Find missing, failed, stale or drifted production partitions",
        ),
    ]

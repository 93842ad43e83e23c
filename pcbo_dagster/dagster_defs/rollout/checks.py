"""The soak monitor's check on a staging asset: `soak`, evaluated by the `soak_monitor` schedule.

Each evaluation runs `rollout/soak.py` over every rollout of the dataset in its soak window (status
`soaking`): policy violations 0, duplicate ids 0, rows match decisions, checksums re-verify, and the
configured business metric holds against its baseline. Per rollout it logs an `AssetObservation` of
the staging asset (the metric and each check's value over time, plotted by the UI) and writes the
soak report (`soak_report.md` / `.json`); the check passes when no evaluation failed. It is
non-blocking (it runs on its own schedule, not after a materialization) and WARN-severity when
failing; the alerts sensor turns a failure into an alert.
"""

from typing import Any

import dagster as dg

from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.rollout import operations
from pcbo_dagster.rollout.clock import Clock

SOAK_CHECK = "soak"


def _observation_metadata(result: dict[str, Any]) -> dict[str, Any]:
    evaluation = result.get("evaluation") or {}
    detail = evaluation.get("detail") or {}
    metadata: dict[str, Any] = {
        "rollout": dg.MetadataValue.text(result["rollout"]),
        "passed": dg.MetadataValue.bool(bool(evaluation.get("passed"))),
        "soak_state": dg.MetadataValue.text(str((result.get("status") or {}).get("state"))),
    }
    for name, check in (detail.get("checks") or {}).items():
        observed = check.get("observed") if isinstance(check, dict) else None
        if isinstance(observed, bool):
            metadata[f"check/{name}"] = dg.MetadataValue.bool(observed)
        elif isinstance(observed, int | float):
            metadata[f"check/{name}"] = dg.MetadataValue.float(float(observed))
    return metadata


def build_soak_check(
    config: DatasetsConfig, dataset: DatasetConfig, staging_asset: dg.AssetsDefinition, clock: Clock
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=staging_asset,
        name=SOAK_CHECK,
        description="Soak monitor: staging output of each soaking rollout re-evaluated (policy, duplicates, "
        "rows vs decisions, checksums, business metric)",
    )
    def soak(context: dg.AssetCheckExecutionContext, pcbo: PcboEngineResource) -> dg.AssetCheckResult:
        base = pcbo.settings()
        names = [
            r["name"]
            for r in operations.list_rollouts(base, dataset.name)["rollouts"]
            if r["status"] == "soaking"
        ]
        if not names:
            return dg.AssetCheckResult(passed=True, description="no rollout of this dataset is soaking")
        results = operations.soak(config, base, names=names, clock=clock)
        failed = []
        summary = {}
        skipped = {}
        for result in results:
            if "skipped" in result:  # not soaking by the production chain, or its soak failed for good
                context.log.info(f"soak {result['rollout']}: not evaluated: {result['skipped']}")
                skipped[result["rollout"]] = result["skipped"]
                continue
            evaluation = result.get("evaluation") or {}
            status = result.get("status") or {"state": "error", "reason": result.get("error")}
            context.op_execution_context.log_event(
                dg.AssetObservation(asset_key=staging_asset.key, metadata=_observation_metadata(result))
            )
            context.log.info(f"soak {result['rollout']}: {status.get('state')}: {status.get('reason')}")
            summary[result["rollout"]] = {
                "passed": bool(evaluation.get("passed")),
                "state": status.get("state"),
                "reason": status.get("reason"),
            }
            if not evaluation.get("passed"):
                failed.append(result["rollout"])
        return dg.AssetCheckResult(
            passed=not failed,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "rollouts": dg.MetadataValue.json(operations._plain(summary)),
                "evaluated": len(summary),
                "failed": len(failed),
                "skipped": dg.MetadataValue.json(skipped),
            },
            description=f"soak evaluation failed for {', '.join(failed)}" if failed else None,
        )

    return soak

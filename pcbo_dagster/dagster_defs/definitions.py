"""The pcbo code location: `Definitions` built from the datasets config file.

The file is named by `PCBO_DATASETS_CONFIG` (default: the repository's `examples/datasets.yaml`);
relative source and lake paths in it resolve against its directory. A bad file refuses to load:
the code location shows the `InvalidInput` naming the field (`datasets[1].partitioning.cron: ...`).

Per dataset: the partitioned asset (`assets/backfill_assets.py`), its checks
(`assets/backfill_checks.py`) and a `<asset>_checks` job that re-runs only the checks
(re-verification without rewriting). Dagster 1.13 gives a checks-only job no partitions of its own:
launch it with the tags `dagster/asset_partition_range_start` / `_end` (start = end for one
partition); launched without them, it re-checks every committed partition of the dataset.
An open-ended ledger dataset (no `lastLedger`) also gets a sensor adding its `range=` partition keys
(`sensors/ledger_partitions_sensor.py`). The `pcbo_request` job (`jobs/request_job.py`) runs any
request JSON through the engine (from the launchpad, or `pcbo execute --dagster URL`).
One `pcbo` resource (`PcboEngineResource`, composing the catalog, lake, audit and sources resources)
is bound to the `PCBO_*` variables that are set; the rest take the engine's embedded defaults.

    dagster definitions validate -m pcbo_dagster.dagster_defs.definitions
    dagster dev -m pcbo_dagster.dagster_defs.definitions        # or -w workspace.yaml
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.dagster_defs.assets import build_dataset_asset, build_dataset_checks
from pcbo_dagster.dagster_defs.assets.rollout_assets import build_production_asset, build_staging_asset
from pcbo_dagster.dagster_defs.assets.soak_checks import build_soak_check
from pcbo_dagster.dagster_defs.jobs import build_request_job
from pcbo_dagster.dagster_defs.jobs.rollout_jobs import build_rollout_jobs
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.dagster_defs.schedules import build_soak_monitor
from pcbo_dagster.dagster_defs.sensors import build_ledger_partitions_sensor
from pcbo_dagster.dagster_defs.sensors.alerts_sensor import build_alerts_sensor
from pcbo_dagster.dagster_defs.sensors.promotion_sensor import build_promotion_sensor, promotion_job_name
from pcbo_dagster.datasets_config import DatasetsConfig, LedgerRangePartitioning, load_datasets_config
from pcbo_dagster.rollout.clock import REAL_CLOCK, Clock

CONFIG_ENV = "PCBO_DATASETS_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "datasets.yaml"


def config_path(environ: dict[str, str] | None = None) -> Path:
    environ = dict(os.environ if environ is None else environ)
    return Path(environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: str | Path) -> DatasetsConfig:
    """The datasets config, or `InvalidInput` naming the field and the file."""
    try:
        return load_datasets_config(path)
    except InvalidInput as exc:
        raise InvalidInput(exc.field, f"{exc.message} (datasets config {path})") from None


def build_definitions(
    config: DatasetsConfig | str | Path,
    resource: PcboEngineResource | None = None,
    clock: Clock = REAL_CLOCK,
) -> dg.Definitions:
    """The code location. `clock` (tests: a `ManualClock`) is what rollouts measure soak windows,
    throttles and approvals on."""
    if not isinstance(config, DatasetsConfig):
        config = load_config(config)
    assets: list[dg.AssetsDefinition] = []
    checks: list[dg.AssetChecksDefinition] = []
    jobs: list = [build_request_job(config.base_dir)]
    sensors: list[dg.SensorDefinition] = [build_alerts_sensor()]
    schedules: list[dg.ScheduleDefinition] = []
    soak_checks: list[dg.AssetChecksDefinition] = []
    promotion_jobs: list = []
    for dataset in config.datasets:
        if dataset.rollout is not None:
            staging = build_staging_asset(config, dataset, clock)
            production = build_production_asset(config, dataset, staging, clock)
            assets += [staging, production]
            checks += build_dataset_checks(config, dataset, staging, stage="staging")
            checks += build_dataset_checks(config, dataset, production)
            soak_checks.append(build_soak_check(config, dataset, staging, clock))
            promotion_jobs.append(
                dg.define_asset_job(
                    promotion_job_name(dataset.asset_name),
                    selection=dg.AssetSelection.assets(production),
                    description=f"Promote a rollout of {dataset.name} to production (by rollout_promotion)",
                )
            )
            continue
        asset = build_dataset_asset(config, dataset)
        assets.append(asset)
        checks.extend(build_dataset_checks(config, dataset, asset))
        partitioning = dataset.partitioning
        if isinstance(partitioning, LedgerRangePartitioning) and partitioning.lastLedger is None:
            sensors.append(build_ledger_partitions_sensor(config, dataset, asset))
        jobs.append(
            dg.define_asset_job(
                f"{dataset.asset_name}_checks",
                selection=dg.AssetSelection.checks_for_assets(asset),
                description=f"Re-run the checks of {dataset.name} over a partition range (no writes)",
            )
        )
    if soak_checks:
        soak_job, soak_schedule = build_soak_monitor(soak_checks)
        checks += soak_checks
        jobs += [soak_job, *promotion_jobs, *build_rollout_jobs(config, clock)]
        schedules.append(soak_schedule)
        sensors.append(build_promotion_sensor(config, promotion_jobs, clock))
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources={"pcbo": resource or PcboEngineResource.from_env()},
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(config_path())

"""The pcbo code location: `Definitions` built from the datasets config file.

The file is named by `PCBO_DATASETS_CONFIG` (default: the datasets config shipped with the package,
`pcbo_dagster/datasets/examples/datasets.yaml`); relative lake paths in it resolve against its
directory, relative source paths against its `sources_dir` (`datasets/config.py`: `PCBO_SOURCES_DIR`,
else the file's directory, or `PCBO_HOME` for the packaged example). A bad file refuses to load:
the code location shows the `InvalidInput` naming the field (`datasets[1].partitioning.cron: ...`).

Grouped by domain, each with its assets, checks, jobs, sensors and schedules side by side, merged here
with the one `pcbo` resource (`PcboEngineResource`, bound to the `PCBO_*` variables that are set):
- `backfill/`: per dataset the graph-backed asset (four ops), its checks, and the jobs `<asset>_checks`
  (only the checks), `<asset>_dry_run` and `<asset>_rollback` (rollout datasets: the dry run only); the
  open-ended ledger partitions sensor and `lake_drift`; the `pcbo_request` job (any request JSON
  through the engine, from the launchpad or `pcbo execute --dagster URL`).
- `rollout/`: per rollout dataset the staging and production assets and their checks, the soak check
  and schedule, the promotion job and sensor, the rollout control / approval / rollback / health jobs,
  the interrupted-apply and health-repair sensors.
- `alerts/`: the sensor raising an alert for every failed check and run.

    dagster definitions validate -m pcbo_dagster.dagster_defs.definitions
    dg dev                                   # from the repository root (pyproject's [tool.dg])
    dagster-webserver -m pcbo_dagster.dagster_defs.definitions  # and dagster-daemon run -m ..., anywhere
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.dagster_defs.alerts.sensors import build_alerts_sensor
from pcbo_dagster.dagster_defs.backfill.assets import build_dataset_asset
from pcbo_dagster.dagster_defs.backfill.checks import build_dataset_checks
from pcbo_dagster.dagster_defs.backfill.dataset_jobs import build_dataset_jobs
from pcbo_dagster.dagster_defs.backfill.jobs import build_request_job
from pcbo_dagster.dagster_defs.backfill.sensors import (
    DriftTarget,
    build_lake_drift_sensor,
    build_ledger_partitions_sensor,
)
from pcbo_dagster.dagster_defs.backfill.sql_assets import build_sql_dataset_asset, build_sql_dataset_checks
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.dagster_defs.rollout.assets import build_production_asset, build_staging_asset
from pcbo_dagster.dagster_defs.rollout.checks import build_soak_check
from pcbo_dagster.dagster_defs.rollout.jobs import build_rollout_jobs
from pcbo_dagster.dagster_defs.rollout.schedules import build_soak_monitor
from pcbo_dagster.dagster_defs.rollout.sensors import (
    build_interrupted_sensor,
    build_promotion_sensor,
    build_repairs_sensor,
    promotion_job_name,
)
from pcbo_dagster.datasets.config import (
    DatasetConfig,
    DatasetsConfig,
    LedgerRangePartitioning,
    load_datasets_config_from_env,
)
from pcbo_dagster.rollout.clock import REAL_CLOCK, Clock

#: `PCBO_EXECUTOR=celery`: every job's steps run on Celery workers (dagster-celery) through the broker
#: `PCBO_CELERY_BROKER` (e.g. redis://host:6379/0) and result backend `PCBO_CELERY_BACKEND` (default:
#: the broker's URL); each step's message and result are signed under `PCBO_CELERY_KEY`, which
#: every worker and coordinator shares (`celery_signing.py`); a step whose signed result has not
#: arrived within `PCBO_CELERY_STEP_TIMEOUT` seconds is revoked and failed. `k8s`: dagster-k8s's
#: `k8s_job_executor` (a Kubernetes Job per step). Unset (or `default`): Dagster's default executor,
#: steps on the run's own host.
EXECUTOR_ENV = "PCBO_EXECUTOR"


def executor_from_env(env: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """The executor `PCBO_EXECUTOR` names. `default`: one process per run, the asset's four ops (and
    every check step) run in the run worker one after another — a process per step (Dagster's
    multiprocess default) costs ~10 s of start-up each on a 2-core machine, against ~1.5 s of engine
    work for 24 partitions, and the steps are sequential anyway (each needs the one before; the engine
    parallelises inside a step). The broker and backend URLs are read by Dagster from the environment
    when a run starts (`EnvVar`), never written into run config."""
    env = os.environ if env is None else env
    kind = (env.get(EXECUTOR_ENV) or "default").strip().lower()
    if kind == "default":
        return dg.in_process_executor
    if kind == "k8s":
        # Each step a Kubernetes Job of its own (dagster-k8s), next to runs the K8sRunLauncher starts:
        # the deployment in deploy/helm/values.yaml. Its settings come from the run launcher's only:
        # the executor's own are all run config (an image, env_vars such as PCBO_HOME, volumes), which
        # any launch could set; configured empty, a launch that gives any is refused.
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError:
            raise InvalidInput(
                EXECUTOR_ENV, "PCBO_EXECUTOR=k8s needs dagster-k8s (pip install 'pcbo_dagster[k8s]')"
            ) from None
        return k8s_job_executor.configured(lambda _config: {}, config_schema={})
    if kind != "celery":
        raise InvalidInput(EXECUTOR_ENV, f"must be 'celery', 'k8s' or 'default', not {kind!r}")
    if not env.get("PCBO_CELERY_BROKER"):
        raise InvalidInput(
            "PCBO_CELERY_BROKER", "is required with PCBO_EXECUTOR=celery (redis://host:6379/0)"
        )
    try:
        import dagster_celery  # noqa: F401
    except ImportError:
        raise InvalidInput(
            EXECUTOR_ENV, "PCBO_EXECUTOR=celery needs dagster-celery (pip install 'pcbo_dagster[celery]')"
        ) from None
    from pcbo_dagster.dagster_defs.celery_config import celery_settings, step_timeout_seconds
    from pcbo_dagster.dagster_defs.celery_signing import authenticated_celery_executor, celery_secret

    celery_secret(env)  # refused here, at the load, rather than when a run starts
    step_timeout_seconds(env)  # the same
    backend = "PCBO_CELERY_BACKEND" if env.get("PCBO_CELERY_BACKEND") else "PCBO_CELERY_BROKER"
    return authenticated_celery_executor.configured(
        {
            "broker": {"env": "PCBO_CELERY_BROKER"},
            "backend": {"env": backend},
            # The same settings as the workers' app (celery_worker.py), where acknowledgement happens.
            "config_source": celery_settings(env),
        },
        name="pcbo_celery",
    )


#: Dagster's default IO manager (a step's outputs pickled under the instance's storage directory) with
#: nothing left to configure: unnamed, a location gets it with its `base_dir` open to every launch's
#: run config, which then chose the directory of the host the outputs were written to.
@dg.io_manager(
    config_schema={},  # a launch that gives it any is refused
    description="Dagster's filesystem IO manager, under the instance's storage directory",
)
def STEP_OUTPUTS_IO_MANAGER(context: dg.InitResourceContext) -> dg.IOManager:  # noqa: N802 - a definition
    return dg.FilesystemIOManager().create_io_manager(context)  # (`base_dir` unset: the instance's storage)


def build_definitions(
    config: DatasetsConfig | str | Path,
    resource: PcboEngineResource | None = None,
    clock: Clock = REAL_CLOCK,
) -> dg.Definitions:
    """The code location. `clock` (tests: a `ManualClock`) is what rollouts measure soak windows,
    throttles and approvals on."""
    if not isinstance(config, DatasetsConfig):
        config = load_datasets_config_from_env(config)
    assets, checks, jobs, sensors, schedules = _location_definitions(config, clock)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        # No resource takes run config: where the engine's stores and the step outputs are is the
        # location's to say, not a launch's (`resources.PcboEngineResource`, the IO manager above).
        resources={"pcbo": resource or PcboEngineResource.from_env(), "io_manager": STEP_OUTPUTS_IO_MANAGER},
        executor=executor_from_env(),
    )


def check_location(config: DatasetsConfig) -> None:
    """What the code location refuses when it loads `config` (`build_definitions`: a dataset name
    making a Dagster name another definition has, a bad `PCBO_SOAK_CRON`, ...), as the same
    `InvalidInput`, without loading it: `pcbo validate-config` runs it. Nothing is connected to."""
    _location_definitions(config, REAL_CLOCK)


def _location_definitions(
    config: DatasetsConfig, clock: Clock
) -> tuple[
    list[dg.AssetsDefinition],
    list[dg.AssetChecksDefinition],
    list,
    list[dg.SensorDefinition],
    list[dg.ScheduleDefinition],
]:
    """The location's assets, checks, jobs, sensors and schedules, their names checked
    (`_refuse_taken_names`)."""
    assets: list[dg.AssetsDefinition] = []
    checks: list[dg.AssetChecksDefinition] = []
    jobs: list = [build_request_job(config.sources_dir)]
    sensors: list[dg.SensorDefinition] = [build_alerts_sensor()]
    schedules: list[dg.ScheduleDefinition] = []
    soak_checks: list[dg.AssetChecksDefinition] = []
    promotion_jobs: list = []
    staging_assets: list[dg.AssetsDefinition] = []
    drift_targets: list[DriftTarget] = []
    checks_jobs: list = []

    def checks_job(
        asset: dg.AssetsDefinition, dataset: DatasetConfig, stage: str | None, drift: bool = True
    ) -> None:
        name = f"{asset.key.to_python_identifier()}_checks"
        # No `partitions_def`: Dagster 1.13.27 ignores it for a selection of checks only (and warns
        # that it is deprecated); runs of this job name their partitions with the range tags, as
        # lake_drift's requests do.
        checks_jobs.append(
            dg.define_asset_job(
                name,
                selection=dg.AssetSelection.checks_for_assets(asset),
                description=f"Re-run the checks of {asset.key.to_user_string()} over a partition range "
                "(no writes; launch with the tags dagster/asset_partition_range_start and _end); "
                "launched by lake_drift for partitions that drifted",
            )
        )
        if drift:  # (a SQL target's table is not the lake lake_drift watches)
            drift_targets.append(DriftTarget(asset.key, dataset, stage, name))

    for dataset in config.datasets:
        if dataset.rollout is not None:
            staging = build_staging_asset(config, dataset, clock)
            production = build_production_asset(config, dataset, staging, clock)
            assets += [staging, production]
            staging_assets.append(staging)
            checks += build_dataset_checks(config, dataset, staging, stage="staging")
            checks += build_dataset_checks(config, dataset, production)
            checks_job(staging, dataset, "staging")
            checks_job(production, dataset, None)
            jobs.extend(build_dataset_jobs(config, dataset, production, with_rollback=False))
            soak_checks.append(build_soak_check(config, dataset, staging, clock))
            promotion_jobs.append(
                dg.define_asset_job(
                    promotion_job_name(dataset.asset_name),
                    selection=dg.AssetSelection.assets(production),
                    description=f"Promote a rollout of {dataset.name} to production (by rollout_promotion; "
                    "health repairs by production_health_repairs)",
                )
            )
            continue
        if dataset.target is not None:  # issue 15: a SQL table target (backfill/sql_assets.py)
            asset = build_sql_dataset_asset(config, dataset)
            assets.append(asset)
            checks.extend(build_sql_dataset_checks(config, dataset, asset))
            checks_job(asset, dataset, None, drift=False)
        else:
            asset = build_dataset_asset(config, dataset)
            assets.append(asset)
            checks.extend(build_dataset_checks(config, dataset, asset))
            jobs.extend(build_dataset_jobs(config, dataset, asset))
            checks_job(asset, dataset, None)
        partitioning = dataset.partitioning
        if isinstance(partitioning, LedgerRangePartitioning) and partitioning.lastLedger is None:
            sensors.append(build_ledger_partitions_sensor(config, dataset, asset))
    jobs += checks_jobs
    sensors.append(build_lake_drift_sensor(config, drift_targets, checks_jobs))
    if soak_checks:
        rollout_datasets = [d.name for d in config.datasets if d.rollout is not None]
        soak_job, soak_schedule = build_soak_monitor(config, soak_checks, rollout_datasets, clock)
        checks += soak_checks
        jobs += [soak_job, *promotion_jobs, *build_rollout_jobs(config, clock)]
        schedules.append(soak_schedule)
        sensors.append(build_promotion_sensor(config, promotion_jobs, clock))
        sensors += build_interrupted_sensor(config, staging_assets)
        sensors.append(build_repairs_sensor(config, promotion_jobs))
    _refuse_taken_names(config, {"job": jobs, "sensor": sensors, "schedule": schedules})
    return assets, checks, jobs, sensors, schedules


#: The names each dataset gives definitions of its own, after its asset name.
_PER_DATASET_SUFFIXES = ("checks", "dry_run", "rollback", "ledger_partitions")


def _refuse_taken_names(config: DatasetsConfig, definitions: Mapping[str, list]) -> None:
    """Two definitions of one name (a dataset named `rollout` makes the job `rollout_rollback`, as the
    rollout jobs are named; `staging__sessions` makes `staging__sessions_checks`, the staging asset's
    checks job) refuse the load naming the dataset, as the config's other errors do, rather than as
    Dagster's `Duplicate job definition` when the location resolves."""
    seen: set[str] = set()
    for kind, items in definitions.items():
        for name in (item.name for item in items):
            if name not in seen:
                seen.add(name)
                continue
            for index, dataset in enumerate(config.datasets):
                if name in {f"{dataset.asset_name}_{suffix}" for suffix in _PER_DATASET_SUFFIXES}:
                    raise InvalidInput(
                        f"datasets[{index}].name",
                        f"{dataset.name!r} makes the Dagster {kind} {name!r}, a name the code location "
                        "already gives another definition: choose another dataset name",
                    )
            raise InvalidInput("datasets", f"two Dagster {kind}s would be named {name!r}")


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_datasets_config_from_env())

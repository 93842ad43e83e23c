"""A sensor per open-ended ledger dataset: it adds a `range=S-E` key for each full partition in the source.

An open-ended ledger range (`partitioning.lastLedger` not given) has a `DynamicPartitionsDefinition`
(`partitions.py`): its keys live in the Dagster instance. On each tick the sensor reads the highest
ledger sequence in the dataset's source (the integer `partitioning.field` of its records, default
`ledgerSequence`; records without one are ignored here and become `INVALID_RECORD` when executed),
and adds the key of every partition `[firstLedger + i*partitionSize, ... + partitionSize - 1]` whose
last ledger is at most that maximum and which the instance does not hold yet. A partition still
filling up (its last ledger not in the source yet) gets no key, so a materialized partition is never
missing ledgers that close later. Adding keys writes nothing: materialize the new partitions with a
backfill from the asset page (or add a schedule/automation condition on the asset).

The cursor is the highest ledger seen (shown in the UI); keys are computed from the source on every
tick, so a lost cursor or a key removed by hand is simply re-added.
"""

from dataclasses import dataclass
from typing import Any

import dagster as dg

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.request_model import MAX_PARTITIONS
from pcbo_dagster.dagster_defs.partitions import adjacent_stretches, partitions_def_for
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig, LedgerRangePartitioning
from pcbo_dagster.io.env_vars import positive_int
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.sources.streaming import max_integer_in_source

#: How often the daemon evaluates the sensor (seconds); ledgers close about every 5 s.
MINIMUM_INTERVAL_SECONDS = 60


def max_ledger_in_source(uri: str, fmt: str, field: str) -> int | None:
    """The highest integer `field` among the source's records, or None when there is none; read within
    the engine's bounds (`sources.streaming.max_integer_in_source`: `InvalidInput` for a missing,
    unreadable or not regular source, or a line longer than `PCBO_MAX_LINE_BYTES`)."""
    return max_integer_in_source(uri, fmt, field)


def sensor_name_for(dataset: DatasetConfig) -> str:
    return f"{dataset.asset_name}_ledger_partitions"


def build_ledger_partitions_sensor(
    config: DatasetsConfig, dataset: DatasetConfig, asset: dg.AssetsDefinition
) -> dg.SensorDefinition:
    """The key-adding sensor of an open-ended ledger dataset (its asset's dynamic partitions)."""
    partitioning = dataset.partitioning
    assert isinstance(partitioning, LedgerRangePartitioning) and partitioning.lastLedger is None
    partitions_def = asset.partitions_def
    assert isinstance(partitions_def, dg.DynamicPartitionsDefinition) and partitions_def.name
    fmt = dataset.source.resolved_format()

    @dg.sensor(
        name=sensor_name_for(dataset),
        minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Adds a range=START-END partition of {dataset.name} for every full partition of "
            f"{partitioning.partitionSize} ledgers (from ledger {partitioning.firstLedger}) its source holds"
        ),
    )
    def ledger_partitions(
        context: dg.SensorEvaluationContext, pcbo: PcboEngineResource
    ) -> dg.SensorResult | dg.SkipReason:
        uri = pcbo.sources.resolve(dataset.source.uri, config.sources_dir)
        try:
            top = max_ledger_in_source(uri, fmt, partitioning.field)
        except InvalidInput as exc:  # missing (yet), unreadable, not a regular file, a line too long
            return dg.SkipReason(f"the source cannot be read: {exc.message}")
        if top is None:
            return dg.SkipReason(f"no record of {redact_url(uri)} has an integer {partitioning.field}")
        full = partitioning.grid.full_count(top)
        keys = partitioning.grid.full_keys(top, MAX_PARTITIONS)  # (only the keys it may add are built)
        if full > MAX_PARTITIONS:
            context.log.warning(
                f"{full} full partitions; adding the first {MAX_PARTITIONS} only (the partition limit)"
            )
        assert partitions_def.name is not None
        known = set(context.instance.get_dynamic_partitions(partitions_def.name))
        new = [key for key in keys if key not in known]
        if not new:
            return dg.SkipReason(
                f"no new full partition: highest {partitioning.field} {top}, {full} partition key(s)"
            )
        context.log.info(f"adding {len(new)} partition key(s) {new[0]}..{new[-1]} (highest ledger {top})")
        return dg.SensorResult(
            dynamic_partitions_requests=[partitions_def.build_add_request(new)], cursor=str(top)
        )

    return ledger_partitions


# --- lake_drift: the UI's latest materialization of each partition against the lake --------------

LAKE_DRIFT_SENSOR = "lake_drift"
#: How often the daemon compares (seconds); `PCBO_LAKE_DRIFT_INTERVAL` overrides it.
LAKE_DRIFT_INTERVAL = 300


@dataclass(frozen=True)
class DriftTarget:
    """An asset the sensor watches: its key, dataset, stage (None, staging, production) and checks job."""

    key: dg.AssetKey
    dataset: DatasetConfig
    stage: str | None
    checks_job: str


def _materialized_checksums(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict[str, str | None]:
    """{partition: the manifest checksum its latest materialization recorded}."""
    ids = instance.event_log_storage.get_latest_storage_id_by_partition(
        key, dg.DagsterEventType.ASSET_MATERIALIZATION
    )
    if not ids:
        return {}
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, storage_ids=list(ids.values())), limit=len(ids)
    ).records
    out: dict[str, str | None] = {}
    for record in records:
        entry = (
            record.asset_materialization.metadata.get("manifest_checksum")
            if record.asset_materialization
            else None
        )
        out[str(record.partition_key)] = getattr(entry, "value", None)
    return out


def find_drift(instance: dg.DagsterInstance, target: DriftTarget, env: Any) -> dict[str, str]:
    """{partition: what differs} for every partition whose lake state is not its latest
    materialization's: a commit point that is another manifest (or none), or a data file of the
    committed manifest that is missing or not its recorded size."""
    from pcbo_dagster.engine.partition_checks import committed_keys
    from pcbo_dagster.engine.partition_reading import read_commit_point

    dataset = target.dataset
    materialized = _materialized_checksums(instance, target.key)
    keys = sorted(set(materialized) | set(committed_keys(env.lake, dataset.name, dataset.versionLabel)))
    drift: dict[str, str] = {}
    for key in keys:
        reading = read_commit_point(env.lake, dataset.name, dataset.versionLabel, key)
        recorded = materialized.get(key, "not materialized")
        if reading.manifest_checksum != recorded:
            drift[key] = (
                f"the lake commits {reading.manifest_checksum or 'nothing'}; the asset's latest "
                f"materialization records {recorded}"
            )
            continue
        for entry in (reading.manifest or {}).get("files", []):
            size = env.lake.size(entry.get("path", ""))
            if size != entry.get("byteSize"):
                drift[key] = (
                    f"{entry.get('path')}: {'missing' if size is None else f'{size} bytes'}, "
                    f"the manifest says {entry.get('byteSize')}"
                )
                break
    return drift


def _asset_keys(instance: dg.DagsterInstance, dataset: DatasetConfig) -> list[str]:
    """The dataset's asset partition keys in order (its dynamic keys: the instance's)."""
    from dagster._core.definitions.partitions.context import partition_loading_context

    with partition_loading_context(dynamic_partitions_store=instance):
        return list(partitions_def_for(dataset).get_partition_keys())


def _busy_assets(instance: dg.DagsterInstance) -> set[dg.AssetKey] | None:
    """The assets an unfinished run selects; None when an unfinished run is an op job (a rollback,
    a request or a rollout job may change any dataset's lake)."""
    from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

    busy: set[dg.AssetKey] = set()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=list(IN_PROGRESS_RUN_STATUSES))):
        selected = set(run.asset_selection or []) | {k.asset_key for k in run.asset_check_selection or []}
        if not selected:
            return None
        busy |= selected
    return busy


def build_lake_drift_sensor(
    config: DatasetsConfig, targets: list[DriftTarget], jobs: list[Any]
) -> dg.SensorDefinition:
    """`lake_drift`: every partition whose lake state no longer matches its latest materialization is
    reported. When the lake agrees with the audit chain (a change made outside Dagster and not
    reported: no `DAGSTER_HOME` at the time), the partition's state is reported to the instance
    (`instance_reporting.py`: a materialization from the lake, or a wipe for one with nothing left);
    when it does not (a deleted, replaced or corrupted partition), the asset's checks job is launched
    over the drifted partitions: their checks fail and turn them red. The same drift is not launched
    twice (the run key names it)."""
    import os

    interval = positive_int(
        "PCBO_LAKE_DRIFT_INTERVAL", os.environ.get("PCBO_LAKE_DRIFT_INTERVAL"), LAKE_DRIFT_INTERVAL
    )

    @dg.sensor(
        name=LAKE_DRIFT_SENSOR,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Finds partitions whose lake state no longer matches their latest materialization: "
        "reports the lake's state, or launches the checks of a partition the lake and its chain disagree on",
        jobs=jobs,
    )
    def lake_drift(
        context: dg.SensorEvaluationContext, pcbo: PcboEngineResource
    ) -> dg.SensorResult | dg.SkipReason:
        from pcbo_dagster.core.canonical import digest_of
        from pcbo_dagster.dagster_defs.instance_reporting import AssetTarget, lake_state, report_partitions

        requests: list[dg.RunRequest] = []
        lines: list[str] = []
        watched = 0
        busy = _busy_assets(context.instance)
        for target in targets:
            dataset = target.dataset
            if busy is None or target.key in busy:
                # A run in progress may be changing this lake: its materializations are not recorded yet.
                lines.append(f"{target.key.to_user_string()}: a run that may change it is in progress")
                continue
            with pcbo.environment_for(config, dataset, target.stage) as env:
                drift = find_drift(context.instance, target, env)
                watched += 1
                if not drift:
                    continue
                states = lake_state(env, dataset.name, dataset.versionLabel, sorted(drift))
                agreeing = [
                    k
                    for k in sorted(drift)
                    if states[k][0] != "disagrees" and "bytes" not in drift[k] and "missing" not in drift[k]
                ]
                suspect = [k for k in sorted(drift) if k not in agreeing]
                asset_keys = _asset_keys(context.instance, dataset)
                outside = sorted(set(suspect) - set(asset_keys))
                if outside:
                    # Not a partition of the asset: no checks run can name it (Dagster refuses the
                    # range); a commit point there is `pcbo verify`'s finding.
                    suspect = [k for k in suspect if k not in outside]
                    lines.append(
                        f"{target.key.to_user_string()}: {len(outside)} commit point(s) under keys that "
                        f"are not partitions of the asset ({', '.join(outside[:3])}): see `pcbo verify`"
                    )
                if agreeing:
                    result = report_partitions(
                        context.instance,
                        AssetTarget(target.key, dataset),
                        env,
                        agreeing,
                        "found_by_lake_drift",
                        f"sensor {LAKE_DRIFT_SENSOR}",
                    )
                    lines.append(
                        f"{target.key.to_user_string()}: reported the lake state of "
                        f"{len(agreeing)} partition(s) "
                        f"changed outside Dagster (wiped: {result['wiped']})"
                    )
                if suspect:
                    # One checks run per stretch of adjacent drifted partitions: a range over a
                    # partition between them (rolled back, never materialized) would fail its checks.
                    for stretch in adjacent_stretches(suspect, asset_keys):
                        signature = digest_of({k: drift[k] for k in stretch})
                        requests.append(
                            dg.RunRequest(
                                run_key=f"{LAKE_DRIFT_SENSOR}:{target.key.to_user_string()}:{signature}",
                                job_name=target.checks_job,
                                tags={
                                    "dagster/asset_partition_range_start": stretch[0],
                                    "dagster/asset_partition_range_end": stretch[-1],
                                    "pcbo/lake_drift": ",".join(stretch[:20]),
                                },
                            )
                        )
                    lines.append(
                        f"{target.key.to_user_string()}: {len(suspect)} partition(s) differ "
                        "from their chain or "
                        f"manifest ({'; '.join(f'{k}: {drift[k]}' for k in suspect[:3])}): checks launched"
                    )
        for line in lines:
            context.log.info(line)
        if requests:
            return dg.SensorResult(run_requests=requests)
        if lines:
            return dg.SkipReason(" | ".join(lines))
        return dg.SkipReason(
            f"no drift: every partition of the {watched} watched asset(s) is what its latest "
            "materialization records"
        )

    return lake_drift

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

from typing import Any

import dagster as dg
import orjson

from pcbo_dagster.core.request_model import MAX_PARTITIONS
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig, LedgerRangePartitioning

#: How often the daemon evaluates the sensor (seconds); ledgers close about every 5 s.
MINIMUM_INTERVAL_SECONDS = 60


def _ledger(value: Any) -> int | None:
    return value if type(value) is int else None


def max_ledger_in_source(uri: str, fmt: str, field: str) -> int | None:
    """The highest integer `field` among the source's records, or None when there is none.

    JSONL is read line by line (a line that is not a JSON object is skipped); parquet reads only the
    `field` column. A missing source raises `FileNotFoundError`.
    """
    import fsspec

    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        with fsspec.open(uri, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            if field not in parquet.schema_arrow.names:
                return None
            column = parquet.read(columns=[field]).column(field)
        if not pa.types.is_integer(column.type):
            return None
        top = pc.max(column).as_py()
        return None if top is None else int(top)
    best: int | None = None
    with fsspec.open(uri, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                value = _ledger(record.get(field))
                if value is not None and (best is None or value > best):
                    best = value
    return best


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
        except FileNotFoundError:
            return dg.SkipReason(f"the source {uri} does not exist (yet)")
        if top is None:
            return dg.SkipReason(f"no record of {uri} has an integer {partitioning.field}")
        keys = partitioning.grid.full_keys(top)
        if len(keys) > MAX_PARTITIONS:
            context.log.warning(
                f"{len(keys)} full partitions; adding the first {MAX_PARTITIONS} only (the partition limit)"
            )
            keys = keys[:MAX_PARTITIONS]
        assert partitions_def.name is not None
        known = set(context.instance.get_dynamic_partitions(partitions_def.name))
        new = [key for key in keys if key not in known]
        if not new:
            return dg.SkipReason(
                f"no new full partition: highest {partitioning.field} {top}, {len(keys)} partition key(s)"
            )
        context.log.info(f"adding {len(new)} partition key(s) {new[0]}..{new[-1]} (highest ledger {top})")
        return dg.SensorResult(
            dynamic_partitions_requests=[partitions_def.build_add_request(new)], cursor=str(top)
        )

    return ledger_partitions

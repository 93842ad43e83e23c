"""The packaged example's code location, in-process, for tests that drive its assets, checks and
sensors without a webserver: the example datasets config (with the test approvers listed) beside its
demo data, a pcbo home, and the definitions built over them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dagster as dg

from pcbo_dagster.dagster_defs.definitions import build_definitions
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DEFAULT_DATASETS_CONFIG, DatasetsConfig, load_datasets_config
from pcbo_dagster.datasets.demo_data import generate_demo_data
from pcbo_dagster_tests.approver_keys import list_approvers_in_example

#: The first three hourly partitions of the example's `events` asset, and the run tags of that range.
KEYS = [f"20240101T{h:02d}0000Z" for h in range(3)]
EVENTS = dg.AssetKey(["events"])
RANGE = {"dagster/asset_partition_range_start": KEYS[0], "dagster/asset_partition_range_end": KEYS[-1]}


def example_workdir(root: Path) -> Path:
    """`root` holding the example datasets config (`datasets.yaml`, no approvers listed) beside freshly
    generated demo sources (`demo_data`), as on a fresh clone."""
    shutil.copy(DEFAULT_DATASETS_CONFIG, root / "datasets.yaml")
    generate_demo_data(root / "demo_data")
    return root


def example_location(tmp_path: Path) -> tuple[Path, DatasetsConfig, PcboEngineResource, dg.Definitions]:
    """(tmp_path, the config, the engine resource on `tmp_path/pcbo-home`, the definitions)."""
    example_workdir(tmp_path)
    list_approvers_in_example(tmp_path / "datasets.yaml")
    config = load_datasets_config(tmp_path / "datasets.yaml")
    engine = PcboEngineResource(home=str(tmp_path / "pcbo-home"))
    return tmp_path, config, engine, build_definitions(config, resource=engine)


def materialize_events(defs: dg.Definitions, instance: dg.DagsterInstance, **kwargs: Any) -> Any:
    """`events` over `KEYS`, in-process on `instance` (`kwargs`: `execute_in_process`'s)."""
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={EVENTS})
    return job.execute_in_process(instance=instance, tags=RANGE, **kwargs)

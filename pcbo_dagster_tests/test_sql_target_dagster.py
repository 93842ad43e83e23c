"""A dataset with a SQL target (issue 15) in the Dagster code location: a partitioned asset like the
others, in its table's pool, with the blocking `sql_read_back` check; materialized over a partition
range into a real SQLite table, then a changed row caught by the checks job."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

dg = pytest.importorskip("dagster")

from pcbo_dagster.dagster_defs.definitions import build_definitions  # noqa: E402
from pcbo_dagster.dagster_defs.resources import PcboEngineResource  # noqa: E402
from pcbo_dagster.datasets.config import load_datasets_config  # noqa: E402
from pcbo_dagster.datasets.demo_data import generate_demo_data  # noqa: E402
from pcbo_dagster.engine.verify import verify  # noqa: E402
from pcbo_dagster_tests.sql_target_helpers import create_demo_events_table, query, run_sql, sqlite_url  # noqa: E402

CONFIG = """
version: 1
datasets:
  - name: events_sql
    partitioning:
      {kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-02T00:00:00Z"}
    source: {uri: demo_data/events.jsonl, format: jsonl}
    policies: {requireConsent: true, allowedJurisdictions: [US, CA]}
    backfillPolicy: {kind: single_run}
    target:
      kind: sql
      url: sqlite:///target.db
      table: events
      key: [id]
      conflict: overwrite
      columns: {id: id, occurredAt: occurred_at, amount: amount, channel: channel}
      chunkRows: 16
"""
KEYS = [f"20240101T{h:02d}0000Z" for h in range(4)]


def test_a_sql_target_dataset_materializes_with_a_read_back_check(tmp_path: Path) -> None:
    (tmp_path / "datasets.yaml").write_text(CONFIG)
    generate_demo_data(tmp_path / "demo_data")
    url = sqlite_url(tmp_path / "target.db")
    create_demo_events_table(url)
    config = load_datasets_config(tmp_path / "datasets.yaml")
    dataset = config.dataset("events_sql")
    assert dataset.target is not None and dataset.target.url == url  # relative: against the config file
    engine = PcboEngineResource(home=str(tmp_path / "home"))
    defs = build_definitions(config, resource=engine)
    asset = defs.resolve_assets_def("events_sql")
    assert asset.op.pool == dataset.pool_name and dataset.pool_name.startswith("pcbo-sql-events-")
    tags = {"dagster/asset_partition_range_start": KEYS[0], "dagster/asset_partition_range_end": KEYS[-1]}
    with dg.instance_for_test() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(instance=instance, tags=tags, asset_selection=[asset.key])
        assert result.success
        mats = result.asset_materializations_for_node("events_sql")
        assert [m.partition for m in mats] == KEYS
        rows = query(url, "SELECT count(*) FROM events")[0][0]
        assert rows == sum(cast(int, m.metadata["inserted"].value) for m in mats) > 0
        for mat in mats:
            assert mat.metadata["status"].value == "applied"
            assert cast(str, mat.metadata["merkle_root"].value).startswith("sha256:")
            assert mat.metadata["dagster/row_count"].value == mat.metadata["inserted"].value
        evaluations = result.get_asset_check_evaluations()
        assert {(e.check_name, e.partition): e.passed for e in evaluations} == {
            ("sql_read_back", k): True for k in KEYS
        }
        with engine.environment() as env:
            report = verify(env)
            assert report["status"] == "clean", report["findings"]

        # A row changed behind the backfill's back: the checks job (no rewrite) catches it.
        changed = query(
            url, "SELECT id FROM events WHERE occurred_at LIKE '2024-01-01T02:%' ORDER BY id LIMIT 1"
        )[0][0]
        run_sql(url, f"UPDATE events SET amount = amount + 1 WHERE id = '{changed}'")
        rerun = defs.resolve_job_def("events_sql_checks").execute_in_process(
            instance=instance, tags=tags, raise_on_error=False
        )
        verdicts = {e.partition: e for e in rerun.get_asset_check_evaluations()}
        assert not verdicts[KEYS[2]].passed
        assert verdicts[KEYS[2]].metadata["changed"].value == [changed]
        assert all(verdicts[k].passed for k in KEYS if k != KEYS[2])

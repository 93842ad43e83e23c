"""Dagster on PostgreSQL storage, the pcbo catalog on PostgreSQL too (the docker-compose topology),
against the real server the `postgres` fixtures start on loopback.

1. In-process: a partition-range run (`materialize()` with the range tags) on a `DagsterInstance`
   loaded from a `dagster.yaml` whose storage is PostgreSQL; its materializations and check results
   are read back from the instance (and seen in its tables), `engine.verify` is clean on the PG catalog.
2. The compose file's own instance and workspace configs (`configs.dagster-instance`,
   `configs.dagster-workspace` of docker-compose.yml, host and port pointed at loopback): a
   `dagster code-server start` process, the webserver and the daemon, a backfill launched through
   GraphQL, runs executed through the code server, then `pcbo verify` on the PG catalog clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

dg = pytest.importorskip("dagster")
pytest.importorskip("dagster_postgres")
pytest.importorskip("psycopg2")  # what dagster-postgres connects with

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from pcbo_dagster.engine.environment import Environment  # noqa: E402
from pcbo_dagster.engine.settings import Settings  # noqa: E402
from pcbo_dagster.engine.verify import verify  # noqa: E402
from pcbo_dagster_tests.dagster_harness import (  # noqa: E402
    EVENTS,
    REPO_ROOT,
    assert_chain_never_forks,
    chain_events,
    deployment,
    hourly_keys,
    materialize_range,
    metadata_of,
    pcbo_verify,
    write_instance,
    write_workdir,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(420)]

PER_PARTITION_CHECKS = ("reconciliation", "policy_compliance", "audit_chain")


def _psycopg2(url: str) -> str:
    """The fixture's `postgresql+psycopg://` URL for dagster-postgres, which needs psycopg2.

    A plain `postgresql://` is not enough: SQLAlchemy 2.1 made psycopg (3) the default driver for it,
    and dagster-postgres 0.29's event log then fails on `NOTIFY run_events, %(notify_id)s` (psycopg 3
    binds parameters server-side, and NOTIFY takes none)."""
    return make_url(url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def _count(url: str, sql: str) -> int:
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def catalog_url(postgres_server) -> Iterator[str]:
    """A second fresh database, for the pcbo catalog (Dagster's storage has its own)."""
    name = postgres_server.create_database("pcbo_catalog")
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


def test_a_range_run_on_a_postgres_instance_with_a_postgres_catalog(
    tmp_path, monkeypatch, fresh_postgres_url, catalog_url
):
    dagster_url = _psycopg2(fresh_postgres_url)
    home = tmp_path / "dagster_home"
    write_instance(home, storage={"postgres": {"postgres_url": dagster_url}})
    keys = hourly_keys(10, 4)
    config = write_workdir(tmp_path / "work")
    for name in ("PCBO_LAKE_URL", "PCBO_AUDIT_DIR", "PCBO_AUDIT_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PCBO_HOME", str(tmp_path / "pcbo"))
    monkeypatch.setenv("PCBO_CATALOG_URL", catalog_url)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        result = materialize_range(config, "events", keys[0], keys[-1], instance)
        assert result.success
        run_id = result.run_id

    # A new instance from the same config: what was stored is in PostgreSQL, not in memory.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        records = instance.fetch_materializations(dg.AssetKey(EVENTS), limit=100).records
        by_key = {r.partition_key: r.asset_materialization for r in records}
        assert sorted(by_key) == keys and all(r.run_id == run_id for r in records)
        for key, mat in by_key.items():
            md = mat.metadata
            assert md["status"].value == "committed"
            assert md["add_count"].value + md["omit_count"].value == md["source_count"].value
            assert md["merkle_root"].value.startswith("sha256:")
            assert md["audit_event_hash"].value.startswith("sha256:")
            assert key in md["manifest"].value
        for check in PER_PARTITION_CHECKS:
            history = instance.event_log_storage.get_asset_check_execution_history(
                dg.AssetCheckKey(dg.AssetKey(EVENTS), check), limit=100
            )
            assert sorted(h.partition for h in history) == keys, check
            for h in history:
                assert h.run_id == run_id and h.status.value == "SUCCEEDED", (check, h)
                assert h.event is not None
                assert h.event.dagster_event.event_specific_data.passed

    # ...and in its tables.
    assert _count(dagster_url, "SELECT count(*) FROM runs") == 1
    materialized = "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
    assert _count(dagster_url, materialized) == 4
    assert _count(dagster_url, "SELECT count(*) FROM asset_check_executions") >= 3 * len(keys)

    # The pcbo catalog is in the other database; the engine's verification is clean against it.
    assert _count(
        catalog_url, "SELECT count(*) FROM audit_events WHERE event_type = 'partition_committed'"
    ) == len(keys)
    assert _count(catalog_url, "SELECT count(*) FROM partitions WHERE status = 'committed'") == len(keys)
    env = Environment.open(Settings.resolve(home=str(tmp_path / "pcbo"), catalog=catalog_url))
    try:
        assert env.catalog.dialect == "postgresql"
        report = verify(env)
    finally:
        env.close()
    assert report["status"] == "clean", report["findings"]
    assert report["checked"]["partitions"] == 4 and set(report["checked"]["chains"]) == {"events/v1"}


def _compose_configs() -> dict[str, dict]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return {
        name: yaml.safe_load(cfg["content"]) for name, cfg in compose["configs"].items() if "content" in cfg
    }


def test_the_compose_topology_on_loopback(tmp_path, postgres_server, fresh_postgres_url, catalog_url):
    configs = _compose_configs()
    instance = configs["dagster-instance"]
    # The compose instance reads DAGSTER_PG_* from the environment; only the port differs here.
    assert instance["storage"]["postgres"]["postgres_db"]["port"] == 5432
    instance["storage"]["postgres"]["postgres_db"]["port"] = make_url(fresh_postgres_url).port
    dagster_db = make_url(fresh_postgres_url).database
    catalog = make_url(catalog_url)
    env = {
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_USER": "postgres",
        "DAGSTER_PG_PASSWORD": "trust-auth-ignores-it",
        "DAGSTER_PG_DB": dagster_db,
        # As the compose file builds it: plain postgresql:// (the catalog picks psycopg 3 itself).
        "PCBO_CATALOG_URL": f"postgresql://postgres:trust-auth-ignores-it@127.0.0.1:{catalog.port}/{catalog.database}",
    }
    keys = hourly_keys(0, 6, day=2)
    with deployment(tmp_path, extra_env=env, instance=instance) as dep:
        dep.start_code_server(workspace=configs["dagster-workspace"])
        dep.start_webserver()
        dep.start_daemon()
        backfill_id = dep.launch_backfill(EVENTS, keys[0], keys[-1])
        backfill = dep.wait_for_backfills([backfill_id])[backfill_id]
        assert backfill["status"] in {"COMPLETED", "COMPLETED_SUCCESS"}, backfill
        assert [r["status"] for r in backfill["runs"]] == ["SUCCESS"]
        run_id = backfill["runs"][0]["runId"]

        mats = dep.materializations(EVENTS, keys)
        assert sorted(m["partition"] for m in mats) == keys
        assert {metadata_of(m["metadataEntries"])["status"] for m in mats} == {"committed"}
        for check in PER_PARTITION_CHECKS:
            done = [e for e in dep.check_executions(EVENTS, check) if e["evaluation"] is not None]
            assert sorted(e["partition"] for e in done) == keys, check
            assert all(e["status"] == "SUCCEEDED" and e["runId"] == run_id for e in done), done

        # Everything Dagster stored is in PostgreSQL (the run came from the code server location).
        run_tags = dep.graphql(
            "query Run($id: ID!) { runOrError(runId: $id) { ... on Run { tags { key value } } } }",
            {"id": run_id},
        )["runOrError"]["tags"]
        assert {"key": "dagster/code_location", "value": "pcbo"} in run_tags
        assert _count(fresh_postgres_url, "SELECT count(*) FROM runs") == 1
        assert _count(fresh_postgres_url, "SELECT count(*) FROM bulk_actions") == 1
        assert not list(Path(dep.dagster_home).glob("**/*.db")), "SQLite storage was used"

        assert_chain_never_forks(chain_events(dep.pcbo_home))
        assert (
            _count(catalog_url, "SELECT count(*) FROM audit_events WHERE event_type = 'partition_committed'")
            == 6
        )
        report = pcbo_verify(dep.env, dep.root)
        assert report["status"] == "clean", report["findings"]
        assert report["checked"]["partitions"] == 6 and set(report["checked"]["chains"]) == {"events/v1"}

"""The journal's guards against someone who can write the target database: a shadowing schema on the
role's search path, an append-only trigger whose definition was replaced under its own name, and two
deployments (two homes, two chains) writing one table with the same run id."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from pcbo_dagster_tests import sql_target_helpers as helpers
from pcbo_dagster_tests.sql_target_helpers import create_table, pcbo, query, record, run_sql, write_json

#: A schema the role searches before pg_catalog, whose views and functions stand in for the system
#: catalog's: `pg_trigger` lists every pcbo trigger (so a dropped one looks present), `pg_tables`
#: hides nothing.
SHADOW = [
    "CREATE SCHEMA shadow",
    "CREATE VIEW shadow.pg_trigger AS SELECT t.oid, t.tgrelid, t.tgname, t.tgisinternal, t.tgfoid, "
    "t.tgtype, t.tgenabled FROM pg_catalog.pg_trigger t "
    "UNION ALL SELECT 0::oid, c.oid, c.relname || '_append_only', false, 0::oid, 0::int2, 'O'::\"char\" "
    "FROM pg_catalog.pg_class c WHERE c.relname LIKE 'pcbo\\_%'",
]


@pytest.mark.postgres
def test_a_schema_earlier_on_the_search_path_does_not_shadow_the_system_catalog(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    """pcbo's statements ran under the role's search path: a schema listed before pg_catalog (an
    `ALTER DATABASE ... SET search_path`, or `$user`) put its own `pg_trigger` in front of the
    catalog's, and a dropped append-only trigger looked present to verify."""
    url = fresh_postgres_url
    database = make_url(url).database
    create_table(url)
    home = tmp_path / "home"
    req = helpers.request(url, [record(i) for i in range(1, 3)])
    assert pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home]).status == 0
    run_sql(
        url,
        *SHADOW,
        f'ALTER DATABASE "{database}" SET search_path = shadow, pg_catalog, public',
        "DROP TRIGGER pcbo_journal_append_only ON public.pcbo_journal",
    )
    verified = pcbo(["verify", "--home", home, "--target-url", url])
    assert verified.status == 1, verified.document
    missing = [
        f["where"].rsplit(" ", 1)[1]
        for f in verified.document["findings"]
        if f["kind"] == "sql_journal_trigger_missing"
    ]
    assert missing == ["pcbo_journal_append_only"], verified.document
    # An unqualified target table still resolves through the role's own search path (public here).
    again = helpers.request(url, [record(i) for i in range(1, 4)], run_id="run-2")
    run = pcbo(["execute", "--input", write_json(tmp_path / "r2.json", again), "--home", home])
    assert run.status == 0, run.stderr
    assert run.document["target"]["table"] == "public.events"
    assert query(url, "SELECT count(*) FROM public.events") == [(3,)]

"""The journal's guards against someone who can write the target database: a shadowing schema on the
role's search path, an append-only trigger whose definition was replaced under its own name, and two
deployments (two homes, two chains) writing one table with the same run id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from pcbo_dagster.core.chain_state import (
    JOURNAL_SCOPE,
    ChainState,
    SqlApply,
    SqlPartitionHistory,
    journal_key_of,
)
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
    # An execute sees it missing as verify does, and writes nothing into an unguarded journal.
    again = helpers.request(url, [record(i) for i in range(1, 4)], run_id="run-2")
    path = write_json(tmp_path / "r2.json", again)
    refused = pcbo(["execute", "--input", path, "--home", home])
    assert refused.status == 1 and "pcbo_journal_append_only: " in refused.stderr, refused.stderr
    assert query(url, "SELECT count(*) FROM public.events") == [(2,)]
    run_sql(
        url,
        "CREATE TRIGGER pcbo_journal_append_only BEFORE UPDATE OR DELETE ON public.pcbo_journal "
        "FOR EACH ROW EXECUTE FUNCTION public.pcbo_append_only()",
    )
    # An unqualified target table still resolves through the role's own search path (public here).
    run = pcbo(["execute", "--input", path, "--home", home])
    assert run.status == 0, run.stderr
    assert run.document["target"]["table"] == "public.events"
    assert query(url, "SELECT count(*) FROM public.events") == [(3,)]


#: Each dialect's ways to keep a trigger's name and change what it does.
REPLACED_TRIGGERS = {
    "sqlite": [
        (
            "pcbo_journal_no_update",
            [
                "DROP TRIGGER pcbo_journal_no_update",
                "CREATE TRIGGER pcbo_journal_no_update BEFORE UPDATE ON pcbo_journal BEGIN SELECT 1; END",
            ],
        ),
        (
            "pcbo_checkpoints_no_delete",
            [
                "DROP TRIGGER pcbo_checkpoints_no_delete",
                "CREATE TRIGGER pcbo_checkpoints_no_delete BEFORE DELETE ON pcbo_checkpoints "
                "WHEN 0 BEGIN SELECT RAISE(ABORT, 'pcbo_checkpoints is append-only'); END",
            ],
        ),
    ],
    "postgresql": [
        (
            # the one function of every trigger: its body replaced, its name kept
            "pcbo_journal_append_only",
            [
                "CREATE OR REPLACE FUNCTION public.pcbo_append_only() RETURNS trigger LANGUAGE plpgsql "
                "AS $$ BEGIN RETURN COALESCE(NEW, OLD); END $$"
            ],
        ),
        (
            "pcbo_journal_append_only",
            ["ALTER TABLE public.pcbo_journal DISABLE TRIGGER pcbo_journal_append_only"],
        ),
        (
            "pcbo_rollbacks_append_only",
            [
                "CREATE FUNCTION public.lets_through() RETURNS trigger LANGUAGE plpgsql "
                "AS $$ BEGIN RETURN COALESCE(NEW, OLD); END $$",
                "CREATE OR REPLACE TRIGGER pcbo_rollbacks_append_only BEFORE UPDATE OR DELETE "
                "ON public.pcbo_rollbacks FOR EACH ROW EXECUTE FUNCTION public.lets_through()",
            ],
        ),
        (
            "pcbo_checkpoints_append_only",
            [
                "CREATE OR REPLACE TRIGGER pcbo_checkpoints_append_only BEFORE UPDATE OR DELETE "
                "ON public.pcbo_checkpoints FOR EACH ROW WHEN (false) "
                "EXECUTE FUNCTION public.pcbo_append_only()",
            ],
        ),
        (
            # every trigger left as it is, asleep in the database's sessions (red-team finding)
            "pcbo_journal_append_only",
            [
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET session_replication_role = replica', "
                "current_database()); END $$"
            ],
        ),
        (
            # fires only in sessions whose session_replication_role is replica
            "pcbo_journal_append_only",
            ["ALTER TABLE public.pcbo_journal ENABLE REPLICA TRIGGER pcbo_journal_append_only"],
        ),
    ],
}


@pytest.mark.parametrize(
    ("dialect", "case"),
    [("sqlite", i) for i in range(len(REPLACED_TRIGGERS["sqlite"]))]
    + [
        pytest.param("postgresql", i, marks=pytest.mark.postgres)
        for i in range(len(REPLACED_TRIGGERS["postgresql"]))
    ],
)
def test_a_journal_trigger_replaced_under_its_own_name_is_a_finding(
    tmp_path: Path, dialect: str, case: int, request: pytest.FixtureRequest
) -> None:
    """verify checked the append-only triggers by name (and table) only: one re-created with another
    body, a `WHEN` that never holds, its function replaced (`CREATE OR REPLACE FUNCTION`), or
    disabled, let the journal be edited and verify stayed clean."""
    url = (
        helpers.sqlite_url(tmp_path / "target.db")
        if dialect == "sqlite"
        else request.getfixturevalue("fresh_postgres_url")
    )
    name, statements = REPLACED_TRIGGERS[dialect][case]
    create_table(url)
    home = tmp_path / "home"
    req = helpers.request(url, [record(i) for i in range(1, 3)])
    assert pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home]).status == 0
    clean = pcbo(["verify", "--home", home, "--target-url", url])
    assert clean.status == 0, clean.document
    run_sql(url, *statements)
    verified = pcbo(["verify", "--home", home, "--target-url", url])
    assert verified.status == 1, verified.document
    altered = [
        f["where"].rsplit(" ", 1)[1]
        for f in verified.document["findings"]
        if f["kind"] == "sql_journal_trigger_altered"
    ]
    assert name in altered, verified.document


@pytest.mark.postgres
def test_a_journal_made_before_the_function_pinned_its_search_path_still_checks_clean(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    """Journals created before the trigger function had `SET search_path` hold the same function
    without settings: that one is pcbo's own (its body looks nothing up), any other setting is not."""
    url = fresh_postgres_url
    create_table(url)
    home = tmp_path / "home"
    req = helpers.request(url, [record(i) for i in range(1, 3)])
    assert pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home]).status == 0
    run_sql(url, "ALTER FUNCTION public.pcbo_append_only() RESET search_path")
    assert pcbo(["verify", "--home", home, "--target-url", url]).status == 0
    # execute and rollback, which check the triggers as verify does, take it as pcbo's too
    again = helpers.request(url, [record(i) for i in range(1, 4)], run_id="run-2")
    assert pcbo(["execute", "--input", write_json(tmp_path / "r2.json", again), "--home", home]).status == 0
    rollback: list[str | Path] = ["rollback", "--home", home, "--dataset", "events", "--target-url", url]
    rollback += ["--run-id", "run-2"]
    assert pcbo(rollback).status == 0
    assert pcbo(["verify", "--home", home, "--target-url", url]).status == 0
    run_sql(url, "ALTER FUNCTION public.pcbo_append_only() SET search_path = public")
    verified = pcbo(["verify", "--home", home, "--target-url", url])
    assert {f["kind"] for f in verified.document["findings"]} == {"sql_journal_trigger_altered"}


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_deployments_writing_one_table_with_one_run_id_keep_their_own_journals(
    tmp_path: Path, dialect: str, request: pytest.FixtureRequest
) -> None:
    """The journal was keyed by run and table: a second deployment (another home, catalog and chain)
    running the same runId into the same table took the first one's entries and checkpoints for its
    own (its evaluation, resume and rollback read them). Each run's journal is now filed under its
    id and the hash of its first apply intent on its own chain."""
    url = (
        helpers.sqlite_url(tmp_path / "target.db")
        if dialect == "sqlite"
        else request.getfixturevalue("fresh_postgres_url")
    )
    create_table(url)
    empty = helpers.dump(url)
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    first = helpers.request(url, [record(i) for i in range(1, 5)])
    ran_a = pcbo(["execute", "--input", write_json(tmp_path / "a.json", first), "--home", home_a])
    assert ran_a.status == 0, ran_a.stderr
    written_a = helpers.dump(url)
    second = helpers.request(url, [record(i, amount=100 + i) for i in range(1, 5)], conflict="overwrite")
    path_b = write_json(tmp_path / "b.json", second)
    dry_b = pcbo(["dry-run", "--input", path_b])
    assert dry_b.status == 0, dry_b.stderr
    ran_b = pcbo(["execute", "--input", path_b, "--home", home_b])
    assert ran_b.status == 0, ran_b.stderr
    assert ran_b.document["totals"]["updated"] == 4, ran_b.document["totals"]
    written_b = helpers.dump(url)
    keys = sorted(r[0] for r in query(url, "SELECT DISTINCT run_id FROM pcbo_journal"))
    assert len(keys) == 2 and all(k.startswith("run-1@sha256:") for k in keys), keys
    # Each deployment's verify sees only its own run: A's rows were changed by B (a finding of A's),
    # B's are as B wrote them.
    verified_a = pcbo(["verify", "--home", home_a, "--target-url", url])
    assert {f["kind"] for f in verified_a.document["findings"]} == {"sql_rows_changed"}, verified_a.document
    verified_b = pcbo(["verify", "--home", home_b, "--target-url", url])
    assert verified_b.status == 0, verified_b.document
    # A cannot undo what B wrote over; B's rollback puts A's rows back, then A's the empty table.
    rollback = ["rollback", "--dataset", "events", "--run-id", "run-1", "--target-url", url]
    refused = pcbo([*rollback, "--home", home_a])
    assert refused.status == 1, refused.stderr
    assert helpers.dump(url) == written_b
    assert pcbo([*rollback, "--home", home_b]).status == 0
    assert helpers.dump(url) == written_a
    assert pcbo([*rollback, "--home", home_a]).status == 0
    assert helpers.dump(url) == empty
    for home in (home_a, home_b):
        verified = pcbo(["verify", "--home", home, "--target-url", url])
        assert verified.status == 0, verified.document


def test_a_run_whose_first_intent_predates_chain_keyed_journals_keeps_its_bare_run_id_key() -> None:
    """Journals written before they were keyed by chain file a run's entries under its bare id: a run
    whose first apply intent into the table has no `journal_scope` is read (and resumed, rolled back,
    verified) there; one with it under `<runId>@<that intent's hash>`; a run with no apply, nowhere."""
    target = "sqlite:////db#main.events"

    def apply(run_id: str, seq: int, scoped: bool) -> SqlApply:
        intent = {"run_id": run_id, "chain": {"seq": seq, "event_hash": f"sha256:{seq:064x}"}}
        return SqlApply(run_id, seq, {**intent, "journal_scope": JOURNAL_SCOPE} if scoped else intent)

    state = ChainState()
    state.sql[(target, "p1")] = SqlPartitionHistory(
        target, "p1", [apply("old", 0, False), apply("new", 2, True)]
    )
    state.sql[(target, "p2")] = SqlPartitionHistory(
        target, "p2", [apply("old", 1, True), apply("new", 3, True)]
    )
    assert state.sql_journal_key(target, "old") == "old"
    assert state.sql_journal_key(target, "new") == journal_key_of("new", f"sha256:{2:064x}")
    assert state.sql_journal_key(target, "other") is None
    assert state.sql_journal_key("sqlite:////elsewhere#main.events", "new") is None


def _dropping_trigger(dialect: str, table: str) -> list[str]:
    """A trigger that silently drops every row inserted into `table` (the append-only triggers guard
    UPDATE and DELETE, not this)."""
    if dialect == "sqlite":
        return [f"CREATE TRIGGER drop_rows BEFORE INSERT ON {table} BEGIN SELECT RAISE(IGNORE); END"]
    return [
        "CREATE FUNCTION public.drop_rows() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
        f"CREATE TRIGGER drop_rows BEFORE INSERT ON public.{table} "
        "FOR EACH ROW EXECUTE FUNCTION public.drop_rows()",
    ]


@pytest.mark.parametrize("table", ["pcbo_journal", "pcbo_checkpoints"])
@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_chunk_whose_journal_or_checkpoint_is_not_kept_is_not_committed(
    tmp_path: Path, dialect: str, table: str, request: pytest.FixtureRequest
) -> None:
    """A trigger that dropped the rows inserted into pcbo_journal (or pcbo_checkpoints) let a run
    change the table, exit 0, and leave changes no rollback can undo (the journal holds nothing
    of them). Each chunk now reads its journal entries and checkpoint back in its own transaction:
    the run stops (exit 1) with the table untouched, and rolls back to nothing once the trigger is gone."""
    url = (
        helpers.sqlite_url(tmp_path / "target.db")
        if dialect == "sqlite"
        else request.getfixturevalue("fresh_postgres_url")
    )
    create_table(url)
    home = tmp_path / "home"
    first = helpers.request(url, [record(i) for i in range(1, 3)])
    assert pcbo(["execute", "--input", write_json(tmp_path / "r1.json", first), "--home", home]).status == 0
    run_sql(url, *_dropping_trigger(dialect, table))
    before = helpers.dump(url)
    second = helpers.request(
        url, [record(i, amount=50) for i in range(1, 4)], run_id="run-2", conflict="overwrite"
    )
    run = pcbo(["execute", "--input", write_json(tmp_path / "r2.json", second), "--home", home])
    assert run.status == 1, run.stderr
    assert f"{table} in " in run.stderr and "the chunk was not committed" in run.stderr, run.stderr
    assert helpers.dump(url) == before
    run_sql(url, "DROP TRIGGER drop_rows" + ("" if dialect == "sqlite" else f" ON public.{table}"))
    rolled = pcbo(
        ["rollback", "--home", home, "--dataset", "events", "--run-id", "run-2", "--target-url", url]
    )
    assert rolled.status == 0, rolled.stderr
    assert pcbo(["verify", "--home", home, "--target-url", url]).status == 0


#: Per dialect, ways to take an append-only trigger away (dropped, or replaced under its name), each
#: with the statements that put pcbo's own back: (trigger, kind, statements, restoring statements).
UNGUARDING = {
    "sqlite": [
        (
            "pcbo_journal_no_delete",
            "sql_journal_trigger_missing",
            ["DROP TRIGGER pcbo_journal_no_delete"],
            [
                "CREATE TRIGGER pcbo_journal_no_delete BEFORE DELETE ON pcbo_journal "
                "BEGIN SELECT RAISE(ABORT, 'pcbo_journal is append-only'); END"
            ],
        ),
        (
            "pcbo_journal_no_update",
            "sql_journal_trigger_altered",
            REPLACED_TRIGGERS["sqlite"][0][1],
            [
                "DROP TRIGGER pcbo_journal_no_update",
                "CREATE TRIGGER pcbo_journal_no_update BEFORE UPDATE ON pcbo_journal "
                "BEGIN SELECT RAISE(ABORT, 'pcbo_journal is append-only'); END",
            ],
        ),
    ],
    "postgresql": [
        (
            "pcbo_journal_append_only",
            "sql_journal_trigger_missing",
            ["DROP TRIGGER pcbo_journal_append_only ON public.pcbo_journal"],
            [
                "CREATE TRIGGER pcbo_journal_append_only BEFORE UPDATE OR DELETE ON public.pcbo_journal "
                "FOR EACH ROW EXECUTE FUNCTION public.pcbo_append_only()"
            ],
        ),
        (
            "pcbo_checkpoints_append_only",
            "sql_journal_trigger_altered",
            REPLACED_TRIGGERS["postgresql"][3][1],
            [
                "CREATE OR REPLACE TRIGGER pcbo_checkpoints_append_only BEFORE UPDATE OR DELETE "
                "ON public.pcbo_checkpoints FOR EACH ROW EXECUTE FUNCTION public.pcbo_append_only()"
            ],
        ),
    ],
}


def _everything(url: str, home: Path) -> tuple[list[str], list[tuple[str, ...]], dict[str, bytes]]:
    """The table, pcbo's tables in it, and the audit chains of `home`: what a refusal must not change."""
    pcbo_rows = [
        tuple(str(v) for v in r)
        for t in ("pcbo_journal", "pcbo_checkpoints", "pcbo_rollbacks")
        for r in query(url, f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4")
    ]
    chains = {str(p): p.read_bytes() for p in sorted((home / "pas").rglob("*.jsonl"))}
    return helpers.dump(url), pcbo_rows, chains


@pytest.mark.parametrize(
    ("dialect", "case"),
    [("sqlite", i) for i in range(len(UNGUARDING["sqlite"]))]
    + [
        pytest.param("postgresql", i, marks=pytest.mark.postgres)
        for i in range(len(UNGUARDING["postgresql"]))
    ],
)
def test_rollback_and_resume_refuse_a_journal_whose_triggers_were_dropped_or_replaced(
    tmp_path: Path, dialect: str, case: int, request: pytest.FixtureRequest
) -> None:
    """Only verify checked the append-only triggers: pcbo rollback and a resumed (or new) execute
    relied on a journal whose triggers were dropped or replaced, which may have been edited without a
    trace. Both now check them as verify does and refuse (exit 1, naming the trigger and the
    finding) with nothing changed in the table or on the chain; with pcbo's triggers back they go on."""
    from pcbo_dagster_tests.cli_runner import run_pcbo

    url = (
        helpers.sqlite_url(tmp_path / "target.db")
        if dialect == "sqlite"
        else request.getfixturevalue("fresh_postgres_url")
    )
    name, kind, unguard, restore = UNGUARDING[dialect][case]
    create_table(url)
    home = tmp_path / "home"
    first = write_json(tmp_path / "r1.json", helpers.request(url, [record(i) for i in range(1, 3)]))
    assert pcbo(["execute", "--input", first, "--home", home]).status == 0
    # run-2 killed after its first partition's chunk: an apply to resume
    second = write_json(
        tmp_path / "r2.json",
        helpers.request(
            url, [record(i, amount=70) for i in range(1, 9)], run_id="run-2", conflict="overwrite"
        ),
    )
    crashed = run_pcbo(["execute", "--input", second], home=home, env={"PCBO_FAILPOINT": "sql_after_chunk@0"})
    assert crashed.status == 86, crashed.stderr
    run_sql(url, *unguard)
    before = _everything(url, home)
    resumed = pcbo(["execute", "--input", second, "--home", home])
    assert resumed.status == 1, resumed.stderr
    assert f"{name}: " in resumed.stderr and f"({kind})" in resumed.stderr, resumed.stderr
    assert _everything(url, home) == before
    rollback = ["rollback", "--home", home, "--dataset", "events", "--target-url", url, "--run-id"]
    for run_id in ("run-2", "run-1"):
        refused = pcbo([*rollback, run_id])
        assert refused.status == 1, refused.stderr
        assert f"refused ({kind})" in refused.stderr and f"{name}: " in refused.stderr, refused.stderr
        assert _everything(url, home) == before
    third = write_json(tmp_path / "r3.json", helpers.request(url, [record(20)], run_id="run-3"))
    assert pcbo(["execute", "--input", third, "--home", home]).status == 1
    assert _everything(url, home) == before
    run_sql(url, *restore)
    assert pcbo(["execute", "--input", second, "--home", home]).status == 0
    assert pcbo([*rollback, "run-2"]).status == 0
    assert pcbo([*rollback, "run-1"]).status == 0
    assert pcbo(["verify", "--home", home, "--target-url", url]).status == 0


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_dry_run_evaluates_against_its_own_deployments_journal(
    tmp_path: Path, dialect: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plan and dry-run had no chain: when another deployment (another home) had used the same runId
    on the same table, a dry-run (and an execute's first gate check) evaluated against that
    deployment's journal — an approved dry-run of B was A's view, and B's execute then blocked on its
    own decision hash — and with both journals there A's dry-run lost its own. A dry-run now reads its
    deployment's chain (`--home`, read only) and says which journal it used and whose the others are."""
    from pcbo_dagster.engine.backfill_commands import evaluate_request

    url = (
        helpers.sqlite_url(tmp_path / "target.db")
        if dialect == "sqlite"
        else request.getfixturevalue("fresh_postgres_url")
    )
    create_table(url)
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    path_a = write_json(tmp_path / "a.json", helpers.request(url, [record(i) for i in range(1, 5)]))
    ran_a = pcbo(["execute", "--input", path_a, "--home", home_a])
    assert ran_a.status == 0, ran_a.stderr
    [key_a] = [r[0] for r in query(url, "SELECT DISTINCT run_id FROM pcbo_journal")]
    second = helpers.request(url, [record(i, amount=100 + i) for i in range(1, 5)], conflict="overwrite")
    path_b = write_json(tmp_path / "b.json", second)
    with monkeypatch.context() as env:  # B's home from PCBO_HOME, as an execute takes it
        env.setenv("PCBO_HOME", str(home_b))
        dry_b = pcbo(["dry-run", "--input", path_b])
    assert dry_b.status == 0, dry_b.stderr
    assert not home_b.exists()  # a dry-run writes nothing
    outcomes = {o["outcome"] for p in dry_b.document["partitions"] for o in p["target"]["outcomes"]}
    assert outcomes == {"update"}, dry_b.document  # the table as it is, not as A's journal says it was
    journal = dry_b.document["targetJournal"]
    assert (journal["key"], journal["deployment"], journal["otherDeployments"]) == (
        None,
        "this-deployment",
        [key_a],
    )
    assert "written by other deployments" in journal["message"], journal
    approved = {**second, "expectedDecisionHash": dry_b.document["decisionHash"]}
    ran_b = pcbo(["execute", "--input", write_json(tmp_path / "b2.json", approved), "--home", home_b])
    assert ran_b.status == 0, ran_b.stderr
    assert ran_b.document["decisionHash"] == dry_b.document["decisionHash"]
    # A's dry-run is A's own view, its approved decision hash, with B's journal there too.
    dry_a = pcbo(["dry-run", "--input", path_a, "--home", home_a])
    assert dry_a.status == 0, dry_a.stderr
    assert dry_a.document["decisionHash"] == ran_a.document["decisionHash"]
    assert dry_a.document["targetJournal"]["key"] == key_a
    assert dry_a.document["targetJournal"]["deployment"] == "this-deployment"
    # With no chain at hand at all (no settings: the caller cannot say whose it is), it says so.
    unknown = evaluate_request(path_b.read_bytes(), tmp_path).decisions.to_json()["targetJournal"]
    assert unknown["deployment"] == "unknown" and unknown["key"] is None, unknown
    assert len(unknown["otherDeployments"]) == 2 and "none used" in unknown["message"], unknown


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_rollback_does_not_undo_rows_another_deployment_applied(
    tmp_path: Path, dialect: str, request: pytest.FixtureRequest
) -> None:
    """A rollback checked each row against its own run's journal and its own chain only: a row
    another deployment (another home) found equal since (`skip_equal`: its apply vouches for it, its
    Merkle root holds it) was as this run wrote it, so this run's rollback deleted rows under the
    other deployment's apply (its verify then found them gone). Such rows are now refused (exit 1,
    nothing changed) until that deployment's run is rolled back."""
    url = (
        helpers.sqlite_url(tmp_path / "target.db")
        if dialect == "sqlite"
        else request.getfixturevalue("fresh_postgres_url")
    )
    create_table(url)
    empty = helpers.dump(url)
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    records = [record(i) for i in range(1, 5)]
    path_a = write_json(tmp_path / "a.json", helpers.request(url, records, run_id="run-a"))
    assert pcbo(["execute", "--input", path_a, "--home", home_a]).status == 0
    path_b = write_json(tmp_path / "b.json", helpers.request(url, records, run_id="run-b"))
    ran_b = pcbo(["execute", "--input", path_b, "--home", home_b])
    assert ran_b.status == 0, ran_b.stderr
    assert (ran_b.document["totals"]["inserted"], ran_b.document["totals"]["skipped"]) == (0, 4)
    before = _everything(url, home_a)
    rollback = ["rollback", "--dataset", "events", "--target-url", url, "--run-id"]
    refused = pcbo([*rollback, "run-a", "--home", home_a])
    assert refused.status == 1, refused.stderr
    assert "sql_rows_of_another_deployment" in refused.stderr and "'ev-0002'" in refused.stderr
    assert _everything(url, home_a) == before
    assert pcbo(["verify", "--home", home_b, "--target-url", url]).status == 0
    # B's run undone first (it changed nothing), then A's undoes its rows.
    assert pcbo([*rollback, "run-b", "--home", home_b]).status == 0
    rolled = pcbo([*rollback, "run-a", "--home", home_a])
    assert rolled.status == 0, rolled.stderr
    assert helpers.dump(url) == empty
    for home in (home_a, home_b):
        verified = pcbo(["verify", "--home", home, "--target-url", url])
        assert verified.status == 0, verified.document


def test_verify_repair_completes_nothing_from_a_journal_whose_triggers_were_dropped(tmp_path: Path) -> None:
    """`verify --repair` appended a crashed apply's event from its checkpoints and journal with the
    journal's append-only triggers gone (reported, but relied on): as rollback and execute, it now
    completes nothing there until pcbo's triggers are back."""
    from pcbo_dagster_tests.cli_runner import run_pcbo

    url = helpers.sqlite_url(tmp_path / "target.db")
    name, _, unguard, restore = UNGUARDING["sqlite"][0]
    create_table(url)
    home = tmp_path / "home"
    path = write_json(
        tmp_path / "r.json", helpers.request(url, [record(i) for i in range(1, 9)], chunkRows=1)
    )
    crashed = run_pcbo(["execute", "--input", path], home=home, env={"PCBO_FAILPOINT": "sql_before_event@1"})
    assert crashed.status == 86, crashed.stderr
    run_sql(url, *unguard)
    before = _everything(url, home)
    repaired = pcbo(["verify", "--home", home, "--repair"])
    assert repaired.status == 1 and repaired.document["repaired"] == [], repaired.document
    kinds = {f["kind"] for f in repaired.document["findings"]}
    assert "sql_journal_trigger_missing" in kinds, repaired.document
    assert _everything(url, home) == before
    run_sql(url, *restore)
    repaired = pcbo(["verify", "--home", home, "--repair"])
    assert [r["kind"] for r in repaired.document["repaired"]] == ["sql_apply_event_appended"], (
        repaired.document
    )


@pytest.mark.postgres
def test_a_dry_run_reads_an_object_store_audit_chain_and_writes_nothing(
    tmp_path: Path, s3_store: Any, fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the audit backup on an object store (moto's S3), a dry-run finds the deployment's own
    journal from the chain there, reading it through a throwaway cache: nothing is written under a
    home it runs from (not even the home)."""
    import uuid

    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PCBO_AUDIT_DIR", s3_store.url(f"pas-{uuid.uuid4().hex[:8]}"))
    monkeypatch.setenv("PCBO_CATALOG_URL", fresh_postgres_url)  # an object-store audit needs one
    url = helpers.sqlite_url(tmp_path / "target.db")
    create_table(url)
    path = write_json(tmp_path / "r.json", helpers.request(url, [record(i) for i in range(1, 5)]))
    ran = pcbo(["execute", "--input", path, "--home", tmp_path / "a"])
    assert ran.status == 0, ran.stderr
    [key] = [r[0] for r in query(url, "SELECT DISTINCT run_id FROM pcbo_journal")]
    elsewhere = tmp_path / "elsewhere"
    dry = pcbo(["dry-run", "--input", path, "--home", elsewhere])
    assert dry.status == 0, dry.stderr
    assert dry.document["targetJournal"]["key"] == key, dry.document["targetJournal"]
    assert dry.document["decisionHash"] == ran.document["decisionHash"]
    assert not elsewhere.exists()

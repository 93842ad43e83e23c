"""Attacks by the owner of a SQL target's database on the target table itself and on what pcbo's
sessions see there (issue 15's threat model, second round): a column default, trigger or rule that
rewrites what an apply writes, an operator or a table standing in for the one the chain names, rows
changed after an apply. Whatever the table holds that the chain does not say was applied is a
failed read-back (the run exits 1) and a `verify` finding, never a clean report."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.targets.sql_dialects import location_of
from pcbo_dagster_tests import sql_target_helpers as helpers
from pcbo_dagster_tests.sql_target_helpers import dump, pcbo, query, record, run_sql, sqlite_url, write_json

SNAPSHOT = "2024-06-01T00:00:00Z"


def _kinds(document: dict[str, Any]) -> set[str]:
    return {f["kind"] for f in document["findings"]}


def _url(dialect: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if dialect == "sqlite":
        return sqlite_url(tmp_path / "target.db")
    return str(request.getfixturevalue("fresh_postgres_url"))


# -- what the table does to the rows an apply writes ------------------------------------------------

#: A tombstone the table puts on every row inserted (a column default), or keeps on a row an
#: `overwrite` un-deletes (a trigger): the written columns read back as the records, the row is deleted.
_TOMBSTONES = {
    ("sqlite", "default"): [
        helpers.SQLITE_TABLE.format(name="events").replace(
            "deleted_at TEXT", "deleted_at TEXT DEFAULT '2024-01-01T00:00:00Z'"
        )
    ],
    ("postgresql", "default"): [
        helpers.PG_TABLE.format(name="events").replace(
            "deleted_at timestamptz", "deleted_at timestamptz DEFAULT '2024-01-01T00:00:00Z'"
        )
    ],
    ("sqlite", "trigger"): [
        helpers.SQLITE_TABLE.format(name="events"),
        "CREATE TRIGGER keep_tombstone AFTER UPDATE ON events "
        "WHEN OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS NULL "
        "BEGIN UPDATE events SET deleted_at = OLD.deleted_at WHERE id = NEW.id; END",
    ],
    ("postgresql", "trigger"): [
        helpers.PG_TABLE.format(name="events"),
        "CREATE FUNCTION keep_tombstone() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN NEW.deleted_at := OLD.deleted_at; RETURN NEW; END $$",
        "CREATE TRIGGER keep_tombstone BEFORE UPDATE ON events "
        "FOR EACH ROW EXECUTE FUNCTION keep_tombstone()",
    ],
}


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("how", ["default", "trigger"])
def test_a_row_the_table_tombstones_as_it_is_written_does_not_read_back(
    tmp_path: Path, dialect: str, how: str, request: pytest.FixtureRequest
) -> None:
    """The read-back compared the written columns only: a row inserted with a tombstone (a column
    default), or one `overwrite` un-deleted whose tombstone a trigger kept, read back "as written" —
    the run exited 0 and `verify` was clean while the table held the record as deleted. A tombstoned
    row is not the record: the run exits 1 naming it, `verify` reports `sql_rows_changed`."""
    url = _url(dialect, tmp_path, request)
    run_sql(url, *_TOMBSTONES[(dialect, how)])
    run_sql(
        url,
        "INSERT INTO events (id, occurred_at, amount, label, deleted_at) "
        "VALUES ('ev-0002', '2024-01-01T02:02:00Z', 99, 'old', '2024-01-01T00:00:00Z')",
    )
    home = tmp_path / "home"
    target = {"deletedColumn": "deleted_at", "snapshotAt": SNAPSHOT, "conflict": "overwrite"}
    req = helpers.request(url, [record(i) for i in range(1, 5)], **target)
    run = pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home])
    assert run.status == 1, (run.status, run.stderr)
    deleted = "ev-0004" if how == "default" else "ev-0002"
    assert deleted in run.stderr and "differ from what was applied" in run.stderr, run.stderr
    found = pcbo(["verify", "--home", home, "--target-url", url])
    assert found.status == 1 and _kinds(found.document) == {"sql_rows_changed"}, found.document
    # Without the tombstone the rows are the records, and verify is clean.
    if how == "trigger":
        run_sql(url, "DROP TRIGGER keep_tombstone" + (" ON events" if dialect == "postgresql" else ""))
    run_sql(url, "UPDATE events SET deleted_at = NULL")
    clean = pcbo(["verify", "--home", home, "--target-url", url])
    assert clean.status == 0, clean.document


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_rollback_never_writes_over_an_updated_row_the_live_pipeline_wrote_since(
    tmp_path: Path, dialect: str, request: pytest.FixtureRequest
) -> None:
    """A row the run updated was compared, before its undo, on the written columns only: one the live
    pipeline wrote again since (its freshness column and its own `note` changed, the written values
    the same) was set back to its prior values, exit 0, the live pipeline's write lost. Now an updated
    row, as an inserted one, must be whole as the run left it: refused (`sql_rows_changed_since`,
    exit 1), nothing restored."""
    url = _url(dialect, tmp_path, request)
    helpers.create_table(url)
    run_sql(
        url,
        "INSERT INTO events (id, occurred_at, amount, label) "
        "VALUES ('ev-0002', '2024-01-01T02:02:00Z', 99, 'old')",
    )
    home = tmp_path / "home"
    target = {"conflict": "overwrite", "freshnessColumn": "updated_at", "snapshotAt": "2024-02-01T00:00:00Z"}
    req = helpers.request(url, [record(i) for i in range(1, 5)], **target)
    run = pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home])
    assert run.status == 0 and run.document["totals"]["updated"] == 1, run.stderr
    run_sql(
        url,
        "UPDATE events SET updated_at = '2024-03-01T00:00:00Z', note = 'written again by the live pipeline' "
        "WHERE id = 'ev-0002'",
    )
    changed = dump(url)
    args: list[str | Path] = ["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"]
    args += ["--target-url", url]
    refused = pcbo(args)
    assert refused.status == 1, (refused.status, refused.stderr)
    assert "sql_rows_changed_since" in refused.stderr and "'ev-0002'" in refused.stderr, refused.stderr
    assert dump(url) == changed


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_rollback_never_deletes_rows_of_another_table_through_a_cascading_foreign_key(
    tmp_path: Path, dialect: str, request: pytest.FixtureRequest
) -> None:
    """The undo of a row the run inserted is a DELETE: a foreign key of another table referencing it
    `ON DELETE CASCADE` took the live pipeline's rows there with it (exit 0; the journal holds nothing
    of them, so nothing could put them back). Such a rollback is now refused (`sql_rows_referenced`,
    exit 1, naming the table), nothing deleted; the partitions whose rows nothing references still
    roll back."""
    url = _url(dialect, tmp_path, request)
    helpers.create_table(url)
    home = tmp_path / "home"
    req = helpers.request(url, [record(i) for i in range(1, 5)])
    assert pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home]).status == 0
    run_sql(
        url,
        "CREATE TABLE notes (n text PRIMARY KEY, event_id text REFERENCES events (id) ON DELETE CASCADE)",
        "INSERT INTO notes VALUES ('written by the live pipeline', 'ev-0001')",
    )
    written = dump(url)
    args: list[str | Path] = ["rollback", "--home", home, "--dataset", "events", "--target-url", url]
    refused = pcbo([*args, "--run-id", "run-1"])
    assert refused.status == 1, (refused.status, refused.stderr)
    assert "sql_rows_referenced" in refused.stderr and "notes" in refused.stderr, refused.stderr
    assert dump(url) == written and query(url, "SELECT count(*) FROM notes") == [(1,)]
    other = pcbo([*args, "--partition", "20240101T020000Z"])
    assert other.status == 0, other.stderr


# -- what pcbo's sessions see ------------------------------------------------------------------------

#: An `=` for (oid, regclass) in `public`: an exact match wins over `pg_catalog`'s oid = oid (which
#: needs a cast) whatever the search path's order, so `c.oid = to_regclass('"public"."events"')`
#: finds the decoy: a table beside the real one, with the journal beside them both.
_DECOY = [
    "CREATE TABLE public.decoy (LIKE public.events INCLUDING ALL)",
    "CREATE FUNCTION public.oid_eq_regclass(a oid, b regclass) RETURNS bool LANGUAGE sql AS $$ "
    "SELECT CASE WHEN b::oid = 'public.events'::regclass::oid THEN a = 'public.decoy'::regclass::oid "
    "ELSE a = b::oid END $$",
    "CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regclass, FUNCTION = public.oid_eq_regclass)",
]


@pytest.mark.postgres
def test_an_operator_of_the_targets_schema_cannot_point_verify_or_rollback_at_another_table(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    """pcbo's catalog reads ran under the pinned path (`pg_catalog` first, then the role's schemas):
    an operator in `public` with the exact argument types won over the catalog's, so the table the
    chain records resolved to a decoy beside it. `verify` then checked the decoy (no history there:
    zero partitions, clean) while the real table's rows had been changed. The catalog reads now search
    `pg_catalog` only, and a table that resolves to another than the recorded one is refused."""
    url = fresh_postgres_url
    helpers.create_table(url)
    home = tmp_path / "home"
    req = helpers.request(url, [record(i) for i in range(1, 5)])
    assert pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home]).status == 0
    run_sql(url, "UPDATE events SET amount = 1000 WHERE id = 'ev-0001'", *_DECOY)
    found = pcbo(["verify", "--home", home, "--target-url", url])
    assert found.status == 1 and _kinds(found.document) == {"sql_rows_changed"}, found.document
    assert found.document["checked"]["partitions"] == 4
    changed = dump(url)
    refused = pcbo(
        ["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1", "--target-url", url]
    )
    assert refused.status == 1 and "sql_rows_changed_since" in refused.stderr, refused.stderr
    assert dump(url) == changed


@pytest.mark.postgres
def test_a_trigger_cannot_change_how_pcbo_reads_the_rows_it_checks(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    """pcbo's session settings (shortest exact floats, UTC, ISO dates, the pinned path) were set as
    the session connected: a trigger on the table, run in pcbo's own transaction, could change them
    (`set_config('extra_float_digits', '-15', true)`) before pcbo read back what it had just done.
    One that skipped the restoring UPDATE and rounded the floats read after it made the run's
    0.10000000000000002 read as the prior 0.1: the rollback said the row was back, exit 0, the chain
    recorded it undone, and verify was clean while the table held the run's value. Every read of rows
    now sets the session's settings again first: refused (`sql_restore_ineffective`), nothing recorded."""
    url = fresh_postgres_url
    run_sql(
        url,
        helpers.PG_TABLE.format(name="events").replace("amount integer CHECK (amount >= 0)", "amount float8"),
        "INSERT INTO events (id, occurred_at, amount, label) "
        "VALUES ('ev-0002', '2024-01-01T02:02:00Z', 0.1, 'x')",
    )
    records = [record(i, amount=1) for i in range(1, 5)]
    records[1]["amount"] = 0.10000000000000002
    home = tmp_path / "home"
    req = helpers.request(url, records, conflict="overwrite")
    run = pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home])
    assert run.status == 0 and run.document["totals"]["updated"] == 1, run.stderr
    run_sql(
        url,
        "CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM pg_catalog.set_config('extra_float_digits', '-15', true); RETURN NULL; END $$",
        "CREATE TRIGGER keep BEFORE UPDATE ON events FOR EACH ROW EXECUTE FUNCTION keep()",
    )
    written = dump(url)
    args: list[str | Path] = ["rollback", "--home", home, "--dataset", "events", "--target-url", url]
    refused = pcbo([*args, "--partition", "20240101T020000Z"])
    assert refused.status == 1 and "not back as they were" in refused.stderr, (refused.status, refused.stderr)
    assert dump(url) == written
    chain = (home / "pas" / "events" / "v1.jsonl").read_text()
    assert "sql_rollback_intent" not in chain and "sql_partition_rolled_back" not in chain


# -- a SQLite target's files ---------------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["directory", "counter"])
def test_a_symbolic_link_in_a_sqlite_targets_lock_directory_is_never_written_through(
    tmp_path: Path, planted: str
) -> None:
    """The ticket queue beside a SQLite target (`<file>.pcbo-locks/<scope>/counter`, its tickets) was
    made and written through whatever stood at those names: whoever may write the database's
    directory could put a symbolic link there and have the run write its counter into a file of
    pcbo's own (an empty one gets `00000000000000000001`) or create its files in a directory of
    theirs. A lock directory or file that is a symbolic link now stops the run (exit 1, naming it),
    nothing written through it and nothing applied."""
    url = sqlite_url(tmp_path / "db" / "target.db")
    helpers.create_table(url)
    victim = tmp_path / "home" / "victim"
    victim.mkdir(parents=True)
    locks = tmp_path / "db" / "target.db.pcbo-locks"
    if planted == "directory":
        locks.symlink_to(victim)
    else:
        scope = hashlib.sha256(f"events|{location_of(url)}|main.events".encode()).hexdigest()[:32]
        (locks / scope).mkdir(parents=True)
        (victim / "file").write_bytes(b"")
        (locks / scope / "counter").symlink_to(victim / "file")
    before = dump(url)
    req = helpers.request(url, [record(i) for i in range(1, 5)])
    run = pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", tmp_path / "home"])
    assert run.status == 1, (run.status, run.stderr)
    assert "symbolic link" in run.stderr and str(locks) in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert dump(url) == before
    assert [p.name for p in victim.rglob("*")] == ([] if planted == "directory" else ["file"])
    assert planted == "directory" or (victim / "file").read_bytes() == b""
    # With the link gone, the same request runs.
    if planted == "directory":
        locks.unlink()
    else:
        shutil.rmtree(locks)
    again = pcbo(["execute", "--input", tmp_path / "r.json", "--home", tmp_path / "home"])
    assert again.status == 0, again.stderr

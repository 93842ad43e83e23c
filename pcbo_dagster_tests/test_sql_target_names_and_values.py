"""A SQL target's names and values as a hostile or careless request gives them: a table that is pcbo's
own bookkeeping, a URL that does not parse, values whose column stores them in another form. Each is
refused before anything is written (exit 2 naming the field) or written so it reads back as written."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from pcbo_dagster_tests import sql_target_helpers as helpers
from pcbo_dagster_tests.sql_target_helpers import (
    create_table,
    dump,
    pcbo,
    query,
    record,
    request,
    run_sql,
    sqlite_url,
    write_json,
)


def _dry_run_and_execute(path: Path, home: Path) -> list[list[str | Path]]:
    return [["dry-run", "--input", path], ["execute", "--input", path, "--home", home]]


def _chain_bytes(home: Path) -> bytes:
    return (home / "pas" / "events" / "v1.jsonl").read_bytes()


@pytest.mark.parametrize(
    "table", ["pcbo_rollbacks", "pcbo_checkpoints", "pcbo_journal", "main.pcbo_rollbacks"]
)
def test_a_request_cannot_target_pcbos_own_journal_tables(tmp_path: Path, table: str) -> None:
    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    home = tmp_path / "home"
    first = pcbo(
        ["execute", "--input", write_json(tmp_path / "r.json", request(url, [record(1)])), "--home", home]
    )
    assert first.status == 0, first.stderr
    # A "backfill" of pcbo_rollbacks: one row saying run-1's apply was undone (a forged marker, written
    # by pcbo itself); of the journal or checkpoints: entries no apply of theirs made.
    forged = {
        **record(1),
        "id": "run-1",
        "tableName": "main.events",
        "partitionKey": "20240101T010000Z",
        "intentSeq": 1,
        "journalDigest": "sha256:00",
        "restored": 1,
    }
    req = request(url, [forged], run_id="run-evil", table=table)
    req["target"]["key"] = ["run_id", "table_name", "partition_key", "intent_seq"]
    req["target"]["columns"] = {
        "id": "run_id",
        "tableName": "table_name",
        "partitionKey": "partition_key",
        "intentSeq": "intent_seq",
        "journalDigest": "journal_digest",
        "restored": "restored",
    }
    before = {
        t: query(url, f"SELECT * FROM {t}") for t in ("pcbo_rollbacks", "pcbo_checkpoints", "pcbo_journal")
    }
    chain = _chain_bytes(home)
    path = write_json(tmp_path / "evil.json", req)
    for args in _dry_run_and_execute(path, home):
        run = pcbo(args)
        assert run.status == 2, (args[0], run.status, run.stderr)
        assert "invalid input: target.table:" in run.stderr and "pcbo's own" in run.stderr, run.stderr
    after = {
        t: query(url, f"SELECT * FROM {t}") for t in ("pcbo_rollbacks", "pcbo_checkpoints", "pcbo_journal")
    }
    assert after == before
    assert _chain_bytes(home) == chain
    assert pcbo(["verify", "--home", home]).status == 0


def test_a_request_cannot_backfill_pcbos_catalog(tmp_path: Path) -> None:
    """The catalog as a target: a "backfill" of `api_tokens` would mint an admin token of the HTTP
    API (pcbo serve honours any row whose hash matches), of `runs` or `partitions` a forged history."""
    from pcbo_dagster.catalog import CatalogStore
    from pcbo_dagster.catalog.server_records import token_digest

    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    home = tmp_path / "home"
    first = pcbo(
        ["execute", "--input", write_json(tmp_path / "r.json", request(url, [record(1)])), "--home", home]
    )
    assert first.status == 0, first.stderr
    catalog = f"sqlite:///{home / 'catalog.db'}"
    secret = "pcbo_not_issued_by_anyone"
    minted = {
        **record(1),
        "id": "minted",
        "subject": "x",
        "scopes": '["admin"]',
        "tokenHash": token_digest(secret),
    }
    req = request(catalog, [minted], run_id="run-mint", table="api_tokens")
    req["target"]["key"] = ["token_id"]
    req["target"]["columns"] = {
        "id": "token_id",
        "subject": "subject",
        "scopes": "scopes",
        "tokenHash": "token_hash",
        "occurredAt": "created_at",
    }
    chain = _chain_bytes(home)
    path = write_json(tmp_path / "mint.json", req)
    for args in _dry_run_and_execute(path, home):
        run = pcbo(args)
        assert run.status == 2, (args[0], run.status, run.stderr)
        assert "invalid input: target.table: api_tokens is a table of pcbo's catalog" in run.stderr, (
            run.stderr
        )
    assert query(catalog, "SELECT count(*) FROM api_tokens") == [(0,)]
    assert query(catalog, "SELECT count(*) FROM sqlite_master WHERE name LIKE 'pcbo_%'") == [(0,)]
    assert CatalogStore(catalog).token_for_secret(secret) is None
    assert _chain_bytes(home) == chain


@pytest.mark.postgres
def test_instants_into_a_postgresql_text_column_read_back_as_written(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    """A `text` column holds instants (the capability check says so): they are written as the
    canonical text the records have, so the read-back, verify and rollback find them (they were
    written as `timestamptz` cast to text, `2024-01-01 01:01:00+00`, and every apply failed its
    read-back after writing)."""
    url = fresh_postgres_url
    run_sql(
        url,
        "CREATE TABLE events (id text, occurred_at text NOT NULL, amount integer, label text, "
        "PRIMARY KEY (id, occurred_at))",
    )
    home = tmp_path / "home"
    for run_id, records in (("run-one", [record(1)]), ("run-many", [record(i) for i in range(2, 10)])):
        req = request(url, records, run_id=run_id, key=["id", "occurred_at"])
        run = pcbo(["execute", "--input", write_json(tmp_path / f"{run_id}.json", req), "--home", home])
        assert run.status == 0, run.stderr
        assert run.document["reconciliation"]["status"] == "ok", run.document["reconciliation"]
    assert query(url, "SELECT id, occurred_at FROM events ORDER BY id")[:2] == [
        ("ev-0001", "2024-01-01T01:01:00Z"),
        ("ev-0002", "2024-01-01T02:02:00Z"),
    ]
    verified = pcbo(["verify", "--home", home, "--target-url", url])
    assert verified.status == 0, verified.document
    undone = pcbo(
        ["rollback", "--home", home, "--dataset", "events", "--run-id", "run-many", "--target-url", url]
    )
    assert undone.status == 0, undone.stderr
    assert query(url, "SELECT id FROM events") == [("ev-0001",)]


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://loader:Hunter2Secret@db.internal:notaport/warehouse",
        "postgresql://loader:Hunter2Secret@[::1/warehouse",
    ],
)
def test_a_target_url_that_does_not_parse_is_invalid_input(tmp_path: Path, url: str) -> None:
    path = write_json(tmp_path / "r.json", request(url, [record(1)]))
    for args in _dry_run_and_execute(path, tmp_path / "home"):
        run = pcbo(args)
        assert run.status == 2, (args[0], run.status, run.stderr)
        assert "invalid input: target.url:" in run.stderr, run.stderr
        assert "Hunter2Secret" not in run.stderr and "internal error" not in run.stderr
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_rollback_the_table_silently_ignores_is_refused_not_recorded(
    tmp_path: Path, dialect: str, request: pytest.FixtureRequest
) -> None:
    """A trigger that skips DELETE and UPDATE (SQLite `RAISE(IGNORE)`; PostgreSQL a soft-delete rule
    `DO INSTEAD` and a trigger returning NULL) made the restoring statements change nothing: the
    rollback still said `rolled_back`, the chain recorded the rows restored, verify was clean, and the
    table kept every row the run wrote. The restore is now checked in its own transaction."""
    if dialect == "sqlite":
        url = sqlite_url(tmp_path / "target.db")
        ignore = [
            "CREATE TRIGGER keep_rows BEFORE DELETE ON events BEGIN SELECT RAISE(IGNORE); END",
            "CREATE TRIGGER keep_values BEFORE UPDATE ON events BEGIN SELECT RAISE(IGNORE); END",
        ]
        unignore = ["DROP TRIGGER keep_rows", "DROP TRIGGER keep_values"]
    else:
        url = request.getfixturevalue("fresh_postgres_url")
        ignore = [
            "CREATE RULE soft_delete AS ON DELETE TO events DO INSTEAD "
            "UPDATE events SET deleted_at = now() WHERE id = OLD.id",
            "CREATE FUNCTION keep_values() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN IF NEW.deleted_at IS NULL THEN RETURN NULL; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER keep_values BEFORE UPDATE ON events FOR EACH ROW EXECUTE FUNCTION keep_values()",
        ]
        unignore = ["DROP RULE soft_delete ON events", "DROP TRIGGER keep_values ON events"]
    create_table(url)
    run_sql(
        url,
        "INSERT INTO events (id, occurred_at, amount, label) "
        "VALUES ('ev-0002', '2024-01-01T02:02:00Z', 99, 'old')",
    )
    before = dump(url)
    home = tmp_path / "home"
    req = helpers.request(url, [record(i) for i in range(1, 5)], conflict="overwrite")
    run = pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home])
    assert run.status == 0, run.stderr
    written = dump(url)
    run_sql(url, *ignore)
    args: list[str | Path] = [
        "rollback",
        "--home",
        home,
        "--dataset",
        "events",
        "--run-id",
        "run-1",
        "--target-url",
        url,
    ]
    refused = pcbo(args)
    assert refused.status == 1, (refused.status, refused.document)
    assert "not back as they were" in refused.stderr, refused.stderr
    assert dump(url) == written
    assert "sql_rollback_intent" not in _chain_bytes(home).decode()  # refused before it: nothing written
    assert query(url, "SELECT count(*) FROM pcbo_rollbacks") == [(0,)]
    # Without the trigger, the same rollback completes, and the table is back as it was.
    run_sql(url, *unignore)
    again = pcbo(args)
    assert again.status == 0 and again.document["rolledBack"] == 4, again.stderr
    assert dump(url) == before
    assert pcbo(["verify", "--home", home, "--target-url", url]).status == 0


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
@pytest.mark.parametrize(
    "live_change",
    [
        "UPDATE events SET note = 'kept by the live pipeline', updated_at = '2024-03-01T00:00:00Z' "
        "WHERE id = 'ev-0001'",
        # deleted and written again by someone else: the same written values, its own other columns
        "DELETE FROM events WHERE id = 'ev-0001'; INSERT INTO events (id, occurred_at, amount, label, note) "
        "VALUES ('ev-0001', '2024-01-01T01:01:00Z', 1, 'x', 'written by someone else')",
    ],
)
def test_a_rollback_never_deletes_an_inserted_row_the_live_pipeline_changed_since(
    tmp_path: Path, dialect: str, live_change: str, request: pytest.FixtureRequest
) -> None:
    """A row the run inserted is undone by DELETE, which takes every column with it: a row whose
    other columns (`note`, `updated_at`) the live pipeline changed since, or that someone else wrote
    again with the same key and written values, is no longer the row the run inserted. It was
    deleted (exit 0), the live pipeline's data with it."""
    if dialect == "sqlite":
        url = sqlite_url(tmp_path / "target.db")
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    create_table(url)
    home = tmp_path / "home"
    req = helpers.request(url, [record(i) for i in range(1, 5)])
    assert pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home]).status == 0
    for statement in live_change.split("; "):
        run_sql(url, statement)
    changed = dump(url)
    args: list[str | Path] = [
        "rollback",
        "--home",
        home,
        "--dataset",
        "events",
        "--run-id",
        "run-1",
        "--target-url",
        url,
    ]
    refused = pcbo(args)
    assert refused.status == 1, (refused.status, refused.document)
    assert "sql_rows_changed_since" in refused.stderr and "'ev-0001'" in refused.stderr, refused.stderr
    assert dump(url) == changed
    # The partitions it did not touch are still undone one by one.
    other = pcbo([*args[:-4], "--partition", "20240101T020000Z", "--target-url", url])
    assert other.status == 0, other.stderr
    assert [r for r in dump(url) if "ev-0002" in r] == []


@pytest.mark.postgres
def test_a_server_named_in_the_url_query_is_the_location_the_chain_records(
    tmp_path: Path, fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq's URI form `postgresql://user@/db?host=H&port=P` (the documented one for a socket
    directory) was recorded as `postgresql:///db`: the chain lost which server the rows went to, so
    verify and rollback went to the default server (unreachable here; another cluster's database of
    the same name elsewhere), and tables of two servers were one target."""
    from sqlalchemy.engine import make_url

    server = make_url(fresh_postgres_url)
    url = f"postgresql://{server.username}@/{server.database}?host={server.host}&port={server.port}"
    create_table(fresh_postgres_url)
    home = tmp_path / "home"
    run = pcbo(
        [
            "execute",
            "--input",
            write_json(tmp_path / "r.json", helpers.request(url, [record(1)])),
            "--home",
            home,
        ]
    )
    assert run.status == 0, run.stderr
    where = f"postgresql://{server.host}:{server.port}/{server.database}"
    assert run.document["partitions"][0]["target"] == f"{where}#public.events"
    monkeypatch.setenv("PGUSER", str(server.username))  # libpq's user: no --target-url needed
    verified = pcbo(["verify", "--home", home])
    assert verified.status == 0, verified.document
    socket = "postgresql://loader@/warehouse?host=/var/run/postgresql&sslmode=require&password=x"
    from pcbo_dagster.targets.sql_dialects import location_of

    assert location_of(socket) == "postgresql:///warehouse?host=/var/run/postgresql"


def test_a_target_path_holding_a_line_break_cannot_inject_sql_into_the_rollback_script(
    tmp_path: Path,
) -> None:
    """The rollback script names the target's location in a comment; a SQLite file in a directory
    called `t<newline>DROP TABLE keep;--` turned that comment's second line into a statement, run by
    the DBA who applies the script (`sqlite3 target.db < rollback_<runId>.sql`). A target URL holding
    a control character, as written or percent-encoded, is invalid input."""
    target = sqlite_url(tmp_path / "t\nDROP TABLE keep;--" / "target.db")
    create_table(target)
    run_sql(target, "CREATE TABLE keep (x)")
    for url in (target, f"sqlite:///{tmp_path}/t%0ADROP%20TABLE%20keep;--/target.db"):
        path = write_json(tmp_path / "r.json", helpers.request(url, [record(1)]))
        for args in _dry_run_and_execute(path, tmp_path / "home"):
            run = pcbo(args)
            assert run.status == 2, (args[0], run.status, run.stderr)
            assert "invalid input: target.url: holds a control character" in run.stderr, run.stderr
        assert not (tmp_path / "home").exists()
    assert query(target, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name") == [
        ("events",),
        ("keep",),
    ]


SQLITE_KEY_NO_LONGER_UNIQUE = [
    "CREATE TABLE events2 (id TEXT, occurred_at TEXT NOT NULL, amount INTEGER, label TEXT, updated_at TEXT, "
    "deleted_at TEXT, note TEXT)",
    "INSERT INTO events2 VALUES ('ev-0001', '2024-01-01T01:01:00Z', 999, 'forged', NULL, NULL, 'x')",
    "INSERT INTO events2 SELECT * FROM events",
    "DROP TABLE events",
    "ALTER TABLE events2 RENAME TO events",
]
# an inheriting table holds the row as written; the table's own row is changed (`SELECT ... FROM events`
# reads both, the child's last)
POSTGRESQL_ROW_IN_A_CHILD = [
    "CREATE TABLE events_more () INHERITS (events)",
    "INSERT INTO events_more SELECT * FROM ONLY events WHERE id = 'ev-0001'",
    "UPDATE ONLY events SET amount = 999, label = 'forged' WHERE id = 'ev-0001'",
]


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_second_row_with_an_applied_key_does_not_pass_the_read_back(
    tmp_path: Path, dialect: str, request: pytest.FixtureRequest
) -> None:
    """The read-back kept the last row read for each key: a table rebuilt without its unique key
    (SQLite), or an inheriting table (PostgreSQL), let a changed row sit beside one as written, and
    verify was clean. A key that names more than one row is not the row the backfill wrote: found,
    and never written over or deleted."""
    if dialect == "sqlite":
        url, forge = sqlite_url(tmp_path / "target.db"), SQLITE_KEY_NO_LONGER_UNIQUE
    else:
        url, forge = request.getfixturevalue("fresh_postgres_url"), POSTGRESQL_ROW_IN_A_CHILD
    create_table(url)
    home = tmp_path / "home"
    req = helpers.request(url, [record(i) for i in range(1, 5)], conflict="overwrite")
    assert pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home]).status == 0
    run_sql(url, *forge)
    verified = pcbo(["verify", "--home", home, "--target-url", url])
    assert verified.status == 1, verified.document
    findings = [(f["kind"], f["detail"]) for f in verified.document["findings"]]
    assert [kind for kind, _ in findings] == ["sql_rows_changed"], findings
    assert "ev-0001" in findings[0][1]
    # Neither a rollback nor another run writes over (or deletes) a key that names two rows.
    rolled = pcbo(
        ["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1", "--target-url", url]
    )
    assert rolled.status == 1 and "'ev-0001'" in rolled.stderr, rolled.stderr
    again = helpers.request(url, [record(1, amount=7)], run_id="run-2", conflict="overwrite")
    run = pcbo(["execute", "--input", write_json(tmp_path / "r2.json", again), "--home", home])
    if dialect == "sqlite":  # the rebuilt table has no unique key: refused before anything is read
        assert run.status == 2 and "invalid input: target.key:" in run.stderr, run.stderr
    else:
        assert run.status == 0, run.stderr
        failures = [f for p in run.document["partitions"] for f in p["failures"]]
        assert [(f["id"], f["error"]) for f in failures] == [("ev-0001", "the key names more than one row")]
    assert sorted(r[0] for r in query(url, "SELECT amount FROM events WHERE id = 'ev-0001'")) == [1, 999]


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_journal_trigger_moved_to_another_table_is_missing(
    tmp_path: Path, dialect: str, request: pytest.FixtureRequest
) -> None:
    """verify looked the append-only triggers up by name only: one dropped from pcbo_journal and
    created again, same name, on a decoy table left the journal editable and verify clean."""
    if dialect == "sqlite":
        url = sqlite_url(tmp_path / "target.db")
        move = [
            "DROP TRIGGER pcbo_journal_no_update",
            "CREATE TABLE decoy (x)",
            "CREATE TRIGGER pcbo_journal_no_update BEFORE UPDATE ON decoy BEGIN SELECT 1; END",
        ]
    else:
        url = request.getfixturevalue("fresh_postgres_url")
        move = [
            "DROP TRIGGER pcbo_journal_append_only ON pcbo_journal",
            "CREATE TABLE decoy (x int)",
            "CREATE TRIGGER pcbo_journal_append_only BEFORE UPDATE ON decoy "
            "FOR EACH ROW EXECUTE FUNCTION pcbo_append_only()",
        ]
    create_table(url)
    home = tmp_path / "home"
    req = helpers.request(url, [record(i) for i in range(1, 3)])
    assert pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home]).status == 0
    run_sql(url, *move)
    verified = pcbo(["verify", "--home", home, "--target-url", url])
    assert verified.status == 1, verified.document
    missing = [
        f["where"] for f in verified.document["findings"] if f["kind"] == "sql_journal_trigger_missing"
    ]
    assert [w.rsplit(" ", 1)[1] for w in missing] == [move[0].split()[2]], verified.document


@pytest.mark.postgres
def test_numbers_into_a_postgresql_numeric_column_are_stored_exactly(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    """`numeric` holds the run's numbers exactly (the capability check says so), but a float bound
    as double precision and cast to numeric keeps 15 significant digits: 0.30000000000000004 was
    stored as 0.3 by an INSERT or UPDATE (a COPY of a many-row chunk parsed the text exactly), and
    the execute failed its read-back after writing."""
    url = fresh_postgres_url
    run_sql(
        url,
        "CREATE TABLE events (id text PRIMARY KEY, occurred_at timestamptz NOT NULL, amount numeric, "
        "label text)",
        "INSERT INTO events VALUES ('ev-0002', '2024-01-01T02:02:00Z', 2, 'x')",
    )
    values = {1: 0.30000000000000004, 2: 2.0000000000000004, 3: 1.5, 7: 123456.78901234567}
    records = [{**record(i), "amount": amount} for i, amount in values.items()]
    home = tmp_path / "home"
    req = helpers.request(url, records, conflict="overwrite")  # one row per partition: INSERT, UPDATE
    run = pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home])
    assert run.status == 0, run.stderr
    stored = dict(query(url, "SELECT id, amount::text FROM events"))
    assert stored == {f"ev-{i:04d}": repr(amount) for i, amount in values.items()}
    assert pcbo(["verify", "--home", home, "--target-url", url]).status == 0


def test_a_nul_in_a_prior_value_cannot_inject_sql_into_the_sqlite_rollback_script(tmp_path: Path) -> None:
    """The SQLite rollback script wrote a prior text value as a plain '...' literal with the raw byte;
    one holding a NUL (which SQLite stores in text) is cut there by the `sqlite3` shell, so the literal
    no longer ends where pcbo wrote it: the script failed with a parse error (and what follows the cut,
    here the undo of a row whose id the archive chose, is read as SQL). A text holding a NUL is written
    as literals joined with `char(0)`, and the script restores the table exactly as `pcbo rollback`."""
    sqlite3_shell = shutil.which("sqlite3")
    if sqlite3_shell is None:
        pytest.skip("the sqlite3 shell is not installed")
    db = tmp_path / "target.db"
    url = sqlite_url(db)
    create_table(url)
    run_sql(url, "CREATE TABLE keep (x)")
    with sqlite3.connect(db) as conn:  # a live row whose label holds a NUL, as a pipeline may write
        conn.execute(
            "INSERT INTO events (id, occurred_at, amount, label) VALUES (?, ?, ?, ?)",
            ("ev-0001", "2024-01-01T01:01:00Z", 5, "a\x00b"),
        )
    before = dump(url)
    hostile = {**record(1), "id": " WHERE 0; DROP TABLE keep; --"}  # undone just after ev-0001
    req = request(url, [record(1), hostile], conflict="overwrite")
    home = tmp_path / "home"
    run = pcbo(["execute", "--input", write_json(tmp_path / "r.json", req), "--home", home])
    assert run.status == 0, run.stderr
    assert run.document["totals"]["updated"] == 1 and run.document["totals"]["inserted"] == 1
    script = home / "rollback_scripts" / "rollback_run-1.sql"
    assert b"\x00" not in script.read_bytes()
    shutil.copy(db, tmp_path / "scripted.db")
    ran = subprocess.run(
        [sqlite3_shell, "-bail", str(tmp_path / "scripted.db")],
        stdin=script.open("rb"),
        capture_output=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    scripted = sqlite_url(tmp_path / "scripted.db")
    assert query(scripted, "SELECT name FROM sqlite_master WHERE name = 'keep'") == [("keep",)]
    assert dump(scripted) == before
    rolled = pcbo(["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"])
    assert rolled.status == 0, rolled.stderr
    assert dump(url) == before == dump(scripted)


@pytest.mark.postgres
def test_a_key_postgresql_cannot_hold_is_an_invalid_key_not_a_failed_run(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    """A record whose id holds a NUL (PostgreSQL text cannot) stopped the dry-run and the execute with
    the driver's `PostgreSQL text fields cannot contain NUL (0x00) bytes` (exit 1) while its live row
    was looked up, the other records with it. Like a null key, it cannot name a row: `invalid_key`,
    listed as a failure, the others applied."""
    url = fresh_postgres_url
    create_table(url)
    records = [record(1), {**record(2), "id": "ev-\x00-0002"}, record(3)]
    path = write_json(tmp_path / "r.json", helpers.request(url, records))
    dry = pcbo(["dry-run", "--input", path])
    assert dry.status == 0, dry.stderr
    outcomes = {o["id"]: o["outcome"] for p in dry.document["partitions"] for o in p["target"]["outcomes"]}
    assert outcomes == {"ev-0001": "insert", "ev-\x00-0002": "invalid_key", "ev-0003": "insert"}
    home = tmp_path / "home"
    run = pcbo(["execute", "--input", path, "--home", home])
    assert run.status == 0, run.stderr
    failures = [(f["id"], f["code"], f["error"]) for p in run.document["partitions"] for f in p["failures"]]
    assert failures == [("ev-\x00-0002", "pcbo", "key column 'id' holds a NUL, which PostgreSQL text cannot")]
    assert query(url, "SELECT id FROM events ORDER BY id") == [("ev-0001",), ("ev-0003",)]
    assert pcbo(["verify", "--home", home, "--target-url", url]).status == 0

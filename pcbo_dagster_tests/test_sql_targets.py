"""SQL tables as backfill targets (issue 15), against a real PostgreSQL server (started by the tests)
and real SQLite files: the conflict matrix, the row-by-row fallback, the freshness and deletion gates
in dry-run and execute, the decision hash pinning the live table, rollback to the exact prior table,
the rollback script applied by psql, verify, and bad targets refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.catalog import CatalogStore
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


def _execute(tmp_path: Path, req: dict, home: str = "home", *extra: str | Path):
    path = write_json(tmp_path / f"{req['runId']}-{home}.json", req)
    return pcbo(["execute", "--input", path, "--home", tmp_path / home, *extra])


def _dry_run(tmp_path: Path, req: dict):
    path = write_json(tmp_path / "dry-run.json", req)
    return pcbo(["dry-run", "--input", path])


def _outcomes(document: dict) -> dict[str, str]:
    return {o["id"]: o["outcome"] for p in document["partitions"] for o in p["target"]["outcomes"]}


def _chain_types(home: Path) -> list[str]:
    lines = (home / "pas" / "events" / "v1.jsonl").read_text().splitlines()
    return [json.loads(line)["event_type"] for line in lines]


# -- the conflict matrix ------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("conflict", ["skip", "overwrite", "fail"])
def test_each_conflict_policy(tmp_path: Path, fresh_postgres_url: str, conflict: str) -> None:
    url = fresh_postgres_url
    create_table(url)
    run_sql(
        url,
        "INSERT INTO events (id, occurred_at, amount, label) VALUES "
        "('ev-0001', '2024-01-01T01:01:00Z', 1, 'x'), ('ev-0002', '2024-01-01T02:02:00Z', 99, 'live')",
    )
    before = dump(url)
    records = [record(i) for i in range(1, 7)]
    run = _execute(tmp_path, request(url, records, conflict=conflict))
    if conflict == "fail":
        assert run.status == 3, run.stderr
        assert run.document["gate"] == "conflict"
        assert run.document["conflicts"] == [
            {"partition": "20240101T020000Z", "id": "ev-0002", "outcome": "conflict"}
        ]
        assert dump(url) == before  # nothing written
        assert not (tmp_path / "home").exists()
        return
    assert run.status == 0, run.stderr
    totals = run.document["totals"]
    assert (totals["inserted"], totals["failed"], totals["refused"]) == (4, 0, 0)
    amounts = dict(query(url, "SELECT id, amount FROM events"))
    if conflict == "skip":
        assert (totals["updated"], totals["skipped"]) == (0, 2)
        assert amounts["ev-0002"] == 99
    else:
        assert (totals["updated"], totals["skipped"]) == (1, 1)
        assert amounts["ev-0002"] == 2
    assert amounts["ev-0001"] == 1 and len(amounts) == 6
    # The Merkle root covers the ids now in the table as the records have them.
    applied = sorted(i for i in amounts if conflict == "overwrite" or i != "ev-0002")
    assert sum(p["recordCount"] for p in run.document["partitions"]) == len(applied)
    assert run.document["reconciliation"]["status"] == "ok"
    # Re-executing the same request writes nothing new.
    again = _execute(tmp_path, request(url, records, conflict=conflict))
    assert again.status == 0 and again.document["status"] == "unchanged"
    assert pcbo(["verify", "--home", tmp_path / "home", "--target-url", url]).status == 0


# -- a chunk with bad rows falls back to rows ----------------------------------------------------------


@pytest.mark.postgres
def test_bad_rows_fall_back_to_savepoints_with_the_database_error(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    url = fresh_postgres_url
    create_table(url)
    records = [record(i, hour=1) for i in range(1, 9)]
    records[1]["amount"] = -5  # CHECK (amount >= 0)
    records[3]["label"] = "much-too-long"  # varchar(8)
    records[5]["amount"] = 2**40  # integer out of range
    run = _execute(tmp_path, request(url, records, chunkRows=100))
    assert run.status == 0, run.stderr
    part = next(p for p in run.document["partitions"] if p["key"] == "20240101T010000Z")
    assert part["fallbackChunks"] == 1 and part["chunks"] == 1
    assert part["counts"] == {"inserted": 5, "updated": 0, "skipped": 0, "refused": 0, "failed": 3}
    codes = {f["id"]: (f["code"], f["error"]) for f in part["failures"]}
    assert codes["ev-0002"][0] == "23514" and "check constraint" in codes["ev-0002"][1]
    assert codes["ev-0004"] == ("22001", "value too long for type character varying(8)")
    assert codes["ev-0006"] == ("22003", "integer out of range")
    assert sorted(r[0] for r in query(url, "SELECT id FROM events")) == [
        "ev-0001", "ev-0003", "ev-0005", "ev-0007", "ev-0008",
    ]  # fmt: skip
    catalog = CatalogStore(f"sqlite:///{tmp_path / 'home' / 'catalog.db'}")
    stored = {f["record_id"]: f["code"] for f in catalog.sql_failures("run-1")}
    catalog.close()
    assert stored == {"ev-0002": "23514", "ev-0004": "22001", "ev-0006": "22003"}
    # The failed rows are retried by the next run; still failing, they are failures again.
    again = _execute(tmp_path, request(url, records, run_id="run-2", chunkRows=100))
    assert again.status == 0
    assert again.document["totals"]["failed"] == 3 and again.document["totals"]["inserted"] == 0


# -- the freshness and deletion gates, and the decision hash pinning the table -----------------------------


@pytest.mark.postgres
def test_gates_in_dry_run_and_execute_and_the_pinned_decision_hash(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    url = fresh_postgres_url
    create_table(url)
    run_sql(
        url,
        "INSERT INTO events (id, occurred_at, amount, label, updated_at, deleted_at) VALUES "
        # owned by the live pipeline: updated after the snapshot
        "('ev-0001', '2024-01-01T01:01:00Z', 50, 'live', '2024-03-01T00:00:00Z', NULL),"
        # deleted after the snapshot: not resurrected
        "('ev-0002', '2024-01-01T02:02:00Z', 2, 'x', '2024-01-10T00:00:00Z', '2024-03-01T00:00:00Z'),"
        # deleted before the snapshot: the conflict policy decides (overwrite clears the tombstone)
        "('ev-0003', '2024-01-01T03:03:00Z', 3, 'x', '2024-01-10T00:00:00Z', '2024-01-15T00:00:00Z'),"
        # older than the snapshot and different: overwritten
        "('ev-0004', '2024-01-01T00:04:00Z', 40, 'old', '2024-01-10T00:00:00Z', NULL)",
    )
    records = [record(i) for i in range(1, 7)]
    gates: dict[str, Any] = {"conflict": "overwrite", "freshnessColumn": "updated_at",
                             "deletedColumn": "deleted_at", "snapshotAt": "2024-02-01T00:00:00Z"}  # fmt: skip
    req = request(url, records, **gates)
    dry = _dry_run(tmp_path, req)
    assert dry.status == 0, dry.stderr
    assert _outcomes(dry.document) == {
        "ev-0001": "refused_newer", "ev-0002": "refused_deleted", "ev-0003": "update",
        "ev-0004": "update", "ev-0005": "insert", "ev-0006": "insert",
    }  # fmt: skip
    # The policy decisions are the lake's, byte for byte.
    lake = _dry_run(tmp_path, {k: v for k, v in req.items() if k != "target"})
    assert dry.document["policyDecisionHash"] == lake.document["decisionHash"]
    assert dry.document["decisionHash"] != lake.document["decisionHash"]
    allowed = _dry_run(tmp_path, request(url, records, **{**gates, "allowNewer": True}))
    assert _outcomes(allowed.document)["ev-0001"] == "update"

    # An approved dry-run goes stale when a row it would touch changes: nothing is written.
    approved = dry.document["decisionHash"]
    run_sql(url, "UPDATE events SET amount = 41 WHERE id = 'ev-0004'")
    before = dump(url)
    stale = _execute(tmp_path, {**req, "expectedDecisionHash": approved})
    assert stale.status == 3 and stale.document["gate"] == "expectedDecisionHash"
    assert dump(url) == before and not (tmp_path / "home").exists()

    fresh = _dry_run(tmp_path, req).document["decisionHash"]
    assert fresh != approved
    run = _execute(tmp_path, {**req, "expectedDecisionHash": fresh})
    assert run.status == 0, run.stderr
    rows = {r[0]: r[1:] for r in query(url, "SELECT id, amount, label, deleted_at FROM events")}
    assert rows["ev-0001"][:2] == (50, "live")  # untouched: the live pipeline owns it
    assert rows["ev-0002"][2] is not None  # still deleted
    assert rows["ev-0003"][0] == 3 and rows["ev-0003"][2] is None  # resurrected by overwrite
    assert rows["ev-0004"][0] == 4
    assert run.document["totals"]["refused"] == 2


# -- rollback restores the exact prior table; the script does the same through psql ----------------------


def _psql() -> str:
    found = shutil.which("psql")
    if found:
        return found
    bindir = subprocess.run(
        ["pg_config", "--bindir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return str(Path(bindir) / "psql")


@pytest.mark.postgres
def test_rollback_restores_the_exact_prior_table_and_psql_runs_the_script(
    tmp_path: Path, postgres_server
) -> None:
    from pcbo_dagster_tests.sql_target_helpers import conninfo

    urls = [postgres_server.url(postgres_server.create_database("pcbo_sqlrb")) for _ in range(2)]
    live_rows = (
        "INSERT INTO events (id, occurred_at, amount, label, updated_at, deleted_at, note) VALUES "
        "('ev-0002', '2024-01-01T02:02:00.123456Z', 20, 'o''brien', '2024-01-10T00:00:00Z', NULL, 'kept'),"
        "('ev-0003', '2024-01-01T03:03:00Z', 3, NULL, '2024-01-10T00:00:00Z', '2024-01-15T00:00:00+02:00',"
        " NULL),"
        "('zz-live', '2023-12-31T23:00:00Z', 7, 'other', NULL, NULL, 'not ours')"
    )
    for url in urls:
        create_table(url)
        run_sql(url, live_rows)
    before = dump(urls[0])
    assert before == dump(urls[1])
    records = [record(i) for i in range(1, 30)]
    gates: dict[str, Any] = {"conflict": "overwrite", "deletedColumn": "deleted_at",
                             "snapshotAt": "2024-02-01T00:00:00Z", "chunkRows": 4}  # fmt: skip
    for n, url in enumerate(urls):
        run = _execute(tmp_path, request(url, records, **gates), home=f"home{n}")
        assert run.status == 0, run.stderr
        assert run.document["totals"]["updated"] == 2 and run.document["totals"]["inserted"] == 27
    after = dump(urls[0])
    assert after != before

    home = tmp_path / "home0"
    undone = pcbo(
        ["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1", "--target-url", urls[0]]
    )
    assert undone.status == 0, undone.stderr
    assert undone.document["rolledBack"] == 4
    assert dump(urls[0]) == before
    again = pcbo(
        ["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1", "--target-url", urls[0]]
    )
    assert again.status == 0 and again.document["status"] == "noop"
    assert dump(urls[0]) == before
    verified = pcbo(["verify", "--home", home, "--target-url", urls[0]])
    assert verified.status == 0, verified.document
    types = _chain_types(home)
    assert types.count("sql_apply_intent") == types.count("sql_partition_applied") == 4
    assert types.count("sql_rollback_intent") == 1 and types.count("sql_partition_rolled_back") == 4

    # The run's rollback script, read and run by hand with psql, gives the same table.
    script = tmp_path / "home1" / "rollback_scripts" / "rollback_run-1.sql"
    data = script.read_bytes()
    assert stat.S_IMODE(script.stat().st_mode) == 0o600  # the target's prior rows: its owner's alone
    chain = (tmp_path / "home1" / "pas" / "events" / "v1.jsonl").read_text().splitlines()
    event = next(e for e in map(json.loads, chain) if e["event_type"] == "sql_rollback_script")
    assert event["script"]["checksum"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert b"ev-0029" in data and b"zz-live" not in data
    psql = subprocess.run(
        [_psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script), conninfo(urls[1])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert psql.returncode == 0, psql.stderr
    assert dump(urls[1]) == before == dump(urls[0])
    # Deterministic: the same run executed again (nothing to do) leaves the same bytes.
    assert _execute(tmp_path, request(urls[1], records, **gates), home="home1").status == 0
    assert script.read_bytes() == data


# -- SQLite, the embedded default -------------------------------------------------------------------------


def test_sqlite_target_end_to_end(tmp_path: Path) -> None:
    db = tmp_path / "target.db"
    url = sqlite_url(db)
    create_table(url)
    run_sql(
        url,
        "INSERT INTO events (id, occurred_at, amount, label) "
        "VALUES ('ev-0002', '2024-01-01T02:02:00Z', 9, 'x')",
    )
    before = dump(url)
    records = [record(i) for i in range(1, 12)]
    records[4]["amount"] = -1
    req = request(
        "sqlite:///target.db", records, conflict="overwrite", chunkRows=3
    )  # relative: to the request
    run = _execute(tmp_path, req)
    assert run.status == 0, run.stderr
    totals = run.document["totals"]
    assert (totals["inserted"], totals["updated"], totals["failed"]) == (9, 1, 1)
    failure = next(f for p in run.document["partitions"] for f in p["failures"])
    assert failure["id"] == "ev-0005" and failure["code"] == "SQLITE_CONSTRAINT_CHECK"
    assert run.document["target"]["location"] == f"sqlite:///{db}"
    assert pcbo(["verify", "--home", tmp_path / "home"]).status == 0
    shutil.copy(db, tmp_path / "scripted.db")
    assert (
        pcbo(["rollback", "--home", tmp_path / "home", "--dataset", "events", "--run-id", "run-1"]).status
        == 0
    )
    assert dump(url) == before
    script = (tmp_path / "home" / "rollback_scripts" / "rollback_run-1.sql").read_text()
    with sqlite3.connect(tmp_path / "scripted.db") as conn:
        conn.executescript(script)
    assert dump(sqlite_url(tmp_path / "scripted.db")) == before
    assert pcbo(["verify", "--home", tmp_path / "home"]).status == 0


def test_verify_finds_changed_rows_and_an_altered_journal(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    run = _execute(tmp_path, request(url, [record(i) for i in range(1, 9)], chunkRows=2))
    assert run.status == 0, run.stderr
    home = tmp_path / "home"
    run_sql(url, "UPDATE events SET amount = 1000 WHERE id = 'ev-0003'")
    found = pcbo(["verify", "--home", home])
    assert found.status == 1
    assert [f["kind"] for f in found.document["findings"]] == ["sql_rows_changed"]
    assert "'ev-0003'" in found.document["findings"][0]["detail"]
    # A rollback does not write over a row changed since the run: refused, nothing changed.
    refused = pcbo(["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"])
    assert refused.status == 1 and "sql_rows_changed_since" in refused.stderr
    run_sql(url, "UPDATE events SET amount = 3 WHERE id = 'ev-0003'")
    # Someone drops a journal trigger and edits an entry.
    run_sql(
        url,
        "DROP TRIGGER pcbo_journal_no_update",
        'UPDATE pcbo_journal SET entry = replace(entry, \'"action":"insert"\', \'"action":"update"\') '
        "WHERE seq = 2",
    )
    kinds = {f["kind"] for f in pcbo(["verify", "--home", home]).document["findings"]}
    assert kinds == {"sql_journal_trigger_missing", "sql_journal_altered"}
    refused = pcbo(["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"])
    assert refused.status == 1 and "sql_journal_trigger_missing" in refused.stderr
    # ... and puts it back: the edited entry is still found, and never replayed.
    run_sql(
        url,
        "CREATE TRIGGER pcbo_journal_no_update BEFORE UPDATE ON pcbo_journal "
        "BEGIN SELECT RAISE(ABORT, 'pcbo_journal is append-only'); END",
    )
    kinds = {f["kind"] for f in pcbo(["verify", "--home", home]).document["findings"]}
    assert kinds == {"sql_journal_altered"}
    refused = pcbo(["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"])
    assert refused.status == 1 and "sql_journal_altered" in refused.stderr
    assert query(url, "SELECT count(*) FROM events") == [(8,)]


def test_verify_holds_the_catalogs_failed_rows_to_the_chain(tmp_path: Path) -> None:
    """`sql_row_failures` (the rows the database refused, one per record) was never checked: a failure
    row forged for a record that was applied, one deleted or one whose error was rewritten (its
    append-only trigger dropped and put back) all left verify clean. Each apply event's failed rows are
    what its checkpoints recorded, and a row naming an event the chain does not hold is not on it."""
    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    records = [record(i) for i in range(1, 7)]
    records[2]["amount"] = -1  # the CHECK constraint refuses it
    run = _execute(tmp_path, request(url, records, chunkRows=2))
    assert run.status == 0, run.stderr
    home = tmp_path / "home"
    catalog = home / "catalog.db"
    pristine = tmp_path / "pristine.db"

    def copy(source: Path, destination: Path) -> None:  # the backup API: the catalog is in WAL mode
        with sqlite3.connect(source) as src, sqlite3.connect(destination) as dst:
            src.backup(dst)
        src.close()
        dst.close()

    copy(catalog, pristine)

    def restore() -> None:
        copy(pristine, catalog)

    assert pcbo(["verify", "--home", home]).status == 0

    def findings() -> list[tuple[str, str]]:
        found = pcbo(["verify", "--home", home])
        assert found.status == 1, found.document
        return [(f["kind"], f["detail"]) for f in found.document["findings"]]

    with sqlite3.connect(catalog) as conn:  # no trigger stands in the way of an INSERT
        conn.execute(
            "INSERT INTO sql_row_failures (event_hash, dataset, version_label, partition_key, run_id, "
            "target, record_id, record_key, code, error, recorded_at) SELECT event_hash, dataset, "
            "version_label, partition_key, run_id, target, 'ev-0004', '[\"ev-0004\"]', code, error, "
            "recorded_at FROM sql_row_failures"
        )
    assert [kind for kind, _ in findings()] == ["catalog_sql_mismatch"]
    restore()
    for edit in (
        "DELETE FROM sql_row_failures",
        "UPDATE sql_row_failures SET error = 'the live pipeline owns this row'",
    ):
        with sqlite3.connect(catalog) as conn:
            triggers = conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'sql_row_failures'"
            ).fetchall()
            conn.executescript(
                "".join(f"DROP TRIGGER {name};" for name, _ in triggers)
                + edit
                + ";"
                + "".join(f"{sql};" for _, sql in triggers)
            )
        assert [kind for kind, _ in findings()] == ["catalog_sql_mismatch"], edit
        restore()
    with sqlite3.connect(catalog) as conn:  # the catalog rows a crash cut off: repair records them
        conn.executescript(
            "DROP TRIGGER sql_row_failures_no_delete; DROP TRIGGER sql_apply_log_no_delete;"
            "DELETE FROM sql_row_failures; DELETE FROM sql_apply_log;"
        )
    repaired = pcbo(["verify", "--home", home, "--repair"])
    assert repaired.status == 1  # the dropped triggers are still reported
    with sqlite3.connect(catalog) as conn:
        assert conn.execute("SELECT record_id, code FROM sql_row_failures").fetchall() == [
            ("ev-0003", "SQLITE_CONSTRAINT_CHECK")
        ]
    assert {f["kind"] for f in pcbo(["verify", "--home", home]).document["findings"]} == {
        "catalog_trigger_missing"
    }
    restore()  # undone: the rollback events hold no failed rows of their own
    assert pcbo(["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"]).status == 0
    assert pcbo(["verify", "--home", home]).status == 0


# -- bad targets: exit 2 naming the field, nothing written ---------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"table": "nope"}, "target.table"),
        ({"key": ["id", "label"]}, "target.key"),
        ({"columns": {"id": "id", "occurredAt": "occurred_at", "extra": "extra"}}, "target.columns.extra"),
        ({"columns": {"id": "id", "occurredAt": "occurred_at", "label": "amount"}}, "target.columns.label"),
        ({"freshnessColumn": "updated_at"}, "target.snapshotAt"),
        ({"conflcit": "skip"}, "target.conflcit"),
        ({"url": "mysql://db/x"}, "target.url"),
        ({"freshnessColumn": "nope", "snapshotAt": "2024-02-01T00:00:00Z"}, "target.freshnessColumn"),
        # Red-team finding: a SQLite column of INTEGER or REAL affinity holds numbers, never instants:
        # every live row's would have been unreadable, so every record refused as newer, exit 0.
        ({"freshnessColumn": "amount", "snapshotAt": "2024-02-01T00:00:00Z"}, "target.freshnessColumn"),
        ({"deletedColumn": "amount", "snapshotAt": "2024-02-01T00:00:00Z"}, "target.deletedColumn"),
    ],
)
def test_bad_targets_are_refused_naming_the_field(tmp_path: Path, change: dict, field: str) -> None:
    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    records = [{**record(i), "extra": i} for i in range(1, 4)]
    req = request(url, records)
    req["target"].update(change)
    before = (tmp_path / "target.db").read_bytes()
    for command in ("dry-run", "execute"):
        path = write_json(tmp_path / "bad.json", req)
        args = [command, "--input", path] + (["--home", tmp_path / "home"] if command == "execute" else [])
        run = pcbo(args)
        assert run.status == 2, (command, run.stderr)
        assert f"invalid input: {field}:" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "home").exists()
    assert (tmp_path / "target.db").read_bytes() == before  # no journal table, nothing


def test_a_string_field_into_an_integer_column_names_the_column(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    records = [{**record(1), "amount": "12"}]
    run = pcbo(["dry-run", "--input", write_json(tmp_path / "r.json", request(url, records))])
    assert run.status == 2
    assert (
        "target.columns.amount: column 'amount' (INTEGER, INTEGER affinity) would change strings"
        in run.stderr
    )


# -- privileges and secrets -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_a_role_that_may_not_write_is_refused_and_no_password_is_kept(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    from sqlalchemy.engine import make_url

    url = fresh_postgres_url
    create_table(url)
    reader = f"reader_{make_url(url).database}"[:60]
    run_sql(url, f'CREATE ROLE "{reader}" LOGIN', f'GRANT SELECT ON events TO "{reader}"')
    as_reader = make_url(url).set(username=reader).render_as_string(hide_password=False)
    req = request(as_reader, [record(i) for i in range(1, 4)])
    assert _dry_run(tmp_path, req).status == 0  # a dry-run only reads
    refused = _execute(tmp_path, req)
    assert refused.status == 2
    assert (
        f"target.url: the role '{reader}' may not INSERT, UPDATE, DELETE table public.events"
        in refused.stderr
    )
    assert query(url, "SELECT count(*) FROM events") == [(0,)]

    # A password in the URL (the server trusts loopback and ignores it) is in no output or file.
    secret = "s3cret-Pa55word"
    with_password = make_url(url).set(password=secret).render_as_string(hide_password=False)
    run = _execute(tmp_path, request(with_password, [record(i) for i in range(1, 4)]))
    assert run.status == 0, run.stderr
    assert secret not in json.dumps(run.document) and secret not in run.stderr
    stored = [p for p in (tmp_path / "home").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert stored == []
    assert secret not in "".join(r[0] for r in query(url, "SELECT entry FROM pcbo_journal"))


@pytest.mark.postgres
def test_a_role_that_may_not_use_the_journal_is_invalid_input_naming_the_url(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    """Once the journal tables are beside the table (made by the role that ran the first apply), a
    role granted the target table alone failed with the database's `permission denied for table
    pcbo_journal` (exit 1), a dry-run included. It is a capability check like the table's: invalid
    input on `target.url` naming the role, the privileges and the journal table, nothing written."""
    from sqlalchemy.engine import make_url

    url = fresh_postgres_url
    create_table(url)
    first = _execute(tmp_path, request(url, [record(1)]))
    assert first.status == 0, first.stderr
    reader = f"reader_{make_url(url).database}"[:60]
    writer = f"writer_{make_url(url).database}"[:60]
    run_sql(
        url,
        f'CREATE ROLE "{reader}" LOGIN',
        f'GRANT SELECT ON events TO "{reader}"',
        f'CREATE ROLE "{writer}" LOGIN',
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON events TO "{writer}"',
        f'GRANT SELECT ON pcbo_journal, pcbo_checkpoints, pcbo_rollbacks TO "{writer}"',
    )
    before = dump(url)
    journal = query(url, "SELECT count(*) FROM pcbo_journal")
    records = [record(i) for i in range(1, 4)]
    as_reader = make_url(url).set(username=reader).render_as_string(hide_password=False)
    dry = _dry_run(tmp_path, request(as_reader, records, run_id="run-2"))
    assert dry.status == 2, dry.stderr
    assert f"target.url: the role '{reader}' may not SELECT table public.pcbo_journal" in dry.stderr
    as_writer = make_url(url).set(username=writer).render_as_string(hide_password=False)
    refused = _execute(tmp_path, request(as_writer, records, run_id="run-2"))
    assert refused.status == 2, refused.stderr
    assert f"target.url: the role '{writer}' may not INSERT table public.pcbo_journal" in refused.stderr
    assert dump(url) == before and query(url, "SELECT count(*) FROM pcbo_journal") == journal


def test_a_resume_refuses_a_changed_journal(tmp_path: Path) -> None:
    from pcbo_dagster_tests.cli_runner import run_pcbo

    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    path = write_json(tmp_path / "req.json", request(url, [record(i) for i in range(1, 13)], chunkRows=2))
    crashed = run_pcbo(
        ["execute", "--input", path], home=tmp_path / "home", env={"PCBO_FAILPOINT": "sql_after_chunk@1"}
    )
    assert crashed.status == 86, crashed.stderr
    run_sql(url, "DROP TRIGGER pcbo_journal_no_delete", "DELETE FROM pcbo_journal WHERE seq = 1")
    unguarded = pcbo(["execute", "--input", path, "--home", tmp_path / "home"])
    assert unguarded.status == 1 and "sql_journal_trigger_missing" in unguarded.stderr
    run_sql(  # the trigger put back: the journal is still not the one the checkpoints recorded
        url,
        "CREATE TRIGGER pcbo_journal_no_delete BEFORE DELETE ON pcbo_journal "
        "BEGIN SELECT RAISE(ABORT, 'pcbo_journal is append-only'); END",
    )
    refused = pcbo(["execute", "--input", path, "--home", tmp_path / "home"])
    assert refused.status == 3 and refused.document["gate"] == "resume"
    assert "the journal changed" in refused.document["reason"]


def test_a_streamed_source_decides_and_applies_as_the_same_records_inline(tmp_path: Path) -> None:
    records = [record(i) for i in range(1, 40)]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    documents = []
    for name, source in (
        ("inline", {"sourceRecords": records}),
        ("file", {"source": {"uri": "records.jsonl"}}),
    ):
        url = sqlite_url(tmp_path / f"{name}.db")
        create_table(url)
        req = {k: v for k, v in request(url, records, chunkRows=5).items() if k != "sourceRecords"}
        req["target"]["url"] = f"sqlite:///{name}.db"
        run = _execute(tmp_path, {**req, **source}, home=f"home-{name}")
        assert run.status == 0, run.stderr
        documents.append(run.document)
        assert dump(url) == dump(sqlite_url(tmp_path / "inline.db"))
    inline, streamed = documents
    assert inline["planHash"] == streamed["planHash"]
    assert inline["policyDecisionHash"] == streamed["policyDecisionHash"]
    roots = [{p["key"]: p["merkleRoot"] for p in d["partitions"]} for d in documents]
    assert roots[0] == roots[1]


def test_sql_applies_and_rollbacks_sign_checkpoints_an_auditor_can_hold(tmp_path: Path) -> None:
    """A SQL target's chain is a transparency log like a lake's: execute and rollback each end with a
    signed checkpoint of it, and verify holds the chain to a checkpoint taken earlier."""
    from pcbo_dagster_tests.approver_keys import BO, key_file

    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    key = key_file(tmp_path, BO)
    home = tmp_path / "home"
    run = _execute(tmp_path, request(url, [record(i) for i in range(1, 6)]), "home", "--signing-key", key)
    assert run.status == 0, run.stderr
    applied = run.document["checkpoint"]
    assert applied["origin"] == "pcbo/events/v1" and applied["treeSize"] >= 2
    held = tmp_path / "held.checkpoint"
    held.write_bytes(Path(applied["lakeUri"].removeprefix("file://")).read_bytes())
    undo: list[str | Path] = ["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1"]
    back = pcbo([*undo, "--signing-key", key])
    assert back.status == 0, back.stderr
    assert back.document["checkpoint"]["treeSize"] > applied["treeSize"]
    trusted: list[str | Path] = [
        "verify",
        "--home",
        home,
        "--trusted-checkpoint",
        held,
        "--key",
        BO.verifier().text,
    ]
    assert pcbo(trusted).status == 0


def test_an_apply_without_the_key_of_a_signed_chain_creates_nothing_in_a_new_target(tmp_path: Path) -> None:
    """A SQL apply in a process not given PCBO_SIGNING_KEY (or given another key), into a table the
    signed chain has not applied to yet: refused naming the key before the target database is touched,
    where it created the journal tables and their triggers there (and the lock directory beside a
    SQLite target) and then said `nothing was written` (red-team finding)."""
    from pcbo_dagster.core.signed_note import signing_key_from_seed
    from pcbo_dagster_tests.approver_keys import BO, key_file

    url = sqlite_url(tmp_path / "target.db")
    create_table(url)
    key = key_file(tmp_path, BO)
    assert (
        _execute(
            tmp_path, request(url, [record(i) for i in range(1, 6)]), "home", "--signing-key", key
        ).status
        == 0
    )
    other_db = tmp_path / "other.db"
    create_table(sqlite_url(other_db))
    with sqlite3.connect(other_db) as conn:
        before = sorted(conn.execute("SELECT type, name FROM sqlite_master"))
    rotated = key_file(tmp_path, signing_key_from_seed("ops.example/operator-2027", bytes([35]) * 32))
    for extra, named in (((), "PCBO_SIGNING_KEY"), (("--signing-key", rotated), "ops.example/operator-2027")):
        run = _execute(
            tmp_path, request(sqlite_url(other_db), [record(i) for i in range(1, 6)], "run-2"), "home", *extra
        )
        assert run.status == 1 and named in run.stderr and "nothing was written" in run.stderr, run.stderr
        with sqlite3.connect(other_db) as conn:
            assert sorted(conn.execute("SELECT type, name FROM sqlite_master")) == before
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("other.db")) == ["other.db"]
    assert pcbo(["verify", "--home", tmp_path / "home", "--signing-key", key]).status == 0


@pytest.mark.postgres
def test_a_target_url_spelling_the_location_another_way_is_named_when_the_target_is_unreachable(
    tmp_path: Path, fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red-team finding: a `--target-url` naming the recorded location another way (`localhost` for
    `127.0.0.1`) was silently not used: the recorded location was reached with libpq's default user
    and the error spoke only of that user (`role "root" does not exist`), never of the flag. Now
    verify's finding and rollback's error (exit 2, nothing undone) name the flag and the locations."""
    monkeypatch.setenv("PGUSER", "pcbo-no-such-role")  # libpq's default user, whoever runs the tests
    url = fresh_postgres_url
    assert "@127.0.0.1:" in url
    create_table(url)
    assert _execute(tmp_path, request(url, [record(i) for i in range(1, 4)])).status == 0
    before = dump(url)
    home, elsewhere = tmp_path / "home", url.replace("@127.0.0.1:", "@localhost:")
    verified = pcbo(["verify", "--home", home, "--target-url", elsewhere])
    found = [f for f in verified.document["findings"] if f["kind"] == "sql_target_unreachable"]
    assert verified.status == 1 and len(found) == 1, verified.document
    detail = found[0]["detail"]
    assert "--target-url" in detail and "postgresql://localhost:" in detail, detail
    assert "where the audit chain records the table" in detail and "pcbo-no-such-role" in detail
    undone = pcbo(
        ["rollback", "--home", home, "--dataset", "events", "--run-id", "run-1", "--target-url", elsewhere]
    )
    assert undone.status == 2 and "--target-url" in undone.stderr and "none is at" in undone.stderr
    assert dump(url) == before
    assert pcbo(["verify", "--home", home, "--target-url", url]).status == 0

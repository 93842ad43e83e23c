"""Issue 17: committed partitions published to an Apache Iceberg table (a real pyiceberg SQL catalog
on SQLite, and on the tests' PostgreSQL server), read back by pyiceberg and by DuckDB's own Iceberg
reader; after each execute, re-version, rollback and promotion the table's rows are the rows of the
files the commit points name, time travel shows the state before, a crash between the lake commit and
the publication converges, and a file added to the table by hand is a finding, never adopted.

Most tests start from a home where run ice-1 was published (`published`: the run made once per module,
each test on its own copy of its home) and run `pcbo` in this process (`run_pcbo_in_process`); a crash, a
frozen run, a FIFO waited on and what a process prints of its own stay subprocesses (`run_pcbo`)."""

from __future__ import annotations

import gc
import glob
import json
import os
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.manifest import clear_manifest_cache

from pcbo_dagster.tables.iceberg_publication import open_catalog
from pcbo_dagster.tables.query import duckdb_iceberg_extensions
from pcbo_dagster_tests.approver_keys import APPROVERS_YAML, CY
from pcbo_dagster_tests.cli_runner import (
    PcboRun,
    backup_events,
    backup_lines,
    lake_dir,
    lake_files,
    load_generator,
    run_pcbo,
    run_pcbo_in_process,
    tree_state,
    write_request,
)
from pcbo_dagster_tests.pcbo_fork_runner import run_pcbo_forked

pytestmark = pytest.mark.slow

DATASET = "events"
TABLE = {"format": "iceberg", "name": "lake.events"}


def _request(run_id: str, existing: list[str] | None = None, table: dict[str, Any] | None = None) -> dict:
    request = load_generator().make_request(records=240, partitions=4, seed=17, run_id=run_id)
    request["table"] = table or TABLE
    if existing is not None:  # these ids become ALREADY_PRESENT too: their partitions change
        request["existingTargetIds"] = [*request["existingTargetIds"], *existing]
    return request


def _table(home: Path, name: str = "lake.events", uri: str | None = None) -> Any:
    return SqlCatalog("pcbo", uri=uri or f"sqlite:///{home}/iceberg.db").load_table(name)


def _manifest_rows(home: Path, dataset: str = DATASET) -> pa.Table:
    """The rows of every file the commit points name (what a careful reader of the lake gets)."""
    tables = []
    for manifest in sorted(glob.glob(f"{lake_dir(home)}/{dataset}/v1/*/_manifest.json")):
        for entry in json.loads(Path(manifest).read_text())["files"]:
            tables.append(pq.read_table(lake_dir(home) / entry["path"]))
    return pa.concat_tables(tables, promote_options="permissive").sort_by("id") if tables else pa.table({})


def _manifest_file_uris(home: Path, dataset: str = DATASET) -> set[str]:
    return {
        f"file://{lake_dir(home)}/{entry['path']}"
        for manifest in glob.glob(f"{lake_dir(home)}/{dataset}/v1/*/_manifest.json")
        for entry in json.loads(Path(manifest).read_text())["files"]
    }


def _ids(table: pa.Table) -> list[str]:
    return sorted(table.column("id").to_pylist()) if table.num_rows else []


def _duckdb_ids(table: Any, snapshot_id: int | None = None) -> list[str]:
    connection = duckdb.connect()
    extensions = duckdb_iceberg_extensions()
    assert extensions is not None, "the iceberg extra (duckdb-extension-iceberg/-avro) is installed in dev"
    for path in extensions:
        connection.load_extension(path)
    snapshot = table.current_snapshot().snapshot_id if snapshot_id is None else snapshot_id
    scan = f"iceberg_scan('{table.metadata_location}', snapshot_from_id => {snapshot})"
    rows = connection.execute(f"SELECT id FROM {scan} ORDER BY id").fetchall()
    return [r[0] for r in rows]


def _assert_table_is_the_manifests(home: Path, table: Any) -> list[str]:
    expected = _manifest_rows(home)
    scanned = table.scan().to_arrow().sort_by("id")
    assert _ids(scanned) == _ids(expected)
    for name in expected.column_names:  # every value, column by column
        assert scanned.column(name).to_pylist() == expected.column(name).to_pylist(), name
    assert _duckdb_ids(table) == _ids(expected)
    return _ids(expected)


class FirstRun(NamedTuple):
    home: Path
    run: PcboRun  # the execute of run ice-1


@pytest.fixture(scope="module")
def _published_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[FirstRun, Path]:
    """Run ice-1 (`_request("ice-1")`, naming `lake.events`) executed once per module (per xdist
    worker) into a fresh home, and a pristine copy of that home beside it."""
    base = tmp_path_factory.mktemp("published")
    home = base / "home"
    run = run_pcbo_in_process(
        ["execute", "--input", write_request(base / "r1.json", _request("ice-1"))], home=home
    )
    assert run.status == 0, run.stderr
    shutil.copytree(home, base / "pristine", symlinks=True)
    return FirstRun(home, run), base / "pristine"


def _unless_gone(function: Any, path: str, exc_info: Any) -> None:
    """`shutil.rmtree`'s error handler: a file already gone (a SQLite `-wal` its connection removed
    as it closed) is no error."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


@pytest.fixture
def published(_published_once: tuple[FirstRun, Path]) -> FirstRun:
    """A fresh home where run ice-1 was executed and published to `lake.events` (exit 0), and that run:
    each test gets its own copy of the module's pristine home, made at the path the home was created
    at (its audit chain, its Iceberg catalog and the table's metadata name the home's absolute path),
    whatever an earlier test left there removed first (and the manifests pyiceberg cached in this
    process by path with it)."""
    first, pristine = _published_once
    clear_manifest_cache()
    gc.collect()  # (closes what an earlier test left open on the old home: a SQLite file's -wal goes)
    if first.home.exists():
        shutil.rmtree(first.home, onerror=_unless_gone)
    shutil.copytree(pristine, first.home, symlinks=True)
    return first


def test_execute_reversion_and_rollback_publish_exactly_the_committed_files(
    tmp_path: Path, published: FirstRun
) -> None:
    home, first = published
    assert first.status == 0, first.stderr
    assert first.document["table"]["status"] == "published"
    table = _table(home)
    v1_ids = _assert_table_is_the_manifests(home, table)
    assert [f.name for f in table.spec().fields] == ["occurredAt_hour"]  # the dataset's hourly partitions
    assert table.metadata_location.startswith(f"file://{lake_dir(home)}/_iceberg/lake/events/metadata/")

    # The snapshot carries the evidence: run, plan and decision hashes, each partition's event hash
    # (on the chain), the chain checkpoint.
    summary = table.current_snapshot().summary.additional_properties
    events = backup_events(home, DATASET)
    hashes = {e["chain"]["event_hash"] for e in events}
    partitions = json.loads(summary["pcbo.partitions"])
    assert summary["pcbo.run-id"] == "ice-1" and summary["pcbo.chain-key"] == "events/v1"
    assert {p["key"] for p in partitions} == {e["partition"]["key"] for e in events if "partition" in e}
    assert all(p["event_hash"] in hashes and p["run_id"] == "ice-1" for p in partitions)
    assert json.loads(summary["pcbo.runs"]) == {
        "ice-1": {"plan_hash": first.document["planHash"], "decision_hash": first.document["decisionHash"]}
    }
    assert summary["pcbo.audit-head"] == events[-1]["chain"]["event_hash"]
    assert int(summary["pcbo.audit-seq"]) == events[-1]["chain"]["seq"]

    # Re-version: two ids become already present, so their partitions get a version 2.
    dropped = v1_ids[:2]
    second = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r2.json", _request("ice-2", existing=dropped))],
        home=home,
    )
    assert second.status == 0, second.stderr
    table = _table(home)
    v2_ids = _assert_table_is_the_manifests(home, table)
    v2_files = _manifest_file_uris(home)
    assert v2_ids == sorted(set(v1_ids) - set(dropped))
    # A naive glob over the lake reads the superseded version's files too; the table does not.
    naive = duckdb.sql(f"SELECT count(*) FROM read_parquet('{lake_dir(home)}/events/v1/*/*.parquet')")
    assert naive.fetchone()[0] > len(v2_ids)  # type: ignore[index]
    operation = table.current_snapshot().summary.operation.value
    assert operation == "overwrite" and table.current_snapshot().summary["deleted-data-files"] != "0"
    # Time travel: the previous snapshot is the previous state (pyiceberg and DuckDB).
    parent = table.current_snapshot().parent_snapshot_id
    assert _ids(table.scan(snapshot_id=parent).to_arrow()) == v1_ids
    assert _duckdb_ids(table, parent) == v1_ids

    # Rollback of run 2 restores version 1's files; then a partition rolled back to nothing leaves.
    undone = run_pcbo_in_process(["rollback", "--dataset", DATASET, "--run-id", "ice-2"], home=home)
    assert undone.status == 0, undone.stderr
    table = _table(home)
    assert _assert_table_is_the_manifests(home, table) == v1_ids
    assert table.current_snapshot().summary["pcbo.reason"] == "rollback"
    # The snapshot before the rollback still lists version 2's files (metadata time travel), but
    # the lake's rollback removed the files only version 2 used: their rows cannot be read back.
    before = table.scan(snapshot_id=table.current_snapshot().parent_snapshot_id).plan_files()
    assert {task.file.file_path for task in before} == v2_files
    key = sorted(p["key"] for p in partitions)[0]
    gone = run_pcbo_in_process(["rollback", "--dataset", DATASET, "--partition", key], home=home)
    assert gone.status == 0, gone.stderr
    table = _table(home)
    remaining = _assert_table_is_the_manifests(home, table)
    assert len(remaining) < len(v1_ids)

    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 0, verified.document
    queried = run_pcbo_in_process(
        ["query", "--dataset", DATASET, "SELECT count(*) AS n FROM lake.events"], home=home
    )
    assert queried.status == 0 and queried.document["rows"] == [[len(remaining)]]
    assert queried.document["reader"] == "duckdb-iceberg"
    by_scan = run_pcbo_in_process(
        ["query", "--dataset", DATASET, "--reader", "pyiceberg", "SELECT count(*) FROM lake.events"],
        home=home,
    )
    assert by_scan.document["rows"] == [[len(remaining)]]


def test_a_crash_between_commit_and_publication_converges(tmp_path: Path) -> None:
    """kill -9 (os._exit) after the lake commit, audit events and catalog rows, before the snapshot:
    the first run (no table yet) and a re-version (table behind); the re-run, or `verify --repair`,
    publishes exactly what the chain committed."""
    home = tmp_path / "home"
    request_one = write_request(tmp_path / "r1.json", _request("ice-1"))
    crashed = run_pcbo(
        ["execute", "--input", request_one], home=home, env={"PCBO_FAILPOINT": "before_publication@0"}
    )
    assert crashed.status == 86
    behind = run_pcbo_in_process(["verify"], home=home)
    assert behind.status == 1
    assert [f["kind"] for f in behind.document["findings"]] == ["table_publication_behind"]
    # A query of the table the crash kept from being created says so (no internal error).
    absent = run_pcbo_forked(["query", "--dataset", DATASET, "SELECT count(*) FROM lake.events"], home=home)
    assert absent.status == 1 and absent.document is None
    assert absent.stderr.startswith("pcbo query: table lake.events does not exist yet"), absent.stderr
    assert "verify --repair" in absent.stderr and "internal error" not in absent.stderr
    again = run_pcbo_in_process(["execute", "--input", request_one], home=home)
    assert again.status == 0 and again.document["totals"]["committed"] == 0  # the lake was done
    v1_ids = _assert_table_is_the_manifests(home, _table(home))

    changed = write_request(tmp_path / "r2.json", _request("ice-2", existing=v1_ids[:1]))
    crashed = run_pcbo(
        ["execute", "--input", changed], home=home, env={"PCBO_FAILPOINT": "before_publication@0"}
    )
    assert crashed.status == 86
    assert _ids(_table(home).scan().to_arrow()) == v1_ids  # the table still shows the previous state
    repaired = run_pcbo_in_process(["verify", "--repair"], home=home)
    assert repaired.status == 0, repaired.document
    assert [r["kind"] for r in repaired.document["repaired"]] == ["table_published"]
    assert _assert_table_is_the_manifests(home, _table(home)) == v1_ids[1:]
    assert run_pcbo_in_process(["verify", "--repair"], home=home).document["repaired"] == []  # nothing more
    assert run_pcbo_in_process(["verify"], home=home).status == 0


def test_a_publication_under_way_reads_a_chain_that_verifies(tmp_path: Path) -> None:
    """Red-team finding: an execute verified its chain at its start, but its Iceberg publication read
    the audit backup again as it was (the events it judges the table against): an event edited in
    the middle of the backup while the run was under way (here while it was frozen before its first
    publication, its partitions committed) was published from all the same (exit 0). The publication
    now reads the chain through `partition_checks.verified_chain`: refused (`ChainNotVerified`, exit
    1, naming the chain) before the table is created or anything published."""
    from pcbo_dagster_tests.frozen_hosts import start_frozen, woken

    home = tmp_path / "home"
    path = write_request(tmp_path / "r1.json", _request("ice-1"))
    process = start_frozen(home, ["execute", "--input", path], {}, "before_publication@0")
    try:
        backup = home / "pas" / DATASET / "v1.jsonl"
        lines = backup.read_bytes().splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if b'"partition_committed"' in line)
        assert at < len(lines) - 1
        event = json.loads(lines[at])
        event["run_id"] = "someone-else"
        lines[at] = json.dumps(event).encode() + b"\n"
        backup.write_bytes(b"".join(lines))
    finally:
        status, stderr = woken(process)
    assert status == 1, stderr
    assert "audit chain events/v1 does not verify" in stderr, stderr
    assert _table_count(home) == 0


def test_a_file_added_to_the_table_by_hand_is_a_finding_never_adopted(
    tmp_path: Path, published: FirstRun
) -> None:
    home, first = published
    assert first.status == 0
    first_ids = _ids(_manifest_rows(home))
    changed = write_request(tmp_path / "r2.json", _request("ice-2", existing=first_ids[:1]))
    assert run_pcbo_in_process(["execute", "--input", changed], home=home).status == 0
    # Someone registers a superseded version's file (still in the lake) by hand: double counting.
    current = {e["path"] for m in glob.glob(f"{lake_dir(home)}/events/v1/*/_manifest.json")
               for e in json.loads(Path(m).read_text())["files"]}  # fmt: skip
    stale = next(
        p for p in sorted(glob.glob(f"{lake_dir(home)}/events/v1/*/part-*.parquet"))
        if os.path.relpath(p, lake_dir(home)) not in current
    )  # fmt: skip
    table = _table(home)
    table.add_files([f"file://{stale}"])
    by_hand = _table(home).current_snapshot().snapshot_id
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1
    kinds = {f["kind"]: f["where"] for f in verified.document["findings"]}
    assert "table_snapshot_not_published_by_pcbo" in kinds
    assert kinds["table_file_not_in_manifests"].endswith(os.path.relpath(stale, lake_dir(home)))
    repair = run_pcbo_in_process(["verify", "--repair"], home=home)
    assert repair.status == 1 and repair.document["repaired"] == []  # a finding, not a crash window
    # The next write refuses to publish over it (its lake commit stands), and adopts nothing.
    third = write_request(tmp_path / "r3.json", _request("ice-3", existing=first_ids[:2]))
    refused = run_pcbo_in_process(["execute", "--input", third], home=home)
    assert refused.status == 1
    assert refused.document["table"]["status"] == "refused"
    assert "table_file_not_in_manifests" in {f["kind"] for f in refused.document["table"]["findings"]}
    after = _table(home)  # as the hand left it: not healed over, not adopted
    assert after.current_snapshot().snapshot_id == by_hand
    assert f"file://{stale}" in {task.file.file_path for task in after.scan().plan_files()}


@pytest.mark.parametrize("edit", ["delete", "rename"])
def test_the_catalogs_publication_row_cannot_switch_the_table_checks_off(
    tmp_path: Path, published: FirstRun, edit: str
) -> None:
    """The red-team attack: a row added to the table by hand (a forged file), then the catalog's
    `table_publications` row deleted (or pointed at another table) so that nothing checks the table.
    The chain declares where the dataset publishes: `verify` still checks that table and finds the
    forged file; the edited row is a finding of its own; a deleted row is a crash window repair heals
    (and the table's finding stays)."""
    home, first = published
    assert first.status == 0
    declared = [e for e in backup_events(home) if e["event_type"] == "table_publication_recorded"]
    assert [e["table"] for e in declared] == [
        {
            "format": "iceberg",
            "catalog": f"sqlite:///{home}/iceberg.db",
            "name": "lake.events",
            "branch": "main",
        }
    ]
    forged = tmp_path / "forged.parquet"
    rows = _manifest_rows(home).slice(0, 1).to_pylist()
    pq.write_table(
        pa.Table.from_pylist([{**rows[0], "id": "FORGED-0001"}], schema=_manifest_rows(home).schema), forged
    )
    _table(home).add_files([f"file://{forged}"])
    with sqlite3.connect(home / "catalog.db") as db:
        if edit == "delete":
            db.execute("DELETE FROM table_publications")
        else:
            db.execute("UPDATE table_publications SET table_name = 'lake.elsewhere'")
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1
    kinds = {f["kind"] for f in verified.document["findings"]}
    assert {"table_snapshot_not_published_by_pcbo", "table_file_not_in_manifests"} <= kinds, kinds
    if edit == "rename":
        assert "table_publication_not_on_chain" in kinds
    repaired = run_pcbo_in_process(["verify", "--repair"], home=home)
    assert repaired.status == 1
    assert "table_file_not_in_manifests" in {f["kind"] for f in repaired.document["findings"]}
    if edit == "delete":
        assert [r["kind"] for r in repaired.document["repaired"]] == ["table_publication_recorded"]
        with sqlite3.connect(home / "catalog.db") as db:
            assert db.execute("SELECT table_name FROM table_publications").fetchall() == [("lake.events",)]


def test_a_catalog_row_the_chain_never_declared_makes_no_target(tmp_path: Path) -> None:
    """The red-team attack: a dataset version whose chain declares no table; someone who can write the
    catalog inserts a `table_publications` row naming their own catalog. The next run (no `table` in its
    request) publishes nowhere and declares nothing; `verify` reports the row."""
    home = tmp_path / "home"
    plain = _request("p1")
    del plain["table"]
    assert (
        run_pcbo_in_process(
            ["execute", "--input", write_request(tmp_path / "p1.json", plain)], home=home
        ).status
        == 0
    )
    evil = tmp_path / "attacker" / "evil.db"
    with sqlite3.connect(home / "catalog.db") as db:
        db.execute(
            "INSERT INTO table_publications (dataset, version_label, branch, table_format, catalog_url, "
            "table_name, recorded_at) VALUES ('events', 'v1', 'main', 'iceberg', ?, 'evil.loot', "
            "'2026-01-01 00:00:00')",
            (f"sqlite:///{evil}",),
        )
    again = _request("p2", existing=_ids(_manifest_rows(home))[:1])
    del again["table"]
    assert (
        run_pcbo_in_process(
            ["execute", "--input", write_request(tmp_path / "p2.json", again)], home=home
        ).status
        == 0
    )
    assert not evil.exists() and not (tmp_path / "attacker").exists()
    assert not [e for e in backup_events(home) if e["event_type"] == "table_publication_recorded"]
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1
    assert "table_publication_not_on_chain" in {f["kind"] for f in verified.document["findings"]}


def _operator_key(tmp_path: Path) -> dict[str, str]:
    """A fresh operator signing key file; the environment that configures it."""
    from pcbo_dagster.core.signed_note import new_signing_key

    key_file = tmp_path / "operator.key"
    key_file.write_text(new_signing_key("ops.example/operator").text + "\n")
    key_file.chmod(0o600)
    return {"PCBO_SIGNING_KEY": str(key_file)}


def _declarations(home: Path, version_label: str = "v1") -> list[dict[str, Any]]:
    return [
        e
        for e in backup_events(home, DATASET, version_label)
        if e["event_type"] == "table_publication_recorded"
    ]


def _append_as_the_attacker(home: Path, chain_key: str, body: dict[str, Any]) -> None:
    """What someone who can write the audit backup and the catalog (with pcbo's own audit code, every
    hash right) but holds no key appends: a table declaration, and the catalog row mirroring it."""
    from pcbo_dagster.catalog.publications import TablePublicationRow

    dataset, _, version_label = chain_key.partition("/")
    table = body["table"]
    env = _open_env(home)
    try:
        env.audit.append(chain_key, "table_publication_recorded", body)
        env.catalog.record_table_publication(
            TablePublicationRow(
                dataset=dataset,
                version_label=version_label,
                branch=table["branch"],
                table_format=table["format"],
                catalog_url=table["catalog"],
                table_name=table["name"],
            )
        )
    finally:
        env.close()


@pytest.mark.parametrize("forged", ["unsigned", "copied_from_another_chain"])
@pytest.mark.parametrize("then", ["execute", "dry_run", "repair", "query"])
def test_a_table_declaration_the_operators_key_did_not_sign_makes_no_target(
    tmp_path: Path, forged: str, then: str
) -> None:
    """The red-team attack the README listed as a known gap: someone who can rewrite the audit backup
    and the catalog consistently appends a `table_publication_recorded` naming their own SQLite
    catalog (unsigned, or a genuine signed declaration of another dataset version copied over). The
    next run, `verify --repair` and `pcbo query` created that catalog wherever it named and
    published the dataset there. With the operator's key (`PCBO_SIGNING_KEY`) only a declaration it
    signed for this chain counts: nothing is created, the run publishes nowhere, a dry-run holds a
    request to no other table (a dry-run of another table was refused), and `verify` reports the
    declaration."""
    from pcbo_dagster.engine.events import PRODUCER

    home, signing = tmp_path / "home", _operator_key(tmp_path)
    if forged == "copied_from_another_chain":  # v2 publishes, signed: its declaration is genuine
        other = {**_request("other"), "versionLabel": "v2"}
        done = run_pcbo_in_process(
            ["execute", "--input", write_request(tmp_path / "o.json", other)], home=home, env=signing
        )
        assert done.status == 0, done.stderr
    plain = _request("p1")
    del plain["table"]
    done = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "p1.json", plain)], home=home, env=signing
    )
    assert done.status == 0, done.stderr
    evil = tmp_path / "attacker" / "evil.db"
    if forged == "unsigned":
        body = {
            "table": {
                "format": "iceberg",
                "catalog": f"sqlite:///{evil}",
                "name": "evil.loot",
                "branch": "main",
            },
            "producer": PRODUCER,
        }
    else:  # the other chain's signed declaration, word for word (its table moved to the attacker's)
        (genuine,) = _declarations(home, "v2")
        body = {
            k: v
            for k, v in genuine.items()
            if k not in ("version", "event_type", "event_id", "timestamp", "chain")
        }
        assert body["operator_signature"]
        evil = home / "iceberg.db"  # the table it names: v1 must not publish there
        before = _table_count(home)
    _append_as_the_attacker(home, "events/v1", body)
    if then == "execute":
        again = _request("p2", existing=_ids(_manifest_rows(home))[:1])
        del again["table"]
        ran = run_pcbo_in_process(
            ["execute", "--input", write_request(tmp_path / "p2.json", again)], home=home, env=signing
        )
        assert ran.status == 0, ran.stderr
        assert ran.document is not None and ran.document.get("table") is None, ran.document.get("table")
    elif then == "dry_run":  # a table of its own: the forged declaration is no other table it must use
        mine = {**_request("p2"), "table": {"format": "iceberg", "name": "lake.mine"}}
        planned = run_pcbo_in_process(
            ["dry-run", "--input", write_request(tmp_path / "p2.json", mine)], home=home, env=signing
        )
        assert planned.status == 0, planned.stderr
    elif then == "repair":
        repaired = run_pcbo_in_process(["verify", "--repair"], home=home, env=signing)
        assert repaired.status == 1, repaired.stderr
        assert "table_declaration_signature_invalid" in {f["kind"] for f in repaired.document["findings"]}
    else:
        queried = run_pcbo_in_process(
            ["query", "--dataset", DATASET, "SELECT count(*) FROM evil.loot"], home=home, env=signing
        )
        assert queried.status == 2 and "publishes no table" in queried.stderr, queried.stderr
    if forged == "unsigned":
        assert not evil.exists() and not (tmp_path / "attacker").exists()
    else:
        assert _table_count(home) == before  # v1 published into no table of v2's catalog
    verified = run_pcbo_in_process(["verify"], home=home, env=signing)
    assert verified.status == 1
    kinds = {f["kind"] for f in verified.document["findings"]}
    assert {"table_declaration_signature_invalid", "table_publication_not_on_chain"} <= kinds, kinds


def test_a_table_declaration_is_signed_with_the_operators_key_and_counts_once_signed(tmp_path: Path) -> None:
    """With the operator's key, the declaration pcbo appends carries its signature over this chain's
    statement, the table is published and verify is clean; a declaration appended before the key was
    configured (unsigned) counts for nothing once it is: a run naming the table declares it again,
    signed, and publishes to it."""
    from pcbo_dagster.core.operator_signatures import verified_statement
    from pcbo_dagster.core.signed_note import parse_signing_key

    home, signing = tmp_path / "home", _operator_key(tmp_path)
    first = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r1.json", _request("s1"))], home=home
    )
    assert first.status == 0, first.stderr
    (unsigned,) = _declarations(home)
    assert "operator_signature" not in unsigned
    v1_ids = _ids(_manifest_rows(home))
    second = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r2.json", _request("s2", existing=v1_ids[:1]))],
        home=home,
        env=signing,
    )
    assert second.status == 0, second.stderr
    assert second.document["table"]["status"] == "published"
    declarations = _declarations(home)
    assert len(declarations) == 2
    verifier = parse_signing_key(Path(signing["PCBO_SIGNING_KEY"]).read_text()).verifier()
    assert verified_statement(declarations[1], verifier) is not None
    assert verified_statement(unsigned, verifier) is None
    _assert_table_is_the_manifests(home, _table(home))
    verified = run_pcbo_in_process(["verify"], home=home, env=signing)
    assert verified.status == 1  # the unsigned declaration of before the key, reported, counting for nothing
    assert [f["kind"] for f in verified.document["findings"]] == ["table_declaration_signature_invalid"]


@pytest.mark.parametrize("when", ["before_the_table", "after_the_table"])
def test_no_table_file_is_written_through_a_warehouse_linked_out_of_the_lake(
    tmp_path: Path, when: str, request: pytest.FixtureRequest
) -> None:
    """The red-team attack: the lake's `_iceberg` warehouse replaced by a symbolic link to a directory
    outside the lake (lake write access only). Publication refuses (exit 1, the lake's commits stand)
    and writes nothing there; `verify` reports the link."""
    outside = tmp_path / "outside"
    if when == "after_the_table":  # run ice-1 published first
        home, first = request.getfixturevalue("published")
        assert first.status == 0
        warehouse = lake_dir(home) / "_iceberg"
        warehouse.rename(outside)
    else:
        home = tmp_path / "home"
        warehouse = lake_dir(home) / "_iceberg"
        outside.mkdir()
        warehouse.parent.mkdir(parents=True)
    os.symlink(outside, warehouse)
    before = sorted(p for p in outside.rglob("*"))
    changed = _request("b", existing=_ids(_manifest_rows(home))[:1] if when == "after_the_table" else None)
    result = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "b.json", changed)], home=home
    )
    assert result.status == 1, result.stderr
    assert sorted(p for p in outside.rglob("*")) == before, "a table file was written outside the lake"
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1
    assert "path_outside_lake" in {f["kind"] for f in verified.document["findings"]}, verified.document


def test_a_dataset_version_publishes_to_one_table_and_no_secret_in_a_request(
    tmp_path: Path, published: FirstRun
) -> None:
    home, first = published
    assert first.status == 0
    other = write_request(
        tmp_path / "b.json", _request("b", table={"format": "iceberg", "name": "lake.other"})
    )
    moved = run_pcbo_in_process(["execute", "--input", other], home=home)
    assert moved.status == 2 and "publishes to one table" in moved.stderr
    # Another dataset naming this dataset's table is refused before anything is written.
    intruder = {**_request("i"), "dataset": "intruder"}
    taken = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "i.json", intruder)], home=home
    )
    assert taken.status == 2 and "table" in taken.stderr and "is the table of" in taken.stderr
    assert not (lake_dir(home) / "intruder").exists()
    secret = _request("c", table={"format": "iceberg", "name": "x.y", "catalog": "postgresql://u:pw@h/db"})
    refused = run_pcbo_forked(["execute", "--input", write_request(tmp_path / "c.json", secret)], home=home)
    assert refused.status == 2 and "table.catalog" in refused.stderr and "pw" not in refused.stderr
    # A request without `table` publishes to the recorded one.
    plain = _request("d", existing=_ids(_manifest_rows(home))[:1])
    del plain["table"]
    assert (
        run_pcbo_in_process(
            ["execute", "--input", write_request(tmp_path / "d.json", plain)], home=home
        ).status
        == 0
    )
    _assert_table_is_the_manifests(home, _table(home))


@pytest.mark.postgres
def test_the_pcbo_catalogs_postgresql_database_holds_the_iceberg_catalog(
    tmp_path: Path, fresh_postgres_url: str
) -> None:
    home = tmp_path / "home"
    env = {"PCBO_CATALOG_URL": fresh_postgres_url}
    request = _request("pg-1", table={"format": "iceberg", "catalog": "pcbo", "name": "lake.events"})
    done = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r.json", request)], home=home, env=env
    )
    assert done.status == 0, done.stderr
    table = _table(home, uri=fresh_postgres_url)
    _assert_table_is_the_manifests(home, table)
    assert not (home / "iceberg.db").exists()
    assert run_pcbo_in_process(["verify"], home=home, env=env).status == 0
    counted = run_pcbo_in_process(
        ["query", "--dataset", DATASET, "SELECT count(*) FROM lake.events"], home=home, env=env
    )
    assert counted.document["rows"] == [[table.scan().to_arrow().num_rows]]


def test_staging_publishes_to_a_branch_and_promotion_replaces_main_with_the_approved_state(
    tmp_path: Path,
) -> None:
    """Write-audit-publish: staging's partitions are on the table's `staging` branch only; after the
    soak and the approval, promotion publishes production's byte-identical files to `main` in one
    snapshot that names the approved staging snapshot."""
    from datetime import UTC, datetime

    from pcbo_dagster.datasets.config import parse_datasets_config
    from pcbo_dagster.engine.settings import Settings
    from pcbo_dagster.rollout import operations
    from pcbo_dagster.rollout.clock import ManualClock

    records = [
        {"id": f"s-{h}-{n}", "occurredAt": f"2024-01-01T{h:02d}:{n:02d}:00Z", "jurisdiction": "US",
         "consentGranted": True, "converted": n % 2 == 0}
        for h in range(3) for n in range(h + 2)
    ]  # fmt: skip
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = parse_datasets_config(
        """
datasets:
  - name: sessions
    partitioning:
      {kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-01T03:00:00Z"}
    source: {uri: s.jsonl}
    table: {format: iceberg, name: lake.sessions}
    rollout: {throttle: {}, soak: {windowMinutes: 5}, APPROVERS}
""".replace("APPROVERS", APPROVERS_YAML),
        base_dir=tmp_path,
    )
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(datetime(2026, 1, 5, 8, 0, tzinfo=UTC))
    keys = ["20240101T000000Z", "20240101T020000Z"]
    operations.start(config, base, "sessions", keys[0], keys[1], by="ana", name="r", clock=clock)
    table = _table(base.home, "lake.sessions")
    staged = table.metadata.snapshot_by_name("staging")
    created = table.metadata.snapshot_by_name("main")  # pyiceberg writes a branch once a snapshot exists
    assert (
        staged is not None and created is not None and created.summary["pcbo.kind"] == "pcbo.table-created/1"
    )
    assert not list(table.scan().plan_files())  # main publishes nothing before the promotion
    staging_rows = table.scan().use_ref("staging").to_arrow().sort_by("id")
    assert _ids(staging_rows) == _ids(_manifest_rows(base.home / "staging", "sessions"))
    assert len(staging_rows) == len(records)

    clock.advance(600)
    operations.soak(config, base, clock=clock)
    operations.decide(config, base, "r", "approve", key=CY, reason="fine", clock=clock)
    operations.promote(config, base, "r", by="cy", clock=clock)
    table = _table(base.home, "lake.sessions")
    main = table.metadata.snapshot_by_name("main")
    assert main is not None and main.parent_snapshot_id == created.snapshot_id  # one promotion snapshot
    assert main.summary["pcbo.approved-snapshot-id"] == str(staged.snapshot_id)
    promoted = table.scan().to_arrow().sort_by("id")
    assert promoted.to_pylist() == staging_rows.to_pylist()
    assert {t.file.file_path for t in table.scan().plan_files()} == _manifest_file_uris(base.home, "sessions")
    assert run_pcbo_in_process(["verify"], home=base.home).status == 0
    assert run_pcbo_in_process(["verify"], home=base.home / "staging").status == 0
    staged_query = run_pcbo_in_process(
        ["query", "--dataset", "sessions", "--branch", "staging", "SELECT count(*) FROM lake.sessions"],
        home=base.home,
    )
    assert staged_query.document["rows"] == [[len(records)]]


def test_a_table_is_declared_under_the_lease(tmp_path: Path) -> None:
    """Red-team finding: the table declaration was appended before the run took its lease, so a run
    waiting for another (or racing it) wrote to a chain under way: two runs naming two tables both
    declared theirs (seq 0 and 1, verify clean), and the fence made the run holding the lease fail.
    A run that waits for the lease declares nothing until it holds it."""
    from pcbo_dagster.catalog import CatalogStore

    home = tmp_path / "home"
    other = json.dumps({"run": "other-run", "pid": 1, "host": "another-host", "token": "x"}, sort_keys=True)
    catalog = CatalogStore(f"sqlite:///{home / 'catalog.db'}")
    catalog.migrate()
    try:
        assert catalog.try_acquire_lease(DATASET, "v1", other, 600) is None
        busy = run_pcbo_in_process(
            ["execute", "--input", write_request(tmp_path / "a.json", _request("wait-1"))],
            home=home,
            env={"PCBO_LEASE_WAIT_SECONDS": "1"},
        )
        assert busy.status == 1 and "other-run" in busy.stderr, busy.stderr
        assert backup_events(home, DATASET) == []  # no declaration while another run writes
        catalog.release_lease(DATASET, "v1", other)
    finally:
        catalog.close()
    done = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "a.json", _request("wait-1"))], home=home
    )
    assert done.status == 0, done.stderr
    refused = run_pcbo_in_process(
        [
            "execute",
            "--input",
            write_request(
                tmp_path / "b.json", _request("wait-2", table={"format": "iceberg", "name": "lake.other"})
            ),
        ],
        home=home,
    )
    assert refused.status == 2 and "publishes to one table" in refused.stderr, refused.stderr
    kinds = [e["event_type"] for e in backup_events(home, DATASET)]
    assert kinds.count("table_publication_recorded") == 1


def _guarded_table(home: Path) -> Any:
    """The table through pcbo's catalog (pyiceberg's own SqlCatalog runs a FileIO class the metadata
    names: after a metadata attack, a test loading the table that way would run the attacker's code)."""
    return open_catalog(f"sqlite:///{home}/iceberg.db").load_table("lake.events")


def _rewrite_table_metadata(home: Path, edit: Any) -> None:
    """What someone who can write the lake does: edit the table's current metadata file in place."""
    with sqlite3.connect(home / "iceberg.db") as db:
        (location,) = db.execute("SELECT metadata_location FROM iceberg_tables").fetchone()
    path = Path(location.removeprefix("file://"))
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


@pytest.mark.parametrize("attack", ["code", "columns"])
def test_table_properties_in_the_lake_run_no_code_and_swap_no_columns(
    tmp_path: Path, published: FirstRun, attack: str
) -> None:
    """The red-team attack, with lake write access only: the table's metadata file names a FileIO class
    (`py-io-impl`), which pyiceberg imported and called with the table's properties on every load —
    `logging.config.fileConfig` reads a config file the attacker wrote in the lake and `eval`s its
    handler arguments: code ran in `pcbo verify`. Or its name mapping swaps two columns for every
    reader while the file list stays exact. Both are a finding; nothing runs, nothing is published."""
    home, first = published
    assert first.status == 0
    pwned = tmp_path / "PWNED"
    if attack == "code":
        evil = lake_dir(home) / "events" / "logging.ini"
        evil.write_text(
            "[formatters]\nkeys=\n[handlers]\nkeys=h\n[handler_h]\nclass=NullHandler\n"
            f"args=(__import__('pathlib').Path({str(pwned)!r}).write_text('owned'),)\n"
            "[loggers]\nkeys=root\n[logger_root]\nhandlers=\n"
        )

        def edit(metadata: dict[str, Any]) -> None:
            metadata["properties"].update({"py-io-impl": "logging.config.fileConfig", str(evil): "x"})
    else:

        def edit(metadata: dict[str, Any]) -> None:
            mapping = json.loads(metadata["properties"]["schema.name-mapping.default"])
            ids = {m["names"][0]: m["field-id"] for m in mapping}
            for m in mapping:  # the files' `channel` read as `jurisdiction` and the other way round
                m["field-id"] = {"channel": ids["jurisdiction"], "jurisdiction": ids["channel"]}.get(
                    m["names"][0], m["field-id"]
                )
            metadata["properties"]["schema.name-mapping.default"] = json.dumps(mapping)

    _rewrite_table_metadata(home, edit)

    if attack == "columns":  # what every reader now sees
        scanned = _guarded_table(home).scan().to_arrow().sort_by("id")
        assert (
            scanned.column("channel").to_pylist() == _manifest_rows(home).column("jurisdiction").to_pylist()
        )
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1, verified.stderr
    assert [f["kind"] for f in verified.document["findings"]] == ["table_properties_altered"]
    assert run_pcbo_in_process(["verify", "--repair"], home=home).document["repaired"] == []
    before = _guarded_table(home).current_snapshot().snapshot_id
    changed = _request("ice-2", existing=_ids(_manifest_rows(home))[:1])
    refused = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r2.json", changed)], home=home
    )
    assert refused.status == 1 and refused.document["table"]["status"] == "refused", refused.stderr
    assert _guarded_table(home).current_snapshot().snapshot_id == before
    assert not pwned.exists(), "a class named by the table's metadata ran"


def test_a_current_snapshot_apart_from_main_is_a_finding(tmp_path: Path, published: FirstRun) -> None:
    """The red-team attack, with lake write access only: the metadata file's `current-snapshot-id` set
    back to the snapshot before a re-version while its `main` ref stays. Every reader reading the table
    (pyiceberg's scan, DuckDB's `iceberg_scan`) got the superseded version's rows; `verify` judged the
    `main` ref only and was clean. It is a finding; publication refuses to build on it."""
    home, first = published
    assert first.status == 0
    v1_ids = _ids(_manifest_rows(home))
    changed = write_request(tmp_path / "r2.json", _request("ice-2", existing=v1_ids[:2]))
    assert run_pcbo_in_process(["execute", "--input", changed], home=home).status == 0

    def edit(metadata: dict[str, Any]) -> None:
        current = next(
            s for s in metadata["snapshots"] if s["snapshot-id"] == metadata["current-snapshot-id"]
        )
        metadata["current-snapshot-id"] = current["parent-snapshot-id"]

    _rewrite_table_metadata(home, edit)
    table = _guarded_table(home)
    assert _ids(table.scan().to_arrow()) == v1_ids and _duckdb_ids(table) == v1_ids  # what readers read
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1
    assert [f["kind"] for f in verified.document["findings"]] == ["table_current_snapshot_not_main"]
    assert run_pcbo_in_process(["verify", "--repair"], home=home).document["repaired"] == []
    third = write_request(tmp_path / "r3.json", _request("ice-3", existing=v1_ids[:3]))
    refused = run_pcbo_in_process(["execute", "--input", third], home=home)
    assert refused.status == 1 and refused.document["table"]["status"] == "refused"
    assert (
        _guarded_table(home).metadata.snapshot_by_name("main").snapshot_id
        == table.metadata.snapshot_by_name("main").snapshot_id
    )


def test_a_file_listed_twice_in_a_pcbo_snapshot_is_a_finding(tmp_path: Path, published: FirstRun) -> None:
    """The red-team attack, with lake write access only: the current pcbo snapshot's manifest list
    swapped for one that lists a committed file twice (a second manifest registering it again), the
    snapshot's properties unchanged. Every reader read that file's rows twice; `verify` compared the
    table's files as a set and was clean. A file listed twice is a finding; nothing is published."""
    home, run = published
    assert run.status == 0
    committed = _ids(_manifest_rows(home))
    table = _guarded_table(home)
    ours = table.current_snapshot()
    first = sorted(task.file.file_path for task in table.scan().plan_files())[0]
    table.add_files([first], check_duplicate_files=False)  # a snapshot listing it twice...
    doubled = _guarded_table(home).current_snapshot()

    def edit(metadata: dict[str, Any]) -> None:  # ...whose manifest list becomes pcbo's snapshot's
        for snapshot in metadata["snapshots"]:
            if snapshot["snapshot-id"] == ours.snapshot_id:
                snapshot["manifest-list"] = doubled.manifest_list
        metadata["snapshots"] = [s for s in metadata["snapshots"] if s["snapshot-id"] != doubled.snapshot_id]
        metadata["snapshot-log"] = [
            e for e in metadata["snapshot-log"] if e["snapshot-id"] != doubled.snapshot_id
        ]
        metadata["current-snapshot-id"] = metadata["refs"]["main"]["snapshot-id"] = ours.snapshot_id

    _rewrite_table_metadata(home, edit)
    table = _guarded_table(home)
    assert table.current_snapshot().snapshot_id == ours.snapshot_id
    read = _ids(table.scan().to_arrow())
    assert len(read) > len(committed) and sorted(set(read)) == committed  # what readers read
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1, verified.document
    kinds = {f["kind"]: f["where"] for f in verified.document["findings"]}
    assert kinds["table_file_listed_twice"].endswith(first.removeprefix(f"file://{lake_dir(home)}/"))
    assert run_pcbo_in_process(["verify", "--repair"], home=home).document["repaired"] == []
    again = write_request(tmp_path / "r2.json", _request("ice-2", existing=committed[:1]))
    refused = run_pcbo_in_process(["execute", "--input", again], home=home)
    assert refused.status == 1 and refused.document["table"]["status"] == "refused"
    assert _guarded_table(home).current_snapshot().snapshot_id == ours.snapshot_id


def _rewrite_manifest_list(table: Any, snapshot: Any, manifests: list[Any]) -> None:
    """`snapshot`'s manifest list rewritten in place (same path) to hold `manifests`, as someone with
    write access to the lake would."""
    from pyiceberg.manifest import write_manifest_list

    Path(snapshot.manifest_list.removeprefix("file://")).unlink()
    with write_manifest_list(
        format_version=table.metadata.format_version,
        output_file=table.io.new_output(snapshot.manifest_list),
        snapshot_id=snapshot.snapshot_id,
        parent_snapshot_id=snapshot.parent_snapshot_id,
        sequence_number=snapshot.sequence_number,
        avro_compression="deflate",
    ) as writer:
        writer.add_manifests(manifests)


@pytest.mark.parametrize("forged", ["bounds", "counts"])
def test_a_manifest_list_whose_summaries_hide_its_files_is_a_finding(
    tmp_path: Path, published: FirstRun, forged: str
) -> None:
    """The red-team attacks, with lake write access only: the current pcbo snapshot's manifest list
    rewritten in place, each manifest's partition summary (the bounds engines prune whole manifests
    by) moved to 1970, or its counts of added and existing files and rows set to 0 (a manifest with
    none is skipped unread). Every filtered read skipped every manifest (`pcbo query` counted 0 rows
    after an instant), or every read did (DuckDB's `iceberg_scan`: 0 rows); `verify` read each entry
    and was clean. A manifest list entry that is not what its manifest gives is a finding."""
    import struct

    from pyiceberg.manifest import PartitionFieldSummary

    home, run = published
    assert run.status == 0
    table = _guarded_table(home)
    snapshot = table.current_snapshot()
    after = "occurredAt >= '2024-01-01T01:00:00+00:00'"
    assert table.scan(row_filter=after).to_arrow().num_rows > 0
    manifests = snapshot.manifests(table.io)
    for manifest in manifests:  # (a ManifestFile's fields by position: counts 7, 8, 10, 11; bounds 13)
        if forged == "bounds":
            manifest[13] = [
                PartitionFieldSummary(
                    s.contains_null, s.contains_nan, struct.pack("<i", 0), struct.pack("<i", 1)
                )
                for s in manifest.partitions or []
            ]
        else:
            manifest[7] = manifest[8] = manifest[10] = manifest[11] = 0
    _rewrite_manifest_list(table, snapshot, manifests)
    table = _guarded_table(home)
    if forged == "bounds":
        assert table.scan(row_filter=after).to_arrow().num_rows == 0  # what a filtered read reads
    else:
        query = [
            "query",
            "--dataset",
            DATASET,
            "--reader",
            "duckdb-iceberg",
            "SELECT count(*) FROM lake.events",
        ]
        assert run_pcbo_in_process(query, home=home).document["rows"] == [[0]]  # what DuckDB reads
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1, verified.document
    kinds = [f["kind"] for f in verified.document["findings"]]
    assert kinds.count("table_manifest_summary_mismatch") == len(manifests), kinds
    assert run_pcbo_in_process(["verify", "--repair"], home=home).document["repaired"] == []
    again = write_request(tmp_path / "r2.json", _request("ice-2", existing=_ids(_manifest_rows(home))[:1]))
    refused = run_pcbo_in_process(["execute", "--input", again], home=home)
    assert refused.status == 1 and refused.document["table"]["status"] == "refused"
    assert _guarded_table(home).current_snapshot().snapshot_id == snapshot.snapshot_id


def test_a_manifest_list_forged_after_a_read_in_the_same_process_is_a_finding(published: FirstRun) -> None:
    """A process that lives on (the HTTP API's `verify`, a Dagster code server) verifies the table, then
    someone with lake write access rewrites the manifest list in place (each manifest's counts set to
    0, as above) and it verifies again. pyiceberg keeps every manifest list entry it read in a
    process-wide cache keyed by the manifest's path, and `Snapshot.manifests` answers the rewritten
    list's entries from it: the second `verify` judged the honest entries it read first and was
    clean. The checks read the manifest list from the file each time."""
    from pyiceberg.manifest import read_manifest_list

    from pcbo_dagster.engine.verify import verify

    def findings() -> list[str]:
        env = _open_env(home)
        try:
            return [f["kind"] for f in verify(env)["findings"]]
        finally:
            env.close()

    home, first = published
    assert first.status == 0
    assert findings() == []  # read once in this process
    table = _guarded_table(home)
    snapshot = table.current_snapshot()
    manifests = list(read_manifest_list(table.io.new_input(snapshot.manifest_list)))
    for manifest in manifests:  # (counts: fields 7, 8, 10, 11 of a ManifestFile)
        manifest[7] = manifest[8] = manifest[10] = manifest[11] = 0
    _rewrite_manifest_list(table, snapshot, manifests)
    assert findings().count("table_manifest_summary_mismatch") == len(manifests)


def test_a_schema_conflict_is_reported_in_the_json_document_alone(
    tmp_path: Path, published: FirstRun
) -> None:
    """A table schema the files do not fit (here the metadata file's `amount` edited to a string) is
    `table_schema_conflict`; pyiceberg's check also printed its comparison table on standard output
    ahead of the JSON document, so `pcbo verify | jq` (and every reader of the document) failed."""
    home, run = published
    assert run.status == 0

    def edit(metadata: dict[str, Any]) -> None:
        schema = next(s for s in metadata["schemas"] if s["schema-id"] == metadata["current-schema-id"])
        next(f for f in schema["fields"] if f["name"] == "amount")["type"] = "string"

    _rewrite_table_metadata(home, edit)
    verified = run_pcbo(["verify"], home=home)
    assert verified.status == 1
    assert verified.document is not None, "stdout is not one JSON document"
    assert "table_schema_conflict" in {f["kind"] for f in verified.document["findings"]}


@pytest.mark.parametrize("forged", ["partition", "upper_bounds"])
def test_a_file_entry_with_forged_partition_or_bounds_is_a_finding(
    tmp_path: Path, published: FirstRun, forged: str
) -> None:
    """The red-team attack, with lake write access only: a snapshot listing exactly the committed files
    (and carrying the pcbo snapshot's properties), one file's entry re-registered with its partition
    value moved a day back, or its `occurredAt` upper bound below its rows. Every filtered read
    pruned that file away (its rows vanished from `pcbo query` and every engine); `verify` compared
    paths, row counts and sizes only and was clean. The entry is checked against the file itself."""
    from pyiceberg.manifest import DataFile
    from pyiceberg.typedef import Record

    home, first = published
    assert first.status == 0
    query = "SELECT count(*) FROM lake.events WHERE occurredAt >= TIMESTAMPTZ '2024-01-01 03:00:00+00'"
    honest = run_pcbo_in_process(["query", "--dataset", DATASET, query], home=home).document["rows"]
    assert honest[0][0] > 0
    table = _guarded_table(home)
    snapshot = table.current_snapshot()
    entries = [e.data_file for m in snapshot.manifests(table.io) for e in m.fetch_manifest_entry(table.io)]
    victim = max(entries, key=lambda d: d.file_path)  # the last hour's file
    fields = {
        name: getattr(victim, name)
        for name in ("content", "file_path", "file_format", "record_count", "file_size_in_bytes",
                     "column_sizes", "value_counts", "null_value_counts", "nan_value_counts", "lower_bounds",
                     "upper_bounds", "key_metadata", "split_offsets", "equality_ids", "sort_order_id")
    }  # fmt: skip
    if forged == "partition":
        fields["partition"] = Record(victim.partition[0] - 24)
    else:
        fields["partition"] = victim.partition
        day_before = int.from_bytes(victim.lower_bounds[2], "little") - 86_400_000_000  # microseconds
        bound = day_before.to_bytes(8, "little", signed=True)
        fields["lower_bounds"] = {**victim.lower_bounds, 2: bound}
        fields["upper_bounds"] = {**victim.upper_bounds, 2: bound}
    properties = {k: v for k, v in snapshot.summary.additional_properties.items() if k.startswith("pcbo.")}
    tx = table.transaction()
    with tx.update_snapshot(snapshot_properties=properties).overwrite() as change:
        change.delete_data_file(victim)
        change.append_data_file(DataFile.from_args(**fields))
    tx.commit_transaction()
    assert run_pcbo_in_process(["query", "--dataset", DATASET, query], home=home).document["rows"] != honest
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1
    findings = verified.document["findings"]
    assert [f["kind"] for f in findings] == ["table_file_metadata_mismatch"]
    assert (
        findings[0]["where"].endswith(victim.file_path.rsplit("/lake/", 1)[1])
        and forged in findings[0]["detail"]
    )
    assert run_pcbo_in_process(["verify", "--repair"], home=home).document["repaired"] == []
    changed = _request("ice-2", existing=_ids(_manifest_rows(home))[:1])
    refused = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r2.json", changed)], home=home
    )
    assert refused.status == 1 and refused.document["table"]["status"] == "refused"


@pytest.mark.parametrize("attack", ["catalog_pointer", "manifest_list", "garbage"])
def test_table_metadata_naming_a_file_outside_its_directory_is_not_read(
    tmp_path: Path, published: FirstRun, attack: str
) -> None:
    """The red-team attack: the Iceberg catalog's row (catalog write access) or the table's metadata
    file (lake write access) points at a file elsewhere on the host. pyiceberg read it — `verify`,
    `execute` and `query` ended in an internal error, and with PCBO_DEBUG the traceback showed the
    file's first line. Now it is `path_outside_lake` and nothing is read; a metadata file that is not
    one is `table_unreadable` (a finding, never an internal error); no snapshot is published."""
    home, first = published
    assert first.status == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-hunter2\n")
    with sqlite3.connect(home / "iceberg.db") as db:
        (location,) = db.execute("SELECT metadata_location FROM iceberg_tables").fetchone()
    if attack == "catalog_pointer":
        with sqlite3.connect(home / "iceberg.db") as db:
            db.execute("UPDATE iceberg_tables SET metadata_location = ?", (f"file://{secret}",))
    elif attack == "manifest_list":

        def edit(metadata: dict[str, Any]) -> None:
            for snapshot in metadata["snapshots"]:
                snapshot["manifest-list"] = f"file://{secret}"

        _rewrite_table_metadata(home, edit)
    else:
        Path(location.removeprefix("file://")).write_text("not a metadata file\n")
    expected = "table_unreadable" if attack == "garbage" else "path_outside_lake"
    verified = run_pcbo_forked(["verify"], home=home, env={"PCBO_DEBUG": "1"})
    assert verified.status == 1, verified.stderr
    assert [f["kind"] for f in verified.document["findings"]] == [expected]
    assert "TOPSECRET" not in verified.stderr + json.dumps(verified.document)
    changed = _request("ice-2", existing=_ids(_manifest_rows(home))[:1])
    refused = run_pcbo_forked(
        ["execute", "--input", write_request(tmp_path / "r2.json", changed)],
        home=home,
        env={"PCBO_DEBUG": "1"},
    )
    assert refused.status == 1 and refused.document["table"]["status"] == "refused", refused.stderr
    assert [f["kind"] for f in refused.document["table"]["findings"]] == [expected]
    assert "TOPSECRET" not in refused.stderr + json.dumps(refused.document)
    queried = run_pcbo_forked(["query", "--dataset", DATASET, "SELECT 1"], home=home, env={"PCBO_DEBUG": "1"})
    assert queried.status == 1 and expected in queried.stderr and "TOPSECRET" not in queried.stderr
    with sqlite3.connect(home / "iceberg.db") as db:  # nothing published over it
        now = db.execute("SELECT metadata_location FROM iceberg_tables").fetchone()[0]
    assert now == (f"file://{secret}" if attack == "catalog_pointer" else location)


def test_a_table_of_another_dataset_is_refused_even_with_its_catalog_row_deleted(
    tmp_path: Path, published: FirstRun
) -> None:
    """The red-team attack (catalog write access): the `table_publications` rows deleted, so that the
    only check against naming another dataset's table (the catalog's rows) passes. Another dataset
    naming `lake.events` wrote its lake, declared the table on its chain for good and then failed to
    publish (exit 1, `table_not_this_dataset`, every later run refused). The table's own record of
    its dataset is read too: invalid input, exit 2, nothing written."""
    home, first = published
    assert first.status == 0
    with sqlite3.connect(home / "catalog.db") as db:
        db.execute("DELETE FROM table_publications")
    intruder = {**_request("i"), "dataset": "intruder"}
    taken = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "i.json", intruder)], home=home
    )
    assert taken.status == 2 and "is the table of another dataset version" in taken.stderr, taken.stderr
    assert not (lake_dir(home) / "intruder").exists()
    assert backup_events(home, "intruder") == []


@pytest.mark.parametrize("rows", ["kept", "deleted"])
def test_an_execute_naming_another_datasets_table_writes_nothing(
    tmp_path: Path, published: FirstRun, rows: str
) -> None:
    """README walk: an execute of another dataset naming `lake.events` was refused (exit 2, field
    `table`) only under its dataset lock, whose lease had already registered the new dataset version
    in the catalog's `datasets` table: invalid input with a row written. It is refused before the lock
    now (and checked again under it): nothing written, whether the table's catalog row is there or
    was deleted (the table's own `pcbo.chain-key` says whose it is)."""
    home, first = published
    assert first.status == 0
    if rows == "deleted":
        db = sqlite3.connect(home / "catalog.db")
        db.execute("DELETE FROM table_publications")
        db.commit()
        db.close()
    intruder = write_request(tmp_path / "i.json", {**_request("i"), "dataset": "intruder"})
    before = tree_state(home)
    taken = run_pcbo_in_process(["execute", "--input", intruder], home=home)
    assert taken.status == 2 and "is the table of another dataset version" in taken.stderr, taken.stderr
    assert tree_state(home) == before


def test_a_rollback_over_a_diverged_table_finishes_its_work_and_says_so(tmp_path: Path) -> None:
    """The red-team attack: a file added to the table by hand, then a rollback. The rollback undid the
    lake and appended its events, then the refused publication raised out of it: no document, no
    `table_publication_refused` discrepancy, no checkpoint of the chain it had just extended (and its
    changes never announced). Now it does all of that, and fails (exit 1) with its document."""
    from pcbo_dagster.core.signed_note import new_signing_key

    home, key_file = tmp_path / "home", tmp_path / "operator.key"
    key_file.write_text(new_signing_key("ops.example/operator").text + "\n")
    key_file.chmod(0o600)
    signing = {"PCBO_SIGNING_KEY": str(key_file)}
    request = write_request(tmp_path / "r1.json", _request("ice-1"))
    assert run_pcbo_in_process(["execute", "--input", request], home=home, env=signing).status == 0
    forged = tmp_path / "forged.parquet"
    pq.write_table(_manifest_rows(home).slice(0, 1), forged)
    _table(home).add_files([f"file://{forged}"])
    undone = run_pcbo_in_process(
        ["rollback", "--dataset", DATASET, "--run-id", "ice-1"], home=home, env=signing
    )
    assert undone.status == 1 and "publication refused" in undone.stderr
    assert undone.document is not None and undone.document["status"] == "rolled_back", undone.stderr
    assert undone.document["table"]["status"] == "refused"
    assert "table_file_not_in_manifests" in {f["kind"] for f in undone.document["table"]["findings"]}
    with sqlite3.connect(home / "catalog.db") as db:
        kinds = [k for (k,) in db.execute("SELECT kind FROM discrepancy_events")]
        sizes = [n for (n,) in db.execute("SELECT tree_size FROM transparency_checkpoints")]
    assert "table_publication_refused" in kinds
    assert len(sizes) == 2 and sizes[1] > sizes[0]  # the chain the rollback extended is checkpointed


@pytest.mark.parametrize("garbled", ["later", "current"])
def test_a_snapshot_with_a_garbage_audit_seq_is_a_finding_not_an_internal_error(
    tmp_path: Path, published: FirstRun, garbled: str
) -> None:
    """The red-team attack, with lake write access only: the branch moved back to the snapshot before a
    re-version (the state a crash leaves), and the `pcbo.audit-seq` of the later snapshot (or of the
    one moved back to) made something `int()` refuses ("--1" passed the `isdigit` test). `verify`
    ended in an internal error, reporting nothing at all. A seq pcbo never writes is now a finding: a
    later snapshot's makes the move back `table_snapshot_downgraded` (never healed over), the current
    one's `table_snapshot_not_on_chain`."""
    home, first = published
    assert first.status == 0
    changed = write_request(tmp_path / "r2.json", _request("ice-2", existing=_ids(_manifest_rows(home))[:1]))
    assert run_pcbo_in_process(["execute", "--input", changed], home=home).status == 0

    def edit(metadata: dict[str, Any]) -> None:
        latest = next(s for s in metadata["snapshots"] if s["snapshot-id"] == metadata["current-snapshot-id"])
        older = next(s for s in metadata["snapshots"] if s["snapshot-id"] == latest["parent-snapshot-id"])
        metadata["current-snapshot-id"] = older["snapshot-id"]
        metadata["refs"]["main"]["snapshot-id"] = older["snapshot-id"]
        (latest if garbled == "later" else older)["summary"]["pcbo.audit-seq"] = "--1"

    _rewrite_table_metadata(home, edit)
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1 and verified.document is not None, verified.stderr
    expected = "table_snapshot_downgraded" if garbled == "later" else "table_snapshot_not_on_chain"
    assert expected in [f["kind"] for f in verified.document["findings"]]
    assert run_pcbo_in_process(["verify", "--repair"], home=home).document["repaired"] == []


def test_a_partition_spec_edited_to_another_transform_is_a_finding(
    tmp_path: Path, published: FirstRun
) -> None:
    """The red-team attack, with lake write access only: the table's partition spec edited from
    `hour` to `bucket[4]`, so readers take each file's hour number for a bucket and prune by it.
    `verify` was clean (the file list is exact); once entries were checked against the files it
    ended in an internal error on the transform. It is `table_partition_spec_mismatch`; nothing is
    published over it."""
    home, first = published
    assert first.status == 0

    def edit(metadata: dict[str, Any]) -> None:
        for spec in metadata["partition-specs"]:
            for spec_field in spec["fields"]:
                spec_field["transform"] = "bucket[4]"

    _rewrite_table_metadata(home, edit)
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1 and verified.document is not None, verified.stderr
    assert {f["kind"] for f in verified.document["findings"]} == {"table_partition_spec_mismatch"}
    changed = _request("ice-2", existing=_ids(_manifest_rows(home))[:1])
    refused = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r2.json", changed)], home=home
    )
    assert refused.status == 1 and refused.document["table"]["status"] == "refused", refused.stderr


def _table_count(home: Path) -> int:
    """How many tables the embedded Iceberg catalog holds (0 when it was never made)."""
    if not (home / "iceberg.db").exists():
        return 0
    with sqlite3.connect(home / "iceberg.db") as db:
        tables = db.execute("SELECT name FROM sqlite_master WHERE name = 'iceberg_tables'").fetchall()
        return db.execute("SELECT count(*) FROM iceberg_tables").fetchone()[0] if tables else 0


def _duckdb_column(table: Any, column: str) -> list[Any]:
    connection = duckdb.connect()
    for path in duckdb_iceberg_extensions() or []:
        connection.load_extension(path)
    scan = f"iceberg_scan('{table.metadata_location}')"
    return [r[0] for r in connection.execute(f'SELECT "{column}" FROM {scan} ORDER BY "id"').fetchall()]


@pytest.mark.parametrize(
    "field", ["_file", "_Row_Id", "_last_updated_sequence_number", "filename", "$path", "occurredAt_hour"]
)
def test_a_field_named_like_a_metadata_column_is_refused_when_published(tmp_path: Path, field: str) -> None:
    """The red-team attack: records with a field `_file` became a data column `_file` of the table, and
    Spark and DuckDB answer a query for Iceberg's metadata column `_file` (the file a row is in) with
    it: a record said which file it came from, and `verify` passed. DuckDB's own virtual columns
    (`filename`, `_row_id`, ...) are shadowed alike, Trino's hidden columns are `$…`, and a field named
    like the partition field made the table's creation fail after the lake was written (exit 1).
    Now invalid input naming the record's field, exit 2, nothing written; the lake alone takes it."""
    home = tmp_path / "home"
    request = _request("ice-1")
    for record in request["sourceRecords"]:
        record[field] = "s3://elsewhere/forged.parquet"
    refused = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r1.json", request)], home=home
    )
    assert refused.status == 2, refused.stderr
    named = re.search(rf"sourceRecords\[(\d+)\]\.{re.escape(field)}: ", refused.stderr)
    assert named is not None, refused.stderr
    assert field in request["sourceRecords"][int(named.group(1))]
    assert not home.exists()  # not even the home (a catalog, lock files) before it is refused
    # Without a table the same records are written as before, the field a column of the files.
    del request["table"]
    plain = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r2.json", request)], home=home
    )
    assert plain.status == 0, plain.stderr
    assert field in _manifest_rows(home).column_names


@pytest.mark.parametrize("field", ["ID", "CONSENTGRANTED", "Channel", "\uff49\uff44"])
def test_a_field_equal_but_for_case_to_another_column_is_refused_when_published(
    tmp_path: Path, field: str
) -> None:
    """The red-team attack: a record with a field `ID` beside its `id` made a table with columns `id` and
    `ID` (Iceberg names are case-sensitive); DuckDB's `iceberg_scan`, which folds case, then read every
    column of every row as null, and `verify` passed. A name equal but for case (or NFKC: `ｉｄ`) to
    another column is refused as a CSV header or a parquet source names it twice: exit 2, nothing
    written."""
    home = tmp_path / "home"
    request = _request("ice-1")
    record = next(r for r in request["sourceRecords"] if r.get("consentGranted") is True and "channel" in r)
    record[field] = "forged"
    index = request["sourceRecords"].index(record)
    refused = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r1.json", request)], home=home
    )
    assert refused.status == 2, refused.stderr
    if field == "Channel":  # two fields of the records: the one after in byte order is named
        assert "].channel: " in refused.stderr and "column Channel" in refused.stderr, refused.stderr
    else:  # beside one of pcbo's own columns: the other one
        assert f"sourceRecords[{index}].{field}: " in refused.stderr, refused.stderr
    assert "fold case" in refused.stderr
    assert not (lake_dir(home) / DATASET).exists() and backup_events(home, DATASET) == []
    assert _table_count(home) == 0


@pytest.mark.parametrize("field", ["ID", "_file", "$path"])
def test_a_dry_run_refuses_the_field_names_an_execute_refuses(tmp_path: Path, field: str) -> None:
    """A dry-run promises what execute will do, but it did not check the names of the columns a
    request publishes to an Iceberg table: a record with a field `ID` beside its `id` (or `_file`,
    `$path`) was an approved dry-run (exit 0, a decision hash) of a request its execute then refused
    (exit 2). The dry-run now calls the execute's own check (`refuse_column_names`): the same
    refusal, naming the same field, exit 2, nothing written."""
    home = tmp_path / "home"
    request = _request("ice-1")
    record = next(r for r in request["sourceRecords"] if r.get("consentGranted") is True)
    record[field] = "forged"
    path = write_request(tmp_path / "r1.json", request)
    dry = run_pcbo_in_process(["dry-run", "--input", path], home=home)
    assert dry.status == 2 and dry.document is None, dry.stderr
    refused = run_pcbo_in_process(["execute", "--input", path], home=home)
    assert refused.status == 2, refused.stderr
    assert dry.stderr.replace("dry-run", "execute") == refused.stderr, (dry.stderr, refused.stderr)
    assert not (lake_dir(home) / DATASET).exists() and backup_events(home, DATASET) == []
    # Without a table the same records are a dry-run as before.
    del request["table"]
    plain = run_pcbo_in_process(
        ["dry-run", "--input", write_request(tmp_path / "r2.json", request)], home=home
    )
    assert plain.status == 0, plain.stderr


def _with_field(request: dict[str, Any], field: str) -> tuple[dict[str, Any], int]:
    """`request` with `field` added to one of its consenting records (added), and that record's index."""
    index = next(i for i, r in enumerate(request["sourceRecords"]) if r.get("consentGranted") is True)
    request["sourceRecords"][index][field] = "forged"
    return request, index


@pytest.mark.parametrize("field", ["ID", "_file"])
def test_a_dry_run_refuses_the_field_names_the_table_its_chain_declares_cannot_have(
    tmp_path: Path, field: str
) -> None:
    """A request without `table` publishes to the table its dataset version's chain declares, and its
    execute refuses the fields that table cannot hold; its dry-run checked only a request's own
    `table` (it read no lake chain), so it promised success (exit 0, a decision hash) where execute
    then refused (exit 2). The dry-run now reads the deployment's verified chain: the execute's refusal,
    naming the same field, exit 2, nothing written (not a lock file, a catalog row or a directory).
    A dataset version whose chain declares no table (a lake-only run) dry-runs as before."""
    home = tmp_path / "home"
    lake_only = _request("ice-0")
    del lake_only["table"]
    lake_only["versionLabel"] = "v0"
    assert (
        run_pcbo_in_process(
            ["execute", "--input", write_request(tmp_path / "r0.json", lake_only)], home=home
        ).status
        == 0
    )
    first = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r1.json", _request("ice-1"))], home=home
    )
    assert first.status == 0 and first.document["table"]["status"] == "published", first.stderr
    later, index = _with_field(_request("ice-2"), field)
    del later["table"]
    path = write_request(tmp_path / "r2.json", later)
    before = tree_state(home)
    dry = run_pcbo_in_process(["dry-run", "--input", path], home=home)
    assert dry.status == 2 and dry.document is None, dry.stderr
    assert f"sourceRecords[{index}].{field}: " in dry.stderr, dry.stderr
    assert tree_state(home) == before
    refused = run_pcbo_in_process(["execute", "--input", path], home=home)
    assert refused.status == 2, refused.stderr
    assert dry.stderr.replace("dry-run", "execute") == refused.stderr, (dry.stderr, refused.stderr)
    # The same records for the lake-only version: the dry-run's document, as with no chain at all.
    plain = write_request(tmp_path / "r3.json", {**later, "versionLabel": "v0"})
    on_chain = run_pcbo_in_process(["dry-run", "--input", plain], home=home)
    assert on_chain.status == 0, on_chain.stderr
    assert (
        on_chain.document
        == run_pcbo_in_process(["dry-run", "--input", plain], home=tmp_path / "empty").document
    )
    assert not (tmp_path / "empty").exists()
    assert tree_state(home) == before


def test_a_dry_run_refuses_a_table_other_than_the_one_its_chain_declares(
    tmp_path: Path, published: FirstRun
) -> None:
    """A dataset version publishes to one table, and execute refuses a request naming another
    (`resolve_target`: field `table`, exit 2); its dry-run read the declared table only for the
    columns, so it promised success (exit 0, a decision hash) where execute then refused. The dry-run
    now makes the execute's own check (`refuse_another_table`): the same refusal, exit 2, nothing
    written (not a lock file, a catalog row, a directory or an Iceberg table). The declared table named
    again is a dry-run as before."""
    home, first = published
    assert first.status == 0 and first.document["table"]["status"] == "published", first.stderr
    other = write_request(tmp_path / "r2.json", _request("ice-2", table={**TABLE, "name": "lake.other"}))
    before = tree_state(home)
    dry = run_pcbo_in_process(["dry-run", "--input", other], home=home)
    assert dry.status == 2 and dry.document is None, dry.stderr
    assert "table: " in dry.stderr and "publishes to one table" in dry.stderr, dry.stderr
    assert tree_state(home) == before
    refused = run_pcbo_in_process(["execute", "--input", other], home=home)
    assert refused.status == 2, refused.stderr
    assert dry.stderr.replace("dry-run", "execute") == refused.stderr, (dry.stderr, refused.stderr)
    assert tree_state(home) == before
    same = run_pcbo_in_process(
        ["dry-run", "--input", write_request(tmp_path / "r3.json", _request("ice-2"))], home=home
    )
    assert same.status == 0 and same.document["decisionHash"], same.stderr
    assert tree_state(home) == before


def test_a_dry_run_refuses_the_table_of_another_dataset_version(tmp_path: Path, published: FirstRun) -> None:
    """A table holds one dataset version, and execute refuses a request of another version naming it
    (`refuse_another_datasets_table`: field `table`, exit 2); its dry-run did not check it, so it
    promised success (exit 0, a decision hash) where execute then refused. The dry-run now makes the
    execute's own check, reading the deployment as it reads its chain: the same refusal, exit 2,
    nothing written (not a lock file, a catalog row, a directory, an Iceberg catalog or table). A table
    nobody holds is a dry-run as before, and one on a deployment that has none creates nothing."""
    home, first = published
    assert first.status == 0 and first.document["table"]["status"] == "published", first.stderr
    taken = write_request(tmp_path / "r2.json", {**_request("ice-2"), "versionLabel": "v2"})
    before = tree_state(home)
    dry = run_pcbo_in_process(["dry-run", "--input", taken], home=home)
    assert dry.status == 2 and dry.document is None, dry.stderr
    assert "table: lake.events is the table of another dataset version" in dry.stderr, dry.stderr
    assert tree_state(home) == before
    free = {**_request("ice-2", table={**TABLE, "name": "lake.free"}), "versionLabel": "v2"}
    fresh = run_pcbo_in_process(["dry-run", "--input", write_request(tmp_path / "r3.json", free)], home=home)
    assert fresh.status == 0 and fresh.document["decisionHash"], fresh.stderr
    assert tree_state(home) == before
    empty = run_pcbo_in_process(["dry-run", "--input", taken], home=tmp_path / "empty")
    assert empty.status == 0, empty.stderr
    assert not (tmp_path / "empty").exists()
    # A deployment with a catalog of pcbo's but no Iceberg catalog yet (a lake-only run): none created.
    lake_only = tmp_path / "lake-only"
    plain = {k: v for k, v in _request("ice-0").items() if k != "table"}
    assert (
        run_pcbo_in_process(
            ["execute", "--input", write_request(tmp_path / "r0.json", plain)], home=lake_only
        ).status
        == 0
    )
    lake_only_before = tree_state(lake_only)
    assert run_pcbo_in_process(["dry-run", "--input", taken], home=lake_only).status == 0
    assert tree_state(lake_only) == lake_only_before and not (lake_only / "iceberg.db").exists()
    refused = run_pcbo_in_process(["execute", "--input", taken], home=home)
    assert refused.status == 2, refused.stderr
    assert dry.stderr.replace("dry-run", "execute") == refused.stderr, (dry.stderr, refused.stderr)
    # The catalog's row deleted: the table's own property still names the version it holds, and the
    # dry-run reads it (an existing Iceberg catalog opened, nothing written in it) as execute does.
    db = sqlite3.connect(home / "catalog.db")
    with db:
        db.execute("DELETE FROM table_publications")
    db.close()  # the last connection: its write-ahead log checkpointed into the file, and removed
    before = tree_state(home)
    unrecorded = run_pcbo_in_process(["dry-run", "--input", taken], home=home)
    assert unrecorded.status == 2 and unrecorded.stderr == dry.stderr, unrecorded.stderr
    assert tree_state(home) == before


@pytest.mark.parametrize("forgery", ["event-edited", "declaration-dropped"])
def test_a_dry_run_reads_the_declared_table_from_a_chain_that_verifies(
    tmp_path: Path, published: FirstRun, forgery: str
) -> None:
    """The dry-run reads the chain as every decision does (`partition_checks.verified_chain`, as a
    reader holding no lock): an event edited in the middle of the audit backup, or the table's
    declaration dropped from it (an unverified read would find no table, and no field to refuse), is
    refused as execute refuses it (`ChainNotVerified`, exit 1, naming the chain), nothing written."""
    home, first = published
    assert first.status == 0, first.stderr
    backup = home / "pas" / DATASET / "v1.jsonl"
    lines = backup.read_bytes().splitlines(keepends=True)
    if forgery == "event-edited":
        at = next(i for i, line in enumerate(lines) if b'"partition_committed"' in line)
        event = json.loads(lines[at])
        event["run_id"] = "someone-else"
        lines[at] = json.dumps(event).encode() + b"\n"
    else:
        lines = [line for line in lines if b'"table_publication_recorded"' not in line]
    backup.write_bytes(b"".join(lines))
    later, _ = _with_field(_request("ice-2"), "_file")
    del later["table"]
    path = write_request(tmp_path / "r2.json", later)
    before = tree_state(home)
    dry = run_pcbo_forked(["dry-run", "--input", path], home=home)
    assert dry.status == 1 and dry.document is None, dry.stderr
    assert "the audit chain events/v1 does not verify" in dry.stderr and "Traceback" not in dry.stderr
    assert tree_state(home) == before
    refused = run_pcbo_in_process(["execute", "--input", path], home=home)
    assert refused.status == 1 and "the audit chain events/v1 does not verify" in refused.stderr


def test_a_later_run_of_a_published_dataset_version_is_held_to_the_same_names(
    tmp_path: Path, published: FirstRun
) -> None:
    """A request without `table` publishes to the table its dataset version's chain declares: a JSONL
    source with a `_pos` column is refused there (naming the source's column), nothing written."""
    home, first = published
    assert first.status == 0, first.stderr
    lines, lake, snapshot = backup_lines(home, DATASET), lake_files(home), _table(home).current_snapshot()
    later = _request("ice-2", existing=_ids(_manifest_rows(home))[:1])
    del later["table"]
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps({**r, "_pos": 0}) + "\n" for r in later.pop("sourceRecords")))
    later["source"] = {"uri": str(source)}
    refused = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r2.json", later)], home=home
    )
    assert refused.status == 2, refused.stderr
    assert "source._pos: " in refused.stderr and "metadata column _pos" in refused.stderr
    assert backup_lines(home, DATASET) == lines and lake_files(home) == lake
    assert _table(home).current_snapshot().snapshot_id == snapshot.snapshot_id


@pytest.mark.parametrize("added", ["filename", "Jurisdiction"])
def test_a_table_column_named_like_a_metadata_column_is_a_finding(
    tmp_path: Path, published: FirstRun, added: str
) -> None:
    """A table whose schema holds such a column — made before pcbo refused the fields, or edited by
    someone who can write the lake: a column `filename` added to the schema in the metadata file (its
    name mapping with it), and DuckDB's `filename`, the file a row is in, is null for every row; or
    `Jurisdiction`, and DuckDB reads the policy field `jurisdiction` as null for every row. `verify`
    finds it (`table_column_name_clash`) and nothing is published to it."""
    home, first = published
    assert first.status == 0, first.stderr

    def edit(metadata: dict[str, Any]) -> None:  # an optional column added, its name mapped
        schema = next(s for s in metadata["schemas"] if s["schema-id"] == metadata["current-schema-id"])
        metadata["last-column-id"] += 1
        column = {"id": metadata["last-column-id"], "name": added, "required": False, "type": "string"}
        schema["fields"].append(column)
        mapping = json.loads(metadata["properties"]["schema.name-mapping.default"])
        mapping.append({"field-id": column["id"], "names": [added]})
        metadata["properties"]["schema.name-mapping.default"] = json.dumps(mapping)

    _rewrite_table_metadata(home, edit)
    table = _guarded_table(home)
    assert set(_duckdb_column(table, added.lower())) == {None}
    verified = run_pcbo_in_process(["verify"], home=home)
    assert verified.status == 1, verified.stderr
    assert [(f["kind"], f["where"]) for f in verified.document["findings"]] == [
        ("table_column_name_clash", f"lake.events@main: {added}")
    ]
    before = table.current_snapshot().snapshot_id
    changed = _request("ice-2", existing=_ids(_manifest_rows(home))[:1])
    refused = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r2.json", changed)], home=home
    )
    assert refused.status == 1 and refused.document["table"]["status"] == "refused", refused.stderr
    assert [f["kind"] for f in refused.document["table"]["findings"]] == ["table_column_name_clash"]
    assert _guarded_table(home).current_snapshot().snapshot_id == before


def test_files_written_before_the_table_are_not_published_with_such_a_column(tmp_path: Path) -> None:
    """A dataset version's first run wrote the lake alone, a record's `_file` a column of its files;
    a later run of its last hour names a table, without the field: the table would be made from the
    chain's current files, the earlier hours' `_file` column and all. Publication refuses instead
    (exit 1, the lake's commits stand, no table made), and so does `verify --repair`."""
    home = tmp_path / "home"
    request = _request("ice-1")
    del request["table"]
    for record in request["sourceRecords"]:
        record["_file"] = "s3://elsewhere/forged.parquet"
    assert (
        run_pcbo_in_process(
            ["execute", "--input", write_request(tmp_path / "r1.json", request)], home=home
        ).status
        == 0
    )
    later = {**_request("ice-2"), "start": "2024-01-01T03:00:00Z"}  # the last hour only, no `_file`
    refused = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r2.json", later)], home=home
    )
    assert refused.status == 1, refused.stderr
    assert refused.document["table"]["status"] == "refused"
    assert [f["kind"] for f in refused.document["table"]["findings"]] == ["table_column_name_clash"]
    assert _table_count(home) == 0
    repaired = run_pcbo_in_process(["verify", "--repair"], home=home)
    assert repaired.status == 1, repaired.stderr
    assert [f["kind"] for f in repaired.document["findings"]] == ["table_column_name_clash"]
    assert _table_count(home) == 0


def test_a_field_named_like_a_ledger_tables_partition_field_is_refused(tmp_path: Path) -> None:
    """A ledger grid aligned to its size is partitioned by `truncate(N)` on the ledger field, the
    partition field `<ledger field>_trunc`: a record field of that name (any case) is refused as the
    time tables' `occurredAt_hour` is, exit 2, nothing written."""
    home = tmp_path / "home"
    records = [
        {
            "id": f"ledger-{n}",
            "occurredAt": "2024-01-01T00:00:00Z",
            "ledgerSequence": n,
            "consentGranted": True,
            "jurisdiction": "US",
            **({"LedgerSequence_TRUNC": 0} if n == 70 else {}),
        }
        for n in range(128)
    ]
    request = {
        "runId": "ledgers-1",
        "dataset": DATASET,
        "ledgerRange": {"field": "ledgerSequence", "first": 0, "end": 128, "partitionSize": 64},
        "sourceRecords": records,
        "table": TABLE,
    }
    refused = run_pcbo_in_process(
        ["execute", "--input", write_request(tmp_path / "r1.json", request)], home=home
    )
    assert refused.status == 2, refused.stderr
    assert "sourceRecords[70].LedgerSequence_TRUNC: " in refused.stderr
    assert "partition field ledgerSequence_trunc" in refused.stderr
    assert not (lake_dir(home) / DATASET).exists() and _table_count(home) == 0


# -- whether a dataset version publishes is decided from the chain it verified ---------------------


def _hide_declarations_from_unverified_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attacker's write between a verified read of the chain and the publication decision (a race
    that cannot be timed otherwise): every read of the audit backup that does not verify (`read_chain`)
    gets the chain without its `table_publication_recorded` event. Verified reads
    (`read_chain_with_problems`) get the backup as it is."""
    from pcbo_dagster.audit.backup import AuditBackup

    real = AuditBackup.read_chain

    def doctored(self: AuditBackup, chain_key: str) -> list[dict]:
        return [e for e in real(self, chain_key) if e.get("event_type") != "table_publication_recorded"]

    monkeypatch.setattr(AuditBackup, "read_chain", doctored)


def _published_first_run(published: FirstRun) -> tuple[Path, list[str]]:
    """A home whose dataset version declared `lake.events` and published run ice-1 to it."""
    home, first = published
    assert first.status == 0, first.stderr
    return home, _assert_table_is_the_manifests(home, _table(home))


def _open_env(home: Path) -> Any:
    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.settings import Settings

    return Environment.open(Settings.resolve(home=str(home), env={}, parallel=1))


def _second_run_without_table(tmp_path: Path, v1_ids: list[str]) -> Path:
    """A re-version of one partition (an id already present) whose request names no table: where it
    publishes is what the chain declares."""
    request = _request("ice-2", existing=v1_ids[:1])
    del request["table"]
    return write_request(tmp_path / "r2.json", request)


def _second_run_with_declarations_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: FirstRun
) -> tuple[Path, list[str], Any, Any, Any]:
    """After run ice-1 published to `lake.events`: run ice-2 (no table) loaded, evaluated and past its
    gates, with every unverified read of the backup from now on missing the table's declaration.
    Returns (home, ice-1's ids, loaded, plan, decisions)."""
    from pcbo_dagster.engine.execute import check_gates
    from pcbo_dagster.engine.request_loading import evaluate, load_request

    home, v1_ids = _published_first_run(published)
    request_file = _second_run_without_table(tmp_path, v1_ids)
    _hide_declarations_from_unverified_reads(monkeypatch)
    loaded = load_request(request_file.read_bytes(), request_file.parent)
    plan, decisions = evaluate(loaded)
    check_gates(loaded, decisions)
    return home, v1_ids, loaded, plan, decisions


def test_an_execute_publishes_where_its_verified_chain_declares_whatever_the_backup_says_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: FirstRun
) -> None:
    """Red-team finding: `publisher_for` decided "publishes nowhere" from a second, unverified read of
    the audit backup made after the run had verified its chain: a declaration hidden from that read
    (the attacker's write between the two) had the run commit to the lake and skip its table, exit 0.
    The decision is now the verified chain's: the run publishes to the declared table."""
    from pcbo_dagster.engine.execute import execute

    home, v1_ids, loaded, plan, decisions = _second_run_with_declarations_hidden(
        tmp_path, monkeypatch, published
    )
    env = _open_env(home)
    try:
        document = execute(env, loaded, plan, decisions)
    finally:
        env.close()
    assert (document.get("table") or {}).get("status") == "published", "the table was skipped"
    assert document["table"]["name"] == "lake.events"
    assert _assert_table_is_the_manifests(home, _table(home)) == v1_ids[1:]


def test_the_phases_publish_where_their_verified_chain_declares_whatever_the_backup_says_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: FirstRun
) -> None:
    """The same finding in the Dagster asset's phases: `emit_partitions` and `reconcile_partitions`
    each decided from an unverified read; the table now follows the run (published, not skipped)."""
    from pcbo_dagster.engine.execute import append_commit_events, emit_partitions, reconcile_partitions

    home, v1_ids, loaded, plan, decisions = _second_run_with_declarations_hidden(
        tmp_path, monkeypatch, published
    )
    env = _open_env(home)
    try:
        emission = emit_partitions(env, loaded, plan, decisions)
        append_commit_events(env, emission)
        document = reconcile_partitions(env, loaded, plan, decisions, emission)
    finally:
        env.close()
    assert (document.get("table") or {}).get("status") == "published", "the table was skipped"
    assert _assert_table_is_the_manifests(home, _table(home)) == v1_ids[1:]


def test_a_rollback_publishes_where_its_verified_chain_declares_whatever_the_backup_says_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: FirstRun
) -> None:
    """The same finding in a rollback: it undid the lake and left the table showing the rows undone
    (exit 0). The table now follows the rollback."""
    from pcbo_dagster.engine.rollback import rollback

    home, v1_ids = _published_first_run(published)
    second = run_pcbo_in_process(
        ["execute", "--input", _second_run_without_table(tmp_path, v1_ids)], home=home
    )
    assert second.status == 0, second.stderr
    assert _assert_table_is_the_manifests(home, _table(home)) == v1_ids[1:]
    _hide_declarations_from_unverified_reads(monkeypatch)
    env = _open_env(home)
    try:
        document = rollback(env, DATASET, "v1", run_id="ice-2")
    finally:
        env.close()
    assert document["status"] == "rolled_back"
    assert (document.get("table") or {}).get("status") == "published", "the table was skipped"
    assert _assert_table_is_the_manifests(home, _table(home)) == v1_ids


def test_a_declaration_removed_after_the_runs_verified_read_is_refused_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: FirstRun
) -> None:
    """The attack on the file itself: the declaration line deleted from the backup right after the
    run verified its chain, under its lease. The run used to read the edited backup, find no table
    and commit to the lake without publishing (exit 0); the publication now starts from the verified
    declaration, and its own verified read refuses the edited chain (`ChainNotVerified`, exit 1)
    before anything is written."""
    from pcbo_dagster.engine import execute as execute_module
    from pcbo_dagster.engine.partition_checks import ChainNotVerified
    from pcbo_dagster.engine.request_loading import evaluate, load_request

    home, v1_ids = _published_first_run(published)
    request_file = _second_run_without_table(tmp_path, v1_ids)
    loaded = load_request(request_file.read_bytes(), request_file.parent)
    plan, decisions = evaluate(loaded)
    execute_module.check_gates(loaded, decisions)
    backup = home / "pas" / DATASET / "v1.jsonl"
    real = execute_module.verified_chain

    def verified_then_edited(*args: Any, **kwargs: Any) -> Any:
        chain = real(*args, **kwargs)
        lines = backup.read_bytes().splitlines(keepends=True)
        kept = [line for line in lines if b'"table_publication_recorded"' not in line]
        assert len(kept) == len(lines) - 1
        backup.write_bytes(b"".join(kept))
        monkeypatch.setattr(execute_module, "verified_chain", real)  # once
        return chain

    monkeypatch.setattr(execute_module, "verified_chain", verified_then_edited)
    before = lake_files(home)
    env = _open_env(home)
    try:
        with pytest.raises(ChainNotVerified, match="events/v1 does not verify"):
            execute_module.execute(env, loaded, plan, decisions)
    finally:
        env.close()
    assert lake_files(home) == before  # nothing committed
    assert _assert_table_is_the_manifests(home, _table(home)) == v1_ids


def test_a_fifo_at_a_data_files_name_is_refused_by_the_table_never_waited_on(
    tmp_path: Path, published: FirstRun
) -> None:
    """The table's checks and its publication read each data file's footer: they opened the file at its
    name as it was, so a FIFO planted there (no root needed) made `pcbo verify` of a published table,
    and the publication of `verify --repair` after a crash, wait for a writer for ever. Now they read it
    as the lake does: a name that is no regular file is refused as a symbolic link is."""
    home, first = published
    assert first.status == 0
    request = write_request(tmp_path / "r1.json", _request("ice-1"))
    data_file = sorted((lake_dir(home) / DATASET / "v1").glob("*/part-*.parquet"))[0]
    data_file.unlink()
    os.mkfifo(data_file)
    done = run_pcbo(["verify"], home=home, timeout=60)
    assert done.status == 1, done.stderr
    assert any(data_file.name in f["detail"] for f in done.document["findings"]), done.document["findings"]

    crashed_home = tmp_path / "crashed"
    crashed = run_pcbo(
        ["execute", "--input", request], home=crashed_home, env={"PCBO_FAILPOINT": "before_publication@0"}
    )
    assert crashed.status == 86
    data_file = sorted((lake_dir(crashed_home) / DATASET / "v1").glob("*/part-*.parquet"))[0]
    data_file.unlink()
    os.mkfifo(data_file)
    repaired = run_pcbo(["verify", "--repair"], home=crashed_home, timeout=60)
    assert repaired.status == 1, repaired.stderr
    assert not list((lake_dir(crashed_home) / "_iceberg").rglob("*.metadata.json"))  # nothing published


@pytest.mark.parametrize("reader", ["duckdb-iceberg", "pyiceberg"])
def test_a_table_name_forged_in_the_catalogs_is_no_sql_for_pcbo_query(
    tmp_path: Path, published: FirstRun, reader: str
) -> None:
    """(red-team finding) `pcbo query` put the catalog's recorded table name into DuckDB's SQL as it
    was: someone who can write the catalog, the Iceberg catalog and the lake (the threat model's
    attacker) named a table `lake"; COPY (SELECT 42) TO 'pwned'; CREATE SCHEMA "lake.events`, published a
    table under that name inside the lake, and the next `pcbo query` anyone ran wrote their file."""
    home, done = published
    assert done.status == 0, done.stderr
    namespace = """lake"; COPY (SELECT 42 AS x) TO 'pwned'; CREATE SCHEMA "lake"""
    iceberg = sqlite3.connect(home / "iceberg.db")
    with iceberg:
        iceberg.execute("DELETE FROM iceberg_tables")
        iceberg.execute("DELETE FROM iceberg_namespace_properties")
    iceberg.close()
    catalog = SqlCatalog("pcbo", uri=f"sqlite:///{home}/iceberg.db", warehouse=f"file://{home}/lake/_iceberg")
    catalog.create_namespace(namespace)
    forged = catalog.create_table(
        (namespace, "events"),
        schema=pa.schema([("id", pa.string())]),
        location=f"file://{home}/lake/_iceberg/{namespace}/events",
    )
    forged.append(pa.table({"id": ["forged"]}))
    pcbo_catalog = sqlite3.connect(home / "catalog.db")
    with pcbo_catalog:
        pcbo_catalog.execute("UPDATE table_publications SET table_name = ?", (f"{namespace}.events",))
    pcbo_catalog.close()

    work = tmp_path / "work"
    work.mkdir()
    queried = run_pcbo_forked(
        ["query", "--dataset", DATASET, "--reader", reader, "SELECT 1"], home=home, cwd=work
    )
    assert not (work / "pwned").exists(), "the forged table name ran as SQL"
    assert queried.status == 1 and queried.document is None, queried.stderr
    # The catalog's row is not read: the chain's declared table (dropped from the Iceberg catalog here)
    assert "does not exist yet" in queried.stderr and "internal error" not in queried.stderr, queried.stderr


def test_pcbo_query_reads_the_table_the_chain_declares_not_the_catalogs_row(
    tmp_path: Path, published: FirstRun
) -> None:
    """(red-team finding) `pcbo query` took the table from the catalog's `table_publications` row:
    one edited to name another catalog URL had the query create a SQLite file wherever it pointed (and
    say the table did not exist yet). The chain's declaration is read (verified), never the row."""
    home, done = published
    assert done.status == 0, done.stderr
    elsewhere = tmp_path / "elsewhere" / "created-by-query.db"
    elsewhere.parent.mkdir()
    pcbo_catalog = sqlite3.connect(home / "catalog.db")
    with pcbo_catalog:
        pcbo_catalog.execute("UPDATE table_publications SET catalog_url = ?", (f"sqlite:///{elsewhere}",))
    pcbo_catalog.close()
    queried = run_pcbo_in_process(
        ["query", "--dataset", DATASET, "SELECT count(*) FROM lake.events"], home=home
    )
    assert queried.status == 0, queried.stderr
    assert queried.document["rows"][0][0] > 0 and not elsewhere.exists()


def test_empty_partitions_publish_without_a_warning_per_column(tmp_path: Path) -> None:
    """(red-team finding) Each zero-row file of an empty partition made pyiceberg warn once per column
    ("PyArrow statistics missing for column N when writing file"): dozens of lines on stderr."""
    home = tmp_path / "home"
    request = load_generator().make_request(records=2, partitions=4, seed=3, run_id="sparse")
    request["table"] = TABLE
    done = run_pcbo(["execute", "--input", write_request(tmp_path / "r.json", request)], home=home)
    assert done.status == 0, done.stderr
    assert any(p["recordCount"] == 0 for p in done.document["partitions"]), "no empty partition"
    assert "statistics missing" not in done.stderr, done.stderr

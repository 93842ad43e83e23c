"""A post-write check that finds a written row the decisions did not add (or one violating policy)
undoes that partition by appending a rollback event, records a discrepancy, and fails the run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.cli import main as cli
from pcbo_dagster.engine import execute as execute_module
from pcbo_dagster_tests.cli_runner import backup_events

REQUEST = {
    "runId": "pwc-run",
    "dataset": "events",
    "start": "2024-01-01T00:00:00Z",
    "end": "2024-01-01T03:00:00Z",
    "policies": {"requireConsent": True},
    "sourceRecords": [
        {"id": f"r{h}-{i}", "occurredAt": f"2024-01-01T0{h}:1{i}:00Z", "consentGranted": True}
        for h in range(3)
        for i in range(3)
    ],
}


def test_a_bad_written_partition_is_undone_audited_and_fails_the_run(tmp_path: Path, monkeypatch) -> None:
    real_build_table = execute_module.build_table

    def faulty_build_table(rows, ids, *args):  # a writer bug: one extra row, without consent
        table = real_build_table(rows, ids, *args)
        if ids and ids[0] == "r1-0":
            extra = {name: [None] for name in table.column_names}
            extra.update(id=["r1-9"], occurredAt=[table["occurredAt"][0].as_py()], consentGranted=[False])
            table = pa.concat_tables([table, pa.table(extra, schema=table.schema)])
        return table

    monkeypatch.setattr(execute_module, "build_table", faulty_build_table)
    request = tmp_path / "req.json"
    request.write_text(json.dumps(REQUEST))
    home = tmp_path / "home"
    out = tmp_path / "out.json"
    status = cli.main(["execute", "--input", str(request), "--home", str(home), "--output", str(out)])
    assert status == 1
    document = json.loads(out.read_text())
    assert document["status"] == "failed"
    by_key = {p["key"]: p for p in document["partitions"]}
    bad = by_key["20240101T010000Z"]
    assert bad["status"] == "failed"
    check = next(c for c in document["reconciliation"]["partitions"] if c["key"] == "20240101T010000Z")
    assert check["status"] == "failed" and not check["idsMatch"]
    assert check["policyViolationCount"] == 1
    assert check["policyViolations"][0] == {"id": "r1-9", "reasons": ["CONSENT_MISSING"]}

    # Undone: no commit point for that partition, the others stay committed.
    lake = home / "lake" / "events" / "v1"
    assert not (lake / "20240101T010000Z" / "_manifest.json").exists()
    assert (lake / "20240101T000000Z" / "_manifest.json").exists()
    # The chain shows the commit and then its rollback, never an edit.
    events = backup_events(home)
    bad_events = [e["event_type"] for e in events if e["partition"]["key"] == "20240101T010000Z"]
    assert bad_events == ["partition_committed", "partition_rolled_back"]
    assert events[-1]["reason"] == "post_write_check_failed"
    catalog = CatalogStore(f"sqlite:///{home / 'catalog.db'}")
    discrepancies = catalog.discrepancies("pwc-run")
    assert [d["partition_key"] for d in discrepancies] == ["20240101T010000Z"]
    assert catalog.get_run("pwc-run")["status"] == "failed"
    catalog.close()

    # What remains verifies clean, and a fixed writer completes the run.
    monkeypatch.setattr(execute_module, "build_table", real_build_table)
    assert cli.main(["verify", "--home", str(home), "--output", str(tmp_path / "v.json")]) == 0
    assert cli.main(["execute", "--input", str(request), "--home", str(home), "--output", str(out)]) == 0
    assert (lake / "20240101T010000Z" / "_manifest.json").exists()

"""A post-write check that finds a written row the decisions did not add (or one violating policy)
undoes that partition by appending a rollback event, records a discrepancy, and fails the run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.cli import main as cli
from pcbo_dagster.core import merkle
from pcbo_dagster.core.plan import Plan
from pcbo_dagster.engine import execute as execute_module
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.post_write import CheckItem, check_batch
from pcbo_dagster.engine.request_loading import evaluate, load_request
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.lake import layout, manifests
from pcbo_dagster.lake.manifests import Manifest
from pcbo_dagster_tests.cli_runner import backup_events, write_request

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
    execute = _execute_argv(tmp_path)
    home = tmp_path / "home"
    assert cli.main(execute) == 1
    document = json.loads((tmp_path / "o.json").read_text())
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
    run = catalog.get_run("pwc-run")
    assert run is not None
    assert run["status"] == "failed"
    catalog.close()

    # What remains verifies clean, and a fixed writer completes the run.
    monkeypatch.setattr(execute_module, "build_table", real_build_table)
    assert cli.main(["verify", "--home", str(home), "--output", str(tmp_path / "v.json")]) == 0
    assert cli.main(execute) == 0
    assert (lake / "20240101T010000Z" / "_manifest.json").exists()


def test_a_file_read_back_damaged_is_unreadable_not_zero_rows(tmp_path: Path, monkeypatch) -> None:
    from pcbo_dagster.lake.storage import LakeStorage

    real_read = LakeStorage.read

    def damaging_read(self, rel):  # the storage hands back other bytes than were written
        data = real_read(self, rel)
        return data[:-8] + b"\0" * 8 if "20240101T010000Z/part-" in rel else data

    monkeypatch.setattr(LakeStorage, "read", damaging_read)
    assert cli.main(_execute_argv(tmp_path)) == 1
    checks = json.loads((tmp_path / "o.json").read_text())["reconciliation"]["partitions"]
    check = next(c for c in checks if c["key"] == "20240101T010000Z")
    assert check["status"] == "failed"
    assert len(check["findings"]) == 1 and "unreadable: its checksum differs" in check["findings"][0]
    assert not any("rows written (0)" in f for f in check["findings"])


def _execute_argv(tmp_path: Path) -> list[str]:
    """The `pcbo execute` arguments of REQUEST (written to `tmp_path/req.json`) into `tmp_path/home`,
    the document to `tmp_path/o.json`."""
    request = write_request(tmp_path / "req.json", REQUEST)
    return [
        "execute",
        "--input",
        str(request),
        "--home",
        str(tmp_path / "home"),
        "--output",
        str(tmp_path / "o.json"),
    ]


def _executed(tmp_path: Path) -> list[str]:
    """REQUEST executed into `tmp_path/home`; returns the `pcbo execute` arguments (`_execute_argv`)."""
    argv = _execute_argv(tmp_path)
    assert cli.main(argv) == 0
    return argv


def _committed(tmp_path: Path) -> tuple[Environment, Plan, list[str], Manifest]:
    """An executed REQUEST: (environment, plan, the first partition's decided adds and manifest)."""
    _executed(tmp_path)
    loaded = load_request((tmp_path / "req.json").read_bytes(), tmp_path)
    plan, decisions = evaluate(loaded)
    env = Environment.open(Settings.resolve(home=str(tmp_path / "home"), env={}, parallel=1))
    pd = decisions.partitions[0]
    manifest = manifests.decode_manifest(
        env.lake.read(layout.manifest(plan.dataset, plan.version_label, pd.partition.key))
    )
    return env, plan, list(pd.add), manifest


def test_unchanged_adds_are_held_to_the_manifest_root_given_or_computed(tmp_path: Path) -> None:
    """The checksum-level check of an unchanged partition compares the decided adds' Merkle root with
    the manifest's: computed from the ids, or the one the caller computed from them while staging.
    A wrong root or wrong ids fail either way: a given root is compared, never taken as a pass."""
    env, plan, adds, manifest = _committed(tmp_path)
    try:
        root = merkle.root_hex(adds)
        assert root == manifest["merkleRoot"]
        other_ids = [*adds[:-1], "not-decided"]

        def check(ids: list[str], given: str | None) -> dict:
            item = CheckItem(manifest, ids, full=False, read=False, expected_root=given)
            return check_batch(env, plan, [item], [])[0]

        assert check(adds, None)["status"] == "ok"
        assert check(adds, root)["status"] == "ok"
        for ids, given in ((other_ids, None), (other_ids, merkle.root_hex(other_ids)), (adds, "00" * 32)):
            got = check(ids, given)
            assert got["status"] == "failed" and not got["idsMatch"], (ids, given)
    finally:
        env.close()


def test_a_re_execute_does_not_recompute_the_roots_staging_computed(tmp_path: Path, monkeypatch) -> None:
    """Re-running a committed request (every partition unchanged) computes each partition's Merkle root
    once, while staging, where it is compared with the committed manifest's; the post-write check
    reuses that root instead of hashing the same ids again."""
    argv = _executed(tmp_path)
    hashed: list[int] = []
    real_root_hex = merkle.root_hex

    def counting_root_hex(ids: Sequence[str]) -> str:
        hashed.append(len(ids))
        return real_root_hex(ids)

    monkeypatch.setattr(merkle, "root_hex", counting_root_hex)
    assert cli.main(argv) == 0
    partitions = json.loads((tmp_path / "o.json").read_text())["partitions"]
    assert [p["status"] for p in partitions] == ["unchanged"] * 3
    assert hashed == [3, 3, 3]  # one root per partition, not two

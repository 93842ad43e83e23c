"""Attacks the audit chain alone cannot show (issue 11): someone who can write the audit backup, the
catalog and the lake rewrites or truncates a chain *consistently* — every hash recomputed, the mirror,
the stored log and the lake made to match, the catalog's and the lake's checkpoints removed. Plain
`pcbo verify` then finds nothing (that is the gap); `verify --trusted-checkpoint` with a checkpoint
an auditor kept finds it, and a witness that cosigned the real history refuses the forged one even
when an insider signs it with the operator's own key.

A real witness server (`pcbo witness serve`'s) runs on loopback in a thread.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.cli import main as cli
from pcbo_dagster.core.audit_chain import build_event
from pcbo_dagster.core.checkpoints import Checkpoint, parse_signed_checkpoint
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.signed_note import (
    COSIGNATURE_V1,
    cosign,
    new_signing_key,
    parse_verifier_key,
    signing_key_from_seed,
    verify_cosignatures,
)
from pcbo_dagster.engine.transparency_log import witness_requirement
from pcbo_dagster.evidence.package import verify as verify_package
from pcbo_dagster.witness.server import LogKey, Witness, make_server
from pcbo_dagster_tests.cli_runner import (
    backup_file,
    lake_dir,
    load_generator,
    run_pcbo,
    run_pcbo_in_process,
    write_request,
)
from pcbo_dagster_tests.loopback import serving

CHAIN = "events/v1"
ORIGIN = "pcbo/events/v1"


def pcbo(home: Path, *args: str) -> tuple[int, Any]:
    """`pcbo *args --home home` in this process; (exit status, the JSON document or None)."""
    out = home.parent / f"out-{uuid.uuid4().hex}.json"
    try:
        status = cli.main([*args, "--home", str(home), "--output", str(out)])
    except SystemExit as exc:
        status = int(exc.code or 0)
    document = json.loads(out.read_text()) if out.exists() else None
    out.unlink(missing_ok=True)
    return status, document


def _shifted(request: dict[str, Any], hours: int, run_id: str) -> dict[str, Any]:
    """The same records `hours` later, under other ids: a run over the next window."""

    def later(text: str) -> str:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00")) + timedelta(hours=hours)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    copy = json.loads(json.dumps(request))
    copy["runId"] = run_id
    copy["start"], copy["end"] = later(copy["start"]), later(copy["end"])
    for record in copy["sourceRecords"]:
        if isinstance(record.get("id"), str):
            record["id"] = f"{run_id}-{record['id']}"
        if isinstance(record.get("occurredAt"), str):
            record["occurredAt"] = later(record["occurredAt"])
    return copy


class Keys:
    def __init__(self, work: Path) -> None:
        self.operator = new_signing_key("ops.example/operator")
        self.witness = new_signing_key("witness.example/w1")
        self.operator_file = work / "operator.key"
        self.operator_file.write_text(self.operator.text + "\n")
        self.operator_file.chmod(0o600)
        self.vkey = self.operator.verifier().text
        self.witness_vkey = self.witness.verifier(COSIGNATURE_V1).text


@pytest.fixture
def witness_server(tmp_path: Path) -> Iterator[Callable[[Keys], str]]:
    def start(keys: Keys) -> str:
        witness = Witness(
            keys.witness, str(tmp_path / "witness.db"), [LogKey("pcbo/", keys.operator.verifier())]
        )
        return servers.enter_context(serving(make_server(witness, "127.0.0.1", 0)))

    with contextlib.ExitStack() as servers:
        yield start


@pytest.fixture
def history(tmp_path: Path, witness_server: Callable[[Keys], str]) -> dict[str, Any]:
    """Two runs (r1: hours 0-3, r2: hours 4-5), each followed by a signed checkpoint the witness
    cosigned; the auditor kept the checkpoint after r1 and the one after r2."""
    keys = Keys(tmp_path)
    url = witness_server(keys)
    home = tmp_path / "home"
    signing = ("--signing-key", str(keys.operator_file), "--witness", f"{keys.witness_vkey} {url}")
    first = load_generator().make_request(records=60, partitions=4, seed=5, run_id="r1")
    held = {}
    for name, request in (("r1", first), ("r2", _shifted(first, 4, "r2"))):
        path = write_request(tmp_path / f"{name}.json", request)
        status, document = pcbo(home, "execute", "--input", str(path), *signing)
        assert status == 0, document
        assert document["checkpoint"]["witnessedBy"] == ["witness.example/w1"], document["checkpoint"]
        status, document = pcbo(home, "log", "checkpoint", "--dataset", "events")
        assert status == 0 and document["witnesses"] == [keys.witness_vkey]
        held[name] = tmp_path / f"held-{name}.checkpoint"
        held[name].write_text(document["checkpoint"])
    return {"home": home, "keys": keys, "url": url, "held": held, "signing": signing}


def _verify_trusted(history: dict[str, Any], held: str, *extra: str) -> tuple[int, Any]:
    keys = history["keys"]
    return pcbo(
        history["home"],
        "verify",
        "--trusted-checkpoint",
        str(history["held"][held]),
        "--key",
        keys.vkey,
        *extra,
    )


# -- the attacker's tools ------------------------------------------------------------------------------


def _rewrite_chain(
    home: Path, keep: int, change: Callable[[list[dict]], None], strip_signatures: bool = True
) -> None:
    """Rewrite the chain consistently: keep its first `keep` events, let `change` edit them, rebuild
    every hash, link and event id, and make the backup and the catalog (mirror, heads, stored log,
    partition rows' event hashes) agree; remove every stored checkpoint. With `strip_signatures`
    (a rewrite: an event after a changed one no longer verifies at its place, its previous event's
    hash changed) every event's operator signature is stripped: the chain then looks like one from
    before the signing key was set. A truncation keeps them (what is kept is unchanged)."""
    path = backup_file(home)
    events = [json.loads(line) for line in path.read_bytes().splitlines()][:keep]
    change(events)
    rebuilt, renamed, prev = [], {}, None
    for seq, event in enumerate(events):
        body = {
            k: v
            for k, v in event.items()
            if k not in ("version", "event_type", "event_id", "timestamp", "chain")
            and not (strip_signatures and k == "operator_signature")
        }
        new = build_event(
            chain_key=CHAIN,
            seq=seq,
            prev_event_hash=prev,
            event_type=event["event_type"],
            timestamp=event["timestamp"],
            body=body,
        )
        renamed[event["chain"]["event_hash"]] = new["chain"]["event_hash"]
        rebuilt.append(new)
        prev = new["chain"]["event_hash"]
    path.write_bytes(b"".join(rfc8785.dumps(e) + b"\n" for e in rebuilt))
    db = sqlite3.connect(home / "catalog.db")
    triggers = [
        r[0]
        for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        if r[0].startswith(("audit_events_", "transparency_checkpoints_", "checkpoint_cosignatures_"))
    ]
    saved = [r[0] for r in db.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'") if r[0]]
    for name in triggers:
        db.execute(f"DROP TRIGGER {name}")
    db.execute("DELETE FROM audit_events WHERE chain_key = ?", (CHAIN,))
    for event in rebuilt:
        chain = event["chain"]
        db.execute(
            "INSERT INTO audit_events VALUES (?, ?, ?, ?, ?, ?, '2026-01-01 00:00:00')",
            (
                CHAIN,
                chain["seq"],
                chain["event_hash"],
                chain["prev_event_hash"],
                event["event_type"],
                json.dumps(event, sort_keys=True, separators=(",", ":")),
            ),
        )
    db.execute(
        "UPDATE audit_chain_heads SET seq = ?, event_hash = ? WHERE chain_key = ?", (keep - 1, prev, CHAIN)
    )
    for old, new in renamed.items():
        db.execute("UPDATE partitions SET event_hash = ? WHERE event_hash = ?", (new, old))
    for table in (
        "transparency_nodes",
        "transparency_trees",
        "transparency_checkpoints",
        "checkpoint_cosignatures",
    ):
        db.execute(f"DELETE FROM {table}")
    for sql in saved:
        if any(f"TRIGGER {name} " in sql for name in triggers):
            db.execute(sql)
    db.commit()
    db.close()
    shutil.rmtree(lake_dir(home) / "events" / "v1" / "_checkpoints", ignore_errors=True)
    store = CatalogStore(f"sqlite:///{home / 'catalog.db'}")
    store.ensure_tree(CHAIN)  # the attacker rebuilds the stored log of the forged chain, too
    store.close()


def _forget_run(home: Path, run_id: str) -> None:
    """Remove what a run wrote from the lake and the catalog (its partitions, lineage and run rows)."""
    db = sqlite3.connect(home / "catalog.db")
    keys = [r[0] for r in db.execute("SELECT partition_key FROM partitions WHERE run_id = ?", (run_id,))]
    db.execute("DELETE FROM lineage WHERE run_id = ?", (run_id,))
    db.execute("DELETE FROM partitions WHERE run_id = ?", (run_id,))
    db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
    db.commit()
    db.close()
    for key in keys:
        shutil.rmtree(lake_dir(home) / "events" / "v1" / key)


def _kinds(document: dict[str, Any]) -> set[str]:
    return {f["kind"] for f in document["findings"]}


# -- the attacks ---------------------------------------------------------------------------------


def test_an_honest_history_extends_every_checkpoint_the_auditor_kept(history: dict[str, Any]) -> None:
    keys = history["keys"]
    for held in ("r1", "r2"):
        status, document = _verify_trusted(
            history, held, "--witness-key", keys.witness_vkey, "--min-witnesses", "1"
        )
        assert status == 0, document["findings"]
        assert document["trustedCheckpoint"]["witnessCosignatures"] == ["witness.example/w1"]
    assert document["trustedCheckpoint"]["consistencyProof"] == []  # r2's is the current size
    status, document = _verify_trusted(history, "r1")
    assert status == 0 and document["trustedCheckpoint"]["consistencyProof"]


def test_a_consistent_rewrite_of_the_whole_chain_is_caught_by_the_held_checkpoint(
    history: dict[str, Any],
) -> None:
    home = history["home"]
    size = len(backup_file(home).read_bytes().splitlines())

    def rewrite(events: list[dict]) -> None:
        events[0]["timestamp"] = "2020-01-01T00:00:00Z"  # history says something else now

    _rewrite_chain(home, size, rewrite)
    status, document = pcbo(home, "verify")
    assert status == 0, document["findings"]  # the stores agree with each other: nothing else can tell
    for held in ("r1", "r2"):
        status, document = _verify_trusted(history, held)
        assert status == 1 and "checkpoint_inconsistent" in _kinds(document), document["findings"]


def test_a_truncation_is_caught_by_the_held_checkpoint(history: dict[str, Any]) -> None:
    home = history["home"]
    r1_size = parse_signed_checkpoint(history["held"]["r1"].read_text())[0].size
    _forget_run(home, "r2")
    _rewrite_chain(home, r1_size, lambda events: None, strip_signatures=False)
    status, document = pcbo(home, "verify")
    assert status == 0, document["findings"]  # r2 never happened, as far as the stores say
    status, document = _verify_trusted(history, "r2")
    assert status == 1 and _kinds(document) == {"checkpoint_truncated"}, document["findings"]
    status, document = _verify_trusted(history, "r1")  # what r1's checkpoint covers is intact
    assert status == 0, document["findings"]


def test_the_witness_refuses_a_rewritten_or_truncated_history_signed_with_the_operators_key(
    history: dict[str, Any],
) -> None:
    """An insider with the operator's key re-signs the forged history: the witness, which cosigned the
    real one, refuses to cosign it (422 inconsistent or another root at its own size, or a size below
    its own)."""
    home = history["home"]
    size = len(backup_file(home).read_bytes().splitlines())

    def rewrite(events: list[dict]) -> None:
        events[1]["timestamp"] = "2020-01-01T00:00:00Z"

    _rewrite_chain(home, size, rewrite)
    status, document = pcbo(home, "log", "publish", "--dataset", "events", *history["signing"])
    assert status == 0
    errors = document["checkpoint"]["witnessErrors"]
    assert document["checkpoint"]["witnessedBy"] == [] and len(errors) == 1
    assert "history was rewritten" in errors[0], errors
    # The forged checkpoint is signed by the operator but carries no cosignature: requiring one fails.
    forged = history["held"]["r2"].with_name("forged.checkpoint")
    forged.write_text(pcbo(home, "log", "checkpoint", "--dataset", "events")[1]["checkpoint"])
    keys = history["keys"]
    status, document = pcbo(
        home,
        "verify",
        "--trusted-checkpoint",
        str(forged),
        "--key",
        keys.vkey,
        "--witness-key",
        keys.witness_vkey,
        "--min-witnesses",
        "1",
    )
    assert status == 1 and "checkpoint_witnesses_missing" in _kinds(document)

    r1_size = parse_signed_checkpoint(history["held"]["r1"].read_text())[0].size
    _forget_run(home, "r2")
    _rewrite_chain(home, r1_size, lambda events: None, strip_signatures=False)
    status, document = pcbo(home, "log", "publish", "--dataset", "events", *history["signing"])
    errors = document["checkpoint"]["witnessErrors"]
    assert status == 0 and len(errors) == 1 and "truncated or forked" in errors[0], errors


def test_a_witness_that_is_down_never_blocks_a_run_and_cosigns_later(tmp_path: Path, witness_server) -> None:
    keys = Keys(tmp_path)
    home = tmp_path / "home"
    down = ("--signing-key", str(keys.operator_file), "--witness", f"{keys.witness_vkey} http://127.0.0.1:9")
    request = load_generator().make_request(records=30, partitions=2, seed=3, run_id="r1")
    status, document = pcbo(
        home, "execute", "--input", str(write_request(tmp_path / "r.json", request)), *down
    )
    assert status == 0 and document["checkpoint"]["witnessedBy"] == []
    assert document["checkpoint"]["witnessErrors"]
    url = witness_server(keys)
    up = ("--signing-key", str(keys.operator_file), "--witness", f"{keys.witness_vkey} {url}")
    status, document = pcbo(home, "log", "publish", "--dataset", "events", *up)
    assert status == 0 and document["checkpoint"]["witnessedBy"] == ["witness.example/w1"]
    note = pcbo(home, "log", "checkpoint", "--dataset", "events")[1]["checkpoint"]
    lake_copy = lake_dir(home) / "events" / "v1" / "_checkpoints" / f"{document['treeSize']:012d}.checkpoint"
    assert lake_copy.read_text() == note and "witness.example/w1" in note


def test_a_lake_checkpoint_file_holding_another_checkpoint_than_its_name_says_is_a_finding(
    history: dict[str, Any],
) -> None:
    """The lake's newest published checkpoint replaced by an older one under the newer name (a valid
    checkpoint of the same log: its root is the backup's at its own size): the lake no longer publishes
    the checkpoint its name says, and verify says so."""
    home = history["home"]
    lake_checkpoints = lake_dir(home) / "events" / "v1" / "_checkpoints"
    older, newer = sorted(lake_checkpoints.iterdir())
    status, document = pcbo(home, "verify")
    assert status == 0, document["findings"]
    newer.write_bytes(older.read_bytes())
    status, document = pcbo(home, "verify")
    assert status == 1 and _kinds(document) == {"checkpoint_file_mismatch"}, document["findings"]
    assert [f["where"] for f in document["findings"]] == [f"events/v1/_checkpoints/{newer.name}"]


def test_repair_says_it_rewrote_the_newest_lake_checkpoint_file_it_puts_back(history: dict[str, Any]) -> None:
    """Walk finding: with the newest lake checkpoint file replaced by an older one, `verify --repair`
    listed `checkpoint_file_mismatch` as a finding it "refuses to touch" (exit 1) while its publication
    of the log's checkpoint put the file back from the catalog's signed row (a plain `verify` was clean
    after it). What it rewrote is now reported as repaired."""
    home = history["home"]
    lake_checkpoints = lake_dir(home) / "events" / "v1" / "_checkpoints"
    older, newer = sorted(lake_checkpoints.iterdir())
    genuine = newer.read_bytes()
    newer.write_bytes(older.read_bytes())
    status, document = pcbo(home, "verify", "--repair", *history["signing"])
    assert status == 0 and document["findings"] == [], document["findings"]
    where = f"events/v1/_checkpoints/{newer.name}"
    assert {"kind": "checkpoint_file_rewritten", "where": where} in document["repaired"], document["repaired"]
    assert newer.read_bytes() == genuine
    assert pcbo(home, "verify")[0] == 0


def test_a_checkpoint_not_signed_by_the_given_key_is_invalid_input(history: dict[str, Any]) -> None:
    other = new_signing_key("someone.else/key").verifier().text
    status, _ = pcbo(
        history["home"], "verify", "--trusted-checkpoint", str(history["held"]["r1"]), "--key", other
    )
    assert status == 2


def _insert_catalog_rows(home: Path, table: str, *rows: tuple[Any, ...]) -> None:
    """Rows added to an append-only table: an insert, which its triggers allow."""
    db = sqlite3.connect(home / "catalog.db")
    for row in rows:
        db.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(row))})", row)
    db.commit()
    db.close()


def _next_run(history: dict[str, Any], tmp_path: Path, run_id: str, hours: int) -> dict[str, Any]:
    request = _shifted(
        load_generator().make_request(records=60, partitions=4, seed=5, run_id="r1"), hours, run_id
    )
    status, document = pcbo(
        history["home"],
        "execute",
        "--input",
        str(write_request(tmp_path / f"{run_id}.json", request)),
        *history["signing"],
    )
    assert status == 0, document
    return document


def test_a_checkpoint_row_inserted_in_the_catalog_neither_stops_signing_nor_passes_verify(
    history: dict[str, Any], tmp_path: Path
) -> None:
    """Someone who can write the catalog inserts a checkpoint row that says size 10**12 and carries a
    genuine (older) note. pcbo took the row's size at its word: no run signed a checkpoint again (the
    log grew unsigned and unwitnessed), `evidence export` failed with an internal error, and `verify`
    said clean."""
    home, keys = history["home"], history["keys"]
    db = sqlite3.connect(home / "catalog.db")
    genuine = db.execute("SELECT * FROM transparency_checkpoints ORDER BY tree_size LIMIT 1").fetchone()
    db.close()
    _insert_catalog_rows(home, "transparency_checkpoints", (genuine[0], 10**12, *genuine[2:]))
    document = _next_run(history, tmp_path, "r3", 8)
    size = len(backup_file(home).read_bytes().splitlines())
    assert document["checkpoint"]["treeSize"] == size, document["checkpoint"]
    assert document["checkpoint"]["witnessedBy"] == ["witness.example/w1"], document["checkpoint"]
    status, document = pcbo(home, "verify", *history["signing"])
    assert status == 1 and _kinds(document) == {"checkpoint_row_mismatch"}, document["findings"]
    assert [f["where"] for f in document["findings"]] == [f"catalog checkpoint {10**12}"]
    status, package = pcbo(home, "evidence", "export", "--run", "r3", *history["signing"])
    assert status == 0, package
    document = verify_package(
        package,
        keys.operator.verifier(),
        witness_keys=[keys.witness.verifier(COSIGNATURE_V1)],
        min_witnesses=1,
    )
    assert document["valid"] and document["checkpoint"]["treeSize"] == size, document


def test_cosignature_rows_inserted_in_the_catalog_neither_stop_witnessing_nor_pass_verify(
    history: dict[str, Any], tmp_path: Path
) -> None:
    """Cosignature rows inserted in the catalog: one that says the witness cosigned size 10**12 (pcbo
    then asked it from there, and the witness refused every later checkpoint: old size above the new),
    and a garbage line for the latest checkpoint under another witness's key (every run then failed
    after its commit, rendering the checkpoint; `log checkpoint` and `evidence export` too). `verify`
    said clean."""
    home, keys = history["home"], history["keys"]
    other = new_signing_key("witness.example/w2").verifier(COSIGNATURE_V1).text
    db = sqlite3.connect(home / "catalog.db")
    size, line = db.execute(
        "SELECT tree_size, signature_line FROM checkpoint_cosignatures ORDER BY tree_size DESC LIMIT 1"
    ).fetchone()
    db.close()
    _insert_catalog_rows(
        home,
        "checkpoint_cosignatures",
        (CHAIN, 10**12, keys.witness_vkey, line, 1, "2026-01-01 00:00:00"),
        (CHAIN, size, other, "— witness.example/w2 not-a-signature", 1, "2026-01-01 00:00:00"),
    )
    status, document = pcbo(home, "log", "checkpoint", "--dataset", "events")
    assert status == 0 and document["witnesses"] == [keys.witness_vkey]
    document = _next_run(history, tmp_path, "r3", 8)
    assert document["checkpoint"]["witnessedBy"] == ["witness.example/w1"], document["checkpoint"]
    status, document = pcbo(home, "verify", *history["signing"])
    assert status == 1 and _kinds(document) == {"checkpoint_cosignature_invalid"}, document["findings"]
    assert [f["where"] for f in document["findings"]] == [f"catalog checkpoint {size}"]


@pytest.mark.parametrize(
    "document",
    [
        {"type": "pcbo.log.inclusion/1", "treeSize": 1, "event": {}, "proof": 5},
        {"type": "pcbo.log.inclusion/1", "treeSize": 1, "event": {}, "proof": None, "checkpoints": [7]},
        {"type": "pcbo.log.consistency/1", "fromSize": [], "toSize": 2, "proof": []},
        {"type": "pcbo.log.consistency/1", "fromSize": 1, "toSize": {"a": 1}, "proof": []},
        {"type": "pcbo.log.consistency/1", "fromSize": 1, "toSize": 2, "proof": "AAAA"},
    ],
)
def test_a_proof_document_of_another_shape_is_invalid_input(tmp_path: Path, document: dict[str, Any]) -> None:
    """`pcbo log verify-proof` on a proof whose members are of another type: an internal error
    (`'int' object is not iterable`, `unhashable type: 'list'`) before; now exit 2 naming --proof."""
    proof = tmp_path / "proof.json"
    proof.write_text(json.dumps(document))
    key = new_signing_key("ops.example/operator").verifier().text
    out = tmp_path / "out.json"
    try:
        status = cli.main(["log", "verify-proof", "--proof", str(proof), "--key", key, "--output", str(out)])
    except SystemExit as exc:
        status = int(exc.code or 0)
    assert status == 2 and not out.exists()


def test_the_logs_proofs_verify_offline_with_the_operators_key(
    history: dict[str, Any], tmp_path: Path
) -> None:
    """The well-formed counterpart of the test above: `prove-inclusion` and `prove-consistency`
    documents verify with `log verify-proof` and the key alone, and a held checkpoint."""
    home, keys = history["home"], history["keys"]
    held = str(history["held"]["r1"])
    r1_size = parse_signed_checkpoint(history["held"]["r1"].read_text())[0].size
    for args in (["prove-inclusion", "--seq", "2"], ["prove-consistency", "--from", str(r1_size)]):
        status, document = pcbo(home, "log", *args, "--dataset", "events")
        assert status == 0, document
        proof = tmp_path / "proof.json"
        proof.write_text(json.dumps(document))
        out = tmp_path / "out.json"
        argv = ["log", "verify-proof", "--proof", str(proof), "--key", keys.vkey, "--checkpoint", held]
        assert cli.main([*argv, "--output", str(out)]) == 0
        assert json.loads(out.read_text())["valid"] is True


@pytest.mark.parametrize(
    ("args", "member", "value"),
    [
        (["prove-inclusion", "--seq", "2"], "rootHash", "A" * 43 + "="),
        (["prove-inclusion", "--seq", "2"], "leafIndex", 0),
        (["prove-consistency", "--from", "1"], "fromRootHash", "A" * 43 + "="),
        (["prove-consistency", "--from", "1"], "toRootHash", "A" * 43 + "="),
        (["prove-inclusion", "--seq", "2"], "chainKey", "other/v1"),
        (["prove-consistency", "--from", "1"], "chainKey", "other/v1"),
        # another dataset's chain whose name ends the origin's (`pcbo/events/v1` ends in `s/v1`): the
        # document was read as stating it with `"valid": true`
        (["prove-consistency", "--from", "1"], "chainKey", "s/v1"),
        (["prove-consistency", "--from", "1"], "chainKey", "v1"),
    ],
)
def test_a_proof_document_whose_own_root_or_leaf_index_was_edited_is_not_valid(
    history: dict[str, Any], tmp_path: Path, args: list[str], member: str, value: Any
) -> None:
    """What a proof document states besides the proof (the root it proves against, the leaf it proves,
    the chain it names) is what `verify-proof`'s `"valid": true` vouches for: a root, leaf index or
    chain key edited after the proof was made is a problem, not a valid document stating another."""
    home, keys = history["home"], history["keys"]
    status, document = pcbo(home, "log", *args, "--dataset", "events")
    assert status == 0, document
    held = [str(history["held"]["r1"])]
    if args[0] == "prove-consistency":  # a checkpoint of size 1 the auditor holds, as of size r1's
        held.append(str(tmp_path / "one.checkpoint"))
        root = base64.b64decode(document["fromRootHash"])
        Path(held[-1]).write_text(Checkpoint(ORIGIN, 1, root).sign(keys.operator).render())
    proof = tmp_path / "proof.json"
    argv = ["log", "verify-proof", "--proof", str(proof), "--key", keys.vkey]
    argv += [flag for path in held for flag in ("--checkpoint", path)]
    out = tmp_path / "out.json"
    proof.write_text(json.dumps(document))
    assert cli.main([*argv, "--output", str(out)]) == 0, out.read_text()
    proof.write_text(json.dumps({**document, member: value}))
    assert cli.main([*argv, "--output", str(out)]) == 1
    verdict = json.loads(out.read_text())
    assert verdict["valid"] is False and any(member in p for p in verdict["problems"]), verdict


def test_min_witnesses_is_not_met_by_one_witness_key_under_two_names() -> None:
    """`--min-witnesses 2` asks two witnesses. One witness's Ed25519 key under two names (a key id
    depends on the name: two vkeys) cosigns the checkpoint once under each, and both counted: one
    party met the requirement of two. Now a key given twice (under any name), or a key that is no
    cosigner key (type 0x04), is refused: exit 2 on --witness-key."""
    operator = new_signing_key("ops.example/operator")
    seed = new_signing_key("witness.example/w1").seed
    w1 = signing_key_from_seed("witness.example/w1", seed)
    w1_again = signing_key_from_seed("witness.example/w1-eu", seed)
    note = Checkpoint(ORIGIN, 1, b"\1" * 32).sign(operator)
    note = note.with_signatures([cosign(note.text, w1, 1700000000), cosign(note.text, w1_again, 1700000000)])
    vkeys = [w1.verifier(COSIGNATURE_V1).text, w1_again.verifier(COSIGNATURE_V1).text]
    assert len(verify_cosignatures(note, [parse_verifier_key(k) for k in vkeys])) == 2  # the double count
    with pytest.raises(InvalidInput) as refused:
        witness_requirement(vkeys, 2, operator.verifier())
    assert refused.value.field == "--witness-key" and "already" in refused.value.message
    with pytest.raises(InvalidInput) as refused:
        witness_requirement(
            [w1.verifier().text], 1, operator.verifier()
        )  # the type 0x01 key: it checks no cosignature
    assert refused.value.field == "--witness-key"
    assert witness_requirement(vkeys[:1], 1, operator.verifier())[1] == 1


def test_a_checkpoint_row_forged_at_the_size_the_next_run_reaches_is_named_not_a_raw_database_error(
    history: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint row inserted at exactly the size the next run's log reaches (a genuine older note
    under it): the run cannot store its own checkpoint there (the table is append-only). The run said
    only `transparency_checkpoints is append-only: REPLACE refused` (SQLite's trigger, raised from an
    insert meant to leave an existing row alone); it says which row is in the way and that `verify`
    reports it. Its partitions are committed; the next run signs again."""
    home = history["home"]
    probe = tmp_path / "probe"
    shutil.copytree(home, probe)
    request = _shifted(load_generator().make_request(records=60, partitions=4, seed=5, run_id="r1"), 8, "r3")
    path = write_request(tmp_path / "r3.json", request)
    status, document = pcbo(probe, "execute", "--input", str(path), *history["signing"][:2])
    assert status == 0, document
    size = document["checkpoint"]["treeSize"]
    db = sqlite3.connect(home / "catalog.db")
    genuine = db.execute("SELECT * FROM transparency_checkpoints ORDER BY tree_size LIMIT 1").fetchone()
    db.close()
    _insert_catalog_rows(home, "transparency_checkpoints", (genuine[0], size, *genuine[2:]))

    capsys.readouterr()
    status, document = pcbo(home, "execute", "--input", str(path), *history["signing"])
    err = capsys.readouterr().err
    assert status == 1
    assert "append-only" not in err, err
    assert f"the catalog holds a checkpoint row of size {size} that is not the log's" in err, err
    status, verified = pcbo(home, "verify", *history["signing"][:2])
    assert status == 1 and _kinds(verified) == {"checkpoint_row_mismatch"}, verified["findings"]
    assert [f["where"] for f in verified["findings"]] == [f"catalog checkpoint {size}"]
    assert len(backup_file(home).read_bytes().splitlines()) == size  # the run's events are on the chain
    document = _next_run(history, tmp_path, "r4", 12)
    assert document["checkpoint"]["treeSize"] > size, document["checkpoint"]


def test_a_fifo_planted_in_the_lake_is_refused_never_waited_on(tmp_path: Path) -> None:
    """Someone who can write the lake plants a FIFO (no root needed) at a checkpoint file's name or at a
    data file's. Reading the lake opened it as a file: `log publish` (and so every run, after its
    commit), `verify` and `evidence verify --lake` waited for a writer for ever. Now a name in the lake
    that is not a regular file is refused as a symbolic link is: `verify` reports it
    (`path_outside_lake`) and goes on, the others stop (exit 1) naming it."""
    keys = Keys(tmp_path)
    home = tmp_path / "home"
    env = {"PCBO_SIGNING_KEY": str(keys.operator_file)}
    request = load_generator().make_request(records=20, partitions=2, seed=3, run_id="r1")
    # (the set-up in this process; each run that meets a FIFO is a subprocess, its timeout the guard)
    done = run_pcbo_in_process(["execute", "--input", write_request(tmp_path / "r.json", request)], home, env)
    assert done.status == 0, done.stderr
    size = done.document["checkpoint"]["treeSize"]
    package = tmp_path / "r1.evidence.json"
    done = run_pcbo_in_process(["evidence", "export", "--run", "r1", "--output", package], home, env)
    assert done.status == 0, done.stderr
    checkpoint = lake_dir(home) / "events" / "v1" / "_checkpoints" / f"{size:012d}.checkpoint"
    checkpoint.unlink()
    os.mkfifo(checkpoint)
    done = run_pcbo(["log", "publish", "--dataset", "events"], home, env, timeout=60)
    assert done.status == 1 and f"{size:012d}.checkpoint" in done.stderr, done.stderr
    done = run_pcbo(["verify"], home, env, timeout=60)
    assert done.status == 1, done.stderr
    assert [(f["kind"], f["where"]) for f in done.document["findings"]] == [
        ("path_outside_lake", f"events/v1/_checkpoints/{size:012d}.checkpoint")
    ], done.document["findings"]
    data_file = next((lake_dir(home) / "events" / "v1").glob("*/part-*.parquet"))
    data_file.unlink()
    os.mkfifo(data_file)
    done = run_pcbo(
        ["evidence", "verify", package, "--key", keys.vkey, "--lake", lake_dir(home)], home, timeout=60
    )
    assert done.status == 1 and data_file.name in done.stderr, done.stderr
    done = run_pcbo(["verify"], home, env, timeout=60)
    assert done.status == 1, done.stderr
    assert any(data_file.name in f["detail"] for f in done.document["findings"]), done.document["findings"]


@pytest.mark.parametrize(
    "args",
    [["prove-inclusion", "--seq", "0"], ["prove-consistency", "--from", "1"]],
    ids=["inclusion", "consistency"],
)
def test_a_proof_asked_of_a_dataset_with_no_log_names_the_dataset(
    history: dict[str, Any], capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """A proof asked of a dataset (or version label) whose chain has no event was refused naming
    `--size` or `--to` (`must be between 1 and the log's size 0`), flags the command line did not
    give. Now the refusal names `--dataset`, the field that was wrong; nothing is written."""
    capsys.readouterr()
    status, document = pcbo(history["home"], "log", *args, "--dataset", "no-such-dataset")
    err = capsys.readouterr().err
    assert status == 2 and document is None, err
    assert "invalid input: --dataset: " in err and "no-such-dataset/v1" in err, err


def test_a_held_checkpoint_of_another_log_at_the_proofs_size_is_named_as_such(
    history: dict[str, Any], tmp_path: Path
) -> None:
    """A checkpoint the auditor holds of another log (origin), at the size of a proof's own checkpoint
    and with its very root, was reported as "two signed checkpoints of size N with different roots"
    (they have one root), and the other origin was not named. Now the problem says which origins."""
    home, keys = history["home"], history["keys"]
    status, document = pcbo(home, "log", "prove-inclusion", "--seq", "2", "--dataset", "events")
    assert status == 0, document
    checkpoint, _ = parse_signed_checkpoint(document["checkpoints"][0])
    other = tmp_path / "other.checkpoint"
    other.write_text(
        Checkpoint("pcbo/other/v1", checkpoint.size, checkpoint.root).sign(keys.operator).render()
    )
    proof = tmp_path / "proof.json"
    proof.write_text(json.dumps(document))
    out = tmp_path / "out.json"
    argv = ["log", "verify-proof", "--proof", str(proof), "--key", keys.vkey, "--checkpoint", str(other)]
    assert cli.main([*argv, "--output", str(out)]) == 1
    problems = json.loads(out.read_text())["problems"]
    assert not any("different roots" in p for p in problems), problems
    assert any("pcbo/other/v1" in p and ORIGIN in p for p in problems), problems


@pytest.mark.parametrize("signer", ["operator", "another_key", "none"])
def test_an_inclusion_proof_checks_the_events_operator_signature(tmp_path: Path, signer: str) -> None:
    """Red-team finding: `log verify-proof` proved an event's inclusion under a checkpoint the
    operator's key signed without reading the event's own `operator_signature`: an event another key
    signed (a checkpoint `log publish` signed over a chain of another key's before 2026-12-07) was
    `"valid": true`. Now a signature that does not verify under --key at the event's place is a
    problem, and the verdict says whether the key signed the event (`eventSigned`)."""
    from pcbo_dagster.core.merkle import MerkleTree
    from pcbo_dagster.core.operator_signatures import OPERATOR_SIGNATURE, sign_event
    from pcbo_dagster.core.transparency_log import event_leaf

    operator = new_signing_key("ops.example/operator")
    key = {"operator": operator, "another_key": new_signing_key("ops.example/operator"), "none": None}[signer]
    body: dict[str, Any] = {"run_id": "r1"}
    if key is not None:
        body[OPERATOR_SIGNATURE] = sign_event(key, CHAIN, 0, None, "run_noted", body)
    event = build_event(
        chain_key=CHAIN,
        seq=0,
        prev_event_hash=None,
        event_type="run_noted",
        timestamp="2026-12-07T00:00:00Z",
        body=body,
    )
    tree = MerkleTree([event_leaf(event)])
    document = {
        "type": "pcbo.log.inclusion/1",
        "origin": ORIGIN,
        "chainKey": CHAIN,
        "leafIndex": 0,
        "treeSize": 1,
        "rootHash": base64.b64encode(tree.root).decode(),
        "event": event,
        "proof": [],
        "checkpoints": [Checkpoint(ORIGIN, 1, tree.root).sign(operator).render()],
    }
    proof, out = tmp_path / "proof.json", tmp_path / "out.json"
    proof.write_text(json.dumps(document))
    argv = [
        "log",
        "verify-proof",
        "--proof",
        str(proof),
        "--key",
        operator.verifier().text,
        "--output",
        str(out),
    ]
    status = cli.main(argv)
    verdict = json.loads(out.read_text())
    if signer == "another_key":
        assert status == 1 and not verdict["valid"], verdict
        assert verdict["problems"] == [
            "event seq 0: its operator_signature does not verify under the operator's key "
            "ops.example/operator at its place (signed by another key, or for another event)"
        ]
    else:  # (an event without one: a chain from before the key was set)
        assert status == 0 and verdict["valid"], verdict
    assert verdict["eventSigned"] is (signer == "operator"), verdict

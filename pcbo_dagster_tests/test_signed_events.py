"""With the operator's key (`PCBO_SIGNING_KEY`) every event pcbo appends is signed at its place in
the chain (`core/operator_signatures.py`: chain key, seq, previous event hash, type, body).

The red-team finding it closes: someone who can write the audit backup and the catalog (pcbo's own
audit code, every hash right) but holds no key appended an event at the chain's tip, and the next
run's checkpoint, signed by the operator's key, vouched for it: an auditor holding an earlier
checkpoint saw a consistent extension the operator had signed. Now every run refuses such a chain
(exit 1, nothing written), `verify` reports the event (`event_signature_invalid`, checkpoints removed
or not), `verify --repair` does not heal it, and no checkpoint is signed over it."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.core.operator_signatures import OPERATOR_SIGNATURE, verified_statement
from pcbo_dagster.core.signed_note import signing_key_from_seed
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.engine.transparency_log import CheckpointNotSigned, publish
from pcbo_dagster_tests.approver_keys import key_file
from pcbo_dagster_tests.cli_runner import (
    PcboRun,
    backup_events,
    lake_files,
    load_generator,
    run_pcbo_in_process,
    write_request,
)
from pcbo_dagster_tests.cli_runner import run_pcbo as run_pcbo_process

OPERATOR = signing_key_from_seed("ops.example/operator", bytes([33]) * 32)
CHAIN = "events/v1"


def run_pcbo(args: list[Any], home: Path, env: dict[str, str] | None = None) -> PcboRun:
    """`pcbo *args` with PCBO_HOME=`home` and only the `PCBO_*` variables of `env` (a process given
    no PCBO_SIGNING_KEY runs without it): in this process, but a run with a failpoint (which ends its
    process, exit 86) in a process of its own."""
    if env and "PCBO_FAILPOINT" in env:
        return run_pcbo_process(args, home=home, env=env)
    return run_pcbo_in_process(args, home=home, env=env)


def _request(run_id: str, seed: int = 5) -> dict[str, Any]:
    return load_generator().make_request(records=120, partitions=3, seed=seed, run_id=run_id)


def _signing(tmp_path: Path) -> dict[str, str]:
    return {"PCBO_SIGNING_KEY": str(key_file(tmp_path, OPERATOR))}


def _execute(tmp_path: Path, home: Path, run_id: str, env: dict[str, str] | None, seed: int = 5) -> Any:
    request = write_request(tmp_path / f"{run_id}.json", _request(run_id, seed))
    return run_pcbo(["execute", "--input", request], home=home, env=env)


def _open(home: Path, env: dict[str, str] | None = None) -> Environment:
    return Environment.open(Settings.resolve(home=str(home), env=env or {}, parallel=1))


def _append_without_the_key(home: Path, event_type: str, body: dict[str, Any]) -> None:
    """What someone who can write the audit backup and the catalog appends, holding no key."""
    env = _open(home)
    try:
        env.audit.append(CHAIN, event_type, body)
    finally:
        env.close()


@pytest.fixture(scope="module")
def _signed_run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the operator's key and a home after run `s1` with it (a signed chain),
    built once per module: `signed_run` copies it for each test."""
    work = tmp_path_factory.mktemp("signed-s1")
    done = _execute(work, work / "home", "s1", _signing(work))
    assert done.status == 0, done.stderr
    return work


@pytest.fixture
def signed_run(_signed_run_template: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """(home, env with the operator's key): this test's own copy of a home after run `s1` with the key
    (`_execute(tmp_path, home, "s1", signing)`, its status 0), the key file in `tmp_path`."""
    shutil.copytree(_signed_run_template, tmp_path, dirs_exist_ok=True)
    return tmp_path / "home", _signing(tmp_path)


def _kinds(document: dict[str, Any]) -> list[str]:
    return [f["kind"] for f in document["findings"]]


def _checkpoint_sizes(home: Path) -> list[int]:
    with sqlite3.connect(home / "catalog.db") as db:
        return [n for (n,) in db.execute("SELECT tree_size FROM transparency_checkpoints ORDER BY tree_size")]


def test_every_event_is_signed_at_its_place(signed_run: tuple[Path, dict[str, str]]) -> None:
    home, signing = signed_run  # run s1 with the operator's key, exit 0
    events = backup_events(home, intents=True)
    assert len(events) > 3
    verifier = OPERATOR.verifier()
    for event in events:
        assert event[OPERATOR_SIGNATURE].startswith(
            f"pcbo.event/v2\nchain {CHAIN}\nseq {event['chain']['seq']}\n"
        )
        assert verified_statement(event, verifier) is not None
    # the same body at another place (seq, previous event), or of another type, does not verify
    first, second = events[0], events[1]
    moved = {**first, "chain": {**first["chain"], "seq": 1, "prev_event_hash": first["chain"]["event_hash"]}}
    assert verified_statement(moved, verifier) is None
    assert verified_statement({**second, "event_type": first["event_type"]}, verifier) is None
    assert run_pcbo(["verify"], home=home, env=signing).status == 0


@pytest.mark.parametrize("forged", ["unsigned", "replayed", "checkpoints_removed"])
def test_an_event_appended_without_the_key_is_refused_reported_and_never_checkpointed(
    signed_run: tuple[Path, dict[str, str]], tmp_path: Path, forged: str
) -> None:
    home, signing = signed_run  # run s1 with the operator's key, exit 0
    sizes = _checkpoint_sizes(home)
    # an intent of a version 2 of the first partition (the attacker's manifest): the chain then says
    # a run is under way, a crash window the next run or `verify --repair` would complete
    intent = backup_events(home, intents=True)[0]
    assert intent["event_type"] == "partition_commit_intent"
    first = intent["partitions"][0]
    body = {
        "partitions": [
            {
                "key": first["key"],
                "manifest_checksum": "sha256:" + "ab" * 32,
                "previous_manifest_checksum": first["manifest_checksum"],
                "previous_version": 1,
                "version": 2,
            }
        ],
        "producer": intent["producer"],
        "run_id": "forged",
    }
    if forged == "replayed":  # with the genuine intent's signature
        body[OPERATOR_SIGNATURE] = intent[OPERATOR_SIGNATURE]
    _append_without_the_key(home, "partition_commit_intent", body)
    if forged == "checkpoints_removed":  # no checkpoint left to say where the key's events began
        with sqlite3.connect(home / "catalog.db") as db:
            names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
            for name in names:
                if name.startswith(("transparency_checkpoints_", "checkpoint_cosignatures_")):
                    db.execute(f"DROP TRIGGER {name}")
            db.execute("DELETE FROM checkpoint_cosignatures")
            db.execute("DELETE FROM transparency_checkpoints")
        for path in (home / "lake" / "events" / "v1" / "_checkpoints").iterdir():
            path.unlink()
    before = lake_files(home)

    planned = run_pcbo(
        ["dry-run", "--input", write_request(tmp_path / "s2.json", _request("s2", 6))], home=home, env=signing
    )
    assert planned.status == 1 and "no valid signature" in planned.stderr, planned.stderr  # as execute
    again = _execute(tmp_path, home, "s2", signing, seed=6)
    assert again.status == 1, again.stderr
    assert "event_signature_invalid" in again.stderr or "no valid signature" in again.stderr, again.stderr
    assert lake_files(home) == before

    verified = run_pcbo(["verify"], home=home, env=signing)
    assert verified.status == 1
    assert "event_signature_invalid" in _kinds(verified.document), verified.document["findings"]
    repaired = run_pcbo(["verify", "--repair"], home=home, env=signing)
    assert repaired.status == 1 and "event_signature_invalid" in _kinds(repaired.document)
    # and no checkpoint vouches for it, whoever asks for one
    env = _open(home, signing)
    try:
        with pytest.raises(CheckpointNotSigned, match="no checkpoint signed"):
            publish(env, CHAIN)
    finally:
        env.close()
    published = run_pcbo(["log", "publish", "--dataset", "events"], home=home, env=signing)
    assert published.status == 1 and "no valid signature of the operator's key" in published.stderr
    assert "internal error" not in published.stderr
    assert _checkpoint_sizes(home) == ([] if forged == "checkpoints_removed" else sizes)


def test_a_chain_from_before_the_key_goes_on_signed(tmp_path: Path) -> None:
    """Events appended before the key was set are unsigned: the first run with the key signs its own
    events and a checkpoint over the whole chain, and verify is clean; from then on an unsigned event
    is refused."""
    home, signing = tmp_path / "home", _signing(tmp_path)
    assert _execute(tmp_path, home, "s1", None).status == 0
    assert all(OPERATOR_SIGNATURE not in e for e in backup_events(home, intents=True))
    second = _execute(tmp_path, home, "s2", signing, seed=6)
    assert second.status == 0, second.stderr
    events = backup_events(home, intents=True)
    assert OPERATOR_SIGNATURE in events[-1]
    assert _checkpoint_sizes(home) == [len(events)]
    assert run_pcbo(["verify"], home=home, env=signing).status == 0
    # a run without the key (a process not given it) is refused; an event appended without it (by
    # someone who can write the stores) is one no checkpoint will cover
    third = _execute(tmp_path, home, "s3", None, seed=7)
    assert third.status == 1 and "PCBO_SIGNING_KEY" in third.stderr, third.stderr
    _append_without_the_key(home, "partition_commit_intent", {"partitions": [], "run_id": "forged"})
    verified = run_pcbo(["verify"], home=home, env=signing)
    assert verified.status == 1 and set(_kinds(verified.document)) == {"event_signature_invalid"}


def test_a_process_without_the_key_appends_nothing_to_a_signed_chain(
    signed_run: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """A pcbo process not given PCBO_SIGNING_KEY (a host or worker misconfigured) refuses to append to
    a chain the key signs (exit 1 naming the variable, nothing written), where it appended unsigned
    events that made every keyed run refuse the chain for good (red-team finding)."""
    home, signing = signed_run  # run s1 with the operator's key, exit 0
    events, files = backup_events(home, intents=True), lake_files(home)
    keyless = _execute(tmp_path, home, "s2", None, seed=6)
    assert keyless.status == 1, keyless.stderr
    assert "PCBO_SIGNING_KEY" in keyless.stderr and "nothing was written" in keyless.stderr
    first = next(e for e in events if e["event_type"] == "partition_commit_intent")["partitions"][0]["key"]
    rolled = run_pcbo(["rollback", "--dataset", "events", "--partition", first], home=home)
    assert rolled.status == 1 and "PCBO_SIGNING_KEY" in rolled.stderr, rolled.stderr
    assert backup_events(home, intents=True) == events and lake_files(home) == files
    assert run_pcbo(["verify"], home=home, env=signing).status == 0
    # with the key the chain goes on
    assert _execute(tmp_path, home, "s2", signing, seed=6).status == 0
    assert run_pcbo(["verify"], home=home, env=signing).status == 0


def test_repair_without_the_key_heals_nothing_of_a_signed_chain(tmp_path: Path) -> None:
    """`verify --repair` in a process not given the key holds a signed chain back (its crash window
    stays, reported) instead of completing it with unsigned events no keyed run would accept; with
    the key it heals (red-team finding)."""
    home, signing = tmp_path / "home", _signing(tmp_path)
    request = write_request(tmp_path / "c1.json", _request("c1"))
    crashed = run_pcbo(
        ["execute", "--input", request], home=home, env={**signing, "PCBO_FAILPOINT": "after_commit@1"}
    )
    assert crashed.status == 86, crashed.stderr
    events = backup_events(home, intents=True)
    keyless = run_pcbo(["verify", "--repair"], home=home)
    assert keyless.status == 1 and not keyless.document["repaired"], keyless.document
    assert "PCBO_SIGNING_KEY" in str(keyless.document["findings"])
    assert backup_events(home, intents=True) == events
    healed = run_pcbo(["verify", "--repair"], home=home, env=signing)
    assert healed.status == 0 and healed.document["repaired"], healed.document
    assert run_pcbo(["verify"], home=home, env=signing).status == 0


def test_a_run_with_another_key_appends_nothing_to_a_chain_signed_by_the_first(
    signed_run: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """A PCBO_SIGNING_KEY rotated on an existing chain: the run is refused naming both keys (exit 1,
    nothing written), where it appended events of the new key and `verify` then reported every
    checkpoint the first key signed as `checkpoint_signature_invalid` and its table declaration as
    unsigned, with nothing said at the run (red-team finding)."""
    home, signing = signed_run  # run s1 with the operator's key, exit 0
    events, files, sizes = backup_events(home, intents=True), lake_files(home), _checkpoint_sizes(home)
    rotated = signing_key_from_seed("ops.example/operator-2027", bytes([34]) * 32)
    other = {"PCBO_SIGNING_KEY": str(key_file(tmp_path, rotated))}
    again = _execute(tmp_path, home, "s2", other, seed=6)
    assert again.status == 1, again.stderr
    assert "ops.example/operator " in again.stderr or "ops.example/operator+" in again.stderr, again.stderr
    assert "ops.example/operator-2027" in again.stderr and "nothing was written" in again.stderr
    assert backup_events(home, intents=True) == events and lake_files(home) == files
    assert _checkpoint_sizes(home) == sizes
    assert run_pcbo(["verify"], home=home, env=signing).status == 0
    # nor does repair with it heal a crash window of that chain
    crashed = _execute(tmp_path, home, "s3", {**signing, "PCBO_FAILPOINT": "after_commit@1"}, seed=7)
    assert crashed.status == 86, crashed.stderr
    events = backup_events(home, intents=True)
    held = run_pcbo(["verify", "--repair"], home=home, env=other)
    assert held.status == 1 and not held.document["repaired"], held.document
    assert "ops.example/operator-2027" in str(held.document["findings"])
    assert backup_events(home, intents=True) == events
    assert run_pcbo(["verify", "--repair"], home=home, env=signing).status == 0


def test_repair_without_the_key_on_a_sound_signed_chain_reports_no_integrity_failure(
    signed_run: tuple[Path, dict[str, str]],
) -> None:
    """`verify --repair` in a process not given the key (a host, the HTTP API's `verify` command, a
    Dagster repair run) over a signed chain with nothing to heal: clean, exit 0, nothing written, where
    it failed (exit 1) saying `no checkpoint signed: the chain does not verify` of a chain that
    verifies (red-team finding)."""
    home, signing = signed_run  # run s1 with the operator's key, exit 0
    events, sizes = backup_events(home, intents=True), _checkpoint_sizes(home)
    keyless = run_pcbo(["verify", "--repair"], home=home)
    assert keyless.status == 0, keyless.document
    assert keyless.document["findings"] == [] and not keyless.document["repaired"]
    assert backup_events(home, intents=True) == events and _checkpoint_sizes(home) == sizes


def test_no_checkpoint_is_signed_with_another_key_over_a_signed_chain(tmp_path: Path) -> None:
    """`pcbo log publish` (or `evidence export`, which signs a checkpoint first when none covers the
    run) given another key than the one that signs the chain, while the log has grown past its last
    checkpoint (a run killed before it signed one): refused naming both keys, no checkpoint stored,
    where it signed one with the other key, which the append-only catalog then held for good
    (`checkpoint_signature_invalid` on every `verify` with the chain's key: red-team finding)."""
    home, signing = tmp_path / "home", _signing(tmp_path)
    crashed = _execute(tmp_path, home, "c1", {**signing, "PCBO_FAILPOINT": "after_commit@1"})
    assert crashed.status == 86, crashed.stderr
    assert _checkpoint_sizes(home) == []
    rotated = signing_key_from_seed("ops.example/operator-2027", bytes([34]) * 32)
    other = {"PCBO_SIGNING_KEY": str(key_file(tmp_path, rotated))}
    published = run_pcbo(["log", "publish", "--dataset", "events"], home=home, env=other)
    assert published.status == 1, published.stderr
    assert "ops.example/operator-2027" in published.stderr and "no checkpoint signed" in published.stderr
    exported = run_pcbo(
        ["evidence", "export", "--run", "c1", "--output", str(tmp_path / "c1.evidence.json")],
        home=home,
        env=other,
    )
    assert exported.status == 1 and "ops.example/operator-2027" in exported.stderr, exported.stderr
    assert _checkpoint_sizes(home) == [] and not (tmp_path / "c1.evidence.json").exists()
    assert not list((home / "lake" / "events" / "v1").glob("_checkpoints/*"))
    # with the chain's key, the crash window is healed and a checkpoint signed: verify is clean
    assert run_pcbo(["verify", "--repair"], home=home, env=signing).status == 0
    assert run_pcbo(["verify"], home=home, env=signing).status == 0


@contextmanager
def _signed_run_while_the_endpoint_is_down(tmp_path: Path) -> Iterator[tuple[Any, Path, dict[str, str]]]:
    """(a `Receiver` on loopback, the home, the env): a run with the operator's key whose audit
    endpoint (the receiver) was down, so nothing of it was delivered (still down: the test says when
    it is back)."""
    from pcbo_dagster_tests.test_audit_delivery import Receiver

    receiver = Receiver().start()
    try:
        home = tmp_path / "home"
        env = {**_signing(tmp_path), "PCBO_AUDIT_ENDPOINT": receiver.url, "PCBO_AUDIT_ATTEMPTS": "1"}
        receiver.down = True
        assert _execute(tmp_path, home, "s1", env).status == 0
        yield receiver, home, env
    finally:
        receiver.close()


def test_a_forged_delivery_cursor_is_reported_and_skips_no_event(tmp_path: Path) -> None:
    """Red-team finding: someone who can write the audit backup moved the delivery cursor ahead (to an
    event of the chain, its hash right) while the endpoint was down, and the events before it never
    reached the receiver. With the operator's key the cursor is signed: `verify` reports one that is
    not (`delivery_cursor_forged`) and the next delivery re-sends from seq 0, every event arriving."""
    import json
    from types import SimpleNamespace

    from pcbo_dagster.audit.backup import AuditBackup
    from pcbo_dagster.server.status import _undelivered
    from pcbo_dagster_tests.cli_runner import backup_file

    with _signed_run_while_the_endpoint_is_down(tmp_path) as (receiver, home, env):
        events = backup_events(home, intents=True)
        last = events[-1]["chain"]
        cursor = backup_file(home).with_suffix(".delivered")
        ahead = {"chain_key": CHAIN, "seq": last["seq"], "event_hash": last["event_hash"]}
        cursor.write_text(json.dumps(ahead))
        # (the API's status counts them undelivered, as delivery will)
        config = SimpleNamespace(engine=Settings.resolve(home=str(home), env=env, parallel=1))
        assert _undelivered(config, AuditBackup(home / "pas"), CHAIN) == len(events)  # type: ignore[arg-type]
        verified = run_pcbo(["verify"], home=home, env=env)
        assert verified.status == 1, verified.document
        assert _kinds(verified.document) == ["delivery_cursor_forged"], verified.document
        assert "not signed by the operator's key" in verified.document["findings"][0]["detail"]
        # (without the key, a cursor naming an event of the chain cannot be told from pcbo's own)
        assert run_pcbo(["verify"], home=home).status == 0
        receiver.down = False
        published = run_pcbo(["log", "publish", "--dataset", "events"], home=home, env=env)
        assert published.status == 0, published.stderr
        delivery = published.document["auditDelivery"]
        assert "seq 0" in delivery["cursorRejected"] and delivery["pending"] == 0, delivery
        seqs = [json.loads(b)["chain"]["seq"] for b in receiver.accepted if b"pcbo.checkpoint/1" not in b]
        every = list(range(len(events)))
        assert sorted(set(seqs)) == every and seqs[-len(events) :] == every
        assert run_pcbo(["verify"], home=home, env=env).status == 0


def test_a_forged_checkpoint_delivery_marker_does_not_stop_the_checkpoint(tmp_path: Path) -> None:
    """Red-team finding: the checkpoint delivery marker held the checkpoint document last delivered;
    someone who can write the audit backup copied the checkpoint the endpoint had not received (it is in
    the lake) into it, and `publish` took it as delivered and never sent it. The marker is now a note
    the operator's key signs over the document's digest: a copied or forged one is not trusted."""
    import json

    import rfc8785

    from pcbo_dagster_tests.cli_runner import backup_file, lake_dir

    with _signed_run_while_the_endpoint_is_down(tmp_path) as (receiver, home, env):
        (size,) = _checkpoint_sizes(home)
        text = (lake_dir(home) / "events" / "v1" / "_checkpoints" / f"{size:012d}.checkpoint").read_text()
        document: dict[str, Any] = {
            "type": "pcbo.checkpoint/1",
            "chain_key": CHAIN,
            "tree_size": size,
            "checkpoint": text,
        }
        backup_file(home).with_suffix(".checkpoint-delivered").write_bytes(rfc8785.dumps(document))
        receiver.down = False
        published = run_pcbo(["log", "publish", "--dataset", "events"], home=home, env=env)
        assert published.status == 0, published.stderr
        assert published.document["checkpoint"]["delivered"] is True
        got = [json.loads(b) for b in receiver.accepted if b"pcbo.checkpoint/1" in b]
        assert got == [document]
        # delivered once: the next publish sends it no more
        assert run_pcbo(["log", "publish", "--dataset", "events"], home=home, env=env).status == 0
        assert len([b for b in receiver.accepted if b"pcbo.checkpoint/1" in b]) == 1


def test_no_checkpoint_of_a_chain_another_key_signs_is_signed(tmp_path: Path) -> None:
    """Red-team finding: a chain whose events another key signed (one rotated away, or the key of
    someone who can write the stores), its checkpoints removed from the catalog: runs with the
    operator's key refused it, but `pcbo log publish` and `evidence export` signed a checkpoint of it
    with that key, vouching for events it never signed. Now no checkpoint is signed (exit 1)."""
    home, signing = tmp_path / "home", _signing(tmp_path)
    stranger = signing_key_from_seed("ops.example/operator", bytes([35]) * 32)
    (tmp_path / "b").mkdir()
    assert (
        _execute(tmp_path, home, "s1", {"PCBO_SIGNING_KEY": str(key_file(tmp_path / "b", stranger))}).status
        == 0
    )
    with sqlite3.connect(home / "catalog.db") as db:
        db.execute("DROP TRIGGER transparency_checkpoints_no_delete")
        db.execute("DELETE FROM transparency_checkpoints")
    for args in (["log", "publish", "--dataset", "events"], ["evidence", "export", "--run", "s1"]):
        run = run_pcbo(args, home=home, env=signing)
        assert run.status == 1, (args, run.document)
        assert "no checkpoint signed" in run.stderr and "ops.example/operator+" in run.stderr, run.stderr
        assert _checkpoint_sizes(home) == []


def test_no_proof_is_made_from_a_chain_holding_an_event_the_key_did_not_sign(
    signed_run: tuple[Path, dict[str, str]],
) -> None:
    """Red-team finding: `pcbo proof` (and the HTTP API's proof routes) never gave the operator's key to
    the check of the chain's stored log, so it made proofs from a chain holding an event someone without
    the key appended, which every run, `verify` and `evidence export` refuse. Now it proves nothing
    from it (exit 1); without the key (a reader holding none) nothing is checked, as for `verify`."""
    import pyarrow.parquet as pq

    from pcbo_dagster_tests.cli_runner import lake_dir

    home, signing = signed_run  # run s1 with the operator's key, exit 0
    commit = next(e for e in backup_events(home) if e["event_type"] == "partition_committed")
    key = commit["partition"]["key"]
    data = next((lake_dir(home) / "events" / "v1" / key).rglob("part-*.parquet"))
    record_id = pq.read_table(data).column("id")[0].as_py()
    args = ["proof", "--dataset", "events", "--partition", key, "--id", record_id]
    assert run_pcbo(args, home=home, env=signing).status == 0
    _append_without_the_key(home, "operator_note", {"run_id": "s1"})
    refused = run_pcbo(args, home=home, env=signing)
    assert refused.status == 1 and "cannot prove anything" in refused.stderr, refused.stderr
    assert "no valid signature of the operator's key" in refused.stderr, refused.stderr

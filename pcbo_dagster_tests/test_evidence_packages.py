"""Evidence packages (issue 11): `pcbo evidence export` and `pcbo evidence verify`, tampering with the
envelope, the payload, a subject file and a proof, a verification on a machine with no catalog, and an
independent verifier (plain `cryptography`, hashlib, base64 and json: none of pcbo's code) that checks
a checkpoint signature, the DSSE envelope and an inclusion proof."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pcbo_dagster.cli import main as cli
from pcbo_dagster.core.audit_chain import build_event
from pcbo_dagster.core.canonical import jcs
from pcbo_dagster.core.checkpoints import Checkpoint, origin_for, parse_signed_checkpoint
from pcbo_dagster.core.merkle import MerkleTree
from pcbo_dagster.core.signed_note import (
    COSIGNATURE_V1,
    Note,
    SigningKey,
    b64,
    cosign,
    new_signing_key,
    parse_note,
    signing_key_from_seed,
)
from pcbo_dagster.core.transparency_log import event_leaf
from pcbo_dagster.evidence.envelope import sign_envelope
from pcbo_dagster_tests.cli_runner import (
    lake_dir,
    load_generator,
    run_pcbo,
    run_pcbo_in_process,
    write_request,
)
from pcbo_dagster_tests.test_transparency_attacks import pcbo

WITNESS = new_signing_key("witness.example/w1")
WITNESS_VKEY = WITNESS.verifier(COSIGNATURE_V1).text


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("evidence")
    key = new_signing_key("ops.example/operator")
    key_file = work / "operator.key"
    key_file.write_text(key.text + "\n")
    key_file.chmod(0o600)
    home = work / "home"
    request = load_generator().make_request(records=50, partitions=3, seed=9, run_id="ev1")
    status, _ = pcbo(
        home,
        "execute",
        "--input",
        str(write_request(work / "r.json", request)),
        "--signing-key",
        str(key_file),
    )
    assert status == 0
    status, envelope = pcbo(home, "evidence", "export", "--run", "ev1", "--signing-key", str(key_file))
    assert status == 0
    path = work / "ev1.evidence.json"
    path.write_text(json.dumps(envelope))
    return {
        "work": work,
        "home": home,
        "key": key,
        "vkey": key.verifier().text,
        "envelope": envelope,
        "path": path,
    }


def offline(work: Path, *args: str) -> tuple[int, Any]:
    """`pcbo *args` in this process, with no home (the offline commands take none)."""
    out = work / "offline-out.json"
    out.unlink(missing_ok=True)
    status = cli.main([*args, "--output", str(out)])
    return status, json.loads(out.read_text()) if out.exists() else None


def _verify(package: dict[str, Any], envelope: dict[str, Any], *extra: str) -> tuple[int, Any]:
    path = package["work"] / "candidate.json"
    path.write_text(json.dumps(envelope))
    return offline(package["work"], "evidence", "verify", str(path), "--key", package["vkey"], *extra)


def _statement(envelope: dict[str, Any]) -> dict[str, Any]:
    return json.loads(base64.b64decode(envelope["payload"]))


def test_a_package_verifies_on_a_machine_with_no_catalog(package: dict[str, Any], tmp_path: Path) -> None:
    elsewhere = tmp_path / "auditor"
    elsewhere.mkdir()
    (elsewhere / "package.json").write_bytes(package["path"].read_bytes())
    # `pcbo evidence verify` there (PCBO_HOME a directory that does not exist, in this process)
    run = run_pcbo_in_process(
        ["evidence", "verify", "package.json", "--key", package["vkey"]],
        home=elsewhere / "home",
        cwd=elsewhere,
    )
    assert run.status == 0, run.stderr
    assert run.document["valid"] and run.document["subjects"] == 6  # 3 parquet files, 3 manifests
    assert run.document["auditEvents"] == 4  # the intent and three commits
    assert sorted(p.name for p in elsewhere.iterdir()) == ["package.json"]  # nothing created
    with_lake = run_pcbo_in_process(
        [
            "evidence",
            "verify",
            "package.json",
            "--key",
            package["vkey"],
            "--lake",
            str(lake_dir(package["home"])),
        ],
        home=elsewhere / "home",
        cwd=elsewhere,
    )
    assert with_lake.status == 0 and with_lake.document["subjectsCheckedInLake"] == 6


def test_the_statement_says_what_the_run_did(package: dict[str, Any]) -> None:
    statement = _statement(package["envelope"])
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert package["envelope"]["payloadType"] == "application/vnd.in-toto+json"
    predicate = statement["predicate"]
    assert predicate["run"]["runId"] == "ev1" and len(predicate["partitions"]) == 3
    commits = [
        a["event"] for a in predicate["auditEvents"] if a["event"]["event_type"] == "partition_committed"
    ]
    assert {c["plan_hash"] for c in commits} == {predicate["run"]["planHash"]}
    assert {c["decision_hash"] for c in commits} == {predicate["run"]["decisionHash"]}
    # No event carries the run's status or its policies (those are in the version manifests, subjects).
    assert "status" not in predicate["run"] and "policies" not in predicate
    assert predicate["checkpoint"].startswith("pcbo/events/v1\n4\n")
    assert {s["name"].rsplit("/", 1)[-1].split("-")[0] for s in statement["subject"]} == {
        "part",
        "v000001.json",
    }


def test_a_flipped_byte_in_the_signature_or_the_payload_is_caught(package: dict[str, Any]) -> None:
    envelope = json.loads(json.dumps(package["envelope"]))
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[7] ^= 1
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    status, document = _verify(package, envelope)
    assert status == 1 and "does not verify" in document["problems"][0]
    envelope = json.loads(json.dumps(package["envelope"]))
    payload = bytearray(base64.b64decode(envelope["payload"]))
    payload[payload.index(b"ev1")] = ord("x")
    envelope["payload"] = base64.b64encode(bytes(payload)).decode()
    status, document = _verify(package, envelope)
    assert status == 1 and "does not verify" in document["problems"][0]


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        ("payload", "not a DSSE envelope: its payload is not base64 text"),
        ("signatures", "not a DSSE envelope: its signatures are not a list of {keyid, sig} strings"),
    ],
)
def test_an_envelope_nested_as_deep_as_json_may_be_is_a_finding_not_a_crash(
    package: dict[str, Any], tmp_path: Path, member: str, problem: str
) -> None:
    """Red-team finding: the envelope was deep-copied before its members were checked, so a file no
    key signed, its `payload` or `signatures` nested 899 levels deep (the JSON reader's bound is 900),
    ended `evidence verify` in an internal error (RecursionError) instead of a finding."""
    members = {"payload": '"e30="', "payloadType": '"application/vnd.in-toto+json"', "signatures": "[]"}
    members[member] = "[" * 899 + "]" * 899
    path = tmp_path / "deep.json"
    path.write_text("{" + ",".join(f'"{name}":{value}' for name, value in members.items()) + "}")
    run = run_pcbo(["evidence", "verify", str(path), "--key", package["vkey"]], home=tmp_path / "home")
    assert run.status == 1, run.stderr
    assert run.document == {"valid": False, "problems": [problem]}


def test_a_flipped_byte_in_a_proof_or_an_event_is_caught_even_when_signed_again(
    package: dict[str, Any],
) -> None:
    """A package made wrong by its exporter (signed after the proof or an event was altered)."""
    for alter in ("proof", "event"):
        statement = _statement(package["envelope"])
        entry = statement["predicate"]["auditEvents"][1]
        if alter == "proof":
            digest = bytearray(base64.b64decode(entry["inclusionProof"][0]))
            digest[0] ^= 1
            entry["inclusionProof"][0] = base64.b64encode(bytes(digest)).decode()
        else:
            entry["event"]["record_count"] += 1
        status, document = _verify(package, _resigned(package, statement))
        assert status == 1, alter
        assert any(
            "inclusion proof does not verify" in p or "does not recompute" in p for p in document["problems"]
        )


def test_a_flipped_byte_in_a_subject_file_is_caught_with_the_lake(
    package: dict[str, Any], tmp_path: Path
) -> None:
    import shutil

    lake = tmp_path / "lake"
    shutil.copytree(lake_dir(package["home"]), lake)
    target = next(lake.rglob("part-*.parquet"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    status, document = _verify(package, package["envelope"], "--lake", str(lake))
    assert status == 1
    assert document["problems"] == [
        f"{target.relative_to(lake).as_posix()}: its bytes do not have the subject's sha256"
    ]


def _resigned(package: dict[str, Any], statement: dict[str, Any]) -> dict[str, Any]:
    """What an insider holding the operator's key makes of an edited statement: a valid envelope."""
    return sign_envelope(jcs(statement), package["key"])


def _with_checkpoint(package: dict[str, Any], note: Note) -> dict[str, Any]:
    statement = _statement(package["envelope"])
    statement["predicate"]["checkpoint"] = note.render()
    return _resigned(package, statement)


def _logged(package: dict[str, Any], statement: dict[str, Any], events: list[dict]) -> dict[str, Any]:
    """What an insider holding the operator's key makes of `events`, the whole log of one chain (seq 0
    up): the statement carries them with their proofs against a checkpoint of that log it signs."""
    tree = MerkleTree([event_leaf(e) for e in events])
    note = Checkpoint(origin_for(events[0]["chain"]["chain_key"]), tree.size, tree.root).sign(package["key"])
    statement["predicate"]["checkpoint"] = note.render()
    statement["predicate"]["auditEvents"] = [
        {
            "event": e,
            "leafIndex": seq,
            "treeSize": tree.size,
            "inclusionProof": [b64(h) for h in tree.inclusion_proof(seq)],
        }
        for seq, e in enumerate(events)
    ]
    return _resigned(package, statement)


def _appended(events: list[dict], event_type: str, body: dict[str, Any]) -> list[dict]:
    """`events` (a whole chain of events/v1) with one more event appended."""
    last = events[-1]["chain"]
    return [
        *events,
        build_event(
            chain_key="events/v1",
            seq=last["seq"] + 1,
            prev_event_hash=last["event_hash"],
            event_type=event_type,
            timestamp="2026-12-06T00:00:00Z",
            body=body,
        ),
    ]


@pytest.mark.parametrize("named", [["sha256:" + "ab" * 32], {"hash": "sha256:" + "ab" * 32}])
def test_a_promotion_naming_no_event_hash_is_a_finding_not_a_crash(
    package: dict[str, Any], named: Any
) -> None:
    """Red-team finding: a proven `rollout_promoted` event of the run whose `approval_event_hash` is a
    list or an object (appended to the log by an insider) ended `evidence verify` in an
    internal error (TypeError: unhashable type) instead of a finding."""
    statement = _statement(package["envelope"])
    events = [entry["event"] for entry in statement["predicate"]["auditEvents"]]
    promoted = _appended(events, "rollout_promoted", {"run_id": "ev1", "approval_event_hash": named})
    status, document = _verify(package, _logged(package, statement, promoted))
    assert status == 1, document
    assert document["problems"] == ["the package lacks an approval event the run's promotion relied on"]


def _run_of_many_partitions(package: dict[str, Any], count: int) -> list[dict]:
    """The whole chain of a run `big` of `count` hourly partitions: one intent, then each partition's
    commit event (the fixture's first commit, its partition key replaced)."""
    from datetime import datetime, timedelta

    events = [entry["event"] for entry in _statement(package["envelope"])["predicate"]["auditEvents"]]
    template = next(e for e in events if e["event_type"] == "partition_committed")
    reserved = ("version", "event_type", "event_id", "timestamp", "chain", "operator_signature")
    body = json.dumps({k: v for k, v in template.items() if k not in reserved} | {"run_id": "big"})
    first = datetime(2024, 1, 1)
    keys = [(first + timedelta(hours=n)).strftime("%Y%m%dT%H%M%SZ") for n in range(count)]
    checksum = template["manifest"]["checksum"]
    intent = {
        "run_id": "big",
        "partitions": [{"key": k, "version": 1, "manifest_checksum": checksum} for k in keys],
    }
    bodies = [("partition_commit_intent", intent)]
    bodies += [
        ("partition_committed", json.loads(body.replace(template["partition"]["key"], k))) for k in keys
    ]
    chain: list[dict] = []
    for event_type, event_body in bodies:
        chain.append(
            build_event(
                chain_key="events/v1",
                seq=len(chain),
                prev_event_hash=chain[-1]["chain"]["event_hash"] if chain else None,
                event_type=event_type,
                timestamp="2026-12-06T00:00:00Z",
                body=event_body,
            )
        )
    return chain


def test_a_run_of_many_partitions_exports_and_verifies_in_linear_time(package: dict[str, Any]) -> None:
    """Red-team finding: the claims (a partition committed twice?), the run's events (`e in own`, a
    list of dicts) and the completion check (each intent's partition committed after it, each commit
    announced before?) compared every partition with every other: quadratic (2,500 partitions took 2 s
    of CPU, 10,000 took 45 s), so a genuine run at the engine's limit of 100,000 partitions would take
    over an hour to export and verify. Four times the partitions now take about four times as long,
    not 16 (CPU time of this process, which other processes' load hardly changes)."""
    import time

    from pcbo_dagster.evidence.package import CLAIMS, claims_of

    def seconds(count: int) -> float:
        events = _run_of_many_partitions(package, count)
        started = time.process_time()
        claims = claims_of(events, "big", "events", "v1")  # what export signs
        elapsed = time.process_time() - started
        statement = _statement(package["envelope"])
        statement["subject"] = claims["subject"]
        statement["predicate"] |= {name: claims[name] for name in CLAIMS}
        envelope = _logged(package, statement, events)
        started = time.process_time()
        status, document = _verify(package, envelope)
        assert status == 0, document["problems"][:3]
        assert document["auditEvents"] == count + 1 and document["subjects"] == 2 * count
        return elapsed + time.process_time() - started

    small, large = seconds(2_500), seconds(10_000)
    assert large < 8 * small, (small, large)


@pytest.mark.parametrize("run_id", ["ev1\u202egnp.exe", "ev1\n", "ev\u0131", ""])
def test_a_run_id_pcbo_never_writes_is_refused(package: dict[str, Any], run_id: str) -> None:
    """Red-team finding: the run id was any string, so a package an insider signed over a log of its
    own making, for a run named with a right-to-left override (`ev1` U+202E `gnp.exe` reads
    `ev1exe.png` in a terminal), a newline or a dotless i, verified and its verdict printed that name.
    pcbo names runs `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` (`export --run` takes nothing else; a rollout's
    run ids fit): any other run id is refused like a dataset or version label that names no chain."""
    event = build_event(
        chain_key="events/v1",
        seq=0,
        prev_event_hash=None,
        event_type="rollout_promoted",
        timestamp="2026-12-06T00:00:00Z",
        body={"run_id": run_id, "rollout": "r1"},
    )
    statement = _statement(package["envelope"])
    statement["subject"] = []
    statement["predicate"] |= {"countsByReason": {}, "partitions": [], "approvals": []}
    statement["predicate"]["run"] |= {"runId": run_id, "planHash": None, "decisionHash": None}
    status, document = _verify(package, _logged(package, statement, [event]))
    assert status == 1, document
    assert document == {
        "valid": False,
        "problems": ["the predicate names no run (runId, dataset, versionLabel)"],
    }


def test_a_checkpoint_of_a_look_alike_origin_is_refused_even_witnessed(package: dict[str, Any]) -> None:
    """An insider signs the run's log (here unchanged; a rewritten one in the red-team repro) under the
    origin pcbo/fork/events/v1, which a witness never saw and so cosigns: not the log of events/v1."""
    checkpoint, _ = parse_signed_checkpoint(_statement(package["envelope"])["predicate"]["checkpoint"])
    fork = Checkpoint("pcbo/fork/events/v1", checkpoint.size, checkpoint.root).sign(package["key"])
    fork = fork.with_signatures([cosign(fork.text, WITNESS, 1700000000)])
    status, document = _verify(
        package, _with_checkpoint(package, fork), "--witness-key", WITNESS_VKEY, "--min-witnesses", "1"
    )
    assert status == 1 and document["checkpoint"]["witnesses"] == 1
    assert document["problems"] == [
        "the checkpoint's origin pcbo/fork/events/v1 is not the log of events/v1 (pcbo/events/v1)"
    ]
    # The operator's own prefix, when it is not pcbo/, is the auditor's to give.
    status, document = _verify(package, package["envelope"], "--origin-prefix", "example.com/pcbo/")
    assert (
        status == 1 and "is not the log of events/v1 (example.com/pcbo/events/v1)" in document["problems"][0]
    )


def test_min_witnesses_counts_only_the_witnesses_the_auditor_trusts(package: dict[str, Any]) -> None:
    """Without witnesses the package proves what the operator's key signs; `--min-witnesses N` asks for
    cosignatures of the `--witness-key`s given, and an insider's own cosigner key does not count."""
    trust = ("--witness-key", WITNESS_VKEY, "--min-witnesses", "1")
    status, document = _verify(package, package["envelope"], *trust)
    assert status == 1
    assert document["problems"] == ["0 of the 1 witness cosignature(s) required verify on the checkpoint"]
    note = parse_note(_statement(package["envelope"])["predicate"]["checkpoint"])
    insider = new_signing_key("witness.example/w1")  # the witness's name, the insider's key
    status, document = _verify(
        package, _with_checkpoint(package, note.with_signatures([cosign(note.text, insider, 1)])), *trust
    )
    assert status == 1 and document["checkpoint"]["witnesses"] == 0
    witnessed = _with_checkpoint(package, note.with_signatures([cosign(note.text, WITNESS, 1700000000)]))
    status, document = _verify(package, witnessed, *trust)
    assert status == 0 and document["checkpoint"]["witnessedBy"] == ["witness.example/w1"]
    assert _verify(package, witnessed, "--witness-key", WITNESS_VKEY, "--min-witnesses", "2")[0] == 2


def test_the_operators_own_key_is_no_witness(
    package: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Red-team finding: the operator's key in its cosigner form, under a witness's name (what an
    insider hands the auditor as "the witness's key"), was taken as a `--witness-key`: the insider
    cosigned its own checkpoint, `--min-witnesses 1` was met by the operator alone and `witnessedBy`
    named the witness. A witness key that is the `--key` is refused (exit 2 naming --witness-key), by
    `evidence verify` and `verify --trusted-checkpoint` alike."""
    posing = signing_key_from_seed("witness.example/w9", package["key"].seed)
    note = parse_note(_statement(package["envelope"])["predicate"]["checkpoint"])
    witnessed = _with_checkpoint(package, note.with_signatures([cosign(note.text, posing, 1700000000)]))
    trust = ("--witness-key", posing.verifier(COSIGNATURE_V1).text, "--min-witnesses", "1")
    capsys.readouterr()
    status, document = _verify(package, witnessed, *trust)
    refusal = "invalid input: --witness-key: witness.example/w9: the operator's key (--key) witnesses nothing"
    assert (status, document) == (2, None)
    assert refusal in capsys.readouterr().err
    held = package["work"] / "held.checkpoint"
    held.write_text(note.render())
    home = package["work"] / "no-home"
    argv = [
        "verify",
        "--trusted-checkpoint",
        str(held),
        "--key",
        package["vkey"],
        *trust,
        "--home",
        str(home),
    ]
    assert cli.main(argv) == 2
    assert refusal in capsys.readouterr().err and not home.exists()


def test_a_payload_that_is_not_its_canonical_form_is_refused(package: dict[str, Any]) -> None:
    """Signed bytes every reader must read alike: a second `subject` member (a first-wins parser would
    read the decoy, a last-wins one the real list) or any other encoding than RFC 8785 is refused."""
    real = jcs(_statement(package["envelope"])).decode()
    decoy = json.dumps([{"name": "events/v1/x/part-evil.parquet", "digest": {"sha256": "ef" * 32}}])
    twice = ('{"subject":' + decoy + "," + real[1:]).encode()
    status, document = _verify(package, sign_envelope(twice, package["key"]))
    assert status == 1
    assert document["problems"] == ["the payload: not valid JSON: duplicate key 'subject' in an object"]
    pretty = json.dumps(_statement(package["envelope"]), indent=1, sort_keys=True).encode()
    status, document = _verify(package, sign_envelope(pretty, package["key"]))
    assert status == 1 and document["problems"] == [
        "the payload is not the RFC 8785 canonical form of its JSON"
    ]


def _lie_about_counts(statement: dict[str, Any]) -> None:
    statement["predicate"]["partitions"][0]["recordCount"] += 1000
    statement["predicate"]["countsByReason"] = {k: 0 for k in statement["predicate"]["countsByReason"]}


def _lie_about_the_run(statement: dict[str, Any]) -> None:
    statement["predicate"]["run"]["planHash"] = "sha256:" + "11" * 32


def _claim_a_status(statement: dict[str, Any]) -> None:
    statement["predicate"]["run"]["status"] = "committed-and-approved"


def _claim_policies(statement: dict[str, Any]) -> None:
    statement["predicate"]["policies"] = {"requireConsent": True, "onViolation": "block"}


def _invent_an_approval(statement: dict[str, Any]) -> None:
    statement["predicate"]["approvals"] = [
        {"event_type": "rollout_approved", "by": "ciso@example.com", "eventHash": "sha256:" + "22" * 32}
    ]


def _change_a_manifest_checksum(statement: dict[str, Any]) -> None:
    statement["predicate"]["partitions"][0]["manifestChecksum"] = "sha256:" + "cd" * 32


def _add_a_decoy_subject(statement: dict[str, Any]) -> None:
    decoy = json.loads(json.dumps(statement["subject"][0]))
    decoy["digest"] = {"sha256": "ef" * 32}
    statement["subject"].insert(0, decoy)  # the same name, another digest, listed first


def _point_a_subject_elsewhere(statement: dict[str, Any]) -> None:
    statement["subject"][0]["uri"] = "s3://attacker-bucket/forged.parquet"


def _add_an_unchecked_digest(statement: dict[str, Any]) -> None:
    statement["subject"][0]["digest"]["sha512"] = "00" * 64


@pytest.mark.parametrize(
    ("lie", "problem"),
    [
        (_lie_about_counts, "the predicate's countsByReason is not what the run's proven events say"),
        (_lie_about_counts, "the predicate's partitions is not what the run's proven events say"),
        (_change_a_manifest_checksum, "the predicate's partitions is not what the run's proven events say"),
        (_lie_about_the_run, "the predicate's run is not what the run's proven events say"),
        (_claim_a_status, "the predicate's run is not what the run's proven events say"),
        (_claim_policies, "the statement holds members no event supports: policies"),
        (_invent_an_approval, "the predicate's approvals is not what the run's proven events say"),
        (_add_a_decoy_subject, "the subjects are not exactly the files and manifests"),
        (_point_a_subject_elsewhere, "the subjects are not exactly the files and manifests"),
        (_add_an_unchecked_digest, "the subjects are not exactly the files and manifests"),
    ],
)
def test_a_claim_the_proven_events_do_not_make_is_refused(
    package: dict[str, Any], lie: Any, problem: str
) -> None:
    """An insider with the operator's key edits the claims and signs the envelope again, keeping the
    real checkpoint, events and inclusion proofs: every claim is recomputed from the proven events."""
    statement = _statement(package["envelope"])
    lie(statement)
    status, document = _verify(
        package, _resigned(package, statement), "--lake", str(lake_dir(package["home"]))
    )
    assert status == 1 and any(p.startswith(problem) for p in document["problems"]), document["problems"]


def _drop_partition(statement: dict[str, Any], key: str) -> None:
    """The partition's commit event, its entry and its subjects left out, all else consistent."""
    predicate = statement["predicate"]
    predicate["partitions"] = [p for p in predicate["partitions"] if p["key"] != key]
    predicate["auditEvents"] = [
        a for a in predicate["auditEvents"] if a["event"].get("partition", {}).get("key") != key
    ]
    statement["subject"] = [s for s in statement["subject"] if f"/{key}/" not in s["name"]]
    by_reason: dict[str, int] = {}
    for a in predicate["auditEvents"]:
        for reason, count in a["event"].get("counts", {}).get("by_reason", {}).items():
            by_reason[reason] = by_reason.get(reason, 0) + count
    predicate["countsByReason"] = dict(sorted(by_reason.items()))


def test_a_committed_partition_left_out_shows_against_the_intent(package: dict[str, Any]) -> None:
    statement = _statement(package["envelope"])
    intent = statement["predicate"]["auditEvents"][0]["event"]
    assert intent["event_type"] == "partition_commit_intent"
    dropped = intent["partitions"][-1]
    _drop_partition(statement, dropped["key"])
    status, document = _verify(package, _resigned(package, statement))
    assert status == 1 and document["problems"] == [
        f"partition {dropped['key']} version 1: named by the commit intent of seq 0, and no commit of it "
        "follows in the package"
    ]
    # Without the intent, the commits the package keeps follow no intent.
    statement["predicate"]["auditEvents"].pop(0)
    status, document = _verify(package, _resigned(package, statement))
    assert status == 1 and len(document["problems"]) == 2
    assert all("follows no intent in the package" in p for p in document["problems"])


def _promoted_package(work: Path, approvers: list[SigningKey]) -> dict[str, Any]:
    """The package of the production run of rollout r3 (`requiredApprovals` the number of `approvers`),
    approved by each of `approvers` (listed approvers) and promoted, exported with the operator's key."""
    import time

    from pcbo_dagster_tests.approver_keys import APPROVERS_YAML, key_file
    from pcbo_dagster_tests.test_rollout_cli import KEYS, QUICK_SOAK_CONFIG

    records = [
        {"id": f"s-{h}-{n}", "occurredAt": f"2024-01-01T{h:02d}:{n * 10:02d}:00Z", "jurisdiction": "US"}
        | {"consentGranted": n != 3}
        for h in range(4)
        for n in range(5)
    ]
    (work / "sessions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    required = f"{APPROVERS_YAML}\n      requiredApprovals: {len(approvers)}"
    (work / "datasets.yaml").write_text(QUICK_SOAK_CONFIG.replace(APPROVERS_YAML, required))
    key = new_signing_key("ops.example/operator")
    (work / "operator.key").write_text(key.text + "\n")
    (work / "operator.key").chmod(0o600)

    def pcbo(*args: str) -> Any:  # the command line in this process: no interpreter start-up a step
        run = run_pcbo_in_process(
            list(args),
            home=work / "home",
            cwd=work,
            env={"PCBO_SIGNING_KEY": str(work / "operator.key")},
        )
        assert run.status == 0, run.stderr
        return run

    config = ("--config", "datasets.yaml")
    window = ("--from", KEYS[0], "--to", KEYS[-1])
    pcbo("rollout", "start", *config, "--dataset", "sessions", *window, "--name", "r3", "--by", "ana")
    time.sleep(1.3)  # the soak window (0.02 minutes) ends
    pcbo("rollout", "soak", "r3", *config)
    for approver in approvers:
        key_file(work, approver)
        short = approver.name.rsplit("/", 1)[-1]
        pcbo("approve", "r3", "--key", f"{short}.key", "--reason", f"numbers reviewed by {short}", *config)
    pcbo("rollout", "promote", "r3", "--by", "dee", *config)
    envelope = pcbo("evidence", "export", "--run", "rollout-r3-production").document
    return {"work": work, "key": key, "vkey": key.verifier().text, "envelope": envelope}


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The package of the production run of rollout r3, approved by CY (a listed approver) and promoted,
    exported with the operator's key."""
    from pcbo_dagster_tests.approver_keys import CY

    return _promoted_package(tmp_path_factory.mktemp("promoted"), [CY])


def test_a_promotion_package_carries_the_approval_it_relied_on(promoted: dict[str, Any]) -> None:
    """The production run of a promoted rollout: its package holds the approval event its promotion
    names, and verifies; without that event (and its approvals entry) it does not."""
    from pcbo_dagster_tests.approver_keys import CY

    envelope = promoted["envelope"]
    status, document = _verify(promoted, envelope)
    assert status == 0 and document["valid"], document["problems"]
    assert document["approvals"] is None  # no --approver-key: the notes are carried, not checked
    predicate = _statement(envelope)["predicate"]
    assert [a["by"] for a in predicate["approvals"]] == [CY.name]
    statement = _statement(envelope)
    statement["predicate"]["auditEvents"] = [
        a for a in statement["predicate"]["auditEvents"] if a["event"]["event_type"] != "rollout_approved"
    ]
    statement["predicate"]["approvals"] = []
    status, document = _verify(promoted, _resigned(promoted, statement))
    assert status == 1
    assert document["problems"] == ["the package lacks an approval event the run's promotion relied on"]


def test_approver_keys_verify_the_approval_a_promotion_relied_on(promoted: dict[str, Any]) -> None:
    """`--approver-key`: the approval note the promotion relied on verifies under the approver's key, and
    the verdict names who signed it; under another approver's key only, the package is invalid."""
    from pcbo_dagster_tests.approver_keys import BO, CY

    approval = _statement(promoted["envelope"])["predicate"]["approvals"][0]
    status, document = _verify(promoted, promoted["envelope"], "--approver-key", CY.verifier().text)
    assert status == 0 and document["valid"], document["problems"]
    assert document["approvals"] == [
        {
            "eventHash": approval["eventHash"],
            "verified": True,
            "approver": CY.name,
            "approverKey": CY.verifier().text,
            "problem": None,
        }
    ]
    status, document = _verify(promoted, promoted["envelope"], "--approver-key", BO.verifier().text)
    assert status == 1 and not document["valid"]
    assert document["approvals"][0]["verified"] is False
    assert document["approvals"][0]["approver"] is None
    assert document["problems"] == [
        f"the approval {approval['eventHash']} the run's promotion relied on is not a signed approval of a "
        f"trusted --approver-key: {CY.name!r} is not a listed approver"
    ]


def _relogged(promoted: dict[str, Any], rewrite: Any) -> dict[str, Any]:
    """What an insider holding the operator's key makes of the promoted package: a log of its events,
    each as `rewrite(event_type, body)` makes it (`(event_type, body)`; None: left out), every event
    rehashed and relinked (a promotion's `approval_event_hash` and each of its `approval_event_hashes`
    that named an event of the package name that event's new hash), the claims rederived, checkpoint
    and envelope signed again (each event too, at its new place, as the insider holds the key)."""
    from pcbo_dagster.core.audit_chain import RESERVED_KEYS
    from pcbo_dagster.core.operator_signatures import OPERATOR_SIGNATURE, sign_event
    from pcbo_dagster.evidence.package import CLAIMS, claims_of

    statement = _statement(promoted["envelope"])
    events: list[dict] = []
    renamed: dict[str, str] = {}

    def new_hash(value: Any) -> Any:
        return renamed.get(value, value) if isinstance(value, str) else value

    for entry in statement["predicate"]["auditEvents"]:
        event = entry["event"]
        rewritten = rewrite(event["event_type"], {k: v for k, v in event.items() if k not in RESERVED_KEYS})
        if rewritten is None:
            continue
        kind, body = rewritten
        if "approval_event_hash" in body:
            body["approval_event_hash"] = new_hash(body["approval_event_hash"])
        if isinstance(body.get("approval_event_hashes"), list):
            body["approval_event_hashes"] = [new_hash(h) for h in body["approval_event_hashes"]]
        prev = events[-1]["chain"]["event_hash"] if events else None
        if body.pop(OPERATOR_SIGNATURE, None) is not None:
            chain_key = event["chain"]["chain_key"]
            body[OPERATOR_SIGNATURE] = sign_event(promoted["key"], chain_key, len(events), prev, kind, body)
        rebuilt = build_event(
            chain_key=event["chain"]["chain_key"],
            seq=len(events),
            prev_event_hash=prev,
            event_type=kind,
            timestamp=event["timestamp"],
            body=body,
        )
        renamed[event["chain"]["event_hash"]] = rebuilt["chain"]["event_hash"]
        events.append(rebuilt)
    run = statement["predicate"]["run"]
    claims = claims_of(events, run["runId"], run["dataset"], run["versionLabel"])
    statement["predicate"].update({name: claims[name] for name in CLAIMS})
    return _logged(promoted, statement, events)


def _with_approval_note(
    promoted: dict[str, Any],
    note: str,
    event_type: str = "rollout_approved",
    promotion: dict[str, Any] | None = None,
    **said: Any,
) -> dict[str, Any]:
    """The promoted package relogged by an insider (`_relogged`): the same log, but whose approval event
    carries `note` (the event otherwise as the chain had it, unless it is made of type `event_type` or
    its members `said` changed), the promotion naming that event (its members `promotion` changed)."""

    def rewrite(kind: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if kind == "rollout_approved":
            return event_type, {**body, **said, "signed_approval": note}
        if kind == "rollout_promoted":
            return kind, {**body, **(promotion or {})}
        return kind, body

    return _relogged(promoted, rewrite)


def _altered(note: str) -> str:
    return note.replace("numbers reviewed", "numbers reviewed twice")


def _of_another_rollout() -> str:
    from pcbo_dagster.core.signed_approvals import sign_approval
    from pcbo_dagster_tests.approver_keys import CY

    return sign_approval(CY, "r4", "approved", "sha256:" + "cd" * 32, "fine", "2026-12-06T00:00:00Z").render()


def _of_an_untrusted_key(note: str) -> str:
    from pcbo_dagster.core.signed_approvals import read_signed_approval, sign_approval
    from pcbo_dagster_tests.approver_keys import CY

    said = read_signed_approval(note, [CY.verifier()])
    impostor = new_signing_key(CY.name)  # the approver's name, another key
    return sign_approval(
        impostor, said.rollout, said.decision, said.decision_hash, said.reason, said.time
    ).render()


@pytest.mark.parametrize(
    ("forge", "problem"),
    [
        (_altered, "the signature of approvers.example/cy does not verify"),
        (lambda note: _of_another_rollout(), "the statement names rollout 'r4', its event 'r3'"),
        (_of_an_untrusted_key, "no signature from a trusted key"),
    ],
    ids=["altered", "another-rollout", "untrusted-key"],
)
def test_an_approval_note_the_approver_did_not_sign_for_this_event_is_refused(
    promoted: dict[str, Any], forge: Any, problem: str
) -> None:
    """An insider with the operator's key puts in the approval event the promotion relied on a note
    the approver's key did not sign as it stands (altered), one about another rollout, or one signed by
    another key under the approver's name: the log and envelope verify (the notes are carried), but
    not with `--approver-key`."""
    from pcbo_dagster_tests.approver_keys import CY

    note = _statement(promoted["envelope"])["predicate"]["approvals"][0]["signedApproval"]
    forged = _with_approval_note(promoted, forge(note))
    status, document = _verify(promoted, forged)
    assert status == 0 and document["valid"], document["problems"]
    status, document = _verify(promoted, forged, "--approver-key", CY.verifier().text)
    assert status == 1 and not document["valid"]
    assert document["problems"] == [
        f"the approval {document['approvals'][0]['eventHash']} the run's promotion relied on is not a "
        f"signed approval of a trusted --approver-key: {problem}"
    ]
    assert [a["verified"] for a in document["approvals"]] == [False]


def test_an_approval_event_of_another_rollout_or_a_rejection_opens_no_promotion(
    promoted: dict[str, Any],
) -> None:
    """An insider with the operator's key makes the promotion rely on an event whose note says what it
    says and verifies under the approver's key: a genuine approval of another rollout and decision hash
    (the approver's, event and all), or the approver's rejection of this one. Neither approved what was
    promoted: invalid with `--approver-key`."""
    from pcbo_dagster.core.signed_approvals import sign_approval
    from pcbo_dagster_tests.approver_keys import CY

    approval = _statement(promoted["envelope"])["predicate"]["approvals"][0]
    other_hash = "sha256:" + "cd" * 32
    elsewhere = sign_approval(CY, "r4", "approved", other_hash, "fine", "2026-12-06T00:00:00Z").render()
    subject = {**approval["rollout"], "name": "r4"}
    forged = _with_approval_note(promoted, elsewhere, rollout=subject, decision_hash=other_hash)
    status, document = _verify(promoted, forged, "--approver-key", CY.verifier().text)
    assert status == 1 and [a["verified"] for a in document["approvals"]] == [False]
    assert document["problems"] == [
        f"the approval {document['approvals'][0]['eventHash']} the run's promotion relied on approves "
        f"rollout 'r4' decision hash {other_hash}, not what the promotion relying on it promoted "
        f"(('r3', '{approval['decision_hash']}'))"
    ]
    rejection = sign_approval(
        CY, "r3", "rejected", approval["decision_hash"], "no", "2026-12-06T00:00:00Z"
    ).render()
    forged = _with_approval_note(promoted, rejection, "rollout_rejected", decision="rejected")
    status, document = _verify(promoted, forged, "--approver-key", CY.verifier().text)
    assert status == 1 and [a["verified"] for a in document["approvals"]] == [False]
    assert document["problems"] == [
        f"the approval {document['approvals'][0]['eventHash']} the run's promotion relied on is a "
        f"rejection signed by {CY.name}, not an approval"
    ]


def test_a_promotion_naming_no_rollout_is_a_finding_not_a_crash(promoted: dict[str, Any]) -> None:
    """A proven promotion whose rollout's name is a list (appended by an insider) is compared with what
    the approval it relied on approves, never hashed (TypeError: unhashable type)."""
    from pcbo_dagster_tests.approver_keys import CY

    note = _statement(promoted["envelope"])["predicate"]["approvals"][0]["signedApproval"]
    forged = _with_approval_note(promoted, note, promotion={"rollout": {"name": ["r3"]}})
    status, document = _verify(promoted, forged, "--approver-key", CY.verifier().text)
    assert status == 1 and [a["verified"] for a in document["approvals"]] == [False]
    hashed = (["r3"], _statement(promoted["envelope"])["predicate"]["approvals"][0]["decision_hash"])
    assert document["problems"][-1].endswith(f"not what the promotion relying on it promoted ({hashed!r})")


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (["approvers.example/cy+0000"], "--approver-key"),
        (["@CY", "@CY"], "listed already"),
        (["@CY", "@CY-other-name"], "listed already"),
        (["@OPERATOR"], "the operator's key"),
        (["@WITNESS"], "type 0x01"),
    ],
    ids=["malformed", "twice", "one-key-two-names", "operator", "cosigner-key"],
)
def test_a_bad_approver_key_is_invalid_input(
    promoted: dict[str, Any], given: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pcbo_dagster_tests.approver_keys import CY

    named = {
        "@CY": CY.verifier().text,
        "@CY-other-name": signing_key_from_seed("approvers.example/cy2", CY.seed).verifier().text,
        "@OPERATOR": promoted["vkey"],
        "@WITNESS": WITNESS_VKEY,
    }
    flags = [arg for text in given for arg in ("--approver-key", named.get(text, text))]
    status, document = _verify(promoted, promoted["envelope"], *flags)
    assert status == 2 and document is None
    err = capsys.readouterr().err
    assert "--approver-key" in err and says in err, err


@pytest.fixture(scope="module")
def promoted_by_two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The package of the production run of rollout r3 (`requiredApprovals: 2`), approved by CY and
    then BO and promoted, exported with the operator's key."""
    from pcbo_dagster_tests.approver_keys import BO, CY

    return _promoted_package(tmp_path_factory.mktemp("promoted-by-two"), [CY, BO])


def _trusting(*approvers: SigningKey) -> list[str]:
    """`--approver-key` for each of `approvers`."""
    return [arg for key in approvers for arg in ("--approver-key", key.verifier().text)]


def _events(envelope: dict[str, Any]) -> list[dict]:
    return [entry["event"] for entry in _statement(envelope)["predicate"]["auditEvents"]]


def _promotion(envelope: dict[str, Any]) -> dict:
    [promotion] = [e for e in _events(envelope) if e["event_type"] == "rollout_promoted"]
    return promotion


def _approval_hashes(envelope: dict[str, Any]) -> dict[str, str]:
    """The hash of each approval event the package carries, by its approver's name."""
    return {
        e["by"]: e["chain"]["event_hash"] for e in _events(envelope) if e["event_type"] == "rollout_approved"
    }


def _too_few(envelope: dict[str, Any], verified: int, required: int) -> str:
    promotion = _promotion(envelope)
    return (
        f"the promotion {promotion['chain']['event_hash']} of rollout 'r3' names approvals that verify under "
        f"{verified} distinct trusted --approver-key(s), not the {required} --min-approvals requires"
    )


def _approved_by(
    body: dict[str, Any], key: SigningKey, reason: str, decision_hash: str | None = None
) -> dict:
    """An approval event's `body` made to carry `key`'s own signed approval of its rollout (of
    `decision_hash`, the body's unless given), saying what its note says."""
    from pcbo_dagster.core.signed_approvals import sign_approval

    decision_hash = decision_hash or body["decision_hash"]
    note = sign_approval(
        key, body["rollout"]["name"], "approved", decision_hash, reason, "2026-12-06T00:00:00Z"
    ).render()
    return body | {
        "by": key.name,
        "approver_key": key.verifier().text,
        "decision_hash": decision_hash,
        "reason": reason,
        "signed_approval": note,
    }


def test_a_package_proves_every_approval_its_promotion_names(promoted_by_two: dict[str, Any]) -> None:
    """`requiredApprovals: 2`: the promotion names CY's and BO's approval events (chain order), the
    package carries both, and with both approvers' keys and `--min-approvals 2` it verifies; the verdict
    says, per promotion, how many distinct trusted approvers verified."""
    from pcbo_dagster_tests.approver_keys import BO, CY

    envelope = promoted_by_two["envelope"]
    promotion = _promotion(envelope)
    approvals = _approval_hashes(envelope)
    assert promotion["approval_event_hashes"] == [approvals[CY.name], approvals[BO.name]]
    assert promotion["approval_event_hash"] == approvals[BO.name]
    status, document = _verify(promoted_by_two, envelope, *_trusting(CY, BO), "--min-approvals", "2")
    assert status == 0 and document["valid"], document["problems"]
    assert [(a["approver"], a["verified"]) for a in document["approvals"]] == [
        (CY.name, True),
        (BO.name, True),
    ]
    assert document["promotions"] == [
        {
            "eventHash": promotion["chain"]["event_hash"],
            "rollout": "r3",
            "decisionHash": promotion["decision_hash"],
            "approvalsNamed": 2,
            "approvers": sorted([BO.name, CY.name]),
            "distinctApprovers": 2,
        }
    ]
    status, document = _verify(promoted_by_two, envelope)
    assert status == 0 and document["promotions"] is None  # no --approver-key: nothing counted


def test_an_approval_the_promotion_names_left_out_of_the_package_is_a_finding(
    promoted_by_two: dict[str, Any],
) -> None:
    """An insider re-signs the package without CY's approval event (and its approvals entry), which
    the promotion names: invalid, with or without approvers' keys."""
    from pcbo_dagster_tests.approver_keys import CY

    envelope = promoted_by_two["envelope"]
    left_out = _approval_hashes(envelope)[CY.name]
    statement = _statement(envelope)
    predicate = statement["predicate"]
    predicate["auditEvents"] = [
        a for a in predicate["auditEvents"] if a["event"]["chain"]["event_hash"] != left_out
    ]
    predicate["approvals"] = [a for a in predicate["approvals"] if a["eventHash"] != left_out]
    status, document = _verify(promoted_by_two, _resigned(promoted_by_two, statement))
    assert status == 1
    assert document["problems"] == ["the package lacks an approval event the run's promotion relied on"]


def _names_only_bo(kind: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """CY's approval left out of the log, the promotion's list altered to name BO's alone."""
    from pcbo_dagster_tests.approver_keys import CY

    if kind == "rollout_approved" and body["by"] == CY.name:
        return None
    if kind == "rollout_promoted":
        return kind, body | {"approval_event_hashes": [body["approval_event_hash"]]}
    return kind, body


def _names_bo_twice(kind: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """CY's approval left out of the log, the promotion naming BO's approval twice."""
    from pcbo_dagster_tests.approver_keys import CY

    if kind == "rollout_approved" and body["by"] == CY.name:
        return None
    if kind == "rollout_promoted":
        return kind, body | {"approval_event_hashes": [body["approval_event_hash"]] * 2}
    return kind, body


def _two_by_bo(kind: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """CY's approval event made to carry a second genuine approval by BO (another statement)."""
    from pcbo_dagster_tests.approver_keys import BO, CY

    if kind == "rollout_approved" and body["by"] == CY.name:
        return kind, _approved_by(body, BO, "looked again")
    return kind, body


@pytest.mark.parametrize(
    "rewrite", [_names_only_bo, _names_bo_twice, _two_by_bo], ids=["list-altered", "twice", "one-key-twice"]
)
def test_min_approvals_counts_distinct_trusted_approvers_not_named_events(
    promoted_by_two: dict[str, Any], rewrite: Any
) -> None:
    """An insider with the operator's key relogs the run so its promotion names BO's approval alone
    (CY's left out, the list altered), BO's twice, or two approvals both signed by BO: every approval
    still verifies (valid with the approvers' keys), but one approver is not two: invalid with
    `--min-approvals 2`, the problem naming the promotion."""
    from pcbo_dagster_tests.approver_keys import BO, CY

    forged = _relogged(promoted_by_two, rewrite)
    status, document = _verify(promoted_by_two, forged, *_trusting(CY, BO))
    assert status == 0 and document["valid"], document["problems"]
    assert all(a["verified"] for a in document["approvals"])
    assert [p["distinctApprovers"] for p in document["promotions"]] == [1]
    status, document = _verify(promoted_by_two, forged, *_trusting(CY, BO), "--min-approvals", "2")
    assert status == 1 and not document["valid"]
    assert document["problems"] == [_too_few(forged, 1, 2)]
    assert [(p["approvers"], p["distinctApprovers"]) for p in document["promotions"]] == [([BO.name], 1)]


def test_an_approval_of_another_decision_hash_counts_for_no_promotion(
    promoted_by_two: dict[str, Any],
) -> None:
    """An insider puts in CY's approval event a genuine approval by CY of rollout r3 but of another
    decision hash (its event saying so too): it verifies under CY's key but did not approve what was
    promoted, so it counts for nothing: invalid (and one approver short of `--min-approvals 2`)."""
    from pcbo_dagster_tests.approver_keys import BO, CY

    promoted_hash = _promotion(promoted_by_two["envelope"])["decision_hash"]
    other_hash = "sha256:" + "cd" * 32

    def elsewhere(kind: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if kind == "rollout_approved" and body["by"] == CY.name:
            return kind, _approved_by(body, CY, "fine", other_hash)
        return kind, body

    forged = _relogged(promoted_by_two, elsewhere)
    status, document = _verify(promoted_by_two, forged, *_trusting(CY, BO), "--min-approvals", "2")
    assert status == 1
    cy_approval = _approval_hashes(forged)[CY.name]
    assert document["problems"] == [
        f"the approval {cy_approval} the run's promotion relied on approves rollout 'r3' decision hash "
        f"{other_hash}, not what the promotion relying on it promoted (('r3', '{promoted_hash}'))",
        _too_few(forged, 1, 2),
    ]
    assert [p["approvers"] for p in document["promotions"]] == [[BO.name]]


def test_one_approvers_key_under_two_names_counts_once(promoted_by_two: dict[str, Any]) -> None:
    """BO's approval replaced by one signed with CY's key under another name: both notes verify when
    the verifier (`verify`, called directly: the command line refuses one key given twice) trusts that
    key under both names, but they are one key's: one approver, short of two."""
    from pcbo_dagster.core.signed_note import parse_verifier_key
    from pcbo_dagster.evidence.package import verify
    from pcbo_dagster_tests.approver_keys import BO, CY

    cy_again = signing_key_from_seed("approvers.example/cy2", CY.seed)

    def renamed_cy(kind: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if kind == "rollout_approved" and body["by"] == BO.name:
            return kind, _approved_by(body, cy_again, "me again")
        return kind, body

    forged = _relogged(promoted_by_two, renamed_cy)
    document = verify(
        forged,
        parse_verifier_key(promoted_by_two["vkey"]),
        approver_keys=[CY.verifier(), cy_again.verifier()],
        min_approvals=2,
    )
    assert [(a["approver"], a["verified"]) for a in document["approvals"]] == [
        (CY.name, True),
        (cy_again.name, True),
    ]
    assert document["valid"] is False and document["problems"] == [_too_few(forged, 1, 2)]
    assert [p["distinctApprovers"] for p in document["promotions"]] == [1]


def test_a_promotion_written_before_approval_event_hashes_counts_as_one_approval(
    promoted: dict[str, Any],
) -> None:
    """A chain written before promotions named every approval: its promotion names one
    (`approval_event_hash` only). Its package verifies, one approver: valid with `--min-approvals 1`,
    invalid with 2."""
    from pcbo_dagster_tests.approver_keys import BO, CY

    def as_before(kind: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return kind, {k: v for k, v in body.items() if k != "approval_event_hashes"}

    old = _relogged(promoted, as_before)
    assert "approval_event_hashes" not in _promotion(old)
    status, document = _verify(promoted, old, *_trusting(CY), "--min-approvals", "1")
    assert status == 0 and document["valid"], document["problems"]
    assert [(p["approvalsNamed"], p["distinctApprovers"]) for p in document["promotions"]] == [(1, 1)]
    status, document = _verify(promoted, old, *_trusting(CY, BO), "--min-approvals", "2")
    assert status == 1 and document["problems"] == [_too_few(old, 1, 2)]


def test_min_approvals_of_a_package_holding_no_promotion_is_a_finding(package: dict[str, Any]) -> None:
    """A run no promotion names (a plain run, or a production run whose promotion was left out of its
    package) shows no approval at all: invalid with `--min-approvals`, valid without."""
    from pcbo_dagster_tests.approver_keys import CY

    status, document = _verify(package, package["envelope"], *_trusting(CY))
    assert status == 0 and document["promotions"] == []
    status, document = _verify(package, package["envelope"], *_trusting(CY), "--min-approvals", "1")
    assert status == 1
    assert document["problems"] == [
        "the package holds no promotion of run ev1: nothing in it shows the 1 approver(s) --min-approvals "
        "requires"
    ]


@pytest.mark.parametrize(
    ("trusted", "minimum", "says"),
    [
        ([], "1", "requires --approver-key"),
        (["CY"], "0", "between 1 and the 1 --approver-key given"),
        (["CY"], "-1", "between 1 and the 1 --approver-key given"),
        (["CY", "BO"], "3", "between 1 and the 2 --approver-key given"),
    ],
    ids=["no-approver-key", "zero", "negative", "more-than-keys"],
)
def test_a_bad_min_approvals_is_invalid_input(
    promoted: dict[str, Any], trusted: list[str], minimum: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--min-approvals N` needs `--approver-key` and 1 <= N <= the keys given (N distinct approvers'
    keys must verify): exit 2 naming the flag, no verdict (not a number: `test_cli_bad_input_table`)."""
    from pcbo_dagster_tests import approver_keys

    keys = [getattr(approver_keys, name) for name in trusted]
    status, document = _verify(promoted, promoted["envelope"], *_trusting(*keys), "--min-approvals", minimum)
    assert status == 2 and document is None
    err = capsys.readouterr().err
    assert "--min-approvals" in err and says in err, err


def test_another_key_does_not_open_the_package(package: dict[str, Any]) -> None:
    path = package["work"] / "candidate.json"
    path.write_text(json.dumps(package["envelope"]))
    other = new_signing_key("ops.example/operator").verifier().text  # same name, other key
    status, document = offline(package["work"], "evidence", "verify", str(path), "--key", other)
    assert status == 1 and not document["valid"]


# -- an independent verifier: no pcbo code below this line ---------------------------------------------------


def _independent_vkey(vkey: str) -> tuple[str, bytes, Ed25519PublicKey]:
    name, key_id, material = vkey.split("+", 2)
    raw = base64.b64decode(material)
    assert raw[0] == 1 and hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4].hex() == key_id
    return name, bytes.fromhex(key_id), Ed25519PublicKey.from_public_bytes(raw[1:])


def _independent_checkpoint(note: str, vkey: str) -> tuple[int, bytes]:
    name, key_id, public = _independent_vkey(vkey)
    text, _, signatures = note.rpartition("\n\n")
    text += "\n"
    for line in signatures.splitlines():
        dash, signer, blob = line.split(" ")
        raw = base64.b64decode(blob)
        if dash == "\u2014" and signer == name and raw[:4] == key_id:
            public.verify(raw[4:], text.encode())  # raises InvalidSignature
            origin, size, root = text.splitlines()[:3]
            return int(size), base64.b64decode(root)
    raise AssertionError("no signature of the key")


def _independent_inclusion(leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2."""
    fn, sn, r = index, size - 1, hashlib.sha256(b"\x00" + leaf).digest()
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def test_an_independent_verifier_checks_the_envelope_the_checkpoint_and_a_proof(
    package: dict[str, Any],
) -> None:
    envelope = json.loads(package["path"].read_text())
    _, key_id, public = _independent_vkey(package["vkey"])
    payload = base64.b64decode(envelope["payload"])
    payload_type = envelope["payloadType"].encode()
    pae = b"DSSEv1 %d %b %d %b" % (len(payload_type), payload_type, len(payload), payload)
    (signature,) = envelope["signatures"]
    assert signature["keyid"] == f"ops.example/operator+{key_id.hex()}"
    public.verify(base64.b64decode(signature["sig"]), pae)
    statement = json.loads(payload)
    size, root = _independent_checkpoint(statement["predicate"]["checkpoint"], package["vkey"])
    for entry in statement["predicate"]["auditEvents"]:
        # pcbo's leaf is the event's RFC 8785 bytes; for these events (ASCII keys, integers, no floats;
        # the operator signature's note holds an em dash, written as UTF-8) sorted compact JSON is
        # exactly that.
        leaf = json.dumps(entry["event"], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        proof = [base64.b64decode(h) for h in entry["inclusionProof"]]
        assert _independent_inclusion(leaf, entry["leafIndex"], size, proof, root)
    for subject in statement["subject"]:
        data = (lake_dir(package["home"]) / subject["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == subject["digest"]["sha256"]


def test_a_rollback_of_one_of_the_runs_partitions_is_in_its_package(
    package: dict[str, Any], tmp_path: Path
) -> None:
    """The red-team finding: `pcbo rollback --partition K` of a partition the run committed wrote its
    events with no run id, so the run's package, exported again, hid the undo. Its events name the run
    whose version they undo: the package carries them, proven, and verifies."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(package["home"], home)
    key_file = package["work"] / "operator.key"
    first = sorted(p.name for p in (lake_dir(home) / "events" / "v1").iterdir())[0]
    status, _ = pcbo(
        home, "rollback", "--dataset", "events", "--partition", first, "--signing-key", str(key_file)
    )
    assert status == 0
    status, envelope = pcbo(home, "evidence", "export", "--run", "ev1", "--signing-key", str(key_file))
    assert status == 0
    events = [e["event"] for e in _statement(envelope)["predicate"]["auditEvents"]]
    undone = [e for e in events if e["event_type"] in ("partition_rollback_intent", "partition_rolled_back")]
    assert [e["event_type"] for e in undone] == ["partition_rollback_intent", "partition_rolled_back"]
    assert all(e["run_id"] == "ev1" for e in undone) and undone[1]["partition"]["key"] == first
    status, verified = _verify(package, envelope)
    assert status == 0 and verified["valid"] is True, verified
    # Its claims say so: the partition's version names the rollback that undid it, and with the lake
    # its removed data file is accounted for by that proven rollback, not reported missing.
    statement = _statement(envelope)
    claimed = {p["key"]: p["rolledBack"] for p in statement["predicate"]["partitions"]}
    assert claimed.pop(first) == undone[1]["chain"]["event_hash"]
    assert set(claimed.values()) == {None}
    status, verified = _verify(package, envelope, "--lake", str(lake_dir(home)))
    assert status == 0 and verified["valid"] is True, verified
    assert (verified["subjectsCheckedInLake"], verified["subjectsRolledBackFromLake"]) == (5, 1)
    # Attacks: a package whose claims hide the rollback, or that calls another partition rolled back
    # to excuse its missing file, is refused.
    for edit in (first, sorted(claimed)[0]):
        forged = _statement(envelope)
        for part in forged["predicate"]["partitions"]:
            if part["key"] == edit:
                part["rolledBack"] = None if edit == first else undone[1]["chain"]["event_hash"]
        status, verified = _verify(package, _resigned(package, forged), "--lake", str(lake_dir(home)))
        assert (
            status == 1
            and "the predicate's partitions is not what the run's proven events say" in (verified["problems"])
        ), verified
    # The rolled-back version's manifest stays in the lake: deleting it is found all the same.
    removed_manifest = lake_dir(home) / next(
        subject["name"]
        for subject in statement["subject"]
        if subject["name"].startswith(f"events/v1/{first}/_versions/")
    )
    kept_bytes = removed_manifest.read_bytes()
    removed_manifest.unlink()
    status, verified = _verify(package, envelope, "--lake", str(lake_dir(home)))
    assert status == 1 and any(
        p.endswith("_versions/v000001.json: missing from the lake") for p in verified["problems"]
    )
    removed_manifest.write_bytes(kept_bytes)
    # Without the rollback's events the removed file is missing (and the intent shows a rollback left out).
    forged = _statement(envelope)
    forged["predicate"]["auditEvents"] = [
        a for a in forged["predicate"]["auditEvents"] if a["event"] not in undone
    ]
    for part in forged["predicate"]["partitions"]:
        part["rolledBack"] = None
    status, verified = _verify(package, _resigned(package, forged), "--lake", str(lake_dir(home)))
    assert status == 1 and any(p.endswith(": missing from the lake") for p in verified["problems"]), verified


def test_export_signs_nothing_from_a_chain_whose_events_were_forged(
    package: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Red-team finding: `pcbo evidence export` read the run's claims from the audit backup as it
    lies, and signed them with the operator's key: a commit event edited in the middle of the backup
    (its record count changed, its hash left) became a signed claim. Export now reads a chain that
    verifies (`partition_checks.verified_chain`): it refuses (exit 1) and signs nothing."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(package["home"], home)
    backup = home / "pas" / "events" / "v1.jsonl"
    lines = backup.read_bytes().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if b'"partition_committed"' in line)
    assert at < len(lines) - 1
    event = json.loads(lines[at])
    event["record_count"] += 1000
    lines[at] = json.dumps(event).encode() + b"\n"
    backup.write_bytes(b"".join(lines))
    key_file = package["work"] / "operator.key"
    capsys.readouterr()
    status, envelope = pcbo(home, "evidence", "export", "--run", "ev1", "--signing-key", str(key_file))
    assert status == 1 and envelope is None, envelope
    said = capsys.readouterr().err  # one line, saying what was refused once
    assert said.startswith("pcbo evidence export: the evidence package of run ev1 refused: "), said
    assert "the audit chain events/v1 does not verify" in said and said.count("export") == 1, said


def _signed_log(events: list[dict], sign: Any) -> list[dict]:
    """`events` (a whole chain from seq 0) rebuilt, each event signed at its place as `sign(seq, event)`
    says: a signing key, or None for no signature."""
    from pcbo_dagster.core.audit_chain import RESERVED_KEYS
    from pcbo_dagster.core.operator_signatures import OPERATOR_SIGNATURE, sign_event

    rebuilt: list[dict] = []
    for seq, event in enumerate(events):
        body = {k: v for k, v in event.items() if k not in RESERVED_KEYS and k != OPERATOR_SIGNATURE}
        prev = rebuilt[-1]["chain"]["event_hash"] if rebuilt else None
        key = sign(seq, event)
        if key is not None:
            chain_key = event["chain"]["chain_key"]
            body[OPERATOR_SIGNATURE] = sign_event(key, chain_key, seq, prev, event["event_type"], body)
        rebuilt.append(
            build_event(
                chain_key=event["chain"]["chain_key"],
                seq=seq,
                prev_event_hash=prev,
                event_type=event["event_type"],
                timestamp=event["timestamp"],
                body=body,
            )
        )
    return rebuilt


@pytest.mark.parametrize("signed", ["by_the_operator", "last_stripped", "by_another_key", "none"])
def test_the_operators_event_signatures_are_checked_offline(package: dict[str, Any], signed: str) -> None:
    """Red-team finding: `evidence verify` never read the events' `operator_signature`: a package whose
    checkpoint the operator's key signed over events it did not sign (stripped of their signatures, as
    an unsigned event someone without the key appended, or signed by another key) verified. Now every
    signature an event carries must verify under --key at the event's place, and from the first one
    that does on every event must carry one; `--signed-events` asks it of every event."""
    from pcbo_dagster.core.operator_signatures import OPERATOR_SIGNATURE
    from pcbo_dagster.evidence.package import CLAIMS, claims_of

    statement = _statement(package["envelope"])
    events = [entry["event"] for entry in statement["predicate"]["auditEvents"]]
    assert [e["chain"]["seq"] for e in events] == list(range(len(events)))  # the whole chain
    assert all(OPERATOR_SIGNATURE in e for e in events)
    other = new_signing_key("ops.example/operator")  # the same name, another key
    sign = {
        "by_the_operator": lambda seq, e: package["key"],
        "last_stripped": lambda seq, e: package["key"] if seq < len(events) - 1 else None,
        "by_another_key": lambda seq, e: other,
        "none": lambda seq, e: None,
    }[signed]
    relogged = _signed_log(events, sign)
    run = statement["predicate"]["run"]
    claims = claims_of(relogged, run["runId"], run["dataset"], run["versionLabel"])
    statement["predicate"].update({name: claims[name] for name in CLAIMS})
    envelope = _logged(package, statement, relogged)
    status, document = _verify(package, envelope)
    if signed in ("by_the_operator", "none"):  # (none: a chain from before the key was set)
        assert status == 0 and document["valid"], document
        assert document["signedEvents"] == (len(events) if signed == "by_the_operator" else 0)
        status, document = _verify(package, envelope, "--signed-events")
        assert (status == 0) is (signed == "by_the_operator"), document
        if signed == "none":
            assert document["problems"][0] == "event seq 0 carries no signature of the operator's key"
        return
    assert status == 1 and not document["valid"], document
    last = len(events) - 1
    expected = {
        "last_stripped": f"event seq {last} carries no signature of the operator's key",
        "by_another_key": "event seq 0: its operator_signature does not verify under the operator's key",
    }[signed]
    assert any(p.startswith(expected) for p in document["problems"]), document["problems"]

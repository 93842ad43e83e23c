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
from pcbo_dagster.core.canonical import jcs
from pcbo_dagster.core.checkpoints import Checkpoint, parse_signed_checkpoint
from pcbo_dagster.core.signed_note import COSIGNATURE_V1, Note, cosign, new_signing_key, parse_note
from pcbo_dagster.evidence.envelope import sign_envelope
from pcbo_dagster_tests.cli_runner import lake_dir, load_generator, run_pcbo, write_request
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
    run = run_pcbo(
        ["evidence", "verify", "package.json", "--key", package["vkey"]],
        home=elsewhere / "home",
        cwd=elsewhere,
    )
    assert run.status == 0, run.stderr
    assert run.document["valid"] and run.document["subjects"] == 6  # 3 parquet files, 3 manifests
    assert run.document["auditEvents"] == 4  # the intent and three commits
    assert sorted(p.name for p in elsewhere.iterdir()) == ["package.json"]  # nothing created
    with_lake = run_pcbo(
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
    assert predicate["policies"]["requireConsent"] is True
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
        # pcbo's leaf is the event's RFC 8785 bytes; for these events (ASCII, integers, no floats)
        # sorted compact JSON is exactly that.
        leaf = json.dumps(entry["event"], sort_keys=True, separators=(",", ":")).encode()
        proof = [base64.b64decode(h) for h in entry["inclusionProof"]]
        assert _independent_inclusion(leaf, entry["leafIndex"], size, proof, root)
    for subject in statement["subject"]:
        data = (lake_dir(package["home"]) / subject["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == subject["digest"]["sha256"]

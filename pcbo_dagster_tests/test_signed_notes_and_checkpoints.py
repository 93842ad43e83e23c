"""C2SP signed-note, tlog-checkpoint and tlog-cosignature: published examples as facts, and our own
round trips. Sources of the facts (copied verbatim):

- c2sp.org/signed-note: the `example.com/foo` verifier key and its example note;
- golang.org/x/mod/sumdb/note (package doc and tests): the PeterNeumann key pair and note;
- transparency-dev/witness witness/witness_test.go: the `monkeys` key pair, two checkpoints of its
  log (sizes 5 and 8) and the consistency proof between them;
- transparency-dev/formats note/note_cosigv1_test.go: a type-0x04 cosigner vkey and a cosignature
  whose timestamp is 1727964367;
- c2sp.org/tlog-checkpoint and tlog-cosignature: the `behind-the-sofa` checkpoint (no public key
  published: it parses, and no key we hold verifies it) and its witness cosignature, whose
  timestamp is the `time 1679315147` line of the spec's example message.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from pcbo_dagster.core import checkpoints as cp
from pcbo_dagster.core import signed_note as sn
from pcbo_dagster.core.merkle import verify_consistency
from pcbo_dagster_tests.cli_runner import run_pcbo

EXAMPLE_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
EXAMPLE_NOTE = (
    "This is an example message.\n\n"
    "— example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"  # noqa: E501 - a published vector, verbatim
)

PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_TEXT = (
    "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"  # noqa: E501 - a published vector, verbatim
)
PETER_NOTE = (
    PETER_TEXT
    + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"  # noqa: E501 - a published vector, verbatim
)

MONKEYS_VKEY = "monkeys+db4d9f7e+AULaJMvTtDLHPUcUrjdDad9vDlh/PTfC2VV60JUtCfWT"
MONKEYS_SKEY = "PRIVATE+KEY+monkeys+db4d9f7e+ATWIAF3yVBG+Hv1rZFQoNt/BaURkLPtOFMAM2HrEeIr6"
BANANAS_VKEY = "bananas+cf639f13+AaPjhFnPCQnid/Ql32KWhmh+uk72FVRfK+2DLmO3BI3M"
MONKEYS_5 = (
    "monkeys\n5\n41smjBUiAU70EtKlT6lIOIYtRTYxYXsDB+XHfcvu/BE=\n\n"
    "— monkeys 202fftzGl3LVoqjXfwCFZZXs8I+5G22+Ek2K0AOyBuSJ/8/CZawNF+6fNlTKOCd622pbzJNkkJFWuw9DbicZCkEx9AY=\n"
)
MONKEYS_8 = (
    "monkeys\n8\nV8K9aklZ4EPB+RMOk1/8VsJUdFZR77GDtZUQq84vSbo=\n\n"
    "— monkeys 202ffoUEboiQYpHzICeaFmoy3RNviHTpAxYrq/eO4QQVQMvu9UebKBMX2MJC76NLthZaKsnKbCA8GxrjePZhvDCH7Ag=\n"
)
MONKEYS_PROOF_5_TO_8 = [
    bytes.fromhex("b9e1d62618f7fee8034e4c5010f727ab24d8e4705cb296c374bf2025a87a10d2"),
    bytes.fromhex("aac66cd7a79ce4012d80762fe8eec3a77f22d1ca4145c3f4cee022e7efcd599d"),
    bytes.fromhex("89d0f753f66a290c483b39cd5e9eafb12021293395fad3d4a2ad053cfbcfdc9e"),
    bytes.fromhex("29e40bb79c966f4c6fe96aff6f30acfce5f3e8d84c02215175d6e018a5dee833"),
]

COSIGNER_VKEY = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"
COSIGNATURE_1727964367 = (
    "ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOworDcFiEBYJXORmnFBOBA=="
)

SOFA_CHECKPOINT = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
    "— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"  # noqa: E501 - a published vector, verbatim
    "— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"  # noqa: E501 - a published vector, verbatim
)


# -- the published examples ------------------------------------------------------------------------------


def test_the_c2sp_example_note_verifies_with_its_published_key() -> None:
    key = sn.parse_verifier_key(EXAMPLE_VKEY)
    assert (key.name, key.key_id.hex(), key.signature_type) == ("example.com/foo", "530d903a", 1)
    assert key.text == EXAMPLE_VKEY
    note = sn.parse_note(EXAMPLE_NOTE)
    assert note.text == "This is an example message.\n"
    assert sn.verify_note(note, [key]) == [key]
    assert note.render() == EXAMPLE_NOTE
    with pytest.raises(sn.NoteError, match="does not verify"):
        sn.verify_note(sn.parse_note(EXAMPLE_NOTE.replace("example message", "example massage")), [key])


def test_the_go_note_example_is_reproduced_byte_for_byte_from_its_private_key() -> None:
    signer = sn.parse_signing_key(PETER_SKEY)
    assert signer.verifier().text == PETER_VKEY
    assert signer.text == PETER_SKEY
    assert sn.sign_note(PETER_TEXT, signer).render() == PETER_NOTE  # Ed25519 is deterministic
    assert sn.verify_note(sn.parse_note(PETER_NOTE), [sn.parse_verifier_key(PETER_VKEY)])


def test_the_witness_tests_checkpoints_parse_verify_and_are_consistent() -> None:
    monkeys = sn.parse_verifier_key(MONKEYS_VKEY)
    old, old_note = cp.parse_signed_checkpoint(MONKEYS_5)
    new, new_note = cp.parse_signed_checkpoint(MONKEYS_8)
    assert (old.origin, old.size, new.size) == ("monkeys", 5, 8)
    assert old.root.hex() == "e35b268c1522014ef412d2a54fa94838862d453631617b0307e5c77dcbeefc11"
    assert sn.verify_note(old_note, [monkeys]) and sn.verify_note(new_note, [monkeys])
    assert verify_consistency(5, 8, old.root, new.root, MONKEYS_PROOF_5_TO_8)
    assert not verify_consistency(5, 8, new.root, old.root, MONKEYS_PROOF_5_TO_8)
    # Our signer, given the test's private key, writes the same signed checkpoint.
    assert old.sign(sn.parse_signing_key(MONKEYS_SKEY)).render() == MONKEYS_5
    # A key of another log is unknown: its signature lines are ignored, so nothing verifies.
    with pytest.raises(sn.NoteError, match="no signature from a trusted key"):
        sn.verify_note(old_note, [sn.parse_verifier_key(BANANAS_VKEY)])


def test_the_spec_checkpoint_parses_and_its_cosignature_carries_the_spec_timestamp() -> None:
    checkpoint, note = cp.parse_signed_checkpoint(SOFA_CHECKPOINT)
    assert (checkpoint.origin, checkpoint.size) == ("example.com/behind-the-sofa", 20852163)
    assert base64.b64encode(checkpoint.root).decode() == "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
    log_sig, witness_sig = note.signatures
    assert (log_sig.name, witness_sig.name) == ("example.com/behind-the-sofa", "witness.example.com/w1")
    assert sn.cosignature_timestamp(witness_sig) == 1679315147
    with pytest.raises(sn.NoteError):  # its key was never published: no key of ours verifies it
        sn.verify_note(note, [sn.parse_verifier_key(EXAMPLE_VKEY)])


def test_the_formats_cosigner_key_and_cosignature_timestamp() -> None:
    key = sn.parse_verifier_key(COSIGNER_VKEY)
    assert (key.signature_type, key.key_id.hex()) == (sn.COSIGNATURE_V1, "da77ade7")
    signature = sn.parse_signature_line(f"— remora.n621.de {COSIGNATURE_1727964367}")
    assert sn.cosignature_timestamp(signature) == 1727964367


@pytest.mark.parametrize(
    "vkey",
    [
        "example.com/foo+530d903b+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",  # wrong key id
        "example.com/foo+530d903a+AwkyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",  # unknown type
        "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U",  # short key
        "example.com/foo+530d903a",
        "exa mple+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
        "example.com/foo+530D903A+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
    ],
)
def test_malformed_verifier_keys_are_refused(vkey: str) -> None:
    with pytest.raises(sn.NoteError):
        sn.parse_verifier_key(vkey)


@pytest.mark.parametrize(
    "note",
    [
        "no signatures\n",
        "text\n\n",
        "text\n\n— name notbase64!\n",
        "text\n\n- name AAAAAAAA\n",
        "text\x07\n\n— example.com/foo AAAAAAAA\n",
        "text\n\n— example.com/foo AAAAAAAA",
    ],
)
def test_malformed_notes_are_refused(note: str) -> None:
    with pytest.raises(sn.NoteError):
        sn.parse_note(note)


@pytest.mark.parametrize(
    "text",
    [
        "origin\n05\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",  # leading zero
        "origin\n5\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I\n",  # not padded base64
        "origin\n5\n\n",
        "origin\n0\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",  # size 0 but not the empty root
        "origin\n5\n",
    ],
)
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(cp.CheckpointError):
        cp.parse_checkpoint_text(text)


# -- round trips of our own ------------------------------------------------------------------------------


def test_own_keys_sign_and_cosign_and_round_trip() -> None:
    log = sn.new_signing_key("pcbo.example/operator")
    witness = sn.new_signing_key("witness.example/w1")
    again = sn.parse_signing_key(log.text)
    assert again.seed == log.seed and again.verifier() == log.verifier()
    checkpoint = cp.Checkpoint("pcbo/events/v1", 3, bytes(range(32)))
    note = checkpoint.sign(log)
    parsed, parsed_note = cp.parse_signed_checkpoint(note.render())
    assert parsed == checkpoint and parsed_note == note
    assert sn.verify_note(parsed_note, [log.verifier()]) == [log.verifier()]
    cosigned = note.with_signatures([sn.cosign(note.text, witness, 1700000000)])
    reparsed = sn.parse_note(cosigned.render())
    assert sn.verify_cosignatures(reparsed, [witness.verifier(sn.COSIGNATURE_V1)]) == {
        witness.verifier(sn.COSIGNATURE_V1).text: 1700000000
    }
    # The cosignature key id is the 0x04 one: a 0x01 key of the witness does not match it.
    assert sn.verify_cosignatures(reparsed, [witness.verifier()]) == {}
    # A cosignature moved to another checkpoint fails for its known key.
    other = cp.Checkpoint("pcbo/events/v1", 4, bytes(32)).sign(log).with_signatures([reparsed.signatures[1]])
    with pytest.raises(sn.NoteError, match="cosignature of witness"):
        sn.verify_cosignatures(other, [witness.verifier(sn.COSIGNATURE_V1)])


def test_add_checkpoint_request_round_trip() -> None:
    old, _ = cp.parse_signed_checkpoint(MONKEYS_5)
    body = cp.add_checkpoint_body(old.size, MONKEYS_PROOF_5_TO_8, MONKEYS_8)
    request = cp.parse_add_checkpoint_body(body)
    assert (request.old_size, request.proof, request.checkpoint.size) == (5, MONKEYS_PROOF_5_TO_8, 8)
    assert body.decode().startswith("old 5\n" + base64.b64encode(MONKEYS_PROOF_5_TO_8[0]).decode() + "\n")
    with pytest.raises(cp.CheckpointError):
        cp.parse_add_checkpoint_body(b"old 05\n\n" + MONKEYS_8.encode())


# -- key files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["keys", "show", "--key", "{key}"], "--key"),
        (["evidence", "verify", "{package}", "--key", "{key}"], "--key"),
        (["log", "verify-proof", "--proof", "{package}", "--key", "{key}"], "--key"),
        (["verify", "--signing-key", "{key}"], "--signing-key"),
    ],
)
def test_a_key_file_that_is_not_a_regular_file_is_invalid_input(
    tmp_path: Path, kind: str, args: list[str], field: str
) -> None:
    """A key path naming a FIFO (whose read waits for a writer for ever) or /dev/zero (which never
    ends): the key was read whole before its type was looked at, so `pcbo` hung, or read until it
    ran out of memory. Now: exit 2 naming the flag, at once."""
    if kind == "fifo":
        key = tmp_path / "operator.key"
        os.mkfifo(key, 0o600)
    else:
        key = Path("/dev/zero")
    package = tmp_path / "package.json"
    package.write_text("{}")
    home = tmp_path / "home"
    argv = [a.format(key=key, package=package) for a in args]
    run = run_pcbo(argv, home=home, timeout=60)
    assert run.status == 2, (run.status, run.stderr)
    assert field in run.stderr and "not a regular file" in run.stderr, run.stderr
    assert not home.exists()


@pytest.mark.parametrize(
    ("args", "env", "field"),
    [
        (["keys", "show", "--key", "{key}"], {}, "--key"),
        (["verify", "--signing-key", "{key}"], {}, "--signing-key"),
        (["verify"], {"PCBO_SIGNING_KEY": "{key}"}, "PCBO_SIGNING_KEY"),
        (["verify"], {"PCBO_SIGNING_KEY": "{key} "}, "PCBO_SIGNING_KEY"),  # pasted with a space
        (["witness", "serve", "--key", "{key}", "--db", "w.db", "--log-key", "{vkey}"], {}, "--key"),
    ],
)
def test_a_private_key_given_instead_of_its_file_is_never_shown(
    tmp_path: Path, args: list[str], env: dict[str, str], field: str
) -> None:
    """`export PCBO_SIGNING_KEY="$(cat operator.key)"`, or the key pasted as --key: the error named
    the path it could not read, and that "path" was the private key (`cannot read the signing key
    file PRIVATE+KEY+<name>+<id>+<the seed>`), on stderr and in any log of it. Now the key text is
    redacted from every message."""
    key = sn.new_signing_key("ops.example/operator")
    material = key.text.split("+", 4)[4]  # (base64: it may hold "+" itself)
    values = {"key": key.text, "vkey": key.verifier().text}
    home = tmp_path / "home"
    run = run_pcbo(
        [a.format(**values) for a in args],
        home=home,
        env={k: v.format(**values) for k, v in env.items()},
        cwd=tmp_path,
        timeout=60,
    )
    assert run.status == 2 and field in run.stderr, run.stderr
    assert material not in run.stderr and key.seed.hex() not in run.stderr, run.stderr
    assert not home.exists()

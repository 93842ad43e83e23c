"""Signed, witnessed checkpoints of each audit chain's transparency log, and checking a chain
against a checkpoint someone holds.

`publish(env, chain_key)` runs after every command that appended events (execute, rollback, repair,
approvals, promotion): it delivers the chain's pending events to the audit endpoint (as before),
and when a signing key is configured (`PCBO_SIGNING_KEY` / `--signing-key`) and the log grew since
its latest checkpoint, it signs a checkpoint of the whole log (C2SP tlog-checkpoint, origin
`pcbo/<dataset>/<versionLabel>`), stores it in the catalog, writes it to the lake
(`<dataset>/<versionLabel>/_checkpoints/<size>.checkpoint`), asks every configured witness for a
cosignature (c2sp.org/tlog-witness) and delivers it to the audit endpoint. A witness that is down or
refuses never fails the command: the next `publish` (any later run, or `pcbo log publish`) asks it
again, with the newest checkpoint. With that key every event pcbo appends is signed at its place
(`core/operator_signatures.py`), and no checkpoint is signed over an event it should have signed and
did not (`refuse_unsigned_events`): someone who can write the stores but holds no key can append an
event, but no checkpoint vouches for it, every run refuses the chain (`check_stored_logs`'
`event_signature_invalid`, one of the `OTHER_HISTORY` findings) and `verify` reports it.

`check_against_checkpoint` is what `pcbo verify --trusted-checkpoint FILE --key VKEY` adds: the
held checkpoint must verify under the operator's key, the audit backup must still hold at least
its size of events, and the tree of the first `size` events rebuilt from the backup alone must have
its root; the stored log must also prove (RFC 6962 consistency proof) that the current log extends
it. A rewritten or truncated chain fails that even when the backup and the catalog were rewritten
together, every hash recomputed: only the operator's key could sign a checkpoint of the new history,
and a witness refuses one inconsistent with what it cosigned.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from pcbo_dagster.audit.backup import AuditBackupCorrupt
from pcbo_dagster.core import merkle
from pcbo_dagster.core.audit_chain import split_chain_key
from pcbo_dagster.core.canonical import jcs, prefixed, sha256_hex
from pcbo_dagster.core.checkpoints import (
    DEFAULT_ORIGIN_PREFIX,
    Checkpoint,
    CheckpointError,
    chain_of_origin,
    origin_for,
    parse_signed_checkpoint,
)
from pcbo_dagster.core.errors import IntegrityError, InvalidInput
from pcbo_dagster.core.operator_signatures import (
    OPERATOR_SIGNATURE,
    checkpoint_delivery_statement,
    sign_statement,
    signs_statement,
    unsigned_events,
    verified_statement,
    writer_refusal,
)
from pcbo_dagster.core.rollout_lifecycle import SELF_CHECKED_EVENTS
from pcbo_dagster.core.signed_note import (
    COSIGNATURE_V1,
    Note,
    NoteError,
    SigningKey,
    VerifierKey,
    b64,
    b64decode_strict,
    parse_note,
    parse_signature_line,
    parse_signing_key,
    parse_verifier_key,
    verify_cosignatures,
    verify_note,
)
from pcbo_dagster.core.transparency_log import event_leaf, event_leaf_hash
from pcbo_dagster.io.http_delivery import DeliveryFailed
from pcbo_dagster.io.redaction import scrub_text
from pcbo_dagster.io.regular_files import NotRegularFile, open_regular
from pcbo_dagster.lake import layout
from pcbo_dagster.witness.client import Witness, WitnessRefused, parse_witness, request_cosignature

if TYPE_CHECKING:
    from pcbo_dagster.catalog import CatalogStore
    from pcbo_dagster.engine.settings import Settings

logger = logging.getLogger(__name__)


# -- keys and witnesses from the settings ---------------------------------------------------------------


#: A key file holds one line of about a hundred characters; one larger than this is no key file.
MAX_KEY_FILE_BYTES = 4096


def read_key_file(path: Path, field: str, what: str = "key file") -> tuple[str, int]:
    """The text and mode of a key file; `InvalidInput` naming `field` unless it is a regular file
    (looked at before reading: a FIFO would block the read for ever, /dev/zero never end it) of UTF-8
    text no larger than `MAX_KEY_FILE_BYTES`. The message never holds the file's bytes, nor a private
    key given instead of its path (`scrub_text`)."""
    shown = scrub_text(str(path))
    try:
        with open_regular(str(path)) as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except NotRegularFile:
        raise InvalidInput(field, f"the {what} {shown} is not a regular file") from None
    except OSError as exc:
        raise InvalidInput(
            field, f"cannot read the {what} {shown}: {scrub_text(str(exc.strerror or exc))}"
        ) from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise InvalidInput(field, f"the {what} {shown} is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8"), mode
    except UnicodeDecodeError:
        raise InvalidInput(field, f"the {what} {shown} is not UTF-8 text") from None


def load_signing_key(path: Path, field: str = "PCBO_SIGNING_KEY") -> SigningKey:
    """The key in a signing key file; `InvalidInput` naming `field` when it cannot be read, is not a
    key, or can be read by others than its owner (mode 0600 expected: `pcbo keys generate` writes it
    so). The message never holds key material."""
    text, mode = read_key_file(path, field, "signing key file")
    shown = scrub_text(str(path))
    if mode & 0o077:
        raise InvalidInput(
            field, f"{shown} can be read by others (mode {stat.S_IMODE(mode):04o}): chmod 600 it"
        )
    try:
        return parse_signing_key(text)
    except NoteError as exc:
        raise InvalidInput(field, f"{shown}: {exc}") from None


def signing_key_of(settings: Settings) -> SigningKey | None:
    """The operator's signing key `settings` name, loaded (`load_signing_key`, an error naming its flag
    or variable); None when they name none."""
    if settings.signing_key is None:
        return None
    return load_signing_key(settings.signing_key, settings.signing_key_field)


def operator_verifier_of(settings: Settings) -> VerifierKey | None:
    """The verifier key of the operator's signing key `settings` name (None: no key), for a reader
    that opens no environment (a dry-run); `Environment.operator_verifier` otherwise."""
    key = signing_key_of(settings)
    return None if key is None else key.verifier()


def parse_key_argument(text: str, field: str) -> VerifierKey:
    """A verifier key given on the command line: the vkey itself, or a file holding it."""
    if not text.strip():  # not Path(''), the current directory
        raise InvalidInput(field, "is empty: give a verifier key, or a file holding one")
    candidate = text
    if "+" not in text or os.path.exists(text):
        candidate = read_key_file(Path(text), field, "verifier key file")[0].strip()
    try:
        return parse_verifier_key(candidate)
    except NoteError as exc:
        raise InvalidInput(field, str(exc)) from None


def witness_requirement(
    texts: list[str] | None, minimum: int | None, operator: VerifierKey
) -> tuple[list[VerifierKey], int]:
    """`--witness-key VKEY ...` and `--min-witnesses N`: the witnesses' cosigner keys and N (0 when not
    given); `InvalidInput` unless each key is a cosigner key (type 0x04) given once (one witness's key
    under two names would count as two witnesses) and not the `operator`'s key (`--key`, under any
    name: the operator would witness its own checkpoints), and N is between 0 and the number of keys."""
    keys = [parse_key_argument(text, "--witness-key") for text in texts or []]
    _check_witness_keys(keys, "--witness-key", operator.public_key, "the operator's key (--key)")
    required = minimum or 0
    if required < 0 or required > len(keys):
        raise InvalidInput("--min-witnesses", f"must be between 0 and the {len(keys)} --witness-key given")
    return keys, required


def _check_witness_keys(
    keys: list[VerifierKey], field: str, operator_key: bytes | None, operator_is: str
) -> None:
    """`InvalidInput` naming `field` unless each witness key is a cosigner key (type 0x04) given once
    (one witness's key under two names, or at two URLs, would count as two witnesses) and none is the
    operator's public key `operator_key` (under any name: the operator would witness the checkpoints it
    signs itself; `operator_is` says which key that is). The rules of `--witness-key` (what an auditor
    trusts) and of `PCBO_WITNESSES` (whom a run asks)."""
    for index, key in enumerate(keys):
        if key.signature_type != COSIGNATURE_V1:
            raise InvalidInput(field, f"{key.name}: not a cosigner (type 0x04) verifier key")
        if operator_key is not None and key.public_key == operator_key:
            raise InvalidInput(field, f"{key.name}: {operator_is} witnesses nothing it signed itself")
        if any(other.public_key == key.public_key for other in keys[:index]):
            raise InvalidInput(field, f"{key.name}: its key is given already (under this name or another)")


def witnesses_of(
    entries: tuple[str, ...], field: str = "PCBO_WITNESSES", operator: SigningKey | None = None
) -> list[Witness]:
    """The witnesses to ask for cosignatures, each `<cosigner vkey> <URL>`, held to `_check_witness_keys`
    (`operator`: the run's signing key)."""
    witnesses = [parse_witness(entry, field) for entry in entries]
    _check_witness_keys(
        [w.key for w in witnesses],
        field,
        None if operator is None else operator.public_key,
        "the operator's signing key",
    )
    return witnesses


# -- publishing ------------------------------------------------------------------------------------------


def checkpoint_row_problem(row: dict[str, Any]) -> str | None:
    """Why a catalog checkpoint row is not the checkpoint its note is (None: the note parses, and the
    row's size, origin and root are the note's). Anyone who can write the catalog can insert a row;
    pcbo decides from rows that agree with their notes only, and `verify` reports the others."""
    try:
        checkpoint, _ = parse_signed_checkpoint(row["note"])
    except NoteError as exc:
        return f"its note is not a signed checkpoint: {exc}"
    said = (row["tree_size"], row["origin"], row["root_hash"])
    if said != (checkpoint.size, checkpoint.origin, checkpoint.root.hex()):
        return (
            f"the row says size {row['tree_size']} of {row['origin']}; its note is the checkpoint of "
            f"size {checkpoint.size} of {checkpoint.origin} (or of another root)"
        )
    return None


def cosignature_problem(note_text: str, cosignature: dict[str, Any]) -> str | None:
    """Why a catalog cosignature row is not a cosignature v1, by the witness key it names, of the
    checkpoint whose note text is `note_text` (None: it verifies)."""
    try:
        key = parse_verifier_key(cosignature["witness_key"])
        line = parse_signature_line(cosignature["signature_line"])
        found = verify_cosignatures(Note(note_text, (line,)), [key])
    except NoteError as exc:
        return f"the cosignature of {cosignature['witness_key']}: {exc}"
    if key.text not in found:
        return f"the line is no cosignature by {key.name} (type 0x04 key {key.key_id.hex()})"
    return None


def stored_checkpoints(catalog: CatalogStore, chain_key: str) -> list[dict[str, Any]]:
    """The catalog's checkpoint rows of the chain that agree with their notes (`checkpoint_row_problem`)
    and are of no more events than the stored log holds, by size, each with only the `cosignatures`
    that verify (`cosignature_problem`)."""
    size = catalog.log_size(chain_key)
    rows = catalog.checkpoints(chain_key)
    return [_with_valid_cosignatures(row) for row in rows if _usable(row, size)]


def latest_stored_checkpoint(catalog: CatalogStore, chain_key: str) -> dict[str, Any] | None:
    """The newest of `stored_checkpoints` (None when there is none), found from the newest row down:
    the older rows' notes and cosignatures are not checked."""
    size = catalog.log_size(chain_key)
    for row in reversed(catalog.checkpoints(chain_key)):
        if _usable(row, size):
            return _with_valid_cosignatures(row)
    return None


def _usable(row: dict[str, Any], log_size: int) -> bool:
    return row["tree_size"] <= log_size and checkpoint_row_problem(row) is None


def _with_valid_cosignatures(row: dict[str, Any]) -> dict[str, Any]:
    text = parse_note(row["note"]).text
    return {**row, "cosignatures": [c for c in row["cosignatures"] if cosignature_problem(text, c) is None]}


def full_note(row: dict[str, Any]) -> Note:
    """A stored checkpoint (a row of `stored_checkpoints`) with its stored cosignatures."""
    note = parse_note(row["note"])
    return note.with_signatures([parse_signature_line(c["signature_line"]) for c in row["cosignatures"]])


def _witnessed_size(rows: list[dict[str, Any]], size: int, witness: Witness) -> int:
    """The largest checkpoint size, up to `size`, of `rows` (`stored_checkpoints`) that `witness`
    cosigned, as far as the catalog knows."""
    sizes = [
        row["tree_size"]
        for row in rows
        if row["tree_size"] <= size and any(c["witness_key"] == witness.key.text for c in row["cosignatures"])
    ]
    return max(sizes, default=0)


def checkpoint_places(env: Any, dataset: str, version_label: str) -> list[str]:
    """Where `publish` writes in the lake for the dataset version: its checkpoints' directory when a
    signing key is set, else nothing (a command's check before it writes anything,
    `LakeStorage.refuse_links`)."""
    return [layout.checkpoint_dir(dataset, version_label)] if env.signing_key is not None else []


class CheckpointNotSigned(IntegrityError, ValueError):
    """`publish` signs no checkpoint of a chain its stored log or its events do not vouch for (the
    command's own work stands; exit 1)."""


def publish(env: Any, chain_key: str) -> dict[str, Any]:
    """Deliver pending events; sign, store, write, witness and deliver a checkpoint (module doc)."""
    delivery = env.audit.deliver_pending(chain_key)
    size = env.catalog.ensure_tree(chain_key)
    report: dict[str, Any] = {
        "chainKey": chain_key,
        "treeSize": size,
        "checkpoint": None,
        "auditDelivery": delivery.to_dict() if delivery is not None else None,
    }
    key: SigningKey | None = env.signing_key
    if key is None or size == 0:
        return report
    with env.catalog.log_reader(chain_key) as reader:
        root = reader.root(size)
    # (a row at the log's size with another root is none pcbo signed: `verify` reports it)
    rows = stored_checkpoints(env.catalog, chain_key)
    if not rows or rows[-1]["tree_size"] < size:
        refuse_unsigned_events(env, chain_key, rows, size, key.verifier())
        checkpoint = Checkpoint(origin_for(chain_key, env.settings.checkpoint_origin_prefix), size, root)
        note = checkpoint.sign(key)
        env.catalog.record_checkpoint(
            chain_key, size, root, checkpoint.origin, key.verifier().text, note.render()
        )
        rows = stored_checkpoints(env.catalog, chain_key)
    latest = rows[-1] if rows else None
    if latest is None or latest["tree_size"] != size or latest["root_hash"] != root.hex():
        raise CheckpointNotSigned(
            f"{chain_key}: the catalog holds a checkpoint row of size {size} that is not the log's "
            "(pcbo verify reports it): no checkpoint signed"
        )
    checkpoint, _ = parse_signed_checkpoint(latest["note"])
    witnessed, errors = [], []
    for witness in env.witnesses:
        if any(c["witness_key"] == witness.key.text for c in latest["cosignatures"]):
            witnessed.append(witness.key.name)
            continue
        try:
            with env.catalog.log_reader(chain_key) as reader:
                signature, timestamp = request_cosignature(
                    witness,
                    checkpoint,
                    parse_note(latest["note"]),
                    _witnessed_size(rows, checkpoint.size, witness),
                    lambda old: reader.consistency_proof(old, checkpoint.size),
                )
        except WitnessRefused as exc:
            logger.warning("witness: %s (the checkpoint is witnessed later)", exc)
            errors.append(str(exc))
            continue
        env.catalog.record_cosignature(
            chain_key, checkpoint.size, witness.key.text, signature.line.rstrip("\n"), timestamp
        )
        witnessed.append(witness.key.name)
    latest = next(r for r in stored_checkpoints(env.catalog, chain_key) if r["tree_size"] == size)
    stored = {c["witness_key"] for c in latest["cosignatures"]}
    for witness in env.witnesses:
        if witness.key.name in witnessed and witness.key.text not in stored:
            witnessed.remove(witness.key.name)
            errors.append(
                f"{witness.label}: its cosignature was not stored: the catalog holds another row of it "
                f"for size {size} (pcbo verify reports it)"
            )
    text = full_note(latest).render()
    dataset, version_label = split_chain_key(chain_key)
    rel = layout.checkpoint_file(dataset, version_label, checkpoint.size)
    if env.lake.read_if_exists(rel) != text.encode("utf-8"):
        env.lake.write_atomic(rel, text.encode("utf-8"), durable=True)
    report["checkpoint"] = {
        "origin": checkpoint.origin,
        "treeSize": checkpoint.size,
        "rootHash": b64(checkpoint.root),
        "lakeUri": env.lake.uri(rel),
        "witnessedBy": witnessed,
        "witnessErrors": errors,
        "delivered": _deliver_checkpoint(env, chain_key, checkpoint.size, text),
    }
    return report


def refuse_unsigned_events(
    env: Any, chain_key: str, rows: list[dict[str, Any]], size: int, verifier: VerifierKey
) -> None:
    """Before the operator's key signs a checkpoint of the first `size` events: `CheckpointNotSigned`
    when one of them should carry that key's signature and does not
    (`core/operator_signatures.unsigned_events`), so no checkpoint vouches for an event someone
    without the key appended, or when no checkpoint of the key covers a chain another key signs
    (`writer_refusal`: a key rotated on it). Reads the catalog's copies of the events after the
    newest checkpoint (`rows`) the key signed and the stored log still has the root of (all of them
    when there is none), each held to its leaf in the stored log the checkpoint is signed over."""
    with env.catalog.log_reader(chain_key) as reader:
        vouched = 0
        for row in reversed(rows):
            try:
                checkpoint, note = parse_signed_checkpoint(row["note"])
                verify_note(note, [verifier])
            except NoteError:
                continue
            if checkpoint.size <= size and checkpoint.root == reader.root(checkpoint.size):
                vouched = checkpoint.size
                break
        events = env.catalog.audit_events(chain_key, vouched)[: size - vouched]
        if len(events) != size - vouched:
            raise CheckpointNotSigned(
                f"{chain_key}: the catalog holds {vouched + len(events)} events of a log of {size} (pcbo "
                "verify reports it): no checkpoint signed"
            )
        for seq, event in enumerate(events, start=vouched):
            if reader.leaf_hash(seq) != event_leaf_hash(event):
                raise CheckpointNotSigned(
                    f"{chain_key}: the catalog's copy of event {seq} is not the one its stored log holds "
                    "(pcbo verify reports it): no checkpoint signed"
                )
    # No checkpoint of this key vouches for the chain: the events of another key (one rotated) would
    # have this key's checkpoint over them, which `verify` with the chain's key reports for good
    refusal = None if vouched else writer_refusal(events, verifier)
    if refusal is not None:
        raise CheckpointNotSigned(f"{chain_key}: {refusal}: no checkpoint signed")
    unsigned = unsigned_events(events, verifier, vouched > 0, SELF_CHECKED_EVENTS)
    if unsigned:
        finding = _unsigned_finding(chain_key, unsigned[0])
        raise CheckpointNotSigned(
            f"{finding['where']}: {finding['detail']} (pcbo verify reports it): no checkpoint signed"
        )


def _deliver_checkpoint(env: Any, chain_key: str, size: int, text: str) -> bool | None:
    """POST the checkpoint (JSON `{type, chain_key, tree_size, checkpoint}`) to the audit endpoint
    once per distinct text; None without an endpoint, False when it failed (sent again next time).
    What was delivered is recorded in the audit backup as a note the operator's key signs over the
    document's digest (`checkpoint_delivery_statement`): someone who can write the backup cannot mark
    a checkpoint delivered that was not (before 2026-12-07 the marker held the document itself, which
    anyone could copy from the lake)."""
    delivery = env.audit.delivery
    if delivery is None:
        return None
    backup = env.audit.backup
    body = jcs({"type": "pcbo.checkpoint/1", "chain_key": chain_key, "tree_size": size, "checkpoint": text})
    statement = checkpoint_delivery_statement(chain_key, prefixed(sha256_hex(body)))
    try:
        held = backup.read_checkpoint_marker(chain_key)
        if held is not None and signs_statement(
            held.decode("utf-8", "replace"), statement, env.signing_key.verifier()
        ):
            return True
        delivery.post(body, f"checkpoint {size}")
        backup.write_checkpoint_marker(chain_key, sign_statement(env.signing_key, statement).encode("utf-8"))
    except (DeliveryFailed, OSError, AuditBackupCorrupt) as exc:  # (a marker that is no regular file)
        logger.warning("checkpoint delivery: %s (sent again with the next run)", exc)
        return False
    return True


# -- checking a chain against a held checkpoint ------------------------------------------------------------


def read_trusted_checkpoint(data: bytes, key: VerifierKey, field: str) -> tuple[Checkpoint, Note]:
    """A checkpoint a verifier holds, verified under the operator's `key`; `InvalidInput` otherwise."""
    try:
        checkpoint, note = parse_signed_checkpoint(data)
        verify_note(note, [key])
    except (CheckpointError, NoteError) as exc:
        raise InvalidInput(field, f"not a checkpoint signed by {key.name}: {exc}") from None
    return checkpoint, note


def check_against_checkpoint(
    env: Any,
    checkpoint: Checkpoint,
    note: Note,
    backup_events: list[dict],
    witness_keys: list[VerifierKey],
    min_witnesses: int,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Findings (kind, where, detail) and a summary of checking the chain against a held checkpoint."""
    findings: list[dict[str, str]] = []
    prefix = env.settings.checkpoint_origin_prefix
    chain_key = chain_of_origin(checkpoint.origin, prefix)
    where = checkpoint.origin if chain_key is None else chain_key
    summary: dict[str, Any] = {
        "origin": checkpoint.origin,
        "chainKey": chain_key,
        "treeSize": checkpoint.size,
        "rootHash": b64(checkpoint.root),
    }

    def find(kind: str, detail: str) -> None:
        findings.append({"kind": kind, "where": where, "detail": detail})

    try:
        cosigned = verify_cosignatures(note, witness_keys)
    except NoteError as exc:
        cosigned = {}
        find("checkpoint_cosignature_invalid", str(exc))
    summary["witnessCosignatures"] = sorted(parse_verifier_key(k).name for k in cosigned)
    if len(cosigned) < min_witnesses:
        find(
            "checkpoint_witnesses_missing",
            f"{len(cosigned)} of the {min_witnesses} witness cosignature(s) required verify",
        )
    if chain_key is None:
        find("checkpoint_origin_unknown", f"the origin is not {prefix}<dataset>/<versionLabel>")
        return findings, summary
    leaves = [event_leaf(e) for e in backup_events]
    summary["currentSize"] = len(leaves)
    if len(leaves) < checkpoint.size:
        find(
            "checkpoint_truncated",
            f"the checkpoint covers {checkpoint.size} events; the audit backup holds {len(leaves)}: "
            "history the checkpoint covers was removed",
        )
        return findings, summary
    tree = merkle.MerkleTree(leaves)
    if tree.prefix_root(checkpoint.size) != checkpoint.root:
        find(
            "checkpoint_inconsistent",
            f"the first {checkpoint.size} events of the audit backup do not have the checkpoint's root: "
            "history the checkpoint covers was rewritten",
        )
        return findings, summary
    summary["currentRootHash"] = b64(tree.root)
    if checkpoint.size == 0:
        summary["consistencyProof"] = []
        return findings, summary
    try:
        with env.catalog.log_reader(chain_key) as reader:
            stored = reader.size
            proof = reader.consistency_proof(checkpoint.size, stored) if stored >= checkpoint.size else None
            stored_root = reader.root(stored) if stored else merkle.EMPTY_ROOT
    except ValueError as exc:
        proof, stored, stored_root = None, 0, merkle.EMPTY_ROOT
        find("transparency_log_mismatch", f"the catalog's stored log cannot prove consistency: {exc}")
    if proof is not None:
        summary["consistencyProof"] = [b64(h) for h in proof]
        summary["provedToSize"] = stored
        if not merkle.verify_consistency(checkpoint.size, stored, checkpoint.root, stored_root, proof):
            find(
                "checkpoint_inconsistent",
                f"the catalog's log (size {stored}) gives no valid consistency proof from the checkpoint",
            )
    return findings, summary


#: `check_stored_logs` findings that say the chain is not the history its stored log or a checkpoint of
#: it holds, or holds events the operator's key did not sign where it signs every event (a note that
#: cannot be read, or whose signature fails, says nothing of the chain)
OTHER_HISTORY = frozenset(
    {
        "transparency_log_mismatch",
        "checkpoint_truncated",
        "checkpoint_inconsistent",
        "event_signature_invalid",
    }
)


def other_history(env: Any, chain_key: str, backup_events: list[dict]) -> list[dict[str, str]]:
    """The findings of `check_stored_logs` saying `backup_events` is not the history that was logged
    or checkpointed: a chain re-hashed in the backup and the catalog alike verifies, but not against
    these. What deletes or undoes lake state (`gc`, `rollback`) refuses such a chain."""
    return [f for f in check_stored_logs(env, chain_key, backup_events) if f["kind"] in OTHER_HISTORY]


def other_history_of(catalog: CatalogStore, lake: Any, signing_key: SigningKey | None = None) -> Any:
    """`other_history` as a function of (chain key, events) -> the findings' details, for a reader that
    holds a catalog and a lake but no `Environment` (proofs: the CLI's and the HTTP API's). With the
    operator's `signing_key` an event it should have signed and did not is one (`event_signature_invalid`),
    as for every run (before 2026-12-07 proofs were made from such a chain)."""
    stores = SimpleNamespace(catalog=catalog, lake=lake, signing_key=signing_key)
    return lambda key, events: [f["detail"] for f in other_history(stores, key, events)]


def check_stored_logs(env: Any, chain_key: str, backup_events: list[dict]) -> list[dict[str, str]]:
    """`verify`'s check of a chain's stored log and checkpoints against the audit backup: the stored
    tree's root at its size is the root of the backup's first events; every stored (and lake) checkpoint
    has the root of the backup's first `size` events, and no more events than the backup holds."""
    findings: list[dict[str, str]] = []
    leaves = [event_leaf(e) for e in backup_events]
    tree = merkle.MerkleTree(leaves)

    def root_of(size: int) -> bytes:
        return tree.prefix_root(size)

    try:
        with env.catalog.log_reader(chain_key) as reader:
            stored, stored_root = reader.size, reader.root() if reader.size else merkle.EMPTY_ROOT
    except ValueError as exc:
        findings.append({"kind": "transparency_log_mismatch", "where": chain_key, "detail": str(exc)})
        stored, stored_root = 0, merkle.EMPTY_ROOT
    if stored > len(leaves) or (stored and stored_root != root_of(stored)):
        findings.append(
            {
                "kind": "transparency_log_mismatch",
                "where": chain_key,
                "detail": f"the catalog's stored log (size {stored}) is not the log of the audit backup",
            }
        )
    dataset, version_label = split_chain_key(chain_key)
    rows = env.catalog.checkpoints(chain_key)
    notes: dict[str, str] = {f"catalog checkpoint {r['tree_size']}": r["note"] for r in rows}
    for row in rows:
        where = f"catalog checkpoint {row['tree_size']}"
        try:
            _, note = parse_signed_checkpoint(row["note"])
        except NoteError:
            continue  # checkpoint_unreadable (below)
        problem = checkpoint_row_problem(row)
        if problem is not None:
            findings.append({"kind": "checkpoint_row_mismatch", "where": where, "detail": problem})
            continue
        for cosignature in row["cosignatures"]:
            problem = cosignature_problem(note.text, cosignature)
            if problem is not None:
                findings.append({"kind": "checkpoint_cosignature_invalid", "where": where, "detail": problem})
    prefix = f"{dataset}/{version_label}/_checkpoints/"
    for rel in env.lake.list_files(f"{dataset}/{version_label}/_checkpoints"):
        try:
            data = env.lake.read_if_exists(rel)
        except layout.OutsidePartition as exc:
            # an object store keeps `./`, `//` and `..` in a key as they are (a local lake: a link)
            findings.append({"kind": "path_outside_lake", "where": rel, "detail": str(exc)})
            continue
        if data is not None and rel.startswith(prefix):
            notes[rel] = data.decode("utf-8", "replace")
    trusted = [env.signing_key.verifier()] if env.signing_key is not None else []
    vouched = 0  # the size of the newest checkpoint the key signed whose root the backup has
    for where, text in sorted(notes.items()):
        try:
            checkpoint, note = parse_signed_checkpoint(text)
        except NoteError as exc:
            findings.append({"kind": "checkpoint_unreadable", "where": where, "detail": str(exc)})
            continue
        # (a lake file is named by its checkpoint's size: an older checkpoint under a newer name hides it)
        named = layout.checkpoint_file(dataset, version_label, checkpoint.size)
        if where.startswith(prefix) and where != named:
            detail = f"the lake file holds the checkpoint of size {checkpoint.size} (its name: {named})"
            findings.append({"kind": "checkpoint_file_mismatch", "where": where, "detail": detail})
        signed = bool(trusted)
        if trusted:
            try:
                verify_note(note, trusted)
            except NoteError as exc:
                signed = False
                findings.append({"kind": "checkpoint_signature_invalid", "where": where, "detail": str(exc)})
        if checkpoint.size > len(leaves):
            findings.append(
                {
                    "kind": "checkpoint_truncated",
                    "where": where,
                    "detail": f"a checkpoint of {checkpoint.size} events; the backup holds {len(leaves)}",
                }
            )
        elif checkpoint.root != root_of(checkpoint.size):
            findings.append(
                {
                    "kind": "checkpoint_inconsistent",
                    "where": where,
                    "detail": f"the backup's first {checkpoint.size} events lack the checkpoint's root",
                }
            )
        elif signed:
            vouched = max(vouched, checkpoint.size)
    if trusted:
        unsigned = unsigned_events(backup_events[vouched:], trusted[0], vouched > 0, SELF_CHECKED_EVENTS)
        for event in unsigned:
            findings.append(_unsigned_finding(chain_key, event))
    return findings


def _unsigned_finding(chain_key: str, event: Mapping[str, Any]) -> dict[str, str]:
    chain = event.get("chain")
    seq = chain.get("seq") if isinstance(chain, Mapping) else None
    return {
        "kind": "event_signature_invalid",
        "where": f"{chain_key} seq {seq}",
        "detail": (
            f"the {scrub_text(str(event.get('event_type')))[:80]} event carries no valid signature of the "
            "operator's key at its place, after events that key signed: appended by someone without the "
            "key (or by a pcbo process not given PCBO_SIGNING_KEY); nothing builds on this chain"
        ),
    }


# -- proofs served from the stored log --------------------------------------------------------------------


def _stored_notes(env: Any, chain_key: str, sizes: set[int]) -> list[str]:
    return [
        full_note(r).render() for r in stored_checkpoints(env.catalog, chain_key) if r["tree_size"] in sizes
    ]


def _log_size(env: Any, chain_key: str) -> int:
    """The size of the chain's stored log; `InvalidInput` naming `--dataset` when it has no event (no
    such dataset, or version label)."""
    stored = env.catalog.ensure_tree(chain_key)
    if stored == 0:
        raise InvalidInput("--dataset", f"the log of {chain_key} is empty: no audit event of it")
    return stored


def _default_size(env: Any, chain_key: str, size: int | None, stored: int) -> int:
    if size is not None:
        return size
    latest = latest_stored_checkpoint(env.catalog, chain_key)
    return latest["tree_size"] if latest is not None else stored


def inclusion_document(env: Any, chain_key: str, seq: int, size: int | None) -> dict[str, Any]:
    """An RFC 6962 inclusion proof of event `seq` in the chain's log of `size` events (default: the
    latest checkpoint's size), with the event and any stored checkpoint of that size."""
    stored = _log_size(env, chain_key)
    size = _default_size(env, chain_key, size, stored)
    if not 0 < size <= stored:
        raise InvalidInput("--size", f"must be between 1 and the log's size {stored}")
    if not 0 <= seq < size:
        raise InvalidInput("--seq", f"must be below the tree size {size}")
    events = env.catalog.audit_events(chain_key)
    with env.catalog.log_reader(chain_key) as reader:
        proof, root = reader.inclusion_proof(seq, size), reader.root(size)
    return {
        "type": "pcbo.log.inclusion/1",
        "origin": origin_for(chain_key, env.settings.checkpoint_origin_prefix),
        "chainKey": chain_key,
        "leafIndex": seq,
        "treeSize": size,
        "rootHash": b64(root),
        "event": events[seq],
        "proof": [b64(h) for h in proof],
        "checkpoints": _stored_notes(env, chain_key, {size}),
    }


def consistency_document(env: Any, chain_key: str, old: int, size: int | None) -> dict[str, Any]:
    """An RFC 6962 consistency proof from the log's first `old` events to `size` (default: the latest
    checkpoint's size), with the stored checkpoints of both sizes."""
    stored = _log_size(env, chain_key)
    size = _default_size(env, chain_key, size, stored)
    if not 0 < size <= stored:
        raise InvalidInput("--to", f"must be between 1 and the log's size {stored}")
    if not 0 < old <= size:
        raise InvalidInput("--from", f"must be between 1 and {size}")
    with env.catalog.log_reader(chain_key) as reader:
        proof, old_root, root = reader.consistency_proof(old, size), reader.root(old), reader.root(size)
    return {
        "type": "pcbo.log.consistency/1",
        "origin": origin_for(chain_key, env.settings.checkpoint_origin_prefix),
        "chainKey": chain_key,
        "fromSize": old,
        "toSize": size,
        "fromRootHash": b64(old_root),
        "toRootHash": b64(root),
        "proof": [b64(h) for h in proof],
        "checkpoints": _stored_notes(env, chain_key, {old, size}),
    }


def verify_proof_document(
    document: Any, key: VerifierKey, held: list[str], origin_prefix: str = DEFAULT_ORIGIN_PREFIX
) -> dict[str, Any]:
    """Check an inclusion or consistency proof offline: every root it relies on must be that of a
    checkpoint signed by `key` (embedded in the document, or `held` by the verifier), and the chain it
    names the one whose log's origin is exactly `<origin_prefix><chainKey>`. An inclusion proof's event
    may carry no operator signature (a chain from before the key was set), but one it carries must
    verify under `key` at its place; `eventSigned` says whether it does."""
    from pcbo_dagster.core.transparency_log import event_inclusion_problems, signed_checkpoints_by_size

    if not isinstance(document, dict) or document.get("type") not in (
        "pcbo.log.inclusion/1",
        "pcbo.log.consistency/1",
    ):
        raise InvalidInput(
            "--proof", "not a pcbo log proof (type pcbo.log.inclusion/1 or pcbo.log.consistency/1)"
        )
    inclusion = document["type"] == "pcbo.log.inclusion/1"
    listed = document.get("checkpoints", [])
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise InvalidInput("--proof", "checkpoints: not a list of signed checkpoint notes")
    proof = document.get("proof")
    if not isinstance(proof, list) or not all(isinstance(h, str) for h in proof):
        raise InvalidInput("--proof", "proof: not a list of base64 hashes")
    for name in ("treeSize",) if inclusion else ("fromSize", "toSize"):
        if type(document.get(name)) is not int:
            raise InvalidInput("--proof", f"{name}: not an integer")
    checkpoints, problems = signed_checkpoints_by_size([*held, *listed], key)
    origin = document.get("origin")
    for size, checkpoint in checkpoints.items():
        if checkpoint.origin != origin:
            problems.append(f"the checkpoint of size {size} is of origin {checkpoint.origin}, not {origin}")
    # the chain it names: its log's origin is exactly `<prefix><chainKey>` (a chain whose name only
    # ends the origin's, `s/v1` of `pcbo/events/v1`, is another), and an inclusion proof's event is
    # of that chain
    chain_key = document.get("chainKey")
    stated_event = document.get("event")
    event_chain = stated_event.get("chain") if inclusion and isinstance(stated_event, dict) else None
    if (
        not isinstance(chain_key, str)
        or not isinstance(origin, str)
        or chain_of_origin(origin, origin_prefix) != chain_key
        or (inclusion and (not isinstance(event_chain, dict) or event_chain.get("chain_key") != chain_key))
    ):
        problems.append(
            f"the document's chainKey {chain_key!r} is not the chain of its origin {origin!r} (under "
            f"--origin-prefix {origin_prefix}) and of its event"
        )
    # what the document states besides its proof is what "valid" vouches for: the roots and the leaf
    stated = {"rootHash": "treeSize"} if inclusion else {"fromRootHash": "fromSize", "toRootHash": "toSize"}
    for member, size_member in stated.items():
        signed = checkpoints.get(document[size_member])
        if signed is not None and document.get(member) != b64(signed.root):
            problems.append(
                f"the document's {member} is not the root of the signed checkpoint of size "
                f"{document[size_member]}"
            )
    if inclusion:
        event = document.get("event")
        chain = event.get("chain") if isinstance(event, dict) else None
        seq = chain.get("seq") if isinstance(chain, dict) else None
        if type(document.get("leafIndex")) is not int or document["leafIndex"] != seq:
            problems.append(f"the document's leafIndex {document.get('leafIndex')!r} is not its event's seq")
        size = document["treeSize"]
        problems += event_inclusion_problems(document.get("event") or {}, size, proof, checkpoints.get(size))
        # the checkpoint vouches for the event's place in the log, its own signature for who appended it
        event_signed = isinstance(event, dict) and verified_statement(event, key) is not None
        if isinstance(event, dict) and OPERATOR_SIGNATURE in event and not event_signed:
            problems.append(
                f"event seq {seq}: its operator_signature does not verify under the operator's key "
                f"{key.name} at its place (signed by another key, or for another event)"
            )
    else:
        old, new = document.get("fromSize"), document.get("toSize")
        if old not in checkpoints or new not in checkpoints:
            missing = [s for s in (old, new) if s not in checkpoints]
            problems.append(f"no checkpoint signed by {key.name} of size(s) {missing}")
        else:
            try:
                hashes = [b64decode_strict(h, "a proof hash") for h in proof]
            except NoteError as exc:
                hashes = []
                problems.append(str(exc))
            if not merkle.verify_consistency(old, new, checkpoints[old].root, checkpoints[new].root, hashes):
                problems.append(f"the consistency proof from {old} to {new} does not verify")
    verdict = {"valid": not problems, "type": document["type"], "origin": origin, "problems": problems}
    if inclusion:
        verdict["eventSigned"] = event_signed
    return verdict

"""Transparency log checkpoints (c2sp.org/tlog-checkpoint) and the witness request body
(c2sp.org/tlog-witness `add-checkpoint`).

Pure: no I/O. A checkpoint is a signed note whose text is exactly

    <origin>\\n<tree size, decimal, no leading zeros>\\n<base64 RFC 6962 root>\\n[extension lines\\n]

pcbo's origin for the log of chain `<dataset>/<versionLabel>` is `pcbo/<dataset>/<versionLabel>`
(the prefix `pcbo/` can be configured); pcbo writes no extension lines but reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pcbo_dagster.core.audit_chain import split_chain_key
from pcbo_dagster.core.merkle import EMPTY_ROOT, HASH_SIZE
from pcbo_dagster.core.signed_note import (
    Note,
    NoteError,
    SigningKey,
    b64,
    b64decode_strict,
    check_note_text,
    parse_note,
    sign_note,
)

DEFAULT_ORIGIN_PREFIX = "pcbo/"
#: At most this many consistency proof lines in an add-checkpoint request (the protocol's limit).
MAX_PROOF_LINES = 63
_SIZE = re.compile(r"0|[1-9][0-9]{0,18}")


class CheckpointError(NoteError):
    """A checkpoint (or witness request) that is malformed."""


@dataclass(frozen=True)
class Checkpoint:
    """The three lines every checkpoint holds (and any extension lines)."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The note text (the body that is signed)."""
        lines = [self.origin, str(self.size), b64(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)

    def sign(self, key: SigningKey) -> Note:
        return sign_note(self.text, key)


def origin_for(chain_key: str, prefix: str = DEFAULT_ORIGIN_PREFIX) -> str:
    """The log origin of an audit chain: `<prefix><dataset>/<versionLabel>`."""
    return prefix + chain_key


def chain_of_origin(origin: str, prefix: str = DEFAULT_ORIGIN_PREFIX) -> str | None:
    """The audit chain `<dataset>/<versionLabel>` whose log has exactly this origin under `prefix`
    (`origin_for`'s inverse), or None. A log's origin names one chain: `pcbo/fork/events/v1` is no
    origin of `events/v1` under `pcbo/`, and with prefixes ending in `/` no origin is of two prefixes."""
    if not origin.startswith(prefix):
        return None
    try:
        split_chain_key(origin[len(prefix) :])
    except ValueError:
        return None
    return origin[len(prefix) :]


def parse_checkpoint_text(text: str) -> Checkpoint:
    """The checkpoint a note text holds; `CheckpointError` when it is not one."""
    try:
        check_note_text(text)
    except NoteError as exc:
        raise CheckpointError(str(exc)) from None
    lines = text[:-1].split("\n")
    if len(lines) < 3 or any(not line for line in lines):
        raise CheckpointError("a checkpoint has at least three non-empty lines: origin, size, root hash")
    origin, size_text, root_text = lines[:3]
    if not _SIZE.fullmatch(size_text) or int(size_text) >= 2**63:
        raise CheckpointError(f"the tree size {size_text!r} is not a decimal without leading zeros")
    try:
        root = b64decode_strict(root_text, "the root hash")
    except NoteError as exc:
        raise CheckpointError(str(exc)) from None
    if len(root) != HASH_SIZE:
        raise CheckpointError("the root hash is not 32 bytes")
    size = int(size_text)
    if size == 0 and root != EMPTY_ROOT:
        raise CheckpointError("a checkpoint of size 0 must have the empty tree's root")
    return Checkpoint(origin, size, root, tuple(lines[3:]))


def parse_signed_checkpoint(data: str | bytes) -> tuple[Checkpoint, Note]:
    """A signed checkpoint note: (its checkpoint, the note). Signatures are not verified here."""
    note = parse_note(data)
    return parse_checkpoint_text(note.text), note


# -- tlog-witness add-checkpoint -----------------------------------------------------------------------


def add_checkpoint_body(old_size: int, proof: list[bytes], signed_checkpoint: str) -> bytes:
    """`old <size>\\n`, one base64 proof hash a line, a blank line, the signed checkpoint."""
    if len(proof) > MAX_PROOF_LINES:
        raise CheckpointError(f"a consistency proof of more than {MAX_PROOF_LINES} hashes")
    head = f"old {old_size}\n" + "".join(b64(h) + "\n" for h in proof) + "\n"
    return (head + signed_checkpoint).encode("utf-8")


@dataclass(frozen=True)
class AddCheckpointRequest:
    old_size: int
    proof: list[bytes]
    checkpoint: Checkpoint
    note: Note


def parse_add_checkpoint_body(body: bytes) -> AddCheckpointRequest:
    """Parse an add-checkpoint request body; `CheckpointError` (a 400 answer) when malformed."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError("the request is not UTF-8") from None
    head, sep, rest = text.partition("\n\n")
    if not sep:
        raise CheckpointError("the request has no blank line before the checkpoint")
    lines = head.split("\n")
    first = lines[0]
    if not first.startswith("old ") or not _SIZE.fullmatch(first[4:]):
        raise CheckpointError("the request starts with 'old <size>'")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise CheckpointError(f"more than {MAX_PROOF_LINES} consistency proof lines")
    proof = []
    for line in lines[1:]:
        digest = b64decode_strict(line, "a consistency proof line")
        if len(digest) != HASH_SIZE:
            raise CheckpointError("a consistency proof line is not a 32-byte hash")
        proof.append(digest)
    checkpoint, note = parse_signed_checkpoint(rest)
    return AddCheckpointRequest(int(first[4:]), proof, checkpoint, note)

"""C2SP signed notes (c2sp.org/signed-note), Ed25519 keys, and timestamped cosignatures
(c2sp.org/tlog-cosignature, Ed25519 `cosignature/v1`).

Pure: computation only (hashlib, base64 and `cryptography`'s Ed25519), no I/O, no clock.

- A note is a text ending in a newline, a blank line, then signature lines
  `— <key name> <base64(4-byte key id || signature)>`. The text is everything before the *last*
  blank line; it may hold empty lines itself.
- Key id = `SHA-256(name || 0x0A || type || public key)[:4]`; type `0x01` is an Ed25519 signature
  over the note text, `0x04` an Ed25519 cosignature v1: a signature over
  `"cosignature/v1\\ntime <t>\\n" + text`, carried as `key id || u64 big-endian t || signature`.
- A verifier key (vkey) is `<name>+<hex key id>+<base64(type || public key)>`. A private key is
  written as `PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || 32-byte seed)>`, the form Go's
  golang.org/x/mod/sumdb/note reads, so keys move between the two.

Verification follows the spec: signatures whose (name, key id) match no trusted key are ignored; a
matching one that fails to verify rejects the whole note (`NoteError`); a note with no verified
signature from a trusted key is rejected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

ED25519 = 0x01
COSIGNATURE_V1 = 0x04
SIGNATURE_TYPES = {ED25519: "ed25519", COSIGNATURE_V1: "ed25519 cosignature/v1"}
EM_DASH = "\u2014"
PRIVATE_KEY_PREFIX = "PRIVATE+KEY+"
#: Notes with more signature lines than this are refused (the spec asks verifiers to accept 16).
MAX_SIGNATURES = 64
MAX_NOTE_BYTES = 1 << 20

_NAME = re.compile(r"[^\s+]+")
_KEY_ID_HEX = re.compile(r"[0-9a-f]{8}")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class NoteError(ValueError):
    """A note, key or signature that is malformed or does not verify."""


def b64decode_strict(text: str, what: str) -> bytes:
    """Standard base64 (RFC 4648 section 4, padded); `NoteError` naming `what` otherwise."""
    if not isinstance(text, str) or not _BASE64.fullmatch(text) or len(text) % 4:
        raise NoteError(f"{what} is not base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NoteError(f"{what} is not base64: {exc}") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def check_key_name(name: str) -> str:
    """A key name: non-empty, no Unicode spaces and no `+`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name != name.strip():
        raise NoteError(f"key name {name!r} must be non-empty, without spaces or '+'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise NoteError(f"key name {name!r} holds a control character")
    return name


def key_id(name: str, signature_type: int, public_key: bytes) -> bytes:
    """`SHA-256(name || 0x0A || type || public key)[:4]`."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([signature_type]) + public_key).digest()[:4]


@dataclass(frozen=True)
class VerifierKey:
    """A public key as a vkey: name, key id, signature type, 32-byte Ed25519 key."""

    name: str
    key_id: bytes
    signature_type: int
    public_key: bytes

    @property
    def text(self) -> str:
        """`<name>+<hex key id>+<base64(type || public key)>`."""
        return f"{self.name}+{self.key_id.hex()}+{b64(bytes([self.signature_type]) + self.public_key)}"

    def ed25519(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.public_key)

    def verify_raw(self, signature: bytes, message: bytes) -> bool:
        try:
            self.ed25519().verify(signature, message)
        except InvalidSignature:
            return False
        return True


def verifier_key(name: str, public_key: bytes, signature_type: int = ED25519) -> VerifierKey:
    check_key_name(name)
    if signature_type not in SIGNATURE_TYPES or len(public_key) != 32:
        raise NoteError("only Ed25519 keys (types 0x01 and 0x04, 32 bytes) are supported")
    return VerifierKey(name, key_id(name, signature_type, public_key), signature_type, public_key)


def parse_verifier_key(text: str) -> VerifierKey:
    """Parse a vkey; `NoteError` for anything but a well-formed Ed25519 (0x01) or cosignature
    (0x04) key whose key id is the one its name and key give."""
    if not isinstance(text, str):
        raise NoteError("a verifier key must be text")
    text = text.strip()
    name, sep, rest = text.partition("+")
    id_hex, sep2, material = rest.partition("+")
    if not sep or not sep2 or not _KEY_ID_HEX.fullmatch(id_hex):
        raise NoteError("a verifier key is <name>+<8 hex digits>+<base64 key>")
    check_key_name(name)
    raw = b64decode_strict(material, "the verifier key's key material")
    if len(raw) != 33 or raw[0] not in SIGNATURE_TYPES:
        raise NoteError("the verifier key is not an Ed25519 key (type 0x01 or 0x04, 32 bytes)")
    key = verifier_key(name, raw[1:], raw[0])
    if key.key_id.hex() != id_hex:
        raise NoteError(f"the verifier key's id {id_hex} is not the one its name and key give")
    return key


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key with its key name."""

    name: str
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def seed(self) -> bytes:
        return self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def verifier(self, signature_type: int = ED25519) -> VerifierKey:
        """The vkey of this key: type 0x01 to check its note signatures, 0x04 its cosignatures."""
        return verifier_key(self.name, self.public_key, signature_type)

    @property
    def text(self) -> str:
        """`PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || seed)>` (a secret)."""
        material = b64(bytes([ED25519]) + self.seed)
        return f"{PRIVATE_KEY_PREFIX}{self.name}+{self.verifier().key_id.hex()}+{material}"

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def new_signing_key(name: str) -> SigningKey:
    """A fresh Ed25519 key (from the operating system's random source)."""
    check_key_name(name)
    return SigningKey(name, Ed25519PrivateKey.generate())


def signing_key_from_seed(name: str, seed: bytes) -> SigningKey:
    check_key_name(name)
    if len(seed) != 32:
        raise NoteError("an Ed25519 seed is 32 bytes")
    return SigningKey(name, Ed25519PrivateKey.from_private_bytes(seed))


def parse_signing_key(text: str) -> SigningKey:
    """Parse `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>`; `NoteError` otherwise (the
    message never holds the key material)."""
    text = text.strip() if isinstance(text, str) else ""
    if not text.startswith(PRIVATE_KEY_PREFIX):
        raise NoteError("a signing key file holds one line PRIVATE+KEY+<name>+<key id>+<base64 key>")
    name, _, rest = text[len(PRIVATE_KEY_PREFIX) :].partition("+")
    id_hex, _, material = rest.partition("+")
    if not _KEY_ID_HEX.fullmatch(id_hex):
        raise NoteError("the signing key's id is not 8 hex digits")
    check_key_name(name)
    try:
        raw = b64decode_strict(material, "key")
    except NoteError:
        raise NoteError("the signing key's material is not base64") from None
    if len(raw) != 33 or raw[0] != ED25519:
        raise NoteError("the signing key is not an Ed25519 key (type 0x01, 32-byte seed)")
    key = signing_key_from_seed(name, raw[1:])
    if key.verifier().key_id.hex() != id_hex:
        raise NoteError("the signing key's id is not the one its name and key give")
    return key


# -- notes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key id, the signature bytes after the id."""

    name: str
    key_id: bytes
    signature: bytes

    @property
    def line(self) -> str:
        return f"{EM_DASH} {self.name} {b64(self.key_id + self.signature)}\n"


@dataclass(frozen=True)
class Note:
    """A note's text (ending in a newline) and its signature lines, in order."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def render(self) -> str:
        """The signed note: text, blank line, signature lines."""
        return self.text + "\n" + "".join(s.line for s in self.signatures)

    def with_signatures(self, extra: list[NoteSignature]) -> Note:
        """This note with `extra` signature lines appended (a line already present is not repeated)."""
        have = list(self.signatures)
        for sig in extra:
            if sig not in have:
                have.append(sig)
        return Note(self.text, tuple(have))


def check_note_text(text: str) -> str:
    if not isinstance(text, str) or not text.endswith("\n"):
        raise NoteError("a note's text must end with a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text) or "\x7f" in text:
        raise NoteError("a note may hold no control characters other than newline")
    return text


def parse_signature_line(line: str) -> NoteSignature:
    """`— <name> <base64>` (without its newline)."""
    if not line.startswith(EM_DASH + " "):
        raise NoteError("a signature line starts with an em dash and a space")
    parts = line[2:].split(" ")
    if len(parts) != 2:
        raise NoteError("a signature line is '— <key name> <base64 signature>'")
    name, blob = parts
    check_key_name(name)
    raw = b64decode_strict(blob, f"the signature of {name}")
    if len(raw) < 5:
        raise NoteError(f"the signature of {name} is too short")
    return NoteSignature(name, raw[:4], raw[4:])


def parse_signature_lines(text: str) -> list[NoteSignature]:
    """Signature lines, each ending in a newline (a witness's answer to add-checkpoint)."""
    if not text.endswith("\n"):
        raise NoteError("signature lines must end with a newline")
    return [parse_signature_line(line) for line in text[:-1].split("\n")]


def parse_note(data: str | bytes) -> Note:
    """Split a signed note into its text and signature lines; `NoteError` when it is malformed."""
    if isinstance(data, bytes):
        if len(data) > MAX_NOTE_BYTES:
            raise NoteError("the note is too large")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("a note must be UTF-8") from None
    if not isinstance(data, str) or not data.endswith("\n"):
        raise NoteError("a signed note ends with a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in data) or "\x7f" in data:
        raise NoteError("a note may hold no control characters other than newline")
    split = data.rfind("\n\n")
    if split < 0:
        raise NoteError("a signed note has a blank line between its text and its signatures")
    text, block = data[: split + 1], data[split + 2 :]
    if not block:
        raise NoteError("a signed note has at least one signature line")
    signatures = parse_signature_lines(block)
    if len(signatures) > MAX_SIGNATURES:
        raise NoteError(f"more than {MAX_SIGNATURES} signatures")
    return Note(check_note_text(text), tuple(signatures))


def sign_note(text: str, key: SigningKey) -> Note:
    """The note `text` signed (type 0x01) by `key`."""
    check_note_text(text)
    return Note(text, (NoteSignature(key.name, key.verifier().key_id, key.sign(text.encode("utf-8"))),))


def signed_by(signature: NoteSignature, key: VerifierKey) -> bool:
    """Whether a signature line names `key` (its key name and key id; it is not verified here)."""
    return signature.name == key.name and signature.key_id == key.key_id


def verify_note(note: Note, keys: list[VerifierKey]) -> list[VerifierKey]:
    """The trusted keys (type 0x01) whose signatures on `note` verify. Signatures of unknown keys are
    ignored; `NoteError` when a known key's signature fails, or when none verifies."""
    verified: list[VerifierKey] = []
    message = note.text.encode("utf-8")
    for sig in note.signatures:
        for key in keys:
            if key.signature_type != ED25519 or not signed_by(sig, key):
                continue
            if not key.verify_raw(sig.signature, message):
                raise NoteError(f"the signature of {key.name} does not verify")
            if key not in verified:
                verified.append(key)
    if not verified:
        raise NoteError("no signature from a trusted key")
    return verified


# -- cosignatures (c2sp.org/tlog-cosignature, Ed25519) -----------------------------------------------


def cosignature_message(text: str, timestamp: int) -> bytes:
    """`"cosignature/v1\\ntime <t>\\n"` followed by the checkpoint's note text."""
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode("utf-8")


def cosign(text: str, key: SigningKey, timestamp: int) -> NoteSignature:
    """A cosignature v1 line on the checkpoint `text` by `key` at POSIX time `timestamp`."""
    check_note_text(text)
    if not 0 < timestamp < 2**63:
        raise NoteError("a cosignature's timestamp is a POSIX time above 0")
    signature = key.sign(cosignature_message(text, timestamp))
    return NoteSignature(
        key.name, key.verifier(COSIGNATURE_V1).key_id, timestamp.to_bytes(8, "big") + signature
    )


def cosignature_timestamp(signature: NoteSignature) -> int:
    """The timestamp a cosignature v1 carries; `NoteError` when it is not one (72 bytes after the id, a
    timestamp above 0 — c2sp.org/tlog-witness: it "MUST NOT be zero" — and at most 2^63 - 1, as
    c2sp.org/tlog-cosignature requires and `cosign` writes)."""
    if len(signature.signature) != 8 + 64:
        raise NoteError(f"the signature of {signature.name} is not an Ed25519 cosignature v1")
    timestamp = int.from_bytes(signature.signature[:8], "big")
    if not 0 < timestamp < 2**63:
        raise NoteError(f"the cosignature of {signature.name} has timestamp {timestamp}: not in 1..2^63-1")
    return timestamp


def verify_cosignatures(note: Note, witnesses: list[VerifierKey]) -> dict[str, int]:
    """{witness vkey text: timestamp} of the cosignatures of trusted witnesses (type 0x04 keys) that
    verify on `note`'s text. Unknown signatures are ignored; a known witness whose cosignature fails
    raises `NoteError`."""
    found: dict[str, int] = {}
    for sig in note.signatures:
        for key in witnesses:
            if key.signature_type != COSIGNATURE_V1 or not signed_by(sig, key):
                continue
            timestamp = cosignature_timestamp(sig)
            if not key.verify_raw(sig.signature[8:], cosignature_message(note.text, timestamp)):
                raise NoteError(f"the cosignature of witness {key.name} does not verify")
            found[key.text] = timestamp
    return found

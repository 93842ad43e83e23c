"""DSSE envelopes (github.com/secure-systems-lab/dsse) signed with pcbo's Ed25519 keys, through
securesystemslib (`securesystemslib.dsse.Envelope`: its PAE, signing and threshold verification).

The signature's `keyid` is `<key name>+<hex key id>` of the signed-note verifier key (the same key
signs the checkpoints), so a verifier holding the vkey knows which signature to check. The in-toto
Statement inside is plain JSON (four fields, RFC 8785 bytes as the payload): the in-toto-attestation
Python bindings are generated protobuf classes (last released 2023) and would only add a protobuf
dependency to write and read those four fields; `evidence/package.py` checks their shape itself.
"""

from __future__ import annotations

from typing import Any

from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import FormatError, VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from pcbo_dagster.core.signed_note import SigningKey, VerifierKey

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"


class EnvelopeError(ValueError):
    """An envelope that is malformed or whose signature does not verify."""


def dsse_key_id(key: VerifierKey) -> str:
    return f"{key.name}+{key.key_id.hex()}"


def _public(key: VerifierKey) -> SSlibKey:
    return SSlibKey(dsse_key_id(key), "ed25519", "ed25519", {"public": key.public_key.hex()})


def sign_envelope(
    payload: bytes, key: SigningKey, payload_type: str = IN_TOTO_PAYLOAD_TYPE
) -> dict[str, Any]:
    """`{payload, payloadType, signatures: [{keyid, sig}]}` signed over the DSSE PAE."""
    envelope = Envelope(payload, payload_type, {})
    envelope.sign(CryptoSigner(key.private_key, _public(key.verifier())))
    return envelope.to_dict()


def open_envelope(document: Any, key: VerifierKey, payload_type: str = IN_TOTO_PAYLOAD_TYPE) -> bytes:
    """The payload of an envelope whose signature by `key` verifies; `EnvelopeError` otherwise."""
    if not isinstance(document, dict) or set(document) != {"payload", "payloadType", "signatures"}:
        raise EnvelopeError("not a DSSE envelope {payload, payloadType, signatures}")
    if document["payloadType"] != payload_type:
        raise EnvelopeError(f"payloadType is {document['payloadType']!r}, not {payload_type!r}")
    # Checked before securesystemslib reads them: a member nested as deep as JSON may be is no crash.
    signatures = document["signatures"]
    if not isinstance(document["payload"], str):
        raise EnvelopeError("not a DSSE envelope: its payload is not base64 text")
    if not isinstance(signatures, list) or not all(
        isinstance(s, dict) and set(s) == {"keyid", "sig"} and all(isinstance(v, str) for v in s.values())
        for s in signatures
    ):
        raise EnvelopeError("not a DSSE envelope: its signatures are not a list of {keyid, sig} strings")
    try:
        # copies: `from_dict` decodes each signature's `sig` in place
        envelope = Envelope.from_dict(
            {
                "payload": document["payload"],
                "payloadType": payload_type,
                "signatures": [dict(s) for s in signatures],
            }
        )
        envelope.verify([_public(key)], 1)
    except (VerificationError, FormatError, KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"the envelope's signature by {key.name} does not verify: {exc}") from None
    return envelope.payload

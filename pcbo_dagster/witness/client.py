"""The client side of c2sp.org/tlog-witness: `POST <witness>/add-checkpoint`.

A witness is configured as `<cosigner vkey> <URL>` (the vkey of type 0x04, as `pcbo keys generate`
prints it for the witness's key). `request_cosignature` sends the old size the witness last cosigned
(as far as we know), the consistency proof from it, and the signed checkpoint; a `409 Conflict`
answer names the size the witness really holds, and the request is made once more from that size.
A `422` is the witness's refusal of a history not consistent with what it cosigned (since
C2SP/C2SP#280 also its answer to its own size with another root, which witnesses before it answer 409
naming that very size: a rewritten history either way).
The answer's cosignature lines (and only they) are verified against the witness's key before anything
is kept; of several, the newest is kept, with its own timestamp.
A witness that cannot be reached, or refuses, is reported (`WitnessRefused`) and never stops a run:
the caller asks again with the next checkpoint.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from pcbo_dagster.core.checkpoints import Checkpoint, add_checkpoint_body
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.signed_note import (
    COSIGNATURE_V1,
    Note,
    NoteError,
    NoteSignature,
    VerifierKey,
    cosignature_timestamp,
    parse_signature_lines,
    parse_verifier_key,
    signed_by,
    verify_cosignatures,
)
from pcbo_dagster.io.http_delivery import NoRedirect, base_url, deadline_opener, within
from pcbo_dagster.io.redaction import quoted_answer, redact_url

SIZE_CONTENT_TYPE = "text/x.tlog.size"


class WitnessRefused(RuntimeError):
    """The witness did not cosign (unreachable, an error answer, or a cosignature that does not verify)."""


@dataclass(frozen=True)
class Witness:
    key: VerifierKey
    url: str

    @property
    def label(self) -> str:
        return f"{self.key.name} at {redact_url(self.url)}"


def parse_witness(text: str, field: str = "PCBO_WITNESSES") -> Witness:
    """`<cosigner vkey> <http(s) URL>`; `InvalidInput` naming `field` otherwise."""
    parts = text.split()
    if len(parts) != 2:
        raise InvalidInput(field, "each witness is '<cosigner vkey> <URL>'")
    try:
        key = parse_verifier_key(parts[0])
    except NoteError as exc:
        raise InvalidInput(field, f"witness key: {exc}") from None
    if key.signature_type != COSIGNATURE_V1:
        raise InvalidInput(field, f"witness key {key.name} is not a cosignature (type 0x04) key")
    try:
        url = base_url(parts[1])
    except ValueError as exc:
        raise InvalidInput(field, f"witness URL {exc}") from None
    return Witness(key, url)


_OPENER = deadline_opener(NoRedirect())  # (a witness never redirects: a 3xx is a refusal)


def _post(url: str, body: bytes, timeout: float, stated: float) -> tuple[int, str, str]:
    """POST `body`; (status, content type, text of the answer). The whole exchange (connecting,
    sending, the answer read) takes at most `timeout` seconds, however slowly the witness answers
    (`stated`: the timeout a refusal names, that of the whole `request_cosignature`)."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "text/plain; charset=utf-8"}
    )
    with within(timeout) as deadline:
        try:
            try:
                with _OPENER.open(request, timeout=timeout) as answer:
                    status, content_type = answer.status, answer.headers.get("Content-Type", "")
                    text = answer.read(65536).decode("utf-8")
            except urllib.error.HTTPError as exc:
                status, content_type = exc.code, exc.headers.get("Content-Type", "")
                text = exc.read(65536).decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
            if not deadline.expired:
                reason = getattr(exc, "reason", exc)
                raise WitnessRefused(f"{redact_url(url)}: {quoted_answer(str(reason))}") from None
    if deadline.expired:  # (an answer cut short by the deadline can read as complete)
        raise WitnessRefused(f"{redact_url(url)}: no whole answer within {stated:g} s")
    return status, content_type, text


def request_cosignature(
    witness: Witness,
    checkpoint: Checkpoint,
    note: Note,
    known_old_size: int,
    proof_from: Callable[[int], list[bytes]],
    timeout: float = 5.0,
) -> tuple[NoteSignature, int]:
    """Ask `witness` to cosign the signed checkpoint `note`; returns its verified cosignature and the
    cosignature's timestamp. `proof_from(old)` gives the consistency proof from size `old` (> 0) to
    the checkpoint. `WitnessRefused` when it does not cosign."""
    old = known_old_size
    ends = time.monotonic() + timeout  # (the request a 409 leads to has only the time left)
    for _ in range(2):
        proof = proof_from(old) if 0 < old < checkpoint.size else []
        body = add_checkpoint_body(old, proof, note.render())
        left = ends - time.monotonic()
        if left <= 0:
            url = redact_url(witness.url + "/add-checkpoint")
            raise WitnessRefused(f"{url}: no whole answer within {timeout:g} s")
        status, content_type, text = _post(witness.url + "/add-checkpoint", body, left, timeout)
        if status == 200:
            try:
                lines = parse_signature_lines(text)
                found = verify_cosignatures(Note(note.text, tuple(lines)), [witness.key])
                mine = [s for s in lines if signed_by(s, witness.key)]
                newest = max(mine, key=cosignature_timestamp) if found else None
            except NoteError as exc:
                raise WitnessRefused(f"{witness.label}: not a valid cosignature: {exc}") from None
            if newest is None:
                raise WitnessRefused(f"{witness.label}: its answer holds no cosignature by its key")
            return newest, cosignature_timestamp(newest)
        if status == 409 and content_type.split(";")[0].strip() == SIZE_CONTENT_TYPE:
            try:
                held = int(text.strip())
            except ValueError:
                raise WitnessRefused(f"{witness.label}: 409 without a size") from None
            if held > checkpoint.size:
                raise WitnessRefused(
                    f"{witness.label}: the witness has cosigned {held} events of this log, more than the "
                    f"{checkpoint.size} this checkpoint holds: the log was truncated or forked"
                )
            if held == old == checkpoint.size:  # (another root: the answer of witnesses before C2SP#280)
                raise WitnessRefused(
                    f"{witness.label}: the witness cosigned another root for size {held} (409): the log's "
                    "history was rewritten"
                )
            if held == old:
                raise WitnessRefused(
                    f"{witness.label}: a 409 naming the very size asked ({held}), below the checkpoint's "
                    f"{checkpoint.size}: the witness contradicts itself"
                )
            old = held
            continue
        if status == 422:
            raise WitnessRefused(
                f"{witness.label}: not consistent with what the witness cosigned (422): {quoted_answer(text)}"
            )
        raise WitnessRefused(f"{witness.label}: HTTP {status}: {quoted_answer(text)}")
    raise WitnessRefused(f"{witness.label}: the witness's size kept changing")

"""A ledger's hash as a Horizon server the operator trusts serves it: what anchors a ledger archive's
run to the network when its request names no `source.trustedLedger` (`sources/ledger_archives.py`).

`PCBO_TRUSTED_HORIZON_URL` (e.g. `https://horizon.stellar.org`; none by default) is the operator's
setting, never a request's: a request could otherwise name a server of its writer's. It must be
`https://` (a hash read over plain HTTP could be anyone's), or `http://` on loopback only, without
credentials, a query, a fragment, a space or a control character (`InvalidInput` naming the
variable, as for a URL that does not parse).

`ledger_hash(base, sequence)` GETs `<base>/ledgers/<sequence>` (Horizon's ledger resource; redirects
not followed) and returns its `hash` once its `sequence` is the one asked for. Connection errors,
timeouts, 429 and 5xx are tried three times with backoff (tenacity); each attempt has 10 s whole. A
404 says the network has no such ledger (yet): `InvalidInput` on `ledgerRange.end`. Anything else
(still failing, another answer, a document without the ledger's hash, JSON with a duplicate key)
is `HorizonUnavailable` (exit 1): the run is refused, never loaded unanchored.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import tenacity

from pcbo_dagster.core.errors import InvalidInput, PcboError
from pcbo_dagster.core.request_model import LEDGER_HASH_PATTERN, parse_json_strict
from pcbo_dagster.io.http_delivery import NoRedirect, base_url, deadline_opener, within
from pcbo_dagster.io.redaction import quoted_answer, redact_url

VARIABLE = "PCBO_TRUSTED_HORIZON_URL"
ATTEMPTS = 3
ATTEMPT_SECONDS = 10.0
#: The most of an answer read (a ledger document is about 1 KiB).
MAX_ANSWER_BYTES = 1 << 16

_OPENER = deadline_opener(NoRedirect())
_HASH = re.compile(LEDGER_HASH_PATTERN)


class HorizonUnavailable(PcboError):
    """The trusted Horizon did not say the ledger's hash (exit 1: nothing written)."""


class _Retry(Exception):
    """An attempt worth trying again (a connection error, a timeout, 429, 5xx)."""


def trusted_horizon_url() -> str | None:
    """`PCBO_TRUSTED_HORIZON_URL` checked (module doc), without a final `/`; None when not set."""
    text = os.environ.get(VARIABLE, "").strip()
    if not text:
        return None
    try:
        return base_url(text, https_off_loopback="a ledger hash read over plain HTTP could be anyone's")
    except ValueError as exc:
        raise InvalidInput(VARIABLE, str(exc)) from None


def ledger_hash(base: str, sequence: int) -> str:
    """The hash of ledger `sequence` as the Horizon at `base` serves it (module doc)."""
    url = f"{base}/ledgers/{sequence}"
    try:
        for attempt in tenacity.Retrying(
            stop=tenacity.stop_after_attempt(ATTEMPTS),
            wait=tenacity.wait_exponential(multiplier=0.5, max=4),
            retry=tenacity.retry_if_exception_type(_Retry),
            reraise=True,
        ):
            with attempt:
                status, body = _get(url)
    except _Retry as exc:
        raise HorizonUnavailable(
            f"the trusted Horizon {redact_url(url)}: {exc} ({ATTEMPTS} attempts)"
        ) from None
    if status == 404:
        raise InvalidInput(
            "ledgerRange.end",
            f"the trusted Horizon {redact_url(url)} has no ledger {sequence} (404): the range runs past the "
            "network's ledgers, or that Horizon serves another network",
        )
    if status != 200:
        raise HorizonUnavailable(f"the trusted Horizon {redact_url(url)} answered {status}")
    digest = _hash_in(body, sequence)
    if digest is None:
        raise HorizonUnavailable(
            f"the trusted Horizon {redact_url(url)} did not answer ledger {sequence}'s document "
            "(a JSON object with its sequence and a 64-hex-digit hash)"
        )
    return digest


def _get(url: str) -> tuple[int, bytes]:
    """(status, body) of one GET within `ATTEMPT_SECONDS`; `_Retry` for what may pass."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with within(ATTEMPT_SECONDS) as deadline:
        try:
            try:
                with _OPENER.open(request, timeout=ATTEMPT_SECONDS) as answer:
                    status, body = answer.status, answer.read(MAX_ANSWER_BYTES + 1)
            except urllib.error.HTTPError as exc:
                status, body = exc.code, b""
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = "no whole answer in time" if deadline.expired else getattr(exc, "reason", exc)
            raise _Retry(quoted_answer(str(reason))) from None
    if deadline.expired:  # (an answer cut short by the deadline can read as complete)
        raise _Retry(f"no whole answer within {ATTEMPT_SECONDS:g} s")
    if status == 429 or status >= 500:
        raise _Retry(f"answered {status}")
    return status, body


def _hash_in(body: bytes, sequence: int) -> str | None:
    """The `hash` of a Horizon ledger document whose `sequence` is `sequence`; None otherwise."""
    if len(body) > MAX_ANSWER_BYTES:
        return None
    try:  # (strictly: of duplicate keys, which one a parser keeps is its own choice, not Horizon's)
        document: Any = parse_json_strict(body, "the trusted Horizon's answer").value
    except InvalidInput:
        return None
    if not isinstance(document, dict):
        return None
    digest, said = document.get("hash"), document.get("sequence")
    if (
        type(said) is not int
        or said != sequence
        or not isinstance(digest, str)
        or not _HASH.fullmatch(digest)
    ):
        return None
    return digest

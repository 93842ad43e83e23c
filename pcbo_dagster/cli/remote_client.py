"""`pcbo plan|dry-run|execute --server URL`: send the request to a `pcbo serve` and print what it answers,
with the exit statuses of local use.

The token comes from `PCBO_TOKEN`. The server's answers map back onto the engine's errors, so
`cli/main.py` prints them and exits exactly as it does for a local run:

| HTTP answer                                    | raised here            | exit |
|------------------------------------------------|------------------------|------|
| 200 (202 is not asked for: the CLI waits)      | the document           | 0    |
| 422 `{error: invalid_input, field, message}`   | `InvalidInput`         | 2    |
| 409 the gate document (`status: blocked`)      | `Blocked`              | 3    |
| 500 with an execute document (`status: failed`)| `RemoteFailed` + doc   | 1    |
| 401, 403, anything else, no answer             | `RemoteFailed`         | 1    |
| a redirect (3xx): not followed                 | `RemoteFailed`         | 1    |

A redirect is never followed: the token goes to the `--server` given and nowhere else (another
origin's answer would be printed as the server's too), and a server on loopback is asked directly,
never through `HTTP(S)_PROXY` (the proxy's loopback is not ours). Only the standard library and
pcbo's core (`io/http_delivery.py`) are used: the remote CLI needs no `server` extra.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from pcbo_dagster.core.errors import Blocked, InvalidInput, PcboError
from pcbo_dagster.io.http_delivery import NoRedirect, deadline_opener
from pcbo_dagster.io.redaction import redact_url

TOKEN_VARIABLE = "PCBO_TOKEN"
#: How long the CLI waits for the server's answer (an execute runs while the request is open).
DEFAULT_TIMEOUT_SECONDS = 3600.0


class RemoteFailed(PcboError):
    """The server refused or failed the request (exit status 1); `document` is printed when there is one."""

    exit_status = 1

    def __init__(self, message: str, document: dict[str, Any] | None = None) -> None:
        self.document = document
        super().__init__(message)


def server_base_url(url: str) -> str:
    """`http(s)://host[:port][/prefix]` of `--server`, without a trailing slash."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):  # http.client would refuse it later
        raise InvalidInput("--server", f"{redact_url(url)!r} holds white space or control characters")
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("--server", f"must be an http(s) URL of a pcbo server, got {redact_url(url)!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise InvalidInput("--server", "give the token in PCBO_TOKEN, not in the URL")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise InvalidInput("--server", f"has an invalid port: {url!r}") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def bearer_token(environ: dict[str, str] | None = None) -> str:
    token = (os.environ if environ is None else environ).get(TOKEN_VARIABLE, "")
    if not token.strip():
        raise InvalidInput(TOKEN_VARIABLE, "set it to a token of the server (`pcbo token create` there)")
    if token != token.strip() or any(ord(c) < 33 or ord(c) > 126 for c in token):
        raise InvalidInput(TOKEN_VARIABLE, "has whitespace or characters a token never has")
    return token


_OPENER = deadline_opener(NoRedirect())  # (a 3xx is an `HTTPError`; a loopback server: never via a proxy)


def send_request(
    server: str, command: str, raw: bytes, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> dict[str, Any]:
    """POST the request bytes to `/v1/<command>` (plan, dry-run, execute) and return the document, or
    raise the error the answer stands for (module doc)."""
    base = server_base_url(server)
    token = bearer_token()
    request = urllib.request.Request(
        f"{base}/v1/{command}",
        data=raw,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return _json(response.read(), base)
    except urllib.error.HTTPError as answer:
        if 300 <= answer.code < 400:
            raise RemoteFailed(
                f"the server at {base} answered with a redirect (HTTP {answer.code}), which is not "
                "followed (the token goes nowhere else): give --server the URL of the pcbo server itself"
            ) from None
        body = answer.read()
        raise _error_of(answer.code, answer.headers, body, base) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RemoteFailed(f"cannot reach the pcbo server at {base}: {reason}") from None


def _json(body: bytes, base: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise RemoteFailed(f"the server at {base} did not answer with JSON") from None


def _error_of(status: int, headers: Any, body: bytes, base: str) -> PcboError:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return RemoteFailed(f"the server at {base} answered HTTP {status}")
    if status == 422 and document.get("error") == "invalid_input":
        return InvalidInput(str(document.get("field") or ""), str(document.get("message", "")))
    if status == 409 and document.get("status") == "blocked":
        return Blocked(headers.get("Pcbo-Message") or f"blocked by the {document.get('gate')} gate", document)
    if status in (401, 403):
        return RemoteFailed(
            f"the server at {base} refused the token (HTTP {status}): {document.get('message')}"
        )
    message = document.get("message") or (document.get("reconciliation") or {}).get("status")
    failed = document if "status" in document and "runId" in document else None
    return RemoteFailed(f"the server at {base} answered HTTP {status}: {message}", failed)

"""Secrets out of everything shown or stored: the one redaction of URLs, and of URLs inside free text.

`redact_url` is used wherever a source URI, lake URL, catalog URL or endpoint is logged, written into
the catalog, an audit event, an asset's metadata or an error message. It keeps what tells a reader
*where* (scheme, host, port, path) and removes what could be a credential:

- the whole userinfo (`user:password@`, and a user-only `token@`), even when the password holds `/`,
  `@`, `:`, `?` or `#`: the userinfo runs to the last `@` of the URL (so an `@` in a path or a query
  hides what comes before it too: a wrong host shown, never a secret);
- the query string and the fragment, replaced by a `?[redacted]` marker that shows one existed.

Local paths (no `scheme://`) are returned as they are. `scrub_text` applies the same rules to every
URL inside a text (driver errors, tracebacks, alert details), and to a `user:password@host` whose
scheme a client already cut off (botocore names the bucket of `s3://user:password@bucket/key` as
`user:password@bucket`), and removes any given secret strings. `terminal_text` escapes what a
terminal would act on rather than show (control characters, bidirectional overrides) in a line the
CLI prints: text it did not write (a server's answer, a file name) can then neither move the cursor,
retitle the window nor reorder what is shown.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[redacted]"

_SCHEME = re.compile(r"(?i)^([a-z][a-z0-9+.\-]*)://")
# scheme://userinfo@ and ?query / #fragment of URLs inside free text. A query that is already
# `?[redacted]` (e.g. in a `redact_url` result) is left as it is.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s'\"<>]+@")
# user:password@host without a scheme, at the start of a word (not a `scheme://` URL: that is the rule
# above); the password runs to the word's last `@`.
_BARE_USERINFO = re.compile(
    r"(?<![^\s'\"<>()\[\]{},;=])[^\s'\"<>()\[\]{},;=:/@]+:(?!//)[^\s'\"<>]*@(?=[^\s'\"<>@])"
)
# A C2SP / Go signed-note private key (`PRIVATE+KEY+<name>+<key id>+<base64 seed>`), given where a key
# file's path was expected (`PCBO_SIGNING_KEY="$(cat operator.key)"`): everything after its prefix.
_PRIVATE_KEY = re.compile(r"(?i)PRIVATE\+KEY\+[^\s'\"<>]*")
_URL_QUERY = re.compile(
    r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s?#'\"<>]*)[?#]"
    r"(?!\[redacted\][.,;:)\]]*(?:[\s#'\"<>]|$))"
    r"(?:[^\s'\"<>]*[^\s'\"<>.,;:)\]])?"
)


def redact_url(url: str) -> str:
    """`scheme://host[:port]/path` (plus `?[redacted]` when the URL had a query or fragment): no
    userinfo, no query, no fragment. A local path (no `scheme://`) is returned unchanged."""
    text = url.strip()
    match = _SCHEME.match(text)
    if match is None:
        return url
    rest = text[match.end() :]
    removed = ""
    at = rest.rfind("@")
    if at >= 0:  # everything before the last `@` may be the userinfo: a password may hold `?`, `#`, `/`
        removed, rest = rest[:at], rest[at + 1 :]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    # a query cut with what came before the `@` (`host/path?to=a@b`), not a password's `?`
    slash = removed.find("/")
    had_query = cut < len(rest) or (slash >= 0 and any(c in removed[slash:] for c in "?#"))
    return f"{match.group(1)}://{rest[:cut]}" + (f"?{REDACTED}" if had_query else "")


def has_userinfo(url: str) -> bool:
    """True when the `scheme://` URL carries a userinfo (a user, password or token before an `@`): an
    `@` in its authority (what precedes the first `/`, `?` or `#`), or a `user:password` authority
    that an `@` follows (a password holding `/`, `?` or `#`; a `host:port` is not one). A local path
    has none; an `@` further on (`s3://bucket/a@b`) is not one."""
    text = url.strip()
    match = _SCHEME.match(text)
    if match is None:
        return False
    rest = text[match.end() :]
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority = rest[:end]
    _, colon, after = authority.partition(":")
    return "@" in authority or (bool(colon) and not after.isdigit() and "@" in rest[end:])


def has_query(url: str) -> bool:
    """True when the `scheme://` URL has a query string or a fragment (what `redact_url` cuts after
    its path; a password's `?` or `#` is not one). A local path has none."""
    return redact_url(url).endswith(f"?{REDACTED}")


def userinfo_refused(url: str) -> str:
    """Why an object-store URL with a userinfo (`has_userinfo`) is invalid input, the URL redacted."""
    return (
        f"{redact_url(url)}: credentials in a URL are refused (no secret belongs in a request, a file "
        "or a URL): object stores take them from the environment (AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...)"
    )


def scrub_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without URL userinfo, query strings and fragments (`scheme://[redacted]@host/path?
    [redacted]`), without a signed-note private key (`PRIVATE+KEY+[redacted]`) and without any of
    `secrets`. For free text that goes into a report, an alert, an
    error message or a log."""
    for secret in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _PRIVATE_KEY.sub(f"PRIVATE+KEY+{REDACTED}", text)
    text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _BARE_USERINFO.sub(f"{REDACTED}@", text)
    return _URL_QUERY.sub(rf"\1?{REDACTED}", text)


#: Characters a terminal acts on rather than shows: C0 (but tab and newline) and DEL, C1, and the
#: bidirectional marks, embeddings, overrides and isolates (U+061C, U+200E-F, U+202A-E, U+2066-9).
_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_text(text: str) -> str:
    """`text` with every character a terminal would act on (`_TERMINAL_CONTROLS`) shown escaped
    (`\\x1b`, `\\u202e`): for a line printed to a terminal that holds text pcbo did not write."""
    return _TERMINAL_CONTROLS.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text
    )


def quoted_answer(text: str, limit: int = 300) -> str:
    """What a server answered (a refusal's body), for an error message or a log line: scrubbed
    (`scrub_text`), on one line (every run of white space, line breaks included, one space), cut to
    `limit` characters, with what a terminal acts on shown escaped (`terminal_text`): a hostile server
    writes no line of its own into a log."""
    return terminal_text(" ".join(scrub_text(text).split())[:limit])


def scrub_json(value: Any, secrets: Iterable[str] = ()) -> Any:
    """`value` (plain JSON: objects, lists, text, numbers) with every text in it, keys included,
    through `scrub_text` (with `secrets`): for a document that goes into an alert, a report or a log
    as it is."""
    secrets = tuple(secrets)
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, dict):
        return {scrub_text(str(k), secrets): scrub_json(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_json(v, secrets) for v in value]
    return value


#: The modules whose errors are a store's, passed on by fsspec and SQLAlchemy as they are (not as an
#: `OSError`): SQLAlchemy's; botocore's (an S3 endpoint that does not answer, missing credentials, a
#: bucket name it refuses, a `ClientError` s3fs did not translate); gcsfs's, aiohttp's, Google auth's.
_DATABASE_CLIENTS = ("sqlalchemy.",)
_OBJECT_STORE_CLIENTS = (
    "botocore.",
    "aiobotocore.",
    "s3fs.",
    "gcsfs.",
    "aiohttp.",
    "google.auth.",
    "google.api_core.",
)


def quiet_store_client_logs() -> None:
    """Drop what the object store clients log. gcsfs logs every request that ran out of retries with
    its traceback (and warnings) and nobody configures their loggers, so Python's last-resort handler
    printed it all on stderr, before the CLI's one line for the failure itself. For the CLI
    (`PCBO_DEBUG` keeps them, with the traceback)."""
    for module in _OBJECT_STORE_CLIENTS:
        logger = logging.getLogger(module.rstrip("."))
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())
        logger.propagate = False


def _raised_by(exc: BaseException, modules: tuple[str, ...]) -> bool:
    """`exc` is of a class (or subclass of one) defined in one of `modules` (by name: none imported)."""
    return any(f"{kind.__module__}.".startswith(modules) for kind in type(exc).__mro__)


def is_store_error(exc: BaseException) -> bool:
    """A store failed, not pcbo: an `OSError` (a full disk, a read-only lake, a server that went away),
    a database error or an object store client's own error. The CLI prints `one_line_error` and exits
    1, the HTTP API answers 500 `failed` with it, a source that fails so is invalid input."""
    return isinstance(exc, OSError) or _raised_by(exc, _DATABASE_CLIENTS + _OBJECT_STORE_CLIENTS)


def one_line_error(exc: BaseException) -> str:
    """An I/O or database error as one line without secrets (a full disk, a read-only lake, a locked
    catalog, a server that went away): what the CLI prints and the HTTP API answers. An object store
    client's error is named by its class, its message on one line."""
    strerror = getattr(exc, "strerror", None)
    if isinstance(exc, OSError) and strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{strerror}{where}"
    elif not isinstance(exc, OSError) and _raised_by(exc, _OBJECT_STORE_CLIENTS):
        text = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    else:
        text = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
    return scrub_text(text)

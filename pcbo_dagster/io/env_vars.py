"""Settings read from environment variables: whole numbers and the like, with errors naming the variable."""

from __future__ import annotations

import os
from typing import overload

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.recorded_text import has_control_character
from pcbo_dagster.io.redaction import scrub_text


def positive_int(variable: str, text: str | None, default: int) -> int:
    """A whole-number setting of at least 1 from its variable's text; unset or blank: `default`.
    Anything else is `InvalidInput` naming the variable."""
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(variable, f"must be a positive integer, not {text!r}") from None
    if value < 1:
        raise InvalidInput(variable, f"must be at least 1, not {value}")
    return value


def positive_number(variable: str, text: str | None, default: float, most: float = 86_400.0) -> float:
    """A number of (say) seconds above 0 and at most `most` from its variable's text; unset or blank:
    `default`. Anything else (not a number, NaN, infinite, 0 or less, too large) is `InvalidInput`."""
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(variable, f"must be a number, not {text!r}") from None
    if not 0 < value <= most:  # NaN fails this too
        raise InvalidInput(variable, f"must be above 0 and at most {most:g}, not {text!r}")
    return value


@overload
def plain_path(name: str, text: str) -> str: ...
@overload
def plain_path(name: str, text: None) -> None: ...
@overload
def plain_path(name: str, text: str | None) -> str | None: ...
def plain_path(name: str, text: str | None) -> str | None:
    """`text` (a path or URL given by flag or variable `name`) when it has no leading or trailing
    whitespace and no control characters: a path that ends in a newline (pasted, or from a file read
    without stripping) would otherwise name a different directory, and an empty one (`Path("")` is
    `.`) the current directory. It must be UTF-8 (a path pcbo records goes into audit events and JSON
    documents). None stays None."""
    if text is None:
        return None
    if text != text.strip() or has_control_character(text):
        # shown without the userinfo or query of a URL (a catalog or endpoint URL may hold a password)
        raise InvalidInput(name, f"{scrub_text(repr(text))} has surrounding whitespace or control characters")
    if not text:
        raise InvalidInput(name, "is empty")
    try:  # bytes that are not UTF-8 (held as lone surrogates) reach no audit event or document
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(name, f"{scrub_text(repr(text))} is not UTF-8 text") from None
    return text


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def flag(variable: str, text: str | None, default: bool = False) -> bool:
    """A yes/no setting: `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off` (any case); unset or blank:
    `default`. Anything else is `InvalidInput` naming the variable."""
    if text is None or not text.strip():
        return default
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidInput(variable, f"must be true or false, not {text!r}")


def lease_wait_seconds() -> float:
    """`PCBO_LEASE_WAIT_SECONDS` (default 600): how long a run waits for what another holds (the
    dataset's lock file and lease, a SQL target's scope, a catalog chain's writer lock)."""
    return positive_number("PCBO_LEASE_WAIT_SECONDS", os.environ.get("PCBO_LEASE_WAIT_SECONDS"), 600.0)

"""Text a person types that pcbo records as given: who does a step (`--by` of the rollout commands,
the Dagster jobs' `by`) and why (the `reason` of a rollback, a rollout's pause, resume or cancel);
and the one test of the paths, URLs and locations it takes for control characters
(`has_control_character`: a request's `source.uri`, the path flags and variables, a SQL target URL),
and of a listed file name for bytes that are not UTF-8 (`is_utf8`, `utf8_shown`).

It lands on the production audit chain or in the catalog and is shown in logs, the Dagster UI,
reports and alert receivers: a line break, a terminal escape or a bidirectional override in it would
forge a line (or text) of its own there. So it must be one printable line (`str.isprintable`: no
control, format or separator character but the plain space). (An approval's reason is part of a
signed statement, whose note format allows several lines: `core/signed_approvals.py`.)
"""

from __future__ import annotations

from pcbo_dagster.core.errors import InvalidInput

_CONTROL = "a line break, a tab, an escape or a direction override"


def has_control_character(text: str) -> bool:
    """Whether `text` holds a C0 control character or DEL (U+0000-U+001F, U+007F): what no path, URL
    or location pcbo takes may hold (a NUL names no file, a pasted newline another one)."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def is_utf8(text: str) -> bool:
    """Whether `text` is UTF-8 text: a name a local file system lists may hold bytes that are not
    (Python keeps them as lone surrogates), which no JSON document, audit event or catalog row holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_shown(text: str) -> str:
    """`text` with the bytes of it that are not UTF-8 (lone surrogates) escaped: `part-\\xff.jsonl`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_actor(by: object, doing: str) -> None:
    """`InvalidInput` naming `by` unless `by` is text naming who is `doing` the step (not blank) on one
    printable line."""
    if not isinstance(by, str) or not by.strip():
        raise InvalidInput("by", f"say who {doing} (a name or an e-mail address)")
    if not by.isprintable():
        raise InvalidInput(
            "by",
            f"{by!r} holds a control character ({_CONTROL}): it is recorded and shown as given; "
            "give a name or an e-mail address",
        )


def check_reason(reason: object, field: str = "reason") -> None:
    """`InvalidInput` naming `field` when the reason given (None: none) is not one printable line."""
    if isinstance(reason, str) and not reason.isprintable():
        raise InvalidInput(
            field,
            f"{reason!r} holds a control character ({_CONTROL}): it is recorded and shown as given; "
            "give the reason on one line",
        )

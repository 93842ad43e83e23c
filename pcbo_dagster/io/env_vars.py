"""Settings read from environment variables: whole numbers and the like, with errors naming the variable."""

from __future__ import annotations

from pcbo_dagster.core.errors import InvalidInput


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

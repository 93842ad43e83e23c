"""The JSON encodings pcbo writes, other than RFC 8785 (`canonical`, for digests).

- `sorted_document`: sorted keys, two-space indents, non-ASCII characters as they are, a final
  newline, UTF-8. Partition and rollback manifests (hashed: the bytes must never change), rollout and
  health reports, health plans: the same content always gives the same bytes.
- `compact_text`: sorted keys, no whitespace, no NaN or infinities. JSON held in catalog columns (and
  the key of a partition's PostgreSQL advisory lock), alert webhook bodies, demo JSONL lines.
- `streamed_text`: the command documents (`pcbo ... --output`), keys in the order given, two-space
  indents, written in pieces as a generator is iterated (a dry-run of millions of ids).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def sorted_text(value: Any) -> str:
    """`value` with sorted keys, two-space indents, non-ASCII as is (no final newline)."""
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False)


def sorted_document(value: Any) -> bytes:
    """`sorted_text` and a final newline, as UTF-8: the bytes of manifests, reports and plans."""
    return (sorted_text(value) + "\n").encode("utf-8")


def compact_text(value: Any) -> str:
    """`value` with sorted keys and no whitespace; ValueError for NaN or an infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def streamed_text(value: Any, level: int = 0) -> Iterator[str]:
    """The text `json.dumps(value, indent=2, ensure_ascii=False)` gives, in pieces, where any
    iterable that is not a str, list, tuple or dict (a generator) is written as a list as it is
    iterated: a dry-run listing millions of ids never exists whole in memory."""
    if isinstance(value, dict):
        items: Iterator[tuple[str, Any]] = iter(value.items())
        open_, close = "{", "}"
    elif isinstance(value, list | tuple) or (
        not isinstance(value, str | bytes | int | float | bool | type(None)) and hasattr(value, "__iter__")
    ):
        items = ((None, v) for v in value)  # type: ignore[misc]
        open_, close = "[", "]"
    else:
        yield json.dumps(value, ensure_ascii=False)
        return
    inner = "\n" + "  " * (level + 1)
    first = True
    for key, item in items:
        yield (open_ if first else ",") + inner
        first = False
        if key is not None:
            yield json.dumps(key, ensure_ascii=False) + ": "
        yield from streamed_text(item, level + 1)
    yield open_ + close if first else "\n" + "  " * level + close

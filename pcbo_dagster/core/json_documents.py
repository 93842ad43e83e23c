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

import orjson


def sorted_text(value: Any) -> str:
    """`value` with sorted keys, two-space indents, non-ASCII as is (no final newline)."""
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False)


def sorted_document(value: Any) -> bytes:
    """`sorted_text` and a final newline, as UTF-8: the bytes of manifests, reports and plans.

    Documents of strings, integers within 64 bits, booleans, nulls, lists and string-keyed objects
    (manifests: no floats) are written by orjson, whose indented sorted output is byte for byte
    `json.dumps(..., sort_keys=True, indent=2, ensure_ascii=False)` for them (a property test holds
    the two equal); anything else goes through `json`."""
    fast = _by_orjson(value, orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    return fast + b"\n" if fast is not None else (sorted_text(value) + "\n").encode("utf-8")


def _by_orjson(value: Any, option: int) -> bytes | None:
    """orjson's bytes of a `is_plain_json` value, which for such values are byte for byte `json.dumps`'s
    with the matching arguments (issue 18: property tests hold each use equal to `json`); None when
    `value` is not plain or orjson refuses it (a lone surrogate): the caller takes `json`'s way."""
    if not is_plain_json(value):
        return None
    try:
        return orjson.dumps(value, option=option)
    except (orjson.JSONEncodeError, TypeError):
        return None


def is_plain_json(value: Any, low: int = -(2**63), high: int = 2**64 - 1) -> bool:
    """True when `value` holds only exact str, bool, None, list, str-keyed dict and int within
    [`low`, `high`] (by default what orjson writes: 64 bits). False for anything else: a float, a
    subclass, an int out of range, a non-string key.

    Issue 18: every audit event, catalog row and manifest is walked here, several times each; the
    walk judges each member where its container is read (scalars are never pushed on the stack) and
    checks keys in a plain loop (no generator per object). A property test holds it equal to the
    one-item-at-a-time walk it replaced."""
    kind = type(value)
    if kind is not dict and kind is not list:
        if kind is str or kind is bool or value is None:
            return True
        return kind is int and low <= value <= high
    stack = [value]
    pop, push = stack.pop, stack.append
    while stack:
        container = pop()
        if type(container) is dict:
            for key in container:
                if type(key) is not str:
                    return False
            members = container.values()
        else:
            members = container
        for item in members:
            kind = type(item)
            if kind is str or kind is bool or item is None:
                continue
            if kind is int:
                if not low <= item <= high:
                    return False
            elif kind is dict or kind is list:
                push(item)
            else:
                return False
    return True


def compact_text(value: Any) -> str:
    """`value` with sorted keys and no whitespace; ValueError for NaN or an infinity. Plain values
    (`is_plain_json`: audit events, catalog rows) are written by orjson, byte for byte `json.dumps`'s text
    for them (a property test holds the two equal)."""
    fast = _by_orjson(value, orjson.OPT_SORT_KEYS)
    if fast is not None:
        return fast.decode("utf-8")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def streamed_text(value: Any, level: int = 0) -> Iterator[str]:
    """The text `json.dumps(value, indent=2, ensure_ascii=False)` gives, in pieces, where any
    iterable that is not a str, list, tuple or dict (a generator) is written as a list as it is
    iterated: a dry-run listing millions of ids never exists whole in memory.

    A list or object holding only what `is_plain_json` allows is written in one piece by orjson, whose
    indented output is byte for byte `json.dumps(..., indent=2, ensure_ascii=False)`'s for such values
    (issue 18: a property test holds the two equal), indented to `level`."""
    fast = _by_orjson(value, orjson.OPT_INDENT_2) if type(value) in (dict, list) else None
    if fast is not None:
        # Line breaks in orjson's output are its indentation only (strings escape theirs).
        text = fast.decode("utf-8")
        yield text.replace("\n", "\n" + "  " * level) if level else text
        return
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

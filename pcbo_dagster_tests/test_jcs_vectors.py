"""RFC 8785 (JCS) canonicalization against the cyberphone vectors (`vectors/jcs`), and `fast_jcs`
against `rfc8785`.

The vector outputs are the exact expected bytes (no trailing newline); inputs are parsed with `json`.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from pcbo_dagster.core.canonical import digest_of, fast_jcs, jcs, sha256_hex
from pcbo_dagster_tests.conftest import VECTORS_DIR


def _jcs_files() -> list[str]:
    return sorted(p.name for p in (VECTORS_DIR / "jcs" / "input").glob("*.json"))


JCS_FILES = _jcs_files()


def test_jcs_vector_set_is_paired() -> None:
    inputs = sorted(p.name for p in (VECTORS_DIR / "jcs" / "input").iterdir())
    outputs = sorted(p.name for p in (VECTORS_DIR / "jcs" / "output").iterdir())
    assert inputs == outputs == JCS_FILES
    assert len(JCS_FILES) >= 6


@pytest.mark.parametrize("name", JCS_FILES)
def test_jcs_vector(name: str) -> None:
    source = (VECTORS_DIR / "jcs" / "input" / name).read_bytes()
    expected = (VECTORS_DIR / "jcs" / "output" / name).read_bytes()
    value = json.loads(source)
    out = jcs(value)
    assert out == expected
    # canonical form is a fixed point and the digest is over exactly those bytes
    assert jcs(json.loads(expected)) == expected
    assert digest_of(value) == "sha256:" + sha256_hex(expected)


# --- fast_jcs == rfc8785 ---------------------------------------------------------------------------------

MAX_SAFE = 2**53 - 1

# any Unicode that is valid UTF-8: everything but surrogate code points
unicode_text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]))
# ASCII including control characters, quotes and backslashes: the `json.dumps` fast path proper
ascii_text = st.text(alphabet=st.characters(max_codepoint=0x7F))


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers(min_value=-MAX_SAFE, max_value=MAX_SAFE) | text
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=6) | st.dictionaries(text, children, max_size=6),
        max_leaves=30,
    )


@settings(max_examples=500, deadline=None)
@given(json_values(unicode_text))
def test_fast_jcs_equals_rfc8785_unicode(value: Any) -> None:
    assert fast_jcs(value) == rfc8785.dumps(value)


@settings(max_examples=500, deadline=None)
@given(json_values(ascii_text))
def test_fast_jcs_equals_rfc8785_ascii(value: Any) -> None:
    assert fast_jcs(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -0,
        MAX_SAFE,
        -MAX_SAFE,
        "",
        '\x00\x08\t\n\x0b\x0c\r\x1f\x7f"\\/',
        {"b": 1, "a": [2, {"d": None, "c": "x"}], "": {}},
        {"\u20ac": 1, "\U0001f602": 2, "\ufb33": 3, "\u00f6": 4, "a": 5},
        ["\ud7ff", "\ue000", "\U0010ffff"],
    ],
)
def test_fast_jcs_examples(value: Any) -> None:
    assert fast_jcs(value) == rfc8785.dumps(value)

"""The JSON encodings of `core.json_documents` write exactly the bytes they always have: manifests are
hashed (their checksums are in audit events and the catalog), so one changed byte would make every
committed partition look tampered with; the command documents (`streamed_text`) are held to
`json.dumps`'s text, here and in test_decision_spill.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.core.json_documents import (
    compact_text,
    is_plain_json,
    sorted_document,
    sorted_text,
    streamed_text,
)
from pcbo_dagster.lake import manifests
from pcbo_dagster.rollout.reports import write_report

MANIFEST: dict[str, Any] = {
    "kind": "pcbo.manifest/1",
    "dataset": "events",
    "versionLabel": "v1",
    "runId": "retro-run-001",
    "partition": {
        "index": 0,
        "key": "20240101T000000Z",
        "start": "2024-01-01T00:00:00Z",
        "end": "2024-01-01T01:00:00Z",
    },
    "partitionVersion": 2,
    "previousVersion": 1,
    "previousManifestChecksum": "sha256:" + "ab" * 32,
    "planHash": "sha256:" + "01" * 32,
    "decisionHash": "sha256:" + "02" * 32,
    "policies": {
        "requireConsent": True,
        "allowedJurisdictions": ["CA", "US"],
        "retentionCutoff": None,
        "onViolation": "omit",
    },
    "files": [
        {
            "path": "events/v1/20240101T000000Z/part-0123456789ab.parquet",
            "checksum": "sha256:" + "cd" * 32,
            "rowCount": 3,
            "byteSize": 1234,
        }
    ],
    "recordCount": 3,
    "merkleRoot": "sha256:" + "ef" * 32,
    "counts": {"source": 5, "add": 3, "omit": 2, "byReason": {"CONSENT_MISSING": 1, "DUPLICATE_ID": 1}},
    "schema": [
        {"name": "id", "type": "string"},
        {"name": "note \u00fcn\u00efc\u00f6d\u00e9", "type": "string"},
        {"name": "empty", "type": "null"},
    ],
    "writer": {"format": "parquet", "compression": "zstd", "nested": {}, "list": []},
}

#: The bytes `lake.manifests.encode` gave for MANIFEST before the encoders had one home (and its checksum).
MANIFEST_BYTES = (
    '{\n  "counts": {\n    "add": 3,\n    "byReason": {\n      "CONSENT_MISSING": 1,\n'
    '      "DUPLICATE_ID": 1\n    },\n    "omit": 2,\n    "source": 5\n  },\n  "dataset": "events",\n'
    '  "decisionHash": "sha256:0202020202020202020202020202020202020202020202020202020202020202",\n'
    '  "files": [\n    {\n      "byteSize": 1234,\n'
    '      "checksum": "sha256:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",\n'
    '      "path": "events/v1/20240101T000000Z/part-0123456789ab.parquet",\n      "rowCount": 3\n'
    '    }\n  ],\n  "kind": "pcbo.manifest/1",\n'
    '  "merkleRoot": "sha256:efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef",\n'
    '  "partition": {\n    "end": "2024-01-01T01:00:00Z",\n    "index": 0,\n'
    '    "key": "20240101T000000Z",\n    "start": "2024-01-01T00:00:00Z"\n  },\n'
    '  "partitionVersion": 2,\n'
    '  "planHash": "sha256:0101010101010101010101010101010101010101010101010101010101010101",\n'
    '  "policies": {\n    "allowedJurisdictions": [\n      "CA",\n      "US"\n    ],\n'
    '    "onViolation": "omit",\n    "requireConsent": true,\n    "retentionCutoff": null\n  },\n'
    '  "previousManifestChecksum": '
    '"sha256:abababababababababababababababababababababababababababababababab",\n'
    '  "previousVersion": 1,\n  "recordCount": 3,\n  "runId": "retro-run-001",\n  "schema": [\n'
    '    {\n      "name": "id",\n      "type": "string"\n    },\n'
    '    {\n      "name": "note \u00fcn\u00efc\u00f6d\u00e9",\n      "type": "string"\n    },\n'
    '    {\n      "name": "empty",\n      "type": "null"\n    }\n  ],\n  "versionLabel": "v1",\n'
    '  "writer": {\n    "compression": "zstd",\n    "format": "parquet",\n    "list": [],\n'
    '    "nested": {}\n  }\n}\n'
).encode("utf-8")
MANIFEST_SHA256 = "5785a7b00b60178a6cc548e18e4fa72c32e6878953ac43d76a528e05e42b0e94"


def test_a_manifest_encodes_to_the_same_bytes_as_before() -> None:
    assert hashlib.sha256(MANIFEST_BYTES).hexdigest() == MANIFEST_SHA256
    assert manifests.encode(MANIFEST) == MANIFEST_BYTES
    assert manifests.checksum(manifests.encode(MANIFEST)) == "sha256:" + MANIFEST_SHA256
    assert manifests.decode(MANIFEST_BYTES) == MANIFEST


def test_reports_and_plans_are_written_as_manifests_are(tmp_path: Path) -> None:
    paths = write_report(tmp_path, "summary", MANIFEST, "# summary\n")
    assert Path(paths["json"]).read_bytes() == sorted_document(MANIFEST) == MANIFEST_BYTES
    assert sorted_text(MANIFEST) + "\n" == MANIFEST_BYTES.decode("utf-8")


def test_compact_text_is_sorted_and_has_no_whitespace() -> None:
    value = {"b": [1, {"d": None, "c": "\u00e9"}], "a": True}
    assert compact_text(value) == '{"a":true,"b":[1,{"c":"\u00e9","d":null}]}'
    with pytest.raises(ValueError):
        compact_text({"x": float("nan")})


# -- the orjson fast path of sorted_document writes json.dumps's bytes (issue 18) ----------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.text()
_documents = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(_documents)
def test_sorted_document_is_json_dumps_bytes(value) -> None:
    try:
        expected = (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: no document holds them (requests refuse them)
        return
    try:
        assert sorted_document(value) == expected
    except UnicodeEncodeError:
        return


def test_sorted_document_with_floats_or_big_integers_goes_through_json() -> None:
    for value in ({"a": 1e16, "b": [0.1]}, {"n": 2**70}, {"t": (1, 2)}):
        expected = (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
        assert sorted_document(value) == expected


@settings(max_examples=400, deadline=None)
@given(_documents | st.floats(allow_nan=False, allow_infinity=False) | st.lists(st.floats(allow_nan=False)))
def test_streamed_text_is_json_dumps_text(value) -> None:
    """`streamed_text` writes a plain list or object in one piece by orjson (issue 18), also nested
    under a generator (indented to its level), and anything else (floats, generators) piece by piece:
    the text is `json.dumps(..., indent=2, ensure_ascii=False)`'s either way."""
    assert "".join(streamed_text(value)) == json.dumps(value, indent=2, ensure_ascii=False)
    lazy = {"lazy": (item for item in [value, {"deeper": [value]}]), "value": value}
    expected = {"lazy": [value, {"deeper": [value]}], "value": value}
    assert "".join(streamed_text(lazy)) == json.dumps(expected, indent=2, ensure_ascii=False)


@settings(max_examples=400, deadline=None)
@given(_documents | st.dictionaries(st.text(), st.floats(allow_nan=False, allow_infinity=False)))
def test_compact_text_is_json_dumps_text(value) -> None:
    """Plain values go through orjson (issue 18), others through json: the text is the same."""
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert compact_text(value) == expected


# -- is_plain_json judges every member where its container is read (issue 18) ----------------------


def _plain_one_at_a_time(value: Any, low: int, high: int) -> bool:
    """The walk `is_plain_json` replaced: every item pushed and judged on its own."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if not low <= item <= high:
                return False
        elif kind is dict:
            if any(type(k) is not str for k in item):
                return False
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        else:
            return False
    return True


class _Text(str):
    pass


class _Number(int):
    pass


_odd_scalars = (
    _scalars
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.builds(_Text, st.text(max_size=3))
    | st.builds(_Number, st.integers())
    | st.tuples(st.integers())
    | st.binary(max_size=3)
)
_odd_documents = st.recursive(
    _odd_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=3) | st.integers() | st.builds(_Text, st.text(max_size=3)), inner, max_size=4
        )
    ),
    max_leaves=25,
)


@settings(max_examples=600, deadline=None)
@given(_odd_documents, st.sampled_from([(-(2**63), 2**64 - 1), (-(2**53 - 1), 2**53 - 1), (0, 10)]))
def test_is_plain_json_judges_as_the_item_by_item_walk(value: Any, bounds: tuple[int, int]) -> None:
    """Floats, subclasses, tuples, bytes, non-string (or subclassed) keys and integers out of range,
    at the top or nested anywhere, are refused exactly as by the walk it replaced; the rest accepted."""
    low, high = bounds
    assert is_plain_json(value, low, high) is _plain_one_at_a_time(value, low, high)
    assert is_plain_json([value], low, high) is _plain_one_at_a_time([value], low, high)
    assert is_plain_json({"k": value}, low, high) is _plain_one_at_a_time({"k": value}, low, high)


def test_is_plain_json_refuses_what_orjson_would_write_differently() -> None:
    refused: tuple[Any, ...] = (
        1.0,
        [1, 2.5],
        {"a": {"b": [_Text("x")]}},
        {1: "a"},
        {"a": (1,)},
        [2**64],
        {"a": [[-(2**63) - 1]]},
    )
    for value in refused:
        assert is_plain_json(value) is False, value
    accepted: tuple[Any, ...] = ("x", None, True, 2**64 - 1, -(2**63), [], {}, {"a": [None, {"b": [1, "c"]}]})
    for value in accepted:
        assert is_plain_json(value) is True, value
    assert is_plain_json([2**53], -(2**53 - 1), 2**53 - 1) is False

"""Partition manifests (the commit point) and rollback manifests.

Both are JSON with sorted keys, two-space indents and a final newline: deterministic bytes, so the
manifest of the same content is byte-identical on every run. Paths inside are relative to the lake.
"""

from __future__ import annotations

import json
from typing import Any, NotRequired, TypedDict, cast

from pcbo_dagster.core.canonical import prefixed, sha256_hex
from pcbo_dagster.core.json_documents import sorted_document
from pcbo_dagster.core.plan import PartitionWindow
from pcbo_dagster.core.request_model import nested_deeper_than
from pcbo_dagster.lake import layout

MANIFEST_KIND = "pcbo.manifest/1"
ROLLBACK_KIND = "pcbo.rollback/1"


class FileEntry(TypedDict):
    """One data file a manifest commits (`path` relative to the lake)."""

    path: str
    checksum: str
    rowCount: int
    byteSize: int


class Manifest(TypedDict):
    """A partition version's manifest: `_versions/vNNNNNN.json`, and the commit point `_manifest.json`."""

    kind: str
    dataset: str
    versionLabel: str
    runId: str
    partition: PartitionWindow
    partitionVersion: int
    previousVersion: int | None
    previousManifestChecksum: str | None
    planHash: str
    decisionHash: str
    policies: dict[str, Any]
    files: list[FileEntry]
    recordCount: int
    merkleRoot: str
    counts: dict[str, Any]
    schema: list[dict[str, str]]
    writer: dict[str, Any]
    #: Ledgers of the partition's range its (ledger archive) source did not hold, as [first, last]
    #: runs; present only when the request allowed gaps and there were some.
    gaps: NotRequired[list[list[int]]]
    #: `{sequence, hash}` of the ledger the request trusted (`source.trustedLedger`), in the partition
    #: holding it: the run checked that its ledgers link to that hash.
    trustedLedger: NotRequired[dict[str, Any]]


class RollbackManifest(TypedDict):
    """How to undo a version: `_rollback/vNNNNNN.json` (what the audit chain implies, checked by
    `verify` and by `rollback` before it is used)."""

    kind: str
    dataset: str
    versionLabel: str
    partitionKey: str
    undoesVersion: int
    undoesManifestChecksum: str
    restoreVersion: int | None
    restoreManifest: str | None
    removeFiles: list[str]


def encode(document: Manifest | RollbackManifest | dict[str, Any]) -> bytes:
    """The manifest's bytes (`sorted_document`; they are hashed, so they never change)."""
    return sorted_document(document)


#: Arrays and objects nest at most this deep in a manifest (pcbo's nest 4 levels).
MAX_DEPTH = 32


def decode(data: bytes) -> dict[str, Any]:
    """Any manifest's JSON (`ValueError` when it is not JSON, or nests deeper than `MAX_DEPTH`: the
    lake is anyone's to write, and the parser recurses); see `decode_manifest`."""
    if nested_deeper_than(data.encode("utf-8") if isinstance(data, str) else data, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels: not a pcbo manifest")
    return json.loads(data)


def rollback_manifest_agrees(
    data: bytes | None,
    dataset: str,
    version_label: str,
    key: str,
    version: int,
    manifest_checksum: str,
    restore_version: int | None,
    remove_files: list[str],
) -> bool:
    """Whether `data` (a `_rollback/vNNNNNN.json`'s bytes; None: there is none) says what the chain
    implies: the version it undoes and that version's manifest checksum, the version it restores (and
    its manifest) and the files it removes. The one check of `verify` and `rollback`."""
    expected = {
        "undoesVersion": version,
        "undoesManifestChecksum": manifest_checksum,
        "restoreVersion": restore_version,
        "restoreManifest": None
        if restore_version is None
        else layout.version_manifest(dataset, version_label, key, restore_version),
        "removeFiles": remove_files,
    }
    try:
        plan = decode(data) if data is not None else None
    except ValueError:
        plan = None
    return isinstance(plan, dict) and all(plan.get(k) == v for k, v in expected.items())


def files_problem(manifest: Any) -> str | None:
    """Why `manifest` (decoded JSON, read from a lake anyone may have written) names no data files the
    way a pcbo manifest does: `files` a list of objects, each with a string `path` (distinct), a
    `sha256:` string `checksum`, and `byteSize` and `rowCount` non-negative integers. None when it
    does (the paths are confined to the partition where they are used: `layout.data_file_path`)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        return "its files are not a list"
    paths: set[str] = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            return f"files[{i}] is not an object"
        path, checksum_ = entry.get("path"), entry.get("checksum")
        if not isinstance(path, str) or path in paths:
            return f"files[{i}].path is not a string naming another file than the entries before it"
        paths.add(path)
        if not isinstance(checksum_, str) or not checksum_.startswith("sha256:"):
            return f"files[{i}].checksum is not a sha256: string"
        for field in ("byteSize", "rowCount"):
            value = entry.get(field)
            if type(value) is not int or value < 0:
                return f"files[{i}].{field} is not a non-negative integer"
    return None


def decode_manifest(data: bytes) -> Manifest:
    """A partition version's manifest (its shape is checked where it is compared with the chain:
    `engine/crash_windows.py`)."""
    return cast(Manifest, json.loads(data))


def checksum(data: bytes) -> str:
    return prefixed(sha256_hex(data))


def same_content(a: Manifest, b: Manifest) -> bool:
    """Two manifests commit the same content: same files (by checksum) and the same Merkle root."""

    def files(m: Manifest) -> list[tuple[str, str]]:
        return sorted((f["path"], f["checksum"]) for f in m.get("files", []))

    return files(a) == files(b) and a.get("merkleRoot") == b.get("merkleRoot")

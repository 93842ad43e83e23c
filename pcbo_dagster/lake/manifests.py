"""Partition manifests (the commit point) and rollback manifests.

Both are JSON with sorted keys, two-space indents and a final newline: deterministic bytes, so the
manifest of the same content is byte-identical on every run. Paths inside are relative to the lake.
"""

from __future__ import annotations

import json
from typing import Any

from pcbo_dagster.core.canonical import prefixed, sha256_hex
from pcbo_dagster.core.json_documents import sorted_document

MANIFEST_KIND = "pcbo.manifest/1"
ROLLBACK_KIND = "pcbo.rollback/1"


def encode(document: dict[str, Any]) -> bytes:
    """The manifest's bytes (`sorted_document`; they are hashed, so they never change)."""
    return sorted_document(document)


def decode(data: bytes) -> dict[str, Any]:
    return json.loads(data)


def checksum(data: bytes) -> str:
    return prefixed(sha256_hex(data))


def same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two manifests commit the same content: same files (by checksum) and the same Merkle root."""

    def files(m: dict[str, Any]) -> list[tuple[str, str]]:
        return sorted((f["path"], f["checksum"]) for f in m.get("files", []))

    return files(a) == files(b) and a.get("merkleRoot") == b.get("merkleRoot")

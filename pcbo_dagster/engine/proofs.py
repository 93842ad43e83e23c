"""Inclusion and consistency proofs of committed partitions, and their offline verification."""

from __future__ import annotations

import bisect
from typing import Any

from pcbo_dagster.core import merkle
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.partition_keys import PartitionKeyError, validate_partition_key
from pcbo_dagster.core.record_table import ID
from pcbo_dagster.lake import layout, manifests, parquet_files
from pcbo_dagster.lake.storage import LakeStorage

INCLUSION_KIND = "pcbo.inclusion-proof/1"
CONSISTENCY_KIND = "pcbo.consistency-proof/1"


def _hex(digest: bytes) -> str:
    return "sha256:" + digest.hex()


def _unhex(value: object, field: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("sha256:"):
        raise InvalidInput(field, "must be a sha256:<64 hex> digest")
    try:
        raw = bytes.fromhex(value[len("sha256:") :])
    except ValueError:
        raise InvalidInput(field, "must be a sha256:<64 hex> digest") from None
    if len(raw) != 32:
        raise InvalidInput(field, "must be a sha256:<64 hex> digest")
    return raw


def _manifest(lake: LakeStorage, dataset: str, version_label: str, key: str, version: int | None) -> dict:
    try:
        validate_partition_key(key)  # it names a lake directory: nothing but a key gets near a path
    except PartitionKeyError as exc:
        raise InvalidInput("partition", str(exc)) from None
    rel = (
        layout.manifest(dataset, version_label, key)
        if version is None
        else layout.version_manifest(dataset, version_label, key, version)
    )
    if not lake.exists(rel):
        what = "committed version" if version is None else f"version {version}"
        raise InvalidInput("partition", f"{dataset}/{version_label}/{key} has no {what}")
    return manifests.decode(lake.read(rel))


def _ids(lake: LakeStorage, manifest: dict) -> list[str]:
    ids: list[str] = []
    for entry in manifest["files"]:
        ids.extend(parquet_files.decode(lake.read(entry["path"]))[ID].to_pylist())
    return ids


def inclusion(
    lake: LakeStorage, dataset: str, version_label: str, key: str, record_id: str
) -> dict[str, Any]:
    manifest = _manifest(lake, dataset, version_label, key, None)
    ids = _ids(lake, manifest)
    position = bisect.bisect_left(ids, record_id)
    if position >= len(ids) or ids[position] != record_id:
        raise InvalidInput("id", f"{record_id!r} is not in partition {key}")
    tree = merkle.MerkleTree(merkle.id_leaves(ids))
    return {
        "kind": INCLUSION_KIND,
        "dataset": dataset,
        "versionLabel": version_label,
        "partition": key,
        "partitionVersion": manifest["partitionVersion"],
        "id": record_id,
        "leafIndex": position,
        "treeSize": len(ids),
        "leafHash": _hex(merkle.leaf_hash(record_id.encode("utf-8"))),
        "auditPath": [_hex(h) for h in tree.inclusion_proof(position)],
        "merkleRoot": manifest["merkleRoot"],
    }


def consistency(
    lake: LakeStorage, dataset: str, version_label: str, key: str, old_version: int, new_version: int
) -> dict[str, Any]:
    old_ids = _ids(lake, _manifest(lake, dataset, version_label, key, old_version))
    new_manifest = _manifest(lake, dataset, version_label, key, new_version)
    new_ids = _ids(lake, new_manifest)
    if not old_ids or new_ids[: len(old_ids)] != old_ids:
        raise InvalidInput(
            "fromVersion",
            f"version {new_version} does not extend version {old_version} "
            "(its sorted ids must start with all of the older version's ids)",
        )
    tree = merkle.MerkleTree(merkle.id_leaves(new_ids))
    return {
        "kind": CONSISTENCY_KIND,
        "dataset": dataset,
        "versionLabel": version_label,
        "partition": key,
        "fromVersion": old_version,
        "toVersion": new_version,
        "size1": len(old_ids),
        "size2": len(new_ids),
        "root1": merkle.root_hex(old_ids),
        "root2": new_manifest["merkleRoot"],
        "proof": [_hex(h) for h in tree.consistency_proof(len(old_ids))],
    }


def verify_proof(document: Any, root: str | None = None) -> dict[str, Any]:
    """Check a proof document offline. `root` (optional) is the root the verifier trusts."""
    if not isinstance(document, dict) or document.get("kind") not in (INCLUSION_KIND, CONSISTENCY_KIND):
        raise InvalidInput("kind", f"must be {INCLUSION_KIND!r} or {CONSISTENCY_KIND!r}")
    if document["kind"] == INCLUSION_KIND:
        record_id = document.get("id")
        if not isinstance(record_id, str):
            raise InvalidInput("id", "must be a string")
        leaf = merkle.leaf_hash(record_id.encode("utf-8"))
        trusted = _unhex(root or document.get("merkleRoot"), "merkleRoot")
        path = [_unhex(h, f"auditPath[{i}]") for i, h in enumerate(document.get("auditPath") or [])]
        reasons = []
        if "leafHash" in document and _unhex(document["leafHash"], "leafHash") != leaf:
            reasons.append("leafHash is not the hash of id")
        if not merkle.verify_inclusion(
            leaf, document.get("leafIndex"), document.get("treeSize"), path, trusted
        ):
            reasons.append("the audit path does not lead to the root")
        return {
            "valid": not reasons,
            "kind": INCLUSION_KIND,
            "id": record_id,
            "merkleRoot": _hex(trusted),
            "reasons": reasons,
        }
    root2 = _unhex(root or document.get("root2"), "root2")
    root1 = _unhex(document.get("root1"), "root1")
    proof = [_unhex(h, f"proof[{i}]") for i, h in enumerate(document.get("proof") or [])]
    ok = merkle.verify_consistency(document.get("size1"), document.get("size2"), root1, root2, proof)
    return {
        "valid": ok,
        "kind": CONSISTENCY_KIND,
        "root1": _hex(root1),
        "root2": _hex(root2),
        "reasons": [] if ok else ["the proof does not show root2's tree extends root1's"],
    }

"""Inclusion and consistency proofs of committed partitions, and their offline verification.

A proof is made from a partition re-read exactly as `pcbo verify` reads it (`partition_reading`),
and only from a version the audit chain committed: the chain must verify (against the catalog's head
when there is one), and the manifest must be the one the chain says is current (or, for a retained
version, the one the chain committed as that version). A forged commit point, a file that is
missing, tampered with or not parquet refuses the proof (exit 1, naming what) — a proof is only ever
made from the rows a committed manifest commits to. An id the partition did not add gets an
explanation from what the lake keeps (`_not_added`), not a bare "not found".
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pcbo_dagster.audit.backup import ChainBackup
from pcbo_dagster.core import merkle
from pcbo_dagster.core.chain_state import CommittedVersion
from pcbo_dagster.core.errors import IntegrityError, InvalidInput
from pcbo_dagster.core.partition_keys import PartitionKeyError, validate_partition_key
from pcbo_dagster.engine.events import chain_key
from pcbo_dagster.engine.partition_checks import CheckedChain, check_chain
from pcbo_dagster.engine.partition_reading import PartitionReading, read_partition, read_version
from pcbo_dagster.lake.storage import LakeStorage

INCLUSION_KIND = "pcbo.inclusion-proof/1"
CONSISTENCY_KIND = "pcbo.consistency-proof/1"


def _hex(digest: bytes) -> str:
    return "sha256:" + digest.hex()


def _size(value: object) -> int:
    """A tree size or index from a proof document; -1 (which no proof accepts) when not an integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _digests(document: dict[str, Any], field: str) -> list[bytes]:
    """A proof document's list of hashes (`auditPath`, `proof`; absent: none); anything but a list is
    `InvalidInput` on the field (a string is not read character by character, nor an object key by key)."""
    value = document.get(field, [])
    if not isinstance(value, list):
        raise InvalidInput(field, "must be a list of sha256:<64 hex> digests")
    return [_unhex(h, f"{field}[{i}]") for i, h in enumerate(value)]


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


@dataclass(frozen=True)
class ProofSources:
    """Where proofs are made from: the lake, and the audit backup with the catalog's chain heads
    (empty when there is no catalog) that say which versions were committed; `other_history`, with a
    catalog: (chain key, events) -> the findings saying the events are not the history the catalog's
    stored transparency log and its checkpoints hold (`transparency_log.other_history`)."""

    lake: LakeStorage
    backup: ChainBackup
    heads: Mapping[str, tuple[int, str]]
    other_history: Callable[[str, list[dict]], list[str]] | None = None


def _verified_chain(sources: ProofSources, dataset: str, version_label: str, key: str) -> CheckedChain:
    """The dataset version's chain, verified and replayed: `InvalidInput` on `partition` first when `key`
    is not a partition key (it names a lake directory: nothing but a key gets near a path),
    `IntegrityError` when the chain does not verify."""
    try:
        validate_partition_key(key)
    except PartitionKeyError as exc:
        raise InvalidInput("partition", str(exc)) from None
    ckey = chain_key(dataset, version_label)
    chain = check_chain(sources.backup, ckey, sources.heads.get(ckey))
    # a chain re-hashed in the backup and the catalog alike verifies, but not against its stored log
    findings = chain.findings or (sources.other_history(ckey, chain.events) if sources.other_history else [])
    if findings:
        raise IntegrityError(
            f"cannot prove anything from {ckey}: its audit chain does not verify: "
            f"{'; '.join(findings[:3])} (`pcbo verify` lists every finding)"
        )
    return chain


def _committed(chain: CheckedChain, ckey: str, key: str, version: int | None, field: str) -> CommittedVersion:
    """The version the chain says is current (`version` None) or committed as `version`; `InvalidInput`
    on `field` when it committed no such version."""
    history = chain.replayed.get(key)
    committed = None
    if history is not None:
        committed = history.current_version if version is None else history.versions.get(version)
    if committed is None:
        what = "committed version" if version is None else f"version {version}"
        raise InvalidInput(field, f"{ckey}/{key} has no {what} on its audit chain")
    return committed


def _reading(
    sources: ProofSources,
    chain: CheckedChain,
    dataset: str,
    version_label: str,
    key: str,
    version: int | None,
    field: str,
) -> PartitionReading:
    """The partition's committed version (`version` None) or a retained one, re-read and checked
    like `pcbo verify` checks it: `InvalidInput` on `field` when the chain committed no such version,
    `IntegrityError` when its manifest is not the one the chain committed or its manifest or files
    are unreadable or differ from each other (a proof is only made from the rows a committed manifest
    commits to)."""
    committed = _committed(chain, chain_key(dataset, version_label), key, version, field)
    lake = sources.lake
    reading = (
        read_partition(lake, dataset, version_label, key)
        if version is None
        else read_version(lake, dataset, version_label, key, version)
    )
    where = f"{dataset}/{version_label}/{key}" + ("" if version is None else f" version {version}")
    if reading.findings:
        problems = "; ".join(f"{f['where']}: {f['detail']}" for f in reading.findings[:5])
        raise IntegrityError(
            f"cannot prove anything from {where}: {problems} (`pcbo verify` lists every finding)"
        )
    if reading.manifest is None or reading.manifest_checksum != committed.manifest_checksum:
        what = "commit point" if version is None else f"manifest of version {version}"
        raise IntegrityError(
            f"cannot prove anything from {where}: its {what} is "
            f"{'missing' if reading.manifest is None else reading.manifest_checksum}, not "
            f"{committed.manifest_checksum}, the version the audit chain committed (`pcbo verify` "
            "lists every finding)"
        )
    return reading


def _not_added(manifest: dict[str, Any], record_id: str, tree_size: int) -> str:
    """Why `record_id` has no inclusion proof in this partition, as far as the lake can tell: it keeps
    the ids a partition added and only the counts of those it omitted."""
    part, counts = manifest["partition"], manifest.get("counts") or {}
    window = f"[{part['start']}, {part['end']})"
    text = (
        f"{record_id!r} is not among the {tree_size} id(s) partition {part['key']} added (window {window}, "
        f"version {manifest['partitionVersion']}, run {manifest['runId']}), so it has no inclusion proof"
    )
    omitted = counts.get("omit", 0)
    if not omitted:
        return (
            f"{text}. The partition omitted no record, so no valid record with this id fell into its "
            "window: it belongs to another partition, was outside the request's window or invalid "
            "(unplaced), or was not in the source"
        )
    reasons = ", ".join(f"{r} {n}" for r, n in sorted((counts.get("byReason") or {}).items()) if n)
    return (
        f"{text}. The partition omitted {omitted} record(s) ({reasons}), but the lake keeps the ids it "
        "added, not the ones it omitted: if this record's occurredAt is in the window, it was omitted "
        "for one of those reasons; otherwise it was placed in another partition, unplaced, or not in "
        "the request at all. `pcbo dry-run` of the "
        f"run's request (decision hash {manifest['decisionHash']}) lists every omitted id with its reasons"
    )


def inclusion(
    sources: ProofSources, dataset: str, version_label: str, key: str, record_id: str
) -> dict[str, Any]:
    reading = _reading(
        sources,
        _verified_chain(sources, dataset, version_label, key),
        dataset,
        version_label,
        key,
        None,
        "partition",
    )
    manifest, ids = reading.manifest, reading.ids
    assert manifest is not None
    position = bisect.bisect_left(ids, record_id)
    if position >= len(ids) or ids[position] != record_id:
        raise InvalidInput("id", _not_added(manifest, record_id, len(ids)))
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
    sources: ProofSources, dataset: str, version_label: str, key: str, old_version: int, new_version: int
) -> dict[str, Any]:
    chain = _verified_chain(sources, dataset, version_label, key)  # read once for both versions
    old_ids = _reading(sources, chain, dataset, version_label, key, old_version, "fromVersion").ids
    new_reading = _reading(sources, chain, dataset, version_label, key, new_version, "toVersion")
    new_manifest, new_ids = new_reading.manifest, new_reading.ids
    assert new_manifest is not None
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
    """Check a proof document offline. `root` (optional) is the root the verifier trusts, in place of
    the document's own (`merkleRoot` of an inclusion proof, `root2` of a consistency proof); a
    malformed `root` is `InvalidInput` on `root`, one in the document on the document's field."""
    trusted_root = None if root is None else _unhex(root, "root")
    if not isinstance(document, dict) or document.get("kind") not in (INCLUSION_KIND, CONSISTENCY_KIND):
        raise InvalidInput("kind", f"must be {INCLUSION_KIND!r} or {CONSISTENCY_KIND!r}")
    if document["kind"] == INCLUSION_KIND:
        record_id = document.get("id")
        if not isinstance(record_id, str):
            raise InvalidInput("id", "must be a string")
        leaf = merkle.leaf_hash(record_id.encode("utf-8"))
        trusted = trusted_root or _unhex(document.get("merkleRoot"), "merkleRoot")
        path = _digests(document, "auditPath")
        reasons = []
        if "leafHash" in document and _unhex(document["leafHash"], "leafHash") != leaf:
            reasons.append("leafHash is not the hash of id")
        if not merkle.verify_inclusion(
            leaf, _size(document.get("leafIndex")), _size(document.get("treeSize")), path, trusted
        ):
            reasons.append("the audit path does not lead to the root")
        return {
            "valid": not reasons,
            "kind": INCLUSION_KIND,
            "id": record_id,
            "merkleRoot": _hex(trusted),
            "reasons": reasons,
        }
    root2 = trusted_root or _unhex(document.get("root2"), "root2")
    root1 = _unhex(document.get("root1"), "root1")
    proof = _digests(document, "proof")
    ok = merkle.verify_consistency(
        _size(document.get("size1")), _size(document.get("size2")), root1, root2, proof
    )
    return {
        "valid": ok,
        "kind": CONSISTENCY_KIND,
        "root1": _hex(root1),
        "root2": _hex(root2),
        "reasons": [] if ok else ["the proof does not show root2's tree extends root1's"],
    }

"""The transparency log of an audit chain: an RFC 6962 Merkle tree whose leaves are the chain's events.

Pure: no I/O.

**Leaves.** Leaf `seq` of the log of chain `<dataset>/<versionLabel>` is the event at that seq, as its
RFC 8785 canonical bytes: exactly the event's line in the audit backup (`<versionLabel>.jsonl`)
without the newline. So anyone can rebuild the log from the backup alone (`leaf_hashes_of_lines`),
and an inclusion proof of a leaf proves the whole event, its `chain.event_hash` included. (The
event hash alone would prove nothing a verifier could not also get by trusting the hash.)

**Stored tree.** The log is derived from the chain and needs no source of truth of its own. To
serve roots and proofs without rebuilding the tree, the catalog keeps the hash of every *perfect*
subtree (`level`, `index`: leaves `[index * 2**level, (index + 1) * 2**level)`), about 2n hashes for
n leaves. Appending a leaf adds its hash and the perfect subtrees it completes: O(log n) at worst,
two on average (`append_leaves`), using only the *frontier* (the perfect subtrees that cover the
tree, one per set bit of its size). Any root or proof then needs O(log² n) look-ups
(`merkle.subtree_from_perfect`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pcbo_dagster.core.audit_chain import event_hash, json_problems
from pcbo_dagster.core.canonical import fast_jcs, jcs
from pcbo_dagster.core.checkpoints import Checkpoint, parse_signed_checkpoint
from pcbo_dagster.core.merkle import leaf_hash, node_hash, verify_inclusion
from pcbo_dagster.core.signed_note import NoteError, VerifierKey, b64decode_strict, verify_note

NodePosition = tuple[int, int]
"""(level, index) of a perfect subtree."""


def event_leaf(event: Mapping[str, Any]) -> bytes:
    """The leaf of an event: its RFC 8785 bytes (its audit backup line without the newline)."""
    return jcs(event) if json_problems(event) else fast_jcs(event)


def event_leaf_hash(event: Mapping[str, Any]) -> bytes:
    """RFC 6962 leaf hash of an event's leaf."""
    return leaf_hash(event_leaf(event))


def leaf_hashes_of_lines(lines: Iterable[bytes]) -> list[bytes]:
    """Leaf hashes of backup lines (each an event's RFC 8785 bytes, with or without its newline)."""
    return [leaf_hash(line[:-1] if line.endswith(b"\n") else line) for line in lines]


def frontier(size: int) -> list[NodePosition]:
    """The perfect subtrees covering leaves `[0, size)`, left to right (one per set bit of size)."""
    positions: list[NodePosition] = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            positions.append((level, start >> level))
            start += 1 << level
    return positions


def append_leaves(
    size: int, frontier_hashes: Mapping[NodePosition, bytes], new_leaf_hashes: Iterable[bytes]
) -> list[tuple[int, int, bytes]]:
    """The perfect subtrees (level, index, hash) that appending `new_leaf_hashes` to a tree of `size`
    leaves creates, given the hashes of its `frontier(size)` (KeyError when one is missing)."""
    known: dict[NodePosition, bytes] = dict(frontier_hashes)
    created: list[tuple[int, int, bytes]] = []
    index = size
    for digest in new_leaf_hashes:
        level, position, current = 0, index, digest
        known[(0, position)] = current
        created.append((0, position, current))
        while position & 1:
            current = node_hash(known[(level, position - 1)], current)
            level, position = level + 1, position >> 1
            known[(level, position)] = current
            created.append((level, position, current))
        index += 1
    return created


# -- offline checks of proofs against signed checkpoints ------------------------------------------------


def signed_checkpoints_by_size(
    notes: Iterable[str], key: VerifierKey
) -> tuple[dict[int, Checkpoint], list[str]]:
    """{size: checkpoint} of the notes that are checkpoints signed by `key`, and why others are not."""
    found: dict[int, Checkpoint] = {}
    problems: list[str] = []
    for text in notes:
        try:
            checkpoint, note = parse_signed_checkpoint(text)
            verify_note(note, [key])
        except NoteError as exc:
            problems.append(f"a checkpoint is not signed by {key.name}: {exc}")
            continue
        before = found.get(checkpoint.size)
        if before is not None and before != checkpoint:
            if before.origin != checkpoint.origin:
                what = f"of origins {before.origin} and {checkpoint.origin}"
            else:
                what = (
                    "with different roots" if before.root != checkpoint.root else "with different extensions"
                )
            problems.append(f"two signed checkpoints of size {checkpoint.size} {what}")
        found[checkpoint.size] = checkpoint
    return found, problems


def event_inclusion_problems(
    event: Mapping[str, Any], tree_size: int, proof: list[str], checkpoint: Checkpoint | None
) -> list[str]:
    """Why `proof` (base64 hashes) does not show `event` as leaf `chain.seq` of the log of `tree_size`
    whose signed checkpoint is `checkpoint` (empty: it does)."""
    chain = event.get("chain") if isinstance(event, Mapping) else None
    seq = chain.get("seq") if isinstance(chain, Mapping) else None
    where = f"event seq {seq}"
    if checkpoint is None:
        return [f"{where}: no signed checkpoint of size {tree_size}"]
    if not isinstance(chain, Mapping) or not isinstance(seq, int) or isinstance(seq, bool):
        return [f"{where}: the event has no seq"]
    problems = []
    try:
        if event_hash(dict(event)) != chain.get("event_hash"):
            problems.append(f"{where}: its event_hash does not recompute")
        hashes = [b64decode_strict(h, "a proof hash") for h in proof]
    except (NoteError, ValueError, TypeError) as exc:
        return [*problems, f"{where}: {exc}"]
    if not verify_inclusion(event_leaf_hash(event), seq, tree_size, hashes, checkpoint.root):
        problems.append(
            f"{where}: the inclusion proof does not verify against the checkpoint of size {tree_size}"
        )
    return problems

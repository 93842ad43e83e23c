"""RFC 6962 / RFC 9162 section 2.1 Merkle trees over SHA-256 (CONTRACT section 5).

- `MTH({}) = SHA-256("")`, leaf hash `SHA-256(0x00 || leaf)`, node hash `SHA-256(0x01 || left || right)`,
  split at the largest power of two smaller than n.
- Trees are built level by level: hash the leaves, then pair neighbours, carrying an odd last node up
  unchanged. That gives exactly the RFC 6962 tree shape without recursive slicing, so roots and proofs
  over 100k leaves stay cheap.
- Proof generation follows RFC 6962 section 2.1.1 (audit paths) and 2.1.2 (SUBPROOF); verification
  follows RFC 9162 section 2.1.3.2 and 2.1.4.2. Verifiers never raise: malformed input is `False`.

Pure: hashlib only, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(leaf: bytes) -> bytes:
    """RFC 6962 leaf hash: `SHA-256(0x00 || leaf)`."""
    return _sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: `SHA-256(0x01 || left || right)`."""
    return _sha256(b"\x01" + left + right).digest()


def _next_level(level: list[bytes]) -> list[bytes]:
    sha = _sha256
    out = [sha(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        out.append(level[-1])
    return out


def _leaf_level(leaves: Sequence[bytes]) -> list[bytes]:
    sha = _sha256
    return [sha(b"\x00" + leaf).digest() for leaf in leaves]


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle Tree Hash (MTH) of `leaves`; `SHA-256("")` for no leaves."""
    if not leaves:
        return EMPTY_ROOT
    level = _leaf_level(leaves)
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


class MerkleTree:
    """All levels of the tree over a fixed list of leaves, for computing many proofs over one tree.

    `levels[0]` holds the leaf hashes; `levels[k][j]` is the hash of the subtree over leaves
    `[j * 2**k, min((j + 1) * 2**k, size))`.
    """

    def __init__(self, leaves: Sequence[bytes]) -> None:
        level = _leaf_level(leaves)
        self.levels: list[list[bytes]] = [level]
        while len(level) > 1:
            level = _next_level(level)
            self.levels.append(level)

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self.levels[0])

    @property
    def root(self) -> bytes:
        """MTH of the leaves."""
        top = self.levels[-1]
        return top[0] if top else EMPTY_ROOT

    def prefix_root(self, size: int) -> bytes:
        """MTH of the first `size` leaves (`0 <= size <= self.size`)."""
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} out of range for tree size {self.size}")
        return EMPTY_ROOT if size == 0 else self._subtree(0, size)

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH of leaves `[start, end)` (non-empty), from the stored levels where they cover it."""
        size = end - start
        if size & (size - 1) == 0 and start % size == 0:
            return self.levels[size.bit_length() - 1][start // size]
        k = 1 << ((size - 1).bit_length() - 1)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def inclusion_proof(self, index: int) -> list[bytes]:
        """Audit path for leaf `index` (RFC 6962 section 2.1.1), bottom sibling first."""
        if not 0 <= index < self.size:
            raise ValueError(f"leaf index {index} out of range for tree size {self.size}")
        path: list[bytes] = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index >>= 1
        return path

    def consistency_proof(self, old_size: int) -> list[bytes]:
        """Consistency proof from the first `old_size` leaves to the whole tree (RFC 6962 2.1.2).

        `old_size` must satisfy `0 < old_size <= size`; the proof for `old_size == size` is empty.
        """
        if not 0 < old_size <= self.size:
            raise ValueError(f"old size {old_size} out of range for tree size {self.size}")
        return consistency_path(self._subtree, old_size, self.size)


SubtreeHash = Callable[[int, int], bytes]
"""`subtree(start, end)`: the MTH of leaves `[start, end)` of some tree (non-empty range)."""


def subtree_from_perfect(perfect: Callable[[int, int], bytes]) -> SubtreeHash:
    """`subtree(start, end)` computed from `perfect(level, index)`, the hashes of the tree's perfect
    subtrees (leaves `[index * 2**level, (index + 1) * 2**level)`): any range RFC 6962 splits a tree
    into is a perfect subtree or the node hash of two such ranges, so a stored set of perfect
    subtrees serves every root and proof with O(log n) look-ups per range."""

    def subtree(start: int, end: int) -> bytes:
        size = end - start
        if size & (size - 1) == 0 and start % size == 0:
            return perfect(size.bit_length() - 1, start // size)
        k = 1 << ((size - 1).bit_length() - 1)
        return node_hash(subtree(start, start + k), subtree(start + k, end))

    return subtree


def tree_root(subtree: SubtreeHash, size: int) -> bytes:
    """MTH of the first `size` leaves (`SHA-256("")` for none)."""
    return EMPTY_ROOT if size == 0 else subtree(0, size)


def audit_path(subtree: SubtreeHash, index: int, size: int) -> list[bytes]:
    """RFC 6962 section 2.1.1 PATH(index, D[size]), bottom sibling first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} out of range for tree size {size}")
    nodes: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = 1 << ((end - start - 1).bit_length() - 1)
        if index < start + k:
            nodes.append(subtree(start + k, end))
            end = start + k
        else:
            nodes.append(subtree(start, start + k))
            start += k
    nodes.reverse()
    return nodes


def consistency_path(subtree: SubtreeHash, old_size: int, size: int) -> list[bytes]:
    """RFC 6962 section 2.1.2 PROOF(old_size, D[size]) for `0 < old_size <= size` (empty when equal)."""
    if not 0 < old_size <= size:
        raise ValueError(f"old size {old_size} out of range for tree size {size}")
    # SUBPROOF(m, D[start:end], b), unrolled: each step appends one node, so collect them
    # top-down and reverse at the end (the proof lists the deepest node first).
    nodes: list[bytes] = []
    m, start, end, complete = old_size, 0, size, True
    while m != end - start:
        k = 1 << ((end - start - 1).bit_length() - 1)
        if m <= k:
            nodes.append(subtree(start + k, end))
            end = start + k
        else:
            nodes.append(subtree(start, start + k))
            m -= k
            start += k
            complete = False
    if not complete:
        nodes.append(subtree(start, end))
    nodes.reverse()
    return nodes


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path for `leaves[index]` in the tree over `leaves` (RFC 6962 section 2.1.1).

    Raises `ValueError` when `index` is not in `range(len(leaves))`.
    """
    return MerkleTree(leaves).inclusion_proof(index)


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """Consistency proof between the tree over `leaves[:old_size]` and the tree over `leaves`.

    RFC 6962 section 2.1.2 `PROOF(m, D[n])`; empty when `old_size == len(leaves)`. Raises
    `ValueError` unless `0 < old_size <= len(leaves)` (a proof from the empty tree proves nothing).
    """
    return MerkleTree(leaves).consistency_proof(old_size)


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes | bytearray) and len(value) == HASH_SIZE


def _hash_list(proof: object) -> list[bytes] | None:
    """The proof as a list of 32-byte `bytes`, or None when it is not a sequence of such hashes."""
    if not isinstance(proof, Iterable) or isinstance(proof, str | bytes | bytearray):
        return None
    items = list(proof)
    if not all(_is_hash(item) for item in items):
        return None
    return [bytes(item) for item in items]


def verify_inclusion(
    leaf_hash: bytes | bytearray, index: int, tree_size: int, proof: Sequence[bytes], root: bytes | bytearray
) -> bool:
    """RFC 9162 section 2.1.3.2: does `proof` show `leaf_hash` at `index` in the tree with `root`?

    Returns False (never raises) for any malformed input: hashes that are not 32 bytes, negative or
    non-integer sizes, `index >= tree_size`, a proof of the wrong length or with bad elements.
    """
    if not (_is_hash(leaf_hash) and _is_hash(root) and _is_size(index) and _is_size(tree_size)):
        return False
    if index >= tree_size:
        return False
    path = _hash_list(proof)
    if path is None:
        return False
    fn, sn = index, tree_size - 1
    r = bytes(leaf_hash)
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == bytes(root)


def verify_consistency(
    size1: int, size2: int, root1: bytes | bytearray, root2: bytes | bytearray, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 section 2.1.4.2: is the tree of `size2` with `root2` an append-only extension of `root1`?

    - `size1 == size2 > 0`: consistent iff the proof is empty and the roots are equal (byte equality;
      nothing is hashed, as in the transparency-dev verifier and the shared vectors).
    - `size1 == 0` is rejected (RFC 9162 requires `0 < first`; a check against the empty tree proves
      nothing), as is `size1 > size2`.
    - Otherwise both roots and every proof element must be 32 bytes and the proof non-empty and of
      exactly the right length.

    Returns False (never raises) for malformed input.
    """
    if not (_is_size(size1) and _is_size(size2)):
        return False
    if size1 == 0 or size1 > size2:
        return False
    path = _hash_list(proof)
    if size1 == size2:
        if not isinstance(root1, bytes | bytearray) or not isinstance(root2, bytes | bytearray):
            return False
        return path == [] and bytes(root1) == bytes(root2)
    if path is None or not path or not (_is_hash(root1) and _is_hash(root2)):
        return False
    if size1 & (size1 - 1) == 0:
        path.insert(0, bytes(root1))
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == bytes(root1) and sr == bytes(root2)


def id_leaves(ids: Iterable[str]) -> list[bytes]:
    """The Merkle leaves for a list of ids: their UTF-8 bytes, in the order given."""
    return [i.encode("utf-8") for i in ids]


def root_hex(ids: Sequence[str]) -> str:
    """`sha256:<hex>` of the Merkle root over the UTF-8 bytes of `ids`.

    The caller passes the ids already sorted bytewise (CONTRACT section 5); no sorting happens here.
    """
    return "sha256:" + root(id_leaves(ids)).hex()

"""RFC 6962 Merkle trees against the transparency-dev vectors (CONTRACT section 5) and exhaustive round
trips.

Vector files are discovered under `pcbo_dagster_tests/vectors/rfc6962` at collection time, so each file
is its own test id.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from pcbo_dagster.core import merkle
from pcbo_dagster.core.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    consistency_proof,
    id_leaves,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    root_hex,
    verify_consistency,
    verify_inclusion,
)
from pcbo_dagster_tests.conftest import VECTORS_DIR

RFC6962 = "rfc6962"


def _vector_files(kind: str) -> list[str]:
    base = VECTORS_DIR / RFC6962 / kind
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*.json"))


INCLUSION_FILES = _vector_files("inclusion")
CONSISTENCY_FILES = _vector_files("consistency")
HAPPY_INCLUSION = [f for f in INCLUSION_FILES if f.endswith("happy-path.json")]
HAPPY_CONSISTENCY = [f for f in CONSISTENCY_FILES if f.endswith("happy-path.json")]


def _b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def _load(kind: str, rel: str) -> dict[str, Any]:
    return json.loads((VECTORS_DIR / RFC6962 / kind / rel).read_bytes())


def _proof(case: dict[str, Any]) -> list[bytes]:
    # transparency-dev writes an empty proof as `null` in some files and `[]` in others.
    return [_b64(p) for p in case["proof"] or []]


def _roots_vector() -> tuple[list[bytes], list[bytes]]:
    data = json.loads((VECTORS_DIR / RFC6962 / "roots.json").read_bytes())
    leaves = [bytes.fromhex(h) for h in data["leaves_hex"]]
    roots = [bytes.fromhex(h) for h in data["roots_hex_by_tree_size"]]
    return leaves, roots


# --- reference implementation straight from the RFC text (recursive slicing), for cross-checks ------


def _k(n: int) -> int:
    """Largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _ref_mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + _ref_mth(d[:k]) + _ref_mth(d[k:])).digest()


def _ref_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return _ref_path(m, d[:k]) + [_ref_mth(d[k:])]
    return _ref_path(m - k, d[k:]) + [_ref_mth(d[:k])]


def _ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [_ref_mth(d)]
    k = _k(n)
    if m <= k:
        return _ref_subproof(m, d[:k], b) + [_ref_mth(d[k:])]
    return _ref_subproof(m - k, d[k:], False) + [_ref_mth(d[:k])]


def _flip(h: bytes, bit: int) -> bytes:
    out = bytearray(h)
    out[bit // 8 % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


def _leaves(n: int) -> list[bytes]:
    # Includes the empty leaf and non-ASCII bytes.
    return [b""] + [f"id-{i:04d}-\u00e9".encode() for i in range(1, n)] if n else []


# --- the vector set itself ----------------------------------------------------------------------------


def test_vector_set_is_present_and_complete() -> None:
    base = VECTORS_DIR / RFC6962
    assert (base / "roots.json").is_file()
    assert len(INCLUSION_FILES) >= 50 and len(CONSISTENCY_FILES) >= 50
    assert len(HAPPY_INCLUSION) == 5 and len(HAPPY_CONSISTENCY) == 5
    # every case in every file is in the transparency-dev shape
    for kind, files, keys in (
        ("inclusion", INCLUSION_FILES, {"leafIdx", "treeSize", "root", "leafHash", "proof", "wantErr"}),
        ("consistency", CONSISTENCY_FILES, {"size1", "size2", "root1", "root2", "proof", "wantErr"}),
    ):
        for rel in files:
            case = _load(kind, rel)
            assert keys <= case.keys(), rel
            assert isinstance(case["wantErr"], bool), rel


def test_roots_for_sizes_0_to_8() -> None:
    leaves, roots = _roots_vector()
    assert len(leaves) == 8 and len(roots) == 9
    assert roots[0] == EMPTY_ROOT == hashlib.sha256(b"").digest()
    for size, expected in enumerate(roots):
        assert root(leaves[:size]) == expected, size
        assert MerkleTree(leaves[:size]).root == expected, size
        assert _ref_mth(leaves[:size]) == expected, size


@pytest.mark.parametrize("rel", INCLUSION_FILES)
def test_inclusion_vector(rel: str) -> None:
    case = _load("inclusion", rel)
    ok = verify_inclusion(
        _b64(case["leafHash"]), case["leafIdx"], case["treeSize"], _proof(case), _b64(case["root"])
    )
    assert ok is (not case["wantErr"]), case["desc"]


@pytest.mark.parametrize("rel", CONSISTENCY_FILES)
def test_consistency_vector(rel: str) -> None:
    case = _load("consistency", rel)
    ok = verify_consistency(
        case["size1"], case["size2"], _b64(case["root1"]), _b64(case["root2"]), _proof(case)
    )
    assert ok is (not case["wantErr"]), case["desc"]


@pytest.mark.parametrize("rel", HAPPY_INCLUSION)
def test_inclusion_proof_reproduces_vector(rel: str) -> None:
    """The happy-path trees are prefixes of the roots.json leaves, so our proofs must match exactly."""
    leaves, roots = _roots_vector()
    case = _load("inclusion", rel)
    size, index = case["treeSize"], case["leafIdx"]
    assert _b64(case["root"]) == roots[size]
    assert leaf_hash(leaves[index]) == _b64(case["leafHash"])
    assert inclusion_proof(leaves[:size], index) == _proof(case)


@pytest.mark.parametrize("rel", HAPPY_CONSISTENCY)
def test_consistency_proof_reproduces_vector(rel: str) -> None:
    leaves, roots = _roots_vector()
    case = _load("consistency", rel)
    size1, size2 = case["size1"], case["size2"]
    assert _b64(case["root1"]) == roots[size1]
    assert _b64(case["root2"]) == roots[size2]
    assert consistency_proof(leaves[:size2], size1) == _proof(case)


# --- exhaustive round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(65))
def test_inclusion_round_trip(n: int) -> None:
    leaves = _leaves(n)
    tree = MerkleTree(leaves)
    r = root(leaves)
    assert r == tree.root == _ref_mth(leaves)
    for i in range(n):
        proof = inclusion_proof(leaves, i)
        assert proof == tree.inclusion_proof(i) == _ref_path(i, leaves)
        lh = leaf_hash(leaves[i])
        assert verify_inclusion(lh, i, n, proof, r)
        # a flipped bit anywhere in any proof element, the leaf hash or the root is rejected
        for j, element in enumerate(proof):
            for bit in (0, 255, (7 * i + 13 * j) % 256):
                bad = proof[:j] + [_flip(element, bit)] + proof[j + 1 :]
                assert not verify_inclusion(lh, i, n, bad, r), (n, i, j, bit)
        assert not verify_inclusion(_flip(lh, i), i, n, proof, r)
        assert not verify_inclusion(lh, i, n, proof, _flip(r, i))
        # wrong lengths and sizes
        assert not verify_inclusion(lh, i, n, proof + [r], r)
        if proof:
            assert not verify_inclusion(lh, i, n, proof[:-1], r)
            assert not verify_inclusion(lh, i, n, [r] + proof, r)
        assert not verify_inclusion(lh, n, n, proof, r)
    with pytest.raises(ValueError):
        inclusion_proof(leaves, n)
    with pytest.raises(ValueError):
        inclusion_proof(leaves, -1)


@pytest.mark.parametrize("n", range(65))
def test_consistency_round_trip(n: int) -> None:
    leaves = _leaves(n)
    tree = MerkleTree(leaves)
    r2 = root(leaves)
    for m in range(1, n + 1):
        r1 = root(leaves[:m])
        proof = consistency_proof(leaves, m)
        assert proof == tree.consistency_proof(m) == _ref_subproof(m, leaves, True)
        assert verify_consistency(m, n, r1, r2, proof), (m, n)
        if m == n:
            assert proof == []
            continue
        assert proof
        for j, element in enumerate(proof):
            for bit in (0, 255, (7 * m + 13 * j) % 256):
                bad = proof[:j] + [_flip(element, bit)] + proof[j + 1 :]
                assert not verify_consistency(m, n, r1, r2, bad), (n, m, j, bit)
        assert not verify_consistency(m, n, _flip(r1, m), r2, proof)
        assert not verify_consistency(m, n, r1, _flip(r2, m), proof)
        assert not verify_consistency(m, n, r2, r1, proof)
        assert not verify_consistency(m, n, r1, r2, [])
        assert not verify_consistency(m, n, r1, r2, proof[:-1])
        assert not verify_consistency(m, n, r1, r2, proof + [r1])
        assert not verify_consistency(m, n, r1, r2, [r1] + proof)
        # rewriting history: change an old leaf, the new root no longer extends the old one
        rewritten = list(leaves)
        rewritten[m - 1] += b"!"
        assert not verify_consistency(m, n, r1, root(rewritten), consistency_proof(rewritten, m))
    # a consistency check against the empty tree proves nothing and is rejected
    assert not verify_consistency(0, n, EMPTY_ROOT, r2, [])
    for bad_old in (0, -1, n + 1):
        with pytest.raises(ValueError):
            consistency_proof(leaves, bad_old)


def test_large_tree_matches_reference_and_proves() -> None:
    n = 100_003
    leaves = [f"{i:08d}".encode() for i in range(n)]
    r = root(leaves)
    assert r == _ref_mth(leaves)
    tree = MerkleTree(leaves)
    assert tree.root == r
    for i in (0, 1, 65_535, 65_536, 99_999, n - 1):
        proof = tree.inclusion_proof(i)
        assert verify_inclusion(leaf_hash(leaves[i]), i, n, proof, r)
    for m in (1, 65_536, 65_537, 99_999, n):
        proof = tree.consistency_proof(m)
        assert verify_consistency(m, n, root(leaves[:m]), r, proof)


# --- malformed input never raises -----------------------------------------------------------------------


GOOD_LEAVES = [b"a", b"b", b"c", b"d", b"e"]


def test_verify_inclusion_rejects_garbage() -> None:
    r = root(GOOD_LEAVES)
    lh = leaf_hash(b"b")
    proof = inclusion_proof(GOOD_LEAVES, 1)
    assert verify_inclusion(lh, 1, 5, proof, r)
    assert verify_inclusion(bytearray(lh), 1, 5, tuple(proof), bytearray(r))
    garbage: list[tuple[Any, ...]] = [
        (lh[:31], 1, 5, proof, r),
        (lh + b"\x00", 1, 5, proof, r),
        (lh, 1, 5, proof, r[:31]),
        (lh.hex(), 1, 5, proof, r),
        (None, 1, 5, proof, r),
        (lh, -1, 5, proof, r),
        (lh, 1, -5, proof, r),
        (lh, True, 5, proof, r),
        (lh, 1.0, 5, proof, r),
        (lh, "1", 5, proof, r),
        (lh, 1, 5.0, proof, r),
        (lh, 5, 5, proof, r),
        (lh, 1, 0, proof, r),
        (lh, 1, 5, None, r),
        (lh, 1, 5, b"".join(proof), r),
        (lh, 1, 5, "proof", r),
        (lh, 1, 5, 42, r),
        (lh, 1, 5, [p.hex() for p in proof], r),
        (lh, 1, 5, [proof[0], None, *proof[2:]], r),
        (lh, 1, 5, [proof[0][:16], *proof[1:]], r),
        (lh, 1, 5, proof, None),
    ]
    for args in garbage:
        assert verify_inclusion(*args) is False, args


def test_verify_consistency_rejects_garbage() -> None:
    r1, r2 = root(GOOD_LEAVES[:2]), root(GOOD_LEAVES)
    proof = consistency_proof(GOOD_LEAVES, 2)
    assert verify_consistency(2, 5, r1, r2, proof)
    assert verify_consistency(2, 5, bytearray(r1), bytearray(r2), tuple(proof))
    garbage: list[tuple[Any, ...]] = [
        (2, 5, r1[:31], r2, proof),
        (2, 5, r1, r2 + b"\x00", proof),
        (2, 5, None, r2, proof),
        (2, 5, r1.hex(), r2, proof),
        (-2, 5, r1, r2, proof),
        (2, -5, r1, r2, proof),
        (True, 5, r1, r2, proof),
        (2.0, 5, r1, r2, proof),
        (2, "5", r1, r2, proof),
        (5, 2, r2, r1, proof),
        (0, 5, EMPTY_ROOT, r2, []),
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, []),
        (2, 5, r1, r2, None),
        (2, 5, r1, r2, b"".join(proof)),
        (2, 5, r1, r2, "proof"),
        (2, 5, r1, r2, 7),
        (2, 5, r1, r2, [p.hex() for p in proof]),
        (2, 5, r1, r2, [proof[0], b""]),
        (5, 5, r2, r2, None),
        (5, 5, r2, r2, [r2]),
        (5, 5, r2, r1, []),
        (5, 5, None, None, []),
        (5, 5, "x", "x", []),
    ]
    for args in garbage:
        assert verify_consistency(*args) is False, args


def test_equal_sizes_compare_roots_only() -> None:
    r = root(GOOD_LEAVES)
    assert verify_consistency(5, 5, r, r, [])
    assert verify_consistency(5, 5, r, bytearray(r), ())
    # As in the shared vector "sizes are equal (one) and proof is empty": nothing is hashed, so roots
    # are compared as opaque bytes.
    assert verify_consistency(1, 1, b"don't care 2", b"don't care 2", [])


# --- hashing primitives and id helpers --------------------------------------------------------------------


def test_hash_primitives() -> None:
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    assert node_hash(a, b) != node_hash(b, a)
    assert root([b"a"]) == a
    assert root([b"a", b"b", b"c"]) == node_hash(node_hash(a, b), leaf_hash(b"c"))
    assert merkle.HASH_SIZE == 32


def test_root_hex_and_id_leaves() -> None:
    assert root_hex([]) == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    ids = ["a-1", "b-2", "\u00e9-3"]
    assert id_leaves(ids) == [b"a-1", b"b-2", "\u00e9-3".encode()]
    expected = node_hash(node_hash(leaf_hash(b"a-1"), leaf_hash(b"b-2")), leaf_hash(b"\xc3\xa9-3"))
    assert root_hex(ids) == "sha256:" + expected.hex()
    # order is the caller's: no sorting inside
    assert root_hex(list(reversed(ids))) != root_hex(ids)

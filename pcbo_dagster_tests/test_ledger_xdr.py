"""The skipping XDR walker (`sources/ledger_xdr.py`) against stellar-sdk's decoder, type by type: for
random values of every type a LedgerCloseMetaBatch reaches, and for the same values damaged, the
walker ends where stellar-sdk's `unpack` ends, and refuses what it refuses."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

pytest.importorskip("stellar_sdk")

from stellar_sdk import xdr as sdk_xdr  # noqa: E402
from xdrlib3 import Unpacker  # noqa: E402

from pcbo_dagster.sources import ledger_xdr  # noqa: E402
from pcbo_dagster.sources.ledger_xdr import MAX_DEPTH, Decl, Node, XdrError, stellar_walker, xdr_words  # noqa: E402
from pcbo_dagster.sources.ledger_xdr_definitions import DEFINITIONS  # noqa: E402
from pcbo_dagster_tests import stellar_xdr_definitions  # noqa: E402

TYPES = ledger_xdr.parse_definitions(DEFINITIONS)
_CLASSES = {name.lower(): getattr(sdk_xdr, name) for name in dir(sdk_xdr) if name[0].isupper()}


def sdk_class(name: str) -> Any:
    """The stellar-sdk XDR class named `name` (any case); no common base declares its `unpack`."""
    return _CLASSES[name.lower()]


def test_the_definitions_are_those_of_the_installed_stellar_sdk():
    assert stellar_xdr_definitions.definitions_text() in DEFINITIONS
    assert {"LedgerCloseMeta", "LedgerCloseMetaV0", "LedgerCloseMetaV1", "LedgerCloseMetaV2"} <= set(TYPES)
    assert sdk_xdr.base.DEFAULT_XDR_MAX_DEPTH == MAX_DEPTH


def test_every_type_has_a_skipper_and_the_constant_sizes_are_right():
    walker = stellar_walker()
    assert walker.names == set(TYPES)
    assert all(callable(walker.skipper(name)) for name in TYPES)
    assert walker.fixed_words["Hash"] == 8
    assert walker.fixed_words["TimeBounds"] == 4
    assert walker.fixed_words["Int128Parts"] == 4
    assert "PublicKey" not in walker.fixed_words  # a union: its discriminant is read and checked


# -- random values, written from the definitions ----------------------------------------------------


class ValueWriter:
    """Random XDR bytes of a type; nesting stops growing (empty arrays, absent optionals, leaf arms)
    once `budget` levels are used."""

    def __init__(self, rng: random.Random, budget: int = 6) -> None:
        self.rng = rng
        self.budget = budget

    def of(self, name: str) -> bytes:
        return self.node(TYPES[name], self.budget)

    def node(self, node: Node, budget: int) -> bytes:
        rng = self.rng
        if node.kind == "enum":
            return struct.pack(">i", rng.choice(sorted(node.values.values())))
        if node.kind in ("struct", "typedef"):
            return b"".join(self.decl(d, budget) for d in node.fields)
        assert node.discriminant is not None
        enum = TYPES.get(node.discriminant.kind) if isinstance(node.discriminant.kind, str) else None
        arms = [
            (enum.values[label] if isinstance(label, str) and enum is not None else label, decl)
            for labels, decl in node.arms
            for label in labels
        ]
        if budget <= 0:
            leaves = [(v, d) for v, d in arms if d is None or self.is_leaf(d)]
            arms = leaves or arms
        value, decl = rng.choice(arms)
        assert isinstance(value, int)
        return struct.pack(">i", value) + (b"" if decl is None else self.decl(decl, budget - 1))

    def is_leaf(self, decl: Decl) -> bool:
        return decl.mode in ("var", "optional") or not (
            isinstance(decl.kind, Node) or decl.kind in TYPES and TYPES[decl.kind].kind != "enum"
        )

    def decl(self, decl: Decl, budget: int) -> bytes:
        rng = self.rng
        if decl.kind in ("opaque", "string"):
            size = decl.size if decl.mode == "fixed" else rng.randint(0, min(decl.size, 40))
            data = bytes(rng.randrange(256) for _ in range(size)) + bytes(-size % 4)
            return data if decl.mode == "fixed" else struct.pack(">I", size) + data
        if decl.mode == "optional":
            if budget <= 0 or rng.random() < 0.3:
                return struct.pack(">I", 0)
            return struct.pack(">I", 1) + self.one(decl.kind, budget)
        if decl.mode == "var":
            count = 0 if budget <= 0 else rng.randint(0, min(decl.size, 3))
            return struct.pack(">I", count) + b"".join(self.one(decl.kind, budget) for _ in range(count))
        if decl.mode == "fixed":
            return b"".join(self.one(decl.kind, budget) for _ in range(decl.size))
        return self.one(decl.kind, budget)

    def one(self, kind: str | Node, budget: int) -> bytes:
        rng = self.rng
        if isinstance(kind, Node):
            return self.node(kind, budget - 1)
        if kind in ("hyper", "unsigned hyper", "double"):
            return bytes(rng.randrange(256) for _ in range(8))
        if kind == "bool":
            return struct.pack(">I", rng.randint(0, 1))
        if kind in ("int", "unsigned int", "float"):
            return bytes(rng.randrange(256) for _ in range(4))
        return self.node(TYPES[kind], budget - 1)


def sdk_end(name: str, data: bytes, depth: int = MAX_DEPTH) -> int | None:
    """Where stellar-sdk's unpack of a `name` at the start of `data` ends; None if it refuses it."""
    cls = sdk_class(name)
    unpacker = Unpacker(data)
    try:
        if TYPES[name].kind == "enum":
            cls.unpack(unpacker)
        else:
            cls.unpack(unpacker, depth)
    except Exception:  # noqa: BLE001 - any refusal (ValueError, EOFError, xdrlib3.Error, struct.error)
        return None
    return unpacker.get_position()


def walker_end(name: str, data: bytes, depth: int = MAX_DEPTH) -> int | None:
    """Where the walker ends (in bytes); None if it refuses, or ends beyond the data."""
    words = xdr_words(data)
    try:
        end = stellar_walker().skip(name, words, 0, depth)
    except (XdrError, IndexError):
        return None
    return 4 * end if end <= len(words) else None


@pytest.mark.parametrize("name", sorted(TYPES))
def test_the_walker_ends_where_stellar_sdk_ends(name):
    rng = random.Random(name)  # the same values on every run
    writer = ValueWriter(rng)
    for _ in range(12):
        data = writer.of(name)
        assert sdk_end(name, data) == len(data), "the writer wrote a value stellar-sdk does not read"
        assert walker_end(name, data) == len(data)
        tail = data + b"\x00\x00\x00\x07more"  # what follows a value is not read
        assert walker_end(name, tail) == len(data)


@pytest.mark.parametrize("name", sorted(n for n, t in TYPES.items() if t.kind != "enum"))
def test_damaged_values_are_refused_exactly_when_stellar_sdk_refuses_them(name):
    rng = random.Random("damaged " + name)
    writer = ValueWriter(rng)
    for _ in range(12):
        data = bytearray(writer.of(name))
        if len(data) < 4:
            continue
        cut = bytes(data[: rng.randrange(len(data))])  # cut short, at any byte
        assert walker_end(name, cut) == sdk_end(name, cut)
        for value in (0, 1, 2, 3, 5, 7, 21, 100, 0xFFFFFFFF, 0x7FFFFFFF, rng.getrandbits(32)):
            damaged = bytearray(data)
            at = 4 * rng.randrange(len(data) // 4)
            damaged[at : at + 4] = struct.pack(">I", value)
            damaged += bytes(64)  # room for a longer reading
            assert walker_end(name, bytes(damaged)) == sdk_end(name, bytes(damaged)), (at, value)


def _nested_vectors(levels: int) -> bytes:
    """An SCVal holding `levels` vectors, each inside the one before; the innermost is empty."""
    scv_vec = sdk_xdr.SCValType.SCV_VEC.value
    return (
        struct.pack(">iI", scv_vec, 1)
        + b"".join(struct.pack(">Iii", 1, scv_vec, 1) for _ in range(levels - 1))
        + struct.pack(">I", 0)
    )


def test_the_nesting_limit_is_stellar_sdks_to_the_level():
    accepted = [n for n in range(240, 270) if sdk_end("SCVal", _nested_vectors(n)) is not None]
    deepest = max(accepted)
    assert accepted == list(range(240, deepest + 1)) and deepest < 269
    for levels in (deepest - 1, deepest, deepest + 1):
        data = _nested_vectors(levels)
        assert walker_end("SCVal", data) == sdk_end("SCVal", data)
    for depth in (1, 2, 3, 5, 8):  # and for types entered with little depth left
        for name in ("LedgerEntry", "TransactionEnvelope", "LedgerHeader", "Hash", "SCVal", "TimeBounds"):
            data = ValueWriter(random.Random(name), budget=3).of(name)
            assert walker_end(name, data, depth) == sdk_end(name, data, depth), (name, depth)

"""The catalog's copy of each audit chain's transparency log: its stored tree, checkpoints and
cosignatures (migration 0005; the log itself is `core/transparency_log.py`).

The stored tree grows in the same transaction as the chain's mirror (`append_leaves`, called by
`ChainTransaction.append`), so the two never disagree: O(log n) look-ups and inserts per event. A
chain older than the tree (a catalog migrated from 0004) is caught up from its mirrored events on
its next append, or by `ensure_tree`. Roots and proofs are served from the stored perfect subtrees
(`LogReader`), never by rebuilding the tree.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, select

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import Database, insert_if_absent, upsert
from pcbo_dagster.core import merkle
from pcbo_dagster.core.transparency_log import append_leaves as new_nodes
from pcbo_dagster.core.transparency_log import event_leaf_hash, frontier
from pcbo_dagster.io.clock import utc_now

# Built once, values bound at execution (issue 18: building a statement anew cost ~100 us a call,
# the nodes' OR of (level, index) pairs ~400 us). `_NODES` reads every node whose level is one asked
# for and whose index is one asked for (for k pairs at most k * k rows; for a frontier, one node a
# level, a few more than k), and `_nodes` keeps exactly the pairs asked for.
_TREE_SIZE = select(t.transparency_trees.c.tree_size).where(
    t.transparency_trees.c.chain_key == bindparam("chain_key")
)
_NODES = select(
    t.transparency_nodes.c.level, t.transparency_nodes.c.node_index, t.transparency_nodes.c.hash
).where(
    t.transparency_nodes.c.chain_key == bindparam("chain_key"),
    t.transparency_nodes.c.level.in_(bindparam("levels", expanding=True)),
    t.transparency_nodes.c.node_index.in_(bindparam("indexes", expanding=True)),
)


def stored_tree_size(conn: Connection, chain_key: str) -> int:
    row = conn.execute(_TREE_SIZE, {"chain_key": chain_key}).first()
    return 0 if row is None else int(row.tree_size)


def _nodes(
    conn: Connection, chain_key: str, positions: list[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    if not positions:
        return {}
    wanted = set(positions)
    rows = conn.execute(
        _NODES,
        {
            "chain_key": chain_key,
            "levels": sorted({level for level, _ in wanted}),
            "indexes": sorted({index for _, index in wanted}),
        },
    )
    found: dict[tuple[int, int], bytes] = {}
    for r in rows:
        key = (int(r.level), int(r.node_index))
        if key in wanted:
            found[key] = bytes.fromhex(r.hash)
    return found


def append_leaves(
    conn: Connection, chain_key: str, first_seq: int, events: Sequence[Mapping[str, Any]]
) -> None:
    """Add events `first_seq, first_seq + 1, ...` of a chain to its stored tree, inside the caller's
    transaction. Events the tree lacks before `first_seq` (a chain older than the tree) are read from
    the mirror first. ValueError when the tree already holds more than `first_seq` events."""
    size = stored_tree_size(conn, chain_key)
    if size > first_seq:
        raise ValueError(f"{chain_key}: the stored log holds {size} events, more than seq {first_seq}")
    leaves: list[bytes] = []
    if size < first_seq:
        rows = conn.execute(
            select(t.audit_events.c.event_json)
            .where(
                t.audit_events.c.chain_key == chain_key,
                t.audit_events.c.seq >= size,
                t.audit_events.c.seq < first_seq,
            )
            .order_by(t.audit_events.c.seq)
        )
        leaves = [event_leaf_hash(json.loads(r.event_json)) for r in rows]
        if len(leaves) != first_seq - size:
            raise ValueError(f"{chain_key}: the mirror lacks events {size}..{first_seq - 1} for the log")
    leaves += [event_leaf_hash(event) for event in events]
    if not leaves:
        return
    wanted = frontier(size)
    known = _nodes(conn, chain_key, wanted)
    if len(known) != len(wanted):
        raise ValueError(f"{chain_key}: the stored log misses nodes of its frontier")
    created = new_nodes(size, known, leaves)
    conn.execute(
        t.transparency_nodes.insert(),
        [{"chain_key": chain_key, "level": lv, "node_index": ix, "hash": h.hex()} for lv, ix, h in created],
    )
    upsert(conn, t.transparency_trees, {"chain_key": chain_key, "tree_size": size + len(leaves)})


class LogReader:
    """Roots and proofs of one chain's stored log, inside one read transaction (node look-ups are
    cached for the reader's life)."""

    def __init__(self, conn: Connection, chain_key: str) -> None:
        self._conn = conn
        self.chain_key = chain_key
        self.size = stored_tree_size(conn, chain_key)
        self._cache: dict[tuple[int, int], bytes] = {}
        self._subtree = merkle.subtree_from_perfect(self._perfect)

    def _perfect(self, level: int, index: int) -> bytes:
        key = (level, index)
        if key not in self._cache:
            found = _nodes(self._conn, self.chain_key, [key])
            if key not in found:
                raise ValueError(f"{self.chain_key}: the stored log has no node {key}")
            self._cache[key] = found[key]
        return self._cache[key]

    def _check_size(self, size: int, what: str) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"{what} {size} is beyond the log's size {self.size}")

    def leaf_hash(self, index: int) -> bytes:
        """The stored leaf hash of event `index` (`ValueError` when the log has none)."""
        return self._perfect(0, index)

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        self._check_size(size, "tree size")
        return merkle.tree_root(self._subtree, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        self._check_size(size, "tree size")
        return merkle.audit_path(self._subtree, index, size)

    def consistency_proof(self, old_size: int, size: int) -> list[bytes]:
        self._check_size(size, "tree size")
        return merkle.consistency_path(self._subtree, old_size, size)


class TransparencyRecords(Database):
    """Reading the stored logs; storing checkpoints and cosignatures."""

    @contextlib.contextmanager
    def log_reader(self, chain_key: str) -> Iterator[LogReader]:
        """A `LogReader` over one read transaction."""
        with self.read() as conn:
            yield LogReader(conn, chain_key)

    def log_size(self, chain_key: str) -> int:
        with self.read() as conn:
            return stored_tree_size(conn, chain_key)

    def ensure_tree(self, chain_key: str) -> int:
        """Catch the stored tree up with the chain's mirror (a catalog migrated from 0004); its size."""
        with self.write() as conn:
            head = conn.execute(
                select(t.audit_chain_heads.c.seq).where(t.audit_chain_heads.c.chain_key == chain_key)
            ).first()
            length = 0 if head is None or head.seq < 0 else int(head.seq) + 1
            if stored_tree_size(conn, chain_key) < length:
                append_leaves(conn, chain_key, length, [])
            return stored_tree_size(conn, chain_key)

    def record_checkpoint(
        self, chain_key: str, size: int, root: bytes, origin: str, signer_key: str, note: str
    ) -> bool:
        """Store a signed checkpoint; False when a row of that size is already stored (pcbo's or
        another's: `verify` judges the rows)."""
        with self.write() as conn:
            return insert_if_absent(
                conn,
                t.transparency_checkpoints,
                {
                    "chain_key": chain_key,
                    "tree_size": size,
                    "root_hash": root.hex(),
                    "origin": origin,
                    "signer_key": signer_key,
                    "note": note,
                    "recorded_at": utc_now(),
                },
                ["chain_key", "tree_size"],
            )

    def record_cosignature(
        self, chain_key: str, size: int, witness_key: str, signature_line: str, cosigned_at: int
    ) -> bool:
        """Store a witness's cosignature; False when a row of that size and witness key is there."""
        with self.write() as conn:
            return insert_if_absent(
                conn,
                t.checkpoint_cosignatures,
                {
                    "chain_key": chain_key,
                    "tree_size": size,
                    "witness_key": witness_key,
                    "signature_line": signature_line,
                    "cosigned_at": cosigned_at,
                    "recorded_at": utc_now(),
                },
                ["chain_key", "tree_size", "witness_key"],
            )

    def checkpoints(self, chain_key: str) -> list[dict[str, Any]]:
        """Stored checkpoints of a chain, by size, each with its `cosignatures` (list of rows)."""
        c, s = t.transparency_checkpoints, t.checkpoint_cosignatures
        with self.read() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(select(c).where(c.c.chain_key == chain_key).order_by(c.c.tree_size))
            ]
            cosigs = [
                dict(r._mapping)
                for r in conn.execute(
                    select(s).where(s.c.chain_key == chain_key).order_by(s.c.tree_size, s.c.witness_key)
                )
            ]
        for row in rows:
            row["cosignatures"] = [x for x in cosigs if x["tree_size"] == row["tree_size"]]
        return rows

    def latest_checkpoint(self, chain_key: str) -> dict[str, Any] | None:
        rows = self.checkpoints(chain_key)
        return rows[-1] if rows else None

    def checkpoint_chains(self) -> list[str]:
        c = t.transparency_checkpoints
        with self.read() as conn:
            return [r[0] for r in conn.execute(select(c.c.chain_key).distinct().order_by(c.c.chain_key))]

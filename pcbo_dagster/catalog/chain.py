"""The catalog's mirror of the audit chains: every event, and each chain's head (seq, event_hash).

The audit log (`audit.log`) appends to the local backup first and then here, inside
`locked_chain`: one transaction per chain holding its head row, so concurrent writers of one chain
(threads, processes, hosts on PostgreSQL) serialise and never fork it. `audit_events` is append-only
(database triggers). The batch an append is about to write is recorded first in
`audit_pending_batches` (`ChainTransaction.set_pending`), so a crash between the backup and the mirror
can be told from events appended to one store alone (`audit.log`). Every event is also added, in the
same transaction, to the chain's transparency log (`catalog/transparency.py`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Connection, bindparam, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import (
    CatalogLockBusy,
    Database,
    bound_lock_waits,
    insert_ignore,
    lock_not_granted,
    upsert,
)
from pcbo_dagster.catalog.transparency import append_leaves
from pcbo_dagster.core.errors import IntegrityError as PcboIntegrityError
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.io.clock import utc_now
from pcbo_dagster.io.env_vars import lease_wait_seconds

_heads, _events, _pending = t.audit_chain_heads, t.audit_events, t.audit_pending_batches
# Built once, the chain key bound at execution (issue 18: building a statement anew cost ~100 us a
# call, several calls per audit append).
_HEAD = select(_heads.c.seq, _heads.c.event_hash).where(_heads.c.chain_key == bindparam("chain_key"))
_PENDING = select(_pending.c.first_seq, _pending.c.events_json).where(
    _pending.c.chain_key == bindparam("chain_key")
)
_CLEAR_PENDING = _pending.delete().where(_pending.c.chain_key == bindparam("chain_key"))
_STORED = (
    select(
        _events.c.seq,
        _events.c.event_hash,
        _events.c.prev_event_hash,
        _events.c.event_type,
        _events.c.event_json,
    )
    .where(
        _events.c.chain_key == bindparam("chain_key"),
        _events.c.seq >= bindparam("first"),
        _events.c.seq <= bindparam("last"),
    )
    .order_by(_events.c.seq)
)
_EVENTS_AFTER = (
    select(_events.c.event_json)
    .where(_events.c.chain_key == bindparam("chain_key"), _events.c.seq > bindparam("seq"))
    .order_by(_events.c.seq)
)


class CatalogRefusedWrite(PcboIntegrityError):
    """The catalog did not store what pcbo wrote as written (a rule, a trigger or a row-level security
    policy someone added drops, rewrites or hides it): exit 1, the transaction rolled back."""


class ChainWriterBusy(CatalogLockBusy):
    """Another session held a chain's writer lock for all of `PCBO_LEASE_WAIT_SECONDS` (exit 1)."""


class ChainTransaction:
    """The open transaction of `ChainMirror.locked_chain`, holding the chain's head lock."""

    def __init__(self, conn: Connection, chain_key: str) -> None:
        self._conn = conn
        self.chain_key = chain_key

    def head(self) -> tuple[int, str] | None:
        """(seq, event_hash) of the last stored event; None when the chain is empty."""
        row = self._conn.execute(_HEAD, {"chain_key": self.chain_key}).first()
        if row is None or row.seq < 0:
            return None
        return int(row.seq), str(row.event_hash)

    def events_after(self, seq: int) -> list[dict[str, Any]]:
        """Parsed events with seq > `seq`, in seq order."""
        return _events_after(self._conn, self.chain_key, seq)

    def append(self, events: list[dict[str, Any]]) -> None:
        """Store events that extend the head, in order, and move the head (ValueError on a bad link)."""
        head = self.head()
        seq, prev = (head[0], head[1]) if head is not None else (-1, None)
        first_seq = seq + 1
        rows = []
        for ev in events:
            chain = ev.get("chain") if isinstance(ev, Mapping) else None
            if not isinstance(chain, Mapping):
                raise ValueError("event has no 'chain' object")
            if chain.get("chain_key") != self.chain_key:
                raise ValueError(f"event chain_key {chain.get('chain_key')!r} is not {self.chain_key!r}")
            ev_seq = chain.get("seq")
            if type(ev_seq) is not int or ev_seq != seq + 1:
                raise ValueError(f"event seq {ev_seq!r} does not follow head seq {seq} of {self.chain_key!r}")
            if chain.get("prev_event_hash") != prev:
                raise ValueError(
                    f"event seq {ev_seq} prev_event_hash {chain.get('prev_event_hash')!r} "
                    f"is not the head's event_hash {prev!r}"
                )
            ev_hash = chain.get("event_hash")
            if not isinstance(ev_hash, str) or not ev_hash:
                raise ValueError(f"event seq {ev_seq} has no event_hash")
            ev_type = ev.get("event_type")
            if not isinstance(ev_type, str) or not ev_type:
                raise ValueError(f"event seq {ev_seq} has no event_type")
            rows.append(
                {
                    "chain_key": self.chain_key,
                    "seq": ev_seq,
                    "event_hash": ev_hash,
                    "prev_event_hash": prev,
                    "event_type": ev_type,
                    "event_json": compact_text(ev),
                    "recorded_at": utc_now(),
                }
            )
            seq, prev = ev_seq, ev_hash
        if not rows:
            return
        try:
            with self._conn.begin_nested():
                self._conn.execute(t.audit_events.insert(), rows)
                append_leaves(self._conn, self.chain_key, first_seq, events)
        except IntegrityError as exc:
            raise ValueError(
                f"event refused by the catalog (duplicate seq or event_hash): {exc.orig}"
            ) from exc
        # Read back in the same transaction: a rule or trigger on the table that drops or rewrites the
        # rows must fail the append (its batch stays pending), never leave the head over a hole.
        stored = [
            (r.seq, r.event_hash, r.prev_event_hash, r.event_type, r.event_json)
            for r in self._conn.execute(
                _STORED, {"chain_key": self.chain_key, "first": first_seq, "last": seq}
            )
        ]
        given = [
            (r["seq"], r["event_hash"], r["prev_event_hash"], r["event_type"], r["event_json"]) for r in rows
        ]
        if stored != given:
            raise CatalogRefusedWrite(
                f"the catalog did not store the events appended to {self.chain_key} (seq {first_seq} to "
                f"{seq}) as given ({len(stored)} of {len(rows)} rows read back as written): a rule, a "
                "trigger or a row-level security policy on audit_events drops, rewrites or hides them; "
                "the batch stays pending, in the audit backup alone, for the next run or `pcbo verify "
                "--repair` to adopt once the catalog stores rows as given"
            )
        upsert(self._conn, t.audit_chain_heads, {"chain_key": self.chain_key, "seq": seq, "event_hash": prev})
        if self.head() != (seq, prev):
            raise CatalogRefusedWrite(
                f"the catalog did not move the head of {self.chain_key} to seq {seq}: a rule or trigger on "
                "audit_chain_heads drops or rewrites its update"
            )

    def pending(self) -> tuple[int, list[dict[str, Any]]] | None:
        """(first seq, events) of the batch recorded as about to be appended, or None."""
        row = self._conn.execute(_PENDING, {"chain_key": self.chain_key}).first()
        return None if row is None else (int(row.first_seq), json.loads(row.events_json))

    def set_pending(self, first_seq: int, events: list[dict[str, Any]]) -> None:
        """Record the batch about to be appended (replacing any earlier one)."""
        upsert(
            self._conn,
            t.audit_pending_batches,
            {
                "chain_key": self.chain_key,
                "first_seq": first_seq,
                "events_json": compact_text(events),
                "recorded_at": utc_now(),
            },
        )

    def clear_pending(self) -> None:
        self._conn.execute(_CLEAR_PENDING, {"chain_key": self.chain_key})


class ChainMirror(Database):
    """The `audit_events` and `audit_chain_heads` tables."""

    @contextlib.contextmanager
    def locked_chain(self, chain_key: str) -> Iterator[ChainTransaction]:
        """One transaction holding the chain's head lock; commits on normal exit, rolls back on error.

        Concurrent writers of one chain (threads, processes, hosts on PostgreSQL) serialise here. On
        SQLite this holds the database write lock: do not open another write on this store inside it.
        """
        wait = lease_wait_seconds() if self.dialect == "postgresql" else 0.0
        try:
            with self.write() as conn:
                if self.dialect == "postgresql":
                    # a writer holds its head for one append: waited for as a lease is
                    bound_lock_waits(conn, wait)
                insert_ignore(
                    conn,
                    t.audit_chain_heads,
                    {"chain_key": chain_key, "seq": -1, "event_hash": ""},
                    ["chain_key"],
                )
                if self.dialect == "postgresql":
                    conn.execute(
                        select(t.audit_chain_heads.c.seq)
                        .where(t.audit_chain_heads.c.chain_key == chain_key)
                        .with_for_update()
                    )
                yield ChainTransaction(conn, chain_key)
        except CatalogLockBusy as exc:
            raise ChainWriterBusy(
                f"the audit chain {chain_key}'s append waited on a lock another catalog session holds "
                f"({exc.locked}: its head row in audit_chain_heads, that table, or another audit table; "
                f"pg_locks names it); waited {wait:g} s (PCBO_LEASE_WAIT_SECONDS); nothing was appended to "
                "the catalog (a batch already in the audit backup stays pending, in the backup alone, for "
                "the next run or `pcbo verify --repair` to adopt)"
            ) from None

    @contextlib.contextmanager
    def chain_writer_lock(self, chain_key: str) -> Iterator[None]:
        """Held by a chain's writer across its whole append (pending batch, backup, mirror): on
        PostgreSQL a session advisory lock, so writers on different hosts take turns; on SQLite
        nothing (a SQLite catalog has one host, whose writers share the backup's file lock)."""
        if self.dialect != "postgresql":
            yield
            return
        key = compact_text(["pcbo.chain", chain_key])
        wait = lease_wait_seconds()
        with self.engine.connect() as conn:
            # waited for up to PCBO_LEASE_WAIT_SECONDS, as a lease is (a writer holds it for one append)
            bound_lock_waits(conn, wait)  # its transaction's: the session lock outlives it
            try:
                conn.execute(
                    text("SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtextextended(:k, 0))"), {"k": key}
                )
            except OperationalError as exc:
                if not lock_not_granted(exc):
                    raise
                conn.rollback()
                raise ChainWriterBusy(
                    f"the audit chain {chain_key} is being appended to by another catalog session (its "
                    f"writer lock, pg_locks names it); waited {wait:g} s (PCBO_LEASE_WAIT_SECONDS); "
                    "nothing was appended"
                ) from None
            conn.commit()
            try:
                yield
            finally:
                conn.execute(
                    text("SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtextextended(:k, 0))"),
                    {"k": key},
                )
                conn.commit()

    def audit_event_rows(self, chain_key: str) -> list[dict[str, Any]]:
        """The mirror's rows of a chain as stored (columns and the unparsed `event_json`), in seq order."""
        e = t.audit_events
        with self.read() as conn:
            rows = conn.execute(
                select(e.c.seq, e.c.event_hash, e.c.prev_event_hash, e.c.event_type, e.c.event_json)
                .where(e.c.chain_key == chain_key)
                .order_by(e.c.seq)
            )
            return [dict(r._mapping) for r in rows]

    def audit_events(self, chain_key: str, first_seq: int = 0) -> list[dict[str, Any]]:
        """Parsed events of a chain from seq `first_seq` on, in seq order."""
        with self.read() as conn:
            return _events_after(conn, chain_key, first_seq - 1)

    def chain_heads(self) -> dict[str, tuple[int, str]]:
        """{chain_key: (seq, event_hash)} of every non-empty chain."""
        h = t.audit_chain_heads
        with self.read() as conn:
            rows = conn.execute(select(h.c.chain_key, h.c.seq, h.c.event_hash).where(h.c.seq >= 0))
            return {r.chain_key: (int(r.seq), str(r.event_hash)) for r in rows}


def _events_after(conn: Connection, chain_key: str, seq: int) -> list[dict[str, Any]]:
    rows = conn.execute(_EVENTS_AFTER, {"chain_key": chain_key, "seq": seq})
    return [json.loads(r.event_json) for r in rows]

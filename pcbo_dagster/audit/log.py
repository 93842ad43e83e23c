"""The chain writer: appends PAS events to the local backup and, optionally, a chain-head store.

With a head store (the catalog's mirror of the chain), an append is three steps, so that a crash at
any instant is recognisable afterwards and nothing else is:

1. in a head-store transaction: reconcile the two stores (below), build the events on the head they
   agree on, and record them as the chain's *pending batch*;
2. write them to the backup (one write, fsync);
3. in a second transaction: store them in the mirror, move its head, clear the pending batch.

Reconciling (at the start of every append, and by `sync_to_catalog` for repair): when the backup
holds events after the mirror's head, they are adopted into the mirror only if they are exactly (a
prefix of) the pending batch: a crash between steps 2 and 3, or during step 2. The backup is the
first store: what it holds of the batch happened, and the rest of the batch (a torn fragment of it
is dropped) did not. A pending batch is only what the catalog says, and someone who can write the
catalog alone must never get an event of their making into the backup: so the catalog's copy is
written to the backup only to fill a hole before an event of the batch the backup already holds
(an object store's concurrent PUTs, `audit.object_store_backup`), where that held event's
`prev_event_hash` pins every event before it. The caller of an append that was cut off saw no
return, so nothing it would have done after the append was done; a commit whose events were cut off
is completed from its intent by the commit protocol's own repair. Anything else is
`ChainDivergence`: events one store alone holds (appended to the backup by hand, a backup behind
the mirror, or rows inserted into the mirror past its head) are never adopted, so the run stops and
`pcbo verify` reports them. A torn fragment that is not part of the pending batch is set aside in
the chain's `.torn` file (which `pcbo verify` reports).

Writers of one chain are serialised by the backup's chain lock (flock, across the processes of a
host) and the head store's writer lock (across hosts on PostgreSQL), held for all three steps; the
lock order is always backup, then head store. The backup is the host-local file (`audit.backup`) or,
for runs on many hosts, an object store every host shares (`audit.object_store_backup`, one object
per event, written create-only): the protocol is the same, and there the host-local file is only a
verified cache. Remote delivery is never done here: `deliver_pending` is called by the
engine between partitions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pcbo_dagster.audit.backup import AuditBackupCorrupt, ChainBackup
from pcbo_dagster.audit.delivery import DeliveryReport, HttpDelivery
from pcbo_dagster.core.audit_chain import AuditEvent, build_event, split_chain_key, verify_chain
from pcbo_dagster.core.canonical import jcs
from pcbo_dagster.core.chain_state import LAKE_EVENTS, ChainState
from pcbo_dagster.core.errors import IntegrityError
from pcbo_dagster.core.instants import format_datetime
from pcbo_dagster.core.operator_signatures import OPERATOR_SIGNATURE, sign_event
from pcbo_dagster.core.signed_note import SigningKey
from pcbo_dagster.io.clock import utc_now


class ChainDivergence(IntegrityError):
    """The backup and the head store hold different events at the same position (a fork)."""


class ChainMoved(IntegrityError):
    """An append fenced by its caller's replayed chain found that another writer changed what the
    lake's partitions should hold since (a run whose lease was taken over while it stalled). Nothing
    was appended."""


class ChainHeadTxn(Protocol):
    """One chain's head inside a head-store transaction (held exclusively while open)."""

    def head(self) -> tuple[int, str] | None:
        """(seq, event_hash) of the last stored event, or None for an empty chain."""
        ...

    def events_after(self, seq: int) -> list[dict]:
        """Stored events with chain.seq > `seq`, in seq order (`-1` for all)."""
        ...

    def append(self, events: list[dict]) -> None:
        """Store events continuing the chain (committed when the transaction ends cleanly)."""
        ...

    def pending(self) -> tuple[int, list[dict]] | None:
        """(first seq, events) of the batch recorded as about to be appended, or None."""
        ...

    def set_pending(self, first_seq: int, events: list[dict]) -> None:
        """Record the batch about to be appended."""
        ...

    def clear_pending(self) -> None: ...


class ChainHeadStore(Protocol):
    """Where chain heads live besides the backup (the catalog)."""

    def locked_chain(self, chain_key: str) -> AbstractContextManager[ChainHeadTxn]:
        """Exclusive transaction over one chain: commit on normal exit, roll back on an exception."""
        ...

    def chain_writer_lock(self, chain_key: str) -> AbstractContextManager[None]:
        """Held across a whole append (several transactions) by the chain's writer."""
        ...


@dataclass(frozen=True)
class ReconcileResult:
    """What reconciliation copied: events of a pending batch written to the backup to fill a hole before
    an event of the batch it holds, and the batch's events added to the head store."""

    to_backup: int
    to_head_store: int
    head: tuple[int, str] | None


def audit_timestamp(moment: datetime) -> str:
    """An event's `timestamp`: `format_datetime` of the audit clock's reading; ValueError for a naive
    datetime (the clock must say which instant it means)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("the audit clock must return timezone-aware datetimes")
    return format_datetime(moment)


def _head_of(event: dict | None) -> tuple[int, str] | None:
    if event is None:
        return None
    return event["chain"]["seq"], event["chain"]["event_hash"]


def _seq_of(event: dict | None) -> int:
    return -1 if event is None else int(event["chain"]["seq"])


class AuditLog:
    """Append events to PAS chains: local backup first, then the optional head store."""

    def __init__(
        self,
        backup: ChainBackup,
        head_store: ChainHeadStore | None = None,
        delivery: HttpDelivery | None = None,
        clock: Callable[[], datetime] = utc_now,
        actor: str | None = None,
        signing_key: SigningKey | None = None,
    ) -> None:
        self.backup = backup
        self.head_store = head_store
        self.delivery = delivery
        self.clock = clock
        #: Who the writes are made for (the HTTP API's token subject): added to every event appended
        #: as `actor`, unless the body names one. None (the CLI, Dagster): no `actor` field.
        self.actor = actor
        #: The operator's key: it signs every event appended, at its place in the chain (the body as
        #: written, `actor` included: `operator_signature`, `core/operator_signatures.py`). None: no
        #: event is signed.
        self.signing_key = signing_key

    @contextmanager
    def _writer(self, chain_key: str) -> Iterator[None]:
        split_chain_key(chain_key)
        with self.backup.locked(chain_key):
            if self.head_store is None:
                yield
                return
            with self.head_store.chain_writer_lock(chain_key):
                yield

    def _reconcile(self, chain_key: str, txn: ChainHeadTxn) -> ReconcileResult:
        """Bring the backup and the head store to one chain, or raise `ChainDivergence` (module doc)."""
        try:
            return self._reconcile_stores(chain_key, txn)
        except AuditBackupCorrupt as exc:
            raise ChainDivergence(f"{chain_key}: the audit backup cannot be appended to: {exc}") from exc

    def _reconcile_stores(self, chain_key: str, txn: ChainHeadTxn) -> ReconcileResult:
        store_head = txn.head()
        pending = txn.pending()
        store_seq = -1 if store_head is None else store_head[0]
        # The mirror moves its head in the very transaction that stores its events: a row past the head
        # was inserted into the catalog alone (its head row left as it was).
        beyond = txn.events_after(store_seq)
        if beyond:
            raise ChainDivergence(
                f"{chain_key}: the catalog holds {len(beyond)} event(s) after its chain head (seq "
                f"{store_seq}) that no append stored; events one store alone holds are not adopted. "
                "`pcbo verify` shows the difference"
            )
        pending_events = pending[1] if pending is not None and pending[0] == store_seq + 1 else []
        fragment = self.backup.torn_tail(chain_key)
        if fragment is not None:
            backup_seq = _seq_of(self.backup.last_event(chain_key))
            lines = [jcs(e) for e in pending_events]
            k = backup_seq - store_seq  # the pending event the fragment would begin
            ours = 0 <= k < len(lines) and lines[k].startswith(fragment)
            self.backup.remove_torn_tail(chain_key, set_aside=not ours)
        backup_head = _head_of(self.backup.last_event(chain_key))
        backup_seq = -1 if backup_head is None else backup_head[0]
        if backup_seq < store_seq:
            raise ChainDivergence(
                f"{chain_key}: the catalog holds events up to seq {store_seq} that the local audit backup "
                f"{self.backup.location} (up to seq {backup_seq}) lacks; events one store alone holds "
                "are not adopted. Restore the backup from a copy; `pcbo verify` shows the difference"
            )
        if backup_seq == store_seq:
            if backup_head != store_head:
                raise ChainDivergence(
                    f"{chain_key}: backup and head store disagree at seq {backup_seq}: "
                    f"{backup_head[1] if backup_head else None} vs {store_head[1] if store_head else None}"
                )
            events: list[dict] = []
            extra: list[dict] = []
        else:
            events = self.backup.read_chain(chain_key)
            extra = events[store_seq + 1 :]
            findings = verify_chain(events, chain_key, expected_head=backup_head)
            if (
                not findings
                and store_head is not None
                and events[store_seq]["chain"]["event_hash"] != store_head[1]
            ):
                findings = [f"the head store's seq {store_seq} is not the backup's event at that seq"]
            if findings:
                raise ChainDivergence(
                    f"{chain_key}: the audit backup {self.backup.location} does not verify: "
                    + "; ".join(findings[:5])
                )
            if len(extra) > len(pending_events) or [jcs(e) for e in extra] != [
                jcs(e) for e in pending_events[: len(extra)]
            ]:
                raise ChainDivergence(
                    f"{chain_key}: the audit backup {self.backup.location} holds {len(extra)} event(s) "
                    f"after seq {store_seq} that the catalog never recorded as pending: events appended "
                    "to one store alone are not adopted; `pcbo verify` shows them"
                )
        # What the backup holds of the batch is adopted. The catalog's copy fills only a hole before an
        # event of the batch the backup holds beyond its contiguous end (that event's prev_event_hash
        # pins the hole); the rest never reached the backup and is dropped with the pending batch.
        held = [
            i
            for i in range(len(extra), len(pending_events))
            if self.backup.holds_beyond_chain(chain_key, pending_events[i])
        ]
        adopted = pending_events[: (held[-1] if held else len(extra) - 1) + 1]
        hole = adopted[len(extra) :]
        if hole:
            chain = events if events else self.backup.read_chain(chain_key)
            findings = verify_chain(chain + hole, chain_key)
            if findings:
                raise ChainDivergence(
                    f"{chain_key}: the catalog's pending batch does not continue the audit backup "
                    f"{self.backup.location}: " + "; ".join(findings[:5])
                )
            # Only the missing events, one at a time in seq order (each then continues the chain up to
            # the held events after it): never a batch create racing over objects already there.
            for i, event in enumerate(hole, start=len(extra)):
                if i not in held:
                    self.backup.append(chain_key, [event], fsync=True)
        if adopted:
            txn.append(adopted)
        if pending is not None:
            txn.clear_pending()
        return ReconcileResult(
            len(hole) - len(held), len(adopted), _head_of(adopted[-1]) if adopted else backup_head
        )

    def append(
        self,
        chain_key: str,
        event_type: str,
        body: dict,
        fence: ChainState | None = None,
        precondition: Callable[[], None] | None = None,
    ) -> AuditEvent:
        """Append the next event of `chain_key` and return it (durable in the backup on return).

        ValueError for an invalid chain_key, event_type or body (floats, reserved keys);
        ChainDivergence when the backup and the head store hold different chains; `fence` and
        `precondition`: see `append_many`.
        """
        return self.append_many(chain_key, [(event_type, body)], fence, precondition)[0]

    def append_many(
        self,
        chain_key: str,
        items: list[tuple[str, dict]],
        fence: ChainState | None = None,
        precondition: Callable[[], None] | None = None,
    ) -> list[AuditEvent]:
        """Append several events in order under one lock: one backup write and fsync, two head-store
        transactions (a group commit; see the module doc). Returns the events; all or none reach the
        backup.

        `fence`: the chain as the caller replayed it and decided on (a lake writer). Checked under the
        chain's writer lock: events appended since that change none of the lake's partitions (a
        table declaration, a rollout's lifecycle, a SQL target's apply) are replayed into it and the
        append goes on; one that does (a commit, a rollback, a restoration by another writer: a run
        whose lease was taken over while it stalled), or a chain that no longer starts with what it
        replayed, refuses the whole append (`ChainMoved`).

        `precondition`: called once the chain's writer lock is held, before anything is built or
        written; what it raises refuses the whole append (nothing appended). No other writer can
        append to the chain between that call and these events, so a decision taken on the chain
        read there (a promotion's last check for a rejection) holds for the events appended.

        With `signing_key`, each event is signed at its place (`operator_signature`)."""
        if not items:
            return []
        if self.actor is not None:
            items = [
                (kind, body if "actor" in body else {**body, "actor": self.actor}) for kind, body in items
            ]
        timestamp = audit_timestamp(self.clock())
        with self._writer(chain_key):
            if precondition is not None:
                precondition()
            if self.head_store is None:
                head = _head_of(self.backup.last_event(chain_key))
                self._catch_up(chain_key, head, fence)
                events = self._build(chain_key, head, items, timestamp, self.signing_key)
                self.backup.append(chain_key, events, fsync=True)
                return events
            with self.head_store.locked_chain(chain_key) as txn:
                state = self._reconcile(chain_key, txn)
                self._catch_up(chain_key, state.head, fence)
                events = self._build(chain_key, state.head, items, timestamp, self.signing_key)
                txn.set_pending(events[0]["chain"]["seq"], events)
            self.backup.append(chain_key, events, fsync=True)
            with self.head_store.locked_chain(chain_key) as txn:
                if txn.head() != state.head:
                    raise ChainDivergence(f"{chain_key}: the head store's chain moved during an append")
                txn.append(events)
                txn.clear_pending()
        return events

    def check_fence(
        self,
        chain_key: str,
        fence: ChainState,
        stopped: str = "this run wrote no commit point (its intent stays open)",
    ) -> None:
        """`append_many`'s fence without an append: `ChainMoved` when another writer appended an event
        that changes the lake's partitions since `fence` was replayed (others are replayed into it). A
        lake writer checks it right before it writes commit points (`pcbo gc` before a partition's
        removals): one paused past its lease (the lease taken over, even given back since) stops there
        instead of writing over (or removing) what the new holder committed. `stopped`: what the
        message says the caller did not do."""
        with self._writer(chain_key):
            if self.head_store is None:
                head = _head_of(self.backup.last_event(chain_key))
            else:
                with self.head_store.locked_chain(chain_key) as txn:
                    head = txn.head()
            self._catch_up(chain_key, head, fence, stopped)

    def _catch_up(
        self,
        chain_key: str,
        head: tuple[int, str] | None,
        fence: ChainState | None,
        stopped: str = "nothing of this run was appended",
    ) -> None:
        """`append_many`'s fence: replay into `fence` what was appended since it was replayed, or
        `ChainMoved`."""
        if fence is None or fence.head == head:
            return
        events = self.backup.read_chain(chain_key)
        known = fence.length
        if len(events) < known or (known and events[known - 1]["chain"]["event_hash"] != fence.head_hash):
            raise ChainMoved(f"{chain_key}: the audit chain is no longer the one this run read; {stopped}")
        newer = events[known:]
        moved = [e for e in newer if e.get("event_type") in LAKE_EVENTS]
        if moved:
            raise ChainMoved(
                f"{chain_key}: another writer appended {moved[0].get('event_type')} (seq "
                f"{moved[0]['chain']['seq']}) since this run read the chain: was its write lease taken "
                f"over?; {stopped}"
            )
        for event in newer:
            fence.add(event)

    @staticmethod
    def _build(
        chain_key: str,
        head: tuple[int, str] | None,
        items: list[tuple[str, dict]],
        timestamp: str,
        signing_key: SigningKey | None,
    ) -> list[dict]:
        seq, prev = (0, None) if head is None else (head[0] + 1, head[1])
        events = []
        for event_type, body in items:
            if signing_key is not None:
                signature = sign_event(signing_key, chain_key, seq, prev, event_type, body)
                body = {**body, OPERATOR_SIGNATURE: signature}
            event = build_event(
                chain_key=chain_key,
                seq=seq,
                prev_event_hash=prev,
                event_type=event_type,
                timestamp=timestamp,
                body=body,
            )
            events.append(event)
            seq, prev = seq + 1, event["chain"]["event_hash"]
        return events

    def head(self, chain_key: str) -> tuple[int, str] | None:
        """(seq, event_hash) of the chain's last event in the backup, or None."""
        return _head_of(self.backup.last_event(chain_key))

    def sync_to_catalog(self, chain_key: str) -> ReconcileResult:
        """Reconcile the backup and the head store without appending (used by repair): adopts what the
        backup holds of a batch a crash left pending; `ChainDivergence` for anything else (module doc)."""
        with self._writer(chain_key):
            if self.head_store is None:
                return ReconcileResult(0, 0, self.head(chain_key))
            with self.head_store.locked_chain(chain_key) as txn:
                return self._reconcile(chain_key, txn)

    def deliver_pending(self, chain_key: str) -> DeliveryReport | None:
        """Deliver the chain's undelivered events remotely; None when no delivery is configured. With
        the operator's key the delivery cursor is signed, and one that is not is not trusted."""
        if self.delivery is None:
            return None
        return self.delivery.deliver_pending(self.backup, chain_key, self.signing_key)

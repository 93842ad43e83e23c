"""The chain writer: appends PAS events to the local backup and, optionally, a chain-head store.

Writers of one chain are serialised by the backup's chain lock (flock, across processes) and,
when a head store (the catalog) is configured, by its own per-chain transaction as well; the lock
order is always backup, then head store. The next event is built from the head both agree on
after reconciliation, written to the backup (fsync) before anything else, then to the head store.
Remote delivery is never done here: `deliver_pending` is called by the engine between partitions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from pcbo_dagster.audit.backup import AuditBackup
from pcbo_dagster.audit.delivery import DeliveryReport, HttpDelivery
from pcbo_dagster.core.audit_chain import build_event, split_chain_key, verify_chain
from pcbo_dagster.core.errors import IntegrityError
from pcbo_dagster.io.clock import utc_now


class ChainDivergence(IntegrityError):
    """The backup and the head store hold different events at the same position (a fork)."""


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


class ChainHeadStore(Protocol):
    """Where chain heads live besides the backup (the catalog)."""

    def locked_chain(self, chain_key: str) -> AbstractContextManager[ChainHeadTxn]:
        """Exclusive transaction over one chain: commit on normal exit, roll back on an exception."""
        ...


@dataclass(frozen=True)
class ReconcileResult:
    """What reconciliation copied: events added to the backup and to the head store."""

    to_backup: int
    to_head_store: int
    head: tuple[int, str] | None


def format_timestamp(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS[.ffffff]Z` in UTC; ValueError for a naive datetime."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("the audit clock must return timezone-aware datetimes")
    m = moment.astimezone(UTC)
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    if m.microsecond:
        text += f".{m.microsecond:06d}"
    return text + "Z"


def _head_of(event: dict | None) -> tuple[int, str] | None:
    if event is None:
        return None
    return event["chain"]["seq"], event["chain"]["event_hash"]


class AuditLog:
    """Append events to PAS chains: local backup first, then the optional head store."""

    def __init__(
        self,
        backup: AuditBackup,
        head_store: ChainHeadStore | None = None,
        delivery: HttpDelivery | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.backup = backup
        self.head_store = head_store
        self.delivery = delivery
        self.clock = clock

    @contextmanager
    def _session(self, chain_key: str) -> Iterator[tuple[ChainHeadTxn | None, ReconcileResult]]:
        split_chain_key(chain_key)
        with self.backup.locked(chain_key):
            if self.head_store is None:
                yield None, ReconcileResult(0, 0, _head_of(self.backup.last_event(chain_key)))
                return
            with self.head_store.locked_chain(chain_key) as txn:
                yield txn, self._reconcile(chain_key, txn)

    def _reconcile(self, chain_key: str, txn: ChainHeadTxn) -> ReconcileResult:
        backup_head = _head_of(self.backup.last_event(chain_key))
        store_head = txn.head()
        if backup_head == store_head:
            return ReconcileResult(0, 0, backup_head)
        backup_seq = -1 if backup_head is None else backup_head[0]
        store_seq = -1 if store_head is None else store_head[0]
        if backup_seq == store_seq:
            raise ChainDivergence(
                f"{chain_key}: backup and head store disagree at seq {backup_seq}: "
                f"{backup_head[1] if backup_head else None} vs {store_head[1] if store_head else None}"
            )
        if store_seq > backup_seq:
            missing = txn.events_after(backup_seq)
            expected = list(range(backup_seq + 1, store_seq + 1))
            if [e.get("chain", {}).get("seq") for e in missing] != expected:
                raise ChainDivergence(
                    f"{chain_key}: head store events after seq {backup_seq} are not "
                    f"seqs {backup_seq + 1}..{store_seq}"
                )
            if missing[-1]["chain"]["event_hash"] != store_head[1]:
                raise ChainDivergence(f"{chain_key}: head store events do not end at its head")
            try:
                self.backup.append(chain_key, missing, fsync=True)
            except ValueError as exc:
                raise ChainDivergence(
                    f"{chain_key}: head store events do not continue the backup: {exc}"
                ) from exc
            return ReconcileResult(len(missing), 0, store_head)
        events = self.backup.read_chain(chain_key)
        findings = verify_chain(events, chain_key, expected_head=backup_head)
        if findings:
            raise ChainDivergence(
                f"{chain_key}: the local backup does not verify: " + "; ".join(findings[:5])
            )
        if store_head is not None and events[store_seq]["chain"]["event_hash"] != store_head[1]:
            raise ChainDivergence(
                f"{chain_key}: head store head seq {store_seq} is not the backup's event at that seq"
            )
        missing = events[store_seq + 1 :]
        txn.append(missing)
        return ReconcileResult(0, len(missing), backup_head)

    def append(self, chain_key: str, event_type: str, body: dict) -> dict:
        """Append the next event of `chain_key` and return it (durable in the backup on return).

        ValueError for an invalid chain_key, event_type or body (floats, reserved keys);
        ChainDivergence when the backup and the head store hold different chains.
        """
        return self.append_many(chain_key, [(event_type, body)])[0]

    def append_many(self, chain_key: str, items: list[tuple[str, dict]]) -> list[dict]:
        """Append several events in order under one lock: one backup write and fsync, one head-store
        transaction (a group commit). Returns the events; all or none reach the backup."""
        if not items:
            return []
        timestamp = format_timestamp(self.clock())
        with self._session(chain_key) as (txn, state):
            seq, prev = (0, None) if state.head is None else (state.head[0] + 1, state.head[1])
            events = []
            for event_type, body in items:
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
            self.backup.append(chain_key, events, fsync=True)
            if txn is not None:
                txn.append(events)
        return events

    def head(self, chain_key: str) -> tuple[int, str] | None:
        """(seq, event_hash) of the chain's last event in the backup, or None."""
        return _head_of(self.backup.last_event(chain_key))

    def sync_to_catalog(self, chain_key: str) -> ReconcileResult:
        """Reconcile the backup and the head store without appending an event."""
        with self._session(chain_key) as (_, state):
            return state

    def deliver_pending(self, chain_key: str) -> DeliveryReport | None:
        """Deliver the chain's undelivered events remotely; None when no delivery is configured."""
        if self.delivery is None:
            return None
        return self.delivery.deliver_pending(self.backup, chain_key)

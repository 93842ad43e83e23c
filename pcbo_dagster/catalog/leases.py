"""Dataset write leases: one writer of a dataset version at a time, across processes and hosts.

A lease has a holder (an opaque text), the moment it was taken and an expiry; the holder renews it
as its run goes on, and a lease past its expiry (or whose holder is known to be dead) is taken over.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, update

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import (
    CatalogLockBusy,
    Database,
    bound_idle_in_transaction,
    bound_lock_waits,
    insert_ignore,
)
from pcbo_dagster.catalog.runs import register_dataset
from pcbo_dagster.io.clock import utc_now

#: What `try_acquire_lease` answers when another session held the lease row locked for all its wait.
ROW_LOCKED: dict[str, Any] = {"holder": None, "row_locked": True}


#: How long a lease transaction may stall when its lease's TTL is not known (`release_lease`).
LEASE_STALL_SECONDS = 300.0


class _RowChanged(Exception):
    """Another host changed the lease row between our read and our write: read it again."""


class DatasetLeases(Database):
    """The `dataset_leases` table."""

    def try_acquire_lease(
        self,
        dataset: str,
        version_label: str,
        holder: str,
        ttl_seconds: float,
        is_stale: Callable[[str], bool] | None = None,
        lock_wait_seconds: float | None = None,
    ) -> dict[str, Any] | None:
        """Take the write lease of a dataset version for `holder`. Returns None when taken (or
        renewed, when `holder` already has it), else the current holder's row. A lease past its
        expiry, or one `is_stale(holder_text)` says is dead, is taken over. PostgreSQL: a row lock
        another session holds on the lease row (or the dataset's) is waited for up to
        `lock_wait_seconds` (None: `PCBO_LEASE_WAIT_SECONDS`), then `ROW_LOCKED` is returned, with what
        was locked (`locked`: the lease row, or a table `LOCK TABLE` holds)."""
        while True:  # again only when another host changed the row between our read and write
            try:
                return self._try_acquire_lease(
                    dataset, version_label, holder, ttl_seconds, is_stale, lock_wait_seconds
                )
            except CatalogLockBusy as exc:
                return {**ROW_LOCKED, "locked": exc.locked}
            except _RowChanged:
                continue

    def _try_acquire_lease(
        self,
        dataset: str,
        version_label: str,
        holder: str,
        ttl_seconds: float,
        is_stale: Callable[[str], bool] | None,
        lock_wait_seconds: float | None,
    ) -> dict[str, Any] | None:
        lease = t.dataset_leases
        where = (lease.c.dataset == dataset, lease.c.version_label == version_label)
        with self.write() as conn:
            self._bound_stalls(conn, ttl_seconds)
            if self.dialect == "postgresql" and lock_wait_seconds is not None:
                bound_lock_waits(conn, lock_wait_seconds)
            register_dataset(conn, dataset, version_label)
            # The row locked (PostgreSQL: FOR UPDATE; SQLite's write transaction holds the whole
            # file) until this transaction ends: two hosts never both take the same expired lease.
            row = conn.execute(select(lease).where(*where).with_for_update()).first()
            # (the time once the row is ours: a wait for its lock may have outlasted its lease)
            now = utc_now()
            expires = datetime.fromtimestamp(now.timestamp() + ttl_seconds, UTC)
            if row is None:
                first = {
                    "dataset": dataset,
                    "version_label": version_label,
                    "holder": holder,
                    "acquired_at": now,
                    "expires_at": expires,
                }
                if insert_ignore(conn, lease, first, ["dataset", "version_label"]):
                    return None
                raise _RowChanged  # another host inserted it first: judge its row
            current = dict(row._mapping)
            takeover = (
                current["holder"] == holder
                or current["expires_at"] <= now
                or (is_stale is not None and is_stale(current["holder"]))
            )
            if not takeover:
                return current
            done = conn.execute(
                update(lease)
                .where(*where, lease.c.holder == current["holder"])
                .values(
                    holder=holder,
                    acquired_at=now if current["holder"] != holder else current["acquired_at"],
                    expires_at=expires,
                )
            )
            if done.rowcount == 1:
                return None
            raise _RowChanged

    def renew_lease(self, dataset: str, version_label: str, holder: str, ttl_seconds: float) -> bool:
        """Extend `holder`'s lease by `ttl_seconds` from now, past its expiry too while nobody took it
        over. False when the lease is no longer `holder`'s: another's, or none at all (taken over and
        given back since, by a run or a `pcbo gc` that may have changed the lake meanwhile): a lease
        once lost is never taken back by its renewal."""
        lease = t.dataset_leases
        expires = datetime.fromtimestamp(utc_now().timestamp() + ttl_seconds, UTC)
        with self.write() as conn:
            self._bound_stalls(conn, ttl_seconds)
            done = conn.execute(
                update(lease)
                .where(
                    lease.c.dataset == dataset,
                    lease.c.version_label == version_label,
                    lease.c.holder == holder,
                )
                .values(expires_at=expires)
            )
            return done.rowcount == 1

    def _bound_stalls(self, conn: Connection, ttl_seconds: float) -> None:
        """PostgreSQL: a host stopped inside this lease transaction (between the row's lock and the
        COMMIT) holds the lease row, which every writer of the dataset locks, no longer than the
        lease's TTL: the server then ends its session (`bound_idle_in_transaction`). Before, it held
        the row for as long as it stayed stopped, and every other host waited its whole
        `PCBO_LEASE_WAIT_SECONDS` on a lease long expired."""
        if self.dialect == "postgresql":
            bound_idle_in_transaction(conn, max(ttl_seconds, 1.0))

    def release_lease(
        self, dataset: str, version_label: str, holder: str, ttl_seconds: float = LEASE_STALL_SECONDS
    ) -> None:
        """Give the lease up, if `holder` still has it (`ttl_seconds`: its TTL, `_bound_stalls`)."""
        lease = t.dataset_leases
        with self.write() as conn:
            self._bound_stalls(conn, ttl_seconds)
            conn.execute(
                lease.delete().where(
                    lease.c.dataset == dataset,
                    lease.c.version_label == version_label,
                    lease.c.holder == holder,
                )
            )

    def leases(self) -> list[dict[str, Any]]:
        """Every lease held now (or left behind by a run that died), by dataset."""
        lease = t.dataset_leases
        with self.read() as conn:
            rows = conn.execute(select(lease).order_by(lease.c.dataset, lease.c.version_label))
            return [dict(r._mapping) for r in rows]

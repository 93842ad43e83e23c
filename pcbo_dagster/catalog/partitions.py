"""Partition versions, their lineage (source -> partition) and discrepancies found by the checks.

A partition has at most one 'committed' version; committing another supersedes it, and a rollback
marks a version 'rolled_back' and may make an older one 'committed' again. On PostgreSQL writers of
one partition are serialised by an advisory lock (SQLite holds its database write lock already).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, TypedDict, cast

from sqlalchemy import Connection, bindparam, select, text, update
from sqlalchemy.exc import OperationalError

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import (
    CatalogLockBusy,
    Database,
    bound_lock_waits,
    insert_ignore,
    insert_ignore_many,
    lock_not_granted,
)
from pcbo_dagster.catalog.runs import register_dataset
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.io.clock import utc_now
from pcbo_dagster.io.env_vars import lease_wait_seconds

#: The unique key of a lineage row: a partition version's source is recorded once.
LINEAGE_KEY = ["dataset", "version_label", "partition_key", "partition_version", "source_uri"]


class PartitionVersionRow(TypedDict):
    """A row of `partitions`: one version of one partition, as the catalog records it."""

    dataset: str
    version_label: str
    partition_key: str
    version: int
    run_id: str
    status: str  # committed | superseded | rolled_back
    manifest_uri: str
    manifest_checksum: str
    merkle_root: str
    record_count: int
    event_hash: str | None
    files: list[dict[str, Any]]
    committed_at: datetime
    rolled_back_at: datetime | None


class PartitionRecords(Database):
    """The `partitions`, `lineage` and `discrepancy_events` tables."""

    def record_partition_version(
        self,
        *,
        dataset: str,
        version_label: str,
        partition_key: str,
        version: int,
        run_id: str,
        manifest_uri: str,
        manifest_checksum: str,
        merkle_root: str,
        record_count: int,
        event_hash: str | None,
        files: list[dict[str, Any]],
        source_uri: str | None,
        source_kind: str,
        plan_hash: str,
        decision_hash: str,
    ) -> None:
        """Commit a partition version: supersede the other committed one, insert it and its lineage.

        Idempotent for the same (partition, version, manifest_checksum); a different checksum for an
        existing version raises ValueError.
        """
        row = {
            "dataset": dataset, "version_label": version_label, "partition_key": partition_key,
            "version": version, "run_id": run_id, "manifest_uri": manifest_uri,
            "manifest_checksum": manifest_checksum, "merkle_root": merkle_root, "record_count": record_count,
            "event_hash": event_hash, "files": files, "source_uri": source_uri, "source_kind": source_kind,
            "plan_hash": plan_hash, "decision_hash": decision_hash,
        }  # fmt: skip
        self.record_partition_versions([row])

    def record_partition_versions(self, rows: list[dict[str, Any]]) -> None:
        """`record_partition_version` for many partitions in one transaction (keyword dicts).

        Versions not yet recorded go in with a few multi-row statements; the rare re-recording of an
        existing (partition, version) takes the one-by-one path with its checks.
        """
        if not rows:
            return
        p = t.partitions
        with self.write() as conn:
            _bound_partition_lock_waits(conn)
            fresh: list[dict[str, Any]] = []
            for (dataset, version_label), group in _group_by_dataset(rows).items():
                register_dataset(conn, dataset, version_label)
                for row in group:
                    _lock_partition(conn, dataset, version_label, row["partition_key"])
                recorded = {
                    (r.partition_key, r.version)
                    for r in conn.execute(
                        select(p.c.partition_key, p.c.version).where(
                            p.c.dataset == dataset,
                            p.c.version_label == version_label,
                            p.c.partition_key.in_([r["partition_key"] for r in group]),
                        )
                    )
                }
                for row in group:
                    if (row["partition_key"], row["version"]) in recorded:
                        _record_partition_version(conn, row)
                    else:
                        fresh.append(row)
            if not fresh:
                return
            conn.execute(
                update(p)
                .where(
                    p.c.dataset == bindparam("b_dataset"),
                    p.c.version_label == bindparam("b_version_label"),
                    p.c.partition_key == bindparam("b_partition_key"),
                    p.c.status == "committed",
                )
                .values(status="superseded"),
                [
                    {
                        "b_dataset": r["dataset"],
                        "b_version_label": r["version_label"],
                        "b_partition_key": r["partition_key"],
                    }
                    for r in fresh
                ],
            )
            now = utc_now()
            conn.execute(p.insert(), [_committed_row(r, now) for r in fresh])
            insert_ignore_many(conn, t.lineage, [_lineage_row(r) for r in fresh], LINEAGE_KEY)

    def mark_partition_rolled_back(
        self,
        *,
        dataset: str,
        version_label: str,
        partition_key: str,
        version: int,
        restored_version: int | None,
    ) -> None:
        """`version` becomes 'rolled_back'; `restored_version`, if given, becomes 'committed' again."""
        p = t.partitions
        where_partition = (
            p.c.dataset == dataset,
            p.c.version_label == version_label,
            p.c.partition_key == partition_key,
        )
        name = f"{dataset}/{version_label}/{partition_key}"
        with self.write() as conn:
            _bound_partition_lock_waits(conn)
            _lock_partition(conn, dataset, version_label, partition_key)
            status = conn.execute(select(p.c.status).where(*where_partition, p.c.version == version)).scalar()
            if status is None:
                raise KeyError(f"partition {name} has no version {version}")
            if status != "rolled_back":
                conn.execute(
                    update(p)
                    .where(*where_partition, p.c.version == version)
                    .values(status="rolled_back", rolled_back_at=utc_now())
                )
            if restored_version is None:
                return
            if restored_version == version:
                raise ValueError(f"partition {name}: cannot restore the version being rolled back")
            restored = conn.execute(
                select(p.c.status).where(*where_partition, p.c.version == restored_version)
            ).scalar()
            if restored is None:
                raise KeyError(f"partition {name} has no version {restored_version} to restore")
            conn.execute(
                update(p)
                .where(*where_partition, p.c.version != restored_version, p.c.status == "committed")
                .values(status="superseded")
            )
            if restored != "committed":
                conn.execute(
                    update(p)
                    .where(*where_partition, p.c.version == restored_version)
                    .values(status="committed")
                )

    def current_partition(
        self, dataset: str, version_label: str, partition_key: str
    ) -> PartitionVersionRow | None:
        """The 'committed' version row of a partition, or None."""
        p = t.partitions
        with self.read() as conn:
            row = conn.execute(
                select(p).where(
                    p.c.dataset == dataset,
                    p.c.version_label == version_label,
                    p.c.partition_key == partition_key,
                    p.c.status == "committed",
                )
            ).first()
        return None if row is None else _partition_row(row)

    def current_partitions(self, dataset: str, version_label: str) -> dict[str, PartitionVersionRow]:
        """The 'committed' row of every partition of a dataset version, by partition key."""
        p = t.partitions
        with self.read() as conn:
            rows = conn.execute(
                select(p).where(
                    p.c.dataset == dataset, p.c.version_label == version_label, p.c.status == "committed"
                )
            ).all()
        return {row.partition_key: _partition_row(row) for row in rows}

    def partition_versions(
        self, dataset: str | None = None, version_label: str | None = None
    ) -> list[PartitionVersionRow]:
        """Every partition version row, ordered by dataset, version_label, partition_key, version."""
        p = t.partitions
        stmt = select(p).order_by(p.c.dataset, p.c.version_label, p.c.partition_key, p.c.version)
        if dataset is not None:
            stmt = stmt.where(p.c.dataset == dataset)
        if version_label is not None:
            stmt = stmt.where(p.c.version_label == version_label)
        with self.read() as conn:
            return [_partition_row(r) for r in conn.execute(stmt)]

    def lineage(self, dataset: str | None = None, version_label: str | None = None) -> list[dict[str, Any]]:
        """Lineage rows (source_uri None when there was none), in insertion order."""
        lin = t.lineage
        stmt = select(lin).order_by(lin.c.id)
        if dataset is not None:
            stmt = stmt.where(lin.c.dataset == dataset)
        if version_label is not None:
            stmt = stmt.where(lin.c.version_label == version_label)
        with self.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        for row in rows:
            row["source_uri"] = row["source_uri"] or None
        return rows

    # -- discrepancies ------------------------------------------------------------------------

    def record_discrepancy(
        self,
        *,
        run_id: str,
        dataset: str,
        version_label: str,
        partition_key: str | None,
        kind: str,
        detail: dict[str, Any],
    ) -> None:
        """Append a discrepancy event (the table is append-only)."""
        with self.write() as conn:
            conn.execute(
                t.discrepancy_events.insert().values(
                    run_id=run_id,
                    dataset=dataset,
                    version_label=version_label,
                    partition_key=partition_key,
                    kind=kind,
                    detail=compact_text(detail),
                    recorded_at=utc_now(),
                )
            )

    def discrepancies(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Discrepancy events (detail parsed), oldest first."""
        d = t.discrepancy_events
        stmt = select(d).order_by(d.c.id)
        if run_id is not None:
            stmt = stmt.where(d.c.run_id == run_id)
        with self.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        for row in rows:
            row["detail"] = json.loads(row["detail"])
        return rows


def _record_partition_version(conn: Connection, row: dict[str, Any]) -> None:
    """`record_partition_version` of one row in `conn`, with every check: the path taken for a
    (partition, version) already recorded. Idempotent for the same manifest_checksum; a different
    checksum for an existing version raises ValueError."""
    dataset, version_label, partition_key = row["dataset"], row["version_label"], row["partition_key"]
    version, manifest_checksum, event_hash = row["version"], row["manifest_checksum"], row["event_hash"]
    p = t.partitions
    where_partition = (
        p.c.dataset == dataset,
        p.c.version_label == version_label,
        p.c.partition_key == partition_key,
    )
    _lock_partition(conn, dataset, version_label, partition_key)
    register_dataset(conn, dataset, version_label)
    existing = conn.execute(
        select(p.c.manifest_checksum, p.c.status).where(*where_partition, p.c.version == version)
    ).first()
    if existing is not None and existing.manifest_checksum != manifest_checksum:
        raise ValueError(
            f"partition {dataset}/{version_label}/{partition_key} version {version} is already "
            f"recorded with manifest checksum {existing.manifest_checksum}, not {manifest_checksum}"
        )
    conn.execute(
        update(p)
        .where(*where_partition, p.c.version != version, p.c.status == "committed")
        .values(status="superseded")
    )
    if existing is None:
        conn.execute(p.insert().values(**_committed_row(row, utc_now())))
    else:
        values: dict[str, Any] = {}
        if existing.status != "committed":
            values["status"] = "committed"
        if event_hash is not None:
            values["event_hash"] = event_hash
        if values:
            conn.execute(update(p).where(*where_partition, p.c.version == version).values(**values))
    insert_ignore(conn, t.lineage, _lineage_row(row), LINEAGE_KEY)


def _committed_row(row: dict[str, Any], committed_at: datetime) -> dict[str, Any]:
    """The `partitions` row of a partition version being recorded as 'committed'."""
    return {
        "dataset": row["dataset"],
        "version_label": row["version_label"],
        "partition_key": row["partition_key"],
        "version": row["version"],
        "run_id": row["run_id"],
        "status": "committed",
        "manifest_uri": row["manifest_uri"],
        "manifest_checksum": row["manifest_checksum"],
        "merkle_root": row["merkle_root"],
        "record_count": row["record_count"],
        "event_hash": row["event_hash"],
        "files": compact_text(row["files"]),
        "committed_at": committed_at,
        "rolled_back_at": None,
    }


def _lineage_row(row: dict[str, Any]) -> dict[str, Any]:
    """The lineage row of a partition version being recorded (no source: an empty source_uri)."""
    return {
        "dataset": row["dataset"],
        "version_label": row["version_label"],
        "partition_key": row["partition_key"],
        "run_id": row["run_id"],
        "partition_version": row["version"],
        "source_uri": row["source_uri"] or "",
        "source_kind": row["source_kind"],
        "plan_hash": row["plan_hash"],
        "decision_hash": row["decision_hash"],
    }


def _lock_partition(conn: Connection, dataset: str, version_label: str, partition_key: str) -> None:
    """PostgreSQL: serialise writers of one partition (SQLite already holds the write lock)."""
    if conn.dialect.name == "postgresql":
        try:
            conn.execute(
                text("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(:k, 0))"),
                {"k": compact_text(["pcbo.partition", dataset, version_label, partition_key])},
            )
        except OperationalError as exc:
            if not lock_not_granted(exc):
                raise
            raise CatalogLockBusy(
                f"the catalog's partition lock of {dataset}/{version_label}/{partition_key} is held by "
                f"another catalog session (pg_locks names it); waited {lease_wait_seconds():g} s "
                "(PCBO_LEASE_WAIT_SECONDS); nothing was recorded"
            ) from None


def _bound_partition_lock_waits(conn: Connection) -> None:
    """PostgreSQL: the partition locks (`_lock_partition`) of `conn`'s transaction, and whatever else
    it waits for, are waited for `PCBO_LEASE_WAIT_SECONDS` at most (a writer holds one for a commit)."""
    if conn.dialect.name == "postgresql":
        bound_lock_waits(conn, lease_wait_seconds())


def _partition_row(row: Any) -> PartitionVersionRow:
    out = dict(row._mapping)
    for column in ("version", "record_count"):  # SQLite hands back what was stored, of any type
        if not isinstance(out[column], int) or isinstance(out[column], bool):
            raise TypeError(f"partitions.{column} is not an integer: not a row pcbo writes")
    out["files"] = json.loads(out["files"])
    return cast(PartitionVersionRow, out)


def _group_by_dataset(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["version_label"]), []).append(row)
    return groups

"""`CatalogStore`: runs, partition versions, lineage, discrepancies and the audit chain mirror.

SQLite (the embedded default) and PostgreSQL. Every write is one transaction; on SQLite write
transactions start with `BEGIN IMMEDIATE`, so writers queue on the database lock (busy timeout 30 s)
instead of failing on a read-to-write lock upgrade.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, create_engine, event, select, text, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.io.clock import utc_now

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Key of the PostgreSQL advisory lock taken around migrations ("pcbo" + "migr" as ASCII).
MIGRATION_LOCK_KEY = 0x7063626F6D696772
#: The newest Alembic revision in migrations/versions (a test holds it equal to Alembic's head).
HEAD_REVISION = "0003"
_BEGIN_OPTION = "pcbo_sqlite_begin"


def default_catalog_url(home: str | os.PathLike[str]) -> str:
    """`sqlite:///<absolute home>/catalog.db`."""
    return f"sqlite:///{Path(home).resolve() / 'catalog.db'}"


def _normalise_url(url: str) -> URL:
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _is_sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    )


class ChainTransaction:
    """The open transaction of `CatalogStore.locked_chain`, holding the chain's head lock."""

    def __init__(self, conn: Connection, chain_key: str) -> None:
        self._conn = conn
        self.chain_key = chain_key

    def head(self) -> tuple[int, str] | None:
        """(seq, event_hash) of the last stored event; None when the chain is empty."""
        row = self._conn.execute(
            select(t.audit_chain_heads.c.seq, t.audit_chain_heads.c.event_hash).where(
                t.audit_chain_heads.c.chain_key == self.chain_key
            )
        ).first()
        if row is None or row.seq < 0:
            return None
        return int(row.seq), str(row.event_hash)

    def events_after(self, seq: int) -> list[dict[str, Any]]:
        """Parsed events with seq > `seq`, in seq order."""
        rows = self._conn.execute(
            select(t.audit_events.c.event_json)
            .where(t.audit_events.c.chain_key == self.chain_key, t.audit_events.c.seq > seq)
            .order_by(t.audit_events.c.seq)
        )
        return [json.loads(r.event_json) for r in rows]

    def append(self, events: list[dict[str, Any]]) -> None:
        """Store events that extend the head, in order, and move the head (ValueError on a bad link)."""
        head = self.head()
        seq, prev = (head[0], head[1]) if head is not None else (-1, None)
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
        except IntegrityError as exc:
            raise ValueError(
                f"event refused by the catalog (duplicate seq or event_hash): {exc.orig}"
            ) from exc
        _upsert(
            self._conn, t.audit_chain_heads, {"chain_key": self.chain_key, "seq": seq, "event_hash": prev}
        )


def _group_by_dataset(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["version_label"]), []).append(row)
    return groups


def _insert_ignore(conn: Connection, table: Any, values: dict[str, Any], keys: list[str]) -> bool:
    """INSERT ... ON CONFLICT (keys) DO NOTHING; True when a row was inserted."""
    dialect = pg_dialect if conn.dialect.name == "postgresql" else sqlite_dialect
    stmt = dialect.insert(table).values(**values).on_conflict_do_nothing(index_elements=keys)
    return conn.execute(stmt).rowcount == 1


def _upsert(conn: Connection, table: Any, values: dict[str, Any]) -> None:
    dialect = pg_dialect if conn.dialect.name == "postgresql" else sqlite_dialect
    keys = [c.name for c in table.primary_key.columns]
    stmt = dialect.insert(table).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=keys, set_={k: stmt.excluded[k] for k in values if k not in keys}
    )
    conn.execute(stmt)


class CatalogStore:
    """The catalog on a SQLAlchemy URL. One instance per process (do not share across fork)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._url = _normalise_url(url)
        self.dialect = self._url.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(
                f"unsupported catalog URL {self._url.render_as_string()!r}: sqlite or postgresql"
            )
        self._lock = threading.Lock()
        self._engine: Engine | None = None

    # -- engine -------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (created on first use)."""
        with self._lock:
            if self._engine is None:
                self._engine = self._create_engine()
            return self._engine

    def _create_engine(self) -> Engine:
        if self.dialect == "postgresql":
            return create_engine(self._url, pool_pre_ping=True)
        kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}}
        memory = _is_sqlite_memory(self._url)
        if memory:
            kwargs["poolclass"] = StaticPool
            kwargs["connect_args"]["check_same_thread"] = False
        elif self._url.database:
            Path(self._url.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(self._url, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
            cur = dbapi_conn.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
                if not memory:
                    _retry_locked(lambda: cur.execute("PRAGMA journal_mode = WAL"))
                cur.execute("PRAGMA synchronous = NORMAL")
                cur.execute("PRAGMA foreign_keys = ON")
            finally:
                cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE); commits on success."""
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn = conn.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def close(self) -> None:
        """Dispose of the engine's connections (the store can be used again afterwards)."""
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def is_missing_sqlite_file(self) -> bool:
        """True for a SQLite catalog whose file does not exist yet (opening it would create it)."""
        database = self._url.database
        return (
            self.dialect == "sqlite"
            and not _is_sqlite_memory(self._url)
            and bool(database)
            and not Path(database).expanduser().exists()
        )

    # -- migrations ---------------------------------------------------------------------------

    def at_head(self) -> bool:
        """True when the schema is already at HEAD_REVISION (a cheap check that skips Alembic)."""
        try:
            with self._read() as conn:
                row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        except SQLAlchemyError:
            return False
        return row is not None and row[0] == HEAD_REVISION

    def migrate(self) -> None:
        """Upgrade the schema to the newest revision; idempotent and safe to run concurrently."""
        if self.at_head():
            return
        from alembic import command
        from alembic.config import Config

        with self._write() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
            cfg.set_main_option(
                "sqlalchemy.url", self._url.render_as_string(hide_password=False).replace("%", "%%")
            )
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # -- datasets and runs --------------------------------------------------------------------

    def ensure_dataset(self, dataset: str, version_label: str) -> None:
        """Register (dataset, version_label) if it is new."""
        with self._write() as conn:
            self._ensure_dataset(conn, dataset, version_label)

    @staticmethod
    def _ensure_dataset(conn: Connection, dataset: str, version_label: str) -> None:
        _insert_ignore(
            conn,
            t.datasets,
            {"dataset": dataset, "version_label": version_label, "first_seen_at": utc_now()},
            ["dataset", "version_label"],
        )

    def datasets(self) -> list[dict[str, Any]]:
        """All registered (dataset, version_label) rows."""
        with self._read() as conn:
            rows = conn.execute(select(t.datasets).order_by(t.datasets.c.dataset, t.datasets.c.version_label))
            return [dict(r._mapping) for r in rows]

    def start_run(
        self,
        run_id: str,
        dataset: str,
        version_label: str,
        plan_hash: str,
        decision_hash: str,
        metadata: dict[str, Any],
    ) -> None:
        """Insert the run as 'running'; a known run_id is set 'running' again (finished_at cleared)."""
        with self._write() as conn:
            self._ensure_dataset(conn, dataset, version_label)
            inserted = _insert_ignore(
                conn,
                t.runs,
                {
                    "run_id": run_id,
                    "dataset": dataset,
                    "version_label": version_label,
                    "plan_hash": plan_hash,
                    "decision_hash": decision_hash,
                    "status": "running",
                    "metadata": compact_text(metadata),
                    "started_at": utc_now(),
                    "finished_at": None,
                    "summary": None,
                },
                ["run_id"],
            )
            if not inserted:
                conn.execute(
                    update(t.runs).where(t.runs.c.run_id == run_id).values(status="running", finished_at=None)
                )

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        """Set the run's final status, summary and finished_at (KeyError for an unknown run)."""
        with self._write() as conn:
            result = conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id)
                .values(status=status, summary=compact_text(summary), finished_at=utc_now())
            )
            if result.rowcount != 1:
                raise KeyError(f"unknown run {run_id!r}")

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The run row (metadata and summary parsed), or None."""
        with self._read() as conn:
            row = conn.execute(select(t.runs).where(t.runs.c.run_id == run_id)).first()
        if row is None:
            return None
        out = dict(row._mapping)
        out["metadata"] = json.loads(out["metadata"])
        out["summary"] = None if out["summary"] is None else json.loads(out["summary"])
        return out

    # -- partitions and lineage ---------------------------------------------------------------

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
        with self._write() as conn:
            fresh: list[dict[str, Any]] = []
            for (dataset, version_label), group in _group_by_dataset(rows).items():
                self._ensure_dataset(conn, dataset, version_label)
                for row in group:
                    self._lock_partition(conn, dataset, version_label, row["partition_key"])
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
                        self._record_partition_version(conn, row)
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
            conn.execute(
                p.insert(),
                [
                    {
                        "dataset": r["dataset"],
                        "version_label": r["version_label"],
                        "partition_key": r["partition_key"],
                        "version": r["version"],
                        "run_id": r["run_id"],
                        "status": "committed",
                        "manifest_uri": r["manifest_uri"],
                        "manifest_checksum": r["manifest_checksum"],
                        "merkle_root": r["merkle_root"],
                        "record_count": r["record_count"],
                        "event_hash": r["event_hash"],
                        "files": compact_text(r["files"]),
                        "committed_at": now,
                        "rolled_back_at": None,
                    }
                    for r in fresh
                ],
            )
            dialect = pg_dialect if conn.dialect.name == "postgresql" else sqlite_dialect
            conn.execute(
                dialect.insert(t.lineage).on_conflict_do_nothing(
                    index_elements=[
                        "dataset",
                        "version_label",
                        "partition_key",
                        "partition_version",
                        "source_uri",
                    ]
                ),
                [
                    {
                        "dataset": r["dataset"],
                        "version_label": r["version_label"],
                        "partition_key": r["partition_key"],
                        "run_id": r["run_id"],
                        "partition_version": r["version"],
                        "source_uri": r["source_uri"] or "",
                        "source_kind": r["source_kind"],
                        "plan_hash": r["plan_hash"],
                        "decision_hash": r["decision_hash"],
                    }
                    for r in fresh
                ],
            )

    # -- dataset write leases -------------------------------------------------------------------

    def try_acquire_lease(
        self,
        dataset: str,
        version_label: str,
        holder: str,
        ttl_seconds: float,
        is_stale: Any = None,
    ) -> dict[str, Any] | None:
        """Take the write lease of a dataset version for `holder`. Returns None when taken (or
        renewed, when `holder` already has it), else the current holder's row. A lease past its
        expiry, or one `is_stale(holder_text)` says is dead, is taken over."""
        lease = t.dataset_leases
        now = utc_now()
        expires = datetime.fromtimestamp(now.timestamp() + ttl_seconds, UTC)
        where = (lease.c.dataset == dataset, lease.c.version_label == version_label)
        with self._write() as conn:
            self._ensure_dataset(conn, dataset, version_label)
            row = conn.execute(select(lease).where(*where)).first()
            if row is None:
                conn.execute(
                    lease.insert().values(
                        dataset=dataset,
                        version_label=version_label,
                        holder=holder,
                        acquired_at=now,
                        expires_at=expires,
                    )
                )
                return None
            current = dict(row._mapping)
            takeover = (
                current["holder"] == holder
                or current["expires_at"] <= now
                or (is_stale is not None and is_stale(current["holder"]))
            )
            if not takeover:
                return current
            conn.execute(
                update(lease)
                .where(*where, lease.c.holder == current["holder"])
                .values(
                    holder=holder,
                    acquired_at=now if current["holder"] != holder else current["acquired_at"],
                    expires_at=expires,
                )
            )
            return None

    def release_lease(self, dataset: str, version_label: str, holder: str) -> None:
        lease = t.dataset_leases
        with self._write() as conn:
            conn.execute(
                lease.delete().where(
                    lease.c.dataset == dataset,
                    lease.c.version_label == version_label,
                    lease.c.holder == holder,
                )
            )

    def current_partitions(self, dataset: str, version_label: str) -> dict[str, dict[str, Any]]:
        """The 'committed' row of every partition of a dataset version, by partition key."""
        p = t.partitions
        with self._read() as conn:
            rows = conn.execute(
                select(p).where(
                    p.c.dataset == dataset, p.c.version_label == version_label, p.c.status == "committed"
                )
            ).all()
        return {row.partition_key: self._partition_row(row) for row in rows}

    def _record_partition_version(self, conn: Connection, row: dict[str, Any]) -> None:
        """Commit a partition version: supersede the other committed one, insert it and its lineage.

        Idempotent for the same (partition, version, manifest_checksum); a different checksum for an
        existing version raises ValueError.
        """
        dataset, version_label, partition_key = row["dataset"], row["version_label"], row["partition_key"]
        version, manifest_checksum, event_hash = row["version"], row["manifest_checksum"], row["event_hash"]
        pk = {"dataset": dataset, "version_label": version_label, "partition_key": partition_key}
        p = t.partitions
        where_partition = (
            p.c.dataset == dataset,
            p.c.version_label == version_label,
            p.c.partition_key == partition_key,
        )
        self._lock_partition(conn, dataset, version_label, partition_key)
        self._ensure_dataset(conn, dataset, version_label)
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
            conn.execute(
                p.insert().values(
                    **pk,
                    version=version,
                    run_id=row["run_id"],
                    status="committed",
                    manifest_uri=row["manifest_uri"],
                    manifest_checksum=manifest_checksum,
                    merkle_root=row["merkle_root"],
                    record_count=row["record_count"],
                    event_hash=event_hash,
                    files=compact_text(row["files"]),
                    committed_at=utc_now(),
                    rolled_back_at=None,
                )
            )
        else:
            values: dict[str, Any] = {}
            if existing.status != "committed":
                values["status"] = "committed"
            if event_hash is not None:
                values["event_hash"] = event_hash
            if values:
                conn.execute(update(p).where(*where_partition, p.c.version == version).values(**values))
        _insert_ignore(
            conn,
            t.lineage,
            {
                **pk,
                "run_id": row["run_id"],
                "partition_version": version,
                "source_uri": row["source_uri"] or "",
                "source_kind": row["source_kind"],
                "plan_hash": row["plan_hash"],
                "decision_hash": row["decision_hash"],
            },
            ["dataset", "version_label", "partition_key", "partition_version", "source_uri"],
        )

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
        with self._write() as conn:
            self._lock_partition(conn, dataset, version_label, partition_key)
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

    def _lock_partition(self, conn: Connection, dataset: str, version_label: str, partition_key: str) -> None:
        """PostgreSQL: serialise writers of one partition (SQLite already holds the write lock)."""
        if self.dialect == "postgresql":
            conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                {"k": compact_text(["pcbo.partition", dataset, version_label, partition_key])},
            )

    @staticmethod
    def _partition_row(row: Any) -> dict[str, Any]:
        out = dict(row._mapping)
        out["files"] = json.loads(out["files"])
        return out

    def partition_versions(
        self, dataset: str | None = None, version_label: str | None = None
    ) -> list[dict[str, Any]]:
        """Every partition version row, ordered by dataset, version_label, partition_key, version."""
        p = t.partitions
        stmt = select(p).order_by(p.c.dataset, p.c.version_label, p.c.partition_key, p.c.version)
        if dataset is not None:
            stmt = stmt.where(p.c.dataset == dataset)
        if version_label is not None:
            stmt = stmt.where(p.c.version_label == version_label)
        with self._read() as conn:
            return [self._partition_row(r) for r in conn.execute(stmt)]

    def current_partition(
        self, dataset: str, version_label: str, partition_key: str
    ) -> dict[str, Any] | None:
        """The 'committed' version row of a partition, or None."""
        p = t.partitions
        with self._read() as conn:
            row = conn.execute(
                select(p).where(
                    p.c.dataset == dataset,
                    p.c.version_label == version_label,
                    p.c.partition_key == partition_key,
                    p.c.status == "committed",
                )
            ).first()
        return None if row is None else self._partition_row(row)

    def lineage(self, dataset: str | None = None, version_label: str | None = None) -> list[dict[str, Any]]:
        """Lineage rows (source_uri None when there was none), in insertion order."""
        lin = t.lineage
        stmt = select(lin).order_by(lin.c.id)
        if dataset is not None:
            stmt = stmt.where(lin.c.dataset == dataset)
        if version_label is not None:
            stmt = stmt.where(lin.c.version_label == version_label)
        with self._read() as conn:
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
        with self._write() as conn:
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
        with self._read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        for row in rows:
            row["detail"] = json.loads(row["detail"])
        return rows

    # -- audit chain mirror -------------------------------------------------------------------

    @contextlib.contextmanager
    def locked_chain(self, chain_key: str) -> Iterator[ChainTransaction]:
        """One transaction holding the chain's head lock; commits on normal exit, rolls back on error.

        Concurrent writers of one chain (threads, processes, hosts on PostgreSQL) serialise here. On
        SQLite this holds the database write lock: do not open another write on this store inside it.
        """
        with self._write() as conn:
            _insert_ignore(
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

    def audit_events(self, chain_key: str) -> list[dict[str, Any]]:
        """Parsed events of a chain, in seq order."""
        with self._read() as conn:
            rows = conn.execute(
                select(t.audit_events.c.event_json)
                .where(t.audit_events.c.chain_key == chain_key)
                .order_by(t.audit_events.c.seq)
            )
            return [json.loads(r.event_json) for r in rows]

    def chain_heads(self) -> dict[str, tuple[int, str]]:
        """{chain_key: (seq, event_hash)} of every non-empty chain."""
        h = t.audit_chain_heads
        with self._read() as conn:
            rows = conn.execute(select(h.c.chain_key, h.c.seq, h.c.event_hash).where(h.c.seq >= 0))
            return {r.chain_key: (int(r.seq), str(r.event_hash)) for r in rows}


def _retry_locked(fn: Any, attempts: int = 50, delay: float = 0.1) -> Any:
    """Call `fn`, retrying while SQLite says the database is locked or busy."""
    for i in range(attempts):
        try:
            return fn()
        except (sqlite3.OperationalError, OperationalError) as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or i == attempts - 1:
                raise
            time.sleep(delay)
    return None

"""SQLAlchemy Core tables of the catalog (the migrations in `migrations/versions` create them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

metadata = MetaData()


#: Tables whose rows are only ever added (database triggers refuse UPDATE, DELETE, REPLACE and, on
#: PostgreSQL, TRUNCATE: migrations 0001, 0003, 0004). `pcbo verify` reports a dropped trigger.
APPEND_ONLY_TABLES = (
    "audit_events",
    "discrepancy_events",
    "rollout_log",
    "rollout_approvals",
    "soak_evaluations",
)


def append_only_trigger_names(dialect: str, tables: tuple[str, ...] = APPEND_ONLY_TABLES) -> list[str]:
    """The triggers the migrations create to keep `tables` append-only on `dialect`."""
    if dialect == "sqlite":
        return [f"{t}_{action}" for t in tables for action in ("no_update", "no_delete", "no_replace")]
    return [f"{t}_{action}" for t in tables for action in ("append_only", "no_truncate")]


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC instant on every backend (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


Name = String(255)
Digest = String(128)

datasets = Table(
    "datasets",
    metadata,
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("first_seen_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("dataset", "version_label", name="pk_datasets"),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", Name, nullable=False),
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("plan_hash", Digest, nullable=False),
    Column("decision_hash", Digest, nullable=False),
    Column("status", String(32), nullable=False),
    Column("metadata", Text, nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("summary", Text, nullable=True),
    PrimaryKeyConstraint("run_id", name="pk_runs"),
    ForeignKeyConstraint(
        ["dataset", "version_label"], ["datasets.dataset", "datasets.version_label"], name="fk_runs_datasets"
    ),
)

partitions = Table(
    "partitions",
    metadata,
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("partition_key", Name, nullable=False),
    Column("version", Integer, nullable=False),
    Column("run_id", Name, nullable=False),
    Column("status", String(32), nullable=False),
    Column("manifest_uri", Text, nullable=False),
    Column("manifest_checksum", Digest, nullable=False),
    Column("merkle_root", Digest, nullable=False),
    Column("record_count", BigInteger, nullable=False),
    Column("event_hash", Digest, nullable=True),
    Column("files", Text, nullable=False),
    Column("committed_at", UTCDateTime(), nullable=False),
    Column("rolled_back_at", UTCDateTime(), nullable=True),
    PrimaryKeyConstraint("dataset", "version_label", "partition_key", "version", name="pk_partitions"),
    ForeignKeyConstraint(
        ["dataset", "version_label"],
        ["datasets.dataset", "datasets.version_label"],
        name="fk_partitions_datasets",
    ),
    CheckConstraint("status IN ('committed', 'rolled_back', 'superseded')", name="ck_partitions_status"),
)
# At most one committed version per partition, enforced by the database.
Index(
    "ux_partitions_one_committed",
    partitions.c.dataset,
    partitions.c.version_label,
    partitions.c.partition_key,
    unique=True,
    sqlite_where=text("status = 'committed'"),
    postgresql_where=text("status = 'committed'"),
)
Index("ix_partitions_run_id", partitions.c.run_id)

lineage = Table(
    "lineage",
    metadata,
    Column("id", Integer, autoincrement=True, nullable=False),
    Column("run_id", Name, nullable=False),
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("partition_key", Name, nullable=False),
    Column("partition_version", Integer, nullable=False),
    # '' stands for "no source URI" (NULLs never collide in a unique constraint).
    Column("source_uri", Text, nullable=False),
    Column("source_kind", String(64), nullable=False),
    Column("plan_hash", Digest, nullable=False),
    Column("decision_hash", Digest, nullable=False),
    PrimaryKeyConstraint("id", name="pk_lineage"),
    UniqueConstraint(
        "dataset",
        "version_label",
        "partition_key",
        "partition_version",
        "source_uri",
        name="uq_lineage_partition_source",
    ),
    ForeignKeyConstraint(
        ["dataset", "version_label", "partition_key", "partition_version"],
        ["partitions.dataset", "partitions.version_label", "partitions.partition_key", "partitions.version"],
        name="fk_lineage_partitions",
    ),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("chain_key", Name, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("event_hash", Digest, nullable=False),
    Column("prev_event_hash", Digest, nullable=True),
    Column("event_type", String(128), nullable=False),
    Column("event_json", Text, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("chain_key", "seq", name="pk_audit_events"),
    UniqueConstraint("event_hash", name="uq_audit_events_event_hash"),
)

audit_chain_heads = Table(
    "audit_chain_heads",
    metadata,
    Column("chain_key", Name, nullable=False),
    # seq -1 / event_hash '' is the placeholder of an empty chain (the lock row).
    Column("seq", BigInteger, nullable=False),
    Column("event_hash", Digest, nullable=False),
    PrimaryKeyConstraint("chain_key", name="pk_audit_chain_heads"),
)

discrepancy_events = Table(
    "discrepancy_events",
    metadata,
    Column("id", Integer, autoincrement=True, nullable=False),
    Column("run_id", Name, nullable=False),
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("partition_key", Name, nullable=True),
    Column("kind", String(128), nullable=False),
    Column("detail", Text, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id", name="pk_discrepancy_events"),
)
Index("ix_discrepancy_events_run_id", discrepancy_events.c.run_id)

# The batch of events the audit log is about to append to a chain (migration 0004): written before
# the local backup, removed once the mirror holds them (see `audit/log.py`).
audit_pending_batches = Table(
    "audit_pending_batches",
    metadata,
    Column("chain_key", Name, nullable=False),
    Column("first_seq", BigInteger, nullable=False),
    Column("events_json", Text, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("chain_key", name="pk_audit_pending_batches"),
)

# Who is writing a dataset version right now (migration 0002). One row while a run holds the lease.
dataset_leases = Table(
    "dataset_leases",
    metadata,
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("holder", Text, nullable=False),
    Column("acquired_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("dataset", "version_label", name="pk_dataset_leases"),
)

# --- staged rollouts (migration 0003) ---------------------------------------------------------

ROLLOUT_STATUSES = (
    "applying",  # staging apply running (or interrupted: `pcbo rollout start` of it resumes it)
    "paused",  # staging apply waiting between partitions until resumed
    "cancelled",  # staging apply stopped for good (what it committed stays until rolled back)
    "soaking",  # staging applied; halted for review while the soak monitor evaluates it
    "promoted",  # production holds every partition of the rollout at its approved decision hash
    "rolled_back",  # undone through the rollback manifests
)
ROLLOUT_CONTROLS = ("run", "pause", "cancel")
APPROVAL_DECISIONS = ("approved", "rejected")

# One row per rollout: a named range of partitions of a dataset on its way to production.
rollouts = Table(
    "rollouts",
    metadata,
    Column("name", Name, nullable=False),
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("first_key", Name, nullable=False),
    Column("last_key", Name, nullable=False),
    Column("partition_keys", Text, nullable=False),  # JSON list
    Column("throttle", Text, nullable=False),  # JSON {partitionsPerMinute, recordsPerMinute}
    Column("soak_window_seconds", Integer, nullable=False),
    Column("status", String(32), nullable=False),
    Column("control", String(16), nullable=False),
    Column("plan_hash", Digest, nullable=True),
    Column("decision_hash", Digest, nullable=True),
    Column("staging_run_id", Name, nullable=True),
    Column("staged_at", UTCDateTime(), nullable=True),
    Column("created_by", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("name", name="pk_rollouts"),
)

# What happened to a rollout, step by step (append-only).
rollout_log = Table(
    "rollout_log",
    metadata,
    Column("id", Integer, autoincrement=True, nullable=False),
    Column("rollout", Name, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("actor", Text, nullable=True),
    Column("detail", Text, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id", name="pk_rollout_log"),
)
Index("ix_rollout_log_rollout", rollout_log.c.rollout)

# Approvals and rejections (append-only): the newest one for a rollout is in force.
rollout_approvals = Table(
    "rollout_approvals",
    metadata,
    Column("id", Integer, autoincrement=True, nullable=False),
    Column("rollout", Name, nullable=False),
    Column("decision", String(16), nullable=False),
    Column("decision_hash", Digest, nullable=False),
    Column("actor", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("event_hash", Digest, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id", name="pk_rollout_approvals"),
)
Index("ix_rollout_approvals_rollout", rollout_approvals.c.rollout)

# Soak monitor evaluations of a rollout's staging output (append-only).
soak_evaluations = Table(
    "soak_evaluations",
    metadata,
    Column("id", Integer, autoincrement=True, nullable=False),
    Column("rollout", Name, nullable=False),
    Column("passed", Integer, nullable=False),  # 1 / 0
    Column("detail", Text, nullable=False),
    Column("evaluated_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id", name="pk_soak_evaluations"),
)
Index("ix_soak_evaluations_rollout", soak_evaluations.c.rollout)

# Alerts raised for failed checks and runs, and their webhook delivery.
alerts = Table(
    "alerts",
    metadata,
    Column("id", Integer, autoincrement=True, nullable=False),
    Column("alert_key", String(512), nullable=False),  # what it is about; raised once
    Column("kind", String(64), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("subject", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("raised_at", UTCDateTime(), nullable=False),
    Column("delivery_status", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("delivered_at", UTCDateTime(), nullable=True),
    PrimaryKeyConstraint("id", name="pk_alerts"),
    UniqueConstraint("alert_key", name="uq_alerts_alert_key"),
)

# Zone indexes of streamed sources (migration 0005, `sources/zones.py`): a cache keyed by the source's
# identity (a changed source is a new key), so a range run reads only the zones of its range.
source_zone_indexes = Table(
    "source_zone_indexes",
    metadata,
    Column("index_key", String(128), nullable=False),
    Column("index_json", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("index_key", name="pk_source_zone_indexes"),
)

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
#: PostgreSQL, TRUNCATE: migrations 0001, 0003, 0004, 0005, 0007, 0008). `pcbo verify` reports a
#: dropped, disabled or replaced trigger.
APPEND_ONLY_TABLES = (
    "audit_events",
    "discrepancy_events",
    "rollout_log",
    "rollout_approvals",
    "soak_evaluations",
    "transparency_checkpoints",
    "checkpoint_cosignatures",
    "command_audit",
    "sql_apply_log",
    "sql_row_failures",
)


def append_only_triggers(dialect: str, tables: tuple[str, ...] = APPEND_ONLY_TABLES) -> dict[str, str]:
    """The triggers the migrations create to keep `tables` append-only on `dialect`: name -> the table
    it is on."""
    actions = (
        ("no_update", "no_delete", "no_replace") if dialect == "sqlite" else ("append_only", "no_truncate")
    )
    return {f"{t}_{action}": t for t in tables for action in actions}


#: `pcbo_refuse_mutation()`'s body as revision 0001 creates it, its white space collapsed.
REFUSE_MUTATION_BODY = (
    "BEGIN RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP "
    "USING ERRCODE = 'insufficient_privilege'; END"
)


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
    "interrupted",  # its staging apply's run was terminated or failed: applying it again resumes it
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
    Column("delivery_status", String(16), nullable=False),  # pending | delivered | failed | unauthenticated
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("delivered_at", UTCDateTime(), nullable=True),
    # HMAC-SHA256 (hex) of the key and content, and of the key, `mac`, status and attempts, under
    # the alerts' key (migration 0010, `alerts/webhook.py`); null: not authenticated
    Column("mac", String(64), nullable=True),
    Column("state_mac", String(64), nullable=True),
    PrimaryKeyConstraint("id", name="pk_alerts"),
    UniqueConstraint("alert_key", name="uq_alerts_alert_key"),
)

# --- the transparency log of each audit chain (migration 0005) ----------------------------------

# How many events of a chain the stored tree holds.
transparency_trees = Table(
    "transparency_trees",
    metadata,
    Column("chain_key", Name, nullable=False),
    Column("tree_size", BigInteger, nullable=False),
    PrimaryKeyConstraint("chain_key", name="pk_transparency_trees"),
)

# The hash (hex) of every perfect subtree of a chain's log: leaves [index * 2**level, (index + 1) * 2**level).
transparency_nodes = Table(
    "transparency_nodes",
    metadata,
    Column("chain_key", Name, nullable=False),
    Column("level", Integer, nullable=False),
    Column("node_index", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    PrimaryKeyConstraint("chain_key", "level", "node_index", name="pk_transparency_nodes"),
)

# Signed checkpoints (append-only): one per chain and tree size.
transparency_checkpoints = Table(
    "transparency_checkpoints",
    metadata,
    Column("chain_key", Name, nullable=False),
    Column("tree_size", BigInteger, nullable=False),
    Column("root_hash", String(64), nullable=False),
    Column("origin", Text, nullable=False),
    Column("signer_key", Text, nullable=False),
    Column("note", Text, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("chain_key", "tree_size", name="pk_transparency_checkpoints"),
)

# Witness cosignatures of checkpoints (append-only): one per witness key.
checkpoint_cosignatures = Table(
    "checkpoint_cosignatures",
    metadata,
    Column("chain_key", Name, nullable=False),
    Column("tree_size", BigInteger, nullable=False),
    Column("witness_key", Text, nullable=False),
    Column("signature_line", Text, nullable=False),
    Column("cosigned_at", BigInteger, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("chain_key", "tree_size", "witness_key", name="pk_checkpoint_cosignatures"),
)

# Where each dataset version's committed partitions are published as an Iceberg table (issue 17).
table_publications = Table(
    "table_publications",
    metadata,
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("branch", Name, nullable=False),
    Column("table_format", String(32), nullable=False),
    Column("catalog_url", Text, nullable=False),  # never with credentials
    Column("table_name", Name, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("dataset", "version_label", "branch", name="pk_table_publications"),
    ForeignKeyConstraint(
        ["dataset", "version_label"],
        ["datasets.dataset", "datasets.version_label"],
        name="fk_table_publications_datasets",
    ),
)

# --- the HTTP API (migration 0007) ------------------------------------------------------------

#: Scopes a bearer token can hold (`admin` implies every other one).
TOKEN_SCOPES = ("read", "plan", "execute", "approve", "admin")
COMMAND_PHASES = ("queued", "running", "success", "error", "timeout")

# Bearer tokens of `pcbo serve`: the token itself is never stored, only its SHA-256.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("token_id", String(64), nullable=False),
    Column("subject", Text, nullable=False),
    Column("scopes", Text, nullable=False),  # JSON list
    Column("datasets", Text, nullable=True),  # JSON list; NULL: every dataset
    Column("token_hash", Digest, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    PrimaryKeyConstraint("token_id", name="pk_api_tokens"),
    UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
)

# Maintenance commands run through the API, one row per phase reached (append-only).
command_audit = Table(
    "command_audit",
    metadata,
    Column("id", Integer, autoincrement=True, nullable=False),
    Column("command_id", Name, nullable=False),
    Column("phase", String(16), nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", Text, nullable=False),
    Column("dataset", Name, nullable=True),  # the dataset the command touches; NULL: all of them
    Column("params", Text, nullable=False),  # JSON
    Column("outcome", Text, nullable=True),  # JSON: the command's result or error
    Column("before_state", Text, nullable=True),  # JSON
    Column("after_state", Text, nullable=True),  # JSON
    Column("logs", Text, nullable=False),  # JSON list of lines
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id", name="pk_command_audit"),
    UniqueConstraint("command_id", "phase", name="uq_command_audit_command_phase"),
    CheckConstraint(
        "phase IN ('queued', 'running', 'success', 'error', 'timeout')", name="ck_command_audit_phase"
    ),
)
Index("ix_command_audit_recorded_at", command_audit.c.recorded_at)

# Executes submitted through the API: status and, once finished, the answer (HTTP status, document).
api_runs = Table(
    "api_runs",
    metadata,
    Column("run_id", Name, nullable=False),
    Column("status", String(16), nullable=False),  # queued | running | done | failed | blocked | invalid
    Column("actor", Text, nullable=False),
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("request_hash", Digest, nullable=False),
    Column("dagster_run_id", String(64), nullable=True),
    Column("http_status", Integer, nullable=True),
    Column("document", Text, nullable=True),  # JSON
    Column("submitted_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    PrimaryKeyConstraint("run_id", name="pk_api_runs"),
)

# The first answer to an execute that carried an `Idempotency-Key` (per token subject).
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("subject", String(255), nullable=False),
    Column("idempotency_key", String(255), nullable=False),
    Column("request_hash", Digest, nullable=False),
    Column("http_status", Integer, nullable=True),  # NULL while the first request is in flight
    Column("response", Text, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("subject", "idempotency_key", name="pk_idempotency_keys"),
)

# --- SQL targets (migration 0008) -----------------------------------------------------------------

# One row per `sql_partition_applied` / `sql_partition_rolled_back` audit event (append-only).
sql_apply_log = Table(
    "sql_apply_log",
    metadata,
    Column("id", Integer, autoincrement=True, nullable=False),
    Column("event_hash", Digest, nullable=False),
    Column("kind", String(32), nullable=False),  # applied | rolled_back
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("partition_key", Name, nullable=False),
    Column("run_id", Name, nullable=False),
    Column("target", Text, nullable=False),  # <location without credentials>#<schema>.<table>
    Column("intent_seq", BigInteger, nullable=False),
    Column("counts", Text, nullable=False),  # JSON
    Column("journal_digest", Digest, nullable=False),
    Column("merkle_root", Digest, nullable=True),
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id", name="pk_sql_apply_log"),
    UniqueConstraint("event_hash", name="uq_sql_apply_log_event_hash"),
    CheckConstraint("kind IN ('applied', 'rolled_back')", name="ck_sql_apply_log_kind"),
)
Index("ix_sql_apply_log_run_id", sql_apply_log.c.run_id)

# Every record an apply could not write, with the database's error (append-only).
sql_row_failures = Table(
    "sql_row_failures",
    metadata,
    Column("id", Integer, autoincrement=True, nullable=False),
    Column("event_hash", Digest, nullable=False),
    Column("dataset", Name, nullable=False),
    Column("version_label", Name, nullable=False),
    Column("partition_key", Name, nullable=False),
    Column("run_id", Name, nullable=False),
    Column("target", Text, nullable=False),
    Column("record_id", Text, nullable=False),
    Column("record_key", Text, nullable=False),
    Column("code", String(64), nullable=False),
    Column("error", Text, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("id", name="pk_sql_row_failures"),
    UniqueConstraint("event_hash", "record_id", name="uq_sql_row_failures_event_record"),
)
Index("ix_sql_row_failures_run_id", sql_row_failures.c.run_id)

# Zone indexes of streamed sources (migration 0009, `sources/zones.py`): a cache keyed by the source's
# identity (a changed source is a new key), so a range run reads only the zones of its range.
source_zone_indexes = Table(
    "source_zone_indexes",
    metadata,
    Column("index_key", String(128), nullable=False),
    Column("index_json", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("index_key", name="pk_source_zone_indexes"),
)

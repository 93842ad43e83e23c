"""Initial catalog: datasets, runs, partitions, lineage, audit chain mirror, discrepancies.

`audit_events` and `discrepancy_events` are append-only: triggers refuse UPDATE and DELETE (and
TRUNCATE on PostgreSQL).

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pcbo_dagster.catalog.migrations.append_only_triggers import (
    create_append_only_triggers,
    drop_append_only_triggers,
)

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY = ("audit_events", "discrepancy_events")
NAME = sa.String(255)
DIGEST = sa.String(128)


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("dataset", NAME, nullable=False),
        sa.Column("version_label", NAME, nullable=False),
        _ts("first_seen_at"),
        sa.PrimaryKeyConstraint("dataset", "version_label", name="pk_datasets"),
    )
    op.create_table(
        "runs",
        sa.Column("run_id", NAME, nullable=False),
        sa.Column("dataset", NAME, nullable=False),
        sa.Column("version_label", NAME, nullable=False),
        sa.Column("plan_hash", DIGEST, nullable=False),
        sa.Column("decision_hash", DIGEST, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        _ts("started_at"),
        _ts("finished_at", nullable=True),
        sa.Column("summary", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("run_id", name="pk_runs"),
        sa.ForeignKeyConstraint(
            ["dataset", "version_label"],
            ["datasets.dataset", "datasets.version_label"],
            name="fk_runs_datasets",
        ),
    )
    op.create_table(
        "partitions",
        sa.Column("dataset", NAME, nullable=False),
        sa.Column("version_label", NAME, nullable=False),
        sa.Column("partition_key", NAME, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("run_id", NAME, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("manifest_uri", sa.Text, nullable=False),
        sa.Column("manifest_checksum", DIGEST, nullable=False),
        sa.Column("merkle_root", DIGEST, nullable=False),
        sa.Column("record_count", sa.BigInteger, nullable=False),
        sa.Column("event_hash", DIGEST, nullable=True),
        sa.Column("files", sa.Text, nullable=False),
        _ts("committed_at"),
        _ts("rolled_back_at", nullable=True),
        sa.PrimaryKeyConstraint("dataset", "version_label", "partition_key", "version", name="pk_partitions"),
        sa.ForeignKeyConstraint(
            ["dataset", "version_label"],
            ["datasets.dataset", "datasets.version_label"],
            name="fk_partitions_datasets",
        ),
        sa.CheckConstraint(
            "status IN ('committed', 'rolled_back', 'superseded')", name="ck_partitions_status"
        ),
    )
    op.create_index(
        "ux_partitions_one_committed",
        "partitions",
        ["dataset", "version_label", "partition_key"],
        unique=True,
        sqlite_where=sa.text("status = 'committed'"),
        postgresql_where=sa.text("status = 'committed'"),
    )
    op.create_index("ix_partitions_run_id", "partitions", ["run_id"])
    op.create_table(
        "lineage",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("run_id", NAME, nullable=False),
        sa.Column("dataset", NAME, nullable=False),
        sa.Column("version_label", NAME, nullable=False),
        sa.Column("partition_key", NAME, nullable=False),
        sa.Column("partition_version", sa.Integer, nullable=False),
        sa.Column("source_uri", sa.Text, nullable=False),
        sa.Column("source_kind", sa.String(64), nullable=False),
        sa.Column("plan_hash", DIGEST, nullable=False),
        sa.Column("decision_hash", DIGEST, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_lineage"),
        sa.UniqueConstraint(
            "dataset",
            "version_label",
            "partition_key",
            "partition_version",
            "source_uri",
            name="uq_lineage_partition_source",
        ),
        sa.ForeignKeyConstraint(
            ["dataset", "version_label", "partition_key", "partition_version"],
            [
                "partitions.dataset",
                "partitions.version_label",
                "partitions.partition_key",
                "partitions.version",
            ],
            name="fk_lineage_partitions",
        ),
    )
    op.create_table(
        "audit_events",
        sa.Column("chain_key", NAME, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("event_hash", DIGEST, nullable=False),
        sa.Column("prev_event_hash", DIGEST, nullable=True),
        sa.Column("event_type", sa.String(128), nullable=False),
        sa.Column("event_json", sa.Text, nullable=False),
        _ts("recorded_at"),
        sa.PrimaryKeyConstraint("chain_key", "seq", name="pk_audit_events"),
        sa.UniqueConstraint("event_hash", name="uq_audit_events_event_hash"),
    )
    op.create_table(
        "audit_chain_heads",
        sa.Column("chain_key", NAME, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("event_hash", DIGEST, nullable=False),
        sa.PrimaryKeyConstraint("chain_key", name="pk_audit_chain_heads"),
    )
    op.create_table(
        "discrepancy_events",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("run_id", NAME, nullable=False),
        sa.Column("dataset", NAME, nullable=False),
        sa.Column("version_label", NAME, nullable=False),
        sa.Column("partition_key", NAME, nullable=True),
        sa.Column("kind", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        _ts("recorded_at"),
        sa.PrimaryKeyConstraint("id", name="pk_discrepancy_events"),
    )
    op.create_index("ix_discrepancy_events_run_id", "discrepancy_events", ["run_id"])
    _create_append_only_triggers()


def _create_append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE OR REPLACE FUNCTION pcbo_refuse_mutation() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END
            $$
            """
        )
    for table in APPEND_ONLY:
        create_append_only_triggers(table)


def downgrade() -> None:
    for table in APPEND_ONLY:
        drop_append_only_triggers(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS pcbo_refuse_mutation()")
    op.drop_index("ix_discrepancy_events_run_id", table_name="discrepancy_events")
    op.drop_table("discrepancy_events")
    op.drop_table("audit_chain_heads")
    op.drop_table("audit_events")
    op.drop_table("lineage")
    op.drop_index("ix_partitions_run_id", table_name="partitions")
    op.drop_index("ux_partitions_one_committed", table_name="partitions")
    op.drop_table("partitions")
    op.drop_table("runs")
    op.drop_table("datasets")

"""Staged rollouts: rollouts, their log, approvals, soak evaluations, and alerts.

`rollout_log`, `rollout_approvals` and `soak_evaluations` are append-only (triggers refuse UPDATE
and DELETE, and TRUNCATE on PostgreSQL), like the audit mirror.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pcbo_dagster.catalog.migrations.append_only_triggers import (
    create_append_only_triggers,
    drop_append_only_triggers,
)

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY = ("rollout_log", "rollout_approvals", "soak_evaluations")
NAME = sa.String(255)
DIGEST = sa.String(128)


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("name", NAME, nullable=False),
        sa.Column("dataset", NAME, nullable=False),
        sa.Column("version_label", NAME, nullable=False),
        sa.Column("first_key", NAME, nullable=False),
        sa.Column("last_key", NAME, nullable=False),
        sa.Column("partition_keys", sa.Text, nullable=False),
        sa.Column("throttle", sa.Text, nullable=False),
        sa.Column("soak_window_seconds", sa.Integer, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("control", sa.String(16), nullable=False),
        sa.Column("plan_hash", DIGEST, nullable=True),
        sa.Column("decision_hash", DIGEST, nullable=True),
        sa.Column("staging_run_id", NAME, nullable=True),
        _ts("staged_at", nullable=True),
        sa.Column("created_by", sa.Text, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("name", name="pk_rollouts"),
    )
    op.create_table(
        "rollout_log",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("rollout", NAME, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("actor", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
        _ts("recorded_at"),
        sa.PrimaryKeyConstraint("id", name="pk_rollout_log"),
    )
    op.create_index("ix_rollout_log_rollout", "rollout_log", ["rollout"])
    op.create_table(
        "rollout_approvals",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("rollout", NAME, nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("decision_hash", DIGEST, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("event_hash", DIGEST, nullable=False),
        _ts("recorded_at"),
        sa.PrimaryKeyConstraint("id", name="pk_rollout_approvals"),
    )
    op.create_index("ix_rollout_approvals_rollout", "rollout_approvals", ["rollout"])
    op.create_table(
        "soak_evaluations",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("rollout", NAME, nullable=False),
        sa.Column("passed", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        _ts("evaluated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_soak_evaluations"),
    )
    op.create_index("ix_soak_evaluations_rollout", "soak_evaluations", ["rollout"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("alert_key", sa.String(512), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        _ts("raised_at"),
        sa.Column("delivery_status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        _ts("delivered_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
        sa.UniqueConstraint("alert_key", name="uq_alerts_alert_key"),
    )
    for table in APPEND_ONLY:
        create_append_only_triggers(table)


def downgrade() -> None:
    for table in APPEND_ONLY:
        drop_append_only_triggers(table)
    op.drop_table("alerts")
    for table in ("soak_evaluations", "rollout_approvals", "rollout_log"):
        op.drop_index(f"ix_{table}_rollout", table_name=table)
        op.drop_table(table)
    op.drop_table("rollouts")

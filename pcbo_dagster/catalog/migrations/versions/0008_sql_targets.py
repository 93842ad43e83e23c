"""SQL targets (issue 15): what each apply into a SQL table did, and every row the database refused.

`sql_apply_log` holds one row per `sql_partition_applied` and per `sql_partition_rolled_back` audit
event (the run, the partition, the target table, the counts, the journal digest, the Merkle root of
the applied ids); `sql_row_failures` one row per record an apply could not write, with the
database's error. Both are append-only (triggers refuse UPDATE, DELETE, REPLACE and, on PostgreSQL,
TRUNCATE), like the other history tables. The rollback journal itself lives in the target database
(`pcbo_journal`, written in the same transaction as each change: `targets/sql_table.py`).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pcbo_dagster.catalog.migrations.append_only_triggers import (
    create_append_only_triggers,
    drop_append_only_triggers,
)

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = sa.String(255)
DIGEST = sa.String(128)
#: Append-only table -> the SQL condition under which a new row would replace an existing one.
REPLACE_CONFLICTS = {
    "sql_apply_log": "id = NEW.id OR event_hash = NEW.event_hash",
    "sql_row_failures": "id = NEW.id OR (event_hash = NEW.event_hash AND record_id = NEW.record_id)",
}


def _ts(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "sql_apply_log",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("event_hash", DIGEST, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("dataset", NAME, nullable=False),
        sa.Column("version_label", NAME, nullable=False),
        sa.Column("partition_key", NAME, nullable=False),
        sa.Column("run_id", NAME, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("intent_seq", sa.BigInteger, nullable=False),
        sa.Column("counts", sa.Text, nullable=False),
        sa.Column("journal_digest", DIGEST, nullable=False),
        sa.Column("merkle_root", DIGEST, nullable=True),
        _ts("recorded_at"),
        sa.PrimaryKeyConstraint("id", name="pk_sql_apply_log"),
        sa.UniqueConstraint("event_hash", name="uq_sql_apply_log_event_hash"),
        sa.CheckConstraint("kind IN ('applied', 'rolled_back')", name="ck_sql_apply_log_kind"),
    )
    op.create_index("ix_sql_apply_log_run_id", "sql_apply_log", ["run_id"])
    op.create_table(
        "sql_row_failures",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("event_hash", DIGEST, nullable=False),
        sa.Column("dataset", NAME, nullable=False),
        sa.Column("version_label", NAME, nullable=False),
        sa.Column("partition_key", NAME, nullable=False),
        sa.Column("run_id", NAME, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("record_id", sa.Text, nullable=False),
        sa.Column("record_key", sa.Text, nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        _ts("recorded_at"),
        sa.PrimaryKeyConstraint("id", name="pk_sql_row_failures"),
        sa.UniqueConstraint("event_hash", "record_id", name="uq_sql_row_failures_event_record"),
    )
    op.create_index("ix_sql_row_failures_run_id", "sql_row_failures", ["run_id"])
    for table, conflict in REPLACE_CONFLICTS.items():
        create_append_only_triggers(table, conflict)


def downgrade() -> None:
    for table in REPLACE_CONFLICTS:
        drop_append_only_triggers(table)
    for table in ("sql_row_failures", "sql_apply_log"):
        op.drop_index(f"ix_{table}_run_id", table_name=table)
        op.drop_table(table)

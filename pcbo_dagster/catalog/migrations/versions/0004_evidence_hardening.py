"""Evidence hardening: append-only tables refuse INSERT OR REPLACE too; pending audit batches.

On SQLite, `INSERT OR REPLACE` (and `REPLACE`) resolves a key conflict by deleting the old row, and
that delete fires no DELETE trigger unless `PRAGMA recursive_triggers` is on in the writer's
connection, which someone editing the file will not turn on. So every append-only table gets a
BEFORE INSERT trigger refusing a row whose key (or unique event hash) is already there. On
PostgreSQL `INSERT ... ON CONFLICT DO UPDATE` already fires the BEFORE UPDATE trigger of 0001/0003.

`audit_pending_batches` holds, per chain, the batch of events the audit log is about to append
(written and committed before the events reach the local backup, removed when they reach the
catalog's mirror). After a crash between the two, the backup holds events the mirror lacks: they are
adopted only when they are exactly the pending batch, so an event appended to one store alone is
never adopted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Append-only table -> the SQL condition under which a new row would replace an existing one.
REPLACE_CONFLICTS = {
    "audit_events": "(chain_key = NEW.chain_key AND seq = NEW.seq) OR event_hash = NEW.event_hash",
    "discrepancy_events": "id = NEW.id",
    "rollout_log": "id = NEW.id",
    "rollout_approvals": "id = NEW.id",
    "soak_evaluations": "id = NEW.id",
}


def upgrade() -> None:
    op.create_table(
        "audit_pending_batches",
        sa.Column("chain_key", sa.String(255), nullable=False),
        sa.Column("first_seq", sa.BigInteger, nullable=False),
        sa.Column("events_json", sa.Text, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chain_key", name="pk_audit_pending_batches"),
    )
    if op.get_bind().dialect.name == "sqlite":
        for table, conflict in REPLACE_CONFLICTS.items():
            op.execute(
                f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "
                f"WHEN EXISTS (SELECT 1 FROM {table} WHERE {conflict}) "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: REPLACE refused'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in REPLACE_CONFLICTS:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_replace")
    op.drop_table("audit_pending_batches")

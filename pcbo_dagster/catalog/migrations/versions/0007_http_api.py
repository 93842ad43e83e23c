"""The HTTP API (`pcbo serve`): bearer tokens, the command audit, API runs and idempotency keys.

- `api_tokens`: one row per bearer token, the token itself stored only as its SHA-256; revoking sets
  `revoked_at` (the row stays, so `pcbo token list` shows who had what).
- `command_audit` (append-only: triggers refuse UPDATE, DELETE and REPLACE, and TRUNCATE on
  PostgreSQL): one row per phase a maintenance command reached (`queued`, `running`, then `success`,
  `error` or `timeout`), with who asked, the action, its target and parameters, the outcome, the
  state before and after, and the command's log lines.
- `api_runs`: executes submitted through the API (their status and, when done, the document).
- `idempotency_keys`: the first answer given to an execute carrying an `Idempotency-Key`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pcbo_dagster.catalog.migrations.append_only_triggers import (
    create_append_only_triggers,
    drop_append_only_triggers,
)

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY = ("command_audit",)
#: Append-only table -> the SQL condition under which a new row would replace an existing one (0004).
REPLACE_CONFLICTS = {"command_audit": "id = NEW.id OR (command_id = NEW.command_id AND phase = NEW.phase)"}
NAME = sa.String(255)
DIGEST = sa.String(128)


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("token_id", sa.String(64), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("datasets", sa.Text, nullable=True),
        sa.Column("token_hash", DIGEST, nullable=False),
        _ts("created_at"),
        _ts("expires_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("token_id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_table(
        "command_audit",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("command_id", NAME, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("dataset", NAME, nullable=True),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=True),
        sa.Column("before_state", sa.Text, nullable=True),
        sa.Column("after_state", sa.Text, nullable=True),
        sa.Column("logs", sa.Text, nullable=False),
        _ts("recorded_at"),
        sa.PrimaryKeyConstraint("id", name="pk_command_audit"),
        sa.UniqueConstraint("command_id", "phase", name="uq_command_audit_command_phase"),
        sa.CheckConstraint(
            "phase IN ('queued', 'running', 'success', 'error', 'timeout')", name="ck_command_audit_phase"
        ),
    )
    op.create_index("ix_command_audit_recorded_at", "command_audit", ["recorded_at"])
    op.create_table(
        "api_runs",
        sa.Column("run_id", NAME, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("dataset", NAME, nullable=False),
        sa.Column("version_label", NAME, nullable=False),
        sa.Column("request_hash", DIGEST, nullable=False),
        sa.Column("dagster_run_id", sa.String(64), nullable=True),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("document", sa.Text, nullable=True),
        _ts("submitted_at"),
        _ts("finished_at", nullable=True),
        sa.PrimaryKeyConstraint("run_id", name="pk_api_runs"),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("request_hash", DIGEST, nullable=False),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("response", sa.Text, nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("subject", "idempotency_key", name="pk_idempotency_keys"),
    )
    for table in APPEND_ONLY:
        create_append_only_triggers(table, REPLACE_CONFLICTS[table])


def downgrade() -> None:
    for table in APPEND_ONLY:
        drop_append_only_triggers(table)
    op.drop_table("idempotency_keys")
    op.drop_table("api_runs")
    op.drop_index("ix_command_audit_recorded_at", table_name="command_audit")
    op.drop_table("command_audit")
    op.drop_table("api_tokens")

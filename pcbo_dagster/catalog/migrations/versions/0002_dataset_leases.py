"""Dataset write leases: the catalog's own guard that no two runs write one dataset version at once.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dataset_leases",
        sa.Column("dataset", sa.String(255), nullable=False),
        sa.Column("version_label", sa.String(255), nullable=False),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("dataset", "version_label", name="pk_dataset_leases"),
    )


def downgrade() -> None:
    op.drop_table("dataset_leases")

"""Iceberg publication (issue 17): where each dataset version's committed partitions are published.

`table_publications` names, per dataset version and branch (`main`, or `staging` for a rollout's
staging environment), the Iceberg table its partitions are published to: the table format, the
catalog URL (never with credentials: they come from the environment) and the table name. Recorded
once, when the table is first published to; every later execute, rollback and `verify` of the
dataset version publishes to (or checks) that table. Everything else about the publication — what
each snapshot publishes and why — lives in the Iceberg table's own snapshot properties.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "table_publications",
        sa.Column("dataset", NAME, nullable=False),
        sa.Column("version_label", NAME, nullable=False),
        sa.Column("branch", NAME, nullable=False),
        sa.Column("table_format", sa.String(32), nullable=False),
        sa.Column("catalog_url", sa.Text, nullable=False),
        sa.Column("table_name", NAME, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("dataset", "version_label", "branch", name="pk_table_publications"),
        sa.ForeignKeyConstraint(
            ["dataset", "version_label"],
            ["datasets.dataset", "datasets.version_label"],
            name="fk_table_publications_datasets",
        ),
    )


def downgrade() -> None:
    op.drop_table("table_publications")

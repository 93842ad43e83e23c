"""Many hosts: the zone indexes of streamed sources, shared by every host's runs.

A range run of a large JSONL, CSV or parquet source reads only the zones that may hold records of its
range (`sources/zones.py`). The zones of a source are found by reading it once; this table keeps them,
keyed by the source's identity as its store reports it (S3 ETag, GCS generation, a local file's inode
and times), so the runs of a backfill on any host read the index instead of the whole source. It is a
cache: a row may be dropped at any time, and the next run builds it again.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "source_zone_indexes",
        sa.Column("index_key", sa.String(128), nullable=False),
        sa.Column("index_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("index_key", name="pk_source_zone_indexes"),
    )


def downgrade() -> None:
    op.drop_table("source_zone_indexes")

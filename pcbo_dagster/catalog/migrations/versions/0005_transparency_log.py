"""Transparency log: the stored Merkle tree of every audit chain, signed checkpoints, cosignatures.

- `transparency_trees`: per chain, how many of its events the stored tree holds;
- `transparency_nodes`: the hash of every perfect subtree of a chain's log (level, index), added in
  the same transaction as the events (`catalog/chain.py`). Derived from the chain: `pcbo verify`
  rebuilds the tree from the audit backup and reports a stored tree that disagrees;
- `transparency_checkpoints`: signed checkpoints (C2SP tlog-checkpoint notes), one per chain and
  tree size; append-only;
- `checkpoint_cosignatures`: witness cosignatures of those checkpoints, one per witness key;
  append-only.

The two append-only tables get the triggers of 0001 and 0004 (UPDATE, DELETE and REPLACE refused on
SQLite; UPDATE, DELETE and TRUNCATE on PostgreSQL).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pcbo_dagster.catalog.migrations.append_only_triggers import (
    create_append_only_triggers,
)

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = sa.String(255)
HEX_HASH = sa.String(64)
#: Append-only table -> the SQL condition under which a new row would replace an existing one.
REPLACE_CONFLICTS = {
    "transparency_checkpoints": "chain_key = NEW.chain_key AND tree_size = NEW.tree_size",
    "checkpoint_cosignatures": (
        "chain_key = NEW.chain_key AND tree_size = NEW.tree_size AND witness_key = NEW.witness_key"
    ),
}


def upgrade() -> None:
    op.create_table(
        "transparency_trees",
        sa.Column("chain_key", NAME, nullable=False),
        sa.Column("tree_size", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("chain_key", name="pk_transparency_trees"),
    )
    op.create_table(
        "transparency_nodes",
        sa.Column("chain_key", NAME, nullable=False),
        sa.Column("level", sa.Integer, nullable=False),
        sa.Column("node_index", sa.BigInteger, nullable=False),
        sa.Column("hash", HEX_HASH, nullable=False),
        sa.PrimaryKeyConstraint("chain_key", "level", "node_index", name="pk_transparency_nodes"),
    )
    op.create_table(
        "transparency_checkpoints",
        sa.Column("chain_key", NAME, nullable=False),
        sa.Column("tree_size", sa.BigInteger, nullable=False),
        sa.Column("root_hash", HEX_HASH, nullable=False),
        sa.Column("origin", sa.Text, nullable=False),
        sa.Column("signer_key", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chain_key", "tree_size", name="pk_transparency_checkpoints"),
    )
    op.create_table(
        "checkpoint_cosignatures",
        sa.Column("chain_key", NAME, nullable=False),
        sa.Column("tree_size", sa.BigInteger, nullable=False),
        sa.Column("witness_key", sa.Text, nullable=False),
        sa.Column("signature_line", sa.Text, nullable=False),
        sa.Column("cosigned_at", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chain_key", "tree_size", "witness_key", name="pk_checkpoint_cosignatures"),
    )
    for table, conflict in REPLACE_CONFLICTS.items():
        create_append_only_triggers(table, conflict)


def downgrade() -> None:
    for table in (
        "checkpoint_cosignatures",
        "transparency_checkpoints",
        "transparency_nodes",
        "transparency_trees",
    ):
        op.drop_table(table)

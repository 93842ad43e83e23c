"""Alerts authenticated: an HMAC of each alert's content and one of its delivery state.

Someone who can write the catalog could insert a pending `alerts` row that pcbo then POSTed to the
webhook with its token, mark a real alert delivered so it was never sent, or take an upcoming
alert's key with a "delivered" row so the real alert was never raised. `mac` is an HMAC-SHA256 of the
alert's key and content (what is POSTed) and `state_mac` one of its key, `mac`, delivery status and
attempts, both under the alerts' key (`PCBO_ALERT_KEY`, else `$PCBO_HOME/.keys/alert.key`; never in
the catalog): pcbo sends only rows whose `mac` verifies and trusts a delivery state only when
`state_mac` does (`alerts/webhook.py`).

Rows written before this migration have neither: they are unauthenticated (never sent, their key
raised again when the alert comes again), as a row written by hand.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("alerts", sa.Column("mac", sa.String(64), nullable=True))
    op.add_column("alerts", sa.Column("state_mac", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        batch.drop_column("state_mac")
        batch.drop_column("mac")

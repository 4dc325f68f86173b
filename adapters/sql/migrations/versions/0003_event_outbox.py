"""The outbox of events waiting for the bus.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

__all__ = ["downgrade", "upgrade"]

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "event_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("message_id", sa.String(36), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("claimed_until", ts, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_event_outbox"),
        sa.UniqueConstraint("message_id", name="uq_event_outbox_message_id"),
    )


def downgrade() -> None:
    op.drop_table("event_outbox")

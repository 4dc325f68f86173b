"""A negative cache: images whose data failed verification, remembered per scope for
``negative_cache_seconds``, so that a burst of requests for a broken image downloads it
once.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

__all__ = ["downgrade", "upgrade"]

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bad_images",
        sa.Column("scope", sa.String(767), nullable=False),
        sa.Column("image_id", sa.String(255), nullable=False),
        sa.Column("content", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", "image_id", name="pk_bad_images"),
    )
    op.create_index("ix_bad_images_until", "bad_images", ["until"])


def downgrade() -> None:
    op.drop_index("ix_bad_images_until", table_name="bad_images")
    op.drop_table("bad_images")

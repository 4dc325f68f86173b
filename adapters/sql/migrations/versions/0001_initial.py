"""The cache entries and the per-host totals.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

__all__ = ["downgrade", "upgrade"]

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ZERO = sa.text("0")


def upgrade() -> None:
    # Written out, not imported from tables.py: a migration is a record of the past and must
    # not change when the current tables do.
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "cache_entries",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("image_id", sa.String(255), nullable=False),
        sa.Column("volume_id", sa.String(255), nullable=False),
        sa.Column("size_gb", sa.Integer(), nullable=False),
        sa.Column("image_updated_at", ts, nullable=True),
        sa.Column("image_hash", sa.String(255), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("last_used", ts, nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False, server_default=_ZERO),
        sa.Column("pinned", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("claim_expires", ts, nullable=True),
        sa.Column("lease_until", ts, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_cache_entries"),
        sa.UniqueConstraint("host", "image_id", name="uq_cache_entries_host_image_id"),
        sa.CheckConstraint("state IN ('creating', 'ready')", name="ck_cache_entries_state"),
    )
    # (host, last_used) picks victims in LRU order; id breaks ties, so the keyset pages of
    # lru_victims come straight off the index, even when many entries share a last_used.
    op.create_index("ix_cache_entries_host_last_used_id", "cache_entries",
                    ["host", "last_used", "id"])
    op.create_index("ix_cache_entries_volume_id", "cache_entries", ["volume_id"])
    op.create_table(
        "host_totals",
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False, server_default=_ZERO),
        sa.Column("size_gb", sa.Integer(), nullable=False, server_default=_ZERO),
        sa.Column("hits", sa.Integer(), nullable=False, server_default=_ZERO),
        sa.Column("misses", sa.Integer(), nullable=False, server_default=_ZERO),
        sa.Column("evictions", sa.Integer(), nullable=False, server_default=_ZERO),
        sa.Column("downloads", sa.Integer(), nullable=False, server_default=_ZERO),
        sa.Column("bytes_downloaded", sa.BigInteger(), nullable=False, server_default=_ZERO),
        sa.PrimaryKeyConstraint("host", name="pk_host_totals"),
    )


def downgrade() -> None:
    op.drop_table("host_totals")
    op.drop_index("ix_cache_entries_volume_id", table_name="cache_entries")
    op.drop_index("ix_cache_entries_host_last_used_id", table_name="cache_entries")
    op.drop_table("cache_entries")

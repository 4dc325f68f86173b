"""The gdsf eviction policy: each entry's priority, an index on the priority per scope, and
each scope's aging value. (The measured fill time it weighs, ``fill_seconds``, came with the
savings ledger in 0004.)

Entries already there have no measured fill time: their priority stays 0, so under ``gdsf``
they are the first to go (least recently used first), as the policy treats an unknown cost.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

__all__ = ["downgrade", "upgrade"]

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ZERO = sa.text("0")


def upgrade() -> None:
    with op.batch_alter_table("cache_entries") as batch:
        batch.add_column(sa.Column("priority", sa.Float(), nullable=False,
                                   server_default=_ZERO))
        # gdsf's victims come lowest priority first, off this index, as LRU's come off
        # (scope, last_used, id).
        batch.create_index("ix_cache_entries_scope_priority_last_used_id",
                           ["scope", "priority", "last_used", "id"])
    with op.batch_alter_table("scope_totals") as batch:
        batch.add_column(sa.Column("gdsf_age", sa.Float(), nullable=False,
                                   server_default=_ZERO))


def downgrade() -> None:
    with op.batch_alter_table("scope_totals") as batch:
        batch.drop_column("gdsf_age")
    with op.batch_alter_table("cache_entries") as batch:
        batch.drop_index("ix_cache_entries_scope_priority_last_used_id")
        batch.drop_column("priority")

"""Owners and heartbeats: a claim names its owner, each clone's lease is a row of its own
(``cache_leases``) and a user's volume being written names its writer.

Before, an entry had one ``lease_until``, which the first clone to end cleared for all the
clones still reading, and which a killed clone left standing for 300 s; a dead claim held
its image for ``claim_lease_seconds`` (an hour). Leases still running are carried over
with no owner (they lapse by their time, as before).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

__all__ = ["downgrade", "upgrade"]

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cache_leases",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("entry_id", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cache_leases"),
    )
    op.create_index("ix_cache_leases_entry_id_until", "cache_leases", ["entry_id", "until"])
    op.create_index("ix_cache_leases_until", "cache_leases", ["until"])
    op.execute("INSERT INTO cache_leases (id, entry_id, owner, until) "
               "SELECT id || '-0007', id, '', lease_until FROM cache_entries "
               "WHERE lease_until IS NOT NULL")
    with op.batch_alter_table("cache_entries") as batch:
        batch.add_column(sa.Column("claim_owner", sa.String(255), nullable=True))
        batch.drop_column("lease_until")
    with op.batch_alter_table("volume_writes") as batch:
        batch.add_column(sa.Column("owner", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("volume_writes") as batch:
        batch.drop_column("owner")
    with op.batch_alter_table("cache_entries") as batch:
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.drop_column("claim_owner")
    op.execute("UPDATE cache_entries SET lease_until = (SELECT max(until) FROM cache_leases "
               "WHERE cache_leases.entry_id = cache_entries.id)")
    op.drop_index("ix_cache_leases_until", table_name="cache_leases")
    op.drop_index("ix_cache_leases_entry_id_until", table_name="cache_leases")
    op.drop_table("cache_leases")

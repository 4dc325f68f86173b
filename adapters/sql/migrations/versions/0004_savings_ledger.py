"""The savings ledger: what each entry's hits saved, and its scope's sum.

Per entry: ``fill_seconds`` (how long filling its volume took; NULL for entries filled
before this revision: they save bytes, but no seconds, as their fill was never measured),
``bytes_saved`` and ``seconds_saved``; per scope: ``bytes_saved`` and ``seconds_saved``,
which outlive the entries (an evicted entry's savings stay counted).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

__all__ = ["downgrade", "upgrade"]

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ZERO = sa.text("0")


def upgrade() -> None:
    with op.batch_alter_table("cache_entries") as batch:
        batch.add_column(sa.Column("fill_seconds", sa.Float(), nullable=True))
        batch.add_column(sa.Column("bytes_saved", sa.BigInteger(), nullable=False,
                                   server_default=_ZERO))
        batch.add_column(sa.Column("seconds_saved", sa.Float(), nullable=False,
                                   server_default=_ZERO))
    with op.batch_alter_table("scope_totals") as batch:
        batch.add_column(sa.Column("bytes_saved", sa.BigInteger(), nullable=False,
                                   server_default=_ZERO))
        batch.add_column(sa.Column("seconds_saved", sa.Float(), nullable=False,
                                   server_default=_ZERO))


def downgrade() -> None:
    with op.batch_alter_table("scope_totals") as batch:
        batch.drop_column("seconds_saved")
        batch.drop_column("bytes_saved")
    with op.batch_alter_table("cache_entries") as batch:
        batch.drop_column("seconds_saved")
        batch.drop_column("bytes_saved")
        batch.drop_column("fill_seconds")

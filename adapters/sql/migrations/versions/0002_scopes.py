"""Entries and totals per scope (``CLUSTER_OR_HOST@BACKEND#POOL``) instead of per host.

Every existing entry and totals row belonged to a host's one backend: it moves to that
host's scope on the implicit backend of a configuration without ``enabled_backends``
(backend ``default``, pool ``default``, no cluster), ``<host>@default#default``. A host
whose implicit backend names another pool (``rbd_pool``, ``pool_name``) adopts its entries
into that scope on its next run (``CacheService.adopt``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

__all__ = ["downgrade", "upgrade"]

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ZERO = sa.text("0")
# Written out, not imported: a migration is a record of the past (see 0001).
_DEFAULT_SUFFIX = "@default#default"
_SCOPE = sa.String(767)
_COUNTERS = ("count", "size_gb", "hits", "misses", "evictions", "downloads",
             "bytes_downloaded")


def upgrade() -> None:
    with op.batch_alter_table("cache_entries") as batch:
        batch.add_column(sa.Column("cluster", sa.String(255), nullable=True))
        batch.add_column(sa.Column("backend", sa.String(255), nullable=False,
                                   server_default="default"))
        batch.add_column(sa.Column("pool", sa.String(255), nullable=False,
                                   server_default="default"))
        batch.add_column(sa.Column("scope", _SCOPE, nullable=True))
    op.execute(sa.text(f"UPDATE cache_entries SET scope = host || '{_DEFAULT_SUFFIX}'"))
    with op.batch_alter_table("cache_entries") as batch:
        batch.alter_column("scope", existing_type=_SCOPE, nullable=False)
        # The defaults were for the rows already there; new rows always name their scope.
        batch.alter_column("backend", existing_type=sa.String(255), server_default=None)
        batch.alter_column("pool", existing_type=sa.String(255), server_default=None)
        # The claim is now unique per scope, and victims are picked along (scope, last_used).
        batch.drop_constraint("uq_cache_entries_host_image_id", type_="unique")
        batch.create_unique_constraint("uq_cache_entries_scope_image_id", ["scope", "image_id"])
        batch.drop_index("ix_cache_entries_host_last_used_id")
        batch.create_index("ix_cache_entries_scope_last_used_id", ["scope", "last_used", "id"])
        # A host's entries of a backend in another scope (what adoption moves): two range
        # reads of this index that find nothing when there is nothing to adopt.
        batch.create_index("ix_cache_entries_host_backend_scope", ["host", "backend", "scope"])
    op.create_table(
        "scope_totals",
        sa.Column("scope", _SCOPE, nullable=False),
        *(sa.Column(name, sa.BigInteger() if name == "bytes_downloaded" else sa.Integer(),
                    nullable=False, server_default=_ZERO) for name in _COUNTERS),
        sa.Column("neighbour_fills", sa.Integer(), nullable=False, server_default=_ZERO),
        sa.PrimaryKeyConstraint("scope", name="pk_scope_totals"),
    )
    columns = ", ".join(_COUNTERS)
    op.execute(sa.text(f"INSERT INTO scope_totals (scope, {columns}) "
                       f"SELECT host || '{_DEFAULT_SUFFIX}', {columns} FROM host_totals"))
    op.drop_table("host_totals")


def downgrade() -> None:
    # Only what the old schema can hold survives: the default backend's host scopes.
    op.create_table(
        "host_totals",
        sa.Column("host", sa.String(255), nullable=False),
        *(sa.Column(name, sa.BigInteger() if name == "bytes_downloaded" else sa.Integer(),
                    nullable=False, server_default=_ZERO) for name in _COUNTERS),
        sa.PrimaryKeyConstraint("host", name="pk_host_totals"),
    )
    columns = ", ".join(_COUNTERS)
    op.execute(sa.text(
        f"INSERT INTO host_totals (host, {columns}) "
        f"SELECT substr(scope, 1, length(scope) - {len(_DEFAULT_SUFFIX)}), {columns} "
        f"FROM scope_totals WHERE scope LIKE '%{_DEFAULT_SUFFIX}'"))
    op.drop_table("scope_totals")
    op.execute(sa.text(f"DELETE FROM cache_entries WHERE scope <> host || '{_DEFAULT_SUFFIX}'"))
    with op.batch_alter_table("cache_entries") as batch:
        batch.drop_index("ix_cache_entries_host_backend_scope")
        batch.drop_index("ix_cache_entries_scope_last_used_id")
        batch.create_index("ix_cache_entries_host_last_used_id", ["host", "last_used", "id"])
        batch.drop_constraint("uq_cache_entries_scope_image_id", type_="unique")
        batch.create_unique_constraint("uq_cache_entries_host_image_id", ["host", "image_id"])
        batch.drop_column("scope")
        batch.drop_column("pool")
        batch.drop_column("backend")
        batch.drop_column("cluster")

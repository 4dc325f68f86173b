"""The tables of the SQL adapter, as SQLAlchemy Core ``Table`` objects.

The schema itself is created by the alembic migrations in ``migrations/versions``; these
definitions are what the repository queries, and a test checks that the two agree.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.types import TypeDecorator

__all__ = [
    "NAMING_CONVENTION",
    "SCOPE_LENGTH",
    "UTCDateTime",
    "bad_images",
    "cache_entries",
    "cache_leases",
    "event_outbox",
    "metadata",
    "scope_totals",
    "volume_writes",
]

#: Constraint and index names, so that migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

_ZERO = text("0")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC ``datetime`` on every dialect.

    PostgreSQL stores ``timestamptz``. SQLite has no time zones: the value is stored as naive
    UTC in SQLAlchemy's fixed-width text format, so that comparing and ordering the column
    compare instants. Values read back are always aware, in ``datetime.UTC``. A naive value
    is refused: the core speaks aware UTC only, and guessing a zone would hide a bug.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None,
                           dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: use an aware UTC datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None,
                             dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


#: ``CLUSTER_OR_HOST@BACKEND#POOL``: three names of up to 255 characters and two separators.
SCOPE_LENGTH = 767

cache_entries = Table(
    "cache_entries",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("cluster", String(255), nullable=True),
    Column("backend", String(255), nullable=False),
    Column("pool", String(255), nullable=False),
    Column("scope", String(SCOPE_LENGTH), nullable=False),
    Column("image_id", String(255), nullable=False),
    Column("volume_id", String(255), nullable=False),
    Column("size_gb", Integer, nullable=False),
    Column("image_updated_at", UTCDateTime, nullable=True),
    Column("image_hash", String(255), nullable=True),
    Column("state", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used", UTCDateTime, nullable=False),
    Column("hits", Integer, nullable=False, server_default=_ZERO),
    Column("pinned", Boolean, nullable=False, server_default=false()),
    # A claim's owner (an ``Owner``'s text) and where its heartbeat has moved it to (0007).
    Column("claim_expires", UTCDateTime, nullable=True),
    Column("claim_owner", String(255), nullable=True),
    # Seconds the miss took to fill the volume (NULL: not measured): the savings ledger's
    # and the gdsf policy's cost (migration 0004).
    Column("fill_seconds", Float, nullable=True),
    # the savings ledger (migration 0004): moved only by the end of a hit's lease
    Column("bytes_saved", BigInteger, nullable=False, server_default=_ZERO),
    Column("seconds_saved", Float, nullable=False, server_default=_ZERO),
    Column("priority", Float, nullable=False, server_default=_ZERO),  # gdsf (0005)
    UniqueConstraint("scope", "image_id"),
    CheckConstraint("state IN ('creating', 'ready')", name="state"),
    Index("ix_cache_entries_scope_last_used_id", "scope", "last_used", "id"),
    Index("ix_cache_entries_scope_priority_last_used_id", "scope", "priority", "last_used",
          "id"),
    Index("ix_cache_entries_volume_id", "volume_id"),
    Index("ix_cache_entries_host_backend_scope", "host", "backend", "scope"),
)

scope_totals = Table(
    "scope_totals",
    metadata,
    Column("scope", String(SCOPE_LENGTH), primary_key=True),
    Column("count", Integer, nullable=False, server_default=_ZERO),
    Column("size_gb", Integer, nullable=False, server_default=_ZERO),
    Column("hits", Integer, nullable=False, server_default=_ZERO),
    Column("misses", Integer, nullable=False, server_default=_ZERO),
    Column("evictions", Integer, nullable=False, server_default=_ZERO),
    Column("downloads", Integer, nullable=False, server_default=_ZERO),
    Column("bytes_downloaded", BigInteger, nullable=False, server_default=_ZERO),
    Column("neighbour_fills", Integer, nullable=False, server_default=_ZERO),
    Column("bytes_saved", BigInteger, nullable=False, server_default=_ZERO),
    Column("seconds_saved", Float, nullable=False, server_default=_ZERO),
    Column("gdsf_age", Float, nullable=False, server_default=_ZERO),
)

#: Events waiting for the bus, in ``id`` order. A sender claims a batch (``claimed_until``),
#: sends it, then deletes it; a claim that expired (its sender died) is taken again, so an
#: event may be sent twice, with the same ``message_id``.
event_outbox = Table(
    "event_outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(36), nullable=False),
    Column("host", String(255), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("claimed_until", UTCDateTime, nullable=True),
    UniqueConstraint("message_id"),
)

#: Clones reading entries' volumes (0007; before, one ``lease_until`` per entry, which the
#: first clone to end cleared for all): a row per clone, its owner's heartbeat moving
#: ``until`` on. An entry with a row whose ``until`` is ahead is not evicted.
cache_leases = Table(
    "cache_leases",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("entry_id", String(64), nullable=False),
    Column("owner", String(255), nullable=False),
    Column("until", UTCDateTime, nullable=False),
    Index("ix_cache_leases_entry_id_until", "entry_id", "until"),
    Index("ix_cache_leases_until", "until"),
)

#: Volumes being written for a user (an uncached create: the volume exists before its bytes
#: do): not listed, and refused by ``volume upload``, until the write ends. ``owner`` (0007)
#: keeps ``expires_at`` moving on by its heartbeat; a mark past it, or whose owner is gone,
#: is a dead writer's half-written volume (reconcile's ``partial-volume``).
volume_writes = Table(
    "volume_writes",
    metadata,
    Column("volume_id", String(255), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("owner", String(255), nullable=True),
)

#: Images whose data failed verification (a checksum, a format safety check, a disk no volume
#: can hold), per scope (0008): refused at once until ``until``, while the image's content
#: (``content``: its hash, else its ``updated_at``) is the one found bad. One row per image
#: and scope; a new finding replaces it.
bad_images = Table(
    "bad_images",
    metadata,
    Column("scope", String(SCOPE_LENGTH), primary_key=True),
    Column("image_id", String(255), primary_key=True),
    Column("content", String(255), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("until", UTCDateTime, nullable=False),
    Index("ix_bad_images_until", "until"),
)

"""The outbox: events kept in the cache's database until the bus has them.

``add_in`` writes an event in a transaction of the caller's: ``SqlUnitOfWork`` (given this
outbox) writes each hit, miss and evict in the transaction of the change it announces, so
the event is committed with the change or not at all, and a crash right after the commit
leaves it here for the next ivcache process (or ``ivcache events flush``) to send. ``add``
writes one in its own transaction (for a notifier used without such a unit of work).
``deliver`` claims the oldest
batch, sends it in ``id`` order outside any transaction (a slow broker never holds the
database), then deletes what was sent in one transaction. Several workers on one
PostgreSQL claim disjoint batches (``FOR UPDATE SKIP LOCKED``); on SQLite every transaction
takes the write lock, so claims queue. A claim expires after ``claim_seconds``: a batch whose
sender died is sent again by another, with the same ``message_id`` (at least once). Each
batch goes out in order; the batches of several workers may interleave.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable

import attrs
from sqlalchemy import Connection, Engine, delete, func, or_, select, update

from ivcache.adapters.sql.tables import event_outbox
from ivcache.core.events import CacheEvict, CacheHit, CacheMiss, Event

__all__ = ["BUS_KINDS", "OutboxMessage", "SqlOutbox"]

#: the events the outbox keeps by default: Cinder's, those the bus carries
BUS_KINDS: tuple[type[Event], ...] = (CacheHit, CacheMiss, CacheEvict)


@attrs.frozen
class OutboxMessage:
    message_id: str
    event_type: str
    payload: dict[str, object]


class SqlOutbox:
    """Events waiting for the bus, in a table of ivcache's database."""

    def __init__(self, engine: Engine, *, claim_seconds: float = 60.0,
                 batch: int = 50, kinds: tuple[type[Event], ...] = BUS_KINDS) -> None:
        self.engine = engine
        self.claim_seconds = claim_seconds
        self.batch = batch
        #: what ``keeps``: the events a unit of work writes here
        self.kinds = kinds

    def keeps(self, event: Event) -> bool:
        return isinstance(event, self.kinds)

    def add(self, event: Event, host: str | None = None) -> str:
        """Keep ``event``, in a transaction of its own; return its ``message_id``."""
        with self.engine.begin() as conn:
            return self.add_in(conn, event, host)

    def add_in(self, conn: Connection, event: Event, host: str | None = None) -> str:
        """Keep ``event`` in the transaction ``conn`` is in (committed with it, or gone
        with its rollback); return its ``message_id``."""
        message_id = str(uuid.uuid4())
        conn.execute(event_outbox.insert().values(
            message_id=message_id, host=host or event.host, event_type=event.name,
            payload=json.dumps(event.payload(), default=str),
            created_at=dt.datetime.now(dt.UTC), claimed_until=None))
        return message_id

    def pending(self) -> int:
        """Events not yet delivered (claimed ones included)."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(event_outbox)).scalar_one())

    def deliver(self, send: Callable[[OutboxMessage], None]) -> int:
        """Claim the oldest batch, ``send`` each in order, delete each once sent; return how
        many were sent. An exception from ``send`` stops the batch (it is raised, the rest
        of the batch is released for the next try)."""
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as conn:
            free = or_(event_outbox.c.claimed_until.is_(None),
                       event_outbox.c.claimed_until < now)
            query = (select(event_outbox.c.id, event_outbox.c.message_id,
                            event_outbox.c.event_type, event_outbox.c.payload)
                     .where(free).order_by(event_outbox.c.id).limit(self.batch))
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            if not rows:
                return 0
            conn.execute(update(event_outbox)
                         .where(event_outbox.c.id.in_([r.id for r in rows]))
                         .values(claimed_until=now + dt.timedelta(seconds=self.claim_seconds)))
        sent = 0
        try:
            for row in rows:
                send(OutboxMessage(row.message_id, row.event_type, json.loads(row.payload)))
                sent += 1
        finally:
            # One transaction for the batch: what was sent goes, the rest is released.
            done, left = [r.id for r in rows[:sent]], [r.id for r in rows[sent:]]
            with self.engine.begin() as conn:
                if done:
                    conn.execute(delete(event_outbox).where(event_outbox.c.id.in_(done)))
                if left:
                    conn.execute(update(event_outbox).where(event_outbox.c.id.in_(left))
                                 .values(claimed_until=None))
        return sent

"""The outbox on SQLite and PostgreSQL: kept in order, claimed by one worker at a time, sent
again (with the same message_id) when a sender died."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.outbox import OutboxMessage, SqlOutbox
from ivcache.adapters.sql.tables import event_outbox
from ivcache.core.events import CacheEvict, CacheHit, EvictReason


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ivcache.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_events_are_kept_and_sent_in_order_then_gone(engine: Engine) -> None:
    outbox = SqlOutbox(engine, batch=3)
    ids = [outbox.add(CacheHit(f"img-{n}", "node-1", f"e-{n}")) for n in range(5)]
    outbox.add(CacheEvict("img-9", "node-1", EvictReason.STALE, "e-9", 4))
    assert outbox.pending() == 6
    sent: list[OutboxMessage] = []
    while outbox.deliver(sent.append):
        pass
    assert [m.message_id for m in sent[:5]] == ids
    assert sent[0] == OutboxMessage(ids[0], "image_volume_cache.hit",
                                    {"image_id": "img-0", "host": "node-1", "entry_id": "e-0"})
    assert sent[5].payload == {"image_id": "img-9", "host": "node-1", "reason": "stale",
                               "entry_id": "e-9", "size_gb": 4}
    assert outbox.pending() == 0


def test_a_failed_send_keeps_that_event_and_those_behind_it(engine: Engine) -> None:
    outbox = SqlOutbox(engine)
    for n in range(4):
        outbox.add(CacheHit(f"img-{n}", "node-1"))
    seen: list[str] = []

    def flaky(message: OutboxMessage) -> None:
        if message.payload["image_id"] == "img-2":
            raise ConnectionError("broker down")
        seen.append(str(message.payload["image_id"]))

    with pytest.raises(ConnectionError):
        outbox.deliver(flaky)
    assert seen == ["img-0", "img-1"] and outbox.pending() == 2
    outbox.deliver(lambda m: seen.append(str(m.payload["image_id"])))
    assert seen == ["img-0", "img-1", "img-2", "img-3"]


def test_concurrent_workers_send_each_event_once(engine: Engine) -> None:
    outbox = SqlOutbox(engine, batch=5)
    for n in range(60):
        outbox.add(CacheHit(f"img-{n}", "node-1"))
    sent: list[str] = []
    lock = threading.Lock()

    def send(message: OutboxMessage) -> None:
        time.sleep(0.001)
        with lock:
            sent.append(message.message_id)

    def worker() -> None:
        mine = SqlOutbox(engine, batch=5)
        while mine.deliver(send):
            pass

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(sent) == len(set(sent)) == 60
    assert outbox.pending() == 0


def test_a_claim_whose_sender_died_is_sent_again_with_the_same_message_id(
        engine: Engine) -> None:
    outbox = SqlOutbox(engine, claim_seconds=60)
    message_id = outbox.add(CacheHit("img-1", "node-1"))
    claimed: list[OutboxMessage] = []
    with engine.begin() as conn:  # a live sender's claim: nobody else takes it
        conn.execute(update(event_outbox).values(
            claimed_until=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)))
    assert outbox.deliver(claimed.append) == 0 and outbox.pending() == 1
    with engine.begin() as conn:  # that sender died: its claim expires
        conn.execute(update(event_outbox).values(
            claimed_until=event_outbox.c.created_at))
    again: list[OutboxMessage] = []
    assert outbox.deliver(again.append) == 1
    assert [m.message_id for m in again] == [message_id]

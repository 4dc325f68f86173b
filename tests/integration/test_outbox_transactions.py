"""Each hit, miss and evict is kept in the outbox in the transaction of the change it
announces (SQLite and PostgreSQL): a process that dies right after that commit still leaves
the event for the bus; a change rolled back leaves none."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.memory import RecordingNotifier
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.outbox import OutboxMessage, SqlOutbox
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.adapters.storage.file import FileStorage
from ivcache.core.events import Event
from ivcache.core.model import RequestContext
from ivcache.core.ports import EventOutbox
from ivcache.core.service import CacheService

CTX = RequestContext.for_project("demo")
SCOPE = "node-1@default#default"


class Crash(BaseException):
    """The process dies here (not an error any code of ivcache's would handle)."""


class _Watched:
    def __init__(self, inner: EventOutbox, seen: list[str]) -> None:
        self._inner = inner
        self._seen = seen

    def add(self, event: Event) -> None:
        self._inner.add(event)
        self._seen.append(event.name)


class DyingUnitOfWork(SqlUnitOfWork):
    """Dies at the commit of the first transaction that keeps an event named ``kind``:
    right after it (``after``) or right before it (the transaction then rolls back)."""

    def __init__(self, engine: Engine, outbox: SqlOutbox) -> None:
        super().__init__(engine, outbox=outbox)
        self.kind: str | None = None
        self.after = True
        self._seen = threading.local()

    @property
    def outbox(self) -> EventOutbox:
        return _Watched(super().outbox, self._seen.names)

    def __enter__(self) -> DyingUnitOfWork:
        self._seen.names = []
        super().__enter__()
        return self

    def commit(self) -> None:
        dies = self.kind is not None and self.kind in self._seen.names
        if dies:
            self.kind = None  # once: the next process lives
            if not self.after:
                raise Crash
        super().commit()
        if dies:
            raise Crash


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


class World:
    def __init__(self, engine: Engine, tmp_path: Path) -> None:
        self.outbox = SqlOutbox(engine)
        self.uow = DyingUnitOfWork(engine, self.outbox)
        self.notifier = RecordingNotifier()
        self.images = LocalImageSource(tmp_path / "images")
        raw = tmp_path / "disk.raw"
        raw.write_bytes(b"ivcache " * 8192)
        self.image = self.images.add_image(CTX, raw, name="disk")
        self.storage = FileStorage(tmp_path / "volumes")
        self.service = CacheService(host="node-1", storage=self.storage, images=self.images,
                                    uow=self.uow, notifier=self.notifier)

    def create(self) -> str:
        return self.service.create_volume(CTX, self.image.id, 1).outcome.value

    def waiting(self) -> list[OutboxMessage]:
        """What waits for the bus (taken: the outbox is empty afterwards)."""
        sent: list[OutboxMessage] = []
        while self.outbox.deliver(sent.append):
            pass
        return sent


@pytest.fixture
def world(engine: Engine, tmp_path: Path) -> World:
    return World(engine, tmp_path)


def _kinds(messages: list[OutboxMessage]) -> list[str]:
    return [m.event_type.rsplit(".", 1)[1] for m in messages]


def _published(world: World, kind: str) -> int:
    return sum(e.name == f"image_volume_cache.{kind}" for e in world.notifier.events)


def test_requests_and_evictions_keep_each_event_once_in_the_outbox(world: World) -> None:
    assert [world.create() for _ in range(3)] == ["miss", "hit", "hit"]
    world.service.evict(everything=True)
    kept = world.waiting()
    assert _kinds(kept) == ["miss", "hit", "hit", "evict"]
    # The same events, once each, reached the notifier after each commit.
    assert [m.payload for m in kept] == [e.payload() for e in world.notifier.events
                                         if e.name in {m.event_type for m in kept}]
    stats = world.service.stats()
    assert (stats.misses, stats.hits, stats.evictions) == (1, 2, 1)


def test_a_miss_whose_process_died_right_after_ready_is_still_announced(
        world: World) -> None:
    world.uow.kind = "image_volume_cache.miss"
    with pytest.raises(Crash):
        world.create()
    [entry] = world.service.list_entries()
    assert entry.ready and world.service.stats().misses == 1
    assert _published(world, "miss") == 0  # it died before the notifiers heard of it
    [miss] = world.waiting()
    assert (miss.event_type, miss.payload) == ("image_volume_cache.miss", {
        "image_id": world.image.id, "host": "node-1", "scope": SCOPE, "outcome": "miss",
        "filled_from": "image-source", "entry_id": entry.id})


def test_a_hit_whose_process_died_right_after_its_lease_ended_is_still_announced(
        world: World) -> None:
    assert world.create() == "miss"
    world.waiting()
    world.uow.kind = "image_volume_cache.hit"
    with pytest.raises(Crash):
        world.create()
    [entry] = world.service.list_entries()
    assert entry.hits == 1 and entry.lease_until is None
    assert _published(world, "hit") == 0
    [hit] = world.waiting()
    assert (hit.event_type, hit.payload) == ("image_volume_cache.hit", {
        "image_id": world.image.id, "host": "node-1", "scope": SCOPE, "entry_id": entry.id})


def test_an_eviction_whose_process_died_right_after_the_delete_is_still_announced(
        world: World) -> None:
    assert world.create() == "miss"
    world.waiting()
    world.uow.kind = "image_volume_cache.evict"
    with pytest.raises(Crash):
        world.service.evict(everything=True)
    assert world.service.list_entries() == []
    assert _published(world, "evict") == 0
    [evict] = world.waiting()
    assert evict.event_type == "image_volume_cache.evict"
    assert evict.payload["reason"] == "admin"
    # Its volume is left to reconcile (an orphan), as before: the event is not lost.
    assert [f.kind for f in world.service.reconcile()] == ["orphan-cache-volume"]


@pytest.mark.parametrize("kind", ["miss", "hit", "evict"])
def test_a_change_rolled_back_leaves_no_event(world: World, kind: str) -> None:
    if kind != "miss":
        assert world.create() == "miss"
    before = (world.service.list_entries(), world.service.stats())
    world.waiting()
    world.uow.kind, world.uow.after = f"image_volume_cache.{kind}", False
    with pytest.raises(Crash):
        if kind == "evict":
            world.service.evict(everything=True)
        else:
            world.create()
    assert world.waiting() == []
    entries = world.service.list_entries()
    if kind == "miss":
        # The claim stays, as a process that died mid-download leaves it; no READY.
        assert [e.ready for e in entries] == [False]
        assert world.service.stats().misses == 0
    else:
        assert [(e.id, e.hits) for e in entries] == [(e.id, e.hits) for e in before[0]]
        assert world.service.stats() == before[1]
    assert _published(world, kind) == 0


def test_an_event_kept_by_a_process_that_died_is_sent_by_the_next(
        world: World, engine: Engine) -> None:
    world.uow.kind = "image_volume_cache.miss"
    with pytest.raises(Crash):
        world.create()
    # The next process: its outbox is the same table.
    later = SqlOutbox(engine)
    assert later.pending() == 1
    sent: list[OutboxMessage] = []
    later.deliver(sent.append)
    assert _kinds(sent) == ["miss"] and later.pending() == 0


def test_concurrent_hits_keep_the_ledger_and_the_outbox_exact(world: World) -> None:
    assert world.create() == "miss"
    outcomes: list[str] = []
    lock = threading.Lock()

    def hits() -> None:
        for _ in range(5):
            outcome = world.create()
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=hits) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert outcomes == ["hit"] * 20
    [entry] = world.service.list_entries()
    stats = world.service.stats()
    assert (entry.hits, stats.hits) == (20, 20)
    assert entry.bytes_saved == stats.bytes_saved == 20 * world.image.size
    assert entry.seconds_saved == pytest.approx(stats.seconds_saved)
    assert _kinds(world.waiting()) == ["miss"] + ["hit"] * 20

"""On the fakes: the events a transaction keeps in its outbox, and the savings ledger."""

from __future__ import annotations

import attrs
import pytest

from ivcache.core.events import CacheEvict, CacheHit, CacheMiss, Event
from ivcache.core.model import Outcome
from ivcache.core.policy import CachePolicy
from tests.unit.conftest import NODE_1, World

BUS = (CacheHit, CacheMiss, CacheEvict)


def _bus(events: list[Event]) -> list[Event]:
    return [e for e in events if isinstance(e, BUS)]


def test_the_outbox_keeps_each_hit_miss_and_evict_once_as_the_notifier_gets_them(
        world: World) -> None:
    service = world.service(policy=CachePolicy(max_count=1))
    world.image("one")
    world.image("two")
    outcomes = [service.create_volume(world.alice, image, 1).outcome
                for image in ("one", "one", "two", "two")]
    assert outcomes == [Outcome.MISS, Outcome.HIT, Outcome.MISS, Outcome.HIT]
    service.evict(everything=True)
    kept = world.uow.outbox.events
    assert [e.name.rsplit(".", 1)[1] for e in kept] == [
        "miss", "hit", "evict", "miss", "hit", "evict"]
    assert kept == _bus(world.notifier.events)
    assert [e.reason.value for e in kept if isinstance(e, CacheEvict)] == ["lru", "admin"]


def test_a_transaction_that_rolls_back_keeps_none_of_its_events(world: World) -> None:
    with world.uow as uow:
        uow.outbox.add(CacheHit("img", "node-1", "e-1"))
        uow.commit()
        uow.outbox.add(CacheHit("img", "node-1", "e-2"))
    with pytest.raises(ZeroDivisionError), world.uow as uow:
        uow.outbox.add(CacheHit("img", "node-1", "e-3"))
        raise ZeroDivisionError
    assert [e.entry_id for e in world.uow.outbox.events
            if isinstance(e, CacheHit)] == ["e-1"]


def test_an_uncached_miss_is_kept_with_its_download_and_a_disabled_cache_keeps_nothing(
        world: World) -> None:
    world.image("big", gib=5)
    small = world.service(policy=CachePolicy(max_size_gb=2))
    assert small.create_volume(world.alice, "big", 5).outcome is Outcome.MISS_UNCACHED
    [miss] = world.uow.outbox.events
    assert isinstance(miss, CacheMiss) and (miss.outcome, miss.entry_id) == (
        "miss-uncached", None)
    assert small.stats().misses == 1 and small.stats().downloads == 1
    off = world.service(policy=CachePolicy(enabled=False))
    assert off.create_volume(world.alice, "big", 5).outcome is Outcome.DISABLED
    assert len(world.uow.outbox.events) == 1 and off.stats().misses == 1


def test_each_hit_saves_the_images_bytes_and_the_fill_less_its_own_clone(
        world: World) -> None:
    image = world.image("img", data=b"x" * 300_000)
    # The fake download takes 10 s of the service's clock (its minimal size is 1 GiB).
    world.images.clock, world.images.seconds_per_gib = world.clock, 10.0
    service = world.service()
    miss = service.create_volume(world.alice, "img", 1)
    hits = [service.create_volume(world.alice, "img", 1) for _ in range(3)]
    assert [h.outcome for h in hits] == [Outcome.HIT] * 3
    assert miss.clone_seconds is not None and all(h.clone_seconds is not None for h in hits)
    [entry] = service.list_entries()
    assert entry.fill_seconds is not None and entry.fill_seconds == pytest.approx(10.0)
    saved = sum(entry.fill_seconds - (h.clone_seconds or 0.0) for h in hits)
    assert (entry.hits, entry.bytes_saved) == (3, 3 * image.size)
    assert entry.seconds_saved == pytest.approx(saved)
    stats = service.stats()
    assert (stats.bytes_saved, stats.hit_ratio) == (3 * image.size, 0.75)
    assert stats.seconds_saved == pytest.approx(saved)


def test_an_entry_whose_fill_was_never_measured_saves_bytes_but_no_seconds(
        world: World) -> None:
    image = world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    with world.uow as uow:
        entry = uow.entries.find(NODE_1, "img")
        assert entry is not None
        uow.entries.save(attrs.evolve(entry, fill_seconds=None))  # as migration 0004 left it
        uow.commit()
    assert service.create_volume(world.alice, "img", 1).outcome is Outcome.HIT
    stats = service.stats()
    assert (stats.hits, stats.bytes_saved, stats.seconds_saved) == (1, image.size, 0.0)


def test_a_warm_fills_and_measures_but_announces_no_miss(world: World) -> None:
    world.image("img")
    service = world.service()
    entry = service.warm("img")
    assert entry.fill_seconds is not None
    assert world.uow.outbox.events == [] and service.stats().misses == 0

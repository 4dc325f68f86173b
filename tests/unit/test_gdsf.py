"""The gdsf eviction policy (GreedyDual-Size-Frequency), on fakes.

Downloads take fake time proportional to size (``seconds_per_gib`` of the fake clock per
GiB), so each entry's measured fill time, its cost, is known exactly.
"""

from __future__ import annotations

import datetime as dt

import attrs
import pytest

from ivcache.core.model import CacheEntry, EntryState, Outcome
from ivcache.core.policy import CachePolicy
from ivcache.core.service import CacheService
from tests.unit.conftest import NODE_1, World, evictions

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SECONDS_PER_GIB = 10.0


@pytest.fixture
def timed(world: World) -> World:
    world.images.clock = world.clock
    world.images.seconds_per_gib = SECONDS_PER_GIB
    return world


def gdsf(*, max_count: int = 0, max_size_gb: int = 0) -> CachePolicy:
    return CachePolicy(max_count=max_count, max_size_gb=max_size_gb, eviction_policy="gdsf")


def use(world: World, service: CacheService, name: str, times: int = 1) -> None:
    """Create ``times`` volumes from ``name``, one second apart."""
    for _ in range(times):
        service.create_volume(world.alice, name, service.images.get_image(
            world.alice, name).min_size_gb)
        world.clock.advance(1)


def entry(world: World, name: str) -> CacheEntry:
    with world.uow as uow:
        found = uow.entries.find(NODE_1, name)
    assert found is not None
    return found


def cached(service: CacheService) -> list[str]:
    return sorted(e.image_id for e in service.list_entries())


# ---------------------------------------------------------------- the rule itself

def test_the_default_policy_is_cinders_lru_and_an_unknown_one_is_refused() -> None:
    assert CachePolicy().eviction_policy == "lru"
    with pytest.raises(ValueError, match="eviction_policy 'fifo' is not one of lru, gdsf"):
        CachePolicy(eviction_policy="fifo")


def test_the_priority_is_the_age_plus_uses_times_fill_seconds_over_size() -> None:
    e = CacheEntry(id="e", host="h", image_id="i", volume_id="v", size_gb=4,
                   image_updated_at=None, image_hash=None, state=EntryState.READY,
                   created_at=T0, last_used=T0, fill_seconds=40.0)
    assert CachePolicy.priority(0.0, e, 1) == 10.0
    assert CachePolicy.priority(7.5, e, 3) == 37.5
    # Unknown cost: as cheap as can be, only the age.
    assert CachePolicy.priority(7.5, attrs.evolve(e, fill_seconds=None), 3) == 7.5


def test_the_age_after_evicting_is_the_last_victims_priority_and_never_falls() -> None:
    def victim(priority: float) -> CacheEntry:
        return CacheEntry(id="e", host="h", image_id="i", volume_id="v", size_gb=1,
                          image_updated_at=None, image_hash=None, state=EntryState.READY,
                          created_at=T0, last_used=T0, priority=priority)

    assert gdsf().aged(5.0, [victim(6.0), victim(9.0)]) == 9.0
    assert gdsf().aged(5.0, [victim(2.0)]) == 5.0
    assert gdsf().aged(5.0, []) == 5.0
    assert CachePolicy().aged(5.0, [victim(9.0)]) == 5.0  # lru keeps no age


# ---------------------------------------------------------------- through the service

def test_a_miss_records_its_fill_time_and_each_hit_raises_the_priority(timed: World) -> None:
    service = timed.service(policy=gdsf())
    timed.image("img", gib=4)
    use(timed, service, "img")
    first = entry(timed, "img")
    assert first.fill_seconds == 40.0  # 4 GiB at 10 s/GiB, on the fake clock
    assert first.priority == 10.0  # one use × 40 s / 4 GiB
    use(timed, service, "img", times=2)
    again = entry(timed, "img")
    assert (again.hits, again.fill_seconds, again.priority) == (2, 40.0, 30.0)


@pytest.mark.parametrize(("policy", "victim"), [("lru", "big"), ("gdsf", "small")])
def test_gdsf_keeps_a_large_popular_image_that_lru_evicts_for_a_small_dead_one(
        timed: World, policy: str, victim: str) -> None:
    service = timed.service(policy=CachePolicy(max_size_gb=10, eviction_policy=policy))
    timed.image("big", gib=6)
    timed.image("small", gib=3)
    timed.image("new", gib=2)
    use(timed, service, "big", times=3)
    use(timed, service, "small")
    # 6 + 3 + 2 > 10: one must go. big was used longest ago, but three times; small once.
    use(timed, service, "new")
    assert evictions(timed) == [(victim, policy)]
    assert cached(service) == sorted({"big", "small", "new"} - {victim})


def test_the_cost_is_the_measured_fill_time_not_the_size(timed: World) -> None:
    service = timed.service(policy=gdsf(max_count=2))
    for name in ("slow", "fast", "new"):
        timed.image(name, gib=2)
    use(timed, service, "slow")
    timed.images.seconds_per_gib = 1.0  # the same size, got back ten times faster
    use(timed, service, "fast")
    assert (entry(timed, "slow").fill_seconds, entry(timed, "fast").fill_seconds) == (20, 2)
    use(timed, service, "new")
    assert evictions(timed) == [("fast", "gdsf")]  # lru would take slow, used first


def test_the_more_frequently_used_of_two_equal_entries_stays(timed: World) -> None:
    service = timed.service(policy=gdsf(max_count=2))
    for name in ("often", "once", "new"):
        timed.image(name)
    use(timed, service, "often", times=2)
    use(timed, service, "once")
    use(timed, service, "new")
    assert evictions(timed) == [("once", "gdsf")]


def test_of_equal_priorities_the_least_recently_used_goes_first(timed: World) -> None:
    service = timed.service(policy=gdsf(max_count=2))
    for name in ("a", "b", "c"):
        timed.image(name)
    use(timed, service, "a")
    use(timed, service, "b")
    assert entry(timed, "a").priority == entry(timed, "b").priority
    use(timed, service, "c")
    assert evictions(timed) == [("a", "gdsf")]


def test_aging_lets_a_once_popular_entry_go_when_newer_ones_outgrow_it(timed: World) -> None:
    service = timed.service(policy=gdsf(max_count=3))
    for n in range(12):
        timed.image(f"n{n}")
    timed.image("old")
    use(timed, service, "old", times=5)  # 5 uses × 10 s / 1 GiB: priority 50
    assert entry(timed, "old").priority == 50.0
    ages = []
    for n in range(1, 11):
        use(timed, service, f"n{n}")
        ages.append(service.stats().gdsf_age)
        assert "old" in cached(service), n
    # Each victim sets the age; each newcomer starts one use (10) above it.
    assert ages == [0, 0, 10, 10, 20, 20, 30, 30, 40, 40]
    use(timed, service, "n11")
    # The others reached 50 too: old, used longest ago, goes on the tie.
    assert evictions(timed)[-1] == ("old", "gdsf")
    assert service.stats().gdsf_age == 50.0


def test_pinned_entries_are_never_victims_under_gdsf(timed: World) -> None:
    service = timed.service(policy=gdsf(max_count=2))
    for name in ("cheap", "dear", "new", "newer"):
        timed.image(name)
    use(timed, service, "cheap")
    use(timed, service, "dear", times=3)
    service.pin("cheap")
    use(timed, service, "new")
    assert evictions(timed) == [("dear", "gdsf")]  # the lowest priority is pinned
    service.pin("new")
    result = service.create_volume(timed.alice, "newer", 1)
    assert result.outcome is Outcome.MISS_UNCACHED  # everything is pinned
    assert cached(service) == ["cheap", "new"]


def test_prune_under_gdsf_takes_the_lowest_priorities_and_ages_the_scope(
        timed: World) -> None:
    for name in ("a", "b", "c"):
        timed.image(name)
    roomy = timed.service(policy=gdsf())
    use(timed, roomy, "a", times=3)
    use(timed, roomy, "b")
    use(timed, roomy, "c")
    tight = timed.service(policy=gdsf(max_count=1))
    assert [e.image_id for e in tight.prune()] == ["b", "c"]
    assert cached(tight) == ["a"]
    assert tight.stats().gdsf_age == 10.0
    assert evictions(timed) == [("b", "gdsf"), ("c", "gdsf")]


def test_an_entry_whose_fill_time_is_unknown_goes_first_under_gdsf(timed: World) -> None:
    service = timed.service(policy=gdsf(max_count=2))
    for name in ("legacy", "known", "new"):
        timed.image(name)
    use(timed, service, "known")
    use(timed, service, "legacy", times=4)
    with timed.uow as uow:  # as if made before fill times were measured
        legacy = uow.entries.find(NODE_1, "legacy")
        assert legacy is not None
        uow.entries.save(attrs.evolve(legacy, fill_seconds=None, priority=0.0))
        uow.commit()
    use(timed, service, "legacy")  # a hit: its priority is the age alone
    assert entry(timed, "legacy").priority == 0.0
    use(timed, service, "new")
    assert evictions(timed) == [("legacy", "gdsf")]


def test_lru_keeps_the_priorities_but_never_ages_the_scope(timed: World) -> None:
    service = timed.service(policy=CachePolicy(max_count=1))
    for name in ("a", "b"):
        timed.image(name)
    use(timed, service, "a", times=2)
    use(timed, service, "b")
    assert evictions(timed) == [("a", "lru")]
    assert service.stats().gdsf_age == 0.0
    # A scope switched to gdsf later finds its entries' priorities in place.
    assert entry(timed, "b").priority == 10.0

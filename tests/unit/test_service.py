"""The cache service's rules, on fakes."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator

import attrs
import pytest

from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.core.errors import (
    ChecksumMismatch,
    ImageNotActive,
    ImageNotFound,
    InvalidIdentifier,
    InvalidSize,
    NoSpace,
    VolumeNotFound,
)
from ivcache.core.model import EntryState, InternalTenant, Outcome, RequestContext, Volume
from ivcache.core.policy import CachePolicy
from ivcache.core.service import CacheService, SystemClock
from tests.unit.conftest import NODE_1, World, claim, evictions, lease, outcomes_announced

# ---------------------------------------------------------------- miss, hit, ownership

def test_the_first_create_is_a_miss_that_caches_a_minimal_volume_owned_by_the_internal_tenant(
        world: World) -> None:
    world.image("img", gib=2)
    result = world.service().create_volume(world.alice, "img", 10)

    assert result.outcome is Outcome.MISS
    assert result.volume.size_gb == 10 and result.volume.owner == "alice"
    [entry] = world.service().list_entries()
    assert entry.state is EntryState.READY and entry.size_gb == 2
    cache_volume = world.storage().get_volume(entry.volume_id)
    assert cache_volume.owner == "internal" and cache_volume.size_gb == 2
    assert world.images.downloads == 1


def test_later_creates_are_hits_that_clone_without_downloading(world: World) -> None:
    image = world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    second = service.create_volume(world.bob, "img", 3)

    assert second.outcome is Outcome.HIT
    assert second.volume.owner == "bob" and second.volume.size_gb == 3
    assert world.images.downloads == 1
    data = world.images.data[image.id]
    assert world.storage().read(second.volume.id, 0, len(data)) == data
    assert service.list_entries()[0].hits == 1
    stats = service.stats()
    assert (stats.hits, stats.misses, stats.downloads) == (1, 1, 1)


def test_each_request_announces_exactly_one_of_hit_or_miss(world: World) -> None:
    world.image("img")
    service = world.service()
    for _ in range(3):
        service.create_volume(world.alice, "img", 1)
    assert outcomes_announced(world) == [
        "image_volume_cache.miss", "image_volume_cache.hit", "image_volume_cache.hit"]


def test_the_users_volume_is_a_clone_and_deleting_it_leaves_the_cache_alone(
        world: World) -> None:
    world.image("img")
    service = world.service()
    volume = service.create_volume(world.alice, "img", 1).volume
    service.delete_volume(world.alice, volume.id)
    assert service.create_volume(world.alice, "img", 1).outcome is Outcome.HIT


def test_an_entry_of_another_host_is_never_used(world: World) -> None:
    world.image("img")
    world.service(host="node-1").create_volume(world.alice, "img", 1)
    other = world.service(host="node-2").create_volume(world.alice, "img", 1)
    assert other.outcome is Outcome.MISS
    assert {e.host for e in world.service().list_entries()} == {"node-1", "node-2"}


def test_a_disabled_cache_downloads_straight_into_the_users_volume(world: World) -> None:
    world.image("img")
    service = world.service(policy=CachePolicy(enabled=False))
    results = [service.create_volume(world.alice, "img", 1) for _ in range(2)]
    assert [r.outcome for r in results] == [Outcome.DISABLED, Outcome.DISABLED]
    assert service.list_entries() == [] and world.images.downloads == 2
    assert outcomes_announced(world) == []


# ---------------------------------------------------------------- limits and eviction

def test_unlimited_limits_keep_every_image(world: World) -> None:
    service = world.service(policy=CachePolicy(max_count=0, max_size_gb=0))
    for i in range(20):
        world.image(f"img-{i}", gib=5)
        service.create_volume(world.alice, f"img-{i}", 5)
    assert len(service.list_entries()) == 20 and evictions(world) == []


def test_a_count_limit_evicts_the_least_recently_used_entry(world: World) -> None:
    service = world.service(policy=CachePolicy(max_count=2))
    for name in ("a", "b", "c"):
        world.image(name)
        service.create_volume(world.alice, name, 1)
        world.clock.advance(1)
    assert sorted(e.image_id for e in service.list_entries()) == ["b", "c"]
    assert evictions(world) == [("a", "lru")]
    assert len(world.storage().list_volumes(owner="internal")) == 2


def test_a_size_limit_evicts_until_the_new_entry_fits(world: World) -> None:
    service = world.service(policy=CachePolicy(max_size_gb=4))
    for name, gib in (("a", 1), ("b", 2), ("c", 1), ("d", 3)):
        world.image(name, gib=gib)
        service.create_volume(world.alice, name, gib)
        world.clock.advance(1)
    # d needs 3 GiB of 4: a (1) and b (2) go, oldest first; c stays.
    assert evictions(world) == [("a", "lru"), ("b", "lru")]
    assert sorted(e.image_id for e in service.list_entries()) == ["c", "d"]
    assert service.stats().size_gb == 4


def test_count_and_size_limits_both_hold(world: World) -> None:
    service = world.service(policy=CachePolicy(max_size_gb=10, max_count=2))
    for name, gib in (("a", 1), ("b", 2), ("c", 9)):
        world.image(name, gib=gib)
        service.create_volume(world.alice, name, gib)
        world.clock.advance(1)
    assert [e.image_id for e in service.list_entries()] == ["c"]
    totals = service.stats()
    assert (totals.count, totals.size_gb) == (1, 9)


def test_eviction_takes_the_least_recently_used_not_the_oldest(world: World) -> None:
    service = world.service(policy=CachePolicy(max_count=2))
    for name in ("a", "b"):
        world.image(name)
        service.create_volume(world.alice, name, 1)
        world.clock.advance(1)
    service.create_volume(world.alice, "a", 1)  # a is now the most recently used
    world.clock.advance(1)
    world.image("c")
    service.create_volume(world.alice, "c", 1)
    assert evictions(world) == [("b", "lru")]


def test_an_image_bigger_than_the_cache_is_served_uncached_and_evicts_nothing(
        world: World) -> None:
    service = world.service(policy=CachePolicy(max_size_gb=5))
    world.image("small", gib=2)
    service.create_volume(world.alice, "small", 2)
    world.image("huge", gib=6)
    result = service.create_volume(world.alice, "huge", 6)
    assert result.outcome is Outcome.MISS_UNCACHED
    assert [e.image_id for e in service.list_entries()] == ["small"]
    assert evictions(world) == []
    assert outcomes_announced(world)[-1] == "image_volume_cache.miss"


def test_pinned_and_leased_entries_are_never_victims(world: World) -> None:
    service = world.service(policy=CachePolicy(max_count=2))
    for name in ("a", "b"):
        world.image(name)
        service.create_volume(world.alice, name, 1)
        world.clock.advance(1)
    with world.uow as uow:
        a = uow.entries.find(NODE_1, "a")
        b = uow.entries.find(NODE_1, "b")
        assert a is not None and b is not None
        a.pinned = True
        uow.entries.save(a)
        uow.commit()
    lease(world, "b", 60)
    world.image("c")
    assert service.create_volume(world.alice, "c", 1).outcome is Outcome.MISS_UNCACHED
    assert evictions(world) == []


def test_the_internal_tenants_quota_is_checked_before_anything_is_evicted(
        world: World) -> None:
    tenant = InternalTenant(quota_gb=2)
    service = world.service(policy=CachePolicy(max_count=1), tenant=tenant)
    world.image("a", gib=1)
    service.create_volume(world.alice, "a", 1)
    world.image("b", gib=3)
    # Room by the count limit would mean evicting a, but b alone exceeds the quota.
    assert service.create_volume(world.alice, "b", 3).outcome is Outcome.MISS_UNCACHED
    assert [e.image_id for e in service.list_entries()] == ["a"]
    assert evictions(world) == []


def test_quota_counts_cache_volumes_on_every_host(world: World) -> None:
    tenant = InternalTenant(quota_volumes=1)
    world.image("a")
    world.image("b")
    world.service(host="node-1", tenant=tenant).create_volume(world.alice, "a", 1)
    result = world.service(host="node-2", tenant=tenant).create_volume(world.alice, "b", 1)
    assert result.outcome is Outcome.MISS_UNCACHED


# ---------------------------------------------------------------- staleness

def test_a_stale_entry_is_evicted_and_the_request_downloads_again(world: World) -> None:
    world.image("img", data=b"old" * 100)
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    world.clock.advance(5)
    world.images.images["img"] = attrs.evolve(world.images.images["img"], os_hash_value=None,
                                              updated_at=world.clock.now())
    world.images.add(world.images.images["img"], b"new" * 100)

    result = service.create_volume(world.alice, "img", 1)
    assert result.outcome is Outcome.MISS
    assert evictions(world) == [("img", "stale")]
    assert world.storage().read(result.volume.id, 0, 3) == b"new"


def test_a_metadata_only_change_keeps_the_hit_and_refreshes_the_entry(world: World) -> None:
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    world.clock.advance(5)
    newer = attrs.evolve(world.images.images["img"], name="renamed",
                         updated_at=world.clock.now())
    world.images.images["img"] = newer
    assert service.create_volume(world.alice, "img", 1).outcome is Outcome.HIT
    assert service.list_entries()[0].image_updated_at == newer.updated_at


def test_with_no_hash_known_a_changed_updated_at_means_stale(world: World) -> None:
    world.images.add(world.image("img"), b"x" * 10, with_hash=False)
    world.images.images["img"] = attrs.evolve(world.images.images["img"], os_hash_algo=None,
                                              os_hash_value=None, size=10)
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    world.clock.advance(5)
    world.images.images["img"] = attrs.evolve(world.images.images["img"],
                                              updated_at=world.clock.now())
    assert service.create_volume(world.alice, "img", 1).outcome is Outcome.MISS
    assert evictions(world) == [("img", "stale")]


def test_an_image_deleted_for_everyone_has_its_entry_evicted(world: World) -> None:
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    del world.images.images["img"]
    with pytest.raises(ImageNotFound):
        service.create_volume(world.alice, "img", 1)
    assert service.list_entries() == []
    assert evictions(world) == [("img", "image-deleted")]
    assert world.storage().list_volumes(owner="internal") == []


def test_an_image_no_longer_active_is_never_served_and_its_entry_goes(world: World) -> None:
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    world.images.images["img"] = attrs.evolve(world.images.images["img"],
                                              status="deactivated")
    with pytest.raises(ImageNotActive):
        service.create_volume(world.alice, "img", 1)
    assert evictions(world) == [("img", "image-deleted")]


# ---------------------------------------------------------------- who may see what

def test_another_projects_private_image_is_refused_before_and_after_it_is_cached(
        world: World) -> None:
    world.image("secret", owner="alice", visibility="private")
    service = world.service()
    with pytest.raises(ImageNotFound):
        service.create_volume(world.bob, "secret", 1)
    service.create_volume(world.alice, "secret", 1)
    with pytest.raises(ImageNotFound):
        service.create_volume(world.bob, "secret", 1)
    assert service.list_volumes(world.bob) == []
    assert len(service.list_entries()) == 1  # bob's failure evicted nothing
    assert outcomes_announced(world) == ["image_volume_cache.miss"]


def test_a_cache_volume_deleted_behind_the_caches_back_is_downloaded_again(
        world: World) -> None:
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    world.storage().delete_volume(service.list_entries()[0].volume_id)
    assert service.create_volume(world.alice, "img", 1).outcome is Outcome.MISS
    assert world.images.downloads == 2 and len(service.list_entries()) == 1


def test_a_clone_that_fails_counts_no_hit_and_its_eviction_says_the_volume_was_missing(
        world: World) -> None:
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    world.storage().delete_volume(service.list_entries()[0].volume_id)

    assert service.create_volume(world.alice, "img", 1).outcome is Outcome.MISS
    stats = service.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (0, 2, 1)
    assert evictions(world) == [("img", "missing-volume")]
    assert service.list_entries()[0].hits == 0
    assert outcomes_announced(world) == ["image_volume_cache.miss"] * 2


class RivalLeases(FakeLvmStorage):
    """Storage on which a rival request leases the entry anew whenever a clone finds the
    cache volume gone: the interleaving of two requests that both try to clone it."""

    def __init__(self, world: World) -> None:
        super().__init__(capacity_gb=10_000, host="node-1")
        self.world = world
        self.failed_clones = 0

    def clone_volume(self, src_id: str, dst_id: str, size_gb: int, owner: str) -> Volume:
        try:
            self.get_volume(src_id)
        except VolumeNotFound:
            self.failed_clones += 1
            if self.failed_clones > 20:
                raise AssertionError("the requests keep leasing a volume that is gone") from None
            self.world.clock.advance(1)
            lease(self.world, "img", 300)  # the rival's lease outlasts ours
            raise
        return super().clone_volume(src_id, dst_id, size_gb, owner)


def test_a_vanished_cache_volume_is_forgotten_even_while_another_request_leases_it(
        world: World) -> None:
    world.storages["node-1"] = RivalLeases(world)
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    world.storage().delete_volume(service.list_entries()[0].volume_id)

    assert service.create_volume(world.alice, "img", 1).outcome is Outcome.MISS
    assert evictions(world) == [("img", "missing-volume")]
    [entry] = service.list_entries()
    assert world.storage().get_volume(entry.volume_id).owner == "internal"


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_a_size_that_is_not_a_positive_whole_number_is_refused(world: World,
                                                                size: object) -> None:
    world.image("img")
    with pytest.raises(InvalidSize):
        world.service().create_volume(world.alice, "img", size)  # type: ignore[arg-type]
    assert world.storage().list_volumes() == []


def test_a_size_below_the_images_size_or_min_disk_is_refused(world: World) -> None:
    world.image("big", gib=3)
    world.image("floor", gib=1, min_disk=5)
    service = world.service()
    with pytest.raises(InvalidSize, match="at least 3 GiB"):
        service.create_volume(world.alice, "big", 2)
    with pytest.raises(InvalidSize, match="at least 5 GiB"):
        service.create_volume(world.alice, "floor", 4)
    assert world.storage().list_volumes() == [] and service.list_entries() == []


def test_an_unknown_image_is_refused(world: World) -> None:
    with pytest.raises(ImageNotFound):
        world.service().create_volume(world.alice, "nope", 1)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "x\x00y", ""])
def test_a_volume_id_that_could_escape_is_refused(world: World, bad: str) -> None:
    world.image("img")
    with pytest.raises(InvalidIdentifier):
        world.service().create_volume(world.alice, "img", 1, volume_id=bad)
    with pytest.raises(InvalidIdentifier):
        world.service().delete_volume(world.alice, bad)


def test_corrupt_image_bytes_leave_no_entry_and_no_volume(world: World) -> None:
    world.image("img", data=b"a" * 5000)
    world.images.data["img"] = b"b" * 5000
    service = world.service()
    with pytest.raises(ChecksumMismatch):
        service.create_volume(world.alice, "img", 1)
    assert service.list_entries() == [] and world.storage().list_volumes() == []
    assert service.stats().count == 0


def test_a_full_backend_leaves_no_half_made_volume_and_no_entry(world: World) -> None:
    from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
    world.storages["node-1"] = FakeLvmStorage(capacity_gb=2, host="node-1")
    world.image("img", gib=1)
    service = world.service()
    with pytest.raises(NoSpace):
        service.create_volume(world.alice, "img", 3)
    # the cache volume fit, the user's did not: the cache keeps a whole entry, nothing else
    assert [v.owner for v in world.storage().list_volumes()] == ["internal"]
    world.storages["node-1"] = FakeLvmStorage(capacity_gb=1, host="node-1")
    world.uow = type(world.uow)()
    service = world.service()
    world.image("other", gib=2)
    with pytest.raises(NoSpace):
        service.create_volume(world.alice, "other", 2)
    assert world.storage().list_volumes() == [] and service.list_entries() == []


# ---------------------------------------------------------------- concurrency

class SlowImages:
    """Wraps an image source so downloads take a while and can be counted."""

    def __init__(self, world: World, delay: float) -> None:
        self.inner = world.images
        self.delay = delay
        self.downloads = 0
        self._lock = threading.Lock()

    def get_image(self, ctx: RequestContext, image_id: str):  # type: ignore[no-untyped-def]
        return self.inner.get_image(ctx, image_id)

    def list_images(self, ctx: RequestContext):  # type: ignore[no-untyped-def]
        return self.inner.list_images(ctx)

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        with self._lock:
            self.downloads += 1
        for chunk in self.inner.open_data(ctx, image_id):
            time.sleep(self.delay)
            yield chunk


def test_concurrent_misses_download_once_and_the_others_are_served_as_hits(
        world: World) -> None:
    world.image("img", data=b"z" * (64 * 1024 * 4))
    images = SlowImages(world, 0.05)
    service = CacheService(host="node-1", storage=world.storage(), images=images,
                           uow=world.uow, notifier=world.notifier, clock=SystemClock())
    results: list[Outcome] = []
    lock = threading.Lock()

    def create() -> None:
        outcome = service.create_volume(world.alice, "img", 1).outcome
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert images.downloads == 1
    assert sorted(r.value for r in results) == ["hit"] * 7 + ["miss"]
    assert len(outcomes_announced(world)) == 8


def test_a_claim_whose_owner_died_is_taken_over_after_its_lease(world: World) -> None:
    world.image("img")
    claim(world, "img", expires_in=-1)
    world.storage().create_volume("vol-claim", 1, "internal")  # its half-made volume
    result = world.service().create_volume(world.alice, "img", 1)
    assert result.outcome is Outcome.MISS
    [entry] = world.service().list_entries()
    assert entry.id != "claim-1" and entry.ready
    assert "vol-claim" not in {v.id for v in world.storage().list_volumes()}


def test_a_request_waits_a_bounded_time_for_another_download_then_goes_uncached(
        world: World) -> None:
    world.image("img")
    claim(world, "img", expires_in=3600)
    service = world.service(policy=CachePolicy(claim_wait_seconds=2))
    started = world.clock.now()
    result = service.create_volume(world.alice, "img", 1)
    assert result.outcome is Outcome.MISS_UNCACHED
    assert dt.timedelta(seconds=2) <= world.clock.now() - started < dt.timedelta(seconds=4)
    assert outcomes_announced(world) == ["image_volume_cache.miss"]


# ---------------------------------------------------------------- warm, pin, reconcile

def test_when_the_source_cannot_say_whether_an_image_is_gone_the_entry_stays(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from ivcache.core.errors import ImageUnavailable

    world.image("secret", owner="alice", visibility="private")
    service = world.service()
    service.create_volume(world.alice, "secret", 1)
    real = world.images.get_image

    def tenant_check_fails(ctx: RequestContext, image_id: str) -> object:
        if ctx.project_id == "internal":
            raise ImageUnavailable("glance at http://g is unavailable: connection refused")
        return real(ctx, image_id)

    monkeypatch.setattr(world.images, "get_image", tenant_check_fails)
    with pytest.raises(ImageNotFound):
        service.create_volume(world.bob, "secret", 1)
    assert len(service.list_entries()) == 1 and evictions(world) == []


# -- leases: a clone in progress keeps its source ----------------------------------------------

def test_a_stale_entry_that_a_clone_still_reads_is_evicted_once_the_clone_lets_go(
        world: World) -> None:
    world.image("img", data=b"old" * 100)
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    lease(world, "img", 2)
    world.images.images["img"] = attrs.evolve(world.images.images["img"], os_hash_value=None,
                                              updated_at=world.clock.now())
    world.images.add(world.images.images["img"], b"new" * 100)
    started = world.clock.now()
    result = service.create_volume(world.alice, "img", 1)
    assert result.outcome is Outcome.MISS
    assert evictions(world) == [("img", "stale")]
    assert world.clock.now() - started >= dt.timedelta(seconds=2)  # it waited for the lease
    assert world.storage().read(result.volume.id, 0, 3) == b"new"




@pytest.mark.parametrize("size", [2**33, 10**12, 2**63])
def test_a_size_no_volume_can_have_is_refused_before_anything_is_made(world: World,
                                                                      size: int) -> None:
    world.image("img")
    with pytest.raises(InvalidSize, match="larger than any volume can be"):
        world.service().create_volume(world.alice, "img", size)
    assert world.storage().list_volumes() == [] and world.images.downloads == 0


def test_the_internal_tenants_project_cannot_make_or_list_volumes_as_a_user(
        world: World) -> None:
    from ivcache.core.errors import InvalidRequest
    world.image("img")
    service = world.service()
    internal = RequestContext.for_project("internal")
    with pytest.raises(InvalidRequest, match="internal tenant"):
        service.create_volume(internal, "img", 1)
    with pytest.raises(InvalidRequest, match="internal tenant"):
        service.create_volume(RequestContext.for_project("internal", admin=True), "img", 1)
    with pytest.raises(InvalidRequest, match="internal tenant"):
        service.list_volumes(internal)
    assert world.storage().list_volumes() == [] and world.images.downloads == 0

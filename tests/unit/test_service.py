"""The cache service's rules, on fakes."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator

import attrs
import pytest

from ivcache.core.errors import (
    ChecksumMismatch,
    ImageNotActive,
    ImageNotFound,
    InvalidIdentifier,
    InvalidRequest,
    InvalidSize,
    NoSpace,
    VolumeNotFound,
)
from ivcache.core.events import CacheEvict, CacheHit, CacheMiss
from ivcache.core.model import CacheEntry, EntryState, InternalTenant, Outcome, RequestContext
from ivcache.core.policy import CachePolicy
from ivcache.core.service import CacheService, SystemClock
from tests.unit.conftest import World


def outcomes_announced(world: World) -> list[str]:
    return [e.name for e in world.notifier.events if isinstance(e, CacheHit | CacheMiss)]


def evictions(world: World) -> list[tuple[str, str]]:
    return [(e.image_id, e.reason.value) for e in world.notifier.of(CacheEvict)
            if isinstance(e, CacheEvict)]


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
        a = uow.entries.find("node-1", "a")
        b = uow.entries.find("node-1", "b")
        assert a is not None and b is not None
        a.pinned = True
        b.lease_until = world.clock.now() + dt.timedelta(seconds=60)
        uow.entries.save(a)
        uow.entries.save(b)
        uow.commit()
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


def test_prune_brings_a_host_back_within_lowered_limits(world: World) -> None:
    for name in ("a", "b", "c"):
        world.image(name)
        world.service().create_volume(world.alice, name, 1)
        world.clock.advance(1)
    pruned = world.service(policy=CachePolicy(max_count=1)).prune()
    assert [e.image_id for e in pruned] == ["a", "b"]
    assert len(world.storage().list_volumes(owner="internal")) == 1


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


def test_a_user_can_neither_see_nor_delete_a_cache_volume(world: World) -> None:
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    cache_volume = service.list_entries()[0].volume_id
    assert cache_volume not in {v.id for v in service.list_volumes(world.alice)}
    with pytest.raises(VolumeNotFound):
        service.delete_volume(world.alice, cache_volume)
    with pytest.raises(VolumeNotFound):
        service.get_volume(world.bob, cache_volume)
    assert len(service.list_entries()) == 1


def test_a_user_cannot_delete_another_projects_volume(world: World) -> None:
    world.image("img")
    service = world.service()
    volume = service.create_volume(world.alice, "img", 1).volume
    with pytest.raises(VolumeNotFound):
        service.delete_volume(world.bob, volume.id)
    assert service.get_volume(world.alice, volume.id) == volume


def test_an_admin_deleting_a_cache_volume_removes_its_entry(world: World) -> None:
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    cache_volume = service.list_entries()[0].volume_id
    assert cache_volume in {v.id for v in service.list_volumes(world.admin, all_projects=True)}
    service.delete_volume(world.admin, cache_volume)
    assert service.list_entries() == []
    assert evictions(world) == [("img", "admin")]
    with pytest.raises(VolumeNotFound):
        world.storage().get_volume(cache_volume)


def test_a_cache_volume_deleted_behind_the_caches_back_is_downloaded_again(
        world: World) -> None:
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    world.storage().delete_volume(service.list_entries()[0].volume_id)
    assert service.create_volume(world.alice, "img", 1).outcome is Outcome.MISS
    assert world.images.downloads == 2 and len(service.list_entries()) == 1


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


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "x\x00y"])
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


def claim(world: World, image_id: str, expires_in: float) -> CacheEntry:
    now = world.clock.now()
    entry = CacheEntry(id="claim-1", host="node-1", image_id=image_id, volume_id="vol-claim",
                       size_gb=1, image_updated_at=now, image_hash=None,
                       state=EntryState.CREATING, created_at=now, last_used=now,
                       claim_expires=now + dt.timedelta(seconds=expires_in))
    with world.uow as uow:
        uow.entries.add(entry)
        uow.commit()
    return entry


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


def test_evict_by_image_entry_or_all(world: World) -> None:
    service = world.service()
    for name in ("a", "b", "c"):
        world.image(name)
        service.create_volume(world.alice, name, 1)
    service.evict(image_id="a")
    service.evict(entry_id=service.list_entries()[0].id)
    service.evict(everything=True)
    assert service.list_entries() == []
    assert [r for _, r in evictions(world)] == ["admin"] * 3
    assert service.stats().evictions == 3


# ---------------------------------------------------------------- warm, pin, reconcile

def test_warm_caches_an_image_ahead_of_demand_so_the_first_create_is_a_hit(
        world: World) -> None:
    world.image("img", owner="alice", visibility="private")
    service = world.service()
    entry = service.warm("img")
    assert entry.ready and world.images.downloads == 1
    assert service.warm("img").id == entry.id and world.images.downloads == 1
    assert service.create_volume(world.alice, "img", 1).outcome is Outcome.HIT


def test_warm_refuses_an_image_that_cannot_fit(world: World) -> None:
    world.image("huge", gib=50)
    with pytest.raises(NoSpace):
        world.service(policy=CachePolicy(max_size_gb=10)).warm("huge")
    assert world.service().list_entries() == []


def test_a_pinned_entry_is_never_evicted_to_make_room_until_unpinned(world: World) -> None:
    service = world.service(policy=CachePolicy(max_count=1))
    world.image("a")
    world.image("b")
    service.create_volume(world.alice, "a", 1)
    assert service.pin("a").pinned
    assert service.create_volume(world.alice, "b", 1).outcome is Outcome.MISS_UNCACHED
    service.pin("a", pinned=False)
    assert service.create_volume(world.alice, "b", 1).outcome is Outcome.MISS
    assert [e.image_id for e in service.list_entries()] == ["b"]


def test_pinning_an_image_with_no_entry_is_an_error(world: World) -> None:
    from ivcache.core.errors import EntryNotFound
    with pytest.raises(EntryNotFound):
        world.service().pin("nothing")


def test_reconcile_finds_and_fixes_missing_volumes_dead_claims_and_orphans(
        world: World) -> None:
    service = world.service()
    for name in ("a", "b"):
        world.image(name)
        service.create_volume(world.alice, name, 1)
    lost = service.list_entries()[0]
    world.storage().delete_volume(lost.volume_id)
    claim(world, "c", expires_in=-1)
    world.storage().create_volume("orphan-1", 1, "internal")
    world.storage().create_volume("users-own", 1, "alice")

    found = {(f.kind, f.volume_id) for f in service.reconcile()}
    assert found == {("missing-volume", lost.volume_id), ("expired-claim", "vol-claim"),
                     ("orphan-volume", "orphan-1")}
    assert len(service.list_entries()) == 3  # a dry run changes nothing

    assert all(f.fixed for f in service.reconcile(fix=True))
    assert service.reconcile() == []
    assert len(service.list_entries()) == 1
    assert {v.id for v in world.storage().list_volumes(owner="alice")} >= {"users-own"}
    assert ("c", "reconcile") in evictions(world)


def test_reconcile_leaves_the_volumes_of_other_hosts_sharing_the_storage_alone(
        world: World) -> None:
    world.image("img")
    shared = world.storage("node-1")
    world.storages["node-2"] = shared
    world.service(host="node-2").create_volume(world.alice, "img", 1)
    assert world.service(host="node-1").reconcile(fix=True) == []
    assert world.service(host="node-2").create_volume(world.alice, "img", 1).outcome \
        is Outcome.HIT


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

def lease(world: World, image_id: str, seconds: float) -> None:
    """As if a clone of the entry's volume were in progress for ``seconds`` more."""
    with world.uow as uow:
        entry = uow.entries.find("node-1", image_id)
        assert entry is not None
        entry.lease_until = world.clock.now() + dt.timedelta(seconds=seconds)
        uow.entries.save(entry)
        uow.commit()


def test_an_admin_eviction_skips_an_entry_that_a_clone_is_reading_until_its_lease_ends(
        world: World) -> None:
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    lease(world, "img", 60)
    assert service.evict(image_id="img") == []
    assert [e.image_id for e in service.list_entries()] == ["img"]
    world.clock.advance(61)
    assert [e.image_id for e in service.evict(image_id="img")] == ["img"]
    assert evictions(world) == [("img", "admin")]


def test_an_admin_cannot_delete_a_cache_volume_while_a_clone_reads_it(world: World) -> None:
    world.image("img")
    service = world.service()
    service.create_volume(world.alice, "img", 1)
    cache_volume = service.list_entries()[0].volume_id
    lease(world, "img", 60)
    with pytest.raises(InvalidRequest, match="being cloned"):
        service.delete_volume(world.admin, cache_volume)
    assert world.storage().get_volume(cache_volume).id == cache_volume
    assert len(service.list_entries()) == 1


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


def test_warm_refuses_at_once_to_replace_a_stale_entry_that_a_clone_is_reading(
        world: World) -> None:
    from ivcache.core.errors import InvalidRequest
    world.image("img", data=b"old" * 100)
    service = world.service()
    service.warm("img")
    lease(world, "img", 60)
    world.images.images["img"] = attrs.evolve(world.images.images["img"], os_hash_value=None)
    world.images.add(world.images.images["img"], b"new" * 100)
    with pytest.raises(InvalidRequest, match="being cloned"):
        service.warm("img")
    assert [e.image_id for e in service.list_entries()] == ["img"]

"""The operator's commands (evict, prune, warm, pin, reconcile) and volume administration,
on fakes."""

from __future__ import annotations

import attrs
import pytest

from ivcache.core.errors import (
    EntryNotFound,
    InvalidRequest,
    NoSpace,
    StorageError,
    VolumeNotFound,
)
from ivcache.core.model import Outcome, Volume
from ivcache.core.policy import CachePolicy
from tests.unit.conftest import World, claim, evictions, lease


def test_prune_brings_a_host_back_within_lowered_limits(world: World) -> None:
    for name in ("a", "b", "c"):
        world.image(name)
        world.service().create_volume(world.alice, name, 1)
        world.clock.advance(1)
    pruned = world.service(policy=CachePolicy(max_count=1)).prune()
    assert [e.image_id for e in pruned] == ["a", "b"]
    assert len(world.storage().list_volumes(owner="internal")) == 1


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
    assert found == {("missing-volume", lost.volume_id), ("dead-claim", "vol-claim"),
                     ("orphan-cache-volume", "orphan-1")}
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


def test_an_admin_deleting_another_hosts_cache_volume_evicts_on_that_host(
        world: World) -> None:
    world.image("img")
    world.storages["node-2"] = world.storage("node-1")  # one storage shared by two hosts
    world.service(host="node-2").create_volume(world.alice, "img", 1)
    [entry] = world.service(host="node-2").list_entries()

    world.service(host="node-1").delete_volume(world.admin, entry.volume_id)
    assert world.service(host="node-2").list_entries() == []
    assert world.service(host="node-2").stats().evictions == 1
    assert world.service(host="node-1").stats().evictions == 0
    assert evictions(world) == [("img", "admin")]


def test_reconcile_reports_what_dead_processes_left_in_the_storage_and_fixes_it(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    service = world.service()
    left = [("partial-volume", "/vols/half.raw", 4096), ("index-damage", "/vols/index.json", 7)]
    asked: list[bool] = []

    def leftovers(*, remove: bool) -> list[tuple[str, str, int]]:
        asked.append(remove)
        found = list(left)
        if remove:
            left.clear()
        return found

    monkeypatch.setattr(world.storage(), "leftovers", leftovers)

    assert [(f.kind, f.volume_id, f.path, f.size, f.fixed) for f in service.reconcile()] == [
        ("partial-volume", "", "/vols/half.raw", 4096, False),
        ("index-damage", "", "/vols/index.json", 7, False)]
    assert [f.fixed for f in service.reconcile(fix=True)] == [True, True]
    assert service.reconcile(fix=True) == []
    assert asked == [False, True, True]


def test_reconcile_with_an_unreadable_storage_index_reports_the_damage_alone(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    service = world.service()
    damage = [("index-damage", "/vols/index.json", 7)]
    monkeypatch.setattr(world.storage(), "leftovers", lambda *, remove: damage)

    def unreadable(owner: str | None = None) -> list[Volume]:
        raise StorageError("index /vols/index.json is corrupt")

    monkeypatch.setattr(world.storage(), "list_volumes", unreadable)

    assert [(f.kind, f.path) for f in service.reconcile()] == [
        ("index-damage", "/vols/index.json")]
    damage.clear()
    with pytest.raises(StorageError, match="corrupt"):
        service.reconcile()

"""Scopes (``CLUSTER_OR_HOST@BACKEND#POOL``), clusters, adoption and neighbour fills, on
fakes."""

from __future__ import annotations

import pytest

from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.adapters.storage.fake_rbd import FakeRbdStorage
from ivcache.core.errors import ImageNotFound, InvalidRequest, NoSpace, StorageError
from ivcache.core.events import CacheEvict, CacheMiss
from ivcache.core.model import (
    CacheEntry,
    EntryState,
    InternalTenant,
    Lease,
    Outcome,
    Scope,
    Volume,
)
from ivcache.core.policy import CachePolicy
from ivcache.core.ports import StorageBackend
from ivcache.core.service import CacheService, Neighbour
from tests.unit.conftest import World, evictions

FAST = Scope("node-1", "fast", "fast")
BULK = Scope("node-1", "bulk", "volumes")


def service(world: World, scope: Scope, storage: StorageBackend, *,
            neighbours: tuple[Neighbour, ...] = (), policy: CachePolicy | None = None,
            tenant: InternalTenant | None = None) -> CacheService:
    return CacheService(scope=scope, storage=storage, images=world.images, uow=world.uow,
                        notifier=world.notifier, policy=policy or CachePolicy(),
                        tenant=tenant or InternalTenant(), clock=world.clock,
                        neighbours=neighbours)


def misses(world: World) -> list[CacheMiss]:
    return [e for e in world.notifier.of(CacheMiss) if isinstance(e, CacheMiss)]


# ---------------------------------------------------------------- the scope itself

def test_a_scope_is_keyed_in_cinders_form_by_cluster_or_host_backend_and_pool() -> None:
    assert Scope("node-1").key == "node-1@default#default"
    assert FAST.key == "node-1@fast#fast"
    assert Scope("node-1", "bulk", "volumes", cluster="ceph-a").key == "ceph-a@bulk#volumes"


@pytest.mark.parametrize("bad", [{"cluster": "a@b"}, {"cluster": "a#b"}, {"host": "h@x"},
                                 {"backend": "b#1"}, {"pool": ""}, {"cluster": ""}])
def test_a_part_holding_a_separator_or_nothing_is_refused_naming_it(
        bad: dict[str, str]) -> None:
    parts = {"host": "node-1", "backend": "fast", "pool": "fast", "cluster": None, **bad}
    with pytest.raises(InvalidRequest, match=next(iter(bad))):
        Scope(**parts)  # type: ignore[arg-type]  # keywords from the parameter


# ---------------------------------------------------------------- per scope

def test_two_backends_of_one_host_keep_their_own_entries_limits_and_stats(
        world: World) -> None:
    fast = service(world, FAST, FakeLvmStorage(100), policy=CachePolicy(max_count=1))
    bulk = service(world, BULK, FakeLvmStorage(100))
    for name in ("a", "b"):
        world.image(name)
        world.clock.advance(1)
        fast.create_volume(world.alice, name, 1)
        bulk.create_volume(world.alice, name, 1)

    assert [e.image_id for e in fast.list_entries(scope=FAST.key)] == ["b"]
    assert sorted(e.image_id for e in bulk.list_entries(scope=BULK.key)) == ["a", "b"]
    assert evictions(world) == [("a", "lru")]
    assert (fast.stats().count, fast.stats().evictions) == (1, 1)
    assert (bulk.stats().count, bulk.stats().misses) == (2, 2)
    entry = bulk.list_entries(scope=BULK.key)[0]
    assert (entry.host, entry.backend, entry.pool, entry.cluster) == (
        "node-1", "bulk", "volumes", None)
    assert entry.scope_key == BULK.key


def test_the_internal_tenants_quota_spans_every_scope(world: World) -> None:
    tenant = InternalTenant(quota_volumes=1)
    world.image("a")
    world.image("b")
    service(world, FAST, FakeLvmStorage(100), tenant=tenant).create_volume(world.alice, "a", 1)
    result = service(world, BULK, FakeLvmStorage(100), tenant=tenant).create_volume(
        world.alice, "b", 1)
    assert result.outcome is Outcome.MISS_UNCACHED


# ---------------------------------------------------------------- clusters

def test_hosts_of_one_cluster_share_one_entry_per_image(world: World) -> None:
    shared = FakeRbdStorage(100)
    one = service(world, Scope("node-1", "ceph", "volumes", "ceph-a"), shared)
    two = service(world, Scope("node-2", "ceph", "volumes", "ceph-a"), shared)
    world.image("img")

    first = one.create_volume(world.alice, "img", 1)
    second = two.create_volume(world.bob, "img", 2)

    assert (first.outcome, second.outcome) == (Outcome.MISS, Outcome.HIT)
    assert world.images.downloads == 1
    [entry] = one.list_entries()
    assert (entry.host, entry.cluster, entry.scope_key) == ("node-1", "ceph-a",
                                                           "ceph-a@ceph#volumes")
    assert one.stats().hits == 1 and two.stats() == one.stats()


def test_a_host_joining_a_cluster_adopts_its_entries_and_evicts_what_the_cluster_has(
        world: World) -> None:
    shared = FakeRbdStorage(100)
    alone = service(world, Scope("node-1", "ceph", "volumes"), shared)
    member = service(world, Scope("node-2", "ceph", "volumes", "ceph-a"), shared)
    for name in ("mine", "both"):
        world.image(name)
        alone.create_volume(world.alice, name, 1)
    member.create_volume(world.alice, "both", 1)
    duplicate = alone.list_entries(scope="node-1@ceph#volumes")
    [their_both] = member.list_entries(scope="ceph-a@ceph#volumes")

    joined = service(world, Scope("node-1", "ceph", "volumes", "ceph-a"), shared)
    done = joined.adopt()

    assert [e.image_id for e in done.adopted] == ["mine"]
    assert [e.image_id for e in done.merged] == ["both"] and done.left == []
    assert evictions(world) == [("both", "merged")]
    kept = {e.image_id: e for e in joined.list_entries(scope="ceph-a@ceph#volumes")}
    assert set(kept) == {"mine", "both"} and kept["both"].id == their_both.id
    assert kept["mine"].host == "node-1" and kept["mine"].cluster == "ceph-a"
    assert joined.stats().count == 2 and alone.stats().count == 0
    gone = next(e for e in duplicate if e.image_id == "both")
    assert gone.volume_id not in {v.id for v in shared.list_volumes()}
    assert joined.create_volume(world.bob, "mine", 1).outcome is Outcome.HIT
    assert joined.adopt().adopted == []  # nothing is left to adopt


def test_adoption_leaves_a_duplicate_that_a_clone_is_reading(world: World) -> None:
    shared = FakeRbdStorage(100)
    alone = service(world, Scope("node-1", "ceph", "volumes"), shared)
    member = service(world, Scope("node-2", "ceph", "volumes", "ceph-a"), shared)
    world.image("img")
    alone.create_volume(world.alice, "img", 1)
    member.create_volume(world.alice, "img", 1)
    with world.uow as uow:
        entry = uow.entries.find("node-1@ceph#volumes", "img")
        assert entry is not None
        uow.entries.take_lease(Lease("a-clone", entry.id, "machine-1:200.2",
                                     world.clock.now().replace(year=2100)))
        uow.commit()

    done = service(world, Scope("node-1", "ceph", "volumes", "ceph-a"), shared).adopt()

    assert (done.adopted, done.merged, [e.image_id for e in done.left]) == ([], [], ["img"])


# ---------------------------------------------------------------- neighbour fills

def two_backends(world: World) -> tuple[CacheService, CacheService, FakeLvmStorage,
                                        FakeLvmStorage]:
    fast_storage, bulk_storage = FakeLvmStorage(100), FakeLvmStorage(100)
    fast = service(world, FAST, fast_storage,
                   neighbours=(Neighbour.of(BULK, bulk_storage),))
    bulk = service(world, BULK, bulk_storage,
                   neighbours=(Neighbour.of(FAST, fast_storage),))
    return fast, bulk, fast_storage, bulk_storage


def test_a_miss_is_filled_from_a_neighbours_entry_instead_of_the_image_source(
        world: World) -> None:
    fast, bulk, fast_storage, _ = two_backends(world)
    image = world.image("img", data=b"neighbourly " * 50_000)
    bulk.create_volume(world.alice, "img", 1)
    world.clock.advance(5)

    result = fast.create_volume(world.bob, "img", 3)

    assert result.outcome is Outcome.MISS and result.filled_from == BULK.key
    assert world.images.downloads == 1
    data = world.images.data[image.id]
    assert fast_storage.read(result.volume.id, 0, len(data)) == data
    assert [(m.outcome, m.filled_from, m.scope) for m in misses(world)] == [
        ("miss", "image-source", BULK.key), ("miss", BULK.key, FAST.key)]
    stats = fast.stats()
    assert (stats.misses, stats.downloads, stats.neighbour_fills, stats.count) == (1, 0, 1, 1)
    assert bulk.stats().downloads == 1 and bulk.stats().neighbour_fills == 0
    [neighbour] = bulk.list_entries(scope=BULK.key)
    # Leased while read, like a hit (and touched), then let go.
    assert neighbour.lease_until is None and neighbour.last_used == world.clock.now()
    [mine] = fast.list_entries(scope=FAST.key)
    assert mine.ready and mine.volume_id in {v.id for v in fast_storage.list_volumes()}
    # The copy is independent: evicting the neighbour's entry leaves ours readable.
    bulk.evict(image_id="img")
    assert fast.create_volume(world.alice, "img", 1).outcome is Outcome.HIT
    assert world.images.downloads == 1


def test_a_neighbour_never_grants_access_the_image_source_refuses(world: World) -> None:
    fast, bulk, _, _ = two_backends(world)
    world.image("secret", owner="alice", visibility="private")
    bulk.create_volume(world.alice, "secret", 1)

    with pytest.raises(ImageNotFound):
        fast.create_volume(world.bob, "secret", 1)
    assert fast.list_entries(scope=FAST.key) == []


def test_a_stale_neighbour_entry_is_not_used(world: World) -> None:
    fast, bulk, _, _ = two_backends(world)
    world.image("img", data=b"old" * 1000)
    bulk.create_volume(world.alice, "img", 1)
    world.image("img", data=b"new" * 1000)

    result = fast.create_volume(world.alice, "img", 1)

    assert result.filled_from == "image-source" and world.images.downloads == 2


def test_a_neighbour_on_storage_that_cannot_be_copied_from_is_skipped(world: World) -> None:
    class Elsewhere(FakeLvmStorage):
        def can_fill_from(self, source: StorageBackend) -> bool:
            return False

    bulk_storage = FakeLvmStorage(100)
    fast = service(world, FAST, Elsewhere(100), neighbours=(Neighbour.of(BULK, bulk_storage),))
    bulk = service(world, BULK, bulk_storage)
    world.image("img")
    bulk.create_volume(world.alice, "img", 1)

    assert fast.create_volume(world.alice, "img", 1).filled_from == "image-source"
    assert world.images.downloads == 2


def test_a_neighbour_that_cannot_be_reached_is_skipped(world: World) -> None:
    bulk_storage = FakeLvmStorage(100)

    def unreachable() -> StorageBackend:
        raise StorageError("cannot connect to the Ceph cluster")

    fast = service(world, FAST, FakeLvmStorage(100), neighbours=(Neighbour(BULK, unreachable),))
    service(world, BULK, bulk_storage).create_volume(world.alice, world.image("img").id, 1)

    assert fast.create_volume(world.alice, "img", 1).filled_from == "image-source"


def test_a_neighbour_whose_volume_vanished_is_skipped_and_the_image_downloaded(
        world: World) -> None:
    fast, bulk, _, bulk_storage = two_backends(world)
    world.image("img")
    bulk.create_volume(world.alice, "img", 1)
    [entry] = bulk.list_entries(scope=BULK.key)
    bulk_storage.delete_volume(entry.volume_id)  # behind the cache's back

    result = fast.create_volume(world.alice, "img", 1)

    assert result.outcome is Outcome.MISS and result.filled_from == "image-source"
    assert fast.stats().downloads == 1


def test_a_creating_neighbour_entry_is_not_waited_for(world: World) -> None:
    fast, _, _, _ = two_backends(world)
    world.image("img")
    now = world.clock.now()
    with world.uow as uow:
        uow.entries.add(CacheEntry(
            id="claim", host="node-1", backend="bulk", pool="volumes", image_id="img",
            volume_id="v", size_gb=1, image_updated_at=now, image_hash=None,
            state=EntryState.CREATING, created_at=now, last_used=now))
        uow.commit()

    assert fast.create_volume(world.alice, "img", 1).filled_from == "image-source"


def test_no_room_for_the_filled_volume_serves_the_request_uncached(world: World) -> None:
    class Full(FakeLvmStorage):
        def fill_from(self, source: StorageBackend, src_id: str, dst_id: str, size_gb: int,
                      owner: str) -> Volume:
            raise NoSpace("the volume group is full")

    bulk_storage = FakeLvmStorage(100)
    fast = service(world, FAST, Full(100), neighbours=(Neighbour.of(BULK, bulk_storage),))
    service(world, BULK, bulk_storage).create_volume(world.alice, world.image("img").id, 1)

    result = fast.create_volume(world.alice, "img", 1)

    assert result.outcome is Outcome.MISS_UNCACHED and fast.list_entries(scope=FAST.key) == []
    assert [e for e in world.notifier.events if isinstance(e, CacheEvict)] == []
    [neighbour] = fast.list_entries(scope=BULK.key)
    assert neighbour.lease_until is None  # let go though the fill failed

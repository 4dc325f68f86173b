"""``volume upload``'s rules, on fakes: who may upload, what is cached, and when not."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator

import attrs
import pytest

from ivcache.adapters.memory import FakeConverter, InMemoryImageSource
from ivcache.core.errors import ImageUnavailable, InvalidRequest, VolumeNotFound
from ivcache.core.events import CacheEntryCreated, CacheEvict
from ivcache.core.model import EntryState, Image, InternalTenant, NewImage, Outcome, RequestContext
from ivcache.core.policy import CachePolicy
from ivcache.core.service import CacheService
from tests.unit.conftest import World, claim

DATA = b"golden" * 50_000


def _service(world: World, **kw: object) -> CacheService:
    return world.service(converter=FakeConverter(), **kw)  # type: ignore[arg-type]


def _volume(world: World, service: CacheService, owner: RequestContext) -> str:
    """A user's volume made from an image, then changed by its user."""
    world.image("base", data=b"base" * 1000)
    volume = service.create_volume(owner, "base", 1).volume
    world.storage().write_image(volume.id, [DATA])
    return volume.id


def test_an_uploaded_volume_is_cached_and_the_next_create_from_it_is_a_hit(
        world: World) -> None:
    service = _service(world)
    volume_id = _volume(world, service, world.alice)
    downloads = world.images.downloads

    result = service.upload_volume(world.alice, volume_id, name="golden")

    assert result.cached and result.reason is None and result.entry_id is not None
    image = world.images.get_image(world.alice, result.image.id)
    assert image.status == "active" and image.owner == "alice" and image.name == "golden"
    assert world.images.data[image.id][:len(DATA)] == DATA
    assert result.sha512 == image.os_hash_value
    entry = service.get_entry(result.entry_id)
    assert entry.state is EntryState.READY and entry.image_hash == image.content_hash
    assert world.storage().get_volume(entry.volume_id).owner == "internal"
    created = [e.payload() for e in world.notifier.of(CacheEntryCreated)]
    assert [(c["image_id"], c.get("filled_from")) for c in created] == [
        ("base", None), (image.id, "upload")]

    again = service.create_volume(world.bob, image.id, 2)
    assert again.outcome is Outcome.HIT and again.entry_id == entry.id
    assert world.storage().read(again.volume.id, 0, len(DATA)) == DATA
    assert world.images.downloads == downloads


def test_a_volume_changed_after_the_upload_leaves_the_entry_as_the_image_is(
        world: World) -> None:
    service = _service(world)
    volume_id = _volume(world, service, world.alice)
    result = service.upload_volume(world.alice, volume_id, name="golden")
    world.storage().write_image(volume_id, [b"scribble" * 10])

    hit = service.create_volume(world.alice, result.image.id, 1)
    assert hit.outcome is Outcome.HIT
    assert world.storage().read(hit.volume.id, 0, len(DATA)) == DATA


def test_another_project_cannot_upload_someone_elses_volume(world: World) -> None:
    service = _service(world)
    volume_id = _volume(world, service, world.alice)
    with pytest.raises(VolumeNotFound):
        service.upload_volume(world.bob, volume_id, name="stolen")
    assert [i.name for i in world.images.images.values()] == ["base"]
    assert service.upload_volume(world.admin, volume_id, name="ops-copy").cached


def test_a_user_cannot_upload_a_cache_volume_and_no_one_one_being_filled(
        world: World) -> None:
    service = _service(world)
    _volume(world, service, world.alice)
    [entry] = service.list_entries()
    with pytest.raises(VolumeNotFound):
        service.upload_volume(world.alice, entry.volume_id, name="cache")
    filling = claim(world, "other", expires_in=60)
    world.storage().create_volume(filling.volume_id, 1, "internal")
    with pytest.raises(InvalidRequest, match="being written"):
        service.upload_volume(world.admin, filling.volume_id, name="half")


def test_a_full_cache_still_uploads_uncached_and_says_why(world: World) -> None:
    service = _service(world, policy=CachePolicy(max_count=1))
    volume_id = _volume(world, service, world.alice)
    service.pin("base")

    result = service.upload_volume(world.alice, volume_id, name="golden")

    assert not result.cached and result.entry_id is None
    assert result.reason is not None and "no room" in result.reason
    assert world.images.get_image(world.alice, result.image.id).status == "active"
    assert [e.image_id for e in service.list_entries()] == ["base"]
    assert sorted(v.owner for v in world.storage().list_volumes()) == ["alice", "internal"]


def test_room_is_made_as_for_a_miss_with_an_evict_event_for_the_victim(
        world: World) -> None:
    service = _service(world, policy=CachePolicy(max_count=1))
    volume_id = _volume(world, service, world.alice)

    result = service.upload_volume(world.alice, volume_id, name="golden")

    assert result.cached
    assert [e.image_id for e in service.list_entries()] == [result.image.id]
    assert [(e.image_id, e.reason.value) for e in world.notifier.of(CacheEvict)
            if isinstance(e, CacheEvict)] == [("base", "lru")]


class _Tampering(InMemoryImageSource):
    """A source that stores other bytes than it was sent: the fault between our hash and
    the source's answer."""

    def upload_image(self, ctx: RequestContext, spec: NewImage,
                     data: Callable[[Image], Iterable[bytes]]) -> Image:
        def changed(image: Image) -> Iterator[bytes]:
            for chunk in data(image):
                yield chunk.replace(b"golden", b"GOLDEN", 1)
        return super().upload_image(ctx, spec, changed)


def test_bytes_changed_on_the_way_make_no_entry(world: World) -> None:
    world.images = _Tampering(chunk_size=64 * 1024)
    service = _service(world)
    volume_id = _volume(world, service, world.alice)
    volumes_before = {v.id for v in world.storage().list_volumes()}

    result = service.upload_volume(world.alice, volume_id, name="golden")

    assert not result.cached and result.entry_id is None
    assert result.reason is not None and "sha512" in result.reason
    assert [e.image_id for e in service.list_entries()] == ["base"]
    assert {v.id for v in world.storage().list_volumes()} == volumes_before


class _Failing(InMemoryImageSource):
    def upload_image(self, ctx: RequestContext, spec: NewImage,
                     data: Callable[[Image], Iterable[bytes]]) -> Image:
        def broken(image: Image) -> Iterator[bytes]:
            yield from list(data(image))[:1]
            raise ImageUnavailable("glance went away")
        return super().upload_image(ctx, spec, broken)


def test_a_failed_upload_leaves_no_image_no_entry_and_no_cache_volume(world: World) -> None:
    world.images = _Failing(chunk_size=64 * 1024)
    service = _service(world)
    volume_id = _volume(world, service, world.alice)
    volumes_before = {v.id for v in world.storage().list_volumes()}

    with pytest.raises(ImageUnavailable):
        service.upload_volume(world.alice, volume_id, name="golden")

    assert [i.name for i in world.images.images.values()] == ["base"]
    assert [e.image_id for e in service.list_entries()] == ["base"]
    assert {v.id for v in world.storage().list_volumes()} == volumes_before


def test_the_internal_tenant_may_own_the_image_as_cinder_does(world: World) -> None:
    service = _service(world)
    volume_id = _volume(world, service, world.alice)
    result = service.upload_volume(world.alice, volume_id, name="golden",
                                   as_internal_tenant=True)
    assert result.image.owner == "internal" and result.cached


def test_bad_requests_are_refused_before_anything_is_made(world: World) -> None:
    service = _service(world)
    volume_id = _volume(world, service, world.alice)
    with pytest.raises(InvalidRequest, match="disk format"):
        service.upload_volume(world.alice, volume_id, name="x", disk_format="vmdk")
    with pytest.raises(InvalidRequest, match="name"):
        service.upload_volume(world.alice, volume_id, name="")
    with pytest.raises(InvalidRequest, match="internal tenant"):
        service.upload_volume(RequestContext.for_project("internal"), volume_id, name="x")
    assert [i.name for i in world.images.images.values()] == ["base"]


def test_with_the_cache_disabled_the_upload_is_uncached(world: World) -> None:
    service = _service(world, policy=CachePolicy(enabled=False),
                       tenant=InternalTenant())
    volume_id = _volume(world, service, world.alice)
    result = service.upload_volume(world.alice, volume_id, name="golden")
    assert not result.cached and result.reason is not None and "disabled" in result.reason
    stored = world.images.data[result.image.id]
    assert hashlib.sha512(stored).hexdigest() == result.sha512


class _Trickling(InMemoryImageSource):
    """Its downloads wait after the first chunk (the head a converter reads before the
    volume is made) until ``go`` is set."""

    def __init__(self) -> None:
        super().__init__(chunk_size=1024)
        self.started = threading.Event()
        self.go = threading.Event()

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        chunks = super().open_data(ctx, image_id)

        def slow() -> Iterator[bytes]:
            yield next(chunks)
            self.started.set()
            assert self.go.wait(30)
            yield from chunks
        return slow()


def test_a_volume_whose_create_is_in_progress_cannot_be_uploaded(world: World) -> None:
    source = world.images = _Trickling()
    service = _service(world, policy=CachePolicy(enabled=False))
    world.image("base", data=b"base" * 1000)
    made: list[str] = []
    creating = threading.Thread(target=lambda: made.append(
        service.create_volume(world.alice, "base", 1, volume_id="vol-new").volume.id))
    creating.start()
    try:
        assert source.started.wait(30)
        assert world.storage().get_volume("vol-new").owner == "alice"
        with pytest.raises(InvalidRequest, match="being written"):
            service.upload_volume(world.alice, "vol-new", name="half")
    finally:
        source.go.set()
        creating.join(30)
    assert made == ["vol-new"]
    assert not service.upload_volume(world.alice, "vol-new", name="whole").cached


class _NeverActive(InMemoryImageSource):
    """A source whose uploaded images stay ``saving`` (a Glance whose store hangs)."""

    def upload_image(self, ctx: RequestContext, spec: NewImage,
                     data: Callable[[Image], Iterable[bytes]]) -> Image:
        image = super().upload_image(ctx, spec, data)
        self.images[image.id] = attrs.evolve(image, status="saving")
        return self.images[image.id]


def test_an_image_that_never_becomes_active_makes_no_entry(world: World) -> None:
    world.images = _NeverActive(chunk_size=64 * 1024)
    service = _service(world)
    volume_id = _volume(world, service, world.alice)
    started = world.clock.now()

    result = service.upload_volume(world.alice, volume_id, name="golden",
                                   active_wait_seconds=30)

    assert not result.cached and result.entry_id is None
    assert result.reason is not None and "'saving', not 'active'" in result.reason
    assert (world.clock.now() - started).total_seconds() >= 30
    assert [e.image_id for e in service.list_entries()] == ["base"]

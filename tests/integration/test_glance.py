"""The cache over a real glance-api (trusted-header identities, SQLite, file storage)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import attrs
import pytest

from ivcache.adapters.images.glance import GlanceImageSource
from ivcache.adapters.memory import RecordingNotifier
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.adapters.storage.file import FileStorage
from ivcache.core.errors import (
    ChecksumMismatch,
    ImageNotActive,
    ImageNotFound,
    ImageUnavailable,
    InvalidSize,
)
from ivcache.core.events import CacheEvict, EvictReason
from ivcache.core.model import InternalTenant, Outcome, RequestContext
from ivcache.core.service import CacheService
from tests.support.glance_server import GlanceServer, Identity, ensure_glance_venv

pytestmark = pytest.mark.glance

MIB = 1 << 20
HOST = "node-1"


def _project(prefix: str) -> str:
    # One Glance serves the whole session: fresh projects keep the tests apart.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@attrs.define
class World:
    glance: GlanceServer
    source: GlanceImageSource
    storage: FileStorage
    notifier: RecordingNotifier
    service: CacheService

    def volume_bytes(self, volume_id: str, length: int) -> bytes:
        path = Path(self.storage.get_volume(volume_id).location)
        with open(path, "rb") as fh:
            return fh.read(length)

    def entry(self, image_id: str) -> object:
        return next((e for e in self.service.list_entries(HOST) if e.image_id == image_id),
                    None)

    def evictions(self) -> list[CacheEvict]:
        return [e for e in self.notifier.of(CacheEvict) if isinstance(e, CacheEvict)]


def _world(glance: GlanceServer, tmp_path: Path, *, url: str | None = None) -> World:
    source = GlanceImageSource(url=url or glance.url, auth="trusted-headers", backoff=0.01)
    engine = make_engine(f"sqlite:///{tmp_path / 'ivcache.db'}")
    upgrade(engine)
    storage = FileStorage(tmp_path / "volumes", host=HOST)
    notifier = RecordingNotifier()
    service = CacheService(host=HOST, storage=storage, images=source,
                           uow=SqlUnitOfWork(engine), notifier=notifier,
                           tenant=InternalTenant("internal", "internal"))
    return World(glance, source, storage, notifier, service)


@pytest.fixture
def world(glance: GlanceServer, tmp_path: Path) -> World:
    return _world(glance, tmp_path)


@pytest.fixture
def alice() -> tuple[Identity, RequestContext]:
    project = _project("alice")
    return GlanceServer.identity(project), RequestContext.for_project(project)


@pytest.fixture
def bob() -> tuple[Identity, RequestContext]:
    project = _project("bob")
    return GlanceServer.identity(project), RequestContext.for_project(project)


def _data(mib: int = 3) -> bytes:
    return os.urandom(mib * MIB)


def test_a_miss_then_a_hit_give_byte_exact_volumes(world: World, alice: tuple[
        Identity, RequestContext]) -> None:
    who, ctx = alice
    data = _data()
    image_id = world.glance.create_image(who, data)

    miss = world.service.create_volume(ctx, image_id, 1)
    hit = world.service.create_volume(ctx, image_id, 2)

    assert (miss.outcome, hit.outcome) == (Outcome.MISS, Outcome.HIT)
    assert world.volume_bytes(miss.volume.id, len(data)) == data
    assert world.volume_bytes(hit.volume.id, len(data) + 4096) == data + bytes(4096)
    assert hit.volume.size_gb == 2 and hit.volume.owner == ctx.project_id
    assert world.service.stats().downloads == 1


def test_another_project_cannot_use_a_private_image_before_or_after_it_is_cached(
        world: World, alice: tuple[Identity, RequestContext],
        bob: tuple[Identity, RequestContext]) -> None:
    image_id = world.glance.create_image(alice[0], _data(1))
    bob_ctx = bob[1]

    with pytest.raises(ImageNotFound):
        world.service.create_volume(bob_ctx, image_id, 1)
    assert world.service.create_volume(alice[1], image_id, 1).outcome is Outcome.MISS
    with pytest.raises(ImageNotFound):
        world.service.create_volume(bob_ctx, image_id, 1)

    assert world.storage.list_volumes(owner=bob_ctx.project_id) == []
    # Bob not seeing the image is no reason to evict Alice's entry.
    assert world.entry(image_id) is not None
    assert world.evictions() == []
    assert world.service.create_volume(alice[1], image_id, 1).outcome is Outcome.HIT


def test_a_public_image_and_an_image_shared_with_the_project_can_be_used(
        world: World, alice: tuple[Identity, RequestContext],
        bob: tuple[Identity, RequestContext]) -> None:
    operator = GlanceServer.identity(_project("ops"), admin=True)
    public = _data(1)
    public_id = world.glance.create_image(operator, public, visibility="public")
    shared = _data(1)
    shared_id = world.glance.create_image(alice[0], shared)
    world.glance.share(alice[0], shared_id, bob[0])

    from_public = world.service.create_volume(bob[1], public_id, 1)
    world.service.create_volume(alice[1], shared_id, 1)
    from_shared = world.service.create_volume(bob[1], shared_id, 1)

    assert from_public.outcome is Outcome.MISS
    assert from_shared.outcome is Outcome.HIT
    assert world.volume_bytes(from_public.volume.id, len(public)) == public
    assert world.volume_bytes(from_shared.volume.id, len(shared)) == shared
    assert {i.id for i in world.source.list_images(bob[1])} >= {public_id, shared_id}


def test_a_metadata_only_change_keeps_the_hit_and_refreshes_the_entry(
        world: World, alice: tuple[Identity, RequestContext]) -> None:
    who, ctx = alice
    image_id = world.glance.create_image(who, _data(1))
    world.service.create_volume(ctx, image_id, 1)
    before = world.service.list_entries(HOST)[0].image_updated_at
    time.sleep(1.1)  # Glance's updated_at has one-second resolution
    world.glance.patch(who, image_id, [{"op": "replace", "path": "/name", "value": "new"}])

    hit = world.service.create_volume(ctx, image_id, 1)

    after = world.service.list_entries(HOST)[0].image_updated_at
    assert hit.outcome is Outcome.HIT
    assert after is not None and before is not None and after > before
    assert after == world.source.get_image(ctx, image_id).updated_at
    assert world.evictions() == []


def test_an_image_deleted_in_glance_fails_the_next_create_and_its_entry_is_evicted(
        world: World, alice: tuple[Identity, RequestContext]) -> None:
    who, ctx = alice
    image_id = world.glance.create_image(who, _data(1))
    first = world.service.create_volume(ctx, image_id, 1)
    world.glance.delete(who, image_id)

    with pytest.raises(ImageNotFound):
        world.service.create_volume(ctx, image_id, 1)

    assert world.entry(image_id) is None
    assert [e.reason for e in world.evictions()] == [EvictReason.IMAGE_DELETED]
    # The user's own earlier volume stays; the cache volume is gone.
    assert [v.id for v in world.storage.list_volumes()] == [first.volume.id]


def test_a_deactivated_image_is_refused_and_its_entry_is_evicted(
        world: World, alice: tuple[Identity, RequestContext]) -> None:
    who, ctx = alice
    image_id = world.glance.create_image(who, _data(1))
    world.service.create_volume(ctx, image_id, 1)
    operator = GlanceServer.identity(_project("ops"), admin=True)
    world.glance.call(operator, "POST", f"/images/{image_id}/actions/deactivate")

    with pytest.raises(ImageNotActive, match="deactivated"):
        world.service.create_volume(ctx, image_id, 1)

    assert world.entry(image_id) is None
    assert [e.reason for e in world.evictions()] == [EvictReason.IMAGE_DELETED]


def test_a_corrupted_download_is_a_checksum_error_and_leaves_no_entry_and_no_volume(
        world: World, alice: tuple[Identity, RequestContext]) -> None:
    who, ctx = alice
    data = _data(2)
    image_id = world.glance.create_image(who, data)
    stored = world.glance.store / image_id
    with open(stored, "r+b") as fh:
        fh.seek(MIB + 17)
        fh.write(b"\x00corrupt\x00")

    with pytest.raises(ChecksumMismatch):
        world.service.create_volume(ctx, image_id, 1)

    assert world.service.list_entries() == []
    assert world.storage.list_volumes() == []
    assert world.service.stats().downloads == 0


def test_an_image_that_is_not_active_is_refused_and_nothing_is_cached(
        world: World, alice: tuple[Identity, RequestContext]) -> None:
    who, ctx = alice
    queued = world.glance.call(who, "POST", "/images",
                               b'{"name": "empty", "disk_format": "raw", '
                               b'"container_format": "bare"}')["id"]

    with pytest.raises(ImageNotActive, match="queued"):
        world.service.create_volume(ctx, queued, 1)

    assert world.service.list_entries() == []
    assert world.storage.list_volumes() == []


def test_min_disk_sets_the_smallest_volume(world: World, alice: tuple[
        Identity, RequestContext]) -> None:
    who, ctx = alice
    image_id = world.glance.create_image(who, _data(1), min_disk=2)

    assert world.source.get_image(ctx, image_id).min_size_gb == 2
    with pytest.raises(InvalidSize, match="at least 2 GiB"):
        world.service.create_volume(ctx, image_id, 1)
    assert world.service.create_volume(ctx, image_id, 2).outcome is Outcome.MISS


def test_list_images_gives_what_the_caller_sees_across_pages(
        glance: GlanceServer, alice: tuple[Identity, RequestContext],
        bob: tuple[Identity, RequestContext]) -> None:
    mine = {glance.create_image(alice[0], b"x" * 100, name=f"img-{n}") for n in range(5)}
    theirs = glance.create_image(bob[0], b"y" * 100)
    source = GlanceImageSource(url=glance.url, auth="trusted-headers", page_size=2)

    seen = source.list_images(alice[1])

    ids = [i.id for i in seen]
    assert mine <= set(ids) and theirs not in ids
    assert len(ids) == len(set(ids))
    assert {i.owner for i in seen if i.id in mine} == {alice[1].project_id}
    assert all(i.updated_at is not None and i.updated_at.tzinfo is not None for i in seen)


def test_an_unreachable_glance_is_a_clear_error_and_leaves_nothing(
        glance: GlanceServer, tmp_path: Path, alice: tuple[Identity, RequestContext]) -> None:
    image_id = glance.create_image(alice[0], _data(1))
    dead = _world(glance, tmp_path, url="http://127.0.0.1:9")

    with pytest.raises(ImageUnavailable, match=r"glance at http://127\.0\.0\.1:9 .*refused"):
        dead.service.create_volume(alice[1], image_id, 1)

    assert dead.service.list_entries() == []
    assert dead.storage.list_volumes() == []


def test_a_glance_stopped_between_requests_is_a_clear_error_and_leaves_nothing(
        tmp_path: Path, alice: tuple[Identity, RequestContext]) -> None:
    who, ctx = alice
    with GlanceServer(tmp_path / "short-lived", venv=ensure_glance_venv()) as short:
        image_id = short.create_image(who, _data(1))
        world = _world(short, tmp_path)
        first = world.service.create_volume(ctx, image_id, 1)
    assert first.outcome is Outcome.MISS

    with pytest.raises(ImageUnavailable, match=f"glance at {short.url}"):
        world.service.create_volume(ctx, image_id, 1)

    # The entry stays (Glance cannot say the image is gone); no new volume was made.
    assert world.entry(image_id) is not None
    assert len(world.storage.list_volumes(owner=ctx.project_id)) == 1

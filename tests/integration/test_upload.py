"""``volume upload`` on real parts: the local source and a real glance-api (trusted headers),
file, qcow2 and RBD storage, real qemu-img. A volume is made, some of its bytes changed, it
is uploaded; the source's bytes are the volume's, and the next volume made from the new
image is a hit with those bytes and no download."""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from ivcache.adapters.convert import ImagePipeline
from ivcache.adapters.images.glance import GlanceImageSource
from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.memory import RecordingNotifier
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.adapters.storage.file import FileStorage
from ivcache.adapters.storage.qcow2 import Qcow2Storage
from ivcache.core.events import CacheEntryCreated
from ivcache.core.model import GIB, Image, InternalTenant, NewImage, Outcome, RequestContext
from ivcache.core.policy import CachePolicy
from ivcache.core.ports import ImageSource, StorageBackend
from ivcache.core.service import CacheService
from tests.support.glance_server import GlanceServer

MIB = 1 << 20
HOST = "node-1"
#: what the user writes into the volume before uploading it: a head and a stretch far in
CHANGE = b"customised golden image " * 40_000


@attrs.define
class World:
    service: CacheService
    storage: StorageBackend
    images: ImageSource
    scratch: Path
    notifier: RecordingNotifier
    glance: GlanceServer | None = None
    local: LocalImageSource | None = None

    def read(self, volume_id: str, offset: int, length: int) -> bytes:
        if isinstance(self.storage, FileStorage):
            with open(self.storage.get_volume(volume_id).location, "rb") as fh:
                fh.seek(offset)
                return fh.read(length)
        data: bytes = getattr(self.storage, "read")(volume_id, offset, length)  # noqa: B009
        return data

    def sha512_of_volume(self, volume_id: str) -> str:
        digest = hashlib.sha512()
        size = self.storage.get_volume(volume_id).size_gb * GIB
        for offset in range(0, size, 64 * MIB):
            digest.update(self.read(volume_id, offset, 64 * MIB))
        return digest.hexdigest()

    def scratch_left(self) -> list[Path]:
        return list(self.scratch.iterdir()) if self.scratch.exists() else []

    def image_file(self, image_id: str) -> Path:
        """Where the source keeps the image's bytes."""
        if self.local is not None:
            return self.local.images_path / "data" / image_id
        assert self.glance is not None
        return self.glance.store / image_id

    def base_volume(self, ctx: RequestContext, tmp: Path) -> str:
        """A volume made from a 16 MiB image, then customised by its user."""
        if self.local is not None:
            raw = tmp / "base.raw"
            raw.write_bytes(b"base" * (4 * MIB))
            image_id = self.local.add_image(ctx, raw, name="base").id
        else:
            assert self.glance is not None
            image_id = self.glance.create_image(
                (ctx.project_id, ctx.user_id, ctx.roles), b"base" * (4 * MIB),
                name="base", visibility="private")
        volume = self.service.create_volume(ctx, image_id, 1).volume
        self.storage.write_image(volume.id, [CHANGE])
        return volume.id


def _storage(kind: str, tmp: Path, request: pytest.FixtureRequest) -> StorageBackend:
    if kind == "file":
        return FileStorage(tmp / "volumes", host=HOST)
    if kind == "qcow2":
        return Qcow2Storage(tmp / "volumes", host=HOST)
    from ivcache.adapters.storage.rbd import RbdStorage
    from tests.support.ceph_cluster import new_namespace

    cluster = request.getfixturevalue("ceph_cluster")
    storage = RbdStorage("rbd", conf=str(cluster.conf), host=HOST,
                         namespace=new_namespace(cluster.conf))
    request.addfinalizer(storage.close)
    return storage


def _world(source: str, storage_kind: str, tmp: Path, request: pytest.FixtureRequest, *,
           policy: CachePolicy | None = None,
           wrap: Callable[[ImageSource], ImageSource] | None = None) -> World:
    glance: GlanceServer | None = None
    local: LocalImageSource | None = None
    images: ImageSource
    if source == "local":
        images = local = LocalImageSource(tmp / "images")
    else:
        glance = request.getfixturevalue("glance")
        images = GlanceImageSource(url=glance.url, auth="trusted-headers", backoff=0.01)
    engine = make_engine(f"sqlite:///{tmp / 'ivcache.db'}")
    upgrade(engine)
    storage = _storage(storage_kind, tmp, request)
    notifier = RecordingNotifier()
    scratch = tmp / "conversion"
    service = CacheService(host=HOST, storage=storage, images=wrap(images) if wrap else images,
                           uow=SqlUnitOfWork(engine), notifier=notifier,
                           policy=policy or CachePolicy(), tenant=InternalTenant(),
                           converter=ImagePipeline(scratch))
    return World(service, storage, images, scratch, notifier, glance, local)


def _project() -> RequestContext:
    # One Glance serves the whole session: fresh projects keep the tests apart.
    return RequestContext.for_project(f"p-{uuid.uuid4().hex[:8]}")


SOURCES = [pytest.param("local", id="local"),
           pytest.param("glance", id="glance", marks=pytest.mark.glance)]
STORAGES = [pytest.param("file", id="file"),
            pytest.param("qcow2", id="qcow2", marks=pytest.mark.qcow2),
            pytest.param("rbd", id="rbd", marks=pytest.mark.rbd)]


@pytest.mark.parametrize("storage_kind", STORAGES)
@pytest.mark.parametrize("source", SOURCES)
def test_an_uploaded_volume_is_the_image_and_the_next_create_from_it_is_a_hit(
        source: str, storage_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    world = _world(source, storage_kind, tmp_path, request)
    alice = _project()
    volume_id = world.base_volume(alice, tmp_path)
    downloads = world.service.stats().downloads

    result = world.service.upload_volume(alice, volume_id, name="golden", private=True)

    assert result.cached and result.reason is None and result.entry_id is not None
    image = world.images.get_image(alice, result.image.id)
    assert image.status == "active" and image.size == GIB
    # The source's bytes are the volume's: its own hash of them, and the bytes themselves.
    assert image.os_hash_algo == "sha512"
    assert image.os_hash_value == world.sha512_of_volume(volume_id) == result.sha512
    with open(world.image_file(image.id), "rb") as fh:
        assert fh.read(len(CHANGE)) == CHANGE
    created = [e for e in world.notifier.of(CacheEntryCreated)
               if isinstance(e, CacheEntryCreated) and e.image_id == image.id]
    assert [e.filled_from for e in created] == ["upload"]

    hit = world.service.create_volume(alice, image.id, 2)

    assert hit.outcome is Outcome.HIT and hit.entry_id == result.entry_id
    assert world.read(hit.volume.id, 0, len(CHANGE)) == CHANGE
    assert world.read(hit.volume.id, GIB - MIB, MIB) == bytes(MIB)
    assert world.service.stats().downloads == downloads
    assert world.scratch_left() == []


@pytest.mark.qcow2
@pytest.mark.parametrize("storage_kind", ["file", "qcow2"])
@pytest.mark.parametrize("source", SOURCES)
def test_a_qcow2_upload_is_the_volume_as_qemu_img_compares_them(
        source: str, storage_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    world = _world(source, storage_kind, tmp_path, request)
    alice = _project()
    volume_id = world.base_volume(alice, tmp_path)

    result = world.service.upload_volume(alice, volume_id, name="golden-q",
                                         disk_format="qcow2", private=True)

    assert result.cached and result.image.disk_format == "qcow2"
    assert result.image.size < 64 * MIB  # qcow2 holds the data, not the GiB of zeros
    path, fmt = getattr(world.storage, "local_file")(volume_id)  # noqa: B009
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", fmt,
                    str(world.image_file(result.image.id)), str(path)], check=True)
    hit = world.service.create_volume(alice, result.image.id, 1)
    assert hit.outcome is Outcome.HIT
    assert world.read(hit.volume.id, 0, len(CHANGE)) == CHANGE
    assert world.scratch_left() == []


@pytest.mark.parametrize("source", SOURCES)
def test_a_full_cache_still_uploads_uncached(source: str, tmp_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    world = _world(source, "file", tmp_path, request, policy=CachePolicy(max_count=1))
    alice = _project()
    volume_id = world.base_volume(alice, tmp_path)
    [base] = world.service.list_entries()
    world.service.pin(base.image_id)

    result = world.service.upload_volume(alice, volume_id, name="golden", private=True)

    assert not result.cached and result.entry_id is None and "no room" in (result.reason or "")
    image = world.images.get_image(alice, result.image.id)
    assert image.status == "active"
    assert image.os_hash_value == world.sha512_of_volume(volume_id)
    assert [e.id for e in world.service.list_entries()] == [base.id]


class _Tampering:
    """The fault point between our hash and the source's answer: the source is handed other
    bytes than those hashed (one byte flipped on the way in)."""

    def __init__(self, inner: ImageSource) -> None:
        self.inner = inner

    def get_image(self, ctx: RequestContext, image_id: str) -> Image:
        return self.inner.get_image(ctx, image_id)

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        return self.inner.open_data(ctx, image_id)

    def list_images(self, ctx: RequestContext) -> list[Image]:
        return self.inner.list_images(ctx)

    def upload_image(self, ctx: RequestContext, spec: NewImage,
                     data: Callable[[Image], Iterable[bytes]]) -> Image:
        def changed(image: Image) -> Iterator[bytes]:
            first = True
            for chunk in data(image):
                if first:
                    chunk, first = b"X" + chunk[1:], False
                yield chunk
        inner: Any = self.inner
        uploaded: Image = inner.upload_image(ctx, spec, changed)
        return uploaded


@pytest.mark.parametrize("source", SOURCES)
def test_data_changed_between_our_hash_and_the_sources_answer_makes_no_entry(
        source: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    world = _world(source, "file", tmp_path, request, wrap=_Tampering)
    alice = _project()
    volume_id = world.base_volume(alice, tmp_path)
    volumes = {v.id for v in world.storage.list_volumes()}

    result = world.service.upload_volume(alice, volume_id, name="golden", private=True)

    assert not result.cached and result.entry_id is None
    assert "sha512" in (result.reason or "") and "changed" in (result.reason or "")
    assert result.image.os_hash_value != result.sha512
    assert [e.image_id for e in world.service.list_entries()] != [result.image.id]
    assert len(world.service.list_entries()) == 1
    assert {v.id for v in world.storage.list_volumes()} == volumes
    miss = world.service.create_volume(alice, result.image.id, 1)
    assert miss.outcome is Outcome.MISS


def test_the_export_reads_through_the_otel_wrapper_and_leaves_no_scratch_file(
        tmp_path: Path) -> None:
    from ivcache.adapters.convert.export import VolumeExport
    from ivcache.adapters.notify.otel import MeteredStorage, OtelNotifier
    from ivcache.core.errors import InvalidRequest

    inner = FileStorage(tmp_path / "volumes", host=HOST)
    inner.create_volume("vol-1", 1, "alice")
    inner.write_image("vol-1", [CHANGE])
    storage = MeteredStorage(inner, OtelNotifier(), HOST)
    export = VolumeExport(tmp_path / "scratch")

    raw = export.export(storage, "vol-1", "raw")
    try:
        head = next(raw)
        total = len(head)
        for chunk in raw:
            total += len(chunk)
    finally:
        raw.close()
    assert total == GIB and head[:len(CHANGE)] == CHANGE
    qcow2 = export.export(storage, "vol-1", "qcow2")
    try:
        head = next(iter(qcow2))
        assert head[:4] == b"QFI\xfb"
        assert len(list((tmp_path / "scratch").iterdir())) == 1
    finally:
        qcow2.close()
    assert list((tmp_path / "scratch").iterdir()) == []
    with pytest.raises(InvalidRequest):
        export.export(storage, "vol-1", "vmdk")

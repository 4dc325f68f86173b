"""Scopes on real parts: several backends in one config, neighbour fills on file storage,
qcow2 and RBD (two pools of one Ceph cluster), and the hosts of one cluster in separate
processes on one PostgreSQL. Every fill is checked byte for byte against the image."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.memory import RecordingNotifier
from ivcache.adapters.sql import SqlUnitOfWork, make_engine, upgrade
from ivcache.adapters.storage.file import FileStorage
from ivcache.adapters.storage.qcow2 import Qcow2Storage
from ivcache.adapters.storage.rbd import RbdStorage
from ivcache.core.model import Outcome, RequestContext, Scope
from ivcache.core.ports import StorageBackend
from ivcache.core.service import CacheService, Neighbour
from ivcache.entrypoints.library import ImageVolumeCache
from tests.support.ceph_cluster import CephCluster, new_namespace
from tests.support.flight import World, add_tiny_images, run_processes

MIB = 1 << 20
CTX = RequestContext.for_project("alice")


def raw_image(path: Path, size: int = 24 * MIB + 123) -> bytes:
    """A raw image with data here and there and holes between."""
    data = bytearray(size)
    for offset in range(0, size, 4 * MIB):
        data[offset:offset + 8192] = os.urandom(8192)
    data[-100:] = os.urandom(100)
    path.write_bytes(data)
    return bytes(data)


class Site:
    """Services of one host on several backends, one SQLite database, one image source."""

    def __init__(self, work: Path) -> None:
        self.images = LocalImageSource(work / "images")
        self.engine = make_engine(f"sqlite:///{work / 'cache.db'}")
        upgrade(self.engine)
        self.notifier = RecordingNotifier()
        self.storages: dict[str, tuple[Scope, StorageBackend]] = {}

    def add(self, name: str, storage: StorageBackend, pool: str | None = None) -> None:
        self.storages[name] = (Scope("node-1", name, pool or name), storage)

    def service(self, name: str) -> CacheService:
        scope, storage = self.storages[name]
        neighbours = [Neighbour.of(s, st) for n, (s, st) in self.storages.items() if n != name]
        return CacheService(scope=scope, storage=storage, images=self.images,
                            uow=SqlUnitOfWork(self.engine), notifier=self.notifier,
                            neighbours=neighbours)

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    made = Site(tmp_path)
    yield made
    made.close()


def fill_from_neighbour(site: Site, source: str, target: str, tmp_path: Path) -> tuple[
        bytes, str]:
    """Cache an image on ``source``, then ask ``target`` for it: the target's miss is filled
    from the source's entry. Returns the image's bytes and the target's user volume id."""
    data = raw_image(tmp_path / "disk.raw")
    image = site.images.add_image(CTX, tmp_path / "disk.raw")
    first = site.service(source).create_volume(CTX, image.id, 1)
    assert first.outcome is Outcome.MISS and first.filled_from == "image-source"

    filled = site.service(target).create_volume(CTX, image.id, 2)

    assert filled.outcome is Outcome.MISS
    assert filled.filled_from == site.storages[source][0].key
    target_service = site.service(target)
    stats = target_service.stats()
    assert (stats.misses, stats.downloads, stats.neighbour_fills) == (1, 0, 1)
    assert site.service(source).stats().downloads == 1
    # The target's own entry serves the next request.
    assert target_service.create_volume(CTX, image.id, 1).outcome is Outcome.HIT
    return data, filled.volume.id


def read_path(path: str, length: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(length)


def test_two_file_backends_in_one_config_keep_their_volumes_and_entries_apart(
        tmp_path: Path) -> None:
    config = tmp_path / "ivcache.conf"
    config.write_text(f"""[DEFAULT]
host = node-1
enabled_backends = fast, slow
[ivcache]
database_url = sqlite:///{tmp_path / 'db.sqlite'}
images_path = {tmp_path / 'images'}
notifier = none
[fast]
volume_backend_name = fast
storage = file
storage_path = {tmp_path / 'fast'}
image_volume_cache_max_count = 1
[slow]
storage = file
storage_path = {tmp_path / 'slow'}
""", encoding="utf-8")
    fast = ImageVolumeCache.from_config(config, backend="fast")
    slow = ImageVolumeCache.from_config(config, backend="slow")
    data = raw_image(tmp_path / "a.raw")
    a = fast.add_image(tmp_path / "a.raw", name="a")

    on_fast = fast.create_volume(a.id, 1)
    on_slow = slow.create_volume(a.id, 1)  # filled from fast's entry: same filesystem

    assert on_fast.volume.location.startswith(str(tmp_path / "fast"))
    assert on_slow.volume.location.startswith(str(tmp_path / "slow"))
    assert on_slow.filled_from == "node-1@fast#fast"
    for result in (on_fast, on_slow):
        assert read_path(result.volume.location, len(data) + MIB) == data + bytes(MIB)
    assert [e.scope_key for e in fast.entries()] == ["node-1@fast#fast"]
    assert [e.scope_key for e in slow.entries()] == ["node-1@slow#slow"]
    raw_image(tmp_path / "b.raw")
    b = fast.add_image(tmp_path / "b.raw", name="b")
    fast.create_volume(b.id, 1)  # fast holds one entry at most: a goes
    assert [e.image_id for e in fast.entries()] == [b.id]
    assert [e.image_id for e in slow.entries()] == [a.id]
    assert (slow.stats().downloads, slow.stats().neighbour_fills) == (0, 1)


def test_a_neighbour_fill_on_file_storage_across_two_directories_of_one_filesystem(
        site: Site, tmp_path: Path) -> None:
    site.add("a", FileStorage(tmp_path / "a"))
    site.add("b", FileStorage(tmp_path / "b"))

    data, volume_id = fill_from_neighbour(site, "a", "b", tmp_path)

    storage = site.storages["b"][1]
    assert isinstance(storage, FileStorage)
    assert read_path(storage.get_volume(volume_id).location, len(data)) == data
    assert storage.get_volume(volume_id).size_gb == 2


def test_a_neighbour_fill_on_qcow2_from_file_and_from_qcow2_storage(
        site: Site, tmp_path: Path) -> None:
    site.add("file", FileStorage(tmp_path / "file"))
    site.add("q1", Qcow2Storage(tmp_path / "q1"))
    site.add("q2", Qcow2Storage(tmp_path / "q2"))

    data, volume_id = fill_from_neighbour(site, "file", "q1", tmp_path)
    q1 = site.storages["q1"][1]
    assert isinstance(q1, Qcow2Storage)
    assert q1.read(volume_id, 0, len(data) + MIB) == data + bytes(MIB)

    # q2's miss is filled from one of the two neighbours that hold the image now.
    image_id = site.service("file").list_entries()[0].image_id
    filled = site.service("q2").create_volume(CTX, image_id, 1)
    assert filled.outcome is Outcome.MISS and filled.filled_from != "image-source"
    q2 = site.storages["q2"][1]
    assert isinstance(q2, Qcow2Storage)
    assert q2.read(filled.volume.id, 0, len(data)) == data


def test_a_file_storage_does_not_fill_from_qcow2_storage(site: Site, tmp_path: Path) -> None:
    site.add("q", Qcow2Storage(tmp_path / "q"))
    site.add("file", FileStorage(tmp_path / "file"))
    raw_image(tmp_path / "disk.raw")
    image = site.images.add_image(CTX, tmp_path / "disk.raw")
    site.service("q").create_volume(CTX, image.id, 1)

    assert site.service("file").create_volume(CTX, image.id, 1).filled_from == "image-source"


@pytest.mark.rbd
def test_a_neighbour_fill_across_two_rbd_pools_of_one_cluster(
        site: Site, tmp_path: Path, ceph_cluster: CephCluster) -> None:
    conf = str(ceph_cluster.conf)
    other = ceph_cluster.create_pool("ivc-two")
    one = RbdStorage("rbd", conf=conf, namespace=new_namespace(conf))
    two = RbdStorage(other, conf=conf, namespace=new_namespace(conf, other))
    try:
        site.add("gold", one, pool="rbd")
        site.add("bulk", two, pool=other)

        data, volume_id = fill_from_neighbour(site, "gold", "bulk", tmp_path)

        assert two.read(volume_id, 0, len(data) + MIB) == data + bytes(MIB)
        [entry] = site.service("bulk").list_entries(scope=f"node-1@bulk#{other}")
        assert two.parent(entry.volume_id) is None  # a copy: never reads gold's pool
        assert two.get_volume(volume_id).location.startswith(f"{other}/")
    finally:
        one.close()
        two.close()


@pytest.mark.rbd
def test_a_file_and_an_rbd_backend_in_one_config(tmp_path: Path,
                                                 ceph_cluster: CephCluster) -> None:
    config = tmp_path / "ivcache.conf"
    config.write_text(f"""[DEFAULT]
host = node-1
enabled_backends = fast, bulk
[ivcache]
database_url = sqlite:///{tmp_path / 'db.sqlite'}
images_path = {tmp_path / 'images'}
notifier = none
[fast]
storage = file
storage_path = {tmp_path / 'fast'}
[bulk]
volume_backend_name = bulk
storage = rbd
rbd_pool = {ceph_cluster.create_pool("ivc-bulk")}
rbd_conf = {ceph_cluster.conf}
""", encoding="utf-8")
    fast = ImageVolumeCache.from_config(config, backend="fast")
    bulk = ImageVolumeCache.from_config(config, backend="bulk")
    data = raw_image(tmp_path / "a.raw")
    image = fast.add_image(tmp_path / "a.raw")

    on_bulk = bulk.create_volume(image.id, 2)
    on_fast = fast.create_volume(image.id, 1)

    # Neither can copy from the other: each downloaded.
    assert (on_bulk.filled_from, on_fast.filled_from) == ("image-source", "image-source")
    assert on_bulk.volume.location_kind == "rbd_image"
    assert on_bulk.volume.location.startswith("ivc-bulk/")
    storage = bulk.service.storage
    assert isinstance(storage, RbdStorage)
    assert storage.read(on_bulk.volume.id, 0, len(data)) == data
    assert read_path(on_fast.volume.location, len(data)) == data
    assert [e.scope_key for e in bulk.entries()] == ["node-1@bulk#ivc-bulk"]
    assert bulk.create_volume(image.id, 1).outcome is Outcome.HIT
    bulk.evict(everything=True)
    storage.close()


@pytest.mark.postgres
def test_sixteen_requests_from_four_hosts_of_one_cluster_download_once_and_make_one_entry(
        postgres_url: str, tmp_path: Path) -> None:
    upgrade(postgres_url)
    world = World(url=postgres_url, root=tmp_path / "world", cluster="ceph-a", delay=0.02)
    [image] = add_tiny_images(world, [1])
    workers = [(f"node-{n}", [(image, 1)] * 4) for n in range(4)]

    results = run_processes(world, workers)

    assert len(results) == 16 and len({r.pid for r in results}) == 4
    assert sorted(r.outcome for r in results) == ["hit"] * 15 + ["miss"]
    assert len(world.downloads()) == 1
    engine = make_engine(postgres_url)
    try:
        uow = SqlUnitOfWork(engine)
        with uow:
            [entry] = uow.entries.list()
            totals = uow.entries.totals("ceph-a@default#default")
        assert entry.scope_key == "ceph-a@default#default" and entry.cluster == "ceph-a"
        assert (totals.count, totals.downloads, totals.hits, totals.misses) == (1, 1, 15, 1)
    finally:
        engine.dispose()

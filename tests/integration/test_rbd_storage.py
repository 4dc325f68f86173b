"""What is particular to the RBD backend, against a real single-node Ceph cluster: snapshots
and clones as Ceph sees them, the depth limit, the trash, metadata, and the whole service
and CLI on RBD. (The storage contract runs on RBD too: test_storage_contract.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.memory import RecordingNotifier
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.adapters.storage.rbd import RbdStorage
from ivcache.core.errors import ConfigError, StorageError, VolumeNotFound
from ivcache.core.model import GIB, Outcome, RequestContext
from ivcache.core.service import CacheService
from tests.support.ceph_cluster import CephCluster, new_namespace

pytestmark = pytest.mark.rbd

MIB = 1024**2
ONES = b"\x01" * MIB


class Pool:
    """A namespace of the test cluster's pool, seen through ivcache and through librbd."""

    def __init__(self, cluster: CephCluster) -> None:
        import rados  # type: ignore[import-not-found]  # Debian's bindings, no stubs
        import rbd  # type: ignore[import-not-found]

        self.rbd: Any = rbd
        self.conf = str(cluster.conf)
        self.namespace = new_namespace(self.conf)
        self._cluster: Any = rados.Rados(conffile=self.conf)
        self._cluster.connect()
        self.ioctx: Any = self._cluster.open_ioctx("rbd")
        self.ioctx.set_namespace(self.namespace)
        self._open: list[RbdStorage] = []

    def storage(self, **kw: Any) -> RbdStorage:
        storage = RbdStorage("rbd", conf=self.conf, host="node-1", namespace=self.namespace,
                             **kw)
        self._open.append(storage)
        return storage

    def image(self, name: str | None = None, *, image_id: str | None = None) -> Any:
        return self.rbd.Image(self.ioctx, name, image_id=image_id, read_only=True)

    def trash(self) -> list[str]:
        return sorted(entry["name"] for entry in self.rbd.RBD().trash_list(self.ioctx))

    def images(self) -> list[str]:
        return sorted(self.rbd.RBD().list(self.ioctx))

    def close(self) -> None:
        for storage in self._open:
            storage.close()
        self.ioctx.close()
        self._cluster.shutdown()


@pytest.fixture
def pool(ceph_cluster: CephCluster) -> Iterator[Pool]:
    made = Pool(ceph_cluster)
    yield made
    made.close()


def test_a_clone_is_a_child_of_a_protected_snapshot_of_its_source(pool: Pool) -> None:
    rbd = pool.storage()
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", [ONES * 2])

    rbd.clone_volume("base", "c1", 2, "alice")
    rbd.clone_volume("base", "c2", 1, "bob")

    parent = rbd.parent("c1")
    assert parent is not None and rbd.parent("c2") == parent
    with pool.image("base") as base:
        assert parent[0] == base.id()
        assert [s["name"] for s in base.list_snaps()] == [parent[1]]
        assert base.is_protected_snap(parent[1])
        base.set_snap(parent[1])
        assert sorted(c["image"] for c in base.list_children2()) == ["c1", "c2"]
    with pool.image("c1") as c1:
        assert c1.parent_info() == ("rbd", "base", parent[1])
        assert c1.size() == 2 * GIB
        assert c1.read(0, 2 * MIB) == ONES * 2


def test_writing_a_source_makes_later_clones_use_a_new_snapshot(pool: Pool) -> None:
    rbd = pool.storage()
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", [ONES])
    rbd.clone_volume("base", "old", 1, "alice")

    rbd.write_image("base", [b"\x02" * MIB])
    rbd.clone_volume("base", "new", 1, "alice")

    assert rbd.read("old", 0, MIB) == ONES
    assert rbd.read("new", 0, MIB) == b"\x02" * MIB
    old_snap, new_snap = rbd.parent("old"), rbd.parent("new")
    assert old_snap is not None and new_snap is not None and old_snap != new_snap
    rbd.delete_volume("old")
    with pool.image("base") as base:  # the old snapshot went with its last clone
        assert [s["name"] for s in base.list_snaps()] == [new_snap[1]]


def test_a_source_written_by_another_instance_is_not_cloned_from_what_was_known_of_it(
        pool: Pool) -> None:
    one, two = pool.storage(), pool.storage()
    one.create_volume("base", 1, "internal")
    one.write_image("base", [ONES])
    one.clone_volume("base", "c1", 1, "alice")  # one now knows base's snapshot

    two.write_image("base", [b"\x02" * MIB])
    one.clone_volume("base", "c2", 1, "alice")

    assert one.read("c1", 0, MIB) == ONES
    assert one.read("c2", 0, MIB) == b"\x02" * MIB
    assert pool.images() == ["base", "c1", "c2"] and pool.trash() == []
    two.delete_volume("base")
    two.create_volume("base", 1, "bob")  # another image of the same name, without data
    one.clone_volume("base", "c3", 1, "alice")
    assert one.read("c3", 0, MIB) == bytes(MIB)


def test_a_clone_that_would_pass_the_depth_limit_is_flattened(pool: Pool) -> None:
    rbd = pool.storage(max_clone_depth=2)
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", [ONES * 2])
    rbd.clone_volume("base", "c1", 1, "p")
    rbd.clone_volume("c1", "c2", 1, "p")
    rbd.write_image("c2", [b"\x05"])

    rbd.clone_volume("c2", "c3", 1, "p")

    assert [rbd.depth(v) for v in ("base", "c1", "c2", "c3")] == [0, 1, 2, 0]
    assert rbd.parent("c3") is None
    for volume_id in ("c2", "c1", "base"):
        rbd.delete_volume(volume_id)
    assert rbd.read("c3", 0, 2 * MIB) == b"\x05" + ONES[1:] + ONES
    assert pool.images() == ["c3"] and pool.trash() == []


def test_with_a_max_clone_depth_of_zero_every_clone_is_flat(pool: Pool) -> None:
    rbd = pool.storage(max_clone_depth=0)
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", [ONES])

    rbd.clone_volume("base", "c1", 2, "p")

    assert rbd.depth("c1") == 0
    assert rbd.read("c1", 0, MIB) == ONES
    assert rbd.get_volume("c1").size_gb == 2


def test_deleting_a_parent_keeps_its_clones_and_it_goes_with_the_last_one(pool: Pool) -> None:
    rbd = pool.storage()
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", [ONES * 2])
    rbd.clone_volume("base", "c1", 1, "alice")
    rbd.clone_volume("base", "c2", 1, "bob")

    rbd.delete_volume("base")

    assert pool.images() == ["c1", "c2"] and pool.trash() == ["base"]
    with pytest.raises(VolumeNotFound):
        rbd.get_volume("base")
    rbd.delete_volume("c1")
    assert rbd.read("c2", 0, 2 * MIB) == ONES * 2
    assert pool.trash() == ["base"]
    rbd.delete_volume("c2")
    assert pool.images() == [] and pool.trash() == []


def test_a_chain_of_trashed_parents_is_purged_when_the_last_clone_goes(pool: Pool) -> None:
    rbd = pool.storage()
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", [ONES])
    rbd.clone_volume("base", "mid", 1, "internal")
    rbd.write_image("mid", [ONES, ONES])
    rbd.clone_volume("mid", "leaf", 1, "alice")
    rbd.delete_volume("base")
    rbd.delete_volume("mid")
    assert pool.trash() == ["base", "mid"]
    assert rbd.read("leaf", 0, 2 * MIB) == ONES * 2

    rbd.delete_volume("leaf")

    assert pool.images() == [] and pool.trash() == []


def test_ownership_is_image_metadata_and_outlives_the_instance(pool: Pool) -> None:
    first = pool.storage()
    first.create_volume("base", 1, "internal")
    first.write_image("base", [ONES])
    first.clone_volume("base", "c1", 3, "alice")
    first.close()

    second = pool.storage()

    assert [(v.id, v.size_gb, v.owner) for v in second.list_volumes()] == [
        ("base", 1, "internal"), ("c1", 3, "alice")]
    assert [v.id for v in second.list_volumes(owner="alice")] == ["c1"]
    with pool.image("c1") as c1:
        assert c1.metadata_get("ivcache.owner") == "alice"
    volume = second.get_volume("c1")
    assert (volume.location, volume.location_kind) == (
        f"rbd/{pool.namespace}/c1", "rbd_image")


def test_images_not_made_by_ivcache_are_not_volumes(pool: Pool) -> None:
    pool.rbd.RBD().create(pool.ioctx, "foreign", GIB)
    rbd = pool.storage()
    rbd.create_volume("mine", 1, "p")

    assert [v.id for v in rbd.list_volumes()] == ["mine"]
    with pytest.raises(VolumeNotFound):
        rbd.get_volume("foreign")
    with pytest.raises(VolumeNotFound):
        rbd.delete_volume("foreign")
    assert pool.images() == ["foreign", "mine"]


def test_zeros_written_into_a_new_image_take_no_objects(pool: Pool) -> None:
    rbd = pool.storage()
    rbd.create_volume("v1", 1, "p")

    rbd.write_image("v1", [ONES, bytes(64 * MIB), ONES])

    extents: list[tuple[int, int]] = []
    with pool.image("v1") as image:
        image.diff_iterate(0, GIB, None,
                           lambda offset, length, exists: extents.append((offset, length))
                           if exists else None)
    assert sum(length for _, length in extents) <= 8 * MIB
    assert rbd.read("v1", 65 * MIB, MIB) == ONES


def test_a_missing_pool_or_configuration_is_a_config_error(pool: Pool, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rbd_pool = nope"):
        RbdStorage("nope", conf=pool.conf)
    with pytest.raises((ConfigError, StorageError)):
        RbdStorage("rbd", conf=str(tmp_path / "missing.conf"), connect_timeout=2)


def _service(pool: Pool, work: Path) -> tuple[CacheService, LocalImageSource, RbdStorage]:
    images = LocalImageSource(work / "images")
    engine = make_engine(f"sqlite:///{work / 'cache.db'}")
    upgrade(engine)
    storage = pool.storage()
    service = CacheService(host="node-1", storage=storage, images=images,
                           uow=SqlUnitOfWork(engine), notifier=RecordingNotifier())
    return service, images, storage


def _raw_image(path: Path, size: int) -> bytes:
    data = bytearray(size)
    for offset in range(0, size, 8 * MIB):
        data[offset:offset + 4096] = os.urandom(4096)
    path.write_bytes(data)
    return bytes(data)


def test_the_cache_service_on_rbd_misses_then_hits_byte_exact(pool: Pool,
                                                              tmp_path: Path) -> None:
    service, images, storage = _service(pool, tmp_path)
    ctx = RequestContext.for_project("alice")
    data = _raw_image(tmp_path / "disk.raw", 40 * MIB + 123)
    image = images.add_image(ctx, tmp_path / "disk.raw")

    miss = service.create_volume(ctx, image.id, 1)
    hit = service.create_volume(ctx, image.id, 2)

    assert (miss.outcome, hit.outcome) == (Outcome.MISS, Outcome.HIT)
    for result in (miss, hit):
        assert result.volume.location_kind == "rbd_image"
        assert storage.read(result.volume.id, 0, len(data) + MIB) == data + bytes(MIB)
    assert storage.get_volume(hit.volume.id).size_gb == 2
    assert storage.parent(hit.volume.id) is not None  # a hit is a clone, not a copy
    service.delete_volume(ctx, miss.volume.id)
    service.delete_volume(ctx, hit.volume.id)
    assert [v.owner for v in storage.list_volumes()] == ["internal"]


def _cli_config(tmp_path: Path, cluster: CephCluster, pool: str = "rbd") -> Path:
    config = tmp_path / "ivcache.conf"
    config.write_text(f"""[DEFAULT]
host = node-1
[ivcache]
database_url = sqlite:///{tmp_path / 'ivcache.db'}
storage = rbd
rbd_pool = {pool}
rbd_conf = {cluster.conf}
images_path = {tmp_path / 'images'}
""", encoding="utf-8")
    return config


def _run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "ivcache")
    return subprocess.run([exe, "--config", str(config), *args, "--json"],
                          capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)


def test_volume_create_on_rbd_prints_the_rbd_image(ceph_cluster: CephCluster,
                                                   tmp_path: Path) -> None:
    config = _cli_config(tmp_path, ceph_cluster)
    _raw_image(tmp_path / "disk.raw", 8 * MIB)

    def ivcache(*args: str) -> Any:
        done = _run_cli(config, *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    image = ivcache("image", "add", str(tmp_path / "disk.raw"))
    first = ivcache("volume", "create", "--image", image["id"], "--size", "1")
    second = ivcache("volume", "create", "--image", image["id"], "--size", "2")

    assert (first["outcome"], second["outcome"]) == ("miss", "hit")
    assert second["rbd_image"] == f"rbd/{second['id']}" and "path" not in second
    ivcache("volume", "delete", first["id"])
    ivcache("volume", "delete", second["id"])
    ivcache("cache", "--admin", "evict", "--all")


def test_a_pool_that_does_not_exist_is_a_one_line_error(ceph_cluster: CephCluster,
                                                      tmp_path: Path) -> None:
    config = _cli_config(tmp_path, ceph_cluster, pool="no-such-pool")

    done = _run_cli(config, "volume", "list")

    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        done.stderr.strip()] and "rbd_pool = no-such-pool" in done.stderr

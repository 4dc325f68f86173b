"""The library facade does what the CLI does, on the embedded default (SQLite, files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ivcache.adapters.memory import (
    FakeClock,
    InMemoryImageSource,
    InMemoryUnitOfWork,
    RecordingNotifier,
)
from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.core import GIB, EntryNotFound, Image, InternalTenant, Outcome
from ivcache.entrypoints.library import ImageVolumeCache


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageVolumeCache:
    monkeypatch.setenv("IVCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IVCACHE_CONFIG", raising=False)
    return ImageVolumeCache.from_config(host="node-1")


def disk(tmp_path: Path, name: str, byte: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(byte * (1 << 20))
    return path


def test_warm_pin_unpin_get_entry_and_reconcile_through_the_facade(
        cache: ImageVolumeCache, tmp_path: Path) -> None:
    image = cache.add_image(disk(tmp_path, "a.raw", b"\x01"), name="a")
    assert [i.id for i in cache.list_images()] == [image.id]

    entry = cache.warm(image.id)
    assert entry.ready and cache.get_entry(entry.id) == entry
    assert cache.pin(image.id).pinned
    assert not cache.unpin(image.id).pinned

    result = cache.create_volume(image.id, size_gb=1, project="p1")
    assert result.outcome is Outcome.HIT
    assert cache.get_volume(result.volume.id, project="p1") == result.volume
    assert cache.reconcile() == []
    assert cache.stats().hits == 1
    # The savings ledger, as `cache stats` shows it: the warm's measured fill less the clone.
    stats, [hit] = cache.stats(), cache.entries()
    assert (stats.bytes_saved, hit.bytes_saved) == (image.size, image.size)
    assert entry.fill_seconds is not None and result.clone_seconds is not None
    assert stats.seconds_saved == pytest.approx(entry.fill_seconds - result.clone_seconds)
    assert stats.hit_ratio == 1.0  # a warm is no miss

    cache.evict(image_id=image.id)
    with pytest.raises(EntryNotFound):
        cache.get_entry(entry.id)


def test_private_images_are_listed_for_their_project_only(cache: ImageVolumeCache,
                                                          tmp_path: Path) -> None:
    image = cache.add_image(disk(tmp_path, "s.raw", b"\x02"), project="p1", private=True)
    assert [i.id for i in cache.list_images(project="p1")] == [image.id]
    assert cache.list_images(project="p2") == []
    assert [i.id for i in cache.list_images(project="ops", admin=True)] == [image.id]


def test_from_adapters_takes_a_tenant_and_a_clock() -> None:
    images = InMemoryImageSource()
    images.add(Image("img", virtual_size=GIB), b"\x03" * 4096)
    clock = FakeClock()
    cache = ImageVolumeCache.from_adapters(
        host="h", storage=FakeLvmStorage(100, host="h"), images=images,
        uow=InMemoryUnitOfWork(), notifier=RecordingNotifier(),
        tenant=InternalTenant(project_id="cache-owner"), clock=clock)
    cache.create_volume("img", 1)
    [entry] = cache.entries()
    assert entry.created_at == clock.now()
    assert [v.owner for v in cache.list_volumes(admin=True, all_projects=True)
            if v.id == entry.volume_id] == ["cache-owner"]

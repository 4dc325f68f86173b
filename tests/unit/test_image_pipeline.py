"""The request path's side of the image pipeline (DESIGN §9), on fakes: what the core does
with what the converter tells it. The converter itself, on real images: integration tests
(test_image_formats.py)."""

from __future__ import annotations

import attrs
import pytest

from ivcache.adapters.memory import FakeConverter
from ivcache.core.base import RawPassThrough
from ivcache.core.errors import ChecksumMismatch, InvalidSize, UnsafeImage, UnsupportedImage
from ivcache.core.events import CacheMiss, ImageDownloaded
from ivcache.core.model import GIB, Outcome
from ivcache.core.policy import CachePolicy
from tests.unit.conftest import World


def nothing_left(world: World) -> bool:
    service = world.service()
    return (service.list_entries() == [] and world.storage().list_volumes() == []
            and service.stats().count == 0)


@pytest.mark.parametrize("enabled", [True, False], ids=["cached", "uncached"])
def test_an_image_the_converter_refuses_leaves_no_entry_no_volume_and_no_announcement(
        world: World, enabled: bool) -> None:
    world.image("img")
    converter = FakeConverter()
    converter.refusals["img"] = UnsafeImage("image img fails the qcow2 safety checks")
    service = world.service(policy=CachePolicy(enabled=enabled), converter=converter)

    with pytest.raises(UnsafeImage, match="safety checks"):
        service.create_volume(world.alice, "img", 1)

    assert converter.opened == ["img"]
    assert nothing_left(world)
    assert world.notifier.of(CacheMiss) == [] and world.notifier.of(ImageDownloaded) == []


@pytest.mark.parametrize("enabled", [True, False], ids=["cached", "uncached"])
def test_a_disk_larger_than_the_size_asked_is_refused_before_any_volume_exists(
        world: World, enabled: bool) -> None:
    # The source does not know the virtual size; the image's header says 3 GiB.
    image = world.image("img")
    world.images.images["img"] = attrs.evolve(image, virtual_size=None)
    converter = FakeConverter()
    converter.virtual_sizes["img"] = 3 * GIB
    service = world.service(policy=CachePolicy(enabled=enabled), converter=converter)
    created: list[str] = []
    storage = world.storage()
    original = storage.create_volume
    storage.create_volume = lambda *a, **kw: created.append(a[0]) or original(*a, **kw)  # type: ignore[method-assign,func-returns-value]

    with pytest.raises(InvalidSize, match="size 2 GiB is too small for image img: its raw "
                                          "disk is 3 GiB"):
        service.create_volume(world.alice, "img", 2)

    assert created == []
    assert nothing_left(world)


def test_a_disk_larger_than_its_metadata_said_is_cached_at_the_size_its_header_gives(
        world: World) -> None:
    world.image("img", gib=1)
    converter = FakeConverter()
    converter.virtual_sizes["img"] = 3 * GIB + 1
    service = world.service(converter=converter)

    made = service.create_volume(world.alice, "img", 5)

    assert made.outcome is Outcome.MISS and made.volume.size_gb == 5
    [entry] = service.list_entries()
    assert entry.size_gb == 4  # ceil(3 GiB + 1 byte): the claim was made again for it
    assert converter.opened == ["img", "img"]
    assert service.stats().count == 1 and service.stats().size_gb == 4
    assert [e.name for e in world.notifier.of(CacheMiss)] == ["image_volume_cache.miss"]


def test_a_disk_no_larger_than_its_metadata_said_keeps_the_claimed_size(world: World) -> None:
    world.image("img", gib=2)
    converter = FakeConverter()
    converter.virtual_sizes["img"] = GIB
    service = world.service(converter=converter)

    service.create_volume(world.alice, "img", 2)

    assert [e.size_gb for e in service.list_entries()] == [2]
    assert converter.opened == ["img"]


def test_the_converter_is_handed_the_verified_bytes_so_a_bad_hash_still_fails(
        world: World) -> None:
    world.image("img", data=b"a" * 5000)
    world.images.data["img"] = b"b" * 5000
    service = world.service(converter=FakeConverter())

    with pytest.raises(ChecksumMismatch):
        service.create_volume(world.alice, "img", 1)

    assert nothing_left(world)


def test_without_a_converter_only_bare_raw_images_are_taken_and_nothing_is_read(
        world: World) -> None:
    world.image("q", disk_format="qcow2")
    world.image("z", container_format="compressed")
    world.image("r")
    service = world.service()
    assert isinstance(service.converter, RawPassThrough)

    for image_id in ("q", "z"):
        with pytest.raises(UnsupportedImage, match="only bare raw images"):
            service.create_volume(world.alice, image_id, 1)

    assert world.images.downloads == 0
    assert service.create_volume(world.alice, "r", 1).outcome is Outcome.MISS


def test_reconcile_reports_the_converters_leftover_scratch_files_and_fix_removes_them(
        world: World) -> None:
    converter = FakeConverter()
    converter.leftover = [("/scratch/.tmp-1.2-ab.spool", 4096)]
    service = world.service(converter=converter)

    found = service.reconcile()
    assert [(f.kind, f.volume_id, f.path, f.size, f.fixed) for f in found] == [
        ("scratch-file", "", "/scratch/.tmp-1.2-ab.spool", 4096, False)]
    assert converter.leftover != []

    fixed = service.reconcile(fix=True)
    assert [(f.kind, f.fixed) for f in fixed] == [("scratch-file", True)]
    assert converter.leftover == [] and service.reconcile() == []


@pytest.mark.parametrize("told_by", ["metadata", "header"])
@pytest.mark.parametrize("virtual", [2**63, 2**64 - 1])
def test_warming_a_disk_larger_than_any_volume_is_invalid_size_and_leaves_nothing(
        world: World, told_by: str, virtual: int) -> None:
    # No size is asked for a warm: the disk's virtual size alone must stop it, whether the
    # source's metadata or the image's header tells it (never an OverflowError from the
    # storage's ftruncate).
    image = world.image("img")
    converter = FakeConverter()
    if told_by == "metadata":
        world.images.images["img"] = attrs.evolve(image, virtual_size=virtual)
    else:
        world.images.images["img"] = attrs.evolve(image, virtual_size=None)
        converter.virtual_sizes["img"] = virtual
    service = world.service(converter=converter)

    with pytest.raises(InvalidSize, match="larger than any volume can be"):
        service.warm("img")

    assert converter.opened == ([] if told_by == "metadata" else ["img"])
    assert nothing_left(world)

"""The negative cache: an image whose data failed verification is refused at once for
``negative_cache_seconds``, per image content and scope, never per caller."""

from __future__ import annotations

import hashlib

import attrs
import pytest

from ivcache.adapters.memory import FakeConverter
from ivcache.core.errors import (
    ChecksumMismatch,
    ImageNotFound,
    ImageUnavailable,
    InvalidSize,
    UnsafeImage,
    UnsupportedImage,
)
from ivcache.core.model import GIB, MAX_VOLUME_GB, Scope
from ivcache.core.policy import CachePolicy
from tests.unit.conftest import NODE_1, World


def corrupt(world: World, image_id: str = "img") -> None:
    """The image's bytes no longer match its recorded hash."""
    world.image(image_id, data=b"a" * 5000)
    world.images.data[image_id] = b"b" * 5000


def test_a_burst_of_requests_for_a_corrupt_image_downloads_it_once(world: World) -> None:
    corrupt(world)
    service = world.service()
    for _ in range(5):
        with pytest.raises(ChecksumMismatch):
            service.create_volume(world.alice, "img", 1)
    assert world.images.downloads == 1
    stats = service.stats()
    # Refused from the negative cache: neither a hit nor a miss.
    assert (stats.downloads, stats.hits, stats.misses) == (0, 0, 0)
    assert service.list_entries() == [] and world.storage().list_volumes() == []


def test_the_refusal_says_why_and_for_how_long(world: World) -> None:
    corrupt(world)
    service = world.service()
    with pytest.raises(ChecksumMismatch) as first:
        service.create_volume(world.alice, "img", 1)
    world.clock.advance(100)
    with pytest.raises(ChecksumMismatch) as again:
        service.create_volume(world.alice, "img", 1)
    assert str(again.value) == (f"{first.value} (remembered for 200 s more; `ivcache cache "
                                "evict --image img` forgets it)")


def test_a_new_content_of_the_image_is_tried_again(world: World) -> None:
    corrupt(world)
    service = world.service()
    with pytest.raises(ChecksumMismatch):
        service.create_volume(world.alice, "img", 1)
    # Re-uploaded: new bytes, new hash.
    good = b"c" * 5000
    world.images.images["img"] = attrs.evolve(
        world.images.images["img"], os_hash_value=hashlib.sha512(good).hexdigest())
    world.images.data["img"] = good
    assert service.create_volume(world.alice, "img", 1).outcome.value == "miss"
    assert world.images.downloads == 2


def test_a_finding_is_forgotten_after_negative_cache_seconds(world: World) -> None:
    corrupt(world)
    service = world.service(policy=CachePolicy(negative_cache_seconds=60))
    for _ in range(2):
        with pytest.raises(ChecksumMismatch):
            service.create_volume(world.alice, "img", 1)
    world.clock.advance(60)
    with pytest.raises(ChecksumMismatch):
        service.create_volume(world.alice, "img", 1)
    assert world.images.downloads == 2


def test_with_negative_cache_seconds_0_every_request_downloads(world: World) -> None:
    corrupt(world)
    service = world.service(policy=CachePolicy(negative_cache_seconds=0))
    for _ in range(3):
        with pytest.raises(ChecksumMismatch):
            service.create_volume(world.alice, "img", 1)
    assert world.images.downloads == 3


def test_findings_are_per_scope(world: World) -> None:
    corrupt(world)
    with pytest.raises(ChecksumMismatch):
        world.service(host="node-1").create_volume(world.alice, "img", 1)
    with pytest.raises(ChecksumMismatch):
        world.service(host="node-2").create_volume(world.alice, "img", 1)
    assert world.images.downloads == 2
    with world.uow as uow:
        now = world.clock.now()
        content = world.images.images["img"].content_hash or ""
        assert uow.entries.bad(NODE_1, "img", content, now) is not None
        assert uow.entries.bad(Scope("node-2").key, "img", content, now) is not None
        assert uow.entries.bad(Scope("node-3").key, "img", content, now) is None


def test_an_authorization_failure_is_never_remembered(world: World) -> None:
    world.image("img", owner="alice", visibility="private")
    service = world.service()
    for _ in range(3):
        with pytest.raises(ImageNotFound):
            service.create_volume(world.bob, "img", 1)
    assert service.create_volume(world.alice, "img", 1).outcome.value == "miss"


def test_a_caller_who_may_not_see_a_bad_image_is_told_it_is_not_found(world: World) -> None:
    world.image("img", owner="alice", visibility="private", data=b"a" * 5000)
    world.images.data["img"] = b"b" * 5000
    service = world.service()
    with pytest.raises(ChecksumMismatch):
        service.create_volume(world.alice, "img", 1)
    # The finding is not the caller's: bob is refused as before, the finding not revealed.
    with pytest.raises(ImageNotFound):
        service.create_volume(world.bob, "img", 1)


def test_a_network_failure_is_not_remembered(world: World) -> None:
    world.image("img", data=b"a" * 5000)
    world.images.data["img"] = b"a" * 4000  # cut short: the bytes so far match nothing
    service = world.service()
    for _ in range(2):
        with pytest.raises(ImageUnavailable, match="cut short"):
            service.create_volume(world.alice, "img", 1)
    assert world.images.downloads == 2


def test_an_unsafe_image_is_remembered_and_not_opened_again(world: World) -> None:
    converter = FakeConverter()
    converter.refusals["img"] = UnsafeImage("image img: a qcow2 backing file")
    world.image("img")
    service = world.service(converter=converter)
    for _ in range(3):
        with pytest.raises(UnsafeImage, match="backing file"):
            service.create_volume(world.alice, "img", 1)
    assert converter.opened == ["img"]


def test_a_header_larger_than_any_volume_is_remembered_a_size_too_small_is_not(
        world: World) -> None:
    converter = FakeConverter()
    converter.virtual_sizes["huge"] = (MAX_VOLUME_GB + 1) * GIB
    converter.virtual_sizes["big"] = 5 * GIB
    world.image("huge")
    world.image("big")
    service = world.service(converter=converter)
    for _ in range(2):
        with pytest.raises(InvalidSize, match="larger than any volume"):
            service.warm("huge")
        with pytest.raises(InvalidSize, match="too small"):
            service.create_volume(world.alice, "big", 1)
    assert converter.opened.count("huge") == 1 and converter.opened.count("big") == 2


def test_the_disabled_cache_remembers_too(world: World) -> None:
    corrupt(world)
    service = world.service(policy=CachePolicy(enabled=False))
    for _ in range(3):
        with pytest.raises(ChecksumMismatch):
            service.create_volume(world.alice, "img", 1)
    assert world.images.downloads == 1


def test_warm_is_refused_at_once_too(world: World) -> None:
    corrupt(world)
    service = world.service()
    with pytest.raises(ChecksumMismatch):
        service.create_volume(world.alice, "img", 1)
    with pytest.raises(ChecksumMismatch, match="remembered"):
        service.warm("img")
    assert world.images.downloads == 1


def test_evict_by_image_forgets_the_finding(world: World) -> None:
    corrupt(world)
    service = world.service()
    with pytest.raises(ChecksumMismatch):
        service.create_volume(world.alice, "img", 1)
    assert service.evict(image_id="img") == []
    with pytest.raises(ChecksumMismatch):
        service.create_volume(world.alice, "img", 1)
    assert world.images.downloads == 2


def test_a_refusal_the_configuration_decides_is_never_remembered(world: World) -> None:
    # Without a converter only bare raw images are taken (as a compressed image without
    # allow_compression_on_image_upload): the operator may change that the next minute, and
    # the refusal costs no download anyway.
    world.image("img", disk_format="qcow2")
    service = world.service()
    for _ in range(2):
        with pytest.raises(UnsupportedImage):
            service.create_volume(world.alice, "img", 1)
    with world.uow as uow:
        assert uow.entries.bad(NODE_1, "img", world.images.images["img"].content_hash or "",
                               world.clock.now()) is None

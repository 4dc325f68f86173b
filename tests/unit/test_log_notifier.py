"""LogNotifier: one logfmt line per event on ``ivcache.events``."""

from __future__ import annotations

import logging

import pytest

from ivcache.adapters.notify.log import LogNotifier, logfmt
from ivcache.core.events import CacheEvict, CacheHit, CacheMiss, EvictReason, ImageDownloaded
from ivcache.core.ports import Notifier


def test_a_hit_is_one_info_line_starting_with_the_event_image_and_host(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ivcache.events")
    notifier: Notifier = LogNotifier()

    notifier.publish(CacheHit("img-1", "node-1", entry_id="e-1"))

    [record] = caplog.records
    assert (record.name, record.levelno) == ("ivcache.events", logging.INFO)
    assert record.getMessage() == (
        "event=image_volume_cache.hit image_id=img-1 host=node-1 entry_id=e-1")


def test_every_payload_field_is_logged_with_enums_by_their_value(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ivcache.events")

    LogNotifier().publish(CacheEvict("img-1", "node-1", reason=EvictReason.IMAGE_DELETED,
                                     entry_id="e-1", size_gb=3))
    LogNotifier().publish(CacheMiss("img-2", "node-1", outcome="miss-uncached"))
    LogNotifier().publish(ImageDownloaded("img-2", "node-1", bytes=1024, seconds=0.5))

    assert caplog.messages == [
        "event=image_volume_cache.evict image_id=img-1 host=node-1 reason=image-deleted "
        "entry_id=e-1 size_gb=3",
        "event=image_volume_cache.miss image_id=img-2 host=node-1 outcome=miss-uncached "
        "filled_from=image-source",
        "event=image_volume_cache.download image_id=img-2 host=node-1 bytes=1024 seconds=0.5",
    ]


def test_values_with_spaces_quotes_or_newlines_are_quoted_and_stay_on_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ivcache.events")

    LogNotifier().publish(CacheHit("img 1", 'node "a"\nb', entry_id="100%s"))

    assert caplog.messages == [
        'event=image_volume_cache.hit image_id="img 1" host="node \\"a\\"\\nb" entry_id=100%s'
    ]


def test_the_record_carries_the_event_name_and_payload_for_json_handlers(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ivcache.events")

    LogNotifier().publish(CacheHit("img-1", "node-1", entry_id="e-1"))

    [record] = caplog.records
    assert record.__dict__["ivcache_event"] == "image_volume_cache.hit"
    assert record.__dict__["ivcache_payload"] == {
        "image_id": "img-1", "host": "node-1", "entry_id": "e-1"}


def test_a_logger_passed_in_is_used_instead_of_ivcache_events(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.custom.events")
    caplog.set_level(logging.INFO, logger="test.custom.events")

    LogNotifier(logger).publish(CacheHit("img-1", "node-1"))

    assert [r.name for r in caplog.records] == ["test.custom.events"]


def test_nothing_is_logged_when_the_logger_is_above_info(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ivcache.events")

    LogNotifier().publish(CacheHit("img-1", "node-1"))

    assert caplog.records == []


def test_logfmt_writes_booleans_lowercase_and_none_or_empty_as_nothing_or_quotes() -> None:
    assert logfmt({"a": True, "b": False, "c": None, "d": "", "e": "x=y", "f": 1.5}) == (
        'a=true b=false c= d="" e="x=y" f=1.5')

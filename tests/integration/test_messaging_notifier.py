"""The bus notifier against a real RabbitMQ, checked by a real oslo.messaging listener."""

from __future__ import annotations

import time

import pytest

from ivcache.adapters.notify.messaging import MessagingNotifier
from ivcache.core.errors import ConfigError
from ivcache.core.events import (
    CacheEntryCreated,
    CacheEvict,
    CacheHit,
    CacheMiss,
    EvictReason,
    ImageDownloaded,
)
from ivcache.core.ports import Notifier
from tests.support.rabbitmq_server import BusListener, RabbitServer

pytestmark = pytest.mark.rabbitmq


def _notifier(rabbitmq: RabbitServer, topic: str, **kw: object) -> MessagingNotifier:
    return MessagingNotifier.connect(transport_url=rabbitmq.url, host="node-1@lvm#pool",
                                     topics=[topic], **kw)  # type: ignore[arg-type]


def test_the_bus_sees_cinders_three_events_with_ivcaches_fields(
        rabbitmq: RabbitServer, topic: str, listener: BusListener) -> None:
    notifier: Notifier = _notifier(rabbitmq, topic)
    host = "node-1@lvm#pool"
    notifier.publish(CacheMiss("img-1", host, "miss", entry_id="e-1"))
    notifier.publish(ImageDownloaded("img-1", host, 1024, 0.5))
    notifier.publish(CacheEntryCreated("img-1", host, "e-1", 1))
    notifier.publish(CacheHit("img-1", host, "e-1"))
    notifier.publish(CacheMiss("img-2", host, "miss-uncached"))
    notifier.publish(CacheEvict("img-1", host, EvictReason.LRU, "e-1", 1))
    got = listener.wait_for(4)
    assert [(p, pub, kind) for p, pub, kind, _, _ in got] == [
        ("info", f"volume.{host}", "image_volume_cache.miss"),
        ("info", f"volume.{host}", "image_volume_cache.hit"),
        ("info", f"volume.{host}", "image_volume_cache.miss"),
        ("info", f"volume.{host}", "image_volume_cache.evict"),
    ]
    event_ids = [payload.pop("event_id") for _, _, _, payload, _ in got]
    assert len(set(event_ids)) == 4
    assert [payload for _, _, _, payload, _ in got] == [
        {"image_id": "img-1", "host": host, "outcome": "miss", "filled_from": "image-source",
         "entry_id": "e-1"},
        {"image_id": "img-1", "host": host, "entry_id": "e-1"},
        {"image_id": "img-2", "host": host, "outcome": "miss-uncached",
         "filled_from": "image-source"},
        {"image_id": "img-1", "host": host, "reason": "lru", "entry_id": "e-1", "size_gb": 1},
    ]
    assert len({meta["message_id"] for _, _, _, _, meta in got}) == 4
    assert notifier.close() == 0  # type: ignore[attr-defined]


def test_publishing_never_waits_for_a_broker_that_is_down_and_the_events_follow_in_order(
        rabbitmq: RabbitServer, topic: str, listener: BusListener) -> None:
    notifier = _notifier(rabbitmq, topic, drain_seconds=60)
    notifier.publish(CacheHit("img-0", "node-1", "e-0"))
    assert notifier.flush(10) == 0
    rabbitmq.stop()
    try:
        started = time.monotonic()
        for n in range(1, 21):
            notifier.publish(CacheHit(f"img-{n}", "node-1", f"e-{n}"))
        assert time.monotonic() - started < 1
        time.sleep(1)
        assert notifier.pending > 0
    finally:
        rabbitmq.restart()
    assert notifier.close() == 0
    got = listener.wait_for(21, timeout=60)
    ids = [payload["image_id"] for _, _, _, payload, _ in got]
    assert ids == [f"img-{n}" for n in range(21)]


def test_close_gives_up_after_drain_seconds_and_says_how_many_were_not_delivered(
        rabbitmq: RabbitServer, topic: str, listener: BusListener,
        caplog: pytest.LogCaptureFixture) -> None:
    notifier = _notifier(rabbitmq, topic, drain_seconds=0.5)
    rabbitmq.stop()
    try:
        for n in range(3):
            notifier.publish(CacheHit(f"img-{n}", "node-1"))
        started = time.monotonic()
        assert notifier.close() == 3
        assert time.monotonic() - started < 2
    finally:
        rabbitmq.restart()
    assert "3 cache event(s) not delivered" in caplog.text


def test_a_malformed_transport_url_is_refused_naming_the_option_and_not_the_password() -> None:
    for url in ("rabbit://user:s3cret@host:notaport/", "no scheme", "carrier-pigeon://x/",
                "rabbit:///"):
        with pytest.raises(ConfigError, match=r"transport_url") as raised:
            MessagingNotifier.connect(transport_url=url, host="node-1")
        assert "s3cret" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"transport_url.* is not set"):
        MessagingNotifier.connect(transport_url="", host="node-1")


def test_an_unknown_driver_is_refused_naming_the_option(rabbitmq: RabbitServer) -> None:
    with pytest.raises(ConfigError, match=r"\[oslo_messaging_notifications\] driver = "
                                          r"'carrier' is not .* messagingv2"):
        MessagingNotifier.connect(transport_url=rabbitmq.url, host="node-1",
                                  driver=["carrier"])


def test_credentials_the_broker_refuses_are_an_error_at_start(rabbitmq: RabbitServer) -> None:
    wrong = rabbitmq.url.replace("guest:guest", "guest:wrong")
    with pytest.raises(ConfigError, match="refused the credentials of user 'guest'") as raised:
        MessagingNotifier.connect(transport_url=wrong, host="node-1")
    assert "wrong" not in str(raised.value) and "transport_url" in str(raised.value)


def test_an_unreachable_broker_is_no_error_at_start_and_costs_little(
        caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    notifier = MessagingNotifier.connect(transport_url="rabbit://guest:guest@127.0.0.1:1/",
                                         host="node-1", drain_seconds=0.2)
    notifier.publish(CacheHit("img-1", "node-1"))
    assert notifier.close() == 1
    assert time.monotonic() - started < 5
    assert "the bus is unreachable" in caplog.text

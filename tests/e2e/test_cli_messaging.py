"""Real ``ivcache`` runs send Cinder's notifications to a real RabbitMQ, as a listener sees."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.support.rabbitmq_server import BusListener, RabbitServer

pytestmark = pytest.mark.rabbitmq


def _config(cli: Cli, transport_url: str, topic: str, extra: str = "") -> str:
    path = cli.home / "ivcache.ini"
    path.write_text(f"""[DEFAULT]
host = node-7
transport_url = {transport_url}
image_volume_cache_max_count = 1
[ivcache]
notifier = none
{extra}
[oslo_messaging_notifications]
driver = messagingv2
topics = {topic}
""", encoding="utf-8")
    return str(path)


#: node-7 on the implicit backend: the scope every event of these runs carries
SCOPE = "node-7@default#default"


def test_every_create_and_evict_reaches_the_bus_once_in_cinders_format(
        cli: Cli, image_file: Path, rabbitmq: RabbitServer, topic: str,
        listener: BusListener, tmp_path: Path) -> None:
    config = _config(cli, rabbitmq.url, topic)
    first = cli.ok("image", "add", str(image_file), "--config", config, "--json").json()
    other_file = tmp_path / "other.raw"
    other_file.write_bytes(b"other" * 4096)
    second = cli.ok("image", "add", str(other_file), "--config", config, "--json").json()
    outcomes = []
    for image in (first, first, first, second):  # miss, hit, hit, miss (evicts the first)
        created = cli.ok("volume", "create", "--image", image["id"], "--size", "1",
                         "--config", config, "--json").json()
        outcomes.append((created["outcome"], created["entry_id"]))
    assert [o for o, _ in outcomes] == ["miss", "hit", "hit", "miss"]
    cli.ok("cache", "--admin", "evict", "--all", "--config", config)

    got = listener.wait_for(6)
    assert {(priority, publisher) for priority, publisher, _, _, _ in got} == {
        ("info", "volume.node-7")}
    first_entry, second_entry = outcomes[0][1], outcomes[3][1]
    event_ids = [payload.pop("event_id") for _, _, _, payload, _ in got]
    assert len(set(event_ids)) == 6
    assert [(kind, payload) for _, _, kind, payload, _ in got] == [
        ("image_volume_cache.miss", {"image_id": first["id"], "host": "node-7",
                                     "scope": SCOPE,
                                     "outcome": "miss", "filled_from": "image-source",
                                     "entry_id": first_entry}),
        ("image_volume_cache.hit", {"image_id": first["id"], "host": "node-7",
                                     "scope": SCOPE,
                                    "entry_id": first_entry}),
        ("image_volume_cache.hit", {"image_id": first["id"], "host": "node-7",
                                     "scope": SCOPE,
                                    "entry_id": first_entry}),
        ("image_volume_cache.evict", {"image_id": first["id"], "host": "node-7",
                                     "scope": SCOPE,
                                      "reason": "lru", "entry_id": first_entry,
                                      "size_gb": 1}),
        ("image_volume_cache.miss", {"image_id": second["id"], "host": "node-7",
                                     "scope": SCOPE,
                                     "outcome": "miss", "filled_from": "image-source",
                                     "entry_id": second_entry}),
        ("image_volume_cache.evict", {"image_id": second["id"], "host": "node-7",
                                     "scope": SCOPE,
                                      "reason": "admin", "entry_id": second_entry,
                                      "size_gb": 1}),
    ]
    assert len({meta["message_id"] for _, _, _, _, meta in got}) == 6


def test_notifier_messaging_in_the_list_sends_with_cinders_default_driver(
        cli: Cli, image_file: Path, rabbitmq: RabbitServer, topic: str,
        listener: BusListener) -> None:
    path = cli.home / "ivcache.ini"
    path.write_text(f"""[DEFAULT]
transport_url = {rabbitmq.url}
[ivcache]
notifier = log, messaging
[oslo_messaging_notifications]
topics = {topic}
""", encoding="utf-8")
    image = cli.ok("image", "add", str(image_file), "--config", str(path), "--json").json()
    cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--config", str(path))
    got = listener.wait_for(1)
    assert [kind for _, _, kind, _, _ in got] == ["image_volume_cache.miss"]


@pytest.mark.parametrize(("url", "words"), [
    ("rabbit://guest:guest@127.0.0.1:notaport/", "is not a transport URL"),
    ("carrier-pigeon://loft/", "is not a transport URL"),
])
def test_a_malformed_transport_url_exits_1_naming_the_option_and_creates_nothing(
        cli: Cli, topic: str, url: str, words: str) -> None:
    config = _config(cli, url, topic)
    run = cli.fails("cache", "--admin", "stats", "--config", config)
    assert "transport_url" in run.err and words in run.err
    assert sorted(p.name for p in cli.home.iterdir()) == ["ivcache.ini"]


def test_refused_credentials_exit_1_naming_the_option_and_create_nothing(
        cli: Cli, rabbitmq: RabbitServer, topic: str) -> None:
    config = _config(cli, rabbitmq.url.replace("guest:guest", "guest:wrong"), topic)
    run = cli.fails("cache", "--admin", "stats", "--config", config)
    assert "transport_url" in run.err and "refused the credentials" in run.err
    assert "wrong" not in run.err
    assert sorted(p.name for p in cli.home.iterdir()) == ["ivcache.ini"]


def test_an_unknown_driver_exits_1_naming_the_option(cli: Cli, rabbitmq: RabbitServer,
                                                     topic: str) -> None:
    config = _config(cli, rabbitmq.url, topic)
    text = Path(config).read_text().replace("driver = messagingv2", "driver = carrier")
    Path(config).write_text(text)
    run = cli.fails("cache", "--admin", "stats", "--config", config)
    assert "option driver = 'carrier' is not one of" in run.err


def test_an_unreachable_broker_never_fails_a_create_and_costs_a_few_seconds_at_most(
        cli: Cli, image_file: Path, topic: str) -> None:
    config = _config(cli, "rabbit://guest:guest@127.0.0.1:1/", topic,
                     extra="events_drain_seconds = 1")
    image = cli.ok("image", "add", str(image_file), "--config", config, "--json").json()
    started = time.monotonic()
    created = cli.ok("volume", "create", "--image", image["id"], "--size", "1",
                     "--config", config, "--json").json()
    assert created["outcome"] == "miss"
    assert time.monotonic() - started < 8


def test_events_of_creates_during_a_broker_outage_wait_and_are_flushed_in_order_once(
        cli: Cli, image_file: Path, rabbitmq: RabbitServer, topic: str,
        listener: BusListener) -> None:
    config = _config(cli, rabbitmq.url, topic, extra="events_drain_seconds = 0.5")
    image = cli.ok("image", "add", str(image_file), "--config", config, "--json").json()
    cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--config", config)
    assert [kind for _, _, kind, _, _ in listener.wait_for(1)] == ["image_volume_cache.miss"]
    rabbitmq.stop()
    try:
        for _ in range(3):
            started = time.monotonic()
            created = cli.ok("volume", "create", "--image", image["id"], "--size", "1",
                             "--config", config, "--json").json()
            assert created["outcome"] == "hit"
            assert time.monotonic() - started < 10
        stats = cli.ok("cache", "--admin", "stats", "--config", config, "--json").json()
        assert stats["events_pending"] == 3
        assert (stats["hits"], stats["misses"], stats["hit_ratio"]) == (3, 1, 0.75)
        down = cli.ok("events", "flush", "--config", config, "--json").json()
        assert down == {"sent": 0, "pending": 3}
    finally:
        rabbitmq.restart()
    flushed = cli.ok("events", "flush", "--config", config, "--json").json()
    assert flushed["pending"] == 0
    stats = cli.ok("cache", "--admin", "stats", "--config", config, "--json").json()
    assert stats["events_pending"] == 0
    got = listener.wait_for(4, timeout=30)
    assert [kind for _, _, kind, _, _ in got] == ["image_volume_cache.miss"] + [
        "image_volume_cache.hit"] * 3
    assert len({payload["event_id"] for _, _, _, payload, _ in got}) == 4


def test_events_flush_without_a_bus_says_how_to_configure_one(cli: Cli) -> None:
    run = cli.fails("events", "flush")
    assert "[oslo_messaging_notifications] driver" in run.err
    assert cli.ok("cache", "--admin", "stats", "--json").json()["events_pending"] == 0

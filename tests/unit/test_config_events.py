"""The event options: the notifier list and Cinder's [oslo_messaging_notifications]."""

from __future__ import annotations

from pathlib import Path

import attrs

from ivcache.adapters.notify import MultiNotifier, NullNotifier
from ivcache.adapters.notify.log import LogNotifier
from ivcache.entrypoints.bootstrap import build_notifier
from ivcache.entrypoints.config import Config, MessagingConfig
from tests.unit.test_config import _load, _refused


def test_the_bus_is_off_by_default_as_in_cinder(tmp_path: Path) -> None:
    config = _load(tmp_path, "")
    assert config.messaging == MessagingConfig(driver=("noop",), transport_url="",
                                               topics=("notifications",))
    assert config.notifiers == ("log",) and not config.messaging.enabled


def test_cinders_options_turn_the_bus_on_and_the_default_transport_url_is_read(
        tmp_path: Path) -> None:
    config = _load(tmp_path, """[DEFAULT]
transport_url = rabbit://ivcache:SECRET@rabbit.example:5672/
[oslo_messaging_notifications]
driver = messagingv2
topics = notifications, audit
""")
    assert config.messaging == MessagingConfig(
        driver=("messagingv2",), transport_url="rabbit://ivcache:SECRET@rabbit.example:5672/",
        topics=("notifications", "audit"))
    # messaging is implied by a driver that is not noop
    assert config.notifiers == ("log", "messaging")


def test_the_notifications_transport_url_overrides_the_default_one(tmp_path: Path) -> None:
    config = _load(tmp_path, """[DEFAULT]
transport_url = rabbit://rpc@rpc-bus/
[oslo_messaging_notifications]
transport_url = rabbit://notify@notify-bus/
""")
    assert config.messaging.transport_url == "rabbit://notify@notify-bus/"


def test_the_notifier_is_a_list_and_none_means_none(tmp_path: Path) -> None:
    config = _load(tmp_path, "[ivcache]\nnotifier = log,otel , messaging\n")
    assert config.notifier == "log, otel, messaging"
    assert config.notifiers == ("log", "otel", "messaging")
    assert _load(tmp_path, "[ivcache]\nnotifier = none\n").notifiers == ()


def test_a_bad_item_of_a_list_is_refused_naming_it(tmp_path: Path) -> None:
    message = _refused(tmp_path, "[ivcache]\nnotifier = log, email\n")
    assert message.endswith("option notifier = 'log, email': 'email' is not one of "
                            "log, otel, messaging, none")
    message = _refused(tmp_path, "[oslo_messaging_notifications]\ndriver = carrier\n")
    assert message.endswith("option driver = 'carrier' is not one of noop, messagingv2, "
                            "messaging, log, routing, test")


def test_an_unknown_option_of_the_notifications_section_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, "[oslo_messaging_notifications]\ntopic = x\n")
    assert "unknown option 'topic' in [oslo_messaging_notifications]" in message


def test_several_notifiers_are_combined_in_order(tmp_path: Path) -> None:
    config: Config = _load(tmp_path, "[ivcache]\nnotifier = log, log\n")
    notifier, tracer = build_notifier(config)
    assert isinstance(notifier, MultiNotifier) and tracer is None
    assert [type(n) for n in notifier.notifiers] == [LogNotifier, LogNotifier]
    none, _ = build_notifier(attrs.evolve(config, notifier="none"))
    assert isinstance(none, NullNotifier)

"""The composition root picks adapters from the config."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from ivcache.adapters.notify import NullNotifier
from ivcache.adapters.notify.log import LogNotifier
from ivcache.core.errors import ConfigError
from ivcache.core.events import CacheHit, CacheMiss
from ivcache.entrypoints.bootstrap import build_images, build_notifier, build_storage
from ivcache.entrypoints.config import Config, load_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(env={"IVCACHE_HOME": str(tmp_path)})


def test_notifier_none_keeps_nothing_however_many_events_it_gets(config: Config) -> None:
    notifier, tracer = build_notifier(attrs.evolve(config, notifier="none"))
    for n in range(1000):
        notifier.publish(CacheHit(f"img-{n}", "node-1"))
        notifier.publish(CacheMiss(f"img-{n}", "node-1"))
    assert isinstance(notifier, NullNotifier) and tracer is None
    assert vars(notifier) == {}


def test_the_default_notifier_logs(config: Config) -> None:
    notifier, tracer = build_notifier(config)
    assert isinstance(notifier, LogNotifier) and tracer is None


def _words(error: pytest.ExceptionInfo[ConfigError]) -> set[str]:
    return set(re.findall(r"[\w-]+", str(error.value)))


def test_an_unknown_storage_is_refused_naming_every_backend(config: Config) -> None:
    with pytest.raises(ConfigError, match="storage = 'tape'") as raised:
        build_storage(attrs.evolve(config.backend(), storage="tape"))
    assert {"file", "qcow2", "rbd", "fake-lvm", "fake-rbd"} <= _words(raised)


def test_an_unknown_image_source_is_refused_naming_every_source(config: Config) -> None:
    with pytest.raises(ConfigError, match="image_source = 'ftp'") as raised:
        build_images(attrs.evolve(config, image_source="ftp"))
    assert {"local", "glance"} <= _words(raised)

"""``otel_exporter = console`` as a user runs it: metrics on stderr, JSON alone on stdout."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import Cli


def test_a_create_with_the_console_exporter_prints_its_metrics_on_stderr(
        cli: Cli, image_file: Path) -> None:
    config = cli.home / "ivcache.ini"
    config.write_text("[ivcache]\nnotifier = none\notel_exporter = console\n", encoding="utf-8")
    image = cli.ok("image", "add", str(image_file), "--config", str(config), "--json").json()
    run = cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--config",
                 str(config), "--json")
    assert json.loads(run.out)["outcome"] == "miss"
    for name in ("ivcache.cache.requests", "ivcache.download.duration",
                 "ivcache.clone.duration", "ivcache.cache.entries", "ivcache.cache.size"):
        assert f'"{name}"' in run.err, name
    assert '"ivcache.create_volume"' in run.err  # the request's span


def test_an_unknown_exporter_is_refused_naming_the_option(cli: Cli) -> None:
    config = cli.home / "ivcache.ini"
    config.write_text("[ivcache]\notel_exporter = zipkin\n", encoding="utf-8")
    run = cli.fails("cache", "--admin", "stats", "--config", str(config))
    assert "option otel_exporter = 'zipkin' is not one of none, console, otlp" in run.err

"""Where an operator finds the event lines: Cinder's log_file / log_dir / debug, and -v."""

from __future__ import annotations

import logging
from pathlib import Path

from tests.e2e.conftest import Cli


def _three_creates(cli: Cli, image_file: Path, config: Path, *flags: str) -> list[str]:
    image = cli.ok("image", "add", str(image_file), "--config", str(config), "--json").json()
    errs = []
    for _ in range(3):
        run = cli.ok("volume", "create", "--image", image["id"], "--size", "1",
                     "--config", str(config), "--json", *flags)
        assert run.json()["outcome"] in ("miss", "hit")
        errs.append(run.err)
    return errs


def _events(text: str) -> list[str]:
    """The hit and miss lines' event names, in order (oslo.log's format)."""
    names = [line.split(" INFO ivcache.events [-] event=", 1)[1].split()[0]
             for line in text.splitlines() if " INFO ivcache.events [-] event=" in line]
    return [n for n in names if n in ("image_volume_cache.miss", "image_volume_cache.hit")]


def test_with_log_file_the_event_lines_of_three_creates_are_in_the_file(
        cli: Cli, image_file: Path) -> None:
    config = cli.home / "ivcache.ini"
    config.write_text("[DEFAULT]\nlog_file = ivcache.log\nlog_dir = logs\n"
                      "[ivcache]\nnotifier = log\n", encoding="utf-8")
    errs = _three_creates(cli, image_file, config)
    assert errs == ["", "", ""]
    text = (cli.home / "logs" / "ivcache.log").read_text(encoding="utf-8")
    assert _events(text) == ["image_volume_cache.miss", "image_volume_cache.hit",
                             "image_volume_cache.hit"]
    assert "DEBUG" not in text and "alembic" not in text


def test_log_dir_alone_names_the_file_ivcache_log_and_debug_logs_debug(
        cli: Cli, image_file: Path) -> None:
    config = cli.home / "ivcache.ini"
    config.write_text(f"[DEFAULT]\nlog_dir = {cli.home / 'var'}\ndebug = true\n",
                      encoding="utf-8")
    _three_creates(cli, image_file, config)
    text = (cli.home / "var" / "ivcache.log").read_text(encoding="utf-8")
    assert len(_events(text)) == 3
    # debug lets alembic's INFO through too (left out otherwise, see the test above)
    assert " INFO alembic.runtime.migration [-] " in text


def test_verbose_sends_the_event_lines_to_stderr_and_leaves_stdout_to_json(
        cli: Cli, image_file: Path) -> None:
    config = cli.home / "ivcache.ini"
    config.write_text("[ivcache]\nnotifier = log\n", encoding="utf-8")
    errs = _three_creates(cli, image_file, config, "-v")
    assert [_events(err) for err in errs] == [["image_volume_cache.miss"],
                                              ["image_volume_cache.hit"],
                                              ["image_volume_cache.hit"]]
    assert not any(cli.home.glob("*.log"))
    quiet = cli.ok("cache", "--admin", "list", "--config", str(config), "--json")
    assert quiet.err == ""
    loud = cli.ok("--verbose", "cache", "--admin", "stats", "--config", str(config), "--json")
    assert loud.json()["hits"] == 2


def test_a_log_file_that_cannot_be_opened_is_one_line_naming_the_option(
        cli: Cli, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = cli.home / "ivcache.ini"
    config.write_text(f"[DEFAULT]\nlog_dir = {blocker}\n", encoding="utf-8")
    run = cli.fails("cache", "--admin", "stats", "--config", str(config))
    assert "log_dir" in run.err and str(blocker) in run.err


def test_the_library_leaves_its_users_logging_alone(tmp_path: Path) -> None:
    from ivcache.entrypoints.library import ImageVolumeCache

    config = tmp_path / "ivcache.ini"
    config.write_text(f"[DEFAULT]\nlog_file = {tmp_path / 'x.log'}\n", encoding="utf-8")
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    with ImageVolumeCache.from_config(config) as cache:
        cache.stats()
    assert (list(root.handlers), root.level) == before
    assert not (tmp_path / "x.log").exists()

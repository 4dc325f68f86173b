"""The negative cache from the command line: a corrupt image is downloaded once, then
refused at once, until ``cache evict --image`` forgets it."""

from __future__ import annotations

import os
from pathlib import Path

from tests.e2e.conftest import Cli


def _stored(cli: Cli, image_id: str) -> Path:
    return cli.home / "images" / "data" / image_id


def test_a_corrupt_image_is_downloaded_once_then_refused_at_once(
        cli: Cli, image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--json").json()
    stored = _stored(cli, image["id"])
    # The stored bytes no longer match the recorded hash (same length: not "cut short").
    with open(stored, "r+b") as fh:
        fh.write(b"rot!")
    create = ("volume", "create", "--image", image["id"], "--size", "1")
    first = cli.fails(*create)
    assert "sha512 of the data" in first.err and "remembered" not in first.err
    # Without its data file: a second download would fail otherwise, not by the checksum.
    aside = stored.with_name("aside")
    stored.rename(aside)
    second = cli.fails(*create)
    aside.rename(stored)
    assert "sha512 of the data" in second.err
    assert "remembered for" in second.err and "cache evict --image" in second.err
    stats = cli.ok("cache", "--admin", "stats", "--json").json()
    assert (stats["downloads"], stats["hits"], stats["misses"], stats["entries"]) == (
        0, 0, 0, 0)
    assert cli.ok("volume", "list", "--json").json() == []

    # Repaired, the finding forgotten: served through the cache at once.
    with open(stored, "r+b") as fh:
        fh.write(b"boot")
    assert cli.ok("cache", "--admin", "evict", "--image", image["id"],
                  "--json").json() == {"evicted": []}
    done = cli.ok(*create, "--json").json()
    assert done["outcome"] == "miss"
    assert cli.ok("cache", "--admin", "stats", "--json").json()["downloads"] == 1


def test_with_negative_cache_seconds_0_each_create_tries_again(
        cli: Cli, image_file: Path) -> None:
    config = cli.home / "ivcache.conf"
    config.write_text("[ivcache]\nnegative_cache_seconds = 0\n")
    env = {"IVCACHE_CONFIG": str(config)}
    image = cli.ok("image", "add", str(image_file), "--json", env=env).json()
    with open(_stored(cli, image["id"]), "r+b") as fh:
        fh.write(b"rot!")
    for _ in range(2):
        run = cli.fails("volume", "create", "--image", image["id"], "--size", "1", env=env)
        assert "remembered" not in run.err
    assert os.path.exists(_stored(cli, image["id"]))

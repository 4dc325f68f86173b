"""The negative cache from the command line: a corrupt image is downloaded once, then
refused at once, until ``cache evict --image`` forgets it."""

from __future__ import annotations

import os
import shutil
import subprocess
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


def test_a_qcow2_swapped_for_one_with_a_backing_file_is_read_once_then_remembered(
        cli: Cli, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.qcow2", tmp_path / "bad.qcow2"
    (tmp_path / "base.raw").write_bytes(b"\0" * (1 << 20))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(good), "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                    str(tmp_path / "base.raw"), "-F", "raw", str(bad), "64M"], check=True)
    image = cli.ok("image", "add", str(good), "--disk-format", "qcow2", "--json").json()
    # Its stored data swapped for a qcow2 naming a backing file (a host file it could read).
    shutil.copyfile(bad, _stored(cli, image["id"]))
    create = ("volume", "create", "--image", image["id"], "--size", "1")
    # A qcow2 is read whole into scratch space first, so its hash is what refuses it.
    first = cli.fails(*create)
    assert "the image is corrupt" in first.err and "remembered" not in first.err
    _stored(cli, image["id"]).unlink()
    second = cli.fails(*create)
    assert second.err.startswith(first.err.rstrip()) and "remembered for" in second.err
    assert cli.ok("cache", "--admin", "stats", "--json").json()["downloads"] == 0

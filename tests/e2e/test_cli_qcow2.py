"""The CLI on qcow2 storage: ``storage = qcow2`` in the config, real qemu-img."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli

pytestmark = pytest.mark.qcow2


def qcow2_config(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "qcow2.ini"
    config.write_text(f"[ivcache]\nstorage = qcow2\nstorage_path = {tmp_path / 'qvols'}\n")
    return {"IVCACHE_CONFIG": str(config)}


def test_on_qcow2_a_miss_then_a_hit_give_overlays_on_the_cached_base(
        cli: Cli, tmp_path: Path, image_file: Path) -> None:
    env = qcow2_config(tmp_path)
    image = cli.ok("image", "add", str(image_file), "--json", env=env).json()

    first = cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--json",
                   env=env).json()
    second = cli.ok("volume", "create", "--image", image["id"], "--size", "2", "--json",
                    env=env).json()

    assert (first["outcome"], second["outcome"]) == ("miss", "hit")
    [entry] = cli.ok("cache", "--admin", "list", "--json", env=env).json()
    [cache_volume] = [v for v in cli.ok("volume", "list", "--all", "--admin", "--json",
                                        env=env).json() if v["id"] == entry["volume_id"]]
    for volume in (first, second):
        assert Path(volume["path"]).is_absolute()
        assert str(volume["path"]).startswith(str(tmp_path / "qvols"))
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", volume["path"]],
            capture_output=True, text=True, check=True).stdout)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == volume["size_gb"] << 30
        assert info["backing-filename"] == cache_volume["path"]
        assert info["backing-filename-format"] == "raw"
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", str(image_file),
                        volume["path"]], check=True)
        subprocess.run(["qemu-img", "check", "-q", volume["path"]], check=True)

    cli.ok("cache", "--admin", "evict", "--all", env=env)
    assert Path(cache_volume["path"]).exists()  # the users' volumes still read from it
    cli.ok("volume", "delete", first["id"], env=env)
    cli.ok("volume", "delete", second["id"], env=env)
    assert not Path(cache_volume["path"]).exists()


def test_without_qemu_img_the_cli_says_to_install_qemu_utils(
        cli: Cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()

    run = cli.fails("cache", "--admin", "list", env={**qcow2_config(tmp_path), "PATH": str(empty)})

    assert "qemu-utils" in run.err

"""``ivcache volume upload`` as a user runs it: the JSON, the hit that follows, who may
upload, a full cache, Cinder's image_upload_use_internal_tenant."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.support.glance_server import GlanceServer

FIELDS = {"image_id", "size", "disk_format", "os_hash_algo", "os_hash_value", "cached",
          "entry_id", "reason"}
CHANGE = b"my golden web server " * 1000


def _customised_volume(cli: Cli, image_file: Path, *config: str) -> dict[str, object]:
    image = cli.ok("image", "add", str(image_file), *config, "--json").json()
    volume: dict[str, object] = cli.ok("volume", "create", "--image", image["id"], "--size",
                                       "1", *config, "--json").json()
    with open(str(volume["path"]), "r+b") as fh:
        fh.write(CHANGE)
    return volume


def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_an_upload_says_what_it_made_and_the_next_create_is_a_hit_without_a_download(
        cli: Cli, image_file: Path) -> None:
    volume = _customised_volume(cli, image_file)
    downloads = cli.ok("cache", "--admin", "stats", "--json").json()["downloads"]

    up = cli.ok("volume", "upload", str(volume["id"]), "--name", "golden-web",
                "--json").json()

    assert set(up) == FIELDS
    assert up["cached"] is True and up["reason"] is None and up["entry_id"]
    assert up["disk_format"] == "raw" and up["size"] == 1 << 30
    assert up["os_hash_algo"] == "sha512"
    assert up["os_hash_value"] == _sha512(Path(str(volume["path"])))
    [listed] = [i for i in cli.ok("image", "list", "--json").json()
                if i["id"] == up["image_id"]]
    assert listed["name"] == "golden-web" and listed["owner"] == "demo"

    made = cli.ok("volume", "create", "--image", up["image_id"], "--size", "2",
                  "--json").json()

    assert made["outcome"] == "hit" and made["entry_id"] == up["entry_id"]
    with open(made["path"], "rb") as fh:
        assert fh.read(len(CHANGE)) == CHANGE
    assert cli.ok("cache", "--admin", "stats", "--json").json()["downloads"] == downloads


def test_a_qcow2_upload_is_cached_too(cli: Cli, image_file: Path) -> None:
    volume = _customised_volume(cli, image_file)
    up = cli.ok("volume", "upload", str(volume["id"]), "--name", "golden-q",
                "--disk-format", "qcow2", "--private", "--json").json()
    assert up["cached"] is True and up["disk_format"] == "qcow2" and up["size"] < 1 << 30
    made = cli.ok("volume", "create", "--image", up["image_id"], "--size", "1",
                  "--json").json()
    assert made["outcome"] == "hit"


def test_only_the_owner_or_an_admin_may_upload_and_bad_options_are_usage_errors(
        cli: Cli, image_file: Path) -> None:
    volume = _customised_volume(cli, image_file)
    run = cli.fails("volume", "upload", str(volume["id"]), "--name", "x", "--project", "bob")
    assert "not found" in run.err
    cli.fails("volume", "upload", "no-such-volume", "--name", "x")
    cli.fails("volume", "upload", str(volume["id"]), "--name", "x", "--disk-format", "vmdk",
              code=2)
    cli.fails("volume", "upload", str(volume["id"]), code=2)
    assert [i["name"] for i in cli.ok("image", "list", "--json").json()] == ["disk.raw"]
    [entry] = cli.ok("cache", "--admin", "list", "--json").json()
    cli.fails("volume", "upload", entry["volume_id"], "--name", "cache-copy")
    assert cli.ok("volume", "upload", str(volume["id"]), "--name", "ops", "--admin",
                  "--json").json()["cached"] is True


def test_a_full_cache_uploads_uncached_and_the_image_may_belong_to_the_internal_tenant(
        cli: Cli, image_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "ivcache.conf"
    config.write_text(f"""[DEFAULT]
image_volume_cache_max_count = 1
image_upload_use_internal_tenant = true
[ivcache]
database_url = sqlite:///{tmp_path}/db.sqlite
storage_path = {tmp_path}/volumes
images_path = {tmp_path}/images
notifier = none
""", encoding="utf-8")
    volume = _customised_volume(cli, image_file, "--config", str(config))
    [entry] = cli.ok("cache", "--admin", "list", "--config", str(config), "--json").json()
    cli.ok("cache", "--admin", "pin", entry["image_id"], "--config", str(config))

    up = cli.ok("volume", "upload", str(volume["id"]), "--name", "golden", "--config",
                str(config), "--json").json()

    assert up["cached"] is False and up["entry_id"] is None and "no room" in up["reason"]
    [image] = [i for i in cli.ok("image", "list", "--config", str(config), "--json").json()
               if i["id"] == up["image_id"]]
    assert image["owner"] == "internal" and image["status"] == "active"


@pytest.mark.glance
def test_an_upload_to_glance_goes_with_the_callers_identity_and_is_cached(
        cli: Cli, glance: GlanceServer) -> None:
    project = f"up-{uuid.uuid4().hex[:8]}"
    base = glance.create_image(glance.identity(project), b"base" * (1 << 18), name="base")
    config = cli.home / "glance.ini"
    config.write_text(f"""[DEFAULT]
host = node-1
[ivcache]
image_source = glance
notifier = none
[glance]
url = {glance.url}
auth = trusted-headers
""", encoding="utf-8")
    common = ("--config", str(config), "--project", project)
    volume = cli.ok("volume", "create", "--image", base, "--size", "1", *common,
                    "--json").json()
    with open(volume["path"], "r+b") as fh:
        fh.write(CHANGE)

    up = cli.ok("volume", "upload", volume["id"], "--name", "golden", "--private", *common,
                "--json").json()

    assert up["cached"] is True and up["os_hash_value"] == _sha512(Path(volume["path"]))
    image = glance.get(glance.identity(project), up["image_id"])
    assert image["owner"] == project and image["visibility"] == "private"
    assert image["status"] == "active"
    made = cli.ok("volume", "create", "--image", up["image_id"], "--size", "1", *common,
                  "--json").json()
    assert made["outcome"] == "hit"
    cli.fails("volume", "upload", volume["id"], "--name", "stolen", "--config", str(config),
              "--project", "someone-else")

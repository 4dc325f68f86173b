"""Real images through the CLI, as a new user meets them: a qcow2 made with qemu-img
becomes a volume holding its disk; every bad image is one line, exit 1, and leaves nothing
(no image, no entry, no volume, no scratch file)."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.support.glance_server import GlanceServer
from tests.support.images import DISK_BYTES, MIB, make_images, qemu_img, write_known_disk
from tests.support.mounts import tmpfs

pytestmark = pytest.mark.qcow2


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not found: apt-get install -y qemu-utils")
    return {name: made.path for name, made in
            make_images(tmp_path_factory.mktemp("images")).items()}


def volume_bytes(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def assert_nothing_left(cli: Cli) -> None:
    assert cli.ok("volume", "list", "--all", "--admin", "--json").json() == []
    assert cli.ok("cache", "--admin", "list", "--json").json() == []
    scratch = cli.home / "conversion"
    assert not scratch.exists() or list(scratch.iterdir()) == []


def test_a_qcow2_made_with_qemu_img_becomes_a_volume_that_holds_its_disk(
        cli: Cli, tmp_path: Path) -> None:
    disk = write_known_disk(tmp_path / "disk.raw")
    qcow2 = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(disk), str(qcow2))

    image = cli.ok("image", "add", str(qcow2), "--json").json()
    assert (image["disk_format"], image["container_format"]) == ("qcow2", "bare")
    assert image["virtual_size"] == DISK_BYTES and image["size"] == qcow2.stat().st_size
    [listed] = cli.ok("image", "list", "--json").json()
    assert {k: listed[k] for k in ("disk_format", "container_format", "virtual_size")} == {
        "disk_format": "qcow2", "container_format": "bare", "virtual_size": DISK_BYTES}

    miss = cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--json").json()
    hit = cli.ok("volume", "create", "--image", image["id"], "--size", "2", "--json").json()

    assert (miss["outcome"], hit["outcome"]) == ("miss", "hit")
    for volume in (miss, hit):
        # The disk's bytes, not the qcow2 container: no `QFI\xfb` at the start.
        assert volume_bytes(volume["path"], 0, DISK_BYTES) == disk.read_bytes()
        assert volume_bytes(volume["path"], DISK_BYTES, MIB) == bytes(MIB)
    assert cli.ok("cache", "--admin", "stats", "--json").json()["downloads"] == 1
    assert not (cli.home / "conversion").exists()  # a local file needs no scratch copy


def test_a_gzip_compressed_qcow2_is_taken_once_compression_is_allowed(
        cli: Cli, images: dict[str, Path], tmp_path: Path) -> None:
    reference = tmp_path / "reference.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(images["qcow2"]), str(reference))
    image = cli.ok("image", "add", str(images["qcow2-gzip"]), "--container-format",
                   "compressed", "--json").json()
    assert (image["disk_format"], image["virtual_size"]) == ("qcow2", DISK_BYTES)

    run = cli.fails("volume", "create", "--image", image["id"], "--size", "1")
    assert "allow_compression_on_image_upload = true" in run.err
    assert_nothing_left(cli)

    # A config file in IVCACHE_HOME: its relative defaults name the same places.
    config = cli.home / "gzip.ini"
    config.write_text("[DEFAULT]\nallow_compression_on_image_upload = true\n")
    made = cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--json",
                  "--config", str(config)).json()
    assert volume_bytes(made["path"], 0, DISK_BYTES) == reference.read_bytes()
    assert list((cli.home / "conversion").iterdir()) == []


@pytest.mark.parametrize(("name", "options", "says"), [
    ("qcow2-backing-file", [], "Image has a backing file"),
    ("qcow2-data-file", [], "Image has data_file set"),
    ("vmdk-flat-extent", [], "create-type monolithicflat"),
    ("qcow2", ["--disk-format", "raw"], "claims to be raw but its data is qcow2"),
    ("raw", ["--disk-format", "qcow2"], "claims to be qcow2 but its data is raw"),
    ("qed", [], "qed images are never accepted"),
])
def test_image_add_refuses_a_bad_image_in_one_line_and_keeps_nothing(
        cli: Cli, images: dict[str, Path], name: str, options: list[str], says: str) -> None:
    run = cli.fails("image", "add", str(images[name]), *options)

    assert says in run.err
    assert cli.ok("image", "list", "--json").json() == []
    data = cli.home / "images" / "data"
    assert not data.exists() or list(data.iterdir()) == []


def test_a_truncated_qcow2_is_taken_by_image_add_but_no_volume_is_made_from_it(
        cli: Cli, images: dict[str, Path]) -> None:
    image = cli.ok("image", "add", str(images["qcow2-truncated"]), "--json").json()

    run = cli.fails("volume", "create", "--image", image["id"], "--size", "1")

    assert "corrupt" in run.err
    assert_nothing_left(cli)


def test_a_qcow2_larger_than_the_size_asked_is_refused_and_nothing_is_made(
        cli: Cli, tmp_path: Path) -> None:
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(big), str(3 << 30))
    image = cli.ok("image", "add", str(big), "--json").json()
    assert image["virtual_size"] == 3 << 30

    run = cli.fails("volume", "create", "--image", image["id"], "--size", "1")

    assert "size 1 GiB is too small" in run.err and "3 GiB" in run.err
    assert_nothing_left(cli)


@pytest.mark.parametrize("virtual", [2**63, 2**64 - 1])
def test_a_qcow2_whose_header_declares_a_huge_disk_is_one_line_and_nothing_is_made(
        cli: Cli, tmp_path: Path, virtual: int) -> None:
    # qemu-img refuses to make such a disk: its header's size field (bytes 24..32) is set.
    huge = tmp_path / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(huge), str(64 * MIB))
    with open(huge, "r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", virtual))
    image = cli.ok("image", "add", str(huge), "--json").json()
    assert image["virtual_size"] == virtual

    create = cli.fails("volume", "create", "--image", image["id"], "--size", "1")
    warm = cli.fails("cache", "warm", "--admin", image["id"])  # no size asked: only the disk's

    assert "size 1 GiB is too small" in create.err
    assert "larger than any volume can be" in warm.err
    assert_nothing_left(cli)


@pytest.fixture
def tiny_scratch(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs for image_conversion_dir."""
    with tmpfs(tmp_path / "tiny") as mount:
        yield mount


def test_a_scratch_directory_too_small_for_the_image_is_one_line_and_nothing_is_left(
        cli: Cli, tiny_scratch: Path, tmp_path: Path) -> None:
    # A compressed image must be spooled (its file is gzip, not the disk): 24 MiB of random
    # data do not fit a 16 MiB scratch filesystem.
    raw = tmp_path / "random.raw"
    raw.write_bytes(os.urandom(24 * MIB))
    qcow2 = tmp_path / "random.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    packed = tmp_path / "random.qcow2.gz"
    with open(qcow2, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst)
    config = cli.home / "tiny.ini"
    config.write_text("[DEFAULT]\nallow_compression_on_image_upload = true\n"
                      f"image_conversion_dir = {tiny_scratch}\n")
    env = {"IVCACHE_CONFIG": str(config)}
    image = cli.ok("image", "add", str(packed), "--container-format", "compressed",
                   "--json", env=env).json()

    run = cli.fails("volume", "create", "--image", image["id"], "--size", "1", env=env)

    assert f"image_conversion_dir {tiny_scratch} has" in run.err
    assert "too little for image" in run.err
    assert cli.ok("volume", "list", "--all", "--admin", "--json", env=env).json() == []
    assert cli.ok("cache", "--admin", "list", "--json", env=env).json() == []
    assert list(tiny_scratch.iterdir()) == []


def test_reconcile_reports_a_dead_conversions_scratch_file_and_fix_removes_it(
        cli: Cli) -> None:
    scratch = cli.home / "conversion"
    scratch.mkdir()
    code = ("import os, sys; from pathlib import Path; "
            "from ivcache.adapters.storage._files import open_temp; "
            "p, fd = open_temp(Path(sys.argv[1]), '.spool'); os.ftruncate(fd, 4096); print(p)")
    left = subprocess.run([sys.executable, "-c", code, str(scratch)], capture_output=True,
                          text=True, check=True).stdout.strip()

    found = cli.ok("cache", "--admin", "reconcile", "--json").json()
    assert [(f["kind"], f["path"], f["size"], f["fixed"]) for f in found] == [
        ("scratch-file", left, 4096, False)]
    fixed = cli.ok("cache", "--admin", "reconcile", "--fix", "--json").json()
    assert [(f["kind"], f["fixed"]) for f in fixed] == [("scratch-file", True)]
    assert list(scratch.iterdir()) == []


# ------------------------------------------------------------------ from a real Glance

def _glance_config(cli: Cli, glance: GlanceServer) -> str:
    path = cli.home / "glance.ini"
    path.write_text(f"[ivcache]\nimage_source = glance\n[glance]\nurl = {glance.url}\n"
                    "auth = trusted-headers\n")
    return str(path)


@pytest.mark.glance
def test_a_qcow2_from_glance_becomes_its_disk_and_a_raw_declared_one_is_refused(
        cli: Cli, glance: GlanceServer, images: dict[str, Path], tmp_path: Path) -> None:
    project = f"alice-{uuid.uuid4().hex[:8]}"
    who = GlanceServer.identity(project)
    data = images["qcow2-compressed"].read_bytes()
    good = glance.create_image(who, data, name="cloud", disk_format="qcow2")
    lying = glance.create_image(who, data, name="lying", disk_format="raw")
    config = _glance_config(cli, glance)
    reference = tmp_path / "reference.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(images["qcow2-compressed"]),
             str(reference))

    run = cli.fails("--config", config, "volume", "create", "--image", lying, "--size", "1",
                    "--project", project)
    assert f"image {lying} claims to be raw but its data is qcow2" in run.err
    assert cli.ok("--config", config, "volume", "list", "--all", "--admin",
                  "--json").json() == []
    assert cli.ok("--config", config, "cache", "--admin", "list", "--json").json() == []

    made = cli.ok("--config", config, "volume", "create", "--image", good, "--size", "1",
                  "--project", project, "--json").json()
    assert made["outcome"] == "miss"
    assert volume_bytes(made["path"], 0, DISK_BYTES) == reference.read_bytes()
    assert list((cli.home / "conversion").iterdir()) == []  # the spooled download is gone

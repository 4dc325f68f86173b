"""What is particular to qcow2 storage: real overlays that qemu-img itself inspects."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ivcache.adapters.memory import InMemoryImageSource, InMemoryUnitOfWork, RecordingNotifier
from ivcache.adapters.storage import Qcow2Storage
from ivcache.core.errors import NoSpace, StorageError, VolumeNotFound
from ivcache.core.model import GIB
from ivcache.core.service import CacheService

pytestmark = pytest.mark.qcow2

MIB = 1024**2


def info(path: str | Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def check_clean(storage: Qcow2Storage) -> None:
    for path in sorted(storage.files_dir.glob("*.qcow2")):
        done = subprocess.run(["qemu-img", "check", "-q", str(path)], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, f"qemu-img check {path.name}: {done.stdout}{done.stderr}"


def identical(image: Path, volume: str) -> bool:
    """``qemu-img compare``: the same guest-visible bytes (a larger volume's rest is zeros)."""
    done = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", str(image), volume],
                          capture_output=True, text=True, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def image_bytes(size: int, seed: int) -> bytes:
    data = bytearray(random.Random(seed).randbytes(size))
    data[size // 2:size // 2 + 2 * MIB] = bytes(2 * MIB)  # a hole in the middle
    return bytes(data)


def data_files(storage: Qcow2Storage) -> list[str]:
    return sorted(name for name in os.listdir(storage.files_dir) if not name.startswith("."))


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Qcow2Storage]:
    made = Qcow2Storage(tmp_path / "vols", host="node-1")
    yield made
    check_clean(made)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.raw"
    path.write_bytes(image_bytes(6 * MIB + 300, seed=1))
    return path


def test_a_clone_is_a_qcow2_overlay_with_an_absolute_backing_path_and_format(
        storage: Qcow2Storage, image: Path) -> None:
    base = storage.create_volume("base", 1, "internal")
    storage.write_image("base", [image.read_bytes()])

    clone = storage.clone_volume("base", "user", 3, "alice")

    overlay = info(clone.location)
    assert clone.location_kind == "path" and os.path.isabs(clone.location)
    assert overlay["format"] == "qcow2"
    assert overlay["virtual-size"] == 3 * GIB
    assert overlay["backing-filename"] == base.location
    assert os.path.isabs(overlay["backing-filename"])
    assert overlay["backing-filename-format"] == "raw"
    assert info(base.location)["format"] == "raw"
    assert os.stat(clone.location).st_blocks * 512 < MIB  # metadata only: nothing copied
    assert identical(image, clone.location)


def test_later_clones_of_a_base_are_the_same_overlay_qemu_img_makes(
        storage: Qcow2Storage, image: Path) -> None:
    base = storage.create_volume("base", 1, "internal")
    storage.write_image("base", [image.read_bytes()])
    first = storage.clone_volume("base", "one", 2, "alice")

    second = storage.clone_volume("base", "two", 2, "bob")
    third = storage.clone_volume("base", "three", 3, "bob")

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.location, "-F",
                    "raw", str(storage.root / "direct.qcow2"), str(2 * GIB)], check=True)
    direct = (storage.root / "direct.qcow2").read_bytes()
    assert Path(first.location).read_bytes() == direct
    assert Path(second.location).read_bytes() == direct
    assert info(third.location)["virtual-size"] == 3 * GIB
    storage.write_image("two", [b"\x09" * MIB])
    assert identical(image, first.location) and identical(image, third.location)
    assert storage.read("two", 0, 4) == b"\x09" * 4


def test_a_clone_reads_right_from_another_directory(storage: Qcow2Storage, image: Path,
                                                    tmp_path: Path) -> None:
    storage.create_volume("base", 1, "internal")
    storage.write_image("base", [image.read_bytes()])
    clone = storage.clone_volume("base", "user", 1, "alice")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # A relative backing path would be resolved from here and fail.
    done = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", str(image),
                           clone.location], cwd=elsewhere, check=False)

    assert done.returncode == 0


def test_a_base_with_overlays_is_hidden_on_delete_and_removed_with_its_last_overlay(
        storage: Qcow2Storage, image: Path) -> None:
    base = storage.create_volume("base", 1, "internal")
    storage.write_image("base", [image.read_bytes()])
    one = storage.clone_volume("base", "one", 1, "alice")
    two = storage.clone_volume("base", "two", 2, "bob")

    storage.delete_volume("base")

    assert [v.id for v in storage.list_volumes()] == ["one", "two"]
    with pytest.raises(VolumeNotFound):
        storage.get_volume("base")
    with pytest.raises(VolumeNotFound):
        storage.delete_volume("base")
    assert os.path.exists(base.location)
    assert identical(image, one.location) and identical(image, two.location)

    storage.delete_volume("one")
    assert os.path.exists(base.location)
    assert identical(image, two.location)

    storage.delete_volume("two")
    assert not os.path.exists(base.location)
    assert data_files(storage) == []
    assert os.listdir(storage.files_dir) == []  # the overlay templates went with the base


def test_a_hidden_base_outlives_the_process_and_goes_when_another_deletes_its_overlay(
        tmp_path: Path, image: Path) -> None:
    first = Qcow2Storage(tmp_path / "vols")
    base = first.create_volume("base", 1, "internal")
    first.write_image("base", [image.read_bytes()])
    first.clone_volume("base", "user", 1, "alice")
    first.delete_volume("base")

    second = Qcow2Storage(tmp_path / "vols")

    assert [v.id for v in second.list_volumes()] == ["user"]
    assert identical(image, second.get_volume("user").location)
    second.delete_volume("user")
    assert not os.path.exists(base.location)
    assert first.list_volumes() == []


def test_writing_a_base_with_overlays_moves_it_onto_its_own_overlay_and_spares_the_clones(
        storage: Qcow2Storage, image: Path) -> None:
    before = storage.create_volume("base", 1, "internal")
    storage.write_image("base", [image.read_bytes()])
    clone = storage.clone_volume("base", "user", 1, "alice")

    storage.write_image("base", [b"\x07" * MIB])

    after = storage.get_volume("base")
    assert after.location != before.location
    assert info(after.location)["backing-filename"] == before.location
    assert identical(image, clone.location)
    assert storage.read("base", 0, MIB + 10) == b"\x07" * MIB + image.read_bytes()[MIB:MIB + 10]


def test_extend_resizes_the_overlay_and_keeps_its_bytes(storage: Qcow2Storage,
                                                        image: Path) -> None:
    storage.create_volume("base", 1, "internal")
    storage.write_image("base", [image.read_bytes()])
    clone = storage.clone_volume("base", "user", 1, "alice")

    extended = storage.extend_volume("user", 5)

    assert extended.location == clone.location
    assert info(clone.location)["virtual-size"] == 5 * GIB
    assert identical(image, clone.location)
    assert storage.read("user", 5 * GIB - MIB, MIB) == bytes(MIB)


def test_extending_a_base_with_overlays_leaves_the_overlays_as_they_were(
        storage: Qcow2Storage, image: Path) -> None:
    base = storage.create_volume("base", 1, "internal")
    storage.write_image("base", [image.read_bytes()])
    clone = storage.clone_volume("base", "user", 1, "alice")

    storage.extend_volume("base", 2)

    assert os.stat(base.location).st_size == GIB
    assert info(storage.get_volume("base").location)["virtual-size"] == 2 * GIB
    assert info(clone.location)["virtual-size"] == GIB
    assert identical(image, clone.location)


def test_a_raw_volume_is_extended_in_place(storage: Qcow2Storage) -> None:
    volume = storage.create_volume("v1", 1, "alice")

    storage.extend_volume("v1", 4)

    assert storage.get_volume("v1").location == volume.location
    assert info(volume.location)["virtual-size"] == 4 * GIB


def test_an_image_written_into_a_raw_volume_keeps_its_holes(storage: Qcow2Storage) -> None:
    volume = storage.create_volume("v1", 1, "alice")

    storage.write_image("v1", [b"\x01" * MIB, bytes(200 * MIB), b"\x02" * MIB])

    assert os.stat(volume.location).st_blocks * 512 < 8 * MIB
    assert storage.read("v1", 201 * MIB, 4) == b"\x02" * 4


def test_an_image_written_into_an_overlay_matches_it_byte_for_byte(
        storage: Qcow2Storage, tmp_path: Path) -> None:
    storage.create_volume("base", 1, "internal")
    storage.write_image("base", [b"\x01" * (8 * MIB)])
    clone = storage.clone_volume("base", "user", 1, "alice")
    new = tmp_path / "new.raw"
    new.write_bytes(image_bytes(8 * MIB, seed=2))

    storage.write_image("user", [new.read_bytes()])

    assert identical(new, clone.location)
    assert info(clone.location)["backing-filename"] == storage.files_dir.joinpath(
        data_files(storage)[0]).as_posix()


def test_a_chain_deeper_than_the_limit_is_flattened_and_still_reads_right(
        tmp_path: Path, image: Path) -> None:
    storage = Qcow2Storage(tmp_path / "vols", max_chain_depth=2)
    storage.create_volume("v0", 1, "internal")
    storage.write_image("v0", [image.read_bytes()])
    for n in range(1, 4):
        storage.clone_volume(f"v{n - 1}", f"v{n}", 1, "alice")

    chain = info(storage.get_volume("v2").location)
    flat = info(storage.get_volume("v3").location)

    assert "backing-filename" in chain
    assert "backing-filename" not in flat
    for n in range(3):
        storage.delete_volume(f"v{n}")
    assert identical(image, storage.get_volume("v3").location)
    assert len(data_files(storage)) == 1
    check_clean(storage)


def test_files_left_by_a_crashed_process_are_reported_and_removed_by_the_next_change(
        tmp_path: Path) -> None:
    storage = Qcow2Storage(tmp_path / "vols")
    storage.create_volume("keep", 1, "alice")
    stray_tmp = storage.files_dir / ".tmp-999999999-abc.raw"  # no such pid
    stray_tmp.write_bytes(b"x")
    orphan = storage.files_dir / "gone.0123456789ab.qcow2"  # deleted from the index only
    orphan.write_bytes(b"x")
    template = storage.files_dir / ".tpl-gone.0123456789ab.qcow2-1.qcow2"
    template.write_bytes(b"x")

    again = Qcow2Storage(tmp_path / "vols")
    assert again.leftovers(remove=False) == [
        ("partial-volume", str(stray_tmp), os.stat(stray_tmp).st_blocks * 512),
        ("index-damage", str(template), os.stat(template).st_blocks * 512),
        ("index-damage", str(orphan), os.stat(orphan).st_blocks * 512)]
    again.create_volume("next", 1, "bob")

    assert not stray_tmp.exists() and not orphan.exists() and not template.exists()
    assert [v.id for v in storage.list_volumes()] == ["keep", "next"]


def test_a_crash_mid_save_of_the_index_leaves_nothing_after_the_next_change(
        storage: Qcow2Storage) -> None:
    storage.create_volume("keep", 1, "alice")
    crash = ("import os, sys\n"
             "from ivcache.adapters.storage import Qcow2Storage\n"
             "storage = Qcow2Storage(sys.argv[1])\n"
             "os.replace = lambda *args: os._exit(9)  # dies before the index is renamed\n"
             "storage.create_volume('lost', 1, 'bob')\n")
    died = subprocess.Popen([sys.executable, "-c", crash, str(storage.root)])
    assert died.wait() == 9
    left = [n for n in os.listdir(storage.root) if n.startswith(".tmp-")]
    assert len(left) == 1 and left[0].startswith(f".tmp-{died.pid}.")  # pid.start time

    storage.create_volume("next", 1, "carol")

    assert not [n for n in os.listdir(storage.root) if n.startswith(".tmp-")]
    assert [v.id for v in storage.list_volumes()] == ["keep", "next"]
    indexed = json.loads((storage.root / "index.json").read_text())["files"]
    assert data_files(storage) == sorted(indexed)


def test_a_missing_qemu_img_says_to_install_qemu_utils(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="install qemu-utils") as caught:
        Qcow2Storage(tmp_path / "vols", qemu_img="qemu-img-that-is-not-there")

    assert "\n" not in str(caught.value)
    assert not (tmp_path / "vols").exists()


def test_a_corrupt_index_raises_a_storage_error(storage: Qcow2Storage) -> None:
    (storage.root / "index.json").write_text("{not json")

    with pytest.raises(StorageError, match="corrupt"):
        storage.list_volumes()
    (storage.root / "index.json").unlink()


def test_a_full_filesystem_while_writing_an_overlay_raises_no_space_and_leaves_no_temp(
        small_fs: Path) -> None:
    storage = Qcow2Storage(small_fs / "vols")
    storage.create_volume("base", 1, "internal")
    storage.write_image("base", [b"\x01" * MIB])
    storage.clone_volume("base", "user", 1, "alice")

    with pytest.raises(NoSpace, match="full"):
        storage.write_image("user", [b"\x02" * MIB] * 20)

    assert not [n for n in os.listdir(storage.files_dir) if n.startswith(".tmp-")]
    assert storage.read("user", 0, 4) == b"\x01" * 4
    check_clean(storage)


def _fill_up(directory: Path) -> Path:
    """Write a file in ``directory`` until its filesystem has no room left at all."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\xff" * 4096)
    finally:
        os.close(fd)
    with pytest.raises(OSError):  # not even one more block
        (directory / "probe").write_bytes(b"\xff" * 4096)
    return filler


def test_deleting_on_a_full_filesystem_works_and_frees_the_volumes_room(
        small_fs: Path) -> None:
    storage = Qcow2Storage(small_fs / "vols")
    storage.create_volume("base", 1, "internal")
    storage.write_image("base", [b"\x01" * MIB] * 2)
    storage.clone_volume("base", "user", 1, "alice")  # base backs it: deleting base hides it
    storage.create_volume("empty", 1, "alice")  # sparse: deleting it frees no data block
    storage.create_volume("data", 1, "alice")
    storage.write_image("data", [b"\x03" * MIB] * 2)
    _fill_up(small_fs)

    for volume_id in ("empty", "base", "data", "user"):
        storage.delete_volume(volume_id)
        assert volume_id not in {v.id for v in storage.list_volumes()}

    assert storage.list_volumes() == []
    assert data_files(storage) == []
    # The room is back: a new volume can be made and written.
    (small_fs / "filler").unlink()
    storage.create_volume("again", 1, "alice")
    storage.write_image("again", [b"\x04" * MIB])
    assert storage.read("again", 0, 4) == b"\x04" * 4


def test_reconcile_fixes_an_orphan_on_a_full_filesystem(small_fs: Path) -> None:
    storage = Qcow2Storage(small_fs / "vols")
    service = CacheService(host="node-1", storage=storage, images=InMemoryImageSource(),
                           uow=InMemoryUnitOfWork(), notifier=RecordingNotifier())
    # A cache volume no entry owns: what a crash between an eviction and its delete leaves.
    storage.create_volume("orphan", 1, service.tenant.project_id)
    storage.write_image("orphan", [b"\x05" * MIB])
    _fill_up(small_fs)

    found = service.reconcile(fix=True)

    assert [(f.kind, f.volume_id, f.fixed) for f in found] == [
        ("orphan-cache-volume", "orphan", True)]
    assert storage.list_volumes() == []
    assert service.reconcile(fix=True) == []

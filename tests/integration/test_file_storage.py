"""What is particular to real file storage: holes, clone methods, atomicity, full disks."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.memory import InMemoryUnitOfWork, RecordingNotifier
from ivcache.adapters.storage import FileStorage
from ivcache.adapters.storage import file as file_module
from ivcache.core.errors import NoSpace, StorageError
from ivcache.core.model import GIB, Outcome, RequestContext
from ivcache.core.service import CacheService
from tests.integration.conftest import need_root_to_mount

MIB = 1024**2
PATTERN = bytes(range(256)) * 4096  # 1 MiB, no zero run long enough to be a hole


def allocated(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


def read(path: str | Path, length: int, offset: int = 0) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def sparse_image() -> list[bytes]:
    """3 MiB of data spread over 203 MiB, the rest zeros: what a raw image looks like."""
    return [PATTERN, bytes(100 * MIB), PATTERN, bytes(100 * MIB), PATTERN[:-7]]


def files_in(root: Path) -> list[str]:
    return sorted(os.listdir(root))


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "vols", host="node-1")


def test_a_sparse_volume_keeps_its_holes_after_an_image_is_written(storage: FileStorage) -> None:
    volume = storage.create_volume("v1", 1, "alice")
    assert os.stat(volume.location).st_size == GIB

    storage.write_image("v1", sparse_image())

    assert os.stat(volume.location).st_size == GIB
    assert allocated(volume.location) < 8 * MIB
    assert read(volume.location, MIB, 101 * MIB) == PATTERN


def test_a_clone_keeps_the_bytes_and_the_holes_of_its_source(storage: FileStorage) -> None:
    storage.create_volume("src", 1, "internal")
    storage.write_image("src", sparse_image())

    clone = storage.clone_volume("src", "dst", 2, "alice")

    assert storage.last_clone_method in ("reflink", "copy_file_range", "copy")
    assert os.stat(clone.location).st_size == 2 * GIB
    assert allocated(clone.location) < 8 * MIB
    source = storage.get_volume("src").location
    for offset in (0, 101 * MIB, 202 * MIB):
        assert read(clone.location, MIB, offset) == read(source, MIB, offset)


def test_a_clone_falls_back_to_read_and_write_when_copy_file_range_is_refused(
        storage: FileStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    storage.create_volume("src", 1, "internal")
    storage.write_image("src", sparse_image())

    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)

    clone = storage.clone_volume("src", "dst", 1, "alice")

    assert storage.last_clone_method in ("reflink", "copy")
    assert allocated(clone.location) < 8 * MIB
    assert read(clone.location, MIB, 202 * MIB) == PATTERN[:-7] + bytes(7)


def test_a_clone_finishes_by_read_and_write_when_copy_file_range_stops_short(
        storage: FileStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    storage.create_volume("src", 1, "internal")
    storage.write_image("src", sparse_image())
    real = os.copy_file_range
    calls = []

    def copy_once(src: int, dst: int, count: int, offset_src: int | None = None,
                  offset_dst: int | None = None) -> int:
        calls.append(count)
        return real(src, dst, min(count, 4096), offset_src, offset_dst) if len(calls) == 1 else 0

    monkeypatch.setattr(os, "copy_file_range", copy_once)
    monkeypatch.setattr(file_module, "FICLONE", 0)  # no such ioctl: as on ext4

    clone = storage.clone_volume("src", "dst", 1, "alice")

    assert storage.last_clone_method == "copy"
    source = storage.get_volume("src").location
    for offset in (0, 101 * MIB, 202 * MIB):
        assert read(clone.location, MIB, offset) == read(source, MIB, offset)


def test_an_image_of_zeros_over_old_data_replaces_it(storage: FileStorage) -> None:
    volume = storage.create_volume("v1", 1, "alice")
    storage.write_image("v1", [PATTERN * 3])

    storage.write_image("v1", [bytes(2 * MIB)])

    assert read(volume.location, 3 * MIB) == bytes(2 * MIB) + PATTERN


def test_making_volumes_leaves_no_temp_files_even_when_it_fails(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "vols", capacity_gb=3)
    storage.create_volume("a", 1, "alice")
    storage.write_image("a", [PATTERN])
    storage.clone_volume("a", "b", 1, "alice")

    with pytest.raises(NoSpace):
        storage.clone_volume("a", "c", 2, "alice")
    with pytest.raises(NoSpace):
        storage.create_volume("c", 2, "alice")
    with pytest.raises(StorageError):
        storage.create_volume("a", 1, "alice")

    assert files_in(tmp_path / "vols") == [".lock", "a.json", "a.raw", "b.json", "b.raw"]


def test_a_clone_that_fails_midway_leaves_no_file_behind(
        storage: FileStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    storage.create_volume("src", 1, "internal")
    storage.write_image("src", [PATTERN])

    def disk_full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_module, "FICLONE", 0)  # no such ioctl: as on ext4
    monkeypatch.setattr(os, "copy_file_range", disk_full)
    monkeypatch.setattr(os, "pwrite", disk_full)

    with pytest.raises(NoSpace, match="full"):
        storage.clone_volume("src", "dst", 1, "alice")

    assert [v.id for v in storage.list_volumes()] == ["src"]
    assert files_in(storage.root) == [".lock", "src.json", "src.raw"]


def test_a_full_filesystem_while_writing_an_image_raises_no_space(
        storage: FileStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    storage.create_volume("v1", 1, "alice")

    def disk_full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)

    with pytest.raises(NoSpace, match="full"):
        storage.write_image("v1", [PATTERN])


def test_what_a_crashed_process_left_is_invisible_reported_and_cleared_by_the_next_create(
        tmp_path: Path) -> None:
    root = tmp_path / "vols"
    FileStorage(root).create_volume("kept", 1, "alice")
    exited = subprocess.Popen(["true"])
    exited.wait()
    leftover = root / f".tmp-{exited.pid}-abcdef.raw"
    leftover.write_bytes(b"half a volume")
    # No temp sidecar vouches for it: it may be an operator's file, so it is left alone.
    (root / "half.raw").write_bytes(b"renamed, but its sidecar never written")

    storage = FileStorage(root)

    assert [v.id for v in storage.list_volumes()] == ["kept"]
    assert storage.leftovers(remove=False) == [
        ("partial-volume", str(leftover), allocated(leftover))]
    storage.create_volume("half", 1, "bob")
    assert not leftover.exists()
    assert read(storage.get_volume("half").location, 4) == bytes(4)


def start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks after boot."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def test_a_temp_file_goes_once_its_maker_is_gone_even_if_another_process_has_its_pid(
        tmp_path: Path) -> None:
    root = tmp_path / "vols"
    root.mkdir()
    pid, started = os.getpid(), start_time(os.getpid())
    ours = root / f".tmp-{pid}.{started}-abcdef.raw"
    earlier = root / f".tmp-{pid}.{started - 1}-abcdef.raw"  # made by a process now gone
    ours.write_bytes(b"being made")
    earlier.write_bytes(b"left behind")

    FileStorage(root).leftovers(remove=True)

    assert ours.exists()
    assert not earlier.exists()


def test_a_temp_file_of_a_process_that_exited_but_was_not_waited_for_goes(
        tmp_path: Path) -> None:
    root = tmp_path / "vols"
    root.mkdir()
    zombie = subprocess.Popen(["true"])
    try:
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        leftover = root / f".tmp-{zombie.pid}.{start_time(zombie.pid)}-abcdef.raw"
        leftover.write_bytes(b"never finished")

        FileStorage(root).leftovers(remove=True)

        assert not leftover.exists()
    finally:
        zombie.wait()


def test_ownership_and_data_persist_across_instances(tmp_path: Path) -> None:
    FileStorage(tmp_path / "vols").create_volume("v1", 2, "alice")
    FileStorage(tmp_path / "vols").write_image("v1", [PATTERN])

    again = FileStorage(tmp_path / "vols", host="node-2")

    volume = again.get_volume("v1")
    assert (volume.size_gb, volume.owner, volume.host) == (2, "alice", "node-2")
    assert volume.location == str(tmp_path / "vols" / "v1.raw")
    assert read(volume.location, MIB) == PATTERN


def test_the_location_is_the_absolute_path_of_the_data_file(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            ) -> None:
    monkeypatch.chdir(tmp_path)
    volume = FileStorage(Path("vols")).create_volume("v1", 1, "alice")

    assert volume.location == str(tmp_path / "vols" / "v1.raw")
    assert volume.location_kind == "path"


def test_an_extend_beyond_the_capacity_raises_no_space_and_keeps_the_size(
        tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "vols", capacity_gb=3)
    volume = storage.create_volume("v1", 2, "alice")

    with pytest.raises(NoSpace, match="1 GiB free"):
        storage.extend_volume("v1", 4)

    assert storage.get_volume("v1").size_gb == 2
    assert os.stat(volume.location).st_size == 2 * GIB
    storage.extend_volume("v1", 3)
    assert os.stat(volume.location).st_size == 3 * GIB


def test_a_clone_under_way_holds_its_room_against_other_creators(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FileStorage(tmp_path / "vols", capacity_gb=3)
    storage.create_volume("src", 1, "internal")
    copying, release = threading.Event(), threading.Event()
    real_clone = file_module._clone_file

    def slow_clone(src_fd: int, dst_fd: int) -> file_module.CloneMethod:
        copying.set()
        release.wait(10)
        return real_clone(src_fd, dst_fd)

    monkeypatch.setattr(file_module, "_clone_file", slow_clone)
    clone = threading.Thread(target=storage.clone_volume, args=("src", "dst", 2, "alice"))
    clone.start()
    try:
        assert copying.wait(10)
        with pytest.raises(NoSpace):
            storage.create_volume("other", 1, "bob")
    finally:
        release.set()
        clone.join()
    assert [v.id for v in storage.list_volumes()] == ["dst", "src"]


def test_a_sidecar_that_is_not_json_raises_a_storage_error(storage: FileStorage) -> None:
    storage.create_volume("v1", 1, "alice")
    (storage.root / "v1.json").write_text("{not json")

    with pytest.raises(StorageError, match="corrupt"):
        storage.get_volume("v1")


def test_files_that_are_not_volumes_are_not_listed(storage: FileStorage) -> None:
    storage.create_volume("v1", 1, "alice")
    (storage.root / "-notes.json").write_text("{}")
    (storage.root / "orphan.raw").write_bytes(b"")

    assert [v.id for v in storage.list_volumes()] == ["v1"]


def test_a_filesystem_that_fills_up_raises_no_space_and_a_failed_clone_leaves_nothing(
        small_fs: Path) -> None:
    storage = FileStorage(small_fs / "vols")
    storage.create_volume("src", 1, "internal")
    storage.write_image("src", [PATTERN] * 10)

    with pytest.raises(NoSpace, match="full"):
        storage.clone_volume("src", "dst", 1, "alice")
    assert files_in(storage.root) == [".lock", "src.json", "src.raw"]
    storage.create_volume("v2", 1, "alice")
    with pytest.raises(NoSpace, match="full"):
        storage.write_image("v2", [PATTERN] * 10)


@contextlib.contextmanager
def loop_mounted(image: Path, mount: Path, mkfs: list[str], size: int) -> Iterator[Path]:
    """Make a filesystem in the file ``image`` and mount it at ``mount`` through a loop
    device; unmount and detach that device (by name) at the end."""
    need_root_to_mount()
    if shutil.which(mkfs[0]) is None:
        pytest.fail(f"{mkfs[0]} not found: apt-get install -y xfsprogs e2fsprogs")
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", device, str(mount)], check=True)
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.fixture(scope="session")
def xfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One 2 GiB loop-mounted XFS with reflink for the session: root, Debian ``xfsprogs``."""
    base = tmp_path_factory.mktemp("xfs")
    with loop_mounted(base / "xfs.img", base / "mnt",
                      ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], 2 * GIB) as mount:
        yield mount


@pytest.fixture
def xfs(xfs_mount: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the session's XFS, emptied after the test."""
    directory = xfs_mount / request.node.name.replace("/", "_")[:100]
    directory.mkdir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def used_bytes(path: Path) -> int:
    os.sync()  # count delayed allocations too
    stats = os.statvfs(path)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


@pytest.mark.reflink
def test_a_clone_on_xfs_is_a_reflink_that_shares_the_sources_blocks(xfs: Path) -> None:
    storage = FileStorage(xfs / "vols")
    storage.create_volume("src", 1, "internal")
    storage.write_image("src", [PATTERN * 64])
    used_before = used_bytes(xfs)

    clone = storage.clone_volume("src", "dst", 2, "alice")

    assert storage.last_clone_method == "reflink"
    assert os.stat(clone.location).st_size == 2 * GIB
    assert read(clone.location, 64 * MIB) == PATTERN * 64
    assert used_bytes(xfs) - used_before < 16 * MIB
    storage.write_image("dst", [b"\xee" * MIB])
    assert read(storage.get_volume("src").location, MIB) == PATTERN


@pytest.mark.reflink
def test_ten_cache_hits_of_a_256_mib_image_on_xfs_share_the_cached_blocks(
        xfs: Path, tmp_path: Path) -> None:
    ctx = RequestContext.for_project("alice")
    raw = tmp_path / "image.raw"
    with open(raw, "wb") as f:
        for n in range(256):
            f.write(bytes([n]) + PATTERN[1:])  # 256 MiB of data, no hole
    images = LocalImageSource(tmp_path / "images")
    image = images.add_image(ctx, raw)
    storage = FileStorage(xfs / "vols", host="node-1")
    service = CacheService(host="node-1", storage=storage, images=images,
                           uow=InMemoryUnitOfWork(), notifier=RecordingNotifier())
    used_empty = used_bytes(xfs)
    assert service.create_volume(ctx, image.id, 1).outcome is Outcome.MISS
    used_before = used_bytes(xfs)
    assert used_before - used_empty > 250 * MIB  # the measure sees the cached copy

    hits = [service.create_volume(ctx, image.id, 1) for _ in range(10)]

    assert [hit.outcome for hit in hits] == [Outcome.HIT] * 10
    assert storage.last_clone_method == "reflink"
    assert used_bytes(xfs) - used_before < 16 * MIB
    for hit in hits[::3]:
        location = storage.get_volume(hit.volume.id).location
        assert read(location, 4, 0) == b"\x00" + PATTERN[1:4]
        assert read(location, MIB, 255 * MIB) == b"\xff" + PATTERN[1:]


@pytest.mark.reflink
def test_on_ext4_a_clone_is_a_kernel_copy_of_the_data_extents_that_keeps_the_holes(
        tmp_path: Path) -> None:
    with loop_mounted(tmp_path / "ext4.img", tmp_path / "ext4",
                      ["mkfs.ext4", "-q", "-F"], 256 * MIB) as ext4:
        storage = FileStorage(ext4 / "vols")
        storage.create_volume("src", 1, "internal")
        storage.write_image("src", sparse_image())

        clone = storage.clone_volume("src", "dst", 2, "alice")

        assert storage.last_clone_method == "copy_file_range"
        assert allocated(clone.location) < 8 * MIB
        for offset in (0, 101 * MIB, 202 * MIB):
            assert read(clone.location, MIB, offset) == read(
                storage.get_volume("src").location, MIB, offset)

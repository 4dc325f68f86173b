"""What is particular to the thick LVM fake: capacity accounting, full copies, persistence."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivcache.adapters.storage import FakeLvmStorage, FakeRbdStorage
from ivcache.core.errors import NoSpace, StorageError, VolumeNotFound
from ivcache.core.model import GIB

MIB = 1024**2


def test_every_volume_takes_its_whole_size_from_the_group_written_or_not() -> None:
    lvm = FakeLvmStorage(10)

    lvm.create_volume("a", 3, "p")
    lvm.create_volume("b", 2, "p")
    lvm.write_image("b", [b"\x01" * MIB])

    assert lvm.free_gb == 5


def test_a_volume_that_does_not_fit_raises_no_space_and_takes_nothing() -> None:
    lvm = FakeLvmStorage(5)
    lvm.create_volume("a", 3, "p")

    with pytest.raises(NoSpace, match="2 GiB free"):
        lvm.create_volume("b", 3, "p")

    assert [v.id for v in lvm.list_volumes()] == ["a"]
    assert lvm.free_gb == 2
    lvm.create_volume("b", 2, "p")
    assert lvm.free_gb == 0


def test_a_clone_takes_its_full_size_and_one_that_does_not_fit_leaves_no_volume() -> None:
    lvm = FakeLvmStorage(5)
    lvm.create_volume("src", 2, "internal")
    lvm.clone_volume("src", "c1", 2, "p")

    with pytest.raises(NoSpace):
        lvm.clone_volume("src", "c2", 2, "p")

    assert [v.id for v in lvm.list_volumes()] == ["c1", "src"]
    assert lvm.free_gb == 1


def test_an_extend_that_does_not_fit_raises_no_space_and_keeps_the_size() -> None:
    lvm = FakeLvmStorage(4)
    lvm.create_volume("a", 2, "p")

    with pytest.raises(NoSpace):
        lvm.extend_volume("a", 5)

    assert lvm.get_volume("a").size_gb == 2
    assert lvm.extend_volume("a", 4).size_gb == 4
    assert lvm.free_gb == 0


def test_deleting_a_source_frees_its_space_and_leaves_its_full_copy() -> None:
    lvm = FakeLvmStorage(4)
    lvm.create_volume("src", 2, "internal")
    lvm.write_image("src", [b"cached image"])
    lvm.clone_volume("src", "dst", 2, "p")

    lvm.delete_volume("src")

    assert lvm.free_gb == 2
    assert lvm.read("dst", 0, 12) == b"cached image"


def test_the_location_names_a_logical_volume_of_the_group() -> None:
    volume = FakeLvmStorage(host="node-1").create_volume("v1", 1, "p")

    assert (volume.location, volume.location_kind) == ("/dev/ivcache-fake-vg/v1", "path")
    assert volume.host == "node-1"


def test_read_stops_at_the_end_of_the_volume() -> None:
    lvm = FakeLvmStorage()
    lvm.create_volume("v1", 1, "p")

    assert lvm.read("v1", GIB - 3, 10) == bytes(3)
    assert lvm.read("v1", GIB, 10) == b""


def test_a_write_racing_a_delete_does_not_land_in_a_new_volume_of_the_same_id() -> None:
    lvm = FakeLvmStorage()
    lvm.create_volume("v1", 1, "p")

    def chunks() -> Iterator[bytes]:
        yield b"\x01" * MIB
        lvm.delete_volume("v1")
        lvm.create_volume("v1", 1, "q")
        yield b"\x02" * MIB

    with pytest.raises(VolumeNotFound):
        lvm.write_image("v1", chunks())

    assert lvm.read("v1", 0, 2 * MIB) == bytes(2 * MIB)


def test_a_large_volume_with_little_data_is_cheap_to_keep(tmp_path: Path) -> None:
    lvm = FakeLvmStorage(state_path=tmp_path)
    lvm.create_volume("big", 100, "p")

    lvm.write_image("big", [b"\x01" * (2 * MIB), bytes(50 * MIB), b"\x02"])

    stored = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert stored < 4 * MIB
    assert lvm.read("big", 52 * MIB, 2) == b"\x02\x00"


def test_volumes_outlive_the_instance_that_made_them(tmp_path: Path) -> None:
    first = FakeLvmStorage(10, host="node-1", state_path=tmp_path)
    first.create_volume("src", 2, "internal")
    first.write_image("src", [b"\x07" * (MIB + 5)])
    first.clone_volume("src", "dst", 3, "alice")
    del first

    second = FakeLvmStorage(10, host="node-1", state_path=tmp_path)

    assert [(v.id, v.size_gb, v.owner) for v in second.list_volumes()] == [
        ("dst", 3, "alice"), ("src", 2, "internal")]
    assert second.read("dst", 0, MIB + 6) == b"\x07" * (MIB + 5) + b"\0"
    assert second.free_gb == 5


def test_instances_sharing_a_state_path_see_each_others_changes(tmp_path: Path) -> None:
    one = FakeLvmStorage(10, state_path=tmp_path)
    two = FakeLvmStorage(10, state_path=tmp_path)
    one.create_volume("v1", 4, "p")
    two.write_image("v1", [b"from two"])

    one.create_volume("v2", 6, "p")

    with pytest.raises(NoSpace):
        two.create_volume("v3", 1, "p")
    two.delete_volume("v1")
    assert [v.id for v in one.list_volumes()] == ["v2"]
    assert one.free_gb == 4
    blocks = [f.name for f in (tmp_path / "blocks").iterdir()]
    assert blocks == []  # the data of deleted volumes is removed


def test_processes_sharing_a_state_path_lose_none_of_each_others_volumes(
        tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from ivcache.adapters.storage import FakeLvmStorage
        lvm = FakeLvmStorage(1000, state_path=Path({str(tmp_path)!r}))
        for i in range(10):
            volume_id = f"p{{sys.argv[1]}}-{{i}}"
            lvm.create_volume(volume_id, 1, "p")
            lvm.write_image(volume_id, [sys.argv[1].encode() * 10])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(3)]
    assert [proc.wait(timeout=60) for proc in procs] == [0] * 3

    lvm = FakeLvmStorage(1000, state_path=tmp_path)
    assert len(lvm.list_volumes()) == 30
    assert lvm.read("p2-9", 0, 10) == b"2" * 10
    assert lvm.free_gb == 970


def test_a_crash_mid_save_leaves_no_temp_file_once_the_next_change_is_saved(
        tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from ivcache.adapters.storage import FakeLvmStorage
        lvm = FakeLvmStorage(state_path=Path({str(tmp_path)!r}))
        lvm.create_volume("kept", 1, "p")
        os.replace = lambda *args: os._exit(9)  # dies before the index is renamed
        lvm.create_volume("lost", 1, "p")
    """)
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    assert [p.name for p in tmp_path.glob(".tmp-*")]

    lvm = FakeLvmStorage(state_path=tmp_path)
    lvm.create_volume("next", 1, "p")

    assert not [p.name for p in tmp_path.glob(".tmp-*")]
    assert [v.id for v in lvm.list_volumes()] == ["kept", "next"]


def test_the_state_of_another_kind_of_backend_is_refused(tmp_path: Path) -> None:
    FakeRbdStorage(state_path=tmp_path).create_volume("v1", 1, "p")

    with pytest.raises(StorageError, match="fake-rbd"):
        FakeLvmStorage(state_path=tmp_path).list_volumes()


def test_a_corrupt_state_file_raises_a_storage_error(tmp_path: Path) -> None:
    FakeLvmStorage(state_path=tmp_path).create_volume("v1", 1, "p")
    doc = json.loads((tmp_path / "index.json").read_text())
    del doc["volumes"]["v1"]["owner"]
    (tmp_path / "index.json").write_text(json.dumps(doc))

    with pytest.raises(StorageError, match="corrupt"):
        FakeLvmStorage(state_path=tmp_path).list_volumes()


def test_a_capacity_below_one_gib_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity_gb"):
        FakeLvmStorage(0)


def test_listing_a_persisted_group_reads_no_volume_data(tmp_path: Path) -> None:
    FakeLvmStorage(state_path=tmp_path).create_volume("v1", 1, "p")
    FakeLvmStorage(state_path=tmp_path).write_image("v1", [b"\x01" * MIB])
    for block_file in (tmp_path / "blocks").iterdir():
        block_file.unlink()  # were the data read, this would show
    lvm = FakeLvmStorage(state_path=tmp_path)

    assert [v.id for v in lvm.list_volumes()] == ["v1"]
    assert lvm.free_gb == 999
    with pytest.raises(StorageError, match="missing"):
        lvm.read("v1", 0, 1)

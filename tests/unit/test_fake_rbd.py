"""What is particular to the thin RBD fake: copy-on-write clones, trash, depth, persistence."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ivcache.adapters.storage import FakeLvmStorage, FakeRbdStorage
from ivcache.core.errors import NoSpace, StorageError, VolumeNotFound
from ivcache.core.model import GIB

MIB = 1024**2
ONES = b"\x01" * MIB


def pool_with_image(data: bytes, *, max_clone_depth: int = 5) -> FakeRbdStorage:
    rbd = FakeRbdStorage(max_clone_depth=max_clone_depth)
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", [data])
    return rbd


def test_a_new_volume_takes_no_space_until_written() -> None:
    rbd = FakeRbdStorage(10)

    rbd.create_volume("v1", 5, "p")

    assert rbd.used_bytes == 0


def test_written_data_takes_whole_mebibyte_objects_and_zeros_take_none() -> None:
    rbd = FakeRbdStorage(10)
    rbd.create_volume("v1", 1, "p")

    rbd.write_image("v1", [b"x" * 10, bytes(MIB - 10), bytes(5 * MIB), b"y"])

    assert rbd.used_bytes == 2 * MIB


def test_a_volume_may_be_larger_than_the_pool() -> None:
    rbd = FakeRbdStorage(1)

    volume = rbd.create_volume("v1", 50, "p")

    assert volume.size_gb == 50


def test_a_clone_reads_through_its_parent_and_takes_no_space() -> None:
    rbd = pool_with_image(ONES * 3)

    rbd.clone_volume("base", "c1", 2, "alice")

    assert rbd.read("c1", 0, 3 * MIB) == ONES * 3
    assert rbd.used_bytes == 3 * MIB
    assert rbd.depth("c1") == 1


def test_a_partial_write_into_a_clone_keeps_the_parents_bytes_around_it() -> None:
    rbd = pool_with_image(ONES * 2)
    rbd.clone_volume("base", "c1", 1, "alice")

    rbd.write_image("c1", [b"\x02" * 100])

    assert rbd.read("c1", 0, 2 * MIB) == b"\x02" * 100 + ONES[100:] + ONES
    assert rbd.used_bytes == 3 * MIB  # the parent's two objects and one copied up


def test_zeros_written_into_a_clone_hide_the_parents_data() -> None:
    rbd = pool_with_image(ONES * 2)
    rbd.clone_volume("base", "c1", 1, "alice")

    rbd.write_image("c1", [bytes(MIB)])

    assert rbd.read("c1", 0, 2 * MIB) == bytes(MIB) + ONES
    assert rbd.read("base", 0, 2 * MIB) == ONES * 2


def test_writing_a_parent_keeps_its_old_data_for_the_clone_and_that_takes_space() -> None:
    rbd = pool_with_image(ONES * 2)
    rbd.clone_volume("base", "c1", 1, "alice")

    rbd.write_image("base", [b"\x09" * MIB])

    assert rbd.read("c1", 0, 2 * MIB) == ONES * 2
    assert rbd.read("base", 0, 2 * MIB) == b"\x09" * MIB + ONES
    assert rbd.used_bytes == 3 * MIB


def test_two_clones_of_an_unchanged_parent_share_its_data() -> None:
    rbd = pool_with_image(ONES * 4)

    rbd.clone_volume("base", "c1", 1, "alice")
    rbd.clone_volume("base", "c2", 1, "bob")

    assert rbd.used_bytes == 4 * MIB


def test_a_parent_with_clones_is_hidden_on_delete_and_purged_with_its_last_clone() -> None:
    rbd = pool_with_image(ONES * 2)
    rbd.clone_volume("base", "c1", 1, "alice")
    rbd.clone_volume("base", "c2", 1, "bob")

    rbd.delete_volume("base")

    assert [v.id for v in rbd.list_volumes()] == ["c1", "c2"]
    with pytest.raises(VolumeNotFound):
        rbd.get_volume("base")
    with pytest.raises(VolumeNotFound):
        rbd.delete_volume("base")
    assert rbd.used_bytes == 2 * MIB  # in the trash, still there
    rbd.delete_volume("c1")
    assert rbd.read("c2", 0, 2 * MIB) == ONES * 2
    assert rbd.used_bytes == 2 * MIB
    rbd.delete_volume("c2")
    assert rbd.used_bytes == 0


def test_a_chain_of_trashed_parents_is_purged_when_the_last_clone_goes() -> None:
    rbd = pool_with_image(ONES)
    rbd.clone_volume("base", "mid", 1, "internal")
    rbd.write_image("mid", [ONES, ONES])
    rbd.clone_volume("mid", "leaf", 1, "alice")
    rbd.delete_volume("base")
    rbd.delete_volume("mid")
    assert rbd.used_bytes == 3 * MIB

    rbd.delete_volume("leaf")

    assert rbd.used_bytes == 0
    assert rbd.list_volumes() == []


def test_the_name_of_a_trashed_parent_is_free_again() -> None:
    rbd = pool_with_image(ONES)
    rbd.clone_volume("base", "c1", 1, "alice")
    rbd.delete_volume("base")

    rbd.create_volume("base", 2, "bob")

    assert rbd.read("base", 0, 4) == bytes(4)
    assert rbd.read("c1", 0, 4) == ONES[:4]
    assert [(v.id, v.owner) for v in rbd.list_volumes()] == [("base", "bob"), ("c1", "alice")]


def test_depth_counts_the_snapshots_a_read_goes_through() -> None:
    rbd = pool_with_image(ONES, max_clone_depth=5)

    for n in range(1, 4):
        rbd.clone_volume("base" if n == 1 else f"c{n - 1}", f"c{n}", 1, "p")

    assert [rbd.depth(v) for v in ("base", "c1", "c2", "c3")] == [0, 1, 2, 3]


def test_a_clone_deeper_than_the_limit_is_flattened() -> None:
    rbd = pool_with_image(ONES * 2, max_clone_depth=2)
    rbd.clone_volume("base", "c1", 1, "p")
    rbd.clone_volume("c1", "c2", 1, "p")
    rbd.write_image("c2", [b"\x05"])
    used = rbd.used_bytes

    rbd.clone_volume("c2", "c3", 1, "p")

    assert rbd.depth("c3") == 0
    assert rbd.read("c3", 0, 2 * MIB) == b"\x05" + ONES[1:] + ONES
    assert rbd.used_bytes == used + 2 * MIB  # a full copy of what it reads
    for volume_id in ("base", "c1", "c2"):
        rbd.delete_volume(volume_id)
    assert rbd.read("c3", 0, 2 * MIB) == b"\x05" + ONES[1:] + ONES
    assert rbd.used_bytes == 2 * MIB


def test_with_a_max_clone_depth_of_zero_every_clone_is_a_full_copy() -> None:
    rbd = pool_with_image(ONES, max_clone_depth=0)

    rbd.clone_volume("base", "c1", 1, "p")
    rbd.delete_volume("base")

    assert rbd.depth("c1") == 0
    assert rbd.read("c1", 0, MIB) == ONES
    assert rbd.used_bytes == MIB


def test_a_flatten_that_does_not_fit_raises_no_space_and_leaves_no_volume() -> None:
    rbd = FakeRbdStorage(1, max_clone_depth=0)
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", itertools.repeat(ONES, 600))

    with pytest.raises(NoSpace):
        rbd.clone_volume("base", "c1", 1, "p")

    assert [v.id for v in rbd.list_volumes()] == ["base"]
    assert rbd.used_bytes == 600 * MIB


def test_a_write_that_does_not_fit_the_pool_raises_no_space_and_takes_nothing() -> None:
    rbd = FakeRbdStorage(1)
    rbd.create_volume("a", 1, "p")
    rbd.write_image("a", itertools.repeat(ONES, 600))
    rbd.create_volume("b", 1, "p")

    with pytest.raises(NoSpace, match="pool"):
        rbd.write_image("b", itertools.repeat(ONES, 500))

    assert rbd.used_bytes == 600 * MIB
    assert rbd.read("b", 0, MIB) == bytes(MIB)
    assert rbd.write_image("b", itertools.repeat(ONES, 424)) == 424 * MIB
    assert rbd.used_bytes == GIB


def test_rewriting_a_parent_that_clones_still_read_counts_the_kept_data() -> None:
    rbd = FakeRbdStorage(1)
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", itertools.repeat(ONES, 600))
    rbd.clone_volume("base", "c1", 1, "p")

    # The 600 old objects stay for the clone: 600 new ones do not fit beside them.
    with pytest.raises(NoSpace):
        rbd.write_image("base", itertools.repeat(b"\x02" * MIB, 600))

    assert rbd.read("base", 0, 1) == b"\x01"
    assert rbd.used_bytes == 600 * MIB


def test_the_location_names_an_image_of_the_pool() -> None:
    volume = FakeRbdStorage(host="node-1").create_volume("v1", 1, "p")

    assert (volume.location, volume.location_kind) == ("ivcache-fake-pool/v1", "rbd_image")


def test_the_pool_with_clones_and_trash_outlives_the_instance(tmp_path: Path) -> None:
    first = FakeRbdStorage(10, state_path=tmp_path, max_clone_depth=3)
    first.create_volume("base", 1, "internal")
    first.write_image("base", [ONES * 2])
    first.clone_volume("base", "c1", 2, "alice")
    first.write_image("c1", [b"\x03"])
    first.delete_volume("base")
    del first

    second = FakeRbdStorage(10, state_path=tmp_path, max_clone_depth=3)

    assert [(v.id, v.size_gb, v.owner) for v in second.list_volumes()] == [("c1", 2, "alice")]
    assert second.read("c1", 0, 2 * MIB) == b"\x03" + ONES[1:] + ONES
    assert second.depth("c1") == 1
    assert second.used_bytes == 3 * MIB
    second.delete_volume("c1")
    assert second.used_bytes == 0
    assert list((tmp_path / "blocks").iterdir()) == []


def test_instances_sharing_a_state_path_see_each_others_clones_and_deletes(
        tmp_path: Path) -> None:
    one = FakeRbdStorage(state_path=tmp_path)
    two = FakeRbdStorage(state_path=tmp_path)
    one.create_volume("base", 1, "internal")
    one.write_image("base", [ONES])

    two.clone_volume("base", "c1", 1, "alice")
    one.delete_volume("base")

    assert [v.id for v in two.list_volumes()] == ["c1"]
    two.delete_volume("c1")
    assert one.used_bytes == 0


def test_a_clone_shares_the_state_file_of_its_parent(tmp_path: Path) -> None:
    rbd = FakeRbdStorage(state_path=tmp_path)
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", [ONES * 4])

    for n in range(5):
        rbd.clone_volume("base", f"c{n}", 1, "p")

    stored = sum(f.stat().st_size for f in (tmp_path / "blocks").iterdir())
    assert 4 * MIB <= stored < 5 * MIB


def test_the_state_of_another_kind_of_backend_is_refused(tmp_path: Path) -> None:
    FakeLvmStorage(state_path=tmp_path).create_volume("v1", 1, "p")

    with pytest.raises(StorageError, match="fake-lvm"):
        FakeRbdStorage(state_path=tmp_path).list_volumes()


def test_depth_of_an_unknown_volume_raises_volume_not_found() -> None:
    with pytest.raises(VolumeNotFound):
        FakeRbdStorage().depth("nope")


def test_a_negative_max_clone_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="max_clone_depth"):
        FakeRbdStorage(max_clone_depth=-1)


def test_listing_a_persisted_pool_and_its_usage_reads_no_volume_data(tmp_path: Path) -> None:
    rbd = FakeRbdStorage(state_path=tmp_path)
    rbd.create_volume("base", 1, "internal")
    rbd.write_image("base", [ONES * 2])
    rbd.clone_volume("base", "c1", 1, "p")
    for block_file in (tmp_path / "blocks").iterdir():
        block_file.unlink()  # were the data read, this would show
    other = FakeRbdStorage(state_path=tmp_path)

    assert [v.id for v in other.list_volumes()] == ["base", "c1"]
    assert other.used_bytes == 2 * MIB
    assert other.depth("c1") == 1
    with pytest.raises(StorageError, match="missing"):
        other.read("c1", 0, 1)


def test_rewriting_a_full_volume_with_zeros_then_data_fits_where_the_old_data_was() -> None:
    rbd = FakeRbdStorage(1)
    rbd.create_volume("a", 1, "p")
    rbd.write_image("a", itertools.repeat(ONES, 1000))

    written = rbd.write_image("a", itertools.chain(itertools.repeat(bytes(MIB), 1000),
                                                   itertools.repeat(ONES, 20)))

    assert written == 1020 * MIB
    assert rbd.used_bytes == 20 * MIB


def test_clones_of_an_unchanged_image_share_one_snapshot_and_a_write_starts_a_new_one() -> None:
    # As RbdStorage does: one protected snapshot per image, forgotten when it is written.
    rbd = pool_with_image(ONES)
    rbd.clone_volume("base", "c1", 1, "p")
    rbd.clone_volume("base", "c2", 1, "p")

    rbd.write_image("base", [b"\x02" * MIB])
    rbd.clone_volume("base", "c3", 1, "p")

    assert rbd.parent("c1") == rbd.parent("c2") != rbd.parent("c3")
    assert rbd.read("c2", 0, MIB) == ONES and rbd.read("c3", 0, MIB) == b"\x02" * MIB
    assert rbd.snapshots("base") == 2
    rbd.delete_volume("c1")
    rbd.delete_volume("c2")
    assert rbd.snapshots("base") == 1  # the old one went with its last clone


def test_an_unused_clone_snapshot_does_not_keep_its_image_from_going() -> None:
    rbd = pool_with_image(ONES)
    rbd.clone_volume("base", "c1", 1, "p")
    rbd.delete_volume("c1")
    assert rbd.snapshots("base") == 1

    rbd.delete_volume("base")

    assert rbd.list_volumes() == [] and rbd.used_bytes == 0


"""The ``StorageBackend`` contract, run against every backend.

To add a backend, add a ``Kit`` to ``KITS``: how to make one (in a fresh directory, with a
capacity) and how to read a volume's bytes. Marks (``pytest.mark.rbd``...) go on the kit.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

import ivcache.adapters.storage
from ivcache.adapters.storage import (
    FakeLvmStorage,
    FakeRbdStorage,
    FileStorage,
    Qcow2Storage,
    RbdStorage,
)
from ivcache.core.errors import (
    InvalidIdentifier,
    InvalidSize,
    NoSpace,
    StorageError,
    VolumeNotFound,
)
from ivcache.core.model import GIB, Volume
from ivcache.core.ports import StorageBackend
from tests.support.ceph_cluster import new_namespace

MIB = 1024**2
ONES = b"\x01" * MIB


def _read_fake(backend: StorageBackend, volume: Volume, offset: int, length: int) -> bytes:
    assert isinstance(backend, FakeLvmStorage | FakeRbdStorage)
    return backend.read(volume.id, offset, length)


def _read_qcow2(backend: StorageBackend, volume: Volume, offset: int, length: int) -> bytes:
    # What a guest would see, backing chain included (qemu-img dd), not the file's bytes.
    assert isinstance(backend, Qcow2Storage)
    return backend.read(volume.id, offset, length)


def _check_qcow2(backend: StorageBackend) -> None:
    assert isinstance(backend, Qcow2Storage)
    for path in sorted(backend.files_dir.glob("*.qcow2")):
        done = subprocess.run(["qemu-img", "check", "-q", str(path)], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, f"qemu-img check {path.name}: {done.stdout}{done.stderr}"


def _read_path(backend: StorageBackend, volume: Volume, offset: int, length: int) -> bytes:
    with open(volume.location, "rb") as f:
        return os.pread(f.fileno(), length, offset)


_RBD_OPEN: list[RbdStorage] = []


def _make_rbd(directory: Path, capacity_gb: int) -> StorageBackend:
    # Each backend gets a namespace of its own in the session's cluster (the ceph_cluster
    # fixture sets CEPH_CONF): an empty pool, as the contract expects.
    conf = os.environ["CEPH_CONF"]
    storage = RbdStorage("rbd", conf=conf, host="node-1", capacity_gb=capacity_gb,
                         namespace=new_namespace(conf))
    _RBD_OPEN.append(storage)
    return storage


def _read_rbd(backend: StorageBackend, volume: Volume, offset: int, length: int) -> bytes:
    assert isinstance(backend, RbdStorage)
    return backend.read(volume.id, offset, length)


@pytest.fixture(autouse=True)
def _close_rbd_connections() -> Iterator[None]:
    yield
    while _RBD_OPEN:
        _RBD_OPEN.pop().close()


@attrs.frozen
class Kit:
    """How the contract makes and reads one kind of backend.

    ``make(directory, capacity_gb)``: a new, empty backend keeping anything it stores in
    ``directory``; ``capacity_gb`` 0 means the backend's default (large or unlimited).
    ``check(backend)``, if given, asserts after each test that the backend's state is sound.
    ``fixtures`` are set up before ``make`` runs (a cluster the backend lives in).
    """

    make: Callable[[Path, int], StorageBackend]
    read: Callable[[StorageBackend, Volume, int, int], bytes]
    marks: tuple[pytest.MarkDecorator, ...] = ()
    check: Callable[[StorageBackend], None] | None = None
    fixtures: tuple[str, ...] = ()


KITS: dict[str, Kit] = {
    "fake_lvm": Kit(lambda d, cap: FakeLvmStorage(cap or 1000, host="node-1"), _read_fake),
    "fake_lvm-state": Kit(
        lambda d, cap: FakeLvmStorage(cap or 1000, host="node-1", state_path=d), _read_fake),
    "fake_rbd": Kit(lambda d, cap: FakeRbdStorage(cap or 1000, host="node-1"), _read_fake),
    "fake_rbd-state": Kit(
        lambda d, cap: FakeRbdStorage(cap or 1000, host="node-1", state_path=d), _read_fake),
    "file": Kit(lambda d, cap: FileStorage(d, host="node-1", capacity_gb=cap), _read_path),
    "qcow2": Kit(lambda d, cap: Qcow2Storage(d, host="node-1", capacity_gb=cap), _read_qcow2,
                 (pytest.mark.qcow2,), _check_qcow2),
    "rbd": Kit(_make_rbd, _read_rbd, (pytest.mark.rbd,), fixtures=("ceph_cluster",)),
}


@pytest.fixture(params=[pytest.param(name, marks=kit.marks) for name, kit in KITS.items()])
def kit(request: pytest.FixtureRequest) -> Kit:
    chosen = KITS[request.param]
    for name in chosen.fixtures:
        request.getfixturevalue(name)
    return chosen


@pytest.fixture
def backend(kit: Kit, tmp_path: Path) -> Iterator[StorageBackend]:
    made = kit.make(tmp_path / "storage", 0)
    yield made
    if kit.check is not None:
        kit.check(made)


def read_volume(kit: Kit, backend: StorageBackend, volume_id: str, length: int,
                offset: int = 0) -> bytes:
    return kit.read(backend, backend.get_volume(volume_id), offset, length)


def image(size: int, seed: int) -> bytes:
    """Random bytes with a run of zeros in the middle (a hole, for sparse backends)."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[size // 3:size // 3 + 2 * MIB] = bytes(len(data[size // 3:size // 3 + 2 * MIB]))
    return bytes(data)


def chunked(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    """Chunks of an awkward size, so that they straddle block boundaries."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


def test_every_backend_fits_the_port(tmp_path: Path) -> None:
    # mypy checks these assignments against the Protocol.
    backends: list[StorageBackend] = [FakeLvmStorage(), FakeRbdStorage(),
                                      FileStorage(tmp_path)]
    assert len(backends) == 3


@pytest.mark.qcow2
def test_the_qcow2_backend_fits_the_port(tmp_path: Path) -> None:
    backend: StorageBackend = Qcow2Storage(tmp_path)  # mypy checks this against the Protocol
    assert backend.list_volumes() == []


def _rbd_fits_the_port(storage: RbdStorage) -> StorageBackend:
    return storage  # mypy checks this without a cluster


def test_the_storage_package_exports_exactly_its_backends() -> None:
    assert sorted(ivcache.adapters.storage.__all__) == [
        "FakeLvmStorage", "FakeRbdStorage", "FileStorage", "Qcow2Storage", "RbdStorage"]


def test_a_created_volume_can_be_got_with_its_size_owner_and_host(
        backend: StorageBackend) -> None:
    made = backend.create_volume("v1", 2, "alice")

    got = backend.get_volume("v1")

    assert got == made
    assert (got.id, got.size_gb, got.owner, got.host) == ("v1", 2, "alice", "node-1")
    assert got.location and got.location_kind in ("path", "rbd_image")


def test_list_volumes_returns_every_volume_sorted_by_id_or_those_of_one_owner(
        backend: StorageBackend) -> None:
    for volume_id, owner in [("c", "alice"), ("a", "bob"), ("b", "alice")]:
        backend.create_volume(volume_id, 1, owner)

    assert [v.id for v in backend.list_volumes()] == ["a", "b", "c"]
    assert [v.id for v in backend.list_volumes(owner="alice")] == ["b", "c"]
    assert backend.list_volumes(owner="nobody") == []


def test_a_deleted_volume_is_gone(backend: StorageBackend) -> None:
    backend.create_volume("v1", 1, "alice")
    backend.create_volume("v2", 1, "alice")

    backend.delete_volume("v1")

    with pytest.raises(VolumeNotFound):
        backend.get_volume("v1")
    with pytest.raises(VolumeNotFound):
        backend.delete_volume("v1")
    assert [v.id for v in backend.list_volumes()] == ["v2"]


def test_creating_a_volume_whose_id_exists_raises_and_keeps_the_first(
        kit: Kit, backend: StorageBackend) -> None:
    backend.create_volume("v1", 1, "alice")
    backend.write_image("v1", [b"first"])

    with pytest.raises(StorageError, match="already exists"):
        backend.create_volume("v1", 2, "bob")

    assert backend.get_volume("v1").owner == "alice"
    assert read_volume(kit, backend, "v1", 5) == b"first"


def test_a_written_image_reads_back_and_the_rest_of_the_volume_is_zeros(
        kit: Kit, backend: StorageBackend) -> None:
    data = image(5 * MIB + 123, seed=1)
    backend.create_volume("v1", 1, "alice")

    written = backend.write_image("v1", chunked(data))

    assert written == len(data)
    assert read_volume(kit, backend, "v1", len(data)) == data
    assert read_volume(kit, backend, "v1", MIB, offset=len(data)) == bytes(MIB)
    assert read_volume(kit, backend, "v1", MIB, offset=GIB - MIB) == bytes(MIB)


def test_writing_again_overwrites_what_was_there_zeros_included(
        kit: Kit, backend: StorageBackend) -> None:
    first = image(6 * MIB, seed=1)
    second = bytes(MIB) + image(2 * MIB + 7, seed=2)  # starts with zeros over data
    backend.create_volume("v1", 1, "alice")
    backend.write_image("v1", chunked(first))

    backend.write_image("v1", chunked(second, 3 * MIB))

    assert read_volume(kit, backend, "v1", 6 * MIB) == second + first[len(second):]


def test_an_image_larger_than_the_volume_raises_no_space(backend: StorageBackend) -> None:
    backend.create_volume("v1", 1, "alice")

    with pytest.raises(NoSpace, match="does not fit"):
        backend.write_image("v1", itertools.chain(itertools.repeat(bytes(MIB), 1024), [b"x"]))


def test_an_image_exactly_the_size_of_the_volume_fits(backend: StorageBackend) -> None:
    backend.create_volume("v1", 1, "alice")

    assert backend.write_image("v1", itertools.repeat(bytes(MIB), 1024)) == GIB


def test_a_failing_chunk_iterator_propagates_its_exception_unchanged(
        backend: StorageBackend) -> None:
    backend.create_volume("v1", 1, "alice")
    boom = ConnectionResetError("the download broke")

    def chunks() -> Iterator[bytes]:
        yield ONES
        yield b"partial"
        raise boom

    with pytest.raises(ConnectionResetError) as caught:
        backend.write_image("v1", chunks())

    assert caught.value is boom
    assert backend.get_volume("v1").size_gb == 1  # left for the caller to delete
    backend.delete_volume("v1")


def test_a_clone_is_byte_exact_and_may_be_larger_than_its_source(
        kit: Kit, backend: StorageBackend) -> None:
    data = image(4 * MIB + 5, seed=3)
    backend.create_volume("src", 1, "internal")
    backend.write_image("src", chunked(data))

    clone = backend.clone_volume("src", "dst", 2, "alice")

    assert (clone.id, clone.size_gb, clone.owner) == ("dst", 2, "alice")
    assert backend.get_volume("dst") == clone
    assert read_volume(kit, backend, "dst", len(data) + MIB) == data + bytes(MIB)
    assert read_volume(kit, backend, "dst", MIB, offset=2 * GIB - MIB) == bytes(MIB)
    assert backend.get_volume("src").owner == "internal"


def test_writing_a_clone_leaves_its_source_unchanged(kit: Kit, backend: StorageBackend) -> None:
    data = image(3 * MIB, seed=4)
    backend.create_volume("src", 1, "internal")
    backend.write_image("src", chunked(data))
    backend.clone_volume("src", "dst", 1, "alice")

    backend.write_image("dst", [b"\xff" * (MIB + 10), bytes(MIB)])

    assert read_volume(kit, backend, "src", len(data)) == data
    assert read_volume(kit, backend, "dst", 3 * MIB) == (
        b"\xff" * (MIB + 10) + bytes(MIB) + data[2 * MIB + 10:])


def test_writing_the_source_after_cloning_leaves_the_clone_unchanged(
        kit: Kit, backend: StorageBackend) -> None:
    data = image(3 * MIB, seed=5)
    backend.create_volume("src", 1, "internal")
    backend.write_image("src", chunked(data))
    backend.clone_volume("src", "dst", 1, "alice")

    backend.write_image("src", [bytes(3 * MIB)])

    assert read_volume(kit, backend, "dst", len(data)) == data


def test_a_clone_outlives_its_deleted_source(kit: Kit, backend: StorageBackend) -> None:
    data = image(3 * MIB, seed=6)
    backend.create_volume("src", 1, "internal")
    backend.write_image("src", chunked(data))
    backend.clone_volume("src", "dst", 1, "alice")

    backend.delete_volume("src")

    assert [v.id for v in backend.list_volumes()] == ["dst"]
    with pytest.raises(VolumeNotFound):
        backend.get_volume("src")
    assert read_volume(kit, backend, "dst", len(data)) == data


def test_clones_of_clones_read_like_the_original_after_every_ancestor_is_deleted(
        kit: Kit, backend: StorageBackend) -> None:
    data = image(3 * MIB, seed=7)
    backend.create_volume("v0", 1, "internal")
    backend.write_image("v0", chunked(data))
    for n in range(1, 4):
        backend.clone_volume(f"v{n - 1}", f"v{n}", 1, "alice")

    for n in range(3):
        backend.delete_volume(f"v{n}")

    assert [v.id for v in backend.list_volumes()] == ["v3"]
    assert read_volume(kit, backend, "v3", len(data)) == data


def test_the_id_of_a_deleted_source_can_be_used_again(kit: Kit, backend: StorageBackend) -> None:
    backend.create_volume("src", 1, "internal")
    backend.write_image("src", [ONES])
    backend.clone_volume("src", "dst", 1, "alice")
    backend.delete_volume("src")

    backend.create_volume("src", 1, "bob")

    assert read_volume(kit, backend, "src", 4) == bytes(4)
    assert read_volume(kit, backend, "dst", 4) == b"\x01" * 4
    backend.delete_volume("dst")
    assert [v.id for v in backend.list_volumes()] == ["src"]


def test_a_clone_smaller_than_its_source_raises_invalid_size(backend: StorageBackend) -> None:
    backend.create_volume("src", 2, "internal")

    with pytest.raises(InvalidSize):
        backend.clone_volume("src", "dst", 1, "alice")

    assert [v.id for v in backend.list_volumes()] == ["src"]


def test_cloning_onto_an_existing_id_raises_a_storage_error(backend: StorageBackend) -> None:
    backend.create_volume("src", 1, "internal")
    backend.create_volume("dst", 1, "alice")

    with pytest.raises(StorageError, match="already exists"):
        backend.clone_volume("src", "dst", 1, "alice")


def test_extend_grows_a_volume_and_keeps_its_data(kit: Kit, backend: StorageBackend) -> None:
    data = image(3 * MIB, seed=8)
    backend.create_volume("v1", 1, "alice")
    backend.write_image("v1", chunked(data))

    extended = backend.extend_volume("v1", 3)

    assert extended.size_gb == 3
    assert backend.get_volume("v1").size_gb == 3
    assert read_volume(kit, backend, "v1", len(data)) == data
    assert read_volume(kit, backend, "v1", MIB, offset=3 * GIB - MIB) == bytes(MIB)
    assert backend.extend_volume("v1", 3).size_gb == 3  # to the same size: nothing to do


def test_extend_never_shrinks_a_volume(backend: StorageBackend) -> None:
    backend.create_volume("v1", 2, "alice")

    with pytest.raises(InvalidSize, match="shrink"):
        backend.extend_volume("v1", 1)

    assert backend.get_volume("v1").size_gb == 2


@pytest.mark.parametrize("size", [0, -1, True])
def test_a_size_below_one_gib_is_refused_by_create_clone_and_extend(
        backend: StorageBackend, size: int) -> None:
    backend.create_volume("v1", 1, "alice")

    with pytest.raises(InvalidSize):
        backend.create_volume("v2", size, "alice")
    with pytest.raises(InvalidSize):
        backend.clone_volume("v1", "v2", size, "alice")
    with pytest.raises(InvalidSize):
        backend.extend_volume("v1", size)
    assert [(v.id, v.size_gb) for v in backend.list_volumes()] == [("v1", 1)]


def test_running_out_of_space_raises_no_space_and_leaves_nothing_behind(
        kit: Kit, tmp_path: Path) -> None:
    backend = kit.make(tmp_path / "storage", 2)
    keep = image(3 * MIB, seed=9)
    backend.create_volume("keep", 1, "alice")
    backend.write_image("keep", chunked(keep))

    with pytest.raises(NoSpace):
        # A thick backend refuses the volume; a thin one makes it and runs out writing.
        backend.create_volume("big", 4, "alice")
        backend.write_image("big", itertools.repeat(ONES, 3 * 1024))

    ids = [v.id for v in backend.list_volumes()]
    assert ids in (["keep"], ["big", "keep"])
    if "big" in ids:
        assert read_volume(kit, backend, "big", MIB) == bytes(MIB)
        backend.delete_volume("big")
    assert read_volume(kit, backend, "keep", len(keep)) == keep
    backend.create_volume("after", 1, "alice")
    assert backend.write_image("after", [ONES] * 8) == 8 * MIB


def test_unknown_ids_raise_volume_not_found(backend: StorageBackend) -> None:
    backend.create_volume("known", 1, "alice")
    calls: list[Callable[[], object]] = [
        lambda: backend.get_volume("nope"),
        lambda: backend.delete_volume("nope"),
        lambda: backend.write_image("nope", [b"x"]),
        lambda: backend.clone_volume("nope", "new", 1, "alice"),
        lambda: backend.extend_volume("nope", 2),
    ]
    for call in calls:
        with pytest.raises(VolumeNotFound):
            call()
    assert [v.id for v in backend.list_volumes()] == ["known"]


BAD_IDS = ["../etc", "a/b", "..", "x\x00y", "", "/abs", ".hidden", "a..b", "-rf", "x" * 200]
OPERATIONS: dict[str, Callable[[StorageBackend, str], object]] = {
    "create": lambda b, bad: b.create_volume(bad, 1, "alice"),
    "write": lambda b, bad: b.write_image(bad, [b"x"]),
    "clone from": lambda b, bad: b.clone_volume(bad, "new", 1, "alice"),
    "clone to": lambda b, bad: b.clone_volume("known", bad, 1, "alice"),
    "extend": lambda b, bad: b.extend_volume(bad, 2),
    "delete": lambda b, bad: b.delete_volume(bad),
    "get": lambda b, bad: b.get_volume(bad),
}


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_ids_that_could_escape_raise_invalid_identifier_on_every_method(
        backend: StorageBackend, tmp_path: Path, bad_id: str) -> None:
    backend.create_volume("known", 1, "alice")
    before = sorted(os.listdir(tmp_path / "storage")) if (tmp_path / "storage").exists() else []

    for name, operation in OPERATIONS.items():
        with pytest.raises(InvalidIdentifier):
            operation(backend, bad_id)
            pytest.fail(f"{name} accepted {bad_id!r}")

    assert os.listdir(tmp_path) in ([], ["storage"])
    after = sorted(os.listdir(tmp_path / "storage")) if (tmp_path / "storage").exists() else []
    assert after == before
    assert [v.id for v in backend.list_volumes()] == ["known"]


def test_threads_using_one_backend_each_get_their_own_volumes(
        kit: Kit, backend: StorageBackend) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(4):
                volume_id = f"t{n}-{i}"
                backend.create_volume(volume_id, 1, f"p{n}")
                backend.write_image(volume_id, [bytes([n + 1]) * 1000])
                backend.clone_volume(volume_id, f"{volume_id}-c", 1, f"p{n}")
                backend.delete_volume(volume_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert [v.id for v in backend.list_volumes()] == sorted(
        f"t{n}-{i}-c" for n in range(6) for i in range(4))
    for n in range(6):
        assert [v.id for v in backend.list_volumes(owner=f"p{n}")] == [
            f"t{n}-{i}-c" for i in range(4)]
        assert read_volume(kit, backend, f"t{n}-0-c", 1001) == bytes([n + 1]) * 1000 + b"\0"

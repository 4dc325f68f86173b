"""LocalImageSource on real files: copying, hashing, holes, visibility, ids, concurrency."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.memory import InMemoryImageSource
from ivcache.core.errors import (
    ImageError,
    ImageNotFound,
    ImageUnavailable,
    InvalidRequest,
)
from ivcache.core.model import GIB, Image, RequestContext
from ivcache.core.ports import ImageSource

MIB = 1 << 20
#: the first four bytes of a qcow2 file; its virtual size is the big-endian u64 at offset 24
QCOW2_MAGIC = b"QFI\xfb"
ALICE = RequestContext.for_project("alice")
BOB = RequestContext.for_project("bob")
ADMIN = RequestContext.for_project("ops", admin=True)


@pytest.fixture
def images_path(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
def source(images_path: Path) -> LocalImageSource:
    return LocalImageSource(images_path)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def file_hashes(path: Path) -> tuple[str, str]:
    sha512, md5 = hashlib.sha512(), hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            sha512.update(chunk)
            md5.update(chunk)
    return sha512.hexdigest(), md5.hexdigest()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_the_local_source_fits_the_image_source_port(source: LocalImageSource) -> None:
    port: ImageSource = source
    assert port.list_images(ALICE) == []


def test_a_sparse_64_mib_image_is_copied_with_matching_hashes_and_keeps_its_holes(
        source: LocalImageSource, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    with src.open("wb") as f:
        f.truncate(64 * MIB)
        for offset in (0, 10 * MIB + 12345, 64 * MIB - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))
    assert allocated(src) < 64 * MIB, "the filesystem of tmp_path does not make sparse files"
    before = dt.datetime.now(dt.UTC)

    image = source.add_image(ALICE, src)

    sha512, md5 = file_hashes(src)
    assert (image.os_hash_algo, image.os_hash_value, image.checksum) == ("sha512", sha512, md5)
    assert (image.size, image.virtual_size, image.disk_format) == (64 * MIB, 64 * MIB, "raw")
    assert (image.name, image.owner, image.visibility, image.status, image.min_disk) == (
        "disk.raw", "alice", "public", "active", 0)
    assert image.updated_at is not None and image.updated_at.tzinfo is not None
    assert before <= image.updated_at <= dt.datetime.now(dt.UTC)
    copy = source.images_path / "data" / image.id
    assert copy.stat().st_size == 64 * MIB
    # Three 4 KiB runs of data touch at most four 1 MiB chunks; the rest stays a hole.
    assert allocated(copy) <= 4 * MIB
    assert file_hashes(copy) == (sha512, md5)
    assert source.get_image(BOB, image.id) == image


def test_a_file_ending_in_zeros_keeps_its_full_length(
        source: LocalImageSource, tmp_path: Path) -> None:
    src = write(tmp_path / "tail.raw", b"x" * 100 + bytes(3 * MIB))

    image = source.add_image(ALICE, src)

    assert image.size == 3 * MIB + 100
    assert b"".join(source.open_data(ALICE, image.id)) == src.read_bytes()


def test_a_qcow2_file_is_recorded_with_the_virtual_size_from_its_header(
        source: LocalImageSource, tmp_path: Path) -> None:
    header = QCOW2_MAGIC + (3).to_bytes(4, "big") + bytes(16) + (10 * GIB).to_bytes(8, "big")
    src = write(tmp_path / "disk.qcow2", header + bytes(1000))

    image = source.add_image(ALICE, src, name="cirros")

    assert (image.name, image.disk_format, image.size) == ("cirros", "qcow2", 1032)
    assert image.virtual_size == 10 * GIB
    assert image.min_size_gb == 10


def test_progress_is_told_each_chunk_and_the_deltas_add_up_to_the_size(
        images_path: Path, tmp_path: Path) -> None:
    source = LocalImageSource(images_path, chunk_size=64 * 1024)
    src = write(tmp_path / "img", os.urandom(5 * 64 * 1024 + 7))
    seen: list[int] = []

    source.add_image(ALICE, src, progress=seen.append)

    assert seen == [64 * 1024] * 5 + [7]


def test_open_data_streams_chunks_of_the_chunk_size_that_join_to_the_file(
        images_path: Path, tmp_path: Path) -> None:
    source = LocalImageSource(images_path, chunk_size=64 * 1024)
    data = os.urandom(5 * 64 * 1024 + 123)
    image = source.add_image(ALICE, write(tmp_path / "img", data))

    chunks = list(source.open_data(ALICE, image.id))

    assert [len(c) for c in chunks] == [64 * 1024] * 5 + [123]
    assert b"".join(chunks) == data
    assert hashlib.sha512(data).hexdigest() == image.os_hash_value


def test_a_private_image_is_seen_only_by_its_project_and_by_admins(
        source: LocalImageSource, tmp_path: Path) -> None:
    src = write(tmp_path / "img", b"secret bytes")
    private = source.add_image(ALICE, src, name="mine", visibility="private")
    public = source.add_image(ALICE, src, name="ours")

    assert source.get_image(ALICE, private.id) == private
    assert source.get_image(ADMIN, private.id) == private
    with pytest.raises(ImageNotFound):
        source.get_image(BOB, private.id)
    # Refused when asked, not at the first chunk: nothing gets created for Bob.
    with pytest.raises(ImageNotFound):
        source.open_data(BOB, private.id)
    assert [i.id for i in source.list_images(BOB)] == [public.id]
    assert [i.id for i in source.list_images(ALICE)] == [private.id, public.id]
    assert [i.id for i in source.list_images(ADMIN)] == [private.id, public.id]
    assert b"".join(source.open_data(ADMIN, private.id)) == b"secret bytes"


@pytest.mark.parametrize("ctx", [ALICE, BOB, ADMIN], ids=["owner", "other", "admin"])
@pytest.mark.parametrize("visibility", ["public", "private"])
def test_visibility_follows_the_same_rules_as_the_in_memory_fake(
        source: LocalImageSource, tmp_path: Path, ctx: RequestContext, visibility: str) -> None:
    image = source.add_image(ALICE, write(tmp_path / "img", b"x"), visibility=visibility)
    fake = InMemoryImageSource()
    fake.add(image, b"x")

    def sees(s: ImageSource) -> bool:
        try:
            s.get_image(ctx, image.id)
        except ImageNotFound:
            return False
        return True

    assert sees(source) == sees(fake)
    assert source.list_images(ctx) == fake.list_images(ctx)


def test_images_are_listed_by_name_then_id(
        source: LocalImageSource, tmp_path: Path) -> None:
    src = write(tmp_path / "img", b"x")
    added = [source.add_image(ALICE, src, name=n) for n in ("b", "a", "b", "a", "c")]

    listed = source.list_images(ALICE)

    assert listed == sorted(added, key=lambda i: (i.name, i.id))


@pytest.mark.parametrize("bad_id", [
    "..", "../index.json", "../../etc/passwd", "a/b", "/etc/passwd", "", "x\x00y",
    "data/../../secret", "index.json",
])
def test_ids_that_could_escape_the_directory_are_not_found(
        source: LocalImageSource, tmp_path: Path, bad_id: str) -> None:
    source.add_image(ALICE, write(tmp_path / "img", b"x"))
    write(tmp_path / "secret", b"do not serve")

    with pytest.raises(ImageNotFound):
        source.get_image(ADMIN, bad_id)
    with pytest.raises(ImageNotFound):
        source.open_data(ADMIN, bad_id)
    with pytest.raises(ImageNotFound):
        source.delete_image(ADMIN, bad_id)
    with pytest.raises(ImageNotFound):
        source.update_image(bad_id, name="x")
    assert (tmp_path / "secret").read_bytes() == b"do not serve"


def test_a_missing_source_file_is_a_one_line_error_naming_the_path(
        source: LocalImageSource, tmp_path: Path) -> None:
    missing = tmp_path / "no such.img"

    with pytest.raises(InvalidRequest) as err:
        source.add_image(ALICE, missing)

    message = str(err.value)
    assert str(missing) in message and "\n" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert source.list_images(ADMIN) == []


def test_a_directory_or_unreadable_file_is_refused_and_leaves_nothing_behind(
        source: LocalImageSource, tmp_path: Path) -> None:
    unreadable = write(tmp_path / "locked.img", b"x")
    unreadable.chmod(0)

    with pytest.raises(InvalidRequest, match=r"Is a directory"):
        source.add_image(ALICE, tmp_path)
    with pytest.raises(InvalidRequest, match=r"/dev/null: not a regular file"):
        source.add_image(ALICE, Path("/dev/null"))
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        with pytest.raises(InvalidRequest, match=r"locked\.img"):
            source.add_image(ALICE, unreadable)
    assert source.list_images(ADMIN) == []
    data_dir = source.images_path / "data"
    assert not data_dir.exists() or list(data_dir.iterdir()) == []


def test_an_unknown_visibility_is_refused(source: LocalImageSource, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="visibility"):
        source.add_image(ALICE, write(tmp_path / "img", b"x"), visibility="shared")


def test_the_owner_or_an_admin_may_delete_an_image_but_another_project_may_not(
        source: LocalImageSource, tmp_path: Path) -> None:
    src = write(tmp_path / "img", b"x")
    first = source.add_image(ALICE, src)
    second = source.add_image(BOB, src, visibility="private")

    with pytest.raises(ImageError, match="only that project or an admin") as err:
        source.delete_image(BOB, first.id)
    assert not isinstance(err.value, ImageNotFound)
    with pytest.raises(ImageNotFound):
        source.delete_image(ALICE, second.id)

    source.delete_image(ALICE, first.id)
    source.delete_image(ADMIN, second.id)

    assert source.list_images(ADMIN) == []
    assert list((source.images_path / "data").iterdir()) == []
    with pytest.raises(ImageNotFound):
        source.get_image(ADMIN, first.id)


def test_a_metadata_change_moves_updated_at_and_keeps_the_hash(
        source: LocalImageSource, tmp_path: Path) -> None:
    image = source.add_image(ALICE, write(tmp_path / "img", b"x"))

    changed = source.update_image(image.id, name="renamed", min_disk=5)
    again = source.update_image(image.id, name="renamed again")

    assert (changed.name, changed.min_disk) == ("renamed", 5)
    assert changed.content_hash == image.content_hash
    assert image.updated_at is not None and changed.updated_at is not None
    assert again.updated_at is not None
    assert image.updated_at < changed.updated_at < again.updated_at
    assert source.get_image(ALICE, image.id) == again


def test_a_status_change_is_recorded_for_the_cache_to_see(
        source: LocalImageSource, tmp_path: Path) -> None:
    image = source.add_image(ALICE, write(tmp_path / "img", b"x"))

    source.update_image(image.id, status="deactivated")

    assert source.get_image(ALICE, image.id).status == "deactivated"


def test_replacing_the_data_recomputes_the_hashes_and_serves_the_new_bytes(
        source: LocalImageSource, tmp_path: Path) -> None:
    image = source.add_image(ALICE, write(tmp_path / "v1", b"version one"))

    replaced = source.replace_data(image.id, write(tmp_path / "v2", b"version two!"))

    assert replaced.os_hash_value == hashlib.sha512(b"version two!").hexdigest()
    assert replaced.checksum == hashlib.md5(b"version two!").hexdigest()
    assert replaced.size == replaced.virtual_size == 12
    assert image.updated_at is not None and replaced.updated_at is not None
    assert replaced.updated_at > image.updated_at
    assert b"".join(source.open_data(ALICE, image.id)) == b"version two!"
    assert sorted(p.name for p in (source.images_path / "data").iterdir()) == [image.id]


def test_a_corrupt_index_is_a_one_line_image_unavailable(
        source: LocalImageSource, tmp_path: Path) -> None:
    source.add_image(ALICE, write(tmp_path / "img", b"x"))
    (source.images_path / "index.json").write_text("{not json")

    with pytest.raises(ImageUnavailable, match=r"index\.json is corrupt") as err:
        source.list_images(ALICE)
    assert "\n" not in str(err.value)


def test_a_second_source_on_the_same_directory_sees_the_same_images(
        source: LocalImageSource, images_path: Path, tmp_path: Path) -> None:
    image = source.add_image(ALICE, write(tmp_path / "img", b"x"), visibility="private")

    other: Image = LocalImageSource(images_path).get_image(ALICE, image.id)

    assert other == image


ADDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ivcache.adapters.images.local import LocalImageSource
    from ivcache.core.model import RequestContext

    images, project, count, src, go = sys.argv[1:]
    source = LocalImageSource(Path(images))
    ctx = RequestContext.for_project(project)
    while not Path(go).exists():  # start together, so the index writes really contend
        time.sleep(0.001)
    for i in range(int(count)):
        source.add_image(ctx, Path(src), name=f"{project}-{i}")
""")


def test_concurrent_adds_from_two_processes_all_land_in_the_index(
        source: LocalImageSource, images_path: Path, tmp_path: Path) -> None:
    src = write(tmp_path / "img", os.urandom(100_000))
    go = tmp_path / "go"
    count = 25
    procs = [
        subprocess.Popen([sys.executable, "-c", ADDER, str(images_path), project, str(count),
                          str(src), str(go)], stderr=subprocess.PIPE, text=True)
        for project in ("alice", "bob")
    ]
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]

    assert [p.returncode for p in procs] == [0, 0], errors
    listed = source.list_images(ADMIN)
    assert sorted(i.name for i in listed) == sorted(
        f"{p}-{i}" for p in ("alice", "bob") for i in range(count))
    assert {i.os_hash_value for i in listed} == {file_hashes(src)[0]}
    assert sorted(p.name for p in (images_path / "data").iterdir()) == sorted(
        i.id for i in listed)
    assert not [p for p in images_path.iterdir() if p.name.startswith(".index.json.")]

"""Real images through the whole pipeline (DESIGN §9): every format that qemu-img makes, on
every storage backend of the contract suite, from the local image source and from a real
glance-api; each volume compared byte for byte with ``qemu-img convert -O raw`` of its
image. And every malicious or lying image refused with one clear error, leaving nothing:
no entry, no volume, no scratch file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from ivcache.adapters.convert import FormatPolicy, ImagePipeline
from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.memory import InMemoryImageSource, InMemoryUnitOfWork, RecordingNotifier
from ivcache.adapters.storage import RbdStorage
from ivcache.core.errors import (
    ChecksumMismatch,
    ConversionFailed,
    CorruptImage,
    ImageError,
    ImageFormatMismatch,
    ImageNotActive,
    InvalidSize,
    IvcacheError,
    NoScratchSpace,
    UnsafeImage,
    UnsupportedImage,
)
from ivcache.core.model import GIB, Image, Outcome, RequestContext
from ivcache.core.policy import CachePolicy
from ivcache.core.ports import ImageSource, StorageBackend
from ivcache.core.service import CacheService
from tests.integration.test_storage_contract import KITS, Kit
from tests.support.glance_server import GlanceServer
from tests.support.images import GOOD, MIB, Made, make_images, qemu_img

pytestmark = pytest.mark.qcow2  # every test runs the real qemu-img

CTX = RequestContext.for_project("alice")
ALLOW_GZIP = FormatPolicy(allow_compressed=True)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    try:
        return make_images(tmp_path_factory.mktemp("images"))
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(params=[pytest.param(name, marks=kit.marks) for name, kit in KITS.items()])
def kit(request: pytest.FixtureRequest) -> Kit:
    chosen = KITS[request.param]
    for name in chosen.fixtures:
        request.getfixturevalue(name)
    return chosen


@pytest.fixture
def storage(kit: Kit, tmp_path: Path) -> Iterator[StorageBackend]:
    made = kit.make(tmp_path / "storage", 0)
    try:
        yield made
        if kit.check is not None:
            kit.check(made)
    finally:
        if isinstance(made, RbdStorage):
            made.close()


@attrs.define
class Rig:
    """A service on one backend and one image source, converting into ``scratch``."""

    kit: Kit
    storage: StorageBackend
    source: ImageSource
    scratch: Path
    service: CacheService

    def read(self, volume_id: str, offset: int, length: int) -> bytes:
        return self.kit.read(self.storage, self.storage.get_volume(volume_id), offset, length)

    def assert_is_disk(self, volume_id: str, made: Made) -> None:
        """The volume starts with what qemu-img makes of the image, and is zeros after."""
        assert made.reference is not None
        expected = made.reference.read_bytes()
        assert self.read(volume_id, 0, len(expected)) == expected
        end = self.storage.get_volume(volume_id).size_gb * GIB
        assert self.read(volume_id, len(expected), MIB) == bytes(MIB)
        assert self.read(volume_id, end - MIB, MIB) == bytes(MIB)

    def assert_nothing_left(self) -> None:
        assert self.service.list_entries() == []
        assert self.storage.list_volumes() == []
        assert self.service.stats().count == 0
        assert scratch_files(self.scratch) == []


def scratch_files(scratch: Path) -> list[str]:
    return sorted(p.name for p in scratch.iterdir()) if scratch.exists() else []


def rig(kit: Kit, storage: StorageBackend, source: ImageSource, tmp_path: Path, *,
        policy: FormatPolicy = ALLOW_GZIP, scratch: Path | None = None,
        enabled: bool = True) -> Rig:
    scratch = scratch or tmp_path / "scratch"
    service = CacheService(host="node-1", storage=storage, images=source,
                           uow=InMemoryUnitOfWork(), notifier=RecordingNotifier(),
                           policy=CachePolicy(enabled=enabled),
                           converter=ImagePipeline(scratch, policy=policy))
    return Rig(kit, storage, source, scratch, service)


def add_local(source: LocalImageSource, made: Made) -> Image:
    return source.add_image(CTX, made.path, disk_format=made.disk_format,
                            container_format=made.container_format)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text.strip(), text
    return text


# ------------------------------------------------------------------ every format, every backend

@pytest.mark.parametrize("name", list(GOOD))
def test_every_format_from_the_local_source_becomes_the_disk_qemu_img_makes_of_it(
        name: str, kit: Kit, storage: StorageBackend, images: dict[str, Made],
        tmp_path: Path) -> None:
    made = images[name]
    source = LocalImageSource(tmp_path / "images")
    image = add_local(source, made)
    r = rig(kit, storage, source, tmp_path)

    miss = r.service.create_volume(CTX, image.id, 1)
    hit = r.service.create_volume(CTX, image.id, 2)

    assert (image.disk_format, image.container_format) == GOOD[name]
    assert made.reference is not None
    assert image.virtual_size == made.reference.stat().st_size
    assert (miss.outcome, hit.outcome) == (Outcome.MISS, Outcome.HIT)
    r.assert_is_disk(miss.volume.id, made)
    r.assert_is_disk(hit.volume.id, made)
    [entry] = r.service.list_entries()
    assert entry.size_gb == 1
    r.assert_is_disk(entry.volume_id, made)
    assert scratch_files(r.scratch) == []


@pytest.mark.parametrize("name", ["qcow2", "vmdk-stream", "qcow2-gzip"])
def test_with_the_cache_disabled_the_users_volume_is_converted_directly(
        name: str, images: dict[str, Made], tmp_path: Path) -> None:
    kit = KITS["file"]
    storage = kit.make(tmp_path / "storage", 0)
    source = LocalImageSource(tmp_path / "images")
    image = add_local(source, images[name])
    r = rig(kit, storage, source, tmp_path, enabled=False)

    made = r.service.create_volume(CTX, image.id, 2)

    assert made.outcome is Outcome.DISABLED
    r.assert_is_disk(made.volume.id, images[name])
    assert [v.id for v in storage.list_volumes()] == [made.volume.id]
    assert scratch_files(r.scratch) == []


def test_a_download_is_spooled_to_a_scratch_file_that_is_gone_afterwards(
        images: dict[str, Made], tmp_path: Path) -> None:
    # The in-memory source is not a local file: qemu-img needs the spooled copy.
    made = images["vhdx"]
    source = InMemoryImageSource()
    image = source.add(Image(id="img", name="img", disk_format="vhdx"), made.path.read_bytes())
    kit = KITS["fake_lvm"]
    r = rig(kit, kit.make(tmp_path / "storage", 0), source, tmp_path)
    seen: list[list[str]] = []
    convert = r.service.converter
    assert isinstance(convert, ImagePipeline)
    original = convert.qemu.convert

    def spying(*args: object, **kw: object) -> None:
        seen.append(scratch_files(r.scratch))
        original(*args, **kw)  # type: ignore[arg-type]

    convert.qemu.convert = spying  # type: ignore[method-assign]
    result = r.service.create_volume(CTX, image.id, 1)

    assert made.reference is not None
    r.assert_is_disk(result.volume.id, made)
    # While qemu-img ran: the spooled download, then for a backend without a raw file the
    # raw output too, both named by this process; none afterwards.
    [files] = seen
    assert {Path(n).suffix for n in files} == {".spool", ".raw"}
    assert all(n.startswith(f".tmp-{os.getpid()}.") for n in files)
    assert scratch_files(r.scratch) == []


# ------------------------------------------------------------------ what is refused

def _big_qcow2(tmp_path: Path) -> Path:
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(3 * GIB))
    return path


@attrs.frozen
class Bad:
    """A bad image: which file, declared how, under which policy, and what it must raise."""

    made: str
    error: type[IvcacheError]
    says: str
    disk_format: str | None = None  # declared; default: the made image's own
    container_format: str = "bare"
    policy: FormatPolicy = ALLOW_GZIP
    read: bool = True  # whether any of its data may be read before the refusal


BAD_INPUTS: dict[str, Bad] = {
    "qcow2 with a backing file": Bad("qcow2-backing-file", UnsafeImage, "backing file"),
    "qcow2 with an external data file": Bad("qcow2-data-file", UnsafeImage, "data_file"),
    "vmdk monolithicFlat naming /etc/passwd": Bad("vmdk-flat-extent", UnsafeImage,
                                                  "create-type monolithicflat"),
    "vmdk monolithicFlat even when the type is allowed": Bad(
        "vmdk-flat-extent", UnsafeImage, "safety checks",
        policy=FormatPolicy(vmdk_allowed_types=("monolithicFlat",))),
    "a sparse vmdk when only streamOptimized is allowed": Bad(
        "vmdk", UnsafeImage, "not one of vmdk_allowed_types (streamOptimized)",
        policy=FormatPolicy(vmdk_allowed_types=("streamOptimized",))),
    "a raw-declared qcow2": Bad("qcow2", ImageFormatMismatch,
                                "claims to be raw but its data is qcow2", disk_format="raw"),
    "a qcow2-declared raw": Bad("raw", ImageFormatMismatch,
                                "claims to be qcow2 but its data is raw", disk_format="qcow2"),
    "a vmdk-declared vhdx": Bad("vhdx", ImageFormatMismatch, "claims to be vmdk",
                                disk_format="vmdk"),
    "a truncated qcow2": Bad("qcow2-truncated", CorruptImage, "corrupt"),
    "qed": Bad("qed", UnsupportedImage, "qed images are never accepted", read=False),
    "qed data declared qcow2": Bad("qed", UnsupportedImage, "image bad is qed",
                                   disk_format="qcow2"),
    "gzip data without allow_compression_on_image_upload": Bad(
        "raw-gzip", UnsupportedImage, "allow_compression_on_image_upload = true",
        container_format="compressed", policy=FormatPolicy(), read=False),
    "a compressed image whose data is not gzip": Bad(
        "qcow2", UnsupportedImage, "not gzip", container_format="compressed"),
    "an unsupported container": Bad("raw", UnsupportedImage, "container_format 'ova'",
                                    container_format="ova", read=False),
    "a qcow2 when image_conversion_disable is set": Bad(
        "qcow2", UnsupportedImage, "image_conversion_disable = true",
        policy=FormatPolicy(conversion_disabled=True), read=False),
}


def _serve(source: InMemoryImageSource, made: Made, bad: Bad) -> Image:
    return source.add(Image(id="bad", name="bad", disk_format=bad.disk_format or made.disk_format,
                            container_format=bad.container_format), made.path.read_bytes())


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_image_is_one_clear_error_and_leaves_nothing_on_any_backend(
        case: str, kit: Kit, storage: StorageBackend, images: dict[str, Made],
        tmp_path: Path) -> None:
    bad = BAD_INPUTS[case]
    source = InMemoryImageSource()
    image = _serve(source, images[bad.made], bad)
    r = rig(kit, storage, source, tmp_path, policy=bad.policy)

    with pytest.raises(bad.error) as raised:
        r.service.create_volume(CTX, image.id, 1)

    assert bad.says in one_line(raised.value)
    assert isinstance(raised.value, ImageError)
    assert source.downloads == (1 if bad.read else 0)
    r.assert_nothing_left()


def test_a_qcow2_larger_than_the_size_asked_is_refused_before_the_download(
        tmp_path: Path) -> None:
    big = _big_qcow2(tmp_path)
    source = InMemoryImageSource()
    image = source.add(Image(id="big", name="big", disk_format="qcow2",
                             virtual_size=3 * GIB), big.read_bytes())
    kit = KITS["file"]
    r = rig(kit, kit.make(tmp_path / "storage", 0), source, tmp_path)

    with pytest.raises(InvalidSize, match=r"size 1 GiB is too small for image big.*3 GiB"):
        r.service.create_volume(CTX, image.id, 1)

    assert source.downloads == 0
    r.assert_nothing_left()


@pytest.mark.parametrize("enabled", [True, False], ids=["cached", "uncached"])
def test_a_qcow2_whose_header_says_more_than_the_size_asked_is_refused_before_a_volume(
        enabled: bool, tmp_path: Path) -> None:
    # The source does not know the virtual size: the inspector tells it from the header.
    big = _big_qcow2(tmp_path)
    source = InMemoryImageSource()
    image = source.add(Image(id="big", name="big", disk_format="qcow2"), big.read_bytes())
    kit = KITS["file"]
    r = rig(kit, kit.make(tmp_path / "storage", 0), source, tmp_path, enabled=enabled)

    with pytest.raises(InvalidSize, match=r"size 2 GiB is too small.*qcow2 disk is 3 GiB"):
        r.service.create_volume(CTX, image.id, 2)

    r.assert_nothing_left()
    made = r.service.create_volume(CTX, image.id, 3)
    assert made.volume.size_gb == 3
    if enabled:
        assert [e.size_gb for e in r.service.list_entries()] == [3]


def _random_qcow2(tmp_path: Path) -> bytes:
    """A qcow2 of 24 MiB of random data: it cannot be smaller than its data."""
    raw = tmp_path / "random.raw"
    raw.write_bytes(os.urandom(24 * MIB))
    qcow2 = tmp_path / "random.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    return qcow2.read_bytes()


class CountingSource(InMemoryImageSource):
    """Counts the chunks of image data handed out."""

    chunks_read = 0

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        for chunk in super().open_data(ctx, image_id):
            self.chunks_read += 1
            yield chunk


def test_a_scratch_directory_too_small_for_the_image_is_refused_before_the_download(
        small_fs: Path, tmp_path: Path) -> None:
    # 24 MiB of random data: a qcow2 larger than the 16 MiB scratch filesystem.
    source = CountingSource()
    image = source.add(Image(id="img", name="img", disk_format="qcow2"),
                       _random_qcow2(tmp_path))
    kit = KITS["file"]
    r = rig(kit, kit.make(tmp_path / "storage", 0), source, tmp_path,
            scratch=small_fs / "scratch")

    with pytest.raises(NoScratchSpace) as raised:
        r.service.create_volume(CTX, image.id, 1)

    message = one_line(raised.value)
    assert str(small_fs / "scratch") in message and "too little for image img" in message
    assert source.chunks_read == 0
    r.assert_nothing_left()


def test_a_scratch_directory_that_fills_up_midway_is_one_error_and_nothing_is_left(
        small_fs: Path, tmp_path: Path) -> None:
    # Without a known size nothing can be checked up front: the spool runs out of room.
    source = InMemoryImageSource()
    image = source.add(Image(id="img", name="img", disk_format="qcow2"),
                       _random_qcow2(tmp_path), with_hash=False)
    kit = KITS["file"]
    r = rig(kit, kit.make(tmp_path / "storage", 0), source, tmp_path,
            scratch=small_fs / "scratch")

    with pytest.raises(NoScratchSpace, match="filled up while image img was converted"):
        r.service.create_volume(CTX, image.id, 1)

    r.assert_nothing_left()


def test_the_local_source_refuses_bad_images_when_they_are_added(
        images: dict[str, Made], tmp_path: Path) -> None:
    source = LocalImageSource(tmp_path / "images")
    refused = {
        "qcow2-backing-file": (None, UnsafeImage),
        "qcow2-data-file": (None, UnsafeImage),
        "vmdk-flat-extent": (None, UnsafeImage),
        "qed": (None, UnsupportedImage),
        "qcow2": ("raw", ImageFormatMismatch),
        "raw": ("qcow2", ImageFormatMismatch),
    }
    for name, (declared, error) in refused.items():
        with pytest.raises(error):
            source.add_image(CTX, images[name].path, disk_format=declared)
    assert source.list_images(CTX) == []
    data = tmp_path / "images" / "data"
    assert not data.exists() or list(data.iterdir()) == []


def test_a_truncated_qcow2_added_locally_is_refused_when_used(
        kit: Kit, storage: StorageBackend, images: dict[str, Made], tmp_path: Path) -> None:
    # Its header is sound, so the add takes it; qemu-img check finds it cut short.
    source = LocalImageSource(tmp_path / "images")
    image = add_local(source, images["qcow2-truncated"])
    r = rig(kit, storage, source, tmp_path)

    with pytest.raises(CorruptImage, match="corrupt"):
        r.service.create_volume(CTX, image.id, 1)

    r.assert_nothing_left()


def _flip_last_data_byte(qcow2: Path) -> None:
    """Change one byte of the disk's last data cluster: the header and tables stay sound, so
    only the hash can tell."""
    extents = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(qcow2)))
    last = max((e for e in extents if e["data"] and "offset" in e),
               key=lambda e: e["offset"] + e["length"])
    at = last["offset"] + last["length"] - 1
    with open(qcow2, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("enabled", [True, False], ids=["cached", "uncached"])
def test_a_local_qcow2_whose_hash_fails_while_qemu_img_converts_it_leaves_nothing(
        kit: Kit, storage: StorageBackend, images: dict[str, Made], tmp_path: Path,
        enabled: bool) -> None:
    # The head passes its checks, so qemu-img converts the file while the rest of it is
    # hashed (in a thread): the mismatch is found after qemu-img wrote into the volume (or
    # into the scratch file streamed into it, for a backend without a raw file).
    source = LocalImageSource(tmp_path / "images")
    image = add_local(source, images["qcow2"])
    _flip_last_data_byte(source.images_path / "data" / image.id)
    r = rig(kit, storage, source, tmp_path, enabled=enabled)
    converter = r.service.converter
    assert isinstance(converter, ImagePipeline)
    original = converter.qemu.convert
    volumes_while_converted: list[list[str]] = []

    def spying(*args: object, **kw: object) -> None:
        original(*args, **kw)  # type: ignore[arg-type]
        volumes_while_converted.append([v.id for v in storage.list_volumes()])

    converter.qemu.convert = spying  # type: ignore[method-assign]

    with pytest.raises(ChecksumMismatch) as raised:
        r.service.create_volume(CTX, image.id, 1)

    assert f"image {image.id}" in one_line(raised.value)
    [made] = volumes_while_converted  # converted, into a volume that then went
    assert len(made) == 1
    r.assert_nothing_left()
    assert not [t for t in threading.enumerate() if t.name == "ivcache-image-read"]


def test_a_local_qcow2_that_qemu_img_refuses_stops_the_read_beside_it(
        images: dict[str, Made], tmp_path: Path) -> None:
    # qemu-img fails while the thread still reads: its error is the one told, and the
    # thread is stopped before the image file is closed.
    kit = KITS["file"]
    storage = kit.make(tmp_path / "storage", 0)
    source = LocalImageSource(tmp_path / "images")
    image = add_local(source, images["qcow2"])
    r = rig(kit, storage, source, tmp_path)
    converter = r.service.converter
    assert isinstance(converter, ImagePipeline)

    def failing(*args: object, **kw: object) -> None:
        raise ConversionFailed("qemu-img could not convert it")

    converter.qemu.convert = failing  # type: ignore[method-assign]

    with pytest.raises(ConversionFailed, match="could not convert"):
        r.service.create_volume(CTX, image.id, 1)

    r.assert_nothing_left()
    assert not [t for t in threading.enumerate() if t.name == "ivcache-image-read"]


# ------------------------------------------------------------------ scratch files after a crash

def _leave_dead_scratch_file(scratch: Path, size: int) -> Path:
    """A scratch file as a process that died mid-conversion leaves it: named by that process."""
    scratch.mkdir(parents=True, exist_ok=True)
    code = ("import os, sys; from pathlib import Path; "
            "from ivcache.adapters.storage._files import open_temp; "
            "p, fd = open_temp(Path(sys.argv[1]), '.spool'); os.ftruncate(fd, int(sys.argv[2]));"
            " print(p)")
    out = subprocess.run([sys.executable, "-c", code, str(scratch), str(size)],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_reconcile_reports_a_dead_conversions_scratch_file_and_fix_removes_it(
        tmp_path: Path) -> None:
    kit = KITS["file"]
    r = rig(kit, kit.make(tmp_path / "storage", 0), InMemoryImageSource(), tmp_path)
    left = _leave_dead_scratch_file(r.scratch, 12345)
    ours = r.scratch / ".tmp-not-a-dead-owner"
    ours.write_bytes(b"x")

    found = r.service.reconcile()
    assert [(f.kind, f.path, f.size, f.fixed) for f in found] == [
        ("scratch-file", str(left), 12345, False)]
    assert left.exists()

    fixed = r.service.reconcile(fix=True)
    assert [(f.kind, f.fixed) for f in fixed] == [("scratch-file", True)]
    assert not left.exists() and ours.exists()
    assert r.service.reconcile() == []


def test_the_next_conversion_reaps_a_dead_conversions_scratch_file(
        images: dict[str, Made], tmp_path: Path) -> None:
    source = InMemoryImageSource()
    image = source.add(Image(id="img", name="img", disk_format="qcow2"),
                       images["qcow2"].path.read_bytes())
    kit = KITS["file"]
    r = rig(kit, kit.make(tmp_path / "storage", 0), source, tmp_path)
    left = _leave_dead_scratch_file(r.scratch, 1000)

    r.service.create_volume(CTX, image.id, 1)

    assert not left.exists()
    assert scratch_files(r.scratch) == []


# ------------------------------------------------------------------ from a real Glance

@pytest.fixture(scope="session")
def glance_images(glance: GlanceServer, images: dict[str, Made]) -> dict[str, str]:
    """Every good image uploaded to the session's glance-api, public, as declared."""
    who = GlanceServer.identity(f"uploader-{uuid.uuid4().hex[:8]}", admin=True)
    return {name: glance.create_image(who, images[name].path.read_bytes(), name=name,
                                      visibility="public", disk_format=fmt,
                                      container_format=container)
            for name, (fmt, container) in GOOD.items()}


def _glance_source(glance: GlanceServer) -> ImageSource:
    from ivcache.adapters.images.glance import GlanceImageSource
    return GlanceImageSource(url=glance.url, auth="trusted-headers", backoff=0.01)


@pytest.mark.glance
@pytest.mark.parametrize("name", list(GOOD))
def test_every_format_from_glance_becomes_the_disk_qemu_img_makes_of_it(
        name: str, glance: GlanceServer, glance_images: dict[str, str],
        images: dict[str, Made], tmp_path: Path) -> None:
    kit = KITS["file"]
    source = _glance_source(glance)
    r = rig(kit, kit.make(tmp_path / "storage", 0), source, tmp_path)
    image = source.get_image(CTX, glance_images[name])

    miss = r.service.create_volume(CTX, image.id, 1)
    hit = r.service.create_volume(CTX, image.id, 1)

    assert (image.disk_format, image.container_format) == GOOD[name]
    assert (miss.outcome, hit.outcome) == (Outcome.MISS, Outcome.HIT)
    r.assert_is_disk(miss.volume.id, images[name])
    r.assert_is_disk(hit.volume.id, images[name])
    assert scratch_files(r.scratch) == []


@pytest.mark.glance
def test_a_qcow2_from_glance_becomes_its_disk_on_every_backend(
        kit: Kit, storage: StorageBackend, glance: GlanceServer,
        glance_images: dict[str, str], images: dict[str, Made], tmp_path: Path) -> None:
    r = rig(kit, storage, _glance_source(glance), tmp_path)

    miss = r.service.create_volume(CTX, glance_images["qcow2-compressed"], 1)
    hit = r.service.create_volume(CTX, glance_images["qcow2-compressed"], 2)

    assert (miss.outcome, hit.outcome) == (Outcome.MISS, Outcome.HIT)
    r.assert_is_disk(miss.volume.id, images["qcow2-compressed"])
    r.assert_is_disk(hit.volume.id, images["qcow2-compressed"])
    assert scratch_files(r.scratch) == []


@pytest.mark.glance
def test_glance_takes_a_raw_declared_qcow2_and_ivcache_refuses_it(
        glance: GlanceServer, images: dict[str, Made], tmp_path: Path) -> None:
    who = GlanceServer.identity(CTX.project_id)
    image_id = glance.create_image(who, images["qcow2"].path.read_bytes(), disk_format="raw")
    assert glance.get(who, image_id)["status"] == "active"  # Glance let it through
    kit = KITS["file"]
    r = rig(kit, kit.make(tmp_path / "storage", 0), _glance_source(glance), tmp_path)

    with pytest.raises(ImageFormatMismatch, match="claims to be raw but its data is qcow2"):
        r.service.create_volume(CTX, image_id, 1)

    r.assert_nothing_left()


@pytest.mark.glance
@pytest.mark.parametrize(("name", "declared"), [("qcow2-backing-file", "qcow2"),
                                                ("raw", "qcow2")])
def test_glance_itself_refuses_some_bad_uploads_and_ivcache_never_serves_them(
        name: str, declared: str, glance: GlanceServer, images: dict[str, Made],
        tmp_path: Path) -> None:
    who = GlanceServer.identity(CTX.project_id)
    label = f"refused-{uuid.uuid4().hex[:8]}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        glance.create_image(who, images[name].path.read_bytes(), disk_format=declared,
                            name=label)
    # Glance answers its own format checks' refusal (InvalidImageData) with a 415.
    assert refused.value.code == 415
    [queued] = [i for i in glance.call(who, "GET", "/images")["images"] if i["name"] == label]
    assert queued["status"] != "active"
    kit = KITS["file"]
    r = rig(kit, kit.make(tmp_path / "storage", 0), _glance_source(glance), tmp_path)

    with pytest.raises(ImageNotActive):
        r.service.create_volume(CTX, queued["id"], 1)

    r.assert_nothing_left()
    glance.delete(who, queued["id"])

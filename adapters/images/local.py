"""A directory of image files with a JSON index: the embedded default image source.

Layout under ``images_path``::

    index.json      {"format": 1, "images": {id: {Image fields}}}, replaced atomically
    .index.lock     flock'ed around every read-modify-write of the index
    data/<id>       the image's bytes, sparse where the source had zeros

Visibility follows Glance (and ``InMemoryImageSource``): a public (or community) image is
seen by everyone, a private one by its owner project and by admins. ``get_image`` raises
``ImageNotFound`` for an unknown id, an invisible image and an id that is not a safe file
name alike, so a caller cannot tell them apart.

An image's disk format is detected when it is added, by the same inspection and rules as
the image pipeline's (``adapters.convert.formats``), and its virtual size recorded; a
declared format the data does not have, or data that fails a safety check, is refused
there, as Glance refuses such an upload.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs

from ivcache.adapters.convert.formats import (
    CONTAINERS,
    FormatPolicy,
    decide,
    gunzip,
    inspect,
    judge,
)
from ivcache.core.errors import (
    ImageError,
    ImageNotFound,
    ImageUnavailable,
    InvalidIdentifier,
    InvalidRequest,
)
from ivcache.core.model import Image, NewImage, RequestContext, check_id, new_id

__all__ = ["LocalImageSource"]

_INDEX_FORMAT = 1
_VISIBILITIES = ("public", "private")


@attrs.frozen
class _Copied:
    """What was learnt about an image's bytes while copying them."""

    size: int
    virtual_size: int
    disk_format: str
    sha512: str
    md5: str


class LocalImageSource:
    """Images as files in ``images_path``; implements the ``ImageSource`` port.

    Safe for several threads and processes (CLI invocations) sharing one directory: data
    files are written under a temporary name and renamed, and the index is rewritten whole
    (temp + rename) under an exclusive ``flock``, so readers need no lock and never see a
    half-written index.
    """

    def __init__(self, images_path: Path, *, chunk_size: int = 1 << 20) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self.images_path = Path(images_path)
        self.chunk_size = chunk_size
        self._index_path = self.images_path / "index.json"
        self._lock_path = self.images_path / ".index.lock"
        self._data_dir = self.images_path / "data"

    # -- the ImageSource port ------------------------------------------------------------

    def get_image(self, ctx: RequestContext, image_id: str) -> Image:
        """The image's metadata; ``ImageNotFound`` if unknown, invisible or a bad id."""
        image = self._read_index().get(_safe_id(image_id))
        if image is None or not _visible(ctx, image):
            raise ImageNotFound(image_id)
        return image

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        """The image's bytes in chunks of ``chunk_size`` (the last may be shorter).

        Visibility is checked now, not at the first ``next()``, so a caller that is not
        allowed fails before it creates anything. The bytes are not verified here: the
        core hashes them while streaming and compares with ``os_hash_value``.
        """
        image = self.get_image(ctx, image_id)
        path = self._data_path(image.id)
        if not path.is_file():
            raise ImageUnavailable(f"image {image.id}: its data file {path} is missing")
        return self._chunks(image.id, path)

    def list_images(self, ctx: RequestContext) -> list[Image]:
        """The images ``ctx`` may see, by name then id."""
        visible = [i for i in self._read_index().values() if _visible(ctx, i)]
        return sorted(visible, key=lambda i: (i.name, i.id))

    # -- managing images (the ``image add`` command, and tests) -----------------------------

    def add_image(self, ctx: RequestContext, src: Path, *, name: str | None = None,
                  visibility: str = "public",
                  progress: Callable[[int], None] | None = None,
                  disk_format: str | None = None,
                  container_format: str = "bare") -> Image:
        """Copy ``src`` into the directory as a new active image owned by ``ctx``'s project.

        ``name`` defaults to the file's name. ``progress`` is called after each chunk with
        the number of bytes just copied (a delta, as ``click.progressbar.update`` takes).
        The copy keeps holes; hashes (sha512, md5), the disk format and the virtual size are
        found on the way, in one read (of the gzip data's content, for
        ``container_format = compressed``). ``disk_format`` is what the file is declared to
        be (None: whatever it is).

        Raises ``InvalidRequest`` if ``src`` cannot be read, ``visibility`` is not
        ``public`` or ``private`` or ``container_format`` not ``bare`` or ``compressed``; an
        ``ImageError`` (``ImageFormatMismatch``, ``UnsafeImage``...) if the data is not what
        is declared or is refused; ``ImageUnavailable`` if the directory cannot be written.
        """
        if visibility not in _VISIBILITIES:
            raise InvalidRequest(
                f"visibility must be 'public' or 'private', not {visibility!r}")
        if container_format not in CONTAINERS:
            raise InvalidRequest(f"container format must be one of {', '.join(CONTAINERS)}, "
                                 f"not {container_format!r}")
        src = Path(src)
        image_id = new_id()
        path = self._data_path(image_id)
        copied = self._copy_in(src, path, progress, declared=disk_format,
                               compressed=container_format == "compressed")
        image = Image(
            id=image_id,
            name=src.name if name is None else name,
            size=copied.size,
            virtual_size=copied.virtual_size,
            min_disk=0,
            updated_at=_now(),
            owner=ctx.project_id,
            visibility=visibility,
            status="active",
            os_hash_algo="sha512",
            os_hash_value=copied.sha512,
            checksum=copied.md5,
            disk_format=copied.disk_format,
            container_format=container_format,
        )
        try:
            with self._locked_index() as images:
                images[image.id] = image
        except BaseException:
            # The data file is only reachable through the index: without its row it
            # would be an orphan nobody ever deletes.
            path.unlink(missing_ok=True)
            raise
        return image

    def upload_image(self, ctx: RequestContext, spec: NewImage,
                     data: Callable[[Image], Iterable[bytes]]) -> Image:
        """A new image owned by ``ctx``'s project, its bytes ``data(image)``'s (the
        ``ImageUploader`` port): queued in the index first, so that its id is known before a
        byte moves; active once the bytes are stored, with the hashes (sha512, md5) this
        source computed of what it wrote, and the format and virtual size it found in them
        (a declared format the bytes do not have is refused, as by ``add_image``).

        Visibility: ``public`` unless ``spec`` says ``private``. If anything fails, the
        image is gone again (row and data) and the error propagates.
        """
        visibility = spec.visibility or "public"
        if visibility not in _VISIBILITIES:
            raise InvalidRequest(
                f"visibility must be 'public' or 'private', not {visibility!r}")
        if spec.container_format != "bare":
            raise InvalidRequest("an uploaded image's container format is bare, not "
                                 f"{spec.container_format!r}")
        queued = Image(id=new_id(), name=spec.name, updated_at=_now(), owner=ctx.project_id,
                       visibility=visibility, status="queued", disk_format=spec.disk_format,
                       container_format=spec.container_format)
        with self._locked_index() as images:
            images[queued.id] = queued
        path = self._data_path(queued.id)
        try:
            copied = self._store(iter(data(queued)), f"image {queued.id}", path, None,
                                 declared=spec.disk_format, compressed=False)
            with self._locked_index() as images:
                if queued.id not in images:
                    raise ImageNotFound(queued.id)  # deleted while its bytes came in
                image = attrs.evolve(
                    queued, size=copied.size, virtual_size=copied.virtual_size,
                    disk_format=copied.disk_format, os_hash_algo="sha512",
                    os_hash_value=copied.sha512, checksum=copied.md5, status="active",
                    updated_at=_later(queued.updated_at))
                images[image.id] = image
        except BaseException:
            with contextlib.suppress(ImageError), self._locked_index() as images:
                images.pop(queued.id, None)
            path.unlink(missing_ok=True)
            raise
        return image

    def delete_image(self, ctx: RequestContext, image_id: str) -> None:
        """Delete the image and its data; only its owner project or an admin may.

        ``ImageNotFound`` if ``ctx`` cannot see it; ``ImageError`` if it can see it (a
        public image of another project) but may not delete it.
        """
        with self._locked_index() as images:
            image = images.get(_safe_id(image_id))
            if image is None or not _visible(ctx, image):
                raise ImageNotFound(image_id)
            if not (ctx.is_admin or image.owner == ctx.project_id):
                # core.errors has no ImageForbidden yet (DESIGN §2 lists it).
                raise ImageError(
                    f"image {image_id} belongs to project {image.owner}: only that "
                    "project or an admin may delete it")
            del images[image.id]
        # After the index, so the image is gone for readers before its bytes are; a
        # stream already open keeps reading the unlinked file.
        self._data_path(image.id).unlink(missing_ok=True)

    def update_image(self, image_id: str, **changes: Any) -> Image:
        """Change metadata fields as the image service would (for tests and tools).

        ``updated_at`` moves forward unless given. No identity is checked: this is the
        operator's or test's back door, not a user's call.
        """
        if "id" in changes:
            raise InvalidRequest("an image's id cannot be changed")
        with self._locked_index() as images:
            image = images.get(_safe_id(image_id))
            if image is None:
                raise ImageNotFound(image_id)
            changes.setdefault("updated_at", _later(image.updated_at))
            image = attrs.evolve(image, **changes)
            images[image.id] = image
        return image

    def replace_data(self, image_id: str, src: Path, *,
                     progress: Callable[[int], None] | None = None) -> Image:
        """Replace the image's bytes with ``src``'s, as if it were re-uploaded.

        Size, virtual size, format and hashes are recomputed and ``updated_at`` moves
        forward, so a cached copy of the old bytes becomes stale.
        """
        image_id = _safe_id(image_id)
        if image_id not in self._read_index():
            raise ImageNotFound(image_id)  # before copying gigabytes for nothing
        tmp = self._data_dir / f".replace-{image_id}-{uuid.uuid4().hex}"
        current = self._read_index()[image_id]
        copied = self._copy_in(Path(src), tmp, progress, declared=None,
                               compressed=current.container_format == "compressed")
        try:
            with self._locked_index() as images:
                image = images.get(image_id)
                if image is None:
                    raise ImageNotFound(image_id)
                image = attrs.evolve(
                    image, size=copied.size, virtual_size=copied.virtual_size,
                    disk_format=copied.disk_format, os_hash_algo="sha512",
                    os_hash_value=copied.sha512, checksum=copied.md5,
                    updated_at=_later(image.updated_at))
                # Readers take no lock, so one that read the old row just before this
                # may stream the new bytes: the core's hash check then fails that one
                # request (ChecksumMismatch) rather than caching wrong bytes.
                os.replace(tmp, self._data_path(image_id))
                images[image_id] = image
        finally:
            tmp.unlink(missing_ok=True)
        return image

    # -- internals -----------------------------------------------------------------------

    def _data_path(self, image_id: str) -> Path:
        return self._data_dir / check_id("image", image_id)

    def _chunks(self, image_id: str, path: Path) -> _FileChunks:
        try:
            f = path.open("rb")
        except OSError as e:
            raise ImageUnavailable(
                f"image {image_id}: cannot read {path}: {e.strerror or e}") from None
        return _FileChunks(image_id, path, f, self.chunk_size)

    def _copy_in(self, src: Path, dst: Path, progress: Callable[[int], None] | None, *,
                 declared: str | None, compressed: bool) -> _Copied:
        """Copy ``src`` to ``dst`` (through a temp name), keeping holes, hashing and
        inspecting on the way."""
        try:
            # O_NONBLOCK: opening a FIFO would otherwise wait for a writer for ever; a
            # regular file ignores the flag.
            fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise InvalidRequest(f"cannot read image file {src}: {e.strerror or e}") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            what = "Is a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise InvalidRequest(f"cannot read image file {src}: {what} (give the path of a "
                                 "disk image file)")
        fin = os.fdopen(fd, "rb")
        with fin:
            return self._store(_read_file(fin, src, self.chunk_size), f"image file {src}",
                               dst, progress, declared=declared, compressed=compressed)

    def _store(self, chunks: Iterator[bytes], what: str, dst: Path,
               progress: Callable[[int], None] | None, *, declared: str | None,
               compressed: bool) -> _Copied:
        """Write ``chunks`` to ``dst`` (through a temp name), keeping holes, hashing and
        inspecting on the way."""
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ImageUnavailable(
                f"cannot write images into {self._data_dir}: {e.strerror or e}") from None
        tmp = dst.with_name(f".tmp-{dst.name}-{uuid.uuid4().hex}")
        try:
            copied = self._copy_sparse(chunks, what, tmp, progress, declared=declared,
                                       compressed=compressed)
            os.replace(tmp, dst)
        except OSError as e:
            raise ImageUnavailable(
                f"cannot write image into {self._data_dir}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return copied

    def _copy_sparse(self, chunks: Iterator[bytes], what: str, tmp: Path,
                     progress: Callable[[int], None] | None, *, declared: str | None,
                     compressed: bool) -> _Copied:
        sha512 = hashlib.sha512()
        # md5 is Glance's legacy ``checksum``, not a security control; the flag keeps it
        # working on FIPS-enabled hosts.
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        # 0600: a private image's bytes are no one else's to read on this host.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o600), "wb") as fout:

            def copied_chunks() -> Iterator[bytes]:
                nonlocal size
                for chunk in chunks:
                    sha512.update(chunk)
                    md5.update(chunk)
                    if chunk.count(0) == len(chunk):
                        # Seeking instead of writing leaves a hole: a mostly empty 10 GiB
                        # image costs its data, not 10 GiB.
                        fout.seek(len(chunk), os.SEEK_CUR)
                    else:
                        fout.write(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk

            # The copy is the inspectors' stream: one read copies, hashes and inspects (the
            # disk inside the gzip data, for a compressed image).
            stream = copied_chunks()
            wrapper = inspect(gunzip(what, stream) if compressed else stream)
            disk_bytes = sum(len(chunk) for chunk in wrapper)
            verdict = judge(what, declared, decide(wrapper), FormatPolicy())
            # A trailing hole was only seeked over: set the length explicitly.
            fout.truncate(size)
            fout.flush()
            # Durable before the rename makes it visible, so a crash never leaves a
            # short file under the final name.
            os.fsync(fout.fileno())
        return _Copied(size=size, virtual_size=verdict.virtual_size or disk_bytes,
                       disk_format=verdict.format, sha512=sha512.hexdigest(),
                       md5=md5.hexdigest())

    def _read_index(self) -> dict[str, Image]:
        """The index as it is now; no lock needed since writers replace it atomically."""
        try:
            text = self._index_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise ImageUnavailable(
                f"cannot read image index {self._index_path}: {e.strerror or e}") from None
        try:
            doc = json.loads(text)
            return {k: _image_from_json(v) for k, v in doc["images"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ImageUnavailable(
                f"image index {self._index_path} is corrupt ({e}); restore it from a "
                "backup") from None

    @contextlib.contextmanager
    def _locked_index(self) -> Iterator[dict[str, Image]]:
        """Read-modify-write of the index under an exclusive lock.

        The yielded dict is written back (temp + rename) when the block ends without an
        exception. ``flock`` locks belong to the open file description, so threads of one
        process exclude each other too, each having its own ``open``.
        """
        try:
            self.images_path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ImageUnavailable(
                f"cannot lock image index in {self.images_path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            images = self._read_index()
            yield images
            self._write_index(images)
        finally:
            os.close(fd)  # releases the flock

    def _write_index(self, images: dict[str, Image]) -> None:
        doc = {"format": _INDEX_FORMAT,
               "images": {k: _image_to_json(v) for k, v in sorted(images.items())}}
        tmp = self._index_path.with_name(f".index.json.{os.getpid()}.{uuid.uuid4().hex}")
        try:
            with tmp.open("x", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._index_path)
        except OSError as e:
            raise ImageUnavailable(
                f"cannot write image index {self._index_path}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)


class _FileChunks:
    """The chunks of one open image file, in order (the core's ``FileChunks``): the
    descriptor lets qemu-img read the very file whose bytes were hashed."""

    def __init__(self, image_id: str, path: Path, file: io.BufferedReader,
                 chunk_size: int) -> None:
        self._image_id = image_id
        self._path = path
        self._file = file
        self._chunk_size = chunk_size

    def __iter__(self) -> _FileChunks:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = self._file.read(self._chunk_size)
        except (OSError, ValueError) as e:  # ValueError: read after close
            raise ImageUnavailable(f"image {self._image_id}: cannot read {self._path}: "
                                   f"{getattr(e, 'strerror', None) or e}") from None
        if not chunk:
            raise StopIteration
        return chunk

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


def _read_file(fin: io.BufferedReader, src: Path, chunk_size: int) -> Iterator[bytes]:
    while True:
        try:
            chunk: bytes = fin.read(chunk_size)
        except OSError as e:
            raise InvalidRequest(f"cannot read image file {src}: {e.strerror or e}") from None
        if not chunk:
            return
        yield chunk


def _visible(ctx: RequestContext, image: Image) -> bool:
    # The same rule as InMemoryImageSource._visible, so unit tests on the fake hold here.
    return (ctx.is_admin or image.visibility in ("public", "community")
            or image.owner == ctx.project_id)


def _safe_id(image_id: str) -> str:
    """``image_id`` if it is a safe file name; else ``ImageNotFound``, as Glance's 404.

    Such an id cannot name an image, so "not found" is the truth; and it keeps the port's
    promise that a missing image is always ``ImageNotFound``.
    """
    try:
        return check_id("image", image_id)
    except InvalidIdentifier:
        raise ImageNotFound(image_id) from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _later(previous: dt.datetime | None) -> dt.datetime:
    """Now, but strictly after ``previous``: two edits within one microsecond must still
    look like two edits to a cache comparing ``updated_at``."""
    now = _now()
    if previous is not None and now <= previous:
        return previous + dt.timedelta(microseconds=1)
    return now


def _image_to_json(image: Image) -> dict[str, object]:
    doc = attrs.asdict(image)
    if image.updated_at is not None:
        doc["updated_at"] = image.updated_at.isoformat()
    return doc


def _image_from_json(doc: dict[str, Any]) -> Image:
    known = attrs.fields_dict(Image)
    # Ignore fields a newer ivcache may have written, rather than refusing the index.
    fields = {k: v for k, v in doc.items() if k in known}
    if fields.get("updated_at") is not None:
        fields["updated_at"] = dt.datetime.fromisoformat(fields["updated_at"])
    return Image(**fields)

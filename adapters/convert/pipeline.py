"""The image pipeline's converter: inspect on the stream, write raw as it comes, convert
the rest with qemu-img (the ``ImageConverter`` port; DESIGN §9).

For one image, in this order:

1. what the metadata alone refuses, before a byte is read (``formats.check_declared``);
   for an image to convert from a download, room for it in ``image_conversion_dir``;
2. the head of the data, through oslo.utils' inspectors, until the format is told; what
   it is and whether it passes (``formats.judge``);
3. raw (and iso): the head and the rest of the stream go straight into the volume, as
   before this pipeline existed: no scratch, no qemu-img;
4. anything else: the whole data is read (its hash checked at the end, the inspectors
   looking at all of it: a vmdk's footer) and judged again, and ``qemu-img check`` and
   ``qemu-img convert -f FMT -O raw``, under prlimit, read it. qemu-img needs a seekable
   source: a local image file already is one (the file the bytes are read and hashed
   from, by its descriptor, so a file renamed over it meanwhile changes nothing), a
   download is spooled to a scratch file. A download is read whole before qemu-img
   starts, and so is a local file whose head did not tell its format. A local file whose
   head passed the checks is read (hashed, inspected) in a thread while qemu-img converts
   it: the volume counts as made only once that read ended well and the whole data was
   judged what its head was; else the error propagates and the volume is deleted, as on
   any error. The raw output goes where the storage keeps the volume's bytes: into its
   raw file (file, qcow2 storage), into its RBD image through qemu-img's rbd driver, or
   else into a scratch raw file streamed into the volume.

Scratch files are named by their owner (pid and start time, ``storage._files``), removed
as soon as they are used and on every error; those of a process that died are removed by
the next conversion and reported by ``leftovers`` (``cache reconcile``).
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ivcache.adapters.convert.export import VolumeExport
from ivcache.adapters.convert.formats import (
    AS_IS,
    FormatPolicy,
    Verdict,
    check_declared,
    decide,
    gunzip,
    inspect,
    judge,
)
from ivcache.adapters.convert.qemu import DriverMissing, QemuImg
from ivcache.adapters.storage._files import dead_temps, open_temp, sweep
from ivcache.core.errors import (
    ImageFormatMismatch,
    InvalidSize,
    IvcacheError,
    NoScratchSpace,
    NoSpace,
)
from ivcache.core.model import GIB, Image
from ivcache.core.ports import ImageData, StorageBackend, VolumeData

if TYPE_CHECKING:
    from oslo_utils.imageutils import format_inspector as fi

__all__ = ["HEAD_LIMIT", "ImagePipeline", "QemuTarget", "RawFileTarget"]

#: the most data read, and held, before the format must be told (raw is told within the
#: first 256 KiB; a vmdk with a footer only at the end: it is then spooled)
HEAD_LIMIT = 8 << 20
_CHUNK = 1 << 20
_MIB = 1 << 20
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


@runtime_checkable
class RawFileTarget(Protocol):
    """A storage that keeps a volume's bytes in one raw file (file, qcow2 storage)."""

    def raw_file(self, volume_id: str) -> Path | None:
        """The raw file holding the volume's bytes from offset 0, for a writer that writes
        it in place; None if the volume is not kept so (a qcow2 overlay)."""
        ...


@runtime_checkable
class QemuTarget(Protocol):
    """A storage whose volumes qemu-img can open itself (rbd)."""

    def qemu_target(self, volume_id: str) -> str:
        """The volume as qemu-img names it (``rbd:pool/image:conf=...``)."""
        ...


class ImagePipeline:
    """Detects, checks and converts images (the ``ImageConverter`` port).

    ``scratch_dir`` is ``image_conversion_dir``; ``policy`` what the configuration lets
    through; ``qemu`` runs qemu-img under its limits.
    """

    def __init__(self, scratch_dir: Path, *, policy: FormatPolicy | None = None,
                 qemu: QemuImg | None = None, head_limit: int = HEAD_LIMIT) -> None:
        self.scratch_dir = Path(scratch_dir).absolute()
        self.policy = policy or FormatPolicy()
        self.qemu = qemu or QemuImg()
        self.head_limit = head_limit

    def open(self, image: Image, data: Callable[[], ImageData]) -> _Disk:
        check_declared(image, self.policy)
        compressed = image.container_format == "compressed"
        opened = data()
        try:
            if image.disk_format not in AS_IS and (compressed or opened.fileno() is None):
                self._make_room(image)
            return _Disk(self, image, opened, compressed)
        except BaseException:
            opened.close()
            raise

    def export(self, storage: StorageBackend, volume_id: str, disk_format: str) -> VolumeData:
        """A volume read out as ``raw`` or ``qcow2`` image data (``VolumeExporter``; see
        ``export.VolumeExport``), its scratch files in ``image_conversion_dir``."""
        return VolumeExport(self.scratch_dir, self.qemu).export(storage, volume_id,
                                                                disk_format)

    def leftovers(self, *, remove: bool) -> list[tuple[str, int]]:
        if not self.scratch_dir.is_dir():
            return []
        found = []
        for path in dead_temps(self.scratch_dir):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if remove:
                path.unlink(missing_ok=True)
            found.append((str(path), size))
        return found

    # -- scratch ---------------------------------------------------------------------------

    def _make_room(self, image: Image) -> None:
        """Reap the scratch files of dead processes; refuse an image that cannot fit."""
        sweep(self.ensure_scratch_dir())
        if not image.size:
            return
        stat = os.statvfs(self.scratch_dir)
        free = stat.f_bavail * stat.f_frsize
        if image.size > free:
            raise NoScratchSpace(
                f"image_conversion_dir {self.scratch_dir} has {_mib(free)} free, too little "
                f"for image {image.id} ({_mib(image.size)}): free some room there or set "
                "image_conversion_dir to a larger filesystem")

    def ensure_scratch_dir(self) -> Path:
        try:
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NoScratchSpace(f"cannot create image_conversion_dir {self.scratch_dir}: "
                                 f"{exc.strerror}") from exc
        return self.scratch_dir


class _Disk:
    """One image on its way through the pipeline (the ``DiskImage`` port)."""

    def __init__(self, pipeline: ImagePipeline, image: Image, data: ImageData,
                 compressed: bool) -> None:
        self._pipeline = pipeline
        self._image = image
        self._data = data
        self._what = f"image {image.id}"
        self._received = 0
        self._scratch: list[Path] = []
        # A compressed image's local file is not the disk: only a plain one is read in place.
        self._source_fd = None if compressed else data.fileno()
        self._stream: Iterator[bytes] = self._count(data)
        if compressed:
            self._stream = gunzip(self._what, self._stream)
        self._wrapper = inspect(self._stream)
        self._head, self._ended, formats = self._read_head()
        # Told from the head, or only once the whole data is read (None).
        self._verdict: Verdict | None = None
        if formats is not None:
            self._verdict = judge(self._what, image.disk_format, formats, pipeline.policy)

    @property
    def disk_format(self) -> str:
        return self._verdict.format if self._verdict else self._image.disk_format

    @property
    def virtual_size(self) -> int | None:
        return self._verdict.virtual_size if self._verdict else None

    def write_to(self, storage: StorageBackend, volume_id: str) -> int:
        if self._verdict is not None and self._verdict.as_is:
            # The format is told and final: the rest of the stream needs no inspector.
            storage.write_image(volume_id, itertools.chain(self._head, self._stream))
        else:
            self._convert(storage, volume_id)
        return self._received

    def close(self) -> None:
        try:
            self._data.close()
        finally:
            self._drop_scratch()

    # -- reading ---------------------------------------------------------------------------

    def _count(self, data: ImageData) -> Iterator[bytes]:
        for chunk in data:
            self._received += len(chunk)
            yield chunk

    def _read_head(self) -> tuple[list[bytes], bool, list[fi.FileInspector] | None]:
        """Read until the inspectors tell the format, the head limit, or the end."""
        head: list[bytes] = []
        size = 0
        while True:
            formats = decide(self._wrapper)
            if formats is not None or size >= self._pipeline.head_limit:
                return head, False, formats
            try:
                chunk = next(self._wrapper)
            except StopIteration:
                return head, True, decide(self._wrapper)
            head.append(chunk)
            size += len(chunk)

    def _rest(self) -> Iterator[bytes]:
        """The head, then the rest of the data through the inspectors."""
        yield from self._head
        self._head = []
        if not self._ended:
            yield from self._wrapper

    # -- converting ------------------------------------------------------------------------

    def _convert(self, storage: StorageBackend, volume_id: str) -> None:
        if self._verdict is not None and self._source_fd is not None:
            # A local file whose head told the format: qemu-img may read it while the rest
            # is hashed and inspected (below); otherwise all of it is read first.
            with _Reader(self._rest) as reader:
                self._convert_verdict(storage, volume_id, self._verdict,
                                      f"/dev/fd/{self._source_fd}", (self._source_fd,),
                                      reader)
            return
        source, fds = self._whole_source()
        verdict = self._final_verdict()
        if verdict.format in AS_IS:
            # Told only at the end (its head looked like more): the spooled bytes are it.
            storage.write_image(volume_id, _read_chunks(source))
            return
        self._convert_verdict(storage, volume_id, verdict, source, fds, None)

    def _final_verdict(self) -> Verdict:
        """Judge the whole data, once read: it must be what its head said it was."""
        verdict = judge(self._what, self._image.disk_format, decide(self._wrapper),
                        self._pipeline.policy)
        if self._verdict is not None and verdict.format != self._verdict.format:
            raise ImageFormatMismatch(f"{self._what}: its data looked like "
                                      f"{self._verdict.format} at first and {verdict.format} "
                                      "at the end: refused")
        if self._verdict is not None and verdict.virtual_size != self._verdict.virtual_size:
            raise ImageFormatMismatch(f"{self._what}: its header changed while it was read "
                                      "(another virtual size at the end): refused")
        return verdict

    def _convert_verdict(self, storage: StorageBackend, volume_id: str, verdict: Verdict,
                         source: str, fds: tuple[int, ...], reader: _Reader | None) -> None:
        """Convert ``source``, judged ``verdict``, into the volume. With a ``reader`` still
        reading the data (its hash, the inspectors), that read must end well, and the whole
        data be judged what its head was, before the volume counts as made: else the error
        propagates and the caller deletes the volume."""
        size_gb = storage.get_volume(volume_id).size_gb
        if verdict.virtual_size is not None and verdict.virtual_size > size_gb * GIB:
            raise InvalidSize(f"{self._what}: its {verdict.format} disk is "
                              f"{verdict.virtual_size} bytes, more than volume {volume_id} "
                              f"({size_gb} GiB): ask for a larger volume")
        qemu = self._pipeline.qemu
        qemu.check(self._what, verdict.qemu_format, source, pass_fds=fds)
        volume_full = _volume_full(self._what, volume_id)

        def verified() -> None:
            if reader is not None:
                reader.wait()
                self._final_verdict()

        if isinstance(storage, RawFileTarget) and (path := storage.raw_file(volume_id)):
            # Straight into the volume's file: no copy of the disk but the one qemu-img makes.
            # Through the page cache (no O_DIRECT): the clone that follows a miss reads it
            # from there (measured: O_DIRECT made that ext4 copy 20 times slower).
            qemu.convert(self._what, verdict.qemu_format, source, str(path), pass_fds=fds,
                         full=volume_full)
            # The fsync first: it runs while the reader still hashes.
            _fsync(path, volume_full)
            verified()
            return
        if isinstance(storage, QemuTarget):
            # qemu-img's rbd driver writes the RBD image itself, skipping zeros: about twice
            # as fast as a raw scratch file streamed in through librbd (measured, 1 GiB).
            try:
                qemu.convert(self._what, verdict.qemu_format, source,
                             storage.qemu_target(volume_id), pass_fds=fds, full=volume_full)
                verified()
                return
            except DriverMissing:
                pass  # no qemu-block-extra here: the scratch file way works everywhere
        raw = self._scratch_file(".raw", size=verdict.virtual_size or 0)
        qemu.convert(self._what, verdict.qemu_format, source, str(raw), pass_fds=fds,
                     full=self._scratch_full)
        storage.write_image(volume_id, _read_chunks(str(raw)))
        verified()

    def _whole_source(self) -> tuple[str, tuple[int, ...]]:
        """Read the whole data through the inspectors (its hash is checked at the end), and
        say where qemu-img may read it: the local file itself, or a spooled copy."""
        if self._source_fd is not None:
            for _ in self._rest():
                pass
            # The child inherits the descriptor: /dev/fd/N opens the very file that was read.
            return f"/dev/fd/{self._source_fd}", (self._source_fd,)
        spool = self._scratch_file(".spool")
        try:
            with open(spool, "wb") as out:
                for chunk in self._rest():
                    out.write(chunk)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise self._scratch_full() from exc
            raise
        return str(spool), ()

    def _scratch_full(self) -> NoScratchSpace:
        return NoScratchSpace(
            f"image_conversion_dir {self._pipeline.scratch_dir} filled up while "
            f"{self._what} was converted: free some room there or set "
            "image_conversion_dir to a larger filesystem")

    def _scratch_file(self, suffix: str, *, size: int = 0) -> Path:
        directory = self._pipeline.ensure_scratch_dir()
        if not self._scratch:
            sweep(directory)  # what conversions that died left: this one reaps it
        path, fd = open_temp(directory, suffix)
        self._scratch.append(path)
        try:
            if size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return path

    def _drop_scratch(self) -> None:
        while self._scratch:
            self._scratch.pop().unlink(missing_ok=True)


class _Reader:
    """Reads an image's data to its end in a thread (``for _ in data()``: the hash check
    and the inspectors on the way) while qemu-img converts the same file.

    ``wait()`` joins it and raises what the read raised (``ChecksumMismatch``, ...). Leaving
    the ``with`` block stops and joins it in any case, so the data is never read after
    its file is closed; an error of the read that nobody waited for is dropped: the block's
    own error propagates.
    """

    def __init__(self, data: Callable[[], Iterator[bytes]]) -> None:
        self._data = data
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ivcache-image-read",
                                        daemon=True)

    def __enter__(self) -> _Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            for _ in self._data():
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to wait(), in the thread that converts
            self._error = exc


def _volume_full(what: str, volume_id: str) -> Callable[[], IvcacheError]:
    def full() -> IvcacheError:
        return NoSpace(f"the storage filled up while {what} was converted into volume "
                       f"{volume_id}")
    return full


def _fsync(path: Path, full: Callable[[], IvcacheError]) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            raise full() from exc
        raise


def _read_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _mib(nbytes: int) -> str:
    return f"{nbytes / _MIB:,.0f} MiB" if nbytes >= _MIB else f"{nbytes} bytes"

"""Volumes read out as image data (the core's ``VolumeExporter``; ``volume upload``).

Where the bytes are read from depends on what the storage offers:

- a local file holding the volume (``local_file``: file storage's raw file, a qcow2
  storage's file with its backing chain), which qemu-img can read as it is;
- a name qemu-img opens itself (``qemu_target``: ``rbd:pool/image``);
- else its bytes by ranges (``read``: RBD through librbd, the fakes).

``raw`` is the volume's bytes from offset 0 to its end: a raw file is streamed as it is,
anything else is converted by ``qemu-img convert -O raw`` into a scratch file first (or read
by ranges). ``qcow2`` is always ``qemu-img convert -O qcow2`` into a scratch file in
``image_conversion_dir``, under prlimit. Scratch files are named by their owner, removed
when the export is closed (on every path), and reaped by the next conversion if their
process died.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from ivcache.adapters.convert.qemu import DriverMissing, QemuImg
from ivcache.adapters.storage._files import open_temp, sweep
from ivcache.core.errors import InvalidRequest, NoScratchSpace
from ivcache.core.model import GIB
from ivcache.core.ports import StorageBackend

__all__ = ["EXPORT_FORMATS", "LocalFile", "RangeReader", "VolumeExport"]

EXPORT_FORMATS = ("raw", "qcow2")
_CHUNK = 4 << 20
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


@runtime_checkable
class LocalFile(Protocol):
    """A storage whose volume is one local file qemu-img can read (file, qcow2)."""

    def local_file(self, volume_id: str) -> tuple[Path, str]: ...


@runtime_checkable
class RangeReader(Protocol):
    """A storage that reads a volume's bytes by ranges (rbd, the fakes)."""

    def read(self, volume_id: str, offset: int, length: int) -> bytes: ...


@runtime_checkable
class _QemuSource(Protocol):
    def qemu_target(self, volume_id: str) -> str: ...


def _readable(storage: StorageBackend) -> StorageBackend:
    """The storage itself where a wrapper (the OTel adapter's ``MeteredStorage``, which
    keeps its backend in ``inner``) hides how its volumes can be read."""
    while not isinstance(storage, LocalFile | RangeReader | _QemuSource):
        inner = getattr(storage, "inner", None)
        if inner is None:
            break
        storage = inner
    return storage


class _Out:
    """Chunks of one file, up to ``limit`` bytes, then scratch files removed on close."""

    def __init__(self, path: Path, limit: int | None, scratch: list[Path]) -> None:
        self._scratch = scratch
        try:
            self._file = open(path, "rb")  # noqa: SIM115  # closed by close()
        except BaseException:
            self._drop()
            raise
        self._left = limit
        self._chunks = self._read()

    def _read(self) -> Iterator[bytes]:
        while self._left is None or self._left > 0:
            want = _CHUNK if self._left is None else min(_CHUNK, self._left)
            chunk = self._file.read(want)
            if not chunk:
                return
            if self._left is not None:
                self._left -= len(chunk)
            yield chunk

    def __iter__(self) -> _Out:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        self._file.close()
        self._drop()

    def _drop(self) -> None:
        while self._scratch:
            self._scratch.pop().unlink(missing_ok=True)


class _Ranges:
    """A volume's bytes read by ranges, from offset 0 to ``size``."""

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._read = read
        self._size = size
        self._offset = 0

    def __iter__(self) -> _Ranges:
        return self

    def __next__(self) -> bytes:
        if self._offset >= self._size:
            raise StopIteration
        chunk = self._read(self._offset, min(_CHUNK, self._size - self._offset))
        if not chunk:
            raise StopIteration
        self._offset += len(chunk)
        return chunk

    def close(self) -> None:
        self._offset = self._size


class VolumeExport:
    """Reads volumes out as ``raw`` or ``qcow2`` image data (``VolumeExporter``).

    ``scratch_dir`` is ``image_conversion_dir``; ``qemu`` runs qemu-img under its limits.
    """

    def __init__(self, scratch_dir: Path, qemu: QemuImg | None = None) -> None:
        self.scratch_dir = Path(scratch_dir).absolute()
        self.qemu = qemu or QemuImg()

    def export(self, storage: StorageBackend, volume_id: str, disk_format: str) -> _Out | _Ranges:
        if disk_format not in EXPORT_FORMATS:
            raise InvalidRequest(f"a volume can be read out as {', '.join(EXPORT_FORMATS)}, "
                                 f"not {disk_format!r}")
        storage = _readable(storage)
        size = storage.get_volume(volume_id).size_gb * GIB
        what = f"volume {volume_id}"
        local = storage.local_file(volume_id) if isinstance(storage, LocalFile) else None
        if disk_format == "raw":
            if local is not None and local[1] == "raw":
                return _Out(local[0], size, [])
            if local is None and isinstance(storage, RangeReader):
                reader = storage
                return _Ranges(lambda offset, n: reader.read(volume_id, offset, n), size)
        scratch: list[Path] = []
        try:
            source, fmt = self._qemu_source(storage, volume_id, local, size, scratch)
            out = self._scratch(".raw" if disk_format == "raw" else ".qcow2", scratch)
            try:
                self.qemu.convert_to(what, fmt, source, disk_format, str(out),
                                     full=self._full(what))
            except DriverMissing:
                if not isinstance(storage, RangeReader) or source.startswith("/"):
                    raise
                # No qemu-block-extra: read the RBD image by ranges into a raw file first.
                source = str(self._spool(storage, volume_id, size, scratch))
                self.qemu.convert_to(what, "raw", source, disk_format, str(out),
                                     full=self._full(what))
            return _Out(out, size if disk_format == "raw" else None, scratch)
        except BaseException:
            for path in scratch:
                path.unlink(missing_ok=True)
            raise

    # -- sources and scratch ---------------------------------------------------------------

    def _qemu_source(self, storage: StorageBackend, volume_id: str,
                     local: tuple[Path, str] | None, size: int,
                     scratch: list[Path]) -> tuple[str, str]:
        """What qemu-img reads the volume from, and its format."""
        if local is not None:
            return str(local[0]), local[1]
        if isinstance(storage, _QemuSource):
            return storage.qemu_target(volume_id), "raw"
        if isinstance(storage, RangeReader):
            return str(self._spool(storage, volume_id, size, scratch)), "raw"
        raise InvalidRequest(f"volume {volume_id}: this storage "
                             f"({type(storage).__name__}) cannot be read out")

    def _spool(self, storage: RangeReader, volume_id: str, size: int,
               scratch: list[Path]) -> Path:
        path = self._scratch(".raw", scratch)
        try:
            with open(path, "r+b") as out:
                offset = 0
                while offset < size:
                    chunk = storage.read(volume_id, offset, min(_CHUNK, size - offset))
                    if not chunk:
                        break
                    if chunk.count(0) != len(chunk):
                        out.seek(offset)
                        out.write(chunk)
                    offset += len(chunk)
                out.truncate(size)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise self._full(f"volume {volume_id}")() from exc
            raise
        return path

    def _scratch(self, suffix: str, scratch: list[Path]) -> Path:
        try:
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NoScratchSpace(f"cannot create image_conversion_dir {self.scratch_dir}: "
                                 f"{exc.strerror}") from exc
        if not scratch:
            sweep(self.scratch_dir)  # what conversions that died left: this one reaps it
        path, fd = open_temp(self.scratch_dir, suffix)
        os.close(fd)
        scratch.append(path)
        return path

    def _full(self, what: str) -> Callable[[], NoScratchSpace]:
        def full() -> NoScratchSpace:
            return NoScratchSpace(
                f"image_conversion_dir {self.scratch_dir} filled up while {what} was read "
                "out: free some room there or set image_conversion_dir to a larger "
                "filesystem")
        return full

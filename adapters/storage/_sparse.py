"""Writing into a raw file so that zero runs stay holes (shared by the file-backed storages)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from ivcache.adapters.storage._common import does_not_fit, is_zero
from ivcache.adapters.storage._files import no_space_errors
from ivcache.core.errors import VolumeNotFound
from ivcache.core.model import GIB

__all__ = ["HOLE_GRAIN", "SparseWriter", "pwrite_all", "write_chunks", "write_file"]

# Zero runs this long (and aligned) become holes: small enough to keep an image's holes,
# large enough that the zero test is not the cost of a write.
HOLE_GRAIN = 64 * 1024


class SparseWriter:
    """Write data at offsets, leaving aligned zero runs as holes.

    A zero run over data already in the file must be written, or the old bytes would show
    through; ``fresh`` says the file has no data yet (a new temp file), so no need to look.
    """

    def __init__(self, fd: int, *, fresh: bool) -> None:
        self._fd = fd
        self._fresh = fresh
        # SEEK_DATA from _hole_from found data next at _data_at: [_hole_from, _data_at) is a
        # hole. Writes only go forward, so the answer holds for later, larger offsets.
        self._hole_from = 0
        self._data_at = -1

    def write(self, view: memoryview, offset: int) -> None:
        n = len(view)
        pos = 0
        run = -1  # start of the bytes still to write
        while pos < n:
            end = min(n, (offset + pos) // HOLE_GRAIN * HOLE_GRAIN + HOLE_GRAIN - offset)
            if is_zero(view[pos:end]) and self._is_hole(offset + pos, offset + end):
                if run >= 0:
                    pwrite_all(self._fd, view[run:pos], offset + run)
                    run = -1
            elif run < 0:
                run = pos
            pos = end
        if run >= 0:
            pwrite_all(self._fd, view[run:], offset + run)

    def _is_hole(self, start: int, end: int) -> bool:
        if self._fresh:
            return True
        if not self._hole_from <= start < self._data_at:
            self._hole_from = start
            try:
                self._data_at = os.lseek(self._fd, start, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data from here to the end of the file
                    self._data_at = 1 << 63
                elif exc.errno == errno.EINVAL:  # no SEEK_DATA here: assume data everywhere
                    self._data_at = start
                else:
                    raise
        return end <= self._data_at


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def write_chunks(fd: int, chunks: Iterable[bytes], *, volume_id: str, size_gb: int,
                 fresh: bool) -> int:
    """Write ``chunks`` from offset 0 of ``fd``, zero runs as holes; return the bytes.

    NoSpace if the data is bigger than the volume's ``size_gb`` or the filesystem is full.
    """
    limit = size_gb * GIB
    writer = SparseWriter(fd, fresh=fresh)
    written = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        if written + len(view) > limit:
            raise does_not_fit(volume_id, size_gb)
        with no_space_errors(f"writing volume {volume_id}"):
            writer.write(view, written)
        written += len(view)
    return written


def write_file(path: Path, chunks: Iterable[bytes], *, volume_id: str, size_gb: int) -> int:
    """Write ``chunks`` from offset 0 of the volume's raw file ``path`` and fsync it.

    Zero runs stay holes where the file has none already; VolumeNotFound if the file is
    gone, NoSpace as ``write_chunks``.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise VolumeNotFound(volume_id) from exc
    try:
        written = write_chunks(fd, chunks, volume_id=volume_id, size_gb=size_gb, fresh=False)
        with no_space_errors(f"writing volume {volume_id}"):
            os.fsync(fd)
    finally:
        os.close(fd)
    return written

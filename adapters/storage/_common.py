"""What the storage adapters share: argument checks, messages, zero detection, and the
staging of a streamed image into 1 MiB blocks."""

from __future__ import annotations

from collections.abc import Callable, Collection

import attrs

from ivcache.core.errors import InvalidSize, NoSpace, StorageError
from ivcache.core.model import GIB, check_id

__all__ = [
    "BLOCK",
    "MIB",
    "UNKNOWN_OWNER",
    "ZERO_BLOCK",
    "BlockWriter",
    "StagedWrite",
    "already_exists",
    "check_at_least",
    "check_clone",
    "check_grow",
    "check_range",
    "check_room",
    "check_size",
    "check_sized",
    "check_volume_id",
    "does_not_fit",
    "is_zero",
    "merge_tail",
    "no_room",
    "read_range",
]

MIB = 1024**2
#: The owner of a volume rebuilt from its data after the storage's record of it was lost:
#: no project is called that, so only an admin sees it (and decides what to do with it).
UNKNOWN_OWNER = "(unknown)"
BLOCK = MIB
ZERO_BLOCK = bytes(BLOCK)


def check_at_least(name: str, value: int, least: int, meaning: str = "") -> int:
    """``value`` of the parameter ``name`` if it is ``least`` or more, else ValueError;
    ``meaning`` says what the least value means ("0 = unlimited")."""
    if value < least:
        said = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be at least {least}{said}, not {value}")
    return value


def check_range(offset: int, length: int) -> None:
    """The arguments of a ``read`` (for tests) of ``length`` bytes at ``offset``."""
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0, not {offset} and {length}")


def check_volume_id(volume_id: str) -> str:
    return check_id("volume", volume_id)


def check_size(size_gb: int) -> int:
    # bool is an int to Python, but True GiB is a caller's bug, not a size.
    if isinstance(size_gb, bool) or not isinstance(size_gb, int) or size_gb < 1:
        raise InvalidSize(f"a volume size is a whole number of GiB, at least 1, not {size_gb!r}")
    return size_gb


def check_sized(volume_id: str, size_gb: int) -> None:
    """The arguments of create_volume and extend_volume."""
    check_volume_id(volume_id)
    check_size(size_gb)


def check_clone(src_id: str, dst_id: str, size_gb: int) -> None:
    """The arguments of clone_volume (the source's size is checked by ``check_grow``)."""
    check_volume_id(src_id)
    check_volume_id(dst_id)
    check_size(size_gb)


def check_grow(volume_id: str, current_gb: int, new_gb: int, *, clone: bool = False) -> None:
    if new_gb >= current_gb:
        return
    if clone:
        raise InvalidSize(f"a clone of volume {volume_id} ({current_gb} GiB) must be at least "
                          f"{current_gb} GiB, not {new_gb}")
    raise InvalidSize(f"volume {volume_id} is {current_gb} GiB and cannot shrink to {new_gb} GiB")


def already_exists(volume_id: str) -> StorageError:
    return StorageError(f"volume {volume_id} already exists: choose another id or delete it first")


def no_room(where: str, free_bytes: int, capacity_gb: int, wanted: str) -> NoSpace:
    """The one "no room" error: ``where`` has ``free_bytes`` left of ``capacity_gb``, too
    few for ``wanted`` ("3 GiB more", "the data of volume v1")."""
    free = max(free_bytes, 0)
    left = f"{free // GIB} GiB" if free % GIB == 0 else f"{free // MIB} MiB"
    return NoSpace(f"{where} has {left} free of {capacity_gb} GiB: no room for {wanted}")


def check_room(where: str, capacity_gb: int, used_bytes: int, size_gb: int) -> None:
    """Raise ``no_room`` unless ``size_gb`` GiB more fit in ``capacity_gb`` (0: unlimited)
    of which ``used_bytes`` are taken."""
    free = capacity_gb * GIB - used_bytes
    if capacity_gb and size_gb * GIB > free:
        raise no_room(where, free, capacity_gb, f"{size_gb} GiB more")


def does_not_fit(volume_id: str, size_gb: int) -> NoSpace:
    return NoSpace(f"the image does not fit in volume {volume_id} ({size_gb} GiB): "
                   f"create a larger volume")


def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    # bytes.startswith is a memcmp; comparing memoryviews is 100x slower (element-wise).
    view = memoryview(buf).cast("B")
    return all(ZERO_BLOCK.startswith(view[start:start + BLOCK])
               for start in range(0, len(view), BLOCK))


def read_range(size_bytes: int, block: Callable[[int], bytes | None], offset: int,
               length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of a block-mapped volume, cut at its end."""
    check_range(offset, length)
    end = min(offset + length, size_bytes)
    out = bytearray()
    pos = offset
    while pos < end:
        index, within = divmod(pos, BLOCK)
        take = min(BLOCK - within, end - pos)
        data = block(index)
        out += data[within:within + take] if data is not None else bytes(take)
        pos += take
    return bytes(out)


@attrs.frozen
class StagedWrite:
    """A streamed image cut into blocks, not yet applied to any volume.

    ``blocks`` maps a block index to its new bytes, or None for a block of zeros; ``tail`` is
    the last, partly written block (its index and the bytes written into it), whose rest
    keeps what the volume held.
    """

    blocks: dict[int, bytes | None]
    tail: tuple[int, bytes] | None
    written: int

    def apply(self, put: Callable[[int, bytes | None], None],
              old: Callable[[int], bytes | None]) -> None:
        """Apply the write block by block through ``put(index, data)``; ``old(index)`` is
        what the volume holds in the block the tail lands in (None: zeros)."""
        for index, data in self.blocks.items():
            put(index, data)
        if self.tail is not None:
            index, data = self.tail
            put(index, merge_tail(data, old(index)))


class BlockWriter:
    """Cut chunks written from offset 0 into whole 1 MiB blocks.

    Every block before the last is written whole (the stream is contiguous), so only the
    tail needs the volume's old bytes, and those can be read when the write is applied,
    under the backend's lock, instead of while the stream is consumed.

    ``new_data_blocks`` counts non-zero blocks at indexes outside ``existing`` (the blocks the
    volume holds), so that a thin backend can refuse a too-big image before the end: past
    ``room`` such blocks, ``full()`` is raised.
    """

    def __init__(self, volume_id: str, size_gb: int, *, existing: Collection[int] = (),
                 room: int | None = None, full: Callable[[], Exception] | None = None) -> None:
        self._volume_id = volume_id
        self._size_gb = size_gb
        self._limit = size_gb * GIB
        self._existing = existing
        self._room = room
        self._full = full
        self._blocks: dict[int, bytes | None] = {}
        self._buf = bytearray()
        self.written = 0
        self.new_data_blocks = 0

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        n = len(view)
        if self.written + n > self._limit:
            raise does_not_fit(self._volume_id, self._size_gb)
        pos = 0
        while pos < n:
            index = (self.written + pos) // BLOCK
            if not self._buf and n - pos >= BLOCK:
                # Keeping the caller's bytes object avoids a copy; anything mutable is copied.
                if isinstance(chunk, bytes) and n == BLOCK:
                    self._store(index, chunk)
                else:
                    self._store(index, view[pos:pos + BLOCK].tobytes())
                pos += BLOCK
            else:
                take = min(BLOCK - len(self._buf), n - pos)
                self._buf += view[pos:pos + take]
                pos += take
                if len(self._buf) == BLOCK:
                    self._store(index, bytes(self._buf))
                    self._buf.clear()
        self.written += n

    def finish(self) -> StagedWrite:
        tail = None
        if self._buf:
            tail = (self.written // BLOCK, bytes(self._buf))
        return StagedWrite(self._blocks, tail, self.written)

    def _store(self, index: int, data: bytes) -> None:
        if data == ZERO_BLOCK:
            self._blocks[index] = None
            return
        self._blocks[index] = data
        if index not in self._existing:
            self.new_data_blocks += 1
            if self._room is not None and self.new_data_blocks > self._room:
                assert self._full is not None  # room goes with full
                raise self._full()


def merge_tail(tail: bytes, old: bytes | None) -> bytes:
    """The last block of a write: the written bytes, then what the block held before."""
    return tail + (old if old is not None else ZERO_BLOCK)[len(tail):]

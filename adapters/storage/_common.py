"""What the storage adapters share: argument checks, zero detection, the staging of a
streamed image into 1 MiB blocks, and the on-disk state of the fakes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from ivcache.adapters.storage._files import FileLock, atomic_write
from ivcache.core.errors import InvalidSize, NoSpace, StorageError
from ivcache.core.model import GIB, check_id

__all__ = [
    "BLOCK",
    "MIB",
    "ZERO_BLOCK",
    "BlockWriter",
    "StagedWrite",
    "StateDir",
    "already_exists",
    "check_grow",
    "check_size",
    "check_volume_id",
    "does_not_fit",
    "is_zero",
    "merge_tail",
    "read_range",
]

MIB = 1024**2
BLOCK = MIB
ZERO_BLOCK = bytes(BLOCK)

def check_volume_id(volume_id: str) -> str:
    return check_id("volume", volume_id)


def check_size(size_gb: int) -> int:
    # bool is an int to Python, but True GiB is a caller's bug, not a size.
    if isinstance(size_gb, bool) or not isinstance(size_gb, int) or size_gb < 1:
        raise InvalidSize(f"a volume size is a whole number of GiB, at least 1, not {size_gb!r}")
    return size_gb


def check_grow(volume_id: str, current_gb: int, new_gb: int, *, clone: bool = False) -> None:
    if new_gb >= current_gb:
        return
    if clone:
        raise InvalidSize(f"a clone of volume {volume_id} ({current_gb} GiB) must be at least "
                          f"{current_gb} GiB, not {new_gb}")
    raise InvalidSize(f"volume {volume_id} is {current_gb} GiB and cannot shrink to {new_gb} GiB")


def already_exists(volume_id: str) -> StorageError:
    return StorageError(f"volume {volume_id} already exists: choose another id or delete it first")


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
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0, not {offset} and {length}")
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


class BlockWriter:
    """Cut chunks written from offset 0 into whole 1 MiB blocks.

    Every block before the last is written whole (the stream is contiguous), so only the
    tail needs the volume's old bytes, and those can be read when the write is applied,
    under the backend's lock, instead of while the stream is consumed.

    ``new_data_blocks`` counts non-zero blocks at indexes outside ``existing`` (the blocks the
    volume holds), so that a thin backend can refuse a too-big image before the end.
    """

    def __init__(self, volume_id: str, size_gb: int, *, existing: Collection[int] = ()) -> None:
        self._volume_id = volume_id
        self._size_gb = size_gb
        self._limit = size_gb * GIB
        self._existing = existing
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


def merge_tail(tail: bytes, old: bytes | None) -> bytes:
    """The last block of a write: the written bytes, then what the block held before."""
    return tail + (old if old is not None else ZERO_BLOCK)[len(tail):]


class StateDir:
    """Where a fake keeps its state so volumes outlive the process.

    ``index.json`` holds the metadata and a random ``serial`` that changes on every save;
    each volume's blocks live in an immutable ``blocks/<stem>.<token>.blk`` file named in the
    index, so a save writes only what changed, a reader reuses the blocks it has already
    loaded, and several index records (an RBD snapshot and its image) can share one file.
    Every load-modify-save runs under ``locked()``, an flock that also serialises processes.

    The fakes simulate storage: rename keeps the state whole if a process dies, but the
    block files are not fsynced, so a power loss is not modelled.
    """

    _MAGIC = b"IVBLK1\n"
    _INDEX = struct.Struct(">Q")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._blocks_dir = self.path / "blocks"
        self._blocks_dir.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, dict[int, bytes]] = {}
        self._lock = FileLock(self.path / ".lock")

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return self._lock.held()

    def load(self) -> dict[str, Any] | None:
        try:
            text = (self.path / "index.json").read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise StorageError(f"state file {self.path / 'index.json'} is corrupt: {exc}") from exc
        if not isinstance(doc, dict):
            raise StorageError(f"state file {self.path / 'index.json'} is corrupt: not an object")
        return doc

    def save(self, doc: Mapping[str, Any], keep: Collection[str]) -> None:
        """Write the index, then remove block files that no record names any more."""
        atomic_write(self.path / "index.json",
                     json.dumps(doc, sort_keys=True, indent=1).encode(), durable=False)
        for entry in os.scandir(self._blocks_dir):
            if entry.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        self.forget_all_but(keep)

    def forget_all_but(self, keep: Collection[str]) -> None:
        """Drop cached blocks of files the index no longer names."""
        for name in [name for name in self._cache if name not in keep]:
            del self._cache[name]

    def read_blocks(self, name: str) -> dict[int, bytes]:
        """The blocks of file ``name`` (a fresh dict: the caller may change it)."""
        if not name:
            return {}
        cached = self._cache.get(name)
        if cached is None:
            cached = self._cache[name] = self._parse(name)
        return dict(cached)

    def write_blocks(self, stem: str, blocks: Mapping[int, bytes]) -> str:
        """Write ``blocks`` to a new file and return its name ("" for no blocks)."""
        if not blocks:
            return ""
        name = f"{stem}.{secrets.token_hex(8)}.blk"
        parts = [self._MAGIC]
        for index in sorted(blocks):
            parts += (self._INDEX.pack(index), blocks[index])
        atomic_write(self._blocks_dir / name, b"".join(parts), durable=False)
        self._cache[name] = dict(blocks)
        return name

    def _parse(self, name: str) -> dict[int, bytes]:
        path = self._blocks_dir / name
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"state file {path} is missing: the state is damaged") from exc
        record = self._INDEX.size + BLOCK
        if not data.startswith(self._MAGIC) or (len(data) - len(self._MAGIC)) % record:
            raise StorageError(f"state file {path} is corrupt")
        view = memoryview(data)
        blocks: dict[int, bytes] = {}
        for start in range(len(self._MAGIC), len(data), record):
            (index,) = self._INDEX.unpack_from(view, start)
            blocks[index] = view[start + self._INDEX.size:start + record].tobytes()
        return blocks


class PersistedFake:
    """What the fakes share: a lock, and with a state directory, load before and save after.

    A subclass sets ``_lock``, ``_state`` and ``_serial`` and provides ``_refresh`` (load the
    state if another process changed it) and ``_save``.
    """

    _lock: threading.RLock
    _state: StateDir | None
    _serial: str | None

    def _refresh(self, state: StateDir) -> None:
        raise NotImplementedError

    def _save(self, state: StateDir) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def _txn(self, *, write: bool = False) -> Iterator[None]:
        """Hold the lock; with a state directory, load before and (``write``) save after.

        Every operation checks before it changes anything, so a failed one leaves memory as
        it was; a persisted fake reloads after a failure all the same.
        """
        with self._lock:
            if self._state is None:
                yield
                return
            with self._state.locked():
                self._refresh(self._state)
                try:
                    yield
                    if write:
                        self._save(self._state)
                except BaseException:
                    self._serial = None
                    raise

"""What the fakes share: their lock, and the state directory that makes them outlive the
process (one loader: load if another process changed it, save after every change)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from ivcache.adapters.storage._common import (
    BLOCK,
    BlockWriter,
    StagedWrite,
    already_exists,
    check_at_least,
    check_clone,
    check_grow,
    check_sized,
    check_volume_id,
)
from ivcache.adapters.storage._files import (
    FileLock,
    atomic_write,
    dead_temp_leftovers,
    disk_bytes,
    sweep,
)
from ivcache.core.errors import StorageError, VolumeNotFound
from ivcache.core.model import Volume
from ivcache.core.ports import StorageBackend

__all__ = ["Loadable", "PersistedFake", "StateDir", "Stored"]


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
        self.blocks_dir = self.path / "blocks"
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
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
        """Write the index, then remove block files that no record names any more, and the
        temp files of processes that died saving."""
        atomic_write(self.path / "index.json",
                     json.dumps(doc, sort_keys=True, indent=1).encode(), durable=False,
                     fault=f"{doc.get('kind')}-state-save")
        sweep(self.path)
        # Under the lock no one else writes blocks: what the index does not name is garbage.
        for entry in os.scandir(self.blocks_dir):
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
        atomic_write(self.blocks_dir / name, b"".join(parts), durable=False)
        self._cache[name] = dict(blocks)
        return name

    def _parse(self, name: str) -> dict[int, bytes]:
        path = self.blocks_dir / name
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


class Loadable(Protocol):
    """A record whose blocks a state directory keeps in ``file``; ``blocks`` is None until
    first used (a persisted fake loads data only when it is needed)."""

    blocks: dict[int, bytes] | None
    file: str


class Stored(Loadable, Protocol):
    """A record with blocks of its own; ``dirty``: they changed since they were written."""

    dirty: bool


class FakeVolume(Protocol):
    """A fake's volume: ``uid`` tells it from a later volume of the same id."""

    size_gb: int

    @property
    def uid(self) -> str: ...


V = TypeVar("V", bound=FakeVolume)


class PersistedFake(Generic[V]):
    """What the fakes share: capacity, host, a lock, and with a state directory, load before
    and save after; and what their volumes ``V`` answer alike.

    A subclass names its ``_kind`` and provides ``_get`` (the volume of an id, or
    VolumeNotFound), ``_exists``, ``_volume`` (the port's ``Volume`` of one), ``_writer``
    and ``_apply`` (how a write is staged, then applied), and for its
    state ``_clear`` (no volumes), ``_restore`` (take the records of a loaded index: a
    KeyError, TypeError, ValueError or AttributeError there means the index is corrupt),
    ``_dump`` (the records to save), ``_stored`` (its records with their own blocks, by the
    stem of their block file) and ``_files`` (the block files its records name).
    """

    _kind: ClassVar[str]

    def __init__(self, capacity_gb: int, host: str, state_path: Path | None) -> None:
        self.capacity_gb = check_at_least("capacity_gb", capacity_gb, 1)
        self.host = host
        self._lock = threading.RLock()
        self._state = StateDir(state_path) if state_path is not None else None
        self._serial: str | None = None
        self._clear()

    def write_image(self, volume_id: str, chunks: Iterable[bytes]) -> int:
        check_volume_id(volume_id)
        with self._txn():
            volume = self._get(volume_id)
            uid, writer = volume.uid, self._writer(volume_id, volume)
        # The stream (a download, perhaps) is consumed without the lock, so other volumes
        # stay usable meanwhile; the blocks are applied at the end, all at once.
        for chunk in chunks:
            writer.feed(chunk)
        staged = writer.finish()
        with self._txn(write=True):
            volume = self._get(volume_id)
            if volume.uid != uid:  # deleted meanwhile, and made again
                raise VolumeNotFound(volume_id)
            self._apply(volume_id, volume, staged)
        return staged.written

    def extend_volume(self, volume_id: str, size_gb: int) -> Volume:
        check_sized(volume_id, size_gb)
        with self._txn(write=True):
            volume = self._get(volume_id)
            check_grow(volume_id, volume.size_gb, size_gb)
            self._reserve(size_gb - volume.size_gb)
            volume.size_gb = size_gb
            return self._volume(volume)

    def get_volume(self, volume_id: str) -> Volume:
        check_volume_id(volume_id)
        with self._txn():
            return self._volume(self._get(volume_id))

    def can_fill_from(self, source: StorageBackend) -> bool:
        """Another fake (a volume group or pool of the same simulated site): its blocks are
        copied, as ``dd`` between two LVs or ``rbd cp`` between two pools would."""
        return isinstance(source, PersistedFake) and source is not self

    def fill_from(self, source: StorageBackend, src_id: str, dst_id: str, size_gb: int,
                  owner: str) -> Volume:
        check_clone(src_id, dst_id, size_gb)
        if not isinstance(source, PersistedFake) or not self.can_fill_from(source):
            raise StorageError(f"{self._kind} cannot fill a volume from {source!r}: only "
                               "from another fake")
        with source._txn():
            volume = source._get(src_id)
            src_gb, blocks = volume.size_gb, source._export(volume)
        check_grow(src_id, src_gb, size_gb, clone=True)
        with self._txn(write=True):
            self._check_free(dst_id)
            return self._volume(self._import(dst_id, size_gb, owner, blocks))

    def leftovers(self, *, remove: bool) -> list[tuple[str, str, int]]:
        """What processes that died saving the state left under ``state_path``: temp files
        (of blocks: ``partial-volume``; of the index: ``index-damage``), and as
        ``index-damage`` an index that cannot be read, records of block files that are
        gone and block files that no record names. With ``remove``: temp files and
        unnamed block files go, volumes whose blocks are gone are dropped, and an
        unreadable index is set aside (``index.json.damaged-<token>``) for one rebuilt
        from the block files where the fake can (``_rebuild``). In memory: nothing."""
        state = self._state
        if state is None:
            return []  # nothing outlives the process
        with self._lock, state.locked():
            found = dead_temp_leftovers((("index-damage", state.path),
                                         ("partial-volume", state.blocks_dir)), remove=remove)
            index = state.path / "index.json"
            try:
                self._refresh(state)
            except StorageError:
                found.append(("index-damage", str(index), disk_bytes(index)))
                if remove:
                    os.replace(index, state.path / f"index.json.damaged-{secrets.token_hex(6)}")
                    self._clear()
                    self._serial = None
                    self._rebuild(state)
                    self._save(state)
                return found
            keep = self._files()
            present = {name for name in os.listdir(state.blocks_dir)
                       if not name.startswith(".tmp-")}
            lost = sorted(keep - present)
            found += [("index-damage", str(state.blocks_dir / name), 0) for name in lost]
            unnamed = sorted(present - keep)
            found += [("index-damage", str(state.blocks_dir / name),
                       disk_bytes(state.blocks_dir / name)) for name in unnamed]
            if remove and (lost or unnamed):
                try:
                    self._lose(set(lost))
                    self._save(state)  # which removes the unnamed block files
                except BaseException:
                    self._serial = None
                    raise
            return found

    def _lose(self, lost: set[str]) -> None:
        """Drop what reads the block files ``lost`` (gone from the state directory): the
        volumes holding them are gone; in a transaction."""
        raise NotImplementedError

    def _rebuild(self, state: StateDir) -> None:
        """Rebuild the records from the block files after the index was lost (what the
        fake can tell from them); by default nothing: the fake starts empty."""

    def _export(self, volume: V) -> dict[int, bytes]:
        """The non-zero blocks a reader of ``volume`` sees (parents included); in a
        transaction."""
        raise NotImplementedError

    def _import(self, volume_id: str, size_gb: int, owner: str,
                blocks: dict[int, bytes]) -> V:
        """A new volume holding ``blocks`` (NoSpace if they do not fit); in a transaction."""
        raise NotImplementedError

    def _get(self, volume_id: str) -> V:
        raise NotImplementedError

    def _exists(self, volume_id: str) -> bool:
        raise NotImplementedError

    def _volume(self, volume: V) -> Volume:
        raise NotImplementedError

    def _writer(self, volume_id: str, volume: V) -> BlockWriter:
        """What stages a write into ``volume``; in a transaction."""
        raise NotImplementedError

    def _apply(self, volume_id: str, volume: V, staged: StagedWrite) -> None:
        """Put a staged write into ``volume`` (NoSpace leaves it as it was); in a
        transaction."""
        raise NotImplementedError

    def _reserve(self, size_gb: int) -> None:
        """Take ``size_gb`` more from the capacity, or raise NoSpace; in a transaction.

        A thick fake takes room here; a thin one (the default) when data is written.
        """

    def _check_free(self, volume_id: str) -> None:
        """Raise unless no volume has the id ``volume_id``; in a transaction."""
        if self._exists(volume_id):
            raise already_exists(volume_id)

    def _clone_source(self, src_id: str, dst_id: str, size_gb: int) -> V:
        """The volume to clone into a new ``dst_id`` of ``size_gb``; in a transaction."""
        src = self._get(src_id)
        self._check_free(dst_id)
        check_grow(src_id, src.size_gb, size_gb, clone=True)
        return src

    def _clear(self) -> None:
        raise NotImplementedError

    def _restore(self, doc: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _dump(self) -> dict[str, Any]:
        raise NotImplementedError

    def _stored(self) -> Iterable[tuple[str, Stored]]:
        raise NotImplementedError

    def _files(self) -> set[str]:
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

    def _blocks(self, record: Loadable) -> dict[int, bytes]:
        """The blocks of ``record``, read from the state directory when first used."""
        if record.blocks is None:
            assert self._state is not None  # only a persisted fake defers loading
            record.blocks = self._state.read_blocks(record.file)
        return record.blocks

    def _refresh(self, state: StateDir) -> None:
        """Load the state if another instance changed it since this one last did."""
        doc = state.load()
        if doc is None:
            self._clear()
            self._serial = None
            return
        if doc.get("serial") == self._serial:
            return
        if doc.get("kind") != self._kind:
            raise StorageError(f"{state.path} holds the state of a {doc.get('kind')!r} "
                               f"backend, not {self._kind!r}")
        try:
            serial = str(doc["serial"])
            self._restore(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StorageError(f"state file {state.path / 'index.json'} is corrupt: "
                               f"{exc!r}") from exc
        self._serial = serial
        state.forget_all_but(self._files())

    def _save(self, state: StateDir) -> None:
        for stem, record in self._stored():
            if record.dirty:
                record.file = state.write_blocks(stem, self._blocks(record))
                record.dirty = False
        serial = secrets.token_hex(16)
        state.save({"kind": self._kind, "serial": serial, "capacity_gb": self.capacity_gb,
                    **self._dump()}, keep=self._files())
        self._serial = serial

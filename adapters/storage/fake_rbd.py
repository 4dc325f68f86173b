"""A fake Ceph RBD pool: thin images, copy-on-write clones of snapshots, deferred delete."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ivcache.adapters.storage._common import (
    BLOCK,
    ZERO_BLOCK,
    BlockWriter,
    StagedWrite,
    check_at_least,
    check_clone,
    check_sized,
    check_volume_id,
    no_room,
    read_range,
)
from ivcache.adapters.storage._state import PersistedFake, Stored
from ivcache.core.errors import NoSpace, VolumeNotFound
from ivcache.core.model import GIB, Volume

__all__ = ["FakeRbdStorage"]


@attrs.define
class _Snapshot:
    """A protected snapshot of an image, which clones (``children``, by key) read through.

    It goes with its last clone, unless it is still the image's clone snapshot.
    """

    children: set[str]
    blocks: dict[int, bytes] | None
    file: str = ""


@attrs.define
class _Image:
    """An RBD image. ``key`` is its internal id (RBD's image id): it outlives the name, which
    a trashed image gives up, and it is what ``parent`` (``key@snapshot``) points to."""

    key: str
    name: str | None
    size_gb: int
    owner: str
    parent: str | None = None
    # None until first used: a persisted pool loads data only when it is needed.
    blocks: dict[int, bytes] | None = attrs.Factory(dict)
    snaps: dict[str, _Snapshot] = attrs.Factory(dict)
    # Objects held by the image and its snapshots, kept so that the pool's usage is known
    # without loading every image's data.
    objects: int = 0
    file: str = ""
    dirty: bool = False
    # The snapshot new clones are made from: taken by the first clone, forgotten on a write
    # (as RbdStorage does with its ``ivcache.snap`` metadata).
    clone_snap: str | None = None

    @property
    def uid(self) -> str:
        return self.key


class FakeRbdStorage(PersistedFake[_Image]):
    """A simulated RBD pool of ``capacity_gb``: thin images and copy-on-write clones.

    It behaves as ``RbdStorage`` does on a real pool. An image takes only the 1 MiB objects
    written into it. A clone is a child of a protected snapshot of its source, taken by the
    first clone and shared by the next ones until the source is written: it reads through to
    the snapshot for what it has not written, and takes no space until written. An image with
    clones cannot go:
    deleting it moves it to the trash (no longer listed, its name free again), and it is
    purged when its last clone goes. A clone deeper than ``max_clone_depth`` is flattened
    (gets its own copy of every block) instead, as Cinder's ``rbd_max_clone_depth`` does.
    With ``state_path`` the pool lives in that directory, shared by every process.
    """

    pool = "ivcache-fake-pool"
    _kind = "fake-rbd"
    _images: dict[str, _Image]
    _names: dict[str, str]

    def __init__(self, capacity_gb: int = 1000, *, host: str = "",
                 state_path: Path | None = None, max_clone_depth: int = 5) -> None:
        self.max_clone_depth = check_at_least("max_clone_depth", max_clone_depth, 0)
        super().__init__(capacity_gb, host, state_path)

    @property
    def used_bytes(self) -> int:
        """Bytes of the pool taken by objects: images, trashed ones, and snapshot data that
        their image has since overwritten."""
        with self._txn():
            return self._used_blocks() * BLOCK

    def create_volume(self, volume_id: str, size_gb: int, owner: str) -> Volume:
        check_sized(volume_id, size_gb)
        with self._txn(write=True):
            self._check_free(volume_id)
            return self._volume(self._add(volume_id, size_gb, owner))

    def clone_volume(self, src_id: str, dst_id: str, size_gb: int, owner: str) -> Volume:
        check_clone(src_id, dst_id, size_gb)
        with self._txn(write=True):
            src = self._clone_source(src_id, dst_id, size_gb)
            if self._depth(src) + 1 > self.max_clone_depth:
                blocks = self._flattened(src)
                if len(blocks) > self._free_blocks():
                    raise self._no_space(dst_id)
                clone = self._add(dst_id, size_gb, owner)
                clone.blocks, clone.objects, clone.dirty = blocks, len(blocks), True
            else:
                clone = self._add(dst_id, size_gb, owner)
                snap_name = src.clone_snap
                if snap_name is None:
                    snap_name = f"snap-{secrets.token_hex(6)}"
                    # The snapshot shares the image's current block file (both are
                    # immutable), and takes no space until the image changes.
                    src.snaps[snap_name] = _Snapshot(set(), dict(self._blocks(src)), src.file)
                    src.clone_snap = snap_name
                src.snaps[snap_name].children.add(clone.key)
                clone.parent = f"{src.key}@{snap_name}"
            return self._volume(clone)

    def delete_volume(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        with self._txn(write=True):
            image = self._get(volume_id)
            del self._names[volume_id]
            self._forget_clone_snap(image)
            if image.snaps:
                image.name = None
            else:
                self._purge(image)

    def list_volumes(self, owner: str | None = None) -> list[Volume]:
        with self._txn():
            images = (self._images[key] for _, key in sorted(self._names.items()))
            return [self._volume(image) for image in images
                    if owner is None or image.owner == owner]

    def read(self, volume_id: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of a volume, cut at its end (for tests)."""
        check_volume_id(volume_id)
        with self._txn():
            image = self._get(volume_id)
            return read_range(image.size_gb * GIB,
                              lambda index: self._block(image, index), offset, length)

    def depth(self, volume_id: str) -> int:
        """How many snapshots a read of this volume may go through: 0 for a flat image."""
        check_volume_id(volume_id)
        with self._txn():
            return self._depth(self._get(volume_id))

    def parent(self, volume_id: str) -> tuple[str, str] | None:
        """(image key, snapshot name) of the snapshot a clone reads through, or None."""
        check_volume_id(volume_id)
        with self._txn():
            parent = self._get(volume_id).parent
            if parent is None:
                return None
            key, _, snap_name = parent.partition("@")
            return key, snap_name

    def snapshots(self, volume_id: str) -> int:
        """How many snapshots the volume has (for tests)."""
        check_volume_id(volume_id)
        with self._txn():
            return len(self._get(volume_id).snaps)

    def _get(self, volume_id: str) -> _Image:
        key = self._names.get(volume_id)
        if key is None:
            raise VolumeNotFound(volume_id)
        return self._images[key]

    def _exists(self, volume_id: str) -> bool:
        return volume_id in self._names

    def _writer(self, volume_id: str, image: _Image) -> BlockWriter:
        existing = frozenset(self._blocks(image))
        # Each new object takes room, and zeros can free at most the objects already there:
        # a lower bound of the room the write needs, so an image far too big fails early
        # (the stream is consumed without the lock); the exact check is made when applying.
        room = self._free_blocks() + len(existing)
        return BlockWriter(volume_id, image.size_gb, existing=existing, room=room,
                           full=lambda: self._no_space(volume_id))

    def _apply(self, volume_id: str, image: _Image, staged: StagedWrite) -> None:
        blocks = dict(self._blocks(image))
        staged.apply(lambda index, data: self._put(image, blocks, index, data),
                     lambda index: self._block(image, index))
        snaps, clone_snap = dict(image.snaps), image.clone_snap
        self._forget_clone_snap(image)
        objects = self._count(image, blocks)
        if objects - image.objects > self._free_blocks():
            image.snaps, image.clone_snap = snaps, clone_snap
            raise self._no_space(volume_id)
        image.blocks, image.objects, image.dirty = blocks, objects, True

    def _export(self, volume: _Image) -> dict[int, bytes]:
        return self._flattened(volume)

    def _import(self, volume_id: str, size_gb: int, owner: str,
                blocks: dict[int, bytes]) -> _Image:
        if len(blocks) > self._free_blocks():
            raise self._no_space(volume_id)
        image = self._add(volume_id, size_gb, owner)
        image.blocks, image.objects, image.dirty = dict(blocks), len(blocks), True
        return image

    def _add(self, name: str, size_gb: int, owner: str) -> _Image:
        image = _Image(secrets.token_hex(8), name, size_gb, owner)
        self._images[image.key] = image
        self._names[name] = image.key
        return image

    def _snapshot(self, ref: str) -> tuple[_Image, _Snapshot]:
        key, _, snap_name = ref.partition("@")
        image = self._images[key]
        return image, image.snaps[snap_name]

    def _depth(self, image: _Image) -> int:
        depth, parent = 0, image.parent
        while parent is not None:
            depth += 1
            parent = self._snapshot(parent)[0].parent
        return depth

    def _parent_block(self, image: _Image, index: int) -> bytes | None:
        parent = image.parent
        while parent is not None:
            owner, snap = self._snapshot(parent)
            data = self._blocks(snap).get(index)
            if data is not None:
                return data
            parent = owner.parent
        return None

    def _block(self, image: _Image, index: int) -> bytes | None:
        data = self._blocks(image).get(index)
        return data if data is not None else self._parent_block(image, index)

    def _flattened(self, image: _Image) -> dict[int, bytes]:
        indexes = set(self._blocks(image))
        parent = image.parent
        while parent is not None:
            owner, snap = self._snapshot(parent)
            indexes.update(self._blocks(snap))
            parent = owner.parent
        blocks = {}
        for index in indexes:
            data = self._block(image, index)
            if data is not None and data != ZERO_BLOCK:
                blocks[index] = data
        return blocks

    def _put(self, image: _Image, blocks: dict[int, bytes], index: int,
             data: bytes | None) -> None:
        if data is not None and data != ZERO_BLOCK:
            blocks[index] = data
        elif self._parent_block(image, index) is not None:
            # Zeros over the parent's data must be stored, or reads would fall through.
            blocks[index] = ZERO_BLOCK
        else:
            blocks.pop(index, None)

    def _purge(self, image: _Image) -> None:
        """Remove an image without clones; a trashed parent left without clones goes too."""
        while True:
            del self._images[image.key]
            if image.parent is None:
                return
            parent, snap = self._snapshot(image.parent)
            snap.children.discard(image.key)
            snap_name = image.parent.partition("@")[2]
            if not snap.children and (parent.name is None or parent.clone_snap != snap_name):
                del parent.snaps[snap_name]
            if parent.name is not None or parent.snaps:
                parent.objects = self._count(parent)
                return
            image = parent

    def _forget_clone_snap(self, image: _Image) -> None:
        """Later clones must not use the image's clone snapshot; drop it if none reads it."""
        name, image.clone_snap = image.clone_snap, None
        if name is not None and not image.snaps[name].children:
            del image.snaps[name]

    def _free_blocks(self) -> int:
        return self.capacity_gb * GIB // BLOCK - self._used_blocks()

    def _used_blocks(self) -> int:
        return sum(image.objects for image in self._images.values())

    def _count(self, image: _Image, head: dict[int, bytes] | None = None) -> int:
        """Objects of an image (with ``head`` for its blocks) and of its snapshots.

        A snapshot takes space only where its image has since changed; several snapshots
        holding the same old object count it once.
        """
        blocks = head if head is not None else self._blocks(image)
        if not image.snaps:
            return len(blocks)
        distinct: dict[int, list[bytes]] = {index: [data] for index, data in blocks.items()}
        for snap in image.snaps.values():
            for index, data in self._blocks(snap).items():
                seen = distinct.setdefault(index, [])
                if not any(data is other or data == other for other in seen):
                    seen.append(data)
        return sum(len(seen) for seen in distinct.values())

    def _no_space(self, volume_id: str) -> NoSpace:
        return no_room(f"pool {self.pool}", self._free_blocks() * BLOCK, self.capacity_gb,
                       f"the data of volume {volume_id}")

    def _volume(self, image: _Image) -> Volume:
        assert image.name is not None  # only visible images are ever returned
        return Volume(image.name, image.size_gb, image.owner, self.host,
                      f"{self.pool}/{image.name}", "rbd_image")

    def _clear(self) -> None:
        self._images, self._names = {}, {}

    def _restore(self, doc: Mapping[str, Any]) -> None:
        images = {}
        for key, rec in doc["images"].items():
            snaps = {name: _Snapshot(set(map(str, s["children"])), None if s["file"] else {},
                                     str(s["file"]))
                     for name, s in rec["snaps"].items()}
            images[key] = _Image(str(key), rec["name"], int(rec["size_gb"]), str(rec["owner"]),
                                 rec["parent"], None if rec["file"] else {}, snaps,
                                 int(rec["objects"]), str(rec["file"]),
                                 clone_snap=rec.get("clone_snap"))
        self._images = images
        self._names = {image.name: key for key, image in images.items()
                       if image.name is not None}

    def _dump(self) -> dict[str, Any]:
        records = {
            image.key: {
                "name": image.name, "size_gb": image.size_gb, "owner": image.owner,
                "parent": image.parent, "file": image.file, "objects": image.objects,
                "snaps": {name: {"children": sorted(snap.children), "file": snap.file}
                          for name, snap in image.snaps.items()},
                "clone_snap": image.clone_snap,
            }
            for image in self._images.values()
        }
        return {"max_clone_depth": self.max_clone_depth, "images": records}

    def _stored(self) -> Iterable[tuple[str, Stored]]:
        return ((image.key, image) for image in self._images.values())

    def _lose(self, lost: set[str]) -> None:
        """The images and snapshots whose block file is gone lose their data; every
        volume reading it (its own, or through a snapshot) is deleted."""
        damaged: set[str] = set()
        for image in self._images.values():
            if image.file in lost:
                image.file, image.blocks = "", {}
                damaged.add(image.key)
            for name, snap in image.snaps.items():
                if snap.file in lost:
                    snap.file, snap.blocks = "", {}
                    damaged.add(f"{image.key}@{name}")
        def reads_damaged(image: _Image) -> bool:
            if image.key in damaged:
                return True
            ref = image.parent
            while ref is not None:
                if ref in damaged:
                    return True
                ref = self._images[ref.partition("@")[0]].parent
            return False
        for name in [n for n, key in sorted(self._names.items())
                     if reads_damaged(self._images[key])]:
            # As delete_volume does, inside this transaction.
            image = self._get(name)
            del self._names[name]
            self._forget_clone_snap(image)
            if image.snaps:
                image.name = None
            else:
                self._purge(image)
        for image in self._images.values():
            image.objects = self._count(image)

    def _files(self) -> set[str]:
        """The block files the pool's images and snapshots are stored in."""
        files = {image.file for image in self._images.values()}
        files.update(snap.file for image in self._images.values()
                     for snap in image.snaps.values())
        files.discard("")
        return files

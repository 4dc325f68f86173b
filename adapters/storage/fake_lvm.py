"""A fake LVM volume group: thick volumes, full-copy clones, a fixed capacity."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ivcache.adapters.storage._common import (
    BLOCK,
    UNKNOWN_OWNER,
    ZERO_BLOCK,
    BlockWriter,
    StagedWrite,
    check_clone,
    check_room,
    check_sized,
    check_volume_id,
    read_range,
)
from ivcache.adapters.storage._state import PersistedFake, StateDir, Stored
from ivcache.core.errors import InvalidIdentifier, StorageError, VolumeNotFound
from ivcache.core.model import GIB, Volume

# A block file's name: <volume id>.<token>.blk (StateDir.write_blocks).
_BLOCK_FILE = re.compile(r"(.+)\.[0-9a-f]{16}\.blk")

__all__ = ["FakeLvmStorage"]


@attrs.define
class _LogicalVolume:
    id: str
    size_gb: int
    owner: str
    # Tells a volume from a later one of the same id: a write staged outside the lock must
    # not land in a volume made after its own was deleted.
    uid: str
    # None until first used: a persisted group loads a volume's data only when it is needed.
    blocks: dict[int, bytes] | None = attrs.Factory(dict)
    file: str = ""
    dirty: bool = False


class FakeLvmStorage(PersistedFake[_LogicalVolume]):
    """A simulated LVM volume group of ``capacity_gb``: thick volumes, full copies.

    Every volume takes its whole size from the group when it is made or extended, and a
    clone copies every block of its source, so deleting the source never touches the clone.
    Data is kept sparse (only non-zero 1 MiB blocks), so a large volume with little data is
    cheap. With ``state_path`` the group lives in that directory, shared by every process
    that opens it, so volumes outlive the process.
    """

    vg_name = "ivcache-fake-vg"
    _kind = "fake-lvm"
    _volumes: dict[str, _LogicalVolume]

    def __init__(self, capacity_gb: int = 1000, *, host: str = "",
                 state_path: Path | None = None) -> None:
        super().__init__(capacity_gb, host, state_path)

    @property
    def free_gb(self) -> int:
        """GiB of the group that no volume holds."""
        with self._txn():
            return self.capacity_gb - self._used_gb()

    def create_volume(self, volume_id: str, size_gb: int, owner: str) -> Volume:
        check_sized(volume_id, size_gb)
        with self._txn(write=True):
            self._check_free(volume_id)
            self._reserve(size_gb)
            lv = _LogicalVolume(volume_id, size_gb, owner, secrets.token_hex(8))
            self._volumes[volume_id] = lv
            return self._volume(lv)

    def clone_volume(self, src_id: str, dst_id: str, size_gb: int, owner: str) -> Volume:
        check_clone(src_id, dst_id, size_gb)
        with self._txn(write=True):
            src = self._clone_source(src_id, dst_id, size_gb)
            self._reserve(size_gb)
            # Blocks are immutable bytes, so sharing them is a copy as far as anyone can
            # tell; a persisted group writes every byte into the clone's own file.
            lv = _LogicalVolume(dst_id, size_gb, owner, secrets.token_hex(8),
                                dict(self._blocks(src)), dirty=True)
            self._volumes[dst_id] = lv
            return self._volume(lv)

    def delete_volume(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        with self._txn(write=True):
            self._get(volume_id)
            del self._volumes[volume_id]

    def list_volumes(self, owner: str | None = None) -> list[Volume]:
        with self._txn():
            return [self._volume(lv) for _, lv in sorted(self._volumes.items())
                    if owner is None or lv.owner == owner]

    def read(self, volume_id: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of a volume, cut at its end (for tests)."""
        check_volume_id(volume_id)
        with self._txn():
            lv = self._get(volume_id)
            return read_range(lv.size_gb * GIB, self._blocks(lv).get, offset, length)

    def _get(self, volume_id: str) -> _LogicalVolume:
        lv = self._volumes.get(volume_id)
        if lv is None:
            raise VolumeNotFound(volume_id)
        return lv

    def _exists(self, volume_id: str) -> bool:
        return volume_id in self._volumes

    def _writer(self, volume_id: str, lv: _LogicalVolume) -> BlockWriter:
        return BlockWriter(volume_id, lv.size_gb)

    def _apply(self, volume_id: str, lv: _LogicalVolume, staged: StagedWrite) -> None:
        blocks = dict(self._blocks(lv))
        staged.apply(lambda index, data: _put(blocks, index, data), blocks.get)
        lv.blocks = blocks
        lv.dirty = True

    def _export(self, volume: _LogicalVolume) -> dict[int, bytes]:
        return dict(self._blocks(volume))

    def _import(self, volume_id: str, size_gb: int, owner: str,
                blocks: dict[int, bytes]) -> _LogicalVolume:
        self._reserve(size_gb)
        lv = _LogicalVolume(volume_id, size_gb, owner, secrets.token_hex(8), dict(blocks),
                            dirty=True)
        self._volumes[volume_id] = lv
        return lv

    def _used_gb(self) -> int:
        return sum(lv.size_gb for lv in self._volumes.values())

    def _reserve(self, size_gb: int) -> None:
        check_room(f"volume group {self.vg_name}", self.capacity_gb, self._used_gb() * GIB,
                   size_gb)

    def _volume(self, lv: _LogicalVolume) -> Volume:
        return Volume(lv.id, lv.size_gb, lv.owner, self.host, f"/dev/{self.vg_name}/{lv.id}",
                      "path")

    def _clear(self) -> None:
        self._volumes = {}

    def _restore(self, doc: Mapping[str, Any]) -> None:
        self._volumes = {
            vid: _LogicalVolume(vid, int(rec["size_gb"]), str(rec["owner"]), str(rec["uid"]),
                                None if rec["file"] else {}, str(rec["file"]))
            for vid, rec in doc["volumes"].items()
        }

    def _dump(self) -> dict[str, Any]:
        return {"volumes": {
            lv.id: {"size_gb": lv.size_gb, "owner": lv.owner, "uid": lv.uid, "file": lv.file}
            for lv in self._volumes.values()
        }}

    def _stored(self) -> Iterable[tuple[str, Stored]]:
        return ((lv.id, lv) for lv in self._volumes.values())

    def _files(self) -> set[str]:
        return {lv.file for lv in self._volumes.values() if lv.file}

    def _lose(self, lost: set[str]) -> None:
        for volume_id in [v for v, lv in self._volumes.items() if lv.file in lost]:
            del self._volumes[volume_id]

    def _rebuild(self, state: StateDir) -> None:
        """A volume for each volume id that block files are named by (its newest file),
        as large as its last block needs, owned by ``UNKNOWN_OWNER``: a volume without
        data left no file, and is lost with the index."""
        newest: dict[str, tuple[int, str]] = {}
        for entry in os.scandir(state.blocks_dir):
            match = _BLOCK_FILE.fullmatch(entry.name)
            if match is None:
                continue
            try:
                volume_id = check_volume_id(match.group(1))
            except InvalidIdentifier:
                continue
            stamp = entry.stat().st_mtime_ns
            if volume_id not in newest or newest[volume_id][0] < stamp:
                newest[volume_id] = (stamp, entry.name)
        for volume_id, (_, name) in sorted(newest.items()):
            try:
                blocks = state.read_blocks(name)
            except StorageError:
                continue  # damaged too: nothing to rebuild from
            size_gb = max(1, -(-(max(blocks, default=0) + 1) * BLOCK // GIB))
            self._volumes[volume_id] = _LogicalVolume(volume_id, size_gb, UNKNOWN_OWNER,
                                                      secrets.token_hex(8), blocks, name)


def _put(blocks: dict[int, bytes], index: int, data: bytes | None) -> None:
    if data is None or data == ZERO_BLOCK:
        blocks.pop(index, None)
    else:
        blocks[index] = data

"""Real storage: raw base files and qcow2 overlays on them, through ``qemu-img``.

``qemu-img`` comes with Debian's ``qemu-utils``. Layout of ``root``::

    index.json      every volume (its data file, size, owner) and every data file (format,
                    size, backing file); replaced atomically, under the lock
    .lock           flock'ed around every change, so processes sharing root agree
    .tmp-<owner>-*  the index being replaced: removed if its maker died
    .reserve        room kept for the index (1 MiB, or twice the index): a delete on a
                    full filesystem frees it to save the index, then takes it back
    files/<id>.<token>.raw     a volume made by create_volume: a raw sparse file
    files/<id>.<token>.qcow2   a clone: a qcow2 overlay naming its backing file by absolute
                               path and format (``-b ABS -F FMT``)
    files/.tmp-<owner>-*       an image being staged: removed if its maker (pid and start
                               time, see ``_files``) died
    files/.tpl-<file>-<gb>.qcow2   an empty overlay on <file> that clones copy (made once
                               by qemu-img create); removed with <file>

A data file that backs others is never changed nor deleted under them: writing or extending
its volume first moves the volume onto a new overlay of the file, and deleting its volume
hides it (no longer listed; ``VolumeNotFound``). A hidden file goes when the last file it
backs goes. Data files are named with a random token, so a volume id can be used again while
a hidden file of the same id still backs others.

What a crash leaves (``leftovers``, which ``cache reconcile`` reports and ``--fix`` repairs;
every change also reaps the first two on its way): temp files of dead processes, data files
the index does not name (made, but the index's save never landed), records of files that are
gone, and an index that cannot be read. An unreadable index is kept beside the new one as
``index.json.damaged-<token>``; the new one is rebuilt from ``files/`` (``qemu-img info``)
and from the volume records still whole in the damaged text; a volume no whole record names
is owned by ``(unknown)``, which only an admin sees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import attrs

from ivcache.adapters.storage._common import (
    UNKNOWN_OWNER,
    already_exists,
    check_at_least,
    check_clone,
    check_grow,
    check_range,
    check_room,
    check_sized,
    check_volume_id,
)
from ivcache.adapters.storage._files import (
    TEMP_PREFIX,
    FileLock,
    atomic_write,
    dead_temp_leftovers,
    disk_bytes,
    filesystem_full,
    fsync_dir,
    no_space_errors,
    open_temp,
    sweep,
    temp_name,
)
from ivcache.adapters.storage._sparse import pwrite_all, write_chunks, write_file
from ivcache.adapters.storage.file import FileStorage, copy_data
from ivcache.core.errors import NoSpace, StorageError, VolumeNotFound
from ivcache.core.model import GIB, Volume
from ivcache.core.ports import StorageBackend

__all__ = ["Qcow2Storage"]

Format = Literal["raw", "qcow2"]

_SECTOR = 512
# qemu-img dd reads whole blocks: a MiB keeps the subprocess count low for test reads.
_READ_BLOCK = 1024**2
_INSTALL_HINT = "install qemu-utils (apt-get install -y qemu-utils)"
_RESERVE = ".reserve"
_RESERVE_MIN = 1 << 20
# A data file's name: <volume id>.<token>.<format>
_DATA_NAME = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,127})\.[0-9a-f]{12}\.(raw|qcow2)")
# The start of a volume record in an index's text (indent=1: ids at two spaces).
_VOLUME_KEY = re.compile(r'\n  "((?:[^"\\]|\\.)+)": \{')
# A whole volume record in an index's text (sort_keys: file, owner, size_gb).
_VOLUME_RECORD = re.compile(
    r'"((?:[^"\\]|\\.)+)": \{\s*"file": "((?:[^"\\]|\\.)+)",\s*'
    r'"owner": "((?:[^"\\]|\\.)*)",\s*"size_gb": (\d+)\s*\}')


@attrs.frozen
class _File:
    format: Format
    size_gb: int
    backing: str | None  # the name of the data file under this one, if any


@attrs.frozen
class _Vol:
    file: str
    size_gb: int
    owner: str


@attrs.define
class _State:
    volumes: dict[str, _Vol] = attrs.Factory(dict)
    files: dict[str, _File] = attrs.Factory(dict)

    def has_children(self, name: str) -> bool:
        return any(f.backing == name for f in self.files.values())

    def depth(self, name: str) -> int:
        """How many backing files lie beneath ``name``."""
        depth = 0
        backing = self.files[name].backing
        while backing is not None:
            depth += 1
            backing = self.files[backing].backing
        return depth

    def hidden(self) -> list[str]:
        """Data files that no volume uses: kept only because they back others."""
        used = {volume.file for volume in self.volumes.values()}
        return [name for name in self.files if name not in used]

    def collect(self) -> list[str]:
        """Forget and return the data files that nothing needs any more."""
        gone: list[str] = []
        while True:
            needed = {volume.file for volume in self.volumes.values()}
            needed |= {f.backing for f in self.files.values() if f.backing is not None}
            free = [name for name in self.files if name not in needed]
            if not free:
                return gone
            for name in free:
                del self.files[name]
            gone += free

    def to_json(self) -> dict[str, Any]:
        return {"volumes": {k: attrs.asdict(v) for k, v in sorted(self.volumes.items())},
                "files": {k: attrs.asdict(f) for k, f in sorted(self.files.items())}}

    @classmethod
    def from_json(cls, doc: Any) -> _State:
        state = cls()
        for name, f in doc["files"].items():
            if f["format"] not in ("raw", "qcow2") or not _is_size(f["size_gb"]) \
                    or not (f["backing"] is None or f["backing"] in doc["files"]):
                raise ValueError(f"bad file record {name!r}")
            state.files[name] = _File(f["format"], f["size_gb"], f["backing"])
        for volume_id, v in doc["volumes"].items():
            if v["file"] not in state.files or not _is_size(v["size_gb"]) \
                    or not isinstance(v["owner"], str):
                raise ValueError(f"bad volume record {volume_id!r}")
            state.volumes[volume_id] = _Vol(v["file"], v["size_gb"], v["owner"])
        return state


class Qcow2Storage:
    """Volumes as raw bases and qcow2 overlays under ``root``; real, shared between processes.

    ``create_volume`` makes a raw sparse file; ``clone_volume`` a qcow2 overlay on the
    source's file, so a clone costs milliseconds whatever the size. ``write_image`` writes a
    raw file in place (zero runs stay holes) and a qcow2 file through ``qemu-img convert -n``.
    A chain deeper than ``max_chain_depth`` backing files is not grown: such a clone is a
    flattened copy instead. ``capacity_gb`` (0 = unlimited) caps the sum of the volumes'
    sizes and of the hidden files'. ``qemu_img`` is the program to run.
    """

    def __init__(self, root: Path, *, host: str = "", capacity_gb: int = 0,
                 qemu_img: str = "qemu-img", max_chain_depth: int = 8) -> None:
        check_at_least("capacity_gb", capacity_gb, 0, "0 = unlimited")
        check_at_least("max_chain_depth", max_chain_depth, 1)
        found = shutil.which(qemu_img)
        if found is None:
            raise StorageError(f"{qemu_img} not found: the qcow2 storage needs it; "
                               f"{_INSTALL_HINT}")
        self.qemu_img = found
        self.root = Path(root).absolute()
        self.files_dir = self.root / "files"
        self.host = host
        self.capacity_gb = capacity_gb
        self.max_chain_depth = max_chain_depth
        with no_space_errors(f"creating {self.files_dir}"):
            self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.root / ".lock")
        # Nothing is reaped here, so that ``cache reconcile`` still sees what a crash left;
        # the next change reaps it.
        with self._lock.held():
            self._keep_reserve()

    def create_volume(self, volume_id: str, size_gb: int, owner: str) -> Volume:
        check_sized(volume_id, size_gb)
        with self._changing() as state:
            if volume_id in state.volumes:
                raise already_exists(volume_id)
            self._reserve(state, size_gb)
            name = self._new_name(volume_id, "raw")
            path = self.files_dir / name
            try:
                with no_space_errors(f"creating volume {volume_id}"):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600)
                    try:
                        os.ftruncate(fd, size_gb * GIB)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                state.files[name] = _File("raw", size_gb, None)
                state.volumes[volume_id] = _Vol(name, size_gb, owner)
                self._save(state)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        return self._volume(volume_id, state.volumes[volume_id])

    def write_image(self, volume_id: str, chunks: Iterable[bytes]) -> int:
        """Stream ``chunks`` into the volume from offset 0.

        Into a raw file directly, zero runs left as holes; into a qcow2 file by staging the
        image in a sparse temp file and ``qemu-img convert -n`` (zeros written as zero
        clusters, so they hide what the backing file holds).
        """
        volume, fmt = self._writable(volume_id)
        path = self.files_dir / volume.file
        if fmt == "raw":
            return write_file(path, chunks, volume_id=volume_id, size_gb=volume.size_gb)
        return self._write_qcow2(volume_id, volume, path, chunks)

    def raw_file(self, volume_id: str) -> Path | None:
        """The raw file holding the volume's bytes, for a writer that writes it in place
        (the image converter's qemu-img); None if the volume is a qcow2 file (a clone)."""
        volume, fmt = self._writable(volume_id)
        return self.files_dir / volume.file if fmt == "raw" else None

    def _writable(self, volume_id: str) -> tuple[_Vol, Format]:
        """The volume's own file, no other file backing on it, and that file's format."""
        check_volume_id(volume_id)
        with self._changing() as state:
            volume = self._require(state, volume_id)
            if state.has_children(volume.file):
                volume = self._move_to_overlay(state, volume_id, volume, volume.size_gb)
            return volume, state.files[volume.file].format

    def clone_volume(self, src_id: str, dst_id: str, size_gb: int, owner: str) -> Volume:
        check_clone(src_id, dst_id, size_gb)
        with self._changing() as state:
            src = self._require(state, src_id)
            if dst_id in state.volumes:
                raise already_exists(dst_id)
            check_grow(src_id, src.size_gb, size_gb, clone=True)
            self._reserve(state, size_gb)
            name = self._derive(state, src.file, dst_id, size_gb)
            try:
                state.volumes[dst_id] = _Vol(name, size_gb, owner)
                self._save(state)
            except BaseException:
                (self.files_dir / name).unlink(missing_ok=True)
                raise
        return self._volume(dst_id, state.volumes[dst_id])

    def can_fill_from(self, source: StorageBackend) -> bool:
        """File or qcow2 storage anywhere on this machine: qemu-img reads any local path.
        A raw source is reflinked or copied in the kernel where the filesystem can."""
        return isinstance(source, FileStorage | Qcow2Storage)

    def fill_from(self, source: StorageBackend, src_id: str, dst_id: str, size_gb: int,
                  owner: str) -> Volume:
        """A new raw volume holding the source volume's bytes, independent of it."""
        check_clone(src_id, dst_id, size_gb)
        if not isinstance(source, FileStorage | Qcow2Storage):
            raise StorageError(f"storage {self.root} cannot fill a volume from {source!r}: "
                               "only from file or qcow2 storage")
        src_gb = source.get_volume(src_id).size_gb
        check_grow(src_id, src_gb, size_gb, clone=True)
        with self._changing() as state:
            if dst_id in state.volumes:
                raise already_exists(dst_id)
            self._reserve(state, size_gb)
        # The copy runs outside the lock, into a temp file owned by this process (a crash
        # leaves nothing that the next sweep keeps).
        staged = self._temp_path(".raw")
        try:
            path, fmt = source.local_file(src_id)
            what = f"filling volume {dst_id} from {path}"
            if fmt == "raw":
                with no_space_errors(what):
                    fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600)
                    try:
                        copy_data(path, src_id, fd, size_gb * GIB)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            else:
                self._qemu(["convert", "-q", "-f", fmt, "-O", "raw", str(path), str(staged)],
                           what)
                with no_space_errors(what):
                    os.truncate(staged, size_gb * GIB)
            with self._changing() as state:
                if dst_id in state.volumes:
                    raise already_exists(dst_id)
                self._reserve(state, size_gb)
                name = self._new_name(dst_id, "raw")
                with no_space_errors(what):
                    os.replace(staged, self.files_dir / name)
                try:
                    state.files[name] = _File("raw", size_gb, None)
                    state.volumes[dst_id] = _Vol(name, size_gb, owner)
                    self._save(state)
                except BaseException:
                    (self.files_dir / name).unlink(missing_ok=True)
                    raise
        finally:
            staged.unlink(missing_ok=True)
        return self._volume(dst_id, state.volumes[dst_id])

    def local_file(self, volume_id: str) -> tuple[Path, Format]:
        """The file holding the volume's bytes as a guest sees them (with its backing
        chain), and its format: for another backend that copies them (``fill_from``)."""
        check_volume_id(volume_id)
        state = self._load()
        volume = self._require(state, volume_id)
        return self.files_dir / volume.file, state.files[volume.file].format

    def extend_volume(self, volume_id: str, size_gb: int) -> Volume:
        check_sized(volume_id, size_gb)
        with self._changing() as state:
            volume = self._require(state, volume_id)
            check_grow(volume_id, volume.size_gb, size_gb)
            if size_gb == volume.size_gb:
                return self._volume(volume_id, volume)
            self._reserve(state, size_gb - volume.size_gb)
            if state.has_children(volume.file):
                volume = self._move_to_overlay(state, volume_id, volume, size_gb)
            else:
                self._resize(state, volume.file, size_gb, f"extending volume {volume_id}")
                volume = attrs.evolve(volume, size_gb=size_gb)
                state.volumes[volume_id] = volume
                self._save(state)
        return self._volume(volume_id, volume)

    def delete_volume(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        with self._changing() as state:
            self._require(state, volume_id)
            del state.volumes[volume_id]
            gone = state.collect()
            # The index first: from then on the volume is gone even if a crash leaves its
            # file behind (the next change removes files that the index does not name). On
            # a full filesystem the reserve makes the room for it; without one (it could
            # not be made), the files are freed first, then the index saved: a crash
            # between leaves records of files that are gone, which reconcile repairs.
            try:
                self._save(state, freeing=True)
            except NoSpace:
                self._unlink(gone)
                self._save(state, freeing=True)
            self._unlink(gone)
            with no_space_errors(f"deleting volume {volume_id}"):
                fsync_dir(self.files_dir)
            self._keep_reserve()

    def _unlink(self, names: Iterable[str]) -> None:
        for name in names:
            (self.files_dir / name).unlink(missing_ok=True)
            self._drop_templates(name)

    def get_volume(self, volume_id: str) -> Volume:
        check_volume_id(volume_id)
        return self._volume(volume_id, self._require(self._load(), volume_id))

    def leftovers(self, *, remove: bool) -> list[tuple[str, str, int]]:
        """What crashed processes left: their temp files in ``files/`` (``partial-volume``);
        and as ``index-damage``, the index's temp files, an index that cannot be read, the
        records of files that are gone, and data files or templates that no record names.
        With ``remove``, temp files and unnamed files go, records of lost files are dropped
        (with the volumes and overlays that read them), and an unreadable index is
        rebuilt."""
        with self._lock.held():
            found = dead_temp_leftovers((("index-damage", self.root),
                                         ("partial-volume", self.files_dir)), remove=remove)
            index = self.root / "index.json"
            try:
                state = self._load()
            except StorageError:
                found.append(("index-damage", str(index), disk_bytes(index)))
                if remove:
                    self._rebuild()
                return found  # without an index, no file can be judged
            names = set(os.listdir(self.files_dir))
            lost = sorted(name for name in state.files if name not in names)
            found += [("index-damage", str(self.files_dir / name), 0) for name in lost]
            if lost and remove:
                self._unlink(self._forget(state, set(lost)))
                self._save(state, freeing=True)
                names = set(os.listdir(self.files_dir))
            for name in sorted(names - set(state.files)):
                if not self._unnamed(state, name):
                    continue
                path = self.files_dir / name
                found.append(("index-damage", str(path), disk_bytes(path)))
                if remove:
                    path.unlink(missing_ok=True)
            return found

    def list_volumes(self, owner: str | None = None) -> list[Volume]:
        state = self._load()
        return [self._volume(volume_id, volume)
                for volume_id, volume in sorted(state.volumes.items())
                if owner is None or volume.owner == owner]

    def read(self, volume_id: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` as a guest sees them, cut at the volume's end.

        Through ``qemu-img dd``: for tests and checks, not for moving much data.
        """
        check_volume_id(volume_id)
        check_range(offset, length)
        state = self._load()
        volume = self._require(state, volume_id)
        return self._read_file(volume.file, state.files[volume.file].format,
                               volume.size_gb * GIB, offset, length)

    # -- data ------------------------------------------------------------------------------

    def _write_qcow2(self, volume_id: str, volume: _Vol, path: Path,
                     chunks: Iterable[bytes]) -> int:
        limit = volume.size_gb * GIB
        staged, fd = open_temp(self.files_dir, ".raw")
        written = 0
        try:
            try:
                written = write_chunks(fd, chunks, volume_id=volume_id,
                                       size_gb=volume.size_gb, fresh=True)
                if written % _SECTOR:
                    # qemu-img copies whole sectors: the rest of the last one must keep what
                    # the volume holds there, not become zeros.
                    rest = self._read_file(volume.file, "qcow2", limit, written,
                                           _SECTOR - written % _SECTOR)
                    with no_space_errors(f"writing volume {volume_id}"):
                        pwrite_all(fd, memoryview(rest), written)
            finally:
                os.close(fd)
            if written:
                if not path.exists():
                    raise VolumeNotFound(volume_id)
                self._qemu(["convert", "-q", "-n", "-f", "raw", "-O", "qcow2", str(staged),
                            str(path)], f"writing volume {volume_id}")
        finally:
            staged.unlink(missing_ok=True)
        return written

    def _read_file(self, name: str, fmt: Format, size: int, offset: int,
                   length: int) -> bytes:
        end = min(offset + length, size)
        if end <= offset:
            return b""
        first = offset // _READ_BLOCK
        count = -(-end // _READ_BLOCK) - first
        out = self._temp_path(".raw")
        try:
            # qemu-img dd (7.2) counts ``count`` from the start of the input, skipped blocks
            # included; a dd that counts after the skip just reads more. Either way the
            # output starts at block ``first``.
            self._qemu(["dd", "-f", fmt, "-O", "raw", f"bs={_READ_BLOCK}", f"skip={first}",
                        f"count={first + count}", f"if={self.files_dir / name}", f"of={out}"],
                       f"reading {name}")
            with open(out, "rb") as f:
                return os.pread(f.fileno(), end - offset, offset - first * _READ_BLOCK)
        finally:
            out.unlink(missing_ok=True)

    # -- files and the index ---------------------------------------------------------------

    def _derive(self, state: _State, base: str, stem: str, size_gb: int) -> str:
        """Make a new qcow2 file reading like ``base``, of ``size_gb``; lock held.

        An overlay on ``base``, unless that would make the chain too deep: then a flattened
        copy, which backs on nothing.
        """
        name = self._new_name(stem, "qcow2")
        path = self.files_dir / name
        base_path = self.files_dir / base
        base_file = state.files[base]
        size = str(size_gb * GIB)
        try:
            if state.depth(base) < self.max_chain_depth:
                self._overlay(base, base_file.format, size_gb, path, f"cloning {base} to {stem}")
                state.files[name] = _File("qcow2", size_gb, base)
            else:
                self._qemu(["convert", "-q", "-f", base_file.format, "-O", "qcow2",
                            str(base_path), str(path)], f"flattening {base} into {stem}")
                if size_gb > base_file.size_gb:
                    self._qemu(["resize", "-q", "-f", "qcow2", str(path), size],
                               f"resizing {stem}")
                state.files[name] = _File("qcow2", size_gb, None)
        except BaseException:
            state.files.pop(name, None)
            path.unlink(missing_ok=True)
            raise
        return name

    def _overlay(self, base: str, fmt: Format, size_gb: int, path: Path, what: str) -> None:
        """Make ``path`` an empty qcow2 overlay of ``size_gb`` on ``base``; lock held.

        qemu-img writes the same bytes for the same backing file and size (a qcow2 header
        holds no per-file id), so the first overlay of a (base, size) is kept as a template
        and the next ones are copies of it: a hit copies ~200 KiB instead of starting
        qemu-img, which takes 10-30 ms here.
        """
        template = self._template(base, size_gb)
        if not template.exists():
            staged = self._temp_path(".qcow2")
            try:
                self._qemu(["create", "-q", "-f", "qcow2", "-b", str(self.files_dir / base),
                            "-F", fmt, str(staged), str(size_gb * GIB)], what)
                os.replace(staged, template)
            finally:
                staged.unlink(missing_ok=True)
        with no_space_errors(what), open(template, "rb") as src, \
                open(path, "xb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())

    def _template(self, base: str, size_gb: int) -> Path:
        return self.files_dir / f".tpl-{base}-{size_gb}.qcow2"

    def _drop_templates(self, base: str) -> None:
        for template in self.files_dir.glob(f".tpl-{base}-*.qcow2"):
            template.unlink(missing_ok=True)

    def _move_to_overlay(self, state: _State, volume_id: str, volume: _Vol,
                         size_gb: int) -> _Vol:
        """Put the volume on a new file over its current one, which others read; lock held."""
        name = self._derive(state, volume.file, volume_id, size_gb)
        moved = _Vol(name, size_gb, volume.owner)
        state.volumes[volume_id] = moved
        try:
            self._save(state)
        except BaseException:
            (self.files_dir / name).unlink(missing_ok=True)
            raise
        return moved

    def _resize(self, state: _State, name: str, size_gb: int, what: str) -> None:
        path = self.files_dir / name
        fmt = state.files[name].format
        if fmt == "raw":
            with no_space_errors(what):
                os.truncate(path, size_gb * GIB)
        else:
            self._qemu(["resize", "-q", "-f", "qcow2", str(path), str(size_gb * GIB)], what)
        state.files[name] = attrs.evolve(state.files[name], size_gb=size_gb)

    def _reserve(self, state: _State, size_gb: int) -> None:
        """Raise NoSpace unless ``size_gb`` more fits under ``capacity_gb``; lock held."""
        if not self.capacity_gb:
            return
        used = sum(volume.size_gb for volume in state.volumes.values())
        used += sum(state.files[name].size_gb for name in state.hidden())
        check_room(f"storage {self.root}", self.capacity_gb, used * GIB, size_gb)

    def _load(self) -> _State:
        path = self.root / "index.json"
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return _State()
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            return _State.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"index {path} is corrupt: {exc}") from exc

    def _save(self, state: _State, *, freeing: bool = False) -> None:
        """Write the index. ``freeing``: for a change that frees room (a delete), which may
        spend the reserve when the filesystem is full; the others must not, or a full
        filesystem would leave no room for the delete that frees it."""
        data = json.dumps(state.to_json(), sort_keys=True, indent=1).encode()
        path = self.root / "index.json"
        try:
            atomic_write(path, data, fault="qcow2-index-save")
        except NoSpace:
            reserve = self.root / _RESERVE
            if not freeing or not reserve.exists():
                raise
            reserve.unlink()
            atomic_write(path, data, fault="qcow2-index-save")
        self._keep_reserve(len(data))

    def _keep_reserve(self, index_size: int | None = None) -> None:
        """Keep ``.reserve`` at least twice the index (1 MiB at least), where there is room;
        lock held. Its blocks are allocated, so freeing it frees that much."""
        reserve = self.root / _RESERVE
        if index_size is None:
            try:
                index_size = (self.root / "index.json").stat().st_size
            except FileNotFoundError:
                index_size = 0
        size = max(_RESERVE_MIN, 2 * index_size)
        try:
            if reserve.stat().st_size >= size:
                return
        except FileNotFoundError:
            pass
        try:
            staged, fd = open_temp(self.root, _RESERVE)
        except NoSpace:
            return  # not even an inode: the next delete, or the next start, tries again
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                for offset in range(0, size, _RESERVE_MIN):  # no fallocate: write zeros
                    pwrite_all(fd, memoryview(bytes(min(_RESERVE_MIN, size - offset))),
                               offset)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(staged, reserve)
        except OSError:
            # No room for it now: the next delete, or the next start, makes it again.
            pass
        finally:
            if fd >= 0:
                os.close(fd)
            staged.unlink(missing_ok=True)

    def _require(self, state: _State, volume_id: str) -> _Vol:
        volume = state.volumes.get(volume_id)
        if volume is None:
            raise VolumeNotFound(volume_id)
        return volume

    def _volume(self, volume_id: str, volume: _Vol) -> Volume:
        return Volume(volume_id, volume.size_gb, volume.owner, self.host,
                      str(self.files_dir / volume.file), "path")

    def _new_name(self, stem: str, fmt: Format) -> str:
        return f"{stem}.{secrets.token_hex(6)}.{fmt}"

    def _temp_path(self, suffix: str) -> Path:
        """A temp file's path for qemu-img to create."""
        return self.files_dir / temp_name(suffix)

    def _qemu(self, args: list[str], what: str) -> None:
        try:
            proc = subprocess.run([self.qemu_img, *args], capture_output=True, text=True,
                                  check=False)
        except OSError as exc:
            raise StorageError(f"{what}: cannot run {self.qemu_img} ({exc.strerror}); "
                               f"{_INSTALL_HINT}") from exc
        if proc.returncode == 0:
            return
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines()
                 if line.strip()]
        message = lines[-1] if lines else f"exit status {proc.returncode}"
        if "No space left" in message or "Disk quota exceeded" in message:
            raise filesystem_full(what, message)
        raise StorageError(f"{what}: qemu-img {args[0]} failed: {message}")

    @contextlib.contextmanager
    def _changing(self) -> Iterator[_State]:
        """Hold the lock and yield the index, once what crashed processes left is gone."""
        with self._lock.held():
            state = self._load()
            self._reap(state)
            yield state

    def _reap(self, state: _State) -> None:
        """Remove what crashed processes left: temp files, and files the index forgot.

        Every data file is made and indexed under the lock, so with the lock held a file in
        ``files/`` that the index does not name is a leftover, never one being made. Done
        by every change, so a crash (mid-save of the index, say) leaves nothing once the
        next change is made: a listing of ``files/`` costs less than the index's own load.
        """
        sweep(self.root)  # the index's temp files
        for name in sweep(self.files_dir):
            if name not in state.files and self._unnamed(state, name):
                (self.files_dir / name).unlink(missing_ok=True)

    def _unnamed(self, state: _State, name: str) -> bool:
        """Whether ``name``, in ``files/`` and not in the index, is of this storage's own
        naming (a data file, or a template) and unknown to the index: a leftover."""
        if name.startswith(TEMP_PREFIX):
            return False  # a live process's: the sweep judges temp files
        if name.startswith(".tpl-") and name.endswith(".qcow2"):
            base = name.removeprefix(".tpl-").removesuffix(".qcow2").rpartition("-")[0]
            return base not in state.files
        return _DATA_NAME.fullmatch(name) is not None and name not in state.files

    def _forget(self, state: _State, lost: set[str]) -> list[str]:
        """Drop the records of the files ``lost`` (gone from ``files/``), of the overlays
        reading them and of the volumes on either; return the files that no record needs
        any more (to be removed); lock held."""
        while True:
            readers = {name for name, f in state.files.items()
                       if name not in lost and f.backing in lost}
            if not readers:
                break
            lost |= readers
        for name in lost:
            state.files.pop(name, None)
        for volume_id in [v for v, volume in state.volumes.items() if volume.file in lost]:
            del state.volumes[volume_id]
        return sorted(lost | set(state.collect()))

    def _rebuild(self) -> None:
        """Replace an unreadable index by one rebuilt from ``files/``; the damaged one is
        kept as ``index.json.damaged-<token>`` for the operator; lock held."""
        index = self.root / "index.json"
        try:
            text = index.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            text = ""
        state = _State()
        stems: dict[str, list[str]] = {}
        for name in sorted(os.listdir(self.files_dir)):
            match = _DATA_NAME.fullmatch(name)
            if match is None:
                continue
            fmt: Format = "raw" if match.group(2) == "raw" else "qcow2"
            size, backing = self._probe(name, fmt)
            state.files[name] = _File(fmt, max(1, -(-size // GIB)), backing)
            stems.setdefault(match.group(1), []).append(name)
        for name, f in list(state.files.items()):
            if f.backing is not None and f.backing not in state.files:
                # Its backing file is gone: unreadable, and no longer ours to keep.
                del state.files[name]
        for match in _VOLUME_RECORD.finditer(text):
            volume_id, name, owner, size_gb = (json.loads(f'"{match.group(1)}"'),
                                               json.loads(f'"{match.group(2)}"'),
                                               json.loads(f'"{match.group(3)}"'),
                                               int(match.group(4)))
            if name in state.files and volume_id not in state.volumes and size_gb >= 1:
                state.volumes[volume_id] = _Vol(name, size_gb, owner)
        # Volume records are saved sorted by id after the files: every id before the last
        # one whose record begins in the text was either whole, or was no volume (a hidden
        # file's stem).
        head = text.find('\n "volumes": {')
        keys = _VOLUME_KEY.findall(text, head) if head >= 0 else []
        known_until = json.loads(f'"{keys[-1]}"') if keys else None
        used = {volume.file for volume in state.volumes.values()}
        for stem, names in sorted(stems.items()):
            if stem in state.volumes or (known_until is not None and stem < known_until):
                continue
            # The file of the stem that no other of its files backs: the volume's own (an
            # overlay it was moved onto), the newest if there are several.
            free = [n for n in names if n in state.files and n not in used and
                    not any(state.files[o].backing == n for o in names if o in state.files)]
            if not free:
                continue
            name = max(free, key=lambda n: (self.files_dir / n).stat().st_mtime_ns)
            state.volumes[stem] = _Vol(name, state.files[name].size_gb, UNKNOWN_OWNER)
        with no_space_errors(f"setting {index} aside"):
            os.replace(index, self.root / f"index.json.damaged-{secrets.token_hex(6)}")
        self._unlink(state.collect())
        self._save(state, freeing=True)
        self._reap(state)  # the files it could not keep (their backing file is gone)

    def _probe(self, name: str, fmt: Format) -> tuple[int, str | None]:
        """(virtual size in bytes, backing file's name in ``files/`` or None) of a data
        file, as qemu-img reads it."""
        path = self.files_dir / name
        if fmt == "raw":
            return path.stat().st_size, None
        try:
            proc = subprocess.run([self.qemu_img, "info", "--output=json", "-f", "qcow2",
                                   "-U", str(path)], capture_output=True, text=True,
                                  check=True)
            info = json.loads(proc.stdout)
        except (OSError, ValueError, subprocess.CalledProcessError) as exc:
            raise StorageError(f"rebuilding the index: cannot read {path}: {exc}") from exc
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if backing is not None:
            backing_path = Path(backing)
            backing = backing_path.name if backing_path.parent == self.files_dir else "?"
        return int(info["virtual-size"]), backing


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1

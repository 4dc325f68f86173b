"""Real storage: every volume an image of a Ceph RBD pool, through librbd.

A volume is an RBD image named by its id. Its owner is a key of one omap object of the pool
(namespace), ``ivcache.volumes``: ``owner.<id>``, so ownership is seen by every process and
set by one small rados operation, without opening the image. The first clone of an image
takes a snapshot, protects it and records it as the image's clone snapshot (``snap.<id>`` in
the same object); every later clone is an RBD clone (layering) of that snapshot. Writing an
image forgets its clone snapshot: the next clone takes a new one.

A hit's cost is one clone, so an instance remembers what it learnt of a source (snapshot,
size, depth) and clones it again without opening it, nor the clone: one rados operation then
checks that the snapshot is still the source's clone snapshot (``omap_cmp``) and, in the
same atomic step, records the clone's owner. If the check fails, the clone is removed and
made again the long way. (Volumes of older versions keep their owner in the image's
metadata, ``ivcache.owner``; it is still read.)

Deleting an image that still has clones never fails: the image is moved to the RBD trash
(its name is free again at once) and stays there, read by its clones, until its last clone
is deleted; then it is purged, and so is a trashed parent of its own that this leaves
without clones. A clone whose chain of parents would pass ``max_clone_depth`` (5, as
Cinder's ``rbd_max_clone_depth``) is flattened when it is made.

The Ceph bindings (Debian ``python3-rbd``, ``python3-rados``) are imported when an
``RbdStorage`` is made, so the package works without them.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import secrets
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import attrs

from ivcache.adapters.storage._common import (
    BLOCK,
    already_exists,
    check_at_least,
    check_clone,
    check_grow,
    check_range,
    check_room,
    check_sized,
    check_volume_id,
    does_not_fit,
    is_zero,
)
from ivcache.core.errors import (
    ConfigError,
    InvalidIdentifier,
    NoSpace,
    StorageError,
    VolumeNotFound,
)
from ivcache.core.model import GIB, Volume
from ivcache.core.ports import StorageBackend

__all__ = ["RbdStorage"]

#: The omap object holding every volume's owner and clone snapshot.
VOLUMES_OBJECT = "ivcache.volumes"
OWNER_PREFIX = "owner."
SNAP_PREFIX = "snap."
#: Image metadata of volumes made by earlier versions (read, never written).
OWNER_KEY = "ivcache.owner"
SNAP_KEY = "ivcache.snap"
WRITTEN_KEY = "ivcache.written"
# Owners are read for a listing this many keys at a time.
_OMAP_PAGE = 1000
_SNAP_PREFIX = "ivcache-"
# Writes are gathered into pieces of one RBD object (4 MiB, the default order 22) and kept
# in flight a few at a time: one synchronous write per piece leaves the OSD idle.
_PIECE = 4 * BLOCK
_IN_FLIGHT = 8
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
# A clone is tried again when its source changed while it was made (a write, a race to
# take the first snapshot): more than this many times in a row is not a race.
_ATTEMPTS = 3


def _bindings() -> tuple[Any, Any]:
    try:
        # The Ceph bindings ship no type information: they are Any here, and kept inside
        # this module.
        import rados  # type: ignore[import-not-found]  # Debian python3-rados, no stubs
        import rbd  # type: ignore[import-not-found]  # Debian python3-rbd, no stubs
    except ImportError as exc:
        raise ConfigError(
            "storage = rbd needs the Ceph Python bindings: apt-get install python3-rbd "
            f"python3-rados, and run `make install` to link them into the venv ({exc})"
        ) from exc
    return rados, rbd


class RbdStorage:
    """Volumes as images of the Ceph pool ``pool``; real, and shared between processes.

    ``conf`` and ``user`` say how to reach the cluster (``user`` empty: the default client
    id). ``namespace`` (an RBD namespace of the pool, made with ``rbd namespace create``)
    keeps the volumes apart from other users of the pool. ``capacity_gb`` (0 = unlimited)
    caps the sum of the volumes' sizes, counted by this process: a guard for an operator;
    the pool's own quota is Ceph's business. Call ``close`` (or use ``with``) to drop the
    connection.
    """

    def __init__(self, pool: str = "rbd", *, conf: str = "/etc/ceph/ceph.conf", user: str = "",
                 host: str = "", max_clone_depth: int = 5, connect_timeout: float = 10,
                 capacity_gb: int = 0, namespace: str = "") -> None:
        check_at_least("max_clone_depth", max_clone_depth, 0)
        check_at_least("capacity_gb", capacity_gb, 0, "0 = unlimited")
        self._rados, self._rbd = _bindings()
        self.pool = pool
        self.namespace = namespace
        self.conf = conf
        self.user = user
        self.host = host
        self.max_clone_depth = max_clone_depth
        self.capacity_gb = capacity_gb
        self._lock = threading.Lock()
        # What clones of a source learnt of it (its snapshot, size, depth): the next clone
        # of it needs not open it. Checked by every clone, so never trusted blindly.
        self._sources: dict[str, _Source] = {}
        rados = self._rados
        try:
            cluster = rados.Rados(conffile=conf, rados_id=user or None,
                                  conf={"client_mount_timeout": str(connect_timeout),
                                        "rados_mon_op_timeout": str(max(30, connect_timeout))})
        except rados.Error as exc:
            raise ConfigError(f"rbd_conf = {conf}: cannot read the Ceph configuration "
                              f"({exc})") from exc
        try:
            cluster.connect(timeout=max(1, round(connect_timeout)))
            self._ioctx = cluster.open_ioctx(pool)
            if namespace:
                self._ioctx.set_namespace(namespace)
        except rados.ObjectNotFound as exc:
            cluster.shutdown()
            raise ConfigError(f"rbd_pool = {pool}: no such pool in the Ceph cluster of "
                              f"{conf}") from exc
        except rados.Error as exc:
            cluster.shutdown()
            raise StorageError(f"cannot connect to the Ceph cluster of {conf} as "
                               f"{user or 'the default user'}: {exc}") from exc
        self._cluster = cluster
        self.fsid: str = cluster.get_fsid()

    def close(self) -> None:
        """Drop the connection to the cluster; the instance is unusable afterwards."""
        with contextlib.suppress(Exception):
            self._ioctx.close()
        with contextlib.suppress(Exception):
            self._cluster.shutdown()

    def __enter__(self) -> RbdStorage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def create_volume(self, volume_id: str, size_gb: int, owner: str) -> Volume:
        check_sized(volume_id, size_gb)
        rbd = self._rbd
        with self._reserving(size_gb), self._errors(volume_id, exists=volume_id):
            rbd.RBD().create(self._ioctx, volume_id, size_gb * GIB, old_format=False,
                             features=rbd.RBD_FEATURE_LAYERING)
        try:
            with self._errors(volume_id):
                # The owner is the commit point: an image without it is not a volume.
                self._omap_write(set_keys={OWNER_PREFIX + volume_id: owner},
                                 drop=(SNAP_PREFIX + volume_id,))
        except BaseException:
            with contextlib.suppress(Exception):
                rbd.RBD().remove(self._ioctx, volume_id)
            raise
        return self._volume(volume_id, size_gb, owner)

    def write_image(self, volume_id: str, chunks: Iterable[bytes]) -> int:
        """Stream ``chunks`` into the image from offset 0; zeros are not stored in a new one."""
        check_volume_id(volume_id)
        self._sources.pop(volume_id, None)
        with self._errors(volume_id), self._open(volume_id) as image:
            self._owner(image, volume_id)
            meta = dict(image.metadata_list())
            fresh = WRITTEN_KEY not in meta and not self._has_parent(image)
            if WRITTEN_KEY not in meta:
                image.metadata_set(WRITTEN_KEY, "1")
            snap = self._omap_get(SNAP_PREFIX + volume_id)
            if snap is not None:
                # Clones made from now on must see the new bytes: they get a new snapshot
                # (and a clone checking for this one, made meanwhile, is made again).
                self._omap_write(drop=(SNAP_PREFIX + volume_id,))
                self._drop_snap_if_unused(image, snap)
            if SNAP_KEY in meta:
                image.metadata_remove(SNAP_KEY)  # an earlier version's record
                self._drop_snap_if_unused(image, meta[SNAP_KEY])
            writer = _Writer(image, volume_id, image.size(), fresh=fresh)
            try:
                for chunk in chunks:
                    writer.feed(chunk)
            except BaseException:
                # The image must not be closed under writes in flight; the caller's error
                # (a broken download, say) is the one to report.
                with contextlib.suppress(Exception):
                    writer.drain()
                raise
            writer.finish()
            return writer.written

    def qemu_target(self, volume_id: str) -> str:
        """The volume as qemu-img's rbd driver names it, for a converter that writes it
        directly (``rbd:POOL/[NAMESPACE/]ID:conf=...:id=...``); it must not have clones."""
        check_volume_id(volume_id)
        self._sources.pop(volume_id, None)
        with self._errors(volume_id), self._open(volume_id) as image:
            self._owner(image, volume_id)
            meta = dict(image.metadata_list())
            if meta.get(SNAP_KEY):
                raise StorageError(f"volume {volume_id} has clones: it cannot be rewritten")
            image.metadata_set(WRITTEN_KEY, "1")
        spec = "/".join(part for part in (self.pool, self.namespace, volume_id) if part)
        options = [f"conf={_qemu_escape(self.conf)}"]
        if self.user:
            options.append(f"id={_qemu_escape(self.user)}")
        return ":".join([f"rbd:{spec}", *options])

    def clone_volume(self, src_id: str, dst_id: str, size_gb: int, owner: str) -> Volume:
        check_clone(src_id, dst_id, size_gb)
        known = self._sources.get(src_id)
        if known is not None:
            volume = self._clone_known(src_id, dst_id, size_gb, owner, known)
            if volume is not None:
                return volume
        for _ in range(_ATTEMPTS):
            source = self._look(src_id, size_gb)
            volume = self._clone(src_id, dst_id, size_gb, owner, source)
            if volume is not None:
                self._sources[src_id] = source
                return volume
        raise StorageError(f"volume {src_id} changed during each of {_ATTEMPTS} attempts to "
                           f"clone it; try again")

    def _look(self, src_id: str, size_gb: int) -> _Source:
        """What a clone needs of its source, taking its clone snapshot if it has none."""
        # A hit's cost is in clone_volume: every round trip to the cluster counts. The source
        # is opened read-only (cheaper) unless its clone snapshot must be taken first.
        with self._errors(src_id), self._open(src_id, read_only=True) as src:
            self._owner(src, src_id)
            src_gb = src.size() // GIB
            check_grow(src_id, src_gb, size_gb, clone=True)
            depth = self._depth(src)
            found = self._current_snap(src, src_id)
        if found is None:
            with self._errors(src_id), self._open(src_id) as src:
                found = self._current_snap(src, src_id) or self._take_snap(src, src_id)
        snap, snap_bytes = found
        return _Source(snap, src_gb, depth, snap_bytes)

    def _clone_known(self, src_id: str, dst_id: str, size_gb: int, owner: str,
                     known: _Source) -> Volume | None:
        """Clone from what an earlier clone learnt of the source, without opening it; None
        if that is out of date (the source was written, deleted, replaced)."""
        check_grow(src_id, known.size_gb, size_gb, clone=True)
        try:
            volume = self._clone(src_id, dst_id, size_gb, owner, known)
        except VolumeNotFound as exc:
            if exc.volume_id != src_id:
                raise
            volume = None  # the source or its snapshot is gone: look again
        if volume is None:
            self._sources.pop(src_id, None)
        return volume

    def _clone(self, src_id: str, dst_id: str, size_gb: int, owner: str,
               source: _Source) -> Volume | None:
        rbd = self._rbd
        with self._reserving(size_gb), self._errors(src_id, exists=dst_id):
            rbd.RBD().clone(self._ioctx, src_id, source.snap, self._ioctx, dst_id,
                            features=rbd.RBD_FEATURE_LAYERING)
        try:
            # One rados operation settles the clone: the snapshot it was made from is still
            # the source's clone snapshot (a write of the source, or the source deleted and
            # made again, would have dropped it), and then, atomically, its owner is set:
            # the commit point. librbd copied the source's metadata into the clone: its
            # ivcache.written is right for the clone's data.
            with self._errors(dst_id):
                settled = self._omap_write(set_keys={OWNER_PREFIX + dst_id: owner},
                                           drop=(SNAP_PREFIX + dst_id,),
                                           expect=(SNAP_PREFIX + src_id, source.snap))
            if not settled:
                with self._errors(dst_id):
                    self._discard(dst_id)
                return None
            deep = source.depth + 1 > self.max_clone_depth
            if size_gb * GIB != source.snap_bytes or deep:
                with self._errors(dst_id), self._open(dst_id) as clone:
                    if size_gb * GIB != clone.size():
                        clone.resize(size_gb * GIB)
                    if deep:
                        clone.flatten()
                        clone.metadata_set(WRITTEN_KEY, "1")
        except BaseException:
            with contextlib.suppress(Exception):
                self._discard(dst_id)
            raise
        return self._volume(dst_id, size_gb, owner)

    def extend_volume(self, volume_id: str, size_gb: int) -> Volume:
        check_sized(volume_id, size_gb)
        self._sources.pop(volume_id, None)
        with self._errors(volume_id), self._open(volume_id) as image:
            owner = self._owner(image, volume_id)
            current = image.size() // GIB
            check_grow(volume_id, current, size_gb)
            if size_gb != current:
                with self._reserving(size_gb - current):
                    image.resize(size_gb * GIB)
            return self._volume(volume_id, size_gb, owner)

    def delete_volume(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        self._sources.pop(volume_id, None)
        with self._errors(volume_id):
            self._remove(volume_id)

    def get_volume(self, volume_id: str) -> Volume:
        check_volume_id(volume_id)
        with self._errors(volume_id), self._open(volume_id, read_only=True) as image:
            owner = self._owner(image, volume_id)
            return self._volume(volume_id, image.size() // GIB, owner)

    def list_volumes(self, owner: str | None = None) -> list[Volume]:
        volumes = []
        with self._errors("(listing)"):
            names = self._rbd.RBD().list(self._ioctx)
            owners = self._owners()
        for name in sorted(names):
            known = owners.get(name)
            if owner is not None and known is not None and known != owner:
                continue  # not opened: its owner is known already
            try:
                volume = self.get_volume(name)
            except (VolumeNotFound, InvalidIdentifier):
                continue  # not a volume of ours, or deleted while we looked
            if owner is None or volume.owner == owner:
                volumes.append(volume)
        return volumes

    def leftovers(self, *, remove: bool) -> list[tuple[str, str, int]]:
        """Nothing: what a crash can leave here is either not provably ours or harmless.

        An image made but never given its owner record (a crash inside create_volume or a
        clone) cannot be told from another client's image in a pool that Cinder or
        others share, so it is never taken. The other crash windows leave only records:
        an owner or clone-snapshot key of an image that is gone, which nothing lists and
        the next volume of that id overwrites, and an ``ivcache-`` snapshot that no key
        names, which the image's delete removes. Ceph writes its own metadata
        atomically: there is no index here to damage.
        """
        return []

    def can_fill_from(self, source: StorageBackend) -> bool:
        """Another ``RbdStorage`` on the same Ceph cluster (another pool or namespace): the
        copy runs inside the cluster (``rbd cp``), sparse, and no byte comes from the image
        source."""
        return isinstance(source, RbdStorage) and source is not self \
            and source.fsid == self.fsid

    def fill_from(self, source: StorageBackend, src_id: str, dst_id: str, size_gb: int,
                  owner: str) -> Volume:
        """A copy (``Image.copy``: the data objects the source has, nothing else), so the
        new volume never depends on the source's pool."""
        check_clone(src_id, dst_id, size_gb)
        if not isinstance(source, RbdStorage) or not self.can_fill_from(source):
            raise StorageError(f"pool {self.pool} cannot fill a volume from {source!r}: only "
                               "from RBD storage on the same Ceph cluster")
        rbd = self._rbd
        with source._errors(src_id), source._open(src_id, read_only=True) as src:
            source._owner(src, src_id)
            check_grow(src_id, src.size() // GIB, size_gb, clone=True)
            with self._reserving(size_gb), self._errors(src_id, exists=dst_id):
                src.copy(self._ioctx, dst_id, features=rbd.RBD_FEATURE_LAYERING)
        try:
            with self._errors(dst_id), self._open(dst_id) as dst:
                # The source's metadata came along; its snap record names a snapshot the
                # copy does not have.
                with contextlib.suppress(KeyError):
                    dst.metadata_remove(SNAP_KEY)
                dst.metadata_set(WRITTEN_KEY, "1")
                if size_gb * GIB != dst.size():
                    dst.resize(size_gb * GIB)
            with self._errors(dst_id):
                self._omap_write(set_keys={OWNER_PREFIX + dst_id: owner},
                                 drop=(SNAP_PREFIX + dst_id,))
        except BaseException:
            with contextlib.suppress(Exception):
                self._discard(dst_id)
            raise
        return self._volume(dst_id, size_gb, owner)

    def read(self, volume_id: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of a volume, cut at its end (for tests)."""
        check_volume_id(volume_id)
        check_range(offset, length)
        with self._errors(volume_id), self._open(volume_id, read_only=True) as image:
            self._owner(image, volume_id)
            length = max(0, min(length, image.size() - offset))
            data: bytes = image.read(offset, length) if length else b""
            return data

    def depth(self, volume_id: str) -> int:
        """How many parents a read of this volume may go through: 0 for a flat image."""
        check_volume_id(volume_id)
        with self._errors(volume_id), self._open(volume_id, read_only=True) as image:
            self._owner(image, volume_id)
            return self._depth(image)

    def parent(self, volume_id: str) -> tuple[str, str] | None:
        """(image id, snapshot name) of the snapshot a clone reads through, or None."""
        check_volume_id(volume_id)
        with self._errors(volume_id), self._open(volume_id, read_only=True) as image:
            self._owner(image, volume_id)
            if not self._has_parent(image):
                return None
            return str(image.parent_id()), str(image.parent_info()[2])

    def _open(self, volume_id: str, *, read_only: bool = False) -> Any:
        return self._rbd.Image(self._ioctx, volume_id, read_only=read_only)

    def _owner(self, image: Any, volume_id: str) -> str:
        """The owner of ``image`` (open, named ``volume_id``): VolumeNotFound if it is an
        image but not a volume of ours."""
        owner = self._omap_get(OWNER_PREFIX + volume_id)
        if owner is not None:
            return owner
        try:
            legacy: str = image.metadata_get(OWNER_KEY)
        except KeyError:
            raise VolumeNotFound(volume_id) from None
        return legacy

    # -- the omap object ---------------------------------------------------------------

    def _omap_get(self, key: str) -> str | None:
        rados = self._rados
        try:
            with rados.ReadOpCtx() as op:
                found, _ = self._ioctx.get_omap_vals_by_keys(op, (key,))
                self._ioctx.operate_read_op(op, VOLUMES_OBJECT)
                values = dict(found)
        except rados.ObjectNotFound:
            return None
        value = values.get(key)
        return value.decode() if value is not None else None

    def _owners(self) -> dict[str, str]:
        """Every volume's owner recorded in the omap object, by volume id."""
        rados = self._rados
        owners: dict[str, str] = {}
        after = ""
        while True:
            try:
                with rados.ReadOpCtx() as op:
                    found, _ = self._ioctx.get_omap_vals(op, after, OWNER_PREFIX, _OMAP_PAGE)
                    self._ioctx.operate_read_op(op, VOLUMES_OBJECT)
                    page = [(str(k), bytes(v)) for k, v in found]
            except rados.ObjectNotFound:
                return owners
            for key, value in page:
                owners[key.removeprefix(OWNER_PREFIX)] = value.decode()
            if len(page) < _OMAP_PAGE:
                return owners
            after = page[-1][0]

    def _omap_write(self, *, set_keys: dict[str, str] | None = None,
                    drop: tuple[str, ...] = (),
                    expect: tuple[str, str] | None = None) -> bool:
        """One atomic operation on the omap object: if ``expect`` (key, value) holds, set
        ``set_keys`` and remove ``drop``; False if it did not hold (nothing changed)."""
        rados = self._rados
        with rados.WriteOpCtx() as op:
            if expect is not None:
                op.omap_cmp(*expect)
            if set_keys:
                self._ioctx.set_omap(op, tuple(set_keys),
                                     tuple(v.encode() for v in set_keys.values()))
            if drop:
                self._ioctx.remove_omap_keys(op, drop)
            try:
                self._ioctx.operate_write_op(op, VOLUMES_OBJECT)
            except rados.Error as exc:
                if expect is not None and getattr(exc, "errno", None) == errno.ECANCELED:
                    return False
                raise
        return True

    def _has_parent(self, image: Any) -> bool:
        try:
            image.parent_id()
        except self._rbd.ImageNotFound:
            return False
        return True

    def _depth(self, image: Any) -> int:
        try:
            parent_id = image.parent_id()
        except self._rbd.ImageNotFound:
            return 0
        return self._depth_from(parent_id)

    def _depth_from(self, image_id: str) -> int:
        """The depth of the image with id ``image_id`` plus one (it is itself a parent)."""
        rbd = self._rbd
        depth = 1
        while True:
            with rbd.Image(self._ioctx, image_id=image_id, read_only=True) as image:
                try:
                    image_id = image.parent_id()
                except rbd.ImageNotFound:
                    return depth
            depth += 1

    def _current_snap(self, src: Any, src_id: str) -> tuple[str, int] | None:
        """The protected snapshot clones of ``src`` are made from, if it has one, and its
        size in bytes."""
        name = self._omap_get(SNAP_PREFIX + src_id)
        legacy = name is None
        if name is None:
            try:
                name = str(src.metadata_get(SNAP_KEY))  # recorded by an earlier version
            except KeyError:
                return None
        sizes = {snap["name"]: int(snap["size"]) for snap in src.list_snaps()}
        if name not in sizes:
            return None
        if legacy:
            # Clones check the omap record: give them one.
            self._omap_write(set_keys={SNAP_PREFIX + src_id: name})
        return name, sizes[name]

    def _current_snap_name(self, image: Any) -> str | None:
        """The name recorded as the clone snapshot of the open ``image`` (not checked)."""
        name = self._omap_get(SNAP_PREFIX + str(image.get_name()))
        if name is not None:
            return name
        try:
            legacy: str = image.metadata_get(SNAP_KEY)
        except KeyError:
            return None
        return legacy

    def _take_snap(self, src: Any, src_id: str) -> tuple[str, int]:
        # Two workers cloning at once may each take a snapshot: the last one recorded is
        # used from then on, the other is dropped when its clones are gone.
        name = f"{_SNAP_PREFIX}{secrets.token_hex(6)}"
        size = int(src.size())
        src.create_snap(name)
        src.protect_snap(name)
        self._omap_write(set_keys={SNAP_PREFIX + src_id: name})
        return name, size

    def _drop_snap_if_unused(self, image: Any, name: str) -> None:
        """Remove snapshot ``name`` of ``image`` if no clone reads through it."""
        rbd = self._rbd
        try:
            image.set_snap(name)
            try:
                children = list(image.list_children2())
            finally:
                image.set_snap(None)
        except rbd.ImageNotFound:
            return  # already gone
        if children:
            return
        with contextlib.suppress(rbd.InvalidArgument):  # not protected
            image.unprotect_snap(name)
        with contextlib.suppress(rbd.ImageNotFound):
            image.remove_snap(name)

    def _remove(self, volume_id: str, *, check_owner: bool = True) -> None:
        """Delete a volume, or trash it while clones read it; then release its parent.

        The image goes before its omap record: a crash between the two leaves a record of
        no image, which nothing lists and the next volume of that id overwrites.
        ``check_owner`` False: an image not yet a volume (a clone being made).
        """
        rbd = self._rbd
        with self._open(volume_id) as image:
            if check_owner:
                self._owner(image, volume_id)
            parent = None
            if self._has_parent(image):
                parent = (str(image.parent_id()), str(image.parent_info()[2]))
            snaps = [snap["name"] for snap in image.list_snaps()]
            for name in snaps:
                self._drop_snap_if_unused(image, name)
            keep = bool(list(image.list_snaps()))
        if keep:
            # Clones still read this image: hide it in the trash until the last one goes.
            rbd.RBD().trash_move(self._ioctx, volume_id, 0)
        else:
            rbd.RBD().remove(self._ioctx, volume_id)
        self._omap_write(drop=(OWNER_PREFIX + volume_id, SNAP_PREFIX + volume_id))
        if parent is not None and not keep:
            self._release(*parent)

    def _discard(self, volume_id: str) -> None:
        """Remove an image this instance just made that is not (or not yet) a volume."""
        self._remove(volume_id, check_owner=False)

    def _release(self, parent_id: str, snap: str) -> None:
        """A clone of ``parent_id@snap`` is gone: drop what no clone reads any more."""
        rbd = self._rbd
        while True:
            try:
                trashed = rbd.RBD().trash_get(self._ioctx, parent_id) is not None
            except rbd.ImageNotFound:
                trashed = False
            try:
                with rbd.Image(self._ioctx, image_id=parent_id) as image:
                    current = None if trashed else self._current_snap_name(image)
                    if trashed or snap != current:
                        self._drop_snap_if_unused(image, snap)
                    if not trashed or list(image.list_snaps()):
                        return
                    grand = None
                    if self._has_parent(image):
                        grand = (str(image.parent_id()), str(image.parent_info()[2]))
            except rbd.ImageNotFound:
                return  # another worker purged it first
            with contextlib.suppress(rbd.ImageNotFound):
                rbd.RBD().trash_remove(self._ioctx, parent_id, force=True)
            if grand is None:
                return
            parent_id, snap = grand

    @contextlib.contextmanager
    def _reserving(self, size_gb: int) -> Iterator[None]:
        """With ``capacity_gb``: hold the lock, and raise NoSpace unless ``size_gb`` more
        fits, for the ``with`` block that makes the room taken. Without: nothing."""
        if not self.capacity_gb:
            yield
            return
        with self._lock:
            self._reserve(size_gb)
            yield

    def _reserve(self, size_gb: int) -> None:
        used = sum(volume.size_gb for volume in self.list_volumes())
        check_room(f"pool {self.pool}", self.capacity_gb, used * GIB, size_gb)

    def _volume(self, volume_id: str, size_gb: int, owner: str) -> Volume:
        spec = "/".join(part for part in (self.pool, self.namespace, volume_id) if part)
        return Volume(volume_id, size_gb, owner, self.host, spec, "rbd_image")

    @contextlib.contextmanager
    def _errors(self, volume_id: str, *, exists: str | None = None) -> Iterator[None]:
        """Turn the bindings' errors into ivcache's."""
        rbd, rados = self._rbd, self._rados
        try:
            yield
        except rbd.ImageNotFound as exc:
            raise VolumeNotFound(volume_id) from exc
        except rbd.ImageExists as exc:
            raise already_exists(exists or volume_id) from exc
        except (rbd.Error, rados.Error) as exc:
            raise _translate(exc, f"volume {volume_id} in pool {self.pool}") from exc


def _qemu_escape(value: str) -> str:
    # qemu's rbd: filenames separate options with ':' and take '\\' as an escape.
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _translate(exc: BaseException, what: str) -> StorageError:
    code = getattr(exc, "errno", None)
    if code is not None and abs(code) in _NO_SPACE:
        return NoSpace(f"{what}: the Ceph pool is full or over its quota ({exc})")
    return StorageError(f"{what}: {exc}")


@attrs.frozen
class _Source:
    """What a clone needs of its source: the snapshot, the source's size (a clone is no
    smaller), its depth, and the snapshot's size in bytes (a clone's size when made)."""

    snap: str
    size_gb: int
    depth: int
    snap_bytes: int


class _Writer:
    """Gathers chunks into object-sized pieces and writes them with a few in flight.

    In a ``fresh`` image (never written, no parent) zero pieces are skipped: the image reads
    zeros there already. Elsewhere zeros are written as zeros (``write_zeroes``), or old
    bytes, or a parent's, would show through.
    """

    def __init__(self, image: Any, volume_id: str, size: int, *, fresh: bool) -> None:
        self._image = image
        self._volume_id = volume_id
        self._size = size
        self._fresh = fresh
        self._buf = bytearray()
        self._offset = 0  # where _buf starts in the image
        self._pending: collections.deque[tuple[Any, bytes]] = collections.deque()
        self.written = 0

    def feed(self, chunk: bytes) -> None:
        n = len(chunk)
        if self.written + n > self._size:
            raise does_not_fit(self._volume_id, self._size // GIB)
        self._buf += chunk
        self.written += n
        while len(self._buf) >= _PIECE:
            piece = bytes(self._buf[:_PIECE])
            del self._buf[:_PIECE]
            self._put(piece)

    def finish(self) -> None:
        if self._buf:
            piece = bytes(self._buf)
            self._buf.clear()
            self._put(piece)
        self.drain()

    def drain(self) -> None:
        """Wait for every write in flight; raise the first failure."""
        failure: BaseException | None = None
        while self._pending:
            try:
                self._wait_oldest()
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _put(self, piece: bytes) -> None:
        offset = self._offset
        self._offset += len(piece)
        if is_zero(piece):
            if not self._fresh:
                self._image.write_zeroes(offset, len(piece))
            return
        # The completion must not outlive the bytes it writes: they are kept beside it.
        completion = self._image.aio_write(piece, offset, None)
        self._pending.append((completion, piece))
        while len(self._pending) >= _IN_FLIGHT:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        completion, _ = self._pending.popleft()
        completion.wait_for_complete_and_cb()
        result = completion.get_return_value()
        if result < 0:
            raise _translate(OSError(-result, errno.errorcode.get(-result, "error")),
                             f"writing volume {self._volume_id}")

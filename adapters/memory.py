"""In-memory fakes of the ports, for unit tests. Small and honest, typed against the ports."""

from __future__ import annotations

import builtins
import copy
import datetime as dt
import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType

import attrs

from ivcache.core.errors import AlreadyClaimed, ImageNotFound, InvalidRequest, IvcacheError
from ivcache.core.events import Event
from ivcache.core.model import (
    GIB,
    BadImage,
    CacheEntry,
    EntryState,
    Image,
    Lease,
    NewImage,
    Owner,
    RequestContext,
    Scope,
    ScopeTotals,
    VolumeWrite,
    new_id,
)
from ivcache.core.ports import ImageData, StorageBackend

__all__ = [
    "FakeClock",
    "FakeConverter",
    "FakeProcesses",
    "InMemoryImageSource",
    "InMemoryOutbox",
    "InMemoryRepository",
    "InMemoryUnitOfWork",
    "RecordingNotifier",
]


class InMemoryRepository:
    """Entries in a dict; totals derived by the same add/remove/move calls the SQL one
    makes. Keys are scope keys (``CLUSTER_OR_HOST@BACKEND#POOL``), as in the SQL one."""

    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}
        self._totals: dict[str, ScopeTotals] = {}
        #: volumes being written for a user
        self._writes: dict[str, VolumeWrite] = {}
        #: clones' leases, by lease id
        self._leases: dict[str, Lease] = {}
        #: the negative cache, by (scope, image id)
        self._bad: dict[tuple[str, str], BadImage] = {}

    def lock_scope(self, scope: str) -> ScopeTotals:
        # Like the SQL one, locking a scope makes its totals row exist.
        self._totals.setdefault(scope, ScopeTotals(scope))
        return self._totals[scope]

    def lock_quota(self) -> None:
        # The fake's units of work already run one at a time.
        pass

    def totals(self, scope: str) -> ScopeTotals:
        return self._totals.get(scope, ScopeTotals(scope))

    def all_totals(self) -> list[ScopeTotals]:
        return sorted(self._totals.values(), key=lambda t: t.scope)

    def count_stats(self, scope: str, *, hits: int = 0, misses: int = 0, evictions: int = 0,
                    downloads: int = 0, bytes_downloaded: int = 0,
                    neighbour_fills: int = 0) -> None:
        t = self.totals(scope)
        self._totals[scope] = attrs.evolve(
            t, hits=t.hits + hits, misses=t.misses + misses, evictions=t.evictions + evictions,
            downloads=t.downloads + downloads,
            bytes_downloaded=t.bytes_downloaded + bytes_downloaded,
            neighbour_fills=t.neighbour_fills + neighbour_fills)

    def _move_totals(self, scope: str, count: int, size_gb: int) -> None:
        t = self.totals(scope)
        self._totals[scope] = attrs.evolve(t, count=t.count + count,
                                           size_gb=t.size_gb + size_gb)

    def _out(self, entry: CacheEntry) -> CacheEntry:
        """A copy, its ``lease_until`` read from its leases, as the SQL one reads it."""
        untils = [lease.until for lease in self._leases.values() if lease.entry_id == entry.id]
        return attrs.evolve(entry, lease_until=max(untils) if untils else None)

    def get(self, entry_id: str) -> CacheEntry | None:
        e = self._entries.get(entry_id)
        return self._out(e) if e else None

    def find(self, scope: str, image_id: str) -> CacheEntry | None:
        for e in self._entries.values():
            if e.scope_key == scope and e.image_id == image_id:
                return self._out(e)
        return None

    def find_by_volume(self, volume_id: str) -> CacheEntry | None:
        for e in self._entries.values():
            if e.volume_id == volume_id:
                return self._out(e)
        return None

    def strays(self, host: str, backend: str, scope: str) -> list[CacheEntry]:
        return [e for e in self.list(host, backend=backend)
                if e.cluster is None and e.scope_key != scope]

    def list(self, host: str | None = None, *, scope: str | None = None,
             backend: str | None = None) -> list[CacheEntry]:
        found = [self._out(e) for e in self._entries.values()
                 if (host is None or e.host == host) and (scope is None or e.scope_key == scope)
                 and (backend is None or e.backend == backend)]
        return sorted(found, key=lambda e: (e.host, e.last_used, e.id))

    def add(self, entry: CacheEntry) -> None:
        if self.find(entry.scope_key, entry.image_id) is not None:
            raise AlreadyClaimed(entry.scope_key, entry.image_id)
        self._entries[entry.id] = attrs.evolve(entry, lease_until=None)
        self._move_totals(entry.scope_key, 1, entry.size_gb)

    def save(self, entry: CacheEntry) -> None:
        old = self._entries.get(entry.id)
        if old is None:
            return
        # size_gb and the scope are fixed at add (move changes the scope): the totals never
        # move on a save; the counters are end_lease's.
        self._entries[entry.id] = attrs.evolve(entry, size_gb=old.size_gb, cluster=old.cluster,
                                               backend=old.backend, pool=old.pool,
                                               hits=old.hits, bytes_saved=old.bytes_saved,
                                               seconds_saved=old.seconds_saved,
                                               lease_until=None)

    def move(self, entry: CacheEntry, to: Scope) -> bool:
        old = self._entries.get(entry.id)
        if old is None:
            return False
        moved = attrs.evolve(old, cluster=to.cluster, backend=to.backend, pool=to.pool)
        if moved.scope_key != old.scope_key and self.find(moved.scope_key,
                                                          old.image_id) is not None:
            raise AlreadyClaimed(moved.scope_key, old.image_id)
        self._move_totals(old.scope_key, -1, -old.size_gb)
        self._move_totals(moved.scope_key, 1, old.size_gb)
        self._entries[entry.id] = moved
        return True

    def take_lease(self, lease: Lease) -> None:
        self._leases[lease.id] = lease

    def end_lease(self, lease: Lease, scope: str, *,
                  hit: bool = False, bytes_saved: int = 0, seconds_saved: float = 0.0) -> None:
        self._leases.pop(lease.id, None)
        entry = self._entries.get(lease.entry_id)
        if hit:
            t = self.totals(scope)
            self._totals[scope] = attrs.evolve(
                t, hits=t.hits + 1, bytes_saved=t.bytes_saved + bytes_saved,
                seconds_saved=t.seconds_saved + seconds_saved)
            if entry is not None:
                entry.hits += 1
                entry.bytes_saved += bytes_saved
                entry.seconds_saved += seconds_saved

    def leases(self, entry_id: str, now: dt.datetime) -> builtins.list[Lease]:
        return sorted((lease for lease in self._leases.values()
                       if lease.entry_id == entry_id and lease.holds(now)),
                      key=lambda lease: lease.id)

    def leased(self, scope: str, now: dt.datetime) -> builtins.list[Lease]:
        return sorted((lease for lease in self._leases.values() if lease.holds(now)
                       and (e := self._entries.get(lease.entry_id)) is not None
                       and e.scope_key == scope), key=lambda lease: lease.id)

    def drop_leases(self, lease_ids: Sequence[str]) -> None:
        for lease_id in lease_ids:
            self._leases.pop(lease_id, None)

    def beat(self, owner: str, until: dt.datetime, *, claims: Sequence[str] = (),
             leases: Sequence[str] = (), writes: Sequence[str] = ()) -> None:
        for entry_id in claims:
            entry = self._entries.get(entry_id)
            if (entry is not None and entry.state is EntryState.CREATING
                    and entry.claim_owner == owner):
                entry.claim_expires = until
        for lease_id in leases:
            lease = self._leases.get(lease_id)
            if lease is not None and lease.owner == owner:
                self._leases[lease_id] = attrs.evolve(lease, until=until)
        for volume_id in writes:
            write = self._writes.get(volume_id)
            if write is not None and write.owner == owner:
                self._writes[volume_id] = attrs.evolve(write, until=until)

    def remove(self, entry: CacheEntry) -> bool:
        gone = self._entries.pop(entry.id, None)
        if gone is None:
            return False
        for lease in [lease for lease in self._leases.values() if lease.entry_id == entry.id]:
            del self._leases[lease.id]
        self._move_totals(gone.scope_key, -1, -gone.size_gb)
        return True

    def mark_writing(self, write: VolumeWrite) -> None:
        self._writes[write.volume_id] = write

    def end_writing(self, volume_id: str) -> None:
        self._writes.pop(volume_id, None)

    def writes(self) -> builtins.list[VolumeWrite]:
        return sorted(self._writes.values(), key=lambda w: w.volume_id)

    def mark_bad(self, scope: str, image_id: str, bad: BadImage, now: dt.datetime) -> None:
        self._bad = {k: v for k, v in self._bad.items() if v.until > now}
        self._bad[scope, image_id] = bad

    def bad(self, scope: str, image_id: str, content: str,
            now: dt.datetime) -> BadImage | None:
        found = self._bad.get((scope, image_id))
        if found is None or found.content != content or found.until <= now:
            return None
        return found

    def forget_bad(self, scope: str, image_id: str) -> bool:
        return self._bad.pop((scope, image_id), None) is not None

    def lru_victims(self, scope: str, now: dt.datetime) -> Iterator[CacheEntry]:
        # A cluster's scope holds entries of several hosts: LRU order ignores the host.
        for e in sorted(self.list(scope=scope), key=lambda e: (e.last_used, e.id)):
            if e.state is EntryState.READY and not e.pinned and not e.leased(now):
                yield e

    def priority_victims(self, scope: str, now: dt.datetime) -> Iterator[CacheEntry]:
        for e in sorted(self.list(scope=scope), key=lambda e: (e.priority, e.last_used, e.id)):
            if e.state is EntryState.READY and not e.pinned and not e.leased(now):
                yield e

    def set_gdsf_age(self, scope: str, age: float) -> None:
        self._totals[scope] = attrs.evolve(self.lock_scope(scope), gdsf_age=age)


class InMemoryOutbox:
    """The events committed by an ``InMemoryUnitOfWork``'s transactions, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(self, event: Event) -> None:
        self.events.append(event)


_Snapshot = tuple[dict[str, CacheEntry], dict[str, ScopeTotals], dict[str, VolumeWrite],
                  dict[str, Lease], int, dict[tuple[str, str], BadImage]]


class InMemoryUnitOfWork:
    """Snapshot on enter, restore on exit what was not committed; a lock stands in for the
    database's.

    As strict as the SQL one: a thread that enters while already inside gets an error
    (SQLite would wait for its own lock), not a silently overwritten snapshot.
    """

    def __init__(self, repo: InMemoryRepository | None = None) -> None:
        self.entries = repo if repo is not None else InMemoryRepository()
        self.outbox = InMemoryOutbox()
        self.committed = False
        self._lock = threading.Lock()
        self._holder: int | None = None
        self._snapshot: _Snapshot | None = None

    def __enter__(self) -> InMemoryUnitOfWork:
        if self._holder == threading.get_ident():
            raise RuntimeError("this thread is already inside this unit of work")
        self._lock.acquire()
        self._holder = threading.get_ident()
        self._snapshot = self._copy()
        self.committed = False
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            # Back to the last commit: what came after it in the block is dropped, as in SQL.
            if self._snapshot is not None:
                self.entries._entries = {k: copy.copy(v) for k, v in self._snapshot[0].items()}
                self.entries._totals = dict(self._snapshot[1])
                self.entries._writes = dict(self._snapshot[2])
                self.entries._leases = dict(self._snapshot[3])
                del self.outbox.events[self._snapshot[4]:]
                self.entries._bad = dict(self._snapshot[5])
        finally:
            self._snapshot = None
            self._holder = None
            self._lock.release()

    def commit(self) -> None:
        self.committed = True
        if self._snapshot is not None:
            self._snapshot = self._copy()

    def _copy(self) -> _Snapshot:
        return ({k: copy.copy(v) for k, v in self.entries._entries.items()},
                dict(self.entries._totals), dict(self.entries._writes),
                dict(self.entries._leases), len(self.outbox.events), dict(self.entries._bad))


class InMemoryImageSource:
    """Images and their bytes in dicts, with Glance's visibility rules.

    With a ``clock``, each download takes ``seconds_per_gib`` of its time per GiB of the
    image's disk (``Image.min_size_gb``): a source whose download time is proportional to
    size, without waiting for it.
    """

    def __init__(self, chunk_size: int = 1 << 20, *, clock: FakeClock | None = None,
                 seconds_per_gib: float = 0.0) -> None:
        self.images: dict[str, Image] = {}
        self.data: dict[str, bytes] = {}
        self.chunk_size = chunk_size
        self.downloads = 0
        self.clock = clock
        self.seconds_per_gib = seconds_per_gib

    def add(self, image: Image, data: bytes, *, with_hash: bool = True) -> Image:
        if with_hash and image.os_hash_value is None and image.checksum is None:
            image = attrs.evolve(image, size=len(data), os_hash_algo="sha512",
                                 os_hash_value=hashlib.sha512(data).hexdigest())
        self.images[image.id] = image
        self.data[image.id] = data
        return image

    def _visible(self, ctx: RequestContext, image: Image) -> bool:
        return (ctx.is_admin or image.visibility in ("public", "community")
                or image.owner == ctx.project_id)

    def get_image(self, ctx: RequestContext, image_id: str) -> Image:
        image = self.images.get(image_id)
        if image is None or not self._visible(ctx, image):
            raise ImageNotFound(image_id)
        return image

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        image = self.get_image(ctx, image_id)
        self.downloads += 1
        if self.clock is not None:
            self.clock.advance(self.seconds_per_gib * image.min_size_gb)
        data = self.data[image_id]
        return (data[i:i + self.chunk_size] for i in range(0, len(data), self.chunk_size))

    def list_images(self, ctx: RequestContext) -> list[Image]:
        return [i for i in self.images.values() if self._visible(ctx, i)]

    def upload_image(self, ctx: RequestContext, spec: NewImage,
                     data: Callable[[Image], Iterable[bytes]]) -> Image:
        """Queued, then active with the sha512 and md5 of what was stored (the
        ``ImageUploader`` port); gone again if ``data`` raises."""
        queued = Image(new_id(), spec.name, owner=ctx.project_id,
                       visibility=spec.visibility or "public", status="queued",
                       disk_format=spec.disk_format, container_format=spec.container_format)
        self.images[queued.id] = queued
        try:
            stored = b"".join(data(queued))
        except BaseException:
            del self.images[queued.id]
            raise
        image = attrs.evolve(queued, size=len(stored), status="active",
                             os_hash_algo="sha512",
                             os_hash_value=hashlib.sha512(stored).hexdigest(),
                             checksum=hashlib.md5(stored, usedforsecurity=False).hexdigest())
        self.images[image.id] = image
        self.data[image.id] = stored
        return image


class RecordingNotifier:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


class FakeClock:
    """Time that moves only when told to (``sleep`` advances it)."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self.current = start or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        self._start = self.current

    def now(self) -> dt.datetime:
        return self.current

    def monotonic(self) -> float:
        return (self.current - self._start).total_seconds()

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.current += dt.timedelta(seconds=seconds)


class FakeConverter:
    """An image converter that writes the bytes as they are and says of each image what the
    test told it: the virtual size its "header" gives, or the error its head is refused
    with. ``opened`` lists the images it read; ``leftover`` is what ``leftovers`` reports."""

    def __init__(self) -> None:
        self.virtual_sizes: dict[str, int] = {}
        self.refusals: dict[str, IvcacheError] = {}
        self.opened: list[str] = []
        self.leftover: list[tuple[str, int]] = []

    def open(self, image: Image, data: Callable[[], ImageData]) -> _FakeDisk:
        opened = data()
        self.opened.append(image.id)
        head = next(opened, b"")
        if image.id in self.refusals:
            opened.close()
            raise self.refusals[image.id]
        return _FakeDisk(image.disk_format, self.virtual_sizes.get(image.id), head, opened)

    def export(self, storage: StorageBackend, volume_id: str,
               disk_format: str) -> Iterator[bytes]:
        """A volume's bytes as a raw image, read by ranges from a fake storage that has
        ``read`` (fake-lvm, fake-rbd); other formats are refused. Unlike a real export it
        stops after the last MiB that holds data, so that unit tests do not hash GiBs of
        zeros; what it gives is still the volume's bytes from offset 0."""
        if disk_format != "raw":
            raise InvalidRequest(f"the fake converter reads volumes out as raw only, not "
                                 f"{disk_format!r}")
        read = getattr(storage, "read")  # noqa: B009  # the fakes' own test helper
        size = storage.get_volume(volume_id).size_gb * GIB
        step = 1 << 20
        pieces = [bytes(read(volume_id, offset, min(step, size - offset)))
                  for offset in range(0, size, step)]
        while pieces and pieces[-1].count(0) == len(pieces[-1]):
            pieces.pop()
        return (piece for piece in pieces)

    def leftovers(self, *, remove: bool) -> list[tuple[str, int]]:
        found = list(self.leftover)
        if remove:
            self.leftover.clear()
        return found


class _FakeDisk:
    def __init__(self, disk_format: str, virtual_size: int | None, head: bytes,
                 rest: ImageData) -> None:
        self.disk_format = disk_format
        self.virtual_size = virtual_size
        self._head = head
        self._rest = rest
        self.closed = False

    def write_to(self, storage: StorageBackend, volume_id: str) -> int:
        def chunks() -> Iterator[bytes]:
            yield self._head
            yield from self._rest
        return storage.write_image(volume_id, chunks())

    def close(self) -> None:
        self.closed = True
        self._rest.close()


class FakeProcesses:
    """Owners as a test wants them: this process is ``me``; ``kill`` makes an owner
    provably gone (as a dead pid on this machine)."""

    def __init__(self, me: Owner | None = None) -> None:
        self._me = me or Owner("test-node", 1, 1)
        self.dead: set[Owner] = set()

    def me(self) -> Owner:
        return self._me

    def become(self, owner: Owner) -> None:
        """From now on this process is ``owner`` (a restarted process, say)."""
        self._me = owner

    def kill(self, owner: Owner | None = None) -> None:
        """``owner`` (this process by default) is dead from now on."""
        self.dead.add(owner or self._me)

    def gone(self, owner: Owner) -> bool:
        return owner in self.dead

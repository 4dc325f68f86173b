"""The ports: what the core needs from the world, as small Protocols."""

from __future__ import annotations

import builtins
import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Protocol, runtime_checkable

from ivcache.core.events import Event
from ivcache.core.model import (
    BadImage,
    CacheEntry,
    Image,
    Lease,
    NewImage,
    Owner,
    RequestContext,
    Scope,
    ScopeTotals,
    Volume,
    VolumeWrite,
)

__all__ = [
    "CacheRepository",
    "Clock",
    "DiskImage",
    "EventOutbox",
    "FaultPoints",
    "FileChunks",
    "ImageConverter",
    "ImageData",
    "ImageSource",
    "ImageUploader",
    "Notifier",
    "Processes",
    "Span",
    "StorageBackend",
    "Tracer",
    "UnitOfWork",
    "VolumeData",
    "VolumeExporter",
]


class StorageBackend(Protocol):
    """Volumes on one backend's storage. Ids are checked with ``check_id`` by every backend.

    Errors: ``VolumeNotFound``, ``NoSpace``, ``InvalidIdentifier``.
    """

    def create_volume(self, volume_id: str, size_gb: int, owner: str) -> Volume: ...

    def write_image(self, volume_id: str, chunks: Iterable[bytes]) -> int:
        """Write the chunks from offset 0; return the bytes written.

        If ``chunks`` raises, the exception propagates; the volume is left for the
        caller to delete.
        """
        ...

    def clone_volume(self, src_id: str, dst_id: str, size_gb: int, owner: str) -> Volume:
        """Make ``dst_id``, a copy of ``src_id`` of ``size_gb`` (>= the source's size)."""
        ...

    def extend_volume(self, volume_id: str, size_gb: int) -> Volume: ...

    def delete_volume(self, volume_id: str) -> None: ...

    def get_volume(self, volume_id: str) -> Volume: ...

    def list_volumes(self, owner: str | None = None) -> list[Volume]: ...

    def can_fill_from(self, source: StorageBackend) -> bool:
        """Whether ``fill_from`` can copy volumes of ``source`` (another backend) here
        without going through the image source: the same Ceph cluster, the same
        filesystem, a path qemu-img can read. Cheap: no volume is looked at."""
        ...

    def fill_from(self, source: StorageBackend, src_id: str, dst_id: str, size_gb: int,
                  owner: str) -> Volume:
        """Make ``dst_id`` here, of ``size_gb`` (>= the source's size), holding the bytes of
        ``source``'s volume ``src_id``, by the cheapest copy the two have (a reflink, a
        server-side copy). ``dst_id`` never depends on ``src_id`` afterwards: either may be
        deleted. ``VolumeNotFound`` (naming ``src_id``) if the source volume is gone;
        ``StorageError`` if ``can_fill_from(source)`` is false."""
        ...

    def leftovers(self, *, remove: bool) -> list[tuple[str, str, int]]:
        """What processes that died left in the storage: (kind, path or name, bytes) of
        each, where kind is ``partial-volume`` (data a dead process was making or
        deleting, never a volume: its bytes on disk) or ``index-damage`` (the storage's
        own bookkeeping disagrees with what is there: an unreadable index, a record of a
        file that is gone, a file of its own naming that no record knows).

        With ``remove``, each is repaired: partial data removed, the index rebuilt from
        what is provably there. Nothing that is not provably the storage's own is ever
        deleted; safe while other processes use the storage.
        """
        ...


class ImageSource(Protocol):
    """Where images come from. Every call carries the caller's identity.

    ``get_image`` raises ``ImageNotFound`` both for an image that does not exist and for
    one the caller may not see.
    """

    def get_image(self, ctx: RequestContext, image_id: str) -> Image: ...

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        """The image's bytes, in chunks. A source that reads them from a local file may
        return ``FileChunks``, so that a converter can let qemu-img read that file itself
        instead of a copy."""
        ...

    def list_images(self, ctx: RequestContext) -> list[Image]: ...


@runtime_checkable
class ImageUploader(Protocol):
    """An image source that takes new images (``volume upload``). A port of its own beside
    ``ImageSource``, so that a source which only serves images still fits that one."""

    def upload_image(self, ctx: RequestContext, spec: NewImage,
                     data: Callable[[Image], Iterable[bytes]]) -> Image:
        """Create an image as ``ctx`` (owned by its project), then store ``data(image)``'s
        bytes as its data; return the image as the source has it afterwards: its status,
        and the hash *it* computed of what it stored.

        ``data`` is called once the image exists (queued, its id known) and before any byte
        moves. If ``data`` or the upload raises, the image is deleted and the error
        propagates (``ImageUnavailable`` for the source's own failures, an ``ImageError``
        for data it refuses).
        """
        ...


@runtime_checkable
class FileChunks(Protocol):
    """Chunks read in order from one open local file, whose descriptor ``fileno`` gives
    (or, like a file object not backed by one, raises ``io.UnsupportedOperation``)."""

    def __iter__(self) -> Iterator[bytes]: ...

    def __next__(self) -> bytes: ...

    def fileno(self) -> int: ...


class ImageData(Protocol):
    """An image's bytes on their way from the source, checked against the image's hash and
    size: the next chunk after the last raises ``ChecksumMismatch`` or ``ImageUnavailable``
    instead of ``StopIteration`` when they are not the image's."""

    def __iter__(self) -> Iterator[bytes]: ...

    def __next__(self) -> bytes: ...

    def fileno(self) -> int | None:
        """The open local file the bytes are read from, or None (a download).

        Only once every chunk has been read (and so checked) may a converter read this file
        itself: it holds the same bytes, as files are replaced by rename, never rewritten.
        """
        ...

    def close(self) -> None:
        """Stop reading; the source's stream is released."""
        ...


class DiskImage(Protocol):
    """An image whose head has been read, its format detected and accepted; not yet written.

    ``close`` releases everything it holds (the stream, scratch files), also when
    ``write_to`` was never called or failed; it may be called more than once.
    """

    @property
    def disk_format(self) -> str:
        """The format the data has (``raw``, ``qcow2``, ``vmdk``...)."""
        ...

    @property
    def virtual_size(self) -> int | None:
        """The disk's size in bytes as its header says, or None where only the end of the
        data tells (raw data: its length)."""
        ...

    def write_to(self, storage: StorageBackend, volume_id: str) -> int:
        """Write the disk, as raw bytes from offset 0, into a new, empty volume; return the
        bytes read from the image source.

        Raises an ``ImageError`` for what only the whole data shows (a footer, a corrupt
        image) and for a failed conversion; ``InvalidSize`` if the disk is larger than the
        volume; ``NoSpace`` if the storage is full. The volume is the caller's to delete.
        """
        ...

    def close(self) -> None: ...


class ImageConverter(Protocol):
    """The image pipeline's last step (DESIGN §9): detect, check and convert an image's data
    into a raw volume. What it refuses, it refuses with an ``ImageError`` subclass."""

    def open(self, image: Image, data: Callable[[], ImageData]) -> DiskImage:
        """Start on ``image``: refuse it now if its metadata says so, else open its
        verified bytes (``data()``), read as much as tells their format and refuse them now
        if they are refused. Nothing is left behind by a refusal: the data opened is
        closed."""
        ...

    def leftovers(self, *, remove: bool) -> list[tuple[str, int]]:
        """Scratch files that a process which died mid-conversion left: (path, bytes) of
        each; with ``remove``, they are removed."""
        ...


class VolumeData(Protocol):
    """A volume's bytes on their way out, in the format asked for."""

    def __iter__(self) -> Iterator[bytes]: ...

    def __next__(self) -> bytes: ...

    def close(self) -> None:
        """Release what the export holds (its scratch files); may be called twice."""
        ...


@runtime_checkable
class VolumeExporter(Protocol):
    """Reads volumes out as image data (the image converter does, when it can)."""

    def export(self, storage: StorageBackend, volume_id: str, disk_format: str) -> VolumeData:
        """The bytes of ``storage``'s volume as a ``disk_format`` image (``raw``: the
        volume's bytes from offset 0 to its end; ``qcow2``: converted by qemu-img).
        ``InvalidRequest`` for a format it cannot write."""
        ...


class CacheRepository(Protocol):
    """Cache entries and per-scope totals, inside one unit of work.

    Entries and totals rows are keyed by the scope's key, ``CLUSTER_OR_HOST@BACKEND#POOL``
    (``Scope.key``). ``add``, ``remove`` and ``move`` keep the scopes' totals rows in step;
    ``lock_scope`` takes a row's lock for the rest of the transaction, so limit checks and
    claims are atomic across threads, processes and machines. A transaction that locks two
    rows (``move``) locks them in the order of their keys.
    """

    def lock_scope(self, scope: str) -> ScopeTotals: ...

    def lock_quota(self) -> None:
        """Take the one quota lock, for the rest of the transaction: the internal tenant's
        quota spans every scope, so claims on different hosts check it one at a time. It is
        always taken after the transaction's scope rows (the fixed order that keeps two
        transactions from waiting on each other)."""
        ...

    def totals(self, scope: str) -> ScopeTotals: ...

    def all_totals(self) -> list[ScopeTotals]: ...

    def count_stats(self, scope: str, *, hits: int = 0, misses: int = 0, evictions: int = 0,
                    downloads: int = 0, bytes_downloaded: int = 0,
                    neighbour_fills: int = 0) -> None: ...

    def get(self, entry_id: str) -> CacheEntry | None: ...

    def find(self, scope: str, image_id: str) -> CacheEntry | None: ...

    def find_by_volume(self, volume_id: str) -> CacheEntry | None: ...

    def strays(self, host: str, backend: str, scope: str) -> list[CacheEntry]:
        """Entries that ``host`` made for ``backend`` without a cluster, now in a scope
        other than ``scope``: what a host adopts into its current scope (it joined a
        cluster, or its pool was renamed). Costs nothing when there are none."""
        ...

    def list(self, host: str | None = None, *, scope: str | None = None,
             backend: str | None = None) -> list[CacheEntry]:
        """Entries made by ``host``, in ``scope``, of ``backend`` (None: any), by host,
        last_used and id."""
        ...

    def add(self, entry: CacheEntry) -> None:
        """Insert; raise ``AlreadyClaimed`` if (scope, image_id) is taken."""
        ...

    def save(self, entry: CacheEntry) -> None:
        """Write back state, last_used, pinned, leases, fill_seconds and image fields; a
        no-op if the entry is gone. The counters (``hits``, ``bytes_saved``,
        ``seconds_saved``) are ``end_lease``'s. ``size_gb`` and the scope are fixed when
        the entry is added (``move`` changes the scope) and never saved."""
        ...

    def move(self, entry: CacheEntry, to: Scope) -> bool:
        """Put the entry in the scope ``to`` (cluster, backend and pool; its host stays),
        moving its count and size between the two scopes' totals. The caller holds both
        totals rows' locks; (``to``, image) must be free. False if the entry is gone."""
        ...

    def take_lease(self, lease: Lease) -> None:
        """Record a lease on its entry (the caller holds the entry's scope lock and saves
        the entry in the same transaction)."""
        ...

    def end_lease(self, lease: Lease, scope: str, *,
                  hit: bool = False, bytes_saved: int = 0, seconds_saved: float = 0.0) -> None:
        """Drop the lease (other holders' leases stay); with ``hit``, also count one
        more hit, and the hit's ``bytes_saved`` and ``seconds_saved`` (the savings ledger),
        for the entry (if it still exists) and for ``scope``'s totals. Only this moves an
        entry's counters (``hits`` and the ledger): ``save`` leaves them alone, so hits that
        end while another transaction saves the entry are never lost.

        Atomic updates, no read and no scope lock: the end of every clone pays only these.
        The totals row is written first, the order in which every transaction takes its
        rows, so that PostgreSQL never sees two transactions wait on each other.
        """
        ...

    def leases(self, entry_id: str, now: dt.datetime) -> builtins.list[Lease]:
        """The entry's leases that still hold by their time (their owners may be dead)."""
        ...

    def leased(self, scope: str, now: dt.datetime) -> builtins.list[Lease]:
        """The leases of ``scope``'s entries that still hold by their time: as many as
        clones run, read from an index, never a scan of the scope's entries."""
        ...

    def drop_leases(self, lease_ids: Sequence[str]) -> None:
        """Forget leases whose owners died."""
        ...

    def beat(self, owner: str, until: dt.datetime, *, claims: Sequence[str] = (),
             leases: Sequence[str] = (), writes: Sequence[str] = ()) -> None:
        """The owner's heartbeat: move ``until`` on for its claims (entry ids, still
        CREATING and still its own), its leases (lease ids) and its writes (volume ids)."""
        ...

    def remove(self, entry: CacheEntry) -> bool:
        """Delete; return False if it was already gone."""
        ...

    def mark_writing(self, write: VolumeWrite) -> None:
        """Note that ``write.owner`` is writing a user's volume (an uncached create): the
        volume is not listed, and ``volume upload`` refuses it, until ``end_writing``."""
        ...

    def end_writing(self, volume_id: str) -> None: ...

    def writes(self) -> builtins.list[VolumeWrite]:
        """Every volume being written (the marks not ended: their owners may be dead)."""
        ...

    def mark_bad(self, scope: str, image_id: str, bad: BadImage, now: dt.datetime) -> None:
        """Remember that the image's data was found bad in ``scope`` (replacing any earlier
        finding for it there); findings expired by ``now`` are dropped on the way."""
        ...

    def bad(self, scope: str, image_id: str, content: str,
            now: dt.datetime) -> BadImage | None:
        """The finding on the image in ``scope``, if it is about this ``content`` and has
        not expired by ``now`` (one primary-key read)."""
        ...

    def forget_bad(self, scope: str, image_id: str) -> bool:
        """Drop the finding on the image in ``scope``; False if there was none."""
        ...

    def lru_victims(self, scope: str, now: dt.datetime) -> Iterator[CacheEntry]:
        """READY, unpinned, unleased entries of ``scope``, least recently used first.

        Lazily, from an index on (scope, last_used): the cost of taking k victims does not
        grow with the number of entries.
        """
        ...

    def priority_victims(self, scope: str, now: dt.datetime) -> Iterator[CacheEntry]:
        """The same entries as ``lru_victims``, lowest ``priority`` first (ties: least
        recently used first, then by id).

        Lazily, from an index on (scope, priority, last_used, id), as ``lru_victims``.
        """
        ...

    def set_gdsf_age(self, scope: str, age: float) -> None:
        """Set the scope's aging value (``ScopeTotals.gdsf_age``); the caller holds the
        scope's lock."""
        ...


class EventOutbox(Protocol):
    """The events of a unit of work's transaction, kept with the change they announce:
    committed with it, gone with it when it rolls back (DESIGN §11). Where they go then
    (a table the bus sender reads, or nowhere when no notifier needs them kept) is the
    adapter's; the service still publishes each event to its notifier after the commit."""

    def add(self, event: Event) -> None: ...


class UnitOfWork(Protocol):
    """A transaction per ``with`` block. Leaving the block rolls back whatever was not
    committed; entering it again on a thread already inside it is an error."""

    @property
    def entries(self) -> CacheRepository: ...

    @property
    def outbox(self) -> EventOutbox:
        """This transaction's events (``add`` them inside the ``with`` block)."""
        ...

    def __enter__(self) -> UnitOfWork: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def commit(self) -> None: ...


class Notifier(Protocol):
    def publish(self, event: Event) -> None: ...


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """Aware UTC time."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: every duration the service measures
        (fill, clone, request) is a difference of two readings, so that the ledger's
        ``fill_seconds - clone_seconds`` compares like with like."""
        ...

    def sleep(self, seconds: float) -> None: ...


class FaultPoints(Protocol):
    """Named points on the request, eviction and reconcile paths where a developer's crash
    test may stop the process (``IVCACHE_FAULT``, docs/development.md); off in production.

    ``reached`` returns at once unless the point was asked for; the adapter then kills the
    process (SIGKILL: nothing after it runs), a test's fake raises instead.
    """

    def reached(self, point: str) -> None: ...


class Processes(Protocol):
    """Who this process is, and whether another one is provably gone: claims, leases and
    writes name their ``Owner``, so that the dead never make the living wait."""

    def me(self) -> Owner: ...

    def gone(self, owner: Owner) -> bool:
        """True only when ``owner`` provably runs no more: it ran on this machine and its
        pid is dead or used by another process. An owner on another machine is never
        provably gone (its heartbeat tells then)."""
        ...


class Span(Protocol):
    def set_attribute(self, key: str, value: str | int | float | bool) -> None: ...


class Tracer(Protocol):
    """Spans around requests; the OTel adapter implements it, the core has a null one."""

    def span(self, name: str,
             attributes: dict[str, str | int | float | bool]) -> AbstractContextManager[Span]:
        ...

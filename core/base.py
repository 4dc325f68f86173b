"""What the cache's jobs share: the ports they speak through, and the moves every job makes.

``CacheService`` (core/service.py: the request path) and its operator commands
(core/operations.py) both change entries through the moves here, so that one rule holds
everywhere: an entry changes only under its scope's lock (the scope's totals row, always
taken first; two of them in the order of their keys), and an entry goes before its volume.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import attrs

from ivcache.core.errors import UnsupportedImage, VolumeNotFound
from ivcache.core.events import IMAGE_SOURCE, CacheEvict, EvictReason
from ivcache.core.model import (
    CacheEntry,
    EntryState,
    Image,
    InternalTenant,
    Lease,
    Owner,
    Scope,
    ScopeTotals,
    VolumeWrite,
)
from ivcache.core.policy import CachePolicy
from ivcache.core.ports import (
    CacheRepository,
    Clock,
    DiskImage,
    FaultPoints,
    ImageConverter,
    ImageData,
    ImageSource,
    Notifier,
    Processes,
    Span,
    StorageBackend,
    Tracer,
    UnitOfWork,
)

__all__ = ["Filled", "Heartbeat", "Neighbour", "NoFaults", "NullTracer", "RawPassThrough",
           "ServiceBase", "SystemClock", "UnknownProcesses"]

T = TypeVar("T")

#: Which entries an eviction may take, judged on the row as it is under its scope's lock.
MayGo = Callable[[CacheEntry, dt.datetime], bool]


def ready_and_free(entry: CacheEntry, now: dt.datetime) -> bool:
    """The usual rule: a READY entry that no clone is reading."""
    return entry.ready and not entry.leased(now)


def free(entry: CacheEntry, now: dt.datetime) -> bool:
    """Any entry, READY or CREATING, that no clone is reading."""
    return not entry.leased(now)


def anything(entry: CacheEntry, now: dt.datetime) -> bool:
    """Whatever its state or lease: for an entry whose volume is known to be gone."""
    return True


@attrs.frozen
class Filled:
    """A claim made READY: the entry, its clone lease if one was asked for, and where its
    bytes came from (``image-source`` or a neighbour's scope)."""

    entry: CacheEntry
    lease: Lease | None
    filled_from: str = IMAGE_SOURCE


@attrs.frozen
class Neighbour:
    """Another scope served beside this one (another backend of the same configuration),
    and how to reach its storage: ``storage()`` builds or returns it (it may raise an
    ``IvcacheError``: that neighbour is then not used). A miss may be filled from a
    neighbour's READY entry when this scope's storage can copy from the neighbour's."""

    scope: Scope
    storage: Callable[[], StorageBackend]

    @classmethod
    def of(cls, scope: Scope, storage: StorageBackend) -> Neighbour:
        """A neighbour whose storage is already built."""
        return cls(scope, lambda: storage)


def _evicted(entry: CacheEntry, reason: EvictReason) -> CacheEvict:
    return CacheEvict(entry.image_id, entry.host, reason, entry.id, entry.size_gb,
                      scope=entry.scope_key)


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _NullSpan:
    def set_attribute(self, key: str, value: str | int | float | bool) -> None:
        pass


class NullTracer:
    @contextlib.contextmanager
    def span(self, name: str,
             attributes: dict[str, str | int | float | bool]) -> Iterator[Span]:
        yield _NullSpan()


class RawPassThrough:
    """The image converter when none is wired: raw images pass as they are, others are
    refused.

    The core reads no disk formats, so this one trusts the declared format; entrypoints
    wire ``ivcache.adapters.convert.ImagePipeline``, which detects, checks and converts.
    """

    def open(self, image: Image, data: Callable[[], ImageData]) -> DiskImage:
        if image.disk_format != "raw" or image.container_format != "bare":
            raise UnsupportedImage(
                f"image {image.id} is {image.disk_format} ({image.container_format} "
                "container): without an image converter only bare raw images are taken; "
                "wire ivcache.adapters.convert.ImagePipeline")
        return _RawData(data())

    def leftovers(self, *, remove: bool) -> list[tuple[str, int]]:
        return []


class _RawData:
    disk_format = "raw"
    virtual_size = None

    def __init__(self, data: ImageData) -> None:
        self._data = data

    def write_to(self, storage: StorageBackend, volume_id: str) -> int:
        return storage.write_image(volume_id, self._data)

    def close(self) -> None:
        self._data.close()


class UnknownProcesses:
    """The processes port when none is wired: this process is known, no other is ever
    provably gone, so holds end by their heartbeat's time alone (as on another machine).
    Entrypoints wire ``ivcache.adapters.processes.LocalProcesses``, which asks the OS."""

    def me(self) -> Owner:
        return Owner(platform.node() or "localhost", os.getpid())

    def gone(self, owner: Owner) -> bool:
        return False


class Heartbeat:
    """Keeps this process's holds alive: its claims (entry ids), leases (lease ids) and
    writes (volume ids). While any is held, a daemon thread moves their ``until`` on every
    ``every`` seconds, to ``hold_seconds`` (three beats) ahead, so a live holder is never
    taken for dead however long its work runs, and a dead one lapses within three beats
    even where its death cannot be seen (another machine).

    A beat that fails (the database is away) is skipped; the holds lapse only if beats keep
    failing for three beats. The thread ends when the last hold is let go.
    """

    def __init__(self, beat: Callable[[str, dt.datetime, list[str], list[str], list[str]],
                                      None],
                 clock: Clock, owner: Callable[[], str], every: float) -> None:
        self._beat = beat
        self._clock = clock
        self._owner = owner
        self.every = every
        self._held: dict[str, dict[str, int]] = {"claims": {}, "leases": {}, "writes": {}}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def hold_seconds(self) -> float:
        return 3 * self.every

    def until(self) -> dt.datetime:
        """Where a hold taken now runs to, until the next beat moves it on."""
        return self._clock.now() + dt.timedelta(seconds=self.hold_seconds)

    @contextlib.contextmanager
    def holding(self, *, claim: str | None = None, lease: str | None = None,
                write: str | None = None) -> Iterator[None]:
        """Keep the named holds alive for the block."""
        named = [(kind, key) for kind, key in
                 (("claims", claim), ("leases", lease), ("writes", write)) if key]
        with self._cond:
            for kind, key in named:
                self._held[kind][key] = self._held[kind].get(key, 0) + 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ivcache-heartbeat",
                                                daemon=True)
                self._thread.start()
            else:
                self._cond.notify_all()  # a lingering thread: its beats start now
        try:
            yield
        finally:
            with self._cond:
                for kind, key in named:
                    left = self._held[kind][key] - 1
                    if left:
                        self._held[kind][key] = left
                    else:
                        del self._held[kind][key]
                self._cond.notify_all()

    def _holds(self) -> bool:
        return any(self._held.values())

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._holds():
                    # Linger a beat for the next hold: back-to-back clones (a burst of hits)
                    # then share one thread instead of starting one each.
                    self._cond.wait(self.every)
                    if not self._holds():
                        self._thread = None
                        return
                deadline = time.monotonic() + self.every
                while self._holds() and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                if not self._holds():
                    continue
                claims, leases, writes = (list(self._held[k])
                                          for k in ("claims", "leases", "writes"))
            # The work itself waits for no beat: a failed one is tried again next time.
            with contextlib.suppress(Exception):
                self._beat(self._owner(), self.until(), claims, leases, writes)


class NoFaults:
    """No fault point is ever hit: the default outside crash tests."""

    def reached(self, point: str) -> None:
        return None


class ServiceBase:
    """The ports and policy of one scope's cache, and the shared moves.

    ``scope`` (a ``Scope``: host, backend, pool, cluster) is what this service speaks for:
    one backend's storage, seen from one host. ``host`` alone is short for the host's scope
    on the default backend (a configuration without ``enabled_backends``). ``neighbours``
    are the other scopes a miss may be filled from.
    ``converter`` turns images into raw volumes (default: ``RawPassThrough``).
    ``faults`` names the crash tests' fault points (default: ``NoFaults``, none).
    ``processes`` tells this process's ``Owner`` and whether another owner is gone
    (default: ``UnknownProcesses``: holds then lapse by their heartbeat only).
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        scope: Scope | None = None,
        storage: StorageBackend,
        images: ImageSource,
        uow: UnitOfWork,
        notifier: Notifier,
        policy: CachePolicy | None = None,
        tenant: InternalTenant | None = None,
        clock: Clock | None = None,
        tracer: Tracer | None = None,
        converter: ImageConverter | None = None,
        neighbours: Sequence[Neighbour] = (),
        faults: FaultPoints | None = None,
        processes: Processes | None = None,
    ) -> None:
        if scope is None:
            if host is None:
                raise TypeError("give the service a scope (or a host)")
            scope = Scope(host)
        elif host is not None and host != scope.host:
            raise ValueError(f"host {host!r} is not the scope's host {scope.host!r}")
        self.scope = scope
        self.host = scope.host
        self.neighbours = tuple(n for n in neighbours if n.scope.key != scope.key)
        self.storage = storage
        self.images = images
        self.uow = uow
        self.notifier = notifier
        self.policy = policy or CachePolicy()
        self.tenant = tenant or InternalTenant()
        self.clock: Clock = clock or SystemClock()
        self.tracer: Tracer = tracer or NullTracer()
        self.converter: ImageConverter = converter or RawPassThrough()
        self.faults: FaultPoints = faults or NoFaults()
        self.processes: Processes = processes or UnknownProcesses()
        self.heartbeat = Heartbeat(self._beat, self.clock, self._owner,
                                   self.policy.claim_heartbeat_seconds)

    # -- owners ----------------------------------------------------------------------------

    def _owner(self) -> str:
        return str(self.processes.me())

    def _beat(self, owner: str, until: dt.datetime, claims: list[str], leases: list[str],
              writes: list[str]) -> None:
        with self.uow as uow:
            uow.entries.beat(owner, until, claims=claims, leases=leases, writes=writes)
            uow.commit()

    def _gone(self, owner: str | None) -> bool:
        """Whether the owner a row names is provably dead (rows of older versions name
        none: their time alone tells)."""
        parsed = Owner.parse(owner) if owner else None
        return parsed is not None and self.processes.gone(parsed)

    def _dead_claim(self, entry: CacheEntry, now: dt.datetime) -> bool:
        """A claim whose owner died mid-download: it is provably gone, or its heartbeat
        stopped (three beats without one)."""
        if entry.state is not EntryState.CREATING:
            return False
        return entry.claim_expired(now) or self._gone(entry.claim_owner)

    def _writes(self) -> dict[str, VolumeWrite]:
        """The volumes being written, by id (their writers may be dead: half-written)."""
        return {w.volume_id: w for w in self._read(lambda repo: repo.writes())}

    def _being_written(self, volume_id: str) -> bool:
        return volume_id in self._writes()

    def _dead_write(self, write: VolumeWrite, now: dt.datetime) -> bool:
        return write.until <= now or self._gone(write.owner)

    def _free_dead_leases(self, repo: CacheRepository, leases: Iterable[Lease]) -> set[str]:
        """Drop the leases whose owners are provably gone (inside the caller's locked
        transaction); the ids of the entries that lost one."""
        dead = [lease for lease in leases if self._gone(lease.owner)]
        if dead:
            repo.drop_leases([lease.id for lease in dead])
        return {lease.entry_id for lease in dead}

    def _without_dead_leases(self, repo: CacheRepository, entry: CacheEntry,
                             now: dt.datetime) -> CacheEntry:
        """The entry as it is once its dead owners' leases are dropped: a clone killed
        mid-way never keeps an eviction off it (one indexed read, and only for an entry
        that is leased)."""
        if not entry.leased(now):
            return entry
        leases = repo.leases(entry.id, now)
        if not self._free_dead_leases(repo, leases):
            return entry
        left = [lease.until for lease in repo.leases(entry.id, now)]
        entry.lease_until = max(left) if left else None
        return entry

    # -- transactions --------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, scope: str | None = None) -> Iterator[tuple[CacheRepository, ScopeTotals]]:
        """Lock a scope's totals row (this service's scope by default), run the block,
        commit.

        Claims, leases and evictions all take this lock, so limit checks and the choice of
        victims cannot race. Leaving the block by an exception rolls it back.
        """
        with self.uow as uow:
            totals = uow.entries.lock_scope(scope or self.scope.key)
            yield uow.entries, totals
            uow.commit()

    @contextlib.contextmanager
    def _locked_both(self, one: str, other: str) -> Iterator[CacheRepository]:
        """Lock two scopes' totals rows, in the order of their keys, run the block, commit:
        for moving entries from one scope to the other."""
        with self.uow as uow:
            for key in sorted({one, other}):
                uow.entries.lock_scope(key)
            yield uow.entries
            uow.commit()

    def _read(self, query: Callable[[CacheRepository], T]) -> T:
        with self.uow as uow:
            return query(uow.entries)

    def _find(self, scope: str, image_id: str) -> CacheEntry | None:
        """The image's entry in ``scope``, read without a lock."""
        return self._read(lambda repo: repo.find(scope, image_id))

    # -- eviction ------------------------------------------------------------------------

    def _evict(self, entries: Iterable[CacheEntry], reason: EvictReason, *,
               may_go: MayGo = ready_and_free) -> list[CacheEntry]:
        """Remove the entries that ``may_go`` (judged again under their scope's lock), then
        delete their volumes and announce them; return the entries removed.

        The entries are this backend's (their volumes are on this service's storage). The
        entry goes first, so no hit can clone a volume that is being deleted; each scope's
        entries are removed under that scope's lock and counted on that scope.
        """
        by_scope: dict[str, list[CacheEntry]] = {}
        for entry in entries:
            by_scope.setdefault(entry.scope_key, []).append(entry)
        gone: list[CacheEntry] = []
        for scope, group in by_scope.items():
            with self._locked(scope) as (repo, _):
                now = self.clock.now()
                current = [repo.get(e.id) for e in group]
                gone += self._remove(repo, scope, [
                    c for c in current
                    if c is not None and may_go(self._without_dead_leases(repo, c, now), now)],
                    reason)
        self._drop_volumes(gone, reason)
        return gone

    def _remove(self, repo: CacheRepository, scope: str, entries: list[CacheEntry],
                reason: EvictReason) -> list[CacheEntry]:
        """Remove entries of ``scope`` inside the caller's locked transaction, count them
        as evictions and keep their evict events in it (the outbox: committed with the
        removal or not at all); their volumes are the caller's to drop after the commit,
        with ``_drop_volumes``, which publishes the same events."""
        gone = [e for e in entries if repo.remove(e)]
        if gone:
            repo.count_stats(scope, evictions=len(gone))
            for entry in gone:
                self.uow.outbox.add(_evicted(entry, reason))
        return gone

    @property
    def _room_reason(self) -> EvictReason:
        """Why the victims that make room go: the eviction policy that chose them."""
        return EvictReason.GDSF if self.policy.eviction_policy == "gdsf" else EvictReason.LRU

    def _make_room(self, repo: CacheRepository, totals: ScopeTotals,
                   victims: list[CacheEntry]) -> list[CacheEntry]:
        """Remove ``victims`` that the policy chose to make room in ``totals``' scope (inside
        the caller's locked transaction), and move the scope's aging value past them (the
        ``gdsf`` policy's L)."""
        gone = self._remove(repo, totals.scope, victims, self._room_reason)
        age = self.policy.aged(totals.gdsf_age, gone)
        if age != totals.gdsf_age:
            repo.set_gdsf_age(totals.scope, age)
        return gone

    def _drop_volumes(self, entries: list[CacheEntry], reason: EvictReason) -> None:
        if entries:
            # Their entries are gone, their volumes not yet: reconcile's orphans.
            self.faults.reached("after-victim-removed")
        for entry in entries:
            self._delete_quietly(entry.volume_id)
            self.notifier.publish(_evicted(entry, reason))

    def _delete_quietly(self, volume_id: str) -> None:
        with contextlib.suppress(VolumeNotFound):
            self.storage.delete_volume(volume_id)

    def _take_over(self, entry: CacheEntry) -> bool:
        """Remove a claim whose owner died, if it still is one; say whether it was."""
        return bool(self._evict([entry], EvictReason.RECONCILE, may_go=self._dead_claim))

    def _evict_image(self, image_id: str, reason: EvictReason) -> None:
        """Evict this scope's entry of the image, a dead claim included."""
        entry = self._find(self.scope.key, image_id)
        if entry is not None:
            self._evict([entry], reason,
                        may_go=lambda e, now: ready_and_free(e, now) or self._dead_claim(e, now))

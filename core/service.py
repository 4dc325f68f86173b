"""The cache service: the one place that decides hit, miss, eviction and who may see what.

This module is the request path, top-down: authorize, validate, hit, miss (claim, make
room, fill from a neighbour or the image source), uncached. The operator commands (evict,
prune, warm, pin, reconcile, adopt, ...) are in ``core/operations.py``; the moves both share
(the scope lock, eviction) in ``core/base.py``. Every storage, image, database and
notification call goes through a port, so the same rules hold on fakes, SQLite or
PostgreSQL, files, qcow2 or RBD.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import math
from collections.abc import Iterator

import attrs

from ivcache.core.base import Filled, Neighbour, NullTracer, SystemClock, anything
from ivcache.core.errors import (
    AlreadyClaimed,
    ChecksumMismatch,
    CorruptImage,
    ImageFormatMismatch,
    ImageNotActive,
    ImageNotFound,
    ImageUnavailable,
    InvalidSize,
    IvcacheError,
    NoSpace,
    UnsafeImage,
    UnsupportedImage,
    VolumeNotFound,
)
from ivcache.core.events import (
    IMAGE_SOURCE,
    CacheEntryCreated,
    CacheHit,
    CacheMiss,
    EvictReason,
    ImageDownloaded,
)
from ivcache.core.model import (
    GIB,
    MAX_VOLUME_GB,
    BadImage,
    CacheEntry,
    CreateResult,
    EntryState,
    Image,
    Lease,
    Outcome,
    RequestContext,
    ScopeTotals,
    Volume,
    check_id,
    new_id,
)
from ivcache.core.operations import Finding, OperatorCommands
from ivcache.core.policy import eviction_candidates
from ivcache.core.ports import CacheRepository, DiskImage, FileChunks
from ivcache.core.upload import VolumeUploads

__all__ = ["CacheService", "Finding", "Neighbour", "NullTracer", "SystemClock"]


@attrs.frozen
class _Claim:
    entry: CacheEntry
    victims: list[CacheEntry]


class _Larger(Exception):
    """The image's header says its disk is larger than the claim reserved (the source did
    not know its virtual size, or said less): claim again for ``virtual_size``."""

    def __init__(self, virtual_size: int) -> None:
        super().__init__(virtual_size)
        self.virtual_size = virtual_size


@attrs.frozen
class _Served:
    volume: Volume
    outcome: Outcome
    entry_id: str | None = None
    filled_from: str | None = None
    clone_seconds: float | None = None


class CacheService(OperatorCommands, VolumeUploads):
    """Creates volumes from images on one backend, through the image-volume cache.

    ``scope`` (host, backend, pool, cluster) is what this service speaks for; entries,
    limits and stats are per scope. The operator commands come from ``OperatorCommands``,
    ``volume upload`` from ``VolumeUploads`` (core/upload.py);
    the constructor from ``ServiceBase`` (host or scope, storage, images, uow, notifier,
    policy, tenant, clock, tracer, neighbours).
    """

    def create_volume(self, ctx: RequestContext, image_id: str, size_gb: int, *,
                      volume_id: str | None = None) -> CreateResult:
        """Create a volume of ``size_gb`` GiB from ``image_id``, owned by ``ctx``'s project.

        Announces exactly one of hit or miss (none when the cache is disabled).
        """
        started = self.clock.monotonic()
        attributes: dict[str, str | int | float | bool] = {
            "image_id": image_id, "host": self.host, "scope": self.scope.key,
            "size_gb": size_gb}
        with self.tracer.span("ivcache.create_volume", attributes) as span:
            self.tenant.check_caller(ctx)
            image = self._authorize(ctx, image_id)
            self._validate_size(image, size_gb)
            vol_id = check_id("volume", volume_id) if volume_id is not None else new_id()
            if not self.policy.enabled:
                served = _Served(self._uncached(ctx, image, vol_id, size_gb),
                                 Outcome.DISABLED)
            else:
                served = self._through_cache(ctx, image, vol_id, size_gb)
            span.set_attribute("outcome", served.outcome.value)
            self._announce(image, served)
        return CreateResult(served.volume, served.outcome, served.entry_id,
                            self.clock.monotonic() - started, served.filled_from,
                            served.clone_seconds)

    # ------------------------------------------------------------------ authorize, validate

    def _authorize(self, ctx: RequestContext, image_id: str) -> Image:
        # The caller's own identity decides: the cache never widens access.
        try:
            image = self.images.get_image(ctx, image_id)
        except ImageNotFound:
            self._forget_if_gone(image_id)
            raise
        if image.status != "active":
            self._evict_image(image_id, EvictReason.IMAGE_DELETED)
            raise ImageNotActive(image_id, image.status)
        return image

    def _forget_if_gone(self, image_id: str) -> None:
        """Evict the image's entry if the image is gone for everyone, not just the caller."""
        if self._find(self.scope.key, image_id) is None:
            return
        try:
            image = self.images.get_image(self.tenant.context(), image_id)
        except ImageNotFound:
            self._evict_image(image_id, EvictReason.IMAGE_DELETED)
            return
        except ImageUnavailable:
            # Whether it is gone cannot be told now: keep the entry, the caller is still
            # told the image was not found.
            return
        if image.status != "active":
            self._evict_image(image_id, EvictReason.IMAGE_DELETED)

    @staticmethod
    def _validate_size(image: Image, size_gb: int) -> None:
        if isinstance(size_gb, bool) or not isinstance(size_gb, int) or size_gb < 1:
            raise InvalidSize(f"size {size_gb!r} is not a positive whole number of GiB")
        if size_gb > MAX_VOLUME_GB:
            raise InvalidSize(f"size {size_gb} GiB is larger than any volume can be (at most "
                              f"{MAX_VOLUME_GB} GiB)")
        if size_gb < image.min_size_gb:
            raise InvalidSize(
                f"size {size_gb} GiB is too small for image {image.id}: it needs at least "
                f"{image.min_size_gb} GiB")

    # ------------------------------------------------------------------ through the cache

    def _through_cache(self, ctx: RequestContext, image: Image, vol_id: str,
                       size_gb: int) -> _Served:
        wait_until: dt.datetime | None = None
        backoff = 0.05
        while True:
            entry, lease = self._lease_if_fresh(image)
            now = self.clock.now()
            if entry is not None and lease is not None:
                volume, cloned = self._clone_leased(ctx, entry, lease, vol_id, size_gb,
                                                    hit=True, image_bytes=image.size)
                if volume is not None:
                    return _Served(volume, Outcome.HIT, entry.id, clone_seconds=cloned)
                continue  # its volume was gone and the entry with it: a miss now
            if entry is not None and entry.ready:
                # Stale: its bytes may differ from the image's.
                if not self._evict([entry], EvictReason.STALE):
                    # Leased: a clone still reads it. Wait for the clone to finish.
                    self.clock.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                continue
            if entry is not None:
                if self._dead_claim(entry, now):
                    # Its owner died mid-download: take the claim over.
                    self._take_over(entry)
                    continue
                wait_until = wait_until or now + dt.timedelta(
                    seconds=self.policy.claim_wait_seconds)
                if now >= wait_until:
                    return self._served_uncached(ctx, image, vol_id, size_gb)
                self.clock.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            try:
                filled = self._cache(ctx, image, lease=True, size_gb=size_gb)
            except AlreadyClaimed:
                continue
            if filled is None:
                return self._served_uncached(ctx, image, vol_id, size_gb)
            assert filled.lease is not None
            volume, cloned = self._clone_leased(ctx, filled.entry, filled.lease, vol_id,
                                                size_gb, hit=False)
            if volume is None:
                raise VolumeNotFound(filled.entry.volume_id)
            return _Served(volume, Outcome.MISS, filled.entry.id, filled.filled_from, cloned)

    def _served_uncached(self, ctx: RequestContext, image: Image, vol_id: str,
                         size_gb: int) -> _Served:
        return _Served(self._uncached(ctx, image, vol_id, size_gb, miss=True),
                       Outcome.MISS_UNCACHED, None, IMAGE_SOURCE)

    # ------------------------------------------------------------------ hit

    def _lease_if_fresh(self, image: Image, scope: str | None = None,
                        ) -> tuple[CacheEntry | None, Lease | None]:
        """Find the image's entry in ``scope`` (this one by default); if READY and fresh,
        lease and touch it, in one transaction (the hit path's only locked write). Returns
        the entry and the lease."""
        # The scope's lock orders leases with evictions, which take it too.
        scope = scope or self.scope.key
        with self._locked(scope) as (repo, totals):
            entry = repo.find(scope, image.id)
            if entry is None or not entry.ready or entry.is_stale_for(image):
                return entry, None
            # Its uses: the fill, the hits counted so far, and this one.
            entry.priority = self.policy.priority(totals.gdsf_age, entry, entry.hits + 2)
            # Same content, new metadata: keep the entry, remember the new updated_at.
            entry.image_updated_at = image.updated_at
            lease = self._take_lease(repo, entry)
            repo.save(entry)
            return entry, lease

    def _take_lease(self, repo: CacheRepository, entry: CacheEntry) -> Lease:
        """Touch the entry and lease it for this process (the caller saves the entry, under
        its scope's lock). The lease lives while the heartbeat keeps it (``_clone_leased``
        holds it)."""
        lease = Lease(new_id(), entry.id, self._owner(), self.heartbeat.until())
        repo.take_lease(lease)
        entry.lease_until = max(lease.until, entry.lease_until or lease.until)
        entry.last_used = self.clock.now()
        return lease

    def _clone_leased(self, ctx: RequestContext, entry: CacheEntry, lease: Lease,
                      vol_id: str, size_gb: int, *, hit: bool,
                      image_bytes: int = 0) -> tuple[Volume | None, float]:
        """Clone the leased entry's volume for the caller: the clone (None if that volume
        is gone) and the seconds it took.

        The lease is released, and for a ``hit`` the hit counted (with what it saved:
        ``image_bytes`` not downloaded, the entry's fill time less this clone's), only once
        the clone is done: a clone that failed is no hit.
        """
        volume: Volume | None = None
        started = self.clock.monotonic()
        try:
            with self.heartbeat.holding(lease=lease.id):
                self.faults.reached("mid-clone")
                volume = self.storage.clone_volume(entry.volume_id, vol_id, size_gb,
                                                   ctx.project_id)
                self.faults.reached("after-clone")
        except VolumeNotFound:
            volume = None
        finally:
            cloned = self.clock.monotonic() - started
            self._end_lease(entry, lease, hit=hit and volume is not None,
                            clone_seconds=cloned, image_bytes=image_bytes)
        if volume is None:
            # Only VolumeNotFound gets here (any other error propagates from the try):
            # the cache volume was deleted behind the cache's back: no clone can read it,
            # so the entry goes whatever other requests' leases say (waiting for them would
            # let them extend each other's leases for ever).
            self._evict([entry], EvictReason.MISSING_VOLUME, may_go=anything)
        return volume, cloned

    def _end_lease(self, entry: CacheEntry, lease: Lease, *, hit: bool = False,
                   clone_seconds: float = 0.0, image_bytes: int = 0) -> None:
        """End the lease; for a ``hit``, count it, its savings and its event in the same
        transaction (the hit path's second and last write)."""
        with self.uow as uow:
            # Each holder drops its own lease; no scope lock needed.
            if hit:
                # Measured, not guessed: an entry with no measured fill saves no seconds.
                saved = (entry.fill_seconds - clone_seconds
                         if entry.fill_seconds is not None else 0.0)
                uow.entries.end_lease(lease, entry.scope_key, hit=True,
                                      bytes_saved=image_bytes, seconds_saved=saved)
                uow.outbox.add(self._hit_event(entry.image_id, entry.id))
            else:
                uow.entries.end_lease(lease, entry.scope_key)
            uow.commit()

    # ------------------------------------------------------------------ miss

    def _cache(self, ctx: RequestContext, image: Image, *, lease: bool,
               size_gb: int | None = None) -> Filled | None:
        """Claim, make room and download: the new READY entry (leased, with ``lease``), or
        None if the image cannot be cached now. ``AlreadyClaimed`` if another worker won.
        ``size_gb`` is the size the caller asked for, if any (checked against the disk's
        virtual size as soon as the image's header tells it)."""
        # Before the claim: a known bad image makes no room and holds no claim.
        self._refuse_if_bad(image)
        for _ in range(2):
            # Without a size asked (warm), nothing else stops a disk no volume can hold.
            _no_larger_than_any_volume(image, image.min_size_gb)
            claim = self._claim(image)
            if claim is None:
                return None
            try:
                with self.heartbeat.holding(claim=claim.entry.id):
                    self.faults.reached("after-claim")
                    self._drop_volumes(claim.victims, self._room_reason)
                    return self._fill(ctx, image, claim.entry, lease=lease, size_gb=size_gb)
            except _Larger as larger:
                # Only where the source's metadata lacks (or understates) the virtual size:
                # the claim is gone; claim again for the size the header gave.
                image = attrs.evolve(image, virtual_size=larger.virtual_size)
        raise ImageUnavailable(f"image {image.id}: its header gave another virtual size on "
                               "each read: it is changing; try again")

    def _claim(self, image: Image) -> _Claim | None:
        """Reserve (scope, image) and make room, atomically; None if it cannot be cached."""
        size = image.min_size_gb
        if not self.policy.fits(size):
            return None
        scope = self.scope
        with self._locked() as (repo, totals):
            if repo.find(scope.key, image.id) is not None:
                raise AlreadyClaimed(scope.key, image.id)
            now = self.clock.now()
            victims = self._victims_for(repo, totals, now, size)
            # The quota is checked before anything is evicted: evicting for a new entry
            # that the quota then refuses would lose the old entries for nothing.
            if victims is None:
                return None
            if self.tenant.quota_gb or self.tenant.quota_volumes:
                # After the scope's row, as always: other hosts' claims add to the same
                # quota, and without this one lock two of them could both fit it.
                repo.lock_quota()
                if not self.tenant.quota_allows(repo.all_totals(), size, victims):
                    return None
            self._make_room(repo, totals, victims)
            entry = CacheEntry(
                id=new_id(), host=scope.host, image_id=image.id, volume_id=new_id(),
                size_gb=size, image_updated_at=image.updated_at,
                image_hash=image.content_hash, state=EntryState.CREATING, created_at=now,
                last_used=now, claim_expires=self.heartbeat.until(),
                claim_owner=self._owner(),
                cluster=scope.cluster, backend=scope.backend, pool=scope.pool)
            repo.add(entry)
        return _Claim(entry, victims)

    def _victims_for(self, repo: CacheRepository, totals: ScopeTotals, now: dt.datetime,
                     size_gb: int) -> list[CacheEntry] | None:
        """The entries to evict for a new one of ``size_gb`` (None: no room). Only when
        there is not room enough are the scope's leases looked at (an index read of the
        clones running): those of dead clones are dropped, and the choice made again."""
        for _ in range(2):
            victims = self.policy.victims(
                totals, eviction_candidates(repo, totals.scope, now,
                                            self.policy.eviction_policy),
                adding_gb=size_gb)
            if victims is not None or not self._free_dead_leases(
                    repo, repo.leased(totals.scope, now)):
                return victims
        return None

    def _fill(self, ctx: RequestContext, image: Image, entry: CacheEntry, *,
              lease: bool, size_gb: int | None) -> Filled | None:
        """Fill the claimed entry's volume (from a neighbour's entry if one can be copied,
        else downloaded and converted) and mark it READY (leased, with ``lease``, for the
        clone that follows).

        The image's head is read (and its format checked) before the volume is made. None
        when the backend has no room: the claim is released and the caller is served
        without caching. Any other failure releases the claim and propagates.
        With ``lease`` (a request's miss), the miss is counted and its event kept in the
        transaction that makes the entry READY; ``fill_seconds`` is measured from here.
        """
        created = False
        nbytes, seconds = 0, 0.0
        # On the service's clock, as the clones the ledger subtracts from it: real seconds in
        # production, exact ones on a fake clock (the trace bench's downloads take simulated
        # time).
        started = self.clock.monotonic()
        try:
            neighbour = self._fill_from_neighbour(image, entry)
            created = neighbour is not None
            if neighbour is None:
                with self._remembering(image), self._open(ctx, image) as disk:
                    self._check_fits(image, disk, asked_gb=size_gb,
                                     reserved_gb=entry.size_gb)
                    self.storage.create_volume(entry.volume_id, entry.size_gb,
                                               self.tenant.project_id)
                    created = True
                    self.faults.reached("mid-download")
                    nbytes, seconds = self._write(disk, entry.volume_id)
        except NoSpace:
            self._abandon(entry, created)
            return None
        except BaseException:
            self._abandon(entry, created)
            raise
        # Lock first, then read: a takeover between a read and the lock would go unseen.
        with self._locked() as (repo, totals):
            current = repo.get(entry.id)
            if current is not None:
                current.state = EntryState.READY
                current.claim_expires = None
                current.last_used = self.clock.now()
                # The ledger's fill time and what getting it back would cost (gdsf).
                current.fill_seconds = max(0.0, self.clock.monotonic() - started)
                current.priority = self.policy.priority(totals.gdsf_age, current,
                                                        current.hits + 1)
                taken = self._take_lease(repo, current) if lease else None
                repo.save(current)
                misses = 1 if lease else 0
                if neighbour is None:
                    repo.count_stats(self.scope.key, downloads=1, bytes_downloaded=nbytes,
                                     misses=misses)
                else:
                    repo.count_stats(self.scope.key, neighbour_fills=1, misses=misses)
                if lease:
                    self.uow.outbox.add(self._miss_event(
                        image.id, Outcome.MISS, neighbour or IMAGE_SOURCE, current.id))
        self.faults.reached("after-ready")
        if current is None:
            # Taken over (its heartbeat stopped) while we downloaded: ours is an orphan.
            self._delete_quietly(entry.volume_id)
            return None
        if neighbour is None:
            self.notifier.publish(ImageDownloaded(image.id, self.host, nbytes, seconds,
                                                  scope=self.scope.key))
        self.notifier.publish(CacheEntryCreated(image.id, self.host, current.id,
                                                current.size_gb, scope=self.scope.key))
        return Filled(current, taken, neighbour or IMAGE_SOURCE)

    def _fill_from_neighbour(self, image: Image, entry: CacheEntry) -> str | None:
        """Fill the claimed entry's new volume from a neighbour's READY, fresh entry of the
        image, on storage this backend can copy from; the neighbour's scope, or None if
        none could (the caller downloads then).

        The neighbour's entry is leased while it is read, as for a hit, so that its own
        service cannot evict it meanwhile. The caller was authorized already: a neighbour
        only saves the download, it never grants access.
        """
        for neighbour in self.neighbours:
            key = neighbour.scope.key
            found = self._find(key, image.id)
            if found is None or not found.ready or found.is_stale_for(image):
                continue
            try:
                storage = neighbour.storage()
            except IvcacheError:
                continue  # that backend cannot be reached now: the image source can
            if storage is self.storage or not self.storage.can_fill_from(storage):
                continue
            source, lease = self._lease_if_fresh(image, key)
            if source is None or lease is None:
                continue
            try:
                with self.heartbeat.holding(lease=lease.id):
                    self.storage.fill_from(storage, source.volume_id, entry.volume_id,
                                           entry.size_gb, self.tenant.project_id)
            except VolumeNotFound as exc:
                if exc.volume_id != source.volume_id:
                    raise
                continue  # deleted behind its cache's back: that service will evict it
            finally:
                self._end_lease(source, lease)
            return key
        return None

    def _abandon(self, entry: CacheEntry, created: bool) -> None:
        with self._locked() as (repo, _):
            repo.remove(entry)
        if created:
            self._delete_quietly(entry.volume_id)

    # ------------------------------------------------------------------ uncached

    def _uncached(self, ctx: RequestContext, image: Image, vol_id: str,
                  size_gb: int, *, miss: bool = False) -> Volume:
        """Download straight into the caller's new volume (cache disabled, or no room);
        with ``miss``, count the miss and keep its event in the download's transaction."""
        self._refuse_if_bad(image)
        with self._remembering(image), self._open(ctx, image) as disk, \
                self._writing(vol_id):
            self._check_fits(image, disk, asked_gb=size_gb, reserved_gb=size_gb)
            volume = self.storage.create_volume(vol_id, size_gb, ctx.project_id)
            try:
                self.faults.reached("mid-write")
                nbytes, seconds = self._write(disk, vol_id)
            except BaseException:
                self._delete_quietly(vol_id)
                raise
        with self.uow as uow:
            uow.entries.count_stats(self.scope.key, downloads=1, bytes_downloaded=nbytes,
                                    misses=1 if miss else 0)
            if miss:
                uow.outbox.add(self._miss_event(image.id, Outcome.MISS_UNCACHED,
                                                IMAGE_SOURCE, None))
            uow.commit()
        self.notifier.publish(ImageDownloaded(image.id, self.host, nbytes, seconds,
                                              scope=self.scope.key))
        return volume

    # ------------------------------------------------------------------ the negative cache
    #
    # Keyed on the image's content and the scope, never on the caller: the caller was
    # authorized before any of this, and an authorization failure is never remembered.

    def _refuse_if_bad(self, image: Image) -> None:
        """Raise the remembered error if this content of the image was found bad here."""
        if not self.policy.negative_cache_seconds:
            return
        now = self.clock.now()
        bad = self._read(lambda repo: repo.bad(self.scope.key, image.id,
                                               _content_key(image), now))
        if bad is not None:
            raise _remembered(image.id, bad, (bad.until - now).total_seconds())

    @contextlib.contextmanager
    def _remembering(self, image: Image) -> Iterator[None]:
        """Remember the image as bad if its data fails verification in the block."""
        try:
            yield
        except _BAD_DATA as exc:
            seconds = self.policy.negative_cache_seconds
            if seconds:
                now = self.clock.now()
                bad = BadImage(_content_key(image), _kind(exc), str(exc),
                               now + dt.timedelta(seconds=seconds))
                with self.uow as uow:
                    uow.entries.mark_bad(self.scope.key, image.id, bad, now)
                    uow.commit()
            raise

    # ------------------------------------------------------------------ the image's bytes
    #
    # One pipeline on every path (DESIGN §9): the source's stream, its hash checked on the
    # way (_Verified), then the converter: format detection and safety checks on the same
    # stream, raw data straight into the volume, other formats converted by qemu-img.

    def _open(self, ctx: RequestContext, image: Image) -> contextlib.closing[DiskImage]:
        """Check the image's metadata, open its data and read its head: its format is
        detected and checked."""
        return contextlib.closing(self.converter.open(
            image, lambda: _Verified(image, self.images.open_data(ctx, image.id))))

    @staticmethod
    def _check_fits(image: Image, disk: DiskImage, *, asked_gb: int | None,
                    reserved_gb: int) -> None:
        """The disk's virtual size, where its header gives it, against the size the caller
        asked for (``InvalidSize``) and the size the volume will have (``_Larger``)."""
        if disk.virtual_size is None:
            return
        needed = max(1, math.ceil(disk.virtual_size / GIB), image.min_disk)
        if asked_gb is not None and needed > asked_gb:
            raise InvalidSize(
                f"size {asked_gb} GiB is too small for image {image.id}: its "
                f"{disk.disk_format} disk is {needed} GiB ({disk.virtual_size} bytes)")
        _no_larger_than_any_volume(image, needed, f"its {disk.disk_format} disk is "
                                                  f"{disk.virtual_size} bytes")
        if needed > reserved_gb:
            raise _Larger(disk.virtual_size)

    def _write(self, disk: DiskImage, volume_id: str) -> tuple[int, float]:
        started = self.clock.monotonic()
        nbytes = disk.write_to(self.storage, volume_id)
        return nbytes, self.clock.monotonic() - started

    # ------------------------------------------------------------------ announce

    # The hit or miss was counted, and its event kept in the outbox, in the transaction of
    # the change it announces (the hit's lease end, the miss's READY or download); here,
    # after the request, the same event goes to the notifiers.

    def _announce(self, image: Image, served: _Served) -> None:
        if served.outcome is Outcome.HIT:
            self.notifier.publish(self._hit_event(image.id, served.entry_id or ""))
        elif served.outcome in (Outcome.MISS, Outcome.MISS_UNCACHED):
            self.notifier.publish(self._miss_event(image.id, served.outcome,
                                                   served.filled_from or IMAGE_SOURCE,
                                                   served.entry_id))

    def _hit_event(self, image_id: str, entry_id: str) -> CacheHit:
        return CacheHit(image_id, self.host, entry_id, scope=self.scope.key)

    def _miss_event(self, image_id: str, outcome: Outcome, filled_from: str,
                    entry_id: str | None) -> CacheMiss:
        return CacheMiss(image_id, self.host, outcome.value, filled_from, entry_id,
                         scope=self.scope.key)


class _NoVolumeHoldsIt(InvalidSize):
    """The image's header gives a disk larger than any volume: a property of its data (the
    negative cache remembers it), unlike a size the caller asked that is too small."""


#: The errors that are properties of an image's data, remembered for
#: ``negative_cache_seconds``. Not ``ImageUnavailable`` (unreachable, cut short: the network),
#: ``ConversionFailed`` or ``NoScratchSpace`` (this machine's limits): those may pass. Not
#: ``UnsupportedImage`` either: it is decided by the metadata or the first bytes (no
#: download to save) and often by the configuration (allow_compression_on_image_upload,
#: image_conversion_disable), which the operator may change the next minute.
_BAD_DATA: tuple[type[IvcacheError], ...] = (
    ChecksumMismatch, UnsafeImage, ImageFormatMismatch, CorruptImage, _NoVolumeHoldsIt)
_KINDS: dict[str, type[IvcacheError]] = {
    cls.__name__: cls for cls in (ChecksumMismatch, UnsafeImage, UnsupportedImage,
                                  ImageFormatMismatch, CorruptImage, InvalidSize)}


def _content_key(image: Image) -> str:
    """What the negative cache's findings are about: the image's hash, else its updated_at
    (a re-upload changes either, and the image is tried again)."""
    if image.content_hash:
        return image.content_hash
    return image.updated_at.isoformat() if image.updated_at else ""


def _kind(exc: IvcacheError) -> str:
    return "InvalidSize" if isinstance(exc, InvalidSize) else type(exc).__name__


def _remembered(image_id: str, bad: BadImage, seconds_left: float) -> IvcacheError:
    """The remembered finding as an error of its kind (the CLI's exit and message the same
    as the first time)."""
    cls = _KINDS.get(bad.kind, CorruptImage)
    error = cls.__new__(cls)
    # Not cls.__init__: ChecksumMismatch's wants the hashes, which were not kept.
    IvcacheError.__init__(error, f"{bad.reason} (remembered for {math.ceil(seconds_left)} s "
                                 f"more; `ivcache cache evict --image {image_id}` forgets it)")
    if isinstance(error, ChecksumMismatch):
        error.image_id = image_id
    return error


def _no_larger_than_any_volume(image: Image, needed_gb: int, why: str = "") -> None:
    if needed_gb > MAX_VOLUME_GB:
        # From the header (``why``): the data's property; from the metadata: the request's.
        error = _NoVolumeHoldsIt if why else InvalidSize
        why = why or f"it needs {needed_gb} GiB"
        raise error(f"image {image.id}: {why}, larger than any volume can be (at most "
                          f"{MAX_VOLUME_GB} GiB): it cannot be cached or copied into a volume")


class _Verified:
    """The image's bytes as the source gives them, hashed and counted on the way through
    (the ``ImageData`` the converter reads): after the last chunk, a hash or length that is
    not the image's raises instead of ``StopIteration``."""

    def __init__(self, image: Image, chunks: Iterator[bytes]) -> None:
        self._image = image
        self._chunks = chunks
        self._expected = image.expected_hash
        self._digest = hashlib.new(self._expected[0]) if self._expected else None
        self._total = 0
        self._fd: int | None = None
        if isinstance(chunks, FileChunks):
            try:
                self._fd = chunks.fileno()
            except OSError:  # io.UnsupportedOperation: not read from a file after all
                self._fd = None

    def __iter__(self) -> _Verified:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._check()
            raise
        if self._digest is not None:
            self._digest.update(chunk)
        self._total += len(chunk)
        return chunk

    def fileno(self) -> int | None:
        return self._fd

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if callable(close):
            close()

    def _check(self) -> None:
        image = self._image
        if image.size and self._total != image.size:
            raise ImageUnavailable(
                f"image {image.id}: got {self._total} bytes, expected {image.size}: "
                "the download was cut short; try again")
        if self._digest is not None and self._expected is not None:
            actual = self._digest.hexdigest()
            if actual != self._expected[1]:
                raise ChecksumMismatch(image.id, self._expected[0], self._expected[1], actual)

"""The cache service: the one place that decides hit, miss, eviction and who may see what.

Every storage, image, database and notification call goes through a port, so the same
rules hold on fakes, SQLite or PostgreSQL, files, qcow2 or RBD.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import attrs

from ivcache.core.errors import (
    AlreadyClaimed,
    ChecksumMismatch,
    EntryNotFound,
    ImageNotActive,
    ImageNotFound,
    ImageUnavailable,
    InvalidRequest,
    InvalidSize,
    NoSpace,
    VolumeNotFound,
)
from ivcache.core.events import (
    CacheEntryCreated,
    CacheEvict,
    CacheHit,
    CacheMiss,
    EvictReason,
    ImageDownloaded,
)
from ivcache.core.model import (
    CacheEntry,
    CreateResult,
    EntryState,
    HostTotals,
    Image,
    InternalTenant,
    Outcome,
    RequestContext,
    Volume,
    check_id,
    new_id,
)
from ivcache.core.policy import CachePolicy, EvictionStrategy, LeastRecentlyUsed
from ivcache.core.ports import (
    Clock,
    ImageSource,
    Notifier,
    Span,
    StorageBackend,
    Tracer,
    UnitOfWork,
)

__all__ = ["CacheService", "Finding", "NullTracer", "SystemClock"]

T = TypeVar("T")


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

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


@attrs.frozen
class Finding:
    """What ``reconcile`` found: ``kind`` is ``missing-volume``, ``expired-claim`` or
    ``orphan-volume``."""

    kind: str
    volume_id: str
    entry_id: str | None = None
    image_id: str | None = None
    fixed: bool = False


@attrs.frozen
class _Claim:
    entry: CacheEntry
    victims: list[CacheEntry]


class CacheService:
    """Creates volumes from images on one storage host, through the image-volume cache.

    ``host`` names the storage host this service speaks for; entries are host-specific.
    """

    def __init__(
        self,
        *,
        host: str,
        storage: StorageBackend,
        images: ImageSource,
        uow: UnitOfWork,
        notifier: Notifier,
        policy: CachePolicy | None = None,
        tenant: InternalTenant | None = None,
        clock: Clock | None = None,
        tracer: Tracer | None = None,
        strategy: EvictionStrategy | None = None,
    ) -> None:
        self.host = host
        self.storage = storage
        self.images = images
        self.uow = uow
        self.notifier = notifier
        self.policy = policy or CachePolicy()
        self.tenant = tenant or InternalTenant()
        self.clock: Clock = clock or SystemClock()
        self.tracer: Tracer = tracer or NullTracer()
        self.strategy: EvictionStrategy = strategy or LeastRecentlyUsed()

    # ------------------------------------------------------------------ the job

    def create_volume(self, ctx: RequestContext, image_id: str, size_gb: int, *,
                      volume_id: str | None = None) -> CreateResult:
        """Create a volume of ``size_gb`` GiB from ``image_id``, owned by ``ctx``'s project.

        Announces exactly one of hit or miss (none when the cache is disabled).
        """
        started = time.perf_counter()
        attributes: dict[str, str | int | float | bool] = {
            "image_id": image_id, "host": self.host, "size_gb": size_gb}
        with self.tracer.span("ivcache.create_volume", attributes) as span:
            image = self._authorize(ctx, image_id)
            self._validate_size(image, size_gb)
            vol_id = check_id("volume", volume_id) if volume_id else new_id()
            entry_id: str | None = None
            if not self.policy.enabled:
                volume = self._download_into_new(ctx, image, vol_id, size_gb, ctx.project_id)
                outcome = Outcome.DISABLED
            else:
                volume, outcome, entry_id = self._through_cache(ctx, image, vol_id, size_gb)
            span.set_attribute("outcome", outcome.value)
            self._announce(image, outcome, entry_id)
        return CreateResult(volume, outcome, entry_id, time.perf_counter() - started)

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
        if self._read(lambda uow: uow.entries.find(self.host, image_id)) is None:
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
        if size_gb < image.min_size_gb:
            raise InvalidSize(
                f"size {size_gb} GiB is too small for image {image.id}: it needs at least "
                f"{image.min_size_gb} GiB")

    def _through_cache(self, ctx: RequestContext, image: Image, vol_id: str,
                       size_gb: int) -> tuple[Volume, Outcome, str | None]:
        wait_until: dt.datetime | None = None
        backoff = 0.05
        while True:
            entry, lease = self._lease_if_fresh(image)
            now = self.clock.now()
            if entry is not None and lease is not None:
                volume = self._clone_leased(ctx, entry, lease, vol_id, size_gb)
                if volume is not None:
                    return volume, Outcome.HIT, entry.id
                continue
            if entry is not None and entry.ready:
                # Stale: its bytes may differ from the image's.
                if not self._evict([entry], EvictReason.STALE):
                    # Leased: a clone still reads it. Wait for the clone to finish.
                    self.clock.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                continue
            if entry is not None:
                if entry.claim_expired(now):
                    # Its owner died mid-download: take the claim over.
                    self._take_over(entry)
                    continue
                wait_until = wait_until or now + dt.timedelta(
                    seconds=self.policy.claim_wait_seconds)
                if now >= wait_until:
                    return self._uncached(ctx, image, vol_id, size_gb), Outcome.MISS_UNCACHED, None
                self.clock.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            try:
                filled = self._cache(ctx, image, lease=True)
            except AlreadyClaimed:
                continue
            if filled is None:
                return self._uncached(ctx, image, vol_id, size_gb), Outcome.MISS_UNCACHED, None
            ready, lease = filled
            assert lease is not None
            volume = self._clone_leased(ctx, ready, lease, vol_id, size_gb)
            if volume is None:
                raise VolumeNotFound(ready.volume_id)
            return volume, Outcome.MISS, ready.id

    # ------------------------------------------------------------------ hit

    def _lease_if_fresh(self, image: Image) -> tuple[CacheEntry | None, dt.datetime | None]:
        """Find the image's entry; if READY and fresh, lease and touch it, in one
        transaction (the hit path's only write). Returns the entry and the lease, if any."""
        with self.uow as uow:
            # The host's lock orders leases with evictions, which take it too.
            uow.entries.lock_host(self.host)
            entry = uow.entries.find(self.host, image.id)
            if entry is None or not entry.ready or entry.is_stale_for(image):
                return entry, None
            lease = self._take_lease(entry)
            entry.hits += 1
            uow.entries.count_stats(self.host, hits=1)
            # Same content, new metadata: keep the entry, remember the new updated_at.
            entry.image_updated_at = image.updated_at
            uow.entries.save(entry)
            uow.commit()
            return entry, lease

    def _take_lease(self, entry: CacheEntry) -> dt.datetime:
        """Touch the entry and extend its lease (the caller saves it, under the host lock)."""
        now = self.clock.now()
        lease = now + dt.timedelta(seconds=self.policy.clone_lease_seconds)
        entry.lease_until = max(lease, entry.lease_until or lease)
        entry.last_used = now
        return entry.lease_until

    def _clone_leased(self, ctx: RequestContext, entry: CacheEntry, lease: dt.datetime,
                      vol_id: str, size_gb: int) -> Volume | None:
        """Clone the leased entry's volume for the caller; None if that volume is gone."""
        try:
            volume: Volume | None = self.storage.clone_volume(
                entry.volume_id, vol_id, size_gb, ctx.project_id)
        except VolumeNotFound:
            volume = None
        finally:
            self._release(entry.id, lease)
        if volume is None:
            # The cache volume was deleted behind the cache's back: forget the entry (after
            # our lease is released, or eviction would skip it).
            self._evict([entry], EvictReason.ADMIN)
        return volume

    def _release(self, entry_id: str, lease: dt.datetime) -> None:
        with self.uow as uow:
            # One conditional update: only the holder of the latest lease clears it, and
            # no host lock is needed for that.
            uow.entries.clear_lease(entry_id, lease)
            uow.commit()

    # ------------------------------------------------------------------ miss

    def _cache(self, ctx: RequestContext, image: Image, *,
               lease: bool) -> tuple[CacheEntry, dt.datetime | None] | None:
        """Claim, make room and download: the new READY entry (leased, with ``lease``), or
        None if the image cannot be cached now. ``AlreadyClaimed`` if another worker won."""
        claim = self._claim(image)
        if claim is None:
            return None
        self._drop_volumes(claim.victims, EvictReason.LRU)
        return self._fill(ctx, image, claim.entry, lease=lease)

    def _claim(self, image: Image) -> _Claim | None:
        """Reserve (host, image) and make room, atomically; None if it cannot be cached."""
        size = image.min_size_gb
        if not self.policy.fits(size):
            return None
        with self.uow as uow:
            totals = uow.entries.lock_host(self.host)
            if uow.entries.find(self.host, image.id) is not None:
                raise AlreadyClaimed(self.host, image.id)
            now = self.clock.now()
            victims = self._victims(uow, totals, size, now)
            if victims is None or not self._quota_allows(uow, size, victims):
                return None
            for victim in victims:
                uow.entries.remove(victim)
            entry = CacheEntry(
                id=new_id(), host=self.host, image_id=image.id, volume_id=new_id(),
                size_gb=size, image_updated_at=image.updated_at,
                image_hash=image.content_hash, state=EntryState.CREATING, created_at=now,
                last_used=now,
                claim_expires=now + dt.timedelta(seconds=self.policy.claim_lease_seconds))
            uow.entries.add(entry)
            if victims:
                uow.entries.count_stats(self.host, evictions=len(victims))
            uow.commit()
        return _Claim(entry, victims)

    def _victims(self, uow: UnitOfWork, totals: HostTotals, size: int,
                 now: dt.datetime) -> list[CacheEntry] | None:
        count, used = totals.count + 1, totals.size_gb + size
        victims: list[CacheEntry] = []
        if not self.policy.over_limits(count, used):
            return victims
        for candidate in self.strategy.candidates(uow.entries, self.host, now):
            victims.append(candidate)
            count, used = count - 1, used - candidate.size_gb
            if not self.policy.over_limits(count, used):
                return victims
        return None

    def _quota_allows(self, uow: UnitOfWork, size: int, victims: list[CacheEntry]) -> bool:
        # Checked before anything is evicted: evicting for a new entry the quota then
        # refuses would lose the old entries for nothing (Cinder's trap).
        quota_gb, quota_volumes = self.tenant.quota_gb, self.tenant.quota_volumes
        if not quota_gb and not quota_volumes:
            return True
        totals = uow.entries.all_totals()
        gb = sum(t.size_gb for t in totals) + size - sum(v.size_gb for v in victims)
        volumes = sum(t.count for t in totals) + 1 - len(victims)
        return not ((quota_gb and gb > quota_gb) or (quota_volumes and volumes > quota_volumes))

    def _fill(self, ctx: RequestContext, image: Image, entry: CacheEntry, *,
              lease: bool) -> tuple[CacheEntry, dt.datetime | None] | None:
        """Download into the claimed entry's volume and mark it READY (leased, with
        ``lease``, for the clone that follows).

        None when the backend has no room: the claim is released and the caller is served
        without caching. Any other failure releases the claim and propagates.
        """
        created = False
        try:
            self.storage.create_volume(entry.volume_id, entry.size_gb, self.tenant.project_id)
            created = True
            nbytes, seconds = self._write(ctx, image, entry.volume_id)
        except NoSpace:
            self._abandon(entry, created)
            return None
        except BaseException:
            self._abandon(entry, created)
            raise
        with self.uow as uow:
            # Lock first, then read: a takeover between a read and the lock would go unseen.
            uow.entries.lock_host(self.host)
            current = uow.entries.get(entry.id)
            if current is None:
                # Taken over (its lease ran out) while we downloaded: ours is an orphan.
                uow.commit()
                self._delete_quietly(entry.volume_id)
                return None
            current.state = EntryState.READY
            current.claim_expires = None
            current.last_used = self.clock.now()
            taken = self._take_lease(current) if lease else None
            uow.entries.save(current)
            uow.entries.count_stats(self.host, downloads=1, bytes_downloaded=nbytes)
            uow.commit()
        self.notifier.publish(ImageDownloaded(image.id, self.host, nbytes, seconds))
        self.notifier.publish(CacheEntryCreated(image.id, self.host, current.id,
                                                current.size_gb))
        return current, taken

    def _abandon(self, entry: CacheEntry, created: bool) -> None:
        with self.uow as uow:
            uow.entries.lock_host(self.host)
            uow.entries.remove(entry)
            uow.commit()
        if created:
            self._delete_quietly(entry.volume_id)

    def _uncached(self, ctx: RequestContext, image: Image, vol_id: str,
                  size_gb: int) -> Volume:
        return self._download_into_new(ctx, image, vol_id, size_gb, ctx.project_id)

    def _download_into_new(self, ctx: RequestContext, image: Image, vol_id: str,
                           size_gb: int, owner: str) -> Volume:
        volume = self.storage.create_volume(vol_id, size_gb, owner)
        try:
            nbytes, seconds = self._write(ctx, image, vol_id)
        except BaseException:
            self._delete_quietly(vol_id)
            raise
        with self.uow as uow:
            uow.entries.count_stats(self.host, downloads=1, bytes_downloaded=nbytes)
            uow.commit()
        self.notifier.publish(ImageDownloaded(image.id, self.host, nbytes, seconds))
        return volume

    def _write(self, ctx: RequestContext, image: Image, volume_id: str) -> tuple[int, float]:
        started = time.perf_counter()
        nbytes = self.storage.write_image(volume_id, self._verified(ctx, image))
        return nbytes, time.perf_counter() - started

    def _verified(self, ctx: RequestContext, image: Image) -> Iterator[bytes]:
        """The image's bytes, hashed on the way through; raises at the end on a mismatch."""
        algo, expected = _expected_hash(image)
        digest = hashlib.new(algo) if algo else None
        total = 0
        for chunk in self.images.open_data(ctx, image.id):
            if digest is not None:
                digest.update(chunk)
            total += len(chunk)
            yield chunk
        if image.size and total != image.size:
            raise ImageUnavailable(
                f"image {image.id}: got {total} bytes, expected {image.size}: "
                "the download was cut short; try again")
        if digest is not None and expected is not None and digest.hexdigest() != expected:
            raise ChecksumMismatch(image.id, str(algo), expected, digest.hexdigest())

    def _announce(self, image: Image, outcome: Outcome, entry_id: str | None) -> None:
        if outcome is Outcome.HIT:
            self.notifier.publish(CacheHit(image.id, self.host, entry_id or ""))
        elif outcome in (Outcome.MISS, Outcome.MISS_UNCACHED):
            with self.uow as uow:
                uow.entries.count_stats(self.host, misses=1)
                uow.commit()
            self.notifier.publish(CacheMiss(image.id, self.host, outcome.value))

    # ------------------------------------------------------------------ eviction

    def _evict(self, entries: list[CacheEntry], reason: EvictReason, *,
               creating_too: bool = False) -> list[CacheEntry]:
        """Delete the entries, then their volumes; the entry goes first so no hit clones a
        volume that is being deleted. Entries leased by a clone in progress are skipped
        (a lease is only taken under the host's lock, as here)."""
        gone: list[CacheEntry] = []
        with self.uow as uow:
            uow.entries.lock_host(self.host)
            now = self.clock.now()
            for entry in entries:
                current = uow.entries.get(entry.id)
                if current is None or (not current.ready and not creating_too):
                    continue
                if current.leased(now):
                    continue
                if uow.entries.remove(current):
                    gone.append(current)
            if gone:
                uow.entries.count_stats(self.host, evictions=len(gone))
            uow.commit()
        self._drop_volumes(gone, reason)
        return gone

    def _take_over(self, entry: CacheEntry) -> bool:
        """Remove a claim whose lease ran out (its owner died), if it still has; say
        whether it was removed."""
        with self.uow as uow:
            uow.entries.lock_host(self.host)
            current = uow.entries.get(entry.id)
            # Re-checked under the lock: the owner may have finished, or another worker may
            # have taken the claim over, since we read it.
            if current is None or not current.claim_expired(self.clock.now()):
                return False
            uow.entries.remove(current)
            uow.entries.count_stats(self.host, evictions=1)
            uow.commit()
        self._drop_volumes([current], EvictReason.RECONCILE)
        return True

    def _drop_volumes(self, entries: list[CacheEntry], reason: EvictReason) -> None:
        for entry in entries:
            self._delete_quietly(entry.volume_id)
            self.notifier.publish(
                CacheEvict(entry.image_id, entry.host, reason, entry.id, entry.size_gb))

    def _delete_quietly(self, volume_id: str) -> None:
        with contextlib.suppress(VolumeNotFound):
            self.storage.delete_volume(volume_id)

    def _evict_image(self, image_id: str, reason: EvictReason) -> None:
        entry = self._read(lambda uow: uow.entries.find(self.host, image_id))
        if entry is not None:
            self._evict([entry], reason, creating_too=entry.claim_expired(self.clock.now()))

    # ------------------------------------------------------------------ operators

    def evict(self, *, image_id: str | None = None, entry_id: str | None = None,
              everything: bool = False) -> list[CacheEntry]:
        """Evict by image, by entry or all of this host's entries (reason ``admin``)."""
        if sum((image_id is not None, entry_id is not None, everything)) != 1:
            raise InvalidRequest("say exactly one of: an image, an entry, or all")
        if entry_id is not None:
            entry = self._read(lambda uow: uow.entries.get(entry_id))
            if entry is None or entry.host != self.host:
                raise EntryNotFound(entry_id)
            targets = [entry]
        elif image_id is not None:
            found = self._read(lambda uow: uow.entries.find(self.host, image_id))
            if found is None:
                raise EntryNotFound(f"for image {image_id} on host {self.host}")
            targets = [found]
        else:
            targets = self.list_entries(self.host)
        return self._evict(targets, EvictReason.ADMIN)

    def prune(self) -> list[CacheEntry]:
        """Evict least recently used entries until the host is within its limits again
        (after the limits were lowered)."""
        with self.uow as uow:
            totals = uow.entries.lock_host(self.host)
            count, used = totals.count, totals.size_gb
            victims: list[CacheEntry] = []
            if self.policy.over_limits(count, used):
                for candidate in self.strategy.candidates(uow.entries, self.host,
                                                          self.clock.now()):
                    victims.append(candidate)
                    count, used = count - 1, used - candidate.size_gb
                    if not self.policy.over_limits(count, used):
                        break
            for victim in victims:
                uow.entries.remove(victim)
            if victims:
                uow.entries.count_stats(self.host, evictions=len(victims))
            uow.commit()
        self._drop_volumes(victims, EvictReason.LRU)
        return victims

    def list_entries(self, host: str | None = None) -> list[CacheEntry]:
        return self._read(lambda uow: uow.entries.list(host=host))

    def get_entry(self, entry_id: str) -> CacheEntry:
        entry = self._read(lambda uow: uow.entries.get(entry_id))
        if entry is None:
            raise EntryNotFound(entry_id)
        return entry

    def stats(self, host: str | None = None) -> HostTotals:
        return self._read(lambda uow: uow.entries.totals(host or self.host))

    def warm(self, image_id: str) -> CacheEntry:
        """Cache an image on this host ahead of demand, as the cache's own identity."""
        image = self._authorize(self.tenant.context(), image_id)
        while True:
            entry = self._read(lambda uow: uow.entries.find(self.host, image.id))
            if entry is not None and entry.ready:
                if not entry.is_stale_for(image):
                    return entry
                if not self._evict([entry], EvictReason.STALE):
                    raise InvalidRequest(f"the stale entry of image {image.id} on host "
                                         f"{self.host} is being cloned; try again shortly")
                continue
            if entry is not None and not entry.claim_expired(self.clock.now()):
                raise AlreadyClaimed(self.host, image.id)
            if entry is not None:
                self._take_over(entry)
                continue
            try:
                filled = self._cache(self.tenant.context(), image, lease=False)
            except AlreadyClaimed:
                continue
            if filled is None:
                raise NoSpace(f"image {image.id} ({image.min_size_gb} GiB) cannot be cached "
                              f"on host {self.host}: no room within the cache's limits, the "
                              "internal tenant's quota or the storage")
            return filled[0]

    def pin(self, image_id: str, pinned: bool = True) -> CacheEntry:
        """Pin (or unpin) the image's entry on this host: a pinned entry is never evicted
        to make room (an admin may still evict it)."""
        with self.uow as uow:
            entry = uow.entries.find(self.host, image_id)
            if entry is None:
                raise EntryNotFound(f"for image {image_id} on host {self.host}")
            entry.pinned = pinned
            uow.entries.save(entry)
            uow.commit()
        return entry

    def reconcile(self, *, fix: bool = False) -> list[Finding]:
        """Compare this host's entries with its storage; with ``fix``, repair what differs.

        Finds entries whose volume is gone, claims whose owner died, and cache volumes no
        entry owns (left by a crash between an eviction and its volume's deletion).
        """
        # Volumes first: an entry is committed before its volume is made, so any volume
        # listed here that has an entry will show it in the entries read after.
        volumes = {v.id for v in self.storage.list_volumes(owner=self.tenant.project_id)}
        every_host = self.list_entries(None)
        entries = [e for e in every_host if e.host == self.host]
        now = self.clock.now()
        findings: list[Finding] = []
        # Any host's entry counts as an owner: hosts may share one storage directory.
        owned = {e.volume_id for e in every_host}
        for entry in entries:
            if entry.claim_expired(now):
                kind = "expired-claim"
                fixed = fix and self._take_over(entry)
            elif entry.ready and entry.volume_id not in volumes:
                kind = "missing-volume"
                fixed = fix and bool(self._evict([entry], EvictReason.RECONCILE))
            else:
                continue
            findings.append(Finding(kind, entry.volume_id, entry.id, entry.image_id, fixed))
        for volume_id in sorted(volumes - owned):
            if fix:
                self._delete_quietly(volume_id)
            findings.append(Finding("orphan-volume", volume_id, fixed=fix))
        return findings

    # ------------------------------------------------------------------ volumes

    def get_volume(self, ctx: RequestContext, volume_id: str) -> Volume:
        volume = self.storage.get_volume(check_id("volume", volume_id))
        if volume.owner != ctx.project_id and not ctx.is_admin:
            # A user never learns that someone else's volume, or a cache volume, exists.
            raise VolumeNotFound(volume_id)
        return volume

    def list_volumes(self, ctx: RequestContext, *, all_projects: bool = False) -> list[Volume]:
        if all_projects:
            if not ctx.is_admin:
                raise InvalidRequest("listing every project's volumes needs --admin")
            return self.storage.list_volumes()
        return self.storage.list_volumes(owner=ctx.project_id)

    def delete_volume(self, ctx: RequestContext, volume_id: str) -> None:
        """Delete a volume; an admin deleting a cache volume also removes its entry."""
        volume = self.get_volume(ctx, volume_id)
        if volume.owner == self.tenant.project_id:
            entry = self._read(lambda uow: uow.entries.find_by_volume(volume_id))
            if entry is not None:
                if (not self._evict([entry], EvictReason.ADMIN, creating_too=True)
                        and self._read(lambda uow: uow.entries.get(entry.id)) is not None):
                    # Skipped, not gone: a clone is reading it.
                    raise InvalidRequest(f"cache volume {volume_id} is being cloned from; "
                                         "try again in a moment")
                return
        self.storage.delete_volume(volume_id)

    # ------------------------------------------------------------------ helpers

    def _read(self, query: Callable[[UnitOfWork], T]) -> T:
        with self.uow as uow:
            return query(uow)


def _expected_hash(image: Image) -> tuple[str | None, str | None]:
    if (image.os_hash_algo and image.os_hash_value
            and image.os_hash_algo in hashlib.algorithms_available):
        return image.os_hash_algo, image.os_hash_value
    if image.checksum:
        return "md5", image.checksum
    return None, None

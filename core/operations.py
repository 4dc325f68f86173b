"""The operator's commands, and volume administration.

Evict, prune, warm, pin and unpin, reconcile, list and stats; get, list and delete volumes.
``CacheService`` (core/service.py) inherits these, so the one service still owns every
decision; they change entries only through the shared moves of ``ServiceBase``.
"""

from __future__ import annotations

import attrs

from ivcache.core.base import Filled, ServiceBase, free
from ivcache.core.errors import (
    AlreadyClaimed,
    EntryNotFound,
    InvalidRequest,
    NoSpace,
    VolumeNotFound,
)
from ivcache.core.events import EvictReason
from ivcache.core.model import (
    CacheEntry,
    HostTotals,
    Image,
    RequestContext,
    Volume,
    check_id,
)
from ivcache.core.policy import eviction_candidates

__all__ = ["Finding", "OperatorCommands"]


@attrs.frozen
class Finding:
    """What ``reconcile`` found: ``kind`` is ``missing-volume``, ``expired-claim``,
    ``orphan-volume`` or ``scratch-file`` (a conversion's scratch file whose process died:
    its ``path`` and ``size`` in bytes; no volume, so ``volume_id`` is empty)."""

    kind: str
    volume_id: str
    entry_id: str | None = None
    image_id: str | None = None
    fixed: bool = False
    path: str | None = None
    size: int | None = None


class OperatorCommands(ServiceBase):
    """What an operator asks of one host's cache (``CacheService`` is the class to use)."""

    def _cache(self, ctx: RequestContext, image: Image, *, lease: bool,
               size_gb: int | None = None) -> Filled | None:
        """The request path's claim-make-room-download step (``CacheService._cache``)."""
        raise NotImplementedError

    def _authorize(self, ctx: RequestContext, image_id: str) -> Image:
        """The request path's authorization (``CacheService._authorize``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ entries

    def list_entries(self, host: str | None = None) -> list[CacheEntry]:
        return self._read(lambda repo: repo.list(host=host))

    def get_entry(self, entry_id: str) -> CacheEntry:
        entry = self._read(lambda repo: repo.get(entry_id))
        if entry is None:
            raise EntryNotFound(entry_id)
        return entry

    def stats(self, host: str | None = None) -> HostTotals:
        return self._read(lambda repo: repo.totals(host or self.host))

    def evict(self, *, image_id: str | None = None, entry_id: str | None = None,
              everything: bool = False) -> list[CacheEntry]:
        """Evict by image, by entry or all of this host's entries (reason ``admin``)."""
        if sum((image_id is not None, entry_id is not None, everything)) != 1:
            raise InvalidRequest("say exactly one of: an image, an entry, or all")
        if entry_id is not None:
            entry = self._read(lambda repo: repo.get(entry_id))
            if entry is None or entry.host != self.host:
                raise EntryNotFound(entry_id)
            targets = [entry]
        elif image_id is not None:
            found = self._read(lambda repo: repo.find(self.host, image_id))
            if found is None:
                raise EntryNotFound(f"for image {image_id} on host {self.host}")
            targets = [found]
        else:
            targets = self.list_entries(self.host)
        return self._evict(targets, EvictReason.ADMIN)

    def prune(self) -> list[CacheEntry]:
        """Evict least recently used entries until the host is within its limits again
        (after the limits were lowered); as many as may go if that is not enough."""
        with self._locked() as (repo, totals):
            now = self.clock.now()
            victims = self.policy.victims(totals, eviction_candidates(repo, self.host, now))
            if victims is None:
                victims = list(eviction_candidates(repo, self.host, now))
            gone = self._remove(repo, self.host, victims)
        self._drop_volumes(gone, EvictReason.LRU)
        return gone

    def warm(self, image_id: str) -> CacheEntry:
        """Cache an image on this host ahead of demand, as the cache's own identity."""
        image = self._authorize(self.tenant.context(), image_id)
        while True:
            entry = self._read(lambda repo: repo.find(self.host, image.id))
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
            return filled.entry

    def pin(self, image_id: str, pinned: bool = True) -> CacheEntry:
        """Pin (or unpin) the image's entry on this host: a pinned entry is never evicted
        to make room (an admin may still evict it)."""
        with self._locked() as (repo, _):
            entry = repo.find(self.host, image_id)
            if entry is None:
                raise EntryNotFound(f"for image {image_id} on host {self.host}")
            entry.pinned = pinned
            repo.save(entry)
        return entry

    def reconcile(self, *, fix: bool = False) -> list[Finding]:
        """Compare this host's entries with its storage; with ``fix``, repair what differs.

        Finds entries whose volume is gone, claims whose owner died, cache volumes no
        entry owns (left by a crash between an eviction and its volume's deletion), and
        scratch files of conversions whose process died.
        """
        # Volumes first: an entry is committed before its volume is made, so any volume
        # listed here that has an entry will show it in the entries read after.
        volumes = {v.id for v in self.storage.list_volumes(owner=self.tenant.project_id)}
        every_host = self.list_entries(None)
        now = self.clock.now()
        findings: list[Finding] = []
        for entry in every_host:
            if entry.host != self.host:
                continue
            if entry.claim_expired(now):
                kind = "expired-claim"
                fixed = fix and self._take_over(entry)
            elif entry.ready and entry.volume_id not in volumes:
                kind = "missing-volume"
                fixed = fix and bool(self._evict([entry], EvictReason.RECONCILE))
            else:
                continue
            findings.append(Finding(kind, entry.volume_id, entry.id, entry.image_id, fixed))
        # Any host's entry counts as an owner: hosts may share one storage directory.
        owned = {e.volume_id for e in every_host}
        for volume_id in sorted(volumes - owned):
            if fix:
                self._delete_quietly(volume_id)
            findings.append(Finding("orphan-volume", volume_id, fixed=fix))
        for path, size in self.converter.leftovers(remove=fix):
            findings.append(Finding("scratch-file", "", path=path, size=size, fixed=fix))
        return findings

    # ------------------------------------------------------------------ volumes

    def get_volume(self, ctx: RequestContext, volume_id: str) -> Volume:
        self.tenant.check_caller(ctx, admin_ok=True)
        volume = self.storage.get_volume(check_id("volume", volume_id))
        if volume.owner != ctx.project_id and not ctx.is_admin:
            # A user never learns that someone else's volume, or a cache volume, exists.
            raise VolumeNotFound(volume_id)
        return volume

    def list_volumes(self, ctx: RequestContext, *, all_projects: bool = False) -> list[Volume]:
        self.tenant.check_caller(ctx, admin_ok=True)
        if all_projects:
            if not ctx.is_admin:
                raise InvalidRequest("listing every project's volumes needs --admin")
            return self.storage.list_volumes()
        return self.storage.list_volumes(owner=ctx.project_id)

    def delete_volume(self, ctx: RequestContext, volume_id: str) -> None:
        """Delete a volume; an admin deleting a cache volume also removes its entry (on
        whichever host the entry is)."""
        volume = self.get_volume(ctx, volume_id)
        if volume.owner == self.tenant.project_id:
            entry = self._read(lambda repo: repo.find_by_volume(volume_id))
            if entry is not None:
                if (not self._evict([entry], EvictReason.ADMIN, may_go=free)
                        and self._read(lambda repo: repo.get(entry.id)) is not None):
                    # Skipped, not gone: a clone is reading it.
                    raise InvalidRequest(f"cache volume {volume_id} is being cloned from; "
                                         "try again in a moment")
                return
        self.storage.delete_volume(volume_id)

"""The operator's commands, and volume administration.

Evict, prune, warm, pin and unpin, reconcile, adopt, list and stats; get, list and delete
volumes.
``CacheService`` (core/service.py) inherits these, so the one service still owns every
decision; they change entries only through the shared moves of ``ServiceBase``.
"""

from __future__ import annotations

import datetime as dt

import attrs

from ivcache.core.base import Filled, ServiceBase, free, ready_and_free
from ivcache.core.errors import (
    AlreadyClaimed,
    EntryNotFound,
    InvalidRequest,
    NoSpace,
    StorageError,
    VolumeNotFound,
)
from ivcache.core.events import EvictReason
from ivcache.core.model import (
    GIB,
    CacheEntry,
    Image,
    Lease,
    RequestContext,
    ScopeTotals,
    Volume,
    check_id,
)
from ivcache.core.policy import eviction_candidates

__all__ = ["Adoption", "Finding", "OperatorCommands"]


@attrs.frozen
class Adoption:
    """What ``adopt`` did: the entries moved into the service's scope, the duplicates it
    evicted (reason ``merged``: the scope held the image already), and those it left for
    a later run (a clone was reading them, or their download was still going on)."""

    adopted: list[CacheEntry]
    merged: list[CacheEntry]
    left: list[CacheEntry]


@attrs.frozen
class Finding:
    """What ``reconcile`` found: ``kind`` is

    - ``dead-claim``: a CREATING entry whose owner died mid-download (fix: taken over, its
      volume deleted);
    - ``dead-lease``: leases of clones whose processes died (fix: dropped, so that the
      entry may be evicted again);
    - ``missing-volume``: a READY entry whose volume is gone (fix: evicted);
    - ``partial-volume``: a user's volume whose writer died mid-write (an uncached create;
      ``size`` its bytes; fix: deleted), or half-made data a dead process left in the
      storage (``StorageBackend.leftovers``: no volume, ``path`` and ``size`` say what; fix:
      removed);
    - ``index-damage``: the storage's index or state damaged by a dead process (``path``,
      ``size``; fix: rebuilt from what is provably there);
    - ``orphan-cache-volume``: a cache volume no entry owns (fix: deleted);
    - ``scratch-file``: a conversion's scratch file whose process died (its ``path`` and
      ``size`` in bytes; no volume, so ``volume_id`` is empty; fix: removed)."""

    kind: str
    volume_id: str
    entry_id: str | None = None
    image_id: str | None = None
    fixed: bool = False
    path: str | None = None
    size: int | None = None


class OperatorCommands(ServiceBase):
    """What an operator asks of one scope's cache (``CacheService`` is the class to use)."""

    def _cache(self, ctx: RequestContext, image: Image, *, lease: bool,
               size_gb: int | None = None) -> Filled | None:
        """The request path's claim-make-room-download step (``CacheService._cache``)."""
        raise NotImplementedError

    def _authorize(self, ctx: RequestContext, image_id: str) -> Image:
        """The request path's authorization (``CacheService._authorize``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ entries

    def list_entries(self, host: str | None = None, *, scope: str | None = None,
                     backend: str | None = None) -> list[CacheEntry]:
        """Entries made by ``host``, in ``scope``, of ``backend`` (None: any of each)."""
        return self._read(lambda repo: repo.list(host, scope=scope, backend=backend))

    def get_entry(self, entry_id: str) -> CacheEntry:
        entry = self._read(lambda repo: repo.get(entry_id))
        if entry is None:
            raise EntryNotFound(entry_id)
        return entry

    def stats(self, host: str | None = None) -> ScopeTotals:
        """The totals of this scope, or of ``host``'s scope on this backend and pool."""
        scope = attrs.evolve(self.scope, host=host).key if host else self.scope.key
        return self._read(lambda repo: repo.totals(scope))

    def evict(self, *, image_id: str | None = None, entry_id: str | None = None,
              everything: bool = False) -> list[CacheEntry]:
        """Evict by image, by entry or all of this scope's entries (reason ``admin``). By
        image, the image's negative-cache finding in this scope is forgotten too."""
        if sum((image_id is not None, entry_id is not None, everything)) != 1:
            raise InvalidRequest("say exactly one of: an image, an entry, or all")
        key = self.scope.key
        if entry_id is not None:
            entry = self._read(lambda repo: repo.get(entry_id))
            if entry is None or entry.scope_key != key:
                raise EntryNotFound(entry_id)
            targets = [entry]
        elif image_id is not None:
            # The negative cache's finding goes too: the operator fixed the image, or wants
            # it tried again now.
            with self.uow as uow:
                forgot = uow.entries.forget_bad(key, image_id)
                uow.commit()
            found = self._find(key, image_id)
            if found is None and forgot:
                return []
            if found is None:
                raise EntryNotFound(f"for image {image_id} in {key}")
            targets = [found]
        else:
            targets = self.list_entries(scope=key)
        return self._evict(targets, EvictReason.ADMIN)

    def prune(self) -> list[CacheEntry]:
        """Evict entries, in the eviction policy's order (least recently used first under
        ``lru``), until the scope is within its limits again (after the limits were
        lowered); as many as may go if that is not enough."""
        key = self.scope.key
        with self._locked() as (repo, totals):
            now = self.clock.now()
            kind = self.policy.eviction_policy
            victims = self.policy.victims(totals, eviction_candidates(repo, key, now, kind))
            if victims is None:
                victims = list(eviction_candidates(repo, key, now, kind))
            gone = self._make_room(repo, totals, victims)
        self._drop_volumes(gone, self._room_reason)
        return gone

    def adopt(self) -> Adoption:
        """Move this host's entries of this backend that sit in another scope without a
        cluster into this scope: a host that joined a cluster brings its entries along (and
        a renamed pool keeps them). An image this scope already holds is not kept twice:
        the host's copy is evicted (reason ``merged``). Entries being cloned or filled are
        left for a later run. Then the scope is pruned back within its limits.

        Cheap when there is nothing to adopt (one indexed read): the composition root runs
        it whenever it builds a service, so a change of ``cluster`` takes effect on the
        next run.
        """
        key = self.scope.key
        strays = self._read(lambda repo: repo.strays(self.host, self.scope.backend, key))
        by_scope: dict[str, list[CacheEntry]] = {}
        for entry in strays:
            by_scope.setdefault(entry.scope_key, []).append(entry)
        adopted: list[CacheEntry] = []
        merged: list[CacheEntry] = []
        left: list[CacheEntry] = []
        for old, group in by_scope.items():
            with self._locked_both(old, key) as repo:
                now = self.clock.now()
                duplicates = []
                for stray in group:
                    current = repo.get(stray.id)
                    if current is None or current.scope_key != old:
                        continue
                    if repo.find(key, current.image_id) is None:
                        repo.move(current, self.scope)
                        adopted.append(repo.get(current.id) or current)
                    elif ready_and_free(current, now) or self._dead_claim(current, now):
                        duplicates.append(current)
                    else:
                        left.append(current)
                merged += self._remove(repo, old, duplicates, EvictReason.MERGED)
        self._drop_volumes(merged, EvictReason.MERGED)
        if adopted:
            self.prune()
        return Adoption(adopted, merged, left)

    def warm(self, image_id: str) -> CacheEntry:
        """Cache an image in this scope ahead of demand, as the cache's own identity."""
        image = self._authorize(self.tenant.context(), image_id)
        key = self.scope.key
        while True:
            entry = self._find(key, image.id)
            if entry is not None and entry.ready:
                if not entry.is_stale_for(image):
                    return entry
                if not self._evict([entry], EvictReason.STALE):
                    raise InvalidRequest(f"the stale entry of image {image.id} in {key} "
                                         "is being cloned; try again shortly")
                continue
            if entry is not None and not self._dead_claim(entry, self.clock.now()):
                raise AlreadyClaimed(key, image.id)
            if entry is not None:
                self._take_over(entry)
                continue
            try:
                filled = self._cache(self.tenant.context(), image, lease=False)
            except AlreadyClaimed:
                continue
            if filled is None:
                raise NoSpace(f"image {image.id} ({image.min_size_gb} GiB) cannot be cached "
                              f"in {key}: no room within the cache's limits, the "
                              "internal tenant's quota or the storage")
            return filled.entry

    def pin(self, image_id: str, pinned: bool = True) -> CacheEntry:
        """Pin (or unpin) the image's entry in this scope: a pinned entry is never evicted
        to make room (an admin may still evict it)."""
        key = self.scope.key
        with self._locked() as (repo, _):
            entry = repo.find(key, image_id)
            if entry is None:
                raise EntryNotFound(f"for image {image_id} in {key}")
            entry.pinned = pinned
            repo.save(entry)
        return entry

    def reconcile(self, *, fix: bool = False) -> list[Finding]:
        """Compare this scope's entries with its storage; with ``fix``, repair what differs.

        Finds entries whose volume is gone, claims and leases whose owners died, users'
        volumes whose writer died mid-write, cache volumes no entry owns (left by a crash
        between an eviction and its volume's deletion), scratch files of conversions whose
        process died, and what such processes left in the storage (half-made data, damage
        to its index); see ``Finding``. Safe while requests run: a live owner's claim,
        lease or write is never touched; running it twice changes nothing more.
        """
        # The storage's own repairs first: a damaged index must be rebuilt before its
        # volumes can be listed.
        left = self.storage.leftovers(remove=fix)
        # Volumes first: an entry is committed before its volume is made, so any volume
        # listed here that has an entry will show it in the entries read after.
        try:
            volumes = {v.id for v in self.storage.list_volumes(owner=self.tenant.project_id)}
        except StorageError:
            if not any(kind == "index-damage" for kind, _, _ in left):
                raise
            # An index that cannot be read (fixed, it would have been rebuilt): nothing but
            # the damage can be reported until ``fix`` rebuilds it.
            return [Finding(kind, "", path=where, size=size) for kind, where, size in left]
        every_scope = self.list_entries(None)
        now = self.clock.now()
        findings: list[Finding] = []
        for entry in every_scope:
            if entry.scope_key != self.scope.key:
                continue
            if self._dead_claim(entry, now):
                kind = "dead-claim"
                fixed = fix and self._take_over(entry)
                self.faults.reached("reconcile-fix")
            elif entry.ready and entry.volume_id not in volumes:
                kind = "missing-volume"
                fixed = fix and bool(self._evict([entry], EvictReason.RECONCILE))
            else:
                continue
            findings.append(Finding(kind, entry.volume_id, entry.id, entry.image_id, fixed))
        findings += self._dead_leases(every_scope, now, fix=fix)
        findings += self._partial_volumes(now, fix=fix)
        # Any scope's entry counts as an owner: hosts and clusters may share one storage.
        owned = {e.volume_id for e in every_scope}
        for volume_id in sorted(volumes - owned):
            if fix:
                self._delete_quietly(volume_id)
            findings.append(Finding("orphan-cache-volume", volume_id, fixed=fix))
        for path, size in self.converter.leftovers(remove=fix):
            findings.append(Finding("scratch-file", "", path=path, size=size, fixed=fix))
        for kind, where, size in left:
            findings.append(Finding(kind, "", path=where, size=size, fixed=fix))
        return findings

    def _dead_leases(self, entries: list[CacheEntry], now: dt.datetime, *,
                     fix: bool) -> list[Finding]:
        """This scope's entries leased by clones that died."""
        def leases_of(entry_id: str) -> list[Lease]:
            return self._read(lambda repo: repo.leases(entry_id, now))

        findings = []
        for entry in entries:
            if entry.scope_key != self.scope.key or not entry.leased(now):
                continue
            dead = [lease for lease in leases_of(entry.id) if self._gone(lease.owner)]
            if not dead:
                continue
            if fix:
                with self._locked() as (repo, _):
                    self._free_dead_leases(repo, dead)
            findings.append(Finding("dead-lease", entry.volume_id, entry.id, entry.image_id,
                                    fix))
        return findings

    def _partial_volumes(self, now: dt.datetime, *, fix: bool) -> list[Finding]:
        """Users' volumes whose writer died mid-write: never complete, never listed."""
        findings = []
        for write in self._writes().values():
            if not self._dead_write(write, now):
                continue
            try:
                size = self.storage.get_volume(write.volume_id).size_gb * GIB
            except VolumeNotFound:
                # Another backend's (the marks are shared), or the writer died before making
                # it: the backend that has the volume reaps the mark with it.
                continue
            if fix:
                self._delete_quietly(write.volume_id)
                with self.uow as uow:
                    uow.entries.end_writing(write.volume_id)
                    uow.commit()
            findings.append(Finding("partial-volume", write.volume_id, size=size, fixed=fix))
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
            volumes = self.storage.list_volumes()
        else:
            volumes = self.storage.list_volumes(owner=ctx.project_id)
        # A volume appears once complete: one being written (or whose writer died) is not.
        writes = self._writes()
        return [v for v in volumes if v.id not in writes]

    def delete_volume(self, ctx: RequestContext, volume_id: str) -> None:
        """Delete a volume; an admin deleting a cache volume also removes its entry (in
        whichever scope the entry is)."""
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

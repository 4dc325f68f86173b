"""Upload a volume to a new image, and cache it on the way (``volume upload``).

Cinder's upload-to-image leaves the cache cold: the first volume made from the new image
downloads the very bytes that were just uploaded from this host. Here the upload makes the
entry itself, in this order:

1. the caller may upload the volume (its owner or an admin; not a cache volume being
   filled);
2. the image source creates the image (queued: its id is known, no byte has moved);
3. the image is claimed in the volume's scope, as a miss claims it (limits, the internal
   tenant's quota, victims); the volume is cloned (copy-on-write where the storage has
   it) into the claimed cache volume, owned by the internal tenant;
4. the bytes are read from that clone (the volume itself when nothing was claimed), as raw
   or converted to qcow2, hashed (sha512 and md5) on their way to the source;
5. once the image is ``active`` and the source's hash of what it stored equals ours, the
   entry becomes READY (``CacheEntryCreated``, ``filled_from: upload``); else the claim and
   its volume go, and the result says why.

Reading from the clone, not the volume, is what makes the entry safe: the clone is what was
hashed, byte for byte, and no one writes it; a volume written to after its clone was taken
changes neither the image nor the entry.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Protocol

import attrs

from ivcache.core.base import ServiceBase
from ivcache.core.errors import InvalidRequest, NoSpace, VolumeNotFound
from ivcache.core.events import UPLOAD, CacheEntryCreated
from ivcache.core.model import (
    GIB,
    CacheEntry,
    EntryState,
    Image,
    NewImage,
    RequestContext,
    Volume,
    VolumeWrite,
    check_id,
)
from ivcache.core.ports import ImageUploader, VolumeData, VolumeExporter

__all__ = ["UPLOAD_FORMATS", "UploadResult", "VolumeUploads"]

#: the disk formats a volume is uploaded as
UPLOAD_FORMATS = ("raw", "qcow2")
#: image statuses from which no image becomes active
_DEAD = frozenset({"killed", "deleted", "pending_delete"})


@attrs.frozen
class UploadResult:
    """What ``upload_volume`` made: the image as the source has it, the bytes sent (and
    their hashes), and whether the cache now holds it (``entry_id``) or why not
    (``reason``)."""

    image: Image
    volume_id: str
    disk_format: str
    size: int
    sha512: str
    md5: str
    cached: bool
    entry_id: str | None = None
    reason: str | None = None


class _Claimed(Protocol):
    """A claim as the request path makes it (``CacheService._claim``)."""

    @property
    def entry(self) -> CacheEntry: ...

    @property
    def victims(self) -> list[CacheEntry]: ...


class _Hashed:
    """The volume's bytes on their way to the source, hashed and counted."""

    def __init__(self, data: VolumeData) -> None:
        self._data = data
        self.sha512 = hashlib.sha512()
        # md5 is Glance's legacy ``checksum``, not a security control.
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._data:
            self.sha512.update(chunk)
            self.md5.update(chunk)
            self.size += len(chunk)
            yield chunk


@attrs.define
class _Run:
    """One upload's state, for the cleanup whichever step fails."""

    volume: Volume
    disk_format: str
    entry: CacheEntry | None = None
    data: VolumeData | None = None
    hashed: _Hashed | None = None
    reason: str | None = None
    #: the heartbeat of the claim, from the claim to the entry's READY or release
    holds: contextlib.ExitStack = attrs.Factory(contextlib.ExitStack)


class VolumeUploads(ServiceBase):
    """``volume upload`` (``CacheService`` is the class to use)."""

    def _claim(self, image: Image) -> _Claimed | None:
        """The request path's claim (``CacheService._claim``)."""
        raise NotImplementedError

    def upload_volume(self, ctx: RequestContext, volume_id: str, *, name: str,
                      disk_format: str = "raw", private: bool = False,
                      as_internal_tenant: bool = False,
                      active_wait_seconds: float = 60.0) -> UploadResult:
        """Upload ``ctx``'s volume as a new image named ``name`` and cache it in this
        scope, so that the next volume made from it is a hit.

        ``disk_format``: ``raw`` or ``qcow2`` (converted on the way out). ``private``: only
        the owner project sees the image (else the source's default visibility).
        ``as_internal_tenant``: the image is owned by the internal tenant, not the caller
        (``image_upload_use_internal_tenant``). ``active_wait_seconds``: how long an image
        that is not yet ``active`` after its upload is waited for.

        Raises ``VolumeNotFound`` for a volume the caller may not see (another project's, a
        cache volume for a user), ``InvalidRequest`` for one being written; the source's
        errors propagate, and the image is then deleted. A full cache is no error: the
        image is made, ``cached`` False and ``reason`` says why.
        """
        attributes: dict[str, str | int | float | bool] = {
            "volume_id": volume_id, "host": self.host, "scope": self.scope.key,
            "disk_format": disk_format}
        with self.tracer.span("ivcache.upload_volume", attributes) as span:
            self.tenant.check_caller(ctx, admin_ok=True)
            if disk_format not in UPLOAD_FORMATS:
                raise InvalidRequest(f"disk format {disk_format!r} is not one of "
                                     f"{', '.join(UPLOAD_FORMATS)}")
            if not name or name != name.strip():
                raise InvalidRequest("give the new image a name (--name), without "
                                     "surrounding spaces")
            uploader, exporter = self._upload_ports()
            run = _Run(self._uploadable(ctx, volume_id), disk_format)
            spec = NewImage(name, disk_format, visibility="private" if private else None)
            owner = self.tenant.context() if as_internal_tenant else ctx
            try:
                try:
                    run.holds.__enter__()
                    image = uploader.upload_image(
                        owner, spec, lambda queued: self._start(run, queued, exporter))
                finally:
                    if run.data is not None:
                        run.data.close()
                image = self._until_active(owner, image, active_wait_seconds)
                entry = self._settle(run, image)
            except BaseException:
                if run.entry is not None:
                    self._release(run.entry)
                raise
            finally:
                run.holds.close()
            span.set_attribute("cached", entry is not None)
        hashed = run.hashed
        assert hashed is not None  # the source read the data, or it raised
        return UploadResult(image, run.volume.id, disk_format, hashed.size,
                            hashed.sha512.hexdigest(), hashed.md5.hexdigest(),
                            entry is not None, entry.id if entry else None, run.reason)

    # ------------------------------------------------------------------ checks

    @contextlib.contextmanager
    def _writing(self, volume_id: str) -> Iterator[None]:
        """Mark a user's volume as being written (an uncached create, whose volume exists
        before its bytes do) for the block: it is not listed, and ``upload_volume`` refuses
        it, meanwhile. The mark is kept alive by the heartbeat; a dead writer's mark, and
        its half-written volume, are reconcile's ``partial-volume``."""
        with self.uow as uow:
            uow.entries.mark_writing(VolumeWrite(volume_id, self._owner(),
                                                 self.heartbeat.until()))
            uow.commit()
        try:
            with self.heartbeat.holding(write=volume_id):
                yield
        finally:
            with self.uow as uow:
                uow.entries.end_writing(volume_id)
                uow.commit()

    def _upload_ports(self) -> tuple[ImageUploader, VolumeExporter]:
        if not isinstance(self.images, ImageUploader):
            raise InvalidRequest(f"this image source ({type(self.images).__name__}) takes "
                                 "no new images: upload to the local source or Glance")
        if not isinstance(self.converter, VolumeExporter):
            raise InvalidRequest("no volume exporter is wired: reading volumes out needs "
                                 "ivcache.adapters.convert.ImagePipeline as the converter")
        return self.images, self.converter

    def _uploadable(self, ctx: RequestContext, volume_id: str) -> Volume:
        volume = self.storage.get_volume(check_id("volume", volume_id))
        if volume.owner != ctx.project_id and not ctx.is_admin:
            # Another project's volume, or a cache volume: a user never learns it exists.
            raise VolumeNotFound(volume_id)
        if volume.owner == self.tenant.project_id:
            entry = self._read(lambda repo: repo.find_by_volume(volume.id))
            if entry is not None and not entry.ready:
                raise InvalidRequest(f"volume {volume.id} is being written (the cache is "
                                     "filling it): upload it once that is done")
        elif self._being_written(volume.id):
            raise InvalidRequest(f"volume {volume.id} is being written (its create is in "
                                 "progress): upload it once that is done")
        return volume

    # ------------------------------------------------------------------ the upload

    def _start(self, run: _Run, queued: Image, exporter: VolumeExporter) -> _Hashed:
        """The image exists (queued): claim it, clone the volume into the claim, and open
        the bytes to send (the clone's, else the volume's)."""
        run.entry, run.reason = self._claim_upload(queued, run.volume, run.holds)
        source = run.entry.volume_id if run.entry is not None else run.volume.id
        run.data = exporter.export(self.storage, source, run.disk_format)
        run.hashed = _Hashed(run.data)
        return run.hashed

    def _claim_upload(self, queued: Image, volume: Volume, holds: contextlib.ExitStack,
                      ) -> tuple[CacheEntry | None, str | None]:
        """Claim the new image in this scope and clone the volume into the claim, whose
        heartbeat ``holds`` keeps; the claimed entry, or None and why not."""
        if not self.policy.enabled:
            return None, "the cache is disabled on this backend (image_volume_cache_enabled)"
        # The image is the volume's bytes: its disk is the volume's size.
        sized = attrs.evolve(queued, virtual_size=volume.size_gb * GIB)
        if not self.policy.fits(sized.min_size_gb):
            return None, (f"the image ({sized.min_size_gb} GiB) is larger than the cache "
                          f"may grow (image_volume_cache_max_size_gb = "
                          f"{self.policy.max_size_gb})")
        claim = self._claim(sized)
        if claim is None:
            return None, ("no room in the cache: its limits or the internal tenant's quota "
                          "leave no room, and no entry may be evicted for it")
        entry = claim.entry
        holds.enter_context(self.heartbeat.holding(claim=entry.id))
        self._drop_volumes(claim.victims, self._room_reason)
        try:
            self.storage.clone_volume(volume.id, entry.volume_id, entry.size_gb,
                                      self.tenant.project_id)
        except NoSpace:
            self._release(entry, created=False)
            return None, "the storage has no room for a cache volume of the image"
        except BaseException:
            self._release(entry, created=False)
            raise
        return entry, None

    def _until_active(self, ctx: RequestContext, image: Image, wait_seconds: float) -> Image:
        """The image once ``active``, or as it is when waiting is pointless or over."""
        deadline = self.clock.now().timestamp() + wait_seconds
        delay = 0.1
        while (image.status != "active" and image.status not in _DEAD
               and self.clock.now().timestamp() < deadline):
            self.clock.sleep(delay)
            delay = min(delay * 2, 2.0)
            image = self.images.get_image(ctx, image.id)
        return image

    def _settle(self, run: _Run, image: Image) -> CacheEntry | None:
        """Make the claimed entry READY if the image is what was sent; else release it and
        say why. The entry, or None."""
        hashed = run.hashed
        assert hashed is not None
        why = _not_the_same(image, hashed)
        if run.entry is None:
            run.reason = run.reason or why
            return None
        if why is not None:
            run.reason = why
            self._release(run.entry)
            run.entry = None
            return None
        with self._locked(run.entry.scope_key) as (repo, _):
            current = repo.get(run.entry.id)
            if current is not None:
                current.state = EntryState.READY
                current.claim_expires = None
                current.last_used = self.clock.now()
                current.image_hash = image.content_hash
                current.image_updated_at = image.updated_at
                repo.save(current)
        if current is None:
            # Taken over (its heartbeat stopped) while the bytes were sent: an orphan.
            self._delete_quietly(run.entry.volume_id)
            run.entry = None
            run.reason = "the claim on the image expired during the upload"
            return None
        run.entry = None  # READY: no longer the upload's to release
        self.notifier.publish(CacheEntryCreated(image.id, self.host, current.id,
                                                current.size_gb, UPLOAD,
                                                scope=current.scope_key))
        return current

    def _release(self, entry: CacheEntry, *, created: bool = True) -> None:
        """Drop a claim the upload made (and its cache volume, if it was made)."""
        with self._locked(entry.scope_key) as (repo, _):
            repo.remove(entry)
        if created:
            with contextlib.suppress(VolumeNotFound):
                self.storage.delete_volume(entry.volume_id)


def _not_the_same(image: Image, hashed: _Hashed) -> str | None:
    """Why the image may not hold the bytes sent (not active, another hash), or None."""
    if image.status != "active":
        return f"image {image.id} is {image.status!r}, not 'active': no entry was made"
    if image.os_hash_algo == "sha512" and image.os_hash_value:
        algo, theirs, ours = "sha512", image.os_hash_value, hashed.sha512.hexdigest()
    elif image.checksum:
        algo, theirs, ours = "md5", image.checksum, hashed.md5.hexdigest()
    else:
        return (f"image {image.id}: the image source gave no sha512 or md5 of what it "
                "stored, so nothing shows it is the volume's bytes: no entry was made")
    if theirs != ours:
        return (f"image {image.id}: the image source's {algo} of what it stored "
                f"({theirs[:16]}...) is not that of the bytes sent ({ours[:16]}...): the "
                "data changed on the way; no entry was made")
    return None

"""The library facade: ivcache without the CLI, with everything the CLI can do.

    from ivcache.entrypoints.library import ImageVolumeCache

    cache = ImageVolumeCache.from_config("ivcache.ini")   # or from_config() for defaults
    image = cache.add_image("disk.raw")                   # local image source only
    first = cache.create_volume(image.id, size_gb=2, project="demo")   # a miss
    second = cache.create_volume(image.id, size_gb=4, project="demo")  # a hit
    print(first.outcome.value, second.outcome.value, cache.stats().hits)

User calls act for ``project`` (and ``user``), or for the caller a ``context=`` names (a
``RequestContext``, with the caller's Keystone token in ``auth_token`` as a storage driver
hands it over from its own request), or for the owner of a Keystone ``token=`` (validated
with Keystone; ``[glance] auth = keystone``)::

    cache.create_volume(image_id, size_gb=10, token=request.auth_token)

Operator calls (entries, evict, prune, warm, pin, reconcile, adopt, stats) act on the cache
of the facade's scope: its host on its backend (``from_config(..., backend="fast")`` with
several ``enabled_backends``).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from ivcache.adapters.processes import LocalProcesses
from ivcache.core.model import (
    CacheEntry,
    CreateResult,
    Image,
    InternalTenant,
    RequestContext,
    ScopeTotals,
    Volume,
)
from ivcache.core.operations import Adoption, Finding
from ivcache.core.policy import CachePolicy
from ivcache.core.ports import (
    Clock,
    ImageConverter,
    ImageSource,
    Notifier,
    Processes,
    StorageBackend,
    Tracer,
    UnitOfWork,
)
from ivcache.core.service import CacheService
from ivcache.core.upload import UploadResult
from ivcache.entrypoints.bootstrap import Wiring, wire
from ivcache.entrypoints.config import Config, load_config

__all__ = ["ImageVolumeCache"]


def _context(project: str, user: str | None, admin: bool) -> RequestContext:
    return RequestContext.for_project(project, user_id=user, admin=admin)


_DEMO = "demo"


class ImageVolumeCache:
    """Create volumes from images through the cache, as one project or as an operator."""

    def __init__(self, service: CacheService, *, wiring: Wiring | None = None) -> None:
        self.service = service
        self._wiring = wiring

    @classmethod
    def from_config(cls, path: str | Path | None = None, *, host: str | None = None,
                    backend: str | None = None) -> ImageVolumeCache:
        """Wire adapters from an INI file (``None``: ``$IVCACHE_CONFIG`` or defaults), for
        ``backend`` (needed when several are enabled and ``[ivcache] backend`` is unset)."""
        config = load_config(path).with_host(host)
        wiring = wire(config, backend=backend)
        return cls(wiring.service, wiring=wiring)

    @classmethod
    def from_adapters(cls, *, host: str, storage: StorageBackend, images: ImageSource,
                      uow: UnitOfWork, notifier: Notifier, policy: CachePolicy | None = None,
                      tenant: InternalTenant | None = None, clock: Clock | None = None,
                      tracer: Tracer | None = None,
                      converter: ImageConverter | None = None,
                      processes: Processes | None = None) -> ImageVolumeCache:
        """Wire your own adapters (any objects that fit the ports in ``ivcache.core.ports``).

        ``converter`` defaults to the core's raw-only pass-through: pass
        ``ivcache.adapters.convert.ImagePipeline(scratch_dir)`` to take every disk format.
        ``processes`` defaults to this machine's (``LocalProcesses``): the claims and
        leases of a process that died here are taken over at once.
        """
        return cls(CacheService(host=host, storage=storage, images=images, uow=uow,
                                notifier=notifier, policy=policy, tenant=tenant, clock=clock,
                                tracer=tracer, converter=converter,
                                processes=processes or LocalProcesses()))

    def close(self) -> None:
        """Let the notifiers deliver what they hold (the bus notifier waits at most
        ``events_drain_seconds``); also done at exit."""
        if self._wiring is not None:
            self._wiring.close()

    def __enter__(self) -> ImageVolumeCache:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def config(self) -> Config | None:
        return self._wiring.config if self._wiring else None

    # -- images ----------------------------------------------------------------------------

    def add_image(self, path: str | Path, *, name: str | None = None,
                  project: str = "demo", private: bool = False, disk_format: str | None = None,
                  container_format: str = "bare") -> Image:
        """Register an image file with the local image source; its format is detected
        (``disk_format``, if given, must be what the data is)."""
        if self._wiring is None:
            raise TypeError("add_image needs a cache built by from_config")
        ctx = _context(project, None, False)
        self.service.tenant.check_caller(ctx)
        return self._wiring.local_images.add_image(
            ctx, Path(path), name=name, visibility="private" if private else "public",
            disk_format=disk_format, container_format=container_format)

    def list_images(self, *, project: str | None = None, user: str | None = None,
                    admin: bool = False, context: RequestContext | None = None,
                    token: str | None = None) -> list[Image]:
        """The images the caller may see."""
        return self.service.images.list_images(
            self._caller(project, user, admin, context, token))

    # -- volumes ---------------------------------------------------------------------------

    def create_volume(self, image_id: str, size_gb: int, *, project: str | None = None,
                      user: str | None = None, context: RequestContext | None = None,
                      token: str | None = None) -> CreateResult:
        """Create a volume from an image through the cache, for ``project`` (default
        ``demo``), for ``context``'s caller, or for the owner of a Keystone ``token``."""
        return self.service.create_volume(
            self._caller(project, user, False, context, token), image_id, size_gb)

    def upload_volume(self, volume_id: str, *, name: str, disk_format: str = "raw",
                      private: bool = False, project: str | None = None,
                      user: str | None = None, admin: bool = False,
                      context: RequestContext | None = None,
                      token: str | None = None) -> UploadResult:
        """Upload the caller's volume as a new image and cache it on the way, so that the
        next volume from it is a hit (``ivcache volume upload``); owned by the internal
        tenant with ``image_upload_use_internal_tenant``."""
        internal = (self._wiring is not None
                    and self._wiring.backend.image_upload_use_internal_tenant)
        return self.service.upload_volume(
            self._caller(project, user, admin, context, token), volume_id, name=name,
            disk_format=disk_format, private=private, as_internal_tenant=internal)

    def get_volume(self, volume_id: str, *, project: str | None = None,
                   admin: bool = False, context: RequestContext | None = None,
                   token: str | None = None) -> Volume:
        return self.service.get_volume(self._caller(project, None, admin, context, token),
                                       volume_id)

    def delete_volume(self, volume_id: str, *, project: str | None = None,
                      admin: bool = False, context: RequestContext | None = None,
                      token: str | None = None) -> None:
        self.service.delete_volume(self._caller(project, None, admin, context, token),
                                   volume_id)

    def list_volumes(self, *, project: str | None = None, admin: bool = False,
                     all_projects: bool = False, context: RequestContext | None = None,
                     token: str | None = None) -> list[Volume]:
        return self.service.list_volumes(self._caller(project, None, admin, context, token),
                                         all_projects=all_projects)

    def _caller(self, project: str | None, user: str | None, admin: bool,
                context: RequestContext | None, token: str | None) -> RequestContext:
        """Who is calling: one of project (and user, admin), context, or token."""
        named = project is not None or user is not None or admin
        if sum((named, context is not None, token is not None)) > 1:
            raise TypeError("say who is calling one way: project (user, admin), context= "
                            "or token=")
        if context is not None:
            return context
        if token is not None:
            if self._wiring is None:
                raise TypeError("token= needs a cache built by from_config (with [glance] "
                                "auth = keystone); here pass context= with auth_token set")
            return self._wiring.context_for_token(token)
        return _context(project or _DEMO, user, admin)

    # -- the cache (operator) ----------------------------------------------------------------

    def entries(self, host: str | None = None) -> list[CacheEntry]:
        """The entries of this backend, made by ``host`` (None: by any host)."""
        return self.service.list_entries(host, backend=self.service.scope.backend)

    def get_entry(self, entry_id: str) -> CacheEntry:
        return self.service.get_entry(entry_id)

    def evict(self, *, image_id: str | None = None, entry_id: str | None = None,
              everything: bool = False) -> list[CacheEntry]:
        return self.service.evict(image_id=image_id, entry_id=entry_id, everything=everything)

    def prune(self) -> list[CacheEntry]:
        return self.service.prune()

    def warm(self, image_id: str) -> CacheEntry:
        """Cache an image ahead of demand, so that the first create is a hit."""
        return self.service.warm(image_id)

    def pin(self, image_id: str) -> CacheEntry:
        return self.service.pin(image_id, True)

    def unpin(self, image_id: str) -> CacheEntry:
        return self.service.pin(image_id, False)

    def reconcile(self, *, fix: bool = False) -> list[Finding]:
        return self.service.reconcile(fix=fix)

    def adopt(self) -> Adoption:
        """Bring this host's entries left in another scope into its own (done on every
        ``from_config`` too)."""
        return self.service.adopt()

    def stats(self, host: str | None = None) -> ScopeTotals:
        return self.service.stats(host)

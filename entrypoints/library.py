"""The library facade: ivcache without the CLI, with everything the CLI can do.

    from ivcache.entrypoints.library import ImageVolumeCache

    cache = ImageVolumeCache.from_config("ivcache.ini")   # or from_config() for defaults
    image = cache.add_image("disk.raw")                   # local image source only
    first = cache.create_volume(image.id, size_gb=2, project="demo")   # a miss
    second = cache.create_volume(image.id, size_gb=4, project="demo")  # a hit
    print(first.outcome.value, second.outcome.value, cache.stats().hits)

User calls act for ``project`` (and ``user``); operator calls (entries, evict, prune, warm,
pin, reconcile, stats) act on the cache of the facade's host.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from ivcache.core.model import (
    CacheEntry,
    CreateResult,
    HostTotals,
    Image,
    InternalTenant,
    RequestContext,
    Volume,
)
from ivcache.core.operations import Finding
from ivcache.core.policy import CachePolicy
from ivcache.core.ports import Clock, ImageSource, Notifier, StorageBackend, Tracer, UnitOfWork
from ivcache.core.service import CacheService
from ivcache.entrypoints.bootstrap import Wiring, wire
from ivcache.entrypoints.config import Config, load_config

__all__ = ["ImageVolumeCache"]


def _context(project: str, user: str | None, admin: bool) -> RequestContext:
    return RequestContext.for_project(project, user_id=user, admin=admin)


class ImageVolumeCache:
    """Create volumes from images through the cache, as one project or as an operator."""

    def __init__(self, service: CacheService, *, wiring: Wiring | None = None) -> None:
        self.service = service
        self._wiring = wiring

    @classmethod
    def from_config(cls, path: str | Path | None = None, *,
                    host: str | None = None) -> ImageVolumeCache:
        """Wire adapters from an INI file (``None``: ``$IVCACHE_CONFIG`` or defaults)."""
        config = load_config(path).with_host(host)
        wiring = wire(config)
        return cls(wiring.service, wiring=wiring)

    @classmethod
    def from_adapters(cls, *, host: str, storage: StorageBackend, images: ImageSource,
                      uow: UnitOfWork, notifier: Notifier, policy: CachePolicy | None = None,
                      tenant: InternalTenant | None = None, clock: Clock | None = None,
                      tracer: Tracer | None = None) -> ImageVolumeCache:
        """Wire your own adapters (any objects that fit the ports in ``ivcache.core.ports``)."""
        return cls(CacheService(host=host, storage=storage, images=images, uow=uow,
                                notifier=notifier, policy=policy, tenant=tenant, clock=clock,
                                tracer=tracer))

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
                  project: str = "demo", private: bool = False) -> Image:
        """Register an image file with the local image source."""
        if self._wiring is None:
            raise TypeError("add_image needs a cache built by from_config")
        return self._wiring.local_images.add_image(
            _context(project, None, False), Path(path), name=name,
            visibility="private" if private else "public")

    def list_images(self, *, project: str = "demo", user: str | None = None,
                    admin: bool = False) -> list[Image]:
        """The images the caller may see."""
        return self.service.images.list_images(_context(project, user, admin))

    # -- volumes ---------------------------------------------------------------------------

    def create_volume(self, image_id: str, size_gb: int, *, project: str = "demo",
                      user: str | None = None) -> CreateResult:
        return self.service.create_volume(_context(project, user, False), image_id, size_gb)

    def get_volume(self, volume_id: str, *, project: str = "demo",
                   admin: bool = False) -> Volume:
        return self.service.get_volume(_context(project, None, admin), volume_id)

    def delete_volume(self, volume_id: str, *, project: str = "demo",
                      admin: bool = False) -> None:
        self.service.delete_volume(_context(project, None, admin), volume_id)

    def list_volumes(self, *, project: str = "demo", admin: bool = False,
                     all_projects: bool = False) -> list[Volume]:
        return self.service.list_volumes(_context(project, None, admin),
                                         all_projects=all_projects)

    # -- the cache (operator) ----------------------------------------------------------------

    def entries(self, host: str | None = None) -> list[CacheEntry]:
        return self.service.list_entries(host)

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

    def stats(self, host: str | None = None) -> HostTotals:
        return self.service.stats(host)

"""The composition root: the only place that knows which adapter serves which port.

One ``CacheService`` serves one scope, that is one backend seen from this host: ``wire``
builds the one of the backend asked for, with its own storage and policy, and names the
other enabled backends as its neighbours (their storage is built only if a miss finds an
entry there to fill from).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
from sqlalchemy import Engine

from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.notify import NullNotifier
from ivcache.adapters.notify.log import LogNotifier
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.core.errors import ConfigError
from ivcache.core.model import Image, RequestContext
from ivcache.core.ports import ImageSource, Notifier, StorageBackend, Tracer
from ivcache.core.service import CacheService, Neighbour, SystemClock
from ivcache.entrypoints.config import IMAGE_SOURCES, STORAGE_KINDS, BackendConfig, Config

__all__ = [
    "Wiring",
    "build_glance",
    "build_images",
    "build_notifier",
    "build_storage",
    "local_images",
    "open_database",
    "wire",
]

Progress = Callable[[str, int], Callable[[int], None]]


@attrs.define
class Wiring:
    """Everything ``wire`` built: the service of one backend and the adapters behind it."""

    config: Config
    service: CacheService
    images: ImageSource
    storage: StorageBackend
    backend: BackendConfig

    @property
    def local_images(self) -> LocalImageSource:
        return local_images(self.config, self.images)


def local_images(config: Config, images: ImageSource) -> LocalImageSource:
    """``images`` if it is the local image source (which ``image add`` needs), else a
    ConfigError saying what to do instead."""
    if not isinstance(images, LocalImageSource):
        raise ConfigError("image add is for the local image source only "
                          f"(image_source = {config.image_source}); upload images "
                          "to Glance with the Glance client")
    return images


def _ensure_dir(path: Path, what: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {what} directory {path}: {exc.strerror}") from exc
    return path


def build_storage(backend: BackendConfig, host: str = "") -> StorageBackend:
    """The storage of ``backend``, as seen from ``host``."""
    path = backend.storage_path
    if backend.storage == "file":
        from ivcache.adapters.storage.file import FileStorage
        return FileStorage(_ensure_dir(path, "storage_path"), host=host)
    if backend.storage == "qcow2":
        from ivcache.adapters.storage.qcow2 import Qcow2Storage
        return Qcow2Storage(_ensure_dir(path, "storage_path"), host=host)
    if backend.storage == "fake-lvm":
        from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
        return FakeLvmStorage(backend.storage_capacity_gb, host=host,
                              state_path=_ensure_dir(path, "storage_path"))
    if backend.storage == "fake-rbd":
        from ivcache.adapters.storage.fake_rbd import FakeRbdStorage
        return FakeRbdStorage(backend.storage_capacity_gb, host=host,
                              state_path=_ensure_dir(path, "storage_path"),
                              max_clone_depth=backend.rbd_max_clone_depth)
    if backend.storage == "rbd":
        from ivcache.adapters.storage.rbd import RbdStorage
        # storage_capacity_gb sizes the fakes' simulated pools; a real pool's room is Ceph's.
        return RbdStorage(backend.rbd_pool, conf=backend.rbd_conf, user=backend.rbd_user,
                          host=host, max_clone_depth=backend.rbd_max_clone_depth)
    raise ConfigError(f"storage = {backend.storage!r} is not one of "
                      f"{', '.join(STORAGE_KINDS)}")


def _storage_when_needed(backend: BackendConfig, host: str) -> Callable[[], StorageBackend]:
    """A neighbour's storage, built on first use and kept: a file backend's commands must
    not wait for (nor fail with) a Ceph cluster they never read."""
    built: list[StorageBackend] = []

    def storage() -> StorageBackend:
        if not built:
            built.append(build_storage(backend, host))
        return built[0]

    return storage


def build_images(config: Config) -> ImageSource:
    if config.image_source == "local":
        return LocalImageSource(_ensure_dir(config.images_path, "images_path"))
    if config.image_source == "glance":
        return build_glance(config)
    raise ConfigError(f"image_source = {config.image_source!r} is not one of "
                      f"{', '.join(IMAGE_SOURCES)}")


def build_glance(config: Config) -> ImageSource:
    try:
        from ivcache.adapters.images.glance import GlanceImageSource
    except ImportError as exc:
        raise ConfigError("image_source = glance needs openstacksdk: pip install "
                          f"'ivcache[glance]' ({exc})") from exc
    g = config.glance
    return GlanceImageSource(url=g.url, os_cloud=g.os_cloud, auth=g.auth, insecure=g.insecure,
                             cafile=g.cafile, connect_timeout=g.connect_timeout,
                             read_timeout=g.read_timeout, retries=g.retries)


def build_notifier(config: Config) -> tuple[Notifier, Tracer | None]:
    if config.notifier == "otel":
        from ivcache.adapters.notify.otel import OtelNotifier
        otel = OtelNotifier()
        return otel, otel
    if config.notifier == "none":
        return NullNotifier(), None
    return LogNotifier(), None


class ProgressImages:
    """An image source whose downloads report progress (for the CLI's progress bar)."""

    def __init__(self, inner: ImageSource, progress: Progress) -> None:
        self.inner = inner
        self.progress = progress

    def get_image(self, ctx: RequestContext, image_id: str) -> Image:
        return self.inner.get_image(ctx, image_id)

    def list_images(self, ctx: RequestContext) -> list[Image]:
        return self.inner.list_images(ctx)

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        image = self.inner.get_image(ctx, image_id)
        chunks = self.inner.open_data(ctx, image_id)
        return self._report(chunks, self.progress(f"downloading {image.name or image_id}",
                                                  image.size))

    @staticmethod
    def _report(chunks: Iterator[bytes], update: Callable[[int], None]) -> Iterator[bytes]:
        for chunk in chunks:
            update(len(chunk))
            yield chunk


def open_database(config: Config) -> Engine:
    """An engine on ``config``'s database, its schema created or upgraded (a no-op when up
    to date); a SQLite file's directory is made first."""
    if config.sqlite_path is not None:
        _ensure_dir(config.sqlite_path.parent, "database")
    engine = make_engine(config.database_url)
    upgrade(engine)
    return engine


def wire(config: Config, *, backend: str | None = None, progress: Progress | None = None,
         adopt: bool = True) -> Wiring:
    """Build the service of ``backend`` (the default one if None: the only one, or
    ``[ivcache] backend``) for ``config``.

    The database schema is created or upgraded here, and the service adopts this host's
    entries that an earlier configuration left in another scope (``CacheService.adopt``):
    a host that joined a cluster brings its entries into the cluster's scope on its next
    run (``adopt`` False: not now, for a caller that adopts itself and reports it).
    """
    chosen = config.backend(backend)
    engine = open_database(config)
    images = build_images(config)
    storage = build_storage(chosen, config.host)
    notifier, tracer = build_notifier(config)
    neighbours = [Neighbour(config.scope(other), _storage_when_needed(other, config.host))
                  for other in config.backends if other is not chosen]
    service = CacheService(
        scope=config.scope(chosen),
        storage=storage,
        images=ProgressImages(images, progress) if progress else images,
        uow=SqlUnitOfWork(engine),
        notifier=notifier,
        policy=chosen.policy,
        tenant=config.tenant,
        clock=SystemClock(),
        tracer=tracer,
        neighbours=neighbours,
    )
    if adopt:
        service.adopt()
    return Wiring(config, service, images, storage, chosen)

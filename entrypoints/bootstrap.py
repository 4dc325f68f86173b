"""The composition root: the only place that knows which adapter serves which port.

One ``CacheService`` serves one scope, that is one backend seen from this host: ``wire``
builds the one of the backend asked for, with its own storage and policy, and names the
other enabled backends as its neighbours (their storage is built only if a miss finds an
entry there to fill from).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from sqlalchemy import Engine

from ivcache.adapters.convert import FormatPolicy, ImagePipeline, QemuImg
from ivcache.adapters.convert.formats import ACCEPTED, CONTAINERS
from ivcache.adapters.faults import EnvFaults
from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.notify import MultiNotifier, NullNotifier
from ivcache.adapters.notify.log import LogNotifier
from ivcache.adapters.notify.otel import MeteredStorage, OtelNotifier
from ivcache.adapters.processes import LocalProcesses
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.outbox import SqlOutbox
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.core.errors import ConfigError, InvalidRequest
from ivcache.core.model import Image, NewImage, RequestContext
from ivcache.core.ports import (
    FileChunks,
    ImageSource,
    ImageUploader,
    Notifier,
    StorageBackend,
    Tracer,
)
from ivcache.core.service import CacheService, Neighbour, SystemClock
from ivcache.entrypoints.config import (
    IMAGE_SOURCES,
    NOTIFIERS,
    STORAGE_KINDS,
    BackendConfig,
    Config,
)

if TYPE_CHECKING:
    from ivcache.adapters.identity.keystone import KeystoneIdentity

__all__ = [
    "CONTAINER_FORMATS",
    "DISK_FORMATS",
    "Wiring",
    "build_converter",
    "build_glance",
    "build_identity",
    "build_images",
    "build_messaging",
    "build_notifier",
    "build_otel",
    "build_storage",
    "close_notifier",
    "local_images",
    "open_database",
    "wire",
]

Progress = Callable[[str, int], Callable[[int], None]]

#: the disk and container formats the image pipeline takes
DISK_FORMATS = tuple(ACCEPTED)
CONTAINER_FORMATS = CONTAINERS


@attrs.define
class Wiring:
    """Everything ``wire`` built: the service of one backend and the adapters behind it."""

    config: Config
    service: CacheService
    images: ImageSource
    storage: StorageBackend
    backend: BackendConfig
    identity: KeystoneIdentity | None = None

    #: the events waiting for the bus, in the cache's database
    outbox: SqlOutbox | None = None
    #: the bus notifier, when there is one (a MessagingNotifier)
    bus: Any = None

    def close(self) -> None:
        """Deliver what the notifiers hold (bounded by ``events_drain_seconds``)."""
        close_notifier(self.service.notifier)

    def context_for_token(self, token: str) -> RequestContext:
        """The caller a Keystone token belongs to, as Keystone says (keystone mode only)."""
        if self.identity is None:
            raise ConfigError("a Keystone token is for image_source = glance with [glance] "
                              f"auth = keystone (here: image_source = "
                              f"{self.config.image_source}, auth = {self.config.glance.auth})")
        return self.identity.context(token)

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
                             read_timeout=g.read_timeout, retries=g.retries,
                             internal=config.tenant.context())


def build_identity(config: Config) -> KeystoneIdentity | None:
    """Who callers are, from their Keystone tokens: only in keystone mode."""
    if not config.keystone_mode:
        return None
    from ivcache.adapters.identity.keystone import KeystoneIdentity
    return KeystoneIdentity(os_cloud=config.keystone_cloud or config.glance.os_cloud,
                            cache_seconds=config.token_cache_seconds)


def build_converter(config: Config) -> ImagePipeline:
    c = config.conversion
    policy = FormatPolicy(conversion_disabled=c.image_conversion_disable,
                          allow_compressed=c.allow_compression_on_image_upload,
                          vmdk_allowed_types=c.vmdk_allowed_types)
    qemu = QemuImg(cpu_seconds=c.image_conversion_cpu_limit,
                   address_space_gb=c.image_conversion_address_space_limit)
    return ImagePipeline(c.image_conversion_dir, policy=policy, qemu=qemu)


def build_notifier(config: Config) -> tuple[Notifier, Tracer | None]:
    """The notifiers ``config.notifiers`` names (one, several combined, or none), and the
    tracer (OpenTelemetry's, when it is one of them)."""
    built: list[Notifier] = []
    tracer: Tracer | None = None
    for name in config.notifiers:
        if name == "log":
            built.append(LogNotifier())
        elif name == "otel":
            otel = build_otel(config)
            built.append(otel)
            tracer = otel
        elif name == "messaging":
            built.append(build_messaging(config))
        else:
            raise ConfigError(f"notifier = {name!r} is not one of {', '.join(NOTIFIERS)}")
    if not built:
        return NullNotifier(), None
    return (built[0] if len(built) == 1 else MultiNotifier(*built)), tracer


def build_otel(config: Config) -> OtelNotifier:
    """OpenTelemetry: on the API's globals, or on an SDK set up for ``otel_exporter``."""
    if config.otel_exporter == "none":
        return OtelNotifier()
    from ivcache.adapters.notify.otel_sdk import build_providers
    tracer_provider, meter_provider, shutdown = build_providers(
        config.otel_exporter, config.otel_endpoint, host=config.host)
    return OtelNotifier(tracer_provider, meter_provider, on_close=shutdown)


def build_messaging(config: Config) -> Notifier:
    """Cinder's notifications on the bus ([oslo_messaging_notifications])."""
    try:
        from ivcache.adapters.notify.messaging import MessagingNotifier
    except ImportError as exc:
        raise ConfigError("notifier = messaging needs oslo.messaging: pip install "
                          f"'ivcache[messaging]' ({exc})") from exc
    m = config.messaging
    # notifier = messaging with the default driver noop still means "to the bus".
    driver = m.driver if m.enabled else ("messagingv2",)
    return MessagingNotifier.connect(transport_url=m.transport_url, host=config.host,
                                     driver=driver, topics=m.topics,
                                     drain_seconds=config.events_drain_seconds)


def close_notifier(notifier: Notifier) -> None:
    """Let notifiers that send in the background deliver what they hold (bounded)."""
    close = getattr(notifier, "close", None)
    if callable(close):
        close()


class ProgressImages:
    """An image source whose downloads report progress (for the CLI's progress bar)."""

    def __init__(self, inner: ImageSource, progress: Progress) -> None:
        self.inner = inner
        self.progress = progress

    def get_image(self, ctx: RequestContext, image_id: str) -> Image:
        return self.inner.get_image(ctx, image_id)

    def list_images(self, ctx: RequestContext) -> list[Image]:
        return self.inner.list_images(ctx)

    def upload_image(self, ctx: RequestContext, spec: NewImage,
                     data: Callable[[Image], Iterable[bytes]]) -> Image:
        if not isinstance(self.inner, ImageUploader):
            raise InvalidRequest(f"this image source ({type(self.inner).__name__}) takes no "
                                 "new images")
        return self.inner.upload_image(ctx, spec, data)

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        image = self.inner.get_image(ctx, image_id)
        chunks = self.inner.open_data(ctx, image_id)
        return _Reported(chunks, self.progress(f"downloading {image.name or image_id}",
                                               image.size))


class _Reported:
    """Chunks that report their progress; a local file's descriptor is passed on, so the
    converter can still read the file in place."""

    def __init__(self, chunks: Iterator[bytes], update: Callable[[int], None]) -> None:
        self._chunks = chunks
        self._update = update

    def __iter__(self) -> _Reported:
        return self

    def __next__(self) -> bytes:
        chunk = next(self._chunks)
        self._update(len(chunk))
        return chunk

    def fileno(self) -> int:
        if not isinstance(self._chunks, FileChunks):
            raise io.UnsupportedOperation("these chunks are not read from a local file")
        return self._chunks.fileno()

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if callable(close):
            close()


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
    # The notifiers first: a bad bus option fails before anything is created.
    notifier, tracer = build_notifier(config)
    engine = open_database(config)
    images = build_images(config)
    storage = build_storage(chosen, config.host)
    metered: StorageBackend = storage
    if isinstance(tracer, OtelNotifier):
        metered = MeteredStorage(storage, tracer, config.host)
    neighbours = [Neighbour(config.scope(other), _storage_when_needed(other, config.host))
                  for other in config.backends if other is not chosen]
    outbox = SqlOutbox(engine)
    bus = next((n for n in getattr(notifier, "notifiers", (notifier,))
                if hasattr(n, "attach_outbox")), None)
    service = CacheService(
        scope=config.scope(chosen),
        storage=metered,
        images=ProgressImages(images, progress) if progress else images,
        # With the bus, each hit, miss and evict is written to the outbox in the
        # transaction of its change (DESIGN §11); without, nothing reads an outbox.
        uow=SqlUnitOfWork(engine, outbox=outbox if bus is not None else None),
        notifier=notifier,
        policy=chosen.policy,
        tenant=config.tenant,
        clock=SystemClock(),
        tracer=tracer,
        converter=build_converter(config),
        neighbours=neighbours,
        faults=EnvFaults(),
        processes=LocalProcesses(),
    )
    if bus is not None:
        # Before anything can announce (adopt may evict).
        bus.attach_outbox(outbox, in_transactions=True)
    if adopt:
        service.adopt()
    if isinstance(tracer, OtelNotifier):
        # The gauges read this scope's totals when the metrics are collected.
        tracer.totals = lambda: [service.stats()]
    return Wiring(config, service, images, storage, chosen, build_identity(config),
                  outbox, bus)

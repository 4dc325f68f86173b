"""The composition root: the only place that knows which adapter serves which port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
from sqlalchemy import Engine

from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.notify import MultiNotifier, NullNotifier
from ivcache.adapters.notify.log import LogNotifier
from ivcache.adapters.notify.otel import MeteredStorage, OtelNotifier
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.outbox import SqlOutbox
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.core.errors import ConfigError
from ivcache.core.model import Image, RequestContext
from ivcache.core.ports import ImageSource, Notifier, StorageBackend, Tracer
from ivcache.core.service import CacheService, SystemClock
from ivcache.entrypoints.config import IMAGE_SOURCES, NOTIFIERS, STORAGE_KINDS, Config

__all__ = [
    "Wiring",
    "build_glance",
    "build_images",
    "build_messaging",
    "build_notifier",
    "build_otel",
    "build_storage",
    "close_notifier",
    "open_database",
    "wire",
]

Progress = Callable[[str, int], Callable[[int], None]]


@attrs.define
class Wiring:
    """Everything ``wire`` built: the service and the adapters behind it."""

    config: Config
    service: CacheService
    images: ImageSource
    storage: StorageBackend
    #: the events waiting for the bus, in the cache's database
    outbox: SqlOutbox | None = None
    #: the bus notifier, when there is one (a MessagingNotifier)
    bus: Any = None

    def close(self) -> None:
        """Deliver what the notifiers hold (bounded by ``events_drain_seconds``)."""
        close_notifier(self.service.notifier)

    @property
    def local_images(self) -> LocalImageSource:
        if not isinstance(self.images, LocalImageSource):
            raise ConfigError("image add is for the local image source only "
                              f"(image_source = {self.config.image_source}); upload images "
                              "to Glance with the Glance client")
        return self.images


def _ensure_dir(path: Path, what: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {what} directory {path}: {exc.strerror}") from exc
    return path


def build_storage(config: Config) -> StorageBackend:
    path = config.storage_path
    if config.storage == "file":
        from ivcache.adapters.storage.file import FileStorage
        return FileStorage(_ensure_dir(path, "storage_path"), host=config.host)
    if config.storage == "qcow2":
        from ivcache.adapters.storage.qcow2 import Qcow2Storage
        return Qcow2Storage(_ensure_dir(path, "storage_path"), host=config.host)
    if config.storage == "fake-lvm":
        from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
        return FakeLvmStorage(config.storage_capacity_gb, host=config.host,
                              state_path=_ensure_dir(path, "storage_path"))
    if config.storage == "fake-rbd":
        from ivcache.adapters.storage.fake_rbd import FakeRbdStorage
        return FakeRbdStorage(config.storage_capacity_gb, host=config.host,
                              state_path=_ensure_dir(path, "storage_path"),
                              max_clone_depth=config.rbd_max_clone_depth)
    if config.storage == "rbd":
        from ivcache.adapters.storage.rbd import RbdStorage
        # storage_capacity_gb sizes the fakes' simulated pools; a real pool's room is Ceph's.
        return RbdStorage(config.rbd_pool, conf=config.rbd_conf, user=config.rbd_user,
                          host=config.host, max_clone_depth=config.rbd_max_clone_depth)
    raise ConfigError(f"storage = {config.storage!r} is not one of {', '.join(STORAGE_KINDS)}")


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


def wire(config: Config, *, progress: Progress | None = None) -> Wiring:
    """Build the service for ``config``: the database schema is created or upgraded here."""
    # The notifiers first: a bad bus option fails before anything is created.
    notifier, tracer = build_notifier(config)
    engine = open_database(config)
    images = build_images(config)
    storage = build_storage(config)
    metered: StorageBackend = storage
    if isinstance(tracer, OtelNotifier):
        metered = MeteredStorage(storage, tracer, config.host)
    service = CacheService(
        host=config.host,
        storage=metered,
        images=ProgressImages(images, progress) if progress else images,
        uow=SqlUnitOfWork(engine),
        notifier=notifier,
        policy=config.policy,
        tenant=config.tenant,
        clock=SystemClock(),
        tracer=tracer,
    )
    if isinstance(tracer, OtelNotifier):
        # The gauges read this host's totals when the metrics are collected.
        tracer.totals = lambda: [service.stats()]
    outbox = SqlOutbox(engine)
    bus = next((n for n in getattr(notifier, "notifiers", (notifier,))
                if hasattr(n, "attach_outbox")), None)
    if bus is not None:
        bus.attach_outbox(outbox)
    return Wiring(config, service, images, storage, outbox, bus)

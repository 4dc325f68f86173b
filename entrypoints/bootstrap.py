"""The composition root: the only place that knows which adapter serves which port."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
from sqlalchemy import Engine

from ivcache.adapters.convert import FormatPolicy, ImagePipeline, QemuImg
from ivcache.adapters.convert.formats import ACCEPTED, CONTAINERS
from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.notify import NullNotifier
from ivcache.adapters.notify.log import LogNotifier
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.core.errors import ConfigError
from ivcache.core.model import Image, RequestContext
from ivcache.core.ports import FileChunks, ImageSource, Notifier, StorageBackend, Tracer
from ivcache.core.service import CacheService, SystemClock
from ivcache.entrypoints.config import IMAGE_SOURCES, STORAGE_KINDS, Config

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
    "build_notifier",
    "build_storage",
    "open_database",
    "wire",
]

Progress = Callable[[str, int], Callable[[int], None]]

#: the disk and container formats the image pipeline takes
DISK_FORMATS = tuple(ACCEPTED)
CONTAINER_FORMATS = CONTAINERS


@attrs.define
class Wiring:
    """Everything ``wire`` built: the service and the adapters behind it."""

    config: Config
    service: CacheService
    images: ImageSource
    storage: StorageBackend
    identity: KeystoneIdentity | None = None

    def context_for_token(self, token: str) -> RequestContext:
        """The caller a Keystone token belongs to, as Keystone says (keystone mode only)."""
        if self.identity is None:
            raise ConfigError("a Keystone token is for image_source = glance with [glance] "
                              f"auth = keystone (here: image_source = "
                              f"{self.config.image_source}, auth = {self.config.glance.auth})")
        return self.identity.context(token)

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


def wire(config: Config, *, progress: Progress | None = None) -> Wiring:
    """Build the service for ``config``: the database schema is created or upgraded here."""
    engine = open_database(config)
    images = build_images(config)
    storage = build_storage(config)
    notifier, tracer = build_notifier(config)
    service = CacheService(
        host=config.host,
        storage=storage,
        images=ProgressImages(images, progress) if progress else images,
        uow=SqlUnitOfWork(engine),
        notifier=notifier,
        policy=config.policy,
        tenant=config.tenant,
        clock=SystemClock(),
        tracer=tracer,
        converter=build_converter(config),
    )
    return Wiring(config, service, images, storage, build_identity(config))

from __future__ import annotations

from collections.abc import Callable

import pytest

from ivcache.adapters.memory import (
    FakeClock,
    InMemoryImageSource,
    InMemoryUnitOfWork,
    RecordingNotifier,
)
from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.core.model import GIB, Image, InternalTenant, RequestContext
from ivcache.core.policy import CachePolicy
from ivcache.core.service import CacheService


class World:
    """One storage host's worth of fakes, and a way to build services on them."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.images = InMemoryImageSource(chunk_size=64 * 1024)
        self.notifier = RecordingNotifier()
        self.uow = InMemoryUnitOfWork()
        self.storages: dict[str, FakeLvmStorage] = {}
        self.alice = RequestContext.for_project("alice")
        self.bob = RequestContext.for_project("bob")
        self.admin = RequestContext.for_project("ops", admin=True)

    def storage(self, host: str = "node-1") -> FakeLvmStorage:
        if host not in self.storages:
            self.storages[host] = FakeLvmStorage(capacity_gb=10_000, host=host)
        return self.storages[host]

    def service(self, *, host: str = "node-1", policy: CachePolicy | None = None,
                tenant: InternalTenant | None = None) -> CacheService:
        return CacheService(host=host, storage=self.storage(host), images=self.images,
                            uow=self.uow, notifier=self.notifier,
                            policy=policy or CachePolicy(), tenant=tenant or InternalTenant(),
                            clock=self.clock)

    def image(self, image_id: str, *, gib: int = 1, data: bytes | None = None,
              owner: str = "alice", visibility: str = "public", **fields: object) -> Image:
        """An image whose virtual size is ``gib`` GiB and whose bytes are ``data``."""
        payload = data if data is not None else (image_id.encode() * 1000)[:4096]
        image = Image(id=image_id, name=image_id, virtual_size=gib * GIB, owner=owner,
                      visibility=visibility, updated_at=self.clock.now(),
                      **fields)  # type: ignore[arg-type]  # test-only passthrough
        return self.images.add(image, payload)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def make_world() -> Callable[[], World]:
    return World

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from ivcache.adapters.memory import (
    FakeClock,
    FakeProcesses,
    InMemoryImageSource,
    InMemoryUnitOfWork,
    RecordingNotifier,
)
from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.core.events import CacheEvict, CacheHit, CacheMiss
from ivcache.core.model import (
    GIB,
    CacheEntry,
    EntryState,
    Image,
    InternalTenant,
    Lease,
    Owner,
    RequestContext,
    Scope,
    new_id,
)
from ivcache.core.policy import CachePolicy
from ivcache.core.ports import ImageConverter
from ivcache.core.service import CacheService

#: The scope of host node-1 on the default backend: what ``World.service()`` speaks for.
NODE_1 = Scope("node-1").key
#: Another process, alive unless a test kills it (``world.processes.kill(OTHER)``).
OTHER = Owner("machine-1", 200, 2)


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
        #: this process is machine-1's pid 100; ``processes.kill(owner)`` makes one gone
        self.processes = FakeProcesses(Owner("machine-1", 100, 1))

    def storage(self, host: str = "node-1") -> FakeLvmStorage:
        if host not in self.storages:
            self.storages[host] = FakeLvmStorage(capacity_gb=10_000, host=host)
        return self.storages[host]

    def service(self, *, host: str = "node-1", policy: CachePolicy | None = None,
                tenant: InternalTenant | None = None,
                converter: ImageConverter | None = None) -> CacheService:
        return CacheService(host=host, storage=self.storage(host), images=self.images,
                            uow=self.uow, notifier=self.notifier,
                            policy=policy or CachePolicy(), tenant=tenant or InternalTenant(),
                            clock=self.clock, converter=converter, processes=self.processes)

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


# -- what the tests look at, and states they set up by hand ---------------------------------

def outcomes_announced(world: World) -> list[str]:
    return [e.name for e in world.notifier.events if isinstance(e, CacheHit | CacheMiss)]


def evictions(world: World) -> list[tuple[str, str]]:
    return [(e.image_id, e.reason.value) for e in world.notifier.of(CacheEvict)
            if isinstance(e, CacheEvict)]


def claim(world: World, image_id: str, expires_in: float,
          owner: Owner = OTHER) -> CacheEntry:
    """Another process's claim, its heartbeat last heard of to run ``expires_in`` more."""
    now = world.clock.now()
    entry = CacheEntry(id="claim-1", host="node-1", image_id=image_id, volume_id="vol-claim",
                       size_gb=1, image_updated_at=now, image_hash=None,
                       state=EntryState.CREATING, created_at=now, last_used=now,
                       claim_expires=now + dt.timedelta(seconds=expires_in),
                       claim_owner=str(owner))
    with world.uow as uow:
        uow.entries.add(entry)
        uow.commit()
    return entry


def lease(world: World, image_id: str, seconds: float, owner: Owner = OTHER) -> Lease:
    """As if another process's clone of the entry's volume were in progress, its heartbeat
    last heard of to run ``seconds`` more."""
    with world.uow as uow:
        entry = uow.entries.find(NODE_1, image_id)
        assert entry is not None
        taken = Lease(new_id(), entry.id, str(owner),
                      world.clock.now() + dt.timedelta(seconds=seconds))
        uow.entries.take_lease(taken)
        uow.commit()
    return taken

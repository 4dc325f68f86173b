"""A random life of one host's cache on the fakes, checked after every step against a plain
model: creates, deletes, evictions, prunes, pins, image updates and deletes, and crashes at
the core's fault points followed by a restart and ``reconcile --fix``.

The model is a few dicts: the images and their bytes, the entries (image, size, bytes,
last use, pinned) and the users' volumes. It predicts each create's outcome and each
step's evictions under the ``lru`` policy; after every step the service's entries, volumes,
totals and events must say the same.

A crash is a SIGKILL as the fakes can play it: at the chosen fault point the fault object
raises ``_Crash`` (a ``BaseException``, so no ``except Exception`` catches it) and marks the
process dead; from then on every call on the unit of work, the repository, the storage and
the notifier raises ``_Crash`` too, so none of the dying process's cleanup runs. The
database's rollback of its open transaction still happens (the unit of work's exit), as a
real database's would. Then a new process starts on the same fakes and must recover
everything by takeover or reconcile.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import attrs
import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import ivcache.core
from ivcache.adapters.memory import (
    FakeClock,
    FakeProcesses,
    InMemoryImageSource,
    InMemoryOutbox,
    InMemoryRepository,
    InMemoryUnitOfWork,
    RecordingNotifier,
)
from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.core.errors import EntryNotFound, ImageNotFound
from ivcache.core.events import CacheEvict, CacheHit, CacheMiss, EvictReason
from ivcache.core.model import (
    GIB,
    CacheEntry,
    EntryState,
    Image,
    InternalTenant,
    Outcome,
    Owner,
    RequestContext,
    new_id,
)
from ivcache.core.policy import CachePolicy
from ivcache.core.ports import UnitOfWork
from ivcache.core.service import CacheService


def _fault_points() -> list[str]:
    """Every ``faults.reached("...")`` point in the core: a point added there is crashed at
    here without touching this test."""
    found: set[str] = set()
    for source in Path(ivcache.core.__file__).parent.glob("*.py"):
        found.update(re.findall(r'faults\.reached\(\s*"([^"]+)"',
                                source.read_text(encoding="utf-8")))
    return sorted(found)


FAULT_POINTS = _fault_points()
#: The points of a create reached before its hit or miss can have been counted (a miss is
#: counted with its entry's READY, a hit when its clone's lease ends).
_BEFORE_THE_COUNT = frozenset({"after-claim", "mid-download", "mid-write"})
IMAGES = ("img-a", "img-b", "img-c", "img-d")
#: Where a crash happens: at a fault point, or before the n-th port call (any call on the
#: unit of work, repository, outbox, storage or notifier).
CRASH = st.one_of(st.sampled_from(FAULT_POINTS), st.integers(1, 20))
COMMANDS = ("evict an image", "evict everything", "prune", "admin delete", "user delete",
            "pin")
#: New limits for a prune: max_count, max_size_gb (0 = unlimited).
LIMITS = st.tuples(st.integers(0, 4), st.integers(0, 8))
#: A crash between a user's volume being made and filled (an uncached create) once left it
#: half-made and listed; its write mark now names its dead writer and reconcile --fix (run
#: after every crash here) deletes it, so such a leftover fails the test. True would
#: tolerate it again (delete it and go on).
LEFTOVER_HALF_MADE_USER_VOLUMES = False
PROJECTS = ("alice", "bob")
HOST = "node-1"
#: The internal tenant's project (its quota is drawn per example).
INTERNAL = InternalTenant().project_id


def _where(crash: str | int) -> str:
    return crash if isinstance(crash, str) else "a port call"


def crashed_process_is_known_dead(processes: FakeProcesses) -> None:
    """From here on, the crashed process counts as dead for the service's takeover rules.

    Claims, clone leases and writes name their owner (machine, pid, start time): the crashed
    owner is provably gone (as a dead pid on this machine), and the process that takes over
    is a new one. (The other rule, an owner on another machine whose heartbeat stopped for
    three beats, is tested in tests/unit/test_owners.py and test_many_workers.py.)
    """
    dead = processes.me()
    processes.kill(dead)
    processes.become(Owner(dead.node, dead.pid + 1, dead.started + 1))


# ---------------------------------------------------------------- a process that can die

class _Crash(BaseException):
    """The process was killed here: nothing after this point runs in it."""


class Process:
    """The process the service runs in: alive, or dead after a ``_Crash``; and, when a test
    asks, the port call before which it dies (``countdown``: the n-th from now)."""

    def __init__(self) -> None:
        self.dead = False
        self.countdown: int | None = None
        # Inside a port's own code (or the database's rollback): its inner calls are not
        # the service's, and are neither counted nor killed.
        self._inside = False

    def check(self) -> None:
        if self.dead:
            raise _Crash("the process is dead")

    def kill(self, where: str) -> NoReturn:
        self.dead = True
        self.countdown = None
        raise _Crash(where)

    def call(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` as the service calls it: the process may die just before."""
        def port_call(*args: Any, **kwargs: Any) -> Any:
            self.check()
            if self.countdown is not None:
                self.countdown -= 1
                if self.countdown <= 0:
                    self.kill(f"before {name}")
            with self.outside():
                return method(*args, **kwargs)
        return port_call

    @property
    def inside(self) -> bool:
        return self._inside

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Run what is not the service's doing (a port's own code; the database rolling
        back a dead connection's transaction), dead or not."""
        dead, inside = self.dead, self._inside
        self.dead, self._inside = False, True
        try:
            yield
        finally:
            self.dead, self._inside = dead, inside


class _Mortal:
    """A port of a process that can die: every public attribute of a dead process's port
    raises ``_Crash``, and each method call may be the one the process dies before."""

    _process: Process

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        process: Process = object.__getattribute__(self, "_process")
        if name.startswith("_") or process.inside:
            return value
        process.check()
        if inspect.ismethod(value):
            return process.call(f"{type(self).__name__}.{name}", value)
        return value


class _MortalRepository(_Mortal, InMemoryRepository):
    def __init__(self, process: Process) -> None:
        self._process = process
        super().__init__()


class _MortalUnitOfWork(_Mortal, InMemoryUnitOfWork):
    def __init__(self, process: Process, repo: InMemoryRepository) -> None:
        self._process = process
        super().__init__(repo)
        self.outbox = _MortalOutbox(process)

    def __enter__(self) -> InMemoryUnitOfWork:
        # ``with`` looks special methods up on the type, past ``__getattribute__``.
        return self._process.call("begin", super().__enter__)()  # type: ignore[no-any-return]

    def __exit__(self, *exc: Any) -> None:
        # The database drops a dead connection's transaction: its rollback still happens.
        with self._process.outside():
            super().__exit__(*exc)


class _MortalOutbox(_Mortal, InMemoryOutbox):
    def __init__(self, process: Process) -> None:
        self._process = process
        super().__init__()


class _MortalStorage(_Mortal, FakeLvmStorage):
    def __init__(self, process: Process) -> None:
        self._process = process
        super().__init__(capacity_gb=10_000, host=HOST)


class _MortalNotifier(_Mortal, RecordingNotifier):
    def __init__(self, process: Process) -> None:
        self._process = process
        super().__init__()


class _Faults:
    """The ``FaultPoints`` port of a crash test: kills the process at the armed point."""

    def __init__(self, process: Process) -> None:
        self._process = process
        self.armed: str | None = None

    def reached(self, point: str) -> None:
        if point == self.armed:
            self.armed = None
            self._process.kill(point)


# ---------------------------------------------------------------- the model

@attrs.define
class _ImageModel:
    gib: int
    data: bytes
    deleted: bool = False


@attrs.define
class _EntryModel:
    size_gb: int
    data: bytes
    last_use: int
    #: the service's id of the entry, so that a new entry of the image is told from it
    entry_id: str
    pinned: bool = False


@attrs.frozen
class _Plan:
    """What a create should do: its outcome (None: ``ImageNotFound``), the entries it
    evicts in order with their reasons, and whether it adds an entry."""

    outcome: Outcome | None
    evicted: tuple[tuple[str, EvictReason], ...] = ()
    adds: bool = False


def _over(policy: CachePolicy, count: int, size_gb: int) -> bool:
    return bool((policy.max_count and count > policy.max_count)
                or (policy.max_size_gb and size_gb > policy.max_size_gb))


class CacheLife(RuleBasedStateMachine):
    """One host's cache, its service rebuilt for every step (a new process after a crash),
    against the model."""

    def __init__(self) -> None:
        super().__init__()
        self.process = Process()
        self.clock = FakeClock()
        self.images = InMemoryImageSource(chunk_size=4096)
        self.notifier = _MortalNotifier(self.process)
        self.uow = self.unit_of_work()
        self.storage = _MortalStorage(self.process)
        self.faults = _Faults(self.process)
        self.processes = FakeProcesses(Owner("model-machine", 1000, 1))
        self.policy = CachePolicy()
        self.tenant = InternalTenant()
        self.versions = 0
        self.tick = 0
        # The model.
        self.model_images: dict[str, _ImageModel] = {}
        self.entries: dict[str, _EntryModel] = {}
        self.user_volumes: dict[str, tuple[str, bytes]] = {}
        self.step_started = self.clock.now()
        self.hits = 0
        self.misses = 0
        #: crashed creates whose hit or miss may have been counted but never announced
        self.counted_unannounced = 0

    # -- the world --------------------------------------------------------------------

    def unit_of_work(self) -> UnitOfWork:
        """The database, as the process sees it (the SQLite variant overrides this)."""
        return _MortalUnitOfWork(self.process, _MortalRepository(self.process))

    def service(self) -> CacheService:
        return CacheService(host=HOST, storage=self.storage, images=self.images, uow=self.uow,
                            notifier=self.notifier, policy=self.policy, tenant=self.tenant,
                            clock=self.clock, faults=self.faults, processes=self.processes)

    def _step(self) -> int:
        """Start a step: one second later than the last one, so that last uses never tie;
        return where this step's events start."""
        self.tick += 1
        self.clock.advance(1)
        self.step_started = self.clock.now()
        return len(self.notifier.events)

    def _evictions_since(self, start: int) -> list[tuple[str, EvictReason]]:
        return [(e.image_id, e.reason) for e in self.notifier.events[start:]
                if isinstance(e, CacheEvict)]

    def _publish_image(self, image_id: str, gib: int, data: bytes) -> None:
        image = Image(id=image_id, name=image_id, virtual_size=gib * GIB, owner="alice",
                      visibility="public", updated_at=self.clock.now())
        self.images.add(image, data)
        self.model_images[image_id] = _ImageModel(gib, data)

    def _new_data(self, image_id: str) -> bytes:
        self.versions += 1
        return (f"{image_id} version {self.versions} ".encode() * 200)[:3000]

    def _real_entries(self) -> dict[str, CacheEntry]:
        return {e.image_id: e for e in self.service().list_entries()}

    # -- the model's predictions ----------------------------------------------------------

    def _lru(self) -> list[str]:
        """The entries that may go to make room, least recently used first."""
        return sorted((i for i, e in self.entries.items() if not e.pinned),
                      key=lambda i: self.entries[i].last_use)

    def _plan_create(self, image_id: str) -> _Plan:
        image = self.model_images[image_id]
        entry = self.entries.get(image_id)
        if image.deleted:
            gone = ((image_id, EvictReason.IMAGE_DELETED),) if entry else ()
            return _Plan(None, gone)
        if entry is not None and entry.data == image.data:
            return _Plan(Outcome.HIT)
        evicted: list[tuple[str, EvictReason]] = []
        if entry is not None:
            evicted.append((image_id, EvictReason.STALE))
        if self.policy.max_size_gb and image.gib > self.policy.max_size_gb:
            return _Plan(Outcome.MISS_UNCACHED, tuple(evicted))
        staying = {i: e for i, e in self.entries.items() if i != image_id}
        count, used = len(staying) + 1, sum(e.size_gb for e in staying.values()) + image.gib
        victims: list[str] = []
        for candidate in (i for i in self._lru() if i != image_id):
            if not _over(self.policy, count, used):
                break
            victims.append(candidate)
            count, used = count - 1, used - staying[candidate].size_gb
        # The internal tenant's quota is asked before anything is evicted for the new entry.
        if _over(self.policy, count, used) or self._over_quota(count, used):
            return _Plan(Outcome.MISS_UNCACHED, tuple(evicted))
        evicted += [(v, EvictReason.LRU) for v in victims]
        return _Plan(Outcome.MISS, tuple(evicted), adds=True)

    def _over_quota(self, count: int, size_gb: int) -> bool:
        tenant = self.tenant
        return bool((tenant.quota_volumes and count > tenant.quota_volumes)
                    or (tenant.quota_gb and size_gb > tenant.quota_gb))

    def _apply(self, image_id: str, plan: _Plan, entry_id: str | None = None) -> None:
        for gone, _ in plan.evicted:
            self.entries.pop(gone, None)
        image = self.model_images[image_id]
        if plan.adds:
            assert entry_id is not None
            self.entries[image_id] = _EntryModel(image.gib, image.data, self.tick, entry_id)
        elif plan.outcome is Outcome.HIT:
            self.entries[image_id].last_use = self.tick

    # -- creating volumes -------------------------------------------------------------------

    def _create(self, image_id: str, extra_gb: int, project: str,
                plan: _Plan | None = None) -> tuple[str, bool]:
        """One create as the model predicts it (or as ``plan`` says), checked; returns the
        volume id asked for and whether the process crashed (armed fault points only)."""
        image = self.model_images[image_id]
        size = image.gib + extra_gb
        volume_id = new_id()
        plan = plan or self._plan_create(image_id)
        start = len(self.notifier.events)
        ctx = RequestContext.for_project(project)
        try:
            result = self.service().create_volume(ctx, image_id, size, volume_id=volume_id)
        except _Crash:
            return volume_id, True
        except ImageNotFound:
            assert plan.outcome is None, f"{image_id} exists, yet: not found"
            assert self._evictions_since(start) == list(plan.evicted)
            self._apply(image_id, plan)
            return volume_id, False
        assert plan.outcome is not None, f"{image_id} was deleted, yet: {result.outcome}"
        assert result.outcome is plan.outcome
        assert self._evictions_since(start) == list(plan.evicted), "not the predicted victims"
        volume = result.volume
        assert (volume.id, volume.size_gb, volume.owner) == (volume_id, size, project)
        self.user_volumes[volume_id] = (project, image.data)
        if plan.outcome is Outcome.HIT:
            self.hits += 1
        else:
            self.misses += 1
        self._apply(image_id, plan, result.entry_id)
        return volume_id, False

    @initialize(sizes=st.lists(st.integers(1, 3), min_size=len(IMAGES), max_size=len(IMAGES)),
                max_count=st.integers(0, 4), max_size_gb=st.integers(0, 8),
                quota_volumes=st.integers(0, 4), quota_gb=st.integers(0, 8))
    def start(self, sizes: list[int], max_count: int, max_size_gb: int, quota_volumes: int,
              quota_gb: int) -> None:
        self.policy = CachePolicy(max_count=max_count, max_size_gb=max_size_gb)
        self.tenant = InternalTenant(quota_gb=quota_gb, quota_volumes=quota_volumes)
        for image_id, gib in zip(IMAGES, sizes, strict=True):
            self._publish_image(image_id, gib, self._new_data(image_id))

    @rule(image_id=st.sampled_from(IMAGES), extra_gb=st.integers(0, 2),
          project=st.sampled_from(PROJECTS))
    def create(self, image_id: str, extra_gb: int, project: str) -> None:
        self._step()
        self._create(image_id, extra_gb, project)

    @rule(image_id=st.sampled_from(IMAGES), extra_gb=st.integers(0, 2),
          project=st.sampled_from(PROJECTS), crash=CRASH, take_over=st.booleans())
    def create_and_crash(self, image_id: str, extra_gb: int, project: str, crash: str | int,
                         take_over: bool) -> None:
        """A create whose process is killed at ``crash`` (a fault point, if its path
        reaches it, or before its n-th port call); a new process then takes the dead one's
        claim over by requesting the same image (``take_over``), or not, and runs
        ``reconcile --fix``."""
        self._step()
        plan = self._plan_create(image_id)
        announced = self.hits + self.misses
        self._arm(crash)
        try:
            volume_id, crashed = self._create(image_id, extra_gb, project)
        finally:
            self._disarm()
        if not crashed:
            return
        event(f"a create crashed at {_where(crash)}{', then taken over' if take_over else ''}")
        assert self.hits + self.misses == announced
        if isinstance(crash, int) or crash not in _BEFORE_THE_COUNT:
            # Its hit or miss may have been counted, with the change it counts, before it
            # died; it was never announced.
            self.counted_unannounced += 1
        self._restart()
        self._sync_entries(may_go={gone for gone, _ in plan.evicted},
                           may_appear=image_id if plan.adds else None, touched=image_id)
        if take_over:
            self._take_over(image_id, extra_gb, project)
        self._reconcile_after_crash()
        image = self.model_images[image_id]
        self._sync_user_volumes(may_appear=(volume_id, project, image.data))

    @rule(command=st.sampled_from(COMMANDS), nth_call=st.integers(1, 8), data=st.data())
    def crash_during_a_command(self, command: str, nth_call: int,
                               data: st.DataObject) -> None:
        """An operator's or user's command whose process dies before its ``nth_call``-th
        port call; a new process runs ``reconcile --fix`` (and the operator repeats a
        prune)."""
        may_go: set[str] = set()
        pinning = may_lose = None
        limits = (0, 0)
        run: Callable[[], None]
        if command == "evict an image":
            image_id = data.draw(st.sampled_from(IMAGES))
            may_go = {image_id}
            run = lambda: self._evict_an_image(image_id)  # noqa: E731
        elif command == "evict everything":
            may_go = set(self.entries)
            run = self._evict_everything
        elif command == "prune":
            limits = data.draw(LIMITS)
            may_go = set(self.entries)
            run = lambda: self._prune(*limits)  # noqa: E731
        elif command == "admin delete" and self.entries:
            image_id = data.draw(st.sampled_from(sorted(self.entries)))
            may_go = {image_id}
            run = lambda: self._admin_delete(image_id)  # noqa: E731
        elif command == "user delete" and self.user_volumes:
            may_lose = data.draw(st.sampled_from(sorted(self.user_volumes)))
            run = lambda: self._delete_users_volume(may_lose)  # noqa: E731
        elif command == "pin":
            pinning = data.draw(st.sampled_from(IMAGES))
            pinned = data.draw(st.booleans())
            run = lambda: self._pin(pinning, pinned)  # noqa: E731
        else:
            return
        self._arm(nth_call)
        try:
            run()
        except _Crash:
            pass
        else:
            return
        finally:
            self._disarm()
        event(f"crashed during {command}")
        self._restart()
        self._sync_entries(may_go=may_go, pinning=pinning)
        self._reconcile_after_crash()
        self._sync_user_volumes(may_lose=may_lose)
        if command == "prune":
            self._prune(*limits)

    def _arm(self, crash: str | int) -> None:
        if isinstance(crash, str):
            self.faults.armed = crash
        else:
            self.process.countdown = crash

    def _disarm(self) -> None:
        self.faults.armed = None
        self.process.countdown = None

    def _restart(self) -> None:
        """A new process, on the same database and storage, once the dead one is known to
        be dead."""
        self.process.dead = False
        crashed_process_is_known_dead(self.processes)

    def _sync_entries(self, *, may_go: set[str], may_appear: str | None = None,
                      touched: str | None = None, pinning: str | None = None) -> None:
        """Take into the model what the crash may or may not have done before it died:
        entries of ``may_go`` gone, a READY entry of ``may_appear`` made, the entry of
        ``touched`` used, the entry of ``pinning`` (un)pinned. Anything else is a loss."""
        real = self._real_entries()
        for image_id, entry in list(self.entries.items()):
            found = real.get(image_id)
            if found is None or found.id != entry.entry_id:
                assert image_id in may_go, f"the crash lost the entry of {image_id}"
                del self.entries[image_id]
                continue
            if found.pinned != entry.pinned:
                assert image_id == pinning, f"the crash (un)pinned {image_id}"
                entry.pinned = found.pinned
            if image_id == touched and found.last_used >= self.step_started:
                entry.last_use = self.tick
        for image_id, found in real.items():
            if found.state is EntryState.READY and image_id not in self.entries:
                assert image_id == may_appear, f"the crash made an entry of {image_id}"
                image = self.model_images[image_id]
                self.entries[image_id] = _EntryModel(image.gib, image.data, self.tick,
                                                     found.id)

    def _sync_user_volumes(self, *, may_lose: str | None = None,
                           may_appear: tuple[str, str, bytes] | None = None) -> None:
        """Take into the model the user's volume that the crash may have deleted
        (``may_lose``) or made (``may_appear``: its id, project and bytes)."""
        volumes = {v.id for v in self.storage.list_volumes() if v.owner != INTERNAL}
        for volume_id in set(self.user_volumes) - volumes:
            assert volume_id == may_lose, f"the crash lost the user's volume {volume_id}"
            del self.user_volumes[volume_id]
        for volume_id in volumes - set(self.user_volumes):
            assert may_appear is not None and volume_id == may_appear[0], volume_id
            _, project, data = may_appear
            if self.storage.read(volume_id, 0, len(data)) == data:
                # Whole, though its create never returned: the user was never told of it.
                event("a crashed create left a whole user volume")
                self.user_volumes[volume_id] = (project, data)
                continue
            assert LEFTOVER_HALF_MADE_USER_VOLUMES, (
                f"the crashed create left a half-made user volume {volume_id}")
            event("a crashed create left a half-made user volume")
            self.storage.delete_volume(volume_id)

    def _take_over(self, image_id: str, extra_gb: int, project: str) -> None:
        """The next request for the image, by the new process: the dead claim is taken
        over (an eviction, reason ``reconcile``), then the request goes on as predicted."""
        claim = self._real_entries().get(image_id)
        plan = self._plan_create(image_id)
        if claim is not None and claim.state is EntryState.CREATING:
            # The model never held the claim: what follows is as if it were not there.
            plan = attrs.evolve(plan, evicted=((image_id, EvictReason.RECONCILE),
                                               *plan.evicted))
        self._step()
        self._create(image_id, extra_gb, project, plan)

    def _reconcile_after_crash(self) -> None:
        """``reconcile --fix`` reports every dead claim, dead clone's lease, half-written
        user's volume and orphan cache volume the crash left, and repairs each."""
        service = self.service()
        entries = service.list_entries()
        claims = {e.volume_id for e in entries if e.state is EntryState.CREATING}
        owned = {e.volume_id for e in entries}
        orphans = {v.id for v in self.storage.list_volumes(owner=INTERNAL)} - owned
        dead = {str(owner) for owner in self.processes.dead}
        now = self.clock.now()
        with self.uow as uow:
            leased = {e.volume_id for e in entries if e.state is EntryState.READY
                      and any(lease.owner in dead for lease in uow.entries.leases(e.id, now))}
            marked = {w.volume_id for w in uow.entries.writes() if w.owner in dead}
        partial = marked & {v.id for v in self.storage.list_volumes()}
        findings = service.reconcile(fix=True)
        assert {f.volume_id for f in findings} == claims | orphans | leased | partial, findings
        assert all(f.fixed for f in findings), findings

    # -- the other steps -------------------------------------------------------------------

    @precondition(lambda self: bool(self.user_volumes))
    @rule(data=st.data())
    def delete_a_users_volume(self, data: st.DataObject) -> None:
        self._delete_users_volume(data.draw(st.sampled_from(sorted(self.user_volumes))))

    def _delete_users_volume(self, volume_id: str) -> None:
        start = self._step()
        project, _ = self.user_volumes[volume_id]
        self.service().delete_volume(RequestContext.for_project(project), volume_id)
        del self.user_volumes[volume_id]
        assert self._evictions_since(start) == []

    @precondition(lambda self: bool(self.entries))
    @rule(data=st.data())
    def admin_deletes_a_cache_volume(self, data: st.DataObject) -> None:
        self._admin_delete(data.draw(st.sampled_from(sorted(self.entries))))

    def _admin_delete(self, image_id: str) -> None:
        start = self._step()
        volume_id = self._real_entries()[image_id].volume_id
        admin = RequestContext.for_project("ops", admin=True)
        self.service().delete_volume(admin, volume_id)
        del self.entries[image_id]
        assert self._evictions_since(start) == [(image_id, EvictReason.ADMIN)]

    @rule(image_id=st.sampled_from(IMAGES))
    def evict_an_image(self, image_id: str) -> None:
        self._evict_an_image(image_id)

    def _evict_an_image(self, image_id: str) -> None:
        start = self._step()
        if image_id not in self.entries:
            with contextlib.suppress(EntryNotFound):
                self.service().evict(image_id=image_id)
                raise AssertionError(f"evicted {image_id}, which has no entry")
            return
        self.service().evict(image_id=image_id)
        del self.entries[image_id]
        assert self._evictions_since(start) == [(image_id, EvictReason.ADMIN)]

    @rule()
    def evict_everything(self) -> None:
        self._evict_everything()

    def _evict_everything(self) -> None:
        start = self._step()
        self.service().evict(everything=True)
        expected = sorted(self.entries, key=lambda i: self.entries[i].last_use)
        self.entries.clear()
        assert self._evictions_since(start) == [(i, EvictReason.ADMIN) for i in expected]

    @rule(limits=LIMITS)
    def prune_after_changing_the_limits(self, limits: tuple[int, int]) -> None:
        self._prune(*limits)

    def _prune(self, max_count: int, max_size_gb: int) -> None:
        start = self._step()
        self.policy = CachePolicy(max_count=max_count, max_size_gb=max_size_gb)
        count, used = len(self.entries), sum(e.size_gb for e in self.entries.values())
        victims: list[str] = []
        for candidate in self._lru():
            if not _over(self.policy, count, used):
                break
            victims.append(candidate)
            count, used = count - 1, used - self.entries[candidate].size_gb
        gone = self.service().prune()
        assert [e.image_id for e in gone] == victims
        assert self._evictions_since(start) == [(v, EvictReason.LRU) for v in victims]
        for victim in victims:
            del self.entries[victim]

    @rule(image_id=st.sampled_from(IMAGES), pinned=st.booleans())
    def pin_or_unpin(self, image_id: str, pinned: bool) -> None:
        self._pin(image_id, pinned)

    def _pin(self, image_id: str, pinned: bool) -> None:
        self._step()
        if image_id not in self.entries:
            with contextlib.suppress(EntryNotFound):
                self.service().pin(image_id, pinned)
                raise AssertionError(f"pinned {image_id}, which has no entry")
            return
        self.service().pin(image_id, pinned)
        self.entries[image_id].pinned = pinned

    @rule(image_id=st.sampled_from(IMAGES), new_bytes=st.booleans())
    def update_an_image(self, image_id: str, new_bytes: bool) -> None:
        """New bytes (its entry is stale now), or only new metadata (its entry stays); a
        deleted image comes back with new bytes."""
        self._step()
        image = self.model_images[image_id]
        data = self._new_data(image_id) if new_bytes or image.deleted else image.data
        self._publish_image(image_id, image.gib, data)

    @rule(image_id=st.sampled_from(IMAGES))
    def delete_an_image(self, image_id: str) -> None:
        self._step()
        self.images.images.pop(image_id, None)
        self.model_images[image_id].deleted = True

    # -- after every step --------------------------------------------------------------------

    @invariant()
    def the_cache_is_what_the_model_says(self) -> None:
        service = self.service()
        real = self._real_entries()
        assert {i: (e.size_gb, e.pinned) for i, e in real.items()} == {
            i: (e.size_gb, e.pinned) for i, e in self.entries.items()}
        # LRU order: the model's last uses, in the same order as the service's.
        assert sorted(real, key=lambda i: (real[i].last_used, i)) == sorted(
            self.entries, key=lambda i: self.entries[i].last_use)
        now = self.clock.now()
        for image_id, entry in real.items():
            # Nobody waits for the dead: no claim or lease outlives its step.
            assert entry.state is EntryState.READY, entry
            assert not entry.leased(now), entry
            volume = self.storage.get_volume(entry.volume_id)
            assert (volume.owner, volume.size_gb) == (INTERNAL, entry.size_gb)
            data = self.entries[image_id].data
            assert self.storage.read(entry.volume_id, 0, len(data)) == data
        totals = service.stats()
        assert (totals.count, totals.size_gb) == (
            len(real), sum(e.size_gb for e in real.values()))

    @invariant()
    def the_limits_and_the_quota_hold(self) -> None:
        entries = list(self.service().list_entries())
        count, size_gb = len(entries), sum(e.size_gb for e in entries)
        # Lowered limits that a prune cannot reach again: only pinned entries may stay.
        if _over(self.policy, count, size_gb):
            assert all(e.pinned for e in entries), "over the limits with unpinned entries"
        assert not self._over_quota(count, size_gb), "over the internal tenant's quota"

    @invariant()
    def no_users_volume_is_lost_and_no_volume_is_unaccounted_for(self) -> None:
        owned = {e.volume_id for e in self._real_entries().values()}
        volumes = {v.id: v for v in self.storage.list_volumes()}
        assert {i for i, v in volumes.items() if v.owner == INTERNAL} == owned
        assert {i for i, v in volumes.items() if v.owner != INTERNAL} == set(
            self.user_volumes)
        for volume_id, (project, data) in self.user_volumes.items():
            assert volumes[volume_id].owner == project
            assert self.storage.read(volume_id, 0, len(data)) == data

    @invariant()
    def each_completed_create_announced_and_counted_one_hit_or_miss(self) -> None:
        hits = [e for e in self.notifier.events if isinstance(e, CacheHit)]
        misses = [e for e in self.notifier.events if isinstance(e, CacheMiss)]
        assert (len(hits), len(misses)) == (self.hits, self.misses)
        totals = self.service().stats()
        counted = totals.hits + totals.misses - self.hits - self.misses
        assert 0 <= counted <= self.counted_unannounced, (totals, self.hits, self.misses)
        if not self.counted_unannounced:
            assert (totals.hits, totals.misses) == (self.hits, self.misses)

    @invariant()
    def reconcile_finds_nothing_in_a_healthy_cache(self) -> None:
        assert self.service().reconcile() == []


#: ``IVCACHE_MODEL_EXAMPLES=5000`` for a long hunt (docs/development.md); make test runs 150.
EXAMPLES = int(os.environ.get("IVCACHE_MODEL_EXAMPLES", "150"))

CacheLife.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=30, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestARandomLifeOfTheCacheWithCrashesKeepsEveryPromise = CacheLife.TestCase

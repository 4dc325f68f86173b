"""Nobody waits for the dead: claims, leases and writes name their owner, a heartbeat keeps
a live owner's alive, and a dead owner's are taken over at once (or, on another machine,
after three silent beats)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from ivcache.adapters.memory import InMemoryImageSource
from ivcache.adapters.processes import LocalProcesses
from ivcache.core.base import Heartbeat, SystemClock
from ivcache.core.model import Outcome, Owner, RequestContext, VolumeWrite
from ivcache.core.policy import CachePolicy
from ivcache.core.service import CacheService
from tests.unit.conftest import OTHER, World, claim, evictions, lease

# ---------------------------------------------------------------- owners


def test_an_owner_reads_back_from_its_text_and_older_rows_name_none() -> None:
    owner = Owner("compute-1.example.org", 4242, 987654)
    assert str(owner) == "compute-1.example.org:4242.987654"
    assert Owner.parse(str(owner)) == owner
    assert Owner.parse("host:with:colons:12.34") == Owner("host:with:colons", 12, 34)
    assert Owner.parse("node:12") == Owner("node", 12, 0)
    for text in ("", "node-1", ":12.3", "node:abc.1", "node:1.x"):
        assert Owner.parse(text) is None


def test_local_processes_tell_a_dead_or_reused_pid_and_never_judge_another_machine() -> None:
    processes = LocalProcesses("this-machine")
    me = processes.me()
    assert (me.node, me.pid) == ("this-machine", os.getpid()) and me.started > 0
    assert not processes.gone(me)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child_owner = Owner("this-machine", child.pid, 0)
    child.wait()
    assert processes.gone(child_owner)  # dead (and reaped)
    # A live pid with another start time: the pid was used again by another process.
    assert processes.gone(Owner("this-machine", os.getpid(), me.started + 1))
    assert not processes.gone(Owner("another-machine", child.pid, 0))


# ---------------------------------------------------------------- claims


def test_a_claim_whose_owner_is_provably_gone_is_taken_over_at_once(world: World) -> None:
    world.image("img")
    claim(world, "img", expires_in=3600)  # its heartbeat would have kept it for an hour
    world.storage().create_volume("vol-claim", 1, "internal")  # its half-made volume
    world.processes.kill(OTHER)
    started = world.clock.now()
    result = world.service().create_volume(world.alice, "img", 1)
    assert result.outcome is Outcome.MISS
    assert world.clock.now() == started  # no waiting of any kind
    [entry] = world.service().list_entries()
    assert entry.id != "claim-1" and entry.ready
    assert "vol-claim" not in {v.id for v in world.storage().list_volumes()}
    assert ("img", "reconcile") in evictions(world)


def test_a_live_owners_claim_is_waited_for_never_taken_over(world: World) -> None:
    world.image("img")
    claim(world, "img", expires_in=3600)
    result = world.service(policy=CachePolicy(claim_wait_seconds=2)).create_volume(
        world.alice, "img", 1)
    assert result.outcome is Outcome.MISS_UNCACHED
    [entry] = world.service().list_entries()
    assert entry.id == "claim-1"


def test_a_claim_not_heard_of_for_three_beats_is_taken_over(world: World) -> None:
    # An owner on another machine: nothing here can tell it died but its silent heartbeat.
    world.image("img")
    claim(world, "img", expires_in=15, owner=Owner("another-machine", 7, 7))
    world.clock.advance(15)
    assert world.service().create_volume(world.alice, "img", 1).outcome is Outcome.MISS


def test_a_claim_names_its_owner_and_runs_three_beats_ahead(world: World) -> None:
    seen = []

    class Watching(InMemoryImageSource):
        def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
            seen.append(world.service().list_entries())
            return super().open_data(ctx, image_id)

    world.images = Watching()
    world.image("img")
    now = world.clock.now()
    world.service(policy=CachePolicy(claim_heartbeat_seconds=2)).create_volume(
        world.alice, "img", 1)
    [[entry]] = seen
    assert entry.claim_owner == "machine-1:100.1"
    assert entry.claim_expires == now + dt.timedelta(seconds=6)


def _slow_source(release: threading.Event, started: threading.Event) -> InMemoryImageSource:
    """A source whose first download, once its volume is made and its bytes begin to flow,
    waits for ``release``."""

    class Slow(InMemoryImageSource):
        def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
            chunks = super().open_data(ctx, image_id)
            if started.is_set():
                return chunks

            def slowly() -> Iterator[bytes]:
                started.set()
                assert release.wait(30)
                yield from chunks

            return slowly()

    return Slow()


def test_the_heartbeat_keeps_a_slow_live_download_from_ever_being_taken_over(
        world: World) -> None:
    # Real time: beats every 50 ms, so a silent claim would be dead after 150 ms; the
    # download takes a second, and another request waits for it 400 ms.
    release, started = threading.Event(), threading.Event()
    world.images = _slow_source(release, started)
    world.image("img")
    policy = CachePolicy(claim_heartbeat_seconds=0.05, claim_wait_seconds=0.4)

    def service() -> CacheService:
        return CacheService(host="node-1", storage=world.storage(), images=world.images,
                            uow=world.uow, notifier=world.notifier, policy=policy,
                            clock=SystemClock(), processes=world.processes)

    results: list[Outcome] = []
    owner = threading.Thread(
        target=lambda: results.append(service().create_volume(world.alice, "img", 1).outcome))
    owner.start()
    assert started.wait(10)
    time.sleep(0.6)
    assert service().create_volume(world.alice, "img", 1).outcome is Outcome.MISS_UNCACHED
    release.set()
    owner.join(10)
    assert results == [Outcome.MISS]
    [entry] = world.service().list_entries()
    assert entry.ready


# ---------------------------------------------------------------- leases


def test_a_dead_clones_lease_keeps_no_eviction_off_its_entry(world: World) -> None:
    world.image("a")
    world.image("b")
    service = world.service(policy=CachePolicy(max_count=1))
    service.create_volume(world.alice, "a", 1)
    lease(world, "a", 3600)
    world.processes.kill(OTHER)
    # Making room takes it: the lease's owner is gone.
    assert service.create_volume(world.alice, "b", 1).outcome is Outcome.MISS
    assert [e.image_id for e in service.list_entries()] == ["b"]
    assert ("a", "lru") in evictions(world)


def test_a_dead_clones_lease_keeps_neither_an_admin_eviction_nor_a_delete_off(
        world: World) -> None:
    service = world.service()
    for name in ("a", "b"):
        world.image(name)
        service.create_volume(world.alice, name, 1)
        lease(world, name, 3600)
    [_, b] = sorted(service.list_entries(), key=lambda e: e.image_id)
    assert service.evict(everything=True) == []  # both being read by a live clone
    world.processes.kill(OTHER)
    assert [e.image_id for e in service.evict(image_id="a")] == ["a"]
    service.delete_volume(world.admin, b.volume_id)
    assert service.list_entries() == []


def test_the_first_clone_to_end_leaves_the_other_clones_lease_standing(
        world: World) -> None:
    service = world.service()
    world.image("img")
    service.create_volume(world.alice, "img", 1)
    theirs = lease(world, "img", 60)
    mine = lease(world, "img", 300, owner=Owner("machine-1", 100, 1))
    [entry] = service.list_entries()
    service._end_lease(entry, mine)
    assert service.evict(everything=True) == []  # theirs still reads it
    service._end_lease(entry, theirs)
    assert [e.image_id for e in service.evict(everything=True)] == ["img"]


# ---------------------------------------------------------------- the heartbeat itself


def test_a_heartbeat_beats_for_what_is_held_and_stops_when_nothing_is() -> None:
    beats: list[tuple[str, list[str], list[str], list[str]]] = []
    failing = [True]

    def beat(owner: str, until: dt.datetime, claims: list[str], leases: list[str],
             writes: list[str]) -> None:
        if failing[0]:
            failing[0] = False
            raise OSError("the database is away")  # skipped: the next beat goes on
        beats.append((owner, claims, leases, writes))

    heart = Heartbeat(beat, SystemClock(), lambda: "me:1.1", every=0.02)
    with heart.holding(claim="c1"), heart.holding(lease="l1", write="v1"):
        time.sleep(0.2)
    assert len(beats) >= 2
    assert beats[-1] == ("me:1.1", ["c1"], ["l1"], ["v1"])
    time.sleep(0.1)
    after = len(beats)
    time.sleep(0.1)
    assert len(beats) == after  # nothing held: no beat, and a beat later no thread either
    assert heart._thread is None


# ---------------------------------------------------------------- writes and reconcile


def test_a_users_volume_is_listed_only_once_its_bytes_are_written(world: World) -> None:
    release, started = threading.Event(), threading.Event()
    world.images = _slow_source(release, started)
    world.image("img")
    service = world.service(policy=CachePolicy(enabled=False))
    creator = threading.Thread(
        target=lambda: service.create_volume(world.alice, "img", 1, volume_id="vol-1"))
    creator.start()
    try:
        assert started.wait(10)
        assert "vol-1" in {v.id for v in world.storage().list_volumes()}  # made, not full
        assert service.list_volumes(world.alice) == []
        assert service.list_volumes(world.admin, all_projects=True) == []
    finally:
        release.set()
        creator.join(10)
    assert [v.id for v in service.list_volumes(world.alice)] == ["vol-1"]


def test_reconcile_finds_dead_claims_leases_and_half_written_volumes_and_fixes_them_once(
        world: World) -> None:
    service = world.service()
    for name in ("a", "b"):
        world.image(name)
        service.create_volume(world.alice, name, 1)
    lease(world, "a", 3600)  # a dead clone's
    live = lease(world, "b", 3600, owner=Owner("machine-1", 300, 3))  # a live one's
    world.image("c")
    claim(world, "c", expires_in=3600)
    world.storage().create_volume("vol-claim", 1, "internal")
    # An uncached create killed mid-write: its volume exists, its mark stays.
    world.storage().create_volume("half", 2, "alice")
    with world.uow as uow:
        uow.entries.mark_writing(VolumeWrite("half", str(OTHER), world.clock.now()
                                             + dt.timedelta(hours=1)))
        uow.commit()
    assert "half" not in {v.id for v in service.list_volumes(world.alice)}
    assert service.reconcile() == []  # their owner lives: nothing is anybody's to fix

    world.processes.kill(OTHER)
    found = {(f.kind, f.volume_id, f.size) for f in service.reconcile()}
    [a] = [e for e in service.list_entries() if e.image_id == "a"]
    assert found == {("dead-claim", "vol-claim", None), ("dead-lease", a.volume_id, None),
                     ("partial-volume", "half", 2 * 1024**3)}
    assert all(f.fixed for f in service.reconcile(fix=True))
    assert service.reconcile(fix=True) == []  # idempotent
    assert "half" not in {v.id for v in world.storage().list_volumes()}
    assert "vol-claim" not in {v.id for v in world.storage().list_volumes()}
    with world.uow as uow:
        [b] = [e for e in uow.entries.list() if e.image_id == "b"]
        assert uow.entries.leases(b.id, world.clock.now()) == [live]
        assert uow.entries.leases(a.id, world.clock.now()) == []
    assert service.create_volume(world.alice, "c", 1).outcome is Outcome.MISS


@pytest.mark.parametrize("seconds", [0, -1, float("inf"), float("nan")])
def test_a_heartbeat_must_be_a_positive_finite_number_of_seconds(seconds: float) -> None:
    with pytest.raises(ValueError, match="claim_heartbeat_seconds"):
        CachePolicy(claim_heartbeat_seconds=seconds)

"""Many workers, many hosts, one database: single flight and exact limits under real
concurrency, on SQLite and on PostgreSQL.

Workers are threads of one process and spawned processes, each a real ``CacheService`` on the
SQL repository, ``FileStorage`` and a local image source that trickles its bytes out so that
the requests really overlap a download (see ``tests/support/flight.py``).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest
from sqlalchemy import Engine

from ivcache.adapters.sql import SqlUnitOfWork, make_engine, upgrade
from ivcache.core.model import CacheEntry, EntryState, ScopeTotals
from ivcache.core.service import CacheService
from tests.support.flight import (
    CTX,
    Result,
    Watcher,
    World,
    add_tiny_images,
    run_processes,
    run_threads,
    start_process,
)
from tests.support.scopes import scope_of


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ivcache.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> World:
    return World(url=db_url, root=tmp_path / "world")


def totals(engine: Engine, host: str) -> ScopeTotals:
    uow = SqlUnitOfWork(engine)
    with uow:
        return uow.entries.totals(scope_of(host))


def outcomes_by_host(results: list[Result]) -> dict[str, list[str]]:
    by_host: dict[str, list[str]] = collections.defaultdict(list)
    for r in results:
        by_host[r.host].append(r.outcome)
    return {host: sorted(found) for host, found in by_host.items()}


# -- single flight -----------------------------------------------------------------------------

def test_eight_threads_missing_one_image_download_it_once_and_seven_are_served_as_hits(
        world: World, engine: Engine) -> None:
    [image] = add_tiny_images(world, [1])
    results = run_threads(world, "node-1", [(image, 1)] * 8)
    assert outcomes_by_host(results) == {"node-1": ["hit"] * 7 + ["miss"]}
    assert len(world.downloads()) == 1
    assert len({r.entry_id for r in results}) == 1
    stats = totals(engine, "node-1")
    assert (stats.count, stats.downloads, stats.hits, stats.misses) == (1, 1, 7, 1)


def test_processes_on_two_hosts_sharing_the_database_download_once_per_host(
        world: World, engine: Engine) -> None:
    [image] = add_tiny_images(world, [1])
    workers = [(host, [(image, 1)] * 2) for host in ("node-a", "node-b", "node-a", "node-b")]
    results = run_processes(world, workers)
    assert outcomes_by_host(results) == {"node-a": ["hit"] * 3 + ["miss"],
                                         "node-b": ["hit"] * 3 + ["miss"]}
    assert len({r.pid for r in results}) == 4
    # One download per host, by whichever process won that host's claim.
    assert len(world.downloads()) == 2
    uow = SqlUnitOfWork(engine)
    with uow:
        entries = uow.entries.list()
    assert sorted((e.host, e.image_id, e.state) for e in entries) == [
        ("node-a", image, EntryState.READY), ("node-b", image, EntryState.READY)]
    for host in ("node-a", "node-b"):
        stats = totals(engine, host)
        assert (stats.count, stats.downloads, stats.hits, stats.misses) == (1, 1, 3, 1)


def _killed_mid_download(world: World, engine: Engine, image: str) -> CacheEntry:
    """Start a worker downloading ``image`` (~8 s: 0.5 s per 64 KiB), SIGKILL it midway;
    its claim."""
    owner = start_process(attrs.evolve(world, delay=0.5), "node-1", [(image, 1)])
    try:
        uow = SqlUnitOfWork(engine)
        deadline = time.monotonic() + 30
        while not world.downloads():
            assert time.monotonic() < deadline, "the owner never started its download"
            time.sleep(0.02)
        with uow:
            claim = uow.entries.find(scope_of("node-1"), image)
        assert claim is not None and claim.state is EntryState.CREATING
        assert claim.claim_owner is not None and f":{owner.pid}." in claim.claim_owner
    finally:
        owner.kill()  # SIGKILL: no cleanup of any kind
        owner.join()
    return claim


def _served_after(world: World, engine: Engine, image: str, claim: CacheEntry) -> float:
    started = time.monotonic()
    [result] = run_threads(world, "node-1", [(image, 1)])
    waited = time.monotonic() - started
    assert result.outcome == "miss"
    with SqlUnitOfWork(engine) as uow:
        [entry] = uow.entries.list()
    assert entry.id != claim.id and entry.state is EntryState.READY
    assert totals(engine, "node-1").count == 1
    # The dead owner's half-written volume went with its claim.
    volumes = {v.id for v in world.storage("node-1").list_volumes()}
    assert claim.volume_id not in volumes and entry.volume_id in volumes
    return waited


def test_a_claim_whose_owner_was_killed_mid_download_is_taken_over_at_once(
        world: World, engine: Engine) -> None:
    # The heartbeat is slow (20 s): only the dead pid can tell, and it tells at once.
    [image] = add_tiny_images(world, [1])
    claim = _killed_mid_download(world, engine, image)
    assert _served_after(world, engine, image, claim) < 2, \
        "the dead owner's claim held the request up"


def test_the_claim_of_an_owner_on_a_machine_that_died_is_taken_over_after_three_beats(
        world: World, engine: Engine) -> None:
    # The owner says it runs on another machine: its pid tells nothing here, its silent
    # heartbeat does, after three beats (3 x 0.5 s).
    world = attrs.evolve(world, claim_heartbeat_seconds=0.5, node="another-machine")
    [image] = add_tiny_images(world, [1])
    claim = _killed_mid_download(world, engine, image)
    waited = _served_after(world, engine, image, claim)
    assert waited < 2 * 3 * 0.5 + 1


def test_a_slow_live_download_is_never_taken_over_however_long_it_runs(
        world: World, engine: Engine) -> None:
    # Its heartbeat (every 0.2 s) keeps its claim alive over an ~8 s download (16 pieces,
    # 0.5 s apart), 13 times the three beats after which a silent claim is dead.
    world = attrs.evolve(world, claim_heartbeat_seconds=0.2, node="another-machine")
    [image] = add_tiny_images(world, [1], data=1 << 20)
    owner = start_process(attrs.evolve(world, delay=0.5), "node-1", [(image, 1)])
    try:
        deadline = time.monotonic() + 30
        while not world.downloads():
            assert time.monotonic() < deadline, "the owner never started its download"
            time.sleep(0.02)
        time.sleep(2)  # ten beats: a silent claim would be dead three times over
        impatient = attrs.evolve(world, claim_wait_seconds=1.0, delay=0.0)
        [result] = run_threads(impatient, "node-1", [(image, 1)])
        assert result.outcome == "miss-uncached"  # waited, never took the claim over
        owner.join(60)
        assert owner.exitcode == 0
    finally:
        if owner.is_alive():
            owner.kill()
    with SqlUnitOfWork(engine) as uow:
        [entry] = uow.entries.list()
    assert entry.state is EntryState.READY
    assert len(world.downloads()) == 2  # the owner's, and the impatient one's uncached


def test_a_waiter_gives_up_after_claim_wait_seconds_and_is_served_without_the_cache(
        world: World, engine: Engine) -> None:
    [image] = add_tiny_images(world, [1])
    # The owner is alive and slow (~8 s); the other waits 0.5 s at most.
    owner = start_process(attrs.evolve(world, delay=0.5), "node-1", [(image, 1)])
    try:
        deadline = time.monotonic() + 30
        while not world.downloads():
            assert time.monotonic() < deadline, "the owner never started its download"
            time.sleep(0.02)
        impatient = attrs.evolve(world, claim_wait_seconds=0.5, delay=0.0)
        started = time.monotonic()
        [result] = run_threads(impatient, "node-1", [(image, 1)])
        assert result.outcome == "miss-uncached"
        assert time.monotonic() - started < 5
    finally:
        owner.kill()
        owner.join()


# -- exact limits ------------------------------------------------------------------------------

def test_with_max_count_3_twelve_concurrent_misses_across_processes_never_hold_more_than_3(
        world: World, engine: Engine) -> None:
    world = attrs.evolve(world, max_count=3, delay=0.02)
    images = add_tiny_images(world, [1] * 12)
    workers = [("node-1", [(i, 1) for i in images[n::4]]) for n in range(4)]
    with Watcher(world.url, scope_of("node-1")) as watcher:
        results = run_processes(world, workers)
    assert watcher.polls > 10
    assert watcher.max_entries <= 3 and watcher.max_total_count <= 3
    assert len(results) == 12
    assert {r.outcome for r in results} <= {"miss", "miss-uncached"}
    assert "miss" in {r.outcome for r in results}
    stats = totals(engine, "node-1")
    # Every request downloaded exactly once (into the cache or straight into its volume),
    # and the stats counted each download exactly once.
    assert len(world.downloads()) == 12 == stats.downloads
    assert stats.misses == 12
    uow = SqlUnitOfWork(engine)
    with uow:
        entries = uow.entries.list("node-1")
    assert (stats.count, stats.size_gb) == (len(entries), len(entries)) and len(entries) <= 3


def test_with_max_size_4_gb_twelve_concurrent_misses_never_hold_more_than_4_gb(
        world: World, engine: Engine) -> None:
    world = attrs.evolve(world, max_size_gb=4, delay=0.02)
    sizes = [1, 2] * 6
    images = add_tiny_images(world, sizes)
    jobs = list(zip(images, sizes, strict=True))
    workers = [("node-1", jobs[n::4]) for n in range(4)]
    with Watcher(world.url, scope_of("node-1")) as watcher:
        results = run_processes(world, workers)
    assert watcher.polls > 10
    assert watcher.max_size_gb <= 4 and watcher.max_total_size_gb <= 4
    assert watcher.max_entries >= 2  # the limit was reached, not trivially kept
    assert len(results) == 12
    stats = totals(engine, "node-1")
    assert len(world.downloads()) == 12 == stats.downloads
    uow = SqlUnitOfWork(engine)
    with uow:
        entries = uow.entries.list("node-1")
    assert stats.size_gb == sum(e.size_gb for e in entries) <= 4


def _claim_after(go: threading.Barrier, service: CacheService, image_id: str) -> str:
    go.wait()
    return service.create_volume(CTX, image_id, 1).outcome.value


def test_claims_on_four_hosts_racing_for_the_last_volume_of_the_quota_leave_one_winner(
        world: World, engine: Engine) -> None:
    hosts = [f"node-{n}" for n in range(1, 5)]
    for rounds in range(1, 6):
        # Each round the quota has room for one more cache volume, and four hosts race.
        world = attrs.evolve(world, quota_volumes=rounds, delay=0.0)
        images = add_tiny_images(world, [1] * len(hosts), data=4 << 10)
        services = [world.service(host, engine) for host in hosts]
        go = threading.Barrier(len(hosts))
        with ThreadPoolExecutor(len(hosts)) as pool:
            won = list(pool.map(_claim_after, [go] * len(hosts), services, images))
        # The others were served without the cache: the quota had no room left.
        assert sorted(won) == ["miss"] + ["miss-uncached"] * 3
        uow = SqlUnitOfWork(engine)
        with uow:
            assert sum(len(uow.entries.list(h)) for h in hosts) == rounds

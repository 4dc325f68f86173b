"""Issue 5's figures: single flight, bookkeeping growth and hit throughput, on SQLite and on
PostgreSQL (a throwaway server started here, as the tests do; or ``IVCACHE_TEST_POSTGRES_URL``).

Run through ``bench/run.py`` (``make bench``); the workers and the server come from the test
helpers ``tests/support/flight.py`` and ``tests/support/pg.py``.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

from ivcache.adapters.memory import InMemoryImageSource, RecordingNotifier
from ivcache.adapters.sql import SqlUnitOfWork, make_engine, upgrade
from ivcache.adapters.sql.tables import cache_entries
from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.core.model import GIB, Image, Outcome, RequestContext
from ivcache.core.service import CacheService
from tests.support.flight import World, add_tiny_images, process_context, run_processes, run_threads
from tests.support.pg import PostgresServer

__all__ = ["run"]

CTX = RequestContext.for_project("bench")
HOT = Image(id="hot", name="hot", virtual_size=GIB,
            updated_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
HOT_DATA = b"hot image " * 400


def run(work: Path, *, quick: bool, db: str) -> dict[str, float]:
    """The figures of one database, ``sqlite`` or ``postgres``."""
    figures: dict[str, float] = {}
    server = None
    if db == "postgres":
        server = PostgresServer.from_env() or PostgresServer.start()
    counter = iter(range(1_000_000))

    def fresh() -> str:
        if server is None:
            url = f"sqlite:///{work / f'db-{next(counter)}.db'}"
        else:
            url = server.create_database("bench")
        upgrade(url)
        return url

    try:
        figures[f"downloads_for_16_concurrent_misses_threads_{db}"] = _downloads(
            fresh(), work / f"threads-{db}", processes=False)
        figures[f"downloads_for_16_concurrent_misses_processes_{db}"] = _downloads(
            fresh(), work / f"procs-{db}", processes=True)
        small, big = _bookkeeping_ms(fresh(), fresh(), 10_000 if quick else 100_000, quick)
        figures[f"bookkeeping_ms_p50_100_{db}"] = small
        figures[f"bookkeeping_ms_p50_100k_{db}"] = big
        figures[f"bookkeeping_growth_ratio_{db}"] = big / small
        if server is not None:
            figures["hits_per_second_8_procs_postgres"] = _hits_per_second(
                fresh(), 8, 1.0 if quick else 3.0)
    finally:
        if server is not None and server.directory is not None:
            server.stop()
    return figures


def _downloads(url: str, root: Path, *, processes: bool) -> float:
    """How many times 16 concurrent misses for one image on one host downloaded it."""
    world = World(url=url, root=root, delay=0.02)
    [image] = add_tiny_images(world, [1])
    if processes:
        results = run_processes(world, [("bench", [(image, 1)])] * 16)
    else:
        results = run_threads(world, "bench", [(image, 1)] * 16)
    assert len(results) == 16
    uow = SqlUnitOfWork(make_engine(url))
    with uow:
        counted = uow.entries.totals("bench").downloads
    uow.engine.dispose()
    downloads = len(world.downloads())
    assert counted == downloads, (counted, downloads)  # cache stats counts them exactly
    return downloads


def _seed(url: str, entries: int) -> None:
    """``entries`` READY entries on the host, and its totals row to match."""
    now = dt.datetime.now(dt.UTC)
    engine = make_engine(url)
    with engine.begin() as conn:
        for start in range(0, entries, 10_000):
            conn.execute(insert(cache_entries), [
                {"id": f"e{i}", "host": "bench", "image_id": f"filler-{i}",
                 "volume_id": f"v{i}", "size_gb": 1, "image_updated_at": now,
                 "image_hash": None, "state": "ready", "created_at": now,
                 "last_used": now - dt.timedelta(seconds=entries - i), "hits": 0,
                 "pinned": False, "claim_expires": None, "lease_until": None}
                for i in range(start, min(entries, start + 10_000))])
        conn.execute(text("INSERT INTO host_totals (host, count, size_gb) "
                          "VALUES ('bench', :n, :n)"), {"n": entries})
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    engine.dispose()


def _hot_service(url: str, storage: FakeLvmStorage) -> tuple[CacheService, Callable[[], None]]:
    images = InMemoryImageSource()
    images.add(HOT, HOT_DATA)
    engine = make_engine(url)
    service = CacheService(host="bench", storage=storage, images=images,
                           uow=SqlUnitOfWork(engine), notifier=RecordingNotifier())
    return service, engine.dispose


def _bookkeeping_ms(small_url: str, big_url: str, big: int, quick: bool) -> tuple[float, float]:
    """Median wall time of a hit, in ms, with 100 and with ``big`` other entries on the host.

    Fakes for storage and images: what is timed is the service's own work and its database
    round trips. The two databases take turns, so that a busy machine slows both alike.
    """
    services: list[tuple[CacheService, Callable[[], None], list[float]]] = []
    for url, entries in ((small_url, 100), (big_url, big)):
        _seed(url, entries)
        service, close = _hot_service(url, FakeLvmStorage(10**7))
        assert service.create_volume(CTX, "hot", 1).outcome is Outcome.MISS
        services.append((service, close, []))
    try:
        for _ in range(50 if quick else 300):
            for service, _, times in services:
                started = time.perf_counter()
                result = service.create_volume(CTX, "hot", 1)
                times.append(time.perf_counter() - started)
                assert result.outcome is Outcome.HIT
                service.storage.delete_volume(result.volume.id)
        small_ms, big_ms = (statistics.median(times) * 1000 for _, _, times in services)
        return small_ms, big_ms
    finally:
        for _, close, _ in services:
            close()


def _hits_child(url: str, volume_id: str, seconds: float, start: Any, out: Any) -> None:
    storage = FakeLvmStorage(10**7)
    # The cache volume lives on the shared storage host; each process's in-memory fake holds
    # its own copy, under the id the entry names.
    storage.create_volume(volume_id, 1, "internal")
    storage.write_image(volume_id, [HOT_DATA])
    service, close = _hot_service(url, storage)
    hits = 0
    start.wait(60)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = service.create_volume(CTX, "hot", 1)
        assert result.outcome is Outcome.HIT, result.outcome
        storage.delete_volume(result.volume.id)
        hits += 1
    close()
    out.put(hits)


def _hits_per_second(url: str, procs: int, seconds: float) -> float:
    """Hits per second of ``procs`` processes hitting one entry of one host together."""
    service, close = _hot_service(url, FakeLvmStorage(10**7))
    miss = service.create_volume(CTX, "hot", 1)
    close()
    uow = SqlUnitOfWork(make_engine(url))
    with uow:
        entry = uow.entries.get(miss.entry_id or "")
    uow.engine.dispose()
    assert entry is not None
    ctx = process_context()
    start, out = ctx.Barrier(procs + 1), ctx.Queue()
    workers = [ctx.Process(target=_hits_child, args=(url, entry.volume_id, seconds, start, out))
               for _ in range(procs)]
    for proc in workers:
        proc.start()
    start.wait(60)
    began = time.monotonic()
    total: int = sum(out.get(timeout=60 + seconds) for _ in workers)
    elapsed = time.monotonic() - began
    for proc in workers:
        proc.join(10)
    return total / elapsed

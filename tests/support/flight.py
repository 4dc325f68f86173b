"""Many workers on one database: helpers for the concurrency tests and the benchmarks.

Each worker is a real ``CacheService`` on real parts: the SQL repository (SQLite file or
PostgreSQL), ``FileStorage`` (one directory per host, shared by that host's workers; one per
cluster, shared by its hosts, when the world has a ``cluster``) and
``LocalImageSource`` behind ``SlowImages``, which trickles the bytes out so that concurrent
requests really overlap a download. ``SlowImages`` also appends one line per download to a
log file, so downloads are counted by what happened, not by what the database says.

Worker processes are separate interpreters with their own engines and connections, as
separate services would be. They are forked from ``multiprocessing``'s fork server, which
imports ivcache once: spawning each one afresh costs most of a second of CPU, and 16 of them
would take longer to start than the races they are there for.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
from sqlalchemy import Engine, create_engine, text

from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.memory import RecordingNotifier
from ivcache.adapters.processes import LocalProcesses
from ivcache.adapters.sql import SqlUnitOfWork, make_engine
from ivcache.adapters.storage.file import FileStorage
from ivcache.core.model import GIB, Image, InternalTenant, RequestContext, Scope
from ivcache.core.policy import CachePolicy
from ivcache.core.service import CacheService

__all__ = [
    "CTX",
    "Result",
    "SlowImages",
    "Watcher",
    "World",
    "add_tiny_images",
    "process_context",
    "run_processes",
    "run_threads",
    "start_process",
]

CTX = RequestContext.for_project("flight")


class SlowImages:
    """An image source that hands out its bytes in ``piece``-sized bits, ``delay`` s apart.

    Every ``open_data`` appends ``<pid> <image id>`` to ``log`` (O_APPEND: whole lines from
    any number of processes).
    """

    def __init__(self, inner: LocalImageSource, *, delay: float, log: Path,
                 piece: int = 64 << 10) -> None:
        self.inner = inner
        self.delay = delay
        self.log = log
        self.piece = piece

    def get_image(self, ctx: RequestContext, image_id: str) -> Image:
        return self.inner.get_image(ctx, image_id)

    def list_images(self, ctx: RequestContext) -> list[Image]:
        return self.inner.list_images(ctx)

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        chunks = self.inner.open_data(ctx, image_id)
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {image_id}\n")
        return self._trickle(chunks)

    def _trickle(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            for start in range(0, len(chunk), self.piece):
                time.sleep(self.delay)
                yield chunk[start:start + self.piece]


@attrs.frozen
class World:
    """Where every worker finds the shared parts; picklable, for worker processes."""

    url: str
    root: Path
    delay: float = 0.05
    max_count: int = 0
    max_size_gb: int = 0
    claim_wait_seconds: float = 60.0
    claim_heartbeat_seconds: float = 20.0
    #: the internal tenant's quota of cache volumes (0: none)
    quota_volumes: int = 0
    #: the machine the workers say they run on (None: this one's name)
    node: str | None = None
    #: hosts of one cluster share its scope and one storage directory
    cluster: str | None = None

    @property
    def images_path(self) -> Path:
        return self.root / "images"

    @property
    def downloads_log(self) -> Path:
        return self.root / "downloads.log"

    def scope(self, host: str) -> Scope:
        return Scope(host, cluster=self.cluster)

    def storage(self, host: str) -> FileStorage:
        return FileStorage(self.root / "volumes" / (self.cluster or host), host=host)

    def service(self, host: str, engine: Engine) -> CacheService:
        images = SlowImages(LocalImageSource(self.images_path), delay=self.delay,
                            log=self.downloads_log)
        policy = CachePolicy(max_count=self.max_count, max_size_gb=self.max_size_gb,
                             claim_wait_seconds=self.claim_wait_seconds,
                             claim_heartbeat_seconds=self.claim_heartbeat_seconds)
        return CacheService(scope=self.scope(host), storage=self.storage(host),
                            images=images, uow=SqlUnitOfWork(engine),
                            notifier=RecordingNotifier(), policy=policy,
                            tenant=InternalTenant(quota_volumes=self.quota_volumes),
                            processes=LocalProcesses(self.node))

    def downloads(self) -> list[tuple[int, str]]:
        """(pid, image id) of every download so far."""
        if not self.downloads_log.exists():
            return []
        lines = self.downloads_log.read_text(encoding="utf-8").split()
        return [(int(pid), image) for pid, image in zip(lines[::2], lines[1::2], strict=True)]


def add_tiny_images(world: World, sizes_gb: Sequence[int], *, data: int = 512 << 10) -> list[str]:
    """Add images of the given virtual sizes holding ``data`` bytes each; their ids.

    Each is a small raw file whose record then says it is ``size_gb`` GiB (the source's
    back door): a cache entry of ``size_gb`` GiB for the cost of ``data`` bytes.
    """
    world.root.mkdir(parents=True, exist_ok=True)
    source = LocalImageSource(world.images_path)
    ids = []
    for n, size_gb in enumerate(sizes_gb):
        path = world.root / f"tiny-{n}.raw"
        path.write_bytes((f"image {n} ".encode() * (data // 8 + 1))[:data])
        image = source.add_image(CTX, path, name=f"tiny-{n}")
        source.update_image(image.id, virtual_size=size_gb * GIB)
        ids.append(image.id)
        path.unlink()
    return ids


@attrs.frozen
class Result:
    host: str
    image_id: str
    outcome: str
    entry_id: str | None
    pid: int


def _request(service: CacheService, image_id: str, size_gb: int) -> Result:
    got = service.create_volume(CTX, image_id, size_gb)
    return Result(service.host, image_id, got.outcome.value, got.entry_id, os.getpid())


def _requests(world: World, host: str, jobs: Sequence[tuple[str, int]],
              start: Any = None) -> list[Result]:
    """Run ``jobs`` (image id, size) at once, one thread each, after ``start`` (a barrier)."""
    engine = make_engine(world.url)
    try:
        service = world.service(host, engine)
        go = threading.Barrier(len(jobs))

        def one(job: tuple[str, int]) -> Result:
            go.wait()
            return _request(service, *job)

        if start is not None:
            start.wait(60)
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(one, jobs))
    finally:
        engine.dispose()


def _process_main(world: World, host: str, jobs: Sequence[tuple[str, int]], start: Any,
                  results: Any) -> None:
    try:
        done = _requests(world, host, jobs, start)
    except BaseException as exc:
        if results is not None:
            results.put(("error", f"{type(exc).__name__}: {exc}"))
        raise
    if results is not None:
        results.put(("ok", done))


def run_threads(world: World, host: str, jobs: Sequence[tuple[str, int]]) -> list[Result]:
    """All ``jobs`` at once, in threads of this process sharing one service."""
    return _requests(world, host, jobs)


def process_context() -> multiprocessing.context.ForkServerContext:
    """Where the worker processes come from (see the module docstring)."""
    ctx = multiprocessing.get_context("forkserver")
    assert isinstance(ctx, multiprocessing.context.ForkServerContext)
    # psycopg too: SQLAlchemy imports the driver only when an engine is first made.
    ctx.set_forkserver_preload([__name__, "psycopg", "sqlalchemy.dialects.postgresql.psycopg"])
    return ctx


def start_process(world: World, host: str,
                  jobs: Sequence[tuple[str, int]]) -> multiprocessing.context.ForkServerProcess:
    """One worker process running ``jobs``, left for the caller to join or kill."""
    proc = process_context().Process(target=_process_main,
                                     args=(world, host, list(jobs), None, None))
    proc.start()
    return proc


def run_processes(world: World, workers: Sequence[tuple[str, Sequence[tuple[str, int]]]],
                  *, timeout: float = 120) -> list[Result]:
    """One process per (host, jobs), each running its jobs in threads; every
    process starts its requests at the same moment."""
    ctx = process_context()
    start = ctx.Barrier(len(workers))
    results = ctx.Queue()
    procs = [ctx.Process(target=_process_main, args=(world, host, list(jobs), start, results))
             for host, jobs in workers]
    for proc in procs:
        proc.start()
    collected: list[Result] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        reported = 0
        while reported < len(procs):
            try:
                status, payload = results.get(timeout=0.2)
            except queue.Empty:
                # A worker that died before it could report (say, it failed to start)
                # would otherwise keep us waiting for the whole timeout.
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    errors.append(f"workers died or hung (exit codes {dead})")
                    break
                continue
            reported += 1
            if status == "ok":
                collected.extend(payload)
            else:
                errors.append(payload)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise AssertionError(f"worker processes failed: {errors}")
    return collected


class Watcher:
    """Polls a scope's entries and totals row while others work; keeps the largest seen.

    One statement per poll, so the entries and the totals come from one snapshot.
    """

    def __init__(self, url: str, scope: str) -> None:
        # A plain engine: its reads take no write lock (ivcache's SQLite engine begins
        # IMMEDIATE), so watching does not slow the workers down.
        self._engine = create_engine(url)
        self.scope = scope
        self.max_entries = self.max_size_gb = 0
        self.max_total_count = self.max_total_size_gb = 0
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._engine.dispose()

    def _run(self) -> None:
        query = text(
            "SELECT (SELECT count(*) FROM cache_entries WHERE scope = :s),"
            " (SELECT coalesce(sum(size_gb), 0) FROM cache_entries WHERE scope = :s),"
            " (SELECT coalesce(max(count), 0) FROM scope_totals WHERE scope = :s),"
            " (SELECT coalesce(max(size_gb), 0) FROM scope_totals WHERE scope = :s)")
        with self._engine.connect() as conn:
            while not self._stop.is_set():
                entries, size, total_count, total_size = conn.execute(
                    query, {"s": self.scope}).one()
                conn.rollback()  # a fresh snapshot next time
                self.max_entries = max(self.max_entries, entries)
                self.max_size_gb = max(self.max_size_gb, size)
                self.max_total_count = max(self.max_total_count, total_count)
                self.max_total_size_gb = max(self.max_total_size_gb, total_size)
                self.polls += 1
                time.sleep(0.002)

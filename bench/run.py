"""``make bench``: the figures the issues ask for, as ratios measured in one run.

Prints a table and writes ``.bench/results.json`` as ``{"figures": {name: number},
"skipped": {name: reason}, "failed": {name: reason}, "quick": bool}``.
``BENCH_QUICK=1`` shrinks every workload so the whole run takes under a minute.
``bench/run.py NAME ...`` (or ``make bench BENCH=NAME``) runs only the benches whose function
name or one of whose figures contains one of the NAMEs.

Every bench is registered with the figures it gives (``@bench(...)``). One that cannot be
measured on this machine (no qemu-img, no Ceph bindings, not root for a loop mount, no
PostgreSQL, no Glance venv) raises ``Unavailable``: one line says why and the run goes on;
one that breaks is reported with its traceback and the run goes on too. The exit code is 1
if anything failed, or if anything was skipped while ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ivcache.adapters.convert import ImagePipeline
from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.memory import InMemoryImageSource, RecordingNotifier
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.outbox import SqlOutbox
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.adapters.sql.tables import cache_entries, scope_totals
from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.adapters.storage.file import FileStorage
from ivcache.adapters.storage.qcow2 import Qcow2Storage
from ivcache.core.model import (
    GIB,
    CacheEntry,
    EntryState,
    Image,
    Outcome,
    RequestContext,
    Scope,
)
from ivcache.core.ports import Notifier, StorageBackend
from ivcache.core.service import CacheService, Neighbour
from ivcache.entrypoints.demo import make_sparse_image

QUICK = bool(os.environ.get("BENCH_QUICK"))
MIB = 1 << 20
CTX = RequestContext.for_project("bench")
Figures = dict[str, float]
Bench = Callable[[Path], Figures]


class Unavailable(Exception):
    """This machine lacks what a bench needs; the message says what, and how to get it."""


#: Every bench, in the order they run, with the figures it gives.
BENCHES: list[tuple[Bench, tuple[str, ...]]] = []


def bench(*figures: str) -> Callable[[Bench], Bench]:
    def register(fn: Bench) -> Bench:
        BENCHES.append((fn, figures))
        return fn
    return register


def need_tool(name: str, package: str) -> None:
    if shutil.which(name) is None:
        raise Unavailable(f"no {name} (apt-get install -y {package})")


def _repo_on_path() -> None:
    # Some benches use the tests' helpers (tests/support/): they are not part of the package.
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)


def _median_time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@bench("hit_vs_miss_speedup_file", "miss_seconds_file", "hit_seconds_file",
       "clone_ms_p50_file")
def hit_vs_miss_file(work: Path) -> Figures:
    """File storage on this filesystem (ext4 here: a clone is a sparse copy)."""
    storage = FileStorage(work / "volumes")
    figures = _hit_vs_miss_on(work, storage, "file")
    print(f"# hit_vs_miss_file: clones by {storage.last_clone_method}", file=sys.stderr)
    return figures


@bench("bookkeeping_ms_p50")
def bookkeeping(work: Path) -> Figures:
    """Service overhead per hit with fakes for storage and images, SQLite holding N entries."""
    entries = 10_000 if not QUICK else 2_000
    engine = make_engine(f"sqlite:///{work / 'book.db'}")
    upgrade(engine)
    now = dt.datetime.now(dt.UTC)
    rows = [{"id": f"e{i}", "host": "bench", "backend": "default", "pool": "default",
             "scope": "bench@default#default", "image_id": f"filler-{i}",
             "volume_id": f"v{i}", "size_gb": 1, "image_updated_at": now,
             "image_hash": None, "state": "ready", "created_at": now,
             "last_used": now - dt.timedelta(seconds=entries - i), "hits": 0,
             "pinned": False, "claim_expires": None, "lease_until": None}
            for i in range(entries)]
    with engine.begin() as conn:
        conn.execute(cache_entries.insert(), rows)
        conn.execute(scope_totals.insert(), [{"scope": "bench@default#default",
                                              "count": entries, "size_gb": entries}])
    images = InMemoryImageSource()
    images.add(Image(id="hot", name="hot", virtual_size=GIB, updated_at=now), b"x" * 4096)
    service = CacheService(host="bench", storage=FakeLvmStorage(10**7), images=images,
                           uow=SqlUnitOfWork(engine), notifier=RecordingNotifier())
    service.create_volume(CTX, "hot", 1)
    times = []
    for _ in range(200 if not QUICK else 50):
        started = time.perf_counter()
        result = service.create_volume(CTX, "hot", 1)
        times.append(time.perf_counter() - started)
        assert result.outcome is Outcome.HIT
    return {"bookkeeping_ms_p50": statistics.median(times) * 1000}


@bench("reconcile_ms_per_1k_entries")
def reconcile_1k(work: Path) -> Figures:
    """``cache reconcile`` (no fix) of a scope holding 1000 READY entries, SQLite and file
    storage, each entry's volume a real sparse file with a little data (quick: 200 entries,
    scaled to 1000): the median of 5 runs, in ms per 1000 entries."""
    entries = 1000 if not QUICK else 200
    engine = make_engine(f"sqlite:///{work / 'reconcile.db'}")
    upgrade(engine)
    storage = FileStorage(work / "volumes")
    # As the CLI wires it: the converter's scratch directory is swept too.
    service = CacheService(host="bench", storage=storage, images=InMemoryImageSource(),
                           uow=SqlUnitOfWork(engine), notifier=RecordingNotifier(),
                           converter=ImagePipeline(work / "scratch"))
    owner = service.tenant.project_id
    now = dt.datetime.now(dt.UTC)
    seeded = []
    for i in range(entries):
        volume_id = f"vol-{i:05d}"
        storage.create_volume(volume_id, 1, owner)
        storage.write_image(volume_id, [i.to_bytes(4, "big") * 1024])
        seeded.append(CacheEntry(
            id=f"entry-{i:05d}", host="bench", image_id=f"image-{i:05d}",
            volume_id=volume_id, size_gb=1, image_updated_at=now, image_hash=None,
            state=EntryState.READY, created_at=now,
            last_used=now - dt.timedelta(seconds=entries - i)))
    with service.uow as uow:
        uow.entries.lock_scope(service.scope.key)
        for entry in seeded:
            uow.entries.add(entry)
        uow.commit()
    # A healthy cache: reconcile finds nothing, so every run does the same whole walk.
    assert service.reconcile() == []
    seconds = _median_time(service.reconcile, 5)
    return {"reconcile_ms_per_1k_entries": seconds * 1000 * 1000 / entries}


_RSS_CHILD = """
import resource, subprocess, sys
from pathlib import Path
from ivcache.adapters.convert import ImagePipeline
from ivcache.adapters.images.local import LocalImageSource
from ivcache.adapters.memory import InMemoryUnitOfWork, RecordingNotifier
from ivcache.adapters.storage.file import FileStorage
from ivcache.core.model import RequestContext
from ivcache.core.service import CacheService
work = Path(sys.argv[1]); mib = int(sys.argv[2]); fmt = sys.argv[3]
ctx = RequestContext.for_project("bench")
raw = work / "rss.raw"
with open(raw, "wb") as fh:
    block = bytes(range(256)) * 4096
    for _ in range(mib):
        fh.write(block)
path = raw
if fmt != "raw":
    path = work / f"rss.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(path)],
                   check=True)
images = LocalImageSource(work / "images")
image = images.add_image(ctx, path)
raw.unlink()
path.unlink(missing_ok=True)
service = CacheService(host="rss", storage=FileStorage(work / "volumes"), images=images,
                       uow=InMemoryUnitOfWork(), notifier=RecordingNotifier(),
                       converter=ImagePipeline(work / "scratch"))
size = max(1, -(-mib // 1024))
service.create_volume(ctx, image.id, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@bench("rss_ratio_2g_vs_200m", "rss_peak_mib_big", "rss_ratio_2g_vs_200m_qcow2",
       "rss_peak_mib_big_qcow2")
def rss(work: Path) -> Figures:
    """Peak RSS of caching a big image over a small one (2 GiB vs 200 MiB; quick: 600 MiB,
    and 300 vs 100 MiB for qcow2), raw and qcow2 (ivcache's own process: qemu-img runs
    under its own address-space limit)."""
    figures: Figures = {}
    for fmt in ("raw", "qcow2"):
        big, small = (2048, 200) if not QUICK else (600, 200) if fmt == "raw" else (300, 100)
        peaks = {}
        for mib in (big, small):
            sub = work / f"rss-{fmt}-{mib}"
            sub.mkdir()
            out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(sub), str(mib), fmt],
                                 capture_output=True, text=True, check=True)
            peaks[mib] = int(out.stdout.strip().splitlines()[-1])
            shutil.rmtree(sub)
        suffix = "" if fmt == "raw" else "_qcow2"
        figures[f"rss_ratio_2g_vs_200m{suffix}"] = peaks[big] / peaks[small]
        figures[f"rss_peak_mib_big{suffix}"] = peaks[big] / 1024
    return figures


def _glance_server_module() -> Any:
    # The glance-api the tests run (tests/support/glance_server.py): not part of the package.
    _repo_on_path()
    import tests.support.glance_server
    return tests.support.glance_server


def _glance_venv(server_module: Any) -> Path:
    if importlib.util.find_spec("openstack") is None:
        raise Unavailable("no openstacksdk in the venv (pip install 'ivcache[glance]')")
    try:
        venv: Path = server_module.ensure_glance_venv()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Unavailable(f"cannot install Glance into its venv ({exc}): PyPI unreachable?"
                          ) from exc
    return venv


@bench("glance_download_mib_s", "curl_download_mib_s", "glance_vs_curl_ratio",
       "many_volumes_cache_vs_nocache_speedup", "many_volumes_seconds_cache_on",
       "many_volumes_seconds_cache_off")
def glance(work: Path) -> Figures:
    """A local glance-api: ivcache's download of a 256 MiB image against curl's (quick:
    32 MiB), and 10 volumes from one 512 MiB image with the cache on vs off, file storage
    (quick: 3 volumes, 64 MiB)."""
    from ivcache.adapters.images.glance import GlanceImageSource
    from ivcache.core.policy import CachePolicy

    server_module = _glance_server_module()
    dl_mib, many_mib, count, runs = (256, 512, 10, 3) if not QUICK else (32, 64, 3, 1)
    block = os.urandom(MIB)

    def chunks(mib: int) -> Iterator[bytes]:
        for i in range(mib):
            yield block[:-8] + i.to_bytes(8, "big")

    need_tool("curl", "curl")
    venv = _glance_venv(server_module)
    with server_module.GlanceServer(work / "glance", venv=venv) as server:
        project, user, roles = server.identity(CTX.project_id)
        dl_id = server.create_image((project, user, roles), chunks(dl_mib), name="bench-dl")
        source = GlanceImageSource(url=server.url, auth="trusted-headers")

        def ours() -> None:
            got = sum(len(c) for c in source.open_data(CTX, dl_id))
            assert got == dl_mib * MIB, got

        curl_cmd = ["curl", "-sSf", "-o", "/dev/null",
                    "-H", "X-Identity-Status: Confirmed", "-H", f"X-Project-Id: {project}",
                    "-H", f"X-User-Id: {user}", "-H", f"X-Roles: {','.join(roles)}",
                    f"{server.url}/v2/images/{dl_id}/file"]

        def theirs() -> None:
            subprocess.run(curl_cmd, check=True)

        ours()  # warm both: the session's version discovery, Glance's page cache
        theirs()
        ours_s, curl_s = _median_time(ours, runs), _median_time(theirs, runs)

        many_id = server.create_image((project, user, roles), chunks(many_mib),
                                      name="bench-many")

        def volumes(enabled: bool) -> float:
            sub = work / ("cache-on" if enabled else "cache-off")
            engine = make_engine(f"sqlite:///{sub}.db")
            upgrade(engine)
            service = CacheService(host="bench", storage=FileStorage(sub), images=source,
                                   uow=SqlUnitOfWork(engine), notifier=RecordingNotifier(),
                                   policy=CachePolicy(enabled=enabled))
            started = time.perf_counter()
            for _ in range(count):
                service.create_volume(CTX, many_id, 1)
            elapsed = time.perf_counter() - started
            shutil.rmtree(sub)
            return elapsed

        off = volumes(False)
        on = volumes(True)
    return {"glance_download_mib_s": dl_mib / ours_s,
            "curl_download_mib_s": dl_mib / curl_s,
            "glance_vs_curl_ratio": curl_s / ours_s,
            "many_volumes_cache_vs_nocache_speedup": off / on,
            "many_volumes_seconds_cache_on": on,
            "many_volumes_seconds_cache_off": off}


@bench("keystone_hit_overhead_ms", "keystone_hit_ms_p50", "trusted_headers_hit_ms_p50")
def keystone(work: Path) -> Figures:
    """A hit in keystone mode minus a hit in trusted-headers mode (goal: <= 5 ms): one
    Glance's images served through its keystonemiddleware pipeline and, by a second
    glance-api on the same database and store, through the trusted-header one; the token's
    validation is cached (warm), as in a long-running driver. Hits alternate between the
    modes so that drift hits both alike. File storage, a 1 MiB image."""
    from ivcache.adapters.identity.keystone import KeystoneIdentity
    from ivcache.adapters.images.glance import GlanceImageSource
    from ivcache.core.model import InternalTenant

    server_module = _glance_server_module()
    _glance_venv(server_module)  # openstacksdk is there, or one line why not
    from tests.support.keystone_server import OpenStack, ensure_keystone_venv
    try:
        venv = ensure_keystone_venv()
        cloud = OpenStack(work / "openstack", venv=venv)
        cloud.start()
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        raise Unavailable(f"cannot start Keystone and Glance: {exc}".splitlines()[0]
                          ) from exc
    saved = os.environ.get("OS_CLIENT_CONFIG_FILE")
    os.environ["OS_CLIENT_CONFIG_FILE"] = str(cloud.clouds_yaml)
    trusted = server_module.GlanceServer(work / "glance-trusted", venv=venv,
                                         shares=cloud.glance)
    try:
        trusted.start()
        user = cloud.new_user("bench")
        token = cloud.token(user)
        image_id = cloud.glance.create_image(token, os.urandom(MIB), name="bench-hit")
        tenant = InternalTenant(cloud.internal.project_id, cloud.internal.user_id)
        identity = KeystoneIdentity(os_cloud="ivcache-service")

        def service(name: str, source: GlanceImageSource) -> CacheService:
            engine = make_engine(f"sqlite:///{work / name}.db")
            upgrade(engine)
            return CacheService(host="bench", storage=FileStorage(work / name), images=source,
                                uow=SqlUnitOfWork(engine), notifier=RecordingNotifier(),
                                tenant=tenant)

        in_keystone = service("keystone", GlanceImageSource(
            url=cloud.glance.url, os_cloud="ivcache-internal", auth="keystone",
            internal=tenant.context()))
        in_trusted = service("trusted", GlanceImageSource(url=trusted.url,
                                                          auth="trusted-headers"))
        as_user = RequestContext.for_project(user.project_id, user_id=user.user_id)

        def keystone_hit() -> object:
            return in_keystone.create_volume(identity.context(token), image_id, 1)

        def trusted_hit() -> object:
            return in_trusted.create_volume(as_user, image_id, 1)

        for hit in (keystone_hit, trusted_hit):  # the misses, then one warm hit each
            hit()
            hit()
        runs = 60 if not QUICK else 15
        times: dict[str, list[float]] = {"keystone": [], "trusted": []}
        for _ in range(runs):
            for name, hit in (("keystone", keystone_hit), ("trusted", trusted_hit)):
                started = time.perf_counter()
                hit()
                times[name].append(time.perf_counter() - started)
        print(f"# keystone: start-up {cloud.startup_seconds:.1f} s", file=sys.stderr)
    finally:
        trusted.stop()
        cloud.stop()
        if saved is None:
            os.environ.pop("OS_CLIENT_CONFIG_FILE", None)
        else:
            os.environ["OS_CLIENT_CONFIG_FILE"] = saved
    keystone_ms = statistics.median(times["keystone"]) * 1000
    trusted_ms = statistics.median(times["trusted"]) * 1000
    return {"keystone_hit_overhead_ms": keystone_ms - trusted_ms,
            "keystone_hit_ms_p50": keystone_ms, "trusted_headers_hit_ms_p50": trusted_ms}




def _service_with_image(work: Path, storage: StorageBackend,
                        name: str) -> tuple[CacheService, str]:
    """A service on ``storage`` with SQLite and a local source holding one 1 GiB image of
    512 MiB of data (quick: 256 MiB / 64 MiB)."""
    virtual, data = (1024, 512) if not QUICK else (256, 64)
    raw = make_sparse_image(work / "img.raw", virtual_mib=virtual, data_mib=data)
    images = LocalImageSource(work / "images")
    image = images.add_image(CTX, raw)
    raw.unlink()
    engine = make_engine(f"sqlite:///{work / f'{name}.db'}")
    upgrade(engine)
    service = CacheService(host="bench", storage=storage, images=images,
                           uow=SqlUnitOfWork(engine), notifier=RecordingNotifier(),
                           converter=ImagePipeline(work / "scratch"))
    return service, image.id


@bench("miss_qcow2_vs_raw_ratio", "convert_vs_qemu_img_ratio", "miss_seconds_qcow2_file",
       "miss_seconds_raw_file", "qemu_img_convert_seconds", "sha512_vs_qemu_img_ratio",
       "convert_vs_durable_qemu_img_ratio", "fsync_vs_qemu_img_ratio")
def image_formats(work: Path) -> Figures:
    """Issue 9, file storage on this filesystem (ext4 here: the user's clone is a sparse
    copy): a miss of a 1 GiB-virtual qcow2 image holding 512 MiB of data (quick: 256 / 64
    MiB) against a miss of the same disk as raw, and against a bare ``qemu-img convert -O
    raw`` of the same qcow2 file (medians of 5 runs; quick: 1). ``sha512_vs_qemu_img_ratio``
    is the floor for a miss that checks the image's hash: reading and hashing the qcow2 file
    alone, over the bare conversion. A bare ``qemu-img convert`` leaves its output in the
    page cache (it calls no fsync: strace shows none), while a miss makes the cache volume
    durable before the entry is ready: ``fsync_vs_qemu_img_ratio`` is that fsync alone over
    the bare conversion, and ``convert_vs_durable_qemu_img_ratio`` the miss over the bare
    conversion followed by an fsync of its output (the least a crash-safe cache can do)."""
    return _image_formats_on(work, work, "", "file")


@bench("miss_qcow2_vs_raw_ratio_reflink", "convert_vs_qemu_img_ratio_reflink",
       "miss_seconds_qcow2_reflink_xfs", "miss_seconds_raw_reflink_xfs",
       "qemu_img_convert_seconds_reflink", "sha512_vs_qemu_img_ratio_reflink",
       "convert_vs_durable_qemu_img_ratio_reflink", "fsync_vs_qemu_img_ratio_reflink")
def image_formats_reflink(work: Path) -> Figures:
    """``image_formats`` with everything (images, volumes, the bare conversion's output) on
    a loop-mounted XFS made with reflink: the user's clone is a reflink."""
    need_tool("qemu-img", "qemu-utils")
    with _reflink_xfs(work, size_gb=4) as mount:
        return _image_formats_on(mount, work, "_reflink", "reflink_xfs")


def _image_formats_on(root: Path, work: Path, suffix: str, name: str) -> Figures:
    """The figures of ``image_formats``, ``suffix`` added to the ratios' names, ``name`` to
    the seconds', with the images, volumes and conversions under ``root``."""
    need_tool("qemu-img", "qemu-utils")
    virtual, data = (1024, 512) if not QUICK else (256, 64)
    runs = 5 if not QUICK else 1
    raw = make_sparse_image(root / "img.raw", virtual_mib=virtual, data_mib=data)
    qcow2 = root / "img.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    images = LocalImageSource(root / "images")
    ids = {"raw": images.add_image(CTX, raw).id, "qcow2": images.add_image(CTX, qcow2).id}
    raw.unlink()
    engine = make_engine(f"sqlite:///{work / f'formats-{name}.db'}")
    upgrade(engine)
    storage = FileStorage(root / "volumes")
    service = CacheService(host="bench", storage=storage, images=images,
                           uow=SqlUnitOfWork(engine), notifier=RecordingNotifier(),
                           converter=ImagePipeline(root / "scratch"))
    out = root / "bare.raw"

    fsyncs: list[float] = []

    def bare(durable: bool = False) -> None:
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2),
                        str(out)], check=True)
        if durable:
            started = time.perf_counter()
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsyncs.append(time.perf_counter() - started)
        out.unlink()

    def sha512() -> None:
        digest = hashlib.sha512()
        with open(qcow2, "rb") as f:
            while chunk := f.read(MIB):
                digest.update(chunk)

    # Each run measures all five one after the other, so a busy machine slows them alike.
    times: dict[str, list[float]] = {"raw": [], "qcow2": [], "bare": [], "sha512": [],
                                     "durable": []}
    for _ in range(runs):
        for fmt, image_id in ids.items():
            result = service.create_volume(CTX, image_id, 1)
            assert result.outcome is Outcome.MISS
            times[fmt].append(result.seconds)
            service.delete_volume(CTX, result.volume.id)
            service.evict(everything=True)
        times["bare"].append(_median_time(bare, 1))
        times["durable"].append(_median_time(lambda: bare(durable=True), 1))
        times["sha512"].append(_median_time(sha512, 1))
    print(f"# image_formats on {name}: clones by {storage.last_clone_method}", file=sys.stderr)
    raw_s, qcow2_s, bare_s, hash_s, durable_s = (
        statistics.median(times[k]) for k in ("raw", "qcow2", "bare", "sha512", "durable"))
    return {f"miss_qcow2_vs_raw_ratio{suffix}": qcow2_s / raw_s,
            f"convert_vs_qemu_img_ratio{suffix}": qcow2_s / bare_s,
            f"miss_seconds_qcow2_{name}": qcow2_s, f"miss_seconds_raw_{name}": raw_s,
            f"qemu_img_convert_seconds{suffix}": bare_s,
            f"sha512_vs_qemu_img_ratio{suffix}": hash_s / bare_s,
            f"convert_vs_durable_qemu_img_ratio{suffix}": qcow2_s / durable_s,
            f"fsync_vs_qemu_img_ratio{suffix}": statistics.median(fsyncs) / bare_s}


def _hit_vs_miss_on(work: Path, storage: StorageBackend, name: str) -> Figures:
    """Miss (the image read from the local source, written, cloned) against hits, then the
    clone alone, on ``storage``."""
    service, image_id = _service_with_image(work, storage, name)
    miss = service.create_volume(CTX, image_id, 1)
    assert miss.outcome is Outcome.MISS
    hits = []
    for _ in range(3 if QUICK else 5):
        hit = service.create_volume(CTX, image_id, 1)
        assert hit.outcome is Outcome.HIT
        hits.append(hit.seconds)
        service.delete_volume(CTX, hit.volume.id)
    hit_s = statistics.median(hits)
    [entry] = [v for v in storage.list_volumes() if v.owner != CTX.project_id]
    return {f"hit_vs_miss_speedup_{name}": miss.seconds / hit_s,
            f"miss_seconds_{name}": miss.seconds, f"hit_seconds_{name}": hit_s,
            f"clone_ms_p50_{name}": _clone_ms_p50(storage, entry.id)}


def _clone_ms_p50(storage: StorageBackend, src_id: str) -> float:
    times = []
    for n in range(5 if QUICK else 11):
        started = time.perf_counter()
        storage.clone_volume(src_id, f"bench-clone-{n}", 1, "bench-clones")
        times.append(time.perf_counter() - started)
        storage.delete_volume(f"bench-clone-{n}")
    return statistics.median(times) * 1000


@bench("hit_vs_miss_speedup_qcow2", "miss_seconds_qcow2", "hit_seconds_qcow2",
       "clone_ms_p50_qcow2")
def hit_vs_miss_qcow2(work: Path) -> Figures:
    """qcow2 storage (qemu-img): a hit is a qcow2 overlay on the cached raw base."""
    need_tool("qemu-img", "qemu-utils")
    return _hit_vs_miss_on(work, Qcow2Storage(work / "qcow2"), "qcow2")


@contextlib.contextmanager
def _reflink_xfs(work: Path, size_gb: int = 2) -> Iterator[Path]:
    """A loop-mounted XFS made with reflink (mkfs.xfs -m reflink=1), for the block."""
    if os.geteuid() != 0:
        raise Unavailable("a loop-mounted XFS needs root")
    need_tool("mkfs.xfs", "xfsprogs")
    image, mount = work / "xfs.img", work / "xfs"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_gb * GIB)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", device, str(mount)], check=True)
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@bench("first_create_after_upload_vs_miss_ratio", "first_create_after_upload_seconds",
       "upload_seconds_reflink", "upload_miss_seconds_reflink")
def first_create_after_upload(work: Path) -> Figures:
    """The first volume made from a just-uploaded image (``volume upload`` cached it on the
    way: a hit) over a normal miss of the same bytes: a 1 GiB image with 512 MiB of data, the
    local image source, file storage on a reflink XFS."""
    virtual, data = (1024, 512) if not QUICK else (256, 64)
    runs = 3 if not QUICK else 1
    with _reflink_xfs(work, 4) as mount:
        raw = make_sparse_image(work / "img.raw", virtual_mib=virtual, data_mib=data)
        images = LocalImageSource(work / "images")
        image_id = images.add_image(CTX, raw).id
        engine = make_engine(f"sqlite:///{work / 'upload.db'}")
        upgrade(engine)
        storage = FileStorage(mount / "volumes")
        service = CacheService(host="bench", storage=storage, images=images,
                               uow=SqlUnitOfWork(engine), notifier=RecordingNotifier(),
                               converter=ImagePipeline(work / "scratch"))
        misses = []
        for _ in range(runs):
            miss = service.create_volume(CTX, image_id, 1)
            assert miss.outcome is Outcome.MISS
            misses.append(miss.seconds)
            service.delete_volume(CTX, miss.volume.id)
            service.evict(everything=True)
        volume = service.create_volume(CTX, image_id, 1).volume
        uploads, firsts = [], []
        for n in range(runs):
            started = time.perf_counter()
            uploaded = service.upload_volume(CTX, volume.id, name=f"golden-{n}")
            uploads.append(time.perf_counter() - started)
            assert uploaded.cached, uploaded.reason
            downloads = service.stats().downloads
            first = service.create_volume(CTX, uploaded.image.id, 1)
            assert first.outcome is Outcome.HIT and service.stats().downloads == downloads
            firsts.append(first.seconds)
            service.delete_volume(CTX, first.volume.id)
        assert storage.last_clone_method == "reflink"
    miss_s, first_s = statistics.median(misses), statistics.median(firsts)
    return {"first_create_after_upload_vs_miss_ratio": first_s / miss_s,
            "first_create_after_upload_seconds": first_s,
            "upload_seconds_reflink": statistics.median(uploads),
            "upload_miss_seconds_reflink": miss_s}


def _cli(home: Path, *args: str, fault: str = "") -> tuple[int, float]:
    """Run ``ivcache ARGS`` in ``home`` (``IVCACHE_FAULT=fault`` if given): its exit code
    and wall seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IVCACHE_")}
    env["IVCACHE_HOME"] = str(home)
    if fault:
        env["IVCACHE_FAULT"] = fault
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "ivcache"), *args], env=env,
                          capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    return done.returncode, time.perf_counter() - started


@bench("dead_claim_takeover_seconds", "dead_claim_next_request_seconds",
       "dead_claim_plain_miss_seconds", "claim_heartbeat_seconds")
def dead_claim_takeover(work: Path) -> Figures:
    """Issue 12: a miss SIGKILLed mid-download (``IVCACHE_FAULT=mid-download``, a real
    ``ivcache`` process), then the next request for the image: the seconds it took beyond a
    plain miss of a same-sized image (the takeover's cost; goal <= 2 x
    claim_heartbeat_seconds, the default 5). The CLI on its defaults: SQLite, file storage,
    the local image source; 64 MiB images; the median of 3 rounds."""
    runs = 3 if not QUICK else 1
    takeovers, nexts, plains = [], [], []
    for n in range(runs):
        home = work / f"takeover-{n}"
        home.mkdir()
        for name in ("killed", "plain"):
            raw = make_sparse_image(work / f"{name}-{n}.raw", virtual_mib=64, data_mib=16,
                                    seed=name.encode())
            code, _ = _cli(home, "image", "add", str(raw))
            assert code == 0
        listed = subprocess.run(
            [str(Path(sys.executable).parent / "ivcache"), "image", "list", "--json"],
            env={**{k: v for k, v in os.environ.items() if not k.startswith("IVCACHE_")},
                 "IVCACHE_HOME": str(home)}, capture_output=True, text=True, check=True)
        by_name = {i["name"].split("-")[0]: i["id"] for i in json.loads(listed.stdout)}
        code, _ = _cli(home, "volume", "create", "--image", by_name["killed"], "--size", "1",
                       fault="mid-download")
        assert code == -9, code
        code, next_s = _cli(home, "volume", "create", "--image", by_name["killed"], "--size",
                            "1")
        assert code == 0
        code, plain_s = _cli(home, "volume", "create", "--image", by_name["plain"], "--size",
                             "1")
        assert code == 0
        nexts.append(next_s)
        plains.append(plain_s)
        takeovers.append(max(0.0, next_s - plain_s))
    return {"dead_claim_takeover_seconds": statistics.median(takeovers),
            "dead_claim_next_request_seconds": statistics.median(nexts),
            "dead_claim_plain_miss_seconds": statistics.median(plains),
            "claim_heartbeat_seconds": 5.0}


@bench("hit_vs_miss_speedup_reflink", "miss_seconds_reflink", "hit_seconds_reflink",
       "clone_ms_p50_reflink")
def hit_vs_miss_reflink(work: Path) -> Figures:
    """File storage on a loop-mounted XFS (mkfs.xfs -m reflink=1): a hit is a reflink."""
    with _reflink_xfs(work) as mount:
        storage = FileStorage(mount / "volumes")
        figures = _hit_vs_miss_on(work, storage, "reflink")
        assert storage.last_clone_method == "reflink"
        return figures


def _hit_overhead_on(work: Path, storage: StorageBackend, name: str, *,
                     keep: bool = False) -> Figures:
    """Issue 13: the median hit minus the median bare clone of the same cache volume, in ms,
    on ``storage`` with SQLite and the local image source (1 GiB image of 512 MiB data;
    quick: 256 / 64 MiB). Hits and clones take turns, each first every other turn, so that
    a busy machine and what one leaves the other (a filesystem's log) weigh on both alike.
    Each volume is deleted after its timing, so that every hit and clone finds the same
    storage; with ``keep`` (RBD), only at the end: a delete leaves the OSD removing
    objects while the next request runs. ``hit_overhead_cpu_ms`` is the same difference in
    this thread's CPU time: what the hit's own work costs whatever the machine's load
    (on a busy machine the wall time of CPU-bound work stretches with the run queue)."""
    service, image_id = _service_with_image(work, storage, f"overhead-{name}")
    miss = service.create_volume(CTX, image_id, 1)
    assert miss.outcome is Outcome.MISS
    [cache] = [v for v in storage.list_volumes() if v.owner != CTX.project_id]
    times: dict[str, list[float]] = {"hit": [], "clone": []}
    cpu: dict[str, list[float]] = {"hit": [], "clone": []}
    made: list[str] = []
    runs = 15 if QUICK else 31 if keep else 101

    def hit(n: int) -> str:
        result = service.create_volume(CTX, image_id, 1)
        assert result.outcome is Outcome.HIT, result.outcome
        return result.volume.id

    def clone(n: int) -> str:
        return storage.clone_volume(cache.id, f"bench-clone-{n}", 1, CTX.project_id).id

    for n in range(runs + 1):  # the first turn warms up, untimed
        turn = [("hit", hit), ("clone", clone)]
        for kind, make in turn if n % 2 else reversed(turn):
            started, cpu_started = time.perf_counter(), time.thread_time()
            volume_id = make(n)
            elapsed, cpu_s = time.perf_counter() - started, time.thread_time() - cpu_started
            if n:
                times[kind].append(elapsed)
                cpu[kind].append(cpu_s)
            if keep:
                made.append(volume_id)
            else:
                storage.delete_volume(volume_id)
    for volume_id in made:
        storage.delete_volume(volume_id)
    hit_ms = statistics.median(times["hit"]) * 1000
    clone_ms = statistics.median(times["clone"]) * 1000
    cpu_ms = (statistics.median(cpu["hit"]) - statistics.median(cpu["clone"])) * 1000
    return {f"hit_overhead_ms_{name}": hit_ms - clone_ms,
            f"hit_overhead_hit_ms_p50_{name}": hit_ms,
            f"hit_overhead_clone_ms_p50_{name}": clone_ms,
            f"hit_overhead_cpu_ms_{name}": cpu_ms}


@bench("hit_overhead_ms_reflink", "hit_overhead_hit_ms_p50_reflink",
       "hit_overhead_clone_ms_p50_reflink", "hit_overhead_cpu_ms_reflink")
def hit_overhead_reflink(work: Path) -> Figures:
    """File storage on a loop-mounted reflink XFS: what a hit costs beyond its reflink."""
    with _reflink_xfs(work) as mount:
        storage = FileStorage(mount / "volumes")
        figures = _hit_overhead_on(work, storage, "reflink")
        assert storage.last_clone_method == "reflink"
        return figures


@bench("hit_overhead_ms_qcow2", "hit_overhead_hit_ms_p50_qcow2",
       "hit_overhead_clone_ms_p50_qcow2", "hit_overhead_cpu_ms_qcow2")
def hit_overhead_qcow2(work: Path) -> Figures:
    """qcow2 storage: what a hit costs beyond its overlay."""
    need_tool("qemu-img", "qemu-utils")
    return _hit_overhead_on(work, Qcow2Storage(work / "qcow2"), "qcow2")


@bench("hit_overhead_ms_rbd", "hit_overhead_hit_ms_p50_rbd", "hit_overhead_clone_ms_p50_rbd",
       "hit_overhead_cpu_ms_rbd")
def hit_overhead_rbd(work: Path) -> Figures:
    """RBD storage on a throwaway single-node Ceph: what a hit costs beyond its RBD clone."""
    with _rbd_storage() as storage:
        return _hit_overhead_on(work, storage, "rbd", keep=True)


@bench("many_volumes_cache_vs_nocache_speedup_reflink", "many_volumes_seconds_cache_on_reflink",
       "many_volumes_seconds_cache_off_reflink", "miss_vs_plain_download_ratio_reflink",
       "miss_seconds_glance_reflink", "plain_download_seconds_glance_reflink")
def glance_reflink(work: Path) -> Figures:
    """Issue 13, file storage on a loop-mounted reflink XFS, a real glance-api, SQLite:
    10 volumes from one 512 MiB image with the cache on vs off (quick: 3 volumes, 64 MiB),
    and a miss (the download into the cache volume, then the clone) against the same image
    downloaded straight into a volume with the cache disabled (medians of 5 turns each;
    quick: 1)."""
    from ivcache.adapters.images.glance import GlanceImageSource
    from ivcache.core.policy import CachePolicy

    server_module = _glance_server_module()
    venv = _glance_venv(server_module)
    mib, count, turns = (512, 10, 5) if not QUICK else (64, 3, 1)
    block = os.urandom(MIB)

    def chunks() -> Iterator[bytes]:
        for i in range(mib):
            yield block[:-8] + i.to_bytes(8, "big")

    # Room for the cache-off volumes' data, written in full, and the rest.
    with _reflink_xfs(work, 2 + count * mib // 1024) as mount, \
            server_module.GlanceServer(work / "glance", venv=venv) as server:
        who = server.identity(CTX.project_id)
        image_id = server.create_image(who, chunks(), name="bench-many-reflink")
        source = GlanceImageSource(url=server.url, auth="trusted-headers")
        runs = iter(range(1_000_000))

        def service(enabled: bool) -> tuple[CacheService, FileStorage]:
            n = next(runs)
            engine = make_engine(f"sqlite:///{work / f'reflink-{n}.db'}")
            upgrade(engine)
            storage = FileStorage(mount / f"volumes-{n}")
            return CacheService(host="bench", storage=storage, images=source,
                                uow=SqlUnitOfWork(engine), notifier=RecordingNotifier(),
                                policy=CachePolicy(enabled=enabled),
                                converter=ImagePipeline(work / "scratch")), storage

        def volumes(enabled: bool) -> float:
            svc, storage = service(enabled)
            started = time.perf_counter()
            for _ in range(count):
                svc.create_volume(CTX, image_id, 1)
            elapsed = time.perf_counter() - started
            shutil.rmtree(storage.root)
            return elapsed

        def one(enabled: bool) -> float:
            svc, storage = service(enabled)
            started = time.perf_counter()
            result = svc.create_volume(CTX, image_id, 1)
            elapsed = time.perf_counter() - started
            assert result.outcome is (Outcome.MISS if enabled else Outcome.DISABLED)
            if enabled:
                assert storage.last_clone_method == "reflink"
            shutil.rmtree(storage.root)
            return elapsed

        one(False)  # warm Glance's page cache and the session
        misses, plain = [], []
        for turn in range(turns):  # each first every other turn, as load comes and goes
            if turn % 2:
                misses.append(one(True))
            plain.append(one(False))
            if not turn % 2:
                misses.append(one(True))
        off = volumes(False)
        on = volumes(True)
    miss_s, plain_s = statistics.median(misses), statistics.median(plain)
    return {"many_volumes_cache_vs_nocache_speedup_reflink": off / on,
            "many_volumes_seconds_cache_on_reflink": on,
            "many_volumes_seconds_cache_off_reflink": off,
            "miss_vs_plain_download_ratio_reflink": miss_s / plain_s,
            "miss_seconds_glance_reflink": miss_s,
            "plain_download_seconds_glance_reflink": plain_s}


@bench("neighbour_fill_vs_download_ratio", "neighbour_fill_vs_download_ratio_ext4",
       "neighbour_fill_seconds_reflink", "neighbour_fill_seconds_ext4",
       "glance_miss_seconds_reflink")
def neighbour_fill(work: Path) -> Figures:
    """Issue 11: a miss filled from a neighbour backend's entry against a miss downloaded
    from a real glance-api, 1 GiB image with 512 MiB of data (quick: 256 / 64 MiB), file
    storage in two directories of one reflink XFS, then of this machine's ext4. Each figure
    is a whole request: the cache volume filled (or downloaded) and the user's clone."""
    from ivcache.adapters.images.glance import GlanceImageSource

    server_module = _glance_server_module()
    need_tool("mkfs.xfs", "xfsprogs")
    venv = _glance_venv(server_module)
    virtual, data = (1024, 512) if not QUICK else (256, 64)
    raw = make_sparse_image(work / "img.raw", virtual_mib=virtual, data_mib=data)

    def chunks() -> Iterator[bytes]:
        with open(raw, "rb") as fh:
            while block := fh.read(4 * MIB):
                yield block

    figures: Figures = {}
    with server_module.GlanceServer(work / "glance", venv=venv) as server:
        who = server.identity(CTX.project_id)
        image_id = server.create_image(who, chunks(), name="bench-neighbour")
        raw.unlink()
        source = GlanceImageSource(url=server.url, auth="trusted-headers")

        def fill_vs_download(root: Path, name: str) -> tuple[float, float]:
            engine = make_engine(f"sqlite:///{work / f'neighbour-{name}.db'}")
            upgrade(engine)
            storages = {b: FileStorage(root / b) for b in ("a", "b")}
            scopes = {b: Scope("bench", b, b) for b in storages}
            services = {b: CacheService(
                scope=scopes[b], storage=storages[b], images=source,
                uow=SqlUnitOfWork(engine), notifier=RecordingNotifier(),
                neighbours=[Neighbour.of(scopes[o], storages[o]) for o in storages if o != b])
                for b in storages}
            downloaded = services["a"].create_volume(CTX, image_id, 1)
            filled = services["b"].create_volume(CTX, image_id, 1)
            assert downloaded.filled_from == "image-source", downloaded
            assert filled.filled_from == scopes["a"].key, filled
            engine.dispose()
            return filled.seconds, downloaded.seconds

        with _reflink_xfs(work, 4) as mount:
            fill_s, download_s = fill_vs_download(mount, "reflink")
        figures.update(neighbour_fill_vs_download_ratio=fill_s / download_s,
                       neighbour_fill_seconds_reflink=fill_s,
                       glance_miss_seconds_reflink=download_s)
        ext4 = work / "ext4"
        fill_s, download_s = fill_vs_download(ext4, "ext4")
        figures.update(neighbour_fill_vs_download_ratio_ext4=fill_s / download_s,
                       neighbour_fill_seconds_ext4=fill_s)
    return figures


@bench("origin_downloads_cluster_4_hosts_16_requests")
def cluster_downloads(work: Path) -> Figures:
    """Issue 11: 16 concurrent requests for one image from 4 hosts of one cluster (separate
    processes, one PostgreSQL, one shared storage directory): how many origin downloads."""
    _repo_on_path()
    from tests.support.flight import World, add_tiny_images, run_processes
    from tests.support.pg import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        raise Unavailable(f"no PostgreSQL server: {exc} (apt-get install -y postgresql)"
                          ) from exc
    try:
        url = server.create_database("bench")
        upgrade(url)
        world = World(url=url, root=work / "world", cluster="bench-cluster", delay=0.02)
        [image] = add_tiny_images(world, [1])
        results = run_processes(world, [(f"node-{n}", [(image, 1)] * 4) for n in range(4)])
        assert len(results) == 16 and {r.outcome for r in results} <= {"hit", "miss"}
        return {"origin_downloads_cluster_4_hosts_16_requests": float(len(world.downloads()))}
    finally:
        server.stop()


@contextlib.contextmanager
def _rbd_storage() -> Iterator[StorageBackend]:
    """RBD storage on a throwaway single-node Ceph (tests/support/ceph_cluster.py)."""
    _repo_on_path()
    if not all(importlib.util.find_spec(name) for name in ("rados", "rbd")):
        raise Unavailable("no Ceph bindings in the venv (apt-get install -y python3-rbd "
                          "python3-rados; make install links them)")
    need_tool("ceph-mon", "ceph-mon")
    need_tool("ceph-osd", "ceph-osd")
    from ivcache.adapters.storage.rbd import RbdStorage
    from tests.support.ceph_cluster import CephCluster

    # The OSD's block file goes on a tmpfs where there is one: a cluster's OSDs sit on
    # fast disks, and a file on this VM's disk makes every write of the cluster slower.
    shm = Path(os.environ.get("BENCH_CEPH_BLOCK_DIR", "/dev/shm"))
    block_dir = None
    if shm.is_dir() and os.access(shm, os.W_OK):
        room = os.statvfs(shm)
        if room.f_bavail * room.f_frsize > 3 * GIB:  # the data, with room to spare
            block_dir = shm
    with CephCluster.start(block_dir=block_dir) as ceph, \
            RbdStorage(conf=str(ceph.conf)) as storage:
        yield storage


@bench("hit_vs_miss_speedup_rbd", "miss_seconds_rbd", "hit_seconds_rbd",
       "clone_ms_p50_rbd")
def hit_vs_miss_rbd(work: Path) -> Figures:
    """As hit_vs_miss_file, on a throwaway single-node Ceph (1 GiB / 512 MiB; quick: 128 MiB),
    and the p50 of a bare RBD clone of a cache volume."""
    with _rbd_storage() as storage:
        service, image_id = _service_with_image(work, storage, "rbd")
        miss = service.create_volume(CTX, image_id, 1)
        assert miss.outcome is Outcome.MISS
        hits, made = [], []
        # The clones take no room, so they are deleted after the timing, not between hits
        # (a delete leaves the OSD removing objects while the next hit runs).
        for _ in range(5 if QUICK else 9):
            hit = service.create_volume(CTX, image_id, 1)
            assert hit.outcome is Outcome.HIT
            hits.append(hit.seconds)
            made.append(hit.volume.id)
        for volume_id in made:
            service.delete_volume(CTX, volume_id)
        cache_volume = storage.list_volumes(owner="internal")[0].id
        clones = []
        for n in range(10 if QUICK else 30):
            started = time.perf_counter()
            storage.clone_volume(cache_volume, f"bench-clone-{n}", 1, "bench")
            clones.append(time.perf_counter() - started)
    hit_s = statistics.median(hits)
    return {"hit_vs_miss_speedup_rbd": miss.seconds / hit_s,
            "miss_seconds_rbd": miss.seconds, "hit_seconds_rbd": hit_s,
            "clone_ms_p50_rbd": statistics.median(clones) * 1000}


@bench("trace_hit_ratio_lru", "trace_gb_downloaded_lru", "trace_hit_ratio_gdsf",
       "trace_bytes_downloaded_gdsf_vs_lru", "trace_bytes_downloaded_fixed_vs_lru")
def trace_lru_gdsf(work: Path) -> Figures:
    """A seeded Zipf trace (2,000 requests over 200 images of 1–20 GiB, alpha 0.9; quick:
    500 over 50) through the service on fakes, the cache at 15 % of the working set, once
    per eviction policy; downloads take fake time proportional to size, the cost gdsf
    measures (bench/trace.py; replay your own log with `python bench/trace.py --log FILE`).
    ``trace_bytes_downloaded_fixed_vs_lru`` is the yardstick: the best fixed set of images,
    chosen with hindsight (``bench.trace.fixed_set_gb``), over lru."""
    _repo_on_path()
    from bench.trace import fixed_set_gb, replay, zipf_trace
    requests, images = (2000, 200) if not QUICK else (500, 50)
    trace = zipf_trace(requests, images, alpha=0.9, seed=1)
    lru = replay(trace, cache_fraction=0.15, policy="lru")
    gdsf = replay(trace, cache_fraction=0.15, policy="gdsf")
    return {"trace_hit_ratio_lru": lru.hit_ratio,
            "trace_gb_downloaded_lru": float(lru.gb_downloaded),
            "trace_hit_ratio_gdsf": gdsf.hit_ratio,
            "trace_bytes_downloaded_gdsf_vs_lru": gdsf.gb_downloaded / lru.gb_downloaded,
            "trace_bytes_downloaded_fixed_vs_lru":
                fixed_set_gb(trace, cache_fraction=0.15) / lru.gb_downloaded}


def _hit_service(work: Path, notifier: Notifier, name: str,
                 storage: StorageBackend, bus: Any = None) -> CacheService:
    """A service on ``storage`` and SQLite with one 1 GiB image "hot" of 4 KiB of data;
    with ``bus`` (the notifier, a MessagingNotifier), as wired: each event is written to
    the outbox in the transaction of its change, and the bus delivers from there."""
    engine = make_engine(f"sqlite:///{work / f'{name}.db'}")
    upgrade(engine)
    images = InMemoryImageSource()
    images.add(Image(id="hot", name="hot", virtual_size=GIB,
                     updated_at=dt.datetime.now(dt.UTC)), b"x" * 4096)
    kept = SqlOutbox(engine) if bus is not None else None
    if bus is not None:
        bus.attach_outbox(kept, in_transactions=True)
    return CacheService(host="bench", storage=storage, images=images,
                        uow=SqlUnitOfWork(engine, outbox=kept), notifier=notifier)


def _hit_ratio_with(bus: Any, on: CacheService, off: CacheService) -> tuple[float, float, float]:
    """Median hit seconds with the bus and without, and their ratio. In blocks, each ended by
    a flush: the sender thread's work for one block's events falls within that block (the
    GIL is shared), not on the next block's hits."""
    for service in (on, off):
        service.create_volume(CTX, "hot", 1)
    times: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(10 if not QUICK else 3):
        for name, service in (("on", on), ("off", off)):
            for _ in range(20):
                started = time.perf_counter()
                result = service.create_volume(CTX, "hot", 1)
                times[name].append(time.perf_counter() - started)
                assert result.outcome is Outcome.HIT
                service.delete_volume(CTX, result.volume.id)
            bus.flush(60)
    on_s, off_s = statistics.median(times["on"]), statistics.median(times["off"])
    return on_s / off_s, on_s, off_s


@bench("notify_overhead_ratio", "notify_overhead_ratio_fakes", "events_lost_broker_down")
def bus_notifier(work: Path) -> Figures:
    """The bus notifier against a throwaway RabbitMQ, each event kept in the SQLite outbox as
    wired: hit latency with it over notifier none on the default storage (file), and on
    fake LVM (hits that cost only the bookkeeping: the worst case for the ratio); then the
    events a listener never got after a broker outage (20 s; quick: 5 s) during 50
    requests of one process."""
    _repo_on_path()
    try:
        from ivcache.adapters.notify.messaging import MessagingNotifier
    except ImportError as exc:
        raise Unavailable(f"no oslo.messaging (pip install 'ivcache[messaging]'): {exc}"
                          ) from exc
    from ivcache.adapters.notify import NullNotifier
    from tests.support.rabbitmq_server import (
        BusListener,
        RabbitServer,
        RabbitUnavailable,
        rabbit_missing,
    )
    reason = rabbit_missing()
    if reason:
        raise Unavailable(reason)
    try:
        server = RabbitServer.start()
    except RabbitUnavailable as exc:
        raise Unavailable(f"RabbitMQ did not start: {exc}") from exc
    listener = BusListener(server.url, "bench")
    try:
        figures: Figures = {}
        received = 0
        for kind, make in (("file", lambda d: FileStorage(work / d)),
                           ("fakes", lambda d: FakeLvmStorage(10**7))):
            bus = MessagingNotifier.connect(transport_url=server.url, host="bench",
                                            topics=["bench"], drain_seconds=120)
            on = _hit_service(work, bus, f"on-{kind}", make(f"on-{kind}"), bus=bus)
            off = _hit_service(work, NullNotifier(), f"off-{kind}", make(f"off-{kind}"))
            ratio, on_s, off_s = _hit_ratio_with(bus, on, off)
            bus.close()
            received += 1 + (200 if not QUICK else 60)
            name = "notify_overhead_ratio" + ("" if kind == "file" else "_fakes")
            figures[name] = ratio
            print(f"# bus_notifier ({kind}): hit p50 {on_s * 1000:.2f} ms with the bus, "
                  f"{off_s * 1000:.2f} ms without", file=sys.stderr)
        before = len(listener.wait_for(received, timeout=60))
        bus = MessagingNotifier.connect(transport_url=server.url, host="bench",
                                        topics=["bench"], drain_seconds=120)
        service = _hit_service(work, bus, "outage", FakeLvmStorage(10**7), bus=bus)
        outage = 5.0 if QUICK else 20.0
        for n in range(50):
            if n == 10:
                server.stop()
                down_at = time.monotonic()
            if n == 40:
                time.sleep(max(0.0, outage - (time.monotonic() - down_at)))
                server.restart()
            service.create_volume(CTX, "hot", 1)
            time.sleep(outage / 30 if 10 <= n < 40 else 0)
        bus.close()
        got = listener.wait_for(before + 50, timeout=60)
        print(f"# bus_notifier: {len(got) - before} of 50 events after the outage",
              file=sys.stderr)
        figures["events_lost_broker_down"] = float(before + 50 - len(got))
        return figures
    finally:
        listener.close()
        server.close()


def _many_workers(db: str) -> Bench:
    names: tuple[str, ...] = (f"downloads_for_16_concurrent_misses_threads_{db}",
                              f"downloads_for_16_concurrent_misses_processes_{db}",
                              f"bookkeeping_ms_p50_100_{db}", f"bookkeeping_ms_p50_100k_{db}",
                              f"bookkeeping_growth_ratio_{db}")
    if db == "postgres":
        names += ("hits_per_second_8_procs_postgres",)

    @bench(*names)
    def many_workers(work: Path) -> Figures:
        """Single flight with 16 concurrent misses (threads, processes), bookkeeping per hit
        with 100 vs 100k entries (quick: 10k), and for PostgreSQL hits/s of 8 processes.
        See bench/many_workers.py."""
        _repo_on_path()
        from bench.many_workers import run
        from tests.support.pg import PostgresUnavailable
        try:
            return run(work, quick=QUICK, db=db)
        except PostgresUnavailable as exc:
            raise Unavailable(f"no PostgreSQL server: {exc} (apt-get install -y postgresql)"
                              ) from exc

    many_workers.__name__ = f"many_workers_{db}"
    return many_workers


_many_workers("sqlite")
_many_workers("postgres")


def run_all(benches: list[tuple[Bench, tuple[str, ...]]]
            ) -> tuple[Figures, dict[str, str], dict[str, str]]:
    """Run each bench in a temporary directory: its figures, what was skipped and what
    failed, each with its reason. Nothing a bench raises stops the others."""
    figures: Figures = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for fn, names in benches:
        with tempfile.TemporaryDirectory(prefix=f"ivcache-bench-{fn.__name__}-",
                                         dir=os.environ.get("BENCH_DIR")) as tmp:
            started = time.perf_counter()
            try:
                got = fn(Path(tmp))
            except Unavailable as exc:
                print(f"# {fn.__name__}: skipped: {exc}", file=sys.stderr)
                skipped.update(dict.fromkeys(names, str(exc)))
                continue
            except Exception as exc:
                traceback.print_exc()
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                print(f"# {fn.__name__}: FAILED: {reason}", file=sys.stderr)
                failed.update(dict.fromkeys(names, reason))
                continue
            print(f"# {fn.__name__}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        missing = [n for n in names if n not in got]
        if missing:
            failed.update(dict.fromkeys(missing, f"{fn.__name__} did not give it"))
        figures.update(got)
    return figures, skipped, failed


def selected(wanted: list[str]) -> list[tuple[Bench, tuple[str, ...]]]:
    """The benches whose function name or a figure name contains one of ``wanted``
    (all of them when ``wanted`` is empty)."""
    if not wanted:
        return BENCHES
    return [(fn, names) for fn, names in BENCHES
            if any(w in fn.__name__ or any(w in n for n in names) for w in wanted)]


def main(argv: list[str] | None = None) -> int:
    wanted = sys.argv[1:] if argv is None else argv
    chosen = selected(wanted)
    if not chosen:
        print(f"bench: no bench matches {' '.join(wanted)}; the figures are listed in "
              "bench/run.py's @bench(...) lines", file=sys.stderr)
        return 2
    figures, skipped, failed = run_all(chosen)
    width = max((len(k) for k in [*figures, *skipped, *failed]), default=6)
    print(f"{'figure'.ljust(width)}  value")
    for name, value in figures.items():
        print(f"{name.ljust(width)}  {value:,.3f}")
    for label, names in (("skipped", skipped), ("FAILED", failed)):
        for name, reason in names.items():
            print(f"{name.ljust(width)}  {label}: {reason}")
    out = Path(".bench")
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"figures": figures, "skipped": skipped, "failed": failed, "quick": QUICK},
        indent=2) + "\n", encoding="utf-8")
    if failed or (skipped and os.environ.get("CI")):
        print(f"bench: {len(failed)} figures failed, {len(skipped)} skipped"
              + (" (CI is set: nothing may be skipped)" if os.environ.get("CI") else ""),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

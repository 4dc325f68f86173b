"""``make bench``: the figures the issues ask for, as ratios measured in one run.

Prints a table and writes ``.bench/results.json`` as ``{"figures": {name: number},
"skipped": {name: reason}, "failed": {name: reason}, "quick": bool}``.
``BENCH_QUICK=1`` shrinks every workload so the whole run takes under a minute.

Every bench is registered with the figures it gives (``@bench(...)``). One that cannot be
measured on this machine (no qemu-img, no Ceph bindings, not root for a loop mount, no
PostgreSQL, no Glance venv) raises ``Unavailable``: one line says why and the run goes on;
one that breaks is reported with its traceback and the run goes on too. The exit code is 1
if anything failed, or if anything was skipped while ``CI`` is set.
"""

from __future__ import annotations

import datetime as dt
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
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.adapters.sql.tables import cache_entries, host_totals
from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.adapters.storage.file import FileStorage
from ivcache.adapters.storage.qcow2 import Qcow2Storage
from ivcache.core.model import GIB, Image, Outcome, RequestContext
from ivcache.core.ports import StorageBackend
from ivcache.core.service import CacheService
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
    rows = [{"id": f"e{i}", "host": "bench", "image_id": f"filler-{i}",
             "volume_id": f"v{i}", "size_gb": 1, "image_updated_at": now,
             "image_hash": None, "state": "ready", "created_at": now,
             "last_used": now - dt.timedelta(seconds=entries - i), "hits": 0,
             "pinned": False, "claim_expires": None, "lease_until": None}
            for i in range(entries)]
    with engine.begin() as conn:
        conn.execute(cache_entries.insert(), rows)
        conn.execute(host_totals.insert(), [{"host": "bench", "count": entries,
                                             "size_gb": entries, "hits": 0, "misses": 0,
                                             "evictions": 0, "downloads": 0,
                                             "bytes_downloaded": 0}])
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
       "miss_seconds_raw_file", "qemu_img_convert_seconds")
def image_formats(work: Path) -> Figures:
    """Issue 9, file storage: a miss of a 1 GiB-virtual qcow2 image holding 512 MiB of data
    (quick: 256 / 64 MiB) against a miss of the same disk as raw, and against a bare
    ``qemu-img convert -O raw`` of the same qcow2 file (medians of 3 runs; quick: 1)."""
    need_tool("qemu-img", "qemu-utils")
    virtual, data = (1024, 512) if not QUICK else (256, 64)
    runs = 3 if not QUICK else 1
    raw = make_sparse_image(work / "img.raw", virtual_mib=virtual, data_mib=data)
    qcow2 = work / "img.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    images = LocalImageSource(work / "images")
    ids = {"raw": images.add_image(CTX, raw).id, "qcow2": images.add_image(CTX, qcow2).id}
    engine = make_engine(f"sqlite:///{work / 'formats.db'}")
    upgrade(engine)
    service = CacheService(host="bench", storage=FileStorage(work / "volumes"), images=images,
                           uow=SqlUnitOfWork(engine), notifier=RecordingNotifier(),
                           converter=ImagePipeline(work / "scratch"))
    misses: dict[str, list[float]] = {"raw": [], "qcow2": []}
    for _ in range(runs):
        for fmt, image_id in ids.items():
            result = service.create_volume(CTX, image_id, 1)
            assert result.outcome is Outcome.MISS
            misses[fmt].append(result.seconds)
            service.delete_volume(CTX, result.volume.id)
            service.evict(everything=True)
    out = work / "bare.raw"

    def bare() -> None:
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2),
                        str(out)], check=True)
        out.unlink()

    bare_s = _median_time(bare, runs)
    raw_s, qcow2_s = statistics.median(misses["raw"]), statistics.median(misses["qcow2"])
    return {"miss_qcow2_vs_raw_ratio": qcow2_s / raw_s,
            "convert_vs_qemu_img_ratio": qcow2_s / bare_s,
            "miss_seconds_qcow2_file": qcow2_s, "miss_seconds_raw_file": raw_s,
            "qemu_img_convert_seconds": bare_s}


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


@bench("hit_vs_miss_speedup_reflink", "miss_seconds_reflink", "hit_seconds_reflink",
       "clone_ms_p50_reflink")
def hit_vs_miss_reflink(work: Path) -> Figures:
    """File storage on a loop-mounted XFS (mkfs.xfs -m reflink=1): a hit is a reflink."""
    if os.geteuid() != 0:
        raise Unavailable("a loop-mounted XFS needs root")
    need_tool("mkfs.xfs", "xfsprogs")
    image, mount = work / "xfs.img", work / "xfs"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(2 * GIB)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", device, str(mount)], check=True)
        try:
            storage = FileStorage(mount / "volumes")
            figures = _hit_vs_miss_on(work, storage, "reflink")
            assert storage.last_clone_method == "reflink"
            return figures
        finally:
            subprocess.run(["umount", str(mount)], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@bench("hit_vs_miss_speedup_rbd", "miss_seconds_rbd", "hit_seconds_rbd",
       "clone_ms_p50_rbd")
def hit_vs_miss_rbd(work: Path) -> Figures:
    """As hit_vs_miss_file, on a throwaway single-node Ceph (1 GiB / 512 MiB; quick: 128 MiB),
    and the p50 of a bare RBD clone of a cache volume."""
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


@bench("trace_hit_ratio_lru", "trace_gb_downloaded_lru")
def trace_lru(work: Path) -> Figures:
    """A seeded Zipf trace (2,000 requests over 200 images of 1–20 GiB, alpha 0.9; quick:
    500 over 50) through the service on fakes, the cache at 15 % of the working set
    (bench/trace.py; replay your own log with `python bench/trace.py --log FILE`)."""
    _repo_on_path()
    from bench.trace import replay, zipf_trace
    requests, images = (2000, 200) if not QUICK else (500, 50)
    result = replay(zipf_trace(requests, images, alpha=0.9, seed=1), cache_fraction=0.15)
    return {"trace_hit_ratio_lru": result.hit_ratio,
            "trace_gb_downloaded_lru": float(result.gb_downloaded)}


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


def main() -> int:
    figures, skipped, failed = run_all(BENCHES)
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

"""A throwaway single-node Ceph cluster for the RBD tests and the benchmark.

One monitor and one bluestore OSD on a sparse file, no auth, bound to 127.0.0.1, one
replica, a pool ``rbd`` initialised for RBD. Everything lives in one temporary directory;
``stop`` ends the daemons this object started (by PID) and removes the directory.

    with CephCluster.start() as ceph:
        RbdStorage("rbd", conf=str(ceph.conf))

Needs the Debian packages ceph-mon, ceph-osd and ceph-common (not Python: the daemons and
the ``ceph`` tool run as subprocesses).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

__all__ = ["CephCluster", "CephUnavailable", "ceph_missing", "new_namespace"]

_TOOLS = ("ceph-mon", "ceph-osd", "ceph", "monmaptool", "rbd")
_BLOCK_BYTES = 4 << 30
# Ceph's default in-memory debug logging costs CPU on every operation, which two shared
# cores feel in every test. Nothing here is debugged from those logs.
_QUIET = "".join(f"debug {sub} = 0/0\n" for sub in (
    "ms", "osd", "bluestore", "bluefs", "bdev", "rocksdb", "mon", "paxos", "rbd", "objecter",
    "rados", "monc", "auth", "journal", "objectcacher", "client", "finisher", "heartbeatmap",
    "perfcounter", "asok", "throttle", "timer", "filer", "striper", "optracker", "context",
    "crush", "mgrc", "mgr", "osd_scrub"))


class CephUnavailable(RuntimeError):
    """The cluster could not be started (tools missing, a daemon failed)."""


def ceph_missing() -> str | None:
    """Why a cluster cannot be started here, or None if it can."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not found: apt-get install ceph-mon ceph-osd "
                "ceph-common")
    return None


def _die_with_parent() -> None:
    # Runs in the daemon before exec: if the process that started it dies without stopping
    # it (killed by a timeout, say), the kernel kills the daemon too; nothing lingers.
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class CephCluster:
    """A running cluster; make one with ``CephCluster.start()``."""

    def __init__(self, root: Path, block_dir: Path) -> None:
        self.root = root
        self.block_dir = block_dir
        self.conf = root / "ceph.conf"
        self.pool = "rbd"
        self._procs: list[subprocess.Popen[bytes]] = []

    @classmethod
    def start(cls, *, timeout: float = 120, block_dir: Path | None = None) -> CephCluster:
        """Start a cluster; ``block_dir`` holds the OSD's block file (default: the cluster's
        temporary directory; a tmpfs such as /dev/shm makes every write faster)."""
        reason = ceph_missing()
        if reason:
            raise CephUnavailable(reason)
        root = Path(tempfile.mkdtemp(prefix="ivcache-ceph-"))
        blocks = Path(tempfile.mkdtemp(prefix="ivcache-ceph-block-", dir=block_dir or root))
        cluster = cls(root, blocks)
        try:
            cluster._bootstrap(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def __enter__(self) -> CephCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def ceph(self, *args: str, timeout: float = 60) -> str:
        """Run the ``ceph`` tool against this cluster; return its stdout."""
        return self._run("ceph", "-c", str(self.conf), "--connect-timeout", "30", *args,
                         timeout=timeout)

    def create_pool(self, name: str) -> str:
        """Make another pool, initialised for RBD (a no-op if it exists); its name."""
        self.ceph("osd", "pool", "create", name, "8", "8")
        self._run("rbd", "-c", str(self.conf), "pool", "init", name, timeout=120)
        return name

    def stop(self) -> None:
        """End the daemons started here (OSD first), then remove the directory."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            # The data is thrown away: a daemon slow to shut down cleanly is killed.
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        shutil.rmtree(self.block_dir, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def _bootstrap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        fsid = str(uuid.uuid4())
        port = _free_port()
        for sub in ("mon", "osd", "run", "log"):
            (self.root / sub).mkdir()
        r = self.root
        # The block file sits outside the OSD's data directory: inside it, bluestore's
        # symlink to it loops (ELOOP).
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{port}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.1/32
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
mon data = {r}/mon/$name
osd data = {r}/osd/$name
run dir = {r}/run
admin socket = {r}/run/$name.asok
pid file = {r}/run/$name.pid
log file = {r}/log/$name.log
mon cluster log file = {r}/log/cluster.log
crash dir = {r}/crash
osd objectstore = bluestore
bluestore block path = {self.block_dir}/$name.block
bluestore block create = true
bluestore block size = {_BLOCK_BYTES}
osd memory target = 1073741824
mon warn on pool no redundancy = false
mon osd down out interval = 0
# The monitor batches map changes for a second by default: start-up makes several in turn.
paxos propose interval = 0.05
paxos min wait = 0.01
{_QUIET}""", encoding="utf-8")
        conf = ("-c", str(self.conf))
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{port}]", str(r / "monmap"))
        self._run("ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", str(r / "monmap"))
        self._daemon("ceph-mon", *conf, "-f", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "create", osd_uuid).strip()
        (r / "osd" / f"osd.{osd_id}").mkdir()
        self._run("ceph-osd", *conf, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid,
                  timeout=120)
        self.ceph("osd", "crush", "add", f"osd.{osd_id}", "1.0", "host=localhost")
        self.ceph("osd", "crush", "move", "localhost", "root=default")
        self._daemon("ceph-osd", *conf, "-f", "-i", osd_id)
        self.ceph("osd", "pool", "create", self.pool, "8", "8")
        self._wait_osd_up(osd_id, deadline)
        self._run("rbd", *conf, "pool", "init", self.pool, timeout=max(5, deadline -
                                                                          time.monotonic()))

    def _wait_osd_up(self, osd_id: str, deadline: float) -> None:
        while True:
            self._check_daemons()
            if self.ceph("osd", "dump").count(f"osd.{osd_id} up ") == 1:
                return
            if time.monotonic() > deadline:
                raise CephUnavailable(f"osd.{osd_id} did not come up; see {self.root}/log")
            time.sleep(0.5)

    def _check_daemons(self) -> None:
        for proc in self._procs:
            if proc.poll() is not None:
                raise CephUnavailable(f"{proc.args!r} exited with {proc.returncode}; see "
                                      f"{self.root}/log")

    def _daemon(self, *args: str) -> None:
        log = open(self.root / "log" / f"{Path(args[0]).name}.out", "ab")  # noqa: SIM115
        with log:
            self._procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL,
                                                start_new_session=True,
                                                preexec_fn=_die_with_parent))

    def _run(self, *args: str, timeout: float = 60) -> str:
        env = {**os.environ, "CEPH_CONF": str(self.conf)}
        # The ceph tool is Debian's /usr/bin/python3 script: a venv's variables must not
        # leak into it.
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(var, None)
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                  env=env, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            raise CephUnavailable(f"{' '.join(args)} timed out after {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise CephUnavailable(f"{' '.join(args)} failed ({done.returncode}): "
                                  f"{done.stderr.strip()[-500:]}")
        return done.stdout



def new_namespace(conf: str | os.PathLike[str], pool: str = "rbd") -> str:
    """Make a new, empty RBD namespace in ``pool``: a fresh pool for one test, at no cost."""
    name = f"t{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    subprocess.run(["rbd", "-c", str(conf), "namespace", "create", "--pool", pool,
                    "--namespace", name], check=True, capture_output=True, env=env,
                   stdin=subprocess.DEVNULL, timeout=60)
    return name

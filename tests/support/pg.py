"""A throwaway PostgreSQL server for the tests and the benchmarks (not part of ivcache).

    server = PostgresServer.start()          # initdb + pg_ctl on a free 127.0.0.1 port
    url = server.create_database("t1")       # postgresql+psycopg://postgres@127.0.0.1:P/t1
    ...
    server.stop()                            # pg_ctl stop, then the postmaster's PID

``initdb`` refuses to run as root, so as root the binaries run as the ``postgres`` system user
(``runuser``); as any other user they run as that user. Debian keeps the binaries in
``/usr/lib/postgresql/<version>/bin``, off PATH: they are found there too.
``IVCACHE_TEST_POSTGRES_URL`` names an existing server instead (see ``from_env``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

__all__ = ["ENV_URL", "PostgresServer", "PostgresUnavailable", "find_bin_dir"]

ENV_URL = "IVCACHE_TEST_POSTGRES_URL"
_SETTINGS = ("-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
             "-c full_page_writes=off -c max_connections=200")


class PostgresUnavailable(RuntimeError):
    """No server could be started here, with the reason."""


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: PATH first, then Debian's place."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = [d for d in Path("/usr/lib/postgresql").glob("*/bin")
             if (d / "pg_ctl").exists() and (d / "initdb").exists()]
    # The newest major version: "15" sorts after "9.6" numerically, not as text.
    found.sort(key=lambda d: [int(n) for n in re.findall(r"\d+", d.parent.name)])
    return found[-1] if found else None


def _runuser() -> str | None:
    # /usr/sbin is not on every PATH (sudo's secure_path has it; a plain su may not).
    found = shutil.which("runuser")
    if found:
        return found
    return next((p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)),
                None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """A running server: one this process started (``start``) or one named by a URL."""

    def __init__(self, url: str, *, directory: Path | None = None,
                 bin_dir: Path | None = None, pid: int | None = None) -> None:
        self.url = url
        self.directory = directory
        self.bin_dir = bin_dir
        self.pid = pid
        self._admin = create_engine(make_url(url), isolation_level="AUTOCOMMIT")

    @classmethod
    def from_env(cls) -> PostgresServer | None:
        url = os.environ.get(ENV_URL)
        return cls(url) if url else None

    @classmethod
    def start(cls) -> PostgresServer:
        """initdb a fresh cluster in a temporary directory and start it; under a second."""
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable("initdb/pg_ctl not found on PATH or under "
                                      f"/usr/lib/postgresql/*/bin (apt install postgresql, or "
                                      f"set {ENV_URL})")
        as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = _runuser()
            if runuser is None:
                raise PostgresUnavailable("running as root without runuser")
            try:
                import pwd
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no postgres "
                                          "user for initdb") from None
            as_user = [runuser, "-u", "postgres", "--"]
        # Under /tmp, not pytest's tmp_path: that is private to root, and the server runs
        # as postgres.
        directory = Path(tempfile.mkdtemp(prefix="ivcache-pg-"))
        if as_user:
            os.chown(directory, pw.pw_uid, pw.pw_gid)
        data, port = directory / "data", _free_port()
        try:
            subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U",
                            "postgres", "--auth=trust", "-E", "UTF8", "--locale=C",
                            "--no-sync"],
                           check=True, capture_output=True, text=True, timeout=120)
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l",
                            str(directory / "log"), "-w", "-t", "60", "start", "-o",
                            f"-p {port} -k {directory} {_SETTINGS}"],
                           check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as exc:
            log = directory / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            shutil.rmtree(directory, ignore_errors=True)
            raise PostgresUnavailable(
                f"{' '.join(exc.cmd[:6])}... failed: {exc.stderr.strip()} {tail}") from exc
        pid = int((data / "postmaster.pid").read_text().split()[0])
        return cls(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
                   directory=directory, bin_dir=bin_dir, pid=pid)

    def create_database(self, prefix: str = "t") -> str:
        """A new, empty database; its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        """Drop a database made by ``create_database``, closing whatever still uses it."""
        name = make_url(url).database
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def stop(self) -> None:
        """Stop a server this process started (pg_ctl, then its PID) and remove its files.

        Immediate mode: the cluster is thrown away, so a shutdown checkpoint is wasted time.
        """
        self._admin.dispose()
        if self.directory is None or self.bin_dir is None:
            return
        runuser = _runuser() if os.geteuid() == 0 else None
        as_user = [runuser, "-u", "postgres", "--"] if runuser else []
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([*as_user, str(self.bin_dir / "pg_ctl"), "-D",
                            str(self.directory / "data"), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=30, check=False)
        if self.pid is not None:
            deadline = time.monotonic() + 10
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; it only waits for whoever adopted it (init) to reap it.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"

"""A real glance-api for tests and benchmarks: installed from PyPI into its own venv, run
under gunicorn on 127.0.0.1 with SQLite, a file store and the trusted-header pipeline.

Not part of the ivcache package: the test fixtures (tests/conftest.py) and ``make bench``
import it. See ../shared/recipes/glance.md for the measured recipe it follows.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "GLANCE_REQUIREMENTS",
    "Caller",
    "GlanceServer",
    "Identity",
    "cached_venv",
    "ensure_glance_venv",
    "ensure_venv",
    "free_port",
]

# Glance 33 is the release the recipe was measured on; the next major may change the paste
# pipeline or the WSGI entry point.
GLANCE_REQUIREMENTS = ("glance>=33,<34", "gunicorn")

Identity = tuple[str, str, tuple[str, ...]]
#: Who calls the tiny client: trusted-header identities, or a Keystone token.
Caller = Identity | str


def cached_venv(name: str, override: str) -> Path:
    """Where a test service's venv lives: ``$override`` if set, else under the user's cache
    folder (``~/.cache/NAME/venv``), kept between runs."""
    chosen = os.environ.get(override)
    if chosen:
        return Path(chosen)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / name / "venv"


def _default_venv() -> Path:
    return cached_venv("ivcache-test-glance", "IVCACHE_TEST_GLANCE_VENV")


def ensure_glance_venv(venv: Path | None = None) -> Path:
    """Install Glance and gunicorn into ``venv`` unless already there (about 25 s once)."""
    return ensure_venv(venv or _default_venv(), GLANCE_REQUIREMENTS)


def ensure_venv(venv: Path, requirements: Sequence[str]) -> Path:
    """Install ``requirements`` from PyPI into ``venv`` unless already there.

    Kept outside the project's venv (OpenStack's services pin half of OpenStack) and cached
    between runs; a lock file keeps two test runs from installing at once. pip's output is
    shown only if it fails (then CalledProcessError).
    """
    marker = venv / ".ivcache-installed"
    wanted = "\n".join(requirements)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == wanted:
            return venv
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", *requirements],
                             capture_output=True, text=True, check=False)
        if pip.returncode:
            sys.stderr.write(pip.stdout + pip.stderr)
            pip.check_returncode()
        marker.write_text(wanted)
    return venv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_API_CONF = """\
[DEFAULT]
enabled_backends = fs:file
bind_host = 127.0.0.1
log_file = {work}/glance-api.log
[database]
connection = sqlite:///{data}/glance.db
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = {data}/images/
[os_glance_staging_store]
filesystem_store_datadir = {data}/staging/
[os_glance_tasks_store]
filesystem_store_datadir = {data}/tasks/
[paste_deploy]
flavor = {flavor}
"""

# The packaged paste file uses the unauthenticated context (403 to everything under the new
# policy defaults, no project isolation): this one trusts the X-* identity headers, as
# Glance behind keystonemiddleware would.
_PASTE = """\
[composite:glance-api-trusted]
paste.composite_factory = glance.api:root_app_factory
/: api-trusted

[pipeline:api-trusted]
pipeline = versionnegotiation context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory

[composite:glance-api-keystone]
paste.composite_factory = glance.api:root_app_factory
/: api-keystone

[pipeline:api-keystone]
pipeline = versionnegotiation authtoken context rootapp

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
delay_auth_decision = true
"""

# Who asked for what: the token of each request, so that a test can tell whose credentials
# were used (the log is the test Glance's, on loopback).
# (%(U)s would be the path as the app left it: paste strips the /v2.)
_ACCESS_FORMAT = "%(s)s %({x-auth-token}i)s %(r)s"


class GlanceServer:
    """One glance-api process in ``work``; ``start()``/``stop()`` it, by PID.

    With ``authtoken`` (the options of ``[keystone_authtoken]``: auth_url, username,
    password, ...) Glance checks Keystone tokens through keystonemiddleware; without it, it
    trusts the X-* identity headers. With ``shares``, it serves that other server's database
    and store: the same images through another pipeline.
    """

    def __init__(self, work: Path, *, venv: Path | None = None, port: int | None = None,
                 threads: int = 4, authtoken: Mapping[str, str] | None = None,
                 shares: GlanceServer | None = None) -> None:
        self.work = Path(work).absolute()
        self.data: Path = shares.data if shares else self.work
        self.venv = venv or _default_venv()
        self.port = port or free_port()
        self.threads = threads
        self.authtoken = dict(authtoken or {})
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def access_log_path(self) -> Path:
        return self.work / "access.log"

    def requests(self) -> list[tuple[str, str, int, str]]:
        """Every request served so far: (method, path, status, X-Auth-Token or "-")."""
        if not self.access_log_path.exists():
            return []
        seen = []
        for line in self.access_log_path.read_text().splitlines():
            status, token, method, target = line.split(" ")[:4]
            seen.append((method, target.split("?")[0], int(status), token))
        return seen

    @property
    def store(self) -> Path:
        """Where the file store keeps image data: one file per image id."""
        return self.data / "images"

    def configure(self) -> None:
        conf = self.work / "etc"
        conf.mkdir(parents=True, exist_ok=True)
        for sub in ("images", "staging", "tasks"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        text = _API_CONF.format(work=self.work, data=self.data,
                                flavor="keystone" if self.authtoken else "trusted")
        if self.authtoken:
            text += "[keystone_authtoken]\n" + "".join(
                f"{k} = {v}\n" for k, v in self.authtoken.items())
        (conf / "glance-api.conf").write_text(text)
        (conf / "glance-api-paste.ini").write_text(_PASTE)
        if self.data != self.work:
            return  # the other server made the schema
        subprocess.run([str(self.venv / "bin" / "glance-manage"), "--config-file",
                        str(conf / "glance-api.conf"), "db", "sync"],
                       check=True, capture_output=True, env=self._env())

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "PYTHON"))}
        env["OS_GLANCE_CONFIG_DIR"] = str(self.work / "etc")
        return env

    def start(self, timeout: float = 60.0) -> None:
        if not (self.work / "etc" / "glance-api.conf").exists():
            self.configure()
        log = open(self.work / "gunicorn.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [str(self.venv / "bin" / "gunicorn"), "--no-control-socket", "--bind",
             f"127.0.0.1:{self.port}", "--workers", "1", "--threads", str(self.threads),
             "--timeout", "300", "--access-logfile", str(self.access_log_path),
             "--access-logformat", _ACCESS_FORMAT, "glance.wsgi.api:application"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env(),
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"glance-api exited with {self.process.returncode}: "
                                   f"see {self.work / 'gunicorn.log'}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"{self.url}/versions", timeout=2) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"glance-api did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> GlanceServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- a tiny client, for setting up what the tests need ---------------------------------

    @staticmethod
    def identity(project: str, *, admin: bool = False) -> Identity:
        roles = ("member", "reader", "admin") if admin else ("member", "reader")
        return project, f"{project}-user", roles

    @staticmethod
    def headers(who: Caller) -> dict[str, str]:
        if isinstance(who, str):
            return {"X-Auth-Token": who}
        project, user, roles = who
        return {"X-Identity-Status": "Confirmed", "X-Project-Id": project,
                "X-User-Id": user, "X-Roles": ",".join(roles)}

    def call(self, who: Caller, method: str, path: str, body: bytes | None = None,
             content_type: str = "application/json") -> Any:
        headers = self.headers(who)
        if body is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(f"{self.url}/v2{path}", data=body, method=method,
                                         headers=headers)
        with urllib.request.urlopen(request, timeout=300) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def create_image(self, who: Caller, data: bytes | Iterable[bytes], *,
                     name: str = "test", visibility: str = "private",
                     min_disk: int = 0, disk_format: str = "raw",
                     container_format: str = "bare") -> str:
        """Create and upload an image; return its id once it is ``active``.

        An upload Glance refuses (its own format checks) raises ``urllib.error.HTTPError``.
        """
        doc = self.call(who, "POST", "/images", json.dumps(
            {"name": name, "disk_format": disk_format, "container_format": container_format,
             "visibility": visibility, "min_disk": min_disk}).encode())
        image_id: str = doc["id"]
        body = data if isinstance(data, bytes) else _Chunks(data)
        request = urllib.request.Request(
            f"{self.url}/v2/images/{image_id}/file", data=body, method="PUT",
            headers={**self.headers(who), "Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=600) as resp:
            resp.read()
        return image_id

    def patch(self, who: Caller, image_id: str, ops: list[dict[str, Any]]) -> Any:
        return self.call(who, "PATCH", f"/images/{image_id}", json.dumps(ops).encode(),
                         "application/openstack-images-v2.1-json-patch")

    def delete(self, who: Caller, image_id: str) -> None:
        self.call(who, "DELETE", f"/images/{image_id}")

    def share(self, owner: Caller, image_id: str, member: Caller,
              member_project: str | None = None) -> None:
        """Make the image shared with ``member``'s project, and accept as that member
        (a token caller names its project in ``member_project``)."""
        project = member[0] if not isinstance(member, str) else member_project
        if not project:
            raise ValueError("a token caller's project must be named (member_project)")
        self.patch(owner, image_id, [{"op": "replace", "path": "/visibility",
                                      "value": "shared"}])
        self.call(owner, "POST", f"/images/{image_id}/members",
                  json.dumps({"member": project}).encode())
        self.call(member, "PUT", f"/images/{image_id}/members/{project}",
                  json.dumps({"status": "accepted"}).encode())

    def get(self, who: Caller, image_id: str) -> Any:
        return self.call(who, "GET", f"/images/{image_id}")


class _Chunks:
    """An iterable request body (urllib sends it chunked), so a big image never sits in
    memory whole."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

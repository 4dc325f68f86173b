"""A real Keystone, and a glance-api that checks its tokens, for tests and benchmarks.

Keystone 30 and Glance 33 from PyPI in one venv outside the project's, both under gunicorn
on 127.0.0.1 with SQLite; Glance checks tokens through keystonemiddleware. Follows the
measured recipe ../shared/recipes/keystone.md, pitfalls included: Keystone parses
``sys.argv`` at import (a shim clears it), validates slowly without its cache (an in-process
dogpile cache, one worker), hashes passwords slowly at bcrypt's default (4 rounds here), and
keystonemiddleware looks up the internal identity endpoint (all three are bootstrapped).

``OpenStack`` starts both and creates the identities ivcache needs; ``new_user`` makes a
project with a member in it for one test. Not part of the ivcache package.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import attrs
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

from tests.support.glance_server import (
    GLANCE_REQUIREMENTS,
    GlanceServer,
    cached_venv,
    ensure_venv,
    free_port,
)

__all__ = [
    "KEYSTONE_REQUIREMENTS",
    "KeystoneServer",
    "OpenStack",
    "User",
    "ensure_keystone_venv",
]

# Keystone 30 is the release the recipe was measured on; Glance's pin is glance_server's.
KEYSTONE_REQUIREMENTS = ("keystone>=30,<31", *GLANCE_REQUIREMENTS)

ADMIN_PASSWORD = "pw-admin"


def _default_venv() -> Path:
    return cached_venv("ivcache-test-keystone", "IVCACHE_TEST_KEYSTONE_VENV")


def ensure_keystone_venv(venv: Path | None = None) -> Path:
    """Install Keystone, Glance and gunicorn into one venv unless already there (~35 s)."""
    return ensure_venv(venv or _default_venv(), KEYSTONE_REQUIREMENTS)


_KEYSTONE_CONF = """\
[DEFAULT]
log_file = {work}/keystone.log
[database]
connection = sqlite:///{work}/keystone.db
[identity]
password_hash_rounds = 4
[token]
provider = fernet
[fernet_tokens]
key_repository = {work}/fernet-keys/
[credential]
key_repository = {work}/credential-keys/
[cache]
enabled = true
backend = dogpile.cache.memory
"""

# oslo.config in Keystone parses sys.argv at import: gunicorn's arguments would make every
# worker exit with "unrecognized arguments", restarted forever.
_SHIM = """\
import sys

sys.argv = sys.argv[:1]

from keystone.wsgi.api import application  # noqa: E402,F401
"""


def _wait_for(url: str, process: subprocess.Popen[bytes], what: str, log: Path,
              timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: see {log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status < 400:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer on {url} within {timeout} s: see {log}")


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    # terminate() and wait() on the Popen reap the child: PID 1 here reaps nothing, and a
    # zombie still answers kill -0.
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class KeystoneServer:
    """One Keystone process in ``work``; ``start()``/``stop()`` it, by its Popen."""

    def __init__(self, work: Path, *, venv: Path | None = None, port: int | None = None) -> None:
        self.work = Path(work).absolute()
        self.venv = venv or _default_venv()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth_url = f"{self.url}/v3"
        self.process: subprocess.Popen[bytes] | None = None
        self._admin: ks_session.Session | None = None

    @property
    def conf(self) -> Path:
        return self.work / "etc" / "keystone.conf"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "PYTHON"))}
        env["OS_KEYSTONE_CONFIG_DIR"] = str(self.conf.parent)
        env["PYTHONWARNINGS"] = "ignore"
        return env

    def _manage(self, *args: str) -> None:
        done = subprocess.run([str(self.venv / "bin" / "keystone-manage"), "--config-file",
                               str(self.conf), *args],
                              capture_output=True, text=True, env=self._env(), check=False)
        if done.returncode:
            raise RuntimeError(f"keystone-manage {args[0]} failed: {done.stderr[-2000:]}")

    def configure(self) -> None:
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        for keys in ("fernet-keys", "credential-keys"):
            (self.work / keys).mkdir(mode=0o700, exist_ok=True)
        self.conf.write_text(_KEYSTONE_CONF.format(work=self.work))
        (self.conf.parent / "ks_wsgi.py").write_text(_SHIM)
        self._manage("db_sync")
        # No `keystone` user exists here; the key folders must not be world readable.
        self._manage("fernet_setup", "--keystone-user", "root", "--keystone-group", "root")
        self._manage("credential_setup", "--keystone-user", "root", "--keystone-group", "root")
        self._manage("bootstrap", "--bootstrap-password", ADMIN_PASSWORD,
                     "--bootstrap-region-id", "RegionOne",
                     *(arg for kind in ("public", "internal", "admin")
                       for arg in (f"--bootstrap-{kind}-url", self.auth_url)))

    def start(self, timeout: float = 60.0) -> None:
        if not self.conf.exists():
            self.configure()
        log_path = self.work / "gunicorn.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [str(self.venv / "bin" / "gunicorn"), "--no-control-socket", "--chdir",
             str(self.conf.parent), "--bind", f"127.0.0.1:{self.port}", "--workers", "1",
             "--threads", "4", "ks_wsgi:application"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env(),
            start_new_session=True)
        log.close()
        try:
            _wait_for(self.auth_url, self.process, "keystone", log_path, timeout)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        process, self.process = self.process, None
        _stop(process)

    # -- the admin's client ----------------------------------------------------------------

    def admin(self) -> ks_session.Session:
        """A session with a system-scoped admin token (the bootstrap admin)."""
        if self._admin is None:
            auth = v3.Password(auth_url=self.auth_url, username="admin",
                               password=ADMIN_PASSWORD, user_domain_id="default",
                               system_scope="all")
            self._admin = ks_session.Session(auth=auth)
        return self._admin

    def api(self, method: str, path: str, body: dict[str, Any] | None = None,
            headers: dict[str, str] | None = None) -> Any:
        response = self.admin().request(f"{self.auth_url}{path}", method, json=body,
                                        headers=headers or {})
        return response.json() if response.content else None

    def role_id(self, name: str) -> str:
        roles = self.api("GET", f"/roles?name={name}")["roles"]
        return str(roles[0]["id"])

    def create_project(self, name: str) -> str:
        doc = self.api("POST", "/projects", {"project": {"name": name, "domain_id": "default"}})
        return str(doc["project"]["id"])

    def create_user(self, name: str, password: str, project_id: str,
                    roles: tuple[str, ...] = ("member", "reader")) -> str:
        doc = self.api("POST", "/users", {"user": {
            "name": name, "password": password, "domain_id": "default",
            "default_project_id": project_id}})
        user_id = str(doc["user"]["id"])
        for role in roles:
            self.grant(user_id, project_id, role)
        return user_id

    def grant(self, user_id: str, project_id: str, role: str) -> None:
        self.api("PUT", f"/projects/{project_id}/users/{user_id}/roles/{self.role_id(role)}")

    def token(self, username: str, password: str, project_id: str) -> str:
        """A new project-scoped token for the user (a password login)."""
        auth = v3.Password(auth_url=self.auth_url, username=username, password=password,
                           user_domain_id="default", project_id=project_id)
        token = ks_session.Session(auth=auth).get_token()
        assert token
        return token

    def revoke(self, token: str) -> None:
        self.api("DELETE", "/auth/tokens", headers={"X-Subject-Token": token})

    def whose(self, token: str) -> str:
        """The name of the user a token belongs to (expired or revoked ones too)."""
        doc = self.api("GET", "/auth/tokens?allow_expired=1&nocatalog=1",
                       headers={"X-Subject-Token": token})
        return str(doc["token"]["user"]["name"])

    def add_service(self, service_type: str, name: str, url: str) -> None:
        service = self.api("POST", "/services", {"service": {"type": service_type,
                                                             "name": name}})
        for interface in ("public", "internal", "admin"):
            self.api("POST", "/endpoints", {"endpoint": {
                "service_id": service["service"]["id"], "interface": interface, "url": url,
                "region_id": "RegionOne"}})


@attrs.frozen
class User:
    """A user of the test Keystone, a member of its own project."""

    name: str
    password: str
    user_id: str
    project: str
    project_id: str

    def cloud(self, auth_url: str) -> dict[str, Any]:
        """This user's clouds.yaml entry."""
        return {"auth": {"auth_url": auth_url, "username": self.name,
                         "password": self.password, "user_domain_id": "default",
                         "project_id": self.project_id},
                "identity_api_version": 3, "region_name": "RegionOne"}


class OpenStack:
    """Keystone, a Glance that checks its tokens, and ivcache's two identities.

    - ``internal``: the internal tenant (project ``internal``, user ``ivcache-internal``),
      with Glance's ``admin`` role so that it sees every image (the cache's own questions);
    - ``service``: ivcache's service user (project ``service``), with Keystone's ``service``
      role, which may validate other users' tokens.

    ``clouds_yaml`` holds both as clouds ``ivcache-internal`` and ``ivcache-service``, plus
    one cloud per user made with ``new_user(..., cloud=True)``.
    """

    def __init__(self, work: Path, *, venv: Path | None = None) -> None:
        self.work = Path(work).absolute()
        self.venv = venv or ensure_keystone_venv()
        self.keystone = ks = KeystoneServer(self.work / "keystone", venv=self.venv)
        self.glance = GlanceServer(self.work / "glance", venv=self.venv, authtoken={
            "www_authenticate_uri": ks.url, "auth_url": ks.url, "auth_type": "password",
            "user_domain_id": "default", "project_domain_id": "default",
            "project_name": "service", "username": "glance", "password": "pw-glance"})
        self.clouds_yaml = self.work / "clouds.yaml"
        self._clouds: dict[str, dict[str, Any]] = {}
        self._users: dict[str, User] = {}
        self.startup_seconds = 0.0

    @property
    def internal(self) -> User:
        return self._users["ivcache-internal"]

    @property
    def service(self) -> User:
        return self._users["ivcache-service"]

    def start(self) -> None:
        started = time.monotonic()
        self.keystone.start()
        try:
            ks = self.keystone
            service_project = ks.create_project("service")
            ks.create_user("glance", "pw-glance", service_project, ("service", "admin"))
            ks.add_service("image", "glance", self.glance.url)
            self.add_cloud("ivcache-service", User(
                "ivcache", "pw-ivcache",
                ks.create_user("ivcache", "pw-ivcache", service_project, ("service",)),
                "service", service_project))
            internal_project = ks.create_project("internal")
            self.add_cloud("ivcache-internal", User(
                "ivcache-internal", "pw-internal",
                ks.create_user("ivcache-internal", "pw-internal", internal_project,
                               ("admin",)),
                "internal", internal_project))
            self.glance.start()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        self.glance.stop()
        self.keystone.stop()

    def __enter__(self) -> OpenStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def new_user(self, prefix: str, *, cloud: bool = False,
                 roles: tuple[str, ...] = ("member", "reader")) -> User:
        """A fresh project ``PREFIX-xxxx`` and its member ``PREFIX-xxxx-user``."""
        project = f"{prefix}-{uuid.uuid4().hex[:8]}"
        project_id = self.keystone.create_project(project)
        name, password = f"{project}-user", f"pw-{project}"
        user = User(name, password, self.keystone.create_user(name, password, project_id,
                                                              roles),
                    project, project_id)
        if cloud:
            self.add_cloud(project, user)
        return user

    def token(self, user: User) -> str:
        return self.keystone.token(user.name, user.password, user.project_id)

    def add_cloud(self, name: str, user: User) -> None:
        self._users[name] = user
        self._clouds[name] = user.cloud(self.keystone.auth_url)
        # JSON is YAML: openstacksdk reads it as clouds.yaml.
        self.clouds_yaml.write_text(json.dumps({"clouds": self._clouds}, indent=2))

"""The INI configuration, with Cinder's option names so a backend section can be pasted.

Where no file is given, everything lives under ``$IVCACHE_HOME``
(default ``~/.local/share/ivcache``).
"""

from __future__ import annotations

import configparser
import os
import socket
from collections.abc import Mapping
from pathlib import Path

import attrs

from ivcache.core.errors import ConfigError
from ivcache.core.model import InternalTenant
from ivcache.core.policy import CachePolicy

__all__ = [
    "IMAGE_SOURCES",
    "NOTIFIERS",
    "STORAGE_KINDS",
    "Config",
    "GlanceConfig",
    "default_home",
    "load_config",
]

STORAGE_KINDS = ("file", "qcow2", "rbd", "fake-lvm", "fake-rbd")
IMAGE_SOURCES = ("local", "glance")
NOTIFIERS = ("log", "otel", "none")

# Options of the cache itself, read from [DEFAULT] (or the section named by
# [ivcache] backend = NAME, as in a Cinder backend section). Other [DEFAULT] options are
# ignored: an operator's pasted section may carry the driver's own.
_CACHE_OPTIONS = {
    "host",
    "cinder_internal_tenant_project_id",
    "cinder_internal_tenant_user_id",
    "image_volume_cache_enabled",
    "image_volume_cache_max_size_gb",
    "image_volume_cache_max_count",
    "image_volume_cache_max_size_count",
}
_IVCACHE_OPTIONS = {
    "backend", "database_url", "storage", "storage_path", "storage_capacity_gb",
    "image_source", "images_path", "notifier", "internal_tenant_quota_gb",
    "internal_tenant_quota_volumes", "claim_wait_seconds", "claim_lease_seconds",
    "rbd_pool", "rbd_conf", "rbd_user", "rbd_max_clone_depth",
}
_GLANCE_OPTIONS = {
    "url", "os_cloud", "auth", "insecure", "cafile", "connect_timeout", "read_timeout",
    "retries",
}


@attrs.frozen
class GlanceConfig:
    url: str = ""
    os_cloud: str = ""
    auth: str = "keystone"
    insecure: bool = False
    cafile: str = ""
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    retries: int = 3


@attrs.frozen
class Config:
    home: Path
    host: str
    tenant: InternalTenant
    policy: CachePolicy
    database_url: str
    storage: str
    storage_path: Path
    storage_capacity_gb: int
    image_source: str
    images_path: Path
    notifier: str = "log"
    glance: GlanceConfig = GlanceConfig()
    rbd_pool: str = "rbd"
    rbd_conf: str = "/etc/ceph/ceph.conf"
    rbd_user: str = ""
    rbd_max_clone_depth: int = 5
    source: Path | None = None

    def with_host(self, host: str | None) -> Config:
        return attrs.evolve(self, host=host) if host else self


def default_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    home = env.get("IVCACHE_HOME")
    if home:
        return Path(home).expanduser().absolute()
    return Path("~/.local/share/ivcache").expanduser()


def load_config(path: str | Path | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Read the config file (``path``, else ``$IVCACHE_CONFIG``, else defaults)."""
    env = os.environ if env is None else env
    chosen = path or env.get("IVCACHE_CONFIG") or None
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"),
                                       interpolation=None)
    base = default_home(env)
    source: Path | None = None
    if chosen:
        source = Path(chosen).expanduser().absolute()
        try:
            with open(source, encoding="utf-8") as fh:
                parser.read_file(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from exc
        except configparser.Error as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"config file {source} is not valid INI: {first}") from exc
    return _build(parser, base, source)


class _Reader:
    def __init__(self, parser: configparser.ConfigParser, section: str, where: str) -> None:
        self.parser, self.section, self.where = parser, section, where

    def raw(self, name: str) -> str | None:
        if self.parser.has_option(self.section, name):
            return self.parser.get(self.section, name).strip()
        return None

    def text(self, name: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self.raw(name)
        if value is None or value == "":
            return default
        if choices and value not in choices:
            raise ConfigError(f"{self.where}: option {name} = {value!r} is not one of "
                              f"{', '.join(choices)}")
        return value

    def integer(self, name: str, default: int) -> int:
        value = self.raw(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{self.where}: option {name} = {value!r} is not a whole "
                              "number") from None
        if number < 0:
            raise ConfigError(f"{self.where}: option {name} = {number} must be 0 or more")
        return number

    def number(self, name: str, default: float) -> float:
        value = self.raw(name)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{self.where}: option {name} = {value!r} is not a "
                              "number") from None
        if number < 0:
            raise ConfigError(f"{self.where}: option {name} = {number} must be 0 or more")
        return number

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None or value == "":
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{self.where}: option {name} = {value!r} is not true or false")


def _check_known(parser: configparser.ConfigParser, section: str, known: set[str],
                 where: str) -> None:
    if not parser.has_section(section):
        return
    defaults = set(parser.defaults())
    for name in parser.options(section):
        if name not in known and name not in defaults:
            raise ConfigError(f"{where}: unknown option {name!r} in [{section}]; known: "
                              f"{', '.join(sorted(known))}")


def _build(parser: configparser.ConfigParser, home: Path, source: Path | None) -> Config:
    where = str(source) if source else "defaults"
    _check_known(parser, "ivcache", _IVCACHE_OPTIONS, where)
    _check_known(parser, "glance", _GLANCE_OPTIONS, where)
    ivc = _Reader(parser, "ivcache" if parser.has_section("ivcache") else "DEFAULT", where)
    backend = ivc.text("backend", "")
    if backend and not parser.has_section(backend):
        raise ConfigError(f"{where}: option backend = {backend!r} names no section")
    cache = _Reader(parser, backend or "DEFAULT", where)
    base = source.parent if source else home

    def path(reader: _Reader, name: str, default: Path) -> Path:
        value = reader.raw(name)
        if not value:
            return default
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else (base / candidate)

    max_count = cache.integer("image_volume_cache_max_count",
                          cache.integer("image_volume_cache_max_size_count", 0))
    policy = CachePolicy(
        enabled=cache.flag("image_volume_cache_enabled", True),
        max_size_gb=cache.integer("image_volume_cache_max_size_gb", 0),
        max_count=max_count,
        claim_wait_seconds=ivc.number("claim_wait_seconds", 600.0),
        claim_lease_seconds=ivc.number("claim_lease_seconds", 3600.0),
    )
    tenant = InternalTenant(
        project_id=cache.text("cinder_internal_tenant_project_id", "internal"),
        user_id=cache.text("cinder_internal_tenant_user_id", "internal"),
        quota_gb=ivc.integer("internal_tenant_quota_gb", 0),
        quota_volumes=ivc.integer("internal_tenant_quota_volumes", 0),
    )
    g = _Reader(parser, "glance" if parser.has_section("glance") else "DEFAULT", where)
    glance = GlanceConfig(
        url=g.text("url", ""), os_cloud=g.text("os_cloud", ""),
        auth=g.text("auth", "keystone", ("keystone", "trusted-headers")),
        insecure=g.flag("insecure", False), cafile=g.text("cafile", ""),
        connect_timeout=g.number("connect_timeout", 10.0),
        read_timeout=g.number("read_timeout", 300.0), retries=g.integer("retries", 3),
    )
    database_url = ivc.text("database_url", "")
    if not database_url:
        database_url = f"sqlite:///{base / 'ivcache.db'}"
    elif database_url.startswith("sqlite:///") and not database_url.startswith("sqlite:////"):
        relative = database_url[len("sqlite:///"):]
        if relative and not relative.startswith(":memory:"):
            database_url = f"sqlite:///{base / relative}"
    return Config(
        home=home,
        host=cache.text("host", "") or socket.gethostname(),
        tenant=tenant,
        policy=policy,
        database_url=database_url,
        storage=ivc.text("storage", "file", STORAGE_KINDS),
        storage_path=path(ivc, "storage_path", base / "volumes"),
        storage_capacity_gb=ivc.integer("storage_capacity_gb", 1000),
        image_source=ivc.text("image_source", "local", IMAGE_SOURCES),
        images_path=path(ivc, "images_path", base / "images"),
        notifier=ivc.text("notifier", "log", NOTIFIERS),
        glance=glance,
        rbd_pool=ivc.text("rbd_pool", "rbd"),
        rbd_conf=ivc.text("rbd_conf", "/etc/ceph/ceph.conf"),
        rbd_user=ivc.text("rbd_user", ""),
        rbd_max_clone_depth=ivc.integer("rbd_max_clone_depth", 5),
        source=source,
    )

"""The INI configuration, with Cinder's option names so a backend section can be pasted.

Every option is one row of ``OPTIONS``: where it is read, its name, type, default, choices
and help. That table drives the parsing (configparser's own getters), the checks for unknown
and misplaced options and the reference page ``docs/configuration.md``, which is generated
from it::

    python -m ivcache.entrypoints.config --markdown > docs/configuration.md   # make docs

Without ``enabled_backends`` there is one implicit backend, ``default``: its cache options
come from [DEFAULT] (or the section ``[ivcache] backend`` names) and its storage options
from [ivcache], as before backends existed. With ``enabled_backends = a, b`` in [DEFAULT],
each named section is a backend with its own cache and storage options (Cinder's
multi-backend form; Cinder's other options there are the driver's and are ignored).

Where no file is given, everything lives under ``$IVCACHE_HOME``
(default ``~/.local/share/ivcache``); relative paths in a file are relative to the file.
"""

from __future__ import annotations

import argparse
import configparser
import enum
import io
import logging
import math
import os
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ivcache.core.errors import ConfigError, InvalidRequest
from ivcache.core.model import DEFAULT_BACKEND, InternalTenant, Scope
from ivcache.core.policy import EVICTION_POLICIES, CachePolicy

_log = logging.getLogger("ivcache.config")
#: the files whose deprecated claim_lease_seconds was warned of
_WARNED_LEASE: set[str] = set()

__all__ = [
    "IMAGE_SOURCES",
    "NOTIFICATION_DRIVERS",
    "NOTIFIERS",
    "OPTIONS",
    "OTEL_EXPORTERS",
    "STORAGE_KINDS",
    "BackendConfig",
    "Config",
    "ConversionConfig",
    "GlanceConfig",
    "MessagingConfig",
    "Option",
    "Where",
    "default_home",
    "load_config",
    "render_markdown",
]

STORAGE_KINDS = ("file", "qcow2", "rbd", "fake-lvm", "fake-rbd")
IMAGE_SOURCES = ("local", "glance")
NOTIFIERS = ("log", "otel", "messaging", "none")
OTEL_EXPORTERS = ("none", "console", "otlp")
#: oslo.messaging's notification drivers (its entry points), Cinder's values of ``driver``
NOTIFICATION_DRIVERS = ("noop", "messagingv2", "messaging", "log", "routing", "test")
GLANCE_AUTH = ("keystone", "trusted-headers")
# Storage kinds that keep their volumes (or state) under storage_path.
_PATH_STORAGES = ("file", "qcow2", "fake-lvm", "fake-rbd")


class Where(enum.Enum):
    """Which section an option is read from."""

    #: Cinder's global options, in [DEFAULT] (without ``enabled_backends``, also in the
    #: section ``[ivcache] backend`` names).
    DEFAULT = "default"
    #: Cinder's cache options of one backend: its section of ``enabled_backends``, falling
    #: back to [DEFAULT]; without ``enabled_backends``, [DEFAULT] or the section that
    #: ``[ivcache] backend`` names (a pasted Cinder backend section).
    BACKEND = "backend"
    #: ivcache's storage options of one backend: its section of ``enabled_backends``;
    #: without ``enabled_backends``, [ivcache].
    STORAGE = "storage"
    IVCACHE = "ivcache"
    GLANCE = "glance"
    #: oslo.messaging's section, as Cinder reads it; its ``transport_url`` falls back to
    #: [DEFAULT]'s, as in Cinder
    NOTIFICATIONS = "oslo_messaging_notifications"


@attrs.frozen
class Option:
    """One configuration option.

    ``type`` is ``str``, ``int``, ``float``, ``bool``, ``Path`` (relative to the file) or
    ``URL`` (a database URL; a relative SQLite path is relative to the file). Numbers must
    be from ``minimum`` to ``maximum`` (finite: seconds past 1e9 would overflow a date). An
    empty value means the default. ``aliases`` are other names read when the option itself
    is not set. ``multiple``: a comma-separated list (each item one of
    ``choices``, if any), read as a tuple.
    """

    where: Where
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    minimum: float = 0
    maximum: float = 1e9
    multiple: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


_D, _B, _S, _I, _G = Where.DEFAULT, Where.BACKEND, Where.STORAGE, Where.IVCACHE, Where.GLANCE
_N = Where.NOTIFICATIONS

OPTIONS: tuple[Option, ...] = (
    Option(_D, "host", str, "",
           "The storage host this worker serves: its entries, limits and stats are its "
           "scope's, `HOST@BACKEND#POOL`. Empty: this machine's host name."),
    Option(_D, "cluster", str, "",
           "Hosts with the same cluster share one entry per image, backend and pool: the "
           "scope is `CLUSTER@BACKEND#POOL`. A host that joins a cluster adopts its own "
           "entries into it on its next run. No `@` or `#`. Empty: no cluster."),
    Option(_D, "enabled_backends", str, "",
           "Backend sections, comma-separated: each holds the cache options of the next "
           "table and the storage options of its backend. Empty: one implicit backend, "
           f"`{DEFAULT_BACKEND}`."),
    Option(_D, "cinder_internal_tenant_project_id", str, "internal",
           "The internal tenant's project, which owns every cache volume; user commands "
           "acting as it are refused."),
    Option(_D, "cinder_internal_tenant_user_id", str, "internal",
           "The internal tenant's user."),
    Option(_B, "image_volume_cache_enabled", bool, True,
           "Serve volumes from images through the cache; false: download each image "
           "straight into its volume."),
    Option(_B, "image_volume_cache_max_size_gb", int, 0,
           "The most GiB of cache volumes in a scope (0: unlimited); a larger image is never "
           "cached."),
    Option(_B, "image_volume_cache_max_count", int, 0,
           "The most cache entries in a scope (0: unlimited).",
           aliases=("image_volume_cache_max_size_count",)),
    Option(_B, "image_volume_cache_eviction_policy", str, "lru",
           "Which entries give way when a new one needs room: `lru` (Cinder's) evicts the "
           "entry used longest ago; `gdsf` (GreedyDual-Size-Frequency) the one cheapest to "
           "get back per GiB it holds, its measured fill time times its uses over its size, "
           "aged by the last victim's (docs/architecture.md). Pinned entries never give way "
           "under either.", choices=EVICTION_POLICIES),
    Option(_B, "image_upload_use_internal_tenant", bool, False,
           "`volume upload` makes the image owned by the internal tenant instead of the "
           "caller's project, as Cinder does for its uploads."),
    Option(_S, "storage", str, "file", "The storage backend (docs/storage.md).",
           choices=STORAGE_KINDS),
    Option(_S, "storage_path", Path, Path("volumes"),
           "Where file and qcow2 keep volumes, and fake-lvm and fake-rbd their state. With "
           "`enabled_backends` the default is `volumes/<backend>`; no two backends may share "
           "one."),
    Option(_S, "storage_capacity_gb", int, 1000,
           "The size of the simulated volume group or pool of fake-lvm and fake-rbd.",
           minimum=1),
    Option(_S, "pool_name", str, "",
           "The pool in the backend's scope `HOST@BACKEND#POOL`. Empty: `rbd_pool` for "
           "`storage = rbd`, else the backend's name."),
    Option(_S, "rbd_pool", str, "rbd",
           "The Ceph pool of `storage = rbd`, made and `rbd pool init`-ed beforehand."),
    Option(_S, "rbd_conf", str, "/etc/ceph/ceph.conf", "The Ceph configuration file.",
           aliases=("rbd_ceph_conf",)),
    Option(_S, "rbd_user", str, "", "The Ceph client id (cinder, ...); empty: the default."),
    Option(_S, "rbd_max_clone_depth", int, 5,
           "A clone deeper than this is flattened, as in Cinder (rbd and fake-rbd)."),
    Option(_D, "image_conversion_dir", Path, Path("conversion"),
           "Where images that must be converted are spooled and converted: scratch files, "
           "named by their process, removed once used (a dead process's by the next "
           "conversion and by `cache reconcile --fix`)."),
    Option(_D, "image_conversion_cpu_limit", int, 60,
           "Seconds of CPU time one qemu-img run may use (prlimit); 0: no limit."),
    Option(_D, "image_conversion_address_space_limit", int, 1,
           "GiB of address space one qemu-img run may use (prlimit); 0: no limit."),
    Option(_D, "image_conversion_disable", bool, False,
           "Refuse images that would need converting (all but raw and iso) instead of "
           "converting them."),
    Option(_D, "allow_compression_on_image_upload", bool, False,
           "Accept images of container_format `compressed` (gzip data), decompressed as "
           "they stream."),
    Option(_D, "vmdk_allowed_types", str, "streamOptimized,monolithicSparse",
           "The vmdk create-types accepted, comma-separated; a vmdk of another type is "
           "refused (the format inspector accepts no others)."),
    Option(_I, "backend", str, "",
           "Without `enabled_backends`: read the cache options from this section instead of "
           "[DEFAULT] (a Cinder backend section pasted as it is). With it: the backend "
           "commands use when `--backend` is not given."),
    Option(_I, "database_url", URL, "sqlite:///ivcache.db",
           "The cache's database, an SQLAlchemy URL: `sqlite:///PATH` (relative to the "
           "file; `sqlite:////PATH` is absolute) or `postgresql+psycopg://USER:PASSWORD@HOST/DB`"
           " shared by many hosts."),
    Option(_I, "image_source", str, "local",
           "Where images come from: a local directory (images_path) or Glance ([glance]).",
           choices=IMAGE_SOURCES),
    Option(_I, "images_path", Path, Path("images"), "The local image source's directory."),
    Option(_I, "notifier", str, "log",
           "Where events go, a list: log lines (logger `ivcache.events`), OpenTelemetry, the "
           "OpenStack bus ([oslo_messaging_notifications]; implied when its driver is not "
           "noop), or nowhere.", choices=NOTIFIERS, multiple=True),
    Option(_I, "otel_exporter", str, "none",
           "Set up the OpenTelemetry SDK (`pip install 'ivcache[otel]'`) and export spans and "
           "metrics: on stderr (console) or over OTLP/HTTP (otlp, to otel_endpoint); implies "
           "`notifier = otel`. none: the application's own SDK set-up, if any, decides.",
           choices=OTEL_EXPORTERS),
    Option(_I, "otel_endpoint", str, "",
           "The OTLP/HTTP collector, e.g. `http://collector:4318`; empty: the exporter's "
           "default and the OTEL_EXPORTER_OTLP_* environment variables."),
    Option(_I, "events_drain_seconds", float, 2.0,
           "At exit, how long a process waits for its events to reach the bus; a request "
           "itself never waits for the bus."),
    Option(_I, "internal_tenant_quota_gb", int, 0,
           "The internal tenant's quota in GiB (0: unlimited), checked before anything is "
           "evicted; it spans every backend and scope."),
    Option(_I, "internal_tenant_quota_volumes", int, 0,
           "The internal tenant's quota in volumes (0: unlimited)."),
    Option(_I, "claim_wait_seconds", float, 600.0,
           "How long a request waits for another worker's download of the same image "
           "before it is served uncached."),
    Option(_I, "claim_heartbeat_seconds", float, 5.0,
           "How often a process tells that its claims (downloads), clone leases and writes "
           "are alive. One whose process died on this machine is taken over at once; one "
           "not heard of for three beats (its machine died) too. A slow but live download "
           "is never taken over.", minimum=0.01),
    Option(_I, "negative_cache_seconds", float, 300.0,
           "How long an image whose data failed verification (its checksum, a format "
           "safety check, a disk no volume can hold) is refused at once, per image content "
           "and scope, instead of being downloaded again (0: never remembered). A network "
           "failure or an authorization failure is never remembered; `ivcache cache evict "
           "--image ID` forgets the image's finding."),
    Option(_I, "claim_lease_seconds", float, 0.0,
           "Deprecated (claims now live by their heartbeat): when set and "
           "`claim_heartbeat_seconds` is not, a third of it is the heartbeat, so a dead "
           "machine's claim is taken over after this long, as before. A warning says so."),
    Option(_I, "keystone_cloud", str, "",
           "With `[glance] auth = keystone`: the cloud of clouds.yaml whose credentials "
           "validate callers' tokens with Keystone (`GET /v3/auth/tokens`, as "
           "keystonemiddleware does); its user needs Keystone's `service` role (or admin). "
           "Empty: `[glance] os_cloud`'s."),
    Option(_I, "token_cache_seconds", float, 300.0,
           "How long a validated token is believed without asking Keystone again, never "
           "longer than the token's own life (0: ask every time). A token revoked meanwhile "
           "may be honoured until then, as with keystonemiddleware's cache. The cache lives "
           "in the process: each CLI command validates once."),
    Option(_G, "url", str, "",
           "Glance's root URL (not .../v2); needed by `auth = trusted-headers`."),
    Option(_G, "os_cloud", str, "",
           "A cloud of clouds.yaml with the internal tenant's own credentials, needed by "
           "`auth = keystone`: used only for the cache's own questions (is an image gone for "
           "everyone, `cache warm`), never for a caller's request; it must be able to read "
           "every image (Glance's admin role)."),
    Option(_G, "auth", str, "keystone",
           "keystone: every request made for a caller carries the caller's own Keystone "
           "token (`--os-token`, `--os-cloud`), and Glance decides what the caller may see; "
           "trusted-headers: the caller's identity (`--project`, `--user`, `--admin`) in "
           "keystonemiddleware's headers (a Glance behind a trusted proxy).",
           choices=GLANCE_AUTH),
    Option(_G, "insecure", bool, False, "Do not verify Glance's TLS certificate."),
    Option(_G, "cafile", str, "",
           "The CA bundle to verify Glance's certificate with; empty: the system's."),
    Option(_G, "connect_timeout", float, 10.0, "Seconds to wait for a connection."),
    Option(_G, "read_timeout", float, 300.0, "Seconds to wait for data."),
    Option(_G, "retries", int, 3,
           "Retries of connection errors and 5xx responses (with backoff), and resumptions "
           "of a cut download."),
    Option(_D, "log_file", str, "",
           "The CLI's log file, as oslo.log's: INFO and up (the event lines of `notifier = "
           "log` included); relative to log_dir when that is set, else to the file's "
           "folder. Empty: no file (warnings on stderr; `--verbose` adds INFO there)."),
    Option(_D, "log_dir", str, "",
           "The folder of log_file; alone, the log file is `ivcache.log` there."),
    Option(_D, "debug", bool, False, "Log DEBUG instead of INFO."),
    Option(_N, "driver", str, "noop",
           "oslo.messaging's notification driver, as in Cinder: noop sends nothing; "
           "messagingv2 sends Cinder's notifications to the bus.",
           choices=NOTIFICATION_DRIVERS, multiple=True),
    Option(_N, "transport_url", str, "",
           "The bus for notifications (`rabbit://USER:PASSWORD@HOST:5672/`). Set in "
           "[DEFAULT], as Cinder's transport_url, it serves here too; set here, it overrides "
           "[DEFAULT]'s for notifications."),
    Option(_N, "topics", str, "notifications", "The topics notifications are sent to.",
           multiple=True),
)


def _comma_list(value: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, tuple):
        return value
    return tuple(part.strip() for part in value.split(",") if part.strip())


@attrs.frozen
class ConversionConfig:
    """The image pipeline's options (Cinder's names)."""

    image_conversion_dir: Path = Path("conversion")
    image_conversion_cpu_limit: int = 60
    image_conversion_address_space_limit: int = 1
    image_conversion_disable: bool = False
    allow_compression_on_image_upload: bool = False
    vmdk_allowed_types: tuple[str, ...] = attrs.field(
        default=("streamOptimized", "monolithicSparse"), converter=_comma_list)


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
class MessagingConfig:
    """``[oslo_messaging_notifications]`` (and ``[DEFAULT] transport_url``)."""

    driver: tuple[str, ...] = ("noop",)
    transport_url: str = ""
    topics: tuple[str, ...] = ("notifications",)

    @property
    def enabled(self) -> bool:
        return any(d != "noop" for d in self.driver)


def _list_text(value: str | Sequence[str]) -> str:
    items = value.split(",") if isinstance(value, str) else value
    return ", ".join(i.strip() for i in items if i.strip())


@attrs.frozen
class BackendConfig:
    """One backend: its name (its section's, or ``default``), its cache policy and its
    storage. ``pool`` is the pool of its scope."""

    name: str
    policy: CachePolicy
    storage: str = "file"
    storage_path: Path = Path("volumes")
    storage_capacity_gb: int = 1000
    pool_name: str = ""
    rbd_pool: str = "rbd"
    rbd_conf: str = "/etc/ceph/ceph.conf"
    rbd_user: str = ""
    rbd_max_clone_depth: int = 5
    image_upload_use_internal_tenant: bool = False

    @property
    def pool(self) -> str:
        if self.pool_name:
            return self.pool_name
        return self.rbd_pool if self.storage == "rbd" else self.name


@attrs.frozen
class Config:
    """Everything a file says. ``backends`` are the enabled backends, in the file's order
    (one, ``default``, without ``enabled_backends``); ``default_backend`` is the one to use
    when none is named ("" when several are enabled and ``[ivcache] backend`` is unset)."""

    home: Path
    host: str
    tenant: InternalTenant
    database_url: URL = attrs.field(converter=make_url)
    image_source: str
    images_path: Path
    backends: tuple[BackendConfig, ...]
    cluster: str | None = None
    default_backend: str = DEFAULT_BACKEND
    #: the notifiers, comma-separated (``notifiers`` is the list)
    notifier: str = attrs.field(default="log", converter=_list_text)
    keystone_cloud: str = ""
    token_cache_seconds: float = 300.0
    glance: GlanceConfig = GlanceConfig()
    conversion: ConversionConfig = ConversionConfig()
    messaging: MessagingConfig = MessagingConfig()
    events_drain_seconds: float = 2.0
    otel_exporter: str = "none"
    otel_endpoint: str = ""
    log_file: str = ""
    log_dir: str = ""
    debug: bool = False
    source: Path | None = None

    @property
    def notifiers(self) -> tuple[str, ...]:
        """The notifiers to build: ``notifier``'s, plus ``messaging`` when the
        notification driver is not noop and ``otel`` when an exporter is set; ``none``
        alone means none."""
        names = [n.strip() for n in self.notifier.split(",") if n.strip()]
        if self.otel_exporter != "none" and "otel" not in names:
            names.append("otel")
        if self.messaging.enabled and "messaging" not in names:
            names.append("messaging")
        return tuple(n for n in names if n != "none")

    def with_host(self, host: str | None) -> Config:
        return attrs.evolve(self, host=host) if host else self

    @property
    def keystone_mode(self) -> bool:
        """Whether callers are who their Keystone tokens say (Glance with auth = keystone)."""
        return self.image_source == "glance" and self.glance.auth == "keystone"

    @property
    def backend_names(self) -> list[str]:
        return [b.name for b in self.backends]

    def backend(self, name: str | None = None) -> BackendConfig:
        """The backend called ``name``, or the default one; ConfigError naming the enabled
        backends when there is no such backend, or no default among several."""
        chosen = name or self.default_backend
        for backend in self.backends:
            if backend.name == chosen:
                return backend
        names = ", ".join(self.backend_names)
        if not chosen:
            raise ConfigError(f"several backends are enabled ({names}): name one (--backend "
                              "NAME)")
        raise ConfigError(f"backend {chosen!r} is not an enabled backend; enabled: {names}")

    def scope(self, backend: BackendConfig) -> Scope:
        """The scope this host serves on ``backend``."""
        return Scope(self.host, backend.name, backend.pool, self.cluster)

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database's file, or None (an in-memory or a server database)."""
        return _sqlite_file(self.database_url)


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
    parser = _parser()
    # The same text without [DEFAULT]'s inheritance: which section really sets an option.
    own = _parser(default_section="\x00no-default")
    home = default_home(env)
    source: Path | None = None
    if chosen:
        source = Path(chosen).expanduser().absolute()
        try:
            text = _read_config_text(source)
            parser.read_file(io.StringIO(text), str(source))
            own.read_file(io.StringIO(text), str(source))
        except configparser.Error as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"config file {source} is not valid INI: {first}") from exc
    return _Reader(parser, own, source, home).config()


def _parser(**kwargs: Any) -> configparser.ConfigParser:
    return configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None,
                                     **kwargs)


#: A config file is a page of INI; anything larger is not one (``--config /dev/zero``).
MAX_CONFIG_BYTES = 1 << 20


def _read_config_text(source: Path) -> str:
    """The file's text: a regular file of at most MAX_CONFIG_BYTES, in UTF-8."""
    try:
        with open(source, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"config file {source} is not a regular file: give the "
                                  "path of an INI file")
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {source} is larger than {MAX_CONFIG_BYTES} bytes: "
                          "it is not an ivcache INI file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {source} is not UTF-8 text (byte {exc.start}): save "
                          "it as UTF-8") from None


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    if url.database.startswith(":memory:") or url.query.get("uri"):
        return None
    return Path(url.database)


def _names(where: Where) -> set[str]:
    return {name for o in OPTIONS if o.where is where for name in o.names}


class _Reader:
    """Reads the options of ``OPTIONS`` from one parsed file.

    ``parser`` has configparser's inheritance from [DEFAULT]; ``own`` does not, and tells
    which options a section sets itself (for the checks of misplaced options).
    """

    def __init__(self, parser: configparser.ConfigParser, own: configparser.ConfigParser,
                 source: Path | None, home: Path) -> None:
        self.parser, self.own, self.source, self.home = parser, own, source, home
        self.where = str(source) if source else "defaults"
        self.base = source.parent if source else home

    def config(self) -> Config:
        default = self.parser.default_section
        enabled = self.section_values(Where.DEFAULT, default)["enabled_backends"]
        names = [n.strip() for n in enabled.split(",") if n.strip()]
        ivc = self.section_values(Where.IVCACHE, "ivcache", storage_here=not names)
        glance = self.section_values(Where.GLANCE, "glance")
        messaging = self.section_values(Where.NOTIFICATIONS, Where.NOTIFICATIONS.value)
        backend = ivc["backend"]
        if names:
            globals_ = self.section_values(Where.DEFAULT, default)
            backends = tuple(self.backend(name, ivc, multi=True)
                             for name in self.enabled(names))
            if backend and backend not in names:
                raise ConfigError(f"{self.where}: option backend = {backend!r} in [ivcache] is "
                                  f"not one of enabled_backends ({', '.join(names)})")
            default_backend = backend or (names[0] if len(names) == 1 else "")
            self.check_distinct_paths(backends)
        else:
            if backend and not self.parser.has_section(backend):
                raise ConfigError(f"{self.where}: option backend = {backend!r} names no section")
            section = backend or default
            globals_ = self.section_values(Where.DEFAULT, section)
            backends = (self.backend(DEFAULT_BACKEND, ivc, section=section, multi=False),)
            default_backend = DEFAULT_BACKEND
        tenant = InternalTenant(
            project_id=globals_["cinder_internal_tenant_project_id"],
            user_id=globals_["cinder_internal_tenant_user_id"],
            quota_gb=ivc["internal_tenant_quota_gb"],
            quota_volumes=ivc["internal_tenant_quota_volumes"],
        )
        cluster = globals_["cluster"] or None
        host = globals_["host"] or socket.gethostname()
        # The [ivcache] options that are fields of Config by the same name go in as they are.
        same = {f.name: ivc[f.name] for f in attrs.fields(Config) if f.name in ivc}
        conversion = ConversionConfig(**{f.name: globals_[f.name]
                                         for f in attrs.fields(ConversionConfig)})
        service = {name: globals_[name] for name in ("log_file", "log_dir", "debug")}
        config = Config(home=self.home, host=host, tenant=tenant,
                        glance=GlanceConfig(**glance), conversion=conversion,
                        messaging=MessagingConfig(**messaging), source=self.source,
                        backends=backends, cluster=cluster,
                        default_backend=default_backend, **service, **same)
        for b in backends:
            try:
                config.scope(b)
            except InvalidRequest as exc:
                raise ConfigError(f"{self.where}: {exc}") from None
        return config

    def enabled(self, names: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in names:
            if not self.parser.has_section(name):
                raise ConfigError(f"{self.where}: enabled_backends names [{name}], which is not "
                                  "a section of the file: add it, or drop it from the list")
            if name in seen:
                raise ConfigError(f"{self.where}: enabled_backends names [{name}] twice")
            if name in ("ivcache", "glance"):
                raise ConfigError(f"{self.where}: enabled_backends names [{name}], which is "
                                  "ivcache's own section, not a backend")
            seen.add(name)
        return names

    def backend(self, name: str, ivc: Mapping[str, Any], *, multi: bool,
                section: str | None = None) -> BackendConfig:
        """The backend ``name``: cache options from ``section`` (its own by default) and
        storage options from it too (``multi``) or from [ivcache]."""
        section = section or name
        if multi:
            self.check_backend_section(section)
        cache = self.section_values(Where.BACKEND, section)
        storage = self.section_values(Where.STORAGE, section if multi else "ivcache")
        if multi and not self.is_set(section, "storage_path"):
            storage["storage_path"] = self.base / "volumes" / name
        policy = CachePolicy(
            enabled=cache["image_volume_cache_enabled"],
            max_size_gb=cache["image_volume_cache_max_size_gb"],
            max_count=cache["image_volume_cache_max_count"],
            eviction_policy=cache["image_volume_cache_eviction_policy"],
            claim_wait_seconds=ivc["claim_wait_seconds"],
            claim_heartbeat_seconds=self.heartbeat_seconds(ivc),
            negative_cache_seconds=ivc["negative_cache_seconds"],
        )
        return BackendConfig(name=name, policy=policy, **storage,
                             image_upload_use_internal_tenant=cache[
                                 "image_upload_use_internal_tenant"])

    def heartbeat_seconds(self, ivc: Mapping[str, Any]) -> float:
        """``claim_heartbeat_seconds``, or a third of the deprecated ``claim_lease_seconds``
        when only that is set (with a warning)."""
        beat: float = ivc["claim_heartbeat_seconds"]
        lease: float = ivc["claim_lease_seconds"]
        # Once per file and process, however many backends it has or times it is read.
        warn = lease and self.where not in _WARNED_LEASE
        _WARNED_LEASE.add(self.where)
        if lease and not self.is_set("ivcache", "claim_heartbeat_seconds"):
            beat = max(lease / 3, 0.01)
            if warn:
                _log.warning("%s: claim_lease_seconds is deprecated: claims live by their "
                             "heartbeat now; claim_heartbeat_seconds = %g is used (a third "
                             "of it). Set claim_heartbeat_seconds instead.", self.where, beat)
        elif warn:
            _log.warning("%s: claim_lease_seconds is deprecated and ignored: "
                         "claim_heartbeat_seconds is set", self.where)
        return beat

    def check_backend_section(self, section: str) -> None:
        """A backend section may hold anything of Cinder's, but not ivcache's global
        options (nor Cinder's [DEFAULT] ones that ivcache reads)."""
        placed = {**{n: "[ivcache]" for n in _names(Where.IVCACHE)},
                  **{n: "[DEFAULT]" for n in _names(Where.DEFAULT)}}
        for name in self.own.options(section):
            if name in placed:
                raise ConfigError(f"{self.where}: option {name} in [{section}] is global, not "
                                  f"a backend's: put it in {placed[name]}")

    def check_distinct_paths(self, backends: Sequence[BackendConfig]) -> None:
        claimed: dict[Path, str] = {}
        for b in backends:
            if b.storage not in _PATH_STORAGES:
                continue
            path = Path(os.path.normpath(b.storage_path))
            if path in claimed:
                raise ConfigError(f"{self.where}: backends {claimed[path]} and {b.name} both "
                                  f"claim storage_path = {path}: give each its own")
            claimed[path] = b.name

    def is_set(self, section: str, name: str) -> bool:
        """Whether ``section`` (or [DEFAULT], which it inherits) gives ``name`` a value."""
        return bool(self.parser.get(section, name, fallback=""))

    def section_values(self, where: Where, section: str, *,
                       storage_here: bool = False) -> dict[str, Any]:
        """The value of every ``where`` option, read from ``section`` (which falls back to
        [DEFAULT], as configparser does; a missing section reads [DEFAULT] alone).

        [ivcache] and [glance] are checked for unknown and misplaced options; in [ivcache]
        the storage options belong too when ``storage_here`` (no ``enabled_backends``)."""
        options = [o for o in OPTIONS if o.where is where]
        if where in (Where.IVCACHE, Where.GLANCE, Where.NOTIFICATIONS):
            allowed = [*options, *(o for o in OPTIONS if storage_here and o.where is _S)]
            self.check_known(section, allowed, storage_here=storage_here)
        if not self.parser.has_section(section):
            section = self.parser.default_section
        return {o.name: self.value(section, o) for o in options}

    def check_known(self, section: str, options: Sequence[Option], *,
                    storage_here: bool = False) -> None:
        if not self.own.has_section(section):
            return
        known = sorted(name for o in options for name in o.names)
        elsewhere = {n: "[DEFAULT] or a backend section" for n in _names(Where.BACKEND)}
        elsewhere |= {n: "[DEFAULT]" for n in _names(Where.DEFAULT)}
        if section == "ivcache" and not storage_here:
            elsewhere |= {n: "a backend section of enabled_backends"
                          for n in _names(Where.STORAGE)}
        for name in self.own.options(section):
            if name in known:
                continue
            if section == "ivcache" and name in elsewhere:
                raise ConfigError(f"{self.where}: option {name} does not belong in "
                                  f"[{section}]: put it in {elsewhere[name]}")
            raise ConfigError(f"{self.where}: unknown option {name!r} in [{section}]; "
                              f"known: {', '.join(known)}")

    def value(self, section: str, option: Option) -> Any:
        parser = self.parser
        name = next((n for n in option.names if parser.get(section, n, fallback="")), None)
        if name is None:
            if option.multiple:
                return tuple(i.strip() for i in option.default.split(","))
            return self.resolve(option, option.default)
        raw = parser.get(section, name)
        bad = f"{self.where}: option {name} = {raw!r}"
        getters: dict[type, Callable[[str, str], Any]] = {
            int: parser.getint, float: parser.getfloat, bool: parser.getboolean}
        getter = getters.get(option.type)
        if option.multiple:
            items = tuple(i.strip() for i in raw.split(",") if i.strip())
            wrong = [i for i in items if option.choices and i not in option.choices]
            if wrong:
                what = bad if items == (raw.strip(),) else f"{bad}: {wrong[0]!r}"
                raise ConfigError(f"{what} is not one of {', '.join(option.choices)}")
            return items
        if getter is None:
            if option.choices and raw not in option.choices:
                raise ConfigError(f"{bad} is not one of {', '.join(option.choices)}")
            return self.resolve(option, raw)
        try:
            value = getter(section, name)
        except ValueError:
            raise ConfigError(f"{bad} is not {_TYPE_WORDS[option.type]}") from None
        if option.type is bool:
            return value
        if not math.isfinite(value):
            raise ConfigError(f"{self.where}: option {name} = {raw} is not a finite number")
        if value < 0:
            raise ConfigError(f"{self.where}: option {name} = {value} must be 0 or more")
        if value > option.maximum:
            # Seconds past the maximum would overflow a date.
            raise ConfigError(f"{self.where}: option {name} = {raw} must be at most "
                              f"{option.maximum:.0f}")
        if value < option.minimum:
            raise ConfigError(f"{self.where}: option {name} = {raw} must be at least "
                              f"{option.minimum:g}")
        return value

    def resolve(self, option: Option, value: Any) -> Any:
        """Paths and SQLite files relative to the file's folder (or $IVCACHE_HOME)."""
        if option.type is Path:
            path = Path(value).expanduser()
            return path if path.is_absolute() else self.base / path
        if option.type is URL:
            return self.database_url(option.name, value)
        return value

    def database_url(self, name: str, text: str) -> URL:
        what = (f"{self.where}: option {name} is not a database URL "
                "(sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB)")
        try:
            url = make_url(text)
            url.get_dialect()
        except NoSuchModuleError:
            raise ConfigError(f"{what}: no database {url.drivername!r}") from None
        except ArgumentError:
            # The text is not repeated: it may hold a password.
            raise ConfigError(what) from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ConfigError(f"{what}: {url.get_backend_name()} is not supported")
        path = _sqlite_file(url)
        if path is not None and not path.is_absolute():
            url = url.set(database=str(self.base / path))
        return url


_TYPE_WORDS: dict[type, str] = {int: "a whole number", float: "a number",
                                bool: "true or false"}


# ------------------------------------------------------------------ the reference page

_SECTIONS = {
    Where.DEFAULT: ("Cinder's global options: `[DEFAULT]`",
                    "Cinder's names and meanings. Without `enabled_backends` they may also be "
                    "set in the section `[ivcache] backend` names; in a backend section of "
                    "`enabled_backends` they are an error. Cinder's other options are "
                    "ignored. The logging options are oslo.log's."),
    Where.BACKEND: ("Cache options: a backend section, `[DEFAULT]`, or the section `backend` "
                    "names",
                    "Cinder's names and meanings, per backend: each section of "
                    "`enabled_backends` has its own, falling back to `[DEFAULT]`. Without "
                    "`enabled_backends`, the one implicit backend reads them from `[DEFAULT]`, "
                    "or from the section `[ivcache] backend` names (a Cinder backend section "
                    "pasted as it is). Cinder's other options there are ignored; ivcache's "
                    "global options there are an error."),
    Where.STORAGE: ("Storage options: a backend section, or `[ivcache]`",
                    "Each section of `enabled_backends` has its own (falling back to "
                    "`[DEFAULT]`); in `[ivcache]` they are then an error. Without "
                    "`enabled_backends` they are read from `[ivcache]`, for the one implicit "
                    f"backend `{DEFAULT_BACKEND}`."),
    Where.IVCACHE: ("`[ivcache]`", "An unknown option here is an error."),
    Where.GLANCE: ("`[glance]`", "For `image_source = glance` (`pip install "
                                 "'ivcache[glance]'`). An unknown option here is an error."),
    Where.NOTIFICATIONS: ("`[oslo_messaging_notifications]`",
                          "Cinder's notifications on the OpenStack bus, through oslo.messaging "
                          "(`pip install 'ivcache[messaging]'`): priority INFO, publisher "
                          "`volume.<host>`, events `image_volume_cache.hit`, `.miss`, "
                          "`.evict`. An unknown option here is an error."),
}
_TYPE_NAMES: dict[type, str] = {str: "text", int: "whole number", float: "number",
                                bool: "true/false", Path: "path", URL: "database URL"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type_text(option: Option) -> str:
    if option.multiple:
        return "list of choices" if option.choices else "list"
    return "choice" if option.choices else _TYPE_NAMES[option.type]


def _default_text(option: Option) -> str:
    if option.type is bool:
        return "`true`" if option.default else "`false`"
    if option.type is float:
        return f"`{option.default:g}`"
    return f"`{option.default}`" if str(option.default) else "(empty)"


def render_markdown() -> str:
    """The reference page ``docs/configuration.md``, from ``OPTIONS``."""
    lines = [
        "# Configuration reference",
        "",
        "*Generated from the option table `OPTIONS` in `entrypoints/config.py`: edit the "
        "table, not this page, and regenerate it with `make docs` (`python -m "
        "ivcache.entrypoints.config --markdown > docs/configuration.md`). A test fails "
        "while the page differs from the table.*",
        "",
        "An INI file, given by `--config FILE` or `$IVCACHE_CONFIG`; with none, every option "
        "has its default and everything lives under `$IVCACHE_HOME` (default "
        "`~/.local/share/ivcache`). Relative paths are relative to the file's folder (or "
        "to `$IVCACHE_HOME`). An empty value means the default; numbers must be 0 or more, "
        "finite and at most 1000000000, unless an option says otherwise; "
        "`[DEFAULT]` supplies a value for every section. A bad value is an error that names "
        "the option.",
    ]
    for where, (title, intro) in _SECTIONS.items():
        lines += ["", f"## {title}", "", intro, "",
                  "| option | type | default | what |", "|---|---|---|---|"]
        for o in (o for o in OPTIONS if o.where is where):
            what = o.help
            if o.choices:
                what += " One of: " + ", ".join(f"`{c}`" for c in o.choices) + "."
            if o.aliases:
                what += " Also read as " + ", ".join(f"`{a}`" for a in o.aliases) + "."
            lines.append(f"| `{o.name}` | {_type_text(o)} | {_cell(_default_text(o))} "
                         f"| {_cell(what)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ivcache.entrypoints.config",
                                     description="ivcache's configuration options.")
    parser.add_argument("--markdown", action="store_true", required=True,
                        help="print the reference page docs/configuration.md")
    parser.parse_args(argv)
    print(render_markdown(), end="")


if __name__ == "__main__":
    main()

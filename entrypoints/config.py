"""The INI configuration, with Cinder's option names so a backend section can be pasted.

Every option is one row of ``OPTIONS``: where it is read, its name, type, default, choices
and help. That table drives the parsing (configparser's own getters), the check for unknown
options and the reference page ``docs/configuration.md``, which is generated from it::

    python -m ivcache.entrypoints.config --markdown > docs/configuration.md   # make docs

Where no file is given, everything lives under ``$IVCACHE_HOME``
(default ``~/.local/share/ivcache``); relative paths in a file are relative to the file.
"""

from __future__ import annotations

import argparse
import configparser
import enum
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ivcache.core.errors import ConfigError
from ivcache.core.model import InternalTenant
from ivcache.core.policy import CachePolicy

__all__ = [
    "IMAGE_SOURCES",
    "NOTIFICATION_DRIVERS",
    "NOTIFIERS",
    "OPTIONS",
    "OTEL_EXPORTERS",
    "STORAGE_KINDS",
    "Config",
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


class Where(enum.Enum):
    """Which section an option is read from."""

    #: Cinder's options: [DEFAULT], or the section that ``[ivcache] backend`` names (a pasted
    #: Cinder backend section). Other options there are the driver's, and are ignored.
    BACKEND = "backend"
    IVCACHE = "ivcache"
    GLANCE = "glance"
    #: [DEFAULT] alone: Cinder's service options (logging, the bus)
    DEFAULT = "DEFAULT"
    #: oslo.messaging's section, as Cinder reads it; its ``transport_url`` falls back to
    #: [DEFAULT]'s, as in Cinder
    NOTIFICATIONS = "oslo_messaging_notifications"


@attrs.frozen
class Option:
    """One configuration option.

    ``type`` is ``str``, ``int``, ``float``, ``bool``, ``Path`` (relative to the file) or
    ``URL`` (a database URL; a relative SQLite path is relative to the file). Numbers must
    be 0 or more. An empty value means the default. ``aliases`` are other names read when
    the option itself is not set. ``multiple``: a comma-separated list (each item one of
    ``choices``, if any), read as a tuple.
    """

    where: Where
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    multiple: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


_B, _I, _G, _N = Where.BACKEND, Where.IVCACHE, Where.GLANCE, Where.NOTIFICATIONS
_D = Where.DEFAULT

OPTIONS: tuple[Option, ...] = (
    Option(_B, "host", str, "",
           "The storage host this worker serves: entries, limits and stats are per host. "
           "Empty: this machine's host name."),
    Option(_B, "cinder_internal_tenant_project_id", str, "internal",
           "The internal tenant's project, which owns every cache volume; user commands "
           "acting as it are refused."),
    Option(_B, "cinder_internal_tenant_user_id", str, "internal",
           "The internal tenant's user."),
    Option(_B, "image_volume_cache_enabled", bool, True,
           "Serve volumes from images through the cache; false: download each image "
           "straight into its volume."),
    Option(_B, "image_volume_cache_max_size_gb", int, 0,
           "The most GiB of cache volumes on a host (0: unlimited); a larger image is never "
           "cached."),
    Option(_B, "image_volume_cache_max_count", int, 0,
           "The most cache entries on a host (0: unlimited).",
           aliases=("image_volume_cache_max_size_count",)),
    Option(_I, "backend", str, "",
           "Read the cache options (the first table) from this section instead of [DEFAULT]: "
           "a Cinder backend section pasted as it is."),
    Option(_I, "database_url", URL, "sqlite:///ivcache.db",
           "The cache's database, an SQLAlchemy URL: `sqlite:///PATH` (relative to the "
           "file; `sqlite:////PATH` is absolute) or `postgresql+psycopg://USER:PASSWORD@HOST/DB`"
           " shared by many hosts."),
    Option(_I, "storage", str, "file", "The storage backend (docs/storage.md).",
           choices=STORAGE_KINDS),
    Option(_I, "storage_path", Path, Path("volumes"),
           "Where file and qcow2 keep volumes, and fake-lvm and fake-rbd their state."),
    Option(_I, "storage_capacity_gb", int, 1000,
           "The size of the simulated volume group or pool of fake-lvm and fake-rbd."),
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
           "evicted."),
    Option(_I, "internal_tenant_quota_volumes", int, 0,
           "The internal tenant's quota in volumes (0: unlimited)."),
    Option(_I, "claim_wait_seconds", float, 600.0,
           "How long a request waits for another worker's download of the same image "
           "before it is served uncached."),
    Option(_I, "claim_lease_seconds", float, 3600.0,
           "How old a claim may grow before another worker takes it over as dead."),
    Option(_I, "rbd_pool", str, "rbd",
           "The Ceph pool of `storage = rbd`, made and `rbd pool init`-ed beforehand."),
    Option(_I, "rbd_conf", str, "/etc/ceph/ceph.conf", "The Ceph configuration file."),
    Option(_I, "rbd_user", str, "", "The Ceph client id (cinder, ...); empty: the default."),
    Option(_I, "rbd_max_clone_depth", int, 5,
           "A clone deeper than this is flattened, as in Cinder (rbd and fake-rbd)."),
    Option(_G, "url", str, "",
           "Glance's root URL (not .../v2); needed by `auth = trusted-headers`."),
    Option(_G, "os_cloud", str, "", "A cloud of clouds.yaml; needed by `auth = keystone`."),
    Option(_G, "auth", str, "keystone",
           "keystone: the service's own credentials from clouds.yaml; trusted-headers: the "
           "caller's identity in keystonemiddleware's headers (a Glance behind a trusted "
           "proxy).", choices=GLANCE_AUTH),
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
class Config:
    home: Path
    host: str
    tenant: InternalTenant
    policy: CachePolicy
    database_url: URL = attrs.field(converter=make_url)
    storage: str
    storage_path: Path
    storage_capacity_gb: int
    image_source: str
    images_path: Path
    #: the notifiers, comma-separated (``notifiers`` is the list)
    notifier: str = attrs.field(default="log", converter=_list_text)
    glance: GlanceConfig = GlanceConfig()
    messaging: MessagingConfig = MessagingConfig()
    events_drain_seconds: float = 2.0
    otel_exporter: str = "none"
    otel_endpoint: str = ""
    log_file: str = ""
    log_dir: str = ""
    debug: bool = False
    rbd_pool: str = "rbd"
    rbd_conf: str = "/etc/ceph/ceph.conf"
    rbd_user: str = ""
    rbd_max_clone_depth: int = 5
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
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"),
                                       interpolation=None)
    home = default_home(env)
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
    return _Reader(parser, source, home).config()


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    if url.database.startswith(":memory:") or url.query.get("uri"):
        return None
    return Path(url.database)


class _Reader:
    """Reads the options of ``OPTIONS`` from one parsed file."""

    def __init__(self, parser: configparser.ConfigParser, source: Path | None,
                 home: Path) -> None:
        self.parser, self.source, self.home = parser, source, home
        self.where = str(source) if source else "defaults"
        self.base = source.parent if source else home

    def config(self) -> Config:
        ivc = self.section_values(Where.IVCACHE, "ivcache")
        backend = ivc["backend"]
        if backend and not self.parser.has_section(backend):
            raise ConfigError(f"{self.where}: option backend = {backend!r} names no section")
        cache = self.section_values(Where.BACKEND, backend or self.parser.default_section)
        glance = self.section_values(Where.GLANCE, "glance")
        messaging = self.section_values(Where.NOTIFICATIONS, Where.NOTIFICATIONS.value)
        service = self.section_values(Where.DEFAULT, self.parser.default_section)
        policy = CachePolicy(
            enabled=cache["image_volume_cache_enabled"],
            max_size_gb=cache["image_volume_cache_max_size_gb"],
            max_count=cache["image_volume_cache_max_count"],
            claim_wait_seconds=ivc["claim_wait_seconds"],
            claim_lease_seconds=ivc["claim_lease_seconds"],
        )
        tenant = InternalTenant(
            project_id=cache["cinder_internal_tenant_project_id"],
            user_id=cache["cinder_internal_tenant_user_id"],
            quota_gb=ivc["internal_tenant_quota_gb"],
            quota_volumes=ivc["internal_tenant_quota_volumes"],
        )
        # The [ivcache] options that are fields of Config by the same name go in as they are.
        same = {f.name: ivc[f.name] for f in attrs.fields(Config) if f.name in ivc}
        return Config(home=self.home, host=cache["host"] or socket.gethostname(),
                      tenant=tenant, policy=policy, glance=GlanceConfig(**glance),
                      messaging=MessagingConfig(**messaging), **service,
                      source=self.source, **same)

    def section_values(self, where: Where, section: str) -> dict[str, Any]:
        """The value of every ``where`` option, read from ``section`` (which falls back to
        [DEFAULT], as configparser does; a missing section reads [DEFAULT] alone)."""
        options = [o for o in OPTIONS if o.where is where]
        if where not in (Where.BACKEND, Where.DEFAULT):
            self.check_known(section, options)
        if not self.parser.has_section(section):
            section = self.parser.default_section
        return {o.name: self.value(section, o) for o in options}

    def check_known(self, section: str, options: Sequence[Option]) -> None:
        if not self.parser.has_section(section):
            return
        known = sorted(name for o in options for name in o.names)
        defaults = self.parser.defaults()
        for name in self.parser.options(section):
            if name not in known and name not in defaults:
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
        if option.type is not bool and value < 0:
            raise ConfigError(f"{self.where}: option {name} = {value} must be 0 or more")
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
        path = _sqlite_file(url)
        if path is not None and not path.is_absolute():
            url = url.set(database=str(self.base / path))
        return url


_TYPE_WORDS: dict[type, str] = {int: "a whole number", float: "a number",
                                bool: "true or false"}


# ------------------------------------------------------------------ the reference page

_SECTIONS = {
    Where.BACKEND: ("Cache options: `[DEFAULT]`, or the section `backend` names",
                    "Cinder's names and meanings, so a Cinder backend section can be pasted. "
                    "Cinder's other options there are ignored."),
    Where.IVCACHE: ("`[ivcache]`", "An unknown option here is an error."),
    Where.GLANCE: ("`[glance]`", "For `image_source = glance` (`pip install "
                                 "'ivcache[glance]'`). An unknown option here is an error."),
    Where.DEFAULT: ("Service options: `[DEFAULT]`",
                    "Cinder's (oslo.log's, oslo.messaging's) names for logging and the bus."),
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
        "to `$IVCACHE_HOME`). An empty value means the default; numbers must be 0 or more; "
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

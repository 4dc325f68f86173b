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

from ivcache.core.errors import ConfigError
from ivcache.core.model import InternalTenant
from ivcache.core.policy import CachePolicy

__all__ = [
    "IMAGE_SOURCES",
    "NOTIFIERS",
    "OPTIONS",
    "STORAGE_KINDS",
    "Config",
    "ConversionConfig",
    "GlanceConfig",
    "Option",
    "Where",
    "default_home",
    "load_config",
    "render_markdown",
]

STORAGE_KINDS = ("file", "qcow2", "rbd", "fake-lvm", "fake-rbd")
IMAGE_SOURCES = ("local", "glance")
NOTIFIERS = ("log", "otel", "none")
GLANCE_AUTH = ("keystone", "trusted-headers")


class Where(enum.Enum):
    """Which section an option is read from."""

    #: Cinder's options: [DEFAULT], or the section that ``[ivcache] backend`` names (a pasted
    #: Cinder backend section). Other options there are the driver's, and are ignored.
    BACKEND = "backend"
    IVCACHE = "ivcache"
    GLANCE = "glance"


@attrs.frozen
class Option:
    """One configuration option.

    ``type`` is ``str``, ``int``, ``float``, ``bool``, ``Path`` (relative to the file) or
    ``URL`` (a database URL; a relative SQLite path is relative to the file). Numbers must
    be from ``minimum`` to ``maximum`` (finite: seconds past 1e9 would overflow a date). An
    empty value means the default. ``aliases`` are other names read when the option itself
    is not set.
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

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


_B, _I, _G = Where.BACKEND, Where.IVCACHE, Where.GLANCE

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
    Option(_B, "image_conversion_dir", Path, Path("conversion"),
           "Where images that must be converted are spooled and converted: scratch files, "
           "named by their process, removed once used (a dead process's by the next "
           "conversion and by `cache reconcile --fix`)."),
    Option(_B, "image_conversion_cpu_limit", int, 60,
           "Seconds of CPU time one qemu-img run may use (prlimit); 0: no limit."),
    Option(_B, "image_conversion_address_space_limit", int, 1,
           "GiB of address space one qemu-img run may use (prlimit); 0: no limit."),
    Option(_B, "image_conversion_disable", bool, False,
           "Refuse images that would need converting (all but raw and iso) instead of "
           "converting them."),
    Option(_B, "allow_compression_on_image_upload", bool, False,
           "Accept images of container_format `compressed` (gzip data), decompressed as "
           "they stream."),
    Option(_B, "vmdk_allowed_types", str, "streamOptimized,monolithicSparse",
           "The vmdk create-types accepted, comma-separated; a vmdk of another type is "
           "refused (the format inspector accepts no others)."),
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
           "The size of the simulated volume group or pool of fake-lvm and fake-rbd.",
           minimum=1),
    Option(_I, "image_source", str, "local",
           "Where images come from: a local directory (images_path) or Glance ([glance]).",
           choices=IMAGE_SOURCES),
    Option(_I, "images_path", Path, Path("images"), "The local image source's directory."),
    Option(_I, "notifier", str, "log",
           "Where events go: log lines (logger `ivcache.events`), OpenTelemetry, or nowhere.",
           choices=NOTIFIERS),
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
    Option(_I, "rbd_pool", str, "rbd",
           "The Ceph pool of `storage = rbd`, made and `rbd pool init`-ed beforehand."),
    Option(_I, "rbd_conf", str, "/etc/ceph/ceph.conf", "The Ceph configuration file."),
    Option(_I, "rbd_user", str, "", "The Ceph client id (cinder, ...); empty: the default."),
    Option(_I, "rbd_max_clone_depth", int, 5,
           "A clone deeper than this is flattened, as in Cinder (rbd and fake-rbd)."),
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
)


def _names(value: str | tuple[str, ...]) -> tuple[str, ...]:
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
        default=("streamOptimized", "monolithicSparse"), converter=_names)


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
    database_url: URL = attrs.field(converter=make_url)
    storage: str
    storage_path: Path
    storage_capacity_gb: int
    image_source: str
    images_path: Path
    notifier: str = "log"
    keystone_cloud: str = ""
    token_cache_seconds: float = 300.0
    glance: GlanceConfig = GlanceConfig()
    conversion: ConversionConfig = ConversionConfig()
    rbd_pool: str = "rbd"
    rbd_conf: str = "/etc/ceph/ceph.conf"
    rbd_user: str = ""
    rbd_max_clone_depth: int = 5
    source: Path | None = None

    def with_host(self, host: str | None) -> Config:
        return attrs.evolve(self, host=host) if host else self

    @property
    def keystone_mode(self) -> bool:
        """Whether callers are who their Keystone tokens say (Glance with auth = keystone)."""
        return self.image_source == "glance" and self.glance.auth == "keystone"

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
            parser.read_string(_read_config_text(source), source=str(source))
        except configparser.Error as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"config file {source} is not valid INI: {first}") from exc
    return _Reader(parser, source, home).config()


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
        conversion = ConversionConfig(**{f.name: cache[f.name]
                                         for f in attrs.fields(ConversionConfig)})
        # The [ivcache] options that are fields of Config by the same name go in as they are.
        same = {f.name: ivc[f.name] for f in attrs.fields(Config) if f.name in ivc}
        return Config(home=self.home, host=cache["host"] or socket.gethostname(),
                      tenant=tenant, policy=policy, glance=GlanceConfig(**glance),
                      conversion=conversion, source=self.source, **same)

    def section_values(self, where: Where, section: str) -> dict[str, Any]:
        """The value of every ``where`` option, read from ``section`` (which falls back to
        [DEFAULT], as configparser does; a missing section reads [DEFAULT] alone)."""
        options = [o for o in OPTIONS if o.where is where]
        if where is not Where.BACKEND:
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
            return self.resolve(option, option.default)
        raw = parser.get(section, name)
        bad = f"{self.where}: option {name} = {raw!r}"
        getters: dict[type, Callable[[str, str], Any]] = {
            int: parser.getint, float: parser.getfloat, bool: parser.getboolean}
        getter = getters.get(option.type)
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
                              f"{option.minimum:.0f}")
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
    Where.BACKEND: ("Cache options: `[DEFAULT]`, or the section `backend` names",
                    "Cinder's names and meanings, so a Cinder backend section can be pasted. "
                    "Cinder's other options there are ignored."),
    Where.IVCACHE: ("`[ivcache]`", "An unknown option here is an error."),
    Where.GLANCE: ("`[glance]`", "For `image_source = glance` (`pip install "
                                 "'ivcache[glance]'`). An unknown option here is an error."),
}
_TYPE_NAMES: dict[type, str] = {str: "text", int: "whole number", float: "number",
                                bool: "true/false", Path: "path", URL: "database URL"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type_text(option: Option) -> str:
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

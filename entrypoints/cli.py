"""The ``ivcache`` command. Thin: every decision is the core's.

Exit codes: 0 ok, 1 domain error (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

from ivcache.core.errors import ConfigError, Forbidden, IvcacheError
from ivcache.core.model import CacheEntry, Image, RequestContext, Scope, ScopeTotals, Volume
from ivcache.core.operations import Adoption
from ivcache.core.upload import UPLOAD_FORMATS
from ivcache.entrypoints.bootstrap import (
    CONTAINER_FORMATS,
    DISK_FORMATS,
    Wiring,
    build_identity,
    build_images,
    local_images,
    open_database,
    wire,
)
from ivcache.entrypoints.config import Config, load_config
from ivcache.entrypoints.logs import setup_logging

if TYPE_CHECKING:
    from ivcache.adapters.identity.keystone import KeystoneIdentity

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])


# ------------------------------------------------------------------ plumbing

class _State:
    def __init__(self) -> None:
        self.config_path: str | None = None
        self.json = False
        self.admin = False
        self.verbose = False


def _state() -> _State:
    ctx = click.get_current_context()
    root = ctx.find_root()
    if not isinstance(root.obj, _State):
        root.obj = _State()
    return root.obj


def _set_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        _state().config_path = value


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _state().json = True


def _set_admin(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _state().admin = True


def admin_flag(func: F) -> F:
    """``--admin``, accepted on the ``cache`` group and on each of its commands."""
    return click.option("--admin", is_flag=True, expose_value=False, callback=_set_admin,
                        is_eager=True,
                        help="Act as an operator: cache commands are operator commands.")(func)


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _state().verbose = True


def common(func: F) -> F:
    """``--config``, ``--json`` and ``--verbose``, accepted on the group and on every
    command."""
    func = click.option("--verbose", "-v", is_flag=True, expose_value=False,
                        callback=_set_verbose, is_eager=True,
                        help="Log INFO (the cache's events among it) to stderr.")(func)
    func = click.option("--json", "as_json", is_flag=True, expose_value=False,
                        callback=_set_json, is_eager=True,
                        help="Print one JSON document on stdout.")(func)
    func = click.option("--config", "config_path", metavar="FILE", expose_value=False,
                        callback=_set_config, is_eager=True, envvar="IVCACHE_CONFIG",
                        help="INI config file [env IVCACHE_CONFIG].")(func)
    return func


def _keystone_options(func: F) -> F:
    func = click.option("--os-token", metavar="TOKEN", envvar="OS_TOKEN", default=None,
                        help="The caller's Keystone token, with [glance] auth = keystone "
                             "[env OS_TOKEN].")(func)
    func = click.option("--os-cloud", metavar="NAME", envvar="OS_CLOUD", default=None,
                        help="Log in to Keystone as this cloud of clouds.yaml, with [glance] "
                             "auth = keystone [env OS_CLOUD].")(func)
    return func


def caller(func: F) -> F:
    """Who is calling, handed to the command as ``who``: ``--project``, ``--user``,
    ``--admin``; with [glance] auth = keystone, the caller's own Keystone token instead
    (``--os-token``, or ``--os-cloud`` to log in), validated before anything is done."""
    @functools.wraps(func)
    def run(*args: Any, project: str, user: str | None, admin: bool, os_cloud: str | None,
            os_token: str | None, **kwargs: Any) -> Any:
        return func(*args, who=_caller(project, user, admin, os_cloud, os_token), **kwargs)

    decorated = _keystone_options(run)
    decorated = click.option("--admin", is_flag=True,
                             help="Act as an operator who may touch any volume.")(decorated)
    decorated = click.option("--user", metavar="U", default=None,
                             help="User id [default: derived from the project].")(decorated)
    decorated = click.option("--project", metavar="P", envvar="IVCACHE_PROJECT",
                             default="demo", show_default=True,
                             help="Project to act for [env IVCACHE_PROJECT].")(decorated)
    return decorated  # type: ignore[return-value]  # click passes the options by name


def operator(func: F) -> F:
    """An operator command: ``--admin`` says the caller is an operator; with [glance] auth =
    keystone a token (``--os-token`` or ``--os-cloud``) may say it instead, and then it must
    carry the admin role. Without either, ``_operator_wiring`` refuses the command."""
    @functools.wraps(func)
    def run(*args: Any, os_cloud: str | None, os_token: str | None, **kwargs: Any) -> Any:
        config = load_config(_state().config_path)
        token = _token(config, os_cloud, os_token)
        if token is not None:
            who = _identity(config).context(token)
            if not who.is_admin:
                raise Forbidden(
                    f"cache commands are an operator's: the token of user {who.user_id} in "
                    f"project {who.project_id} has the roles "
                    f"{', '.join(who.roles) or '(none)'}, not admin")
            _state().admin = True
        return func(*args, **kwargs)

    return admin_flag(_keystone_options(run))  # type: ignore[return-value]  # by name


def _from_command_line(*names: str) -> list[str]:
    ctx = click.get_current_context()
    return [n for n in names if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _identity(config: Config) -> KeystoneIdentity:
    identity = build_identity(config)
    assert identity is not None  # keystone mode, checked by the callers
    return identity


def _token(config: Config, os_cloud: str | None, os_token: str | None) -> str | None:
    """The caller's Keystone token in keystone mode (``--os-token``, else one got by logging
    in as ``--os-cloud``), or None. Elsewhere the options are refused when typed, and
    ignored when they come from the environment (OS_CLOUD is often set for other tools)."""
    if not config.keystone_mode:
        given = _from_command_line("os_cloud", "os_token")
        if given:
            raise click.UsageError(
                f"{_flag(given[0])} is for image_source = glance with [glance] auth = "
                "keystone; here --project, --user and --admin say who is calling")
        return None
    if os_token:
        return os_token
    if not os_cloud:
        return None
    _identity(config)  # openstacksdk is there, or a clear error
    from ivcache.adapters.identity.keystone import token_for_cloud
    try:
        return token_for_cloud(os_cloud)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="'--os-cloud'") from None


def _caller(project: str, user: str | None, admin: bool, os_cloud: str | None,
            os_token: str | None) -> RequestContext:
    config = load_config(_state().config_path)
    if not config.keystone_mode:
        _token(config, os_cloud, os_token)
        return RequestContext.for_project(project, user_id=user, admin=admin)
    typed = _from_command_line("project", "user", "admin")
    if typed:
        raise click.UsageError(
            f"{_flag(typed[0])} is not taken with [glance] auth = keystone: the caller's "
            "Keystone token says who is calling (--os-cloud NAME or --os-token TOKEN)")
    token = _token(config, os_cloud, os_token)
    if token is None:
        raise click.UsageError(
            "with [glance] auth = keystone, say who is calling: --os-cloud NAME or "
            "--os-token TOKEN (env OS_CLOUD, OS_TOKEN)")
    return _identity(config).context(token)


def _progress(label: str, total: int) -> Callable[[int], None]:
    """A click progress bar on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty() or total <= 0:
        return lambda n: None
    bar: AbstractContextManager[Any] = click.progressbar(
        length=total, label=label, file=sys.stderr, show_pos=False, show_percent=True)
    state = bar.__enter__()
    seen = 0

    def update(n: int) -> None:
        nonlocal seen
        seen += n
        state.update(n)
        if seen >= total:
            bar.__exit__(None, None, None)

    return update


def _config() -> Config:
    """The configuration, and this process's logging set up from it."""
    config = load_config(_state().config_path)
    setup_logging(config, verbose=_state().verbose)
    return config


def _wiring(host: str | None = None, backend: str | None = None, *,
            adopt: bool = True) -> Wiring:
    """The service of ``backend`` (a usage error if it is no enabled backend, or if none is
    given among several), as ``host`` when given."""
    config = _config().with_host(host)
    names = config.backend_names
    listed = ", ".join(names)
    if backend is None and not config.default_backend:
        raise click.UsageError(f"several backends are enabled ({listed}): choose one with "
                               "--backend NAME")
    if backend is not None and backend not in names:
        raise click.UsageError(f"--backend {backend!r} names no enabled backend; enabled: "
                               f"{listed}")
    wiring = wire(config, backend=backend, progress=_progress, adopt=adopt)
    # Once the command is done: the bus notifier delivers what it holds (bounded).
    click.get_current_context().call_on_close(wiring.close)
    return wiring


def _operator_wiring(host: str | None = None, backend: str | None = None, *,
                     adopt: bool = True) -> Wiring:
    """The wiring for a command that changes or reveals the cache: operators only."""
    if not _state().admin:
        raise Forbidden("cache commands change or reveal the cache of every project: they "
                        "are for operators; run them with --admin (or an admin's token)")
    return _wiring(host, backend, adopt=adopt)


def _emit(document: object, human: Callable[[], None]) -> None:
    if _state().json:
        click.echo(json.dumps(document, indent=2, default=str))
    else:
        human()


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _image_doc(image: Image) -> dict[str, object]:
    return {
        "id": image.id, "name": image.name, "size": image.size,
        "virtual_size": image.virtual_size, "min_disk": image.min_disk,
        "os_hash_algo": image.os_hash_algo, "os_hash_value": image.os_hash_value,
        "checksum": image.checksum, "owner": image.owner, "visibility": image.visibility,
        "status": image.status, "disk_format": image.disk_format,
        "container_format": image.container_format, "updated_at": _iso(image.updated_at),
    }


def _volume_doc(volume: Volume, host: str) -> dict[str, object]:
    doc: dict[str, object] = {"id": volume.id, "size_gb": volume.size_gb,
                              "project": volume.owner, "host": volume.host or host}
    doc[volume.location_kind] = volume.location
    return doc


def _scope_doc(scope: Scope) -> dict[str, object]:
    return {"scope": scope.key, "host": scope.host, "cluster": scope.cluster,
            "backend": scope.backend, "pool": scope.pool}


def _entry_doc(entry: CacheEntry) -> dict[str, object]:
    return {
        "id": entry.id, "image_id": entry.image_id, **_scope_doc(entry.scope),
        "volume_id": entry.volume_id, "size_gb": entry.size_gb, "state": entry.state.value,
        "last_used": _iso(entry.last_used), "hits": entry.hits, "pinned": entry.pinned,
        "created_at": _iso(entry.created_at), "image_updated_at": _iso(entry.image_updated_at),
        # the savings ledger: what this entry's hits saved (fill_seconds null: not measured)
        "fill_seconds": entry.fill_seconds, "bytes_saved": entry.bytes_saved,
        "seconds_saved": entry.seconds_saved,
    }


def _stats_doc(totals: ScopeTotals, scope: Scope) -> dict[str, object]:
    return {**_scope_doc(scope), "hits": totals.hits, "misses": totals.misses,
            "evictions": totals.evictions, "entries": totals.count, "size_gb": totals.size_gb,
            "downloads": totals.downloads, "bytes_downloaded": totals.bytes_downloaded,
            "neighbour_fills": totals.neighbour_fills,
            # requests served by a clone of a cached volume, of those that went through
            # the cache (a disabled cache's requests count in neither)
            "hit_ratio": round(totals.hit_ratio, 4),
            # the savings ledger: image bytes the hits did not download, and the entries'
            # measured fill times less the hits' measured clone times
            "bytes_saved": totals.bytes_saved, "seconds_saved": totals.seconds_saved}


def _table(rows: list[dict[str, object]], columns: list[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fields(doc: dict[str, object]) -> None:
    width = max(len(k) for k in doc)
    for key, value in doc.items():
        click.echo(f"{key.ljust(width)}  {value}")


# ------------------------------------------------------------------ commands

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@common
def cli() -> None:
    """ivcache: an image-volume cache for block storage."""


@cli.command()
@common
def demo() -> None:
    """A self-contained walk-through on the embedded default."""
    from ivcache.entrypoints.demo import run_demo
    run_demo(json_output=_state().json)


@cli.group()
@common
def db() -> None:
    """The cache's database."""


@db.command("upgrade")
@common
def db_upgrade() -> None:
    """Create or upgrade the database schema."""
    from ivcache.adapters.sql.engine import current_revision
    engine = open_database(_config())
    revision = current_revision(engine)
    _emit({"database_url": engine.url.render_as_string(hide_password=True),
           "revision": revision},
          lambda: click.echo(f"database at revision {revision}"))


@cli.group()
@common
def image() -> None:
    """Images (``add`` is for the local image source)."""


@image.command("add")
@common
@caller
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", metavar="N", default=None, help="Image name [default: file name].")
@click.option("--private", is_flag=True, help="Only the project may see it.")
@click.option("--disk-format", metavar="F", type=click.Choice(DISK_FORMATS), default=None,
              help="What the file is; refused if its data is not [default: detected].")
@click.option("--container-format", type=click.Choice(CONTAINER_FORMATS), default="bare",
              show_default=True, help="compressed: the file is gzip data.")
def image_add(file: Path, name: str | None, private: bool, disk_format: str | None,
              container_format: str, who: RequestContext) -> None:
    """Register an image FILE with the local image source; its format is detected."""
    config = _config()
    source = local_images(config, build_images(config))
    config.tenant.check_caller(who)
    size = file.stat().st_size if file.is_file() else 0
    update = _progress(f"copying {file.name}", size)
    added = source.add_image(who, file, name=name,
                             visibility="private" if private else "public", progress=update,
                             disk_format=disk_format, container_format=container_format)
    _emit(_image_doc(added), lambda: _fields(_image_doc(added)))


@image.command("list")
@common
@caller
def image_list(who: RequestContext) -> None:
    """Images the caller may see."""
    found = build_images(_config()).list_images(who)
    docs = [_image_doc(i) for i in found]
    _emit(docs, lambda: _table(docs, ["id", "name", "disk_format", "size", "virtual_size",
                                      "owner", "visibility"]))


@cli.group()
@common
def volume() -> None:
    """Volumes."""


def _backend_option(func: F) -> F:
    return click.option("--backend", metavar="NAME", default=None,
                        help="Backend (a section of enabled_backends) [default: the only one, "
                             "or [ivcache] backend].")(func)


@volume.command("create")
@common
@caller
@_backend_option
@click.option("--image", "image_id", metavar="ID", required=True, help="Image to copy.")
@click.option("--size", "size_gb", metavar="GB", type=int, required=True,
              help="Size in GiB.")
@click.option("--host", metavar="H", default=None, help="Storage host [default: config].")
def volume_create(image_id: str, size_gb: int, host: str | None, backend: str | None,
                  who: RequestContext) -> None:
    """Create a volume from an image, through the cache."""
    wiring = _wiring(host, backend)
    result = wiring.service.create_volume(who, image_id, size_gb)
    doc = _volume_doc(result.volume, wiring.config.host)
    doc.update(outcome=result.outcome.value, entry_id=result.entry_id,
               seconds=round(result.seconds, 6), scope=wiring.service.scope.key,
               filled_from=result.filled_from, clone_seconds=result.clone_seconds)
    _emit(doc, lambda: _fields(doc))


@volume.command("upload")
@common
@caller
@_backend_option
@click.argument("volume_id", metavar="VOLUME_ID")
@click.option("--name", metavar="N", required=True, help="The new image's name.")
@click.option("--disk-format", type=click.Choice(UPLOAD_FORMATS), default="raw",
              show_default=True, help="The image's format (qcow2: converted on the way).")
@click.option("--private", is_flag=True, help="Only the project may see the image.")
def volume_upload(volume_id: str, name: str, disk_format: str, private: bool,
                  backend: str | None, who: RequestContext) -> None:
    """Upload a volume to a new image, and cache it: the next volume from it is a hit."""
    wiring = _wiring(backend=backend)
    result = wiring.service.upload_volume(
        who, volume_id, name=name, disk_format=disk_format, private=private,
        as_internal_tenant=wiring.backend.image_upload_use_internal_tenant)
    image = result.image
    doc: dict[str, object] = {
        "image_id": image.id, "size": image.size or result.size,
        "disk_format": image.disk_format, "os_hash_algo": image.os_hash_algo,
        "os_hash_value": image.os_hash_value, "cached": result.cached,
        "entry_id": result.entry_id, "reason": result.reason}
    _emit(doc, lambda: _fields(doc))


@volume.command("list")
@common
@caller
@_backend_option
@click.option("--all", "all_projects", is_flag=True, help="Every project's (needs --admin).")
def volume_list(all_projects: bool, backend: str | None, who: RequestContext) -> None:
    """The caller's volumes."""
    wiring = _wiring(backend=backend)
    found = wiring.service.list_volumes(who, all_projects=all_projects)
    docs = [_volume_doc(v, wiring.config.host) for v in found]
    _emit(docs, lambda: _table(docs, ["id", "size_gb", "project", "host"]))


@volume.command("delete")
@common
@caller
@_backend_option
@click.argument("volume_id", metavar="ID")
def volume_delete(volume_id: str, backend: str | None, who: RequestContext) -> None:
    """Delete a volume (an admin deleting a cache volume also drops its entry)."""
    _wiring(backend=backend).service.delete_volume(who, volume_id)
    _emit({"id": volume_id, "deleted": True}, lambda: click.echo(f"deleted {volume_id}"))


@cli.group()
@common
@admin_flag
def cache() -> None:
    """The image-volume cache (operator commands)."""


def _host_option(func: F) -> F:
    """``--host`` and ``--backend``: whose cache, on which backend."""
    func = click.option("--host", metavar="H", default=None,
                        help="Storage host [default: config].")(func)
    return _backend_option(func)


_ENTRY_COLUMNS = ["id", "image_id", "scope", "host", "size_gb", "state", "hits", "last_used"]


@cache.command("list")
@common
@operator
@_host_option
def cache_list(host: str | None, backend: str | None) -> None:
    """Cache entries of a backend, made by one host or by all."""
    service = _operator_wiring(backend=backend).service
    docs = [_entry_doc(e) for e in service.list_entries(host, backend=service.scope.backend)]
    _emit(docs, lambda: _table(docs, _ENTRY_COLUMNS))


@cache.command("show")
@common
@operator
@_backend_option
@click.argument("entry_id", metavar="ENTRY_ID")
def cache_show(entry_id: str, backend: str | None) -> None:
    """One cache entry."""
    doc = _entry_doc(_operator_wiring(backend=backend).service.get_entry(entry_id))
    _emit(doc, lambda: _fields(doc))


@cache.command("evict")
@common
@operator
@_host_option
@click.option("--image", "image_id", metavar="ID", default=None)
@click.option("--entry", "entry_id", metavar="ID", default=None)
@click.option("--all", "everything", is_flag=True)
def cache_evict(host: str | None, backend: str | None, image_id: str | None,
                entry_id: str | None, everything: bool) -> None:
    """Evict entries: by image, by entry, or all (of the host's scope)."""
    if sum((image_id is not None, entry_id is not None, everything)) != 1:
        raise click.UsageError("give exactly one of --image, --entry or --all")
    gone = _operator_wiring(host, backend).service.evict(
        image_id=image_id, entry_id=entry_id, everything=everything)
    docs = [_entry_doc(e) for e in gone]
    _emit({"evicted": docs}, lambda: click.echo(f"evicted {len(docs)} entr"
                                                f"{'y' if len(docs) == 1 else 'ies'}"))


@cache.command("prune")
@common
@operator
@_host_option
def cache_prune(host: str | None, backend: str | None) -> None:
    """Evict least recently used entries until the scope is within its limits."""
    docs = [_entry_doc(e) for e in _operator_wiring(host, backend).service.prune()]
    _emit({"evicted": docs}, lambda: click.echo(f"pruned {len(docs)}"))


@cache.command("stats")
@common
@operator
@_host_option
def cache_stats(host: str | None, backend: str | None) -> None:
    """Hits, misses, evictions, downloads and neighbour fills of a host's scope."""
    wiring = _operator_wiring(host, backend)
    doc = _stats_doc(wiring.service.stats(), wiring.service.scope)
    doc["events_pending"] = wiring.outbox.pending() if wiring.outbox else 0
    _emit(doc, lambda: _fields(doc))


@cache.command("adopt")
@common
@operator
@_host_option
def cache_adopt(host: str | None, backend: str | None) -> None:
    """Move the host's entries left in another scope (before it joined a cluster) into
    its scope; an image the scope holds already is evicted (reason merged). Every command
    does this on its way; this one says what it did."""
    service = _operator_wiring(host, backend, adopt=False).service
    done: Adoption = service.adopt()
    doc = {"scope": service.scope.key,
           "adopted": [_entry_doc(e) for e in done.adopted],
           "merged": [_entry_doc(e) for e in done.merged],
           "left": [_entry_doc(e) for e in done.left]}
    _emit(doc, lambda: click.echo(
        f"{service.scope.key}: adopted {len(done.adopted)}, merged {len(done.merged)}, "
        f"left for later {len(done.left)}"))


ImageCommand = Callable[[str, str | None, str | None], None]


def _image_command(name: str) -> Callable[[ImageCommand], click.Command]:
    """A cache command on one image's entry in a scope: ``IMAGE_ID``, ``--host``,
    ``--backend``."""
    def decorate(func: ImageCommand) -> click.Command:
        return cache.command(name)(common(operator(_host_option(
            click.argument("image_id", metavar="IMAGE_ID")(func)))))
    return decorate


@_image_command("warm")
def cache_warm(image_id: str, host: str | None, backend: str | None) -> None:
    """Cache an image in a host's scope ahead of demand."""
    doc = _entry_doc(_operator_wiring(host, backend).service.warm(image_id))
    _emit(doc, lambda: _fields(doc))


@_image_command("pin")
def cache_pin(image_id: str, host: str | None, backend: str | None) -> None:
    """Keep an image's entry from being evicted to make room."""
    _set_pinned(image_id, host, backend, True)


@_image_command("unpin")
def cache_unpin(image_id: str, host: str | None, backend: str | None) -> None:
    """Let an image's entry be evicted again."""
    _set_pinned(image_id, host, backend, False)


def _set_pinned(image_id: str, host: str | None, backend: str | None, pinned: bool) -> None:
    doc = _entry_doc(_operator_wiring(host, backend).service.pin(image_id, pinned))
    done = "pinned" if pinned else "unpinned"
    _emit(doc, lambda: click.echo(f"{done} {image_id} in {doc['scope']}"))


@cache.command("reconcile")
@common
@operator
@_host_option
@click.option("--fix", is_flag=True, help="Repair what differs (default: report only).")
def cache_reconcile(host: str | None, backend: str | None, fix: bool) -> None:
    """Compare entries with the storage: missing volumes, dead claims, orphan cache
    volumes, and what dead processes left (partial volumes, index damage)."""
    findings = _operator_wiring(host, backend).service.reconcile(fix=fix)
    docs: list[dict[str, object]] = [
        {"kind": f.kind, "volume_id": f.volume_id, "entry_id": f.entry_id,
         "image_id": f.image_id, "fixed": f.fixed, "path": f.path, "size": f.size}
        for f in findings]
    _emit(docs, lambda: _table(docs, ["kind", "volume_id", "entry_id", "fixed", "path"]))


@cli.group()
@common
def events() -> None:
    """The cache's events waiting for the bus (the outbox)."""


@events.command("flush")
@common
def events_flush() -> None:
    """Send the events that wait for the bus now; print how many were sent and wait."""
    wiring = _wiring()
    if wiring.bus is None:
        raise ConfigError("no bus to send to: set [oslo_messaging_notifications] driver = "
                          "messagingv2 and transport_url (or notifier = messaging)")
    sent, pending = wiring.bus.send_now()
    doc = {"sent": sent, "pending": pending}
    _emit(doc, lambda: click.echo(f"sent {sent} event{'' if sent == 1 else 's'}, "
                                  f"{pending} wait{'s' if pending == 1 else ''}"))


# ------------------------------------------------------------------ entry point

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _Stopped(BaseException):
    """SIGTERM or SIGINT arrived: it unwinds the command like an error (not an
    ``Exception``, so that no handler takes it for a failure it may retry), and every
    clean-up on the way runs: the claim released, the half-made volume deleted."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    # Only the first signal unwinds: a second one must not cut that clean-up short
    # (SIGKILL still stops the process; reconcile then finds what it left).
    for each in (signal.SIGTERM, signal.SIGINT):
        signal.signal(each, signal.SIG_IGN)
    raise _Stopped(signum)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; domain errors become one line on stderr and exit code 1; SIGTERM and
    SIGINT abort cleanly (exit 128 + the signal's number)."""
    # keystoneauth warns on stderr of what the CLI reports itself in one line (a failed
    # version discovery when Keystone is unreachable).
    logging.getLogger("keystoneauth").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        code = cli.main(args=argv, prog_name="ivcache", standalone_mode=False)
    except _Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        click.echo(f"ivcache: stopped by {name}: what it had begun was undone", err=True)
        sys.exit(128 + stopped.signum)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except IvcacheError as exc:
        click.echo(f"ivcache: error: {_one_line(exc)}", err=True)
        sys.exit(1)
    except OSError as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        click.echo(f"ivcache: error:{where} {exc.strerror or exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


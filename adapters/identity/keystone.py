"""Who is calling, from the caller's own Keystone token.

A token is validated as keystonemiddleware does it: ``GET /v3/auth/tokens`` with the token
in ``X-Subject-Token``, asked with ivcache's own credentials (a clouds.yaml cloud whose user
has Keystone's ``service`` role, or is an admin). Keystone's answer names the project, the
user and the roles; the ``admin`` role makes the caller an admin. The context carries the
token on, so that Glance is asked with it (``RequestContext.auth_token``).

Validations are cached in the process for the token's remaining life, at most
``cache_seconds`` (0: no cache), so that a hit pays no round trip to Keystone. As with
keystonemiddleware's cache, a token revoked meanwhile may be honoured until its entry runs
out; Glance checks the token itself on every call it is given, through a cache of its own.

Errors: ``TokenRefused`` for a token Keystone does not accept (expired, revoked, malformed);
``IdentityUnavailable`` when Keystone cannot be reached or refuses ivcache's own
credentials; ``AuthError`` for a token that is not scoped to a project.
"""

from __future__ import annotations

import collections
import datetime as dt
import threading
from collections.abc import Callable

import openstack
import openstack.connection
import openstack.exceptions
from keystoneauth1 import exceptions as ks_exceptions
from openstack.identity.v3.token import Token

from ivcache.adapters._reasons import describe
from ivcache.core.errors import AuthError, ConfigError, IdentityUnavailable, TokenRefused
from ivcache.core.model import RequestContext

__all__ = ["KeystoneIdentity", "token_for_cloud"]

_MAX_CACHED = 1024

# Connection failures, timeouts and failed version discoveries: Keystone is not there.
_UNREACHABLE = (ks_exceptions.ConnectionError, ks_exceptions.DiscoveryFailure)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class KeystoneIdentity:
    """Turns Keystone tokens into ``RequestContext``s, validating them with ``os_cloud``'s
    credentials (TLS as that clouds.yaml entry says). ``clock`` (aware UTC) is injectable
    for tests of the cache."""

    def __init__(self, *, os_cloud: str, cache_seconds: float = 300.0,
                 clock: Callable[[], dt.datetime] = _utcnow) -> None:
        if not os_cloud:
            raise ConfigError("validating Keystone tokens needs a clouds.yaml cloud with "
                              "ivcache's own credentials ([ivcache] keystone_cloud, or "
                              "[glance] os_cloud)")
        self.os_cloud = os_cloud
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[
            str, tuple[dt.datetime, RequestContext]] = collections.OrderedDict()
        self._conn: openstack.connection.Connection | None = None

    def context(self, token: str) -> RequestContext:
        """The caller the token belongs to, as Keystone says (cached, see the module)."""
        now = self.clock()
        with self._lock:
            cached = self._cache.get(token)
            if cached is not None and cached[0] > now:
                self._cache.move_to_end(token)
                return cached[1]
            self._cache.pop(token, None)
        ctx, expires = self._validate(token)
        if self.cache_seconds > 0:
            until = min(now + dt.timedelta(seconds=self.cache_seconds), expires)
            with self._lock:
                self._cache[token] = (until, ctx)
                while len(self._cache) > _MAX_CACHED:
                    self._cache.popitem(last=False)
        return ctx

    # -- asking Keystone ---------------------------------------------------------------------

    def _connection(self) -> openstack.connection.Connection:
        if self._conn is None:
            try:
                self._conn = openstack.connect(cloud=self.os_cloud)
            except openstack.exceptions.ConfigException as exc:
                raise ConfigError(f"cloud {self.os_cloud!r} (ivcache's own credentials for "
                                  f"Keystone): {exc}") from exc
        return self._conn

    def _validate(self, token: str) -> tuple[RequestContext, dt.datetime]:
        conn = self._connection()
        where = f"Keystone at {_auth_url(conn)}"
        try:
            # The resource, not conn.identity.validate_token: the proxy's type is v2 or v3.
            found = Token.validate(conn.identity, token, nocatalog=True)
        except openstack.exceptions.NotFoundException as exc:
            raise TokenRefused(_details(exc)) from None
        except openstack.exceptions.ForbiddenException as exc:
            raise IdentityUnavailable(
                f"{where}: cloud {self.os_cloud!r} may not validate tokens "
                f"({_details(exc)}): give its user Keystone's service role") from None
        except ks_exceptions.Unauthorized:
            raise self._refused_us(where) from None
        except openstack.exceptions.HttpException as exc:
            if exc.status_code == 401:
                raise self._refused_us(where) from None
            raise IdentityUnavailable(f"{where} failed to validate the token: "
                                      f"{_details(exc)}") from None
        except _UNREACHABLE as exc:
            raise IdentityUnavailable(f"{where} is unreachable: {describe(exc)}") from None
        except ks_exceptions.ClientException as exc:
            raise IdentityUnavailable(f"{where} failed to validate the token: "
                                      f"{describe(exc)}") from None
        return _to_context(token, found)

    def _refused_us(self, where: str) -> IdentityUnavailable:
        return IdentityUnavailable(f"{where} refused ivcache's own credentials (cloud "
                                   f"{self.os_cloud!r}): check that clouds.yaml entry")


def token_for_cloud(cloud: str) -> str:
    """A new token from a clouds.yaml cloud's credentials (what ``--os-cloud`` logs in with).

    The cloud's own settings (auth type, project, TLS) apply, as in the openstack CLI.
    """
    try:
        conn = openstack.connect(cloud=cloud)
    except openstack.exceptions.ConfigException as exc:
        raise ConfigError(f"cloud {cloud!r}: {exc}") from exc
    where = f"Keystone at {_auth_url(conn)}"
    try:
        token = conn.session.get_token()
    except ks_exceptions.Unauthorized as exc:
        raise AuthError(f"{where} refused the credentials of cloud {cloud!r} "
                        f"({str(exc).split(' (Request-ID')[0]}): check that clouds.yaml "
                        "entry") from None
    except _UNREACHABLE as exc:
        raise IdentityUnavailable(f"{where} is unreachable: {describe(exc)}") from None
    except ks_exceptions.ClientException as exc:
        raise AuthError(f"cloud {cloud!r}: no token from {where}: {describe(exc)}") from None
    if not token:
        raise AuthError(f"cloud {cloud!r}: {where} gave no token")
    return str(token)


def _auth_url(conn: openstack.connection.Connection) -> str:
    url = conn.config.get_auth_args().get("auth_url")
    return str(url) if url else "(no auth_url)"


def _details(exc: openstack.exceptions.HttpException) -> str:
    said = exc.details or exc.message or str(exc)
    return f"{said} (HTTP {exc.status_code})" if exc.status_code else str(said)


def _to_context(token: str, found: Token) -> tuple[RequestContext, dt.datetime]:
    project = found.project or {}
    if not project.get("id"):
        raise AuthError("the token is not scoped to a project (system- or domain-scoped, or "
                        "unscoped): get a project-scoped token")
    roles = tuple(str(r["name"]) for r in found.roles or () if r.get("name"))
    expires = dt.datetime.fromisoformat(str(found.expires_at))
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=dt.UTC)
    ctx = RequestContext(str(project["id"]), str((found.user or {}).get("id", "")), roles,
                         is_admin="admin" in roles, auth_token=token)
    return ctx, expires

"""OpenStack Glance (image API v2) as the image source, through openstacksdk.

Two ways to say who is calling (``auth``):

``trusted-headers``
    Every request carries the caller's identity as the headers keystonemiddleware would set
    (``X-Identity-Status: Confirmed``, ``X-Project-Id``, ``X-User-Id``, ``X-Roles``), sent
    through keystoneauth's ``additional_headers`` (glanceclient's ``identity_headers``
    percent-encodes the comma in ``member,reader``). Glance applies its own visibility
    rules. For a Glance behind a trusted proxy, and for tests without Keystone. One
    keystoneauth session per identity, kept in a small LRU.

``keystone``
    Every request made for a caller carries the caller's own Keystone token
    (``RequestContext.auth_token``), forwarded as it is by keystoneauth's
    ``token_endpoint.Token``: Glance validates it and applies its own rules (visibility,
    membership, its policy), so ivcache has none of its own. ``token_endpoint`` rather than
    ``v3.Token``: the latter trades the token for a new one at Keystone first (about 30 ms
    more on the first call of each caller, and a token Glance has not seen and must
    validate). The internal tenant's credentials (``os_cloud``, a clouds.yaml entry) answer
    only the cache's own questions, asked with the ``internal`` context (is an image gone
    for everyone, ``cache warm``); they must be able to read every image (Glance admin). A
    caller's context without a token is refused (``AuthError``), never served with them.
    Without ``url``, Glance's endpoint is taken from that cloud's catalog.

Errors: 403 and 404 are both ``ImageNotFound`` (an invisible image is never confirmed to
exist). Connection errors and 5xx are retried ``retries`` times with exponential backoff,
then ``ImageUnavailable`` naming the URL. Image data is streamed in ``chunk_size`` pieces; a
connection dropped mid-stream is resumed with a ``Range`` request (up to ``retries`` times),
else ``ImageUnavailable``. The core hashes the stream and checks the total length, so a
resumed download that stitched different bytes together still fails the hash check.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import openstack
import openstack.connection
import openstack.exceptions
import requests
from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import noauth, token_endpoint
from keystoneauth1 import session as ks_session

from ivcache.adapters._reasons import describe as _describe
from ivcache.core.errors import (
    AuthError,
    ConfigError,
    Forbidden,
    ImageError,
    ImageNotFound,
    ImageUnavailable,
    InvalidIdentifier,
    IvcacheError,
    TokenRefused,
)
from ivcache.core.model import Image, InternalTenant, NewImage, RequestContext, check_id

__all__ = ["AUTH_MODES", "GlanceImageSource"]

AUTH_MODES = ("keystone", "trusted-headers")
_MAX_SESSIONS = 128
_MAX_BACKOFF = 5.0

# What a failed attempt looks like from requests/keystoneauth/openstacksdk: retried, then
# reported as ImageUnavailable.
_TRANSIENT: tuple[type[BaseException], ...] = (
    requests.RequestException,
    ks_exceptions.ClientException,
    openstack.exceptions.SDKException,
    OSError,
)


class _Retry(Exception):
    """An attempt failed in a way worth trying again (a 5xx, a refused connection...)."""


class GlanceImageSource:
    """Images from Glance v2; implements the ``ImageSource`` port.

    ``url`` is the Glance root URL (``http://host:9292``, not ``.../v2``); required for
    ``trusted-headers``, an endpoint override for ``keystone`` (else the catalog's).
    ``internal`` is the context of the cache's own questions (the internal tenant's), the
    only one ``keystone`` answers with ``os_cloud``'s credentials.
    ``sleep`` is injectable so tests of the retry path do not wait.
    """

    def __init__(
        self,
        *,
        url: str = "",
        os_cloud: str = "",
        auth: str = "keystone",
        insecure: bool = False,
        cafile: str = "",
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 0.25,
        chunk_size: int = 1 << 20,
        page_size: int = 200,
        internal: RequestContext | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if auth not in AUTH_MODES:
            raise ConfigError(f"[glance] auth = {auth!r} is not one of {', '.join(AUTH_MODES)}")
        if auth == "trusted-headers" and not url:
            raise ConfigError("[glance] auth = trusted-headers needs url = the Glance root "
                              "URL (e.g. http://127.0.0.1:9292)")
        if auth == "keystone" and not os_cloud:
            raise ConfigError("[glance] auth = keystone needs os_cloud = a cloud of "
                              "clouds.yaml (the service's credentials)")
        if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(f"[glance] url = {url!r} is not an http(s) URL")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self.url = url.rstrip("/")
        self.os_cloud = os_cloud
        self.auth = auth
        self.verify: bool | str = cafile if cafile else not insecure
        self.timeout = (connect_timeout or None, read_timeout or None)
        self.retries = retries
        self.backoff = backoff
        self.chunk_size = chunk_size
        self.page_size = page_size
        self.sleep = sleep
        self.internal = internal if internal is not None else InternalTenant().context()
        self._where = f"glance at {self.url}" if self.url else f"glance of cloud {os_cloud}"
        self._catalog_url = ""
        self._lock = threading.Lock()
        self._connections: collections.OrderedDict[
            tuple[str, ...], openstack.connection.Connection] = collections.OrderedDict()

    # -- the ImageSource port ------------------------------------------------------------

    def get_image(self, ctx: RequestContext, image_id: str) -> Image:
        path = self._image_path(image_id)
        response = self._request(ctx, "GET", path)
        if response.status_code in (403, 404):
            raise ImageNotFound(image_id)
        return _to_image(self._json(response, image_id))

    def open_data(self, ctx: RequestContext, image_id: str) -> Iterator[bytes]:
        path = self._image_path(image_id) + "/file"
        return self._stream(ctx, image_id, path)

    def upload_image(self, ctx: RequestContext, spec: NewImage,
                     data: Callable[[Image], Iterable[bytes]]) -> Image:
        """``POST /v2/images`` then ``PUT /v2/images/ID/file`` with ``data(image)``'s bytes,
        streamed (chunked), as ``ctx`` (the ``ImageUploader`` port); the image as Glance
        has it afterwards (``active``, with its own ``os_hash_value`` of what it stored).

        Neither request is retried: a repeated POST would make a second image, and the
        stream cannot be replayed. If anything fails after the POST, the image is deleted.
        """
        body: dict[str, str] = {"name": spec.name, "disk_format": spec.disk_format,
                                "container_format": spec.container_format}
        if spec.visibility:
            body["visibility"] = spec.visibility
        response = self._once(ctx, "POST", "images", json=body)
        queued = _to_image(self._answer(response, 201, f"creating image {spec.name!r}"))
        try:
            chunks = _Remembered(data(queued))
            response = self._once(ctx, "PUT", self._image_path(queued.id) + "/file",
                                  data=chunks,
                                  headers={"Content-Type": "application/octet-stream"},
                                  failed=chunks)
            response.close()
            if response.status_code != 204:
                raise self._refused(response, f"storing the data of image {queued.id}")
            return self.get_image(ctx, queued.id)
        except BaseException:
            self._delete_quietly(ctx, queued.id)
            raise

    def _once(self, ctx: RequestContext, method: str, path: str, *,
              failed: _Remembered | None = None, **body: Any) -> requests.Response:
        """One request, not retried; a connection failure is ``ImageUnavailable`` (or the
        error the request body's own iterator raised, if that is what broke it)."""
        try:
            return self._attempt(ctx, method, path, stream=False, headers=body.pop(
                "headers", None), params=None, **body)
        except _Retry as exc:
            if failed is not None and failed.error is not None:
                raise failed.error from None
            raise ImageUnavailable(f"{self._where} is unavailable: {exc} ({method} "
                                   f"{path})") from None
        except BaseException:
            if failed is not None and failed.error is not None:
                raise failed.error from None
            raise

    def _answer(self, response: requests.Response, status: int, what: str) -> dict[str, Any]:
        if response.status_code != status:
            response.close()
            raise self._refused(response, what)
        return self._json(response, what, status=status)

    def _refused(self, response: requests.Response, what: str) -> IvcacheError:
        detail = f"HTTP {response.status_code} {response.reason or ''}".strip()
        if response.status_code == 403:
            return Forbidden(f"{self._where} refused {what}: {detail} (its policy does not "
                             "let this project do it)")
        if response.status_code in (400, 409, 413):
            return ImageError(f"{self._where} refused {what}: {detail}")
        return ImageUnavailable(f"{self._where}: {detail} {what}")

    def _delete_quietly(self, ctx: RequestContext, image_id: str) -> None:
        with contextlib.suppress(IvcacheError, *_TRANSIENT):
            self._attempt(ctx, "DELETE", self._image_path(image_id), stream=False,
                          headers=None, params=None).close()

    def list_images(self, ctx: RequestContext) -> list[Image]:
        found: list[Image] = []
        marker: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": self.page_size}
            if marker:
                params["marker"] = marker
            response = self._request(ctx, "GET", "images", params=params)
            doc = self._json(response, "list")
            page = doc.get("images") or []
            found.extend(_to_image(item) for item in page)
            if not page or not doc.get("next"):
                return found
            marker = str(page[-1]["id"])

    # -- streaming -----------------------------------------------------------------------

    def _stream(self, ctx: RequestContext, image_id: str, path: str) -> Iterator[bytes]:
        received = 0
        drops = 0
        while True:
            headers = {"Range": f"bytes={received}-"} if received else None
            response = self._request(ctx, "GET", path, stream=True, headers=headers)
            try:
                if response.status_code in (403, 404):
                    raise ImageNotFound(image_id)
                if response.status_code == 204:
                    return  # an image with no data: the core's size check decides
                expected = 206 if received else 200
                if response.status_code != expected:
                    raise ImageUnavailable(
                        f"{self._where}: image {image_id}: HTTP {response.status_code} "
                        f"{response.reason or ''} reading the data at byte {received}".strip())
                if received:
                    self._check_resumed_at(response, image_id, received)
                length = _content_length(response)
                got = 0
                try:
                    for chunk in response.iter_content(self.chunk_size):
                        if chunk:
                            got += len(chunk)
                            received += len(chunk)
                            yield chunk
                except _TRANSIENT as exc:
                    reason = _describe(exc)
                else:
                    if length is None or got >= length:
                        return
                    reason = f"connection closed after {got} of {length} bytes"
            finally:
                response.close()
            drops += 1
            if drops > self.retries:
                raise ImageUnavailable(
                    f"{self._where}: image {image_id}: the download broke off at byte "
                    f"{received} ({reason}), {drops} times; try again")
            self.sleep(self._delay(drops - 1))

    def _check_resumed_at(self, response: requests.Response, image_id: str,
                          offset: int) -> None:
        # "bytes START-END/TOTAL": a server that ignores the start would splice wrong bytes.
        content_range = response.headers.get("Content-Range", "")
        unit, _, spec = content_range.partition(" ")
        start = spec.partition("-")[0]
        if unit != "bytes" or not start.isdigit() or int(start) != offset:
            raise ImageUnavailable(
                f"{self._where}: image {image_id}: cannot resume the download at byte "
                f"{offset} (Content-Range {content_range!r})")

    # -- requests ------------------------------------------------------------------------

    def _request(self, ctx: RequestContext, method: str, path: str, *,
                 stream: bool = False, headers: dict[str, str] | None = None,
                 params: dict[str, str | int] | None = None) -> requests.Response:
        """One request, retried on connection errors and 5xx; a 4xx is returned as is."""
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self._delay(attempt - 1))
            try:
                return self._attempt(ctx, method, path, stream=stream, headers=headers,
                                     params=params)
            except _Retry as exc:
                reason = str(exc)
        tries = self.retries + 1
        raise ImageUnavailable(f"{self._where} is unavailable: {reason} "
                               f"({tries} attempt{'s' if tries > 1 else ''})")

    def _attempt(self, ctx: RequestContext, method: str, path: str, *, stream: bool,
                 headers: dict[str, str] | None,
                 params: dict[str, str | int] | None, **body: Any) -> requests.Response:
        try:
            conn = self._connection(ctx)
            response: requests.Response = conn.image.request(
                path, method, stream=stream, headers=headers or {}, params=params,
                timeout=self.timeout, connect_retries=0, status_code_retries=0,
                raise_exc=False, **body)
        except ks_exceptions.DiscoveryFailure as exc:
            raise _Retry(self._why_no_discovery(exc)) from exc
        except _TRANSIENT as exc:
            raise _Retry(_describe(exc)) from exc
        if response.status_code >= 500:
            response.close()
            raise _Retry(f"HTTP {response.status_code} {response.reason or ''}".strip())
        if response.status_code == 401:
            response.close()
            if ctx.auth_token and self.auth == "keystone":
                raise TokenRefused(f"{self._where} answered HTTP 401 to the caller's token")
            raise ImageUnavailable(
                f"{self._where} refused ivcache's credentials (HTTP 401): check [glance] "
                "auth and, for keystone, the clouds.yaml entry")
        return response

    def _why_no_discovery(self, exc: ks_exceptions.DiscoveryFailure) -> str:
        # keystoneauth's failed version discovery drops its cause: ask the root URL once,
        # so the message says "connection refused" rather than "no version document".
        if not self.url:
            return _describe(exc)
        try:
            with requests.get(self.url, timeout=self.timeout, verify=self.verify) as probe:
                return (f"HTTP {probe.status_code} and no version document at the URL "
                        "(is it the Glance root URL?)")
        except _TRANSIENT as probe_exc:
            return _describe(probe_exc)

    def _delay(self, attempt: int) -> float:
        return float(min(self.backoff * (2**attempt), _MAX_BACKOFF))

    def _json(self, response: requests.Response, what: str, *,
              status: int = 200) -> dict[str, Any]:
        try:
            if response.status_code != status:
                raise ImageUnavailable(
                    f"{self._where}: HTTP {response.status_code} {response.reason or ''} "
                    f"for {what}")
            doc = response.json()
        except ValueError:
            raise ImageUnavailable(f"{self._where}: an answer for {what} is not "
                                   "JSON") from None
        finally:
            response.close()
        if not isinstance(doc, dict):
            raise ImageUnavailable(f"{self._where}: an answer for {what} is not an object")
        return doc

    @staticmethod
    def _image_path(image_id: str) -> str:
        try:
            check_id("image", image_id)
        except InvalidIdentifier:
            # Not a name Glance could have given: the same answer as an unknown id.
            raise ImageNotFound(str(image_id)) from None
        return f"images/{urllib.parse.quote(image_id, safe='')}"

    # -- identities ----------------------------------------------------------------------

    def _connection(self, ctx: RequestContext) -> openstack.connection.Connection:
        key = self._session_key(ctx)
        with self._lock:
            conn = self._connections.get(key)
            if conn is not None:
                self._connections.move_to_end(key)
                return conn
        conn = self._connect(ctx, key)
        with self._lock:
            self._connections[key] = conn
            while len(self._connections) > _MAX_SESSIONS:
                _, old = self._connections.popitem(last=False)
                old.session.session.close()
        return conn

    @staticmethod
    def _roles(ctx: RequestContext) -> tuple[str, ...]:
        roles = tuple(ctx.roles) or ("member", "reader")
        if ctx.is_admin and "admin" not in roles:
            roles += ("admin",)
        return roles

    def _session_key(self, ctx: RequestContext) -> tuple[str, ...]:
        """Which session asks for ``ctx``: one per identity (trusted-headers), per token,
        or the internal tenant's."""
        if self.auth == "trusted-headers":
            return ("headers", ctx.project_id, ctx.user_id, *self._roles(ctx))
        if ctx.auth_token:
            return ("token", ctx.auth_token)
        if ctx == self.internal:
            return ("internal",)
        raise AuthError(
            f"{self._where}: auth = keystone asks Glance with the caller's own token, and "
            f"the request of project {ctx.project_id} carries none: give the caller's token "
            "(RequestContext.auth_token, --os-token or --os-cloud)")

    def _connect(self, ctx: RequestContext,
                 key: tuple[str, ...]) -> openstack.connection.Connection:
        if key[0] == "headers":
            headers = {
                "X-Identity-Status": "Confirmed",
                "X-Project-Id": ctx.project_id,
                "X-User-Id": ctx.user_id,
                "X-Roles": ",".join(self._roles(ctx)),
            }
            session = ks_session.Session(auth=noauth.NoAuth(), verify=self.verify,
                                         additional_headers=headers)
            return openstack.connection.Connection(session=session,
                                                   image_endpoint_override=self.url)
        if key[0] == "token":
            # The caller's token as it is: no call to Keystone, Glance validates it.
            url = self.url or self._url_from_catalog()
            session = ks_session.Session(auth=token_endpoint.Token(url, ctx.auth_token),
                                         verify=self.verify)
            return openstack.connection.Connection(session=session,
                                                   image_endpoint_override=url)
        options: dict[str, Any] = {"verify": self.verify is not False}
        if isinstance(self.verify, str):
            options["cacert"] = self.verify
        if self.url:
            options["image_endpoint_override"] = self.url
        try:
            return openstack.connect(cloud=self.os_cloud, **options)
        except openstack.exceptions.ConfigException as exc:
            raise ConfigError(f"[glance] os_cloud = {self.os_cloud!r}: {exc}") from exc

    def _url_from_catalog(self) -> str:
        """Glance's endpoint in the catalog of the internal tenant's cloud (asked once)."""
        if not self._catalog_url:
            found = self._connection(self.internal).endpoint_for("image")
            if not found:
                raise ConfigError(f"[glance] url is empty and the catalog of cloud "
                                  f"{self.os_cloud!r} has no image endpoint: set url")
            self._catalog_url = str(found).rstrip("/")
        return self._catalog_url


class _Remembered:
    """A request body's chunks that remember the error their iterator raised: requests
    reports it as a broken connection, and the caller wants the error itself."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        except BaseException as exc:
            self.error = exc
            raise


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def _when(value: object) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        # Glance writes UTC with a "Z"; a bare time is UTC too.
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _to_image(doc: dict[str, Any]) -> Image:
    virtual = doc.get("virtual_size")
    return Image(
        id=str(doc["id"]),
        name=_text(doc.get("name")) or "",
        size=_int(doc.get("size")),
        virtual_size=_int(virtual) if isinstance(virtual, int) and virtual > 0 else None,
        min_disk=_int(doc.get("min_disk")),
        updated_at=_when(doc.get("updated_at")),
        owner=_text(doc.get("owner")),
        visibility=_text(doc.get("visibility")) or "private",
        status=_text(doc.get("status")) or "unknown",
        os_hash_algo=_text(doc.get("os_hash_algo")),
        os_hash_value=_text(doc.get("os_hash_value")),
        checksum=_text(doc.get("checksum")),
        disk_format=_text(doc.get("disk_format")) or "raw",
        container_format=_text(doc.get("container_format")) or "bare",
    )

"""GlanceImageSource against a scripted HTTP server: what a live Glance cannot easily show
(a 5xx then success, a connection cut mid-stream), the identity headers, keystone mode's
tokens. (What Glance lets each caller see is tested against a real Keystone and Glance in
tests/integration/test_keystone.py.)"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from ivcache.adapters.images.glance import GlanceImageSource
from ivcache.adapters.memory import InMemoryUnitOfWork, RecordingNotifier
from ivcache.adapters.storage.file import FileStorage
from ivcache.core.errors import (
    AuthError,
    ConfigError,
    ImageNotFound,
    ImageUnavailable,
    TokenRefused,
)
from ivcache.core.events import CacheEvict, EvictReason
from ivcache.core.model import InternalTenant, Outcome, RequestContext
from ivcache.core.service import CacheService

MIB = 1 << 20
ALICE = RequestContext.for_project("alice")
BOB = RequestContext.for_project("bob")
ADMIN = RequestContext.for_project("ops", admin=True)
IMAGE = "0f6b3c2e-1111-4a4a-9b9b-000000000001"
SHARED = "0f6b3c2e-1111-4a4a-9b9b-000000000002"


@attrs.define
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@attrs.define
class Script:
    """What the fake Glance answers: ``plan[kind]`` is a queue of behaviours for the next
    requests of that kind (``meta``, ``file``), each ``ok`` once the queue is empty."""

    data: bytes
    plan: dict[str, list[str]] = attrs.Factory(dict)
    seen: list[Seen] = attrs.Factory(list)
    hashes: bool = True
    updated_at: str = "2026-11-26T12:07:08Z"

    def doc(self, image_id: str) -> dict[str, object]:
        doc = {"id": image_id, "name": "disk", "status": "active", "size": len(self.data),
                "virtual_size": None, "min_disk": 0, "owner": "alice",
                "visibility": "shared" if image_id == SHARED else "private",
                "os_hash_algo": "sha512",
                "os_hash_value": hashlib.sha512(self.data).hexdigest(),
                "checksum": hashlib.md5(self.data).hexdigest(),
                "disk_format": "raw", "container_format": "bare",
                "updated_at": self.updated_at}
        if not self.hashes:
            doc.update(os_hash_algo=None, os_hash_value=None, checksum=None)
        return doc

    def next(self, kind: str) -> str:
        queue = self.plan.get(kind) or []
        return queue.pop(0) if queue else "ok"

    def of(self, suffix: str) -> list[Seen]:
        return [s for s in self.seen if s.path.split("?")[0].endswith(suffix)]


def _handler(script: Script) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes = b"",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for key, value in (headers or {"Content-Type": "application/json"}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            script.seen.append(Seen("GET", self.path, dict(self.headers.items())))
            path = self.path.split("?")[0]
            port = self.headers.get("Host", "").rpartition(":")[2]
            if path in ("", "/"):
                versions = {"versions": [{"id": "v2.17", "status": "CURRENT", "links": [
                    {"rel": "self", "href": f"http://127.0.0.1:{port}/v2/"}]}]}
                self._send(300, json.dumps(versions).encode())
            elif path == "/v2/images":
                images = [script.doc(IMAGE), script.doc(SHARED)]
                self._send(200, json.dumps({"images": images}).encode())
            elif path.endswith("/file"):
                self._file()
            else:
                self._meta(path.rsplit("/", 1)[-1])

        def _meta(self, image_id: str) -> None:
            how = script.next("meta")
            if how == "ok":
                self._send(200, json.dumps(script.doc(image_id)).encode())
            else:
                self._send(int(how))

        def _file(self) -> None:
            how = script.next("file")
            if how.isdigit():
                self._send(int(how))
                return
            start = 0
            ranged = self.headers.get("Range")
            if ranged:
                start = int(ranged.removeprefix("bytes=").rstrip("-"))
            body = script.data[start:]
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            if ranged:
                total = len(script.data)
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            self.end_headers()
            if how == "short":
                # Promise the whole body, send a third of it, hang up.
                self.wfile.write(body[: len(body) // 3])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def script() -> Script:
    return Script(os.urandom(3 * MIB + 123))


@pytest.fixture
def url(script: Script) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@attrs.define
class Sleeps:
    calls: list[float] = attrs.Factory(list)

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def _source(url: str, sleeps: Sleeps, **kw: object) -> GlanceImageSource:
    return GlanceImageSource(url=url, auth="trusted-headers", sleep=sleeps, **kw)  # type: ignore[arg-type]  # test passes through keyword options


def test_a_5xx_then_success_is_retried_with_growing_backoff(
        script: Script, url: str, sleeps: Sleeps) -> None:
    script.plan["meta"] = ["503", "502"]

    image = _source(url, sleeps).get_image(ALICE, IMAGE)

    assert image.id == IMAGE and image.size == len(script.data)
    assert len(script.of(IMAGE)) == 3
    assert sleeps.calls == [0.25, 0.5]


def test_5xx_beyond_the_retries_is_image_unavailable_naming_the_url(
        script: Script, url: str, sleeps: Sleeps) -> None:
    script.plan["meta"] = ["500"] * 10

    with pytest.raises(ImageUnavailable, match=rf"glance at {url} .*HTTP 500.*3 attempts"):
        _source(url, sleeps, retries=2).get_image(ALICE, IMAGE)

    assert len(script.of(IMAGE)) == 3


@pytest.mark.parametrize("code", ["403", "404"])
def test_forbidden_and_missing_are_both_image_not_found(
        script: Script, url: str, sleeps: Sleeps, code: str) -> None:
    script.plan["meta"] = [code]

    with pytest.raises(ImageNotFound):
        _source(url, sleeps).get_image(ALICE, IMAGE)
    assert sleeps.calls == []


def test_an_id_that_could_escape_the_url_path_is_image_not_found(
        script: Script, url: str, sleeps: Sleeps) -> None:
    with pytest.raises(ImageNotFound):
        _source(url, sleeps).get_image(ALICE, "../versions")
    assert script.seen == []


def test_the_fields_map_onto_the_image(script: Script, url: str, sleeps: Sleeps) -> None:
    image = _source(url, sleeps).get_image(ALICE, IMAGE)

    assert image.os_hash_algo == "sha512"
    assert image.os_hash_value == hashlib.sha512(script.data).hexdigest()
    assert image.checksum == hashlib.md5(script.data).hexdigest()
    assert image.updated_at is not None and image.updated_at.utcoffset() is not None
    assert image.updated_at.isoformat() == "2026-11-26T12:07:08+00:00"
    assert (image.owner, image.visibility, image.status) == ("alice", "private", "active")
    assert image.virtual_size is None and image.min_size_gb == 1


def test_data_is_retried_before_the_first_byte(script: Script, url: str,
                                               sleeps: Sleeps) -> None:
    script.plan["file"] = ["503"]

    got = b"".join(_source(url, sleeps).open_data(ALICE, IMAGE))

    assert got == script.data
    assert len(script.of("/file")) == 2


def test_data_comes_in_chunks_of_at_most_the_chunk_size(script: Script, url: str,
                                                        sleeps: Sleeps) -> None:
    sizes = [len(c) for c in _source(url, sleeps).open_data(ALICE, IMAGE)]

    assert sum(sizes) == len(script.data)
    assert max(sizes) <= MIB and len(sizes) >= 4


def test_a_connection_cut_mid_stream_is_resumed_with_a_range_request(
        script: Script, url: str, sleeps: Sleeps) -> None:
    script.plan["file"] = ["short", "short"]

    got = b"".join(_source(url, sleeps).open_data(ALICE, IMAGE))

    assert got == script.data
    ranges = [s.headers.get("Range") for s in script.of("/file")]
    assert ranges[0] is None and len(ranges) == 3
    # Resumed where the bytes handed on stopped (a chunk cut short is asked for again).
    offsets = [int(str(r).removeprefix("bytes=").rstrip("-")) for r in ranges[1:]]
    assert 0 < offsets[0] <= offsets[1] < len(script.data)


def test_a_download_that_keeps_breaking_off_is_image_unavailable(
        script: Script, url: str, sleeps: Sleeps) -> None:
    script.plan["file"] = ["short"] * 10

    with pytest.raises(ImageUnavailable, match="broke off"):
        b"".join(_source(url, sleeps, retries=2).open_data(ALICE, IMAGE))
    assert len(script.of("/file")) == 3


def test_a_short_read_through_the_cache_leaves_no_entry_and_no_volume(
        script: Script, url: str, sleeps: Sleeps, tmp_path: Path) -> None:
    script.plan["file"] = ["short"]
    storage = FileStorage(tmp_path / "volumes")
    service = CacheService(host="h", storage=storage,
                           images=_source(url, sleeps, retries=0),
                           uow=InMemoryUnitOfWork(), notifier=RecordingNotifier())

    with pytest.raises(ImageUnavailable):
        service.create_volume(ALICE, IMAGE, 1)

    assert service.list_entries() == []
    assert storage.list_volumes() == []


def test_with_no_hash_known_a_changed_updated_at_makes_the_entry_stale(
        script: Script, url: str, sleeps: Sleeps, tmp_path: Path) -> None:
    script.hashes = False
    notifier = RecordingNotifier()
    service = CacheService(host="h", storage=FileStorage(tmp_path / "volumes"),
                           images=_source(url, sleeps), uow=InMemoryUnitOfWork(),
                           notifier=notifier)
    outcomes = [service.create_volume(ALICE, IMAGE, 1).outcome for _ in range(2)]
    script.updated_at = "2026-11-26T13:00:00Z"

    outcomes.append(service.create_volume(ALICE, IMAGE, 1).outcome)

    assert outcomes == [Outcome.MISS, Outcome.HIT, Outcome.MISS]
    assert [e.reason for e in notifier.of(CacheEvict) if isinstance(e, CacheEvict)] == [
        EvictReason.STALE]


def test_the_callers_identity_goes_out_as_trusted_headers(
        script: Script, url: str, sleeps: Sleeps) -> None:
    source = _source(url, sleeps)
    source.get_image(ALICE, IMAGE)
    source.get_image(ADMIN, IMAGE)

    alice, admin = (s.headers for s in script.of(IMAGE))
    assert alice["X-Identity-Status"] == "Confirmed"
    assert (alice["X-Project-Id"], alice["X-User-Id"]) == ("alice", "alice-user")
    assert alice["X-Roles"] == "member,reader"
    assert admin["X-Roles"] == "member,reader,admin"


def test_one_session_per_identity_discovers_the_endpoint_once(
        script: Script, url: str, sleeps: Sleeps) -> None:
    source = _source(url, sleeps)
    for _ in range(3):
        source.get_image(ALICE, IMAGE)
    source.get_image(BOB, IMAGE)

    discoveries = [s for s in script.seen if s.path in ("", "/")]
    assert [d.headers["X-Project-Id"] for d in discoveries] == ["alice", "bob"]


def test_an_unreachable_glance_is_one_clear_line_naming_the_url(sleeps: Sleeps) -> None:
    source = _source("http://127.0.0.1:9", sleeps, retries=1)

    with pytest.raises(ImageUnavailable) as caught:
        source.get_image(ALICE, IMAGE)

    assert str(caught.value) == ("glance at http://127.0.0.1:9 is unavailable: "
                                 "connection refused (2 attempts)")


@pytest.mark.parametrize(("options", "needs"), [
    ({"auth": "trusted-headers"}, "needs url"),
    ({"auth": "keystone"}, "needs os_cloud"),
    ({"auth": "basic", "url": "http://g"}, "not one of"),
    ({"auth": "trusted-headers", "url": "ftp://g"}, "not an http"),
])
def test_bad_glance_options_are_config_errors(options: dict[str, str], needs: str) -> None:
    with pytest.raises(ConfigError, match=needs):
        GlanceImageSource(**options)  # type: ignore[arg-type]  # keyword options


INTERNAL = InternalTenant("internal", "internal").context()


def _with_token(ctx: RequestContext, token: str) -> RequestContext:
    return attrs.evolve(ctx, auth_token=token)


@pytest.fixture
def keystone(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             sleeps: Sleeps) -> GlanceImageSource:
    # The internal tenant's cloud, without Keystone (auth_type none): it sends no token.
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(f"clouds:\n  fake:\n    auth_type: none\n"
                      f"    image_endpoint_override: {url}\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    return GlanceImageSource(url=url, os_cloud="fake", auth="keystone", internal=INTERNAL,
                             sleep=sleeps)


def test_with_keystone_auth_every_request_carries_the_callers_own_token(
        script: Script, keystone: GlanceImageSource) -> None:
    alice, bob = _with_token(ALICE, "token-of-alice"), _with_token(BOB, "token-of-bob")

    # Glance decides: what it answers to a token is what the caller gets, nothing is
    # filtered by rules of ivcache's own (the scripted Glance shows alice's image to bob).
    assert keystone.get_image(alice, IMAGE).owner == "alice"
    assert b"".join(keystone.open_data(alice, IMAGE)) == script.data
    assert keystone.get_image(bob, IMAGE).id == IMAGE
    assert [i.id for i in keystone.list_images(bob)] == [IMAGE, SHARED]

    # Version discovery (GET /) is anonymous, as keystoneauth does it.
    asked = [s for s in script.seen if s.path not in ("", "/")]
    tokens = [s.headers.get("X-Auth-Token") for s in asked]
    assert tokens[:2] == ["token-of-alice"] * 2  # metadata, data
    assert set(tokens[2:]) == {"token-of-bob"} and len(tokens) == 4
    assert not any("X-Project-Id" in s.headers for s in script.seen)


def test_with_keystone_auth_a_caller_without_a_token_is_refused_not_served_as_the_cache(
        script: Script, keystone: GlanceImageSource) -> None:
    with pytest.raises(AuthError, match="carries none"):
        keystone.get_image(ALICE, IMAGE)
    with pytest.raises(AuthError):
        b"".join(keystone.open_data(ADMIN, IMAGE))
    assert script.seen == []

    # The cache's own question is asked with the internal tenant's cloud (auth_type none:
    # keystoneauth's placeholder token).
    assert keystone.get_image(INTERNAL, IMAGE).id == IMAGE
    assert {s.headers.get("X-Auth-Token") for s in script.seen} <= {None, "notused"}


def test_with_keystone_auth_a_401_to_the_callers_token_is_token_refused(
        script: Script, keystone: GlanceImageSource) -> None:
    script.plan["meta"] = ["401"]

    with pytest.raises(TokenRefused, match=r"^the token was refused by Keystone: .*HTTP 401.*"
                                           r"get a new one$"):
        keystone.get_image(_with_token(ALICE, "expired"), IMAGE)

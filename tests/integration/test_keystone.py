"""The cache over a real Keystone and a Glance that checks its tokens: the caller's own
token decides what it may see, and the internal tenant's credentials answer only the
cache's own questions."""

from __future__ import annotations

import os
import time
from pathlib import Path

import attrs
import pytest

from ivcache.adapters.identity.keystone import KeystoneIdentity, token_for_cloud
from ivcache.adapters.images.glance import GlanceImageSource
from ivcache.adapters.memory import RecordingNotifier
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.adapters.storage.file import FileStorage
from ivcache.core.errors import AuthError, ImageNotFound, TokenRefused
from ivcache.core.events import CacheEvict, EvictReason
from ivcache.core.model import InternalTenant, Outcome, RequestContext
from ivcache.core.service import CacheService
from ivcache.entrypoints.library import ImageVolumeCache
from tests.support.keystone_server import OpenStack, User

pytestmark = pytest.mark.keystone

MIB = 1 << 20
HOST = "node-1"


@attrs.define
class World:
    cloud: OpenStack
    identity: KeystoneIdentity
    storage: FileStorage
    notifier: RecordingNotifier
    service: CacheService
    tenant: InternalTenant

    def caller(self, user: User) -> tuple[str, RequestContext]:
        """A fresh token of ``user`` and the context Keystone says it stands for."""
        token = self.cloud.token(user)
        return token, self.identity.context(token)

    def volume_bytes(self, volume_id: str, length: int) -> bytes:
        with open(self.storage.get_volume(volume_id).location, "rb") as fh:
            return fh.read(length)

    def entry(self, image_id: str) -> object:
        return next((e for e in self.service.list_entries(HOST) if e.image_id == image_id),
                    None)

    def glance_saw(self, since: int) -> list[tuple[str, str, int, str]]:
        """Glance's requests after the first ``since``, each with the name of the user whose
        token it carried (anonymous version discoveries left out)."""
        seen = self._settled()[since:]
        return [(method, path, status, self.cloud.keystone.whose(token))
                for method, path, status, token in seen if token != "-"]

    def mark(self) -> int:
        return len(self._settled())

    def _settled(self) -> list[tuple[str, str, int, str]]:
        """Glance's access log once it has stopped growing: gunicorn writes a request's
        line after the response is sent, so a client can be done before its line is."""
        seen = self.cloud.glance.requests()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.3)
            again = self.cloud.glance.requests()
            if len(again) == len(seen):
                return again
            seen = again
        return seen


@pytest.fixture
def clouds(keystone: OpenStack, monkeypatch: pytest.MonkeyPatch) -> OpenStack:
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(keystone.clouds_yaml))
    return keystone


@pytest.fixture
def world(clouds: OpenStack, tmp_path: Path) -> World:
    tenant = InternalTenant(clouds.internal.project_id, clouds.internal.user_id)
    # No url: Glance's endpoint comes from the catalog, as in a real cloud.
    source = GlanceImageSource(os_cloud="ivcache-internal", auth="keystone",
                               internal=tenant.context(), backoff=0.01)
    engine = make_engine(f"sqlite:///{tmp_path / 'ivcache.db'}")
    upgrade(engine)
    storage = FileStorage(tmp_path / "volumes", host=HOST)
    notifier = RecordingNotifier()
    service = CacheService(host=HOST, storage=storage, images=source,
                           uow=SqlUnitOfWork(engine), notifier=notifier, tenant=tenant)
    identity = KeystoneIdentity(os_cloud="ivcache-service")
    return World(clouds, identity, storage, notifier, service, tenant)


@pytest.fixture
def p1(clouds: OpenStack) -> User:
    return clouds.new_user("p1")


@pytest.fixture
def p2(clouds: OpenStack) -> User:
    return clouds.new_user("p2")


def test_keystone_says_who_the_token_belongs_to(world: World, p1: User) -> None:
    token, ctx = world.caller(p1)

    assert (ctx.project_id, ctx.user_id) == (p1.project_id, p1.user_id)
    assert set(ctx.roles) >= {"member", "reader"} and not ctx.is_admin
    assert ctx.auth_token == token
    assert token not in repr(ctx)


def test_the_admin_role_in_the_token_makes_the_caller_an_admin(
        world: World, clouds: OpenStack) -> None:
    operator = clouds.new_user("ops", roles=("admin",))

    assert world.caller(operator)[1].is_admin


def test_a_private_image_of_p1_is_invisible_to_p2_before_and_after_p1_caches_it(
        world: World, p1: User, p2: User) -> None:
    p1_token, p1_ctx = world.caller(p1)
    _, p2_ctx = world.caller(p2)
    data = os.urandom(2 * MIB)
    image_id = world.cloud.glance.create_image(p1_token, data)

    with pytest.raises(ImageNotFound):
        world.service.create_volume(p2_ctx, image_id, 1)
    miss = world.service.create_volume(p1_ctx, image_id, 1)
    with pytest.raises(ImageNotFound):
        world.service.create_volume(p2_ctx, image_id, 1)

    assert miss.outcome is Outcome.MISS
    assert world.volume_bytes(miss.volume.id, len(data)) == data
    assert world.storage.list_volumes(owner=p2.project_id) == []
    assert image_id not in {i.id for i in world.service.images.list_images(p2_ctx)}
    # p2 not seeing the image is no reason to evict p1's entry: the internal tenant sees it.
    assert world.entry(image_id) is not None
    assert world.notifier.of(CacheEvict) == []
    assert world.service.create_volume(p1_ctx, image_id, 1).outcome is Outcome.HIT


def test_p2s_token_acting_for_p1_changes_nothing(world: World, p1: User, p2: User) -> None:
    p1_token, p1_ctx = world.caller(p1)
    p2_token, _ = world.caller(p2)
    image_id = world.cloud.glance.create_image(p1_token, os.urandom(MIB))
    world.service.create_volume(p1_ctx, image_id, 1)

    # A context that claims p1's project but carries p2's token: Glance sees p2.
    forged = RequestContext.for_project(p1.project_id, user_id=p1.user_id)
    with pytest.raises(ImageNotFound):
        world.service.create_volume(attrs.evolve(forged, auth_token=p2_token), image_id, 1)

    assert len(world.storage.list_volumes(owner=p1.project_id)) == 1
    assert world.entry(image_id) is not None


def test_an_image_shared_with_p2_and_accepted_becomes_visible_and_a_hit_serves_it(
        world: World, p1: User, p2: User) -> None:
    p1_token, p1_ctx = world.caller(p1)
    p2_token, p2_ctx = world.caller(p2)
    data = os.urandom(2 * MIB)
    image_id = world.cloud.glance.create_image(p1_token, data)
    world.service.create_volume(p1_ctx, image_id, 1)
    with pytest.raises(ImageNotFound):
        world.service.create_volume(p2_ctx, image_id, 1)

    world.cloud.glance.share(p1_token, image_id, p2_token, member_project=p2.project_id)
    hit = world.service.create_volume(p2_ctx, image_id, 2)

    assert hit.outcome is Outcome.HIT and hit.volume.owner == p2.project_id
    assert world.volume_bytes(hit.volume.id, len(data)) == data
    assert image_id in {i.id for i in world.service.images.list_images(p2_ctx)}


def test_the_internal_tenants_credentials_never_answer_a_users_request(
        world: World, p1: User, p2: User) -> None:
    p1_token, p1_ctx = world.caller(p1)
    p2_token, p2_ctx = world.caller(p2)
    image_id = world.cloud.glance.create_image(p1_token, os.urandom(MIB))
    world.cloud.glance.share(p1_token, image_id, p2_token, member_project=p2.project_id)

    before = world.mark()
    world.service.create_volume(p1_ctx, image_id, 1)  # a miss: metadata and data
    world.service.create_volume(p1_ctx, image_id, 1)  # a hit
    world.service.create_volume(p2_ctx, image_id, 1)  # a hit for the member
    users = world.glance_saw(before)

    assert {path for _, path, _, _ in users} == {f"/v2/images/{image_id}",
                                               f"/v2/images/{image_id}/file"}
    assert {who for _, _, _, who in users} == {p1.name, p2.name}
    assert [who for _, path, _, who in users if path.endswith("/file")] == [p1.name]

    # Only a user's "not found" makes the cache ask, as itself, whether the image is gone
    # for everyone; it asks for the metadata and nothing else, and the user gets no data.
    other = world.cloud.new_user("p3")
    _, p3_ctx = world.caller(other)
    before = world.mark()
    with pytest.raises(ImageNotFound):
        world.service.create_volume(p3_ctx, image_id, 1)
    asked = world.glance_saw(before)
    assert asked == [("GET", f"/v2/images/{image_id}", 404, other.name),
                     ("GET", f"/v2/images/{image_id}", 200, world.cloud.internal.name)]


def test_an_image_deleted_in_glance_is_evicted_by_the_caches_own_question(
        world: World, p1: User) -> None:
    p1_token, p1_ctx = world.caller(p1)
    image_id = world.cloud.glance.create_image(p1_token, os.urandom(MIB))
    first = world.service.create_volume(p1_ctx, image_id, 1)
    world.cloud.glance.delete(p1_token, image_id)

    with pytest.raises(ImageNotFound):
        world.service.create_volume(p1_ctx, image_id, 1)

    assert world.entry(image_id) is None
    assert [e.reason for e in world.notifier.of(CacheEvict)
            if isinstance(e, CacheEvict)] == [EvictReason.IMAGE_DELETED]
    assert [v.id for v in world.storage.list_volumes()] == [first.volume.id]


def test_cache_warm_reads_with_the_internal_tenants_credentials(world: World,
                                                                 p1: User) -> None:
    p1_token, p1_ctx = world.caller(p1)
    image_id = world.cloud.glance.create_image(p1_token, os.urandom(MIB))
    before = world.mark()

    world.service.warm(image_id)

    assert {who for _, _, _, who in world.glance_saw(before)} == {world.cloud.internal.name}
    assert world.service.create_volume(p1_ctx, image_id, 1).outcome is Outcome.HIT


def test_a_revoked_or_malformed_token_is_refused(world: World, p1: User) -> None:
    token = world.cloud.token(p1)
    world.cloud.keystone.revoke(token)

    with pytest.raises(TokenRefused, match=r"get a new one$"):
        world.identity.context(token)
    with pytest.raises(TokenRefused, match=r"^the token was refused by Keystone: "):
        world.identity.context("gAAAA-not-a-token")


def test_a_cached_validation_honours_a_revoked_token_until_the_cache_runs_out(
        world: World, p1: User) -> None:
    token = world.cloud.token(p1)
    cached = KeystoneIdentity(os_cloud="ivcache-service", cache_seconds=300)
    uncached = KeystoneIdentity(os_cloud="ivcache-service", cache_seconds=0)
    ctx = cached.context(token)
    uncached.context(token)

    world.cloud.keystone.revoke(token)

    # As documented (and as keystonemiddleware's cache does): believed until it runs out.
    assert cached.context(token) == ctx
    with pytest.raises(TokenRefused):
        uncached.context(token)


def test_a_caller_context_without_a_token_is_refused_and_nothing_is_created(
        world: World, p1: User) -> None:
    p1_token, _ = world.caller(p1)
    image_id = world.cloud.glance.create_image(p1_token, os.urandom(MIB))

    with pytest.raises(AuthError, match="carries none"):
        world.service.create_volume(RequestContext.for_project(p1.project_id), image_id, 1)

    assert world.storage.list_volumes() == []
    assert world.service.list_entries() == []


def test_a_token_from_a_clouds_yaml_entry(clouds: OpenStack, world: World) -> None:
    alice = clouds.new_user("alice", cloud=True)

    ctx = world.identity.context(token_for_cloud(alice.project))

    assert ctx.project_id == alice.project_id


def test_the_library_takes_the_callers_token_or_a_context_carrying_it(
        clouds: OpenStack, tmp_path: Path, p1: User) -> None:
    ini = tmp_path / "ivcache.ini"
    ini.write_text(f"""\
[DEFAULT]
cinder_internal_tenant_project_id = {clouds.internal.project_id}
cinder_internal_tenant_user_id = {clouds.internal.user_id}
[ivcache]
image_source = glance
keystone_cloud = ivcache-service
[glance]
auth = keystone
os_cloud = ivcache-internal
""")
    cache = ImageVolumeCache.from_config(ini)
    token = clouds.token(p1)
    image_id = clouds.glance.create_image(token, os.urandom(MIB))

    miss = cache.create_volume(image_id, 1, token=token)
    # A storage driver hands over its own request's context, token included.
    ctx = RequestContext(p1.project_id, p1.user_id, ("member", "reader"), auth_token=token)
    hit = cache.create_volume(image_id, 1, context=ctx)

    assert (miss.outcome, hit.outcome) == (Outcome.MISS, Outcome.HIT)
    assert miss.volume.owner == hit.volume.owner == p1.project_id
    assert {v.id for v in cache.list_volumes(token=token)} == {miss.volume.id, hit.volume.id}
    with pytest.raises(TypeError, match="one way"):
        cache.create_volume(image_id, 1, project="p1", token=token)
    with pytest.raises(AuthError, match="carries none"):
        cache.create_volume(image_id, 1, project=p1.project_id)

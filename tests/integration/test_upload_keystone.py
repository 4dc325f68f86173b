"""``volume upload`` to a Glance that checks Keystone tokens: the image is created and its
bytes stored with the caller's own token (or, as Cinder's image_upload_use_internal_tenant
does, with the internal tenant's credentials), and the next create from it is a hit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ivcache.adapters.convert import ImagePipeline
from ivcache.adapters.identity.keystone import KeystoneIdentity
from ivcache.adapters.images.glance import GlanceImageSource
from ivcache.adapters.memory import RecordingNotifier
from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.adapters.storage.file import FileStorage
from ivcache.core.errors import VolumeNotFound
from ivcache.core.model import GIB, InternalTenant, Outcome, RequestContext
from ivcache.core.service import CacheService
from tests.support.keystone_server import OpenStack, User

pytestmark = pytest.mark.keystone

HOST = "node-1"
CHANGE = b"keystone golden " * 50_000


@pytest.fixture
def clouds(keystone: OpenStack, monkeypatch: pytest.MonkeyPatch) -> OpenStack:
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(keystone.clouds_yaml))
    return keystone


@pytest.fixture
def service(clouds: OpenStack, tmp_path: Path) -> CacheService:
    tenant = InternalTenant(clouds.internal.project_id, clouds.internal.user_id)
    source = GlanceImageSource(os_cloud="ivcache-internal", auth="keystone",
                               internal=tenant.context(), backoff=0.01)
    engine = make_engine(f"sqlite:///{tmp_path / 'ivcache.db'}")
    upgrade(engine)
    return CacheService(host=HOST, storage=FileStorage(tmp_path / "volumes", host=HOST),
                        images=source, uow=SqlUnitOfWork(engine), notifier=RecordingNotifier(),
                        tenant=tenant, converter=ImagePipeline(tmp_path / "conversion"))


def _caller(clouds: OpenStack, user: User) -> tuple[str, RequestContext]:
    token = clouds.token(user)
    return token, KeystoneIdentity(os_cloud="ivcache-service").context(token)


def _customised(service: CacheService, clouds: OpenStack, token: str,
                ctx: RequestContext) -> str:
    image_id = clouds.glance.create_image(token, b"base" * (1 << 18))
    volume = service.create_volume(ctx, image_id, 1).volume
    service.storage.write_image(volume.id, [CHANGE])
    return volume.id


def _sha512(path: str) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        while chunk := fh.read(64 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_an_upload_with_the_callers_token_is_cached_and_others_may_not_upload(
        service: CacheService, clouds: OpenStack) -> None:
    p1, p2 = clouds.new_user("up1"), clouds.new_user("up2")
    token, ctx = _caller(clouds, p1)
    _, other = _caller(clouds, p2)
    volume_id = _customised(service, clouds, token, ctx)

    with pytest.raises(VolumeNotFound):
        service.upload_volume(other, volume_id, name="stolen")
    result = service.upload_volume(ctx, volume_id, name="golden", private=True)

    assert result.cached and result.image.owner == p1.project_id
    assert result.image.size == GIB
    assert result.image.os_hash_value == _sha512(service.storage.get_volume(volume_id).location)
    hit = service.create_volume(ctx, result.image.id, 1)
    assert hit.outcome is Outcome.HIT
    with open(hit.volume.location, "rb") as fh:
        assert fh.read(len(CHANGE)) == CHANGE
    assert service.stats().downloads == 1


def test_with_the_internal_tenant_the_image_is_the_internal_tenants(
        service: CacheService, clouds: OpenStack) -> None:
    p1 = clouds.new_user("up3")
    token, ctx = _caller(clouds, p1)
    volume_id = _customised(service, clouds, token, ctx)

    result = service.upload_volume(ctx, volume_id, name="golden", as_internal_tenant=True)

    assert result.cached and result.image.owner == clouds.internal.project_id

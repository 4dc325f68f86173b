"""The CLI with ``[glance] auth = keystone``, against a real Keystone and a Glance checking
its tokens: who is calling comes from ``--os-cloud`` / ``--os-token``, as with the
openstack CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.support.keystone_server import OpenStack, User

pytestmark = pytest.mark.keystone

MIB = 1 << 20


@pytest.fixture
def ks_cli(cli: Cli, keystone: OpenStack) -> Cli:
    """The CLI with a keystone-mode config (``IVCACHE_CONFIG``) and the test clouds.yaml."""
    path = cli.home / "ivcache.ini"
    path.write_text(f"""\
[DEFAULT]
host = node-1
cinder_internal_tenant_project_id = {keystone.internal.project_id}
cinder_internal_tenant_user_id = {keystone.internal.user_id}
[ivcache]
storage = file
image_source = glance
keystone_cloud = ivcache-service
[glance]
auth = keystone
os_cloud = ivcache-internal
connect_timeout = 5
""")
    cli.env.update(IVCACHE_CONFIG=str(path), OS_CLIENT_CONFIG_FILE=str(keystone.clouds_yaml))
    for name in ("OS_CLOUD", "OS_TOKEN"):
        cli.env.pop(name, None)
    return cli


def _image(keystone: OpenStack, owner: User, data: bytes) -> str:
    return keystone.glance.create_image(keystone.token(owner), data)


def _create(image_id: str, *args: str) -> tuple[str, ...]:
    return ("volume", "create", "--image", image_id, "--size", "1", "--json", *args)


def test_a_new_user_with_a_clouds_yaml_entry_then_with_a_token(
        ks_cli: Cli, keystone: OpenStack) -> None:
    alice = keystone.new_user("alice", cloud=True)
    data = os.urandom(2 * MIB)
    image_id = _image(keystone, alice, data)

    miss = ks_cli.ok(*_create(image_id, "--os-cloud", alice.project)).json()
    hit = ks_cli.ok(*_create(image_id), env={"OS_TOKEN": keystone.token(alice)}).json()
    from_env_cloud = ks_cli.ok(*_create(image_id), env={"OS_CLOUD": alice.project}).json()

    assert (miss["outcome"], hit["outcome"], from_env_cloud["outcome"]) == ("miss", "hit",
                                                                            "hit")
    assert {miss["project"], hit["project"]} == {alice.project_id}
    with open(hit["path"], "rb") as fh:
        assert fh.read(len(data)) == data
    listed = ks_cli.ok("volume", "list", "--json", "--os-cloud", alice.project).json()
    assert {v["id"] for v in listed} == {miss["id"], hit["id"], from_env_cloud["id"]}


def test_another_projects_token_sees_nothing_and_project_flags_are_refused(
        ks_cli: Cli, keystone: OpenStack) -> None:
    p1, p2 = keystone.new_user("p1"), keystone.new_user("p2")
    image_id = _image(keystone, p1, os.urandom(MIB))
    ks_cli.ok(*_create(image_id, "--os-token", keystone.token(p1)))
    p2_token = keystone.token(p2)

    not_found = ks_cli.fails(*_create(image_id, "--os-token", p2_token))
    as_p1 = ks_cli.fails(*_create(image_id, "--os-token", p2_token, "--project",
                                  p1.project_id), code=2)
    admin = ks_cli.fails(*_create(image_id, "--os-token", p2_token, "--admin"), code=2)

    assert "not found" in not_found.err
    assert "--project is not taken with [glance] auth = keystone" in as_p1.err
    assert "--admin is not taken" in admin.err
    assert ks_cli.ok("volume", "list", "--json", "--os-token", p2_token).json() == []
    listed = ks_cli.ok("image", "list", "--json", "--os-token", p2_token).json()
    assert image_id not in {i["id"] for i in listed}


def test_without_a_token_keystone_mode_asks_who_is_calling(ks_cli: Cli) -> None:
    run = ks_cli.fails("volume", "list", code=2)

    assert "--os-cloud NAME or --os-token TOKEN" in run.err


def test_a_revoked_or_malformed_token_is_one_line_and_creates_nothing(
        ks_cli: Cli, keystone: OpenStack) -> None:
    p1 = keystone.new_user("p1")
    image_id = _image(keystone, p1, os.urandom(MIB))
    revoked = keystone.token(p1)
    keystone.keystone.revoke(revoked)

    for token in (revoked, "gAAAAA-malformed"):
        run = ks_cli.fails(*_create(image_id, "--os-token", token))
        assert run.err.startswith("ivcache: error: the token was refused by Keystone: ")
        assert run.err.strip().endswith("; get a new one")
    admin = keystone.new_user("ops", roles=("admin",))
    assert ks_cli.ok("cache", "list", "--json", "--os-token",
                     keystone.token(admin)).json() == []
    assert ks_cli.ok("volume", "list", "--all", "--json", "--os-token",
                     keystone.token(admin)).json() == []


def test_an_unreachable_keystone_is_one_line_naming_its_url(
        ks_cli: Cli, keystone: OpenStack, tmp_path: Path) -> None:
    dead = tmp_path / "clouds.yaml"
    dead.write_text(keystone.clouds_yaml.read_text().replace(keystone.keystone.auth_url,
                                                             "http://127.0.0.1:9/v3"))

    run = ks_cli.fails("volume", "list", "--os-token", "gAAAAA-whatever",
                       env={"OS_CLIENT_CONFIG_FILE": str(dead)})

    assert run.err.strip() == ("ivcache: error: Keystone at http://127.0.0.1:9/v3 is "
                               "unreachable: connection refused")


def test_cache_commands_take_an_admin_token_and_refuse_a_members(
        ks_cli: Cli, keystone: OpenStack) -> None:
    member, admin = keystone.new_user("p1"), keystone.new_user("ops", roles=("admin",))
    image_id = _image(keystone, member, os.urandom(MIB))

    refused = ks_cli.fails("cache", "warm", image_id, "--os-token", keystone.token(member))
    warmed = ks_cli.ok("cache", "warm", image_id, "--json", "--os-token",
                       keystone.token(admin)).json()

    assert "cache commands are an operator's" in refused.err and "not admin" in refused.err
    assert warmed["image_id"] == image_id
    hit = ks_cli.ok(*_create(image_id, "--os-token", keystone.token(member))).json()
    assert hit["outcome"] == "hit"


def test_outside_keystone_mode_a_typed_token_is_refused_and_one_from_the_env_ignored(
        cli: Cli) -> None:
    typed = cli.fails("volume", "list", "--os-token", "t", code=2)
    from_env = cli.ok("volume", "list", "--json", env={"OS_TOKEN": "t", "OS_CLOUD": "c"})

    assert "--os-token is for image_source = glance with [glance] auth = keystone" in typed.err
    assert from_env.json() == []

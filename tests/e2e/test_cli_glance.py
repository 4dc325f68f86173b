"""The CLI with ``image_source = glance``, against a real glance-api."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.support.glance_server import GlanceServer

pytestmark = pytest.mark.glance

MIB = 1 << 20


def _config(cli: Cli, url: str, *, retries: int = 3) -> str:
    path = cli.home / "ivcache.ini"
    path.write_text(f"""\
[DEFAULT]
host = node-1
[ivcache]
storage = file
image_source = glance
[glance]
url = {url}
auth = trusted-headers
retries = {retries}
connect_timeout = 5
""")
    return str(path)


def _project(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_volume_from_a_glance_image_is_a_miss_then_a_hit_with_a_progress_bar(
        cli: Cli, glance: GlanceServer) -> None:
    project = _project("alice")
    data = os.urandom(4 * MIB)
    image_id = glance.create_image(glance.identity(project), data, name="cirros")
    config = _config(cli, glance.url)

    code, terminal = cli.on_a_terminal("--config", config, "volume", "create", "--image",
                                      image_id, "--size", "1", "--project", project)
    second = cli.ok("--config", config, "volume", "create", "--image", image_id, "--size",
                    "1", "--project", project, "--json").json()

    assert code == 0, terminal
    assert "downloading cirros" in terminal and "100%" in terminal
    assert second["outcome"] == "hit" and second["project"] == project
    with open(second["path"], "rb") as fh:
        assert fh.read(len(data)) == data


def test_another_project_gets_not_found_and_no_volume(cli: Cli, glance: GlanceServer) -> None:
    alice, bob = _project("alice"), _project("bob")
    image_id = glance.create_image(glance.identity(alice), os.urandom(MIB))
    config = _config(cli, glance.url)
    cli.ok("--config", config, "volume", "create", "--image", image_id, "--size", "1",
           "--project", alice)

    run = cli.fails("--config", config, "volume", "create", "--image", image_id, "--size",
                    "1", "--project", bob)

    assert "not found" in run.err
    assert cli.ok("--config", config, "volume", "list", "--project", bob,
                  "--json").json() == []


def test_image_list_lists_what_the_caller_sees_in_glance(cli: Cli,
                                                         glance: GlanceServer) -> None:
    alice, bob = _project("alice"), _project("bob")
    image_id = glance.create_image(glance.identity(alice), b"x" * 4096, name="mine")
    config = _config(cli, glance.url)

    listed = cli.ok("--config", config, "image", "list", "--project", alice, "--json").json()
    others = cli.ok("--config", config, "image", "list", "--project", bob, "--json").json()

    mine = [i for i in listed if i["id"] == image_id]
    assert len(mine) == 1 and mine[0]["name"] == "mine" and mine[0]["size"] == 4096
    assert mine[0]["owner"] == alice and mine[0]["visibility"] == "private"
    assert image_id not in {i["id"] for i in others}
    human = cli.ok("--config", config, "image", "list", "--project", alice).out
    assert image_id in human


def test_image_add_says_it_is_for_the_local_source_only(cli: Cli, glance: GlanceServer,
                                                        tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"x" * 4096)

    run = cli.fails("--config", _config(cli, glance.url), "image", "add", str(disk))

    assert "local image source only" in run.err


def test_an_unreachable_glance_is_one_clear_line_and_leaves_nothing(cli: Cli) -> None:
    config = _config(cli, "http://127.0.0.1:9", retries=1)

    run = cli.fails("--config", config, "volume", "create", "--image",
                    "0f6b3c2e-1111-4a4a-9b9b-000000000001", "--size", "1")

    assert "glance at http://127.0.0.1:9 is unavailable: connection refused" in run.err
    assert cli.ok("--config", config, "cache", "--admin", "list", "--json").json() == []
    assert cli.ok("--config", config, "volume", "list", "--all", "--admin",
                  "--json").json() == []

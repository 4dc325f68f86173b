"""A pasted multi-backend cinder.conf through the CLI: --backend, scopes in the JSON, usage
errors that list the backends, a neighbour fill, a host joining a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import Cli

PASTED = """[DEFAULT]
host = node-1
{cluster}
enabled_backends = fast, bulk
cinder_internal_tenant_project_id = internal
cinder_internal_tenant_user_id = internal
volume_driver = cinder.volume.drivers.lvm.LVMVolumeDriver

[ivcache]
database_url = sqlite:///{root}/ivcache.db
images_path = {root}/images
notifier = none

[fast]
volume_backend_name = fast
storage = file
storage_path = {root}/fast
image_volume_cache_enabled = true
image_volume_cache_max_count = 20

[bulk]
volume_backend_name = bulk
storage = fake-rbd
storage_path = {root}/bulk
image_volume_cache_max_size_gb = 500
"""


def write_config(tmp_path: Path, *, cluster: str = "") -> Path:
    config = tmp_path / "cinder-like.conf"
    config.write_text(PASTED.format(root=tmp_path, cluster=cluster), encoding="utf-8")
    return config


def test_a_pasted_multi_backend_config_serves_each_backend_and_fills_from_a_neighbour(
        cli: Cli, tmp_path: Path, image_file: Path) -> None:
    config = str(write_config(tmp_path))
    image = cli.ok("image", "add", str(image_file), "--config", config, "--json").json()

    on_fast = cli.ok("volume", "create", "--image", image["id"], "--size", "1",
                     "--backend", "fast", "--config", config, "--json").json()
    again = cli.ok("volume", "create", "--image", image["id"], "--size", "1",
                   "--backend", "fast", "--config", config, "--json").json()
    assert (on_fast["outcome"], on_fast["scope"], on_fast["filled_from"]) == (
        "miss", "node-1@fast#fast", "image-source")
    assert again["outcome"] == "hit"
    assert on_fast["path"].startswith(str(tmp_path / "fast"))
    with open(on_fast["path"], "rb") as fh:
        assert fh.read(4096) == b"boot" * 1024

    listed = cli.ok("cache", "--admin", "list", "--backend", "fast", "--config", config,
                    "--json").json()
    assert [(e["scope"], e["host"], e["cluster"], e["backend"], e["pool"]) for e in listed] == [
        ("node-1@fast#fast", "node-1", None, "fast", "fast")]
    assert cli.ok("cache", "--admin", "list", "--backend", "bulk", "--config", config,
                  "--json").json() == []
    shown = cli.ok("cache", "--admin", "show", listed[0]["id"], "--backend", "fast",
                   "--config", config,
                   "--json").json()
    assert shown["scope"] == "node-1@fast#fast"
    stats = cli.ok("cache", "--admin", "stats", "--backend", "fast", "--config", config,
                   "--json").json()
    assert (stats["scope"], stats["backend"], stats["pool"], stats["downloads"],
            stats["neighbour_fills"]) == ("node-1@fast#fast", "fast", "fast", 1, 0)


def test_without_backend_among_several_or_with_an_unknown_one_is_a_usage_error(
        cli: Cli, tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    for args in (("volume", "create", "--image", "x", "--size", "1"), ("volume", "list"),
                 ("cache", "--admin", "list"), ("cache", "--admin", "stats"), ("cache",
                 "--admin", "adopt"),
                 ("cache", "--admin", "evict", "--all")):
        run = cli.fails(*args, "--config", config, code=2)
        assert "several backends are enabled (fast, bulk)" in run.err, run.err
        assert "--backend" in run.err
    run = cli.fails("volume", "list", "--backend", "gold", "--config", config, code=2)
    assert "--backend 'gold' names no enabled backend; enabled: fast, bulk" in run.err
    assert not (tmp_path / "ivcache.db").exists() and not (tmp_path / "fast").exists()


@pytest.mark.parametrize(("text", "expected"), [
    ("[DEFAULT]\nenabled_backends = fast, bulk\n[fast]\n",
     "enabled_backends names [bulk], which is not a section of the file"),
    ("[DEFAULT]\nenabled_backends = a, b\n[a]\nstorage_path = {root}/x\n"
     "[b]\nstorage_path = {root}/x\n", "backends a and b both claim storage_path"),
    ("[DEFAULT]\ncluster = ceph#a\n", "cluster name 'ceph#a' cannot be part of a scope"),
])
def test_a_bad_backend_configuration_is_one_line_exit_1_and_nothing_made(
        cli: Cli, tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "bad.conf"
    config.write_text(text.format(root=tmp_path) + f"[ivcache]\ndatabase_url = "
                      f"sqlite:///{tmp_path}/db.sqlite\n", encoding="utf-8")
    run = cli.fails("volume", "list", "--config", str(config), code=1)
    assert expected in run.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.conf", "home"]


def test_a_host_that_joins_a_cluster_adopts_its_entries_on_its_next_run(
        cli: Cli, tmp_path: Path, image_file: Path) -> None:
    config = write_config(tmp_path)
    image = cli.ok("image", "add", str(image_file), "--config", str(config), "--json").json()
    cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--backend", "bulk",
           "--config", str(config))

    joined = str(write_config(tmp_path, cluster="cluster = ceph-a"))
    done = cli.ok("cache", "--admin", "adopt", "--backend", "bulk", "--config", joined,
                  "--json").json()
    assert done["scope"] == "ceph-a@bulk#bulk"
    assert [e["scope"] for e in done["adopted"]] == ["ceph-a@bulk#bulk"]
    assert done["merged"] == [] and done["left"] == []
    listed = cli.ok("cache", "--admin", "list", "--backend", "bulk", "--config", joined,
                    "--json").json()
    assert [(e["scope"], e["host"], e["cluster"]) for e in listed] == [
        ("ceph-a@bulk#bulk", "node-1", "ceph-a")]
    # Another host of the cluster is served from the adopted entry.
    hit = cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--backend",
                 "bulk", "--host", "node-2", "--config", joined, "--json").json()
    assert hit["outcome"] == "hit"

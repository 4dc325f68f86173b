"""The CLI as a user runs it: a subprocess, a temporary IVCACHE_HOME."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.e2e.conftest import IMAGE_BYTES, Cli


def test_demo_runs_a_miss_then_hits_and_evicts_and_exits_zero(cli: Cli) -> None:
    run = cli.ok("demo")
    assert "miss" in run.out and "hit" in run.out and "evicted" in run.out
    summary = cli.ok("demo", "--json").json()
    assert summary["outcomes"] == ["miss", "hit", "hit"]
    assert summary["evicted_first_image"] is True


def test_a_user_adds_an_image_and_gets_a_miss_then_hits(cli: Cli, image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--name", "cirros", "--json").json()
    assert image["name"] == "cirros" and image["owner"] == "demo"
    assert image["visibility"] == "public" and image["size"] == IMAGE_BYTES
    assert image["os_hash_algo"] == "sha512"
    assert image["os_hash_value"] == hashlib.sha512(image_file.read_bytes()).hexdigest()

    first = cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--json").json()
    second = cli.ok("volume", "create", "--image", image["id"], "--size", "2",
                    "--json").json()
    assert (first["outcome"], second["outcome"]) == ("miss", "hit")
    assert second["size_gb"] == 2 and second["project"] == "demo"
    assert Path(second["path"]).stat().st_size == 2 << 30
    with open(second["path"], "rb") as fh:
        assert fh.read(4096) == b"boot" * 1024

    entries = cli.ok("cache", "--admin", "list", "--json").json()
    assert len(entries) == 1
    assert set(entries[0]) >= {"id", "image_id", "host", "volume_id", "size_gb", "state",
                               "last_used", "hits", "pinned"}
    assert entries[0]["hits"] == 1 and entries[0]["state"] == "ready"
    stats = cli.ok("cache", "--admin", "stats", "--json").json()
    assert {k: stats[k] for k in ("hits", "misses", "entries", "downloads")} == {
        "hits": 1, "misses": 1, "entries": 1, "downloads": 1}
    assert stats["bytes_downloaded"] == IMAGE_BYTES and "evictions" in stats
    assert "size_gb" in stats


def test_json_goes_on_the_group_or_the_command(cli: Cli) -> None:
    assert cli.ok("--json", "cache", "--admin", "list").json() == []
    assert cli.ok("cache", "--admin", "list", "--json").json() == []


def test_volumes_belong_to_their_project_and_cache_volumes_to_nobody_but_admins(
        cli: Cli, image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--json").json()
    mine = cli.ok("volume", "create", "--image", image["id"], "--size", "1",
                  "--project", "alice", "--json").json()
    assert [v["id"] for v in cli.ok("volume", "list", "--project", "alice",
                                    "--json").json()] == [mine["id"]]
    assert cli.ok("volume", "list", "--project", "bob", "--json").json() == []
    cli.fails("volume", "delete", mine["id"], "--project", "bob")

    entry = cli.ok("cache", "--admin", "list", "--json").json()[0]
    cli.fails("volume", "delete", entry["volume_id"], "--project", "alice")
    everything = cli.ok("volume", "list", "--all", "--admin", "--json").json()
    assert entry["volume_id"] in {v["id"] for v in everything}
    cli.ok("volume", "delete", entry["volume_id"], "--admin")
    assert cli.ok("cache", "--admin", "list", "--json").json() == []
    assert cli.ok("cache", "--admin", "stats", "--json").json()["evictions"] == 1
    cli.ok("volume", "delete", mine["id"], "--project", "alice")


def test_a_private_image_is_refused_to_another_project_even_once_cached(
        cli: Cli, image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--private", "--project", "alice",
                   "--json").json()
    assert image["visibility"] == "private"
    run = cli.fails("volume", "create", "--image", image["id"], "--size", "1",
                    "--project", "bob")
    assert "not found" in run.err
    cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--project", "alice")
    cli.fails("volume", "create", "--image", image["id"], "--size", "1", "--project", "bob")
    assert cli.ok("volume", "list", "--project", "bob", "--json").json() == []
    assert image["id"] not in {i["id"] for i in cli.ok("image", "list", "--project", "bob",
                                                       "--json").json()}


def test_limits_from_the_config_evict_the_least_recently_used(cli: Cli, tmp_path: Path,
                                                               image_file: Path) -> None:
    config = tmp_path / "ivcache.ini"
    config.write_text("[DEFAULT]\nhost = node-7\nimage_volume_cache_max_size_count = 1\n"
                      "[ivcache]\nstorage = fake-lvm\nstorage_path = fake-vg\n")
    env = {"IVCACHE_CONFIG": str(config)}
    ids = [cli.ok("image", "add", str(image_file), "--json", env=env).json()["id"]
           for _ in range(2)]
    for image_id in ids:
        cli.ok("volume", "create", "--image", image_id, "--size", "1", env=env)
    [entry] = cli.ok("cache", "--admin", "list", "--json", env=env).json()
    assert entry["image_id"] == ids[1] and entry["host"] == "node-7"
    assert cli.ok("cache", "--admin", "stats", "--json", env=env).json()["evictions"] == 1
    assert (tmp_path / "fake-vg").is_dir()


def test_gdsf_from_the_config_keeps_the_popular_entry_lru_would_evict(
        cli: Cli, tmp_path: Path, image_file: Path) -> None:
    config = tmp_path / "ivcache.ini"
    config.write_text("[DEFAULT]\nhost = node-7\nimage_volume_cache_max_count = 2\n"
                      "image_volume_cache_eviction_policy = gdsf\n"
                      "[ivcache]\nstorage = fake-lvm\nstorage_path = fake-vg\n")
    env = {"IVCACHE_CONFIG": str(config)}
    popular, dead, new = (cli.ok("image", "add", str(image_file), "--json", env=env)
                          .json()["id"] for _ in range(3))
    # popular is filled, then used eight times more; dead once, after it: under lru popular,
    # used longest ago, would go. Their fill times are real (same bytes, same size), so
    # popular's nine uses outweigh any noise in them.
    for image_id in (popular, *[popular] * 8, dead, new):
        cli.ok("volume", "create", "--image", image_id, "--size", "1", env=env)
    listed = cli.ok("cache", "--admin", "list", "--json", env=env).json()
    assert sorted(e["image_id"] for e in listed) == sorted([popular, new])
    config.write_text(config.read_text().replace("= gdsf", "= most-recent"))
    run = cli.fails("cache", "--admin", "list", env=env)
    assert run.err.strip().endswith("option image_volume_cache_eviction_policy = "
                                    "'most-recent' is not one of lru, gdsf")


def test_cache_evict_by_image_entry_and_all(cli: Cli, image_file: Path) -> None:
    ids = [cli.ok("image", "add", str(image_file), "--json").json()["id"] for _ in range(3)]
    for image_id in ids:
        cli.ok("volume", "create", "--image", image_id, "--size", "1")
    cli.ok("cache", "--admin", "evict", "--image", ids[0])
    entry = cli.ok("cache", "--admin", "list", "--json").json()[0]
    assert cli.ok("cache", "--admin", "show", entry["id"], "--json").json()["id"] == entry["id"]
    gone = cli.ok("cache", "--admin", "evict", "--entry", entry["id"], "--json").json()
    assert [e["id"] for e in gone["evicted"]] == [entry["id"]]
    cli.ok("cache", "--admin", "evict", "--all")
    assert cli.ok("cache", "--admin", "list", "--json").json() == []
    cli.fails("cache", "--admin", "evict", "--image", ids[0], "--all", code=2)
    cli.fails("cache", "--admin", "show", entry["id"])


def test_cache_list_filters_by_host(cli: Cli, image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--json").json()
    for host in ("a", "b"):
        cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--host", host)
    listed = cli.ok("cache", "--admin", "list", "--host", "b", "--json").json()
    assert [e["host"] for e in listed] == ["b"]
    assert len(cli.ok("cache", "--admin", "list", "--json").json()) == 2


def test_db_upgrade_creates_the_schema(cli: Cli) -> None:
    doc = cli.ok("db", "upgrade", "--json").json()
    assert doc["revision"] and (cli.home / "ivcache.db").exists()
    assert cli.ok("db", "upgrade", "--json").json()["revision"] == doc["revision"]


# ---------------------------------------------------------------- bad input

def test_an_unknown_image_is_a_one_line_error(cli: Cli) -> None:
    run = cli.fails("volume", "create", "--image", "no-such-image", "--size", "1")
    assert "no-such-image" in run.err


def test_sizes_that_are_too_small_are_refused_and_nothing_is_created(
        cli: Cli, image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--json").json()
    for size in ("0", "-1"):
        cli.fails("volume", "create", "--image", image["id"], "--size", size)
    cli.fails("volume", "create", "--image", image["id"], "--size", "big", code=2)
    assert cli.ok("volume", "list", "--all", "--admin", "--json").json() == []
    assert cli.ok("cache", "--admin", "list", "--json").json() == []


def test_a_volume_id_that_could_escape_is_refused(cli: Cli) -> None:
    for bad in ("../etc", "a/b", ".."):
        run = cli.fails("volume", "delete", bad, "--admin")
        assert "invalid" in run.err


def test_an_image_whose_bytes_changed_leaves_no_entry_and_no_volume(
        cli: Cli, image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--json").json()
    stored = cli.home / "images" / "data" / image["id"]
    with open(stored, "r+b") as fh:
        fh.write(b"EVIL")
    run = cli.fails("volume", "create", "--image", image["id"], "--size", "1")
    assert "sha512" in run.err or "corrupt" in run.err
    assert cli.ok("cache", "--admin", "list", "--json").json() == []
    assert cli.ok("volume", "list", "--all", "--admin", "--json").json() == []


def test_a_full_backend_leaves_nothing_behind(cli: Cli, tmp_path: Path,
                                              image_file: Path) -> None:
    config = tmp_path / "small.ini"
    config.write_text("[ivcache]\nstorage = fake-lvm\nstorage_capacity_gb = 2\n")
    env = {"IVCACHE_CONFIG": str(config)}
    image = cli.ok("image", "add", str(image_file), "--json", env=env).json()
    cli.fails("volume", "create", "--image", image["id"], "--size", "5", env=env)
    volumes = cli.ok("volume", "list", "--all", "--admin", "--json", env=env).json()
    assert all(v["project"] == "internal" for v in volumes)
    entries = cli.ok("cache", "--admin", "list", "--json", env=env).json()
    assert [e["volume_id"] for e in entries] == [v["id"] for v in volumes]


def test_an_unreadable_config_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    run = cli.fails("cache", "--admin", "list", "--config", str(tmp_path / "missing.ini"))
    assert "missing.ini" in run.err


def test_a_bad_option_is_named(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "bad.ini"
    config.write_text("[DEFAULT]\nimage_volume_cache_max_count = lots\n")
    run = cli.fails("cache", "--admin", "list", "--config", str(config))
    assert "image_volume_cache_max_count" in run.err
    config.write_text("[ivcache]\nstorage = tape\n")
    assert "storage" in cli.fails("cache", "--admin", "list", "--config", str(config)).err
    config.write_text("[ivcache]\nstorgae = file\n")
    assert "storgae" in cli.fails("cache", "--admin", "list", "--config", str(config)).err


def test_a_database_path_that_cannot_be_written_is_a_clear_error(cli: Cli,
                                                                 tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = tmp_path / "db.ini"
    config.write_text(f"[ivcache]\ndatabase_url = sqlite:///{blocker}/sub/ivcache.db\n")
    run = cli.fails("cache", "--admin", "list", "--config", str(config))
    assert str(blocker) in run.err


def test_image_add_of_a_missing_file_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    run = cli.fails("image", "add", str(tmp_path / "nope.raw"))
    assert "nope.raw" in run.err


def test_usage_errors_exit_two(cli: Cli) -> None:
    cli.fails("volume", "create", "--size", "1", code=2)
    cli.fails("no-such-command", code=2)


def test_warm_pin_unpin_and_reconcile_from_the_command_line(cli: Cli,
                                                             image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--private", "--project", "alice",
                   "--json").json()
    entry = cli.ok("cache", "--admin", "warm", image["id"], "--json").json()
    assert entry["state"] == "ready" and entry["image_id"] == image["id"]
    created = cli.ok("volume", "create", "--image", image["id"], "--size", "1",
                     "--project", "alice", "--json").json()
    assert created["outcome"] == "hit"
    assert cli.ok("cache", "--admin", "pin", image["id"], "--json").json()["pinned"] is True
    assert cli.ok("cache", "--admin", "list", "--json").json()[0]["pinned"] is True
    assert cli.ok("cache", "--admin", "unpin", image["id"], "--json").json()["pinned"] is False
    cli.fails("cache", "--admin", "pin", "no-such-image")

    assert cli.ok("cache", "--admin", "reconcile", "--json").json() == []
    (cli.home / "volumes" / f"{entry['volume_id']}.json").unlink()
    found = cli.ok("cache", "--admin", "reconcile", "--json").json()
    assert [(f["kind"], f["fixed"]) for f in found] == [("missing-volume", False)]
    fixed = cli.ok("cache", "--admin", "reconcile", "--fix", "--json").json()
    assert [(f["kind"], f["fixed"]) for f in fixed] == [("missing-volume", True)]
    assert cli.ok("cache", "--admin", "list", "--json").json() == []

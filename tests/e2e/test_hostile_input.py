"""Hostile and careless input, as a user types it: one line naming what is wrong, exit 1,
no traceback, and nothing made."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli


def created(cli: Cli) -> list[str]:
    """Every volume and entry the CLI can see (as an operator)."""
    volumes = cli.ok("volume", "list", "--all", "--admin", "--json").json()
    entries = cli.ok("cache", "--admin", "list", "--json").json()
    return [v["id"] for v in volumes] + [e["id"] for e in entries]


@pytest.mark.parametrize("size", ["1000000000000", str(2**63), str(2**33)])
def test_a_size_no_volume_can_have_is_refused_in_one_line(cli: Cli, image_file: Path,
                                                          size: str) -> None:
    image = cli.ok("image", "add", str(image_file), "--json").json()
    run = cli.fails("volume", "create", "--image", image["id"], "--size", size)
    assert "larger than any volume can be" in run.err
    assert created(cli) == []


@pytest.mark.parametrize(("text", "expected"), [
    (b"[ivcache]\nstorage = file\n\xff\xfe = 1\n", "is not UTF-8 text"),
    (b"[ivcache]\ndatabase_url = mysql://u:secret@db/ivcache\n", "mysql is not supported"),
    (b"[ivcache]\ndatabase_url = ::garbage::\n", "option database_url is not a database URL"),
    (b"[ivcache]\nclaim_lease_seconds = inf\n", "claim_lease_seconds = inf is not a finite"),
    (b"[ivcache]\nclaim_lease_seconds = 1e300\n", "claim_lease_seconds = 1e300 must be at most"),
    (b"[ivcache]\nclaim_wait_seconds = nan\n", "claim_wait_seconds = nan is not a finite"),
    (b"[ivcache]\nstorage = fake-lvm\nstorage_capacity_gb = 0\n",
     "storage_capacity_gb = 0 must be at least 1"),
])
def test_a_bad_config_file_is_one_line_naming_what_is_wrong(cli: Cli, tmp_path: Path,
                                                            text: bytes, expected: str) -> None:
    config = tmp_path / "ivcache.ini"
    config.write_bytes(text)
    run = cli.fails("--config", str(config), "cache", "--admin", "stats")
    assert expected in run.err
    assert "secret" not in run.err


def test_a_config_that_is_not_a_regular_file_is_refused_at_once(cli: Cli) -> None:
    run = cli.fails("--config", "/dev/zero", "cache", "--admin", "stats", timeout=20)
    assert "not a regular file" in run.err


def test_a_huge_config_file_is_refused(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "huge.ini"
    config.write_bytes(b"[ivcache]\n" + b"; padding\n" * 200_000)
    run = cli.fails("--config", str(config), "cache", "--admin", "stats")
    assert "is larger than" in run.err


@pytest.mark.parametrize("content", [b"garbage, not SQLite " * 100, b""])
def test_a_database_file_that_is_not_sqlite_is_refused_and_left_as_it_was(
        cli: Cli, tmp_path: Path, content: bytes) -> None:
    db = tmp_path / "ivcache.db"
    db.write_bytes(content or b"SQLite format 3\x00" + b"\x00" * 100)  # a truncated header
    config = tmp_path / "ivcache.ini"
    config.write_text(f"[ivcache]\ndatabase_url = sqlite:///{db}\n")
    before = db.read_bytes()
    run = cli.fails("--config", str(config), "cache", "--admin", "stats")
    assert "damaged or not an ivcache database" in run.err
    assert db.read_bytes() == before


def test_adding_a_fifo_as_an_image_is_refused_instead_of_waiting(cli: Cli,
                                                                 tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    run = cli.fails("image", "add", str(fifo), timeout=20)
    assert "not a regular file" in run.err
    assert cli.ok("image", "list", "--json").json() == []


def test_image_data_is_readable_by_its_owner_only(cli: Cli, image_file: Path) -> None:
    cli.ok("image", "add", str(image_file), "--private")
    files = [p for p in (cli.home / "images").rglob("*") if p.is_file()
             and not p.name.startswith(".") and p.stat().st_size == image_file.stat().st_size]
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_user_commands_acting_as_the_internal_tenant_are_refused(cli: Cli,
                                                                 image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--json").json()
    for args in (("volume", "create", "--image", image["id"], "--size", "1"),
                 ("volume", "list"), ("image", "add", str(image_file))):
        run = cli.fails(*args, "--project", "internal")
        assert "internal tenant" in run.err
    # Even an operator may not create a volume the cache would take for its own.
    cli.fails("volume", "create", "--image", image["id"], "--size", "1", "--project",
              "internal", "--admin")
    assert created(cli) == []
    assert len(cli.ok("image", "list", "--json").json()) == 1


@pytest.mark.parametrize("command", [
    ["list"], ["show", "e-1"], ["evict", "--all"], ["prune"], ["stats"], ["warm", "img"],
    ["pin", "img"], ["unpin", "img"], ["reconcile", "--fix"]])
def test_commands_that_change_or_reveal_the_cache_need_an_operator(
        cli: Cli, image_file: Path, command: list[str]) -> None:
    image = cli.ok("image", "add", str(image_file), "--json").json()
    cli.ok("volume", "create", "--image", image["id"], "--size", "1")
    args = [image["id"] if a == "img" else a for a in command]
    run = cli.fails("cache", *args)
    assert "run them with --admin" in run.err
    assert len(cli.ok("cache", "--admin", "list", "--json").json()) == 1  # nothing changed
    assert cli.ok("cache", "stats", "--admin", "--json").json()["misses"] == 1

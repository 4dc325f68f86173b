"""The CLI on a shared PostgreSQL database, as workers on several hosts would use it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli

pytestmark = pytest.mark.postgres


def test_db_upgrade_on_postgresql_creates_the_schema_once(cli: Cli, tmp_path: Path,
                                                         postgres_url: str) -> None:
    config = tmp_path / "pg.ini"
    config.write_text(f"[ivcache]\ndatabase_url = {postgres_url}\n")
    env = {"IVCACHE_CONFIG": str(config)}
    doc = cli.ok("db", "upgrade", "--json", env=env).json()
    assert doc["revision"] == "0008"
    assert doc["database_url"].startswith("postgresql+psycopg://")
    assert cli.ok("db", "upgrade", "--json", env=env).json()["revision"] == "0008"


def test_concurrent_cli_workers_on_two_hosts_share_one_postgresql_and_count_exactly(
        cli: Cli, tmp_path: Path, image_file: Path, postgres_url: str) -> None:
    config = tmp_path / "pg.ini"
    config.write_text(f"[ivcache]\ndatabase_url = {postgres_url}\n")
    env = {"IVCACHE_CONFIG": str(config)}
    image = cli.ok("image", "add", str(image_file), "--json", env=env).json()["id"]
    hosts = ["a", "b", "a", "b"]

    def create(host: str) -> str:
        run = cli.ok("volume", "create", "--image", image, "--size", "1", "--host", host,
                     "--json", env=env)
        outcome: str = run.json()["outcome"]
        return outcome

    with ThreadPoolExecutor(len(hosts)) as pool:
        outcomes = list(pool.map(create, hosts))
    assert sorted(outcomes) == ["hit"] * 2 + ["miss"] * 2
    listed = cli.ok("cache", "--admin", "list", "--host", "b", "--json", env=env).json()
    assert [(e["host"], e["image_id"], e["state"]) for e in listed] == [("b", image, "ready")]
    assert len(cli.ok("cache", "--admin", "list", "--json", env=env).json()) == 2
    for host in ("a", "b"):
        stats = cli.ok("cache", "--admin", "stats", "--host", host, "--json", env=env).json()
        assert (stats["downloads"], stats["misses"], stats["hits"], stats["entries"]) == (
            1, 1, 1, 1)

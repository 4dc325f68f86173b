"""The savings ledger as an operator reads it: what the cache's hits saved, measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import IMAGE_BYTES, Cli


def test_three_hits_save_three_downloads_and_their_measured_seconds(
        cli: Cli, image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--json").json()
    created = [cli.ok("volume", "create", "--image", image["id"], "--size", "1",
                      "--json").json() for _ in range(4)]
    assert [c["outcome"] for c in created] == ["miss", "hit", "hit", "hit"]
    clones = [c["clone_seconds"] for c in created[1:]]
    assert all(isinstance(s, float) and s > 0 for s in clones)

    [entry] = cli.ok("cache", "--admin", "list", "--json").json()
    fill = entry["fill_seconds"]
    assert isinstance(fill, float) and fill > 0
    assert entry["hits"] == 3
    assert entry["bytes_saved"] == 3 * IMAGE_BYTES
    assert entry["seconds_saved"] == pytest.approx(sum(fill - c for c in clones), rel=1e-9)

    stats = cli.ok("cache", "--admin", "stats", "--json").json()
    assert (stats["hits"], stats["misses"]) == (3, 1)
    assert stats["hit_ratio"] == 0.75 and stats["events_pending"] == 0
    assert stats["bytes_saved"] == 3 * IMAGE_BYTES
    assert stats["seconds_saved"] > 0
    assert stats["seconds_saved"] == pytest.approx(sum(fill - c for c in clones), rel=1e-9)

    # The ledger outlives the entry: an operator sizing the cache still sees what it saved.
    cli.ok("cache", "--admin", "evict", "--all")
    after = cli.ok("cache", "--admin", "stats", "--json").json()
    assert (after["bytes_saved"], after["seconds_saved"]) == (
        stats["bytes_saved"], stats["seconds_saved"])

    text = cli.ok("cache", "--admin", "stats").out
    lines = dict(line.split(None, 1) for line in text.splitlines())
    assert lines["bytes_saved"].strip() == str(3 * IMAGE_BYTES)
    assert float(lines["seconds_saved"]) == pytest.approx(stats["seconds_saved"])
    assert lines["hit_ratio"].strip() == "0.75"


def test_stats_of_another_host_show_its_own_ledger(cli: Cli, image_file: Path) -> None:
    image = cli.ok("image", "add", str(image_file), "--json").json()
    for host in ("node-a", "node-a", "node-b"):
        cli.ok("volume", "create", "--image", image["id"], "--size", "1", "--host", host)
    a = cli.ok("cache", "--admin", "stats", "--host", "node-a", "--json").json()
    b = cli.ok("cache", "--admin", "stats", "--host", "node-b", "--json").json()
    assert (a["hits"], a["bytes_saved"]) == (1, IMAGE_BYTES) and a["seconds_saved"] != 0
    assert (b["hits"], b["bytes_saved"], b["seconds_saved"]) == (0, 0, 0.0)
    # A miss's entry has its fill measured before any hit.
    entries = {e["host"]: e for e in cli.ok("cache", "--admin", "list", "--json").json()}
    assert entries["node-b"]["fill_seconds"] > 0
    assert (entries["node-b"]["hits"], entries["node-b"]["bytes_saved"],
            entries["node-b"]["seconds_saved"]) == (0, 0, 0.0)

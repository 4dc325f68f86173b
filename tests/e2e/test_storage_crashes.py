"""A real ``ivcache volume create`` killed (SIGKILL) at each storage fault point: what it
leaves is reported by ``cache reconcile --json --admin`` with its bytes, removed by
``--fix`` (once: a second run finds nothing), and the next create is served as usual."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli

STORAGE_KINDS = ("partial-volume", "index-damage")


def config(tmp_path: Path, storage: str) -> dict[str, str]:
    path = tmp_path / f"{storage}.ini"
    path.write_text(f"[ivcache]\nstorage = {storage}\nstorage_path = {tmp_path / 'vols'}\n")
    return {"IVCACHE_CONFIG": str(path)}


def storage_findings(cli: Cli, env: dict[str, str], *fix: str) -> list[dict[str, object]]:
    found = cli.ok("cache", "reconcile", "--json", "--admin", *fix, env=env).json()
    return [f for f in found if f["kind"] in STORAGE_KINDS]


@pytest.mark.parametrize(("storage", "point", "left"), [
    ("file", "file-rename-sidecar", {"partial-volume"}),
    pytest.param("qcow2", "qcow2-index-save", {"index-damage"}, marks=pytest.mark.qcow2),
    ("fake-lvm", "fake-lvm-state-save", {"index-damage"}),
])
def test_a_hit_killed_at_a_storage_fault_point_leaves_what_reconcile_reports_and_fixes(
        cli: Cli, tmp_path: Path, image_file: Path, storage: str, point: str,
        left: set[str]) -> None:
    env = config(tmp_path, storage)
    image_id = cli.ok("image", "add", str(image_file), "--json", env=env).json()["id"]
    create = ("volume", "create", "--image", image_id, "--size", "1", "--json")
    assert cli.ok(*create, env=env).json()["outcome"] == "miss"

    killed = cli(*create, env={**env, "IVCACHE_FAULT": point})

    assert killed.code == -signal.SIGKILL, killed.err
    found = storage_findings(cli, env)
    assert {f["kind"] for f in found} == left
    assert all(isinstance(f["size"], int) and isinstance(f["path"], str) for f in found)
    assert all(f["fixed"] is False and Path(str(f["path"])).exists() for f in found)
    if storage == "file":  # the half-made clone holds the image's data
        assert max(int(str(f["size"])) for f in found) > 0
    fixed = storage_findings(cli, env, "--fix")
    assert [(f["kind"], f["path"], f["size"]) for f in fixed] == [
        (f["kind"], f["path"], f["size"]) for f in found]
    assert all(f["fixed"] is True and not Path(str(f["path"])).exists() for f in fixed)
    assert storage_findings(cli, env, "--fix") == []

    again = cli.ok(*create, env=env).json()
    assert again["outcome"] == "hit"
    if storage == "file":
        data = image_file.read_bytes()
        with open(again["path"], "rb") as volume:
            assert volume.read(len(data)) == data
    elif storage == "qcow2":
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", str(image_file),
                        again["path"]], check=True)


def test_the_file_fault_point_leaves_no_volume_listed(
        cli: Cli, tmp_path: Path, image_file: Path) -> None:
    env = config(tmp_path, "file")
    image_id = cli.ok("image", "add", str(image_file), "--json", env=env).json()["id"]
    create = ("volume", "create", "--image", image_id, "--size", "1", "--json")
    cli.ok(*create, env=env)
    before = cli.ok("volume", "list", "--all", "--admin", "--json", env=env).json()

    assert cli(*create, env={**env, "IVCACHE_FAULT": "file-rename-sidecar"}).code == \
        -signal.SIGKILL

    assert cli.ok("volume", "list", "--all", "--admin", "--json", env=env).json() == before

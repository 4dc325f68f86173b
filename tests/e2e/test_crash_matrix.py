"""The crash matrix: a real ``ivcache`` SIGKILLed at each fault point (``IVCACHE_FAULT``,
docs/development.md), on SQLite and PostgreSQL, file, qcow2 and fake-lvm storage (each with
its own storage point too), with a real qcow2 image. After each kill: ``cache reconcile
--fix`` repairs what was left, a second reconcile finds nothing, and then the invariants
hold: no claim or lease stuck, no stray file under ``storage_path`` or
``image_conversion_dir``, the next request served through the cache within seconds, with
the right bytes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from tests.e2e.conftest import IMAGE_BYTES, Cli
from tests.support.images import qemu_img

pytestmark = pytest.mark.qcow2

#: Points a miss (``volume create`` of a new image) reaches, in order.
MISS = ["after-claim", "mid-download", "after-ready", "mid-clone", "after-clone"]
#: Points with a scenario of their own (see ``_crash``).
OTHERS = ["after-victim-removed", "mid-write", "reconcile-fix"]
STORAGES = ["file", "qcow2", "fake-lvm"]
#: Each storage's own point, reached by a miss's first change of the storage.
STORAGE_POINTS = {"file": "file-rename-sidecar", "qcow2": "qcow2-index-save",
                  "fake-lvm": "fake-lvm-state-save"}
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
CASES = [(point, storage) for point in MISS + OTHERS for storage in STORAGES] + [
    (point, storage) for storage, point in STORAGE_POINTS.items()]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two real qcow2 images, and the raw disk the first one holds."""
    where = tmp_path_factory.mktemp("crash-images")
    raw = where / "disk.raw"
    with open(raw, "wb") as fh:
        fh.write(b"boot" * 1024)
        fh.seek(40 << 20)
        fh.write(b"tail" * 1024)
        fh.truncate(IMAGE_BYTES)
    first, second = where / "a.qcow2", where / "b.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(first))
    qemu_img("create", "-f", "qcow2", str(second), "8M")
    return first, second, raw


def _configure(cli: Cli, storage: str, database: str, request: pytest.FixtureRequest, *,
               enabled: bool = True) -> Path:
    vols = cli.home / "vols"
    lines = ["[DEFAULT]", "image_volume_cache_max_count = 1",
             f"image_volume_cache_enabled = {enabled}",
             "[ivcache]", f"storage = {storage}", f"storage_path = {vols}"]
    if database == "postgres":
        lines.append(f"database_url = {request.getfixturevalue('postgres_url')}")
    config = cli.home / "ivcache.ini"
    config.write_text("\n".join(lines) + "\n")
    cli.env["IVCACHE_CONFIG"] = str(config)
    return vols


def _killed_at(cli: Cli, point: str, *args: str) -> None:
    proc = subprocess.run([cli.exe, *args], env={**cli.env, "IVCACHE_FAULT": point},
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == -signal.SIGKILL, (
        f"ivcache {' '.join(args)} was not killed at {point}: {proc.returncode} {proc.stderr}")


def _create(cli: Cli, image_id: str, size: int = 1) -> dict[str, Any]:
    doc: dict[str, Any] = cli.ok("volume", "create", "--image", image_id, "--size",
                                 str(size), "--json").json()
    return doc


def _crash(cli: Cli, point: str, first: str, second: str) -> None:
    """Run what reaches ``point`` with the point armed: the process dies there."""
    if point in MISS or point == "mid-write" or point in STORAGE_POINTS.values():
        _killed_at(cli, point, "volume", "create", "--image", first, "--size", "1")
    elif point == "after-victim-removed":
        _create(cli, first)  # the cache's one entry, then a miss that evicts it
        _killed_at(cli, point, "volume", "create", "--image", second, "--size", "1")
    elif point == "reconcile-fix":
        _killed_at(cli, "mid-download", "volume", "create", "--image", first, "--size", "1")
        _killed_at(cli, point, "cache", "--admin", "reconcile", "--fix")
    else:
        raise AssertionError(point)


def _right_bytes(storage: str, vols: Path, volume: dict[str, Any], raw: Path) -> None:
    if storage == "fake-lvm":
        lvm = FakeLvmStorage(state_path=vols)
        assert lvm.read(volume["id"], 0, IMAGE_BYTES) == raw.read_bytes()
        assert lvm.read(volume["id"], IMAGE_BYTES, 1 << 20) == bytes(1 << 20)
    else:
        # The image's disk, then zeros to the volume's end (qemu-img compare checks both).
        # (qcow2 storage: a clone is an overlay, a volume made from the image source raw)
        fmt = "qcow2" if volume["path"].endswith(".qcow2") else "raw"
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, str(raw),
                        volume["path"]], check=True)


def _no_strays(cli: Cli, storage: str, vols: Path) -> None:
    """Nothing under storage_path that no listed volume accounts for."""
    listed = {v["id"] for v in cli.ok("volume", "list", "--all", "--admin", "--json").json()}
    files = [p for p in vols.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".tmp-")], files
    if storage == "file":
        # <id>.raw and its sidecar <id>.json; the backend's lock.
        stray = [p for p in files if p.name.split(".")[0] not in listed and p.name != ".lock"]
        assert stray == [], (stray, listed)
    elif storage == "qcow2":
        # Every data file is in the index (a hidden one still backs a listed volume's), and
        # so is the file every clone template overlays; then the lock, index and reserve.
        index = vols / "index.json"  # none until the first volume is made
        known = json.loads(index.read_text())["files"] if index.exists() else {}
        stray = [p for p in files
                 if not (p.parent == vols and p.name in (".lock", "index.json", ".reserve"))
                 and p.name not in known
                 and not (p.name.startswith(".tpl-")
                          and p.name[5:].rsplit("-", 1)[0] in known)]
        assert stray == [], (stray, known)
    scratch = cli.home / "conversion"
    assert not scratch.exists() or list(scratch.iterdir()) == []


@pytest.mark.parametrize("database", DATABASES)
@pytest.mark.parametrize(("point", "storage"), CASES)
def test_a_kill_at_any_point_leaves_nothing_that_reconcile_cannot_repair(
        cli: Cli, images: tuple[Path, Path, Path], request: pytest.FixtureRequest,
        point: str, storage: str, database: str) -> None:
    qcow2_a, qcow2_b, raw = images
    vols = _configure(cli, storage, database, request, enabled=point != "mid-write")
    first = cli.ok("image", "add", str(qcow2_a), "--json").json()["id"]
    second = (cli.ok("image", "add", str(qcow2_b), "--json").json()["id"]
              if point == "after-victim-removed" else "")

    _crash(cli, point, first, second)

    fixed = cli.ok("cache", "--admin", "reconcile", "--fix", "--json").json()
    assert all(f["fixed"] for f in fixed), fixed
    assert cli.ok("cache", "--admin", "reconcile", "--json").json() == []
    assert all(e["state"] == "ready"
               for e in cli.ok("cache", "--admin", "list", "--json").json())

    started = time.monotonic()
    volume = _create(cli, first, size=2)
    assert time.monotonic() - started < 15, "the next request waited for the dead"
    expected = {"miss", "hit"} if point != "mid-write" else {"disabled"}
    assert volume["outcome"] in expected
    _right_bytes(storage, vols, volume, raw)
    if point != "mid-write":
        assert _create(cli, first, size=1)["outcome"] == "hit"
    # What the crash left is gone, and the requests since left nothing either.
    _no_strays(cli, storage, vols)

"""What a process killed inside a storage backend leaves, and how ``leftovers`` (reconcile)
reports and repairs it: real SIGKILLs at the storage fault points, and damage made by hand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ivcache.adapters.memory import InMemoryImageSource, InMemoryUnitOfWork, RecordingNotifier
from ivcache.adapters.storage import FakeLvmStorage, FakeRbdStorage, FileStorage, Qcow2Storage
from ivcache.adapters.storage._common import UNKNOWN_OWNER
from ivcache.core.errors import StorageError
from ivcache.core.service import CacheService

MIB = 1024**2
PATTERN = bytes(range(256)) * 4096  # 1 MiB, no zero run long enough to be a hole


def on_disk(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def service_on(storage: FileStorage | Qcow2Storage | FakeLvmStorage) -> CacheService:
    return CacheService(host="node-1", storage=storage, images=InMemoryImageSource(),
                        uow=InMemoryUnitOfWork(), notifier=RecordingNotifier())


def reconciled(service: CacheService, *, fix: bool = False) -> list[tuple[str, str, int]]:
    return [(f.kind, f.path or "", f.size or 0) for f in service.reconcile(fix=fix)
            if f.kind in ("partial-volume", "index-damage")]


# -- file ----------------------------------------------------------------------------------

FILE_SETUP = """
    import sys
    from ivcache.adapters.storage import FileStorage
    storage = FileStorage(sys.argv[1])
"""


def test_a_kill_between_the_data_rename_and_the_sidecar_leaves_a_partial_volume_that_reconcile_removes(  # noqa: E501
        tmp_path: Path) -> None:
    root = tmp_path / "vols"
    storage = FileStorage(root)
    storage.create_volume("src", 1, "alice")
    storage.write_image("src", [PATTERN] * 4)
    script = textwrap.dedent(FILE_SETUP) + \
        "os.environ['IVCACHE_FAULT'] = 'file-rename-sidecar'\n" \
        "storage.clone_volume('src', 'half', 1, 'alice')\n"
    proc = subprocess.run([sys.executable, "-c", "import os\n" + script, str(root)],
                          check=False, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    half = root / "half.raw"
    [sidecar] = [p for p in root.iterdir() if p.name.endswith("-half.json")]
    assert half.exists() and on_disk(half) >= 4 * MIB
    service = service_on(storage)

    assert [v.id for v in storage.list_volumes()] == ["src"]  # never listed
    expected = sorted([("partial-volume", str(half), on_disk(half)),
                       ("partial-volume", str(sidecar), on_disk(sidecar))], key=lambda f: f[1])
    assert sorted(reconciled(service), key=lambda f: f[1]) == expected
    assert half.exists()  # a report changes nothing
    assert sorted(reconciled(service, fix=True), key=lambda f: f[1]) == expected
    assert not half.exists() and not sidecar.exists()
    assert reconciled(service, fix=True) == []
    storage.clone_volume("src", "half", 2, "alice")
    with open(root / "half.raw", "rb") as f:
        assert os.pread(f.fileno(), MIB, 3 * MIB) == PATTERN
    assert os.stat(root / "half.raw").st_size == 2 * 1024**3


def test_a_kill_mid_delete_leaves_data_that_its_temp_sidecar_vouches_for(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "vols")
    storage.create_volume("v1", 1, "alice")
    storage.write_image("v1", [PATTERN])
    dead = subprocess.Popen(["true"])
    dead.wait()
    # What delete_volume leaves when killed after its first rename.
    tombstone = storage.root / f".tmp-{dead.pid}.1-0123456789ab-v1.json"
    os.replace(storage.root / "v1.json", tombstone)
    expected = [("partial-volume", str(storage.root / "v1.raw"), MIB),
                ("partial-volume", str(tombstone), on_disk(tombstone))]

    assert storage.leftovers(remove=True) == expected

    assert sorted(os.listdir(storage.root)) == [".lock"]
    assert storage.leftovers(remove=True) == []


def test_a_dead_extend_s_temp_sidecar_goes_but_the_volume_it_names_stays(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "vols")
    storage.create_volume("v1", 1, "alice")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = storage.root / f".tmp-{dead.pid}.1-0123456789ab-v1.json"
    stale.write_text('{"id": "v1", "owner": "alice", "size_gb": 2}')

    assert [f[1] for f in storage.leftovers(remove=True)] == [str(stale)]

    assert storage.get_volume("v1").size_gb == 1
    assert (storage.root / "v1.raw").exists()


def test_a_raw_file_that_nothing_vouches_for_is_never_reported_nor_removed(
        tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "vols")
    (storage.root / "operators.raw").write_bytes(b"not ours to judge")

    assert storage.leftovers(remove=True) == []
    assert (storage.root / "operators.raw").exists()


def test_a_temp_file_of_a_live_process_is_never_a_leftover(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "vols")
    with subprocess.Popen(["sleep", "30"]) as live:
        try:
            name = f".tmp-{live.pid}-0123456789ab-v1.json"
            (storage.root / name).write_text("{}")
            (storage.root / "v1.raw").write_bytes(b"being made")
            assert storage.leftovers(remove=True) == []
            assert (storage.root / "v1.raw").exists()
        finally:
            live.kill()


def test_deleting_a_file_volume_on_a_full_filesystem_works_and_frees_its_room(
        small_fs: Path) -> None:
    storage = FileStorage(small_fs / "vols")
    storage.create_volume("v1", 1, "alice")
    storage.write_image("v1", [PATTERN] * 4)
    fill_up(small_fs)

    storage.delete_volume("v1")

    assert storage.list_volumes() == []
    assert storage.leftovers(remove=True) == []
    (small_fs / "filler").unlink()
    storage.create_volume("v2", 1, "alice")
    assert storage.write_image("v2", [PATTERN]) == MIB


def fill_up(directory: Path) -> None:
    """Write a file in ``directory`` until its filesystem has no room left at all."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\xff" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- qcow2 ---------------------------------------------------------------------------------

def test_a_kill_mid_index_save_leaves_index_damage_that_reconcile_repairs(
        tmp_path: Path) -> None:
    root = tmp_path / "vols"
    storage = Qcow2Storage(root)
    storage.create_volume("keep", 1, "alice")
    script = ("import os, sys\n"
              "from ivcache.adapters.storage import Qcow2Storage\n"
              "storage = Qcow2Storage(sys.argv[1])\n"
              "os.environ['IVCACHE_FAULT'] = 'qcow2-index-save'\n"
              "storage.create_volume('lost', 1, 'bob')\n")
    proc = subprocess.run([sys.executable, "-c", script, str(root)], check=False, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    [temp] = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    [lost] = [p for p in storage.files_dir.iterdir() if p.name.startswith("lost.")]
    service = service_on(storage)

    expected = [("index-damage", str(temp), on_disk(temp)),
                ("index-damage", str(lost), on_disk(lost))]
    assert reconciled(service) == expected
    assert reconciled(service, fix=True) == expected
    assert not temp.exists() and not lost.exists()
    assert reconciled(service, fix=True) == []
    storage.create_volume("lost", 1, "bob")
    storage.write_image("lost", [PATTERN])
    assert storage.read("lost", 0, MIB) == PATTERN
    assert [v.id for v in storage.list_volumes()] == ["keep", "lost"]


def test_records_of_files_that_are_gone_are_dropped_with_what_reads_them(
        tmp_path: Path) -> None:
    storage = Qcow2Storage(tmp_path / "vols")
    storage.create_volume("base", 1, "internal")
    storage.write_image("base", [PATTERN])
    storage.clone_volume("base", "clone", 1, "alice")
    storage.create_volume("other", 1, "alice")
    base_file = Path(storage.get_volume("base").location)
    clone_file = Path(storage.get_volume("clone").location)
    base_file.unlink()

    assert storage.leftovers(remove=False) == [("index-damage", str(base_file), 0)]
    assert storage.leftovers(remove=True) == [("index-damage", str(base_file), 0)]

    assert [v.id for v in storage.list_volumes()] == ["other"]
    assert not clone_file.exists()  # unreadable without its base
    assert storage.leftovers(remove=True) == []


def test_an_unreadable_index_is_reported_then_rebuilt_from_the_files(tmp_path: Path) -> None:
    storage = Qcow2Storage(tmp_path / "vols")
    storage.create_volume("base", 1, "internal")
    storage.write_image("base", [PATTERN])
    storage.clone_volume("base", "clone", 2, "alice")
    storage.delete_volume("base")  # hidden: its file backs the clone
    storage.create_volume("zlast", 1, "bob")
    index = storage.root / "index.json"
    text = index.read_text()
    index.write_text(text[:text.index('"zlast"') + 12])  # truncated inside the last record
    service = service_on(storage)
    with pytest.raises(StorageError, match="corrupt"):
        storage.list_volumes()

    assert reconciled(service) == [("index-damage", str(index), on_disk(index))]
    assert [(f.kind, f.fixed) for f in service.reconcile(fix=True)] == [
        ("index-damage", True)]

    volumes = {v.id: (v.owner, v.size_gb) for v in storage.list_volumes()}
    # The whole record kept its owner; the truncated one's volume is rebuilt from its file.
    assert volumes == {"clone": ("alice", 2), "zlast": (UNKNOWN_OWNER, 1)}
    assert storage.read("clone", 0, MIB) == PATTERN
    assert [p.name for p in storage.root.glob("index.json.damaged-*")]
    assert json.loads(index.read_text())["volumes"]["clone"]["owner"] == "alice"
    assert reconciled(service, fix=True) == []
    storage.create_volume("next", 1, "carol")
    assert "next" in {v.id for v in storage.list_volumes()}


def test_deleting_on_a_full_filesystem_without_a_reserve_frees_the_file_first(
        small_fs: Path) -> None:
    storage = Qcow2Storage(small_fs / "vols")
    storage.create_volume("data", 1, "alice")
    storage.write_image("data", [PATTERN] * 4)
    (storage.root / ".reserve").unlink()  # as if the filesystem was full when it was due
    fill_up(small_fs)

    storage.delete_volume("data")

    assert storage.list_volumes() == []
    assert storage.leftovers(remove=True) == []
    (small_fs / "filler").unlink()
    storage.create_volume("again", 1, "alice")
    storage.write_image("again", [PATTERN])
    assert storage.read("again", 0, 4) == PATTERN[:4]


# -- the fakes' state directory --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fake-lvm", "fake-rbd"])
def test_a_kill_mid_state_save_leaves_damage_that_is_repaired(tmp_path: Path, kind: str) -> None:
    cls = FakeLvmStorage if kind == "fake-lvm" else FakeRbdStorage
    storage = cls(state_path=tmp_path)
    storage.create_volume("keep", 1, "alice")
    storage.write_image("keep", [PATTERN])
    script = (f"import os, sys\nfrom pathlib import Path\n"
              f"from ivcache.adapters.storage import {cls.__name__}\n"
              f"storage = {cls.__name__}(state_path=Path(sys.argv[1]))\n"
              f"os.environ['IVCACHE_FAULT'] = '{kind}-state-save'\n"
              "storage.write_image('keep', [bytes([7]) * (1 << 20)] * 2)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL
    [temp] = list(tmp_path.glob(".tmp-*"))
    unnamed = [p for p in (tmp_path / "blocks").iterdir()
               if p.name not in json.dumps(json.loads((tmp_path / "index.json").read_text()))]
    assert len(unnamed) == 1

    expected = [("index-damage", str(temp), on_disk(temp)),
                ("index-damage", str(unnamed[0]), on_disk(unnamed[0]))]
    assert storage.leftovers(remove=False) == expected
    assert storage.leftovers(remove=True) == expected
    assert storage.leftovers(remove=True) == []
    assert storage.read("keep", 0, MIB) == PATTERN  # what the last whole save held
    storage.create_volume("next", 1, "bob")
    assert [v.id for v in storage.list_volumes()] == ["keep", "next"]


def test_a_fake_lvm_volume_whose_blocks_are_gone_is_dropped(tmp_path: Path) -> None:
    lvm = FakeLvmStorage(state_path=tmp_path)
    lvm.create_volume("v1", 1, "alice")
    lvm.write_image("v1", [PATTERN])
    lvm.create_volume("v2", 1, "alice")
    [blocks] = list((tmp_path / "blocks").iterdir())
    blocks.unlink()

    assert lvm.leftovers(remove=True) == [("index-damage", str(blocks), 0)]

    assert [v.id for v in lvm.list_volumes()] == ["v2"]
    assert lvm.leftovers(remove=True) == []


def test_an_unreadable_fake_lvm_state_is_rebuilt_from_its_block_files(tmp_path: Path) -> None:
    lvm = FakeLvmStorage(state_path=tmp_path)
    lvm.create_volume("v1", 3, "alice")
    lvm.write_image("v1", [PATTERN, bytes(MIB), PATTERN])
    index = tmp_path / "index.json"
    index.write_text(index.read_text()[:40])
    service = service_on(lvm)

    assert reconciled(service) == [("index-damage", str(index), on_disk(index))]
    reconciled(service, fix=True)

    [volume] = lvm.list_volumes()
    assert (volume.id, volume.owner, volume.size_gb) == ("v1", UNKNOWN_OWNER, 1)
    assert lvm.read("v1", 2 * MIB, MIB) == PATTERN
    assert list(tmp_path.glob("index.json.damaged-*"))
    assert reconciled(service, fix=True) == []


def test_a_fake_rbd_clone_whose_parent_s_blocks_are_gone_is_dropped(tmp_path: Path) -> None:
    pool = FakeRbdStorage(state_path=tmp_path)
    pool.create_volume("base", 1, "internal")
    pool.write_image("base", [PATTERN])
    pool.clone_volume("base", "clone", 1, "alice")
    pool.create_volume("other", 1, "alice")
    pool.write_image("other", [PATTERN])
    [base_blocks] = [p for p in (tmp_path / "blocks").iterdir()
                     if p.name.startswith(json.loads((tmp_path / "index.json").read_text())
                                          ["images"][pool._names["base"]]["file"][:16])]
    base_blocks.unlink()

    assert pool.leftovers(remove=True) == [("index-damage", str(base_blocks), 0)]

    assert [v.id for v in pool.list_volumes()] == ["other"]
    assert pool.read("other", 0, MIB) == PATTERN
    assert pool.used_bytes == MIB
    assert pool.leftovers(remove=True) == []


def test_fakes_in_memory_leave_nothing() -> None:
    assert FakeLvmStorage().leftovers(remove=True) == []
    assert FakeRbdStorage().leftovers(remove=True) == []

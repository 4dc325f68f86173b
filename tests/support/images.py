"""Disk images in every format ivcache takes, and the malicious ones it must refuse, made
with the real ``qemu-img`` from one raw disk of known content.

    images = make_images(tmp_path)         # {name: Made}
    images["qcow2"].reference              # what `qemu-img convert -O raw` makes of it

Each good image's ``reference`` is its own ``qemu-img convert -f FMT -O raw`` (of the gzip
data's content, for a compressed one): a volume made from the image must start with those
bytes and hold only zeros after them.
"""

from __future__ import annotations

import gzip
import random
import shutil
import subprocess
from pathlib import Path

import attrs

__all__ = ["BAD", "DISK_BYTES", "GOOD", "MIB", "Made", "make_images", "qemu_img",
           "write_known_disk"]

MIB = 1 << 20
DISK_BYTES = 24 * MIB

#: name: (declared disk_format, container_format)
GOOD: dict[str, tuple[str, str]] = {
    "raw": ("raw", "bare"),
    "qcow2": ("qcow2", "bare"),
    "qcow2-compressed": ("qcow2", "bare"),  # qemu-img convert -c, as cloud images are
    "vmdk": ("vmdk", "bare"),  # monolithicSparse
    "vmdk-stream": ("vmdk", "bare"),  # streamOptimized (a footer at the end)
    "vhd": ("vhd", "bare"),
    "vhdx": ("vhdx", "bare"),
    "vdi": ("vdi", "bare"),
    "iso": ("iso", "bare"),
    "raw-gzip": ("raw", "compressed"),
    "qcow2-gzip": ("qcow2", "compressed"),
}
#: name: declared disk_format, for the images that must be refused
BAD: dict[str, str] = {
    "qcow2-backing-file": "qcow2",  # -b /etc/passwd
    "qcow2-data-file": "qcow2",  # -o data_file=...
    "vmdk-flat-extent": "vmdk",  # monolithicFlat, its extent naming /etc/passwd
    "qcow2-truncated": "qcow2",  # the header promises more than the data holds
    "qed": "qed",
}
_CONVERT = {
    "qcow2": ["-O", "qcow2"],
    "qcow2-compressed": ["-c", "-O", "qcow2"],
    "vmdk": ["-O", "vmdk"],
    "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "vhd": ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
    "vhdx": ["-O", "vhdx"],
    "vdi": ["-O", "vdi"],
    "qed": ["-O", "qed"],
}
_QEMU_NAMES = {"vhd": "vpc", "iso": "raw"}


@attrs.frozen
class Made:
    path: Path
    disk_format: str
    container_format: str = "bare"
    reference: Path | None = None  # the raw disk qemu-img makes of it (good images only)


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"qemu-img {' '.join(args)}: {done.stderr}"
    return done.stdout


def write_known_disk(path: Path, size: int = DISK_BYTES, *, seed: int = 9) -> Path:
    """A raw disk of ``size`` bytes: a text label, runs of seeded random bytes (one ending
    a sector short of the end, one unaligned), zeros between them (holes)."""
    rand = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(b"ivcache test disk".ljust(64, b"."))
        for start, length in ((4096, 3 * MIB), (9 * MIB + 123, MIB), (size - 70_000, 69_488)):
            f.seek(start)
            f.write(rand.randbytes(length))
    return path


def make_images(directory: Path) -> dict[str, Made]:
    """Every image of ``GOOD`` and ``BAD``, made in ``directory`` from one known disk."""
    if shutil.which("qemu-img") is None:
        raise RuntimeError("qemu-img not found: apt-get install -y qemu-utils")
    directory.mkdir(parents=True, exist_ok=True)
    disk = write_known_disk(directory / "disk.raw")
    made: dict[str, Made] = {}
    for name, (fmt, container) in GOOD.items():
        if name == "raw":
            path = disk
        elif name == "iso":
            path = _make_iso(disk, directory / "disk.iso")
        elif container == "compressed":
            inner = made[fmt].path
            path = directory / f"{name}.gz"
            with open(inner, "rb") as src, gzip.open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            path = directory / f"{name}.{fmt}"
            qemu_img("convert", "-f", "raw", *_CONVERT[name], str(disk), str(path))
        if container == "compressed":
            reference = made[fmt].reference
        else:
            reference = directory / f"{name}.reference.raw"
            qemu_img("convert", "-f", _QEMU_NAMES.get(fmt, fmt), "-O", "raw", str(path),
                     str(reference))
        made[name] = Made(path, fmt, container, reference)
    made.update(_make_bad(directory, disk, made["qcow2"].path))
    return made


def _make_bad(directory: Path, disk: Path, qcow2: Path) -> dict[str, Made]:
    size = str(DISK_BYTES)
    backing = directory / "backing-file.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(backing), size)
    data_file = directory / "data-file.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"data_file={directory / 'data-file.raw'},data_file_raw=on", str(data_file), size)
    flat = directory / "flat.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(flat), size)
    text = flat.read_text()
    assert '"flat-flat.vmdk"' in text, text
    flat.write_text(text.replace('"flat-flat.vmdk"', '"/etc/passwd"'))
    truncated = directory / "truncated.qcow2"
    truncated.write_bytes(qcow2.read_bytes()[:qcow2.stat().st_size // 4])
    qed = directory / "disk.qed"
    qemu_img("convert", "-f", "raw", *_CONVERT["qed"], str(disk), str(qed))
    paths = {"qcow2-backing-file": backing, "qcow2-data-file": data_file,
             "vmdk-flat-extent": flat, "qcow2-truncated": truncated, "qed": qed}
    return {name: Made(paths[name], BAD[name]) for name in BAD}


def _make_iso(disk: Path, path: Path) -> Path:
    """An ISO 9660 image holding the disk as a file (pycdlib: no mkisofs needed)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="IVCACHE")
    iso.add_file(str(disk), "/DISK.RAW;1")
    iso.write(str(path))
    iso.close()
    return path

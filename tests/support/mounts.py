"""Small real filesystems for tests that must see one fill up (mounting needs root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["need_root_to_mount", "tmpfs"]


def need_root_to_mount() -> None:
    # CI runs as root and must run these; a developer without root may not.
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("mounting a filesystem needs root")


@contextlib.contextmanager
def tmpfs(mount: Path, size: str = "16m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on the new directory ``mount``, unmounted afterwards."""
    need_root_to_mount()
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)

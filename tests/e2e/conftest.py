from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

IMAGE_BYTES = 64 << 20


def _ivcache_exe() -> str:
    # The console script of the interpreter running the tests (venv or wheel venv).
    candidate = Path(sys.executable).parent / "ivcache"
    found = str(candidate) if candidate.exists() else shutil.which("ivcache")
    assert found, "the ivcache console script is not installed"
    return found


@attrs.frozen
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Cli:
    """Runs ``ivcache`` as a user would, in a fresh ``IVCACHE_HOME``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.exe = _ivcache_exe()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("IVCACHE_")}
        self.env["IVCACHE_HOME"] = str(home)

    def __call__(self, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 120) -> Run:
        proc = subprocess.run([self.exe, *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        return Run(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str, **kw: Any) -> Run:
        run = self(*args, **kw)
        assert run.code == 0, f"ivcache {' '.join(args)} -> {run.code}: {run.err}"
        return run

    def on_a_terminal(self, *args: str) -> tuple[int, str]:
        """Run with stderr on a pseudo-terminal (progress bars show only there); return the
        exit code and what was drawn."""
        leader, follower = pty.openpty()
        try:
            proc = subprocess.Popen([self.exe, *args], env={**self.env, "COLUMNS": "100"},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=follower)
            os.close(follower)
            drawn = bytearray()
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                drawn += chunk
            proc.wait(timeout=120)
            return proc.returncode, drawn.decode(errors="replace")
        finally:
            os.close(leader)

    def fails(self, *args: str, code: int = 1, **kw: Any) -> Run:
        run = self(*args, **kw)
        assert run.code == code, f"expected {code}, got {run.code}: {run.out} {run.err}"
        assert "Traceback" not in run.err
        if code == 1:
            assert len(run.err.strip().splitlines()) == 1, run.err
        return run


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home)


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as fh:
        fh.write(b"boot" * 1024)
        fh.seek(40 << 20)
        fh.write(b"tail" * 1024)
        fh.truncate(IMAGE_BYTES)
    return path

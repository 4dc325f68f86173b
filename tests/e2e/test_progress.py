"""A progress bar on stderr when it is a terminal, and none when it is not."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

from tests.e2e.conftest import Cli


def run_on_a_terminal(cli: Cli, *args: str) -> tuple[int, str]:
    """Run ivcache with stderr on a pseudo-terminal; return its exit code and what it drew."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([cli.exe, *args], env={**cli.env, "COLUMNS": "100"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
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


def test_image_copies_and_downloads_show_a_progress_bar_on_a_terminal(
        cli: Cli, image_file: Path) -> None:
    code, drawn = run_on_a_terminal(cli, "image", "add", str(image_file))
    assert code == 0 and "copying disk.raw" in drawn and "100%" in drawn
    image_id = cli.ok("image", "list", "--json").json()[0]["id"]
    code, drawn = run_on_a_terminal(cli, "volume", "create", "--image", image_id,
                                    "--size", "1")
    assert code == 0 and "downloading" in drawn and "100%" in drawn


def test_no_progress_bar_is_drawn_when_stderr_is_not_a_terminal(
        cli: Cli, image_file: Path) -> None:
    run = cli.ok("image", "add", str(image_file))
    assert run.err == ""

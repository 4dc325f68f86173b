"""SIGTERM and SIGINT stop a command cleanly: what it had begun is undone, as on an error."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli


def _state(pid: int) -> str:
    # The field after the command's name in /proc/PID/stat: R, S, T (stopped), ...
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _paused_at(cli: Cli, point: str, *args: str) -> subprocess.Popen[str]:
    """Start ``ivcache ARGS`` and wait until it has stopped itself at ``point``."""
    proc = subprocess.Popen([cli.exe, *args], env={**cli.env, "IVCACHE_FAULT": f"{point}:pause"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while _state(proc.pid) != "T":
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never reached its fault point"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_download_releases_the_claim_and_deletes_the_half_made_volume(
        cli: Cli, image_file: Path, signum: signal.Signals) -> None:
    cli.ok("image", "add", str(image_file))
    image_id = cli.ok("image", "list", "--json").json()[0]["id"]
    proc = _paused_at(cli, "mid-download", "volume", "create", "--image", image_id,
                      "--size", "1", "--json")
    # The claim and the cache volume exist now: the signal must undo both.
    assert [e["state"] for e in cli.ok("cache", "--admin", "list", "--json").json()] == [
        "creating"]
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert err.strip() == f"ivcache: stopped by {signum.name}: what it had begun was undone"
    assert "Traceback" not in err and out == ""
    assert cli.ok("cache", "--admin", "list", "--json").json() == []
    assert cli.ok("volume", "list", "--admin", "--all", "--json").json() == []
    assert cli.ok("cache", "--admin", "reconcile", "--json").json() == []
    # Nothing waits for it: the next create is an ordinary miss.
    run = cli.ok("volume", "create", "--image", image_id, "--size", "1", "--json")
    assert run.json()["outcome"] == "miss"

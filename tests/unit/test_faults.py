"""The crash tests' fault points: off by default, a real SIGKILL when named."""

from __future__ import annotations

import signal
import subprocess
import sys

from ivcache.adapters.faults import ENV, EnvFaults
from ivcache.core import NoFaults

_SCRIPT = """
from ivcache.adapters.faults import EnvFaults, reached
reached("elsewhere")
EnvFaults().reached("elsewhere")
print("before", flush=True)
{call}
print("after", flush=True)
"""


def _run(call: str, env_value: str | None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env[ENV] = env_value
    return subprocess.run([sys.executable, "-c", _SCRIPT.format(call=call)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_named_point_kills_the_process_with_sigkill() -> None:
    for call in ('EnvFaults().reached("after-claim")', 'reached("after-claim")'):
        done = _run(call, "mid-clone, after-claim")
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert done.stdout == "before\n"


def test_without_the_variable_every_point_returns() -> None:
    done = _run('reached("after-claim"); EnvFaults().reached("after-claim")', None)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "before\nafter\n"


def test_points_are_read_from_the_variable_or_given() -> None:
    assert EnvFaults(" a , b:pause,,").points == {"a": "kill", "b": "pause"}
    assert EnvFaults("").points == {}
    NoFaults().reached("a")  # returns, whatever the environment says

"""Fault points for crash tests: ``IVCACHE_FAULT=point[,point...]`` kills the process there.

For developers only (docs/development.md): a crash test runs a real ``ivcache`` command
with the variable set, and the process dies by SIGKILL at the first named point it
reaches, as a power cut or the OOM killer would stop it: no ``finally``, no ``atexit``.
Without the variable every point returns at once.

The service reaches its points through the core's ``FaultPoints`` port (``EnvFaults``);
storage adapters, which the core does not reach into, call ``reached`` here directly.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "EnvFaults", "reached"]

#: The environment variable naming the points to die at.
ENV = "IVCACHE_FAULT"


class EnvFaults:
    """The ``FaultPoints`` named by ``IVCACHE_FAULT`` (read when made).

    ``point`` kills the process there; ``point:pause`` stops it there instead (SIGSTOP),
    so that a test can send it a signal (SIGTERM, SIGINT) and SIGCONT, and see what the
    process does with a signal at that point.
    """

    def __init__(self, points: str | None = None) -> None:
        raw = os.environ.get(ENV, "") if points is None else points
        self.points: dict[str, str] = {}
        for item in raw.split(","):
            name, _, how = item.strip().partition(":")
            if name:
                self.points[name] = how.strip() or "kill"

    def reached(self, point: str) -> None:
        how = self.points.get(point)
        if how == "pause":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif how is not None:
            os.kill(os.getpid(), signal.SIGKILL)


def reached(point: str) -> None:
    """A storage adapter's fault point: die here if ``IVCACHE_FAULT`` names it."""
    if os.environ.get(ENV):
        EnvFaults().reached(point)

"""Which process this is, and whether another one is gone: the OS's answer.

An ``Owner`` is this machine's name, the pid and the process's start time (field 22 of
``/proc/<pid>/stat``), as the storage adapters' temp files name their maker: a pid used
again by a new process is told from the old one by its start time.
"""

from __future__ import annotations

import os
import socket

from ivcache.adapters.storage._files import owner_alive, owner_tag
from ivcache.core.model import Owner

__all__ = ["LocalProcesses"]


class LocalProcesses:
    """``Processes`` for this machine: an owner on it is gone when its pid is dead or
    another process's; an owner on another machine is never provably gone (its heartbeat
    tells)."""

    def __init__(self, node: str | None = None) -> None:
        self.node = node or socket.gethostname()

    def me(self) -> Owner:
        # Asked each time: a forked child is an owner of its own.
        pid, _, started = owner_tag().partition(".")
        return Owner(self.node, int(pid), int(started or 0))

    def gone(self, owner: Owner) -> bool:
        if owner.node != self.node:
            return False
        if owner.pid == os.getpid():
            return owner != self.me()
        tag = f"{owner.pid}.{owner.started}" if owner.started else str(owner.pid)
        return not owner_alive(tag)

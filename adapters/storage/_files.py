"""Files the storage adapters write: one lock, temp files named by their owner, one sweep.

A temp file is named ``.tmp-<owner>-<token><suffix>``, where ``<owner>`` is
``<pid>.<start>``: the process id and the process's start time (clock ticks after boot,
field 22 of ``/proc/<pid>/stat``). A pid is used again once its process is gone; the start
time tells the new process from the owner, so ``sweep`` removes exactly the temp files whose
owner is dead. Names of older versions (``.tmp-<pid>-...``) are judged by the pid alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from ivcache.adapters.faults import reached
from ivcache.core.errors import NoSpace, StorageError

__all__ = [
    "TEMP_PREFIX",
    "FileLock",
    "atomic_write",
    "dead_owner",
    "dead_temp_leftovers",
    "dead_temps",
    "disk_bytes",
    "filesystem_full",
    "fsync_dir",
    "no_space_errors",
    "open_temp",
    "owner_alive",
    "owner_tag",
    "sweep",
    "temp_name",
    "temp_target",
    "write_temp",
]

TEMP_PREFIX = ".tmp-"
_TOKEN_CHARS = 12

_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def filesystem_full(what: str, detail: str) -> NoSpace:
    return NoSpace(f"{what}: the filesystem is full ({detail})")


@contextlib.contextmanager
def no_space_errors(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into ``NoSpace``; other OS errors into ``StorageError``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NO_SPACE_ERRNOS:
            raise filesystem_full(what, str(exc.strerror)) from exc
        raise StorageError(f"{what}: {exc}") from exc


class FileLock:
    """An exclusive lock on the file ``path``, for the threads and processes that share it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        # A new open file description per use: flock locks conflict between descriptions,
        # so this excludes other threads as well as other processes. The explicit unlock
        # matters when a child forked meanwhile shares the description.
        with self._thread_lock, open(self.path, "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def owner_tag() -> str:
    """This process as temp-file names spell their owner: ``<pid>.<start>``."""
    return _tag(os.getpid())


@functools.cache
def _tag(pid: int) -> str:
    # Keyed by pid, so a forked child names itself, not its parent.
    stat = _stat(pid)
    return f"{pid}.{stat[1]}" if stat is not None else str(pid)


def owner_alive(tag: str) -> bool:
    """Whether the process an owner tag names still runs; True when it cannot be told."""
    pid_text, _, start = tag.partition(".")
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _stat(pid)
    if stat is None:
        return True  # no /proc to ask, or it died just now: keep its files this time
    state, started = stat
    # A zombie has finished: its files will never be completed.
    return state not in ("Z", "X") and (not start or started == start)


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of process ``pid`` from /proc, or None if /proc cannot say."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    fields = raw[raw.rfind(b")") + 2:].split()
    if len(fields) < 20:
        return None
    return fields[0].decode(), fields[19].decode()


def temp_name(suffix: str = "") -> str:
    """A new temp-file name owned by this process: ``.tmp-<pid>.<start>-<token><suffix>``."""
    return f"{TEMP_PREFIX}{owner_tag()}-{secrets.token_hex(_TOKEN_CHARS // 2)}{suffix}"


def _temp_owner(name: str) -> str | None:
    """The owner tag of a temp-file name, or None if ``name`` is not one of ours."""
    if not name.startswith(TEMP_PREFIX):
        return None
    tag = name[len(TEMP_PREFIX):].partition("-")[0]
    pid, _, start = tag.partition(".")
    if not pid.isdigit() or int(pid) < 1 or not (start.isdigit() or not start):
        return None
    return tag


def open_temp(directory: Path, suffix: str = "") -> tuple[Path, int]:
    """Create a new, empty temp file in ``directory``; return its path and a read-write fd."""
    path = directory / temp_name(suffix)
    with no_space_errors(f"creating a file in {directory}"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return path, fd


def sweep(directory: Path) -> list[str]:
    """Remove the temp files in ``directory`` whose owner is dead; return the names left."""
    left = []
    for name in os.listdir(directory):
        if _dead_temp(name):
            (directory / name).unlink(missing_ok=True)
        else:
            left.append(name)
    return left


def dead_temps(directory: Path) -> list[Path]:
    """The temp files in ``directory`` whose owner is dead, by name (``sweep`` removes
    them; this only says which they are)."""
    return [directory / name for name in sorted(os.listdir(directory)) if _dead_temp(name)]


def dead_temp_leftovers(places: Iterable[tuple[str, Path]], *,
                        remove: bool) -> list[tuple[str, str, int]]:
    """The dead owners' temp files in each (kind, directory) of ``places``, as storage
    leftovers: (kind, path, bytes on disk); with ``remove``, they are removed."""
    found: list[tuple[str, str, int]] = []
    for kind, directory in places:
        for path in dead_temps(directory):
            found.append((kind, str(path), disk_bytes(path)))
            if remove:
                path.unlink(missing_ok=True)
    return found


def _dead_temp(name: str) -> bool:
    owner = _temp_owner(name)
    return owner is not None and not owner_alive(owner)


def atomic_write(path: Path, data: bytes, *, durable: bool = True, fault: str = "") -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never half.

    The data goes first to a temp file beside ``path`` (which ``sweep`` reaps if this
    process dies before the rename). ``durable`` also survives a power loss (fsync of the
    file and of its directory). ``fault`` names the crash tests' fault point between the
    temp file's write and its rename (``ivcache.adapters.faults``).
    """
    tmp = write_temp(path, data, durable=durable)
    try:
        if fault:
            reached(fault)
        with no_space_errors(f"writing {path}"):
            os.replace(tmp, path)
            if durable:
                fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_temp(path: Path, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` into a new temp file beside ``path`` named for it
    (``.tmp-<owner>-<token>-<name>``, see ``temp_target``); return the temp file's path,
    for the caller to rename onto ``path``."""
    tmp, fd = open_temp(path.parent, f"-{path.name}")
    try:
        with no_space_errors(f"writing {path}"):
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def temp_target(name: str) -> str | None:
    """The name of the file that the temp file ``name`` was written for (``write_temp``):
    what follows its token after a ``-``; None if ``name`` is no temp file, or none named
    for a file."""
    owner = _temp_owner(name)
    if owner is None:
        return None
    rest = name[len(TEMP_PREFIX) + len(owner) + 1:]
    token, dash, target = rest[:_TOKEN_CHARS], rest[_TOKEN_CHARS:_TOKEN_CHARS + 1], \
        rest[_TOKEN_CHARS + 1:]
    if dash != "-" or not target or len(token) != _TOKEN_CHARS:
        return None
    return target


def dead_owner(name: str) -> bool:
    """Whether ``name`` is a temp file whose owner is dead (``sweep`` would remove it)."""
    return _dead_temp(name)


def disk_bytes(path: Path) -> int:
    """The bytes ``path`` takes on disk (a sparse file's holes take none); 0 if gone."""
    try:
        return os.stat(path, follow_symlinks=False).st_blocks * 512
    except FileNotFoundError:
        return 0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

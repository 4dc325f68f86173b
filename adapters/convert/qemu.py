"""qemu-img, the way an image that came from outside may be read: under ``prlimit``.

Every call names the format (``-f``: qemu never probes an untrusted image) and runs with
Cinder's limits, ``image_conversion_cpu_limit`` (seconds of CPU time) and
``image_conversion_address_space_limit`` (GiB of address space), so a crafted image cannot
make qemu-img spin or eat the host's memory. qemu-img comes with Debian's ``qemu-utils``,
prlimit with ``util-linux``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence

from ivcache.core.errors import ConversionFailed, CorruptImage, IvcacheError
from ivcache.core.model import GIB

__all__ = ["DriverMissing", "QemuImg"]

_INSTALL_HINT = "install qemu-utils (apt-get install -y qemu-utils)"
# qemu-img check: 0 sound, 2 corrupt, 3 only leaked clusters (harmless for reading), 63
# the format has no check (vpc); 1 the check itself failed.
_CHECK_OK = frozenset({0, 3, 63})


class DriverMissing(ConversionFailed):
    """This qemu-img lacks the driver a target needs (rbd: Debian's qemu-block-extra)."""


class QemuImg:
    """Runs ``qemu-img`` under ``prlimit`` with the given limits (0: no limit)."""

    def __init__(self, *, cpu_seconds: int = 60, address_space_gb: int = 1,
                 program: str = "qemu-img") -> None:
        self.cpu_seconds = cpu_seconds
        self.address_space_gb = address_space_gb
        self.program = program

    def check(self, what: str, fmt: str, source: str, *, pass_fds: Sequence[int] = ()) -> None:
        """Refuse an image that qemu-img finds damaged: a truncated qcow2 whose tables point
        past its end, say (``qemu-img convert`` would silently read zeros there)."""
        proc = self._run(["check", "-q", "-f", fmt, source], what, pass_fds)
        if proc.returncode in _CHECK_OK:
            return
        self._limits_hit(what, proc.returncode)
        if proc.returncode == 2:
            raise CorruptImage(f"{what}: qemu-img check finds its {fmt} data corrupt "
                               "(cut short or damaged): upload it again")
        raise CorruptImage(f"{what}: qemu-img cannot check its {fmt} data: "
                           f"{_last_line(proc)}")

    def convert(self, what: str, fmt: str, source: str, target: str, *,
                pass_fds: Sequence[int] = (), full: Callable[[], IvcacheError]) -> None:
        """Convert ``source`` (format ``fmt``) into the existing raw ``target``, which reads
        as zeros: only the disk's data is written, zeros are skipped (``-n
        --target-is-zero``), out of order (``-W``). ``full()`` is the error for a target
        that runs out of room."""
        proc = self._run(["convert", "-q", "-n", "--target-is-zero", "-W", "-f", fmt,
                          "-O", "raw", source, target], what, pass_fds)
        if proc.returncode == 0:
            return
        self._limits_hit(what, proc.returncode)
        message = _last_line(proc)
        if "No space left" in message or "Disk quota exceeded" in message:
            raise full()
        if "Unknown protocol" in message:
            raise DriverMissing(f"{what}: qemu-img cannot open {target.partition(':')[0]} "
                                f"targets ({message}): install qemu-block-extra")
        if "Cannot allocate memory" in message:
            raise ConversionFailed(
                f"{what}: qemu-img ran out of memory converting it ({message}): raise "
                f"image_conversion_address_space_limit (now {self.address_space_gb} GiB)")
        raise ConversionFailed(f"{what}: qemu-img could not convert its {fmt} data: "
                               f"{message}")

    def convert_to(self, what: str, fmt: str, source: str, out_format: str, target: str, *,
                   pass_fds: Sequence[int] = (), full: Callable[[], IvcacheError]) -> None:
        """Write ``source`` (format ``fmt``) as a new ``out_format`` image file ``target``
        (a volume read out as an image: ``volume upload``)."""
        proc = self._run(["convert", "-q", "-f", fmt, "-O", out_format, source, target],
                         what, pass_fds)
        if proc.returncode == 0:
            return
        self._limits_hit(what, proc.returncode)
        message = _last_line(proc)
        if "No space left" in message or "Disk quota exceeded" in message:
            raise full()
        if "Unknown protocol" in message:
            raise DriverMissing(f"{what}: qemu-img cannot open {source.partition(':')[0]} "
                                f"sources ({message}): install qemu-block-extra")
        raise ConversionFailed(f"{what}: qemu-img could not write it as {out_format}: "
                               f"{message}")

    def _run(self, args: list[str], what: str,
             pass_fds: Sequence[int]) -> subprocess.CompletedProcess[str]:
        program = shutil.which(self.program)
        if program is None:
            raise ConversionFailed(f"{what}: {self.program} not found: converting images "
                                   f"needs it; {_INSTALL_HINT}")
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise ConversionFailed(f"{what}: prlimit not found: qemu-img runs under its "
                                   "limits; install util-linux")
        limits = []
        if self.cpu_seconds:
            limits.append(f"--cpu={self.cpu_seconds}")
        if self.address_space_gb:
            limits.append(f"--as={self.address_space_gb * GIB}")
        # glibc reserves 64 MiB of address space for each thread's malloc arena: qemu-img's
        # I/O threads (and librbd's) would spend the address-space limit on reservations
        # and fail to start threads at random. Two arenas are plenty for qemu-img.
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
        try:
            return subprocess.run([prlimit, *limits, "--", program, *args],
                                  capture_output=True, text=True, check=False, env=env,
                                  stdin=subprocess.DEVNULL, pass_fds=tuple(pass_fds))
        except OSError as exc:
            raise ConversionFailed(f"{what}: cannot run {program} ({exc.strerror}); "
                                   f"{_INSTALL_HINT}") from exc

    def _limits_hit(self, what: str, returncode: int) -> None:
        # prlimit execs qemu-img, so a limit's signal is qemu-img's own exit status.
        if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            raise ConversionFailed(
                f"{what}: qemu-img used up its CPU time (image_conversion_cpu_limit = "
                f"{self.cpu_seconds} s): raise the limit for images this large")


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines()
             if line.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"

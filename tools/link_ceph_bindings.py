"""Make Debian's Ceph bindings (python3-rados, python3-rbd) importable in a venv.

Debian builds ``rados`` and ``rbd`` for its own /usr/bin/python3; a venv made from another
build of the same CPython version (pyenv, python.org) can load them if the ABI tag matches.
This links just those two extension modules into the venv's site-packages, then imports
them in a fresh interpreter to prove they load; if they do not, the links are removed.
Nothing happens (exit 0) where the Debian packages are not installed.

Usage: VENV/bin/python tools/link_ceph_bindings.py [--if-needed]

With ``--if-needed`` (what ``make install`` runs every time) it is quiet and quick when the
links are already there and point at the installed modules, or when there is nothing to link.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

__all__ = ["main"]

DIST = Path("/usr/lib/python3/dist-packages")
MODULES = ("rados", "rbd")


def main(argv: list[str]) -> int:
    if_needed = "--if-needed" in argv
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    site = Path(sysconfig.get_paths()["purelib"])
    sources = [DIST / f"{name}{suffix}" for name in MODULES]
    if not all(src.exists() for src in sources):
        if not if_needed:
            print(f"ceph bindings: no {' / '.join(s.name for s in sources)} in {DIST} "
                  "(apt-get install python3-rbd python3-rados): not linked")
        return 0
    links = [site / src.name for src in sources]
    if if_needed and all(link.is_symlink() and link.resolve() == src.resolve()
                         for src, link in zip(sources, links, strict=True)):
        return 0
    for src, link in zip(sources, links, strict=True):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
    check = subprocess.run([sys.executable, "-c", "import rados, rbd"],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        for link in links:
            link.unlink()
        print(f"ceph bindings: {DIST} modules do not load in {sys.executable}: "
              f"{check.stderr.strip().splitlines()[-1:]}; not linked")
        return 0
    print(f"ceph bindings: linked {', '.join(MODULES)} into {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

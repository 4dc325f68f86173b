"""Fail if any Python file imports the bare source folders `core`, `adapters`, `entrypoints`.

The folders install as `ivcache.core`, `ivcache.adapters`, `ivcache.entrypoints`; an import
such as `from core.model import Entry` works from the repository root by accident and breaks
once installed. import-linter checks this for the package itself; this script also covers
tests/, bench/ and tools/.

Usage: python tools/check_bare_imports.py [ROOT]   (exit status 1 on any bare import)
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

BARE = frozenset({"core", "adapters", "entrypoints"})
SKIP_DIRS = frozenset({".git", "build", ".build", "dist", "__pycache__", "node_modules"})


def python_files(root: Path) -> Iterator[Path]:
    """Yield the .py files under `root`, skipping virtualenvs, build output and VCS folders."""
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts[:-1]
        if any(p in SKIP_DIRS or p.startswith(".venv") or p.endswith(".egg-info") for p in parts):
            continue
        yield path


def bare_imports(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line, imported module) for each absolute import of a bare folder name."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".", 1)[0] in BARE:
                yield node.lineno, name


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path.cwd()
    found = 0
    for path in python_files(root):
        try:
            hits = list(bare_imports(path))
        except SyntaxError as exc:  # ruff reports these; do not hide them, do not crash
            print(f"{path}: not parsed ({exc.msg}); skipped", file=sys.stderr)
            continue
        for lineno, name in hits:
            print(f"{path.relative_to(root)}:{lineno}: bare import of {name!r}; "
                  f"use 'ivcache.{name}'")
            found += 1
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

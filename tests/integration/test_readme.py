"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_library_example_runs(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "the README has no python example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IVCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IVCACHE_CONFIG", raising=False)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "home" / "ivcache.db").exists()

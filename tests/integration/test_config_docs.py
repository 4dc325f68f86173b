"""docs/configuration.md is the page generated from the option table, as checked in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ivcache.entrypoints.config import OPTIONS, render_markdown

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_configuration_page_is_the_one_generated_from_the_table() -> None:
    assert PAGE.read_text(encoding="utf-8") == render_markdown(), (
        "docs/configuration.md is out of date: run `make docs`")


def test_the_page_names_every_option_and_how_to_regenerate_it() -> None:
    page = render_markdown()
    for option in OPTIONS:
        assert f"| `{option.name}` |" in page
    assert "make docs" in page


def test_the_generator_runs_as_a_module() -> None:
    run = subprocess.run([sys.executable, "-m", "ivcache.entrypoints.config", "--markdown"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert run.stdout == render_markdown()

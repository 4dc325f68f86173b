"""A progress bar on stderr when it is a terminal, and none when it is not."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import Cli


def test_image_copies_and_downloads_show_a_progress_bar_on_a_terminal(
        cli: Cli, image_file: Path) -> None:
    code, drawn = cli.on_a_terminal("image", "add", str(image_file))
    assert code == 0 and "copying disk.raw" in drawn and "100%" in drawn
    image_id = cli.ok("image", "list", "--json").json()[0]["id"]
    code, drawn = cli.on_a_terminal("volume", "create", "--image", image_id,
                                    "--size", "1")
    assert code == 0 and "downloading" in drawn and "100%" in drawn


def test_no_progress_bar_is_drawn_when_stderr_is_not_a_terminal(
        cli: Cli, image_file: Path) -> None:
    run = cli.ok("image", "add", str(image_file))
    assert run.err == ""

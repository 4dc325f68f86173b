"""``make bench`` never dies: a bench this machine cannot run is skipped with its reason, one
that breaks is reported, and the others still run. (Here, not in tests/unit: the wheel test
runs the unit tests without the repository's bench/ folder.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run as bench_run


def fine(work: Path) -> dict[str, float]:
    assert work.is_dir()
    return {"fine_figure": 1.5}


def cannot(work: Path) -> dict[str, float]:
    raise bench_run.Unavailable("no frobnicator here (apt-get install -y frobnicator)")


def broken(work: Path) -> dict[str, float]:
    raise ZeroDivisionError("division by zero")


def short(work: Path) -> dict[str, float]:
    return {"given": 1.0}


def test_a_bench_that_cannot_run_is_skipped_and_the_others_run() -> None:
    figures, skipped, failed = bench_run.run_all([
        (cannot, ("needs_a", "needs_b")), (broken, ("broken_figure",)),
        (short, ("given", "promised")), (fine, ("fine_figure",))])
    assert figures == {"fine_figure": 1.5, "given": 1.0}
    assert skipped == dict.fromkeys(
        ("needs_a", "needs_b"), "no frobnicator here (apt-get install -y frobnicator)")
    assert failed == {"broken_figure": "ZeroDivisionError: division by zero",
                      "promised": "short did not give it"}


@pytest.mark.parametrize(("ci", "benches", "code"), [
    ("", [(cannot, ("x",)), (fine, ("fine_figure",))], 0),
    ("1", [(cannot, ("x",)), (fine, ("fine_figure",))], 1),
    ("", [(broken, ("y",))], 1),
    ("1", [(fine, ("fine_figure",))], 0),
])
def test_the_exit_code_fails_on_a_failure_and_on_a_skip_under_ci(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str,
        benches: list[tuple[bench_run.Bench, tuple[str, ...]]], code: int) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(bench_run, "BENCHES", benches)
    assert bench_run.main([]) == code
    results = json.loads((tmp_path / ".bench" / "results.json").read_text())
    assert set(results) == {"figures", "skipped", "failed", "quick"}


def test_names_on_the_command_line_choose_benches_by_function_or_figure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "")
    monkeypatch.setattr(bench_run, "BENCHES", [(fine, ("fine_figure",)), (short, ("given",)),
                                               (broken, ("y",))])
    assert bench_run.main(["short", "fine_fig"]) == 0
    results = json.loads((tmp_path / ".bench" / "results.json").read_text())
    assert results["figures"] == {"fine_figure": 1.5, "given": 1.0}
    assert bench_run.main(["nothing-like-this"]) == 2


def test_every_registered_bench_names_its_figures_once() -> None:
    names = [n for _, figures in bench_run.BENCHES for n in figures]
    assert len(names) == len(set(names))
    assert all(figures for _, figures in bench_run.BENCHES)


def test_every_bench_function_of_the_module_is_registered() -> None:
    import inspect

    registered = {fn for fn, _ in bench_run.BENCHES}
    unregistered = [
        name for name, fn in vars(bench_run).items()
        if inspect.isfunction(fn) and fn.__module__ == bench_run.__name__
        and not name.startswith("_") and list(inspect.signature(fn).parameters) == ["work"]
        and fn not in registered]
    assert unregistered == []

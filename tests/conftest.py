"""Shared fixtures. Tiers: tests/unit (core on fakes), tests/integration (real SQLite,
files, ...), tests/e2e (the CLI as a user runs it)."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.glance_server import GlanceServer


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    # With CI set nothing may skip: a skip there would hide a missing part (PostgreSQL,
    # Glance, qemu-img, Ceph...). Such a test fails instead.
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped with CI set: {report.longrepr}"


@pytest.fixture(scope="session")
def glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    """A real glance-api for the whole session (installed once into a cached venv)."""
    from tests.glance_server import GlanceServer, ensure_glance_venv

    server = GlanceServer(tmp_path_factory.mktemp("glance"), venv=ensure_glance_venv())
    server.start()
    try:
        yield server
    finally:
        server.stop()

"""Shared fixtures. Tiers: tests/unit (core on fakes), tests/integration (real SQLite,
PostgreSQL, Glance, files, qemu-img, Ceph), tests/e2e (the CLI as a user runs it)."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support.pg import PostgresServer, PostgresUnavailable

if TYPE_CHECKING:
    from tests.support.glance_server import GlanceServer
    from tests.support.keystone_server import OpenStack


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


# -- Glance ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    """A real glance-api for the whole session (installed once into a cached venv)."""
    from tests.support.glance_server import GlanceServer, ensure_glance_venv

    server = GlanceServer(tmp_path_factory.mktemp("glance"), venv=ensure_glance_venv())
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- Keystone and a Glance that checks its tokens ------------------------------------------

@pytest.fixture(scope="session")
def keystone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenStack]:
    """A real Keystone and a glance-api checking its tokens, for the whole session (about
    15 s to start; installed once into a cached venv). Tests make their own projects."""
    from tests.support.keystone_server import OpenStack

    cloud = OpenStack(tmp_path_factory.mktemp("keystone"))
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.stop()


# -- PostgreSQL ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server() -> Generator[PostgresServer, None, None]:
    """A throwaway server for the session (or the one ``IVCACHE_TEST_POSTGRES_URL`` names)."""
    external = PostgresServer.from_env()
    if external is not None:
        yield external
        external.stop()
        return
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Generator[str, None, None]:
    """A new empty database on the session's server, for this test alone."""
    url = postgres_server.create_database()
    yield url
    if postgres_server.directory is None:
        # Someone else's server: leave it as it was. Our own is thrown away whole.
        postgres_server.drop_database(url)

"""Fixtures for the real parts the integration tests need."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ceph_cluster import CephCluster, CephUnavailable, ceph_missing
from tests.support.mounts import need_root_to_mount, tmpfs

__all__ = ["need_root_to_mount"]


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """A single-node Ceph cluster with a pool ``rbd``, started once per session.

    ``CEPH_CONF`` points at it while it runs. Skips (a failure under CI) where Ceph or its
    Python bindings are missing.
    """
    reason = ceph_missing()
    if reason:
        pytest.skip(reason)
    try:
        import rados  # type: ignore[import-not-found]  # noqa: F401  # Debian's, no stubs
        import rbd  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the Ceph Python bindings do not import ({exc}): apt-get install "
                    "python3-rbd python3-rados, then `make install`")
    try:
        cluster = CephCluster.start()
    except CephUnavailable as exc:
        pytest.fail(f"the test Ceph cluster did not start: {exc}")
    saved = os.environ.get("CEPH_CONF")
    os.environ["CEPH_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("CEPH_CONF", None)
        else:
            os.environ["CEPH_CONF"] = saved
        cluster.stop()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a filesystem that really fills up."""
    with tmpfs(tmp_path / "small") as mount:
        yield mount

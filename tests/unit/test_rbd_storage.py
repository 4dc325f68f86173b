"""The real RBD backend where no cluster is needed (the rest: tests/integration)."""

from __future__ import annotations

import sys

import pytest

from ivcache.adapters.storage.rbd import RbdStorage
from ivcache.core.errors import ConfigError


def test_without_the_ceph_bindings_making_one_is_a_config_error_naming_the_packages(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rados", None)  # as if python3-rados were missing

    with pytest.raises(ConfigError, match="python3-rbd python3-rados"):
        RbdStorage("rbd")


@pytest.mark.parametrize("bad", [{"max_clone_depth": -1}, {"capacity_gb": -1}])
def test_a_negative_depth_limit_or_capacity_is_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        RbdStorage("rbd", **bad)  # type: ignore[arg-type]  # keywords from the parameter

"""The real RBD backend where no cluster is needed (the rest: tests/integration)."""

from __future__ import annotations

import errno
import sys

import pytest

import ivcache.adapters.storage.rbd as rbd_module
from ivcache.adapters.storage.rbd import RbdStorage
from ivcache.core.errors import ConfigError, NoSpace
from ivcache.core.model import GIB

MIB = 1024**2


def test_without_the_ceph_bindings_making_one_is_a_config_error_naming_the_packages(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rados", None)  # as if python3-rados were missing

    with pytest.raises(ConfigError, match="python3-rbd python3-rados"):
        RbdStorage("rbd")


@pytest.mark.parametrize("bad", [{"max_clone_depth": -1}, {"capacity_gb": -1}])
def test_a_negative_depth_limit_or_capacity_is_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        RbdStorage("rbd", **bad)  # type: ignore[arg-type]  # keywords from the parameter


class _FullPoolImage:
    """Stands in for an rbd.Image whose writes the cluster refuses with ENOSPC or EDQUOT."""

    def __init__(self, code: int) -> None:
        self.code = code

    def aio_write(self, data: bytes, offset: int, callback: object) -> _FullPoolImage:
        return self

    def wait_for_complete_and_cb(self) -> None:
        pass

    def get_return_value(self) -> int:
        return -self.code


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_write_the_pool_refuses_for_want_of_room_raises_no_space(code: int) -> None:
    writer = rbd_module._Writer(_FullPoolImage(code), "v1", GIB, fresh=True)

    with pytest.raises(NoSpace, match="v1"):
        for _ in range(16):
            writer.feed(b"\x01" * MIB)
        writer.finish()

"""Storage back-end adapters: implementations of the core's ``StorageBackend`` port.

``FakeLvmStorage`` (thick) and ``FakeRbdStorage`` (thin, copy-on-write) simulate volume
groups and pools in memory or in a state directory; ``FileStorage`` keeps real volumes as
sparse files; ``Qcow2Storage`` keeps raw bases and qcow2 overlays through qemu-img;
``RbdStorage`` keeps them as images of a Ceph RBD pool (the Ceph bindings are imported only
when one is made).
"""

from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.adapters.storage.fake_rbd import FakeRbdStorage
from ivcache.adapters.storage.file import FileStorage
from ivcache.adapters.storage.qcow2 import Qcow2Storage
from ivcache.adapters.storage.rbd import RbdStorage

__all__ = ["FakeLvmStorage", "FakeRbdStorage", "FileStorage", "Qcow2Storage", "RbdStorage"]

"""The public surface is pinned: a name added or dropped is a decision, made here."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import ivcache.adapters
import ivcache.core
import ivcache.entrypoints
from ivcache.entrypoints.library import ImageVolumeCache

CORE = {
    # model
    "GIB", "CacheEntry", "CreateResult", "EntryState", "Image", "InternalTenant",
    "Outcome", "RequestContext", "Volume", "check_id", "new_id",
    # model: scopes (issue 11)
    "DEFAULT_BACKEND", "Scope", "ScopeTotals",
    # policy, service
    "CachePolicy", "CacheService", "Finding", "NoFaults", "NullTracer", "SystemClock",
    # service: neighbours and adoption (issue 11)
    "Adoption", "Neighbour",
    # events
    "CacheEntryCreated", "CacheEvict", "CacheHit", "CacheMiss", "Event", "EvictReason",
    "ImageDownloaded", "IMAGE_SOURCE",
    # volume upload (issue 15)
    "NewImage", "UploadResult", "UPLOAD", "ImageUploader", "VolumeData", "VolumeExporter",
    # ports
    "CacheRepository", "Clock", "DiskImage", "EventOutbox", "FaultPoints", "FileChunks",
    "ImageConverter", "ImageData", "ImageSource", "Notifier", "Span", "StorageBackend", "Tracer",
    "UnitOfWork",
    # errors
    "AlreadyClaimed", "ChecksumMismatch", "ConfigError", "ConversionFailed", "CorruptImage",
    "EntryNotFound", "ImageError", "ImageFormatMismatch", "ImageNotActive", "ImageNotFound",
    "ImageUnavailable", "InvalidIdentifier", "InvalidRequest", "InvalidSize", "IvcacheError",
    "NoScratchSpace", "NoSpace", "QuotaExceeded", "StorageError", "UnsafeImage",
    "UnsupportedImage", "VolumeNotFound",
    "Forbidden", "AuthError", "TokenRefused", "IdentityUnavailable",
    # owners and heartbeats (issue 12)
    "Heartbeat", "Lease", "Owner", "Processes", "UnknownProcesses", "VolumeWrite",
}

FACADE = {
    "from_config", "from_adapters", "config", "service",
    "add_image", "list_images",
    "create_volume", "upload_volume", "get_volume", "delete_volume", "list_volumes",
    "entries", "get_entry", "evict", "prune", "warm", "pin", "unpin", "reconcile", "stats",
    "adopt",
    "close",
}


def test_the_core_exports_the_names_of_the_domain() -> None:
    assert set(ivcache.core.__all__) == CORE
    for name in CORE:
        assert getattr(ivcache.core, name) is not None


def test_the_library_facade_is_one_class_that_does_what_the_cli_does() -> None:
    import ivcache.entrypoints.library as library

    assert library.__all__ == ["ImageVolumeCache"]
    public = {n for n in dir(ImageVolumeCache) if not n.startswith("_")} | {"service"}
    assert public == FACADE


def _modules() -> list[str]:
    names = []
    for package in (ivcache.core, ivcache.adapters, ivcache.entrypoints):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".migrations" in info.name or info.name.endswith("adapters.storage.rbd"):
                continue  # migrations are alembic's; rbd's module imports the bindings lazily
            names.append(info.name)
    return names


@pytest.mark.parametrize("module_name", _modules())
def test_every_module_lists_its_public_names_and_each_exists(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} has no __all__"
    assert sorted(exported) == sorted(set(exported)), f"{module_name} lists a name twice"
    for name in exported:
        assert hasattr(module, name), f"{module_name}.__all__ names {name}, which is missing"

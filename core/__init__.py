"""The domain core of ivcache: entries, policy, tenants and the cache service.

Everything a storage driver or a library user needs from the core is importable from here;
the submodules say where each name lives:

- ``model``: ``Image``, ``Volume``, ``CacheEntry``, ``Scope``, ``RequestContext``,
  ``InternalTenant``...
- ``policy``: ``CachePolicy`` (limits, victims)
- ``events``: what the cache announces (``CacheHit``, ``CacheMiss``, ``CacheEvict``...)
- ``errors``: the one exception hierarchy (``IvcacheError`` and below)
- ``ports``: the Protocols adapters implement (``StorageBackend``, ``ImageSource``...)
- ``service``: ``CacheService``, the one owner of every decision
"""

from ivcache.core.errors import (
    AlreadyClaimed,
    ChecksumMismatch,
    ConfigError,
    EntryNotFound,
    ImageError,
    ImageNotActive,
    ImageNotFound,
    ImageUnavailable,
    InvalidIdentifier,
    InvalidRequest,
    InvalidSize,
    IvcacheError,
    NoSpace,
    QuotaExceeded,
    StorageError,
    VolumeNotFound,
)
from ivcache.core.events import (
    IMAGE_SOURCE,
    CacheEntryCreated,
    CacheEvict,
    CacheHit,
    CacheMiss,
    Event,
    EvictReason,
    ImageDownloaded,
)
from ivcache.core.model import (
    DEFAULT_BACKEND,
    GIB,
    CacheEntry,
    CreateResult,
    EntryState,
    Image,
    InternalTenant,
    Outcome,
    RequestContext,
    Scope,
    ScopeTotals,
    Volume,
    check_id,
    new_id,
)
from ivcache.core.operations import Adoption
from ivcache.core.policy import CachePolicy
from ivcache.core.ports import (
    CacheRepository,
    Clock,
    ImageSource,
    Notifier,
    Span,
    StorageBackend,
    Tracer,
    UnitOfWork,
)
from ivcache.core.service import CacheService, Finding, Neighbour, NullTracer, SystemClock

__all__ = [
    "DEFAULT_BACKEND",
    "GIB",
    "IMAGE_SOURCE",
    "Adoption",
    "AlreadyClaimed",
    "CacheEntry",
    "CacheEntryCreated",
    "CacheEvict",
    "CacheHit",
    "CacheMiss",
    "CachePolicy",
    "CacheRepository",
    "CacheService",
    "ChecksumMismatch",
    "Clock",
    "ConfigError",
    "CreateResult",
    "EntryNotFound",
    "EntryState",
    "Event",
    "EvictReason",
    "Finding",
    "Image",
    "ImageDownloaded",
    "ImageError",
    "ImageNotActive",
    "ImageNotFound",
    "ImageSource",
    "ImageUnavailable",
    "InternalTenant",
    "InvalidIdentifier",
    "InvalidRequest",
    "InvalidSize",
    "IvcacheError",
    "Neighbour",
    "NoSpace",
    "Notifier",
    "NullTracer",
    "Outcome",
    "QuotaExceeded",
    "RequestContext",
    "Scope",
    "ScopeTotals",
    "Span",
    "StorageBackend",
    "StorageError",
    "SystemClock",
    "Tracer",
    "UnitOfWork",
    "Volume",
    "VolumeNotFound",
    "check_id",
    "new_id",
]

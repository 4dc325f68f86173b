"""The domain core of ivcache: entries, policy, tenants and the cache service.

Everything a storage driver or a library user needs from the core is importable from here;
the submodules say where each name lives:

- ``model``: ``Image``, ``Volume``, ``CacheEntry``, ``RequestContext``, ``InternalTenant``...
- ``policy``: ``CachePolicy`` (limits, victims)
- ``events``: what the cache announces (``CacheHit``, ``CacheMiss``, ``CacheEvict``...)
- ``errors``: the one exception hierarchy (``IvcacheError`` and below)
- ``ports``: the Protocols adapters implement (``StorageBackend``, ``ImageSource``...)
- ``service``: ``CacheService``, the one owner of every decision
"""

from ivcache.core.errors import (
    AlreadyClaimed,
    AuthError,
    ChecksumMismatch,
    ConfigError,
    EntryNotFound,
    Forbidden,
    IdentityUnavailable,
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
    TokenRefused,
    VolumeNotFound,
)
from ivcache.core.events import (
    CacheEntryCreated,
    CacheEvict,
    CacheHit,
    CacheMiss,
    Event,
    EvictReason,
    ImageDownloaded,
)
from ivcache.core.model import (
    GIB,
    CacheEntry,
    CreateResult,
    EntryState,
    HostTotals,
    Image,
    InternalTenant,
    Outcome,
    RequestContext,
    Volume,
    check_id,
    new_id,
)
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
from ivcache.core.service import CacheService, Finding, NullTracer, SystemClock

__all__ = [
    "GIB",
    "AlreadyClaimed",
    "AuthError",
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
    "Forbidden",
    "HostTotals",
    "IdentityUnavailable",
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
    "NoSpace",
    "Notifier",
    "NullTracer",
    "Outcome",
    "QuotaExceeded",
    "RequestContext",
    "Span",
    "StorageBackend",
    "StorageError",
    "SystemClock",
    "TokenRefused",
    "Tracer",
    "UnitOfWork",
    "Volume",
    "VolumeNotFound",
    "check_id",
    "new_id",
]

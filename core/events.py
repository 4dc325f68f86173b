"""What the cache announces. Every event names the image and the host."""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "CacheEntryCreated",
    "CacheEvict",
    "CacheHit",
    "CacheMiss",
    "Event",
    "EvictReason",
    "ImageDownloaded",
]


class EvictReason(enum.Enum):
    LRU = "lru"
    STALE = "stale"
    ADMIN = "admin"
    RECONCILE = "reconcile"
    IMAGE_DELETED = "image-deleted"
    #: the cache volume was gone when a clone needed it (deleted behind the cache's back)
    MISSING_VOLUME = "missing-volume"


@attrs.frozen
class Event:
    image_id: str
    host: str

    #: the notification's name, as Cinder spells it
    name = "image_volume_cache.event"

    def payload(self) -> dict[str, object]:
        """The fields by name, enums by their value; a field that is None is left out."""
        return attrs.asdict(self, value_serializer=_plain,
                            filter=lambda _field, value: value is not None)


def _plain(_inst: object, _field: object, value: object) -> object:
    return value.value if isinstance(value, enum.Enum) else value


@attrs.frozen
class CacheHit(Event):
    entry_id: str = ""
    name = "image_volume_cache.hit"


@attrs.frozen
class CacheMiss(Event):
    #: the request's outcome: ``miss`` (cached now) or ``miss-uncached``
    outcome: str = "miss"
    #: the entry made for it (None, and left out of the payload, when served uncached)
    entry_id: str | None = None
    name = "image_volume_cache.miss"


@attrs.frozen
class CacheEvict(Event):
    reason: EvictReason = EvictReason.LRU
    entry_id: str = ""
    size_gb: int = 0
    name = "image_volume_cache.evict"


@attrs.frozen
class CacheEntryCreated(Event):
    entry_id: str = ""
    size_gb: int = 0
    name = "image_volume_cache.create"


@attrs.frozen
class ImageDownloaded(Event):
    bytes: int = 0
    seconds: float = 0.0
    name = "image_volume_cache.download"

"""What the cache announces. Every event names the image, the host and the scope."""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "IMAGE_SOURCE",
    "UPLOAD",
    "CacheEntryCreated",
    "CacheEvict",
    "CacheHit",
    "CacheMiss",
    "Event",
    "EvictReason",
    "ImageDownloaded",
]


class EvictReason(enum.Enum):
    #: made room for a new entry (or a prune), chosen by the eviction policy named
    LRU = "lru"
    GDSF = "gdsf"
    STALE = "stale"
    ADMIN = "admin"
    RECONCILE = "reconcile"
    IMAGE_DELETED = "image-deleted"
    #: the cache volume was gone when a clone needed it (deleted behind the cache's back)
    MISSING_VOLUME = "missing-volume"
    #: a host's own entry of an image its cluster's scope already holds, when the host
    #: joined the cluster (its entries were adopted into the cluster's scope)
    MERGED = "merged"

#: ``CacheMiss.filled_from`` when the bytes came from the image source, not a neighbour
IMAGE_SOURCE = "image-source"
#: ``CacheEntryCreated.filled_from`` of an entry made from a volume as it was uploaded
UPLOAD = "upload"


@attrs.frozen
class Event:
    image_id: str
    host: str
    #: ``CLUSTER_OR_HOST@BACKEND#POOL`` of the entry or request (keyword only)
    scope: str = attrs.field(default="", kw_only=True)

    #: the notification's name, as Cinder spells it
    name = "image_volume_cache.event"

    def payload(self) -> dict[str, object]:
        """The fields by name, enums by their value; a field that is None is left out,
        and ``scope`` when it is not known."""
        fields = attrs.asdict(self, value_serializer=_plain,
                              filter=lambda _field, value: value is not None)
        if not self.scope:
            fields.pop("scope", None)
        return fields


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
    #: where the bytes came from: ``image-source``, or the scope of the neighbour's entry
    #: that filled the new cache volume
    filled_from: str = IMAGE_SOURCE
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
    #: where the entry's bytes came from, when not a miss's download (``upload``)
    filled_from: str | None = None
    name = "image_volume_cache.create"


@attrs.frozen
class ImageDownloaded(Event):
    bytes: int = 0
    seconds: float = 0.0
    name = "image_volume_cache.download"

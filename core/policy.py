"""How big the cache may grow, and which entries give way."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from ivcache.core.model import CacheEntry
    from ivcache.core.ports import CacheRepository

__all__ = ["CachePolicy", "EvictionStrategy", "LeastRecentlyUsed"]


class EvictionStrategy(Protocol):
    """Yields eviction candidates of a host, best victim first."""

    name: str

    def candidates(self, entries: CacheRepository, host: str,
                   now: dt.datetime) -> Iterator[CacheEntry]: ...


class LeastRecentlyUsed:
    """Cinder's rule: the entry used longest ago goes first."""

    name = "lru"

    def candidates(self, entries: CacheRepository, host: str,
                   now: dt.datetime) -> Iterator[CacheEntry]:
        return entries.lru_victims(host, now)


@attrs.frozen
class CachePolicy:
    """Limits are per host; 0 means unlimited.

    ``claim_wait_seconds`` bounds how long a request waits for another worker's
    download; ``claim_lease_seconds`` is how old a claim may grow before another
    worker may take it over; ``clone_lease_seconds`` keeps eviction off an entry being
    cloned.
    """

    enabled: bool = True
    max_size_gb: int = 0
    max_count: int = 0
    claim_wait_seconds: float = 600.0
    claim_lease_seconds: float = 3600.0
    clone_lease_seconds: float = 300.0

    def __attrs_post_init__(self) -> None:
        for name in ("max_size_gb", "max_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (unlimited) or positive")

    def fits(self, size_gb: int) -> bool:
        """Whether an image of this size may be cached at all."""
        return not self.max_size_gb or size_gb <= self.max_size_gb

    def over_limits(self, count: int, size_gb: int) -> bool:
        return bool((self.max_count and count > self.max_count)
                    or (self.max_size_gb and size_gb > self.max_size_gb))

"""How big the cache may grow, and which entries give way."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ivcache.core.model import CacheEntry, ScopeTotals
    from ivcache.core.ports import CacheRepository

__all__ = ["CachePolicy", "eviction_candidates"]


def eviction_candidates(entries: CacheRepository, scope: str,
                        now: dt.datetime) -> Iterator[CacheEntry]:
    """A scope's entries that may be evicted to make room, best victim first.

    Cinder's rule: the entry used longest ago goes first. This function is the one seam for
    another strategy (a cost-aware one); the repository yields lazily, so taking k victims
    reads about k rows.
    """
    return entries.lru_victims(scope, now)


@attrs.frozen
class CachePolicy:
    """Limits are per scope (``CLUSTER_OR_HOST@BACKEND#POOL``); 0 means unlimited.

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

    def victims(self, totals: ScopeTotals, candidates: Iterable[CacheEntry],
                adding_gb: int | None = None) -> list[CacheEntry] | None:
        """The fewest leading ``candidates`` whose eviction brings the scope within its
        limits.

        ``adding_gb`` is the size of an entry about to be added (a claim), or None when
        nothing is (a prune). Returns None when evicting every candidate would not be enough;
        candidates are consumed only as far as needed.
        """
        count = totals.count + (0 if adding_gb is None else 1)
        used = totals.size_gb + (adding_gb or 0)
        chosen: list[CacheEntry] = []
        if not self.over_limits(count, used):
            return chosen
        for candidate in candidates:
            chosen.append(candidate)
            count, used = count - 1, used - candidate.size_gb
            if not self.over_limits(count, used):
                return chosen
        return None

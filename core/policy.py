"""How big the cache may grow, and which entries give way."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ivcache.core.model import CacheEntry, ScopeTotals
    from ivcache.core.ports import CacheRepository

__all__ = ["EVICTION_POLICIES", "CachePolicy", "eviction_candidates"]

#: ``lru``: Cinder's rule, the entry used longest ago goes first. ``gdsf``:
#: GreedyDual-Size-Frequency, the entry that is cheapest to get back per GiB it holds goes
#: first (see ``CachePolicy.priority``).
EVICTION_POLICIES = ("lru", "gdsf")


def eviction_candidates(entries: CacheRepository, scope: str, now: dt.datetime,
                        policy: str = "lru") -> Iterator[CacheEntry]:
    """A scope's entries that may be evicted to make room, best victim first, by the
    eviction ``policy`` (one of ``EVICTION_POLICIES``).

    The repository yields lazily along an index (last_used for ``lru``, priority for
    ``gdsf``), so taking k victims reads about k rows.
    """
    if policy == "gdsf":
        return entries.priority_victims(scope, now)
    return entries.lru_victims(scope, now)


@attrs.frozen
class CachePolicy:
    """Limits are per scope (``CLUSTER_OR_HOST@BACKEND#POOL``); 0 means unlimited.

    ``claim_wait_seconds`` bounds how long a request waits for another worker's
    download. ``claim_heartbeat_seconds`` is how often a process tells that its claims,
    leases and writes are still alive; one whose owner is provably gone is taken over at
    once, one not heard of for three beats (an owner on another machine) too.
    ``eviction_policy`` (one of ``EVICTION_POLICIES``) says which entries give way
    first. An image whose data failed verification is refused at once for
    ``negative_cache_seconds`` (0: never remembered).
    """

    enabled: bool = True
    max_size_gb: int = 0
    max_count: int = 0
    claim_wait_seconds: float = 600.0
    claim_heartbeat_seconds: float = 5.0
    eviction_policy: str = "lru"
    negative_cache_seconds: float = 300.0

    def __attrs_post_init__(self) -> None:
        for name in ("max_size_gb", "max_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (unlimited) or positive")
        if not 0 < self.claim_heartbeat_seconds < 1e9:
            raise ValueError("claim_heartbeat_seconds must be a positive number of seconds")
        if not 0 <= self.negative_cache_seconds < 1e9:
            raise ValueError("negative_cache_seconds must be 0 (off) or a number of seconds")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction_policy {self.eviction_policy!r} is not one of "
                             f"{', '.join(EVICTION_POLICIES)}")

    @staticmethod
    def priority(age: float, entry: CacheEntry, uses: int) -> float:
        """GreedyDual-Size-Frequency's H = L + frequency × cost / size.

        ``age`` is the scope's aging value L, ``uses`` the requests the entry has served
        (its fill included), the cost its measured ``fill_seconds``: what evicting it would
        cost the next request, per GiB it holds. An entry whose fill time is unknown counts
        as free to get back (H = L): the first to go, least recently used first.

        Kept under either policy (it costs one sum when an entry is touched), so that a
        scope switched to ``gdsf`` finds its priorities in place.
        """
        if entry.fill_seconds is None:
            return age
        return age + uses * entry.fill_seconds / max(1, entry.size_gb)

    def aged(self, age: float, victims: Sequence[CacheEntry]) -> float:
        """The scope's aging value after ``victims`` (in the order taken) were evicted to
        make room: under ``gdsf``, the last victim's priority (never lower than before), so
        that entries not used for long sink below the newly touched ones; under ``lru``,
        unchanged."""
        if self.eviction_policy != "gdsf" or not victims:
            return age
        return max(age, victims[-1].priority)

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

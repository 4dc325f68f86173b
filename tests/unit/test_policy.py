"""The pure rules: which entries give way, the internal tenant's quota, the hash to check."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from ivcache.core.model import CacheEntry, EntryState, Image, InternalTenant, ScopeTotals
from ivcache.core.policy import CachePolicy

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def entry(name: str, size_gb: int = 1) -> CacheEntry:
    return CacheEntry(id=name, host="h", image_id=name, volume_id=f"v-{name}", size_gb=size_gb,
                      image_updated_at=T0, image_hash=None, state=EntryState.READY,
                      created_at=T0, last_used=T0)


def test_no_victims_are_needed_while_the_new_entry_fits() -> None:
    policy = CachePolicy(max_count=3, max_size_gb=10)
    assert policy.victims(ScopeTotals("h", count=2, size_gb=5), [entry("a")], adding_gb=5) == []


def test_the_fewest_leading_candidates_that_make_room_are_the_victims() -> None:
    policy = CachePolicy(max_size_gb=10)
    candidates = [entry("a", 2), entry("b", 3), entry("c", 4)]
    totals = ScopeTotals("h", count=3, size_gb=9)
    # 9 + 4 = 13 GiB: a (2) is not enough, a and b (5) are.
    assert policy.victims(totals, candidates, adding_gb=4) == candidates[:2]


def test_candidates_are_read_only_as_far_as_needed() -> None:
    seen: list[str] = []

    def lazily() -> Iterator[CacheEntry]:
        for name in ("a", "b", "c", "d"):
            seen.append(name)
            yield entry(name)

    policy = CachePolicy(max_count=2)
    assert [v.id for v in policy.victims(ScopeTotals("h", count=3, size_gb=3), lazily(),
                                         adding_gb=1) or []] == ["a", "b"]
    assert seen == ["a", "b"]


def test_no_victims_at_all_when_every_candidate_would_not_be_enough() -> None:
    policy = CachePolicy(max_size_gb=4)
    assert policy.victims(ScopeTotals("h", count=2, size_gb=4), [entry("a")],
                          adding_gb=4) is None


def test_a_prune_adds_nothing_so_it_only_counts_what_is_there() -> None:
    policy = CachePolicy(max_count=2)
    candidates = [entry("a"), entry("b")]
    assert policy.victims(ScopeTotals("h", count=2, size_gb=2), candidates) == []
    assert policy.victims(ScopeTotals("h", count=3, size_gb=3), candidates) == candidates[:1]


def test_the_quota_spans_every_hosts_cache_volumes_and_counts_what_is_freed() -> None:
    tenant = InternalTenant(quota_gb=10, quota_volumes=3)
    totals = [ScopeTotals("a", count=1, size_gb=4), ScopeTotals("b", count=1, size_gb=4)]
    assert tenant.quota_allows(totals, 2)
    assert not tenant.quota_allows(totals, 3)
    assert tenant.quota_allows(totals, 3, [entry("x", 1)])
    assert not InternalTenant(quota_volumes=2).quota_allows(totals, 1)
    assert InternalTenant().quota_allows(totals, 10_000)  # 0 means unlimited


def test_the_hash_checked_is_glances_os_hash_when_this_python_knows_it_else_md5() -> None:
    both = Image("i", os_hash_algo="sha512", os_hash_value="ab", checksum="cd")
    assert both.expected_hash == ("sha512", "ab")
    unknown = Image("i", os_hash_algo="no-such-algo", os_hash_value="ab", checksum="cd")
    assert unknown.expected_hash == ("md5", "cd")
    assert unknown.content_hash == "no-such-algo:ab"  # staleness still compares it
    assert Image("i").expected_hash is None

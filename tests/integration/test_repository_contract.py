"""The repository contract: the same behaviour from every ``UnitOfWork`` implementation.

Each test runs once per backend in ``BACKENDS``. A backend is a fixture named
``<name>_uow`` that returns a fresh, empty, upgraded unit of work; to add one (PostgreSQL),
write its fixture and add ``pytest.param("postgres", marks=pytest.mark.postgres)`` below.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import attrs
import pytest

from ivcache.adapters.memory import InMemoryUnitOfWork
from ivcache.adapters.sql import SqlUnitOfWork, make_engine, upgrade
from ivcache.core.errors import AlreadyClaimed
from ivcache.core.model import CacheEntry, EntryState, ScopeTotals
from ivcache.core.ports import UnitOfWork
from tests.support.scopes import scope_of

BACKENDS = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("postgres", marks=pytest.mark.postgres),
]

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
NODE_1 = scope_of("node-1")
NODE_2 = scope_of("node-2")
NODE_3 = scope_of("node-3")
NODE_9 = scope_of("node-9")


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def make_entry(image_id: str = "img-1", host: str = "node-1", *, entry_id: str | None = None,
               size_gb: int = 1, last_used: dt.datetime = T0,
               state: EntryState = EntryState.READY, pinned: bool = False,
               lease_until: dt.datetime | None = None) -> CacheEntry:
    return CacheEntry(
        id=entry_id or f"entry-{host}-{image_id}",
        host=host,
        image_id=image_id,
        volume_id=f"vol-{host}-{image_id}",
        size_gb=size_gb,
        image_updated_at=T0 - dt.timedelta(days=1),
        image_hash="sha512:00ff",
        state=state,
        created_at=T0,
        last_used=last_used,
        pinned=pinned,
        lease_until=lease_until,
    )


@pytest.fixture
def memory_uow() -> UnitOfWork:
    # cast: the fake's ``entries`` attribute is typed InMemoryRepository, and mypy holds a
    # protocol's settable attribute invariant (see the report on ports.UnitOfWork.entries).
    return cast(UnitOfWork, InMemoryUnitOfWork())


@pytest.fixture
def sqlite_uow(tmp_path: Path) -> Iterator[UnitOfWork]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ivcache.db'}")
    upgrade(engine)
    yield SqlUnitOfWork(engine)
    engine.dispose()


@pytest.fixture
def postgres_uow(postgres_url: str) -> Iterator[UnitOfWork]:
    engine = make_engine(postgres_url)
    upgrade(engine)
    yield SqlUnitOfWork(engine)
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def uow(request: pytest.FixtureRequest) -> UnitOfWork:
    backend: UnitOfWork = request.getfixturevalue(f"{request.param}_uow")
    return backend


def committed(uow: UnitOfWork, *entries: CacheEntry) -> None:
    with uow:
        for entry in entries:
            uow.entries.add(entry)
        uow.commit()


# -- finding and listing -----------------------------------------------------------------------

def test_an_added_entry_can_be_found_by_id_by_host_and_image_and_by_volume(
        uow: UnitOfWork) -> None:
    entry = make_entry()
    committed(uow, entry)
    with uow:
        assert uow.entries.get(entry.id) == entry
        assert uow.entries.find(NODE_1, "img-1") == entry
        assert uow.entries.find_by_volume(entry.volume_id) == entry
        assert uow.entries.get("nope") is None
        assert uow.entries.find(NODE_2, "img-1") is None
        assert uow.entries.find_by_volume("nope") is None


def test_list_filters_by_host_and_orders_by_host_then_last_used_then_id(
        uow: UnitOfWork) -> None:
    b_old = make_entry("img-1", "node-b", last_used=at(1))
    a_new = make_entry("img-2", "node-a", last_used=at(9))
    a_old_y = make_entry("img-3", "node-a", entry_id="y", last_used=at(5))
    a_old_x = make_entry("img-4", "node-a", entry_id="x", last_used=at(5))
    committed(uow, b_old, a_new, a_old_y, a_old_x)
    with uow:
        assert uow.entries.list() == [a_old_x, a_old_y, a_new, b_old]
        assert uow.entries.list(host="node-a") == [a_old_x, a_old_y, a_new]
        assert uow.entries.list(host="node-b") == [b_old]
        assert uow.entries.list(host="node-c") == []


def test_an_entry_read_back_is_a_copy_that_changes_nothing_until_saved(uow: UnitOfWork) -> None:
    committed(uow, make_entry())
    with uow:
        got = uow.entries.find(NODE_1, "img-1")
        assert got is not None
        got.hits = 99
        again = uow.entries.find(NODE_1, "img-1")
        assert again is not None
        assert again.hits == 0


# -- totals ------------------------------------------------------------------------------------

def test_add_and_remove_keep_the_host_totals_exact(uow: UnitOfWork) -> None:
    one, two = make_entry("img-1", size_gb=3), make_entry("img-2", size_gb=5)
    other_host = make_entry("img-1", "node-2", size_gb=7)
    committed(uow, one, two, other_host)
    with uow:
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=2, size_gb=8)
        assert uow.entries.totals(NODE_2) == ScopeTotals(NODE_2, count=1, size_gb=7)
        assert uow.entries.remove(one) is True
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=1, size_gb=5)
        uow.commit()
    with uow:
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=1, size_gb=5)
        assert uow.entries.list(host="node-1") == [two]


def test_removing_moves_the_totals_by_the_stored_size_not_the_callers_copy(
        uow: UnitOfWork) -> None:
    entry = make_entry(size_gb=4)
    committed(uow, entry)
    with uow:
        assert uow.entries.remove(attrs.evolve(entry, size_gb=1)) is True
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=0, size_gb=0)


def test_removing_an_entry_twice_returns_false_and_leaves_the_totals_alone(
        uow: UnitOfWork) -> None:
    entry, other = make_entry("img-1", size_gb=2), make_entry("img-2", size_gb=3)
    committed(uow, entry, other)
    with uow:
        assert uow.entries.remove(entry) is True
        assert uow.entries.remove(entry) is False
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=1, size_gb=3)


def test_count_stats_accumulate_and_a_host_never_seen_has_zero_totals(uow: UnitOfWork) -> None:
    with uow:
        assert uow.entries.totals(NODE_9) == ScopeTotals(NODE_9)
        uow.entries.count_stats(NODE_1, hits=2, misses=1)
        uow.entries.count_stats(NODE_1, hits=1, evictions=4, downloads=1,
                                bytes_downloaded=5 * 2**40, neighbour_fills=2)
        uow.commit()
    with uow:
        assert uow.entries.totals(NODE_1) == ScopeTotals(
            NODE_1, hits=3, misses=1, evictions=4, downloads=1, bytes_downloaded=5 * 2**40,
            neighbour_fills=2)


def test_all_totals_lists_every_host_with_entries_or_stats_in_host_order(
        uow: UnitOfWork) -> None:
    committed(uow, make_entry("img-1", "node-b", size_gb=2))
    with uow:
        uow.entries.count_stats(scope_of("node-a"), misses=1)
        assert uow.entries.all_totals() == [
            ScopeTotals(scope_of("node-a"), misses=1),
            ScopeTotals(scope_of("node-b"), count=1, size_gb=2),
        ]


def test_lock_scope_returns_the_hosts_current_totals(uow: UnitOfWork) -> None:
    committed(uow, make_entry("img-1", size_gb=2), make_entry("img-2", size_gb=3))
    with uow:
        assert uow.entries.lock_scope(NODE_1) == ScopeTotals(NODE_1, count=2, size_gb=5)
        assert uow.entries.lock_scope(scope_of("node-new")) == ScopeTotals(scope_of("node-new"))


# -- claims ------------------------------------------------------------------------------------

def test_a_second_claim_of_a_host_and_image_raises_and_the_transaction_goes_on(
        uow: UnitOfWork) -> None:
    first = make_entry("img-1", size_gb=2)
    committed(uow, first)
    with uow:
        rival = make_entry("img-1", entry_id="rival", size_gb=9, state=EntryState.CREATING)
        with pytest.raises(AlreadyClaimed) as raised:
            uow.entries.add(rival)
        assert (raised.value.scope, raised.value.image_id) == (NODE_1, "img-1")
        uow.entries.add(make_entry("img-2", size_gb=3))
        uow.commit()
    with uow:
        assert uow.entries.find(NODE_1, "img-1") == first
        assert uow.entries.get("rival") is None
        assert uow.entries.find(NODE_1, "img-2") is not None
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=2, size_gb=5)


def test_the_same_image_may_be_claimed_on_two_hosts(uow: UnitOfWork) -> None:
    committed(uow, make_entry("img-1", "node-1"), make_entry("img-1", "node-2"))
    with uow:
        assert [e.host for e in uow.entries.list()] == ["node-1", "node-2"]
        assert [e.image_id for e in uow.entries.list("node-2")] == ["img-1"]


# -- saving ------------------------------------------------------------------------------------

def test_save_writes_back_every_mutable_field(uow: UnitOfWork) -> None:
    entry = make_entry(state=EntryState.CREATING)
    entry.claim_expires = at(60)
    committed(uow, entry)
    changed = attrs.evolve(
        entry, state=EntryState.READY, last_used=at(30), hits=7, pinned=True,
        claim_expires=None, lease_until=at(90), image_updated_at=at(-5),
        image_hash="sha512:beef", volume_id="vol-new")
    with uow:
        uow.entries.save(changed)
        uow.commit()
    with uow:
        assert uow.entries.get(entry.id) == changed
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=1, size_gb=1)


def test_a_save_never_moves_the_size_or_the_host_totals(uow: UnitOfWork) -> None:
    # The size is fixed when the entry is added (a claim reserves it); a save writes back
    # the mutable fields only, so the totals cannot drift.
    entry = make_entry(size_gb=2)
    with uow:
        uow.entries.add(entry)
        uow.entries.save(attrs.evolve(entry, size_gb=5, hits=3))
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=1, size_gb=2)
        got = uow.entries.get(entry.id)
        assert got is not None
        assert (got.size_gb, got.hits) == (2, 3)


def test_saving_an_entry_that_is_gone_does_nothing(uow: UnitOfWork) -> None:
    with uow:
        uow.entries.save(make_entry())
        assert uow.entries.list() == []
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1)


# -- the unit of work --------------------------------------------------------------------------

def test_committed_work_is_seen_by_the_next_unit_of_work(uow: UnitOfWork) -> None:
    entry = make_entry()
    with uow:
        uow.entries.add(entry)
        uow.commit()
    with uow:
        assert uow.entries.list() == [entry]


def test_leaving_without_commit_rolls_back_entries_and_totals(uow: UnitOfWork) -> None:
    kept, doomed = make_entry("img-1", size_gb=2), make_entry("img-2", size_gb=3)
    committed(uow, kept, doomed)
    with uow:
        uow.entries.count_stats(NODE_1, hits=1)
        uow.commit()
    with uow:
        before = (uow.entries.list(), uow.entries.all_totals())
    with uow:
        uow.entries.add(make_entry("img-3", size_gb=5))
        uow.entries.add(make_entry("img-1", "node-2", size_gb=1))
        uow.entries.remove(doomed)
        uow.entries.save(attrs.evolve(kept, hits=5))
        uow.entries.count_stats(NODE_1, hits=10, misses=3)
    with uow:
        assert (uow.entries.list(), uow.entries.all_totals()) == before


def test_an_exception_in_the_block_rolls_back_and_propagates(uow: UnitOfWork) -> None:
    with pytest.raises(ZeroDivisionError), uow:
        uow.entries.add(make_entry())
        uow.entries.count_stats(NODE_1, misses=1)
        _ = 1 / 0
    with uow:
        assert uow.entries.list() == []
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1)


def test_leaving_the_block_undoes_only_the_work_since_the_last_commit(
        uow: UnitOfWork) -> None:
    with uow:
        uow.entries.add(make_entry("img-1"))
        uow.commit()
        uow.entries.add(make_entry("img-2"))
    with uow:
        assert [e.image_id for e in uow.entries.list()] == ["img-1"]
        assert uow.entries.totals(NODE_1).count == 1


def test_entering_again_on_a_thread_already_inside_is_an_error(uow: UnitOfWork) -> None:
    with uow:
        uow.entries.add(make_entry("img-1"))
        with pytest.raises(RuntimeError, match="already inside"), uow:
            pass
        # The outer block is untouched by the refused inner one.
        uow.commit()
    with uow:
        assert [e.image_id for e in uow.entries.list()] == ["img-1"]


# -- LRU victims -------------------------------------------------------------------------------

def test_lru_victims_come_least_recently_used_first_with_ties_broken_by_id(
        uow: UnitOfWork) -> None:
    # 40 entries in groups of 5 sharing a last_used: more than one batch of any SQL backend,
    # with ties across batch boundaries. Added newest first, ids against the time order.
    entries = [make_entry(f"img-{n:02}", entry_id=f"e-{99 - n:02}", last_used=at(n // 5))
               for n in reversed(range(40))]
    committed(uow, *entries)
    expected = sorted(entries, key=lambda e: (e.last_used, e.id))
    with uow:
        assert list(uow.entries.lru_victims(NODE_1, at(100))) == expected


def test_lru_victims_skip_pinned_creating_and_leased_entries(uow: UnitOfWork) -> None:
    now = at(100)
    committed(
        uow,
        make_entry("ready", last_used=at(5)),
        make_entry("pinned", last_used=at(1), pinned=True),
        make_entry("creating", last_used=at(1), state=EntryState.CREATING),
        make_entry("leased", last_used=at(1), lease_until=now + dt.timedelta(seconds=1)),
        make_entry("lease-ends-now", last_used=at(3), lease_until=now),
        make_entry("lease-ended", last_used=at(4), lease_until=now - dt.timedelta(hours=1)),
    )
    with uow:
        victims = [e.image_id for e in uow.entries.lru_victims(NODE_1, now)]
    assert victims == ["lease-ends-now", "lease-ended", "ready"]


def test_lru_victims_are_taken_from_one_host_only(uow: UnitOfWork) -> None:
    committed(uow, make_entry("img-1", "node-1", last_used=at(2)),
              make_entry("img-2", "node-2", last_used=at(1)))
    with uow:
        assert [e.image_id for e in uow.entries.lru_victims(NODE_1, at(9))] == ["img-1"]
        assert list(uow.entries.lru_victims(NODE_3, at(9))) == []


def test_removing_victims_while_iterating_evicts_each_one_once(uow: UnitOfWork) -> None:
    entries = [make_entry(f"img-{n:02}", size_gb=1, last_used=at(n)) for n in range(40)]
    committed(uow, *entries)
    evicted = []
    with uow:
        for victim in uow.entries.lru_victims(NODE_1, at(100)):
            if uow.entries.totals(NODE_1).count <= 10:
                break
            assert uow.entries.remove(victim)
            evicted.append(victim.image_id)
        uow.commit()
    assert evicted == [e.image_id for e in entries[:30]]
    with uow:
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=10, size_gb=10)


# -- time --------------------------------------------------------------------------------------

def test_timestamps_round_trip_as_aware_utc_to_the_microsecond(uow: UnitOfWork) -> None:
    stamp = dt.datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=dt.UTC)
    entry = attrs.evolve(make_entry(), created_at=stamp, last_used=stamp,
                         image_updated_at=stamp, claim_expires=stamp, lease_until=stamp)
    bare = attrs.evolve(make_entry("img-2"), image_updated_at=None)
    committed(uow, entry, bare)
    with uow:
        got, got_bare = uow.entries.get(entry.id), uow.entries.get(bare.id)
    assert got is not None
    assert got == entry
    assert got_bare == bare
    for value in (got.created_at, got.last_used, got.image_updated_at, got.claim_expires,
                  got.lease_until):
        assert value is not None
        assert value.utcoffset() == dt.timedelta(0)


def test_end_lease_clears_only_the_lease_it_is_given(uow: UnitOfWork) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    mine, theirs = now + dt.timedelta(seconds=30), now + dt.timedelta(seconds=60)
    entry = CacheEntry(id="e1", host="h", image_id="i", volume_id="v", size_gb=1,
                       image_updated_at=now, image_hash=None, state=EntryState.READY,
                       created_at=now, last_used=now, lease_until=theirs)
    with uow:
        uow.entries.add(entry)
        uow.commit()
    with uow:
        uow.entries.end_lease("e1", scope_of("h"), mine)  # someone else's lease stands
        uow.commit()
    with uow:
        found = uow.entries.get("e1")
        assert found is not None and found.lease_until == theirs
        uow.entries.end_lease("e1", scope_of("h"), theirs)
        uow.commit()
    with uow:
        found = uow.entries.get("e1")
        assert found is not None and found.lease_until is None


def test_end_lease_of_a_hit_counts_it_on_the_entry_and_its_host(uow: UnitOfWork) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    mine, theirs = now + dt.timedelta(seconds=30), now + dt.timedelta(seconds=60)
    committed(uow, make_entry(lease_until=theirs))
    with uow:
        uow.entries.lock_scope(NODE_1)
        uow.commit()
    with uow:
        uow.entries.end_lease("entry-node-1-img-1", NODE_1, mine, hit=True)
        uow.entries.end_lease("entry-node-1-img-1", NODE_1, theirs, hit=True)
        uow.entries.end_lease("gone", NODE_1, mine, hit=True)  # the hit still counts
        uow.commit()
    with uow:
        found = uow.entries.get("entry-node-1-img-1")
        assert found is not None and (found.hits, found.lease_until) == (2, None)
        assert uow.entries.totals(NODE_1).hits == 3


# -- volumes being written (volume upload refuses them) ------------------------------------

def test_a_volume_is_being_written_from_its_mark_until_it_ends_or_expires(
        uow: UnitOfWork) -> None:
    with uow:
        uow.entries.mark_writing("vol-1", "node-1", at(60))
        uow.entries.mark_writing("vol-2", "node-1", at(60))
        uow.commit()
    with uow:
        assert uow.entries.writing("vol-1", at(0)) and uow.entries.writing("vol-2", at(0))
        assert not uow.entries.writing("vol-1", at(61))  # its writer died: the mark lapsed
        assert not uow.entries.writing("vol-3", at(0))
        uow.entries.end_writing("vol-1")
        uow.entries.mark_writing("vol-2", "node-2", at(120))  # marked again: the later one
        uow.commit()
    with uow:
        assert not uow.entries.writing("vol-1", at(0))
        assert uow.entries.writing("vol-2", at(90))
        uow.entries.end_writing("vol-2")  # not committed: rolled back
    with uow:
        assert uow.entries.writing("vol-2", at(90))

"""The repository contract: the same behaviour from every ``UnitOfWork`` implementation.

Each test runs once per backend in ``BACKENDS``. A backend is a fixture named
``<name>_uow`` that returns a fresh, empty, upgraded unit of work; to add one (PostgreSQL),
write its fixture and add ``pytest.param("postgres", marks=pytest.mark.postgres)`` below.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
from sqlalchemy import event, insert, text

from ivcache.adapters.memory import InMemoryUnitOfWork
from ivcache.adapters.sql import SqlUnitOfWork, make_engine, upgrade
from ivcache.adapters.sql.tables import cache_entries
from ivcache.core.errors import AlreadyClaimed
from ivcache.core.model import (
    BadImage,
    CacheEntry,
    EntryState,
    Lease,
    ScopeTotals,
    VolumeWrite,
)
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
    """Add the entries; one whose ``lease_until`` is set gets a lease running to then."""
    with uow:
        for entry in entries:
            uow.entries.add(entry)
            if entry.lease_until is not None:
                uow.entries.take_lease(lease_of(entry, entry.lease_until))
        uow.commit()


def lease_of(entry: CacheEntry, until: dt.datetime, owner: str = "node-1:100.7",
             lease_id: str | None = None) -> Lease:
    return Lease(lease_id or f"lease-{entry.id}", entry.id, owner, until)


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
        entry, state=EntryState.READY, last_used=at(30), pinned=True,
        claim_expires=None, claim_owner="node-1:42.4242", image_updated_at=at(-5),
        image_hash="sha512:beef", volume_id="vol-new", fill_seconds=2.5)
    with uow:
        # lease_until is the leases', never saved
        uow.entries.save(attrs.evolve(changed, lease_until=at(90)))
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
        uow.entries.save(attrs.evolve(entry, size_gb=5, pinned=True))
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=1, size_gb=2)
        got = uow.entries.get(entry.id)
        assert got is not None
        assert (got.size_gb, got.pinned) == (2, True)


def test_a_save_of_an_entry_read_before_a_hit_ended_keeps_the_hit_and_its_savings(
        uow: UnitOfWork) -> None:
    # The counters are end_lease's: a save of an older copy (a lease taken, under the
    # scope's lock, while another clone's hit ended without it) must not undo that hit.
    entry = make_entry()
    committed(uow, entry)
    with uow:
        stale = uow.entries.get(entry.id)
    with uow:
        uow.entries.end_lease(lease_of(entry, at(5)), NODE_1, hit=True, bytes_saved=1000,
                              seconds_saved=1.5)
        uow.commit()
    assert stale is not None
    with uow:
        uow.entries.save(attrs.evolve(stale, hits=0, bytes_saved=0, seconds_saved=0.0,
                                      last_used=at(9)))
        uow.commit()
    with uow:
        got = uow.entries.get(entry.id)
        assert got is not None
        assert (got.hits, got.bytes_saved, got.seconds_saved, got.last_used) == (
            1, 1000, 1.5, at(9))


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
        uow.entries.save(attrs.evolve(kept, pinned=True))
        uow.entries.take_lease(lease_of(kept, at(1), lease_id="new"))
        uow.entries.end_lease(lease_of(kept, at(1)), NODE_1, hit=True, bytes_saved=7,
                              seconds_saved=0.5)
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


# -- gdsf: priority victims and the aging value -------------------------------------------------

def test_priority_victims_come_lowest_priority_first_then_least_recently_used_then_by_id(
        uow: UnitOfWork) -> None:
    # 60 entries: priorities shared by groups of 12, last_used shared by pairs within them,
    # more than one batch of any SQL backend and ties across batch boundaries; added in an
    # order that matches none of the three keys.
    entries = [attrs.evolve(make_entry(f"img-{n:02}", entry_id=f"e-{(n * 37) % 60:02}",
                                       last_used=at((n // 2) % 6)),
                            priority=float(4 - n // 12) / 3, fill_seconds=float(n))
               for n in range(60)]
    committed(uow, *reversed(entries))
    expected = sorted(entries, key=lambda e: (e.priority, e.last_used, e.id))
    with uow:
        assert list(uow.entries.priority_victims(NODE_1, at(100))) == expected


def test_priority_victims_skip_pinned_creating_and_leased_entries(uow: UnitOfWork) -> None:
    now = at(100)

    def ranked(entry: CacheEntry, priority: float) -> CacheEntry:
        return attrs.evolve(entry, priority=priority)

    committed(
        uow,
        ranked(make_entry("ready"), 5),
        ranked(make_entry("pinned", pinned=True), 1),
        ranked(make_entry("creating", state=EntryState.CREATING), 1),
        ranked(make_entry("leased", lease_until=now + dt.timedelta(seconds=1)), 1),
        ranked(make_entry("lease-ends-now", lease_until=now), 3),
        ranked(make_entry("lease-ended", lease_until=now - dt.timedelta(hours=1)), 4),
    )
    with uow:
        victims = [e.image_id for e in uow.entries.priority_victims(NODE_1, now)]
    assert victims == ["lease-ends-now", "lease-ended", "ready"]


def test_priority_victims_are_taken_from_one_scope_only(uow: UnitOfWork) -> None:
    committed(uow, attrs.evolve(make_entry("img-1", "node-1"), priority=2.0),
              attrs.evolve(make_entry("img-2", "node-2"), priority=1.0))
    with uow:
        assert [e.image_id for e in uow.entries.priority_victims(NODE_1, at(9))] == ["img-1"]
        assert list(uow.entries.priority_victims(NODE_3, at(9))) == []


def test_removing_priority_victims_while_iterating_evicts_each_one_once(
        uow: UnitOfWork) -> None:
    entries = [attrs.evolve(make_entry(f"img-{n:02}"), priority=float(n // 3))
               for n in range(40)]
    committed(uow, *entries)
    evicted = []
    with uow:
        for victim in uow.entries.priority_victims(NODE_1, at(100)):
            if uow.entries.totals(NODE_1).count <= 10:
                break
            assert uow.entries.remove(victim)
            evicted.append(victim.image_id)
        uow.commit()
    assert evicted == [e.image_id for e in entries[:30]]


def test_the_fill_time_and_the_priority_are_stored_and_saved(uow: UnitOfWork) -> None:
    entry = attrs.evolve(make_entry(), fill_seconds=12.345678, priority=1 / 3)
    unmeasured = make_entry("img-2")
    committed(uow, entry, unmeasured)
    with uow:
        assert uow.entries.get(entry.id) == entry
        got = uow.entries.get(unmeasured.id)
        assert got is not None and (got.fill_seconds, got.priority) == (None, 0.0)
        uow.entries.save(attrs.evolve(got, fill_seconds=0.5, priority=2.5e9))
        uow.commit()
    with uow:
        again = uow.entries.get(unmeasured.id)
    assert again is not None and (again.fill_seconds, again.priority) == (0.5, 2.5e9)


def test_the_aging_value_is_kept_per_scope_on_its_totals(uow: UnitOfWork) -> None:
    with uow:
        assert uow.entries.lock_scope(NODE_1).gdsf_age == 0.0
        uow.entries.set_gdsf_age(NODE_1, 41.25)
        uow.entries.count_stats(NODE_1, evictions=1)
        uow.commit()
    with uow:
        assert uow.entries.lock_scope(NODE_1).gdsf_age == 41.25
        assert uow.entries.totals(NODE_2).gdsf_age == 0.0
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, evictions=1, gdsf_age=41.25)
    with uow:
        uow.entries.set_gdsf_age(NODE_1, 99.0)  # not committed: rolled back
    with uow:
        assert uow.entries.totals(NODE_1).gdsf_age == 41.25


@pytest.mark.parametrize("dialect", ["sqlite",
                                     pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_priority_victim_queries_walk_the_scope_priority_index_without_a_sort(
        request: pytest.FixtureRequest, dialect: str) -> None:
    sql_uow: SqlUnitOfWork = request.getfixturevalue(f"{dialect}_uow")
    engine = sql_uow.engine
    rows = [{"id": f"e-{h}-{n:04}", "host": f"node-{h}", "backend": "default",
             "pool": "default", "scope": scope_of(f"node-{h}"), "image_id": f"img-{n:04}",
             "volume_id": f"vol-{h}-{n:04}", "size_gb": 1, "state": "ready",
             "created_at": T0, "last_used": T0 + dt.timedelta(seconds=n % 7),
             "priority": float(n % 50), "fill_seconds": float(n)}
            for h in range(20) for n in range(500)]
    with engine.begin() as conn:  # seeded in bulk: only the reads are under test
        conn.execute(insert(cache_entries), rows)
        conn.execute(text("ANALYZE"))
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM cache_entries" in statement:
            seen.append((statement, parameters))

    small_batches = SqlUnitOfWork(engine, lru_batch=16)
    event.listen(engine, "before_cursor_execute", record)
    with small_batches:
        victims = small_batches.entries.priority_victims(NODE_3, T0 + dt.timedelta(days=1))
        taken = [next(victims) for _ in range(40)]  # three pages: the first, two keyset pages
    event.remove(engine, "before_cursor_execute", record)
    assert [v.host for v in taken] == ["node-3"] * 40
    assert [v.priority for v in taken] == sorted(v.priority for v in taken)
    assert len(seen) == 3
    with engine.connect() as conn:
        for sql, params in seen:
            if dialect == "sqlite":
                plan = " ".join(row[3] for row in
                                conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
                assert "USING INDEX ix_cache_entries_scope_priority_last_used_id" in plan, plan
                assert "TEMP B-TREE" not in plan, plan  # the order comes from the index
            else:
                plan = "\n".join(row[0] for row in
                                 conn.exec_driver_sql(f"EXPLAIN {sql}", params))
                assert "ix_cache_entries_scope_priority_last_used_id" in plan, plan
                # (cache_leases may be scanned: the planner scans a table that small)
                assert "Seq Scan on cache_entries" not in plan, plan
                assert "Sort" not in plan, plan  # the order comes straight off the index


# -- time --------------------------------------------------------------------------------------

def test_timestamps_round_trip_as_aware_utc_to_the_microsecond(uow: UnitOfWork) -> None:
    stamp = dt.datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=dt.UTC)
    entry = attrs.evolve(make_entry(), created_at=stamp, last_used=stamp,
                         image_updated_at=stamp, claim_expires=stamp, lease_until=stamp,
                         claim_owner="node-1:1.2")
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


def test_end_lease_drops_only_the_lease_it_is_given(uow: UnitOfWork) -> None:
    # Two clones read one entry: the first to end leaves the other's lease standing (one
    # lease_until per entry once let the first clone's end clear both).
    entry = make_entry()
    mine, theirs = lease_of(entry, at(60), lease_id="mine"), lease_of(entry, at(30),
                                                                       lease_id="theirs")
    committed(uow, entry)
    with uow:
        uow.entries.take_lease(mine)
        uow.entries.take_lease(theirs)
        uow.commit()
    with uow:
        found = uow.entries.get(entry.id)
        assert found is not None and found.lease_until == at(60)
        uow.entries.end_lease(mine, NODE_1)
        uow.commit()
    with uow:
        found = uow.entries.get(entry.id)
        assert found is not None and found.lease_until == at(30)  # theirs still holds
        assert uow.entries.leases(entry.id, at(0)) == [theirs]
        assert [e.id for e in uow.entries.lru_victims(NODE_1, at(0))] == []
        uow.entries.end_lease(theirs, NODE_1)
        uow.commit()
    with uow:
        found = uow.entries.get(entry.id)
        assert found is not None and found.lease_until is None
        assert [e.id for e in uow.entries.lru_victims(NODE_1, at(0))] == [entry.id]


def test_end_lease_of_a_hit_counts_it_on_the_entry_and_its_host(uow: UnitOfWork) -> None:
    entry = make_entry()
    mine, theirs = lease_of(entry, at(30), lease_id="mine"), lease_of(entry, at(60),
                                                                       lease_id="theirs")
    committed(uow, entry)
    with uow:
        uow.entries.lock_scope(NODE_1)
        uow.entries.take_lease(mine)
        uow.entries.take_lease(theirs)
        uow.commit()
    with uow:
        uow.entries.end_lease(mine, NODE_1, hit=True)
        uow.entries.end_lease(theirs, NODE_1, hit=True)
        gone = attrs.evolve(mine, id="gone-lease", entry_id="gone")
        uow.entries.end_lease(gone, NODE_1, hit=True)  # the hit still counts
        uow.commit()
    with uow:
        found = uow.entries.get(entry.id)
        assert found is not None and (found.hits, found.lease_until) == (2, None)
        assert uow.entries.totals(NODE_1).hits == 3


def test_leased_lists_a_scopes_running_leases_and_drop_leases_forgets_them(
        uow: UnitOfWork) -> None:
    one, two, other = make_entry("img-1"), make_entry("img-2"), make_entry("img-1", "node-2")
    committed(uow, one, two, other)
    running = lease_of(one, at(60), lease_id="a")
    lapsed = lease_of(two, at(5), lease_id="b")
    elsewhere = lease_of(other, at(60), lease_id="c")
    with uow:
        for lease in (running, lapsed, elsewhere):
            uow.entries.take_lease(lease)
        uow.commit()
    with uow:
        assert uow.entries.leased(NODE_1, at(10)) == [running]
        assert uow.entries.leases(two.id, at(10)) == []
        assert uow.entries.leases(two.id, at(0)) == [lapsed]
        uow.entries.drop_leases(["a", "missing"])
        uow.commit()
    with uow:
        assert uow.entries.leased(NODE_1, at(0)) == [lapsed]
        assert uow.entries.leased(NODE_2, at(0)) == [elsewhere]
        assert uow.entries.remove(other)  # an entry's leases go with it
        uow.commit()
    with uow:
        assert uow.entries.leased(NODE_2, at(0)) == []


def test_a_beat_moves_on_only_the_owners_own_live_claims_leases_and_writes(
        uow: UnitOfWork) -> None:
    me, them = "node-1:100.7", "node-1:200.9"
    mine = attrs.evolve(make_entry("img-1", state=EntryState.CREATING), claim_owner=me,
                        claim_expires=at(15))
    theirs = attrs.evolve(make_entry("img-2", state=EntryState.CREATING), claim_owner=them,
                          claim_expires=at(15))
    ready = attrs.evolve(make_entry("img-3"), claim_owner=me)
    committed(uow, mine, theirs, ready)
    with uow:
        uow.entries.take_lease(lease_of(ready, at(15), me, "my-lease"))
        uow.entries.take_lease(lease_of(ready, at(15), them, "their-lease"))
        uow.entries.mark_writing(VolumeWrite("vol-a", me, at(15)))
        uow.entries.mark_writing(VolumeWrite("vol-b", them, at(15)))
        uow.commit()
    with uow:
        uow.entries.beat(me, at(30), claims=[mine.id, theirs.id, ready.id],
                         leases=["my-lease", "their-lease"], writes=["vol-a", "vol-b"])
        uow.commit()
    with uow:
        got_mine, got_theirs = uow.entries.get(mine.id), uow.entries.get(theirs.id)
        got_ready = uow.entries.get(ready.id)
        assert got_mine is not None and got_mine.claim_expires == at(30)
        assert got_theirs is not None and got_theirs.claim_expires == at(15)
        assert got_ready is not None and got_ready.claim_expires is None
        assert {(lease.id, lease.until) for lease in uow.entries.leases(ready.id, at(0))} == {
            ("my-lease", at(30)), ("their-lease", at(15))}
        assert uow.entries.writes() == [VolumeWrite("vol-a", me, at(30)),
                                        VolumeWrite("vol-b", them, at(15))]


def test_the_savings_of_hits_add_up_on_the_entry_and_its_scope(uow: UnitOfWork) -> None:
    committed(uow, make_entry("img-1"), make_entry("img-2"))
    with uow:
        uow.entries.lock_scope(NODE_1)
        uow.commit()
    with uow:
        first, second = make_entry("img-1"), make_entry("img-2")
        uow.entries.end_lease(lease_of(first, at(1)), NODE_1, hit=True,
                              bytes_saved=3 * 2**40, seconds_saved=2.25)
        uow.entries.end_lease(lease_of(first, at(1)), NODE_1, hit=True,
                              bytes_saved=3 * 2**40, seconds_saved=1.5)
        uow.entries.end_lease(lease_of(second, at(1)), NODE_1, hit=True,
                              bytes_saved=10, seconds_saved=-0.25)
        uow.entries.end_lease(lease_of(second, at(1)), NODE_1)  # no hit: no savings
        uow.commit()
    with uow:
        one, two = uow.entries.get("entry-node-1-img-1"), uow.entries.get("entry-node-1-img-2")
        assert one is not None and two is not None
        assert (one.hits, one.bytes_saved, one.seconds_saved) == (2, 6 * 2**40, 3.75)
        assert (two.hits, two.bytes_saved, two.seconds_saved) == (1, 10, -0.25)
        totals = uow.entries.totals(NODE_1)
        assert (totals.hits, totals.bytes_saved, totals.seconds_saved) == (
            3, 6 * 2**40 + 10, 3.5)
        # An evicted entry's savings stay in its scope's ledger.
        assert uow.entries.remove(one)
        assert uow.entries.totals(NODE_1).bytes_saved == 6 * 2**40 + 10


# -- volumes being written (volume upload refuses them) ------------------------------------

def test_a_volume_is_being_written_from_its_mark_until_it_ends(uow: UnitOfWork) -> None:
    with uow:
        uow.entries.mark_writing(VolumeWrite("vol-1", "node-1:1.1", at(60)))
        uow.entries.mark_writing(VolumeWrite("vol-2", "node-1:1.1", at(60)))
        uow.commit()
    with uow:
        # A lapsed mark is still listed: its writer died, its volume is half-written.
        assert [w.volume_id for w in uow.entries.writes()] == ["vol-1", "vol-2"]
        uow.entries.end_writing("vol-1")
        # marked again: the later mark is the one
        uow.entries.mark_writing(VolumeWrite("vol-2", "node-2:2.2", at(120)))
        uow.commit()
    with uow:
        assert uow.entries.writes() == [VolumeWrite("vol-2", "node-2:2.2", at(120))]
        uow.entries.end_writing("vol-2")  # not committed: rolled back
    with uow:
        assert uow.entries.writes() == [VolumeWrite("vol-2", "node-2:2.2", at(120))]


# -- the negative cache (images whose data failed verification) ---------------------------

def test_a_bad_image_is_remembered_per_scope_and_content_until_it_expires(
        uow: UnitOfWork) -> None:
    bad = BadImage("sha512:00ff", "ChecksumMismatch", "image img-1: corrupt", at(300))
    with uow:
        uow.entries.mark_bad(NODE_1, "img-1", bad, T0)
        uow.commit()
    with uow:
        assert uow.entries.bad(NODE_1, "img-1", "sha512:00ff", at(299)) == bad
        assert uow.entries.bad(NODE_1, "img-1", "sha512:00ff", at(300)) is None
        # Another content of the image, another image, another scope: nothing known.
        assert uow.entries.bad(NODE_1, "img-1", "sha512:abcd", T0) is None
        assert uow.entries.bad(NODE_1, "img-2", "sha512:00ff", T0) is None
        assert uow.entries.bad(NODE_2, "img-1", "sha512:00ff", T0) is None


def test_a_new_finding_replaces_the_last_and_forget_bad_drops_it(uow: UnitOfWork) -> None:
    later = BadImage("sha512:abcd", "UnsafeImage", "image img-1: a backing file", at(600))
    with uow:
        uow.entries.mark_bad(NODE_1, "img-1",
                             BadImage("sha512:00ff", "ChecksumMismatch", "corrupt", at(300)),
                             T0)
        uow.entries.mark_bad(NODE_1, "img-1", later, at(10))
        uow.commit()
    with uow:
        assert uow.entries.bad(NODE_1, "img-1", "sha512:00ff", at(20)) is None
        assert uow.entries.bad(NODE_1, "img-1", "sha512:abcd", at(20)) == later
        assert uow.entries.forget_bad(NODE_1, "img-1")
        assert not uow.entries.forget_bad(NODE_1, "img-1")
        uow.commit()
    with uow:
        assert uow.entries.bad(NODE_1, "img-1", "sha512:abcd", at(20)) is None


def test_marking_an_image_bad_drops_expired_findings_and_is_rolled_back_uncommitted(
        uow: UnitOfWork) -> None:
    with uow:
        uow.entries.mark_bad(NODE_1, "old", BadImage("c", "CorruptImage", "r", at(10)), T0)
        uow.commit()
    with uow:
        uow.entries.mark_bad(NODE_2, "new", BadImage("c", "CorruptImage", "r", at(100)),
                             at(50))
        uow.commit()
    with uow:
        # Expired either way; gone from the table too, so forgetting finds nothing.
        assert not uow.entries.forget_bad(NODE_1, "old")
        uow.entries.forget_bad(NODE_2, "new")  # not committed: rolled back
    with uow:
        assert uow.entries.bad(NODE_2, "new", "c", at(60)) is not None

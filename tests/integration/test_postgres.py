"""What only PostgreSQL has to prove: its query plans, its row locks, its URLs.

Everything else the SQL adapter does is tested on both databases in
``test_sql_repository.py`` and ``test_repository_contract.py``.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, insert, make_url, text

from ivcache.adapters.sql import SqlUnitOfWork, make_engine, upgrade
from ivcache.adapters.sql.tables import cache_entries, cache_leases
from ivcache.core.errors import ConfigError
from ivcache.core.model import CacheEntry, EntryState, Lease
from tests.support.scopes import scope_of

pytestmark = pytest.mark.postgres

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
NODE_1 = scope_of("node-1")
NODE_2 = scope_of("node-2")
NODE_3 = scope_of("node-3")


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def make_entry(image_id: str, host: str = "node-1") -> CacheEntry:
    return CacheEntry(
        id=f"entry-{host}-{image_id}", host=host, image_id=image_id,
        volume_id=f"vol-{host}-{image_id}", size_gb=1, image_updated_at=None,
        image_hash=None, state=EntryState.READY, created_at=T0, last_used=T0)


def test_a_bare_postgresql_url_is_served_by_psycopg_3(postgres_url: str) -> None:
    bare = make_url(postgres_url).set(drivername="postgresql")
    engine = make_engine(bare)
    try:
        assert engine.dialect.driver == "psycopg"
        upgrade(engine)
    finally:
        engine.dispose()


def test_a_server_that_cannot_be_reached_is_a_one_line_config_error_without_password() -> None:
    url = "postgresql+psycopg://ivcache:s3cret@127.0.0.1:1/ivcache?connect_timeout=2"
    with pytest.raises(ConfigError) as raised:
        upgrade(url)
    message = str(raised.value)
    assert "\n" not in message
    assert "127.0.0.1:1/ivcache" in message and "s3cret" not in message


def test_the_lru_victim_queries_are_index_scans_without_a_sort_or_a_seq_scan(
        engine: Engine) -> None:
    hosts = [f"node-{n}" for n in range(20)]
    rows = [{"id": f"e-{h}-{n:04}", "host": h, "backend": "default", "pool": "default",
             "scope": scope_of(h), "image_id": f"img-{n:04}",
             "volume_id": f"vol-{h}-{n:04}", "size_gb": 1, "state": "ready",
             "created_at": T0, "last_used": T0 + dt.timedelta(seconds=n % 700)}
            for h in hosts for n in range(500)]
    # Every other entry was cloned from before: its lease row is there, long lapsed.
    leases = [{"id": f"l-{row['id']}", "entry_id": row["id"], "owner": "node-1:1.1",
               "until": T0} for row in rows[::2]]
    with engine.begin() as conn:  # seeded in bulk: only the reads are under test
        conn.execute(insert(cache_entries), rows)
        conn.execute(insert(cache_leases), leases)
        conn.execute(text("ANALYZE cache_entries"))
        conn.execute(text("ANALYZE cache_leases"))
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM cache_entries" in statement:
            seen.append((statement, parameters))

    small_batches = SqlUnitOfWork(engine, lru_batch=16)
    event.listen(engine, "before_cursor_execute", record)
    with small_batches:
        victims = small_batches.entries.lru_victims(NODE_3, T0 + dt.timedelta(days=1))
        taken = [next(victims) for _ in range(40)]  # three pages: the first, two keyset pages
    event.remove(engine, "before_cursor_execute", record)
    assert [v.host for v in taken] == ["node-3"] * 40
    assert len(seen) == 3
    with engine.connect() as conn:
        for sql, params in seen:
            plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}", params))
            assert "ix_cache_entries_scope_last_used_id" in plan, plan
            assert "ix_cache_leases_entry_id_until" in plan, plan  # a probe per entry
            assert "Seq Scan" not in plan, plan
            assert "Sort" not in plan, plan  # the order comes straight off the index


def test_the_running_leases_of_a_scope_are_read_off_the_until_index(engine: Engine) -> None:
    # What making room reads when no victim is free: the clones running now, a few, never
    # the 10,000 lapsed leases of the past nor the scope's entries.
    rows = [{"id": f"e-{n:05}", "host": "node-1", "backend": "default", "pool": "default",
             "scope": NODE_1, "image_id": f"img-{n:05}", "volume_id": f"vol-{n:05}",
             "size_gb": 1, "state": "ready", "created_at": T0, "last_used": T0}
            for n in range(10_000)]
    leases = [{"id": f"l-{n:05}", "entry_id": f"e-{n:05}", "owner": "node-1:1.1",
               "until": T0 + dt.timedelta(seconds=60 if n % 1000 == 0 else -60)}
              for n in range(10_000)]
    with engine.begin() as conn:
        conn.execute(insert(cache_entries), rows)
        conn.execute(insert(cache_leases), leases)
        conn.execute(text("ANALYZE cache_entries"))
        conn.execute(text("ANALYZE cache_leases"))
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    uow = SqlUnitOfWork(engine)
    event.listen(engine, "before_cursor_execute", record)
    with uow:
        running = uow.entries.leased(NODE_1, T0)
    event.remove(engine, "before_cursor_execute", record)
    assert [lease.entry_id for lease in running] == [f"e-{n:05}" for n in range(0, 10_000,
                                                                                  1000)]
    [(sql, params)] = seen
    with engine.connect() as conn:
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}", params))
    assert "ix_cache_leases_until" in plan, plan
    assert "Seq Scan" not in plan, plan


def test_lock_scope_makes_a_second_transaction_wait_and_then_see_the_first_ones_work(
        engine: Engine) -> None:
    first, second = SqlUnitOfWork(engine), SqlUnitOfWork(engine)
    locked = threading.Event()
    seen: list[int] = []
    waited: list[float] = []

    def other() -> None:
        locked.wait(10)
        started = time.monotonic()
        with second:
            seen.append(second.entries.lock_scope(NODE_1).count)
            waited.append(time.monotonic() - started)
            second.commit()

    thread = threading.Thread(target=other)
    thread.start()
    with first:
        assert first.entries.lock_scope(NODE_1).count == 0
        locked.set()
        time.sleep(0.5)  # the other transaction is now queued on the row lock
        assert seen == []
        first.entries.add(make_entry("img-1"))
        first.commit()
    thread.join(10)
    # READ COMMITTED: after the wait, the upsert that locks the row reads the committed one.
    assert seen == [1]
    assert waited[0] >= 0.4


def test_first_locks_of_a_new_scope_and_ends_of_hits_racing_neither_deadlock_nor_lose_counts(
        engine: Engine) -> None:
    # The scope's totals row does not exist yet: every worker's first lock may be the one
    # that makes it. Then leases (lock, save the entry) race with ends of hits (the totals
    # row and the entry's, in one statement), as the hits of one image do.
    uow = SqlUnitOfWork(engine)
    workers, rounds = 8, 25
    start = threading.Barrier(workers)
    errors: list[BaseException] = []
    hot = make_entry("hot", host="node-3")

    def work(n: int) -> None:
        try:
            start.wait(10)
            for r in range(rounds):
                with uow:
                    uow.entries.lock_scope(NODE_3)
                    if r == 0:
                        uow.entries.add(make_entry(f"img-{n}", host="node-3"))
                        if n == 0:
                            uow.entries.add(hot)
                    leased = uow.entries.get(hot.id)
                    lease = Lease(f"lease-{n}-{r}", hot.id, f"node-3:{n}.1", T0)
                    if leased is not None:
                        leased.last_used = T0
                        uow.entries.save(leased)
                        uow.entries.take_lease(lease)
                    uow.commit()
                with uow:
                    uow.entries.end_lease(lease, NODE_3, hit=True)
                    uow.commit()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with uow:
        uow.entries.lock_scope(NODE_1)  # another scope's row only
        uow.commit()
    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with uow:
        totals = uow.entries.totals(NODE_3)
    assert (totals.count, totals.hits) == (workers + 1, workers * rounds)


def test_lock_scope_on_one_host_does_not_hold_up_another_host(engine: Engine) -> None:
    first, second = SqlUnitOfWork(engine), SqlUnitOfWork(engine)
    with first:
        first.entries.lock_scope(NODE_1)
        done = threading.Event()

        def other() -> None:
            with second:
                second.entries.lock_scope(NODE_2)
                second.entries.add(make_entry("img-1", host="node-2"))
                second.commit()
            done.set()

        thread = threading.Thread(target=other)
        thread.start()
        assert done.wait(5), "node-2 waited for node-1's lock"
        first.commit()
    thread.join(5)


def test_the_quota_lock_makes_a_claim_on_another_host_wait_and_is_never_a_scopes_totals(
        engine: Engine) -> None:
    first, second = SqlUnitOfWork(engine), SqlUnitOfWork(engine)
    locked = threading.Event()
    waited: list[float] = []

    def other() -> None:
        locked.wait(10)
        started = time.monotonic()
        with second:
            second.entries.lock_scope(NODE_2)
            second.entries.lock_quota()
            waited.append(time.monotonic() - started)
            second.commit()

    thread = threading.Thread(target=other)
    thread.start()
    with first:
        first.entries.lock_scope(NODE_1)
        first.entries.lock_quota()
        locked.set()
        time.sleep(0.5)  # the other host's claim is now queued on the quota's lock
        first.entries.add(make_entry("img-1"))
        first.commit()
    thread.join(10)
    assert waited[0] >= 0.4
    with first:
        assert [t.scope for t in first.entries.all_totals()] == sorted([NODE_1, NODE_2])

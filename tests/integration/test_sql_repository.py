"""The SQL adapter on SQLite and PostgreSQL: schema and migrations, engine set-up, query plans,
concurrency.

What every repository must do is in ``test_repository_contract.py``; this module holds what
only the SQL adapter has to prove.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, insert, inspect, text
from sqlalchemy.exc import StatementError

import ivcache.adapters.sql
from ivcache.adapters.sql import (
    SqlCacheRepository,
    SqlUnitOfWork,
    current_revision,
    head_revision,
    make_engine,
    upgrade,
)
from ivcache.adapters.sql.engine import HEAD_REVISION, _alembic_config
from ivcache.adapters.sql.repository import LRU_BATCH
from ivcache.adapters.sql.tables import cache_entries, metadata
from ivcache.core.errors import AlreadyClaimed, ConfigError
from ivcache.core.model import CacheEntry, EntryState, ScopeTotals
from ivcache.core.ports import CacheRepository, UnitOfWork
from tests.support.scopes import scope_of

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
NODE_1 = scope_of("node-1")
NODE_2 = scope_of("node-2")


def make_entry(image_id: str = "img-1", host: str = "node-1", *, size_gb: int = 1,
               last_used: dt.datetime = T0) -> CacheEntry:
    return CacheEntry(
        id=f"entry-{host}-{image_id}", host=host, image_id=image_id,
        volume_id=f"vol-{host}-{image_id}", size_gb=size_gb, image_updated_at=None,
        image_hash=None, state=EntryState.READY, created_at=T0, last_used=last_used)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new database; each test that takes it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ivcache.db'}"
    pg_url: str = request.getfixturevalue("postgres_url")
    return pg_url


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """For what only SQLite has (pragmas, BEGIN IMMEDIATE, its query planner)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'sqlite-only.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def uow(engine: Engine) -> SqlUnitOfWork:
    return SqlUnitOfWork(engine)


class Statements:
    """The SQL statements an engine runs, with their parameters, while recording."""

    def __init__(self, engine: Engine) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.recording = False
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> None:
        if self.recording:
            self.seen.append((statement, parameters))

    def selects_from_entries(self) -> list[tuple[str, Any]]:
        return [(s, p) for s, p in self.seen
                if s.lstrip().upper().startswith("SELECT") and "FROM cache_entries" in s]


# -- the package -------------------------------------------------------------------------------

def test_the_package_exports_its_public_names() -> None:
    assert sorted(ivcache.adapters.sql.__all__) == [
        "SqlCacheRepository", "SqlUnitOfWork", "current_revision", "head_revision",
        "make_engine", "upgrade",
    ]


def test_the_sql_classes_fit_the_ports(uow: SqlUnitOfWork) -> None:
    port: UnitOfWork = uow  # mypy proves the fit; this proves it runs
    with port:
        repo: CacheRepository = port.entries
        assert isinstance(repo, SqlCacheRepository)
        assert repo.totals(NODE_1) == ScopeTotals(NODE_1)


# -- schema and migrations ---------------------------------------------------------------------

def test_an_up_to_date_database_is_told_without_alembic_and_an_older_one_is_migrated(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    upgrade(url, "0007")
    calls: list[str] = []
    real = command.upgrade

    def counted(config: Any, revision: str) -> None:
        calls.append(revision)
        real(config, revision)

    monkeypatch.setattr(command, "upgrade", counted)
    upgrade(url)  # 0007 -> head: alembic's path
    assert calls == ["head"]
    upgrade(url)  # up to date: one SELECT, no alembic
    assert calls == ["head"]
    engine = make_engine(url)
    try:
        assert current_revision(engine) == HEAD_REVISION
    finally:
        engine.dispose()


def test_upgrading_a_new_database_twice_leaves_it_at_the_newest_revision(url: str) -> None:
    upgrade(url)
    upgrade(url)
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision() == HEAD_REVISION == "0008"
        assert set(inspect(engine).get_table_names()) == {
            "alembic_version", "bad_images", "cache_entries", "cache_leases", "event_outbox",
            "scope_totals", "volume_writes"}
    finally:
        engine.dispose()


def test_entries_and_totals_of_a_database_made_before_scopes_move_to_the_default_scope(
        url: str) -> None:
    upgrade(url, "0001")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:  # what ivcache 0001 wrote
            conn.execute(text(
                "INSERT INTO cache_entries (id, host, image_id, volume_id, size_gb, state, "
                "created_at, last_used, hits, pinned) VALUES "
                "('e1', 'node-1', 'img-1', 'vol-1', 2, 'ready', :t, :t, 3, false), "
                "('e2', 'node-2', 'img-1', 'vol-2', 1, 'ready', :t, :t, 0, false)"),
                {"t": T0.replace(tzinfo=None) if url.startswith("sqlite") else T0})
            conn.execute(text(
                "INSERT INTO host_totals (host, count, size_gb, hits, misses, evictions, "
                "downloads, bytes_downloaded) VALUES ('node-1', 1, 2, 3, 1, 0, 1, 4096), "
                "('node-2', 1, 1, 0, 1, 0, 1, 4096)"))
        upgrade(engine)
        uow = SqlUnitOfWork(engine)
        with uow:
            one = uow.entries.find(NODE_1, "img-1")
            assert one is not None and (one.id, one.hits, one.size_gb) == ("e1", 3, 2)
            assert (one.backend, one.pool, one.cluster) == ("default", "default", None)
            assert uow.entries.totals(NODE_1) == ScopeTotals(
                NODE_1, count=1, size_gb=2, hits=3, misses=1, downloads=1,
                bytes_downloaded=4096)
            assert [t.scope for t in uow.entries.all_totals()] == [NODE_1, NODE_2]
            # The claim is per scope now: the same image again in node-1's is refused.
            with pytest.raises(AlreadyClaimed):
                uow.entries.add(make_entry("img-1"))
    finally:
        engine.dispose()


def test_entries_made_before_fill_times_were_measured_come_first_under_gdsf_by_age(
        url: str) -> None:
    upgrade(url, "0003")
    engine = make_engine(url)
    t = T0.replace(tzinfo=None) if url.startswith("sqlite") else T0
    try:
        with engine.begin() as conn:  # what ivcache 0003 wrote
            conn.execute(text(
                "INSERT INTO cache_entries (id, host, backend, pool, scope, image_id, "
                "volume_id, size_gb, state, created_at, last_used, hits, pinned) VALUES "
                f"('e1', 'node-1', 'default', 'default', '{NODE_1}', 'img-1', 'vol-1', 2, "
                "'ready', :t, :late, 9, false), "
                f"('e2', 'node-1', 'default', 'default', '{NODE_1}', 'img-2', 'vol-2', 1, "
                "'ready', :t, :t, 0, false)"),
                {"t": t, "late": t + dt.timedelta(hours=1)})
            conn.execute(text(f"INSERT INTO scope_totals (scope, count, size_gb) "
                              f"VALUES ('{NODE_1}', 2, 3)"))
        upgrade(engine)
        uow = SqlUnitOfWork(engine)
        with uow:
            victims = list(uow.entries.priority_victims(NODE_1, T0 + dt.timedelta(days=1)))
            assert [(v.id, v.fill_seconds, v.priority) for v in victims] == [
                ("e2", None, 0.0), ("e1", None, 0.0)]
            assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=2, size_gb=3)
        with engine.begin() as conn:  # and back: 0005's columns and index go, rows stay
            command.downgrade(_alembic_config(conn), "0003")
        assert "priority" not in {c["name"] for c in inspect(engine).get_columns(
            "cache_entries")}
        assert "gdsf_age" not in {c["name"] for c in inspect(engine).get_columns(
            "scope_totals")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM cache_entries")).scalar() == 2
    finally:
        engine.dispose()


def test_a_database_never_upgraded_has_no_revision(url: str) -> None:
    engine = make_engine(url)
    try:
        assert current_revision(engine) is None
    finally:
        engine.dispose()


def test_the_migrations_create_exactly_the_tables_the_code_queries(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []


def test_the_schema_has_the_claim_constraint_and_the_lru_and_volume_indexes(
        engine: Engine) -> None:
    schema = inspect(engine)
    assert [u["column_names"] for u in schema.get_unique_constraints("cache_entries")] == [
        ["scope", "image_id"]]
    # PostgreSQL also lists the index behind the unique constraint; it is not ours to count.
    indexes = {i["name"]: i["column_names"] for i in schema.get_indexes("cache_entries")
               if "duplicates_constraint" not in i}
    assert indexes == {"ix_cache_entries_scope_last_used_id": ["scope", "last_used", "id"],
                       "ix_cache_entries_volume_id": ["volume_id"],
                       "ix_cache_entries_host_backend_scope": ["host", "backend", "scope"],
                       "ix_cache_entries_scope_priority_last_used_id": [
                           "scope", "priority", "last_used", "id"]}


# -- the engine --------------------------------------------------------------------------------

def test_a_sqlite_engine_uses_wal_a_busy_timeout_and_foreign_keys(
        sqlite_engine: Engine) -> None:
    with sqlite_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_every_sqlite_transaction_begins_immediate(sqlite_engine: Engine) -> None:
    uow = SqlUnitOfWork(sqlite_engine)
    statements = Statements(sqlite_engine)
    statements.recording = True
    with uow:
        uow.entries.totals(NODE_1)
    assert statements.seen[0][0] == "BEGIN IMMEDIATE"


def test_a_database_path_that_cannot_be_created_is_a_config_error_naming_it(
        tmp_path: Path) -> None:
    # A path under a regular file: unwritable even for root, who ignores permissions.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / "ivcache.db"
    with pytest.raises(ConfigError, match=str(path)) as raised:
        make_engine(f"sqlite:///{path}")
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match=str(path)):
        upgrade(f"sqlite:///{path}")


# -- time --------------------------------------------------------------------------------------

def test_times_in_other_zones_are_stored_as_utc_instants_and_ordered_as_such(
        uow: SqlUnitOfWork) -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    early = make_entry("early", last_used=dt.datetime(2026, 1, 1, 10, 0, tzinfo=plus_two))
    late = make_entry("late", last_used=dt.datetime(2026, 1, 1, 9, 0, tzinfo=dt.UTC))
    with uow:
        uow.entries.add(late)
        uow.entries.add(early)
        uow.commit()
    with uow:
        victims = list(uow.entries.lru_victims(NODE_1, T0))
    assert [v.image_id for v in victims] == ["early", "late"]
    assert victims[0].last_used == early.last_used
    assert victims[0].last_used.tzinfo is dt.UTC


def test_a_naive_time_is_refused(uow: SqlUnitOfWork) -> None:
    with uow, pytest.raises(StatementError, match="naive datetime"):
        uow.entries.add(make_entry(last_used=dt.datetime(2026, 1, 1)))


# -- totals ------------------------------------------------------------------------------------

def test_lock_scope_creates_the_totals_row_it_locks(uow: SqlUnitOfWork) -> None:
    with uow:
        assert uow.entries.lock_scope(NODE_1) == ScopeTotals(NODE_1)
        uow.commit()
    with uow:
        assert uow.entries.all_totals() == [ScopeTotals(NODE_1)]


# -- LRU victims: the index, and bounded reads ------------------------------------------------

def test_the_lru_victim_queries_search_the_scope_last_used_index_on_sqlite(
        sqlite_engine: Engine) -> None:
    engine = sqlite_engine
    small_batches = SqlUnitOfWork(engine, lru_batch=2)
    with small_batches:
        for n in range(5):
            small_batches.entries.add(make_entry(f"img-{n}", last_used=T0))
        small_batches.commit()
    statements = Statements(engine)
    with small_batches:
        statements.recording = True
        assert len(list(small_batches.entries.lru_victims(NODE_1, T0))) == 5
        statements.recording = False
    queries = statements.selects_from_entries()
    assert len(queries) == 3  # the first page, then two keyset pages
    with engine.connect() as conn:
        for sql, params in queries:
            plan = " ".join(row[3] for row in
                            conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
            assert "USING INDEX ix_cache_entries_scope_last_used_id" in plan
            assert "TEMP B-TREE" not in plan  # the order comes from the index too


def test_taking_one_victim_among_two_thousand_entries_reads_one_small_batch(
        engine: Engine, uow: SqlUnitOfWork) -> None:
    rows = [{"id": f"e-{n:04}", "host": "node-1", "backend": "default", "pool": "default",
             "scope": NODE_1, "image_id": f"img-{n:04}",
             "volume_id": f"vol-{n:04}", "size_gb": 1, "state": "ready", "created_at": T0,
             "last_used": T0 + dt.timedelta(seconds=n)} for n in range(2000)]
    with engine.begin() as conn:  # seeded in bulk: only the reads are under test
        conn.execute(insert(cache_entries), rows)
    statements = Statements(engine)
    with uow:
        victims = uow.entries.lru_victims(NODE_1, T0 + dt.timedelta(days=1))
        statements.recording = True
        first = next(victims)
        statements.recording = False
    assert first.image_id == "img-0000"
    [(sql, params)] = statements.selects_from_entries()
    assert "LIMIT" in sql
    values = list(params.values()) if isinstance(params, dict) else list(params)
    assert LRU_BATCH in values and LRU_BATCH <= 16


# -- units of work -----------------------------------------------------------------------------

def test_a_unit_of_work_is_reusable_and_refuses_use_outside_a_with_block(
        uow: SqlUnitOfWork) -> None:
    with pytest.raises(RuntimeError, match="with"):
        _ = uow.entries
    for n in range(3):
        with uow:
            assert not uow.committed
            uow.entries.add(make_entry(f"img-{n}"))
            uow.commit()
        assert uow.committed
    with uow:
        assert uow.entries.totals(NODE_1).count == 3
        with pytest.raises(RuntimeError, match="already inside"):
            uow.__enter__()


def test_concurrent_claims_from_eight_threads_let_exactly_one_win(
        uow: SqlUnitOfWork) -> None:
    start = threading.Barrier(8)

    def claim(n: int) -> str:
        start.wait()
        with uow:  # one SqlUnitOfWork shared: each thread has its own transaction
            try:
                uow.entries.add(attrs.evolve(make_entry(size_gb=4), id=f"claim-{n}"))
            except AlreadyClaimed:
                return "lost"
            uow.commit()
            return "won"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(claim, range(8)))
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    with uow:
        assert len(uow.entries.list()) == 1
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=1, size_gb=4)


def _add_while_under_three(url: str, worker: int, attempts: int, start: Any) -> None:
    """In a child process: ``attempts`` times, lock the host and add an entry if count < 3."""
    engine = make_engine(url)
    uow = SqlUnitOfWork(engine)
    start.wait()
    for n in range(attempts):
        with uow:
            if uow.entries.lock_scope(NODE_1).count < 3:
                uow.entries.add(make_entry(f"img-{worker}-{n}"))
            uow.commit()
    engine.dispose()


def test_two_processes_checking_a_limit_under_lock_scope_never_exceed_it(
        url: str, engine: Engine, uow: SqlUnitOfWork) -> None:
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(2)  # both ready, then both go: their transactions interleave
    workers = [spawn.Process(target=_add_while_under_three, args=(url, w, 6, start))
               for w in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    with uow:
        assert len(uow.entries.list()) == 3
        assert uow.entries.totals(NODE_1) == ScopeTotals(NODE_1, count=3, size_gb=3)

"""The cache repository and unit of work on SQL (SQLAlchemy Core).

Rows are converted to and from the core's attrs classes here; the core never sees a
connection or a row.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import attrs
from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Row,
    Select,
    Table,
    and_,
    case,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from ivcache.adapters.sql.tables import cache_entries, host_totals
from ivcache.core.errors import AlreadyClaimed
from ivcache.core.model import CacheEntry, EntryState, HostTotals
from ivcache.core.ports import CacheRepository

__all__ = ["LRU_BATCH", "SqlCacheRepository", "SqlUnitOfWork"]

#: Victims are read this many at a time: taking k victims reads about k rows, not a host's all.
LRU_BATCH = 16

_T = host_totals.c
_E = cache_entries.c


class SqlCacheRepository:
    """``CacheRepository`` on one connection, inside the transaction of a ``SqlUnitOfWork``.

    ``add``, ``remove`` and ``save`` keep ``host_totals`` in step in the same transaction.
    """

    def __init__(self, connection: Connection, *, lru_batch: int = LRU_BATCH) -> None:
        self._conn = connection
        self._lru_batch = lru_batch

    # -- totals ----------------------------------------------------------------------------

    def lock_host(self, host: str) -> HostTotals:
        """The host's totals, its row locked until the transaction ends.

        PostgreSQL: ``SELECT ... FOR UPDATE``. SQLite: the transaction already holds the
        database's write lock (``BEGIN IMMEDIATE``) and SQLAlchemy leaves ``FOR UPDATE`` out.
        """
        self._ensure_totals(host)
        row = self._conn.execute(
            select(host_totals).where(_T.host == host).with_for_update()).one()
        return _totals_from_row(row)

    def totals(self, host: str) -> HostTotals:
        row = self._conn.execute(select(host_totals).where(_T.host == host)).one_or_none()
        return _totals_from_row(row) if row is not None else HostTotals(host)

    def all_totals(self) -> list[HostTotals]:
        rows = self._conn.execute(select(host_totals).order_by(_T.host))
        return [_totals_from_row(r) for r in rows]

    def count_stats(self, host: str, *, hits: int = 0, misses: int = 0, evictions: int = 0,
                    downloads: int = 0, bytes_downloaded: int = 0) -> None:
        self._bump(host, hits=hits, misses=misses, evictions=evictions, downloads=downloads,
                   bytes_downloaded=bytes_downloaded)

    # -- entries ---------------------------------------------------------------------------

    def get(self, entry_id: str) -> CacheEntry | None:
        return self._one(select(cache_entries).where(_E.id == entry_id))

    def find(self, host: str, image_id: str) -> CacheEntry | None:
        return self._one(
            select(cache_entries).where(_E.host == host, _E.image_id == image_id))

    def find_by_volume(self, volume_id: str) -> CacheEntry | None:
        return self._one(
            select(cache_entries).where(_E.volume_id == volume_id).order_by(_E.id).limit(1))

    def list(self, host: str | None = None) -> list[CacheEntry]:
        query = select(cache_entries).order_by(_E.host, _E.last_used, _E.id)
        if host is not None:
            query = query.where(_E.host == host)
        return [_entry_from_row(r) for r in self._conn.execute(query)]

    def add(self, entry: CacheEntry) -> None:
        """Insert; raise ``AlreadyClaimed`` if (host, image_id) is taken.

        The insert runs in a savepoint, so after ``AlreadyClaimed`` the transaction goes on
        (PostgreSQL would otherwise refuse every further statement).
        """
        try:
            with self._conn.begin_nested():
                self._conn.execute(insert(cache_entries).values(_entry_to_row(entry)))
        except IntegrityError:
            if self.find(entry.host, entry.image_id) is not None:
                raise AlreadyClaimed(entry.host, entry.image_id) from None
            raise  # another constraint (a duplicate id): a bug, not a claim
        self._bump(entry.host, count=1, size_gb=entry.size_gb)

    def save(self, entry: CacheEntry) -> None:
        """Write back every mutable field (one statement); a no-op if the entry is gone.

        ``size_gb`` is fixed when the entry is added, so the totals never move here.
        """
        values = _entry_to_row(entry)
        for key in ("id", "host", "image_id", "created_at", "size_gb"):
            del values[key]
        self._conn.execute(update(cache_entries).where(_E.id == entry.id).values(values))

    def end_lease(self, entry_id: str, host: str, lease: dt.datetime, *,
                  hit: bool = False) -> None:
        """Two statements for a hit, one otherwise: the totals row exists (the lease was
        taken under ``lock_host``), so it is updated without the insert-if-missing."""
        if not hit:
            self._conn.execute(
                update(cache_entries)
                .where(_E.id == entry_id, _E.lease_until == lease)
                .values(lease_until=None))
            return
        self._conn.execute(update(host_totals).where(_T.host == host)
                           .values(hits=_T.hits + 1))
        self._conn.execute(
            update(cache_entries).where(_E.id == entry_id).values(
                hits=_E.hits + 1,
                lease_until=case((_E.lease_until == lease, None), else_=_E.lease_until)))

    def remove(self, entry: CacheEntry) -> bool:
        """Delete by id; return False if it was already gone.

        The totals move by the size stored in the row, not the one on ``entry``.
        """
        gone = self._conn.execute(
            delete(cache_entries).where(_E.id == entry.id)
            .returning(_E.host, _E.size_gb)).one_or_none()
        if gone is None:
            return False
        self._bump(gone.host, count=-1, size_gb=-gone.size_gb)
        return True

    def lru_victims(self, host: str, now: dt.datetime) -> Iterator[CacheEntry]:
        """READY, unpinned, unleased entries of ``host``, least recently used first.

        Lazily, ``lru_batch`` rows at a time along the (host, last_used) index, each batch
        starting after the last (last_used, id) seen (keyset pagination): entries removed
        while iterating do not shift the pages.
        """
        base = (
            select(cache_entries)
            .where(
                _E.host == host,
                _E.state == EntryState.READY.value,
                _E.pinned.is_(False),
                or_(_E.lease_until.is_(None), _E.lease_until <= now),
            )
            .order_by(_E.last_used, _E.id)
            .limit(self._lru_batch)
        )
        query = base
        while True:
            rows = self._conn.execute(query).all()
            for row in rows:
                yield _entry_from_row(row)
            if len(rows) < self._lru_batch:
                return
            last_used, last_id = rows[-1].last_used, rows[-1].id
            # (last_used, id) > (:lu, :id), written so that every dialect uses the index:
            # the ">=" is the index range, the OR only filters within it.
            query = base.where(
                _E.last_used >= last_used,
                or_(_E.last_used > last_used, and_(_E.last_used == last_used, _E.id > last_id)),
            )

    # -- helpers ---------------------------------------------------------------------------

    def _one(self, query: Select[Any]) -> CacheEntry | None:
        row = self._conn.execute(query).one_or_none()
        return _entry_from_row(row) if row is not None else None

    def _ensure_totals(self, host: str) -> None:
        self._conn.execute(_insert_or_ignore(self._conn, host_totals, {"host": host}))

    def _bump(self, host: str, **deltas: int) -> None:
        """Add ``deltas`` to the host's totals row, creating it if missing."""
        self._ensure_totals(host)
        changes = {name: host_totals.c[name] + n for name, n in deltas.items() if n}
        if changes:
            self._conn.execute(update(host_totals).where(_T.host == host).values(changes))


class _TxState:
    __slots__ = ("committed", "connection", "repo")

    def __init__(self, connection: Connection, repo: CacheRepository) -> None:
        self.connection = connection
        self.repo = repo
        self.committed = False


class SqlUnitOfWork:
    """A ``UnitOfWork`` on an engine: each ``with`` block is one connection and transaction.

    Reusable, and shareable by threads: the transaction is per thread, so one instance can
    serve every worker thread as long as each enters it itself. Entering again on a thread
    already inside it is an error (on SQLite it would wait for its own lock).
    """

    def __init__(self, engine: Engine, *, lru_batch: int = LRU_BATCH) -> None:
        self.engine = engine
        self._lru_batch = lru_batch
        self._local = threading.local()

    @property
    def entries(self) -> CacheRepository:
        """The repository bound to this thread's transaction."""
        return self._state().repo

    @entries.setter
    def entries(self, repo: CacheRepository) -> None:
        # Only so that the class fits the port's plain attribute; tests may swap it.
        self._state().repo = repo

    @property
    def committed(self) -> bool:
        """Whether ``commit()`` was called in this thread's current (or last) block."""
        state: _TxState | None = getattr(self._local, "state", None)
        return state.committed if state is not None else bool(
            getattr(self._local, "last_committed", False))

    def __enter__(self) -> SqlUnitOfWork:
        if getattr(self._local, "state", None) is not None:
            raise RuntimeError("this thread is already inside this unit of work")
        connection = self.engine.connect()
        self._local.state = _TxState(
            connection, SqlCacheRepository(connection, lru_batch=self._lru_batch))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        state = self._state()
        self._local.state = None
        self._local.last_committed = state.committed
        try:
            state.connection.rollback()  # what was not committed; a no-op after commit()
        finally:
            state.connection.close()

    def commit(self) -> None:
        state = self._state()
        state.connection.commit()
        state.committed = True

    def _state(self) -> _TxState:
        state: _TxState | None = getattr(self._local, "state", None)
        if state is None:
            raise RuntimeError("use the unit of work in a `with` block first")
        return state


def _insert_or_ignore(conn: Connection, table: Table, values: Mapping[str, Any]) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING`` in the connection's dialect."""
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table).values(values).on_conflict_do_nothing()
    if name == "sqlite":
        return sqlite.insert(table).values(values).on_conflict_do_nothing()
    raise NotImplementedError(f"the SQL adapter does not support {name}")


# Columns are named as the attrs fields, so rows convert field by field; only the enum and
# SQLite's 0/1 booleans need a hand.
_ENTRY_FIELDS = tuple(f.name for f in attrs.fields(CacheEntry))
_TOTALS_FIELDS = tuple(f.name for f in attrs.fields(HostTotals))


def _entry_to_row(entry: CacheEntry) -> dict[str, Any]:
    row = attrs.asdict(entry, recurse=False)
    row["state"] = entry.state.value
    return row


def _entry_from_row(row: Row[Any]) -> CacheEntry:
    m = row._mapping
    values = {name: m[name] for name in _ENTRY_FIELDS}
    values["state"] = EntryState(values["state"])
    values["pinned"] = bool(values["pinned"])
    return CacheEntry(**values)


def _totals_from_row(row: Row[Any]) -> HostTotals:
    # Through the mapping: ``row.count`` would be the tuple's method, not the column.
    m = row._mapping
    return HostTotals(**{name: m[name] for name in _TOTALS_FIELDS})

"""The cache repository and unit of work on SQL (SQLAlchemy Core).

Rows are converted to and from the core's attrs classes here; the core never sees a
connection or a row.
"""

from __future__ import annotations

import builtins
import datetime as dt
import functools
import threading
from collections.abc import Iterator, Mapping, Sequence
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
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError

from ivcache.adapters.sql.outbox import SqlOutbox
from ivcache.adapters.sql.tables import (
    bad_images,
    cache_entries,
    cache_leases,
    scope_totals,
    volume_writes,
)
from ivcache.core.errors import AlreadyClaimed
from ivcache.core.events import Event
from ivcache.core.model import (
    BadImage,
    CacheEntry,
    EntryState,
    Lease,
    Owner,
    Scope,
    ScopeTotals,
    VolumeWrite,
)
from ivcache.core.ports import CacheRepository, EventOutbox

__all__ = ["LRU_BATCH", "SqlCacheRepository", "SqlUnitOfWork"]

#: Victims are read this many at a time: taking k victims reads about k rows, not a scope's
#: all.
LRU_BATCH = 16

_T = scope_totals.c
_E = cache_entries.c
_L = cache_leases.c
_W = volume_writes.c
_B = bad_images.c

# An entry is read with ``lease_until``, the last of its leases' ``until`` (an index probe of
# (entry_id, until) per entry).
_LEASE_UNTIL = (select(func.max(_L.until)).where(_L.entry_id == _E.id)
                .scalar_subquery().label("lease_until"))
_ENTRY = (*cache_entries.c, _LEASE_UNTIL)

# The statements of the hit path, built once: building a statement costs more Python than
# running it on SQLite, and a prebuilt one keeps its cache key (SQLAlchemy memoizes it), so
# each run only binds its parameters.
#: the key of the totals row whose lock is the quota's (see ``lock_quota``)
_QUOTA_LOCK = "*quota*"
_LOCK_TOTALS = select(scope_totals).where(_T.scope == bindparam("scope")).with_for_update()


@functools.cache
def _lock_totals_pg() -> Insert:
    """PostgreSQL: make the row if missing and lock it, in one statement (an upsert locks
    the row it updates, as FOR UPDATE would), so a scope's first transactions racing to make
    the row need no second try either. Built on first use: importing SQLAlchemy's PostgreSQL
    dialect costs every SQLite command a tenth of a second at start."""
    from sqlalchemy.dialects import postgresql

    upsert = postgresql.insert(scope_totals).values(scope=bindparam("b_scope"))
    return upsert.on_conflict_do_update(
        index_elements=[_T.scope], set_={"scope": upsert.excluded.scope},
    ).returning(*scope_totals.c)


_FIND = select(*_ENTRY).where(_E.scope == bindparam("scope"),
                              _E.image_id == bindparam("image_id"))
_GET = select(*_ENTRY).where(_E.id == bindparam("entry_id"))
# No values(): the SET clause is the parameters' columns (every mutable one, from ``save``).
_SAVE = update(cache_entries).where(_E.id == bindparam("entry_id"))
_TAKE_LEASE = insert(cache_leases)
_END_LEASE = delete(cache_leases).where(_L.id == bindparam("lease_id"))
# Not "scope": an update's bind names must not be its table's column names.
# The hit's savings ride the same statements, as increments: exact whatever other hits
# commit meanwhile.
_COUNT_HIT = (update(scope_totals).where(_T.scope == bindparam("b_scope"))
              .values(hits=_T.hits + 1,
                      bytes_saved=_T.bytes_saved + bindparam("b_bytes_saved"),
                      seconds_saved=_T.seconds_saved + bindparam("b_seconds_saved")))
_END_HIT = update(cache_entries).where(_E.id == bindparam("entry_id")).values(
    hits=_E.hits + 1,
    bytes_saved=_E.bytes_saved + bindparam("b_bytes_saved"),
    seconds_saved=_E.seconds_saved + bindparam("b_seconds_saved"))
# PostgreSQL runs a hit's three writes in one statement (one round trip): the totals'
# update and the lease's delete as data-modifying CTEs. PostgreSQL runs a WITH's statements
# in no set order, so the entry's update is gated on the totals CTE's row (EXISTS): the
# totals row is locked first, the order every transaction takes them in (the other order
# deadlocked under load). The totals row exists: the lease was taken under ``lock_scope``.
# SQLite has no DML in CTEs and runs the three statements (it has no round trips to save).
_counted = _COUNT_HIT.returning(_T.scope).cte("counted")
_ended = _END_LEASE.returning(_L.id).cte("ended")
# Referenced by nothing, the lease's delete is added as a CTE of its own (add_cte): it runs
# all the same.
_END_HIT_PG = _END_HIT.where(select(_counted.c.scope).exists()).add_cte(_ended)


class SqlCacheRepository:
    """``CacheRepository`` on one connection, inside the transaction of a ``SqlUnitOfWork``.

    ``add``, ``remove`` and ``move`` keep ``scope_totals`` in step in the same transaction.
    """

    def __init__(self, connection: Connection, *, lru_batch: int = LRU_BATCH) -> None:
        self._conn = connection
        self._lru_batch = lru_batch
        # Scopes whose totals row this transaction has locked: it exists, so ``_bump``
        # updates it without the insert-if-missing.
        self._locked: set[str] = set()

    # -- totals ----------------------------------------------------------------------------

    def lock_scope(self, scope: str) -> ScopeTotals:
        """The scope's totals, its row locked until the transaction ends.

        PostgreSQL: ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``, which locks the row
        as an update does (and makes it, for a new scope). SQLite: the transaction already
        holds the database's write lock (``BEGIN IMMEDIATE``) and SQLAlchemy leaves
        ``FOR UPDATE`` out.
        """
        row: Row[Any] | None
        if self._conn.dialect.name == "postgresql":
            row = self._conn.execute(_lock_totals_pg(), {"b_scope": scope}).one()
        else:
            # SQLite's write lock is held from BEGIN: nobody can insert the row between the
            # read and the insert, and only a scope's first transaction pays the insert.
            params = {"scope": scope}
            row = self._conn.execute(_LOCK_TOTALS, params).one_or_none()
            if row is None:
                self._ensure_totals(scope)
                row = self._conn.execute(_LOCK_TOTALS, params).one()
        self._locked.add(scope)
        return _totals_from_row(row)

    def lock_quota(self) -> None:
        """PostgreSQL: the lock of a reserved totals row (``_QUOTA_LOCK``, never a scope's
        key: those hold an ``@``). SQLite: the database's write lock, held from BEGIN."""
        if self._conn.dialect.name == "postgresql":
            self._conn.execute(_lock_totals_pg(), {"b_scope": _QUOTA_LOCK}).one()

    def totals(self, scope: str) -> ScopeTotals:
        row = self._conn.execute(select(scope_totals).where(_T.scope == scope)).one_or_none()
        return _totals_from_row(row) if row is not None else ScopeTotals(scope)

    def all_totals(self) -> list[ScopeTotals]:
        rows = self._conn.execute(
            select(scope_totals).where(_T.scope != _QUOTA_LOCK).order_by(_T.scope))
        return [_totals_from_row(r) for r in rows]

    def count_stats(self, scope: str, *, hits: int = 0, misses: int = 0, evictions: int = 0,
                    downloads: int = 0, bytes_downloaded: int = 0,
                    neighbour_fills: int = 0) -> None:
        self._bump(scope, hits=hits, misses=misses, evictions=evictions, downloads=downloads,
                   bytes_downloaded=bytes_downloaded, neighbour_fills=neighbour_fills)

    # -- entries ---------------------------------------------------------------------------

    def get(self, entry_id: str) -> CacheEntry | None:
        return self._one(_GET, {"entry_id": entry_id})

    def find(self, scope: str, image_id: str) -> CacheEntry | None:
        return self._one(_FIND, {"scope": scope, "image_id": image_id})

    def find_by_volume(self, volume_id: str) -> CacheEntry | None:
        return self._one(
            select(*_ENTRY).where(_E.volume_id == volume_id).order_by(_E.id).limit(1))

    def strays(self, host: str, backend: str, scope: str) -> list[CacheEntry]:
        """Two range reads of the (host, backend, scope) index, on either side of
        ``scope``: nothing is read when every entry of the host's backend is in it."""
        found: list[CacheEntry] = []
        for other in (_E.scope < scope, _E.scope > scope):
            query = (select(*_ENTRY)
                     .where(_E.host == host, _E.backend == backend, other,
                            _E.cluster.is_(None))
                     .order_by(_E.scope, _E.id))
            found += [_entry_from_row(r) for r in self._conn.execute(query)]
        return found

    def list(self, host: str | None = None, *, scope: str | None = None,
             backend: str | None = None) -> list[CacheEntry]:
        query = select(*_ENTRY).order_by(_E.host, _E.last_used, _E.id)
        if host is not None:
            query = query.where(_E.host == host)
        if scope is not None:
            query = query.where(_E.scope == scope)
        if backend is not None:
            query = query.where(_E.backend == backend)
        return [_entry_from_row(r) for r in self._conn.execute(query)]

    def add(self, entry: CacheEntry) -> None:
        """Insert; raise ``AlreadyClaimed`` if (scope, image_id) is taken.

        The insert runs in a savepoint, so after ``AlreadyClaimed`` the transaction goes on
        (PostgreSQL would otherwise refuse every further statement).
        """
        try:
            with self._conn.begin_nested():
                self._conn.execute(insert(cache_entries).values(_entry_to_row(entry)))
        except IntegrityError:
            if self.find(entry.scope_key, entry.image_id) is not None:
                raise AlreadyClaimed(entry.scope_key, entry.image_id) from None
            raise  # another constraint (a duplicate id): a bug, not a claim
        self._bump(entry.scope_key, count=1, size_gb=entry.size_gb)

    def save(self, entry: CacheEntry) -> None:
        """Write back every mutable field (one statement); a no-op if the entry is gone.

        ``size_gb`` and the scope are fixed when the entry is added (``move`` changes the
        scope), so the totals never move here; the counters are ``end_lease``'s (an entry
        read before a hit ended and saved after it would undo the hit).
        """
        values = _entry_to_row(entry)
        for key in _FIXED + _COUNTERS:
            del values[key]
        values["entry_id"] = entry.id
        self._conn.execute(_SAVE, values)

    def move(self, entry: CacheEntry, to: Scope) -> bool:
        """Three statements: the entry's row, then the two totals rows (locked by the
        caller). In a savepoint, so a scope already holding the image raises
        ``AlreadyClaimed`` and leaves the transaction usable."""
        row = self._conn.execute(select(_E.host, _E.scope, _E.size_gb, _E.image_id)
                                 .where(_E.id == entry.id)).one_or_none()
        if row is None:
            return False
        target = Scope(row.host, to.backend, to.pool, to.cluster)
        if target.key == row.scope:
            return True
        try:
            with self._conn.begin_nested():
                self._conn.execute(update(cache_entries).where(_E.id == entry.id).values(
                    cluster=target.cluster, backend=target.backend, pool=target.pool,
                    scope=target.key))
        except IntegrityError:
            raise AlreadyClaimed(target.key, row.image_id) from None
        self._bump(row.scope, count=-1, size_gb=-row.size_gb)
        self._bump(target.key, count=1, size_gb=row.size_gb)
        return True

    def take_lease(self, lease: Lease) -> None:
        self._conn.execute(_TAKE_LEASE, {"id": lease.id, "entry_id": lease.entry_id,
                                         "owner": lease.owner, "until": lease.until})

    def end_lease(self, lease: Lease, scope: str, *,
                  hit: bool = False, bytes_saved: int = 0, seconds_saved: float = 0.0) -> None:
        """One statement (three for a hit on SQLite): the totals row exists (the lease was
        taken under ``lock_scope``), so it is updated without the insert-if-missing. A
        hit's savings are added in the same statements."""
        if not hit:
            self._conn.execute(_END_LEASE, {"lease_id": lease.id})
            return
        params = {"entry_id": lease.entry_id, "b_scope": scope, "lease_id": lease.id,
                  "b_bytes_saved": bytes_saved, "b_seconds_saved": seconds_saved}
        if self._conn.dialect.name == "postgresql":
            self._conn.execute(_END_HIT_PG, params)
            return
        self._conn.execute(_COUNT_HIT, params)
        self._conn.execute(_END_HIT, params)
        self._conn.execute(_END_LEASE, params)

    def leases(self, entry_id: str, now: dt.datetime) -> builtins.list[Lease]:
        rows = self._conn.execute(select(cache_leases).where(
            _L.entry_id == entry_id, _L.until > now).order_by(_L.id))
        return [_lease_from_row(r) for r in rows]

    def leased(self, scope: str, now: dt.datetime) -> builtins.list[Lease]:
        """Along the index on ``until``: the leases still running, whatever the number of
        entries."""
        rows = self._conn.execute(
            select(cache_leases).join(cache_entries, _E.id == _L.entry_id)
            .where(_L.until > now, _E.scope == scope).order_by(_L.id))
        return [_lease_from_row(r) for r in rows]

    def drop_leases(self, lease_ids: Sequence[str]) -> None:
        if lease_ids:
            self._conn.execute(delete(cache_leases).where(_L.id.in_(list(lease_ids))))

    def beat(self, owner: str, until: dt.datetime, *, claims: Sequence[str] = (),
             leases: Sequence[str] = (), writes: Sequence[str] = ()) -> None:
        """A statement per kind held: rows are matched by id and owner, so a claim taken
        over meanwhile (or made READY) is left alone."""
        if claims:
            self._conn.execute(update(cache_entries).where(
                _E.id.in_(list(claims)), _E.claim_owner == owner,
                _E.state == EntryState.CREATING.value).values(claim_expires=until))
        if leases:
            self._conn.execute(update(cache_leases).where(
                _L.id.in_(list(leases)), _L.owner == owner).values(until=until))
        if writes:
            self._conn.execute(update(volume_writes).where(
                _W.volume_id.in_(list(writes)), _W.owner == owner).values(expires_at=until))

    def remove(self, entry: CacheEntry) -> bool:
        """Delete by id; return False if it was already gone.

        The totals move by the size stored in the row, not the one on ``entry``.
        """
        gone = self._conn.execute(
            delete(cache_entries).where(_E.id == entry.id)
            .returning(_E.scope, _E.size_gb)).one_or_none()
        if gone is None:
            return False
        self._conn.execute(delete(cache_leases).where(_L.entry_id == entry.id))
        self._bump(gone.scope, count=-1, size_gb=-gone.size_gb)
        return True

    def mark_writing(self, write: VolumeWrite) -> None:
        owner = Owner.parse(write.owner)
        self._conn.execute(delete(volume_writes).where(_W.volume_id == write.volume_id))
        self._conn.execute(insert(volume_writes).values(
            volume_id=write.volume_id, host=owner.node if owner else write.owner,
            expires_at=write.until, owner=write.owner))

    def end_writing(self, volume_id: str) -> None:
        self._conn.execute(delete(volume_writes).where(_W.volume_id == volume_id))

    def writes(self) -> builtins.list[VolumeWrite]:
        rows = self._conn.execute(select(_W.volume_id, _W.owner, _W.host, _W.expires_at)
                                  .order_by(_W.volume_id))
        # Marks of older versions name no owner: their time alone tells.
        return [VolumeWrite(r.volume_id, r.owner or "", r.expires_at) for r in rows]

    def mark_bad(self, scope: str, image_id: str, bad: BadImage, now: dt.datetime) -> None:
        # Expired findings go here, by the index on until: rare writes, no sweeper needed.
        self._conn.execute(delete(bad_images).where(
            or_(_B.until <= now, and_(_B.scope == scope, _B.image_id == image_id))))
        self._conn.execute(insert(bad_images).values(
            scope=scope, image_id=image_id, content=bad.content, kind=bad.kind,
            reason=bad.reason, until=bad.until))

    def bad(self, scope: str, image_id: str, content: str,
            now: dt.datetime) -> BadImage | None:
        row = self._conn.execute(select(_B.content, _B.kind, _B.reason, _B.until).where(
            _B.scope == scope, _B.image_id == image_id, _B.content == content,
            _B.until > now)).one_or_none()
        return None if row is None else BadImage(row.content, row.kind, row.reason, row.until)

    def forget_bad(self, scope: str, image_id: str) -> bool:
        gone = self._conn.execute(delete(bad_images).where(
            _B.scope == scope, _B.image_id == image_id))
        return bool(gone.rowcount)

    def lru_victims(self, scope: str, now: dt.datetime) -> Iterator[CacheEntry]:
        """READY, unpinned, unleased entries of ``scope``, least recently used first, along
        the (scope, last_used, id) index."""
        return self._victims(scope, now, (_E.last_used, _E.id))

    def priority_victims(self, scope: str, now: dt.datetime) -> Iterator[CacheEntry]:
        """READY, unpinned, unleased entries of ``scope``, lowest priority first (ties:
        least recently used, then id), along the (scope, priority, last_used, id) index."""
        return self._victims(scope, now, (_E.priority, _E.last_used, _E.id))

    def _victims(self, scope: str, now: dt.datetime,
                 order: tuple[Any, ...]) -> Iterator[CacheEntry]:
        """The entries that may go, in ``order`` (an index's columns after the scope).

        Lazily, ``lru_batch`` rows at a time, each batch starting after the last row seen
        (keyset pagination): entries removed while iterating do not shift the pages.
        """
        base = (
            select(*_ENTRY)
            .where(
                _E.scope == scope,
                _E.state == EntryState.READY.value,
                _E.pinned.is_(False),
                ~exists().where(_L.entry_id == _E.id, _L.until > now),
            )
            .order_by(*order)
            .limit(self._lru_batch)
        )
        query = base
        while True:
            rows = self._conn.execute(query).all()
            for row in rows:
                yield _entry_from_row(row)
            if len(rows) < self._lru_batch:
                return
            last = rows[-1]
            values = [last._mapping[column] for column in order]
            # (columns) > (the last row's), written so that every dialect uses the index:
            # the ">=" on the first column is the index range, the ORs only filter within it.
            after = order[-1] > values[-1]
            for column, value in zip(order[-2::-1], values[-2::-1], strict=True):
                after = or_(column > value, and_(column == value, after))
            query = base.where(order[0] >= values[0], after)

    def set_gdsf_age(self, scope: str, age: float) -> None:
        self._ensure_totals(scope)
        self._conn.execute(update(scope_totals).where(_T.scope == scope)
                           .values(gdsf_age=age))

    # -- helpers ---------------------------------------------------------------------------

    def _one(self, query: Select[Any],
             params: Mapping[str, Any] | None = None) -> CacheEntry | None:
        row = self._conn.execute(query, params).one_or_none()
        return _entry_from_row(row) if row is not None else None

    def _ensure_totals(self, scope: str) -> None:
        self._conn.execute(_insert_or_ignore(self._conn, scope_totals, {"scope": scope}))

    def _bump(self, scope: str, **deltas: int) -> None:
        """Add ``deltas`` to the scope's totals row, creating it if missing."""
        if scope not in self._locked:
            self._ensure_totals(scope)
        changes = {name: scope_totals.c[name] + n for name, n in deltas.items() if n}
        if changes:
            self._conn.execute(update(scope_totals).where(_T.scope == scope).values(changes))


class _TxOutbox:
    """The ``EventOutbox`` of one transaction: the events the outbox keeps are written
    on the transaction's connection; without an outbox, none is kept."""

    __slots__ = ("_conn", "_outbox")

    def __init__(self, connection: Connection, outbox: SqlOutbox | None) -> None:
        self._conn = connection
        self._outbox = outbox

    def add(self, event: Event) -> None:
        if self._outbox is not None and self._outbox.keeps(event):
            self._outbox.add_in(self._conn, event)


class _TxState:
    __slots__ = ("committed", "connection", "outbox", "repo")

    def __init__(self, connection: Connection, repo: CacheRepository,
                 outbox: EventOutbox) -> None:
        self.connection = connection
        self.repo = repo
        self.outbox = outbox
        self.committed = False


class SqlUnitOfWork:
    """A ``UnitOfWork`` on an engine: each ``with`` block is one connection and transaction.

    Reusable, and shareable by threads: the transaction is per thread, so one instance can
    serve every worker thread as long as each enters it itself. Entering again on a thread
    already inside it is an error (on SQLite it would wait for its own lock).

    With an ``outbox`` (the composition root gives one when a notifier delivers from it:
    the bus), the events a transaction adds are written to it in that transaction;
    without, they are not kept (the notifiers still get them from the service).
    """

    def __init__(self, engine: Engine, *, lru_batch: int = LRU_BATCH,
                 outbox: SqlOutbox | None = None) -> None:
        self.engine = engine
        self._lru_batch = lru_batch
        self._outbox = outbox
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
    def outbox(self) -> EventOutbox:
        """The events of this thread's transaction."""
        return self._state().outbox

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
            connection, SqlCacheRepository(connection, lru_batch=self._lru_batch),
            _TxOutbox(connection, self._outbox))
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
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table).values(values).on_conflict_do_nothing()
    if name == "sqlite":
        return sqlite.insert(table).values(values).on_conflict_do_nothing()
    raise NotImplementedError(f"the SQL adapter does not support {name}")


# Columns are named as the attrs fields, so rows convert field by field; only the enum and
# SQLite's 0/1 booleans need a hand.
_ENTRY_FIELDS = tuple(f.name for f in attrs.fields(CacheEntry))
_TOTALS_FIELDS = tuple(f.name for f in attrs.fields(ScopeTotals))
# What ``save`` never writes: the identity, the size the totals counted, the scope.
_FIXED = ("id", "host", "image_id", "created_at", "size_gb", "cluster", "backend", "pool",
          "scope")
#: What only ``end_lease`` moves, by increments.
_COUNTERS = ("hits", "bytes_saved", "seconds_saved")


def _entry_to_row(entry: CacheEntry) -> dict[str, Any]:
    row = attrs.asdict(entry, recurse=False)
    del row["lease_until"]  # the leases' (cache_leases), read with the entry
    row["state"] = entry.state.value
    # The key is the parts' (kept in a column so the unique constraint and the LRU index
    # can use it).
    row["scope"] = entry.scope_key
    return row


def _entry_from_row(row: Row[Any]) -> CacheEntry:
    m = row._mapping
    values = {name: m[name] for name in _ENTRY_FIELDS}
    values["state"] = EntryState(values["state"])
    values["pinned"] = bool(values["pinned"])
    return CacheEntry(**values)


def _lease_from_row(row: Row[Any]) -> Lease:
    return Lease(row.id, row.entry_id, row.owner, row.until)


def _totals_from_row(row: Row[Any]) -> ScopeTotals:
    # Through the mapping: ``row.count`` would be the tuple's method, not the column.
    m = row._mapping
    return ScopeTotals(**{name: m[name] for name in _TOTALS_FIELDS})

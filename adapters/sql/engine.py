"""Engines for the SQL adapter, and its schema migrations (alembic) run from code.

    engine = make_engine("sqlite:////var/lib/ivcache/ivcache.db")
    upgrade(engine)                      # idempotent: creates or migrates to the newest schema
    uow = SqlUnitOfWork(engine)

The migrations ship inside the package (``migrations/``); no ``alembic.ini`` is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import DatabaseError, DBAPIError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry

from ivcache.core.errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "HEAD_REVISION",
    "SQLITE_BUSY_TIMEOUT_MS",
    "current_revision",
    "head_revision",
    "make_engine",
    "upgrade",
]

#: The newest revision in migrations/versions (a test holds it to alembic's own answer, so a
#: new migration that does not move it fails there). Every command upgrades the schema
#: first; knowing the head, an up-to-date database is told by one SELECT, without importing
#: alembic and loading every migration script: that was a third of a CLI command's start.
HEAD_REVISION = "0008"

#: How long a SQLite writer waits for another one's lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000

# resolve(): with a strict editable install this module is a link into the source tree, and
# alembic must see the source's migrations directory, new revisions included.
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# Any constant: concurrent `upgrade` calls on PostgreSQL queue on this advisory lock.
_PG_MIGRATION_LOCK = 0x69766361


def make_engine(url: str | URL) -> Engine:
    """An engine for ``url``, set up for ivcache's transactions.

    For SQLite: WAL journal, a busy timeout, foreign keys on, and every transaction
    ``BEGIN IMMEDIATE`` so concurrent writers queue for the lock instead of failing on a
    lock upgrade. The database is opened once here, so a path that cannot be opened raises
    ``ConfigError`` now rather than on the first request. (An in-memory SQLite database
    exists once per connection, so threads would not share it: use a file.)
    """
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "postgresql":
        return _postgres_engine(sa_url)
    if sa_url.get_backend_name() != "sqlite":
        return create_engine(sa_url, pool_pre_ping=True)
    engine = create_engine(sa_url)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    try:
        _connect(engine).close()
    except ConfigError:
        engine.dispose()
        raise
    return engine


def _postgres_engine(sa_url: URL) -> Engine:
    # A bare postgresql:// would mean psycopg2 to SQLAlchemy; ivcache speaks psycopg 3.
    if sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    try:
        # Enough worker threads of one process to share an engine without queueing on it.
        return create_engine(sa_url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"database_url {sa_url.render_as_string(hide_password=True)} needs the "
            f"PostgreSQL driver {exc.name}: pip install 'ivcache[postgres]'") from exc


def upgrade(url_or_engine: str | URL | Engine, revision: str = "head") -> None:
    """Create the schema, or migrate it to the newest revision (or to ``revision``, for
    tests of a migration); a no-op when up to date.

    The whole upgrade is one transaction. Concurrent callers queue (SQLite: ``BEGIN
    IMMEDIATE``; PostgreSQL: an advisory lock) and the later ones find nothing to do.
    """
    if isinstance(url_or_engine, Engine):
        engine, owned = url_or_engine, False
    else:
        engine, owned = make_engine(url_or_engine), True
    try:
        if revision == "head" and _stamped(engine) == HEAD_REVISION:
            return
        from alembic import command

        with _connect(engine) as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": _PG_MIGRATION_LOCK})
            command.upgrade(_alembic_config(conn), revision)
    except DatabaseError as exc:
        if isinstance(exc, OperationalError) and engine.url.get_backend_name() != "sqlite":
            raise
        # A truncated or foreign SQLite file opens, then fails on the first page it reads.
        raise ConfigError(
            f"the database {_where(engine)} is damaged or not an ivcache database "
            f"({_reason(exc)}): restore it from a backup, or point database_url at a new "
            "file") from exc
    finally:
        if owned:
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The schema revision of the database, or None if it was never upgraded."""
    from alembic.runtime.migration import MigrationContext

    with _connect(engine) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The newest schema revision this version of ivcache knows, as alembic reads it from
    the migration scripts."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def _stamped(engine: Engine) -> str | None:
    """The revision alembic stamped in the database; None when there is none, or when the
    question fails (no such table, a damaged file): alembic's own path then creates the
    schema or reports the damage."""
    try:
        with _connect(engine) as conn:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except (ConfigError, DBAPIError):
        return None
    return str(row[0]) if row is not None else None


def _alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _connect(engine: Engine) -> Connection:
    """A connection, or ConfigError naming the database if it cannot be opened."""
    try:
        return engine.connect()
    except OperationalError as exc:
        raise ConfigError(
            f"cannot open the database {_where(engine)}: {_reason(exc)} (check database_url, "
            "and that the directory exists and is writable)"
        ) from exc
    except DatabaseError as exc:
        # SQLite says "file is not a database" as soon as the connection sets its pragmas.
        raise ConfigError(
            f"cannot open the database {_where(engine)}: {_reason(exc)}: it is damaged or "
            "not an ivcache database; restore it from a backup, or point database_url at a "
            "new file") from exc


def _where(engine: Engine) -> str:
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def _reason(exc: DatabaseError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else "cannot connect"


def _sqlite_on_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
    # The driver must not BEGIN (deferred) on its own: _sqlite_on_begin does it.
    # dbapi_connection is a sqlite3.Connection (typed Any: the DBAPI protocol lacks the
    # attribute).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # The timeout first: switching to WAL itself may wait for another connection.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL is still crash-safe (no corruption); a power cut may lose the
        # last commits, which reconcile repairs. FULL would fsync on every hit.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # Take the write lock at BEGIN: two deferred transactions that both read and then write
    # cannot both upgrade their lock, and one would fail at once with "database is locked".
    conn.exec_driver_sql("BEGIN IMMEDIATE")

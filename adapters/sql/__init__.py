"""The SQL adapter: cache entries and per-scope totals in SQLite or PostgreSQL.

SQLAlchemy 2 (Core) and alembic::

    from ivcache.adapters.sql import SqlUnitOfWork, make_engine, upgrade

    engine = make_engine("sqlite:////var/lib/ivcache/ivcache.db")
    upgrade(engine)
    uow = SqlUnitOfWork(engine)
    with uow:
        totals = uow.entries.lock_scope("node-1@default#default")
        ...
        uow.commit()
"""

from ivcache.adapters.sql.engine import current_revision, head_revision, make_engine, upgrade
from ivcache.adapters.sql.repository import SqlCacheRepository, SqlUnitOfWork

__all__ = [
    "SqlCacheRepository",
    "SqlUnitOfWork",
    "current_revision",
    "head_revision",
    "make_engine",
    "upgrade",
]

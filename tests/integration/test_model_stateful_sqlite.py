"""The unit tests' random life of the cache (tests/unit/test_model_stateful.py), on a real
SQLite database: the SQL repository must keep every promise the in-memory fake keeps,
through the same crashes."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from sqlalchemy.engine import Engine

from ivcache.adapters.sql.engine import make_engine, upgrade
from ivcache.adapters.sql.repository import SqlUnitOfWork
from ivcache.core.ports import UnitOfWork
from tests.unit.test_model_stateful import EXAMPLES, CacheLife, Process


class _MortalSqlUnitOfWork(SqlUnitOfWork):
    """Transactions of a process that can die: it may die before a ``begin`` or a
    ``commit``, and a dead process gets neither. A crash between two statements of one
    transaction is the same as one before its commit (the database rolls it back), so
    those two are the only points needed."""

    def __init__(self, process: Process, engine: Engine) -> None:
        self._process = process
        super().__init__(engine)

    def __enter__(self) -> SqlUnitOfWork:
        return self._process.call("begin", super().__enter__)()  # type: ignore[no-any-return]

    def commit(self) -> None:
        self._process.call("commit", super().commit)()


class _Template:
    """One upgraded database, copied for each example (an upgrade per example is slow)."""

    path: Path | None = None

    @classmethod
    def copy(cls, to: Path) -> Path:
        if cls.path is None:
            where = tempfile.mkdtemp(prefix="ivcache-model-")
            atexit.register(shutil.rmtree, where, ignore_errors=True)
            cls.path = Path(where) / "template.db"
            engine = make_engine(f"sqlite:///{cls.path}")
            upgrade(engine)
            engine.dispose()  # its last connection closed: the WAL is in the file now
        shutil.copyfile(cls.path, to)
        return to


class CacheLifeOnSqlite(CacheLife):
    def unit_of_work(self) -> UnitOfWork:
        self._dir = tempfile.TemporaryDirectory(prefix="ivcache-model-")
        db = _Template.copy(Path(self._dir.name) / "ivcache.db")
        self._engine = make_engine(f"sqlite:///{db}")
        return _MortalSqlUnitOfWork(self.process, self._engine)

    def teardown(self) -> None:
        self._engine.dispose()
        self._dir.cleanup()


CacheLifeOnSqlite.TestCase.settings = settings(
    max_examples=max(1, EXAMPLES // 4), stateful_step_count=30, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestOnSqliteARandomLifeOfTheCacheWithCrashesKeepsEveryPromise = CacheLifeOnSqlite.TestCase

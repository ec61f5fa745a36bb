"""Engine factory and the Database handle: one place that knows SQLite from PostgreSQL.

Sessions are bounded per process: at most :attr:`PoolLimits.size` are open at once, and a
caller waits for a free one in asyncio (in order, holding nothing) for at most ``wait_s``,
after which it gets :class:`~control_plane.errors.DatabaseBusy` (503 with Retry-After at the
HTTP edge). The pool holds as many connections again as overflow, so a session opened inside
another one by the same task (one level of nesting) never waits for itself. SQLAlchemy's
pool timeout and PostgreSQL's refusals of more connections are translated to the same error
here, once. A SQLite database and its -wal/-shm/-journal files are made 0600.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

import migrations
from control_plane.errors import DatabaseBusy

# PostgreSQL's "too many connections" and "the database system is starting up".
BUSY_SQLSTATES = frozenset({"53300", "57P03"})
SQLITE_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal")


@dataclass(frozen=True)
class PoolLimits:
    """Sessions open at once (None: 15 on SQLite, 30 on PostgreSQL) and the wait for one."""

    size: int | None = None
    wait_s: float = 10.0

    def sessions(self, is_sqlite: bool) -> int:
        """The number of sessions open at once."""
        return self.size or (15 if is_sqlite else 30)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for PostgreSQL and in-memory databases."""
    u = make_url(url)
    if not u.drivername.startswith("sqlite") or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def secure_sqlite_files(path: Path) -> None:
    """Create the database file 0600 if it is missing (SQLite gives its -wal and -shm files
    the database's mode) and set 0600 on it and on any sidecar file that exists."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for suffix in SQLITE_FILE_SUFFIXES:
        f = path.with_name(path.name + suffix)
        try:
            if f.stat().st_mode & 0o777 != 0o600:
                f.chmod(0o600)
        except FileNotFoundError:
            pass


def normalize_url(url: str) -> str:
    """Pick the async driver for a plain ``sqlite://`` or ``postgresql://`` URL."""
    u = make_url(url)
    if u.drivername in ("sqlite", "sqlite+pysqlite"):
        u = u.set(drivername="sqlite+aiosqlite")
    elif u.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        u = u.set(drivername="postgresql+asyncpg")
    return u.render_as_string(hide_password=False)


def create_engine(url: str, pool: PoolLimits | None = None) -> AsyncEngine:
    """Create the async engine; SQLite gets WAL, foreign keys and a busy timeout."""
    url = normalize_url(url)
    pool = pool or PoolLimits()
    size = pool.sessions(url.startswith("sqlite"))
    # The pool's own timeout is a backstop: Database's wait for a session comes first.
    sizing = {"pool_size": size, "max_overflow": size, "pool_timeout": pool.wait_s + 5}
    if url.startswith("sqlite"):
        if sqlite_path(url) is None:
            sizing = {}  # in memory: a single-connection pool of its own kind
        engine = create_async_engine(url, connect_args={"timeout": 30}, **sizing)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True, **sizing)


def alembic_config() -> Config:
    """Alembic configuration pointing at the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return cfg


def _upgrade(conn: Connection) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


class Database:
    """The engine and its sessions.

    SQLite admits one writer: write transactions are serialised here, which turns SQLite's
    "database is locked" upgrade failures into a short wait. PostgreSQL needs no such lock.
    """

    def __init__(self, url: str, *, pool: PoolLimits | None = None) -> None:
        self.url = normalize_url(url)
        self.pool = pool or PoolLimits()
        self.is_sqlite = self.url.startswith("sqlite")
        self.file = sqlite_path(self.url)
        if self.file is not None and self.file.parent.is_dir():
            secure_sqlite_files(self.file)
        self.engine = create_engine(self.url, self.pool)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(self.pool.sessions(self.is_sqlite))
        self._holders: dict[asyncio.Task[Any], int] = {}  # task -> sessions it has open

    def sessions_in_use(self) -> tuple[int, int]:
        """Sessions open now (by tasks holding one) and the most that may be open at once."""
        return sum(self._holders.values()), self.pool.sessions(self.is_sqlite)

    async def migrate(self) -> None:
        """Apply every Alembic migration up to head (and fix the SQLite files' modes)."""
        if self.file is not None:
            secure_sqlite_files(self.file)
        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade)
        if self.file is not None:
            secure_sqlite_files(self.file)  # the -wal and -shm files exist now

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """A place among the sessions open at once; raises DatabaseBusy after ``wait_s``."""
        task = asyncio.current_task()
        nested = task is not None and task in self._holders
        if not nested:
            try:
                # Not wait_for: on 3.11 it swallows a cancellation that lands as the slot
                # frees up, and the cancelled task runs on (a shutdown that never ends).
                async with asyncio.timeout(self.pool.wait_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise DatabaseBusy(
                    f"no database session free within {self.pool.wait_s:g}s", retry_after_s=1.0
                ) from None
        if task is not None:
            self._holders[task] = self._holders.get(task, 0) + 1
        try:
            yield
        except sa_exc.TimeoutError as exc:
            raise DatabaseBusy(f"database pool exhausted: {exc}") from exc
        except sa_exc.DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) in BUSY_SQLSTATES:
                raise DatabaseBusy(f"the database refused a connection: {exc.orig}") from exc
            raise
        finally:
            if task is not None:
                self._holders[task] -= 1
                if not self._holders[task]:
                    del self._holders[task]
            if not nested:
                self._slots.release()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads; raises DatabaseBusy when none is free in time."""
        async with self._slot(), self._sessions() as session:
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction, committed on success and rolled back on error;
        raises DatabaseBusy when none is free in time."""
        if self.is_sqlite:
            # The write lock first: a writer waiting its turn holds no session meanwhile.
            async with self._write_lock, self._slot(), self._sessions() as session, session.begin():
                yield session
        else:
            async with self._slot(), self._sessions() as session, session.begin():
                yield session

    async def close(self) -> None:
        """Dispose of the pool."""
        await self.engine.dispose()

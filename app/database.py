"""Engine, sessions and the embedded PostgreSQL used when no DATABASE_URL is given."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import MetaData
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

from app.errors import OperatorError
from app.settings import Environment, Settings

log = logging.getLogger(__name__)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def asyncpg_url(url: str) -> str:
    """Accept postgres://, postgresql:// or postgresql+asyncpg:// and speak asyncpg."""
    parsed = make_url(url)
    if parsed.get_backend_name() not in {"postgres", "postgresql"}:
        raise ValueError(f"DATABASE_URL must be a PostgreSQL URL, got {parsed.drivername!r}")
    query = dict(parsed.query)
    # libpq spells it sslmode; asyncpg wants ssl.
    if "sslmode" in query:
        query["ssl"] = query.pop("sslmode")
    return parsed.set(drivername="postgresql+asyncpg", query=query).render_as_string(
        hide_password=False
    )


def embedded_database_url(data_dir: Path) -> str:
    """Start (or join) a private PostgreSQL from the pgserver wheel inside data_dir."""
    try:
        import pgserver  # lazily: only the no-DATABASE_URL path needs it, from the extra
    except ImportError:
        raise OperatorError(
            "DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
            "set DATABASE_URL, or pip install 'unblock[embedded]'"
        ) from None

    pgdata = (data_dir / "postgres").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    uri: str = server.get_uri()
    log.info("embedded PostgreSQL running in %s", pgdata)
    return uri


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop the pgserver handles of processes that died without cleaning up.

    pgserver stops its PostgreSQL when the last process holding a handle exits; a handle left by
    a killed process would keep it running forever, so a crashed run's handles are dropped here
    (under pgserver's own lock) and this process's exit stops the server again.
    """
    import psutil  # pgserver's dependency
    from pgserver.postgres_server import PostgresServer

    handles = pgdata / ".handle_pids.json"
    with PostgresServer._lock:
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if pid == os.getpid() or psutil.pid_exists(pid)]
        if alive != pids:
            log.info("embedded PostgreSQL: dropped %d stale handle(s)", len(pids) - len(alive))
            handles.write_text(json.dumps(alive))


def resolve_database_url(settings: Settings) -> str:
    """DATABASE_URL; in dev and tests without one, an embedded PostgreSQL in the data dir."""
    if settings.database_url:
        return asyncpg_url(settings.database_url)
    if settings.env is Environment.PRODUCTION:
        raise OperatorError(
            "DATABASE_URL is not set: point it at PostgreSQL (postgresql://user:pass@host:5432/db)"
            ", or set UNBLOCK_ENV=dev for an embedded one"
        )
    return asyncpg_url(embedded_database_url(settings.data_dir))


def plain_postgres_url(url: str) -> str:
    """The same database as a libpq/asyncpg-native URL (for LISTEN connections)."""
    parsed = make_url(asyncpg_url(url))
    query = dict(parsed.query)
    if "ssl" in query:
        query["sslmode"] = query.pop("ssl")
    return parsed.set(drivername="postgresql", query=query).render_as_string(hide_password=False)


class Database:
    """One engine and session factory per process, made in lifespan and disposed there."""

    def __init__(
        self, url: str, *, pool_size: int = 10, max_overflow: int = 10, **engine_kwargs: Any
    ) -> None:
        self.url = asyncpg_url(url)
        self.engine: AsyncEngine = create_async_engine(
            self.url,
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=max_overflow,
            **engine_kwargs,
        )
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # A plain asyncpg pool for the few hot statements that are one round trip each (webhook
        # ingest): an ORM session costs a pre-ping, a unit of work and a rollback on return,
        # several times the statement itself. No connection is opened until one is needed, so
        # processes that never ingest (workers, commands) never hold one.
        self._driver_pool: asyncpg.Pool | None = None
        self._driver_size = pool_size
        self._driver_ready = asyncio.Lock()

    async def driver_pool(self) -> asyncpg.Pool:
        """The asyncpg pool, opened on first use."""
        if self._driver_pool is None:
            async with self._driver_ready:
                if self._driver_pool is None:
                    self._driver_pool = await asyncpg.create_pool(
                        plain_postgres_url(self.url),
                        min_size=0,
                        max_size=self._driver_size,
                        reset=_reset_if_needed,
                    )
        return self._driver_pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: committed on success, rolled back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        if self._driver_pool is not None:
            await self._driver_pool.close()
        await self.engine.dispose()


async def _reset_if_needed(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset runs a query (UNLISTEN, RESET ALL, …) on every release. The hot
    # statements run outside transactions and set no session state, so only a connection left
    # inside a transaction (a statement cancelled half-way) needs one.
    if conn.is_in_transaction():
        await conn.reset()

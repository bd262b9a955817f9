"""Engine, sessions and the embedded PostgreSQL used when no DATABASE_URL is given."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import Float, MetaData, Text, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeEngine

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


async def _json_codecs(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _end_open_transaction(conn: asyncpg.Connection) -> None:
    # Normally a no-op (no round trip): only a use cut off mid-commit leaves one open.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


@dataclass(frozen=True)
class Compiled:
    """Plain SQL with named binds, compiled once for asyncpg (`Database.raw()`)."""

    sql: str
    names: tuple[str, ...]

    def args(self, values: dict[str, Any]) -> list[Any]:
        return [values[name] for name in self.names]


Constant = str | float | list[str] | None


def compile_named(sql: str, constants: Mapping[str, Constant] | None = None) -> Compiled:
    """SQLAlchemy's compiler turns `:name` binds into asyncpg's `$n` (the same number for a name
    used twice), so raw statements read like the rest of the code's SQL.

    `constants` (values from the code's own tables, the same for every execution) are written
    into the statement as literals, quoted by SQLAlchemy, instead of being encoded and sent with
    every execution: on the webhook path that was a fifth of the driver's CPU per statement."""
    dialect = asyncpg_dialect.dialect()
    if not constants:
        compiled = text(sql).compile(dialect=dialect)
        return Compiled(compiled.string, tuple(compiled.positiontup or ()))
    names = text(sql).compile(dialect=dialect).positiontup or ()
    binds = [
        bindparam(name, value, type_=_literal_type(value), literal_execute=True)
        for name, value in constants.items()
    ] + [bindparam(name, None) for name in dict.fromkeys(names) if name not in constants]
    compiled = (
        text(sql)
        .bindparams(*binds)
        .compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    )
    return Compiled(compiled.string, tuple(compiled.positiontup or ()))


def _literal_type(value: Constant) -> TypeEngine[Any]:
    if isinstance(value, list):
        return ARRAY(Text)
    return Float() if isinstance(value, float) else Text()


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
        # A plain asyncpg pool for the hot paths (webhook ingest, the worker's claims and
        # batched outcomes): an ORM session costs a pre-ping, a unit of work and a rollback on
        # return, several times the statements themselves. No connection is opened until one is
        # needed, so a process only holds the connections it uses.
        self._raw_pool: asyncpg.Pool | None = None
        self._raw_size = pool_size
        self._raw_lock = asyncio.Lock()

    async def driver_pool(self) -> asyncpg.Pool:
        """The plain asyncpg pool, opened on first use.

        asyncpg's pool copes with a task cancelled mid-query (the connection is reset or
        dropped, never handed out inside a transaction) and needs no ping per checkout; jsonb
        columns decode to Python values, as through the ORM.
        """
        if self._raw_pool is None:
            async with self._raw_lock:
                if self._raw_pool is None:
                    self._raw_pool = await asyncpg.create_pool(
                        plain_postgres_url(self.url),
                        min_size=0,
                        max_size=self._raw_size,
                        init=_json_codecs,
                        # Every use is one statement or one transaction that ends before
                        # release, so the default reset (UNLISTEN, RESET ALL…: a round trip per
                        # release) has nothing to undo; only a transaction left open is closed.
                        reset=_end_open_transaction,
                    )
        return self._raw_pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: committed on success, rolled back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def raw(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction on a plain asyncpg connection, for the worker's hot paths.

        No ORM unit of work and no statement compilation: plain SQL that asyncpg prepares once
        per connection (its statement cache), committed on success, rolled back on error, on a
        connection of `driver_pool()`, so these short transactions never queue behind the ORM's.
        """
        pool = await self.driver_pool()
        async with pool.acquire() as pg, pg.transaction():
            yield pg

    async def analyze(self, *tables: str) -> None:
        """Refresh the planner's statistics of `tables` now, rather than when autovacuum next
        gets to them (a minute or more), and so replan the statements every connection has
        prepared (`app.organizations.steps.release_waiting_runs` says when). A role that does
        not own a table gets a warning from PostgreSQL and the table is skipped."""
        pool = await self.driver_pool()
        async with pool.acquire() as pg:
            await pg.execute(f"ANALYZE {', '.join(tables)}")

    async def dispose(self) -> None:
        if self._raw_pool is not None:
            await self._raw_pool.close()
        await self.engine.dispose()

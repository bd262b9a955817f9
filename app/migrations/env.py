"""Alembic environment: async engine on asyncpg, URL from unblock's settings or the caller."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import app.accounts.models
import app.blocked_runs.models
import app.maintenance
import app.organizations.models
import app.subscriptions.models
import app.webhooks.models  # noqa: F401  (registers the tables and indexes on the metadata)
from app.database import Base, asyncpg_url, resolve_database_url
from app.settings import Settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if url:
        return asyncpg_url(url)
    return resolve_database_url(Settings(env="dev"))  # type: ignore[arg-type]


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(_url())
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())

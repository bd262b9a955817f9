"""Starting a process against PostgreSQL: wait for it, say in one line what is wrong, and keep
the worker off a schema that is not at head."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Generator
from datetime import timedelta

import asyncpg
import uvicorn
from sqlalchemy import text
from sqlalchemy.engine import make_url
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from app.database import Database, plain_postgres_url
from app.errors import OperatorError

log = logging.getLogger(__name__)

# Errors PostgreSQL gives while it starts, restarts or fails over: worth waiting out.
_NOT_YET = (
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ConnectionDoesNotExistError,
)


def where(url: str) -> str:
    """host:port of a database URL, as an operator would look it up (never the password)."""
    parsed = make_url(url)
    host = parsed.host or str(parsed.query.get("host") or "localhost")
    return f"{host}:{parsed.port or 5432}"


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (*_NOT_YET, OSError, TimeoutError))


def explain(exc: BaseException, url: str) -> str:
    """One line naming what is wrong with reaching this database and what to fix."""
    parsed = make_url(url)
    at = where(url)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f'database "{parsed.database}" does not exist on {at}: create it or fix DATABASE_URL'
    if isinstance(
        exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
    ):
        return f"PostgreSQL at {at} refused user {parsed.username!r}: {exc}"
    if isinstance(exc, _NOT_YET):
        return f"PostgreSQL at {at} is not accepting connections: {exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the DATABASE_URL host {at}: {exc.strerror or exc}"
    if isinstance(exc, OSError):
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return f"cannot reach PostgreSQL at {at}: {reason}"
    if isinstance(exc, TimeoutError):
        return f"PostgreSQL at {at} did not answer in time"
    return f"cannot use PostgreSQL at {at}: {type(exc).__name__}: {exc}"


async def wait_for_database(url: str, wait: timedelta) -> None:
    """Connect once; while PostgreSQL is unreachable or restarting, retry with backoff.

    One log line per failed attempt; after `UNBLOCK_DATABASE_WAIT`, or at once for a problem
    that waiting cannot fix (wrong password, no such database), an OperatorError.
    `wait` is `UNBLOCK_DATABASE_WAIT` for long-running commands, zero for one-shot ones.
    """
    dsn = plain_postgres_url(url)

    def attempt_failed(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "waiting for the database (attempt %d): %s; retrying in %.1fs",
            state.attempt_number,
            explain(exc, url) if exc else "?",
            delay,
        )

    retrying = AsyncRetrying(
        retry=retry_if_exception(_is_transient),
        wait=wait_random_exponential(multiplier=0.5, max=10),
        stop=stop_after_delay(wait.total_seconds()),
        before_sleep=attempt_failed,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                conn = await asyncpg.connect(dsn, timeout=5)
                await conn.close()
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise OperatorError(explain(exc, url)) from None


@functools.cache
def expected_revisions() -> frozenset[str]:
    """The Alembic heads this code was written for."""
    # Imported here: every worker and API process starts through this module, and only this
    # check needs Alembic.
    from alembic.script import ScriptDirectory

    from app.migrations import alembic_config

    script = ScriptDirectory.from_config(alembic_config(""))
    return frozenset(script.get_heads())


async def schema_problem(db: Database) -> str | None:
    """None when the database schema is at this code's head, else what is wrong, in one line."""
    async with db.engine.connect() as conn:
        exists = await conn.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
        found = (
            frozenset(
                (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars()
            )
            if exists
            else frozenset()
        )
    expected = expected_revisions()
    if found == expected:
        return None
    at = ", ".join(sorted(found)) or "no revision"
    return (
        f"schema at {at}, this unblock needs {', '.join(sorted(expected))}: run `unblock migrate`"
    )


async def wait_for_schema(db: Database, stop: asyncio.Event, *, poll: float = 0.5) -> bool:
    """Wait (quietly: one line per new reason) until migrations have run; False if stopped."""
    said = None
    while not stop.is_set():
        try:
            problem = await schema_problem(db)
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            problem = explain(exc, db.url)
        except Exception as exc:  # SQLAlchemy wraps driver errors; the message is enough here
            problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if problem is None:
            if said is not None:
                log.info("schema at head: the worker starts")
            return True
        if problem != said:
            log.warning("worker waiting: %s", problem)
            said = problem
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)
        poll = min(poll * 2, 10.0)
    return False


class Server(uvicorn.Server):
    """uvicorn that, once stopped by SIGINT/SIGTERM, returns instead of re-raising the signal,
    so the command finishes normally: exit code 0, and atexit hooks (the embedded PostgreSQL's
    stop) run."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # what uvicorn would re-raise on the way out

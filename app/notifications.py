"""Postgres LISTEN/NOTIFY: wakes workers on new work and feeds the SSE streams.

A notification is sent inside the transaction that made the change, so Postgres delivers it only
once that transaction commits. Every replica listens on one dedicated connection; nothing depends
on a notification arriving (workers also poll), it only cuts latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger(__name__)

JOBS_CHANNEL = "unblock_jobs"
RUN_EVENTS_CHANNEL = "unblock_run_events"


async def notify(session: AsyncSession, channel: str, payload: str = "") -> None:
    """NOTIFY on commit. PostgreSQL folds identical notifications of one transaction into one,
    so a repeat (a step's finish, its transition and its release all name the same run or
    organization) is not sent again: one round trip fewer each, same notifications delivered."""
    # Keyed on the innermost transaction: a savepoint rolled back takes its notifications along,
    # so what was sent inside one is sent again outside it.
    transaction = session.get_nested_transaction() or session.get_transaction()
    sent: tuple[object, set[tuple[str, str]]] | None = session.info.get("notified")
    if sent is None or sent[0] is not transaction:
        sent = (transaction, set())
        session.info["notified"] = sent
    if (channel, payload) in sent[1]:
        return
    await session.execute(
        text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload}
    )
    sent[1].add((channel, payload))


class Listener:
    """One LISTEN connection per process, fanning notifications out to local subscribers."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None
        self._subscribers: dict[str, set[asyncio.Queue[str]]] = defaultdict(set)
        self._keeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._connect()
        self._keeper = asyncio.create_task(self._keep_alive(), name="listener-keepalive")

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        for channel in (JOBS_CHANNEL, RUN_EVENTS_CHANNEL):
            await conn.add_listener(channel, self._dispatch)
        self._conn = conn

    async def _keep_alive(self) -> None:
        # A dropped LISTEN connection is replaced; subscribers only lose latency meanwhile.
        while True:
            await asyncio.sleep(5)
            if self._conn is None or self._conn.is_closed():
                try:
                    await self._connect()
                    self._wake_all()
                except (OSError, asyncpg.PostgresError) as exc:
                    log.warning("LISTEN connection lost, retrying: %s", exc)

    def _wake_all(self) -> None:
        for queues in self._subscribers.values():
            for queue in queues:
                queue.put_nowait("")

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        for queue in self._subscribers.get(channel, ()):
            queue.put_nowait(payload)

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[str]]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._subscribers[channel].add(queue)
        try:
            yield queue
        finally:
            self._subscribers[channel].discard(queue)

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()


async def next_change_of(changes: asyncio.Queue[str], *keys: str) -> None:
    """Wait for a notification about one of `keys` (a run's id, its organization's key), or a
    reconnect, which may have missed one."""
    while (await changes.get()) not in (*keys, ""):
        pass

"""What a process needs at run time, made once in lifespan (or at worker start) and closed there."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
from fastapi import Request
from sqlalchemy import select

from app.accounts.models import Account
from app.accounts.secrets import Keyring
from app.database import Database, plain_postgres_url, resolve_database_url
from app.mosaic import MosaicClient, make_http_client
from app.notifications import Listener
from app.settings import Settings
from app.subscriptions.destination import make_http_client as make_notify_client

if TYPE_CHECKING:
    from app.webhooks.ingest import NewsReads

KEY_CACHE_SECONDS = 60
KEY_CACHE_SIZE = 10_000


@dataclass
class Runtime:
    settings: Settings
    db: Database
    http: aiohttp.ClientSession
    mosaic: MosaicClient
    keyring: Keyring
    listener: Listener
    # Outbound notifications to subscribers: its own client (no redirects, no env proxies).
    notify_http: httpx.AsyncClient
    # In-flight immediate attempts that outlived their request's deadline; kept so they finish.
    background: set[asyncio.Task[None]] = field(default_factory=set)
    # Decrypted Mosaic keys for a short while: every step needs one, and keys rarely change.
    _keys: dict[uuid.UUID, tuple[float, str]] = field(default_factory=dict)
    # Webhook secret hashes, so a signature check needs no database read per delivery. A hash
    # is set when its account is made and nothing changes or deletes it; the expiry bounds how
    # long a change made behind the service's back (SQL) could go unseen.
    _secret_hashes: dict[uuid.UUID, tuple[float, str]] = field(default_factory=dict)
    # Group commits of steps' outcomes, by job kind (`work_queue.GroupCommit`), made on use.
    batches: dict[str, Any] = field(default_factory=dict)
    # Webhooks' reads of open episodes, many deliveries per statement; made on first use.
    _news_reads: NewsReads | None = None

    @property
    def news_reads(self) -> NewsReads:
        if self._news_reads is None:
            # Imported here: the webhook module imports what imports this one.
            from app.webhooks.ingest import NewsReads

            self._news_reads = NewsReads(self.db)
        return self._news_reads

    @classmethod
    async def start(cls, settings: Settings, database_url: str | None = None) -> Runtime:
        url = database_url or resolve_database_url(settings)
        db = Database(url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)
        listener = Listener(plain_postgres_url(url))
        await listener.start()
        http = make_http_client(settings)
        return cls(
            settings=settings,
            db=db,
            http=http,
            mosaic=MosaicClient(http, settings.mosaic_base_url),
            keyring=Keyring(settings.encryption_keys),
            listener=listener,
            notify_http=make_notify_client(settings),
        )

    def keep(self, task: asyncio.Task[None]) -> None:
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def mosaic_key(self, account_id: uuid.UUID, *, encrypted: str | None = None) -> str:
        """The account's Mosaic key, briefly cached; `encrypted`: its stored form, read by the
        caller already (a cache miss then costs no round trip)."""
        now = time.monotonic()
        cached = self._keys.get(account_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        if encrypted is not None:
            return self._remember_key(account_id, now, self.keyring.decrypt(encrypted))
        # One indexed read on the plain pool (no session, no pre-ping): a step for an
        # organization seen for the first time pays one round trip here.
        pool = await self.db.driver_pool()
        token = await pool.fetchval(
            "SELECT mosaic_api_key_encrypted FROM accounts WHERE id = $1", account_id
        )
        if token is None:
            raise LookupError(f"account {account_id} is gone")
        return self._remember_key(account_id, now, self.keyring.decrypt(token))

    def _remember_key(self, account_id: uuid.UUID, now: float, key: str) -> str:
        if len(self._keys) > KEY_CACHE_SIZE:
            self._keys.clear()
        self._keys[account_id] = (now + KEY_CACHE_SECONDS, key)
        return key

    async def webhook_secret_hash(self, account_id: uuid.UUID) -> str | None:
        """The account's stored webhook secret hash (None: no such account), briefly cached."""
        now = time.monotonic()
        cached = self._secret_hashes.get(account_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.db.sessions() as session:
            secret_hash = await session.scalar(
                select(Account.webhook_secret_hash).where(Account.id == account_id)
            )
        # Unknown accounts are not remembered: one made a moment later must be found at once.
        if secret_hash is not None:
            if len(self._secret_hashes) >= KEY_CACHE_SIZE:
                self._secret_hashes.clear()
            self._secret_hashes[account_id] = (now + KEY_CACHE_SECONDS, secret_hash)
        return secret_hash

    def forget_webhook_secret(self, account_id: uuid.UUID) -> None:
        """Drop a cached secret hash (call after changing or deleting it)."""
        self._secret_hashes.pop(account_id, None)

    async def close(self) -> None:
        if self.background:
            await asyncio.wait(self.background, timeout=10)
        await self.http.close()
        await self.notify_http.aclose()
        await self.listener.close()
        await self.db.dispose()


async def runtime(request: Request) -> Runtime:
    """FastAPI dependency: the process's runtime, made in lifespan (async: a plain `def`
    dependency would cost every request a hop through the thread pool)."""
    rt: Runtime = request.app.state.runtime
    return rt

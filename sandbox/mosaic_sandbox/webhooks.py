"""Outgoing webhooks: delivered in the background, in order per run, retried with backoff.

Mosaic documents no delivery policy (docs/mosaic.md). The sandbox picks a strict one so that
receivers are exercised: one queue per run (a later event never overtakes an earlier one of the
same run), exponential backoff on non-2xx answers and connection failures, and a log of every
delivery that tests can read at `GET /_sandbox/webhooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from mosaic_sandbox.clock import now

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Mosaic-Signature"
DELIVERY_TIMEOUT = httpx.Timeout(5.0)


@dataclass
class WebhookDelivery:
    id: int
    url: str
    flag: str
    run_id: str
    payload: dict[str, Any]
    signature: str | None
    created_at: datetime
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    delivered: bool = False
    # True until the delivery succeeded or ran out of attempts.
    pending: bool = True
    attempted_at: list[datetime] = field(default_factory=list)


class WebhookDispatcher:
    def __init__(self, *, retry_base: float, max_attempts: int) -> None:
        self.retry_base = retry_base
        self.max_attempts = max_attempts
        self.deliveries: list[WebhookDelivery] = []
        self._queues: dict[str, deque[WebhookDelivery]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None

    def enqueue(
        self, *, run_id: str, url: str, payload: dict[str, Any], secret: str | None
    ) -> WebhookDelivery:
        """Queue one event for `url`; returns at once, delivery happens on a per-run worker."""
        delivery = WebhookDelivery(
            id=len(self.deliveries) + 1,
            url=url,
            flag=payload["flag"],
            run_id=run_id,
            payload=payload,
            signature=secret,
            created_at=now(),
        )
        self.deliveries.append(delivery)
        self._queues.setdefault(run_id, deque()).append(delivery)
        if run_id not in self._workers:
            self._workers[run_id] = asyncio.create_task(
                self._drain(run_id), name=f"webhooks-{run_id}"
            )
        return delivery

    def reset(self) -> None:
        for worker in self._workers.values():
            worker.cancel()
        self._workers.clear()
        self._queues.clear()
        self.deliveries.clear()

    async def aclose(self) -> None:
        workers = list(self._workers.values())
        self.reset()
        for worker in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _drain(self, run_id: str) -> None:
        queue = self._queues[run_id]
        try:
            while queue:
                await self._deliver(queue[0])
                queue.popleft()
        finally:
            # No await between the emptiness check and this cleanup, so an event enqueued
            # meanwhile either was seen by the loop above or finds no worker and starts one.
            if self._workers.get(run_id) is asyncio.current_task():
                del self._workers[run_id]
                self._queues.pop(run_id, None)

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "mosaic-sandbox"}
        if delivery.signature is not None:
            # Mosaic sends the secret itself, in plaintext, not an HMAC (docs/mosaic.md).
            headers[SIGNATURE_HEADER] = delivery.signature
        client = self._http_client()
        while delivery.attempts < self.max_attempts:
            delivery.attempts += 1
            delivery.attempted_at.append(now())
            try:
                response = await client.post(delivery.url, json=delivery.payload, headers=headers)
            except httpx.HTTPError as exc:
                delivery.last_status = None
                delivery.last_error = f"{type(exc).__name__}: {exc}"
            else:
                delivery.last_status = response.status_code
                delivery.last_error = None
                if response.is_success:
                    delivery.delivered = True
                    break
            if delivery.attempts < self.max_attempts:
                await asyncio.sleep(self.retry_base * 2 ** (delivery.attempts - 1))
        delivery.pending = False
        if not delivery.delivered:
            logger.warning(
                "gave up delivering %s for run %s to %s after %d attempts",
                delivery.flag,
                delivery.run_id,
                delivery.url,
                delivery.attempts,
            )

    def _http_client(self) -> httpx.AsyncClient:
        # Made on first use rather than in the lifespan so an app driven without a lifespan
        # (e.g. through httpx's ASGI transport) still delivers; closed in `aclose`.
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=DELIVERY_TIMEOUT)
        return self._client

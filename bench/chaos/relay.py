"""Mosaic's webhooks as an at-least-once sender delivers them: every event the sandbox sends is
taken by this relay and delivered to unblock 2-3 times, shuffled, concurrently, to any replica,
retried until acknowledged. Some `RUN_STARTED` copies arrive late (after the run failed again),
and some `RUN_FINISHED` copies lose their credits flag (an unflagged failure unblock must check
with Mosaic before acting)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.chaos.gateway import Gateway, GaveUp
from bench.env import LOOPBACK

# Called with the event before any copy goes out (e.g. to settle what Mosaic will answer).
BeforeDelivery = Callable[[str, dict[str, Any]], Awaitable[None]]


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class WebhookRelay:
    def __init__(
        self,
        gateway: Gateway,
        rng: random.Random,
        *,
        before_delivery: BeforeDelivery,
        deadline: float,
        unflagged_rate: float = 0.2,
        late_started_rate: float = 0.4,
    ) -> None:
        self._gateway = gateway
        self._rng = rng
        self._before = before_delivery
        self._deadline = deadline
        self._unflagged_rate = unflagged_rate
        self._late_rate = late_started_rate
        self._tasks: set[asyncio.Task[None]] = set()
        self.received: Counter[str] = Counter()
        self.deliveries = 0
        self.unflagged = 0
        self.late_started = 0
        self.lost: list[str] = []
        self.url = ""
        self._server: _QuietServer | None = None
        self._serving: asyncio.Task[None] | None = None

    def callback_url(self, account_id: str) -> str:
        return f"{self.url}/hook/{account_id}"

    async def start(self) -> None:
        app = Starlette(routes=[Route("/hook/{account_id}", self._receive, methods=["POST"])])
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.bind((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{listener.getsockname()[1]}"
        self._server = _QuietServer(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._serving = asyncio.create_task(self._server.serve(sockets=[listener]))
        while not self._server.started:
            if self._serving.done():
                await self._serving
            await asyncio.sleep(0.01)

    async def drain(self) -> None:
        """Wait until every copy taken so far was acknowledged (or given up)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await self._serving

    async def _receive(self, request: Request) -> Response:
        raw = await request.body()
        event: dict[str, Any] = json.loads(raw)
        self.received[str(event.get("flag"))] += 1
        account_id = request.path_params["account_id"]
        signature = request.headers.get("x-mosaic-signature", "")
        # Taken at once: the sandbox gives each attempt 5 s, and the copies go out later anyway.
        task = asyncio.create_task(self._fan_out(account_id, signature, event, raw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Response(status_code=200)

    async def _fan_out(
        self, account_id: str, signature: str, event: dict[str, Any], raw: bytes
    ) -> None:
        delay = 0.1
        while True:
            try:
                await self._before(account_id, event)
                break
            except httpx.HTTPError:
                if time.monotonic() > self._deadline:
                    self.lost.append(f"{account_id}: could not prepare {event.get('flag')}")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        await asyncio.gather(
            *(
                self._deliver(account_id, signature, body, after)
                for body, after in self._copies(event, raw)
            )
        )

    def _copies(self, event: dict[str, Any], raw: bytes) -> list[tuple[bytes, float]]:
        copies = []
        for index in range(self._rng.choice((2, 3))):
            body, delay = raw, self._rng.uniform(0, 0.4)
            if event.get("flag") == "RUN_STARTED" and self._rng.random() < self._late_rate:
                delay += self._rng.uniform(1.0, 3.0)
                self.late_started += 1
            if (
                index == 0
                and event.get("flag") == "RUN_FINISHED"
                and event.get("needs_credits")
                and self._rng.random() < self._unflagged_rate
            ):
                unflagged = {k: v for k, v in event.items() if k != "needs_credits"}
                body = json.dumps(unflagged | {"errors": []}).encode()
                self.unflagged += 1
            copies.append((body, delay))
        return copies

    async def _deliver(self, account_id: str, signature: str, body: bytes, delay: float) -> None:
        # The spread between copies is the fault: copies overtaking each other.
        await asyncio.sleep(delay)
        headers = {"Content-Type": "application/json", "X-Mosaic-Signature": signature}
        try:
            answer = await self._gateway.call(
                "POST",
                f"/v1/webhooks/mosaic/{account_id}",
                content=body,
                headers=headers,
                deadline=max(self._deadline, time.monotonic() + 60),
            )
        except GaveUp:
            self.lost.append(f"{account_id}: never acknowledged")
            return
        self.deliveries += 1
        if answer.status_code != 202:
            self.lost.append(f"{account_id}: answered {answer.status_code} {answer.text[:200]}")

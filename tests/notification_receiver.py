"""A test service that subscribes to unblock's notifications: a plain ASGI app on loopback that
records what it receives, verifies nothing itself, and can be taken down and brought back."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from standardwebhooks.webhooks import Webhook

from conftest import eventually


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


def verify_by_the_spec(secret: str, headers: dict[str, str], body: bytes) -> None:
    """Standard Webhooks verification written from the specification, independent of the
    library unblock signs with: HMAC-SHA256 over `id.timestamp.body` with the base64 secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = headers["webhook-signature"].split(" ")
    assert any(hmac.compare_digest(sig, f"v1,{expected}") for sig in offered), (
        "no v1 signature matches"
    )
    assert abs(time.time() - int(headers["webhook-timestamp"])) < 300


def verify(secret: str, received: Received) -> dict[str, Any]:
    """Both verifiers: the Standard Webhooks library's, and the one from the spec above."""
    verify_by_the_spec(secret, received.headers, received.body)
    payload: dict[str, Any] = Webhook(secret).verify(received.body, received.headers)
    return payload


@dataclass
class Receiver:
    port: int
    status: int = 200
    received: list[Received] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/unblock"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        status = self.status
        if status < 300:
            self.received.append(Received(headers, body))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": f"answered {status}".encode()})

    async def start(self) -> None:
        config = uvicorn.Config(
            self, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("receiver did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        assert self._server is not None
        assert self._task is not None
        self._server.should_exit = True
        await self._task
        self._server = self._task = None

    def events_of(self, key: str) -> list[str]:
        """Event types received about one blocked run (or `org:` + an account), in order."""
        return [
            r.event["type"]
            for r in self.received
            if r.event["data"].get("blocked_run_id") == key
            or (
                key.startswith("org:")
                and r.event["type"] == "decision.needed"
                and r.event["data"]["account_id"] == key[4:]
            )
        ]


async def all_delivered(
    client: httpx.AsyncClient, subscription_id: str, headers: dict[str, str], n: int
) -> list[dict[str, Any]]:
    """The delivery log once all `n` entries are recorded as delivered (a receiver has a
    message a moment before its answer is committed)."""

    async def probe() -> list[dict[str, Any]] | None:
        url = f"/v1/subscriptions/{subscription_id}/deliveries"
        items: list[dict[str, Any]] = (await client.get(url, headers=headers)).json()["items"]
        done = len(items) == n and {d["status"] for d in items} == {"delivered"}
        return items if done else None

    found: list[dict[str, Any]] = await eventually(probe, what=f"{n} deliveries recorded")
    return found

"""The sandbox suite's harness: a webhook receiver and a driver for the sandbox over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mosaic_sandbox import SandboxServer

STEP_DELAY = 0.01
RETRY_BASE = 0.01
EVENT_TIMEOUT = 5.0


@dataclass
class ReceivedWebhook:
    payload: dict[str, Any]
    signature: str | None
    answered: int


@dataclass
class Inbox:
    """One test's webhook endpoint on the shared receiver."""

    url: str
    # Statuses to answer, in order, before answering 200 again.
    failures: list[int] = field(default_factory=list)
    # While set, requests wait for it to be released before being answered.
    hold: asyncio.Event | None = None
    attempts: list[ReceivedWebhook] = field(default_factory=list)
    delivered: asyncio.Queue[ReceivedWebhook] = field(default_factory=asyncio.Queue)

    async def next(self) -> ReceivedWebhook:
        return await asyncio.wait_for(self.delivered.get(), EVENT_TIMEOUT)

    async def until_finished(self) -> list[ReceivedWebhook]:
        """Accepted deliveries up to and including the next RUN_FINISHED."""
        received = [await self.next()]
        while received[-1].payload["flag"] != "RUN_FINISHED":
            received.append(await self.next())
        return received


class WebhookReceiver:
    def __init__(self) -> None:
        self.inboxes: dict[str, Inbox] = {}
        self.base_url = ""
        self._names = itertools.count(1)
        self.app = Starlette(routes=[Route("/hooks/{name}", self._receive, methods=["POST"])])

    def inbox(self) -> Inbox:
        name = f"inbox-{next(self._names)}"
        inbox = Inbox(url=f"{self.base_url}/hooks/{name}")
        self.inboxes[name] = inbox
        return inbox

    async def _receive(self, request: Request) -> JSONResponse:
        inbox = self.inboxes[request.path_params["name"]]
        if inbox.hold is not None:
            await inbox.hold.wait()
        status = inbox.failures.pop(0) if inbox.failures else 200
        received = ReceivedWebhook(
            payload=await request.json(),
            signature=request.headers.get("x-mosaic-signature"),
            answered=status,
        )
        inbox.attempts.append(received)
        if status < 300:
            inbox.delivered.put_nowait(received)
        return JSONResponse({"ok": status < 300}, status_code=status)


class QuietServer(uvicorn.Server):
    # Leave SIGINT to pytest.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class Org:
    id: str
    api_key: str
    client: httpx.AsyncClient


class SandboxDriver:
    """Drives the shared sandbox over HTTP: `control` for /_sandbox, `org()` for API keys."""

    def __init__(self, server: SandboxServer, control: httpx.AsyncClient) -> None:
        self.server = server
        self.url = server.url
        self.control = control
        self._clients: list[httpx.AsyncClient] = []

    def client(self, api_key: str | None) -> httpx.AsyncClient:
        headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
        client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=EVENT_TIMEOUT)
        self._clients.append(client)
        return client

    async def org(self, **fields: Any) -> Org:
        response = await self.control.post("/_sandbox/orgs", json=fields)
        assert response.status_code == 201, response.text
        body = response.json()
        return Org(body["organization_id"], body["api_key"], self.client(body["api_key"]))

    async def state(self, org: Org) -> dict[str, Any]:
        response = await self.control.get(f"/_sandbox/orgs/{org.id}")
        assert response.status_code == 200, response.text
        state: dict[str, Any] = response.json()
        return state

    async def patch(self, org: Org, **fields: Any) -> dict[str, Any]:
        response = await self.control.patch(f"/_sandbox/orgs/{org.id}", json=fields)
        assert response.status_code == 200, response.text
        state: dict[str, Any] = response.json()
        return state

    async def start_run(self, org: Org, callback_url: str | None = None) -> str:
        body: dict[str, Any] = {"video_urls": ["https://example.com/input.mp4"]}
        if callback_url is not None:
            body["callback_url"] = callback_url
        response = await org.client.post("/agent/agent-1/run", json=body)
        assert response.status_code == 200, response.text
        run_id: str = response.json()["run_id"]
        return run_id

    async def settled_run(self, org: Org, run_id: str) -> dict[str, Any]:
        """The run's control view once it stopped running (for runs without a callback)."""
        for _ in range(int(EVENT_TIMEOUT / STEP_DELAY)):
            response = await self.control.get(f"/_sandbox/runs/{run_id}")
            run: dict[str, Any] = response.json()
            if run["status"] != "running":
                return run
            # Nothing to await here: a run without a callback signals nothing.
            await asyncio.sleep(STEP_DELAY)
        raise AssertionError(f"run {run_id} still running")

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

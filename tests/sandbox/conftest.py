"""Fixtures for the sandbox suite: one sandbox and one webhook receiver per test session, both
on the session's event loop; the sandbox is reset before every test."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest_asyncio
import uvicorn

from mosaic_sandbox import SandboxServer

from .harness import (
    EVENT_TIMEOUT,
    RETRY_BASE,
    STEP_DELAY,
    Inbox,
    QuietServer,
    SandboxDriver,
    WebhookReceiver,
)


@pytest_asyncio.fixture(scope="session")
async def sandbox_server() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(step_delay=STEP_DELAY, webhook_retry_base=RETRY_BASE) as server:
        yield server


@pytest_asyncio.fixture(scope="session")
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    # IPPROTO_TCP so asyncio sets TCP_NODELAY on accepted connections (no delayed-ACK stalls).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    receiver.base_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = QuietServer(uvicorn.Config(receiver.app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        assert not task.done(), "webhook receiver failed to start"
        await asyncio.sleep(0.005)
    yield receiver
    server.should_exit = True
    await task


@pytest_asyncio.fixture
async def sandbox(sandbox_server: SandboxServer) -> AsyncIterator[SandboxDriver]:
    async with httpx.AsyncClient(base_url=sandbox_server.url, timeout=EVENT_TIMEOUT) as control:
        # Seed 0 every time: a test that re-seeds must not shift the next test's ids.
        (await control.post("/_sandbox/reset", json={"seed": 0})).raise_for_status()
        driver = SandboxDriver(sandbox_server, control)
        yield driver
        await driver.aclose()


@pytest_asyncio.fixture
async def inbox(webhook_receiver: WebhookReceiver) -> Inbox:
    return webhook_receiver.inbox()

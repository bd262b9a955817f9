"""While PostgreSQL cannot be reached the API answers 503 `database_unavailable` with
Retry-After (nothing was done, try again), not a 500; when it is back, the API is too.

The service reaches PostgreSQL through a TCP relay this test owns, so the outage is real (every
connection cut, new ones refused) without stopping the machine's shared server.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import httpx
import pytest
from sqlalchemy.engine import make_url

from conftest import (
    deliver,
    eventually,
    finished_event,
    free_port,
    fresh_database,
    make_tenant,
    start_service,
)
from conftest import test_settings as service_settings
from mosaic_sandbox import SandboxServer

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Relay:
    """Forwards a local port to PostgreSQL; `cut` drops every connection and refuses new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.port = free_port()
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        pipes = {
            asyncio.create_task(_pipe(reader, upstream_writer)),
            asyncio.create_task(_pipe(upstream_reader, writer)),
        }
        self._pipes |= pipes
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            self._pipes -= pipes
            for end in (writer, upstream_writer):
                end.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def test_an_unreachable_database_is_a_503_with_retry_after_and_the_api_recovers() -> None:
    url = make_url(await fresh_database("outage"))
    relay = Relay(url.host or "127.0.0.1", url.port or 5432)
    await relay.start()
    through_relay = url.set(port=relay.port).render_as_string(hide_password=False)
    async with SandboxServer(step_delay=0.01, webhook_retry_base=0.01) as sandbox:
        settings = service_settings(free_port(), sandbox.url)
        service = await start_service(through_relay, settings, worker=False)
        try:
            async with (
                httpx.AsyncClient(base_url=service.url, timeout=15) as client,
                httpx.AsyncClient(base_url=sandbox.url, timeout=15) as mosaic,
            ):
                tenant = await make_tenant(client, mosaic)
                listed = await client.get("/v1/blocked-runs", headers=tenant.headers)
                assert listed.status_code == 200

                await relay.cut()
                down = await client.get("/v1/blocked-runs", headers=tenant.headers)
                assert down.status_code == 503, down.text
                assert down.headers["content-type"].startswith("application/problem+json")
                assert down.json()["code"] == "database_unavailable"
                assert down.headers["retry-after"] == "2"
                # A webhook that cannot be stored is not acknowledged: Mosaic sends it again.
                run_id = f"run-{uuid.uuid4()}"
                refused = await deliver(client, tenant, finished_event(run_id))
                assert refused.status_code == 503, refused.text

                await relay.start()

                async def back() -> bool:
                    answer = await client.get("/v1/blocked-runs", headers=tenant.headers)
                    return answer.status_code == 200

                await eventually(back, timeout=20, what="the API to answer again")
                stored = await deliver(client, tenant, finished_event(run_id))
                assert stored.json() == {"status": "accepted"}
        finally:
            await service.stop()
            with contextlib.suppress(AssertionError):
                await relay.cut()

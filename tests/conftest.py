"""Shared fixtures: a real PostgreSQL database per test process, the Mosaic sandbox and the
service on loopback, and helpers that act like Mosaic, a person and an internal service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
import uvicorn
from cryptography.fernet import Fernet
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app import migrations
from app.auth import mint_token
from app.main import create_app
from app.runtime import Runtime
from app.settings import Environment, Settings
from mosaic_sandbox import SandboxServer

JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
ENCRYPTION_KEY = Fernet.generate_key().decode()
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _admin_url() -> str:
    """UNBLOCK_TEST_DATABASE_URL, else the local server, else an embedded one (a fresh laptop)."""
    if url := os.environ.get("UNBLOCK_TEST_DATABASE_URL"):
        return url
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5432), timeout=1):
        return DEFAULT_ADMIN_URL
    import pgserver

    root = os.path.join(os.path.expanduser("~"), ".cache", "unblock-test-pg")
    os.makedirs(root, exist_ok=True)
    return str(pgserver.get_server(root, cleanup_mode="stop").get_uri())


async def _recreate(admin_url: str, name: str) -> str:
    parsed = make_url(admin_url)
    conn = await asyncpg.connect(str(parsed.set(drivername="postgresql")))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return parsed.set(database=name).render_as_string(hide_password=False)


# Databases this process made; dropped when the session ends.
CREATED_DATABASES: list[str] = []


def _database_name(suffix: str) -> str:
    # Unique per process, so two people (or two runs) on one server never drop each other's.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"unblock_test_{worker}_{os.getpid()}_{suffix}"
    CREATED_DATABASES.append(name)
    return name


async def _drop_all(admin_url: str) -> None:
    conn = await asyncpg.connect(str(make_url(admin_url).set(drivername="postgresql")))
    try:
        for name in CREATED_DATABASES:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def new_database(suffix: str) -> str:
    """A fresh, migrated database for this test process (xdist workers get their own)."""
    url = asyncio.run(_recreate(_admin_url(), _database_name(suffix)))
    migrations.upgrade(url)
    return url


async def fresh_database(suffix: str, *, migrate: bool = True) -> str:
    """The same, from inside a running event loop."""
    url = await _recreate(_admin_url(), _database_name(suffix))
    if migrate:
        await asyncio.to_thread(migrations.upgrade, url)
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_settings(port: int, mosaic_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": Environment.TEST,
        # The suite fails authentication on purpose, all from 127.0.0.1; throttling has its
        # own tests with low limits.
        "auth_failures_per_source": 1_000_000,
        "auth_failures_per_account": 1_000_000,
        "jwt_secret": JWT_SECRET,
        "encryption_key": ENCRYPTION_KEY,
        "public_url": f"http://127.0.0.1:{port}",
        "mosaic_base_url": mosaic_url,
        "retry_base": 0.05,
        "retry_max": 0.5,
        "action_deadline": 3,
        "poll_interval": 0.5,
        "job_lease": 5,
        "give_up_after": 60,
        # Checkout polling is tested on its own; elsewhere it would add calls at random.
        "checkout_poll": 3600,
        # Many services run at once (one per xdist worker, plus isolated stacks), each with an
        # ORM pool and a plain asyncpg pool: small pools keep the suite under a default
        # server's 100 connections.
        "db_pool_size": 4,
    }
    return Settings(**(values | overrides))


@dataclass
class Service:
    """unblock served by uvicorn on loopback, in the test's event loop."""

    url: str
    app: FastAPI
    server: uvicorn.Server
    task: asyncio.Task[None]

    @property
    def runtime(self) -> Runtime:
        rt: Runtime = self.app.state.runtime
        return rt

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


async def start_service(database_url: str, settings: Settings, *, worker: bool = True) -> Service:
    port = int(settings.public_url.rsplit(":", 1)[1])
    app = create_app(settings, database_url=database_url, run_worker=worker)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            # Longer than httpx's 5 s keep-alive expiry: with both at 5 s, a test client that
            # idles ~5 s (a CLI subprocess starting on a loaded machine) reuses a connection at
            # the moment the server closes it, and the request fails with a ReadError.
            timeout_keep_alive=30,
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise RuntimeError("service did not start")
        await asyncio.sleep(0.01)
    return Service(url=settings.public_url, app=app, server=server, task=task)


@dataclass
class Stack:
    """A private database, sandbox and service, for tests that inject faults or kill workers."""

    database_url: str
    sandbox: SandboxServer
    service: Service
    client: httpx.AsyncClient
    mosaic: httpx.AsyncClient

    async def fault(self, **spec: Any) -> None:
        (await self.mosaic.post("/_sandbox/faults", json=spec)).raise_for_status()


@contextlib.asynccontextmanager
async def isolated_stack(
    name: str, *, worker: bool = True, **overrides: Any
) -> AsyncIterator[Stack]:
    database_url = await fresh_database(name)
    async with SandboxServer(step_delay=0.01, webhook_retry_base=0.01) as sandbox:
        settings = test_settings(free_port(), sandbox.url, **overrides)
        service = await start_service(database_url, settings, worker=worker)
        try:
            async with (
                httpx.AsyncClient(base_url=service.url, timeout=15) as client,
                httpx.AsyncClient(base_url=sandbox.url, timeout=15) as mosaic,
            ):
                yield Stack(database_url, sandbox, service, client, mosaic)
        finally:
            await service.stop()


@pytest.fixture(scope="session")
def database_url() -> str:
    return new_database("main")


@pytest.fixture(scope="session", autouse=True)
def _drop_databases_at_exit() -> Iterator[None]:
    yield
    asyncio.run(_drop_all(_admin_url()))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(step_delay=0.01, webhook_retry_base=0.01) as server:
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def service(database_url: str, sandbox: SandboxServer) -> AsyncIterator[Service]:
    port = free_port()
    svc = await start_service(database_url, test_settings(port, sandbox.url))
    yield svc
    await svc.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def client(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.url, timeout=15) as http:
        yield http


@pytest_asyncio.fixture(loop_scope="session")
async def mosaic(sandbox: SandboxServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=15) as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ADMIN = bearer(mint_token(JWT_SECRET, sub="test-admin", scopes=["accounts:admin"]))


@dataclass
class Tenant:
    """An unblock account tied to a sandbox organization, with tokens for each kind of caller."""

    account_id: str
    webhook_url: str
    webhook_secret: str
    mosaic_key: str
    organization_id: str
    headers: dict[str, str] = field(default_factory=dict)
    service_headers: dict[str, str] = field(default_factory=dict)

    def token(self, *scopes: str, sub: str = "someone") -> dict[str, str]:
        return bearer(
            mint_token(JWT_SECRET, sub=sub, scopes=list(scopes), account_id=self.account_id)
        )


async def make_tenant(client: httpx.AsyncClient, mosaic: httpx.AsyncClient, **org: Any) -> Tenant:
    secret = "whsec_" + uuid.uuid4().hex
    spec = {"plan_id": None, "balance": 0, "checkout": True, "webhook_secret": secret} | org
    created = (await mosaic.post("/_sandbox/orgs", json=spec)).raise_for_status().json()
    account = (
        (
            await client.post(
                "/v1/accounts",
                headers=ADMIN,
                json={
                    "name": "Test Org",
                    "mosaic_api_key": created["api_key"],
                    "webhook_secret": secret,
                },
            )
        )
        .raise_for_status()
        .json()
    )
    tenant = Tenant(
        account_id=account["id"],
        webhook_url=account["webhook_url"],
        webhook_secret=secret,
        mosaic_key=created["api_key"],
        organization_id=created["organization_id"],
    )
    tenant.headers = tenant.token("runs:read", "runs:write", sub="person")
    tenant.service_headers = tenant.token("runs:read", "runs:register", sub="billing-svc")
    return tenant


@pytest_asyncio.fixture(loop_scope="session")
async def tenant(client: httpx.AsyncClient, mosaic: httpx.AsyncClient) -> Tenant:
    """A free organization (checkout needed, no credits) with an unblock account."""
    return await make_tenant(client, mosaic)


def finished_event(run_id: str, **extra: Any) -> dict[str, Any]:
    """A RUN_FINISHED as Mosaic sends it for a credit-blocked run (override any field)."""
    event = {
        "flag": "RUN_FINISHED",
        "agent_id": "agent-7",
        "run_id": run_id,
        "status": "failed",
        "status_message": "Insufficient credits",
        "node_status_counts": {"completed": 1, "in_progress": 0, "failed": 1},
        "needs_credits": True,
        "errors": [],
        "inputs": [],
        "outputs": [],
        "triggered_by": None,
    }
    return event | extra


async def deliver(
    client: httpx.AsyncClient, tenant: Tenant, body: Any, *, signature: str | None = None
) -> httpx.Response:
    """POST a webhook as Mosaic would, signed with the tenant's secret unless told otherwise."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    sig = tenant.webhook_secret if signature is None else signature
    if sig:
        headers["X-Mosaic-Signature"] = sig
    return await client.post(
        f"/v1/webhooks/mosaic/{tenant.account_id}", content=raw, headers=headers
    )


def assert_problem(answer: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """An RFC 9457 problem with this status (and stable code); returns its body."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = answer.json()
    assert {"type", "title", "status", "detail", "code"} <= body.keys()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    if code is not None:
        assert body["code"] == code
        assert body["type"].endswith(code)
    return body


async def start_mosaic_run(
    mosaic: httpx.AsyncClient, tenant: Tenant, agent: str = "agent-1", *, report: bool = True
) -> str:
    """Start a run in the sandbox (through its control surface, so the call log holds only
    unblock's calls); it blocks when credits run out.

    With `report`, Mosaic sends its webhooks to unblock; without, the run is left to finish on
    its own (awaited here) so a test can register it the way an internal service would."""
    body: dict[str, Any] = {
        "organization_id": tenant.organization_id,
        "agent_id": agent,
        "video_urls": ["https://example.com/in.mp4"],
    }
    if report:
        body["callback_url"] = tenant.webhook_url
    answer = await mosaic.post("/_sandbox/runs", json=body)
    answer.raise_for_status()
    run_id = str(answer.json()["run_id"])
    if not report:

        async def finished() -> bool:
            run = await sandbox_run(mosaic, run_id)
            return run["status"] in ("failed", "completed")

        await eventually(finished, what=f"Mosaic run {run_id} to finish")
    return run_id


async def sandbox_run(mosaic: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    """The sandbox's whole view of a run (status, resumes, nodes), without a logged call."""
    answer = await mosaic.get(f"/_sandbox/runs/{run_id}")
    answer.raise_for_status()
    run: dict[str, Any] = answer.json()
    return run


async def eventually(probe: Any, *, timeout: float = 10.0, what: str = "condition") -> Any:
    """Await `probe()` until it returns something truthy (short waits between tries)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.01
    while True:
        result = await probe()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


async def blocked_run_for(
    client: httpx.AsyncClient, tenant: Tenant, run_id: str, timeout: float = 10.0
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        page = await client.get(
            "/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers
        )
        items = page.json()["items"]
        return items[0] if items else None

    found: dict[str, Any] = await eventually(
        probe, timeout=timeout, what=f"blocked run for {run_id}"
    )
    return found


async def wait_for_state(
    client: httpx.AsyncClient,
    tenant: Tenant,
    blocked_id: str,
    *states: str,
    settled: bool = True,
    timeout: float = 15.0,
) -> dict[str, Any]:
    """Follow the run's SSE stream until it is in one of `states` (and no step is pending)."""

    async def follow() -> dict[str, Any]:
        url = f"/v1/blocked-runs/{blocked_id}/events"
        async with client.stream("GET", url, headers=tenant.headers) as stream:
            assert stream.status_code == 200
            last: dict[str, Any] = {}
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    last = json.loads(line[5:])
                    if last["state"] in states and (not settled or not last["pending"]):
                        return last
        raise AssertionError(f"stream ended in {last.get('state')}, wanted {states}")

    return await asyncio.wait_for(follow(), timeout)


async def mosaic_calls(mosaic: httpx.AsyncClient, tenant: Tenant) -> list[tuple[str, str]]:
    """(method, path) of every call the sandbox received with this tenant's key, in order."""
    calls = (await mosaic.get("/_sandbox/calls", params={"api_key": tenant.mosaic_key})).json()
    items = calls["calls"] if isinstance(calls, dict) else calls
    return [(c["method"], c["path"]) for c in items]


async def verifications_settled(service: Service, run_id: str) -> None:
    """Wait until every verification of this Mosaic run has finished and committed."""

    async def done() -> bool:
        async with service.runtime.db.sessions() as session:
            statuses = (
                await session.scalars(
                    text(
                        "SELECT status FROM jobs WHERE kind = 'verify_run' "
                        "AND payload->>'run_id' = :r"
                    ),
                    {"r": run_id},
                )
            ).all()
        return bool(statuses) and "pending" not in statuses

    await eventually(done, what=f"the verification of {run_id} to finish")

"""The world a benchmark runs in: a fresh database, the Mosaic sandbox and the service, each in
its own process on 127.0.0.1, plus settings, tokens and accounts.

The sandbox and the service run as child processes so that the load generator (this process)
does not share a core or the GIL with what it measures, and so the service's RSS is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from app import migrations
from app.auth import mint_token
from app.settings import Environment, Settings

LOOPBACK = "127.0.0.1"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Named per run, so two benchmarks (or a benchmark and a test run) on one server never drop
# each other's databases; each run drops its own at the end.
RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:8]}"
CREATED_DATABASES: list[str] = []
ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0

# Made fresh for each run; handed to the service process through its environment.
JWT_SECRET = "bench-jwt-secret-" + uuid.uuid4().hex
ENCRYPTION_KEY = Fernet.generate_key().decode()


def settings_values(port: int, mosaic_url: str) -> dict[str, Any]:
    """The service's settings for a benchmark: test environment, short retries, loopback only."""
    return {
        "env": Environment.TEST,
        "jwt_secret": JWT_SECRET,
        "encryption_key": ENCRYPTION_KEY,
        "public_url": f"http://{LOOPBACK}:{port}",
        "mosaic_base_url": mosaic_url,
        "retry_base": 0.05,
        "retry_max": 0.5,
        "action_deadline": 3,
        "poll_interval": 0.5,
        "job_lease": 30,
        "give_up_after": 60,
        "log_level": "WARNING",
    }


def bench_settings(port: int, mosaic_url: str, **overrides: Any) -> Settings:
    return Settings(**(settings_values(port, mosaic_url) | overrides))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def check_loopback(url: str) -> None:
    host = httpx.URL(url).host
    if host != LOOPBACK:
        raise SystemExit(f"refusing to send benchmark traffic to {host}: loopback only")


def admin_url() -> str:
    """UNBLOCK_BENCH_ADMIN_URL, else the local server on 5432, else an embedded one (pgserver),
    as the tests do."""
    if url := os.environ.get("UNBLOCK_BENCH_ADMIN_URL"):
        return url
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, 5432), timeout=1):
        return DEFAULT_ADMIN_URL
    import pgserver

    root = Path.home() / ".cache" / "unblock-bench-pg"
    root.mkdir(parents=True, exist_ok=True)
    return str(pgserver.get_server(root, cleanup_mode="stop").get_uri())


async def fresh_database(purpose: str = "main") -> str:
    """Create this run's database for `purpose`, then migrate it to head."""
    admin = make_url(admin_url())
    if admin.host not in (LOOPBACK, "localhost", None):
        raise SystemExit(f"refusing a database on {admin.host}: loopback only")
    name = f"unblock_bench_{RUN_ID}_{purpose}"
    conn = await asyncpg.connect(str(admin.set(drivername="postgresql")))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        CREATED_DATABASES.append(name)
    finally:
        await conn.close()
    url = admin.set(database=name).render_as_string(hide_password=False)
    await asyncio.to_thread(migrations.upgrade, url)
    return url


async def drop_databases() -> None:
    """Drop the databases this run made (and only those)."""
    admin = make_url(admin_url())
    conn = await asyncpg.connect(str(admin.set(drivername="postgresql")))
    try:
        while CREATED_DATABASES:
            name = CREATED_DATABASES.pop()
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass
class Child:
    """A process this benchmark started (ended by its own pid, never by name)."""

    name: str
    url: str
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


async def _wait_ready(child: Child, probe_path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with httpx.AsyncClient(base_url=child.url, timeout=2) as http:
        while True:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(probe_path)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                child.stop()
                raise RuntimeError(f"{child.name} did not start within {STARTUP_TIMEOUT}s")
            await asyncio.sleep(0.05)


def spawn(
    args: list[str], env: Mapping[str, str] | None = None, *, pipes: bool = False
) -> subprocess.Popen[bytes]:
    """`python ARGS` from the repository root; with `pipes`, stdin and stdout are pipes."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
        stdout=subprocess.PIPE if pipes else None,
    )


async def start_sandbox(step_delay: float = 0.01) -> Child:
    """The Mosaic sandbox (`python -m mosaic_sandbox`), no faults, on a loopback port."""
    port = free_port()
    process = spawn(
        [
            "-m",
            "mosaic_sandbox",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--step-delay",
            str(step_delay),
            "--log-level",
            "warning",
        ],
    )
    child = Child("sandbox", f"http://{LOOPBACK}:{port}", process)
    await _wait_ready(child, "/_sandbox/faults")
    return child


def child_environment(database_url: str, mosaic_url: str) -> dict[str, str]:
    """What a service or worker process needs from this run (see `child_settings`)."""
    return {
        "UNBLOCK_BENCH_DATABASE_URL": database_url,
        "UNBLOCK_BENCH_MOSAIC_URL": mosaic_url,
        "UNBLOCK_BENCH_JWT_SECRET": JWT_SECRET,
        "UNBLOCK_BENCH_ENCRYPTION_KEY": ENCRYPTION_KEY,
    }


def child_settings(port: int) -> tuple[Settings, str]:
    """In a child process: the parent's settings and the database URL."""
    settings = bench_settings(
        port,
        os.environ["UNBLOCK_BENCH_MOSAIC_URL"],
        jwt_secret=os.environ["UNBLOCK_BENCH_JWT_SECRET"],
        encryption_key=os.environ["UNBLOCK_BENCH_ENCRYPTION_KEY"],
    )
    return settings, os.environ["UNBLOCK_BENCH_DATABASE_URL"]


async def start_service(database_url: str, mosaic_url: str, *, worker: bool) -> Child:
    """unblock's API (create_app + uvicorn) in its own process; see bench/service.py."""
    port = free_port()
    process = spawn(
        ["-m", "bench.service", "--port", str(port), *([] if worker else ["--no-worker"])],
        env=child_environment(database_url, mosaic_url),
    )
    child = Child("service", f"http://{LOOPBACK}:{port}", process)
    await _wait_ready(child, "/readyz")
    return child


@contextlib.asynccontextmanager
async def children() -> AsyncIterator[list[Child]]:
    """Collects started children and stops every one of them on the way out."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            child.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ADMIN = bearer(mint_token(JWT_SECRET, sub="bench-admin", scopes=["accounts:admin"]))


@dataclass
class Tenant:
    """A sandbox organization and the unblock account tied to it."""

    account_id: str
    webhook_path: str
    webhook_secret: str
    mosaic_key: str
    organization_id: str


async def make_tenant(service: httpx.AsyncClient, sandbox: httpx.AsyncClient) -> Tenant:
    """A free organization (no paid plan, no credits) with an unblock account."""
    secret = "whsec_" + uuid.uuid4().hex
    spec = {"plan_id": None, "balance": 0, "checkout": True, "webhook_secret": secret}
    org = (await sandbox.post("/_sandbox/orgs", json=spec)).raise_for_status().json()
    body = {"name": "Bench Org", "mosaic_api_key": org["api_key"], "webhook_secret": secret}
    account = (
        (await service.post("/v1/accounts", headers=ADMIN, json=body)).raise_for_status().json()
    )
    return Tenant(
        account_id=account["id"],
        webhook_path=httpx.URL(account["webhook_url"]).path,
        webhook_secret=secret,
        mosaic_key=org["api_key"],
        organization_id=org["organization_id"],
    )

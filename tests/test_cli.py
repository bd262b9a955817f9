"""The `unblock` command as an operator runs it: key rotation, the worker's metrics, migrate."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import asyncpg
import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from app.accounts.secrets import Keyring
from app.auth import mint_token
from conftest import ENCRYPTION_KEY, JWT_SECRET, eventually, free_port, fresh_database

pytestmark = pytest.mark.asyncio(loop_scope="session")


def env_for(database_url: str, **extra: str) -> dict[str, str]:
    return (
        os.environ
        | {
            "DATABASE_URL": database_url,
            "UNBLOCK_JWT_SECRET": JWT_SECRET,
            "UNBLOCK_ENCRYPTION_KEY": ENCRYPTION_KEY,
            "UNBLOCK_LOG_LEVEL": "WARNING",
        }
        | extra
    )


async def unblock(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def stored_keys(database_url: str) -> list[str]:
    conn = await asyncpg.connect(str(make_url(database_url).set(drivername="postgresql")))
    try:
        rows = await conn.fetch("SELECT mosaic_api_key_encrypted FROM accounts")
    finally:
        await conn.close()
    return [r[0] for r in rows]


async def test_rotate_keys_re_encrypts_every_stored_key_under_the_newest_key() -> None:
    url = await fresh_database("cli_rotate")
    code, out, _ = await unblock(
        "accounts",
        "create",
        "--name",
        "Rotating",
        "--mosaic-api-key",
        "mk_rotate_me",
        env=env_for(url),
    )
    assert code == 0
    assert "mk_rotate_me" not in out
    assert json.loads(out)["webhook_secret"].startswith("whsec_")

    new_key = Fernet.generate_key().decode()
    code, out, err = await unblock(
        "accounts",
        "rotate-keys",
        env=env_for(url, UNBLOCK_ENCRYPTION_KEY=f"{new_key},{ENCRYPTION_KEY}"),
    )
    assert code == 0, err
    assert "re-encrypted 1 account key" in out
    (token,) = await stored_keys(url)
    assert Keyring([new_key]).decrypt(token) == "mk_rotate_me"
    with pytest.raises(ValueError, match="cannot be decrypted"):
        Keyring([ENCRYPTION_KEY]).decrypt(token)


async def test_serve_refuses_a_bad_configuration_with_a_clear_message() -> None:
    code, _, err = await unblock(
        "serve", env=env_for("postgresql://x@127.0.0.1:1/x", UNBLOCK_ENCRYPTION_KEY="")
    )
    assert code == 2
    assert "UNBLOCK_ENCRYPTION_KEY" in err
    assert "Traceback" not in err


async def test_worker_serves_metrics_and_stops_cleanly_on_sigterm() -> None:
    url = await fresh_database("cli_worker")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "worker", "--metrics-port", str(port), env=env_for(url)
    )
    try:
        async with httpx.AsyncClient() as client:

            async def metrics() -> str | None:
                try:
                    answer = await client.get(f"http://127.0.0.1:{port}/metrics")
                except httpx.TransportError:
                    return None
                return answer.text

            text = await eventually(metrics, timeout=20, what="the worker's metrics")
        assert "unblock_jobs_total" in text
        assert "unblock_mosaic_calls_total" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_migrate_then_serve_as_a_deployment_starts_it() -> None:
    """What the acceptance harness and the manifests do: `unblock migrate`, then `unblock serve`."""
    url = await fresh_database("cli_serve", migrate=False)
    port = free_port()
    env = env_for(url, UNBLOCK_PUBLIC_URL=f"http://127.0.0.1:{port}")
    code, _, err = await unblock("migrate", env=env)
    assert code == 0, err
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port), env=env
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout=30, what="the service to be ready")
            admin = mint_token(JWT_SECRET, sub="ops", scopes=["accounts:admin"])
            created = await client.post(
                "/v1/accounts",
                headers={"Authorization": f"Bearer {admin}"},
                json={"name": "Deployed", "mosaic_api_key": "mk_deployed"},
            )
            assert created.status_code == 201
            assert created.json()["webhook_url"].startswith(f"http://127.0.0.1:{port}/v1/")
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert await asyncio.wait_for(proc.wait(), 20) in (0, -signal.SIGTERM)

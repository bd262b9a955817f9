"""Safe at the edge: hostile bodies, tokens and clients get a 4xx (or a closed connection), never
a 5xx, unbounded memory or a connection held forever."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from app.auth import mint_token
from app.http_server import server_options
from app.main import create_app
from app.settings import Settings
from app.throttle import FailureThrottle
from conftest import (
    ADMIN,
    JWT_SECRET,
    Service,
    Tenant,
    assert_problem,
    bearer,
    deliver,
    finished_event,
    free_port,
    start_service,
)
from conftest import test_settings as settings_for
from mosaic_sandbox import SandboxServer

pytestmark = pytest.mark.asyncio(loop_scope="session")


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
    """The status line and headers of one HTTP/1.1 answer."""
    status = await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


# --- 1. Bodies are bounded while they arrive, before authentication --------------------------


async def test_a_chunked_body_past_the_limit_is_cut_off_before_it_is_read(
    service: Service,
) -> None:
    """50 MB, chunked, to the webhook of an account that does not exist: answered 413 after
    about a megabyte, not after the whole body has been buffered."""
    host, port = host_port(service.url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        (
            f"POST /v1/webhooks/mosaic/{uuid.uuid4()} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
    )
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    total, sent = 50_000_000, 0

    async def send_body() -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            while sent < total:
                writer.write(frame)
                await writer.drain()
                sent += len(chunk)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    sender = asyncio.create_task(send_body())
    try:
        status, headers = await asyncio.wait_for(read_head(reader), 60)
        sent_when_answered = sent
        body = await reader.readexactly(int(headers["content-length"]))
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
    assert status.startswith(b"HTTP/1.1 413"), status
    assert headers["content-type"].startswith("application/problem+json")
    assert json.loads(body)["code"] == "payload_too_large"
    # The limit is 1 MB; socket buffers on both sides account for a few more at most.
    assert sent_when_answered < total // 2


@pytest.mark.parametrize(
    ("path", "size"),
    [
        ("/v1/accounts", 100_000_000),  # no token: refused for its size before the 401
        ("/v1/webhooks/mosaic/7b0e7c52-3f7a-4c55-9d43-0b1f3f5a2e11", 1_000_001),
        ("/v1/blocked-runs/5d6c2f0e-8a1b-4f7e-b2c3-9e4d5a6b7c8d/choose-plan", 64 * 1024 + 1),
    ],
    ids=["accounts, no token", "webhook, unknown account", "run action"],
)
async def test_a_declared_length_past_the_limit_is_413_before_anything_is_read(
    service: Service, path: str, size: int
) -> None:
    host, port = host_port(service.url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    try:
        status, headers = await asyncio.wait_for(read_head(reader), 30)
        body = json.loads(await reader.readexactly(int(headers["content-length"])))
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 413"), status
    assert headers["content-type"].startswith("application/problem+json")
    assert body["code"] == "payload_too_large"


async def test_an_api_body_past_64_kib_is_413_even_when_well_formed(
    client: httpx.AsyncClient,
) -> None:
    name = "n" * (70 * 1024)
    answer = await client.post(
        "/v1/accounts", headers=ADMIN, json={"name": name, "mosaic_api_key": "mk_x"}
    )
    assert_problem(answer, 413, "payload_too_large")


# --- 5. Tokens the database cannot take are refused at the edge ------------------------------


def token_for(tenant: Tenant, **claims: Any) -> dict[str, str]:
    claims = {"sub": "svc", "scopes": ["runs:register", "runs:read"]} | claims
    return bearer(
        mint_token(
            JWT_SECRET,
            sub=claims["sub"],
            scopes=claims["scopes"],
            account_id=claims.get("account_id", tenant.account_id),
        )
    )


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"account_id": str(uuid.uuid4())}, "unknown_account"),
        ({"sub": "s" * 300}, "invalid_token"),
        ({"sub": "nul\x00inside"}, "invalid_token"),
        ({"sub": "lone \ud800 surrogate"}, "invalid_token"),
    ],
    ids=["unknown account", "long sub", "NUL in sub", "lone surrogate in sub"],
)
async def test_a_signed_token_the_database_cannot_take_is_401(
    client: httpx.AsyncClient, tenant: Tenant, claims: dict[str, Any], code: str
) -> None:
    answer = await client.post(
        "/v1/blocked-runs",
        json={"run_id": f"run-{uuid.uuid4()}"},
        headers=token_for(tenant, **claims),
    )
    assert_problem(answer, 401, code)


# --- 6. A run id can never change the Mosaic path --------------------------------------------


@pytest.mark.parametrize("run_id", [".", "..", "a/b", "../plan", "run?x=1", "run#x", " run"])
async def test_a_run_id_that_is_not_one_path_segment_is_422(
    client: httpx.AsyncClient, tenant: Tenant, run_id: str
) -> None:
    answer = await client.post(
        "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
    )
    assert_problem(answer, 422, "validation_error")


# --- 7. Failed authentication is throttled -----------------------------------------------------


@contextlib.asynccontextmanager
async def strict_service(
    database_url: str, sandbox: SandboxServer, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A second service on the suite's database, with its own settings (and throttles)."""
    settings = settings_for(free_port(), sandbox.url, **overrides)
    svc = await start_service(database_url, settings, worker=False)
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=15) as http:
            yield http
    finally:
        await svc.stop()


async def test_bad_tokens_from_one_source_are_answered_429_once_its_failures_are_spent(
    database_url: str, sandbox: SandboxServer, tenant: Tenant
) -> None:
    async with strict_service(database_url, sandbox, auth_failures_per_source=5) as http:
        wrong = bearer(mint_token("another-secret-0123456789abcdef0123", sub="x", scopes=[]))
        answers = [await http.get("/v1/blocked-runs", headers=wrong) for _ in range(5)]
        assert {a.status_code for a in answers} == {401}
        refused = await http.get("/v1/blocked-runs", headers=wrong)
        assert_problem(refused, 429, "too_many_failures")
        assert int(refused.headers["retry-after"]) >= 1
        # While the source is throttled even a good token waits: nothing is verified for it.
        good = await http.get("/v1/blocked-runs", headers=tenant.headers)
        assert_problem(good, 429, "too_many_failures")
        # Health checks and missing tokens are not guesses.
        assert (await http.get("/healthz")).status_code == 200


async def test_bad_signatures_for_one_account_are_answered_429_once_its_failures_are_spent(
    database_url: str, sandbox: SandboxServer, tenant: Tenant
) -> None:
    async with strict_service(
        database_url, sandbox, auth_failures_per_source=1000, auth_failures_per_account=4
    ) as http:
        event = finished_event(f"run-{uuid.uuid4()}")
        answers = [await deliver(http, tenant, event, signature=f"guess-{i}") for i in range(4)]
        assert {a.status_code for a in answers} == {401}
        refused = await deliver(http, tenant, event, signature="guess-5")
        assert_problem(refused, 429, "too_many_failures")
        assert int(refused.headers["retry-after"]) >= 1
        # Refused before its body is read: the answer comes though the body never does, on
        # both HTTP paths (the account id as 8-4-4-4-12, and as 32 hex digits).
        host, port = host_port(str(http.base_url))
        for account in (tenant.account_id, uuid.UUID(tenant.account_id).hex):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                (
                    f"POST /v1/webhooks/mosaic/{account} HTTP/1.1\r\nHost: {host}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                ).encode()
            )
            try:
                status, _ = await asyncio.wait_for(read_head(reader), 10)
            finally:
                writer.close()
            assert status.startswith(b"HTTP/1.1 429"), (account, status)


async def test_a_short_webhook_secret_is_refused(client: httpx.AsyncClient) -> None:
    for secret in ("x", "short-secret", "a" * 40):
        answer = await client.post(
            "/v1/accounts",
            headers=ADMIN,
            json={"name": "Acme", "mosaic_api_key": "mk_x", "webhook_secret": secret},
        )
        body = assert_problem(answer, 422, "validation_error")
        assert secret not in answer.text or secret == "x"
        assert body["errors"][0]["loc"][-1] == "webhook_secret"


# --- 8. Slow, idle and too many clients ---------------------------------------------------------


@contextlib.asynccontextmanager
async def served_like_unblock_serve(
    database_url: str, sandbox: SandboxServer, **overrides: Any
) -> AsyncIterator[tuple[str, int]]:
    """The app under uvicorn with the options `unblock serve` gives it."""
    port = free_port()
    settings: Settings = settings_for(port, sandbox.url, **overrides)
    app = create_app(settings, database_url=database_url, run_worker=False)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        **server_options(settings),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
        await asyncio.sleep(0.01)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        await task


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection."""
    return await reader.read()


async def test_a_silent_or_trickling_client_is_disconnected_at_the_header_deadline(
    database_url: str, sandbox: SandboxServer
) -> None:
    async with served_like_unblock_serve(database_url, sandbox, header_timeout=0.5) as (h, p):
        silent_reader, silent = await asyncio.open_connection(h, p)
        trickle_reader, trickle = await asyncio.open_connection(h, p)
        trickle.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")

        async def trickle_headers() -> None:
            with contextlib.suppress(ConnectionError):
                while True:  # a header byte now and then, never the end of the head
                    trickle.write(b"X")
                    await trickle.drain()
                    await asyncio.sleep(0.05)

        trickler = asyncio.create_task(trickle_headers())
        try:
            assert await asyncio.wait_for(closed_by_server(silent_reader), 10) == b""
            assert await asyncio.wait_for(closed_by_server(trickle_reader), 10) == b""
        finally:
            trickler.cancel()
            silent.close()
            trickle.close()
        # A client that sends its request in time is served, with no server banner.
        async with httpx.AsyncClient(base_url=f"http://{h}:{p}") as http:
            answer = await http.get("/healthz")
        assert answer.status_code == 200
        assert "server" not in answer.headers


async def test_connections_past_the_cap_are_answered_503(
    database_url: str, sandbox: SandboxServer
) -> None:
    async with served_like_unblock_serve(
        database_url, sandbox, max_connections=3, header_timeout=60
    ) as (h, p):
        idle = [await asyncio.open_connection(h, p) for _ in range(3)]
        try:
            async with httpx.AsyncClient(base_url=f"http://{h}:{p}") as http:
                assert (await http.get("/healthz")).status_code == 503
        finally:
            for _, writer in idle:
                writer.close()


async def test_an_event_stream_ends_when_its_token_expires(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    registered = await client.post(
        "/v1/blocked-runs", json={"run_id": f"run-{uuid.uuid4()}"}, headers=tenant.service_headers
    )
    assert registered.status_code == 201, registered.text
    url = f"/v1/blocked-runs/{registered.json()['id']}/events"
    short = bearer(
        mint_token(
            JWT_SECRET,
            sub="person",
            scopes=["runs:read"],
            account_id=tenant.account_id,
            ttl_seconds=2,
        )
    )

    async def follow() -> list[dict[str, Any]]:
        seen = []
        async with client.stream("GET", url, headers=short) as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:]))
        return seen

    # Without the deadline the stream lives as long as the run (days); here it ends in seconds.
    seen = await asyncio.wait_for(follow(), 12)
    assert seen
    assert seen[-1]["state"] not in ("resumed", "cancelled", "failed", "expired")


# --- 9. What every answer says about itself ------------------------------------------------------


async def test_answers_carry_nosniff_and_no_store(client: httpx.AsyncClient) -> None:
    for answer in (
        await client.get("/healthz"),
        await client.get("/v1/blocked-runs"),
        await client.get("/v1/blocked-runs", headers=ADMIN),
    ):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-store"


async def test_a_405_names_every_method_the_path_takes_in_allow(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.delete("/v1/accounts")
    assert_problem(answer, 405, "method_not_allowed")
    assert answer.headers["allow"] == "POST"
    # Two routes share this path; the answer names the methods of both.
    answer = await client.delete("/v1/blocked-runs")
    assert_problem(answer, 405, "method_not_allowed")
    assert answer.headers["allow"] == "GET, HEAD, POST"


async def test_a_throttled_key_may_try_again_once_its_bucket_refills() -> None:
    now = [0.0]
    throttle = FailureThrottle(6, clock=lambda: now[0])  # six a minute: one back every 10 s
    for _ in range(6):
        assert throttle.retry_after("k") is None
        throttle.failed("k")
    assert throttle.retry_after("k") == 10
    assert throttle.retry_after("another") is None
    now[0] = 9.5
    assert throttle.retry_after("k") == 1
    now[0] = 10.5
    assert throttle.retry_after("k") is None
    throttle.failed("k")
    assert throttle.retry_after("k") == 10

"""Webhook deliveries are served ahead of the HTTP stack (`app/webhooks/endpoint.py`).

What that path gives a delivery must be what the rest of the stack gives every request: the
same answers, the request id, the security headers, bounded bodies, the problem answers for
errors. Requests it passes on (an account id in another form, a browser's `Origin`) are served
by the documented route, which is how these tests reach the route for comparison.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from structlog.contextvars import get_contextvars

from app.security_headers import SECURITY_HEADERS
from app.webhooks import endpoint
from conftest import (
    Service,
    Tenant,
    assert_problem,
    deliver,
    finished_event,
    isolated_stack,
    make_tenant,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Headers that differ between any two answers, whichever path served them.
_PER_ANSWER = {"date", "server", "x-request-id"}


def _shape(answer: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    headers = {k: v for k, v in answer.headers.items() if k not in _PER_ANSWER}
    return answer.status_code, answer.json(), headers


def _cases(tenant: Tenant) -> dict[str, tuple[str | None, bytes, dict[str, str]]]:
    """Name: (account id or None for the tenant's, body, extra headers)."""
    progress = {"flag": "RUN_PROGRESS", "run_id": "r-1", "status": "running"}
    return {
        "ignored": (None, json.dumps(progress).encode(), {}),
        "completed run, nothing open": (
            None,
            json.dumps(finished_event("r-done", status="completed", needs_credits=False)).encode(),
            {},
        ),
        "wrong signature": (None, b"{}", {"X-Mosaic-Signature": "whsec_wrong"}),
        "no signature": (None, b"{}", {"X-Mosaic-Signature": ""}),
        "unknown account": (str(uuid.uuid4()), b"{}", {}),
        "not JSON": (None, b"{not json", {}),
        "not an object": (None, b"[1, 2]", {}),
        "NUL": (None, b'{"flag": "RUN_FINISHED", "run_id": "a\\u0000"}', {}),
        "no run_id": (None, b'{"flag": "RUN_FINISHED"}', {}),
    }


async def _post(
    client: httpx.AsyncClient, account: str, body: bytes, headers: dict[str, str], secret: str
) -> httpx.Response:
    sent = {"Content-Type": "application/json", "X-Mosaic-Signature": secret} | headers
    if not sent["X-Mosaic-Signature"]:
        del sent["X-Mosaic-Signature"]
    return await client.post(f"/v1/webhooks/mosaic/{account}", content=body, headers=sent)


async def test_the_fast_path_and_the_route_answer_alike(
    client: httpx.AsyncClient, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each case sent twice: with the account id as 8-4-4-4-12 (served by WebhookEndpoint) and
    as 32 hex digits (the same id, which only the FastAPI route accepts). Same status, body and
    headers, but for the date and the request id."""
    served = {"fast": 0}
    answer = endpoint.WebhookEndpoint._answer

    async def counted(self: Any, *args: Any) -> Any:
        served["fast"] += 1
        return await answer(self, *args)

    monkeypatch.setattr(endpoint.WebhookEndpoint, "_answer", counted)
    for name, (account, body, headers) in _cases(tenant).items():
        account_id = uuid.UUID(account or tenant.account_id)
        before = served["fast"]
        fast = await _post(client, str(account_id), body, headers, tenant.webhook_secret)
        assert served["fast"] == before + 1, name
        route = await _post(client, account_id.hex, body, headers, tenant.webhook_secret)
        assert served["fast"] == before + 1, name
        assert _shape(fast) == _shape(route), name
        assert fast.status_code != 500, name

    # Accepted, then a copy: the two paths store and deduplicate alike.
    for account in (tenant.account_id, uuid.UUID(tenant.account_id).hex):
        event = finished_event(f"run-{uuid.uuid4()}")
        first = await _post(client, account, json.dumps(event).encode(), {}, tenant.webhook_secret)
        again = await _post(client, account, json.dumps(event).encode(), {}, tenant.webhook_secret)
        assert (first.status_code, first.json()) == (202, {"status": "accepted"})
        assert (again.status_code, again.json()) == (202, {"status": "duplicate"})
        assert first.headers["content-type"] == "application/json"


async def test_every_answer_carries_the_request_id_and_the_security_headers(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    progress = {"flag": "RUN_PROGRESS", "run_id": "r-2"}
    answers = [
        await deliver(client, tenant, progress),
        await deliver(client, tenant, progress),
        await deliver(client, tenant, progress, signature="whsec_wrong"),
    ]
    assert [a.status_code for a in answers] == [202, 202, 401]
    for answer in answers:
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers[name] == value
        assert answer.headers["cache-control"] == "no-store"
        assert len(answer.headers["x-request-id"]) == 32
        int(answer.headers["x-request-id"], 16)
    assert len({a.headers["x-request-id"] for a in answers}) == 3
    assert answers[2].headers["www-authenticate"] == "Bearer"

    url = f"/v1/webhooks/mosaic/{tenant.account_id}"
    signed = {"X-Mosaic-Signature": tenant.webhook_secret}
    given = await client.post(url, json=progress, headers=signed | {"X-Request-ID": "mosaic-7.1"})
    assert given.headers["x-request-id"] == "mosaic-7.1"
    odd = await client.post(url, json=progress, headers=signed | {"X-Request-ID": "a b\tc"})
    assert odd.headers["x-request-id"] != "a b\tc"
    assert len(odd.headers["x-request-id"]) == 32


async def test_an_unexpected_error_is_a_logged_500_and_an_unreachable_database_a_503(
    client: httpx.AsyncClient,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[dict[str, Any]] = []
    failure: list[BaseException] = [RuntimeError("boom")]

    async def failing(*_: Any) -> Any:
        seen.append(get_contextvars())
        raise failure[0]

    monkeypatch.setattr(endpoint, "receive", failing)
    with caplog.at_level(logging.ERROR, logger="app.errors"):
        broken = await deliver(client, tenant, {"flag": "RUN_PROGRESS", "run_id": "r"})
    body = assert_problem(broken, 500, "internal_error")
    assert "boom" not in json.dumps(body)
    assert broken.headers["x-content-type-options"] == "nosniff"
    assert any(r.exc_info and r.exc_info[1] is failure[0] for r in caplog.records)
    # Log lines written while the delivery is served name it and its account.
    assert seen[0]["request_id"] == broken.headers["x-request-id"]
    assert seen[0]["account_id"] == tenant.account_id

    failure[0] = asyncpg.CannotConnectNowError("the database system is starting up")
    down = await deliver(client, tenant, {"flag": "RUN_PROGRESS", "run_id": "r"})
    assert_problem(down, 503, "database_unavailable")
    assert down.headers["retry-after"] == "2"


async def test_a_client_gone_before_its_body_arrived_is_not_an_error(
    service: Service, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    errors: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record)

    # Errors of ours reach the root logger; uvicorn reports an exception escaping the
    # application on its own logger, which does not propagate there.
    loggers = [logging.getLogger(), logging.getLogger("uvicorn.error")]
    collect = Collect(logging.ERROR)
    for logger in loggers:
        logger.addHandler(collect)
    try:
        host, port = service.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            (
                f"POST /v1/webhooks/mosaic/{tenant.account_id} HTTP/1.1\r\nHost: {host}\r\n"
                f"X-Mosaic-Signature: {tenant.webhook_secret}\r\n"
                'Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"flag": '
            ).encode()
        )
        await writer.drain()
        writer.write_eof()
        assert await reader.read() == b""  # closed without an answer: no one to answer
        writer.close()
        after = await deliver(client, tenant, {"flag": "RUN_PROGRESS", "run_id": "r"})
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
    assert after.status_code == 202
    assert errors == []


async def test_a_browser_request_is_served_by_the_route_with_cors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request with `Origin` is left to the full stack, so CORS answers it as any route."""

    async def never(*_: Any) -> Any:
        raise AssertionError("served by WebhookEndpoint")

    async with isolated_stack("webhook_cors", cors_origins="https://app.example.com") as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        monkeypatch.setattr(endpoint.WebhookEndpoint, "_answer", never)
        answer = await stack.client.post(
            f"/v1/webhooks/mosaic/{tenant.account_id}",
            json={"flag": "RUN_PROGRESS", "run_id": "r"},
            headers={
                "X-Mosaic-Signature": tenant.webhook_secret,
                "Origin": "https://app.example.com",
            },
        )
    assert (answer.status_code, answer.json()) == (202, {"status": "ignored"})
    assert answer.headers["access-control-allow-origin"] == "https://app.example.com"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-request-id"]

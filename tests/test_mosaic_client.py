"""The Mosaic client reads every documented shape and fails in ways the worker can act on.

The sandbox covers the normal readings; a small server of canned answers, over real HTTP on
loopback, stands in for edge cases the sandbox cannot produce (non-JSON answers, odd
Retry-After values, unexpected shapes, answers cut off or too large).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from app.mosaic import (
    MAX_ANSWER_BYTES,
    MosaicClient,
    MosaicError,
    PlanState,
    env_proxy,
    needs_credits,
    parse_credits,
    parse_plan_list,
)

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Canned:
    """A loopback HTTP server that answers each request with the next canned answer."""

    url: str
    answers: list[Answer] = field(default_factory=list)
    raw_paths: list[str] = field(default_factory=list)


def json_answer(status: int, body: object, headers: dict[str, str] | None = None) -> Answer:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=headers)

    return answer


def text_answer(status: int, text: str, headers: dict[str, str] | None = None) -> Answer:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=text, headers=headers)

    return answer


@pytest_asyncio.fixture(loop_scope="session")
async def canned() -> AsyncIterator[Canned]:
    server = Canned(url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        server.raw_paths.append(request.raw_path)
        await request.read()
        return await server.answers.pop(0)(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


NEW_LIST = {
    "plans": [
        {
            "id": "creator",
            "billing": "monthly",
            "price_usd": 50,
            "credits_per_month": 2500,
            "top_up_rate_per_100_credits_usd": 2,
            "notes": "n",
            "brand_new_field": True,
        },
        {
            "id": "creator_annual",
            "billing": "annual",
            "price_usd": 480,
            "credits_per_month": 2500,
            "top_up_rate_per_100_credits_usd": 2,
            "notes": "n",
        },
    ]
}
OLD_LIST = {
    "plans": [
        {
            "id": "creator",
            "aliases": ["creator", "creator_annual"],
            "monthly_price_usd": 50,
            "annual_price_usd": 500,
            "credits_per_month": 2500,
            "top_up_rate_per_100_credits_usd": 2,
            "notes": "n",
        },
        {
            "id": "professional",
            "aliases": ["professional", "professional_annual", "pro"],
            "monthly_price_usd": 150,
            "annual_price_usd": 1500,
            "credits_per_month": 10000,
            "top_up_rate_per_100_credits_usd": 1.6,
            "notes": "n",
        },
        {
            "id": "enterprise",
            "aliases": ["enterprise"],
            "monthly_price_usd": None,
            "annual_price_usd": None,
            "credits_per_month": None,
            "top_up_rate_per_100_credits_usd": 1.1,
            "notes": "Contact sales",
        },
    ]
}


def test_the_newer_plan_list_is_read_as_is_and_unknown_fields_are_ignored() -> None:
    offers = parse_plan_list(NEW_LIST)
    assert [(o.id, o.billing, o.price_usd) for o in offers] == [
        ("creator", "monthly", 50),
        ("creator_annual", "annual", 480),
    ]


def test_the_older_plan_list_becomes_one_offer_per_purchasable_id() -> None:
    offers = parse_plan_list(OLD_LIST)
    assert [(o.id, o.billing, o.price_usd) for o in offers] == [
        ("creator", "monthly", 50),
        ("creator_annual", "annual", 500),
        ("professional", "monthly", 150),
        ("professional_annual", "annual", 1500),
    ]
    assert offers[2].aliases == ["pro"]  # enterprise has no price: not offered


@pytest.mark.parametrize(
    ("body", "balance", "enabled"),
    [
        (
            {
                "organization_id": "o",
                "balance": 1840,
                "plan": "creator",
                "plan_id": "creator_annual",
                "auto_topup": {
                    "eligible": True,
                    "enabled": True,
                    "threshold": 1000,
                    "quantity": 5000,
                },
            },
            1840,
            True,
        ),
        (
            {
                "organization_id": "o",
                "credits": {
                    "balance": 12,
                    "unlimited": False,
                    "usage": 1,
                    "included_usage": 2,
                    "next_reset_at": None,
                },
                "plan": "creator",
            },
            12,
            None,
        ),
        (
            {
                "credits": {
                    "balance": 3,
                    "auto_topup": {"enabled": True, "threshold": 1, "quantity": 2},
                }
            },
            3,
            True,
        ),
    ],
)
def test_both_credit_shapes_are_read(body: dict, balance: int, enabled: bool | None) -> None:
    credits = parse_credits(body)
    assert credits.balance == balance
    assert (credits.auto_topup.enabled if credits.auto_topup else None) == enabled


@pytest.mark.parametrize(
    ("plan", "paid"),
    [
        (None, False),
        ({"id": "creator", "family": "creator", "status": "active"}, True),
        ({"id": "pro", "status": "active"}, True),
        ({"id": "creator", "status": "canceled"}, False),
        ({"id": "free", "status": "active"}, False),
        ({"id": None, "status": "active"}, False),
        ({"id": "professional_annual"}, True),
    ],
)
def test_a_plan_is_paid_only_when_active_and_named(plan: dict | None, paid: bool) -> None:
    assert PlanState.model_validate({"plan": plan, "extra": 1}).is_paid is paid


@pytest.mark.parametrize(
    ("payload", "blocked"),
    [
        ({"needs_credits": True}, True),
        ({"needsCredits": True}, True),
        ({"needs_credits": False, "nodes": [{"needs_credits": True}]}, True),
        ({"updated_nodes": [{"needsCredits": True}]}, True),
        ({"needs_credits": False, "nodes": [{"needs_credits": False}]}, False),
        ({"status": "failed"}, False),
    ],
)
def test_either_spelling_on_the_run_or_a_node_means_blocked(payload: dict, blocked: bool) -> None:
    assert needs_credits(payload) is blocked


@pytest.mark.asyncio(loop_scope="session")
async def test_errors_carry_status_detail_and_retry_after(canned: Canned) -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    canned.answers = [
        json_answer(429, {"detail": "slow down"}, {"Retry-After": "2"}),
        text_answer(503, "<html>bad gateway</html>", {"Retry-After": later}),
        text_answer(200, "not json"),
        json_answer(200, {"plan": 42}),
        json_answer(401, {"detail": "bad key"}),
    ]
    async with aiohttp.ClientSession() as http:
        client = MosaicClient(http, canned.url)
        with pytest.raises(MosaicError) as limited:
            await client.get_plan("mk_x")
        assert (limited.value.status, limited.value.detail, limited.value.retry_after) == (
            429,
            "slow down",
            2.0,
        )
        assert limited.value.transient
        with pytest.raises(MosaicError) as down:
            await client.get_plan("mk_x")
        assert (down.value.status, down.value.detail) == (503, "<html>bad gateway</html>")
        assert down.value.transient
        assert down.value.retry_after is not None
        assert 25 < down.value.retry_after <= 30
        for _ in range(2):  # a 200 that is not what the docs describe is Mosaic's fault (502)
            with pytest.raises(MosaicError) as odd:
                await client.get_plan("mk_x")
            assert odd.value.status == 502
            assert not odd.value.transient  # re-asking will not make it readable
        with pytest.raises(MosaicError) as refused:
            await client.get_plan("mk_x")
        assert not refused.value.transient
    assert canned.answers == []


@pytest.mark.asyncio(loop_scope="session")
async def test_no_connection_at_all_is_transient_unreached_and_names_no_secret() -> None:
    async with aiohttp.ClientSession() as http:
        client = MosaicClient(http, f"http://127.0.0.1:{_closed_port()}")
        with pytest.raises(MosaicError) as failed:
            await client.resume_run("mk_secret_key", "run-1")
    assert failed.value.status is None
    assert failed.value.transient
    assert not failed.value.reached  # refused: Mosaic cannot have acted
    assert not failed.value.ambiguous
    assert "mk_secret_key" not in str(failed.value)


@pytest.mark.asyncio(loop_scope="session")
async def test_an_answer_cut_off_after_the_request_may_have_been_acted_on(canned: Canned) -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()  # the request arrived; its answer never leaves
        return web.Response()

    canned.answers = [hang_up]
    async with aiohttp.ClientSession() as http:
        with pytest.raises(MosaicError) as lost:
            await MosaicClient(http, canned.url).resume_run("mk_secret_key", "run-1")
    assert lost.value.status is None
    assert lost.value.reached
    assert lost.value.ambiguous  # the next attempt must read before it POSTs again
    assert "mk_secret_key" not in str(lost.value)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_run_id_is_sent_as_one_encoded_path_segment(canned: Canned) -> None:
    canned.answers = [json_answer(200, {"status": "running"})]
    async with aiohttp.ClientSession() as http:
        await MosaicClient(http, canned.url).resume_run("mk_x", "run/../x?y")
    assert canned.raw_paths[-1] == "/agent_run/run%2F..%2Fx%3Fy/resume"


@pytest.mark.asyncio(loop_scope="session")
async def test_the_environment_s_proxy_carries_the_calls_unless_no_proxy_names_mosaic(
    canned: Canned, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", canned.url)
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.setenv("NO_PROXY", "billing.internal")
    monkeypatch.delenv("no_proxy", raising=False)
    canned.answers = [json_answer(200, {"plan": {"id": "creator", "status": "active"}})]
    async with aiohttp.ClientSession() as http:
        # Nothing answers at mosaic.invalid: only the proxy (the canned server) can.
        assert (await MosaicClient(http, "http://mosaic.invalid").get_plan("mk_x")).is_paid
    assert canned.raw_paths[-1] == "http://mosaic.invalid/plan"
    assert env_proxy("http://billing.internal/v1") is None
    assert env_proxy("http://mosaic.invalid") == canned.url


@pytest.mark.asyncio(loop_scope="session")
async def test_an_answer_too_large_is_refused_without_buffering_it(canned: Canned) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        # No Content-Length: the client can only stop reading once the bound is passed.
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b" " * 65536
        for _ in range(MAX_ANSWER_BYTES // len(chunk) + 2):
            await response.write(chunk)
        await response.write_eof()
        return response

    canned.answers = [stream, json_answer(200, {"plan": {"id": "creator", "status": "active"}})]
    async with aiohttp.ClientSession() as http:
        client = MosaicClient(http, canned.url)
        with pytest.raises(MosaicError) as large:
            await client.get_plan("mk_x")
        assert large.value.status == 502
        assert large.value.unexpected_shape
        assert not large.value.transient
        assert (await client.get_plan("mk_x")).is_paid  # and the next call goes through


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        ("-5", 0.0),
        ("inf", 3600.0),
        ("1e12", 3600.0),
        ("nan", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00", None),
        ("", None),
    ],
)
def test_retry_after_is_read_defensively(value: str, seconds: float | None) -> None:
    from app.mosaic import _retry_after

    assert _retry_after(value) == seconds


def test_lax_readings_of_plans_flags_and_topup_settings() -> None:
    assert PlanState.model_validate({"plan": "free"}).is_paid is False
    assert PlanState.model_validate({"plan": "creator"}).is_paid is True
    credits = parse_credits({"auto_topup": {"enabled": None, "threshold": None, "quantity": 5}})
    assert credits.auto_topup is not None
    assert (credits.auto_topup.enabled, credits.auto_topup.threshold) == (False, 0)
    assert needs_credits({"needs_credits": "false"}) is False
    assert needs_credits({"needsCredits": "true"}) is True


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("run_id", [".", "..", "...", ""])
async def test_a_run_id_that_is_a_dot_segment_is_refused_without_calling_mosaic(
    run_id: str, canned: Canned
) -> None:
    """`/agent_run/..` is `/` once normalised: GET / and POST /resume on Mosaic with the key."""
    canned.raw_paths.clear()
    async with aiohttp.ClientSession() as http:
        client = MosaicClient(http, canned.url)
        for call in (client.get_run, client.get_run_nodes, client.resume_run):
            with pytest.raises(MosaicError) as refused:
                await call("mk_x", run_id)
            assert refused.value.status == 422
            assert not refused.value.transient  # a retry would refuse it again
    assert canned.raw_paths == []

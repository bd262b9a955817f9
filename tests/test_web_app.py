"""The reference web app in a real browser (system Chromium), against the service and the
sandbox over real HTTP: from blocked to resumed, as a person would click through it.

With UNBLOCK_SCREENSHOTS=<dir> (`make screenshots`), each step is saved there as a PNG; the
README shows the committed ones from docs/screenshots/.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app.auth import mint_token
from conftest import (
    ADMIN,
    JWT_SECRET,
    Tenant,
    blocked_run_for,
    eventually,
    isolated_stack,
    make_tenant,
    mosaic_calls,
    start_mosaic_run,
    wait_for_state,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = os.environ.get("UNBLOCK_SCREENSHOTS")
DESKTOP = {"width": 900, "height": 700}
PHONE = {"width": 390, "height": 760}

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    # CI sets UNBLOCK_REQUIRE_BROWSER=1 and installs Chromium: there these never skip.
    pytest.mark.skipif(
        not CHROMIUM.exists() and not os.environ.get("UNBLOCK_REQUIRE_BROWSER"),
        reason=f"no system Chromium at {CHROMIUM} for the browser tests",
    ),
]


@pytest_asyncio.fixture(loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


def person_token(tenant: Tenant) -> str:
    return mint_token(
        JWT_SECRET, sub="person", scopes=["runs:read", "runs:write"], account_id=tenant.account_id
    )


async def snap(page: Any, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (a local dir)
        await page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


async def blocked(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, tenant: Tenant, count: int, state: str
) -> list[dict[str, Any]]:
    runs = []
    for n in range(count):
        run_id = await start_mosaic_run(mosaic, tenant, agent=f"agent-video-{n + 1}")
        found = await blocked_run_for(client, tenant, run_id)
        runs.append(await wait_for_state(client, tenant, found["id"], state))
    return runs


# What the security-headers middleware will send: the app must work under it.
STRICT_POLICY = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"


async def strict_policy(route: Any) -> None:
    response = await route.fetch()
    headers = response.headers | {"content-security-policy": STRICT_POLICY}
    await route.fulfill(response=response, headers=headers)


# Uncaught errors of the app's script, per page: each test ends asserting there were none.
SCRIPT_ERRORS: dict[int, list[str]] = {}


def script_errors(page: Any) -> list[str]:
    return SCRIPT_ERRORS.get(id(page), [])


async def open_app(browser: Any, url: str, tenant: Tenant, viewport: dict[str, int]) -> Any:
    from playwright.async_api import expect

    page = await browser.new_page(viewport=viewport)
    errors = SCRIPT_ERRORS.setdefault(id(page), [])
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console", lambda msg: errors.append(msg.text) if "Security Policy" in msg.text else None
    )
    await page.route(f"{url}/app**", strict_policy)
    await page.goto(f"{url}/app#token={person_token(tenant)}")
    # The token moved into the tab's storage; the address bar no longer shows it.
    await expect(page.get_by_role("heading", name="Your organization's decision")).to_be_visible()
    assert "token" not in page.url
    return page


async def test_a_person_takes_a_blocked_organization_from_choice_to_resumed(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, service: Any, browser: Any
) -> None:
    from playwright.async_api import expect

    tenant = await make_tenant(client, mosaic, name="Northwind Films")
    runs = await blocked(client, mosaic, tenant, 2, "awaiting_choice")
    page = await open_app(browser, service.url, tenant, DESKTOP)
    # One decision for the organization, however many runs wait on it.
    await expect(page.locator("#decision-summary")).to_contain_text("2 runs wait")
    await expect(page.get_by_role("heading", name="Choose a plan")).to_have_count(1)
    await expect(page.locator("#runs li")).to_have_count(2)
    await expect(page.locator("#runs")).to_contain_text("Waiting for a plan to be chosen")
    creator = page.locator(".plan", has_text="creator").first
    await expect(creator).to_contain_text("$50.00 a month")
    await expect(creator).to_contain_text("2,500 a month")
    await expect(creator).to_contain_text("$2.00 per 100 credits")
    await snap(page, "1-choose-a-plan")

    # Keyboard only: focus the plan's button and press Enter; focus lands on the decision.
    await page.get_by_role("button", name="Choose creator", exact=True).focus()
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", name="Finish the checkout")).to_be_visible()
    await expect(page.locator("#decision-summary")).to_be_focused()
    await expect(page.locator("#runs")).to_contain_text("Waiting for the checkout to be paid")
    await snap(page, "2-checkout-open")

    await page.get_by_role("link", name="Open the checkout").click()
    await expect(page.locator("h1")).to_have_text("Subscribe to creator")
    await snap(page, "3-mosaic-checkout-page")
    await page.get_by_role("button", name="Pay").click()

    # Back in the app, which confirms by itself: the top-up question, with its price.
    await expect(page.get_by_role("heading", name="Turn on auto top-up?")).to_be_visible()
    await expect(page).to_have_url(f"{service.url}/app")
    cost = page.locator("#topup-cost")
    await expect(cost).to_contain_text("buys 2,500 credits for $50.00")
    await page.get_by_label("Buy this many credits").fill("1000")
    await expect(cost).to_contain_text("buys 1,000 credits for $20.00")
    await expect(cost).to_contain_text("takes 3 top-ups: $60.00")
    await snap(page, "4-auto-topup-question")

    await page.get_by_role("button", name="Turn on auto top-up").click()
    await expect(page.locator("#runs .state-resumed")).to_have_count(2)
    await expect(page.locator("#runs")).to_contain_text("Running again")
    await expect(page.locator("#decision-summary")).to_contain_text("Decided")
    await snap(page, "5-runs-resumed")

    for run in runs:
        done = await wait_for_state(client, tenant, run["id"], "resumed")
        assert done["topup"] == {
            "eligible": True,
            "enabled": True,
            "threshold": 500,
            "quantity": 1000,
        }
    org = (await mosaic.get(f"/_sandbox/orgs/{tenant.organization_id}")).json()
    assert org["plan_id"] == "creator"
    # The return from checkout confirmed it: a fresh GET /plan after the purchase.
    calls = await mosaic_calls(mosaic, tenant)
    assert calls.count(("POST", "/plan/upgrade")) == 1
    assert ("GET", "/plan") in calls[calls.index(("POST", "/plan/upgrade")) + 1 :]
    history = (await client.get("/v1/organization", headers=tenant.headers)).json()["history"]
    confirmed = next(h for h in history if h["event"] == "checkout_confirmed")
    assert confirmed["actor"] == "user:person"
    assert script_errors(page) == []
    await page.close()


async def test_a_checkout_paid_in_another_tab_moves_on_with_no_click(browser: Any) -> None:
    from playwright.async_api import expect

    async with isolated_stack("web_no_click", checkout_poll=0.2, checkout_poll_max=0.5) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        (run,) = await blocked(stack.client, stack.mosaic, tenant, 1, "awaiting_choice")
        page = await open_app(browser, stack.service.url, tenant, DESKTOP)
        await page.get_by_role("button", name="Choose professional", exact=True).click()
        await expect(page.get_by_role("heading", name="Finish the checkout")).to_be_visible()

        # The person pays and closes that tab: nothing comes back to the app.
        (checkout,) = [
            c
            for c in (await stack.mosaic.get("/_sandbox/checkouts")).json()
            if c["organization_id"] == tenant.organization_id
        ]
        done = await stack.mosaic.post(f"/_sandbox/checkouts/{checkout['checkout_id']}/complete")
        done.raise_for_status()

        # The worker's poll sees the paid plan; the open page follows the event stream.
        await expect(page.get_by_role("heading", name="Turn on auto top-up?")).to_be_visible()
        await expect(page.locator("#topup-cost")).to_contain_text("$1.60 per 100")
        await expect(page.locator("#runs")).to_contain_text("Waiting for the auto top-up answer")
        await snap(page, "6-paid-elsewhere-no-click")
        history = (await stack.client.get("/v1/organization", headers=tenant.headers)).json()
        confirmed = next(h for h in history["history"] if h["event"] == "checkout_confirmed")
        assert confirmed["actor"] == "system"
        prompt = await wait_for_state(stack.client, tenant, run["id"], "topup_prompt")
        assert prompt["plan"]["id"] == "professional"
        assert script_errors(page) == []
        await page.close()


async def test_a_cancelled_checkout_comes_back_and_a_declined_topup_still_resumes(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, service: Any, browser: Any
) -> None:
    from playwright.async_api import expect

    tenant = await make_tenant(client, mosaic)
    (run,) = await blocked(client, mosaic, tenant, 1, "awaiting_choice")
    page = await open_app(browser, service.url, tenant, PHONE)
    await page.get_by_role("button", name="Choose creator", exact=True).click()
    await expect(page.get_by_role("heading", name="Finish the checkout")).to_be_visible()
    first_checkout = await page.locator("#checkout-link").get_attribute("href")
    assert first_checkout
    assert "/checkout/" in first_checkout
    await page.get_by_role("link", name="Open the checkout").click()
    await page.get_by_role("button", name="Cancel").click()

    # Back in the app: nothing was charged, and another plan starts a new checkout.
    await expect(page.locator("#notice")).to_contain_text("cancelled; nothing was charged")
    await expect(page.get_by_role("heading", name="Choose a plan")).to_be_visible()
    await expect(page.get_by_role("link", name="Open the checkout")).to_be_hidden()
    org = (await mosaic.get(f"/_sandbox/orgs/{tenant.organization_id}")).json()
    assert org["plan_id"] is None
    await snap(page, "7-checkout-cancelled-phone")

    # Another plan replaces the cancelled checkout; this one is paid.
    await page.get_by_role("button", name="Choose professional", exact=True).click()
    await expect(page.locator("#checkout-link")).not_to_have_attribute("href", first_checkout)
    await page.get_by_role("link", name="Open the checkout").click()
    await expect(page.locator("h1")).to_have_text("Subscribe to professional")
    await page.get_by_role("button", name="Pay").click()
    await expect(page.get_by_role("heading", name="Turn on auto top-up?")).to_be_visible()

    await page.get_by_role("button", name="Not now").click()
    await expect(page.locator("#runs .state-resumed")).to_have_count(1)
    await snap(page, "8-declined-topup-resumed-phone")
    done = await wait_for_state(client, tenant, run["id"], "resumed")
    assert done["topup"]["enabled"] is False
    assert ("POST", "/credits/settings") not in await mosaic_calls(mosaic, tenant)
    assert script_errors(page) == []
    await page.close()


async def test_errors_say_what_to_do_and_change_nothing(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, service: Any, browser: Any
) -> None:
    from playwright.async_api import expect

    tenant = await make_tenant(client, mosaic, plan_id="creator", balance=0)
    capped = await client.patch(
        f"/v1/accounts/{tenant.account_id}", json={"monthly_topup_cap_usd": "40"}, headers=ADMIN
    )
    assert capped.status_code == 200, capped.text
    (run,) = await blocked(client, mosaic, tenant, 1, "topup_prompt")

    # A wrong token: the sign-in form says so, and what to do.
    page = await browser.new_page(viewport=DESKTOP)
    await page.goto(f"{service.url}/app")
    await page.get_by_label("Access token").fill("not-a-token")
    await page.get_by_role("button", name="Sign in").click()
    problem = page.get_by_role("alert").filter(has_text="not valid")
    await expect(problem).to_contain_text("invalid_token")
    await expect(problem).to_contain_text("Sign in again")
    await expect(page.get_by_label("Access token")).to_be_visible()
    await page.close()

    page = await open_app(browser, service.url, tenant, DESKTOP)
    await expect(page.locator("#topup-cap")).to_contain_text("$40.00 a month")
    # Over the cap: 1,000 credits cost $20.00, a worst-case month three of them.
    await page.get_by_label("Buy this many credits").fill("1000")
    await page.get_by_role("button", name="Turn on auto top-up").click()
    problem = page.locator("#problem")
    await expect(problem).to_be_visible()
    await expect(problem).to_contain_text("topup_over_spend_cap")
    await expect(problem).to_contain_text("ask an admin to raise the cap")
    await expect(problem).to_be_focused()
    await snap(page, "9-error-over-the-spend-cap")
    assert ("POST", "/credits/settings") not in await mosaic_calls(mosaic, tenant)
    still = (await client.get(f"/v1/blocked-runs/{run['id']}", headers=tenant.headers)).json()
    assert still["state"] == "topup_prompt"

    # Within the cap (one month of top-ups, $50.00, is over it too: 3,000 credits is $60.00).
    await client.patch(
        f"/v1/accounts/{tenant.account_id}", json={"monthly_topup_cap_usd": "60"}, headers=ADMIN
    )
    await page.reload()
    await page.get_by_label("Buy this many credits").fill("3000")
    await page.get_by_role("button", name="Turn on auto top-up").click()
    await expect(page.locator("#runs .state-resumed")).to_have_count(1)
    await expect(page.locator("#problem")).to_be_hidden()

    async def enabled() -> bool:
        credits = await mosaic.get(
            "/credits", headers={"Authorization": f"Bearer {tenant.mosaic_key}"}
        )
        return bool(credits.json()["auto_topup"]["quantity"] == 3000)

    await eventually(enabled, what="auto top-up of 3,000 credits in Mosaic")
    assert script_errors(page) == []
    await page.close()

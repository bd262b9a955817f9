"""The hosted checkout page, clicked through in a real browser (system Chromium)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .harness import SandboxDriver
from .mosaic_shapes import CheckoutUpgrade, PlanAnswer, expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.asyncio,
    # CI sets UNBLOCK_REQUIRE_BROWSER=1 and installs Chromium: there the test never skips.
    pytest.mark.skipif(
        not CHROMIUM.exists() and not os.environ.get("UNBLOCK_REQUIRE_BROWSER"),
        reason=f"no system Chromium at {CHROMIUM} for the browser test",
    ),
]


async def test_paying_on_the_checkout_page_switches_the_plan(sandbox: SandboxDriver) -> None:
    from playwright.async_api import async_playwright
    from playwright.async_api import expect as expect_page

    org = await sandbox.org(checkout=True, name="Browser Org", balance=0)
    upgrade = expect(
        await org.client.post("/plan/upgrade", json={"plan_id": "professional"}), CheckoutUpgrade
    )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            await page.goto(upgrade.checkout_url)
            await expect_page(page.locator("h1")).to_have_text("Subscribe to professional")
            await expect_page(page.locator("main")).to_contain_text("Browser Org")
            await expect_page(page.locator("main")).to_contain_text("$150.00 / month")
            await page.get_by_role("button", name="Pay").click()
            await expect_page(page.locator("h1")).to_have_text("Payment complete")
        finally:
            await browser.close()

    plan = expect(await org.client.get("/plan"), PlanAnswer)
    assert plan.plan is not None
    assert plan.plan.id == "professional"
    assert plan.credits.balance == 10_000

"""The hosted checkout a person clicks through after `POST /plan/upgrade` asks for one.

Plain HTML forms, no JavaScript: Pay and Cancel post back here, then the browser is sent (303) to
the `success_url` / `cancel_url` given to /plan/upgrade, or back to this page, which then says
how the checkout ended.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from mosaic_sandbox import billing
from mosaic_sandbox.catalogue import PLANS
from mosaic_sandbox.dependencies import SandboxDep
from mosaic_sandbox.errors import ApiError
from mosaic_sandbox.state import Checkout, CheckoutStatus, Sandbox

router = APIRouter(prefix="/checkout", include_in_schema=False)

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; background: #f4f5f7;
       color: #1f2430; margin: 0; display: flex; min-height: 100vh; align-items: center;
       justify-content: center; }
main { background: #fff; border-radius: 12px; box-shadow: 0 2px 12px rgba(0,0,0,.08);
       padding: 2rem 2.5rem; width: 22rem; }
h1 { font-size: 1.25rem; margin: 0 0 .25rem; }
.org { color: #5b6275; margin: 0 0 1.5rem; }
dl { display: grid; grid-template-columns: auto 1fr; gap: .4rem 1rem; margin: 0 0 1.5rem; }
dt { color: #5b6275; } dd { margin: 0; font-weight: 600; text-align: right; }
.actions { display: flex; gap: .75rem; }
.actions form { flex: 1; }
button { width: 100%; padding: .7rem; border-radius: 8px; font-size: 1rem; cursor: pointer;
         border: 1px solid #c9cdd8; background: #fff; color: #1f2430; }
button.pay { background: #3d5afe; border-color: #3d5afe; color: #fff; font-weight: 600; }
.note { color: #5b6275; font-size: .85rem; margin-top: 1.25rem; }
"""


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    html = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body><main>{body}</main></body>
</html>"""
    return HTMLResponse(html, status_code=status_code)


def _find(sandbox: Sandbox, checkout_id: str) -> Checkout | None:
    return sandbox.checkouts.get(checkout_id)


def _not_found() -> HTMLResponse:
    return _page(
        "Checkout not found",
        "<h1>Checkout not found</h1><p>This checkout link is unknown or has expired.</p>",
        404,
    )


@router.get("/{checkout_id}")
async def show_checkout(checkout_id: str, sandbox: SandboxDep) -> HTMLResponse:
    checkout = _find(sandbox, checkout_id)
    if checkout is None:
        return _not_found()
    org = sandbox.organizations[checkout.organization_id]
    plan = PLANS[checkout.plan_id]
    if checkout.status is CheckoutStatus.PAID:
        return _page(
            "Payment complete",
            f"<h1>Payment complete</h1><p class='org'>{escape(org.name)}</p>"
            f"<p>You are now on the <strong>{escape(plan.id)}</strong> plan. "
            "You can close this tab.</p>",
        )
    if checkout.status is CheckoutStatus.CANCELLED:
        return _page(
            "Checkout cancelled",
            f"<h1>Checkout cancelled</h1><p class='org'>{escape(org.name)}</p>"
            "<p>Nothing was charged. You can close this tab.</p>",
        )
    period = "year" if plan.billing == "annual" else "month"
    return _page(
        f"Subscribe to {plan.id}",
        f"""<h1>Subscribe to {escape(plan.id)}</h1>
<p class="org">{escape(org.name)}</p>
<dl>
  <dt>Plan</dt><dd>{escape(plan.id)}</dd>
  <dt>Price</dt><dd>${plan.price_usd:,.2f} / {period}</dd>
  <dt>Credits</dt><dd>{plan.credits_per_month:,} / month</dd>
</dl>
<div class="actions">
  <form method="post" action="/checkout/{escape(checkout.id)}/cancel">
    <button type="submit" class="cancel">Cancel</button>
  </form>
  <form method="post" action="/checkout/{escape(checkout.id)}/pay">
    <button type="submit" class="pay">Pay</button>
  </form>
</div>
<p class="note">Mosaic sandbox — no real payment is taken.</p>""",
    )


@router.post("/{checkout_id}/pay")
async def pay_checkout(checkout_id: str, sandbox: SandboxDep) -> Response:
    return _close(sandbox, checkout_id, paid=True)


@router.post("/{checkout_id}/cancel")
async def cancel_checkout(checkout_id: str, sandbox: SandboxDep) -> Response:
    return _close(sandbox, checkout_id, paid=False)


def _close(sandbox: Sandbox, checkout_id: str, *, paid: bool) -> Response:
    checkout = _find(sandbox, checkout_id)
    if checkout is None:
        return _not_found()
    try:
        billing.close_checkout(sandbox, checkout, paid=paid)
    except ApiError as exc:
        return _page(
            "Checkout closed",
            f"<h1>Checkout already closed</h1><p>{escape(exc.detail)}.</p>",
            exc.status_code,
        )
    target = checkout.success_url if paid else checkout.cancel_url
    # 303 so the browser follows with a GET; a reload then does not pay twice.
    return RedirectResponse(target or f"/checkout/{checkout.id}", status_code=303)

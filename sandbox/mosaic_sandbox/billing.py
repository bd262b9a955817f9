"""Plans, balances and auto top-up: the decisions behind /plan, /credits and the checkout."""

from __future__ import annotations

from mosaic_sandbox.catalogue import PLANS
from mosaic_sandbox.clock import now
from mosaic_sandbox.errors import ApiError
from mosaic_sandbox.state import (
    AutoTopup,
    Checkout,
    CheckoutStatus,
    Organization,
    Sandbox,
    TopUp,
)

PURCHASABLE_PLAN_IDS = frozenset(PLANS)


def set_plan(org: Organization, plan_id: str | None) -> None:
    """Put the organization on `plan_id` (or none), new billing period, balance untouched."""
    if plan_id is None:
        org.plan_id = org.plan_started_at = org.period_start = None
        return
    started = now()
    org.plan_id = plan_id
    org.plan_started_at = started
    org.period_start = started
    org.usage = 0


def switch_plan(org: Organization, plan_id: str) -> None:
    """A purchase: the new plan starts now and its monthly credits are added to the balance."""
    set_plan(org, plan_id)
    org.balance = as_credits(org.balance + PLANS[plan_id].credits_per_month)


def upgrade(
    sandbox: Sandbox,
    org: Organization,
    plan_id: str,
    *,
    base_url: str,
    success_url: str | None,
    cancel_url: str | None,
) -> Checkout | None:
    """Switch at once, or open a hosted checkout when the organization must pay through one."""
    if plan_id not in PURCHASABLE_PLAN_IDS:
        raise ApiError(400, f"Unknown or non-purchasable plan_id: {plan_id!r}")
    if org.plan_id == plan_id:
        raise ApiError(409, f"Organization is already on plan {plan_id!r}")
    if not org.checkout_required:
        switch_plan(org, plan_id)
        return None
    checkout_id = sandbox.new_token("chk_", 24)
    checkout = Checkout(
        id=checkout_id,
        organization_id=org.id,
        plan_id=plan_id,
        url=f"{base_url.rstrip('/')}/checkout/{checkout_id}",
        success_url=success_url,
        cancel_url=cancel_url,
        created_at=now(),
    )
    sandbox.checkouts[checkout_id] = checkout
    return checkout


def close_checkout(sandbox: Sandbox, checkout: Checkout, *, paid: bool) -> None:
    """Pay (switching the plan) or abandon a checkout; each checkout closes exactly once."""
    if checkout.status is not CheckoutStatus.OPEN:
        raise ApiError(409, f"Checkout {checkout.id} is already {checkout.status.value}")
    checkout.status = CheckoutStatus.PAID if paid else CheckoutStatus.CANCELLED
    checkout.closed_at = now()
    if paid:
        switch_plan(sandbox.organizations[checkout.organization_id], checkout.plan_id)


def effective_auto_topup(org: Organization) -> AutoTopup:
    # Mosaic reports an ineligible organization's config as all-off, whatever was stored (§5).
    return org.auto_topup if org.auto_topup_eligible else AutoTopup()


def configure_auto_topup(
    org: Organization, *, enabled: bool, threshold: int | float, quantity: int | float
) -> AutoTopup:
    """Store the settings; enabling while already below the threshold buys credits at once."""
    if not org.auto_topup_eligible:
        raise ApiError(
            403,
            "Auto top-up requires an active creator, creator_annual, professional or "
            "professional_annual plan",
        )
    org.auto_topup = AutoTopup(
        enabled=enabled, threshold=as_credits(threshold), quantity=as_credits(quantity)
    )
    top_up_if_below_threshold(org, reason="enabled_below_threshold")
    return org.auto_topup


def top_up_if_below_threshold(org: Organization, *, reason: str) -> bool:
    settings = effective_auto_topup(org)
    if not settings.enabled or settings.quantity <= 0 or org.balance >= settings.threshold:
        return False
    _buy(org, settings.quantity, reason)
    return True


def charge(org: Organization, amount: int | float) -> bool:
    """Take `amount` credits for finished work; False when even an auto top-up cannot cover it."""
    if org.balance < amount:
        settings = effective_auto_topup(org)
        if settings.enabled and settings.quantity > 0:
            _buy(org, settings.quantity, "insufficient_for_node")
    if org.balance < amount:
        return False
    org.balance = as_credits(org.balance - amount)
    org.usage = as_credits(org.usage + amount)
    top_up_if_below_threshold(org, reason="below_threshold")
    return True


def _buy(org: Organization, quantity: int | float, reason: str) -> None:
    org.balance = as_credits(org.balance + quantity)
    org.topups.append(TopUp(at=now(), quantity=quantity, reason=reason, balance_after=org.balance))


def as_credits(amount: int | float) -> int | float:
    """Whole amounts as integers, so answers read `1000`, not `1000.0`.

    Validated JSON numbers arrive as floats; Mosaic's examples show credits as integers.
    """
    return int(amount) if float(amount).is_integer() else amount

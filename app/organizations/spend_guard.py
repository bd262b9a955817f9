"""The spend guard: an account's optional monthly cap on auto top-up spend.

Mosaic fires a top-up by itself whenever the balance falls below the threshold and tells no one,
so unblock can neither count top-ups nor stop one. What it controls is the setting it sends, so
"refuses to exceed the cap" means: unblock never enables auto top-up with a setting whose
worst-case month costs more than the cap. The worst-case month is bounded as a month that uses
the plan's monthly credits over again through top-ups:

    one top-up        = quantity / 100 × the plan's top_up_rate_per_100_credits_usd
    worst-case month  = ceil(credits_per_month / quantity) top-ups (at least one)

so a single top-up costing more than the cap is always refused. Without a known rate for the
plan, a capped account is refused too (nothing can be priced). The check runs when a person
answers (422) and again in the `set_topup` step right before `POST /credits/settings`, since the
cap or the plan may have changed meanwhile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from app.errors import InvalidInput

CENT = Decimal("0.01")


@dataclass(frozen=True)
class TopupPrice:
    """What auto top-up costs on one plan, from Mosaic's plan list."""

    plan_id: str
    rate_per_100_credits_usd: Decimal
    credits_per_month: int | None

    def one_topup_usd(self, quantity: int) -> Decimal:
        return (Decimal(quantity) / 100 * self.rate_per_100_credits_usd).quantize(
            CENT, ROUND_HALF_UP
        )

    def topups_in_worst_month(self, quantity: int) -> int:
        if quantity <= 0:
            return 0
        if not self.credits_per_month:
            return 1
        return max(1, math.ceil(self.credits_per_month / quantity))

    def worst_month_usd(self, quantity: int) -> Decimal:
        return self.one_topup_usd(quantity) * self.topups_in_worst_month(quantity)

    def as_json(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id,
            "rate_per_100_credits_usd": float(self.rate_per_100_credits_usd),
            "credits_per_month": self.credits_per_month,
        }


def price_for(plan: dict[str, Any] | None, plans: list[dict[str, Any]] | None) -> TopupPrice | None:
    """The top-up price of the organization's plan, if the plan list named its rate."""
    plan_id = (plan or {}).get("id")
    if not plan_id:
        return None
    family = (plan or {}).get("family")
    offers = plans or []
    match = next((p for p in offers if p.get("id") == plan_id), None)
    match = match or next((p for p in offers if plan_id in (p.get("aliases") or [])), None)
    # `pro` and other ids the newest list omits: a plan of the same family has the same rate.
    match = match or next((p for p in offers if family and p.get("id") == family), None)
    if match is None or match.get("top_up_rate_per_100_credits_usd") is None:
        return None
    credits = match.get("credits_per_month")
    return TopupPrice(
        plan_id=str(plan_id),
        rate_per_100_credits_usd=Decimal(str(match["top_up_rate_per_100_credits_usd"])),
        credits_per_month=int(credits) if credits else None,
    )


def refusal(cap: Decimal | None, price: TopupPrice | None, quantity: int) -> InvalidInput | None:
    """Why this setting would break the cap (a 422 to raise or record), or None if it fits."""
    if cap is None or quantity <= 0:
        return None
    if price is None:
        return InvalidInput(
            f"Auto top-up is capped at ${cap} a month, and Mosaic lists no top-up rate for "
            "this plan, so its cost cannot be checked. Ask an admin to clear the cap.",
            code="topup_price_unknown",
            monthly_topup_cap_usd=str(cap),
        )
    one = price.one_topup_usd(quantity)
    worst = price.worst_month_usd(quantity)
    if worst <= cap:
        return None
    times = price.topups_in_worst_month(quantity)
    least = price.worst_month_usd(price.credits_per_month or quantity)
    what_to_do = (
        "Choose a smaller quantity, decline auto top-up, or ask an admin to raise the cap."
        if least <= cap
        else f"No quantity fits: on this plan a worst-case month costs at least ${least}. "
        "Decline auto top-up, or ask an admin to raise the cap."
    )
    return InvalidInput(
        f"One top-up of {quantity:,} credits costs ${one}; a worst-case month ({times} top-up"
        f"{'s' if times != 1 else ''}: the plan's monthly credits over again) costs ${worst}, "
        f"above the ${cap} monthly cap. {what_to_do}",
        code="topup_over_spend_cap",
        monthly_topup_cap_usd=str(cap),
        one_topup_usd=str(one),
        worst_month_usd=str(worst),
    )

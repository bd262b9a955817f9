"""Mosaic's plan catalogue, as the newest `GET /plan/list` publishes it (docs/mosaic.md)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    id: str
    family: str
    billing: str
    price_usd: int | float
    credits_per_month: int
    top_up_rate_per_100_credits_usd: int | float
    notes: str
    # `pro` is still accepted by /plan/upgrade but is absent from the newest list (§3, §9.3).
    listed: bool = True
    # The newest /credits/settings page names exactly four eligible IDs; `pro` is not one of them.
    auto_topup_eligible: bool = True


PLANS: dict[str, Plan] = {
    plan.id: plan
    for plan in (
        Plan(
            id="creator",
            family="creator",
            billing="monthly",
            price_usd=50,
            credits_per_month=2500,
            top_up_rate_per_100_credits_usd=2,
            notes="Best for individuals getting started",
        ),
        Plan(
            id="creator_annual",
            family="creator",
            billing="annual",
            price_usd=480,
            credits_per_month=2500,
            top_up_rate_per_100_credits_usd=2,
            notes="Best for individuals getting started (annual)",
        ),
        Plan(
            id="professional",
            family="professional",
            billing="monthly",
            price_usd=150,
            credits_per_month=10000,
            top_up_rate_per_100_credits_usd=1.6,
            notes="Best for growing teams and automations",
        ),
        Plan(
            id="professional_annual",
            family="professional",
            billing="annual",
            price_usd=1500,
            credits_per_month=10000,
            top_up_rate_per_100_credits_usd=1.6,
            notes="Best for growing teams and automations (annual)",
        ),
        Plan(
            id="pro",
            family="professional",
            billing="monthly",
            price_usd=150,
            credits_per_month=10000,
            top_up_rate_per_100_credits_usd=1.6,
            notes="Legacy alias of professional",
            listed=False,
            auto_topup_eligible=False,
        ),
    )
}


def listed_plans() -> list[Plan]:
    return [plan for plan in PLANS.values() if plan.listed]

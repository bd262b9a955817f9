"""The Mosaic API surface, in the newest documented shapes (docs/mosaic.md) unless a quirk
says otherwise.

Every handler is `async def` on purpose: they then run on the event loop, one at a time between
awaits, like the run engine, so the shared state needs no locks.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from mosaic_sandbox import billing, runs
from mosaic_sandbox.catalogue import listed_plans
from mosaic_sandbox.clock import iso, iso_or_none, now
from mosaic_sandbox.dependencies import SandboxDep
from mosaic_sandbox.errors import ApiError
from mosaic_sandbox.state import Organization, Run, Sandbox

router = APIRouter()


async def current_organization(request: Request, sandbox: SandboxDep) -> Organization:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Missing API key", headers={"WWW-Authenticate": "Bearer"})
    org = sandbox.organization_by_key(token.strip())
    if org is None:
        raise ApiError(401, "Invalid API key", headers={"WWW-Authenticate": "Bearer"})
    org.last_used_at = now()
    return org


OrgDep = Annotated[Organization, Depends(current_organization)]


def _own_run(sandbox: Sandbox, org: Organization, run_id: str) -> Run:
    run = sandbox.runs.get(run_id)
    # Another organization's run is indistinguishable from a missing one.
    if run is None or run.organization_id != org.id:
        raise ApiError(404, "Agent run not found")
    return run


class UpgradeRequest(BaseModel):
    plan_id: str
    success_url: str | None = None
    cancel_url: str | None = None


# JSON numbers; strict so that `"1000"` or `true` are refused rather than coerced.
SettingAmount = Annotated[float, Field(strict=True, ge=0, le=1_000_000)]


class AutoTopupSettings(BaseModel):
    enabled: Annotated[bool, Field(strict=True)]
    threshold: SettingAmount
    quantity: SettingAmount


class CreditSettingsRequest(BaseModel):
    auto_topup: AutoTopupSettings


class VideoInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    video_urls: list[str] = []


class RunRequest(BaseModel):
    # Mosaic takes many more fields (video_ids, node_render_ids, update_params, ...); the
    # sandbox accepts and ignores them.
    model_config = ConfigDict(extra="ignore")

    video_urls: list[str] = []
    video_inputs: list[VideoInput] = []
    callback_url: str | None = None


@router.get("/whoami")
async def whoami(org: OrgDep) -> dict[str, Any]:
    return {
        "organization_id": org.id,
        "organization_name": org.name,
        "organization_slug": org.slug,
        "created_at": iso(org.created_at),
        "last_used_at": iso_or_none(org.last_used_at),
    }


@router.get("/plan")
async def get_plan(org: OrgDep) -> dict[str, Any]:
    plan = org.plan
    return {
        "organization_id": org.id,
        "plan": None
        if plan is None
        else {
            "id": plan.id,
            "family": plan.family,
            "status": "active",
            "started_at": iso_or_none(org.plan_started_at),
            "current_period_start": iso_or_none(org.period_start),
            "current_period_end": iso_or_none(org.period_end),
            "canceled_at": None,
        },
        "scheduled_plan": None,
        "credits": {
            "balance": org.balance,
            "usage": org.usage,
            "included_usage": 0 if plan is None else plan.credits_per_month,
            "unlimited": False,
        },
    }


@router.get("/plan/list")
async def list_plans(org: OrgDep) -> dict[str, Any]:
    return {
        "plans": [
            {
                "id": plan.id,
                "billing": plan.billing,
                "price_usd": plan.price_usd,
                "credits_per_month": plan.credits_per_month,
                "top_up_rate_per_100_credits_usd": plan.top_up_rate_per_100_credits_usd,
                "notes": plan.notes,
            }
            for plan in listed_plans()
        ]
    }


@router.post("/plan/upgrade")
async def upgrade_plan(
    body: UpgradeRequest, request: Request, org: OrgDep, sandbox: SandboxDep
) -> dict[str, Any]:
    checkout = billing.upgrade(
        sandbox,
        org,
        body.plan_id,
        base_url=str(request.base_url),
        success_url=body.success_url,
        cancel_url=body.cancel_url,
    )
    if checkout is None:
        plan = org.plan
        assert plan is not None
        return {
            "success": True,
            "requires_checkout": False,
            "plan_id": plan.id,
            "plan_family": plan.family,
        }
    return {
        "success": org.quirks.checkout_success,
        "requires_checkout": True,
        "plan_id": checkout.plan_id,
        "checkout_url": checkout.url,
    }


@router.get("/credits")
async def get_credits(org: OrgDep) -> dict[str, Any]:
    plan = org.plan
    if org.quirks.legacy_credits_shape:
        return {
            "organization_id": org.id,
            "credits": {
                "balance": org.balance,
                "unlimited": False,
                "usage": org.usage,
                "included_usage": 0 if plan is None else plan.credits_per_month,
                "next_reset_at": iso_or_none(org.period_end),
            },
            "plan": None if plan is None else plan.family,
        }
    settings = billing.effective_auto_topup(org)
    return {
        "organization_id": org.id,
        "balance": org.balance,
        "plan": None if plan is None else plan.family,
        "plan_id": None if plan is None else plan.id,
        "billing_cycle": {
            "current_period_start": iso_or_none(org.period_start),
            "current_period_end": iso_or_none(org.period_end),
        },
        "auto_topup": {
            "eligible": org.auto_topup_eligible,
            "enabled": settings.enabled,
            "threshold": settings.threshold,
            "quantity": settings.quantity,
        },
    }


@router.post("/credits/settings")
async def configure_credits(body: CreditSettingsRequest, org: OrgDep) -> dict[str, Any]:
    stored = billing.configure_auto_topup(
        org,
        enabled=body.auto_topup.enabled,
        threshold=body.auto_topup.threshold,
        quantity=body.auto_topup.quantity,
    )
    return {
        "auto_topup": {
            "enabled": stored.enabled,
            "threshold": stored.threshold,
            "quantity": stored.quantity,
        }
    }


@router.post("/agent/{agent_id}/run")
async def run_agent(
    agent_id: str, org: OrgDep, sandbox: SandboxDep, body: RunRequest | None = None
) -> dict[str, Any]:
    body = body or RunRequest()
    video_urls = [*body.video_urls, *(url for i in body.video_inputs for url in i.video_urls)]
    run = runs.start_run(
        sandbox, org, agent_id=agent_id, callback_url=body.callback_url, video_urls=video_urls
    )
    return runs.started_run_view(run)


@router.get("/agent_run/{run_id}")
async def get_run(run_id: str, org: OrgDep, sandbox: SandboxDep) -> dict[str, Any]:
    return runs.run_view(_own_run(sandbox, org, run_id), org)


@router.get("/agent_run/{run_id}/nodes")
async def get_run_nodes(run_id: str, org: OrgDep, sandbox: SandboxDep) -> dict[str, Any]:
    return runs.nodes_view(_own_run(sandbox, org, run_id), org)


@router.post("/agent_run/{run_id}/resume")
async def resume_run(run_id: str, org: OrgDep, sandbox: SandboxDep) -> dict[str, Any]:
    return runs.resume_run(sandbox, _own_run(sandbox, org, run_id))


@router.post("/agent_run/{run_id}/cancel")
async def cancel_run(run_id: str, org: OrgDep, sandbox: SandboxDep) -> dict[str, Any]:
    return runs.cancel_run(_own_run(sandbox, org, run_id))

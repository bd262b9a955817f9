"""The control surface under `/_sandbox`: set the world up, look inside it, break it on purpose.

No authentication: the sandbox is a development and test tool bound to loopback. Every request
model forbids unknown fields so a typo in a test fails loudly instead of being ignored.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mosaic_sandbox import billing, runs
from mosaic_sandbox.clock import iso, iso_or_none, now
from mosaic_sandbox.dependencies import SandboxDep
from mosaic_sandbox.errors import ApiError
from mosaic_sandbox.state import (
    AutoTopup,
    Checkout,
    Organization,
    Quirks,
    Run,
    Sandbox,
)
from mosaic_sandbox.traffic import CallRecord, Fault, FaultAction
from mosaic_sandbox.webhooks import WebhookDelivery

router = APIRouter(prefix="/_sandbox", tags=["sandbox control"])

PlanId = Literal["creator", "creator_annual", "professional", "professional_annual", "pro"]
Amount = Annotated[float, Field(ge=0, le=1_000_000)]
ApiKey = Annotated[str, Field(pattern=r"^mk_[A-Za-z0-9_-]+$")]


class ControlModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoTopupState(ControlModel):
    enabled: bool = False
    threshold: Amount = 0
    quantity: Amount = 0


class OrganizationCreate(ControlModel):
    plan_id: PlanId | None = None
    balance: Annotated[float, Field(ge=0)] = 0
    checkout: bool = False
    webhook_secret: str | None = None
    name: str | None = None
    api_key: ApiKey | None = None
    nodes_per_run: Annotated[int, Field(ge=1, le=100)] = 4
    node_cost: Annotated[float, Field(ge=0)] = 100
    needs_credits_camel_case: bool = False
    checkout_success: bool = True
    legacy_credits_shape: bool = False
    auto_topup: AutoTopupState | None = None


class OrganizationUpdate(ControlModel):
    """Only the fields sent are changed; `plan_id` and `webhook_secret` may be set to null."""

    plan_id: PlanId | None = None
    balance: Annotated[float, Field(ge=0)] | None = None
    checkout: bool | None = None
    webhook_secret: str | None = None
    name: str | None = None
    nodes_per_run: Annotated[int, Field(ge=1, le=100)] | None = None
    node_cost: Annotated[float, Field(ge=0)] | None = None
    needs_credits_camel_case: bool | None = None
    checkout_success: bool | None = None
    legacy_credits_shape: bool | None = None
    auto_topup: AutoTopupState | None = None


NULLABLE_UPDATES = frozenset({"plan_id", "webhook_secret"})


class RunCreate(ControlModel):
    organization_id: str
    agent_id: str = "sandbox-agent"
    callback_url: str | None = None
    video_urls: list[str] = []


class FaultCreate(ControlModel):
    method: str = "*"
    path: str
    action: FaultAction
    status: Annotated[int, Field(ge=400, le=599)] = 500
    retry_after: Annotated[float, Field(ge=0)] = 1.0
    latency_ms: Annotated[int, Field(ge=0, le=600_000)] = 1000
    count: Annotated[int, Field(ge=1)] | None = None
    rate: Annotated[float, Field(ge=0, le=1)] = 1.0
    lost_answer: bool = False

    @model_validator(mode="after")
    def _lost_answer_needs_an_answer_to_lose(self) -> FaultCreate:
        if self.lost_answer and self.action is FaultAction.LATENCY:
            raise ValueError("lost_answer needs an action that replaces the answer, not latency")
        return self


class ResetRequest(ControlModel):
    seed: int | None = None


# --- organizations ---------------------------------------------------------------------------


@router.post("/orgs", status_code=201)
async def create_organization(body: OrganizationCreate, sandbox: SandboxDep) -> dict[str, Any]:
    if body.api_key is not None and sandbox.organization_by_key(body.api_key) is not None:
        raise ApiError(409, "api_key is already in use")
    name = body.name or f"Sandbox Organization {len(sandbox.organizations) + 1}"
    org = Organization(
        id=sandbox.new_uuid(),
        name=name,
        slug=_slug(name),
        api_key=body.api_key or sandbox.new_token("mk_"),
        created_at=now(),
        balance=billing.as_credits(body.balance),
        checkout_required=body.checkout,
        webhook_secret=body.webhook_secret,
        nodes_per_run=body.nodes_per_run,
        node_cost=billing.as_credits(body.node_cost),
        quirks=Quirks(
            needs_credits_camel_case=body.needs_credits_camel_case,
            checkout_success=body.checkout_success,
            legacy_credits_shape=body.legacy_credits_shape,
        ),
    )
    billing.set_plan(org, body.plan_id)
    if body.auto_topup is not None:
        org.auto_topup = _auto_topup(body.auto_topup)
    sandbox.organizations[org.id] = org
    return {"organization_id": org.id, "api_key": org.api_key}


@router.get("/orgs")
async def list_organizations(sandbox: SandboxDep) -> list[dict[str, Any]]:
    return [organization_state(sandbox, org) for org in sandbox.organizations.values()]


@router.get("/orgs/{organization_id}")
async def get_organization(organization_id: str, sandbox: SandboxDep) -> dict[str, Any]:
    return organization_state(sandbox, _organization(sandbox, organization_id))


@router.patch("/orgs/{organization_id}")
async def update_organization(
    organization_id: str, body: OrganizationUpdate, sandbox: SandboxDep
) -> dict[str, Any]:
    """Edit state directly: no credits are added for a plan set here, no top-up is bought."""
    org = _organization(sandbox, organization_id)
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    for name, value in changes.items():
        if value is None and name not in NULLABLE_UPDATES:
            raise ApiError(422, f"{name} cannot be null")
    if "plan_id" in changes and changes["plan_id"] != org.plan_id:
        billing.set_plan(org, changes["plan_id"])
    if "balance" in changes:
        org.balance = billing.as_credits(changes["balance"])
    if "checkout" in changes:
        org.checkout_required = changes["checkout"]
    if "webhook_secret" in changes:
        org.webhook_secret = changes["webhook_secret"]
    if "name" in changes:
        org.name = changes["name"]
        org.slug = _slug(org.name)
    if "nodes_per_run" in changes:
        org.nodes_per_run = changes["nodes_per_run"]
    if "node_cost" in changes:
        org.node_cost = billing.as_credits(changes["node_cost"])
    for quirk in ("needs_credits_camel_case", "checkout_success", "legacy_credits_shape"):
        if quirk in changes:
            setattr(org.quirks, quirk, changes[quirk])
    if body.auto_topup is not None:
        org.auto_topup = _auto_topup(body.auto_topup)
    return organization_state(sandbox, org)


# --- runs and checkouts ----------------------------------------------------------------------


@router.post("/runs", status_code=201)
async def create_run(body: RunCreate, sandbox: SandboxDep) -> dict[str, Any]:
    """Start a run for an organization without going through its API key."""
    org = _organization(sandbox, body.organization_id)
    run = runs.start_run(
        sandbox,
        org,
        agent_id=body.agent_id,
        callback_url=body.callback_url,
        video_urls=body.video_urls,
    )
    return runs.started_run_view(run)


@router.get("/runs/{run_id}")
async def get_run(run_id: str, sandbox: SandboxDep) -> dict[str, Any]:
    run = sandbox.runs.get(run_id)
    if run is None:
        raise ApiError(404, "Agent run not found")
    return run_state(run)


@router.get("/checkouts")
async def list_checkouts(sandbox: SandboxDep) -> list[dict[str, Any]]:
    return [checkout_state(checkout) for checkout in sandbox.checkouts.values()]


@router.get("/checkouts/{checkout_id}")
async def get_checkout(checkout_id: str, sandbox: SandboxDep) -> dict[str, Any]:
    return checkout_state(_checkout(sandbox, checkout_id))


@router.post("/checkouts/{checkout_id}/complete")
async def complete_checkout(checkout_id: str, sandbox: SandboxDep) -> dict[str, Any]:
    """What pressing Pay on the hosted page does: the plan switches and its credits arrive."""
    checkout = _checkout(sandbox, checkout_id)
    billing.close_checkout(sandbox, checkout, paid=True)
    return checkout_state(checkout)


@router.post("/checkouts/{checkout_id}/cancel")
async def abandon_checkout(checkout_id: str, sandbox: SandboxDep) -> dict[str, Any]:
    checkout = _checkout(sandbox, checkout_id)
    billing.close_checkout(sandbox, checkout, paid=False)
    return checkout_state(checkout)


# --- traffic ---------------------------------------------------------------------------------


@router.get("/calls")
async def list_calls(
    sandbox: SandboxDep,
    api_key: str | None = None,
    method: str | None = None,
    path: str | None = None,
) -> list[dict[str, Any]]:
    """Mosaic-surface calls received, oldest first; `path` may use `*` wildcards."""
    return [
        call_view(call)
        for call in sandbox.calls
        if (api_key is None or call.api_key == api_key)
        and (method is None or call.method.upper() == method.upper())
        and (path is None or fnmatch.fnmatchcase(call.path, path))
    ]


@router.delete("/calls", status_code=204)
async def clear_calls(sandbox: SandboxDep) -> Response:
    sandbox.calls.clear()
    return Response(status_code=204)


@router.post("/faults", status_code=201)
async def add_fault(body: FaultCreate, sandbox: SandboxDep) -> dict[str, Any]:
    fault = sandbox.faults.add(
        method=body.method.upper(),
        path=body.path,
        action=body.action,
        status=429 if body.action is FaultAction.RATE_LIMIT else body.status,
        retry_after=body.retry_after,
        latency_ms=body.latency_ms,
        count=body.count,
        rate=body.rate,
        lost_answer=body.lost_answer,
    )
    return fault_view(fault)


@router.get("/faults")
async def list_faults(sandbox: SandboxDep) -> list[dict[str, Any]]:
    return [fault_view(fault) for fault in sandbox.faults.faults]


@router.delete("/faults", status_code=204)
async def clear_faults(sandbox: SandboxDep) -> Response:
    sandbox.faults.clear()
    return Response(status_code=204)


@router.delete("/faults/{fault_id}", status_code=204)
async def remove_fault(fault_id: int, sandbox: SandboxDep) -> Response:
    if not sandbox.faults.remove(fault_id):
        raise ApiError(404, "Fault not found")
    return Response(status_code=204)


@router.get("/webhooks")
async def list_webhooks(
    sandbox: SandboxDep, run_id: str | None = None, flag: str | None = None
) -> list[dict[str, Any]]:
    return [
        delivery_view(delivery)
        for delivery in sandbox.webhooks.deliveries
        if (run_id is None or delivery.run_id == run_id) and (flag is None or delivery.flag == flag)
    ]


@router.post("/reset")
async def reset(sandbox: SandboxDep, body: ResetRequest | None = None) -> dict[str, Any]:
    """Forget everything (organizations, runs, checkouts, calls, faults, webhooks); re-seed."""
    sandbox.reset(seed=None if body is None else body.seed)
    return {"reset": True, "seed": sandbox.seed}


# --- views -----------------------------------------------------------------------------------


def organization_state(sandbox: Sandbox, org: Organization) -> dict[str, Any]:
    plan = org.plan
    return {
        "organization_id": org.id,
        "name": org.name,
        "slug": org.slug,
        "api_key": org.api_key,
        "created_at": iso(org.created_at),
        "plan_id": org.plan_id,
        "plan_family": None if plan is None else plan.family,
        "plan_started_at": iso_or_none(org.plan_started_at),
        "current_period_start": iso_or_none(org.period_start),
        "current_period_end": iso_or_none(org.period_end),
        "balance": org.balance,
        "usage": org.usage,
        "auto_topup": {
            "eligible": org.auto_topup_eligible,
            "enabled": org.auto_topup.enabled,
            "threshold": org.auto_topup.threshold,
            "quantity": org.auto_topup.quantity,
        },
        "topups": [
            {
                "at": iso(topup.at),
                "quantity": topup.quantity,
                "reason": topup.reason,
                "balance_after": topup.balance_after,
            }
            for topup in org.topups
        ],
        "checkout": org.checkout_required,
        "webhook_secret": org.webhook_secret,
        "nodes_per_run": org.nodes_per_run,
        "node_cost": org.node_cost,
        "needs_credits_camel_case": org.quirks.needs_credits_camel_case,
        "checkout_success": org.quirks.checkout_success,
        "legacy_credits_shape": org.quirks.legacy_credits_shape,
        "runs": [run_state(run) for run in sandbox.runs_of(org.id)],
        "checkouts": [
            checkout_state(checkout)
            for checkout in sandbox.checkouts.values()
            if checkout.organization_id == org.id
        ],
    }


def run_state(run: Run) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "agent_id": run.agent_id,
        "organization_id": run.organization_id,
        "status": run.status.value,
        "status_message": run.status_message,
        "needs_credits": run.needs_credits,
        "errors": runs.run_errors(run),
        "node_status_counts": runs.node_status_counts(run),
        "callback_url": run.callback_url,
        "started_at": iso(run.started_at),
        "updated_at": iso(run.updated_at),
        "resumes": run.resumes,
        "nodes": [
            {
                "agent_node_id": node.agent_node_id,
                "original_node_id": node.original_node_id,
                "node_type_name": node.tile.node_type_name,
                "status": node.status.value,
                "status_message": node.status_message,
                "errors": list(node.errors),
                "needs_credits": node.needs_credits,
            }
            for node in run.nodes
        ],
    }


def checkout_state(checkout: Checkout) -> dict[str, Any]:
    return {
        "checkout_id": checkout.id,
        "organization_id": checkout.organization_id,
        "plan_id": checkout.plan_id,
        "status": checkout.status.value,
        "checkout_url": checkout.url,
        "success_url": checkout.success_url,
        "cancel_url": checkout.cancel_url,
        "created_at": iso(checkout.created_at),
        "closed_at": iso_or_none(checkout.closed_at),
    }


def call_view(call: CallRecord) -> dict[str, Any]:
    return {
        "id": call.id,
        "time": iso(call.time),
        "api_key": call.api_key,
        "method": call.method,
        "path": call.path,
        "query": call.query,
        "body": call.body,
        "status": call.status,
        "fault": call.fault,
        "applied_status": call.applied_status,
    }


def fault_view(fault: Fault) -> dict[str, Any]:
    return {
        "id": fault.id,
        "method": fault.method,
        "path": fault.path,
        "action": fault.action.value,
        "status": fault.status,
        "retry_after": fault.retry_after,
        "latency_ms": fault.latency_ms,
        "remaining": fault.remaining,
        "rate": fault.rate,
        "lost_answer": fault.lost_answer,
        "fired": fault.fired,
    }


def delivery_view(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "url": delivery.url,
        "flag": delivery.flag,
        "run_id": delivery.run_id,
        "attempts": delivery.attempts,
        "last_status": delivery.last_status,
        "last_error": delivery.last_error,
        "delivered": delivery.delivered,
        "pending": delivery.pending,
        "signature": delivery.signature,
        "created_at": iso(delivery.created_at),
        "payload": delivery.payload,
    }


def _organization(sandbox: Sandbox, organization_id: str) -> Organization:
    org = sandbox.organizations.get(organization_id)
    if org is None:
        raise ApiError(404, "Organization not found")
    return org


def _checkout(sandbox: Sandbox, checkout_id: str) -> Checkout:
    checkout = sandbox.checkouts.get(checkout_id)
    if checkout is None:
        raise ApiError(404, "Checkout not found")
    return checkout


def _auto_topup(state: AutoTopupState) -> AutoTopup:
    return AutoTopup(
        enabled=state.enabled,
        threshold=billing.as_credits(state.threshold),
        quantity=billing.as_credits(state.quantity),
    )


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "organization"

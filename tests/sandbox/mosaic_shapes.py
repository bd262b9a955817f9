"""Pydantic models of the documented Mosaic shapes (docs/mosaic.md, newest copies).

`extra="forbid"` wherever the document gives the whole shape, so a field the sandbox adds or
renames fails the test that reads it.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict

PlanId = Literal["creator", "creator_annual", "professional", "professional_annual", "pro"]
Family = Literal["creator", "professional"]
RunStatusValue = Literal["running", "completed", "partial_complete", "failed", "cancelled"]
NodeStatusValue = Literal[
    "not_started",
    "queued",
    "running",
    "completed",
    "partial_complete",
    "failed",
    "blocked",
    "cancelled",
]
Number = int | float


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorBody(Shape):
    detail: str


class ValidationErrorBody(BaseModel):
    # FastAPI's own validation answer: `detail` is a list of problems.
    detail: list[dict[str, object]]


class Whoami(Shape):
    organization_id: str
    organization_name: str
    organization_slug: str
    created_at: str
    last_used_at: str | None


class PlanObject(Shape):
    id: PlanId
    family: Family
    status: Literal["active"]
    started_at: str
    current_period_start: str
    current_period_end: str
    canceled_at: str | None


class PlanCredits(Shape):
    balance: Number
    usage: Number
    included_usage: Number
    unlimited: bool


class PlanAnswer(Shape):
    organization_id: str
    plan: PlanObject | None
    scheduled_plan: PlanObject | None
    credits: PlanCredits


class PlanListEntry(Shape):
    id: PlanId
    billing: Literal["monthly", "annual"]
    price_usd: Number
    credits_per_month: Number
    top_up_rate_per_100_credits_usd: Number
    notes: str


class PlanList(Shape):
    plans: list[PlanListEntry]


class ImmediateUpgrade(Shape):
    success: bool
    requires_checkout: Literal[False]
    plan_id: PlanId
    plan_family: Family


class CheckoutUpgrade(Shape):
    success: bool
    requires_checkout: Literal[True]
    plan_id: PlanId
    checkout_url: str


class BillingCycle(Shape):
    current_period_start: str | None
    current_period_end: str | None


class CreditsAutoTopup(Shape):
    eligible: bool
    enabled: bool
    threshold: Number
    quantity: Number


class Credits(Shape):
    organization_id: str
    balance: Number
    plan: Family | None
    plan_id: PlanId | None
    billing_cycle: BillingCycle
    auto_topup: CreditsAutoTopup


class LegacyCreditsInner(Shape):
    balance: Number
    unlimited: bool
    usage: Number
    included_usage: Number
    next_reset_at: str | None


class LegacyCredits(Shape):
    organization_id: str
    credits: LegacyCreditsInner
    plan: Family | None


class AutoTopupSettings(Shape):
    enabled: bool
    threshold: Number
    quantity: Number


class CreditSettingsAnswer(Shape):
    auto_topup: AutoTopupSettings


class NodeStatusCounts(Shape):
    completed: int
    in_progress: int
    failed: int


class RunInput(Shape):
    video_url: str
    thumbnail_url: str | None


class RunOutput(Shape):
    id: str
    video_url: str
    thumbnail_url: str | None
    premiere_prproj_url: str | None
    completed_at: str
    original_node_id: str | None


class WebhookOutput(Shape):
    id: str
    video_url: str
    thumbnail_url: str | None
    completed_at: str
    original_node_id: str | None


class RunError(Shape):
    original_node_id: str | None
    messages: list[str]


class StartedRun(Shape):
    """The answer to POST /agent/{agent_id}/run (the third-party client's run model)."""

    run_id: str
    agent_id: str
    status: RunStatusValue
    status_message: str | None
    started_at: str
    updated_at: str
    node_status_counts: NodeStatusCounts
    inputs: list[RunInput]
    outputs: list[WebhookOutput]
    triggered_by: None


class AgentRun(Shape):
    agent_id: str
    started_at: str
    status: RunStatusValue
    status_message: str | None
    needs_credits: bool
    errors: list[RunError]
    node_status_counts: NodeStatusCounts
    inputs: list[RunInput]
    outputs: list[RunOutput]


class NodeType(Shape):
    node_type_id: str
    node_type_name: str
    docs_url: str
    params_docs_url: str


class RunNode(Shape):
    agent_node_id: str
    original_node_id: str | None
    status: NodeStatusValue
    status_message: str | None
    errors: list[str]
    node_type: NodeType
    needs_credits: bool


class RunNodes(Shape):
    run_id: str
    nodes: list[RunNode]


class ResumeAnswer(Shape):
    success: bool
    run_id: str
    agent_state_id: str
    nodes_queued: int
    nodes_considered: int
    requeued_nodes: int
    requeued_node_tasks_detached: int
    requeued_node_active_tasks_cancelled: int
    requeued_node_active_tasks_total: int


class CancelAnswer(Shape):
    success: bool
    run_id: str
    tasks_cancelled: int
    nodes_reset: int
    message: str


class RunStartedEvent(Shape):
    flag: Literal["RUN_STARTED"]
    agent_id: str
    run_id: str
    status: RunStatusValue
    inputs: list[RunInput]
    node_status_counts: NodeStatusCounts
    triggered_by: None


class UpdatedNode(Shape):
    original_node_id: str | None
    status: Literal["completed", "running", "queued", "failed", "blocked", "partial_complete"]
    status_message: str | None
    errors: list[str]
    outputs: list[WebhookOutput]


class RunProgressEvent(Shape):
    flag: Literal["RUN_PROGRESS"]
    agent_id: str
    run_id: str
    status: RunStatusValue
    node_status_counts: NodeStatusCounts
    updated_nodes: list[UpdatedNode]
    triggered_by: None


class RunFinishedEvent(Shape):
    flag: Literal["RUN_FINISHED"]
    agent_id: str
    run_id: str
    status: Literal["completed", "partial_complete", "failed"]
    status_message: str | None
    node_status_counts: NodeStatusCounts
    needs_credits: bool
    errors: list[RunError]
    inputs: list[RunInput]
    outputs: list[WebhookOutput]
    triggered_by: None


WebhookEvent = RunStartedEvent | RunProgressEvent | RunFinishedEvent
EVENT_MODELS: dict[str, type[Shape]] = {
    "RUN_STARTED": RunStartedEvent,
    "RUN_PROGRESS": RunProgressEvent,
    "RUN_FINISHED": RunFinishedEvent,
}

ShapeT = TypeVar("ShapeT", bound=BaseModel)


def expect(response: httpx.Response, model: type[ShapeT], status: int = 200) -> ShapeT:
    """Assert the status, then validate the body against the documented shape."""
    assert response.status_code == status, (response.status_code, response.text)
    return model.model_validate(response.json())


def expect_error(response: httpx.Response, status: int) -> str:
    return expect(response, ErrorBody, status).detail


def event(payload: dict[str, object]) -> Shape:
    """Validate a webhook payload against the model its `flag` names."""
    return EVENT_MODELS[str(payload["flag"])].model_validate(payload)


def snake_case_needs_credits(payload: dict[str, object]) -> dict[str, object]:
    """The camelCase quirk's payload with `needsCredits` renamed, to validate the rest of it."""
    assert "needs_credits" not in payload, payload
    renamed = dict(payload)
    renamed["needs_credits"] = renamed.pop("needsCredits")
    return renamed

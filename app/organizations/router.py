"""HTTP for the organization's decision: one prompt per organization, and its actions."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, status
from fastapi.responses import JSONResponse

from app.auth import Principal, Scope, account_of, requires
from app.blocked_runs.router import action_responses
from app.blocked_runs.schemas import ChoosePlan, TopupAnswer
from app.organizations import service
from app.organizations.schemas import OrganizationOut
from app.runtime import Runtime, runtime
from app.worker import attempt_now

router = APIRouter(prefix="/v1/organization", tags=["organization"])
ACTION_RESPONSES = action_responses(OrganizationOut, 409)

Reader = Annotated[Principal, Depends(requires(Scope.RUNS_READ))]
Writer = Annotated[Principal, Depends(requires(Scope.RUNS_WRITE))]
RT = Annotated[Runtime, Depends(runtime)]


async def _answer(rt: Runtime, account_id: uuid.UUID) -> JSONResponse:
    view = await service.read(rt, account_id)
    code = status.HTTP_202_ACCEPTED if view.pending_step else status.HTTP_200_OK
    return JSONResponse(OrganizationOut.of(view).model_dump(mode="json"), status_code=code)


async def _act_now(rt: Runtime, account_id: uuid.UUID, job_id: int | None) -> JSONResponse:
    await attempt_now(rt, job_id, account_id=account_id)
    return await _answer(rt, account_id)


@router.get("", response_model=OrganizationOut)
async def read_organization(principal: Reader, rt: RT) -> OrganizationOut:
    """The caller's organization's billing decision: state, plan, pending step, actions, and
    how many blocked runs wait on it."""
    return OrganizationOut.of(await service.read(rt, account_of(principal)))


@router.post("/choose-plan", response_model=OrganizationOut, responses=ACTION_RESPONSES)
async def choose_organization_plan(body: ChoosePlan, principal: Writer, rt: RT) -> JSONResponse:
    """Upgrade the organization to one of the offered plans (another plan replaces an open
    checkout)."""
    account_id = account_of(principal)
    job_id = await service.choose_plan(rt, account_id, body.plan_id, principal.actor, via_run=None)
    return await _act_now(rt, account_id, job_id)


@router.post("/confirm-checkout", response_model=OrganizationOut, responses=ACTION_RESPONSES)
async def confirm_organization_checkout(principal: Writer, rt: RT) -> JSONResponse:
    """Checkout is done: re-read the plan in Mosaic."""
    account_id = account_of(principal)
    job_id = await service.confirm_checkout(rt, account_id, principal.actor, via_run=None)
    return await _act_now(rt, account_id, job_id)


@router.post("/topup", response_model=OrganizationOut, responses=ACTION_RESPONSES)
async def answer_organization_topup(body: TopupAnswer, principal: Writer, rt: RT) -> JSONResponse:
    """Enable auto top-up (threshold, quantity) or decline; then the waiting runs resume."""
    account_id = account_of(principal)
    job_id = await service.answer_topup(
        rt,
        account_id,
        principal.actor,
        enable=body.enable,
        threshold=body.threshold,
        quantity=body.quantity,
        via_run=None,
    )
    return await _act_now(rt, account_id, job_id)

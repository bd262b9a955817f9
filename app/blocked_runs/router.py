"""HTTP for blocked runs: reads, registration, a person's actions, and a live event stream."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.auth import Principal, Scope, account_of, requires
from app.blocked_runs import repository, service
from app.blocked_runs.schemas import (
    BlockedRunOut,
    BlockedRunPage,
    ChoosePlan,
    RegisterRun,
    TopupAnswer,
)
from app.blocked_runs.state_machine import TERMINAL_STATES, IllegalTransition
from app.input_text import StorableStr
from app.notifications import RUN_EVENTS_CHANNEL, next_change_of
from app.openapi import SCHEMAS, problems, referenced_schema
from app.organizations import repository as organizations_repository
from app.runtime import Runtime, runtime
from app.work_queue import organization_key
from app.worker import attempt_now

router = APIRouter(prefix="/v1/blocked-runs", tags=["blocked runs"])

Reader = Annotated[Principal, Depends(requires(Scope.RUNS_READ))]
Writer = Annotated[Principal, Depends(requires(Scope.RUNS_WRITE))]
Registrar = Annotated[Principal, Depends(requires(Scope.RUNS_REGISTER))]
RT = Annotated[Runtime, Depends(runtime)]


def action_responses(model: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """How a person's action answers: 200 done, 202 still under way (same body), or a problem."""
    return {
        200: {"model": model, "description": "Done at once; as it is now."},
        202: {
            "model": model,
            "description": "Recorded; a Mosaic call is still under way (`pending: true`). "
            "The worker finishes it: follow the events stream, or read again.",
        },
        **problems(*statuses),
    }


ACTION_RESPONSES = action_responses(BlockedRunOut, 404, 409)


def _states_param(schema: dict[str, Any]) -> None:
    # Documented as an array of states (how generated clients send it); the comma form that
    # curl users type keeps working.
    schema.clear()
    schema.update(type="array", items={"$ref": f"{SCHEMAS}State"})


RUN_STATE_EVENT = referenced_schema(
    "RunStateEvent",
    {
        "description": "One event of a run's stream: `event: state`, `id: <version>`, "
        "`data: <the run as JSON>`.",
        "type": "object",
        "required": ["event", "id", "data"],
        "properties": {
            "event": {"const": "state"},
            "id": {"type": "string", "description": "The run's `version`."},
            "data": {
                "type": "string",
                "description": "The run as JSON (a `BlockedRunOut`).",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": f"{SCHEMAS}BlockedRunOut"},
            },
        },
    },
)


class RegistrationVerifying(BaseModel):
    """A run that was blocked before is being verified with Mosaic."""

    status: Literal["verifying"]
    run_id: str


async def _answer(rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID) -> JSONResponse:
    run, _, decision = await service.read(rt, account_id, blocked_run_id)
    code = status.HTTP_202_ACCEPTED if run.pending else status.HTTP_200_OK
    return JSONResponse(
        BlockedRunOut.of(run, None, decision).model_dump(mode="json"), status_code=code
    )


async def _act_now(
    rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID, job_id: int | None
) -> JSONResponse:
    await attempt_now(rt, job_id, account_id=account_id, blocked_run_id=blocked_run_id)
    return await _answer(rt, account_id, blocked_run_id)


@router.post(
    "",
    response_model=BlockedRunOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {
            "model": BlockedRunOut,
            "description": "The run already has an open blocked run (that one), or Mosaic "
            "says it is not blocked (any more): its last blocked run, which says how it ended.",
        },
        202: {
            "model": RegistrationVerifying,
            "description": "The run was blocked before: Mosaic is being asked whether it is "
            "blocked again; register again or list runs to see.",
        },
        409: {"description": "The run changed concurrently; register again."},
    },
)
async def register_run(body: RegisterRun, principal: Registrar, rt: RT) -> JSONResponse:
    """An internal service reports a credit-blocked Mosaic run."""
    account_id = account_of(principal)
    outcome, run, job_id = await service.register(
        rt, account_id, body.run_id, body.agent_id, f"service:{principal.sub}"
    )
    if job_id is not None:
        await attempt_now(rt, job_id, account_id=account_id)
        outcome, run = await service.verified_registration(rt, account_id, body.run_id, job_id)
    if outcome is service.Registration.VERIFYING:
        return JSONResponse(
            {"status": "verifying", "run_id": body.run_id}, status_code=status.HTTP_202_ACCEPTED
        )
    if run is None:
        raise IllegalTransition("The run changed concurrently; register again.", code="run_changed")
    code = (
        status.HTTP_201_CREATED if outcome is service.Registration.CREATED else status.HTTP_200_OK
    )
    async with rt.db.sessions() as session:
        decision = await organizations_repository.get(session, account_id)
    return JSONResponse(
        BlockedRunOut.of(run, None, decision).model_dump(mode="json"), status_code=code
    )


@router.get("", response_model=BlockedRunPage)
async def list_runs(
    principal: Reader,
    rt: RT,
    state: Annotated[
        list[str] | None,
        Query(
            description="Only runs in these states (repeat the parameter; commas also work).",
            json_schema_extra=_states_param,
        ),
    ] = None,
    run_id: Annotated[StorableStr | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> BlockedRunPage:
    """The caller's blocked runs, newest first."""
    account_id = account_of(principal)
    states = service.states_filter(",".join(state) if state is not None else None)
    async with rt.db.sessions() as session:
        rows, next_cursor = await repository.page(
            session, account_id, states=states, run_id=run_id, limit=limit, cursor=cursor
        )
        decision = await organizations_repository.get(session, account_id)
    return BlockedRunPage(
        items=[BlockedRunOut.of(r, None, decision) for r in rows], next_cursor=next_cursor
    )


@router.get(
    "/{blocked_run_id}",
    response_model=BlockedRunOut,
    responses=problems(404),
)
async def read_run(blocked_run_id: uuid.UUID, principal: Reader, rt: RT) -> BlockedRunOut:
    """One blocked run with its history of state changes."""
    run, history, decision = await service.read(rt, account_of(principal), blocked_run_id)
    return BlockedRunOut.of(run, history, decision)


@router.post(
    "/{blocked_run_id}/choose-plan", response_model=BlockedRunOut, responses=ACTION_RESPONSES
)
async def choose_plan(
    blocked_run_id: uuid.UUID, body: ChoosePlan, principal: Writer, rt: RT
) -> JSONResponse:
    """Upgrade the organization to one of the offered plans."""
    account_id = account_of(principal)
    job_id = await service.choose_plan(
        rt, account_id, blocked_run_id, body.plan_id, principal.actor
    )
    return await _act_now(rt, account_id, blocked_run_id, job_id)


@router.post(
    "/{blocked_run_id}/confirm-checkout", response_model=BlockedRunOut, responses=ACTION_RESPONSES
)
async def confirm_checkout(blocked_run_id: uuid.UUID, principal: Writer, rt: RT) -> JSONResponse:
    """Checkout is done: re-read the plan in Mosaic."""
    account_id = account_of(principal)
    job_id = await service.confirm_checkout(rt, account_id, blocked_run_id, principal.actor)
    return await _act_now(rt, account_id, blocked_run_id, job_id)


@router.post("/{blocked_run_id}/topup", response_model=BlockedRunOut, responses=ACTION_RESPONSES)
async def answer_topup(
    blocked_run_id: uuid.UUID, body: TopupAnswer, principal: Writer, rt: RT
) -> JSONResponse:
    """Enable auto top-up (threshold, quantity) or decline; then the run resumes."""
    account_id = account_of(principal)
    job_id = await service.answer_topup(
        rt,
        account_id,
        blocked_run_id,
        principal.actor,
        enable=body.enable,
        threshold=body.threshold,
        quantity=body.quantity,
    )
    return await _act_now(rt, account_id, blocked_run_id, job_id)


@router.post("/{blocked_run_id}/cancel", response_model=BlockedRunOut, responses=ACTION_RESPONSES)
async def cancel(blocked_run_id: uuid.UUID, principal: Writer, rt: RT) -> JSONResponse:
    """Stop handling this blocked run."""
    account_id = account_of(principal)
    await service.cancel(rt, account_id, blocked_run_id, principal.actor)
    return await _answer(rt, account_id, blocked_run_id)


@router.post("/{blocked_run_id}/retry", response_model=BlockedRunOut, responses=ACTION_RESPONSES)
async def retry(blocked_run_id: uuid.UUID, principal: Writer, rt: RT) -> JSONResponse:
    """Start a failed run over from reading the plan."""
    account_id = account_of(principal)
    job_id = await service.retry(rt, account_id, blocked_run_id, principal.actor)
    return await _act_now(rt, account_id, blocked_run_id, job_id)


@router.get(
    "/{blocked_run_id}/events",
    response_class=Response,
    responses={
        200: {
            "description": "A stream of server-sent events. Each change is an event named "
            "`state` whose `id` is the run's `version` and whose `data` is the run as JSON "
            "(a `BlockedRunOut`): one at once, then one after every change of the run or of the "
            "decision it waits on. A comment line (`: ping - <time>`) keeps the connection "
            "open every 15 seconds. The stream ends once the run is terminal.",
            "content": {
                "text/event-stream": {
                    # Before OpenAPI 3.2's `itemSchema`, `schema` of an event stream describes
                    # each event (as SSE-aware tools such as schemathesis read it); the string
                    # branch is the stream as a client without SSE support receives it (a
                    # generated client hands it over as text instead of failing to parse it).
                    "schema": {"anyOf": [{"$ref": RUN_STATE_EVENT}, {"type": "string"}]}
                }
            },
        },
        **problems(404),
    },
)
async def events(blocked_run_id: uuid.UUID, principal: Reader, rt: RT) -> EventSourceResponse:
    """A `state` event with the run now and after every change; ends once the run is terminal."""
    account_id = account_of(principal)
    await service.read(rt, account_id, blocked_run_id)  # 404 before the stream starts
    keys = (str(blocked_run_id), organization_key(account_id))

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async with rt.listener.subscribe(RUN_EVENTS_CHANNEL) as changes:
            last: str | None = None
            while True:
                run, _, decision = await service.read(rt, account_id, blocked_run_id)
                body = BlockedRunOut.of(run, None, decision).model_dump_json()
                if body != last:  # the run, or the decision it waits on, changed
                    last = body
                    yield ServerSentEvent(data=body, event="state", id=str(run.version))
                if run.state in TERMINAL_STATES and not run.pending:
                    return
                with contextlib.suppress(TimeoutError):
                    # The timeout re-reads now and then, in case a notification was missed.
                    await asyncio.wait_for(next_change_of(changes, *keys), 15)

    return EventSourceResponse(stream(), ping=15)

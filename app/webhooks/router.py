"""HTTP for Mosaic's webhooks: authenticated by X-Mosaic-Signature, answered 202 after storing."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Security, status
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.responses import Response

from app.auth import client_address
from app.openapi import problems
from app.runtime import Runtime, runtime
from app.throttle import AuthThrottle
from app.webhooks.endpoint import ACKS, accept
from app.webhooks.service import Outcome


class LeanRoute(APIRoute):
    """A route documented like any other, served without FastAPI's per-request dependency
    resolution and response validation.

    Mosaic sends an event for every run, so this is the busiest route by far; resolving its
    dependencies (query, cookies, security, scope caches) and validating its one-field answer
    cost as much CPU as the rest of an ignored event. The endpoint's signature still declares
    the path parameter and the signature header, so the OpenAPI document is the same;
    `serve_webhook` reads them itself, with the same answers for bad input.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return serve_webhook


router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], route_class=LeanRoute)

# A security scheme rather than a plain header, so generated clients and the document show how
# Mosaic authenticates; auto_error=False because a missing signature is our own 401.
signature = APIKeyHeader(
    name="X-Mosaic-Signature",
    scheme_name="mosaicSignature",
    description="The account's webhook secret, as Mosaic sends it.",
    auto_error=False,
)


async def mosaic_signature(value: str | None = Security(signature)) -> str | None:
    """The signature as sent (checked against the account's secret in the service)."""
    return value


class WebhookAck(BaseModel):
    status: Literal["accepted", "duplicate", "ignored"]


_ACCOUNT_ID = TypeAdapter(uuid.UUID)


async def serve_webhook(request: Request) -> Response:
    """What `mosaic_webhook` answers, with its parameters read directly from the request."""
    raw_id = request.path_params["account_id"]
    try:
        account_id = _ACCOUNT_ID.validate_python(raw_id)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("path", "account_id")} for error in exc.errors()]
        ) from None
    ack = await mosaic_webhook(
        account_id,
        request,
        request.app.state.runtime,
        request.headers.get(signature.model.name),
    )
    return Response(
        ACKS[Outcome(ack.status)], status.HTTP_202_ACCEPTED, media_type="application/json"
    )


@router.post(
    "/mosaic/{account_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=WebhookAck,
    responses={
        400: {"description": "The body is not JSON (`invalid_json`)."},
        **problems(404),
        422: {"description": "Not a Mosaic run event (`malformed_webhook`)."},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def mosaic_webhook(
    account_id: uuid.UUID,
    request: Request,
    rt: Annotated[Runtime, Depends(runtime)],
    x_mosaic_signature: Annotated[str | None, Depends(mosaic_signature)],
) -> WebhookAck:
    """A Mosaic run event (RUN_STARTED, RUN_PROGRESS, RUN_FINISHED) for this account."""
    # Reached only for what `WebhookEndpoint` passes on (app/webhooks/endpoint.py), which has
    # the body bounded by `BodyLimit` (UNBLOCK_MAX_WEBHOOK_BODY) as it arrives.
    throttle: AuthThrottle = request.app.state.auth_throttle
    outcome = await accept(
        rt, throttle, client_address(request), account_id, x_mosaic_signature, request.body
    )
    return WebhookAck(status=outcome.value)

"""The OpenAPI document as generated clients use it, built by one mechanism for every router.

A route states only what is particular to it: its success models and the domain error statuses
it can answer (`problems(404, 409)`). Everything else is derived, so a new router gets it for
free: operationIds from function names, security schemes from its auth dependencies (declared as
FastAPI security), 401/403 from that security, 400 wherever there is a body, 422 wherever FastAPI
validates input, 413/429/500 everywhere, and one RFC 9457 `Problem` body on every error status.
"""

from __future__ import annotations

from enum import StrEnum
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from app.blocked_runs.state_machine import Action
from app.errors import PROBLEM_JSON

SCHEMAS = "#/components/schemas/"
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Statuses any route may answer whatever it does: the edge's body limit and rate limit, a
# failure of ours, and the database out of reach.
GLOBAL_PROBLEMS = (413, 429, 500, 503)
_DESCRIPTIONS = {
    400: "The body is not JSON (`bad_request`, `invalid_json`).",
    401: "No valid credentials (`missing_token`, `invalid_token`, `token_expired`, "
    "`bad_signature`).",
    403: "The token lacks the scope (`missing_scope`) or names no account (`no_account`).",
    404: "Unknown id, or another account's (they are indistinguishable).",
    409: "Not allowed now: the problem names the `state`, whether a step is `pending`, and the "
    "`actions` that are.",
    413: "The request body is too large.",
    422: "The input is not valid: `errors` lists each field (`validation_error`), or the value "
    "is not acceptable now (e.g. `plan_not_offered`).",
    429: "Too many requests; wait for `Retry-After`.",
    500: "Something went wrong on our side; nothing internal is shown.",
    503: "The database is unavailable (`database_unavailable`): nothing was done; retry after "
    "`Retry-After`.",
}


class ProblemCode(StrEnum):
    """Every stable `code` a problem may carry; clients may switch on them."""

    BAD_REQUEST = "bad_request"
    INVALID_JSON = "invalid_json"
    UNAUTHORIZED = "unauthorized"
    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    BAD_SIGNATURE = "bad_signature"
    FORBIDDEN = "forbidden"
    MISSING_SCOPE = "missing_scope"
    NO_ACCOUNT = "no_account"
    NOT_FOUND = "not_found"
    ACCOUNT_NOT_FOUND = "account_not_found"
    BLOCKED_RUN_NOT_FOUND = "blocked_run_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    INVALID_STATE = "invalid_state"
    DECISION_IN_PROGRESS = "decision_in_progress"
    NOTHING_WAITING = "nothing_waiting"
    EPISODE_OPEN = "episode_open"
    RUN_NOT_BLOCKED = "run_not_blocked"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    VALIDATION_ERROR = "validation_error"
    INVALID_INPUT = "invalid_input"
    INVALID_STATE_FILTER = "invalid_state_filter"
    INVALID_CURSOR = "invalid_cursor"
    PLAN_NOT_OFFERED = "plan_not_offered"
    TOPUP_INCOMPLETE = "topup_incomplete"
    CHECKOUT_MISSING = "checkout_missing"
    CHECKOUT_INCOMPLETE = "checkout_incomplete"
    MALFORMED_WEBHOOK = "malformed_webhook"
    TOO_MANY_REQUESTS = "too_many_requests"
    INTERNAL_ERROR = "internal_error"
    DATABASE_UNAVAILABLE = "database_unavailable"
    ERROR = "error"
    ACCOUNT_REQUIRED = "account_required"
    DELIVERY_NOT_FOUND = "delivery_not_found"
    DELIVERY_PENDING = "delivery_pending"
    DESTINATION_NOT_ALLOWED = "destination_not_allowed"
    RUN_CHANGED = "run_changed"
    SUBSCRIPTION_DISABLED = "subscription_disabled"
    SUBSCRIPTION_NOT_FOUND = "subscription_not_found"
    TOO_MANY_FAILURES = "too_many_failures"
    TOPUP_OVER_SPEND_CAP = "topup_over_spend_cap"
    TOPUP_PRICE_UNKNOWN = "topup_price_unknown"
    UNKNOWN_ACCOUNT = "unknown_account"
    WEBHOOK_EVENT_NOT_FOUND = "webhook_event_not_found"


def omitted_when_null(schema: dict[str, Any]) -> None:
    """For models whose None members are left out of the JSON: optional, never null."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or prop.get("default", ...) is not None:
            continue
        del prop["default"]
        others = [s for s in prop.pop("anyOf", []) if s != {"type": "null"}]
        if len(others) == 1:
            prop.update(others[0])
        elif others:
            prop["anyOf"] = others


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: `body`, `query` or `path`, then the field.")
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem: every error this service answers, as `application/problem+json`."""

    model_config = ConfigDict(json_schema_extra=omitted_when_null)

    type: str = Field(description="A URI naming the problem type (ends with `code`).")
    title: str = Field(description="The HTTP status phrase.")
    status: int
    detail: str = Field(description="What went wrong, for a person to read.")
    code: ProblemCode
    state: str | None = Field(default=None, description="409: the current state.")
    pending: bool | None = Field(default=None, description="409: a Mosaic step is under way.")
    pending_step: str | None = Field(default=None, description="409: which step.")
    actions: list[Action] | None = Field(default=None, description="409: what is allowed now.")
    errors: list[FieldError] | None = Field(default=None, description="422: each invalid field.")
    offered: list[str] | None = Field(
        default=None, description="422 `plan_not_offered`: the plan ids on offer."
    )


# Schemas that routes reference by hand (an event stream's events) rather than as a body.
_REFERENCED: dict[str, dict[str, Any]] = {}


def referenced_schema(name: str, schema: dict[str, Any]) -> str:
    """Puts `schema` in the document's components as `name`; returns its `$ref`."""
    _REFERENCED[name] = schema
    return SCHEMAS + name


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A router's (or route's) error statuses; the document gives each the Problem body."""
    return {status: {"description": _DESCRIPTIONS.get(status, "")} for status in statuses}


def operation_id(route: APIRoute) -> str:
    """Readable operationIds: the route function's name (kept unique by `build_document`)."""
    return route.name


def _security_problems(operation: dict[str, Any]) -> set[int]:
    # Derived from the security FastAPI records for the route's auth dependencies: any
    # credentials can be missing or wrong (401); a required scope can be lacking (403).
    statuses: set[int] = set()
    for requirement in operation.get("security", []):
        for scopes in requirement.values():
            statuses.add(401)
            if scopes:
                statuses.add(403)
    return statuses


def _drop_boolean_discriminators(node: Any) -> None:
    # OpenAPI's discriminator maps string values: on a boolean tag (top-up's `enable`) generators
    # turn it into the strings "true"/"false". Each branch's `const` already discriminates.
    if isinstance(node, dict):
        mapping = node.get("discriminator", {}).get("mapping", {})
        if mapping and set(mapping) <= {"true", "false"}:
            del node["discriminator"]
        for value in node.values():
            _drop_boolean_discriminators(value)
    elif isinstance(node, list):
        for value in node:
            _drop_boolean_discriminators(value)


def _model_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def build_document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, with problems, security answers and unique operationIds."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
        license_info=app.license_info,
        servers=app.servers,
        tags=app.openapi_tags,
        webhooks=app.webhooks.routes,
        terms_of_service=app.terms_of_service,
        contact=app.contact,
        external_docs=app.openapi_external_docs,
        separate_input_output_schemas=app.separate_input_output_schemas,
    )
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    # FastAPI's own 422 body (`detail` an array) is not what this service answers.
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas.update(_model_schemas(Problem))
    schemas.update(_REFERENCED)
    problem_content = {PROBLEM_JSON: {"schema": {"$ref": SCHEMAS + "Problem"}}}
    seen: dict[str, str] = {}
    for path, path_item in doc["paths"].items():
        for method, operation in path_item.items():
            if method not in _METHODS:
                continue
            op_id = operation["operationId"]
            if op_id in seen:
                raise ValueError(f"operationId {op_id} names {seen[op_id]} and {path}; rename one")
            seen[op_id] = f"{method.upper()} {path}"
            # Stated even when empty: open operations (health, metrics) say so explicitly.
            operation.setdefault("security", [])
            responses: dict[str, Any] = operation["responses"]
            # A body that is not JSON at all is refused before validation (400).
            body_problems = {400} if "requestBody" in operation else set()
            for code in {*GLOBAL_PROBLEMS, *_security_problems(operation), *body_problems}:
                responses.setdefault(str(code), {})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    if not response.get("description") or response["description"] == (
                        "Validation Error"
                    ):
                        response["description"] = _DESCRIPTIONS.get(
                            int(status), HTTPStatus(int(status)).phrase
                        )
                    content = response.get("content")
                    # A route that declares its own error body (readiness) keeps it.
                    if content is None or "HTTPValidationError" in str(content):
                        response["content"] = problem_content
            operation["responses"] = dict(sorted(responses.items()))
    _drop_boolean_discriminators(doc)
    return doc

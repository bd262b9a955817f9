"""Domain errors carry their HTTP status and a stable code; one handler renders RFC 9457."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import asyncpg
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)


class DomainError(Exception):
    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.extra = extra


class NotFound(DomainError):
    status = 404
    code = "not_found"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class InvalidInput(DomainError):
    status = 422
    code = "invalid_input"


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"


class Forbidden(DomainError):
    status = 403
    code = "forbidden"


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {
        "type": f"https://unblock.dev/problems/{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        # A member with no value is left out, as the Problem schema declares.
        **{key: value for key, value in extra.items() if value is not None},
    }
    headers = dict(headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(
        jsonable_encoder(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    429: "too_many_requests",
    415: "unsupported_media_type",
}


def _allowed_methods(request: Request) -> str | None:
    # Starlette's `Allow` names only the first route matching the path; a path served by several
    # routes (GET and POST /v1/blocked-runs) must list them all. Read from the API description,
    # which every router's routes are in; a 405 is rare, so nothing is cached.
    allowed: set[str] = set()
    for path, item in request.app.openapi()["paths"].items():
        if compile_path(path)[0].match(request.url.path):
            allowed |= {method.upper() for method in item}
    if "GET" in allowed:
        allowed.add("HEAD")  # as Starlette serves HEAD for every GET
    return ", ".join(sorted(allowed)) or None


# What says PostgreSQL cannot be reached (down, restarting, refusing, every pooled connection
# busy), as opposed to a statement that failed.
_UNREACHABLE = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    sqlalchemy.exc.TimeoutError,
)
# How long a client waits before trying again while the database is unreachable.
DATABASE_RETRY_AFTER = "2"


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps: SQLAlchemy keeps the driver's error as its cause) says
    the database cannot be reached."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _UNREACHABLE):
            return True
        if isinstance(current, sqlalchemy.exc.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__
    return False


def unexpected_problem(exc: Exception) -> JSONResponse:
    """The answer to an error no handler expected: 503 while the database is unreachable,
    otherwise 500, logged in full."""
    if database_unreachable(exc):
        # Nothing was done (a webhook was not stored): the caller should retry, as Mosaic
        # does with any answer but 2xx. One line, not a traceback per request of an outage.
        log.warning("database unreachable: %s: %s", type(exc).__name__, exc)
        return problem(
            503,
            "database_unavailable",
            "The database is unavailable; try again shortly.",
            headers={"Retry-After": DATABASE_RETRY_AFTER},
        )
    # Logged in full by the server; the caller gets no internals.
    log.exception("unhandled error", exc_info=exc)
    return problem(500, "internal_error", "Something went wrong on our side.")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return problem(422, "validation_error", "The request is not valid.", errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return unexpected_problem(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        answer = problem(exc.status_code, code, str(exc.detail))
        # Starlette's own headers matter (a 405's `Allow`, which RFC 9110 requires).
        answer.headers.update(exc.headers or {})
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            answer.headers["Allow"] = allowed
        return answer


class OperatorError(Exception):
    """Something an operator fixes (configuration, the database): one line, exit code 2."""

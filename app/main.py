"""The FastAPI application: routers, error rendering, health, metrics, and the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.accounts.router import router as accounts_router
from app.auth import TokenVerifier
from app.blocked_runs.router import router as blocked_runs_router
from app.body_limit import BodyLimit
from app.errors import install_error_handlers
from app.log import RequestContext
from app.openapi import build_document, operation_id
from app.organizations.router import router as organization_router
from app.runtime import Runtime
from app.security_headers import SecurityHeaders
from app.settings import Settings, get_settings
from app.startup import schema_problem
from app.stream_deadline import StreamDeadline
from app.subscriptions.router import router as subscriptions_router
from app.throttle import AuthThrottle
from app.webapp import router as webapp
from app.webhooks.endpoint import WebhookEndpoint
from app.webhooks.router import router as webhooks_router
from app.worker import Worker

log = logging.getLogger(__name__)
_HEALTH = {
    "type": "object",
    "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]}},
    "required": ["status"],
}

# Accounts and run actions take a few hundred bytes of JSON; 64 KiB leaves room for any of them.
API_MAX_BODY = 64 * 1024


def create_app(
    settings: Settings | None = None,
    *,
    database_url: str | None = None,
    run_worker: bool | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    with_worker = settings.run_worker if run_worker is None else run_worker

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await Runtime.start(settings, database_url)
        app.state.runtime = rt
        stop = asyncio.Event()
        worker_task = None
        if with_worker:
            worker_task = asyncio.create_task(Worker(rt).run(stop), name="worker")
        try:
            yield
        finally:
            stop.set()
            if worker_task is not None:
                await worker_task
            await rt.close()

    # Swagger UI and ReDoc come from a package, so /docs works offline and behind strict CSPs.
    app = FastAPIOffline(
        title="unblock",
        version="0.1.0",
        summary="Gets credit-blocked Mosaic agent runs moving again.",
        license_info={"name": "MIT", "identifier": "MIT"},
        # Relative: the deployment serving the document, so each serves the committed one.
        servers=[{"url": "/", "description": "The unblock deployment serving this document."}],
        generate_unique_id_function=operation_id,
        lifespan=lifespan,
    )
    app.state.token_verifier = TokenVerifier(settings)
    app.state.auth_throttle = AuthThrottle(
        settings.auth_failures_per_source, settings.auth_failures_per_account
    )
    # Middleware added later wraps what was added before. Bodies are bounded while they
    # arrive, before any route or authentication runs; every answer (CORS preflights and
    # refusals included) carries the request id and the security headers.
    app.add_middleware(
        BodyLimit,
        default=API_MAX_BODY,
        by_prefix={"/v1/webhooks/": settings.max_webhook_body},
    )
    app.add_middleware(StreamDeadline)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "Last-Event-ID"],
            expose_headers=["X-Request-ID"],
            max_age=600,
        )
    app.add_middleware(RequestContext)
    app.add_middleware(SecurityHeaders)  # every answer below this carries its headers
    # Outermost: Mosaic's webhook deliveries are served here, giving them what the layers
    # above give every other request, at a fraction of the cost (app/webhooks/endpoint.py).
    app.add_middleware(WebhookEndpoint, max_body=settings.max_webhook_body)
    install_error_handlers(app)

    def openapi() -> dict[str, object]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Routes match in order: Mosaic's webhooks, by far the busiest, are tried first.
    app.include_router(webhooks_router)
    app.include_router(accounts_router)
    app.include_router(blocked_runs_router)
    app.include_router(organization_router)
    webapp.install(app)
    app.include_router(subscriptions_router)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        responses={
            200: {"description": "Ready.", "content": {"application/json": {"schema": _HEALTH}}},
            503: {
                "description": "The database does not answer.",
                "content": {"application/json": {"schema": _HEALTH}},
            },
        },
    )
    async def readyz() -> JSONResponse:
        """Readiness: the database answers and its schema is the one this code expects."""
        try:
            problem = await asyncio.wait_for(schema_problem(app.state.runtime.db), 2)
        except Exception as exc:
            log.warning("not ready: %s", exc)
            return JSONResponse(
                {"status": "unavailable", "detail": "the database does not answer"},
                status_code=503,
            )
        if problem is not None:
            log.warning("not ready: %s", problem)
            return JSONResponse({"status": "unavailable", "detail": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics."""
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def openapi_document() -> dict[str, object]:
    """The API description, built without starting anything (committed as openapi/openapi.json)."""
    from app.settings import DEV_ENCRYPTION_KEY, DEV_JWT_SECRET, Environment

    settings = Settings(
        env=Environment.DEV, jwt_secret=DEV_JWT_SECRET, encryption_key=DEV_ENCRYPTION_KEY
    )  # type: ignore[arg-type]
    return create_app(settings).openapi()

"""The sandbox's FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp

from mosaic_sandbox import checkout_page, control, mosaic_api
from mosaic_sandbox.errors import ApiError
from mosaic_sandbox.state import Sandbox
from mosaic_sandbox.traffic import TrafficGate


class SandboxApp(FastAPI):
    """FastAPI with the traffic gate outside everything, even Starlette's error middleware."""

    def build_middleware_stack(self) -> ASGIApp:
        sandbox: Sandbox = self.state.sandbox
        return TrafficGate(
            super().build_middleware_stack(), calls=sandbox.calls, faults=sandbox.faults
        )


def create_app(
    *,
    seed: int = 0,
    step_delay: float = 0.2,
    webhook_retry_base: float = 0.2,
    webhook_max_attempts: int = 6,
) -> FastAPI:
    """A new sandbox with its own empty state.

    `step_delay` is the seconds each run node takes; webhook deliveries are retried after
    `webhook_retry_base * 2**n` seconds, at most `webhook_max_attempts` attempts in all.
    """
    if step_delay < 0 or webhook_retry_base < 0:
        raise ValueError("step_delay and webhook_retry_base must not be negative")
    if webhook_max_attempts < 1:
        raise ValueError("webhook_max_attempts must be at least 1")
    sandbox = Sandbox(
        seed=seed,
        step_delay=step_delay,
        webhook_retry_base=webhook_retry_base,
        webhook_max_attempts=webhook_max_attempts,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await sandbox.aclose()

    app = SandboxApp(
        title="Mosaic sandbox",
        description="A local double of the Mosaic API (api.mosaic.so). See docs/sandbox.md.",
        version="1",
        lifespan=lifespan,
    )
    app.state.sandbox = sandbox

    async def render_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    app.add_exception_handler(ApiError, render_api_error)
    app.include_router(mosaic_api.router)
    app.include_router(checkout_page.router)
    app.include_router(control.router)
    return app

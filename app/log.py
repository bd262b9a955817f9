"""Logs for every command: structlog over the standard library, as console lines or JSON lines.

Modules keep `logging.getLogger(__name__)`; their records go through the same processors, so
every line carries the context bound for the request or the step it belongs to (`request_id`,
`account_id`, `blocked_run_id`, `job_id`, `step`, `mosaic_call`).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import LogFormat

# Field names whose values are never written, whoever passes them.
_SECRET_FIELD = re.compile(r"(?i)authorization|api_key|secret|password|token|signature|cookie")
# Accept a caller's request id only if it is short and plain (it ends up in every line).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PATH_IDS = (
    re.compile(r"^/v1/blocked-runs/(?P<blocked_run_id>[0-9a-fA-F-]{36})(?:/|$)"),
    re.compile(r"^/v1/webhooks/mosaic/(?P<account_id>[0-9a-fA-F-]{36})$"),
    re.compile(r"^/v1/accounts/(?P<account_id>[0-9a-fA-F-]{36})$"),
)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        if key != "event" and _SECRET_FIELD.search(key):
            event[key] = "[redacted]"
    return event


def configure(level: str = "INFO", fmt: LogFormat = LogFormat.CONSOLE) -> None:
    """Route the standard library and structlog to stderr, one line per record."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: Any
    if fmt is LogFormat.JSON:
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # A plain traceback. The default, when `rich` is installed (typer brings it), renders
        # every frame's local variables: secrets such as a Mosaic key in the log, and seconds
        # of CPU on the event loop for one error while the answer waits.
        renderer = [
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            )
        ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # httpx logs request lines at INFO; the headers it could show carry Mosaic keys.
    for noisy in ("httpx", "httpcore", "pgserver", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


@contextmanager
def context(**values: Any) -> Iterator[None]:
    """Add these fields to every log line written inside the block (this task only)."""
    with structlog.contextvars.bound_contextvars(**values):
        yield


def bind(**values: Any) -> None:
    """Add fields to the rest of the current request's or step's log lines."""
    structlog.contextvars.bind_contextvars(**values)


# New request ids: a random prefix per process and a counter, 32 hex digits like a UUID's.
# Unique across replicas without a system call per request (uuid4 reads os.urandom each time);
# a request id correlates log lines and is no secret.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def _new_id_prefix() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX, _ID_COUNTER = secrets.token_hex(8), itertools.count()


os.register_at_fork(after_in_child=_new_id_prefix)  # a forked worker is another process


def accepted_request_id(given: str | None) -> str:
    """The caller's X-Request-ID when it is short and plain, else a new one."""
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class RequestContext:
    """ASGI middleware: a request id (the caller's X-Request-ID, or a new one) and the ids in
    the path, on every log line of the request; the id is echoed in the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = accepted_request_id(given)
        fields: dict[str, Any] = {"request_id": request_id}
        for pattern in _PATH_IDS:
            if match := pattern.match(scope["path"]):
                fields |= match.groupdict()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        with context(**fields):
            await self.app(scope, receive, send_with_id)

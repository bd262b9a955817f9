"""A request body limit enforced while the body is read, before any route or authentication.

Starlette buffers `request.body()` whole, and FastAPI reads a body before it resolves the
dependencies that authenticate, so a size check in a route comes after the memory is spent.
Here a declared `Content-Length` over the limit is refused at once, and a chunked body is cut
off as soon as it passes the limit: nothing past the limit (plus one chunk) is ever held.

Hand-rolled because FastAPI's own `max_body_size` answers a declared oversize body with a
text/plain 413, and every answer here is problem+json.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import problem


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit.

    An HTTPException, so FastAPI's body parsing lets it through (it turns other errors into
    400s) and the problem+json handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")


class BodyLimit:
    """ASGI middleware: bodies longer than the limit for their path are answered 413."""

    def __init__(self, app: ASGIApp, *, default: int, by_prefix: dict[str, int]) -> None:
        self.app = app
        self.default = default
        # Longest prefix first, so the most specific one wins.
        self.by_prefix = sorted(by_prefix.items(), key=lambda item: -len(item[0]))

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.by_prefix:
            if path.startswith(prefix):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared == -1:
            await _refuse(scope, send, 400, "bad_request", "Content-Length is not a number.")
            return
        if declared is not None and declared > limit:
            await _refuse(scope, send, 413, "payload_too_large", BodyTooLarge(limit).detail)
            return

        received = 0
        started = False

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except BodyTooLarge as exc:
            # Raised where no exception handler saw it (code reading the stream itself).
            if started:
                raise
            await _refuse(scope, send, 413, "payload_too_large", exc.detail)


def _content_length(scope: Scope) -> int | None:
    """The declared length, None when absent, -1 when it is not a number."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return -1
            return length if length >= 0 else -1
    return None


async def _refuse(scope: Scope, send: Send, status: int, code: str, detail: str) -> None:
    response = problem(status, code, detail)
    # The rest of the body is never read: close the connection rather than drain it.
    response.headers["Connection"] = "close"

    async def nothing() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, nothing, send)

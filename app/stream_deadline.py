"""Event streams end when the token that opened them expires.

A stream is authenticated once, when it opens; left alone it would go on for as long as the run
lives (up to the decision TTL, days). The token's expiry is recorded by authentication in the
request's state, and this middleware ends the answer cleanly at that moment; the client
reconnects with a fresh token. It wraps only `/events` paths, so other requests pay nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Where authentication leaves the token's `exp` (seconds since the epoch) in the scope's state.
TOKEN_EXPIRES_AT = "token_expires_at"


class StreamDeadline:
    """ASGI middleware: a text/event-stream answer ends at its token's expiry."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/events"):
            await self.app(scope, receive, send)
            return

        # The same dict all the way down, even where a router copies the scope.
        state = scope.setdefault("state", {})
        streaming = asyncio.Event()
        finished = False

        async def watching_send(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                    streaming.set()
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        answer = asyncio.ensure_future(self.app(scope, receive, watching_send))
        started = asyncio.ensure_future(streaming.wait())
        try:
            await asyncio.wait({answer, started}, return_when=asyncio.FIRST_COMPLETED)
            expires_at = state.get(TOKEN_EXPIRES_AT)
            if answer.done() or expires_at is None:
                await answer
                return
            try:
                await asyncio.wait_for(asyncio.shield(answer), max(0.0, expires_at - time.time()))
            except TimeoutError:
                answer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await answer
                if not finished:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            started.cancel()
            if not answer.done():
                answer.cancel()

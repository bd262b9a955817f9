"""Mosaic's webhooks served straight from ASGI, ahead of the rest of the HTTP stack.

Mosaic sends an event for every run, most of which unblock ignores, so this is the busiest path
by far. Through FastAPI it paid for every layer each request passes (the request-id, body-limit,
stream-deadline and security-header middlewares, FastAPI's exception layers, route matching,
`Request` and `Response` objects) about as much CPU as for the work itself. `WebhookEndpoint`
sits outside those layers and gives a plain webhook delivery what they give it:

- the request id (the caller's `X-Request-ID` when it is plain, else a new one) on every log
  line, with the account id, and echoed in the answer;
- the body bounded while it arrives (`UNBLOCK_MAX_WEBHOOK_BODY`): a declared longer body is
  refused before a byte is read (and the connection closed), a longer stream as soon as it
  passes the limit;
- the security headers and `Cache-Control: no-store` on every answer;
- the same problem+json answers (`app.errors`), including 503 while the database is unreachable
  and 500, logged, for anything unexpected.

Anything else is passed on to the application unchanged and served by the documented route in
`app/webhooks/router.py` with the same rules: another method or path, an account id not in the
canonical 8-4-4-4-12 form (FastAPI's validation error names it), and a request carrying
`Origin` (a browser's, which CORS answers; Mosaic's deliveries come from its servers).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import bind_contextvars, reset_contextvars

from app.errors import DomainError, NotFound, Unauthorized, problem, unexpected_problem
from app.log import accepted_request_id
from app.runtime import Runtime
from app.security_headers import SECURITY_HEADERS
from app.throttle import AuthThrottle
from app.webhooks.service import Outcome, receive

PREFIX = "/v1/webhooks/mosaic/"
_CANONICAL_ID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# Each answer's body, encoded once: what `WebhookAck` serializes to.
ACKS = {outcome: f'{{"status":"{outcome.value}"}}'.encode() for outcome in Outcome}
_ANSWER_HEADERS = [
    (b"content-type", b"application/json"),
    *((name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()),
    (b"cache-control", b"no-store"),
]


async def accept(
    rt: Runtime,
    throttle: AuthThrottle,
    source: str | None,
    account_id: uuid.UUID,
    signature: str | None,
    body: Callable[[], Awaitable[bytes]],
) -> Outcome:
    """Verify, store and act on one delivery (`receive`), counting failed signatures against
    the source and the account. Both HTTP paths call this; `body` reads the (bounded) body,
    which a throttled caller never gets to send."""
    account = str(account_id)
    throttle.check(source, account)
    raw = await body()
    if len(raw) > rt.settings.max_webhook_body:
        raise DomainError("The event is too large.", status=413, code="payload_too_large")
    try:
        return await receive(rt, account_id, signature, raw)
    except (NotFound, Unauthorized) as exc:
        if isinstance(exc, NotFound) and exc.code != "account_not_found":
            raise
        throttle.failed(source, account)
        # An unknown account and a wrong signature look alike: the answer is no account oracle.
        raise Unauthorized("X-Mosaic-Signature does not match.", code="bad_signature") from None


class _Disconnected(Exception):
    """The client went away before its body had arrived: there is no one to answer."""


class WebhookEndpoint:
    """ASGI middleware: serves `POST /v1/webhooks/mosaic/{account_id}` itself (see the module)."""

    def __init__(self, app: ASGIApp, *, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not path.startswith(PREFIX)
            or not _CANONICAL_ID.fullmatch(path, len(PREFIX))
        ):
            await self.app(scope, receive, send)
            return
        declared = signature = given_id = None
        for name, value in scope["headers"]:
            if name == b"origin":
                await self.app(scope, receive, send)
                return
            # The first of repeated headers counts, as Starlette's `headers.get` does.
            if name == b"content-length" and declared is None:
                declared = value
            elif name == b"x-mosaic-signature" and signature is None:
                signature = value.decode("latin-1")
            elif name == b"x-request-id" and given_id is None:
                given_id = value.decode("latin-1")
        request_id = accepted_request_id(given_id)
        account = path[len(PREFIX) :].lower()
        # What `app.log.context` does, without a generator's cost on the busiest path.
        bound = bind_contextvars(request_id=request_id, account_id=account)
        try:
            answer = await self._answer(scope, receive, uuid.UUID(account), declared, signature)
            headers = [*_ANSWER_HEADERS, (b"x-request-id", request_id.encode())]
            if isinstance(answer, bytes):
                headers.append((b"content-length", str(len(answer)).encode()))
                await send({"type": "http.response.start", "status": 202, "headers": headers})
                await send({"type": "http.response.body", "body": answer})
            elif answer is not None:
                await _send_problem(answer, headers, scope, send)
        finally:
            reset_contextvars(**bound)

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        account_id: uuid.UUID,
        declared: bytes | None,
        signature: str | None,
    ) -> bytes | Response | None:
        """The acknowledgement's body, a problem answer, or None when the client is gone."""
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                return _closing(problem(400, "bad_request", "Content-Length is not a number."))
            if length > self.max_body:
                return _closing(problem(413, "payload_too_large", _too_large(self.max_body)))
        rt: Runtime = scope["app"].state.runtime
        throttle: AuthThrottle = scope["app"].state.auth_throttle
        client = scope.get("client")
        try:
            outcome = await accept(
                rt,
                throttle,
                client[0] if client else None,
                account_id,
                signature,
                lambda: self._body(receive),
            )
        except _Disconnected:
            return None
        except DomainError as exc:
            return problem(exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extra)
        except Exception as exc:
            return unexpected_problem(exc)
        return ACKS[outcome]

    async def _body(self, receive: Receive) -> bytes:
        """The whole body; 413 once it passes the limit (the rest is never read).

        The answer does not close the connection: the server drops the unread rest itself once
        the answer has gone out, where closing at once could reset the answer away."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise DomainError(_too_large(self.max_body), status=413, code="payload_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"The request body is larger than {limit} bytes."


def _closing(answer: Response) -> Response:
    # The rest of the body is never read: close the connection rather than drain it.
    answer.headers["Connection"] = "close"
    return answer


async def _send_problem(
    answer: Response, headers: list[tuple[bytes, bytes]], scope: Scope, send: Send
) -> None:
    own = {name for name, _ in answer.raw_headers}
    extra = [(name, value) for name, value in headers if name not in own]

    async def with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *extra]
        await send(message)

    async def nothing() -> Message:
        return {"type": "http.disconnect"}

    await answer(scope, nothing, with_headers)

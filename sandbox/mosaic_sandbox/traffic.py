"""The sandbox's front door for Mosaic-surface calls: it logs each call and injects faults.

It is the outermost ASGI layer (see `SandboxApp`), outside Starlette's error middleware, for two
reasons: the call log must see the status that really went out, and a `drop` fault needs the
server's own `send` to reach the connection and close it without answering.

A fault marked `lost_answer` lets the call through to the sandbox first (the upgrade is bought,
the settings are written) and only then answers with the fault: what a caller sees when Mosaic
did the work but its answer never arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import random
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mosaic_sandbox.clock import now

# Top-level path segments that belong to Mosaic's API. Anything else (the control surface, the
# hosted checkout page, the sandbox's own OpenAPI docs, a browser's favicon request) is neither
# logged nor faulted.
MOSAIC_PREFIXES = ("/whoami", "/plan", "/credits", "/agent", "/agent_run", "/agent_runs")


def is_mosaic_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in MOSAIC_PREFIXES)


@dataclass
class CallRecord:
    id: int
    time: datetime
    api_key: str | None
    method: str
    path: str
    query: str
    body: Any
    status: int | None = None
    fault: str | None = None
    # For a lost answer: what the sandbox answered before the fault replaced it.
    applied_status: int | None = None


class FaultAction(StrEnum):
    STATUS = "status"
    RATE_LIMIT = "rate_limit"
    LATENCY = "latency"
    DROP = "drop"
    HANG = "hang"


@dataclass
class Fault:
    id: int
    method: str
    path: str
    action: FaultAction
    status: int
    retry_after: float
    latency_ms: int
    remaining: int | None
    rate: float
    lost_answer: bool = False
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        method_matches = self.method == "*" or self.method.upper() == method.upper()
        return method_matches and fnmatch.fnmatchcase(path, self.path)


class FaultBook:
    """Injected faults, checked in the order they were added."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.faults: list[Fault] = []

    def add(
        self,
        *,
        method: str,
        path: str,
        action: FaultAction,
        status: int,
        retry_after: float,
        latency_ms: int,
        count: int | None,
        rate: float,
        lost_answer: bool = False,
    ) -> Fault:
        fault = Fault(
            id=max((f.id for f in self.faults), default=0) + 1,
            method=method,
            path=path,
            action=action,
            status=status,
            retry_after=retry_after,
            latency_ms=latency_ms,
            remaining=count,
            rate=rate,
            lost_answer=lost_answer,
        )
        self.faults.append(fault)
        return fault

    def remove(self, fault_id: int) -> bool:
        before = len(self.faults)
        self.faults = [fault for fault in self.faults if fault.id != fault_id]
        return len(self.faults) != before

    def clear(self) -> None:
        self.faults.clear()

    def fire(self, method: str, path: str) -> tuple[float, Fault | None]:
        """Latency (seconds) to add and the fault that answers instead of the sandbox, if any.

        Latency faults add up and let the call go on; the first other fault that fires decides
        the answer.
        """
        latency = 0.0
        for fault in self.faults:
            if fault.remaining == 0 or not fault.matches(method, path):
                continue
            # Only draw from the shared generator when a rate is set, so adding a certain fault
            # does not shift the ids generated afterwards.
            if fault.rate < 1 and self._rng.random() >= fault.rate:
                continue
            fault.fired += 1
            if fault.remaining is not None:
                fault.remaining -= 1
            if fault.action is FaultAction.LATENCY:
                latency += fault.latency_ms / 1000
                continue
            return latency, fault
        return latency, None


class ConnectionDropped(Exception):
    """Raised for a `drop` fault when the server gives no way to close the connection."""


class TrafficGate:
    def __init__(self, app: ASGIApp, *, calls: list[CallRecord], faults: FaultBook) -> None:
        self.app = app
        self._calls = calls
        self._faults = faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_mosaic_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        body, replay = await _buffer_body(receive)
        record = CallRecord(
            id=len(self._calls) + 1,
            time=now(),
            api_key=_bearer_token(scope),
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            body=_parse_json(body),
        )
        self._calls.append(record)

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        latency, fault = self._faults.fire(scope["method"], scope["path"])
        if latency:
            record.fault = FaultAction.LATENCY.value
            await asyncio.sleep(latency)
        if fault is None:
            await self.app(scope, replay, recording_send)
            return
        record.fault = fault.action.value
        if fault.lost_answer:
            record.applied_status = await _apply_unheard(self.app, scope, replay)
        if fault.action is FaultAction.DROP:
            await _drop_connection(send)
        elif fault.action is FaultAction.HANG:
            await _wait_for_disconnect(replay, fault.latency_ms / 1000)
            await _drop_connection(send)
        elif fault.action is FaultAction.RATE_LIMIT:
            response = JSONResponse(
                {"detail": "Rate limit exceeded"},
                status_code=429,
                headers={"Retry-After": _seconds(fault.retry_after)},
            )
            await response(scope, replay, recording_send)
        else:
            response = JSONResponse(
                {"detail": f"Injected fault: HTTP {fault.status}"}, status_code=fault.status
            )
            await response(scope, replay, recording_send)


async def _buffer_body(receive: Receive) -> tuple[bytes, Receive]:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # The client went away before sending the whole body; let the app see that.
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _apply_unheard(app: ASGIApp, scope: Scope, receive: Receive) -> int | None:
    """Let the sandbox handle the call and throw its answer away; returns the status it gave."""
    status: int | None = None

    async def discard(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, discard)
    return status


async def _wait_for_disconnect(receive: Receive, limit: float) -> None:
    # The body was read already, so the server's `receive` now only returns once the client
    # goes away: a caller's timeout ends the hang at once instead of holding a task for `limit`.
    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(disconnected(), limit)


async def _drop_connection(send: Send) -> None:
    # uvicorn passes a bound method of its per-request cycle as `send`; that cycle holds the
    # connection's transport. Closing it answers nothing, so the client sees the connection end
    # (httpx: RemoteProtocolError "Server disconnected without sending a response").
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise ConnectionDropped("drop fault: this server does not expose its connection")
    transport.close()
    # Let uvicorn notice the lost connection before the app returns, so it does not try to
    # answer a 500 on the closed socket.
    for _ in range(3):
        await asyncio.sleep(0)


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            text: str = value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else text
    return None


def _parse_json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _seconds(value: float) -> str:
    # Whole seconds as the HTTP spec writes them; fractions kept so fast tests can use them.
    return str(int(value)) if float(value).is_integer() else repr(float(value))

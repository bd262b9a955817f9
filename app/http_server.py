"""How `unblock serve` runs uvicorn: bounded connections, and clients that must keep moving.

uvicorn has a keep-alive timeout and a concurrency cap but no deadline for a request's headers,
so a client that opens a connection and sends nothing (or trickles a header a byte at a time)
holds it forever. The protocol below closes such a connection when the deadline passes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import Settings

# Largest request head (request line and headers) uvicorn's parser will hold.
MAX_HEADER_BYTES = 16 * 1024


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection whose request headers are not complete within
    `header_timeout` seconds of the connection opening or the request's first byte."""

    header_timeout = 10.0
    _header_deadline: asyncio.TimerHandle | None = None
    _head_bytes = 0

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def _count(self, size: int) -> None:
        # httptools holds every header it is fed; a head past the bound is refused with a 400.
        self._head_bytes += size
        if self._head_bytes > MAX_HEADER_BYTES:
            raise ValueError("request head too large")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # Idle between requests is the keep-alive timeout's business, not ours.
        self._disarm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the limits in `settings` (docs/security.md)."""
    protocol = type(
        "HeaderDeadlineProtocol",
        (HeaderDeadlineProtocol,),
        {"header_timeout": settings.header_timeout.total_seconds()},
    )
    return {
        "http": protocol,
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": max(1, round(settings.keep_alive_timeout.total_seconds())),
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "server_header": False,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
    }

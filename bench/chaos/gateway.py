"""How callers reach the API replicas: any live replica per request, retried the way a frontend
or an internal service retries (connection errors and 5xx), every answer's status recorded."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.chaos.cluster import Cluster


class GaveUp(Exception):
    """A call that kept failing until its caller's deadline."""


@dataclass
class ServerError:
    at: float  # time.monotonic()
    status: int
    method: str
    path: str


@dataclass
class Traffic:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    connection_errors: int = 0
    server_errors: list[ServerError] = field(default_factory=list)


class Gateway:
    def __init__(self, cluster: Cluster, rng: random.Random, timeout: float = 15) -> None:
        self.cluster = cluster
        self.traffic = Traffic()
        self._rng = rng
        self._http = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=200, max_keepalive_connections=50)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(
        self,
        method: str,
        path: str,
        *,
        deadline: float,
        headers: dict[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        tries: list[int] | None = None,
    ) -> httpx.Response:
        """The first answer below 500, retrying transport errors and 5xx with backoff.

        `tries`, when given, gets the number of attempts appended: more than one means an
        earlier attempt may have been carried out without its answer reaching us.
        """
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            url = self.cluster.api_url() + path
            try:
                answer = await self._http.request(
                    method, url, headers=headers, json=json, content=content, params=params
                )
            except httpx.TransportError:
                self.traffic.connection_errors += 1
            else:
                self.traffic.requests += 1
                self.traffic.statuses[answer.status_code] += 1
                if answer.status_code < 500:
                    if tries is not None:
                        tries.append(attempt)
                    return answer
                self.traffic.server_errors.append(
                    ServerError(time.monotonic(), answer.status_code, method, path)
                )
            if time.monotonic() + delay > deadline:
                raise GaveUp(f"{method} {path}")
            # Full jitter so callers retrying at once do not arrive together again.
            await asyncio.sleep(self._rng.uniform(0, delay))
            delay = min(delay * 2, 1.0)

"""Many callers' requests answered by one call per batch: the group-commit pattern.

The first request is handled at once; those arriving while a batch is under way wait for it and
go together in the next one, so under load one round trip serves a whole batch, and alone a
caller waits for nobody. The step's outcome writes (`work_queue.GroupCommit`) and the webhooks'
open-episode reads (`webhooks.ingest.NewsReads`) are built on it.

Hand-rolled because it is one queue and one task; the libraries that batch (aiodataloader and
the like) key by value and cache answers, and nothing here may be cached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextvars import Context
from typing import Generic, TypeVar

Q = TypeVar("Q")
A = TypeVar("A")


class Coalescer(Generic[Q, A]):
    """`flush` gets a batch (at most `limit` requests, in order) and answers each, in order; an
    exception among the answers is raised in its own caller only. A failed `flush` raises its
    error in every caller of that batch; a caller that stops waiting leaves the rest alone."""

    def __init__(
        self, flush: Callable[[list[Q]], Awaitable[Sequence[A | Exception]]], *, limit: int
    ) -> None:
        self._flush = flush
        self._limit = limit
        self._queue: list[tuple[Q, asyncio.Future[A]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, request: Q) -> asyncio.Future[A]:
        """Hand a request over; the future ends with its answer (or its batch's error)."""
        waiter: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._queue.append((request, waiter))
        if self._task is None or self._task.done():
            # Its own context: the task serves every caller of a batch, not the first one.
            self._task = asyncio.create_task(self._serve(), context=Context())
        return waiter

    async def drain(self) -> None:
        """Wait for the requests handed over so far to be served (bound it with a timeout)."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def _serve(self) -> None:
        # Requests that arrive in this same turn of the loop join the first batch.
        await asyncio.sleep(0)
        while self._queue:
            batch, self._queue = self._queue[: self._limit], self._queue[self._limit :]
            try:
                answers = await self._flush([request for request, _ in batch])
            except Exception as exc:
                for _, waiter in batch:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            except BaseException:
                # The task itself is cancelled (the loop is closing): no one is left waiting.
                for _, waiter in batch + self._queue:
                    waiter.cancel()
                raise
            for (_, waiter), answer in zip(batch, answers, strict=True):
                if waiter.done():
                    continue
                if isinstance(answer, Exception):
                    waiter.set_exception(answer)
                else:
                    waiter.set_result(answer)

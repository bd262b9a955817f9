"""Retry delays: exponential with full jitter, capped, never sooner than Retry-After."""

from __future__ import annotations

from datetime import timedelta

from app.work_queue import backoff

BASE, CAP = timedelta(milliseconds=500), timedelta(seconds=60)


def test_delays_grow_exponentially_up_to_the_cap_with_full_jitter() -> None:
    for attempts, ceiling in [(1, 0.5), (2, 1.0), (4, 4.0), (8, 60.0), (10_000, 60.0)]:
        delays = [
            backoff(attempts, base=BASE, cap=CAP, retry_after=None).total_seconds()
            for _ in range(200)
        ]
        assert all(0 <= d <= ceiling for d in delays), (attempts, max(delays))
        assert max(delays) > ceiling / 2, "no jitter spread: the ceiling is never approached"
        assert min(delays) < ceiling / 2, "no jitter spread: always near the ceiling"


def test_retry_after_is_a_floor() -> None:
    delays = [backoff(1, base=BASE, cap=CAP, retry_after=7.0) for _ in range(50)]
    assert all(d == timedelta(seconds=7) for d in delays)

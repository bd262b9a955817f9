"""Throttling of failed authentication: a token bucket per client address and per account.

Each failure takes a token; a bucket refills at its rate per minute and holds at most that many.
While a key's bucket is empty its callers are answered 429 before anything is verified, so
guessing a webhook secret or a token costs the guesser time instead of the service CPU.

Hand-rolled because it is a dict of two floats per key; a rate-limit library would bring
storage backends and decorators this does not need. It counts per process: with N replicas a
source gets up to N times the rate, so set the ingress limit too (docs/security.md).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import DomainError

# Keys remembered at most; the least recently failing are forgotten first, so a flood of
# spoofed sources cannot grow memory without bound.
MAX_KEYS = 50_000


class TooManyFailures(DomainError):
    status = 429
    code = "too_many_failures"


@dataclass
class _Bucket:
    tokens: float
    updated: float


class FailureThrottle:
    """Failed attempts allowed per key: `per_minute` at once, refilled at `per_minute` a minute."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _refilled(self, key: str, now: float) -> _Bucket | None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= self.capacity:  # full again: nothing worth remembering
                del self._buckets[key]
                return None
        return bucket

    def retry_after(self, key: str) -> int | None:
        """Seconds until this key may try again, or None when it may try now."""
        if key not in self._buckets:  # the common case: no failures remembered
            return None
        bucket = self._refilled(key, self._clock())
        if bucket is None or bucket.tokens >= 1:
            return None
        return max(1, math.ceil((1 - bucket.tokens) / self.rate))

    def failed(self, key: str) -> None:
        """Take one token for a failed attempt."""
        now = self._clock()
        bucket = self._refilled(key, now) or _Bucket(self.capacity, now)
        bucket.tokens = max(0.0, bucket.tokens - 1)
        self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        while len(self._buckets) > MAX_KEYS:
            self._buckets.popitem(last=False)


class AuthThrottle:
    """The service's two throttles: by client address, and by the webhook account addressed."""

    def __init__(self, per_source: int, per_account: int) -> None:
        self.sources = FailureThrottle(per_source)
        self.accounts = FailureThrottle(per_account)

    def check(self, source: str | None, account: str | None = None) -> None:
        """Raise 429 while the source or the account has no failures left."""
        waits = [
            self.sources.retry_after(source) if source else None,
            self.accounts.retry_after(account) if account else None,
        ]
        wait = max((w for w in waits if w is not None), default=None)
        if wait is not None:
            raise TooManyFailures(
                "Too many failed authentications; try again later.",
                headers={"Retry-After": str(wait)},
            )

    def failed(self, source: str | None, account: str | None = None) -> None:
        if source:
            self.sources.failed(source)
        if account:
            self.accounts.failed(account)

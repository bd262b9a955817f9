"""What a secret must be before it guards real data: long, varied, and not one anyone has read.

Published values (the dev defaults, the placeholders in deploy/ and the docs) are compared after
removing all whitespace and case, so a trailing newline or a `KEY, DEV_KEY` list cannot slip one
through.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# Values that `unblock dev` uses; refused anywhere but dev so a demo secret never guards real data.
DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-0123456789"
DEV_ENCRYPTION_KEY = "ZGV2LW9ubHktZmVybmV0LWtleS1jaGFuZ2UtbWUhISE="

# Every secret value that appears in this repository (dev defaults, deploy/ placeholders).
PUBLISHED_SECRETS = frozenset(
    {
        DEV_JWT_SECRET,
        DEV_ENCRYPTION_KEY,
        "CHANGE-ME-generate-a-long-random-secret",
        "CHANGE-ME-fernet-key",
        "CHANGE-ME",
    }
)
# Words that mark a placeholder wherever they appear in a value.
PLACEHOLDER_MARKS = ("changeme", "change-me", "change_me", "placeholder", "example")

JWT_SECRET_MIN_LENGTH = 32
JWT_SECRET_MIN_BITS = 128
WEBHOOK_SECRET_MIN_LENGTH = 24
WEBHOOK_SECRET_MIN_BITS = 96


def _normalised(value: str) -> str:
    return "".join(value.split()).lower()


_PUBLISHED = frozenset(_normalised(s) for s in PUBLISHED_SECRETS)


def is_published(value: str) -> bool:
    """True for a published or placeholder value, however it is spaced or cased."""
    flat = _normalised(value)
    return flat in _PUBLISHED or any(mark in flat for mark in PLACEHOLDER_MARKS)


def estimated_bits(value: str) -> float:
    """A generous upper bound on a secret's entropy: length × log2(distinct characters)."""
    distinct = len(set(value))
    return len(value) * math.log2(distinct) if distinct > 1 else 0.0


def weakness(value: str, *, min_length: int, min_bits: int) -> str | None:
    """Why this secret is refused, in a few words, or None when it may be used."""
    if is_published(value):
        return "is a published example or placeholder value; generate a random one"
    if len(value.strip()) < min_length:
        return f"must be at least {min_length} characters"
    if estimated_bits(value) < min_bits:
        return "is too repetitive to be random; generate a random one"
    return None


def published_among(values: Iterable[str]) -> bool:
    """True if any of these (comma-separated list items, say) is a published value."""
    return any(is_published(v) for v in values)

"""Signing keys from a JWKS URL, fetched asynchronously, cached, and refreshed at a bounded rate.

PyJWKClient fetches with urllib in a thread (30 s default timeout) and refetches on every unknown
`kid`, so anyone can make the service hammer its identity provider. Here a fetch has a short
timeout and a size bound, runs at most once per `min_refresh` (one at a time: callers wait for
the fetch under way), and an unknown `kid` between refreshes is simply not a key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import jwt

# Which key type each accepted algorithm needs; a token naming a key of another type is refused
# here, before PyJWT is handed a key it cannot use (that raised TypeError: a 500).
KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
FETCH_TIMEOUT = 3.0
log = logging.getLogger(__name__)
MAX_DOCUMENT_BYTES = 256 * 1024


class KeyUnavailable(Exception):
    """No usable key for this token (unknown kid, wrong type, or the JWKS cannot be read)."""


class JwksKeys:
    """The signing keys published at `url`, by `kid`."""

    def __init__(
        self,
        url: str,
        *,
        max_age: float = 300.0,
        min_refresh: float = 30.0,
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self.url = url
        self.max_age = max_age
        self.min_refresh = min_refresh
        self.timeout = timeout
        self.fetches = 0
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()

    async def key_for(self, kid: Any, algorithm: str) -> Any:
        """The public key to verify a token whose header names `kid` and `algorithm`."""
        wanted = KEY_TYPES.get(algorithm)
        if wanted is None:
            raise KeyUnavailable(f"algorithm {algorithm!r} is not accepted")
        if kid is not None and not isinstance(kid, str):
            raise KeyUnavailable("kid is not a string")
        jwk = self._keys.get(kid) if self._fresh() else None
        if jwk is None:
            await self._refresh()
            jwk = self._keys.get(kid)
        if jwk is None and kid is None and len(self._keys) == 1:
            jwk = next(iter(self._keys.values()))  # one key published: a token may omit kid
        if jwk is None:
            raise KeyUnavailable("no published key has this kid")
        if jwk.key_type != wanted or jwk.algorithm_name != algorithm:
            raise KeyUnavailable(f"the key is for {jwk.algorithm_name}, the token says {algorithm}")
        return jwk.key

    def _fresh(self) -> bool:
        return self._fetched_at is not None and time.monotonic() - self._fetched_at < self.max_age

    async def _refresh(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._attempted_at is not None and now - self._attempted_at < self.min_refresh:
                return  # fetched (or tried) a moment ago, maybe by the caller we waited for
            self._attempted_at = now
            try:
                document = await self._fetch()
                keys = {
                    k.key_id: k
                    for k in jwt.PyJWKSet.from_dict(document).keys
                    if k.key_type in KEY_TYPES.values() and k.public_key_use in (None, "sig")
                }
            except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
                # Keep the keys we had: an identity provider's blip must not log everyone out.
                log.warning("JWKS at %s cannot be read: %s", self.url, type(exc).__name__)
                return
            self._keys = keys
            self._fetched_at = now

    async def _fetch(self) -> dict[str, Any]:
        self.fetches += 1
        # A client per fetch: fetches are rare (at most one per min_refresh) and this keeps the
        # verifier free of the lifespan's resources.
        async with (
            httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as http,
            http.stream("GET", self.url, headers={"Accept": "application/json"}) as answer,
        ):
            answer.raise_for_status()
            body = bytearray()
            async for chunk in answer.aiter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise ValueError("the JWKS document is too large")
        document = json.loads(bytes(body))
        if not isinstance(document, dict):
            raise ValueError("the JWKS document is not an object")
        return document

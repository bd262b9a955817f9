"""Bearer JWTs: HS256 with a shared secret, or RS256/ES256 keys from a JWKS URL."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import Any

import jwt
from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict

from app.errors import Forbidden, Unauthorized
from app.settings import Settings


class Scope(StrEnum):
    RUNS_READ = "runs:read"
    RUNS_WRITE = "runs:write"
    RUNS_REGISTER = "runs:register"
    ACCOUNTS_ADMIN = "accounts:admin"


class Principal(BaseModel):
    model_config = ConfigDict(frozen=True)

    sub: str
    account_id: uuid.UUID | None
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        return f"user:{self.sub}"

    def has(self, scope: Scope) -> bool:
        return scope.value in self.scopes


class TokenVerifier:
    """Verifies tokens with exactly one configured key source; `alg: none` never passes."""

    def __init__(self, settings: Settings) -> None:
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._jwks: jwt.PyJWKClient | None = None
        self._secret: str | None = None
        if settings.jwks_url:
            self._jwks = jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300)
            self._algorithms = ["RS256", "ES256"]
        elif settings.jwt_secret is not None:
            self._secret = settings.jwt_secret.get_secret_value()
            self._algorithms = ["HS256"]
        else:
            raise ValueError("no JWT key source configured")

    async def verify(self, token: str) -> Principal:
        try:
            if self._jwks is not None:
                # PyJWKClient fetches over urllib; keep it off the event loop.
                signing = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
                key: Any = signing.key
            else:
                key = self._secret
            claims = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self._audience is not None,
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("The token has expired.", code="token_expired") from exc
        except (jwt.PyJWTError, ValueError) as exc:
            raise Unauthorized("The token is not valid.", code="invalid_token") from exc
        return principal_from_claims(claims)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    raw_scope = claims.get("scope", claims.get("scp", ""))
    if isinstance(raw_scope, str):
        scopes = frozenset(raw_scope.split())
    elif isinstance(raw_scope, list) and all(isinstance(s, str) for s in raw_scope):
        scopes = frozenset(raw_scope)
    else:
        raise Unauthorized("The token's scope claim is malformed.", code="invalid_token")
    account = claims.get("account_id")
    try:
        account_id = uuid.UUID(str(account)) if account else None
    except ValueError as exc:
        raise Unauthorized("The token's account_id is malformed.", code="invalid_token") from exc
    if not isinstance(claims.get("sub"), str):
        raise Unauthorized("The token's sub claim is malformed.", code="invalid_token")
    return Principal(sub=claims["sub"], account_id=account_id, scopes=scopes)


def mint_token(
    secret: str,
    *,
    sub: str,
    scopes: list[str],
    account_id: uuid.UUID | str | None = None,
    ttl_seconds: int = 3600,
) -> str:
    """An HS256 token for local use (`unblock token`, `unblock dev`, tests)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "iat": now,
        "exp": now + ttl_seconds,
        "scope": " ".join(scopes),
    }
    if account_id:
        claims["account_id"] = str(account_id)
    return jwt.encode(claims, secret, algorithm="HS256")


# Declared as a security scheme so the OpenAPI document carries it (and Swagger UI can send a
# token); auto_error=False because a missing token is our own problem+json 401.
bearer = HTTPBearer(
    scheme_name="bearerAuth",
    bearerFormat="JWT",
    description="A JWT naming `account_id` and a space-separated `scope`.",
    auto_error=False,
)


async def _verified(
    request: Request, credentials: HTTPAuthorizationCredentials | None
) -> Principal:
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized("Send Authorization: Bearer <token>.", code="missing_token")
    verifier: TokenVerifier = request.app.state.token_verifier
    return await verifier.verify(credentials.credentials.strip())


async def authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)
) -> Principal:
    """A dependency: any authenticated caller."""
    return await _verified(request, credentials)


def requires(scope: Scope) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency: an authenticated caller holding `scope`."""

    async def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Security(bearer, scopes=[scope.value]),
    ) -> Principal:
        principal = await _verified(request, credentials)
        if not principal.has(scope):
            raise Forbidden(f"This needs the {scope.value} scope.", code="missing_scope")
        return principal

    return dependency


def account_of(principal: Principal) -> uuid.UUID:
    """The account a runs call acts for; an admin token without one has no runs to see."""
    if principal.account_id is None:
        raise Forbidden("This token names no account_id.", code="no_account")
    return principal.account_id

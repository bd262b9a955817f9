"""Bearer JWTs: HS256 with a shared secret, or RS256/ES256 keys from a JWKS URL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import Any

import jwt
from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from app import log as log_context
from app.accounts.models import Account
from app.errors import Forbidden, Unauthorized
from app.input_text import storable
from app.jwks import JwksKeys, KeyUnavailable
from app.settings import Settings
from app.stream_deadline import TOKEN_EXPIRES_AT
from app.throttle import AuthThrottle

# The actor recorded in history is "service:" + sub, in a 200-character column.
MAX_SUB_LENGTH = 128
# How long an account named by a token is taken to exist without asking the database again.
KNOWN_ACCOUNT_SECONDS = 60.0
KNOWN_ACCOUNTS_MAX = 10_000
# What a hostile token can make decoding raise; each is the token's fault, answered 401.
_MALFORMED = (jwt.PyJWTError, KeyUnavailable, ValueError, TypeError, KeyError, ArithmeticError)


class Scope(StrEnum):
    RUNS_READ = "runs:read"
    RUNS_WRITE = "runs:write"
    RUNS_REGISTER = "runs:register"
    ACCOUNTS_ADMIN = "accounts:admin"
    # The account's own admin: manages its outbound notification subscriptions.
    SUBSCRIPTIONS_ADMIN = "subscriptions:admin"


class Principal(BaseModel):
    model_config = ConfigDict(frozen=True)

    sub: str
    account_id: uuid.UUID | None
    scopes: frozenset[str]
    # When the token stops being valid (its `exp`, seconds since the epoch).
    expires_at: float | None = None

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
        self._jwks: JwksKeys | None = None
        self._secret: str | None = None
        self._known_accounts: dict[uuid.UUID, float] = {}
        if settings.jwks_url:
            self._jwks = JwksKeys(settings.jwks_url)
            self._algorithms = ["RS256", "ES256"]
        elif settings.jwt_secret is not None:
            self._secret = settings.jwt_secret.get_secret_value()
            self._algorithms = ["HS256"]
        else:
            raise ValueError("no JWT key source configured")

    async def verify(self, token: str) -> Principal:
        try:
            if self._jwks is not None:
                header = jwt.get_unverified_header(token)
                key: Any = await self._jwks.key_for(header.get("kid"), str(header.get("alg")))
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
        except _MALFORMED as exc:
            raise Unauthorized("The token is not valid.", code="invalid_token") from exc
        return principal_from_claims(claims)

    async def ensure_account_exists(self, request: Request, account_id: uuid.UUID) -> None:
        """A signed token may name an account that was never made (or is gone): refuse it."""
        now = time.monotonic()
        if self._known_accounts.get(account_id, 0.0) > now:
            return
        rt = request.app.state.runtime
        async with rt.db.sessions() as session:
            found = await session.scalar(select(Account.id).where(Account.id == account_id))
        if found is None:
            raise Unauthorized("The token's account does not exist.", code="unknown_account")
        if len(self._known_accounts) >= KNOWN_ACCOUNTS_MAX:
            self._known_accounts.clear()
        self._known_accounts[account_id] = now + KNOWN_ACCOUNT_SECONDS


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
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_LENGTH or not _storable(sub):
        raise Unauthorized("The token's sub claim is malformed.", code="invalid_token")
    exp = claims.get("exp")
    expires_at = float(exp) if isinstance(exp, int | float) else None
    return Principal(sub=sub, account_id=account_id, scopes=scopes, expires_at=expires_at)


def _storable(text: str) -> bool:
    try:
        storable(text)
    except ValueError:
        return False
    return True


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


def client_address(request: Request) -> str | None:
    """The caller's address (the proxy's X-Forwarded-For when uvicorn trusts that proxy)."""
    return request.client.host if request.client else None


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
    # Only a presented token is a guess worth counting; a missing one costs nothing to refuse.
    throttle: AuthThrottle = request.app.state.auth_throttle
    source = client_address(request)
    throttle.check(source)
    try:
        verifier: TokenVerifier = request.app.state.token_verifier
        principal = await verifier.verify(credentials.credentials.strip())
        # A stream opened with this token ends when it expires (app/stream_deadline.py).
        setattr(request.state, TOKEN_EXPIRES_AT, principal.expires_at)
        if principal.account_id is not None:
            await verifier.ensure_account_exists(request, principal.account_id)
    except Unauthorized as exc:
        # An expired token was signed with our key: an honest client late to refresh, not a guess.
        if exc.code != "token_expired":
            throttle.failed(source)
        raise
    if principal.account_id is not None:
        log_context.bind(account_id=str(principal.account_id))
    return principal


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


def requires_any(*scopes: Scope) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency: an authenticated caller holding at least one of `scopes`."""

    async def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Security(
            bearer, scopes=[scope.value for scope in scopes]
        ),
    ) -> Principal:
        principal = await _verified(request, credentials)
        if not any(principal.has(scope) for scope in scopes):
            names = " or ".join(scope.value for scope in scopes)
            raise Forbidden(f"This needs the {names} scope.", code="missing_scope")
        return principal

    return dependency


def account_of(principal: Principal) -> uuid.UUID:
    """The account a runs call acts for; an admin token without one has no runs to see."""
    if principal.account_id is None:
        raise Forbidden("This token names no account_id.", code="no_account")
    return principal.account_id

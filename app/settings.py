"""The one settings class: every knob of the service, read from the environment."""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that `unblock dev` uses; refused anywhere but dev so a demo secret never guards real data.
DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-0123456789"
DEV_ENCRYPTION_KEY = "ZGV2LW9ubHktZmVybmV0LWtleS1jaGFuZ2UtbWUhISE="


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def _duration(value: Any) -> Any:
    """Durations in the environment: `30` or `30s`, `500ms`, `5m`, `1h`, `7d` (ISO 8601 too)."""
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PRODUCTION = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNBLOCK_", extra="ignore", populate_by_name=True)

    env: Environment = Environment.PRODUCTION
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "UNBLOCK_DATABASE_URL")
    )
    data_dir: Path = Path(".unblock")
    public_url: str = "http://127.0.0.1:8000"
    mosaic_base_url: str = Field(
        default="https://api.mosaic.so",
        validation_alias=AliasChoices("MOSAIC_BASE_URL", "UNBLOCK_MOSAIC_BASE_URL"),
    )
    mosaic_timeout: Duration = timedelta(seconds=10)
    mosaic_connect_timeout: Duration = timedelta(seconds=3)

    jwt_secret: SecretStr | None = None
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Fernet keys, comma-separated; the first encrypts, all decrypt (rotation).
    encryption_key: SecretStr | None = None

    run_worker: bool = True
    worker_concurrency: int = Field(default=8, ge=1, le=256)
    job_lease: Duration = timedelta(seconds=30)
    poll_interval: Duration = timedelta(seconds=1)
    retry_base: Duration = timedelta(milliseconds=500)
    retry_max: Duration = timedelta(seconds=60)
    give_up_after: Duration = timedelta(hours=1)
    action_deadline: Duration = timedelta(seconds=2)
    decision_ttl: Duration = timedelta(days=7)
    # A block reported this soon after the organization's answer is served by that answer.
    decision_grace: Duration = timedelta(minutes=2)
    # While a checkout is open: first re-read of GET /plan, doubling up to the cap; give up on
    # the checkout (back to a choice) after the TTL.
    checkout_poll: Duration = timedelta(seconds=10)
    checkout_poll_max: Duration = timedelta(minutes=5)
    checkout_ttl: Duration = timedelta(hours=24)
    max_resumes: int = Field(default=3, ge=1)
    # Resumes older than this no longer count toward max_resumes ("blocks again right after").
    resume_window: Duration = timedelta(hours=1)
    webhook_retention: Duration = timedelta(days=7)
    log_level: str = Field(default="INFO", pattern=r"(?i)^(debug|info|warning|error|critical)$")
    # Outbound notifications to subscribers (app/subscriptions): each attempt's timeout, the
    # backoff between attempts, how long a delivery is retried before its subscription is
    # disabled, and CIDRs a subscription may resolve into although not public (loopback, …).
    notify_timeout: Duration = timedelta(seconds=10)
    notify_retry_base: Duration = timedelta(seconds=1)
    notify_retry_max: Duration = timedelta(minutes=10)
    notify_give_up_after: Duration = timedelta(hours=24)
    notify_allowed_networks: str = ""
    checkout_success_url: str | None = None
    checkout_cancel_url: str | None = None

    @field_validator("public_url", "mosaic_base_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("notify_allowed_networks")
    @classmethod
    def _cidrs(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            ipaddress.ip_network(part, strict=False)  # a ValueError names the bad one
        return value

    @model_validator(mode="after")
    def _refuse_placeholders_outside_dev(self) -> Settings:
        if self.env is Environment.DEV:
            return self
        secret = self.jwt_secret.get_secret_value() if self.jwt_secret else None
        key = self.encryption_key.get_secret_value() if self.encryption_key else None
        if secret == DEV_JWT_SECRET or (key and DEV_ENCRYPTION_KEY in key.split(",")):
            raise ValueError("the dev placeholder secrets are refused outside UNBLOCK_ENV=dev")
        if not secret and not self.jwks_url:
            raise ValueError("set UNBLOCK_JWT_SECRET or UNBLOCK_JWKS_URL")
        if not key:
            raise ValueError("set UNBLOCK_ENCRYPTION_KEY (one or more Fernet keys)")
        return self

    @property
    def encryption_keys(self) -> list[str]:
        if self.encryption_key is None:
            return []
        return [k.strip() for k in self.encryption_key.get_secret_value().split(",") if k.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()

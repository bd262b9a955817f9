"""Accounts over HTTP: what comes in, and what goes out (never the Mosaic key)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from app.input_text import StorableStr, storable

# One definition of "no surrounding spaces", in a form Python and ECMA regexes (the document's
# `pattern`) read alike, so what the document allows is exactly what the validator accepts.
_SECRET_PATTERN = r"^[^ \t\n\r\f\v]([\s\S]*[^ \t\n\r\f\v])?$"
_SECRET_SHAPE: dict[str, Any] = {"minLength": 1, "maxLength": 500, "pattern": _SECRET_PATTERN}


class AccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StorableStr = Field(min_length=1, max_length=200)
    mosaic_api_key: SecretStr = Field(
        description="The organization's Mosaic key (mk_…).", json_schema_extra=_SECRET_SHAPE
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="The secret Mosaic sends in X-Mosaic-Signature; generated when omitted.",
        json_schema_extra=_SECRET_SHAPE,
    )

    @field_validator("mosaic_api_key", "webhook_secret")
    @classmethod
    def _no_blank_secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = storable(value.get_secret_value())
            if len(raw) > 500 or not re.fullmatch(_SECRET_PATTERN, raw):
                raise ValueError("must be a non-empty string without surrounding spaces")
        return value


class AccountOut(BaseModel):
    id: uuid.UUID
    name: str
    webhook_url: str
    created_at: datetime


class AccountCreated(AccountOut):
    webhook_secret: str | None = Field(
        default=None, description="Only when generated, and only in this answer."
    )

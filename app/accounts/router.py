"""HTTP for accounts."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, status

from app.accounts import service
from app.accounts.schemas import AccountCreate, AccountCreated, AccountOut, AccountUpdate
from app.auth import Principal, Scope, authenticate, requires
from app.errors import NotFound
from app.openapi import problems
from app.runtime import Runtime, runtime

router = APIRouter(prefix="/v1/accounts", tags=["accounts"])


# exclude_none: `webhook_secret` appears only when generated, never as a null beside a supplied one.
@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=AccountCreated,
    response_model_exclude_none=True,
)
async def create_account(
    body: AccountCreate,
    _: Annotated[Principal, Depends(requires(Scope.ACCOUNTS_ADMIN))],
    rt: Annotated[Runtime, Depends(runtime)],
) -> AccountCreated:
    """Create an account; point the organization's Mosaic runs at the returned webhook_url."""
    async with rt.db.transaction() as session:
        return await service.create(session, rt.keyring, body, rt.settings.public_url)


@router.get(
    "/{account_id}",
    response_model=AccountOut,
    responses=problems(404),
)
async def read_account(
    account_id: uuid.UUID,
    principal: Annotated[Principal, Depends(authenticate)],
    rt: Annotated[Runtime, Depends(runtime)],
) -> AccountOut:
    """An admin may read any account; any other token only its own (others look unknown)."""
    if not principal.has(Scope.ACCOUNTS_ADMIN) and principal.account_id != account_id:
        raise NotFound("No such account.", code="account_not_found")
    async with rt.db.sessions() as session:
        account = await service.get(session, account_id)
        return service.to_out(account, rt.settings.public_url)


@router.patch(
    "/{account_id}",
    response_model=AccountOut,
    responses={
        404: {"description": "Unknown id."},
        422: {"description": "A cap that is negative, too large or not in cents."},
    },
)
async def update_account(
    account_id: uuid.UUID,
    body: AccountUpdate,
    _: Annotated[Principal, Depends(requires(Scope.ACCOUNTS_ADMIN))],
    rt: Annotated[Runtime, Depends(runtime)],
) -> AccountOut:
    """Set (or clear, with null) the account's monthly cap on auto top-up spend."""
    async with rt.db.transaction() as session:
        account = await service.update(session, account_id, body)
        return service.to_out(account, rt.settings.public_url)

"""A workspace's API tokens: list, make, name, change expiry, revoke."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Response, status
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import func

from services.api.deps import CurrentWorkspace, PathId, SessionDep, StrictQueryRoute, bearer
from services.api.schemas import NewTokenOut, TokenIn, TokenOut, TokenPatch
from shared.db.models import ApiToken
from shared.domain.errors import StateConflict, ValidationFailed
from shared.domain.tokens import (
    TokenInfo,
    check_expiry,
    new_token,
    token_id_of,
    token_info,
    workspace_token,
    workspace_tokens,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/tokens", tags=["tokens"], route_class=StrictQueryRoute)


CurrentToken = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _out(info: TokenInfo, current: int | None) -> TokenOut:
    return TokenOut(
        id=info.id,
        name=info.name,
        prefix=info.prefix,
        created_at=info.created_at,
        last_used_at=info.last_used_at,
        expires_at=info.expires_at,
        revoked_at=info.revoked_at,
        current=info.id == current,
    )


def _current(session: SessionDep, credentials: CurrentToken) -> int | None:
    return token_id_of(session, credentials.credentials) if credentials else None


def _expiry(
    session: SessionDep, credentials: CurrentToken, value: datetime | None
) -> datetime | None:
    """An expiry as given, checked; a token that expires cannot give a token (itself or
    another) a longer life than its own: expiry limits what a leaked token can do.
    """
    try:
        check_expiry(value)
    except ValueError as exc:
        raise ValidationFailed.one("expires_at", str(exc), "expiry") from None
    caller_id = _current(session, credentials)
    caller = session.get(ApiToken, caller_id) if caller_id is not None else None
    limit = caller.expires_at if caller is not None else None
    if limit is not None and (value is None or value > limit):
        raise ValidationFailed.one(
            "expires_at",
            f"this request's token expires at {limit.isoformat()}; it can give no token a "
            "later expiry (or none): make longer-lived tokens with a token that lives as long, "
            "or with `bcast token create`",
            "beyond_own_expiry",
        )
    return value


@router.get("")
def list_tokens(
    session: SessionDep, workspace: CurrentWorkspace, credentials: CurrentToken
) -> list[TokenOut]:
    """The workspace's tokens, oldest first, revoked and expired ones included."""
    current = _current(session, credentials)
    return [_out(i, current) for i in workspace_tokens(session, workspace)]


@router.post("", status_code=status.HTTP_201_CREATED)
def create(
    body: TokenIn, session: SessionDep, workspace: CurrentWorkspace, credentials: CurrentToken
) -> NewTokenOut:
    """Make a token for this workspace; the answer is the only place it is ever shown. A
    token that expires makes only tokens that expire no later than itself.
    """
    made = new_token(
        session, workspace, body.name, expires_at=_expiry(session, credentials, body.expires_at)
    )
    session.commit()
    log.info(
        "token %s made",
        made.token_id,
        extra={"event": "token_created", "token_id": made.token_id, "workspace_id": workspace},
    )
    out = _out(token_info(session, made.token_id), None)
    return NewTokenOut(**out.model_dump(), token=made.token)


@router.patch("/{token_id}")
def change(
    token_id: PathId,
    body: TokenPatch,
    session: SessionDep,
    workspace: CurrentWorkspace,
    credentials: CurrentToken,
) -> TokenOut:
    """Rename a token, or change its expiry (null: until revoked; never later than the
    expiry of the token making the request). A revoked or expired token is not revived.
    """
    given = body.model_fields_set
    if not given:
        raise ValidationFailed.one("body", "changes nothing: give name or expires_at", "empty")
    if "name" in given and body.name is None:
        raise ValidationFailed.one("name", "may not be null", "null")
    row = workspace_token(session, workspace, token_id)
    if row.revoked_at is not None:
        raise StateConflict(f"token {token_id} is revoked; make a new one")
    if row.expires_at is not None and row.expires_at <= datetime.now(UTC):
        raise StateConflict(f"token {token_id} has expired; make a new one")
    if body.name is not None:
        row.name = body.name
    if "expires_at" in given:
        row.expires_at = _expiry(session, credentials, body.expires_at)
    session.commit()
    return _out(token_info(session, token_id), _current(session, credentials))


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke(token_id: PathId, session: SessionDep, workspace: CurrentWorkspace) -> Response:
    """Revoke a token (this one too, if asked): refused from the next request on, and its
    console sessions end. Revoking a revoked token changes nothing.
    """
    row = workspace_token(session, workspace, token_id)
    if row.revoked_at is None:
        row.revoked_at = func.now()
        session.commit()
        log.info(
            "token %s revoked",
            token_id,
            extra={"event": "token_revoked", "token_id": token_id, "workspace_id": workspace},
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)

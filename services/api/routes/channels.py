"""Channels, their accounts, and tags."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status
from sqlalchemy import select

from services.api.deps import (
    CurrentWorkspace,
    PathId,
    QueryId,
    SecretsBoxDep,
    SessionDep,
    StrictQueryRoute,
)
from services.api.pagination import Cursor, Limit, newest_first
from services.api.schemas import (
    AccountCreate,
    AccountOut,
    ChannelCreate,
    ChannelOut,
    ChannelPatch,
    NamePatch,
    Page,
    TagCreate,
    TagOut,
    TagPatch,
)
from shared.db.models import Account, Channel, Tag
from shared.db.sql import owned
from shared.domain.broadcasts import AutoPause, get_channel
from shared.domain.channels import (
    DEFAULT_RATE_LIMIT_PER_SECOND,
    changed_config,
    redact_config,
    seal_config,
    validate_config,
)
from shared.domain.contacts import create_tag, rename_tag
from shared.domain.errors import NotFound, StateConflict, ValidationFailed
from shared.domain.lifecycle import ChannelKind
from shared.domain.removal import delete_account, delete_channel, delete_tag

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["channels"], route_class=StrictQueryRoute)


def channel_out(channel: Channel) -> ChannelOut:
    kind = ChannelKind(channel.kind)
    return ChannelOut(
        id=channel.id,
        name=channel.name,
        kind=kind,
        config=redact_config(kind, channel.config),
        rate_limit_per_second=channel.rate_limit_per_second,
        auto_pause=AutoPause.model_validate(channel.auto_pause) if channel.auto_pause else None,
        created_at=channel.created_at,
    )


@router.post("/channels", status_code=status.HTTP_201_CREATED)
def create_channel(
    body: ChannelCreate, session: SessionDep, workspace: CurrentWorkspace, box: SecretsBoxDep
) -> ChannelOut:
    """Add a channel. Its config is checked against the kind; secrets are stored encrypted and
    never shown back.
    """
    config = seal_config(body.kind, validate_config(body.kind, body.config), box)
    _name_free(session, workspace, body.name)
    channel = Channel(
        workspace_id=workspace,
        name=body.name,
        kind=body.kind.value,
        config=config,
        rate_limit_per_second=body.rate_limit_per_second
        or DEFAULT_RATE_LIMIT_PER_SECOND[body.kind],
        auto_pause=body.auto_pause.model_dump() if body.auto_pause else None,
    )
    session.add(channel)
    session.commit()
    return channel_out(channel)


@router.get("/channels")
def list_channels(
    session: SessionDep, workspace: CurrentWorkspace, limit: Limit = 100, cursor: Cursor = None
) -> Page[ChannelOut]:
    query = select(Channel).where(Channel.workspace_id == workspace)
    rows, next_cursor = newest_first(session, query, Channel.id, limit, cursor)
    return Page(items=[channel_out(c) for c in rows], next_cursor=next_cursor)


@router.get("/channels/{channel_id}")
def read_channel(
    channel_id: PathId, session: SessionDep, workspace: CurrentWorkspace
) -> ChannelOut:
    return channel_out(owned(session, Channel, channel_id, workspace, "channel"))


@router.patch("/channels/{channel_id}")
def patch_channel(
    channel_id: PathId,
    body: ChannelPatch,
    session: SessionDep,
    workspace: CurrentWorkspace,
    box: SecretsBoxDep,
) -> ChannelOut:
    """Rename a channel, change config keys (rotate a token or secret, fix a URL) or its rate
    limit; allowed while it sends: the next batch of each broadcast uses the new values.
    """
    given = body.model_fields_set
    if not given:
        raise ValidationFailed.one(
            "body",
            "changes nothing: give name, config, rate_limit_per_second or auto_pause",
            "empty",
        )
    for field in given - {"auto_pause"}:
        if getattr(body, field) is None:
            raise ValidationFailed.one(field, "may not be null", "null")
    channel = session.execute(
        select(Channel)
        .where(Channel.id == channel_id, Channel.workspace_id == workspace)
        .with_for_update()
    ).scalar_one_or_none()
    if channel is None:
        raise NotFound("channel", channel_id)
    if body.name is not None and body.name != channel.name:
        _name_free(session, workspace, body.name, channel_id)
        channel.name = body.name
    if body.config is not None:
        channel.config = changed_config(ChannelKind(channel.kind), channel.config, body.config, box)
    if body.rate_limit_per_second is not None:
        channel.rate_limit_per_second = body.rate_limit_per_second
    if "auto_pause" in given:
        channel.auto_pause = body.auto_pause.model_dump() if body.auto_pause else None
    session.commit()
    log.info(
        "channel %s changed (%s)",
        channel_id,
        ", ".join(sorted(given)),
        extra={"event": "channel_changed", "channel_id": channel_id, "workspace_id": workspace},
    )
    return channel_out(channel)


def _name_free(session: SessionDep, workspace: int, name: str, channel_id: int = 0) -> None:
    taken = session.execute(
        select(Channel.id).where(
            Channel.workspace_id == workspace, Channel.name == name, Channel.id != channel_id
        )
    ).scalar_one_or_none()
    if taken is not None:
        raise StateConflict(f"a channel named {name!r} already exists (id {taken})")


@router.delete(
    "/channels/{channel_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={409: {"description": "A broadcast not yet final uses it."}},
)
def remove_channel(
    channel_id: PathId, session: SessionDep, workspace: CurrentWorkspace
) -> Response:
    """Delete a channel with its accounts, their contacts (erased from delivery history) and
    its completed or canceled broadcasts. Refused (409, naming them) while a broadcast on it
    is pending, in progress or paused.
    """
    delete_channel(session, workspace, channel_id)
    session.commit()
    _deleted("channel", channel_id, workspace, channel_id=channel_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _deleted(kind: str, row_id: int, workspace: int, **ids: int) -> None:
    """The log line of a delete that committed."""
    log.info(
        "%s %s deleted",
        kind,
        row_id,
        extra={"event": f"{kind}_deleted", "workspace_id": workspace, **ids},
    )


@router.post("/accounts", status_code=status.HTTP_201_CREATED, tags=["accounts"])
def create_account(
    body: AccountCreate, session: SessionDep, workspace: CurrentWorkspace
) -> AccountOut:
    """Add a sending identity (a WhatsApp number, a Telegram bot, a mailbox) to a channel."""
    get_channel(session, workspace, body.channel_id)
    taken = session.execute(
        select(Account.id).where(Account.channel_id == body.channel_id, Account.name == body.name)
    ).scalar_one_or_none()
    if taken is not None:
        raise StateConflict(
            f"channel {body.channel_id} already has an account named {body.name!r} (id {taken})"
        )
    account = Account(workspace_id=workspace, channel_id=body.channel_id, name=body.name)
    session.add(account)
    session.commit()
    return AccountOut.model_validate(account)


@router.get("/accounts", tags=["accounts"])
def list_accounts(
    session: SessionDep,
    workspace: CurrentWorkspace,
    channel_id: QueryId = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page[AccountOut]:
    query = select(Account).where(Account.workspace_id == workspace)
    if channel_id is not None:
        query = query.where(Account.channel_id == channel_id)
    rows, next_cursor = newest_first(session, query, Account.id, limit, cursor)
    return Page(items=[AccountOut.model_validate(a) for a in rows], next_cursor=next_cursor)


@router.get("/accounts/{account_id}", tags=["accounts"])
def read_account(
    account_id: PathId, session: SessionDep, workspace: CurrentWorkspace
) -> AccountOut:
    return AccountOut.model_validate(owned(session, Account, account_id, workspace, "account"))


@router.patch("/accounts/{account_id}", tags=["accounts"])
def patch_account(
    account_id: PathId, body: NamePatch, session: SessionDep, workspace: CurrentWorkspace
) -> AccountOut:
    """Rename an account (unique within its channel)."""
    account = owned(session, Account, account_id, workspace, "account")
    taken = session.execute(
        select(Account.id).where(
            Account.channel_id == account.channel_id,
            Account.name == body.name,
            Account.id != account_id,
        )
    ).scalar_one_or_none()
    if taken is not None:
        raise StateConflict(
            f"channel {account.channel_id} already has an account named {body.name!r} (id {taken})"
        )
    account.name = body.name
    session.commit()
    return AccountOut.model_validate(account)


@router.delete(
    "/accounts/{account_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["accounts"],
    responses={409: {"description": "A broadcast not yet final may reach its contacts."}},
)
def remove_account(
    account_id: PathId, session: SessionDep, workspace: CurrentWorkspace
) -> Response:
    """Delete an account and its contacts (erased from delivery history: their rows keep
    their outcome, the address becomes "(erased)"). Refused (409, naming them) while a
    broadcast on its channel that is not yet final names it, or names no account.
    """
    account = delete_account(session, workspace, account_id)
    session.commit()
    _deleted("account", account_id, workspace, channel_id=account.channel_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/tags", status_code=status.HTTP_201_CREATED, tags=["tags"])
def post_tag(body: TagCreate, session: SessionDep, workspace: CurrentWorkspace) -> TagOut:
    tag = create_tag(session, workspace, body.name)
    session.commit()
    return TagOut.model_validate(tag)


@router.get("/tags", tags=["tags"])
def list_tags(
    session: SessionDep, workspace: CurrentWorkspace, limit: Limit = 500, cursor: Cursor = None
) -> Page[TagOut]:
    query = select(Tag).where(Tag.workspace_id == workspace)
    rows, next_cursor = newest_first(session, query, Tag.id, limit, cursor)
    return Page(items=[TagOut.model_validate(t) for t in rows], next_cursor=next_cursor)


@router.get("/tags/{tag_id}", tags=["tags"])
def read_tag(tag_id: PathId, session: SessionDep, workspace: CurrentWorkspace) -> TagOut:
    return TagOut.model_validate(owned(session, Tag, tag_id, workspace, "tag"))


@router.patch("/tags/{tag_id}", tags=["tags"])
def patch_tag(
    tag_id: PathId, body: TagPatch, session: SessionDep, workspace: CurrentWorkspace
) -> TagOut:
    """Rename a tag; its contacts and the audiences that pick it keep it."""
    tag = rename_tag(session, workspace, tag_id, body.name)
    session.commit()
    return TagOut.model_validate(tag)


@router.delete(
    "/tags/{tag_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["tags"],
    responses={409: {"description": "A broadcast not yet final picks its audience by it."}},
)
def remove_tag(tag_id: PathId, session: SessionDep, workspace: CurrentWorkspace) -> Response:
    """Delete a tag (from every contact). Refused (409, naming them) while a broadcast not yet
    final picks its audience by it.
    """
    delete_tag(session, workspace, tag_id)
    session.commit()
    _deleted("tag", tag_id, workspace)
    return Response(status_code=status.HTTP_204_NO_CONTENT)

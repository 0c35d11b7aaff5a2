"""Channels, their accounts, and tags."""

from __future__ import annotations

from fastapi import APIRouter, status
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
    Page,
    TagCreate,
    TagOut,
)
from shared.db.models import Account, Channel, Tag
from shared.db.sql import owned
from shared.domain.broadcasts import get_channel
from shared.domain.channels import (
    DEFAULT_RATE_LIMIT_PER_SECOND,
    redact_config,
    seal_config,
    validate_config,
)
from shared.domain.contacts import create_tag
from shared.domain.errors import StateConflict
from shared.domain.lifecycle import ChannelKind

router = APIRouter(prefix="/v1", tags=["channels"], route_class=StrictQueryRoute)


def channel_out(channel: Channel) -> ChannelOut:
    kind = ChannelKind(channel.kind)
    return ChannelOut(
        id=channel.id,
        name=channel.name,
        kind=kind,
        config=redact_config(kind, channel.config),
        rate_limit_per_second=channel.rate_limit_per_second,
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
    taken = session.execute(
        select(Channel.id).where(Channel.workspace_id == workspace, Channel.name == body.name)
    ).scalar_one_or_none()
    if taken is not None:
        raise StateConflict(f"a channel named {body.name!r} already exists (id {taken})")
    channel = Channel(
        workspace_id=workspace,
        name=body.name,
        kind=body.kind.value,
        config=config,
        rate_limit_per_second=body.rate_limit_per_second
        or DEFAULT_RATE_LIMIT_PER_SECOND[body.kind],
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

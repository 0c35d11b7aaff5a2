"""Conversations and their timed sends (broadcasts with origin ``conversation``)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from sqlalchemy import select

from services.api.deps import CurrentWorkspace, PathId, SessionDep, StrictQueryRoute
from services.api.pagination import Cursor, Limit, newest_first
from services.api.routes.broadcasts import IdempotencyKey, answer_created, list_item
from services.api.schemas import (
    BroadcastListItem,
    BroadcastOut,
    ConversationCreate,
    ConversationOut,
    Page,
    TimedSendCreate,
)
from shared.db.models import Account, Broadcast, Contact, Conversation
from shared.db.sql import owned
from shared.domain.broadcasts import (
    ListFilter,
    broadcasts_query,
    conversation_broadcast,
    create_broadcast,
    request_hash,
    retries_of,
)
from shared.domain.errors import FieldError, ValidationFailed
from shared.domain.lifecycle import Origin

router = APIRouter(prefix="/v1/conversations", tags=["conversations"], route_class=StrictQueryRoute)


@router.post(
    "", status_code=status.HTTP_201_CREATED, responses={200: {"description": "It already existed."}}
)
def post_conversation(
    body: ConversationCreate, response: Response, session: SessionDep, workspace: CurrentWorkspace
) -> ConversationOut:
    """Open the conversation between an account and one of its contacts (or get the open one)."""
    account = session.get(Account, body.account_id)
    contact = session.get(Contact, body.contact_id)
    errors = []
    if account is None or account.workspace_id != workspace:
        errors.append(FieldError("account_id", f"account {body.account_id} not found", "not_found"))
    if contact is None or contact.workspace_id != workspace:
        errors.append(FieldError("contact_id", f"contact {body.contact_id} not found", "not_found"))
    elif contact.account_id != body.account_id:
        errors.append(
            FieldError(
                "contact_id",
                f"contact {body.contact_id} belongs to account {contact.account_id}, not {body.account_id}",
                "wrong_account",
            )
        )
    if errors:
        raise ValidationFailed(errors)
    existing = session.execute(
        select(Conversation).where(
            Conversation.account_id == body.account_id, Conversation.contact_id == body.contact_id
        )
    ).scalar_one_or_none()
    if existing is not None:
        response.status_code = status.HTTP_200_OK
        return ConversationOut.model_validate(existing)
    conversation = Conversation(
        workspace_id=workspace, account_id=body.account_id, contact_id=body.contact_id
    )
    session.add(conversation)
    session.commit()
    return ConversationOut.model_validate(conversation)


@router.get("")
def list_conversations(
    session: SessionDep, workspace: CurrentWorkspace, limit: Limit = 100, cursor: Cursor = None
) -> Page[ConversationOut]:
    query = select(Conversation).where(Conversation.workspace_id == workspace)
    rows, next_cursor = newest_first(session, query, Conversation.id, limit, cursor)
    return Page(items=[ConversationOut.model_validate(c) for c in rows], next_cursor=next_cursor)


@router.get("/{conversation_id}")
def read_conversation(
    conversation_id: PathId, session: SessionDep, workspace: CurrentWorkspace
) -> ConversationOut:
    conversation = owned(session, Conversation, conversation_id, workspace, "conversation")
    return ConversationOut.model_validate(conversation)


@router.post(
    "/{conversation_id}/timed-sends",
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {
            "description": "Created; or, for a repeated Idempotency-Key with the same body, the "
            "same broadcast again with the header Idempotent-Replayed: true."
        }
    },
)
def post_timed_send(
    conversation_id: PathId,
    body: TimedSendCreate,
    response: Response,
    session: SessionDep,
    workspace: CurrentWorkspace,
    idempotency_key: IdempotencyKey = None,
) -> BroadcastOut:
    """Schedule a message to this conversation's contact. It is a broadcast with origin
    ``conversation`` and one recipient, listed, paused and canceled like any other.
    """
    new = conversation_broadcast(
        session, workspace, conversation_id, body.content, body.send_at, name=body.name
    )
    payload = {"conversation_id": conversation_id, **body.model_dump(mode="json")}
    broadcast, created = create_broadcast(
        session,
        workspace,
        new,
        idempotency_key=idempotency_key,
        body_hash=request_hash(payload) if idempotency_key else None,
    )
    return answer_created(session, response, broadcast, created)


@router.get("/{conversation_id}/timed-sends")
def list_timed_sends(
    conversation_id: PathId,
    session: SessionDep,
    workspace: CurrentWorkspace,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[BroadcastListItem]:
    read_conversation(conversation_id, session, workspace)
    query = broadcasts_query(workspace, ListFilter(origin=Origin.CONVERSATION)).where(
        Broadcast.conversation_id == conversation_id
    )
    rows, next_cursor = newest_first(session, query, Broadcast.id, limit, cursor)
    retries = retries_of(session, workspace, [b.id for b in rows])
    return Page(items=[list_item(b, retries[b.id]) for b in rows], next_cursor=next_cursor)

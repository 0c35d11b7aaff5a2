"""Contacts (one by one, or imported in bulk) and the audience preview."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from fastapi import APIRouter, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from services.api.deps import (
    CurrentWorkspace,
    PathId,
    QueryId,
    SessionDep,
    SettingsDep,
    StrictQueryRoute,
)
from services.api.pagination import Cursor, Limit, newest_first
from services.api.schemas import (
    AudiencePreviewIn,
    AudiencePreviewOut,
    ContactOut,
    ContactPatch,
    ErasureOut,
    ImportOut,
    InboundIn,
    Page,
    PreviewContact,
    ReasonCount,
)
from shared.db.models import Contact
from shared.domain import templates
from shared.domain.audience import AudienceSpec, audience_query, breakdown, check_audience
from shared.domain.broadcasts import decode_cursor, encode_cursor, get_channel
from shared.domain.channels import CONVERSATION_WINDOW
from shared.domain.contacts import (
    CSV_COLUMNS,
    UNSET,
    ContactIn,
    contacts_query,
    create_contact,
    get_contact,
    import_contacts,
    parse_import,
    record_inbound,
    tags_of,
    update_contact,
)
from shared.domain.errors import ValidationFailed
from shared.domain.lifecycle import ChannelKind
from shared.domain.removal import Erased, erase_contact
from shared.domain.templates import Template

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["contacts"], route_class=StrictQueryRoute)


def contacts_out(session: Session, contacts: Sequence[Contact]) -> list[ContactOut]:
    tags = tags_of(session, [c.id for c in contacts])
    return [
        ContactOut(
            id=c.id,
            account_id=c.account_id,
            address=c.address,
            name=c.name,
            tags=tags.get(c.id, []),
            opted_out=c.opted_out_at is not None,
            unreachable=c.unreachable_at is not None,
            unreachable_reason=c.unreachable_reason,
            time_zone=c.time_zone,
            fields=c.fields or {},
            last_inbound_at=c.last_inbound_at,
            created_at=c.created_at,
        )
        for c in contacts
    ]


@router.post("/contacts", status_code=status.HTTP_201_CREATED)
def post_contact(body: ContactIn, session: SessionDep, workspace: CurrentWorkspace) -> ContactOut:
    """Add a contact to an account; tags are given by name and created when new."""
    contact = create_contact(session, workspace, body)
    session.commit()
    return contacts_out(session, [contact])[0]


@router.get("/contacts")
def list_contacts(
    session: SessionDep,
    workspace: CurrentWorkspace,
    account_id: QueryId = None,
    tag_id: QueryId = None,
    opted_out: bool | None = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page[ContactOut]:
    query = contacts_query(workspace, account_id=account_id, tag_id=tag_id, opted_out=opted_out)
    rows, next_cursor = newest_first(session, query, Contact.id, limit, cursor)
    return Page(items=contacts_out(session, rows), next_cursor=next_cursor)


@router.get("/contacts/{contact_id}")
def read_contact(
    contact_id: PathId, session: SessionDep, workspace: CurrentWorkspace
) -> ContactOut:
    return contacts_out(session, [get_contact(session, workspace, contact_id)])[0]


@router.patch("/contacts/{contact_id}")
def patch_contact(
    contact_id: PathId, body: ContactPatch, session: SessionDep, workspace: CurrentWorkspace
) -> ContactOut:
    """Rename, retag, or opt a contact out (or back in)."""
    contact = update_contact(
        session,
        workspace,
        contact_id,
        name=body.name,
        tags=body.tags,
        opted_out=body.opted_out,
        clear_unreachable=body.unreachable is False,
        time_zone=body.time_zone if "time_zone" in body.model_fields_set else UNSET,
        fields=body.fields,
        last_inbound_at=body.last_inbound_at,
    )
    session.commit()
    return contacts_out(session, [contact])[0]


@router.delete(
    "/contacts/{contact_id}", responses={409: {"description": "A send to it is under way."}}
)
def erase(contact_id: PathId, session: SessionDep, workspace: CurrentWorkspace) -> ErasureOut:
    """Delete a contact and erase it from delivery history (a data-protection request). Its
    rows in every broadcast stay, so counts stay true, but the address in them (and in their
    reasons) becomes "(erased)" and no name is shown for them. Its queued rows in broadcasts
    being sent are skipped ("skipped: contact erased"); a send to it under way this moment
    answers 409 (ask again in a few seconds). Broadcasts not yet started that hand-picked or
    excluded it lose it from their lists.
    """
    erased = erase_contact(session, workspace, contact_id)
    session.commit()
    contact_erased(erased, workspace)
    return ErasureOut(
        contact_id=contact_id,
        erased_deliveries=erased.rows,
        unlisted_from=erased.unlisted,
    )


@router.post("/contacts/{contact_id}/inbound")
def inbound(
    contact_id: PathId,
    session: SessionDep,
    workspace: CurrentWorkspace,
    body: InboundIn | None = None,
) -> ContactOut:
    """The contact wrote in (now, or at ``at``): its provider's conversation window (24 hours
    on WhatsApp) runs from its latest message. An earlier time than the one known changes
    nothing.
    """
    contact = record_inbound(session, workspace, contact_id, (body or InboundIn()).at)
    session.commit()
    return contacts_out(session, [contact])[0]


def contact_erased(erased: Erased, workspace: int) -> None:
    """The log line of an erasure that committed (the API's and the console's)."""
    log.info(
        "contact %s erased: %s delivery rows kept without its address",
        erased.contact_id,
        erased.rows,
        extra={
            "event": "contact_erased",
            "contact_id": erased.contact_id,
            "channel_id": erased.channel_id,
            "workspace_id": workspace,
            "rows": erased.rows,
        },
    )


_IMPORT_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "array", "items": {"$ref": "#/components/schemas/ContactIn"}}
            },
            "text/csv": {
                "schema": {"type": "string"},
                "example": ",".join(CSV_COLUMNS) + "\n1,+4915112345678,Ann,vip;berlin,false\n",
            },
        },
    }
}


@router.post("/contacts/import", openapi_extra=_IMPORT_DOC)
async def import_contacts_route(
    request: Request, session: SessionDep, workspace: CurrentWorkspace, settings: SettingsDep
) -> ImportOut:
    """Import up to 100,000 contacts as a JSON array or CSV (header line first; ``tags``
    separated by ``;``). All rows are written or none: any bad row fails the whole import,
    and the answer lists the bad rows. Known contacts (same account and address) are updated.
    """
    body = await request.body()
    content_type = request.headers.get("content-type", "")

    def write() -> ImportOut:
        rows = parse_import(body, content_type, max_rows=settings.import_max_rows)
        result = import_contacts(session, workspace, rows)
        session.commit()
        return ImportOut(received=result.received, created=result.created, updated=result.updated)

    return await run_in_threadpool(write)


@router.post("/audiences/preview", tags=["audiences"])
def preview_audience(
    body: AudiencePreviewIn, session: SessionDep, workspace: CurrentWorkspace
) -> AudiencePreviewOut:
    """Who an audience reaches on a channel right now: the exact count, how many it matches
    who opted out or are unreachable (and why), and a page of the people it would be sent to.
    Takes the whole audience of a broadcast (filter, selection, contact_ids,
    exclude_contact_ids, failed_in); an audience that reaches nobody answers count 0.
    """
    channel = get_channel(session, workspace, body.channel_id)
    spec = AudienceSpec.model_validate(body.model_dump(include=set(AudienceSpec.model_fields)))
    try:
        check_audience(session, workspace, body.channel_id, spec)
    except ValidationFailed as exc:
        if any(e.type != "empty_audience" for e in exc.errors):
            raise
    template = templates.parse(body.text, field="text") if body.text else None
    return audience_page(
        session,
        workspace,
        body.channel_id,
        spec,
        limit=body.limit,
        cursor=body.cursor,
        text=body.text,
        template=template,
        window=CONVERSATION_WINDOW.get(ChannelKind(channel.kind)),
    )


def audience_page(
    session: Session,
    workspace: int,
    channel_id: int,
    spec: AudienceSpec,
    *,
    limit: int,
    cursor: str | None,
    text: str | None = None,
    template: Template | None = None,
    window: timedelta | None = None,
) -> AudiencePreviewOut:
    """The preview of ``spec`` on a channel: its breakdown and a page of who gets it, each
    with ``text`` as they would get it (rendered from ``template`` when personalised).
    """
    found = breakdown(session, workspace, channel_id, spec, window=window)
    query = audience_query(workspace, channel_id, spec).with_only_columns(Contact)
    if cursor is not None:
        query = query.where(Contact.id > decode_cursor(cursor))
    contacts = session.execute(query.order_by(Contact.id).limit(limit + 1)).scalars().all()
    more = len(contacts) > limit
    contacts = contacts[:limit]
    return AudiencePreviewOut(
        count=found.sendable,
        opted_out=found.opted_out,
        unreachable=found.unreachable,
        total=found.everyone,
        inside_window=found.inside_window,
        unreachable_reasons=[ReasonCount(reason=r, contacts=n) for r, n in found.reasons],
        contacts=[
            PreviewContact(
                **c.model_dump(),
                text=template.render(c.address, {"name": c.name, "fields": c.fields})
                if template is not None
                else text,
            )
            for c in contacts_out(session, contacts)
        ],
        next_cursor=encode_cursor(contacts[-1].id) if more else None,
    )

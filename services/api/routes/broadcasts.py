"""Broadcast tasks: create, list, read, modify, pause, resume, cancel, and who was reached."""

from __future__ import annotations

import csv
import io
import logging
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Annotated, TypeVar

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator
from sqlalchemy.orm import Session, object_session

from services.api.deps import (
    CurrentWorkspace,
    PathId,
    QueryId,
    SessionDep,
    SettingsDep,
    StrictQueryRoute,
)
from services.api.pagination import Cursor, Limit, cursor_id, fetch_page, newest_first
from services.api.routes.contacts import audience_page
from services.api.schemas import (
    AudiencePreviewOut,
    AudienceSummary,
    BroadcastCreate,
    BroadcastListItem,
    BroadcastOut,
    BroadcastPatch,
    CloneIn,
    Counts,
    Page,
    RecipientOut,
    RecipientPage,
    ResumeIn,
    RetryFailedIn,
    TestSendIn,
    WindowOut,
)
from shared.db.engine import get_sessionmaker
from shared.db.models import Broadcast, Channel, Delivery
from shared.domain import templates
from shared.domain.audience import AudienceSpec, describe
from shared.domain.broadcasts import (
    Changes,
    Content,
    ListFilter,
    NewBroadcast,
    audience_fixed,
    auto_pause_of,
    broadcasts_query,
    by_idempotency_key,
    cancel_broadcast,
    counts,
    create_broadcast,
    create_retry,
    get_broadcast,
    inside_window,
    modify_broadcast,
    new_test_send,
    pause_broadcast,
    recipients_query,
    recipients_removed,
    request_hash,
    resume_broadcast,
    retries_of,
    sending_window,
    waiting,
)
from shared.domain.channels import CONVERSATION_WINDOW
from shared.domain.errors import StateConflict, ValidationFailed
from shared.domain.lifecycle import (
    FINAL_BROADCAST_STATUSES,
    BroadcastStatus,
    ChannelKind,
    DeliveryStatus,
    Origin,
)
from shared.domain.removal import delete_broadcast
from shared.domain.types import IsoDatetime
from shared.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/broadcasts", tags=["broadcasts"], route_class=StrictQueryRoute)

_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?")


def _idempotency_key(value: str | None) -> str | None:
    if value is not None and not _KEY.fullmatch(value):
        raise ValueError(
            "must be 1 to 255 printable ASCII characters, not starting or ending with a space "
            "(a UUID makes a good key); an empty key is refused, not ignored"
        )
    return value


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Repeat a create safely: the same key with the same body returns the same "
        "broadcast. 1 to 255 printable ASCII characters.",
    ),
    AfterValidator(_idempotency_key),
]
BroadcastStatusFilter = Annotated[
    list[str] | None,
    Query(
        alias="status",
        description="pending, in_progress, paused, canceled, completed; repeat or comma-separate.",
    ),
]
DeliveryStatusFilter = Annotated[
    list[str] | None,
    Query(
        alias="status",
        description="queued, sending, sent, failed, canceled, skipped, partial; repeat or comma-separate.",
    ),
]
E = TypeVar("E", BroadcastStatus, DeliveryStatus)


def _with_offset(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError(
            "needs its UTC offset (Z or +01:00, written %2B01:00 in a URL): a time without "
            "one names no single moment"
        )
    return value


#: A moment in a query filter: ISO-8601 with its offset.
QueryTime = Annotated[IsoDatetime | None, AfterValidator(_with_offset)]


def broadcast_out(broadcast: Broadcast, retries: list[int] | None = None) -> BroadcastOut:
    """The answer for a broadcast; ``retries`` (its retries' ids) are read when not given."""
    if retries is None:
        session = object_session(broadcast)
        retries = (
            retries_of(session, broadcast.workspace_id, [broadcast.id])[broadcast.id]
            if session
            else []
        )
    return BroadcastOut(
        id=broadcast.id,
        name=broadcast.name,
        channel_id=broadcast.channel_id,
        origin=Origin(broadcast.origin),
        conversation_id=broadcast.conversation_id,
        retry_of=broadcast.retry_of_id,
        retries=retries,
        test_of=broadcast.test_of_id,
        audience=AudienceSpec.model_validate(broadcast.audience),
        content=Content.model_validate(broadcast.content),
        send_at=broadcast.send_at,
        send_at_local=broadcast.send_at_local,
        send_at_zone=broadcast.send_at_zone,
        sending_window=_window_out(broadcast),
        auto_pause=auto_pause_of(broadcast),
        auto_paused_at=broadcast.auto_paused_at,
        status=BroadcastStatus(broadcast.status),
        status_reason=broadcast.status_reason,
        audience_size=broadcast.audience_size,
        counts=Counts(**counts(broadcast)),
        created_at=broadcast.created_at,
        updated_at=broadcast.updated_at,
        started_at=broadcast.started_at,
        finished_at=broadcast.finished_at,
        recipients_removed_at=broadcast.recipients_removed_at,
    )


def _window_out(broadcast: Broadcast, *, waiting_now: bool = False) -> WindowOut | None:
    if broadcast.window_start is None or broadcast.window_end is None:
        return None
    out = WindowOut(
        start=broadcast.window_start.strftime("%H:%M"),
        end=broadcast.window_end.strftime("%H:%M"),
        zone=broadcast.window_zone or "UTC",
    )
    session = object_session(broadcast)
    if waiting_now and session is not None:
        found = waiting(session, broadcast)
        if found is not None:
            out.waiting, out.until = found.recipients, found.until
    return out


def list_item(broadcast: Broadcast, retries: list[int]) -> BroadcastListItem:
    """A broadcast as a list shows it: its audience summed up, not every id it lists."""
    out = broadcast_out(broadcast, retries)
    spec = out.audience
    return BroadcastListItem(
        **out.model_dump(exclude={"audience"}),
        audience=AudienceSummary(
            account_ids=spec.account_ids,
            tag_ids=spec.tag_ids,
            tag_match=spec.tag_match,
            selection=spec.selection,
            failed_in=spec.failed_in,
            contact_count=len(spec.contact_ids),
            excluded_count=len(spec.exclude_contact_ids),
            description=describe(spec),
        ),
    )


def answer_created(
    session: SessionDep, response: Response, broadcast: Broadcast, created: bool
) -> BroadcastOut:
    """Commit a create. An Idempotency-Key replay gets the first answer again (201, the same
    broadcast), marked ``Idempotent-Replayed: true``.
    """
    session.commit()
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return broadcast_out(broadcast)


def parse_statuses(values: list[str] | None, enum: type[E]) -> list[E]:
    """``["pending,paused", "completed"]`` -> the three statuses; a 422 names any unknown one
    (an empty one too: ``status=`` filters nothing and is refused rather than ignored).
    """
    allowed = [s.value for s in enum]
    out: list[E] = []
    for value in (v.strip() for raw in values or [] for v in raw.split(",")):
        if value not in allowed:
            raise ValidationFailed.one(
                "status", f"{value!r} is not a status; allowed: {', '.join(allowed)}", "enum"
            )
        out.append(enum(value))
    return out


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {
            "description": "Created; or, for a repeated Idempotency-Key with the same body, the "
            "same broadcast again with the header Idempotent-Replayed: true."
        }
    },
)
def post_broadcast(
    body: BroadcastCreate,
    response: Response,
    session: SessionDep,
    workspace: CurrentWorkspace,
    idempotency_key: IdempotencyKey = None,
) -> BroadcastOut:
    """Create a broadcast: one channel, an audience, the content, and a send time (null for
    now, or at least 5 minutes ahead). It starts ``pending``.
    """
    broadcast, created = create_broadcast(
        session,
        workspace,
        NewBroadcast(
            name=body.name,
            channel_id=body.channel_id,
            audience=body.audience,
            content=body.content,
            send_at=body.send_at,
            window=body.sending_window,
            auto_pause=body.auto_pause,
        ),
        idempotency_key=idempotency_key,
        body_hash=request_hash(body.model_dump(mode="json")) if idempotency_key else None,
    )
    out = answer_created(session, response, broadcast, created)
    if created:
        lifecycle(
            "created",
            broadcast,
            workspace,
            f", {broadcast.audience_size} recipients, "
            + (f"due at {broadcast.send_at.isoformat()}" if broadcast.send_at else "now"),
        )
    return out


def lifecycle(event: str, broadcast: Broadcast, workspace: int, detail: str = "") -> None:
    """One log line for an operator's action on a broadcast, after it committed."""
    log.info(
        "broadcast %s %s%s",
        broadcast.id,
        event,
        detail,
        extra={
            "broadcast_id": broadcast.id,
            "workspace_id": workspace,
            "channel_id": broadcast.channel_id,
            "event": event,
            "broadcast_status": broadcast.status,
        },
    )


@router.get("")
def list_broadcasts(
    session: SessionDep,
    workspace: CurrentWorkspace,
    status_: BroadcastStatusFilter = None,
    origin: Origin | None = None,
    channel_id: QueryId = None,
    q: Annotated[
        str | None,
        Query(min_length=1, max_length=200, description="Part of the name, any case."),
    ] = None,
    created_from: Annotated[QueryTime, Query(description="Created at or after.")] = None,
    created_before: Annotated[QueryTime, Query(description="Created before.")] = None,
    send_from: Annotated[QueryTime, Query(description="Due at or after.")] = None,
    send_before: Annotated[QueryTime, Query(description="Due before.")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[BroadcastListItem]:
    """Broadcasts newest first, filtered by status (several at once), origin, channel, part of
    the name, and ranges of creation and send time (ISO-8601 with offset; ``*_from``
    included, ``*_before`` not). A query parameter the list does not take is refused (422).
    """
    query = broadcasts_query(
        workspace,
        ListFilter(
            statuses=parse_statuses(status_, BroadcastStatus),
            origin=origin,
            channel_id=channel_id,
            name=q,
            created_from=created_from,
            created_before=created_before,
            send_from=send_from,
            send_before=send_before,
        ),
    )
    rows, next_cursor = newest_first(session, query, Broadcast.id, limit, cursor)
    retries = retries_of(session, workspace, [b.id for b in rows])
    return Page(items=[list_item(b, retries[b.id]) for b in rows], next_cursor=next_cursor)


@router.get("/{broadcast_id}")
def read_broadcast(
    broadcast_id: PathId, session: SessionDep, workspace: CurrentWorkspace
) -> BroadcastOut:
    """A broadcast with its counts: total, queued, sent, failed, canceled, skipped, partial;
    with a sending window, how many recipients wait for it and until when.
    """
    broadcast = get_broadcast(session, workspace, broadcast_id)
    out = broadcast_out(broadcast)
    out.sending_window = _window_out(broadcast, waiting_now=True)
    channel = session.get(Channel, broadcast.channel_id)
    window = CONVERSATION_WINDOW.get(ChannelKind(channel.kind)) if channel else None
    if window is not None and broadcast.status not in FINAL_BROADCAST_STATUSES:
        out.inside_window = inside_window(session, broadcast, window)
    return out


@router.get(
    "/{broadcast_id}/audience",
    responses={409: {"description": "Its audience was copied when it started."}},
)
def broadcast_audience(
    broadcast_id: PathId,
    session: SessionDep,
    workspace: CurrentWorkspace,
    limit: Annotated[int, Query(ge=1, le=500, description="Contacts on this page.")] = 50,
    cursor: Cursor = None,
) -> AudiencePreviewOut:
    """Who a broadcast not yet started would reach if it started now, each with its text as
    they would get it: as ``POST /v1/audiences/preview`` answers for its channel, audience and
    text. Once it has started its audience is fixed: read its recipients instead.
    """
    broadcast = get_broadcast(session, workspace, broadcast_id)
    if audience_fixed(broadcast):
        when = f" ({broadcast.snapshot_at.isoformat()})" if broadcast.snapshot_at else ""
        raise StateConflict(
            f"broadcast {broadcast_id} copied its audience when it started{when}; its "
            f"recipients are at /v1/broadcasts/{broadcast_id}/recipients"
        )
    text = Content.model_validate(broadcast.content).text
    return audience_page(
        session,
        workspace,
        broadcast.channel_id,
        AudienceSpec.model_validate(broadcast.audience),
        limit=limit,
        cursor=cursor,
        text=text,
        template=templates.stored(text),
    )


@router.post(
    "/{broadcast_id}/retry-failed",
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {"description": "Created (or replayed, as for POST /v1/broadcasts)."},
        409: {"description": "The broadcast has no failed recipients, or they are not kept."},
    },
)
def retry_failed(
    broadcast_id: PathId,
    response: Response,
    session: SessionDep,
    workspace: CurrentWorkspace,
    body: RetryFailedIn | None = None,
    idempotency_key: IdempotencyKey = None,
) -> BroadcastOut:
    """A new pending broadcast to exactly the recipients that failed in this one (not the
    skipped ones, nor any opted out or found unreachable since), with its channel and content,
    linked both ways (``retry_of`` and ``retries``). Any number of recipients.
    """
    given = body or RetryFailedIn()
    body_hash = _hash(f"retry-failed/{broadcast_id}", given) if idempotency_key else None
    replayed = _replayed(session, response, workspace, idempotency_key, body_hash)
    if replayed is not None:
        return replayed
    broadcast, created = create_retry(
        session,
        workspace,
        broadcast_id,
        name=given.name,
        send_at=given.send_at,
        idempotency_key=idempotency_key,
        body_hash=body_hash,
    )
    out = answer_created(session, response, broadcast, created)
    if created:
        retry_created(broadcast, workspace)
    return out


def retry_created(broadcast: Broadcast, workspace: int) -> None:
    """The lifecycle line of a retry just made (the API's and the console's)."""
    lifecycle(
        "created",
        broadcast,
        workspace,
        f" to retry the {broadcast.audience_size} failed recipients of broadcast "
        f"{broadcast.retry_of_id}",
    )


@router.post(
    "/{broadcast_id}/clone",
    status_code=status.HTTP_201_CREATED,
    responses={201: {"description": "Created (or replayed, as for POST /v1/broadcasts)."}},
)
def clone(
    broadcast_id: PathId,
    response: Response,
    session: SessionDep,
    workspace: CurrentWorkspace,
    body: CloneIn | None = None,
    idempotency_key: IdempotencyKey = None,
) -> BroadcastOut:
    """A new pending broadcast with this one's channel, audience and content (in any status),
    each replaced by the body's where it gives one. Its audience is worked out anew: who
    matches now, not who was sent to then. ``send_at`` null (the default) sends it at once.
    """
    given = body or CloneIn()
    body_hash = _hash(f"clone/{broadcast_id}", given) if idempotency_key else None
    replayed = _replayed(session, response, workspace, idempotency_key, body_hash)
    if replayed is not None:
        return replayed
    source = get_broadcast(session, workspace, broadcast_id)
    broadcast, created = create_broadcast(
        session,
        workspace,
        NewBroadcast(
            name=given.name or f"{source.name} (copy)",
            channel_id=given.channel_id or source.channel_id,
            audience=given.audience or AudienceSpec.model_validate(source.audience),
            content=given.content or Content.model_validate(source.content),
            send_at=given.send_at,
            window=given.sending_window
            if "sending_window" in given.model_fields_set
            else sending_window(source),
            auto_pause=given.auto_pause
            if "auto_pause" in given.model_fields_set
            else auto_pause_of(source),
        ),
        idempotency_key=idempotency_key,
        body_hash=body_hash,
    )
    out = answer_created(session, response, broadcast, created)
    if created:
        lifecycle("created", broadcast, workspace, f" as a copy of broadcast {broadcast_id}")
    return out


@router.post(
    "/{broadcast_id}/test-send",
    status_code=status.HTTP_201_CREATED,
    responses={201: {"description": "Created (or replayed, as for POST /v1/broadcasts)."}},
)
def post_test_send(
    broadcast_id: PathId,
    body: TestSendIn,
    response: Response,
    session: SessionDep,
    workspace: CurrentWorkspace,
    idempotency_key: IdempotencyKey = None,
) -> BroadcastOut:
    """Send this broadcast's content, rendered as for each recipient, to 1-10 chosen contacts
    of its channel now, in any status, without starting it. The test is a broadcast of its own
    (origin ``test``, ``test_of`` this one): its recipients and their outcomes are read as any
    broadcast's, and this one's counts never include it. Lists leave tests out unless asked
    (``origin=test``, or ``GET /v1/broadcasts/{id}/test-sends``).
    """
    body_hash = _hash(f"test-send/{broadcast_id}", body) if idempotency_key else None
    replayed = _replayed(session, response, workspace, idempotency_key, body_hash)
    if replayed is not None:
        return replayed
    broadcast, created = create_broadcast(
        session,
        workspace,
        new_test_send(session, workspace, broadcast_id, body.contact_ids),
        idempotency_key=idempotency_key,
        body_hash=body_hash,
    )
    out = answer_created(session, response, broadcast, created)
    if created:
        test_created(broadcast, workspace)
    return out


def test_created(broadcast: Broadcast, workspace: int) -> None:
    """The lifecycle line of a test send just made (the API's and the console's)."""
    lifecycle(
        "created",
        broadcast,
        workspace,
        f" to test broadcast {broadcast.test_of_id} on {broadcast.audience_size} contacts",
    )


@router.get("/{broadcast_id}/test-sends")
def list_test_sends(
    broadcast_id: PathId,
    session: SessionDep,
    workspace: CurrentWorkspace,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[BroadcastListItem]:
    """The test sends of a broadcast, newest first; each one's recipients are at
    ``GET /v1/broadcasts/{test id}/recipients``.
    """
    get_broadcast(session, workspace, broadcast_id)
    query = broadcasts_query(workspace, ListFilter(test_of=broadcast_id))
    rows, next_cursor = newest_first(session, query, Broadcast.id, limit, cursor)
    return Page(items=[list_item(b, []) for b in rows], next_cursor=next_cursor)


def _replayed(
    session: SessionDep,
    response: Response,
    workspace: int,
    key: str | None,
    body_hash: str | None,
) -> BroadcastOut | None:
    """The first answer again for a repeated Idempotency-Key, before anything is checked: the
    original may have changed since (retried, its rows removed), the request has not.
    """
    if key is None:
        return None
    earlier = by_idempotency_key(session, workspace, key, body_hash)
    return None if earlier is None else answer_created(session, response, earlier, False)


def _hash(action: str, body: RetryFailedIn | CloneIn | TestSendIn) -> str:
    """The request a key was first used for: the action, its broadcast, and the body."""
    return request_hash({"action": action, **body.model_dump(mode="json")})


@router.patch("/{broadcast_id}")
def patch_broadcast(
    broadcast_id: PathId, body: BroadcastPatch, session: SessionDep, workspace: CurrentWorkspace
) -> BroadcastOut:
    """Change a broadcast before its first send (pending, or paused before it started).
    A new ``send_at`` must again be at least 5 minutes ahead, or null for immediately.
    """
    given = frozenset(body.model_fields_set)
    if not given:
        raise ValidationFailed.one(
            "body",
            "changes nothing: give name, channel_id, audience, content, send_at, sending_window "
            "or auto_pause",
            "empty",
        )
    for field in ("name", "channel_id", "audience", "content"):
        if field in given and getattr(body, field) is None:
            raise ValidationFailed.one(field, "may not be null", "null")
    if "sending_window" in given:
        given = (given - {"sending_window"}) | {"window"}
    broadcast = modify_broadcast(
        session,
        workspace,
        broadcast_id,
        Changes(
            fields=given,
            name=body.name,
            channel_id=body.channel_id,
            audience=body.audience,
            content=body.content,
            send_at=body.send_at,
            window=body.sending_window,
            auto_pause=body.auto_pause,
        ),
    )
    session.commit()
    lifecycle("changed", broadcast, workspace, f" ({', '.join(sorted(given))})")
    return broadcast_out(broadcast)


@router.delete(
    "/{broadcast_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={409: {"description": "It is not final, or a retry or test of it is not."}},
)
def delete(broadcast_id: PathId, session: SessionDep, workspace: CurrentWorkspace) -> Response:
    """Delete a completed or canceled broadcast with its test sends; its recipient rows are
    removed in small steps soon after. Refused (409) while it, or a retry or test of it, is
    pending, in progress or paused.
    """
    broadcast = delete_broadcast(session, workspace, broadcast_id)
    session.commit()
    lifecycle("deleted", broadcast, workspace)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{broadcast_id}/pause")
def pause(broadcast_id: PathId, session: SessionDep, workspace: CurrentWorkspace) -> BroadcastOut:
    """Pause a pending or sending broadcast; no provider call starts after this returns."""
    broadcast = pause_broadcast(session, workspace, broadcast_id)
    session.commit()
    lifecycle("paused", broadcast, workspace)
    return broadcast_out(broadcast)


@router.post("/{broadcast_id}/resume")
def resume(
    broadcast_id: PathId,
    session: SessionDep,
    workspace: CurrentWorkspace,
    body: ResumeIn | None = None,
) -> BroadcastOut:
    """Resume a paused broadcast; it goes on with exactly the recipients not yet sent to.
    One the scheduler paused for being found too late (``status_reason`` begins
    ``overdue:``) needs ``{"confirm_late_start": true}``: it would go out that late (409
    without it).
    """
    confirm = body.confirm_late_start if body else False
    broadcast = resume_broadcast(session, workspace, broadcast_id, confirm_late_start=confirm)
    session.commit()
    lifecycle("resumed", broadcast, workspace)
    return broadcast_out(broadcast)


@router.post("/{broadcast_id}/cancel")
def cancel(broadcast_id: PathId, session: SessionDep, workspace: CurrentWorkspace) -> BroadcastOut:
    """Cancel for good: recipients not yet sent to become canceled; sent ones stay sent."""
    broadcast = cancel_broadcast(session, workspace, broadcast_id)
    session.commit()
    lifecycle("canceled", broadcast, workspace)
    return broadcast_out(broadcast)


CSV_HEADER = (
    "contact_id",
    "name",
    "address",
    "status",
    "attempts",
    "last_error",
    "provider_message_id",
    "sent_at",
)


@router.get(
    "/{broadcast_id}/recipients",
    response_model=RecipientPage,
    responses={
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
        410: {
            "description": "CSV only: retention removed the broadcast's recipient rows (the "
            "JSON answer is an empty page saying so)."
        },
    },
)
def recipients(
    broadcast_id: PathId,
    request: Request,
    session: SessionDep,
    workspace: CurrentWorkspace,
    settings: SettingsDep,
    status_: DeliveryStatusFilter = None,
    format_: Annotated[str | None, Query(alias="format", pattern="^(json|csv)$")] = None,
    bom: Annotated[
        bool,
        Query(
            description="CSV only: start the file with a UTF-8 byte order mark, so that "
            "spreadsheet programs read names and reasons in any script correctly."
        ),
    ] = False,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> RecipientPage | Response:
    """Who the broadcast reached and who not, and why: JSON pages, or the whole list as CSV
    with ``Accept: text/csv`` (or ``?format=csv``). Once retention removed the rows, the list
    is empty and says so (CSV: 410); the broadcast's counts remain.
    """
    broadcast = get_broadcast(session, workspace, broadcast_id)
    statuses = parse_statuses(status_, DeliveryStatus)
    wants_csv = format_ == "csv" or (
        format_ is None and "text/csv" in request.headers.get("accept", "")
    )
    removed = recipients_removed(broadcast)
    part_day = broadcast.part_day
    if wants_csv and removed is not None:
        # A file with nobody in it would read as nobody reached.
        raise HTTPException(status.HTTP_410_GONE, removed)
    if wants_csv:
        return csv_export(session, settings, workspace, broadcast, statuses, bom=bom)
    after = cursor_id(cursor)
    if removed is not None:
        return RecipientPage(
            items=[],
            next_cursor=None,
            recipients_removed_at=broadcast.recipients_removed_at,
            message=removed,
        )
    if part_day is None:
        # Its audience was never copied: no recipient rows yet.
        return RecipientPage(items=[], next_cursor=None)
    query = recipients_query(workspace, broadcast_id, part_day, statuses=statuses, after_id=after)
    rows, next_cursor = fetch_page(session, query, limit, lambda r: r[0].id)
    return RecipientPage(items=[_recipient(d, name) for d, name in rows], next_cursor=next_cursor)


def csv_export(
    session: Session,
    settings: Settings,
    workspace: int,
    broadcast: Broadcast,
    statuses: list[DeliveryStatus],
    *,
    bom: bool = False,
) -> Response:
    """A broadcast's recipients (those in ``statuses``; all when empty) as a streamed CSV file,
    at most ``api_exports_per_workspace`` at once per workspace (429 beyond). The broadcast's
    rows must still exist (the caller answers 410 otherwise).
    """
    slots = export_slots(settings.api_exports_per_workspace)
    if not slots.take(workspace):
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"this workspace already runs {slots.limit} CSV exports; retry when one ends",
            headers={"Retry-After": "5"},
        )
    broadcast_id, part_day = broadcast.id, broadcast.part_day
    # The request's own session would otherwise stay open (in a transaction) for as long
    # as the answer streams; the export takes a connection per page instead.
    session.close()
    release = _Once(lambda: slots.give_back(workspace))
    export = _csv_rows(workspace, broadcast_id, part_day, statuses, release, bom=bom)
    # Given back when the export ends; or, if it never started, when it is dropped.
    weakref.finalize(export, release)
    return StreamingResponse(
        export,
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="broadcast-{broadcast_id}-recipients.csv"'
        },
    )


def _recipient(delivery: Delivery, name: str) -> RecipientOut:
    return RecipientOut(
        delivery_id=delivery.id,
        contact_id=delivery.contact_id,
        name=name,
        address=delivery.address,
        status=DeliveryStatus(delivery.status),
        attempts=delivery.attempts,
        last_error=delivery.last_error,
        provider_message_id=delivery.provider_message_id,
        sent_at=delivery.sent_at,
        updated_at=delivery.updated_at,
    )


#: Rows fetched per page of a CSV export; each page takes a pooled connection only while it
#: is read, so a client that reads slowly (or not at all) holds none.
EXPORT_PAGE = 2000


class ExportSlots:
    """How many CSV exports each workspace has running in this process, capped.

    Parameters:
      limit: exports one workspace may run at once.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self, workspace: int) -> bool:
        with self._lock:
            if self._running.get(workspace, 0) >= self.limit:
                return False
            self._running[workspace] = self._running.get(workspace, 0) + 1
            return True

    def give_back(self, workspace: int) -> None:
        with self._lock:
            left = self._running.get(workspace, 0) - 1
            if left > 0:
                self._running[workspace] = left
            else:
                self._running.pop(workspace, None)


_EXPORTS: ExportSlots | None = None


def export_slots(limit: int) -> ExportSlots:
    """The process's export slots (one set, whatever the number of app instances)."""
    global _EXPORTS
    if _EXPORTS is None or _EXPORTS.limit != limit:
        _EXPORTS = ExportSlots(limit)
    return _EXPORTS


class _Once:
    """Call ``action`` the first time this is called, never again."""

    def __init__(self, action: Callable[[], None]) -> None:
        self._action: Callable[[], None] | None = action
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            action, self._action = self._action, None
        if action is not None:
            action()


def _csv_rows(
    workspace: int,
    broadcast_id: int,
    part_day: date | None,
    statuses: list[DeliveryStatus],
    done: Callable[[], None],
    *,
    bom: bool = False,
) -> Iterator[bytes]:
    """The CSV export, page by page in delivery order: memory stays flat for any size, and no
    connection or transaction is held between pages (a client reading slowly holds nothing).
    ``done`` is called when the export ends, however it ends.
    """
    try:
        if bom:
            yield "\ufeff".encode()
        yield from _csv_pages(workspace, broadcast_id, part_day, statuses)
    finally:
        done()


def _csv_pages(
    workspace: int, broadcast_id: int, part_day: date | None, statuses: list[DeliveryStatus]
) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    after: int | None = None
    while True:
        if part_day is None:
            page = []
        else:
            with get_sessionmaker()() as session:
                query = recipients_query(
                    workspace, broadcast_id, part_day, statuses=statuses, after_id=after
                )
                page = list(session.execute(query.limit(EXPORT_PAGE)).all())
        for delivery, name in page:
            writer.writerow(
                (
                    delivery.contact_id,
                    _cell(name),
                    _cell(delivery.address),
                    delivery.status,
                    delivery.attempts,
                    _cell(delivery.last_error or ""),
                    _cell(delivery.provider_message_id or ""),
                    delivery.sent_at.isoformat() if delivery.sent_at else "",
                )
            )
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
        if len(page) < EXPORT_PAGE:
            return
        after = page[-1][0].id


#: First characters that make a spreadsheet read a cell as a formula (fullwidth forms too).
FORMULA_STARTS = frozenset("=+-@\t\r|%\uff1d\uff0b\uff0d\uff20")


def _cell(value: str) -> str:
    """Free text as a CSV cell that a spreadsheet shows as text and never runs as a formula,
    however much white space comes first.
    """
    return "'" + value if value.lstrip(" \u3000\u00a0")[:1] in FORMULA_STARTS else value

"""Console pages: sign in and out, the broadcast list (with live progress)."""

from __future__ import annotations

import contextlib
import hmac
import math
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    UploadFile,
    status,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from services.api.console import message_form
from services.api.deps import MediaStoreDep, SessionDep, SettingsDep, plain_id
from services.api.pagination import newest_first
from services.api.routes.broadcasts import csv_export, lifecycle, retry_created, test_created
from services.api.routes.contacts import audience_page, contact_erased
from services.api.schemas import BroadcastCreate, BroadcastPatch, TagCreate
from shared.db.models import (
    Account,
    Broadcast,
    Channel,
    Contact,
    ContactTag,
    Conversation,
    Delivery,
    Media,
    Tag,
)
from shared.db.sql import contains
from shared.domain import templates as message_templates
from shared.domain.audience import AudienceFilter, AudienceSpec, audience_query, count_audience
from shared.domain.broadcasts import (
    MAX_TEST_CONTACTS,
    Changes,
    Content,
    ListFilter,
    NewBroadcast,
    audience_fixed,
    auto_pause_of,
    broadcasts_query,
    cancel_broadcast,
    conversation_broadcast,
    counts,
    create_broadcast,
    create_retry,
    get_broadcast,
    modify_broadcast,
    new_test_send,
    pause_broadcast,
    recipients_query,
    recipients_removed,
    request_hash,
    resume_broadcast,
    retries_of,
    sending_window,
)
from shared.domain.console_sessions import SESSION_HOURS, Signed, sign_in, sign_out, signed
from shared.domain.contacts import (
    CSV_COLUMNS,
    ImportResult,
    create_tag,
    import_contacts,
    parse_import,
    rename_tag,
)
from shared.domain.errors import DomainError, NotFound, ValidationFailed
from shared.domain.lifecycle import (
    ACTION_ALLOWED_FROM,
    OVERDUE_REASON_PREFIX,
    BroadcastStatus,
    ChannelKind,
    DeliveryStatus,
    Origin,
)
from shared.domain.media import MAX_IMAGES, PROVIDER_IMAGES, create_media
from shared.domain.removal import delete_broadcast, delete_tag, erase_contact
from shared.domain.types import MAX_ID
from shared.media_store import MediaStore
from shared.settings import Settings, get_settings

HERE = Path(__file__).parent
STATIC = HERE / "static"
#: The session cookie (its value: the session's random id) and the sign-in form's CSRF cookie.
SESSION_COOKIE = "bcast_console"
LOGIN_COOKIE = "bcast_console_login"
PAGE_SIZE = 50
STATUS_LABELS = {
    "pending": "Pending",
    "in_progress": "In progress",
    "paused": "Paused",
    "canceled": "Canceled",
    "completed": "Completed",
}
ORIGIN_LABELS = {"broadcast": "Broadcast", "conversation": "Timed send", "test": "Test send"}
#: Pages may run their own scripts and styles only, and may not be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/console", include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals.update(
    static=lambda name: f"/console/static/{name}",
    status_label=lambda value: STATUS_LABELS.get(value, value),
    origin_label=lambda value: ORIGIN_LABELS.get(value, value),
    kind_label=message_form.kind_label,
)


class SignInNeeded(Exception):
    """No (live) session: the page sends the browser to sign in."""

    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


def _secure(request: Request) -> bool:
    # Behind a proxy that ends TLS the request itself may read http: the public URL says.
    return request.url.scheme == "https" or get_settings().public_url.startswith("https://")


def page(request: Request, name: str, context: dict[str, Any], code: int = 200) -> Response:
    response = templates.TemplateResponse(request, name, context, status_code=code)
    response.headers.update(SECURITY_HEADERS)
    return response


def current(request: Request, session: SessionDep) -> Signed:
    """The signed-in operator, or a redirect to the sign-in page."""
    session_id = request.cookies.get(SESSION_COOKIE)
    who = signed(session, session_id) if session_id else None
    if who is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            target = "/console/broadcasts"  # a form's target cannot be opened by a link
        raise SignInNeeded(target)
    return who


Operator = Annotated[Signed, Depends(current)]


def check_csrf(who: Signed, token: str) -> None:
    if not hmac.compare_digest(who.csrf_token.encode(), token.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the form is stale or not from this console")


def _safe_next(value: str) -> str:
    # Only a console path: never another site (an open redirect).
    if value.startswith("/console") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console/broadcasts"


@router.get("")
def console_home() -> Response:
    return RedirectResponse("/console/broadcasts", status.HTTP_303_SEE_OTHER)


@router.get("/login")
def login_form(request: Request, next: str = "/console/broadcasts") -> Response:
    token = secrets.token_urlsafe(32)
    response = page(
        request, "login.html", {"signed": None, "login_csrf": token, "next": _safe_next(next)}
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/console",
        max_age=3600,
    )
    return response


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    token: Annotated[str, Form(max_length=500)],
    csrf_token: Annotated[str, Form(max_length=200)],
    next: Annotated[str, Form(max_length=2000)] = "/console/broadcasts",
) -> Response:
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), csrf_token.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the sign-in form is stale: load it again")
    made = sign_in(session, token.strip())
    if made is None:
        again = secrets.token_urlsafe(32)
        response = page(
            request,
            "login.html",
            {
                "signed": None,
                "login_csrf": again,
                "next": _safe_next(next),
                "error": "That token is unknown, revoked or expired.",
            },
            code=status.HTTP_401_UNAUTHORIZED,
        )
        response.set_cookie(
            LOGIN_COOKIE,
            again,
            httponly=True,
            samesite="strict",
            secure=_secure(request),
            path="/console",
            max_age=3600,
        )
        return response
    session.commit()
    session_id, _ = made
    response = RedirectResponse(_safe_next(next), status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="lax",
        secure=_secure(request),
        path="/console",
        max_age=SESSION_HOURS * 3600,
    )
    response.delete_cookie(LOGIN_COOKIE, path="/console")
    return response


@router.post("/logout")
def logout(
    request: Request,
    session: SessionDep,
    who: Operator,
    csrf_token: Annotated[str, Form(max_length=200)],
) -> Response:
    check_csrf(who, csrf_token)
    sign_out(session, request.cookies.get(SESSION_COOKIE, ""))
    session.commit()
    response = RedirectResponse("/console/login", status.HTTP_303_SEE_OTHER)
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


def _channels(session: SessionDep, workspace_id: int) -> list[Channel]:
    return list(
        session.scalars(
            select(Channel).where(Channel.workspace_id == workspace_id).order_by(Channel.name)
        )
    )


def _name_or_address(q: str) -> ColumnElement[bool]:
    """Contacts whose name or address holds ``q`` (case ignored; ``%`` and ``_`` as typed)."""
    like = contains(q)
    return or_(Contact.name.ilike(like, escape="\\"), Contact.address.ilike(like, escape="\\"))


@router.get("/broadcasts")
def broadcasts(
    request: Request,
    session: SessionDep,
    who: Operator,
    status_: Annotated[list[BroadcastStatus] | None, Query(alias="status")] = None,
    origin_: Annotated[str, Query(alias="origin", max_length=20)] = "",
    channel_: Annotated[str, Query(alias="channel", max_length=20)] = "",
    q: Annotated[str, Query(max_length=200)] = "",
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    # A form's "Any" sends an empty value; anything else unknown is treated alike.
    origin = Origin(origin_) if origin_ in ORIGIN_LABELS else None
    channel = plain_id(channel_)
    query = broadcasts_query(
        who.workspace_id,
        ListFilter(
            statuses=status_ or (), origin=origin, channel_id=channel, name=q.strip() or None
        ),
    )
    try:
        rows, next_cursor = newest_first(session, query, Broadcast.id, PAGE_SIZE, cursor)
    except DomainError:
        rows, next_cursor = [], None
    channels = _channels(session, who.workspace_id)
    chosen_statuses = sorted({s.value for s in status_ or ()})
    chosen: dict[str, Any] = {
        "status": chosen_statuses,
        "origin": origin.value if origin else "",
        "channel": channel,
        "q": q,
    }
    next_url = None
    if next_cursor:
        params = [("status", s) for s in chosen_statuses]
        for key, value in (("origin", chosen["origin"]), ("channel", channel), ("q", q)):
            if value:
                params.append((key, str(value)))
        next_url = "/console/broadcasts?" + urlencode([*params, ("cursor", next_cursor)])
    return page(
        request,
        "broadcasts.html",
        {
            "signed": who,
            "nav": "broadcasts",
            "rows": [_row(b) for b in rows],
            "channels": channels,
            "channel_names": {c.id: c.name for c in channels},
            "statuses": list(STATUS_LABELS.items()),
            "origins": list(ORIGIN_LABELS.items()),
            "chosen": chosen,
            "next_url": next_url,
        },
    )


def _row(b: Broadcast) -> dict[str, Any]:
    numbers = counts(b)
    if not audience_fixed(b):
        # Not started: its audience is not copied yet; what waits is the audience as counted.
        numbers["queued"] = b.audience_size
    return {
        "id": b.id,
        "name": b.name,
        "origin": b.origin,
        "channel_id": b.channel_id,
        "status": b.status,
        "counts": numbers,
        "send_at": b.send_at,
    }


@router.get("/broadcasts/progress")
def progress(
    session: SessionDep,
    who: Operator,
    id: Annotated[list[int], Query(max_length=PAGE_SIZE)],
) -> Response:
    """Counts and status of some of the operator's broadcasts (the list's live rows)."""
    rows = session.scalars(
        select(Broadcast).where(
            Broadcast.workspace_id == who.workspace_id, Broadcast.id.in_(id[:PAGE_SIZE])
        )
    )
    items = [
        {
            "id": b.id,
            "status": b.status,
            "status_label": STATUS_LABELS.get(b.status, b.status),
            **counts(b),
        }
        for b in rows
    ]
    return JSONResponse({"items": items}, headers={"Cache-Control": "no-store"})


#: The detail page's counts, in order.
COUNT_FIELDS = (
    ("total", "Recipients"),
    ("sent", "Sent"),
    ("failed", "Failed"),
    ("partial", "Partly sent"),
    ("queued", "Queued"),
    ("canceled", "Canceled"),
    ("skipped", "Skipped"),
)
ACTION_LABELS = {"pause": "Pause", "resume": "Resume", "cancel": "Cancel"}
#: The "not reached" list's choices: which delivery statuses each shows.
NOT_REACHED: dict[str, tuple[str, tuple[DeliveryStatus, ...]]] = {
    "all": (
        "Everyone not reached",
        (
            DeliveryStatus.FAILED,
            DeliveryStatus.PARTIAL,
            DeliveryStatus.SKIPPED,
            DeliveryStatus.CANCELED,
        ),
    ),
    "failed": ("Failed", (DeliveryStatus.FAILED,)),
    "partial": ("Partly sent", (DeliveryStatus.PARTIAL,)),
    "skipped": ("Skipped (unreachable or opted out)", (DeliveryStatus.SKIPPED,)),
    "canceled": ("Canceled", (DeliveryStatus.CANCELED,)),
}
#: Rows of the "not reached" list on the page (the CSV has all).
RECIPIENTS_SHOWN = 100


def _owned(session: SessionDep, who: Signed, broadcast_id: int) -> Broadcast:
    if not 0 < broadcast_id <= MAX_ID:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such broadcast")
    try:
        return get_broadcast(session, who.workspace_id, broadcast_id)
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such broadcast") from None


def _reasons(session: SessionDep, b: Broadcast) -> list[tuple[str, int]]:
    if b.part_day is None or b.recipients_removed_at is not None:
        return []
    why = Delivery.last_error
    rows = session.execute(
        select(why, func.count())
        .where(
            Delivery.broadcast_id == b.id,
            Delivery.part_day == b.part_day,
            Delivery.workspace_id == b.workspace_id,
            Delivery.status.in_([DeliveryStatus.FAILED.value, DeliveryStatus.PARTIAL.value]),
            # Implied (they carry their reason): read from the index of rows not reached.
            Delivery.last_error.is_not(None),
        )
        .group_by(why)
        .order_by(func.count().desc())
        .limit(20)
    ).all()
    return [(str(reason), int(count)) for reason, count in rows]


#: The most bars the progress chart draws (its bucket widens to fit the sending time).
CHART_BARS = 60
CHART_W, CHART_H = 600, 120


def _progress(session: SessionDep, b: Broadcast) -> dict[str, Any] | None:
    """Sends ended per time bucket (sent, failed or partly sent), as SVG bars: None before
    any ended.
    """
    if b.part_day is None or b.recipients_removed_at is not None:
        return None
    ended = func.coalesce(Delivery.sent_at, Delivery.updated_at)
    where = (
        Delivery.broadcast_id == b.id,
        Delivery.part_day == b.part_day,
        Delivery.workspace_id == b.workspace_id,
        Delivery.status.in_(
            [DeliveryStatus.SENT.value, DeliveryStatus.FAILED.value, DeliveryStatus.PARTIAL.value]
        ),
    )
    first, last = session.execute(select(func.min(ended), func.max(ended)).where(*where)).one()
    if first is None:
        return None
    span = max((last - first).total_seconds(), 1.0)
    # Bars of whole seconds, at most CHART_BARS of them (the last send falls in the last).
    bucket = math.floor(span / CHART_BARS) + 1
    t = func.floor(func.extract("epoch", ended - first) / bucket)
    counts_by: dict[int, int] = {
        int(i): int(c)
        for i, c in session.execute(select(t, func.count()).where(*where).group_by(t)).all()
    }
    n = int(max(counts_by)) + 1
    peak = max(counts_by.values())
    width = CHART_W / n
    bars = []
    for i in range(n):
        count = int(counts_by.get(i, 0))
        height = CHART_H * count / peak
        bars.append(
            {
                "x": round(i * width, 2),
                "y": round(CHART_H - height, 2),
                "w": round(max(width - 1, 1), 2),
                "h": round(height, 2),
                "label": f"{i * bucket}-{(i + 1) * bucket} s: {count} sends ({count / bucket:.1f}/s)",
            }
        )
    return {
        "bars": bars,
        "bucket": bucket,
        "width": CHART_W,
        "height": CHART_H,
        "peak_rate": round(peak / bucket, 1),
        "seconds": round(span),
        "first": first,
    }


@router.get("/broadcasts/{broadcast_id:int}")
def detail(
    request: Request,
    session: SessionDep,
    who: Operator,
    broadcast_id: int,
    who_: Annotated[str, Query(alias="who", max_length=20)] = "all",
) -> Response:
    return _detail_page(request, session, who, broadcast_id, who_)


def _detail_page(
    request: Request,
    session: SessionDep,
    who: Signed,
    broadcast_id: int,
    who_: str = "all",
    *,
    notice: str = "",
    code: int = 200,
    test_to: str = "",
) -> Response:
    """A broadcast's page; ``notice``: why the action just tried was refused (never text
    from a link: a crafted URL cannot put words in the console's mouth); ``test_to``: the
    test-send form's text, kept when it was refused.
    """
    b = _owned(session, who, broadcast_id)
    choice = who_ if who_ in NOT_REACHED else "all"
    removed = recipients_removed(b)
    shown: list[dict[str, Any]] = []
    more = False
    if removed is None and b.part_day is not None:
        query = recipients_query(
            who.workspace_id, b.id, b.part_day, statuses=NOT_REACHED[choice][1]
        )
        rows = session.execute(query.limit(RECIPIENTS_SHOWN + 1)).all()
        more = len(rows) > RECIPIENTS_SHOWN
        shown = [
            {
                "name": name,
                "address": d.address,
                "status": d.status,
                "attempts": d.attempts,
                "last_error": d.last_error,
            }
            for d, name in rows[:RECIPIENTS_SHOWN]
        ]
    channel = session.get(Channel, b.channel_id)
    kind = channel.kind if channel else None
    content = b.content or {}
    template = content.get("template")
    names: dict[int, str] = {}
    if ids := message_form.header_media_ids(template):
        names = {
            int(i): str(n)
            for i, n in session.execute(
                select(Media.id, Media.filename).where(
                    Media.workspace_id == who.workspace_id, Media.id.in_(ids)
                )
            ).all()
        }
    return page(
        request,
        "detail.html",
        {
            "signed": who,
            "nav": "broadcasts",
            "b": b,
            "numbers": _row(b)["counts"],
            "count_fields": COUNT_FIELDS,
            "channel_name": channel.name if channel else b.channel_id,
            "channel_kind": kind,
            "template": message_form.template_view(template, names),
            "message_tag": content.get("message_tag"),
            "tag_meaning": message_form.tag_meaning(kind, content.get("message_tag")),
            "actions": [
                (action, label)
                for action, label in ACTION_LABELS.items()
                if BroadcastStatus(b.status) in ACTION_ALLOWED_FROM[action]
            ],
            "editable": BroadcastStatus(b.status) in ACTION_ALLOWED_FROM["modify"]
            and b.started_at is None,
            "retriable": b.failed_count > 0 and removed is None,
            "overdue": b.started_at is None
            and b.status == BroadcastStatus.PAUSED
            and (b.status_reason or "").startswith(OVERDUE_REASON_PREFIX),
            "retry_of": b.retry_of_id,
            "retries": retries_of(session, who.workspace_id, [b.id])[b.id],
            "test_of": b.test_of_id,
            "deletable": b.status in ("completed", "canceled"),
            "rendered": _rendered(session, b),
            "window": sending_window(b),
            "tests": session.execute(
                broadcasts_query(who.workspace_id, ListFilter(test_of=b.id))
                .order_by(Broadcast.id.desc())
                .limit(TESTS_SHOWN)
            )
            .scalars()
            .all(),
            "test_to": test_to,
            "reasons": _reasons(session, b),
            "chart": _progress(session, b),
            "removed": removed,
            "recipients": shown,
            "more": more,
            "who": choice,
            "who_options": [(k, v[0]) for k, v in NOT_REACHED.items()],
            "notice": notice,
        },
        code=code,
    )


def _act(
    request: Request,
    action: str,
    session: SessionDep,
    who: Signed,
    broadcast_id: int,
    csrf_token: str,
    confirm_late_start: bool = False,
) -> Response:
    """Pause, resume or cancel, as the API does (same rules, same log lines). Resuming a
    broadcast paused as overdue needs its form's box ticked, as the API needs its flag.
    """
    check_csrf(who, csrf_token)
    _owned(session, who, broadcast_id)
    do: dict[str, Callable[[Session, int, int], Broadcast]] = {
        "pause": pause_broadcast,
        "resume": lambda s, w, b: resume_broadcast(s, w, b, confirm_late_start=confirm_late_start),
        "cancel": cancel_broadcast,
    }
    event = {"pause": "paused", "resume": "resumed", "cancel": "canceled"}[action]
    target = f"/console/broadcasts/{broadcast_id}"
    try:
        b = do[action](session, who.workspace_id, broadcast_id)
    except DomainError as exc:
        session.rollback()
        return _detail_page(request, session, who, broadcast_id, notice=str(exc), code=409)
    session.commit()
    lifecycle(event, b, who.workspace_id)
    return RedirectResponse(target, status.HTTP_303_SEE_OTHER)


def _action_route(action: str) -> Callable[..., Response]:
    def route(
        request: Request,
        session: SessionDep,
        who: Operator,
        broadcast_id: int,
        csrf_token: Annotated[str, Form(max_length=200)],
        confirm_late_start: Annotated[str, Form(max_length=10)] = "",
    ) -> Response:
        return _act(
            request, action, session, who, broadcast_id, csrf_token, confirm_late_start == "yes"
        )

    route.__name__ = action
    return route


for _action in ACTION_LABELS:
    router.add_api_route(
        f"/broadcasts/{{broadcast_id:int}}/{_action}", _action_route(_action), methods=["POST"]
    )


@router.post("/broadcasts/{broadcast_id:int}/retry-failed")
def retry_failed(
    request: Request,
    session: SessionDep,
    who: Operator,
    broadcast_id: int,
    csrf_token: Annotated[str, Form(max_length=200)],
) -> Response:
    """A new broadcast to the recipients that failed in this one, sent now (as the API's
    retry-failed); the operator lands on its page.
    """
    check_csrf(who, csrf_token)
    _owned(session, who, broadcast_id)
    try:
        b, _ = create_retry(session, who.workspace_id, broadcast_id, name=None, send_at=None)
    except DomainError as exc:
        session.rollback()
        return _detail_page(request, session, who, broadcast_id, notice=str(exc), code=409)
    session.commit()
    retry_created(b, who.workspace_id)
    return RedirectResponse(f"/console/broadcasts/{b.id}", status.HTTP_303_SEE_OTHER)


#: Recipients whose personalised text a broadcast's page shows before it starts.
RENDERED_SHOWN = 3


def _rendered(session: Session, b: Broadcast) -> list[tuple[str, str]]:
    """(who, text) for the first recipients of a broadcast not yet started whose text is
    personalised: the text as each will get it.
    """
    text = (b.content or {}).get("text")
    template = message_templates.stored(text)
    if template is None or audience_fixed(b):
        return []
    page = audience_page(
        session,
        b.workspace_id,
        b.channel_id,
        AudienceSpec.model_validate(b.audience),
        limit=RENDERED_SHOWN,
        cursor=None,
        text=text,
        template=template,
    )
    return [(c.name or c.address, c.text or "") for c in page.contacts]


#: How far ahead the console's copy of a broadcast is due: it is not sent before the operator
#: has looked at it (and changed its time, or sent it now, on its page to edit).
COPY_LEAD = timedelta(hours=1)


@router.post("/broadcasts/{broadcast_id:int}/copy")
def copy_broadcast(
    request: Request,
    session: SessionDep,
    who: Operator,
    broadcast_id: int,
    csrf_token: Annotated[str, Form(max_length=200)],
) -> Response:
    """A pending copy of this broadcast (as the API's clone: channel, audience and content,
    its audience worked out anew), due in an hour; the operator lands on its page to edit.
    """
    check_csrf(who, csrf_token)
    source = _owned(session, who, broadcast_id)
    try:
        b, _ = create_broadcast(
            session,
            who.workspace_id,
            NewBroadcast(
                name=f"{source.name} (copy)"[:200],
                channel_id=source.channel_id,
                audience=AudienceSpec.model_validate(source.audience),
                content=Content.model_validate(source.content),
                send_at=datetime.now(UTC) + COPY_LEAD,
                window=sending_window(source),
                auto_pause=auto_pause_of(source),
            ),
        )
    except DomainError as exc:
        session.rollback()
        return _detail_page(request, session, who, broadcast_id, notice=str(exc), code=422)
    session.commit()
    lifecycle("created", b, who.workspace_id, f" as a copy of broadcast {broadcast_id}")
    return RedirectResponse(f"/console/broadcasts/{b.id}/edit", status.HTTP_303_SEE_OTHER)


@router.post("/broadcasts/{broadcast_id:int}/delete")
def remove_broadcast(
    request: Request,
    session: SessionDep,
    who: Operator,
    broadcast_id: int,
    csrf_token: Annotated[str, Form(max_length=200)],
    confirm: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    """Delete a completed or canceled broadcast (as the API's DELETE), its box ticked; back
    to the list.
    """
    check_csrf(who, csrf_token)
    _owned(session, who, broadcast_id)
    if confirm != "yes":
        return _detail_page(
            request,
            session,
            who,
            broadcast_id,
            notice="tick the box to delete the broadcast and its recipient list",
            code=422,
        )
    try:
        b = delete_broadcast(session, who.workspace_id, broadcast_id)
    except DomainError as exc:
        session.rollback()
        return _detail_page(request, session, who, broadcast_id, notice=str(exc), code=409)
    session.commit()
    lifecycle("deleted", b, who.workspace_id)
    return RedirectResponse("/console/broadcasts", status.HTTP_303_SEE_OTHER)


#: Test sends listed on a broadcast's page (the newest).
TESTS_SHOWN = 10


@router.post("/broadcasts/{broadcast_id:int}/test-send")
def send_test(
    request: Request,
    session: SessionDep,
    who: Operator,
    broadcast_id: int,
    csrf_token: Annotated[str, Form(max_length=200)],
    to: Annotated[str, Form(max_length=4000)] = "",
) -> Response:
    """Send this broadcast's content now to up to 10 contacts of its channel, named by
    address or contact id (as the API's test-send); the operator lands on the test's page.
    """
    check_csrf(who, csrf_token)
    b = _owned(session, who, broadcast_id)
    try:
        contact_ids = _contacts_named(session, who.workspace_id, b.channel_id, to)
        test, _ = create_broadcast(
            session, who.workspace_id, new_test_send(session, who.workspace_id, b.id, contact_ids)
        )
    except DomainError as exc:
        session.rollback()
        return _detail_page(
            request, session, who, broadcast_id, notice=str(exc), code=422, test_to=to
        )
    session.commit()
    test_created(test, who.workspace_id)
    return RedirectResponse(f"/console/broadcasts/{test.id}", status.HTTP_303_SEE_OTHER)


def _contacts_named(session: Session, workspace_id: int, channel_id: int, text: str) -> list[int]:
    """The contacts a comma- or line-separated list names: each an address on one of the
    channel's accounts, or a contact id written ``#123`` (digits alone are an address: a
    Telegram chat id is one).
    """
    names = [n.strip() for n in text.replace("\n", ",").split(",") if n.strip()]
    if not names:
        raise ValidationFailed.one(
            "to", "names no contact: give addresses, or contact ids as #123", "empty"
        )
    if len(names) > MAX_TEST_CONTACTS:
        raise ValidationFailed.one(
            "to", f"names {len(names)} contacts; a test goes to at most {MAX_TEST_CONTACTS}", "long"
        )
    found = dict(
        session.execute(
            select(Contact.address, Contact.id)
            .join(Account, Account.id == Contact.account_id)
            .where(
                Contact.workspace_id == workspace_id,
                Account.channel_id == channel_id,
                Contact.address.in_(names),
            )
        ).all()
    )
    ids: list[int] = []
    for name in names:
        if name in found:
            ids.append(found[name])
        elif (
            name.startswith("#")
            and name[1:].isascii()
            and name[1:].isdigit()
            and 0 < int(name[1:]) <= MAX_ID
        ):
            ids.append(int(name[1:]))
        else:
            raise ValidationFailed.one(
                "to", f"no contact of this channel has the address {name!r}", "not_found"
            )
    return ids


@router.get("/broadcasts/{broadcast_id:int}/recipients.csv")
def recipients_csv(
    session: SessionDep,
    settings: SettingsDep,
    who: Operator,
    broadcast_id: int,
    who_: Annotated[str, Query(alias="who", max_length=20)] = "all",
) -> Response:
    b = _owned(session, who, broadcast_id)
    removed = recipients_removed(b)
    if removed is not None:
        raise HTTPException(status.HTTP_410_GONE, removed)
    choice = who_ if who_ in NOT_REACHED else "all"
    return csv_export(session, settings, who.workspace_id, b, list(NOT_REACHED[choice][1]))


# --- conversations and their timed sends ---------------------------------------------------


def _conversation(session: SessionDep, who: Signed, conversation_id: int) -> dict[str, Any]:
    row = session.execute(
        select(Conversation, Contact.name, Contact.address, Account.name)
        .join(Contact, Contact.id == Conversation.contact_id)
        .join(Account, Account.id == Conversation.account_id)
        .where(
            Conversation.id == conversation_id,
            Conversation.workspace_id == who.workspace_id,
        )
    ).one_or_none()
    if row is None or not 0 < conversation_id <= MAX_ID:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such conversation")
    conversation, name, address, account = row
    return {
        "id": conversation.id,
        "contact_id": conversation.contact_id,
        "contact_name": name,
        "address": address,
        "account_name": account,
    }


@router.get("/conversations")
def conversations(request: Request, session: SessionDep, who: Operator) -> Response:
    sends = (
        select(func.count())
        .where(Broadcast.conversation_id == Conversation.id)
        .correlate(Conversation)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Conversation, Contact.name, Contact.address, Account.name, sends)
        .join(Contact, Contact.id == Conversation.contact_id)
        .join(Account, Account.id == Conversation.account_id)
        .where(Conversation.workspace_id == who.workspace_id)
        .order_by(Conversation.id.desc())
        .limit(PAGE_SIZE)
    ).all()
    return page(
        request,
        "conversations.html",
        {
            "signed": who,
            "nav": "conversations",
            "rows": [
                {
                    "id": c.id,
                    "contact_id": c.contact_id,
                    "contact_name": name,
                    "address": address,
                    "account_name": account,
                    "timed_sends": count,
                }
                for c, name, address, account, count in rows
            ],
        },
    )


def _conversation_page(
    request: Request,
    session: SessionDep,
    who: Signed,
    conversation_id: int,
    *,
    form: dict[str, str] | None = None,
    error: str = "",
    notice: str = "",
    code: int = 200,
) -> Response:
    c = _conversation(session, who, conversation_id)
    sends = session.scalars(
        broadcasts_query(who.workspace_id, ListFilter(origin=Origin.CONVERSATION))
        .where(Broadcast.conversation_id == conversation_id)
        .order_by(Broadcast.id.desc())
        .limit(PAGE_SIZE)
    ).all()
    return page(
        request,
        "conversation.html",
        {
            "signed": who,
            "nav": "conversations",
            "c": c,
            "sends": sends,
            "form": form
            or {"text": "", "when": "now", "at": "", "tz": "", "key": secrets.token_urlsafe(16)},
            "error": error,
            "notice": notice,
        },
        code=code,
    )


@router.get("/conversations/{conversation_id:int}")
def conversation(
    request: Request,
    session: SessionDep,
    who: Operator,
    conversation_id: int,
    scheduled: Annotated[str, Query(max_length=20)] = "",
) -> Response:
    notice = ""
    made = plain_id(scheduled)
    if made is not None:
        # Said from the row itself, not from the link.
        b = session.get(Broadcast, made)
        if b is not None and b.workspace_id == who.workspace_id:
            notice = f"Scheduled for {b.send_at:%Y-%m-%d %H:%M} UTC."
    return _conversation_page(request, session, who, conversation_id, notice=notice)


def local_send_time(at: str, tz: str) -> datetime:
    """A ``datetime-local`` value typed in the operator's time zone, as an aware time."""
    try:
        zone = ZoneInfo(tz) if tz else UTC
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationFailed.one("tz", f"{tz!r} is not a time zone", "timezone") from None
    try:
        naive = datetime.fromisoformat(at)
    except ValueError:
        raise ValidationFailed.one(
            "send_at", "needs a date and a time, e.g. 2026-12-01 09:00", "datetime"
        ) from None
    if naive.tzinfo is not None:
        raise ValidationFailed.one("send_at", "is a local time: give no UTC offset", "datetime")
    early, late = naive.replace(tzinfo=zone, fold=0), naive.replace(tzinfo=zone, fold=1)
    if early.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != naive:
        raise ValidationFailed.one(
            "send_at",
            f"{naive:%Y-%m-%d %H:%M} does not exist in {tz} (the clocks go forward then)",
            "nonexistent_time",
        )
    if early.utcoffset() != late.utcoffset():
        raise ValidationFailed.one(
            "send_at",
            f"{naive:%Y-%m-%d %H:%M} happens twice in {tz} (the clocks go back then): "
            "pick a time outside that hour",
            "ambiguous_time",
        )
    return early


@router.post("/conversations/{conversation_id:int}/timed-send")
def timed_send(
    request: Request,
    session: SessionDep,
    who: Operator,
    conversation_id: int,
    csrf_token: Annotated[str, Form(max_length=200)],
    text: Annotated[str, Form(max_length=20_000)] = "",
    when: Annotated[str, Form(max_length=10)] = "now",
    at: Annotated[str, Form(max_length=40)] = "",
    tz: Annotated[str, Form(max_length=64)] = "",
    form_key: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Schedule a message to the conversation's contact, through the API's rules (and with
    its words when they refuse it). A form sent twice schedules one message.
    """
    check_csrf(who, csrf_token)
    form = {"text": text, "when": when, "at": at, "tz": tz, "key": form_key}
    try:
        send_at = local_send_time(at, tz) if when == "later" else None
        try:
            content = Content(text=text)
        except ValidationError as exc:
            raise ValidationFailed.from_pydantic(exc, prefix="content") from None
        new = conversation_broadcast(session, who.workspace_id, conversation_id, content, send_at)
        body = {"conversation_id": conversation_id, "text": text, "send_at": str(send_at)}
        broadcast, _ = create_broadcast(
            session,
            who.workspace_id,
            new,
            idempotency_key=f"console-timed-{form_key}" if form_key else None,
            body_hash=request_hash(body) if form_key else None,
        )
    except ValidationFailed as exc:
        session.rollback()
        return _conversation_page(
            request, session, who, conversation_id, form=form, error=str(exc), code=422
        )
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such conversation") from None
    session.commit()
    lifecycle("created", broadcast, who.workspace_id)
    return RedirectResponse(
        f"/console/conversations/{conversation_id}?scheduled={broadcast.id}",
        status.HTTP_303_SEE_OTHER,
    )


# --- a new broadcast: channel, people, content, send time ----------------------------------

#: People listed in the picker (the count covers everyone).
PICKER_SHOWN = 100


def _ids(values: list[str]) -> list[int]:
    return [i for i in (plain_id(v) for v in values) if i]


def _id_set(text: str) -> set[int]:
    """Ids from a comma-separated hidden field (anything else in it is ignored)."""
    return set(_ids(text.split(","))) if text else set()


def _picker_form(
    *,
    channel: str,
    account: list[str] | None,
    tag: list[str] | None,
    tag_match: str,
    name: str,
    **rest: Any,
) -> dict[str, Any]:
    """A broadcast form's state, from the raw values of the GET picker or of the POST."""
    return {
        "channel": plain_id(channel) or 0,
        "accounts": _ids(account or []),
        "tags": _ids(tag or []),
        "tag_match": "all" if tag_match == "all" else "any",
        "name": name,
        "selection": "all",
        "picked": set(),
        "left_out": set(),
        "q": "",
        "ppage": 1,
        "text": "",
        "when": "now",
        "at": "",
        "shown_at": "",
        "tz": "",
        "media": [],
        "key": secrets.token_urlsafe(16),
        "window_start": "",
        "window_end": "",
        "pause_percent": "",
        "pause_last": "",
        **message_form.empty_fields(),
        **rest,
    }


class FormIn:
    """The fields of the broadcast form (new or edit), as posted."""

    def __init__(
        self,
        csrf_token: Annotated[str, Form(max_length=200)],
        channel: Annotated[str, Form(max_length=20)] = "",
        account: Annotated[list[str] | None, Form(max_length=1000)] = None,
        tag: Annotated[list[str] | None, Form(max_length=1000)] = None,
        tag_match: Annotated[str, Form(max_length=5)] = "any",
        name: Annotated[str, Form(max_length=1000)] = "",
        selection: Annotated[str, Form(max_length=10)] = "all",
        shown: Annotated[str, Form(max_length=2_000_000)] = "",
        contact: Annotated[list[str] | None, Form(max_length=PICKER_SHOWN)] = None,
        picked: Annotated[str, Form(max_length=2_000_000)] = "",
        left_out: Annotated[str, Form(max_length=2_000_000)] = "",
        q: Annotated[str, Form(max_length=200)] = "",
        ppage: Annotated[str, Form(max_length=10)] = "1",
        go: Annotated[str, Form(max_length=20)] = "save",
        mode_was: Annotated[str, Form(max_length=10)] = "",
        text: Annotated[str, Form(max_length=20_000)] = "",
        keep_media: Annotated[list[str] | None, Form(max_length=MAX_IMAGES)] = None,
        media_listed: Annotated[str, Form(max_length=1)] = "",
        when: Annotated[str, Form(max_length=10)] = "now",
        at: Annotated[str, Form(max_length=40)] = "",
        shown_at: Annotated[str, Form(max_length=40)] = "",
        tz: Annotated[str, Form(max_length=64)] = "",
        form_key: Annotated[str, Form(max_length=64)] = "",
        window_start: Annotated[str, Form(max_length=10)] = "",
        window_end: Annotated[str, Form(max_length=10)] = "",
        pause_percent: Annotated[str, Form(max_length=10)] = "",
        pause_last: Annotated[str, Form(max_length=10)] = "",
        tpl_listed: Annotated[str, Form(max_length=1)] = "",
        tpl_name: Annotated[str, Form(max_length=1000)] = "",
        tpl_language: Annotated[str, Form(max_length=100)] = "",
        tpl_header_text: Annotated[str, Form(max_length=2000)] = "",
        tpl_header_media: Annotated[str, Form(max_length=20)] = "",
        tpl_body: Annotated[str, Form(max_length=200_000)] = "",
        tpl_quick_replies: Annotated[str, Form(max_length=20_000)] = "",
        tpl_url_suffix: Annotated[str, Form(max_length=2000)] = "",
        tpl_url_index: Annotated[str, Form(max_length=10)] = "",
        tag_listed: Annotated[str, Form(max_length=1)] = "",
        message_tag: Annotated[str, Form(max_length=100)] = "",
    ) -> None:
        self.csrf_token = csrf_token
        #: The form showed the template fields, or the message tag (their channel's kind
        #: takes them): what they say replaces what the broadcast had.
        self.template_listed = tpl_listed == "1"
        self.tag_listed = tag_listed == "1"
        self.go = go
        #: The form listed the images it carries (the edit page): those not kept go.
        self.media_listed = media_listed == "1"
        ticked = set(_ids(contact or []))
        listed = _id_set(shown)
        mode = "manual" if selection == "manual" else "all"
        if mode_was and mode_was != mode:
            # The operator switched between "everyone matching" and "only those ticked": the
            # ticks carried from other pages meant the other thing, so only this page's count.
            picked = left_out = ""
        self.state = _picker_form(
            channel=channel,
            account=account,
            tag=tag,
            tag_match=tag_match,
            name=name,
            selection=mode,
            # Ticks of the page left join those of the pages seen before.
            picked=(_id_set(picked) - listed) | ticked,
            left_out=(_id_set(left_out) - listed) | (listed - ticked),
            q=" ".join(q.split()),
            ppage=plain_id(ppage) or 1,
            text=text,
            media=_ids(keep_media or []),
            when=when,
            at=at,
            shown_at=shown_at,
            tz=tz,
            key=form_key,
            window_start=window_start.strip(),
            window_end=window_end.strip(),
            pause_percent=pause_percent.strip(),
            pause_last=pause_last.strip(),
            **message_form.posted_fields(
                tpl_name=tpl_name,
                tpl_language=tpl_language,
                tpl_header_text=tpl_header_text,
                tpl_header_media=tpl_header_media,
                tpl_body=tpl_body,
                tpl_quick_replies=tpl_quick_replies,
                tpl_url_suffix=tpl_url_suffix,
                tpl_url_index=tpl_url_index,
                message_tag=message_tag,
            ),
        )

    def turned_page(self) -> bool:
        """Is this a search or a page of the picker (draw the form again), not a save?"""
        if self.go == "search":
            self.state["ppage"] = 1
            return True
        if self.go.startswith("page-"):
            self.state["ppage"] = plain_id(self.go.removeprefix("page-")) or 1
            return True
        return False

    def extras(self) -> dict[str, Any]:
        """The sending window and auto-pause as the API takes them (None: not set), from
        the form's optional fields; what the API refuses is refused with its words.
        """
        form = self.state
        window: dict[str, Any] | None = None
        if form["window_start"] or form["window_end"]:
            window = {"start": form["window_start"], "end": form["window_end"]}
            if form["tz"] and form["tz"] != "UTC":
                window["zone"] = form["tz"]
        pause: dict[str, Any] | None = None
        if form["pause_percent"]:
            try:
                ratio: Any = float(form["pause_percent"]) / 100
            except ValueError:
                ratio = form["pause_percent"]
            pause = {"failure_ratio": ratio}
            if form["pause_last"]:
                pause["last"] = form["pause_last"]
        return {"sending_window": window, "auto_pause": pause}

    def window_content(
        self, content: dict[str, Any], kind: str | None, *, editing: bool = False
    ) -> None:
        """Set ``content``'s WhatsApp template and message tag from the form. A new
        broadcast takes what the form says; an edit takes the fields the form showed (an
        unchanged part of the template kept as stored) and keeps the others unless the
        channel's kind cannot take them.
        """
        form = self.state
        if self.template_listed or not editing:
            content["template"] = message_form.template_from_form(form, content.get("template"))
        elif kind != ChannelKind.WHATSAPP.value:
            content["template"] = None
        if self.tag_listed or not editing:
            content["message_tag"] = form["message_tag"] or None
        elif not message_form.tag_choices(kind):
            content["message_tag"] = None

    def audience(self) -> dict[str, Any]:
        form = self.state
        if form["selection"] == "manual":
            chosen: dict[str, Any] = {"selection": "manual", "contact_ids": sorted(form["picked"])}
        else:
            # Everyone matching, less those unticked on any page of the picker.
            chosen = {"selection": "all", "exclude_contact_ids": sorted(form["left_out"])}
        return {
            "account_ids": form["accounts"],
            "tag_ids": form["tags"],
            "tag_match": form["tag_match"],
            **chosen,
        }


Posted = Annotated[FormIn, Depends()]
Images = Annotated[list[UploadFile] | None, File()]


def _form_page(
    request: Request,
    session: SessionDep,
    who: Signed,
    form: dict[str, Any],
    *,
    editing: Broadcast | None = None,
    error: str = "",
    code: int = 200,
) -> Response:
    """The broadcast form: new, or an edit of ``editing`` (same picker, content, send time)."""
    channels = _channels(session, who.workspace_id)
    if form["channel"] not in {c.id for c in channels}:
        form["channel"] = channels[0].id if channels else 0
    accounts = list(
        session.scalars(
            select(Account)
            .where(Account.workspace_id == who.workspace_id, Account.channel_id == form["channel"])
            .order_by(Account.name)
        )
    )
    tags = list(
        session.scalars(select(Tag).where(Tag.workspace_id == who.workspace_id).order_by(Tag.name))
    )
    count = unreachable = found = 0
    contacts: list[Contact] = []
    if form["channel"]:
        spec = AudienceFilter(
            account_ids=form["accounts"], tag_ids=form["tags"], tag_match=form["tag_match"]
        )
        count = count_audience(session, who.workspace_id, form["channel"], spec)
        unreachable = count_audience(
            session, who.workspace_id, form["channel"], spec, reachable=False
        )
        listed = audience_query(who.workspace_id, form["channel"], spec).with_only_columns(
            Contact.id
        )
        if form["q"]:
            listed = listed.where(_name_or_address(form["q"]))
        found = int(
            session.execute(select(func.count()).select_from(listed.subquery())).scalar_one()
        )
        pages = max(1, -(-found // PICKER_SHOWN))
        form["ppage"] = min(max(1, form["ppage"]), pages)
        ids = listed.order_by(Contact.id).offset((form["ppage"] - 1) * PICKER_SHOWN)
        contacts = list(
            session.scalars(
                select(Contact)
                .where(Contact.id.in_(ids.limit(PICKER_SHOWN).scalar_subquery()))
                .order_by(Contact.id)
            )
        )
    kind = next((c.kind for c in channels if c.id == form["channel"]), None)
    limits = f"Up to {MAX_IMAGES} images (JPEG, PNG, WebP or GIF)"
    if kind is not None and ChannelKind(kind) in PROVIDER_IMAGES:
        types, max_bytes = PROVIDER_IMAGES[ChannelKind(kind)]
        names = ", ".join(sorted(t.removeprefix("image/").upper() for t in types))
        limits = (
            f"Up to {MAX_IMAGES} images; {message_form.kind_label(kind)} takes {names}, "
            f"at most {max_bytes // (1024 * 1024)} MB each"
        )
    kept = []
    if form["media"]:
        by_id = {
            m.id: m
            for m in session.scalars(
                select(Media).where(
                    Media.workspace_id == who.workspace_id, Media.id.in_(form["media"])
                )
            )
        }
        kept = [by_id[i] for i in form["media"] if i in by_id]
    action = f"/console/broadcasts/{editing.id}/edit" if editing else "/console/broadcasts/new"
    return page(
        request,
        "new.html",
        {
            "signed": who,
            "nav": "broadcasts",
            "form": form,
            "editing": editing,
            "action": action,
            "channels": channels,
            "accounts": accounts,
            "tags": tags,
            "count": count,
            "unreachable": unreachable,
            "contacts": contacts,
            "found": found,
            "pages": max(1, -(-found // PICKER_SHOWN)),
            "picked_list": ",".join(map(str, sorted(form["picked"]))),
            "left_out_list": ",".join(map(str, sorted(form["left_out"]))),
            "kept_media": kept,
            "image_limits": limits + ".",
            "error": error,
            **_window_fields(session, who, kind, form, editing),
        },
        code=code,
    )


@router.get("/broadcasts/new")
def new_broadcast(
    request: Request,
    session: SessionDep,
    who: Operator,
    channel: Annotated[str, Query(max_length=20)] = "",
    account: Annotated[list[str] | None, Query(max_length=1000)] = None,
    tag: Annotated[list[str] | None, Query(max_length=1000)] = None,
    tag_match: Annotated[str, Query(max_length=5)] = "any",
    name: Annotated[str, Query(max_length=200)] = "",
) -> Response:
    form = _picker_form(channel=channel, account=account, tag=tag, tag_match=tag_match, name=name)
    return _form_page(request, session, who, form)


def _store_images(
    session: SessionDep,
    settings: Settings,
    store: MediaStore,
    who: Signed,
    images: list[UploadFile] | None,
    already: int,
    stored: list[str],
) -> list[int]:
    """Store the chosen images in the order chosen; their storage keys go into ``stored``
    (for the caller to remove should the form be refused).
    """
    chosen = [f for f in images or [] if f.filename]
    if already + len(chosen) > MAX_IMAGES:
        raise ValidationFailed.one(
            "images",
            f"has {already + len(chosen)} images; a message may carry at most {MAX_IMAGES}",
        )
    media_ids = []
    for upload in chosen:
        media = create_media(
            session,
            store,
            who.workspace_id,
            filename=upload.filename or "",
            data=upload.file.read(),
            max_bytes=settings.media_max_bytes,
            max_pixels=settings.media_max_pixels,
        )
        stored.append(media.storage_key)
        media_ids.append(media.id)
    return media_ids


def _refused(
    session: SessionDep, store: MediaStore, stored: list[str], exc: BaseException
) -> DomainError:
    """Nothing of a refused or failed form stays: its rows roll back, its images go. Returns
    the refusal to show, or raises what was not one.
    """
    session.rollback()
    for key in stored:
        with contextlib.suppress(Exception):
            store.delete(key)
    if isinstance(exc, DomainError):
        return exc
    raise exc


@router.post("/broadcasts/new")
def create(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: MediaStoreDep,
    who: Operator,
    f: Posted,
    images: Images = None,
) -> Response:
    """Create a broadcast through the API's rules; refused with its words, the form kept.
    Images are stored in the order chosen; if the broadcast is refused, they go again.

    The people picker pages through everyone the filter matches (and searches them by name or
    address): ``go`` = ``search`` or ``page-N`` only draws the form again, keeping what was
    ticked on the page left (``picked``: chosen by hand; ``left_out``: unticked while
    everyone matching is in).
    """
    check_csrf(who, f.csrf_token)
    form = f.state
    if f.turned_page():
        return _form_page(request, session, who, form)
    stored: list[str] = []
    try:
        send_at = local_send_time(form["at"], form["tz"]) if form["when"] == "later" else None
        media_ids = _store_images(session, settings, store, who, images, 0, stored)
        content: dict[str, Any] = {"text": form["text"], "media_ids": media_ids}
        f.window_content(content, _kind_of(session, who, form["channel"]))
        body = {
            "name": form["name"],
            "channel_id": form["channel"],
            "audience": f.audience(),
            "content": content,
            "send_at": send_at.isoformat() if send_at else None,
            **f.extras(),
        }
        # The API's own input rules, field by field, with its words.
        try:
            valid = BroadcastCreate.model_validate(body)
        except ValidationError as exc:
            raise ValidationFailed.from_pydantic(exc) from None
        # A form sent twice (a double click, a reload) makes one broadcast.
        broadcast, _ = create_broadcast(
            session,
            who.workspace_id,
            NewBroadcast(
                name=valid.name,
                channel_id=valid.channel_id,
                audience=valid.audience,
                content=valid.content,
                send_at=valid.send_at,
                window=valid.sending_window,
                auto_pause=valid.auto_pause,
            ),
            idempotency_key=f"console-new-{form['key']}" if form["key"] else None,
            body_hash=request_hash({**body, "media": len(media_ids)}) if form["key"] else None,
        )
        session.commit()
    except BaseException as exc:
        refusal = _refused(session, store, stored, exc)
        return _form_page(request, session, who, form, error=str(refusal), code=422)
    lifecycle("created", broadcast, who.workspace_id, f", {broadcast.audience_size} recipients")
    return RedirectResponse(f"/console/broadcasts/{broadcast.id}", status.HTTP_303_SEE_OTHER)


# --- contacts, tags, channels ---------------------------------------------------------------

#: Problems of a refused import listed on the page (the count says how many there were).
PROBLEMS_SHOWN = 50


def _contacts_page(
    request: Request,
    session: SessionDep,
    who: Signed,
    *,
    report: str = "",
    refused: list[tuple[str, str]] | None = None,
    tag_error: str = "",
    q: str = "",
    cursor: str | None = None,
    code: int = 200,
) -> Response:
    channels = _channels(session, who.workspace_id)
    accounts = list(
        session.scalars(
            select(Account).where(Account.workspace_id == who.workspace_id).order_by(Account.id)
        )
    )
    tags = session.execute(
        select(Tag.id, Tag.name, func.count(ContactTag.contact_id))
        .outerjoin(ContactTag, ContactTag.tag_id == Tag.id)
        .where(Tag.workspace_id == who.workspace_id)
        .group_by(Tag.id, Tag.name)
        .order_by(Tag.name)
    ).all()
    q = " ".join(q.split())
    query = select(Contact).where(Contact.workspace_id == who.workspace_id)
    if q:
        query = query.where(_name_or_address(q))
    try:
        contacts, next_cursor = newest_first(session, query, Contact.id, PAGE_SIZE, cursor)
    except DomainError:
        contacts, next_cursor = [], None
    next_url = None
    if next_cursor:
        next_url = "/console/contacts?" + urlencode(
            [*([("q", q)] if q else []), ("cursor", next_cursor)]
        )
    return page(
        request,
        "contacts.html",
        {
            "signed": who,
            "nav": "contacts",
            "columns": ",".join(CSV_COLUMNS),
            "accounts": accounts,
            "channel_names": {c.id: c.name for c in channels},
            "tags": [(int(i), str(n), int(c)) for i, n, c in tags],
            "contacts": contacts,
            "q": q,
            "paged": cursor is not None,
            "next_url": next_url,
            "report": report,
            "refused": refused or [],
            "tag_error": tag_error,
        },
        code=code,
    )


@router.get("/contacts")
def contacts_page(
    request: Request,
    session: SessionDep,
    who: Operator,
    report: Annotated[str, Query(max_length=300)] = "",
    q: Annotated[str, Query(max_length=200)] = "",
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    return _contacts_page(request, session, who, report=_notice(report), q=q, cursor=cursor)


@router.post("/contacts/{contact_id:int}/erase")
def erase_contact_form(
    request: Request,
    session: SessionDep,
    who: Operator,
    contact_id: int,
    csrf_token: Annotated[str, Form(max_length=200)],
    confirm: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    """Erase a contact (as the API's ``DELETE /v1/contacts/{id}``), its box ticked."""
    check_csrf(who, csrf_token)
    if not 0 < contact_id <= MAX_ID:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such contact")
    if confirm != "yes":
        return _contacts_page(
            request, session, who, report="tick the box to erase the contact", code=422
        )
    try:
        erased = erase_contact(session, who.workspace_id, contact_id)
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such contact") from None
    except DomainError as exc:
        session.rollback()
        return _contacts_page(request, session, who, report=str(exc), code=409)
    session.commit()
    contact_erased(erased, who.workspace_id)
    return RedirectResponse("/console/contacts?report=contact-erased", status.HTTP_303_SEE_OTHER)


#: What a tag form did, by the ``report`` code the redirect carries (never free text).
TAG_NOTICES = {
    "tag-created": "The tag was created.",
    "tag-renamed": "The tag was renamed.",
    "tag-deleted": "The tag was deleted (from every contact).",
    "contact-erased": "The contact was erased: gone, and its address removed from every "
    "broadcast's recipients (their outcomes and counts stay).",
}


def _notice(code: str) -> str:
    return TAG_NOTICES.get(code, "")


def _tag_form(
    request: Request,
    session: SessionDep,
    who: Signed,
    name: str,
    write: Callable[[str], object],
    done: str,
) -> Response:
    """Write a tag through the API's rules; refused with its words on the contacts page."""
    try:
        try:
            valid = TagCreate.model_validate({"name": name})
        except ValidationError as exc:
            raise ValidationFailed.from_pydantic(exc) from None
        write(valid.name)
        session.commit()
    except NotFound:
        session.rollback()
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such tag") from None
    except IntegrityError:
        # Another form took the name in the same moment.
        session.rollback()
        return _contacts_page(
            request, session, who, tag_error=f"tag {name.strip()!r} already exists", code=422
        )
    except DomainError as exc:
        session.rollback()
        return _contacts_page(request, session, who, tag_error=str(exc), code=422)
    return RedirectResponse(f"/console/contacts?report={done}", status.HTTP_303_SEE_OTHER)


@router.post("/tags")
def tag_create(
    request: Request,
    session: SessionDep,
    who: Operator,
    csrf_token: Annotated[str, Form(max_length=200)],
    name: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """A new tag (a name another tag has, ignoring case, is refused)."""
    check_csrf(who, csrf_token)
    return _tag_form(
        request,
        session,
        who,
        name,
        lambda valid: create_tag(session, who.workspace_id, valid),
        "tag-created",
    )


@router.post("/tags/{tag_id:int}/rename")
def tag_rename(
    request: Request,
    session: SessionDep,
    who: Operator,
    tag_id: int,
    csrf_token: Annotated[str, Form(max_length=200)],
    name: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """A tag's new name; its contacts and the audiences naming it keep it."""
    check_csrf(who, csrf_token)
    if not 0 < tag_id <= MAX_ID:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such tag")
    return _tag_form(
        request,
        session,
        who,
        name,
        lambda valid: rename_tag(session, who.workspace_id, tag_id, valid),
        "tag-renamed",
    )


@router.post("/tags/{tag_id:int}/delete")
def tag_delete(
    request: Request,
    session: SessionDep,
    who: Operator,
    tag_id: int,
    csrf_token: Annotated[str, Form(max_length=200)],
) -> Response:
    """Delete a tag (as the API's DELETE): refused while a broadcast not yet final picks its
    audience by it.
    """
    check_csrf(who, csrf_token)
    if not 0 < tag_id <= MAX_ID:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such tag")
    try:
        delete_tag(session, who.workspace_id, tag_id)
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such tag") from None
    except DomainError as exc:
        session.rollback()
        return _contacts_page(request, session, who, tag_error=str(exc), code=409)
    session.commit()
    return RedirectResponse("/console/contacts?report=tag-deleted", status.HTTP_303_SEE_OTHER)


@router.post("/contacts/import")
async def contacts_import(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    who: Operator,
    csrf_token: Annotated[str, Form(max_length=200)],
    file: UploadFile,
) -> Response:
    """Import a CSV file as the API does (all rows or none), with a report of the result."""
    check_csrf(who, csrf_token)
    body = await file.read()

    def write() -> ImportResult | ValidationFailed:
        try:
            rows = parse_import(body, "text/csv", max_rows=settings.import_max_rows)
            result = import_contacts(session, who.workspace_id, rows)
        except ValidationFailed as exc:
            session.rollback()
            return exc
        session.commit()
        return result

    outcome = await run_in_threadpool(write)
    if isinstance(outcome, ValidationFailed):
        problems = [(e.field, e.message) for e in outcome.errors]
        return await run_in_threadpool(
            _contacts_page, request, session, who, refused=problems[:PROBLEMS_SHOWN], code=422
        )
    report = (
        f"Imported {outcome.received} rows: {outcome.created} new contacts, "
        f"{outcome.updated} updated."
    )
    return await run_in_threadpool(_contacts_page, request, session, who, report=report)


@router.get("/channels")
def channels_page(request: Request, session: SessionDep, who: Operator) -> Response:
    """The workspace's channels: name, kind, rate limit, accounts; never their secrets."""
    accounts = (
        select(func.count())
        .where(Account.channel_id == Channel.id)
        .correlate(Channel)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Channel, accounts)
        .where(Channel.workspace_id == who.workspace_id)
        .order_by(Channel.name)
    ).all()
    return page(
        request,
        "channels.html",
        {"signed": who, "nav": "channels", "channels": [(c, n) for c, n in rows]},
    )


@router.get("/audience/count")
def audience_count(
    session: SessionDep,
    who: Operator,
    channel: Annotated[str, Query(max_length=20)] = "",
    account: Annotated[list[str] | None, Query(max_length=1000)] = None,
    tag: Annotated[list[str] | None, Query(max_length=1000)] = None,
    tag_match: Annotated[str, Query(max_length=5)] = "any",
) -> Response:
    """How many contacts the picker's filter reaches now (its live count)."""
    channel_id = plain_id(channel) or 0
    owned = {c.id for c in _channels(session, who.workspace_id)}
    if channel_id not in owned:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such channel")
    spec = AudienceFilter(
        account_ids=_ids(account or []),
        tag_ids=_ids(tag or []),
        tag_match="all" if tag_match == "all" else "any",
    )
    return JSONResponse(
        {
            "count": count_audience(session, who.workspace_id, channel_id, spec),
            "unreachable": count_audience(
                session, who.workspace_id, channel_id, spec, reachable=False
            ),
        },
        headers={"Cache-Control": "no-store"},
    )


def _edit_page(
    request: Request,
    session: Session,
    who: Signed,
    b: Broadcast,
    form: dict[str, Any],
    *,
    error: str = "",
    code: int = 200,
) -> Response:
    """A broadcast whose recipients are fixed: its name, message (with its template or
    message tag, as its channel takes) and send time. A conversation's timed send (its one
    recipient and channel are the conversation's) and a retry of the failed recipients of
    another broadcast (its audience is those).
    """
    channel = session.get(Channel, b.channel_id)
    return page(
        request,
        "edit.html",
        {
            "signed": who,
            "nav": "broadcasts",
            "b": b,
            "form": form,
            "error": error,
            "retry_of": _failed_in(b),
            **_window_fields(session, who, channel.kind if channel else None, form, b),
        },
        code=code,
    )


#: The workspace's images a template's header may be picked from (the newest).
HEADER_IMAGES_SHOWN = 50


def _window_fields(
    session: Session,
    who: Signed,
    kind: str | None,
    form: dict[str, Any],
    editing: Broadcast | None,
) -> dict[str, Any]:
    """What the form's template or message-tag section needs, for a channel of ``kind``."""
    images: list[Media] = []
    if kind == ChannelKind.WHATSAPP.value:
        types, _ = PROVIDER_IMAGES[ChannelKind.WHATSAPP]
        images = list(
            session.scalars(
                select(Media)
                .where(Media.workspace_id == who.workspace_id, Media.content_type.in_(types))
                .order_by(Media.id.desc())
                .limit(HEADER_IMAGES_SHOWN)
            )
        )
        chosen = form.get("tpl_header_media") or 0
        if chosen and chosen not in {m.id for m in images}:
            found = session.get(Media, chosen) if chosen <= MAX_ID else None
            if found is not None and found.workspace_id == who.workspace_id:
                images.insert(0, found)
    stored = (editing.content or {}).get("template") if editing is not None else None
    return {
        "kind": kind,
        "header_images": images,
        "tag_choices": message_form.tag_choices(kind),
        "tag_help": message_form.tag_help(kind),
        "buttons_full": message_form.buttons_shown_in_full(stored),
    }


def _failed_in(b: Broadcast) -> int | None:
    """The broadcast whose failed recipients ``b`` goes to, if that is its audience."""
    found = (b.audience or {}).get("failed_in")
    return int(found) if found is not None else None


def _fixed_recipients(b: Broadcast) -> bool:
    """Are the channel and audience not the console's to change? (See ``_edit_page``.)"""
    return b.origin == Origin.CONVERSATION.value or _failed_in(b) is not None


def _same_audience(posted: dict[str, Any], stored: dict[str, Any] | None) -> bool:
    """Do two audiences name the same people rule (ids compared as sets)?"""

    def norm(a: dict[str, Any]) -> tuple[object, ...]:
        return (
            a.get("selection") or "all",
            a.get("tag_match") or "any",
            *(
                frozenset(a.get(k) or ())
                for k in ("account_ids", "tag_ids", "contact_ids", "exclude_contact_ids")
            ),
        )

    return norm(posted) == norm(stored or {})


def _stored_form(b: Broadcast) -> dict[str, Any]:
    """The form of a stored broadcast, as it stands."""
    audience = b.audience or {}
    content = b.content or {}
    at = b.send_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")
    return _picker_form(
        channel=str(b.channel_id),
        account=[str(i) for i in audience.get("account_ids") or []],
        tag=[str(i) for i in audience.get("tag_ids") or []],
        tag_match=str(audience.get("tag_match") or "any"),
        name=b.name,
        selection="manual" if audience.get("selection") == "manual" else "all",
        picked=set(audience.get("contact_ids") or []),
        left_out=set(audience.get("exclude_contact_ids") or []),
        text=content.get("text") or "",
        media=list(content.get("media_ids") or []),
        when="later",
        # The stored time in UTC; the operator's zone is filled in by the page's script.
        at=at,
        shown_at=at,
        tz="UTC",
        key="",
        window_start=b.window_start.strftime("%H:%M") if b.window_start else "",
        window_end=b.window_end.strftime("%H:%M") if b.window_end else "",
        pause_percent=_percent((b.auto_pause or {}).get("failure_ratio")),
        pause_last=str((b.auto_pause or {}).get("last") or ""),
        **message_form.form_from_template(content.get("template")),
        message_tag=str(content.get("message_tag") or ""),
    )


def _kind_of(session: Session, who: Signed, channel_id: int) -> str | None:
    """The kind of one of the workspace's channels (None: no such channel)."""
    return next((c.kind for c in _channels(session, who.workspace_id) if c.id == channel_id), None)


def _percent(ratio: Any) -> str:
    return "" if ratio is None else f"{float(ratio) * 100:g}"


@router.get("/broadcasts/{broadcast_id:int}/edit")
def edit_form(
    request: Request,
    session: SessionDep,
    who: Operator,
    broadcast_id: int,
    channel: Annotated[str, Query(max_length=20)] = "",
    account: Annotated[list[str] | None, Query(max_length=1000)] = None,
    tag: Annotated[list[str] | None, Query(max_length=1000)] = None,
    tag_match: Annotated[str, Query(max_length=5)] = "any",
) -> Response:
    """The broadcast's form as it stands; with a picker filter in the query (the operator
    chose another channel, accounts or tags), that filter and everyone it matches.
    """
    b = _owned(session, who, broadcast_id)
    form = _stored_form(b)
    if _fixed_recipients(b):
        return _edit_page(request, session, who, b, form)
    if plain_id(channel) in {c.id for c in _channels(session, who.workspace_id)}:
        form.update(
            _picker_form(channel=channel, account=account, tag=tag, tag_match=tag_match, name="")
            | {
                k: form[k]
                for k in (
                    "name",
                    "text",
                    "media",
                    "when",
                    "at",
                    "shown_at",
                    "tz",
                    "window_start",
                    "window_end",
                    "pause_percent",
                    "pause_last",
                    *message_form.FIELDS,
                )
            }
        )
    return _form_page(request, session, who, form, editing=b)


@router.post("/broadcasts/{broadcast_id:int}/edit")
def edit(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: MediaStoreDep,
    who: Operator,
    broadcast_id: int,
    f: Posted,
    images: Images = None,
) -> Response:
    """Change a broadcast through the API's rules (as ``PATCH``): its channel, audience,
    message and images (those kept, in their order, then the ones added), and send time. The
    send time changes only when it was changed (or set to now), so a rename of a broadcast
    due in a minute is not refused for its time. A conversation's timed send keeps its
    channel and recipient, and a retry its channel and audience (``_edit_page``).
    """
    check_csrf(who, f.csrf_token)
    b = _owned(session, who, broadcast_id)
    form = f.state
    timed = _fixed_recipients(b)
    if not timed and f.turned_page():
        return _form_page(request, session, who, form, editing=b)
    moved = form["when"] != "later" or form["at"] != form["shown_at"]
    stored: list[str] = []
    try:
        send_at = (
            local_send_time(form["at"], form["tz"]) if form["when"] == "later" and moved else None
        )
        content = dict(b.content or {})
        content["text"] = form["text"]
        target = b.channel_id if timed else form["channel"] or b.channel_id
        f.window_content(content, _kind_of(session, who, target), editing=True)
        patch: dict[str, Any] = {"name": form["name"], "content": content}
        if not timed:
            carried = list(content.get("media_ids") or [])
            kept = [i for i in form["media"] if i in carried] if f.media_listed else carried
            added = _store_images(session, settings, store, who, images, len(kept), stored)
            content["media_ids"] = kept + added
            # Only what changed is checked again: a rename is not refused because someone
            # picked by hand has opted out since.
            if form["channel"] and (
                form["channel"] != b.channel_id or not _same_audience(f.audience(), b.audience)
            ):
                patch["channel_id"] = form["channel"]
                patch["audience"] = f.audience()
        if moved:
            patch["send_at"] = send_at.isoformat() if send_at else None
        if not timed:
            patch.update(f.extras())
        try:
            valid = BroadcastPatch.model_validate(patch)
        except ValidationError as exc:
            raise ValidationFailed.from_pydantic(exc) from None
        changed = modify_broadcast(
            session,
            who.workspace_id,
            broadcast_id,
            Changes(
                fields=frozenset("window" if k == "sending_window" else k for k in patch),
                name=valid.name,
                channel_id=valid.channel_id,
                audience=valid.audience,
                content=valid.content,
                send_at=valid.send_at,
                window=valid.sending_window,
                auto_pause=valid.auto_pause,
            ),
        )
        session.commit()
    except BaseException as exc:
        refusal = _refused(session, store, stored, exc)
        if timed:
            return _edit_page(request, session, who, b, form, error=str(refusal), code=422)
        return _form_page(request, session, who, form, editing=b, error=str(refusal), code=422)
    lifecycle("changed", changed, who.workspace_id, f" ({', '.join(sorted(patch))})")
    return RedirectResponse(f"/console/broadcasts/{broadcast_id}", status.HTTP_303_SEE_OTHER)

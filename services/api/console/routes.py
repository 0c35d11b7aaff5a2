"""Console pages: sign in and out, the broadcast list (with live progress)."""

from __future__ import annotations

import contextlib
import hmac
import math
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
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
from sqlalchemy import func, select

from services.api.deps import MediaStoreDep, SessionDep, SettingsDep, plain_id
from services.api.pagination import newest_first
from services.api.routes.broadcasts import csv_export, lifecycle
from services.api.schemas import BroadcastCreate, BroadcastPatch
from shared.db.models import (
    Account,
    Broadcast,
    Channel,
    Contact,
    ContactTag,
    Conversation,
    Delivery,
    Tag,
)
from shared.domain.audience import AudienceFilter, audience_query, count_audience
from shared.domain.broadcasts import (
    Changes,
    Content,
    NewBroadcast,
    broadcasts_query,
    cancel_broadcast,
    conversation_broadcast,
    counts,
    create_broadcast,
    get_broadcast,
    modify_broadcast,
    pause_broadcast,
    recipients_query,
    recipients_removed,
    request_hash,
    resume_broadcast,
)
from shared.domain.console_sessions import SESSION_HOURS, Signed, sign_in, sign_out, signed
from shared.domain.contacts import CSV_COLUMNS, ImportResult, import_contacts, parse_import
from shared.domain.errors import DomainError, NotFound, ValidationFailed
from shared.domain.lifecycle import (
    ACTION_ALLOWED_FROM,
    BroadcastStatus,
    ChannelKind,
    DeliveryStatus,
    Origin,
)
from shared.domain.media import MAX_IMAGES, PROVIDER_IMAGES, create_media
from shared.domain.types import MAX_ID
from shared.settings import get_settings

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
ORIGIN_LABELS = {"broadcast": "Broadcast", "conversation": "Timed send"}
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


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


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
    query = broadcasts_query(who.workspace_id, statuses=status_ or (), origin=origin)
    if channel is not None:
        query = query.where(Broadcast.channel_id == channel)
    if q.strip():
        query = query.where(Broadcast.name.ilike(f"%{_escape_like(q.strip())}%", escape="\\"))
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
    if b.snapshot_at is None:
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
    why = func.coalesce(Delivery.last_error, "(no reason given)")
    rows = session.execute(
        select(why, func.count())
        .where(
            Delivery.broadcast_id == b.id,
            Delivery.part_day == b.part_day,
            Delivery.workspace_id == b.workspace_id,
            Delivery.status.in_([DeliveryStatus.FAILED.value, DeliveryStatus.PARTIAL.value]),
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
) -> Response:
    """A broadcast's page; ``notice``: why the action just tried was refused (never text
    from a link: a crafted URL cannot put words in the console's mouth).
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
            "actions": [
                (action, label)
                for action, label in ACTION_LABELS.items()
                if BroadcastStatus(b.status) in ACTION_ALLOWED_FROM[action]
            ],
            "editable": BroadcastStatus(b.status) in ACTION_ALLOWED_FROM["modify"]
            and b.started_at is None,
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
) -> Response:
    """Pause, resume or cancel, as the API does (same rules, same log lines)."""
    check_csrf(who, csrf_token)
    _owned(session, who, broadcast_id)
    do = {"pause": pause_broadcast, "resume": resume_broadcast, "cancel": cancel_broadcast}
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
    ) -> Response:
        return _act(request, action, session, who, broadcast_id, csrf_token)

    route.__name__ = action
    return route


for _action in ACTION_LABELS:
    router.add_api_route(
        f"/broadcasts/{{broadcast_id:int}}/{_action}", _action_route(_action), methods=["POST"]
    )


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
        broadcasts_query(who.workspace_id, origin=Origin.CONVERSATION)
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


def _new_page(
    request: Request,
    session: SessionDep,
    who: Signed,
    form: dict[str, Any],
    *,
    error: str = "",
    code: int = 200,
) -> Response:
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
    count = unreachable = 0
    contacts: list[Contact] = []
    if form["channel"]:
        spec = AudienceFilter(
            account_ids=form["accounts"], tag_ids=form["tags"], tag_match=form["tag_match"]
        )
        count = count_audience(session, who.workspace_id, form["channel"], spec)
        unreachable = count_audience(
            session, who.workspace_id, form["channel"], spec, reachable=False
        )
        contacts = list(
            session.scalars(
                audience_query(who.workspace_id, form["channel"], spec)
                .with_only_columns(Contact)
                .order_by(Contact.id)
                .limit(PICKER_SHOWN)
            )
        )
    kind = next((c.kind for c in channels if c.id == form["channel"]), None)
    limits = f"Up to {MAX_IMAGES} images (JPEG, PNG, WebP or GIF)"
    if kind is not None and ChannelKind(kind) in PROVIDER_IMAGES:
        types, max_bytes = PROVIDER_IMAGES[ChannelKind(kind)]
        names = ", ".join(sorted(t.removeprefix("image/").upper() for t in types))
        limits = (
            f"Up to {MAX_IMAGES} images; {kind} takes {names}, "
            f"at most {max_bytes // (1024 * 1024)} MB each"
        )
    if form["ticked"] is None:
        # First view: everyone matching is in, so every box is ticked.
        form["ticked"] = {c.id for c in contacts}
    return page(
        request,
        "new.html",
        {
            "signed": who,
            "nav": "broadcasts",
            "form": form,
            "channels": channels,
            "accounts": accounts,
            "tags": tags,
            "count": count,
            "unreachable": unreachable,
            "contacts": contacts,
            "image_limits": limits + ".",
            "error": error,
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
    form = {
        "channel": plain_id(channel) or 0,
        "accounts": _ids(account or []),
        "tags": _ids(tag or []),
        "tag_match": "all" if tag_match == "all" else "any",
        "name": name,
        "selection": "all",
        "ticked": None,
        "text": "",
        "when": "now",
        "at": "",
        "tz": "",
        "key": secrets.token_urlsafe(16),
    }
    return _new_page(request, session, who, form)


@router.post("/broadcasts/new")
def create(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: MediaStoreDep,
    who: Operator,
    csrf_token: Annotated[str, Form(max_length=200)],
    channel: Annotated[str, Form(max_length=20)] = "",
    account: Annotated[list[str] | None, Form(max_length=1000)] = None,
    tag: Annotated[list[str] | None, Form(max_length=1000)] = None,
    tag_match: Annotated[str, Form(max_length=5)] = "any",
    name: Annotated[str, Form(max_length=1000)] = "",
    selection: Annotated[str, Form(max_length=10)] = "all",
    shown: Annotated[str, Form(max_length=2_000_000)] = "",
    contact: Annotated[list[str] | None, Form(max_length=PICKER_SHOWN)] = None,
    text: Annotated[str, Form(max_length=20_000)] = "",
    when: Annotated[str, Form(max_length=10)] = "now",
    at: Annotated[str, Form(max_length=40)] = "",
    tz: Annotated[str, Form(max_length=64)] = "",
    images: Annotated[list[UploadFile] | None, File()] = None,
    form_key: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Create a broadcast through the API's rules; refused with its words, the form kept.
    Images are stored in the order chosen; if the broadcast is refused, they go again.
    """
    check_csrf(who, csrf_token)
    stored: list[str] = []
    ticked = set(_ids(contact or []))
    form: dict[str, Any] = {
        "channel": plain_id(channel) or 0,
        "accounts": _ids(account or []),
        "tags": _ids(tag or []),
        "tag_match": "all" if tag_match == "all" else "any",
        "name": name,
        "selection": "manual" if selection == "manual" else "all",
        "ticked": ticked,
        "text": text,
        "when": when,
        "at": at,
        "tz": tz,
        "key": form_key,
    }
    listed = set(_ids(shown.split(",")))
    try:
        if form["selection"] == "manual":
            audience = {"selection": "manual", "contact_ids": sorted(ticked)}
        else:
            # Everyone matching, less those shown and unticked.
            audience = {"selection": "all", "exclude_contact_ids": sorted(listed - ticked)}
        send_at = local_send_time(at, tz) if when == "later" else None
        chosen = [f for f in images or [] if f.filename]
        if len(chosen) > MAX_IMAGES:
            raise ValidationFailed.one(
                "images", f"has {len(chosen)} images; a message may carry at most {MAX_IMAGES}"
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
        body = {
            "name": name,
            "channel_id": form["channel"],
            "audience": {
                "account_ids": form["accounts"],
                "tag_ids": form["tags"],
                "tag_match": form["tag_match"],
                **audience,
            },
            "content": {"text": text, "media_ids": media_ids},
            "send_at": send_at.isoformat() if send_at else None,
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
            ),
            idempotency_key=f"console-new-{form_key}" if form_key else None,
            body_hash=request_hash({**body, "media": len(media_ids)}) if form_key else None,
        )
        session.commit()
    except BaseException as exc:
        # Nothing of a refused or failed form stays: its rows roll back, its images go.
        session.rollback()
        for key in stored:
            with contextlib.suppress(Exception):
                store.delete(key)
        if isinstance(exc, DomainError):
            return _new_page(request, session, who, form, error=str(exc), code=422)
        raise
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
    code: int = 200,
) -> Response:
    channels = _channels(session, who.workspace_id)
    accounts = list(
        session.scalars(
            select(Account).where(Account.workspace_id == who.workspace_id).order_by(Account.id)
        )
    )
    tags = session.execute(
        select(Tag.name, func.count(ContactTag.contact_id))
        .outerjoin(ContactTag, ContactTag.tag_id == Tag.id)
        .where(Tag.workspace_id == who.workspace_id)
        .group_by(Tag.id, Tag.name)
        .order_by(Tag.name)
    ).all()
    contacts = list(
        session.scalars(
            select(Contact)
            .where(Contact.workspace_id == who.workspace_id)
            .order_by(Contact.id.desc())
            .limit(PAGE_SIZE)
        )
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
            "tags": [(str(n), int(c)) for n, c in tags],
            "contacts": contacts,
            "report": report,
            "refused": refused or [],
        },
        code=code,
    )


@router.get("/contacts")
def contacts_page(
    request: Request, session: SessionDep, who: Operator, report: str = ""
) -> Response:
    return _contacts_page(request, session, who, report=report[:300])


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
    who: Signed,
    b: Broadcast,
    form: dict[str, str],
    *,
    error: str = "",
    code: int = 200,
) -> Response:
    return page(
        request,
        "edit.html",
        {"signed": who, "nav": "broadcasts", "b": b, "form": form, "error": error},
        code=code,
    )


@router.get("/broadcasts/{broadcast_id:int}/edit")
def edit_form(request: Request, session: SessionDep, who: Operator, broadcast_id: int) -> Response:
    b = _owned(session, who, broadcast_id)
    form = {
        "name": b.name,
        "text": (b.content or {}).get("text") or "",
        "when": "later",
        # The stored time in UTC; the operator's zone is filled in by the page's script.
        "at": b.send_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M"),
        "shown_at": b.send_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M"),
        "tz": "UTC",
    }
    return _edit_page(request, who, b, form)


@router.post("/broadcasts/{broadcast_id:int}/edit")
def edit(
    request: Request,
    session: SessionDep,
    who: Operator,
    broadcast_id: int,
    csrf_token: Annotated[str, Form(max_length=200)],
    name: Annotated[str, Form(max_length=1000)] = "",
    text: Annotated[str, Form(max_length=20_000)] = "",
    when: Annotated[str, Form(max_length=10)] = "later",
    at: Annotated[str, Form(max_length=40)] = "",
    shown_at: Annotated[str, Form(max_length=40)] = "",
    tz: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Change name, message and send time through the API's rules (as ``PATCH``). The send
    time changes only when it was changed (or set to now), so a rename of a broadcast due
    in a minute is not refused for its time.
    """
    check_csrf(who, csrf_token)
    b = _owned(session, who, broadcast_id)
    form = {"name": name, "text": text, "when": when, "at": at, "shown_at": shown_at, "tz": tz}
    moved = when != "later" or at != shown_at
    try:
        send_at = local_send_time(at, tz) if when == "later" and moved else None
        content = dict(b.content or {})
        content["text"] = text
        patch: dict[str, Any] = {"name": name, "content": content}
        if moved:
            patch["send_at"] = send_at.isoformat() if send_at else None
        try:
            valid = BroadcastPatch.model_validate(patch)
        except ValidationError as exc:
            raise ValidationFailed.from_pydantic(exc) from None
        changed = modify_broadcast(
            session,
            who.workspace_id,
            broadcast_id,
            Changes(
                fields=frozenset(patch),
                name=valid.name,
                content=valid.content,
                send_at=valid.send_at,
            ),
        )
    except DomainError as exc:
        session.rollback()
        return _edit_page(request, who, b, form, error=str(exc), code=422)
    session.commit()
    lifecycle("changed", changed, who.workspace_id, f" ({', '.join(sorted(patch))})")
    return RedirectResponse(f"/console/broadcasts/{broadcast_id}", status.HTTP_303_SEE_OTHER)

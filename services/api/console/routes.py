"""Console pages: sign in and out, the broadcast list (with live progress)."""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from services.api.deps import SessionDep
from services.api.pagination import newest_first
from shared.db.models import Broadcast, Channel
from shared.domain.broadcasts import broadcasts_query, counts
from shared.domain.console_sessions import SESSION_HOURS, Signed, sign_in, sign_out, signed
from shared.domain.errors import DomainError
from shared.domain.lifecycle import BroadcastStatus, Origin
from shared.domain.types import MAX_ID

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
    return request.url.scheme == "https"


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
    channel = int(channel_) if channel_.isdigit() and 0 < int(channel_) <= MAX_ID else None
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

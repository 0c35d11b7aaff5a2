"""Sessions of the web console: signing in with an API token, out, and who a request is.

The browser never holds the API token: signing in checks it and makes a session whose random
id goes in an HttpOnly cookie. A session lives ``SESSION_HOURS`` at most, and only while the
token it was opened with is live (not revoked, not expired).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from shared.db.models import ApiToken, ConsoleSession, Workspace
from shared.domain.tokens import hash_token, token_live

#: The longest a console session lasts; signing in again makes a new one.
SESSION_HOURS = 12


@dataclass(frozen=True)
class Signed:
    """Who a console request comes from."""

    workspace_id: int
    workspace_name: str
    csrf_token: str


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def sign_in(session: Session, token: str) -> tuple[str, Signed] | None:
    """A new session for a live API token: (the session id for the cookie, who it is), or
    None for a token that is unknown, revoked or expired. Expired sessions are cleared.
    """
    row = session.execute(
        select(ApiToken.id, ApiToken.workspace_id, Workspace.name)
        .join(Workspace, Workspace.id == ApiToken.workspace_id)
        .where(
            ApiToken.token_hash == hash_token(token),
            token_live(),
        )
    ).one_or_none()
    if row is None:
        return None
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < func.now()))
    session_id = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    session.add(
        ConsoleSession(
            id_hash=_digest(session_id),
            api_token_id=row.id,
            workspace_id=row.workspace_id,
            csrf_token=csrf,
            expires_at=func.now() + timedelta(hours=SESSION_HOURS),
        )
    )
    session.flush()
    return session_id, Signed(int(row.workspace_id), str(row.name), csrf)


def signed(session: Session, session_id: str) -> Signed | None:
    """Who holds ``session_id``: None when the session is unknown or over, or its token no
    longer live.
    """
    row = session.execute(
        select(ConsoleSession.workspace_id, ConsoleSession.csrf_token, Workspace.name)
        .join(ApiToken, ApiToken.id == ConsoleSession.api_token_id)
        .join(Workspace, Workspace.id == ConsoleSession.workspace_id)
        .where(
            ConsoleSession.id_hash == _digest(session_id),
            ConsoleSession.expires_at > func.now(),
            token_live(),
        )
    ).one_or_none()
    if row is None:
        return None
    return Signed(int(row.workspace_id), str(row.name), str(row.csrf_token))


def sign_out(session: Session, session_id: str) -> None:
    session.execute(delete(ConsoleSession).where(ConsoleSession.id_hash == _digest(session_id)))

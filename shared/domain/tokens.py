"""API tokens: made once, shown once, stored as a SHA-256 digest."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.db.models import ApiToken, Workspace
from shared.domain.media import new_signing_key
from shared.secrets_box import SecretsBox, get_secrets_box

#: Every token starts with this, so a leaked one is easy to recognise in a scan.
TOKEN_PREFIX = "bcast_"  # noqa: S105 - a public marker, not a secret


def hash_token(token: str) -> str:
    """The stored form of a token. Tokens carry 256 random bits, so a plain digest suffices."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class NewToken:
    workspace_id: int
    token_id: int
    token: str


def ensure_workspace(session: Session, name: str, box: SecretsBox | None = None) -> int:
    """The id of the workspace called ``name``, created if it does not exist yet (with a new
    media signing key, sealed by ``box``, the process's box by default).
    """
    name = name.strip()
    if not name:
        raise ValueError("workspace name must not be blank")
    signing_key = (box or get_secrets_box()).seal(new_signing_key())
    session.execute(
        insert(Workspace).values(name=name, signing_key=signing_key).on_conflict_do_nothing()
    )
    return session.execute(select(Workspace.id).where(Workspace.name == name)).scalar_one()


def create_token(session: Session, workspace_name: str, token_name: str = "") -> NewToken:
    """Make a token for the workspace (created if needed). The plain token exists only here."""
    workspace_id = ensure_workspace(session, workspace_name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        workspace_id=workspace_id,
        name=token_name,
        token_hash=hash_token(token),
        prefix=token[: len(TOKEN_PREFIX) + 6],
    )
    session.add(row)
    session.flush()
    return NewToken(workspace_id=workspace_id, token_id=row.id, token=token)


def workspace_for_token(session: Session, token: str) -> int | None:
    """The workspace a live token belongs to, or None; notes when the token was last used."""
    row = session.execute(
        select(ApiToken.id, ApiToken.workspace_id, ApiToken.last_used_at).where(
            ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None)
        )
    ).one_or_none()
    if row is None:
        return None
    # Touch at most once a minute so busy clients do not turn every read into a write.
    session.execute(
        update(ApiToken)
        .where(
            ApiToken.id == row.id,
            (ApiToken.last_used_at.is_(None))
            | (ApiToken.last_used_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 1)),
        )
        .values(last_used_at=func.now())
    )
    return int(row.workspace_id)

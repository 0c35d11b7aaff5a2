"""API tokens: made once, shown once, stored as a SHA-256 digest; listed, revoked, expiring."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, true, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.db.models import ApiToken, Workspace
from shared.domain.errors import NotFound
from shared.domain.media import new_signing_key
from shared.domain.types import MAX_ID
from shared.secrets_box import SecretsBox, get_secrets_box

#: Every token starts with this, so a leaked one is easy to recognise in a scan.
TOKEN_PREFIX = "bcast_"  # noqa: S105 - a public marker, not a secret
#: Characters of a token kept in the clear (``bcast_`` and 6 more) to tell tokens apart.
SHOWN_PREFIX_LENGTH = len(TOKEN_PREFIX) + 6

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class TokenNotFound(LookupError):
    """No token matches what the operator named."""


class TokenAmbiguous(LookupError):
    """More than one token has the prefix the operator named."""


def hash_token(token: str) -> str:
    """The stored form of a token. Tokens carry 256 random bits, so a plain digest suffices."""
    return hashlib.sha256(token.encode()).hexdigest()


#: Longest lifetime a token may be given.
MAX_LIFETIME = timedelta(days=100 * 365)


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a sum such as ``1d12h``, as a timedelta.
    Raises ``ValueError`` saying what is allowed.
    """
    value = text.strip().lower()
    parts = _DURATION.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ValueError(
            f"{text!r} is not a duration; use a number and a unit (s, m, h, d, w), "
            "e.g. 30d, 12h, 90m or 1d12h"
        )
    duration = timedelta()
    try:
        for number, unit in parts:
            duration += timedelta(**{_UNITS[unit]: int(number)})
        if duration > MAX_LIFETIME:
            raise OverflowError
    except OverflowError:
        raise ValueError(
            f"{text!r} is longer than a token may live ({MAX_LIFETIME.days // 365} years)"
        ) from None
    if duration <= timedelta(0):
        raise ValueError(f"{text!r} is not a duration: it must be longer than zero")
    return duration


@dataclass(frozen=True)
class NewToken:
    workspace_id: int
    token_id: int
    token: str
    expires_at: datetime | None = None


@dataclass(frozen=True)
class TokenInfo:
    """What may be shown about a token: never the token or its digest."""

    id: int
    workspace: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


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


def check_expiry(expires_at: datetime | None) -> None:
    """A ``ValueError`` saying what is wrong with an expiry: naive, past, or too far."""
    if expires_at is None:
        return
    if expires_at.tzinfo is None:
        raise ValueError("the expiry needs a time zone (e.g. 2030-01-31T12:00:00+00:00)")
    now = datetime.now(UTC)
    if expires_at <= now:
        raise ValueError(f"the expiry {expires_at.isoformat()} is not in the future")
    if expires_at - now > MAX_LIFETIME:
        raise ValueError(
            f"the expiry {expires_at.isoformat()} is further ahead than a token may live "
            f"({MAX_LIFETIME.days // 365} years)"
        )


def create_token(
    session: Session,
    workspace_name: str,
    token_name: str = "",
    *,
    expires_at: datetime | None = None,
) -> NewToken:
    """Make a token for the workspace (created if needed), valid until ``expires_at`` (aware;
    None: until revoked). The plain token exists only here.
    """
    check_expiry(expires_at)
    return new_token(
        session, ensure_workspace(session, workspace_name), token_name, expires_at=expires_at
    )


def new_token(
    session: Session,
    workspace_id: int,
    token_name: str = "",
    *,
    expires_at: datetime | None = None,
) -> NewToken:
    """Make a token for an existing workspace (``expires_at`` checked by the caller)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        workspace_id=workspace_id,
        name=token_name,
        token_hash=hash_token(token),
        prefix=token[:SHOWN_PREFIX_LENGTH],
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return NewToken(workspace_id=workspace_id, token_id=row.id, token=token, expires_at=expires_at)


def list_tokens(session: Session, workspace_name: str | None = None) -> list[TokenInfo]:
    """Every token (of one workspace, when named), oldest first."""
    if workspace_name is None:
        return _infos(session, true())
    return _infos(session, Workspace.name == workspace_name.strip())


def _by_ref(session: Session, ref: str) -> int:
    """The id of the token with id ``ref`` or the shown prefix ``ref`` (``bcast_`` and 6 more
    characters, as ``bcast token list`` shows it), locked. Raises ``TokenNotFound`` or
    ``TokenAmbiguous``.
    """
    ref = ref.strip()
    if ref.isascii() and ref.isdigit():
        if not 0 < int(ref) <= MAX_ID:
            raise TokenNotFound(f"no token has the id {ref}; see `bcast token list`")
        where = ApiToken.id == int(ref)
    elif ref.startswith(TOKEN_PREFIX) and len(ref) == SHOWN_PREFIX_LENGTH:
        where = ApiToken.prefix == ref
    else:
        raise TokenNotFound(
            f"{ref!r} is neither a token id nor a token prefix ({TOKEN_PREFIX} and 6 more "
            "characters); see `bcast token list`"
        )
    ids = session.execute(select(ApiToken.id).where(where).with_for_update()).scalars().all()
    if not ids:
        raise TokenNotFound(f"no token has the id or prefix {ref!r}; see `bcast token list`")
    if len(ids) > 1:
        listed = ", ".join(str(i) for i in sorted(ids))
        raise TokenAmbiguous(
            f"{len(ids)} tokens have the prefix {ref!r} (ids {listed}); revoke or change it by its id"
        )
    return int(ids[0])


def revoke_token(session: Session, ref: str) -> tuple[TokenInfo, bool]:
    """Revoke the token ``ref`` names (see ``_by_ref``). Returns the token and whether this
    call revoked it (False: it already was).
    """
    token_id = _by_ref(session, ref)
    revoked = session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(ApiToken.id)
    ).scalar_one_or_none()
    return token_info(session, token_id), revoked is not None


#: ``change_token``'s expiry left as it is.
KEEP = object()


def change_token(
    session: Session, ref: str, *, name: str | None = None, expires_at: Any = KEEP
) -> TokenInfo:
    """Rename the token ``ref`` names, or give it a new expiry (aware; None: never). A
    revoked token is not changed: ``ValueError``.
    """
    token_id = _by_ref(session, ref)
    row = session.get(ApiToken, token_id)
    assert row is not None
    if row.revoked_at is not None:
        raise ValueError(f"token {token_id} is revoked; make a new one")
    if name is not None:
        row.name = name
    if expires_at is not KEEP:
        check_expiry(expires_at)
        row.expires_at = expires_at
    session.flush()
    return token_info(session, token_id)


def workspace_tokens(session: Session, workspace_id: int) -> list[TokenInfo]:
    """A workspace's tokens, oldest first."""
    return _infos(session, ApiToken.workspace_id == workspace_id)


def workspace_token(session: Session, workspace_id: int, token_id: int) -> ApiToken:
    """One of the workspace's tokens, locked; ``NotFound`` for any other."""
    row = session.execute(
        select(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.workspace_id == workspace_id)
        .with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise NotFound("token", token_id)
    return row


def token_info(session: Session, token_id: int) -> TokenInfo:
    [info] = _infos(session, ApiToken.id == token_id)
    return info


def token_id_of(session: Session, token: str) -> int | None:
    """The id of the token whose plain value this is."""
    return session.execute(
        select(ApiToken.id).where(ApiToken.token_hash == hash_token(token))
    ).scalar_one_or_none()


def _infos(session: Session, where: ColumnElement[bool]) -> list[TokenInfo]:
    query = (
        select(
            ApiToken.id,
            Workspace.name.label("workspace"),
            ApiToken.name,
            ApiToken.prefix,
            ApiToken.created_at,
            ApiToken.last_used_at,
            ApiToken.expires_at,
            ApiToken.revoked_at,
        )
        .join(Workspace, Workspace.id == ApiToken.workspace_id)
        .where(where)
        .order_by(ApiToken.id)
    )
    return [TokenInfo(**row._asdict()) for row in session.execute(query)]


def token_live() -> ColumnElement[bool]:
    """The condition on ``api_token`` rows that may still be used: not revoked, not expired."""
    return and_(
        ApiToken.revoked_at.is_(None),
        or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > func.now()),
    )


def workspace_for_token(session: Session, token: str) -> int | None:
    """The workspace a live token belongs to (not revoked, not expired), or None; notes when
    the token was last used.
    """
    row = session.execute(
        select(ApiToken.id, ApiToken.workspace_id, ApiToken.last_used_at).where(
            ApiToken.token_hash == hash_token(token), token_live()
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

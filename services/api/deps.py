"""Dependencies every route can ask for: a database session and the caller's workspace."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BeforeValidator
from sqlalchemy.orm import Session

from shared.db.engine import get_sessionmaker
from shared.domain.errors import FieldError, ValidationFailed
from shared.domain.tokens import workspace_for_token
from shared.domain.types import MAX_ID
from shared.media_store import MediaStore
from shared.secrets_box import SecretsBox, get_secrets_box
from shared.settings import Settings, get_settings


def get_session() -> Iterator[Session]:
    """A session for one request. Writes commit explicitly in the route; anything not
    committed is rolled back when the request ends.
    """
    with get_sessionmaker()() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
_DIGITS = re.compile(r"[1-9][0-9]{0,15}")


def plain_id(value: str) -> int | None:
    """``value`` as a row id if it is one spelled plainly (1 to ``MAX_ID``), else None: for
    form fields and filters that ignore what is not an id rather than refuse it.
    """
    if _DIGITS.fullmatch(value) and int(value) <= MAX_ID:
        return int(value)
    return None


def _plain_digits(value: object) -> object:
    # int() would also take " 1", "+1", "01" and "1_0": an id is spelled one way only.
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("must be an id: digits only, no sign, spaces or leading zeros")
    return value


#: A row id in a path: 1 to ``MAX_ID``, in plain digits.
PathId = Annotated[int, Path(gt=0, le=MAX_ID), BeforeValidator(_plain_digits)]
#: A row id in a query filter.
QueryId = Annotated[int | None, Query(gt=0, le=MAX_ID), BeforeValidator(_plain_digits)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SecretsBoxDep = Annotated[SecretsBox, Depends(get_secrets_box)]

bearer = HTTPBearer(auto_error=False, description="A token from `bcast token create`.")


def current_workspace(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> int:
    """The workspace of the bearer token, or 401."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    workspace_id = workspace_for_token(session, credentials.credentials)
    if workspace_id is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid, expired or revoked bearer token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    session.commit()
    return workspace_id


CurrentWorkspace = Annotated[int, Depends(current_workspace)]


def get_media_store(request: Request) -> MediaStore:
    """The media store the app was built with (see ``create_app``)."""
    store: MediaStore = request.app.state.media_store
    return store


MediaStoreDep = Annotated[MediaStore, Depends(get_media_store)]


class StrictQueryRoute(APIRoute):
    """A route that refuses a query parameter it does not take, with a 422 naming it and what
    it takes, rather than ignore it: a misspelt filter (``?stauts=failed``) would otherwise
    answer with everything, unfiltered.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        known = sorted(_query_names(self.dependant))

        async def route(request: Request) -> Response:
            if "authorization" not in request.headers:
                # Not signed: the route answers 401 before anything about its parameters.
                return await handler(request)
            unknown = [k for k in dict.fromkeys(request.query_params.keys()) if k not in known]
            if unknown:
                takes = f"it takes {', '.join(known)}" if known else "it takes none"
                raise ValidationFailed(
                    [
                        FieldError(
                            name[:100],
                            f"is not a query parameter of this route; {takes}",
                            "unknown_parameter",
                        )
                        for name in unknown[:10]
                    ]
                )
            return await handler(request)

        return route


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route takes, its dependencies' included."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names

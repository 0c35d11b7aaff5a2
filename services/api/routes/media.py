"""Image uploads for message content."""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, Response, UploadFile, status
from sqlalchemy import select

from services.api.deps import (
    CurrentWorkspace,
    MediaStoreDep,
    PathId,
    SecretsBoxDep,
    SessionDep,
    SettingsDep,
    StrictQueryRoute,
)
from services.api.pagination import Cursor, Limit, newest_first
from services.api.schemas import MediaOut, Page
from shared.db.models import Media, Workspace
from shared.db.sql import owned
from shared.domain.media import create_media, signature_valid
from shared.domain.removal import delete_media
from shared.domain.types import MAX_ID
from shared.logsafe import error_text

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/media", tags=["media"], route_class=StrictQueryRoute)


@router.post("", status_code=status.HTTP_201_CREATED)
def upload(
    file: Annotated[UploadFile, File(description="A JPEG, PNG, WebP or GIF image.")],
    session: SessionDep,
    workspace: CurrentWorkspace,
    store: MediaStoreDep,
    settings: SettingsDep,
) -> MediaOut:
    """Upload one image. Its content is decoded to prove what it is; the filename and the
    declared type are not trusted.
    """
    data = file.file.read()
    media = create_media(
        session,
        store,
        workspace,
        filename=file.filename or "",
        data=data,
        max_bytes=settings.media_max_bytes,
        max_pixels=settings.media_max_pixels,
    )
    try:
        session.commit()
    except BaseException:
        store.delete(media.storage_key)
        raise
    return MediaOut.model_validate(media)


@router.get("")
def list_media(
    session: SessionDep, workspace: CurrentWorkspace, limit: Limit = 100, cursor: Cursor = None
) -> Page[MediaOut]:
    """The workspace's images, newest first."""
    query = select(Media).where(Media.workspace_id == workspace)
    rows, next_cursor = newest_first(session, query, Media.id, limit, cursor)
    return Page(items=[MediaOut.model_validate(m) for m in rows], next_cursor=next_cursor)


@router.delete(
    "/{media_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={409: {"description": "A broadcast not yet final carries it."}},
)
def remove_media(
    media_id: PathId, session: SessionDep, workspace: CurrentWorkspace, store: MediaStoreDep
) -> Response:
    """Delete an image and its stored file. Refused (409, naming them) while a broadcast not
    yet final carries it; final ones keep its id in their content, and a clone of one is
    told the image is gone.
    """
    media = delete_media(session, workspace, media_id)
    session.commit()
    try:
        store.delete(media.storage_key)
    except Exception as exc:  # the row is gone: the file is an orphan, not a leak of data
        log.warning(
            "media %s: its stored file could not be removed (%s)",
            media_id,
            error_text(exc),
            extra={"event": "media_file_kept", "media_id": media_id, "workspace_id": workspace},
        )
    log.info(
        "media %s deleted",
        media_id,
        extra={"event": "media_deleted", "media_id": media_id, "workspace_id": workspace},
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{media_id}")
def read_media(media_id: PathId, session: SessionDep, workspace: CurrentWorkspace) -> MediaOut:
    return MediaOut.model_validate(_media(session, workspace, media_id))


@router.get("/{media_id}/content", response_class=Response)
def media_content(
    media_id: PathId, session: SessionDep, workspace: CurrentWorkspace, store: MediaStoreDep
) -> Response:
    """The image bytes, for the operator's console."""
    media = _media(session, workspace, media_id)
    return Response(store.get(media.storage_key), media_type=media.content_type)


def _media(session: SessionDep, workspace: int, media_id: int) -> Media:
    return owned(session, Media, media_id, workspace, "media")


public_router = APIRouter(tags=["media"])


@public_router.get(
    "/media/{media_id}",
    response_class=Response,
    responses={403: {"description": "The signature is wrong or the URL has expired."}},
)
def signed_media(
    media_id: PathId,
    expires: Annotated[int, Query(ge=0, le=MAX_ID, description="Unix time the URL expires.")],
    signature: Annotated[str, Query(max_length=128)],
    session: SessionDep,
    store: MediaStoreDep,
    box: SecretsBoxDep,
) -> Response:
    """An image at the expiring signed URL given to providers in outgoing messages."""
    row = session.execute(
        select(Media, Workspace.signing_key)
        .join(Workspace, Workspace.id == Media.workspace_id)
        .where(Media.id == media_id)
    ).one_or_none()
    if row is None or not signature_valid(
        box.open(row[1]), media_id, expires, signature, now=time.time()
    ):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid or expired media link")
    media = row[0]
    return Response(
        store.get(media.storage_key),
        media_type=media.content_type,
        headers={"Cache-Control": "private, max-age=3600"},
    )

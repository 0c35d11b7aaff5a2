"""Uploaded images: checked for what they really are, stored, and recorded."""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets
import threading
import uuid
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import Media
from shared.db.sql import in_ids
from shared.domain.errors import FieldError, ValidationFailed
from shared.domain.lifecycle import ChannelKind
from shared.domain.types import check_one_line
from shared.media_store import MediaStore

#: Pillow format name -> the content type providers are told.
ALLOWED_FORMATS = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
#: Most images one message may carry.
MAX_IMAGES = 10
#: Longest side of an image, in pixels (Telegram refuses photos whose sides sum past 10,000).
MAX_SIDE = 10_000
#: Most frames of an animated image (each is decoded to check it).
MAX_FRAMES = 200
#: Images decoded at once per process: each may take ``4 x max_pixels`` bytes while it is.
_DECODING = threading.BoundedSemaphore(2)


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int


def inspect_image(
    data: bytes, *, max_bytes: int, max_pixels: int, field: str = "file"
) -> ImageInfo:
    """Decode ``data`` and say what image it is; refuse anything that is not a whole image
    of an allowed format within the size limits. The filename and declared type are ignored.
    """
    allowed = ", ".join(sorted(ALLOWED_FORMATS.values()))
    if not data:
        raise ValidationFailed.one(field, "is empty; upload an image file", "empty_file")
    if len(data) > max_bytes:
        raise ValidationFailed.one(
            field,
            f"is {len(data):,} bytes; images may be at most {max_bytes:,} bytes",
            "too_large",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format or ""
                width, height = probe.size
                if fmt not in ALLOWED_FORMATS:
                    raise ValidationFailed.one(
                        field,
                        f"is a {fmt or 'unknown'} image; allowed: {allowed}",
                        "unsupported_image",
                    )
                # The header's size is checked before a single pixel is decoded: a small file
                # can claim a huge image (a decompression bomb).
                if width * height > max_pixels or max(width, height) > MAX_SIDE:
                    raise ValidationFailed.one(
                        field,
                        f"is {width}x{height} pixels; images may have at most "
                        f"{max_pixels:,} pixels and {MAX_SIDE:,} on a side",
                        "too_many_pixels",
                    )
                probe.verify()
            # verify() checks structure only; decoding every pixel proves the image is whole.
            with _DECODING, Image.open(io.BytesIO(data)) as image:
                frames = int(getattr(image, "n_frames", 1))
                if frames > MAX_FRAMES:
                    raise ValidationFailed.one(
                        field,
                        f"has {frames} frames; animations may have at most {MAX_FRAMES}",
                        "too_many_frames",
                    )
                image.load()
    except ValidationFailed:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValidationFailed.one(
            field,
            f"claims more pixels than Pillow will decode; images may have at most "
            f"{max_pixels:,} pixels and {MAX_SIDE:,} on a side",
            "too_many_pixels",
        ) from None
    except UnidentifiedImageError:
        raise ValidationFailed.one(
            field, f"is not an image; allowed: {allowed}", "not_an_image"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValidationFailed.one(
            field, f"is a damaged or truncated image ({exc})", "damaged_image"
        ) from None
    return ImageInfo(ALLOWED_FORMATS[fmt], width, height)


def create_media(
    session: Session,
    store: MediaStore,
    workspace_id: int,
    *,
    filename: str,
    data: bytes,
    max_bytes: int,
    max_pixels: int,
) -> Media:
    """Check and store an upload, then record it. If the row cannot be written the stored
    bytes are removed again, so nothing is left half-written.
    """
    try:
        check_one_line(filename)
    except ValueError as exc:
        raise ValidationFailed.one("file.filename", str(exc), "control_character") from None
    info = inspect_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    key = f"{workspace_id}/{uuid.uuid4().hex}"
    store.put(key, data)
    try:
        media = Media(
            workspace_id=workspace_id,
            content_type=info.content_type,
            size_bytes=len(data),
            width=info.width,
            height=info.height,
            sha256=hashlib.sha256(data).hexdigest(),
            storage_key=key,
            filename=filename[:255],
        )
        session.add(media)
        session.flush()
    except BaseException:
        store.delete(key)
        raise
    return media


#: What each provider takes as an image, and how large (None: anything uploadable).
PROVIDER_IMAGES: dict[ChannelKind, tuple[frozenset[str], int]] = {
    ChannelKind.WHATSAPP: (frozenset({"image/jpeg", "image/png"}), 5 * 1024 * 1024),
    ChannelKind.TELEGRAM: (frozenset({"image/jpeg", "image/png", "image/webp"}), 10 * 1024 * 1024),
    # The same URL serves as LINE's preview image, which may be at most 1 MB.
    ChannelKind.LINE: (frozenset({"image/jpeg", "image/png"}), 1024 * 1024),
    ChannelKind.MESSENGER: (frozenset({"image/jpeg", "image/png", "image/gif"}), 25 * 1024 * 1024),
    ChannelKind.INSTAGRAM: (frozenset({"image/jpeg", "image/png"}), 8 * 1024 * 1024),
}


def check_media_ids(
    session: Session,
    workspace_id: int,
    media_ids: list[int],
    *,
    field: str,
    kind: ChannelKind | None = None,
) -> None:
    """Every id must be an upload of this workspace; at most ``MAX_IMAGES``, no repeats; and
    each image of a type and size the channel's provider takes.
    """
    if len(media_ids) > MAX_IMAGES:
        raise ValidationFailed.one(
            field,
            f"has {len(media_ids)} images; a message may carry at most {MAX_IMAGES}",
            "too_many_images",
        )
    errors = [
        FieldError(f"{field}[{i}]", f"media {mid} appears twice", "duplicate")
        for i, mid in enumerate(media_ids)
        if mid in media_ids[:i]
    ]
    if media_ids:
        known = {
            row.id: row
            for row in session.execute(
                select(Media.id, Media.content_type, Media.size_bytes).where(
                    Media.workspace_id == workspace_id, in_ids(Media.id, media_ids)
                )
            )
        }
        errors += [
            FieldError(f"{field}[{i}]", f"media {mid} not found", "not_found")
            for i, mid in enumerate(media_ids)
            if mid not in known
        ]
        if kind in PROVIDER_IMAGES:
            types, max_bytes = PROVIDER_IMAGES[kind]
            allowed = ", ".join(sorted(types))
            for i, mid in enumerate(media_ids):
                media = known.get(mid)
                if media is not None and media.content_type not in types:
                    errors.append(
                        FieldError(
                            f"{field}[{i}]",
                            f"media {mid} is {media.content_type}; {kind.value} takes {allowed}",
                            "unsupported_by_channel",
                        )
                    )
                elif media is not None and media.size_bytes > max_bytes:
                    errors.append(
                        FieldError(
                            f"{field}[{i}]",
                            f"media {mid} is {media.size_bytes:,} bytes; {kind.value} takes "
                            f"images up to {max_bytes:,} bytes",
                            "too_large_for_channel",
                        )
                    )
    if errors:
        raise ValidationFailed(errors)


#: How long a media URL handed to a provider stays valid.
MEDIA_URL_TTL_SECONDS = 7 * 24 * 3600


def new_signing_key() -> str:
    """A fresh workspace signing key: 256 random bits as hex. It is stored sealed (see
    ``shared.secrets_box``) and opened only to sign or check a URL.
    """
    return secrets.token_hex(32)


def media_signature(signing_key: str, media_id: int, expires: int) -> str:
    """HMAC-SHA256 over the media id and expiry, with the workspace's signing key."""
    message = f"{media_id}:{expires}".encode()
    return hmac.new(signing_key.encode(), message, hashlib.sha256).hexdigest()


def signed_media_url(base_url: str, signing_key: str, media_id: int, *, now: float) -> str:
    """An expiring URL at which the API serves the image to a provider without a token."""
    expires = int(now) + MEDIA_URL_TTL_SECONDS
    signature = media_signature(signing_key, media_id, expires)
    return f"{base_url.rstrip('/')}/media/{media_id}?expires={expires}&signature={signature}"


def signature_valid(
    signing_key: str, media_id: int, expires: int, signature: str, *, now: float
) -> bool:
    """True when the signature is this key's for this media and the URL has not expired."""
    if expires < now or not signature.isascii():
        return False
    return hmac.compare_digest(media_signature(signing_key, media_id, expires), signature)

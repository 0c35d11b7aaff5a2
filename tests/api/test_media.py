"""Image uploads are judged by their content, never by their name or declared type."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from shared.db.engine import transaction
from shared.db.models import Media
from tests.conftest import Api


def image_bytes(fmt: str, size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, fmt)
    return buf.getvalue()


def media_rows(workspace_id: int) -> int:
    with transaction() as session:
        return int(
            session.execute(
                select(func.count()).select_from(Media).where(Media.workspace_id == workspace_id)
            ).scalar_one()
        )


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_upload_an_image(api: Api, fmt: str, content_type: str, media_dir: Path) -> None:
    data = image_bytes(fmt)
    media = api.ok(
        "post", "/v1/media", 201, files={"file": ("photo.bin", data, "application/octet-stream")}
    )
    assert media["content_type"] == content_type
    assert (media["width"], media["height"], media["size_bytes"]) == (8, 6, len(data))
    assert api.get(f"/v1/media/{media['id']}/content").content == data
    assert any(media_dir.rglob("*")), "the bytes are on disk"


def test_text_file_renamed_png_is_refused(api: Api) -> None:
    response = api.post(
        "/v1/media", files={"file": ("cat.png", b"just some text, honestly", "image/png")}
    )
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["field"] == "file"
    assert "not an image" in error["msg"]
    assert media_rows(api.workspace_id) == 0


def test_truncated_image_is_refused(api: Api) -> None:
    data = image_bytes("PNG", (64, 64))
    response = api.post("/v1/media", files={"file": ("a.png", data[: len(data) // 2], "image/png")})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "file"


def test_unsupported_image_format_is_refused(api: Api) -> None:
    response = api.post("/v1/media", files={"file": ("a.bmp", image_bytes("BMP"), "image/bmp")})
    assert response.status_code == 422
    assert "BMP" in response.json()["detail"][0]["msg"]


def test_oversize_image_is_refused_with_the_limit(api: Api) -> None:
    side = 1400  # random pixels do not compress: about 5.9 MB as PNG, over the 5 MiB limit
    noise = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    noise.save(buf, "PNG", compress_level=0)
    response = api.post("/v1/media", files={"file": ("big.png", buf.getvalue(), "image/png")})
    assert response.status_code == 422
    assert "at most 5,242,880 bytes" in response.json()["detail"][0]["msg"]
    assert media_rows(api.workspace_id) == 0


def test_upload_without_a_file_names_the_field(api: Api) -> None:
    response = api.post("/v1/media", data={"other": "x"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "file"

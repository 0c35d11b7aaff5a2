"""Media in an S3-compatible store: a real S3 API server on loopback (moto's server mode)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator

import boto3
import pytest
from fastapi import FastAPI
from PIL import Image

from bench.ports import free_port
from shared.media_store import S3MediaStore, make_media_store
from shared.settings import Settings
from tests.conftest import Api
from tests.serving import wait_until_up


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, "the S3 server")
    yield url
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def store(s3_url: str) -> S3MediaStore:
    settings = Settings(
        media_store="s3",
        s3_bucket="bcast-media",
        s3_endpoint_url=s3_url,
        s3_access_key_id="test",
        s3_secret_access_key="test",
    )
    boto3.client(
        "s3",
        endpoint_url=s3_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket="bcast-media")
    made = make_media_store(settings)
    assert isinstance(made, S3MediaStore)
    return made


def test_put_get_delete(store: S3MediaStore) -> None:
    store.put("1/abc", b"image bytes")
    assert store.get("1/abc") == b"image bytes"
    store.delete("1/abc")
    with pytest.raises(FileNotFoundError):
        store.get("1/abc")


def test_uploads_go_to_the_bucket_and_are_served_back(
    app: FastAPI, api: Api, store: S3MediaStore
) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), "blue").save(buf, "PNG")
    before = app.state.media_store
    app.state.media_store = store
    try:
        media = api.ok(
            "post", "/v1/media", 201, files={"file": ("a.png", buf.getvalue(), "image/png")}
        )
        assert api.get(f"/v1/media/{media['id']}/content").content == buf.getvalue()
    finally:
        app.state.media_store = before
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket="bcast-media")["Contents"]]
    assert any(k.startswith(f"media/{api.workspace_id}/") for k in keys)


def test_s3_needs_a_bucket() -> None:
    with pytest.raises(ValueError, match="BCAST_S3_BUCKET"):
        Settings(media_store="s3")

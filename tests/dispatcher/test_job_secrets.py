"""A dispatcher decrypts a channel's secrets and its workspace's signing key when it loads a
broadcast: the adapter gets the plain secret, media URLs verify at the API, legacy plain rows
work, and a key it cannot use is a clear error that names no secret.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import text

from services.dispatcher.channels.webhook import WebhookAdapter
from services.dispatcher.jobs import ChannelUnusable, Job, load_job
from services.dispatcher.runtime import Runtime
from shared.db.engine import transaction
from shared.secrets_box import SecretsBox, new_key
from shared.settings import Settings
from tests.conftest import Api

SECRET = "s3cret-webhook-key-0001"  # what Api.channel("webhook") configures


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings.model_copy(update={"dispatcher_db_connections": 2}))
    rt.open()
    yield rt
    rt.close()


def sending_broadcast(api: Api, *, with_media: bool = True) -> dict[str, Any]:
    """A webhook broadcast with one image, marked in progress as a scheduler would."""
    channel = api.channel("webhook")
    account = api.account(channel["id"])
    api.contact(account["id"], "ann")
    content: dict[str, Any] = {"text": "hello"}
    if with_media:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), "red").save(buf, "PNG")
        media = api.ok("post", "/v1/media", 201, files={"file": ("a.png", buf.getvalue(), "x")})
        content["media_ids"] = [media["id"]]
    broadcast = api.broadcast(channel["id"], content=content)
    with transaction() as session:
        session.execute(
            text("UPDATE broadcast SET status = 'in_progress' WHERE id = :id"),
            {"id": broadcast["id"]},
        )
    return broadcast


def load(runtime: Runtime, broadcast_id: int) -> Job:
    job = runtime.call(load_job(runtime, broadcast_id))
    assert job is not None
    return job


def test_load_job_gives_the_adapter_the_plain_secret_and_media_urls_that_verify(
    api: Api, runtime: Runtime
) -> None:
    job = load(runtime, sending_broadcast(api)["id"])
    assert isinstance(job.adapter, WebhookAdapter)
    assert job.adapter.secret == SECRET.encode()
    [media] = job.message.media
    path = media.url.split("://", 1)[1].split("/", 1)[1]
    assert api.client.get("/" + path).status_code == 200


def test_legacy_plain_rows_are_read_as_they_are(api: Api, runtime: Runtime) -> None:
    broadcast = sending_broadcast(api)
    with transaction() as session:
        session.execute(
            text(
                "UPDATE channel SET config = jsonb_set(config, '{secret}', to_jsonb(CAST(:s AS text))) "
                "WHERE id = :id"
            ),
            {"s": "plain-legacy-secret-01", "id": broadcast["channel_id"]},
        )
        session.execute(
            text("UPDATE workspace SET signing_key = 'plain-legacy-key' WHERE id = :id"),
            {"id": api.workspace_id},
        )
    job = load(runtime, broadcast["id"])
    assert isinstance(job.adapter, WebhookAdapter)
    assert job.adapter.secret == b"plain-legacy-secret-01"
    path = job.message.media[0].url.split("://", 1)[1].split("/", 1)[1]
    assert api.client.get("/" + path).status_code == 200


@pytest.mark.parametrize("with_media", [True, False])
def test_a_key_the_dispatcher_cannot_use_is_a_clear_error_without_the_secret(
    api: Api, runtime: Runtime, with_media: bool
) -> None:
    broadcast = sending_broadcast(api, with_media=with_media)
    own = runtime.secrets
    runtime.secrets = SecretsBox([new_key()])
    try:
        with pytest.raises(ChannelUnusable) as caught:
            runtime.call(load_job(runtime, broadcast["id"]))
    finally:
        runtime.secrets = own
    message = str(caught.value)
    assert f"channel {broadcast['channel_id']} (webhook)" in message
    assert "BCAST_SECRET_KEYS" in message
    assert "resume the broadcast" in message
    assert SECRET not in message
    assert caught.value.__cause__ is None

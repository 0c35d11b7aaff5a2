"""Channel secrets and media signing keys are stored encrypted; the API still answers with
them redacted, signs and checks media URLs, and a key it cannot use is a clear 500.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import select, update

from shared.db.engine import transaction
from shared.db.models import Channel, Workspace
from shared.domain.channels import open_config
from shared.domain.lifecycle import ChannelKind
from shared.domain.media import signed_media_url
from shared.secrets_box import SecretsBox, get_secrets_box, is_sealed, new_key
from tests.conftest import Api

SECRETS = {
    "webhook": ("secret", "s3cret-webhook-key-0001"),
    "telegram": ("bot_token", "123456:ABCdef_ghi-jkl"),
    "whatsapp": ("access_token", "EAAG-secret-token"),
    "smtp": ("password", "smtp-pass-1"),
}


def stored_config(channel_id: int) -> dict[str, Any]:
    with transaction() as session:
        config: dict[str, Any] = session.execute(
            select(Channel.config).where(Channel.id == channel_id)
        ).scalar_one()
    return config


def stored_signing_key(workspace_id: int) -> str:
    with transaction() as session:
        return session.execute(
            select(Workspace.signing_key).where(Workspace.id == workspace_id)
        ).scalar_one()


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_a_new_channel_stores_its_secret_encrypted_and_shows_it_redacted(
    api: Api, kind: str
) -> None:
    key, secret = SECRETS[kind]
    channel = api.channel(kind)
    assert channel["config"][key] == "********"
    assert api.ok("get", f"/v1/channels/{channel['id']}")["config"][key] == "********"
    config = stored_config(channel["id"])
    assert secret not in json.dumps(config)
    assert is_sealed(config[key])
    assert open_config(ChannelKind(kind), config, get_secrets_box())[key] == secret


def test_a_new_workspace_gets_an_encrypted_signing_key(api: Api) -> None:
    stored = stored_signing_key(api.workspace_id)
    assert is_sealed(stored)
    assert len(get_secrets_box().open(stored)) == 64


def upload(api: Api) -> int:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, "PNG")
    media = api.ok("post", "/v1/media", 201, files={"file": ("a.png", buf.getvalue(), "x/y")})
    return int(media["id"])


def public_path(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[1]


def test_media_urls_signed_with_the_decrypted_key_are_served(api: Api) -> None:
    media_id = upload(api)
    key = get_secrets_box().open(stored_signing_key(api.workspace_id))
    url = signed_media_url("http://x", key, media_id, now=time.time())
    assert api.client.get("/" + public_path(url)).status_code == 200
    # The stored (encrypted) form is not the key: a URL signed with it is refused.
    stored = stored_signing_key(api.workspace_id)
    forged = signed_media_url("http://x", stored, media_id, now=time.time())
    assert api.client.get("/" + public_path(forged)).status_code == 403


def test_a_legacy_plain_signing_key_still_works(api: Api) -> None:
    media_id = upload(api)
    with transaction() as session:
        session.execute(
            update(Workspace)
            .where(Workspace.id == api.workspace_id)
            .values(signing_key="legacy-plain-signing-key")
        )
    url = signed_media_url("http://x", "legacy-plain-signing-key", media_id, now=time.time())
    assert api.client.get("/" + public_path(url)).status_code == 200


@pytest.fixture
def wrong_box(app: FastAPI) -> Iterator[None]:
    """The API as it runs when its BCAST_SECRET_KEYS lacks the key the secrets were sealed with."""
    box = SecretsBox([new_key()])
    app.dependency_overrides[get_secrets_box] = lambda: box
    yield
    app.dependency_overrides.pop(get_secrets_box)


@pytest.mark.usefixtures("wrong_box")
def test_a_key_the_api_cannot_use_is_a_clear_error_without_the_secret(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    media_id = upload(api)
    stored = stored_signing_key(api.workspace_id)
    plain = get_secrets_box().open(stored)  # the process's own box, not the API's
    url = signed_media_url("http://x", plain, media_id, now=time.time())
    with caplog.at_level(logging.ERROR):
        response = api.client.get("/" + public_path(url))
    assert response.status_code == 500
    assert "keys" in response.json()["detail"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "BCAST_SECRET_KEYS" in logged
    for text in (response.text, logged):
        assert plain not in text
        assert stored not in text

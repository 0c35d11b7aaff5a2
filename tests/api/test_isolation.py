"""Each workspace sees only its own rows: another workspace's id answers 404, never its data."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api


@pytest.fixture
def theirs(other_api: Api) -> dict[str, Any]:
    """Everything a workspace can own, made by the other workspace."""
    return other_api.one_of_everything("their-contact", "theirs")


def test_reading_their_rows_is_404(api: Api, theirs: dict[str, Any]) -> None:
    paths = [
        f"/v1/channels/{theirs['channel']['id']}",
        f"/v1/accounts/{theirs['account']['id']}",
        f"/v1/contacts/{theirs['contact']['id']}",
        f"/v1/tags/{theirs['tag']}",
        f"/v1/conversations/{theirs['conversation']['id']}",
        f"/v1/conversations/{theirs['conversation']['id']}/timed-sends",
        f"/v1/media/{theirs['media']['id']}",
        f"/v1/media/{theirs['media']['id']}/content",
        f"/v1/broadcasts/{theirs['broadcast']['id']}",
        f"/v1/broadcasts/{theirs['broadcast']['id']}/recipients",
    ]
    for path in paths:
        response = api.get(path)
        assert response.status_code == 404, path
        assert "their-contact" not in response.text


def test_acting_on_their_broadcast_is_404_and_changes_nothing(
    api: Api, other_api: Api, theirs: dict[str, Any]
) -> None:
    bid = theirs["broadcast"]["id"]
    for action in ("pause", "resume", "cancel"):
        assert api.post(f"/v1/broadcasts/{bid}/{action}").status_code == 404
    assert api.patch(f"/v1/broadcasts/{bid}", json={"name": "mine now"}).status_code == 404
    assert (
        api.patch(f"/v1/contacts/{theirs['contact']['id']}", json={"opted_out": True}).status_code
        == 404
    )
    assert (
        api.post(
            f"/v1/conversations/{theirs['conversation']['id']}/timed-sends",
            json={"content": {"text": "x"}},
        ).status_code
        == 404
    )
    after = other_api.ok("get", f"/v1/broadcasts/{bid}")
    assert (after["status"], after["name"]) == ("pending", theirs["broadcast"]["name"])
    assert other_api.ok("get", f"/v1/contacts/{theirs['contact']['id']}")["opted_out"] is False


def test_their_ids_in_my_requests_are_unknown(api: Api, theirs: dict[str, Any]) -> None:
    mine = api.channel()
    my_account = api.account(mine["id"])
    api.contact(my_account["id"], "mine")
    checks: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/accounts", {"channel_id": theirs["channel"]["id"], "name": "x"}, "channel_id"),
        ("/v1/contacts", {"account_id": theirs["account"]["id"], "address": "x"}, "account_id"),
        ("/v1/audiences/preview", {"channel_id": theirs["channel"]["id"]}, "channel_id"),
        (
            "/v1/conversations",
            {"account_id": theirs["account"]["id"], "contact_id": theirs["contact"]["id"]},
            "account_id",
        ),
        (
            "/v1/broadcasts",
            {
                "name": "b",
                "channel_id": mine["id"],
                "audience": {"tag_ids": [theirs["tag"]]},
                "content": {"text": "x"},
            },
            "audience.tag_ids[0]",
        ),
        (
            "/v1/broadcasts",
            {
                "name": "b",
                "channel_id": mine["id"],
                "audience": {"selection": "manual", "contact_ids": [theirs["contact"]["id"]]},
                "content": {"text": "x"},
            },
            "audience.contact_ids[0]",
        ),
        (
            "/v1/broadcasts",
            {
                "name": "b",
                "channel_id": mine["id"],
                "audience": {},
                "content": {"media_ids": [theirs["media"]["id"]]},
            },
            "content.media_ids[0]",
        ),
    ]
    for path, body, field in checks:
        response = api.post(path, json=body)
        assert response.status_code == 422, (path, response.text)
        assert field in {e["field"] for e in response.json()["detail"]}, (path, response.text)
        assert "their-contact" not in response.text


def test_lists_show_only_my_rows(api: Api, theirs: dict[str, Any]) -> None:
    for path in (
        "/v1/channels",
        "/v1/accounts",
        "/v1/contacts",
        "/v1/tags",
        "/v1/conversations",
        "/v1/broadcasts",
    ):
        assert api.ok("get", path)["items"] == [], path

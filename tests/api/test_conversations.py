"""A conversation's timed send is a broadcast with origin ``conversation`` and one recipient."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import Api


@pytest.fixture
def conversation(api: Api) -> dict[str, Any]:
    account = api.account(api.channel("telegram")["id"])
    contact = api.contact(account["id"], "123456789", name="Ann")
    api.contact(account["id"], "987654321", name="Bob")
    conv: dict[str, Any] = api.ok(
        "post",
        "/v1/conversations",
        201,
        json={"account_id": account["id"], "contact_id": contact["id"]},
    )
    return conv


def test_opening_a_conversation_twice_returns_the_same_one(
    api: Api, conversation: dict[str, Any]
) -> None:
    again = api.post(
        "/v1/conversations",
        json={"account_id": conversation["account_id"], "contact_id": conversation["contact_id"]},
    )
    assert again.status_code == 200
    assert again.json()["id"] == conversation["id"]


def test_contact_of_another_account_is_refused(api: Api, conversation: dict[str, Any]) -> None:
    other = api.account(api.channel("telegram")["id"])
    response = api.post(
        "/v1/conversations",
        json={"account_id": other["id"], "contact_id": conversation["contact_id"]},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "contact_id"


def test_timed_send_is_a_one_recipient_broadcast_in_the_list(
    api: Api, conversation: dict[str, Any]
) -> None:
    when = (datetime.now(UTC) + timedelta(minutes=30)).isoformat()
    b = api.ok(
        "post",
        f"/v1/conversations/{conversation['id']}/timed-sends",
        201,
        json={"content": {"text": "see you"}, "send_at": when},
    )
    assert b["origin"] == "conversation"
    assert b["conversation_id"] == conversation["id"]
    assert b["audience"]["selection"] == "manual"
    assert b["audience"]["contact_ids"] == [conversation["contact_id"]]
    assert b["audience_size"] == 1
    assert b["name"] == "Timed send to Ann"
    plain = api.broadcast(b["channel_id"])
    everything = [x["id"] for x in api.ok("get", "/v1/broadcasts")["items"]]
    assert everything == [plain["id"], b["id"]]
    only_conversations = api.ok("get", "/v1/broadcasts?origin=conversation")["items"]
    assert [x["id"] for x in only_conversations] == [b["id"]]
    only_broadcasts = api.ok("get", "/v1/broadcasts?origin=broadcast")["items"]
    assert [x["id"] for x in only_broadcasts] == [plain["id"]]
    listed = api.ok("get", f"/v1/conversations/{conversation['id']}/timed-sends")["items"]
    assert [x["id"] for x in listed] == [b["id"]]


def test_timed_send_follows_the_five_minute_rule(api: Api, conversation: dict[str, Any]) -> None:
    soon = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    response = api.post(
        f"/v1/conversations/{conversation['id']}/timed-sends",
        json={"content": {"text": "x"}, "send_at": soon},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "send_at"


def test_timed_send_audience_cannot_be_changed(api: Api, conversation: dict[str, Any]) -> None:
    when = (datetime.now(UTC) + timedelta(minutes=30)).isoformat()
    b = api.ok(
        "post",
        f"/v1/conversations/{conversation['id']}/timed-sends",
        201,
        json={"content": {"text": "x"}, "send_at": when},
    )
    response = api.patch(f"/v1/broadcasts/{b['id']}", json={"audience": {}})
    assert response.status_code == 422
    assert "conversation's contact" in response.json()["detail"][0]["msg"]
    assert (
        api.ok("patch", f"/v1/broadcasts/{b['id']}", json={"content": {"text": "changed"}})[
            "content"
        ]["text"]
        == "changed"
    )


def test_timed_send_honours_idempotency_key(api: Api, conversation: dict[str, Any]) -> None:
    body = {"content": {"text": "x"}}
    url = f"/v1/conversations/{conversation['id']}/timed-sends"
    first = api.post(url, json=body, headers={"Idempotency-Key": "t-1"})
    second = api.post(url, json=body, headers={"Idempotency-Key": "t-1"})
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.headers["idempotent-replayed"] == "true"
    assert first.json()["id"] == second.json()["id"]


def test_unknown_conversation_is_404(api: Api) -> None:
    response = api.post("/v1/conversations/987654321/timed-sends", json={"content": {"text": "x"}})
    assert response.status_code == 404


def test_a_timed_send_can_be_named(api: Api, conversation: dict[str, Any]) -> None:
    path = f"/v1/conversations/{conversation['id']}/timed-sends"
    named = api.ok("post", path, 201, json={"name": "Follow-up", "content": {"text": "hi"}})
    assert named["name"] == "Follow-up"
    plain = api.ok("post", path, 201, json={"content": {"text": "hi"}})
    assert plain["name"] == "Timed send to Ann"


def test_a_timed_send_to_a_contact_who_opted_out_or_is_unreachable_names_them_and_why(
    api: Api, conversation: dict[str, Any]
) -> None:
    from sqlalchemy import text

    from shared.db.engine import transaction

    path = f"/v1/conversations/{conversation['id']}/timed-sends"
    contact = conversation["contact_id"]
    api.ok("patch", f"/v1/contacts/{contact}", json={"opted_out": True})
    before = len(api.ok("get", "/v1/broadcasts")["items"])
    refused = api.post(path, json={"content": {"text": "hi"}})
    assert refused.status_code == 422, refused.text
    [error] = refused.json()["errors"]
    assert (error["field"], error["type"]) == ("conversation_id", "opted_out")
    assert f"contact {contact} (Ann) opted out on" in error["msg"]
    api.ok("patch", f"/v1/contacts/{contact}", json={"opted_out": False})
    with transaction() as session:
        session.execute(
            text(
                "UPDATE contact SET unreachable_at = now(), unreachable_reason = 'bot was "
                "blocked by the user' WHERE id = :id"
            ),
            {"id": contact},
        )
    refused = api.post(path, json={"content": {"text": "hi"}})
    assert refused.status_code == 422, refused.text
    [error] = refused.json()["errors"]
    assert error["type"] == "unreachable"
    assert "bot was blocked by the user" in error["msg"]
    assert len(api.ok("get", "/v1/broadcasts")["items"]) == before

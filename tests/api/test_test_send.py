"""Test sends: a broadcast's content to a few chosen contacts, recorded apart from it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from shared.db.engine import transaction
from tests.conftest import Api
from tests.factories import set_status


@pytest.fixture
def tried(api: Api) -> dict[str, Any]:
    """A broadcast due in an hour to four contacts of one channel, and a contact of another."""
    channel = api.channel()
    account = api.account(channel["id"])
    contacts = [api.contact(account["id"], f"t-{i}", name=f"Tess {i}")["id"] for i in range(4)]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    broadcast = api.broadcast(
        channel["id"], content={"text": "spring sale", "media_ids": []}, send_at=later
    )
    elsewhere = api.contact(api.account(api.channel()["id"])["id"], "far-away")["id"]
    return {"broadcast": broadcast, "contacts": contacts, "elsewhere": elsewhere}


def test_a_test_send_is_a_broadcast_of_its_own_linked_to_the_tried_one(
    api: Api, tried: dict[str, Any]
) -> None:
    original = tried["broadcast"]
    picked = tried["contacts"][1:3]
    test = api.ok(
        "post", f"/v1/broadcasts/{original['id']}/test-send", 201, json={"contact_ids": picked}
    )
    assert (test["origin"], test["test_of"], test["status"]) == ("test", original["id"], "pending")
    assert test["channel_id"] == original["channel_id"]
    assert test["content"] == original["content"]
    assert test["audience"]["selection"] == "manual"
    assert test["audience"]["contact_ids"] == picked
    assert test["audience_size"] == 2
    # Due now, whatever the tried broadcast's own time.
    assert datetime.fromisoformat(test["send_at"]) < datetime.fromisoformat(original["send_at"])
    # The tried broadcast is untouched and counts nothing of it.
    after = api.ok("get", f"/v1/broadcasts/{original['id']}")
    assert (after["status"], after["counts"]["total"], after["audience_size"]) == (
        "pending",
        0,
        4,
    )
    # Recorded apart: the list leaves tests out unless asked for them.
    listed = [b["id"] for b in api.ok("get", "/v1/broadcasts")["items"]]
    assert original["id"] in listed
    assert test["id"] not in listed
    only_tests = [b["id"] for b in api.ok("get", "/v1/broadcasts?origin=test")["items"]]
    assert only_tests == [test["id"]]
    of_it = api.ok("get", f"/v1/broadcasts/{original['id']}/test-sends")["items"]
    assert [b["id"] for b in of_it] == [test["id"]]


@pytest.mark.parametrize("status", ["in_progress", "paused", "completed", "canceled"])
def test_a_test_send_is_allowed_in_any_status(api: Api, tried: dict[str, Any], status: str) -> None:
    original = tried["broadcast"]
    set_status(original["id"], status)
    test = api.ok(
        "post",
        f"/v1/broadcasts/{original['id']}/test-send",
        201,
        json={"contact_ids": [tried["contacts"][0]]},
    )
    assert test["test_of"] == original["id"]
    assert api.ok("get", f"/v1/broadcasts/{original['id']}")["status"] == status


def test_a_test_of_a_test_tries_out_the_same_broadcast(api: Api, tried: dict[str, Any]) -> None:
    original = tried["broadcast"]
    first = api.ok(
        "post",
        f"/v1/broadcasts/{original['id']}/test-send",
        201,
        json={"contact_ids": [tried["contacts"][0]]},
    )
    second = api.ok(
        "post",
        f"/v1/broadcasts/{first['id']}/test-send",
        201,
        json={"contact_ids": [tried["contacts"][1]]},
    )
    assert second["test_of"] == original["id"]
    of_it = api.ok("get", f"/v1/broadcasts/{original['id']}/test-sends")["items"]
    assert [b["id"] for b in of_it] == [second["id"], first["id"]]


def test_each_contact_that_cannot_be_tested_is_named_and_nothing_is_written(
    api: Api, tried: dict[str, Any]
) -> None:
    original = tried["broadcast"]
    c = tried["contacts"]
    api.ok("patch", f"/v1/contacts/{c[1]}", json={"opted_out": True})
    with transaction() as session:
        session.execute(
            text(
                "UPDATE contact SET unreachable_at = now(), unreachable_reason = 'bot blocked' "
                "WHERE id = :id"
            ),
            {"id": c[2]},
        )
    response = api.post(
        f"/v1/broadcasts/{original['id']}/test-send",
        json={"contact_ids": [c[0], c[1], c[2], tried["elsewhere"], 999_999_999, c[0]]},
    )
    assert response.status_code == 422, response.text
    errors = {e["field"]: e for e in response.json()["errors"]}
    assert set(errors) == {f"contact_ids[{i}]" for i in range(1, 6)}
    assert errors["contact_ids[1]"]["type"] == "opted_out"
    assert "Tess 1" in errors["contact_ids[1]"]["msg"]
    assert errors["contact_ids[2]"]["type"] == "unreachable"
    assert "bot blocked" in errors["contact_ids[2]"]["msg"]
    assert errors["contact_ids[3]"]["type"] == "wrong_channel"
    assert errors["contact_ids[4]"]["type"] == "not_found"
    assert errors["contact_ids[5]"]["type"] == "duplicate"
    assert api.ok("get", "/v1/broadcasts?origin=test")["items"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"contact_ids": []}, "contact_ids"),
        ({"contact_ids": list(range(1, 12))}, "contact_ids"),
        ({}, "contact_ids"),
        ({"contact_ids": [1], "text": "other"}, "text"),
    ],
)
def test_a_bad_body_names_its_field(
    api: Api, tried: dict[str, Any], body: dict[str, Any], field: str
) -> None:
    response = api.post(f"/v1/broadcasts/{tried['broadcast']['id']}/test-send", json=body)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]


def test_a_test_send_cannot_be_changed_and_a_key_replays_it(
    api: Api, tried: dict[str, Any]
) -> None:
    original = tried["broadcast"]
    body = {"contact_ids": [tried["contacts"][0]]}
    key = {"Idempotency-Key": "test-send-1"}
    path = f"/v1/broadcasts/{original['id']}/test-send"
    first = api.post(path, json=body, headers=key)
    again = api.post(path, json=body, headers=key)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = api.post(path, json={"contact_ids": [tried["contacts"][1]]}, headers=key)
    assert other.status_code == 422
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"
    changed = api.patch(f"/v1/broadcasts/{first.json()['id']}", json={"name": "renamed"})
    assert changed.status_code == 409
    assert "test send" in changed.json()["detail"]

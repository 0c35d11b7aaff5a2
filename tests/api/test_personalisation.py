"""Personalised text is checked when a broadcast is written and previewed per contact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import Api


@pytest.fixture
def world(api: Api) -> dict[str, Any]:
    channel = api.channel()
    account = api.account(channel["id"])
    ann = api.contact(account["id"], "p-ann", name="Ann", fields={"city": "Berlin"})
    bob = api.contact(account["id"], "p-bob")
    return {"channel": channel, "ann": ann, "bob": bob}


def body(world: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "name": "hello",
        "channel_id": world["channel"]["id"],
        "audience": {},
        "content": {"text": text},
        "send_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }


def test_a_misspelt_field_without_a_default_is_refused_and_nothing_written(
    api: Api, world: dict[str, Any]
) -> None:
    refused = api.post("/v1/broadcasts", json=body(world, "Hi {{name}} in {{citty}}"))
    assert refused.status_code == 422
    [error] = refused.json()["errors"]
    assert (error["field"], error["type"]) == ("content.text", "template_unknown_field")
    assert "citty" in error["msg"]
    assert api.ok("get", "/v1/broadcasts")["items"] == []
    unclosed = api.post("/v1/broadcasts", json=body(world, "Hi {{name"))
    assert unclosed.json()["errors"][0]["type"] == "template_unclosed"
    # A known field, or an unknown one with a default, is fine.
    api.ok("post", "/v1/broadcasts", 201, json=body(world, "Hi {{name}} in {{city}}"))
    api.ok("post", "/v1/broadcasts", 201, json=body(world, "{{team | no team}}"))


def test_a_change_of_text_is_checked_as_a_new_one(api: Api, world: dict[str, Any]) -> None:
    b = api.ok("post", "/v1/broadcasts", 201, json=body(world, "plain"))
    changed = api.patch(f"/v1/broadcasts/{b['id']}", json={"content": {"text": "{{nope}}"}})
    assert changed.status_code == 422
    assert changed.json()["errors"][0]["field"] == "content.text"


def test_the_preview_renders_the_text_for_each_contact(api: Api, world: dict[str, Any]) -> None:
    text = "Hi {{name | there}}, see you in {{city | your town}}"
    b = api.ok("post", "/v1/broadcasts", 201, json=body(world, text))
    shown = api.ok("get", f"/v1/broadcasts/{b['id']}/audience")
    by_id = {c["id"]: c["text"] for c in shown["contacts"]}
    assert by_id == {
        world["ann"]["id"]: "Hi Ann, see you in Berlin",
        world["bob"]["id"]: "Hi there, see you in your town",
    }
    preview = api.ok(
        "post",
        "/v1/audiences/preview",
        json={"channel_id": world["channel"]["id"], "text": "{{address}}: {{city|-}}"},
    )
    assert {c["id"]: c["text"] for c in preview["contacts"]} == {
        world["ann"]["id"]: "p-ann: Berlin",
        world["bob"]["id"]: "p-bob: -",
    }
    bad = api.post(
        "/v1/audiences/preview", json={"channel_id": world["channel"]["id"], "text": "{{x"}
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "text"

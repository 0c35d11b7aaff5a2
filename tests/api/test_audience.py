"""Audience preview: accounts and/or tags, any or all, on one channel, without opted-out contacts."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api


@pytest.fixture
def world(api: Api) -> dict[str, Any]:
    """Two accounts on a channel, one on another channel, contacts tagged in different ways."""
    channel = api.channel("webhook")
    elsewhere = api.channel("webhook")
    a1, a2 = api.account(channel["id"]), api.account(channel["id"])
    a3 = api.account(elsewhere["id"])
    c = {
        "vip_berlin": api.contact(a1["id"], "u1", tags=["vip", "berlin"]),
        "vip": api.contact(a1["id"], "u2", tags=["vip"]),
        "berlin": api.contact(a2["id"], "u3", tags=["berlin"]),
        "plain": api.contact(a2["id"], "u4"),
        "opted_out_vip": api.contact(a1["id"], "u5", tags=["vip"], opted_out=True),
        "other_channel_vip": api.contact(a3["id"], "u6", tags=["vip"]),
    }
    return {"channel": channel, "elsewhere": elsewhere, "a1": a1, "a2": a2, "a3": a3, "c": c}


def preview(api: Api, world: dict[str, Any], **audience: Any) -> tuple[int, set[str]]:
    body = {"channel_id": world["channel"]["id"], **audience}
    result = api.ok("post", "/v1/audiences/preview", json=body)
    names = {k for k, v in world["c"].items() if v["id"] in {c["id"] for c in result["contacts"]}}
    return result["count"], names


def test_no_filter_means_every_reachable_contact_of_the_channel(
    api: Api, world: dict[str, Any]
) -> None:
    assert preview(api, world) == (4, {"vip_berlin", "vip", "berlin", "plain"})


def test_filter_by_accounts(api: Api, world: dict[str, Any]) -> None:
    assert preview(api, world, account_ids=[world["a2"]["id"]]) == (2, {"berlin", "plain"})
    assert preview(api, world, account_ids=[world["a1"]["id"], world["a2"]["id"]])[0] == 4


def test_filter_by_tags_any_and_all(api: Api, world: dict[str, Any]) -> None:
    vip, berlin = api.tag_id("vip"), api.tag_id("berlin")
    assert preview(api, world, tag_ids=[vip, berlin]) == (3, {"vip_berlin", "vip", "berlin"})
    assert preview(api, world, tag_ids=[vip, berlin], tag_match="all") == (1, {"vip_berlin"})


def test_accounts_and_tags_together(api: Api, world: dict[str, Any]) -> None:
    berlin = api.tag_id("berlin")
    assert preview(api, world, account_ids=[world["a2"]["id"]], tag_ids=[berlin]) == (1, {"berlin"})


def test_opted_out_and_other_channels_are_never_in_it(api: Api, world: dict[str, Any]) -> None:
    _, names = preview(api, world, tag_ids=[api.tag_id("vip")])
    assert "opted_out_vip" not in names
    assert "other_channel_vip" not in names


def test_a_filter_matching_nobody_previews_zero(api: Api, world: dict[str, Any]) -> None:
    tag = api.ok("post", "/v1/tags", 201, json={"name": "unused"})
    assert preview(api, world, tag_ids=[tag["id"]]) == (0, set())


def test_account_of_another_channel_is_refused(api: Api, world: dict[str, Any]) -> None:
    response = api.post(
        "/v1/audiences/preview",
        json={"channel_id": world["channel"]["id"], "account_ids": [world["a3"]["id"]]},
    )
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["field"] == "audience.account_ids[0]"
    assert "one channel" in error["msg"]


def test_first_page_is_limited(api: Api, world: dict[str, Any]) -> None:
    result = api.ok(
        "post", "/v1/audiences/preview", json={"channel_id": world["channel"]["id"], "limit": 2}
    )
    assert result["count"] == 4
    assert len(result["contacts"]) == 2

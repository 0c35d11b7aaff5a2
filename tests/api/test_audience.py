"""Audience preview: accounts and/or tags, any or all, then everyone or a hand-picked few, on one
channel: who gets it, and who is left out (opted out, unreachable) and why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from shared.db.engine import transaction
from tests.conftest import Api
from tests.factories import start_with_deliveries


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


def test_the_whole_audience_is_previewed_with_who_is_left_out_and_why(
    api: Api, world: dict[str, Any]
) -> None:
    c = world["c"]
    with transaction() as session:
        session.execute(
            text(
                "UPDATE contact SET unreachable_at = now(), unreachable_reason = :why "
                "WHERE id = ANY(:ids)"
            ),
            {"why": "403 bot was blocked by the user", "ids": [c["vip"]["id"], c["plain"]["id"]]},
        )
    vip = api.tag_id("vip")
    body = {"channel_id": world["channel"]["id"], "tag_ids": [vip]}
    everyone = api.ok("post", "/v1/audiences/preview", json=body)
    assert (
        everyone["count"],
        everyone["opted_out"],
        everyone["unreachable"],
        everyone["total"],
    ) == (1, 1, 1, 3)
    assert everyone["unreachable_reasons"] == [
        {"reason": "403 bot was blocked by the user", "contacts": 1}
    ]
    assert [x["id"] for x in everyone["contacts"]] == [c["vip_berlin"]["id"]]
    # Exclusions and hand-picked selections are previewed as a broadcast would take them.
    less = api.ok(
        "post",
        "/v1/audiences/preview",
        json={"channel_id": world["channel"]["id"], "exclude_contact_ids": [c["berlin"]["id"]]},
    )
    assert (less["count"], less["total"]) == (1, 4)
    picked = api.ok(
        "post",
        "/v1/audiences/preview",
        json={
            "channel_id": world["channel"]["id"],
            "selection": "manual",
            "contact_ids": [c["berlin"]["id"], c["plain"]["id"]],
        },
    )
    assert (picked["count"], picked["unreachable"], picked["total"]) == (1, 1, 2)
    wrong = api.post(
        "/v1/audiences/preview",
        json={"channel_id": world["channel"]["id"], "contact_ids": [c["berlin"]["id"]]},
    )
    assert wrong.status_code == 422


def test_the_people_are_paged_to_the_end(api: Api, world: dict[str, Any]) -> None:
    seen: list[int] = []
    cursor = None
    while True:
        body = {"channel_id": world["channel"]["id"], "limit": 1}
        if cursor:
            body["cursor"] = cursor
        page = api.ok("post", "/v1/audiences/preview", json=body)
        seen += [x["id"] for x in page["contacts"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    expected = sorted(world["c"][k]["id"] for k in ("vip_berlin", "vip", "berlin", "plain"))
    assert seen == expected


def test_a_scheduled_broadcast_shows_who_it_would_reach_now_until_it_starts(
    api: Api, world: dict[str, Any]
) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    b = api.broadcast(world["channel"]["id"], {"tag_ids": [api.tag_id("vip")]}, send_at=later)
    assert b["audience_size"] == 3  # vip_berlin, vip and the one who opted out
    now = api.ok("get", f"/v1/broadcasts/{b['id']}/audience")
    assert (now["count"], now["opted_out"], now["total"]) == (2, 1, 3)
    # A vip added since is reached now.
    api.contact(world["a2"]["id"], "u7", tags=["vip"])
    assert api.ok("get", f"/v1/broadcasts/{b['id']}/audience?limit=1")["count"] == 3
    start_with_deliveries(b["id"], ["sent"])
    with transaction() as session:
        session.execute(
            text("UPDATE broadcast SET snapshot_at = now() WHERE id = :id"), {"id": b["id"]}
        )
    started = api.get(f"/v1/broadcasts/{b['id']}/audience")
    assert started.status_code == 409
    assert "/recipients" in started.json()["detail"]

"""Messenger and Instagram through the whole pipeline, against the simulator speaking Meta's
Graph Send API. Every contact has written in just before the broadcast, so free-form messages
(``messaging_type`` UPDATE) may go to it.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import Api
from tests.e2e.test_channels import images, recipients

pytestmark = pytest.mark.e2e

KINDS = ["messenger", "instagram"]
LABEL = {"messenger": "Messenger", "instagram": "Instagram"}


def contacts_inside_the_window(api: Api, channel: dict[str, Any], addresses: list[str]) -> int:
    """An account of ``addresses`` on ``channel``, each of whom just wrote in; its id."""
    account = api.account(channel["id"])
    api.import_contacts(account["id"], addresses)
    for contact_id in api.contacts(account["id"]).values():
        api.ok("POST", f"/v1/contacts/{contact_id}/inbound", json={})
    return int(account["id"])


def send(
    api: Api, channel: dict[str, Any], addresses: list[str], content: dict[str, Any]
) -> dict[str, Any]:
    account_id = contacts_inside_the_window(api, channel, addresses)
    b = api.broadcast(channel["id"], {"account_ids": [account_id]}, content=content)
    return api.wait_status(b["id"], "completed")


@pytest.mark.parametrize("kind", KINDS)
def test_text_and_several_images_through_the_pipeline(api: Api, kind: str) -> None:
    channel, name = api.channel(kind)
    media = images(api, 3)
    done = send(api, channel, ["1000000001"], {"text": "three photos", "media_ids": media})
    long = " ".join(["palabra"] * 400)  # 3199 characters: over either provider's limit
    send(api, channel, ["1000000002"], {"text": long})
    calls = api.sim_requests(name)
    assert {r["status"] for r in calls} == {200}
    by_to: dict[str, list[dict[str, Any]]] = {}
    for r in calls:
        by_to.setdefault(r["to"], []).append(r)
    album = by_to["1000000001"]
    assert [(r["text"], r["type"]) for r in album] == [
        ("three photos", None),
        (None, "image"),
        (None, "image"),
        (None, "image"),
    ]
    assert all("/media/" in r["url"] and "signature=" in r["url"] for r in album[1:])
    assert len({r["url"] for r in album[1:]}) == 3
    assert " ".join(r["text"] for r in by_to["1000000002"]) == long
    assert len(by_to["1000000002"]) == (2 if kind == "messenger" else 4)
    assert {(r["messaging_type"], r["tag"]) for r in calls} == {("UPDATE", None)}
    assert {r["authorization"] for r in calls} == {f"Bearer {channel['secret']}"}
    assert not any(channel["secret"] in r["path"] + r["query"] for r in calls)
    assert {r["version"] for r in calls} == {"v21.0"}
    if kind == "instagram":
        assert {r["ig_user_id"] for r in calls} == {"17841400000000001"}
    [row] = recipients(api, done["id"])
    assert row["provider_message_id"].count("m_") == 4


@pytest.mark.parametrize("kind", KINDS)
def test_a_person_not_available_fails_as_unreachable_and_is_skipped_later(
    api: Api, kind: str
) -> None:
    channel, name = api.channel(kind, fail_addresses=["2000000002"])
    contacts_inside_the_window(api, channel, ["2000000001", "2000000002"])
    first = api.broadcast(channel["id"], {})
    done = api.wait_status(first["id"], "completed")
    assert (done["counts"]["sent"], done["counts"]["failed"]) == (1, 1)
    [failed] = [r for r in recipients(api, first["id"]) if r["status"] == "failed"]
    assert failed["last_error"] == (
        f"{LABEL[kind]} 551/1545041: This person isn't available right now."
    )
    assert failed["attempts"] == 1
    contact = api.ok("GET", f"/v1/contacts/{failed['contact_id']}")
    assert contact["unreachable"] is True
    assert contact["unreachable_reason"] == failed["last_error"]

    second = api.broadcast(channel["id"], {})
    later = api.wait_status(second["id"], "completed")
    assert (later["counts"]["sent"], later["counts"]["skipped"]) == (1, 1)
    [skipped] = api.ok(
        "GET", f"/v1/broadcasts/{second['id']}/recipients", params={"status": "skipped"}
    )["items"]
    assert skipped["address"] == "2000000002"
    assert [r["to"] for r in api.sim_requests(name)].count("2000000002") == 1, "never called again"


@pytest.mark.parametrize("kind", KINDS)
def test_a_rate_limit_is_retried_then_sent(api: Api, kind: str) -> None:
    channel, name = api.channel(kind, throttle_ratio=0.5, retry_after=0.5, seed=7)
    done = send(api, channel, [str(3000000000 + i) for i in range(10)], {"text": "hi"})
    assert (done["counts"]["sent"], done["counts"]["failed"]) == (10, 0)
    calls = api.sim_requests(name)
    assert any(r.get("error_code") == 613 for r in calls), "Graph's rate limit was hit"
    stats = api.sim_stats(name)
    assert (stats["accepted"], stats["duplicates"]) == (10, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_token_never_appears_in_answers_or_reasons(api: Api, kind: str) -> None:
    channel, _ = api.channel(kind, error_code=190)
    secret = channel["secret"]
    shown = {k: v for k, v in channel.items() if k != "secret"}
    assert secret not in str(shown)
    assert channel["config"]["page_access_token"] == "********"
    assert secret not in api.http.get("/v1/channels").text
    assert secret not in api.http.get(f"/v1/channels/{channel['id']}").text

    account_id = contacts_inside_the_window(api, channel, ["4000000001", "4000000002"])
    b = api.broadcast(channel["id"], {"account_ids": [account_id]}, content={"text": "x"})
    paused = api.wait_status(b["id"], "paused")
    assert f"{LABEL[kind]} 190" in paused["status_reason"]
    assert paused["counts"]["failed"] == 0, "nobody is failed for the token's fault"
    assert secret not in api.http.get(f"/v1/broadcasts/{b['id']}").text
    assert secret not in api.http.get(f"/v1/broadcasts/{b['id']}/recipients").text

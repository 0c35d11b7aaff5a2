"""Conversation windows: when each contact last wrote in, and how many of an audience are
inside the provider's 24-hour window (WhatsApp).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import Api


@pytest.fixture
def whatsapp(api: Api) -> dict[str, Any]:
    channel = api.channel("whatsapp")
    account = api.account(channel["id"])
    contacts = [api.contact(account["id"], f"+4915112345{i:03d}") for i in range(4)]
    return {"channel": channel, "account": account, "contacts": contacts}


def test_inbound_moves_the_window_forward_only(api: Api, whatsapp: dict[str, Any]) -> None:
    c = whatsapp["contacts"][0]
    path = f"/v1/contacts/{c['id']}/inbound"
    now = api.ok("post", path)
    first = datetime.fromisoformat(now["last_inbound_at"])
    assert abs(first - datetime.now(UTC)) < timedelta(seconds=30)
    earlier = (first - timedelta(hours=3)).isoformat()
    kept = api.ok("post", path, json={"at": earlier})
    assert datetime.fromisoformat(kept["last_inbound_at"]) == first
    patched = api.ok("patch", f"/v1/contacts/{c['id']}", json={"last_inbound_at": earlier})
    assert datetime.fromisoformat(patched["last_inbound_at"]) == first
    for body, kind in (
        ({"at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}, "in_future"),
        ({"at": "2026-01-01T10:00:00"}, "timezone_missing"),
        ({"at": 1700000000}, "value_error"),
        ({"when": "now"}, "extra_forbidden"),
    ):
        refused = api.post(path, json=body)
        assert refused.status_code == 422, body
        assert refused.json()["errors"][0]["type"] == kind, refused.text
    assert api.post("/v1/contacts/999999999/inbound").status_code == 404


def test_the_preview_and_the_broadcast_count_who_is_inside_the_window(
    api: Api, whatsapp: dict[str, Any]
) -> None:
    c = whatsapp["contacts"]
    now = datetime.now(UTC)
    api.ok("post", f"/v1/contacts/{c[0]['id']}/inbound")
    api.ok(
        "post",
        f"/v1/contacts/{c[1]['id']}/inbound",
        json={"at": (now - timedelta(hours=23)).isoformat()},
    )
    api.ok(
        "post",
        f"/v1/contacts/{c[2]['id']}/inbound",
        json={"at": (now - timedelta(hours=25)).isoformat()},
    )
    preview = api.ok(
        "post", "/v1/audiences/preview", json={"channel_id": whatsapp["channel"]["id"]}
    )
    assert (preview["count"], preview["inside_window"]) == (4, 2)
    later = (now + timedelta(hours=1)).isoformat()
    # Text to those inside the window, a template to the others (free-form alone is refused).
    template = {"name": "news", "language": "en"}
    content = {"text": "hi", "template": template}
    b = api.broadcast(whatsapp["channel"]["id"], send_at=later, content=content)
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["inside_window"] == 2
    # Not in lists, and not on channels without such a window.
    assert api.ok("get", "/v1/broadcasts")["items"][0]["inside_window"] is None
    hook = api.channel()
    api.contact(api.account(hook["id"])["id"], "w-1")
    other = api.ok("post", "/v1/audiences/preview", json={"channel_id": hook["id"]})
    assert other["inside_window"] is None


def test_an_import_takes_the_latest_inbound_time(api: Api, whatsapp: dict[str, Any]) -> None:
    account = whatsapp["account"]["id"]
    now = datetime.now(UTC).replace(microsecond=0)
    csv = (
        "account_id,address,last_inbound_at\n"
        f"{account},+4915112345000,{(now - timedelta(hours=2)).isoformat()}\n"
        f"{account},+4915112399999,{(now - timedelta(hours=30)).isoformat()}\n"
    )
    api.ok("post", "/v1/contacts/import", content=csv, headers={"content-type": "text/csv"})
    got = {
        x["address"]: x["last_inbound_at"]
        for x in api.ok("get", f"/v1/contacts?account_id={account}")["items"]
    }
    assert datetime.fromisoformat(got["+4915112345000"]) == now - timedelta(hours=2)
    assert datetime.fromisoformat(got["+4915112399999"]) == now - timedelta(hours=30)
    # An older time in a later import keeps the newer one.
    api.ok(
        "post",
        "/v1/contacts/import",
        content=f"account_id,address,last_inbound_at\n{account},+4915112345000,{(now - timedelta(days=9)).isoformat()}\n",
        headers={"content-type": "text/csv"},
    )
    again = {
        x["address"]: x["last_inbound_at"]
        for x in api.ok("get", f"/v1/contacts?account_id={account}")["items"]
    }
    assert datetime.fromisoformat(again["+4915112345000"]) == now - timedelta(hours=2)

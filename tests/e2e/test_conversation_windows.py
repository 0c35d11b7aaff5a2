"""The 24-hour conversation window through the whole pipeline: WhatsApp templates to those
outside it and free-form to those inside, Messenger's message tags, and the window judged
again for each recipient when its message goes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.e2e.conftest import Api, System
from tests.e2e.test_channels import images, recipients

pytestmark = pytest.mark.e2e

TEMPLATE = {
    "name": "spring_sale",
    "language": "en_US",
    "components": [
        {"type": "body", "parameters": [{"type": "text", "text": "{{name}}"}]},
        {
            "type": "button",
            "sub_type": "quick_reply",
            "index": 0,
            "parameters": [{"type": "payload", "payload": "STOP"}],
        },
    ],
}


def account_with(api: Api, channel: dict[str, Any], wrote: dict[str, datetime | None]) -> int:
    """An account of contacts, each having last written in at the time given (None: never)."""
    account = api.account(channel["id"])
    api.import_contacts(account["id"], list(wrote))
    ids = api.contacts(account["id"])
    for address, at in wrote.items():
        if at is not None:
            api.ok("POST", f"/v1/contacts/{ids[address]}/inbound", json={"at": at.isoformat()})
    return int(account["id"])


def by_address(api: Api, hook: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for r in api.sim_requests(hook):
        found.setdefault(str(r["to"]), []).append(r)
    return found


def test_whatsapp_sends_the_template_outside_the_window_and_free_form_inside(api: Api) -> None:
    channel, hook = api.channel("whatsapp", templates={"spring_sale:en_US": 1})
    now = datetime.now(UTC)
    account = account_with(
        api,
        channel,
        {
            "+4915110000001": now - timedelta(hours=1),
            "+4915110000002": now - timedelta(hours=30),
            "+4915110000003": None,
        },
    )
    media = images(api, 1)
    b = api.broadcast(
        channel["id"],
        {"account_ids": [account]},
        content={"text": "Hi again", "media_ids": media, "template": TEMPLATE},
    )
    done = api.wait_status(b["id"], "completed")
    assert done["counts"]["sent"] == 3
    calls = by_address(api, hook)
    [inside] = calls["+4915110000001"]
    assert (inside["type"], inside["text"]) == ("image", "Hi again")
    for address in ("+4915110000002", "+4915110000003"):
        [call] = calls[address]
        assert call["type"] == "template"
        sent = call["template"]
        assert sent["name"] == "spring_sale"
        assert sent["language"] == {"code": "en_US"}
        body, button = sent["components"]
        assert body == {"type": "body", "parameters": [{"type": "text", "text": f"N {address}"}]}
        assert button["index"] == "0"
        assert button["parameters"] == [{"type": "payload", "payload": "STOP"}]


def test_whatsapp_template_only_goes_to_everyone_and_a_wrong_one_pauses(api: Api) -> None:
    channel, hook = api.channel("whatsapp", templates={"other:en_US": 1})
    account = account_with(api, channel, {"+4915110000011": None, "+4915110000012": None})
    b = api.broadcast(channel["id"], {"account_ids": [account]}, content={"template": TEMPLATE})
    paused = api.wait_status(b["id"], "paused")
    assert "WhatsApp 132001" in paused["status_reason"], "the approved list has no such template"
    assert paused["counts"]["failed"] == 0
    r = api.system.sim.put(f"/_sim/hooks/{hook}", json={"templates": {"spring_sale:en_US": 1}})
    assert r.status_code == 200
    api.ok("POST", f"/v1/broadcasts/{b['id']}/resume")
    done = api.wait_status(b["id"], "completed")
    assert done["counts"]["sent"] == 2
    assert {c[-1]["type"] for c in by_address(api, hook).values()} == {"template"}


def test_a_recipient_whose_window_closed_before_the_send_fails_without_a_call(
    api: Api, system: System
) -> None:
    channel, hook = api.channel("whatsapp")
    now = datetime.now(UTC)
    account = account_with(
        api, channel, {"+4915110000021": now, "+4915110000022": now - timedelta(hours=2)}
    )
    soon = (now + timedelta(minutes=6)).isoformat()
    b = api.broadcast(
        channel["id"], {"account_ids": [account]}, content={"text": "x"}, send_at=soon
    )
    # A day passes for one of them before the send: its window has closed by then.
    system.sql(
        "UPDATE contact SET last_inbound_at = now() - interval '25 hours' "
        "WHERE address = '+4915110000022' AND account_id = %s",
        (account,),
    )
    system.sql("UPDATE broadcast SET send_at = now() WHERE id = %s", (b["id"],))
    done = api.wait_status(b["id"], "completed")
    assert (done["counts"]["sent"], done["counts"]["failed"]) == (1, 1)
    [failed] = [r for r in recipients(api, b["id"]) if r["status"] == "failed"]
    assert failed["address"] == "+4915110000022"
    assert "outside the 24-hour conversation window" in failed["last_error"]
    assert failed["attempts"] == 1
    assert set(by_address(api, hook)) == {"+4915110000021"}, "no call to the one outside"


def test_messenger_tags_those_outside_the_window_and_updates_those_inside(api: Api) -> None:
    channel, hook = api.channel("messenger", outside_window=["2000000002"])
    now = datetime.now(UTC)
    account = account_with(
        api,
        channel,
        {"2000000001": now - timedelta(hours=2), "2000000002": now - timedelta(days=3)},
    )
    b = api.broadcast(
        channel["id"],
        {"account_ids": [account]},
        content={"text": "Your agent replied", "message_tag": "HUMAN_AGENT"},
    )
    done = api.wait_status(b["id"], "completed")
    assert done["counts"]["sent"] == 2
    calls = by_address(api, hook)
    assert (calls["2000000001"][0]["messaging_type"], calls["2000000001"][0]["tag"]) == (
        "UPDATE",
        None,
    )
    assert (calls["2000000002"][0]["messaging_type"], calls["2000000002"][0]["tag"]) == (
        "MESSAGE_TAG",
        "HUMAN_AGENT",
    )

"""A test send goes out through the real scheduler and dispatcher to the chosen contacts only,
while the tried broadcast waits for its own time and counts none of it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e.conftest import Api

pytestmark = pytest.mark.e2e


def test_a_test_send_reaches_the_chosen_contacts_only_and_leaves_the_broadcast_waiting(
    api: Api,
) -> None:
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"ts-{i}" for i in range(5)])
    ids = api.contacts(account["id"])
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    original = api.broadcast(channel["id"], {}, send_at=later, content={"text": "big news"})
    picked = [ids["ts-1"], ids["ts-3"]]
    test = api.ok(
        "POST", f"/v1/broadcasts/{original['id']}/test-send", 201, json={"contact_ids": picked}
    )
    done = api.wait_status(test["id"], "completed")
    assert done["counts"]["sent"] == 2
    requests = api.sim_requests(hook)
    assert sorted((r["to"], r["text"]) for r in requests) == [
        ("ts-1", "big news"),
        ("ts-3", "big news"),
    ]
    recipients = api.ok("GET", f"/v1/broadcasts/{test['id']}/recipients?status=sent")["items"]
    assert sorted(r["address"] for r in recipients) == ["ts-1", "ts-3"]
    after = api.get(original["id"])
    assert (after["status"], after["counts"]["total"], after["counts"]["sent"]) == (
        "pending",
        0,
        0,
    )


def test_personalised_text_is_rendered_for_each_recipient_in_tests_and_broadcasts(
    api: Api,
) -> None:
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    for address, name, fields in (
        ("pz-1", "Ann", {"city": "Berlin"}),
        ("pz-2", "", {}),
        ("pz-3", "Cy", {"city": "Lagos"}),
    ):
        api.ok(
            "POST",
            "/v1/contacts",
            201,
            json={"account_id": account["id"], "address": address, "name": name, "fields": fields},
        )
    ids = api.contacts(account["id"])
    text = "Hi {{name | friend}}, news for {{city | your town}}"
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    b = api.broadcast(channel["id"], {}, send_at=later, content={"text": text})
    test = api.ok(
        "POST", f"/v1/broadcasts/{b['id']}/test-send", 201, json={"contact_ids": [ids["pz-2"]]}
    )
    api.wait_status(test["id"], "completed")
    assert [(r["to"], r["text"]) for r in api.sim_requests(hook)] == [
        ("pz-2", "Hi friend, news for your town")
    ]
    api.ok("PATCH", f"/v1/broadcasts/{b['id']}", json={"send_at": None})
    api.wait_status(b["id"], "completed")
    got = sorted((r["to"], r["text"]) for r in api.sim_requests(hook))
    assert got == [
        ("pz-1", "Hi Ann, news for Berlin"),
        ("pz-2", "Hi friend, news for your town"),
        ("pz-2", "Hi friend, news for your town"),
        ("pz-3", "Hi Cy, news for Lagos"),
    ]

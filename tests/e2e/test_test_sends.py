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

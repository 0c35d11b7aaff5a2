"""Many conversations' timed sends and a large broadcast due in the same second, through the
real scheduler and dispatcher: each reaches its recipients exactly once, none before its time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e.conftest import Api, System, wait_for

pytestmark = pytest.mark.e2e

TIMED = 150
LARGE = 3000


def test_timed_sends_and_a_large_broadcast_due_together_each_reach_their_recipients_once(
    api: Api, system: System
) -> None:
    channel, hook = api.webhook_channel(rate=5000)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"big-{i}" for i in range(LARGE)], tags=["big"])
    api.import_contacts(account["id"], [f"chat-{i}" for i in range(TIMED)])
    ids = api.contacts(account["id"])
    later = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    large = api.broadcast(channel["id"], {"tag_ids": [api.tag_id("big")]}, send_at=later)
    timed = []
    for i in range(TIMED):
        conversation = api.ok(
            "POST",
            "/v1/conversations",
            201,
            json={"account_id": account["id"], "contact_id": ids[f"chat-{i}"]},
        )
        timed.append(
            api.ok(
                "POST",
                f"/v1/conversations/{conversation['id']}/timed-sends",
                201,
                json={"content": {"text": f"for chat-{i}"}, "send_at": later},
            )["id"]
        )
    everyone = [large["id"], *timed]
    # The ten minutes pass: all fall due in the same second, 2 s from now.
    system.sql(
        "UPDATE broadcast SET send_at = date_trunc('second', now()) + interval '2 seconds' "
        "WHERE id = ANY(%s)",
        (everyone,),
    )
    due = datetime.fromisoformat(api.get(large["id"])["send_at"])

    def finished() -> bool:
        rows = system.sql(
            "SELECT count(*) FROM broadcast WHERE id = ANY(%s) AND status <> 'completed'",
            (everyone,),
        )
        return rows == [(0,)]

    wait_for("every broadcast to complete", finished, timeout=180)
    stats = api.sim_stats(hook)
    expected = LARGE + TIMED
    assert (stats["requests"], stats["accepted"], stats["duplicates"]) == (expected, expected, 0)
    started = system.sql(
        "SELECT min(started_at), count(*) FROM broadcast WHERE id = ANY(%s)", (everyone,)
    )
    assert started[0][0] >= due, "none started before its time"
    assert started[0][1] == TIMED + 1
    requests = api.sim_requests(hook)
    assert min(r["t"] for r in requests) >= due.timestamp()
    texts = {r["to"]: r["text"] for r in requests if r["to"].startswith("chat-")}
    assert texts == {f"chat-{i}": f"for chat-{i}" for i in range(TIMED)}

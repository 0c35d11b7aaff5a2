"""A sending window through the real scheduler and dispatcher: recipients whose local window is
open are sent to at once; one outside it waits, and the broadcast says how many wait and
until when.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.e2e.conftest import Api, wait_for

pytestmark = pytest.mark.e2e


def test_recipients_outside_their_window_wait_and_the_broadcast_says_until_when(
    api: Api,
) -> None:
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    for address, zone in (("w-utc", "UTC"), ("w-none", None), ("w-far", "Etc/GMT-12")):
        api.ok(
            "POST",
            "/v1/contacts",
            201,
            json={"account_id": account["id"], "address": address, "time_zone": zone},
        )
    now = datetime.now(UTC)
    window = {
        "start": (now - timedelta(hours=1)).strftime("%H:%M"),
        "end": (now + timedelta(hours=1)).strftime("%H:%M"),
        "zone": "UTC",
    }
    b = api.broadcast(channel["id"], {}, sending_window=window)

    def two_sent() -> dict[str, Any] | bool:
        got = api.get(b["id"])
        return got["counts"]["sent"] == 2 and got["sending_window"]["waiting"] == 1 and got

    got = wait_for("the two in their window sent, the third waiting", two_sent, timeout=60)
    assert got["status"] == "in_progress"
    until = datetime.fromisoformat(got["sending_window"]["until"])
    assert now < until <= now + timedelta(hours=24)
    assert sorted(r["to"] for r in api.sim_requests(hook)) == ["w-none", "w-utc"]
    api.ok("POST", f"/v1/broadcasts/{b['id']}/cancel")
    done = api.wait_status(b["id"], "canceled")
    assert (done["counts"]["canceled"], done["sending_window"]["waiting"]) == (1, 0)

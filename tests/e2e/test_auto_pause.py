"""Auto-pause through the real scheduler and dispatcher: a broadcast whose sends start failing
pauses itself with the reason, the scheduler logs and counts it once, and resume continues.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Api, System, wait_for

pytestmark = pytest.mark.e2e

GOOD, BAD = 40, 60


def test_a_broadcast_whose_sends_fail_pauses_itself_and_resume_continues(
    api: Api, system: System
) -> None:
    bad = [f"ap-{i:03d}" for i in range(GOOD, GOOD + BAD)]
    channel, hook = api.webhook_channel(rate=200, fail_addresses=bad)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"ap-{i:03d}" for i in range(GOOD + BAD)])
    b = api.broadcast(channel["id"], {}, auto_pause={"failure_ratio": 0.5, "last": 20})
    paused = api.wait_status(b["id"], "paused", timeout=60)
    assert paused["status_reason"].startswith("auto-paused: ")
    assert "of the last 20 sends failed" in paused["status_reason"]
    assert paused["auto_paused_at"] is not None
    # It stopped well before the end: not every failing recipient was tried.
    assert paused["counts"]["sent"] == GOOD
    assert 10 <= paused["counts"]["failed"] < BAD
    lines = wait_for(
        "the scheduler's auto_paused line",
        lambda: [
            line
            for line in (json.loads(x) for x in system.procs.log("scheduler").splitlines() if x)
            if line.get("event") == "auto_paused"
        ],
    )
    assert [(x["broadcast_id"], x["channel_id"], x["level"]) for x in lines] == [
        (b["id"], channel["id"], "ERROR")
    ]
    # The cause fixed, resume goes on with the recipients not yet tried.
    system.sim.put(f"/_sim/hooks/{hook}", json={"secret": api.hook_secrets[hook]})
    api.ok("POST", f"/v1/broadcasts/{b['id']}/resume")
    done = api.wait_status(b["id"], "completed", timeout=60)
    tried_before = paused["counts"]["sent"] + paused["counts"]["failed"]
    assert done["counts"]["sent"] == GOOD + (GOOD + BAD - tried_before)
    assert done["counts"]["failed"] == paused["counts"]["failed"]

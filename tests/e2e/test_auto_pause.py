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
    # It stopped well before the end: not every failing recipient was tried. The good
    # recipients come first, but not all need be sent yet: one whose answer is still on its
    # way is counted once it comes, and one late for its slot (a busy machine) may have been
    # put back and waits for the resume; the end below shows each sent once.
    assert 0 < paused["counts"]["sent"] <= GOOD
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
    counts = done["counts"]
    # Every recipient ended sent or failed, once. A pause lets the calls already at the
    # provider finish, so a refusal may be counted after the task read "paused": the counts
    # then are a floor, not the last word.
    assert counts["sent"] + counts["failed"] == GOOD + BAD
    assert paused["counts"]["failed"] <= counts["failed"] < BAD
    # Resume went on with the recipients not yet tried, and only with them: each refused
    # address was called once and never again, every other one was accepted once.
    calls: dict[str, list[int]] = {}
    for request in api.sim_requests(hook):
        calls.setdefault(str(request["to"]), []).append(request["status"])
    refused = sorted(to for to, statuses in calls.items() if 404 in statuses)
    assert len(refused) == counts["failed"]
    assert all(calls[to] == [404] for to in refused)
    assert sorted(calls) == [f"ap-{i:03d}" for i in range(GOOD + BAD)]
    assert all(statuses == [200] for to, statuses in calls.items() if to not in refused)

"""Pause, resume and cancel while sending, as the operator sees them and as the provider does."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.e2e.conftest import Api, wait_for

pytestmark = pytest.mark.e2e

#: Pause and cancel must bite within this long of their commit.
BITE = 1.0


def sending_broadcast(api: Api, n: int, rate: float) -> tuple[dict[str, Any], str]:
    channel, hook = api.webhook_channel(rate=rate)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"p-{i}" for i in range(n)])
    b = api.broadcast(channel["id"], {})
    wait_for("the first sends", lambda: api.sim_stats(hook)["accepted"] >= 40)
    return b, hook


def test_pause_stops_provider_calls_and_resume_sends_exactly_the_rest(api: Api) -> None:
    b, hook = sending_broadcast(api, 400, rate=50)
    paused = api.ok("POST", f"/v1/broadcasts/{b['id']}/pause")
    paused_at = time.time()
    assert paused["status"] == "paused"
    time.sleep(BITE + 1.0)
    late = [r for r in api.sim_requests(hook) if r["t"] > paused_at + BITE]
    assert late == [], f"{len(late)} provider calls after the pause"
    stopped = api.get(b["id"])
    counts = stopped["counts"]
    assert stopped["status"] == "paused"
    assert counts["sent"] == api.sim_stats(hook)["accepted"]
    assert counts["queued"] == 400 - counts["sent"] > 0

    api.ok("POST", f"/v1/broadcasts/{b['id']}/resume")
    done = api.wait_status(b["id"], "completed")
    assert done["counts"]["sent"] == 400
    stats = api.sim_stats(hook)
    assert (stats["accepted"], stats["duplicates"], stats["requests"]) == (400, 0, 400)
    assert sorted(r["to"] for r in api.sim_requests(hook)) == sorted(f"p-{i}" for i in range(400))


def test_cancel_stops_provider_calls_and_leaves_the_rest_canceled(api: Api) -> None:
    b, hook = sending_broadcast(api, 400, rate=50)
    canceled = api.ok("POST", f"/v1/broadcasts/{b['id']}/cancel")
    canceled_at = time.time()
    assert canceled["status"] == "canceled"
    assert canceled["counts"]["canceled"] > 0
    time.sleep(BITE + 1.0)
    assert [r for r in api.sim_requests(hook) if r["t"] > canceled_at + BITE] == []
    final = wait_for(
        "every recipient to be final",
        lambda: (x := api.get(b["id"]))["counts"]["queued"] == 0 and x,
    )
    counts = final["counts"]
    assert final["status"] == "canceled"
    assert counts["sent"] == api.sim_stats(hook)["accepted"]
    assert counts["sent"] + counts["canceled"] == 400
    rows = api.ok(
        "GET", f"/v1/broadcasts/{b['id']}/recipients", params={"status": "canceled", "limit": 500}
    )["items"]
    assert len(rows) == counts["canceled"]
    assert api.sim_stats(hook)["duplicates"] == 0


def test_paused_before_start_is_not_started_when_due_and_resume_starts_it(api: Api) -> None:
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["q-1", "q-2"])
    later = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    b = api.broadcast(channel["id"], {}, send_at=later)
    assert api.ok("POST", f"/v1/broadcasts/{b['id']}/pause")["status"] == "paused"
    api.system.sql(
        "UPDATE broadcast SET send_at = now() - interval '1 second' WHERE id = %s", (b["id"],)
    )
    time.sleep(1.5)
    assert api.get(b["id"])["status"] == "paused"
    assert api.sim_stats(hook)["requests"] == 0
    assert api.ok("POST", f"/v1/broadcasts/{b['id']}/resume")["status"] == "pending"
    api.wait_status(b["id"], "completed")
    assert api.sim_stats(hook)["accepted"] == 2


def test_a_contact_who_opts_out_mid_send_is_skipped_not_sent(api: Api) -> None:
    channel, hook = api.webhook_channel(rate=10)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"o-{i:02d}" for i in range(40)])
    ids = api.contacts(account["id"])
    b = api.broadcast(channel["id"], {})
    wait_for("the first sends", lambda: api.sim_stats(hook)["accepted"] >= 3)
    api.ok("PATCH", f"/v1/contacts/{ids['o-39']}", json={"opted_out": True})
    done = api.wait_status(b["id"], "completed", timeout=120)
    assert (done["counts"]["sent"], done["counts"]["skipped"]) == (39, 1)
    [skipped] = api.ok("GET", f"/v1/broadcasts/{b['id']}/recipients", params={"status": "skipped"})[
        "items"
    ]
    assert (skipped["address"], skipped["last_error"]) == ("o-39", "skipped: contact opted out")
    assert "o-39" not in {r["to"] for r in api.sim_requests(hook)}

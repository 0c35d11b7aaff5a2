"""What operators read: every bcast process writes one JSON object a line (its own lines,
dramatiq's and uvicorn's alike), lines about a broadcast's work carry its ids as fields, the API
logs each request with its route, status and duration, and no credential appears anywhere.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.e2e.conftest import Api, System

SERVICES = ("api", "scheduler", "dispatcher")
KEYS = {"time", "level", "service", "logger", "pid", "message"}


def entries(system: System, name: str) -> list[dict[str, Any]]:
    out = []
    for number, line in enumerate(system.procs.log(name).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"{name}.log line {number} is not JSON: {line[:200]}") from None
        assert isinstance(entry, dict), line
        out.append(entry)
    return out


def test_every_line_is_one_json_object_with_the_ids_of_its_work(api: Api, system: System) -> None:
    channel, _ = api.webhook_channel(rate=500)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"log-{i}" for i in range(5)])
    b = api.broadcast(channel["id"], {})
    api.wait_status(b["id"], "completed", timeout=60)
    api.ok("GET", f"/v1/broadcasts/{b['id']}")
    logged = {name: entries(system, name) for name in SERVICES}
    for name, lines in logged.items():
        assert lines, f"{name} wrote nothing"
        for entry in lines:
            assert entry.keys() >= KEYS, entry
            assert entry["service"] == name
    # dramatiq's own lines and uvicorn's are in the same shape.
    assert any(e["logger"].startswith("dramatiq") for e in logged["dispatcher"])
    assert any(e["logger"].startswith("uvicorn") for e in logged["api"])
    # The work's ids are fields, not only words in the message.
    assert any(
        e.get("broadcast_id") == b["id"] and "batch_id" in e for e in logged["dispatcher"]
    ), "no dispatcher line carries the broadcast's id and a batch id"
    assert any(e.get("broadcast_id") == b["id"] for e in logged["scheduler"])
    # The access log: the route template, the status and the time taken.
    read = [
        e
        for e in logged["api"]
        if e["logger"] == "bcast.api.access" and e.get("path") == f"/v1/broadcasts/{b['id']}"
    ]
    assert read, "no access line for the request"
    assert read[-1]["route"] == "/v1/broadcasts/{broadcast_id}"
    assert read[-1]["status"] == 200
    assert read[-1]["duration_ms"] >= 0


def test_no_credential_is_ever_logged(api: Api, system: System) -> None:
    token = api.http.headers["Authorization"].split()[1]
    secret = "s3cr3t-" + token[-12:]
    channel = api.ok(
        "POST",
        "/v1/channels",
        201,
        json={
            "name": "log-secret",
            "kind": "webhook",
            "config": {"url": f"{system.sim_url}/hooks/nowhere", "secret": secret},
        },
    )
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["log-secret-1"])
    b = api.broadcast(channel["id"], {})
    api.wait_status(b["id"], "completed", timeout=60)
    for name in SERVICES:
        text = system.procs.log(name)
        assert token not in text, f"{name} logged an API token"
        assert secret not in text, f"{name} logged a channel secret"


def test_each_operator_action_on_a_broadcast_is_a_line_of_its_own(api: Api, system: System) -> None:
    channel, _ = api.webhook_channel(rate=500)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["life-1", "life-2"])
    later = (datetime.now(UTC) + timedelta(minutes=30)).isoformat()
    b = api.broadcast(channel["id"], {}, send_at=later)
    for action in ("pause", "resume", "cancel"):
        api.ok("POST", f"/v1/broadcasts/{b['id']}/{action}")
    events = [
        (e["event"], e["broadcast_status"])
        for e in entries(system, "api")
        if e.get("broadcast_id") == b["id"] and "event" in e
    ]
    assert events == [
        ("created", "pending"),
        ("paused", "paused"),
        ("resumed", "pending"),
        ("canceled", "canceled"),
    ]


def test_a_broadcast_s_life_is_told_in_lines_with_its_counts(api: Api, system: System) -> None:
    channel, _ = api.webhook_channel(
        rate=500, fail_addresses=["life-3"], throttle_ratio=0.3, retry_after=0.2, seed=5
    )
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"life-{i}" for i in range(12)])
    b = api.broadcast(channel["id"], {})
    api.wait_status(b["id"], "completed", timeout=60)

    def events(name: str, event: str) -> list[dict[str, Any]]:
        return [
            e
            for e in entries(system, name)
            if e.get("event") == event and e.get("broadcast_id") == b["id"]
        ]

    # The end is logged by a scheduler pass after the last result: wait for it.
    deadline = time.monotonic() + 30
    while not events("scheduler", "completed"):
        assert time.monotonic() < deadline, "no completed line from the scheduler"
        time.sleep(0.2)
    assert events("scheduler", "started")
    [snapshot] = events("dispatcher", "snapshotted")
    assert snapshot["recipients"] == 12
    assert snapshot["channel_id"] == channel["id"]
    runs = events("dispatcher", "run_ended")
    assert runs
    assert all("batch_id" in r and r["channel_id"] == channel["id"] for r in runs)
    assert sum(r["sent"] for r in runs) == 11
    assert sum(r["failed"] for r in runs) == 1
    reasons = [reason for r in runs for reason in r.get("failure_reasons", {})]
    assert reasons, "the failure's reason is in the run's summary"
    throttled = events("dispatcher", "throttled")
    assert throttled
    assert all(t["channel_id"] == channel["id"] for t in throttled)
    assert sum(r["throttled"] for r in runs) >= len(throttled)
    [done] = events("scheduler", "completed")
    assert (done["total"], done["sent"], done["failed"]) == (12, 11, 1)
    assert done["broadcast_status"] == "completed"
    assert done["channel_id"] == channel["id"]
    # Marked as logged: no later pass of any scheduler takes it again (tests/scheduler).
    [(marked,)] = system.sql(
        "SELECT end_logged_at IS NOT NULL FROM broadcast WHERE id = %s", (b["id"],)
    )
    assert marked

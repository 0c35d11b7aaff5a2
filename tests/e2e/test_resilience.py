"""Several schedulers and dispatchers at once, and crashes at the worst moments: nothing lost,
nothing sent twice (a repeat after a hard kill carries the same idempotency key).
"""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from services.scheduler.scheduler import claim_due
from shared.db.engine import make_engine
from tests.e2e.conftest import Api, System, wait_for

pytestmark = pytest.mark.e2e


def test_two_schedulers_and_three_dispatcher_processes_lose_nothing_and_repeat_nothing(
    api: Api, system: System
) -> None:
    procs = system.procs
    procs.start("scheduler-2", "scheduler")
    procs.start("dispatcher-2", "dispatcher", "--processes", "1", "--threads", "4")
    procs.start("dispatcher-3", "dispatcher", "--processes", "1", "--threads", "4")
    try:
        expected: dict[str, int] = {}
        broadcasts = []
        for _ in range(2):
            channel, hook = api.webhook_channel(rate=2000)
            account = api.account(channel["id"])
            api.import_contacts(account["id"], [f"m-{i}" for i in range(900)], tags=["all"])
            for _ in range(3):
                broadcasts.append(api.broadcast(channel["id"], {"tag_ids": [api.tag_id("all")]}))
            expected[hook] = 3 * 900
        for b in broadcasts:
            done = api.wait_status(b["id"], "completed")
            assert done["counts"]["sent"] == 900
        for hook, n in expected.items():
            stats = api.sim_stats(hook)
            assert (stats["requests"], stats["accepted"], stats["duplicates"]) == (n, n, 0), hook
    finally:
        for name in ("scheduler-2", "dispatcher-2", "dispatcher-3"):
            procs.stop(name)


def test_a_crash_between_commit_and_publish_loses_nothing(api: Api, system: System) -> None:
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"o-{i}" for i in range(10)])
    later = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    b = api.broadcast(channel["id"], {}, send_at=later)
    system.procs.stop("scheduler")
    try:
        system.sql("UPDATE broadcast SET send_at = now() WHERE id = %s", (b["id"],))
        engine = make_engine(system.database_url, pool_size=1)
        with Session(engine) as session, session.begin():
            started, _ = claim_due(session, timedelta(hours=1))
        engine.dispose()
        assert b["id"] in started
        # The scheduler "died" here: committed, never published.
        assert system.sql(
            "SELECT count(*) FROM dispatch_outbox WHERE broadcast_id = %s", (b["id"],)
        ) == [(1,)]
        time.sleep(1)
        assert api.get(b["id"])["status"] == "in_progress"
        assert api.sim_stats(hook)["requests"] == 0
    finally:
        system.procs.start("scheduler", "scheduler")
    api.wait_status(b["id"], "completed")
    assert api.sim_stats(hook)["accepted"] == 10
    assert system.sql(
        "SELECT count(*) FROM dispatch_outbox WHERE broadcast_id = %s", (b["id"],)
    ) == [(0,)]


def test_a_lost_start_message_is_handed_out_again(api: Api, system: System) -> None:
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"l-{i}" for i in range(10)])
    later = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    b = api.broadcast(channel["id"], {}, send_at=later)
    # Started, but its message never reached a dispatcher (a broker that lost it).
    system.sql(
        "UPDATE broadcast SET status = 'in_progress', send_at = now(), started_at = now(), "
        "heartbeat_at = now() - interval '1 minute' WHERE id = %s",
        (b["id"],),
    )
    api.wait_status(b["id"], "completed")
    assert api.sim_stats(hook)["accepted"] == 10


def test_a_killed_dispatcher_loses_nothing(api: Api, system: System) -> None:
    procs = system.procs
    procs.stop("dispatcher")
    procs.start("victim", "dispatcher", "--processes", "1", "--threads", "4")
    try:
        channel, hook = api.webhook_channel(rate=80)
        account = api.account(channel["id"])
        api.import_contacts(account["id"], [f"k-{i}" for i in range(300)])
        b = api.broadcast(channel["id"], {})
        wait_for("sending to be under way", lambda: api.sim_stats(hook)["accepted"] >= 60)
        procs.stop("victim", sig=signal.SIGKILL)
        killed_at = api.sim_stats(hook)["requests"]
    finally:
        procs.start("dispatcher", "dispatcher", "--processes", "1", "--threads", "4")
    done = api.wait_status(b["id"], "completed", timeout=120)
    assert done["counts"]["sent"] == 300
    stats = api.sim_stats(hook)
    assert stats["accepted"] == 300, "every recipient reached"
    # Only a send whose answer was not yet written when the process died can go out again,
    # and it carries the same idempotency key, so the provider keeps one.
    assert stats["duplicates"] <= 5, stats
    assert killed_at < 300


def test_a_task_found_long_overdue_is_paused_with_a_reason_and_resumes_on_request(
    api: Api, system: System
) -> None:
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["late-1"])
    later = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    b = api.broadcast(channel["id"], {}, send_at=later)
    system.sql(
        "UPDATE broadcast SET send_at = now() - interval '2 hours' WHERE id = %s", (b["id"],)
    )
    paused = api.wait_status(b["id"], "paused")
    assert paused["status_reason"].startswith("overdue: it was due at")
    assert "limit 60 min" in paused["status_reason"]
    time.sleep(1)
    assert api.sim_stats(hook)["requests"] == 0
    api.ok("POST", f"/v1/broadcasts/{b['id']}/resume", json={"confirm_late_start": True})
    api.wait_status(b["id"], "completed")
    assert api.sim_stats(hook)["accepted"] == 1


def test_a_dispatcher_stopped_mid_send_gives_back_its_rows_and_nothing_repeats(
    api: Api, system: System
) -> None:
    procs = system.procs
    procs.stop("dispatcher")
    procs.start("leaving", "dispatcher", "--processes", "1", "--threads", "4")
    try:
        channel, hook = api.webhook_channel(rate=80, latency_ms=20)
        account = api.account(channel["id"])
        api.import_contacts(account["id"], [f"g-{i}" for i in range(300)])
        b = api.broadcast(channel["id"], {})
        wait_for("sending to be under way", lambda: api.sim_stats(hook)["accepted"] >= 60)
        procs.stop("leaving")  # SIGTERM, as a deploy or a scale-down would
        # A normal stop reads as one: lifecycle lines, no error, no traceback.
        stopped = [json.loads(line) for line in procs.log("leaving").splitlines() if line]
        assert any("giving back its batches" in e["message"] for e in stopped)
        assert [e for e in stopped if e["level"] in ("ERROR", "CRITICAL") or "traceback" in e] == []
        # A stop is no restart of its consumers (dramatiq says so when it ends their fetch
        # loops while they should go on, as ``worker.pause()`` does).
        assert [e for e in stopped if e["message"].startswith("Restarting consumer")] == []
        # Gone, and it kept nothing: every row is sent or back in the queue, none held.
        held = system.sql(
            "SELECT count(*) FROM delivery WHERE broadcast_id = %s AND status = 'sending'",
            (b["id"],),
        )
        assert held == [(0,)]
        sent_so_far = api.sim_stats(hook)["accepted"]
        assert sent_so_far < 300
    finally:
        procs.start("dispatcher", "dispatcher", "--processes", "1", "--threads", "4")
    done = api.wait_status(b["id"], "completed", timeout=120)
    assert done["counts"]["sent"] == 300
    stats = api.sim_stats(hook)
    assert (stats["accepted"], stats["duplicates"], stats["requests"]) == (300, 0, 300)

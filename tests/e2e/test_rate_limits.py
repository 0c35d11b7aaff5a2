"""Provider rate limits held across every dispatcher process, and a 429 storm on one channel."""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import Api, System

pytestmark = pytest.mark.e2e


def test_five_channels_at_20_per_second_never_exceed_it_with_four_dispatcher_processes(
    api: Api, system: System
) -> None:
    procs = system.procs
    procs.start("dispatchers-3", "dispatcher", "--processes", "3", "--threads", "4")
    try:
        time.sleep(3)  # let the extra workers boot so all four processes share the work
        hooks, broadcasts = [], []
        for _ in range(5):
            # The simulator also enforces 20/s: any excess would come back as a 429.
            channel, hook = api.webhook_channel(rate=20, rate_limit_per_second=20)
            account = api.account(channel["id"])
            api.import_contacts(account["id"], [f"r-{i}" for i in range(120)])
            hooks.append(hook)
            broadcasts.append(api.broadcast(channel["id"], {}))
        for b in broadcasts:
            api.wait_status(b["id"], "completed", timeout=120)
        for hook in hooks:
            stats = api.sim_stats(hook)
            assert stats["max_in_any_second"] <= 20, stats
            assert stats["throttled"] == 0, stats
            assert (stats["accepted"], stats["duplicates"]) == (120, 0), stats
    finally:
        procs.stop("dispatchers-3")


def test_a_429_storm_backs_one_channel_off_as_told_and_leaves_the_others_alone(
    api: Api, system: System
) -> None:
    stormy, storm_hook = api.webhook_channel(rate=50, throttle_ratio=1.0, retry_after=2)
    calm, calm_hook = api.webhook_channel(rate=50)
    for channel in (stormy, calm):
        account = api.account(channel["id"])
        api.import_contacts(account["id"], [f"s-{i}" for i in range(100)])
    storm = api.broadcast(stormy["id"], {})
    quiet = api.broadcast(calm["id"], {})
    calm_done = api.wait_status(quiet["id"], "completed")
    assert calm_done["counts"]["sent"] == 100
    # The calm channel finished while the stormy one was still being told to wait.
    assert api.get(storm["id"])["status"] == "in_progress"
    assert api.sim_stats(calm_hook)["throttled"] == 0
    assert api.sim_stats(storm_hook)["throttled"] > 0, "the stormy channel was tried and refused"
    # The storm ends: the simulator accepts again (its records so far are kept).
    assert (
        system.sim.put(f"/_sim/hooks/{storm_hook}", json={"throttle_ratio": 0.0}).status_code == 200
    )
    done = api.wait_status(storm["id"], "completed", timeout=120)
    assert done["counts"]["sent"] == 100
    requests = api.sim_requests(storm_hook)
    throttled_at = [r["t"] for r in requests if r.get("status") == 429]
    assert throttled_at
    # After each 429 (Retry-After: 2) nothing more reached the provider until the wait was
    # over, but for calls already under way when the answer came (well under 0.3 s).
    for t in throttled_at:
        too_early = [r for r in requests if t + 0.3 < r["t"] < t + 2.0 - 0.05]
        assert too_early == [], f"{len(too_early)} calls during a Retry-After wait"
    stats = api.sim_stats(storm_hook)
    assert (stats["accepted"], stats["duplicates"]) == (100, 0)

"""Fair under any mix of channels: many rate-limited channels, slow providers and a fast channel
on one dispatcher with few threads. Rates are measured where the provider sees them.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.e2e.conftest import Api, System, wait_for

pytestmark = pytest.mark.e2e

#: The share of its own limit every channel must reach.
SHARE = 0.9
#: How soon a new broadcast on an idle channel must reach its provider, however busy the rest.
START_WITHIN = 1.0


def arrivals(api: Api, hook: str, *, answered: bool = True) -> list[float]:
    """When each call reached the provider; all answered 200 unless some are still under way."""
    requests = api.sim_requests(hook)
    if answered:
        assert all(r.get("status") == 200 for r in requests), "every call accepted"
    return sorted(r["t"] for r in requests)


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def start_broadcast(api: Api, rate_limit: float, n: int, **sim: Any) -> tuple[dict[str, Any], str]:
    channel, hook = api.webhook_channel(rate=rate_limit, **sim)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"{hook}-{i}" for i in range(n)])
    return api.broadcast(channel["id"], {}), hook


def fast_broadcast_keeps_its_pace(api: Api, limit: float, n: int) -> dict[str, float]:
    """Start a broadcast on an idle, fast channel now; return how soon it started and its rate."""
    channel, hook = api.webhook_channel(rate=limit, latency_ms=20)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"{hook}-{i}" for i in range(n)])
    created = time.time()
    b = api.broadcast(channel["id"], {})
    api.wait_status(b["id"], "completed")
    times = arrivals(api, hook)
    assert len(times) == n
    return {"started_after": times[0] - created, "rate": rate(times)}


def test_more_rate_limited_channels_than_threads_and_a_fast_one_each_get_their_limit(
    api: Api, system: System
) -> None:
    # The dispatcher has 4 threads; 8 channels at 10/s each have a broadcast of 6 s or more.
    slow = [start_broadcast(api, 10, 60, latency_ms=50) for _ in range(8)]
    wait_for(
        "every slow channel to be sending",
        lambda: all(api.sim_stats(hook)["requests"] > 0 for _, hook in slow),
    )
    fast = fast_broadcast_keeps_its_pace(api, limit=300, n=900)
    assert fast["started_after"] < START_WITHIN, fast
    assert fast["rate"] >= SHARE * 300, fast
    for b, hook in slow:
        api.wait_status(b["id"], "completed")
        times = arrivals(api, hook)
        assert len(times) == 60
        assert rate(times) >= SHARE * 10, (hook, rate(times))
        assert api.sim_stats(hook)["max_in_any_second"] <= 10


def test_a_provider_that_answers_in_seconds_takes_only_its_share(api: Api, system: System) -> None:
    slow, hook = start_broadcast(api, 200, 2000, latency_ms=3000)
    # Its lane fills up: 64 calls (BCAST_CHANNEL_MAX_IN_FLIGHT) waiting three seconds each.
    wait_for("the slow provider's calls to pile up", lambda: api.sim_stats(hook)["requests"] >= 64)
    try:
        fast = fast_broadcast_keeps_its_pace(api, limit=300, n=900)
        assert fast["started_after"] < START_WITHIN, fast
        assert fast["rate"] >= SHARE * 300, fast
        # The slow channel never had more calls at its provider than its share of the process.
        started = arrivals(api, hook, answered=False)
        at_once = max(sum(1 for u in started if t <= u < t + 3.0) for t in started)
        assert at_once <= 64
    finally:
        api.ok("POST", f"/v1/broadcasts/{slow['id']}/cancel")


def test_each_dispatcher_process_keeps_a_fixed_number_of_database_connections(
    api: Api, system: System
) -> None:
    procs = system.procs
    database = system.database_url.rsplit("/", 1)[1]

    def dispatcher_connections() -> int:
        [(count,)] = system.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND application_name LIKE 'bcast-dispatcher%%'",
            (database,),
        )
        return int(count)

    procs.stop("dispatcher")
    wait_for("the dispatcher's connections to close", lambda: dispatcher_connections() == 0)
    procs.start("wide", "dispatcher", "--processes", "2", "--threads", "16")
    try:
        # Two processes, each a pool of 2 (BCAST_DISPATCHER_DB_CONNECTIONS), one connection for
        # copies of small audiences and one listener, whatever their 16 threads and however
        # busy they are.
        wait_for("both processes to connect", lambda: dispatcher_connections() == 8)
        b, hook = start_broadcast(api, 2000, 3000, latency_ms=5)
        seen = set()
        deadline = time.monotonic() + 60
        while api.get(b["id"])["status"] != "completed":
            seen.add(dispatcher_connections())
            assert time.monotonic() < deadline, "the broadcast did not complete"
            time.sleep(0.05)
        assert seen == {8}
        assert api.sim_stats(hook)["accepted"] == 3000
    finally:
        procs.stop("wide")
        procs.start("dispatcher", "dispatcher", "--processes", "1", "--threads", "4")


def test_a_dispatcher_started_during_a_send_gets_a_share_of_it(api: Api, system: System) -> None:
    # 8,000 recipients at 800/s on one channel: 40 batches of 200, at most 16 of them in
    # flight. The dispatcher running when the send starts holds all 16; one started a moment
    # later must get batches of the same broadcast (a scale-up helps the send under way).
    n = 8000
    channel, hook = api.webhook_channel(rate=800, latency_ms=5)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"{hook}-{i}" for i in range(n)])
    b = api.broadcast(channel["id"], {})
    wait_for("the send to be under way", lambda: api.sim_stats(hook)["accepted"] > 0)
    system.procs.start("dispatcher-late", "dispatcher", "--processes", "1", "--threads", "2")
    try:
        wait_for(
            "the late dispatcher to run batches of the broadcast",
            lambda: f"broadcast {b['id']} batch" in system.procs.log("dispatcher-late"),
            timeout=60,
        )
        assert api.sim_stats(hook)["accepted"] < n, "it joined while the send was under way"
        api.wait_status(b["id"], "completed")
    finally:
        system.procs.stop("dispatcher-late")
    stats = api.sim_stats(hook)
    assert (stats["accepted"], stats["duplicates"]) == (n, 0)

"""Rate arithmetic against the real database: slots of a channel never closer than 1/rate,
only within the horizon asked for, pushed back by a provider's Retry-After, shared by runs.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool

from services.dispatcher import metrics
from services.dispatcher.ratelimit import (
    CLOCK_DRIFT,
    HEADROOM,
    OffsetSample,
    RateLimiter,
    SlotCache,
    better_offset,
)
from shared.db.engine import libpq_url
from shared.domain.channels import MAX_RATE_PER_SECOND
from tests.conftest import Api

UNUSED = "bcast_channel_slots_unused_total"


def with_limiter(
    database_url: str, body: Callable[[RateLimiter], Awaitable[Any]], *, size: int = 4
) -> Any:
    async def go() -> Any:
        async with AsyncConnectionPool(
            libpq_url(database_url), min_size=1, max_size=size, kwargs={"autocommit": True}
        ) as pool:
            return await body(RateLimiter(pool))

    return asyncio.run(go())


def gaps(times: list[float]) -> list[float]:
    ordered = sorted(times)
    return [b - a for a, b in itertools.pairwise(ordered)]


def test_slots_are_one_interval_apart_and_only_within_the_horizon(
    api: Api, database_url: str
) -> None:
    channel = api.channel()["id"]
    rate = 100.0
    interval = 1 / (rate * HEADROOM)

    async def body(limiter: RateLimiter) -> None:
        before = time.time()
        first = await limiter.reserve(channel, api.workspace_id, rate, 500, within=0.5)
        # Slots start now; as many as start within half a second, not the 500 asked for.
        assert len(first.times) == int(0.5 / interval) + 1
        assert first.times[0] == pytest.approx(before, abs=0.05)
        assert gaps(first.times) == pytest.approx([interval] * (len(first.times) - 1), abs=1e-5)
        assert first.next_free == pytest.approx(first.times[-1] + interval)
        # The channel is now booked half a second ahead: nothing more starts within 0.1 s ...
        none = await limiter.reserve(channel, api.workspace_id, rate, 5, within=0.1)
        assert none.times == []
        assert none.next_free == pytest.approx(first.next_free, abs=0.01)
        # ... and the next slots follow the last ones without a gap or an overlap.
        more = await limiter.reserve(channel, api.workspace_id, rate, 5, within=1.0)
        assert more.times[0] == pytest.approx(first.next_free, abs=0.01)
        assert gaps(first.times + more.times)[-6:] == pytest.approx([interval] * 6, abs=1e-3)

    with_limiter(database_url, body)


def test_slots_taken_at_once_by_many_workers_never_overlap(api: Api, database_url: str) -> None:
    channel = api.channel()["id"]
    rate = 200.0
    interval = 1 / (rate * HEADROOM)

    async def body(limiter: RateLimiter) -> list[float]:
        async def worker() -> list[float]:
            taken: list[float] = []
            for _ in range(10):
                got = await limiter.reserve(channel, api.workspace_id, rate, 7, within=5.0)
                taken.extend(got.times)
            return taken

        return [t for ts in await asyncio.gather(*(worker() for _ in range(6))) for t in ts]

    times = with_limiter(database_url, body, size=6)
    assert len(times) == 6 * 10 * 7
    # Spaced in the database's clock; read on this one within a millisecond of it.
    assert min(gaps(times)) >= interval - 0.001
    # No one-second window holds more than the rate allows.
    ordered = sorted(times)
    for i, t in enumerate(ordered):
        in_window = sum(1 for u in ordered[i:] if u < t + 1.0)
        assert in_window <= rate


def test_at_the_highest_rate_single_slots_never_come_closer_than_the_rate(
    api: Api, database_url: str
) -> None:
    # A slot at 100,000 a second is 10.4 microseconds, finer than a timestamp's grain: the
    # channel's row must move on by at least that for every slot, however they are taken.
    channel = api.channel(rate_limit_per_second=MAX_RATE_PER_SECOND)["id"]
    rate = float(MAX_RATE_PER_SECOND)
    taken = 2_000

    async def body(limiter: RateLimiter) -> tuple[Decimal, Decimal]:
        # Booked 10 s ahead first, so each slot below follows the last, not the clock.
        ahead = await limiter.reserve(
            channel, api.workspace_id, rate, int(rate * HEADROOM * 10), within=60.0
        )
        assert ahead.next_free > time.time() + 5
        async with limiter.pool.connection() as conn:
            start = await (await conn.execute(TAT, (channel,))).fetchone()
        for _ in range(taken):
            got = await limiter.reserve(channel, api.workspace_id, rate, 1, within=60.0)
            assert len(got.times) == 1
        async with limiter.pool.connection() as conn:
            end = await (await conn.execute(TAT, (channel,))).fetchone()
        assert start is not None
        assert end is not None
        return start[0], end[0]

    start, end = with_limiter(database_url, body)
    moved_us = float((end - start) * 1_000_000)
    exact_us = taken / (rate * HEADROOM) * 1e6
    assert moved_us >= exact_us
    # Rounded up by less than a microsecond a slot.
    assert moved_us <= exact_us + taken


TAT = "SELECT extract(epoch FROM tat)::numeric FROM channel_rate WHERE channel_id = %s"


def test_a_providers_retry_after_pushes_the_channel_back_for_everyone(
    api: Api, database_url: str
) -> None:
    channel = api.channel()["id"]

    async def body(limiter: RateLimiter) -> None:
        await limiter.reserve(channel, api.workspace_id, 50.0, 1, within=1.0)
        await limiter.throttle(channel, 3.0, "HTTP 429")
        assert 2.5 < limiter.blocked_for(channel) <= 3.0
        # Another process's limiter knows nothing yet, but the database does.
        other = RateLimiter(limiter.pool)
        got = await other.reserve(channel, api.workspace_id, 50.0, 10, within=1.0)
        assert got.times == []
        assert got.next_free >= time.time() + 2.5
        assert other.blocked_for(channel) > 2.5
        # The notice other workers hear says the same.
        third = RateLimiter(limiter.pool)
        third.hear(f"{channel}:{time.time() + 2}")
        assert 1.5 < third.blocked_for(channel) <= 2.0
        third.hear("not a notice")
        assert third.blocked_for(channel + 1000) == 0.0

    with_limiter(database_url, body)


def test_the_slot_cache_takes_a_block_and_serves_runs_from_it(api: Api, database_url: str) -> None:
    channel = api.channel()["id"]
    rate = 1000.0

    async def body(limiter: RateLimiter) -> None:
        calls = 0
        real = limiter.reserve

        async def counted(*args: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            return await real(*args, **kw)

        limiter.reserve = counted  # type: ignore[method-assign]
        cache = SlotCache(limiter, channel, api.workspace_id, "webhook")
        labels = {"channel": str(channel), "kind": "webhook", "reason": "left"}
        unused_before = REGISTRY.get_sample_value(UNUSED, labels) or 0.0
        taken: list[float] = []
        for _ in range(8):
            got = await cache.take(rate, 10, within=1.0, block=100)
            taken.extend(got.times)
        assert len(taken) == 80
        assert calls == 1, "one round trip for a block of 100"
        assert len(set(taken)) == 80
        assert cache.unused_by == {"late": 0, "stopped": 0, "left": 0}
        # A slot left unused past its time is dropped, never used late, and counted: the 20
        # of the block no run took are the channel's capacity lost.
        await asyncio.sleep(0.2)
        later = await cache.take(rate, 10, within=1.0, block=100)
        assert min(later.times) >= time.time() - 0.03
        assert calls == 2
        assert cache.unused_by == {"late": 0, "stopped": 0, "left": 20}
        metrics.TALLY.flush()
        assert REGISTRY.get_sample_value(UNUSED, labels) == unused_before + 20

    with_limiter(database_url, body)


def test_a_cache_takes_no_more_ahead_than_its_callers_need(api: Api, database_url: str) -> None:
    # A run's last rows: the block would leave slots nobody here sends in, while other
    # processes wait for the channel. The slots not taken stay in the channel's row.
    channel = api.channel()["id"]
    rate = 1000.0

    async def body(limiter: RateLimiter) -> None:
        cache = SlotCache(limiter, channel, api.workspace_id, "webhook")
        got = await cache.take(rate, 5, within=1.0, block=100, need=7)
        assert len(got.times) == 5
        # Two more at hand for the caller's other rows, none beyond: the next slot is the
        # channel's, one interval after the seventh.
        assert cache.take_at_hand(within=1.0) is not None
        assert cache.take_at_hand(within=1.0) is not None
        assert cache.take_at_hand(within=1.0) is None
        other = SlotCache(limiter, channel, api.workspace_id, "webhook")
        theirs = await other.take(rate, 1, within=1.0, block=1)
        step = 1 / (rate * HEADROOM)
        assert theirs.times[0] == pytest.approx(got.times[0] + 7 * step, abs=1e-5)
        # What the caller needs now is taken however small the need said it is.
        more = await cache.take(rate, 4, within=1.0, block=100, need=2)
        assert len(more.times) == 4
        # Without a need, a block: the next take is served from the cache.
        await cache.take(rate, 1, within=1.0, block=100)
        at_hand = 0
        while cache.take_at_hand(within=1.0) is not None:
            at_hand += 1
        assert at_hand >= 90

    with_limiter(database_url, body)


def test_slots_start_when_the_channel_row_is_ours_not_when_we_began_to_wait_for_it(
    api: Api, database_url: str
) -> None:
    channel = api.channel()["id"]
    rate = 100.0
    interval = 1 / (rate * HEADROOM)
    with_limiter(
        database_url,
        lambda limiter: limiter.reserve(channel, api.workspace_id, rate, 1, within=0.1),
    )
    held, released = threading.Event(), []

    def hold() -> None:
        # Another process reserving slots of the channel holds its row for a moment.
        with psycopg.connect(libpq_url(database_url)) as other:
            other.execute("SELECT 1 FROM channel_rate WHERE channel_id = %s FOR UPDATE", (channel,))
            held.set()
            time.sleep(0.5)
            released.append(time.time())

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)

    async def body(limiter: RateLimiter) -> Any:
        return await limiter.reserve(channel, api.workspace_id, rate, 500, within=0.5)

    slots = with_limiter(database_url, body)
    holder.join()
    # The horizon counts from when the row was ours: a clock read before the wait would have
    # dated the slots half a second back and granted none, or a burst of stale ones.
    assert slots.times[0] >= released[0] - 0.05
    assert len(slots.times) == int(0.5 / interval) + 1


@pytest.mark.parametrize(
    ("kept", "new", "now", "chosen"),
    [
        # Nothing kept yet: the new one, however long its trip.
        (None, OffsetSample(0.004, 0.008, 100.0), 100.0, "new"),
        # A shorter trip: the new one.
        (OffsetSample(0.0, 0.002, 40.0), OffsetSample(0.0001, 0.0002, 100.0), 100.0, "new"),
        # A longer trip while the one kept is recent: the kept one (its error: 0.1 ms + 60 s
        # of drift, 3 ms; the new one's: 4 ms).
        (OffsetSample(0.0, 0.0002, 40.0), OffsetSample(0.004, 0.008, 100.0), 100.0, "kept"),
        # The same trip later: the new one (as sure, and no drift yet).
        (OffsetSample(0.0, 0.001, 40.0), OffsetSample(0.0002, 0.001, 100.0), 100.0, "new"),
        # The kept one, 50 s old, may be off by 2.6 ms; at 150 s old, by 7.6 ms: then the new
        # one's 4 ms is surer.
        (OffsetSample(0.0, 0.0002, 50.0), OffsetSample(0.004, 0.008, 100.0), 100.0, "kept"),
        (OffsetSample(0.0, 0.0002, 50.0), OffsetSample(0.004, 0.008, 200.0), 200.0, "new"),
    ],
)
def test_an_offset_measured_over_a_longer_trip_does_not_replace_a_surer_one(
    kept: OffsetSample | None, new: OffsetSample, now: float, chosen: str
) -> None:
    assert better_offset(kept, new, now) is (new if chosen == "new" else kept)
    assert new.error(now) == pytest.approx(new.round_trip / 2 + (now - new.at) * CLOCK_DRIFT)


def test_a_limiter_keeps_its_surest_offset_across_measurements(database_url: str) -> None:
    async def body(limiter: RateLimiter) -> tuple[float, float, float]:
        # The database is on this machine: the measured offset is close to nothing.
        measured = await limiter.offset()
        # A measurement known to be exact (a zero-length trip) stands in for it, 0.25 s off
        # this machine's clock on purpose: the next measurement, over a real trip, is less
        # sure and leaves it in place.
        limiter._sample = OffsetSample(0.25, 0.0, time.monotonic())
        limiter._measured = -1e9
        kept = await limiter.offset()
        # Once it is old enough to have drifted more than a trip's length, a new one counts.
        limiter._sample = OffsetSample(0.25, 0.0, time.monotonic() - 3600)
        limiter._measured = -1e9
        replaced = await limiter.offset()
        return measured, kept, replaced

    measured, kept, replaced = with_limiter(database_url, body)
    assert abs(measured) < 0.01
    assert kept == 0.25
    assert abs(replaced) < 0.01

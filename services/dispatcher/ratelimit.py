"""A channel's rate limit, held exactly across every dispatcher process and machine.

The state is one row per channel in Postgres (``channel_rate``), run as GCRA: ``tat`` is the
earliest moment the next send may start. Taking ``n`` slots moves ``tat`` forward by ``n/rate``
in one UPDATE, so slots of all workers interleave without overlap: however many processes
send, no two slots are closer than ``1/rate``. A send loop takes only slots that start within
a short horizon; when the channel is booked further ahead (other loops, other processes, a
provider's Retry-After) it learns when the next slot is free and gives its work back until
then instead of waiting. A provider's 429 / Retry-After pushes ``blocked_until`` for the
channel and NOTIFYs ``bcast_channel``; every worker stops calling that channel until then,
while other channels keep their full speed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from services.dispatcher import metrics
from services.dispatcher.status import CHANNEL_CHANNEL

#: Slots taken per round trip cover at most this much time, so a pause wastes little.
GRANT_SECONDS = 0.2
#: Fraction of the configured rate actually used. Slots 1/(rate x HEADROOM) apart put at most
#: ``rate`` of them in any one-second window even if some go out up to 1/HEADROOM - 1 (41 ms)
#: late: ``LATE_TOLERANCE`` of that is lateness the send loop allows, the rest room for what
#: happens between the last check and the provider's count (the event loop, the network, the
#: clocks, and above all a busy provider reading requests late: see docs/performance.md).
HEADROOM = 0.96
#: A slot not used within this long after its time is dropped, never used late.
LATE_TOLERANCE = 0.015
#: The offset between this machine's clock and the database's is measured again this often.
OFFSET_MAX_AGE = 60.0
#: Round trips per measurement; the quickest one gives the offset.
OFFSET_PROBES = 5
#: How fast two clocks may drift apart (a generous bound for clocks kept by NTP): what a
#: measurement of the offset may have become wrong by since it was made.
CLOCK_DRIFT = 50e-6


@dataclass(frozen=True, slots=True)
class OffsetSample:
    """One measurement of the offset between this machine's clock and the database's."""

    #: Local clock minus the database's, in seconds.
    offset: float
    #: The round trip it was measured over: the offset is the trip's midpoint, so it is off
    #: by at most half of it.
    round_trip: float
    #: When it was measured (monotonic seconds).
    at: float

    def error(self, now: float) -> float:
        """How far off it may be at ``now``: half its round trip, and the drift since."""
        return self.round_trip / 2 + max(0.0, now - self.at) * CLOCK_DRIFT


def better_offset(kept: OffsetSample | None, new: OffsetSample, now: float) -> OffsetSample:
    """The measurement to use: the new one unless the one kept may be off by less. A round trip
    made while the event loop or the database was busy can be milliseconds long, and half of
    it is the new offset's possible error; every process converts slots with its own offset,
    so such an error puts one process's sends that much out of step with the others', inside
    the lateness a provider's one-second window can take (``HEADROOM``). A measurement over a
    short trip is kept until the drift it may have gathered makes a new one better.
    """
    if kept is None or new.error(now) <= kept.error(now):
        return new
    return kept


@dataclass(frozen=True, slots=True)
class Slots:
    """Send slots taken for one channel."""

    #: Wall-clock start of each slot taken, in order (empty when none starts soon enough).
    times: list[float]
    #: Wall-clock time of the channel's first free slot after these.
    next_free: float


class RateLimiter:
    """Hands out send slots for channels, shared through Postgres.

    Parameters:
      pool: autocommit connections.
    """

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        self._known: set[int] = set()
        #: channel id -> wall-clock time before which no call may start.
        self._blocked_until: dict[int, float] = {}
        #: The measurement of the local clock minus the database's in use, and when the offset
        #: was last measured (monotonic).
        self._sample: OffsetSample | None = None
        self._measured = -OFFSET_MAX_AGE
        self._measuring = asyncio.Lock()

    def grant_size(self, rate: float, wanted: int) -> int:
        """How many slots to take in one round trip."""
        return max(1, min(wanted, int(rate * HEADROOM * GRANT_SECONDS)))

    async def offset(self) -> float:
        """Seconds this machine's clock is ahead of the database's (NTP-style: the midpoint of
        the quickest of a few round trips, kept while no later one can be surer: see
        ``better_offset``). Slots are spaced in the database's clock and all convert with this
        one offset, so their spacing survives the trip to this process.
        """
        if self._sample is not None and time.monotonic() - self._measured < OFFSET_MAX_AGE:
            return self._sample.offset
        async with self._measuring:
            if time.monotonic() - self._measured >= OFFSET_MAX_AGE:
                best: tuple[float, float] | None = None
                async with self.pool.connection() as conn:
                    for _ in range(OFFSET_PROBES):
                        sent = time.time()
                        row = await (
                            await conn.execute("SELECT extract(epoch FROM clock_timestamp())")
                        ).fetchone()
                        back = time.time()
                        assert row is not None
                        if best is None or back - sent < best[0]:
                            best = (back - sent, (sent + back) / 2 - float(row[0]))
                assert best is not None
                now = time.monotonic()
                self._sample = better_offset(self._sample, OffsetSample(best[1], best[0], now), now)
                self._measured = now
        assert self._sample is not None
        return self._sample.offset

    async def reserve(
        self, channel_id: int, workspace_id: int, rate: float, n: int, *, within: float
    ) -> Slots:
        """Take up to ``n`` consecutive slots, only those that start within ``within`` seconds."""
        effective = rate * HEADROOM
        offset = await self.offset()
        async with self.pool.connection() as conn:
            if channel_id not in self._known:
                await conn.execute(
                    "INSERT INTO channel_rate (channel_id, workspace_id) VALUES (%s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (channel_id, workspace_id),
                )
                self._known.add(channel_id)
            row = await (
                await conn.execute(
                    """
                    WITH locked AS MATERIALIZED (
                        SELECT channel_id, tat, blocked_until FROM channel_rate
                        WHERE channel_id = %(c)s FOR UPDATE
                    ), read AS MATERIALIZED (
                        -- The clock is read once (two readings could differ and cost a slot),
                        -- and only once the row is ours: after any wait for the lock.
                        SELECT *, clock_timestamp() AS now FROM locked
                    ), cur AS (
                        SELECT channel_id, now, blocked_until,
                               greatest(tat, now, coalesce(blocked_until, '-infinity')) AS base
                        FROM read
                    ), took AS (
                        SELECT *, CASE
                            WHEN base > now + %(within)s * interval '1 second' THEN 0
                            ELSE least(%(n)s, 1 + floor(extract(epoch FROM
                                 now + %(within)s * interval '1 second' - base) * %(rate)s))::int
                            END AS k
                        FROM cur
                    )
                    -- Moved on by whole microseconds (a timestamp's grain), rounded up: at
                    -- 100,000 a second a slot is 10.4 us, and rounding to the nearest would
                    -- put single slots 10 us apart, 4 percent over the rate.
                    UPDATE channel_rate r
                    SET tat = took.base
                              + ceil(took.k / %(rate)s * 1e6 - 1e-6) * interval '1 microsecond'
                    FROM took WHERE r.channel_id = took.channel_id
                    RETURNING took.k, extract(epoch FROM took.base)::float8,
                              extract(epoch FROM took.now)::float8,
                              extract(epoch FROM took.blocked_until)::float8
                    """,
                    {"c": channel_id, "within": within, "n": n, "rate": effective},
                )
            ).fetchone()
        assert row is not None
        taken, base, blocked = int(row[0]), float(row[1]), row[3]
        if blocked is not None:
            until = float(blocked) + offset
            if until > time.time():
                self._blocked_until[channel_id] = max(
                    self._blocked_until.get(channel_id, 0.0), until
                )
        first = base + offset
        return Slots(
            times=[first + i / effective for i in range(taken)],
            next_free=first + taken / effective,
        )

    async def throttle(self, channel_id: int, seconds: float, reason: str) -> None:
        """The provider said slow down: nobody calls this channel for ``seconds``."""
        until = time.time() + seconds
        self._blocked_until[channel_id] = max(self._blocked_until.get(channel_id, 0.0), until)
        async with self.pool.connection() as conn:
            await conn.execute(
                """
                WITH pushed AS (
                    UPDATE channel_rate
                    SET blocked_until = greatest(coalesce(blocked_until, '-infinity'),
                                                 clock_timestamp() + %(s)s * interval '1 second'),
                        tat = greatest(tat, clock_timestamp() + %(s)s * interval '1 second'),
                        block_reason = %(r)s
                    WHERE channel_id = %(c)s
                    RETURNING blocked_until
                )
                SELECT pg_notify(%(n)s, %(c)s::text || ':' || extract(epoch FROM blocked_until)::text)
                FROM pushed
                """,
                {"s": seconds, "r": reason, "c": channel_id, "n": CHANNEL_CHANNEL},
            )

    def blocked_for(self, channel_id: int) -> float:
        """Seconds this channel is still told to wait (0 when free)."""
        until = self._blocked_until.get(channel_id)
        if until is None:
            return 0.0
        left = until - time.time()
        if left <= 0:
            del self._blocked_until[channel_id]
            return 0.0
        return left

    def hear(self, payload: str) -> None:
        """A ``bcast_channel`` notice from another worker: ``"<channel id>:<epoch until>"``."""
        try:
            raw_id, raw_until = payload.split(":", 1)
            channel_id, until = int(raw_id), float(raw_until)
        except ValueError:
            return
        self._blocked_until[channel_id] = max(self._blocked_until.get(channel_id, 0.0), until)


class SlotCache:
    """One channel's slots, taken ahead by this process and shared by all its runs of the
    channel: one round trip to Postgres takes a block (up to a fifth of a second at the
    channel's rate, at most ``block`` slots), and runs take their slots from here. A slot not
    used in time is dropped, never used late, so the limit still holds exactly; at most one
    block of capacity is lost when sending stops.

    Parameters:
      limiter: where blocks of slots come from.
      channel_id, workspace_id: the channel.
      kind: the channel's kind, when slots dropped unused are counted in the channel's
        ``bcast_channel_slots_unused_total``.
    """

    def __init__(
        self, limiter: RateLimiter, channel_id: int, workspace_id: int, kind: str | None = None
    ) -> None:
        self.limiter = limiter
        self.channel_id = channel_id
        self.workspace_id = workspace_id
        self._labels = None if kind is None else (str(channel_id), kind)
        #: Slots of this channel taken by this process and let pass unused, by reason
        #: (``metrics.SLOT_REASONS``).
        self.unused_by: dict[str, int] = dict.fromkeys(metrics.SLOT_REASONS, 0)
        self._times: deque[float] = deque()
        self._next_free = 0.0
        self._refill = asyncio.Lock()

    async def take(
        self, rate: float, n: int, *, within: float, block: int, need: int | None = None
    ) -> Slots:
        """Up to ``n`` slots that start within ``within`` seconds. ``need``: how many slots
        the caller has a use for in all (its rows still waiting for one, ``n`` of them now);
        a round trip takes a block of slots, but no more than that: what no send here needs
        would pass unused while other processes wait for the channel's slots.
        """
        if len(self._fresh()) < n:
            async with self._refill:
                have = len(self._fresh())
                if have < n:
                    ahead = min(block, self.limiter.grant_size(rate, block))
                    if need is not None:
                        ahead = min(ahead, need - have)
                    wanted = max(n - have, ahead)
                    got = await self.limiter.reserve(
                        self.channel_id, self.workspace_id, rate, wanted, within=within
                    )
                    self._times.extend(got.times)
                    self._next_free = got.next_free
        horizon = time.time() + within
        times = self._fresh()
        taken: list[float] = []
        while times and len(taken) < n and times[0] <= horizon:
            taken.append(times.popleft())
        return Slots(taken, times[0] if times else self._next_free)

    def take_at_hand(self, *, within: float) -> float | None:
        """A slot already taken that starts within ``within`` seconds, without a round trip."""
        times = self._fresh()
        if times and times[0] <= time.time() + within:
            return times.popleft()
        return None

    def _fresh(self) -> deque[float]:
        times = self._times
        stale = time.time() - LATE_TOLERANCE
        dropped = 0
        while times and times[0] < stale:
            times.popleft()
            dropped += 1
        self.unused(dropped, "left")
        return times

    def settle(self) -> None:
        """Drop (and count) the slots that passed in the cache: called a little after a run
        ends, so what it left is counted then, not whenever the channel next sends here.
        """
        self._fresh()

    def unused(self, n: int, reason: str) -> None:
        """``n`` slots of this channel passed unused, for ``reason`` (``metrics.SLOT_REASONS``)."""
        if n <= 0:
            return
        self.unused_by[reason] += n
        if self._labels is not None:
            metrics.TALLY.inc(metrics.CHANNEL_SLOTS_UNUSED, (*self._labels, reason), n)

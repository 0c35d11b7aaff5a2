"""The send loop: one run of one batch, as one readable loop.

``BatchRun.run`` claims the batch's due, queued rows (about a second of sending at the
channel's rate), takes lane places and rate-limit slots for them, and starts one send task per
row. Each send sleeps until its slot, takes a place in the process's call pool, checks that the
task is still being sent and the run's lease still holds, calls the provider with the delivery
id as idempotency key, and hands the answer to the recorder.

What it deliberately does not do:
  * wait long. When the channel's next slot, a Retry-After or every remaining row's backoff
    lies beyond ``MAX_WAIT``, the run gives its batch back with the time it may go on, and the
    engine takes other work; the scheduler hands the batch out again when it is due.
  * decide anything from memory that Postgres has not committed: rows are ``sending`` only
    under the run's token, and results are written only while that token holds.
  * guess the fate of a call: a call at a provider when the run stops is let finish and its
    answer written; one whose answer never came (the run was cancelled outright) keeps its row
    held, and the sweeper sends it again under the same idempotency key once the lease is out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import psycopg
from psycopg_pool import PoolTimeout

from services.dispatcher import conversation, metrics
from services.dispatcher.channels.base import Multicaster, Outcome, Permanent, Transient
from services.dispatcher.jobs import ChannelUnusable, Job, load_job
from services.dispatcher.lease import Lease
from services.dispatcher.ratelimit import LATE_TOLERANCE, SlotCache, Slots
from services.dispatcher.recorder import Recorder
from services.dispatcher.retry import RetryPolicy
from services.dispatcher.stop import Stop
from shared import delivery_store as store
from shared.delivery_store import MAX_WAIT, Batch, Claimed
from shared.domain.broadcasts import MAX_TEXT
from shared.domain.lifecycle import BroadcastStatus
from shared.logsafe import error_text

#: What one provider call carries: one row, or the rows of one multicast.
Unit = Claimed | tuple[Claimed, ...]


def members_of(units: Iterable[Unit]) -> list[Claimed]:
    """The rows of some calls."""
    return [row for unit in units for row in (unit if isinstance(unit, tuple) else (unit,))]


if TYPE_CHECKING:
    from services.dispatcher.pacing import Lane, Place
    from services.dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: Rows are claimed, and slots taken, for at most this far ahead.
LOOKAHEAD = 1.0
#: A run given back after an error (the database, a bug) is due again this much later.
ERROR_DELAY = 5.0
#: Pause between attempts to write the last results of a run.
RETRY_SECONDS = 0.5
#: How many failure reasons a run's summary line names (the most frequent).
SUMMARY_REASONS = 5
#: Fresh slots a send late for its own may take before it gives its row back.
MAX_RESLOTS = 5
#: Waits shorter than this are not slept (a slot due now, give or take the clock's grain).
MIN_SLEEP = 0.001
#: A multicast claim takes rows for at most this many calls.
MULTICAST_CALLS = 2
#: When its lane is full, a run waits for this share of the lane to free up before taking
#: slots, so a busy channel takes slots in groups, not one round trip per send.
LANE_CHUNK = 0.25


@dataclass(frozen=True, slots=True)
class Ending:
    """How a run ended, and what becomes of its batch."""

    #: done, wait, not_sending, slice, stopping, lease_lost or error (a metrics label).
    reason: str
    #: The batch has nothing left to send.
    done: bool = False
    #: Seconds until the batch may be handed out again.
    due_in: float = 0.0
    #: The engine may go on with the task's next batch.
    go_on: bool = False


def claim_limit(claim_size: int, rate: float, lane_size: int, multicast: int = 1) -> int:
    """How many rows one claim takes: at most ``claim_size``, a second's worth at the channel's
    rate (``LOOKAHEAD``) and two lanes' worth; for a channel whose calls carry up to
    ``multicast`` rows, enough for a few calls.
    """
    limit = max(1, min(claim_size, math.ceil(rate * LOOKAHEAD), 2 * lane_size))
    if multicast > 1:
        limit = multicast * min(limit, MULTICAST_CALLS)
    return limit


def _releaser(place: Place) -> Callable[[asyncio.Task[None]], None]:
    """A done callback that gives a send's lane place back however the send ended (even a
    task cancelled before it began).
    """
    return lambda _: place.release()


def _connection_trouble(exc: Exception) -> bool:
    """Is this the database being out of reach (worth trying again), not a refused write?"""
    return isinstance(exc, psycopg.OperationalError | PoolTimeout | OSError)


class BatchRun:
    """One run of one claimed batch.

    Parameters:
      rt: the process runtime.
      batch: the claimed batch (its rows are held under ``batch.token``).
      claimed_at: ``time.monotonic()`` just before the claim (the lease counts from there).
      stopping: set when the process stops; the run gives its batch back at once.
    """

    def __init__(
        self, rt: Runtime, batch: Batch, claimed_at: float, stopping: asyncio.Event
    ) -> None:
        self.rt = rt
        self.batch = batch
        self.claimed_at = claimed_at
        self.stopping = stopping
        s = rt.settings
        self.policy = RetryPolicy(
            max_attempts=s.max_attempts,
            base_seconds=s.retry_base_seconds,
            max_seconds=s.retry_max_seconds,
        )
        self.deadline = time.monotonic() + s.batch_max_seconds
        #: Until when the run may go on with the broadcast's next batch itself (the engine
        #: sets it for the chain of batches this run belongs to).
        self.chain_until = math.inf
        self.status = BroadcastStatus.IN_PROGRESS.value
        self.sends: set[asyncio.Task[None]] = set()
        #: Rows whose provider call has started and whose answer is not yet recorded.
        self.in_call: set[int] = set()
        #: Set by ``halt``, when the run must start no more calls (a stop, a pause, a lost
        #: lease): it wakes the sends sleeping until their slot.
        self._halt = Stop()
        #: A fresh slot for a send that missed its own.
        self._reslot: Callable[[], Awaitable[Slots]]
        self._cache: SlotCache
        self._lease: Lease
        self._paused_for_refusal = False
        #: When the next batch was claimed, if the run went on with one.
        self.next_claimed_at = 0.0
        self._ids = {"broadcast_id": batch.broadcast_id, "batch_id": batch.id}
        #: The run's recorder, once its broadcast is loaded (for the summary of the run).
        self.recorder: Recorder | None = None

    def summary(self) -> dict[str, Any]:
        """What the run did, as log fields: its channel, results written by outcome, and the
        most frequent reasons sends failed or are to be tried again.
        """
        recorder = self.recorder
        if recorder is None:
            return {}
        tally = recorder.tally
        fields: dict[str, Any] = {
            "channel_id": recorder.job.channel_id,
            "kind": recorder.job.kind,
            "sent": tally["sent"],
            "failed": tally["failed"],
            "partial": tally["partial"],
            "retried": tally["retry"],
            "throttled": tally["throttled"],
        }
        if recorder.reasons:
            fields["failure_reasons"] = dict(recorder.reasons.most_common(SUMMARY_REASONS))
        return fields

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> tuple[Ending, Batch | None]:
        """Send the batch; give it back, done or with the time it may go on. Returns how the
        run ended and, when it may go on, the task's next batch (claimed for the next run).
        """
        lease = self._lease = self.rt.leases.take(self.batch, self.claimed_at, self.halt)
        try:
            ending, keep = await self._run(lease)
        finally:
            self.rt.leases.give_up(lease)
        metrics.BATCH_ENDS.labels(ending.reason).inc()
        if lease.lost:
            return ending, None
        return ending, await self._end(ending, keep=keep)

    async def _run(self, lease: Lease) -> tuple[Ending, list[int]]:
        """The run itself; returns how it ended and the rows it must keep holding."""
        try:
            job = await load_job(self.rt, self.batch.broadcast_id)
        except ChannelUnusable as exc:
            # Every send would fail the same way: the broadcast waits for the operator.
            await self._hold(self.batch.broadcast_id, str(exc), self._ids)
            return Ending("not_sending"), []
        except Exception as exc:
            log.warning(
                "broadcast %s batch %s: loading it failed (%s); due again in %g s",
                *self._ids.values(),
                error_text(exc),
                ERROR_DELAY,
                extra=self._ids,
            )
            return Ending("error", due_in=ERROR_DELAY), []
        if job is None:
            return Ending("not_sending"), []
        lane = self.rt.lane(job)
        slots = self._cache = self.rt.slots(job)
        self._reslot = lambda: slots.take(job.rate, 1, within=LOOKAHEAD, block=lane.size)
        recorder = self.recorder = Recorder(self.rt, job, self.batch, self.policy)
        stop_flushing = Stop()
        watching = asyncio.create_task(self._watch_stopping())
        flushing = asyncio.create_task(recorder.keep_flushing(stop_flushing))
        ending = Ending("error", due_in=ERROR_DELAY)
        try:
            self.status = await self.rt.status.track(self.batch.broadcast_id, self._heard)
            ending = await self._send_all(job, lane, slots, lease, recorder)
        except Exception:
            log.exception(
                "broadcast %s batch %s: the send loop failed; its rows go back",
                *self._ids.values(),
                extra=self._ids,
            )
        finally:
            self.halt()
            # Sends waiting for a slot give their rows back; calls at a provider finish.
            if self.sends:
                await asyncio.wait(self.sends)
            stop_flushing.set()
            try:
                await flushing
                await self._last_flush(recorder, lease)
            finally:
                # Answers the run could not write no longer count as calls under way here.
                recorder.give_back_places()
                recorder.close()
            watching.cancel()
            # What this run left in the channel's slot cache is counted once it has passed
            # (if no other run here takes it), not whenever the channel next sends here.
            asyncio.get_running_loop().call_later(LOOKAHEAD + 2 * LATE_TOLERANCE, slots.settle)
            self.rt.status.untrack(self.batch.broadcast_id, self._heard)
            metrics.TALLY.set(metrics.CHANNEL_IN_FLIGHT, (str(job.channel_id), job.kind), lane.used)
            metrics.TALLY.flush()
        if lease.lost:
            return Ending("lease_lost"), []
        return ending, [*recorder.unwritten(), *self.in_call]

    async def _last_flush(self, recorder: Recorder, lease: Lease) -> None:
        """Write the last results, trying again while the database is out but the rows are
        surely still the run's (a write under a lost lease would be refused anyway).
        """
        while recorder.pending:
            try:
                await recorder.flush()
            except Exception as exc:
                if not (_connection_trouble(exc) and lease.writable()):
                    log.error(
                        "broadcast %s batch %s: last results could not be written (%s); "
                        "their rows stay held until the lease runs out",
                        *self._ids.values(),
                        error_text(exc),
                        extra=self._ids,
                    )
                    return
                await asyncio.sleep(RETRY_SECONDS)

    async def _send_all(
        self, job: Job, lane: Lane, slots: SlotCache, lease: Lease, recorder: Recorder
    ) -> Ending:
        """Claim, pace, send; until the batch is done or must be given back. An error ends the
        loop, never the sends already started: the group waits for them.
        """
        async with asyncio.TaskGroup() as group:
            try:
                return await self._loop(job, lane, slots, group, lease, recorder)
            except Exception:
                log.exception(
                    "broadcast %s batch %s: the send loop failed; its rows go back",
                    *self._ids.values(),
                    extra=self._ids,
                )
                self.halt()
                return Ending("error", due_in=ERROR_DELAY)

    async def _loop(
        self,
        job: Job,
        lane: Lane,
        slots: SlotCache,
        group: asyncio.TaskGroup,
        lease: Lease,
        recorder: Recorder,
    ) -> Ending:
        limit = claim_limit(self.rt.settings.claim_size, job.rate, lane.size, job.multicast)
        while True:
            if (stop := self._stop_reason(lease)) is not None:
                return stop
            async with self.rt.pool.connection() as conn:
                claimed = await store.arun(
                    conn,
                    store.claim(
                        self.batch,
                        limit,
                        job.window,
                        personal=job.personal,
                        inbound=job.conversation is not None,
                        keyed=job.keyed,
                    ),
                )
            # A claim short of its limit, or one that reached the batch's last row, took what
            # the batch has due: its rows are all the run has a use for slots for (until more
            # come due). A batch whose rows are a multiple of the claim's limit ends in a full
            # claim, and slots taken ahead then would pass unused between this run and the
            # next while other processes wait for the channel.
            last = len(claimed) < limit or claimed[-1].id >= self.batch.last_id
            units: list[Unit] = list(claimed)
            if job.multicast > 1 and claimed:
                units = await self._calls(job, claimed)
            rows = deque(units)
            if not rows:
                ending = await self._nothing_due(recorder, job)
                if ending is not None:
                    return ending
                continue
            while rows:
                if (stop := self._stop_reason(lease)) is not None:
                    for row in members_of(rows):
                        recorder.release(row)
                    return stop
                wait = await self._pace(job, lane, slots, rows, group, lease, recorder, last)
                if wait is None:
                    continue
                if wait > MAX_WAIT:
                    # The channel must wait (booked ahead, or told to by its provider): its
                    # other batches must too, so the run goes on with none of them.
                    for row in members_of(rows):
                        recorder.release(row)
                    return Ending("wait", due_in=wait)
                await self._sleep(wait)

    async def _pace(
        self,
        job: Job,
        lane: Lane,
        cache: SlotCache,
        rows: deque[Unit],
        group: asyncio.TaskGroup,
        lease: Lease,
        recorder: Recorder,
        last: bool = False,
    ) -> float | None:
        """Start sends for the next rows: lane places first, slots second (a slot taken must
        never then wait for a place). Returns None when sends were started (or the run was
        halted meanwhile), else how long until the channel has a slot within reach. ``last``:
        the rows are the batch's last due ones, so slots beyond them are not taken ahead.
        """
        wanted = self.rt.limiter.grant_size(job.rate, len(rows))
        at_least = max(1, min(wanted, int(lane.size * LANE_CHUNK)))
        async with lane.grant(wanted, at_least=at_least) as grant:
            if self.halted:
                return None  # the loop sees why and gives the rows back
            taken_at = time.time()
            slots = await cache.take(
                job.rate,
                grant.size,
                within=LOOKAHEAD,
                block=lane.size,
                need=len(rows) if last else None,
            )
            if not slots.times:
                return max(0.0, slots.next_free - LOOKAHEAD - time.time())
            tally = metrics.TALLY
            tally.observe(metrics.RATE_WAIT, (job.kind,), max(0.0, slots.times[-1] - taken_at))
            tally.inc(
                metrics.CHANNEL_SLOT_WAIT,
                (str(job.channel_id), job.kind),
                sum(at - taken_at for at in slots.times if at > taken_at),
            )
            for at in slots.times:
                task = group.create_task(self._send(job, rows.popleft(), at, lease, recorder))
                self.sends.add(task)
                task.add_done_callback(self.sends.discard)
                task.add_done_callback(_releaser(grant.hand_out()))
        metrics.TALLY.set(metrics.CHANNEL_IN_FLIGHT, (str(job.channel_id), job.kind), lane.used)
        return None

    async def _calls(self, job: Job, rows: list[Claimed]) -> list[Unit]:
        """The claimed rows as provider calls of up to ``job.multicast`` rows each.

        Rows whose last attempt was used go as that attempt's call went: with the other rows
        of its key (taken now if the claim's limit left them out) and under the same key, so
        a call the provider may have accepted is repeated exactly. Fresh rows are grouped in
        order, and each group's key is written on its rows before its call is made.
        """
        again = {r.call_key for r in rows if r.attempts > 1 and r.call_key is not None}
        if again:
            async with self.rt.pool.connection() as conn:
                rest = await store.arun(conn, store.claim_call_rest(self.batch, sorted(again)))
            rows = sorted([*rows, *rest], key=lambda r: r.id)
        earlier: dict[uuid.UUID, list[Claimed]] = {}
        fresh: list[Claimed] = []
        for row in rows:
            if row.attempts > 1 and row.call_key is not None:
                earlier.setdefault(row.call_key, []).append(row)
            else:
                fresh.append(row)
        units: list[Unit] = [tuple(g) if len(g) > 1 else g[0] for g in earlier.values()]
        fresh.sort(key=lambda r: (r.parts_done, r.id))
        groups: list[list[Claimed]] = []
        for row in fresh:
            last = groups[-1] if groups else None
            if last and len(last) < job.multicast and last[0].parts_done == row.parts_done:
                last.append(row)
            else:
                groups.append([row])
        async with self.rt.pool.connection() as conn:
            for chunk in groups:
                if len(chunk) == 1:
                    units.append(chunk[0])
                    continue
                key = chunk[0].call_key or uuid.uuid4()
                await store.arun(conn, store.share_call_key(self.batch, key, [r.id for r in chunk]))
                units.append(tuple(replace(r, call_key=key) for r in chunk))
        return units

    async def _send(
        self, job: Job, unit: Unit, at: float, lease: Lease, recorder: Recorder
    ) -> None:
        """One call (one recipient, or the rows of one multicast): wait for the slot, call,
        record. Rows never called go back (a database hiccup while taking a fresh slot costs
        them a turn, not the run).
        """
        members = unit if isinstance(unit, tuple) else (unit,)
        outcome: Outcome | None = None
        after: float | None = None
        # Slots this send took (its own, and fresh ones when it came too late for it), those
        # it came too late for, and whether it used one (it called, or its row was settled
        # without a call): the others passed unused.
        slots_taken, late_for, called = 1, 0, False
        try:
            for attempt in range(MAX_RESLOTS):
                if not await self._sleep(at - time.time()):
                    break
                late = False
                async with self.rt.calls.call(job.channel_id) as place:
                    if time.time() - at > LATE_TOLERANCE:
                        # Too late for its slot (it waited for a place in the call pool): sent
                        # now it would crowd the next ones into a window over the limit. It
                        # takes a fresh slot: one already at hand and due now keeps its place.
                        fresh = self._cache.take_at_hand(within=LATE_TOLERANCE)
                        late_for += 1
                        if fresh is None:
                            late = True
                        else:
                            at = fresh
                            slots_taken += 1
                            if not await self._sleep(at - time.time()):
                                break
                    if not late:
                        if self._may_call(lease):
                            after = self.rt.limiter.blocked_for(job.channel_id) or None
                            if after is None:
                                called = True
                                outcome = await self._call(job, unit)
                                # The call counts as under way until its answer is written
                                # (the recorder gives the place back then): what a process
                                # killed outright can repeat stays within the call pool.
                                place.keep()
                        break
                if attempt == MAX_RESLOTS - 1:
                    break  # out of turns: the row goes back without taking a slot it cannot use
                # A fresh slot from the database, taken without holding a place.
                slots = await self._reslot()
                if not slots.times:
                    break
                at = slots.times[0]
                slots_taken += 1
        except asyncio.CancelledError:
            for row in members:
                if row.id not in self.in_call:
                    recorder.release(row)
            raise
        except Exception as exc:
            log.warning(
                "broadcast %s: taking a fresh slot for delivery %s failed (%s); it goes back",
                job.broadcast_id,
                members[0].id,
                error_text(exc),
                extra=self._ids,
            )
        finally:
            self._cache.unused(late_for, "late")
            self._cache.unused(slots_taken - late_for - called, "stopped")
        if outcome is None:
            for row in members:
                recorder.release(row, after=after)
            return
        recorded = 0
        try:
            # A multicast's answer is each of its rows'; the call's place goes with the first.
            for row in members:
                label = recorder.outcome(row, outcome, holds_place=recorded == 0).label
                recorded += 1
        except Exception:
            # The call was made but its answer cannot be judged (a bug): the row stays held,
            # and the sweeper sends it again once the lease runs out. The call's place goes
            # back here unless a recorded answer holds it.
            if recorded == 0:
                self.rt.calls.give_back(1)
            log.exception(
                "delivery %s: the provider's answer could not be recorded",
                members[0].id,
                extra=self._ids,
            )
            return
        for row in members:
            self.in_call.discard(row.id)
        if label == "throttled" and isinstance(outcome, Transient):
            await self._throttled(job, outcome)
        elif isinstance(outcome, Transient) and outcome.refused:
            await self._refused(job, outcome)

    async def _call(self, job: Job, unit: Unit) -> Outcome:
        members = unit if isinstance(unit, tuple) else (unit,)
        for member in members:
            self.in_call.add(member.id)
        row = members[0]
        started = time.perf_counter()
        try:
            if len(members) > 1:
                return await cast(Multicaster, job.adapter).send_many(
                    job.message,
                    [r.address for r in members],
                    str(row.call_key),
                    parts_done=row.parts_done,
                    may_go_on=lambda: self._may_call(self._lease),
                )
            message = job.message
            if job.conversation is not None:
                chosen = conversation.message_for(
                    job.conversation, message, row.address, row.contact, datetime.now(UTC)
                )
                if isinstance(chosen, Permanent):
                    return chosen
                if chosen.template is not None and row.parts_done:
                    # Parts of the free-form message went while the window was open; it has
                    # closed since: the rest cannot go, and the template is another message.
                    return Permanent(
                        f"the conversation window closed after {row.parts_done} part(s) of "
                        "the message went; the rest may not go outside it"
                    )
                message = chosen
            if job.template is not None and message.text is not None:
                text = job.template.render(row.address, row.contact)
                if len(text) > MAX_TEXT:
                    # A contact's long fields made it longer than any message may be.
                    return Permanent(
                        f"personalised text is {len(text)} characters for this recipient; a "
                        f"message holds at most {MAX_TEXT}"
                    )
                message = replace(message, text=text)
            return await job.adapter.send(
                message,
                row.address,
                str(row.call_key) if job.keyed and row.call_key else str(row.id),
                parts_done=row.parts_done,
                may_go_on=lambda: self._may_call(self._lease),
            )
        except Exception as exc:  # an adapter bug must not strand the row
            # The exception's text may quote a URL with a credential in it (a bot token): it
            # stays out of the stored reason and out of the log unless debugging.
            log.error(
                "adapter %s raised %s on delivery %s",
                job.kind,
                type(exc).__name__,
                row.id,
                extra={**self._ids, "channel_id": job.channel_id},
            )
            log.debug("adapter failure", exc_info=True)
            return Transient(f"internal error in the {job.kind} adapter: {type(exc).__name__}")
        finally:
            metrics.TALLY.observe(
                metrics.PROVIDER_LATENCY, (job.kind,), time.perf_counter() - started
            )

    async def _throttled(self, job: Job, outcome: Transient) -> None:
        """The provider pushed back: the channel waits, for every worker."""
        channel = str(job.channel_id)
        metrics.THROTTLED.labels(job.kind).inc()
        metrics.CHANNEL_THROTTLED.labels(channel, job.kind).inc()
        wait = outcome.retry_after or self.policy.throttle_seconds
        if self.rt.limiter.blocked_for(job.channel_id) >= wait - 0.05:
            return  # another send of this channel already passed the word on
        log.info(
            "broadcast %s: channel %s throttled by its provider for %.1f s: %s",
            job.broadcast_id,
            job.channel_id,
            wait,
            outcome.reason,
            extra={
                **self._ids,
                "event": "throttled",
                "channel_id": job.channel_id,
                "wait_seconds": round(wait, 3),
            },
        )
        try:
            await self.rt.limiter.throttle(job.channel_id, wait, outcome.reason)
        except Exception as exc:
            log.warning(
                "broadcast %s: could not tell the other workers channel %s is throttled (%s)",
                job.broadcast_id,
                job.channel_id,
                error_text(exc),
                extra={**self._ids, "channel_id": job.channel_id},
            )

    async def _refused(self, job: Job, outcome: Transient) -> None:
        """Every send would be refused alike (the egress rule refused the channel's provider
        address, or the provider refused the message's template), so the broadcast is paused
        with the reason until an operator fixes the channel or the content.
        """
        self.halt()
        if self._paused_for_refusal:
            return
        self._paused_for_refusal = True
        ids = {**self._ids, "channel_id": job.channel_id}
        try:
            await self._hold(job.broadcast_id, outcome.reason, ids)
        except Exception as exc:
            log.warning(
                "broadcast %s: could not pause it (%s); its rows wait and are tried again",
                job.broadcast_id,
                error_text(exc),
                extra=ids,
            )

    async def _hold(self, broadcast_id: int, reason: str, ids: dict[str, Any]) -> None:
        """Pause the broadcast with ``reason`` for the operator; the run that paused it (not
        the others that find it paused) logs it and counts it, once it is written.
        """
        async with self.rt.pool.connection() as conn:
            paused = await store.arun(conn, store.hold(broadcast_id, reason))
        if paused:
            metrics.BROADCASTS_HELD.inc()
            log.error(
                "broadcast %s: paused: %s",
                broadcast_id,
                reason,
                extra={**ids, "event": "paused", "reason": reason},
            )

    async def _nothing_due(self, recorder: Recorder, job: Job) -> Ending | None:
        """No row to claim now: once this run's own sends are written, is the batch done, due
        again soon (wait here, return None), or due later (give it back)? Recipients outside
        the sending window wait until it opens.
        """
        if self.sends:
            await asyncio.wait(set(self.sends))
        await recorder.flush()
        async with self.rt.pool.connection() as conn:
            await store.arun(conn, store.skip_gone(self.batch))
            if job.window is not None:
                await store.arun(conn, store.defer_to_window(self.batch, job.window))
            left = await store.arun(
                conn,
                store.progress(
                    self.batch.broadcast_id,
                    self.batch.first_id,
                    self.batch.last_id,
                    self.batch.part_day,
                ),
            )
        if left.due:
            # Due rows another transaction holds for a moment (a cancel, say): look again soon.
            await self._sleep(0.05)
            return None
        if left.queued == 0 and left.sending == 0:
            return Ending("done", done=True, go_on=True)
        if left.queued == 0:
            # Held under another run's token (this run wrote all of its own), by a run that
            # lost this batch: they come back when the batch is next taken (the delivery
            # store's _take_orphans), a lease's time from now.
            return Ending("wait", due_in=self.rt.settings.lease_seconds, go_on=True)
        wait = left.next_due_in or 0.0
        if wait > MAX_WAIT:
            return Ending("wait", due_in=wait, go_on=True)
        await self._sleep(wait)
        return None

    # --- stopping ----------------------------------------------------------------------------

    def _stop_reason(self, lease: Lease) -> Ending | None:
        if self.stopping.is_set():
            return Ending("stopping")
        if not lease.held():
            return Ending("lease_lost")
        if self.halted or self.status != BroadcastStatus.IN_PROGRESS:
            # Paused, canceled or completed (even if resumed since: the relay hands the
            # batch out again then).
            return Ending("not_sending")
        if time.monotonic() > self.deadline:
            # Handed back so another dispatcher may take it: work spreads as dispatchers come.
            return Ending("slice")
        return None

    def _may_call(self, lease: Lease) -> bool:
        return (
            not self.halted and self.rt.status.is_sending(self.batch.broadcast_id) and lease.held()
        )

    @property
    def halted(self) -> bool:
        """Must the run start no more calls?"""
        return self._halt.is_set()

    def halt(self) -> None:
        """Start no more calls; sends waiting for their slot wake at once."""
        self._halt.set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early on a halt; False when halted."""
        if self.halted:
            return False
        if seconds < MIN_SLEEP:
            return True
        await self._halt.sleep(seconds)
        return not self.halted

    def _heard(self, status: str) -> None:
        self.status = status
        if status != BroadcastStatus.IN_PROGRESS:
            self.halt()

    async def _watch_stopping(self) -> None:
        await self.stopping.wait()
        self.halt()

    async def _end(self, ending: Ending, *, keep: list[int]) -> Batch | None:
        """Give the batch back (rows still held come back; the batch is done or ready) and,
        when the run may go on, take the task's next due batch in the same transaction.
        """
        go_on = ending.go_on and not self.stopping.is_set() and time.monotonic() < self.chain_until
        claimed_at = time.monotonic()
        try:
            async with self.rt.pool.connection() as conn:
                _, following = await store.arun(
                    conn,
                    store.end_run(
                        self.batch,
                        done=ending.done,
                        due_in=ending.due_in,
                        keep=keep,
                        next_token=uuid.uuid4() if go_on else None,
                        lease=self.rt.settings.lease_seconds,
                    ),
                )
        except Exception as exc:
            log.error(
                "broadcast %s batch %s: could not give the batch back (%s); the sweeper takes "
                "it back when its lease runs out",
                *self._ids.values(),
                error_text(exc),
                extra=self._ids,
            )
            return None
        self.next_claimed_at = claimed_at
        return following

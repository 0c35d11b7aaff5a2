"""Results of one run's sends, written to Postgres in batches.

The recorder turns each provider answer into the row's next state (the retry policy decides)
and keeps it until it is written. The results of every run of one task in this process are
written together, at most every ``FLUSH_SECONDS``, in one transaction of the delivery store
(see ``ResultGroup``): the task row, which every such write locks and whose counters move with
it, is written once per tick instead of once per run. What it
deliberately does not do: forget a result before its write has committed (a failed write keeps
everything for the next try), or write a result whose run lost its lease (the store refuses it,
and the recorder says so, loudly, with a metric).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import Counter
from typing import TYPE_CHECKING

import psycopg

from services.dispatcher import metrics
from services.dispatcher.channels.base import MAX_WAIT_ASKED, Outcome, Sent, join_ids
from services.dispatcher.retry import Decision, RetryPolicy, decide
from services.dispatcher.stop import Stop
from shared import delivery_store as store
from shared.delivery_store import Batch, Claimed, Record
from shared.domain.lifecycle import DeliveryStatus
from shared.logsafe import error_text

if TYPE_CHECKING:
    from services.dispatcher.jobs import Job
    from services.dispatcher.runtime import Runtime

log = logging.getLogger(__name__)
#: What a record's own values can make a write fail with: it is retried without them.
UNSTORABLE = (psycopg.DataError, UnicodeError)

#: Results waiting are written together this often (one transaction per write).
FLUSH_SECONDS = 0.05
#: Metrics labels of results that did not reach their recipient (yet, or at all).
FAILURE_LABELS = frozenset(("failed", "partial", "retry"))
#: The most distinct failure texts a run keeps for its summary line.
REASONS_KEPT = 20


class ResultGroup:
    """The recorders of one task's runs in this process, whose results are written together:
    one statement (and one lock of the task row) per write, whatever the number of runs.
    """

    def __init__(self, broadcast_id: int) -> None:
        self.broadcast_id = broadcast_id
        self.recorders: dict[Recorder, None] = {}
        self.lock = asyncio.Lock()
        #: When a write last took what the recorders held (monotonic seconds).
        self.taken_at = 0.0

    async def flush(self, *, force: bool) -> None:
        """Write what every recorder of the group holds; unless ``force``, only if the last
        write took its results at least ``FLUSH_SECONDS`` ago (ticks of several runs make one
        write).
        """
        metrics.TALLY.flush()
        async with self.lock:
            if not force and time.monotonic() - self.taken_at < FLUSH_SECONDS:
                return
            self.taken_at = time.monotonic()
            taken = [(r, list(r.pending)) for r in self.recorders if r.pending]
            if not taken:
                return
            started = time.perf_counter()
            entries = [(r.batch.token, record) for r, held in taken for record, _, _ in held]
            try:
                async with taken[0][0].rt.pool.connection() as conn:
                    ids = await store.arun(
                        conn,
                        store.record_runs(self.broadcast_id, taken[0][0].batch.part_day, entries),
                    )
                written = set(ids)
            except UNSTORABLE:
                # One result the database refuses (a provider's odd answer) must not hold
                # back the others: each is written on its own.
                written = set()
                for r, held in taken:
                    written.update(await r.write_each([record for record, _, _ in held]))
            for r, held in taken:
                r.written(held, written)
        metrics.FLUSH_LATENCY.observe(time.perf_counter() - started)


#: A write that calls waiting for places asked for is not asked again sooner than this.
PRESSURE_SECONDS = 0.005


class ResultGroups:
    """The result groups of a process, one per task being sent."""

    def __init__(self) -> None:
        self._groups: dict[int, ResultGroup] = {}
        self._soon: asyncio.Task[None] | None = None
        self._soon_at = 0.0

    def flush_soon(self) -> None:
        """Calls wait for places in the call pool, some held by answers not yet written:
        write every group's results now instead of at the next tick (one such write at a time).
        """
        now = time.monotonic()
        if (self._soon is not None and not self._soon.done()) or (
            now - self._soon_at < PRESSURE_SECONDS
        ):
            return
        self._soon_at = now
        self._soon = asyncio.get_running_loop().create_task(self._flush_all())

    async def _flush_all(self) -> None:
        groups = [g for g in self._groups.values() if any(r.pending for r in g.recorders)]
        results = await asyncio.gather(
            *(g.flush(force=True) for g in groups), return_exceptions=True
        )
        for group, result in zip(groups, results, strict=True):
            if isinstance(result, Exception):
                # The runs' own ticks write them (and say so if they cannot).
                log.debug("broadcast %s: an early write failed: %s", group.broadcast_id, result)

    def join(self, recorder: Recorder) -> ResultGroup:
        bid = recorder.batch.broadcast_id
        group = self._groups.get(bid)
        if group is None:
            group = self._groups[bid] = ResultGroup(bid)
        group.recorders[recorder] = None
        return group

    def leave(self, recorder: Recorder) -> None:
        group = self._groups.get(recorder.batch.broadcast_id)
        if group is not None:
            group.recorders.pop(recorder, None)
            if not group.recorders:
                del self._groups[group.broadcast_id]


class Recorder:
    """Collects the outcomes of one run and writes them.

    Parameters:
      rt: the process runtime (its database pool).
      job: the broadcast being sent.
      batch: the run: its rows are held under ``batch.token``.
      policy: the retry policy.
    """

    def __init__(self, rt: Runtime, job: Job, batch: Batch, policy: RetryPolicy) -> None:
        self.rt = rt
        self.job = job
        self.batch = batch
        self.policy = policy
        #: Results not yet written: the record, its metrics label, and whether it holds a
        #: place in the process's call pool (the answer of a call, until it is written).
        self.pending: list[tuple[Record, str, bool]] = []
        self.group = rt.results.join(self)
        #: Results written by this run, by metrics label (the run's summary when it ends).
        self.tally: Counter[str] = Counter()
        #: Why sends of this run failed or are to be tried again, with how many.
        self.reasons: Counter[str] = Counter()
        self._jitter = random.Random()  # noqa: S311 - spreading retries, not secrecy

    def outcome(self, row: Claimed, outcome: Outcome, *, holds_place: bool = False) -> Decision:
        """Note a provider's answer for ``row``; return what the policy made of it. With
        ``holds_place`` the call's place in the call pool is given back once the answer is
        written (or the run ends).
        """
        decision = decide(
            self.policy,
            outcome,
            attempts=row.attempts,
            parts_before=row.parts_done,
            jitter=self._jitter.random(),
        )
        accepted = [outcome.provider_message_id] if outcome.provider_message_id else []
        parts = None if isinstance(outcome, Sent) else outcome.parts_done or None
        unreachable = getattr(outcome, "unreachable", False)
        self.pending.append(
            (
                Record(
                    row.id,
                    decision.status,
                    provider_message_id=join_ids(row.provider_message_id, accepted),
                    error=decision.reason,
                    delay=decision.delay,
                    attempt_used=decision.attempt_used,
                    parts_done=parts,
                    unreachable_contact=row.contact_id if unreachable else None,
                ),
                decision.label,
                holds_place,
            )
        )
        return decision

    def release(self, row: Claimed, *, after: float | None = None) -> None:
        """Give a row back untouched by any provider call, claimable again after ``after``
        seconds (or at once).
        """
        self.pending.append(
            (
                Record(row.id, DeliveryStatus.QUEUED, delay=after, attempt_used=False),
                "released",
                False,
            )
        )

    def unwritten(self) -> list[int]:
        return [record.id for record, _, _ in self.pending]

    def give_back_places(self) -> None:
        """The run ends: the call-pool places of answers still unwritten go back (their rows
        stay held until the lease runs out).
        """
        held = sum(1 for _, _, holds in self.pending if holds)
        if held:
            self.pending = [(record, label, False) for record, label, _ in self.pending]
            self.rt.calls.give_back(held)

    async def flush(self, *, force: bool = True) -> None:
        """Write what is pending (with what the task's other runs in this process hold).
        Records leave ``pending`` only once their transaction has committed: a write that fails
        keeps them for the next try, and they never count as done while their rows are still
        ``sending`` (which would let the rows be sent again).
        """
        await self.group.flush(force=force)

    def close(self) -> None:
        """The run is over: its results are no longer written with the group's."""
        self.rt.results.leave(self)

    def written(self, taken: list[tuple[Record, str, bool]], written: set[int]) -> None:
        """A write that took ``taken`` (the first of ``pending``) committed; ``written`` holds
        the ids it wrote (of this and other runs).
        """
        del self.pending[: len(taken)]
        if held := sum(1 for _, _, holds in taken if holds):
            self.rt.calls.give_back(held)
        # Counted per write, not per send: each metric update costs a shared-memory write.
        labels = Counter(label for _, label, _ in taken)
        channel = str(self.job.channel_id)
        for label, count in labels.items():
            metrics.DELIVERIES.labels(self.job.kind, label).inc(count)
            if label in metrics.CHANNEL_OUTCOMES:
                metrics.CHANNEL_DELIVERIES.labels(channel, self.job.kind, label).inc(count)
        self.tally.update(labels)
        if labels["failed"] or labels["retry"] or labels["partial"]:
            # At most REASONS_KEPT distinct texts (a provider may put ids in them).
            reasons = self.reasons
            for record, label, _ in taken:
                error = record.error
                if (
                    label in FAILURE_LABELS
                    and error
                    and (error in reasons or len(reasons) < REASONS_KEPT)
                ):
                    reasons[error] += 1
        # A call's answer holds its place (the first row of a multicast only): calls, not rows.
        if calls := sum(1 for _, _, holds in taken if holds):
            metrics.CHANNEL_SENDS.labels(channel, self.job.kind).inc(calls)
        if any(record.id not in written for record, _, _ in taken):
            self._report_dropped(taken, written)

    async def _write(self, records: list[Record]) -> list[int]:
        # Text the database cannot take (a lone surrogate from a provider) fails before it is
        # sent, as UnicodeError; anything else it refuses, as DataError.
        async with self.rt.pool.connection() as conn:
            return await store.arun(conn, store.record(self.batch, records))

    async def write_each(self, records: list[Record]) -> list[int]:
        written: list[int] = []
        for record in records:
            try:
                written += await self._write([record])
            except UNSTORABLE as exc:
                log.error(
                    "broadcast %s batch %s: the result of delivery %s could not be stored as "
                    "the provider gave it (%s); stored without its text",
                    self.batch.broadcast_id,
                    self.batch.id,
                    record.id,
                    type(exc).__name__,
                    extra={"broadcast_id": self.batch.broadcast_id, "batch_id": self.batch.id},
                )
                plain = dataclasses.replace(
                    record,
                    error="(the provider's answer could not be stored)",
                    provider_message_id=None,
                    delay=None if record.delay is None else min(record.delay, MAX_WAIT_ASKED),
                )
                written += await self._write([plain])
        return written

    def _report_dropped(self, taken: list[tuple[Record, str, bool]], written: set[int]) -> None:
        """Records of rows the run no longer held (its lease was lost and the rows taken back):
        results of calls that were made are counted and logged; rows never called just went
        back already.
        """
        results = sum(1 for r, label, _ in taken if r.id not in written and label != "released")
        if not results:
            return
        metrics.RESULTS_DROPPED.labels(self.job.kind).inc(results)
        log.error(
            "broadcast %s batch %s: %s results not written: the run had lost its lease and "
            "the rows were taken back; those recipients may get the message again (same "
            "idempotency key)",
            self.batch.broadcast_id,
            self.batch.id,
            results,
            extra={
                "broadcast_id": self.batch.broadcast_id,
                "batch_id": self.batch.id,
                "channel_id": self.job.channel_id,
            },
        )

    async def keep_flushing(self, stop: Stop) -> None:
        """Write every ``FLUSH_SECONDS`` until ``stop`` is set (the last write is the run's);
        the ticks of the task's runs in this process make one write.
        """
        while not stop.is_set():
            await stop.sleep(FLUSH_SECONDS)
            if self.pending and not stop.is_set():
                try:
                    await self.flush(force=False)
                except Exception as exc:  # the next write tries again; nothing is lost
                    log.warning(
                        "broadcast %s batch %s: writing results failed (%s); kept for the "
                        "next write",
                        self.batch.broadcast_id,
                        self.batch.id,
                        error_text(exc),
                        extra={"broadcast_id": self.batch.broadcast_id, "batch_id": self.batch.id},
                    )

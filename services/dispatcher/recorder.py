"""Results of one run's sends, written to Postgres in batches.

The recorder turns each provider answer into the row's next state (the retry policy decides),
keeps it until it is written, and writes what it holds every ``FLUSH_SECONDS`` in one
transaction of the delivery store (the task's counters move with it, in Postgres). What it
deliberately does not do: forget a result before its write has committed (a failed write keeps
everything for the next try), or write a result whose run lost its lease (the store refuses it,
and the recorder says so, loudly, with a metric).
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self._lock = asyncio.Lock()
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

    async def flush(self) -> None:
        """Write what is pending. Records leave ``pending`` only once their transaction has
        committed: a write that fails keeps them for the next try, and they never count as
        done while their rows are still ``sending`` (which would let the rows be sent again).
        """
        async with self._lock:
            if not self.pending:
                return
            taken = list(self.pending)
            started = time.perf_counter()
            records = [record for record, _, _ in taken]
            try:
                written = await self._write(records)
            except UNSTORABLE:
                # One result the database refuses (a provider's odd answer) must not hold
                # back the others: they are written one by one.
                written = await self._write_each(records)
            del self.pending[: len(taken)]
            if held := sum(1 for _, _, holds in taken if holds):
                self.rt.calls.give_back(held)
        metrics.FLUSH_LATENCY.observe(time.perf_counter() - started)
        # Counted per write, not per send: each metric update costs a shared-memory write.
        labels = Counter(label for _, label, _ in taken)
        for label, count in labels.items():
            metrics.DELIVERIES.labels(self.job.kind, label).inc(count)
        if calls := len(taken) - labels["released"]:
            metrics.CHANNEL_SENDS.labels(str(self.job.channel_id), self.job.kind).inc(calls)
        if len(written) < len(taken):
            self._report_dropped(taken, set(written))

    async def _write(self, records: list[Record]) -> list[int]:
        # Text the database cannot take (a lone surrogate from a provider) fails before it is
        # sent, as UnicodeError; anything else it refuses, as DataError.
        async with self.rt.pool.connection() as conn:
            return await store.arun(conn, store.record(self.batch, records))

    async def _write_each(self, records: list[Record]) -> list[int]:
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

    async def keep_flushing(self, stop: asyncio.Event) -> None:
        """Write every ``FLUSH_SECONDS`` until ``stop`` is set (the last write is the run's)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FLUSH_SECONDS)
            if self.pending and not stop.is_set():
                try:
                    await self.flush()
                except Exception as exc:  # the next write tries again; nothing is lost
                    log.warning(
                        "broadcast %s batch %s: writing results failed (%s); kept for the "
                        "next write",
                        self.batch.broadcast_id,
                        self.batch.id,
                        error_text(exc),
                        extra={"broadcast_id": self.batch.broadcast_id, "batch_id": self.batch.id},
                    )

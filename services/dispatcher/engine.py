"""The engine: runs the batches (and audience copies) of a dispatcher process as coroutines.

A ``send_batch`` message only points at a batch. The actor hands it to the engine, which
claims the batch in Postgres (under a lease) and starts running it on the process's event
loop; the actor's thread is free again at once. A run that must wait gives its batch back
instead of waiting, and a run that finished its batch goes on with the next due batch of the
same broadcast, keeping the broadcast's number of batches in flight the same (for
``chain_max_seconds``; then the next batch goes through the queue, so work spreads over the
dispatchers there are, new ones included). So any number
of slow or throttled channels never keep a fast one from starting: the threads are never
theirs, and the send queue never holds more than a few messages per broadcast.

A ``start_broadcast`` message starts an audience copy here the same way: the copy of one large
audience, or of a group of small ones in one transaction. Large copies go one at a time per
process (each holds a pool connection for the length of its copy), and so do groups, side by
side, on a connection of their own: a long copy never holds up a thousand timed sends, nor
they it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from typing import TYPE_CHECKING

from services.dispatcher import metrics, snapshot
from services.dispatcher.batch_run import BatchRun
from shared import delivery_store as store
from shared.delivery_store import Batch
from shared.logsafe import listed_ids

if TYPE_CHECKING:
    from services.dispatcher.runtime import Runtime

log = logging.getLogger(__name__)


class Taken(enum.Enum):
    """What became of a message handed to the engine."""

    #: Running here (or nothing to run: done, running elsewhere, its task not being sent).
    TAKEN = "taken"
    #: This process runs as many batches as it may: the message should wait and come back.
    FULL = "full"
    #: This process is stopping: the message belongs to another.
    STOPPING = "stopping"


class Engine:
    """Runs this process's batches and audience copies.

    Parameters:
      rt: the process runtime.
      max_runs: the most batches this process runs at once.
      copies_at_once: the most copies of large audiences this process makes at once.
      groups_at_once: the most copies of groups of small audiences this process makes at once
        (besides the large ones).
    """

    def __init__(
        self, rt: Runtime, max_runs: int, copies_at_once: int = 1, groups_at_once: int = 1
    ) -> None:
        self.rt = rt
        self.max_runs = max_runs
        self.runs: set[asyncio.Task[None]] = set()
        self.copies: set[asyncio.Task[object]] = set()
        self.stopping = asyncio.Event()
        self._copying = asyncio.Semaphore(copies_at_once)
        self._copying_groups = asyncio.Semaphore(groups_at_once)

    async def adopt(self, batch_id: int) -> Taken:
        """Claim the batch a message points at and start running it."""
        if self.stopping.is_set():
            return Taken.STOPPING
        if len(self.runs) >= self.max_runs:
            return Taken.FULL
        claimed_at = time.monotonic()
        async with self.rt.pool.connection() as conn:
            batch = await store.arun(
                conn,
                store.claim_batch(batch_id, uuid.uuid4(), lease=self.rt.settings.lease_seconds),
            )
        if batch is None:
            return Taken.TAKEN  # done, running elsewhere, or its task is not being sent
        if self.stopping.is_set():
            # The stop came while the claim was under way: give the batch straight back.
            async with self.rt.pool.connection() as conn:
                await store.arun(conn, store.end_run(batch, done=False))
            return Taken.TAKEN
        task = asyncio.create_task(self._runner(batch, claimed_at), name=f"batch-{batch.id}")
        self.runs.add(task)
        task.add_done_callback(self._ended)
        metrics.BATCH_RUNS.set(len(self.runs))
        return Taken.TAKEN

    async def start_copy(self, broadcast_id: int) -> Taken:
        """Copy a started broadcast's audience, in the background (once; a duplicate message
        finds it done). A copy cut short by a stop rolls back, and the scheduler starts the
        broadcast again after the stall time.
        """
        if self.stopping.is_set():
            return Taken.STOPPING
        task = asyncio.create_task(self._copy(broadcast_id), name=f"copy-{broadcast_id}")
        self.copies.add(task)
        task.add_done_callback(self.copies.discard)
        return Taken.TAKEN

    async def start_copies(self, broadcast_ids: list[int]) -> Taken:
        """Copy the audiences of a group of small started broadcasts in one transaction, in
        the background (each once). A copy cut short rolls back as a whole, and the scheduler
        starts the broadcasts again after the stall time.
        """
        if self.stopping.is_set():
            return Taken.STOPPING
        task = asyncio.create_task(
            self._copy_group(broadcast_ids), name=f"copy-group-{broadcast_ids[0]}"
        )
        self.copies.add(task)
        task.add_done_callback(self.copies.discard)
        return Taken.TAKEN

    async def _copy_group(self, broadcast_ids: list[int]) -> dict[int, int]:
        async with self._copying_groups:
            if self.stopping.is_set():
                return {}
            try:
                return await snapshot.start_group(self.rt, broadcast_ids)
            except Exception:
                log.exception(
                    "broadcast %s: copying the audiences of %s broadcasts failed; the scheduler "
                    "starts them again",
                    listed_ids(broadcast_ids),
                    len(broadcast_ids),
                    extra={"broadcast_ids": broadcast_ids[:10]},
                )
                return {}

    async def _copy(self, broadcast_id: int) -> int | None:
        async with self._copying:
            if self.stopping.is_set():
                return None
            try:
                return await snapshot.start(self.rt, broadcast_id)
            except Exception:
                log.exception(
                    "broadcast %s: copying the audience failed; the scheduler starts it again",
                    broadcast_id,
                    extra={"broadcast_id": broadcast_id},
                )
                return None

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.runs.discard(task)
        metrics.BATCH_RUNS.set(len(self.runs))

    async def _runner(self, batch: Batch, claimed_at: float) -> None:
        """Run a batch, then the broadcast's next due batches while the run may go on (for
        ``chain_max_seconds`` at most: then the next batch goes through the queue, to whichever
        dispatcher has room, a newly started one included).
        """
        current: Batch | None = batch
        chain_until = time.monotonic() + self.rt.settings.chain_max_seconds
        while current is not None:
            ids = {"broadcast_id": current.broadcast_id, "batch_id": current.id}
            run = BatchRun(self.rt, current, claimed_at, self.stopping)
            run.chain_until = chain_until
            try:
                ending, current = await run.run()
            except Exception:
                log.exception("broadcast %s batch %s: run failed", *ids.values(), extra=ids)
                return
            claimed_at = run.next_claimed_at
            summary = run.summary()
            log.info(
                "broadcast %s batch %s: run ended (%s%s): %s sent, %s failed, %s to retry",
                ids["broadcast_id"],
                ids["batch_id"],
                ending.reason,
                f", due again in {ending.due_in:.1f} s" if ending.due_in else "",
                summary.get("sent", 0),
                summary.get("failed", 0),
                summary.get("retried", 0),
                extra={**ids, "event": "run_ended", "reason": ending.reason, **summary},
            )

    async def stop(self, timeout: float) -> None:
        """Take no more work; every run gives its batch back (calls already at a provider
        finish and are written), and audience copies finish. What is still going after
        ``timeout`` is cancelled (a copy's part under way rolls back, the parts before it
        stay; a run's rows are taken back by the sweeper once its lease runs out).
        """
        self.stopping.set()
        deadline = time.monotonic() + timeout
        while going := {*self.runs, *self.copies}:
            left = deadline - time.monotonic()
            if left <= 0:
                for task in going:
                    task.cancel()
                await asyncio.wait(going, timeout=5)
                return
            await asyncio.wait(going, timeout=left)

"""The engine: runs the batches a dispatcher process took, each as a coroutine.

A ``send_batch`` message only points at a batch. The actor hands it to the engine, which
claims the batch in Postgres (under a lease) and starts running it on the process's event
loop; the actor's thread is free again at once. A run that must wait gives its batch back
instead of waiting, and a run that finished its batch goes on with the next due batch of the
same broadcast, keeping the broadcast's number of batches in flight the same. So any number
of slow or throttled channels never keep a fast one from starting: the threads are never
theirs, and the send queue never holds more than a few messages per broadcast.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

from services.dispatcher import metrics
from services.dispatcher.batch_run import BatchRun
from shared import delivery_store as store
from shared.delivery_store import Batch

if TYPE_CHECKING:
    from services.dispatcher.runtime import Runtime

log = logging.getLogger(__name__)


class Engine:
    """Runs this process's batches.

    Parameters:
      rt: the process runtime.
      max_runs: the most batches this process runs at once; a message beyond it waits for
        room (in RabbitMQ and the worker's prefetch), where another process may take it.
    """

    def __init__(self, rt: Runtime, max_runs: int) -> None:
        self.rt = rt
        self.max_runs = max_runs
        self.runs: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    async def adopt(self, batch_id: int) -> bool:
        """Claim the batch a message points at and start running it. False when this process
        is stopping: the message belongs to another process then.
        """
        while len(self.runs) >= self.max_runs and not self.stopping.is_set():
            self._room.clear()
            await self._room.wait()
        if self.stopping.is_set():
            return False
        claimed_at = time.monotonic()
        async with self.rt.pool.connection() as conn:
            batch = await store.arun(
                conn,
                store.claim_batch(batch_id, uuid.uuid4(), lease=self.rt.settings.lease_seconds),
            )
        if batch is not None:  # else done, running elsewhere, or its task is not being sent
            self._start(batch, claimed_at)
        return True

    def _start(self, batch: Batch, claimed_at: float) -> None:
        task = asyncio.create_task(self._runner(batch, claimed_at), name=f"batch-{batch.id}")
        self.runs.add(task)
        task.add_done_callback(self._ended)
        metrics.BATCH_RUNS.set(len(self.runs))

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.runs.discard(task)
        metrics.BATCH_RUNS.set(len(self.runs))
        self._room.set()

    async def _runner(self, batch: Batch, claimed_at: float) -> None:
        """Run a batch, then the broadcast's next due batches while the run may go on."""
        current: Batch | None = batch
        while current is not None:
            ids = {"broadcast_id": current.broadcast_id, "batch_id": current.id}
            try:
                ending = await BatchRun(self.rt, current, claimed_at, self.stopping).run()
            except Exception:
                log.exception("broadcast %s batch %s: run failed", *ids.values(), extra=ids)
                return
            log.info(
                "broadcast %s batch %s: run ended (%s%s)",
                current.broadcast_id,
                current.id,
                ending.reason,
                f", due again in {ending.due_in:.1f} s" if ending.reason == "wait" else "",
                extra={**ids, "reason": ending.reason},
            )
            if not ending.go_on or self.stopping.is_set():
                return
            claimed_at = time.monotonic()
            try:
                async with self.rt.pool.connection() as conn:
                    current = await store.arun(
                        conn,
                        store.next_batch(
                            current.broadcast_id,
                            uuid.uuid4(),
                            lease=self.rt.settings.lease_seconds,
                        ),
                    )
            except Exception as exc:
                # The relay hands the broadcast's batches out in any case.
                log.warning(
                    "broadcast %s: taking the next batch failed (%s)",
                    ids["broadcast_id"],
                    exc,
                    extra=ids,
                )
                return

    async def stop(self, timeout: float) -> None:
        """Take no more batches; every run gives its batch back (calls already at a provider
        finish and are written). Runs still going after ``timeout`` are cancelled.
        """
        self.stopping.set()
        self._room.set()
        if not self.runs:
            return
        _, pending = await asyncio.wait(set(self.runs), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)

"""Leases of the batches a process runs: kept while the runs live, and known to be lost in time.

A run's lease is its batch row's ``lease_expires_at``; the rows the run holds are its rows while
the lease holds. One keeper per process renews the leases of all its runs in one statement
every quarter of the lease, retrying after errors. Each run knows, on its own clock, until when
it may start a provider call: from the moment the keeper *asked* for the last renewal that
succeeded, plus the lease, less the longest a call may take (the send timeout) and a second.
So however slow the database or the network, every call a run starts ends before the sweeper
can hand its rows to anyone else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from services.dispatcher import metrics
from shared import delivery_store as store
from shared.delivery_store import Batch
from shared.logsafe import error_text

if TYPE_CHECKING:
    from services.dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: Pause between attempts when a renewal fails.
RETRY_SECONDS = 0.5


class Lease:
    """One run's lease, as this process knows it.

    Parameters:
      batch: the run.
      valid_until: ``time.monotonic()`` until which the run may start a call.
      on_lost: called once if the lease is lost.
    """

    def __init__(
        self,
        batch: Batch,
        renewed: float,
        seconds: float,
        margin: float,
        on_lost: Callable[[], None],
    ) -> None:
        self.batch = batch
        self.seconds = seconds
        self.margin = margin
        #: ``time.monotonic()`` when the last renewal that succeeded was asked for.
        self.renewed = renewed
        self.lost = False
        self._on_lost = on_lost

    @property
    def valid_until(self) -> float:
        """Until when the run may start a call (one that ends before the lease can)."""
        return self.renewed + self.seconds - self.margin

    def writable(self) -> bool:
        """Do the run's rows surely still belong to it (so its results may be written)?"""
        return not self.lost and time.monotonic() < self.renewed + self.seconds - 1.0

    def held(self) -> bool:
        """May the run still start a provider call (one that will end before the lease can)?"""
        return not self.lost and time.monotonic() < self.valid_until

    def lose(self, why: str) -> None:
        if self.lost:
            return
        self.lost = True
        metrics.LEASES_LOST.inc()
        ids = {"broadcast_id": self.batch.broadcast_id, "batch_id": self.batch.id}
        log.error(
            "broadcast %s batch %s: the run's lease %s; it starts no more provider calls",
            self.batch.broadcast_id,
            self.batch.id,
            why,
            extra=ids,
        )
        self._on_lost()


class LeaseKeeper:
    """Renews the leases of every run of one process.

    Parameters:
      rt: the process runtime (its database pool and settings).
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.seconds = rt.settings.lease_seconds
        #: A call started before a lease's ``valid_until`` ends before the lease can run out.
        self.margin = rt.settings.send_timeout_seconds + 1.0
        self._leases: dict[int, Lease] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep())
        self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            log.critical("the lease keeper stopped (%s); starting it again", task.exception())
            self.start()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def take(self, batch: Batch, claimed_at: float, on_lost: Callable[[], None]) -> Lease:
        """Keep a run's lease from now on; ``claimed_at`` is ``time.monotonic()`` just
        before its batch was claimed.
        """
        lease = Lease(batch, claimed_at, self.seconds, self.margin, on_lost)
        self._leases[batch.id] = lease
        return lease

    def give_up(self, lease: Lease) -> None:
        """The run ends: its lease is no longer renewed (nor reported lost)."""
        if self._leases.get(lease.batch.id) is lease:
            del self._leases[lease.batch.id]

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.seconds / 4)
            try:
                await self._renew_all()
            except Exception:
                log.exception("renewing leases failed unexpectedly; trying again")

    async def _renew_all(self) -> None:
        """Renew every lease held, retrying while renewals fail."""
        while self._leases:
            asked = time.monotonic()
            leases = list(self._leases.values())
            try:
                async with self.rt.pool.connection() as conn:
                    ours = await store.arun(
                        conn, store.renew([x.batch for x in leases], lease=self.seconds)
                    )
            except Exception as exc:
                self._failed(leases, exc)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            for lease in leases:
                if self._leases.get(lease.batch.id) is not lease:
                    continue  # its run ended meanwhile
                if lease.batch.id in ours:
                    lease.renewed = asked
                else:
                    lease.lose("was taken back by the sweeper")
            return

    def _failed(self, leases: list[Lease], exc: Exception) -> None:
        now = time.monotonic()
        waiting = []
        for lease in leases:
            if self._leases.get(lease.batch.id) is not lease:
                continue
            if now >= lease.valid_until:
                lease.lose(f"could not be renewed in time ({exc})")
            else:
                waiting.append(lease)
        if waiting:
            broadcasts = sorted({x.batch.broadcast_id for x in waiting})
            log.warning(
                "broadcast %s: lease renewal of %s batch runs failed (%s); retrying",
                ", ".join(map(str, broadcasts[:10])) + (" ..." if len(broadcasts) > 10 else ""),
                len(waiting),
                error_text(exc),
                extra={"broadcast_ids": broadcasts[:10]},
            )

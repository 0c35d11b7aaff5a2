"""A run's lease on its batch: kept while the run lives, and known to be lost in time.

The lease is the batch row's ``lease_expires_at``; the rows a run holds are its rows while the
lease holds. The run renews it every quarter of its length, retrying after errors. It knows, on
its own clock, until when it may start a provider call: from the moment it *asked* for the
last successful renewal, plus the lease, less the longest a call may take (the send timeout)
and a second. So however slow the database or the network, every call the run starts ends
before the sweeper can hand its rows to anyone else.
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

if TYPE_CHECKING:
    from services.dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: Pause between attempts when a renewal fails.
RETRY_SECONDS = 0.5


class RunLease:
    """Renews a run's lease and says whether it still holds.

    Parameters:
      rt: the process runtime (its database pool and settings).
      batch: the run.
      claimed_at: ``time.monotonic()`` just before the batch was claimed.
      on_lost: called once if the lease is lost.
    """

    def __init__(
        self, rt: Runtime, batch: Batch, claimed_at: float, on_lost: Callable[[], None]
    ) -> None:
        self.rt = rt
        self.batch = batch
        self.seconds = rt.settings.lease_seconds
        #: A call started before ``valid_until`` ends before the lease can run out.
        self.margin = rt.settings.send_timeout_seconds + 1.0
        self.valid_until = claimed_at + self.seconds - self.margin
        self.lost = False
        self._on_lost = on_lost

    def held(self) -> bool:
        """May the run still start a provider call (one that will end before the lease can)?"""
        return not self.lost and time.monotonic() < self.valid_until

    async def keep(self) -> None:
        """Renew until cancelled, or until the lease is lost."""
        while True:
            await asyncio.sleep(self.seconds / 4)
            while True:
                asked = time.monotonic()
                try:
                    async with self.rt.pool.connection() as conn:
                        ours = await store.arun(conn, store.renew(self.batch, lease=self.seconds))
                except Exception as exc:
                    if time.monotonic() >= self.valid_until:
                        self._lose(f"could not be renewed in time ({exc})")
                        return
                    log.warning(
                        "broadcast %s batch %s: lease renewal failed (%s); retrying",
                        self.batch.broadcast_id,
                        self.batch.id,
                        exc,
                        extra={"broadcast_id": self.batch.broadcast_id, "batch_id": self.batch.id},
                    )
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                break
            if not ours:
                self._lose("was taken back by the sweeper")
                return
            self.valid_until = asked + self.seconds - self.margin

    def _lose(self, why: str) -> None:
        self.lost = True
        metrics.LEASES_LOST.inc()
        log.error(
            "broadcast %s batch %s: the run's lease %s; it starts no more provider calls",
            self.batch.broadcast_id,
            self.batch.id,
            why,
            extra={"broadcast_id": self.batch.broadcast_id, "batch_id": self.batch.id},
        )
        self._on_lost()

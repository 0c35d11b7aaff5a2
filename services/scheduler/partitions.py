"""Keeping the partitions of ``delivery``: made ahead of need, removed past retention.

Each scheduler process runs this in a thread of its own, once at start and then every
``MAINTAIN_SECONDS``, on a connection of its own: removing a partition waits (holding nobody
up) until every transaction that may still read it has ended, a long audience copy included,
and the scheduler's loop must not wait with it. With several schedulers, making is idempotent
and one prunes at a time (the others skip). What is made and removed is
``shared.delivery_partitions``'s.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from dataclasses import dataclass

import psycopg
from prometheus_client import Counter, Gauge

from shared import delivery_partitions as partitions
from shared import delivery_store as store
from shared.db.engine import libpq_url
from shared.logsafe import error_text
from shared.settings import Settings

log = logging.getLogger(__name__)

#: Seconds between two rounds of upkeep.
MAINTAIN_SECONDS = 600.0

PARTITIONS = Gauge(
    "bcast_delivery_partitions",
    "Partitions of the delivery table (attached, detaching) and tables retention detached "
    "(archived, or detached and not yet dropped), by state.",
    ["state"],
)
HELD = Gauge(
    "bcast_delivery_partitions_held",
    "Delivery partitions past retention kept because a broadcast with rows in them is not yet "
    "completed or canceled.",
)
REMOVED = Counter(
    "bcast_delivery_partitions_removed_total",
    "Delivery partitions retention removed, by what it did with them (dropped or archived).",
    ["action"],
)
PURGED = Counter(
    "bcast_delivery_rows_purged_total",
    "Delivery rows of deleted broadcasts removed (a few thousand per step, after the delete).",
)
ROWS_REMOVED = Counter(
    "bcast_delivery_rows_removed_total",
    "Delivery rows in the partitions retention removed, by what it did with them.",
    ["action"],
)


def init_metrics() -> None:
    """Retention's series at 0 before its first run: removing rows reads as a rise."""
    for action in partitions.Action:
        if action != partitions.Action.HELD:
            REMOVED.labels(action.value)
            ROWS_REMOVED.labels(action.value)
    for state in partitions.State:
        PARTITIONS.labels(state.value)


@dataclass(frozen=True)
class Upkeep:
    """What one round did."""

    #: The partition that holds today and those made ahead of it.
    ahead: list[partitions.Partition]
    #: Partitions past retention, and what became of each.
    removals: list[partitions.Removal]
    #: Rows of deleted broadcasts removed.
    purged: int = 0


class PartitionKeeper:
    """Makes partitions ahead and prunes old ones, periodically.

    Parameters:
      settings: the database, partition width, retention and archive mode.
      stopping: set when the scheduler stops; the keeper stops with it.
    """

    def __init__(self, settings: Settings, stopping: threading.Event) -> None:
        self.settings = settings
        self.stopping = stopping
        self._thread: threading.Thread | None = None

    def run_once(self) -> Upkeep:
        """One round of upkeep; metrics follow what it found."""
        settings = self.settings
        with psycopg.connect(
            libpq_url(settings.database_url), autocommit=True, application_name="bcast-partitions"
        ) as conn:
            ahead = store.run(conn, partitions.ensure_ahead(settings.delivery_partition_days))
            removals = partitions.prune(
                conn,
                retention_days=settings.delivery_retention_days,
                archive=settings.delivery_archive,
            )
            states = Tally(p.state for p in store.run(conn, partitions.listing()))
            purged = self.purge(conn)
        for state in partitions.State:
            PARTITIONS.labels(state.value).set(states[state])
        HELD.set(sum(1 for r in removals if r.action == partitions.Action.HELD))
        for r in removals:
            if r.action != partitions.Action.HELD:
                REMOVED.labels(r.action.value).inc()
                ROWS_REMOVED.labels(r.action.value).inc(r.rows)
        return Upkeep(ahead, removals, purged)

    def purge(self, conn: psycopg.Connection) -> int:
        """Remove the rows of deleted broadcasts, one short transaction per step, until none
        is left (or the scheduler stops). Returns how many went.
        """
        purged = 0
        while not self.stopping.is_set():
            step = store.run(conn, store.purge_step())
            if step is None:
                break
            purged += step
            PURGED.inc(step)
        if purged:
            log.info(
                "delivery rows of deleted broadcasts removed: %s",
                purged,
                extra={"event": "rows_purged", "rows": purged},
            )
        return purged

    def start(self) -> None:
        """Run rounds in a thread until ``stopping`` is set."""
        self._thread = threading.Thread(target=self._loop, name="bcast-partitions", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.run_once()
            except Exception as exc:
                log.warning(
                    "delivery partitions: upkeep failed (%s); trying again in %.0f s",
                    error_text(exc),
                    MAINTAIN_SECONDS,
                )
            self.stopping.wait(MAINTAIN_SECONDS)

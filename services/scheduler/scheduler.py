"""The scheduler: one loop that starts due broadcasts and keeps sending ones moving.

Each pass:
  1. claims due tasks (``pending``, ``send_at <= now()``, ``FOR UPDATE SKIP LOCKED``) and, in
     the same transaction, moves them to ``in_progress`` and writes an outbox row for each, or
     pauses a task found too long overdue (after downtime) with a reason the operator sees;
  2. publishes outbox rows to RabbitMQ (publisher confirms), deleting each only after the
     broker confirmed it, so a crash between commit and publish loses nothing;
  3. now and then sweeps: rows whose lease ran out (a dead dispatcher) go back to queued, and
     a sending task with no progress for a while is handed to the dispatchers again.
Between passes it sleeps until the next task is due, the poll interval runs out, or Postgres
NOTIFYs a new task, a status change or an outbox row: immediate sends start at once.

Any number of schedulers may run: SKIP LOCKED hands each due task and outbox row to one.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType

import psycopg
import tenacity
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.broker import make_broker, start_message
from shared.db.engine import get_sessionmaker, libpq_url
from shared.settings import Settings

log = logging.getLogger(__name__)

#: Tasks claimed per transaction.
CLAIM_LIMIT = 100
#: Outbox rows published per transaction.
RELAY_LIMIT = 200
#: Seconds between sweeps.
SWEEP_SECONDS = 5.0
#: Advisory lock namespace: one scheduler sweeps at a time.
SWEEP_LOCK = 0x6263_0002

CLAIMED = Counter("bcast_scheduler_started_total", "Broadcasts moved from pending to in_progress.")
OVERDUE = Counter(
    "bcast_scheduler_overdue_paused_total", "Broadcasts paused for being found too long overdue."
)
PUBLISHED = Counter(
    "bcast_outbox_published_total", "Start messages published to RabbitMQ.", ["reason"]
)
REQUEUED = Counter(
    "bcast_leases_expired_total", "Deliveries taken back from a dispatcher whose lease ran out."
)
STALLED = Counter(
    "bcast_scheduler_redispatched_total", "Sending broadcasts handed out again after stalling."
)
OUTBOX_BACKLOG = Gauge("bcast_outbox_backlog", "Outbox rows waiting to be published.")
START_DELAY = Histogram(
    "bcast_start_delay_seconds",
    "From a task's send time to the scheduler starting it.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
PASS_SECONDS = Histogram("bcast_scheduler_pass_duration_seconds", "Time of one scheduler pass.")


def claim_due(session: Session, overdue_limit: timedelta) -> tuple[list[int], list[int]]:
    """Start the due tasks and pause the ones too late to fire silently; one transaction.
    Returns (started ids, paused ids).
    """
    due = session.execute(
        text(
            """
            SELECT id, send_at, late_start_approved, now() AS now
            FROM broadcast
            WHERE status = 'pending' AND send_at <= now()
            ORDER BY send_at
            LIMIT :n
            FOR UPDATE SKIP LOCKED
            """
        ),
        {"n": CLAIM_LIMIT},
    ).all()
    if not due:
        return [], []
    start = [r.id for r in due if r.late_start_approved or r.now - r.send_at <= overdue_limit]
    late = [r for r in due if r.id not in set(start)]
    for r in late:
        session.execute(
            text(
                "UPDATE broadcast SET status = 'paused', status_reason = :reason, updated_at = now() "
                "WHERE id = :id"
            ),
            {
                "id": r.id,
                "reason": (
                    f"overdue: it was due at {r.send_at.isoformat()} but the scheduler found it "
                    f"{_human(r.now - r.send_at)} later (limit {_human(overdue_limit)}); "
                    "resume it to send anyway, or cancel it"
                ),
            },
        )
    if start:
        session.execute(
            text(
                """
                UPDATE broadcast
                SET status = 'in_progress', status_reason = NULL, updated_at = now(),
                    started_at = coalesce(started_at, now()), heartbeat_at = now()
                WHERE id = ANY(:ids)
                """
            ),
            {"ids": start},
        )
        _to_outbox(session, start, "start")
    for r in due:
        if r.id in start:
            START_DELAY.observe(max(0.0, (r.now - r.send_at).total_seconds()))
    return start, [r.id for r in late]


def _to_outbox(session: Session, ids: list[int], reason: str) -> None:
    session.execute(
        text(
            "INSERT INTO dispatch_outbox (workspace_id, broadcast_id, reason) "
            "SELECT workspace_id, id, :reason FROM broadcast WHERE id = ANY(:ids)"
        ),
        {"ids": ids, "reason": reason},
    )


def relay_outbox(session: Session, publish: Callable[[int], None]) -> int:
    """Publish a batch of outbox rows, then delete them, in one transaction: a row leaves the
    outbox only once the broker has confirmed its message. Returns how many were published.
    """
    rows = session.execute(
        text(
            "SELECT id, broadcast_id, reason FROM dispatch_outbox ORDER BY id LIMIT :n "
            "FOR UPDATE SKIP LOCKED"
        ),
        {"n": RELAY_LIMIT},
    ).all()
    for row in rows:
        publish(row.broadcast_id)
        PUBLISHED.labels(row.reason).inc()
    if rows:
        session.execute(
            text("DELETE FROM dispatch_outbox WHERE id = ANY(:ids)"), {"ids": [r.id for r in rows]}
        )
    return len(rows)


def sweep(session: Session, stall: timedelta) -> tuple[int, int]:
    """Take back rows of dead dispatchers and re-dispatch stalled tasks.
    Returns (rows taken back, tasks re-dispatched). One scheduler sweeps at a time.
    """
    if not session.execute(
        text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SWEEP_LOCK}
    ).scalar_one():
        return 0, 0
    taken_back = 0
    expired = (
        session.execute(
            text(
                "SELECT DISTINCT broadcast_id FROM delivery "
                "WHERE status = 'sending' AND lease_expires_at < now()"
            )
        )
        .scalars()
        .all()
    )
    for broadcast_id in expired:
        # Lock the task first: a cancel committing meanwhile must not strand rows as queued.
        status = session.execute(
            text("SELECT status FROM broadcast WHERE id = :id FOR UPDATE"), {"id": broadcast_id}
        ).scalar_one()
        back = "canceled" if status == "canceled" else "queued"
        count = session.execute(
            text(
                """
                UPDATE delivery SET status = :back, lease_token = NULL, lease_expires_at = NULL,
                       updated_at = now()
                WHERE broadcast_id = :id AND status = 'sending' AND lease_expires_at < now()
                """
            ),
            {"id": broadcast_id, "back": back},
        ).rowcount  # type: ignore[attr-defined]
        if back == "canceled":
            session.execute(
                text("UPDATE broadcast SET canceled_count = canceled_count + :n WHERE id = :id"),
                {"n": count, "id": broadcast_id},
            )
        taken_back += count
    REQUEUED.inc(taken_back)
    stalled = (
        session.execute(
            text(
                """
            SELECT b.id FROM broadcast b
            WHERE b.status = 'in_progress'
              AND coalesce(b.heartbeat_at, b.started_at) < now() - :stall * interval '1 second'
              AND (b.snapshot_at IS NULL OR EXISTS (
                    SELECT 1 FROM delivery d
                    WHERE d.broadcast_id = b.id AND d.status = 'queued'
                      AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now())))
            FOR UPDATE OF b SKIP LOCKED
            """
            ),
            {"stall": stall.total_seconds()},
        )
        .scalars()
        .all()
    )
    if stalled:
        session.execute(
            text("UPDATE broadcast SET heartbeat_at = now() WHERE id = ANY(:ids)"),
            {"ids": list(stalled)},
        )
        _to_outbox(session, list(stalled), "stalled")
        STALLED.inc(len(stalled))
    # A task whose last rows ended outside the send loop (taken back, then canceled) completes here.
    session.execute(
        text(
            """
            UPDATE broadcast SET status = 'completed', finished_at = now(), updated_at = now()
            WHERE status = 'in_progress' AND snapshot_at IS NOT NULL
              AND sent_count + failed_count + canceled_count + skipped_count >= total_count
            """
        )
    )
    OUTBOX_BACKLOG.set(session.execute(text("SELECT count(*) FROM dispatch_outbox")).scalar_one())
    return taken_back, len(stalled)


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


class Scheduler:
    """The scheduler loop of one process.

    Parameters:
      settings: poll interval, overdue limit, stall time, database and broker URLs.
      broker: where start messages go (made from settings when not given).
    """

    def __init__(self, settings: Settings, broker: RabbitmqBroker | None = None) -> None:
        self.settings = settings
        self.broker = broker or make_broker(settings.broker_url)
        self.sessions = get_sessionmaker()
        self.stopping = threading.Event()
        self._last_sweep = 0.0

    def publish(self, broadcast_id: int) -> None:
        self.broker.enqueue(start_message(broadcast_id))

    def run_pass(self) -> None:
        """One pass: claim, relay, and sweep when due."""
        started = time.perf_counter()
        with self.sessions() as session, session.begin():
            claimed, paused = claim_due(
                session, timedelta(seconds=self.settings.overdue_limit_seconds)
            )
        CLAIMED.inc(len(claimed))
        OVERDUE.inc(len(paused))
        if claimed or paused:
            log.info("started %s, paused as overdue %s", claimed, paused)
        while True:
            with self.sessions() as session, session.begin():
                if relay_outbox(session, self.publish) < RELAY_LIMIT:
                    break
        if time.monotonic() - self._last_sweep >= SWEEP_SECONDS:
            self._last_sweep = time.monotonic()
            with self.sessions() as session, session.begin():
                taken_back, redispatched = sweep(
                    session, timedelta(seconds=self.settings.stall_seconds)
                )
            if taken_back or redispatched:
                log.info(
                    "sweep: %s rows taken back, %s tasks re-dispatched", taken_back, redispatched
                )
        PASS_SECONDS.observe(time.perf_counter() - started)

    def next_wait(self) -> float:
        """Seconds until the next pending task is due, capped by the poll interval."""
        with self.sessions() as session:
            due = session.execute(
                text("SELECT min(send_at) FROM broadcast WHERE status = 'pending'")
            ).scalar_one()
        poll = self.settings.scheduler_poll_seconds
        if due is None:
            return poll
        return float(max(0.0, min(poll, (due - datetime.now(UTC)).total_seconds())))

    def run(self) -> None:
        """Loop until ``stop()``; survive database or broker outages by retrying."""
        conninfo = libpq_url(self.settings.database_url)
        for attempt in tenacity.Retrying(
            wait=tenacity.wait_exponential(multiplier=0.5, max=10),
            retry=tenacity.retry_if_exception_type(Exception),
            before_sleep=lambda state: log.warning(
                "scheduler error, retrying: %s", state.outcome.exception() if state.outcome else ""
            ),
        ):
            with attempt:
                if self.stopping.is_set():
                    return
                self._listen_and_loop(conninfo)
                return

    def _listen_and_loop(self, conninfo: str) -> None:
        with psycopg.connect(
            conninfo, autocommit=True, application_name="bcast-scheduler"
        ) as listener:
            listener.execute("LISTEN bcast_broadcast")
            listener.execute("LISTEN bcast_outbox")
            while not self.stopping.is_set():
                self.run_pass()
                wait = self.next_wait()
                if wait > 0:
                    # Wake at the next due time, the poll interval, or the first notice.
                    for _ in listener.notifies(timeout=wait, stop_after=1):
                        pass

    def stop(self, *_: object) -> None:
        self.stopping.set()


def install_signal_handlers(scheduler: Scheduler) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping after this pass", signum)
        scheduler.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)

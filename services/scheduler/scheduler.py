"""The scheduler: one loop that starts due broadcasts and keeps sending ones moving.

Each pass:
  1. claims due tasks (``pending``, ``send_at <= now()``, ``FOR UPDATE SKIP LOCKED``), up to
     ``CLAIM_LIMIT`` in one short transaction, chunk after chunk until none is due (on
     ``CLAIMERS`` connections at once when many are due), and in each moves them to
     ``in_progress`` and writes an outbox row for each, or pauses a task found too long
     overdue (after downtime) with a reason the operator sees;
  2. publishes outbox rows (start messages) to RabbitMQ in one AMQP transaction, deleting them
     only after the broker took them, so a crash between commit and publish loses nothing.
     Small audiences go as groups (one message, one copy transaction for up to
     ``GROUP_TASKS`` of them), each large one alone;
  3. relays batches: the due, ready batches of tasks being sent, at most a small window per
     task (sized to its channel's rate), are marked queued and published the same way;
  4. now and then sets the backlog gauges and sweeps: batches whose run's lease ran out (a
     dead dispatcher) are taken back with exactly the rows they held, batch messages that were
     lost are published again, and a task whose audience was never copied (a lost start
     message) is started again.
Each stage runs whatever happened to the ones before it: a broker refusing publishes stops
neither the claims nor the gauges nor the sweeps. A failed stage is counted
(``bcast_scheduler_errors_total{stage}``) and logged; a pass in which every stage succeeded
stamps ``bcast_scheduler_last_pass_timestamp_seconds``; every turn of the loop, failing or not,
is a heartbeat (``shared.heartbeat``: the liveness probe).
Thousands of tasks due in the same second are so started in a few short transactions, one
after the other, and their starts leave in a few messages right after.
Between passes it sleeps until the next task or batch is due, the poll interval runs out, or
Postgres NOTIFYs a new task, a status change, an outbox row or a batch ready to go: immediate
sends start at once. Beside the loop, a thread keeps the partitions of the delivery table: made
ahead, removed past retention (``services.scheduler.partitions``).

Any number of schedulers may run: SKIP LOCKED hands each due task and outbox row to one, and
one relays or sweeps at a time.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

import psycopg
import tenacity
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import text
from sqlalchemy.orm import Session

from services.scheduler import partitions as partition_keeper
from services.scheduler.partitions import PartitionKeeper
from shared import delivery_store as store
from shared import heartbeat
from shared.broker import (
    BatchPublisher,
    make_broker,
    quiet_dropped_connections,
    send_batch_message,
    start_message,
)
from shared.db.engine import get_sessionmaker, libpq_url, raw_connection
from shared.domain.lifecycle import OVERDUE_REASON_PREFIX, BatchState
from shared.logsafe import error_text, listed_ids
from shared.settings import Settings

log = logging.getLogger(__name__)

#: Tasks claimed per transaction: short enough that a task's ``started_at`` is when it was
#: taken.
CLAIM_LIMIT = 1000
#: Connections that claim at once while more tasks are due than one chunk holds (they take
#: disjoint chunks: SKIP LOCKED).
CLAIMERS = 2
#: Outbox rows (and batches) published per transaction (one AMQP transaction each).
RELAY_LIMIT = 2000
#: A broadcast whose audience (as counted when it was written) is at most this is started
#: together with other small ones: one message and one copy transaction for the group.
SMALL_AUDIENCE = 1000
#: Most broadcasts in one group.
GROUP_TASKS = 200
#: Most recipients in one group (as counted when the broadcasts were written), so that its
#: copy stays a short transaction.
GROUP_RECIPIENTS = 2000
#: Most batches handed out and not yet taken by a dispatcher, all tasks together: more wait in
#: Postgres, in the order they fell due, rather than in the send queue.
RELAY_MAX_QUEUED = 128
#: While the send queue is full, the relay looks again this often (seconds).
RELAY_RETRY_SECONDS = 0.05
#: Sends per second one running batch is counted on for, when a task's window of batches in
#: flight is sized to its channel's rate.
SENDS_PER_BATCH = 500.0
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
BATCHES_PUBLISHED = Counter(
    "bcast_batches_published_total", "Batch messages published to RabbitMQ by the relay."
)
REQUEUED = Counter(
    "bcast_leases_expired_total", "Deliveries taken back from a dispatcher whose lease ran out."
)
BATCHES_RECOVERED = Counter(
    "bcast_batches_recovered_total",
    "Batches handed out again: their run's lease ran out (lease), their message was lost "
    "(message), or they were done with rows a lost run left held (stranded).",
    ["reason"],
)
STRANDED = Counter(
    "bcast_stranded_rows_total",
    "Delivery rows left sending by a run that lost its batch, found when nothing else would "
    "hand them out again (their batches done, or their broadcast canceled), and given back.",
)
STALLED = Counter(
    "bcast_scheduler_redispatched_total",
    "Started broadcasts whose audience was never copied, started again.",
)
OUTBOX_BACKLOG = Gauge(
    "bcast_outbox_backlog",
    "Outbox rows waiting to be published (measured every few seconds, whatever else fails).",
)
OUTBOX_OLDEST = Gauge(
    "bcast_outbox_oldest_age_seconds",
    "Age of the oldest outbox row waiting to be published (0 when there is none).",
)
IN_PROGRESS = Gauge(
    "bcast_broadcasts_in_progress",
    "Broadcasts being sent (status in_progress), measured every few seconds.",
)
ERASED_ROWS = Counter(
    "bcast_erased_rows_total",
    "Delivery rows of erased (deleted) contacts whose address the sweep erased after the "
    "delete (an account's contacts, rows an audience copy under way wrote).",
)
AUTO_PAUSED = Gauge(
    "bcast_broadcasts_auto_paused",
    "Broadcasts paused by themselves for too many failed sends and not resumed yet.",
)
AUTO_PAUSES = Counter(
    "bcast_auto_pauses_total",
    "Times a broadcast paused itself because too many of its last sends failed.",
)
#: The stages of a pass; each runs whatever happened to the ones before it.
STAGES = ("claim", "outbox", "relay", "observe", "sweep")
#: What ``bcast_scheduler_errors_total`` counts: the stages, and the loop around them (its
#: listener connection, the wait for the next pass).
ERROR_STAGES = (*STAGES, "loop")
STAGE_ERRORS = Counter(
    "bcast_scheduler_errors_total",
    "Scheduler stages that failed (claim: starting due broadcasts; outbox: publishing start "
    "messages; relay: publishing batches; observe: the backlog gauges; sweep: recovery; loop: "
    "the loop around them, e.g. its database connection).",
    ["stage"],
)
STAGE_SUCCESS = Gauge(
    "bcast_scheduler_stage_last_success_timestamp_seconds",
    "When a stage of this scheduler last succeeded, or the process started if it has not yet "
    "(Unix time).",
    ["stage"],
)
LAST_PASS = Gauge(
    "bcast_scheduler_last_pass_timestamp_seconds",
    "When this scheduler last finished a pass in which every stage succeeded, or the process "
    "started if none has yet (Unix time).",
)
#: After a pass with a failed stage the next waits at least this long, doubling to the most.
ERROR_BACKOFF = 0.5
ERROR_BACKOFF_MAX = 10.0
BATCHES = Gauge(
    "bcast_batches",
    "Batches of broadcasts being sent, by state (ready: waiting its turn or its time; queued: "
    "published; running: being sent).",
    ["state"],
)
START_DELAY = Histogram(
    "bcast_start_delay_seconds",
    "From a task's send time to the scheduler starting it.",
    # Fine below a second (the goal), and between 1 and 5 minutes, where a late start is
    # either a slow pass (tens of seconds) or the overdue limit's neighbourhood.
    buckets=(
        0.01,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2,
        5,
        10,
        20,
        30,
        45,
        60,
        90,
        120,
        150,
        180,
        210,
        240,
        270,
        300,
        600,
        1800,
        3600,
    ),
)
#: Claims of at most this many tasks log a line per task; larger ones one line with the ids.
LINES_PER_CLAIM = 50
PASS_SECONDS = Histogram("bcast_scheduler_pass_duration_seconds", "Time of one scheduler pass.")


def claim_due(
    session: Session, overdue_limit: timedelta, *, limit: int = CLAIM_LIMIT
) -> tuple[list[int], list[int]]:
    """Start up to ``limit`` due tasks and pause the ones too late to fire silently; one
    transaction, one statement for those started (and their outbox rows), however many.
    Returns (started ids, paused ids).
    """
    due = session.execute(
        text(
            """
            WITH due AS (
                SELECT id, send_at, late_start_approved FROM broadcast
                WHERE status = 'pending' AND send_at <= now()
                ORDER BY send_at
                LIMIT :n
                FOR UPDATE SKIP LOCKED
            ),
            started AS (
                UPDATE broadcast
                SET status = 'in_progress', status_reason = NULL, updated_at = now(),
                    started_at = coalesce(started_at, now()), heartbeat_at = now()
                WHERE id = ANY(ARRAY(
                    SELECT id FROM due
                    WHERE late_start_approved OR now() - send_at <= :overdue * interval '1 second'
                ))
                RETURNING id, workspace_id
            ),
            queued AS (
                INSERT INTO dispatch_outbox (workspace_id, broadcast_id, reason)
                SELECT workspace_id, id, 'start' FROM started
            )
            SELECT due.id, due.send_at, now() AS now, started.id IS NOT NULL AS started
            FROM due LEFT JOIN started ON started.id = due.id
            """
        ),
        {"n": limit, "overdue": overdue_limit.total_seconds()},
    ).all()
    late = [r for r in due if not r.started]
    for r in late:
        session.execute(
            text(
                "UPDATE broadcast SET status = 'paused', status_reason = :reason, updated_at = now() "
                "WHERE id = :id"
            ),
            {
                "id": r.id,
                "reason": (
                    f"{OVERDUE_REASON_PREFIX}it was due at {r.send_at.isoformat()} but the "
                    "scheduler found it "
                    f"{_human(r.now - r.send_at)} later (limit {_human(overdue_limit)}); "
                    "resume it confirming the late start to send anyway, or cancel it"
                ),
            },
        )
    start = [r for r in due if r.started]
    for r in start:
        START_DELAY.observe(max(0.0, (r.now - r.send_at).total_seconds()))
    return [r.id for r in start], [r.id for r in late]


def _to_outbox(session: Session, ids: list[int], reason: str) -> None:
    session.execute(
        text(
            "INSERT INTO dispatch_outbox (workspace_id, broadcast_id, reason) "
            "SELECT workspace_id, id, :reason FROM broadcast WHERE id = ANY(:ids)"
        ),
        {"ids": ids, "reason": reason},
    )


#: What one start message carries: one broadcast's id, or the ids of a group of small ones.
Start = int | list[int]


def start_groups(tasks: Sequence[tuple[int, int]]) -> list[Start]:
    """The start messages for ``(broadcast id, audience size)`` pairs, in their order: each
    large audience alone, small ones in groups of at most ``GROUP_TASKS`` broadcasts and
    ``GROUP_RECIPIENTS`` recipients.
    """
    starts: list[Start] = []
    group: list[int] = []
    recipients = 0
    for broadcast_id, size in tasks:
        if size > SMALL_AUDIENCE:
            starts.append(broadcast_id)
            continue
        if group and (len(group) >= GROUP_TASKS or recipients + size > GROUP_RECIPIENTS):
            starts.append(group)
            group, recipients = [], 0
        if broadcast_id not in group:
            group.append(broadcast_id)
            recipients += size
    if group:
        starts.append(group)
    return starts


def relay_outbox(session: Session, publish: Callable[[list[Start]], None]) -> int:
    """Publish a batch of outbox rows, then delete them, in one transaction: a row leaves the
    outbox only once the broker has taken its message. Returns how many rows were published.
    """
    rows = session.execute(
        text(
            """
            SELECT o.id, o.broadcast_id, o.reason,
                   -- A copy in parts already begun goes on alone, as it began.
                   CASE WHEN b.total_count > 0 AND b.snapshot_at IS NULL
                        THEN greatest(b.audience_size, :alone) ELSE b.audience_size END
                       AS audience_size
            FROM dispatch_outbox o JOIN broadcast b ON b.id = o.broadcast_id
            ORDER BY o.id LIMIT :n
            FOR UPDATE OF o SKIP LOCKED
            """
        ),
        {"n": RELAY_LIMIT, "alone": SMALL_AUDIENCE + 1},
    ).all()
    publish(start_groups([(row.broadcast_id, row.audience_size) for row in rows]))
    for row in rows:
        PUBLISHED.labels(row.reason).inc()
    if rows:
        session.execute(
            text("DELETE FROM dispatch_outbox WHERE id = ANY(:ids)"), {"ids": [r.id for r in rows]}
        )
    return len(rows)


def relay_batches(
    session: Session, publish: Callable[[list[int]], None], *, max_window: int
) -> int:
    """Publish the batches the delivery store says are due and fit their task's window, in
    one transaction that commits only after the broker confirmed every message (an outbox).
    Returns how many were published.
    """
    picked = store.run(
        raw_connection(session),
        store.relay(
            per_batch_rate=SENDS_PER_BATCH,
            max_window=max_window,
            limit=RELAY_LIMIT,
            max_queued=RELAY_MAX_QUEUED,
        ),
    )
    publish([batch_id for batch_id, _ in picked])
    BATCHES_PUBLISHED.inc(len(picked))
    return len(picked)


@dataclass(frozen=True)
class Swept:
    """What one sweep did."""

    taken_back: store.TakenBack = field(default_factory=store.TakenBack)
    restarted: int = 0
    stranded: list[store.Stranded] = field(default_factory=list)
    erased: store.Settled = field(default_factory=lambda: store.Settled(0, 0))


def sweep(session: Session, *, lease: timedelta, stall: timedelta) -> Swept:
    """Recover from dead dispatchers and lost messages, exactly (the delivery store's
    ``take_back``), give back rows nothing else would (``settle_stranded``), start again
    tasks whose audience was never copied, and drop the batches of finished tasks. One
    scheduler sweeps at a time.
    """
    if not session.execute(
        text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SWEEP_LOCK}
    ).scalar_one():
        return Swept()
    conn = raw_connection(session)
    taken = store.run(
        conn,
        store.take_back(republish_after=stall.total_seconds()),
    )
    REQUEUED.inc(taken.rows)
    BATCHES_RECOVERED.labels("lease").inc(taken.batches)
    BATCHES_RECOVERED.labels("message").inc(taken.republished)
    # Before the batches of canceled tasks are dropped below: they are how those are found.
    stranded = store.run(conn, store.settle_stranded())
    STRANDED.inc(sum(s.rows for s in stranded))
    BATCHES_RECOVERED.labels("stranded").inc(sum(s.batches for s in stranded))
    # Started, but the audience was never copied whole: the start message was lost or its
    # dispatcher died or stopped mid-copy (a part is one transaction, so nothing half-done
    # remains; a large copy goes on from its last part, and one making progress keeps its
    # heartbeat fresh).
    stalled = (
        session.execute(
            text(
                """
                SELECT id FROM broadcast
                WHERE status = 'in_progress' AND snapshot_at IS NULL
                  AND coalesce(heartbeat_at, started_at) < now() - :stall * interval '1 second'
                FOR UPDATE SKIP LOCKED
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
    store.run(conn, store.drop_finished_batches())
    erased = store.run(conn, store.settle_erasures())
    ERASED_ROWS.inc(erased.rows)
    return Swept(taken, len(stalled), stranded, erased)


def observe(session: Session) -> None:
    """Set the backlog gauges: outbox rows waiting (and the age of the oldest), broadcasts
    being sent, batches by state. Run on its own, so that they tell the truth while publishing
    or sweeping fails.
    """
    backlog, oldest = session.execute(
        text(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 "
            "FROM dispatch_outbox"
        )
    ).one()
    OUTBOX_BACKLOG.set(backlog)
    OUTBOX_OLDEST.set(oldest)
    IN_PROGRESS.set(
        session.execute(
            text("SELECT count(*) FROM broadcast WHERE status = 'in_progress'")
        ).scalar_one()
    )
    AUTO_PAUSED.set(
        session.execute(
            text(
                "SELECT count(*) FROM broadcast "
                "WHERE status = 'paused' AND auto_paused_at IS NOT NULL"
            )
        ).scalar_one()
    )
    for state, count in store.run(raw_connection(session), store.batch_counts()).items():
        BATCHES.labels(state).set(count)


#: Ends logged per pass at most (the rest wait for the next pass).
END_LINES_LIMIT = 500


def take_ended(
    session: Session, *, limit: int = END_LINES_LIMIT, settle_seconds: float = 900.0
) -> list[Any]:
    """Mark up to ``limit`` ended tasks (completed, or canceled with final counts) whose end
    is not yet logged as logged, and return them with their counts: the caller logs them
    before its transaction commits (a line logged and not marked is logged again, never
    lost). Row locks skipped and the column set in one statement: with several schedulers
    each end is taken by one. A canceled task whose counts never add up is taken
    ``settle_seconds`` after it was canceled.
    """
    return list(
        session.execute(
            text(
                """
                UPDATE broadcast b SET end_logged_at = now()
                WHERE b.id = ANY(ARRAY(
                    SELECT id FROM broadcast
                    WHERE end_logged_at IS NULL AND status IN ('completed', 'canceled')
                      -- A task canceled mid-send still has rows at dispatchers: they become
                      -- canceled (or sent) as they come back. Its counts are final once they
                      -- add up, or surely once every lease has run out.
                      AND (
                          status = 'completed'
                          OR sent_count + failed_count + partial_count + canceled_count
                             + skipped_count >= total_count
                          OR finished_at < now() - :settle * interval '1 second'
                      )
                    ORDER BY id
                    LIMIT :n
                    FOR UPDATE SKIP LOCKED
                ))
                RETURNING b.id, b.workspace_id, b.channel_id, b.origin, b.status,
                    b.total_count, b.sent_count, b.failed_count, b.partial_count,
                    b.canceled_count, b.skipped_count,
                    extract(epoch FROM b.finished_at - b.started_at)::float8 AS seconds
                """
            ),
            {"n": limit, "settle": settle_seconds},
        ).all()
    )


def take_auto_paused(session: Session, *, limit: int = END_LINES_LIMIT) -> list[Any]:
    """Mark up to ``limit`` broadcasts that paused themselves, not yet logged, as logged and
    return them (logged by the caller before its transaction commits), each taken once.
    """
    return list(
        session.execute(
            text(
                """
                UPDATE broadcast b SET auto_pause_logged_at = now()
                WHERE b.id = ANY(ARRAY(
                    SELECT id FROM broadcast
                    WHERE auto_paused_at IS NOT NULL AND auto_pause_logged_at IS NULL
                    ORDER BY id LIMIT :n
                    FOR UPDATE SKIP LOCKED
                ))
                RETURNING b.id, b.workspace_id, b.channel_id, b.status_reason
                """
            ),
            {"n": limit},
        ).all()
    )


def log_auto_paused(paused: list[Any]) -> None:
    """A line (ERROR: a broadcast stopped for its failures needs an operator) per broadcast
    that paused itself, and the count.
    """
    for b in paused:
        AUTO_PAUSES.inc()
        log.error(
            "broadcast %s: %s",
            b.id,
            b.status_reason,
            extra={
                "event": "auto_paused",
                "broadcast_id": b.id,
                "workspace_id": b.workspace_id,
                "channel_id": b.channel_id,
                "reason": b.status_reason,
            },
        )


def log_ended(ended: list[Any]) -> None:
    """A lifecycle line per ended task, with its counts."""
    for b in ended:
        event = "completed" if b.status == "completed" else "ended"
        log.info(
            "broadcast %s: %s: %s of %s sent, %s failed, %s partly sent, %s canceled, %s skipped%s",
            b.id,
            "completed" if b.status == "completed" else "ended (canceled)",
            b.sent_count,
            b.total_count,
            b.failed_count,
            b.partial_count,
            b.canceled_count,
            b.skipped_count,
            f" in {b.seconds:.1f} s" if b.seconds is not None else "",
            extra={
                "event": event,
                "broadcast_id": b.id,
                "workspace_id": b.workspace_id,
                "channel_id": b.channel_id,
                "origin": b.origin,
                "broadcast_status": b.status,
                "total": b.total_count,
                "sent": b.sent_count,
                "failed": b.failed_count,
                "partial": b.partial_count,
                "canceled": b.canceled_count,
                "skipped": b.skipped_count,
                "duration_seconds": None if b.seconds is None else round(b.seconds, 3),
            },
        )


def init_metrics() -> None:
    """Every labelled series at 0 from the start: a first increment must read as a rise."""
    for stage in ERROR_STAGES:
        STAGE_ERRORS.labels(stage)
    for stage in STAGES:
        # From the process's start: "no success for 2 minutes" counts from then, not from 1970
        # (a first failure right after a start is not two minutes of failing).
        STAGE_SUCCESS.labels(stage).set_to_current_time()
    LAST_PASS.set_to_current_time()
    for reason in ("start", "stalled"):
        PUBLISHED.labels(reason)
    for reason in ("lease", "message", "stranded"):
        BATCHES_RECOVERED.labels(reason)
    for state in BatchState:
        BATCHES.labels(state.value)
    partition_keeper.init_metrics()


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
        init_metrics()
        self.settings = settings
        self.broker = broker or make_broker(settings.broker_url)
        self.publisher = BatchPublisher(self.broker, settings.broker_url)
        self.sessions = get_sessionmaker()
        self.stopping = threading.Event()
        self._last_sweep = 0.0
        self.partitions = PartitionKeeper(settings, self.stopping)

    def publish(self, starts: list[Start]) -> None:
        """Start messages (one broadcast or a group each), all taken by RabbitMQ when this
        returns.
        """
        self.publisher.publish([start_message(start) for start in starts])

    def publish_batch(self, batch_ids: list[int]) -> None:
        """Batch messages for ``batch_ids``, all taken by RabbitMQ when this returns."""
        self.publisher.publish([send_batch_message(i) for i in batch_ids])

    def run_pass(self) -> bool:
        """One pass: claim every due task (chunk by chunk, each chunk committed at once, so
        a task's ``started_at`` is when it was taken; ``CLAIMERS`` connections at once when
        more are due than one chunk holds), publish the starts, relay batches, and, every
        ``SWEEP_SECONDS``, set the backlog gauges and sweep. Each stage runs whatever happened
        to the ones before it (a broker refusing publishes must not stop claims, gauges or
        recovery); a failed stage is counted and logged. Returns whether every stage succeeded.
        """
        started = time.perf_counter()
        stages: list[tuple[str, Callable[[], None]]] = [
            ("claim", self._claim),
            ("outbox", self._relay_outbox),
            ("relay", self._relay_batches),
        ]
        if time.monotonic() - self._last_sweep >= SWEEP_SECONDS:
            self._last_sweep = time.monotonic()
            stages += [("observe", self._observe), ("sweep", self._sweep)]
        ok = True
        for stage, step in stages:
            try:
                step()
            except Exception as exc:
                ok = False
                STAGE_ERRORS.labels(stage).inc()
                log.error(
                    "scheduler stage %s failed: %s",
                    stage,
                    error_text(exc),
                    extra={"stage": stage},
                )
            else:
                STAGE_SUCCESS.labels(stage).set_to_current_time()
        if ok:
            LAST_PASS.set_to_current_time()
        PASS_SECONDS.observe(time.perf_counter() - started)
        return ok

    def _claim(self) -> None:
        overdue = timedelta(seconds=self.settings.overdue_limit_seconds)
        if self._claim_chunk(overdue) == CLAIM_LIMIT:
            with ThreadPoolExecutor(CLAIMERS, thread_name_prefix="bcast-claim") as claimers:
                for claiming in [
                    claimers.submit(self._claim_all, overdue) for _ in range(CLAIMERS)
                ]:
                    claiming.result()

    def _relay_outbox(self) -> None:
        while True:
            with self.sessions() as session, session.begin():
                if relay_outbox(session, self.publish) < RELAY_LIMIT:
                    return

    def _relay_batches(self) -> None:
        while True:
            with self.sessions() as session, session.begin():
                published = relay_batches(
                    session,
                    self.publish_batch,
                    max_window=self.settings.broadcast_max_batches,
                )
            if published < RELAY_LIMIT:
                return

    def _observe(self) -> None:
        with self.sessions() as session, session.begin():
            observe(session)
            # Logged before the commit: a crash in between logs them again, never loses them.
            log_ended(take_ended(session, settle_seconds=self.settings.lease_seconds * 3))
            log_auto_paused(take_auto_paused(session))

    def _sweep(self) -> None:
        with self.sessions() as session, session.begin():
            swept = sweep(
                session,
                lease=timedelta(seconds=self.settings.lease_seconds),
                stall=timedelta(seconds=self.settings.stall_seconds),
            )
        taken = swept.taken_back
        if taken.batches or taken.rows or taken.republished or swept.restarted:
            log.warning(
                "sweep: %s batches of dead dispatchers taken back with %s rows, %s lost "
                "batch messages published again, %s broadcasts started again",
                taken.batches,
                taken.rows,
                taken.republished,
                swept.restarted,
            )
        if swept.erased.rows or swept.erased.done:
            log.info(
                "erasure: %s delivery rows of erased contacts erased, %s erasures finished",
                swept.erased.rows,
                swept.erased.done,
                extra={
                    "event": "contacts_erased",
                    "rows": swept.erased.rows,
                    "erasures": swept.erased.done,
                },
            )
        for s in swept.stranded:
            # Nothing in the normal course leaves rows so: a dispatcher of an earlier version
            # in the fleet, or a fault worth a look.
            log.warning(
                "broadcast %s (%s): %s rows left held by a lost run given back, %s batches "
                "ready again",
                s.broadcast_id,
                s.status,
                s.rows,
                s.batches,
                extra={
                    "event": "stranded_rows",
                    "broadcast_id": s.broadcast_id,
                    "rows": s.rows,
                    "batches": s.batches,
                },
            )

    def _claim_chunk(self, overdue: timedelta) -> int:
        """Claim one chunk of due tasks in a transaction of its own; returns how many."""
        with self.sessions() as session, session.begin():
            claimed, paused = claim_due(session, overdue)
        CLAIMED.inc(len(claimed))
        OVERDUE.inc(len(paused))
        if len(claimed) + len(paused) <= LINES_PER_CLAIM:
            # A lifecycle line per broadcast, its id a field like on every line of its work.
            for broadcast_id in claimed:
                log.info(
                    "broadcast %s: started",
                    broadcast_id,
                    extra={"event": "started", "broadcast_id": broadcast_id},
                )
            for broadcast_id in paused:
                log.warning(
                    "broadcast %s: paused as overdue",
                    broadcast_id,
                    extra={"event": "paused_overdue", "broadcast_id": broadcast_id},
                )
        else:
            # Thousands of timed sends due at once: one line each would slow the very pass
            # that starts them; the ids go as lists.
            log.info(
                "started %s broadcasts (%s), paused %s as overdue (%s)",
                len(claimed),
                listed_ids(claimed),
                len(paused),
                listed_ids(paused),
                extra={"event": "started", "broadcast_ids": claimed, "paused_ids": paused},
            )
        return len(claimed) + len(paused)

    def _claim_all(self, overdue: timedelta) -> None:
        """Claim chunks until one is not full (another claimer may be taking the rest)."""
        while self._claim_chunk(overdue) == CLAIM_LIMIT:
            pass

    def next_wait(self) -> float:
        """Seconds until the next pending task or waiting batch is due, capped by the poll
        interval; a moment while the send queue is full (the dispatchers taking batches
        make room for the next).
        """
        wait = self.settings.scheduler_poll_seconds
        with self.sessions() as session:
            due = session.execute(
                text("SELECT min(send_at) FROM broadcast WHERE status = 'pending'")
            ).scalar_one()
            conn = raw_connection(session)
            batch_due = store.run(conn, store.next_relay_in())
            if store.run(conn, store.queued_batches()) >= RELAY_MAX_QUEUED:
                wait = min(wait, RELAY_RETRY_SECONDS)
        if due is not None:
            wait = min(wait, (due - datetime.now(UTC)).total_seconds())
        if batch_due is not None:
            wait = min(wait, batch_due)
        return float(max(0.0, wait))

    def run(self) -> None:
        """Loop until ``stop()``; survive database or broker outages by retrying."""
        conninfo = libpq_url(self.settings.database_url)
        self.partitions.start()
        for attempt in tenacity.Retrying(
            wait=tenacity.wait_exponential(multiplier=0.5, max=10),
            retry=tenacity.retry_if_exception_type(Exception),
            before_sleep=self._loop_failed,
        ):
            with attempt:
                if self.stopping.is_set():
                    break
                # Trying again is the loop turning: a restart would do no better.
                heartbeat.beat(self.settings.heartbeat_dir, "scheduler")
                try:
                    self._listen_and_loop(conninfo)
                finally:
                    if self.stopping.is_set():
                        quiet_dropped_connections()
                    self.publisher.close()
                break
        heartbeat.forget(self.settings.heartbeat_dir, "scheduler")

    def _listen_and_loop(self, conninfo: str) -> None:
        with psycopg.connect(
            conninfo, autocommit=True, application_name="bcast-scheduler"
        ) as listener:
            listener.execute("LISTEN bcast_broadcast")
            listener.execute("LISTEN bcast_outbox")
            listener.execute("LISTEN bcast_batch")
            backoff = 0.0
            while not self.stopping.is_set():
                heartbeat.beat(self.settings.heartbeat_dir, "scheduler")
                self.publisher.keep_alive()
                if self.run_pass():
                    backoff = 0.0
                else:
                    # Something failed (the broker refusing, the database out): try again
                    # soon, not at once, whatever is due.
                    backoff = min(ERROR_BACKOFF_MAX, max(ERROR_BACKOFF, 2 * backoff))
                wait = max(self.next_wait(), backoff)
                if wait > 0:
                    # Wake at the next due time, the poll interval, or the first notice; then
                    # take every notice already waiting, so one pass answers them all.
                    for _ in listener.notifies(timeout=wait, stop_after=1):
                        pass
                    for _ in listener.notifies(timeout=0.001):
                        pass

    def _loop_failed(self, state: tenacity.RetryCallState) -> None:
        """The loop itself failed (the database unreachable for its listener): counted as the
        ``loop`` stage, and tried again with backoff.
        """
        STAGE_ERRORS.labels("loop").inc()
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "scheduler loop failed, trying again: %s",
            error_text(exc) if exc else "",
            extra={"stage": "loop"},
        )

    def stop(self, *_: object) -> None:
        self.stopping.set()


def install_signal_handlers(scheduler: Scheduler) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping after this pass", signum)
        scheduler.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)

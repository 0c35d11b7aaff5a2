"""The send loop: one readable pass over a range of deliveries.

``run_batch`` claims rows still ``queued`` in its range, takes a rate-limit slot for each,
checks just before every provider call that the broadcast is still ``in_progress``, sends with
the delivery id as idempotency key, and records the outcome. What it deliberately does not do:
decide anything from memory that Postgres has not committed. A row is ``sending`` only under
this claim's lease token; results are written only where that token still holds, so a row
taken back from a slow or dead worker is never counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import psycopg
import tenacity
from psycopg.rows import dict_row

from services.dispatcher import metrics
from services.dispatcher.channels import make_adapter
from services.dispatcher.channels.base import (
    ChannelAdapter,
    MediaRef,
    OutboundMessage,
    Outcome,
    Permanent,
    Sent,
    Transient,
    join_ids,
)
from services.dispatcher.runtime import Runtime
from shared.domain.lifecycle import BroadcastStatus, DeliveryStatus
from shared.domain.media import signed_media_url

log = logging.getLogger(__name__)

#: Results waiting are written together this often (one transaction per write).
FLUSH_SECONDS = 0.05
#: A send starting later than this after its slot takes a new one. The limiter's headroom
#: (3%) absorbs lateness up to about 30 ms in any one-second window; this stays inside it.
LATE_TOLERANCE = 0.025
MAX_RESLOTS = 5
#: SET clauses that complete an ``in_progress`` task once its counters, with ``%(delta)s``
#: rows just made final, reach the total. (SET sees the counters as they were.)
COMPLETE_IF_DONE = """
    status = CASE WHEN status = 'in_progress' AND snapshot_at IS NOT NULL
                   AND sent_count + failed_count + canceled_count + skipped_count + %(delta)s
                       >= total_count
                  THEN 'completed' ELSE status END,
    finished_at = CASE WHEN status = 'in_progress' AND snapshot_at IS NOT NULL
                   AND sent_count + failed_count + canceled_count + skipped_count + %(delta)s
                       >= total_count
                  THEN now() ELSE finished_at END
"""
#: How far ahead a batch claims rows and takes rate-limit slots.
LOOKAHEAD_SECONDS = 1.0
#: Wait used when a provider throttles without saying how long.
DEFAULT_THROTTLE_SECONDS = 1.0


@dataclass(frozen=True)
class Claimed:
    id: int
    contact_id: int
    address: str
    attempts: int
    #: Calls of a several-call message an earlier attempt already made.
    parts_done: int
    provider_message_id: str | None


@dataclass
class Job:
    """Everything about one broadcast a batch needs, loaded once per batch."""

    broadcast_id: int
    workspace_id: int
    channel_id: int
    kind: str
    rate: float
    message: OutboundMessage
    adapter: ChannelAdapter


@dataclass
class BatchResult:
    """What the actor must arrange after a batch: a retry later, or the rest now."""

    retry_in: float | None = None
    more: bool = False


@dataclass
class _Record:
    id: int
    status: str
    provider_message_id: str | None = None
    error: str | None = None
    next_attempt_in: float | None = None
    #: -1 gives back the attempt a claim counted, for rows that were never sent.
    attempts_delta: int = 0
    #: The metrics label: sent, failed, retry, throttled or released.
    outcome: str = "sent"
    parts_done: int | None = None
    #: Set when the provider said this contact cannot be reached at all.
    unreachable_contact: int | None = None


@dataclass
class Recorder:
    """Collects outcomes and writes them in batches, one transaction per write, with the
    broadcast's counters moved in the same transaction.
    """

    rt: Runtime
    job: Job
    token: uuid.UUID
    pending: list[_Record] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    completed: bool = False
    #: Send tasks whose provider call has started.
    calling: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        s = self.rt.settings
        self.backoff = tenacity.wait_fixed(
            s.retry_base_seconds / 2
        ) + tenacity.wait_random_exponential(
            multiplier=s.retry_base_seconds, max=s.retry_max_seconds
        )

    def _backoff(self, attempt: int) -> float:
        state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        state.attempt_number = attempt
        return float(self.backoff(state))

    def outcome(self, row: Claimed, outcome: Outcome) -> None:
        """Turn a provider's answer into the row's next state (a retry while attempts last)."""
        if isinstance(outcome, Sent):
            ids = [outcome.provider_message_id] if outcome.provider_message_id else []
            record = _Record(
                row.id, "sent", provider_message_id=join_ids(row.provider_message_id, ids)
            )
        elif isinstance(outcome, Permanent):
            record = _Record(
                row.id,
                "failed",
                error=outcome.reason,
                outcome="failed",
                unreachable_contact=row.contact_id if outcome.unreachable else None,
            )
        elif outcome.throttled:
            # The provider pushed back on the whole channel: not this recipient's failure, so
            # the attempt is given back and the row waits as long as it was told.
            ids = [outcome.provider_message_id] if outcome.provider_message_id else []
            record = _Record(
                row.id,
                "queued",
                error=outcome.reason,
                next_attempt_in=outcome.retry_after or DEFAULT_THROTTLE_SECONDS,
                attempts_delta=-1,
                outcome="throttled",
                parts_done=outcome.parts_done,
                provider_message_id=join_ids(row.provider_message_id, ids),
            )
        elif row.attempts >= self.rt.settings.max_attempts:
            error = f"gave up after {row.attempts} attempts: {outcome.reason}"
            record = _Record(row.id, "failed", error=error, outcome="failed")
        else:
            wait = max(outcome.retry_after or 0.0, self._backoff(row.attempts))
            ids = [outcome.provider_message_id] if outcome.provider_message_id else []
            record = _Record(
                row.id,
                "queued",
                error=outcome.reason,
                next_attempt_in=wait,
                outcome="retry",
                parts_done=outcome.parts_done,
                provider_message_id=join_ids(row.provider_message_id, ids),
            )
        self.pending.append(record)

    def release(self, row: Claimed, *, after: float | None = None) -> None:
        """Give a row back untouched by any provider call (pause, cancel, channel blocked)."""
        self.pending.append(
            _Record(row.id, "queued", next_attempt_in=after, attempts_delta=-1, outcome="released")
        )

    async def flush(self) -> None:
        """Write what is pending. Records leave ``pending`` only once their transaction has
        committed: a write that fails keeps them for the next try, and they never count as
        done while their rows are still ``sending`` (which would let the rows be sent again).
        """
        async with self.lock:
            if not self.pending:
                return
            records = list(self.pending)
            started = time.perf_counter()
            await self._write(records)
            del self.pending[: len(records)]
            metrics.FLUSH_LATENCY.observe(time.perf_counter() - started)
            # Counted per write, not per send: each metric update costs a shared-memory write.
            for outcome, count in Counter(r.outcome for r in records).items():
                metrics.DELIVERIES.labels(self.job.kind, outcome).inc(count)
            metrics.IN_FLIGHT.labels(self.job.kind).set(self.rt.calls[self.job.kind])

    async def _write(self, records: list[_Record]) -> None:
        async with self.rt.pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute(
                    "SELECT status FROM broadcast WHERE id = %s FOR UPDATE",
                    (self.job.broadcast_id,),
                )
            ).fetchone()
            canceled = row is not None and row[0] == BroadcastStatus.CANCELED
            statuses = [
                DeliveryStatus.CANCELED.value if canceled and r.status == "queued" else r.status
                for r in records
            ]
            cur = await conn.execute(
                """
                UPDATE delivery d
                SET status = v.status,
                    provider_message_id = coalesce(v.pmid, d.provider_message_id),
                    parts_done = coalesce(v.parts, d.parts_done),
                    last_error = CASE WHEN v.status = 'sent' THEN NULL
                                      ELSE coalesce(v.err, d.last_error) END,
                    sent_at = CASE WHEN v.status = 'sent' THEN now() ELSE d.sent_at END,
                    next_attempt_at = CASE WHEN v.wait IS NULL THEN NULL
                                           ELSE now() + v.wait * interval '1 second' END,
                    attempts = d.attempts + v.delta,
                    lease_expires_at = NULL,
                    lease_token = NULL,
                    updated_at = now()
                FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::float8[], %s::int[],
                            %s::int[])
                     AS v(id, status, pmid, err, wait, delta, parts)
                WHERE d.id = v.id AND d.status = 'sending' AND d.lease_token = %s
                RETURNING v.status
                """,
                (
                    [r.id for r in records],
                    statuses,
                    [r.provider_message_id for r in records],
                    [r.error for r in records],
                    [r.next_attempt_in for r in records],
                    [r.attempts_delta for r in records],
                    [r.parts_done for r in records],
                    self.token,
                ),
            )
            written = [r[0] for r in await cur.fetchall()]
            unreachable = [r for r in records if r.unreachable_contact is not None]
            if unreachable:
                # Later broadcasts skip this contact, reporting the provider's reason.
                await conn.execute(
                    """
                    UPDATE contact c
                    SET unreachable_at = now(), unreachable_reason = v.reason, updated_at = now()
                    FROM unnest(%s::bigint[], %s::text[]) AS v(id, reason)
                    WHERE c.id = v.id AND c.unreachable_at IS NULL
                    """,
                    ([r.unreachable_contact for r in unreachable], [r.error for r in unreachable]),
                )
            sent, failed, gone = (
                written.count("sent"),
                written.count("failed"),
                written.count("canceled"),
            )
            done = await (
                await conn.execute(
                    f"""
                    UPDATE broadcast
                    SET sent_count = sent_count + %(sent)s,
                        failed_count = failed_count + %(failed)s,
                        canceled_count = canceled_count + %(gone)s,
                        heartbeat_at = now(),
                        {COMPLETE_IF_DONE}
                    WHERE id = %(id)s
                    RETURNING status
                    """,
                    {
                        "sent": sent,
                        "failed": failed,
                        "gone": gone,
                        "delta": sent + failed + gone,
                        "id": self.job.broadcast_id,
                    },
                )
            ).fetchone()
            self.completed = done is not None and done[0] == BroadcastStatus.COMPLETED


async def load_job(rt: Runtime, broadcast_id: int) -> Job | None:
    """The broadcast, its channel and its message; None when it is not being sent."""
    async with rt.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT b.id, b.workspace_id, b.status, b.content, b.name, c.id AS channel_id, c.kind,
                   c.config, c.rate_limit_per_second, w.signing_key
            FROM broadcast b
            JOIN channel c ON c.id = b.channel_id
            JOIN workspace w ON w.id = b.workspace_id
            WHERE b.id = %s
            """,
            (broadcast_id,),
        )
        row = await cur.fetchone()
        if row is None or row["status"] != BroadcastStatus.IN_PROGRESS:
            return None
        media_ids = [int(m) for m in row["content"].get("media_ids") or []]
        await cur.execute(
            "SELECT id, content_type, storage_key FROM media WHERE id = ANY(%s) AND workspace_id = %s",
            (media_ids, row["workspace_id"]),
        )
        media_rows = await cur.fetchall()
    by_id = {m["id"]: m for m in media_rows}
    base = rt.settings.public_base_url()
    now = time.time()
    media = tuple(
        MediaRef(
            media_id=mid,
            url=signed_media_url(base, row["signing_key"], mid, now=now),
            content_type=by_id[mid]["content_type"],
            storage_key=by_id[mid]["storage_key"],
        )
        for mid in media_ids
        if mid in by_id
    )
    message = OutboundMessage(
        broadcast_id=broadcast_id, text=row["content"].get("text"), media=media, subject=row["name"]
    )
    return Job(
        broadcast_id=broadcast_id,
        workspace_id=row["workspace_id"],
        channel_id=row["channel_id"],
        kind=row["kind"],
        rate=float(row["rate_limit_per_second"]),
        message=message,
        adapter=rt.adapter(row["channel_id"], row["kind"], row["config"], make_adapter),
    )


async def claim(
    rt: Runtime, job: Job, first_id: int, last_id: int, token: uuid.UUID, limit: int
) -> list[Claimed]:
    """Take up to ``limit`` due, queued rows of the range, under ``token``'s lease, if the
    broadcast is still being sent. Rows another worker holds are skipped, not waited for.
    Contacts who opted out (or became unreachable) since the snapshot are skipped first.
    """
    async with rt.pool.connection() as conn:
        await _skip_gone_contacts(conn, job.broadcast_id, first_id, last_id)
        rows = await (
            await conn.execute(
                """
                WITH picked AS (
                    SELECT id FROM delivery
                    WHERE broadcast_id = %(b)s AND id BETWEEN %(lo)s AND %(hi)s AND status = 'queued'
                      AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                    ORDER BY id
                    LIMIT %(n)s
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE delivery d
                SET status = 'sending', attempts = d.attempts + 1, lease_token = %(t)s,
                    lease_expires_at = now() + %(lease)s * interval '1 second', updated_at = now()
                FROM picked
                WHERE d.id = picked.id
                  AND EXISTS (SELECT 1 FROM broadcast WHERE id = %(b)s AND status = 'in_progress')
                RETURNING d.id, d.contact_id, d.address, d.attempts, d.parts_done,
                          d.provider_message_id
                """,
                {
                    "b": job.broadcast_id,
                    "lo": first_id,
                    "hi": last_id,
                    "n": limit,
                    "t": token,
                    "lease": rt.settings.lease_seconds,
                },
            )
        ).fetchall()
    return sorted((Claimed(*r) for r in rows), key=lambda c: c.id)


async def _skip_gone_contacts(
    conn: psycopg.AsyncConnection[Any], broadcast_id: int, first_id: int, last_id: int
) -> None:
    gone_query = """
        SELECT d.id FROM delivery d JOIN contact c ON c.id = d.contact_id
        WHERE d.broadcast_id = %s AND d.id BETWEEN %s AND %s AND d.status = 'queued'
          AND (c.opted_out_at IS NOT NULL OR c.unreachable_at IS NOT NULL)
    """
    if not await (await conn.execute(gone_query, (broadcast_id, first_id, last_id))).fetchone():
        return  # the common case: one cheap read, no lock
    async with conn.transaction():
        # The task first, then its rows: the order every writer here (and a cancel) keeps.
        await conn.execute("SELECT 1 FROM broadcast WHERE id = %s FOR UPDATE", (broadcast_id,))
        gone = await (
            await conn.execute(
                """
                UPDATE delivery d
                SET status = 'skipped', updated_at = now(),
                    last_error = CASE WHEN c.opted_out_at IS NOT NULL THEN 'skipped: contact opted out'
                                      ELSE 'skipped: contact unreachable: '
                                           || coalesce(c.unreachable_reason, '') END
                FROM contact c
                WHERE c.id = d.contact_id AND d.broadcast_id = %s AND d.id BETWEEN %s AND %s
                  AND d.status = 'queued'
                  AND (c.opted_out_at IS NOT NULL OR c.unreachable_at IS NOT NULL)
                RETURNING d.id
                """,
                (broadcast_id, first_id, last_id),
            )
        ).fetchall()
        if gone:
            await conn.execute(
                f"UPDATE broadcast SET skipped_count = skipped_count + %(delta)s, {COMPLETE_IF_DONE} "
                "WHERE id = %(id)s",
                {"delta": len(gone), "id": broadcast_id},
            )


async def renew_leases(rt: Runtime, token: uuid.UUID) -> None:
    """Keep this claim's rows ours while they wait for slots or answers."""
    every = rt.settings.lease_seconds / 3
    while True:
        await asyncio.sleep(every)
        async with rt.pool.connection() as conn:
            await conn.execute(
                "UPDATE delivery SET lease_expires_at = now() + %s * interval '1 second' "
                "WHERE lease_token = %s AND status = 'sending'",
                (rt.settings.lease_seconds, token),
            )


async def run_batch(rt: Runtime, broadcast_id: int, first_id: int, last_id: int) -> BatchResult:
    """Send every due, queued delivery of ``broadcast_id`` with id in ``[first_id, last_id]``."""
    job = await load_job(rt, broadcast_id)
    if job is None:
        return BatchResult()
    board, limiter = rt.status, rt.limiter
    await board.track(broadcast_id)
    token = uuid.uuid4()
    recorder = Recorder(rt, job, token)
    renewing = asyncio.create_task(renew_leases(rt, token))
    stop_flushing = asyncio.Event()
    flushing = asyncio.create_task(_flush_often(recorder, stop_flushing))
    sends: set[asyncio.Task[None]] = set()
    deadline = time.monotonic() + rt.settings.batch_max_seconds
    out_of_time = False
    try:
        while board.is_sending(broadcast_id):
            if time.monotonic() > deadline:
                out_of_time = True
                break
            # About a second of sending at the channel's rate: rows held stay few, so a pause,
            # an opt-out or another worker's share is felt within a second or so.
            limit = max(1, min(rt.settings.claim_size, math.ceil(job.rate * LOOKAHEAD_SECONDS)))
            rows = deque(await claim(rt, job, first_id, last_id, token, limit))
            if not rows:
                break
            while rows and board.is_sending(broadcast_id):
                # Connection permits first, slots second: a slot taken must not then wait for
                # a free connection, or it would go out late and crowd the next ones.
                wanted = limiter.grant_size(job.rate, len(rows))
                await rt.in_flight.acquire()
                n = 1
                while n < wanted and not rt.in_flight.locked():
                    await rt.in_flight.acquire()
                    n += 1
                slots = await limiter.reserve(job.channel_id, job.workspace_id, job.rate, n)
                metrics.RATE_WAIT.labels(job.kind).observe(max(0.0, slots[-1] - time.time()))
                for at in slots:
                    task = asyncio.create_task(_send_one(rt, job, recorder, rows.popleft(), at))
                    sends.add(task)
                    task.add_done_callback(sends.discard)
                # Take no slots further ahead than the lookahead: wait for the ones taken.
                ahead = slots[-1] - time.time() - LOOKAHEAD_SECONDS
                if ahead > 0:
                    await asyncio.sleep(ahead)
            for row in rows:
                recorder.release(row)
        if sends:
            await asyncio.gather(*sends)
    finally:
        # Sends still waiting for their slot are called off (their rows go back); a call
        # already at the provider is let finish, so its answer is written, not guessed.
        for task in sends:
            if task not in recorder.calling:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*sends, return_exceptions=True)
        renewing.cancel()
        # Never cancel a write in flight: its rows would look unsent and go out again.
        stop_flushing.set()
        await asyncio.shield(flushing)
        with contextlib.suppress(Exception):
            await asyncio.shield(recorder.flush())
        # Rows whose outcome could not be written stay ``sending``: their lease runs out and
        # the sweeper decides, rather than this batch sending them again.
        unwritten = [r.id for r in recorder.pending]
        await asyncio.shield(_release_held(rt, token, job, keep=unwritten))
        board.untrack(broadcast_id)
    if recorder.completed:
        return BatchResult()
    return BatchResult(
        retry_in=await _next_retry_in(rt, broadcast_id, first_id, last_id), more=out_of_time
    )


async def _send_one(rt: Runtime, job: Job, recorder: Recorder, row: Claimed, at: float) -> None:
    recorded = False
    try:
        for _ in range(MAX_RESLOTS):
            wait = at - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if time.time() - at <= LATE_TOLERANCE:
                break
            # Too late for the slot: sent now, it would crowd the next ones into a window
            # over the limit. Take a fresh slot instead.
            [at] = await rt.limiter.reserve(job.channel_id, job.workspace_id, job.rate, 1)
        if not rt.status.is_sending(job.broadcast_id):
            recorder.release(row)
            return
        blocked = rt.limiter.blocked_for(job.channel_id)
        if blocked > 0:
            recorder.release(row, after=blocked)
            return
        started = time.perf_counter()
        this = asyncio.current_task()
        assert this is not None
        recorder.calling.add(this)
        rt.calls[job.kind] += 1
        try:
            outcome = await job.adapter.send(
                job.message, row.address, str(row.id), parts_done=row.parts_done
            )
        except Exception as exc:  # an adapter bug must not strand the row
            # The exception's text may quote a URL with a credential in it (a bot token):
            # it stays out of the stored reason and out of the log unless debugging.
            log.error("adapter %s raised %s on delivery %s", job.kind, type(exc).__name__, row.id)
            log.debug("adapter failure", exc_info=True)
            outcome = Transient(f"internal error in the {job.kind} adapter: {type(exc).__name__}")
        finally:
            rt.calls[job.kind] -= 1
            metrics.PROVIDER_LATENCY.labels(job.kind).observe(time.perf_counter() - started)
        recorder.outcome(row, outcome)
        recorded = True
        recorder.calling.discard(this)
        if isinstance(outcome, Transient) and outcome.throttled:
            metrics.THROTTLED.labels(job.kind).inc()
            await rt.limiter.throttle(
                job.channel_id, outcome.retry_after or DEFAULT_THROTTLE_SECONDS, outcome.reason
            )
    except asyncio.CancelledError:
        if not recorded:
            recorder.release(row)
        raise
    finally:
        rt.in_flight.release()


async def _flush_often(recorder: Recorder, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FLUSH_SECONDS)
        if recorder.pending:
            try:
                await recorder.flush()
            except Exception:
                log.exception("writing send results failed; keeping them for the next write")


async def _release_held(rt: Runtime, token: uuid.UUID, job: Job, *, keep: list[int]) -> None:
    """Rows still held by this claim when the batch ends (an interrupted batch) go back."""
    async with rt.pool.connection() as conn, conn.transaction():
        row = await (
            await conn.execute(
                "SELECT status FROM broadcast WHERE id = %s FOR UPDATE", (job.broadcast_id,)
            )
        ).fetchone()
        canceled = row is not None and row[0] == BroadcastStatus.CANCELED
        cur = await conn.execute(
            """
            UPDATE delivery
            SET status = %s, attempts = attempts - 1, lease_token = NULL, lease_expires_at = NULL,
                updated_at = now()
            WHERE lease_token = %s AND status = 'sending' AND id <> ALL(%s)
            """,
            ("canceled" if canceled else "queued", token, keep),
        )
        if canceled and cur.rowcount:
            await conn.execute(
                "UPDATE broadcast SET canceled_count = canceled_count + %s WHERE id = %s",
                (cur.rowcount, job.broadcast_id),
            )


async def _next_retry_in(
    rt: Runtime, broadcast_id: int, first_id: int, last_id: int
) -> float | None:
    """Seconds until the earliest queued row of the range is due, if any is queued."""
    async with rt.pool.connection() as conn:
        row = await (
            await conn.execute(
                """
                SELECT extract(epoch FROM min(coalesce(next_attempt_at, now())) - now())::float8
                FROM delivery
                WHERE broadcast_id = %s AND id BETWEEN %s AND %s AND status = 'queued'
                """,
                (broadcast_id, first_id, last_id),
            )
        ).fetchone()
    if row is None or row[0] is None:
        return None
    return max(0.0, float(row[0]))

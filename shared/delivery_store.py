"""The delivery store: every transition of delivery rows and of the batches that carry them.

The API's cancel, the snapshot, the scheduler's relay and sweeps, and the dispatchers' send loop
all change delivery rows through this module and nowhere else, so each rule is stated once:

* rows that come back unsent go back to ``queued``, or to ``canceled`` when their task was
  canceled meanwhile (``_come_back``);
* a writer locks the task row first, then its rows (``_lock_task``): the order every path keeps,
  so a cancel and a send loop never deadlock;
* a row is ``sending`` only under the token of one run of its batch, and results are written
  only where that token still holds, so a row taken back is never counted twice;
* task counters and completion follow from row transitions in Postgres itself (statement
  triggers over transition tables, and one BEFORE UPDATE rule on the task; migration 0004):
  no path here moves a counter, so none can forget or double one;
* every statement on delivery rows names their ``part_day`` (the broadcast's, carried by its
  batches), so it touches the one partition that holds them (``shared.delivery_partitions``).

Each operation is written once, with one placeholder style: as a generator of SQL statements
(``Op``), or, for the send loop's hot paths, as a single statement (``One``). ``run`` executes
either on a psycopg connection, ``arun`` on an async one; an ``Op`` runs in one transaction (a
savepoint when the caller's transaction is already open), and a ``One`` is one statement,
atomic by itself, so it costs one round trip. Every transition commits whole or not at all.
Tests run the same operations directly against Postgres, with no process started.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, time
from itertools import groupby
from typing import Any, Generic, TypeVar

import psycopg

from shared.domain.lifecycle import (
    CANCELED_REASON,
    CANCELED_UNSURE_REASON,
    ERASED_ADDRESS,
    ERASED_REASON,
    MULTICAST_RECIPIENTS,
    NO_REASON,
    OPTED_OUT_REASON,
    UNREACHABLE_REASON,
    BatchState,
    BroadcastStatus,
    DeliveryStatus,
)
from shared.values import value

T = TypeVar("T")

#: Advisory lock namespaces (first key; the second is the broadcast id where there is one).
SNAPSHOT_LOCK = 0x6263_0001
RELAY_LOCK = 0x6263_0003
#: Today in UTC by the database's clock: the ``part_day`` of an audience copied now.
TODAY = "(now() AT TIME ZONE 'UTC')::date"

QUEUED = DeliveryStatus.QUEUED.value
SENDING = DeliveryStatus.SENDING.value
#: A run waits in place (a coroutine, no thread) at most this long for its channel's next slot
#: or its rows' next attempt; longer, and it gives its batch back until then. The relay holds
#: back the batches of a channel booked or throttled further ahead than this.
MAX_WAIT = 2.0


@dataclass(frozen=True, slots=True)
class Query:
    """One SQL statement with ``%(name)s`` parameters."""

    sql: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result:
    rows: list[tuple[Any, ...]]
    rowcount: int

    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None


#: A store operation: yields statements, receives their results, returns its answer.
Op = Generator[Query, Result, T]


@dataclass(frozen=True, slots=True)
class One(Generic[T]):
    """A store operation that is a single statement (atomic by itself: no transaction, one
    round trip) and the reading of its result.
    """

    query: Query
    read: Callable[[Result], T]


def run(conn: psycopg.Connection[Any], op: Op[T] | One[T]) -> T:
    """Run ``op`` on ``conn`` in one transaction (a savepoint inside an open one)."""
    if isinstance(op, One):
        cur = conn.execute(op.query.sql, op.query.params)
        return op.read(Result(cur.fetchall() if cur.description else [], cur.rowcount))
    with conn.transaction():
        try:
            query = next(op)
            while True:
                cur = conn.execute(query.sql, query.params)
                query = op.send(Result(cur.fetchall() if cur.description else [], cur.rowcount))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def arun(conn: psycopg.AsyncConnection[Any], op: Op[T] | One[T]) -> T:
    """``run`` for an async connection."""
    if isinstance(op, One):
        cur = await conn.execute(op.query.sql, op.query.params)
        return op.read(Result(await cur.fetchall() if cur.description else [], cur.rowcount))
    async with conn.transaction():
        try:
            query = next(op)
            while True:
                cur = await conn.execute(query.sql, query.params)
                rows = await cur.fetchall() if cur.description else []
                query = op.send(Result(rows, cur.rowcount))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


# --- the rules every path shares -------------------------------------------------------------


def _lock_task(broadcast_id: int) -> Op[str | None]:
    """Lock the task row and read its status. Always first, before any of its rows."""
    result = yield Query(
        "SELECT status FROM broadcast WHERE id = %(b)s FOR UPDATE", {"b": broadcast_id}
    )
    status: str | None = result.scalar()
    return status


def array_literal(values: Iterable[object]) -> str:
    """A Postgres array literal (``{1,NULL,"a \\"b\\""}``) of ints, floats, UUIDs, strings and
    None (NULL), for a ``%(x)s::type[]`` parameter. The send loop's writes pass a few arrays
    of a hundred values per statement: psycopg adapts a list element by element in Python (a
    text element costs microseconds), a string built here costs a join. Strings are always
    quoted, with backslash and double quote escaped: the literal reads back as the same text.
    """
    return "{" + ",".join(map(_element, values)) + "}"


def repeated_literal(values: Iterable[object]) -> str:
    """``array_literal`` of values of one type with few distinct ones (a run's token, a row's
    next status): each is written out once, a UUID's text costing microseconds.
    """
    seen: dict[tuple[type, object], str] = {}
    parts = []
    for v in values:
        key = (type(v), v)  # by type too: 1, 1.0 and True are one key to a dict
        text = seen.get(key)
        if text is None:
            text = seen[key] = _element(v)
        parts.append(text)
    return "{" + ",".join(parts) + "}"


def _element(value: object) -> str:
    kind = type(value)
    if kind is int or kind is float or kind is uuid.UUID:
        return str(value)
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value + 0)
    raise TypeError(f"no Postgres array element for a {kind.__name__}")


def given_back(task_status: str) -> str:
    """Where a row goes when it comes back unsent: canceled if its task is, else queued
    again. ``task_status`` is an SQL expression for the task's status (read under its lock).
    """
    return f"CASE WHEN {task_status} = 'canceled' THEN 'canceled' ELSE 'queued' END"


def _text(value: str) -> str:
    """An SQL string literal, for a statement with parameters (a ``%`` is doubled)."""
    return "'" + value.replace("'", "''").replace("%", "%%") + "'"


def canceled_reason(last_error: str, *, unsure: bool = False) -> str:
    """The reason a row canceled now carries (every recipient not reached says why: a CHECK
    of ``delivery``): why it was canceled, then its last attempt's error if it had one.
    ``last_error`` is an SQL expression; ``unsure`` says a send to it was under way in a run
    that was lost.
    """
    why = CANCELED_UNSURE_REASON if unsure else CANCELED_REASON
    return f"coalesce({_text(why + '; last attempt: ')} || {last_error}, {_text(why)})"


def reason_given_back(task_status: str, last_error: str, *, unsure: bool = False) -> str:
    """The reason a row coming back unsent carries (``given_back``): ``last_error`` when it
    is queued again, the cancel's when its task is canceled. A row queued again keeps its
    reason unchanged, so its update stays heap-only.
    """
    canceled = canceled_reason(last_error, unsure=unsure)
    return f"CASE WHEN {task_status} = 'canceled' THEN {canceled} ELSE {last_error} END"


def _come_back(
    batch: Batch,
    task_status: str | None,
    *,
    only: Sequence[int] | None = None,
    keep: Sequence[int] = (),
    attempt_used: bool,
    delay: float | None = None,
    orphans: bool = False,
) -> Op[int]:
    """Rows of the batch's range held under its run's token come back unsent (queued, or
    canceled with their task). With ``orphans``, rows held under any *other* token come back
    instead: the batch was just taken under ``batch.token``, so no live run holds them.

    ``only``/``keep`` narrow which rows; ``attempt_used`` False gives back the attempt the claim
    counted (the provider was never called); ``delay`` keeps the row from being claimed again
    for that many seconds. The batch's range bounds the statement to its rows (by the primary
    key): no index names the token, so that a send's updates stay heap-only.
    """
    result = yield Query(
        f"""
        UPDATE delivery
        SET status = {given_back("%(task)s::text")}, lease_token = NULL, updated_at = now(),
            last_error = {reason_given_back("%(task)s::text", "last_error", unsure=attempt_used)},
            attempts = attempts - %(give_back)s,
            next_attempt_at = CASE WHEN %(delay)s::float8 IS NULL THEN next_attempt_at
                                   ELSE now() + %(delay)s::float8 * interval '1 second' END
        WHERE broadcast_id = %(b)s AND id BETWEEN %(lo)s AND %(hi)s AND part_day = %(p)s
          AND status = 'sending'
          AND (lease_token = %(t)s) <> %(orphans)s
          AND (%(only)s::bigint[] IS NULL OR id = ANY(%(only)s::bigint[]))
          AND id <> ALL(%(keep)s::bigint[])
        """,
        {
            "task": task_status,
            "give_back": 0 if attempt_used else 1,
            "delay": delay,
            "b": batch.broadcast_id,
            "p": batch.part_day,
            "lo": batch.first_id,
            "hi": batch.last_id,
            "t": batch.token,
            "orphans": orphans,
            "only": array_literal(only) if only is not None else None,
            "keep": array_literal(keep),
        },
    )
    return result.rowcount


def _take_orphans(batch: Batch) -> Op[int]:
    """Just after a run took ``batch``: rows of its range still held under an older run's
    token come back (that run lost its batch, to the sweeper or a crash, after a claim the
    sweeper did not see). The common case is one read of the range and no lock.
    """
    held = yield Query(
        "SELECT 1 FROM delivery WHERE broadcast_id = %(b)s AND id BETWEEN %(lo)s AND %(hi)s "
        "AND part_day = %(p)s AND status = 'sending' LIMIT 1",
        {"b": batch.broadcast_id, "p": batch.part_day, "lo": batch.first_id, "hi": batch.last_id},
    )
    if not held.rows:
        return 0
    status = yield from _lock_task(batch.broadcast_id)
    return (yield from _come_back(batch, status, attempt_used=True, orphans=True))


def _cancel_queued(broadcast_id: int, part_day: date) -> Op[int]:
    result = yield Query(
        f"UPDATE delivery SET status = 'canceled', last_error = {canceled_reason('last_error')}, "
        "updated_at = now() "
        "WHERE broadcast_id = %(b)s AND part_day = %(p)s AND status = 'queued'",
        {"b": broadcast_id, "p": part_day},
    )
    return result.rowcount


# --- operator actions ------------------------------------------------------------------------


def cancel(broadcast_id: int) -> Op[int]:
    """Cancel a task for good: recipients not yet sent to become ``canceled``; rows a
    dispatcher holds become canceled when they come back. Returns how many were canceled now.
    The caller has checked that the task may be canceled.
    """
    yield from _lock_task(broadcast_id)
    part_day = (
        yield Query("SELECT part_day FROM broadcast WHERE id = %(b)s", {"b": broadcast_id})
    ).scalar()
    # No day: its audience was never copied, so it has no rows.
    canceled = 0 if part_day is None else (yield from _cancel_queued(broadcast_id, part_day))
    yield Query(
        """
        UPDATE broadcast
        SET status = 'canceled', status_reason = NULL, finished_at = now(), updated_at = now()
        WHERE id = %(b)s
        """,
        {"b": broadcast_id},
    )
    return canceled


def hold(broadcast_id: int, reason: str) -> One[bool]:
    """Pause a task being sent, with the reason the operator reads (its channel cannot be
    used as configured, say); resume sends it on. Returns whether it was paused.
    """
    return One(
        Query(
            """
            UPDATE broadcast SET status = 'paused', status_reason = %(r)s, updated_at = now()
            WHERE id = %(b)s AND status = 'in_progress'
            """,
            {"b": broadcast_id, "r": reason},
        ),
        lambda result: result.rowcount == 1,
    )


# --- the snapshot ----------------------------------------------------------------------------


def snapshot_day(broadcast_id: int) -> One[date | None]:
    """Fix the day a broadcast's audience copy is filed under (today, the first time) and
    return it (None: no such broadcast). Committed before the copy is made, and before its
    partition is made sure of, so retention never removes a partition a copy is filling.
    """
    return One(
        Query(
            f"UPDATE broadcast SET part_day = coalesce(part_day, {TODAY}) WHERE id = %(b)s "
            "RETURNING part_day",
            {"b": broadcast_id},
        ),
        lambda result: result.scalar(),
    )


#: A copy of at least this many rows has its partition's statistics taken again before it
#: commits (below).
ANALYZE_AFTER = 10_000
#: How long such a copy waits for the partition's statistics lock before it goes without.
ANALYZE_WAIT = "200ms"


def _analyze(broadcast_id: int, part_day: date) -> Op[None]:
    """Take the statistics of the partition a large copy went into, in the copy's transaction
    (its own rows count). Until then the planner believes the broadcast has the handful of
    rows it had before, and may read a batch's rows through all of the broadcast's: a result
    write that read 30,000 rows to find 50 was seen before this.

    Only if its lock is free within ``ANALYZE_WAIT``: an index being built on the partition
    (``CREATE INDEX CONCURRENTLY``, a migration) or a constraint being validated holds it
    for as long as that takes, and waits for this transaction meanwhile. Skipped then, the
    statistics come from autovacuum as before.
    """
    found = (
        yield Query(
            "SELECT tableoid::regclass::text FROM delivery "
            "WHERE broadcast_id = %(b)s AND part_day = %(p)s LIMIT 1",
            {"b": broadcast_id, "p": part_day},
        )
    ).first()
    if found is not None:
        yield Query(
            f"""
            DO $$
            DECLARE was text := current_setting('lock_timeout');
            BEGIN
                PERFORM set_config('lock_timeout', '{ANALYZE_WAIT}', true);
                BEGIN
                    ANALYZE {found[0]};
                EXCEPTION WHEN lock_not_available THEN
                    NULL;
                END;
                PERFORM set_config('lock_timeout', was, true);
            END $$
            """
        )


def snapshot(broadcast_id: int, audience: Query, *, batch_size: int) -> Op[int | None]:
    """Copy the whole audience in one transaction (``snapshot_part`` without a limit).
    Returns how many rows were copied, or None when the copy was made before (or is being
    made by another dispatcher this moment).
    """
    part = yield from snapshot_part(broadcast_id, audience, batch_size=batch_size)
    return None if part is None else part.rows


@dataclass(frozen=True, slots=True)
class Copied:
    """What one part of an audience copy did."""

    #: Rows this part copied.
    rows: int
    #: The audience is copied whole (the task's ``snapshot_at`` is set).
    done: bool
    #: The last contact id of the window this part read (None once done): the next part
    #: reads from past it.
    upto: int | None = None


def snapshot_part(
    broadcast_id: int,
    audience: Query,
    *,
    batch_size: int,
    contacts: int | None = None,
    after: int | None = None,
    copied_before: int = 0,
) -> Op[Copied | None]:
    """Copy the next recipients of the audience into delivery rows and cut them into batches,
    which the scheduler may hand out as soon as this commits: a large audience is copied in
    parts while its first batches are already being sent. A part reads the window of the
    workspace's next ``contacts`` contacts by id (found by walking the contact table's
    ``(workspace_id, id)`` index, so every window holds at most that many recipients however
    the audience is spread), from past the last contact copied or past ``after`` (the last
    window read), whichever is further; without ``contacts``, or when fewer are left, it
    reads the rest and ends the copy. Returns None when the copy was finished before (or
    another dispatcher is copying a part this moment).

    ``audience`` selects ``(contact_id, address, skip_reason)``; a contact with a reason (it
    opted out, or a provider called it unreachable) is recorded as skipped with it. The part
    that ends the copy sets the task's ``snapshot_at`` (until then it cannot complete,
    whatever its counters say) and its ``audience_size``: its ``counts.total``. A canceled
    task's copy ends at the next part, which copies nothing more (as a cancel before the copy
    left no rows). The copy runs inside Postgres (``INSERT ... SELECT``), so memory stays
    flat for any audience; the task row is locked only at the end of a part, so a pause or
    cancel never waits for a long copy, and a cancel that committed meanwhile cancels the
    rows just copied. A part cut short (a crash) leaves nothing of itself, and the next part
    goes on from the rows committed. Only the rows a part inserted are cut into batches, so
    no row is ever in two. The rows go to the partition of the broadcast's ``part_day``
    (``snapshot_day``; today if it was not fixed), which must exist
    (``shared.delivery_partitions.ensure``). ``copied_before``: rows the caller's earlier
    parts copied (for when the partition's statistics are taken).
    """
    copying = (
        yield Query(
            "SELECT pg_try_advisory_xact_lock(%(snap_ns)s, %(snap_b)s)",
            {"snap_ns": SNAPSHOT_LOCK, "snap_b": broadcast_id},
        )
    ).scalar()
    if not copying:
        return None  # another dispatcher is copying it right now
    task = (
        yield Query(
            f"SELECT workspace_id, snapshot_at, coalesce(part_day, {TODAY}), status "
            "FROM broadcast WHERE id = %(snap_b)s",
            {"snap_b": broadcast_id},
        )
    ).first()
    if task is None or task[1] is not None:
        return None
    workspace_id, part_day, status = task[0], task[2], task[3]
    params: dict[str, Any] = {
        **audience.params,
        "snap_b": broadcast_id,
        "snap_ws": workspace_id,
        "snap_day": part_day,
    }
    if status == BroadcastStatus.CANCELED:
        yield from _end_copy(params)
        return Copied(0, done=True)
    # The last contact copied (this broadcast's rows are only ever added here, one part at a
    # time, each after the last committed), and the end of this part's window.
    copied_upto = (
        yield Query(
            "SELECT max(contact_id) FROM delivery "
            "WHERE broadcast_id = %(snap_b)s AND part_day = %(snap_day)s",
            params,
        )
    ).scalar()
    starts = [x for x in (after, copied_upto) if x is not None]
    params["snap_after"] = max(starts) if starts else None
    upto = None
    if contacts is not None:
        upto = (
            yield Query(
                """
                SELECT id FROM contact
                WHERE workspace_id = %(snap_ws)s AND id > coalesce(%(snap_after)s, 0)
                ORDER BY id OFFSET %(snap_n)s LIMIT 1
                """,
                {**params, "snap_n": contacts - 1},
            )
        ).scalar()
    params["snap_upto"] = upto
    window = [
        *(["a.contact_id > %(snap_after)s"] if params["snap_after"] is not None else []),
        *(["a.contact_id <= %(snap_upto)s"] if upto is not None else []),
    ]
    # One statement copies the window and cuts the rows it inserted into batches.
    copied = (
        yield Query(
            f"""
            WITH copied AS (
                INSERT INTO delivery (workspace_id, broadcast_id, contact_id, address, status,
                                      last_error, part_day)
                SELECT %(snap_ws)s, %(snap_b)s, a.contact_id, a.address,
                       CASE WHEN a.reason IS NULL THEN 'queued' ELSE 'skipped' END, a.reason,
                       %(snap_day)s
                FROM ({audience.sql}) AS a(contact_id, address, reason)
                {"WHERE " + " AND ".join(window) if window else ""}
                ORDER BY a.contact_id
                ON CONFLICT (broadcast_id, contact_id, part_day) DO NOTHING
                RETURNING id, status
            ), cut AS (
                INSERT INTO delivery_batch (workspace_id, broadcast_id, part_day, first_id,
                                            last_id)
                SELECT %(snap_ws)s, %(snap_b)s, %(snap_day)s, min(id), max(id)
                FROM (
                    SELECT id, (row_number() OVER (ORDER BY id) - 1) / %(size)s AS n
                    FROM copied WHERE status = 'queued'
                ) AS run
                GROUP BY n
            )
            SELECT count(*) FROM copied
            """,
            {**params, "size": batch_size},
        )
    ).scalar()
    done = upto is None
    total = copied_before + copied
    if copied_before < ANALYZE_AFTER <= total or (done and copied and total >= ANALYZE_AFTER):
        yield from _analyze(broadcast_id, part_day)
    status = yield from _lock_task(broadcast_id)
    if status == BroadcastStatus.CANCELED:
        yield from _cancel_queued(broadcast_id, part_day)
    if done:
        yield from _end_copy(params)
    else:
        # The rows' day is the task's from its first part (a cancel finds them by it), and a
        # copy making progress is not a stalled start (the scheduler's sweep).
        yield Query(
            "UPDATE broadcast SET part_day = %(snap_day)s, heartbeat_at = now() "
            "WHERE id = %(snap_b)s",
            params,
        )
    return Copied(copied, done, upto)


def _end_copy(params: Mapping[str, Any]) -> Op[None]:
    """The copy is whole: with snapshot_at set, the completion rule can see a task that had
    nobody left to send to. Its total is every row copied, by this part and those before.
    """
    yield Query(
        "UPDATE broadcast SET snapshot_at = now(), part_day = %(snap_day)s, "
        "audience_size = total_count WHERE id = %(snap_b)s",
        params,
    )


def snapshot_days(broadcast_ids: Sequence[int]) -> One[dict[int, date]]:
    """``snapshot_day`` for several broadcasts in one statement: fix the day each copy is
    filed under (today, the first time) and return them by broadcast.
    """
    return One(
        Query(
            f"UPDATE broadcast SET part_day = coalesce(part_day, {TODAY}) "
            "WHERE id = ANY(%(ids)s::bigint[]) RETURNING id, part_day",
            {"ids": sorted(set(broadcast_ids))},
        ),
        lambda result: {int(r[0]): r[1] for r in result.rows},
    )


def snapshot_group(
    broadcast_ids: Sequence[int], recipients: Query, *, batch_size: int
) -> Op[dict[int, int]]:
    """Copy the audiences of several small broadcasts being sent, in one transaction, each
    once. Returns how many rows each broadcast copied now; a broadcast missing from it was
    copied before, is being copied by another dispatcher this moment, or is not being sent.

    ``recipients`` selects ``(broadcast_id, contact_id, address, skip_reason)`` for every
    broadcast of the group (rows of a broadcast not copied now are left out); each one's
    ``audience_size`` becomes the number of rows it copied. The task rows are locked first, in id order, and their status read
    under the lock: only those still ``in_progress`` are copied, so a pause or cancel either
    commits before the copy (and the task waits for its next start) or after it (and finds
    its rows). A copy is short by design, so the lock is held for a moment only; large
    audiences go through ``snapshot_part``, which locks the task last. A broadcast a copy in
    parts already began is left out (its copy goes on as it began, part by part): the group
    would cut its earlier rows into batches again. Each broadcast's rows go to
    the partition of its ``part_day`` (``snapshot_days``; today if it was not fixed), which
    must exist (``shared.delivery_partitions.ensure``).
    """
    ids = sorted(set(broadcast_ids))
    if not ids:
        return {}
    ours = (
        yield Query(
            "SELECT id FROM unnest(%(grp_ids)s::bigint[]) AS id "
            "WHERE pg_try_advisory_xact_lock(%(grp_ns)s, id::int)",
            {"grp_ids": ids, "grp_ns": SNAPSHOT_LOCK},
        )
    ).rows
    tasks = (
        yield Query(
            f"""
            SELECT id, coalesce(part_day, {TODAY}) FROM broadcast
            WHERE id = ANY(%(grp_ids)s::bigint[]) AND status = 'in_progress' AND snapshot_at IS NULL
              AND total_count = 0
            ORDER BY id
            FOR UPDATE
            """,
            {"grp_ids": [int(r[0]) for r in ours]},
        )
    ).rows
    if not tasks:
        return {}
    copy = [int(r[0]) for r in tasks]
    days: dict[date, list[int]] = {}
    for broadcast_id, day in tasks:
        days.setdefault(day, []).append(int(broadcast_id))
    params = {**recipients.params, "grp_ids": copy}
    copied = (
        yield Query(
            f"""
            WITH copied AS (
                INSERT INTO delivery (workspace_id, broadcast_id, contact_id, address, status,
                                      last_error, part_day)
                SELECT t.workspace_id, a.broadcast_id, a.contact_id, a.address,
                       CASE WHEN a.reason IS NULL THEN 'queued' ELSE 'skipped' END, a.reason,
                       coalesce(t.part_day, {TODAY})
                FROM ({recipients.sql}) AS a(broadcast_id, contact_id, address, reason)
                JOIN broadcast t ON t.id = a.broadcast_id
                WHERE a.broadcast_id = ANY(%(grp_ids)s::bigint[])
                ORDER BY a.broadcast_id, a.contact_id
                ON CONFLICT (broadcast_id, contact_id, part_day) DO NOTHING
                RETURNING broadcast_id
            )
            SELECT broadcast_id, count(*) FROM copied GROUP BY broadcast_id
            """,
            params,
        )
    ).rows
    for day, of_day in sorted(days.items()):
        yield Query(
            """
            INSERT INTO delivery_batch (workspace_id, broadcast_id, part_day, first_id, last_id)
            SELECT workspace_id, broadcast_id, %(grp_day)s, min(id), max(id)
            FROM (
                SELECT workspace_id, broadcast_id, id,
                       (row_number() OVER (PARTITION BY broadcast_id ORDER BY id) - 1)
                       / %(size)s AS n
                FROM delivery
                WHERE broadcast_id = ANY(%(grp_ids)s::bigint[]) AND part_day = %(grp_day)s
                  AND status = 'queued'
            ) AS run
            GROUP BY workspace_id, broadcast_id, n
            """,
            {"grp_ids": of_day, "grp_day": day, "size": batch_size},
        )
    counts = dict.fromkeys(copy, 0)
    counts.update({int(r[0]): int(r[1]) for r in copied})
    # With snapshot_at set, the completion rule can see a task that had nobody left to send to.
    yield Query(
        f"""
        UPDATE broadcast b SET snapshot_at = now(), part_day = coalesce(part_day, {TODAY}),
            audience_size = c.n
        FROM unnest(%(grp_ids)s::bigint[], %(grp_n)s::bigint[]) AS c(id, n)
        WHERE b.id = c.id
        """,
        {"grp_ids": list(counts), "grp_n": list(counts.values())},
    )
    return counts


# --- batches: handed out, run under a lease, given back --------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    """One run of a batch: its range of deliveries and the token its rows are held under."""

    id: int
    broadcast_id: int
    first_id: int
    last_id: int
    token: uuid.UUID
    #: The broadcast's ``part_day``: the partition its deliveries are in.
    part_day: date


_RUNNING = """
    state = 'running', run_token = %(t)s, runs = runs + 1, updated_at = now(),
    lease_expires_at = now() + %(lease)s * interval '1 second'
"""


def claim_batch(batch_id: int, token: uuid.UUID, *, lease: float) -> Op[Batch | None]:
    """Take a batch a message pointed at, under a new run ``token``. Only a ``queued`` batch
    (one the relay handed out) is taken: None when it is running elsewhere, done, or back to
    ``ready`` waiting its time (a duplicate or stale message), or when its task is not being
    sent (then the batch goes back to ``ready`` for the relay to hand out once it is).

    Locks: the batch, then (only to give back rows an older run left held in its range) the
    task. Every other path locks the task first, so none may wait for a batch a claim holds
    while holding a task: ``end_run`` takes only its own running batch or one under ``SKIP
    LOCKED``; the sweep hands lost messages out again before it locks any task, and after
    that takes, readies or drops batches only under ``SKIP LOCKED``.
    """
    # Locking the batch row waits for the relay's transaction, which publishes before it
    # commits: a message can arrive before the batch reads ``queued``.
    found = (
        yield Query(
            "SELECT b.state, t.status FROM delivery_batch b "
            "JOIN broadcast t ON t.id = b.broadcast_id WHERE b.id = %(id)s FOR UPDATE OF b",
            {"id": batch_id},
        )
    ).first()
    if found is None or found[0] != BatchState.QUEUED:
        return None
    if found[1] != BroadcastStatus.IN_PROGRESS:
        yield Query(
            "UPDATE delivery_batch SET state = 'ready', updated_at = now() WHERE id = %(id)s",
            {"id": batch_id},
        )
        return None
    row = (
        yield Query(
            f"""
            UPDATE delivery_batch SET {_RUNNING}
            WHERE id = %(id)s
            RETURNING id, broadcast_id, first_id, last_id, part_day
            """,
            {"id": batch_id, "t": token, "lease": lease},
        )
    ).first()
    if row is None:
        return None
    taken = Batch(row[0], row[1], row[2], row[3], token, row[4])
    yield from _take_orphans(taken)
    return taken


def renew(batches: Sequence[Batch], *, lease: float) -> One[set[int]]:
    """Extend the leases of a process's runs in one statement; returns the ids of the batches
    still held (a batch missing from it was taken back).
    """
    return One(
        Query(
            """
            UPDATE delivery_batch b
            SET lease_expires_at = now() + %(lease)s * interval '1 second'
            FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS v(id, token)
            WHERE b.id = v.id AND b.run_token = v.token AND b.state = 'running'
            RETURNING b.id
            """,
            {
                "ids": [b.id for b in batches],
                "tokens": [b.token for b in batches],
                "lease": lease,
            },
        ),
        lambda result: {int(r[0]) for r in result.rows},
    )


#: When a channel may take batches again: once its provider's Retry-After has passed and its
#: slots are booked no more than ``MAX_WAIT`` ahead (``r`` is its ``channel_rate`` row).
_FREE_AT = """
    greatest(coalesce(r.blocked_until, '-infinity'),
             coalesce(r.tat, '-infinity') - %(wait)s * interval '1 second')
"""


def end_run(
    batch: Batch,
    *,
    done: bool,
    due_in: float = 0.0,
    keep: Sequence[int] = (),
    next_token: uuid.UUID | None = None,
    lease: float = 0.0,
) -> Op[tuple[int, Batch | None]]:
    """A run ends: rows it still holds come back unsent (their attempt given back), and its
    batch is ``done`` or ``ready`` again, due in ``due_in`` seconds. With ``next_token`` the
    run goes on with the task's next due batch, taken in the same transaction, so the task's
    number of batches in flight never grows between the two (and only while its channel may
    take work: one told to wait, or booked ahead, takes none). Rows in ``keep`` (results the
    run could not write) stay held, and so does the batch: the sweeper decides about them once
    the lease runs out. Returns how many rows came back, and the next batch if one was taken.
    """
    status = yield from _lock_task(batch.broadcast_id)
    back = yield from _come_back(batch, status, keep=keep, attempt_used=False)
    if keep:
        return back, None
    yield Query(
        """
        UPDATE delivery_batch
        SET state = %(state)s, due_at = now() + %(due)s * interval '1 second', run_token = NULL,
            lease_expires_at = NULL, updated_at = now()
        WHERE id = %(id)s AND run_token = %(t)s
        """,
        {
            "state": (BatchState.DONE if done else BatchState.READY).value,
            "due": max(0.0, due_in),
            "id": batch.id,
            "t": batch.token,
        },
    )
    if status != BroadcastStatus.IN_PROGRESS:
        return back, None
    if next_token is None:
        if done:
            # The batch left the task's window without handing it on (the run may not go
            # on): wake the relay if a batch of the task is due, or its window stays short
            # until the next poll. (A batch given back as ready wakes it by its trigger.)
            yield Query(
                """
                SELECT pg_notify('bcast_batch', '') FROM delivery_batch
                WHERE broadcast_id = %(b)s AND state = 'ready' AND due_at <= now() LIMIT 1
                """,
                {"b": batch.broadcast_id},
            )
        return back, None
    row = (
        yield Query(
            f"""
            UPDATE delivery_batch SET {_RUNNING}
            WHERE id = (
                SELECT id FROM delivery_batch
                WHERE broadcast_id = %(b)s AND state = 'ready' AND due_at <= now()
                  AND id <> %(id)s
                ORDER BY due_at, id LIMIT 1
                FOR UPDATE SKIP LOCKED
            )
            AND NOT EXISTS (
                SELECT 1 FROM broadcast t JOIN channel_rate r ON r.channel_id = t.channel_id
                WHERE t.id = %(b)s AND {_FREE_AT} > now()
            )
            RETURNING id, broadcast_id, first_id, last_id, part_day
            """,
            {
                "b": batch.broadcast_id,
                "id": batch.id,
                "t": next_token,
                "lease": lease,
                "wait": MAX_WAIT,
            },
        )
    ).first()
    if row is None:
        return back, None
    taken = Batch(row[0], row[1], row[2], row[3], next_token, row[4])
    yield from _take_orphans(taken)
    return back, taken


@dataclass(frozen=True, slots=True)
class Progress:
    """What is left of a batch's range."""

    queued: int
    #: Queued rows whose next attempt is due now.
    due: int
    sending: int
    #: Seconds until the earliest queued row is due (None when nothing is queued).
    next_due_in: float | None


def progress(broadcast_id: int, first_id: int, last_id: int, part_day: date) -> One[Progress]:
    """What is left of a batch's range."""

    def read(result: Result) -> Progress:
        row = result.first()
        assert row is not None
        return Progress(
            int(row[0]), int(row[1]), int(row[2]), None if row[3] is None else max(0.0, row[3])
        )

    return One(
        Query(
            """
            SELECT count(*) FILTER (WHERE status = 'queued'),
                   count(*) FILTER (WHERE status = 'queued'
                                      AND (next_attempt_at IS NULL OR next_attempt_at <= now())),
                   count(*) FILTER (WHERE status = 'sending'),
                   extract(epoch FROM min(coalesce(next_attempt_at, now()))
                                      FILTER (WHERE status = 'queued') - now())::float8
            FROM delivery
            WHERE broadcast_id = %(b)s AND id BETWEEN %(lo)s AND %(hi)s
              AND part_day = %(p)s
              AND status IN ('queued', 'sending')
            """,
            {"b": broadcast_id, "p": part_day, "lo": first_id, "hi": last_id},
        ),
        read,
    )


#: Recipients one provider call of the task ``t`` on channel ``c`` carries: a multicast's
#: size on a kind that has one (unless the text is personalised: each recipient its own call),
#: else one. The channel's rate counts calls; its recipients go this many times faster.
_RECIPIENTS_PER_CALL = (
    "(CASE c.kind "
    + " ".join(
        f"WHEN '{kind.value}' THEN CASE WHEN position('{{{{' in coalesce(t.content->>'text', '')) "
        f"= 0 THEN {size} ELSE 1 END"
        for kind, size in MULTICAST_RECIPIENTS.items()
    )
    + " ELSE 1 END)"
)


def relay(
    *, per_batch_rate: float, max_window: int, limit: int, max_queued: int | None = None
) -> Op[list[tuple[int, int]]]:
    """Pick the batches to hand to the dispatchers now and mark them ``queued``; returns
    (batch id, broadcast id) pairs. The caller publishes a message for each inside the same
    transaction and commits only after the broker confirmed them (an outbox), so a crash
    between the two leaves the batches queued, and the sweeper hands them out again.

    The window: a task being sent has at most ``ceil(rate / per_batch_rate)`` batches in
    flight (at least 2, at most ``max_window``; the rate in recipients, a multicast carrying
    many a call): enough to reach its channel's rate, and few
    enough that the send queue never holds more than a few messages per task, so a new task
    never waits behind the backlog of another. Batches of a channel throttled by its provider
    or booked more than ``MAX_WAIT`` ahead wait until it is free (``_free_at``), so a channel
    that must wait is not handed batch after batch that would only be given back.

    The send queue as a whole holds at most ``max_queued`` batches handed out and not yet
    taken by a dispatcher: ten thousand small tasks started at once wait here, in the order
    their batches fell due, not in the queue, where dispatchers with no room would hand them
    back and forth and a task started a moment later would wait behind all of them. One relay
    runs at a time (advisory lock).
    """
    locked = (yield Query("SELECT pg_try_advisory_xact_lock(%(k)s)", {"k": RELAY_LOCK})).scalar()
    if not locked:
        return []
    if max_queued is not None:
        limit = min(limit, max_queued - (yield from queued_batches()))
        if limit <= 0:
            return []
    result = yield Query(
        f"""
        WITH RECURSIVE due AS (
            -- The tasks with due, ready batches, in the order they fell due, read from the
            -- index one (due time, task) at a time, and only as far as the pick needs.
            (SELECT due_at, broadcast_id FROM delivery_batch
             WHERE state = 'ready' AND due_at <= now()
             ORDER BY due_at, broadcast_id LIMIT 1)
            UNION ALL
            SELECT n.due_at, n.broadcast_id
            FROM due AS d CROSS JOIN LATERAL (
                SELECT due_at, broadcast_id FROM delivery_batch
                WHERE state = 'ready' AND due_at <= now()
                  AND (due_at, broadcast_id) > (d.due_at, d.broadcast_id)
                ORDER BY due_at, broadcast_id LIMIT 1
            ) AS n
        ),
        picked AS (
            SELECT next.id
            FROM due
            JOIN broadcast t ON t.id = due.broadcast_id
            JOIN channel c ON c.id = t.channel_id
            LEFT JOIN channel_rate r ON r.channel_id = t.channel_id
            CROSS JOIN LATERAL (
                SELECT least(%(max)s, greatest(2, ceil(
                           c.rate_limit_per_second * {_RECIPIENTS_PER_CALL} / %(per)s)))::int
                       - (SELECT count(*) FROM delivery_batch
                          WHERE broadcast_id = t.id AND state IN ('queued', 'running')) AS room
            ) AS w
            CROSS JOIN LATERAL (
                SELECT id FROM delivery_batch
                WHERE broadcast_id = t.id AND state = 'ready' AND due_at <= now()
                ORDER BY due_at, id
                LIMIT greatest(w.room, 0)
            ) AS next
            WHERE t.status = 'in_progress' AND {_FREE_AT} <= now()
            LIMIT %(limit)s
        )
        UPDATE delivery_batch b
        SET state = 'queued', published_at = now(), updated_at = now()
        FROM (SELECT DISTINCT id FROM picked) AS p
        WHERE b.id = p.id AND b.state = 'ready'
        RETURNING b.id, b.broadcast_id
        """,
        {"max": max_window, "per": per_batch_rate, "limit": limit, "wait": MAX_WAIT},
    )
    return sorted((int(r[0]), int(r[1])) for r in result.rows)


def queued_batches() -> Op[int]:
    """How many batches are handed out and not yet taken by a dispatcher."""
    count = (yield Query("SELECT count(*) FROM delivery_batch WHERE state = 'queued'")).scalar()
    return int(count)


def next_relay_in() -> Op[float | None]:
    """Seconds until the next ready batch of a task being sent falls due, or its channel is
    free again (None: none waits). Batches already due but held back by a full window are not
    waited for here: the batch that leaves the window makes room and wakes the relay
    (``bcast_batch``). Never later than the first such moment, sometimes sooner (a channel free
    before its batches are due wakes the relay once more): two short index reads, however many
    tasks are being sent.
    """
    seconds = (
        yield Query(
            f"""
            SELECT extract(epoch FROM least(
                (SELECT b.due_at FROM delivery_batch b JOIN broadcast t ON t.id = b.broadcast_id
                 WHERE b.state = 'ready' AND b.due_at > now() AND t.status = 'in_progress'
                 ORDER BY b.due_at LIMIT 1),
                (SELECT min({_FREE_AT}) FROM channel_rate r
                 WHERE {_FREE_AT} > now() AND EXISTS (
                     SELECT 1 FROM delivery_batch b JOIN broadcast t ON t.id = b.broadcast_id
                     WHERE b.state = 'ready' AND t.channel_id = r.channel_id
                       AND t.status = 'in_progress'))
            ) - now())::float8
            """,
            {"wait": MAX_WAIT},
        )
    ).scalar()
    return None if seconds is None else max(0.0, float(seconds))


# --- the send loop's rows --------------------------------------------------------------------


@value
class Claimed:
    """A delivery row a run holds, with what it needs to send it."""

    id: int
    contact_id: int
    address: str
    #: Attempts so far, the one this claim starts included.
    attempts: int
    #: Calls of a several-call message an earlier attempt already made.
    parts_done: int
    provider_message_id: str | None
    #: For personalised text: the contact's ``name`` and ``fields``; for a provider with a
    #: conversation window, its ``last_inbound_at`` (ISO text or None). None when not asked
    #: for, or the contact was erased.
    contact: dict[str, Any] | None = None
    #: The key of the provider call that carries the row (LINE's retry key), kept from one
    #: attempt to the next: rows sharing one were one multicast (``keyed`` claims only).
    call_key: uuid.UUID | None = None


#: The row's contact may still be sent to: a subquery per row by the contact's key, which
#: the planner cannot turn into a join, so a claim always reads its batch's rows first,
#: whatever the statistics say of a freshly imported contact table.
_REACHABLE = """
    (SELECT c.opted_out_at IS NULL AND c.unreachable_at IS NULL
     FROM contact c WHERE c.id = d.contact_id)
"""


@dataclass(frozen=True, slots=True)
class Window:
    """A sending window: the hours of each recipient's local day it may be sent in, and the
    zone of recipients whose contact has none.
    """

    start: time
    end: time
    zone: str


#: The recipient's window is open now (``bcast_window_open``, migration 0016): its contact's
#: zone, else the window's.
_WINDOW_OPEN = """
    bcast_window_open(
        coalesce((SELECT c.time_zone FROM contact c WHERE c.id = d.contact_id), %(wz)s),
        %(ws)s::time, %(we)s::time, now())
"""


def _window_params(window: Window | None) -> dict[str, Any]:
    if window is None:
        return {}
    return {"ws": window.start, "we": window.end, "wz": window.zone}


def _contact_values(personal: bool, inbound: bool) -> str:
    """The claim's ``contact`` column: what of each row's contact the send needs, or NULL."""
    keys = [*(["'name', c.name", "'fields', c.fields"] if personal else [])]
    keys += ["'last_inbound_at', c.last_inbound_at"] if inbound else []
    if not keys:
        return "NULL::jsonb"
    return (
        f"(SELECT jsonb_build_object({', '.join(keys)}) FROM contact c WHERE c.id = d.contact_id)"
    )


def claim(
    batch: Batch,
    limit: int,
    window: Window | None = None,
    *,
    personal: bool = False,
    inbound: bool = False,
    keyed: bool = False,
) -> One[list[Claimed]]:
    """Take up to ``limit`` due, queued rows of the batch under its run token, if the task is
    still being sent and the run still holds its batch. Rows of contacts who opted out or
    became unreachable since the snapshot are left for ``skip_gone``; with a sending
    ``window``, rows whose recipient's window is closed now are left for ``defer_to_window``.
    Rows another run holds are passed over, never waited for. ``personal``: each row comes
    with its contact's name and fields, for personalised text; ``inbound``: with when its
    contact last wrote in. ``keyed``: a row without a ``call_key`` is given a fresh one, in
    the same statement, so the key of its first call is stored before the call is made; a
    row whose last attempt was used keeps its key (a repeat of that call).
    """
    in_window = f"AND {_WINDOW_OPEN}" if window is not None else ""
    # A key is kept only while a call may have been made with it (an attempt was used):
    # a row given back untouched gets a fresh one, so no two calls ever share a key by chance.
    key = (
        ", call_key = CASE WHEN d.attempts = 0 OR d.call_key IS NULL THEN gen_random_uuid() "
        "ELSE d.call_key END"
        if keyed
        else ""
    )
    due = f"""
        (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()) AND {_REACHABLE} {in_window}
    """
    return _take(
        batch,
        due,
        {"n": limit, **_window_params(window)},
        limit=True,
        contact=_contact_values(personal, inbound),
        key=key,
    )


def _take(
    batch: Batch,
    which: str,
    params: dict[str, Any],
    *,
    limit: bool = False,
    contact: str = "NULL::jsonb",
    key: str = "",
) -> One[list[Claimed]]:
    """Take the batch's queued rows ``which`` names (in id order, at most ``%(n)s`` with
    ``limit``) under its run token, if the task is still being sent and the run still holds
    its batch; rows another run holds are passed over, never waited for.
    """
    return One(
        Query(
            f"""
            WITH held AS (
                -- Held until the statement commits: the sweeper skips a batch being claimed
                -- from, and a claim waits for a take-back under way (then finds no batch).
                SELECT 1 FROM delivery_batch
                WHERE id = %(batch)s AND run_token = %(t)s AND state = 'running'
                FOR KEY SHARE
            ),
            picked AS (
                SELECT d.id FROM delivery d
                WHERE EXISTS (SELECT 1 FROM held)
                  AND d.broadcast_id = %(b)s AND d.id BETWEEN %(lo)s AND %(hi)s
                  AND d.part_day = %(p)s
                  AND d.status = 'queued'
                  AND {which}
                ORDER BY d.id
                {"LIMIT %(n)s" if limit else ""}
                FOR UPDATE OF d SKIP LOCKED
            )
            UPDATE delivery d
            SET status = 'sending', attempts = d.attempts + 1, lease_token = %(t)s,
                updated_at = now(){key}
            FROM picked
            WHERE d.id = picked.id
              AND d.part_day = %(p)s
              AND EXISTS (SELECT 1 FROM broadcast WHERE id = %(b)s AND status = 'in_progress')
            RETURNING d.id, d.contact_id, d.address, d.attempts, d.parts_done,
                      d.provider_message_id, {contact}, d.call_key
            """,
            {
                "b": batch.broadcast_id,
                "p": batch.part_day,
                "batch": batch.id,
                "lo": batch.first_id,
                "hi": batch.last_id,
                "t": batch.token,
                **params,
            },
        ),
        lambda result: sorted((Claimed(*r) for r in result.rows), key=lambda c: c.id),
    )


def claim_call_rest(batch: Batch, keys: Sequence[uuid.UUID]) -> One[list[Claimed]]:
    """Take the other queued rows of the calls ``keys`` name (rows of one multicast share its
    key): a claim's limit may have cut a call's rows apart, and a repeated call must carry the
    same recipients as the first. Due or not, in its window or not: they go with the rest of
    their call, which the provider may already have accepted. Rows of contacts gone since
    are left for ``skip_gone``.
    """
    return _take(
        batch, f"d.call_key = ANY(%(keys)s::uuid[]) AND {_REACHABLE}", {"keys": list(keys)}
    )


def share_call_key(batch: Batch, key: uuid.UUID, ids: Sequence[int]) -> One[int]:
    """Rows ``ids``, held by the run, become one call under ``key``: written before the call is
    made, so a repeat after a crash carries the same recipients under the same key. Returns
    how many rows the run still held.
    """
    return One(
        Query(
            """
            UPDATE delivery SET call_key = %(k)s
            WHERE id = ANY(%(ids)s::bigint[]) AND part_day = %(p)s AND broadcast_id = %(b)s
              AND lease_token = %(t)s AND status = 'sending'
            """,
            {
                "k": key,
                "ids": list(ids),
                "p": batch.part_day,
                "b": batch.broadcast_id,
                "t": batch.token,
            },
        ),
        lambda result: result.rowcount,
    )


#: Queued rows of a batch whose contact opted out, was found unreachable or was erased (its
#: row deleted) since the snapshot.
_GONE = f"""
    d.broadcast_id = %(b)s AND d.id BETWEEN %(lo)s AND %(hi)s AND d.status = 'queued'
    AND d.part_day = %(p)s AND NOT coalesce({_REACHABLE}, false)
"""


def skip_gone(batch: Batch) -> Op[int]:
    """Queued rows of the batch whose contact opted out, was found unreachable or was erased
    since the snapshot become ``skipped``, with the reason. Returns how many.
    """
    bounds = {
        "b": batch.broadcast_id,
        "p": batch.part_day,
        "lo": batch.first_id,
        "hi": batch.last_id,
    }
    # The common case is one cheap read (of the batch's rows) and no lock.
    gone = yield Query(f"SELECT 1 FROM delivery d WHERE {_GONE} LIMIT 1", bounds)
    if not gone.rows:
        return 0
    yield from _lock_task(batch.broadcast_id)
    result = yield Query(
        f"""
        UPDATE delivery d
        SET status = 'skipped', updated_at = now(),
            last_error = coalesce(
                (SELECT CASE WHEN c.opted_out_at IS NOT NULL THEN %(opted_out)s
                             ELSE %(unreachable)s || coalesce(c.unreachable_reason, '') END
                 FROM contact c WHERE c.id = d.contact_id),
                %(erased)s)
        WHERE {_GONE}
        """,
        {
            **bounds,
            "erased": ERASED_REASON,
            "opted_out": OPTED_OUT_REASON,
            "unreachable": UNREACHABLE_REASON,
        },
    )
    return result.rowcount


def defer_to_window(batch: Batch, window: Window) -> Op[int]:
    """Queued, due rows of the batch whose recipient's window is closed now wait until it
    next opens (``next_attempt_at``; no attempt is used). Returns how many.
    """
    params = {
        "b": batch.broadcast_id,
        "p": batch.part_day,
        "lo": batch.first_id,
        "hi": batch.last_id,
        **_window_params(window),
    }
    closed = f"""
        d.broadcast_id = %(b)s AND d.id BETWEEN %(lo)s AND %(hi)s AND d.part_day = %(p)s
        AND d.status = 'queued' AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now())
        AND NOT {_WINDOW_OPEN}
    """
    # The common case (the window is open) is one cheap read and no lock.
    found = yield Query(f"SELECT 1 FROM delivery d WHERE {closed} LIMIT 1", params)
    if not found.rows:
        return 0
    yield from _lock_task(batch.broadcast_id)
    result = yield Query(
        f"""
        UPDATE delivery d
        SET next_attempt_at = bcast_window_next(
                coalesce((SELECT c.time_zone FROM contact c WHERE c.id = d.contact_id), %(wz)s),
                %(ws)s::time, %(we)s::time, now()),
            updated_at = now()
        WHERE {closed}
        """,
        params,
    )
    return result.rowcount


def hold_for_erasure(contact_id: int) -> Op[int | None]:
    """Make ready to erase a contact: in the broadcasts with rows of it not yet final, lock
    the tasks (in id order, then its rows: the store's order), and skip its queued rows
    (``ERASED_REASON``), so nothing is sent to it once the erasure commits. Returns the id
    of a broadcast with a send to it under way (a row ``sending``: the erasure must wait for
    it), or None.
    """
    params = {"c": contact_id, "why": ERASED_REASON}
    found = (
        yield Query(
            "SELECT DISTINCT broadcast_id FROM delivery "
            "WHERE contact_id = %(c)s AND status IN ('queued', 'sending')",
            params,
        )
    ).rows
    tasks = sorted(int(r[0]) for r in found)
    for task in tasks:
        yield from _lock_task(task)
    held = (
        yield Query(
            "SELECT broadcast_id, status FROM delivery WHERE contact_id = %(c)s "
            "AND broadcast_id = ANY(%(b)s::bigint[]) AND status IN ('queued', 'sending') "
            "FOR UPDATE",
            {**params, "b": tasks},
        )
    ).rows
    sending = sorted(int(r[0]) for r in held if r[1] == SENDING)
    if sending:
        return sending[0]
    yield Query(
        "UPDATE delivery SET status = 'skipped', last_error = %(why)s, updated_at = now() "
        "WHERE contact_id = %(c)s AND broadcast_id = ANY(%(b)s::bigint[]) AND status = 'queued'",
        {**params, "b": tasks},
    )
    return None


#: What an erased contact's address reads as in delivery history.
_ERASED = f"'{ERASED_ADDRESS}'"


def erase(contact_ids: Sequence[int], *, limit: int | None = None) -> One[int]:
    """Erase deleted contacts from delivery history: each of their rows keeps its outcome
    (and so every broadcast's counts) but its address becomes ``(erased)``, in its reason too.
    Rows of deleted broadcasts (being purged) are left alone; rows another transaction holds
    are passed over, never waited for (so this takes no task lock: it changes no status),
    and found again by the next call. Returns how many rows changed.
    """
    cap = "LIMIT %(n)s" if limit is not None else ""
    return One(
        Query(
            f"""
            WITH picked AS (
                SELECT d.id, d.part_day FROM delivery d
                WHERE d.contact_id = ANY(%(ids)s::bigint[]) AND d.address <> {_ERASED}
                  AND NOT EXISTS (
                      SELECT 1 FROM delivery_purge p WHERE p.broadcast_id = d.broadcast_id)
                {cap}
                FOR UPDATE OF d SKIP LOCKED
            )
            UPDATE delivery d
            SET address = {_ERASED}, last_error = replace(d.last_error, d.address, {_ERASED})
            FROM picked
            WHERE d.id = picked.id AND d.part_day = picked.part_day
            """,
            {"ids": list(contact_ids), "n": limit},
        ),
        lambda result: result.rowcount,
    )


@dataclass(frozen=True, slots=True)
class Settled:
    """What one step of ``settle_erasures`` did."""

    #: Rows whose address it erased.
    rows: int
    #: Erasures it found done and dropped.
    done: int


def settle_erasures(*, notes: int = 100, rows: int = 10_000) -> Op[Settled]:
    """One step of finishing erasures (``contact_erasure``): erase up to ``rows`` rows of up
    to ``notes`` erased contacts, then drop the notes of those with no row left to erase and
    no audience copy running that began before the contact was deleted (it may have read the
    contact and may still write a row with its address).
    """
    ids = [
        int(r[0])
        for r in (
            yield Query(
                "SELECT contact_id FROM contact_erasure ORDER BY created_at, contact_id "
                "LIMIT %(k)s FOR UPDATE SKIP LOCKED",
                {"k": notes},
            )
        ).rows
    ]
    if not ids:
        return Settled(0, 0)
    op = erase(ids, limit=rows)
    erased = op.read((yield op.query))
    done = (
        yield Query(
            f"""
            DELETE FROM contact_erasure e
            WHERE e.contact_id = ANY(%(ids)s::bigint[])
              AND NOT EXISTS (
                  SELECT 1 FROM delivery d
                  WHERE d.contact_id = e.contact_id AND d.address <> {_ERASED}
                    AND NOT EXISTS (
                        SELECT 1 FROM delivery_purge p WHERE p.broadcast_id = d.broadcast_id))
              AND NOT EXISTS (
                  SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                  WHERE l.locktype = 'advisory' AND l.classid::text::bigint = %(ns)s
                    AND l.objsubid = 2 AND a.xact_start <= e.created_at)
            """,
            {"ids": ids, "ns": SNAPSHOT_LOCK},
        )
    ).rowcount
    return Settled(erased, done)


def purge_step(limit: int = 10_000) -> Op[int | None]:
    """Delete up to ``limit`` rows of one deleted broadcast (``delivery_purge``); once none is
    left, its note goes. Returns how many rows went, or None when nothing is left to purge.
    """
    row = (
        yield Query(
            "SELECT broadcast_id, part_day FROM delivery_purge "
            "ORDER BY created_at, broadcast_id LIMIT 1 FOR UPDATE SKIP LOCKED"
        )
    ).first()
    if row is None:
        return None
    params = {"b": row[0], "p": row[1], "n": limit}
    deleted = (
        yield Query(
            """
            DELETE FROM delivery
            WHERE part_day = %(p)s AND broadcast_id = %(b)s AND id IN (
                SELECT id FROM delivery WHERE part_day = %(p)s AND broadcast_id = %(b)s
                ORDER BY id LIMIT %(n)s
            )
            """,
            params,
        )
    ).rowcount
    if deleted < limit:
        yield Query("DELETE FROM delivery_purge WHERE broadcast_id = %(b)s", params)
    return deleted


@value
class Record:
    """The next state of one held row, as the retry policy decided it."""

    id: int
    #: ``sent``, ``failed``, ``partial``, or ``queued`` for another attempt later.
    status: DeliveryStatus
    provider_message_id: str | None = None
    error: str | None = None
    #: For ``queued``: seconds until the next attempt.
    delay: float | None = None
    #: False gives back the attempt the claim counted (the provider throttled the channel).
    attempt_used: bool = True
    #: Calls of a several-call message the provider has accepted so far.
    parts_done: int | None = None
    #: The contact to mark unreachable (the provider said it cannot be reached at all).
    unreachable_contact: int | None = None


def record(batch: Batch, records: Sequence[Record]) -> One[list[int]]:
    """Write the outcomes of one run's sends (see ``record_runs``)."""
    return record_runs(batch.broadcast_id, batch.part_day, [(batch.token, r) for r in records])


def record_runs(
    broadcast_id: int, part_day: date, records: Sequence[tuple[uuid.UUID, Record]]
) -> One[list[int]]:
    """Write the outcomes of sends of one task's runs, each record with the token of the run
    that made it; returns the ids written. Rows whose lease their run lost (taken back,
    perhaps sent by another run since) are not written: the caller reports them. A retry of a
    canceled task's row makes it canceled instead. One statement, whatever the number of runs
    (the task row is written once): the task row is locked first (the ``task`` InitPlan runs
    before any delivery row is touched), then the rows, then the contacts found unreachable.
    """
    retried = reason_given_back("(SELECT status FROM task)", "coalesce(v.err, d.last_error)")
    return One(
        Query(
            f"""
            WITH task AS (SELECT status FROM broadcast WHERE id = %(b)s FOR UPDATE),
            v AS (
                SELECT * FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(pmids)s::text[],
                                     %(errs)s::text[], %(waits)s::float8[], %(give_back)s::int[],
                                     %(parts)s::int[], %(gone)s::bigint[], %(tokens)s::uuid[])
                    AS v(id, status, pmid, err, wait, give_back, parts, gone, token)
            ),
            written AS (
                UPDATE delivery d
                SET status = CASE WHEN v.status = 'queued'
                                  THEN {given_back("(SELECT status FROM task)")}
                                  ELSE v.status END,
                    provider_message_id = coalesce(v.pmid, d.provider_message_id),
                    parts_done = coalesce(v.parts, d.parts_done),
                    -- A row not reached always says why (a CHECK of delivery).
                    last_error = CASE WHEN v.status = 'sent' THEN NULL
                                      WHEN v.status = 'queued' THEN {retried}
                                      ELSE coalesce(v.err, d.last_error, {_text(NO_REASON)})
                                 END,
                    sent_at = CASE WHEN v.status IN ('sent', 'partial') THEN now()
                                   ELSE d.sent_at END,
                    next_attempt_at = CASE WHEN v.wait IS NULL THEN NULL
                                           ELSE now() + v.wait * interval '1 second' END,
                    attempts = d.attempts - v.give_back,
                    lease_token = NULL,
                    updated_at = now()
                FROM v
                WHERE (SELECT status FROM task) IS NOT NULL
                  AND d.id = v.id AND d.broadcast_id = %(b)s AND d.status = 'sending'
                  AND d.lease_token = v.token
                  AND d.part_day = %(p)s
                RETURNING d.id, v.gone, v.err
            ),
            marked AS (
                -- Later broadcasts skip this contact, reporting the provider's reason.
                UPDATE contact c
                SET unreachable_at = now(), unreachable_reason = w.err, updated_at = now()
                FROM written w
                WHERE c.id = w.gone AND c.unreachable_at IS NULL
            )
            SELECT id FROM written
            """,
            {
                "ids": array_literal(r.id for _, r in records),
                "statuses": repeated_literal(r.status.value for _, r in records),
                "pmids": array_literal(r.provider_message_id for _, r in records),
                "errs": array_literal(r.error for _, r in records),
                "waits": array_literal(
                    r.delay if r.status == DeliveryStatus.QUEUED else None for _, r in records
                ),
                "give_back": array_literal(0 if r.attempt_used else 1 for _, r in records),
                "parts": array_literal(r.parts_done for _, r in records),
                "gone": array_literal(r.unreachable_contact for _, r in records),
                "tokens": repeated_literal(token for token, _ in records),
                "b": broadcast_id,
                "p": part_day,
            },
        ),
        lambda result: [int(r[0]) for r in result.rows],
    )


def release(batch: Batch, ids: Sequence[int], *, delay: float | None = None) -> Op[int]:
    """Rows the run claimed but never sent come back (attempt given back), after ``delay``
    seconds if given (the channel is told to wait).
    """
    status = yield from _lock_task(batch.broadcast_id)
    return (yield from _come_back(batch, status, only=ids, attempt_used=False, delay=delay))


# --- the sweeper -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TakenBack:
    """What one sweep recovered."""

    #: Batches whose run's lease ran out (a dead or stuck dispatcher), now ready again.
    batches: int = 0
    #: Rows those runs held, back in the queue (or canceled with their task).
    rows: int = 0
    #: Batches whose message was published long ago and never taken: handed out again.
    republished: int = 0


def take_back(*, republish_after: float) -> Op[TakenBack]:
    """Recover from dispatchers that died or stalled, exactly: the batches whose run's lease
    ran out become ready again and the rows their runs held go back; nothing else is handed
    out again. Batches whose message was published ``republish_after`` seconds ago and never
    taken (a lost message) are handed out again; a duplicate message is harmless, since a
    batch is claimed once.

    A claim locks its batch row (``FOR KEY SHARE``) and a batch is taken back under
    ``FOR UPDATE SKIP LOCKED``, so no run claims rows of a batch being taken back; rows a run
    held under an older token are given back anyway when the batch is next taken
    (``_take_orphans``).

    Lost messages are handed out again first, before any task is locked: a claim holds its
    ``queued`` batch and then, to give back rows left held in its range, locks the task; a
    sweep that waited for that batch while holding the task would close a cycle.
    """
    republished = (
        yield Query(
            "UPDATE delivery_batch SET state = 'ready', updated_at = now() "
            "WHERE state = 'queued' AND published_at < now() - %(s)s * interval '1 second'",
            {"s": republish_after},
        )
    ).rowcount
    dead = (
        yield Query(
            "SELECT broadcast_id, id FROM delivery_batch "
            "WHERE state = 'running' AND lease_expires_at < now() ORDER BY broadcast_id, id"
        )
    ).rows
    batches = rows = 0
    for broadcast_id, group in groupby(dead, key=lambda r: int(r[0])):
        status = yield from _lock_task(broadcast_id)
        # Only batches still dead once the task is locked (a late renewal may have saved one);
        # one a renewal or a claim holds this moment is left for the next sweep, never waited
        # for.
        still = (
            yield Query(
                "SELECT id, broadcast_id, first_id, last_id, run_token, part_day "
                "FROM delivery_batch WHERE id = ANY(%(ids)s) "
                "AND state = 'running' AND lease_expires_at < now() FOR UPDATE SKIP LOCKED",
                {"ids": [int(r[1]) for r in group]},
            )
        ).rows
        if not still:
            continue
        for r in still:
            rows += yield from _come_back(Batch(*r), status, attempt_used=True)
        yield Query(
            "UPDATE delivery_batch SET state = 'ready', due_at = now(), run_token = NULL, "
            "lease_expires_at = NULL, updated_at = now() WHERE id = ANY(%(ids)s)",
            {"ids": [r[0] for r in still]},
        )
        batches += len(still)
    return TakenBack(batches=batches, rows=rows, republished=republished)


@dataclass(frozen=True, slots=True)
class Stranded:
    """One task whose rows nothing would hand out again, settled."""

    broadcast_id: int
    #: Its task's status.
    status: str
    #: Rows left ``sending`` by a lost run: back in the queue, or canceled with their task.
    rows: int
    #: Its ``done`` batches holding rows to send, ready again.
    batches: int


#: The tasks whose every row should be final by now: one being sent with every batch done (the
#: last result write completes it, before its run marks its batch done), or a canceled one
#: with no batch running (each run gives its rows back as canceled when it ends) whose counts
#: do not add up. Canceled tasks are looked for among those whose batches are not dropped yet
#: (``drop_finished_batches`` keeps them until every row of the task is final).
_UNFINISHED = """
    t.sent_count + t.failed_count + t.canceled_count + t.skipped_count + t.partial_count
    < t.total_count
"""
_STRANDED = f"""
    SELECT t.id FROM broadcast t
    WHERE t.status = 'in_progress' AND t.snapshot_at IS NOT NULL AND {_UNFINISHED}
      AND NOT EXISTS (SELECT 1 FROM delivery_batch b WHERE b.broadcast_id = t.id
                      AND b.state IN ('ready', 'queued', 'running'))
      {{also}}
    UNION
    SELECT t.id FROM (SELECT DISTINCT broadcast_id FROM delivery_batch) AS b
    JOIN broadcast t ON t.id = b.broadcast_id
    WHERE t.status = 'canceled' AND {_UNFINISHED}
      AND NOT EXISTS (SELECT 1 FROM delivery_batch b WHERE b.broadcast_id = t.id
                      AND b.state = 'running')
      {{also}}
"""


def settle_stranded(*, limit: int = 100) -> Op[list[Stranded]]:
    """Rows that no run holds and no batch would hand out again come back. A run that lost
    its batch after a claim nothing saw leaves rows ``sending`` (a dispatcher of an earlier
    version, or rows from before ``_take_orphans``): they come back when their batch is taken
    again, but a batch already ``done`` is never taken again, so the task would never complete
    (or a canceled one would list them as being sent, for good). Such rows go back to
    ``queued`` (attempt kept) and their batches are ready again, or they are canceled with
    their task. In the normal course this finds nothing: it reads the tasks being sent and
    the batches of canceled ones, and the rows of a task only when it is stranded.
    """
    found = (
        yield Query(_STRANDED.format(also="") + " ORDER BY 1 LIMIT %(limit)s", {"limit": limit})
    ).rows
    settled = []
    for (broadcast_id,) in found:
        status = yield from _lock_task(broadcast_id)
        # Still stranded once the task is locked (a run ending or a cancel may have moved it).
        still = (
            yield Query(
                f"SELECT part_day FROM broadcast WHERE id = %(b)s AND id IN "
                f"({_STRANDED.format(also='AND t.id = %(b)s')})",
                {"b": broadcast_id},
            )
        ).first()
        if still is None or status is None:
            continue
        part_day = still[0]
        rows = (
            yield Query(
                f"""
                UPDATE delivery
                SET status = {given_back("%(task)s::text")},
                    last_error = {reason_given_back("%(task)s::text", "last_error", unsure=True)},
                    lease_token = NULL, updated_at = now()
                WHERE broadcast_id = %(b)s AND part_day = %(p)s AND status = 'sending'
                """,
                {"b": broadcast_id, "p": part_day, "task": status},
            )
        ).rowcount
        batches = 0
        if status == BroadcastStatus.CANCELED:
            rows += yield from _cancel_queued(broadcast_id, part_day)
            # Nothing of it is left to send (and none of its batches runs): its batches go now,
            # so that it is not looked at again whatever its counts say.
            yield Query(
                "DELETE FROM delivery_batch WHERE id IN (SELECT id FROM delivery_batch "
                "WHERE broadcast_id = %(b)s AND state <> 'running' FOR UPDATE SKIP LOCKED)",
                {"b": broadcast_id},
            )
        else:
            # (A batch a claim holds this moment is left for the next sweep, never waited for:
            # the task is locked, and a claim may be about to lock it.)
            batches = (
                yield Query(
                    """
                    UPDATE delivery_batch b
                    SET state = 'ready', due_at = now(), updated_at = now()
                    WHERE b.id IN (
                        SELECT id FROM delivery_batch
                        WHERE broadcast_id = %(b)s AND state = 'done'
                        FOR UPDATE SKIP LOCKED
                    ) AND EXISTS (
                        SELECT 1 FROM delivery d
                        WHERE d.broadcast_id = %(b)s AND d.part_day = %(p)s
                          AND d.id BETWEEN b.first_id AND b.last_id AND d.status = 'queued'
                    )
                    """,
                    {"b": broadcast_id, "p": part_day},
                )
            ).rowcount
        if rows or batches:
            settled.append(Stranded(broadcast_id, status, rows, batches))
    return settled


def drop_finished_batches() -> Op[int]:
    """Batches of tasks that are completed or canceled have nothing left to do: drop them.
    A batch still running is left to its run, which gives it back in a moment, or to
    ``take_back`` once its lease has run out: dropped while running, the rows its run holds
    would stay ``sending`` with nothing to bring them back. A canceled task keeps its batches
    until all its rows are final: they are how ``settle_stranded`` finds it.
    """
    # A batch a claim holds this moment is left for the next sweep: the sweep holds the locks
    # of tasks it took batches back from, and a claim may be about to lock its task.
    result = yield Query(
        f"""
        DELETE FROM delivery_batch WHERE id IN (
            SELECT b.id FROM delivery_batch b JOIN broadcast t ON t.id = b.broadcast_id
            WHERE b.state <> 'running'
              AND (t.status = 'completed' OR t.status = 'canceled' AND NOT ({_UNFINISHED}))
            FOR UPDATE OF b SKIP LOCKED
        )
        """
    )
    return result.rowcount


def batch_counts() -> Op[dict[str, int]]:
    """Batches of tasks being sent, by state (for the scheduler's gauge and autoscaling)."""
    result = yield Query(
        "SELECT b.state, count(*) FROM delivery_batch b JOIN broadcast t ON t.id = b.broadcast_id "
        "WHERE t.status = 'in_progress' GROUP BY b.state"
    )
    counts = {s.value: 0 for s in BatchState}
    counts.update({str(r[0]): int(r[1]) for r in result.rows})
    return counts

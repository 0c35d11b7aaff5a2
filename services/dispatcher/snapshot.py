"""Starting a broadcast: copy its audience into delivery rows and batches, once.

The audience is the same query the API previews (``shared.domain.audience``), narrowed to the
contacts that existed when the broadcast started (a contact added later does not receive it).
The copy itself is the delivery store's: ``INSERT ... SELECT`` inside Postgres, so no
recipient passes through this process and memory stays flat for any audience size. Before it,
the broadcast's day is fixed and the partition of ``delivery`` for that day made sure of, each
in a short transaction of its own (the scheduler makes partitions ahead, so this is most often
one read of the catalog).

A large audience is copied in parts, in contact order, each part a transaction that also cuts
its rows into batches: the first part is small, so the first batches are handed out and sent
while the rest is still being copied (a million recipients take seconds to copy). A part
reads a window of the workspace's next contacts by id (at most that many recipients,
however the audience is spread). A part cut short leaves nothing; a copy started again (the
scheduler restarts a stalled one, or a stopped one) goes on from the last part committed.

Small audiences (a conversation's timed send has one recipient) are copied many at a time:
one read of their rows, one statement that fixes their days, one query for all their
recipients and one transaction (``start_group``), so a thousand timed sends due in the same
second cost a few statements, not a few thousand.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Select,
    and_,
    bindparam,
    column,
    func,
    literal,
    select,
    union_all,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY

from services.dispatcher import metrics
from shared import delivery_partitions as partitions
from shared import delivery_store as store
from shared.db.models import Contact
from shared.domain.audience import AudienceSpec, audience_query, skip_reason
from shared.domain.lifecycle import BroadcastStatus

if TYPE_CHECKING:
    from services.dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: Contacts of the workspace the first part of a copy reads, so at most as many recipients:
#: enough batches for every worker to start on. An audience counted at most this many when
#: written is copied in one part.
FIRST_PART = 10_000
#: Contacts each later part reads.
PART = 50_000

_DIALECT = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]


def audience_source(
    workspace_id: int, channel_id: int, spec: AudienceSpec, started_at: datetime
) -> store.Query:
    """``(contact_id, address, skip_reason)`` of every recipient (``skip_reason`` NULL for
    one to send to).
    """
    query = (
        audience_query(workspace_id, channel_id, spec, reachable=None, opted_out=None)
        .where(Contact.created_at <= started_at)
        .with_only_columns(*_recipient_columns())
    )
    compiled = query.compile(dialect=_DIALECT)
    return store.Query(str(compiled), dict(compiled.params))


async def start(rt: Runtime, broadcast_id: int) -> int | None:
    """Copy the audience of a broadcast being sent (first time only); the scheduler then
    hands its batches out. Returns how many recipients were copied, None if nothing was done.
    """
    async with rt.pool.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT workspace_id, channel_id, audience, started_at, status, snapshot_at, "
                "audience_size FROM broadcast WHERE id = %s",
                (broadcast_id,),
            )
        ).fetchone()
        if row is None:
            return None
        workspace_id, channel_id, audience, started_at, status, snapshot_at, expected = row
        if status != BroadcastStatus.IN_PROGRESS or snapshot_at is not None:
            return None
        source = audience_source(
            workspace_id, channel_id, AudienceSpec.model_validate(audience), started_at
        )
        day = await store.arun(conn, store.snapshot_day(broadcast_id))
        if day is None:
            return None
        await store.arun(conn, partitions.ensure(day, rt.settings.delivery_partition_days))
    copied, done = await _copy_in_parts(rt, broadcast_id, source, expected)
    if copied is None:
        return None
    metrics.SNAPSHOT_ROWS.inc(copied)
    if done:
        log.info(
            "broadcast %s: %s recipients copied",
            broadcast_id,
            copied,
            extra={
                "event": "snapshotted",
                "broadcast_id": broadcast_id,
                "channel_id": channel_id,
                "recipients": copied,
            },
        )
    else:
        log.info(
            "broadcast %s: the copy stops with this process after %s recipients; the "
            "scheduler starts it again, from there",
            broadcast_id,
            copied,
            extra={
                "event": "copy_stopped",
                "broadcast_id": broadcast_id,
                "channel_id": channel_id,
                "recipients": copied,
            },
        )
    return copied


async def _copy_in_parts(
    rt: Runtime, broadcast_id: int, source: store.Query, expected: int
) -> tuple[int | None, bool]:
    """Copy the audience part by part until the last (an audience counted at most
    ``FIRST_PART`` in one). Returns the rows this process copied (None when it copied none:
    copied before, or another dispatcher is copying it) and whether the copy ended here; a
    stopping process stops between parts.
    """
    copied: int | None = None
    contacts = FIRST_PART if expected > FIRST_PART else None
    after: int | None = None
    while copied is None or not rt.engine.stopping.is_set():
        async with rt.pool.connection() as conn:
            part = await store.arun(
                conn,
                store.snapshot_part(
                    broadcast_id,
                    source,
                    batch_size=rt.settings.batch_size,
                    contacts=contacts,
                    after=after,
                    copied_before=copied or 0,
                ),
            )
        if part is None:
            return copied, False
        copied = (copied or 0) + part.rows
        if part.done:
            return copied, True
        log.debug(
            "broadcast %s: %s recipients copied so far",
            broadcast_id,
            copied,
            extra={"broadcast_id": broadcast_id},
        )
        after, contacts = part.upto, PART
    return copied, False


@dataclass(frozen=True, slots=True)
class Starting:
    """A started broadcast whose audience is to be copied."""

    broadcast_id: int
    workspace_id: int
    channel_id: int
    spec: AudienceSpec
    started_at: datetime


def _recipient_columns() -> tuple[Any, ...]:
    return (Contact.id, Contact.address, skip_reason().label("skip_reason"))


def _picked(tasks: Sequence[Starting]) -> Select[Any]:
    """The recipients of hand-picked audiences that share a workspace, channel and filter
    (accounts, tags, and the broadcast whose failed recipients they are drawn from, if any):
    one audience query over every pick of them all, each task keeping only its own picks
    among the contacts that existed when it started.
    """
    first = tasks[0]
    pairs = list(
        dict.fromkeys((t.broadcast_id, c, t.started_at) for t in tasks for c in t.spec.contact_ids)
    )
    spec = first.spec.model_copy(
        update={"contact_ids": sorted({contact for _, contact, _ in pairs})}
    )
    audience = (
        audience_query(first.workspace_id, first.channel_id, spec, reachable=None, opted_out=None)
        .with_only_columns(*_recipient_columns(), Contact.created_at)
        .subquery()
    )
    pick = (
        func.unnest(
            bindparam(None, [b for b, _, _ in pairs], type_=ARRAY(BigInteger)),
            bindparam(None, [c for _, c, _ in pairs], type_=ARRAY(BigInteger)),
            bindparam(None, [at for _, _, at in pairs], type_=ARRAY(DateTime(timezone=True))),
        )
        .table_valued(
            column("broadcast_id", BigInteger),
            column("contact_id", BigInteger),
            column("started_at", DateTime(timezone=True)),
        )
        .render_derived(name="pick")
    )
    return select(
        pick.c.broadcast_id,
        audience.c.id,
        audience.c.address,
        audience.c.skip_reason,
    ).join_from(
        audience,
        pick,
        and_(pick.c.contact_id == audience.c.id, audience.c.created_at <= pick.c.started_at),
    )


def recipients_source(tasks: Sequence[Starting]) -> store.Query:
    """``(broadcast_id, contact_id, address, skip_reason)`` of every recipient of every task, in one query: each task's audience as ``audience_source`` has it.
    Hand-picked audiences of the same workspace, channel and filter (``failed_in`` included)
    share one audience query.
    """
    parts: list[Select[Any]] = []
    picks: defaultdict[tuple[Any, ...], list[Starting]] = defaultdict(list)
    for task in tasks:
        spec = task.spec
        if spec.selection == "manual":
            key = (
                task.workspace_id,
                task.channel_id,
                tuple(spec.account_ids),
                tuple(spec.tag_ids),
                spec.tag_match,
                spec.failed_in,
            )
            picks[key].append(task)
            continue
        parts.append(
            audience_query(task.workspace_id, task.channel_id, spec, reachable=None, opted_out=None)
            .where(Contact.created_at <= task.started_at)
            .with_only_columns(literal(task.broadcast_id, BigInteger), *_recipient_columns())
        )
    parts.extend(_picked(group) for group in picks.values())
    query = parts[0] if len(parts) == 1 else union_all(*parts)
    compiled = query.compile(dialect=_DIALECT)
    return store.Query(str(compiled), dict(compiled.params))


async def start_group(rt: Runtime, broadcast_ids: Sequence[int]) -> dict[int, int]:
    """Copy the audiences of several small broadcasts being sent, in one transaction (each
    once); the scheduler then hands their batches out. Returns how many recipients each
    broadcast copied now (those copied before, or not being sent, are left out).
    """
    async with rt.group_pool.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT id, workspace_id, channel_id, audience, started_at FROM broadcast "
                "WHERE id = ANY(%s) AND status = %s AND snapshot_at IS NULL "
                "AND total_count = 0",
                (list(broadcast_ids), BroadcastStatus.IN_PROGRESS.value),
            )
        ).fetchall()
        if not rows:
            return {}
        tasks = [Starting(r[0], r[1], r[2], AudienceSpec.model_validate(r[3]), r[4]) for r in rows]
        # Each copy is filed under its task's day (today, the first time): those days'
        # partitions must exist before the copy, as for a single start.
        days = await store.arun(conn, store.snapshot_days([t.broadcast_id for t in tasks]))
        for day in sorted(set(days.values())):
            await store.arun(conn, partitions.ensure(day, rt.settings.delivery_partition_days))
        copied = await store.arun(
            conn,
            store.snapshot_group(
                [t.broadcast_id for t in tasks],
                recipients_source(tasks),
                batch_size=rt.settings.batch_size,
            ),
        )
    metrics.SNAPSHOT_ROWS.inc(sum(copied.values()))
    channels = {t.broadcast_id: t.channel_id for t in tasks}
    for broadcast_id, count in copied.items():
        log.info(
            "broadcast %s: %s recipients copied",
            broadcast_id,
            count,
            extra={
                "event": "snapshotted",
                "broadcast_id": broadcast_id,
                "channel_id": channels[broadcast_id],
                "recipients": count,
            },
        )
    return copied

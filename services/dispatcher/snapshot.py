"""Starting a broadcast: copy its audience into delivery rows and batches, once.

The audience is the same query the API previews (``shared.domain.audience``), narrowed to the
contacts that existed when the broadcast started (a contact added later does not receive it).
The copy itself is the delivery store's: one ``INSERT ... SELECT`` inside Postgres, so no
recipient passes through this process and memory stays flat for any audience size. Before it,
the broadcast's day is fixed and the partition of ``delivery`` for that day made sure of, each
in a short transaction of its own (the scheduler makes partitions ahead, so this is most often
one read of the catalog).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.dialects import postgresql

from services.dispatcher import metrics
from shared import delivery_partitions as partitions
from shared import delivery_store as store
from shared.db.models import Contact
from shared.domain.audience import AudienceSpec, audience_query
from shared.domain.lifecycle import BroadcastStatus

if TYPE_CHECKING:
    from services.dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

_DIALECT = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]


def audience_source(
    workspace_id: int, channel_id: int, spec: AudienceSpec, started_at: datetime
) -> store.Query:
    """``(contact_id, address, unreachable, unreachable_reason)`` of every recipient."""
    query = (
        audience_query(workspace_id, channel_id, spec, reachable=None)
        .where(Contact.created_at <= started_at)
        .with_only_columns(
            Contact.id,
            Contact.address,
            Contact.unreachable_at.is_not(None),
            Contact.unreachable_reason,
        )
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
                "SELECT workspace_id, channel_id, audience, started_at, status, snapshot_at "
                "FROM broadcast WHERE id = %s",
                (broadcast_id,),
            )
        ).fetchone()
        if row is None:
            return None
        workspace_id, channel_id, audience, started_at, status, snapshot_at = row
        if status != BroadcastStatus.IN_PROGRESS or snapshot_at is not None:
            return None
        source = audience_source(
            workspace_id, channel_id, AudienceSpec.model_validate(audience), started_at
        )
        day = await store.arun(conn, store.snapshot_day(broadcast_id))
        if day is None:
            return None
        await store.arun(conn, partitions.ensure(day, rt.settings.delivery_partition_days))
        copied = await store.arun(
            conn, store.snapshot(broadcast_id, source, batch_size=rt.settings.batch_size)
        )
    if copied is not None:
        metrics.SNAPSHOT_ROWS.inc(copied)
        log.info(
            "broadcast %s: %s recipients copied",
            broadcast_id,
            copied,
            extra={"broadcast_id": broadcast_id, "channel_id": channel_id},
        )
    return copied

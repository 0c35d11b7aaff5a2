"""Starting a broadcast: copy its audience into delivery rows once, then point the senders
at the rows still queued, one message per range of ids.

The copy is one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` inside Postgres: no recipient
passes through this process, so memory stays flat for any audience size. It runs once per
broadcast (guarded by an advisory lock and ``snapshot_at``), and only contacts that existed
when the broadcast started are copied, so a contact added later does not receive it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from sqlalchemy import case, func, literal, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from services.dispatcher import metrics
from shared.db.models import Broadcast, Contact, Delivery
from shared.domain.audience import AudienceSpec, audience_query
from shared.domain.lifecycle import BroadcastStatus, DeliveryStatus

log = logging.getLogger(__name__)

#: Advisory lock namespace of "snapshotting broadcast N".
SNAPSHOT_LOCK = 0x6263_0001


def snapshot(session: Session, broadcast: Broadcast) -> int | None:
    """Copy the audience into delivery rows, once; return how many, or None if already done."""
    session.execute(select(func.pg_advisory_xact_lock(SNAPSHOT_LOCK, broadcast.id)))
    session.refresh(broadcast)
    if broadcast.snapshot_at is not None:
        return None
    spec = AudienceSpec.model_validate(broadcast.audience)
    recipients = audience_query(
        broadcast.workspace_id, broadcast.channel_id, spec, reachable=None
    ).where(Contact.created_at <= broadcast.started_at)
    # Contacts a provider called unreachable are recorded as skipped, with the reason.
    unreachable = Contact.unreachable_at.is_not(None)
    source = recipients.with_only_columns(
        literal(broadcast.workspace_id),
        literal(broadcast.id),
        Contact.id,
        Contact.address,
        case((unreachable, literal(DeliveryStatus.SKIPPED.value)), else_=literal("queued")),
        case(
            (
                unreachable,
                "skipped: contact unreachable: " + func.coalesce(Contact.unreachable_reason, ""),
            ),
            else_=None,
        ),
    ).order_by(Contact.id)
    session.execute(
        insert(Delivery)
        .from_select(
            ["workspace_id", "broadcast_id", "contact_id", "address", "status", "last_error"],
            source,
        )
        .on_conflict_do_nothing(index_elements=["broadcast_id", "contact_id"])
    )
    counted = session.execute(
        select(
            func.count(),
            func.count().filter(Delivery.status == DeliveryStatus.SKIPPED.value),
        ).where(Delivery.broadcast_id == broadcast.id)
    ).one()
    total, skipped = int(counted[0]), int(counted[1])
    values: dict[str, object] = {
        "snapshot_at": func.now(),
        "total_count": total,
        "skipped_count": skipped,
        "heartbeat_at": func.now(),
    }
    # The task's lock only now, so a pause or cancel is never kept waiting by a long copy. A
    # cancel that committed meanwhile found no rows to cancel: the new rows are canceled here.
    status = session.execute(
        select(Broadcast.status).where(Broadcast.id == broadcast.id).with_for_update()
    ).scalar_one()
    if status == BroadcastStatus.CANCELED:
        canceled = session.execute(
            update(Delivery)
            .where(
                Delivery.broadcast_id == broadcast.id,
                Delivery.status == DeliveryStatus.QUEUED.value,
            )
            .values(status=DeliveryStatus.CANCELED.value, updated_at=func.now())
        ).rowcount  # type: ignore[attr-defined]
        values["canceled_count"] = Broadcast.canceled_count + int(canceled or 0)
    elif total == skipped and status == BroadcastStatus.IN_PROGRESS:
        values.update(status=BroadcastStatus.COMPLETED.value, finished_at=func.now())
    session.execute(update(Broadcast).where(Broadcast.id == broadcast.id).values(**values))
    metrics.SNAPSHOT_ROWS.inc(total)
    log.info("broadcast %s: %s recipients snapshotted", broadcast.id, total)
    return int(total)


def batch_bounds(session: Session, broadcast_id: int, size: int) -> Iterator[tuple[int, int]]:
    """(first id, last id) of each run of ``size`` queued deliveries, walked by keyset."""
    after = 0
    while True:
        row = session.execute(
            text(
                """
                SELECT min(id), max(id) FROM (
                    SELECT id FROM delivery
                    WHERE broadcast_id = :b AND status = :queued AND id > :after
                    ORDER BY id LIMIT :n
                ) AS run
                """
            ),
            {"b": broadcast_id, "queued": DeliveryStatus.QUEUED.value, "after": after, "n": size},
        ).one()
        if row[0] is None:
            return
        yield int(row[0]), int(row[1])
        after = int(row[1])


def start(
    session_factory: Callable[[], Session],
    broadcast_id: int,
    *,
    batch_size: int,
    enqueue_batch: Callable[[int, int, int], None],
) -> int:
    """Snapshot (first time only) and enqueue a batch per run of queued deliveries.
    Returns the number of batches enqueued. Does nothing unless the task is ``in_progress``.
    """
    with session_factory() as session, session.begin():
        broadcast = session.get(Broadcast, broadcast_id)
        if broadcast is None or broadcast.status != BroadcastStatus.IN_PROGRESS:
            return 0
        snapshot(session, broadcast)
    batches = 0
    with session_factory() as session:
        status = session.execute(
            select(Broadcast.status).where(Broadcast.id == broadcast_id)
        ).scalar_one()
        if status != BroadcastStatus.IN_PROGRESS:
            return 0
        for first_id, last_id in batch_bounds(session, broadcast_id, batch_size):
            enqueue_batch(broadcast_id, first_id, last_id)
            batches += 1
        session.execute(
            update(Broadcast).where(Broadcast.id == broadcast_id).values(heartbeat_at=func.now())
        )
        session.commit()
    metrics.BATCHES.inc(batches)
    return batches

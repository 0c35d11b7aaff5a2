"""Rows the pipeline writes, made directly, so API tests can look at any state of a task."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from sqlalchemy import func, select, text, update

from shared import delivery_partitions, delivery_store
from shared.db.engine import raw_connection, transaction
from shared.db.models import Broadcast, Contact, Delivery
from shared.delivery_store import TODAY
from shared.domain.lifecycle import (
    CANCELED_REASON,
    NO_REASON,
    REASONED_DELIVERY_STATUSES,
    DeliveryStatus,
)


def start_with_deliveries(
    broadcast_id: int,
    statuses: Sequence[str],
    *,
    errors: Sequence[str | None] = (),
    day: date | None = None,
) -> list[int]:
    """Mark the broadcast started and give it one delivery per status, to its audience's
    first contacts (in id order); return the delivery ids. The rows are filed under ``day``
    (its partition made if missing), today by default, as a snapshot made now would be.
    """
    with transaction() as session:
        broadcast = session.get(Broadcast, broadcast_id)
        assert broadcast is not None
        contacts = session.execute(
            select(Contact.id, Contact.address)
            .where(Contact.workspace_id == broadcast.workspace_id)
            .order_by(Contact.id)
            .limit(len(statuses))
        ).all()
        assert len(contacts) == len(statuses), "not enough contacts for the deliveries asked for"
        if day is None:
            day = session.execute(text(f"SELECT {TODAY}")).scalar_one()
        else:
            delivery_store.run(raw_connection(session), delivery_partitions.ensure(day, 7))
        broadcast.part_day = day
        ids = []
        for i, ((contact_id, address), status) in enumerate(zip(contacts, statuses, strict=True)):
            delivery = Delivery(
                part_day=day,
                workspace_id=broadcast.workspace_id,
                broadcast_id=broadcast_id,
                contact_id=contact_id,
                address=address,
                status=status,
                attempts=0 if status == "queued" else 1,
                last_error=errors[i] if i < len(errors) and errors[i] else reason(status),
                provider_message_id=f"pm-{i}" if status == "sent" else None,
                sent_at=func.now() if status == "sent" else None,
            )
            session.add(delivery)
            session.flush()
            ids.append(delivery.id)
        # The counters follow from the rows by themselves (the delivery store's triggers).
        session.execute(
            update(Broadcast)
            .where(Broadcast.id == broadcast_id)
            .values(status="in_progress", started_at=func.now())
        )
    return ids


def reason(status: str) -> str | None:
    """What a row of ``status`` says when a test names no reason: a row not reached always
    carries one (a CHECK of ``delivery``), as the delivery store writes it.
    """
    if status == DeliveryStatus.CANCELED:
        return CANCELED_REASON
    return NO_REASON if status in REASONED_DELIVERY_STATUSES else None


def set_status(broadcast_id: int, status: str) -> None:
    with transaction() as session:
        session.execute(update(Broadcast).where(Broadcast.id == broadcast_id).values(status=status))


def delivery_statuses(broadcast_id: int) -> list[str]:
    with transaction() as session:
        return list(
            session.execute(
                select(Delivery.status)
                .where(Delivery.broadcast_id == broadcast_id)
                .order_by(Delivery.id)
            ).scalars()
        )

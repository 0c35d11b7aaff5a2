"""The audience snapshot against the real database: once, and never stranding rows."""

from __future__ import annotations

from sqlalchemy import func, select, update

from services.dispatcher.snapshot import snapshot
from shared.db.engine import transaction
from shared.db.models import Broadcast, Delivery
from tests.conftest import Api


def started(api: Api, n: int) -> int:
    channel = api.channel()
    account = api.account(channel["id"])
    for i in range(n):
        api.contact(account["id"], f"snap-{i}")
    b = api.broadcast(channel["id"])
    with transaction() as session:
        session.execute(
            update(Broadcast)
            .where(Broadcast.id == b["id"])
            .values(status="in_progress", started_at=func.now())
        )
    return int(b["id"])


def statuses(broadcast_id: int) -> list[str]:
    with transaction() as session:
        return sorted(
            session.execute(
                select(Delivery.status).where(Delivery.broadcast_id == broadcast_id)
            ).scalars()
        )


def test_snapshot_copies_the_audience_once(api: Api) -> None:
    broadcast_id = started(api, 3)
    with transaction() as session:
        b = session.get(Broadcast, broadcast_id)
        assert b is not None
        assert snapshot(session, b) == 3
    with transaction() as session:
        b = session.get(Broadcast, broadcast_id)
        assert b is not None
        assert snapshot(session, b) is None
        assert (b.total_count, b.status) == (3, "in_progress")
    assert statuses(broadcast_id) == ["queued"] * 3


def test_a_cancel_during_the_copy_leaves_no_row_queued(api: Api) -> None:
    broadcast_id = started(api, 4)
    with transaction() as session:
        b = session.get(Broadcast, broadcast_id)
        assert b is not None
        # The operator's cancel commits while the dispatcher is still copying.
        with transaction() as other:
            other.execute(
                update(Broadcast).where(Broadcast.id == broadcast_id).values(status="canceled")
            )
        snapshot(session, b)
    assert statuses(broadcast_id) == ["canceled"] * 4
    with transaction() as session:
        b = session.get(Broadcast, broadcast_id)
        assert b is not None
        assert (b.total_count, b.canceled_count, b.status) == (4, 4, "canceled")

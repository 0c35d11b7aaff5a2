"""ready batches: an index over the batches waiting to be handed out, by due time; no wake-up
for a task the scheduler itself starts

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 10:00:00.000000

The relay picks the tasks with due, ready batches in the order their batches fell due, and the
scheduler's wake-up looks for the next batch to fall due. Both read only batches in state
``ready`` through this partial index, and only as far as they need, so their cost follows
what they hand out, not the number of broadcasts being sent.

``bcast_broadcast`` no longer announces a task going from ``pending`` to ``in_progress``: the
scheduler made that change itself, and no dispatcher follows a task before it is sent. Ten
thousand timed sends started at once are ten thousand notifications fewer for every
listener.

``bcast_outbox`` is sent only when an insert added rows: the scheduler's claim inserts its
outbox rows in the same statement as it starts tasks, also when none is due, and an empty
insert woke the scheduler itself into a busy loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


NOTIFY_BROADCAST = """
CREATE OR REPLACE FUNCTION bcast_notify_broadcast() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT'
       OR (NEW.status IS DISTINCT FROM OLD.status
           AND NOT (OLD.status = 'pending' AND NEW.status = 'in_progress'))
       OR NEW.send_at IS DISTINCT FROM OLD.send_at THEN
        PERFORM pg_notify('bcast_broadcast', NEW.id::text || ':' || NEW.status);
    END IF;
    RETURN NULL;
END $$;
"""

#: The function as 0002 made it.
OLD_NOTIFY_BROADCAST = """
CREATE OR REPLACE FUNCTION bcast_notify_broadcast() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status
       OR NEW.send_at IS DISTINCT FROM OLD.send_at THEN
        PERFORM pg_notify('bcast_broadcast', NEW.id::text || ':' || NEW.status);
    END IF;
    RETURN NULL;
END $$;
"""


#: The outbox trigger, told only of inserts that added rows.
NOTIFY_OUTBOX = """
CREATE OR REPLACE FUNCTION bcast_notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM added) THEN
        PERFORM pg_notify('bcast_outbox', '');
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER dispatch_outbox_notify ON dispatch_outbox;
CREATE TRIGGER dispatch_outbox_notify AFTER INSERT ON dispatch_outbox
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION bcast_notify_outbox();
"""

#: The outbox trigger as 0002 made it.
OLD_NOTIFY_OUTBOX = """
DROP TRIGGER dispatch_outbox_notify ON dispatch_outbox;
CREATE OR REPLACE FUNCTION bcast_notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bcast_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER dispatch_outbox_notify AFTER INSERT ON dispatch_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION bcast_notify_outbox();
"""


def upgrade() -> None:
    op.execute(NOTIFY_BROADCAST)
    op.execute(NOTIFY_OUTBOX)
    op.create_index(
        "ix_delivery_batch_due_at_broadcast_id_ready",
        "delivery_batch",
        ["due_at", "broadcast_id"],
        unique=False,
        postgresql_where=sa.text("state = 'ready'"),
    )


def downgrade() -> None:
    op.execute(OLD_NOTIFY_OUTBOX)
    op.execute(OLD_NOTIFY_BROADCAST)
    op.drop_index(
        "ix_delivery_batch_due_at_broadcast_id_ready",
        table_name="delivery_batch",
        postgresql_where=sa.text("state = 'ready'"),
    )

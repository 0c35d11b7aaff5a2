"""dispatch core: batches with leases, partial deliveries, counters and completion in triggers

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 21:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status IN ('queued', 'sending', 'sent', 'failed', 'canceled', 'skipped')"
NEW_STATUSES = "status IN ('queued', 'sending', 'sent', 'failed', 'canceled', 'skipped', 'partial')"


def upgrade() -> None:
    op.drop_constraint(op.f("ck_delivery_status"), "delivery", type_="check")
    op.create_check_constraint(op.f("ck_delivery_status"), "delivery", NEW_STATUSES)
    op.add_column(
        "broadcast",
        sa.Column("partial_count", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.create_table(
        "delivery_batch",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("workspace_id", sa.BigInteger(), nullable=False),
        sa.Column("broadcast_id", sa.BigInteger(), nullable=False),
        sa.Column("first_id", sa.BigInteger(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.Text(), server_default="ready", nullable=False),
        sa.Column(
            "due_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("run_token", sa.Uuid(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("runs", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "state IN ('ready', 'queued', 'running', 'done')", name=op.f("ck_delivery_batch_state")
        ),
        sa.ForeignKeyConstraint(
            ["broadcast_id"],
            ["broadcast.id"],
            name=op.f("fk_delivery_batch_broadcast_id_broadcast"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspace.id"],
            name=op.f("fk_delivery_batch_workspace_id_workspace"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_batch")),
    )
    op.create_index(
        op.f("ix_delivery_batch_broadcast_id_state_due_at"),
        "delivery_batch",
        ["broadcast_id", "state", "due_at"],
        unique=False,
    )
    op.create_index(
        "ix_delivery_batch_lease_expires_at_running",
        "delivery_batch",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("state = 'running'"),
    )
    op.create_index(
        "ix_delivery_batch_published_at_queued",
        "delivery_batch",
        ["published_at"],
        unique=False,
        postgresql_where=sa.text("state = 'queued'"),
    )
    op.drop_index(
        "ix_delivery_lease_expires_at_sending",
        table_name="delivery",
        postgresql_where=sa.text("status = 'sending'"),
    )
    op.drop_column("delivery", "lease_expires_at")
    op.create_index(
        "ix_delivery_lease_token_sending",
        "delivery",
        ["lease_token"],
        unique=False,
        postgresql_where=sa.text("status = 'sending'"),
    )
    op.execute(TRIGGERS)
    # Broadcasts being sent when this runs get their batches; rows still held under the old
    # per-row leases hold a token of no batch and are taken back by the sweeper.
    op.execute(
        """
        INSERT INTO delivery_batch (workspace_id, broadcast_id, first_id, last_id)
        SELECT workspace_id, broadcast_id, min(id), max(id)
        FROM (
            SELECT d.workspace_id, d.broadcast_id, d.id,
                   (row_number() OVER (PARTITION BY d.broadcast_id ORDER BY d.id) - 1) / 500 AS n
            FROM delivery d JOIN broadcast b ON b.id = d.broadcast_id
            WHERE b.status IN ('in_progress', 'paused') AND b.snapshot_at IS NOT NULL
              AND d.status IN ('queued', 'sending')
        ) AS r
        GROUP BY workspace_id, broadcast_id, n
        """
    )


#: The counters of a broadcast follow from its delivery rows here and nowhere else: every
#: statement that inserts, moves or deletes delivery rows moves the counters by exactly what it
#: did (statement-level triggers over the transition tables, so one statement is one update of
#: the task row). Completion follows from the counters in one BEFORE UPDATE rule.
TRIGGERS = """
CREATE FUNCTION bcast_delivery_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE broadcast b
        SET total_count = b.total_count + c.total,
            sent_count = b.sent_count + c.sent,
            failed_count = b.failed_count + c.failed,
            canceled_count = b.canceled_count + c.canceled,
            skipped_count = b.skipped_count + c.skipped,
            partial_count = b.partial_count + c.partial
        FROM (
            SELECT broadcast_id, count(*) AS total,
                   count(*) FILTER (WHERE status = 'sent') AS sent,
                   count(*) FILTER (WHERE status = 'failed') AS failed,
                   count(*) FILTER (WHERE status = 'canceled') AS canceled,
                   count(*) FILTER (WHERE status = 'skipped') AS skipped,
                   count(*) FILTER (WHERE status = 'partial') AS partial
            FROM new_rows GROUP BY broadcast_id
        ) AS c
        WHERE b.id = c.broadcast_id;
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE broadcast b
        SET total_count = b.total_count - c.total,
            sent_count = b.sent_count - c.sent,
            failed_count = b.failed_count - c.failed,
            canceled_count = b.canceled_count - c.canceled,
            skipped_count = b.skipped_count - c.skipped,
            partial_count = b.partial_count - c.partial
        FROM (
            SELECT broadcast_id, count(*) AS total,
                   count(*) FILTER (WHERE status = 'sent') AS sent,
                   count(*) FILTER (WHERE status = 'failed') AS failed,
                   count(*) FILTER (WHERE status = 'canceled') AS canceled,
                   count(*) FILTER (WHERE status = 'skipped') AS skipped,
                   count(*) FILTER (WHERE status = 'partial') AS partial
            FROM old_rows GROUP BY broadcast_id
        ) AS c
        WHERE b.id = c.broadcast_id;
    ELSE
        -- Rows that did not change status (a claim, a lease token) add nothing, and a
        -- statement that moved no row to or from a final status leaves the task row alone.
        UPDATE broadcast b
        SET sent_count = b.sent_count + c.sent,
            failed_count = b.failed_count + c.failed,
            canceled_count = b.canceled_count + c.canceled,
            skipped_count = b.skipped_count + c.skipped,
            partial_count = b.partial_count + c.partial
        FROM (
            SELECT broadcast_id, sum(sent) AS sent, sum(failed) AS failed,
                   sum(canceled) AS canceled, sum(skipped) AS skipped, sum(partial) AS partial
            FROM (
                SELECT broadcast_id, (status = 'sent')::int AS sent,
                       (status = 'failed')::int AS failed, (status = 'canceled')::int AS canceled,
                       (status = 'skipped')::int AS skipped, (status = 'partial')::int AS partial
                FROM new_rows
                UNION ALL
                SELECT broadcast_id, -(status = 'sent')::int, -(status = 'failed')::int,
                       -(status = 'canceled')::int, -(status = 'skipped')::int,
                       -(status = 'partial')::int
                FROM old_rows
            ) AS moves
            GROUP BY broadcast_id
            HAVING sum(sent) <> 0 OR sum(failed) <> 0 OR sum(canceled) <> 0
                OR sum(skipped) <> 0 OR sum(partial) <> 0
        ) AS c
        WHERE b.id = c.broadcast_id;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER delivery_counts_insert AFTER INSERT ON delivery
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bcast_delivery_counts();
CREATE TRIGGER delivery_counts_update AFTER UPDATE ON delivery
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bcast_delivery_counts();
CREATE TRIGGER delivery_counts_delete AFTER DELETE ON delivery
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bcast_delivery_counts();

CREATE FUNCTION bcast_complete_when_done() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'in_progress' AND NEW.snapshot_at IS NOT NULL
       AND NEW.sent_count + NEW.failed_count + NEW.canceled_count + NEW.skipped_count
           + NEW.partial_count >= NEW.total_count THEN
        NEW.status := 'completed';
        NEW.finished_at := now();
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER broadcast_complete BEFORE UPDATE ON broadcast
    FOR EACH ROW EXECUTE FUNCTION bcast_complete_when_done();

-- A completion made by the rule above changes the status without naming it in SET, so the
-- wake-up trigger now looks at every update (its function compares old and new itself).
DROP TRIGGER broadcast_notify ON broadcast;
CREATE TRIGGER broadcast_notify AFTER INSERT OR UPDATE ON broadcast
    FOR EACH ROW EXECUTE FUNCTION bcast_notify_broadcast();

CREATE FUNCTION bcast_notify_batch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bcast_batch', '');
    RETURN NULL;
END $$;

-- The scheduler hears of batches that became ready at once. (A run that finishes its batch
-- takes the broadcast's next due one in the same transaction; when it takes none, there is
-- none due to hand out, so a batch turning 'done' needs no wake-up.)
CREATE TRIGGER delivery_batch_notify AFTER INSERT OR UPDATE OF state ON delivery_batch
    FOR EACH ROW WHEN (NEW.state = 'ready')
    EXECUTE FUNCTION bcast_notify_batch();
"""


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER delivery_batch_notify ON delivery_batch;
        DROP FUNCTION bcast_notify_batch();
        DROP TRIGGER broadcast_notify ON broadcast;
        CREATE TRIGGER broadcast_notify AFTER INSERT OR UPDATE OF status, send_at ON broadcast
            FOR EACH ROW EXECUTE FUNCTION bcast_notify_broadcast();
        DROP TRIGGER broadcast_complete ON broadcast;
        DROP FUNCTION bcast_complete_when_done();
        DROP TRIGGER delivery_counts_delete ON delivery;
        DROP TRIGGER delivery_counts_update ON delivery;
        DROP TRIGGER delivery_counts_insert ON delivery;
        DROP FUNCTION bcast_delivery_counts();
        """
    )
    op.drop_index(
        "ix_delivery_lease_token_sending",
        table_name="delivery",
        postgresql_where=sa.text("status = 'sending'"),
    )
    op.add_column(
        "delivery",
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_delivery_lease_expires_at_sending",
        "delivery",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'sending'"),
    )
    op.drop_index(
        "ix_delivery_batch_published_at_queued",
        table_name="delivery_batch",
        postgresql_where=sa.text("state = 'queued'"),
    )
    op.drop_index(
        "ix_delivery_batch_lease_expires_at_running",
        table_name="delivery_batch",
        postgresql_where=sa.text("state = 'running'"),
    )
    op.drop_index(op.f("ix_delivery_batch_broadcast_id_state_due_at"), table_name="delivery_batch")
    op.drop_table("delivery_batch")
    # The older schema has no partial status: such recipients read as failed there.
    op.execute(
        "UPDATE broadcast SET failed_count = failed_count + partial_count WHERE partial_count > 0"
    )
    op.drop_column("broadcast", "partial_count")
    op.drop_constraint(op.f("ck_delivery_status"), "delivery", type_="check")
    op.execute("UPDATE delivery SET status = 'failed' WHERE status = 'partial'")
    op.create_check_constraint(op.f("ck_delivery_status"), "delivery", OLD_STATUSES)

"""delivery partitions: delivery rows partitioned by the day their audience was copied

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 09:00:00.000000

``delivery`` becomes a table partitioned by range of ``part_day``, the UTC day a broadcast's
audience was copied, which ``broadcast`` and ``delivery_batch`` carry too. Partitions are made
ahead and removed past retention by ``shared.delivery_partitions``.

The rows already there are not moved: the old table becomes the first partition as it is,
covering one day, the day before this ran, and every broadcast with rows in it takes that
day. Only two indexes are built on it (the primary key and the unique key now end in
``part_day``); the other two, and the rows, stay. Retention removes it like any other
partition once that day is past retention and its broadcasts are all completed or canceled.

The foreign keys from ``delivery`` go (see ``shared.db.models.Delivery``); deleting a
broadcast or a contact still deletes its delivery rows, by statement triggers.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "status IN ('queued', 'sending', 'sent', 'failed', 'canceled', 'skipped', 'partial')"

COUNTER_TRIGGERS = """
CREATE TRIGGER delivery_counts_insert AFTER INSERT ON delivery
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bcast_delivery_counts();
CREATE TRIGGER delivery_counts_update AFTER UPDATE ON delivery
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bcast_delivery_counts();
CREATE TRIGGER delivery_counts_delete AFTER DELETE ON delivery
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bcast_delivery_counts();
"""

DROP_COUNTER_TRIGGERS = """
DROP TRIGGER delivery_counts_insert ON delivery;
DROP TRIGGER delivery_counts_update ON delivery;
DROP TRIGGER delivery_counts_delete ON delivery;
"""

#: What the foreign keys' ON DELETE CASCADE did: a deleted broadcast or contact takes its
#: delivery rows along (and the counters follow, by the delete trigger of those rows).
CASCADE = """
CREATE FUNCTION bcast_delivery_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'broadcast' THEN
        DELETE FROM delivery d USING old_rows o WHERE d.broadcast_id = o.id;
    ELSE
        DELETE FROM delivery d USING old_rows o WHERE d.contact_id = o.id;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER broadcast_delivery_cascade AFTER DELETE ON broadcast
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bcast_delivery_cascade();
CREATE TRIGGER contact_delivery_cascade AFTER DELETE ON contact
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bcast_delivery_cascade();
"""

COLUMNS = f"""
    id bigint GENERATED ALWAYS AS IDENTITY,
    part_day date NOT NULL,
    workspace_id bigint NOT NULL,
    broadcast_id bigint NOT NULL,
    contact_id bigint NOT NULL,
    address text NOT NULL,
    status text DEFAULT 'queued' NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    last_error text,
    provider_message_id text,
    next_attempt_at timestamp with time zone,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    sent_at timestamp with time zone,
    lease_token uuid,
    parts_done integer DEFAULT 0 NOT NULL,
    CONSTRAINT ck_delivery_status CHECK ({STATUSES})
"""


def _partition_name(first_day: date) -> str:
    return f"delivery_p{first_day:%Y%m%d}"


def upgrade() -> None:
    conn = op.get_bind()
    legacy_day: date = conn.execute(
        sa.text("SELECT (now() AT TIME ZONE 'UTC')::date - 1")
    ).scalar_one()
    day = f"'{legacy_day.isoformat()}'::date"
    next_day = f"'{(legacy_day + timedelta(days=1)).isoformat()}'::date"
    has_rows = conn.execute(sa.text("SELECT EXISTS (SELECT 1 FROM delivery)")).scalar_one()
    next_id = conn.execute(sa.text("SELECT nextval(pg_get_serial_sequence('delivery', 'id'))"))
    start_with = int(next_id.scalar_one())

    op.add_column("broadcast", sa.Column("part_day", sa.Date(), nullable=True))
    op.add_column(
        "broadcast",
        sa.Column("recipients_removed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(op.f("ix_broadcast_part_day"), "broadcast", ["part_day"], unique=False)
    # A constant default is stored once, not written into every row.
    op.execute(f"ALTER TABLE delivery_batch ADD COLUMN part_day date NOT NULL DEFAULT {day}")
    op.execute("ALTER TABLE delivery_batch ALTER COLUMN part_day DROP DEFAULT")
    if has_rows:
        op.execute(
            f"""
            UPDATE broadcast b SET part_day = {day}
            WHERE EXISTS (SELECT 1 FROM delivery d WHERE d.broadcast_id = b.id)
            """
        )

    op.execute(DROP_COUNTER_TRIGGERS)
    op.execute(
        """
        ALTER TABLE delivery
            DROP CONSTRAINT fk_delivery_workspace_id_workspace,
            DROP CONSTRAINT fk_delivery_broadcast_id_broadcast,
            DROP CONSTRAINT fk_delivery_contact_id_contact
        """
    )
    legacy = _partition_name(legacy_day)
    if has_rows:
        op.execute(
            f"""
            ALTER TABLE delivery RENAME TO {legacy};
            ALTER TABLE {legacy} ALTER COLUMN id DROP IDENTITY;
            ALTER TABLE {legacy} ADD COLUMN part_day date NOT NULL DEFAULT {day};
            ALTER TABLE {legacy} ALTER COLUMN part_day DROP DEFAULT;
            ALTER TABLE {legacy} ADD CONSTRAINT {legacy}_range
                CHECK (part_day >= {day} AND part_day < {next_day});
            ALTER INDEX ix_delivery_broadcast_id_status_id
                RENAME TO {legacy}_broadcast_id_status_id_idx;
            ALTER INDEX ix_delivery_lease_token_sending RENAME TO {legacy}_lease_token_idx;
            CREATE UNIQUE INDEX {legacy}_pkey ON {legacy} (id, part_day);
            CREATE UNIQUE INDEX {legacy}_broadcast_id_contact_id_part_day_key
                ON {legacy} (broadcast_id, contact_id, part_day);
            ALTER TABLE {legacy}
                DROP CONSTRAINT pk_delivery,
                ADD CONSTRAINT {legacy}_pkey PRIMARY KEY USING INDEX {legacy}_pkey,
                DROP CONSTRAINT uq_delivery_broadcast_id_contact_id,
                ADD CONSTRAINT {legacy}_broadcast_id_contact_id_part_day_key
                    UNIQUE USING INDEX {legacy}_broadcast_id_contact_id_part_day_key;
            """
        )
    else:
        op.execute("DROP TABLE delivery")

    op.execute(
        f"""
        CREATE TABLE delivery (
            {COLUMNS},
            CONSTRAINT pk_delivery PRIMARY KEY (id, part_day),
            CONSTRAINT uq_delivery_broadcast_id_contact_id_part_day
                UNIQUE (broadcast_id, contact_id, part_day)
        ) PARTITION BY RANGE (part_day);
        ALTER TABLE delivery ALTER COLUMN id RESTART WITH {start_with};
        CREATE INDEX ix_delivery_broadcast_id_status_id ON delivery (broadcast_id, status, id);
        CREATE INDEX ix_delivery_lease_token_sending ON delivery (lease_token)
            WHERE status = 'sending';
        """
    )
    if has_rows:
        # Its indexes match the parent's, and its CHECK (one read of the rows above, no
        # rewrite) proves the range, so attaching it builds and reads nothing more.
        op.execute(
            f"ALTER TABLE delivery ATTACH PARTITION {legacy} "
            f"FOR VALUES FROM ({day}) TO ({next_day})"
        )
    op.execute(COUNTER_TRIGGERS)
    op.execute(CASCADE)


def downgrade() -> None:
    conn = op.get_bind()
    next_id = conn.execute(sa.text("SELECT nextval(pg_get_serial_sequence('delivery', 'id'))"))
    start_with = int(next_id.scalar_one())
    op.execute(
        """
        DROP TRIGGER contact_delivery_cascade ON contact;
        DROP TRIGGER broadcast_delivery_cascade ON broadcast;
        DROP FUNCTION bcast_delivery_cascade();
        """
    )
    # Rows of partitions archived (detached) by retention are not brought back.
    op.execute(
        f"""
        CREATE TABLE delivery_flat ({COLUMNS});
        INSERT INTO delivery_flat
        OVERRIDING SYSTEM VALUE
        SELECT * FROM delivery;
        DROP TABLE delivery;
        ALTER TABLE delivery_flat RENAME TO delivery;
        ALTER TABLE delivery DROP COLUMN part_day;
        ALTER TABLE delivery ALTER COLUMN id RESTART WITH {start_with};
        ALTER SEQUENCE delivery_flat_id_seq RENAME TO delivery_id_seq;
        ALTER TABLE delivery
            ADD CONSTRAINT pk_delivery PRIMARY KEY (id),
            ADD CONSTRAINT uq_delivery_broadcast_id_contact_id UNIQUE (broadcast_id, contact_id),
            ADD CONSTRAINT fk_delivery_broadcast_id_broadcast FOREIGN KEY (broadcast_id)
                REFERENCES broadcast (id) ON DELETE CASCADE,
            ADD CONSTRAINT fk_delivery_contact_id_contact FOREIGN KEY (contact_id)
                REFERENCES contact (id) ON DELETE CASCADE,
            ADD CONSTRAINT fk_delivery_workspace_id_workspace FOREIGN KEY (workspace_id)
                REFERENCES workspace (id) ON DELETE CASCADE;
        CREATE INDEX ix_delivery_broadcast_id_status_id ON delivery (broadcast_id, status, id);
        CREATE INDEX ix_delivery_lease_token_sending ON delivery (lease_token)
            WHERE status = 'sending';
        """
    )
    op.execute(COUNTER_TRIGGERS)
    op.drop_column("delivery_batch", "part_day")
    op.drop_index(op.f("ix_broadcast_part_day"), table_name="broadcast")
    op.drop_column("broadcast", "recipients_removed_at")
    op.drop_column("broadcast", "part_day")

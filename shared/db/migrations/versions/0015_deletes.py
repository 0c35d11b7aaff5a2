"""deletes: a deleted broadcast's rows go in small steps; a deleted contact is erased from history

Revision ID: 0015
Revises: 0014
Create Date: 2027-01-12 10:00:00.000000

Until now a deleted broadcast or contact took its delivery rows along in the same statement
(migration 0007's ``bcast_delivery_cascade``): one long transaction on ``delivery`` for a
million-recipient broadcast, a read of the whole table for one contact, and a contact's
deletion took its outcomes out of every broadcast's counts.

* A deleted broadcast (``DELETE /v1/broadcasts/{id}``, or its channel's deletion) notes its
  ``(broadcast_id, part_day)`` in ``delivery_purge``; the partition keeper deletes its rows a
  few thousand at a time (``shared.delivery_store.purge_step``).
* A deleted contact (``DELETE /v1/contacts/{id}``, a data-protection erasure, or its account's
  deletion) keeps its delivery rows, and so every broadcast's counts, but its address is
  replaced by ``(erased)`` in each of them, in the reasons too; its name was only ever read
  from the contact row. The delete notes the contact in ``contact_erasure``; the API erases a
  single contact's rows at once, and the scheduler's sweep erases what is left (an account's
  many contacts, rows an audience copy under way made) in small steps, dropping the note once
  no row is left and no copy that began before the delete is still running.
  ``ix_delivery_contact_id`` (built per partition, concurrently) finds a contact's rows in
  every partition without reading the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import online_ddl

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CASCADE = """
CREATE OR REPLACE FUNCTION bcast_delivery_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'broadcast' THEN
        INSERT INTO delivery_purge (broadcast_id, part_day)
        SELECT id, part_day FROM old_rows WHERE part_day IS NOT NULL
        ON CONFLICT (broadcast_id) DO NOTHING;
    ELSE
        INSERT INTO contact_erasure (contact_id) SELECT id FROM old_rows
        ON CONFLICT (contact_id) DO NOTHING;
    END IF;
    RETURN NULL;
END $$
"""

OLD_CASCADE = """
CREATE OR REPLACE FUNCTION bcast_delivery_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'broadcast' THEN
        DELETE FROM delivery d USING old_rows o WHERE d.broadcast_id = o.id;
    ELSE
        DELETE FROM delivery d USING old_rows o WHERE d.contact_id = o.id;
    END IF;
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.create_table(
        "delivery_purge",
        sa.Column("broadcast_id", sa.BigInteger(), nullable=False),
        sa.Column("part_day", sa.Date(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("broadcast_id", name=op.f("pk_delivery_purge")),
    )
    op.create_table(
        "contact_erasure",
        sa.Column("contact_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("contact_id", name=op.f("pk_contact_erasure")),
    )
    op.execute(CASCADE)
    with op.get_context().autocommit_block():
        online_ddl.create_index(op.get_bind(), "ix_delivery_contact_id", "contact_id")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        online_ddl.drop_index(op.get_bind(), "ix_delivery_contact_id")
    op.execute(OLD_CASCADE)
    op.drop_table("contact_erasure")
    op.drop_table("delivery_purge")

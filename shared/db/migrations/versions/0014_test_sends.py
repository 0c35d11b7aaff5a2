"""test sends: a broadcast's content sent to a few chosen contacts, recorded apart

Revision ID: 0014
Revises: 0013
Create Date: 2027-01-10 10:00:00.000000

``POST /v1/broadcasts/{id}/test-send`` writes a small broadcast of origin ``test`` whose
``test_of_id`` names the broadcast it tries out. It goes through the same pipeline (rate
limit, retries, recipients and reasons) but is its own task: the tried broadcast's counts never
include it, and lists leave it out unless asked for. Deleting a broadcast deletes its tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import online_ddl

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _origins(*names: str) -> str:
    return "origin IN (" + ", ".join(f"'{n}'" for n in names) + ")"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        # Every send's result write updates its broadcast's counts: strong locks only briefly.
        online_ddl.briefly(
            bind,
            "ALTER TABLE broadcast ADD COLUMN IF NOT EXISTS test_of_id bigint "
            "CONSTRAINT fk_broadcast_test_of_id_broadcast REFERENCES broadcast (id) "
            "ON DELETE CASCADE",
        )
        online_ddl.briefly(
            bind,
            "ALTER TABLE broadcast DROP CONSTRAINT IF EXISTS ck_broadcast_origin, "
            "ADD CONSTRAINT ck_broadcast_origin CHECK "
            f"({_origins('broadcast', 'conversation', 'test')}) NOT VALID",
        )
        op.execute("ALTER TABLE broadcast VALIDATE CONSTRAINT ck_broadcast_origin")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_broadcast_test_of_id")
        op.create_index(
            "ix_broadcast_test_of_id",
            "broadcast",
            ["test_of_id"],
            postgresql_where=sa.text("test_of_id IS NOT NULL"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    op.execute("DELETE FROM broadcast WHERE origin = 'test'")
    op.drop_index("ix_broadcast_test_of_id", table_name="broadcast")
    op.drop_column("broadcast", "test_of_id")
    op.drop_constraint(op.f("ck_broadcast_origin"), "broadcast", type_="check")
    op.create_check_constraint(
        op.f("ck_broadcast_origin"), "broadcast", sa.text(_origins("broadcast", "conversation"))
    )

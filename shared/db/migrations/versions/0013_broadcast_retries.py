"""broadcast retries: a broadcast made to retry another's failed recipients points at it

Revision ID: 0013
Revises: 0012
Create Date: 2027-01-03 10:00:00.000000

``POST /v1/broadcasts/{id}/retry-failed`` makes a new broadcast whose audience is exactly the
recipients that failed in broadcast ``id``; ``retry_of_id`` links it to that one, and the
partial index finds the retries of a broadcast (its detail lists them). Deleting the original
leaves its retries, unlinked.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "broadcast",
        sa.Column(
            "retry_of_id",
            sa.BigInteger(),
            sa.ForeignKey(
                "broadcast.id", name="fk_broadcast_retry_of_id_broadcast", ondelete="SET NULL"
            ),
            nullable=True,
        ),
    )
    # Built concurrently: every send's result write updates its broadcast's counts.
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_broadcast_retry_of_id")
        op.create_index(
            "ix_broadcast_retry_of_id",
            "broadcast",
            ["retry_of_id"],
            postgresql_where=sa.text("retry_of_id IS NOT NULL"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    op.drop_index("ix_broadcast_retry_of_id", table_name="broadcast")
    op.drop_column("broadcast", "retry_of_id")

"""end lines: when a broadcast's end was logged, so that exactly one line says it

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10 10:00:00.000000

A broadcast completes inside a dispatcher's result write (a trigger sees its last row end) or
is canceled by an operator; either way, operators want one log line with its counts. The
scheduler claims the ended tasks whose end is not yet logged (``end_logged_at IS NULL``) in the
statement that sets the column, so each end is logged once, by one scheduler, whichever
process ended the task. Tasks that ended before this revision count as logged.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("broadcast", sa.Column("end_logged_at", sa.DateTime(timezone=True)))
    op.execute(
        "UPDATE broadcast SET end_logged_at = coalesce(finished_at, updated_at) "
        "WHERE status IN ('completed', 'canceled')"
    )
    op.create_index(
        "ix_broadcast_end_unlogged",
        "broadcast",
        ["id"],
        postgresql_where=sa.text("end_logged_at IS NULL AND status IN ('completed', 'canceled')"),
    )


def downgrade() -> None:
    op.drop_index("ix_broadcast_end_unlogged", table_name="broadcast")
    op.drop_column("broadcast", "end_logged_at")

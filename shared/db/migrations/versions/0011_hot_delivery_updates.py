"""hot delivery updates: a send's two row updates stay on their heap page, with no index entry

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-20 10:00:00.000000

Each recipient's row is written three times: copied (``queued``), claimed (``sending``) and
answered (``sent``). With ``status`` and ``lease_token`` in indexes, each update wrote a new
row version *and* a new entry in every index of the table; an update that changes no indexed
column and finds room on its page is a heap-only (HOT) update, which writes no index entry and
whose dead version the next reader of the page prunes, with no vacuum. So:

* ``(broadcast_id, status, id)`` becomes ``(broadcast_id, id)``: every statement of a send
  names its broadcast and its batch's id range, and lists page through a broadcast by id;
* the partial ``lease_token`` index goes: rows of a run are found in its batch's range, and
  rows left ``sending`` by a run that lost its batch go back when the batch is next taken;
* the recipients not reached (failed, partly sent, skipped) are found by a partial index on
  ``last_error IS NOT NULL``: ``last_error`` is written only when a send fails or waits for a
  retry, so a send that succeeds first time leaves it unchanged and stays HOT. A CHECK makes
  sure every such row carries its reason (rows from before without one get a fixed text);
* partitions are made with ``fillfactor = 45``, the room a row's later versions need on its
  page (existing partitions get it for the pages they fill from now on).

The table is large and written by every send: each step here lets sends go on while it runs
(``shared.db.online_ddl``): the new indexes are built one partition at a time
``CONCURRENTLY`` before the old ones go, the rows without a reason are given one a range at a
time, and the CHECK is validated under a lock that lets writes go on.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from shared.db import online_ddl

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Set on each partition of ``delivery`` (a partitioned table has no storage of its own).
FILLFACTOR = 45
REASONED = "('failed', 'partial', 'skipped')"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        online_ddl.create_index(bind, "ix_delivery_broadcast_id_id", "broadcast_id, id")
        online_ddl.create_index(
            bind, "ix_delivery_not_reached", "broadcast_id, id", where="last_error IS NOT NULL"
        )
        online_ddl.check(
            bind,
            "ck_delivery_reason",
            f"status NOT IN {REASONED} OR last_error IS NOT NULL",
            fix=(
                "last_error = '(no reason given)'",
                f"status IN {REASONED} AND last_error IS NULL",
            ),
        )
        online_ddl.drop_index(bind, "ix_delivery_broadcast_id_status_id")
        online_ddl.drop_index(bind, "ix_delivery_lease_token_sending")
        online_ddl.set_fillfactor(bind, FILLFACTOR)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        online_ddl.set_fillfactor(bind, None)
        online_ddl.create_index(
            bind, "ix_delivery_broadcast_id_status_id", "broadcast_id, status, id"
        )
        online_ddl.create_index(
            bind, "ix_delivery_lease_token_sending", "lease_token", where="status = 'sending'"
        )
        online_ddl.drop_index(bind, "ix_delivery_not_reached")
        online_ddl.drop_index(bind, "ix_delivery_broadcast_id_id")
        online_ddl.briefly(
            bind, "ALTER TABLE delivery DROP CONSTRAINT IF EXISTS ck_delivery_reason"
        )

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
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Set on each partition of ``delivery`` (a partitioned table has no storage of its own).
FILLFACTOR = 45

_PARTITIONS = """
    SELECT c.oid::regclass::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'delivery'::regclass
"""


def _set_fillfactor(value: int | None) -> None:
    setting = f"SET (fillfactor = {value})" if value else "RESET (fillfactor)"
    op.execute(
        f"""
        DO $$
        DECLARE part text;
        BEGIN
            FOR part IN {_PARTITIONS} LOOP
                EXECUTE format('ALTER TABLE %s {setting}', part);
            END LOOP;
        END $$
        """
    )


def upgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_delivery_broadcast_id_status_id")
    op.execute("DROP INDEX IF EXISTS ix_delivery_lease_token_sending")
    op.execute("CREATE INDEX ix_delivery_broadcast_id_id ON delivery (broadcast_id, id)")
    op.execute(
        "UPDATE delivery SET last_error = '(no reason recorded)' "
        "WHERE status IN ('failed', 'partial', 'skipped') AND last_error IS NULL"
    )
    op.execute(
        "ALTER TABLE delivery ADD CONSTRAINT ck_delivery_reason "
        "CHECK (status NOT IN ('failed', 'partial', 'skipped') OR last_error IS NOT NULL)"
    )
    op.execute(
        "CREATE INDEX ix_delivery_not_reached ON delivery (broadcast_id, id) "
        "WHERE last_error IS NOT NULL"
    )
    _set_fillfactor(FILLFACTOR)


def downgrade() -> None:
    _set_fillfactor(None)
    op.execute("DROP INDEX ix_delivery_not_reached")
    op.execute("DROP INDEX ix_delivery_broadcast_id_id")
    op.execute("ALTER TABLE delivery DROP CONSTRAINT ck_delivery_reason")
    op.execute(
        "CREATE INDEX ix_delivery_broadcast_id_status_id ON delivery (broadcast_id, status, id)"
    )
    op.execute(
        "CREATE INDEX ix_delivery_lease_token_sending ON delivery (lease_token) "
        "WHERE status = 'sending'"
    )

"""time zones and contact fields: send times given in a zone, contacts' zones and custom
fields, sending windows

Revision ID: 0016
Revises: 0015
Create Date: 2027-01-14 10:00:00.000000

* ``broadcast.send_at_local`` / ``send_at_zone``: the wall-clock time and zone a send time was
  given as (``send_at`` stays the moment, in UTC).
* ``broadcast.window_start`` / ``window_end`` / ``window_zone``: a sending window in each
  recipient's local time (all three or none).
* ``contact.time_zone``: the contact's IANA zone, for windows; ``contact.fields``: its custom
  fields (``{"city": "Berlin"}``), for personalised text.
* ``bcast_window_open`` and ``bcast_window_next``: whether a window is open at a moment in a
  zone, and when it next opens; the dispatcher's claim and its wait ask them.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from shared.db import online_ddl

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = """
CREATE OR REPLACE FUNCTION bcast_window_open(zone text, opens time, closes time, at timestamptz)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN opens < closes THEN t >= opens AND t < closes
                ELSE t >= opens OR t < closes END
    FROM (SELECT (at AT TIME ZONE zone)::time AS t) AS local_time
$$;

CREATE OR REPLACE FUNCTION bcast_window_next(zone text, opens time, closes time, at timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN bcast_window_open(zone, opens, closes, at) THEN at
        WHEN day + opens > wall THEN (day + opens) AT TIME ZONE zone
        ELSE (day + interval '1 day' + opens) AT TIME ZONE zone
    END
    FROM (SELECT at AT TIME ZONE zone AS wall,
                 date_trunc('day', at AT TIME ZONE zone) AS day) AS local_day
$$;
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        online_ddl.briefly(
            bind,
            "ALTER TABLE broadcast ADD COLUMN IF NOT EXISTS send_at_local text, "
            "ADD COLUMN IF NOT EXISTS send_at_zone text, "
            "ADD COLUMN IF NOT EXISTS window_start time, "
            "ADD COLUMN IF NOT EXISTS window_end time, "
            "ADD COLUMN IF NOT EXISTS window_zone text",
        )
        online_ddl.briefly(
            bind,
            "ALTER TABLE broadcast DROP CONSTRAINT IF EXISTS ck_broadcast_window, "
            "ADD CONSTRAINT ck_broadcast_window CHECK ((window_start IS NULL) = "
            "(window_end IS NULL) AND (window_start IS NULL) = (window_zone IS NULL)) NOT VALID",
        )
        op.execute("ALTER TABLE broadcast VALIDATE CONSTRAINT ck_broadcast_window")
        online_ddl.briefly(
            bind,
            "ALTER TABLE contact ADD COLUMN IF NOT EXISTS time_zone text, "
            "ADD COLUMN IF NOT EXISTS fields jsonb DEFAULT '{}'::jsonb NOT NULL",
        )
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS bcast_window_next(text, time, time, timestamptz)")
    op.execute("DROP FUNCTION IF EXISTS bcast_window_open(text, time, time, timestamptz)")
    op.drop_column("contact", "fields")
    op.drop_column("contact", "time_zone")
    op.drop_constraint(op.f("ck_broadcast_window"), "broadcast", type_="check")
    for column in ("window_zone", "window_end", "window_start", "send_at_zone", "send_at_local"):
        op.drop_column("broadcast", column)

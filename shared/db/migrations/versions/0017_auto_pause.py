"""auto-pause: a broadcast pauses itself when too many of its last sends failed

Revision ID: 0017
Revises: 0016
Create Date: 2027-01-16 10:00:00.000000

``channel.auto_pause`` (``{"failure_ratio": 0.5, "last": 200}``, or null: off) is the default
of the channel's broadcasts; ``broadcast.auto_pause`` overrides it (``{"failure_ratio": null}``
turns it off for one broadcast). When a broadcast enters ``in_progress`` before its audience is
copied, the task-row rule fixes the values it runs with (``pause_ratio``, ``pause_last``).

The same rule that completes a task keeps ``recent_outcomes``: one bit per recipient sent to
(0) or failed, wholly or in part (1), the last ``pause_last`` of them, in the order their
results were written (the outcomes one statement writes are spread evenly). When the window is full and its share of 1s reaches ``pause_ratio``, the
task becomes ``paused`` with the reason, and ``auto_paused_at`` is set (the scheduler logs it
once and counts it). Resuming starts the window afresh (and clears ``auto_paused_at``). No statement of the send path is
added: the counters' update of the task row carries it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from shared.db import online_ddl

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RULE = """
CREATE OR REPLACE FUNCTION bcast_complete_when_done() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ok bigint;
    bad bigint;
    n bigint;
    b bigint;
    bits varbit;
    setting jsonb;
BEGIN
    IF NEW.status = 'in_progress' AND OLD.status <> 'in_progress'
       AND NEW.snapshot_at IS NULL THEN
        setting := coalesce(
            nullif(NEW.auto_pause, 'null'::jsonb),
            (SELECT c.auto_pause FROM channel c WHERE c.id = NEW.channel_id));
        NEW.pause_ratio := (setting ->> 'failure_ratio')::float8;
        NEW.pause_last := CASE WHEN NEW.pause_ratio IS NULL THEN NULL
                               ELSE (setting ->> 'last')::int END;
    END IF;
    IF NEW.status = 'in_progress' AND NEW.snapshot_at IS NOT NULL
       AND NEW.sent_count + NEW.failed_count + NEW.canceled_count + NEW.skipped_count
           + NEW.partial_count >= NEW.total_count THEN
        NEW.status := 'completed';
        NEW.finished_at := now();
    ELSIF NEW.status = 'in_progress' AND NEW.pause_last IS NOT NULL THEN
        ok := greatest(NEW.sent_count - OLD.sent_count, 0);
        bad := greatest(NEW.failed_count + NEW.partial_count
                        - OLD.failed_count - OLD.partial_count, 0);
        IF ok > 0 OR bad > 0 THEN
            -- One statement's outcomes happened together: their failures are spread evenly
            -- among them (and, beyond the window's length, kept in proportion).
            n := least(ok + bad, NEW.pause_last);
            b := round(bad::numeric * n / (ok + bad));
            bits := coalesce(NEW.recent_outcomes, B'') || (
                SELECT string_agg(
                    CASE WHEN (i * b) / n > ((i - 1) * b) / n THEN '1' ELSE '0' END, ''
                    ORDER BY i)
                FROM generate_series(1, n) AS i)::varbit;
            IF length(bits) > NEW.pause_last THEN
                bits := substring(bits FROM length(bits) - NEW.pause_last + 1);
            END IF;
            NEW.recent_outcomes := bits;
            IF length(bits) >= NEW.pause_last
               AND bit_count(bits)::float8 / length(bits) >= NEW.pause_ratio THEN
                NEW.status := 'paused';
                NEW.auto_paused_at := now();
                NEW.status_reason := format(
                    'auto-paused: %s of the last %s sends failed (the limit is %s%%); '
                    'see why in its recipients not reached, fix the cause, then resume it',
                    bit_count(bits), length(bits), round((NEW.pause_ratio * 100)::numeric, 1));
            END IF;
        END IF;
    END IF;
    RETURN NEW;
END $$
"""

OLD_RULE = """
CREATE OR REPLACE FUNCTION bcast_complete_when_done() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'in_progress' AND NEW.snapshot_at IS NOT NULL
       AND NEW.sent_count + NEW.failed_count + NEW.canceled_count + NEW.skipped_count
           + NEW.partial_count >= NEW.total_count THEN
        NEW.status := 'completed';
        NEW.finished_at := now();
    END IF;
    RETURN NEW;
END $$
"""

COLUMNS = (
    "auto_pause",
    "pause_ratio",
    "pause_last",
    "recent_outcomes",
    "auto_paused_at",
    "auto_pause_logged_at",
)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        online_ddl.briefly(bind, "ALTER TABLE channel ADD COLUMN IF NOT EXISTS auto_pause jsonb")
        online_ddl.briefly(
            bind,
            "ALTER TABLE broadcast ADD COLUMN IF NOT EXISTS auto_pause jsonb, "
            "ADD COLUMN IF NOT EXISTS pause_ratio float8, "
            "ADD COLUMN IF NOT EXISTS pause_last integer, "
            "ADD COLUMN IF NOT EXISTS recent_outcomes varbit, "
            "ADD COLUMN IF NOT EXISTS auto_paused_at timestamptz, "
            "ADD COLUMN IF NOT EXISTS auto_pause_logged_at timestamptz",
        )
    op.execute(RULE)
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_broadcast_auto_paused")
        op.execute(
            "CREATE INDEX CONCURRENTLY ix_broadcast_auto_paused ON broadcast (id) "
            "WHERE auto_paused_at IS NOT NULL"
        )


def downgrade() -> None:
    op.execute(OLD_RULE)
    op.drop_index("ix_broadcast_auto_paused", table_name="broadcast")
    for column in COLUMNS:
        op.drop_column("broadcast", column)
    op.drop_column("channel", "auto_pause")

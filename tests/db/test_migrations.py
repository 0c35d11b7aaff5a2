"""The migrations build exactly the schema the models describe, and run down and up again."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from psycopg import sql

from shared.db import migrate
from shared.db.engine import libpq_url, make_engine
from shared.db.models import Base
from tests.conftest import ADMIN_URL, _drop_database


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_name": migrate.include_name})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


@pytest.fixture
def scratch_url(database_url: str) -> object:
    name = database_url.rsplit("/", 1)[1] + "_scratch"
    url = database_url.rsplit("/", 1)[0] + "/" + name
    yield url
    _drop_database(name)


def test_upgrade_creates_the_database_and_downgrade_undoes_it(scratch_url: str) -> None:
    migrate.upgrade(scratch_url)
    migrate.upgrade(scratch_url)  # a second run is a no-op
    with psycopg.connect(libpq_url(scratch_url)) as conn:
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert {
        "workspace",
        "api_token",
        "channel",
        "account",
        "contact",
        "tag",
        "contact_tag",
        "conversation",
        "media",
        "broadcast",
        "delivery",
        "alembic_version",
    } <= tables
    from alembic import command

    command.downgrade(migrate.alembic_config(scratch_url), "base")
    with psycopg.connect(libpq_url(scratch_url)) as conn:
        left = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert left <= {"alembic_version"}
    migrate.upgrade(scratch_url)


def test_due_pick_and_status_filter_use_indexes(database_url: str) -> None:
    with psycopg.connect(libpq_url(database_url)) as conn:
        conn.execute("SET enable_seqscan = off")
        due = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT id FROM broadcast WHERE status = 'pending' AND send_at <= now() "
                "ORDER BY send_at LIMIT 10 FOR UPDATE SKIP LOCKED"
            )
        )
        listing = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT id FROM broadcast WHERE workspace_id = 1 AND status IN ('pending', 'paused') "
                "ORDER BY id DESC LIMIT 50"
            )
        )
        by_tag = "\n".join(
            r[0]
            for r in conn.execute(
                sql.SQL("EXPLAIN SELECT contact_id FROM contact_tag WHERE tag_id = 1")
            )
        )
    # With sequential scans priced out, a plan still shows one only where no index serves.
    assert "ix_broadcast_due" in due
    assert "Seq Scan" not in listing
    assert "ix_contact_tag_tag_id_contact_id" in by_tag


def test_admin_url_points_at_a_server(database_url: str) -> None:
    with psycopg.connect(libpq_url(ADMIN_URL)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_tags_that_one_case_folding_makes_equal_are_merged_keeping_their_contacts(
    scratch_url: str,
) -> None:
    migrate.upgrade(scratch_url, "0005")
    with psycopg.connect(libpq_url(scratch_url), autocommit=True) as conn:
        ws = conn.execute(
            "INSERT INTO workspace (name, signing_key) VALUES ('w', 'k') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        ch = conn.execute(
            "INSERT INTO channel (workspace_id, name, kind, config, rate_limit_per_second) "
            "VALUES (%s, 'c', 'webhook', '{}', 1) RETURNING id",
            (ws,),
        ).fetchone()[0]  # type: ignore[index]
        acct = conn.execute(
            "INSERT INTO account (workspace_id, channel_id, name) VALUES (%s, %s, 'a') RETURNING id",
            (ws, ch),
        ).fetchone()[0]  # type: ignore[index]
        contacts = [
            conn.execute(
                "INSERT INTO contact (workspace_id, account_id, address) VALUES (%s, %s, %s) "
                "RETURNING id",
                (ws, acct, f"r-{i}"),
            ).fetchone()[0]  # type: ignore[index]
            for i in range(2)
        ]
        tags = [
            conn.execute(
                "INSERT INTO tag (workspace_id, name) VALUES (%s, %s) RETURNING id", (ws, name)
            ).fetchone()[0]  # type: ignore[index]
            for name in ("Straße", "STRASSE", "other")
        ]
        for contact, tag in zip(contacts, tags[:2], strict=True):
            conn.execute(
                "INSERT INTO contact_tag (contact_id, tag_id, workspace_id) VALUES (%s, %s, %s)",
                (contact, tag, ws),
            )
    migrate.upgrade(scratch_url)
    with psycopg.connect(libpq_url(scratch_url)) as conn:
        left = conn.execute("SELECT id, name, name_key FROM tag ORDER BY id").fetchall()
        linked = conn.execute("SELECT contact_id, tag_id FROM contact_tag ORDER BY 1").fetchall()
    assert left == [(tags[0], "Straße", "strasse"), (tags[2], "other", "other")]
    assert linked == [(contacts[0], tags[0]), (contacts[1], tags[0])]


def test_rows_of_the_older_schema_become_the_first_partition_and_keep_being_sent(
    scratch_url: str,
) -> None:
    from alembic import command

    from shared import delivery_partitions, delivery_store
    from shared.delivery_store import Record
    from shared.domain.lifecycle import DeliveryStatus

    migrate.upgrade(scratch_url, "0006")
    with psycopg.connect(libpq_url(scratch_url), autocommit=True) as conn:
        ws = one(conn, "INSERT INTO workspace (name, signing_key) VALUES ('w', 'k') RETURNING id")
        ch = one(
            conn,
            "INSERT INTO channel (workspace_id, name, kind, config, rate_limit_per_second) "
            "VALUES (%s, 'c', 'webhook', '{}', 1) RETURNING id",
            ws,
        )
        acct = one(
            conn,
            "INSERT INTO account (workspace_id, channel_id, name) VALUES (%s, %s, 'a') "
            "RETURNING id",
            ws,
            ch,
        )
        conn.execute(
            "INSERT INTO contact (workspace_id, account_id, address) "
            "SELECT %s, %s, 'r-' || g FROM generate_series(1, 6) AS g",
            (ws, acct),
        )
        sending, done = (
            one(
                conn,
                "INSERT INTO broadcast (workspace_id, name, channel_id, audience, content, "
                "send_at, status, started_at) VALUES (%s, %s, %s, '{}', '{}', now(), "
                "'in_progress', now()) RETURNING id",
                ws,
                name,
                ch,
            )
            for name in ("sending", "done")
        )
        conn.execute(
            "INSERT INTO delivery (workspace_id, broadcast_id, contact_id, address, status) "
            "SELECT %s, CASE WHEN c.n <= 4 THEN %s ELSE %s END, c.id, c.address, "
            "CASE WHEN c.n IN (1, 2, 5, 6) THEN 'sent' ELSE 'queued' END "
            "FROM (SELECT id, address, row_number() OVER (ORDER BY id) AS n FROM contact) AS c",
            (ws, sending, done),
        )
        conn.execute(
            "INSERT INTO delivery_batch (workspace_id, broadcast_id, first_id, last_id) "
            "SELECT %s, %s, min(id), max(id) FROM delivery WHERE broadcast_id = %s",
            (ws, sending, sending),
        )
        conn.execute("UPDATE broadcast SET snapshot_at = now()")
        before = conn.execute(
            "SELECT id, broadcast_id, status FROM delivery ORDER BY id"
        ).fetchall()
        counts = "SELECT id, status, total_count, sent_count FROM broadcast ORDER BY id"
        counted = conn.execute(counts).fetchall()
        assert [c[1] for c in counted] == ["in_progress", "completed"]

    migrate.upgrade(scratch_url)
    with psycopg.connect(libpq_url(scratch_url), autocommit=True) as conn:
        day = one(conn, "SELECT (now() AT TIME ZONE 'UTC')::date - 1")
        legacy = f"delivery_p{day:%Y%m%d}"
        assert one(conn, "SELECT relkind FROM pg_class WHERE relname = 'delivery'") == "p"
        moved = conn.execute(
            "SELECT id, broadcast_id, status, tableoid::regclass::text, part_day FROM delivery "
            "ORDER BY id"
        ).fetchall()
        assert [m[:3] for m in moved] == before
        assert {m[3:] for m in moved} == {(legacy, day)}
        assert conn.execute(counts).fetchall() == counted
        assert conn.execute("SELECT DISTINCT part_day FROM broadcast").fetchall() == [(day,)]
        assert conn.execute("SELECT part_day FROM delivery_batch").fetchall() == [(day,)]
        # No foreign keys, and the old table's indexes serve as the partition's: none twice
        # (the primary key, the unique key, the broadcast's rows by id and, since 0011, the
        # index of rows not reached, since 0015 a contact's rows).
        assert (
            one(
                conn,
                "SELECT count(*) FROM pg_constraint WHERE conrelid = to_regclass(%s) "
                "AND contype = 'f'",
                legacy,
            )
            == 0
        )
        assert (
            one(conn, "SELECT count(*) FROM pg_index WHERE indrelid = to_regclass(%s)", legacy) == 5
        )

        # What was being sent goes on: its rows are claimed and recorded, and it completes.
        batch_id = one(conn, "SELECT id FROM delivery_batch WHERE broadcast_id = %s", sending)
        conn.execute("UPDATE delivery_batch SET state = 'queued' WHERE id = %s", (batch_id,))
        batch = delivery_store.run(conn, delivery_store.claim_batch(batch_id, uuid4(), lease=30))
        assert batch is not None
        held = delivery_store.run(conn, delivery_store.claim(batch, 10))
        assert [h.id for h in held] == [
            b[0] for b in before if b[1] == sending and b[2] == "queued"
        ]
        delivery_store.run(
            conn,
            delivery_store.record(batch, [Record(h.id, DeliveryStatus.SENT) for h in held]),
        )
        assert conn.execute(counts).fetchall()[0][1:] == ("completed", 4, 4)
        # New rows go to new partitions, with ids after the old ones.
        delivery_store.run(conn, delivery_partitions.ensure_ahead(7))
        fresh = one(
            conn,
            "INSERT INTO broadcast (workspace_id, name, channel_id, audience, content, send_at, "
            "status, started_at) VALUES (%s, 'fresh', %s, '{}', '{}', now(), 'in_progress', "
            "now()) RETURNING id",
            ws,
            ch,
        )
        audience = delivery_store.Query("SELECT id, address, false, NULL::text FROM contact", {})
        assert (
            delivery_store.run(conn, delivery_store.snapshot(fresh, audience, batch_size=10)) == 6
        )
        new_ids = conn.execute(
            "SELECT id, tableoid::regclass::text FROM delivery WHERE broadcast_id = %s", (fresh,)
        ).fetchall()
        assert min(i for i, _ in new_ids) > max(b[0] for b in before)
        assert {t for _, t in new_ids} != {legacy}
        counted = conn.execute(counts).fetchall()

    command.downgrade(migrate.alembic_config(scratch_url), "0006")
    with psycopg.connect(libpq_url(scratch_url), autocommit=True) as conn:
        assert one(conn, "SELECT relkind FROM pg_class WHERE relname = 'delivery'") == "r"
        assert one(conn, "SELECT count(*) FROM delivery") == 12
        assert (
            one(
                conn,
                "SELECT count(*) FROM pg_constraint WHERE conrelid = 'delivery'::regclass "
                "AND contype = 'f'",
            )
            == 3
        )
        assert conn.execute(counts).fetchall() == counted
        # The counters follow the rows again.
        conn.execute("UPDATE delivery SET status = 'failed' WHERE broadcast_id = %s", (fresh,))
        assert conn.execute(counts).fetchall()[2][1:] == ("completed", 6, 0)
    migrate.upgrade(scratch_url)


def one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params or None).fetchone()
    assert row is not None
    return row[0]


def test_the_reason_and_index_migrations_keep_every_row_and_leave_valid_indexes_and_checks(
    scratch_url: str,
) -> None:
    """Migrations 0011 and 0012 on rows from before them (built one partition at a time, so
    that sends go on): every recipient not reached gets a reason, the CHECK is validated, the
    new indexes are valid on every partition and the old ones are gone.
    """
    from shared import delivery_partitions, delivery_store

    migrate.upgrade(scratch_url, "0010")
    with psycopg.connect(libpq_url(scratch_url), autocommit=True) as conn:
        made = delivery_store.run(conn, delivery_partitions.ensure_ahead(1, ahead=2))
        ws = one(conn, "INSERT INTO workspace (name, signing_key) VALUES ('w', 'k') RETURNING id")
        ch = one(
            conn,
            "INSERT INTO channel (workspace_id, name, kind, config, rate_limit_per_second) "
            "VALUES (%s, 'c', 'webhook', '{}', 1) RETURNING id",
            ws,
        )
        statuses = ["sent", "failed", "partial", "skipped", "canceled", "queued"]
        for partition in made[:2]:
            b = one(
                conn,
                "INSERT INTO broadcast (workspace_id, name, channel_id, audience, content, "
                "send_at, status, started_at, part_day) VALUES (%s, 'b', %s, '{}', '{}', now(), "
                "'canceled', now(), %s) RETURNING id",
                ws,
                ch,
                partition.first_day,
            )
            conn.execute(
                "INSERT INTO delivery (workspace_id, broadcast_id, contact_id, address, status, "
                "last_error, part_day) "
                "SELECT %s, %s, g, 'r-' || g, (%s::text[])[1 + g %% 6], "
                "CASE WHEN g %% 12 = 1 THEN 'HTTP 500' END, %s "
                "FROM generate_series(1, 120) AS g",
                (ws, b, statuses, partition.first_day),
            )
        before = conn.execute("SELECT id, status, last_error FROM delivery ORDER BY id").fetchall()

    migrate.upgrade(scratch_url)
    with psycopg.connect(libpq_url(scratch_url), autocommit=True) as conn:
        after = conn.execute("SELECT id, status, last_error FROM delivery ORDER BY id").fetchall()
        assert [r[:2] for r in after] == [r[:2] for r in before]
        expected = {
            "failed": "(no reason given)",
            "partial": "(no reason given)",
            "skipped": "(no reason given)",
            "canceled": "canceled before it was sent",
        }
        for (_, status, was), (_, _, now) in zip(before, after, strict=True):
            assert now == (was if was is not None else expected.get(status)), (status, was, now)
        assert conn.execute(
            "SELECT convalidated, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conname = 'ck_delivery_reason' AND conrelid = 'delivery'::regclass"
        ).fetchall() == [
            (
                True,
                "CHECK (((status <> ALL (ARRAY['failed'::text, 'partial'::text, "
                "'skipped'::text, 'canceled'::text])) OR (last_error IS NOT NULL)))",
            )
        ]
        parts = sorted(
            r[0]
            for r in conn.execute(
                "SELECT inhrelid::regclass::text FROM pg_inherits "
                "WHERE inhparent = 'delivery'::regclass"
            )
        )
        assert len(parts) >= 3
        for name in ("ix_delivery_broadcast_id_id", "ix_delivery_not_reached"):
            assert one(
                conn, "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", name
            )
            children = conn.execute(
                "SELECT x.indrelid::regclass::text FROM pg_inherits i "
                "JOIN pg_index x ON x.indexrelid = i.inhrelid "
                "WHERE i.inhparent = %s::regclass AND x.indisvalid",
                (name,),
            ).fetchall()
            assert sorted(c[0] for c in children) == parts
        for gone in ("ix_delivery_broadcast_id_status_id", "ix_delivery_lease_token_sending"):
            assert one(conn, "SELECT to_regclass(%s)", gone) is None
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE delivery SET status = 'canceled' WHERE status = 'queued'")

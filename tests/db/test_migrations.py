"""The migrations build exactly the schema the models describe, and run down and up again."""

from __future__ import annotations

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

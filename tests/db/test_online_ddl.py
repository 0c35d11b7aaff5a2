"""Schema changes to ``delivery`` that let sends go on: each waits a moment for a strong lock
and tries again, and a run cut short can be run again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from shared.db import online_ddl
from shared.db.engine import libpq_url, make_engine


@pytest.fixture
def bind(database_url: str) -> Iterator[sa.Connection]:
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as c:
            yield c.execution_options(isolation_level="AUTOCOMMIT")
    finally:
        engine.dispose()


def index_of(conn: psycopg.Connection[Any], name: str) -> list[tuple[Any, ...]]:
    """(partition, valid) of each partition's index attached to ``name``."""
    return conn.execute(
        "SELECT x.indrelid::regclass::text, x.indisvalid FROM pg_inherits i "
        "JOIN pg_index x ON x.indexrelid = i.inhrelid WHERE i.inhparent = %s::regclass "
        "ORDER BY 1",
        (name,),
    ).fetchall()


def test_a_strong_lock_is_waited_for_briefly_and_tried_again_until_it_is_free(
    bind: sa.Connection, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(online_ddl, "LOCK_TIMEOUT", "100ms")
    with psycopg.connect(libpq_url(database_url)) as reader:
        # What a send's transaction holds while it writes rows.
        reader.execute("LOCK TABLE delivery IN ROW EXCLUSIVE MODE")
        done = threading.Event()
        errors: list[BaseException] = []

        def build() -> None:
            try:
                online_ddl.create_index(bind, "ix_delivery_try_again", "address")
            except BaseException as error:  # reported below
                errors.append(error)
            finally:
                done.set()

        worker = threading.Thread(target=build)
        worker.start()
        with psycopg.connect(libpq_url(database_url), autocommit=True) as watch:
            deadline = time.monotonic() + 10
            while not watch.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'CREATE INDEX IF NOT EXISTS ix_delivery_try_again%'"
            ).fetchone():
                assert time.monotonic() < deadline, "the change never asked for its lock"
                time.sleep(0.01)
        # Waiting for its lock, the change gives up after a moment and tries again, so a
        # send that comes meanwhile is not queued behind it for long.
        with psycopg.connect(libpq_url(database_url)) as sender:
            sender.execute("SET lock_timeout = '2s'")
            sender.execute("LOCK TABLE delivery IN ROW EXCLUSIVE MODE")
            sender.rollback()
        assert not done.is_set()
        assert not errors
        reader.rollback()
        worker.join(10)
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        try:
            assert done.is_set()
            assert errors == []
            attached = index_of(conn, "ix_delivery_try_again")
            parts = conn.execute(
                "SELECT inhrelid::regclass::text FROM pg_inherits "
                "WHERE inhparent = 'delivery'::regclass ORDER BY 1"
            ).fetchall()
            assert attached == [(p[0], True) for p in parts]
        finally:
            # (Left behind, it would differ from the models.)
            conn.execute("DROP INDEX IF EXISTS ix_delivery_try_again")


def test_an_index_build_cut_short_is_finished_by_running_it_again(
    bind: sa.Connection, database_url: str
) -> None:
    parts = online_ddl.partitions(bind)
    assert len(parts) >= 2
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        # Cut short: the parent made, one partition's index attached, another's left invalid
        # (a concurrent build that failed), the rest not begun.
        conn.execute("CREATE INDEX ix_delivery_again ON ONLY delivery (address)")
        first = f"{parts[0]}_again"
        conn.execute(f"CREATE INDEX {first} ON {parts[0]} (address)")
        conn.execute(f"ALTER INDEX ix_delivery_again ATTACH PARTITION {first}")
        conn.execute(f"CREATE INDEX {parts[1]}_again ON {parts[1]} (address)")
        conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = %s::regclass",
            (f"{parts[1]}_again",),
        )
        try:
            online_ddl.create_index(bind, "ix_delivery_again", "address")
            assert index_of(conn, "ix_delivery_again") == [(p, True) for p in parts]
            assert conn.execute(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_delivery_again'::regclass"
            ).fetchone() == (True,)
        finally:
            conn.execute("DROP INDEX IF EXISTS ix_delivery_again")


def test_statements_are_run_as_written_a_percent_sign_included(
    bind: sa.Connection, database_url: str
) -> None:
    # (Given to the driver as a statement with parameters, "%b" would become "$1".)
    online_ddl.briefly(bind, "COMMENT ON TABLE delivery IS 'sent: 100% (%b, %s)'")
    try:
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            assert conn.execute(
                "SELECT obj_description('delivery'::regclass, 'pg_class')"
            ).fetchone() == ("sent: 100% (%b, %s)",)
    finally:
        online_ddl.briefly(bind, "COMMENT ON TABLE delivery IS NULL")

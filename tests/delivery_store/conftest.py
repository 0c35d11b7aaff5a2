"""Fixtures for the delivery store's tests: a task with a snapshot, and raw connections.

These tests run the store's operations directly against Postgres, with no process started.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from shared import delivery_store as store
from shared.db.engine import libpq_url
from tests.conftest import Api

LEASE = 30.0


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


@pytest.fixture
def connect(database_url: str) -> Iterator[Any]:
    """Open more autocommit connections (closed at the end), for races."""
    opened: list[psycopg.Connection[Any]] = []

    def make() -> psycopg.Connection[Any]:
        c = psycopg.connect(libpq_url(database_url), autocommit=True)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


@dataclass
class Task:
    """A broadcast being sent, its account and its contacts' ids in address order."""

    id: int
    account_id: int
    channel_id: int
    contacts: list[int]


#: What a copy records as the reason a contact is skipped (NULL: it is sent to), as
#: ``shared.domain.audience.skip_reason`` has it.
SKIP_REASON = (
    "CASE WHEN c.opted_out_at IS NOT NULL THEN 'skipped: contact opted out' "
    "WHEN c.unreachable_at IS NOT NULL "
    "THEN 'skipped: contact unreachable: ' || coalesce(c.unreachable_reason, '') END"
)


def audience(account_id: int) -> store.Query:
    """The simplest audience: every contact of one account who has not opted out."""
    return store.Query(
        f"SELECT c.id, c.address, {SKIP_REASON} FROM contact c "
        "WHERE c.account_id = %(acct)s AND c.opted_out_at IS NULL",
        {"acct": account_id},
    )


def new_task(
    api: Api,
    conn: psycopg.Connection[Any],
    n: int,
    *,
    rate: float = 100.0,
    snapshot: bool = True,
    batch_size: int = 500,
    auto_pause: dict[str, Any] | None = None,
    channel_auto_pause: dict[str, Any] | None = None,
) -> Task:
    """A broadcast to ``n`` contacts, moved to in_progress (and snapshotted) as the scheduler
    and the start of a dispatcher would; ``auto_pause`` its own, ``channel_auto_pause`` its
    channel's.
    """
    channel = api.channel(rate_limit_per_second=rate, auto_pause=channel_auto_pause)
    account = api.account(channel["id"])
    contacts = [
        r[0]
        for r in conn.execute(
            "INSERT INTO contact (workspace_id, account_id, address) "
            "SELECT %s, %s, 'addr-' || lpad(i::text, 5, '0') FROM generate_series(0, %s - 1) AS i "
            "RETURNING id",
            (api.workspace_id, account["id"], n),
        ).fetchall()
    ]
    b = api.broadcast(channel["id"], auto_pause=auto_pause)
    conn.execute(
        "UPDATE broadcast SET status = 'in_progress', started_at = now() WHERE id = %s",
        (b["id"],),
    )
    task = Task(b["id"], account["id"], channel["id"], contacts)
    if snapshot:
        store.run(conn, store.snapshot(task.id, audience(task.account_id), batch_size=batch_size))
    return task


def batches(conn: psycopg.Connection[Any], broadcast_id: int) -> list[tuple[Any, ...]]:
    """(id, state, first_id, last_id) of a task's batches, in order."""
    return conn.execute(
        "SELECT id, state, first_id, last_id FROM delivery_batch WHERE broadcast_id = %s "
        "ORDER BY id",
        (broadcast_id,),
    ).fetchall()


def run_batch(conn: psycopg.Connection[Any], broadcast_id: int, index: int = 0) -> store.Batch:
    """Hand out a task's ``index``-th batch (as the relay would) and claim it as a dispatcher
    would, under a fresh token.
    """
    batch_id = batches(conn, broadcast_id)[index][0]
    conn.execute(
        "UPDATE delivery_batch SET state = 'queued', published_at = now() "
        "WHERE id = %s AND state = 'ready'",
        (batch_id,),
    )
    batch = store.run(conn, store.claim_batch(batch_id, uuid.uuid4(), lease=LEASE))
    assert batch is not None
    return batch


def rows(conn: psycopg.Connection[Any], broadcast_id: int) -> dict[str, int]:
    """Delivery rows of a task by status."""
    return dict(
        conn.execute(
            "SELECT status, count(*) FROM delivery WHERE broadcast_id = %s GROUP BY status",
            (broadcast_id,),
        ).fetchall()
    )


def row_of(conn: psycopg.Connection[Any], table: str, row_id: int) -> dict[str, Any]:
    """One row of ``table`` (broadcast, delivery), by column name."""
    cur = conn.execute(f"SELECT * FROM {table} WHERE id = %s", (row_id,))
    names = [d.name for d in cur.description or []]
    row = cur.fetchone()
    assert row is not None
    return dict(zip(names, row, strict=True))


def task_row(conn: psycopg.Connection[Any], broadcast_id: int) -> dict[str, Any]:
    return row_of(conn, "broadcast", broadcast_id)


def assert_counters_match_rows(conn: psycopg.Connection[Any], broadcast_id: int) -> None:
    """The task's counters say exactly what its rows say."""
    by_status = rows(conn, broadcast_id)
    task = task_row(conn, broadcast_id)
    assert task["total_count"] == sum(by_status.values())
    for status in ("sent", "failed", "canceled", "skipped", "partial"):
        assert task[f"{status}_count"] == by_status.get(status, 0), status


def expire_lease(conn: psycopg.Connection[Any], batch_id: int) -> None:
    """The run of a batch stalled or died: its lease ran out a second ago."""
    conn.execute(
        "UPDATE delivery_batch SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (batch_id,),
    )


def lose_run(conn: psycopg.Connection[Any], batch_id: int, state: str) -> None:
    """The batch's run is lost without its rows coming back (what a claim racing a take-back
    left before claims locked their batch, or a dispatcher of an earlier version): the batch
    is ``state`` with no run, its rows held under a token nothing has.
    """
    conn.execute(
        "UPDATE delivery_batch SET state = %s, run_token = NULL, lease_expires_at = NULL "
        "WHERE id = %s",
        (state, batch_id),
    )

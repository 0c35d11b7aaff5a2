"""Sending windows: a recipient is claimed only while its own local window is open, and one
outside it waits, queued, until the window next opens; no attempt is used meanwhile.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from shared import delivery_store as store
from tests.conftest import Api
from tests.delivery_store.conftest import new_task, run_batch


def ask(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


@pytest.mark.parametrize(
    ("opens", "closes", "at", "is_open", "next_at"),
    [
        ("09:00", "20:00", "2027-01-04 08:59", False, "2027-01-04 09:00"),
        ("09:00", "20:00", "2027-01-04 09:00", True, "2027-01-04 09:00"),
        ("09:00", "20:00", "2027-01-04 20:00", False, "2027-01-05 09:00"),
        ("09:00", "20:00", "2027-01-04 23:30", False, "2027-01-05 09:00"),
        # Over midnight.
        ("22:00", "06:00", "2027-01-04 23:30", True, "2027-01-04 23:30"),
        ("22:00", "06:00", "2027-01-05 05:59", True, "2027-01-05 05:59"),
        ("22:00", "06:00", "2027-01-05 06:00", False, "2027-01-05 22:00"),
    ],
)
def test_a_window_is_open_or_opens_next_in_its_zone(
    conn: psycopg.Connection[Any], opens: str, closes: str, at: str, is_open: bool, next_at: str
) -> None:
    zone = "Asia/Kolkata"  # UTC+05:30, no clock changes
    moment = f"'{at}'::timestamp AT TIME ZONE '{zone}'"
    assert (
        ask(conn, f"SELECT bcast_window_open(%s, %s, %s, {moment})", zone, opens, closes) is is_open
    )
    expected = ask(conn, f"SELECT '{next_at}'::timestamp AT TIME ZONE '{zone}'")
    assert (
        ask(conn, f"SELECT bcast_window_next(%s, %s, %s, {moment})", zone, opens, closes)
        == expected
    )


def test_the_next_opening_on_a_day_the_clocks_change_is_that_day_s_local_time(
    conn: psycopg.Connection[Any],
) -> None:
    # Berlin, 2027-03-28: clocks jump 02:00 -> 03:00; 09:00 that day is 07:00 UTC.
    nxt = ask(
        conn,
        "SELECT bcast_window_next('Europe/Berlin', '09:00', '20:00', "
        "'2027-03-27 21:00+00'::timestamptz)",
    )
    assert nxt == datetime(2027, 3, 28, 7, 0, tzinfo=UTC)


def test_only_recipients_whose_window_is_open_are_claimed_the_others_wait_for_it(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 3)
    now = datetime.now(UTC)
    # A two-hour window around now in UTC: open for a contact in UTC (and one with no zone,
    # which takes the window's), closed for one twelve hours ahead.
    window = store.Window(
        start=(now - timedelta(hours=1)).time().replace(second=0, microsecond=0),
        end=(now + timedelta(hours=1)).time().replace(second=0, microsecond=0),
        zone="UTC",
    )
    conn.execute("UPDATE contact SET time_zone = 'UTC' WHERE id = %s", (task.contacts[0],))
    conn.execute("UPDATE contact SET time_zone = 'Etc/GMT-12' WHERE id = %s", (task.contacts[1],))
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 10, window))
    assert sorted(h.contact_id for h in held) == sorted([task.contacts[0], task.contacts[2]])
    assert store.run(conn, store.defer_to_window(batch, window)) == 1
    waiting = conn.execute(
        "SELECT contact_id, attempts, next_attempt_at, last_error FROM delivery "
        "WHERE broadcast_id = %s AND status = 'queued'",
        (task.id,),
    ).fetchall()
    [(contact_id, attempts, next_at, last_error)] = waiting
    assert (contact_id, attempts, last_error) == (task.contacts[1], 0, None)
    # It waits until its window opens in its own zone: then, and not before, it is open.
    assert now < next_at <= now + timedelta(hours=24)
    assert ask(
        conn,
        "SELECT bcast_window_open('Etc/GMT-12', %s, %s, %s)",
        window.start,
        window.end,
        next_at,
    )
    assert not ask(
        conn,
        "SELECT bcast_window_open('Etc/GMT-12', %s, %s, %s)",
        window.start,
        window.end,
        next_at - timedelta(minutes=1),
    )
    left = store.run(conn, store.progress(task.id, batch.first_id, batch.last_id, batch.part_day))
    assert (left.queued, left.due) == (1, 0)
    assert left.next_due_in is not None
    assert left.next_due_in > 0
    # Nothing left to defer, and without a window the same row is claimed at once.
    assert store.run(conn, store.defer_to_window(batch, window)) == 0
    conn.execute("UPDATE delivery SET next_attempt_at = NULL WHERE broadcast_id = %s", (task.id,))
    assert [h.contact_id for h in store.run(conn, store.claim(batch, 10))] == [task.contacts[1]]


def test_a_window_that_is_open_everywhere_defers_nobody(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 2)
    batch = run_batch(conn, task.id)
    # Open all day but for one minute starting a minute from now (a window over midnight).
    now = datetime.now(UTC)
    always = store.Window(
        start=(now + timedelta(minutes=2)).time().replace(second=0, microsecond=0),
        end=(now + timedelta(minutes=1)).time().replace(second=0, microsecond=0),
        zone="UTC",
    )
    assert store.run(conn, store.defer_to_window(batch, always)) == 0
    assert len(store.run(conn, store.claim(batch, 10, always))) == 2

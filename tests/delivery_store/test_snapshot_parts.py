"""A large audience is copied in parts: each part a transaction of its own whose batches may be
sent at once, the whole as if copied in one go (every recipient once, every queued row in one
batch), the task complete only after its last part, and a part cut short leaving nothing.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from services.dispatcher.snapshot import FIRST_PART, MAX_PARTS, PART, part_bounds
from shared import delivery_store as store
from shared.delivery_store import Copied, Record
from shared.domain.lifecycle import DeliveryStatus
from tests.conftest import Api
from tests.delivery_store.conftest import (
    Task,
    assert_counters_match_rows,
    audience,
    batches,
    new_task,
    rows,
    run_batch,
    task_row,
)


def part(
    conn: psycopg.Connection[Any], task: Task, upto: int | None, before: int = 0
) -> Copied | None:
    """The part of the copy up to contact id ``upto`` (None: the rest)."""
    return store.run(
        conn,
        store.snapshot_part(
            task.id, audience(task.account_id), batch_size=3, upto=upto, copied_before=before
        ),
    )


def copied_contacts(conn: psycopg.Connection[Any], task_id: int) -> list[int]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT contact_id FROM delivery WHERE broadcast_id = %s ORDER BY contact_id",
            (task_id,),
        ).fetchall()
    ]


def assert_batches_cover_every_queued_row_once(conn: psycopg.Connection[Any], task_id: int) -> None:
    queued = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM delivery WHERE broadcast_id = %s AND status = 'queued' ORDER BY id",
            (task_id,),
        ).fetchall()
    ]
    covered = [i for _, _, lo, hi in batches(conn, task_id) for i in queued if lo <= i <= hi]
    assert sorted(covered) == queued  # none left out, none in two batches
    for _, _, lo, hi in batches(conn, task_id):
        assert 1 <= sum(1 for i in queued if lo <= i <= hi) <= 3


@pytest.mark.parametrize(("n", "step"), [(7, 3), (6, 3), (5, 10), (4, 1)])
def test_parts_copy_every_recipient_once_in_contact_order_and_only_the_last_ends_the_copy(
    api: Api, conn: psycopg.Connection[Any], n: int, step: int
) -> None:
    task = new_task(api, conn, n, snapshot=False)
    # One contact opted out: the copy leaves it out (this audience's rule) ...
    conn.execute("UPDATE contact SET opted_out_at = now() WHERE id = %s", (task.contacts[1],))
    # ... and one is unreachable: copied as skipped, with the reason.
    conn.execute(
        "UPDATE contact SET unreachable_at = now(), unreachable_reason = 'gone' WHERE id = %s",
        (task.contacts[-1],),
    )
    expected = [c for c in task.contacts if c != task.contacts[1]]
    # Windows of ``step`` contacts, then the rest (a window may hold none of the audience).
    bounds: list[int | None] = [*task.contacts[step - 1 :: step], None]
    total = 0
    for i, upto in enumerate(bounds):
        got = part(conn, task, upto, total)
        low = bounds[i - 1] if i else None
        inside = [c for c in expected if (low is None or c > low) and (upto is None or c <= upto)]
        assert got == Copied(len(inside), done=upto is None)
        total += got.rows
        t = task_row(conn, task.id)
        # Until the last part the task has no snapshot_at, whatever was copied so far.
        assert (t["snapshot_at"] is not None) is got.done
        assert_batches_cover_every_queued_row_once(conn, task.id)
    assert copied_contacts(conn, task.id) == expected
    assert rows(conn, task.id) == {"queued": len(expected) - 1, "skipped": 1}
    t = task_row(conn, task.id)
    assert (t["audience_size"], t["total_count"]) == (len(expected), len(expected))
    assert_counters_match_rows(conn, task.id)
    # Copied whole: a part asked for again finds nothing to do.
    assert part(conn, task, None) is None
    assert copied_contacts(conn, task.id) == expected


def test_a_task_whose_copied_rows_are_all_sent_completes_only_after_its_last_part(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 5, snapshot=False)
    first = part(conn, task, task.contacts[2])
    assert first == Copied(3, done=False)
    # The first part's batch is handed out and every row of it sent ...
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 10))
    assert len(held) == 3
    store.run(conn, store.record(batch, [Record(h.id, DeliveryStatus.SENT) for h in held]))
    t = task_row(conn, task.id)
    # ... which is every row copied so far: still being sent, more to come.
    assert (t["status"], t["sent_count"], t["total_count"]) == ("in_progress", 3, 3)
    last = part(conn, task, None, 3)
    assert last == Copied(2, done=True)
    assert task_row(conn, task.id)["status"] == "in_progress"
    batch = run_batch(conn, task.id, 1)
    held = store.run(conn, store.claim(batch, 10))
    store.run(conn, store.record(batch, [Record(h.id, DeliveryStatus.SENT) for h in held]))
    t = task_row(conn, task.id)
    assert (t["status"], t["sent_count"], t["total_count"]) == ("completed", 5, 5)


def test_a_part_cut_short_leaves_nothing_and_the_next_goes_on_from_the_last_committed(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 7, snapshot=False)
    assert part(conn, task, task.contacts[2]) == Copied(3, done=False)
    # The next part dies before it commits (its dispatcher was killed).

    def killed_after_its_rows() -> None:
        with conn.transaction():
            op = store.snapshot_part(
                task.id, audience(task.account_id), batch_size=3, upto=task.contacts[5]
            )
            query = next(op)
            while True:
                cur = conn.execute(query.sql, query.params)
                if "INSERT INTO delivery_batch" in query.sql:
                    raise RuntimeError("killed")
                rows = cur.fetchall() if cur.description else []
                query = op.send(store.Result(rows, cur.rowcount))

    with pytest.raises(RuntimeError, match="killed"):
        killed_after_its_rows()
    assert copied_contacts(conn, task.id) == task.contacts[:3]
    assert len(batches(conn, task.id)) == 1
    # Started again, the copy goes on from there.
    assert part(conn, task, task.contacts[5], 3) == Copied(3, done=False)
    assert part(conn, task, None, 6) == Copied(1, done=True)
    assert copied_contacts(conn, task.id) == task.contacts
    assert_batches_cover_every_queued_row_once(conn, task.id)
    assert_counters_match_rows(conn, task.id)


def test_a_cancel_between_parts_cancels_what_was_copied_and_what_is_copied_after(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 5, snapshot=False)
    assert part(conn, task, task.contacts[1]) == Copied(2, done=False)
    store.run(conn, store.cancel(task.id))
    assert rows(conn, task.id) == {"canceled": 2}
    assert part(conn, task, task.contacts[3], 2) == Copied(2, done=False)
    assert part(conn, task, None, 4) == Copied(1, done=True)
    # Every recipient is on record, none left to be sent.
    assert rows(conn, task.id) == {"canceled": 5}
    t = task_row(conn, task.id)
    assert (t["status"], t["canceled_count"], t["total_count"]) == ("canceled", 5, 5)
    assert_counters_match_rows(conn, task.id)


def test_a_part_being_copied_elsewhere_is_not_copied_twice(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 4, snapshot=False)
    other = connect()
    with other.transaction():
        op = store.snapshot_part(
            task.id, audience(task.account_id), batch_size=3, upto=task.contacts[1]
        )
        query = next(op)
        cur = other.execute(query.sql, query.params)  # holds the copy's lock
        assert cur.fetchone() == (True,)
        # Meanwhile another dispatcher's part finds the copy taken and does nothing.
        assert part(conn, task, task.contacts[1]) is None
    assert copied_contacts(conn, task.id) == []
    assert part(conn, task, task.contacts[1]) == Copied(2, done=False)


def test_a_middle_part_marks_the_copy_alive_for_the_stall_sweep(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4, snapshot=False)
    conn.execute(
        "UPDATE broadcast SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", (task.id,)
    )
    assert part(conn, task, task.contacts[1]) == Copied(2, done=False)
    beat = conn.execute(
        "SELECT now() - heartbeat_at < interval '1 minute' FROM broadcast WHERE id = %s",
        (task.id,),
    ).fetchone()
    assert beat == (True,)


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [(1, 1_000_000, 1_000_000), (500, 80_500, 60_000), (1, 10**9, 1_000_000), (7, 7, 20_000)],
)
def test_part_bounds_cut_the_contact_ids_into_windows_of_about_a_part(
    low: int, high: int, expected: int
) -> None:
    bounds = part_bounds(low, high, expected)
    *windows, last = bounds
    assert last is None  # the rest: whatever lies past the last window
    ends = [b for b in windows if b is not None]
    assert ends == sorted(set(ends))
    assert all(low <= b < high for b in ends)
    assert len(bounds) <= MAX_PARTS + 1
    if len(ends) >= 2:
        # The first window is the smaller one, so sends start early.
        span = ends[1] - ends[0]
        assert ends[0] - low + 1 == max(1, span * FIRST_PART // PART)
        # Evenly spread, a window holds at most a part and more than half of one (unless
        # the copy is at its most parts).
        per_window = expected * span / (high - low + 1)
        if len(bounds) < MAX_PARTS + 1:
            assert PART / 2 < per_window <= PART * 1.001
        else:
            assert per_window >= PART


def test_a_small_audience_or_no_contacts_is_copied_in_one_part() -> None:
    assert part_bounds(1, 1_000_000, FIRST_PART) == [None]
    assert part_bounds(None, None, 50_000) == [None]

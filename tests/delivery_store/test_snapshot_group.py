"""Small audiences copied many at a time: one transaction, each broadcast once, each its own."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

from shared import delivery_store as store
from tests.conftest import Api
from tests.delivery_store.conftest import (
    SKIP_REASON,
    Task,
    assert_counters_match_rows,
    audience,
    batches,
    new_task,
    rows,
    task_row,
)
from tests.delivery_store.test_races import drive_rest, drive_until


def recipients(tasks: list[Task]) -> store.Query:
    """Every contact of each task's account who has not opted out, for each task."""
    return store.Query(
        f"SELECT t.b, c.id, c.address, {SKIP_REASON} "
        "FROM unnest(%(bs)s::bigint[], %(accts)s::bigint[]) AS t(b, acct) "
        "JOIN contact c ON c.account_id = t.acct AND c.opted_out_at IS NULL",
        {"bs": [t.id for t in tasks], "accts": [t.account_id for t in tasks]},
    )


def wait_for_lock(conn: psycopg.Connection[Any], waiting: psycopg.Connection[Any]) -> None:
    """Until ``waiting``'s backend waits for a lock another transaction holds."""
    deadline = time.monotonic() + 10
    while conn.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
        (waiting.info.backend_pid,),
    ).fetchone() != ("Lock",):
        assert time.monotonic() < deadline, "the other transaction never waited for the lock"
        time.sleep(0.01)


def group(tasks: list[Task], batch_size: int = 500) -> store.Op[dict[int, int]]:
    return store.snapshot_group([t.id for t in tasks], recipients(tasks), batch_size=batch_size)


def test_a_group_copies_each_audience_once_into_its_own_rows_and_batches(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    tasks = [new_task(api, conn, n, snapshot=False) for n in (1, 1, 3, 5)]
    assert store.run(conn, group(tasks, batch_size=2)) == {
        tasks[0].id: 1,
        tasks[1].id: 1,
        tasks[2].id: 3,
        tasks[3].id: 5,
    }
    for task, n in zip(tasks, (1, 1, 3, 5), strict=True):
        assert rows(conn, task.id) == {"queued": n}
        copied = conn.execute(
            "SELECT contact_id FROM delivery WHERE broadcast_id = %s ORDER BY id", (task.id,)
        ).fetchall()
        assert [r[0] for r in copied] == task.contacts
        cut = batches(conn, task.id)
        assert sum(hi - lo + 1 for _, _, lo, hi in cut) >= n
        assert [state for _, state, _, _ in cut] == ["ready"] * ((n + 1) // 2)
        t = task_row(conn, task.id)
        assert (t["total_count"], t["status"]) == (n, "in_progress")
        assert t["snapshot_at"] is not None
        assert_counters_match_rows(conn, task.id)
    # A second start message for the same group finds every copy made.
    assert store.run(conn, group(tasks)) == {}
    assert sum(len(batches(conn, t.id)) for t in tasks) == 1 + 1 + 2 + 3


def test_a_group_copies_only_the_tasks_being_sent(api: Api, conn: psycopg.Connection[Any]) -> None:
    sending, paused, canceled = (new_task(api, conn, 2, snapshot=False) for _ in range(3))
    conn.execute("UPDATE broadcast SET status = 'paused' WHERE id = %s", (paused.id,))
    conn.execute("UPDATE broadcast SET status = 'canceled' WHERE id = %s", (canceled.id,))
    assert store.run(conn, group([sending, paused, canceled])) == {sending.id: 2}
    for task in (paused, canceled):
        assert rows(conn, task.id) == {}
        assert task_row(conn, task.id)["snapshot_at"] is None


def test_a_task_whose_audience_is_all_unreachable_completes_in_its_group(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    reachable, unreachable = (
        new_task(api, conn, 1, snapshot=False),
        new_task(api, conn, 2, snapshot=False),
    )
    conn.execute(
        "UPDATE contact SET unreachable_at = now(), unreachable_reason = 'bot blocked' "
        "WHERE account_id = %s",
        (unreachable.account_id,),
    )
    assert store.run(conn, group([reachable, unreachable])) == {reachable.id: 1, unreachable.id: 2}
    assert rows(conn, unreachable.id) == {"skipped": 2}
    t = task_row(conn, unreachable.id)
    assert (t["status"], t["skipped_count"]) == ("completed", 2)
    assert batches(conn, unreachable.id) == []
    assert task_row(conn, reachable.id)["status"] == "in_progress"


def test_a_task_copied_alone_at_the_same_moment_is_left_to_that_copy(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    alone, other = new_task(api, conn, 3, snapshot=False), new_task(api, conn, 2, snapshot=False)
    copying = connect()
    with copying.transaction():
        single = store.snapshot(alone.id, audience(alone.account_id), batch_size=10)
        query = drive_until(copying, single, "INSERT INTO delivery ")
        # The single copy holds its broadcast: the group copies only the other one.
        assert store.run(conn, group([alone, other])) == {other.id: 2}
        assert drive_rest(copying, single, query) == 3
    for task, n in ((alone, 3), (other, 2)):
        assert rows(conn, task.id) == {"queued": n}
        assert len(batches(conn, task.id)) == 1
        assert_counters_match_rows(conn, task.id)


def test_a_cancel_waits_for_the_group_copy_and_then_cancels_its_rows(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 4, snapshot=False)
    copying, canceling = connect(), connect()
    done = threading.Event()
    with copying.transaction():
        op = group([task])
        query = drive_until(copying, op, "INSERT INTO delivery ")

        def cancel() -> None:
            store.run(canceling, store.cancel(task.id))
            done.set()

        # The group holds the task row (locked first): the cancel waits for the copy.
        thread = threading.Thread(target=cancel)
        thread.start()
        wait_for_lock(conn, canceling)
        assert not done.is_set()
        assert drive_rest(copying, op, query) == {task.id: 4}
    thread.join(timeout=10)
    assert done.is_set()
    assert rows(conn, task.id) == {"canceled": 4}
    t = task_row(conn, task.id)
    assert (t["status"], t["canceled_count"], t["total_count"]) == ("canceled", 4, 4)
    assert_counters_match_rows(conn, task.id)

"""A large audience is copied in parts: each part a transaction of its own whose batches may be
sent at once, the whole as if copied in one go (every recipient once, every queued row in one
batch), the task complete only after its last part, and a part cut short leaving nothing.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from shared import delivery_store as store
from shared.delivery_store import Copied, Record
from shared.domain.lifecycle import DeliveryStatus
from tests.conftest import Api
from tests.delivery_store.conftest import (
    SKIP_REASON,
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
    conn: psycopg.Connection[Any],
    task: Task,
    contacts: int | None,
    after: int | None = None,
    before: int = 0,
) -> Copied | None:
    """The part of the copy that reads the workspace's next ``contacts`` contacts from past
    ``after`` or the last one copied (None: the rest).
    """
    return store.run(
        conn,
        store.snapshot_part(
            task.id,
            audience(task.account_id),
            batch_size=3,
            contacts=contacts,
            after=after,
            copied_before=before,
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


@pytest.mark.parametrize(("n", "step"), [(7, 3), (6, 3), (5, 2), (4, 1), (3, 10)])
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
    # Windows of ``step`` contacts of the workspace (one may hold none of the audience), then
    # the rest.
    total, after, k = 0, None, 0
    while True:
        got = part(conn, task, step, after, total)
        assert got is not None
        window = task.contacts[k * step : (k + 1) * step]
        # A full window does not know it was the last: the part after it finds none left.
        more = len(window) == step
        inside = [c for c in expected if c in window]
        assert got == Copied(len(inside), done=not more, upto=window[-1] if more else None)
        total += got.rows
        t = task_row(conn, task.id)
        # Until the last part the task has no snapshot_at, whatever was copied so far.
        assert (t["snapshot_at"] is not None) is got.done
        assert_batches_cover_every_queued_row_once(conn, task.id)
        if got.done:
            break
        after, k = got.upto, k + 1
    assert k == len(task.contacts) // step
    assert copied_contacts(conn, task.id) == expected
    assert rows(conn, task.id) == {"queued": len(expected) - 1, "skipped": 1}
    t = task_row(conn, task.id)
    assert (t["audience_size"], t["total_count"]) == (len(expected), len(expected))
    assert_counters_match_rows(conn, task.id)
    # Copied whole: a part asked for again finds nothing to do.
    assert part(conn, task, step) is None
    assert copied_contacts(conn, task.id) == expected


def test_a_task_whose_copied_rows_are_all_sent_completes_only_after_its_last_part(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 5, snapshot=False)
    first = part(conn, task, 3)
    assert first == Copied(3, done=False, upto=task.contacts[2])
    # The first part's batch is handed out and every row of it sent ...
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 10))
    assert len(held) == 3
    store.run(conn, store.record(batch, [Record(h.id, DeliveryStatus.SENT) for h in held]))
    t = task_row(conn, task.id)
    # ... which is every row copied so far: still being sent, more to come.
    assert (t["status"], t["sent_count"], t["total_count"]) == ("in_progress", 3, 3)
    last = part(conn, task, 3, task.contacts[2], 3)
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
    assert part(conn, task, 3) == Copied(3, done=False, upto=task.contacts[2])
    # The next part dies before it commits (its dispatcher was killed).

    def killed_after_its_rows() -> None:
        with conn.transaction():
            op = store.snapshot_part(task.id, audience(task.account_id), batch_size=3, contacts=3)
            query = next(op)
            while True:
                cur = conn.execute(query.sql, query.params)
                if "INSERT INTO delivery " in query.sql:
                    raise RuntimeError("killed")
                rows = cur.fetchall() if cur.description else []
                query = op.send(store.Result(rows, cur.rowcount))

    with pytest.raises(RuntimeError, match="killed"):
        killed_after_its_rows()
    assert copied_contacts(conn, task.id) == task.contacts[:3]
    assert len(batches(conn, task.id)) == 1
    # Started again, the copy goes on from there.
    # Started again (a fresh copy, no window known): from the last contact copied.
    assert part(conn, task, 3, None, 3) == Copied(3, done=False, upto=task.contacts[5])
    assert part(conn, task, 3, task.contacts[5], 6) == Copied(1, done=True)
    assert copied_contacts(conn, task.id) == task.contacts
    assert_batches_cover_every_queued_row_once(conn, task.id)
    assert_counters_match_rows(conn, task.id)


def test_a_cancel_between_parts_ends_the_copy_with_what_was_copied_canceled(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 5, snapshot=False)
    assert part(conn, task, 2) == Copied(2, done=False, upto=task.contacts[1])
    store.run(conn, store.cancel(task.id))
    assert rows(conn, task.id) == {"canceled": 2}
    # The next part copies nothing more and ends the copy, as a cancel before it began would.
    assert part(conn, task, 2, task.contacts[1], 2) == Copied(0, done=True)
    assert rows(conn, task.id) == {"canceled": 2}
    t = task_row(conn, task.id)
    assert (t["status"], t["canceled_count"], t["total_count"]) == ("canceled", 2, 2)
    assert t["snapshot_at"] is not None
    assert_counters_match_rows(conn, task.id)
    assert part(conn, task, 2) is None


def test_a_part_being_copied_elsewhere_is_not_copied_twice(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 4, snapshot=False)
    other = connect()
    with other.transaction():
        op = store.snapshot_part(task.id, audience(task.account_id), batch_size=3, contacts=2)
        query = next(op)
        cur = other.execute(query.sql, query.params)  # holds the copy's lock
        assert cur.fetchone() == (True,)
        # Meanwhile another dispatcher's part finds the copy taken and does nothing.
        assert part(conn, task, 2) is None
    assert copied_contacts(conn, task.id) == []
    assert part(conn, task, 2) == Copied(2, done=False, upto=task.contacts[1])


def test_a_middle_part_marks_the_copy_alive_for_the_stall_sweep(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4, snapshot=False)
    conn.execute(
        "UPDATE broadcast SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", (task.id,)
    )
    assert part(conn, task, 2) == Copied(2, done=False, upto=task.contacts[1])
    beat = conn.execute(
        "SELECT now() - heartbeat_at < interval '1 minute' FROM broadcast WHERE id = %s",
        (task.id,),
    ).fetchone()
    assert beat == (True,)


def test_a_window_with_none_of_the_audience_is_passed_not_read_again(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 6, snapshot=False)
    conn.execute("UPDATE contact SET opted_out_at = now() WHERE id = ANY(%s)", (task.contacts[:3],))
    # The first window holds only contacts who opted out: nothing copied, the window known.
    first = part(conn, task, 3)
    assert first == Copied(0, done=False, upto=task.contacts[2])
    # The next part reads from past it (the rows copied say nothing of where it ended).
    assert part(conn, task, 3, first.upto) == Copied(3, done=False, upto=task.contacts[5])
    assert part(conn, task, 3, task.contacts[5], 3) == Copied(0, done=True)
    assert copied_contacts(conn, task.id) == task.contacts[3:]


def test_a_group_copy_leaves_out_a_broadcast_whose_copy_in_parts_began(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4, snapshot=False)
    assert part(conn, task, 2) == Copied(2, done=False, upto=task.contacts[1])
    cut = batches(conn, task.id)
    recipients = store.Query(
        f"SELECT %(b)s::bigint, c.id, c.address, {SKIP_REASON} FROM contact c "
        "WHERE c.account_id = %(acct)s AND c.opted_out_at IS NULL",
        {"b": task.id, "acct": task.account_id},
    )
    assert store.run(conn, store.snapshot_group([task.id], recipients, batch_size=3)) == {}
    # Its rows are not cut into batches again, nor its copy ended.
    assert batches(conn, task.id) == cut
    assert task_row(conn, task.id)["snapshot_at"] is None
    assert part(conn, task, 2, task.contacts[1], 2) == Copied(2, done=False, upto=task.contacts[3])

"""Counters and completion follow from row transitions, in one place, whatever path moves rows."""

from __future__ import annotations

from typing import Any

import psycopg

from shared import delivery_store as store
from shared.delivery_store import Record
from shared.domain.lifecycle import DeliveryStatus
from tests.conftest import Api
from tests.delivery_store.conftest import (
    assert_counters_match_rows,
    audience,
    batches,
    new_task,
    rows,
    run_batch,
    task_row,
)


def test_snapshot_copies_the_audience_once_and_cuts_it_into_batches(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 7, snapshot=False)
    copied = store.run(conn, store.snapshot(task.id, audience(task.account_id), batch_size=3))
    assert copied == 7
    assert rows(conn, task.id) == {"queued": 7}
    cut = batches(conn, task.id)
    assert [(state, hi - lo) for _, state, lo, hi in cut] == [
        ("ready", 2),
        ("ready", 2),
        ("ready", 0),
    ]
    assert store.run(conn, store.snapshot(task.id, audience(task.account_id), batch_size=3)) is None
    assert rows(conn, task.id) == {"queued": 7}
    assert len(batches(conn, task.id)) == 3
    t = task_row(conn, task.id)
    assert (t["total_count"], t["status"]) == (7, "in_progress")
    assert t["snapshot_at"] is not None


def test_unreachable_contacts_are_skipped_with_the_reason_and_a_task_of_only_them_completes(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 3, snapshot=False)
    conn.execute(
        "UPDATE contact SET unreachable_at = now(), unreachable_reason = 'bot blocked' "
        "WHERE account_id = %s",
        (task.account_id,),
    )
    store.run(conn, store.snapshot(task.id, audience(task.account_id), batch_size=10))
    assert rows(conn, task.id) == {"skipped": 3}
    reasons = {
        r[0]
        for r in conn.execute(
            "SELECT last_error FROM delivery WHERE broadcast_id = %s", (task.id,)
        ).fetchall()
    }
    assert reasons == {"skipped: contact unreachable: bot blocked"}
    t = task_row(conn, task.id)
    assert (t["status"], t["skipped_count"], t["total_count"]) == ("completed", 3, 3)
    assert t["finished_at"] is not None
    assert batches(conn, task.id) == []


def test_a_cancel_that_commits_during_the_copy_cancels_the_copied_rows(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 4, snapshot=False)
    copying = connect()
    with copying.transaction():
        op = store.snapshot(task.id, audience(task.account_id), batch_size=10)
        # Run the snapshot up to its copy ...
        query = next(op)
        while "INSERT INTO delivery " not in query.sql:
            cur = copying.execute(query.sql, query.params)
            query = op.send(store.Result(cur.fetchall() if cur.description else [], cur.rowcount))
        # ... the operator's cancel commits as the copy starts (it finds no rows yet) ...
        store.run(conn, store.cancel(task.id))
        # ... and the copy goes on.
        try:
            while True:
                cur = copying.execute(query.sql, query.params)
                query = op.send(
                    store.Result(cur.fetchall() if cur.description else [], cur.rowcount)
                )
        except StopIteration:
            pass
    assert rows(conn, task.id) == {"canceled": 4}
    t = task_row(conn, task.id)
    assert (t["status"], t["total_count"], t["canceled_count"]) == ("canceled", 4, 4)
    assert_counters_match_rows(conn, task.id)


def test_every_path_moves_the_counters_by_exactly_what_it_did(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 12)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 12))
    assert len(held) == 12
    assert_counters_match_rows(conn, task.id)
    assert task_row(conn, task.id)["sent_count"] == 0
    store.run(
        conn,
        store.record(
            batch,
            [
                Record(held[0].id, DeliveryStatus.SENT, provider_message_id="m-0"),
                Record(held[1].id, DeliveryStatus.SENT, provider_message_id="m-1"),
                Record(held[2].id, DeliveryStatus.FAILED, error="HTTP 400: no"),
                Record(held[3].id, DeliveryStatus.PARTIAL, error="part 2: refused", parts_done=1),
                Record(held[4].id, DeliveryStatus.QUEUED, error="HTTP 503", delay=60),
            ],
        ),
    )
    assert_counters_match_rows(conn, task.id)
    store.run(conn, store.release(batch, [held[5].id, held[6].id]))
    assert_counters_match_rows(conn, task.id)
    conn.execute("UPDATE contact SET opted_out_at = now() WHERE id = %s", (held[5].contact_id,))
    assert store.run(conn, store.skip_gone(batch)) == 1
    assert_counters_match_rows(conn, task.id)
    t = task_row(conn, task.id)
    assert (t["sent_count"], t["failed_count"], t["partial_count"], t["skipped_count"]) == (
        2,
        1,
        1,
        1,
    )
    assert t["status"] == "in_progress"


def test_the_last_final_row_completes_the_task_once(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 3)
    listener = connect()
    listener.execute("LISTEN bcast_broadcast")
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 3))
    store.run(conn, store.record(batch, [Record(held[0].id, DeliveryStatus.SENT)]))
    assert task_row(conn, task.id)["status"] == "in_progress"
    store.run(
        conn,
        store.record(
            batch,
            [Record(held[1].id, DeliveryStatus.SENT), Record(held[2].id, DeliveryStatus.FAILED)],
        ),
    )
    t = task_row(conn, task.id)
    assert (t["status"], t["sent_count"], t["failed_count"]) == ("completed", 2, 1)
    assert t["finished_at"] is not None
    heard = [n.payload for n in listener.notifies(timeout=1, stop_after=1)]
    assert heard == [f"{task.id}:completed"]


def test_a_paused_task_whose_rows_all_ended_completes_when_resumed(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 2)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 2))
    conn.execute("UPDATE broadcast SET status = 'paused' WHERE id = %s", (task.id,))
    # The calls already at the provider when the pause came are written afterwards.
    store.run(
        conn,
        store.record(batch, [Record(h.id, DeliveryStatus.SENT) for h in held]),
    )
    assert task_row(conn, task.id)["status"] == "paused"
    conn.execute("UPDATE broadcast SET status = 'in_progress' WHERE id = %s", (task.id,))
    assert task_row(conn, task.id)["status"] == "completed"


def test_deleting_rows_moves_the_counters_back(api: Api, conn: psycopg.Connection[Any]) -> None:
    task = new_task(api, conn, 3)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 3))
    store.run(conn, store.record(batch, [Record(held[0].id, DeliveryStatus.SENT)]))
    conn.execute("DELETE FROM delivery WHERE id = %s", (held[0].id,))
    assert_counters_match_rows(conn, task.id)
    assert task_row(conn, task.id)["total_count"] == 2


def test_a_deleted_contact_keeps_its_rows_and_every_count_but_not_its_address(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 3)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 3))
    store.run(conn, store.record(batch, [Record(held[0].id, DeliveryStatus.SENT)]))
    before = task_row(conn, task.id)
    conn.execute("DELETE FROM contact WHERE id = %s", (held[0].contact_id,))
    assert_counters_match_rows(conn, task.id)
    after = task_row(conn, task.id)
    assert (after["total_count"], after["sent_count"]) == (
        before["total_count"],
        before["sent_count"],
    )
    # The delete notes the erasure; its rows are erased by the next step (here, at once).
    noted = conn.execute(
        "SELECT count(*) FROM contact_erasure WHERE contact_id = %s", (held[0].contact_id,)
    ).fetchone()
    assert noted == (1,)
    assert store.run(conn, store.erase([held[0].contact_id])) == 1
    assert conn.execute(
        "SELECT address, status FROM delivery WHERE id = %s", (held[0].id,)
    ).fetchone() == ("(erased)", "sent")
    # Erasing again finds nothing left to change, and the note goes.
    assert store.run(conn, store.erase([held[0].contact_id])) == 0
    while store.run(conn, store.settle_erasures()).done:
        pass
    assert conn.execute(
        "SELECT count(*) FROM contact_erasure WHERE contact_id = %s", (held[0].contact_id,)
    ).fetchone() == (0,)


def test_one_statement_over_many_tasks_moves_each_task_by_its_own_rows(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    a, b = new_task(api, conn, 3), new_task(api, conn, 5)
    conn.execute(
        "UPDATE delivery SET status = 'failed', last_error = 'x' WHERE broadcast_id = ANY(%s)",
        ([a.id, b.id],),
    )
    assert (task_row(conn, a.id)["failed_count"], task_row(conn, b.id)["failed_count"]) == (3, 5)
    assert task_row(conn, a.id)["status"] == task_row(conn, b.id)["status"] == "completed"


def test_an_erasure_waits_for_an_audience_copy_that_began_before_it(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    from shared.delivery_store import SNAPSHOT_LOCK

    task = new_task(api, conn, 2)
    copying = connect()
    copying.autocommit = False
    # An audience copy under way (it holds its broadcast's copy lock), begun before the delete.
    copying.execute("SELECT pg_advisory_xact_lock(%s, %s)", (SNAPSHOT_LOCK, 999_999))
    conn.execute("DELETE FROM contact WHERE id = %s", (task.contacts[0],))
    settled = store.run(conn, store.settle_erasures())
    assert settled.rows == 1
    noted = "SELECT count(*) FROM contact_erasure WHERE contact_id = %s"
    assert conn.execute(noted, (task.contacts[0],)).fetchone() == (1,), "kept while it runs"
    copying.rollback()
    while store.run(conn, store.settle_erasures()).done:
        pass
    assert conn.execute(noted, (task.contacts[0],)).fetchone() == (0,)

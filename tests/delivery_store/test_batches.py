"""Batches: handed out within a window, run under a lease, given back, recovered exactly."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from shared import delivery_store as store
from shared.delivery_store import Record
from shared.domain.lifecycle import CANCELED_UNSURE_REASON, DeliveryStatus
from tests.conftest import Api
from tests.delivery_store.conftest import (
    LEASE,
    assert_counters_match_rows,
    batches,
    expire_lease,
    lose_run,
    new_task,
    rows,
    run_batch,
    task_row,
)
from tests.delivery_store.test_partitions import filed_task, partition_of, today

#: The relay's knobs as the scheduler sets them by default.
RELAY: dict[str, Any] = {"per_batch_rate": 500.0, "max_window": 16, "limit": 1000}


def relayed(conn: psycopg.Connection[Any], broadcast_id: int) -> list[int]:
    """Run the relay; return the ids of this task's batches it handed out."""
    return [b for b, t in store.run(conn, store.relay(**RELAY)) if t == broadcast_id]


def states(conn: psycopg.Connection[Any], broadcast_id: int) -> list[str]:
    return [b[1] for b in batches(conn, broadcast_id)]


def test_the_relay_hands_out_a_window_of_batches_sized_to_the_channel_rate(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    slow = new_task(api, conn, 50, rate=80, batch_size=5)
    fast = new_task(api, conn, 50, rate=4000, batch_size=5)
    handed = [t for _, t in store.run(conn, store.relay(**RELAY))]
    assert handed.count(slow.id) == 2, "80/s needs no more than the least window"
    assert handed.count(fast.id) == 8, "4000/s at 500/s a batch"
    handed = [t for _, t in store.run(conn, store.relay(**RELAY))]
    assert slow.id not in handed, "its window is full"
    assert fast.id not in handed, "its window is full"
    # A batch that leaves the window (done) makes room for exactly one more.
    batch = store.run(
        conn, store.claim_batch(batches(conn, slow.id)[0][0], uuid.uuid4(), lease=LEASE)
    )
    assert batch is not None
    store.run(conn, store.end_run(batch, done=True))
    assert len(relayed(conn, slow.id)) == 1
    assert states(conn, slow.id).count("ready") == 7


def test_the_relay_leaves_batches_of_a_paused_task_and_ones_not_yet_due(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 6, batch_size=2)
    # Only this task is being sent in this database from now on.
    conn.execute(
        "UPDATE broadcast SET status = 'canceled' WHERE status = 'in_progress' AND id <> %s",
        (task.id,),
    )
    conn.execute("UPDATE broadcast SET status = 'paused' WHERE id = %s", (task.id,))
    assert relayed(conn, task.id) == []
    conn.execute("UPDATE broadcast SET status = 'in_progress' WHERE id = %s", (task.id,))
    conn.execute(
        "UPDATE delivery_batch SET due_at = now() + interval '1 minute' WHERE broadcast_id = %s",
        (task.id,),
    )
    assert relayed(conn, task.id) == []
    wait = store.run(conn, store.next_relay_in())
    assert wait is not None
    assert 50 < wait <= 60
    # Due, but its window is full: the relay is woken when room is made, not by the clock.
    conn.execute("UPDATE delivery_batch SET due_at = now() WHERE broadcast_id = %s", (task.id,))
    assert len(relayed(conn, task.id)) == 2
    assert store.run(conn, store.next_relay_in()) is None


def test_the_relay_holds_back_a_channel_told_to_wait_or_booked_far_ahead(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    throttled = new_task(api, conn, 4, batch_size=2)
    booked = new_task(api, conn, 4, batch_size=2)
    conn.execute(
        "INSERT INTO channel_rate (channel_id, workspace_id, blocked_until) "
        "VALUES (%s, %s, now() + interval '40 seconds')",
        (throttled.channel_id, api.workspace_id),
    )
    conn.execute(
        "INSERT INTO channel_rate (channel_id, workspace_id, tat) "
        "VALUES (%s, %s, now() + interval '20 seconds')",
        (booked.channel_id, api.workspace_id),
    )
    handed = [t for _, t in store.run(conn, store.relay(**RELAY))]
    assert throttled.id not in handed
    assert booked.id not in handed
    conn.execute(
        "UPDATE broadcast SET status = 'canceled' WHERE status = 'in_progress' AND id <> ALL(%s)",
        ([throttled.id, booked.id],),
    )
    # The scheduler wakes when the first of them is free: booked, 2 s before its slots.
    wait = store.run(conn, store.next_relay_in())
    assert wait is not None
    assert 16 < wait <= 18
    conn.execute("UPDATE channel_rate SET tat = now() WHERE channel_id = %s", (booked.channel_id,))
    handed = [t for _, t in store.run(conn, store.relay(**RELAY))]
    assert handed.count(booked.id) == 2


def test_a_message_for_a_task_no_longer_sending_puts_its_batch_back_for_later(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 2)
    [batch_id] = relayed(conn, task.id)
    conn.execute("UPDATE broadcast SET status = 'paused' WHERE id = %s", (task.id,))
    assert store.run(conn, store.claim_batch(batch_id, uuid.uuid4(), lease=LEASE)) is None
    assert states(conn, task.id) == ["ready"]
    conn.execute("UPDATE broadcast SET status = 'in_progress' WHERE id = %s", (task.id,))
    assert relayed(conn, task.id) == [batch_id]


def test_a_run_that_must_wait_gives_its_batch_and_rows_back_until_it_is_due(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 3)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 3))
    store.run(conn, store.record(batch, [Record(held[0].id, DeliveryStatus.SENT)]))
    back, following = store.run(
        conn, store.end_run(batch, done=False, due_in=30, next_token=uuid.uuid4(), lease=LEASE)
    )
    assert back == 2
    assert following is None, "no other batch, and its own is not due"
    assert rows(conn, task.id) == {"sent": 1, "queued": 2}
    attempts = conn.execute(
        "SELECT attempts FROM delivery WHERE id = ANY(%s)", ([h.id for h in held[1:]],)
    ).fetchall()
    assert attempts == [(0,), (0,)]
    assert states(conn, task.id) == ["ready"]
    assert relayed(conn, task.id) == []


def test_a_finished_run_goes_on_with_the_next_due_batch_in_the_same_transaction(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4, batch_size=2)
    assert len(relayed(conn, task.id)) == 2, "the window: both batches in flight"
    first = run_batch(conn, task.id, 0)
    _, second = store.run(
        conn, store.end_run(first, done=True, next_token=uuid.uuid4(), lease=LEASE)
    )
    # The queued second batch is not 'ready': the run goes on with none, and the window
    # stays as it was.
    assert second is None
    more = new_task(api, conn, 6, batch_size=2)
    one = run_batch(conn, more.id, 0)
    _, two = store.run(conn, store.end_run(one, done=True, next_token=uuid.uuid4(), lease=LEASE))
    assert two is not None
    assert two.first_id > one.last_id
    assert states(conn, more.id) == ["done", "running", "ready"]
    # A run that is given back (not going on) takes nothing.
    _, none = store.run(conn, store.end_run(two, done=False))
    assert none is None


def test_a_run_that_ends_without_going_on_wakes_the_relay_when_a_batch_is_due(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    listener = connect()
    listener.execute("LISTEN bcast_batch")

    def woken() -> bool:
        return any(True for _ in listener.notifies(timeout=0.2, stop_after=1))

    task = new_task(api, conn, 6, batch_size=2)
    woken()  # the copy made ready batches; what follows is about the end of a run
    one = run_batch(conn, task.id, 0)
    two = run_batch(conn, task.id, 1)
    # Its time to go on is up (or it is stopping): the batch is done, the third one due,
    # and the relay must hear of it now, not at its next poll.
    store.run(conn, store.end_run(one, done=True))
    assert woken()
    # With no batch of the task left to hand out, the end of a run wakes nobody.
    three = run_batch(conn, task.id, 2)
    store.run(conn, store.end_run(two, done=True))
    assert not woken()
    store.run(conn, store.end_run(three, done=True))
    assert not woken()


def test_progress_tells_done_from_waiting(api: Api, conn: psycopg.Connection[Any]) -> None:
    task = new_task(api, conn, 3)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 3))
    store.run(
        conn,
        store.record(
            batch,
            [
                Record(held[0].id, DeliveryStatus.SENT),
                Record(held[1].id, DeliveryStatus.QUEUED, delay=20),
            ],
        ),
    )
    p = store.run(conn, store.progress(task.id, batch.first_id, batch.last_id, batch.part_day))
    assert (p.queued, p.due, p.sending) == (1, 0, 1)
    assert p.next_due_in is not None
    assert 15 < p.next_due_in <= 20
    store.run(conn, store.record(batch, [Record(held[2].id, DeliveryStatus.FAILED)]))
    conn.execute("UPDATE delivery SET next_attempt_at = now() WHERE id = %s", (held[1].id,))
    p = store.run(conn, store.progress(task.id, batch.first_id, batch.last_id, batch.part_day))
    assert (p.queued, p.due, p.sending, p.next_due_in) == (1, 1, 0, 0.0)


def test_the_sweeper_recovers_exactly_the_batches_of_dead_runs(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 6, batch_size=2)
    dead, alive, _ = (run_batch(conn, task.id, i) for i in range(3))
    store.run(conn, store.claim(dead, 2))
    store.run(conn, store.claim(alive, 2))
    expire_lease(conn, dead.id)
    taken = store.run(conn, store.take_back(republish_after=60))
    assert (taken.batches, taken.rows, taken.republished) == (1, 2, 0)
    assert states(conn, task.id) == ["ready", "running", "running"]
    assert rows(conn, task.id) == {"queued": 4, "sending": 2}
    # The attempt a dead run made may have reached the provider: it stays counted.
    attempts = conn.execute(
        "SELECT attempts FROM delivery WHERE id BETWEEN %s AND %s", (dead.first_id, dead.last_id)
    ).fetchall()
    assert attempts == [(1,), (1,)]
    assert store.run(conn, store.renew([dead, alive], lease=LEASE)) == {alive.id}


def test_rows_left_held_under_an_older_token_come_back_when_their_batch_is_taken(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 3)
    [batch_id] = relayed(conn, task.id)
    first = store.run(conn, store.claim_batch(batch_id, uuid.uuid4(), lease=LEASE))
    assert first is not None
    store.run(conn, store.claim(first, 3))
    sent = conn.execute(
        "SELECT min(id) FROM delivery WHERE broadcast_id = %s", (task.id,)
    ).fetchone()
    assert sent is not None
    store.run(conn, store.record(first, [Record(sent[0], DeliveryStatus.SENT)]))
    # The run lost its batch without its rows coming back (what a claim racing a take-back
    # left before claims locked their batch): two rows held under a token no batch has.
    lose_run(conn, batch_id, "queued")
    assert rows(conn, task.id) == {"sent": 1, "sending": 2}
    again = store.run(conn, store.claim_batch(batch_id, uuid.uuid4(), lease=LEASE))
    assert again is not None
    assert rows(conn, task.id) == {"sent": 1, "queued": 2}
    # The attempt the lost run made may have reached the provider: it stays counted.
    attempts = conn.execute(
        "SELECT attempts FROM delivery WHERE broadcast_id = %s AND status = 'queued'", (task.id,)
    ).fetchall()
    assert attempts == [(1,), (1,)]
    assert [c.attempts for c in store.run(conn, store.claim(again, 3))] == [2, 2]
    assert_counters_match_rows(conn, task.id)


def test_a_batch_whose_message_was_lost_is_handed_out_again(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 2)
    [batch_id] = relayed(conn, task.id)
    assert store.run(conn, store.take_back(republish_after=60)).republished == 0
    conn.execute(
        "UPDATE delivery_batch SET published_at = now() - interval '2 minutes' WHERE id = %s",
        (batch_id,),
    )
    assert store.run(conn, store.take_back(republish_after=60)).republished == 1
    assert relayed(conn, task.id) == [batch_id]


def test_a_run_that_could_not_write_some_results_keeps_those_rows_and_its_batch(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 3)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 3))
    back, _ = store.run(conn, store.end_run(batch, done=False, keep=[held[0].id]))
    assert back == 2
    assert rows(conn, task.id) == {"sending": 1, "queued": 2}
    assert states(conn, task.id) == ["running"], "the sweeper decides once the lease runs out"


def test_batches_of_finished_tasks_are_dropped(api: Api, conn: psycopg.Connection[Any]) -> None:
    done, going = new_task(api, conn, 2), new_task(api, conn, 2)
    store.run(conn, store.cancel(done.id))
    assert store.run(conn, store.drop_finished_batches()) >= 1
    assert batches(conn, done.id) == []
    assert len(batches(conn, going.id)) == 1


def settled(conn: psycopg.Connection[Any], broadcast_id: int) -> list[store.Stranded]:
    """Settle stranded rows (as a sweep does); what was settled of this task."""
    return [s for s in store.run(conn, store.settle_stranded()) if s.broadcast_id == broadcast_id]


def test_rows_left_held_when_a_run_goes_on_come_back_with_the_batch_it_takes(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4, batch_size=2)
    first, second = run_batch(conn, task.id, 0), run_batch(conn, task.id, 1)
    store.run(conn, store.claim(second, 2))
    lose_run(conn, second.id, "ready")
    held = store.run(conn, store.claim(first, 2))
    store.run(conn, store.record(first, [Record(h.id, DeliveryStatus.SENT) for h in held]))
    # The run finishes its batch and goes on with the next due one: the lost run's rows in it
    # come back in the same transaction, their attempt kept.
    _, going_on = store.run(
        conn, store.end_run(first, done=True, next_token=uuid.uuid4(), lease=LEASE)
    )
    assert going_on is not None
    assert going_on.id == second.id
    assert rows(conn, task.id) == {"sent": 2, "queued": 2}
    assert [c.attempts for c in store.run(conn, store.claim(going_on, 2))] == [2, 2]


def test_rows_left_held_in_a_done_batch_come_back_when_nothing_else_would_send_them(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4, batch_size=2)
    lost, last = run_batch(conn, task.id, 0), run_batch(conn, task.id, 1)
    held = store.run(conn, store.claim(lost, 2))
    store.run(conn, store.record(lost, [Record(held[0].id, DeliveryStatus.SENT)]))
    lose_run(conn, lost.id, "done")
    # While another run holds the task's last batch, nothing is stranded: it may yet finish.
    assert settled(conn, task.id) == []
    done = store.run(conn, store.claim(last, 2))
    store.run(conn, store.record(last, [Record(h.id, DeliveryStatus.SENT) for h in done]))
    store.run(conn, store.end_run(last, done=True))
    assert states(conn, task.id) == ["done", "done"]
    assert task_row(conn, task.id)["status"] == "in_progress", "one row held by nobody"

    assert settled(conn, task.id) == [store.Stranded(task.id, "in_progress", rows=1, batches=1)]
    assert states(conn, task.id) == ["ready", "done"]
    assert rows(conn, task.id) == {"sent": 3, "queued": 1}
    assert settled(conn, task.id) == [], "settled once"
    # Handed out again and sent, its attempt kept: the task completes.
    again = run_batch(conn, task.id, 0)
    [row] = store.run(conn, store.claim(again, 2))
    assert (row.id, row.attempts) == (held[1].id, 2)
    store.run(conn, store.record(again, [Record(row.id, DeliveryStatus.SENT)]))
    assert task_row(conn, task.id)["status"] == "completed"
    assert_counters_match_rows(conn, task.id)


def test_rows_left_held_in_a_canceled_task_are_canceled_before_its_batches_go(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4, batch_size=2)
    lost, running = run_batch(conn, task.id, 0), run_batch(conn, task.id, 1)
    store.run(conn, store.claim(lost, 2))
    store.run(conn, store.claim(running, 1))
    lose_run(conn, lost.id, "done")
    store.run(conn, store.cancel(task.id))
    assert rows(conn, task.id) == {"sending": 3, "canceled": 1}
    # The live run's row comes back with it: the task is left alone while it runs, and so
    # are its batches, even once the lease ran out (until the sweeper takes that run back).
    expire_lease(conn, running.id)
    assert settled(conn, task.id) == []
    store.run(conn, store.drop_finished_batches())
    assert states(conn, task.id) == ["done", "running"]
    taken = store.run(conn, store.take_back(republish_after=60))
    assert (taken.batches, taken.rows) == (1, 1)
    assert rows(conn, task.id) == {"sending": 2, "canceled": 2}

    assert settled(conn, task.id) == [store.Stranded(task.id, "canceled", rows=2, batches=0)]
    assert rows(conn, task.id) == {"canceled": 4}
    reasons = conn.execute(
        "SELECT DISTINCT last_error FROM delivery WHERE broadcast_id = %s AND id <= %s",
        (task.id, lost.last_id),
    ).fetchall()
    assert reasons == [(CANCELED_UNSURE_REASON,)]
    assert_counters_match_rows(conn, task.id)
    store.run(conn, store.drop_finished_batches())
    assert batches(conn, task.id) == []


def test_a_large_copy_takes_its_partitions_statistics_before_it_commits(
    api: Api, conn: psycopg.Connection[Any], connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner's estimates for a partition a copy just filled: a stale one reads a batch's
    rows through all of the broadcast's, or turns a claim's contact lookup into a scan.
    """
    monkeypatch.setattr(store, "ANALYZE_AFTER", 5)
    day = today(conn) - timedelta(days=7770)
    small = filed_task(api, conn, day, 4, status="in_progress")
    partition = partition_of(conn, small)

    def estimate() -> float:
        found = conn.execute(
            "SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (partition,)
        ).fetchone()
        assert found is not None
        return float(found[0])

    assert estimate() == -1, "a copy below the threshold leaves it unknown"
    filed_task(api, conn, day, 6, status="in_progress")
    assert estimate() == 10
    # An index being built on the partition holds the statistics' lock, and waits for the
    # copy's transaction: the copy goes on without them rather than close a cycle.
    building = connect()
    conn.execute("SET lock_timeout = '5s'")  # (a copy that waited would fail, not hang)
    with building.transaction():
        building.execute(f"LOCK TABLE {partition} IN SHARE UPDATE EXCLUSIVE MODE")
        filed_task(api, conn, day, 7, status="in_progress")
    assert estimate() == 10
    assert conn.execute("SELECT count(*) FROM delivery WHERE part_day = %s", (day,)).fetchone() == (
        17,
    )


def test_nothing_is_settled_in_the_normal_course_of_a_broadcast(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 6, batch_size=2)
    assert relayed(conn, task.id), "its messages on their way"
    assert settled(conn, task.id) == []
    # A retry waits for its time: its batch is ready again, due later.
    one = run_batch(conn, task.id, 0)
    first, retry = store.run(conn, store.claim(one, 2))
    store.run(
        conn,
        store.record(
            one,
            [
                Record(first.id, DeliveryStatus.SENT),
                Record(retry.id, DeliveryStatus.QUEUED, error="HTTP 503", delay=60),
            ],
        ),
    )
    store.run(conn, store.end_run(one, done=False, due_in=60))
    assert settled(conn, task.id) == []
    # A run that could not write a result keeps that row, and its batch, for the sweeper.
    two = run_batch(conn, task.id, 1)
    sent, unwritten = store.run(conn, store.claim(two, 2))
    store.run(conn, store.record(two, [Record(sent.id, DeliveryStatus.SENT)]))
    store.run(conn, store.end_run(two, done=False, keep=[unwritten.id]))
    assert settled(conn, task.id) == []
    # Paused, with its last batch done.
    three = run_batch(conn, task.id, 2)
    done = store.run(conn, store.claim(three, 2))
    store.run(conn, store.record(three, [Record(h.id, DeliveryStatus.SENT) for h in done]))
    store.run(conn, store.end_run(three, done=True))
    conn.execute("UPDATE broadcast SET status = 'paused' WHERE id = %s", (task.id,))
    assert settled(conn, task.id) == []
    assert rows(conn, task.id) == {"sent": 4, "queued": 1, "sending": 1}
    assert states(conn, task.id) == ["ready", "running", "done"]
    # Its only batch held by a run (here one that kept a row it could not write): that run
    # or the sweeper gives the row back, not this.
    alone = new_task(api, conn, 2)
    only = run_batch(conn, alone.id)
    sent, unwritten = store.run(conn, store.claim(only, 2))
    store.run(conn, store.record(only, [Record(sent.id, DeliveryStatus.SENT)]))
    store.run(conn, store.end_run(only, done=False, keep=[unwritten.id]))
    assert settled(conn, alone.id) == []
    assert rows(conn, alone.id) == {"sent": 1, "sending": 1}

"""Races between writers, played out on separate connections against the real database."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from typing import Any

import psycopg

from shared import delivery_store as store
from shared.delivery_store import Record
from shared.domain.lifecycle import DeliveryStatus
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


def drive_until(conn: psycopg.Connection[Any], op: store.Op[Any], marker: str) -> store.Query:
    """Run ``op``'s statements on ``conn`` up to (not including) the first containing
    ``marker``; return that statement.
    """
    query = next(op)
    while marker not in query.sql:
        cur = conn.execute(query.sql, query.params)
        query = op.send(store.Result(cur.fetchall() if cur.description else [], cur.rowcount))
    return query


def drive_rest(conn: psycopg.Connection[Any], op: store.Op[Any], query: store.Query) -> Any:
    try:
        while True:
            cur = conn.execute(query.sql, query.params)
            query = op.send(store.Result(cur.fetchall() if cur.description else [], cur.rowcount))
    except StopIteration as done:
        return done.value


def test_two_runs_on_one_range_never_hold_the_same_row(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 10)
    batch = run_batch(conn, task.id)
    one, two = connect(), connect()
    with one.transaction():
        first = store.run(one, store.claim(batch, 6))
        # A second claim while the first has not committed passes over the locked rows.
        with two.transaction():
            second = store.run(two, store.claim(batch, 6))
    assert len(first) == 6
    assert len(second) == 4
    assert not {r.id for r in first} & {r.id for r in second}
    # A run whose batch was taken over (another token) claims nothing at all.
    store.run(conn, store.release(batch, [r.id for r in first]))
    stale = dataclasses.replace(batch, token=uuid.uuid4())
    assert store.run(conn, store.claim(stale, 10)) == []


def test_a_batch_is_claimed_by_one_run_only(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 3)
    batch_id = batches(conn, task.id)[0][0]
    conn.execute("UPDATE delivery_batch SET state = 'queued' WHERE id = %s", (batch_id,))
    results: list[object] = []
    barrier = threading.Barrier(4)

    def claim() -> None:
        c = connect()
        barrier.wait()
        results.append(store.run(c, store.claim_batch(batch_id, uuid.uuid4(), lease=LEASE)))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1


def test_a_cancel_during_a_claim_leaves_nothing_stranded(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 5)
    batch = run_batch(conn, task.id)
    claiming, canceling = connect(), connect()
    done = threading.Event()
    with claiming.transaction():
        held = store.run(claiming, store.claim(batch, 3))

        def cancel() -> None:
            store.run(canceling, store.cancel(task.id))
            done.set()

        thread = threading.Thread(target=cancel)
        thread.start()
        # The cancel waits for the rows the claim is taking.
        assert not done.wait(0.5)
    thread.join(10)
    assert done.is_set()
    assert rows(conn, task.id) == {"sending": 3, "canceled": 2}
    # The run hears of the cancel before calling anyone and gives its rows back.
    store.run(conn, store.end_run(batch, done=False))
    assert rows(conn, task.id) == {"canceled": 5}
    assert len(held) == 3
    assert task_row(conn, task.id)["status"] == "canceled"
    assert_counters_match_rows(conn, task.id)


def test_a_cancel_that_commits_first_leaves_the_claim_nothing(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4)
    batch = run_batch(conn, task.id)
    store.run(conn, store.cancel(task.id))
    assert store.run(conn, store.claim(batch, 4)) == []
    assert rows(conn, task.id) == {"canceled": 4}


def test_a_result_write_and_a_cancel_at_once_neither_deadlock_nor_lose_a_count(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 40)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 20))
    writer, canceler = connect(), connect()
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def write() -> None:
        barrier.wait()
        for h in held:
            try:
                store.run(writer, store.record(batch, [Record(h.id, DeliveryStatus.SENT)]))
            except BaseException as exc:
                errors.append(exc)

    def cancel() -> None:
        barrier.wait()
        try:
            store.run(canceler, store.cancel(task.id))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=cancel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert rows(conn, task.id) == {"sent": 20, "canceled": 20}
    assert_counters_match_rows(conn, task.id)


def test_a_renewal_that_comes_too_late_loses_to_the_sweeper(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 2)
    batch = run_batch(conn, task.id)
    store.run(conn, store.claim(batch, 2))
    expire_lease(conn, batch.id)
    sweeper = connect()
    with sweeper.transaction():
        op = store.take_back(republish_after=60)
        query = drive_until(sweeper, op, "FOR UPDATE")
        # The sweeper has seen the lease run out; the renewal arrives now and waits ...
        renewed: list[set[int]] = []
        renewing = threading.Thread(
            target=lambda: renewed.append(store.run(connect(), store.renew([batch], lease=LEASE)))
        )
        drive_rest(sweeper, op, query)
        renewing.start()
    renewing.join(10)
    # ... and finds the batch no longer its own.
    assert renewed == [set()]
    assert rows(conn, task.id) == {"queued": 2}


def test_a_message_that_arrives_before_the_relay_commits_still_takes_its_batch(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 2)
    relaying, adopting = connect(), connect()
    taken: list[object] = []
    with relaying.transaction():
        # The relay marks the batch queued and publishes; before it commits, a dispatcher
        # already has the message.
        [(batch_id, _)] = [
            x
            for x in store.run(relaying, store.relay(per_batch_rate=500, max_window=16, limit=1000))
            if x[1] == task.id
        ]
        claim = threading.Thread(
            target=lambda: taken.append(
                store.run(adopting, store.claim_batch(batch_id, uuid.uuid4(), lease=LEASE))
            )
        )
        claim.start()
        claim.join(0.5)
        assert claim.is_alive(), "the claim waits for the relay's commit"
    claim.join(10)
    assert taken
    assert taken[0] is not None


def test_a_claim_waits_for_a_take_back_under_way_and_then_takes_nothing(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 4)
    batch = run_batch(conn, task.id)
    assert len(store.run(conn, store.claim(batch, 2))) == 2
    expire_lease(conn, batch.id)
    sweeper = connect()
    claimed: list[list[store.Claimed]] = []
    with sweeper.transaction():
        op = store.take_back(republish_after=60)
        query = drive_until(sweeper, op, "lease_expires_at = NULL")
        # The sweeper holds the dead batch; the stalled run wakes and claims its next rows.
        claiming = threading.Thread(
            target=lambda: claimed.append(store.run(connect(), store.claim(batch, 2)))
        )
        claiming.start()
        claiming.join(0.5)
        assert claiming.is_alive(), "the claim waits for the take-back"
        drive_rest(sweeper, op, query)
    claiming.join(10)
    assert claimed == [[]]
    assert rows(conn, task.id) == {"queued": 4}, "no row is left held by the lost run"


def test_a_sweep_skips_a_batch_a_claim_holds_and_takes_it_back_with_its_rows_next_time(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    task = new_task(api, conn, 4)
    batch = run_batch(conn, task.id)
    expire_lease(conn, batch.id)
    claiming = connect()
    with claiming.transaction():
        # A stalled run's claim is under way (its transaction not yet committed): the sweep
        # does not wait for it, nor take the batch from under it.
        assert len(store.run(claiming, store.claim(batch, 2))) == 2
        skipped = store.run(conn, store.take_back(republish_after=60))
        assert (skipped.batches, skipped.rows) == (0, 0)
    assert rows(conn, task.id) == {"queued": 2, "sending": 2}
    taken = store.run(conn, store.take_back(republish_after=60))
    assert (taken.batches, taken.rows) == (1, 2)
    assert rows(conn, task.id) == {"queued": 4}
    assert [b[1] for b in batches(conn, task.id)] == ["ready"]


def waiting_for_a_lock(conn: psycopg.Connection[Any], pid: int) -> bool:
    found = conn.execute(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    return bool(found and found[0])


def test_a_sweep_and_a_claim_that_gives_back_an_older_runs_rows_do_not_deadlock(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    """A claim locks its batch, then its task (to give back rows an older run left held); a
    sweep taking back a dead batch of the same task while handing out a lost message for that
    batch must not hold the task while it waits for the batch.
    """
    task = new_task(api, conn, 4, batch_size=2)
    dead, lost = run_batch(conn, task.id, 0), run_batch(conn, task.id, 1)
    store.run(conn, store.claim(lost, 2))
    expire_lease(conn, dead.id)
    # The second batch's message was lost after its run lost it with two rows held.
    conn.execute(
        "UPDATE delivery_batch SET state = 'queued', run_token = NULL, lease_expires_at = NULL, "
        "published_at = now() - interval '2 minutes' WHERE id = %s",
        (lost.id,),
    )
    claiming, sweeping = connect(), connect()
    swept: list[Any] = []
    with claiming.transaction():
        op = store.claim_batch(lost.id, uuid.uuid4(), lease=LEASE)
        query = drive_until(claiming, op, "SELECT status FROM broadcast")
        sweep = threading.Thread(
            target=lambda: swept.append(store.run(sweeping, store.take_back(republish_after=60)))
        )
        sweep.start()
        deadline = time.monotonic() + 10
        while not waiting_for_a_lock(conn, sweeping.info.backend_pid):
            assert time.monotonic() < deadline, "the sweep never waited for the claimed batch"
            time.sleep(0.01)
        # The claim goes on to lock the task: the sweep holds nothing it needs.
        taken = drive_rest(claiming, op, query)
    sweep.join(10)
    assert taken is not None
    assert len(swept) == 1
    assert (swept[0].batches, swept[0].republished) == (1, 0)
    assert rows(conn, task.id) == {"queued": 4}


def test_a_sweep_never_waits_for_a_batch_a_claim_holds(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    """The sweep holds the tasks it settles while it drops batches; a claim holding one of
    those batches may be about to lock its task (to give back an older run's rows): the
    sweep skips that batch rather than wait for it.
    """
    task = new_task(api, conn, 4, batch_size=2)
    lost = run_batch(conn, task.id, 1)
    store.run(conn, store.claim(lost, 2))
    lose_run(conn, lost.id, "queued")
    claiming, sweeping = connect(), connect()
    swept: list[Any] = []

    def sweep() -> None:
        with sweeping.transaction():
            store.run(sweeping, store.take_back(republish_after=60))
            swept.append(store.run(sweeping, store.settle_stranded()))
            store.run(sweeping, store.drop_finished_batches())

    with claiming.transaction():
        op = store.claim_batch(lost.id, uuid.uuid4(), lease=LEASE)
        query = drive_until(claiming, op, "SELECT status FROM broadcast")
        # The operator cancels meanwhile, and a sweep comes.
        store.run(conn, store.cancel(task.id))
        sweeper = threading.Thread(target=sweep)
        sweeper.start()
        sweeper.join(10)
        assert not sweeper.is_alive(), "the sweep waited for the claimed batch"
        taken = drive_rest(claiming, op, query)
    assert taken is not None
    assert [(s.status, s.rows) for s in swept[0] if s.broadcast_id == task.id] == [("canceled", 2)]
    assert rows(conn, task.id) == {"canceled": 4}
    assert [b[0] for b in batches(conn, task.id)] == [lost.id], "the claimed batch stays"

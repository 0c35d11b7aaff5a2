"""The partitions of the delivery rows: made ahead and on demand, once, and removed past
retention only when every broadcast in them is final; counters stay exact throughout.
"""

from __future__ import annotations

import itertools
import threading
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from shared import delivery_partitions as partitions
from shared import delivery_store as store
from shared.delivery_partitions import Action, Partition, State, fit
from tests.conftest import Api
from tests.delivery_store.conftest import (
    Task,
    assert_counters_match_rows,
    audience,
    new_task,
    rows,
    task_row,
)

WIDTH = 7


def today(conn: psycopg.Connection[Any]) -> date:
    return store.run(conn, partitions.today())


def listed(conn: psycopg.Connection[Any]) -> dict[str, Partition]:
    return {p.name: p for p in store.run(conn, partitions.listing())}


def holding(conn: psycopg.Connection[Any], day: date) -> Partition | None:
    found = [
        p
        for p in listed(conn).values()
        if p.state == State.ATTACHED and p.first_day <= day < p.end_day
    ]
    assert len(found) <= 1
    return found[0] if found else None


def filed_task(
    api: Api, conn: psycopg.Connection[Any], day: date, n: int, *, status: str = "completed"
) -> Task:
    """A broadcast to ``n`` contacts whose audience was copied on ``day``, now ``status``."""
    task = new_task(api, conn, n, snapshot=False)
    conn.execute("UPDATE broadcast SET part_day = %s WHERE id = %s", (day, task.id))
    store.run(conn, partitions.ensure(day, WIDTH))
    store.run(conn, store.snapshot(task.id, audience(task.account_id), batch_size=500))
    conn.execute("UPDATE broadcast SET status = %s WHERE id = %s", (status, task.id))
    return task


def partition_of(conn: psycopg.Connection[Any], task: Task) -> str:
    found = conn.execute(
        "SELECT DISTINCT tableoid::regclass::text FROM delivery WHERE broadcast_id = %s",
        (task.id,),
    ).fetchall()
    assert len(found) == 1, found
    return str(found[0][0])


def attached(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_inherits WHERE inhparent = 'delivery'::regclass "
        "AND inhrelid = to_regclass(%s)",
        (name,),
    ).fetchone()
    return row is not None


def exists(conn: psycopg.Connection[Any], name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() != (None,)


# --- the range of a new partition ------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "width", "taken", "expected"),
    [
        # Aligned on Mondays: 2026-11-26 is a Thursday.
        (date(2026, 11, 26), 7, [], (date(2026, 11, 23), date(2026, 11, 30))),
        (date(2026, 11, 23), 7, [], (date(2026, 11, 23), date(2026, 11, 30))),
        (date(2026, 11, 29), 7, [], (date(2026, 11, 23), date(2026, 11, 30))),
        (date(2026, 11, 26), 1, [], (date(2026, 11, 26), date(2026, 11, 27))),
        # Cut short by neighbours (a first partition of one day, then a width that changed).
        (
            date(2026, 11, 26),
            7,
            [(date(2026, 11, 25), date(2026, 11, 26))],
            (date(2026, 11, 26), date(2026, 11, 30)),
        ),
        (
            date(2026, 11, 26),
            7,
            [(date(2026, 11, 20), date(2026, 11, 25)), (date(2026, 11, 28), date(2026, 12, 5))],
            (date(2026, 11, 25), date(2026, 11, 28)),
        ),
        # Neighbours that do not touch the period change nothing.
        (
            date(2026, 11, 26),
            7,
            [(date(2026, 11, 1), date(2026, 11, 8)), (date(2026, 12, 7), date(2026, 12, 14))],
            (date(2026, 11, 23), date(2026, 11, 30)),
        ),
    ],
)
def test_a_new_partition_covers_its_aligned_period_without_overlapping(
    day: date, width: int, taken: list[tuple[date, date]], expected: tuple[date, date]
) -> None:
    assert fit(day, width, taken) == expected


# --- making ----------------------------------------------------------------------------------


def test_partitions_are_made_ahead_once(conn: psycopg.Connection[Any]) -> None:
    ahead = store.run(conn, partitions.ensure_ahead(WIDTH))
    day = today(conn)
    assert len(ahead) == partitions.PARTITIONS_AHEAD + 1
    assert ahead[0].first_day <= day < ahead[0].end_day
    for before, after in itertools.pairwise(ahead):
        assert after.first_day == before.end_day
    assert all(attached(conn, p.name) for p in ahead)
    assert store.run(conn, partitions.ensure_ahead(WIDTH)) == ahead


def test_a_partition_is_made_on_demand_for_its_day(api: Api, conn: psycopg.Connection[Any]) -> None:
    day = today(conn) - timedelta(days=2000)
    assert holding(conn, day) is None
    task = filed_task(api, conn, day, 3, status="in_progress")
    made = holding(conn, day)
    assert made is not None
    assert partition_of(conn, task) == made.name
    assert task_row(conn, task.id)["total_count"] == 3


def test_concurrent_makers_make_one_partition(connect: Any, conn: psycopg.Connection[Any]) -> None:
    day = today(conn) - timedelta(days=2100)
    makers = [connect() for _ in range(6)]
    start = threading.Barrier(len(makers))
    made: list[Partition] = []
    failed: list[BaseException] = []

    def make(c: psycopg.Connection[Any]) -> None:
        start.wait()
        try:
            made.append(store.run(c, partitions.ensure(day, WIDTH)))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=make, args=(c,)) for c in makers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == []
    assert len({p.name for p in made}) == 1
    assert [p.name for p in listed(conn).values() if p.first_day <= day < p.end_day] == [
        made[0].name
    ]


# --- counters across partitions --------------------------------------------------------------


def test_counters_stay_exact_for_statements_over_several_partitions(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    a = filed_task(api, conn, today(conn) - timedelta(days=2200), 3, status="in_progress")
    b = new_task(api, conn, 5)
    assert partition_of(conn, a) != partition_of(conn, b)
    both = [a.id, b.id]
    conn.execute(
        "UPDATE delivery SET status = 'sent' WHERE broadcast_id = ANY(%s) AND contact_id = ANY(%s)",
        (both, [a.contacts[0], b.contacts[0], b.contacts[1]]),
    )
    conn.execute(
        "UPDATE delivery SET status = 'failed', last_error = 'x' WHERE broadcast_id = ANY(%s) AND status = 'queued' "
        "AND contact_id = ANY(%s)",
        (both, [a.contacts[1], b.contacts[2]]),
    )
    conn.execute(
        "DELETE FROM delivery WHERE broadcast_id = ANY(%s) AND contact_id = ANY(%s)",
        (both, [a.contacts[2], b.contacts[4]]),
    )
    for task, expected in ((a, (2, 1, 1)), (b, (4, 2, 1))):
        assert_counters_match_rows(conn, task.id)
        t = task_row(conn, task.id)
        assert (t["total_count"], t["sent_count"], t["failed_count"]) == expected


def test_a_deleted_broadcast_s_rows_are_removed_in_steps(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    while store.run(conn, store.purge_step()) is not None:
        pass  # what other tests left
    task, kept = new_task(api, conn, 5), new_task(api, conn, 2)
    conn.execute("DELETE FROM broadcast WHERE id = %s", (task.id,))
    # The delete itself is quick: the rows wait for the purge.
    assert sum(rows(conn, task.id).values()) == 5
    steps = []
    while (step := store.run(conn, store.purge_step(limit=2))) is not None:
        steps.append(step)
    assert steps == [2, 2, 1]
    assert rows(conn, task.id) == {}
    assert sum(rows(conn, kept.id).values()) == 2
    assert conn.execute("SELECT count(*) FROM delivery_purge").fetchone() == (0,)


# --- retention -------------------------------------------------------------------------------


def test_retention_removes_only_old_partitions_whose_broadcasts_are_all_final(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    day = today(conn)
    old = filed_task(api, conn, day - timedelta(days=3000), 4, status="completed")
    canceled = filed_task(api, conn, day - timedelta(days=3000), 2, status="canceled")
    held = filed_task(api, conn, day - timedelta(days=2900), 3, status="paused")
    held_done = filed_task(api, conn, day - timedelta(days=2900), 1, status="completed")
    recent = filed_task(api, conn, day - timedelta(days=20), 2, status="completed")
    old_part, held_part = partition_of(conn, old), partition_of(conn, held)
    recent_part = partition_of(conn, recent)
    assert old_part == partition_of(conn, canceled)
    counts_before = {t.id: task_row(conn, t.id)["total_count"] for t in (old, canceled, held)}

    done = {
        r.partition.name: r
        for r in partitions.prune(conn, retention_days=30, archive=False)
        if r.partition.name in {old_part, held_part, recent_part}
    }

    assert done.keys() == {old_part, held_part}
    assert (done[old_part].action, done[old_part].rows, done[old_part].broadcasts) == (
        Action.DROPPED,
        6,
        2,
    )
    assert (done[held_part].action, done[held_part].unfinished) == (Action.HELD, 1)
    assert not exists(conn, old_part)
    assert attached(conn, held_part)
    assert attached(conn, recent_part)
    assert rows(conn, old.id) == {}
    assert rows(conn, held.id) == {"queued": 3}
    # The counts stay; the broadcasts whose rows went say when.
    for t in (old, canceled, held):
        assert task_row(conn, t.id)["total_count"] == counts_before[t.id]
    assert task_row(conn, old.id)["recipients_removed_at"] is not None
    assert task_row(conn, canceled.id)["recipients_removed_at"] is not None
    assert task_row(conn, held.id)["recipients_removed_at"] is None
    assert task_row(conn, held_done.id)["recipients_removed_at"] is None
    assert task_row(conn, recent.id)["recipients_removed_at"] is None


def test_a_partition_is_past_retention_once_its_last_day_is_that_many_days_back(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = filed_task(api, conn, today(conn) - timedelta(days=3100), 1)
    name = partition_of(conn, task)
    p = listed(conn)[name]
    # Its last day lies exactly this many days back.
    back = (today(conn) - (p.end_day - timedelta(days=1))).days
    assert name not in {
        r.partition.name for r in partitions.prune(conn, retention_days=back, archive=False)
    }
    assert attached(conn, name)
    removed = [
        r
        for r in partitions.prune(conn, retention_days=back - 1, archive=False)
        if r.partition.name == name
    ]
    assert [r.action for r in removed] == [Action.DROPPED]
    assert not exists(conn, name)


def test_no_retention_keeps_every_partition(api: Api, conn: psycopg.Connection[Any]) -> None:
    task = filed_task(api, conn, today(conn) - timedelta(days=3200), 1)
    assert partitions.prune(conn, retention_days=0, archive=False) == []
    assert attached(conn, partition_of(conn, task))


def test_a_dry_run_says_what_would_go_and_changes_nothing(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = filed_task(api, conn, today(conn) - timedelta(days=3300), 2)
    name = partition_of(conn, task)
    said = [
        r
        for r in partitions.prune(conn, retention_days=30, archive=False, dry_run=True)
        if r.partition.name == name
    ]
    assert [(r.action, r.rows) for r in said] == [(Action.DROPPED, 2)]
    assert attached(conn, name)
    assert rows(conn, task.id) == {"queued": 2}
    assert task_row(conn, task.id)["recipients_removed_at"] is None


def test_archive_mode_detaches_and_keeps_the_rows(api: Api, conn: psycopg.Connection[Any]) -> None:
    task = filed_task(api, conn, today(conn) - timedelta(days=3400), 3)
    name = partition_of(conn, task)
    first_day = listed(conn)[name].first_day
    done = [
        r
        for r in partitions.prune(conn, retention_days=30, archive=True)
        if r.partition.name == name
    ]
    assert [(r.action, r.rows) for r in done] == [(Action.ARCHIVED, 3)]
    archive = partitions.archive_name(first_day)
    assert not exists(conn, name)
    assert not attached(conn, archive)
    assert rows(conn, task.id) == {}
    kept = conn.execute(
        f"SELECT count(*) FROM {archive} WHERE broadcast_id = %s", (task.id,)
    ).fetchone()
    assert kept == (3,)
    assert listed(conn)[archive].state == State.ARCHIVED
    assert task_row(conn, task.id)["total_count"] == 3
    # An archive is never pruned again, nor in the way of a new partition for its days.
    assert archive not in {
        r.partition.name for r in partitions.prune(conn, retention_days=30, archive=False)
    }
    assert exists(conn, archive)
    remade = store.run(conn, partitions.ensure(first_day, WIDTH))
    assert remade.name == name
    assert attached(conn, name)


def test_a_removal_cut_short_is_finished_by_the_next_prune(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    cut = filed_task(api, conn, today(conn) - timedelta(days=3500), 2)
    left = filed_task(api, conn, today(conn) - timedelta(days=3600), 1)
    mine = filed_task(api, conn, today(conn) - timedelta(days=3650), 1)
    pending, detached, kept = (partition_of(conn, t) for t in (cut, left, mine))
    # A prune retires the broadcasts of a partition before it detaches it.
    conn.execute(
        "UPDATE broadcast SET recipients_removed_at = now() WHERE id = ANY(%s)",
        ([cut.id, left.id],),
    )
    # One detach stopped while it waited for a transaction that reads delivery rows...
    reader = connect()
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM delivery WHERE broadcast_id = %s", (cut.id,))
    conn.execute("SET lock_timeout = '300ms'")
    with pytest.raises(psycopg.errors.LockNotAvailable):
        conn.execute(f"ALTER TABLE delivery DETACH PARTITION {pending} CONCURRENTLY")
    conn.execute("RESET lock_timeout")
    reader.execute("ROLLBACK")
    # ... and one partition detached but neither dropped nor archived.
    conn.execute(f"ALTER TABLE delivery DETACH PARTITION {detached}")
    # One an operator detached to keep (its broadcasts were not retired) is none of retention's.
    conn.execute(f"ALTER TABLE delivery DETACH PARTITION {kept}")
    states = {n: p.state for n, p in listed(conn).items()}
    assert [states[n] for n in (pending, detached, kept)] == [
        State.DETACHING,
        State.DETACHED,
        State.DETACHED,
    ]

    done = {
        r.partition.name: r.action
        for r in partitions.prune(conn, retention_days=0, archive=False)
        if r.partition.name in {pending, detached, kept}
    }
    assert done == {pending: Action.DROPPED, detached: Action.DROPPED}
    assert not exists(conn, pending)
    assert not exists(conn, detached)
    assert exists(conn, kept)
    conn.execute(f"DROP TABLE {kept}")


def test_one_prune_at_a_time(api: Api, conn: psycopg.Connection[Any], connect: Any) -> None:
    task = filed_task(api, conn, today(conn) - timedelta(days=3700), 1)
    name = partition_of(conn, task)
    other = connect()
    other.execute("SELECT pg_advisory_lock(%s)", (partitions.PRUNE_LOCK,))
    try:
        assert partitions.prune(conn, retention_days=30, archive=False) == []
        assert attached(conn, name)
    finally:
        other.execute("SELECT pg_advisory_unlock(%s)", (partitions.PRUNE_LOCK,))
    done = partitions.prune(conn, retention_days=30, archive=False)
    assert [r.action for r in done if r.partition.name == name] == [Action.DROPPED]


def test_a_retry_not_yet_started_holds_the_partition_of_the_broadcast_it_reads(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    """A retry copies the failed recipients of its original when it starts: until then the
    original's rows must stay, however old.
    """
    source = filed_task(api, conn, today(conn) - timedelta(days=2800), 2, status="completed")
    part = partition_of(conn, source)
    retry = new_task(api, conn, 1, snapshot=False)
    conn.execute(
        "UPDATE broadcast SET status = 'pending', audience = %s WHERE id = %s",
        (Jsonb({"failed_in": source.id}), retry.id),
    )

    def removal() -> Any:
        [found] = [
            r
            for r in partitions.prune(conn, retention_days=30, archive=False)
            if r.partition.name == part
        ]
        return found

    held = removal()
    assert (held.action, held.unfinished) == (Action.HELD, 1)
    assert attached(conn, part)
    # Started (its audience copied), it no longer needs them.
    conn.execute("UPDATE broadcast SET snapshot_at = now() WHERE id = %s", (retry.id,))
    assert removal().action == Action.DROPPED
    assert not exists(conn, part)

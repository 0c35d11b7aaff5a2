"""Every statement of the delivery store reads and writes the one partition that holds its
broadcast's rows, whatever other partitions hold: each is EXPLAINed, with its parameters
bound as the store sends them, just before it runs.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from sqlalchemy.dialects import postgresql

from shared import delivery_partitions as partitions
from shared import delivery_store as store
from shared.delivery_store import Record
from shared.domain.broadcasts import recipients_query
from shared.domain.lifecycle import DeliveryStatus
from tests.conftest import Api
from tests.delivery_store.conftest import new_task, run_batch
from tests.delivery_store.test_partitions import filed_task, partition_of, today

T = TypeVar("T")

PARTITION = re.compile(r"^delivery_(archived_)?p[0-9]{8}$")

_DIALECT = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]


def named(plan: Any, field: str) -> set[str]:
    """Every value of ``field`` (``Relation Name``, ``Index Name``) in a plan's nodes."""
    if isinstance(plan, dict):
        found = {plan[field]} if field in plan else set()
        for value in plan.values():
            found |= named(value, field)
        return found
    if isinstance(plan, list):
        return set().union(*(named(v, field) for v in plan)) if plan else set()
    return set()


def relations(plan: Any) -> set[str]:
    """Every relation a plan reads or writes."""
    return named(plan, "Relation Name")


class Planner:
    """Runs store operations as ``store.run`` does, EXPLAINing each statement first."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        #: (statement, partitions of delivery its plan touches), in the order they ran.
        self.seen: list[tuple[str, set[str]]] = []

    def plan(self, query: store.Query) -> None:
        row = self.conn.execute("EXPLAIN (FORMAT JSON) " + query.sql, query.params).fetchone()
        assert row is not None
        self.seen.append((query.sql, {r for r in relations(row[0]) if PARTITION.match(r)}))

    def run(self, op: store.Op[T] | store.One[T]) -> T:
        if isinstance(op, store.One):
            self.plan(op.query)
            return store.run(self.conn, op)
        with self.conn.transaction():
            try:
                query = next(op)
                while True:
                    self.plan(query)
                    cur = self.conn.execute(query.sql, query.params)
                    rows = cur.fetchall() if cur.description else []
                    query = op.send(store.Result(rows, cur.rowcount))
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    def partitions(self) -> set[str]:
        """Partitions the statements so far touched, and forget them."""
        touched = set().union(*(p for _, p in self.seen))
        self.seen.clear()
        return touched


def test_every_statement_on_a_broadcasts_rows_touches_its_partition_only(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    other = filed_task(api, conn, today(conn) - timedelta(days=4000), 3, status="in_progress")
    task = new_task(api, conn, 8, batch_size=2)
    own = partition_of(conn, task)
    attached = [
        p for p in store.run(conn, partitions.listing()) if p.state == partitions.State.ATTACHED
    ]
    assert own != partition_of(conn, other)
    assert len(attached) >= 3
    planner = Planner(conn)

    batch = run_batch(conn, task.id, 0)
    held = planner.run(store.claim(batch, 2))
    assert len(held) == 2
    assert planner.partitions() == {own}
    planner.run(store.record(batch, [Record(held[0].id, DeliveryStatus.SENT)]))
    assert planner.partitions() == {own}
    assert planner.run(store.release(batch, [held[1].id])) == 1
    assert planner.partitions() == {own}

    conn.execute("UPDATE contact SET opted_out_at = now() WHERE id = %s", (task.contacts[1],))
    assert planner.run(store.skip_gone(batch)) == 1
    assert planner.partitions() == {own}
    planner.run(store.progress(task.id, batch.first_id, batch.last_id, batch.part_day))
    assert planner.partitions() == {own}
    planner.run(store.end_run(batch, done=True, next_token=uuid.uuid4(), lease=30.0))
    assert planner.partitions() == {own}

    # A dispatcher died holding a batch; another batch has rows left under an older token.
    dead = run_batch(conn, task.id, 2)
    assert len(store.run(conn, store.claim(dead, 2))) == 2
    conn.execute(
        "UPDATE delivery_batch SET lease_expires_at = now() - interval '1 minute' WHERE id = %s",
        (dead.id,),
    )
    left = run_batch(conn, task.id, 3)
    assert len(store.run(conn, store.claim(left, 2))) == 2
    conn.execute(
        "UPDATE delivery_batch SET state = 'queued', run_token = NULL WHERE id = %s", (left.id,)
    )
    taken = planner.run(store.take_back(republish_after=3600.0))
    assert (taken.batches, taken.rows) == (1, 2)
    assert planner.partitions() == {own}
    again = planner.run(store.claim_batch(left.id, uuid.uuid4(), lease=30.0))
    assert again is not None
    assert planner.partitions() == {own}
    assert len(planner.run(store.claim(again, 2))) == 2, "the rows left held came back"

    planner.run(store.cancel(task.id))
    assert planner.partitions() == {own}

    fresh = new_task(api, conn, 3, snapshot=False)
    copied = planner.run(
        store.snapshot(
            fresh.id,
            store.Query(
                "SELECT id, address, false, NULL::text FROM contact WHERE account_id = %(acct)s",
                {"acct": fresh.account_id},
            ),
            batch_size=2,
        )
    )
    assert copied == 3
    assert planner.partitions() == {partition_of(conn, fresh)}

    listing = recipients_query(api.workspace_id, task.id, batch.part_day).compile(dialect=_DIALECT)
    planner.plan(store.Query(str(listing), dict(listing.params)))
    assert planner.partitions() == {own}


def test_a_statement_without_the_day_would_touch_every_partition(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    # What the test above rules out does show in a plan.
    task = new_task(api, conn, 2)
    planner = Planner(conn)
    planner.plan(
        store.Query(
            "UPDATE delivery SET status = 'canceled' WHERE broadcast_id = %(b)s", {"b": task.id}
        )
    )
    attached = {
        p.name
        for p in store.run(conn, partitions.listing())
        if p.state == partitions.State.ATTACHED
    }
    assert planner.partitions() == attached
    assert len(attached) > 1


def test_prepared_hot_path_statements_keep_plans_of_their_own_partition(
    api: Api, conn: psycopg.Connection[Any], connect: Any
) -> None:
    # A generic plan of a prepared statement would take every partition's lock at each run.
    for k in range(12):
        store.run(conn, partitions.ensure(today(conn) - timedelta(days=4200 + 7 * k), 7))
    task = new_task(api, conn, 40, batch_size=40)
    batch = run_batch(conn, task.id)
    sender = connect()  # psycopg prepares a statement run 5 times on one connection
    for _ in range(20):
        held = store.run(sender, store.claim(batch, 1))
        store.run(sender, store.record(batch, [Record(h.id, DeliveryStatus.SENT) for h in held]))
        store.run(sender, store.progress(task.id, batch.first_id, batch.last_id, batch.part_day))
    plans = sender.execute(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE statement LIKE '%%delivery%%'"
    ).fetchall()
    assert len(plans) == 3
    assert [(generic, custom > 0) for _, generic, custom in plans] == [(0, True)] * 3


def test_the_recipients_not_reached_are_read_from_their_own_index(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 400)
    conn.execute(
        "UPDATE delivery SET status = 'sent', sent_at = now() WHERE broadcast_id = %s",
        (task.id,),
    )
    conn.execute(
        "UPDATE delivery SET status = 'failed', last_error = 'HTTP 404' "
        "WHERE broadcast_id = %s AND id %% 100 = 0",
        (task.id,),
    )
    conn.execute(f"ANALYZE {partition_of(conn, task)}")
    day = conn.execute("SELECT part_day FROM broadcast WHERE id = %s", (task.id,)).fetchone()
    assert day is not None

    def plan_of(*statuses: DeliveryStatus) -> tuple[str, set[str]]:
        listing = recipients_query(api.workspace_id, task.id, day[0], statuses=statuses).compile(
            dialect=_DIALECT, compile_kwargs={"render_postcompile": True}
        )
        row = conn.execute("EXPLAIN (FORMAT JSON) " + str(listing), dict(listing.params)).fetchone()
        assert row is not None
        return str(listing), {
            str(conn.execute("SELECT pg_get_indexdef(%s::regclass)", (name,)).fetchone()[0])  # type: ignore[index]
            for name in named(row[0], "Index Name")
        }

    for asked in (
        (DeliveryStatus.FAILED, DeliveryStatus.SKIPPED),
        # Canceled rows carry their reason too: the operator's list of everyone not reached.
        (
            DeliveryStatus.FAILED,
            DeliveryStatus.PARTIAL,
            DeliveryStatus.SKIPPED,
            DeliveryStatus.CANCELED,
        ),
    ):
        sql, indexes = plan_of(*asked)
        assert any("WHERE (last_error IS NOT NULL)" in i for i in indexes), (asked, indexes)
    # Queued rows may have no reason: asked for with them, none is left out for lacking one.
    sql, _ = plan_of(DeliveryStatus.FAILED, DeliveryStatus.QUEUED)
    assert "last_error IS NOT NULL" not in sql

"""The keys of provider calls (LINE's ``X-Line-Retry-Key``) as rows keep them: a key is kept
only while a call may have been made with it, a multicast's rows share one written before the
call, and a repeat after a crash takes every row of the call again.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from shared import delivery_store as store
from tests.conftest import Api
from tests.delivery_store.conftest import expire_lease, new_task, row_of, run_batch


def key_of(conn: psycopg.Connection[Any], delivery_id: int) -> uuid.UUID | None:
    return row_of(conn, "delivery", delivery_id)["call_key"]  # type: ignore[no-any-return]


def test_a_keyed_claim_stores_a_fresh_key_per_row_and_a_plain_claim_none(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4, batch_size=2)
    keyed = store.run(conn, store.claim(run_batch(conn, task.id, 0), 10, keyed=True))
    plain = store.run(conn, store.claim(run_batch(conn, task.id, 1), 10))
    assert all(r.call_key is not None for r in keyed)
    assert len({r.call_key for r in keyed}) == 2
    assert [key_of(conn, r.id) for r in keyed] == [r.call_key for r in keyed], "stored"
    assert [r.call_key for r in plain] == [None, None]


def test_a_row_given_back_untouched_gets_a_new_key_and_one_whose_call_may_have_gone_keeps_it(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 2)
    batch = run_batch(conn, task.id)
    first, second = store.run(conn, store.claim(batch, 10, keyed=True))
    # ``first`` is given back before its call (a pause): no call was made with its key.
    store.run(conn, store.release(batch, [first.id]))
    # ``second``'s run died mid-call: its call may have been carried out.
    expire_lease(conn, batch.id)
    store.run(conn, store.take_back(republish_after=0))
    again = {
        r.id: r for r in store.run(conn, store.claim(run_batch(conn, task.id), 10, keyed=True))
    }
    assert again[first.id].call_key not in (None, first.call_key)
    assert again[second.id].call_key == second.call_key
    assert again[second.id].attempts == 2


def test_a_multicasts_rows_share_its_key_and_a_repeat_takes_them_all_again(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 5)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 10, keyed=True))
    key = held[0].call_key
    assert key is not None
    assert store.run(conn, store.share_call_key(batch, key, [r.id for r in held[:4]])) == 4
    assert {key_of(conn, r.id) for r in held[:4]} == {key}
    assert key_of(conn, held[4].id) != key
    # The run dies during the call; a new run's claim, cut short by its limit, takes two
    # of the call's rows: the rest of the call comes with them, due or not.
    expire_lease(conn, batch.id)
    store.run(conn, store.take_back(republish_after=0))
    conn.execute(
        "UPDATE delivery SET next_attempt_at = now() + interval '1 hour' WHERE id = %s",
        (held[3].id,),
    )
    rerun = run_batch(conn, task.id)
    part = store.run(conn, store.claim(rerun, 2, keyed=True))
    assert [r.id for r in part] == [held[0].id, held[1].id]
    rest = store.run(conn, store.claim_call_rest(rerun, [key]))
    assert [r.id for r in rest] == [held[2].id, held[3].id]
    assert {r.call_key for r in [*part, *rest]} == {key}
    assert all(r.attempts == 2 for r in [*part, *rest])
    # The fifth row was not in the call: it is not taken with it.
    assert row_of(conn, "delivery", held[4].id)["status"] == "queued"


def test_a_key_is_shared_only_on_rows_the_run_still_holds(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 3)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 10, keyed=True))
    store.run(conn, store.release(batch, [held[2].id]))
    key = uuid.uuid4()
    assert store.run(conn, store.share_call_key(batch, key, [r.id for r in held])) == 2
    assert key_of(conn, held[2].id) != key

"""The send loop's transitions: claim, record, release, skip, and the operator's cancel."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from shared import delivery_store as store
from shared.delivery_store import Record
from shared.domain.lifecycle import CANCELED_REASON, CANCELED_UNSURE_REASON, DeliveryStatus
from tests.conftest import Api
from tests.delivery_store.conftest import (
    assert_counters_match_rows,
    expire_lease,
    new_task,
    row_of,
    rows,
    run_batch,
    task_row,
)
from tests.delivery_store.test_partitions import filed_task, today


def delivery(conn: psycopg.Connection[Any], delivery_id: int) -> dict[str, Any]:
    return row_of(conn, "delivery", delivery_id)


def test_claim_takes_due_queued_rows_of_its_range_under_its_token(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 6, batch_size=3)
    first = run_batch(conn, task.id, 0)
    conn.execute(
        "UPDATE delivery SET next_attempt_at = now() + interval '1 hour' WHERE id = %s",
        (first.first_id,),
    )
    held = store.run(conn, store.claim(first, 10))
    assert [h.id for h in held] == [first.first_id + 1, first.first_id + 2]
    assert all(h.attempts == 1 for h in held)
    for h in held:
        row = delivery(conn, h.id)
        assert (row["status"], row["lease_token"]) == ("sending", first.token)
    assert store.run(conn, store.claim(first, 10)) == []


def test_a_sends_claim_and_answer_write_no_index_entry(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    """A send's two updates change no indexed column, so both are heap-only (HOT): no new
    index entries, and their dead versions pruned from the page without vacuum. A retry's
    answer writes the row's reason, which the index of rows not reached holds.
    """
    # A partition of its own, whose one page holds only this task's rows, and room for all
    # three versions of each: whether a version is heap-only hangs on the columns it changes,
    # not on pruning, which a transaction open anywhere in the cluster holds back (another
    # worker's test). Bigger sends reach the same share with pruning (docs/performance.md).
    n = 16
    task = filed_task(api, conn, today(conn) - timedelta(days=7777), n, status="in_progress")
    batch = run_batch(conn, task.id)
    partition = conn.execute(
        "SELECT DISTINCT tableoid FROM delivery WHERE broadcast_id = %s", (task.id,)
    ).fetchone()
    assert partition is not None

    def updates() -> tuple[int, int]:
        """Row updates of the partition so far, and how many of them were heap-only."""
        conn.execute("SELECT pg_stat_force_next_flush()")  # this session's, when it idles
        found = conn.execute(
            "SELECT pg_stat_get_tuples_updated(%(p)s), pg_stat_get_tuples_hot_updated(%(p)s)",
            {"p": partition[0]},
        ).fetchone()
        assert found is not None
        return int(found[0]), int(found[1])

    before = updates()
    # Claimed and answered in separate transactions, as a run does; one row is given back
    # unsent (a run told to wait), which is heap-only too.
    held = store.run(conn, store.claim(batch, n))
    assert store.run(conn, store.release(batch, [held[-1].id])) == 1
    store.run(conn, store.record(batch, [Record(h.id, DeliveryStatus.SENT) for h in held[1:-1]]))
    assert len(held) == n
    assert tuple(a - b for a, b in zip(updates(), before, strict=True)) == (2 * n - 1, 2 * n - 1)
    store.run(
        conn,
        store.record(batch, [Record(held[0].id, DeliveryStatus.QUEUED, error="HTTP 503", delay=1)]),
    )
    assert tuple(a - b for a, b in zip(updates(), before, strict=True)) == (2 * n, 2 * n - 1)
    assert rows(conn, task.id) == {"sent": n - 2, "queued": 2}
    pages = conn.execute("SELECT pg_relation_size(%s) / 8192", (partition[0],)).fetchone()
    assert pages == (1,), "every version of every row on the one page"
    options = conn.execute(
        "SELECT reloptions FROM pg_class WHERE oid = %s", (partition[0],)
    ).fetchone()
    assert options == (["fillfactor=45"],), "room on each page for a row's later versions"


def test_claim_takes_nothing_while_the_task_is_paused(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 2)
    batch = run_batch(conn, task.id)
    conn.execute("UPDATE broadcast SET status = 'paused' WHERE id = %s", (task.id,))
    assert store.run(conn, store.claim(batch, 10)) == []
    assert rows(conn, task.id) == {"queued": 2}


def test_contacts_who_opted_out_or_became_unreachable_are_skipped_with_the_reason(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4)
    conn.execute("UPDATE contact SET opted_out_at = now() WHERE id = %s", (task.contacts[0],))
    # Erased (deleted) since the snapshot: never claimed, skipped, its address gone.
    conn.execute("DELETE FROM contact WHERE id = %s", (task.contacts[3],))
    conn.execute(
        "UPDATE contact SET unreachable_at = now(), unreachable_reason = '403 blocked' "
        "WHERE id = %s",
        (task.contacts[1],),
    )
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 10))
    assert [h.contact_id for h in held] == [task.contacts[2]], "the claim passes them over"
    assert store.run(conn, store.skip_gone(batch)) == 3
    reasons = dict(
        conn.execute(
            "SELECT contact_id, last_error FROM delivery WHERE broadcast_id = %s "
            "AND status = 'skipped'",
            (task.id,),
        ).fetchall()
    )
    assert reasons == {
        task.contacts[0]: "skipped: contact opted out",
        task.contacts[1]: "skipped: contact unreachable: 403 blocked",
        task.contacts[3]: "skipped: contact erased",
    }
    # Its address goes with the sweep's erasure step (the delete noted it).
    assert store.run(conn, store.settle_erasures()).rows >= 1
    assert conn.execute(
        "SELECT address FROM delivery WHERE contact_id = %s", (task.contacts[3],)
    ).fetchall() == [("(erased)",)]
    assert_counters_match_rows(conn, task.id)


def test_record_writes_each_outcome(api: Api, conn: psycopg.Connection[Any]) -> None:
    task = new_task(api, conn, 5)
    batch = run_batch(conn, task.id)
    sent, failed, retry, throttled, gone = store.run(conn, store.claim(batch, 5))
    written = store.run(
        conn,
        store.record(
            batch,
            [
                Record(sent.id, DeliveryStatus.SENT, provider_message_id="wamid.1"),
                Record(failed.id, DeliveryStatus.FAILED, error="HTTP 400: bad"),
                Record(retry.id, DeliveryStatus.QUEUED, error="HTTP 503", delay=30, parts_done=1),
                Record(
                    throttled.id,
                    DeliveryStatus.QUEUED,
                    error="HTTP 429",
                    delay=2,
                    attempt_used=False,
                ),
                Record(
                    gone.id,
                    DeliveryStatus.FAILED,
                    error="Telegram 403: bot was blocked",
                    unreachable_contact=gone.contact_id,
                ),
            ],
        ),
    )
    assert sorted(written) == sorted([sent.id, failed.id, retry.id, throttled.id, gone.id])
    s = delivery(conn, sent.id)
    assert (s["status"], s["provider_message_id"], s["lease_token"]) == ("sent", "wamid.1", None)
    assert s["sent_at"] is not None
    f = delivery(conn, failed.id)
    assert (f["status"], f["last_error"], f["attempts"]) == ("failed", "HTTP 400: bad", 1)
    r = delivery(conn, retry.id)
    assert (r["status"], r["attempts"], r["parts_done"]) == ("queued", 1, 1)
    assert r["next_attempt_at"] is not None
    t = delivery(conn, throttled.id)
    assert (t["status"], t["attempts"]) == ("queued", 0), "a throttled call uses no attempt"
    unreachable = conn.execute(
        "SELECT unreachable_reason FROM contact WHERE id = %s", (gone.contact_id,)
    ).fetchone()
    assert unreachable == ("Telegram 403: bot was blocked",)
    # Not due yet: the next claim passes over both.
    assert store.run(conn, store.claim(batch, 5)) == []


ODD_TEXTS = ['say "no"', "back\\slash", "a,b", "{x}", "NULL", " edge ", "é ✓ 日本", ""]


def test_texts_of_every_shape_are_written_as_given(api: Api, conn: psycopg.Connection[Any]) -> None:
    # Results travel to Postgres as array literals: quotes, backslashes, commas, braces, the
    # word NULL, outer spaces and non-ASCII text must come back exactly as they went.
    task = new_task(api, conn, len(ODD_TEXTS))
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, len(ODD_TEXTS)))
    store.run(
        conn,
        store.record(
            batch,
            [
                Record(h.id, DeliveryStatus.FAILED, provider_message_id=text, error=text)
                for h, text in zip(held, ODD_TEXTS, strict=True)
            ],
        ),
    )
    for h, text in zip(held, ODD_TEXTS, strict=True):
        d = delivery(conn, h.id)
        assert (d["provider_message_id"], d["last_error"]) == (text, text)


def test_array_literals_read_back_as_the_values_given(conn: psycopg.Connection[Any]) -> None:
    values: list[Any] = [*ODD_TEXTS, None, "tab\there\nnewline"]
    assert conn.execute("SELECT %s::text[]", (store.array_literal(values),)).fetchone() == (values,)
    numbers = conn.execute(
        "SELECT %s::bigint[], %s::float8[], %s::int[]",
        (
            store.array_literal([1, None, 2**62]),
            store.array_literal([0.1, 1e-05, None, 2.5]),
            store.array_literal([]),
        ),
    ).fetchone()
    assert numbers == ([1, None, 2**62], [0.1, 1e-05, None, 2.5], [])
    with pytest.raises(TypeError, match="bool"):
        store.array_literal([True])


def test_repeated_literals_read_back_in_order(conn: psycopg.Connection[Any]) -> None:
    """Values written out once each still come back each in its place."""
    a, b = uuid.uuid4(), uuid.uuid4()
    tokens = [a, b, a, a, None, b]
    texts: list[Any] = ["sent", 'say "hi"', "sent", None, "queued", 'say "hi"']
    got = conn.execute(
        "SELECT %s::uuid[], %s::text[]",
        (store.repeated_literal(tokens), store.repeated_literal(texts)),
    ).fetchone()
    assert got == (tokens, texts)
    assert store.repeated_literal([]) == "{}"
    # Equal to a dict, not to Postgres: each keeps its own text, and a bool is refused.
    assert store.repeated_literal([1, 1.0, 1]) == "{1,1.0,1}"
    with pytest.raises(TypeError, match="bool"):
        store.repeated_literal([1, True])


def test_release_gives_back_the_attempt_and_can_hold_the_row_back(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 2)
    batch = run_batch(conn, task.id)
    a, b = store.run(conn, store.claim(batch, 2))
    assert store.run(conn, store.release(batch, [a.id])) == 1
    assert store.run(conn, store.release(batch, [b.id], delay=60)) == 1
    assert (delivery(conn, a.id)["status"], delivery(conn, a.id)["attempts"]) == ("queued", 0)
    assert [h.id for h in store.run(conn, store.claim(batch, 2))] == [a.id]


def test_cancel_ends_every_row_not_yet_sent_and_sent_rows_stay_sent(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 6)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 4))
    store.run(conn, store.record(batch, [Record(held[0].id, DeliveryStatus.SENT)]))
    assert store.run(conn, store.cancel(task.id)) == 2, "the two never claimed"
    assert rows(conn, task.id) == {"sent": 1, "sending": 3, "canceled": 2}
    # Rows a dispatcher held when the cancel came: a call under way is written as it went,
    # a retry becomes canceled, a row never sent comes back canceled.
    store.run(
        conn,
        store.record(
            batch,
            [
                Record(held[1].id, DeliveryStatus.SENT),
                Record(held[2].id, DeliveryStatus.QUEUED, error="HTTP 503", delay=1),
            ],
        ),
    )
    store.run(conn, store.release(batch, [held[3].id]))
    assert rows(conn, task.id) == {"sent": 2, "canceled": 4}
    t = task_row(conn, task.id)
    assert (t["status"], t["sent_count"], t["canceled_count"]) == ("canceled", 2, 4)
    assert_counters_match_rows(conn, task.id)
    # Each canceled recipient says why it was not reached (the list of those not reached is
    # read from the rows that carry a reason), with its last attempt's error if it had one.
    reasons = dict(
        conn.execute(
            "SELECT id, last_error FROM delivery WHERE broadcast_id = %s AND status = 'canceled'",
            (task.id,),
        ).fetchall()
    )
    assert reasons.pop(held[2].id) == f"{CANCELED_REASON}; last attempt: HTTP 503"
    assert set(reasons.values()) == {CANCELED_REASON}


def test_rows_canceled_with_their_task_say_why_and_what_their_last_attempt_got(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 4)
    batch = run_batch(conn, task.id)
    retried, lost, *_ = store.run(conn, store.claim(batch, 2))
    store.run(
        conn,
        store.record(batch, [Record(retried.id, DeliveryStatus.QUEUED, error="HTTP 429", delay=0)]),
    )
    store.run(conn, store.cancel(task.id))
    # A row whose retry was waiting keeps what its attempt got after the cancel's reason.
    assert delivery(conn, retried.id)["last_error"] == f"{CANCELED_REASON}; last attempt: HTTP 429"
    # The run holding the other one died: taken back canceled, the call may have gone out.
    expire_lease(conn, batch.id)
    assert store.run(conn, store.take_back(republish_after=60)).rows == 1
    assert (delivery(conn, lost.id)["status"], delivery(conn, lost.id)["last_error"]) == (
        "canceled",
        CANCELED_UNSURE_REASON,
    )
    assert rows(conn, task.id) == {"canceled": 4}
    assert conn.execute(
        "SELECT count(*) FROM delivery WHERE broadcast_id = %s AND last_error IS NULL", (task.id,)
    ).fetchone() == (0,)


def test_results_of_a_run_that_lost_its_lease_are_not_written(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 3)
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 3))
    # The dispatcher stalls; its lease runs out and the sweeper takes its batch back.
    expire_lease(conn, batch.id)
    taken = store.run(conn, store.take_back(republish_after=60))
    assert (taken.batches, taken.rows) == (1, 3)
    assert rows(conn, task.id) == {"queued": 3}
    assert store.run(conn, store.renew([batch], lease=30)) == set()
    # The stalled run wakes up with answers: none of them is written.
    written = store.run(
        conn, store.record(batch, [Record(h.id, DeliveryStatus.SENT) for h in held])
    )
    assert written == []
    assert rows(conn, task.id) == {"queued": 3}
    assert task_row(conn, task.id)["sent_count"] == 0
    # And what it would give back is not its to give.
    assert store.run(conn, store.release(batch, [h.id for h in held])) == 0

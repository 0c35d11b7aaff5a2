"""Auto-pause: a broadcast pauses itself, in the same statement that writes the results, when
at least ``failure_ratio`` of its last ``last`` sends failed; resuming starts afresh.
"""

from __future__ import annotations

from typing import Any

import psycopg

from shared import delivery_store as store
from shared.delivery_store import Record
from shared.domain.lifecycle import DeliveryStatus
from tests.conftest import Api
from tests.delivery_store.conftest import new_task, run_batch, task_row

SENT, FAILED, PARTIAL = DeliveryStatus.SENT, DeliveryStatus.FAILED, DeliveryStatus.PARTIAL


_runs: dict[int, store.Batch] = {}


def outcomes(conn: psycopg.Connection[Any], task_id: int, results: list[DeliveryStatus]) -> None:
    """Claim and write one result per status, one statement each, in order (under one run
    of the task's first batch).
    """
    if task_id not in _runs:
        _runs[task_id] = run_batch(conn, task_id)
    batch = _runs[task_id]
    for status in results:
        [held] = store.run(conn, store.claim(batch, 1))
        store.run(
            conn,
            store.record(
                batch,
                [
                    Record(
                        held.id,
                        status,
                        error=None if status == SENT else "HTTP 500",
                        parts_done=1 if status == PARTIAL else None,
                    )
                ],
            ),
        )
        if task_row(conn, task_id)["status"] != "in_progress":
            return


def test_it_pauses_once_the_failed_share_of_the_last_sends_reaches_the_limit(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 40, auto_pause={"failure_ratio": 0.5, "last": 10})
    # 6 sent then 4 failed: 4 of the last 10 failed, under the limit.
    outcomes(conn, task.id, [SENT] * 6 + [FAILED] * 4)
    row = task_row(conn, task.id)
    assert (row["status"], row["pause_ratio"], row["pause_last"]) == ("in_progress", 0.5, 10)
    assert row["recent_outcomes"] == "0000001111"
    # One more failure: the last 10 are 5 sent, 5 failed: half.
    outcomes(conn, task.id, [FAILED])
    row = task_row(conn, task.id)
    assert row["status"] == "paused"
    assert row["auto_paused_at"] is not None
    assert row["status_reason"].startswith("auto-paused: 5 of the last 10 sends failed")
    assert "50.0%" in row["status_reason"]
    # Nothing more is claimed while it is paused.
    assert store.run(conn, store.claim(_runs[task.id], 5)) == []


def test_fewer_sends_than_the_window_never_pause_it_and_partial_counts_as_failed(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 12, auto_pause={"failure_ratio": 0.8, "last": 10})
    outcomes(conn, task.id, [FAILED] * 7 + [PARTIAL])
    assert task_row(conn, task.id)["status"] == "in_progress"  # 8 sends, fewer than 10
    outcomes(conn, task.id, [SENT, PARTIAL])
    row = task_row(conn, task.id)
    assert row["status"] == "paused"
    assert "9 of the last 10" in row["status_reason"]


def test_the_channel_s_setting_is_the_default_and_a_broadcast_may_turn_it_off(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    by_channel = new_task(api, conn, 12, channel_auto_pause={"failure_ratio": 1.0, "last": 10})
    outcomes(conn, by_channel.id, [FAILED] * 10)
    assert task_row(conn, by_channel.id)["status"] == "paused"
    off = new_task(
        api,
        conn,
        12,
        channel_auto_pause={"failure_ratio": 1.0, "last": 10},
        auto_pause={"failure_ratio": None},
    )
    outcomes(conn, off.id, [FAILED] * 11)
    row = task_row(conn, off.id)
    assert (row["status"], row["pause_last"], row["recent_outcomes"]) == (
        "in_progress",
        None,
        None,
    )
    plain = new_task(api, conn, 12)
    outcomes(conn, plain.id, [FAILED] * 11)
    assert task_row(conn, plain.id)["status"] == "in_progress"


def test_the_last_results_complete_it_rather_than_pause_it(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 10, auto_pause={"failure_ratio": 0.5, "last": 10})
    outcomes(conn, task.id, [SENT] * 5 + [FAILED] * 5)
    row = task_row(conn, task.id)
    assert (row["status"], row["auto_paused_at"]) == ("completed", None)


def test_resuming_starts_the_window_afresh(api: Api, conn: psycopg.Connection[Any]) -> None:
    task = new_task(api, conn, 40, auto_pause={"failure_ratio": 0.5, "last": 10})
    outcomes(conn, task.id, [FAILED] * 10)
    assert task_row(conn, task.id)["status"] == "paused"
    api.ok("post", f"/v1/broadcasts/{task.id}/resume")
    row = task_row(conn, task.id)
    assert (row["status"], row["recent_outcomes"], row["status_reason"]) == (
        "in_progress",
        None,
        None,
    )
    # Its settings stay as they were fixed at the start.
    assert (row["pause_ratio"], row["pause_last"]) == (0.5, 10)
    detail = api.ok("get", f"/v1/broadcasts/{task.id}")
    assert detail["auto_pause"] == {"failure_ratio": 0.5, "last": 10}
    # No longer counted as paused by itself, nor logged again.
    assert (detail["auto_paused_at"], row["auto_pause_logged_at"]) == (None, None)


def test_the_outcomes_of_one_statement_count_in_proportion_however_many(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    task = new_task(api, conn, 60, auto_pause={"failure_ratio": 0.5, "last": 20})
    batch = run_batch(conn, task.id)
    held = store.run(conn, store.claim(batch, 40))
    # One statement writes 30 sent and 10 failed: a quarter failed, under the limit.
    store.run(
        conn,
        store.record(
            batch,
            [Record(h.id, SENT) for h in held[:30]]
            + [Record(h.id, FAILED, error="HTTP 500") for h in held[30:]],
        ),
    )
    row = task_row(conn, task.id)
    assert row["status"] == "in_progress"
    assert len(row["recent_outcomes"]) == 20
    assert row["recent_outcomes"].count("1") == 5

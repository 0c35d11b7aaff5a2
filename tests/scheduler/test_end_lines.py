"""A broadcast's end (completed, or canceled) is logged once, with its counts, whichever
process ended it and however many schedulers run.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.orm import Session

from services.scheduler import scheduler as sched
from shared.db.engine import libpq_url, make_engine
from shared.settings import Settings
from tests.conftest import Api
from tests.scheduler.test_scheduler import amqp_url, due_tasks, scheduler, vhost  # noqa: F401


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


def ended_tasks(api: Api, conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    """A completed task (7 sent, 2 failed, 1 partly), a canceled one and one still sending."""
    done, canceled, sending = due_tasks(api, conn, 3)[0]
    conn.execute(
        "UPDATE broadcast SET status = 'completed', total_count = 10, sent_count = 7, "
        "failed_count = 2, partial_count = 1, started_at = now() - interval '90 seconds', "
        "finished_at = now() WHERE id = %s",
        (done,),
    )
    conn.execute(
        "UPDATE broadcast SET status = 'canceled', total_count = 5, sent_count = 1, "
        "canceled_count = 4, started_at = now(), finished_at = now() WHERE id = %s",
        (canceled,),
    )
    conn.execute("UPDATE broadcast SET status = 'in_progress' WHERE id = %s", (sending,))
    return done, canceled, sending


def test_each_end_is_taken_once_and_a_sending_task_not_at_all(
    api: Api, conn: psycopg.Connection[Any], database_url: str
) -> None:
    done, canceled, sending = ended_tasks(api, conn)
    engine = make_engine(database_url, pool_size=2)
    try:
        with Session(engine) as first, first.begin():
            taken = {b.id: b for b in sched.take_ended(first)}
            # A second scheduler while the first has not committed: the rows are locked and
            # skipped, not taken again.
            with Session(engine) as second, second.begin():
                assert not {b.id for b in sched.take_ended(second)} & {done, canceled}
        with Session(engine) as again, again.begin():
            assert not {b.id for b in sched.take_ended(again)} & {done, canceled, sending}
    finally:
        engine.dispose()
    assert {done, canceled} <= set(taken)
    assert sending not in taken
    assert (taken[done].status, taken[done].sent_count, taken[done].failed_count) == (
        "completed",
        7,
        2,
    )
    logged = conn.execute(
        "SELECT id FROM broadcast WHERE id = ANY(%s) AND end_logged_at IS NOT NULL",
        ([done, canceled, sending],),
    ).fetchall()
    assert sorted(r[0] for r in logged) == sorted([done, canceled])


def test_a_task_ending_later_is_taken_then(
    api: Api, conn: psycopg.Connection[Any], database_url: str
) -> None:
    _, _, sending = ended_tasks(api, conn)
    engine = make_engine(database_url, pool_size=1)
    try:
        with Session(engine) as session, session.begin():
            assert sending not in {b.id for b in sched.take_ended(session)}
        conn.execute("UPDATE broadcast SET status = 'completed' WHERE id = %s", (sending,))
        with Session(engine) as session, session.begin():
            assert sending in {b.id for b in sched.take_ended(session)}
    finally:
        engine.dispose()


def test_two_schedulers_log_each_end_once_with_its_counts(
    api: Api,
    conn: psycopg.Connection[Any],
    settings: Settings,
    vhost: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    done, canceled, _ = ended_tasks(api, conn)
    with (
        caplog.at_level(logging.INFO, logger=sched.log.name),
        scheduler(settings, amqp_url(vhost)) as one,
        scheduler(settings, amqp_url(vhost)) as two,
    ):
        for s in (one, two, one, two):
            s._observe()
    lines = [
        r
        for r in caplog.records
        if getattr(r, "event", None) in ("completed", "ended")
        and getattr(r, "broadcast_id", None) in (done, canceled)
    ]
    assert Counter(r.broadcast_id for r in lines) == {done: 1, canceled: 1}  # type: ignore[attr-defined]
    [completed] = [r for r in lines if r.broadcast_id == done]  # type: ignore[attr-defined]
    fields = {k: getattr(completed, k) for k in ("event", "sent", "failed", "partial", "total")}
    assert fields == {"event": "completed", "sent": 7, "failed": 2, "partial": 1, "total": 10}
    assert completed.duration_seconds == pytest.approx(90, abs=5)  # type: ignore[attr-defined]
    assert "7 of 10 sent" in completed.getMessage()
    [stopped] = [r for r in lines if r.broadcast_id == canceled]  # type: ignore[attr-defined]
    assert (stopped.event, stopped.broadcast_status, stopped.canceled) == (  # type: ignore[attr-defined]
        "ended",
        "canceled",
        4,
    )


def test_a_task_canceled_mid_send_is_logged_once_its_counts_are_final(
    api: Api, conn: psycopg.Connection[Any], database_url: str
) -> None:
    _, canceled, late = ended_tasks(api, conn)
    # Two rows were still at a dispatcher when it was canceled: 3 of 5 counted so far.
    conn.execute(
        "UPDATE broadcast SET sent_count = 1, canceled_count = 2, end_logged_at = NULL "
        "WHERE id = %s",
        (canceled,),
    )
    # Another whose counts never add up (its rows were removed), canceled long ago.
    conn.execute(
        "UPDATE broadcast SET status = 'canceled', total_count = 9, sent_count = 2, "
        "finished_at = now() - interval '1 hour' WHERE id = %s",
        (late,),
    )
    engine = make_engine(database_url, pool_size=1)

    def take() -> set[int]:
        with Session(engine) as session, session.begin():
            return {b.id for b in sched.take_ended(session, settle_seconds=600)}

    try:
        first = take()
        assert canceled not in first, "its counts are not final yet"
        assert late in first, "canceled longer ago than the settle time"
        # The held rows came back: one sent, one canceled.
        conn.execute(
            "UPDATE broadcast SET sent_count = 2, canceled_count = 3 WHERE id = %s", (canceled,)
        )
        assert canceled in take()
    finally:
        engine.dispose()


def test_an_end_is_logged_before_it_is_marked_so_a_crash_cannot_lose_it(
    api: Api,
    conn: psycopg.Connection[Any],
    settings: Settings,
    vhost: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    done, _, _ = ended_tasks(api, conn)
    logged: list[int] = []
    real = sched.log_ended

    def log_then_die(ended: list[Any]) -> None:
        real(ended)
        logged.extend(b.id for b in ended)
        raise RuntimeError("the process dies before its commit")

    with scheduler(settings, amqp_url(vhost)) as s:
        monkeypatch.setattr(sched, "log_ended", log_then_die)
        with pytest.raises(RuntimeError):
            s._observe()
        assert done in logged
        unmarked = conn.execute(
            "SELECT end_logged_at IS NULL FROM broadcast WHERE id = %s", (done,)
        ).fetchone()
        assert unmarked == (True,), "logged, not marked: the next pass logs it again"
        monkeypatch.setattr(sched, "log_ended", real)
        with_lines: list[Any] = []
        monkeypatch.setattr(sched, "log_ended", lambda ended: with_lines.extend(ended))
        s._observe()
    assert done in {b.id for b in with_lines}

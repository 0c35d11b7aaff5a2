"""The scheduler against the real Postgres and RabbitMQ: many tasks due in the same second are
started in one pass, each in exactly one start message, and a crash between the claim and the
publish loses none of them.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pika
import psycopg
import pytest
from dramatiq import Message
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session

from services.scheduler import scheduler as sched
from services.scheduler.scheduler import Scheduler, claim_due, start_groups
from shared.broker import START_QUEUE
from shared.db.engine import libpq_url, make_engine
from shared.settings import Settings
from tests.conftest import Api, rabbitmqctl, scratch_vhost


@pytest.fixture
def vhost() -> Iterator[str]:
    """A vhost of this test's own: nothing consumes from it."""
    with scratch_vhost("bcast_sched") as name:
        yield name


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


@contextlib.contextmanager
def scheduler(settings: Settings, broker_url: str) -> Iterator[Scheduler]:
    """A scheduler publishing to ``broker_url``, closed afterwards."""
    s = Scheduler(settings.model_copy(update={"broker_url": broker_url}))
    try:
        yield s
    finally:
        s.publisher.close()
        s.broker.close()


def amqp_url(vhost: str, port: int = 5672) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/{vhost}"


def due_tasks(
    api: Api, conn: psycopg.Connection[Any], n: int, *, big: int = 0
) -> tuple[list[int], list[int]]:
    """``n`` one-recipient timed sends and ``big`` broadcasts of 5,000 recipients (as counted
    when written), all due now; no other task of the database is due from now on. Returns
    (small ids, big ids).
    """
    conn.execute(
        "UPDATE broadcast SET send_at = send_at + interval '1 year' "
        "WHERE status = 'pending' AND send_at <= now()"
    )
    # Nor does a start another test claimed and never published wait in the outbox.
    conn.execute("DELETE FROM dispatch_outbox")
    channel = api.channel()
    account = api.account(channel["id"])
    small = [
        r[0]
        for r in conn.execute(
            """
            WITH c AS (
                INSERT INTO contact (workspace_id, account_id, address)
                SELECT %(w)s, %(a)s, 't-' || i FROM generate_series(1, %(n)s) AS i
                RETURNING id
            )
            INSERT INTO broadcast (workspace_id, name, channel_id, origin, audience, content,
                                   send_at, audience_size)
            SELECT %(w)s, 'timed', %(c)s, 'conversation',
                   jsonb_build_object('selection', 'manual', 'contact_ids', jsonb_build_array(id)),
                   '{"text": "x"}', now(), 1
            FROM c ORDER BY id
            RETURNING id
            """,
            {"w": api.workspace_id, "a": account["id"], "c": channel["id"], "n": n},
        ).fetchall()
    ]
    large = [
        r[0]
        for r in conn.execute(
            """
            INSERT INTO broadcast (workspace_id, name, channel_id, audience, content, send_at,
                                   audience_size)
            SELECT %(w)s, 'big', %(c)s, '{}', '{"text": "x"}', now(), 5000
            FROM generate_series(1, %(n)s)
            RETURNING id
            """,
            {"w": api.workspace_id, "c": channel["id"], "n": big},
        ).fetchall()
    ]
    return small, large


def start_messages(vhost: str) -> list[int | list[int]]:
    """Every start message in the vhost's start queue (taken off it), in order."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url(vhost)))
    try:
        channel = connection.channel()
        taken: list[int | list[int]] = []
        while True:
            _, _, body = channel.basic_get(START_QUEUE, auto_ack=True)
            if body is None:
                return taken
            taken.append(Message.decode(body).args[0])
    finally:
        connection.close()


def started(conn: psycopg.Connection[Any], ids: list[int]) -> dict[str, int]:
    return dict(
        conn.execute(
            "SELECT status, count(*) FROM broadcast WHERE id = ANY(%s) GROUP BY status", (ids,)
        ).fetchall()
    )


def outbox(conn: psycopg.Connection[Any], ids: list[int]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM dispatch_outbox WHERE broadcast_id = ANY(%s)", (ids,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_small_audiences_go_in_groups_and_large_ones_alone() -> None:
    one, many = sched.SMALL_AUDIENCE, sched.SMALL_AUDIENCE + 1
    assert start_groups([]) == []
    assert start_groups([(1, 1), (2, many), (3, 1), (3, 1), (4, one)]) == [2, [1, 3, 4]]
    tiny = [(i, 1) for i in range(sched.GROUP_TASKS + 1)]
    assert start_groups(tiny) == [list(range(sched.GROUP_TASKS)), [sched.GROUP_TASKS]]
    half = sched.GROUP_RECIPIENTS // 2
    assert start_groups([(1, half), (2, half), (3, 1)]) == [[1, 2], [3]]


def test_a_copy_in_parts_already_begun_starts_again_alone_whatever_its_size(
    api: Api, conn: psycopg.Connection[Any], settings: Settings
) -> None:
    conn.execute("DELETE FROM dispatch_outbox")
    channel = api.channel()
    api.contact(api.account(channel["id"])["id"], "someone")
    small = [api.broadcast(channel["id"])["id"] for _ in range(3)]
    conn.execute(
        "UPDATE broadcast SET status = 'in_progress', started_at = now(), audience_size = 5 "
        "WHERE id = ANY(%s)",
        (small,),
    )
    # The second one's copy in parts began (rows copied, snapshot_at not set); its audience
    # as counted at creation is small.
    conn.execute("UPDATE broadcast SET total_count = 40000 WHERE id = %s", (small[1],))
    conn.execute(
        "INSERT INTO dispatch_outbox (workspace_id, broadcast_id, reason) "
        "SELECT workspace_id, id, 'stalled' FROM broadcast WHERE id = ANY(%s) ORDER BY id",
        (small,),
    )
    published: list[Any] = []
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session, session.begin():
            assert sched.relay_outbox(session, published.extend) == 3
    finally:
        engine.dispose()
    # The begun copy goes on alone (a group's copy would leave it out); the others together.
    assert published == [small[1], [small[0], small[2]]]


def test_many_tasks_due_in_the_same_second_all_start_in_one_pass_each_in_one_message(
    api: Api, conn: psycopg.Connection[Any], settings: Settings, vhost: str
) -> None:
    count = 2 * sched.CLAIM_LIMIT + 500
    small, large = due_tasks(api, conn, count, big=2)
    with scheduler(settings, amqp_url(vhost)) as s:
        s.run_pass()
    assert started(conn, small + large) == {"in_progress": count + 2}
    assert outbox(conn, small + large) == 0
    messages = start_messages(vhost)
    mine = set(small) | set(large)
    seen: list[int] = []
    for message in messages:
        ids = [message] if isinstance(message, int) else message
        if not mine.intersection(ids):
            continue  # another test's task, due meanwhile
        if isinstance(message, int):
            assert message in large, "only large audiences start alone"
        else:
            assert not set(message) & set(large), "large audiences never share a message"
            assert len(message) <= sched.GROUP_TASKS
        seen.extend(i for i in ids if i in mine)
    assert sorted(seen) == sorted(mine), "every task in exactly one start message"
    assert len(messages) < count // 10


def test_a_crash_between_the_claim_and_the_publish_loses_nothing(
    api: Api, conn: psycopg.Connection[Any], settings: Settings, vhost: str
) -> None:
    small, large = due_tasks(api, conn, 1500, big=1)
    ids = small + large
    # RabbitMQ cannot be reached: the tasks are claimed and committed, chunk by chunk, then
    # the publish fails, as if the scheduler had died between the two.
    with scheduler(settings, amqp_url(vhost, port=1)) as broken:
        assert not broken.run_pass()
    assert started(conn, ids) == {"in_progress": len(ids)}
    assert outbox(conn, ids) == len(ids), "every claimed task keeps its outbox row"
    # Another scheduler (or this one restarted) publishes them.
    with scheduler(settings, amqp_url(vhost)) as s:
        s.run_pass()
    assert started(conn, ids) == {"in_progress": len(ids)}
    assert outbox(conn, ids) == 0
    seen = [
        i for m in start_messages(vhost) for i in ([m] if isinstance(m, int) else m) if i in ids
    ]
    assert sorted(seen) == sorted(ids)


def test_claim_due_takes_up_to_its_limit_in_one_transaction(
    api: Api, conn: psycopg.Connection[Any], database_url: str
) -> None:
    small, _ = due_tasks(api, conn, 30)
    engine = make_engine(database_url, pool_size=1)
    try:
        with Session(engine) as session, session.begin():
            first, paused = claim_due(session, timedelta(hours=1), limit=20)
        with Session(engine) as session, session.begin():
            second, _ = claim_due(session, timedelta(hours=1), limit=1000)
    finally:
        engine.dispose()
    assert paused == []
    assert len(first) == 20
    assert set(small) <= set(first) | set(second)
    assert not set(first) & set(second)
    rows = conn.execute(
        "SELECT count(DISTINCT started_at) FROM broadcast WHERE id = ANY(%s)", (first,)
    ).fetchone()
    assert rows == (1,), "one claim is one transaction"


def test_a_pass_with_nothing_due_does_not_wake_the_scheduler_itself(
    api: Api, conn: psycopg.Connection[Any], database_url: str
) -> None:
    listener = psycopg.connect(libpq_url(database_url), autocommit=True)
    engine = make_engine(database_url, pool_size=1)

    def claim() -> list[int]:
        with Session(engine) as session, session.begin():
            return claim_due(session, timedelta(hours=1))[0]

    def heard() -> list[str]:
        return [n.channel for n in listener.notifies(timeout=0.3)]

    try:
        claim()  # whatever earlier tests left due
        listener.execute("LISTEN bcast_outbox")
        listener.execute("LISTEN bcast_broadcast")
        # The claim's outbox insert runs whether or not a task is due; an empty one must not
        # tell the scheduler there is something to publish, or it passes again at once, and
        # again, in a loop.
        assert claim() == []
        assert heard() == []
        small, _ = due_tasks(api, conn, 3)
        heard()  # the new tasks were announced as written
        assert set(small) <= set(claim())
        # The starts are announced to the relay (the outbox), not as status changes: no
        # listener follows a task from pending to in_progress.
        assert set(heard()) == {"bcast_outbox"}
    finally:
        listener.close()
        engine.dispose()


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_broker_refusing_publishes_fails_its_stages_only_and_is_seen(
    api: Api, conn: psycopg.Connection[Any], settings: Settings, vhost: str
) -> None:
    # RabbitMQ answers, but refuses every publish (ACCESS_REFUSED: no write permission).
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", "^$", ".*")
    small, _ = due_tasks(api, conn, 3)
    stages = ("claim", "observe", "sweep")
    with scheduler(settings, amqp_url(vhost)) as s:
        errors_before = sample("bcast_scheduler_errors_total", stage="outbox")
        last_pass_before = sample("bcast_scheduler_last_pass_timestamp_seconds")
        succeeded_before = {
            stage: sample("bcast_scheduler_stage_last_success_timestamp_seconds", stage=stage)
            for stage in stages
        }
        assert not s.run_pass(), "a pass with a failed stage says so"
        # The stages after the failing one still ran: due tasks were started, the backlog
        # is measured, recovery swept.
        assert started(conn, small) == {"in_progress": len(small)}
        assert sample("bcast_outbox_backlog") >= len(small)
        assert sample("bcast_outbox_oldest_age_seconds") >= 0
        for stage in stages:
            succeeded = sample("bcast_scheduler_stage_last_success_timestamp_seconds", stage=stage)
            assert succeeded > succeeded_before[stage], f"{stage} ran in this pass"
        assert sample("bcast_scheduler_errors_total", stage="outbox") == errors_before + 1
        assert sample("bcast_scheduler_last_pass_timestamp_seconds") == last_pass_before
        # The broker takes publishes again: the next pass publishes the backlog.
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        assert s.run_pass()
    assert outbox(conn, small) == 0
    assert sample("bcast_scheduler_last_pass_timestamp_seconds") == pytest.approx(
        time.time(), abs=30
    )


def test_every_labelled_scheduler_series_starts_at_zero(settings: Settings, vhost: str) -> None:
    # A fresh process: what a scheduler exports before it has done anything.
    script = (
        "from prometheus_client import generate_latest\n"
        "from services.scheduler.scheduler import Scheduler\n"
        "from shared.settings import Settings\n"
        f"Scheduler(Settings(broker_url={amqp_url(vhost)!r}))\n"
        "print(generate_latest().decode())\n"
    )
    started = time.time()
    exported = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for stage in sched.ERROR_STAGES:
        assert f'bcast_scheduler_errors_total{{stage="{stage}"}} 0.0' in exported
    # The success times count from the process's start until a first success.
    for stage in sched.STAGES:
        [value] = re.findall(
            rf'^bcast_scheduler_stage_last_success_timestamp_seconds{{stage="{stage}"}} (\S+)$',
            exported,
            re.MULTILINE,
        )
        assert abs(float(value) - started) < 60
    [value] = re.findall(r"^bcast_scheduler_last_pass_timestamp_seconds (\S+)$", exported, re.M)
    assert abs(float(value) - started) < 60
    for reason in ("lease", "message", "stranded"):
        assert f'bcast_batches_recovered_total{{reason="{reason}"}} 0.0' in exported
    for reason in ("start", "stalled"):
        assert f'bcast_outbox_published_total{{reason="{reason}"}} 0.0' in exported
    for action in ("dropped", "archived"):
        assert f'bcast_delivery_rows_removed_total{{action="{action}"}} 0.0' in exported
        assert f'bcast_delivery_partitions_removed_total{{action="{action}"}} 0.0' in exported


def test_a_sweep_gives_back_rows_nothing_else_would_and_tells_the_operator(
    settings: Settings, vhost: str, api: Api, conn: psycopg.Connection[Any], caplog: Any
) -> None:
    from shared import delivery_store as store
    from tests.delivery_store.conftest import lose_run, new_task, rows, run_batch

    task = new_task(api, conn, 2)
    batch = run_batch(conn, task.id)
    store.run(conn, store.claim(batch, 2))
    # Its run lost the batch, marked done, with the rows still held (an earlier version's).
    lose_run(conn, batch.id, "done")
    counted = REGISTRY.get_sample_value("bcast_stranded_rows_total") or 0.0
    with scheduler(settings, amqp_url(vhost)) as s, caplog.at_level("WARNING"):
        s._sweep()
    assert rows(conn, task.id) == {"queued": 2}
    assert (REGISTRY.get_sample_value("bcast_stranded_rows_total") or 0.0) - counted >= 2
    [line] = [
        r
        for r in caplog.records
        if getattr(r, "event", None) == "stranded_rows"
        and getattr(r, "broadcast_id", None) == task.id
    ]
    assert (getattr(line, "rows", None), getattr(line, "batches", None)) == (2, 1)

"""The scheduler's keeper of delivery partitions: one round makes them ahead, removes those
past retention, logs each removal with its ids, and the metrics follow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from services.scheduler.partitions import PartitionKeeper
from shared import delivery_partitions as partitions
from shared import delivery_store as store
from shared.settings import Settings
from tests.conftest import Api
from tests.delivery_store.test_partitions import filed_task, partition_of, today


@pytest.fixture
def conn(database_url: str) -> Any:
    from shared.db.engine import libpq_url

    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_one_round_makes_ahead_removes_past_retention_and_counts_it(
    api: Api, conn: psycopg.Connection[Any], settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    dropped = filed_task(api, conn, today(conn) - timedelta(days=5000), 4, status="completed")
    held = filed_task(api, conn, today(conn) - timedelta(days=5100), 2, status="in_progress")
    gone, kept = partition_of(conn, dropped), partition_of(conn, held)
    removed_before = sample("bcast_delivery_partitions_removed_total", action="dropped")
    rows_before = sample("bcast_delivery_rows_removed_total", action="dropped")
    keeper = PartitionKeeper(
        settings.model_copy(update={"delivery_retention_days": 60, "delivery_archive": False}),
        threading.Event(),
    )

    # Only the round's own lines: making the old partitions above may have logged as well
    # (when an earlier test in this process left the logger at INFO).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="shared.delivery_partitions"):
        upkeep = keeper.run_once()

    day = today(conn)
    assert upkeep.ahead[0].first_day <= day < upkeep.ahead[0].end_day
    assert len(upkeep.ahead) == partitions.PARTITIONS_AHEAD + 1
    actions = {r.partition.name: r.action for r in upkeep.removals}
    assert actions[gone] == partitions.Action.DROPPED
    assert actions[kept] == partitions.Action.HELD
    dropped_now = sum(1 for a in actions.values() if a == partitions.Action.DROPPED)
    rows_now = sum(r.rows for r in upkeep.removals if r.action == partitions.Action.DROPPED)
    assert (
        sample("bcast_delivery_partitions_removed_total", action="dropped") - removed_before
        == dropped_now
    )
    assert sample("bcast_delivery_rows_removed_total", action="dropped") - rows_before == rows_now
    assert rows_now >= 4
    listed = store.run(conn, partitions.listing())
    assert sample("bcast_delivery_partitions", state="attached") == sum(
        1 for p in listed if p.state == partitions.State.ATTACHED
    )
    assert sample("bcast_delivery_partitions_held") == sum(
        1 for a in actions.values() if a == partitions.Action.HELD
    )
    logged = [r for r in caplog.records if getattr(r, "partition", None) == gone]
    assert [(r.action, r.rows) for r in logged] == [("dropped", 4)]  # type: ignore[attr-defined]


def test_the_keeper_keeps_partitions_in_its_own_thread_until_stopped(
    api: Api, conn: psycopg.Connection[Any], settings: Settings
) -> None:
    task = filed_task(api, conn, today(conn) - timedelta(days=5200), 1, status="canceled")
    name = partition_of(conn, task)
    stopping = threading.Event()
    keeper = PartitionKeeper(settings.model_copy(update={"delivery_retention_days": 60}), stopping)
    keeper.start()
    try:
        wait_for(lambda: conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,))
    finally:
        stopping.set()
        keeper.join(timeout=10)
    assert keeper._thread is not None
    assert not keeper._thread.is_alive()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)


def test_a_round_removes_the_rows_of_deleted_broadcasts_and_counts_them(
    api: Api, conn: psycopg.Connection[Any], settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    deleted = filed_task(api, conn, today(conn), 3, status="completed")
    kept = filed_task(api, conn, today(conn), 2, status="completed")
    conn.execute("DELETE FROM broadcast WHERE id = %s", (deleted.id,))
    before = sample("bcast_delivery_rows_purged_total")
    keeper = PartitionKeeper(settings, threading.Event())
    with caplog.at_level(logging.INFO, logger="services.scheduler.partitions"):
        upkeep = keeper.run_once()
    assert upkeep.purged >= 3
    assert sample("bcast_delivery_rows_purged_total") - before == upkeep.purged
    left = conn.execute(
        "SELECT broadcast_id, count(*) FROM delivery WHERE broadcast_id = ANY(%s) GROUP BY 1",
        ([deleted.id, kept.id],),
    ).fetchall()
    assert left == [(kept.id, 2)]
    assert [r.rows for r in caplog.records if r.msg.startswith("delivery rows of deleted")] == [  # type: ignore[attr-defined]
        upkeep.purged
    ]

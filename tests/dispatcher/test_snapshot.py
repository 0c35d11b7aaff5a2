"""The audience a started broadcast copies: the preview's query, as it stood at the start."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import psycopg
import pytest

from services.dispatcher import snapshot
from services.dispatcher.runtime import Runtime
from services.dispatcher.snapshot import audience_source
from shared import delivery_partitions as partitions
from shared import delivery_store as store
from shared.db.engine import libpq_url
from shared.domain.audience import AudienceSpec
from shared.settings import Settings
from tests.conftest import Api


@pytest.fixture
def conn(database_url: str) -> Any:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


def test_the_copy_takes_the_filtered_audience_as_it_stood_when_sending_started(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    vip = api.contact(account["id"], "vip-1", tags=["vip"])
    plain = api.contact(account["id"], "plain-1")
    gone = api.contact(account["id"], "vip-2", tags=["vip"], opted_out=True)
    blocked = api.contact(account["id"], "vip-3", tags=["vip"])
    conn.execute(
        "UPDATE contact SET unreachable_at = now(), unreachable_reason = 'blocked' WHERE id = %s",
        (blocked["id"],),
    )
    spec = AudienceSpec(tag_ids=[api.tag_id("vip")])
    b = api.broadcast(channel["id"], spec.model_dump())
    started = datetime.now(UTC)
    api.contact(account["id"], "vip-late", tags=["vip"])  # after the start: not a recipient
    conn.execute(
        "UPDATE broadcast SET status = 'in_progress', started_at = %s WHERE id = %s",
        (started, b["id"]),
    )
    source = audience_source(api.workspace_id, channel["id"], spec, started)
    assert store.run(conn, store.snapshot(b["id"], source, batch_size=10)) == 2
    copied = dict(
        conn.execute(
            "SELECT contact_id, status FROM delivery WHERE broadcast_id = %s", (b["id"],)
        ).fetchall()
    )
    assert copied == {vip["id"]: "queued", blocked["id"]: "skipped"}
    assert plain["id"] not in copied
    assert gone["id"] not in copied


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    rt.open()
    yield rt
    rt.close()


def _started(api: Api, conn: psycopg.Connection[Any], contacts: int) -> int:
    channel = api.channel()
    account = api.account(channel["id"])
    for i in range(contacts):
        api.contact(account["id"], f"r-{i}")
    b = api.broadcast(channel["id"])
    conn.execute(
        "UPDATE broadcast SET status = 'in_progress', started_at = now() WHERE id = %s",
        (b["id"],),
    )
    return int(b["id"])


def _partitions_of(conn: psycopg.Connection[Any], broadcast_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT DISTINCT tableoid::regclass::text, part_day FROM delivery WHERE broadcast_id = %s",
        (broadcast_id,),
    ).fetchall()


def test_a_start_files_the_copy_under_today_in_todays_partition(
    api: Api, conn: psycopg.Connection[Any], runtime: Runtime
) -> None:
    b = _started(api, conn, 3)
    assert runtime.call(snapshot.start(runtime, b)) == 3
    today = conn.execute(f"SELECT {store.TODAY}").fetchone()
    ((table, day),) = _partitions_of(conn, b)
    assert (day,) == today
    assert conn.execute("SELECT part_day FROM broadcast WHERE id = %s", (b,)).fetchone() == today
    assert conn.execute(
        "SELECT DISTINCT part_day FROM delivery_batch WHERE broadcast_id = %s", (b,)
    ).fetchall() == [today]
    assert table.startswith("delivery_p")


def test_a_start_makes_the_partition_of_its_day_when_missing(
    api: Api, conn: psycopg.Connection[Any], runtime: Runtime
) -> None:
    # Its day was fixed by an earlier attempt, long enough ago that no partition holds it.
    b = _started(api, conn, 2)
    day = date(1999, 4, 7)
    conn.execute("UPDATE broadcast SET part_day = %s WHERE id = %s", (day, b))
    assert not [
        p
        for p in store.run(conn, partitions.listing())
        if p.state == partitions.State.ATTACHED and p.first_day <= day < p.end_day
    ]
    assert runtime.call(snapshot.start(runtime, b)) == 2
    ((table, filed),) = _partitions_of(conn, b)
    assert filed == day
    made = [p for p in store.run(conn, partitions.listing()) if p.name == table]
    assert [(p.state, p.first_day <= day < p.end_day) for p in made] == [
        (partitions.State.ATTACHED, True)
    ]
